//! Keep-alive connections to backends, shared by every client connection of the process.
//!
//! A connection is checked in after a response that left it reusable (complete, properly framed,
//! no `Connection: close`) and checked out by the next request to the same backend. Idle
//! connections are capped per backend and dropped once older than the idle timeout; one that the
//! backend closed meanwhile is noticed at checkout (it reads as EOF) and dropped.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::BytesMut;

use crate::stream::Stream;

/// What idle connections are filed under: the backend's address and the TLS settings they were
/// made with (0 for plain TCP), so a connection is only reused by a pool that would have made
/// the same one.
pub type ConnKey = (SocketAddr, usize);

/// How many idle connections a pool keeps per backend, and for how long (its
/// `keepalive_connections` and `keepalive_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle connections kept per backend; 0 keeps none.
    pub connections: usize,
    /// How long an idle connection is kept.
    pub timeout: Duration,
}

/// A connection to a backend with its read buffer.
#[derive(Debug)]
pub struct UpstreamConn {
    /// The socket, plain or TLS.
    pub stream: Stream,
    /// The backend it is connected to.
    pub addr: SocketAddr,
    /// What it is pooled under.
    pub key: ConnKey,
    /// Bytes read from the backend and not yet consumed.
    pub buf: BytesMut,
    /// Whether this connection served a request before (a reused connection may have been
    /// closed by the backend in the meantime, which makes a failure on it retryable).
    pub reused: bool,
    /// The last response on this connection had a body long enough to splice: the next
    /// response head is read in a small piece (see `HEAD_PROBE`), so that little of such a
    /// body is copied through user space before the splicing starts.
    pub long_bodies: bool,
}

/// The process-wide pool of idle backend connections.
///
/// Each idle connection carries the time it was checked in, read from the coarse clock
/// ([`crate::sys::coarse_monotonic`]): it is only compared with the pool's keep-alive timeout, and the precise
/// clock would be read twice more per request.
#[derive(Debug, Default)]
pub struct UpstreamPool {
    idle: Mutex<IdleMap>,
}

/// Idle connections by key, each with the time it was checked in.
type IdleMap = HashMap<ConnKey, Vec<(UpstreamConn, Duration)>, BuildHasherDefault<KeyHasher>>;

/// The hash of the idle pool's keys: a multiply and a rotate per word, in the manner of
/// rustc's FxHasher. The keys are backend addresses from the configuration, never chosen by
/// clients, so the pool needs none of the protection against crafted collisions that the
/// standard map's SipHash buys, and SipHash (two lookups per request) cost about 2% of a small
/// request's own work.
#[derive(Debug, Default, Clone, Copy)]
struct KeyHasher(u64);

impl KeyHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

impl UpstreamPool {
    /// An idle connection filed under `key`, no older than `limits` allow, that still looks
    /// open, if there is one.
    pub fn checkout(&self, key: ConnKey, limits: Keepalive) -> Option<UpstreamConn> {
        let now = crate::sys::coarse_monotonic();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&key)?;
        // Most recently used first: it is the least likely to have been closed by the backend.
        while let Some((mut conn, since)) = list.pop() {
            if now.saturating_sub(since) < limits.timeout && still_open(&conn.stream) {
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    /// Returns a connection that is ready for another request, kept within `limits`.
    pub fn checkin(&self, mut conn: UpstreamConn, limits: Keepalive) {
        let key = conn.key;
        if !conn.buf.is_empty() || limits.connections == 0 || conn.stream.tls_holds_unread() {
            // The backend sent more than the response (into the buffer, or into the TLS
            // layer's when a read ended where the response did): it cannot be trusted with
            // another one.
            return;
        }
        // An idle connection keeps no read buffer.
        super::spare::give(std::mem::take(&mut conn.buf));
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        // Oldest first: drop the expired ones, and the oldest if the list is full, so idle
        // connections never pile up beyond their timeout or the cap. Connections are pushed
        // in the order they come back and taken from the end, so the list stays ordered by
        // age and the expired ones are a prefix: only that prefix is looked at, not every idle
        // connection on every check-in.
        let now = crate::sys::coarse_monotonic();
        let expired = list
            .iter()
            .take_while(|(_, since)| now.saturating_sub(*since) >= limits.timeout)
            .count();
        list.drain(..expired);
        if list.len() >= limits.connections {
            list.drain(..=list.len() - limits.connections);
        }
        list.push((conn, now));
    }
}

/// Whether an idle connection has neither been closed nor sent anything unasked. The probe reads
/// the socket under any TLS: a byte there (a close_notify, say) ends the connection either way.
fn still_open(stream: &Stream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.tcp().try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}
