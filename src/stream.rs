//! A connection that is either plain TCP or TLS over TCP, and a byte tunnel between two of
//! them.
//!
//! The HTTP path reads and writes through [`Stream`], so the same code serves plain and TLS
//! clients and talks to plain and TLS backends. An enum rather than a generic parameter: the
//! proxy's functions are compiled once, and the plain case costs one predictable branch per
//! read or write.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
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

    /// Whether the TLS layer holds something not read yet: decrypted bytes (a record that went
    /// on past the end of what was read from it) or the peer's close_notify. A connection that
    /// does cannot be given another request, and a look at the socket alone would not see it.
    /// Plain TCP holds nothing. What is looked at may be consumed: only for a connection about
    /// to be given up when there is something.
    pub fn tls_holds_unread(&mut self) -> bool {
        use std::io::Read;
        let Stream::Tls(tls) = self else {
            return false;
        };
        let mut probe = [0u8; 1];
        let read = match tls.as_mut() {
            tokio_rustls::TlsStream::Client(client) => client.get_mut().1.reader().read(&mut probe),
            tokio_rustls::TlsStream::Server(server) => server.get_mut().1.reader().read(&mut probe),
        };
        !matches!(read, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
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

/// How long a closing client connection waits, at most, for its client to close too.
pub const LINGER: Duration = Duration::from_secs(2);

/// How much a closing client connection reads and drops, at most, before closing anyway.
pub const LINGER_BYTES: usize = 1 << 20;

/// Closes a client connection whose write side is already shut (the FIN follows the last
/// answer) only once its client has closed too, reading and dropping what it still sends, for
/// at most [`LINGER`] and [`LINGER_BYTES`]. A socket closed with unread bytes in it, or one that
/// more arrive on after its close, answers them with a reset, and a reset makes the client's
/// stack throw away what it has not read yet: the end of the last answer, often the whole of an
/// answer given before a request's body was read (a 413, a 403). Clients read an answer while
/// sending, or stop sending when it comes, so the wait is short unless the client is slow or
/// hostile, which the bounds are for.
pub async fn linger(tcp: &TcpStream) {
    let deadline = tokio::time::Instant::now() + LINGER;
    let mut scratch = [0u8; 4096];
    let mut dropped = 0;
    while dropped < LINGER_BYTES {
        if !matches!(
            tokio::time::timeout_at(deadline, tcp.readable()).await,
            Ok(Ok(()))
        ) {
            return;
        }
        match tcp.try_read(&mut scratch) {
            Ok(0) => return,
            Ok(n) => dropped += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
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

/// Why [`tunnel`] ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides closed their write side and everything was delivered.
    Closed,
    /// Nothing moved either way for the idle timeout.
    IdleTimeout,
    /// The caller's `stop` future resolved (a backend's drain deadline).
    Stopped,
}

/// Moves bytes both ways between a client and a backend until both sides have closed, either
/// fails, nothing moves for `idle`, or `stop` resolves. This is the forwarder for connections
/// where one side is TLS (splice needs both sides plain); `initial` goes to the backend first.
/// When one side closes its write side, the other direction keeps running (half-close).
///
/// One future polls both directions, each with its own buffer, so a destination that does not
/// take bytes holds up only its own direction. Waiting on one direction's write while the other
/// is not read would deadlock with any peer that reads only once its own writes are done (an
/// echo server, a database streaming results while the client streams a bulk load): each side
/// would wait for the other to read.
pub async fn tunnel(
    client: &mut Stream,
    backend: &mut Stream,
    initial: &[u8],
    idle: Duration,
    stats: &BackendState,
    stop: impl Future<Output = ()>,
) -> (io::Result<TunnelEnd>, Moved) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut stop = std::pin::pin!(stop);
    let mut up = Flow::new(initial);
    let mut down = Flow::new(&[]);
    let mut last_activity = tokio::time::Instant::now();
    let mut timer = Box::pin(tokio::time::sleep(idle));
    let result = std::future::poll_fn(|cx| {
        if stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(TunnelEnd::Stopped));
        }
        let before = (up.moved, down.moved, up.eof, down.eof);
        let up_state = up.poll(cx, client, backend);
        // As in `l4::forward`: after a failure the other direction is not polled, since a
        // write that failed with the peer's reset has taken it, and a read would then see a
        // clean end and pass it on (close_notify and FIN) before the reset.
        let down_state = if matches!(up_state, Poll::Ready(Err(_))) {
            Poll::Pending
        } else {
            down.poll(cx, backend, client)
        };
        if up.moved > before.0 {
            stats.bytes_sent.fetch_add(up.moved - before.0, Relaxed);
        }
        if down.moved > before.1 {
            stats
                .bytes_received
                .fetch_add(down.moved - before.1, Relaxed);
        }
        match (up_state, down_state) {
            (Poll::Ready(Err(error)), _) | (_, Poll::Ready(Err(error))) => {
                return Poll::Ready(Err(error));
            }
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => {
                return Poll::Ready(Ok(TunnelEnd::Closed));
            }
            _ => {}
        }
        if before != (up.moved, down.moved, up.eof, down.eof) {
            last_activity = tokio::time::Instant::now();
        }
        // Re-armed only when it fires, not per byte.
        while timer.as_mut().poll(cx).is_ready() {
            let deadline = last_activity + idle;
            if tokio::time::Instant::now() >= deadline {
                return Poll::Ready(Ok(TunnelEnd::IdleTimeout));
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await;
    let moved = Moved {
        upstream: up.moved,
        downstream: down.moved,
    };
    (result, moved)
}

/// One direction of [`tunnel`].
struct Flow {
    buf: Box<[u8]>,
    /// `buf[start..end]` has been read and not yet written.
    start: usize,
    end: usize,
    /// The source reached its end.
    eof: bool,
    /// The end was passed on: the destination's write side is shut down.
    done: bool,
    /// Bytes were written since the last flush (TLS keeps records until flushed).
    unflushed: bool,
    /// Bytes written to the destination.
    moved: u64,
}

impl Flow {
    fn new(initial: &[u8]) -> Flow {
        let mut buf = vec![0u8; TUNNEL_CHUNK.max(initial.len())].into_boxed_slice();
        buf[..initial.len()].copy_from_slice(initial);
        Flow {
            buf,
            start: 0,
            end: initial.len(),
            eof: false,
            done: false,
            unflushed: false,
            moved: 0,
        }
    }

    /// Moves what it can from `src` to `dst`; `Ready(Ok)` once the end has been passed on.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut Stream,
        dst: &mut Stream,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            while self.start < self.end {
                let n =
                    ready!(Pin::new(&mut *dst).poll_write(cx, &self.buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.moved += n as u64;
                self.unflushed = true;
            }
            if self.eof {
                // A failed shutdown means the other side is gone, which its own read will show.
                let _ = ready!(Pin::new(&mut *dst).poll_shutdown(cx));
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut self.buf);
            match Pin::new(&mut *src).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    self.start = 0;
                    self.end = n;
                    self.eof = n == 0;
                }
                // A TLS peer that closed its connection without close_notify. Many do (a
                // process that exits, libraries whose close skips it); HAProxy and NGINX take it
                // as the end of the stream, and so does this: passed on as a reset, it would
                // throw away the bytes still on their way to the other side. The protocol inside
                // frames its own messages, as it must over plain TCP too.
                Poll::Ready(Err(error))
                    if error.kind() == io::ErrorKind::UnexpectedEof && src.is_tls() =>
                {
                    self.start = 0;
                    self.end = 0;
                    self.eof = true;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {
                    // Nothing more to read for now: push out what the TLS layer holds.
                    if self.unflushed {
                        ready!(Pin::new(&mut *dst).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A TLS connection over loopback: the client side, and the server side's stream.
    async fn tls_pair() -> (
        tokio_rustls::client::TlsStream<TcpStream>,
        tokio_rustls::server::TlsStream<TcpStream>,
    ) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["backend.test".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let der = cert.der().clone();
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![der.clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).expect("root");
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accept = async {
            let (tcp, _) = listener.accept().await.expect("accept");
            tokio_rustls::TlsAcceptor::from(Arc::new(server))
                .accept(tcp)
                .await
                .expect("server handshake")
        };
        let connect = async {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("backend.test").expect("name");
            tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(name, tcp)
                .await
                .expect("client handshake")
        };
        let (server, client) = tokio::join!(accept, connect);
        (client, server)
    }

    #[tokio::test]
    async fn bytes_held_by_the_tls_layer_are_seen_though_the_socket_is_empty() {
        let (mut client, mut server) = tls_pair().await;
        // Two bytes in one record; the reader takes one, as a response ending inside a record.
        server.write_all(b"ab").await.expect("write");
        server.flush().await.expect("flush");
        let mut one = [0u8; 1];
        client.read_exact(&mut one).await.expect("read");
        assert_eq!(&one, b"a");
        let mut stream = Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(client)));
        let mut probe = [0u8; 1];
        assert!(
            matches!(stream.tcp().try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "the socket itself has nothing"
        );
        assert!(
            stream.tls_holds_unread(),
            "the TLS layer holds the second byte"
        );
        // The look took it: nothing is left.
        assert!(!stream.tls_holds_unread());
    }

    /// The pool of idle backend connections keeps a TLS one only when its TLS layer holds
    /// nothing of the backend's beyond the response.
    #[tokio::test]
    async fn a_tls_backend_connection_holding_stray_bytes_is_not_kept() {
        use crate::http::upstream::{Keepalive, UpstreamConn, UpstreamPool};
        let limits = Keepalive {
            connections: 8,
            timeout: Duration::from_secs(60),
        };
        let pool = UpstreamPool::default();
        for (stray, kept) in [(true, false), (false, true)] {
            let (mut client, mut server) = tls_pair().await;
            server
                .write_all(if stray { b"ab" } else { b"a" })
                .await
                .expect("write");
            server.flush().await.expect("flush");
            let mut one = [0u8; 1];
            client.read_exact(&mut one).await.expect("read");
            let addr = client.get_ref().0.peer_addr().expect("peer");
            let key = (addr, 0);
            pool.checkin(
                UpstreamConn {
                    stream: Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(client))),
                    addr,
                    key,
                    buf: bytes::BytesMut::new(),
                    reused: false,
                    long_bodies: false,
                },
                limits,
            );
            assert_eq!(
                pool.checkout(key, limits).is_some(),
                kept,
                "stray bytes: {stray}"
            );
            drop(server);
        }
    }
}
