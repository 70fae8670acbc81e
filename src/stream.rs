//! A connection that is either plain TCP or TLS over TCP, and a byte tunnel between two of
//! them.
//!
//! The HTTP path reads and writes through [`Stream`], so the same code serves plain and TLS
//! clients and talks to plain and TLS backends. An enum rather than a generic parameter: the
//! proxy's functions are compiled once, and the plain case costs one predictable branch per
//! read or write.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::backend::BackendState;

/// A client or backend connection.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP, either side (boxed: the TLS state is large and most connections are plain).
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        }
    }

    /// Whether this is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Writes what the socket takes at once without waiting: for TLS, what the TLS layer takes
    /// (it encrypts into its own buffer and writes what the socket takes). `WouldBlock` when
    /// nothing could be written; after a TLS write, [`Stream::try_flush`] says whether the
    /// records all reached the socket.
    pub fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.try_write(data),
            Stream::Tls(tls) => {
                // A no-op waker: a `Pending` here only sends the caller to its awaited path,
                // which polls again with the task's own waker.
                let mut cx = Context::from_waker(std::task::Waker::noop());
                match Pin::new(tls.as_mut()).poll_write(&mut cx, data) {
                    Poll::Ready(result) => result,
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }

    /// [`try_write`](Self::try_write) for several buffers in order, in one system call on plain
    /// TCP (`writev`): a head and a body that lie in different buffers need not be copied
    /// together first.
    pub fn try_write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.try_write_vectored(bufs),
            Stream::Tls(tls) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                match Pin::new(tls.as_mut()).poll_write_vectored(&mut cx, bufs) {
                    Poll::Ready(result) => result,
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }

    /// [`try_write_vectored`](Self::try_write_vectored) for the last bytes sent on a connection.
    /// On plain TCP the write says more is coming (`MSG_MORE`), so a short tail waits in the
    /// socket instead of leaving at once; the shutdown that must follow at once sends it with
    /// the FIN, in one segment where there would be two, which the peer then acknowledges once.
    /// Never for a write that may be followed by a wait: the tail would wait with it.
    pub fn try_write_vectored_before_close(
        &mut self,
        bufs: &[io::IoSlice<'_>],
    ) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.try_io(tokio::io::Interest::WRITABLE, || {
                socket2::SockRef::from(&*tcp).send_vectored_with_flags(bufs, libc::MSG_MORE)
            }),
            Stream::Tls(_) => self.try_write_vectored(bufs),
        }
    }

    /// Whether everything written has reached the socket, pushing out what it takes now
    /// without waiting. Always true for plain TCP, which buffers nothing of its own.
    pub fn try_flush(&mut self) -> io::Result<bool> {
        match self {
            Stream::Plain(_) => Ok(true),
            Stream::Tls(tls) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                match Pin::new(tls.as_mut()).poll_flush(&mut cx) {
                    Poll::Ready(result) => result.map(|()| true),
                    Poll::Pending => Ok(false),
                }
            }
        }
    }

    /// Waits until a read would make progress. For TLS that is at once when decrypted bytes
    /// are already buffered (the socket may then stay silent), else when the socket is readable.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.readable().await,
            Stream::Tls(tls) => {
                if !tls.get_ref().1.wants_read() {
                    return Ok(());
                }
                tls.get_ref().0.readable().await
            }
        }
    }

    /// Writes all of `data` and flushes it (TLS keeps records until flushed).
    pub async fn write_all_flush(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_all(data).await?;
        if self.is_tls() {
            self.flush().await?;
        }
        Ok(())
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, data),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(tcp) => tcp.is_write_vectored(),
            Stream::Tls(tls) => tls.is_write_vectored(),
        }
    }
}

/// Bytes moved by [`tunnel`]: toward the backend, and back.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    /// Client to backend.
    pub upstream: u64,
    /// Backend to client.
    pub downstream: u64,
}

/// Size of each direction's buffer in [`tunnel`].
const TUNNEL_CHUNK: usize = 16 * 1024;

/// Moves bytes both ways between a client and a backend until both sides have closed, either
/// fails, or nothing moves for `idle`. This is the forwarder for connections where one side is
/// TLS (splice needs both sides plain); `initial` goes to the backend first. When one side
/// closes its write side, the other direction keeps running (half-close).
pub async fn tunnel(
    client: &mut Stream,
    backend: &mut Stream,
    initial: &[u8],
    idle: Duration,
    stats: &BackendState,
) -> (io::Result<()>, Moved) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut moved = Moved::default();
    if !initial.is_empty() {
        match tokio::time::timeout(idle, backend.write_all_flush(initial)).await {
            Ok(Ok(())) => moved.upstream += initial.len() as u64,
            Ok(Err(error)) => return (Err(error), moved),
            Err(_) => return (Err(io::ErrorKind::TimedOut.into()), moved),
        }
    }
    let mut up = vec![0u8; TUNNEL_CHUNK];
    let mut down = vec![0u8; TUNNEL_CHUNK];
    let (mut client_open, mut backend_open) = (true, true);
    enum Read {
        Client(io::Result<usize>),
        Backend(io::Result<usize>),
    }
    while client_open || backend_open {
        let read = tokio::time::timeout(idle, async {
            tokio::select! {
                n = client.read(&mut up), if client_open => Read::Client(n),
                n = backend.read(&mut down), if backend_open => Read::Backend(n),
            }
        })
        .await;
        let result = match read {
            Err(_) => return (Ok(()), moved),
            // A failed shutdown means the other side is gone, which its own read will show.
            Ok(Read::Client(Ok(0))) => {
                client_open = false;
                let _ = backend.shutdown().await;
                Ok(())
            }
            Ok(Read::Backend(Ok(0))) => {
                backend_open = false;
                let _ = client.shutdown().await;
                Ok(())
            }
            Ok(Read::Client(Ok(n))) => {
                moved.upstream += n as u64;
                stats.bytes_sent.fetch_add(n as u64, Relaxed);
                write_idle(backend, &up[..n], idle).await
            }
            Ok(Read::Backend(Ok(n))) => {
                moved.downstream += n as u64;
                stats.bytes_received.fetch_add(n as u64, Relaxed);
                write_idle(client, &down[..n], idle).await
            }
            Ok(Read::Client(Err(error)) | Read::Backend(Err(error))) => Err(error),
        };
        if let Err(error) = result {
            return (Err(error), moved);
        }
    }
    (Ok(()), moved)
}

async fn write_idle(stream: &mut Stream, data: &[u8], idle: Duration) -> io::Result<()> {
    match tokio::time::timeout(idle, stream.write_all_flush(data)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer stopped reading",
        )),
    }
}
