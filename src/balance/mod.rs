//! Choosing a backend: one [`Balancer`] trait, one file per algorithm.
//!
//! Balancers are built once per pool per configuration snapshot, then called concurrently from
//! every worker. A pick never blocks and never allocates: per-pick state is atomics only, and
//! anything expensive (the smooth round-robin order, weight prefix sums) is computed at build time.
//! Every algorithm skips backends that are not usable and the ones this connection already tried.

pub mod hash;
mod least_conn;
mod maglev;
mod p2c;
mod random;
mod ring_hash;
mod round_robin;

use std::net::IpAddr;
use std::sync::Arc;

use crate::backend::BackendState;
use crate::config::BalanceKind;

pub use least_conn::LeastConn;
pub use maglev::Maglev;
pub use p2c::{PeakEwma, PowerOfTwo};
pub use random::WeightedRandom;
pub use ring_hash::RingHash;
pub use round_robin::SmoothRoundRobin;

/// A backend as a balancer sees it: its weight in this snapshot and its live state.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Relative share, 1..=256.
    pub weight: u32,
    /// Live counters and the usable flag.
    pub state: Arc<BackendState>,
}

/// What a balancer knows about the connection it picks for.
#[derive(Debug, Clone, Copy, Default)]
pub struct PickContext<'a> {
    /// The client's address (after the PROXY protocol, if any); hashing algorithms key on it.
    pub client: Option<IpAddr>,
    /// Indexes already tried for this connection; they are skipped.
    pub tried: &'a [usize],
    /// The request's hash key, for maglev and ring_hash; without one they fall back to round
    /// robin.
    pub hash: Option<u64>,
    /// Panic mode: backends that health checks or outlier detection took out are eligible
    /// again (drained and disabled ones still are not).
    pub panic: bool,
    /// What to add to a candidate's index before looking it up in `tried`: the balancer of a
    /// pool's backup backends sees them from 0, the pool numbers them after the primaries.
    pub base: usize,
}

impl PickContext<'_> {
    /// Whether `index` may be chosen: usable, below its connection limit and not tried yet.
    #[inline]
    pub fn eligible(&self, candidates: &[Candidate], index: usize) -> bool {
        candidates[index].state.is_eligible(self.panic)
            && !self.tried.contains(&(self.base + index))
    }
}

/// A way of choosing among a pool's backends.
pub trait Balancer: Send + Sync + std::fmt::Debug {
    /// The index of the chosen candidate, or `None` when no candidate is eligible.
    fn pick(&self, candidates: &[Candidate], ctx: &PickContext<'_>) -> Option<usize>;
}

/// Settings of the hashing algorithms.
#[derive(Debug, Clone, Copy)]
pub struct HashSettings {
    /// Maglev table size (a prime).
    pub maglev_table_size: usize,
    /// Ring points per backend of average weight.
    pub ring_vnodes: u32,
}

impl Default for HashSettings {
    fn default() -> Self {
        HashSettings {
            maglev_table_size: crate::config::DEFAULT_MAGLEV_TABLE_SIZE,
            ring_vnodes: crate::config::DEFAULT_RING_VNODES,
        }
    }
}

/// Builds the balancer of `kind` for these candidates.
pub fn build(
    kind: BalanceKind,
    candidates: &[Candidate],
    hashing: HashSettings,
) -> Box<dyn Balancer> {
    match kind {
        BalanceKind::RoundRobin => Box::new(SmoothRoundRobin::new(candidates)),
        BalanceKind::LeastConn => Box::new(LeastConn::new()),
        BalanceKind::Random => Box::new(WeightedRandom::new(candidates)),
        BalanceKind::P2c => Box::new(PowerOfTwo::new()),
        BalanceKind::P2cEwma => Box::new(PeakEwma::new()),
        BalanceKind::Maglev => Box::new(Maglev::new(candidates, hashing.maglev_table_size)),
        BalanceKind::RingHash => Box::new(RingHash::new(candidates, hashing.ring_vnodes)),
    }
}

/// `a` carries less load per unit of weight than `b` (cross-multiplied, so no division).
#[inline]
fn less_loaded(a: &Candidate, b: &Candidate) -> bool {
    let load_a = a.state.active.load(std::sync::atomic::Ordering::Relaxed);
    let load_b = b.state.active.load(std::sync::atomic::Ordering::Relaxed);
    u128::from(load_a) * u128::from(b.weight) < u128::from(load_b) * u128::from(a.weight)
}

/// A uniformly random eligible candidate: a few draws, then a scan from a random start. When
/// some backends are out, their share spreads evenly over the rest instead of falling on the
/// neighbour that a plain "next one" scan would always find.
#[inline]
fn random_eligible(candidates: &[Candidate], ctx: &PickContext<'_>) -> Option<usize> {
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    for _ in 0..RANDOM_DRAWS {
        let i = fastrand::usize(0..n);
        if ctx.eligible(candidates, i) {
            return Some(i);
        }
    }
    first_eligible(candidates, ctx, fastrand::usize(0..n))
}

/// Random draws tried before falling back to a scan; with half the pool out, 8 draws all miss
/// with probability 1/256, and the scan still starts at a random place.
const RANDOM_DRAWS: usize = 8;

/// The first eligible candidate at or after `start`, wrapping around.
#[inline]
fn first_eligible(candidates: &[Candidate], ctx: &PickContext<'_>, start: usize) -> Option<usize> {
    let n = candidates.len();
    (0..n)
        .map(|offset| (start + offset) % n)
        .find(|&i| ctx.eligible(candidates, i))
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// Candidates on fake addresses with the given weights.
    pub fn candidates(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Candidate {
                weight,
                state: Arc::new(BackendState::new(
                    ([127, 0, 0, 1], 10_000 + i as u16).into(),
                )),
            })
            .collect()
    }

    /// Asserts that every eligible candidate got `expected` picks within `tolerance` and the
    /// ineligible ones none.
    pub fn assert_even(counts: &[usize], down: &[usize], expected: usize, tolerance: usize) {
        for (i, &count) in counts.iter().enumerate() {
            if down.contains(&i) {
                assert_eq!(count, 0, "{counts:?}");
            } else {
                assert!(count.abs_diff(expected) <= tolerance, "{counts:?}");
            }
        }
    }

    /// How many of `picks` picks land on each candidate.
    pub fn distribution(
        balancer: &dyn Balancer,
        candidates: &[Candidate],
        picks: usize,
    ) -> Vec<usize> {
        let mut counts = vec![0; candidates.len()];
        for _ in 0..picks {
            let i = balancer
                .pick(candidates, &PickContext::default())
                .expect("a candidate is eligible");
            counts[i] += 1;
        }
        counts
    }
}
