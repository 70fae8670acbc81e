//! Cost of one balancer pick, per algorithm and pool size. The allocation profiler shows that a
//! pick allocates nothing: its alloc columns must read 0.
//!
//! Run: `cargo bench --bench balance`

use std::sync::Arc;

use divan::{AllocProfiler, Bencher, black_box};
use switchyard::backend::BackendState;
use switchyard::balance::{self, Candidate, HashSettings, PickContext};
use switchyard::config::BalanceKind;

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

fn main() {
    divan::main();
}

fn candidates(n: usize, weighted: bool) -> Vec<Candidate> {
    (0..n)
        .map(|i| Candidate {
            weight: if weighted { 1 + (i as u32 % 5) } else { 1 },
            state: Arc::new(BackendState::new(
                ([10, 0, (i / 256) as u8, (i % 256) as u8], 80).into(),
            )),
        })
        .collect()
}

const KINDS: [BalanceKind; 7] = [
    BalanceKind::RoundRobin,
    BalanceKind::LeastConn,
    BalanceKind::Random,
    BalanceKind::P2c,
    BalanceKind::P2cEwma,
    BalanceKind::Maglev,
    BalanceKind::RingHash,
];

#[divan::bench(args = KINDS, consts = [2, 16, 128])]
fn pick<const N: usize>(bencher: Bencher, kind: BalanceKind) {
    let candidates = candidates(N, true);
    let balancer = balance::build(kind, &candidates, HashSettings::default());
    let ctx = PickContext {
        client: Some([192, 0, 2, 1].into()),
        hash: Some(0x1234_5678_9abc_def0),
        ..PickContext::default()
    };
    bencher.bench_local(|| black_box(balancer.pick(black_box(&candidates), &ctx)));
}

/// A retry: the first choice failed, so it is excluded.
#[divan::bench(args = KINDS)]
fn pick_after_one_failure(bencher: Bencher, kind: BalanceKind) {
    let candidates = candidates(16, false);
    let balancer = balance::build(kind, &candidates, HashSettings::default());
    let tried = [3usize];
    let ctx = PickContext {
        tried: &tried,
        hash: Some(0x1234_5678_9abc_def0),
        ..PickContext::default()
    };
    bencher.bench_local(|| black_box(balancer.pick(black_box(&candidates), &ctx)));
}

/// The whole pick as the data path makes it: `Attempts` over a pool (sticky preference, backups,
/// slow start checks, and taking a connection slot without overshooting `max_connections`).
#[divan::bench(args = KINDS)]
fn pool_attempt(bencher: Bencher, kind: BalanceKind) {
    use switchyard::backend::Registry;
    use switchyard::config::{BackendConfig, PoolConfig};
    use switchyard::pool::{Attempts, PickInput, Pool};
    let registry = Registry::default();
    let mut config = PoolConfig::with_defaults(
        "bench",
        (0..16u16)
            .map(|i| BackendConfig {
                addr: ([10, 0, 0, 1], 8000 + i).into(),
                weight: 1 + u32::from(i % 5),
                backup: i >= 14,
                drain: false,
                max_connections: Some(1_000_000),
            })
            .collect(),
    );
    config.balance = kind;
    config.slow_start = Some(std::time::Duration::from_secs(30));
    let pool = Pool::new(&config, &registry, &switchyard::tls::TlsStore::default());
    let input = PickInput {
        client: Some([192, 0, 2, 1].into()),
        hash: Some(0x1234_5678_9abc_def0),
        preferred: None,
        refresh: false,
    };
    bencher.bench_local(|| {
        let mut attempts = Attempts::new(black_box(&pool), input);
        black_box(attempts.next_now().map(|picked| picked.index))
    });
}
