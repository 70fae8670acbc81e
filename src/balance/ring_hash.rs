//! Ring hash in the ketama style: every backend places points on a 64-bit ring in proportion
//! to its weight; a key goes to the first point at or after its hash. A backend that is out is
//! passed over, so its keys go to the next points on the ring, which belong to many backends
//! thanks to the virtual nodes; no other key moves.

use super::hash::hash_bytes;
use super::{Balancer, Candidate, PickContext, SmoothRoundRobin, random_eligible};

/// Ring points a pick walks past before settling for a random eligible backend.
const MAX_WALK: usize = 1024;

/// A sorted ring of (point, candidate index).
#[derive(Debug)]
pub struct RingHash {
    ring: Box<[(u64, u32)]>,
    /// For requests without a hash key.
    fallback: SmoothRoundRobin,
}

impl RingHash {
    /// Places `vnodes` × weight points per backend. The count depends on nothing but the
    /// backend itself, so adding or removing one backend moves no key between the others.
    pub fn new(candidates: &[Candidate], vnodes: u32) -> Self {
        let mut ring = Vec::new();
        for (i, c) in candidates.iter().enumerate() {
            let points = u64::from(vnodes.max(1)) * u64::from(c.weight.max(1));
            let name = c.state.addr.to_string();
            for j in 0..points {
                let point = hash_bytes(format!("{name}-{j}").as_bytes());
                ring.push((point, i as u32));
            }
        }
        ring.sort_unstable();
        RingHash {
            ring: ring.into_boxed_slice(),
            fallback: SmoothRoundRobin::new(candidates),
        }
    }
}

impl Balancer for RingHash {
    fn pick(&self, candidates: &[Candidate], ctx: &PickContext<'_>) -> Option<usize> {
        let Some(hash) = ctx.hash else {
            return self.fallback.pick(candidates, ctx);
        };
        if self.ring.is_empty() {
            return None;
        }
        let start = self.ring.partition_point(|&(point, _)| point < hash);
        let len = self.ring.len();
        // Walk on past backends that are out, but not around the whole ring when most are:
        // then any eligible backend will do.
        for offset in 0..len.min(MAX_WALK) {
            let index = self.ring[(start + offset) % len].1 as usize;
            if index < candidates.len() && ctx.eligible(candidates, index) {
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

    fn pick(ring: &RingHash, c: &[Candidate], key: u64) -> usize {
        let ctx = PickContext {
            hash: Some(hash_bytes(&key.to_le_bytes())),
            ..PickContext::default()
        };
        ring.pick(c, &ctx).expect("an eligible backend")
    }

    #[test]
    fn keys_spread_in_proportion_to_weight() {
        let c = candidates(&[1, 1, 2]);
        let ring = RingHash::new(&c, 160);
        let mut counts = [0usize; 3];
        for k in 0..40_000 {
            counts[pick(&ring, &c, k)] += 1;
        }
        // Ketama with 160 points per server is within about 10% of its share.
        for (count, share) in counts.iter().zip([10_000.0, 10_000.0, 20_000.0]) {
            assert!((*count as f64 - share).abs() < share * 0.15, "{counts:?}");
        }
    }

    #[test]
    fn a_backend_that_is_out_moves_only_its_own_keys() {
        let c = candidates(&[1; 4]);
        let ring = RingHash::new(&c, 160);
        let before: Vec<usize> = (0..10_000).map(|k| pick(&ring, &c, k)).collect();
        c[1].state.set_usable(false);
        for (k, b) in before.iter().enumerate() {
            let a = pick(&ring, &c, k as u64);
            if *b != 1 {
                assert_eq!(a, *b);
            } else {
                assert_ne!(a, 1);
            }
        }
    }

    #[test]
    fn removing_a_weighted_backend_moves_only_its_keys() {
        let all = candidates(&[1, 1, 4]);
        let ring = RingHash::new(&all, 160);
        let fewer = vec![all[0].clone(), all[2].clone()];
        let smaller = RingHash::new(&fewer, 160);
        for k in 0..20_000 {
            let before = &all[pick(&ring, &all, k)];
            let after = &fewer[pick(&smaller, &fewer, k)];
            if before.state.addr != all[1].state.addr {
                assert_eq!(before.state.addr, after.state.addr, "key {k} moved");
            }
        }
    }

    #[test]
    fn the_same_config_gives_the_same_ring() {
        let c = candidates(&[1, 2, 3]);
        let a = RingHash::new(&c, 100);
        let b = RingHash::new(&candidates(&[1, 2, 3]), 100);
        assert_eq!(a.ring, b.ring);
    }
}
