use super::*;

const FULL: &str = include_str!("../../examples/proxy.toml");

fn flags() -> ProxyFlags {
    ProxyFlags::default()
}

fn err_of(text: &str) -> String {
    match ProxyConfig::from_toml(text) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn example_file_is_valid_and_complete() {
    let c = ProxyConfig::from_toml(FULL).expect("example parses");
    assert_eq!(c.gateways.len(), 3);
    assert_eq!(c.gateways[2].weight, 2);
    assert_eq!(c.health.check, HealthCheck::Http);
    assert_eq!(c.health.interval, Duration::from_millis(250));
    assert_eq!(c.routes.len(), 1);
    assert!(c.listeners[0].allow_plain == false);
}

#[test]
fn flags_alone_make_a_config() {
    let f = ProxyFlags {
        listen: vec!["127.0.0.1:0".into()],
        gateway: vec!["a=127.0.0.1:9001;weight=3,127.0.0.1:9002".into()],
        fall: Some(2),
        health_interval: Some("250ms".into()),
        ..flags()
    };
    let c = ProxyConfig::load(&f).expect("valid");
    assert_eq!(c.gateways[0].name, "a");
    assert_eq!(c.gateways[0].weight, 3);
    assert_eq!(c.gateways[1].name, "127.0.0.1:9002");
    assert_eq!(c.health.fall, 2);
    assert_eq!(c.health.interval, Duration::from_millis(250));
    assert_eq!(c.mode, Mode::Passthrough);
}

#[test]
fn a_flag_overrides_the_file() {
    let dir = std::env::temp_dir().join(format!("wasmbed-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("p.toml");
    std::fs::write(&path, FULL).unwrap();
    let f = ProxyFlags {
        config: Some(path),
        rise: Some(7),
        gateway: vec!["127.0.0.1:1234;pool=eu;health=127.0.0.1:1235".into()],
        ..flags()
    };
    let c = ProxyConfig::load(&f).expect("valid");
    assert_eq!(c.health.rise, 7);
    assert_eq!(c.gateways.len(), 1);
    assert_eq!(c.gateways[0].pool, "eu");
    assert_eq!(c.health.fall, 2, "file value kept where no flag is given");
}

#[test]
fn every_bad_field_is_named() {
    let gw = "[[gateway]]\naddr = \"127.0.0.1:9000\"\n";
    let cases = [
        (
            format!("{gw}[health]\ninterval = \"soon\""),
            "health.interval",
        ),
        (
            format!("{gw}[health]\ninterval = \"1s\"\ntimeout = \"2s\""),
            "health.timeout",
        ),
        (format!("{gw}[health]\nfall = 0"), "health.fall"),
        (
            format!("{gw}[[listener]]\naddr = \"localhost\""),
            "listener[0].addr",
        ),
        (
            "[[gateway]]\naddr = \"nowhere\"".to_string(),
            "gateway[0].addr",
        ),
        (
            format!("{gw}[[gateway]]\naddr = \"127.0.0.1:9000\""),
            "gateway[1].name",
        ),
        (
            "[[gateway]]\naddr = \"127.0.0.1:9\"\nweight = 0".to_string(),
            "gateway[0].weight",
        ),
        (format!("mode = \"terminate\"\n{gw}"), "tls"),
        (
            format!("{gw}[[route]]\nsni = \"a.b\"\npool = \"eu\""),
            "route[0].pool",
        ),
        (
            format!("{gw}[[route]]\nsni = \"a.b\"\npool = \"default\"\nfallback = [\"eu\"]"),
            "route[0].fallback[0]",
        ),
        (
            format!("{gw}[[route]]\ncert_uri = \"wasmbed://x\"\npool = \"default\""),
            "route[0]",
        ),
        (format!("{gw}[[route]]\npool = \"default\""), "route[0]"),
        (format!("{gw}rebalance = \"on\""), "rebalance"),
        (format!("{gw}replay_window = \"10\""), "replay_window"),
        (format!("{gw}move_rate = 0"), "move_rate"),
        (String::new(), "gateway"),
        (format!("max_client_hello = 10\n{gw}"), "max_client_hello"),
        (format!("admin = \"x\"\n{gw}"), "admin"),
    ];
    for (text, field) in cases {
        let e = err_of(&text);
        assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
}

#[test]
fn unknown_fields_are_refused() {
    let e = err_of("[[gateway]]\naddr = \"127.0.0.1:9000\"\nwieght = 2");
    assert!(e.contains("wieght"), "{e}");
}

#[test]
fn bad_gateway_flag_options_are_named() {
    let f = ProxyFlags {
        gateway: vec!["127.0.0.1:9000;colour=blue".into()],
        ..flags()
    };
    let e = ProxyConfig::load(&f).unwrap_err().to_string();
    assert!(e.contains("colour"), "{e}");
}

#[test]
fn missing_file_names_the_path() {
    let f = ProxyFlags {
        config: Some("/nonexistent/p.toml".into()),
        ..flags()
    };
    let e = ProxyConfig::load(&f).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/p.toml"), "{e}");
}

#[test]
fn local_example_is_valid() {
    let c = ProxyConfig::from_toml(include_str!("../../examples/local.toml")).expect("parses");
    assert_eq!(c.gateways.len(), 3);
    assert_eq!(c.listeners[0].addr.to_string(), "127.0.0.1:8443");
    assert_eq!(c.health.timeout, Duration::from_millis(125));
}

#[test]
fn http_checks_need_a_health_address_on_every_gateway() {
    let e = ProxyConfig::from_toml(
        "[health]\ncheck = \"http\"\n[[gateway]]\nname = \"a\"\naddr = \"127.0.0.1:9000\"\nhealth_addr = \"127.0.0.1:9100\"\n[[gateway]]\nname = \"b\"\naddr = \"127.0.0.1:9001\"",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("gateway[1].health_addr") && e.contains("\"b\""),
        "{e}"
    );
    // `auto` probes that one over tcp instead.
    assert!(
        ProxyConfig::from_toml(
            "[health]\ncheck = \"auto\"\n[[gateway]]\naddr = \"127.0.0.1:9001\""
        )
        .is_ok()
    );
}

#[test]
fn gateway_flags_replace_the_files_gateways_and_routes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        "[[gateway]]\nname = \"eu\"\naddr = \"127.0.0.1:9000\"\npool = \"eu\"\n[[gateway]]\naddr = \"127.0.0.1:9002\"\n[[route]]\nsni = \"*.eu.example\"\npool = \"eu\"",
    )
    .unwrap();
    let f = ProxyFlags {
        config: Some(path),
        gateway: vec!["127.0.0.1:9001".into()],
        ..flags()
    };
    let c = ProxyConfig::load(&f).expect("the file's routes go with its gateways");
    assert_eq!(c.gateways.len(), 1);
    assert!(c.routes.is_empty());
}

#[test]
fn gateway_names_and_pools_are_bounded() {
    let long = "g".repeat(65);
    let e = ProxyConfig::from_toml(&format!(
        "[[gateway]]\nname = \"{long}\"\naddr = \"127.0.0.1:9000\""
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("gateway[0].name"), "{e}");
}
