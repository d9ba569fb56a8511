//! Sessions that outlive their gateway: CHECKPOINT tickets sealed under the fleet's key ring,
//! resumed on another gateway with the app's state; every refusal a clear, working fresh
//! session. Over real TLS with device certificates, between two gateways.

mod support;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use support::*;
use wasmbed_gateway::ticket::{KeyRing, SessionTickets, TicketBody, unix};
use wasmbed_protocol::{ErrorCode, Kind, Welcome};

fn counter_of(reply: &wasmbed_protocol::Frame) -> u64 {
    assert_eq!(reply.kind, Kind::Reply, "{:?}", error_of(reply));
    u64::from_le_bytes(reply.body[..8].try_into().unwrap())
}

fn ring_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A fresh key ring file of one key, in the PKI's directory.
fn fleet_ring(pki: &Pki) -> PathBuf {
    ring_file(
        pki.dir.path(),
        "keys.toml",
        &KeyRing::generate("k1").unwrap(),
    )
}

/// A fresh session of `app` at `addr` that sends `messages`; returns it and the ticket of the
/// CHECKPOINT that follows the last REPLY.
async fn ticketed(
    addr: std::net::SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    device: &str,
    app: &str,
    messages: &[&[u8]],
) -> (TlsDevice, Vec<u8>) {
    let mut d = tls_device(addr, config).await.unwrap();
    welcome(&mut d, device, app, None).await;
    for m in messages {
        assert_eq!(d.data(m).await.kind, Kind::Reply);
    }
    let f = d.recv().await.expect("CHECKPOINT");
    assert_eq!((f.kind, f.seq), (Kind::Checkpoint, messages.len() as u64));
    d.keep_ticket(&f);
    let ticket = d.ticket.clone().map(|(_, t)| t).expect("a ticket");
    (d, ticket)
}

/// Two TLS gateways sharing one key ring.
/// The checkpoint counters are the process's: `cargo test` runs this file's tests in one
/// process, and one of them counts them; each takes this first.
static CHECKPOINTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn pair(pki: &Pki, keys: &Path) -> (RunningGateway, RunningGateway) {
    pair_with(pki, keys, |_| {}).await
}

/// [`pair`], each gateway's settings changed by `tweak`.
async fn pair_with(
    pki: &Pki,
    keys: &Path,
    tweak: impl Fn(&mut wasmbed_config::GatewaySettings),
) -> (RunningGateway, RunningGateway) {
    let gateway = |name: &str| {
        let mut s = settings(Some(pki));
        s.name = name.into();
        s.session_keys = Some(keys.to_owned());
        tweak(&mut s);
        s
    };
    (start(gateway("gw-a")).await, start(gateway("gw-b")).await)
}

async fn welcome(d: &mut TlsDevice, device: &str, app: &str, ticket: Option<&[u8]>) -> Welcome {
    let f = d.hello_resume(device, app, ticket).await;
    assert_eq!(f.kind, Kind::Welcome, "{:?}", error_of(&f));
    f.decode_body("WELCOME").unwrap()
}

#[tokio::test]
async fn a_counter_at_50_resumes_at_51_on_another_gateway() {
    let _counting = CHECKPOINTING.lock().await;
    let pki = Pki::new();
    let keys = fleet_ring(&pki);
    let (a, b) = pair(&pki, &keys).await;
    let config = pki.device("device-0001", Some(&pki.ca));
    let mut d = tls_device(a.addr, config.clone()).await.unwrap();
    let w = welcome(&mut d, "device-0001", "counter", None).await;
    assert_eq!(
        (w.gateway.as_str(), w.resumed, w.resume_refused),
        ("gw-a", None, None)
    );
    for i in 1..=50 {
        assert_eq!(counter_of(&d.data(&[1]).await), i);
    }
    // The last REPLY's CHECKPOINT follows it.
    let f = d.recv().await.expect("CHECKPOINT");
    assert_eq!((f.kind, f.seq), (Kind::Checkpoint, 50));
    d.keep_ticket(&f);
    let (covered, ticket) = d.ticket.clone().unwrap();
    assert_eq!(covered, 50);
    // Gateway A dies: its sessions and their state are gone with it.
    a.shutdown.cancel();
    drop(d);
    let mut d = tls_device(b.addr, config).await.unwrap();
    let w = welcome(&mut d, "device-0001", "counter", Some(&ticket)).await;
    assert_eq!(w.gateway, "gw-b");
    let resumed = w.resumed.expect("resumed");
    assert_eq!((resumed.seq, resumed.state.as_str()), (50, "restored"));
    // DATA the ticket covers is not run again; the next one continues the count.
    d.seq = 49;
    let dup = d.data(&[1]).await;
    assert_eq!(error_code(&dup), ErrorCode::Duplicate as u16);
    d.seq = 50;
    assert_eq!(counter_of(&d.data(&[1]).await), 51);
}

/// With `--checkpoint every` and `off` alike (off: no CHECKPOINT before, "a drain still sends
/// a last one").
#[tokio::test]
async fn a_drain_answers_then_checkpoints_then_closes_and_the_session_resumes() {
    let _counting = CHECKPOINTING.lock().await;
    for every in [Some(1), None] {
        drain_checkpoints_and_resumes(every).await;
    }
}

async fn drain_checkpoints_and_resumes(every: Option<u32>) {
    let pki = Pki::new();
    let keys = fleet_ring(&pki);
    let (a, b) = pair_with(&pki, &keys, |s| s.checkpoint_every = every).await;
    let config = pki.device("device-0002", Some(&pki.ca));
    let mut d = tls_device(a.addr, config.clone()).await.unwrap();
    welcome(&mut d, "device-0002", "average", None).await;
    for reading in [10u8, 20, 30] {
        d.data(&[reading]).await;
    }
    assert_eq!(d.ticket.is_some(), every.is_some(), "{every:?}");
    assert_eq!(http(a.admin, "POST", "/api/drain", b"").await.0, 202);
    let rest = d.until_closed().await;
    assert!(rest.iter().any(|f| f.kind == Kind::Goaway), "{rest:?}");
    let (covered, ticket) = d
        .ticket
        .clone()
        .expect("a last CHECKPOINT before the close");
    assert_eq!(covered, 3);
    let mut d = tls_device(b.addr, config).await.unwrap();
    let w = welcome(&mut d, "device-0002", "average", Some(&ticket)).await;
    assert_eq!(w.resumed.map(|r| r.state), Some("restored".to_string()));
    d.seq = 3;
    // The moving average kept its three readings: (10 + 20 + 30 + 40) / 4 = 25, 4 kept.
    assert_eq!(d.data(&[40]).await.body, vec![25, 4]);
}

#[tokio::test]
async fn every_refused_ticket_gets_its_reason_and_a_working_fresh_session() {
    let _counting = CHECKPOINTING.lock().await;
    let pki = Pki::new();
    let keys = fleet_ring(&pki);
    let (a, _b) = pair(&pki, &keys).await;
    let ring = KeyRing::load(&keys).unwrap();
    // Real tickets of device-0003: for counter, and for badstate (whose restore traps, or
    // loops when the state starts with 4).
    let ticket_of = |app: &str, expires_in: i64, state: u8| {
        let now = SystemTime::now();
        ring.seal(&TicketBody {
            device: "device-0003".into(),
            app: app.into(),
            module: serde_bytes::ByteBuf::from(vec![0u8; 32]),
            session: "s".into(),
            seq: 7,
            pushes: 0,
            issued: unix(now),
            expires: (unix(now) as i64 + expires_in) as u64,
            state: Some(serde_bytes::ByteBuf::from(vec![state; 4])),
        })
        .unwrap()
    };
    let good = ticket_of("counter", 3600, 1);
    let mut tampered = good.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "device-0003",
            "counter",
            ticket_of("counter", -1, 1),
            "expired",
        ),
        ("device-0003", "counter", tampered, "bad_ticket"),
        (
            "device-0003",
            "counter",
            b"not a ticket".to_vec(),
            "bad_ticket",
        ),
        ("device-0004", "counter", good.clone(), "other_device"),
        ("device-0003", "echo", good.clone(), "other_app"),
        // A restore that traps, and one that loops past the call deadline.
        (
            "device-0003",
            "badstate",
            ticket_of("badstate", 3600, 1),
            "restore_failed",
        ),
        (
            "device-0003",
            "badstate",
            ticket_of("badstate", 3600, 4),
            "restore_failed",
        ),
    ];
    for (device, app, ticket, reason) in cases {
        let mut d = tls_device(a.addr, pki.device(device, Some(&pki.ca)))
            .await
            .unwrap();
        let w = welcome(&mut d, device, app, Some(&ticket)).await;
        assert_eq!(w.resume_refused.as_deref(), Some(reason), "{device} {app}");
        assert!(w.resumed.is_none());
        // A fresh session that works: DATA 1 is run, not refused as a duplicate.
        let f = d.data(&[0]).await;
        assert_eq!(f.kind, Kind::Reply, "{reason}: {:?}", error_of(&f));
    }
    let metrics = http(a.admin, "GET", "/metrics", b"").await.1;
    let m = wasmbed_testkit::Metrics::parse(&metrics);
    for reason in [
        "expired",
        "bad_ticket",
        "other_device",
        "other_app",
        "restore_failed",
    ] {
        assert!(
            m.sum("wasmbed_gateway_resumes_total", &[("outcome", reason)]) >= 1.0,
            "{reason}: {metrics}"
        );
    }
}

#[tokio::test]
async fn keys_rotate_without_breaking_tickets_and_a_removed_key_ends_them() {
    let _counting = CHECKPOINTING.lock().await;
    let pki = Pki::new();
    let old = KeyRing::generate("old").unwrap();
    let keys = ring_file(pki.dir.path(), "keys.toml", &old);
    let mut s = settings(Some(&pki));
    s.session_keys = Some(keys.clone());
    let gw = start(s).await;
    let config = pki.device("device-0005", Some(&pki.ca));
    let (_, ticket) = ticketed(gw.addr, config.clone(), "device-0005", "counter", &[&[1]]).await;
    // Rotate: a new key first, the old one kept. The old ticket opens; new ones use "new".
    let new = KeyRing::generate("new").unwrap();
    std::fs::write(&keys, format!("{new}\n{old}")).unwrap();
    gw.shared.reload_keys().unwrap();
    let mut d = tls_device(gw.addr, config.clone()).await.unwrap();
    let w = welcome(&mut d, "device-0005", "counter", Some(&ticket)).await;
    assert!(w.resumed.is_some(), "{:?}", w.resume_refused);
    d.seq = 1;
    assert_eq!(counter_of(&d.data(&[1]).await), 2);
    // The old key removed: its tickets are bad_ticket.
    std::fs::write(&keys, &new).unwrap();
    gw.shared.reload_keys().unwrap();
    let mut d = tls_device(gw.addr, config).await.unwrap();
    let w = welcome(&mut d, "device-0005", "counter", Some(&ticket)).await;
    assert_eq!(w.resume_refused.as_deref(), Some("bad_ticket"));
    // A bad file keeps the ring in use.
    std::fs::write(&keys, "garbage").unwrap();
    assert!(gw.shared.reload_keys().is_err());
}

#[tokio::test]
async fn a_snapshot_that_misbehaves_costs_its_checkpoint_only() {
    let _counting = CHECKPOINTING.lock().await;
    let pki = Pki::new();
    let keys = fleet_ring(&pki);
    let mut s = settings(None);
    s.session_keys = Some(keys);
    let gw = start(s).await;
    let mut d = tcp_device(gw.addr).await;
    d.open("device-0006", "badstate").await;
    // Out-of-bounds pointer, 100 MiB length, trap, loop: no CHECKPOINT, the session goes on.
    for mode in [1u8, 2, 3, 4] {
        assert_eq!(d.data(&[mode]).await.kind, Kind::Reply);
    }
    assert!(d.ticket.is_none(), "no ticket from a failed snapshot");
    // A good snapshot: a CHECKPOINT follows the REPLY.
    assert_eq!(d.data(&[0]).await.kind, Kind::Reply);
    let f = d.recv().await.unwrap();
    assert_eq!((f.kind, f.seq), (Kind::Checkpoint, 5));
    let metrics = http(gw.admin, "GET", "/metrics", b"").await.1;
    let m = wasmbed_testkit::Metrics::parse(&metrics);
    assert_eq!(
        m.sum("wasmbed_gateway_checkpoints_total", &[("result", "failed")]),
        4.0
    );
    assert!(m.sum("wasmbed_gateway_checkpoints_total", &[("result", "sent")]) >= 1.0);
}

#[tokio::test]
async fn without_a_key_ring_nothing_is_checkpointed_and_tickets_are_refused() {
    let _counting = CHECKPOINTING.lock().await;
    let gw = start(settings(None)).await;
    let mut d = tcp_device(gw.addr).await;
    let f = d
        .hello_resume("device-0007", "counter", Some(b"anything"))
        .await;
    let w: Welcome = f.decode_body("WELCOME").unwrap();
    assert_eq!(w.resume_refused.as_deref(), Some("bad_ticket"));
    d.data(&[1]).await;
    d.data(&[1]).await;
    // Whatever follows the REPLYs, no CHECKPOINT was among them.
    gw.shutdown.cancel();
    d.until_closed().await;
    assert!(d.ticket.is_none());
}

/// TLS session tickets under the fleet's ring: a device that re-homes resumes TLS on the
/// other gateway (no full handshake), and is still held to its certificate's identity.
#[tokio::test]
async fn tls_resumes_on_another_gateway_of_the_fleet() {
    let _counting = CHECKPOINTING.lock().await;
    use rustls::HandshakeKind;
    let pki = Pki::new();
    let keys = fleet_ring(&pki);
    for tickets in [true, false] {
        let gateway = |name: &str| {
            let mut s = settings(Some(&pki));
            s.name = name.into();
            s.session_keys = Some(keys.clone());
            s.tls_tickets = tickets;
            s
        };
        let (a, b) = (start(gateway("gw-a")).await, start(gateway("gw-b")).await);
        let config = pki.device("device-0008", Some(&pki.ca));
        let kind = |d: &TlsDevice| d.framed.get_ref().get_ref().1.handshake_kind();
        let mut d = tls_device(a.addr, config.clone()).await.unwrap();
        assert_eq!(kind(&d), Some(HandshakeKind::Full));
        welcome(&mut d, "device-0008", "echo", None).await; // reads the session ticket too
        drop(d);
        let mut d = tls_device(b.addr, config.clone()).await.unwrap();
        let want = if tickets {
            HandshakeKind::Resumed
        } else {
            HandshakeKind::Full
        };
        assert_eq!(kind(&d), Some(want), "tickets {tickets}");
        // The resumed session still carries the device's certificate: its identity holds.
        let f = d.hello("device-0009", "echo").await;
        assert_eq!(error_code(&f), ErrorCode::IdentityMismatch as u16);
        let mut d = tls_device(b.addr, config).await.unwrap();
        welcome(&mut d, "device-0008", "echo", None).await;
        assert_eq!(d.data(b"x").await.body, b"x");
    }
}

/// A TLS ticket proves the device holds its session, not that its certificate passes here:
/// a gateway of the same ring that trusts another device CA refuses the resumed session
/// (counted), where before the check ran again it welcomed it.
#[tokio::test]
async fn a_resumed_tls_session_is_held_to_this_gateways_device_ca() {
    let _counting = CHECKPOINTING.lock().await;
    use rustls::HandshakeKind;
    let pki = Pki::new();
    let keys = fleet_ring(&pki);
    let other = wasmbed_certs::pki::DevCa::generate("another device CA").unwrap();
    std::fs::write(pki.path("other-ca.pem"), other.cert_pem()).unwrap();
    let gateway = |name: &str, ca: &str| {
        let mut s = settings(Some(&pki));
        s.name = name.into();
        s.session_keys = Some(keys.clone());
        s.tls.as_mut().unwrap().client_ca = pki.path(ca);
        s
    };
    let a = start(gateway("gw-a", "ca.pem")).await;
    let b = start(gateway("gw-b", "other-ca.pem")).await;
    let config = pki.device("device-0011", Some(&pki.ca));
    let mut d = tls_device(a.addr, config.clone()).await.unwrap();
    welcome(&mut d, "device-0011", "echo", None).await; // reads the TLS tickets too
    drop(d);
    let rejected = |admin| async move {
        let text = http(admin, "GET", "/metrics", b"").await.1;
        wasmbed_testkit::Metrics::parse(&text).sum(
            "wasmbed_gateway_tls_rejected_total",
            &[("reason", "client_cert")],
        )
    };
    let before = rejected(b.admin).await;
    let mut d = tls_device(b.addr, config).await.unwrap();
    assert_eq!(
        d.framed.get_ref().get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed)
    );
    let hello = wasmbed_protocol::Hello {
        device: "device-0011".into(),
        app: "echo".into(),
        resume: None,
    };
    let _ = d
        .send(wasmbed_protocol::Frame::control(Kind::Hello, 0, &hello))
        .await;
    assert!(d.recv().await.is_none(), "refused: closed, no WELCOME");
    // Counted before the close.
    assert_eq!(rejected(b.admin).await, before + 1.0);
}

/// Replacing an app does not reset its devices: a ticket sealed by the old module is offered
/// to the new module's `restore` (the app versions its own state format).
#[tokio::test]
async fn a_ticket_from_the_previous_version_of_the_app_restores_into_the_new_one() {
    let _counting = CHECKPOINTING.lock().await;
    let pki = Pki::new();
    let keys = fleet_ring(&pki);
    let (a, b) = pair(&pki, &keys).await;
    let config = pki.device("device-0010", Some(&pki.ca));
    let (_, ticket) = ticketed(
        a.addr,
        config.clone(),
        "device-0010",
        "counter",
        &[&[1], &[1], &[1]],
    )
    .await;
    // Gateway B gets a new version of counter (other bytes, same state format).
    let v2 = format!("{}\n;; v2", include_str!("../../apps/counter.wat"));
    assert_eq!(
        http(b.admin, "PUT", "/api/apps/counter", v2.as_bytes())
            .await
            .0,
        200
    );
    let mut d = tls_device(b.addr, config).await.unwrap();
    let w = welcome(&mut d, "device-0010", "counter", Some(&ticket)).await;
    assert_eq!(w.resumed.map(|r| r.state), Some("restored".to_string()));
    d.seq = 3;
    assert_eq!(counter_of(&d.data(&[1]).await), 4);
}

/// A ticket too large for the HELLO that would bring it back (`--max-state` near
/// `--max-frame`) is no ticket: that checkpoint fails, counted as failed (not as sent), and
/// a smaller state's is sent again.
#[tokio::test]
async fn a_ticket_too_large_to_bring_back_is_a_failed_checkpoint() {
    let _counting = CHECKPOINTING.lock().await;
    let pki = Pki::new();
    let keys = fleet_ring(&pki);
    let mut s = settings(Some(&pki));
    s.session_keys = Some(keys);
    s.max_frame = 4096;
    let gw = start(s).await;
    let metric = |result: &str| {
        let text = wasmbed_gateway::metrics::handle().render();
        wasmbed_testkit::Metrics::parse(&text)
            .sum("wasmbed_gateway_checkpoints_total", &[("result", result)])
    };
    let mut d = tls_device(gw.addr, pki.device("device-0009", Some(&pki.ca)))
        .await
        .unwrap();
    welcome(&mut d, "device-0009", "blob", None).await;
    let (sent, failed) = (metric("sent"), metric("failed"));
    d.data(&[1u8; 1000]).await;
    // A state of 4,000 bytes: its DATA fits 4,096, its ticket's HELLO does not. (Each
    // CHECKPOINT follows its REPLY: read with the next answer.)
    let reply = d.data(&[2u8; 4000]).await;
    assert_eq!(reply.kind, Kind::Reply);
    assert_eq!(d.ticket.as_ref().map(|t| t.0), Some(1), "the small state's");
    d.data(&[3u8; 10]).await;
    assert_eq!(
        d.ticket.as_ref().map(|t| t.0),
        Some(1),
        "none for the large one"
    );
    d.send(wasmbed_protocol::Frame::new(Kind::Ping, 9, Vec::new()))
        .await
        .unwrap();
    loop {
        let f = d.recv().await.expect("a frame");
        match f.kind {
            Kind::Checkpoint => d.keep_ticket(&f),
            Kind::Pong => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        d.ticket.as_ref().map(|t| t.0),
        Some(3),
        "the next small state's"
    );
    assert_eq!(metric("failed") - failed, 1.0);
    assert_eq!(metric("sent") - sent, 2.0);
}
