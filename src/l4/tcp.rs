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
use tracing::debug;

use super::forward::{Forwarder, Outcome};
use crate::backend::ActiveGuard;
use crate::config::{ProxyProtocolAccept, TcpSettings};
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
}

/// Why a connection ended without being forwarded.
#[derive(Debug, thiserror::Error)]
enum RefuseReason {
    #[error("PROXY protocol header from untrusted peer {0}")]
    Untrusted(SocketAddr),
    #[error(transparent)]
    ProxyProtocol(#[from] proxy_protocol::ProxyProtocolError),
    #[error("pool `{0}` is not in the current configuration")]
    NoPool(String),
    #[error("no backend of pool `{pool}` accepted a connection ({attempts} tried)")]
    NoBackend { pool: String, attempts: usize },
    #[error("sending the PROXY protocol header to {backend}: {source}")]
    Announce {
        backend: SocketAddr,
        source: io::Error,
    },
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
    pub fn serve(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static {
        Connection::Setup(Box::pin(self.setup(client, peer)))
    }

    /// Everything before forwarding: the phases below, then the state forwarding needs.
    async fn setup(self: Arc<Self>, mut client: TcpStream, peer: SocketAddr) -> Option<Forwarding> {
        let _ = client.set_nodelay(true);
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
                let forwarder = Forwarder::new(initial, self.settings.idle_timeout);
                let closer = Box::pin(closer.cancelled_owned());
                Some(Forwarding {
                    started: std::time::Instant::now(),
                    closer,
                    proxy: self,
                    client,
                    backend,
                    guard,
                    source,
                    forwarder,
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
        use crate::stream::Stream;
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let (source, destination, initial) = self.accept_proxy_header(&mut client, peer).await?;
        let local = client.local_addr().ok();
        let (stream, _) = crate::tls::accept(tls, client, &initial, false).await?;
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
        let tunnel = crate::stream::tunnel(
            &mut client,
            &mut backend,
            &[],
            self.settings.idle_timeout,
            guard.state(),
        );
        let (result, moved) = tokio::select! {
            done = tunnel => done,
            () = closer.cancelled() => {
                debug!(listener = %self.name, client = %source, %addr, "closed at the backend's drain deadline");
                return Ok(());
            }
        };
        debug!(
            listener = %self.name, client = %source, %addr, ?result,
            up = moved.upstream, down = moved.downstream, "closed"
        );
        Ok(())
    }

    /// Phase 1: the client address. With the PROXY protocol on, it comes from the header, which
    /// only trusted peers may send; otherwise it is the peer address.
    async fn accept_proxy_header(
        &self,
        client: &mut TcpStream,
        peer: SocketAddr,
    ) -> Result<(SocketAddr, Option<SocketAddr>, Vec<u8>), RefuseReason> {
        let Some(accept) = &self.proxy_protocol else {
            return Ok((peer, None, Vec::new()));
        };
        if !accept.trusted.iter().any(|net| net.contains(&peer.ip())) {
            return Err(RefuseReason::Untrusted(peer));
        }
        let received = proxy_protocol::read_header(client, accept.version, accept.timeout).await?;
        Ok((
            received.source.unwrap_or(peer),
            received.destination,
            received.leftover,
        ))
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
                    ready!(forwarding.poll(cx));
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
    closer: Pin<Box<WaitForCancellationFutureOwned>>,
    /// When forwarding started, for the access log.
    started: std::time::Instant,
}

impl Forwarding {
    /// Writes the connection's access log line, when the listener has one.
    fn log(&self, sent: u64, received: u64, outcome: &str) {
        let Some((config, writer)) = &self.proxy.access_log else {
            return;
        };
        let line = crate::access_log::format_connection(
            config,
            &crate::access_log::Connection {
                listener: &self.proxy.name,
                client: self.source,
                backend: self.guard.state().addr,
                sent,
                received,
                duration: self.started.elapsed(),
                outcome,
            },
        );
        if !writer.write(line) {
            self.proxy.stats.log_dropped.fetch_add(1, Relaxed);
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.closer.as_mut().poll(cx).is_ready() {
            debug!(
                listener = %self.proxy.name, client = %self.source, addr = %self.guard.state().addr,
                "closed at the backend's drain deadline"
            );
            let moved = self.forwarder.finish();
            self.log(moved.upstream, moved.downstream, "drained");
            return Poll::Ready(());
        }
        let settings = &self.proxy.settings;
        let result = ready!(self.forwarder.poll(
            cx,
            &self.client,
            &self.backend,
            settings.splice,
            settings.idle_timeout,
            self.guard.state(),
        ));
        let moved = self.forwarder.finish();
        self.log(
            moved.upstream,
            moved.downstream,
            match &result {
                Ok(Outcome::Closed) => "closed",
                Ok(Outcome::IdleTimeout) => "idle_timeout",
                Err(_) => "error",
            },
        );
        let (listener, source, addr) = (&self.proxy.name, self.source, self.guard.state().addr);
        match result {
            Ok(Outcome::Closed) => debug!(
                %listener, client = %source, %addr,
                up = moved.upstream, down = moved.downstream, "closed"
            ),
            Ok(Outcome::IdleTimeout) => debug!(
                %listener, client = %source, %addr,
                up = moved.upstream, down = moved.downstream, "idle timeout"
            ),
            Err(error) => debug!(
                %listener, client = %source, %addr, %error,
                up = moved.upstream, down = moved.downstream, "ended with error"
            ),
        }
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::TcpSettings;

    /// Every idle connection carries its whole future for its whole life, so its size is memory
    /// per connection. The runtime allocates a task as its future plus 96 bytes (plus 24 for the
    /// permit and the task tracker's token), rounded up to 128: up to 264 bytes the task takes
    /// 384 bytes, one byte more and it takes 512.
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
                access_log: None,
            },
            proxy_protocol: None,
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot {
                pools: Default::default(),
            })),
            tls: None,
            access_log: None,
            stats: Default::default(),
        });
        let future = proxy.serve(client, addr);
        assert!(
            std::mem::size_of_val(&future) <= 264,
            "{}",
            std::mem::size_of_val(&future)
        );
    }
}
