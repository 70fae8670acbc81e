//! Parking of idle connections.
//!
//! A connection served by its own task costs user-space memory even while it waits: the task
//! (its future, in a 128-byte-aligned block) and the socket's registration with the runtime's
//! poller (256 bytes, also aligned), plus what the allocator loses to that alignment. On a busy
//! site most client connections are idle most of the time (browsers keep theirs open for
//! minutes), so that memory is what limits how many connections a process can hold.
//!
//! A connection that stays idle for a while is therefore *parked*: its task ends, its socket
//! leaves the runtime's poller, and what the connection needs to go on (the socket and a few
//! fields, about a hundred bytes) waits in a slot of a [`Lot`], whose one epoll instance watches
//! every parked socket. When the client sends something (or hangs up), the slot is emptied and
//! a new task resumes the connection; when the connection's deadline passes first, the slot is
//! emptied and the socket closed. When the process shuts down, every parked connection is
//! closed at once, as idle ones always are (what an entry does is up to its [`Parked::close`]:
//! one whose next request has just arrived is served instead).
//!
//! Each transition costs a few system calls (leaving one poller, joining the other, and back),
//! so only connections idle for longer than a threshold are parked: a busy connection never is.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Events taken from the kernel per `epoll_wait`; more are read in further calls.
const EVENTS: usize = 64;
/// Stale deadlines (of connections that were resumed) tolerated beyond twice the parked count
/// before the deadline heap is rebuilt without them.
const STALE_SLACK: usize = 1024;

/// A parked connection: its sockets and whatever else it needs to go on.
pub trait Parked: Send + Sized + 'static {
    /// The sockets the lot watches for readability (a client connection; or a client and a
    /// backend connection, for a forwarded one). Either waking up resumes the connection.
    fn fds(&self) -> [Option<RawFd>; 2];
    /// Continues the connection in a new task (tracked by `tasks`): a socket has something to
    /// read, or its peer closed it.
    fn resume(self, tasks: &TaskTracker);
    /// Ends the connection without resuming it, for `why`. The default closes it (by dropping).
    fn close(self, why: Closing, tasks: &TaskTracker) {
        let _ = (why, tasks);
    }
    /// Whether the connection must end now although nothing happened on it (its backend's
    /// drain deadline passed, say). Asked about each parked connection once per
    /// [`SWEEP_INTERVAL`] when [`Parked::SWEPT`] is set.
    fn cancelled(&self) -> bool {
        false
    }
    /// Whether [`Parked::cancelled`] is worth asking.
    const SWEPT: bool = false;
}

/// Why a parked connection ends without being resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// Its deadline (keep-alive or idle timeout) passed.
    Deadline,
    /// [`Parked::cancelled`] said so.
    Cancelled,
    /// The process is shutting down.
    Shutdown,
}

/// How often parked connections are asked whether they were cancelled.
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Parked connections and the epoll instance that watches them; see the module documentation.
pub struct Lot<T> {
    epoll: OwnedFd,
    inner: Mutex<Inner<T>>,
    /// Wakes the lot's task when a connection with an earlier deadline than all others arrives.
    nearer: Notify,
    /// Cancelled when the process shuts down: every parked connection is then closed.
    shutdown: CancellationToken,
    /// Where resumed connections run, so that a shutdown waits for them.
    tasks: TaskTracker,
    /// Whether the lot's task was spawned (at the first park, inside the runtime).
    started: AtomicBool,
    /// Connections parked now, for the metrics.
    parked: AtomicUsize,
    /// `Inner::closed`, readable without the lock.
    closed: AtomicBool,
}

struct Inner<T> {
    slots: Vec<Slot<T>>,
    /// Empty slots, lowest first: reusing low slots lets the table shrink from its end.
    free: BinaryHeap<Reverse<u32>>,
    /// The generation of the latest filling of any slot.
    generation: u32,
    /// (deadline, slot, generation), earliest first. Entries of connections resumed since are
    /// left in place and skipped (their generation no longer matches).
    deadlines: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    /// Set at shutdown: nothing more is parked.
    closed: bool,
}

struct Slot<T> {
    /// A new value (from one counter for the whole lot) each time the slot is filled, so that
    /// an old deadline for a previous occupant is recognised, even after the table shrank and
    /// grew again.
    generation: u32,
    entry: Option<T>,
}

impl<T: Parked> Lot<T> {
    /// A lot whose parked connections close when `shutdown` is cancelled and whose resumed
    /// connections run in `tasks`.
    pub fn new(shutdown: CancellationToken, tasks: TaskTracker) -> io::Result<Arc<Self>> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a descriptor we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Arc::new(Lot {
            epoll,
            inner: Mutex::new(Inner {
                slots: Vec::new(),
                free: BinaryHeap::new(),
                generation: 0,
                deadlines: BinaryHeap::new(),
                closed: false,
            }),
            nearer: Notify::new(),
            shutdown,
            tasks,
            started: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }))
    }

    /// Starts the lot's task, unless it runs already; [`Lot::park`] does it too. Must be called
    /// inside the runtime.
    pub fn start(self: &Arc<Self>) {
        if !self.started.swap(true, Relaxed) {
            self.tasks.spawn(Arc::clone(self).run());
        }
    }

    /// Whether the lot takes no more connections (the process is shutting down, or the lot's
    /// task ended).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    /// Where resumed connections run.
    pub fn tasks(&self) -> TaskTracker {
        self.tasks.clone()
    }

    /// Connections parked now.
    pub fn len(&self) -> usize {
        self.parked.load(Relaxed)
    }

    /// Whether no connection is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parks `entry` until one of its sockets becomes readable or `deadline` passes (then it is
    /// closed with [`Closing::Deadline`]). Must be called inside the runtime. When the lot is
    /// shut down, or a socket cannot be watched, the entry is handed back.
    pub fn park(self: &Arc<Self>, entry: T, deadline: Instant) -> Result<(), T> {
        self.start();
        let mut inner = self.lock();
        if inner.closed {
            return Err(entry);
        }
        let slot = match inner.free.pop() {
            Some(Reverse(slot)) => slot,
            None => {
                let Ok(slot) = u32::try_from(inner.slots.len()) else {
                    return Err(entry);
                };
                inner.slots.push(Slot {
                    generation: 0,
                    entry: None,
                });
                slot
            }
        };
        inner.generation = inner.generation.wrapping_add(1);
        let generation = inner.generation;
        inner.slots[slot as usize].generation = generation;
        let token = (u64::from(generation) << 32) | u64::from(slot);
        // Added while the lock is held: the lot's task, woken by a socket at once, looks the
        // slot up only after the entry is in it.
        let fds = entry.fds();
        for (i, fd) in fds.iter().enumerate() {
            let Some(fd) = *fd else { continue };
            if let Err(error) = self.watch(fd, token) {
                for fd in fds[..i].iter().flatten() {
                    self.unwatch(*fd);
                }
                inner.free.push(Reverse(slot));
                drop(inner);
                debug!(%error, "could not park an idle connection");
                return Err(entry);
            }
        }
        inner.slots[slot as usize].entry = Some(entry);
        let earliest = inner
            .deadlines
            .peek()
            .is_none_or(|Reverse(d)| deadline < d.0);
        inner.deadlines.push(Reverse((deadline, slot, generation)));
        if inner.deadlines.len() > 2 * self.len() + STALE_SLACK {
            inner.prune();
        }
        self.parked.fetch_add(1, Relaxed);
        drop(inner);
        crate::sys::note_connection_released();
        if earliest {
            self.nearer.notify_one();
        }
        Ok(())
    }

    /// Adds `fd` to the lot's epoll instance, reporting `token` when it becomes readable.
    fn watch(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token,
        };
        // SAFETY: both descriptors are open; the kernel copies `event`.
        let added =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if added == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Removes `fd` from the lot's epoll instance.
    fn unwatch(&self, fd: RawFd) {
        // SAFETY: the descriptor is still open (its owner is in hand); no event is passed.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            );
        }
    }

    /// The lot's task: resumes connections whose sockets became readable, closes those whose
    /// deadline passed, and closes all at shutdown. It runs in the lot's task tracker, so that
    /// a shutdown that waits for the tracker also waits for the connections it resumes then.
    async fn run(self: Arc<Self>) {
        // If this task ends any other way than below (a panic in a connection's code), parked
        // connections must not wait for a task that is gone.
        let _on_exit = CloseOnExit(&self);
        // A duplicate of the lot's descriptor, owned by the registration.
        let registered = self.epoll.try_clone().and_then(|epoll| {
            // SAFETY: `epoll` is a descriptor of our own, open until the registration drops it.
            unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }
                .map_err(|error| io::Error::other(error.to_string()))
        });
        let watched = match registered {
            Ok(watched) => watched,
            Err(error) => {
                warn!(%error, "could not watch parked connections; closing them");
                self.close_all();
                return;
            }
        };
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = self.lock().deadlines.peek().map(|Reverse(d)| d.0);
            let expiry = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // Deadlines and the sweep before wake-ups: a steady stream of wake-ups must not
            // hold them back.
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                () = expiry => self.expire(Instant::now()),
                _ = sweep.tick(), if T::SWEPT => self.sweep(),
                () = self.nearer.notified() => {}
                ready = watched.readable() => match ready {
                    Ok(mut guard) => {
                        if self.wake_ready() < EVENTS {
                            guard.clear_ready();
                        }
                    }
                    Err(error) => {
                        warn!(%error, "watching parked connections failed; closing them");
                        break;
                    }
                },
            }
        }
        self.close_all();
    }

    /// Resumes the connections the kernel reports ready; returns how many events it read.
    fn wake_ready(&self) -> usize {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        // SAFETY: `events` has room for EVENTS entries; a zero timeout never blocks.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                EVENTS as i32,
                0,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            // Interrupted: report a full batch, so that the caller asks again rather than
            // waiting for a new edge while events may be waiting.
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                return EVENTS;
            }
            return 0;
        };
        let mut ready = Vec::with_capacity(n);
        {
            let mut inner = self.lock();
            for event in &events[..n] {
                let token = event.u64;
                let (slot, generation) = (token as u32, (token >> 32) as u32);
                if let Some(entry) = inner.take(slot, generation) {
                    self.forget(&entry);
                    ready.push(entry);
                }
            }
            inner.compact(self.len());
        }
        for entry in ready {
            entry.resume(&self.tasks);
        }
        n
    }

    /// Closes the connections whose deadline is `now` or earlier.
    fn expire(&self, now: Instant) {
        let mut expired = Vec::new();
        {
            let mut inner = self.lock();
            while let Some(&Reverse((deadline, slot, generation))) = inner.deadlines.peek() {
                if deadline > now {
                    break;
                }
                inner.deadlines.pop();
                if let Some(entry) = inner.take(slot, generation) {
                    self.forget(&entry);
                    expired.push(entry);
                }
            }
            inner.compact(self.len());
        }
        // Closed outside the lock: closing sockets and releasing permits takes a while.
        for entry in expired {
            entry.close(Closing::Deadline, &self.tasks);
        }
    }

    /// Closes the connections that say they were cancelled.
    fn sweep(&self) {
        let mut cancelled = Vec::new();
        {
            let mut inner = self.lock();
            let Inner { slots, free, .. } = &mut *inner;
            for (i, slot) in slots.iter_mut().enumerate() {
                if slot.entry.as_ref().is_some_and(Parked::cancelled)
                    && let Some(entry) = slot.entry.take()
                {
                    self.forget(&entry);
                    free.push(Reverse(i as u32));
                    cancelled.push(entry);
                }
            }
            inner.compact(self.len());
        }
        for entry in cancelled {
            entry.close(Closing::Cancelled, &self.tasks);
        }
    }

    /// Ends every parked connection with [`Closing::Shutdown`] and parks no more. The lot's
    /// task does this when the shutdown token is cancelled; a server calls it itself before it
    /// waits for its tasks, so that connections resumed for the drain are among them.
    pub fn close_all(&self) {
        let entries: Vec<T> = {
            let mut inner = self.lock();
            inner.closed = true;
            self.closed.store(true, Relaxed);
            inner.deadlines.clear();
            inner.free.clear();
            std::mem::take(&mut inner.slots)
                .into_iter()
                .filter_map(|slot| slot.entry)
                .collect()
        };
        self.parked.fetch_sub(entries.len(), Relaxed);
        for entry in entries {
            entry.close(Closing::Shutdown, &self.tasks);
        }
    }

    /// Stops watching an entry's sockets: it leaves the lot.
    fn forget(&self, entry: &T) {
        for fd in entry.fds().into_iter().flatten() {
            self.unwatch(fd);
        }
        self.parked.fetch_sub(1, Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        self.inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Closes a lot when its task ends, however it ends.
struct CloseOnExit<'a, T: Parked>(&'a Lot<T>);

impl<T: Parked> Drop for CloseOnExit<'_, T> {
    fn drop(&mut self) {
        self.0.close_all();
    }
}

impl<T> Inner<T> {
    /// Empties the slot if it still holds the occupant of that generation.
    fn take(&mut self, slot: u32, generation: u32) -> Option<T> {
        let s = self.slots.get_mut(slot as usize)?;
        if s.generation != generation {
            return None;
        }
        let entry = s.entry.take()?;
        self.free.push(Reverse(slot));
        Some(entry)
    }

    /// Gives back the table's memory once at least half of it is empty: empty slots at its end
    /// are dropped (the lowest free slots are reused first, so parked connections gather at the
    /// start), and so are deadlines of connections no longer parked.
    fn compact(&mut self, parked: usize) {
        if self.slots.len() < 64 || parked * 2 > self.slots.len() {
            return;
        }
        while self.slots.last().is_some_and(|s| s.entry.is_none()) {
            self.slots.pop();
        }
        let len = self.slots.len();
        self.free.retain(|Reverse(slot)| (*slot as usize) < len);
        self.slots.shrink_to(len * 2);
        self.free.shrink_to(len);
        self.prune();
        self.deadlines.shrink_to(parked * 2 + STALE_SLACK);
    }

    /// Drops the deadlines of connections no longer parked.
    fn prune(&mut self) {
        let slots = &self.slots;
        self.deadlines.retain(|Reverse((_, slot, generation))| {
            slots
                .get(*slot as usize)
                .is_some_and(|s| s.generation == *generation && s.entry.is_some())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// A parked std socket that reports its resumption on a channel.
    struct Conn {
        stream: TcpStream,
        resumed: mpsc::UnboundedSender<TcpStream>,
    }

    impl Parked for Conn {
        fn fds(&self) -> [Option<RawFd>; 2] {
            [Some(self.stream.as_raw_fd()), None]
        }
        fn resume(self, tasks: &TaskTracker) {
            let Conn { stream, resumed } = self;
            tasks.spawn(async move {
                let _ = resumed.send(stream);
            });
        }
    }

    fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn a_parked_socket_resumes_when_its_peer_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let lot = Lot::new(CancellationToken::new(), TaskTracker::new()).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (mut client, server) = pair(&listener);
        let far = Instant::now() + Duration::from_secs(60);
        assert!(
            lot.park(
                Conn {
                    stream: server,
                    resumed: tx.clone(),
                },
                far,
            )
            .is_ok()
        );
        assert_eq!(lot.len(), 1);
        client.write_all(b"next").unwrap();
        let mut server = rx.recv().await.unwrap();
        assert_eq!(lot.len(), 0);
        let mut got = [0u8; 4];
        server.set_nonblocking(false).unwrap();
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"next");
        // The slot is reused, and the socket can be parked again.
        server.set_nonblocking(true).unwrap();
        assert!(
            lot.park(
                Conn {
                    stream: server,
                    resumed: tx,
                },
                far,
            )
            .is_ok()
        );
        client.write_all(b"more").unwrap();
        assert!(rx.recv().await.is_some());
        assert_eq!(lot.inner.lock().unwrap().slots.len(), 1);
    }

    #[tokio::test]
    async fn a_parked_socket_is_closed_at_its_deadline_and_at_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let shutdown = CancellationToken::new();
        let lot = Lot::new(shutdown.clone(), TaskTracker::new()).unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let (mut early, server) = pair(&listener);
        assert!(
            lot.park(
                Conn {
                    stream: server,
                    resumed: tx.clone(),
                },
                Instant::now() + Duration::from_secs(3600),
            )
            .is_ok()
        );
        let (mut soon, server) = pair(&listener);
        // An earlier deadline than the one the lot's task sleeps towards.
        assert!(
            lot.park(
                Conn {
                    stream: server,
                    resumed: tx.clone(),
                },
                Instant::now() + Duration::from_millis(20),
            )
            .is_ok()
        );
        let mut byte = [0u8; 1];
        let closed = tokio::task::spawn_blocking(move || soon.read(&mut byte).unwrap());
        assert_eq!(closed.await.unwrap(), 0, "closed at its deadline");
        assert_eq!(lot.len(), 1);
        shutdown.cancel();
        let mut byte = [0u8; 1];
        let closed = tokio::task::spawn_blocking(move || early.read(&mut byte).unwrap());
        assert_eq!(closed.await.unwrap(), 0, "closed at shutdown");
        assert_eq!(lot.len(), 0);
        // After shutdown, nothing more is parked: the entry is handed back.
        let (_late, server) = pair(&listener);
        let refused = lot.park(
            Conn {
                stream: server,
                resumed: tx,
            },
            Instant::now() + Duration::from_secs(3600),
        );
        assert!(refused.is_err());
    }
}
