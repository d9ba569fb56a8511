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
    assert!(!c.listeners[0].allow_plain);
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
    assert!(!c.listeners[0].reuse_port, "SO_REUSEPORT only when asked");
    let shared = ProxyConfig::load(&ProxyFlags {
        reuse_port: true,
        ..f
    })
    .expect("valid");
    assert!(shared.listeners.iter().all(|l| l.reuse_port));
    assert_eq!(c.listeners[0].defer_accept, Duration::from_secs(1));
    let at_once = ProxyConfig::load(&ProxyFlags {
        defer_accept: Some("0s".into()),
        gateway: vec!["127.0.0.1:9001".into()],
        ..flags()
    })
    .expect("valid");
    assert!(
        !at_once.listeners.is_empty(),
        "the default listener, deferring nothing"
    );
    assert!(at_once.listeners.iter().all(|l| l.defer_accept.is_zero()));
    // Every flag for all listeners reaches the default listener too (`--allow-plain` alone
    // used to be dropped with it).
    let plain = ProxyConfig::load(&ProxyFlags {
        allow_plain: true,
        gateway: vec!["127.0.0.1:9001".into()],
        ..flags()
    })
    .expect("valid");
    assert_eq!(plain.listeners.len(), 1);
    assert!(plain.listeners[0].allow_plain);
    let long = "[[listener]]\naddr = \"127.0.0.1:0\"\ndefer_accept = \"2m\"\n[[gateway]]\naddr = \"127.0.0.1:1\"\n";
    assert!(
        err_of(long).contains("listener[0].defer_accept"),
        "{}",
        err_of(long)
    );
}

#[test]
fn a_flag_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
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

#[test]
fn discovery_flags_make_sources_and_allow_no_listed_gateway() {
    let f = ProxyFlags {
        gateway_dns: vec!["gw.wasmbed.svc:9001;health-port=9101;weight=2".into()],
        gateway_srv: vec!["_s._tcp.gw.wasmbed.svc;pool=eu".into()],
        dns_server: vec!["127.0.0.1:5353".into()],
        dns_timeout: Some("300ms".into()),
        ..flags()
    };
    let c = ProxyConfig::load(&f).expect("discovery alone is enough");
    assert!(c.gateways.is_empty());
    let t = &c.discovery.targets;
    assert_eq!(
        t[0].query,
        DnsQuery::Addresses {
            name: "gw.wasmbed.svc".into(),
            port: 9001
        }
    );
    assert_eq!((t[0].weight, t[0].health_port), (2, Some(9101)));
    assert_eq!(t[1].label(), "srv:_s._tcp.gw.wasmbed.svc");
    assert_eq!(t[1].pool, "eu");
    assert_eq!(c.discovery.servers, vec!["127.0.0.1:5353".parse().unwrap()]);
    assert_eq!(c.discovery.timeout, Duration::from_millis(300));
    // A route may name a pool only discovery fills.
    ProxyConfig::from_toml(
        "[[discovery]]\nsrv = \"_s._tcp.gw\"\npool = \"eu\"\n[[route]]\nsni = \"x\"\npool = \"eu\"",
    )
    .expect("the route's pool comes from discovery");
}

#[test]
fn bad_discovery_input_is_named() {
    for (text, says) in [
        ("[[discovery]]\ndns = \"gw.svc\"", "expected NAME:PORT"),
        ("[[discovery]]\ndns = \"gw.svc:0\"", "expected NAME:PORT"),
        ("[[discovery]]\ndns = \"gw svc:9001\"", "not a DNS name"),
        (
            "[[discovery]]\ndns = \"a:1\"\nsrv = \"b\"",
            "exactly one of",
        ),
        ("[[discovery]]\n", "exactly one of"),
        (
            "[[discovery]]\ndns = \"a:1\"\n[[discovery]]\ndns = \"a:1\"",
            "listed twice",
        ),
        ("[[discovery]]\ndns = \"a:1\"\nweight = 0", "weight"),
        (
            "[[discovery]]\ndns = \"a:1\"\nhealth_port = 0",
            "health_port",
        ),
        (
            "max_discovered = 0\n[[discovery]]\ndns = \"a:1\"",
            "max_discovered",
        ),
        (
            "dns_server = [\"resolver\"]\n[[discovery]]\ndns = \"a:1\"",
            "dns_server[0]",
        ),
        ("", "--allow-empty"),
    ] {
        let e = err_of(text);
        assert!(e.contains(says), "{text:?}: {e}");
    }
    let f = ProxyFlags {
        gateway_dns: vec!["gw:9001;colour=red".into()],
        ..flags()
    };
    let e = ProxyConfig::load(&f).unwrap_err().to_string();
    assert!(
        e.contains("--gateway-dns gw:9001;colour=red") && e.contains("colour"),
        "{e}"
    );
    assert!(ProxyConfig::from_toml("allow_empty = true").is_ok());
}

#[test]
fn splice_is_a_passthrough_option() {
    let on =
        ProxyConfig::from_toml("splice = \"on\"\n[[gateway]]\naddr = \"127.0.0.1:1\"").unwrap();
    assert_eq!(on.splice, SpliceMode::On);
    let default = ProxyConfig::from_toml("[[gateway]]\naddr = \"127.0.0.1:1\"").unwrap();
    assert_eq!(
        default.splice,
        SpliceMode::Auto,
        "passthrough splices bulk by default"
    );
    let off =
        ProxyConfig::from_toml("splice = \"off\"\n[[gateway]]\naddr = \"127.0.0.1:1\"").unwrap();
    assert_eq!(off.splice, SpliceMode::Off);
    let terminate = ProxyConfig::from_toml(
        "mode = \"terminate\"\n[tls]\ncert = \"a\"\nkey = \"b\"\n[[gateway]]\naddr = \"127.0.0.1:1\"",
    )
    .unwrap();
    assert_eq!(terminate.splice, SpliceMode::Off);
    let e = err_of(
        "mode = \"terminate\"\nsplice = \"on\"\n[tls]\ncert = \"a\"\nkey = \"b\"\n[[gateway]]\naddr = \"127.0.0.1:1\"",
    );
    assert!(e.contains("splice") && e.contains("passthrough"), "{e}");
}

/// An `alpn` route would never match in terminate mode (no offered list is seen there):
/// refused, naming the route, as `cert_*` routes are in passthrough.
#[test]
fn alpn_routes_are_a_passthrough_option() {
    let route = "[[route]]\nalpn = \"mqtt\"\npool = \"mqtt\"\n";
    let gateways = "[[gateway]]\naddr = \"127.0.0.1:1\"\n[[gateway]]\naddr = \"127.0.0.1:2\"\npool = \"mqtt\"\n";
    assert!(ProxyConfig::from_toml(&format!("{gateways}{route}")).is_ok());
    let e = err_of(&format!(
        "mode = \"terminate\"\n[tls]\ncert = \"a\"\nkey = \"b\"\n{gateways}{route}"
    ));
    assert!(
        e.contains("route[0].alpn") && e.contains("passthrough"),
        "{e}"
    );
}

#[test]
fn half_close_is_a_passthrough_option_off_by_default() {
    let on =
        ProxyConfig::from_toml("half_close = true\n[[gateway]]\naddr = \"127.0.0.1:1\"").unwrap();
    assert!(on.half_close);
    let off = ProxyConfig::from_toml("[[gateway]]\naddr = \"127.0.0.1:1\"").unwrap();
    assert!(!off.half_close);
    let e = err_of(
        "mode = \"terminate\"\nhalf_close = true\n[tls]\ncert = \"a\"\nkey = \"b\"\n[[gateway]]\naddr = \"127.0.0.1:1\"",
    );
    assert!(e.contains("half_close") && e.contains("passthrough"), "{e}");
}

#[test]
fn a_link_upstream_needs_terminate_mode_and_the_proxys_client_certificate() {
    let terminate = "mode = \"terminate\"\nupstream = \"link\"\n[tls]\ncert = \"a\"\nkey = \"b\"\n[[gateway]]\naddr = \"127.0.0.1:1\"";
    let e = ProxyConfig::from_toml(terminate).unwrap_err().to_string();
    assert!(
        e.contains("upstream") && e.contains("client certificate"),
        "{e}"
    );
    let no_client = format!("{terminate}\n[upstream_tls]\nca = \"c\"");
    let e = ProxyConfig::from_toml(&no_client).unwrap_err().to_string();
    assert!(e.contains("client certificate"), "{e}");
    let ok = format!("{terminate}\n[upstream_tls]\nca = \"c\"\ncert = \"d\"\nkey = \"e\"");
    let c = ProxyConfig::from_toml(&ok).unwrap();
    assert_eq!(c.upstream, UpstreamMode::Link);
    assert_eq!(c.link_timeout, crate::defaults::proxy::LINK_TIMEOUT);
    let e = ProxyConfig::from_toml("upstream = \"link\"\n[[gateway]]\naddr = \"127.0.0.1:1\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("terminate"), "{e}");
    let e = ProxyConfig::from_toml(&format!("{ok}\nlink_timeout = \"10ms\""));
    assert!(e.is_err(), "a link timeout under 100ms is refused");
    let tcp = ProxyConfig::from_toml("[[gateway]]\naddr = \"127.0.0.1:1\"").unwrap();
    assert_eq!(tcp.upstream, UpstreamMode::Tcp);
}

#[test]
fn a_quic_listener_needs_terminate_mode() {
    let e = ProxyConfig::from_toml(
        "quic_listen = \"127.0.0.1:0\"\n[[gateway]]\naddr = \"127.0.0.1:1\"",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("quic_listen") && e.contains("terminate"), "{e}");
    let ok = ProxyConfig::from_toml(
        "mode = \"terminate\"\nquic_listen = \"127.0.0.1:0\"\nquic_retry = \"always\"\n[tls]\ncert = \"a\"\nkey = \"b\"\n[[gateway]]\naddr = \"127.0.0.1:1\"",
    )
    .unwrap();
    assert_eq!(ok.quic.retry, QuicRetry::Always);
    assert_eq!(ok.max_handshakes, crate::defaults::proxy::MAX_HANDSHAKES);
    let e = ProxyConfig::from_toml(
        "mode = \"terminate\"\nquic_listen = \"127.0.0.1:0\"\nquic_max_handshakes = 0\n[tls]\ncert = \"a\"\nkey = \"b\"\n[[gateway]]\naddr = \"127.0.0.1:1\"",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("quic_max_handshakes"), "{e}");
    // One cap for TLS over TCP and QUIC: `max_handshakes`, or its older name; not both.
    let base = "mode = \"terminate\"\n[tls]\ncert = \"a\"\nkey = \"b\"\n[[gateway]]\naddr = \"127.0.0.1:1\"";
    let cap = |line: &str| ProxyConfig::from_toml(&format!("{line}\n{base}"));
    assert_eq!(cap("max_handshakes = 3").unwrap().max_handshakes, 3);
    assert_eq!(cap("quic_max_handshakes = 7").unwrap().max_handshakes, 7);
    let e = cap("max_handshakes = 3\nquic_max_handshakes = 7")
        .unwrap_err()
        .to_string();
    assert!(e.contains("older name"), "{e}");
    assert!(
        cap("max_handshakes = 0")
            .unwrap_err()
            .to_string()
            .contains("max_handshakes")
    );
    // The line past the cap: 3 s by default, 0 refuses at once, and it must end before the
    // handshake's own deadline (the wait is part of it).
    assert_eq!(
        cap("").unwrap().handshake_wait,
        std::time::Duration::from_secs(3)
    );
    assert_eq!(
        cap("handshake_wait = \"250ms\"").unwrap().handshake_wait,
        std::time::Duration::from_millis(250)
    );
    assert!(
        cap("handshake_wait = \"0s\"")
            .unwrap()
            .handshake_wait
            .is_zero()
    );
    let e = cap("handshake_wait = \"5s\"\nhandshake_timeout = \"5s\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("handshake_wait") && e.contains("shorter"), "{e}");
    // Not given, under a short handshake_timeout: 3/5 of it (a config that loaded before
    // the line still loads).
    let short = cap("handshake_timeout = \"500ms\"").unwrap();
    assert_eq!(short.handshake_wait, std::time::Duration::from_millis(300));
    assert_eq!(
        ok.quic.idle_timeout,
        crate::defaults::proxy::QUIC_IDLE_TIMEOUT
    );
    let e = ProxyConfig::from_toml(
        "mode = \"terminate\"\nquic_listen = \"nowhere\"\n[tls]\ncert = \"a\"\nkey = \"b\"\n[[gateway]]\naddr = \"127.0.0.1:1\"",
    );
    assert!(e.is_err());
}

#[test]
fn raw_listeners_need_terminate_mode_and_per_connection_upstreams() {
    let tls = "[tls]\ncert = \"a\"\nkey = \"b\"\n[[gateway]]\naddr = \"127.0.0.1:1\"";
    let raw = "[[listener]]\naddr = \"127.0.0.1:0\"\nraw = true";
    let client = "[upstream_tls]\nca = \"c\"\ncert = \"d\"\nkey = \"e\"";
    let ok = ProxyConfig::from_toml(&format!("mode = \"terminate\"\n{raw}\n{tls}")).unwrap();
    assert!(ok.listeners[0].raw);
    // Each refused, naming the listener and why.
    for (toml, why) in [
        (
            format!("{raw}\n[[gateway]]\naddr = \"127.0.0.1:1\""),
            "terminate",
        ),
        (
            format!("mode = \"terminate\"\nupstream = \"link\"\n{raw}\n{client}\n{tls}"),
            "upstream",
        ),
        // Under the proxy's client certificate (trusted to state identities).
        (
            format!("mode = \"terminate\"\n{raw}\n{client}\n{tls}"),
            "client certificate",
        ),
    ] {
        let e = ProxyConfig::from_toml(&toml).unwrap_err().to_string();
        assert!(e.contains("listener[0].raw") && e.contains(why), "{e}");
    }
}

#[test]
fn tls_resumption_is_on_unless_turned_off() {
    let base = "mode = \"terminate\"\n[[gateway]]\naddr = \"127.0.0.1:1\"\n[tls]\ncert = \"a\"\nkey = \"b\"";
    let on = ProxyConfig::from_toml(base).unwrap();
    assert!(on.tls.unwrap().resumption);
    let off = ProxyConfig::from_toml(&format!("{base}\nresumption = false")).unwrap();
    assert!(!off.tls.unwrap().resumption);
    // A ticket key ring, from the file or the flag (resumption off wins: the ring is kept
    // but not read); not without TLS.
    let ring = ProxyConfig::from_toml(&format!("{base}\nticket_keys = \"r.toml\"")).unwrap();
    assert_eq!(ring.tls.unwrap().ticket_keys, Some("r.toml".into()));
    let both = format!("{base}\nresumption = false\nticket_keys = \"r.toml\"");
    assert!(
        !ProxyConfig::from_toml(&both)
            .unwrap()
            .tls
            .unwrap()
            .resumption
    );
    let flag = ProxyFlags {
        listen: vec!["127.0.0.1:0".into()],
        gateway: vec!["127.0.0.1:9001".into()],
        tls_ticket_keys: Some("r.toml".into()),
        ..flags()
    };
    let e = ProxyConfig::load(&flag).unwrap_err().to_string();
    assert!(
        e.contains("tls.ticket_keys") && e.contains("terminate"),
        "{e}"
    );
    let flag = ProxyFlags {
        mode: Some(Mode::Terminate),
        tls_cert: Some("a".into()),
        tls_key: Some("b".into()),
        ..flag
    };
    let c = ProxyConfig::load(&flag).expect("valid");
    assert_eq!(c.tls.unwrap().ticket_keys, Some("r.toml".into()));
}

#[test]
fn checkpoints_reach_devices_unless_turned_off_and_hard_stop_follows_the_grace() {
    let base = ProxyFlags {
        listen: vec!["127.0.0.1:0".into()],
        gateway: vec!["127.0.0.1:9001".into()],
        ..flags()
    };
    let c = ProxyConfig::load(&base).expect("valid");
    assert!(c.migration.forward_checkpoints, "on by default");
    assert_eq!(c.hard_stop_after, c.grace + Duration::from_secs(10));
    let off = ProxyFlags {
        no_forward_checkpoints: true,
        hard_stop_after: Some("3s".into()),
        ..base.clone()
    };
    let c = ProxyConfig::load(&off).expect("valid");
    assert!(!c.migration.forward_checkpoints);
    assert_eq!(c.hard_stop_after, Duration::from_secs(3));
    let c =
        ProxyConfig::from_toml("forward_checkpoints = false\n[[gateway]]\naddr = \"127.0.0.1:1\"")
            .expect("valid");
    assert!(!c.migration.forward_checkpoints);
}

#[test]
fn takeover_is_a_path_and_refused_with_quic() {
    let base = "[[gateway]]\naddr = \"127.0.0.1:1\"";
    let c = ProxyConfig::from_toml(&format!("takeover = \"/run/wasmbed/proxy.sock\"\n{base}"))
        .expect("valid");
    assert_eq!(
        c.takeover.as_deref(),
        Some(std::path::Path::new("/run/wasmbed/proxy.sock"))
    );
    let quic = "mode = \"terminate\"\nquic_listen = \"127.0.0.1:0\"\ntakeover = \"/tmp/p.sock\"\n[tls]\ncert = \"a\"\nkey = \"b\"\n[[gateway]]\naddr = \"127.0.0.1:1\"";
    let e = err_of(quic);
    assert!(e.contains("takeover") && e.contains("QUIC"), "{e}");
}

#[test]
fn the_liveness_watch_is_on_unless_turned_off() {
    let base = "[[gateway]]\naddr = \"127.0.0.1:1\"";
    assert!(ProxyConfig::from_toml(base).unwrap().health.watch);
    let off = format!("[health]\nwatch = false\n{base}");
    assert!(!ProxyConfig::from_toml(&off).unwrap().health.watch);
    let f = ProxyFlags {
        gateway: vec!["127.0.0.1:1".into()],
        no_liveness_watch: true,
        ..flags()
    };
    assert!(!ProxyConfig::load(&f).unwrap().health.watch);
}

/// Found by the config fuzz target: a grace of `u64::MAX` seconds made the default hard stop
/// (grace + margin) overflow and panic. Every duration setting is bounded.
#[test]
fn durations_past_ten_years_are_refused_not_overflowed() {
    let base = "[[gateway]]\naddr = \"127.0.0.1:1\"\n";
    let e = err_of(&format!("grace = \"18446744073709551615s\"\n{base}"));
    assert!(e.contains("grace") && e.contains("at most 10 years"), "{e}");
    let e = err_of(&format!("hard_stop_after = \"11years\"\n{base}"));
    assert!(e.contains("hard_stop_after"), "{e}");
    // Ten years is still a duration (no setting needs it, none overflows with it).
    assert!(ProxyConfig::from_toml(&format!("grace = \"3650days\"\n{base}")).is_ok());
}
