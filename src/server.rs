//! The running process: binds every listener, serves them, reloads, drains on shutdown.
//!
//! [`Server::bind`] does everything that can fail at startup (binding sockets, reading
//! certificates) before anything is served, so a bad start fails as a whole. [`Server::run`]
//! serves until the shutdown token is cancelled, then stops accepting and gives open connections
//! until the drain deadline to finish.
//!
//! A [`ServerHandle`] reloads a running server: the new configuration is validated and its
//! certificates read and new sockets bound before anything changes; then the snapshot of pools is
//! swapped, listeners that stay get their new settings (their sockets, and connections open on
//! them, are untouched), new ones start and removed ones stop accepting while their connections
//! finish. A listener whose address moves to a listener of another name or protocol hands its
//! socket over rather than closing it.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::access_log::Writers;
use crate::backend::{BackendState, Registry};
use crate::config::{Config, ConfigError, ListenerConfig, ListenerKind};
use crate::http::HttpProxy;
use crate::http::h2_upstream::H2Pool;
use crate::http::router::Router;
use crate::http::upstream::UpstreamPool;
use crate::l4::tcp::TcpProxy;
use crate::l4::udp::UdpProxy;
use crate::listener;
use crate::metrics::Metrics;
use crate::pool::{Pool, Snapshot};
use crate::ratelimit::Limiter;
use crate::tls::TlsStore;

/// Why the server could not start, or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener's address could not be bound. The reason is part of the message (not a
    /// chained source), because the reload API and the log show the message alone; chained, it
    /// would be printed twice at startup.
    #[error("{at}: listener `{listener}`: {}", crate::listener::bind_failure(*addr, reason))]
    Bind {
        /// The key to blame, `listeners[N].bind`.
        at: String,
        listener: String,
        addr: SocketAddr,
        reason: io::Error,
    },
    /// A certificate, key or CA file named by the configuration cannot be used.
    #[error("{}", problems.iter().map(|p| format!("{}: {}", p.path, p.reason)).collect::<Vec<_>>().join("\n"))]
    Tls {
        /// Every problem found, with its key path.
        problems: Vec<crate::config::Problem>,
    },
    /// The configuration file could not be read or is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A reload was asked of a server that was not started from a file.
    #[error("this server was not started from a file, so there is nothing to reload")]
    NoFile,
    /// An access log file cannot be opened.
    #[error("{at}: {reason}")]
    AccessLog {
        /// The key that names the file, `listeners[N].access_log.path`.
        at: String,
        /// Why, naming the file.
        reason: String,
    },
    /// The admin listener could not be bound.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// The server is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

impl ServerError {
    /// Every problem as (key path, reason), as `check` reports them: the key path is empty
    /// for what no key of the file is to blame for.
    pub fn problems(&self) -> Vec<crate::config::Problem> {
        use crate::config::Problem;
        match self {
            ServerError::Config(error) => error.problems(),
            ServerError::Tls { problems } => problems.clone(),
            ServerError::AccessLog { at, reason } => vec![Problem {
                path: at.clone(),
                reason: reason.clone(),
            }],
            ServerError::Bind {
                at,
                listener,
                addr,
                reason,
            } => vec![Problem {
                path: at.clone(),
                reason: format!(
                    "listener `{listener}`: {}",
                    crate::listener::bind_failure(*addr, reason)
                ),
            }],
            ServerError::Admin(error) => vec![Problem {
                path: "admin.bind".to_owned(),
                reason: error.reason(),
            }],
            other => vec![Problem {
                path: String::new(),
                reason: other.to_string(),
            }],
        }
    }
}

/// A listening socket, shared so that it can pass from one accept loop to the next.
#[derive(Clone)]
enum Socket {
    Tcp(Arc<TcpListener>),
    Udp(Arc<UdpSocket>),
}

/// A listener's current settings; connections hold the `Arc` they started with.
#[derive(Clone)]
enum Proxy {
    Tcp(Arc<ArcSwap<TcpProxy>>),
    Http(Arc<ArcSwap<HttpProxy>>),
    Udp(Arc<ArcSwap<UdpProxy>>),
}

/// One listener of the running configuration.
struct Running {
    name: String,
    /// The address the file names (port 0 included).
    bind: SocketAddr,
    /// The address actually bound.
    addr: SocketAddr,
    socket: Socket,
    proxy: Proxy,
    /// The listener's `max_connections` permits (tcp and http).
    limit: Arc<Semaphore>,
    max_connections: usize,
    /// Shared by its connections' admissions: among others, the permits a lowered
    /// `max_connections` still has to take out of circulation (each connection that ends gives
    /// its permit up instead of returning it, until none are owed).
    admissions: Arc<listener::Admissions>,
    /// Stops this listener's accept or receive loop.
    stop: CancellationToken,
    /// Whether its loop has been spawned (listeners bound before `run` start there).
    started: bool,
    /// An http listener's earlier settings, as long as connections still use them (see
    /// `Shared::update`).
    older: Vec<std::sync::Weak<HttpProxy>>,
}

/// Rate limiters by whose limit they are.
type Limiters = std::collections::HashMap<LimitOwner, Arc<Limiter>>;

/// Whose rate limit a limiter is, as a reload finds it again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LimitOwner {
    /// The listener's name.
    listener: String,
    /// `None` for the listener's own limit; for a route's, its conditions (not its index,
    /// which a route inserted before it changes), and which of the listener's routes with
    /// those same conditions it is (0 for the first).
    route: Option<(crate::config::RouteIdentity, usize)>,
}

impl LimitOwner {
    /// Listener `name`'s own limit.
    fn listener(name: &str) -> LimitOwner {
        LimitOwner {
            listener: name.to_owned(),
            route: None,
        }
    }
}

/// The owners of the limits of `routes`, the routes of listener `listener`, in their order.
fn route_owners(listener: &str, routes: &[crate::config::RouteConfig]) -> Vec<LimitOwner> {
    let mut seen = std::collections::HashMap::new();
    routes
        .iter()
        .map(|route| {
            let identity = route.matcher.identity();
            let nth = seen.entry(identity.clone()).or_insert(0usize);
            let owner = LimitOwner {
                listener: listener.to_owned(),
                route: Some((identity, *nth)),
            };
            *nth += 1;
            owner
        })
        .collect()
}

/// What the server runs now.
struct State {
    config: Arc<Config>,
    /// The certificates of `config`, kept for rebuilding pools when the admin API changes a
    /// weight.
    tls: Arc<TlsStore>,
    listeners: Vec<Running>,
    /// Stops the current snapshot's health checks.
    checks: CancellationToken,
    /// Stops one pool's health checks (children of `checks`), for a pool rebuilt alone.
    pool_checks: std::collections::HashMap<String, CancellationToken>,
}

/// What every part of a running server shares: the data path's snapshot and backend state,
/// the listeners, and the means to reload and to stop.
pub struct Shared {
    registry: Arc<Registry>,
    /// Per-listener counters, kept across reloads.
    metrics: Arc<Metrics>,
    /// Access log writers, by destination.
    logs: Arc<Writers>,
    /// The rate limits in force, by listener and route (`None`: the listener's own), so that a
    /// reload that leaves a limit as it was keeps its buckets.
    limiters: Mutex<Limiters>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    upstream: Arc<UpstreamPool>,
    h2_upstream: Arc<H2Pool>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// The udp listeners' loops (also in `tasks`), and the end of the drain for them: a loop
    /// still serving sessions at the drain deadline ends them, so their log lines are queued
    /// before the last flush.
    udp_loops: TaskTracker,
    drain_over: CancellationToken,
    /// Where http listeners park idle client connections; `None` if it could not be set up.
    lot: Option<Arc<crate::park::Lot<crate::http::ParkedClient>>>,
    /// Where tcp listeners park idle forwarded connections.
    tcp_lot: Option<Arc<crate::park::Lot<crate::l4::tcp::ParkedTcp>>>,
    state: Mutex<State>,
    /// Serialises reloads: one that arrives during another waits for it, and is not lost.
    reloading: tokio::sync::Mutex<()>,
    /// Reloads of the file asked for and not over yet, queued ones included: the service
    /// manager is told RELOADING=1 when the first starts and READY=1 when the last ends.
    reloads_running: AtomicU64,
    /// The file the configuration was read from, for reloads.
    path: Option<PathBuf>,
    /// Configurations applied: 1 at start, one more per successful reload.
    generation: AtomicU64,
    /// Reloads that succeeded and failed.
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    /// The admin listener, bound at start and served by `run`.
    admin: Mutex<Option<crate::admin::Admin>>,
    /// Where the admin listener is bound, if there is one.
    admin_addr: Option<SocketAddr>,
    /// The `admin.bind` it was bound for: a reload's `[admin]` with the same one brings its
    /// token in force, and a binary upgrade hands its socket over under this address.
    admin_bind: Option<SocketAddr>,
    /// The admin token in force: the one it was bound with, then the one of the last reload
    /// whose `[admin]` named the same address.
    admin_token: arc_swap::ArcSwapOption<String>,
    /// The admin listener's socket, handed over in a binary upgrade.
    admin_socket: Option<Arc<TcpListener>>,
    /// Told of each reload, so that the lookups of `resolve = true` names start over with
    /// the new settings and names.
    resolve_wake: tokio::sync::Notify,
    /// Lookups of `resolve = true` names by result: the same addresses, other addresses,
    /// failed (or found none).
    resolutions: [AtomicU64; 3],
}

/// A handle on a running (or about to run) server: reload, state, addresses.
#[derive(Clone)]
pub struct ServerHandle(Arc<Shared>);

/// A bound, not yet running, load balancer.
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// Binds every listener of `config`. Port 0 gets a free port; see [`Server::local_addr`].
    pub fn bind(config: Config) -> Result<Server, ServerError> {
        Server::bind_with_shutdown(config, CancellationToken::new())
    }

    /// Like [`Server::bind`], with a shutdown token made beforehand (so that signal handlers
    /// can be in place while the configuration is still loading).
    pub fn bind_with_shutdown(
        config: Config,
        shutdown: CancellationToken,
    ) -> Result<Server, ServerError> {
        Server::bind_from(config, None, shutdown)
    }

    /// Like [`Server::bind_with_shutdown`], remembering the file the configuration came from so
    /// that [`ServerHandle::reload_file`] can read it again.
    pub fn bind_from(
        config: Config,
        path: Option<PathBuf>,
        shutdown: CancellationToken,
    ) -> Result<Server, ServerError> {
        Server::bind_inheriting(config, path, shutdown, None)
    }

    /// Like [`Server::bind_from`], taking listening sockets from an old process being
    /// upgraded where a listener matches one of them (see [`crate::upgrade`]).
    pub fn bind_inheriting(
        config: Config,
        path: Option<PathBuf>,
        shutdown: CancellationToken,
        mut inherited: Option<&mut crate::upgrade::Inherited>,
    ) -> Result<Server, ServerError> {
        let registry = Arc::new(Registry::default());
        let config = Arc::new(config);
        let tls = build_tls(&config)?;
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::new(
            &config, &registry, &tls,
        )));
        let admin = match &config.admin {
            None => None,
            Some(admin) => {
                let adopted = inherited
                    .as_deref_mut()
                    .and_then(|i| i.take(crate::admin::UPGRADE_NAME, admin.bind, false));
                Some(
                    crate::admin::Admin::bind_or_adopt(admin, adopted)
                        .map_err(ServerError::Admin)?,
                )
            }
        };
        let admin_socket = admin.as_ref().map(crate::admin::Admin::socket);
        let admin_addr = admin.as_ref().and_then(|a| a.local_addr().ok());
        let tasks = TaskTracker::new();
        let (lot, tcp_lot) = match (
            crate::park::Lot::new(shutdown.clone(), tasks.clone()),
            crate::park::Lot::new(shutdown.clone(), tasks.clone()),
        ) {
            (Ok(lot), Ok(tcp_lot)) => (Some(lot), Some(tcp_lot)),
            (Err(error), _) | (_, Err(error)) => {
                warn!(%error, "idle connections will not be parked");
                (None, None)
            }
        };
        let shared = Arc::new(Shared {
            registry,
            metrics: Arc::new(Metrics::default()),
            limiters: Mutex::default(),
            logs: Arc::new(Writers::default()),
            snapshot,
            upstream: Arc::new(UpstreamPool::default()),
            h2_upstream: Arc::new(H2Pool::default()),
            shutdown: shutdown.clone(),
            tasks,
            udp_loops: TaskTracker::new(),
            drain_over: CancellationToken::new(),
            lot,
            tcp_lot,
            state: Mutex::new(State {
                config: Arc::clone(&config),
                tls: Arc::new(TlsStore::default()),
                listeners: Vec::new(),
                checks: shutdown.child_token(),
                pool_checks: std::collections::HashMap::new(),
            }),
            reloading: tokio::sync::Mutex::new(()),
            reloads_running: AtomicU64::new(0),
            path,
            generation: AtomicU64::new(1),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            admin: Mutex::new(admin),
            admin_addr,
            admin_bind: config
                .admin
                .as_ref()
                .map(|a| a.bind)
                .filter(|_| admin_addr.is_some()),
            admin_token: arc_swap::ArcSwapOption::new(
                config
                    .admin
                    .as_ref()
                    .and_then(|a| a.token.clone())
                    .map(Arc::new),
            ),
            admin_socket,
            resolve_wake: tokio::sync::Notify::new(),
            resolutions: Default::default(),
        });
        let mut listeners = Vec::new();
        for (index, l) in config.listeners.iter().enumerate() {
            let udp = matches!(l.kind, ListenerKind::Udp(_));
            let socket = match inherited
                .as_deref_mut()
                .and_then(|i| i.take(&l.name, l.bind, udp))
            {
                Some(fd) => adopt(index, l, fd, udp)?,
                None => bind_socket(index, l)?,
            };
            let built = shared.proxy(index, l, &tls)?;
            listeners.push(shared.running(index, l, socket, built)?);
        }
        let mut state = shared.lock();
        state.listeners = listeners;
        shared.keep_limiters(&state.listeners, &config.listeners);
        state.tls = Arc::new(tls);
        drop(state);
        Ok(Server { shared })
    }

    /// The address listener `name` is bound to (with the real port when the file said 0).
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.handle().local_addr(name)
    }

    /// Live backend state, shared with the data path.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.shared.registry)
    }

    /// Cancelling this token starts a graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// A handle for reloads and for reading the running state, valid while the server runs.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle(Arc::clone(&self.shared))
    }

    /// Serves until the shutdown token is cancelled, then drains: listeners close at once, open
    /// connections get until `global.drain_timeout` to finish. Returns how many were cut off.
    pub async fn run(self) -> usize {
        let shared = self.shared;
        // The process's own tasks first, so that they exist before the first connection: one
        // may be served as soon as the first accept loop runs, on another thread, while this
        // one is still starting the rest.
        tokio::spawn(release_memory(shared.shutdown.clone()));
        if let Some(lot) = &shared.lot {
            lot.start();
        }
        if let Some(lot) = &shared.tcp_lot {
            lot.start();
        }
        // Backends given by host names follow the DNS until the shutdown.
        tokio::spawn(crate::discovery::run(ServerHandle(Arc::clone(&shared))));
        {
            let mut state = shared.lock();
            // Health checks and drain deadlines of this configuration; they stop with the
            // server or at the next reload.
            state.pool_checks = shared.snapshot.load().activate(&state.checks);
            for running in &mut state.listeners {
                shared.start(running);
            }
        }
        // The admin server last: its "listening" line comes after the listeners', the first of
        // which names the first listener's address, and a reload it runs finds them started.
        let admin = shared
            .admin
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        if let Some(admin) = admin {
            tokio::spawn(admin.serve(
                ServerHandle(Arc::clone(&shared)),
                shared.shutdown.clone(),
                shared.tasks.clone(),
            ));
        }
        let serving = shared.lock().listeners.len();
        crate::notify::ready(&format!("serving {serving} listener(s)"));

        shared.shutdown.cancelled().await;
        crate::notify::stopping();
        // Wait for a reload in progress to finish, so no listener starts after this point.
        let _no_more_reloads = shared.reloading.lock().await;
        // The loops have stopped; dropping the listeners closes their sockets, so new
        // connections are refused rather than left in the backlog.
        shared.lock().listeners.clear();
        // Parked connections end now (http) or go back to tasks to run through the drain
        // (tcp), before the wait for tasks starts.
        if let Some(lot) = &shared.lot {
            lot.close_all();
        }
        if let Some(lot) = &shared.tcp_lot {
            lot.close_all();
        }
        shared.tasks.close();
        let open = shared.tasks.len();
        let deadline = shared.lock().config.global.drain_timeout;
        info!(
            open,
            ?deadline,
            "shutting down: no longer accepting, draining"
        );
        let left = if tokio::time::timeout(deadline, shared.tasks.wait())
            .await
            .is_ok()
        {
            info!("drained");
            0
        } else {
            let left = shared.tasks.len();
            warn!(left, "drain deadline reached, closing what is left");
            // UDP sessions still open end now, with their log lines; so do TCP connections,
            // as a backend's drain deadline ends them (on backends a reload removed too), so
            // that every connection has its line.
            shared.drain_over.cancel();
            shared.udp_loops.close();
            shared.registry.close_all();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                shared.udp_loops.wait().await;
                shared.tasks.wait().await;
            })
            .await;
            left
        };
        // The log lines of the last requests, before the process exits.
        shared.logs.flush(std::time::Duration::from_secs(2)).await;
        left
    }
}

/// A listener as the admin API reports it.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    /// Its name.
    pub name: String,
    /// `tcp`, `udp` or `http`.
    pub protocol: &'static str,
    /// The address it is bound to.
    pub addr: SocketAddr,
    /// Connections open now (sessions for udp).
    pub active: u64,
    /// Datagrams a udp listener dropped (0 for the others).
    pub dropped: u64,
    /// Earlier settings of an http listener that connections opened before a reload still
    /// use (0 for the others): what keeps old routers and rules in memory.
    pub older_settings: u64,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// The configuration generation now in force.
    pub generation: u64,
    /// Listeners that kept their socket and took the new settings.
    pub updated: Vec<String>,
    /// Listeners started.
    pub started: Vec<String>,
    /// Listeners stopped (their connections finish).
    pub stopped: Vec<String>,
}

impl ServerHandle {
    /// The address listener `name` is bound to.
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.0
            .lock()
            .listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.addr)
    }

    /// Every listener's name and bound address, in file order.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.0
            .lock()
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.addr))
            .collect()
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.0.lock().config)
    }

    /// The pools in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.0.snapshot.load_full()
    }

    /// Live backend state.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.0.registry)
    }

    /// Every listening socket, described, with a duplicate of its descriptor: what a new
    /// process takes over in a binary upgrade.
    pub fn sockets(&self) -> Vec<(crate::upgrade::Description, std::os::fd::OwnedFd)> {
        use std::os::fd::AsFd;
        let admin = self.0.admin_socket.as_ref().and_then(|socket| {
            // Described by the address it was bound for, not a reload's: a reload that moves
            // `[admin]` takes effect at the next start, and the new process is that start, so
            // it must not take this socket for the new address.
            let bind = self.0.admin_bind?;
            let fd = socket.as_fd().try_clone_to_owned().ok()?;
            let description = crate::upgrade::Description {
                name: crate::admin::UPGRADE_NAME.to_owned(),
                bind,
                udp: false,
            };
            Some((description, fd))
        });
        let mut sockets: Vec<_> = self
            .0
            .lock()
            .listeners
            .iter()
            .filter_map(|l| {
                let (fd, udp) = match &l.socket {
                    Socket::Tcp(s) => (s.as_fd().try_clone_to_owned(), false),
                    Socket::Udp(s) => (s.as_fd().try_clone_to_owned(), true),
                };
                let description = crate::upgrade::Description {
                    name: l.name.clone(),
                    bind: l.bind,
                    udp,
                };
                fd.ok().map(|fd| (description, fd))
            })
            .collect();
        sockets.extend(admin);
        sockets
    }

    /// Where the admin API listens, if it is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.0.admin_addr
    }

    /// The token the admin API asks for now, if any.
    pub fn admin_token(&self) -> Option<Arc<String>> {
        self.0.admin_token.load_full()
    }

    /// Every listener's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.0.metrics)
    }

    /// Each listener's name, protocol, address and open connections (sessions for udp).
    pub fn listener_stats(&self) -> Vec<ListenerInfo> {
        self.0
            .lock()
            .listeners
            .iter()
            .map(|l| {
                // Kept by name, so they count on across a reload that rebinds the listener
                // (whose old loop still serves its connections or sessions).
                let stats = self.0.metrics.listener(&l.name);
                ListenerInfo {
                    name: l.name.clone(),
                    protocol: match &l.proxy {
                        Proxy::Tcp(_) => "tcp",
                        Proxy::Http(_) => "http",
                        Proxy::Udp(_) => "udp",
                    },
                    addr: l.addr,
                    active: stats.open.load(Relaxed),
                    dropped: stats.datagrams_dropped.load(Relaxed),
                    older_settings: l.older.iter().filter(|w| w.strong_count() > 0).count() as u64,
                }
            })
            .collect()
    }

    /// Sets `backend`'s weight in pool `name` (the admin API's override, until the next reload)
    /// and builds that pool again from the configuration in force; health checks and drains go
    /// on as they are, and the other pools are kept as they are. The build (a maglev table may
    /// have millions of slots) runs on a blocking thread: a weight change must not stall the
    /// connections the runtime's threads serve.
    ///
    /// It waits for a reload being applied, so that a weight set meanwhile holds after it
    /// rather than being cleared by it; once the shutdown has started it is refused, since the
    /// drain holds reloads off until the process ends.
    pub async fn set_weight(
        &self,
        name: &str,
        backend: &BackendState,
        weight: u32,
    ) -> Result<(), ServerError> {
        let _one_at_a_time = tokio::select! {
            guard = self.0.reloading.lock() => guard,
            () = self.0.shutdown.cancelled() => return Err(ServerError::ShuttingDown),
        };
        if self.0.shutdown.is_cancelled() {
            return Err(ServerError::ShuttingDown);
        }
        backend.set_weight_override(weight);
        let (config, tls) = {
            let state = self.0.lock();
            (Arc::clone(&state.config), Arc::clone(&state.tls))
        };
        let registry = Arc::clone(&self.0.registry);
        let name = name.to_owned();
        let built = tokio::task::spawn_blocking(move || {
            let pool = config.pools.get(&name)?;
            Some(Pool::new(pool, &registry, &tls))
        })
        .await;
        let Ok(Some(pool)) = built else {
            return Ok(());
        };
        let mut pools = self.0.snapshot.load().pools.clone();
        pools.insert(pool.name.clone(), Arc::new(pool));
        self.0.snapshot.store(Arc::new(Snapshot { pools }));
        Ok(())
    }

    /// Puts `pool` in force in place of the pool of its name: the same pool of the
    /// configuration `expected`, with the addresses its `resolve = true` names resolve to now.
    /// It is rebuilt as a weight change rebuilds one (on a blocking thread, the admin API's
    /// changes kept), and addresses that left it are let go as a reload lets go of removed
    /// backends: work in flight on them finishes. Its health checks start over, covering the
    /// new addresses and no longer the old. Returns the configuration now in force, or `None`
    /// when `expected` no longer is (a reload came first) or the server is shutting down.
    pub(crate) async fn replace_pool(
        &self,
        expected: &Arc<Config>,
        pool: crate::config::PoolConfig,
    ) -> Option<Arc<Config>> {
        let shared = &self.0;
        let _one_at_a_time = tokio::select! {
            guard = shared.reloading.lock() => guard,
            () = shared.shutdown.cancelled() => return None,
        };
        if shared.shutdown.is_cancelled() {
            return None;
        }
        let (config, tls) = {
            let state = shared.lock();
            (Arc::clone(&state.config), Arc::clone(&state.tls))
        };
        if !Arc::ptr_eq(&config, expected) {
            return None;
        }
        let registry = Arc::clone(&shared.registry);
        let built = {
            let pool = pool.clone();
            tokio::task::spawn_blocking(move || Pool::new(&pool, &registry, &tls))
                .await
                .ok()?
        };
        let name = pool.name.clone();
        let before: std::collections::HashSet<SocketAddr> = config
            .pools
            .get(&name)
            .map(|p| p.backends.iter().map(|b| b.addr).collect())
            .unwrap_or_default();
        let mut next = (*config).clone();
        next.pools.insert(name.clone(), pool);
        let next = Arc::new(next);
        let built = Arc::new(built);

        let mut state = shared.lock();
        let mut pools = shared.snapshot.load().pools.clone();
        pools.insert(name.clone(), Arc::clone(&built));
        shared.snapshot.store(Arc::new(Snapshot { pools }));
        shared.registry.retain(&next);
        built.apply_drains_to_new(&before);
        if let Some(stop) = state.pool_checks.remove(&name) {
            stop.cancel();
        }
        let stop = state.checks.child_token();
        crate::health::spawn(&built, stop.clone());
        state.pool_checks.insert(name, stop);
        state.config = Arc::clone(&next);
        Some(next)
    }

    /// Resolves when a reload has put other settings or names in force (or at once, if one
    /// did since the last call).
    pub(crate) async fn reloaded(&self) {
        self.0.resolve_wake.notified().await;
    }

    /// Counts one lookup of a `resolve = true` name: 0 the same addresses, 1 other ones, 2
    /// failed.
    pub(crate) fn count_resolution(&self, result: usize) {
        if let Some(count) = self.0.resolutions.get(result) {
            count.fetch_add(1, Relaxed);
        }
    }

    /// Lookups of `resolve = true` names so far: the same addresses, other addresses, failed.
    pub fn resolutions(&self) -> [u64; 3] {
        self.0
            .resolutions
            .each_ref()
            .map(|count| count.load(Relaxed))
    }

    /// Runs `change` (an admin API change to a backend's state) when no reload is being
    /// applied, so that a reload's end does not clear a change made while it ran: the change
    /// came after the file. Once the shutdown has started no reload runs any more (the drain
    /// holds them off), and `change` runs at once.
    pub async fn between_reloads<T>(&self, change: impl FnOnce() -> T) -> T {
        let _one_at_a_time = tokio::select! {
            guard = self.0.reloading.lock() => Some(guard),
            () = self.0.shutdown.cancelled() => None,
        };
        change()
    }

    /// Asks every access log file to be reopened (after logrotate moved it).
    pub fn reopen_logs(&self) {
        self.0.logs.reopen();
    }

    /// Configurations applied so far (1 at start).
    pub fn generation(&self) -> u64 {
        self.0.generation.load(Relaxed)
    }

    /// Reloads that succeeded and that failed.
    pub fn reload_counts(&self) -> (u64, u64) {
        (
            self.0.reloads.load(Relaxed),
            self.0.reload_failures.load(Relaxed),
        )
    }

    /// Idle connections parked now, http and tcp (see [`crate::park`]).
    pub fn parked_connections(&self) -> usize {
        self.0.lot.as_ref().map_or(0, |lot| lot.len())
            + self.0.tcp_lot.as_ref().map_or(0, |lot| lot.len())
    }

    /// The file the configuration came from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.0.path.as_deref()
    }

    /// Cancelling this token starts a graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.0.shutdown.clone()
    }

    /// Reads the configuration file again and applies it; on any error nothing changes. The
    /// service manager is told that a reload runs, and when it is over.
    pub async fn reload_file(&self) -> Result<ReloadSummary, ServerError> {
        if self.0.shutdown.is_cancelled() {
            // Said in the log too: a SIGHUP has no one else to answer to.
            self.0.reload_failures.fetch_add(1, Relaxed);
            warn!(error = %ServerError::ShuttingDown, "reload refused; the running configuration is unchanged");
            return Err(ServerError::ShuttingDown);
        }
        // Reloads may overlap (a SIGHUP during one the API asked for): the service manager
        // hears RELOADING=1 once and READY=1 only when no reload is left, never READY=1 while
        // another still runs.
        let in_flight = ReloadInFlight::start(&self.0.reloads_running);
        if in_flight.first {
            crate::notify::reloading();
        }
        let result = self.load_and_reload().await;
        if in_flight.finish() && !self.0.shutdown.is_cancelled() {
            crate::notify::ready(&match &result {
                Ok(summary) => format!("serving configuration generation {}", summary.generation),
                Err(error) => format!("reload refused: {error}"),
            });
        }
        result
    }

    async fn load_and_reload(&self) -> Result<ReloadSummary, ServerError> {
        let path = self.0.path.clone().ok_or(ServerError::NoFile)?;
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| {
                ServerError::Config(ConfigError::Read {
                    file: PathBuf::new(),
                    source: io::Error::other(e),
                })
            })?;
        match loaded {
            Ok(config) => self.reload(config).await,
            Err(error) => {
                self.0.reload_failures.fetch_add(1, Relaxed);
                warn!(%error, "reload refused; the running configuration is unchanged");
                Err(ServerError::Config(error))
            }
        }
    }

    /// Applies `config`: validated already, it is checked against what the running server can
    /// do (certificates, addresses) before anything changes; on any error nothing changes.
    /// Once that check has passed, the reload is applied to its end: a caller that may give up
    /// waiting (a client of the admin API) runs it on a task of its own rather than drop it.
    pub async fn reload(&self, config: Config) -> Result<ReloadSummary, ServerError> {
        let result = self.apply(config).await;
        match &result {
            Ok(summary) => {
                self.0.reloads.fetch_add(1, Relaxed);
                info!(
                    generation = summary.generation,
                    updated = ?summary.updated,
                    started = ?summary.started,
                    stopped = ?summary.stopped,
                    "configuration reloaded"
                );
            }
            Err(error) => {
                self.0.reload_failures.fetch_add(1, Relaxed);
                warn!(%error, "reload refused; the running configuration is unchanged");
            }
        }
        result
    }

    async fn apply(&self, config: Config) -> Result<ReloadSummary, ServerError> {
        let shared = &self.0;
        let _one_at_a_time = shared.reloading.lock().await;
        if shared.shutdown.is_cancelled() {
            return Err(ServerError::ShuttingDown);
        }
        let tls = build_tls(&config)?;

        // Phase 1, fallible and without effect: sockets for listeners that need new ones. A
        // listener that stays (same name, address and protocol) keeps its own; one that takes
        // over the fixed address of another takes its socket; the rest are bound now.
        let mut sockets = Vec::with_capacity(config.listeners.len());
        {
            let state = shared.lock();
            for (index, l) in config.listeners.iter().enumerate() {
                let stays = state
                    .listeners
                    .iter()
                    .any(|r| r.name == l.name && r.bind == l.bind && same_kind(&r.proxy, &l.kind));
                let inherited = state
                    .listeners
                    .iter()
                    .find(|r| {
                        l.bind.port() != 0 && r.bind == l.bind && same_transport(&r.socket, l)
                    })
                    .map(|r| r.socket.clone());
                sockets.push(match (stays, inherited) {
                    (true, _) => None,
                    (false, Some(socket)) => Some(socket),
                    (false, None) => Some(bind_socket(index, l)?),
                });
            }
        }

        // Every listener's new settings (access log files opened).
        let built = config
            .listeners
            .iter()
            .enumerate()
            .map(|(index, l)| shared.proxy(index, l, &tls))
            .collect::<Result<Vec<_>, _>>()?;

        // Phase 2, which cannot fail: new pools, then listeners (a weight change through the
        // admin API waits for `reloading`, so it cannot interleave). The pools are built on a
        // blocking thread, since a maglev table of millions of slots must not stall a runtime
        // thread that serves traffic; the rest happens under the state lock. The file is in
        // charge again once its pools are: only then do the admin API's changes end, so a
        // reload that never gets there (the runtime going away) leaves them as they were.
        let registry = Arc::clone(&shared.registry);
        let (config, tls, snapshot) = tokio::task::spawn_blocking(move || {
            let snapshot = Snapshot::new(&config, &registry, &tls);
            (config, tls, snapshot)
        })
        .await
        .map_err(|failed| match failed.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // The runtime is going away, and the process with it.
            Err(_) => ServerError::ShuttingDown,
        })?;
        let mut summary = ReloadSummary::default();
        let mut state = shared.lock();
        let snapshot = Arc::new(snapshot);
        shared.snapshot.store(Arc::clone(&snapshot));
        for (_, backend) in shared.registry.all() {
            backend.clear_overrides();
        }
        shared.registry.retain(&config);
        state.checks.cancel();
        state.checks = shared.shutdown.child_token();
        state.pool_checks = snapshot.activate(&state.checks);

        let mut old: Vec<Option<Running>> = std::mem::take(&mut state.listeners)
            .into_iter()
            .map(Some)
            .collect();
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for (index, ((l, socket), built)) in
            config.listeners.iter().zip(sockets).zip(built).enumerate()
        {
            let same = old.iter().position(|r| {
                r.as_ref().is_some_and(|r| {
                    r.name == l.name && r.bind == l.bind && same_kind(&r.proxy, &l.kind)
                })
            });
            if let Some(i) = same
                && let Some(mut running) = old[i].take()
            {
                shared.update(&mut running, l, built);
                summary.updated.push(l.name.clone());
                listeners.push(running);
            } else if let Some(socket) = socket {
                let mut running = shared.running(index, l, socket, built)?;
                shared.start(&mut running);
                summary.started.push(l.name.clone());
                listeners.push(running);
            }
        }
        for running in old.into_iter().flatten() {
            running.stop.cancel();
            if let Proxy::Http(proxy) = &running.proxy {
                proxy.load().retired.cancel();
            }
            info!(listener = %running.name, addr = %running.addr, "listener removed: no longer accepting");
            summary.stopped.push(running.name);
        }
        state.listeners = listeners;
        shared.keep_limiters(&state.listeners, &config.listeners);
        shared.metrics.retain(&config.listeners);
        let logs: Vec<&crate::config::AccessLogTarget> = config
            .listeners
            .iter()
            .filter_map(access_log)
            .map(|log| &log.target)
            .collect();
        shared.logs.retain(&logs);
        if config.admin != state.config.admin {
            // A token is in force for the address the listener was bound for, never another.
            match (&config.admin, shared.admin_bind) {
                (Some(admin), Some(bound)) if admin.bind == bound => {
                    shared.admin_token.store(admin.token.clone().map(Arc::new));
                    info!("[admin] changed: the token in the file is in force from this reload");
                }
                _ => warn!(
                    "[admin] changed: the admin listener keeps its address and token until the next start"
                ),
            }
        }
        state.config = Arc::new(config);
        state.tls = Arc::new(tls);
        summary.generation = shared.generation.fetch_add(1, Relaxed) + 1;
        // The names were just looked up, with this file's settings: the next lookup is an
        // interval from now.
        shared.resolve_wake.notify_one();
        Ok(summary)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The running state of listener `index`, `l`, around a bound socket, not yet started.
    fn running(
        &self,
        index: usize,
        l: &ListenerConfig,
        socket: Socket,
        built: Built,
    ) -> Result<Running, ServerError> {
        let addr = match &socket {
            Socket::Tcp(s) => s.local_addr(),
            Socket::Udp(s) => s.local_addr(),
        }
        .map_err(|reason| ServerError::Bind {
            at: format!("listeners[{index}].bind"),
            listener: l.name.clone(),
            addr: l.bind,
            reason,
        })?;
        let proxy = match built {
            Built::Tcp(p) => Proxy::Tcp(Arc::new(ArcSwap::from_pointee(p))),
            Built::Http(p) => Proxy::Http(Arc::new(ArcSwap::from_pointee(p))),
            Built::Udp(p) => Proxy::Udp(Arc::new(ArcSwap::from_pointee(p))),
        };
        let max_connections = l.max_connections.min(Semaphore::MAX_PERMITS);
        Ok(Running {
            name: l.name.clone(),
            bind: l.bind,
            addr,
            socket,
            proxy,
            limit: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            admissions: Arc::new(listener::Admissions {
                stats: self.metrics.listener(&l.name),
                owed: Default::default(),
            }),
            stop: self.shutdown.child_token(),
            started: false,
            older: Vec::new(),
        })
    }

    /// Gives a listener that stays its new settings.
    fn update(&self, running: &mut Running, l: &ListenerConfig, built: Built) {
        match (&running.proxy, built) {
            (Proxy::Tcp(current), Built::Tcp(new)) => current.store(Arc::new(new)),
            (Proxy::Http(current), Built::Http(mut new)) => {
                new.retired = current.load().retired.clone();
                let new = Arc::new(new);
                let previous = current.swap(Arc::clone(&new));
                running.older.push(Arc::downgrade(&previous));
                drop(previous);
                // Every earlier generation still in use leads straight to the newest, so a
                // connection that keeps an old one (a WebSocket, an idle keep-alive client)
                // keeps no generation in between: frequent reloads do not pile up settings,
                // routers and open log files behind it.
                running.older.retain(|weak| match weak.upgrade() {
                    Some(old) => {
                        old.successor.store(Some(Arc::clone(&new)));
                        true
                    }
                    None => false,
                });
            }
            (Proxy::Udp(current), Built::Udp(new)) => current.store(Arc::new(new)),
            _ => unreachable_kind(),
        }
        let wanted = l.max_connections.min(Semaphore::MAX_PERMITS);
        if wanted > running.max_connections {
            // Permits an earlier reduction still owes are forgiven first; the rest are new.
            let more = wanted - running.max_connections;
            let forgiven = running
                .admissions
                .owed
                .fetch_update(Relaxed, Relaxed, |owed| Some(owed - owed.min(more)))
                .map_or(0, |owed| owed.min(more));
            running.limit.add_permits(more - forgiven);
        } else if wanted < running.max_connections {
            // What is free goes now; what connections hold goes as they end.
            let surplus = running.max_connections - wanted;
            let taken = running.limit.forget_permits(surplus);
            running.admissions.owed.fetch_add(surplus - taken, Relaxed);
        }
        running.max_connections = wanted;
    }

    /// Starts a listener's accept (tcp, http) or receive (udp) loop.
    fn start(&self, running: &mut Running) {
        if running.started {
            return;
        }
        running.started = true;
        info!(listener = %running.name, addr = %running.addr, "listening");
        match (&running.socket, &running.proxy) {
            (Socket::Tcp(socket), Proxy::Tcp(current)) => {
                self.spawn_accept(running, socket, current, |p, stream, peer, admission| {
                    p.serve(stream, peer, admission)
                });
            }
            (Socket::Tcp(socket), Proxy::Http(current)) => {
                self.spawn_accept(running, socket, current, |p, stream, peer, admission| {
                    p.serve(stream, peer, admission)
                });
            }
            (Socket::Udp(socket), Proxy::Udp(current)) => {
                self.tasks
                    .spawn(self.udp_loops.track_future(UdpProxy::serve(
                        Arc::clone(current),
                        Arc::clone(socket),
                        running.stop.clone(),
                        self.drain_over.clone(),
                    )));
            }
            _ => unreachable_kind(),
        }
    }

    /// Spawns the accept loop of a tcp or http listener: each connection is served by the
    /// listener's settings current when it was accepted.
    fn spawn_accept<P, F, Fut>(
        &self,
        running: &Running,
        socket: &Arc<TcpListener>,
        current: &Arc<ArcSwap<P>>,
        serve: F,
    ) where
        P: Send + Sync + 'static,
        F: Fn(Arc<P>, tokio::net::TcpStream, SocketAddr, listener::Admission) -> Fut
            + Send
            + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let name = running.name.clone();
        let (socket, current) = (Arc::clone(socket), Arc::clone(current));
        let (limit, admissions, stop, tasks) = (
            Arc::clone(&running.limit),
            Arc::clone(&running.admissions),
            running.stop.clone(),
            self.tasks.clone(),
        );
        tokio::spawn(async move {
            listener::accept_loop(
                &name,
                socket,
                limit,
                stop,
                tasks,
                move |stream, peer, permit| {
                    let admission = listener::Admission::new(permit, Arc::clone(&admissions));
                    serve(current.load_full(), stream, peer, admission)
                },
            )
            .await;
        });
    }

    /// The limiter of `limit`, owned by `owner`: the one in force when the limit is the same,
    /// so a reload keeps its buckets; otherwise a new one.
    fn limiter(
        &self,
        owner: &LimitOwner,
        limit: Option<&crate::config::RateLimit>,
    ) -> Option<Arc<Limiter>> {
        let limit = limit?;
        let limiters = self
            .limiters
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        Some(
            limiters
                .get(owner)
                .filter(|kept| kept.config() == limit)
                .map_or_else(|| Arc::new(Limiter::new(limit.clone())), Arc::clone),
        )
    }

    /// Makes the limiters of `listeners` (the configuration now in force, whose listeners are
    /// `configs`) the ones a later reload may keep, and forgets the others.
    fn keep_limiters(&self, listeners: &[Running], configs: &[ListenerConfig]) {
        let mut kept = Limiters::new();
        for running in listeners {
            let name = &running.name;
            match &running.proxy {
                Proxy::Tcp(proxy) => {
                    if let Some(limiter) = &proxy.load().rate_limit {
                        kept.insert(LimitOwner::listener(name), Arc::clone(limiter));
                    }
                }
                Proxy::Http(proxy) => {
                    let proxy = proxy.load();
                    if let Some(limiter) = &proxy.rate_limit {
                        kept.insert(LimitOwner::listener(name), Arc::clone(limiter));
                    }
                    let routes = configs
                        .iter()
                        .find(|l| &l.name == name)
                        .and_then(|l| match &l.kind {
                            ListenerKind::Http(settings) => Some(&settings.routes[..]),
                            _ => None,
                        })
                        .unwrap_or_default();
                    // The settings were built from these routes, one limit a route.
                    for (owner, limiter) in route_owners(name, routes)
                        .into_iter()
                        .zip(proxy.route_limits.iter())
                    {
                        if let Some(limiter) = limiter {
                            kept.insert(owner, Arc::clone(limiter));
                        }
                    }
                }
                Proxy::Udp(_) => {}
            }
        }
        *self
            .limiters
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = kept;
    }

    /// The data-path object of listener `index`, `l`, for this configuration.
    fn proxy(
        &self,
        index: usize,
        l: &ListenerConfig,
        tls: &TlsStore,
    ) -> Result<Built, ServerError> {
        let stats = self.metrics.listener(&l.name);
        Ok(match &l.kind {
            ListenerKind::Tcp(settings) => Built::Tcp(TcpProxy {
                name: l.name.clone(),
                pool: settings.pool.clone(),
                settings: settings.clone(),
                proxy_protocol: l.proxy_protocol.clone(),
                access: l.access.clone(),
                snapshot: Arc::clone(&self.snapshot),
                tls: tls.listener(&l.name),
                access_log: self.log_writer(index, l)?,
                stats: Arc::clone(&stats),
                parking: settings
                    .park_idle_after
                    .zip(self.tcp_lot.clone())
                    .map(|(after, lot)| crate::l4::tcp::TcpParking { after, lot }),
                rate_limit: self
                    .limiter(&LimitOwner::listener(&l.name), settings.rate_limit.as_ref()),
            }),
            ListenerKind::Udp(settings) => Built::Udp(UdpProxy {
                name: l.name.clone(),
                pool: settings.pool.clone(),
                settings: settings.clone(),
                access: l.access.clone(),
                snapshot: Arc::clone(&self.snapshot),
                access_log: self.log_writer(index, l)?,
                stats,
            }),
            ListenerKind::Http(settings) => {
                let route_labels: Vec<String> = settings
                    .routes
                    .iter()
                    .enumerate()
                    .map(|(i, r)| r.label(i))
                    .collect();
                Built::Http(HttpProxy {
                    name: l.name.clone(),
                    router: Router::new(&settings.routes, settings.default_pool.as_deref()),
                    trusted_proxies: settings.trusted_proxies.clone(),
                    proxy_protocol: l.proxy_protocol.clone(),
                    client_header_timeout: settings.client_header_timeout,
                    keepalive_timeout: settings.keepalive_timeout,
                    snapshot: Arc::clone(&self.snapshot),
                    upstream: Arc::clone(&self.upstream),
                    max_body_size: settings.max_body_size,
                    rules: settings.rules.clone(),
                    route_rules: settings.routes.iter().map(|r| r.rules.clone()).collect(),
                    access: l.access.clone(),
                    route_access: settings.routes.iter().map(|r| r.access.clone()).collect(),
                    h2_upstream: Arc::clone(&self.h2_upstream),
                    forwarded_header: settings.forwarded_header,
                    abort_on_close: settings.abort_on_close,
                    splice: settings.splice,
                    shutdown: self.shutdown.clone(),
                    tls: tls.listener(&l.name),
                    retired: CancellationToken::new(),
                    successor: arc_swap::ArcSwapOption::empty(),
                    route_stats: route_labels
                        .iter()
                        .map(String::as_str)
                        .chain(["default", "unrouted"])
                        .map(|label| stats.route(label))
                        .collect(),
                    route_labels,
                    stats,
                    parking: settings
                        .park_idle_after
                        .zip(self.lot.clone())
                        .map(|(after, lot)| crate::http::Parking { after, lot }),
                    access_log: self.log_writer(index, l)?,
                    rate_limit: self
                        .limiter(&LimitOwner::listener(&l.name), settings.rate_limit.as_ref()),
                    route_limits: route_owners(&l.name, &settings.routes)
                        .iter()
                        .zip(&settings.routes)
                        .map(|(owner, r)| self.limiter(owner, r.rate_limit.as_ref()))
                        .collect(),
                })
            }
        })
    }

    /// The access log of listener `l`, if it has one, with its writer (started on first use).
    fn log_writer(
        &self,
        index: usize,
        l: &ListenerConfig,
    ) -> Result<
        Option<(
            crate::config::AccessLogConfig,
            Arc<crate::access_log::Writer>,
        )>,
        ServerError,
    > {
        let Some(log) = access_log(l) else {
            return Ok(None);
        };
        let writer = self
            .logs
            .get(&log.target)
            .map_err(|error| ServerError::AccessLog {
                at: format!("listeners[{index}].access_log.path"),
                reason: match &log.target {
                    crate::config::AccessLogTarget::File(path) => {
                        crate::access_log::open_failure(path, &error)
                    }
                    other => format!("cannot write to {other:?}: {error}"),
                },
            })?;
        Ok(Some((log.clone(), writer)))
    }
}

/// A listener's access log settings, whatever its protocol.
fn access_log(l: &ListenerConfig) -> Option<&crate::config::AccessLogConfig> {
    match &l.kind {
        ListenerKind::Http(settings) => settings.access_log.as_ref(),
        ListenerKind::Tcp(settings) => settings.access_log.as_ref(),
        ListenerKind::Udp(settings) => settings.access_log.as_ref(),
    }
}

/// A listener's data-path object, built but not yet shared.
#[expect(
    clippy::large_enum_variant,
    reason = "built once per listener per reload, and moved straight into an Arc"
)]
enum Built {
    Tcp(TcpProxy),
    Http(HttpProxy),
    Udp(UdpProxy),
}

/// The kinds match by construction: `update` is called only for a listener of the same kind.
fn unreachable_kind() {
    debug_assert!(false, "a listener changed kind in place");
}

/// Reads the configuration's certificates and keys.
fn build_tls(config: &Config) -> Result<TlsStore, ServerError> {
    let tls = TlsStore::build(config).map_err(|problems| ServerError::Tls { problems })?;
    for warning in &tls.warnings {
        warn!(key = %warning.path, "{}", warning.reason);
    }
    Ok(tls)
}

/// What a start of a configuration would refuse beyond the file's own values, or warn of.
#[derive(Debug, Default)]
pub struct Preflight {
    /// What a start or a reload would refuse, each at the key to blame.
    pub problems: Vec<crate::config::Problem>,
    /// What a start would log as a warning (a certificate near its end, `verify = false`).
    pub warnings: Vec<crate::config::Problem>,
}

/// Finds what a start of `config` would refuse beyond the file's own values, without binding
/// a listener's port or keeping a file open, so that `switchyard check` accepts exactly what
/// `run` and a reload accept: the certificate, key and CA files are read as a start reads
/// them, each access log file is opened as a start opens it, and each bind address (the
/// admin API's too) is bound with port 0 for a moment, which fails for an address that is
/// not this machine's (a warning only). A port in use is not looked for: the process `check` is run for
/// usually holds its own. Every problem is reported,
/// not only the first.
pub fn preflight(config: &Config) -> Preflight {
    let mut found = Preflight::default();
    match TlsStore::build(config) {
        Ok(store) => found.warnings = store.warnings,
        Err(problems) => found.problems = problems,
    }
    for (index, l) in config.listeners.iter().enumerate() {
        let udp = matches!(l.kind, ListenerKind::Udp(_));
        if let Err(error) = crate::listener::can_bind_address(l.bind, udp) {
            found.warnings.push(foreign_address(
                format!("listeners[{index}].bind"),
                l.bind,
                &error,
            ));
        }
        if let Some(log) = access_log(l)
            && let Err(reason) = crate::access_log::try_open(&log.target)
        {
            found.problems.push(crate::config::Problem {
                path: format!("listeners[{index}].access_log.path"),
                reason,
            });
        }
    }
    if let Some(admin) = &config.admin
        && let Err(error) = crate::listener::can_bind_address(admin.bind, false)
    {
        found
            .warnings
            .push(foreign_address("admin.bind".to_owned(), admin.bind, &error));
    }
    found
}

/// A bind address this machine cannot bind, as `check` reports it: a warning, since a file is
/// often checked on another machine than the one it is for (in a build pipeline, say), where
/// the addresses of that machine are not to be had; a start here would refuse it.
fn foreign_address(path: String, addr: SocketAddr, error: &io::Error) -> crate::config::Problem {
    crate::config::Problem {
        path,
        reason: format!(
            "warning: {} (a start on this machine would fail)",
            crate::listener::bind_failure(addr, error)
        ),
    }
}

/// Makes a socket received from an old process the socket of listener `index`, `l`.
fn adopt(
    index: usize,
    l: &ListenerConfig,
    fd: std::os::fd::OwnedFd,
    udp: bool,
) -> Result<Socket, ServerError> {
    let error = |reason| ServerError::Bind {
        at: format!("listeners[{index}].bind"),
        listener: l.name.clone(),
        addr: l.bind,
        reason,
    };
    Ok(if udp {
        let socket = std::net::UdpSocket::from(fd);
        socket.set_nonblocking(true).map_err(error)?;
        Socket::Udp(Arc::new(UdpSocket::from_std(socket).map_err(error)?))
    } else {
        let socket = std::net::TcpListener::from(fd);
        socket.set_nonblocking(true).map_err(error)?;
        // Accepted connections inherit it (see `listener::bind_tcp`), whoever bound the socket.
        socket2::SockRef::from(&socket)
            .set_tcp_nodelay(true)
            .map_err(error)?;
        Socket::Tcp(Arc::new(TcpListener::from_std(socket).map_err(error)?))
    })
}

/// Binds the socket listener `index`, `l`, needs.
fn bind_socket(index: usize, l: &ListenerConfig) -> Result<Socket, ServerError> {
    let bind_error = |reason| ServerError::Bind {
        at: format!("listeners[{index}].bind"),
        listener: l.name.clone(),
        addr: l.bind,
        reason,
    };
    Ok(match &l.kind {
        ListenerKind::Udp(_) => {
            Socket::Udp(Arc::new(listener::bind_udp(l.bind).map_err(bind_error)?))
        }
        ListenerKind::Tcp(_) | ListenerKind::Http(_) => {
            Socket::Tcp(Arc::new(listener::bind_tcp(l.bind).map_err(bind_error)?))
        }
    })
}

/// Whether `socket` can serve listener `l` (a TCP socket serves tcp and http listeners).
fn same_transport(socket: &Socket, l: &ListenerConfig) -> bool {
    matches!(
        (socket, &l.kind),
        (Socket::Udp(_), ListenerKind::Udp(_))
            | (Socket::Tcp(_), ListenerKind::Tcp(_) | ListenerKind::Http(_))
    )
}

/// Whether a running listener is of the kind `kind`.
fn same_kind(proxy: &Proxy, kind: &ListenerKind) -> bool {
    matches!(
        (proxy, kind),
        (Proxy::Tcp(_), ListenerKind::Tcp(_))
            | (Proxy::Http(_), ListenerKind::Http(_))
            | (Proxy::Udp(_), ListenerKind::Udp(_))
    )
}

/// How often the release of free heap pages is considered.
#[cfg(target_env = "gnu")]
const RELEASE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// Connections that must have ended or been parked since the last release for another to be
/// worth it: a steady load, which frees nothing for good, never pays for one.
#[cfg(target_env = "gnu")]
const RELEASE_AFTER_CONNECTIONS: u64 = 64;
/// Time between releases, as a multiple of how long the last one took: a heap so fragmented
/// that a pass takes 10 ms is walked at most every second, which bounds the cost to 1 % of a
/// core.
#[cfg(target_env = "gnu")]
const RELEASE_SPACING: u32 = 100;

/// Gives free heap memory back to the kernel after connections end or are parked, the way
/// allocators that purge on their own (jemalloc, mimalloc) do after a delay. At most twice a
/// second, only when at least [`RELEASE_AFTER_CONNECTIONS`] went since the last pass, and never
/// sooner after a pass than [`RELEASE_SPACING`] times what it took. The pass runs on a blocking
/// thread; allocations from the arena it is walking wait for it.
#[cfg(target_env = "gnu")]
async fn release_memory(shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(RELEASE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut released_at = crate::sys::connections_released();
    let mut not_before = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let released = crate::sys::connections_released();
        if released.wrapping_sub(released_at) < RELEASE_AFTER_CONNECTIONS
            || tokio::time::Instant::now() < not_before
        {
            continue;
        }
        released_at = released;
        // The spare read buffers of this thread are freed first, so that they are released
        // too (other worker threads keep theirs).
        crate::http::spare::clear();
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(crate::sys::release_free_memory).await;
        let took = started.elapsed();
        not_before = tokio::time::Instant::now() + took * RELEASE_SPACING;
        debug!(?result, ?took, "free memory released");
    }
}

/// Other C libraries keep no free memory back in the same way: nothing to do.
#[cfg(not(target_env = "gnu"))]
async fn release_memory(_shutdown: CancellationToken) {}

/// One reload of the file in [`ServerHandle::reload_file`], counted while it runs (and no
/// longer once dropped, even halfway).
struct ReloadInFlight<'a> {
    count: &'a AtomicU64,
    /// No other reload was running when this one started.
    first: bool,
}

impl<'a> ReloadInFlight<'a> {
    fn start(count: &'a AtomicU64) -> ReloadInFlight<'a> {
        let first = count.fetch_add(1, Relaxed) == 0;
        ReloadInFlight { count, first }
    }

    /// Ends it; whether it was the last one running.
    fn finish(self) -> bool {
        let last = self.count.fetch_sub(1, Relaxed) == 1;
        std::mem::forget(self);
        last
    }
}

impl Drop for ReloadInFlight<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Relaxed);
    }
}
