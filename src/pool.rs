//! Pools as the data path sees them: candidates, balancers, persistence and connect settings.
//!
//! Every way of choosing a backend goes through [`Attempts`]: it asks the pool for a pick
//! (sticky backend first, then the primaries' balancer, then the backups', then panic mode),
//! applies slow start, takes a connection slot without overshooting `max_connections`, waits in
//! the pool's queue when every backend is full, and remembers what was tried so a retry goes
//! elsewhere. Outcomes come back through [`Pool::report`] for outlier detection.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::{ActiveGuard, BackendState, EJECTED, Registry};
use crate::balance::{self, Balancer, Candidate, HashSettings, PickContext};
use crate::config::{
    Config, HashKey, MAX_CONNECT_ATTEMPTS, OutlierConfig, PoolConfig, ProxyProtocolVersion,
    QueueConfig, StickyConfig,
};
use crate::tls::{TlsStore, UpstreamConnector};

/// A pool compiled for one configuration snapshot.
#[derive(Debug)]
pub struct Pool {
    /// Name from the file, for logs.
    pub name: String,
    /// Backends: the primaries in file order, then the backups in file order.
    pub candidates: Vec<Candidate>,
    /// How many of `candidates` are primaries.
    primaries: usize,
    /// Chooses among the primaries.
    balancer: Box<dyn Balancer>,
    /// Chooses among the backups, when there are any.
    backup_balancer: Option<Box<dyn Balancer>>,
    /// Time allowed for one connect.
    pub connect_timeout: Duration,
    /// Distinct backends one connection may try.
    pub connect_attempts: usize,
    /// PROXY protocol header to prepend toward backends.
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    /// http: time a backend has to start its response, and the longest pause within one.
    pub response_timeout: Duration,
    /// http: the protocol spoken to the backends.
    pub upstream_protocol: crate::config::UpstreamProtocol,
    /// http: idle keep-alive connections kept per backend, and for how long.
    pub keepalive: crate::http::upstream::Keepalive,
    /// What maglev and ring_hash hash; `None` for the other algorithms.
    pub hash_key: Option<HashKey>,
    /// http: cookie persistence.
    pub sticky: Option<Sticky>,
    /// Passive health settings.
    outlier: Option<OutlierConfig>,
    /// Use unhealthy backends when none is healthy.
    panic_mode: bool,
    /// Ramp-up of a backend that came back.
    slow_start: Option<Duration>,
    /// Waiting room for when every backend is full.
    queue: Option<QueueConfig>,
    /// Requests waiting in `queue` now.
    queued: AtomicUsize,
    /// Signalled by the pool's backends when a connection slot frees.
    released: Arc<Notify>,
    /// Held while deciding an ejection, so the percent cap holds under concurrent failures.
    ejecting: std::sync::Mutex<()>,
    /// How long a drained backend's open work may run on.
    pub drain_timeout: Duration,
    /// The configuration it was built from, for health checks and drains.
    config: PoolConfig,
    /// http: TLS toward the backends, built from the files by `tls::TlsStore`.
    pub tls: Option<Arc<UpstreamConnector>>,
}

impl Pool {
    /// Compiles a pool, taking live backend state from `registry` and its TLS settings from
    /// `tls`, with the weights the admin API set in place of the file's.
    pub fn new(config: &PoolConfig, registry: &Registry, tls: &TlsStore) -> Pool {
        Pool::build(config, registry, tls, true)
    }

    /// Compiles a pool with the file's weights alone: for a configuration about to be put in
    /// charge, which ends the admin API's changes only once it is in force.
    pub fn from_file(config: &PoolConfig, registry: &Registry, tls: &TlsStore) -> Pool {
        Pool::build(config, registry, tls, false)
    }

    fn build(config: &PoolConfig, registry: &Registry, tls: &TlsStore, overrides: bool) -> Pool {
        let ordered = config
            .backends
            .iter()
            .filter(|b| !b.backup)
            .chain(config.backends.iter().filter(|b| b.backup));
        let candidates: Vec<Candidate> = ordered
            .map(|b| {
                let state = registry.state(&config.name, b.addr);
                state.set_max_connections(b.max_connections);
                Candidate {
                    weight: state
                        .weight_override()
                        .filter(|_| overrides)
                        .unwrap_or(b.weight),
                    state,
                }
            })
            .collect();
        let primaries = config.backends.iter().filter(|b| !b.backup).count();
        let hashing = HashSettings {
            maglev_table_size: config.maglev_table_size,
            ring_vnodes: config.ring_vnodes,
        };
        let backups = &candidates[primaries..];
        Pool {
            name: config.name.clone(),
            balancer: balance::build(config.balance, &candidates[..primaries], hashing),
            backup_balancer: (!backups.is_empty())
                .then(|| balance::build(config.balance, backups, hashing)),
            sticky: config
                .sticky
                .as_ref()
                .map(|s| Sticky::new(s, &config.name, &candidates)),
            primaries,
            candidates,
            connect_timeout: config.connect_timeout,
            connect_attempts: config.connect_attempts,
            send_proxy_protocol: config.send_proxy_protocol,
            response_timeout: config.response_timeout,
            upstream_protocol: config.upstream_protocol,
            keepalive: crate::http::upstream::Keepalive {
                connections: config.keepalive_connections,
                timeout: config.keepalive_timeout,
            },
            hash_key: config.balance.is_hashing().then(|| config.hash_key.clone()),
            outlier: config.outlier.clone(),
            panic_mode: config.panic_mode,
            slow_start: config.slow_start,
            queue: config.queue,
            queued: AtomicUsize::new(0),
            released: registry.released(&config.name),
            ejecting: std::sync::Mutex::new(()),
            drain_timeout: config.drain_timeout,
            config: config.clone(),
            tls: tls.pool(&config.name),
        }
    }

    /// The key pooled connections of this pool's backend `addr` are filed under: connections
    /// made with other TLS settings (or none) are never mixed with these.
    pub fn conn_key(&self, addr: std::net::SocketAddr) -> crate::http::upstream::ConnKey {
        (addr, self.tls.as_ref().map_or(0, |tls| tls.key()))
    }

    /// The configuration this pool was compiled from.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The hash of a client address, when the pool hashes on it.
    #[inline]
    pub fn hash_client(&self, ip: IpAddr) -> Option<u64> {
        match self.hash_key {
            Some(HashKey::SourceIp) => Some(balance::hash::hash_ip(ip)),
            _ => None,
        }
    }

    /// Starts taking this configuration's decisions: drains the backends the file marks
    /// `drain = true` and brings back the ones it no longer marks.
    pub fn apply_drains(&self) {
        for b in &self.config.backends {
            if let Some(c) = self.candidates.iter().find(|c| c.state.addr == b.addr) {
                if b.drain {
                    c.state.start_drain(self.drain_timeout);
                } else {
                    c.state.end_drain();
                }
            }
        }
    }

    /// Drains the backends the file marks `drain = true` among those not in `before`: the
    /// addresses a name resolved to anew. The others keep their drain as it is, whether the
    /// file's or the admin API's.
    pub fn apply_drains_to_new(&self, before: &std::collections::HashSet<std::net::SocketAddr>) {
        for b in self.config.backends.iter().filter(|b| b.drain) {
            if !before.contains(&b.addr)
                && let Some(c) = self.candidates.iter().find(|c| c.state.addr == b.addr)
            {
                c.state.start_drain(self.drain_timeout);
            }
        }
    }

    /// One pick, without taking a slot: sticky backend, primaries, backups, then panic mode;
    /// slow start may pass over a backend that has just come back.
    fn pick_index(&self, input: &PickInput, tried: &[usize]) -> Option<usize> {
        let ctx = PickContext {
            client: input.client,
            tried,
            hash: input.hash,
            panic: false,
            base: 0,
        };
        // The sticky backend while it can be picked; a backup one only while no primary can.
        if let Some(i) = input.preferred
            && i < self.candidates.len()
            && ctx.eligible(&self.candidates, i)
            && (i < self.primaries
                || self
                    .balancer
                    .pick(&self.candidates[..self.primaries], &ctx)
                    .is_none())
        {
            return Some(i);
        }
        let chosen = self.pick_group(&ctx).or_else(|| {
            (self.panic_mode && !self.candidates.iter().any(|c| c.state.is_usable()))
                .then(|| self.pick_group(&PickContext { panic: true, ..ctx }))
                .flatten()
        })?;
        let Some(ramp) = self.slow_start else {
            return Some(chosen);
        };
        let Some(up_for) = self.candidates[chosen].state.usable_for() else {
            return Some(chosen);
        };
        if up_for >= ramp {
            return Some(chosen);
        }
        // Admitted with probability equal to how far along its ramp it is (at least 5%), so
        // its share grows linearly; passed over, the pick goes to the next choice, if any.
        let share = (up_for.as_secs_f64() / ramp.as_secs_f64()).max(0.05);
        if fastrand::f64() < share {
            return Some(chosen);
        }
        let mut skip = [0usize; MAX_CONNECT_ATTEMPTS + 1];
        skip[..tried.len()].copy_from_slice(tried);
        skip[tried.len()] = chosen;
        let again = PickContext {
            tried: &skip[..=tried.len()],
            ..ctx
        };
        Some(self.pick_group(&again).unwrap_or(chosen))
    }

    /// The primaries' pick, else the backups'.
    fn pick_group(&self, ctx: &PickContext<'_>) -> Option<usize> {
        if let Some(i) = self.balancer.pick(&self.candidates[..self.primaries], ctx) {
            return Some(i);
        }
        let backups = self.backup_balancer.as_ref()?;
        let ctx = PickContext {
            base: self.primaries,
            ..*ctx
        };
        backups
            .pick(&self.candidates[self.primaries..], &ctx)
            .map(|i| i + self.primaries)
    }

    /// Whether a backend not yet tried is usable but full: only then is waiting worth it.
    fn any_full(&self, tried: &[usize]) -> bool {
        self.candidates
            .iter()
            .enumerate()
            .any(|(i, c)| !tried.contains(&i) && c.state.is_usable() && c.state.is_full())
    }

    /// Records the head of a response, for outlier detection: a 5xx counts against its backend
    /// at once; any other status waits for the end of its body ([`Pool::report_body`]), since
    /// a backend that answers and then fails the body is failing, and a success counted at the
    /// head would reset its count every time.
    pub fn report_head(&self, state: &Arc<BackendState>, status: u16) {
        if status >= 500 {
            self.report(state, false);
        }
    }

    /// Records how the body of a response whose head [`Pool::report_head`] saw ended: `failed`
    /// when the backend failed it (reset it, stalled past `response_timeout`, sent less than it
    /// announced), never when the client left or stopped reading, or a drain deadline cut it.
    /// A failed body counts in `body_failures`, and against the backend as one failure unless
    /// its 5xx head counted already.
    pub fn report_body(&self, state: &Arc<BackendState>, status: u16, failed: bool) {
        if failed {
            state.body_failures.fetch_add(1, Relaxed);
        }
        if status < 500 {
            self.report(state, !failed);
        }
    }

    /// Records how an exchange with a backend went, for outlier detection: `ok` is false for a
    /// connect failure, a 5xx answer or a body the backend failed.
    pub fn report(&self, state: &Arc<BackendState>, ok: bool) {
        if ok {
            if state.consecutive_failures.load(Relaxed) != 0 {
                state.consecutive_failures.store(0, Relaxed);
            }
            // A backend that has stayed back for a full maximum ejection starts over at the
            // base ejection time.
            if let Some(outlier) = &self.outlier
                && state.ejections.load(Relaxed) != 0
                && state
                    .usable_for()
                    .is_some_and(|t| t > outlier.max_ejection_time)
            {
                state.ejections.store(0, Relaxed);
            }
            return;
        }
        let failures = state.consecutive_failures.fetch_add(1, Relaxed) + 1;
        let Some(outlier) = &self.outlier else {
            return;
        };
        if failures < outlier.consecutive_failures || state.flags() & EJECTED != 0 {
            return;
        }
        // Count and eject under one lock, so two backends failing at once cannot both pass the
        // cap. Ejections are rare; the data path never takes this lock otherwise.
        let _deciding = self
            .ejecting
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if state.flags() & EJECTED != 0 {
            return;
        }
        let ejected = self
            .candidates
            .iter()
            .filter(|c| c.state.flags() & EJECTED != 0)
            .count();
        if (ejected + 1) * 100 > outlier.max_ejected_percent as usize * self.candidates.len() {
            return;
        }
        let factor = state.ejections.load(Relaxed).saturating_add(1);
        let duration = outlier
            .base_ejection_time
            .saturating_mul(factor)
            .min(outlier.max_ejection_time);
        state.eject(duration);
    }
}

/// What one request or connection picks by.
#[derive(Debug, Clone, Copy, Default)]
pub struct PickInput {
    /// The client's address.
    pub client: Option<IpAddr>,
    /// The hash key's hash, for maglev and ring_hash.
    pub hash: Option<u64>,
    /// The backend a sticky cookie names, tried first while it is eligible.
    pub preferred: Option<usize>,
    /// The sticky cookie is past half its lifetime and is to be issued again.
    pub refresh: bool,
}

/// Why no backend could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBackend {
    /// No backend was eligible at all (all down, draining or full without a queue): 503.
    Unavailable,
    /// Every attempt allowed was used, on backends that failed: 502.
    Exhausted,
    /// Every backend is full and the queue is full too: 503.
    QueueFull,
    /// Every backend stayed full for the whole queue timeout: 503.
    QueueTimeout,
}

/// A chosen backend with a connection slot taken on it.
#[derive(Debug)]
pub struct Picked<'p> {
    /// Its index in [`Pool::candidates`].
    pub index: usize,
    /// The candidate itself.
    pub candidate: &'p Candidate,
    /// The slot; dropping it frees the slot.
    pub guard: ActiveGuard,
    /// Cancelled at the backend's drain deadline. Taken at the pick, so that work picked
    /// before the deadline is ended by it, however long its exchange takes.
    pub closer: CancellationToken,
}

/// The backends one request or connection has tried, and the picking of the next.
#[derive(Debug)]
pub struct Attempts<'p> {
    pool: &'p Pool,
    input: PickInput,
    tried: [usize; MAX_CONNECT_ATTEMPTS],
    count: usize,
    limit: usize,
    /// `next` never waits in the queue: the caller holds a slot another waiter may need.
    holding: bool,
}

impl<'p> Attempts<'p> {
    /// No backend tried yet; at most the pool's `connect_attempts` will be.
    pub fn new(pool: &'p Pool, input: PickInput) -> Self {
        Attempts {
            pool,
            input,
            tried: [0; MAX_CONNECT_ATTEMPTS],
            count: 0,
            limit: pool.connect_attempts.clamp(1, MAX_CONNECT_ATTEMPTS),
            holding: false,
        }
    }

    /// No backend tried yet, for an http request: at most the pool's `retry.attempts` will be,
    /// when it has `retry`, else its `connect_attempts`.
    pub fn for_request(pool: &'p Pool, input: PickInput) -> Self {
        let mut attempts = Attempts::new(pool, input);
        if let Some(retry) = &pool.config.retry {
            attempts.limit = retry.attempts.clamp(1, MAX_CONNECT_ATTEMPTS);
        }
        attempts
    }

    /// How many backends were handed out so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// From now on, [`Self::next`] takes only a slot that is free now, and never waits in the
    /// queue (nor takes a slot ahead of those who do). For a retry that keeps the answer it
    /// passed over, and so that answer's slot: two such requests could each wait for the slot
    /// the other holds until the queue timeout, when either answer was there to give at once.
    pub fn hold_answer(&mut self) {
        self.holding = true;
    }

    /// The next backend, with a slot taken on it; waits in the pool's queue when every
    /// backend is full and the pool has one (unless [`Self::hold_answer`] said not to).
    pub async fn next(&mut self) -> Result<Picked<'p>, NoBackend> {
        if self.count == self.limit {
            return Err(NoBackend::Exhausted);
        }
        let pool = self.pool;
        // While others wait in the queue, a newcomer waits with them for the next free slot
        // rather than taking it ahead of them.
        let others_waiting = pool.queue.is_some()
            && pool.queued.load(Relaxed) > 0
            && pool.any_full(&self.tried[..self.count]);
        if !others_waiting && let Some(picked) = self.try_next() {
            return Ok(picked);
        }
        let exhausted = if self.count == 0 {
            NoBackend::Unavailable
        } else {
            NoBackend::Exhausted
        };
        let Some(queue) = pool.queue.filter(|_| !self.holding) else {
            return Err(exhausted);
        };
        if !pool.any_full(&self.tried[..self.count]) {
            return Err(exhausted);
        }
        if pool.queued.fetch_add(1, Relaxed) >= queue.size {
            pool.queued.fetch_sub(1, Relaxed);
            return Err(NoBackend::QueueFull);
        }
        let _waiting = Waiting(&pool.queued);
        let deadline = tokio::time::Instant::now() + queue.timeout;
        let mut wait_first = others_waiting;
        loop {
            let notified = pool.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let skip = wait_first && pool.any_full(&self.tried[..self.count]);
            wait_first = false;
            if !skip && let Some(picked) = self.try_next() {
                return Ok(picked);
            }
            if !pool.any_full(&self.tried[..self.count]) {
                return Err(exhausted);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(NoBackend::QueueTimeout);
            }
        }
    }

    /// Counts `index` as tried without handing it out: it will not be picked.
    pub fn exclude(&mut self, index: usize) {
        if self.count < self.limit {
            self.tried[self.count] = index;
            self.count += 1;
        }
    }

    /// The next backend if one can be had without waiting (no queue), for callers that must
    /// not wait.
    pub fn next_now(&mut self) -> Option<Picked<'p>> {
        if self.count == self.limit {
            return None;
        }
        self.try_next()
    }

    /// A pick and a slot on it, if one can be had now.
    fn try_next(&mut self) -> Option<Picked<'p>> {
        // A pick can lose the race for a backend's last slot; a few more picks then look
        // elsewhere (the full backend is no longer eligible).
        for _ in 0..4 {
            let index = self
                .pool
                .pick_index(&self.input, &self.tried[..self.count])?;
            let candidate = &self.pool.candidates[index];
            if let Some(guard) = candidate.state.try_start() {
                self.tried[self.count] = index;
                self.count += 1;
                return Some(Picked {
                    index,
                    candidate,
                    closer: candidate.state.closer(),
                    guard,
                });
            }
        }
        None
    }
}

/// Counts one request in the queue for as long as it waits (also when its wait is cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Cookie persistence: the cookie names a backend by an id derived from the secret, so it
/// reveals nothing about the backend and cannot be forged, and carries a signed expiry.
pub struct Sticky {
    /// The cookie's name.
    pub cookie: String,
    ttl: Duration,
    key: (u64, u64),
    /// Id of each candidate, by index.
    ids: Vec<u64>,
    /// Candidate index by id.
    by_id: HashMap<u64, usize>,
}

/// Without the signing key, which would let whoever reads it forge cookies.
impl std::fmt::Debug for Sticky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sticky")
            .field("cookie", &self.cookie)
            .field("ttl", &self.ttl)
            .field("backends", &self.ids.len())
            .finish_non_exhaustive()
    }
}

/// Characters of an encoded cookie value: 16 hex digits of id, 8 of expiry, 16 of signature.
const STICKY_VALUE_LEN: usize = 40;

impl Sticky {
    fn new(config: &StickyConfig, pool: &str, candidates: &[Candidate]) -> Sticky {
        let key = match &config.secret {
            Some(secret) => {
                let mut hasher = siphasher::sip128::SipHasher13::new_with_keys(0, 0);
                std::hash::Hasher::write(&mut hasher, secret.as_bytes());
                let h = siphasher::sip128::Hasher128::finish128(&hasher);
                (h.h1, h.h2)
            }
            None => process_key(),
        };
        let ids: Vec<u64> = candidates
            .iter()
            .map(|c| mac(key, format!("{pool}\0{}", c.state.addr).as_bytes()))
            .collect();
        let by_id = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        Sticky {
            cookie: config.cookie.clone(),
            ttl: config.ttl,
            key,
            ids,
            by_id,
        }
    }

    /// The candidate a cookie value names, if it is genuine and unexpired, and whether the
    /// cookie is past half its lifetime (it is then issued again, so an active session keeps
    /// its backend).
    pub fn lookup(&self, value: &[u8]) -> Option<(usize, bool)> {
        if value.len() != STICKY_VALUE_LEN || !value.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let id = parse_hex(&value[..16])?;
        let expires = parse_hex(&value[16..24])?;
        let tag = parse_hex(&value[24..])?;
        let now = unix_now();
        if tag != self.tag(id, expires as u32) || expires < now {
            return None;
        }
        let stale = expires - now < self.ttl.as_secs() / 2;
        self.by_id.get(&id).map(|&index| (index, stale))
    }

    /// The `Set-Cookie` value that names candidate `index`.
    pub fn set_cookie(&self, index: usize) -> String {
        let id = self.ids[index];
        let expires = (unix_now() + self.ttl.as_secs()).min(u64::from(u32::MAX)) as u32;
        format!(
            "{}={id:016x}{expires:08x}{:016x}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax",
            self.cookie,
            self.tag(id, expires),
            self.ttl.as_secs()
        )
    }

    fn tag(&self, id: u64, expires: u32) -> u64 {
        let mut message = [0u8; 12];
        message[..8].copy_from_slice(&id.to_le_bytes());
        message[8..].copy_from_slice(&expires.to_le_bytes());
        mac(self.key, &message)
    }
}

/// Hex digits (already checked to be hex digits) as a number.
fn parse_hex(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |n, &d| {
        let digit = (d as char).to_digit(16)?;
        Some(n << 4 | u64::from(digit))
    })
}

/// SipHash-2-4, a keyed pseudo-random function: a message authentication code for short inputs.
fn mac(key: (u64, u64), message: &[u8]) -> u64 {
    let mut hasher = siphasher::sip::SipHasher24::new_with_keys(key.0, key.1);
    std::hash::Hasher::write(&mut hasher, message);
    std::hash::Hasher::finish(&hasher)
}

/// A random key drawn once per process, for sticky pools without a `secret`.
fn process_key() -> (u64, u64) {
    static KEY: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
    *KEY.get_or_init(|| {
        let mut bytes = [0u8; 16];
        // SAFETY: the buffer is valid for writes of its length.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        if n != bytes.len() as isize {
            // The kernel's generator is always there on Linux 3.17+; this is a last resort.
            let seed = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            bytes[..8].copy_from_slice(&seed.to_le_bytes());
            bytes[8..].copy_from_slice(&fastrand::u64(..).to_le_bytes());
        }
        let (a, b) = bytes.split_at(8);
        (
            u64::from_le_bytes(a.try_into().unwrap_or_default()),
            u64::from_le_bytes(b.try_into().unwrap_or_default()),
        )
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Everything the data path reads from the configuration, compiled once and shared immutably.
/// A reload builds a new one; a connection keeps the snapshot it started with.
#[derive(Debug)]
pub struct Snapshot {
    /// Pools by name.
    pub pools: HashMap<String, Arc<Pool>>,
}

impl Snapshot {
    /// Compiles every pool of `config`, with the TLS settings `tls` built from it.
    pub fn new(config: &Config, registry: &Registry, tls: &TlsStore) -> Snapshot {
        Snapshot::from_pools(&config.pools, registry, tls)
    }

    /// Compiles these pools, with the file's weights: the snapshot of a configuration put in
    /// charge, where the admin API's weights end.
    pub fn from_pools(
        pools: &BTreeMap<String, PoolConfig>,
        registry: &Registry,
        tls: &TlsStore,
    ) -> Snapshot {
        let pools = pools
            .values()
            .map(|p| (p.name.clone(), Arc::new(Pool::from_file(p, registry, tls))))
            .collect();
        Snapshot { pools }
    }

    /// The pool called `name`; validation guarantees that names in the config exist.
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(name)
    }

    /// Puts the snapshot's decisions in force: drains from the file, and health checks, which
    /// run until `stop` is cancelled. Each pool's checks also stop with the token returned for
    /// it, so that a pool rebuilt alone (its names resolved to other addresses) can restart
    /// its own.
    pub fn activate(&self, stop: &CancellationToken) -> HashMap<String, CancellationToken> {
        self.pools
            .values()
            .map(|pool| {
                pool.apply_drains();
                let own = stop.child_token();
                crate::health::spawn(pool, own.clone());
                (pool.name.clone(), own)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;

    fn pool(backends: &[(u16, bool)], edit: impl FnOnce(&mut PoolConfig)) -> (Pool, Registry) {
        let registry = Registry::default();
        let mut config = PoolConfig::with_defaults(
            "p",
            backends
                .iter()
                .map(|&(port, backup)| BackendConfig {
                    addr: ([127, 0, 0, 1], port).into(),
                    weight: 1,
                    backup,
                    drain: false,
                    max_connections: None,
                })
                .collect(),
        );
        config.connect_timeout = Duration::from_secs(1);
        edit(&mut config);
        let pool = Pool::new(&config, &registry, &TlsStore::default());
        (pool, registry)
    }

    fn pick(pool: &Pool) -> Option<u16> {
        pool.pick_index(&PickInput::default(), &[])
            .map(|i| pool.candidates[i].state.addr.port())
    }

    #[test]
    fn backups_only_when_no_primary_is_usable() {
        let (pool, _) = pool(&[(1, false), (2, true), (3, false)], |_| {});
        let picks: Vec<_> = (0..4).map(|_| pick(&pool)).collect();
        assert!(picks.iter().all(|p| *p != Some(2)), "{picks:?}");
        pool.candidates[0].state.set_usable(false);
        pool.candidates[1].state.set_usable(false);
        assert_eq!(pick(&pool), Some(2));
    }

    #[test]
    fn panic_mode_uses_unhealthy_backends_but_not_drained_ones() {
        let (pool, _) = pool(&[(1, false), (2, false)], |c| c.panic_mode = true);
        pool.candidates[0].state.set_flag(crate::backend::DOWN);
        pool.candidates[1].state.set_flag(crate::backend::DRAINING);
        assert_eq!(pick(&pool), Some(1));
        let (strict, _) = self::pool(&[(1, false)], |_| {});
        strict.candidates[0].state.set_flag(crate::backend::DOWN);
        assert_eq!(pick(&strict), None);
    }

    #[test]
    fn slow_start_ramps_a_backend_that_came_back() {
        let (pool, _) = pool(&[(1, false), (2, false)], |c| {
            c.slow_start = Some(Duration::from_secs(3600))
        });
        pool.candidates[1].state.set_flag(crate::backend::DOWN);
        pool.candidates[1].state.clear_flag(crate::backend::DOWN);
        let to_new = (0..10_000).filter(|_| pick(&pool) == Some(2)).count();
        // Just back: about 5% of its turns (half the picks are its turns).
        assert!(to_new < 600, "{to_new}");
        assert!(to_new > 100, "{to_new}");
    }

    #[test]
    fn sticky_cookies_round_trip_and_resist_forgery() {
        let sticky_config = StickyConfig {
            cookie: "SWY".into(),
            ttl: Duration::from_secs(60),
            secret: Some("a shared secret value".into()),
        };
        let (pool, _) = pool(&[(1, false), (2, false)], |c| {
            c.sticky = Some(sticky_config.clone())
        });
        let sticky = pool.sticky.as_ref().unwrap();
        let cookie = sticky.set_cookie(1);
        let value = cookie
            .strip_prefix("SWY=")
            .and_then(|v| v.split(';').next())
            .unwrap();
        assert!(!value.contains("127.0.0.1"));
        assert_eq!(sticky.lookup(value.as_bytes()), Some((1, false)));
        // Neither the secret nor the key derived from it shows in a debug print.
        let printed = format!("{sticky:?} {sticky_config:?}");
        assert!(!printed.contains("shared secret"), "{printed}");
        assert!(!printed.contains(&sticky.key.0.to_string()), "{printed}");
        // The same secret elsewhere accepts it.
        let (other, _) = self::pool(&[(1, false), (2, false)], |c| {
            c.sticky = Some(sticky_config)
        });
        assert_eq!(
            other.sticky.as_ref().unwrap().lookup(value.as_bytes()),
            Some((1, false))
        );
        // A tampered id or signature does not.
        let mut forged = value.as_bytes().to_vec();
        forged[3] = if forged[3] == b'0' { b'1' } else { b'0' };
        assert_eq!(sticky.lookup(&forged), None);
        assert_eq!(sticky.lookup(b"garbage"), None);
        // Odd bytes of the right length: refused, never a panic.
        let mut odd = value.as_bytes().to_vec();
        odd.splice(15..17, "é".bytes());
        assert_eq!(odd.len(), 40);
        assert_eq!(sticky.lookup(&odd), None);
        let mut plus = value.as_bytes().to_vec();
        plus[0] = b'+';
        assert_eq!(sticky.lookup(&plus), None);
        assert_eq!(sticky.lookup(&[0xff; 40]), None);
    }

    #[tokio::test]
    async fn outlier_detection_ejects_within_the_percent_cap() {
        let (pool, _) = pool(&[(1, false), (2, false)], |c| {
            c.outlier = Some(OutlierConfig {
                consecutive_failures: 3,
                base_ejection_time: Duration::from_secs(60),
                max_ejection_time: Duration::from_secs(600),
                max_ejected_percent: 50,
            })
        });
        let (a, b) = (&pool.candidates[0].state, &pool.candidates[1].state);
        pool.report(a, false);
        pool.report(a, false);
        pool.report(a, true);
        pool.report(a, false);
        pool.report(a, false);
        assert!(a.is_usable(), "a success resets the count");
        pool.report(a, false);
        assert!(!a.is_usable());
        for _ in 0..5 {
            pool.report(b, false);
        }
        assert!(b.is_usable(), "at most half the pool is ejected");
        a.end_ejection();
        assert!(a.is_usable());
    }

    #[tokio::test]
    async fn the_ejection_cap_counts_the_backend_about_to_go() {
        let outlier = OutlierConfig {
            consecutive_failures: 1,
            base_ejection_time: Duration::from_secs(60),
            max_ejection_time: Duration::from_secs(600),
            max_ejected_percent: 50,
        };
        let (single, _) = pool(&[(1, false)], |c| c.outlier = Some(outlier.clone()));
        single.report(&single.candidates[0].state, false);
        assert!(single.candidates[0].state.is_usable(), "50% of one is none");
        let (three, _) = pool(&[(1, false), (2, false), (3, false)], |c| {
            c.outlier = Some(outlier.clone())
        });
        for c in &three.candidates {
            three.report(&c.state, false);
        }
        let ejected = three
            .candidates
            .iter()
            .filter(|c| !c.state.is_usable())
            .count();
        assert_eq!(ejected, 1, "one of three is 33%, two would be 67%");
    }

    #[tokio::test]
    async fn a_sticky_backup_yields_to_primaries() {
        let (pool, _) = pool(&[(1, false), (2, true)], |_| {});
        let input = PickInput {
            preferred: Some(1),
            ..PickInput::default()
        };
        assert_eq!(pool.pick_index(&input, &[]), Some(0));
        pool.candidates[0].state.set_usable(false);
        assert_eq!(pool.pick_index(&input, &[]), Some(1));
    }

    #[tokio::test]
    async fn every_waiter_rechecks_when_a_slot_frees() {
        // Two backends of one slot each, both held. A waiter that already tried backend 0 and
        // one that may use either: freeing backend 0 must serve the second even if the first
        // is woken first.
        let (pool, _) = pool(&[(1, false), (2, false)], |c| {
            c.backends[0].max_connections = Some(1);
            c.backends[1].max_connections = Some(1);
            c.queue = Some(QueueConfig {
                size: 4,
                timeout: Duration::from_secs(5),
            });
        });
        let pool = Arc::new(pool);
        let first = Attempts::new(&pool, PickInput::default())
            .next()
            .await
            .unwrap();
        let second = Attempts::new(&pool, PickInput::default())
            .next()
            .await
            .unwrap();
        let held_zero = if first.index == 0 { first } else { second };
        let picky = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                let mut attempts = Attempts::new(&pool, PickInput::default());
                attempts.exclude(0);
                attempts.next().await.map(|p| p.index)
            })
        };
        while pool.queued.load(Relaxed) < 1 {
            tokio::task::yield_now().await;
        }
        let open = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                Attempts::new(&pool, PickInput::default())
                    .next()
                    .await
                    .map(|p| p.index)
            })
        };
        while pool.queued.load(Relaxed) < 2 {
            tokio::task::yield_now().await;
        }
        drop(held_zero);
        assert_eq!(open.await.unwrap(), Ok(0));
        picky.abort();
    }

    #[tokio::test]
    async fn queue_waits_for_a_slot_then_times_out() {
        let (pool, _) = pool(&[(1, false)], |c| {
            c.backends[0].max_connections = Some(1);
            c.queue = Some(QueueConfig {
                size: 1,
                timeout: Duration::from_millis(200),
            });
        });
        let pool = Arc::new(pool);
        let first = Attempts::new(&pool, PickInput::default())
            .next()
            .await
            .unwrap();
        // A second waits, and gets the slot once the first frees it.
        let waiter = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                Attempts::new(&pool, PickInput::default())
                    .next()
                    .await
                    .map(|p| p.index)
            })
        };
        while pool.queued.load(Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        // The queue holds one: a third is refused at once.
        assert_eq!(
            Attempts::new(&pool, PickInput::default())
                .next()
                .await
                .err(),
            Some(NoBackend::QueueFull)
        );
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(0));
        // Held and never freed: the wait ends at the timeout.
        let _held = Attempts::new(&pool, PickInput::default())
            .next()
            .await
            .unwrap();
        assert_eq!(
            Attempts::new(&pool, PickInput::default())
                .next()
                .await
                .err(),
            Some(NoBackend::QueueTimeout)
        );
    }
}
