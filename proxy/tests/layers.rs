//! The proxy crate's layers: each module may name only the modules below it (listed before
//! it here, as in `docs/architecture.md`, "The proxy crate's modules"), so no import circle
//! can come back unnoticed. Unit tests inside a module (`mod tests`) are not counted.

use std::collections::BTreeSet;
use std::path::Path;

/// Lowest first.
const LAYERS: &[&str] = &[
    "error",
    "events",
    "metric_names",
    "clienthello",
    "proxy_protocol",
    "listener",
    "refusal",
    "balancer",
    "metrics",
    "health",
    "tls",
    "link",
    "context",
    "route",
    "upstream",
    "forward",
    "anchor",
    "passthrough",
    "terminate",
    "session",
    "quic",
    "live",
    "discovery",
    "rebalance",
    "dashboard",
    "admin",
];

/// The code of a module (its file, or every file of its directory), without its unit tests.
fn code_of(src: &Path, module: &str) -> String {
    let mut files = vec![src.join(format!("{module}.rs"))];
    if let Ok(dir) = std::fs::read_dir(src.join(module)) {
        files.extend(dir.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    let mut code = String::new();
    for f in files {
        if f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let text = match text.find("#[cfg(test)]\nmod tests") {
            Some(at) => &text[..at],
            None => &text[..],
        };
        code.push_str(text);
    }
    code
}

/// The crate modules `code` names (`crate::x`).
fn named(code: &str) -> BTreeSet<String> {
    code.match_indices("crate::")
        .map(|(at, m)| {
            code[at + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

#[test]
fn every_module_names_only_the_modules_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("pub mod ")
                .or(l.trim().strip_prefix("mod "))
        })
        .map(|l| l.trim_end_matches(';').to_string())
        .collect();
    let layered: BTreeSet<String> = LAYERS.iter().map(|m| m.to_string()).collect();
    assert_eq!(declared, layered, "lib.rs's modules and the layers differ");
    let mut wrong = Vec::new();
    for (i, module) in LAYERS.iter().enumerate() {
        for other in named(&code_of(&src, module)) {
            let below = LAYERS[..i].contains(&other.as_str());
            if other != *module && !below && layered.contains(&other) {
                wrong.push(format!("{module} names {other}, which is not below it"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    let doc = std::fs::read_to_string(src.join("../../docs/architecture.md")).unwrap();
    for module in LAYERS {
        assert!(
            doc.contains(&format!("| `{module}` |")),
            "docs/architecture.md does not map the module `{module}`"
        );
    }
}
