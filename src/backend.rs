//! Live backend state: counters and flags that outlive any one configuration.
//!
//! A [`BackendState`] is keyed by (pool name, address) in the [`Registry`], so a reload that keeps
//! a backend keeps its counters, health, ejection and drain state. The hot path touches only
//! relaxed atomics here; the registry's lock is taken when a snapshot is built, never per connection.
//!
//! Whether a backend may be picked is one byte of flags, each owned by one mechanism: active
//! health checks set [`DOWN`], outlier detection [`EJECTED`], draining [`DRAINING`] and the
//! operator [`DISABLED`]. A backend is usable when no flag is set, so the mechanisms never undo
//! each other's decisions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Set while active health checks find the backend failing.
pub const DOWN: u8 = 1;
/// Set while outlier detection has ejected the backend.
pub const EJECTED: u8 = 2;
/// Set while the backend drains: no new work, work in flight finishes.
pub const DRAINING: u8 = 4;
/// Set while an operator has disabled the backend.
pub const DISABLED: u8 = 8;
/// The admin API drained the backend.
pub const OVERRIDE_DRAIN: u8 = 1;
/// The admin API ended a drain the file asked for.
pub const OVERRIDE_UNDRAIN: u8 = 2;
/// The admin API disabled the backend.
pub const OVERRIDE_DISABLE: u8 = 4;
/// The admin API set the backend's weight.
pub const OVERRIDE_WEIGHT: u8 = 8;

/// Flags that even panic mode respects: they are decisions, not observations.
pub const ADMIN_FLAGS: u8 = DRAINING | DISABLED;

/// Time constant of the latency average: how long a peak takes to fade to 1/e.
const EWMA_DECAY_NS: f64 = 10e9;

/// `average` after `idle_ns` without a sample.
#[inline]
fn decayed(average: f64, idle_ns: f64) -> f64 {
    average * (-idle_ns / EWMA_DECAY_NS).exp()
}

/// The instant the process started, as far as [`uptime`] is concerned.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Time since the process started; the clock behind every timestamp kept in an atomic here.
pub fn uptime() -> Duration {
    epoch().elapsed()
}

/// [`uptime`] at `instant`: for callers that have just read the clock, so that one request
/// reads it once rather than once per thing it records.
pub fn uptime_at(instant: Instant) -> Duration {
    instant.saturating_duration_since(epoch())
}

/// Counters and flags of one backend of one pool.
#[derive(Debug)]
pub struct BackendState {
    /// The backend's address, repeated here so state can be reported on its own.
    pub addr: SocketAddr,
    /// Connections (L4) or requests in flight to it; balancers read this.
    pub active: AtomicU64,
    /// Connections (or sessions, or requests) established with it since start; failed connects
    /// are in `connect_failures` instead.
    pub total: AtomicU64,
    /// Bytes forwarded from clients to it.
    pub bytes_sent: AtomicU64,
    /// Bytes forwarded from it to clients.
    pub bytes_received: AtomicU64,
    /// Connect attempts that failed (refused, unreachable, timed out).
    pub connect_failures: AtomicU64,
    /// Failures (connect failures, 5xx answers, bodies cut off) since the last success; outlier
    /// detection reads it.
    pub consecutive_failures: AtomicU32,
    /// Times outlier detection has ejected it; each ejection lasts longer than the one before.
    pub ejections: AtomicU32,
    /// Active health probes that passed.
    pub probes_passed: AtomicU64,
    /// Active health probes that failed.
    pub probes_failed: AtomicU64,
    /// http: responses from it by status class (index 0 for 1xx ... 4 for 5xx).
    pub responses: [AtomicU64; 5],
    /// http: responses whose body it failed after their head (a reset, a stall past
    /// `response_timeout`, fewer bytes than announced): their status class says nothing of it.
    pub body_failures: AtomicU64,
    /// http: time from sending a request to its response head.
    pub response_time: crate::metrics::Histogram,
    /// Time to connect to it.
    pub connect_time: crate::metrics::Histogram,
    /// Changes made through the admin API that override the file until the next reload
    /// ([`OVERRIDE_DRAIN`], [`OVERRIDE_UNDRAIN`], [`OVERRIDE_DISABLE`], [`OVERRIDE_WEIGHT`]).
    overrides: AtomicU8,
    /// A weight set through the admin API; 0 when the file's weight holds.
    weight_override: AtomicU32,
    /// [`DOWN`], [`EJECTED`], [`DRAINING`], [`DISABLED`].
    flags: AtomicU8,
    /// Most `active` it takes; 0 is unlimited.
    max_connections: AtomicU64,
    /// [`uptime`] in milliseconds, plus one, when it last became usable; 0 when it has been
    /// usable since it was first configured. Slow start ramps from this moment.
    usable_since_ms: AtomicU64,
    /// Changes whenever an ejection starts, so a timer ends only its own ejection.
    ejection_generation: AtomicU64,
    /// The active health checks' run of results, passes and failures in a row (one of them is
    /// 0). Kept here, not in the prober, because a reload restarts the probers: were each to
    /// count from zero, reloads more frequent than `interval` × `fall` would keep a dead
    /// backend up for good.
    health_streak: [AtomicU32; 2],
    /// [`uptime`] in milliseconds, plus one, when the next health probe is due; 0 before the
    /// first prober started. A prober restarted by a reload keeps to this schedule.
    next_probe_ms: AtomicU64,
    /// Changes whenever a drain starts or ends, so a deadline closes only its own drain.
    drain_generation: AtomicU64,
    /// Peak-EWMA of response latency in nanoseconds, as `f64` bits; 0 before any sample.
    ewma_ns: AtomicU64,
    /// [`uptime`] in nanoseconds of the last latency sample.
    ewma_at_ns: AtomicU64,
    /// Cancelled when work still running on it must stop (the end of a drain); replaced after.
    /// Behind an `ArcSwap` because every pick reads it.
    closer: ArcSwap<CancellationToken>,
    /// Woken when a slot frees on a backend with a connection limit; the pool's queue waits on it.
    released: Arc<Notify>,
    /// Set when a reload took the backend out of its pool: work that can move without
    /// breaking anything (a UDP session's next datagram) moves, and no pool lists it any more.
    removed: AtomicBool,
}

impl BackendState {
    /// A fresh state with zeroed counters, usable.
    pub fn new(addr: SocketAddr) -> Self {
        Self::with_notify(addr, Arc::new(Notify::new()))
    }

    fn with_notify(addr: SocketAddr, released: Arc<Notify>) -> Self {
        BackendState {
            addr,
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            probes_passed: AtomicU64::new(0),
            probes_failed: AtomicU64::new(0),
            responses: Default::default(),
            body_failures: AtomicU64::new(0),
            response_time: crate::metrics::Histogram::default(),
            connect_time: crate::metrics::Histogram::default(),
            overrides: AtomicU8::new(0),
            weight_override: AtomicU32::new(0),
            flags: AtomicU8::new(0),
            max_connections: AtomicU64::new(0),
            usable_since_ms: AtomicU64::new(0),
            ejection_generation: AtomicU64::new(0),
            health_streak: Default::default(),
            next_probe_ms: AtomicU64::new(0),
            drain_generation: AtomicU64::new(0),
            ewma_ns: AtomicU64::new(0),
            ewma_at_ns: AtomicU64::new(0),
            closer: ArcSwap::from_pointee(CancellationToken::new()),
            released,
            removed: AtomicBool::new(false),
        }
    }

    /// Whether balancers may choose this backend.
    #[inline]
    pub fn is_usable(&self) -> bool {
        self.flags.load(Relaxed) == 0
    }

    /// Whether the backend may be chosen: usable (or, in panic mode, merely not drained or
    /// disabled) and below its connection limit.
    #[inline]
    pub fn is_eligible(&self, panic: bool) -> bool {
        let mask = if panic { ADMIN_FLAGS } else { u8::MAX };
        self.flags.load(Relaxed) & mask == 0 && !self.is_full()
    }

    /// Whether it is at its connection limit.
    #[inline]
    pub fn is_full(&self) -> bool {
        let max = self.max_connections.load(Relaxed);
        max != 0 && self.active.load(Relaxed) >= max
    }

    /// Whether a reload took the backend out of its pool (see [`Registry::retain`]).
    #[inline]
    pub fn is_removed(&self) -> bool {
        self.removed.load(Relaxed)
    }

    /// The current flags.
    pub fn flags(&self) -> u8 {
        self.flags.load(Relaxed)
    }

    /// Sets `flag`; returns whether it was clear before.
    pub fn set_flag(&self, flag: u8) -> bool {
        self.flags.fetch_or(flag, Relaxed) & flag == 0
    }

    /// Clears `flag`; returns whether it was set before. A backend that becomes usable through
    /// this starts its slow start now.
    pub fn clear_flag(&self, flag: u8) -> bool {
        let before = self.flags.fetch_and(!flag, Relaxed);
        if before & flag != 0 && before & !flag == 0 {
            self.usable_since_ms
                .store(uptime().as_millis() as u64 + 1, Relaxed);
            // Requests waiting in the pool's queue may use it now.
            self.released.notify_waiters();
        }
        before & flag != 0
    }

    /// Takes the backend in or out of rotation as an operator would ([`DISABLED`]).
    pub fn set_usable(&self, usable: bool) {
        if usable {
            self.clear_flag(DISABLED);
        } else {
            self.set_flag(DISABLED);
        }
    }

    /// Records that the admin API changed `what` (an `OVERRIDE_*` bit), replacing `clears`.
    pub fn set_override(&self, what: u8, clears: u8) {
        let _ = self
            .overrides
            .fetch_update(Relaxed, Relaxed, |o| Some((o & !clears) | what));
    }

    /// The admin API's changes in force.
    pub fn overrides(&self) -> u8 {
        self.overrides.load(Relaxed)
    }

    /// Forgets the admin API's changes: a reload puts the file back in charge.
    pub fn clear_overrides(&self) {
        self.overrides.store(0, Relaxed);
        self.weight_override.store(0, Relaxed);
        self.clear_flag(DISABLED);
    }

    /// The weight the admin API set, if any.
    pub fn weight_override(&self) -> Option<u32> {
        match self.weight_override.load(Relaxed) {
            0 => None,
            w => Some(w),
        }
    }

    /// Sets the weight through the admin API.
    pub fn set_weight_override(&self, weight: u32) {
        self.weight_override.store(weight, Relaxed);
        self.set_override(OVERRIDE_WEIGHT, 0);
    }

    /// Counts one response of `status`.
    #[inline]
    pub fn count_response(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Relaxed);
    }

    /// Sets the connection limit (`None`: unlimited).
    pub fn set_max_connections(&self, max: Option<u64>) {
        self.max_connections.store(max.unwrap_or(0), Relaxed);
    }

    /// How long it has been usable, when it became usable after being out; `None` when it has
    /// been usable since it was first configured.
    pub fn usable_for(&self) -> Option<Duration> {
        match self.usable_since_ms.load(Relaxed) {
            0 => None,
            since => Some(uptime().saturating_sub(Duration::from_millis(since - 1))),
        }
    }

    /// Counts a connection attempt as active (balancers see it at once, even while it is still
    /// connecting); the guard ends it when dropped. `total` counts it once it is
    /// [established](ActiveGuard::established).
    pub fn start(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Relaxed);
        ActiveGuard(Arc::clone(self))
    }

    /// Like [`start`](Self::start), but refuses when the backend is at its connection limit, so
    /// two connections racing for the last slot cannot both take it.
    pub fn try_start(self: &Arc<Self>) -> Option<ActiveGuard> {
        let max = self.max_connections.load(Relaxed);
        if max == 0 {
            return Some(self.start());
        }
        self.active
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| ActiveGuard(Arc::clone(self)))
    }

    /// A token cancelled when the backend's drain deadline passes: connections to it select on
    /// it to close what the drain left.
    pub fn closer(&self) -> CancellationToken {
        CancellationToken::clone(&self.closer.load())
    }

    /// Closes everything still running on the backend (holders of [`closer`](Self::closer)).
    /// Work picked afterwards gets a fresh token.
    pub fn close_all(&self) {
        self.closer
            .swap(Arc::new(CancellationToken::new()))
            .cancel();
    }

    /// Starts draining: no new work; after `timeout`, what is still running is closed. Returns
    /// false when it was draining already.
    pub fn start_drain(self: &Arc<Self>, timeout: Duration) -> bool {
        if !self.set_flag(DRAINING) {
            return false;
        }
        let generation = self.drain_generation.fetch_add(1, Relaxed) + 1;
        tracing::info!(backend = %self.addr, ?timeout, "backend draining");
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let state = Arc::clone(self);
            runtime.spawn(async move {
                tokio::time::sleep(timeout).await;
                if state.flags() & DRAINING != 0
                    && state.drain_generation.load(Relaxed) == generation
                {
                    let open = state.active.load(Relaxed);
                    tracing::info!(backend = %state.addr, open, "drain deadline: closing what is left");
                    state.close_all();
                }
            });
        }
        true
    }

    /// Ends a drain: the backend takes new work again. Returns false when it was not draining.
    pub fn end_drain(&self) -> bool {
        self.drain_generation.fetch_add(1, Relaxed);
        let ended = self.clear_flag(DRAINING);
        if ended {
            tracing::info!(backend = %self.addr, "backend no longer draining");
        }
        ended
    }

    /// Ejects the backend for `duration` (outlier detection); it returns by itself afterwards,
    /// or earlier through [`end_ejection`](Self::end_ejection).
    pub fn eject(self: &Arc<Self>, duration: Duration) {
        if !self.set_flag(EJECTED) {
            return;
        }
        let count = self.ejections.fetch_add(1, Relaxed) + 1;
        let generation = self.ejection_generation.fetch_add(1, Relaxed) + 1;
        tracing::info!(backend = %self.addr, ?duration, ejections = count, "backend ejected");
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let state = Arc::clone(self);
            runtime.spawn(async move {
                tokio::time::sleep(duration).await;
                if state.ejection_generation.load(Relaxed) == generation {
                    state.end_ejection();
                }
            });
        }
    }

    /// Changes whenever an ejection starts or ends.
    pub fn ejection_generation(&self) -> u64 {
        self.ejection_generation.load(Relaxed)
    }

    /// The health checks' passes and failures in a row, as the last prober left them.
    pub fn health_streak(&self) -> (u32, u32) {
        (
            self.health_streak[0].load(Relaxed),
            self.health_streak[1].load(Relaxed),
        )
    }

    /// Records the health checks' passes and failures in a row after a probe.
    pub fn set_health_streak(&self, successes: u32, failures: u32) {
        self.health_streak[0].store(successes, Relaxed);
        self.health_streak[1].store(failures, Relaxed);
    }

    /// When (as [`uptime`]) the next health probe is due, if a prober has set it.
    pub fn next_probe(&self) -> Option<Duration> {
        match self.next_probe_ms.load(Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms - 1)),
        }
    }

    /// Sets when (as [`uptime`]) the next health probe is due.
    pub fn set_next_probe(&self, due: Duration) {
        let ms = u64::try_from(due.as_millis()).unwrap_or(u64::MAX - 1);
        self.next_probe_ms.store(ms.saturating_add(1), Relaxed);
    }

    /// Brings an ejected backend back.
    pub fn end_ejection(&self) {
        self.ejection_generation.fetch_add(1, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
        if self.clear_flag(EJECTED) {
            tracing::info!(backend = %self.addr, "backend returns from ejection");
        }
    }

    /// Records one response latency for peak-EWMA balancing: a sample above the average
    /// replaces it at once (the "peak"), lower ones pull it down with a decay of `DECAY`.
    pub fn observe_latency(&self, latency: Duration) {
        self.observe_latency_at(latency, uptime());
    }

    /// [`observe_latency`](Self::observe_latency) for a sample taken at `now` (an [`uptime`]).
    pub fn observe_latency_at(&self, latency: Duration, now: Duration) {
        let now = now.as_nanos() as u64;
        let then = self.ewma_at_ns.swap(now, Relaxed);
        let sample = latency.as_nanos() as f64;
        let old = f64::from_bits(self.ewma_ns.load(Relaxed));
        let new = if sample > old || old == 0.0 {
            sample
        } else {
            let w = (-(now.saturating_sub(then) as f64) / EWMA_DECAY_NS).exp();
            old * w + sample * (1.0 - w)
        };
        self.ewma_ns.store(new.to_bits(), Relaxed);
    }

    /// The latency average in nanoseconds, decayed toward zero for the time since the last
    /// sample (so a backend that had one slow answer, and is then avoided, becomes worth trying
    /// again); 0.0 before any sample.
    #[inline]
    pub fn latency_ewma(&self) -> f64 {
        let average = f64::from_bits(self.ewma_ns.load(Relaxed));
        if average == 0.0 {
            return 0.0;
        }
        let idle = uptime()
            .as_nanos()
            .saturating_sub(u128::from(self.ewma_at_ns.load(Relaxed))) as f64;
        decayed(average, idle)
    }
}

/// Holds one unit of a backend's `active` count for as long as it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<BackendState>);

impl ActiveGuard {
    /// The backend this guard counts against.
    pub fn state(&self) -> &Arc<BackendState> {
        &self.0
    }

    /// Records that the connection was established, counting it in `total`.
    pub fn established(&self) {
        self.0.total.fetch_add(1, Relaxed);
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
        if self.0.max_connections.load(Relaxed) != 0 {
            // Every waiter re-checks: the one woken might not be able to use this backend
            // (already tried, or bound to another by its hash), and a single wake-up would
            // then be lost.
            self.0.released.notify_waiters();
        }
    }
}

/// Every backend state the process knows, keyed by pool name and address.
#[derive(Debug, Default)]
pub struct Registry {
    states: Mutex<HashMap<(String, SocketAddr), Arc<BackendState>>>,
    /// Backends a reload took out of their pools, while work still runs on them: the process's
    /// drain deadline must close that work too, and `states` no longer lists them.
    removed: Mutex<Vec<Weak<BackendState>>>,
    /// One wake-up per pool, shared by its backends, for the pool's queue.
    released: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Registry {
    /// The state for `addr` in `pool`, created on first use and shared afterwards.
    pub fn state(&self, pool: &str, addr: SocketAddr) -> Arc<BackendState> {
        let released = self.released(pool);
        let mut states = self
            .states
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        Arc::clone(
            states
                .entry((pool.to_owned(), addr))
                .or_insert_with(|| Arc::new(BackendState::with_notify(addr, released))),
        )
    }

    /// The wake-up that `pool`'s backends signal when a connection slot frees.
    pub fn released(&self, pool: &str) -> Arc<Notify> {
        let mut released = self
            .released
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        Arc::clone(released.entry(pool.to_owned()).or_default())
    }

    /// Forgets the backends `config` no longer has, and marks them removed; connections still
    /// open to them keep their state until they close. A backend that comes back later starts
    /// afresh.
    pub fn retain(&self, config: &crate::config::Config) {
        let mut states = self
            .states
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut removed = self
            .removed
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        // Those whose work has all ended are forgotten for good.
        removed.retain(|state| state.strong_count() > 0);
        states.retain(|(pool, addr), state| {
            let kept = config
                .pools
                .get(pool)
                .is_some_and(|p| p.backends.iter().any(|b| b.addr == *addr));
            if !kept {
                state.removed.store(true, Relaxed);
                removed.push(Arc::downgrade(state));
            }
            kept
        });
    }

    /// Closes everything still running on every backend (see [`BackendState::close_all`]),
    /// those a reload removed from their pools included: at the process's drain deadline, no
    /// connection may outlive it because its backend left the configuration.
    pub fn close_all(&self) {
        for (_, state) in self.all() {
            state.close_all();
        }
        let removed: Vec<Arc<BackendState>> = self
            .removed
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for state in removed {
            state.close_all();
        }
    }

    /// Every backend state, by pool and address.
    pub fn all(&self) -> Vec<((String, SocketAddr), Arc<BackendState>)> {
        let states = self
            .states
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        states
            .iter()
            .map(|(key, state)| (key.clone(), Arc::clone(state)))
            .collect()
    }

    /// The state for `addr` in `pool`, if that backend was ever configured.
    pub fn get(&self, pool: &str, addr: SocketAddr) -> Option<Arc<BackendState>> {
        let states = self
            .states
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        states.get(&(pool.to_owned(), addr)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_compose() {
        let state = BackendState::new(([127, 0, 0, 1], 1).into());
        assert!(state.is_usable());
        state.set_flag(DOWN);
        state.set_flag(DRAINING);
        assert!(!state.is_eligible(false));
        assert!(!state.is_eligible(true), "panic mode respects draining");
        state.clear_flag(DRAINING);
        assert!(state.is_eligible(true), "panic mode ignores health");
        assert!(state.usable_for().is_none());
        state.clear_flag(DOWN);
        assert!(state.is_usable());
        assert!(state.usable_for().is_some(), "slow start begins");
    }

    #[test]
    fn try_start_respects_the_limit() {
        let state = Arc::new(BackendState::new(([127, 0, 0, 1], 1).into()));
        state.set_max_connections(Some(2));
        let a = state.try_start();
        let b = state.try_start();
        assert!(a.is_some() && b.is_some());
        assert!(state.try_start().is_none());
        assert!(state.is_full());
        drop(a);
        assert!(state.try_start().is_some());
    }

    #[test]
    fn a_peak_fades_without_new_samples() {
        let peak = 50e6;
        assert!(decayed(peak, 0.0) == peak);
        // One time constant: to 1/e; a minute: to almost nothing, so the backend is tried again.
        assert!((decayed(peak, 10e9) - peak / std::f64::consts::E).abs() < 1.0);
        assert!(decayed(peak, 60e9) < peak / 100.0);
    }

    #[test]
    fn peak_ewma_takes_peaks_at_once() {
        let state = BackendState::new(([127, 0, 0, 1], 1).into());
        state.observe_latency(Duration::from_millis(10));
        state.observe_latency(Duration::from_millis(50));
        assert!(state.latency_ewma() <= 50e6 && state.latency_ewma() > 49e6);
        state.observe_latency(Duration::from_millis(1));
        assert!(state.latency_ewma() <= 50e6);
    }
}
