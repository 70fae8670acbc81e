//! HTTP/2 to backends (`upstream_protocol = "h2"`, h2c with prior knowledge), for gRPC and other
//! services that need HTTP/2 end to end.
//!
//! One multiplexed connection per backend address is kept and shared by every request of the
//! process; a closed or failed one is replaced on the next request. Request and response bodies
//! pass through as HTTP/2 frames, trailers included, so gRPC's `grpc-status` arrives intact.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::debug;

/// The body of a request sent to an HTTP/2 backend.
pub enum UpstreamBody {
    /// No body.
    Empty,
    /// An HTTP/2 client's body, passed on frame by frame (trailers too).
    Incoming(Incoming),
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
            UpstreamBody::Incoming(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(io::Error::other))),
            UpstreamBody::Channel(rx) => rx.poll_recv(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Incoming(body) => body.is_end_stream(),
            UpstreamBody::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Incoming(body) => body.size_hint(),
            UpstreamBody::Channel(_) => SizeHint::default(),
        }
    }
}

/// The shared HTTP/2 connections to backends, one per address.
#[derive(Default)]
pub struct H2Pool {
    senders: Mutex<HashMap<SocketAddr, SendRequest<UpstreamBody>>>,
}

impl std::fmt::Debug for H2Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Pool").finish_non_exhaustive()
    }
}

impl H2Pool {
    /// A sender on the connection to `addr`, opening one (within `connect_timeout`) if there is
    /// none or the old one closed.
    pub async fn sender(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
    ) -> io::Result<SendRequest<UpstreamBody>> {
        {
            let senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(sender) = senders.get(&addr)
                && !sender.is_closed()
            {
                return Ok(sender.clone());
            }
        }
        let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(result) => result?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timeout")),
        };
        stream.set_nodelay(true)?;
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
        self.senders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, sender.clone());
        Ok(sender)
    }

    /// Forgets the connection to `addr` after it failed a request.
    pub fn forget(&self, addr: SocketAddr) {
        self.senders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
    }
}
