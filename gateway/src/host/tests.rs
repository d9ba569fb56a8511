use super::*;
use std::time::Instant;

const ECHO: &str = include_str!("../../../apps/echo.wat");
const COUNTER: &str = include_str!("../../../apps/counter.wat");
const LOOP: &str = include_str!("../../../apps/loop.wat");
const GROW: &str = include_str!("../../../apps/grow.wat");
const PUSH: &str = include_str!("../../../apps/push.wat");

fn limits() -> Limits {
    Limits {
        call_timeout: Duration::from_millis(50),
        max_memory: 1 << 20,
        max_instances: 64,
        max_frame: 64 * 1024,
        max_state: 16 << 10,
    }
}

fn host() -> Host {
    Host::new(limits()).unwrap()
}

async fn instance(host: &Host, name: &str, wat: &str) -> Instance {
    let app = host.compile(name, wat.as_bytes()).unwrap();
    host.instantiate(&app, "device-1").await.unwrap()
}

#[tokio::test]
async fn echo_replies_with_the_message() {
    let h = host();
    let mut i = instance(&h, "echo", ECHO).await;
    assert_eq!(i.message(b"hello").await.unwrap().reply, b"hello");
    assert_eq!(i.message(b"").await.unwrap().reply, b"");
}

#[tokio::test]
async fn counter_keeps_state_per_instance() {
    let h = host();
    let mut a = instance(&h, "counter", COUNTER).await;
    let mut b = instance(&h, "counter", COUNTER).await;
    a.open().await.unwrap();
    let decode = |r: Vec<u8>| {
        let count = u64::from_le_bytes(r[..8].try_into().unwrap());
        let sum = u64::from_le_bytes(r[8..16].try_into().unwrap());
        (count, sum)
    };
    assert_eq!(decode(a.message(&[1, 2]).await.unwrap().reply), (1, 3));
    assert_eq!(decode(a.message(&[10]).await.unwrap().reply), (2, 13));
    assert_eq!(
        decode(b.message(&[5]).await.unwrap().reply),
        (1, 5),
        "own state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_call_is_stopped_at_its_deadline_while_others_run() {
    let h = Arc::new(host());
    let mut looping = instance(&h, "loop", LOOP).await;
    let mut echo = instance(&h, "echo", ECHO).await;
    let started = Instant::now();
    let stuck = tokio::spawn(async move { looping.message(b"x").await });
    // The healthy instance keeps answering while the looping one runs.
    let mut answered = 0;
    while !stuck.is_finished() {
        assert_eq!(echo.message(b"ok").await.unwrap().reply, b"ok");
        answered += 1;
        tokio::task::yield_now().await;
    }
    let elapsed = started.elapsed();
    assert_eq!(stuck.await.unwrap().unwrap_err(), CallError::Timeout);
    assert!(answered > 0, "the other session was served meanwhile");
    assert!(
        elapsed < Duration::from_secs(5),
        "stopped (deadline 50ms), took {elapsed:?}"
    );
}

#[tokio::test]
async fn a_growing_module_hits_its_memory_cap() {
    let h = host();
    let mut i = instance(&h, "grow", GROW).await;
    assert_eq!(i.message(b"x").await.unwrap_err(), CallError::Memory);
    assert_eq!(
        CallError::Memory.code(),
        wasmbed_protocol::ErrorCode::AppMemory
    );
}

#[tokio::test]
async fn pushes_are_collected_per_call() {
    let h = host();
    let mut i = instance(&h, "push", PUSH).await;
    let out = i.message(b"abc").await.unwrap();
    assert_eq!(out.reply, b"");
    assert_eq!(out.pushes, vec![b"pong:abc".to_vec()]);
}

#[test]
fn bad_modules_are_refused_with_the_reason() {
    let h = host();
    let cases: [(&[u8], &str); 5] = [
        (b"\0asm\x01\0\0\0garbage", "not valid"),
        (b"(module (memory (export \"memory\") 1))", "missing export alloc"),
        (
            b"(module (memory (export \"memory\") 1) (func (export \"alloc\") (param i64) (result i32) i32.const 0) (func (export \"on_message\") (param i32 i32) (result i64) i64.const 0))",
            "export alloc has type (i64) -> (i32)",
        ),
        (
            b"(module (import \"env\" \"x\" (func)) (memory (export \"memory\") 1) (func (export \"alloc\") (param i32) (result i32) i32.const 0) (func (export \"on_message\") (param i32 i32) (result i64) i64.const 0))",
            "wrong ABI",
        ),
        (b"(module (func (export \"alloc\") (param i32) (result i32) i32.const 0))", "missing export memory"),
    ];
    for (bytes, want) in cases {
        match h.compile("bad", bytes) {
            Ok(_) => panic!("accepted: {want}"),
            Err(e) => assert!(e.to_string().contains(want), "{want}: {e}"),
        }
    }
    assert!(matches!(
        h.compile("../etc", ECHO.as_bytes()),
        Err(AppError::Name(_))
    ));
}

#[test]
fn the_apps_directory_loads() {
    let h = host();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../apps");
    assert!(h.load_dir(Path::new(dir)).unwrap() >= 4);
    assert!(h.get("echo").is_some() && h.get("counter").is_some());
    let e = h
        .load_dir(Path::new("/nonexistent/apps"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/apps"), "{e}");
}

#[tokio::test]
async fn state_moves_through_snapshot_and_restore_within_its_cap() {
    let h = host();
    let blob = include_str!("../../../apps/blob.wat");
    let mut a = instance(&h, "blob", blob).await;
    assert!(a.stateful());
    a.message(&[9u8; 100]).await.unwrap();
    let state = a.snapshot().await.unwrap().expect("a state");
    assert_eq!(state, vec![9u8; 100]);
    let mut b = instance(&h, "blob", blob).await;
    b.restore(&state).await.unwrap();
    assert_eq!(b.snapshot().await.unwrap(), Some(state));
    // Over --max-state: the checkpoint fails, the instance goes on.
    a.message(&[1u8; (16 << 10) + 1]).await.unwrap();
    assert!(matches!(
        a.snapshot().await,
        Err(CallError::StateTooLarge { len, max: 16384 }) if len == (16 << 10) + 1
    ));
    assert!(a.message(b"still").await.is_ok());
    // Without the exports there is nothing to hand over.
    let mut e = instance(&h, "echo", ECHO).await;
    assert!(!e.stateful());
    assert_eq!(e.snapshot().await.unwrap(), None);
    // Exporting one of the pair alone is refused at load.
    let half = "(module (memory (export \"memory\") 1) (func (export \"alloc\") (param i32) (result i32) (i32.const 0)) (func (export \"on_message\") (param i32 i32) (result i64) (i64.const 0)) (func (export \"snapshot\") (result i64) (i64.const 0)))";
    assert!(h.compile("half", half.as_bytes()).is_err());
}

/// A call that spins for as many rounds as the message's first four bytes say.
const SPIN_N: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "on_message") (param i32 i32) (result i64)
    (local $n i32)
    (local.set $n (i32.load (local.get 0)))
    (loop $spin
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br_if $spin (i32.gt_s (local.get $n) (i32.const 0))))
    (i64.const 0)))"#;

/// Runs `call` while another task on the same (one) thread takes it for 3 ms at every one
/// of the call's yields, and a thread advances the engine's epoch every few microseconds
/// (so the call yields often, after little running each time). Returns what the call
/// returned and how many epochs passed during it.
async fn under_contention<F>(engine: &Engine, call: F) -> (Result<Output, CallError>, u64)
where
    F: std::future::Future<Output = Result<Output, CallError>> + Send + 'static,
{
    let done = Arc::new(AtomicBool::new(false));
    let (d, e) = (done.clone(), engine.clone());
    let ticker = std::thread::spawn(move || {
        let mut epochs = 0;
        while !d.load(Ordering::Relaxed) {
            e.increment_epoch();
            epochs += 1;
            std::thread::sleep(Duration::from_micros(20));
        }
        epochs
    });
    let d = done.clone();
    let busy = tokio::spawn(async move {
        while !d.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(3));
            tokio::task::yield_now().await;
        }
    });
    let out = call.await;
    done.store(true, Ordering::Relaxed);
    busy.await.unwrap();
    (out, ticker.join().unwrap())
}

/// A call's deadline is its running time, however often it yields or waits: a call of
/// about 15 ms of running that yields hundreds of times (more than its 50 ms deadline has
/// ticks) and waits 3 ms at each finishes; a runaway under the same conditions is stopped,
/// after at least its deadline.
#[tokio::test]
async fn a_call_resumed_late_many_times_counts_its_running_only() {
    let h = host();
    let mut spin = instance(&h, "spin", SPIN_N).await;
    // How many rounds make 15 ms of running here, alone on the thread.
    let probe: i32 = 2_000_000;
    let started = Instant::now();
    spin.message(&probe.to_le_bytes()).await.unwrap();
    let per_round = started.elapsed().as_secs_f64() / f64::from(probe);
    let rounds = (0.015 / per_round) as i32;
    let (out, epochs) = under_contention(&h.engine, async move {
        spin.message(&rounds.to_le_bytes()).await
    })
    .await;
    let ticks = limits().call_timeout.as_millis() / TICK.as_millis();
    assert!(
        u128::from(epochs) > 2 * ticks,
        "only {epochs} epochs passed: the call did not yield more often than its deadline has ticks"
    );
    assert!(
        out.is_ok(),
        "15 ms of running, {epochs} epochs: stopped as a runaway ({:?})",
        out.err()
    );
    let mut runaway = instance(&h, "loop", LOOP).await;
    let started = Instant::now();
    let (out, epochs) =
        under_contention(&h.engine, async move { runaway.message(b"x").await }).await;
    assert!(
        matches!(out, Err(CallError::Timeout)),
        "a runaway under contention: {:?} after {epochs} epochs",
        out.map(|o| o.reply)
    );
    assert!(
        started.elapsed() >= limits().call_timeout,
        "stopped before its deadline"
    );
}

/// A call's deadline counts its running, not the time it waits, yielded, for a busy host's
/// CPU: a call of a few ticks whose thread is taken by another task for longer than the
/// deadline finishes (a busy gateway is slow; its apps are not runaways).
#[tokio::test]
async fn a_call_that_waits_for_the_cpu_is_not_a_runaway() {
    // Forty million iterations: several 2 ms ticks of running, under 50 ms' worth here.
    const SPIN: &str = r#"(module
      (memory (export "memory") 1)
      (func (export "alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "on_message") (param i32 i32) (result i64)
        (local $n i32)
        (local.set $n (i32.const 40000000))
        (loop $spin
          (local.set $n (i32.sub (local.get $n) (i32.const 1)))
          (br_if $spin (local.get $n)))
        (i64.const 0)))"#;
    let h = host();
    let mut spinning = instance(&h, "spin", SPIN).await;
    // One thread: the call runs until its first tick and yields; the next task then holds
    // the thread for longer than the whole deadline before the call runs on.
    let call = tokio::spawn(async move { spinning.message(b"x").await });
    let busy = tokio::spawn(async { std::thread::sleep(Duration::from_millis(150)) });
    busy.await.unwrap();
    assert!(
        call.await.unwrap().is_ok(),
        "killed as a runaway for waiting"
    );
}

/// A slice is charged as it ran, but at most two ticks: a thread the OS took away for a
/// second in the middle of a call (an overloaded host) costs the call two ticks, not its
/// deadline; and a runaway whose every slice is that long is still stopped, at the first
/// tick past its deadline.
#[test]
fn a_paused_slice_counts_two_ticks_at_most() {
    let slice = Arc::new(AtomicU64::new(0));
    let mut s = SessionState {
        max_memory: 1 << 20,
        ran: Duration::ZERO,
        call_timeout: limits().call_timeout,
        slice: slice.clone(),
        max_push: 1024,
        pushes: Vec::new(),
        device: "device-1".into(),
        app: "spin".into(),
    };
    let ms = |n: u64| n * 1_000_000;
    // A slice of 1 ms: charged as it ran.
    assert!(matches!(s.tick(ms(1)), UpdateDeadline::Yield(1)));
    assert_eq!(s.ran, Duration::from_millis(1));
    assert_eq!(
        slice.load(Ordering::Relaxed),
        ms(1),
        "the next slice begins now"
    );
    // The thread taken away for a second mid-call: two ticks, and the call goes on.
    assert!(matches!(s.tick(ms(1_001)), UpdateDeadline::Yield(1)));
    assert_eq!(s.ran, Duration::from_millis(1) + 2 * TICK);
    // A runaway paused a second at every tick: stopped at the first tick past 50 ms.
    let mut now = ms(1_001);
    let mut ticks = 0;
    while let UpdateDeadline::Yield(1) = s.tick({
        now += ms(1_000);
        now
    }) {
        ticks += 1;
        assert!(ticks < 100, "never stopped: {:?} charged", s.ran);
    }
    assert!(s.ran > limits().call_timeout && s.ran <= limits().call_timeout + 2 * TICK);
    // A slice stamped after the tick that ends it (clocks read out of order) charges nothing.
    let before = s.ran;
    slice.store(ms(1_000_000), Ordering::Relaxed);
    let _ = s.tick(ms(5));
    assert_eq!(s.ran, before);
}

/// A failed instance renewed at a full pool (every slot a session's) gets a fresh one: its
/// own slot is freed first. Made before the old one was dropped, the renewal needed a slot
/// more, and at capacity the session was refused `unavailable`.
#[tokio::test]
async fn a_renewal_at_a_full_pool_takes_the_old_instances_slot() {
    let h = Host::new(Limits {
        max_instances: 0,
        ..limits()
    })
    .unwrap();
    let app = h.compile("counter", COUNTER.as_bytes()).unwrap();
    // The pool's 16 slots, all taken.
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(h.instantiate(&app, "device-1").await.unwrap());
    }
    assert!(
        h.instantiate(&app, "device-1").await.is_err(),
        "the pool is full"
    );
    let mut renewed = held.pop().unwrap();
    renewed.message(&[7]).await.unwrap();
    h.renew(&mut renewed, &app, "device-1").await.unwrap();
    let reply = renewed.message(&[1]).await.unwrap().reply;
    assert_eq!(
        u64::from_le_bytes(reply[..8].try_into().unwrap()),
        1,
        "afresh"
    );
}

/// A `send` from `snapshot` or `restore` pushes nothing: there is no REPLY for it to go
/// before. Kept, it went out before some later REPLY (or was lost at a close) and counted
/// against that call's 64 pushes.
#[tokio::test]
async fn a_send_outside_a_message_pushes_nothing() {
    const SENDS_IN_STATE: &str = r#"(module
      (import "wasmbed" "send" (func $send (param i32 i32)))
      (memory (export "memory") 1)
      (func (export "alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "on_message") (param i32 i32) (result i64) (i64.const 0))
      (func (export "snapshot") (result i64)
        (call $send (i32.const 0) (i32.const 4))
        (i64.const 4))
      (func (export "restore") (param i32 i32)
        (call $send (i32.const 0) (i32.const 4))))"#;
    let h = host();
    let mut i = instance(&h, "state-sends", SENDS_IN_STATE).await;
    assert!(i.snapshot().await.unwrap().is_some());
    i.restore(&[1, 2, 3, 4]).await.unwrap();
    let out = i.message(b"x").await.unwrap();
    assert!(out.pushes.is_empty(), "{:?}", out.pushes);
}
