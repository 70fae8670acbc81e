//! Moving bytes both ways between two TCP sockets, with half-close and an idle timeout.
//!
//! One future drives both directions of a connection (one task per connection, not two). Each
//! direction is a [`Half`] that either copies through a per-thread scratch buffer or splices
//! through a pipe. Neither holds memory while the connection is idle:
//!
//! * copy: reads land in a buffer owned by the worker thread and are written straight on; only
//!   bytes the destination would not take are kept, in a per-connection buffer that is freed as
//!   soon as the source has nothing more to read;
//! * splice: bytes move socket → pipe → socket inside the kernel; the pipe is borrowed from a
//!   per-thread pool when data arrives and given back once it is empty and the source is idle,
//!   so idle connections hold no pipe (no file descriptors, no pipe pages).
//!
//! A direction ends when its source reaches EOF and everything read has been written: the
//! destination's write side is then shut down (half-close) while the other direction goes on.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::backend::BackendState;
use crate::splice::{Pipe, splice};

/// Size of the per-thread copy buffer. Larger reads mean fewer system calls and wake-ups per
/// byte, but it also bounds what one connection may have to keep in `pending` when its
/// destination is slower than its source. On loopback 256 KiB beat 16 and 64 KiB clearly; 512 KiB
/// and 1 MiB were not reliably better (see bench/README.md).
const SCRATCH_SIZE: usize = 256 * 1024;
/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides closed their write side and everything was delivered.
    Closed,
    /// No byte moved either way for the idle timeout.
    IdleTimeout,
    /// No byte moved for the parking threshold and nothing is buffered: the connection may be
    /// parked (see [`crate::park`]). Only when [`Forwarder::poll`] was given a threshold.
    Parkable,
}

/// Byte counts of a finished (or failed) connection.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transferred {
    /// Client to backend.
    pub upstream: u64,
    /// Backend to client.
    pub downstream: u64,
}

/// Forwards between `client` and `backend` until both directions end, one fails, or nothing moves
/// for `idle_timeout`. `initial` is sent to the backend first (payload that arrived together with
/// a PROXY protocol header). Byte counts are added to `stats` as they move.
pub async fn forward(
    client: &TcpStream,
    backend: &TcpStream,
    initial: Vec<u8>,
    splice: bool,
    idle_timeout: Duration,
    stats: &BackendState,
) -> (io::Result<Outcome>, Transferred) {
    let mut forwarder = Forwarder::new(initial, idle_timeout);
    let result =
        poll_fn(|cx| forwarder.poll(cx, client, backend, splice, idle_timeout, None, stats)).await;
    (result, forwarder.finish())
}

/// The state of [`forward`], for callers that keep it in a future of their own.
///
/// Every idle connection holds one for its whole life, so it is kept small: the sockets, the
/// settings and the counters live with the caller and are passed to [`Forwarder::poll`].
pub struct Forwarder {
    /// Client to backend.
    up: Half,
    /// Backend to client.
    down: Half,
    /// Fires at the idle deadline (or earlier: it is re-armed lazily, see `poll`).
    idle: Pin<Box<Sleep>>,
    /// When a byte last moved (or an EOF arrived).
    last_activity: Instant,
}

impl Forwarder {
    /// A forwarder that sends `initial` to the backend first. Its timer first fires after
    /// `first_check` (the idle timeout, or the parking threshold when that is shorter).
    pub fn new(initial: Vec<u8>, first_check: Duration) -> Forwarder {
        Forwarder {
            up: Half::new(initial),
            down: Half::new(Vec::new()),
            idle: Box::pin(tokio::time::sleep(first_check)),
            last_activity: Instant::now(),
        }
    }

    /// A forwarder for a parked connection that resumes: `moved` so far, idle since
    /// `last_activity`; its timer fires at `check_at`.
    pub fn resumed(moved: Transferred, last_activity: Instant, check_at: Instant) -> Forwarder {
        let mut forwarder = Forwarder {
            up: Half::new(Vec::new()),
            down: Half::new(Vec::new()),
            idle: Box::pin(tokio::time::sleep_until(check_at)),
            last_activity,
        };
        forwarder.up.bytes = moved.upstream;
        forwarder.down.bytes = moved.downstream;
        forwarder
    }

    /// When a byte last moved (or an EOF arrived).
    pub fn last_activity(&self) -> Instant {
        self.last_activity
    }

    /// Whether the connection holds nothing that would be lost without this state: no bytes
    /// waiting to be written, no pipe, and neither direction at its end.
    fn quiescent(&self) -> bool {
        [&self.up, &self.down].iter().all(|half| {
            !half.eof && !half.done && half.in_pipe == 0 && half.pipe.is_none() && {
                half.pending.is_none()
            }
        })
    }

    /// Moves what it can both ways; `Ready` once both directions ended, one failed, or nothing
    /// moved for `idle_timeout` (or, with `park_after`, once the connection is parkable). Call
    /// [`Forwarder::finish`] afterwards, except after [`Outcome::Parkable`], when the caller
    /// may instead park the connection with the byte counts of [`Forwarder::moved`].
    #[allow(clippy::too_many_arguments)]
    pub fn poll(
        &mut self,
        cx: &mut Context<'_>,
        client: &TcpStream,
        backend: &TcpStream,
        splice: bool,
        idle_timeout: Duration,
        park_after: Option<Duration>,
        stats: &BackendState,
    ) -> Poll<io::Result<Outcome>> {
        let (up, down) = (&mut self.up, &mut self.down);
        let up_before = up.bytes;
        let down_before = down.bytes;
        let up_state = up.poll(cx, client, backend, splice);
        // Once a direction failed, the other is not polled again. The kernel reports a peer's
        // reset once: a write that failed with it has taken it, and a read of that socket now
        // ends as if the peer had closed cleanly, so the other direction would pass a FIN on
        // before the connection closes with its reset.
        let down_state = if matches!(up_state, Poll::Ready(Err(_))) {
            Poll::Pending
        } else {
            down.poll(cx, backend, client, splice)
        };
        let moved_up = up.bytes - up_before;
        let moved_down = down.bytes - down_before;
        if moved_up > 0 {
            stats
                .bytes_sent
                .fetch_add(moved_up, std::sync::atomic::Ordering::Relaxed);
        }
        if moved_down > 0 {
            stats
                .bytes_received
                .fetch_add(moved_down, std::sync::atomic::Ordering::Relaxed);
        }
        match (up_state, down_state) {
            (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => return Poll::Ready(Err(e)),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => return Poll::Ready(Ok(Outcome::Closed)),
            _ => {}
        }
        if moved_up + moved_down > 0 || up.active || down.active {
            up.active = false;
            down.active = false;
            self.last_activity = Instant::now();
        }
        // The timer is re-armed only when it fires, not on every byte: resetting a timer is a
        // timer-wheel operation, reading the clock is not.
        while self.idle.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let deadline = self.last_activity + idle_timeout;
            if now >= deadline {
                return Poll::Ready(Ok(Outcome::IdleTimeout));
            }
            let half_closed = [&self.up, &self.down]
                .iter()
                .any(|half| half.eof || half.done);
            let next = match park_after {
                // A half-closed connection is never parked: no need to look every threshold.
                Some(after) if !half_closed => {
                    let park_at = self.last_activity + after;
                    if now >= park_at && self.quiescent() {
                        return Poll::Ready(Ok(Outcome::Parkable));
                    }
                    // Not idle long enough yet, or something is still buffered: look again
                    // after another threshold.
                    park_at.max(now + after).min(deadline)
                }
                _ => deadline,
            };
            self.idle.as_mut().reset(next);
        }
        Poll::Pending
    }

    /// Byte counts so far, without giving anything back (for a connection being parked, which
    /// holds nothing: see [`Outcome::Parkable`]).
    pub fn moved(&self) -> Transferred {
        Transferred {
            upstream: self.up.bytes,
            downstream: self.down.bytes,
        }
    }

    /// Gives back what the connection still borrows (buffers, empty pipes) and returns the byte
    /// counts.
    pub fn finish(&mut self) -> Transferred {
        self.up.release();
        self.down.release();
        Transferred {
            upstream: self.up.bytes,
            downstream: self.down.bytes,
        }
    }
}

/// One direction of a connection. Kept small: two of them live in every idle connection.
struct Half {
    /// Bytes read but not yet written (copy mode, and the initial bytes in either mode); `None`
    /// while there are none, which is nearly always.
    pending: Option<Box<Pending>>,
    /// The pipe in use (splice mode), borrowed from the thread's pool while data flows.
    pipe: Option<Pipe>,
    /// Bytes sitting in `pipe` (at most its capacity, which fits in 32 bits).
    in_pipe: u32,
    /// Bytes delivered to the destination.
    bytes: u64,
    /// The source reached EOF.
    eof: bool,
    /// EOF was passed on (the destination's write side is shut down): this direction is over.
    done: bool,
    /// Something happened that counts as activity without moving bytes (EOF).
    active: bool,
}

/// Bytes a destination would not take yet.
struct Pending {
    buf: Vec<u8>,
    /// How much of `buf` has been written.
    written: usize,
}

impl Half {
    fn new(initial: Vec<u8>) -> Half {
        Half {
            pending: (!initial.is_empty()).then(|| {
                Box::new(Pending {
                    buf: initial,
                    written: 0,
                })
            }),
            pipe: None,
            in_pipe: 0,
            eof: false,
            done: false,
            bytes: 0,
            active: false,
        }
    }

    /// Moves what it can from `src` to `dst`; `Ready(Ok)` once EOF has been passed on.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        splice: bool,
    ) -> Poll<io::Result<()>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.poll_flush(cx, dst))?;
            if self.eof {
                // Everything read has been written: pass the EOF on, keep the other way open.
                socket2::SockRef::from(dst)
                    .shutdown(Shutdown::Write)
                    .or_else(ignore_not_connected)?;
                self.done = true;
                self.release();
                return Poll::Ready(Ok(()));
            }
            ready!(src.poll_read_ready(cx))?;
            // Without a pipe (the process is out of descriptors, say) this read is copied
            // instead: the connection goes on, and the next read tries for a pipe again.
            let read = if splice && self.has_pipe() {
                self.splice_in(src)
            } else {
                self.copy_through(src, dst)
            };
            match read {
                Ok(0) => {
                    self.eof = true;
                    self.active = true;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The source is drained for now: give back what an idle connection should
                    // not hold, then wait for readiness (the next poll_read_ready registers).
                    if self.in_pipe == 0 && self.nothing_pending() {
                        self.release();
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes pending bytes and pipe contents to `dst` until both are empty.
    fn poll_flush(&mut self, cx: &mut Context<'_>, dst: &TcpStream) -> Poll<io::Result<()>> {
        if let Some(pending) = &mut self.pending {
            while pending.written < pending.buf.len() {
                ready!(dst.poll_write_ready(cx))?;
                match dst.try_write(&pending.buf[pending.written..]) {
                    Ok(n) => {
                        pending.written += n;
                        self.bytes += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if pending.written > 0 {
                // Keep the allocation for the next partial write while data flows; `release`
                // frees it when the connection goes idle.
                pending.buf.clear();
                pending.written = 0;
            }
        }
        while self.in_pipe > 0 {
            ready!(dst.poll_write_ready(cx))?;
            let Some(pipe) = &self.pipe else {
                return Poll::Ready(Err(io::Error::other("pipe lost with bytes in it")));
            };
            let from = pipe.read.as_raw_fd();
            let len = self.in_pipe as usize;
            match dst.try_io(Interest::WRITABLE, || splice(from, dst.as_raw_fd(), len)) {
                Ok(n) => {
                    self.in_pipe -= n as u32;
                    self.bytes += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Copy mode: one read into the thread's scratch buffer, written straight on; what `dst`
    /// does not take is kept in `pending`.
    fn copy_through(&mut self, src: &TcpStream, dst: &TcpStream) -> io::Result<usize> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let n = src.try_read(&mut scratch[..])?;
            if n == 0 {
                return Ok(0);
            }
            let mut sent = 0;
            while sent < n {
                match dst.try_write(&scratch[sent..n]) {
                    Ok(written) => sent += written,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            self.bytes += sent as u64;
            if sent < n {
                let pending = self.pending.get_or_insert_with(|| {
                    Box::new(Pending {
                        buf: Vec::new(),
                        written: 0,
                    })
                });
                pending.buf.extend_from_slice(&scratch[sent..n]);
            }
            Ok(n)
        })
    }

    /// Whether a pipe is at hand, borrowing one from the pool if needed.
    fn has_pipe(&mut self) -> bool {
        if self.pipe.is_none() {
            match Pipe::take() {
                Ok(pipe) => self.pipe = Some(pipe),
                Err(error) => {
                    tracing::debug!(%error, "no pipe for splice, copying instead");
                    return false;
                }
            }
        }
        true
    }

    /// Splice mode: moves what `src` has into the pipe.
    fn splice_in(&mut self, src: &TcpStream) -> io::Result<usize> {
        let Some(pipe) = &self.pipe else {
            return Err(io::Error::other("no pipe"));
        };
        let to = pipe.write.as_raw_fd();
        let capacity = pipe.capacity;
        let n = src.try_io(Interest::READABLE, || splice(src.as_raw_fd(), to, capacity))?;
        // At most the pipe's capacity, which the kernel reports as a C int.
        self.in_pipe += n as u32;
        Ok(n)
    }

    /// Whether every byte read into `pending` has been written.
    fn nothing_pending(&self) -> bool {
        self.pending
            .as_ref()
            .is_none_or(|pending| pending.written == pending.buf.len())
    }

    /// Gives back per-connection memory: the pending buffer and an empty pipe.
    fn release(&mut self) {
        if self.nothing_pending() {
            self.pending = None;
        }
        if self.in_pipe == 0
            && let Some(pipe) = self.pipe.take()
        {
            pipe.give_back();
        }
    }
}

/// A shutdown on a socket the peer already reset is not worth failing the other direction for.
fn ignore_not_connected(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotConnected {
        Ok(())
    } else {
        Err(e)
    }
}

thread_local! {
    /// The copy buffer of this worker thread; borrowed only inside one synchronous read+write.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}
