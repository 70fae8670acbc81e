//! UDP (layer 4): a session per client address.
//!
//! The listener socket receives every client's datagrams. The first datagram from a new client
//! address opens a session: a backend is picked and a socket of our own is connected to it, so
//! the backend's replies can be told apart by socket. Replies are sent back to the client from the
//! listener socket, the address the client wrote to. The receive loop owns the session table and
//! alone decides expiry (on a periodic sweep), so no reply task races it.
//!
//! Memory per session is a socket and a small task: datagrams pass through a per-thread buffer.
//! UDP promises no delivery, so a datagram that cannot be sent at once (a full socket buffer) is
//! dropped rather than queued.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::backend::{ActiveGuard, BackendState, DISABLED, DOWN, EJECTED};
use crate::config::UdpSettings;
use crate::metrics::ListenerStats;
use crate::pool::{Attempts, PickInput, Picked, Snapshot};

/// Receive buffer size: larger than any UDP payload (IPv4 allows 65,507 bytes, IPv6 65,527), so
/// no datagram is ever cut short.
const MAX_DATAGRAM: usize = 65_535;

/// What the sessions of one UDP listener share.
pub struct UdpProxy {
    /// Listener name, for logs.
    pub name: String,
    /// Pool name; looked up in the current snapshot for each new session.
    pub pool: String,
    /// Listener settings.
    pub settings: UdpSettings,
    /// Clients served; datagrams from others are dropped, and a reload that denies a client
    /// ends its session at its next datagram.
    pub access: crate::access::AccessList,
    /// The current configuration snapshot.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Where this listener's session log lines go, and how they are written.
    pub access_log: Option<(
        crate::config::AccessLogConfig,
        Arc<crate::access_log::Writer>,
    )>,
    /// The listener's counters, kept by its name: sessions opened (`connections`), sessions
    /// open now (`open`) and datagrams dropped. A loop that a reload stopped (the listener
    /// moved to another address) serves its sessions on and counts in the same ones.
    pub stats: Arc<ListenerStats>,
}

impl std::fmt::Debug for UdpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpProxy")
            .field("name", &self.name)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// What a session needs to write its access log line when it ends, shared by the sessions a
/// listener build opened.
struct SessionLog {
    listener: Arc<str>,
    format: crate::config::AccessLogFormat,
    writer: Arc<crate::access_log::Writer>,
}

/// What a session's receive loop and its reply task both update.
struct Activity {
    /// Milliseconds since the listener's epoch at the last datagram either way.
    last_seen: AtomicU64,
    /// Reply bytes relayed to the client.
    received: AtomicU64,
}

/// One client's session.
struct Session {
    /// Connected to the session's backend.
    upstream: Arc<UdpSocket>,
    /// The client's address.
    client: SocketAddr,
    /// Last datagram either way, and reply bytes.
    activity: Arc<Activity>,
    /// Client bytes sent on to the backend.
    sent: u64,
    /// When the session opened.
    started: std::time::Instant,
    /// Why the session ended, for its log line: set where it is taken out of the table (a
    /// session dropped otherwise was cut off by the end of the process's drain).
    outcome: &'static str,
    /// Where its log line goes, when the listener has a log.
    log: Option<Arc<SessionLog>>,
    /// The listener's counters, where the session counts as open until it is dropped.
    stats: Arc<ListenerStats>,
    /// The task relaying replies; aborted on expiry.
    replies: AbortHandle,
    /// Counts the session as active on its backend.
    guard: ActiveGuard,
    /// The pool its backend was picked from; a reload may point the listener at another.
    pool: Arc<str>,
    /// Set when the backend refuses the session's datagrams; the next datagram re-picks,
    /// passing over this backend (`guard.state().addr`).
    broken: Arc<AtomicBool>,
    /// Cancelled at the backend's drain deadline: the session ends, the client's next datagram
    /// opens a new one elsewhere.
    closer: CancellationToken,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.replies.abort();
        self.stats.open.fetch_sub(1, Relaxed);
        let Some(log) = &self.log else {
            return;
        };
        // Only the values are gathered here; the writer thread formats the line.
        let line = Box::new(crate::access_log::ConnectionLine {
            format: log.format,
            listener: Arc::clone(&log.listener),
            protocol: "udp",
            client: self.client,
            backend: self.guard.state().addr,
            sent: self.sent,
            received: self.activity.received.load(Relaxed),
            duration: self.started.elapsed(),
            outcome: self.outcome,
            at: std::time::SystemTime::now(),
        });
        log.writer.write_connection(line, &self.stats);
    }
}

impl UdpProxy {
    /// Runs the listener until `shutdown`; after it, existing sessions are served until they
    /// expire, and new clients are refused.
    ///
    /// The listener's settings are read from `current` for every new session and sweep, so a
    /// reload that keeps the listener changes them without touching its sessions.
    pub async fn serve(
        current: Arc<ArcSwap<UdpProxy>>,
        socket: Arc<UdpSocket>,
        shutdown: CancellationToken,
        drain_over: CancellationToken,
    ) {
        let mut this = current.load_full();
        // The log of the build that opens a session; rebuilt when a reload brings a new one.
        let mut log = this.session_log();
        let mut logged_by = Arc::clone(&this);
        let epoch = Instant::now();
        let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
        let mut buf = vec![0u8; MAX_DATAGRAM].into_boxed_slice();
        // The sweep's pace follows the settings in force: a reload that shortens the idle
        // timeout is in force from the next sweep, or the next new client, whichever comes
        // first, rather than left to the pace of the first settings.
        let mut sweep = Sweep::new(this.settings.idle_timeout);
        let mut stopping = false;
        // Whether the table was rid of its ended sessions at the cap since the last sweep.
        let mut purged = false;

        loop {
            tokio::select! {
                // Once draining, the listening socket is not read: it may have a new owner (a
                // reload that moved the address, a binary upgrade) whose datagrams these would
                // be. Sessions go on relaying their backends' replies until they go idle.
                received = socket.recv_from(&mut buf), if !stopping => {
                    let (len, client) = match received {
                        Ok(received) => received,
                        Err(error) => {
                            // An ICMP error from an earlier send_to surfaces here; it concerns
                            // one client, not the listener.
                            debug!(listener = %this.name, %error, "udp receive error");
                            continue;
                        }
                    };
                    let now = epoch.elapsed().as_millis() as u64;
                    let datagram = &buf[..len];
                    let mut refused = None;
                    if let Some(session) = sessions.get_mut(&client) {
                        if session.closer.is_cancelled() {
                            session.outcome = "drained";
                            sessions.remove(&client);
                        } else if session.broken.load(Relaxed) {
                            // Its backend refused (ICMP port unreachable): forget the session
                            // so this datagram opens a new one, picked among the other backends.
                            session.outcome = "refused";
                            refused = sessions.remove(&client).map(|s| s.guard.state().addr);
                        } else if !current.load().access.permits(client.ip()) {
                            // A reload denied this client: its session ends here.
                            session.outcome = "denied";
                            sessions.remove(&client);
                        } else if session.displaced(&current.load()) {
                            // UDP has no connection to keep: the datagram opens a new session
                            // on a backend the pool would pick now.
                            session.outcome = "moved";
                            sessions.remove(&client);
                        } else {
                            session.activity.last_seen.store(now, Relaxed);
                            send_upstream(session, datagram);
                            continue;
                        }
                    }
                    this = current.load_full();
                    sweep.follow(this.settings.idle_timeout);
                    if !this.access.permits(client.ip()) {
                        this.stats.denied.fetch_add(1, Relaxed);
                        debug!(listener = %this.name, %client, "udp datagram from a denied client dropped");
                        continue;
                    }
                    if !stopping && sessions.len() >= this.settings.max_sessions && !purged {
                        // At the cap, sessions that are over but not yet swept (their backend
                        // refused them, its drain deadline passed, or it left the pool) make
                        // room. At most once between sweeps: a flood of new clients at the cap
                        // must not cost a walk of the table each.
                        purged = true;
                        sessions.retain(|_, s| s.still_open(&this));
                    }
                    if stopping || sessions.len() >= this.settings.max_sessions {
                        this.stats.datagrams_dropped.fetch_add(1, Relaxed);
                        debug!(listener = %this.name, %client, "udp session refused (cap or shutdown)");
                        continue;
                    }
                    if !Arc::ptr_eq(&this, &logged_by) {
                        log = this.session_log();
                        logged_by = Arc::clone(&this);
                    }
                    match this.open(&log, &socket, client, epoch, datagram, refused).await {
                        Ok(session) => {
                            sessions.insert(client, session);
                        }
                        Err(error) => {
                            this.stats.datagrams_dropped.fetch_add(1, Relaxed);
                            debug!(listener = %this.name, %client, %error, "udp session not opened");
                        }
                    }
                }
                _ = sweep.tick() => {
                    purged = false;
                    this = current.load_full();
                    sweep.follow(this.settings.idle_timeout);
                    let idle_ms = this.settings.idle_timeout.as_millis() as u64;
                    let now = epoch.elapsed().as_millis() as u64;
                    sessions.retain(|_, s| {
                        if s.closer.is_cancelled() {
                            s.outcome = "drained";
                            return false;
                        }
                        if now.saturating_sub(s.activity.last_seen.load(Relaxed)) >= idle_ms {
                            // A session whose backend refused it and whose client never sent
                            // again (a new source port per query, as DNS clients use).
                            s.outcome = if s.broken.load(Relaxed) {
                                "refused"
                            } else {
                                "idle_timeout"
                            };
                            return false;
                        }
                        true
                    });
                    if stopping && sessions.is_empty() {
                        break;
                    }
                }
                _ = shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    info!(listener = %this.name, sessions = sessions.len(), "udp listener draining");
                }
                // The process's drain deadline: the sessions left end here (as `closed`).
                () = drain_over.cancelled() => break,
            }
        }
    }

    /// What this build's sessions need to write their log lines.
    fn session_log(&self) -> Option<Arc<SessionLog>> {
        let (config, writer) = self.access_log.as_ref()?;
        Some(Arc::new(SessionLog {
            listener: Arc::from(self.name.as_str()),
            format: config.format,
            writer: Arc::clone(writer),
        }))
    }

    /// Opens a session for `client`: picks a backend, connects a socket to it and sends the
    /// client's first datagram. That send waits for the new socket to be writable: a fresh socket
    /// has no readiness yet, so a `try_send` would drop the datagram.
    ///
    /// The session counts as a connection accepted, and as open until it is dropped, as a tcp
    /// connection does from its accept: operators read one pair of counters for both.
    async fn open(
        &self,
        log: &Option<Arc<SessionLog>>,
        listener: &Arc<UdpSocket>,
        client: SocketAddr,
        epoch: Instant,
        first: &[u8],
        refused: Option<SocketAddr>,
    ) -> io::Result<Session> {
        let snapshot = self.snapshot.load();
        let pool = snapshot
            .pool(&self.pool)
            .ok_or_else(|| io::Error::other(format!("pool `{}` not configured", self.pool)))?;
        let input = PickInput {
            client: Some(client.ip()),
            hash: pool.hash_client(client.ip()),
            preferred: None,
            refresh: false,
        };
        let mut attempts = Attempts::new(pool, input);
        // The refusing backend is found by its address: a reload since the session opened
        // may have moved it in the pool, or taken it out.
        if let Some(index) =
            refused.and_then(|addr| pool.candidates.iter().position(|c| c.state.addr == addr))
        {
            pool.report(&pool.candidates[index].state, false);
            attempts.exclude(index);
        }
        // No waiting in a queue here: this runs on the listener's receive loop.
        let Picked {
            candidate,
            guard,
            closer,
            ..
        } = attempts.next_now().ok_or_else(|| {
            io::Error::other(format!("no usable backend in pool `{}`", pool.name))
        })?;
        let backend = candidate.state.addr;
        let local: SocketAddr = if backend.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let upstream = UdpSocket::bind(local).await?;
        upstream.connect(backend).await?;
        let sent = upstream.send(first).await?;
        candidate.state.bytes_sent.fetch_add(sent as u64, Relaxed);
        let upstream = Arc::new(upstream);
        let activity = Arc::new(Activity {
            last_seen: AtomicU64::new(epoch.elapsed().as_millis() as u64),
            received: AtomicU64::new(0),
        });
        guard.established();
        let broken = Arc::new(AtomicBool::new(false));
        debug!(listener = %self.name, %client, %backend, "udp session opened");
        let replies = tokio::spawn(relay_replies(Relay {
            upstream: Arc::clone(&upstream),
            listener: Arc::clone(listener),
            client,
            activity: Arc::clone(&activity),
            backend: Arc::clone(&candidate.state),
            epoch,
            broken: Arc::clone(&broken),
            stats: Arc::clone(&self.stats),
        }))
        .abort_handle();
        self.stats.connections.fetch_add(1, Relaxed);
        self.stats.open.fetch_add(1, Relaxed);
        Ok(Session {
            upstream,
            client,
            activity,
            sent: sent as u64,
            started: std::time::Instant::now(),
            outcome: "closed",
            log: log.clone(),
            stats: Arc::clone(&self.stats),
            replies,
            guard,
            pool: Arc::from(self.pool.as_str()),
            broken,
            closer,
        })
    }
}

impl Session {
    /// Whether the session still relays; if not, records why it ended (for its log line).
    fn still_open(&mut self, proxy: &UdpProxy) -> bool {
        self.outcome = if self.broken.load(Relaxed) {
            "refused"
        } else if self.closer.is_cancelled() {
            "drained"
        } else if self.displaced(proxy) {
            "moved"
        } else {
            return true;
        };
        false
    }

    /// Whether the session's backend was taken out from under it: removed from its pool by a
    /// reload (or its listener now uses another pool), disabled through the admin API, or found
    /// failing (ejected, down) while the pool has a usable backend to go to instead. A drain is
    /// not: its sessions finish, up to its deadline. For a session whose backend is fine this
    /// is two atomic loads and a comparison of pool names.
    fn displaced(&self, proxy: &UdpProxy) -> bool {
        let state = self.guard.state();
        // A reload took the backend out of the pool, or pointed the listener at another pool.
        if state.is_removed() || *self.pool != *proxy.pool {
            return true;
        }
        let flags = state.flags();
        if flags & DISABLED != 0 {
            return true;
        }
        if flags & (DOWN | EJECTED) == 0 {
            return false;
        }
        // Only here, for a failing backend, is the pool looked at: with nothing better to go to
        // (panic mode), a new session on every datagram would help no one.
        proxy
            .snapshot
            .load()
            .pool(&proxy.pool)
            .is_some_and(|pool| pool.candidates.iter().any(|c| c.state.is_usable()))
    }
}

/// The timer of the sweep that expires idle sessions.
struct Sweep {
    /// How often it runs: a quarter of the idle timeout, so a session expires at most a
    /// quarter late, but never more often than every 10 ms (a walk of the table each) nor less
    /// often than every second (drained sessions, and the end of a drain, wait for it).
    pace: Duration,
    timer: tokio::time::Interval,
}

impl Sweep {
    /// A sweep for `idle_timeout`, running at once and then at its pace.
    fn new(idle_timeout: Duration) -> Sweep {
        let pace = Sweep::pace_for(idle_timeout);
        Sweep {
            pace,
            timer: Sweep::timer(pace, tokio::time::Instant::now()),
        }
    }

    /// The pace for `idle_timeout`.
    fn pace_for(idle_timeout: Duration) -> Duration {
        (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// A timer at `pace` from `start`; a sweep that comes late moves the next ones on rather
    /// than bunching them.
    fn timer(pace: Duration, start: tokio::time::Instant) -> tokio::time::Interval {
        let mut timer = tokio::time::interval_at(start, pace);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    }

    /// Moves to the pace of `idle_timeout` (a reload's) if it is not the one it runs at.
    fn follow(&mut self, idle_timeout: Duration) {
        let pace = Sweep::pace_for(idle_timeout);
        if pace != self.pace {
            self.pace = pace;
            self.timer = Sweep::timer(pace, tokio::time::Instant::now() + pace);
        }
    }

    /// Waits for the next sweep.
    async fn tick(&mut self) {
        self.timer.tick().await;
    }
}

/// Sends one client datagram to the session's backend, or drops it if the socket is full.
fn send_upstream(session: &mut Session, datagram: &[u8]) {
    let backend = session.guard.state();
    match session.upstream.try_send(datagram) {
        Ok(n) => {
            backend.bytes_sent.fetch_add(n as u64, Relaxed);
            session.sent += n as u64;
        }
        Err(error) => {
            session.stats.datagrams_dropped.fetch_add(1, Relaxed);
            if error.kind() == io::ErrorKind::ConnectionRefused {
                mark_broken(&session.broken, backend);
            }
        }
    }
}

/// Records that a session's backend refused it.
fn mark_broken(broken: &AtomicBool, backend: &BackendState) {
    if !broken.swap(true, Relaxed) {
        backend.connect_failures.fetch_add(1, Relaxed);
    }
}

thread_local! {
    /// Reply buffer of this worker thread; used only between a receive and the send after it.
    static REPLY: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_DATAGRAM].into_boxed_slice());
}

/// What the reply task of a session works with.
struct Relay {
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    activity: Arc<Activity>,
    backend: Arc<BackendState>,
    epoch: Instant,
    broken: Arc<AtomicBool>,
    stats: Arc<ListenerStats>,
}

/// Relays the backend's datagrams to the client until the session is aborted, or until the
/// backend refuses the session (ICMP port unreachable, which a connected UDP socket reports as
/// an error even when nothing is being sent).
async fn relay_replies(relay: Relay) {
    let Relay {
        upstream,
        listener,
        client,
        activity,
        backend,
        epoch,
        broken,
        stats,
    } = relay;
    let mut answered = false;
    loop {
        let Ok(ready) = upstream.ready(Interest::READABLE | Interest::ERROR).await else {
            return;
        };
        if ready.is_error() {
            if let Ok(Some(error)) = upstream.take_error()
                && error.kind() == io::ErrorKind::ConnectionRefused
            {
                debug!(%client, backend = %backend.addr, "udp backend refused the session");
                mark_broken(&broken, &backend);
                return;
            }
            // Another error, now taken: wait for the next event rather than spin on this one.
            let _ = upstream.try_io(Interest::ERROR, || {
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            });
            if !ready.is_readable() {
                continue;
            }
        }
        let relayed = REPLY.with(|buf| {
            let mut buf = buf.borrow_mut();
            let n = upstream.try_recv(&mut buf)?;
            // Like the client side: a reply the listener socket cannot take now is dropped.
            match listener.try_send_to(&buf[..n], client) {
                Ok(sent) => Ok(Some(sent)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e),
            }
        });
        match relayed {
            Ok(Some(n)) => {
                backend.bytes_received.fetch_add(n as u64, Relaxed);
                activity.received.fetch_add(n as u64, Relaxed);
                activity
                    .last_seen
                    .store(epoch.elapsed().as_millis() as u64, Relaxed);
                if !answered {
                    // A reply is the success that outlier detection counts on UDP.
                    answered = true;
                    backend.consecutive_failures.store(0, Relaxed);
                }
            }
            Ok(None) => {
                stats.datagrams_dropped.fetch_add(1, Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                // ICMP port unreachable: nothing listens there. The client's next datagram
                // opens a new session on another pick.
                debug!(%client, backend = %backend.addr, "udp backend refused the session");
                mark_broken(&broken, &backend);
                return;
            }
            Err(error) => debug!(%client, backend = %backend.addr, %error, "udp relay error"),
        }
    }
}
