//! Power of two random choices: draw two distinct backends, keep the less loaded.
//!
//! Nearly as even as least connections, without scanning the pool, and without every proxy
//! instance herding onto the same "least loaded" backend at once.

use super::{Balancer, Candidate, PickContext, first_eligible, less_loaded};

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
        match n {
            0 => return None,
            1 => return first_eligible(candidates, ctx, 0),
            _ => {}
        }
        let a = fastrand::usize(0..n);
        // A second index distinct from the first.
        let b = (a + 1 + fastrand::usize(0..n - 1)) % n;
        let a = first_eligible(candidates, ctx, a)?;
        let b = first_eligible(candidates, ctx, b)?;
        Some(if less_loaded(&candidates[b], &candidates[a]) {
            b
        } else {
            a
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
    fn spreads_over_idle_backends() {
        let c = candidates(&[1, 1, 1, 1]);
        let counts = distribution(&PowerOfTwo::new(), &c, 40_000);
        assert!(
            counts.iter().all(|&n| (9_000..=11_000).contains(&n)),
            "{counts:?}"
        );
    }
}
