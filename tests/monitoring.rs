//! The alert rules and the Grafana dashboard under deploy/monitoring query only metrics the
//! proxy or the gateway export: a renamed metric fails here, not on a dashboard in the field.
//! (`promtool check rules` and `promtool test rules` run in `.ci/run`.)

/// Every `wasmbed_...` metric name in `text`, histogram suffixes removed.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("wasmbed_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        // `wasmbed_edge`-like words in prose are not metrics: every metric has a subsystem.
        if base.starts_with("wasmbed_proxy_") || base.starts_with("wasmbed_gateway_") {
            names.insert(base.to_string());
        }
        rest = &tail[end..];
    }
    names
}

fn exported() -> Vec<&'static str> {
    let mut all = wasmbed_proxy::metrics::ALL.to_vec();
    all.extend_from_slice(wasmbed_gateway::metrics::ALL);
    all
}

#[test]
fn the_alerts_and_the_dashboard_query_exported_metrics() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/monitoring/");
    let exported = exported();
    for file in ["alerts.yml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(format!("{dir}{file}")).unwrap();
        let names = metric_names(&text);
        assert!(names.len() >= 5, "{file}: {names:?}");
        for name in &names {
            assert!(
                exported.contains(&name.as_str()),
                "{file} queries {name}, which neither the proxy nor the gateway exports"
            );
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{dir}grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() >= 10);
}

#[test]
fn a_renamed_metric_would_be_caught() {
    let names = metric_names("rate(wasmbed_proxy_sessions_moved_total[1m]) wasmbed_edge");
    let exported = exported();
    assert_eq!(names.len(), 1);
    assert!(names.iter().all(|n| !exported.contains(&n.as_str())));
}
