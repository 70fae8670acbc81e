//! Least connections: the backend with the fewest active connections per unit of weight.
//!
//! The scan starts at a rotating offset so that backends tied on load (an idle pool, say) share
//! new connections instead of all landing on the first one.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::{Balancer, Candidate, PickContext, less_loaded};

/// Weighted least connections.
#[derive(Debug, Default)]
pub struct LeastConn {
    /// Where the next scan starts; breaks ties in rotation.
    start: AtomicUsize,
}

impl LeastConn {
    /// A balancer with no state beyond its tie-break rotation.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Balancer for LeastConn {
    fn pick(&self, candidates: &[Candidate], ctx: &PickContext<'_>) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let start = self.start.fetch_add(1, Relaxed) % n;
        let mut best: Option<usize> = None;
        for offset in 0..n {
            let i = (start + offset) % n;
            if !ctx.eligible(candidates, i) {
                continue;
            }
            if best.is_none_or(|b| less_loaded(&candidates[i], &candidates[b])) {
                best = Some(i);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn prefers_the_idle_backend() {
        let c = candidates(&[1, 1]);
        let _busy: Vec<_> = (0..3).map(|_| c[0].state.start()).collect();
        let lc = LeastConn::new();
        assert_eq!(distribution(&lc, &c, 10), [0, 10]);
    }

    #[test]
    fn weight_scales_load() {
        let c = candidates(&[4, 1]);
        let _a: Vec<_> = (0..3).map(|_| c[0].state.start()).collect();
        let _b = c[1].state.start();
        // 3/4 < 1/1: the heavier backend still has room.
        assert_eq!(LeastConn::new().pick(&c, &PickContext::default()), Some(0));
    }

    #[test]
    fn ties_rotate() {
        let c = candidates(&[1, 1, 1]);
        assert_eq!(distribution(&LeastConn::new(), &c, 30), [10, 10, 10]);
    }
}
