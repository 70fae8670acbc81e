//! HTTP/2 from clients (h2c with prior knowledge), proxied to HTTP/1.1 backends.
//!
//! The HTTP/2 protocol itself is hyper's (on the `h2` crate), configured against the known floods:
//! a cap on concurrent streams, a bounded header list (which also bounds CONTINUATION frames),
//! and limits on streams reset by the client before they are served (the "rapid reset" attack)
//! and on streams reset because of protocol errors. Each stream is routed like an HTTP/1.1
//! request and sent to the backend as a re-serialised HTTP/1.1 request over the shared pool of
//! keep-alive connections; the response body streams back through a bounded channel.

use std::borrow::Cow;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tracing::debug;

use super::h1::{self, ChunkedDecoder, Decoded, Framing, ResponseHead};
use super::h2_upstream::{BodyWatch, Lease, Limit, UpstreamBody};
use super::router::RequestView;
use super::upstream::UpstreamConn;
use super::{BodyError, Coding, HttpProxy, new_request_id, valid_request_id};
use crate::access_log::End;
use crate::backend::ActiveGuard;
use crate::config::{Rules, UpstreamProtocol};
use crate::pool::{Attempts, NoBackend, PickInput, Picked, Pool};
use crate::stream::Stream;
use crate::tls::Negotiated;

/// The HTTP/2 connection preface a client sends first (RFC 9113 section 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Streams one client connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 128;
/// Largest header list accepted (decoded), which also bounds CONTINUATION frames.
const MAX_HEADER_LIST_SIZE: u32 = 32 * 1024;
/// Streams the client may reset before they are served, queued at once (rapid reset defence).
const MAX_PENDING_RESETS: usize = 20;
/// Streams the server may reset for protocol errors before it closes the connection.
const MAX_ERROR_RESETS: usize = 64;
/// Response body frames buffered between the backend and the client.
const BODY_QUEUE: usize = 8;
/// Read size for response bodies from backends.
const BODY_CHUNK: usize = 64 * 1024;
/// How often an HTTP/2 peer is pinged, and how long it has to answer: a peer that vanished
/// (no FIN, no RST) is noticed.
pub(super) const PING_INTERVAL: Duration = Duration::from_secs(30);
/// See [`PING_INTERVAL`].
pub(super) const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves an HTTP/2 client connection whose first bytes (the preface, maybe more) are in
/// `read`. `tls` is what the TLS handshake established, on TLS connections. `destination` is
/// the address the client connected to, as PROXY headers sent to backends name it.
pub async fn serve(
    proxy: Arc<HttpProxy>,
    stream: Stream,
    read: BytesMut,
    source: SocketAddr,
    destination: SocketAddr,
    peer_trusted: bool,
    tls: Option<Negotiated>,
) {
    let tls = Arc::new(tls);
    // A second descriptor of the socket, for the close (see `linger`): hyper drops its own as
    // soon as the connection is done.
    let lingering = socket2::SockRef::from(stream.tcp()).try_clone().ok();
    let io = TokioIo::new(Rewind {
        prefix: read.freeze(),
        inner: stream,
    });
    let idle_timeout = proxy.keepalive_timeout;
    let proxy_shutdown = proxy.shutdown.clone();
    let retired = proxy.retired.clone();
    // Streams in flight, and when the last one ended: an HTTP/2 connection with no stream for
    // `keepalive_timeout` is closed, as an idle HTTP/1.1 one is. That also ends a client that
    // never completes its first header block.
    let activity = Arc::new(Activity::default());
    let streams = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        // A reload that kept the listener applies to the streams that start after it.
        let proxy = proxy.current();
        let streams = Arc::clone(&streams);
        let tls = Arc::clone(&tls);
        async move {
            // Counted out when dropped: with the response body once it is done (a server
            // stream may run long after its head, and its connection is not idle then), or
            // with this future, which hyper drops when the client resets the stream before
            // the response head.
            let open = Open::new(streams);
            let response = handle(
                &proxy,
                request,
                source,
                destination,
                peer_trusted,
                &tls,
                open,
            )
            .await;
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_TIMEOUT)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_ERROR_RESETS);
    // Boxed, so that it can be dropped before `linger` watches the socket in its place.
    let mut connection = Box::pin(builder.serve_connection(io, service));
    let check_every = (idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    debug!(client = %source, %error, "http/2 connection ended with an error");
                }
                break;
            }
            _ = proxy_shutdown.cancelled(), if !closing => {
                // Draining: finish the streams in flight, accept no more (GOAWAY).
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = retired.cancelled(), if !closing => {
                // A reload removed the listener: the client goes to whatever serves its
                // address now once its streams are done, as HTTP/1.1 clients are told by
                // `Connection: close`.
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep(check_every), if !closing => {
                if activity.open.load(Ordering::Relaxed) == 0 && activity.idle_for() >= idle_timeout {
                    debug!(client = %source, "idle http/2 connection closed");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
    // hyper's descriptor goes first.
    drop(connection);
    if let Some(socket) = lingering {
        linger(socket).await;
    }
}

/// Closes a finished HTTP/2 connection so that what was written last arrives: the write side is
/// shut, then [`crate::stream::linger`] reads what the client still sends until it closes too.
/// Clients keep sending as they read (window updates, ping acknowledgements); a socket closed
/// at once answers the next such frame with a reset, and the kernel throws away the end of the
/// last responses still in its send queue, responses the access log counts as complete.
async fn linger(socket: socket2::Socket) {
    let _ = socket.shutdown(std::net::Shutdown::Write);
    let Ok(tcp) = tokio::net::TcpStream::from_std(socket.into()) else {
        return;
    };
    crate::stream::linger(&tcp).await;
}

/// One stream counted in [`Activity::open`] while it lives.
struct Open(Arc<Activity>);

impl Open {
    fn new(activity: Arc<Activity>) -> Open {
        activity.open.fetch_add(1, Ordering::Relaxed);
        Open(activity)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// When an HTTP/2 connection last had a stream, and how many it has open.
struct Activity {
    open: AtomicUsize,
    since: std::sync::Mutex<tokio::time::Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            open: AtomicUsize::new(0),
            since: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }
}

impl Activity {
    fn touch(&self) {
        *self.since.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

/// The body of a response: empty, a short text of ours, or streamed from a backend.
pub enum ResponseBody {
    /// Nothing.
    Empty,
    /// A complete body.
    Full(Option<Bytes>),
    /// Frames coming from the task that reads the backend (an HTTP/1.1 one, or an HTTP/2 one
    /// whose frames pass through, trailers too).
    Stream(Relayed),
    /// Another body, counted, and recorded (metrics, access log) when it ends.
    Logged(Box<Logged>),
    /// Another body, compressed on its way (one from an HTTP/2 backend: the HTTP/1.1 ones are
    /// compressed by the task that reads them).
    Compressed(Box<Compressing>),
}

/// A body being compressed frame by frame. Its trailers, if any, are held back until the
/// encoder's last bytes are out: the compressed stream must end before them.
pub struct Compressing {
    body: ResponseBody,
    /// `None` once the body has ended and the encoder's last bytes were sent.
    encoder: Option<super::compress::Encoder>,
    trailers: Option<HeaderMap>,
}

impl Compressing {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        loop {
            let Some(encoder) = self.encoder.as_mut() else {
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            };
            let data = match std::task::ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => encoder.push(&data),
                    Err(frame) => {
                        self.trailers = frame.into_trailers().ok();
                        self.encoder.take().map_or(Ok(Vec::new()), |e| e.finish())
                    }
                },
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => self.encoder.take().map_or(Ok(Vec::new()), |e| e.finish()),
            };
            match data {
                Ok(data) if data.is_empty() => {}
                Ok(data) => return Poll::Ready(Some(Ok(Frame::data(Bytes::from(data))))),
                Err(error) => {
                    self.encoder = None;
                    self.trailers = None;
                    return Poll::Ready(Some(Err(error)));
                }
            }
        }
    }
}

impl ResponseBody {
    /// How the task relaying this body ended it, through a compressor or a count: `None` for a
    /// body no task relays, or while it runs.
    fn relay_end(&self) -> Option<End> {
        match self {
            ResponseBody::Stream(relayed) => relayed.end(),
            ResponseBody::Logged(logged) => logged.body.relay_end(),
            ResponseBody::Compressed(compressing) => compressing.body.relay_end(),
            ResponseBody::Empty | ResponseBody::Full(_) => None,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            ResponseBody::Empty => Poll::Ready(None),
            ResponseBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseBody::Stream(relayed) => relayed.poll_frame(cx),
            ResponseBody::Logged(logged) => {
                let polled = Pin::new(&mut logged.body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            logged.ended.trace.bytes += data.len() as u64;
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        // The relay's task says why; only the compressor fails on its own.
                        logged.ended.trace.end = logged
                            .body
                            .relay_end()
                            .filter(|end| *end != End::Complete)
                            .unwrap_or(End::ProxyError);
                        logged.ended.record();
                    }
                    Poll::Ready(None) => logged.ended.record(),
                    Poll::Pending => {}
                }
                polled
            }
            ResponseBody::Compressed(compressing) => compressing.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Empty => true,
            ResponseBody::Full(data) => data.is_none(),
            ResponseBody::Stream(_) => false,
            ResponseBody::Logged(logged) => logged.body.is_end_stream(),
            ResponseBody::Compressed(compressing) => {
                compressing.encoder.is_none() && compressing.trailers.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Empty => SizeHint::with_exact(0),
            ResponseBody::Full(Some(data)) => SizeHint::with_exact(data.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
            ResponseBody::Stream(_) => SizeHint::default(),
            ResponseBody::Logged(logged) => logged.body.size_hint(),
            ResponseBody::Compressed(_) => SizeHint::default(),
        }
    }
}

/// A response body relayed from a backend by a task of its own, through a bounded queue.
///
/// The task, not the client, sets the pace at which the backend is read, and it gives up on a
/// client that takes nothing for the pool's `response_timeout`: HTTP/2 only polls a body when
/// the client has window for it, so a client that stops reading would otherwise hold the
/// backend's connection (HTTP/1.1) or its stream's share of a backend connection window that
/// other clients' streams use too (HTTP/2) for as long as it likes.
pub struct Relayed {
    rx: mpsc::Receiver<Result<Frame<Bytes>, io::Error>>,
    /// How the task ended the body ([`End::code`]; [`RELAYING`] while it runs): set to
    /// [`End::Complete`] once the whole body is queued. A queue that closes without it is a
    /// body cut short, which must reach the client as an error (a reset), never as a clean end,
    /// and the access log says why.
    end: Arc<AtomicU8>,
}

/// A relay's end while its task still runs.
const RELAYING: u8 = u8::MAX;

impl Relayed {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        match std::task::ready!(self.rx.poll_recv(cx)) {
            Some(frame) => Poll::Ready(Some(frame)),
            None if self.end() == Some(End::Complete) => Poll::Ready(None),
            None => Poll::Ready(Some(Err(io::Error::other(
                "the response body was cut short",
            )))),
        }
    }
}

impl Relayed {
    /// How the task ended the body; `None` while it runs.
    fn end(&self) -> Option<End> {
        End::from_code(self.end.load(Ordering::Acquire))
    }
}

/// The task's end of a [`Relayed`] body.
struct Relay {
    tx: mpsc::Sender<Result<Frame<Bytes>, io::Error>>,
    end: Arc<AtomicU8>,
    /// How long the client may take nothing before it is given up on, and (in
    /// [`relay_upstream`]) how long an HTTP/2 backend may send nothing.
    stall: Duration,
}

impl Relay {
    fn new(stall: Duration) -> (Relay, ResponseBody) {
        let (tx, rx) = mpsc::channel(BODY_QUEUE);
        let end = Arc::new(AtomicU8::new(RELAYING));
        let relayed = Relayed {
            rx,
            end: Arc::clone(&end),
        };
        (Relay { tx, end, stall }, ResponseBody::Stream(relayed))
    }

    /// Queues a frame; an error when the client went away or took nothing for too long.
    async fn send(&self, frame: Frame<Bytes>) -> io::Result<()> {
        self.tx
            .send_timeout(Ok(frame), self.stall)
            .await
            .map_err(|error| match error {
                mpsc::error::SendTimeoutError::Timeout(_) => {
                    io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")
                }
                mpsc::error::SendTimeoutError::Closed(_) => gone(),
            })
    }

    /// Marks the body complete: the client's stream ends cleanly once the queue is drained.
    fn finish(self) {
        self.end.store(End::Complete.code(), Ordering::Release);
    }

    /// Ends the body short, saying how (before the queue closes, so that the client's stream
    /// finds it when its error comes out). A client whose stream went away first left, whatever
    /// went wrong after.
    fn fail(self, end: End) {
        let end = if self.tx.is_closed() {
            End::ClientGone
        } else {
            end
        };
        self.end.store(end.code(), Ordering::Release);
    }

    /// How a failed [`Relay::send`] ended the body.
    fn send_failed(error: &io::Error) -> End {
        if error.kind() == io::ErrorKind::TimedOut {
            End::ClientStalled
        } else {
            End::ClientGone
        }
    }
}

/// Relays an HTTP/2 backend's body (trailers too) to the client. The guard counts the request
/// as in flight on its backend until the body is done; the body is cut at the backend's drain
/// deadline, and the backend's stream is dropped (reset) as soon as the client's goes away, or
/// once the backend has sent nothing for the response timeout (a stream that stays open with
/// nothing coming would otherwise hold the client's request, and a stream of the backend's
/// connection, for ever).
async fn relay_upstream(
    body: Incoming,
    relay: Relay,
    guard: ActiveGuard,
    closer: tokio_util::sync::CancellationToken,
    verdict: Verdict,
) {
    match relay_frames(body, &relay, &closer).await {
        RelayEnd::Whole => {
            verdict.give(guard.state(), false);
            relay.finish();
        }
        // A client whose stream went away first left, whatever the backend did after.
        RelayEnd::Failed(end) => {
            verdict.give(guard.state(), !relay.tx.is_closed());
            relay.fail(end);
        }
        RelayEnd::Stopped(end) => {
            verdict.give(guard.state(), false);
            relay.fail(end);
        }
    }
}

/// How [`relay_frames`] ended.
enum RelayEnd {
    /// The whole body is queued.
    Whole,
    /// The backend failed the body: it reset its stream before the end
    /// ([`End::BackendCut`]), or sent nothing for the response timeout
    /// ([`End::BackendTimeout`]).
    Failed(End),
    /// The client went away or stopped reading, or a drain deadline passed (which of them).
    Stopped(End),
}

/// The loop of [`relay_upstream`].
async fn relay_frames(
    mut body: Incoming,
    relay: &Relay,
    closer: &tokio_util::sync::CancellationToken,
) -> RelayEnd {
    loop {
        let next = tokio::time::timeout(relay.stall, http_body_util::BodyExt::frame(&mut body));
        let frame = tokio::select! {
            frame = next => match frame {
                Ok(frame) => frame,
                Err(_) => {
                    debug!("http/2 backend sent nothing of its body for the response timeout");
                    return RelayEnd::Failed(End::BackendTimeout);
                }
            },
            () = closer.cancelled() => return RelayEnd::Stopped(End::Drained),
            () = relay.tx.closed() => return RelayEnd::Stopped(End::ClientGone),
        };
        match frame {
            None if body.is_end_stream() => return RelayEnd::Whole,
            // hyper ends a body cleanly when its stream is reset with NO_ERROR, which RFC 9113
            // allows only after a complete response: a stream that saw no END_STREAM was cut.
            None => {
                debug!("http/2 backend reset its stream before the body's end");
                return RelayEnd::Failed(End::BackendCut);
            }
            Some(Ok(frame)) => {
                let frame = match frame.into_trailers() {
                    Ok(trailers) => Frame::trailers(forwardable_trailers(trailers)),
                    Err(frame) => frame,
                };
                if let Err(error) = relay.send(frame).await {
                    return RelayEnd::Stopped(Relay::send_failed(&error));
                }
            }
            Some(Err(error)) => {
                debug!(%error, "http/2 backend body failed");
                return RelayEnd::Failed(End::BackendCut);
            }
        }
    }
}

/// What a relay task needs to report how its backend's body ended ([`Pool::report_body`]): the
/// pool (shared: the task outlives the request that borrowed it from its snapshot) and the
/// head's status.
struct Verdict {
    pool: Arc<Pool>,
    status: u16,
}

impl Verdict {
    /// Reports the end of the body of `state`'s response.
    fn give(self, state: &Arc<crate::backend::BackendState>, failed: bool) {
        self.pool.report_body(state, self.status, failed);
    }
}

/// A response of our own: the status and a one-line body, as HTTP/1.1 errors have. It is
/// marked [`LocalReply`]: `handle` gives it the request id and the response rules, and a gRPC
/// client gets it in gRPC's own terms.
fn status_response(status: u16) -> Response<ResponseBody> {
    let body = format!("{status} {}\n", h1::reason(status));
    let mut response = Response::new(ResponseBody::Full(Some(Bytes::from(body))));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    response.extensions_mut().insert(LocalReply::Error);
    response
}

/// The answer to a client over a `rate_limit`: a 429 saying when it would be served.
fn too_many_requests(retry_after: u64) -> Response<ResponseBody> {
    let mut response = status_response(429);
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

/// Marks a response the proxy made itself (not a backend's), which `handle` completes as
/// HTTP/1.1 answers of the proxy's own are (`HttpProxy::local_answer`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum LocalReply {
    /// An error status, which a gRPC client is given as a gRPC status.
    Error,
    /// A redirect.
    Redirect,
}

/// Whether a request is a gRPC call: `application/grpc`, alone or with a `+format` or
/// parameters. gRPC-Web (`application/grpc-web…`) frames its status differently and is left
/// alone.
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().strip_prefix(b"application/grpc"))
        .is_some_and(|rest| matches!(rest.first(), None | Some(b'+' | b';')))
}

/// The gRPC status code for an error status of the proxy's own. The codes gRPC's HTTP mapping
/// lists (its doc/http-grpc-status-mapping.md) are kept, so a client learns the same as it
/// would from the bare HTTP status; the others get the code that says what happened.
fn grpc_code(status: u16) -> &'static str {
    match status {
        // INTERNAL: the request could not be read or forwarded as it was.
        400 => "13",
        401 => "16",
        403 => "7",
        // UNIMPLEMENTED: no route, or a method the proxy does not serve.
        404 | 501 => "12",
        // DEADLINE_EXCEEDED: the client's own upload was too slow.
        408 => "4",
        // RESOURCE_EXHAUSTED: a message or its metadata over a limit.
        413 | 431 => "8",
        // UNAVAILABLE: no backend could take it, or it did not answer in time.
        429 | 502 | 503 | 504 => "14",
        _ => "2",
    }
}

/// A gRPC client given a proxy error as plain HTTP learns only "unexpected HTTP status"; as a
/// trailers-only gRPC response (HTTP 200, `grpc-status` and `grpc-message` in the one head that
/// ends the stream, as Envoy answers too) it gets a status code and the reason.
fn as_grpc_error(response: Response<ResponseBody>) -> Response<ResponseBody> {
    let status = response.status();
    let (mut parts, _) = response.into_parts();
    parts.status = StatusCode::OK;
    parts.headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    parts.headers.insert(
        "grpc-status",
        HeaderValue::from_static(grpc_code(status.as_u16())),
    );
    // Printable ASCII only, which gRPC's percent-encoding leaves as it is.
    let message = format!("{} {}", status.as_u16(), h1::reason(status.as_u16()));
    if let Ok(value) = HeaderValue::from_str(&message) {
        parts.headers.insert("grpc-message", value);
    }
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(parts, ResponseBody::Empty)
}

/// A request as the router sees it.
struct View<'a> {
    parts: &'a http::request::Parts,
}

impl RequestView for View<'_> {
    fn method(&self) -> &str {
        self.parts.method.as_str()
    }

    fn query(&self) -> Option<&str> {
        self.parts.uri.query()
    }

    fn path(&self) -> &str {
        self.parts.uri.path()
    }

    fn host(&self) -> Option<&[u8]> {
        match self.parts.uri.authority() {
            Some(authority) => Some(authority.as_str().as_bytes()),
            None => self
                .parts
                .headers
                .get(http::header::HOST)
                .map(HeaderValue::as_bytes),
        }
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.parts.headers.get(name).map(HeaderValue::as_bytes)
    }

    fn cookie(&self, name: &str) -> Option<&[u8]> {
        // HTTP/2 clients may send each cookie in a field of its own.
        self.parts
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .find_map(|field| super::persist::cookie_value(Some(field.as_bytes()), name))
    }
}

/// Fields that are connection-specific in HTTP/1.1 and must not be sent on (RFC 9113 section
/// 8.2.2 forbids them in HTTP/2, and `te` is only ever "trailers" there), the framing and Host
/// fields the proxy writes itself, and the [forwarding fields](is_forwarding_field).
pub(super) fn is_connection_specific(name: &HeaderName) -> bool {
    is_hop_or_framing(name) || is_forwarding_field(name)
}

/// An HTTP/2 backend's trailer section as it may reach a client: without the fields a trailer
/// may not carry (RFC 9110 section 6.5.1: framing, Host; the h2 crate already refuses the
/// connection-specific ones) nor the forwarding fields, as an HTTP/1.1 backend's trailers lose
/// them (`h1::ChunkedDecoder::forwardable_trailers`): a client or cache that merges trailers
/// into the head would otherwise take a `content-length` or `host` from there.
pub(super) fn forwardable_trailers(mut trailers: HeaderMap) -> HeaderMap {
    let dropped: Vec<HeaderName> = trailers
        .keys()
        .filter(|name| is_connection_specific(name))
        .cloned()
        .collect();
    for name in dropped {
        trailers.remove(name);
    }
    trailers
}

/// Hop-by-hop fields, and the framing and Host fields the proxy writes itself.
fn is_hop_or_framing(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            | "host"
    )
}

/// Fields the proxy sets on every request it forwards, replacing whatever the client sent; on
/// responses, a backend's own are not passed on.
/// A name spelt with `_` for `-` counts too (`h1::same_field_name`).
pub(super) fn is_forwarding_field(name: &HeaderName) -> bool {
    super::FORWARDING_FIELDS
        .iter()
        .any(|f| h1::same_field_name(f.as_bytes(), name.as_str().as_bytes()))
}

/// Puts the forwarding fields of a stream in its request, in place of the client's (a trusted
/// peer's X-Forwarded-For and Forwarded are extended; Forwarded is written with
/// `forwarded_header` only, and a client's never passes): done before the request rules, so that a rule can
/// change or remove them as on HTTP/1.1, and X-Forwarded-Host is the Host the client asked
/// for, not a `host_rewrite`.
fn set_forwarding_fields(
    parts: &mut http::request::Parts,
    source: SocketAddr,
    peer_trusted: bool,
    tls: &Option<Negotiated>,
    request_id: &[u8],
    forwarded_header: bool,
) {
    let ip = source.ip().to_string();
    // Every line of a trusted peer's list, as one list.
    let existing = h1::join_lines(
        parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .map(HeaderValue::as_bytes),
    );
    let forwarded_for = match existing {
        Some(existing) if peer_trusted => [&existing, &b", "[..], ip.as_bytes()].concat(),
        _ => ip.clone().into_bytes(),
    };
    let host = View { parts: &*parts }.host().map(<[u8]>::to_vec);
    let forwarded = if forwarded_header {
        let existing = h1::join_lines(
            parts
                .headers
                .get_all(http::header::FORWARDED)
                .iter()
                .map(HeaderValue::as_bytes),
        );
        super::forwarded_field(
            existing.as_deref().filter(|_| peer_trusted),
            source.ip(),
            tls.is_some(),
            host.as_deref().unwrap_or(b""),
        )
    } else {
        Vec::new()
    };
    let cert = tls.as_ref().and_then(|t| t.client_cert.as_deref());
    let fields: [(&'static str, &[u8]); 8] = [
        ("x-forwarded-for", &forwarded_for),
        ("x-real-ip", ip.as_bytes()),
        (
            "x-forwarded-proto",
            if tls.is_some() { b"https" } else { b"http" },
        ),
        ("x-forwarded-host", host.as_deref().unwrap_or(b"")),
        ("x-request-id", request_id),
        (
            super::CLIENT_CERT_FIELDS[0],
            cert.map_or(&b""[..], |c| c.subject.as_bytes()),
        ),
        (
            super::CLIENT_CERT_FIELDS[1],
            cert.map_or(&b""[..], |c| c.san.as_bytes()),
        ),
        ("forwarded", &forwarded),
    ];
    // The client's own, in any spelling (`x_real_ip` is `X-Real-IP` to a CGI server).
    if parts.headers.keys().any(|n| n.as_str().contains('_')) {
        let disguised: Vec<HeaderName> = parts
            .headers
            .keys()
            .filter(|n| n.as_str().contains('_') && is_forwarding_field(n))
            .cloned()
            .collect();
        for name in disguised {
            parts.headers.remove(name);
        }
    }
    for (name, value) in fields {
        parts.headers.remove(name);
        if value.is_empty() && (name.starts_with("x-client-cert") || name == "forwarded") {
            continue;
        }
        if let Ok(value) = HeaderValue::from_bytes(value) {
            parts.headers.insert(HeaderName::from_static(name), value);
        }
    }
}

/// Whether a request's TE fields ask for trailers: what an HTTP/2 backend is told of them, as
/// `te: trailers` (RFC 9113 section 8.2.2 allows no other value; gRPC servers require it).
/// An HTTP/1.1 client's TE may list transfer codings beside it (`TE: gzip, trailers`): those
/// are for its own connection, and dropped.
pub(super) fn te_trailers<'v>(fields: impl IntoIterator<Item = &'v HeaderValue>) -> bool {
    fields.into_iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|member| member.trim_ascii().eq_ignore_ascii_case(b"trailers"))
    })
}

/// One HTTP/2 stream: route, forward to a backend over HTTP/1.1, answer.
async fn handle(
    proxy: &Arc<HttpProxy>,
    request: Request<Incoming>,
    source: SocketAddr,
    destination: SocketAddr,
    peer_trusted: bool,
    tls: &Option<Negotiated>,
    open: Open,
) -> Response<ResponseBody> {
    let started = tokio::time::Instant::now();
    let mut request = request;
    let clean = remove_dot_segments(request.uri_mut());
    // What the access log shows, copied only when there is one.
    let logged = proxy.access_log.is_some().then(|| {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default()
        };
        (
            request.method().as_str().to_owned(),
            request
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
            request
                .uri()
                .authority()
                .map(|a| a.as_str().as_bytes().to_vec())
                .unwrap_or_else(|| header("host")),
            header("referer"),
            header("user-agent"),
        )
    });
    let (method, target, host, referer, user_agent) = logged.unwrap_or_default();
    // The request id first, so that every answer, the proxy's own included, and the access
    // log line carry it.
    let request_id = match request.headers().get("x-request-id") {
        Some(id) if valid_request_id(id.as_bytes()) => id.as_bytes().to_vec(),
        _ => new_request_id(&mut [0u8; 32]).to_vec(),
    };
    // Recorded when dropped. hyper drops this future when the client resets the stream before
    // the response head; the stream is then recorded as 499 (NGINX's "client closed request").
    let mut ended = Ended {
        proxy: Arc::clone(proxy),
        trace: super::Trace {
            status: super::CLIENT_CLOSED,
            end: End::ClientGone,
            ..super::Trace::default()
        },
        started,
        client: source,
        request_id,
        method,
        target,
        host,
        referer,
        user_agent,
        recorded: false,
    };
    let grpc = is_grpc(request.headers());
    let mut response = if clean {
        handle_stream(
            proxy,
            request,
            source,
            destination,
            peer_trusted,
            tls,
            &ended.request_id,
            &mut ended.trace,
        )
        .await
    } else {
        status_response(400)
    };
    // Logs and metrics keep the HTTP status the error stands for.
    ended.trace.status = response.status().as_u16();
    ended.trace.end = End::Complete;
    if let Some(&local) = response.extensions().get::<LocalReply>() {
        complete_local(proxy, &mut response, &ended.request_id, ended.trace.route);
        if grpc && local == LocalReply::Error {
            response = as_grpc_error(response);
        }
    }
    // From here the stream is recorded when its body is done (or dropped, when the client resets
    // it), so that the line has the bytes sent and the duration of the whole exchange, as on
    // HTTP/1.1.
    response.map(|body| {
        ResponseBody::Logged(Box::new(Logged {
            body,
            ended,
            _open: open,
        }))
    })
}

/// Removes the dot segments of a request's path (see [`h1::without_dot_segments`]), so that
/// routes, rewrites and the backend see it as HTTP/1.1 requests are seen; `false` if the result
/// could not be made a URI again.
fn remove_dot_segments(uri: &mut http::Uri) -> bool {
    let Some(clean) = uri
        .path_and_query()
        .and_then(|p| h1::without_dot_segments(p.as_str()))
    else {
        return true;
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = clean.parse().ok();
    match http::Uri::from_parts(parts) {
        Ok(clean) => {
            *uri = clean;
            true
        }
        Err(_) => false,
    }
}

/// A response body that counts what it delivers; the stream is recorded when it ends.
pub struct Logged {
    body: ResponseBody,
    ended: Ended,
    /// Keeps the stream counted as open on its connection until its body is done.
    _open: Open,
}

impl Drop for Logged {
    /// A body dropped before its end is a stream the client reset (or whose connection ended),
    /// unless the relay had already ended it short for another reason (the client stopped
    /// reading, the backend failed, a drain deadline) that the client never read as far as.
    fn drop(&mut self) {
        if !self.ended.recorded {
            self.ended.trace.end = self
                .body
                .relay_end()
                .filter(|end| *end != End::Complete)
                .unwrap_or(End::ClientGone);
        }
    }
}

/// What the metrics and the access log need of a finished stream. Recorded once: when the body
/// ends, or when this is dropped (a stream reset by the client, before or after its head).
struct Ended {
    proxy: Arc<HttpProxy>,
    trace: super::Trace,
    started: tokio::time::Instant,
    client: SocketAddr,
    request_id: Vec<u8>,
    method: String,
    target: String,
    host: Vec<u8>,
    referer: Vec<u8>,
    user_agent: Vec<u8>,
    recorded: bool,
}

impl Ended {
    fn record(&mut self) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        self.proxy.record(
            &super::Finished {
                request_id: &self.request_id,
                client: self.client,
                method: &self.method,
                host: &self.host,
                target: &self.target,
                protocol: "HTTP/2",
                referer: &self.referer,
                user_agent: &self.user_agent,
            },
            &self.trace,
            self.started.elapsed(),
        );
    }
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.record();
    }
}

/// Gives an answer of the proxy's own what a proxied one has: the request id, then the
/// listener's response rules and, once a route was chosen (`route`, as the trace has it), the
/// route's. Not the cookie flags or compression, which are for what backends send.
fn complete_local(
    proxy: &HttpProxy,
    response: &mut Response<ResponseBody>,
    request_id: &[u8],
    route: Option<usize>,
) {
    let headers = response.headers_mut();
    if let Ok(id) = HeaderValue::from_bytes(request_id) {
        headers.insert("x-request-id", id);
    }
    edit_headers(headers, &proxy.rules.response_headers);
    if let Some(rules) = route.and_then(|i| proxy.route_rules.get(i)) {
        edit_headers(headers, &rules.response_headers);
    }
}

/// One HTTP/2 stream, routed and forwarded.
#[allow(clippy::too_many_arguments)]
async fn handle_stream(
    proxy: &HttpProxy,
    request: Request<Incoming>,
    source: SocketAddr,
    destination: SocketAddr,
    peer_trusted: bool,
    tls: &Option<Negotiated>,
    request_id: &[u8],
    trace: &mut super::Trace,
) -> Response<ResponseBody> {
    let (mut parts, body) = request.into_parts();
    // CONNECT asks for a tunnel, which this proxy does not make (as on HTTP/1.1). Its stream
    // has no path: sent on, it would reach the backend as some other request, and a 2xx answer
    // would turn the stream into a tunnel to nowhere.
    if parts.method == http::Method::CONNECT {
        return status_response(501);
    }
    if !host_fields_agree(&parts) {
        return status_response(400);
    }
    if !proxy.access.permits(source.ip()) {
        proxy.stats.denied.fetch_add(1, Ordering::Relaxed);
        return status_response(403);
    }
    // A refused client's requests count against no limit: the limits come after the lists.
    let header = |name: &str| parts.headers.get(name).map(HeaderValue::as_bytes);
    if let Some(seconds) = proxy.over_limit(proxy.rate_limit.as_deref(), source.ip(), header) {
        return too_many_requests(seconds);
    }
    // A listener-wide redirect (plain HTTP to HTTPS, say) answers before any routing, as on
    // HTTP/1.1.
    if let Some(redirect) = &proxy.rules.redirect {
        return redirect_response(&parts, redirect);
    }
    let view = View { parts: &parts };
    let Some(routed) = proxy.router.route(&view) else {
        return status_response(404);
    };
    trace.route = Some(
        routed
            .route
            .unwrap_or(proxy.route_stats.len().saturating_sub(2)),
    );
    if !proxy.route_permits(routed.route, source.ip()) {
        return status_response(403);
    }
    let route_limit = routed
        .route
        .and_then(|i| proxy.route_limits.get(i))
        .and_then(Option::as_deref);
    if let Some(seconds) = proxy.over_limit(route_limit, source.ip(), header) {
        return too_many_requests(seconds);
    }
    // The listener's rules, then the route's, as on HTTP/1.1.
    let listener_rules = Some(&proxy.rules).filter(|r| !r.is_empty());
    let route_rules = routed
        .route
        .and_then(|i| proxy.route_rules.get(i))
        .filter(|r| !r.is_empty());
    let rules: Vec<&Rules> = [listener_rules, route_rules]
        .into_iter()
        .flatten()
        .collect();
    if let Some(redirect) = route_rules.and_then(|r| r.redirect.as_ref()) {
        return redirect_response(&parts, redirect);
    }
    // A route's compression replaces the listener's. It is decided on what the client sent,
    // before request rules edit the fields (one may remove Accept-Encoding so that the backend
    // answers uncompressed and the proxy compresses).
    let compression = rules
        .iter()
        .rev()
        .find_map(|r| r.compression.as_ref())
        .map(|config| Negotiation {
            config,
            accept_encoding: h1::join_lines(
                parts
                    .headers
                    .get_all(http::header::ACCEPT_ENCODING)
                    .iter()
                    .map(HeaderValue::as_bytes),
            )
            .map(Cow::into_owned),
            ranged: parts.headers.contains_key(http::header::RANGE),
        });
    set_forwarding_fields(
        &mut parts,
        source,
        peer_trusted,
        tls,
        request_id,
        proxy.forwarded_header,
    );
    if !rules.is_empty()
        && let Err(status) = apply_request_rules(&mut parts, &rules)
    {
        return status_response(status);
    }
    let mut response = proceed(
        proxy,
        routed.pool,
        parts,
        body,
        source,
        destination,
        request_id,
        compression.as_ref(),
        trace,
    )
    .await;
    // An answer of the proxy's own gets the rules with its id, in `handle`.
    if response.extensions().get::<LocalReply>().is_none() {
        apply_response_rules(response.headers_mut(), &rules);
    }
    // The compression fields last, as on HTTP/1.1: a rule that sets Vary or ETag must not
    // undo them.
    if let Some(Chosen(coding)) = response.extensions_mut().remove::<Chosen>() {
        super::mark_compressed(response.headers_mut(), coding, true);
    }
    response
}

/// Whether a stream's `:authority` and Host fields are what HTTP/1.1 requires of a Host
/// (`h1::valid_host`): a host and port, at most one Host field, which names the host
/// `:authority` names when there is one (RFC 9113 section 8.3.1). Without `:authority` the Host field is what routes see and the backend is
/// sent, so one a backend could read otherwise (`a, b`, `a/b`) must not pass.
fn host_fields_agree(parts: &http::request::Parts) -> bool {
    // No userinfo either (RFC 9113 section 8.3.1), which the URI's parser lets through.
    if parts
        .uri
        .authority()
        .is_some_and(|a| !h1::valid_host(a.as_str().as_bytes()))
    {
        return false;
    }
    let mut hosts = parts.headers.get_all(http::header::HOST).iter();
    let Some(host) = hosts.next() else {
        return true;
    };
    if hosts.next().is_some() || !h1::valid_host(host.as_bytes()) {
        return false;
    }
    parts
        .uri
        .authority()
        .is_none_or(|a| a.as_str().as_bytes().eq_ignore_ascii_case(host.as_bytes()))
}

/// A redirect of the proxy's own; `handle` adds the request id and the response rules.
fn redirect_response(
    parts: &http::request::Parts,
    redirect: &crate::config::Redirect,
) -> Response<ResponseBody> {
    let view = View { parts };
    let host = view.host().map(super::strip_port).unwrap_or_default();
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Some(location) = super::redirect_location(&redirect.to, host, target) else {
        return status_response(400);
    };
    let mut response = Response::new(ResponseBody::Empty);
    *response.status_mut() = StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::FOUND);
    if let Ok(location) = HeaderValue::from_str(&location) {
        response
            .headers_mut()
            .insert(http::header::LOCATION, location);
    }
    response.extensions_mut().insert(LocalReply::Redirect);
    response
}

/// What a stream's response compression is decided on: the configuration in force, and the
/// client's own Accept-Encoding and Range.
struct Negotiation<'a> {
    config: &'a crate::config::Compression,
    /// Every Accept-Encoding line, as one list.
    accept_encoding: Option<Vec<u8>>,
    ranged: bool,
}

impl Negotiation<'_> {
    /// How a backend's response is to be compressed.
    fn coding<'h>(
        &self,
        shape: super::Shape,
        header: impl Fn(&str) -> Option<Cow<'h, [u8]>>,
    ) -> Coding {
        super::encoding_for(
            self.config,
            self.accept_encoding.as_deref(),
            self.ranged,
            shape,
            header,
        )
    }
}

/// Left in a backend's response by [`proceed`] when compression is configured: what
/// compression makes of it. `handle_stream` edits the fields accordingly once the response
/// rules have run.
#[derive(Clone, Copy)]
struct Chosen(Coding);

/// Header edits, path rewrites and Host rewrites on an HTTP/2 request. `Err` with the status
/// to answer when a rewrite produced a target that may not be sent (see
/// [`super::check_rewritten`]).
fn apply_request_rules(parts: &mut http::request::Parts, rules: &[&Rules]) -> Result<(), u16> {
    let mut target = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let mut host = View { parts }
        .host()
        .map(|h| String::from_utf8_lossy(h).into_owned());
    for rules in rules {
        edit_headers(&mut parts.headers, &rules.request_headers);
        if let Some(rewrite) = &rules.rewrite {
            target = super::rewrite_target(rewrite, &target);
        }
        if let Some(rewritten) = &rules.host_rewrite {
            host = Some(rewritten.clone());
        }
    }
    super::check_rewritten(&target)?;
    let authority = host.unwrap_or_else(|| "backend".to_owned());
    parts.uri = format!("http://{authority}{target}")
        .parse()
        .map_err(|_| 500u16)?;
    parts.headers.remove(http::header::HOST);
    Ok(())
}

/// Response header edits (the listener's, then the route's), then the cookie flags in force
/// (see [`h1::merge_cookie_flags`]) on every Set-Cookie, as on HTTP/1.1.
pub(super) fn apply_response_rules(headers: &mut HeaderMap, rules: &[&Rules]) {
    for rules in rules {
        edit_headers(headers, &rules.response_headers);
    }
    let flags = match rules {
        [] => return,
        [only] => h1::merge_cookie_flags(&only.cookie_flags, &[]),
        [listener, route, ..] => {
            h1::merge_cookie_flags(&listener.cookie_flags, &route.cookie_flags)
        }
    };
    if flags.is_empty() {
        return;
    }
    let cookies: Vec<HeaderValue> = headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .map(|value| {
            let mut text = value.as_bytes().to_vec();
            for flag in &flags {
                if !h1::has_cookie_attribute(value.as_bytes(), flag) {
                    text.extend_from_slice(b"; ");
                    text.extend_from_slice(flag.as_bytes());
                }
            }
            HeaderValue::from_bytes(&text).unwrap_or_else(|_| value.clone())
        })
        .collect();
    if !cookies.is_empty() {
        headers.remove(http::header::SET_COOKIE);
        for cookie in cookies {
            headers.append(http::header::SET_COOKIE, cookie);
        }
    }
}

/// `remove`, then `set`, then `add`, as on HTTP/1.1.
pub(super) fn edit_headers(headers: &mut HeaderMap, edits: &crate::config::HeaderRules) {
    for name in &edits.remove {
        headers.remove(name.as_str());
    }
    // A removed field goes in every spelling, as on HTTP/1.1 (`h1::same_field_name`).
    if !edits.remove.is_empty() && headers.keys().any(|n| n.as_str().contains('_')) {
        let disguised: Vec<HeaderName> = headers
            .keys()
            .filter(|n| {
                n.as_str().contains('_')
                    && edits
                        .remove
                        .iter()
                        .any(|r| h1::same_field_name(r.as_bytes(), n.as_str().as_bytes()))
            })
            .cloned()
            .collect();
        for name in disguised {
            headers.remove(name);
        }
    }
    for (name, value) in &edits.set {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    for (name, value) in &edits.add {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
}

/// The rest of a stream once routed and its rules applied: a backend over HTTP/1.1 or HTTP/2.
#[allow(clippy::too_many_arguments)]
async fn proceed(
    proxy: &HttpProxy,
    pool_name: Option<&str>,
    parts: http::request::Parts,
    body: Incoming,
    source: SocketAddr,
    destination: SocketAddr,
    request_id: &[u8],
    compression: Option<&Negotiation<'_>>,
    trace: &mut super::Trace,
) -> Response<ResponseBody> {
    let view = View { parts: &parts };
    let snapshot = proxy.snapshot.load_full();
    let Some(pool) = pool_name.and_then(|name| snapshot.pool(name)) else {
        return status_response(503);
    };
    if proxy.access_log.is_some() {
        trace.pool = Some(pool.name.clone());
    }
    let input = super::persist::pick_input(pool, &view, source.ip());
    // A declared length over the limit is refused before any backend is contacted, whatever
    // the backend speaks.
    let length = match parts.headers.get(http::header::CONTENT_LENGTH) {
        None => None,
        Some(value) => match value.to_str().ok().and_then(|v| v.parse::<u64>().ok()) {
            Some(n) => Some(n),
            None => return status_response(400),
        },
    };
    if let (Some(n), Some(max)) = (length, proxy.max_body_size)
        && n > max
    {
        return status_response(413);
    }
    if pool.upstream_protocol == UpstreamProtocol::H2 {
        let host = view.host().map(<[u8]>::to_vec);
        return forward_h2(
            proxy,
            pool,
            input,
            parts,
            body,
            request_id,
            host,
            compression,
            trace,
        )
        .await;
    }
    let framing = match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None if body.is_end_stream() => Framing::Empty,
        None => Framing::Chunked,
    };

    // The upstream head: the request re-serialised as HTTP/1.1 (its forwarding fields are
    // already among its fields).
    let mut head = BytesMut::with_capacity(1024);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.extend_from_slice(b" ");
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    head.extend_from_slice(view.host().unwrap_or(b""));
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if is_hop_or_framing(name) || name == http::header::COOKIE {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    // HTTP/2 clients may split cookies over several fields; HTTP/1.1 wants one (RFC 9113
    // section 8.2.3).
    let mut cookies = parts
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .peekable();
    if cookies.peek().is_some() {
        head.extend_from_slice(b"cookie: ");
        for (i, cookie) in cookies.enumerate() {
            if i > 0 {
                head.extend_from_slice(b"; ");
            }
            head.extend_from_slice(cookie.as_bytes());
        }
        head.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        }
        Framing::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty | Framing::UntilClose => {}
    }
    head.extend_from_slice(b"\r\n");

    let (conn, response, picked) = match exchange(
        proxy,
        pool,
        input,
        source,
        destination,
        &head,
        body,
        framing,
        &parts.method,
        trace,
    )
    .await
    {
        Ok(done) => done,
        Err(status) => return status_response(status),
    };
    let set_cookie = super::persist::sticky_cookie(pool, &input, picked.index);
    let guard = picked.guard;
    let closer = picked.closer;

    let mut builder = Response::builder()
        .status(StatusCode::from_u16(response.status).unwrap_or(StatusCode::BAD_GATEWAY));
    for (name, value) in response.fields() {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            && !is_connection_specific(&name)
        {
            builder = builder.header(name, value);
        }
    }
    if let Ok(id) = HeaderValue::from_bytes(request_id) {
        builder = builder.header("x-request-id", id);
    }
    if let Some(cookie) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        builder = builder.header(http::header::SET_COOKIE, cookie);
    }
    let length = match response.framing {
        Framing::Length(n) => Some(n),
        Framing::Empty => response
            .declared_length()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse().ok()),
        Framing::Chunked | Framing::UntilClose => None,
    };
    let (coding, encoder) = compression.map_or((Coding::Identity, None), |negotiation| {
        let shape = super::Shape {
            status: response.status,
            head: parts.method == http::Method::HEAD,
            bodiless: response.framing == Framing::Empty,
            length,
        };
        negotiation
            .coding(shape, |name| response.header_list(name))
            .start()
    });
    if compression.is_some() {
        builder = builder.extension(Chosen(coding));
    }
    // The length the backend announced, as an HTTP/1.1 client gets it: a download's size, and
    // on a HEAD response the field a GET would have had (RFC 9110 section 9.3.2). Not when the
    // body is (or a GET's would be) re-encoded, which changes it.
    if coding.token().is_none()
        && let Some(length) = response
            .declared_length()
            .and_then(|v| HeaderValue::from_bytes(v).ok())
    {
        builder = builder.header(http::header::CONTENT_LENGTH, length);
    }
    let body = if response.framing == Framing::Empty {
        pool.report_body(guard.state(), response.status, false);
        drop(guard);
        if !response.close {
            proxy.upstream.checkin(conn, pool.keepalive);
        }
        ResponseBody::Empty
    } else {
        let (relay, body) = Relay::new(pool.response_timeout);
        let upstream = Arc::clone(&proxy.upstream);
        let idle = pool.response_timeout;
        let reusable = !response.close && pool.send_proxy_protocol.is_none();
        let keepalive = pool.keepalive;
        let framing = response.framing;
        let verdict = Verdict {
            pool: Arc::clone(pool),
            status: response.status,
        };
        tokio::spawn(async move {
            // The request stays in flight on its backend until the body is through.
            let guard = guard;
            let mut conn = conn;
            let pumped = tokio::select! {
                pumped = pump_body(&mut conn, framing, &relay, idle, encoder) => pumped,
                () = closer.cancelled() => Err(BodyError::Stopped),
                // A client that resets its stream while the backend is quiet (a stream of
                // events between two events) lets go of the backend at once.
                () = relay.tx.closed() => Err(BodyError::Write(gone())),
            };
            // A client whose stream went away first left, whatever the backend did after.
            verdict.give(
                guard.state(),
                pumped
                    .as_ref()
                    .is_err_and(|e| e.source_failed() && !relay.tx.is_closed()),
            );
            match pumped {
                Ok(()) => {
                    relay.finish();
                    if reusable {
                        upstream.checkin(conn, keepalive);
                    }
                }
                // The client's stream ends in an error, as the relay was not finished.
                Err(error) => {
                    debug!(%error, "response body relay ended early");
                    relay.fail(match &error {
                        BodyError::Write(error) => Relay::send_failed(error),
                        error => error.end(),
                    });
                }
            }
        });
        body
    };
    builder.body(body).unwrap_or_else(|_| status_response(502))
}

/// Forwards one stream to an HTTP/2 backend: headers re-built (connection-specific ones
/// dropped, `te: trailers` kept as gRPC requires, forwarding fields added), body and trailers
/// passed through both ways. A failed connect moves on to another backend; so, with the pool's
/// `retry`, do an answer or a timeout it lists, for an idempotent request without a body (once
/// sent, a body is gone).
#[allow(clippy::too_many_arguments)]
async fn forward_h2(
    proxy: &HttpProxy,
    pool: &Arc<Pool>,
    input: PickInput,
    parts: http::request::Parts,
    body: Incoming,
    request_id: &[u8],
    host: Option<Vec<u8>>,
    compression: Option<&Negotiation<'_>>,
    trace: &mut super::Trace,
) -> Response<ResponseBody> {
    let is_head = parts.method == http::Method::HEAD;
    // The forwarding fields are already among the request's fields.
    let mut headers = HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        if name == http::header::CONTENT_LENGTH || !is_hop_or_framing(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if te_trailers(parts.headers.get_all(http::header::TE)) {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    let authority = host
        .as_deref()
        .and_then(|h| std::str::from_utf8(h).ok())
        .unwrap_or("backend");
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("http://{authority}{path}").parse::<http::Uri>() else {
        return status_response(400);
    };

    // Answers and timeouts are retried only for a request that can be sent again as it was:
    // idempotent and without a body (gRPC calls are POSTs, so they never are).
    let retry = pool
        .config()
        .retry
        .as_ref()
        .filter(|_| body.is_end_stream() && idempotent(&parts.method));
    let mut body = Some(body);
    let mut attempts = Attempts::for_request(pool, input);
    let mut passed: Option<H2Answer> = None;
    let outcome: Result<H2Answer, u16> = async {
        let passed = &mut passed;
        loop {
            let (lease, picked) = h2_sender(&proxy.h2_upstream, pool, &mut attempts, trace).await?;
            let set_cookie = super::persist::sticky_cookie(pool, &input, picked.index);
            let guard = picked.guard;
            let closer = picked.closer;
            let state = Arc::clone(guard.state());
            let addr = state.addr;
            trace.attempts = attempts.count();
            trace.backend = Some(addr);
            let started = tokio::time::Instant::now();
            let watch = Arc::new(BodyWatch::default());
            // A request without a body may be sent again if the backend never got it.
            let mut request = Request::new(match body.take() {
                Some(body) if !body.is_end_stream() => UpstreamBody::Incoming(
                    body,
                    Arc::clone(&watch),
                    Limit::new(proxy.max_body_size),
                ),
                _ => UpstreamBody::Empty,
            });
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = uri.clone();
            *request.version_mut() = http::Version::HTTP_2;
            *request.headers_mut() = headers.clone();
            let sent = proxy.h2_upstream.send(&lease, addr, pool, request);
            tokio::pin!(sent);
            // The response timeout runs from the request body's last progress, as on HTTP/1.1
            // where it starts once the body is sent: a client stream (gRPC client streaming) may
            // well outlast it. A body that makes no progress (a backend that does not take it,
            // a stream waiting for a free slot on the backend's connection, a client that
            // stopped sending) leaves it running; which side it was waiting on decides whose
            // failure the timeout is.
            let sent = loop {
                tokio::select! {
                    sent = &mut sent => break Ok(sent),
                    () = watch.progress.notified() => {}
                    () = tokio::time::sleep(pool.response_timeout) => break Err(()),
                    () = closer.cancelled() => {
                        debug!(backend = %addr, "no response before the backend's drain deadline");
                        return Err(504);
                    }
                }
            };
            let response = match sent {
                // The h2 crate takes any three digits; RFC 9110 section 15 makes a status over
                // 599 invalid, as `h1::parse_response` holds it to be.
                Ok(Ok(response)) if response.status().as_u16() > 599 => {
                    debug!(backend = %addr, status = response.status().as_u16(), "http/2 backend answered an invalid status");
                    pool.report(&state, false);
                    return Err(502);
                }
                Ok(Ok(response)) => response,
                // The client's fault, not the backend's: its stream there was reset.
                Ok(Err(_)) if watch.too_large.load(Ordering::Relaxed) => return Err(413),
                Ok(Err(_)) if watch.client_failed.load(Ordering::Relaxed) => return Err(400),
                // The client's body stalled (a client stream that stopped sending): as on
                // HTTP/1.1, its stream is given up on, and nothing is held against the backend
                // or its connection, which other streams share.
                Err(()) if watch.awaiting_client.load(Ordering::Relaxed) => {
                    debug!(backend = %addr, "the client's request body stalled");
                    return Err(408);
                }
                Ok(Err(error)) => {
                    debug!(backend = %addr, %error, "http/2 backend request failed");
                    proxy.h2_upstream.failed(addr, pool, &lease, &error);
                    pool.report(&state, false);
                    return Err(502);
                }
                // Only this stream is given up on (dropped, hyper resets it with CANCEL): the
                // others on the connection are still answered, and a connection that died
                // unnoticed is found out by its pings.
                Err(_) => {
                    pool.report(&state, false);
                    if retry.is_some_and(|r| r.timeout) {
                        debug!(backend = %addr, "response timeout, retried on another backend");
                        continue;
                    }
                    return Err(504);
                }
            };
            guard.established();
            let elapsed = started.elapsed();
            let status = response.status().as_u16();
            trace.upstream = Some(elapsed);
            state.observe_latency(elapsed);
            state.response_time.observe(elapsed);
            state.count_response(status);
            // Counted against the backend that gave it, retried or not: a 5xx now, anything
            // else once its body is through.
            pool.report_head(&state, status);
            let answer = H2Answer {
                response,
                guard,
                closer,
                set_cookie,
                upstream: elapsed,
            };
            if retry.is_some_and(|r| r.retries_status(status)) {
                debug!(backend = %addr, status, "answer retried on another backend");
                // Its body is not relayed unless no later backend answers: its head is all
                // there is to judge it by.
                pool.report_body(&state, status, false);
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
        guard,
        closer,
        set_cookie,
        upstream,
    } = match (outcome, passed) {
        (Ok(answer), _) => answer,
        // The backends after it failed without an answer, or none could be had: a backend's
        // own answer tells the client more than a status of the proxy's.
        (Err(status), Some(answer)) if status >= 500 => {
            trace.backend = Some(answer.guard.state().addr);
            answer
        }
        (Err(status), _) => return status_response(status),
    };
    trace.upstream = Some(upstream);
    let (parts, body) = response.into_parts();
    let status = parts.status.as_u16();
    let mut builder = Response::builder().status(parts.status);
    for (name, value) in &parts.headers {
        // A 204 has no Content-Length (RFC 9110 section 8.6), as on the HTTP/1.1 paths.
        if !is_connection_specific(name) || (name == http::header::CONTENT_LENGTH && status != 204)
        {
            builder = builder.header(name, value);
        }
    }
    if let Ok(id) = HeaderValue::from_bytes(request_id) {
        builder = builder.header("x-request-id", id);
    }
    if let Some(cookie) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        builder = builder.header(http::header::SET_COOKIE, cookie);
    }
    let length = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A response without content (RFC 9110 section 6.4.1) gets none, whatever the backend
    // sends after its head, as on the HTTP/1.1 paths.
    let no_content = is_head || status == 204 || status == 304;
    let bodiless = no_content || body.is_end_stream();
    let (coding, encoder) = compression.map_or((Coding::Identity, None), |negotiation| {
        let shape = super::Shape {
            status,
            head: is_head,
            bodiless,
            length,
        };
        negotiation
            .coding(shape, |name| {
                h1::join_lines(
                    parts
                        .headers
                        .get_all(name)
                        .iter()
                        .map(HeaderValue::as_bytes),
                )
            })
            .start()
    });
    if compression.is_some() {
        builder = builder.extension(Chosen(coding));
    }
    // An empty body (a trailers-only gRPC answer, say) ends the stream with the head, as the
    // backend sent it. The backend's stream of a response without content is dropped (reset)
    // if it goes on.
    let body = if bodiless {
        pool.report_body(guard.state(), status, false);
        drop(guard);
        ResponseBody::Empty
    } else {
        let (relay, relayed) = Relay::new(pool.response_timeout);
        let verdict = Verdict {
            pool: Arc::clone(pool),
            status,
        };
        tokio::spawn(relay_upstream(body, relay, guard, closer, verdict));
        relayed
    };
    let body = match encoder {
        Some(encoder) => ResponseBody::Compressed(Box::new(Compressing {
            body,
            encoder: Some(encoder),
            trailers: None,
        })),
        None => body,
    };
    builder.body(body).unwrap_or_else(|_| status_response(502))
}

/// A response head from an HTTP/2 backend, and what its stream holds until it is answered.
struct H2Answer {
    response: Response<Incoming>,
    /// The backend's slot.
    guard: ActiveGuard,
    /// Cancelled at the backend's drain deadline.
    closer: tokio_util::sync::CancellationToken,
    /// The sticky cookie naming its backend, when it is to be set.
    set_cookie: Option<String>,
    /// The time to its head.
    upstream: Duration,
}

/// Whether a request with `method` may be repeated (RFC 9110 section 9.2.2).
fn idempotent(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::TRACE
            | http::Method::PUT
            | http::Method::DELETE
    )
}

/// Picks a backend of an HTTP/2 pool and its shared connection, moving on to the next backend
/// when one cannot be reached; `attempts` keeps what was tried (for the access log, the retry
/// counter, and the pool's `retry`, which goes on from there).
pub(super) async fn h2_sender<'p>(
    upstream: &super::h2_upstream::H2Pool,
    pool: &'p Pool,
    attempts: &mut Attempts<'p>,
    trace: &mut super::Trace,
) -> Result<(Lease, Picked<'p>), u16> {
    loop {
        let picked = match attempts.next().await {
            Ok(picked) => picked,
            Err(NoBackend::Exhausted) => return Err(502),
            Err(_) => return Err(503),
        };
        let state = &picked.candidate.state;
        // Each backend tried counts, the ones that could not be reached too, as on HTTP/1.1.
        trace.attempts = attempts.count();
        trace.backend = Some(state.addr);
        match upstream.sender(state.addr, pool).await {
            Ok(lease) => return Ok((lease, picked)),
            // This process is out of descriptors or memory: no fault of the backend's, and no
            // other backend would fare better (as on HTTP/1.1).
            Err(error) if crate::listener::is_resource_exhaustion(&error) => {
                debug!(backend = %state.addr, %error, "no socket for a backend connection");
                return Err(503);
            }
            Err(error) => {
                state
                    .connect_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                pool.report(state, false);
                debug!(backend = %state.addr, %error, "http/2 backend unavailable");
            }
        }
    }
}

/// Picks a backend, sends the head and the client's body, and reads the response head.
/// Connect failures move on to the next backend; so, with the pool's `retry`, do an answer or
/// a response timeout it lists, for an idempotent request without a body. Anything else after
/// the request was sent is a 502 (or 504 on the response timeout), unless an answer passed
/// over is at hand, which the client gets instead.
#[allow(clippy::too_many_arguments)]
async fn exchange<'p>(
    proxy: &HttpProxy,
    pool: &'p Pool,
    input: PickInput,
    source: SocketAddr,
    // The address the client connected to, for the pool's PROXY headers.
    destination: SocketAddr,
    head: &[u8],
    mut body: Incoming,
    framing: Framing,
    method: &http::Method,
    trace: &mut super::Trace,
) -> Result<(UpstreamConn, ResponseHead, Picked<'p>), u16> {
    let is_head = method == http::Method::HEAD;
    let retryable = framing == Framing::Empty && idempotent(method);
    let retry = pool.config().retry.as_ref().filter(|_| retryable);
    let mut attempts = Attempts::for_request(pool, input);
    let mut passed: Option<(UpstreamConn, ResponseHead, Picked<'p>, Duration)> = None;
    let outcome = async {
        let passed = &mut passed;
        loop {
            let (mut conn, picked) = loop {
                let picked = match attempts.next().await {
                    Ok(picked) => picked,
                    Err(NoBackend::Exhausted) => return Err(502),
                    Err(_) => return Err(503),
                };
                let state = &picked.candidate.state;
                // Each backend tried counts, the ones that could not be reached too, as on
                // HTTP/1.1.
                trace.attempts = attempts.count();
                trace.backend = Some(state.addr);
                if pool.send_proxy_protocol.is_none()
                    && let Some(conn) = proxy
                        .upstream
                        .checkout(pool.conn_key(state.addr), pool.keepalive)
                {
                    break (conn, picked);
                }
                match connect(pool, state.addr, source, destination).await {
                    Ok(conn) => break (conn, picked),
                    // This process is out of descriptors or memory: no fault of the backend's,
                    // and no other backend would fare better (as on HTTP/1.1).
                    Err(error) if crate::listener::is_resource_exhaustion(&error) => {
                        debug!(backend = %state.addr, %error, "no socket for a backend connection");
                        return Err(503);
                    }
                    Err(_) => {
                        state
                            .connect_failures
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        pool.report(state, false);
                    }
                }
            };
            let state = Arc::clone(&picked.candidate.state);
            trace.attempts = attempts.count();
            trace.backend = Some(state.addr);
            // A pooled connection the backend closed while it sat idle fails before any
            // response: a bodiless idempotent request then gets one fresh connection to the
            // same backend.
            loop {
                let reused = conn.reused;
                let started = tokio::time::Instant::now();
                let attempt =
                    send_and_read(proxy, pool, &mut conn, head, &mut body, framing, is_head);
                let attempt = tokio::select! {
                    attempt = attempt => attempt,
                    () = picked.closer.cancelled() => Err(Attempt::Client(504)),
                };
                match attempt {
                    Ok(response) => {
                        picked.guard.established();
                        let elapsed = started.elapsed();
                        trace.upstream = Some(elapsed);
                        state.observe_latency(elapsed);
                        state.response_time.observe(elapsed);
                        state.count_response(response.status);
                        // Counted against the backend that gave it, retried or not: a 5xx
                        // now, anything else once its body is through.
                        pool.report_head(&state, response.status);
                        if retry.is_some_and(|r| r.retries_status(response.status)) {
                            debug!(backend = %state.addr, status = response.status, "answer retried on another backend");
                            // Its body is not relayed unless no later backend answers: its
                            // head is all there is to judge it by.
                            pool.report_body(&state, response.status, false);
                            // The one passed over before is closed: its body is not read.
                            *passed = Some((conn, response, picked, elapsed));
                            attempts.hold_answer();
                            break;
                        }
                        return Ok((conn, response, picked));
                    }
                    // An idle connection the backend closed says nothing of its health.
                    Err(Attempt::Stale) if reused && retryable => {
                        conn = match connect(pool, conn.addr, source, destination).await {
                            Ok(conn) => conn,
                            Err(error) if crate::listener::is_resource_exhaustion(&error) => {
                                debug!(backend = %state.addr, %error, "no socket for a backend connection");
                                return Err(503);
                            }
                            Err(_) => {
                                state
                                    .connect_failures
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                pool.report(&state, false);
                                return Err(502);
                            }
                        };
                    }
                    Err(Attempt::Stale) => {
                        if !reused {
                            pool.report(&state, false);
                        }
                        // A fresh connection that failed before any answer: a bodiless
                        // idempotent request goes on to another backend, as on HTTP/1.1.
                        if retryable {
                            break;
                        }
                        return Err(502);
                    }
                    Err(Attempt::Status(status)) => {
                        pool.report(&state, false);
                        if status == TIMED_OUT && retry.is_some_and(|r| r.timeout) {
                            debug!(backend = %state.addr, "response timeout, retried on another backend");
                            break;
                        }
                        return Err(status);
                    }
                    Err(Attempt::Client(status)) => return Err(status),
                }
            }
        }
    }
    .await;
    match (outcome, passed) {
        (Ok(answer), _) => Ok(answer),
        // The backends after it failed without an answer, or none could be had: a backend's
        // own answer tells the client more than a status of the proxy's.
        (Err(status), Some((conn, response, picked, upstream))) if status >= 500 => {
            trace.backend = Some(picked.candidate.state.addr);
            trace.upstream = Some(upstream);
            Ok((conn, response, picked))
        }
        (Err(status), _) => Err(status),
    }
}

/// The status of an attempt whose response head did not come within `response_timeout`.
const TIMED_OUT: u16 = 504;

/// How one attempt on one backend connection failed.
enum Attempt {
    /// The connection failed before any byte of a response.
    Stale,
    /// The backend failed: answer the client with this status.
    Status(u16),
    /// The client failed (its body stalled, broke or grew too large): answer with this status,
    /// and hold nothing against the backend.
    Client(u16),
}

/// Opens a connection to a backend (with the pool's PROXY header and TLS, if any).
async fn connect(
    pool: &Pool,
    addr: SocketAddr,
    source: SocketAddr,
    destination: SocketAddr,
) -> io::Result<UpstreamConn> {
    super::connect_backend(addr, pool, source, destination).await
}

/// Sends the head and the body (frame by frame, re-framed), then reads the response head.
async fn send_and_read(
    proxy: &HttpProxy,
    pool: &Pool,
    conn: &mut UpstreamConn,
    head: &[u8],
    body: &mut Incoming,
    framing: Framing,
    is_head: bool,
) -> Result<ResponseHead, Attempt> {
    let idle = pool.response_timeout;
    super::write_within(&mut conn.stream, head, idle)
        .await
        .map_err(|_| Attempt::Stale)?;
    let mut sent = 0u64;
    loop {
        let frame = match timeout(idle, http_body_util::BodyExt::frame(body)).await {
            Ok(Some(frame)) => frame,
            Ok(None) if body.is_end_stream() => break,
            // The client reset its stream with NO_ERROR, which hyper passes off as the body's
            // end: the backend must not get the last chunk of a body that was cut.
            Ok(None) => return Err(Attempt::Client(400)),
            Err(_) => return Err(Attempt::Client(408)),
        };
        let Ok(frame) = frame else {
            return Err(Attempt::Client(400));
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        sent += data.len() as u64;
        if proxy.max_body_size.is_some_and(|max| sent > max) {
            return Err(Attempt::Client(413));
        }
        let mut out = BytesMut::with_capacity(data.len() + 16);
        match framing {
            Framing::Chunked => h1::encode_chunk(&mut out, &data),
            _ => out.extend_from_slice(&data),
        }
        if super::write_within(&mut conn.stream, &out, idle)
            .await
            .is_err()
        {
            return early_answer(conn, is_head, idle).await;
        }
    }
    match framing {
        Framing::Chunked => {
            let ended = super::write_within(&mut conn.stream, b"0\r\n\r\n", idle).await;
            if ended.is_err() {
                return early_answer(conn, is_head, idle).await;
            }
        }
        Framing::Length(n) if sent != n => return Err(Attempt::Client(400)),
        _ => {}
    }
    read_head(conn, is_head, tokio::time::Instant::now() + idle).await
}

/// The answer of a backend that stopped taking the request body: it may have answered before
/// reading it all (a 413, a 401), and that answer is what the client gets, as it would without
/// a proxy (and as an HTTP/1.1 client does), not a 502 that blames the backend. The connection
/// is not used again: the backend never read the rest of the body.
async fn early_answer(
    conn: &mut UpstreamConn,
    is_head: bool,
    idle: std::time::Duration,
) -> Result<ResponseHead, Attempt> {
    match read_head(conn, is_head, tokio::time::Instant::now() + idle).await {
        Ok(mut response) => {
            debug!(
                status = response.status,
                "the backend answered before taking the whole request body"
            );
            response.close = true;
            Ok(response)
        }
        Err(Attempt::Client(status)) => Err(Attempt::Client(status)),
        // Without an answer, the failed write is the backend's failure.
        Err(_) => Err(Attempt::Status(502)),
    }
}

/// Reads a response head from `conn` by `deadline`, passing over interim responses (HTTP/2
/// clients are not sent them). A 101 is a failure: no upgrade was asked for, and the connection
/// now speaks a protocol the proxy does not, in which no response head will ever come.
async fn read_head(
    conn: &mut UpstreamConn,
    is_head: bool,
    deadline: tokio::time::Instant,
) -> Result<ResponseHead, Attempt> {
    loop {
        if !conn.buf.is_empty() {
            match h1::parse_response(&mut conn.buf, is_head) {
                Ok(Some(response)) if response.status == 101 => {
                    debug!("a 101 to a request that asked for no upgrade");
                    return Err(Attempt::Status(502));
                }
                Ok(Some(response)) if (100..200).contains(&response.status) => continue,
                Ok(Some(response)) => return Ok(response),
                Ok(None) => {}
                Err(_) => return Err(Attempt::Status(502)),
            }
        }
        let before_response = conn.buf.is_empty();
        conn.buf.reserve(16 * 1024);
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        match timeout(wait, conn.stream.read_buf(&mut conn.buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) if before_response => return Err(Attempt::Stale),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(Attempt::Status(502)),
            Ok(Ok(_)) => {}
            Err(_) => return Err(Attempt::Status(TIMED_OUT)),
        }
    }
}

/// Streams a response body from the backend to the channel, as HTTP/2 data frames (and
/// trailers, when a chunked body ends with some).
async fn pump_body(
    conn: &mut UpstreamConn,
    framing: Framing,
    tx: &Relay,
    idle: std::time::Duration,
    mut encoder: Option<super::compress::Encoder>,
) -> Result<(), BodyError> {
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut decoder = ChunkedDecoder::default();
    loop {
        let finished = match framing {
            Framing::Empty => true,
            Framing::Length(_) => {
                let take = (conn.buf.len() as u64).min(left) as usize;
                if take > 0 {
                    let data = conn.buf.split_to(take).freeze();
                    send_data(tx, data, &mut encoder).await?;
                }
                left -= take as u64;
                left == 0
            }
            Framing::UntilClose => {
                if !conn.buf.is_empty() {
                    let data = conn.buf.split().freeze();
                    send_data(tx, data, &mut encoder).await?;
                }
                false
            }
            Framing::Chunked => {
                let mut pos = 0;
                let mut ended = false;
                let mut pieces = Vec::new();
                loop {
                    match decoder
                        .decode(&conn.buf, &mut pos)
                        .map_err(|_| BodyError::Malformed)?
                    {
                        Decoded::Data(range) => pieces.push(range),
                        Decoded::End(_) => {
                            ended = true;
                            break;
                        }
                        Decoded::NeedMore => break,
                    }
                }
                let consumed = conn.buf.split_to(pos).freeze();
                for range in pieces {
                    send_data(tx, consumed.slice(range), &mut encoder).await?;
                }
                ended
            }
        };
        let eof = if finished {
            true
        } else {
            conn.buf.reserve(BODY_CHUNK);
            match timeout(idle, conn.stream.read_buf(&mut conn.buf)).await {
                Ok(Ok(0)) if framing == Framing::UntilClose => true,
                Ok(Ok(0)) => return Err(BodyError::Read(io::ErrorKind::UnexpectedEof.into())),
                Ok(Ok(_)) => false,
                Ok(Err(error)) => return Err(BodyError::Read(error)),
                Err(_) => return Err(BodyError::Timeout),
            }
        };
        if eof {
            // The end of a compressed stream goes before any trailers.
            if let Some(encoder) = encoder.take() {
                let rest = encoder.finish().map_err(BodyError::Compress)?;
                if !rest.is_empty() {
                    tx.send(Frame::data(Bytes::from(rest)))
                        .await
                        .map_err(BodyError::Write)?;
                }
            }
            if !decoder.trailers.is_empty() {
                let trailers = parse_trailers(&decoder.trailers);
                tx.send(Frame::trailers(trailers))
                    .await
                    .map_err(BodyError::Write)?;
            }
            return Ok(());
        }
    }
}

/// The error for a client stream that went away while its body was being sent.
fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "client stream closed")
}

/// Sends body bytes as a data frame, compressed first if there is an encoder.
async fn send_data(
    tx: &Relay,
    data: Bytes,
    encoder: &mut Option<super::compress::Encoder>,
) -> Result<(), BodyError> {
    let data = match encoder {
        Some(encoder) => Bytes::from(encoder.push(&data).map_err(BodyError::Compress)?),
        None => data,
    };
    if data.is_empty() {
        return Ok(());
    }
    tx.send(Frame::data(data)).await.map_err(BodyError::Write)
}

/// The trailer section of a chunked body as header fields. Invalid lines are dropped, and so
/// are connection-specific and framing fields: HTTP/2 has none (RFC 9113 section 8.2.2), and a
/// trailer section that carried one would fail the whole stream of a complete message; and so
/// are the forwarding fields, which only the proxy writes (`ChunkedDecoder::forwardable_trailers`).
pub(super) fn parse_trailers(raw: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in raw.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) && !is_hop_or_framing(&name)
            && !is_forwarding_field(&name)
        {
            map.append(name, value);
        }
    }
    map
}

/// A stream that first gives back bytes already read from it.
struct Rewind {
    prefix: Bytes,
    inner: Stream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
