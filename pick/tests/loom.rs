//! Model check of the balancer's core with loom: every interleaving of a few threads
//! claiming (and releasing) at once. Run by `.ci/run`:
//!
//!     RUSTFLAGS="--cfg loom" cargo test -p wasmbed-pick --release --test loom
//!
//! Checked when written: with the compare-and-swap in `Load::take_if` replaced by a plain
//! `fetch_add` (the race of the system this replaces: read the loads, pick, increment),
//! `three_claims_on_two_gateways_spread_exactly` fails (loom finds the schedule where all
//! three threads read 0/0 and all pick the first gateway: 3/0).
#![cfg(loom)]

use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;
use wasmbed_pick::{Load, claim};

fn equal_weights(loads: &[Load]) -> Option<usize> {
    // Every scan starts at the first gateway: ties are never broken by rotation, so only the
    // compare-and-swap keeps concurrent claims apart.
    claim(loads, || 0, |l| Some((l, 1)))
}

#[test]
fn three_claims_on_two_gateways_spread_exactly() {
    loom::model(|| {
        let loads = Arc::new([Load::new(), Load::new()]);
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let loads = loads.clone();
                thread::spawn(move || equal_weights(&loads[..]).expect("a gateway"))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let counts: Vec<u64> = loads.iter().map(Load::get).collect();
        let (max, min) = (counts.iter().max().unwrap(), counts.iter().min().unwrap());
        assert_eq!(counts.iter().sum::<u64>(), 3);
        assert!(max - min <= 1, "spread {counts:?}");
    });
}

#[test]
fn claims_and_releases_return_every_count_to_zero() {
    loom::model(|| {
        let loads = Arc::new([Load::new(), Load::new(), Load::new()]);
        let rotation = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (loads, rotation) = (loads.clone(), rotation.clone());
                thread::spawn(move || {
                    let i = claim(
                        &loads[..],
                        || rotation.fetch_add(1, Ordering::Relaxed),
                        |l| Some((l, 1)),
                    )
                    .expect("a gateway");
                    // While both hold a session they are on different gateways.
                    loads[i].release();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(loads.iter().all(|l| l.get() == 0), "counts back to zero");
    });
}
