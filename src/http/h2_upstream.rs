//! HTTP/2 to backends (`upstream_protocol = "h2"`, h2c with prior knowledge), for gRPC and other
//! services that need HTTP/2 end to end.
//!
//! One multiplexed connection per backend address is kept and shared by every request of the
//! process; a closed or failed one is replaced on the next request, and a request that a
//! connection did not take (the backend had sent a GOAWAY, or closed it, since it was last used)
//! goes on a fresh one. Request and response bodies pass through as HTTP/2 frames, trailers
//! included, so gRPC's `grpc-status` arrives intact.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::debug;

use super::upstream::ConnKey;
use crate::pool::Pool;
use crate::stream::Stream;

/// The body of a request sent to an HTTP/2 backend.
pub enum UpstreamBody {
    /// No body.
    Empty,
    /// An HTTP/2 client's body, passed on frame by frame (trailers too), watched and held to
    /// `max_body_size`.
    Incoming(Incoming, Arc<BodyWatch>, Limit),
    /// An HTTP/1.1 client's body, decoded from its framing by the connection's task (see
    /// [`body_channel`]).
    Channel(tokio::sync::mpsc::Receiver<Frame<Bytes>>, Arc<AtomicBool>),
}

/// The sending end of an HTTP/1.1 client's body on its way to an HTTP/2 backend.
pub struct BodySender {
    tx: tokio::sync::mpsc::Sender<Frame<Bytes>>,
    /// Set by [`BodySender::finish`]: without it, the channel's end is a failure.
    whole: Arc<AtomicBool>,
}

impl BodySender {
    /// Sends one frame; `false` once the body is not taken any more (its stream at the backend
    /// ended or was reset, and the HTTP/2 connection dropped the body).
    pub async fn send(&self, frame: Frame<Bytes>) -> bool {
        self.tx.send(frame).await.is_ok()
    }

    /// Ends the body: the backend's stream gets its END_STREAM.
    pub fn finish(self) {
        self.whole.store(true, Ordering::Release);
    }
}

/// A channel for an HTTP/1.1 client's body: the connection's task sends the frames it decodes
/// and the HTTP/2 connection takes them. A sender dropped without [`BodySender::finish`] (the
/// client went away half-way, its framing was broken) fails the body, which resets the
/// backend's stream: an end of stream there would pass a truncated body for a complete one.
pub fn body_channel() -> (BodySender, UpstreamBody) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let whole = Arc::new(AtomicBool::new(false));
    (
        BodySender {
            tx,
            whole: Arc::clone(&whole),
        },
        UpstreamBody::Channel(rx, whole),
    )
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Incoming(body, watch, limit) => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                watch
                    .awaiting_client
                    .store(polled.is_pending(), Ordering::Relaxed);
                if polled.is_ready() {
                    watch.progress.notify_one();
                }
                if let Poll::Ready(Some(Err(_))) = &polled {
                    watch.client_failed.store(true, Ordering::Relaxed);
                }
                // hyper ends a body cleanly when its stream is reset with NO_ERROR: a client
                // stream that saw no END_STREAM was cut, and so is the backend's.
                if let Poll::Ready(None) = &polled
                    && !body.is_end_stream()
                {
                    watch.client_failed.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client's stream was reset before its body's end",
                    ))));
                }
                if let Poll::Ready(Some(Ok(frame))) = &polled
                    && let Some(data) = frame.data_ref()
                    && !limit.take(data.len())
                {
                    watch.client_failed.store(true, Ordering::Relaxed);
                    watch.too_large.store(true, Ordering::Relaxed);
                    // The error resets the backend's stream.
                    return Poll::Ready(Some(Err(io::Error::other(
                        "the request body grew past max_body_size",
                    ))));
                }
                // The client's trailers lose the fields only the proxy writes, as on every
                // other path (`h1::ChunkedDecoder::forwardable_trailers`).
                polled.map(|frame| {
                    frame.map(|f| {
                        f.map_err(io::Error::other)
                            .map(|frame| match frame.into_trailers() {
                                Ok(mut trailers) => {
                                    let forged: Vec<_> = trailers
                                        .keys()
                                        .filter(|n| super::h2::is_forwarding_field(n))
                                        .cloned()
                                        .collect();
                                    for name in forged {
                                        trailers.remove(name);
                                    }
                                    Frame::trailers(trailers)
                                }
                                Err(frame) => frame,
                            })
                    })
                })
            }
            UpstreamBody::Channel(rx, whole) => match rx.poll_recv(cx) {
                Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(None) if whole.load(Ordering::Acquire) => Poll::Ready(None),
                Poll::Ready(None) => Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client's body ended short",
                )))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Incoming(body, _, _) => body.is_end_stream(),
            UpstreamBody::Channel(..) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Incoming(body, _, _) => body.size_hint(),
            UpstreamBody::Channel(..) => SizeHint::default(),
        }
    }
}

/// An HTTP/2 backend's response body, some of whose first frames may have been taken already
/// (while the request body was still being sent), and are given back first. A body whose
/// stream was reset before its END_STREAM fails, even when the reset said NO_ERROR (hyper ends
/// such a body cleanly: RFC 9113 allows that code only after a complete response).
pub struct Prefetched {
    taken: VecDeque<io::Result<Frame<Bytes>>>,
    /// Bytes of data in `taken`.
    bytes: usize,
    /// The body ended (or failed) within `taken`.
    ended: bool,
    rest: Incoming,
}

impl Prefetched {
    /// At most this much of a body is taken ahead.
    const AHEAD: usize = 64 * 1024;

    pub fn new(body: Incoming) -> Prefetched {
        Prefetched {
            taken: VecDeque::new(),
            bytes: 0,
            ended: false,
            rest: body,
        }
    }

    /// Whether the whole body, its end included, has been taken.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Whether [`Prefetched::prefetch`] may take more: the body goes on and not too much of it
    /// is held.
    pub fn wants_more(&self) -> bool {
        !self.ended && self.bytes < Self::AHEAD
    }

    /// Takes the body's next frame and keeps it. Cancel-safe: a frame is kept once taken.
    pub async fn prefetch(&mut self) {
        let frame = std::future::poll_fn(|cx| Self::poll_rest(&mut self.rest, cx)).await;
        match frame {
            Some(Ok(frame)) => {
                self.bytes += frame.data_ref().map_or(0, Bytes::len);
                self.ended = frame.is_trailers() || self.rest.is_end_stream();
                self.taken.push_back(Ok(frame));
            }
            Some(Err(error)) => {
                self.ended = true;
                self.taken.push_back(Err(error));
            }
            None => self.ended = true,
        }
    }

    /// The next frame of the backend's body, failing a body that was cut by a reset.
    fn poll_rest(
        rest: &mut Incoming,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        match std::task::ready!(Pin::new(&mut *rest).poll_frame(cx)) {
            Some(frame) => Poll::Ready(Some(frame.map_err(io::Error::other))),
            None if rest.is_end_stream() => Poll::Ready(None),
            None => Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the backend reset its stream before the body's end",
            )))),
        }
    }
}

impl Body for Prefetched {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = self.get_mut();
        if let Some(frame) = this.taken.pop_front() {
            return Poll::Ready(Some(frame));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        Self::poll_rest(&mut this.rest, cx)
    }

    fn is_end_stream(&self) -> bool {
        self.taken.is_empty() && (self.ended || self.rest.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.taken.is_empty() {
            self.rest.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

/// What the stream's task learns of an HTTP/2 client's body as it goes to the backend.
#[derive(Default)]
pub struct BodyWatch {
    /// Told of every frame taken and of the end: the response timeout counts from the body's
    /// last progress, so a client stream that outlasts it is not cut while it still sends.
    pub progress: Notify,
    /// Set when the body grew past `max_body_size`: the client gets a 413, and the backend is
    /// not blamed for the reset of its stream.
    pub too_large: AtomicBool,
    /// Set when the body failed on the client's side (it reset its stream, or grew too large):
    /// the backend's stream was reset for it, which is not the backend's failure.
    pub client_failed: AtomicBool,
    /// Whether the body was last found waiting for the client: a response timeout that runs
    /// out then is the client's stall (a 408, as on the other paths), not the backend's.
    pub awaiting_client: AtomicBool,
}

/// The bytes a request body may still have under `max_body_size` (`None`: no limit).
pub struct Limit(Option<u64>);

impl Limit {
    /// The limit for a whole body of at most `max` bytes.
    pub fn new(max: Option<u64>) -> Limit {
        Limit(max)
    }

    /// Counts `n` more bytes; `false` once the body is over the limit.
    fn take(&mut self, n: usize) -> bool {
        match &mut self.0 {
            None => true,
            Some(left) => match left.checked_sub(n as u64) {
                Some(rest) => {
                    *left = rest;
                    true
                }
                None => false,
            },
        }
    }
}

/// The shared HTTP/2 connections to backends, one per address.
#[derive(Default)]
pub struct H2Pool {
    /// Per backend, its connection once open, or the connect in progress: requests that find
    /// none wait for the same connect instead of each opening a connection of its own (a burst
    /// of requests at start, or after a backend came back, would otherwise open one each).
    senders: Mutex<HashMap<ConnKey, Slot>>,
}

/// A backend's connection: set once by whichever request connects, awaited by the others. A
/// connect whose request went away before it finished is taken over by the next request.
type Slot = Arc<tokio::sync::OnceCell<Result<SendRequest<UpstreamBody>, Failed>>>;

/// Why a connect failed, for every request that waited on it (`io::Error` is not `Clone`). The
/// system's error number is kept: running out of descriptors must still read as such (see
/// `listener::is_resource_exhaustion`).
#[derive(Clone, Debug)]
struct Failed(io::ErrorKind, String, Option<i32>);

impl Failed {
    fn of(error: &io::Error) -> Failed {
        Failed(error.kind(), error.to_string(), error.raw_os_error())
    }

    fn to_error(&self) -> io::Error {
        match self.2 {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(self.0, self.1.clone()),
        }
    }
}

/// A request's hold on a backend's shared connection, which also says which connection it is:
/// a request that fails forgets that connection, not a newer one that another request opened
/// in the meantime (which would leave that one out of the pool, still open, and have the next
/// request open yet another).
pub struct Lease {
    held: Mutex<(SendRequest<UpstreamBody>, Slot)>,
}

impl Lease {
    fn new(sender: SendRequest<UpstreamBody>, slot: Slot) -> Lease {
        Lease {
            held: Mutex::new((sender, slot)),
        }
    }

    fn sender(&self) -> SendRequest<UpstreamBody> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    fn slot(&self) -> Slot {
        Arc::clone(&self.held.lock().unwrap_or_else(|p| p.into_inner()).1)
    }
}

impl std::fmt::Debug for H2Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Pool").finish_non_exhaustive()
    }
}

impl H2Pool {
    /// A sender on the connection to backend `addr` of `pool`, opening one (within the pool's
    /// connect timeout, with its TLS settings) if there is none or the old one closed.
    pub async fn sender(&self, addr: SocketAddr, pool: &Pool) -> io::Result<Lease> {
        let key = pool.conn_key(addr);
        let slot = {
            let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
            match senders.get(&key).map(|slot| (slot.get(), slot)) {
                Some((Some(Ok(sender)), slot)) if !sender.is_closed() => {
                    return Ok(Lease::new(sender.clone(), Arc::clone(slot)));
                }
                // A connect in progress: wait for it.
                Some((None, slot)) => Arc::clone(slot),
                // None yet, or closed, or failed: start afresh.
                _ => {
                    let slot = Slot::default();
                    senders.insert(key, Arc::clone(&slot));
                    slot
                }
            }
        };
        let connected = slot
            .get_or_init(|| async {
                connect(addr, pool)
                    .await
                    .map_err(|error| Failed::of(&error))
            })
            .await;
        match connected {
            Ok(sender) => Ok(Lease::new(sender.clone(), Arc::clone(&slot))),
            Err(failed) => Err(failed.to_error()),
        }
    }

    /// Sends `request` to backend `addr` of `pool` on `lease`, its pooled connection. A request
    /// the backend never got goes once more, on a fresh connection to the same backend (which
    /// `lease` then holds):
    /// - one the connection did not take (hyper hands it back untouched). That is the case of
    ///   the first requests after the backend sent a GOAWAY (gracefully, while other streams
    ///   still run on the connection): the connection is still open, so it looked usable, but
    ///   takes no new stream. Of a burst of them, the first opens the fresh connection and the
    ///   others share it;
    /// - one without a body that the connection dropped before sending it (it waited for a
    ///   free stream when the backend went away), or that the backend refused
    ///   (REFUSED_STREAM: RFC 9113 section 8.7 says it was not processed). It is sent again
    ///   from a copy of its head.
    pub async fn send(
        &self,
        lease: &Lease,
        addr: SocketAddr,
        pool: &Pool,
        request: Request<UpstreamBody>,
    ) -> io::Result<Response<Incoming>> {
        // The head of a bodiless request, to send it again if the backend never got it.
        let again = matches!(request.body(), UpstreamBody::Empty).then(|| {
            let mut copy = Request::new(());
            *copy.method_mut() = request.method().clone();
            *copy.uri_mut() = request.uri().clone();
            *copy.version_mut() = request.version();
            *copy.headers_mut() = request.headers().clone();
            copy
        });
        let mut request = request;
        let mut sender = lease.sender();
        // Whether the connection is done with: the next try forgets it (if it is still the
        // pooled one) and goes on a fresh one.
        let mut done_with = false;
        for retry in [false, true, true] {
            if retry {
                if done_with {
                    self.forget(addr, pool, lease);
                }
                let renewed = self.sender(addr, pool).await?;
                sender = renewed.sender();
                *lease.held.lock().unwrap_or_else(|p| p.into_inner()) =
                    renewed.held.into_inner().unwrap_or_else(|p| p.into_inner());
            }
            // A closed connection fails `ready` with the request still in hand.
            if sender.ready().await.is_err() {
                done_with = true;
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut error) => match error.take_message() {
                    Some(returned) => {
                        debug!(backend = %addr, error = %error.error(), "http/2 backend connection did not take a request");
                        request = returned;
                        done_with = true;
                    }
                    None => {
                        let error = error.into_error();
                        let Some(head) = again.as_ref().filter(|_| never_sent(&error)) else {
                            return Err(io::Error::other(error));
                        };
                        debug!(backend = %addr, %error, "http/2 backend did not get a request");
                        request = head.clone().map(|()| UpstreamBody::Empty);
                        // Dropped unsent: the connection is gone. Refused: it may well take
                        // the request now (a backend's stream limit, say, which a new
                        // connection learns only from the backend's first SETTINGS).
                        done_with = error.is_user();
                    }
                },
            }
        }
        Err(io::Error::other(
            "the backend's connections did not take the request",
        ))
    }

    /// Takes note that a request sent on `lease` failed with `error` (as [`H2Pool::send`]
    /// returned it). Only a failure of the connection (an I/O error, a GOAWAY with an error,
    /// the connection closed) forgets it: a failure of the request's stream alone (the backend
    /// reset it) says nothing of the other streams on the connection, which other requests
    /// share, and a fresh connection would only cost the next requests a handshake.
    pub fn failed(&self, addr: SocketAddr, pool: &Pool, lease: &Lease, error: &io::Error) {
        if !stream_only(error) {
            self.forget(addr, pool, lease);
        }
    }

    /// Forgets `lease`'s connection to backend `addr` of `pool` after it failed a request, if it
    /// is still the pooled one: a newer connection, opened by another request since, stays.
    fn forget(&self, addr: SocketAddr, pool: &Pool, lease: &Lease) {
        let failed = lease.slot();
        let key = pool.conn_key(addr);
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        if senders
            .get(&key)
            .is_some_and(|pooled| Arc::ptr_eq(pooled, &failed))
        {
            senders.remove(&key);
        }
    }
}

/// Whether a failed request's error is its stream's alone: the stream was reset (by the
/// backend, or by hyper for it), and the connection goes on.
fn stream_only(error: &io::Error) -> bool {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<hyper::Error>())
        .and_then(std::error::Error::source)
        .and_then(|source| source.downcast_ref::<h2::Error>())
        .is_some_and(h2::Error::is_reset)
}

/// Whether a request that failed never reached the backend: hyper dropped it unsent (its
/// connection ended while it waited for a free stream), or the backend refused its stream.
fn never_sent(error: &hyper::Error) -> bool {
    error.is_user()
        || std::error::Error::source(error)
            .and_then(|source| source.downcast_ref::<h2::Error>())
            .is_some_and(|h2| {
                h2.is_reset() && h2.is_remote() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
            })
}

/// Opens a connection to backend `addr` of `pool` (within the pool's connect timeout, with its
/// TLS settings) and starts its task.
async fn connect(addr: SocketAddr, pool: &Pool) -> io::Result<SendRequest<UpstreamBody>> {
    let connect_timeout = pool.connect_timeout;
    let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
        Ok(result) => result?,
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timeout")),
    };
    tcp.set_nodelay(true)?;
    let stream = match &pool.tls {
        None => Stream::Plain(tcp),
        Some(tls) => {
            let stream = tls.connect(tcp, addr, connect_timeout).await?;
            if stream.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_H2) {
                return Err(io::Error::other(
                    "the backend did not agree to HTTP/2 through ALPN",
                ));
            }
            Stream::Tls(Box::new(stream.into()))
        }
    };
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(super::h2::PING_INTERVAL)
        .keep_alive_timeout(super::h2::PING_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(backend = %addr, %error, "http/2 backend connection ended");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_client_body_ends_the_backends_stream_only_once_finished() {
        // Finished: the frames, then the end.
        let (tx, mut body) = body_channel();
        assert!(tx.send(Frame::data(Bytes::from_static(b"whole"))).await);
        tx.finish();
        let frame = body.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), "whole");
        assert!(body.frame().await.is_none());

        // Dropped half-way (the client went away): the body fails, and the backend's stream is
        // reset rather than ended.
        let (tx, mut body) = body_channel();
        assert!(tx.send(Frame::data(Bytes::from_static(b"half"))).await);
        drop(tx);
        assert!(body.frame().await.expect("a frame").is_ok());
        let end = body.frame().await.expect("not a clean end");
        assert_eq!(
            end.expect_err("an error").kind(),
            io::ErrorKind::UnexpectedEof
        );

        // A body nobody takes any more says so to its sender.
        let (tx, body) = body_channel();
        drop(body);
        assert!(!tx.send(Frame::data(Bytes::from_static(b"late"))).await);
    }
}
