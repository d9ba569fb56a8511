//! Device sessions end to end with real TLS on 127.0.0.1.

mod support;

use std::time::Duration;

use support::*;
use wasmbed_certs::pki::DevCa;
use wasmbed_protocol::{ErrorCode, Frame, Kind};

#[tokio::test]
async fn a_tls_session_runs_echo_and_counter_end_to_end() {
    let pki = Pki::new();
    let gw = start(settings(Some(&pki))).await;
    let mut d = tls_device(gw.addr, pki.device("device-0001", Some(&pki.ca)))
        .await
        .unwrap();
    assert_eq!(d.open("device-0001", "echo").await, "gw-test");
    let r = d.data(b"hello gateway").await;
    assert_eq!(
        (r.kind, r.body.as_slice()),
        (Kind::Reply, &b"hello gateway"[..])
    );
    d.send(Frame::new(Kind::Ping, 77, Vec::new()))
        .await
        .unwrap();
    let pong = d.recv().await.unwrap();
    assert_eq!((pong.kind, pong.seq), (Kind::Pong, 77));

    let mut c = tls_device(gw.addr, pki.device("device-0002", Some(&pki.ca)))
        .await
        .unwrap();
    c.open("device-0002", "counter").await;
    let mut expect_sum = 0u64;
    for (n, msg) in [&b"\x01\x02"[..], b"\x0a", b"\xff\xff"].iter().enumerate() {
        expect_sum += msg.iter().map(|&b| u64::from(b)).sum::<u64>();
        let r = c.data(msg).await;
        assert_eq!(r.kind, Kind::Reply);
        assert_eq!(
            u64::from_le_bytes(r.body[..8].try_into().unwrap()),
            n as u64 + 1
        );
        assert_eq!(
            u64::from_le_bytes(r.body[8..].try_into().unwrap()),
            expect_sum
        );
    }
}

#[tokio::test]
async fn the_hello_must_name_the_certificates_device() {
    let pki = Pki::new();
    let gw = start(settings(Some(&pki))).await;
    let mut d = tls_device(gw.addr, pki.device("device-0001", Some(&pki.ca)))
        .await
        .unwrap();
    let f = d.hello("device-9999", "echo").await;
    assert_eq!(error_code(&f), ErrorCode::IdentityMismatch as u16);
    assert!(d.recv().await.is_none(), "closed after the ERROR");
}

#[tokio::test]
async fn a_certificate_from_another_ca_or_none_is_refused() {
    let pki = Pki::new();
    let gw = start(settings(Some(&pki))).await;
    let other = DevCa::generate("other CA").unwrap();
    for issuer in [Some(&other), None] {
        // TLS 1.3: the client may finish before the server checks its certificate, so the
        // refusal shows on the first read at the latest.
        match tls_device(gw.addr, pki.device("device-0001", issuer)).await {
            Err(_) => {}
            Ok(mut d) => {
                let _ = d.send(Frame::new(Kind::Ping, 1, Vec::new())).await;
                assert!(
                    d.recv().await.is_none(),
                    "no session without a valid certificate"
                );
            }
        }
    }
    // The gateway is untouched: a good device still gets in.
    let mut ok = tls_device(gw.addr, pki.device("device-0003", Some(&pki.ca)))
        .await
        .unwrap();
    ok.open("device-0003", "echo").await;
}

#[tokio::test]
async fn bad_input_is_answered_by_error_and_touches_nothing_else() {
    let gw = start(settings(None)).await;
    let mut good = tcp_device(gw.addr).await;
    good.open("device-good", "echo").await;

    let mut d = tcp_device(gw.addr).await;
    assert_eq!(
        error_code(&d.hello("device-1", "no-such-app").await),
        ErrorCode::UnknownApp as u16
    );

    let mut d = tcp_device(gw.addr).await;
    d.send(Frame::new(Kind::Data, 1, b"too early".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        error_code(&d.recv().await.unwrap()),
        ErrorCode::NoSession as u16
    );

    let mut d = tcp_device(gw.addr).await;
    d.send(Frame::new(Kind::Hello, 0, b"\xff not cbor".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        error_code(&d.recv().await.unwrap()),
        ErrorCode::BadHello as u16
    );

    let mut d = tcp_device(gw.addr).await;
    d.send_raw(&(1u32 << 30).to_be_bytes()).await.unwrap(); // a 1 GiB frame announced
    assert_eq!(
        error_code(&d.recv().await.unwrap()),
        ErrorCode::FrameTooLarge as u16
    );

    let mut d = tcp_device(gw.addr).await;
    d.send_raw(&[0, 0, 0, 9, 200, 0, 0, 0, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    assert_eq!(
        error_code(&d.recv().await.unwrap()),
        ErrorCode::UnknownType as u16
    );

    let mut d = tcp_device(gw.addr).await;
    d.open("device-2", "echo").await;
    d.send(Frame::new(Kind::Reply, 5, Vec::new()))
        .await
        .unwrap();
    assert_eq!(
        error_code(&d.recv().await.unwrap()),
        ErrorCode::BadFrame as u16
    );

    // The first session never noticed.
    assert_eq!(good.data(b"still fine").await.body, b"still fine");
    let (_, metrics) = http(gw.admin, "GET", "/metrics", b"").await;
    assert!(
        metrics.contains("wasmbed_gateway_errors_sent_total{code=\"unknown_app\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looping_and_growing_apps_are_stopped_while_a_healthy_session_keeps_replying() {
    let gw = start(settings(None)).await;
    let mut healthy = tcp_device(gw.addr).await;
    healthy.open("device-h", "echo").await;
    let steady = tokio::spawn(async move {
        let mut replies = 0;
        for i in 0..200u32 {
            let r = healthy.data(&i.to_be_bytes()).await;
            assert_eq!(r.kind, Kind::Reply);
            replies += 1;
        }
        replies
    });
    let mut looping = tcp_device(gw.addr).await;
    looping.open("device-l", "loop").await;
    let mut growing = tcp_device(gw.addr).await;
    growing.open("device-g", "grow").await;
    let (l, g) = tokio::join!(looping.data(b"x"), growing.data(b"x"));
    assert_eq!(error_code(&l), ErrorCode::AppTimeout as u16);
    assert_eq!(error_code(&g), ErrorCode::AppMemory as u16);
    // Two more failures in a row close the session with too_many_traps.
    assert_eq!(
        error_code(&looping.data(b"x").await),
        ErrorCode::AppTimeout as u16
    );
    assert_eq!(
        error_code(&looping.data(b"x").await),
        ErrorCode::AppTimeout as u16
    );
    let last = looping.recv().await.expect("the closing ERROR");
    assert_eq!(error_code(&last), ErrorCode::TooManyTraps as u16);
    assert!(looping.recv().await.is_none());
    assert_eq!(steady.await.unwrap(), 200, "every healthy message answered");
    let (_, metrics) = http(gw.admin, "GET", "/metrics", b"").await;
    assert!(
        metrics.contains("wasmbed_gateway_app_failures_total{kind=\"timeout\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wasmbed_gateway_app_failures_total{kind=\"memory\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_idle_session_is_closed() {
    let mut s = settings(None);
    s.idle_timeout = Duration::from_millis(200);
    let gw = start(s).await;
    let mut d = tcp_device(gw.addr).await;
    d.open("device-1", "echo").await;
    assert_eq!(
        error_code(&d.recv().await.unwrap()),
        ErrorCode::IdleTimeout as u16
    );
    assert!(d.recv().await.is_none());
}

/// A device that stops reading (its window full, the gateway's writes stalled) is as idle as
/// one that stops sending: its session ends at the idle timeout, where a write waiting on
/// it held the session for good.
#[tokio::test]
async fn a_device_that_reads_nothing_is_closed_at_the_idle_timeout() {
    let mut s = settings(None);
    // Longer than any pause of the device's own loop below (which would end the session by
    // the read side's idle timeout instead).
    s.idle_timeout = Duration::from_secs(1);
    let gw = start(s).await;
    let mut d = tcp_device(gw.addr).await;
    d.open("device-1", "echo").await;
    // Echoed DATA the device never reads, until its own writes stall (the gateway is stuck
    // writing REPLYs) or fail (the gateway closed the session).
    for seq in 1.. {
        let data = Frame::new(Kind::Data, seq, vec![7u8; 32 << 10]);
        let sent = tokio::time::timeout(Duration::from_millis(500), d.send(data)).await;
        if !matches!(sent, Ok(Ok(()))) {
            break;
        }
    }
    wasmbed_testkit::until(Duration::from_secs(10), "the stalled session ended", || {
        gw.shared
            .sessions
            .load(std::sync::atomic::Ordering::Acquire)
            == 0
    })
    .await;
}

/// An ERROR whose text would pass the frame limit (names the device chose, quoted and
/// escaped; a trap's backtrace) is cut to fit and sent: the refusal reaches the device.
#[tokio::test]
async fn an_error_too_long_for_a_frame_is_cut_to_fit() {
    let mut s = settings(None);
    s.max_frame = 256;
    let gw = start(s).await;
    let mut d = tcp_device(gw.addr).await;
    // 200 bytes of app name, each escaped to 6 in the ERROR's text.
    let h = wasmbed_protocol::Hello {
        device: "device-1".into(),
        app: "\u{1}".repeat(200),
        resume: None,
    };
    d.send(Frame::control(Kind::Hello, 0, &h)).await.unwrap();
    let f = d.recv().await.expect("an ERROR, not only the close");
    assert_eq!(error_code(&f), ErrorCode::UnknownApp as u16);
    assert!(
        wasmbed_protocol::HEADER + f.body.len() <= 256,
        "{}",
        f.body.len()
    );
    let text = error_of(&f).expect("an ERROR body").text;
    assert!(text.ends_with('…'), "{text}");
}

#[tokio::test]
async fn pushes_reach_the_device_before_the_reply() {
    let gw = start(settings(None)).await;
    let mut d = tcp_device(gw.addr).await;
    d.open("device-1", "push").await;
    d.send(Frame::new(Kind::Data, 1, b"abc".to_vec()))
        .await
        .unwrap();
    let push = d.recv().await.unwrap();
    assert_eq!(
        (push.kind, push.seq, push.body.as_slice()),
        (Kind::Push, 1, &b"pong:abc"[..])
    );
    let reply = d.recv().await.unwrap();
    assert_eq!((reply.kind, reply.seq), (Kind::Reply, 1));
}

/// A certificate the device CA signed that names no device (no common name, no DNS name)
/// has no name to hold a HELLO to: refused after the handshake, counted, never a session.
#[tokio::test]
async fn a_certificate_that_names_no_device_is_refused() {
    let pki = Pki::new();
    let gw = start(settings(Some(&pki))).await;
    let unnamed = pki
        .ca
        .issue_client_unnamed(&["spiffe://fleet/device/0001"])
        .unwrap();
    let config = wasmbed_certs::client_config(
        &[pki.ca.cert_der()],
        Some((unnamed.chain(), unnamed.key().unwrap())),
    )
    .unwrap();
    let mut d = tls_device(gw.addr, config).await.unwrap();
    d.send_raw(
        &wasmbed_protocol::Frame::control(
            wasmbed_protocol::Kind::Hello,
            0,
            &wasmbed_protocol::Hello {
                device: "device-0000".into(),
                app: "echo".into(),
                resume: None,
            },
        )
        .encode(),
    )
    .await
    .ok();
    assert!(d.recv().await.is_none(), "closed, no WELCOME");
    let (_, metrics) = http(gw.admin, "GET", "/metrics", b"").await;
    assert!(
        metrics.contains("wasmbed_gateway_tls_rejected_total{reason=\"client_cert\"} 1"),
        "{metrics}"
    );
}
