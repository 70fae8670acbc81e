//! Layer 7: an HTTP/1.1 reverse proxy.
//!
//! One task per client connection reads requests one after the other (pipelined requests wait in
//! the read buffer until the previous response is done; a plain connection idle for a while is
//! parked without a task, see [`crate::park`]), and for each runs the phases:
//! `read_request` → `route` → `request_filter` (forwarding headers) → `select_backend` +
//! `connect` (pooled keep-alive connection, retry on failure) → `upstream_request` (head and
//! body, re-framed) → `read_response` → `downstream_response` (head and body, re-framed).
//! [`h1`] parses and writes messages, [`router`] picks the pool, [`upstream`] keeps idle
//! backend connections.

pub mod compress;
pub mod h1;
pub mod h2;
pub mod h2_upstream;
pub mod persist;
pub mod router;
pub mod upstream;

use std::borrow::Cow;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Buf, BytesMut};
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::access_log::End;
use crate::backend::DRAINING;
use crate::config::{ProxyProtocolAccept, Redirect, Rewrite, Rules};
use crate::listener::Admission;
use crate::park::{Closing, Lot, Parked};
use crate::pool::{Attempts, NoBackend, PickInput, Picked, Pool, Snapshot};
use crate::proxy_protocol;
use crate::stream::Stream;
use crate::tls::{Negotiated, ServerTls};
use h1::{ChunkedDecoder, Decoded, Framing, RequestHead, ResponseHead};
use router::{RequestView, Router};
use upstream::{UpstreamConn, UpstreamPool};

/// Read size for heads.
const READ_CHUNK: usize = 16 * 1024;
/// Read size for bodies: larger reads mean fewer system calls per byte.
const BODY_CHUNK: usize = 64 * 1024;
/// A `Content-Length` body (or a chunk) with at least this much left after what was read is
/// spliced, when the listener splices and both sides are plain TCP; below it the pages a splice
/// moves cost about what copying the bytes does.
const SPLICE_MIN: u64 = 16 * 1024;
/// Read size for a response head from a backend connection whose last body was spliced. A head
/// read takes whatever body bytes came with it, and those are copied twice (in and out); a 16
/// KiB read before a 64 KiB body meant a quarter of the body copied. A head seldom needs more
/// than one such read, and a connection whose bodies turn short goes back to full reads.
const HEAD_PROBE: usize = 4 * 1024;

/// Read buffers kept per thread between requests. An idle connection holds no buffer, so each
/// request would otherwise allocate one and free it again; the allocator then hands the pages
/// back and faults them in anew (a profile of small keep-alive requests put that at about 6%).
pub(crate) mod spare {
    use std::cell::RefCell;

    use bytes::BytesMut;

    use super::READ_CHUNK;

    /// Buffers one thread keeps (16 KiB each, so at most 4 MiB). An exchange in flight holds up
    /// to three (the client's read buffer, its output, the backend's read buffer), and a busy
    /// thread finishes many exchanges in one turn of the event loop before it starts the next
    /// ones: with room for fewer, buffers freed in a burst are allocated again in the next.
    /// Memory kept here was in use at the thread's busiest moment anyway.
    const KEPT: usize = 256;

    thread_local! {
        static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    }

    /// Makes room for a read of [`READ_CHUNK`] in `buf`, taking a spare buffer when `buf` has
    /// none.
    #[inline]
    pub fn reserve(buf: &mut BytesMut) {
        if buf.capacity() == 0
            && let Some(spare) = SPARE.with(|s| s.borrow_mut().pop())
        {
            *buf = spare;
        }
        buf.reserve(READ_CHUNK);
    }

    /// A buffer with room for a read of [`READ_CHUNK`], spare if there is one: for output that
    /// is built and sent within one exchange, then handed back with [`give`].
    #[inline]
    pub fn take() -> BytesMut {
        let mut buf = SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default();
        buf.reserve(READ_CHUNK);
        buf
    }

    /// Frees the buffers this thread keeps, before free memory is handed back to the kernel
    /// (which could not take what sits here): after a burst of connections, the spares would
    /// otherwise hold the burst's buffers for good.
    pub fn clear() {
        SPARE.with(|s| drop(std::mem::take(&mut *s.borrow_mut())));
    }

    /// Keeps an emptied buffer for the next request on this thread, if it is one of ours and
    /// nothing else still refers to its memory.
    ///
    /// The capacity is judged after reclaiming: a read buffer that heads were split off the
    /// front of reports only what is left after them, though the whole allocation is free
    /// again once those heads are gone.
    #[inline]
    pub fn give(mut buf: BytesMut) {
        if !buf.is_empty() || !buf.try_reclaim(READ_CHUNK) || buf.capacity() > 4 * READ_CHUNK {
            return;
        }
        SPARE.with(|s| {
            let mut spare = s.borrow_mut();
            if spare.len() < KEPT {
                spare.push(buf);
            }
        });
    }
}

/// What every connection of one http listener shares.
#[derive(Debug)]
pub struct HttpProxy {
    /// Listener name, for logs.
    pub name: String,
    /// Compiled routes.
    pub router: Router,
    /// Peers whose X-Forwarded-For is extended rather than replaced.
    pub trusted_proxies: Vec<IpNet>,
    /// PROXY protocol expected from peers, if any.
    pub proxy_protocol: Option<ProxyProtocolAccept>,
    /// Time a client has to send a whole head once it started.
    pub client_header_timeout: Duration,
    /// How long an idle keep-alive client connection is kept.
    pub keepalive_timeout: Duration,
    /// The current configuration snapshot.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Idle backend connections, shared by every http listener.
    pub upstream: Arc<UpstreamPool>,
    /// Largest request body accepted (413 beyond it); `None`: no limit.
    pub max_body_size: Option<u64>,
    /// The listener's modification rules, for every request.
    pub rules: Rules,
    /// Each route's own rules, by route index.
    pub route_rules: Vec<Rules>,
    /// Clients served; others get 403 (checked before redirects, so a refused client learns
    /// nothing of the site).
    pub access: crate::access::AccessList,
    /// Each route's own client list, by route index, checked after the listener's.
    pub route_access: Vec<crate::access::AccessList>,
    /// Multiplexed connections to HTTP/2 backends, shared by every http listener.
    pub h2_upstream: Arc<h2_upstream::H2Pool>,
    /// Add an RFC 7239 `Forwarded` field to requests.
    pub forwarded_header: bool,
    /// Give up a request whose HTTP/1.1 client left while its response was awaited.
    pub abort_on_close: bool,
    /// Long `Content-Length` bodies between plain TCP sockets move with splice(2).
    pub splice: bool,
    /// Cancelled when the process starts draining: keep-alive connections then close after
    /// their current request, idle ones at once.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// TLS terminated on this listener, if any.
    pub tls: Option<Arc<ServerTls>>,
    /// Cancelled when a reload removes this listener (one token shared by every generation of
    /// its settings, so connections still on older ones see it too): HTTP/1.1 connections
    /// answer their next request with `Connection: close` (never closing an idle connection
    /// under a client's feet), and HTTP/2 connections get a GOAWAY once, as at shutdown.
    pub retired: tokio_util::sync::CancellationToken,
    /// The settings that replaced these in a reload that kept the listener: connections that
    /// started with these follow it for their next request.
    pub successor: arc_swap::ArcSwapOption<HttpProxy>,
    /// The listener's counters.
    pub stats: Arc<crate::metrics::ListenerStats>,
    /// Counters per route: the routes in file order, then the default pool, then requests no
    /// route took (404s, the listener's own redirects).
    pub route_stats: Vec<Arc<crate::metrics::RouteStats>>,
    /// What metrics and access logs call each route: its name, or its position.
    pub route_labels: Vec<String>,
    /// Idle connections are parked after a while, unless parking is off.
    pub parking: Option<Parking>,
    /// Where this listener's access log lines go, and how they are written.
    pub access_log: Option<(
        crate::config::AccessLogConfig,
        Arc<crate::access_log::Writer>,
    )>,
    /// The listener's `rate_limit`, checked for every request before routing.
    pub rate_limit: Option<Arc<crate::ratelimit::Limiter>>,
    /// Each route's own `rate_limit`, by route index, checked once the route is known.
    pub route_limits: Vec<Option<Arc<crate::ratelimit::Limiter>>>,
}

/// The request fields an access log line shows.
pub(crate) struct Finished<'a> {
    pub request_id: &'a [u8],
    pub client: SocketAddr,
    pub method: &'a str,
    pub host: &'a [u8],
    pub target: &'a str,
    pub protocol: &'a str,
    pub referer: &'a [u8],
    pub user_agent: &'a [u8],
}

/// What is learned about one request on its way, for metrics and the access log.
#[derive(Debug, Default)]
pub(crate) struct Trace {
    /// Which route took it: a position in the file; `routes.len()` for the default pool;
    /// `None` when no route did.
    pub route: Option<usize>,
    /// The pool it went to.
    pub pool: Option<String>,
    /// The backend that answered.
    pub backend: Option<SocketAddr>,
    /// The status sent to the client (0 while none was).
    pub status: u16,
    /// Bytes sent to the client.
    pub bytes: u64,
    /// Time from sending the request upstream to the response head.
    pub upstream: Option<Duration>,
    /// Backends tried.
    pub attempts: usize,
    /// How the exchange ended, when the client did not get the whole response.
    pub end: crate::access_log::End,
}

/// Fields that carry a verified client certificate to backends. They are removed from every
/// incoming request, on every listener, so a client can never forge them.
pub const CLIENT_CERT_FIELDS: [&str; 2] = ["x-client-cert-subject", "x-client-cert-san"];

/// The fields the proxy writes on every request it forwards (when it writes them at all), in
/// place of any a client sent under those names or spelt with `_` for `-`: a backend must be
/// able to trust what they say of the client.
pub const FORWARDING_FIELDS: [&str; 8] = [
    "x-forwarded-for",
    "x-real-ip",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "forwarded",
    CLIENT_CERT_FIELDS[0],
    CLIENT_CERT_FIELDS[1],
];

/// Response fields to drop, fields to add, and Set-Cookie attributes to add.
type ResponseEdits<'a> = (Vec<&'a str>, Vec<(&'a str, &'a [u8])>, Vec<&'a str>);

/// Idle time after which an upgraded (WebSocket) connection is closed.
const UPGRADE_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// How long a connection idle between requests, or that has sent nothing yet, may stay once the
/// process starts draining. Browsers open connections ahead of need and may never use them: held
/// to the drain deadline, such a connection would keep the process (an old one, during a binary
/// upgrade) for all of it. Closed at once, though, a connection would lose the request its
/// client may already have on the way (a client in the middle of a burst sends its next request
/// as soon as it has its response, and a close crossing it leaves the client nothing to tell
/// whether it was acted on). A client that connected just before the drain, or is between
/// requests (parked or not), gets this long for its next request, which is then answered with
/// `Connection: close`; a round trip or two is all it needs.
const REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Whether an incoming X-Request-ID can be passed on as it is: 1 to 200 visible ASCII bytes.
fn valid_request_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= 200 && id.iter().all(|b| b.is_ascii_graphic())
}

/// A fresh request id: 128 random bits as 32 hex digits, written into `buf`.
fn new_request_id(buf: &mut [u8; 32]) -> &[u8] {
    let bits = fastrand::u128(..);
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = b"0123456789abcdef"[((bits >> (4 * i)) & 0xf) as usize];
    }
    &buf[..]
}

/// The client side of one connection.
struct Client {
    stream: Stream,
    /// Bytes read and not yet consumed (the start of the next request, when pipelining).
    buf: BytesMut,
    /// The client address: the peer, or the one a trusted PROXY header named.
    source: SocketAddr,
    /// Whether whoever wrote the requests is a trusted proxy (its X-Forwarded-For is kept): the
    /// peer, or the client a PROXY header named, since a balancer that sends such a header
    /// passes the client's bytes on untouched.
    peer_trusted: bool,
    /// The address the client connected to, when a PROXY header named it (a balancer's);
    /// otherwise it is this socket's own, and PROXY headers sent on say so.
    destination: Option<SocketAddr>,
    /// What the TLS handshake established; `None` on plain connections.
    tls: Option<Negotiated>,
    /// Requests answered on this connection so far.
    served: u32,
    /// The lot would not take this connection: it is not offered again.
    unparkable: bool,
    /// An interim response (103 Early Hints, say) of the request in hand reached the client:
    /// its answer may no longer come from another backend than the one that sent it.
    interim_sent: bool,
}

/// What waiting for the next request head found.
enum Read {
    /// A request head.
    Head(RequestHead),
    /// The client closed, stayed idle past the keep-alive timeout, or the process is stopping.
    Closed,
    /// The connection stayed idle long enough to be parked.
    Idle,
}

/// An idle client connection waiting in the [`Lot`] for its next request.
pub struct ParkedClient {
    /// The socket, out of the runtime's poller.
    stream: std::net::TcpStream,
    /// The listener's settings the connection last used.
    proxy: Arc<HttpProxy>,
    source: SocketAddr,
    peer_trusted: bool,
    /// As [`Client`]'s; boxed, as it is rare, to keep parked connections small.
    destination: Option<Box<SocketAddr>>,
    served: u32,
    /// The connection's place under `max_connections`, kept while parked.
    admission: Admission,
}

impl Parked for ParkedClient {
    fn fds(&self) -> [Option<std::os::fd::RawFd>; 2] {
        use std::os::fd::AsRawFd;
        [Some(self.stream.as_raw_fd()), None]
    }

    fn resume(self, tasks: &TaskTracker) {
        tasks.spawn(HttpProxy::resume(self));
    }

    /// Closes it, unless its client's next request has arrived before the lot noticed (the
    /// keep-alive deadline passed at that moment): that request was sent on an open connection
    /// and is served, as it would have been a moment earlier. At shutdown it is resumed, to
    /// wait `REQUEST_GRACE` for a request that may be on its way, as connections idle in their
    /// own task do.
    fn close(self, why: Closing, tasks: &TaskTracker) {
        if matches!(why, Closing::Shutdown) || bytes_waiting(&self.stream) {
            self.resume(tasks);
        }
    }
}

/// Whether bytes from the peer wait in the socket's receive buffer, asked of the kernel (a peek,
/// so they stay there): the runtime's view of readiness, or the lot's, may lag behind it.
fn bytes_waiting(socket: &impl std::os::fd::AsFd) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    matches!(
        socket2::SockRef::from(socket).recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT),
        Ok(n) if n > 0
    )
}

/// Where and when an http listener parks its idle connections.
#[derive(Clone)]
pub struct Parking {
    /// How long a connection stays idle, served by its own task, before it is parked.
    pub after: Duration,
    /// The lot, shared by every http listener.
    pub lot: Arc<Lot<ParkedClient>>,
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parking")
            .field("after", &self.after)
            .field("parked", &self.lot.len())
            .finish()
    }
}

/// The status recorded for a request whose client went away before its response head (NGINX's
/// "client closed request").
pub(crate) const CLIENT_CLOSED: u16 = 499;

/// How an exchange ended, for the connection loop.
enum Next {
    /// Read the next request on this connection.
    KeepAlive,
    /// Close the connection.
    Close,
    /// Close the connection once its client has closed too, or [`crate::stream::linger`]'s
    /// bounds are reached: an answer went out (its write side is shut) while the request's
    /// bytes may not all have been read.
    Linger,
}

/// A request head that could not be read: the status it is answered with, and when it began to
/// arrive (for the access log's duration).
struct BadHead {
    status: u16,
    began: Instant,
}

/// What kind of answer of its own the proxy gives (see [`HttpProxy::local_answer`]).
#[derive(Debug, Clone, Copy)]
enum Local<'a> {
    /// An error, with a `Retry-After` of this many seconds when given.
    Error(Option<u64>),
    /// A redirect to this location.
    Redirect(&'a [u8]),
}

/// Failures that end an exchange with a status of our own, if nothing was sent yet.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// The proxy answers with this status, then closes if `close`.
    Status(u16),
    /// The client is over a `rate_limit`: a 429 with a `Retry-After` of this many seconds.
    Limited(u64),
    /// The client went away or broke the protocol mid-body: close without a response.
    Abort,
    /// A response whose body ends at the close was cut off (its backend failed): the
    /// connection is reset rather than closed, or the client would take it for complete.
    Cut,
}

impl Failure {
    /// What a response body that failed after its head ends as: a close-delimited one must
    /// not end with a plain close.
    fn cut_off(framing: Framing) -> Failure {
        if framing == Framing::UntilClose {
            Failure::Cut
        } else {
            Failure::Abort
        }
    }
}

impl HttpProxy {
    /// Counts a finished request in the metrics and writes its access log line.
    pub(crate) fn record(&self, request: &Finished<'_>, trace: &Trace, elapsed: Duration) {
        if trace.status == 0 {
            return;
        }
        let routes = self.route_stats.len().saturating_sub(2);
        let index = trace.route.map_or(routes + 1, |r| r.min(routes));
        if let Some(stats) = self.route_stats.get(index) {
            if trace.status == 101 {
                // A WebSocket's whole life is not a request's latency: counted, not timed.
                stats.count(trace.status);
            } else {
                stats.observe(trace.status, elapsed);
            }
        }
        if trace.attempts > 1 {
            self.stats.retries.fetch_add(1, Relaxed);
        }
        if let Some(count) = (trace.end.code() as usize)
            .checked_sub(1)
            .and_then(|i| self.stats.incomplete.get(i))
        {
            count.fetch_add(1, Relaxed);
        }
        let Some((config, writer)) = &self.access_log else {
            return;
        };
        let route = match trace.route {
            None => "unrouted",
            Some(r) => self.route_labels.get(r).map_or("default", String::as_str),
        };
        let line = crate::access_log::format(
            config,
            &crate::access_log::Entry {
                listener: &self.name,
                request_id: request.request_id,
                client: Some(request.client),
                method: request.method,
                host: request.host,
                target: request.target,
                protocol: request.protocol,
                route,
                pool: trace.pool.as_deref(),
                backend: trace.backend,
                status: trace.status,
                bytes: trace.bytes,
                duration: elapsed,
                upstream: trace.upstream,
                attempts: trace.attempts,
                referer: request.referer,
                user_agent: request.user_agent,
                end: trace.end,
            },
        );
        writer.write(line, &self.stats);
    }

    /// Counts a request of `client` against `limiter` (the listener's or a route's, if it has
    /// one; `header` reads the request's fields for a limit keyed on one). `Some(seconds)`:
    /// refused, to be answered 429 with that `Retry-After`.
    pub(crate) fn over_limit<'h>(
        &self,
        limiter: Option<&crate::ratelimit::Limiter>,
        client: IpAddr,
        header: impl FnOnce(&str) -> Option<&'h [u8]>,
    ) -> Option<u64> {
        use crate::ratelimit::{Key, Verdict};
        let limiter = limiter?;
        let config = limiter.config();
        let value = match &config.key {
            crate::config::RateKey::Header(name) => header(name),
            crate::config::RateKey::ClientIp => None,
        };
        match limiter.check(Key::of(config, client, value)) {
            Verdict::Allow => None,
            Verdict::Deny(wait) => {
                self.stats.rate_limited.fetch_add(1, Relaxed);
                debug!(listener = %self.name, %client, "over rate_limit");
                Some(Verdict::retry_after_secs(wait))
            }
        }
    }

    /// The settings in force for this listener now: these, or their latest successor.
    pub fn current(self: &Arc<Self>) -> Arc<Self> {
        let mut proxy = Arc::clone(self);
        // Bounded: a chain longer than this only delays following to the next request.
        for _ in 0..64 {
            match proxy.successor.load_full() {
                Some(next) => proxy = next,
                None => break,
            }
        }
        proxy
    }

    /// Whether responses should tell clients to close: the process is draining, or a reload
    /// removed this listener.
    fn closing(&self) -> bool {
        self.shutdown.is_cancelled() || self.retired.is_cancelled()
    }

    /// Serves one accepted connection to its end (or until it is parked), holding its `admission`, the
    /// connection's place under the listener's `max_connections`, all along.
    pub async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, admission: Admission) {
        // Boxed: the state of the handshakes is freed before the connection settles into its
        // keep-alive loop, which is what an idle connection's task then holds.
        let Some((client, h2)) = Box::pin(self.accept(stream, peer)).await else {
            return;
        };
        if h2 {
            let Client {
                stream,
                buf,
                source,
                peer_trusted,
                destination,
                tls,
                ..
            } = client;
            let Some(destination) = destination.or_else(|| stream.tcp().local_addr().ok()) else {
                return;
            };
            let serve = h2::serve(self, stream, buf, source, destination, peer_trusted, tls);
            Box::pin(serve).await;
            return;
        }
        self.keep_alive(client, admission).await;
    }

    /// The connection's setup: PROXY header, TLS handshake, and whether it speaks HTTP/2.
    /// `None` when the client is refused or leaves first.
    async fn accept(&self, stream: TcpStream, peer: SocketAddr) -> Option<(Client, bool)> {
        // TCP_NODELAY is already on: accepted sockets inherit it from the listener.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let mut peer_trusted = self.trusted_proxies.iter().any(|n| n.contains(&peer.ip()));
        let mut stream = stream;
        let mut source = peer;
        let mut destination = None;
        let mut buf = BytesMut::new();
        if let Some(accept) = &self.proxy_protocol {
            if !accept.trusted.iter().any(|n| n.contains(&peer.ip())) {
                debug!(listener = %self.name, %peer, "PROXY header from untrusted peer refused");
                return None;
            }
            let read = proxy_protocol::read_header(&mut stream, accept.version, accept.timeout);
            match read.await {
                Ok(received) => {
                    source = received.source.unwrap_or(peer);
                    destination = received.destination;
                    // The requests come from the client the header names, whose own
                    // X-Forwarded-For is only a claim unless it is a trusted proxy too.
                    peer_trusted = self
                        .trusted_proxies
                        .iter()
                        .any(|n| n.contains(&source.ip()));
                    buf.extend_from_slice(&received.leftover);
                }
                Err(error) => {
                    debug!(listener = %self.name, %peer, %error, "PROXY header refused");
                    return None;
                }
            }
        }
        let mut client = match &self.tls {
            None => Client {
                stream: Stream::Plain(stream),
                buf,
                source,
                peer_trusted,
                destination,
                tls: None,
                served: 0,
                unparkable: false,
                interim_sent: false,
            },
            Some(tls) => match crate::tls::accept(tls, stream, &buf, true).await {
                Ok((stream, negotiated)) => Client {
                    stream: Stream::Tls(Box::new(stream.into())),
                    buf: BytesMut::new(),
                    source,
                    peer_trusted,
                    destination,
                    tls: Some(negotiated),
                    served: 0,
                    unparkable: false,
                    interim_sent: false,
                },
                Err(error) => {
                    debug!(listener = %self.name, client = %source, %error, "TLS refused");
                    self.stats.tls_failures.fetch_add(1, Relaxed);
                    return None;
                }
            },
        };
        let h2 = match &client.tls {
            // Over TLS the protocol is chosen by ALPN.
            Some(negotiated) => negotiated.h2,
            None => {
                if !self.h2c_preface(&mut client).await {
                    return None;
                }
                client.buf.starts_with(h2::PREFACE)
            }
        };
        Some((client, h2))
    }

    /// Continues a parked connection whose client sent something (or hung up).
    async fn resume(parked: ParkedClient) {
        let ParkedClient {
            stream,
            proxy,
            source,
            peer_trusted,
            destination,
            served,
            admission,
        } = parked;
        let Ok(stream) = TcpStream::from_std(stream) else {
            return;
        };
        let client = Client {
            stream: Stream::Plain(stream),
            buf: BytesMut::new(),
            source,
            peer_trusted,
            destination: destination.map(|d| *d),
            tls: None,
            served,
            unparkable: false,
            interim_sent: false,
        };
        proxy.keep_alive(client, admission).await;
    }

    /// Reads and answers requests one after the other until the connection closes, or parks it
    /// when it stays idle long enough.
    async fn keep_alive(self: Arc<Self>, mut client: Client, mut admission: Admission) {
        let mut proxy = self;
        loop {
            let head = match proxy.read_request(&mut client).await {
                Ok(Read::Head(head)) => head,
                Ok(Read::Closed) => return,
                Ok(Read::Idle) => match Arc::clone(&proxy).park(client, admission) {
                    // Parked, or closed.
                    None => return,
                    Some(refused) => {
                        (client, admission) = refused;
                        continue;
                    }
                },
                Err(bad) => {
                    // No request could be read, so no id either: the answer has a fresh one.
                    let mut generated = [0u8; 32];
                    let request_id = new_request_id(&mut generated);
                    let answer = proxy.local_answer(
                        bad.status,
                        Local::Error(None),
                        request_id,
                        None,
                        h1::Persistence::Close,
                    );
                    let _ =
                        write_within(&mut client.stream, &answer, proxy.keepalive_timeout).await;
                    // Bytes of the request may follow what could be read (a 400 for a head
                    // broken early, a 408 for one slow to come).
                    close_write(&mut client.stream).await;
                    // Counted and logged as NGINX and HAProxy do such requests: with what of
                    // the request line could be read, so that probes and smuggling attempts
                    // leave a trace.
                    let line = h1::RequestLine::lenient(&client.buf);
                    let trace = Trace {
                        status: bad.status,
                        bytes: answer.len() as u64,
                        ..Trace::default()
                    };
                    let finished = Finished {
                        request_id,
                        client: client.source,
                        method: line.method,
                        host: b"",
                        target: line.target,
                        protocol: line.protocol,
                        referer: b"",
                        user_agent: b"",
                    };
                    proxy.record(&finished, &trace, bad.began.elapsed());
                    return crate::stream::linger(client.stream.tcp()).await;
                }
            };
            // A reload that kept this listener takes effect from the next request on.
            if proxy.successor.load().is_some() {
                proxy = proxy.current();
            }
            // Boxed: an idle connection waiting for its next request then carries only the
            // wait, not the state of a whole exchange.
            let next = Box::pin(proxy.exchange(&mut client, head)).await;
            client.served = client.served.saturating_add(1);
            match next {
                Next::KeepAlive => {}
                Next::Close => return,
                Next::Linger => return crate::stream::linger(client.stream.tcp()).await,
            }
        }
    }

    /// Hands an idle plain connection to the lot, which keeps it until the rest of its
    /// keep-alive timeout has passed. Returns the connection when it should go on in its task
    /// instead; `None` when it was parked or is to be closed.
    fn park(self: Arc<Self>, client: Client, admission: Admission) -> Option<(Client, Admission)> {
        let Some(parking) = self.parking.clone() else {
            return Some((client, admission));
        };
        let Stream::Plain(stream) = client.stream else {
            return None;
        };
        let Ok(stream) = stream.into_std() else {
            return None;
        };
        let deadline = Instant::now() + self.keepalive_timeout.saturating_sub(parking.after);
        let refused = parking
            .lot
            .park(
                ParkedClient {
                    stream,
                    proxy: Arc::clone(&self),
                    source: client.source,
                    peer_trusted: client.peer_trusted,
                    destination: client.destination.map(Box::new),
                    served: client.served,
                    admission,
                },
                deadline,
            )
            .err()?;
        // Not taken (the lot is closed for the drain, or could not watch the socket): it goes
        // on waiting in its task, never to be parked again. While shutting down, that wait is
        // `REQUEST_GRACE` for a request that may be on its way, as for every idle connection.
        let stream = TcpStream::from_std(refused.stream).ok()?;
        let client = Client {
            stream: Stream::Plain(stream),
            buf: BytesMut::new(),
            source: refused.source,
            peer_trusted: refused.peer_trusted,
            destination: refused.destination.map(|d| *d),
            tls: None,
            served: refused.served,
            unparkable: true,
            interim_sent: false,
        };
        Some((client, refused.admission))
    }

    /// Reads until the first bytes either are the HTTP/2 preface (h2c with prior knowledge) or
    /// cannot be; `false` when the client left or stayed silent.
    async fn h2c_preface(&self, client: &mut Client) -> bool {
        loop {
            let n = client.buf.len().min(h2::PREFACE.len());
            if client.buf[..n] != h2::PREFACE[..n] || n == h2::PREFACE.len() {
                return true;
            }
            let wait = if client.buf.is_empty() {
                self.keepalive_timeout
            } else {
                self.client_header_timeout
            };
            spare::reserve(&mut client.buf);
            // A shutdown leaves a connection that has sent nothing yet `REQUEST_GRACE`
            // for its first request (it may have been accepted just before: during a binary
            // upgrade, just before the hand-over), which is then answered with `Connection:
            // close`.
            let read = tokio::select! {
                read = timeout(wait, client.stream.read_buf(&mut client.buf)) => read,
                () = self.shutdown.cancelled(), if client.buf.is_empty() => {
                    timeout(REQUEST_GRACE, client.stream.read_buf(&mut client.buf)).await
                }
            };
            if !matches!(read, Ok(Ok(n)) if n > 0) {
                return false;
            }
        }
    }

    /// Phase 1: the next request head, or what happened instead; `Err(status)` for a head that
    /// gets an error.
    async fn read_request(&self, client: &mut Client) -> Result<Read, BadHead> {
        let mut deadline: Option<Instant> = None;
        // When the head began to arrive: its deadline less the time it was given.
        let began = |deadline: Option<Instant>| {
            deadline.map_or_else(Instant::now, |d| d - self.client_header_timeout)
        };
        loop {
            if !client.buf.is_empty() {
                match h1::parse_request(&mut client.buf) {
                    Ok(Some(head)) => return Ok(Read::Head(head)),
                    Ok(None) => {}
                    Err(error) => {
                        debug!(listener = %self.name, client = %client.source, %error, "bad request");
                        return Err(BadHead {
                            status: error.status(),
                            began: began(deadline),
                        });
                    }
                }
            }
            let wait = match deadline {
                None if client.buf.is_empty() => {
                    // Idle between requests: hold no buffer while waiting.
                    spare::give(std::mem::take(&mut client.buf));
                    // A shutdown closes idle keep-alive connections after `REQUEST_GRACE`
                    // rather than at the drain deadline: a request already on its way is
                    // answered (with `Connection: close`), not lost with the connection.
                    // A plain connection that has been served is parked once it stays idle
                    // for `park_after`; the lot then keeps it for the rest of the keep-alive
                    // timeout.
                    let park = self.parking.as_ref().filter(|parking| {
                        client.served > 0
                            && client.tls.is_none()
                            && !client.unparkable
                            && parking.after < self.keepalive_timeout
                    });
                    let wait = park.map_or(self.keepalive_timeout, |parking| parking.after);
                    tokio::select! {
                        ready = timeout(wait, client.stream.readable()) => match ready {
                            Ok(Ok(())) => {}
                            Err(_) if park.is_some() => return Ok(Read::Idle),
                            _ => return Ok(Read::Closed),
                        },
                        _ = self.shutdown.cancelled() => {
                            // The first request (over TLS, the one after the handshake), or the
                            // next one of a client between requests.
                            match timeout(REQUEST_GRACE, client.stream.readable()).await {
                                Ok(Ok(())) => {}
                                _ => return Ok(Read::Closed),
                            }
                        }
                    }
                    deadline = Some(Instant::now() + self.client_header_timeout);
                    self.client_header_timeout
                }
                None => {
                    let d = Instant::now() + self.client_header_timeout;
                    deadline = Some(d);
                    self.client_header_timeout
                }
                Some(d) => d.saturating_duration_since(Instant::now()),
            };
            spare::reserve(&mut client.buf);
            match read_within(&mut client.stream, &mut client.buf, || {
                Instant::now() + wait
            })
            .await
            {
                Some(Ok(0)) => return Ok(Read::Closed),
                Some(Ok(_)) => {}
                Some(Err(_)) => return Ok(Read::Closed),
                None => {
                    debug!(listener = %self.name, client = %client.source, "request head timeout");
                    return Err(BadHead {
                        status: 408,
                        began: began(deadline),
                    });
                }
            }
        }
    }

    /// One request and its response.
    async fn exchange(&self, client: &mut Client, head: RequestHead) -> Next {
        let has_body = head.framing != Framing::Empty;
        let started = Instant::now();
        let mut trace = Trace::default();
        // The request id first, so that every answer, the proxy's own included, and the
        // access log line carry it.
        let mut generated = [0u8; 32];
        let request_id = match head.header("x-request-id") {
            Some(id) if valid_request_id(id) => id,
            _ => new_request_id(&mut generated),
        };
        // Whether a connection that ends here may end with a FIN (not after a failure).
        let mut graceful = true;
        let next = match self.forward(client, &head, request_id, &mut trace).await {
            Ok(next) => next,
            Err(Failure::Abort) => {
                graceful = false;
                // Gone (or its body broken) before any response head: still a request, counted
                // and logged as NGINX does a client that closed its request, and as an HTTP/2
                // stream reset at the same point is.
                if trace.status == 0 {
                    trace.status = CLIENT_CLOSED;
                    trace.end = End::ClientGone;
                } else if trace.end == End::Complete && trace.status != 101 {
                    // Mid-response, where no more was said: the client's write failed. (An
                    // upgraded connection that failed says nothing of which side did.)
                    trace.end = End::ClientGone;
                }
                Next::Close
            }
            Err(Failure::Cut) => {
                if trace.end == End::Complete {
                    trace.end = End::BackendCut;
                }
                // A reset says the exchange failed where a FIN would end the body. (Over TLS the
                // missing close_notify says it.)
                if let Stream::Plain(stream) = &client.stream {
                    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
                }
                graceful = false;
                Next::Close
            }
            Err(failure @ (Failure::Status(_) | Failure::Limited(_))) => {
                let (status, retry_after) = match failure {
                    Failure::Limited(seconds) => (429, Some(seconds)),
                    Failure::Status(status) => (status, None),
                    Failure::Abort | Failure::Cut => (500, None),
                };
                // A body we may not have read leaves the stream unreadable: close after
                // answering.
                let close = head.close || has_body || self.closing();
                // A route's rules apply to what is answered once it was chosen.
                let route_rules = trace.route.and_then(|i| self.route_rules.get(i));
                let response = self.local_answer(
                    status,
                    Local::Error(retry_after),
                    request_id,
                    route_rules,
                    h1::Persistence::of(close, head.minor_version),
                );
                trace.status = status;
                trace.bytes = response.len() as u64;
                let _ = write_pair_within(
                    &mut client.stream,
                    &response,
                    &[],
                    self.keepalive_timeout,
                    close,
                )
                .await;
                if close { Next::Close } else { Next::KeepAlive }
            }
        };
        let next = if graceful && matches!(next, Next::Close) {
            // The FIN goes out now, with the tail the last write held back for it (see
            // `write_pair_within`); the close waits for what the client may still send.
            close_write(&mut client.stream).await;
            if has_body || !client.buf.is_empty() || bytes_waiting(client.stream.tcp()) {
                Next::Linger
            } else {
                Next::Close
            }
        } else {
            next
        };
        let finished = Finished {
            request_id,
            client: client.source,
            method: head.method(),
            host: head.host().unwrap_or_default(),
            target: head.target(),
            protocol: if head.minor_version == 0 {
                "HTTP/1.0"
            } else {
                "HTTP/1.1"
            },
            referer: head.header("referer").unwrap_or_default(),
            user_agent: head.header("user-agent").unwrap_or_default(),
        };
        self.record(&finished, &trace, started.elapsed());
        if matches!(next, Next::Close | Next::Linger) {
            // The connection ends: its read buffer goes back to the thread's spares for the
            // next connection (a connection per request would otherwise allocate one, and
            // split a head off it, every time). The head refers into it, so it goes first.
            drop(head);
            spare::give(std::mem::take(&mut client.buf));
        }
        next
    }

    async fn forward(
        &self,
        client: &mut Client,
        head: &RequestHead,
        request_id: &[u8],
        trace: &mut Trace,
    ) -> Result<Next, Failure> {
        if !self.access.permits(client.source.ip()) {
            self.stats.denied.fetch_add(1, Relaxed);
            return Err(Failure::Status(403));
        }
        // A refused client's requests count against no limit: the limits come after the lists.
        if let Some(seconds) =
            self.over_limit(self.rate_limit.as_deref(), client.source.ip(), |name| {
                head.header(name)
            })
        {
            return Err(Failure::Limited(seconds));
        }
        // A listener-wide redirect (plain HTTP to HTTPS, say) answers before any routing.
        if let Some(redirect) = &self.rules.redirect {
            return Box::pin(self.redirect(client, head, redirect, request_id, None, trace)).await;
        }
        // Phase 2: route.
        let Some(routed) = self.router.route(head) else {
            return Err(Failure::Status(404));
        };
        trace.route = Some(
            routed
                .route
                .unwrap_or(self.route_stats.len().saturating_sub(2)),
        );
        if !self.route_permits(routed.route, client.source.ip()) {
            return Err(Failure::Status(403));
        }
        let route_limit = routed
            .route
            .and_then(|i| self.route_limits.get(i))
            .and_then(Option::as_deref);
        if let Some(seconds) =
            self.over_limit(route_limit, client.source.ip(), |name| head.header(name))
        {
            return Err(Failure::Limited(seconds));
        }
        let route_rules = routed
            .route
            .and_then(|i| self.route_rules.get(i))
            .filter(|rules| !rules.is_empty());
        if let Some(rules) = route_rules
            && let Some(redirect) = &rules.redirect
        {
            return Box::pin(self.redirect(client, head, redirect, request_id, Some(rules), trace))
                .await;
        }
        let snapshot = self.snapshot.load_full();
        let pool = routed
            .pool
            .and_then(|name| snapshot.pool(name))
            .ok_or(Failure::Status(503))?;
        // A declared length over the limit is refused before any backend is contacted, at the
        // point HTTP/2 streams are: the route is known, so its rules apply to the 413.
        if let (Framing::Length(n), Some(max)) = (head.framing, self.max_body_size)
            && n > max
        {
            return Err(Failure::Status(413));
        }

        // Phase 3: request filter — request id, forwarding headers, rules, our own 100 Continue.
        if self.access_log.is_some() {
            trace.pool = Some(pool.name.clone());
        }
        // Our own 100 Continue, for HTTP/1.1 clients only (an HTTP/1.0 client would take it for
        // the final response); the expectation itself is not forwarded.
        if head.expect_continue && head.framing != Framing::Empty && head.minor_version == 1 {
            write_within(
                &mut client.stream,
                b"HTTP/1.1 100 Continue\r\n\r\n",
                self.keepalive_timeout,
            )
            .await
            .map_err(|_| Failure::Abort)?;
        }
        let input = persist::pick_input(pool, head, client.source.ip());
        if pool.upstream_protocol == crate::config::UpstreamProtocol::H2 {
            // Boxed, as the redirects above and the upgrade below: the state of the rare paths
            // would otherwise make every exchange's future as large as the largest of them,
            // and that future is moved and copied on every request.
            return Box::pin(self.forward_to_h2(
                client,
                head,
                pool,
                input,
                request_id,
                route_rules,
                trace,
            ))
            .await;
        }
        // A spare buffer: it holds the upstream head, then the response head and body pieces,
        // and goes back for the next exchange on this thread when the response is done.
        let mut out = spare::take();
        self.request_filter(client, head, request_id, route_rules, &mut out)?;

        // Phases 4-6: backend, request, response head; retried within bounds.
        let (mut conn, picked, response) = self
            .upstream_exchange(client, head, pool, input, &out, trace)
            .await?;
        trace.status = response.status;
        let guard = picked.guard;
        let set_cookie = persist::sticky_cookie(pool, &input, picked.index);
        // A draining backend's deadline ends what is still running on it.
        let closer = picked.closer;
        let id_field = [("x-request-id", request_id)];

        if response.status == 101 {
            // The backend took the WebSocket upgrade: from here on, bytes both ways, whose end
            // says nothing of the backend's health.
            pool.report_body(guard.state(), 101, false);
            out.clear();
            response.write_downstream(
                &mut out,
                Framing::Empty,
                h1::Persistence::Implied,
                &["x-request-id"],
                &[
                    ("connection", &b"upgrade"[..]),
                    ("upgrade", b"websocket"),
                    ("x-request-id", request_id),
                ]
                .into_iter()
                .chain(set_cookie.as_deref().map(|c| ("set-cookie", c.as_bytes())))
                .collect::<Vec<_>>(),
                &[],
            );
            out.extend_from_slice(&conn.buf);
            write_within(&mut client.stream, &out, self.keepalive_timeout)
                .await
                .map_err(|_| Failure::Abort)?;
            let initial = client.buf.split().to_vec();
            let tunnel = Box::pin(async {
                if let (Stream::Plain(client_tcp), Stream::Plain(backend_tcp)) =
                    (&client.stream, &conn.stream)
                {
                    let (result, moved) = crate::l4::forward::forward(
                        client_tcp,
                        backend_tcp,
                        initial,
                        false,
                        UPGRADE_IDLE_TIMEOUT,
                        guard.state(),
                    )
                    .await;
                    (result.map(|_| ()), moved.upstream, moved.downstream)
                } else {
                    let (result, moved) = crate::stream::tunnel(
                        &mut client.stream,
                        &mut conn.stream,
                        &initial,
                        UPGRADE_IDLE_TIMEOUT,
                        guard.state(),
                        // The drain deadline is awaited below, for both kinds of tunnel.
                        std::future::pending(),
                    )
                    .await;
                    (result.map(|_| ()), moved.upstream, moved.downstream)
                }
            });
            let (result, up, down) = tokio::select! {
                done = tunnel => done,
                () = closer.cancelled() => {
                    debug!(listener = %self.name, client = %client.source, "upgraded connection closed at the backend's drain deadline");
                    trace.end = End::Drained;
                    return Ok(Next::Close);
                }
            };
            debug!(
                listener = %self.name, client = %client.source, ?result,
                up, down, "upgraded connection ended"
            );
            if result.is_err() {
                // As on a tcp listener, a failure reaches both sides as a reset: a FIN would
                // pass for an orderly end of the stream.
                for stream in [&client.stream, &conn.stream] {
                    let _ = socket2::SockRef::from(stream.tcp()).set_linger(Some(Duration::ZERO));
                }
                return Err(Failure::Abort);
            }
            return Ok(Next::Close);
        }

        // Phase 7: the response to the client, compressed when configured and accepted.
        let compression = route_rules
            .and_then(|r| r.compression.as_ref())
            .or(self.rules.compression.as_ref());
        let coding = compression.map_or(Coding::Identity, |c| {
            choose_encoding(
                c,
                head.header_list("accept-encoding").as_deref(),
                head.header("range").is_some(),
                &response,
                head.is_head(),
            )
        });
        let (coding, mut encoder) = coding.start();
        let body_framing = if encoder.is_some() {
            Framing::UntilClose
        } else {
            response.framing
        };
        let client_framing = match (body_framing, head.minor_version) {
            (Framing::Chunked | Framing::UntilClose, 1) => Framing::Chunked,
            (Framing::Chunked | Framing::UntilClose, _) => Framing::UntilClose,
            (framing, _) => framing,
        };
        // While shutting down, every response tells the client to go elsewhere next time.
        // So does a draining backend's response: a client that keeps its connection may be
        // tied to the backend (by a sticky cookie, or by a proxy of its own in between).
        let close = head.close
            || head.ambiguous
            || response.request_cut
            || client_framing == Framing::UntilClose
            || self.closing()
            || guard.state().flags() & DRAINING != 0;
        let persistence = h1::Persistence::of(close, head.minor_version);
        out.clear();
        if compression.is_some() {
            let (mut drop, mut extra, flags) = self.response_edits(route_rules, request_id);
            if let Some(cookie) = &set_cookie {
                extra.push(("set-cookie", cookie.as_bytes()));
            }
            let weak_etag;
            // What is compressed (or, to HEAD, would be) names its encoding and has neither
            // the original's length nor its byte ranges, which do not address the compressed
            // bytes.
            let token = coding.token();
            if let Some(token) = token {
                extra.push(("content-encoding", token.as_bytes()));
                drop.push("accept-ranges");
                drop.push("content-length");
            }
            // The compressed bytes are a different representation: a strong validator for the
            // original must not describe them, nor the 304 that confirms them. The validator
            // weakened is the one that goes out: a rule's, when a rule set one (as on HTTP/2,
            // where the fields are marked after the rules), none when a rule removed it.
            if token.is_some() || coding == Coding::NotModified {
                if let Some(field) = extra
                    .iter_mut()
                    .find(|(name, _)| name.eq_ignore_ascii_case("etag"))
                {
                    if !field.1.starts_with(b"W/") {
                        weak_etag = [b"W/", field.1].concat();
                        field.1 = &weak_etag;
                    }
                } else if !drop.iter().any(|d| d.eq_ignore_ascii_case("etag"))
                    && let Some(etag) = response.header("etag")
                    && !etag.starts_with(b"W/")
                {
                    weak_etag = [b"W/", etag].concat();
                    drop.push("etag");
                    extra.push(("etag", &weak_etag));
                }
            }
            let varies = response.header_list("vary").is_some_and(|v| {
                String::from_utf8_lossy(&v)
                    .to_ascii_lowercase()
                    .contains("accept-encoding")
            });
            if !varies {
                extra.push(("vary", b"Accept-Encoding"));
            }
            response.write_downstream(&mut out, client_framing, persistence, &drop, &extra, &flags);
        } else if self.rules.response_headers.is_empty()
            && self.rules.cookie_flags.is_empty()
            && route_rules.is_none()
            && set_cookie.is_none()
        {
            response.write_downstream(
                &mut out,
                client_framing,
                persistence,
                &["x-request-id"],
                &id_field,
                &[],
            );
        } else {
            let (drop, mut extra, flags) = self.response_edits(route_rules, request_id);
            if let Some(cookie) = &set_cookie {
                extra.push(("set-cookie", cookie.as_bytes()));
            }
            response.write_downstream(&mut out, client_framing, persistence, &drop, &extra, &flags);
        }
        conn.long_bodies = self.splice
            && encoder.is_none()
            && matches!(response.framing, Framing::Length(n) if n >= SPLICE_MIN + HEAD_PROBE as u64)
            && matches!(
                (&client.stream, &conn.stream),
                (Stream::Plain(_), Stream::Plain(_))
            );
        let mut written = 0;
        let done = {
            // Pinned here, as the exchange is in `try_backends`: the select then moves a pointer,
            // not the transfer's state.
            let transfer = std::pin::pin!(transfer_body(
                &mut conn.stream,
                &mut conn.buf,
                &mut client.stream,
                &mut out,
                Body {
                    input: response.framing,
                    output: client_framing,
                    idle: pool.response_timeout,
                    limit: None,
                    splice: self.splice.then_some(&self.stats.spliced),
                    then_close: close,
                },
                &mut encoder,
                &mut written,
            ));
            tokio::select! {
                // The transfer first: once it is done, the drain token is not looked at again
                // (each look takes its lock), and no random order is drawn.
                biased;
                done = transfer => done,
                () = closer.cancelled() => Err(BodyError::Stopped),
            }
        };
        // A body its backend failed after the client left is the client's end, and not held
        // against the backend.
        let end = match &done {
            Ok(_) => End::Complete,
            Err(e) if e.source_failed() && client_left(&client.stream) => End::ClientGone,
            Err(e) => e.end(),
        };
        pool.report_body(guard.state(), response.status, end.is_backends());
        drop(guard);
        match done {
            Ok(written) => {
                trace.bytes = written;
                out.clear();
                spare::give(out);
                if !response.close && !head.ambiguous && pool.send_proxy_protocol.is_none() {
                    // The response head refers into the connection's read buffer: gone first,
                    // that buffer can be kept for the next exchange rather than freed.
                    drop(response);
                    self.upstream.checkin(conn, pool.keepalive);
                }
                Ok(if close { Next::Close } else { Next::KeepAlive })
            }
            Err(error) => {
                debug!(listener = %self.name, client = %client.source, %error, "response body failed");
                trace.bytes = written;
                trace.end = end;
                Err(Failure::cut_off(client_framing))
            }
        }
    }

    /// Writes the upstream request head into `out`: the client's fields minus hop-by-hop ones,
    /// plus X-Forwarded-For, X-Real-IP, X-Forwarded-Proto and X-Request-ID, then the listener's
    /// and the route's rules (headers, path rewrite, Host). X-Forwarded-For is extended only
    /// when the peer is a trusted proxy; otherwise whatever the client claimed is replaced.
    /// Whether route `route` (`None`: the default pool) serves a client at `ip`; counts a
    /// refusal.
    pub(crate) fn route_permits(&self, route: Option<usize>, ip: std::net::IpAddr) -> bool {
        let permits = route
            .and_then(|i| self.route_access.get(i))
            .is_none_or(|access| access.permits(ip));
        if !permits {
            self.stats.denied.fetch_add(1, Relaxed);
        }
        permits
    }

    fn request_filter(
        &self,
        client: &Client,
        head: &RequestHead,
        request_id: &[u8],
        route_rules: Option<&Rules>,
        out: &mut BytesMut,
    ) -> Result<(), Failure> {
        let ip = client.source.ip();
        let mut ip_text = [0u8; 64];
        let ip_text = format_ip(ip, &mut ip_text);
        // Only a trusted peer's list is extended; otherwise the field is just the address, and
        // nothing is allocated.
        let extended;
        let existing = if client.peer_trusted {
            head.header_list("x-forwarded-for")
        } else {
            None
        };
        let forwarded_for: &[u8] = match existing {
            Some(existing) => {
                extended = [&existing, &b", "[..], ip_text].concat();
                &extended
            }
            None => ip_text,
        };
        let host = head.host().unwrap_or(b"");
        let forwarded = if self.forwarded_header {
            let existing = head.header_list("forwarded");
            forwarded_field(
                existing.as_deref().filter(|_| client.peer_trusted),
                ip,
                client.tls.is_some(),
                host,
            )
        } else {
            Vec::new()
        };
        let proto: &[u8] = if client.tls.is_some() {
            b"https"
        } else {
            b"http"
        };
        let mut fields: [(&str, &[u8]); 10] = [
            ("x-forwarded-for", forwarded_for),
            ("x-real-ip", ip_text),
            ("x-forwarded-proto", proto),
            ("x-forwarded-host", host),
            ("x-request-id", request_id),
            ("", b""),
            ("", b""),
            ("", b""),
            ("", b""),
            ("", b""),
        ];
        let mut count = 5;
        if let Some(cert) = client.tls.as_ref().and_then(|t| t.client_cert.as_deref()) {
            fields[count] = (CLIENT_CERT_FIELDS[0], cert.subject.as_bytes());
            count += 1;
            if !cert.san.is_empty() {
                fields[count] = (CLIENT_CERT_FIELDS[1], cert.san.as_bytes());
                count += 1;
            }
        }
        if head.websocket {
            // A WebSocket upgrade is the one hop-by-hop exchange that is passed on.
            fields[count] = ("connection", b"upgrade");
            fields[count + 1] = ("upgrade", b"websocket");
            count += 2;
        }
        if self.forwarded_header {
            fields[count] = ("forwarded", &forwarded);
            count += 1;
        }
        let fields = &fields[..count];
        const FORWARDING: [&str; 8] = FORWARDING_FIELDS;
        let listener_rules = Some(&self.rules).filter(|r| !r.is_empty());
        if listener_rules.is_none() && route_rules.is_none() {
            head.write_upstream(out, None, None, &FORWARDING, fields);
            return Ok(());
        }
        let all = [listener_rules, route_rules];
        let mut drop: Vec<&str> = FORWARDING.to_vec();
        let mut extra: Vec<(&str, &[u8])> = fields.to_vec();
        let mut host: Option<&[u8]> = None;
        let mut target: Option<String> = None;
        for rules in all.into_iter().flatten() {
            let edits = &rules.request_headers;
            drop.extend(edits.remove.iter().map(String::as_str));
            drop.extend(edits.set.iter().map(|(name, _)| name.as_str()));
            extra.retain(|(name, _)| {
                !edits.remove.iter().any(|r| r.eq_ignore_ascii_case(name))
                    && !edits.set.iter().any(|(s, _)| s.eq_ignore_ascii_case(name))
            });
            extra.extend(edits.set.iter().map(|(n, v)| (n.as_str(), v.as_bytes())));
            extra.extend(edits.add.iter().map(|(n, v)| (n.as_str(), v.as_bytes())));
            if let Some(rewrite) = &rules.rewrite {
                let current = target.as_deref().unwrap_or(head.target());
                target = Some(rewrite_target(rewrite, current));
            }
            if let Some(rewritten) = &rules.host_rewrite {
                host = Some(rewritten.as_bytes());
            }
        }
        if let Some(target) = &target
            && let Err(status) = check_rewritten(target)
        {
            debug!(listener = %self.name, %target, "rewrite produced a target that may not be sent");
            return Err(Failure::Status(status));
        }
        head.write_upstream(out, host, target.as_deref(), &drop, &extra);
        Ok(())
    }

    /// Sends an HTTP/1.1 request to a pool of HTTP/2 backends: the head becomes HTTP/2 fields,
    /// the body (decoded from its HTTP/1.1 framing) flows through a bounded channel while the
    /// response is awaited, and the response comes back as HTTP/1.1 (chunked, with trailers, when
    /// its length is not known). Modification rules and compression apply as on HTTP/1.1.
    #[allow(clippy::too_many_arguments)]
    async fn forward_to_h2(
        &self,
        client: &mut Client,
        head: &RequestHead,
        pool: &Pool,
        input: PickInput,
        request_id: &[u8],
        route_rules: Option<&Rules>,
        trace: &mut Trace,
    ) -> Result<Next, Failure> {
        use http::{HeaderName, HeaderValue};
        let rules: Vec<&Rules> = [Some(&self.rules).filter(|r| !r.is_empty()), route_rules]
            .into_iter()
            .flatten()
            .collect();
        let mut headers = http::HeaderMap::new();
        for (name, value) in head.fields() {
            let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            else {
                return Err(Failure::Status(400));
            };
            if !h2::is_connection_specific(&name) {
                headers.append(name, value);
            }
        }
        // TE is hop-by-hop, but its `trailers` is what an HTTP/2 backend may be told of it.
        if head.te_trailers {
            headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        }
        let ip = client.source.ip().to_string();
        let forwarded_for = match head.header_list("x-forwarded-for") {
            Some(existing) if client.peer_trusted => {
                format!("{}, {ip}", String::from_utf8_lossy(&existing))
            }
            _ => ip.clone(),
        };
        let length = match head.framing {
            Framing::Length(n) => n.to_string(),
            _ => String::new(),
        };
        let mut fields: Vec<(&str, &[u8])> = vec![
            ("x-forwarded-for", forwarded_for.as_bytes()),
            ("x-real-ip", ip.as_bytes()),
            (
                "x-forwarded-proto",
                if client.tls.is_some() {
                    b"https"
                } else {
                    b"http"
                },
            ),
            ("x-forwarded-host", head.host().unwrap_or(b"")),
            ("x-request-id", request_id),
        ];
        if let Some(cert) = client.tls.as_ref().and_then(|t| t.client_cert.as_deref()) {
            fields.push((CLIENT_CERT_FIELDS[0], cert.subject.as_bytes()));
            if !cert.san.is_empty() {
                fields.push((CLIENT_CERT_FIELDS[1], cert.san.as_bytes()));
            }
        }
        let forwarded;
        if self.forwarded_header {
            let existing = head.header_list("forwarded");
            forwarded = forwarded_field(
                existing.as_deref().filter(|_| client.peer_trusted),
                client.source.ip(),
                client.tls.is_some(),
                head.host().unwrap_or(b""),
            );
            fields.push(("forwarded", &forwarded));
        }
        if !length.is_empty() {
            fields.push(("content-length", length.as_bytes()));
        }
        for (name, value) in fields {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
        let mut authority = head
            .host()
            .and_then(|h| std::str::from_utf8(h).ok())
            .unwrap_or("backend")
            .to_owned();
        let mut target = head.target().to_owned();
        for rules in &rules {
            h2::edit_headers(&mut headers, &rules.request_headers);
            if let Some(rewrite) = &rules.rewrite {
                target = rewrite_target(rewrite, &target);
            }
            if let Some(host) = &rules.host_rewrite {
                authority = host.clone();
            }
        }
        check_rewritten(&target).map_err(Failure::Status)?;
        let uri: http::Uri = format!("http://{authority}{target}")
            .parse()
            .map_err(|_| Failure::Status(400))?;
        let method =
            http::Method::from_bytes(head.method().as_bytes()).map_err(|_| Failure::Status(400))?;

        // Answers and timeouts are retried only for a request that can be sent again as it
        // was, as on HTTP/1.1 backends: idempotent and without a body. gRPC calls are POSTs, so
        // they never are.
        let retry = pool
            .config()
            .retry
            .as_ref()
            .filter(|_| head.framing == Framing::Empty && head.is_idempotent());
        let mut attempts = Attempts::for_request(pool, input);
        let mut passed: Option<H2Answer> = None;
        let outcome: Result<H2Answer, Failure> = async {
            let passed = &mut passed;
            loop {
                let (lease, picked) = h2::h2_sender(&self.h2_upstream, pool, &mut attempts, trace)
                    .await
                    .map_err(Failure::Status)?;
                let guard = picked.guard;
                let closer = picked.closer;
                let state = Arc::clone(guard.state());
                let set_cookie = persist::sticky_cookie(pool, &input, picked.index);
                let addr = state.addr;
                trace.backend = Some(addr);
                trace.attempts = attempts.count();
                let started = Instant::now();
                // Kept to the end of the exchange unless the body is sent whole: dropped, it resets
                // the backend's stream, which must not cut an answer still coming on it.
                let (mut body_tx, body) = if head.framing == Framing::Empty {
                    (None, h2_upstream::UpstreamBody::Empty)
                } else {
                    let (tx, body) = h2_upstream::body_channel();
                    (Some(tx), body)
                };
                let mut request = http::Request::new(body);
                *request.method_mut() = method.clone();
                *request.uri_mut() = uri.clone();
                *request.version_mut() = http::Version::HTTP_2;
                *request.headers_mut() = headers.clone();
                // Set when the backend stopped taking the body before its end (it answered early,
                // and reset its stream or stopped reading): the rest of the body is not read, so
                // the connection closes after the answer, as on the HTTP/1.1 path.
                let mut request_cut = false;
                let (response, early) = {
                    let send = self.h2_upstream.send(&lease, addr, pool, request);
                    tokio::pin!(send);
                    let response_parts = |sent: Result<http::Response<_>, _>| match sent {
                        // The h2 crate takes any three digits; RFC 9110 section 15 makes a
                        // status over 599 invalid, as `h1::parse_response` holds it to be.
                        Ok(response) if response.status().as_u16() > 599 => {
                            debug!(backend = %addr, status = response.status().as_u16(), "http/2 backend answered an invalid status");
                            pool.report(&state, false);
                            Err(Failure::Status(502))
                        }
                        Ok(response) => Ok(http::Response::into_parts(response)),
                        Err(error) => {
                            debug!(backend = %addr, %error, "http/2 backend request failed");
                            self.h2_upstream.failed(addr, pool, &lease, &error);
                            pool.report(&state, false);
                            Err(Failure::Status(502))
                        }
                    };
                    // The body streams while the response is awaited. The pump borrows the client,
                    // so it lives in a scope of its own: once the body is sent, the client's socket
                    // is free to be watched while the rest of the response is awaited.
                    let answered_early = {
                        let pump = pump_request_body(
                            client,
                            head.framing,
                            &mut body_tx,
                            self.max_body_size,
                            pool.response_timeout,
                        );
                        tokio::pin!(pump);
                        let sent = tokio::select! {
                            sent = &mut send => Some(sent),
                            result = &mut pump => {
                                match result {
                                    Ok(()) => {}
                                    Err(BodyError::TooLarge) => return Err(Failure::Status(413)),
                                    // A backend that takes none of the body for the response
                                    // timeout.
                                    Err(BodyError::Write(error)) if error.kind() == io::ErrorKind::TimedOut => {
                                        debug!(backend = %addr, "the backend stopped taking the request body");
                                        pool.report(&state, false);
                                        return Err(Failure::Status(504));
                                    }
                                    // The backend's stream ended: its answer may be on its way (an
                                    // early one, before a reset with NO_ERROR), or its failure.
                                    Err(BodyError::Write(_)) => request_cut = true,
                                    Err(_) => return Err(Failure::Abort),
                                }
                                None
                            }
                            () = closer.cancelled() => {
                                debug!(backend = %addr, "no response before the backend's drain deadline");
                                return Err(Failure::Status(504));
                            }
                        };
                        match sent {
                            None => None,
                            Some(sent) => {
                                let (parts, body) = response_parts(sent)?;
                                let mut early = h2_upstream::Prefetched::new(body);
                                // An early answer, before the whole body was sent (RFC 9113 section
                                // 8.1): the body goes on while the backend takes it, and the
                                // answer's first frames are taken meanwhile. Once the backend stops
                                // taking the body (its stream reset, or no room for the response
                                // timeout), or once the answer is complete (the backend will not
                                // want the rest), the answer goes to the client, which must not
                                // wait for it on an upload it does not need.
                                let mut pumped = false;
                                while !pumped {
                                    tokio::select! {
                                        biased;
                                        result = &mut pump => {
                                            match result {
                                                Ok(()) => {}
                                                Err(BodyError::TooLarge) => return Err(Failure::Status(413)),
                                                Err(BodyError::Write(_)) => request_cut = true,
                                                Err(_) => return Err(Failure::Abort),
                                            }
                                            pumped = true;
                                        }
                                        () = early.prefetch(), if early.wants_more() => {
                                            if early.ended() {
                                                request_cut = true;
                                                pumped = true;
                                            }
                                        }
                                        () = closer.cancelled() => {
                                            debug!(backend = %addr, "no response before the backend's drain deadline");
                                            return Err(Failure::Status(504));
                                        }
                                    }
                                }
                                Some((parts, early))
                            }
                        }
                    };
                    let (parts, early) = match answered_early {
                        Some(answered) => answered,
                        None => {
                            // The whole body is sent: the response timeout starts now, as on the
                            // HTTP/1.1 path (an upload may take longer than it). A client that
                            // leaves meanwhile gives the request up, as there (`abort_on_close`);
                            // not while pipelined requests wait in its buffer.
                            let watched =
                                (self.abort_on_close && client.buf.is_empty()).then(|| client.stream.tcp());
                            let gone = async {
                                match watched {
                                    Some(tcp) => client_gone(tcp).await,
                                    None => std::future::pending().await,
                                }
                            };
                            let sent = tokio::select! {
                                sent = &mut send => sent,
                                // Only this stream is given up on (dropped, hyper resets it with
                                // CANCEL); a connection that died unnoticed is found out by its
                                // pings.
                                () = tokio::time::sleep(pool.response_timeout) => {
                                    pool.report(&state, false);
                                    if retry.is_some_and(|r| r.timeout) {
                                        debug!(backend = %addr, "response timeout, retried on another backend");
                                        continue;
                                    }
                                    return Err(Failure::Status(504));
                                }
                                () = closer.cancelled() => {
                                    debug!(backend = %addr, "no response before the backend's drain deadline");
                                    return Err(Failure::Status(504));
                                }
                                () = gone => {
                                    debug!(backend = %addr, "client gone while its response was awaited");
                                    return Err(Failure::Abort);
                                }
                            };
                            let (parts, body) = response_parts(sent)?;
                            (parts, h2_upstream::Prefetched::new(body))
                        }
                    };
                    if request_cut {
                        debug!(backend = %addr, status = parts.status.as_u16(), "the backend answered before taking the whole request body");
                    }
                    (http::Response::from_parts(parts, ()), early)
                };
                guard.established();
                let elapsed = started.elapsed();
                let status = response.status().as_u16();
                state.observe_latency(elapsed);
                state.response_time.observe(elapsed);
                state.count_response(status);
                trace.upstream = Some(elapsed);
                // Counted against the backend that gave it, retried or not: a 5xx now,
                // anything else once its body is through.
                pool.report_head(&state, status);
                let answer = H2Answer {
                    response,
                    early,
                    guard,
                    closer,
                    state,
                    set_cookie,
                    request_cut,
                    body_tx,
                    upstream: elapsed,
                };
                if retry.is_some_and(|r| r.retries_status(status)) {
                    debug!(backend = %addr, status, "answer retried on another backend");
                    // Its body is not relayed unless no later backend answers: its head is
                    // all there is to judge it by.
                    pool.report_body(&answer.state, status, false);
                    // The one passed over before is dropped: its stream is cancelled.
                    *passed = Some(answer);
                    attempts.hold_answer();
                    continue;
                }
                return Ok(answer);
            }
        }
        .await;
        let H2Answer {
            response,
            early,
            guard,
            closer,
            state,
            set_cookie,
            request_cut,
            body_tx: _body_tx,
            upstream,
        } = match (outcome, passed) {
            (Ok(answer), _) => answer,
            // The backends after it failed without an answer, or none could be had: a
            // backend's own answer tells the client more than a status of the proxy's.
            (Err(Failure::Status(_)), Some(answer)) => {
                trace.backend = Some(answer.state.addr);
                answer
            }
            (Err(failure), _) => return Err(failure),
        };
        let addr = state.addr;
        trace.upstream = Some(upstream);
        trace.status = response.status().as_u16();

        let (mut parts, ()) = response.into_parts();
        let mut body = early;
        let mut known_length = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let bodiless = head.is_head() || parts.status == 204 || parts.status == 304;
        // Compression is decided on the backend's fields, as on HTTP/1.1, before any rule
        // edits them.
        let compression = route_rules
            .and_then(|r| r.compression.as_ref())
            .or(self.rules.compression.as_ref());
        let coding = compression.map_or(Coding::Identity, |config| {
            encoding_for(
                config,
                head.header_list("accept-encoding").as_deref(),
                head.header("range").is_some(),
                Shape {
                    status: parts.status.as_u16(),
                    head: head.is_head(),
                    bodiless: bodiless || hyper::body::Body::is_end_stream(&body),
                    length: known_length,
                },
                |name| {
                    h1::join_lines(
                        parts
                            .headers
                            .get_all(name)
                            .iter()
                            .map(HeaderValue::as_bytes),
                    )
                },
            )
        });
        let (coding, mut encoder) = coding.start();
        // The sticky cookie first, so that cookie flags reach it as they reach the backend's.
        if let Some(cookie) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
            parts.headers.append(http::header::SET_COOKIE, cookie);
        }
        h2::apply_response_rules(&mut parts.headers, &rules);
        mark_compressed(&mut parts.headers, coding, compression.is_some());
        if coding.token().is_some() {
            known_length = None;
        }
        let framing = match (bodiless, known_length, head.minor_version) {
            (true, _, _) => Framing::Empty,
            (false, Some(n), _) => Framing::Length(n),
            (false, None, 1) => Framing::Chunked,
            (false, None, _) => Framing::UntilClose,
        };
        let close = head.close
            || head.ambiguous
            || request_cut
            || framing == Framing::UntilClose
            || self.closing()
            || state.flags() & DRAINING != 0;
        let mut out = BytesMut::with_capacity(1024);
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(parts.status.as_str().as_bytes());
        out.extend_from_slice(b" ");
        out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            if h2::is_connection_specific(name) {
                continue;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(request_id);
        out.extend_from_slice(b"\r\n");
        match framing {
            Framing::Length(n) => {
                out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
            }
            Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            // A response to HEAD, or a 304, gives the length the body would have had (RFC 9110
            // sections 8.6 and 15.4.5); a 204 never has one.
            Framing::Empty => {
                if let Some(n) = known_length
                    && parts.status != http::StatusCode::NO_CONTENT
                {
                    out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
                }
            }
            Framing::UntilClose => {}
        }
        out.extend_from_slice(h1::Persistence::of(close, head.minor_version).field());
        out.extend_from_slice(b"\r\n");
        // Set where the backend fails the body; the end of the body, however it comes, is
        // reported below.
        let mut backend_failed = false;
        let relayed: Result<(), Failure> = async {
            if framing != Framing::Empty {
                let mut trailers = Vec::new();
                // How the body ends if the backend fails it from here on.
                let cut = Failure::cut_off(framing);
                loop {
                    // What is framed goes out before waiting for more: a backend that pauses (a
                    // stream of events, a gRPC server stream) must not have its bytes held back
                    // until more arrive. Frames already there are gathered into one write.
                    let ready = {
                        let mut frame = http_body_util::BodyExt::frame(&mut body);
                        std::future::poll_fn(|cx| {
                            std::task::Poll::Ready(std::pin::Pin::new(&mut frame).poll(cx))
                        })
                        .await
                    };
                    let next = match ready {
                        std::task::Poll::Ready(frame) => Ok(frame),
                        std::task::Poll::Pending => {
                            if !out.is_empty() {
                                write_within(&mut client.stream, &out, pool.response_timeout)
                                    .await
                                    .map_err(|e| client_failed(trace, &e))?;
                                trace.bytes += out.len() as u64;
                                out.clear();
                            }
                            // The backend's pause is timed from here, after the write.
                            let next = timeout(
                                pool.response_timeout,
                                http_body_util::BodyExt::frame(&mut body),
                            );
                            tokio::select! {
                                next = next => next,
                                () = closer.cancelled() => {
                                    trace.end = End::Drained;
                                    return Err(cut);
                                }
                            }
                        }
                    };
                    if closer.is_cancelled() {
                        trace.end = End::Drained;
                        return Err(cut);
                    }
                    let frame = match next {
                        Ok(Some(Ok(frame))) => frame,
                        Ok(None) => break,
                        // Nothing has reached the client yet (the head goes out with what of the
                        // body is there, or once the body has to be waited for): it can still get
                        // a status of ours rather than a close.
                        Ok(Some(Err(_))) if trace.bytes == 0 => {
                            debug!(backend = %addr, "http/2 backend failed its response before its body");
                            backend_failed = true;
                            return Err(Failure::Status(502));
                        }
                        Ok(Some(Err(_))) => {
                            backend_failed = true;
                            trace.end = End::BackendCut;
                            return Err(cut);
                        }
                        Err(_) => {
                            backend_failed = true;
                            trace.end = End::BackendTimeout;
                            return Err(cut);
                        }
                    };
                    match frame.into_data() {
                        Ok(data) => emit(&mut out, &data, framing == Framing::Chunked, &mut encoder)
                            .map_err(|_| {
                                trace.end = End::ProxyError;
                                cut
                            })?,
                        Err(frame) => {
                            if let Ok(map) = frame.into_trailers() {
                                for (name, value) in &h2::forwardable_trailers(map) {
                                    trailers.extend_from_slice(name.as_str().as_bytes());
                                    trailers.extend_from_slice(b": ");
                                    trailers.extend_from_slice(value.as_bytes());
                                    trailers.extend_from_slice(b"\r\n");
                                }
                            }
                        }
                    }
                    if out.len() >= READ_CHUNK {
                        write_within(&mut client.stream, &out, pool.response_timeout)
                            .await
                            .map_err(|e| client_failed(trace, &e))?;
                        trace.bytes += out.len() as u64;
                        out.clear();
                    }
                }
                // The end of a compressed stream goes before any trailers.
                finish_encoder(&mut out, framing == Framing::Chunked, &mut encoder).map_err(|_| {
                    trace.end = End::ProxyError;
                    cut
                })?;
                if framing == Framing::Chunked {
                    h1::encode_last_chunk(&mut out, &trailers);
                }
            }
            write_pair_within(&mut client.stream, &out, &[], pool.response_timeout, close)
                .await
                .map_err(|e| client_failed(trace, &e))?;
            trace.bytes += out.len() as u64;
            Ok(())
        }
        .await;
        // A body its backend failed after the client left is the client's end, and not held
        // against the backend.
        let backend_failed = backend_failed && !client_left(&client.stream);
        if trace.end.is_backends() && !backend_failed {
            trace.end = End::ClientGone;
        }
        pool.report_body(&state, parts.status.as_u16(), backend_failed);
        relayed?;
        drop(guard);
        Ok(if close { Next::Close } else { Next::KeepAlive })
    }

    /// The response fields to drop and add, and the cookie flags, from the listener's and the
    /// route's rules (the route's applied last).
    fn response_edits<'a>(
        &'a self,
        route_rules: Option<&'a Rules>,
        request_id: &'a [u8],
    ) -> ResponseEdits<'a> {
        let mut drop = vec!["x-request-id"];
        let mut extra: Vec<(&str, &[u8])> = vec![("x-request-id", request_id)];
        let flags = h1::merge_cookie_flags(
            &self.rules.cookie_flags,
            route_rules.map_or(&[][..], |r| &r.cookie_flags),
        );
        for rules in [Some(&self.rules), route_rules].into_iter().flatten() {
            let edits = &rules.response_headers;
            drop.extend(edits.remove.iter().map(String::as_str));
            drop.extend(edits.set.iter().map(|(name, _)| name.as_str()));
            extra.retain(|(name, _)| {
                !edits.remove.iter().any(|r| r.eq_ignore_ascii_case(name))
                    && !edits.set.iter().any(|(s, _)| s.eq_ignore_ascii_case(name))
            });
            extra.extend(edits.set.iter().map(|(n, v)| (n.as_str(), v.as_bytes())));
            extra.extend(edits.add.iter().map(|(n, v)| (n.as_str(), v.as_bytes())));
        }
        (drop, extra, flags)
    }

    /// Answers with a redirect of our own. Response header rules (HSTS, say) apply to it too.
    async fn redirect(
        &self,
        client: &mut Client,
        head: &RequestHead,
        redirect: &Redirect,
        request_id: &[u8],
        route_rules: Option<&Rules>,
        trace: &mut Trace,
    ) -> Result<Next, Failure> {
        let host = head.host().map(strip_port).unwrap_or_default();
        let Some(location) = redirect_location(&redirect.to, host, head.target()) else {
            return Err(Failure::Status(400));
        };
        // As for a proxied response: while draining, or once a reload removed the listener,
        // the client is told not to send another request on this connection.
        let close = head.close || head.framing != Framing::Empty || self.closing();
        let out = self.local_answer(
            redirect.status,
            Local::Redirect(location.as_bytes()),
            request_id,
            route_rules,
            h1::Persistence::of(close, head.minor_version),
        );
        trace.status = redirect.status;
        write_pair_within(&mut client.stream, &out, &[], self.keepalive_timeout, close)
            .await
            .map_err(|_| Failure::Abort)?;
        trace.bytes = out.len() as u64;
        Ok(if close { Next::Close } else { Next::KeepAlive })
    }

    /// An answer of the proxy's own, as HTTP/1.1: its fields, then the request id, then the
    /// listener's response rules and, once a route was chosen, the route's (`route_rules`), as
    /// on a proxied response. The cookie flags and compression are for what backends send; the
    /// framing is the proxy's own, which no rule reaches.
    fn local_answer(
        &self,
        status: u16,
        kind: Local<'_>,
        request_id: &[u8],
        route_rules: Option<&Rules>,
        persistence: h1::Persistence,
    ) -> BytesMut {
        let mut seconds = itoa::Buffer::new();
        let own: [(&str, &[u8]); 2] = match kind {
            Local::Error(retry_after) => [
                ("content-type", b"text/plain"),
                match retry_after {
                    Some(s) => ("retry-after", seconds.format(s).as_bytes()),
                    None => ("", b""),
                },
            ],
            Local::Redirect(location) => [("location", location), ("", b"")],
        };
        let (drop, extra, _) = self.response_edits(route_rules, request_id);
        let fields: Vec<(&str, &[u8])> = own
            .into_iter()
            .filter(|(name, _)| {
                !name.is_empty() && !drop.iter().any(|d| d.eq_ignore_ascii_case(name))
            })
            .chain(extra)
            .collect();
        let body = match kind {
            Local::Error(_) => h1::LocalBody::Status,
            Local::Redirect(_) => h1::LocalBody::Empty,
        };
        h1::local_response(status, &fields, body, persistence)
    }

    /// Sends the request to a backend and reads the response head, moving to another backend (or
    /// a fresh connection) when that is safe: on connect failure always; on a connection that
    /// fails before any response byte, only for an idempotent request without a body, on a
    /// fresh connection to the same backend when the failed one was reused (the backend may
    /// have closed it while idle), else on the next backend. With the pool's `retry`, such a
    /// request also moves on after an answer whose status it lists, or a response timeout
    /// when it lists `timeout`; an answer passed over is what the client gets when no backend
    /// after it answers.
    async fn upstream_exchange<'p>(
        &self,
        client: &mut Client,
        head: &RequestHead,
        pool: &'p Pool,
        input: PickInput,
        request: &BytesMut,
        trace: &mut Trace,
    ) -> Result<(UpstreamConn, Picked<'p>, ResponseHead), Failure> {
        client.interim_sent = false;
        let mut passed = None;
        let outcome = self
            .try_backends(client, head, pool, input, request, trace, &mut passed)
            .await;
        match (outcome, passed) {
            // The backends after it failed without an answer, or none could be had: a
            // backend's own answer tells the client more than a status of the proxy's.
            (Err(Failure::Status(_)), Some(passed)) => {
                trace.backend = Some(passed.picked.candidate.state.addr);
                trace.upstream = Some(passed.upstream);
                Ok((passed.conn, passed.picked, passed.response))
            }
            (outcome, _) => outcome,
        }
    }

    /// The attempts of [`Self::upstream_exchange`]; an answer its `retry` passes over is left
    /// in `passed` (the last one, and its connection, which is closed if another replaces it).
    #[allow(clippy::too_many_arguments)]
    async fn try_backends<'p>(
        &self,
        client: &mut Client,
        head: &RequestHead,
        pool: &'p Pool,
        input: PickInput,
        request: &BytesMut,
        trace: &mut Trace,
        passed: &mut Option<Passed<'p>>,
    ) -> Result<(UpstreamConn, Picked<'p>, ResponseHead), Failure> {
        let has_body = head.framing != Framing::Empty;
        // Answers and timeouts are retried only for a request that can be sent again as it
        // was: idempotent (RFC 9110 section 9.2.2), and without a body, which streamed to the
        // backend as it came and of which the proxy kept no copy.
        let retry = pool
            .config()
            .retry
            .as_ref()
            .filter(|_| !has_body && head.is_idempotent());
        let mut attempts = Attempts::for_request(pool, input);
        let mut last_status = 503;
        loop {
            let picked = match attempts.next().await {
                Ok(picked) => picked,
                Err(NoBackend::Exhausted) => return Err(Failure::Status(last_status)),
                Err(_) => return Err(Failure::Status(503)),
            };
            let state = &picked.candidate.state;
            let addr = state.addr;
            trace.attempts = attempts.count();
            trace.backend = Some(addr);
            // A pooled connection first; when it turns out dead, one fresh connection to the
            // same backend before moving on.
            let mut pooled = if pool.send_proxy_protocol.is_none() {
                self.upstream.checkout(pool.conn_key(addr), pool.keepalive)
            } else {
                None
            };
            loop {
                let mut conn = match pooled.take() {
                    Some(conn) => conn,
                    // Boxed: a connection of the pool is the common case, and the state of a
                    // connect (with its TLS handshake) would triple the size of every
                    // exchange's future.
                    None => match Box::pin(timed(&state.connect_time, connect(addr, pool, client)))
                        .await
                    {
                        Ok(conn) => conn,
                        // This process is out of descriptors or memory: no fault of the
                        // backend's, which must not be counted as failing (or ejected), and no
                        // other backend would fare better.
                        Err(error) if crate::listener::is_resource_exhaustion(&error) => {
                            debug!(pool = %pool.name, backend = %addr, %error, "no socket for a backend connection");
                            return Err(Failure::Status(503));
                        }
                        Err(error) => {
                            state.connect_failures.fetch_add(1, Relaxed);
                            pool.report(state, false);
                            debug!(pool = %pool.name, backend = %addr, %error, "connect failed");
                            last_status = 502;
                            break;
                        }
                    },
                };
                let reused = conn.reused;
                let started = Instant::now();
                let sent = {
                    // Pinned here, so that the select below moves a pointer rather than the whole
                    // future, which holds the response read: a copy of a few hundred bytes, twice.
                    let sending = std::pin::pin!(send_request(
                        client,
                        head,
                        &mut conn,
                        request,
                        started,
                        pool.response_timeout,
                        self,
                    ));
                    tokio::select! {
                        // The exchange first, as for the body in `forward`.
                        biased;
                        sent = sending => sent,
                        () = picked.closer.cancelled() => {
                            debug!(pool = %pool.name, backend = %addr, "no response before the backend's drain deadline");
                            return Err(Failure::Status(504));
                        }
                    }
                };
                match sent {
                    Ok(response) => {
                        picked.guard.established();
                        let now = Instant::now();
                        let elapsed = now.saturating_duration_since(started);
                        state
                            .observe_latency_at(elapsed, crate::backend::uptime_at(now.into_std()));
                        state.response_time.observe(elapsed);
                        state.count_response(response.status);
                        trace.upstream = Some(elapsed);
                        // Counted against the backend that gave it, retried or not: a 5xx now,
                        // anything else once its body is through.
                        pool.report_head(state, response.status);
                        if !client.interim_sent
                            && retry.is_some_and(|r| r.retries_status(response.status))
                        {
                            // Its body is not relayed unless no later backend answers: its
                            // head is all there is to judge it by.
                            pool.report_body(state, response.status, false);
                            debug!(pool = %pool.name, backend = %addr, status = response.status, "answer retried on another backend");
                            // The one passed over before is closed: its body is not read.
                            *passed = Some(Passed {
                                conn,
                                picked,
                                response,
                                upstream: elapsed,
                            });
                            attempts.hold_answer();
                            break;
                        }
                        return Ok((conn, picked, response));
                    }
                    Err(SendError::Client) => return Err(Failure::Abort),
                    Err(SendError::TooLarge) => return Err(Failure::Status(413)),
                    Err(SendError::Timeout) => {
                        debug!(pool = %pool.name, backend = %addr, "response timeout");
                        pool.report(state, false);
                        if !client.interim_sent && retry.is_some_and(|r| r.timeout) {
                            last_status = 504;
                            break;
                        }
                        return Err(Failure::Status(504));
                    }
                    Err(SendError::Invalid(error)) => {
                        debug!(pool = %pool.name, backend = %addr, %error, "invalid response");
                        pool.report(state, false);
                        return Err(Failure::Status(502));
                    }
                    Err(SendError::Upstream {
                        before_response,
                        error,
                    }) => {
                        debug!(pool = %pool.name, backend = %addr, %error, reused, "backend failed");
                        if reused && before_response {
                            // An idle connection the backend closed says nothing of its health.
                        } else {
                            pool.report(state, false);
                        }
                        if !before_response || has_body {
                            return Err(Failure::Status(502));
                        }
                        // Only an idempotent request may be sent again (RFC 9112 section
                        // 9.3.1.1): the backend may have acted on it before the connection
                        // failed.
                        if !head.is_idempotent() {
                            return Err(Failure::Status(502));
                        }
                        if reused {
                            continue;
                        }
                        last_status = 502;
                        break;
                    }
                }
            }
        }
    }
}

/// A response head from an HTTP/2 backend, and what its exchange holds until it is answered.
struct H2Answer {
    response: http::Response<()>,
    /// The start of its body.
    early: h2_upstream::Prefetched,
    /// The backend's slot.
    guard: crate::backend::ActiveGuard,
    /// Cancelled at the backend's drain deadline.
    closer: tokio_util::sync::CancellationToken,
    state: Arc<crate::backend::BackendState>,
    /// The sticky cookie naming its backend, when it is to be set.
    set_cookie: Option<String>,
    /// The backend stopped taking the request body before its end.
    request_cut: bool,
    /// The request body's sender, kept to the end of the exchange: dropped, it would reset the
    /// backend's stream and cut an answer still coming on it.
    body_tx: Option<h2_upstream::BodySender>,
    /// The time to its head.
    upstream: Duration,
}

/// An answer the pool's `retry` passed over, kept for the client in case no backend after it
/// answers.
struct Passed<'p> {
    /// The connection it came on, its body unread.
    conn: UpstreamConn,
    /// Its backend, whose slot stays taken while the answer may still go out.
    picked: Picked<'p>,
    /// Its head.
    response: ResponseHead,
    /// The time to its head, for the access log.
    upstream: Duration,
}

/// Where a redirect of the proxy's own sends the client: `to` with `{host}` (without its port)
/// and `{path}` (path and query) filled in. `None` when `to` needs a host the request did not
/// give (an HTTP/1.0 request without Host): `https:///x` would name no site at all.
///
/// A `to` that starts with `{path}` is a reference on this site, but a path that starts with
/// `//` (or `/\`, which browsers read the same) would make it one to another host
/// (`//evil.example/`): the leading slashes become one, so the redirect stays on this site.
fn redirect_location(to: &str, host: &[u8], target: &str) -> Option<String> {
    if host.is_empty() && to.contains("{host}") {
        return None;
    }
    let location = to
        .replace("{host}", &String::from_utf8_lossy(host))
        .replace("{path}", target);
    if to.starts_with("{path}") && (location.starts_with("//") || location.starts_with("/\\")) {
        return Some(format!("/{}", location.trim_start_matches(['/', '\\'])));
    }
    Some(location)
}

/// Runs `connect`, recording how long a successful one took.
async fn timed<T, E>(
    histogram: &crate::metrics::Histogram,
    connect: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = Instant::now();
    let result = connect.await;
    if result.is_ok() {
        histogram.observe(started.elapsed());
    }
    result
}

/// Opens a new connection to a backend (with our PROXY header if the pool asks for one).
async fn connect(addr: SocketAddr, pool: &Pool, client: &Client) -> io::Result<UpstreamConn> {
    let destination = match client.destination {
        Some(destination) => destination,
        None => client.stream.tcp().local_addr()?,
    };
    connect_backend(addr, pool, client.source, destination).await
}

/// Opens a new connection to a backend: TCP within the pool's connect timeout, our PROXY header
/// if the pool asks for one (in the clear, before any TLS), then the pool's TLS handshake if it
/// has one (within the connect timeout again).
pub(crate) async fn connect_backend(
    addr: SocketAddr,
    pool: &Pool,
    source: SocketAddr,
    destination: SocketAddr,
) -> io::Result<UpstreamConn> {
    let mut tcp = match timeout(pool.connect_timeout, TcpStream::connect(addr)).await {
        Ok(result) => result?,
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timeout")),
    };
    tcp.set_nodelay(true)?;
    if let Some(version) = pool.send_proxy_protocol {
        let header = proxy_protocol::encode(version, source, destination);
        tcp.write_all(&header).await?;
    }
    let stream = match &pool.tls {
        None => Stream::Plain(tcp),
        Some(tls) => Stream::Tls(Box::new(
            tls.connect(tcp, addr, pool.connect_timeout).await?.into(),
        )),
    };
    Ok(UpstreamConn {
        stream,
        addr,
        key: pool.conn_key(addr),
        buf: BytesMut::new(),
        reused: false,
        long_bodies: false,
    })
}

/// Why sending a request or reading its response head failed.
#[derive(Debug)]
enum SendError {
    /// The client failed while its body was being read.
    Client,
    /// The backend failed; `before_response` if no byte of a response had arrived.
    Upstream {
        before_response: bool,
        error: io::Error,
    },
    /// The backend answered something that is not HTTP/1.1.
    Invalid(h1::HeadError),
    /// No response head within the pool's response timeout.
    Timeout,
    /// The client's chunked body grew past `max_body_size`.
    TooLarge,
}

/// Sends head and body, then reads the response head (skipping interim 1xx responses). The
/// response timeout runs from when the request was sent: `started` (when sending began), unless
/// sending had to wait.
async fn send_request(
    client: &mut Client,
    head: &RequestHead,
    conn: &mut UpstreamConn,
    request: &BytesMut,
    started: Instant,
    response_timeout: Duration,
    listener: &HttpProxy,
) -> Result<ResponseHead, SendError> {
    let upstream_error = |error| SendError::Upstream {
        before_response: true,
        error,
    };
    let sent_at = match head.framing {
        Framing::Empty => {
            let waited = write_within(&mut conn.stream, request, response_timeout)
                .await
                .map_err(upstream_error)?;
            // The head went out at once (the common case): no need to read the clock again.
            (!waited).then_some(started)
        }
        framing => {
            write_within(&mut conn.stream, request, response_timeout)
                .await
                .map_err(upstream_error)?;
            let mut scratch = BytesMut::new();
            // Boxed: most requests have no body, and the state of a body transfer would more
            // than double the size of every request's future.
            let sent = Box::pin(transfer_body(
                &mut client.stream,
                &mut client.buf,
                &mut conn.stream,
                &mut scratch,
                Body {
                    input: framing,
                    output: framing,
                    idle: response_timeout,
                    limit: listener.max_body_size,
                    splice: listener.splice.then_some(&listener.stats.spliced),
                    then_close: false,
                },
                &mut None,
                &mut 0,
            ))
            .await;
            match sent {
                Ok(_) => {}
                // The backend stopped taking the body: it may have answered already (a 413, a
                // 401), and that answer is what the client should get, as it would without a
                // proxy. Read on; without an answer, the failed write is the error.
                Err(BodyError::Write(error)) => {
                    let deadline = Instant::now() + response_timeout;
                    let answer = Box::pin(read_response(
                        client,
                        head,
                        conn,
                        deadline,
                        response_timeout,
                        listener,
                    ));
                    return match answer.await {
                        Ok(mut response) => {
                            debug!(
                                status = response.status,
                                "the backend answered before taking the whole request body"
                            );
                            response.request_cut = true;
                            response.close = true;
                            Ok(response)
                        }
                        Err(_) => Err(upstream_error(error)),
                    };
                }
                Err(BodyError::TooLarge) => return Err(SendError::TooLarge),
                Err(
                    BodyError::Read(_)
                    | BodyError::Malformed
                    | BodyError::Timeout
                    | BodyError::Compress(_)
                    | BodyError::Stopped,
                ) => return Err(SendError::Client),
            }
            None
        }
    };
    let deadline = sent_at.unwrap_or_else(Instant::now) + response_timeout;
    read_response(client, head, conn, deadline, response_timeout, listener).await
}

/// Reads the response head from `conn` by `deadline`, forwarding interim 1xx responses to the
/// client on the way.
async fn read_response(
    client: &mut Client,
    head: &RequestHead,
    conn: &mut UpstreamConn,
    deadline: Instant,
    response_timeout: Duration,
    listener: &HttpProxy,
) -> Result<ResponseHead, SendError> {
    loop {
        if !conn.buf.is_empty() {
            match h1::parse_response(&mut conn.buf, head.is_head()) {
                Ok(Some(response)) if response.status == 101 && head.websocket => {
                    return Ok(response);
                }
                Ok(Some(response)) if (100..200).contains(&response.status) => {
                    if response.status == 101 {
                        // Upgrade was not forwarded, so a 101 is a backend error.
                        return Err(SendError::Invalid(h1::HeadError::Malformed(
                            "unexpected 101",
                        )));
                    }
                    // A proxy forwards the interim responses it did not ask for (RFC 9110
                    // section 15.2): 103 Early Hints lets the client fetch while the backend
                    // works. Not a 100: the client's expectation was answered by the proxy and
                    // not sent on. Never to an HTTP/1.0 client, which would take it for the
                    // final response.
                    if response.status != 100 && head.minor_version == 1 {
                        let mut interim = BytesMut::with_capacity(256);
                        response.write_downstream(
                            &mut interim,
                            Framing::Empty,
                            h1::Persistence::Implied,
                            &[],
                            &[],
                            &[],
                        );
                        client.interim_sent = true;
                        write_within(&mut client.stream, &interim, response_timeout)
                            .await
                            .map_err(|_| SendError::Client)?;
                    }
                    continue;
                }
                Ok(Some(response)) => return Ok(response),
                Ok(None) => {}
                Err(error) => return Err(SendError::Invalid(error)),
            }
        }
        let before_response = conn.buf.is_empty();
        spare::reserve(&mut conn.buf);
        // A client that leaves while its response is awaited gives up the backend's work too,
        // as NGINX does by default. A closed sending side cannot be told from a closed
        // connection; `abort_on_close = false` serves clients that close only the former. Not
        // while pipelined requests wait in the buffer: such a client wants them answered.
        let watched =
            (listener.abort_on_close && client.buf.is_empty()).then(|| client.stream.tcp());
        let read = if conn.long_bodies && before_response && listener.splice {
            use bytes::BufMut;
            read_upstream(
                &mut conn.stream,
                &mut (&mut conn.buf).limit(HEAD_PROBE),
                deadline,
                watched,
            )
            .await
        } else {
            read_upstream(&mut conn.stream, &mut conn.buf, deadline, watched).await
        };
        let Ok(read) = read else {
            debug!("client gone while its response was awaited");
            return Err(SendError::Client);
        };
        match read {
            Some(Ok(0)) => {
                return Err(SendError::Upstream {
                    before_response,
                    error: io::ErrorKind::UnexpectedEof.into(),
                });
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                return Err(SendError::Upstream {
                    before_response,
                    error,
                });
            }
            None => return Err(SendError::Timeout),
        }
    }
}

/// Why a body transfer failed.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    /// Reading the source failed or it closed early.
    #[error("reading the body: {0}")]
    Read(io::Error),
    /// Writing the destination failed.
    #[error("writing the body: {0}")]
    Write(io::Error),
    /// The source's chunked framing is invalid.
    #[error("invalid chunked framing")]
    Malformed,
    /// The source paused longer than the timeout.
    #[error("body stalled past the timeout")]
    Timeout,
    /// More body than the limit allows.
    #[error("body larger than the limit")]
    TooLarge,
    /// The compressor failed.
    #[error("compressing the body: {0}")]
    Compress(io::Error),
    /// The backend's drain deadline (or the process's) cut the transfer.
    #[error("the backend's drain deadline passed")]
    Stopped,
}

impl BodyError {
    /// Whether the body's source failed it: for a response, the backend's failure (a reset,
    /// bytes short of the framing, broken chunks, a stall), which outlier detection counts,
    /// rather than the destination's (a client that left or stopped reading) or the proxy's.
    fn source_failed(&self) -> bool {
        matches!(
            self,
            BodyError::Read(_) | BodyError::Malformed | BodyError::Timeout
        )
    }

    /// How a response whose body failed so ended, for the access log.
    fn end(&self) -> End {
        match self {
            BodyError::Read(_) | BodyError::Malformed => End::BackendCut,
            BodyError::Timeout => End::BackendTimeout,
            BodyError::Write(error) => client_end(error),
            BodyError::Stopped => End::Drained,
            // A response body has no limit; the compressor is the proxy's own.
            BodyError::TooLarge | BodyError::Compress(_) => End::ProxyError,
        }
    }
}

/// Records in `trace` how a response ended whose write to the client failed with `error`, and
/// gives the failure that ends the exchange.
fn client_failed(trace: &mut Trace, error: &io::Error) -> Failure {
    trace.end = client_end(error);
    Failure::Abort
}

/// How a response ended whose write to the client failed with `error`: a write that waited past
/// its limit ([`write_within`]'s `TimedOut`) is a client that stopped reading, anything else one
/// that went away.
fn client_end(error: &io::Error) -> End {
    if error.kind() == io::ErrorKind::TimedOut {
        End::ClientStalled
    } else {
        End::ClientGone
    }
}

/// Whether the client's connection has ended (its end of stream or a reset) by now, as a peek
/// that does not wait finds it: a response body the backend failed after the client left is
/// not held against the backend.
fn client_left(client: &Stream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    match socket2::SockRef::from(client.tcp())
        .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) => error.kind() != io::ErrorKind::WouldBlock,
    }
}

/// Reads into `buf`, giving up at the deadline `deadline` returns (`None` then). The read is
/// tried first without a timer, and the deadline asked for (which may read the clock) and a
/// timer armed only when the read has to wait: many reads find their bytes already there
/// (the rest of a body, a request once the socket was readable), and a timer costs a clock
/// read and an insertion into and removal from the runtime's timer wheel.
async fn read_within<B: bytes::BufMut>(
    stream: &mut Stream,
    buf: &mut B,
    deadline: impl FnOnce() -> Instant,
) -> Option<io::Result<usize>> {
    let mut read = std::pin::pin!(stream.read_buf(buf));
    // One poll with the task's own waker: when it is pending, the socket's readiness is
    // registered as it would be under the timer.
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await;
    if let std::task::Poll::Ready(result) = first {
        return Some(result);
    }
    tokio::time::timeout_at(deadline(), read).await.ok()
}

/// [`read_within`] for a backend's response, watching the client meanwhile: `Err(ClientGone)`
/// when the client's connection ends (its end of stream or a reset) before the backend sent
/// anything. The watch starts only when the read has to wait, and costs nothing more than the
/// client socket's readiness.
async fn read_upstream<B: bytes::BufMut>(
    stream: &mut Stream,
    buf: &mut B,
    deadline: Instant,
    client: Option<&TcpStream>,
) -> Result<Option<io::Result<usize>>, ClientGone> {
    let mut read = std::pin::pin!(stream.read_buf(buf));
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await;
    if let std::task::Poll::Ready(result) = first {
        return Ok(Some(result));
    }
    let Some(client) = client else {
        return Ok(tokio::time::timeout_at(deadline, read).await.ok());
    };
    tokio::select! {
        biased;
        read = tokio::time::timeout_at(deadline, read) => Ok(read.ok()),
        () = client_gone(client) => Err(ClientGone),
    }
}

/// The client's connection ended while the proxy waited on its behalf.
struct ClientGone;

/// Resolves when a peek at the client's socket finds its end of stream or an error; never when
/// bytes are waiting there (a pipelined request, a TLS record), which are left for their reader.
///
/// Through `poll_read_ready`, the socket's single reader slot (free: nothing else reads the
/// client meanwhile), not a readiness future: that one joins and leaves a list of waiters under
/// a lock, which on every request cost more than the rest of the watch. The read of the request
/// usually left the readiness cleared, so no peek is made until the client sends or closes.
async fn client_gone(client: &TcpStream) {
    let mut waiting = false;
    std::future::poll_fn(|cx| {
        if waiting {
            // Bytes wait; only the other side of the select can end the wait now.
            return std::task::Poll::Pending;
        }
        loop {
            match client.poll_read_ready(cx) {
                std::task::Poll::Pending => return std::task::Poll::Pending,
                std::task::Poll::Ready(Err(_)) => return std::task::Poll::Ready(()),
                std::task::Poll::Ready(Ok(())) => {}
            }
            let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
            let peeked = client.try_io(Interest::READABLE, || {
                socket2::SockRef::from(client)
                    .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT)
            });
            match peeked {
                Ok(0) => return std::task::Poll::Ready(()),
                Ok(_) => {
                    waiting = true;
                    return std::task::Poll::Pending;
                }
                // Readiness was stale and is cleared now: poll again, which registers.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return std::task::Poll::Ready(()),
            }
        }
    })
    .await
}

/// Writes all of `data` within `limit`: a peer that stops reading must not hold a connection
/// (and the backend connection paired with it) forever. `Ok(true)` when the write had to wait
/// for the peer (callers that time from the write then read the clock again).
async fn write_within(stream: &mut Stream, mut data: &[u8], limit: Duration) -> io::Result<bool> {
    // Most writes go straight into the socket buffer (through TLS too): try that first, so
    // the common case arms no timer.
    while !data.is_empty() {
        match stream.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    if data.is_empty() && stream.try_flush()? {
        return Ok(false);
    }
    match timeout(limit, stream.write_all_flush(data)).await {
        Ok(result) => result.map(|()| true),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer stopped reading",
        )),
    }
}

/// Shuts a client connection's write side after its last answer: for TLS, a close_notify goes
/// first (within [`crate::stream::LINGER`], as a client that does not read could hold it up).
/// The FIN then follows the answer whatever the close does later (see
/// [`crate::stream::linger`]).
async fn close_write(stream: &mut Stream) {
    match stream {
        Stream::Plain(tcp) => {
            let _ = socket2::SockRef::from(&*tcp).shutdown(std::net::Shutdown::Write);
        }
        Stream::Tls(_) => {
            let _ = timeout(crate::stream::LINGER, stream.shutdown()).await;
        }
    }
}

/// Writes `head` then `body` within `limit`, in one vectored write when the socket takes it:
/// a body that goes out as it came in is sent from the buffer it was read into, rather than
/// copied behind the head first (for a 64 KiB response, that copy was most of the proxy's own
/// work).
///
/// `before_close`: this is the connection's last write, and it is shut down for writing as soon
/// as this returns (by [`HttpProxy::exchange`]), so the write may leave its tail for the FIN to
/// carry (see [`Stream::try_write_vectored_before_close`]). The shutdown, not the close, must
/// send it: a close with unread bytes in the socket is a reset, which would drop the tail.
async fn write_pair_within(
    stream: &mut Stream,
    head: &[u8],
    body: &[u8],
    limit: Duration,
    before_close: bool,
) -> io::Result<()> {
    if !before_close && (head.is_empty() || body.is_empty()) {
        write_within(stream, if head.is_empty() { body } else { head }, limit).await?;
        return Ok(());
    }
    let bufs = [io::IoSlice::new(head), io::IoSlice::new(body)];
    let attempt = if before_close {
        stream.try_write_vectored_before_close(&bufs)
    } else {
        stream.try_write_vectored(&bufs)
    };
    let sent = match attempt {
        Ok(0) if head.len() + body.len() > 0 => return Err(io::ErrorKind::WriteZero.into()),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    // What the socket did not take goes out through the ordinary path (which also flushes TLS,
    // and sends any tail held back above).
    if sent < head.len() {
        write_within(stream, &head[sent..], limit).await?;
        write_within(stream, body, limit).await?;
    } else {
        write_within(stream, &body[sent - head.len()..], limit).await?;
    }
    Ok(())
}

/// How one body is to be moved.
#[derive(Debug, Clone, Copy)]
struct Body<'a> {
    /// How the source delimits it.
    input: Framing,
    /// How the destination gets it.
    output: Framing,
    /// Longest pause allowed while reading it.
    idle: Duration,
    /// Most body bytes accepted.
    limit: Option<u64>,
    /// A long `Content-Length` body between two plain TCP sockets may be spliced (see
    /// [`splice_exact`]), its bytes counted here; `None`: always copied.
    splice: Option<&'a AtomicU64>,
    /// The destination is shut down for writing as soon as the body is written: the last write
    /// may leave its tail for the FIN to carry (see [`write_pair_within`]).
    then_close: bool,
}

/// Moves one body from `src` (with `buf` holding what was already read) to `dst`, re-framed:
/// `input` says how the source delimits it, `output` how the destination gets it (`Chunked`
/// re-chunks, `UntilClose` and `Length` write the bytes as they are). `out` first holds the
/// head to send; it is sent together with the first body bytes, in one write when it all fits.
/// `written` counts the bytes handed to `dst` as they go, so that a transfer that fails still
/// says how much of it went out (the access log's `bytes` of a response cut short).
async fn transfer_body(
    src: &mut Stream,
    buf: &mut BytesMut,
    dst: &mut Stream,
    out: &mut BytesMut,
    body: Body<'_>,
    encoder: &mut Option<compress::Encoder>,
    written: &mut u64,
) -> Result<u64, BodyError> {
    let Body {
        input,
        output,
        idle,
        limit,
        splice,
        then_close,
    } = body;
    let chunked_out = output == Framing::Chunked;
    // Bytes that go out as they came in are written straight from `buf`, behind whatever
    // `out` holds (the head, at first).
    let direct = !chunked_out && encoder.is_none();
    let mut total = 0u64;
    let mut decoder = ChunkedDecoder::default();
    let mut left = match input {
        Framing::Length(n) => n,
        _ => 0,
    };
    loop {
        // Frame what is buffered into `out`.
        let finished = match input {
            Framing::Empty => true,
            Framing::Length(_) if direct => {
                let take = (buf.len() as u64).min(left) as usize;
                *written += (out.len() + take) as u64;
                write_pair_within(
                    dst,
                    out,
                    &buf[..take],
                    idle,
                    then_close && take as u64 == left,
                )
                .await
                .map_err(BodyError::Write)?;
                out.clear();
                buf.advance(take);
                left -= take as u64;
                if let Some(counter) = splice
                    && left >= SPLICE_MIN
                    && let (Stream::Plain(from), Stream::Plain(to)) = (&*src, &*dst)
                    && let Some(spliced) = splice_exact(from, to, left, idle, &[], written).await
                {
                    spliced?;
                    counter.fetch_add(left, Relaxed);
                    left = 0;
                }
                left == 0
            }
            Framing::Length(_) => {
                let take = (buf.len() as u64).min(left) as usize;
                emit(out, &buf[..take], chunked_out, encoder)?;
                buf.advance(take);
                left -= take as u64;
                left == 0
            }
            Framing::UntilClose if direct => {
                *written += (out.len() + buf.len()) as u64;
                write_pair_within(dst, out, buf, idle, false)
                    .await
                    .map_err(BodyError::Write)?;
                out.clear();
                buf.clear();
                false
            }
            Framing::UntilClose => {
                emit(out, buf, chunked_out, encoder)?;
                buf.clear();
                false
            }
            Framing::Chunked => {
                let mut pos = 0;
                let mut ended = false;
                loop {
                    match decoder
                        .decode(buf, &mut pos)
                        .map_err(|_| BodyError::Malformed)?
                    {
                        Decoded::Data(range) => {
                            total += range.len() as u64;
                            if limit.is_some_and(|max| total > max) {
                                return Err(BodyError::TooLarge);
                            }
                            emit(out, &buf[range], chunked_out, encoder)?;
                        }
                        Decoded::End(_) => {
                            if !decoder.trailers_valid() {
                                return Err(BodyError::Malformed);
                            }
                            ended = true;
                            break;
                        }
                        Decoded::NeedMore => break,
                    }
                }
                buf.advance(pos);
                // Inside a long chunk with nothing buffered: the rest of the chunk can be
                // spliced, under a size line of our own when the output is chunked too.
                let left = decoder.data_left();
                if !ended
                    && buf.is_empty()
                    && encoder.is_none()
                    && left >= SPLICE_MIN
                    && let Some(counter) = splice
                    && limit.is_none_or(|max| total + left <= max)
                    && let (Stream::Plain(from), Stream::Plain(to)) = (&*src, &*dst)
                {
                    let pending = out.len();
                    if chunked_out {
                        h1::encode_chunk_size(out, left);
                    }
                    if let Some(spliced) = splice_exact(from, to, left, idle, out, written).await {
                        spliced?;
                        counter.fetch_add(left, Relaxed);
                        total += left;
                        decoder.skip_data(left);
                        out.clear();
                        if chunked_out {
                            out.extend_from_slice(b"\r\n");
                        }
                    } else {
                        // Not spliced after all, and nothing was sent: the size line goes.
                        out.truncate(pending);
                    }
                }
                ended
            }
        };
        if finished {
            finish_encoder(out, chunked_out, encoder)?;
            if chunked_out {
                h1::encode_last_chunk(out, &decoder.forwardable_trailers());
            }
            if !out.is_empty() {
                *written += out.len() as u64;
                write_pair_within(dst, out, &[], idle, then_close)
                    .await
                    .map_err(BodyError::Write)?;
                out.clear();
            }
            return Ok(*written);
        }
        if !out.is_empty() {
            *written += out.len() as u64;
            write_within(dst, out, idle)
                .await
                .map_err(BodyError::Write)?;
            out.clear();
        }
        buf.reserve(BODY_CHUNK);
        // The idle limit counts from when the read starts waiting.
        match read_within(src, buf, || Instant::now() + idle).await {
            Some(Ok(0)) if input == Framing::UntilClose => {
                // The end of a compressed stream goes out whatever the framing: an HTTP/1.0
                // client's body ends at the close too, and needs the compressor's last block.
                finish_encoder(out, chunked_out, encoder)?;
                if chunked_out {
                    h1::encode_last_chunk(out, &[]);
                }
                if !out.is_empty() {
                    *written += out.len() as u64;
                    write_within(dst, out, idle)
                        .await
                        .map_err(BodyError::Write)?;
                    out.clear();
                }
                return Ok(*written);
            }
            Some(Ok(0)) => return Err(BodyError::Read(io::ErrorKind::UnexpectedEof.into())),
            Some(Ok(_)) => {}
            Some(Err(error)) => return Err(BodyError::Read(error)),
            None => return Err(BodyError::Timeout),
        }
    }
}

/// Moves exactly `len` body bytes from `src` to `dst` through a pipe, so that they never enter
/// user space: for a 64 KiB response that saves the two copies a read/write pair makes, which
/// were most of the proxy's own work per response. `prefix` (a chunk's size line, say) is written
/// to `dst` first, once the first bytes are in the pipe. `written` counts the bytes written,
/// prefix included, as they go (a splice that fails midway counts what it moved). `None` when
/// splicing cannot start (no pipe, or the kernel refuses these sockets):
/// nothing has moved, the prefix was not written, and the caller copies instead.
///
/// The pipe is only filled when empty: a full pipe and a drained socket both answer `EAGAIN`,
/// and an empty pipe keeps the two apart. A pipe that still holds bytes when this fails is closed
/// rather than given back.
async fn splice_exact(
    src: &TcpStream,
    dst: &TcpStream,
    len: u64,
    idle: Duration,
    prefix: &[u8],
    written: &mut u64,
) -> Option<Result<(), BodyError>> {
    let pipe = match crate::splice::Pipe::take() {
        Ok(pipe) => pipe,
        Err(error) => {
            debug!(%error, "no pipe for splice, copying the body instead");
            return None;
        }
    };
    let (into, out_of) = (pipe.write.as_raw_fd(), pipe.read.as_raw_fd());
    let mut left = len;
    let mut first = true;
    while left > 0 {
        // A long body on a fast pair of sockets never waits: let the thread's other tasks run
        // now and then, as reads through tokio's own I/O types do.
        tokio::task::consume_budget().await;
        let want = usize::try_from(left)
            .unwrap_or(usize::MAX)
            .min(pipe.capacity);
        let mut in_pipe = loop {
            match src.try_io(Interest::READABLE, || {
                crate::splice::splice(src.as_raw_fd(), into, want)
            }) {
                Ok(0) => return Some(Err(BodyError::Read(io::ErrorKind::UnexpectedEof.into()))),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match timeout(idle, src.readable()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Some(Err(BodyError::Read(e))),
                        Err(_) => return Some(Err(BodyError::Timeout)),
                    }
                }
                Err(e) if first && e.raw_os_error() == Some(libc::EINVAL) => {
                    debug!(error = %e, "splice refused, copying the body instead");
                    pipe.give_back();
                    return None;
                }
                Err(e) => return Some(Err(BodyError::Read(e))),
            }
        };
        if first
            && !prefix.is_empty()
            && let Err(error) = write_tcp_within(dst, prefix, idle).await
        {
            return Some(Err(BodyError::Write(error)));
        }
        if first {
            *written += prefix.len() as u64;
        }
        first = false;
        left -= in_pipe as u64;
        while in_pipe > 0 {
            match dst.try_io(Interest::WRITABLE, || {
                crate::splice::splice(out_of, dst.as_raw_fd(), in_pipe)
            }) {
                Ok(n) => {
                    in_pipe -= n;
                    *written += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match timeout(idle, dst.writable()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Some(Err(BodyError::Write(e))),
                        Err(_) => {
                            return Some(Err(BodyError::Write(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the peer stopped reading",
                            ))));
                        }
                    }
                }
                Err(e) => return Some(Err(BodyError::Write(e))),
            }
        }
    }
    pipe.give_back();
    Some(Ok(()))
}

/// Writes all of `data` to a plain socket, each wait for room limited to `idle`.
async fn write_tcp_within(dst: &TcpStream, mut data: &[u8], idle: Duration) -> io::Result<()> {
    while !data.is_empty() {
        match dst.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match timeout(idle, dst.writable()).await {
                    Ok(result) => result?,
                    Err(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the peer stopped reading",
                        ));
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Appends body bytes to `out`, compressed if there is an encoder, as a chunk or as they are.
fn emit(
    out: &mut BytesMut,
    data: &[u8],
    chunked: bool,
    encoder: &mut Option<compress::Encoder>,
) -> Result<(), BodyError> {
    let compressed;
    let data = match encoder {
        Some(encoder) => {
            compressed = encoder.push(data).map_err(BodyError::Compress)?;
            &compressed[..]
        }
        None => data,
    };
    if chunked {
        h1::encode_chunk(out, data);
    } else {
        out.extend_from_slice(data);
    }
    Ok(())
}

/// Appends the end of a compressed stream, if there is one.
fn finish_encoder(
    out: &mut BytesMut,
    chunked: bool,
    encoder: &mut Option<compress::Encoder>,
) -> Result<(), BodyError> {
    if let Some(encoder) = encoder.take() {
        let rest = encoder.finish().map_err(BodyError::Compress)?;
        emit(out, &rest, chunked, &mut None)?;
    }
    Ok(())
}

/// What compression makes of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Coding {
    /// Nothing: the response goes as the backend gave it.
    Identity,
    /// Its body is compressed with this encoding.
    Body(crate::config::Encoding),
    /// A response to HEAD whose GET would have been compressed: it gets the fields the GET's
    /// answer gets (RFC 9110 section 9.3.2), so that a cache that checks one against the other
    /// finds them alike; there is no body to compress.
    Head(crate::config::Encoding),
    /// A 304 confirming a representation that would have been compressed: its validator is
    /// weakened as the 200's was, or a cache could not match the two (RFC 9111 section 4.3.4).
    NotModified,
}

impl Coding {
    /// The Content-Encoding the response's fields name, if the proxy changes it.
    pub(crate) fn token(self) -> Option<&'static str> {
        match self {
            Coding::Body(encoding) | Coding::Head(encoding) => Some(encoding.token()),
            Coding::Identity | Coding::NotModified => None,
        }
    }

    /// The compressor for the body, if it is to be compressed, and what holds once it is
    /// asked for: a compressor that cannot start leaves the body and its fields as they are.
    pub(crate) fn start(self) -> (Coding, Option<compress::Encoder>) {
        let Coding::Body(encoding) = self else {
            return (self, None);
        };
        match compress::Encoder::new(encoding) {
            Ok(encoder) => (self, Some(encoder)),
            Err(error) => {
                debug!(%error, "compressor unavailable, sending as is");
                (Coding::Identity, None)
            }
        }
    }
}

/// What [`encoding_for`] needs to know of a response besides its fields.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// Its status.
    pub status: u16,
    /// It answers a HEAD.
    pub head: bool,
    /// It has no body (to HEAD, a 1xx, 204 or 304, or an empty one).
    pub bodiless: bool,
    /// The length of its body when known; for a response to HEAD and a 304, the length the
    /// backend declared for the representation.
    pub length: Option<u64>,
}

/// How to compress a response from a backend that speaks HTTP/1.1.
fn choose_encoding(
    config: &crate::config::Compression,
    accept_encoding: Option<&[u8]>,
    has_range: bool,
    response: &ResponseHead,
    head: bool,
) -> Coding {
    let length = match response.framing {
        Framing::Length(n) => Some(n),
        Framing::Empty => response
            .declared_length()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse().ok()),
        Framing::Chunked | Framing::UntilClose => None,
    };
    encoding_for(
        config,
        accept_encoding,
        has_range,
        Shape {
            status: response.status,
            head,
            bodiless: response.framing == Framing::Empty,
            length,
        },
        |name| response.header_list(name),
    )
}

/// How to compress a response from any protocol: its body if the client accepts an encoding,
/// the response is a compressible type of sufficient size, not already encoded, not partial,
/// and does not forbid transformation; and a response to HEAD, or a 304, as the answer to a GET
/// would be. `header` gives every line of a field as one value.
pub(crate) fn encoding_for<'h>(
    config: &crate::config::Compression,
    accept_encoding: Option<&[u8]>,
    has_range: bool,
    shape: Shape,
    header: impl Fn(&str) -> Option<Cow<'h, [u8]>>,
) -> Coding {
    let Shape {
        status,
        head,
        bodiless,
        length,
    } = shape;
    let not_modified = status == 304;
    // An empty body gains nothing (and a compressed one would not be empty): HTTP/1.1 frames
    // `Content-Length: 0` as no body, an HTTP/2 backend may still send an empty DATA frame.
    if (bodiless && !head && !not_modified)
        || (100..200).contains(&status)
        || status == 204
        || length == Some(0)
        || status == 206
        || has_range
        || header("content-encoding").is_some()
        || header("content-range").is_some()
        || header("cache-control").is_some_and(|v| {
            String::from_utf8_lossy(&v)
                .to_ascii_lowercase()
                .contains("no-transform")
        })
    {
        return Coding::Identity;
    }
    let compressible = match header("content-type") {
        // A 304 seldom names its type. Taken for one that would have been compressed, its
        // validator is weakened: a weak validator still matches an uncompressed copy (weak
        // comparison, RFC 9110 section 8.8.3.2), a strong one never matches a compressed one.
        None if not_modified => true,
        content_type => compress::compressible_type(config, content_type.as_deref()),
    };
    if !compressible || length.is_some_and(|n| n < config.min_size) {
        return Coding::Identity;
    }
    match compress::negotiate(config, accept_encoding) {
        None => Coding::Identity,
        Some(_) if not_modified => Coding::NotModified,
        Some(encoding) if head => Coding::Head(encoding),
        Some(encoding) => Coding::Body(encoding),
    }
}

/// The fields of a response that compression changes (an HTTP/2 one, or one from an HTTP/2
/// backend): a compressed one (or one to HEAD whose GET would be) loses its length, names its
/// encoding, and loses `Accept-Ranges`, since byte ranges of the original do not address the
/// compressed bytes (a download resumed with one would splice the two; NGINX's gzip drops it
/// too). Its strong validator is weakened, since the compressed bytes are a different
/// representation, and so is a 304's that confirms one. With compression configured,
/// `Vary: Accept-Encoding` is added whether or not this one is compressed: caches must not
/// serve it to a client that accepts otherwise.
fn mark_compressed(headers: &mut http::HeaderMap, coding: Coding, configured: bool) {
    use http::{HeaderValue, header};
    if let Some(token) = coding.token() {
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::ACCEPT_RANGES);
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(token));
    }
    if coding != Coding::Identity
        && let Some(etag) = headers.get(header::ETAG)
        && !etag.as_bytes().starts_with(b"W/")
        && let Ok(weak) = HeaderValue::from_bytes(&[b"W/", etag.as_bytes()].concat())
    {
        headers.insert(header::ETAG, weak);
    }
    let varies = headers.get_all(header::VARY).iter().any(|v| {
        String::from_utf8_lossy(v.as_bytes())
            .to_ascii_lowercase()
            .contains("accept-encoding")
    });
    if configured && !varies {
        headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
}

/// The RFC 7239 Forwarded field to send on: a trusted peer's `existing` one (every line of it),
/// extended with an element for the client at `ip`, `for` quoted when it is an IPv6 address.
/// Any other Forwarded a client sent is replaced, on every path, so that a backend may believe
/// the field.
pub(crate) fn forwarded_field(
    existing: Option<&[u8]>,
    ip: IpAddr,
    tls: bool,
    host: &[u8],
) -> Vec<u8> {
    let mut ip_text = [0u8; 64];
    let ip_text = format_ip(ip, &mut ip_text);
    let mut forwarded = Vec::with_capacity(64);
    if let Some(existing) = existing {
        forwarded.extend_from_slice(existing);
        forwarded.extend_from_slice(b", ");
    }
    forwarded.extend_from_slice(b"for=");
    if ip.is_ipv6() {
        forwarded.extend_from_slice(b"\"[");
        forwarded.extend_from_slice(ip_text);
        forwarded.extend_from_slice(b"]\"");
    } else {
        forwarded.extend_from_slice(ip_text);
    }
    forwarded.extend_from_slice(if tls { b";proto=https" } else { b";proto=http" });
    if !host.is_empty()
        && host
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(b))
    {
        forwarded.extend_from_slice(b";host=\"");
        forwarded.extend_from_slice(host);
        forwarded.extend_from_slice(b"\"");
    }
    forwarded
}

/// Writes an IP address as text into `buf` without allocating.
fn format_ip(ip: IpAddr, buf: &mut [u8; 64]) -> &[u8] {
    use std::io::Write;
    if let IpAddr::V4(v4) = ip {
        // Every request writes its client's address: IPv4, the common case, is written octet
        // by octet rather than through `fmt`, which cost as much as parsing the request head.
        let mut len = 0;
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                buf[len] = b'.';
                len += 1;
            }
            let mut digits = itoa::Buffer::new();
            let digits = digits.format(octet).as_bytes();
            buf[len..len + digits.len()].copy_from_slice(digits);
            len += digits.len();
        }
        return &buf[..len];
    }
    let mut cursor = io::Cursor::new(&mut buf[..]);
    let _ = write!(cursor, "{ip}");
    let len = cursor.position() as usize;
    &buf[..len]
}

impl RequestView for RequestHead {
    fn method(&self) -> &str {
        RequestHead::method(self)
    }

    fn query(&self) -> Option<&str> {
        self.target().split_once('?').map(|(_, query)| query)
    }

    fn path(&self) -> &str {
        RequestHead::path(self)
    }

    fn host(&self) -> Option<&[u8]> {
        RequestHead::host(self)
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        RequestHead::header(self, name)
    }
}

/// A Host without its port (`[::1]:80` keeps its brackets).
fn strip_port(host: &[u8]) -> &[u8] {
    if host.first() == Some(&b'[') {
        match host.iter().position(|&b| b == b']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.iter().rposition(|&b| b == b':') {
            Some(colon) => &host[..colon],
            None => host,
        }
    }
}

/// Whether a target the rewrite rules made may be sent: `Err(500)` if it is not a valid
/// origin-form target (the rules' fault), `Err(400)` if its path has a dot segment. The client's
/// own were removed before routing, so such a segment was made by the rewrite out of the
/// client's path (`/api../x` with `strip_prefix = "/api"`, or a regex group that cut a segment
/// in two), and would climb out of the prefix the rewrite put the path under.
fn check_rewritten(target: &str) -> Result<(), u16> {
    if !h1::is_valid_origin_target(target) {
        return Err(500);
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if h1::has_dot_segment(path) {
        return Err(400);
    }
    Ok(())
}

/// Applies a path rewrite to a target, keeping its query.
fn rewrite_target(rewrite: &Rewrite, target: &str) -> String {
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let mut new_path = match rewrite {
        Rewrite::Prefix { strip, add } => {
            let rest = strip
                .as_deref()
                .and_then(|prefix| path.strip_prefix(prefix))
                .unwrap_or(path);
            let rest = if rest.starts_with('/') {
                rest.to_owned()
            } else {
                format!("/{rest}")
            };
            match add {
                Some(add) => format!("{}{rest}", add.trim_end_matches('/')),
                None => rest,
            }
        }
        Rewrite::Regex { regex, replace } => regex.replace(path, replace.as_str()).into_owned(),
    };
    if let Some(query) = query {
        new_path.push('?');
        new_path.push_str(query);
    }
    new_path
}

/// Reads a client's request body (per its HTTP/1.1 framing) and sends it as HTTP/2 frames,
/// trailers included, for an HTTP/2 backend. `body` is finished (taken) once the body is
/// whole; on a failure it is left to the caller, whose dropping it resets the backend's stream.
async fn pump_request_body(
    client: &mut Client,
    framing: Framing,
    body: &mut Option<h2_upstream::BodySender>,
    limit: Option<u64>,
    idle: Duration,
) -> Result<(), BodyError> {
    use hyper::body::Frame;
    let Some(tx) = body.as_ref() else {
        return Ok(());
    };
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut total = 0u64;
    let mut decoder = ChunkedDecoder::default();
    loop {
        let finished = match framing {
            Framing::Empty | Framing::UntilClose => true,
            Framing::Length(_) => {
                let take = (client.buf.len() as u64).min(left) as usize;
                if take > 0 {
                    let data = client.buf.split_to(take).freeze();
                    send_body_frame(tx, Frame::data(data), idle).await?;
                }
                left -= take as u64;
                left == 0
            }
            Framing::Chunked => {
                let mut pos = 0;
                let mut ended = false;
                let mut pieces = Vec::new();
                loop {
                    match decoder
                        .decode(&client.buf, &mut pos)
                        .map_err(|_| BodyError::Malformed)?
                    {
                        Decoded::Data(range) => {
                            total += range.len() as u64;
                            if limit.is_some_and(|max| total > max) {
                                return Err(BodyError::TooLarge);
                            }
                            pieces.push(range);
                        }
                        Decoded::End(_) => {
                            ended = true;
                            break;
                        }
                        Decoded::NeedMore => break,
                    }
                }
                let consumed = client.buf.split_to(pos).freeze();
                for range in pieces {
                    send_body_frame(tx, Frame::data(consumed.slice(range)), idle).await?;
                }
                if ended && !decoder.trailers.is_empty() {
                    if !decoder.trailers_valid() {
                        return Err(BodyError::Malformed);
                    }
                    let trailers = h2::parse_trailers(&decoder.trailers);
                    send_body_frame(tx, Frame::trailers(trailers), idle).await?;
                }
                ended
            }
        };
        if finished {
            if let Some(tx) = body.take() {
                tx.finish();
            }
            return Ok(());
        }
        client.buf.reserve(BODY_CHUNK);
        match timeout(idle, client.stream.read_buf(&mut client.buf)).await {
            Ok(Ok(0)) => return Err(BodyError::Read(io::ErrorKind::UnexpectedEof.into())),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(BodyError::Read(error)),
            Err(_) => return Err(BodyError::Timeout),
        }
    }
}

/// Hands one frame of a client's body to the HTTP/2 connection. A backend that takes none of
/// it for `idle` (its stream's window stays shut) fails it as timed out; one whose stream
/// ended, as a broken pipe.
async fn send_body_frame(
    tx: &h2_upstream::BodySender,
    frame: hyper::body::Frame<bytes::Bytes>,
    idle: Duration,
) -> Result<(), BodyError> {
    match timeout(idle, tx.send(frame)).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(BodyError::Write(io::ErrorKind::BrokenPipe.into())),
        Err(_) => Err(BodyError::Write(io::ErrorKind::TimedOut.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_ip_writes_what_display_writes() {
        for text in [
            "0.0.0.0",
            "127.0.0.1",
            "255.255.255.255",
            "10.20.3.40",
            "::1",
            "2001:db8::7",
            "::ffff:192.0.2.1",
        ] {
            let ip: IpAddr = text.parse().expect("a test address");
            let mut buf = [0u8; 64];
            assert_eq!(format_ip(ip, &mut buf), ip.to_string().as_bytes());
        }
    }
    #[test]
    fn empty_bodies_are_never_compressed() {
        let config = crate::config::Compression {
            algorithms: vec![crate::config::Encoding::Gzip],
            min_size: 0,
            types: vec!["text/*".into()],
        };
        let text =
            |name: &str| (name == "content-type").then_some(Cow::Borrowed(&b"text/plain"[..]));
        let decide = |status, head, bodiless, length| {
            let shape = Shape {
                status,
                head,
                bodiless,
                length,
            };
            encoding_for(&config, Some(b"gzip"), false, shape, text)
        };
        let gzip = Coding::Body(crate::config::Encoding::Gzip);
        assert_eq!(decide(200, false, false, Some(1)), gzip);
        assert_eq!(decide(200, false, false, None), gzip);
        // `content-length: 0` from an HTTP/2 backend, which may still send an empty DATA frame.
        assert_eq!(decide(200, false, false, Some(0)), Coding::Identity);
        assert_eq!(decide(200, false, true, None), Coding::Identity);
        assert_eq!(decide(204, false, true, None), Coding::Identity);
        assert_eq!(decide(206, false, false, Some(10)), Coding::Identity);
        // To HEAD, and a 304: as the GET's answer would be, with no body to compress.
        let head = Coding::Head(crate::config::Encoding::Gzip);
        assert_eq!(decide(200, true, true, Some(10)), head);
        assert_eq!(decide(200, true, true, Some(0)), Coding::Identity);
        assert_eq!(decide(304, false, true, None), Coding::NotModified);
        assert_eq!(decide(304, true, true, None), Coding::NotModified);
    }
}
