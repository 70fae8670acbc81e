//! The running process: binds every listener, serves them, drains on shutdown.
//!
//! [`Server::bind`] does everything that can fail at startup (binding sockets, checking that each
//! listener's protocol is served) before anything is served, so a bad start fails as a whole.
//! [`Server::run`] serves until the shutdown token is cancelled, then stops accepting and gives
//! open connections until the drain deadline to finish.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backend::Registry;
use crate::config::{Config, ListenerKind};
use crate::http::HttpProxy;
use crate::http::router::Router;
use crate::http::upstream::UpstreamPool;
use crate::l4::tcp::TcpProxy;
use crate::l4::udp::{UdpProxy, UdpStats};
use crate::listener;
use crate::pool::Snapshot;
use crate::tls::TlsStore;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener's address could not be bound.
    #[error("listener `{listener}`: cannot bind {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// A certificate, key or CA file named by the configuration cannot be used.
    #[error("{}", problems.iter().map(|p| format!("{}: {}", p.path, p.reason)).collect::<Vec<_>>().join("\n"))]
    Tls {
        /// Every problem found, with its key path.
        problems: Vec<crate::config::Problem>,
    },
}

/// A socket bound for one listener.
enum Bound {
    Tcp(TcpListener, Arc<TcpProxy>),
    Http(TcpListener, Arc<HttpProxy>),
    Udp(UdpSocket, Arc<UdpProxy>, Arc<UdpStats>),
}

/// A listener bound and ready to serve.
struct BoundListener {
    name: String,
    addr: SocketAddr,
    max_connections: usize,
    socket: Bound,
}

/// A bound, not yet running, load balancer.
pub struct Server {
    config: Config,
    registry: Arc<Registry>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    listeners: Vec<BoundListener>,
    shutdown: CancellationToken,
    udp_stats: HashMap<String, Arc<UdpStats>>,
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
        let registry = Arc::new(Registry::default());
        let tls = TlsStore::build(&config).map_err(|problems| ServerError::Tls { problems })?;
        for warning in &tls.warnings {
            warn!(key = %warning.path, "{}", warning.reason);
        }
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::new(
            &config, &registry, &tls,
        )));
        let mut listeners = Vec::new();
        let mut udp_stats = HashMap::new();
        let upstream = Arc::new(UpstreamPool::default());
        let h2_upstream = Arc::new(crate::http::h2_upstream::H2Pool::default());
        for l in &config.listeners {
            let bind_error = |source| ServerError::Bind {
                listener: l.name.clone(),
                addr: l.bind,
                source,
            };
            let socket = match &l.kind {
                ListenerKind::Tcp(settings) => {
                    let socket = listener::bind_tcp(l.bind).map_err(bind_error)?;
                    let proxy = TcpProxy {
                        name: l.name.clone(),
                        pool: settings.pool.clone(),
                        settings: settings.clone(),
                        proxy_protocol: l.proxy_protocol.clone(),
                        snapshot: Arc::clone(&snapshot),
                        tls: tls.listener(&l.name),
                    };
                    Bound::Tcp(socket, Arc::new(proxy))
                }
                ListenerKind::Udp(settings) => {
                    let socket = listener::bind_udp(l.bind).map_err(bind_error)?;
                    let proxy = UdpProxy {
                        name: l.name.clone(),
                        pool: settings.pool.clone(),
                        settings: settings.clone(),
                        snapshot: Arc::clone(&snapshot),
                    };
                    let stats = Arc::new(UdpStats::default());
                    udp_stats.insert(l.name.clone(), Arc::clone(&stats));
                    Bound::Udp(socket, Arc::new(proxy), stats)
                }
                ListenerKind::Http(settings) => {
                    let socket = listener::bind_tcp(l.bind).map_err(bind_error)?;
                    let proxy = HttpProxy {
                        name: l.name.clone(),
                        router: Router::new(&settings.routes, settings.default_pool.as_deref()),
                        trusted_proxies: settings.trusted_proxies.clone(),
                        proxy_protocol: l.proxy_protocol.clone(),
                        client_header_timeout: settings.client_header_timeout,
                        keepalive_timeout: settings.keepalive_timeout,
                        snapshot: Arc::clone(&snapshot),
                        upstream: Arc::clone(&upstream),
                        max_body_size: settings.max_body_size,
                        rules: settings.rules.clone(),
                        route_rules: settings.routes.iter().map(|r| r.rules.clone()).collect(),
                        h2_upstream: Arc::clone(&h2_upstream),
                        forwarded_header: settings.forwarded_header,
                        shutdown: shutdown.clone(),
                        tls: tls.listener(&l.name),
                    };
                    Bound::Http(socket, Arc::new(proxy))
                }
            };
            let addr = match &socket {
                Bound::Tcp(s, _) | Bound::Http(s, _) => s.local_addr(),
                Bound::Udp(s, _, _) => s.local_addr(),
            }
            .map_err(bind_error)?;
            listeners.push(BoundListener {
                name: l.name.clone(),
                addr,
                max_connections: l.max_connections,
                socket,
            });
        }
        Ok(Server {
            config,
            registry,
            snapshot,
            listeners,
            shutdown,
            udp_stats,
        })
    }

    /// The address listener `name` is bound to (with the real port when the file said 0).
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.addr)
    }

    /// Live backend state, shared with the data path.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    /// Session and drop counters of UDP listener `name`.
    pub fn udp_stats(&self, name: &str) -> Option<Arc<UdpStats>> {
        self.udp_stats.get(name).cloned()
    }

    /// Cancelling this token starts a graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until the shutdown token is cancelled, then drains: listeners close at once, open
    /// connections get until `global.drain_timeout` to finish. Returns how many were cut off.
    pub async fn run(self) -> usize {
        let tasks = TaskTracker::new();
        // Health checks and drain deadlines of this configuration; they stop with the server.
        let checks = self.shutdown.child_token();
        self.snapshot.load().activate(&checks);
        for l in self.listeners {
            info!(listener = %l.name, addr = %l.addr, "listening");
            let shutdown = self.shutdown.clone();
            match l.socket {
                Bound::Tcp(socket, proxy) => {
                    let connections = tasks.clone();
                    tokio::spawn(async move {
                        listener::accept_loop(
                            &l.name,
                            socket,
                            l.max_connections,
                            shutdown,
                            connections,
                            move |stream, peer| Arc::clone(&proxy).serve(stream, peer),
                        )
                        .await;
                    });
                }
                Bound::Http(socket, proxy) => {
                    let connections = tasks.clone();
                    tokio::spawn(async move {
                        listener::accept_loop(
                            &l.name,
                            socket,
                            l.max_connections,
                            shutdown,
                            connections,
                            move |stream, peer| Arc::clone(&proxy).serve(stream, peer),
                        )
                        .await;
                    });
                }
                Bound::Udp(socket, proxy, stats) => {
                    tasks.spawn(proxy.serve(socket, stats, shutdown));
                }
            }
        }

        self.shutdown.cancelled().await;
        tasks.close();
        let open = tasks.len();
        let deadline = self.config.global.drain_timeout;
        info!(
            open,
            ?deadline,
            "shutting down: no longer accepting, draining"
        );
        if tokio::time::timeout(deadline, tasks.wait()).await.is_ok() {
            info!("drained");
            0
        } else {
            let left = tasks.len();
            warn!(left, "drain deadline reached, closing what is left");
            left
        }
    }
}
