//! Terminate mode moves sessions between gateways without the device noticing: a crash, a
//! GOAWAY, garbage from the gateway, a drain by moving, rebalancing; tickets carry the app
//! state, the replay window covers what they do not, answers reach the device exactly once.
#![allow(
    clippy::disallowed_methods,
    reason = "tests make their timers on runtimes with a time driver (proxy/clippy.toml)"
)]

mod support;

use std::time::Duration;

use support::frames::*;
use support::*;
use wasmbed_certs::pki::KeyKind;
use wasmbed_config::Mode;
use wasmbed_protocol::{ErrorCode, Kind};
use wasmbed_testkit::{Device, error_code};

fn terminating(pki: &Pki, gateways: &[&FrameGateway]) -> wasmbed_config::ProxyConfig {
    let mut c = config(gateways.iter().map(|g| g.gateway()).collect());
    c.mode = Mode::Terminate;
    c.tls = Some(pki.tls.clone());
    c
}

/// A device with a live session through the proxy.
struct Dev {
    device: Device<TlsDevice>,
    /// The count the stand-in app should answer next.
    count: u64,
}

impl Dev {
    async fn open(proxy: &RunningProxy, pki: &Pki, name: &str) -> Dev {
        let tls = tls_connect(proxy.addr, device_tls(&pki.ca, Some(&pki.ca), name, false))
            .await
            .unwrap();
        let mut device = Device::new(tls);
        device.open(name, "counter").await;
        Dev { device, count: 0 }
    }

    /// DATA, and its one answer: the app's count, one more than before (state intact).
    async fn step(&mut self) {
        let f = self.device.data(b"tick").await;
        self.count += 1;
        assert_eq!(f.kind, Kind::Reply, "DATA {}: {:?}", self.device.seq, f);
        assert_eq!(
            String::from_utf8_lossy(&f.body),
            self.count.to_string(),
            "DATA {}: the app's state went along",
            self.device.seq
        );
    }
}

async fn open_all(proxy: &RunningProxy, pki: &Pki, n: usize) -> Vec<Dev> {
    let mut devs = Vec::new();
    for i in 0..n {
        devs.push(Dev::open(proxy, pki, &format!("device-{i:04}")).await);
    }
    devs
}

async fn step_all(devs: &mut [Dev]) {
    for d in devs.iter_mut() {
        d.step().await;
    }
}

/// Gateways, a terminating proxy over them (`tweak` may change both first), and `devices`
/// devices with a session each, that have sent one DATA.
struct Fleet {
    /// Holds the PKI's files for the proxy's lifetime.
    _pki: Pki,
    gws: Vec<FrameGateway>,
    proxy: RunningProxy,
    devs: Vec<Dev>,
}

async fn fleet(
    gateways_n: usize,
    devices: usize,
    tweak: impl FnOnce(&[FrameGateway], &mut wasmbed_config::ProxyConfig),
) -> Fleet {
    let pki = pki(KeyKind::EcdsaP256);
    let gws = gateways(gateways_n).await;
    let mut c = terminating(&pki, &gws.iter().collect::<Vec<_>>());
    tweak(&gws, &mut c);
    let proxy = start(c).await;
    let mut devs = open_all(&proxy, &pki, devices).await;
    step_all(&mut devs).await;
    Fleet {
        _pki: pki,
        gws,
        proxy,
        devs,
    }
}

async fn gateways(n: usize) -> Vec<FrameGateway> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(FrameGateway::spawn(&format!("gw-{i}")).await);
    }
    v
}

/// The moves counted for `cause` and `result`.
async fn moves(proxy: &RunningProxy, cause: &str, result: &str) -> f64 {
    let series =
        format!("wasmbed_proxy_session_moves_total{{cause=\"{cause}\",result=\"{result}\"}}");
    proxy.metric(&series).await
}

/// Runs `fault` on the gateway with the most sessions, with every device stepping before
/// and after: no device notices, every count goes on. Returns how many sessions it had.
async fn survives(fault: impl FnOnce(&FrameGateway), cause: &str) {
    let Fleet {
        gws,
        proxy,
        mut devs,
        ..
    } = fleet(3, 30, |_, _| {}).await;
    for _ in 0..2 {
        step_all(&mut devs).await;
    }
    assert_eq!(proxy.counts(), vec![10, 10, 10]);
    let victim = &gws[0];
    fault(victim);
    until(
        Duration::from_secs(5),
        "the victim's sessions moved",
        || victim.live() == 0,
    )
    .await;
    for _ in 0..3 {
        step_all(&mut devs).await;
    }
    let resumed: usize = gws[1..].iter().map(FrameGateway::resumed).sum();
    assert_eq!(resumed, 10, "each moved session resumed from its ticket");
    assert_eq!(moves(&proxy, cause, "resumed").await, 10.0);
    let counts = proxy.counts();
    assert_eq!((counts[0], counts[1] + counts[2]), (0, 30), "{counts:?}");
    assert_eq!(
        proxy
            .metric("wasmbed_proxy_duplicate_answers_dropped_total")
            .await,
        0.0,
        "tickets were current: nothing answered twice"
    );
}

#[tokio::test]
async fn a_killed_gateways_sessions_move_with_their_state() {
    survives(FrameGateway::kill, "failover").await;
}

#[tokio::test]
async fn a_goaway_moves_the_sessions() {
    survives(|g| g.fault(Fault::Goaway), "goaway").await;
}

#[tokio::test]
async fn garbage_from_a_gateway_moves_the_session_instead_of_cutting_the_device() {
    survives(|g| g.fault(Fault::Garbage), "failover").await;
}

#[tokio::test]
async fn an_oversized_frame_from_a_gateway_moves_the_session() {
    survives(|g| g.fault(Fault::Oversized), "failover").await;
}

#[tokio::test]
async fn a_gateway_answering_data_never_sent_is_left_not_believed() {
    survives(|g| g.fault(Fault::ReplyAhead), "failover").await;
}

#[tokio::test]
async fn the_replay_window_covers_what_the_ticket_does_not() {
    let tweak = |gws: &[FrameGateway], _: &mut _| gws.iter().for_each(|g| g.checkpoint_every(3));
    let Fleet {
        gws,
        proxy,
        mut devs,
        ..
    } = fleet(2, 2, tweak).await;
    // 4 DATA: the ticket covers 3, DATA 4 was answered after it.
    for _ in 0..3 {
        step_all(&mut devs).await;
    }
    gws[0].kill();
    let moved = "wasmbed_proxy_session_moves_total{cause=\"failover\",result=\"resumed\"}";
    proxy.until_metric(moved, 1.0).await;
    // DATA 5 on the new gateway: the ticket gives count 3, DATA 4 is replayed (its REPLY
    // dropped: the device has it), DATA 5 answers 5.
    step_all(&mut devs).await;
    step_all(&mut devs).await;
    assert_eq!(
        proxy.metric("wasmbed_proxy_replayed_frames_total").await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("wasmbed_proxy_duplicate_answers_dropped_total")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_refused_ticket_gives_a_fresh_session_without_a_disconnect() {
    let tweak = |gws: &[FrameGateway], _: &mut _| gws[1].refuse_tickets(true);
    let Fleet {
        gws,
        proxy,
        mut devs,
        ..
    } = fleet(2, 2, tweak).await;
    step_all(&mut devs).await;
    let on_first = usize::from(proxy.counts()[0] == 1);
    assert_eq!(on_first, 1);
    gws[0].kill();
    // The moved device's app starts over: its next answer is 1.
    let mut fresh = 0;
    for d in devs.iter_mut() {
        let f = d.device.data(b"tick").await;
        assert_eq!(f.kind, Kind::Reply);
        if f.body == b"1" {
            fresh += 1;
            d.count = 1;
        } else {
            d.count += 1;
            assert_eq!(f.body, d.count.to_string().into_bytes());
        }
    }
    assert_eq!(fresh, 1, "the moved session started afresh");
    assert_eq!(moves(&proxy, "failover", "fresh").await, 1.0);
    step_all(&mut devs).await;
}

#[tokio::test]
async fn with_every_gateway_down_the_device_is_held_then_told_unavailable() {
    let tweak = |_: &[FrameGateway], c: &mut wasmbed_config::ProxyConfig| {
        c.migration.migrate_timeout = Duration::from_millis(400);
    };
    let Fleet {
        gws, proxy, devs, ..
    } = fleet(1, 1, tweak).await;
    let mut dev = devs.into_iter().next().unwrap();
    gws[0].kill();
    let f = dev.device.recv().await.expect("an ERROR");
    assert_eq!(error_code(&f), ErrorCode::Unavailable as u16);
    assert!(dev.device.recv().await.is_none(), "then the close");
    assert_eq!(moves(&proxy, "failover", "failed").await, 1.0);
    assert_eq!(proxy.gauge("wasmbed_proxy_sessions_held").await, 0.0);
}

#[tokio::test]
async fn a_held_session_moves_when_a_gateway_comes_back() {
    let Fleet {
        gws, proxy, devs, ..
    } = fleet(1, 1, |_, _| {}).await;
    let mut dev = devs.into_iter().next().unwrap();
    gws[0].kill();
    until(Duration::from_secs(3), "the session is held", || {
        proxy.counts() == vec![0]
    })
    .await;
    // A new gateway is added while the device waits: its session goes there, state intact.
    let late = FrameGateway::spawn("late").await;
    let body = format!(r#"{{"name":"late","address":"{}"}}"#, late.addr);
    assert_eq!(proxy.admin_post("/api/gateways", &body).await.0, 201);
    dev.step().await;
    assert_eq!(late.resumed(), 1);
}

#[tokio::test]
async fn drain_by_moving_empties_a_gateway_and_reports_progress() {
    let Fleet {
        proxy, mut devs, ..
    } = fleet(2, 20, |_, _| {}).await;
    let (status, body) = proxy
        .admin("POST", "/api/gateways/gw-0/drain?move=true")
        .await;
    assert_eq!(status, 200, "{body}");
    until(Duration::from_secs(5), "gw-0 is empty", || {
        proxy.counts() == vec![0, 20]
    })
    .await;
    step_all(&mut devs).await;
    assert_eq!(moves(&proxy, "drain", "resumed").await, 10.0);
    let (_, list) = proxy.admin("GET", "/api/gateways").await;
    assert!(list.contains(r#""moving":0"#), "{list}");
    // A plain drain moves nothing; drain?move=true is refused in passthrough (another test).
    proxy.admin("POST", "/api/gateways/gw-0/undrain").await;
    proxy.admin("POST", "/api/gateways/gw-1/drain").await;
    step_all(&mut devs).await;
    assert_eq!(proxy.counts(), vec![0, 20]);
}

/// Rebalancing moves exactly the excess: 20 sessions over two gateways, a third joins, fair
/// is 7 each, so 3 + 3 move. The moves are paced slowly (10/s) so that they are still in
/// flight at the rebalancer's next turns: planning then must not count them as gone (which
/// would order more moves, overshoot, and move sessions back).
#[tokio::test]
async fn a_new_gateway_gets_its_share_of_live_sessions_with_rebalancing() {
    let tweak = |_: &[FrameGateway], c: &mut wasmbed_config::ProxyConfig| {
        c.migration.rebalance = true;
        c.migration.move_rate = 10;
    };
    let Fleet {
        proxy, mut devs, ..
    } = fleet(2, 20, tweak).await;
    let late = FrameGateway::spawn("late").await;
    let body = format!(r#"{{"name":"late","address":"{}"}}"#, late.addr);
    assert_eq!(proxy.admin_post("/api/gateways", &body).await.0, 201);
    // Settled: within one, and no move ordered that has not landed (scheduled ones too).
    until(
        Duration::from_secs(10),
        "the spread settles within one",
        || {
            let c = proxy.counts();
            c.iter().max().unwrap() - c.iter().min().unwrap() <= 1
                && c.iter().sum::<u64>() == 20
                && proxy.gateways.moves_in_flight() == 0
        },
    )
    .await;
    step_all(&mut devs).await;
    assert_eq!(late.resumed(), proxy.counts()[2] as usize);
    assert_eq!(moves(&proxy, "rebalance", "resumed").await, 6.0);
}

#[tokio::test]
async fn a_device_that_breaks_the_protocol_is_refused_without_moving() {
    let Fleet {
        gws, proxy, devs, ..
    } = fleet(2, 1, |_, _| {}).await;
    let mut dev = devs.into_iter().next().unwrap();
    // DATA 1 again: sequences must increase.
    let again = wasmbed_protocol::Frame::new(Kind::Data, 1, b"x".to_vec());
    dev.device.send(again).await.unwrap();
    let f = dev.device.recv().await.expect("an ERROR");
    assert_eq!(error_code(&f), ErrorCode::BadFrame as u16);
    assert!(dev.device.recv().await.is_none());
    assert_eq!(moves(&proxy, "failover", "resumed").await, 0.0);
    assert_eq!(gws.iter().map(FrameGateway::resumed).sum::<usize>(), 0);
}

#[tokio::test]
async fn a_gateway_that_dies_mid_move_sends_the_session_on_to_a_third() {
    let Fleet {
        gws,
        proxy,
        mut devs,
        ..
    } = fleet(3, 30, |_, _| {}).await;
    // gw-1 resets every HELLO from now on: the moves that try it go on to gw-2.
    gws[1].drop_hellos(true);
    let hellos = gws[1].hellos();
    gws[0].kill();
    step_all(&mut devs).await;
    assert!(gws[1].hellos() > hellos, "some moves tried gw-1 first");
    assert_eq!(gws[2].resumed(), 10, "all ten ended on gw-2, state intact");
    assert_eq!(moves(&proxy, "failover", "resumed").await, 10.0);
    step_all(&mut devs).await;
}

#[tokio::test]
async fn a_device_flooding_while_its_session_is_held_is_not_read_past_the_window() {
    let tweak = |_: &[FrameGateway], c: &mut wasmbed_config::ProxyConfig| {
        c.migration.replay_window = 8 << 10;
    };
    let Fleet {
        gws, proxy, devs, ..
    } = fleet(1, 1, tweak).await;
    let dev = devs.into_iter().next().unwrap();
    gws[0].kill();
    until(Duration::from_secs(3), "the session is held", || {
        proxy.counts() == vec![0]
    })
    .await;
    // 1,000 DATA of 1 KiB while no gateway is there: the proxy takes the window's worth,
    // the rest waits in the sockets (the device's writes block once they are full).
    let bytes = "wasmbed_proxy_bytes_total{direction=\"upstream\"}";
    let start = proxy.metric(bytes).await;
    let (mut read, mut write) = tokio::io::split(dev.device.framed.into_inner());
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        for seq in 2..=1001u64 {
            let f = wasmbed_protocol::Frame::new(Kind::Data, seq, vec![7u8; 1024]);
            write.write_all(&f.encode()).await.unwrap();
        }
        write
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while proxy.metric(bytes).await - start < 8192.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the proxy reads up to its window"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Proving an absence: give the proxy time to read more if it would.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let taken = proxy.metric(bytes).await - start;
    // One read is at most 16 KiB (the anchor's `READ_CHUNK`): how much of it the device's
    // bytes fill depends on how far its writes ran ahead of the proxy's reads.
    assert!(
        taken <= f64::from((8 << 10) + (16 << 10)),
        "read {taken} bytes: at most the window and one read past it"
    );
    // A gateway arrives: every DATA is answered, once, in order, with the state intact.
    let late = FrameGateway::spawn("late").await;
    let body = format!(r#"{{"name":"late","address":"{}"}}"#, late.addr);
    assert_eq!(proxy.admin_post("/api/gateways", &body).await.0, 201);
    let mut frames = tokio_util::codec::FramedRead::new(
        &mut read,
        wasmbed_protocol::codec::FrameCodec::new(1 << 16),
    );
    use futures_util::StreamExt;
    for seq in 2..=1001u64 {
        let f = tokio::time::timeout(Duration::from_secs(10), frames.next())
            .await
            .expect("an answer")
            .expect("a frame")
            .unwrap();
        assert_eq!((f.kind, f.seq), (Kind::Reply, seq));
        assert_eq!(f.body, seq.to_string().into_bytes());
    }
    writer.await.unwrap();
}

#[tokio::test]
async fn a_shutdown_while_sessions_are_held_ends_within_the_grace() {
    let Fleet {
        gws,
        proxy,
        mut devs,
        ..
    } = fleet(1, 5, |_, _| {}).await;
    gws[0].kill();
    until(Duration::from_secs(3), "the sessions are held", || {
        proxy.counts() == vec![0]
    })
    .await;
    proxy.shutdown.cancel();
    // grace is 200ms in the test config; the held sessions are then cut.
    let done = tokio::time::timeout(Duration::from_secs(5), proxy.task).await;
    assert!(done.expect("the proxy stops").unwrap().is_ok());
    // Each is handed back (GOAWAY: reconnect elsewhere), then closed: nothing else comes.
    for d in devs.iter_mut() {
        let frames = d.device.until_closed().await;
        let kinds: Vec<_> = frames.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [wasmbed_protocol::Kind::Goaway],
            "handed back, then closed"
        );
    }
}

/// A device that ignores the GOAWAY of a stopping proxy (it keeps sending, never leaves)
/// is closed at the end of the grace: the stop does not wait for it.
#[tokio::test]
async fn a_device_that_ignores_goaway_is_closed_after_the_grace() {
    let Fleet {
        proxy, mut devs, ..
    } = fleet(1, 1, |_, _| {}).await;
    let d = &mut devs[0].device;
    assert_eq!(d.data(b"before").await.kind, Kind::Reply);
    proxy.shutdown.cancel();
    let goaway = loop {
        let f = d.recv().await.expect("GOAWAY first");
        if f.kind != Kind::Checkpoint {
            break f;
        }
    };
    assert_eq!(goaway.kind, Kind::Goaway);
    // It stays and sends on; the proxy stops anyway once the grace (200ms here) is over.
    let mut seq = 100;
    let stopped = tokio::time::timeout(Duration::from_secs(5), async {
        let mut task = proxy.task;
        loop {
            seq += 1;
            let _ = d
                .send(wasmbed_protocol::Frame::new(
                    Kind::Data,
                    seq,
                    b"still here".to_vec(),
                ))
                .await;
            tokio::select! {
                r = &mut task => break r,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    })
    .await;
    assert!(
        stopped
            .expect("the proxy stops within its grace")
            .unwrap()
            .is_ok()
    );
    d.until_closed().await;
}

/// A gateway marked down while its sessions still answer (its listener closed, as a health
/// check timing out on a busy host would see it): each session asks its own link and stays.
#[tokio::test]
async fn a_gateway_marked_down_whose_links_still_answer_keeps_its_sessions() {
    let Fleet {
        gws,
        proxy,
        mut devs,
        ..
    } = fleet(2, 10, |_, _| {}).await;
    gws[0].close_listener();
    until(Duration::from_secs(3), "gw-0 marked down", || {
        !proxy.gateway("gw-0").is_healthy()
    })
    .await;
    // Two link checks' worth: the sessions answered, and stay.
    tokio::time::sleep(wasmbed_proxy::anchor::LINK_CHECK * 2).await;
    step_all(&mut devs).await;
    assert_eq!(proxy.counts(), vec![5, 5]);
    assert_eq!(moves(&proxy, "failover", "resumed").await, 0.0);
}

/// A hung gateway (connections open, nothing answered, health checks failing): its links do
/// not answer the proxy's PING either, and its sessions move with their state.
#[tokio::test]
async fn a_hung_gateways_sessions_move_once_their_links_fail_the_check() {
    let Fleet {
        gws,
        proxy,
        mut devs,
        ..
    } = fleet(2, 10, |_, _| {}).await;
    gws[0].stall();
    gws[0].close_listener();
    step_all(&mut devs).await;
    assert_eq!(proxy.counts(), vec![0, 10]);
    assert_eq!(moves(&proxy, "failover", "resumed").await, 5.0);
}

/// `DELETE /api/gateways/{name}`: the gateway leaves the set at once, its sessions move to
/// the others with their state, and its prober stops.
#[tokio::test]
async fn a_removed_gateways_sessions_move_and_its_prober_stops() {
    let Fleet {
        gws,
        proxy,
        mut devs,
        ..
    } = fleet(2, 10, |_, _| {}).await;
    let live =
        |name: &str| format!("wasmbed_proxy_gateway_up{{gateway=\"{name}\",pool=\"default\"}} 1");
    let (_, metrics) = proxy.admin("GET", "/metrics").await;
    assert!(metrics.contains(&live("gw-0")), "{metrics}");
    assert!(
        metrics.contains("wasmbed_proxy_sessions_started_total{gateway=\"gw-0\"} 5"),
        "{metrics}"
    );
    let (status, body) = proxy.admin("DELETE", "/api/gateways/gw-0").await;
    assert_eq!(status, 200, "{body}");
    // Its series leave /metrics with it (kept, its `gateway_up` 0 would page forever, and
    // every gateway name ever seen would stay a series).
    let (_, metrics) = proxy.admin("GET", "/metrics").await;
    assert!(!metrics.contains("{gateway=\"gw-0\""), "{metrics}");
    assert!(metrics.contains(&live("gw-1")), "{metrics}");
    assert_eq!(proxy.admin("DELETE", "/api/gateways/gw-0").await.0, 404);
    until(Duration::from_secs(5), "gw-0's sessions moved", || {
        gws[0].live() == 0
    })
    .await;
    step_all(&mut devs).await;
    assert_eq!(proxy.counts(), vec![10], "only gw-1 is left");
    assert_eq!(moves(&proxy, "drain", "resumed").await, 5.0);
    let (_, list) = proxy.admin("GET", "/api/gateways").await;
    assert!(!list.contains("\"gw-0\""), "{list}");
    // The prober stopped: no more probe connections (proving an absence: a few intervals).
    let accepted = gws[0].accepted();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(gws[0].accepted(), accepted, "no probes after removal");
}

/// A gateway removed (its sessions ordered to move) while a session's link to it is still
/// being made (the HELLO sent, its WELCOME not back): the order is news to that session once
/// its link runs, and it moves. Read only when the link was made, the order was taken as
/// seen, and the session stayed on a gateway out of the set.
#[tokio::test]
async fn an_order_that_comes_while_a_sessions_link_is_made_moves_it() {
    let pki = pki(KeyKind::EcdsaP256);
    let (a, b) = (
        FrameGateway::spawn("gw-a").await,
        FrameGateway::spawn("gw-b").await,
    );
    let proxy = start(terminating(&pki, &[&a])).await;
    a.hold_welcomes(true);
    let opening = {
        let (addr, config) = (
            proxy.addr,
            device_tls(&pki.ca, Some(&pki.ca), "device-0001", false),
        );
        tokio::spawn(async move {
            let mut device = Device::new(tls_connect(addr, config).await.unwrap());
            device.open("device-0001", "counter").await;
            Dev { device, count: 0 }
        })
    };
    until(Duration::from_secs(5), "the HELLO at gw-a", || {
        a.hellos() == 1
    })
    .await;
    let body = format!(r#"{{"name":"gw-b","address":"{}"}}"#, b.addr);
    assert_eq!(proxy.admin_post("/api/gateways", &body).await.0, 201);
    assert_eq!(proxy.admin("DELETE", "/api/gateways/gw-a").await.0, 200);
    a.hold_welcomes(false);
    let mut dev = opening.await.unwrap();
    until(Duration::from_secs(5), "the session moved to gw-b", || {
        b.live() == 1 && a.live() == 0
    })
    .await;
    dev.step().await;
}

/// An undrain withdraws the moves its sessions took and have not made yet (paced by
/// `move_rate`), as the docs say: not only those still to take. Before, every session that
/// had taken its order still moved at its slot.
#[tokio::test]
async fn an_undrain_withdraws_the_moves_taken_and_not_made() {
    let tweak = |_: &[FrameGateway], c: &mut wasmbed_config::ProxyConfig| {
        c.migration.move_rate = 1;
    };
    let Fleet {
        gws,
        proxy,
        mut devs,
        ..
    } = fleet(2, 8, tweak).await;
    assert_eq!(gws[0].live(), 4);
    let drain = proxy
        .admin("POST", "/api/gateways/gw-0/drain?move=true")
        .await;
    assert_eq!(drain.0, 200, "{}", drain.1);
    // Every session of gw-0 takes its order (one move a second: the last at 3 s).
    until(Duration::from_secs(5), "the orders taken", || {
        proxy.gateways.moves_in_flight() >= 3
    })
    .await;
    assert_eq!(
        proxy.admin("POST", "/api/gateways/gw-0/undrain").await.0,
        200
    );
    until(Duration::from_secs(5), "no move in flight", || {
        proxy.gateways.moves_in_flight() == 0
    })
    .await;
    assert!(
        gws[0].live() >= 2,
        "moves made after the undrain: {}",
        gws[0].live()
    );
    step_all(&mut devs).await;
}
