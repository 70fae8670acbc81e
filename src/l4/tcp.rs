//! A TCP (layer 4) connection from accept to close.
//!
//! The phases, one function each: `accept_proxy_header` (when the listener takes the PROXY
//! protocol), `connect` (pick a backend, connect, on failure the next one), `announce` (send our
//! own PROXY protocol header when the pool asks for it), then forwarding (see [`super::forward`])
//! until both sides close.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::forward::{Forwarder, Outcome, Transferred};
use crate::backend::{ActiveGuard, DRAINING};
use crate::config::{ProxyProtocolAccept, TcpSettings};
use crate::listener::Admission;
use crate::park::{Closing, Lot, Parked};
use crate::pool::{Attempts, PickInput, Pool, Snapshot};
use crate::proxy_protocol;

/// What every connection of one TCP listener shares.
#[derive(Debug)]
pub struct TcpProxy {
    /// Listener name, for logs.
    pub name: String,
    /// Pool name; looked up in the current snapshot per connection.
    pub pool: String,
    /// Listener settings.
    pub settings: TcpSettings,
    /// PROXY protocol expected from peers, if any.
    pub proxy_protocol: Option<ProxyProtocolAccept>,
    /// Clients served; others are closed before anything is read past a PROXY header.
    pub access: crate::access::AccessList,
    /// The current configuration snapshot.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Where this listener's connection log lines go, and how they are written.
    pub access_log: Option<(
        crate::config::AccessLogConfig,
        Arc<crate::access_log::Writer>,
    )>,
    /// The listener's counters.
    pub stats: Arc<crate::metrics::ListenerStats>,
    /// TLS terminated on this listener (the backends get the decrypted bytes), if any.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    /// Where idle forwarded connections are parked, unless parking is off.
    pub parking: Option<TcpParking>,
    /// New connections per client address, when the listener has `rate_limit`.
    pub rate_limit: Option<Arc<crate::ratelimit::Limiter>>,
}

/// Where and when a tcp listener parks its idle connections.
#[derive(Clone)]
pub struct TcpParking {
    /// How long no byte moves either way before the connection is parked.
    pub after: Duration,
    /// The lot, shared by every tcp listener.
    pub lot: Arc<Lot<ParkedTcp>>,
}

impl std::fmt::Debug for TcpParking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpParking")
            .field("after", &self.after)
            .field("parked", &self.lot.len())
            .finish()
    }
}

/// Why a connection ended without being forwarded.
#[derive(Debug, thiserror::Error)]
enum RefuseReason {
    #[error("PROXY protocol header from untrusted peer {0}")]
    Untrusted(SocketAddr),
    #[error("client {0} is not allowed on this listener")]
    Denied(SocketAddr),
    #[error(transparent)]
    ProxyProtocol(#[from] proxy_protocol::ProxyProtocolError),
    #[error("pool `{0}` is not in the current configuration")]
    NoPool(String),
    #[error("no backend of pool `{pool}` accepted a connection ({attempts} tried)")]
    NoBackend { pool: String, attempts: usize },
    #[error("no socket for a backend connection: {0}")]
    Exhausted(io::Error),
    #[error("sending the PROXY protocol header to {backend}: {source}")]
    Announce {
        backend: SocketAddr,
        source: io::Error,
    },
    #[error("client {0} over the listener's rate_limit")]
    RateLimited(std::net::IpAddr),
    #[error("SNI routing: {0}")]
    ClientHello(#[from] crate::tls::client_hello::HelloError),
    #[error(transparent)]
    Tls(#[from] crate::tls::AcceptError),
}

impl TcpProxy {
    /// Serves one accepted connection to its end.
    ///
    /// An idle connection keeps this future for its whole life, so its size is memory per
    /// connection. It is therefore not an `async fn`: the phases before forwarding run in one
    /// boxed future that is freed once forwarding starts, and forwarding is a plain struct
    /// ([`Forwarding`]) holding just what it needs. An async fn would also keep its arguments
    /// and its locals in separate places, and everything the earlier phases needed besides.
    ///
    /// The connection holds its `admission` to its end, parked or not.
    pub fn serve(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        admission: Admission,
    ) -> impl Future<Output = ()> + Send + 'static {
        Connection::Setup(Box::pin(self.setup(client, peer, admission)))
    }

    /// Everything before forwarding: the phases below, then the state forwarding needs.
    async fn setup(
        self: Arc<Self>,
        mut client: TcpStream,
        peer: SocketAddr,
        admission: Admission,
    ) -> Option<Forwarding> {
        // TCP_NODELAY is already on: accepted sockets inherit it from the listener.
        if let Some(tls) = self.tls.clone() {
            // Terminated TLS cannot be spliced: the whole connection runs here.
            if let Err(reason) = self.terminate(&tls, client, peer).await {
                debug!(listener = %self.name, %peer, %reason, "connection refused");
            }
            return None;
        }
        match self.prepare(&mut client, peer).await {
            Ok(Prepared {
                backend,
                guard,
                closer,
                source,
                initial,
            }) => {
                let addr = guard.state().addr;
                debug!(listener = %self.name, client = %source, %addr, "forwarding");
                let first_check = self
                    .parking
                    .as_ref()
                    .map_or(self.settings.idle_timeout, |p| {
                        p.after.min(self.settings.idle_timeout)
                    });
                let forwarder = Forwarder::new(initial, first_check);
                Some(Forwarding {
                    started: std::time::Instant::now(),
                    closing: Closer::new(closer),
                    proxy: self,
                    client,
                    backend,
                    guard,
                    source,
                    forwarder,
                    admission,
                })
            }
            Err(reason) => {
                debug!(listener = %self.name, %peer, %reason, "connection refused");
                None
            }
        }
    }

    /// Runs the phases before forwarding; returns the backend connection, its guard, the client
    /// address and the bytes to send the backend first.
    async fn prepare(
        &self,
        client: &mut TcpStream,
        peer: SocketAddr,
    ) -> Result<Prepared, RefuseReason> {
        // An IPv4 client on a dual-stack listener shows up as ::ffff:a.b.c.d; everything after
        // this point (trust checks, hashing, logs, PROXY headers) sees it as the IPv4 it is.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let (source, destination, mut initial) = self.accept_proxy_header(client, peer).await?;
        self.within_rate(source)?;
        let pool_name = if self.settings.sni_routes.is_empty() {
            &self.pool
        } else {
            let mut hello = bytes::BytesMut::from(&initial[..]);
            let read = crate::tls::client_hello::read(
                client,
                &mut hello,
                self.settings.client_hello_timeout,
            );
            let name = Box::pin(read).await?;
            initial = hello.to_vec();
            self.sni_pool(name.as_deref())
        };

        let snapshot = self.snapshot.load_full();
        let pool = snapshot
            .pool(pool_name)
            .ok_or_else(|| RefuseReason::NoPool(pool_name.to_owned()))?;
        let (mut backend, addr, guard, closer) = connect(pool, source).await?;
        let _ = backend.set_nodelay(true);
        announce(pool, client, &mut backend, addr, source, destination).await?;
        Ok(Prepared {
            backend,
            guard,
            closer,
            source,
            initial,
        })
    }

    /// SNI routing: the pool of the first route that names `sni`, else the listener's pool.
    fn sni_pool(&self, sni: Option<&str>) -> &str {
        use crate::config::HostPattern;
        let Some(name) = sni else {
            return &self.pool;
        };
        self.settings
            .sni_routes
            .iter()
            .find(|route| match &route.sni {
                HostPattern::Exact(exact) => exact == name,
                HostPattern::Suffix(suffix) => name.ends_with(suffix.as_str()),
                HostPattern::Prefix(prefix) => name.starts_with(prefix.as_str()),
            })
            .map_or(&self.pool, |route| &route.pool)
    }

    /// A connection whose TLS this listener terminates: handshake, then the usual phases, then
    /// the decrypted bytes forwarded both ways.
    async fn terminate(
        &self,
        tls: &crate::tls::ServerTls,
        mut client: TcpStream,
        peer: SocketAddr,
    ) -> Result<(), RefuseReason> {
        use crate::stream::{Stream, TunnelEnd};
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let (source, destination, initial) = self.accept_proxy_header(&mut client, peer).await?;
        self.within_rate(source)?;
        let local = client.local_addr().ok();
        let (stream, _) = crate::tls::accept(tls, client, &initial, false)
            .await
            .inspect_err(|_| {
                self.stats.tls_failures.fetch_add(1, Relaxed);
            })?;
        let mut client = Stream::Tls(Box::new(stream.into()));
        let snapshot = self.snapshot.load_full();
        let pool = snapshot
            .pool(&self.pool)
            .ok_or_else(|| RefuseReason::NoPool(self.pool.clone()))?;
        let (mut backend, addr, guard, closer) = connect(pool, source).await?;
        let _ = backend.set_nodelay(true);
        if let Some(version) = pool.send_proxy_protocol
            && let Some(destination) = destination.or(local)
        {
            let header = proxy_protocol::encode(version, source, destination);
            backend
                .write_all(&header)
                .await
                .map_err(|source| RefuseReason::Announce {
                    backend: addr,
                    source,
                })?;
        }
        let mut backend = Stream::Plain(backend);
        debug!(listener = %self.name, client = %source, %addr, "forwarding (TLS terminated)");
        let started = std::time::Instant::now();
        let (result, moved) = crate::stream::tunnel(
            &mut client,
            &mut backend,
            &[],
            self.settings.idle_timeout,
            guard.state(),
            closer.cancelled(),
        )
        .await;
        let outcome = match &result {
            Ok(TunnelEnd::Closed) => "closed",
            Ok(TunnelEnd::IdleTimeout) => "idle_timeout",
            Ok(TunnelEnd::Stopped) => "drained",
            Err(_) => "error",
        };
        debug!(
            listener = %self.name, client = %source, %addr, ?result,
            up = moved.upstream, down = moved.downstream, outcome, "closed"
        );
        if result.is_err() {
            // As for plain connections (see `Forwarding::poll`): a failure reaches both sides
            // as a reset, never as a clean end.
            for socket in [client.tcp(), backend.tcp()] {
                let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
            }
        }
        let moved = Transferred {
            upstream: moved.upstream,
            downstream: moved.downstream,
        };
        log_connection(self, source, &guard, moved, started, outcome);
        Ok(())
    }

    /// Phase 1b: the listener's `rate_limit`, counted against the client address the PROXY
    /// header named (or the peer's), once its `allow` and `deny` lists let it in. A refused
    /// connection is closed before anything more is read from it or sent on.
    fn within_rate(&self, source: SocketAddr) -> Result<(), RefuseReason> {
        let Some(limiter) = &self.rate_limit else {
            return Ok(());
        };
        match limiter.check(crate::ratelimit::Key::Ip(source.ip())) {
            crate::ratelimit::Verdict::Allow => Ok(()),
            crate::ratelimit::Verdict::Deny(_) => {
                self.stats.rate_limited.fetch_add(1, Relaxed);
                Err(RefuseReason::RateLimited(source.ip()))
            }
        }
    }

    /// Phase 1: the client address. With the PROXY protocol on, it comes from the header, which
    /// only trusted peers may send; otherwise it is the peer address.
    async fn accept_proxy_header(
        &self,
        client: &mut TcpStream,
        peer: SocketAddr,
    ) -> Result<(SocketAddr, Option<SocketAddr>, Vec<u8>), RefuseReason> {
        let Some(accept) = &self.proxy_protocol else {
            return self.admit(peer).map(|()| (peer, None, Vec::new()));
        };
        if !accept.trusted.iter().any(|net| net.contains(&peer.ip())) {
            return Err(RefuseReason::Untrusted(peer));
        }
        let received = proxy_protocol::read_header(client, accept.version, accept.timeout).await?;
        let source = received.source.unwrap_or(peer);
        self.admit(source)?;
        Ok((source, received.destination, received.leftover))
    }

    /// The listener's `allow` and `deny` lists, applied to the client address.
    fn admit(&self, client: SocketAddr) -> Result<(), RefuseReason> {
        if self.access.permits(client.ip()) {
            Ok(())
        } else {
            self.stats.denied.fetch_add(1, Relaxed);
            Err(RefuseReason::Denied(client))
        }
    }
}

/// What the phases before forwarding produce.
struct Prepared {
    /// The connection to the backend.
    backend: TcpStream,
    /// Counts the connection as active on the backend.
    guard: ActiveGuard,
    /// The backend's drain deadline.
    closer: CancellationToken,
    /// The client's address.
    source: SocketAddr,
    /// Bytes to send the backend first.
    initial: Vec<u8>,
}

/// Phase 2: picks a backend and connects, moving on to the next backend when one fails, up to the
/// pool's `connect_attempts`. The guard counts the connection as active on that backend.
async fn connect(
    pool: &Pool,
    client: SocketAddr,
) -> Result<(TcpStream, SocketAddr, ActiveGuard, CancellationToken), RefuseReason> {
    let input = PickInput {
        client: Some(client.ip()),
        hash: pool.hash_client(client.ip()),
        preferred: None,
        refresh: false,
    };
    let mut attempts = Attempts::new(pool, input);
    while let Ok(picked) = attempts.next().await {
        let state = &picked.candidate.state;
        let addr = state.addr;
        let started = tokio::time::Instant::now();
        match connect_one(addr, pool.connect_timeout).await {
            Ok(stream) => {
                picked.guard.established();
                state.observe_latency(started.elapsed());
                state.connect_time.observe(started.elapsed());
                pool.report(state, true);
                return Ok((stream, addr, picked.guard, picked.closer));
            }
            // The process is out of descriptors or memory: no fault of the backend's, which
            // must not be counted as failing (or ejected), and no other backend would fare
            // better. The client is closed, which gives its descriptor back.
            Err(error) if crate::listener::is_resource_exhaustion(&error) => {
                return Err(RefuseReason::Exhausted(error));
            }
            Err(error) => {
                state.connect_failures.fetch_add(1, Relaxed);
                pool.report(state, false);
                debug!(pool = %pool.name, backend = %addr, %error, "connect failed");
            }
        }
    }
    Err(RefuseReason::NoBackend {
        pool: pool.name.clone(),
        attempts: attempts.count(),
    })
}

async fn connect_one(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )),
    }
}

/// Phase 3: tells the backend who the client is, when the pool asks for the PROXY protocol. The
/// destination is the one the incoming header named, else the address the client connected to.
async fn announce(
    pool: &Pool,
    client: &TcpStream,
    backend: &mut TcpStream,
    addr: SocketAddr,
    source: SocketAddr,
    destination: Option<SocketAddr>,
) -> Result<(), RefuseReason> {
    let Some(version) = pool.send_proxy_protocol else {
        return Ok(());
    };
    let destination = match destination {
        Some(destination) => destination,
        None => client
            .local_addr()
            .map_err(|source| RefuseReason::Announce {
                backend: addr,
                source,
            })?,
    };
    let header = proxy_protocol::encode(version, source, destination);
    backend
        .write_all(&header)
        .await
        .map_err(|source| RefuseReason::Announce {
            backend: addr,
            source,
        })
}

/// The future of one connection: [`TcpProxy::serve`].
#[expect(
    clippy::large_enum_variant,
    reason = "forwarding is where a connection spends its life; boxing it would add an allocation"
)]
enum Connection<S> {
    /// The phases before forwarding, boxed so that their state is freed when they end.
    Setup(Pin<Box<S>>),
    /// Forwarding, until both sides close.
    Forwarding(Forwarding),
    /// Over.
    Done,
}

impl<S: Future<Output = Option<Forwarding>>> Future for Connection<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Every variant is `Unpin` (the setup future is behind a box).
        let this = self.get_mut();
        loop {
            match this {
                Connection::Setup(setup) => match ready!(setup.as_mut().poll(cx)) {
                    Some(forwarding) => *this = Connection::Forwarding(forwarding),
                    None => *this = Connection::Done,
                },
                Connection::Forwarding(forwarding) => {
                    let step = ready!(forwarding.poll(cx));
                    if let (Step::Park, Connection::Forwarding(forwarding)) =
                        (step, std::mem::replace(this, Connection::Done))
                    {
                        forwarding.park();
                    }
                    *this = Connection::Done;
                }
                Connection::Done => return Poll::Ready(()),
            }
        }
    }
}

/// What a forwarded connection holds: all an idle connection costs besides its task and the
/// sockets' registrations with the runtime.
struct Forwarding {
    proxy: Arc<TcpProxy>,
    client: TcpStream,
    backend: TcpStream,
    /// Counts the connection as active on its backend, whose address and counters it gives.
    guard: ActiveGuard,
    /// The client's address (from the PROXY header when there was one), for logs.
    source: SocketAddr,
    forwarder: Forwarder,
    /// Resolves at the backend's drain deadline. Boxed: it is as large as the rest together,
    /// and this keeps the task in a smaller allocation class.
    closing: Pin<Box<Closer>>,
    /// When forwarding started, for the access log.
    started: std::time::Instant,
    /// The connection's place under `max_connections`.
    admission: Admission,
}

pin_project_lite::pin_project! {
    /// The backend's drain-deadline token of a connection, with the wait on it.
    struct Closer {
        token: CancellationToken,
        #[pin]
        wait: WaitForCancellationFutureOwned,
    }
}

impl Closer {
    fn new(token: CancellationToken) -> Pin<Box<Closer>> {
        Box::pin(Closer {
            wait: token.clone().cancelled_owned(),
            token,
        })
    }
}

/// What [`Forwarding::poll`] asks of the connection's future.
enum Step {
    /// The connection is over.
    Done,
    /// The connection is idle: park it.
    Park,
}

/// An idle forwarded connection waiting in the [`Lot`]: both sockets, and what its access log
/// line and its backend's counters need.
pub struct ParkedTcp {
    proxy: Arc<TcpProxy>,
    client: std::net::TcpStream,
    backend: std::net::TcpStream,
    guard: ActiveGuard,
    source: SocketAddr,
    moved: Transferred,
    last_activity: tokio::time::Instant,
    closer: CancellationToken,
    started: std::time::Instant,
    admission: Admission,
}

impl Parked for ParkedTcp {
    fn fds(&self) -> [Option<std::os::fd::RawFd>; 2] {
        use std::os::fd::AsRawFd;
        [
            Some(self.client.as_raw_fd()),
            Some(self.backend.as_raw_fd()),
        ]
    }

    fn resume(self, tasks: &TaskTracker) {
        let parking_after = self.proxy.parking.as_ref().map(|p| p.after);
        let idle_timeout = self.proxy.settings.idle_timeout;
        let check_after = parking_after.map_or(idle_timeout, |after| after.min(idle_timeout));
        let (client, backend) = match (
            TcpStream::from_std(self.client),
            TcpStream::from_std(self.backend),
        ) {
            (Ok(client), Ok(backend)) => (client, backend),
            (Err(error), _) | (_, Err(error)) => {
                debug!(listener = %self.proxy.name, client = %self.source, %error, "a parked connection could not resume");
                return;
            }
        };
        let forwarding = Forwarding {
            closing: Closer::new(self.closer),
            forwarder: Forwarder::resumed(
                self.moved,
                self.last_activity,
                tokio::time::Instant::now() + check_after,
            ),
            proxy: self.proxy,
            client,
            backend,
            guard: self.guard,
            source: self.source,
            started: self.started,
            admission: self.admission,
        };
        tasks.spawn(Connection::<std::future::Ready<Option<Forwarding>>>::Forwarding(forwarding));
    }

    fn close(self, why: Closing, tasks: &TaskTracker) {
        let outcome = match why {
            // A shutdown lets forwarded connections run until the drain deadline, parked
            // ones too.
            Closing::Shutdown => return self.resume(tasks),
            Closing::Deadline => "idle_timeout",
            Closing::Cancelled => "drained",
        };
        debug!(listener = %self.proxy.name, client = %self.source, addr = %self.guard.state().addr, outcome, "parked connection closed");
        log_connection(
            &self.proxy,
            self.source,
            &self.guard,
            self.moved,
            self.started,
            outcome,
        );
    }

    fn cancelled(&self) -> bool {
        self.closer.is_cancelled()
    }

    const SWEPT: bool = true;
}

/// Writes a connection's access log line, when the listener has one.
fn log_connection(
    proxy: &TcpProxy,
    source: SocketAddr,
    guard: &ActiveGuard,
    moved: Transferred,
    started: std::time::Instant,
    outcome: &'static str,
) {
    let Some((config, writer)) = &proxy.access_log else {
        return;
    };
    // The writer thread formats the line.
    let line = Box::new(crate::access_log::ConnectionLine {
        format: config.format,
        listener: Arc::from(proxy.name.as_str()),
        protocol: "tcp",
        client: source,
        backend: guard.state().addr,
        sent: moved.upstream,
        received: moved.downstream,
        duration: started.elapsed(),
        outcome,
        at: std::time::SystemTime::now(),
    });
    writer.write_connection(line, &proxy.stats);
}

impl Forwarding {
    /// Writes the connection's access log line, when the listener has one.
    fn log(&self, sent: u64, received: u64, outcome: &'static str) {
        let moved = Transferred {
            upstream: sent,
            downstream: received,
        };
        log_connection(
            &self.proxy,
            self.source,
            &self.guard,
            moved,
            self.started,
            outcome,
        );
    }

    /// Moves the idle connection to the lot; it goes on in a new task when either side sends
    /// something. When the lot does not take it, it goes on in a new task at once.
    fn park(self) {
        let Some(parking) = self.proxy.parking.clone() else {
            return;
        };
        let moved = self.forwarder.moved();
        let last_activity = self.forwarder.last_activity();
        let deadline = last_activity + self.proxy.settings.idle_timeout;
        let (client, backend) = match (self.client.into_std(), self.backend.into_std()) {
            (Ok(client), Ok(backend)) => (client, backend),
            (Err(error), _) | (_, Err(error)) => {
                debug!(listener = %self.proxy.name, client = %self.source, %error, "could not park a connection; closing it");
                log_connection(
                    &self.proxy,
                    self.source,
                    &self.guard,
                    moved,
                    self.started,
                    "error",
                );
                return;
            }
        };
        // The token of the connection's pick: the sweep closes the parked connection when it is
        // cancelled. One cancelled already (the drain deadline passed since `poll` looked)
        // ends the connection here.
        let closer = self.closing.token.clone();
        if closer.is_cancelled() {
            log_connection(
                &self.proxy,
                self.source,
                &self.guard,
                moved,
                self.started,
                "drained",
            );
            return;
        }
        let parked = ParkedTcp {
            proxy: self.proxy,
            client,
            backend,
            guard: self.guard,
            source: self.source,
            moved,
            last_activity,
            closer,
            started: self.started,
            admission: self.admission,
        };
        if let Err(parked) = parking.lot.park(parked, deadline) {
            // Run it as if it had never been parked.
            parked.resume(&parking.lot.tasks());
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        if self.closing.as_mut().project().wait.poll(cx).is_ready() {
            debug!(
                listener = %self.proxy.name, client = %self.source, addr = %self.guard.state().addr,
                "closed at the backend's drain deadline"
            );
            let moved = self.forwarder.finish();
            self.log(moved.upstream, moved.downstream, "drained");
            return Poll::Ready(Step::Done);
        }
        let settings = &self.proxy.settings;
        let result = ready!(
            self.forwarder.poll(
                cx,
                &self.client,
                &self.backend,
                settings.splice,
                settings.idle_timeout,
                // Not parked while its backend drains (the drain deadline must find it
                // running), nor once the lot takes no more (the process is shutting down).
                self.proxy
                    .parking
                    .as_ref()
                    .filter(|p| self.guard.state().flags() & DRAINING == 0 && !p.lot.is_closed())
                    .map(|p| p.after),
                self.guard.state(),
            )
        );
        if let Ok(Outcome::Parkable) = result {
            return Poll::Ready(Step::Park);
        }
        let moved = self.forwarder.finish();
        self.log(
            moved.upstream,
            moved.downstream,
            match &result {
                Ok(Outcome::Closed) => "closed",
                Ok(Outcome::IdleTimeout) => "idle_timeout",
                Ok(Outcome::Parkable) | Err(_) => "error",
            },
        );
        let (listener, source, addr) = (&self.proxy.name, self.source, self.guard.state().addr);
        match result {
            Ok(Outcome::Closed) => debug!(
                %listener, client = %source, %addr,
                up = moved.upstream, down = moved.downstream, "closed"
            ),
            Ok(Outcome::IdleTimeout | Outcome::Parkable) => debug!(
                %listener, client = %source, %addr,
                up = moved.upstream, down = moved.downstream, "idle timeout"
            ),
            Err(error) => {
                debug!(
                    %listener, client = %source, %addr, %error,
                    up = moved.upstream, down = moved.downstream, "ended with error"
                );
                // A failure (a reset, say) is passed on as one: closing with a FIN would tell
                // the other side that the stream ended, and a protocol whose messages end at
                // the close would take a cut one for complete.
                for socket in [&self.client, &self.backend] {
                    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
                }
            }
        }
        Poll::Ready(Step::Done)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::TcpSettings;

    /// Every idle connection that is not parked carries its whole future for its whole life,
    /// so its size is memory per connection. The runtime allocates a task as its future plus 96
    /// bytes (plus 8 for the task tracker's token), rounded up to 128: up to 280 bytes the task
    /// takes 384 bytes, one byte more and it takes 512.
    #[tokio::test]
    async fn the_connection_future_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let proxy = Arc::new(TcpProxy {
            name: "l4".into(),
            pool: "p".into(),
            settings: TcpSettings {
                pool: "p".into(),
                idle_timeout: Duration::from_secs(1),
                splice: true,
                sni_routes: Vec::new(),
                client_hello_timeout: Duration::from_secs(1),
                park_idle_after: None,
                access_log: None,
                rate_limit: None,
            },
            proxy_protocol: None,
            access: Default::default(),
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot {
                pools: Default::default(),
            })),
            tls: None,
            access_log: None,
            stats: Default::default(),
            parking: None,
            rate_limit: None,
        });
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .expect("a permit");
        let admission = Admission::new(permit, Default::default());
        let future = proxy.serve(client, addr, admission);
        assert!(
            std::mem::size_of_val(&future) <= 280,
            "{}",
            std::mem::size_of_val(&future)
        );
    }
}
