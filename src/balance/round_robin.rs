//! Smooth weighted round robin, in the order NGINX produces.
//!
//! NGINX's algorithm adds each backend's weight to its running score, picks the highest score and
//! subtracts the total from it. Its sequence is periodic with period = sum of weights, so here it
//! is run once at build time and stored; a pick is then one atomic increment and an array read,
//! with no lock. With equal weights the sequence is plain rotation: 0, 1, 2, ...

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::{Balancer, Candidate, PickContext, first_eligible};

/// Smooth weighted round robin over a precomputed sequence.
#[derive(Debug)]
pub struct SmoothRoundRobin {
    /// One full period of the NGINX order, as candidate indexes.
    sequence: Box<[u32]>,
    /// Position in `sequence`; wraps.
    next: AtomicUsize,
}

impl SmoothRoundRobin {
    /// Computes the sequence for these weights (period: the sum of weights divided by their gcd).
    pub fn new(candidates: &[Candidate]) -> Self {
        let divisor = candidates.iter().fold(0, |g, c| gcd(g, c.weight)).max(1);
        let weights: Vec<i64> = candidates
            .iter()
            .map(|c| i64::from(c.weight / divisor))
            .collect();
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; weights.len()];
        let mut sequence = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for _ in 0..total {
            let mut best = 0;
            for i in 0..weights.len() {
                current[i] += weights[i];
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            sequence.push(best as u32);
        }
        SmoothRoundRobin {
            sequence: sequence.into_boxed_slice(),
            next: AtomicUsize::new(0),
        }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl Balancer for SmoothRoundRobin {
    fn pick(&self, candidates: &[Candidate], ctx: &PickContext<'_>) -> Option<usize> {
        if self.sequence.is_empty() {
            return None;
        }
        // A backend that is out loses its turns: the shared position moves on to the next turn
        // in the sequence, so its share spreads over the others in their own proportions
        // instead of falling on one neighbour.
        for _ in 0..self.sequence.len() {
            let position = self.next.fetch_add(1, Relaxed) % self.sequence.len();
            let index = self.sequence[position] as usize;
            if ctx.eligible(candidates, index) {
                return Some(index);
            }
        }
        // Every turn of a full period was ineligible; a last scan settles it.
        first_eligible(candidates, ctx, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn equal_weights_rotate() {
        let c = candidates(&[1, 1, 1]);
        let rr = SmoothRoundRobin::new(&c);
        let picks: Vec<_> = (0..6)
            .map(|_| rr.pick(&c, &PickContext::default()).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn nginx_order_for_5_1_1() {
        // The sequence NGINX documents for weights {a: 5, b: 1, c: 1}: a a b a c a a.
        let c = candidates(&[5, 1, 1]);
        let rr = SmoothRoundRobin::new(&c);
        let picks: Vec<_> = (0..7)
            .map(|_| rr.pick(&c, &PickContext::default()).unwrap())
            .collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weights_hold_over_many_picks() {
        let c = candidates(&[3, 1]);
        let rr = SmoothRoundRobin::new(&c);
        assert_eq!(distribution(&rr, &c, 20), [15, 5]);
    }

    #[test]
    fn a_backend_that_is_out_spreads_its_share_evenly() {
        let c = candidates(&[1, 1, 1, 1]);
        let rr = SmoothRoundRobin::new(&c);
        c[1].state.set_usable(false);
        let counts = distribution(&rr, &c, 30_000);
        assert_even(&counts, &[1], 10_000, 1);
    }

    #[test]
    fn skips_unusable_and_tried() {
        let c = candidates(&[1, 1, 1]);
        let rr = SmoothRoundRobin::new(&c);
        c[1].state.set_usable(false);
        let counts = distribution(&rr, &c, 300);
        assert_eq!(counts[1], 0);
        assert_eq!(counts[0] + counts[2], 300);
        let ctx = PickContext {
            tried: &[0, 2],
            ..PickContext::default()
        };
        assert_eq!(rr.pick(&c, &ctx), None);
    }
}
