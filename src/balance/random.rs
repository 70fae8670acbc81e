//! Weighted random choice.
//!
//! Prefix sums of the weights are computed at build time; a pick draws a number below the total
//! and binary-searches it. A draw that lands on an ineligible backend falls back to the next
//! eligible one in order.

use super::{Balancer, Candidate, PickContext, RANDOM_DRAWS, random_eligible};

/// Weighted random.
#[derive(Debug)]
pub struct WeightedRandom {
    /// `cumulative[i]` = sum of the weights of candidates `0..=i`.
    cumulative: Box<[u64]>,
}

impl WeightedRandom {
    /// Precomputes the prefix sums of the weights.
    pub fn new(candidates: &[Candidate]) -> Self {
        let mut total = 0u64;
        let cumulative = candidates
            .iter()
            .map(|c| {
                total += u64::from(c.weight);
                total
            })
            .collect();
        WeightedRandom { cumulative }
    }
}

impl Balancer for WeightedRandom {
    fn pick(&self, candidates: &[Candidate], ctx: &PickContext<'_>) -> Option<usize> {
        let total = *self.cumulative.last()?;
        // Redrawing (rather than taking the next backend) keeps the weights of the eligible
        // backends in proportion when some are out.
        for _ in 0..RANDOM_DRAWS {
            let draw = fastrand::u64(0..total);
            let index = self.cumulative.partition_point(|&sum| sum <= draw);
            if ctx.eligible(candidates, index) {
                return Some(index);
            }
        }
        random_eligible(candidates, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn follows_weights_within_tolerance() {
        let c = candidates(&[3, 1]);
        let counts = distribution(&WeightedRandom::new(&c), &c, 40_000);
        // Expected 30,000 / 10,000; 5 standard deviations is about ±430.
        assert!((29_500..=30_500).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn a_backend_that_is_out_spreads_its_share_evenly() {
        let c = candidates(&[1, 1, 1, 1]);
        c[1].state.set_usable(false);
        let counts = distribution(&WeightedRandom::new(&c), &c, 30_000);
        assert_even(&counts, &[1], 10_000, 600);
    }

    #[test]
    fn skips_unusable() {
        let c = candidates(&[1, 1]);
        c[0].state.set_usable(false);
        assert_eq!(distribution(&WeightedRandom::new(&c), &c, 100), [0, 100]);
    }
}
