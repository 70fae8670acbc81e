//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016), with weights.
//!
//! Each backend walks its own permutation of the table's M slots and claims the next free one
//! on its turns; a backend of weight w gets w/max turns per round, so the table holds each
//! backend in proportion to its weight, within a slot or two. A pick is one table read. The
//! table is built from the configured backends only; a backend that is out does not rebuild it:
//! its keys probe further slots (by rehashing), so only its keys move, spread in proportion to
//! the others' shares.

use super::hash::{hash_bytes, mix};
use super::{Balancer, Candidate, PickContext, SmoothRoundRobin, random_eligible};

/// Probes tried for a key whose slot's backend is out, before a random eligible backend.
const PROBES: u64 = 32;

/// A Maglev lookup table.
#[derive(Debug)]
pub struct Maglev {
    /// Slot to candidate index.
    table: Box<[u32]>,
    /// For requests without a hash key.
    fallback: SmoothRoundRobin,
}

impl Maglev {
    /// Builds the table of `size` slots (a prime, at least the number of candidates).
    pub fn new(candidates: &[Candidate], size: usize) -> Self {
        let n = candidates.len();
        // A prime size makes every skip visit every slot, so filling always ends; validation
        // gives one, and anything else is rounded up to one.
        let size = next_prime(size.max(n).max(2));
        let mut table = vec![u32::MAX; size];
        if n > 0 {
            let m = size as u64;
            let (offsets, skips): (Vec<u64>, Vec<u64>) = candidates
                .iter()
                .map(|c| {
                    let name = c.state.addr.to_string();
                    let h = hash_bytes(name.as_bytes());
                    (h % m, mix(h) % (m - 1).max(1) + 1)
                })
                .unzip();
            let max_weight = candidates
                .iter()
                .map(|c| c.weight)
                .max()
                .unwrap_or(1)
                .max(1);
            let mut next = vec![0u64; n];
            let mut credit = vec![0u32; n];
            let mut filled = 0;
            'fill: loop {
                for i in 0..n {
                    credit[i] += candidates[i].weight.max(1);
                    if credit[i] < max_weight {
                        continue;
                    }
                    credit[i] -= max_weight;
                    // The next slot of i's permutation that is still free.
                    loop {
                        let slot = ((offsets[i] + next[i] * skips[i]) % m) as usize;
                        next[i] += 1;
                        if table[slot] == u32::MAX {
                            table[slot] = i as u32;
                            filled += 1;
                            break;
                        }
                    }
                    if filled == size {
                        break 'fill;
                    }
                }
            }
        }
        Maglev {
            table: table.into_boxed_slice(),
            fallback: SmoothRoundRobin::new(candidates),
        }
    }
}

/// The smallest prime at least `n`.
fn next_prime(n: usize) -> usize {
    let is_prime = |m: usize| {
        m >= 2
            && (2..)
                .take_while(|d| d * d <= m)
                .all(|d| !m.is_multiple_of(d))
    };
    (n..).find(|&m| is_prime(m)).unwrap_or(n)
}

impl Balancer for Maglev {
    fn pick(&self, candidates: &[Candidate], ctx: &PickContext<'_>) -> Option<usize> {
        let Some(hash) = ctx.hash else {
            return self.fallback.pick(candidates, ctx);
        };
        let m = self.table.len() as u64;
        let mut key = hash;
        for probe in 0..=PROBES {
            let index = self.table[(key % m) as usize] as usize;
            if index < candidates.len() && ctx.eligible(candidates, index) {
                return Some(index);
            }
            key = mix(hash.wrapping_add(probe + 1));
        }
        random_eligible(candidates, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    fn pick(maglev: &Maglev, c: &[Candidate], key: u64) -> usize {
        let ctx = PickContext {
            hash: Some(hash_bytes(&key.to_le_bytes())),
            ..PickContext::default()
        };
        maglev.pick(c, &ctx).expect("an eligible backend")
    }

    #[test]
    fn table_is_even_within_one_percent() {
        let c = candidates(&[1; 10]);
        let maglev = Maglev::new(&c, 65_537);
        let mut counts = [0usize; 10];
        for &i in maglev.table.iter() {
            counts[i as usize] += 1;
        }
        let even = 65_537 / 10;
        assert!(
            counts.iter().all(|&n| n.abs_diff(even) <= even / 100),
            "{counts:?}"
        );
    }

    #[test]
    fn weights_are_respected() {
        let c = candidates(&[3, 1]);
        let maglev = Maglev::new(&c, 65_537);
        let first = maglev.table.iter().filter(|&&i| i == 0).count();
        let share = first as f64 / 65_537.0;
        assert!((share - 0.75).abs() < 0.01, "{share}");
    }

    #[test]
    fn a_backend_that_is_out_moves_only_its_own_keys() {
        let c = candidates(&[1; 5]);
        let maglev = Maglev::new(&c, 65_537);
        let before: Vec<usize> = (0..20_000).map(|k| pick(&maglev, &c, k)).collect();
        c[2].state.set_usable(false);
        let after: Vec<usize> = (0..20_000).map(|k| pick(&maglev, &c, k)).collect();
        let mut moved_to = [0usize; 5];
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(*b, 2, "only keys of the backend that left move");
                moved_to[*a] += 1;
            } else {
                assert_ne!(*a, 2);
            }
        }
        // Its keys spread over the other four.
        let moved: usize = moved_to.iter().sum();
        assert!(
            moved_to
                .iter()
                .enumerate()
                .all(|(i, &n)| i == 2 || n > moved / 8),
            "{moved_to:?}"
        );
    }

    #[test]
    fn removing_a_backend_from_the_config_remaps_little_more_than_its_keys() {
        let c = candidates(&[1; 10]);
        let full = Maglev::new(&c, 65_537);
        let fewer: Vec<Candidate> = c
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 4)
            .map(|(_, c)| c.clone())
            .collect();
        let smaller = Maglev::new(&fewer, 65_537);
        let keys = 50_000u64;
        let mut moved_others = 0;
        for k in 0..keys {
            let before = &c[pick(&full, &c, k)];
            let after = &fewer[pick(&smaller, &fewer, k)];
            if before.state.addr != c[4].state.addr && before.state.addr != after.state.addr {
                moved_others += 1;
            }
        }
        // The paper reports a few percent of extra disruption; allow 5% of all keys.
        assert!(moved_others < keys as usize * 5 / 100, "{moved_others}");
    }

    #[test]
    fn no_key_falls_back_to_round_robin() {
        let c = candidates(&[1, 1]);
        let maglev = Maglev::new(&c, 251);
        assert_eq!(distribution(&maglev, &c, 10), [5, 5]);
    }
}
