//! The floor under a TLS passthrough proxy's cost per connection: the least a proxy can do per
//! connection, written two ways, so that `bench/peer_bench.py` can set wasmbed beside them.
//!
//! - `tokio`: a current-thread tokio runtime (as wasmbed's proxy runs on one core), a task per
//!   connection: one read of the device's first bytes, a connect to the gateway, those bytes
//!   written, then `tokio::io::copy` each way. No ClientHello parse, routing, balancing,
//!   timeouts, limits, metrics, spans or supervision: what is left is tokio's own cost per
//!   connection (its I/O driver, scheduler, tasks), under which no proxy built on
//!   tokio goes.
//! - `tokio-io`: the same on a runtime with no time driver (`enable_io` only): what tokio's
//!   timer machinery costs per wake-up even with its wheel empty (the runtime reads the clock
//!   and checks the wheel on every park).
//! - `mio`: a hand-written edge-triggered epoll loop (mio): the same steps, no runtime at all,
//!   one 64 KiB buffer shared by every connection (NGINX's stream module gives each session
//!   buffers of its own): the bottom for any event loop, not a full proxy's cost.
//! - `tokio-nested` and `tokio-pump`: a session opened on tokio (`tokio-io`'s steps up to the
//!   first bytes written to the gateway), then its two sockets taken out of tokio's epoll and
//!   forwarded by the `mio` loop's code. `tokio-nested` runs that loop on tokio's own thread,
//!   its epoll descriptor registered in tokio's (each of its events still costs tokio a turn);
//!   `tokio-pump` on a thread of its own, handed each pair through a queue and a
//!   `mio::Waker`. What keeping tokio for a session's opening and moving only its forwarding
//!   to a loop of its own would save (docs/performance.md, "The forwarding on a loop of its
//!   own").
//!
//! All end a pair when either side ends (no half-close passed on), as NGINX does by default.
//! wasmbed ends a session at its gateway's end of stream but passes a device's on and waits
//! for the gateway's: one `shutdown` and one more wake-up per connection that the device
//! closes first (measured: docs/performance.md, "What the gap to the floor is made of").
//!
//! None is a proxy to deploy: no timeouts, no limits, an error closes the pair.
//!
//! Run: `passthrough_floor tokio|tokio-io|tokio-nested|tokio-pump|mio --listen ADDR --gateway ADDR` (other wasmbed options are
//! accepted and ignored, so the bench can start it with wasmbed's command line); prints
//! `ready listen=ADDR` once bound.

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;

const USAGE: &str = "passthrough_floor tokio|tokio-io|tokio-nested|tokio-pump|mio --listen ADDR --gateway ADDR [ignored wasmbed options]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| -> SocketAddr {
        let at = args.iter().position(|a| a == name);
        let Some(text) = at.and_then(|i| args.get(i + 1)) else {
            eprintln!("{name} ADDR is required\nusage: {USAGE}");
            std::process::exit(2);
        };
        text.parse().unwrap_or_else(|e| {
            eprintln!("{name} {text}: {e}\nusage: {USAGE}");
            std::process::exit(2);
        })
    };
    let (listen, gateway) = (value("--listen"), value("--gateway"));
    // As wasmbed does at start (HAProxy and NGINX too, by their configs): descriptors up to
    // the hard limit, so that a backlog under load is not refused for want of them.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let result = match args.first().map(String::as_str) {
        Some("tokio") => on_tokio(listen, gateway, true),
        Some("tokio-io") => on_tokio(listen, gateway, false),
        Some("mio") => on_mio(listen, gateway),
        Some("tokio-nested") => on_tokio_nested(listen, gateway),
        Some("tokio-pump") => on_tokio_pump(listen, gateway),
        _ => {
            eprintln!("usage: {USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("passthrough_floor: {e}");
        std::process::exit(1);
    }
}

fn ready(listen: SocketAddr) {
    println!("ready listen={listen} admin=off");
}

fn on_tokio(listen: SocketAddr, gateway: SocketAddr, time: bool) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_io();
    if time {
        builder.enable_time();
    }
    let runtime = builder.build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        ready(listen);
        loop {
            // A failed accept (a connection reset in the backlog, no descriptors left) ends
            // no more than that connection; the loop backs off a moment and goes on.
            let mut device = match listener.accept().await {
                Ok((device, _)) => device,
                Err(_) if time => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
                // No timers without a time driver: the back-off blocks the loop (a floor,
                // not a proxy; the bench never runs it out of descriptors).
                Err(_) => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
            };
            tokio::spawn(async move {
                let _ = device.set_nodelay(true);
                let mut first = vec![0u8; 2048];
                let n = match device.read(&mut first).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let Ok(mut upstream) = tokio::net::TcpStream::connect(gateway).await else {
                    return;
                };
                let _ = upstream.set_nodelay(true);
                if upstream.write_all(&first[..n]).await.is_err() {
                    return;
                }
                drop(first);
                // Bytes both ways until either side ends, then both close: what NGINX does
                // by default (`copy_bidirectional` would pass a half-close on, a `shutdown`
                // and a wake-up more per connection).
                let (mut device_read, mut device_write) = device.split();
                let (mut gateway_read, mut gateway_write) = upstream.split();
                tokio::select! {
                    _ = tokio::io::copy(&mut device_read, &mut gateway_write) => {}
                    _ = tokio::io::copy(&mut gateway_read, &mut device_write) => {}
                }
            });
        }
    })
}

/// The nested loop's epoll descriptor, as tokio's `AsyncFd` sees it: the `mio::Poll` it
/// belongs to stays apart, to be polled mutably beside it.
struct EpollFd(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// A loop that pairs are handed to failed: the floor ends, rather than go on accepting
/// connections nothing forwards (a bench would read stalls, not the failure).
fn stopped(what: &str, e: io::Error) -> ! {
    eprintln!("passthrough_floor: {what}: {e}");
    std::process::exit(1);
}

/// A device's socket and its gateway's, out of tokio's epoll.
type StdPair = (std::net::TcpStream, std::net::TcpStream);

/// Pairs opened on tokio and handed to a loop of their own (`tokio-nested`, `tokio-pump`), by
/// slot (token / 2).
#[derive(Default)]
struct Handed {
    pairs: Vec<Option<Pair>>,
    free: Vec<usize>,
}

impl Handed {
    /// Registers both sockets of `pair` in `registry`, both ways, and keeps the pair (dropped,
    /// and so closed, if either cannot be registered).
    fn adopt(&mut self, registry: &mio::Registry, (device, gateway): StdPair) {
        let mut device = mio::net::TcpStream::from_std(device);
        let mut gateway = mio::net::TcpStream::from_std(gateway);
        let slot = self.free.pop().unwrap_or_else(|| {
            self.pairs.push(None);
            self.pairs.len() - 1
        });
        let both = mio::Interest::READABLE | mio::Interest::WRITABLE;
        if registry
            .register(&mut device, mio::Token(slot * 2), both)
            .is_err()
            || registry
                .register(&mut gateway, mio::Token(slot * 2 + 1), both)
                .is_err()
        {
            self.free.push(slot);
            return;
        }
        self.pairs[slot] = Some(Pair {
            device,
            gateway: Some(gateway),
            connected: true,
            pending: [Vec::new(), Vec::new()],
            ending: false,
        });
    }

    /// One readiness event of a kept pair: its bytes moved, as `mio`'s loop moves them; the
    /// pair dropped once it ended or failed.
    fn step(&mut self, event: &mio::event::Event, buf: &mut [u8]) {
        let (slot, side) = (event.token().0 / 2, event.token().0 % 2);
        let Some(pair) = self.pairs.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let mut keep = true;
        if event.is_readable() || event.is_read_closed() {
            keep &= pump(pair, side, buf).is_ok();
        }
        if keep && event.is_writable() {
            keep &= pump(pair, 1 - side, buf).is_ok();
        }
        if !keep || !pair.open() {
            self.pairs[slot] = None;
            self.free.push(slot);
        }
    }
}

/// `tokio-io`'s steps for one connection up to the device's first bytes written to the
/// gateway, then both sockets taken out of tokio's epoll (`into_std`); `None` if it ended or
/// failed before.
async fn opened_on_tokio(
    mut device: tokio::net::TcpStream,
    gateway: SocketAddr,
) -> Option<StdPair> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = device.set_nodelay(true);
    let mut first = [0u8; 2048];
    let n = match device.read(&mut first).await {
        Ok(0) | Err(_) => return None,
        Ok(n) => n,
    };
    let mut upstream = tokio::net::TcpStream::connect(gateway).await.ok()?;
    let _ = upstream.set_nodelay(true);
    upstream.write_all(&first[..n]).await.ok()?;
    Some((device.into_std().ok()?, upstream.into_std().ok()?))
}

/// Binds `listen` on the current runtime, says ready, and gives `each` every connection
/// accepted (a failed accept backs off a moment, blocking: no timers without a time driver).
async fn each_connection(
    listen: SocketAddr,
    mut each: impl FnMut(tokio::net::TcpStream),
) -> io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    ready(listen);
    loop {
        match listener.accept().await {
            Ok((device, _)) => each(device),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

fn on_tokio_nested(listen: SocketAddr, gateway: SocketAddr) -> io::Result<()> {
    use std::sync::{Arc, Mutex};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        let mut poll = mio::Poll::new()?;
        let registry = Arc::new(poll.registry().try_clone()?);
        let handed = Arc::new(Mutex::new(Handed::default()));
        let inner = handed.clone();
        // Declared after `poll`, so dropped (and out of tokio's epoll) before it closes.
        #[expect(
            deprecated,
            reason = "the descriptor is the Poll's, open and the same until this is dropped"
        )]
        let epoll = tokio::io::unix::AsyncFd::with_interest(
            EpollFd(std::os::fd::AsRawFd::as_raw_fd(&poll)),
            tokio::io::Interest::READABLE,
        )?;
        tokio::spawn(async move {
            let mut events = mio::Events::with_capacity(1024);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                // The readiness through the descriptor's own waker slot (`poll_read_ready`),
                // not `readable()`'s future, which joins and leaves a waiter list each time.
                let mut guard = std::future::poll_fn(|cx| epoll.poll_read_ready(cx))
                    .await
                    .unwrap_or_else(|e| stopped("the nested loop's readiness", e));
                // Drained before the readiness is cleared: an event after the last `poll` is a
                // new edge on the inner epoll, seen by tokio's at its next turn.
                loop {
                    if let Err(e) = poll.poll(&mut events, Some(std::time::Duration::ZERO)) {
                        stopped("the nested loop's poll", e);
                    }
                    let mut handed = inner.lock().unwrap_or_else(|p| p.into_inner());
                    let mut n = 0;
                    for event in events.iter() {
                        n += 1;
                        handed.step(event, &mut buf);
                    }
                    if n < 1024 {
                        break;
                    }
                }
                guard.clear_ready();
            }
        });
        each_connection(listen, |device| {
            let (registry, handed) = (registry.clone(), handed.clone());
            tokio::spawn(async move {
                if let Some(pair) = opened_on_tokio(device, gateway).await {
                    let mut handed = handed.lock().unwrap_or_else(|p| p.into_inner());
                    handed.adopt(&registry, pair);
                }
            });
        })
        .await
    })
}

/// Pairs handed to the pump thread, waiting to be registered there.
struct Intake {
    new: std::sync::Mutex<Vec<StdPair>>,
    waker: mio::Waker,
}

const INTAKE: mio::Token = mio::Token(usize::MAX);

fn on_tokio_pump(listen: SocketAddr, gateway: SocketAddr) -> io::Result<()> {
    use std::sync::Arc;
    let mut poll = mio::Poll::new()?;
    let intake = Arc::new(Intake {
        new: std::sync::Mutex::new(Vec::new()),
        waker: mio::Waker::new(poll.registry(), INTAKE)?,
    });
    let pump_intake = intake.clone();
    std::thread::spawn(move || {
        let mut handed = Handed::default();
        let mut events = mio::Events::with_capacity(1024);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Err(e) = poll.poll(&mut events, None) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                stopped("the pump's poll", e);
            }
            for event in events.iter() {
                if event.token() != INTAKE {
                    handed.step(event, &mut buf);
                    continue;
                }
                let new =
                    std::mem::take(&mut *pump_intake.new.lock().unwrap_or_else(|p| p.into_inner()));
                for pair in new {
                    handed.adopt(poll.registry(), pair);
                }
            }
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(each_connection(listen, |device| {
        let intake = intake.clone();
        tokio::spawn(async move {
            if let Some(pair) = opened_on_tokio(device, gateway).await {
                intake
                    .new
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(pair);
                let _ = intake.waker.wake();
            }
        });
    }))
}

/// One device and its gateway on the mio loop.
struct Pair {
    device: mio::net::TcpStream,
    gateway: Option<mio::net::TcpStream>,
    connected: bool,
    /// Bytes read but not yet written, per direction (0: to the gateway, 1: to the device).
    pending: [Vec<u8>; 2],
    /// An end of stream was read: close once `pending` is written.
    ending: bool,
}

impl Pair {
    /// Whether the pair is still open: no end read, or bytes still to write.
    fn open(&self) -> bool {
        !self.ending || self.pending.iter().any(|p| !p.is_empty())
    }
}

const LISTENER: mio::Token = mio::Token(usize::MAX);

fn on_mio(listen: SocketAddr, gateway: SocketAddr) -> io::Result<()> {
    use mio::{Events, Interest, Poll, Token};
    let mut poll = Poll::new()?;
    let mut listener = mio::net::TcpListener::bind(listen)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    ready(listen);
    let mut pairs: Vec<Option<Pair>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut device, _)) => {
                            let _ = device.set_nodelay(true);
                            let slot = free.pop().unwrap_or_else(|| {
                                pairs.push(None);
                                pairs.len() - 1
                            });
                            poll.registry().register(
                                &mut device,
                                Token(slot * 2),
                                Interest::READABLE,
                            )?;
                            pairs[slot] = Some(Pair {
                                device,
                                gateway: None,
                                connected: false,
                                pending: [Vec::new(), Vec::new()],
                                ending: false,
                            });
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => break,
                    }
                }
                continue;
            }
            let (slot, side) = (event.token().0 / 2, event.token().0 % 2);
            let Some(pair) = pairs.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            let keep = step(pair, side, event, gateway, &mut buf, &poll, slot).unwrap_or(false);
            if !keep {
                // Dropping closes both sockets; a closed descriptor leaves epoll by itself.
                pairs[slot] = None;
                free.push(slot);
            }
        }
    }
}

/// Handles one readiness event of a pair; `Ok(false)` when the pair is done.
fn step(
    pair: &mut Pair,
    side: usize,
    event: &mio::event::Event,
    gateway: SocketAddr,
    buf: &mut [u8],
    poll: &mio::Poll,
    slot: usize,
) -> io::Result<bool> {
    use mio::{Interest, Token};
    let Some(upstream) = pair.gateway.as_mut() else {
        // The device's first bytes: connect, and send them once connected.
        let n = match pair.device.read(buf) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e),
        };
        pair.pending[0].extend_from_slice(&buf[..n]);
        let mut upstream = mio::net::TcpStream::connect(gateway)?;
        poll.registry().register(
            &mut upstream,
            Token(slot * 2 + 1),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        pair.gateway = Some(upstream);
        return Ok(true);
    };
    if !pair.connected {
        if side == 1 && (event.is_error() || event.is_write_closed()) {
            return Ok(false); // the connect failed
        }
        if side != 1 || !event.is_writable() {
            return Ok(true);
        }
        if upstream.take_error()?.is_some() || upstream.peer_addr().is_err() {
            return Ok(false);
        }
        let _ = upstream.set_nodelay(true);
        pair.connected = true;
        poll.registry().reregister(
            &mut pair.device,
            Token(slot * 2),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        // Anything the device sent while the gateway was connecting, and the first bytes.
        pump(pair, 0, buf)?;
        return Ok(pair.open());
    }
    // Readable on a side: its bytes go to the other. Writable on a side: what waits for it
    // goes, then more from the other side.
    if event.is_readable() || event.is_read_closed() {
        pump(pair, side, buf)?;
    }
    if event.is_writable() {
        pump(pair, 1 - side, buf)?;
    }
    Ok(pair.open())
}

/// Moves bytes in direction `from` (0: device to gateway, 1: gateway to device): first what is
/// pending, then reads until the source would block or the destination is full.
fn pump(pair: &mut Pair, from: usize, buf: &mut [u8]) -> io::Result<()> {
    let Some(upstream) = pair.gateway.as_mut() else {
        return Ok(());
    };
    let (src, dst) = if from == 0 {
        (&mut pair.device, upstream)
    } else {
        (upstream, &mut pair.device)
    };
    let pending = &mut pair.pending[from];
    if !flush(dst, pending)? {
        return Ok(());
    }
    loop {
        let n = match src.read(buf) {
            Ok(0) => {
                pair.ending = true;
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        // Straight from the shared buffer; only what the destination does not take is kept.
        let mut sent = 0;
        while sent < n {
            match dst.write(&buf[sent..n]) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    pending.extend_from_slice(&buf[sent..n]);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Writes `pending` out; `Ok(false)` if the destination filled first (the rest stays).
fn flush(dst: &mut mio::net::TcpStream, pending: &mut Vec<u8>) -> io::Result<bool> {
    while !pending.is_empty() {
        match dst.write(pending) {
            Ok(n) => {
                pending.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}
