//! QUIC devices (`--quic-listen`): the session on the connection's first stream, through the
//! same anchor as TCP devices: moves with its state, survives the device's change of address,
//! one session per connection, garbage datagrams ignored.
#![allow(
    clippy::disallowed_methods,
    reason = "tests make their timers on runtimes with a time driver (proxy/clippy.toml)"
)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use support::frames::*;
use support::*;
use wasmbed_certs::pki::{DevCa, KeyKind};
use wasmbed_config::Mode;
use wasmbed_protocol::Kind;
use wasmbed_testkit::Device;

type QuicStream = tokio::io::Join<quinn::RecvStream, quinn::SendStream>;

/// A QUIC device: its endpoint (its UDP socket), connection and session stream.
struct QuicDev {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    device: Device<QuicStream>,
    count: u64,
}

impl QuicDev {
    async fn open(proxy: SocketAddr, pki: &Pki, name: &str) -> QuicDev {
        let client = quic_client(pki, Some(&pki.ca), name);
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = endpoint
            .connect_with(client, proxy, "localhost")
            .unwrap()
            .await
            .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut device = Device::new(tokio::io::join(recv, send));
        device.open(name, "counter").await;
        QuicDev {
            endpoint,
            conn,
            device,
            count: 0,
        }
    }

    /// DATA, and its answer: the app's count, one more than before (state intact).
    async fn step(&mut self) {
        let f = self.device.data(b"tick").await;
        self.count += 1;
        assert_eq!(f.kind, Kind::Reply, "{f:?}");
        assert_eq!(String::from_utf8_lossy(&f.body), self.count.to_string());
    }
}

/// A QUIC device's client settings: ALPN `wasmbed/1`, its certificate from `identity` (none:
/// anonymous).
fn quic_client(pki: &Pki, identity: Option<&DevCa>, name: &str) -> quinn::ClientConfig {
    quic_client_of(&device_tls(&pki.ca, identity, name, false))
}

/// A QUIC device's client settings from its TLS settings `tls`: ALPN `wasmbed/1`.
fn quic_client_of(tls: &rustls::ClientConfig) -> quinn::ClientConfig {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![wasmbed_proxy::quic::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    quinn::ClientConfig::new(Arc::new(crypto))
}

/// What the proxy answers a device that presents `tls` over `transport` and sends a HELLO
/// naming `device` as soon as its handshake is done (`None`: closed with no answer, or the
/// handshake refused).
async fn answer_to_hello(
    proxy: &RunningProxy,
    transport: &str,
    tls: Arc<rustls::ClientConfig>,
    device: &str,
) -> Option<Kind> {
    match transport {
        "tcp" => {
            let mut dev = Device::new(tls_connect(proxy.addr, tls).await.ok()?);
            dev.send_raw(&hello_of(device)).await.ok()?;
            dev.recv().await.map(|f| f.kind)
        }
        _ => {
            let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            let connecting = endpoint.connect_with(quic_client_of(&tls), proxy.quic?, "localhost");
            let conn = connecting.ok()?.await.ok()?;
            let (send, recv) = conn.open_bi().await.ok()?;
            let mut dev = Device::new(tokio::io::join(recv, send));
            dev.send_raw(&hello_of(device)).await.ok()?;
            dev.recv().await.map(|f| f.kind)
        }
    }
}

/// One handshake slot (`max_handshakes = 1`), a line of `wait` past it and a handshake
/// deadline of `timeout`; no retry (every Initial goes straight to the line).
fn one_slot(c: &mut wasmbed_config::ProxyConfig, wait: Duration, timeout: Duration) {
    c.quic.retry = wasmbed_config::proxy::QuicRetry::Never;
    c.max_handshakes = 1;
    c.handshake_wait = wait;
    c.handshake_timeout = timeout;
}

fn quic_proxy(pki: &Pki, gateways: &[&FrameGateway]) -> wasmbed_config::ProxyConfig {
    let mut c = config(gateways.iter().map(|g| g.gateway()).collect());
    c.mode = Mode::Terminate;
    c.tls = Some(pki.tls.clone());
    c.quic.listen = Some("127.0.0.1:0".parse().unwrap());
    c
}

/// A gateway killed under QUIC devices: their sessions move with their state, and no device
/// sees its connection end.
#[tokio::test]
async fn quic_sessions_move_with_their_state_when_a_gateway_dies() {
    let pki = pki(KeyKind::EcdsaP256);
    let gws = [
        FrameGateway::spawn("gw-0").await,
        FrameGateway::spawn("gw-1").await,
    ];
    let proxy = start(quic_proxy(&pki, &[&gws[0], &gws[1]])).await;
    let addr = proxy.quic.expect("a QUIC listener");
    let mut devs = Vec::new();
    for i in 0..6 {
        devs.push(QuicDev::open(addr, &pki, &format!("device-{i:04}")).await);
    }
    for _ in 0..2 {
        for d in devs.iter_mut() {
            d.step().await;
        }
    }
    assert_eq!(proxy.counts(), vec![3, 3]);
    gws[0].kill();
    wasmbed_testkit::until(Duration::from_secs(5), "gw-0's sessions moved", || {
        gws[0].live() == 0
    })
    .await;
    for _ in 0..3 {
        for d in devs.iter_mut() {
            d.step().await;
        }
    }
    assert_eq!(
        gws[1].resumed(),
        3,
        "each moved session resumed from its ticket"
    );
    for d in &devs {
        assert!(
            d.conn.close_reason().is_none(),
            "no device saw its connection end"
        );
    }
    assert_eq!(
        proxy
            .metric("wasmbed_proxy_quic_connections_total{result=\"accepted\"}")
            .await,
        6.0
    );
}

/// NAT rebinding: the device's address changes mid-session (a new UDP socket); the session
/// goes on, nothing lost, no new handshake.
#[tokio::test]
async fn a_device_whose_address_changes_keeps_its_session() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let proxy = start(quic_proxy(&pki, &[&gw])).await;
    let mut dev = QuicDev::open(proxy.quic.unwrap(), &pki, "device-0100").await;
    dev.step().await;
    let before = dev.endpoint.local_addr().unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    dev.endpoint.rebind(socket).unwrap();
    assert_ne!(dev.endpoint.local_addr().unwrap(), before);
    for _ in 0..3 {
        dev.step().await;
    }
    assert_eq!(gw.hellos(), 1, "the same session: no new HELLO");
    assert!(dev.conn.close_reason().is_none());
}

/// One session per connection: 200 more streams, one after another, are each reset (and
/// counted); the session goes on.
#[tokio::test]
async fn a_second_stream_on_a_connection_is_refused() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let proxy = start(quic_proxy(&pki, &[&gw])).await;
    let mut dev = QuicDev::open(proxy.quic.unwrap(), &pki, "device-0200").await;
    dev.step().await;
    for _ in 0..200 {
        let (mut send, mut recv) = dev.conn.open_bi().await.unwrap();
        send.write_all(b"another session?").await.unwrap();
        let mut buf = [0u8; 16];
        let read = recv.read(&mut buf).await;
        assert!(
            matches!(read, Err(quinn::ReadError::Reset(code)) if code == quinn::VarInt::from_u32(wasmbed_proxy::quic::code::EXTRA_STREAM)),
            "{read:?}"
        );
    }
    dev.step().await;
    assert_eq!(gw.hellos(), 1);
    assert_eq!(
        proxy
            .metric("wasmbed_proxy_quic_streams_refused_total")
            .await,
        200.0
    );
}

/// Datagrams that are not QUIC (and a device without a certificate) cost nothing else: the
/// next device gets its session.
#[tokio::test]
async fn garbage_and_anonymous_clients_are_refused_and_others_go_on() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let proxy = start(quic_proxy(&pki, &[&gw])).await;
    let addr = proxy.quic.unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..(i % 1300 + 1)).map(|j| (j * 31 + i) as u8).collect();
        socket.send_to(&junk, addr).unwrap();
    }
    // No client certificate: the handshake fails (TLS 1.3: after the client's side).
    let client = quic_client(&pki, None, "nobody");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = endpoint.connect_with(client, addr, "localhost").unwrap();
    let refused = match connecting.await {
        Err(_) => true,
        Ok(c) => {
            let closed = tokio::time::timeout(Duration::from_secs(5), c.closed()).await;
            matches!(closed, Ok(quinn::ConnectionError::ConnectionClosed(_)))
        }
    };
    assert!(refused, "no certificate, no session");
    let mut dev = QuicDev::open(addr, &pki, "device-0300").await;
    dev.step().await;
    assert_eq!(gw.hellos(), 1);
    // Counted by transport: one QUIC device open, one QUIC handshake timed (since the start:
    // the histogram is the process's, and other tests' handshakes are in it).
    let open = "wasmbed_proxy_connections_open{transport=\"quic\"}";
    assert_eq!(proxy.gauge(open).await, 1.0);
    assert_eq!(
        proxy
            .metric("wasmbed_proxy_handshake_duration_seconds_count{transport=\"quic\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .gauge("wasmbed_proxy_connections_open{transport=\"tcp\"}")
            .await,
        0.0
    );
    dev.conn.close(quinn::VarInt::from_u32(0), b"done");
    proxy.until_metric(open, 0.0).await; // from 0 at the start: closed again
}

/// `--quic-retry always`: every new device first proves its address (a stateless retry, one
/// round trip more), then gets its session as usual.
#[tokio::test]
async fn with_retry_always_devices_prove_their_address_first() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let mut c = quic_proxy(&pki, &[&gw]);
    c.quic.retry = wasmbed_config::proxy::QuicRetry::Always;
    let proxy = start(c).await;
    let mut dev = QuicDev::open(proxy.quic.unwrap(), &pki, "device-0400").await;
    dev.step().await;
    assert_eq!(
        proxy
            .metric("wasmbed_proxy_quic_connections_total{result=\"retry\"}")
            .await,
        1.0
    );
}

/// A QUIC device that sends a frame over the maximum gets ERROR `frame_too_large` and its
/// session ends; another device's session goes on.
#[tokio::test]
async fn an_oversized_frame_from_a_quic_device_ends_its_session_only() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let proxy = start(quic_proxy(&pki, &[&gw])).await;
    let addr = proxy.quic.unwrap();
    let mut bad = QuicDev::open(addr, &pki, "device-0500").await;
    let mut good = QuicDev::open(addr, &pki, "device-0501").await;
    bad.step().await;
    bad.device
        .send_raw(b"\xff\xff\xff\xff garbage")
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), bad.device.recv())
        .await
        .expect("an answer in time")
        .expect("an ERROR frame");
    assert_eq!(answer.kind, Kind::Error, "{answer:?}");
    let e: wasmbed_protocol::ErrorBody = answer.decode_body("ERROR").unwrap();
    assert_eq!(
        e.code,
        wasmbed_protocol::ErrorCode::FrameTooLarge as u16,
        "{e}"
    );
    let closed = tokio::time::timeout(Duration::from_secs(5), bad.device.recv()).await;
    assert!(
        matches!(closed, Ok(None)),
        "the session ends after the ERROR"
    );
    for _ in 0..2 {
        good.step().await;
    }
}

/// `--max-handshakes` with `--handshake-wait 0`: while that many handshakes are in
/// progress, a new device is refused at once (and counted) rather than queued; once they
/// end, devices get in again.
#[tokio::test]
async fn past_the_handshake_cap_new_devices_are_refused_at_once() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let mut c = quic_proxy(&pki, &[&gw]);
    one_slot(&mut c, Duration::ZERO, Duration::from_secs(2));
    let proxy = start(c).await;
    let addr = proxy.quic.unwrap();
    // A handshake that never ends: its client's datagrams reach the proxy through a relay
    // that drops every answer.
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let (answered_tx, answered) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut answered_tx = Some(answered_tx);
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = relay.recv_from(&mut buf).await {
            if from == addr {
                // The proxy answered: the handshake is in progress.
                if let Some(tx) = answered_tx.take() {
                    let _ = tx.send(());
                }
            } else {
                let _ = relay.send_to(&buf[..n], addr).await;
            }
        }
    });
    let client = quic_client(&pki, Some(&pki.ca), "device-0600");
    let stalled = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let _stalled_conn = stalled
        .connect_with(client, relay_addr, "localhost")
        .unwrap();
    // Polled by nobody, quinn's driver still sends the first flight.
    answered.await.unwrap();
    // At the cap: the next device is refused, at once.
    let client = quic_client(&pki, Some(&pki.ca), "device-0601");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let refused = endpoint
        .connect_with(client, addr, "localhost")
        .unwrap()
        .await;
    assert!(
        matches!(refused, Err(quinn::ConnectionError::ConnectionClosed(_))),
        "{refused:?}"
    );
    assert_eq!(
        proxy
            .metric("wasmbed_proxy_quic_connections_total{result=\"refused_busy\"}")
            .await,
        1.0
    );
    // The stalled handshake times out; devices get their sessions again.
    proxy
        .until_metric(
            "wasmbed_proxy_connections_rejected_total{reason=\"handshake_timeout\"}",
            1.0,
        )
        .await;
    let mut dev = QuicDev::open(addr, &pki, "device-0602").await;
    dev.step().await;
    drop(dev);
    all_closed(&proxy).await;
}

/// One cap for device handshakes on every transport (`max_handshakes`): a connection that
/// sends nothing holds no slot; while a stalled TLS-over-TCP handshake holds it, a device past
/// it is refused (at once with `handshake_wait = 0`) over TCP (reset before its handshake),
/// on a raw listener (the same) and over QUIC (CONNECTION_REFUSED), all counted under one
/// label; when it ends, TCP and QUIC devices get their sessions.
#[tokio::test]
async fn past_max_handshakes_devices_of_every_transport_are_refused_at_once() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let mut c = quic_proxy(&pki, &[&gw]);
    one_slot(&mut c, Duration::ZERO, Duration::from_secs(30));
    // Accepted at once: what is tested is the proxy's own admission (with the deferral, the
    // kernel would hold the idle connection below, and the test would pass either way).
    c.listeners[0].defer_accept = Duration::ZERO;
    // A raw listener beside the anchored one: the same admission.
    let mut raw = c.listeners[0].clone();
    raw.raw = true;
    c.listeners.push(raw);
    let proxy = start(c).await;
    let quic = proxy.quic.unwrap();
    // A TCP connection that sends no byte holds no handshake: a device still gets in.
    let idle = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let tls = device_tls(&pki.ca, Some(&pki.ca), "device-0699", false);
    let mut dev = Device::new(tls_connect(proxy.addr, tls).await.unwrap());
    dev.open("device-0699", "echo").await;
    drop((idle, dev));
    // One that sends the first byte of a ClientHello and stalls holds the one handshake.
    let stalled = stall_a_handshake(&proxy).await;
    let busy = "wasmbed_proxy_connections_rejected_total{reason=\"handshakes_busy\"}";
    for (transport, refused) in [("tcp", 1.0), ("raw", 2.0), ("quic", 3.0)] {
        match transport {
            "tcp" | "raw" => {
                let addr = proxy.addrs[usize::from(transport == "raw")];
                let tls = device_tls(&pki.ca, Some(&pki.ca), "device-0700", false);
                let r = tls_connect(addr, tls).await;
                // At once, with a reset (no TIME_WAIT left at the proxy per refusal).
                let Err(e) = r else {
                    panic!("TLS over TCP past the cap is refused at once")
                };
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
            }
            _ => {
                let client = quic_client(&pki, Some(&pki.ca), "device-0701");
                let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
                let r = endpoint
                    .connect_with(client, quic, "localhost")
                    .unwrap()
                    .await;
                assert!(
                    matches!(r, Err(quinn::ConnectionError::ConnectionClosed(_))),
                    "{r:?}"
                );
            }
        }
        // Counted as the refusal ends (the device may see its close a moment before).
        proxy.until_metric(busy, refused).await;
    }
    drop(stalled);
    proxy
        .until_metric("wasmbed_proxy_handshakes_in_progress", 0.0)
        .await;
    let tls = device_tls(&pki.ca, Some(&pki.ca), "device-0702", false);
    let mut dev = Device::new(tls_connect(proxy.addr, tls).await.unwrap());
    dev.open("device-0702", "echo").await;
    let mut qdev = QuicDev::open(quic, &pki, "device-0703").await;
    qdev.step().await;
    drop((dev, qdev));
    all_closed(&proxy).await;
}

/// Past `max_handshakes`, devices of every transport wait in one line (`handshake_wait`),
/// their handshakes not started: when the slot frees they get in one after the other, in
/// the order they came, none refused; a device whose wait runs out is refused and counted. The line is what keeps a
/// storm's devices from spending their TLS tickets on refused attempts.
#[tokio::test]
async fn past_max_handshakes_devices_of_every_transport_wait_in_one_line() {
    let pki = Arc::new(pki(KeyKind::EcdsaP256));
    let gw = FrameGateway::spawn("gw-0").await;
    let mut c = quic_proxy(&pki, &[&gw]);
    one_slot(&mut c, Duration::from_secs(30), Duration::from_secs(60));
    let mut raw = c.listeners[0].clone();
    raw.raw = true;
    c.listeners.push(raw);
    let proxy = start(c).await;
    let quic = proxy.quic.unwrap();
    let busy = "wasmbed_proxy_connections_rejected_total{reason=\"handshakes_busy\"}";
    let waiting = "wasmbed_proxy_handshakes_waiting";
    // A stalled TLS-over-TCP handshake holds the one slot.
    let stalled = stall_a_handshake(&proxy).await;
    // One device of each transport joins the line.
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut devices = tokio::task::JoinSet::new();
    // The order the handshakes end in (a device's ends before the proxy frees its slot).
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    for (i, transport) in ["tcp", "raw", "quic"].into_iter().enumerate() {
        let name = format!("device-{transport}-line");
        let (addr, endpoint, pki, order) = (
            proxy.addrs[usize::from(transport == "raw")],
            endpoint.clone(),
            pki.clone(),
            order.clone(),
        );
        let done = move || order.lock().unwrap().push(transport);
        devices.spawn(async move {
            match transport {
                "tcp" => {
                    let tls = device_tls(&pki.ca, Some(&pki.ca), &name, false);
                    let tls = tls_connect(addr, tls).await.unwrap();
                    done();
                    Device::new(tls).open(&name, "echo").await;
                }
                "raw" => {
                    let tls = device_tls(&pki.ca, Some(&pki.ca), &name, false);
                    tls_connect(addr, tls).await.unwrap();
                    done();
                }
                _ => {
                    let client = quic_client(&pki, Some(&pki.ca), &name);
                    let conn = endpoint
                        .connect_with(client, quic, "localhost")
                        .unwrap()
                        .await
                        .unwrap();
                    done();
                    let (send, recv) = conn.open_bi().await.unwrap();
                    let mut dev = Device::new(tokio::io::join(recv, send));
                    dev.open(&name, "echo").await;
                }
            }
            transport
        });
        proxy.until_metric(waiting, (i + 1) as f64).await;
    }
    // The slot freed: all three through, one after the other; none refused.
    drop(stalled);
    let mut through = Vec::new();
    while let Some(done) = devices.join_next().await {
        through.push(done.unwrap());
    }
    assert_eq!(through.len(), 3);
    assert_eq!(
        *order.lock().unwrap(),
        ["tcp", "raw", "quic"],
        "not first come, first served"
    );
    proxy.until_metric(waiting, 0.0).await;
    assert_eq!(
        proxy.metric(busy).await,
        0.0,
        "a device in line was refused"
    );
    // A reload that raises the cap gives the new slot to the device in line at once; one
    // that lowers it takes the slot out of use again.
    let stalled = stall_a_handshake(&proxy).await;
    let tls = device_tls(&pki.ca, Some(&pki.ca), "device-tcp-raised", false);
    let raised = tokio::spawn(tls_connect(proxy.addr, tls));
    proxy.until_metric(waiting, 1.0).await;
    let mut c = proxy.live.context().config.clone();
    c.max_handshakes = 2;
    proxy.live.apply(c.clone()).unwrap();
    let raised = raised
        .await
        .unwrap()
        .expect("a device in line when the cap rose");
    drop(raised);
    // A wait that runs out: refused, counted, out of the line. (Read live: a reload sets it.)
    c.max_handshakes = 1;
    // Long enough that the gauge's one in between cannot slip past the scrapes below.
    c.handshake_wait = Duration::from_millis(1000);
    proxy.live.apply(c).unwrap();
    let tls = device_tls(&pki.ca, Some(&pki.ca), "device-tcp-late", false);
    let late = tokio::spawn(tls_connect(proxy.addr, tls));
    // In line first, then out of it, refused.
    proxy.until_metric(waiting, 1.0).await;
    let Err(e) = late.await.unwrap() else {
        panic!("a device past its wait was let in")
    };
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    proxy.until_metric(busy, 1.0).await;
    proxy.until_metric(waiting, 0.0).await;
    drop(stalled);
    all_closed(&proxy).await;
}

/// Devices resume TLS from stateless tickets on every transport: however many reconnect at
/// once (more than rustls' default cache of 256 sessions, which at two tickets per handshake
/// held 128 devices' and turned a reconnect storm into full handshakes), and after a reload
/// (the process's own ticket keys are kept). Counted the same for TLS over TCP and QUIC.
#[tokio::test]
async fn devices_of_every_transport_resume_tls_however_many_reconnect() {
    const DEVICES: usize = 150;
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let proxy = start(quic_proxy(&pki, &[&gw])).await;
    let quic = proxy.quic.unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let series = |result: &str| format!("wasmbed_proxy_tls_tickets_total{{result=\"{result}\"}}");
    let mut resumed = 0.0;
    for transport in ["tcp", "quic"] {
        let name = |i: usize| format!("device-{transport}-{i:04}");
        // One client config per device (a device's own ticket store), kept across its
        // connections; a session opened on each (its round trip brings the tickets).
        let tcp_configs: Vec<_> = (0..DEVICES)
            .map(|i| device_tls(&pki.ca, Some(&pki.ca), &name(i), false))
            .collect();
        let quic_configs: Vec<_> = (0..DEVICES)
            .map(|i| quic_client(&pki, Some(&pki.ca), &name(i)))
            .collect();
        let connect = |i: usize| {
            let (tcp, quic_config, endpoint) = (
                tcp_configs[i].clone(),
                quic_configs[i].clone(),
                endpoint.clone(),
            );
            let device = name(i);
            let addr = proxy.addr;
            async move {
                match transport {
                    "tcp" => {
                        let tls = tls_connect(addr, tcp).await.unwrap();
                        let mut dev = Device::new(tls);
                        dev.open(&device, "echo").await;
                        Some(dev.framed.get_ref().get_ref().1.handshake_kind())
                    }
                    _ => {
                        let conn = endpoint
                            .connect_with(quic_config, quic, "localhost")
                            .unwrap()
                            .await
                            .unwrap();
                        let (send, recv) = conn.open_bi().await.unwrap();
                        let mut dev = Device::new(tokio::io::join(recv, send));
                        dev.open(&device, "echo").await;
                        conn.close(0u32.into(), b"bye");
                        None
                    }
                }
            }
        };
        for i in 0..DEVICES {
            connect(i).await;
        }
        assert_eq!(proxy.metric(&series("opened")).await, resumed);
        // Every device again: each resumes from its own ticket.
        for i in 0..DEVICES {
            if let Some(kind) = connect(i).await {
                assert_eq!(kind, Some(rustls::HandshakeKind::Resumed), "{}", name(i));
            }
        }
        resumed += DEVICES as f64;
        assert_eq!(
            proxy.metric(&series("opened")).await,
            resumed,
            "{transport}"
        );
        // A reload of the device TLS keeps the keys of the tickets out there.
        proxy.device_tls.reload().unwrap();
        if let Some(kind) = connect(0).await {
            assert_eq!(kind, Some(rustls::HandshakeKind::Resumed));
        }
        resumed += 1.0;
        assert_eq!(
            proxy.metric(&series("opened")).await,
            resumed,
            "{transport}"
        );
    }
    assert_eq!(proxy.metric(&series("refused")).await, 0.0);
    assert!(proxy.metric(&series("issued")).await >= 4.0 * DEVICES as f64);
    // Every connection ended before the next test reads the process's gauges.
    for transport in ["tcp", "quic"] {
        let open = format!("wasmbed_proxy_connections_open{{transport=\"{transport}\"}}");
        proxy.until_metric(&open, 0.0).await;
    }
}

/// A ticket proves a device holds its TLS session, not that its certificate still passes: a
/// device whose CA is no longer trusted after a reload is refused when it resumes, on every
/// transport, counted as a certificate refusal, and no gateway hears of it.
#[tokio::test]
async fn a_resumed_session_whose_certificate_no_longer_passes_is_refused_on_every_transport() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let proxy = start(quic_proxy(&pki, &[&gw])).await;
    let quic = proxy.quic.unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let tcp = device_tls(&pki.ca, Some(&pki.ca), "device-0801", false);
    let quic_config = quic_client(&pki, Some(&pki.ca), "device-0802");
    let open = |transport: &'static str| {
        let (tcp, quic_config, endpoint) = (tcp.clone(), quic_config.clone(), endpoint.clone());
        let addr = proxy.addr;
        async move {
            match transport {
                "tcp" => {
                    let mut dev = Device::new(tls_connect(addr, tcp).await.ok()?);
                    dev.send_raw(&hello_of("device-0801")).await.ok()?;
                    Some(dev.recv().await?.kind)
                }
                _ => {
                    let conn = endpoint
                        .connect_with(quic_config, quic, "localhost")
                        .ok()?
                        .await
                        .ok()?;
                    let (send, recv) = conn.open_bi().await.ok()?;
                    let mut dev = Device::new(tokio::io::join(recv, send));
                    dev.send_raw(&hello_of("device-0802")).await.ok()?;
                    let f = dev.recv().await?;
                    conn.close(0u32.into(), b"bye");
                    Some(f.kind)
                }
            }
        }
    };
    // Sessions with tickets, while the CA is trusted.
    for transport in ["tcp", "quic"] {
        assert_eq!(open(transport).await, Some(Kind::Welcome), "{transport}");
    }
    assert_eq!(gw.hellos(), 2);
    // The device CA replaced by another one, and reloaded.
    let other = DevCa::generate("another CA").unwrap();
    let client_ca = pki.tls.client_ca.clone().unwrap();
    std::fs::write(&client_ca, other.cert_pem()).unwrap();
    proxy.device_tls.reload().unwrap();
    let refused = "wasmbed_proxy_connections_rejected_total{reason=\"client_cert\"}";
    for (i, transport) in ["tcp", "quic"].into_iter().enumerate() {
        assert_eq!(open(transport).await, None, "{transport}: refused");
        proxy.until_metric(refused, i as f64 + 1.0).await;
    }
    // Resumed, not refused by a full handshake: the tickets opened.
    assert_eq!(
        proxy
            .metric("wasmbed_proxy_tls_tickets_total{result=\"opened\"}")
            .await,
        2.0
    );
    assert_eq!(gw.hellos(), 2, "no gateway heard of them");
    for transport in ["tcp", "quic"] {
        let open = format!("wasmbed_proxy_connections_open{{transport=\"{transport}\"}}");
        proxy.until_metric(&open, 0.0).await;
    }
}

/// A certificate its CA signed that names no device (no common name, no DNS name: URI SANs
/// only) has no name to hold a HELLO to: it is refused at the handshake's end, on every
/// transport, counted as a certificate refusal, and no gateway hears the HELLO naming another
/// device it would otherwise have been free to send.
#[tokio::test]
async fn a_certificate_that_names_no_device_is_refused_on_every_transport() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let proxy = start(quic_proxy(&pki, &[&gw])).await;
    let unnamed = pki
        .ca
        .issue_client_unnamed(&["spiffe://fleet/device/0001"])
        .unwrap();
    let tls = device_tls_with(&pki.ca, &unnamed);
    let refused = "wasmbed_proxy_connections_rejected_total{reason=\"client_cert\"}";
    for (i, transport) in ["tcp", "quic"].into_iter().enumerate() {
        // HELLO naming another device, sent as soon as the device's handshake is done.
        let answer = answer_to_hello(&proxy, transport, tls.clone(), "device-0000").await;
        assert_eq!(answer, None, "{transport}: closed, no answer");
        proxy.until_metric(refused, i as f64 + 1.0).await;
    }
    assert_eq!(gw.hellos(), 0, "no gateway heard of them");
    // A named device of the same CA gets through.
    let mut named = Session::open(&proxy, &pki, ("quic", "device-0001"), Some(&pki.ca)).await;
    assert_eq!(named.step().await, Some(Kind::Reply));
}

/// The dashboard counts a device alike on every transport: taken in (a TCP connection at its
/// accept, a QUIC device once its handshake goes on), and refused as well when its certificate
/// does not pass; a device that gets its session counts as accepted only.
#[tokio::test]
async fn the_dashboard_counts_devices_alike_on_every_transport() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let proxy = start(quic_proxy(&pki, &[&gw])).await;
    let stranger = DevCa::generate("not the devices' CA").unwrap();
    let unknown = stranger
        .issue_client("device-0020", KeyKind::EcdsaP256)
        .unwrap();
    let known = pki
        .ca
        .issue_client("device-0021", KeyKind::EcdsaP256)
        .unwrap();
    let since = wasmbed_proxy::session_totals();
    let grown = || {
        let now = wasmbed_proxy::session_totals();
        (now.accepted - since.accepted, now.refused - since.refused)
    };
    for (i, transport) in ["tcp", "quic"].into_iter().enumerate() {
        let tls = device_tls_with(&pki.ca, &unknown);
        let answer = answer_to_hello(&proxy, transport, tls, "device-0020").await;
        assert_eq!(answer, None, "{transport}: refused");
        let want = (2 * i as u64 + 1, i as u64 + 1);
        wasmbed_testkit::until(Duration::from_secs(5), "the refusal counted", || {
            grown() == want
        })
        .await;
        let tls = device_tls_with(&pki.ca, &known);
        let answer = answer_to_hello(&proxy, transport, tls, "device-0021").await;
        assert_eq!(answer, Some(Kind::Welcome), "{transport}: served");
        assert_eq!(grown(), (2 * i as u64 + 2, i as u64 + 1), "{transport}");
    }
}

/// A CRL revokes its own CA's certificates only, at the handshake's end on every transport:
/// with two device CAs trusted (a rotation's old and new), a certificate of the new one whose
/// serial number the old one's CRL revokes gets its session, and the old one's is refused.
#[tokio::test]
async fn a_crl_revokes_its_own_cas_devices_only_on_every_transport() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let dir = tempfile::tempdir().unwrap();
    let newer = DevCa::generate("devices, 2027").unwrap();
    let cas = dir.path().join("cas.pem");
    std::fs::write(&cas, format!("{}{}", pki.ca.cert_pem(), newer.cert_pem())).unwrap();
    let revoked = pki.ca.issue_client_numbered("device-0010", 10).unwrap();
    let namesake = newer.issue_client_numbered("device-0011", 10).unwrap();
    let serial = wasmbed_certs::serial_of(&revoked.chain()[0]).unwrap();
    let crl = dir.path().join("crl.pem");
    let hour = Duration::from_secs(3600);
    std::fs::write(&crl, pki.ca.crl(&[serial], 1, hour).unwrap()).unwrap();
    let mut config = quic_proxy(&pki, &[&gw]);
    if let Some(tls) = config.tls.as_mut() {
        tls.client_ca = Some(cas);
        tls.client_crls = vec![crl];
    }
    let proxy = start(config).await;
    let answer = |transport: &'static str, issued, device: &'static str| {
        answer_to_hello(&proxy, transport, device_tls_with(&pki.ca, issued), device)
    };
    for transport in ["tcp", "quic"] {
        let f = answer(transport, &namesake, "device-0011").await;
        assert_eq!(
            f,
            Some(Kind::Welcome),
            "{transport}: another CA's serial 10"
        );
        let f = answer(transport, &revoked, "device-0010").await;
        assert_ne!(f, Some(Kind::Welcome), "{transport}: the revoked one");
    }
}

/// A device that ends the handshake with an alert of its own (it does not trust the proxy's
/// certificate) is counted alike on every transport: `tls_handshake`.
#[tokio::test]
async fn a_device_that_refuses_the_proxys_certificate_is_counted_alike_on_every_transport() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let proxy = start(quic_proxy(&pki, &[&gw])).await;
    let quic = proxy.quic.unwrap();
    let stranger = DevCa::generate("a root the device trusts").unwrap();
    let tcp = device_tls(&stranger, Some(&pki.ca), "device-0001", false);
    let quic_config = quic_client_of(&tcp);
    let series = "wasmbed_proxy_connections_rejected_total{reason=\"tls_handshake\"}";
    assert!(tls_connect(proxy.addr, tcp).await.is_err(), "tcp: refused");
    proxy.until_metric(series, 1.0).await;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = endpoint
        .connect_with(quic_config, quic, "localhost")
        .unwrap();
    assert!(connecting.await.is_err(), "quic: refused");
    proxy.until_metric(series, 2.0).await;
    assert_eq!(
        proxy
            .metric("wasmbed_proxy_connections_rejected_total{reason=\"client_error\"}")
            .await,
        0.0
    );
}

/// A TCP device's handshake runs under the trust in use when it starts, not when the device
/// arrived: one waiting in line (`max_handshakes`) while a reload replaces the device CA is
/// held to the new CA, as a QUIC device's chain is checked against the trust in use at its
/// handshake's end.
#[tokio::test]
async fn a_device_waiting_in_line_through_a_reload_is_held_to_the_new_trust() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let mut config = quic_proxy(&pki, &[&gw]);
    one_slot(&mut config, Duration::from_secs(5), Duration::from_secs(10));
    let proxy = start(config).await;
    let stalled = stall_a_handshake(&proxy).await;
    let addr = proxy.addr;
    let tls = device_tls(&pki.ca, Some(&pki.ca), "device-0001", false);
    let waits = tokio::spawn(async move {
        let mut d = Device::new(tls_connect(addr, tls).await.ok()?);
        d.send_raw(&hello_of("device-0001")).await.ok()?;
        d.recv().await.map(|f| f.kind)
    });
    proxy
        .until_metric("wasmbed_proxy_handshakes_waiting", 1.0)
        .await;
    // The device CA replaced while it waits.
    let other = DevCa::generate("another CA").unwrap();
    std::fs::write(pki.tls.client_ca.clone().unwrap(), other.cert_pem()).unwrap();
    proxy.device_tls.reload().unwrap();
    drop(stalled);
    assert_eq!(waits.await.unwrap(), None, "refused under the new trust");
    let refused = "wasmbed_proxy_connections_rejected_total{reason=\"client_cert\"}";
    proxy.until_metric(refused, 1.0).await;
    assert_eq!(gw.hellos(), 0);
}

/// A QUIC device's session stream and its HELLO share one `handshake_timeout`, as a TCP
/// device's HELLO has one: a device that opens its stream late and finishes its HELLO later
/// still, each within the timeout but not both, is refused (`handshake_timeout`), not given
/// a timeout more for each step.
#[tokio::test]
async fn a_quic_devices_stream_and_hello_share_one_timeout() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let mut config = quic_proxy(&pki, &[&gw]);
    let t = Duration::from_millis(800);
    config.handshake_timeout = t;
    let proxy = start(config).await;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(
            quic_client(&pki, Some(&pki.ca), "device-0001"),
            proxy.quic.unwrap(),
            "localhost",
        )
        .unwrap()
        .await
        .unwrap();
    let hello = hello_of("device-0001");
    // The stream opened (its first bytes sent) at 0.6 T, the HELLO's rest at 1.2 T: each
    // step within T of the one before, both past T.
    tokio::time::sleep(t * 6 / 10).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(&hello[..2]).await.unwrap();
    tokio::time::sleep(t * 6 / 10).await;
    let _ = send.write_all(&hello[2..]).await;
    let mut dev = Device::new(tokio::io::join(recv, send));
    let answer = dev.recv().await.map(|f| f.kind);
    assert_ne!(answer, Some(Kind::Welcome), "no session past one timeout");
    let timeouts = "wasmbed_proxy_connections_rejected_total{reason=\"handshake_timeout\"}";
    proxy.until_metric(timeouts, 1.0).await;
    assert_eq!(gw.hellos(), 0);
}

/// At `max_connections`, a QUIC device waits in the handshake line for a place, as a TCP
/// device waits in the listen backlog, instead of being refused at once: an Initial held
/// unanswered holds no socket, so the place is taken when its handshake starts (devices in
/// line holding places filled the cap in a 9,000-device storm, and the newcomers' refusals
/// spent their TLS tickets). The line is no longer than the free places: one more is
/// refused `full` at once.
#[tokio::test]
async fn at_max_connections_a_quic_device_waits_in_line_for_a_place() {
    let pki = Arc::new(pki(KeyKind::EcdsaP256));
    let gw = FrameGateway::spawn("gw-0").await;
    let mut c = quic_proxy(&pki, &[&gw]);
    one_slot(&mut c, Duration::from_secs(30), Duration::from_secs(60));
    // Two places: the TCP listener holds one while it waits to accept (past the cap, TCP
    // devices wait in the backlog), the stalled connection below the other.
    c.max_connections = 2;
    let proxy = start(c).await;
    let quic = proxy.quic.unwrap();
    let full = "wasmbed_proxy_quic_connections_total{result=\"refused_full\"}";
    let waiting = "wasmbed_proxy_handshakes_waiting";
    // A stalled TLS-over-TCP handshake holds the last place and the one slot.
    let stalled = stall_a_handshake(&proxy).await;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let client = quic_client(&pki, Some(&pki.ca), "device-quic-waits");
    let connecting = endpoint.connect_with(client, quic, "localhost").unwrap();
    let waits = tokio::spawn(connecting);
    proxy.until_metric(waiting, 1.0).await;
    assert_eq!(proxy.metric(full).await, 0.0, "refused, not in line");
    // The line is as long as the places that will be free (none now): one more is refused.
    let client = quic_client(&pki, Some(&pki.ca), "device-quic-refused");
    let refused = endpoint
        .connect_with(client, quic, "localhost")
        .unwrap()
        .await;
    assert!(refused.is_err(), "a device past the line's bound got in");
    assert_eq!(proxy.metric(full).await, 1.0);
    // Counted as every refusal is, under its reason.
    let rejected = "wasmbed_proxy_connections_rejected_total{reason=\"connections_full\"}";
    assert_eq!(proxy.metric(rejected).await, 1.0);
    // The place and the slot free: the device in line gets both and its session.
    drop(stalled);
    let conn = waits
        .await
        .unwrap()
        .expect("the device in line, once a place freed");
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut dev = Device::new(tokio::io::join(recv, send));
    dev.open("device-quic-waits", "echo").await;
    assert_eq!(proxy.metric(full).await, 1.0);
    // Its session holds the place while it lives: another device finds none ...
    let client = quic_client(&pki, Some(&pki.ca), "device-quic-later");
    let later = endpoint
        .connect_with(client.clone(), quic, "localhost")
        .unwrap()
        .await;
    assert!(later.is_err(), "a device got a place a session holds");
    assert_eq!(proxy.metric(full).await, 2.0);
    // ... and gets it once that session ends.
    drop(dev);
    conn.close(0u32.into(), b"bye");
    all_closed(&proxy).await;
    endpoint
        .connect_with(client, quic, "localhost")
        .unwrap()
        .await
        .expect("the place a session gave back");
}

/// A QUIC device refused three times in a row (a storm) still resumes TLS: its client spends
/// a ticket on each attempt (the ticket is in the Initial the refusal answers), and the proxy
/// sends enough after each handshake (`TICKETS_PER_HANDSHAKE`, 4; rustls' 2 lasted two
/// refusals, and a storm's full handshakes then slowed the line for everyone).
#[tokio::test]
async fn a_quic_device_refused_three_times_still_resumes() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let mut c = quic_proxy(&pki, &[&gw]);
    let timeout = c.handshake_timeout;
    one_slot(&mut c, Duration::ZERO, timeout);
    let proxy = start(c).await;
    let quic = proxy.quic.unwrap();
    let opened = "wasmbed_proxy_tls_tickets_total{result=\"opened\"}";
    let busy = "wasmbed_proxy_quic_connections_total{result=\"refused_busy\"}";
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    // One client config: the device's own ticket store, kept across its attempts.
    let client = quic_client(&pki, Some(&pki.ca), "device-refused");
    let session = |client: quinn::ClientConfig| {
        let endpoint = endpoint.clone();
        async move {
            let conn = endpoint
                .connect_with(client, quic, "localhost")
                .unwrap()
                .await?;
            let (send, recv) = conn.open_bi().await.unwrap();
            // The session's round trip brings the tickets.
            Device::new(tokio::io::join(recv, send))
                .open("device-refused", "echo")
                .await;
            conn.close(0u32.into(), b"bye");
            Ok::<(), quinn::ConnectionError>(())
        }
    };
    session(client.clone()).await.unwrap();
    // A stalled handshake holds the one slot: three attempts refused.
    let stalled = stall_a_handshake(&proxy).await;
    for _ in 0..3 {
        assert!(session(client.clone()).await.is_err());
    }
    assert_eq!(proxy.metric(busy).await, 3.0);
    assert_eq!(proxy.metric(opened).await, 0.0);
    drop(stalled);
    proxy
        .until_metric("wasmbed_proxy_handshakes_in_progress", 0.0)
        .await;
    session(client).await.unwrap();
    assert_eq!(
        proxy.metric(opened).await,
        1.0,
        "the fourth attempt resumed from a ticket left"
    );
}

/// A TLS-over-TCP connection that sends the first byte of a ClientHello and stalls: it
/// holds a handshake slot (the one, under `max_handshakes = 1`) until dropped.
async fn stall_a_handshake(proxy: &RunningProxy) -> tokio::net::TcpStream {
    let mut stalled = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stalled, &[0x16])
        .await
        .unwrap();
    proxy
        .until_metric("wasmbed_proxy_handshakes_in_progress", 1.0)
        .await;
    stalled
}

/// Waits until every session a test opened has ended: the connection gauges are the
/// process's, and the next test counts from what they read when it starts.
async fn all_closed(proxy: &RunningProxy) {
    for transport in ["tcp", "quic"] {
        let open = format!("wasmbed_proxy_connections_open{{transport=\"{transport}\"}}");
        proxy.until_metric(&open, 0.0).await;
    }
}

/// A device's session on either transport, its connection kept open until dropped.
enum Session {
    Tcp(Box<Device<TlsDevice>>),
    Quic(Device<QuicStream>, quinn::Connection),
}

impl Session {
    /// `device` opens a `counter` session over `transport`, with a certificate from
    /// `identity` (`None`: anonymous).
    async fn open(
        proxy: &RunningProxy,
        pki: &Pki,
        (transport, device): (&str, &str),
        identity: Option<&DevCa>,
    ) -> Session {
        let mut s = match transport {
            "tcp" => {
                let tls = device_tls(&pki.ca, identity, device, false);
                Session::Tcp(Box::new(Device::new(
                    tls_connect(proxy.addr, tls).await.unwrap(),
                )))
            }
            _ => {
                let quic = proxy.quic.unwrap();
                let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
                let conn = endpoint
                    .connect_with(quic_client(pki, identity, device), quic, "localhost")
                    .unwrap()
                    .await
                    .unwrap();
                let (send, recv) = conn.open_bi().await.unwrap();
                Session::Quic(Device::new(tokio::io::join(recv, send)), conn)
            }
        };
        match &mut s {
            Session::Tcp(d) => d.open(device, "counter").await,
            Session::Quic(d, _) => d.open(device, "counter").await,
        };
        s
    }

    /// A DATA's answer (`None`: the session is closed).
    async fn step(&mut self) -> Option<Kind> {
        match self {
            Session::Tcp(d) => {
                let frame = data_frame(d);
                d.send_raw(&frame).await.ok()?;
                d.recv().await.map(|f| f.kind)
            }
            Session::Quic(d, _) => {
                let frame = data_frame(d);
                d.send_raw(&frame).await.ok()?;
                d.recv().await.map(|f| f.kind)
            }
        }
    }

    /// How the proxy closed the connection: a TCP reset, or QUIC's close code (`None`: still
    /// open after a while, or closed another way).
    async fn closed_by_proxy(&mut self) -> Option<u64> {
        match self {
            Session::Tcp(d) => {
                use futures_util::StreamExt;
                let read = tokio::time::timeout(Duration::from_secs(10), d.framed.next()).await;
                match read.ok()? {
                    Some(Err(wasmbed_protocol::codec::CodecError::Io(e)))
                        if e.kind() == std::io::ErrorKind::ConnectionReset =>
                    {
                        Some(0)
                    }
                    other => panic!("a reset expected, got {other:?}"),
                }
            }
            Session::Quic(_, conn) => {
                let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
                match closed.ok()? {
                    quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner()),
                    other => panic!("an application close expected, got {other}"),
                }
            }
        }
    }
}

/// The next DATA of `d`, encoded.
fn data_frame<S>(d: &mut Device<S>) -> Vec<u8> {
    d.seq += 1;
    wasmbed_protocol::Frame::new(Kind::Data, d.seq, b"tick".to_vec()).encode()
}

/// A device that connects again while its earlier session is still open (its close was
/// lost, or it rebooted) takes the session: the earlier connection is closed at once,
/// counted, and its gateway session ends, on every transport and across transports; other
/// devices' sessions are untouched. (Else such a zombie would hold its connection slot, its
/// gateway session and its app instance until its idle timeout.)
#[tokio::test]
async fn a_newer_connection_of_a_device_takes_its_session_on_every_transport() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let proxy = start(quic_proxy(&pki, &[&gw])).await;
    let sessions = "wasmbed_proxy_gateway_sessions{gateway=\"gw-0\"}";
    let superseded =
        "wasmbed_proxy_sessions_cancelled_total{gateway=\"gw-0\",cause=\"superseded\"}";
    let mut kept = Vec::new();
    for (i, (first, second)) in [
        ("tcp", "tcp"),
        ("quic", "quic"),
        ("tcp", "quic"),
        ("quic", "tcp"),
    ]
    .into_iter()
    .enumerate()
    {
        let device = format!("device-{first}-{second}");
        let mut old = Session::open(&proxy, &pki, (first, &device), Some(&pki.ca)).await;
        assert_eq!(old.step().await, Some(Kind::Reply));
        proxy.until_metric(sessions, i as f64 + 1.0).await;
        // The device again, its first connection still open.
        let mut new = Session::open(&proxy, &pki, (second, &device), Some(&pki.ca)).await;
        let code = match old {
            Session::Tcp(_) => 0,
            Session::Quic(..) => u64::from(wasmbed_proxy::quic::code::SUPERSEDED),
        };
        assert_eq!(
            old.closed_by_proxy().await,
            Some(code),
            "{device}: the earlier connection is not closed as superseded"
        );
        assert_eq!(new.step().await, Some(Kind::Reply), "{device}");
        proxy.until_metric(superseded, i as f64 + 1.0).await;
        // One gateway session per device: the earlier one ended with its connection; one
        // seat per device.
        proxy.until_metric(sessions, i as f64 + 1.0).await;
        proxy
            .until_metric("wasmbed_proxy_device_seats", i as f64 + 1.0)
            .await;
        kept.push(new);
    }
    // Every device's newer session still serves.
    for s in &mut kept {
        assert_eq!(s.step().await, Some(Kind::Reply));
    }
    drop(kept);
    all_closed(&proxy).await;
    // Every seat given back with its session.
    proxy.until_metric("wasmbed_proxy_device_seats", 0.0).await;
}

/// Without `client_ca` a HELLO's device name is a claim, and a claim does not end another
/// session: two anonymous devices naming the same device both keep theirs, on every
/// transport.
#[tokio::test]
async fn a_devices_name_without_a_certificate_takes_no_session() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw-0").await;
    let mut config = quic_proxy(&pki, &[&gw]);
    if let Some(tls) = config.tls.as_mut() {
        tls.client_ca = None;
    }
    let proxy = start(config).await;
    let mut open = Vec::new();
    for transport in ["tcp", "quic", "tcp", "quic"] {
        open.push(Session::open(&proxy, &pki, (transport, "device-0900"), None).await);
    }
    for s in &mut open {
        assert_eq!(s.step().await, Some(Kind::Reply), "a session was ended");
    }
    assert_eq!(
        proxy
            .metric("wasmbed_proxy_gateway_sessions{gateway=\"gw-0\"}")
            .await,
        4.0
    );
    assert_eq!(proxy.metric("wasmbed_proxy_device_seats").await, 0.0);
    drop(open);
    all_closed(&proxy).await;
}
