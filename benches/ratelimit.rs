//! Cost of one rate-limit check on the request path: a known client (its bucket found and
//! moved on), a client seen for the first time (a bucket made), and a full table whose new keys
//! fall to the overflow bucket. The check is a hash, a shard lock and a table lookup; it should
//! cost well under a microsecond, and allocate nothing once the table has grown (the alloc
//! columns of `known_client` and `full_table` must read 0).
//!
//! Run: `cargo bench --bench ratelimit`

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use divan::{AllocProfiler, Bencher, black_box};
use switchyard::config::{RateKey, RateLimit};
use switchyard::ratelimit::{Key, Limiter, MAX_KEYS};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

fn main() {
    divan::main();
}

/// A limit generous enough that the benchmark's clients are always served.
fn limiter() -> Limiter {
    Limiter::new(RateLimit {
        rate: 1_000_000,
        per: Duration::from_millis(1),
        burst: 100_000,
        key: RateKey::ClientIp,
    })
}

/// One client, again and again: the common case of a client within its limit.
#[divan::bench]
fn known_client(bencher: Bencher) {
    let limiter = limiter();
    let client = Key::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
    limiter.check(client);
    bencher.bench_local(|| black_box(limiter.check(black_box(client))));
}

/// A new address each time, into a table that has room (it fills over the run).
#[divan::bench]
fn new_clients(bencher: Bencher) {
    let limiter = limiter();
    let mut next = 0u32;
    bencher.bench_local(|| {
        next = next.wrapping_add(1);
        black_box(limiter.check(Key::Ip(IpAddr::V4(Ipv4Addr::from(next)))))
    });
}

/// A table full of live keys: every new key goes to its shard's overflow bucket.
#[divan::bench]
fn full_table(bencher: Bencher) {
    let limiter = Limiter::new(RateLimit {
        rate: 1,
        per: Duration::from_secs(3600),
        burst: 0,
        key: RateKey::ClientIp,
    });
    for i in 0..(2 * MAX_KEYS as u32) {
        limiter.check(Key::Ip(IpAddr::V4(Ipv4Addr::from(i))));
    }
    let mut next = 4 * MAX_KEYS as u32;
    bencher.bench_local(|| {
        next = next.wrapping_add(1);
        black_box(limiter.check(Key::Ip(IpAddr::V4(Ipv4Addr::from(next)))))
    });
}
