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
        let n = candidates.len();
        let a = random_eligible(candidates, ctx)?;
        if n == 1 {
            return Some(a);
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
        Some(match b {
            Some(b) if less_loaded(&candidates[b], &candidates[a]) => b,
            _ => a,
        })
    }
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
    fn spreads_over_idle_backends() {
        let c = candidates(&[1, 1, 1, 1]);
        let counts = distribution(&PowerOfTwo::new(), &c, 40_000);
        assert!(
            counts.iter().all(|&n| (9_000..=11_000).contains(&n)),
            "{counts:?}"
        );
    }
}
