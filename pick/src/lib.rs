//! The balancer's lock-free core, on its own so a model checker can run it: among the
//! eligible candidates, the one whose `(load + 1) / weight` is least takes one more session,
//! committed with a compare-and-swap on its counter; a lost race rescans.
//!
//! Built with `--cfg loom` its atomics are loom's, and `tests/loom.rs` explores every
//! interleaving of a few threads (see `.ci/run`). The crate has no other dependency, so that
//! build does not drag tokio (which reads `cfg(loom)` itself) into the model.

#![forbid(unsafe_code)]

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering};

/// Live sessions on one gateway.
#[derive(Debug, Default)]
pub struct Load(AtomicU64);

impl Load {
    pub fn new() -> Load {
        Load(AtomicU64::new(0))
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Gives one session back.
    pub fn release(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }

    /// Takes one session whatever the load: a session that already exists (handed over by
    /// another process) is counted where it is.
    pub fn adopt(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes one session if the load is still `seen`.
    fn take_if(&self, seen: u64) -> bool {
        self.0
            .compare_exchange(seen, seen + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Takes one session on the least loaded candidate and returns its index in `items`.
///
/// `view` gives a candidate's load and effective weight, or `None` when it may not take
/// sessions. Scans start at `start()` (called once per scan) so that ties rotate. The choice
/// is committed with a compare-and-swap on the chosen load: if another thread changed it
/// since it was read, the scan starts again with fresh loads. So concurrent claims see each
/// other, and a burst spreads exactly as the same claims one after another would.
pub fn claim<T>(
    items: &[T],
    mut start: impl FnMut() -> usize,
    view: impl Fn(&T) -> Option<(&Load, u64)>,
) -> Option<usize> {
    let n = items.len();
    if n == 0 {
        return None;
    }
    loop {
        let first = start() % n;
        // (index, load seen, weight) of the best so far.
        let mut best: Option<(usize, u64, u64)> = None;
        for i in 0..n {
            let index = (first + i) % n;
            let Some((load, weight)) = view(&items[index]) else {
                continue;
            };
            let seen = load.get();
            let better = best.is_none_or(|(_, s, w)| {
                // (seen + 1) / weight < (s + 1) / w, without division.
                u128::from(seen + 1) * u128::from(w) < u128::from(s + 1) * u128::from(weight)
            });
            if better {
                best = Some((index, seen, weight));
            }
        }
        let (index, seen, _) = best?;
        // The chosen one may have stopped taking sessions since the scan (drained, down):
        // scan again, as after a lost race, rather than refuse while others would take it.
        let Some((load, _)) = view(&items[index]) else {
            continue;
        };
        if load.take_if(seen) {
            return Some(index);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn least_loaded_by_weight_with_rotating_ties() {
        let loads = [Load::new(), Load::new(), Load::new()];
        let weights = [1u64, 1, 2];
        let mut rotation = 0;
        let mut picks = Vec::new();
        for _ in 0..8 {
            let i = claim(
                &loads,
                || {
                    rotation += 1;
                    rotation
                },
                |l| {
                    let i = loads.iter().position(|x| std::ptr::eq(x, l))?;
                    Some((l, weights[i]))
                },
            );
            picks.push(i.unwrap());
        }
        let counts: Vec<u64> = loads.iter().map(Load::get).collect();
        assert_eq!(
            counts,
            vec![2, 2, 4],
            "weight 2 takes twice as many: {picks:?}"
        );
        assert_eq!(claim(&loads, || 0, |_| None::<(&Load, u64)>), None);
        loads[2].release();
        assert_eq!(loads[2].get(), 3);
    }

    /// The candidate chosen turns ineligible between the scan and the commit (drained, marked
    /// down): the claim goes to another that would take it, not refused.
    #[test]
    fn a_candidate_gone_ineligible_before_the_commit_passes_to_another() {
        let loads = [Load::new(), Load::new()];
        loads[1].take_if(0);
        // The first candidate answers as eligible once (the scan), then never again.
        let views = std::cell::Cell::new(0);
        let i = claim(
            &loads,
            || 0,
            |l| {
                if std::ptr::eq(l, &loads[0]) {
                    views.set(views.get() + 1);
                    (views.get() <= 1).then_some((l, 1))
                } else {
                    Some((l, 1))
                }
            },
        );
        assert_eq!(i, Some(1));
        assert_eq!((loads[0].get(), loads[1].get()), (0, 2));
    }
}
