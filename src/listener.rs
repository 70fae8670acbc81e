//! Listening sockets and the accept loop every TCP-based listener shares.
//!
//! The loop is bounded: a semaphore permit is taken *before* `accept`, so at `max_connections`
//! the listener stops accepting and new clients wait in the kernel's backlog instead of
//! costing memory here. When the process runs out of descriptors or memory, `accept` fails for
//! everyone; the loop then backs off (10 ms doubling to 1 s) instead of spinning.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::metrics::ListenerStats;

/// Pending connections the kernel queues for us (capped by net.core.somaxconn).
const BACKLOG: i32 = 4096;
/// First pause after an accept failure caused by exhausted resources.
const BACKOFF_START: Duration = Duration::from_millis(10);
/// Longest pause between accept attempts while resources stay exhausted.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Binds a TCP listening socket with SO_REUSEADDR, so a restart does not wait for TIME_WAIT,
/// and TCP_NODELAY, which Linux passes on to every accepted connection: one system call per
/// listener rather than one per connection (a proxy's writes are whole heads and bodies, never
/// worth delaying for Nagle's algorithm).
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Binds a UDP socket.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Whether a socket of this kind could be bound to `addr`'s address on this machine, found by
/// binding it with port 0 for a moment (never `addr`'s own port, which a running process may
/// hold): an address that no interface has fails here as the listener's bind would at start.
pub fn can_bind_address(addr: SocketAddr, udp: bool) -> io::Result<()> {
    let kind = if udp { Type::DGRAM } else { Type::STREAM };
    let socket = Socket::new(Domain::for_address(addr), kind, None)?;
    let mut any_port = addr;
    any_port.set_port(0);
    socket.bind(&any_port.into())
}

/// Why binding `addr` failed, in words: the system's "Cannot assign requested address" is
/// said as what it means.
pub fn bind_failure(addr: SocketAddr, error: &io::Error) -> String {
    let unscoped_link_local = match addr {
        SocketAddr::V6(v6) => v6.ip().is_unicast_link_local() && v6.scope_id() == 0,
        SocketAddr::V4(_) => false,
    };
    if error.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
        format!(
            "cannot bind {addr}: {} is not an address of this machine ({error})",
            addr.ip()
        )
    } else if error.raw_os_error() == Some(libc::EINVAL) && unscoped_link_local {
        format!(
            "cannot bind {addr}: a link-local address needs the index of its interface, \
             as in [{}%2]:{} ({error})",
            addr.ip(),
            addr.port()
        )
    } else {
        format!("cannot bind {addr}: {error}")
    }
}

/// Accepts connections until `shutdown`, running `serve` for each in a task tracked by `tasks`.
/// A connection runs only while it holds a permit of `limit` (the listener's `max_connections`);
/// `serve` gets the permit and keeps it, in an [`Admission`], as long as the connection lives. The socket and the limit are shared so that
/// a reload can start a new loop on the same socket, or resize the limit, without closing it.
pub async fn accept_loop<F, Fut>(
    name: &str,
    listener: Arc<TcpListener>,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = BACKOFF_START;
    // One wait for the shutdown, registered once for the life of the loop: a new one for every
    // connection would take the token's lock twice per accept to register and unregister.
    let stopped = shutdown.cancelled();
    tokio::pin!(stopped);
    loop {
        let permit: OwnedSemaphorePermit = tokio::select! {
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = &mut stopped => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stopped => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = BACKOFF_START;
                tasks.spawn(serve(stream, peer, permit));
            }
            Err(error) if is_resource_exhaustion(&error) => {
                warn!(listener = name, %error, pause = ?backoff, "accept failed, backing off");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    () = &mut stopped => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            // ECONNABORTED and the like concern one client that already left.
            Err(error) => debug!(listener = name, %error, "accept failed"),
        }
    }
}

/// What an accepted connection holds for its whole life, in a task or parked: its permit under
/// the listener's `max_connections`, and its place in the listener's count of open connections.
///
/// The count is kept apart from the permits because the accept loop takes a permit *before*
/// each `accept`, and a reload that lowers `max_connections` takes permits out of circulation:
/// neither is an open connection.
pub struct Admission {
    /// Always `Some` until dropped.
    permit: Option<OwnedSemaphorePermit>,
    /// One pointer for both: every connection's future carries this, and a few bytes more
    /// would cost its task a larger allocation size.
    shared: Arc<Admissions>,
}

/// What the admissions of one running listener share.
#[derive(Debug, Default)]
pub struct Admissions {
    /// The listener's counters (open connections).
    pub stats: Arc<ListenerStats>,
    /// Permits a reload that lowered `max_connections` could not take out of circulation at
    /// once, because connections held them: the connections that end first give theirs up.
    pub owed: AtomicUsize,
}

impl Admission {
    /// Counts a connection accepted under `permit` as open in the listener's counters until
    /// this is dropped.
    pub fn new(permit: OwnedSemaphorePermit, shared: Arc<Admissions>) -> Self {
        shared.stats.connections.fetch_add(1, Relaxed);
        shared.stats.open.fetch_add(1, Relaxed);
        Admission {
            permit: Some(permit),
            shared,
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.shared.stats.open.fetch_sub(1, Relaxed);
        if self
            .shared
            .owed
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
            && let Some(permit) = self.permit.take()
        {
            permit.forget();
        }
        crate::sys::note_connection_released();
    }
}

/// Whether `error` says the process (or the system) is out of descriptors or memory: a local
/// condition, no fault of the peer, that passes once connections end.
pub(crate) fn is_resource_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_tcp_nodelay() {
        // The proxies no longer set it per connection: this is what they count on.
        let listener = bind_tcp("127.0.0.1:0".parse().expect("address")).expect("bind");
        let addr = listener.local_addr().expect("address");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(accepted.nodelay().expect("getsockopt"));
    }
}
