//! The proxy crate's layers: each module may name only the modules below it (listed before
//! it here, as in `docs/architecture.md`, "The proxy crate's modules"), so no import circle
//! can come back unnoticed. Unit tests inside a module (`mod tests`) are not counted.
#![allow(
    clippy::disallowed_methods,
    reason = "tests make their timers on runtimes with a time driver (proxy/clippy.toml)"
)]

use std::collections::BTreeSet;
use std::path::Path;

/// Lowest first.
const LAYERS: &[&str] = &[
    "error",
    "events",
    "metric_names",
    "control",
    "workers",
    "deadlines",
    "clienthello",
    "proxy_protocol",
    "seats",
    "sockopt",
    "dial",
    "listener",
    "refusal",
    "balancer",
    "metrics",
    "health",
    "alive",
    "tls",
    "failures",
    "link",
    "takeover",
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

/// The crate modules `code` names: `crate::x::…`, each of `crate::{x, y::…}`, and `lib` for
/// the crate root's own items (`crate::Gateway`: a re-export is a way around the layers).
fn named(code: &str) -> BTreeSet<String> {
    let ident = |rest: &str| -> String {
        rest.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (at, m) in code.match_indices("crate::") {
        let rest = &code[at + m.len()..];
        let paths: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => group
                .split('}')
                .next()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .collect(),
            None => vec![rest],
        };
        for path in paths {
            let name = ident(path);
            match name.chars().next() {
                Some(c) if c.is_ascii_uppercase() => out.insert("lib".to_string()),
                Some(_) => out.insert(name),
                None => false,
            };
        }
    }
    out
}

#[test]
fn the_checker_sees_every_way_of_naming_a_module() {
    let code = "use crate::{live, refusal::Refused};\nlet x = crate::events::COUNTS;\n\
                fn f(g: &crate::Gateway) {}";
    let names: Vec<String> = named(code).into_iter().collect();
    assert_eq!(names, ["events", "lib", "live", "refusal"]);
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
            if other != *module && !below && (layered.contains(&other) || other == "lib") {
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
