//! Rate limits: how often one client (an address, or the value of a header) may be served.
//!
//! Each limit is a [`Limiter`]: the generic cell rate algorithm (GCRA), which is a token bucket
//! kept as one number per key, the "theoretical arrival time" (TAT) of the next request that
//! would find the bucket full. A request at `now` is admitted when `TAT - now` is within the
//! burst tolerance, and then moves the TAT one interval (`per / rate`) on. A key whose TAT has
//! passed has a full bucket, which is the same as having no entry: such entries are swept away,
//! and nothing is lost by it.
//!
//! Memory is bounded: the table holds at most [`MAX_KEYS`] keys, in shards of their own lock
//! (held for one lookup, never across an await). Keys are stored as a keyed 64-bit hash, so an
//! entry is 16 bytes whatever the header value was, and a client cannot choose values that
//! collide. A key that finds its shard full (after sweeping what has expired) shares the
//! shard's one overflow bucket with every other such key: a flood of new addresses is limited
//! as one client, and the clients already in the table keep their own buckets.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{RateKey, RateLimit};

/// The most keys one limit tracks at once (16 bytes each, plus the table's overhead: about
/// 1.2 MiB for a full limit).
pub const MAX_KEYS: usize = 65_536;

/// Shards of the table, each behind its own lock, so that threads serving different clients
/// seldom wait for one another.
const SHARDS: usize = 16;

/// Keys one shard holds.
const SHARD_KEYS: usize = MAX_KEYS / SHARDS;

/// How often a shard that is not full drops its expired entries, so that the memory of a past
/// flood is given back.
const SWEEP_EVERY: u64 = 10_000_000_000;

/// What a request is limited by, borrowed from the request.
#[derive(Debug, Clone, Copy)]
pub enum Key<'a> {
    /// The client's address.
    Ip(IpAddr),
    /// A header's value.
    Value(&'a [u8]),
}

impl<'a> Key<'a> {
    /// The key of a request from `client` under `limit`: the header's value, or (for requests
    /// without it, and for limits on the address) the client's address.
    pub fn of(limit: &RateLimit, client: IpAddr, header: Option<&'a [u8]>) -> Key<'a> {
        match (&limit.key, header) {
            (RateKey::Header(_), Some(value)) => Key::Value(value),
            _ => Key::Ip(client.to_canonical()),
        }
    }
}

/// The answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Served, and counted.
    Allow,
    /// Over the limit; a request this much later would be served.
    Deny(Duration),
}

impl Verdict {
    /// The `Retry-After` value of a refusal: whole seconds, rounded up (at least 1).
    pub fn retry_after_secs(wait: Duration) -> u64 {
        wait.as_nanos().div_ceil(1_000_000_000).max(1) as u64
    }
}

/// One limit's buckets.
pub struct Limiter {
    /// The limit as configured, so that a reload can tell whether it changed.
    config: RateLimit,
    /// Nanoseconds between two requests at the sustained rate (`per / rate`).
    interval: u64,
    /// How far ahead of `now` a TAT may be for a request to pass: `burst` intervals.
    tolerance: u64,
    /// Time zero of the TATs.
    epoch: Instant,
    /// The keys of the hash that names a key in the table, drawn at random per limit.
    seed: (u64, u64),
    shards: Box<[Mutex<Shard>]>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("config", &self.config)
            .field("keys", &self.len())
            .finish()
    }
}

/// One shard of the table.
#[derive(Default)]
struct Shard {
    /// TAT by key hash.
    tats: HashMap<u64, u64, BuildHasherDefault<Prehashed>>,
    /// The TAT shared by keys that found the shard full.
    overflow: u64,
    /// No TAT in the table is earlier than this: before it, a sweep would free nothing.
    earliest: u64,
    /// When the shard was last swept.
    swept: u64,
}

/// The hasher of keys that already are a keyed hash: they are used as they are.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; this keeps any other use correct, if slower.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The GCRA step: given a key's TAT (`None`: no entry), whether a request at `now` passes, and
/// the key's new TAT if it does, or how long it must wait if not.
fn decide(tat: Option<u64>, now: u64, interval: u64, tolerance: u64) -> Result<u64, u64> {
    let tat = tat.map_or(now, |tat| tat.max(now));
    let ahead = tat - now;
    if ahead > tolerance {
        Err(ahead - tolerance)
    } else {
        Ok(tat.saturating_add(interval))
    }
}

impl Limiter {
    /// An empty table for `config`.
    pub fn new(config: RateLimit) -> Limiter {
        let per = u64::try_from(config.per.as_nanos()).unwrap_or(u64::MAX);
        let interval = (per / u64::from(config.rate.max(1))).max(1);
        Limiter {
            tolerance: interval.saturating_mul(u64::from(config.burst)),
            interval,
            config,
            epoch: Instant::now(),
            seed: (fastrand::u64(..), fastrand::u64(..)),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    /// The limit this table enforces.
    pub fn config(&self) -> &RateLimit {
        &self.config
    }

    /// Counts one request of `key` now.
    pub fn check(&self, key: Key<'_>) -> Verdict {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.check_at(key, now)
    }

    /// Counts one request of `key` at `now` nanoseconds after the table was made (tests give
    /// their own clock).
    pub fn check_at(&self, key: Key<'_>, now: u64) -> Verdict {
        let hash = self.hash(key);
        let shard = &self.shards[(hash >> 32) as usize % SHARDS];
        let mut guard = shard.lock().unwrap_or_else(|poison| poison.into_inner());
        let shard = &mut *guard;
        let full = shard.tats.len() >= SHARD_KEYS;
        if now >= shard.earliest && (full || now >= shard.swept.saturating_add(SWEEP_EVERY)) {
            shard.sweep(now);
        }
        let (interval, tolerance) = (self.interval, self.tolerance);
        let room = shard.tats.len() < SHARD_KEYS;
        let verdict = match shard.tats.entry(hash) {
            Entry::Occupied(mut tat) => {
                decide(Some(*tat.get()), now, interval, tolerance).map(|next| *tat.get_mut() = next)
            }
            Entry::Vacant(slot) if room => decide(None, now, interval, tolerance).map(|next| {
                slot.insert(next);
                shard.earliest = shard.earliest.min(next);
            }),
            Entry::Vacant(_) => decide(Some(shard.overflow), now, interval, tolerance)
                .map(|next| shard.overflow = next),
        };
        match verdict {
            Ok(()) => Verdict::Allow,
            Err(wait) => Verdict::Deny(Duration::from_nanos(wait)),
        }
    }

    /// Keys with a bucket of their own now (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).tats.len())
            .sum()
    }

    /// Whether no key has a bucket of its own.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn hash(&self, key: Key<'_>) -> u64 {
        let mut hasher = siphasher::sip::SipHasher13::new_with_keys(self.seed.0, self.seed.1);
        match key {
            Key::Ip(ip) => {
                let octets = match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                    IpAddr::V6(v6) => v6.octets(),
                };
                hasher.write_u8(0);
                hasher.write(&octets);
            }
            Key::Value(value) => {
                hasher.write_u8(1);
                hasher.write(value);
            }
        }
        hasher.finish()
    }
}

impl Shard {
    /// Drops the entries whose bucket is full again (TAT passed), and learns the earliest TAT
    /// left.
    fn sweep(&mut self, now: u64) {
        let mut earliest = u64::MAX;
        self.tats.retain(|_, &mut tat| {
            let keep = tat > now;
            if keep {
                earliest = earliest.min(tat);
            }
            keep
        });
        self.earliest = earliest;
        self.swept = now;
        if self.tats.capacity() > 64 && self.tats.len() < self.tats.capacity() / 4 {
            self.tats.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const SECOND: u64 = 1_000_000_000;

    fn limit(rate: u32, per: Duration, burst: u32) -> Limiter {
        Limiter::new(RateLimit {
            rate,
            per,
            burst,
            key: RateKey::ClientIp,
        })
    }

    fn ip(last: u8) -> Key<'static> {
        Key::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)))
    }

    #[test]
    fn a_quiet_client_gets_its_burst_and_one_then_waits_one_interval() {
        // 10 a second: one every 100 ms, and 3 more at once.
        let limiter = limit(10, Duration::from_secs(1), 3);
        for _ in 0..4 {
            assert_eq!(limiter.check_at(ip(1), 0), Verdict::Allow);
        }
        assert_eq!(
            limiter.check_at(ip(1), 0),
            Verdict::Deny(Duration::from_millis(100))
        );
        // Refused requests are not counted: the wait does not grow.
        assert_eq!(
            limiter.check_at(ip(1), 40 * SECOND / 1000),
            Verdict::Deny(Duration::from_millis(60))
        );
        assert_eq!(limiter.check_at(ip(1), SECOND / 10), Verdict::Allow);
        assert!(matches!(
            limiter.check_at(ip(1), SECOND / 10),
            Verdict::Deny(_)
        ));
        // Another client has its own bucket.
        assert_eq!(limiter.check_at(ip(2), SECOND / 10), Verdict::Allow);
    }

    #[test]
    fn the_bucket_refills_at_the_rate_and_no_further() {
        let limiter = limit(2, Duration::from_secs(1), 1);
        assert_eq!(limiter.check_at(ip(1), 0), Verdict::Allow);
        assert_eq!(limiter.check_at(ip(1), 0), Verdict::Allow);
        assert!(matches!(limiter.check_at(ip(1), 0), Verdict::Deny(_)));
        // A long pause fills the bucket, but only to burst + 1.
        let later = 3600 * SECOND;
        assert_eq!(limiter.check_at(ip(1), later), Verdict::Allow);
        assert_eq!(limiter.check_at(ip(1), later), Verdict::Allow);
        assert_eq!(
            limiter.check_at(ip(1), later),
            Verdict::Deny(Duration::from_millis(500))
        );
    }

    #[test]
    fn without_burst_requests_are_spaced_by_the_interval() {
        let limiter = limit(100, Duration::from_secs(1), 0);
        let mut now = 0;
        for _ in 0..1000 {
            assert_eq!(limiter.check_at(ip(1), now), Verdict::Allow);
            assert!(matches!(limiter.check_at(ip(1), now), Verdict::Deny(_)));
            now += SECOND / 100;
        }
    }

    #[test]
    fn threads_checking_one_key_at_once_are_served_exactly_the_burst() {
        // As with `--threads N`: every check of one key is counted once, none lost or doubled.
        let limiter = limit(1, Duration::from_secs(60), 99);
        let served = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        if limiter.check_at(ip(1), 0) == Verdict::Allow {
                            served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(served.into_inner(), 100);
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(Verdict::retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(Verdict::retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(Verdict::retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(Verdict::retry_after_secs(Duration::ZERO), 1);
    }

    #[test]
    fn header_values_and_addresses_are_different_keys() {
        let limiter = Limiter::new(RateLimit {
            rate: 1,
            per: Duration::from_secs(60),
            burst: 0,
            key: RateKey::Header("x-api-key".into()),
        });
        let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let config = limiter.config().clone();
        let with = |value| Key::of(&config, client, value);
        assert_eq!(limiter.check_at(with(Some(b"a")), 0), Verdict::Allow);
        assert!(matches!(
            limiter.check_at(with(Some(b"a")), 0),
            Verdict::Deny(_)
        ));
        assert_eq!(limiter.check_at(with(Some(b"b")), 0), Verdict::Allow);
        // Without the header: the address, not a value.
        assert_eq!(limiter.check_at(with(None), 0), Verdict::Allow);
        assert!(matches!(limiter.check_at(with(None), 0), Verdict::Deny(_)));
        // An IPv4-mapped address is the IPv4 one.
        let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
        assert!(matches!(
            limiter.check_at(Key::of(&config, mapped, None), 0),
            Verdict::Deny(_)
        ));
    }

    #[test]
    fn a_flood_of_keys_stays_within_the_cap_and_shares_one_bucket_per_shard() {
        let limiter = limit(1, Duration::from_secs(60), 0);
        let mut refused = 0;
        for i in 0..(4 * MAX_KEYS as u64) {
            let value = i.to_le_bytes();
            if limiter.check_at(Key::Value(&value), 0) != Verdict::Allow {
                refused += 1;
            }
        }
        assert!(limiter.len() <= MAX_KEYS);
        // Nearly every key past the cap was refused: only the first in each shard's overflow
        // bucket went through.
        assert!(refused >= 3 * MAX_KEYS - SHARDS, "{refused}");
        // A key that had a bucket of its own before the flood still has it.
        assert!(matches!(
            limiter.check_at(Key::Value(&0u64.to_le_bytes()), 0),
            Verdict::Deny(_)
        ));
    }

    #[test]
    fn expired_buckets_are_swept_and_make_room() {
        let limiter = limit(1, Duration::from_secs(1), 0);
        for i in 0..(MAX_KEYS as u64) {
            limiter.check_at(Key::Value(&i.to_le_bytes()), 0);
        }
        let filled = limiter.len();
        assert!(filled > MAX_KEYS * 9 / 10, "{filled}");
        // Two seconds on, every bucket is full again: new keys get buckets of their own (half
        // as many, so that no shard gets more than it holds), the old entries making room.
        let later = 2 * SECOND;
        for i in 0..(MAX_KEYS as u64 / 2) {
            let key = (i + MAX_KEYS as u64).to_le_bytes();
            assert_eq!(limiter.check_at(Key::Value(&key), later), Verdict::Allow);
        }
        assert!(limiter.len() <= MAX_KEYS);
        // A shard that is not full sweeps too, after a while.
        let much_later = later + SWEEP_EVERY + 2 * SECOND;
        for i in 0..(SHARDS as u64 * 64) {
            limiter.check_at(Key::Value(&(u64::MAX - i).to_le_bytes()), much_later);
        }
        assert!(limiter.len() <= SHARDS * 64, "{}", limiter.len());
    }
}
