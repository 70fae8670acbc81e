//! Power of two random choices: draw two distinct backends, keep the less loaded.
//!
//! Nearly as even as least connections, without scanning the pool, and without every proxy
//! instance herding onto the same "least loaded" backend at once.

use super::{Balancer, Candidate, PickContext, RANDOM_DRAWS, less_loaded, random_eligible};

/// Power of two choices on active connections per unit of weight.
#[derive(Debug, Default)]
pub struct PowerOfTwo;

impl PowerOfTwo {
    /// The algorithm is stateless.
    pub fn new() -> Self {
        PowerOfTwo
    }
}

impl Balancer for PowerOfTwo {
    fn pick(&self, candidates: &[Candidate], ctx: &PickContext<'_>) -> Option<usize> {
        let (a, b) = two_choices(candidates, ctx)?;
        Some(match b {
            Some(b) if less_loaded(&candidates[b], &candidates[a]) => b,
            _ => a,
        })
    }
}

/// Power of two choices on peak-EWMA latency times outstanding requests (the Finagle and
/// Linkerd balancer): a backend that slows down loses traffic before it fails outright.
#[derive(Debug, Default)]
pub struct PeakEwma;

impl PeakEwma {
    /// The algorithm keeps its state in each backend's [`BackendState`](crate::backend::BackendState).
    pub fn new() -> Self {
        PeakEwma
    }
}

/// The latency assumed for a backend with no sample yet: low enough that new backends get
/// tried, high enough that one loaded new backend does not take everything.
const DEFAULT_LATENCY_NS: f64 = 1e6;

/// Expected cost of sending one more request to `c`.
#[inline]
fn ewma_cost(c: &Candidate) -> f64 {
    let latency = match c.state.latency_ewma() {
        l if l > 0.0 => l,
        _ => DEFAULT_LATENCY_NS,
    };
    let outstanding = c.state.active.load(std::sync::atomic::Ordering::Relaxed) as f64 + 1.0;
    latency * outstanding / f64::from(c.weight.max(1))
}

impl Balancer for PeakEwma {
    fn pick(&self, candidates: &[Candidate], ctx: &PickContext<'_>) -> Option<usize> {
        let (a, b) = two_choices(candidates, ctx)?;
        Some(match b {
            Some(b) if ewma_cost(&candidates[b]) < ewma_cost(&candidates[a]) => b,
            _ => a,
        })
    }
}

/// Two distinct eligible candidates drawn at random (the second absent when only one is).
#[inline]
fn two_choices(candidates: &[Candidate], ctx: &PickContext<'_>) -> Option<(usize, Option<usize>)> {
    let n = candidates.len();
    let a = random_eligible(candidates, ctx)?;
    if n == 1 {
        return Some((a, None));
    }
    // A second eligible choice, never the first: drawn from the other n - 1, then a scan
    // from a random start if the draws keep missing.
    let drawn = (0..RANDOM_DRAWS)
        .map(|_| (a + 1 + fastrand::usize(0..n - 1)) % n)
        .find(|&i| ctx.eligible(candidates, i));
    let b = drawn.or_else(|| {
        let start = fastrand::usize(0..n);
        (0..n)
            .map(|offset| (start + offset) % n)
            .find(|&i| i != a && ctx.eligible(candidates, i))
    });
    Some((a, b))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn avoids_the_busy_backend() {
        let c = candidates(&[1, 1]);
        let _busy = c[0].state.start();
        assert_eq!(distribution(&PowerOfTwo::new(), &c, 50), [0, 50]);
    }

    #[test]
    fn a_backend_that_is_out_spreads_its_share_evenly() {
        let c = candidates(&[1, 1, 1, 1]);
        c[1].state.set_usable(false);
        let counts = distribution(&PowerOfTwo::new(), &c, 30_000);
        assert_even(&counts, &[1], 10_000, 600);
    }

    #[test]
    fn ewma_avoids_the_slow_backend() {
        let c = candidates(&[1, 1]);
        c[0].state
            .observe_latency(std::time::Duration::from_millis(50));
        c[1].state
            .observe_latency(std::time::Duration::from_millis(1));
        assert_eq!(distribution(&PeakEwma::new(), &c, 50), [0, 50]);
    }

    #[test]
    fn ewma_weighs_outstanding_requests() {
        let c = candidates(&[1, 1]);
        c[0].state
            .observe_latency(std::time::Duration::from_millis(1));
        c[1].state
            .observe_latency(std::time::Duration::from_millis(2));
        let _busy: Vec<_> = (0..4).map(|_| c[0].state.start()).collect();
        // 1 ms x 5 outstanding costs more than 2 ms x 1.
        assert_eq!(distribution(&PeakEwma::new(), &c, 50), [0, 50]);
    }

    #[test]
    fn ewma_spreads_over_equal_backends_by_weight() {
        let c = candidates(&[1, 1, 2]);
        for state in c.iter().map(|c| &c.state) {
            state.observe_latency(std::time::Duration::from_millis(5));
        }
        // With equal latency and no load, the cost is 1/weight: the heavier backend wins
        // whenever it is drawn (2/3 of the picks), the other two share the rest (the one whose
        // sample is older has decayed a hair more, so it wins their ties).
        let counts = distribution(&PeakEwma::new(), &c, 30_000);
        assert!((19_000..=21_000).contains(&counts[2]), "{counts:?}");
        assert_eq!(counts[0] + counts[1] + counts[2], 30_000);
    }

    #[test]
    fn spreads_over_idle_backends() {
        let c = candidates(&[1, 1, 1, 1]);
        let counts = distribution(&PowerOfTwo::new(), &c, 40_000);
        assert!(
            counts.iter().all(|&n| (9_000..=11_000).contains(&n)),
            "{counts:?}"
        );
    }
}
