//! Replays every kept fuzz input (`fuzz/corpus/TARGET`, `fuzz/regressions/TARGET`) through its
//! target: what a campaign found once is checked on every CI run, in seconds.

use std::path::Path;

/// On a thread with the stack of a binary's main thread and then some: the config parsers
/// recurse up to the `toml` crate's recursion limit (a 20,000-deep dotted key is refused
/// with "recursion limit" by the release binaries), and unoptimized frames at that depth
/// overflow the 2 MiB of a test thread.
#[test]
fn every_kept_input_passes_its_target() {
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(replay)
        .expect("a replay thread")
        .join()
        .expect("the replay");
}

fn replay() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, target) in wasmbed_fuzz::TARGETS {
        let mut replayed = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.expect("a corpus entry").path();
                let data = std::fs::read(&path).expect("a corpus file");
                let outcome = std::panic::catch_unwind(|| target(&data));
                assert!(outcome.is_ok(), "{name}: {} fails", path.display());
                replayed += 1;
            }
        }
        assert!(replayed > 0, "{name}: no corpus (run fuzz/run {name})");
        eprintln!("{name}: {replayed} inputs");
    }
}
