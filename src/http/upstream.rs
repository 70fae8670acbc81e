//! Keep-alive connections to backends, shared by every client connection of the process.
//!
//! A connection is checked in after a response that left it reusable (complete, properly framed,
//! no `Connection: close`) and checked out by the next request to the same backend. Idle
//! connections are capped per backend and dropped once older than the idle timeout; one that the
//! backend closed meanwhile is noticed at checkout (it reads as EOF) and dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Idle connections kept per backend.
pub const MAX_IDLE_PER_BACKEND: usize = 128;
/// How long an idle backend connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection to a backend with its read buffer.
#[derive(Debug)]
pub struct UpstreamConn {
    /// The socket.
    pub stream: TcpStream,
    /// The backend it is connected to; the pool's key.
    pub addr: SocketAddr,
    /// Bytes read from the backend and not yet consumed.
    pub buf: BytesMut,
    /// Whether this connection served a request before (a reused connection may have been
    /// closed by the backend in the meantime, which makes a failure on it retryable).
    pub reused: bool,
}

/// The process-wide pool of idle backend connections.
#[derive(Debug, Default)]
pub struct UpstreamPool {
    idle: Mutex<HashMap<SocketAddr, Vec<(UpstreamConn, Instant)>>>,
}

impl UpstreamPool {
    /// An idle connection to `addr` that still looks open, if there is one.
    pub fn checkout(&self, addr: SocketAddr) -> Option<UpstreamConn> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&addr)?;
        // Most recently used first: it is the least likely to have been closed by the backend.
        while let Some((mut conn, since)) = list.pop() {
            if now.duration_since(since) < IDLE_TIMEOUT && still_open(&conn.stream) {
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    /// Returns a connection that is ready for another request.
    pub fn checkin(&self, mut conn: UpstreamConn) {
        let addr = conn.addr;
        if !conn.buf.is_empty() {
            // The backend sent more than the response: it cannot be trusted with another one.
            return;
        }
        // An idle connection keeps no read buffer.
        conn.buf = BytesMut::new();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(addr).or_default();
        // Oldest first: drop the expired ones, and the oldest if the list is full, so idle
        // connections never pile up beyond their timeout or the cap.
        let now = Instant::now();
        list.retain(|(_, since)| now.duration_since(*since) < IDLE_TIMEOUT);
        if list.len() >= MAX_IDLE_PER_BACKEND {
            list.remove(0);
        }
        list.push((conn, Instant::now()));
    }
}

/// Whether an idle connection has neither been closed nor sent anything unasked.
fn still_open(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}
