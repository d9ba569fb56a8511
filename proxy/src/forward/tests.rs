//! forward's tests: the cut's order, moving bytes every way, ends of stream, resets, and the
//! readiness checks that spare polling an idle direction.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

/// The cut's order, for both ways a session is watched ([`supervise`], and [`watch`] with
/// a `--takeover`): the forwarding, then the gateway's cut, then (watch) the hand-over. A
/// forwarding that ends in the poll its cut comes in counts as ended; a cut that comes with
/// the hand-over wins. Each case: polled once (waiting), then its forwarding's end and its
/// triggers come, then polled again.
#[tokio::test]
async fn a_session_ends_then_is_cut_then_is_handed_over() {
    #[derive(Debug, PartialEq)]
    enum Seen {
        Pending,
        Ended(Option<Cancel>),
        HandOver,
    }
    let ctx = crate::context::Context::for_tests();
    let name = ctx.gateways.snapshot()[0].name.clone();
    // (forwarding ends, cut, hand-over) -> what supervise sees, what watch sees.
    let cases = [
        ((false, false, false), Seen::Pending, Seen::Pending),
        ((true, true, true), Seen::Ended(None), Seen::Ended(None)),
        (
            (false, true, true),
            Seen::Ended(Some(Cancel::GatewayDown)),
            Seen::Ended(Some(Cancel::GatewayDown)),
        ),
        ((false, false, true), Seen::Pending, Seen::HandOver),
    ];
    for ((ends, cut, hand), supervised, watched) in cases {
        let ended = std::cell::Cell::new(false);
        let forwarding = || {
            std::future::poll_fn(|_| match ended.get() {
                true => Poll::Ready(Ok::<(), Failure>(())),
                false => Poll::Pending,
            })
        };
        let hand_over = wasmbed_certs::Trigger::new();
        let lease = ctx.gateways.lease_on(&name).unwrap();
        let mut a = std::pin::pin!(supervise(&ctx, &lease, forwarding()));
        let mut b = std::pin::pin!(watch(&ctx, &lease, forwarding(), Some(&hand_over)));
        let (waiting, want) = ((Seen::Pending, Seen::Pending), (supervised, watched));
        for step in [false, true] {
            if step {
                ended.set(ends);
                if cut {
                    lease.gateway().cut_sessions();
                }
                if hand {
                    hand_over.fire();
                }
            }
            let seen = std::future::poll_fn(|cx| {
                let a = match a.as_mut().poll(cx) {
                    Poll::Pending => Seen::Pending,
                    Poll::Ready(c) => Seen::Ended(c),
                };
                let b = match b.as_mut().poll(cx) {
                    Poll::Pending => Seen::Pending,
                    Poll::Ready(Watched::Ended(c)) => Seen::Ended(c),
                    Poll::Ready(Watched::HandOver) => Seen::HandOver,
                };
                Poll::Ready((a, b))
            })
            .await;
            let expected = if step { &want } else { &waiting };
            let case = (ends, cut, hand, step);
            assert_eq!(&seen, expected, "{case:?}");
        }
    }
}

type Relay = tokio::task::JoinHandle<Result<(u64, u64), Failure>>;

/// A device, a gateway and [`tcp`] forwarding between them in a task that returns the
/// bytes it counted each way.
async fn relayed(mode: SpliceMode, half_close: bool) -> (TcpStream, TcpStream, Relay) {
    let (device, mut device_side) = pair().await;
    let (mut gateway_side, gateway) = pair().await;
    let relay = tokio::spawn(async move {
        let (u, d) = (AtomicU64::new(0), AtomicU64::new(0));
        tcp(
            &mut device_side,
            &mut gateway_side,
            &u,
            &d,
            mode,
            half_close,
        )
        .await
        .map(|()| (u.into_inner(), d.into_inner()))
    });
    (device, gateway, relay)
}

/// Every way of moving bytes: copying, splicing, copying then splicing.
#[tokio::test]
async fn forwards_large_transfers_both_ways_and_passes_half_close() {
    for mode in [SpliceMode::Off, SpliceMode::On, SpliceMode::Auto] {
        large_transfers(mode).await;
    }
}

/// A gateway that half-closes while its device still sends: by default the session ends
/// there (the gateway sees its device's side close too); with `half_close` the device's
/// bytes keep flowing to it.
#[tokio::test]
async fn a_gateway_end_of_stream_ends_the_session_unless_half_close() {
    for half_close in [false, true] {
        let (mut device, mut gateway, relay) = relayed(SpliceMode::Off, half_close).await;
        device.write_all(b"hello").await.unwrap();
        let mut got = [0; 5];
        gateway.read_exact(&mut got).await.unwrap();
        gateway.write_all(b"bye").await.unwrap();
        gateway.shutdown().await.unwrap();
        let mut last = Vec::new();
        device.read_to_end(&mut last).await.unwrap();
        assert_eq!(
            last, b"bye",
            "the gateway's last bytes, then its end of stream"
        );
        // After the device saw the end of stream: the session is over, or half open.
        let _ = device.write_all(b"more").await; // may fail: the proxy closed its side
        drop(device);
        let mut rest = Vec::new();
        gateway.read_to_end(&mut rest).await.unwrap();
        if half_close {
            assert_eq!(rest, b"more", "still open towards the gateway");
        } else {
            assert!(rest.is_empty(), "ended with the gateway's end of stream");
        }
        relay.await.unwrap().unwrap();
    }
}

async fn large_transfers(mode: SpliceMode) {
    let (mut device, mut gateway, relay) = relayed(mode, true).await;
    let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let down: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
    let (up2, down2) = (up.clone(), down.clone());
    let device_task = tokio::spawn(async move {
        device.write_all(&up2).await.unwrap();
        device.shutdown().await.unwrap(); // half-close: still reads the answer
        let mut got = Vec::new();
        device.read_to_end(&mut got).await.unwrap();
        got
    });
    let mut got = Vec::new();
    gateway.read_to_end(&mut got).await.unwrap(); // ends when the device half-closes
    assert!(got == up, "{mode:?}: upstream bytes intact");
    gateway.write_all(&down2).await.unwrap();
    drop(gateway);
    assert!(
        device_task.await.unwrap() == down,
        "downstream bytes intact"
    );
    assert_eq!(relay.await.unwrap().unwrap(), (3_000_000, 2_000_000));
}

/// A device and the proxy's side of it, the proxy's side of a gateway and the gateway.
async fn sockets() -> [TcpStream; 4] {
    let (device, device_side) = pair().await;
    let (gateway_side, gateway) = pair().await;
    [device, device_side, gateway_side, gateway]
}

/// The bytes a session counted, up and down.
type Counts = (AtomicU64, AtomicU64);

/// [`tcp`] between the device's and the gateway's side, copying (no splice), a gateway's end
/// of stream ending the session.
fn copying<'a>(
    device_side: &'a mut TcpStream,
    gateway_side: &'a mut TcpStream,
    counts: &'a Counts,
) -> Tcp<'a> {
    tcp(
        device_side,
        gateway_side,
        &counts.0,
        &counts.1,
        SpliceMode::Off,
        false,
    )
}

/// The gateway reads `want` while `forwarding` runs beside it (in this task, so with this
/// task's waker), or the test fails after 5 s.
async fn gateway_gets(forwarding: Pin<&mut Tcp<'_>>, gateway: &mut TcpStream, want: &[u8]) {
    let mut got = vec![0; want.len()];
    let relayed = async {
        tokio::select! {
            r = forwarding => panic!("the forwarding ended: {:?}", r.err()),
            r = gateway.read_exact(&mut got) => r.unwrap(),
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), relayed)
        .await
        .expect("the device's bytes reach the gateway");
    assert_eq!(got, want);
}

/// A read stopped by the task's cooperative budget leaves no waker with the socket, so the
/// direction is not taken for armed ([`Direction::read_armed`]): the device's next bytes
/// still wake the session. The budget is spent so that the device's first bytes are read and
/// written on with the last two units (tokio takes one per read and one per write), and the
/// read after them, which would leave the waker, finds none left.
#[tokio::test]
async fn a_read_stopped_by_the_budget_is_not_armed() {
    let [mut device, mut device_side, mut gateway_side, mut gateway] = sockets().await;
    device.write_all(b"ping").await.unwrap();
    device_side.readable().await.unwrap();
    // A task's budget per poll, counted from a poll's start.
    tokio::task::yield_now().await;
    let mut budget = 0;
    std::future::poll_fn(|cx| {
        while let Poll::Ready(spent) = tokio::task::coop::poll_proceed(cx) {
            spent.made_progress();
            budget += 1;
        }
        Poll::Ready(())
    })
    .await;
    tokio::task::yield_now().await;
    let counts = Counts::default();
    let mut forwarding = std::pin::pin!(copying(&mut device_side, &mut gateway_side, &counts));
    std::future::poll_fn(|cx| {
        for _ in 2..budget {
            match tokio::task::coop::poll_proceed(cx) {
                Poll::Ready(spent) => spent.made_progress(),
                Poll::Pending => panic!("the budget is {budget} a poll"),
            }
        }
        assert!(forwarding.as_mut().poll(cx).is_pending());
        Poll::Ready(())
    })
    .await;
    assert_eq!(
        counts.0.load(Ordering::Relaxed),
        4,
        "the first bytes went on"
    );
    // The gateway reads them with the session not polled; then the device sends more, and
    // only the device's socket can wake the session for them.
    let mut got = [0; 4];
    gateway.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    device.write_all(b"pong").await.unwrap();
    gateway_gets(forwarding, &mut gateway, b"pong").await;
}

/// Whether a session arms its directions after reads that found nothing: `true` on a
/// current-thread runtime, `false` on a multi-thread one, where tokio's driver may take a
/// socket's waker after the session has read the readiness it set ([`one_worker`]). Either
/// way the device's bytes then reach the gateway.
async fn arms_after_an_empty_read() -> bool {
    let [mut device, mut device_side, mut gateway_side, mut gateway] = sockets().await;
    let counts = Counts::default();
    let mut forwarding = std::pin::pin!(copying(&mut device_side, &mut gateway_side, &counts));
    std::future::poll_fn(|cx| Poll::Ready(forwarding.as_mut().poll(cx).is_pending())).await;
    let armed = [forwarding.up.read_armed, forwarding.down.read_armed];
    assert_eq!(armed[0], armed[1], "both directions alike");
    device.write_all(b"ping").await.unwrap();
    gateway_gets(forwarding, &mut gateway, b"ping").await;
    armed[0]
}

#[tokio::test]
async fn a_current_thread_runtime_arms_idle_directions() {
    assert!(arms_after_an_empty_read().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_thread_runtime_arms_no_direction() {
    assert!(!arms_after_an_empty_read().await);
}

/// Polled with another waker than the one its reads left with the sockets, the session
/// leaves the new one: the device's bytes wake the new waker.
#[tokio::test]
async fn a_new_waker_is_left_with_the_sockets() {
    struct Flag(tokio::sync::Notify);
    impl std::task::Wake for Flag {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.notify_one();
        }
    }
    let [mut device, mut device_side, mut gateway_side, mut gateway] = sockets().await;
    let counts = Counts::default();
    let mut forwarding = std::pin::pin!(copying(&mut device_side, &mut gateway_side, &counts));
    let (first, second) = (
        std::sync::Arc::new(Flag(tokio::sync::Notify::new())),
        std::sync::Arc::new(Flag(tokio::sync::Notify::new())),
    );
    for flag in [&first, &second] {
        let waker = Waker::from(flag.clone());
        let polled = forwarding.as_mut().poll(&mut Context::from_waker(&waker));
        assert!(polled.is_pending());
    }
    device.write_all(b"ping").await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), second.0.notified())
        .await
        .expect("the second waker is woken by the device's bytes");
    gateway_gets(forwarding, &mut gateway, b"ping").await;
}

#[tokio::test]
async fn a_reset_ends_the_session_with_an_error() {
    let (mut device, gateway, relay) = relayed(SpliceMode::Off, false).await;
    socket2::SockRef::from(&gateway)
        .set_linger(Some(std::time::Duration::ZERO))
        .unwrap();
    drop(gateway); // RST
    let r = relay.await.unwrap().unwrap_err();
    assert_eq!(r.error.kind(), io::ErrorKind::ConnectionReset);
    assert!(
        r.gateway && r.gateway_failed(),
        "the gateway's side failed: {r}"
    );
    let mut rest = Vec::new();
    assert_eq!(
        device.read_to_end(&mut rest).await.unwrap(),
        0,
        "device sees the close"
    );
}
