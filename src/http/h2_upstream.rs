//! HTTP/2 to backends (`upstream_protocol = "h2"`, h2c with prior knowledge), for gRPC and other
//! services that need HTTP/2 end to end.
//!
//! One multiplexed connection per backend address is kept and shared by every request of the
//! process; a closed or failed one is replaced on the next request, and a request that a
//! connection did not take (the backend had sent a GOAWAY, or closed it, since it was last used)
//! goes on a fresh one. Request and response bodies pass through as HTTP/2 frames, trailers
//! included, so gRPC's `grpc-status` arrives intact.

use std::collections::HashMap;
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
    /// An HTTP/1.1 client's body, decoded from its framing by the connection's task.
    Channel(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, io::Error>>),
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
                let polled = Pin::new(body).poll_frame(cx);
                if polled.is_ready() {
                    watch.progress.notify_one();
                }
                if let Poll::Ready(Some(Ok(frame))) = &polled
                    && let Some(data) = frame.data_ref()
                    && !limit.take(data.len())
                {
                    watch.too_large.store(true, Ordering::Relaxed);
                    // The error resets the backend's stream.
                    return Poll::Ready(Some(Err(io::Error::other(
                        "the request body grew past max_body_size",
                    ))));
                }
                polled.map(|frame| frame.map(|f| f.map_err(io::Error::other)))
            }
            UpstreamBody::Channel(rx) => rx.poll_recv(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Incoming(body, _, _) => body.is_end_stream(),
            UpstreamBody::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Incoming(body, _, _) => body.size_hint(),
            UpstreamBody::Channel(_) => SizeHint::default(),
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

/// Why a connect failed, for every request that waited on it (`io::Error` is not `Clone`).
#[derive(Clone, Debug)]
struct Failed(io::ErrorKind, String);

impl std::fmt::Debug for H2Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Pool").finish_non_exhaustive()
    }
}

impl H2Pool {
    /// A sender on the connection to backend `addr` of `pool`, opening one (within the pool's
    /// connect timeout, with its TLS settings) if there is none or the old one closed.
    pub async fn sender(
        &self,
        addr: SocketAddr,
        pool: &Pool,
    ) -> io::Result<SendRequest<UpstreamBody>> {
        let key = pool.conn_key(addr);
        let slot = {
            let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
            match senders.get(&key).map(|slot| (slot.get(), slot)) {
                Some((Some(Ok(sender)), _)) if !sender.is_closed() => return Ok(sender.clone()),
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
                    .map_err(|error| Failed(error.kind(), error.to_string()))
            })
            .await;
        match connected {
            Ok(sender) => Ok(sender.clone()),
            Err(Failed(kind, message)) => Err(io::Error::new(*kind, message.clone())),
        }
    }

    /// Sends `request` to backend `addr` of `pool` on `sender`, its pooled connection. A request
    /// the connection did not take goes once more, on a fresh connection to the same backend:
    /// nothing of it was sent. That is the case of the first request after the backend sent a
    /// GOAWAY (gracefully, while other streams still run on the connection): the connection is
    /// still open, so it looked usable, but takes no new stream.
    pub async fn send(
        &self,
        mut sender: SendRequest<UpstreamBody>,
        addr: SocketAddr,
        pool: &Pool,
        request: Request<UpstreamBody>,
    ) -> io::Result<Response<Incoming>> {
        let mut request = request;
        for fresh in [false, true] {
            if fresh {
                self.forget(addr, pool);
                sender = self.sender(addr, pool).await?;
            }
            // A closed connection fails `ready` with the request still in hand.
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut error) => match error.take_message() {
                    Some(returned) => {
                        debug!(backend = %addr, error = %error.error(), "http/2 backend connection did not take a request");
                        request = returned;
                    }
                    None => return Err(io::Error::other(error.into_error())),
                },
            }
        }
        Err(io::Error::other(
            "the backend's connections did not take the request",
        ))
    }

    /// Forgets the connection to backend `addr` of `pool` after it failed a request.
    pub fn forget(&self, addr: SocketAddr, pool: &Pool) {
        self.senders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pool.conn_key(addr));
    }
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
