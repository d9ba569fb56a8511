//! Draining is not down (docs/proxy.md, "Draining is not down"): a gateway drained through
//! its own admin API (`POST /api/drain`, what `wasmbed drain` and a preStop hook do) is never
//! marked down by the proxy in front of it, whatever health path the proxy probes; every DATA
//! sent before the drain is answered (passthrough: by the draining gateway before it closes;
//! terminate: the session moves with its answers and goes on); new sessions go elsewhere.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::*;
use wasmbed_config::{GatewayConfig, HealthCheck, Mode, ProxyConfig, TerminateTls};
use wasmbed_gateway::ticket::KeyRing;
use wasmbed_protocol::{Frame, Kind, Welcome};
use wasmbed_proxy::Proxy;

/// DATA each device has in flight when the drain comes.
const BURST: u64 = 20;

fn proxy_config(
    mode: Mode,
    check: HealthCheck,
    path: &str,
    gws: &[&RunningGateway],
    pki: &Pki,
) -> ProxyConfig {
    let mut c = ProxyConfig::from_toml(
        "admin = \"off\"\n[[listener]]\naddr = \"127.0.0.1:0\"\n[[gateway]]\naddr = \"127.0.0.1:1\"",
    )
    .unwrap();
    c.gateways = gws
        .iter()
        .zip(["gw-a", "gw-b"])
        .map(|(gw, name)| GatewayConfig {
            name: name.into(),
            addr: gw.addr.to_string(),
            health_addr: (check == HealthCheck::Http).then(|| gw.admin.to_string()),
            weight: 1,
            pool: "default".into(),
        })
        .collect();
    c.health.check = check;
    c.health.path = path.into();
    c.health.interval = Duration::from_millis(50);
    c.health.timeout = Duration::from_millis(500);
    c.health.fall = 2;
    c.health.rise = 1;
    c.mode = mode;
    if mode == Mode::Terminate {
        c.tls = Some(TerminateTls {
            cert: pki.path("gw.pem"),
            key: pki.path("gw.key"),
            client_ca: Some(pki.path("ca.pem")),
            client_crls: Vec::new(),
            resumption: true,
            ticket_keys: None,
        });
    }
    c
}

async fn case(mode: Mode, check: HealthCheck, path: &str) {
    let what = format!("{mode:?} with {check:?} {path}");
    let pki = Pki::new();
    let keys = pki.path("keys.toml");
    std::fs::write(&keys, KeyRing::generate("k1").unwrap()).unwrap();
    let gateway = |name: &str| {
        // Passthrough: TLS ends at the gateway; terminate: plaintext behind the proxy.
        let mut s = settings((mode == Mode::Passthrough).then_some(&pki));
        s.name = name.into();
        s.session_keys = Some(keys.clone());
        s
    };
    let (a, b) = (start(gateway("gw-a")).await, start(gateway("gw-b")).await);
    let proxy = Proxy::bind(proxy_config(mode, check, path, &[&a, &b], &pki))
        .await
        .unwrap();
    let listen = proxy.listen_addrs()[0];
    let gateways = proxy.gateways();
    tokio::spawn(proxy.run(tokio_util::sync::CancellationToken::new()));
    let gw_a = gateways.find("gw-a").unwrap();

    // Was gw-a ever marked down? Watched from before the drain to the end. (With a tcp
    // check, a drained gateway whose sessions have all moved refuses connects and goes down:
    // then only down while it still had sessions counts.)
    let went_down = Arc::new(AtomicBool::new(false));
    let watching = {
        let (g, flag) = (gw_a.clone(), went_down.clone());
        let strict = check == HealthCheck::Http;
        tokio::spawn(async move {
            loop {
                if !g.is_healthy() && (strict || g.sessions() > 0) {
                    flag.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    // Devices until two are on gw-a; those get a burst in flight.
    let mut on_a = Vec::new();
    let mut others = Vec::new();
    for i in 0..12 {
        if on_a.len() == 2 {
            break;
        }
        let id = format!("device-{i:04}");
        let mut d = tls_device(listen, pki.device(&id, Some(&pki.ca)))
            .await
            .unwrap();
        let f = d.hello(&id, "echo").await;
        assert_eq!(f.kind, Kind::Welcome, "{what}: {:?}", error_of(&f));
        let welcome: Welcome = f.decode_body("WELCOME").unwrap();
        if welcome.gateway == "gw-a" {
            on_a.push(d);
        } else {
            others.push(d);
        }
    }
    assert_eq!(on_a.len(), 2, "{what}: two sessions on gw-a");
    for d in &mut on_a {
        for seq in 1..=BURST {
            d.send(Frame::new(Kind::Data, seq, seq.to_le_bytes().to_vec()))
                .await
                .unwrap();
        }
    }
    assert_eq!(http(a.admin, "POST", "/api/drain", b"").await.0, 202);

    // Terminate: every DATA sent before the drain is answered, once, in order (the proxy
    // replays what the gateway had not read). Passthrough: the gateway answers, in order,
    // every DATA it had received when it drained, then GOAWAY and the close; DATA still on
    // its way through the proxy (a loaded host) is the device's to resend after resuming.
    for d in &mut on_a {
        let mut answered = Vec::new();
        let mut goaway = false;
        while (answered.len() as u64) < BURST {
            let Some(f) = d.recv().await else {
                assert!(
                    mode == Mode::Passthrough && goaway,
                    "{what}: closed after {answered:?} (GOAWAY seen: {goaway})"
                );
                break;
            };
            match f.kind {
                Kind::Reply => answered.push(f.seq),
                Kind::Checkpoint => d.keep_ticket(&f),
                Kind::Goaway => goaway = true,
                Kind::Push => {}
                other => panic!("{what}: {other:?} {:?}", error_of(&f)),
            }
        }
        let n = answered.len() as u64;
        assert_eq!(
            answered,
            (1..=n).collect::<Vec<_>>(),
            "{what}: once, in order"
        );
        if mode == Mode::Terminate {
            assert_eq!(n, BURST, "{what}: every DATA answered");
        }
        if mode == Mode::Terminate {
            // The session moved and goes on.
            d.seq = BURST;
            assert_eq!(d.data(b"after").await.kind, Kind::Reply, "{what}");
        }
    }

    // The proxy learned of the drain (the health body, or a GOAWAY): new sessions skip gw-a.
    wasmbed_testkit::until(
        Duration::from_secs(5),
        "the proxy sees gw-a draining",
        || gw_a.drain_reported(),
    )
    .await;
    for i in 20..24 {
        let id = format!("device-{i:04}");
        let mut d = tls_device(listen, pki.device(&id, Some(&pki.ca)))
            .await
            .unwrap();
        assert_eq!(d.open(&id, "echo").await, "gw-b", "{what}");
    }
    watching.abort();
    assert!(
        !went_down.load(Ordering::SeqCst),
        "{what}: the draining gateway was marked down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_gateway_is_not_down_in_either_mode_on_any_health_path() {
    for (mode, check, path) in [
        (Mode::Passthrough, HealthCheck::Http, "/healthz"),
        (Mode::Passthrough, HealthCheck::Http, "/readyz"),
        (Mode::Terminate, HealthCheck::Http, "/healthz"),
        (Mode::Terminate, HealthCheck::Http, "/readyz"),
        // Terminate mode reads the GOAWAYs: a tcp check's refused connects are the drain.
        (Mode::Terminate, HealthCheck::Tcp, "/healthz"),
    ] {
        case(mode, check, path).await;
    }
}
