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
//!
//! Both end a pair when either side ends (no half-close passed on), as NGINX does by default.
//! wasmbed ends a session at its gateway's end of stream but passes a device's on and waits
//! for the gateway's: one `shutdown` and one more wake-up per connection that the device
//! closes first (measured: docs/performance.md, "What the gap to the floor is made of").
//!
//! Neither is a proxy to deploy: no timeouts, no limits, an error closes the pair.
//!
//! Run: `passthrough_floor tokio|mio --listen ADDR --gateway ADDR` (other wasmbed options are
//! accepted and ignored, so the bench can start it with wasmbed's command line); prints
//! `ready listen=ADDR` once bound.

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;

const USAGE: &str =
    "passthrough_floor tokio|tokio-io|mio --listen ADDR --gateway ADDR [ignored wasmbed options]";

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
