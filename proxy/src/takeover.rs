//! takeover: upgrade in place (`--takeover PATH`), the one module that passes file
//! descriptors between processes.
//!
//! A proxy started with `--takeover PATH` serves a Unix socket at PATH. A new process started
//! with the same PATH connects to it and, over it (SCM_RIGHTS):
//! 1. proves it may: the same user (the socket's peer credentials) and the token the old one
//!    wrote to `PATH.token` (mode 0600);
//! 2. receives the listening sockets (device listeners, admin): both processes now accept
//!    from the same sockets, so no connect is refused at any moment;
//! 3. says it is ready (it accepts); the old process stops accepting and stops (its
//!    terminated sessions are handed back to their devices, as on SIGTERM), stops its admin
//!    endpoint and, once that has answered its last request, sends its run-time changes
//!    (gateways removed, added or drained through it); the new process keeps them and only
//!    then serves the admin endpoint, so one process at a time does;
//! 4. receives every passthrough session, each quiesced first (the old process stops reading
//!    it and writes out what it had read, so no byte is in flight in user space): its device
//!    socket, its gateway socket and its gateway's name; it counts it on that gateway and
//!    forwards it on. Nothing is duplicated: the old process holds the session's own two
//!    descriptors until the new one answers, closes them if it took the session, and gives
//!    them back to the session if not (so a failed hand-over needs no spare descriptors,
//!    which with 9,000 sessions quiesced at once a process near its limit would not have);
//! 5. reads "done", and serves PATH itself for the next upgrade.
//!
//! Faults: a new process that dies before it is ready leaves the old one as it was; one that
//! dies during step 4 fails the hand-over of the session in flight, which the old process
//! keeps forwarding (as it does the sessions not handed yet). The passing is rustix's safe
//! `sendmsg`/`recvmsg` with `SCM_RIGHTS`: received descriptors arrive as `OwnedFd`, so this
//! module has no `unsafe`.
//!
//! The wire: frames of a 4-byte big-endian length and a JSON object; a frame that carries
//! descriptors says how many (`"fds": n`), in the order the object lists them.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::deadlines::Deadlines;

/// Largest frame (a JSON object: small, but the run-time changes may list hundreds of
/// gateways; the peer is already proven the same user with the token).
const MAX_FRAME: usize = 1 << 20;
/// Most descriptors in one frame.
const MAX_FDS: usize = 64;
/// The exchange's version: 2 adds the run-time changes (`state`), sent only to a new process
/// that says 2 or more, and awaited only from an old one that does.
const VERSION: u64 = 2;
/// How long the old process waits for its admin endpoint's last requests before it hands
/// its run-time changes over.
const ADMIN_CLOSE: Duration = Duration::from_secs(5);
/// How long the new process may take from the listening sockets to "ready".
const READY_WITHIN: Duration = Duration::from_secs(60);
/// Sessions sent to the new process and not yet answered, at most.
const WINDOW: usize = 64;
/// How long a step of the exchange may take before the other side counts as gone.
const STEP: Duration = Duration::from_secs(10);

/// A session on its way out of this process: its sockets (this process's only copies: none
/// is duplicated, so a hand-over never needs more descriptors than the session holds) and
/// where to say how it went. Dropped unanswered (the takeover server gone, the new process
/// gone with it), it gives its sockets back to its session, which forwards on.
pub struct Handed {
    sockets: Option<Sockets>,
    gateway_name: String,
    done: Option<oneshot::Sender<Outcome>>,
}

/// A passthrough session's two sockets, out of the reactor.
#[derive(Debug)]
struct Sockets {
    device: std::net::TcpStream,
    gateway: std::net::TcpStream,
}

/// How a hand-over ended, for the old process.
#[derive(Debug)]
enum Outcome {
    /// The new process forwards it: done here (this process's copies are closed).
    Taken,
    /// The new process does not have it (it refused it, or it is gone and its copies with
    /// it): its sockets, to forward on here.
    Keep(Sockets),
    /// Not known whether the new process took it (it stopped answering): closed here
    /// rather than risk both processes reading one device; the device reconnects.
    Close,
}

impl Handed {
    /// The session's two descriptors, to send.
    fn fds(&self) -> Option<[BorrowedFd<'_>; 2]> {
        self.sockets
            .as_ref()
            .map(|s| [s.device.as_fd(), s.gateway.as_fd()])
    }

    /// The new process took it: this process's copies are closed.
    fn taken(self) {
        self.end(Outcome::Taken);
    }

    /// Whether the new process took it is not known: closed here too.
    fn close(self) {
        self.end(Outcome::Close);
    }

    fn end(mut self, outcome: Outcome) {
        self.sockets = None;
        if let Some(done) = self.done.take() {
            let _ = done.send(outcome);
        }
    }

    /// The new process does not have it: the sockets go back to their session.
    fn keep(self) {
        drop(self);
    }
}

impl Drop for Handed {
    fn drop(&mut self) {
        if let (Some(done), Some(sockets)) = (self.done.take(), self.sockets.take()) {
            let _ = done.send(Outcome::Keep(sockets));
        }
    }
}

/// Where passthrough sessions go when a new process takes over (in the old process).
pub struct Handover {
    /// Fired once the new process accepts: every passthrough session quiesces and comes here.
    pub quiesce: wasmbed_certs::Trigger,
    tx: mpsc::UnboundedSender<Handed>,
}

/// The receiving end of [`Handover`], for the takeover server.
pub struct Handoff {
    rx: mpsc::UnboundedReceiver<Handed>,
}

impl Handover {
    pub fn new() -> (Arc<Handover>, Handoff) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Handover {
                quiesce: wasmbed_certs::Trigger::new(),
                tx,
            }),
            Handoff { rx },
        )
    }

    /// Hands a quiesced session (of gateway `gateway_name`) over. `Err` gives its sockets
    /// back, the same descriptors (the new process is gone, or refused it): the caller goes
    /// on forwarding it.
    pub async fn give(
        &self,
        device: TcpStream,
        gateway: TcpStream,
        gateway_name: &str,
    ) -> Result<(), (TcpStream, TcpStream)> {
        let (device, gateway) = match (device.into_std(), gateway.into_std()) {
            (Ok(device), Ok(gateway)) => (device, gateway),
            // into_std fails only if the socket cannot leave the reactor: then it is closed.
            _ => return Ok(()),
        };
        let (done, outcome) = oneshot::channel();
        let handed = Handed {
            sockets: Some(Sockets { device, gateway }),
            gateway_name: gateway_name.to_owned(),
            done: Some(done),
        };
        // Not sent (the server is gone): dropping it answers `Keep` with its sockets.
        let _ = self.tx.send(handed);
        match outcome.await {
            Ok(Outcome::Keep(Sockets { device, gateway })) => {
                match (TcpStream::from_std(device), TcpStream::from_std(gateway)) {
                    (Ok(d), Ok(g)) => Err((d, g)),
                    _ => Ok(()),
                }
            }
            // Taken, or closed here. (Never unanswered: a `Handed` dropped unanswered
            // answers `Keep` with its sockets.)
            Ok(Outcome::Taken | Outcome::Close) | Err(_) => Ok(()),
        }
    }
}

/// A framed exchange over the takeover socket.
struct Channel {
    stream: UnixStream,
    read: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    /// Where its bounds are armed (the data plane may have no time driver).
    deadlines: Deadlines,
}

impl Channel {
    fn new(stream: UnixStream, deadlines: Deadlines) -> Channel {
        Channel {
            stream,
            read: Vec::new(),
            fds: VecDeque::new(),
            deadlines,
        }
    }

    /// Sends `message` with `fds` attached.
    async fn send(&mut self, mut message: Value, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(io::Error::other("too many descriptors in one frame"));
        }
        message["fds"] = json!(fds.len());
        let body = serde_json::to_vec(&message).map_err(io::Error::other)?;
        let len = u32::try_from(body.len())
            .map_err(|_| io::Error::other("frame too large"))?
            .to_be_bytes();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let sent = loop {
            self.stream.writable().await?;
            let attempt = self.stream.try_io(Interest::WRITABLE, || {
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(io::Error::other("descriptors do not fit"));
                }
                let iov = [IoSlice::new(&len), IoSlice::new(&body)];
                rustix::net::sendmsg(&self.stream, &iov, &mut control, SendFlags::NOSIGNAL)
                    .map_err(io::Error::from)
            });
            match attempt {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        // The descriptors went with the first byte; the rest of the frame follows plainly.
        let whole: Vec<u8> = len.iter().chain(&body).copied().collect();
        if sent < whole.len() {
            self.stream.write_all(&whole[sent..]).await?;
        }
        Ok(())
    }

    /// Receives the next frame and the descriptors it carries.
    async fn recv(&mut self) -> io::Result<(Value, Vec<OwnedFd>)> {
        loop {
            if self.read.len() >= 4 {
                let len =
                    u32::from_be_bytes([self.read[0], self.read[1], self.read[2], self.read[3]])
                        as usize;
                if len > MAX_FRAME {
                    return Err(io::Error::other("frame too large"));
                }
                if self.read.len() >= 4 + len {
                    let body: Vec<u8> = self.read.drain(..4 + len).skip(4).collect();
                    let message: Value = serde_json::from_slice(&body).map_err(io::Error::other)?;
                    let n = message["fds"].as_u64().unwrap_or(0) as usize;
                    if n > self.fds.len() || n > MAX_FDS {
                        return Err(io::Error::other(
                            "a frame names descriptors that did not come",
                        ));
                    }
                    let fds = self.fds.drain(..n).collect();
                    return Ok((message, fds));
                }
            }
            let mut buf = [0u8; 4096];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            self.stream.readable().await?;
            let attempt = self.stream.try_io(Interest::READABLE, || {
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let got = rustix::net::recvmsg(
                    &self.stream,
                    &mut iov,
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                // Descriptors the kernel could not give (this process at its open-files
                // limit, or more than the buffer holds) are closed by it: the frame that
                // names them would take the wrong ones. Said by name, not as a count mismatch.
                if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
                    return Err(io::Error::other(
                        "takeover: descriptors truncated (open-files limit reached?)",
                    ));
                }
                let mut fds = Vec::new();
                for message in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(received) = message {
                        fds.extend(received);
                    }
                }
                Ok((got.bytes, fds))
            });
            match attempt {
                Ok((0, _)) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok((n, fds)) => {
                    self.read.extend_from_slice(&buf[..n]);
                    self.fds.extend(fds);
                    if self.fds.len() > 4 * MAX_FDS {
                        return Err(io::Error::other("too many descriptors"));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// [`Channel::send`], given up after `within` (a peer that stopped reading): then the
    /// frame may be on the wire in part, and the channel is not to be used again.
    async fn send_within(
        &mut self,
        within: Duration,
        message: Value,
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        let deadlines = self.deadlines.clone();
        deadlines
            .timeout(within, self.send(message, fds))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "takeover: not read in time"))?
    }

    async fn recv_within(&mut self, within: Duration) -> io::Result<(Value, Vec<OwnedFd>)> {
        let deadlines = self.deadlines.clone();
        deadlines
            .timeout(within, self.recv())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "takeover: no answer"))?
    }
}

fn token_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".token");
    PathBuf::from(p)
}

/// What a new process took from the old one.
pub struct Inherited {
    /// Listening sockets by address.
    pub listeners: Vec<(SocketAddr, std::net::TcpListener)>,
    pub admin: Option<(SocketAddr, std::net::TcpListener)>,
    /// The old process sends its run-time changes (an earlier version does not).
    changes_coming: bool,
    channel: Channel,
}

impl Inherited {
    /// Takes the inherited listener bound to `addr`, if there is one.
    pub fn take_listener(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let i = self.listeners.iter().position(|(a, _)| *a == addr)?;
        Some(self.listeners.remove(i).1)
    }
}

/// In a new process: takes over from the proxy serving `path`. `Ok(None)`: nobody serves it
/// (nothing there, or a stale socket): start fresh.
pub async fn receive(path: &Path, deadlines: &Deadlines) -> io::Result<Option<Inherited>> {
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    // The descriptors that come back become this process's listeners: only from a process
    // of this user (a socket at PATH bound by someone else is not the proxy to take over).
    same_user(&stream)?;
    let token_file = token_path(path);
    let token = std::fs::read_to_string(&token_file).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("takeover token {}: {e}", token_file.display()),
        )
    })?;
    let mut channel = Channel::new(stream, deadlines.clone());
    channel
        .send(json!({"takeover": VERSION, "token": token.trim()}), &[])
        .await?;
    let (message, fds) = channel.recv_within(STEP).await?;
    let addrs = |key: &str| -> Vec<SocketAddr> {
        message[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str()?.parse().ok())
            .collect()
    };
    let (listen, admin) = (addrs("listeners"), addrs("admin"));
    if fds.len() != listen.len() + admin.len() {
        return Err(io::Error::other(
            "takeover: the listeners and their sockets differ",
        ));
    }
    let mut sockets = fds.into_iter().map(std::net::TcpListener::from);
    let listeners = listen.into_iter().zip(sockets.by_ref()).collect::<Vec<_>>();
    let admin = admin.into_iter().zip(sockets).next();
    for (addr, l) in listeners.iter().chain(admin.iter()) {
        listening_at(l, *addr)?;
        l.set_nonblocking(true)?;
    }
    tracing::info!(
        from = %path.display(),
        listeners = listeners.len(),
        "took the running proxy's listening sockets"
    );
    Ok(Some(Inherited {
        listeners,
        admin,
        changes_coming: message["version"].as_u64().is_some_and(|v| v >= 2),
        channel,
    }))
}

/// A descriptor the running proxy sent as its listener at `addr` is one: a TCP socket,
/// listening, bound to that address (else the listeners would be taken mixed up, or not
/// at all).
fn listening_at(l: &std::net::TcpListener, addr: SocketAddr) -> io::Result<()> {
    let socket = socket2::SockRef::from(l);
    let listening = socket.r#type()? == socket2::Type::STREAM && socket.is_listener()?;
    let bound = l.local_addr()?;
    if !listening || bound != addr {
        return Err(io::Error::other(format!(
            "takeover: the socket sent for {addr} is not a TCP listener bound there ({bound})"
        )));
    }
    Ok(())
}

/// In the new process, once it accepts: says so, takes the old process's run-time changes
/// (`changes` applies them; then `admin_gate` opens this process's admin endpoint — on any
/// end too, so an old process that sends none, or dies, leaves it served), then takes every
/// session the old process hands over (`adopt` starts each, given its two sockets non-blocking
/// and registered with no runtime; false: not taken) until it says done.
pub async fn take_sessions<F: Future<Output = ()>>(
    inherited: Inherited,
    (changes, admin_gate): (impl FnOnce(Value) -> F, CancellationToken),
    mut adopt: impl FnMut(String, std::net::TcpStream, std::net::TcpStream) -> bool,
) -> io::Result<u64> {
    let _open = admin_gate.clone().drop_guard();
    let mut state_coming = inherited.changes_coming;
    if !state_coming {
        admin_gate.cancel();
    }
    let mut changes = Some(changes);
    let mut channel = inherited.channel;
    channel.send(json!({"ready": true}), &[]).await?;
    let mut adopted = 0;
    loop {
        // The old process's run-time changes within `STEP`, as its own steps are: one that
        // stops answering before them ends the takeover here (its sessions stay with it) and
        // this process's admin endpoint opens (the gate's guard), instead of staying shut.
        // Its sessions come as they quiesce, which may take its grace: no bound on those.
        let (message, fds) = if state_coming {
            channel.recv_within(STEP).await?
        } else {
            channel.recv().await?
        };
        if let Some(state) = message.get("state") {
            state_coming = false;
            if let Some(apply) = changes.take() {
                apply(state.clone()).await;
            }
            admin_gate.cancel();
            continue;
        }
        if message["done"].as_bool() == Some(true) {
            tracing::info!(adopted, "takeover done: every passthrough session is here");
            return Ok(adopted);
        }
        let Some(name) = message["session"]["gateway"].as_str() else {
            return Err(io::Error::other("takeover: an unknown frame"));
        };
        let mut fds = fds.into_iter();
        let (Some(d), Some(g), None) = (fds.next(), fds.next(), fds.next()) else {
            return Err(io::Error::other(
                "takeover: a session without its two sockets",
            ));
        };
        let (d, g) = (std::net::TcpStream::from(d), std::net::TcpStream::from(g));
        d.set_nonblocking(true)?;
        g.set_nonblocking(true)?;
        // Registered by `adopt`, with the runtime that is to serve the session.
        let taken = adopt(name.to_string(), d, g);
        adopted += u64::from(taken);
        // The old process may close its copies only once this one holds the session.
        channel.send(json!({"taken": taken}), &[]).await?;
    }
}

/// The admin endpoint's part of a takeover, in the old process: `stop` ends its accepting,
/// `closed` says it has answered its last request, and `changes` are the run-time changes
/// then in force (a gateway removed, added or drained through it), as JSON.
pub struct AdminHandoff {
    pub stop: CancellationToken,
    pub closed: CancellationToken,
    pub changes: Box<dyn FnOnce() -> Value + Send>,
}

/// What the old process hands over.
pub struct Offer {
    pub listeners: Vec<(SocketAddr, OwnedFd)>,
    pub admin: Option<(SocketAddr, OwnedFd)>,
}

/// The takeover socket a running proxy serves, and the token a new process must show (kept
/// here as written: the file is for the new process, never read back by this one).
pub struct Socket {
    listener: UnixListener,
    path: PathBuf,
    token: String,
}

/// Binds the takeover socket at `path` (a stale one is replaced; a live one means another
/// proxy serves it: refused) and writes a fresh token beside it.
pub fn bind(path: &Path) -> io::Result<Socket> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: another proxy serves it", path.display()),
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let mut token = [0u8; 32];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut token)
        .map_err(|_| io::Error::other("no randomness for the takeover token"))?;
    let hex: String = token.iter().map(|b| format!("{b:02x}")).collect();
    let token_file = token_path(path);
    let _ = std::fs::remove_file(&token_file);
    let mut options = std::fs::OpenOptions::new();
    use std::os::unix::fs::OpenOptionsExt;
    options
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW);
    std::io::Write::write_all(&mut options.open(&token_file)?, hex.as_bytes())?;
    Ok(Socket {
        listener,
        path: path.to_path_buf(),
        token: hex,
    })
}

/// In the old process: serves `listener` (at `path`) until a new process takes over or
/// `shutdown`. On a takeover: hands `offer` (copies of the listening sockets, dropped when
/// this returns) over, fires `handover.quiesce` and `shutdown` once the new process accepts,
/// then hands every session that comes through `handoff`, and says done when
/// `sessions_done` fires (this process's sessions have all ended or left).
pub async fn serve(
    socket: Socket,
    offered: Offer,
    ((handover, mut handoff), endpoint): ((Arc<Handover>, Handoff), AdminHandoff),
    shutdown: CancellationToken,
    sessions_done: CancellationToken,
    deadlines: Deadlines,
) {
    let Socket {
        mut listener,
        path,
        mut token,
    } = socket;
    let admin: Vec<(SocketAddr, OwnedFd)> = offered.admin.into_iter().collect();
    let (mut channel, version) = loop {
        let (mut channel, version) = loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "takeover socket: accept failed");
                        deadlines.sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => {
                    forget(&path);
                    return;
                }
            };
            match admit(stream, &token, &deadlines).await {
                Ok(admitted) => break admitted,
                Err(e) => tracing::warn!(error = %e, "takeover refused"),
            }
        };
        // One takeover at a time: the socket is the new process's from here on.
        drop(listener);
        forget(&path);
        let addrs = |list: &[(SocketAddr, OwnedFd)]| -> Vec<String> {
            list.iter().map(|(a, _)| a.to_string()).collect()
        };
        let fds: Vec<BorrowedFd<'_>> = offered
            .listeners
            .iter()
            .chain(admin.iter())
            .map(|(_, fd)| fd.as_fd())
            .collect();
        let message = json!({
            "listeners": addrs(&offered.listeners),
            "admin": addrs(&admin),
            "version": VERSION,
        });
        let ready = match channel.send_within(STEP, message, &fds).await {
            // Its start (binding, loading certificates, the first probe round) comes first.
            Ok(()) => channel.recv_within(READY_WITHIN).await,
            Err(e) => Err(e),
        };
        match ready {
            Ok((m, _)) if m["ready"].as_bool() == Some(true) => break (channel, version),
            other => {
                // Nothing changed here: serve on, and the socket again for a next try.
                tracing::warn!(answer = ?other.map(|m| m.0), "takeover: the new process did not get ready; serving on");
                match bind(&path) {
                    Ok(s) => (listener, token) = (s.listener, s.token),
                    Err(e) => {
                        tracing::warn!(error = %e, "takeover socket: cannot serve it again");
                        return;
                    }
                }
            }
        }
    };
    drop((offered.listeners, admin));
    tracing::info!("takeover: the new process accepts; handing sessions over and stopping");
    shutdown.cancel();
    // The admin endpoint next: stopped here and, once closed (its requests answered), its
    // run-time changes go over (to a new process that takes them); the new process serves
    // it from then on. The sessions are quiesced only after, so this wait does not hold up
    // their bytes.
    let mut gone = false;
    if version >= 2 {
        endpoint.stop.cancel();
        if deadlines
            .timeout(ADMIN_CLOSE, endpoint.closed.cancelled())
            .await
            .is_err()
        {
            tracing::warn!(
                "takeover: the admin endpoint did not close in time; its run-time changes go over as they are"
            );
        }
        if let Err(e) = channel
            .send_within(STEP, json!({"state": (endpoint.changes)()}), &[])
            .await
        {
            tracing::warn!(error = %e, "takeover: the new process is gone; the sessions stay here");
            gone = true;
        }
    }
    handover.quiesce.fire();
    let handed = hand_sessions(&mut channel, &mut handoff, &sessions_done, gone).await;
    tracing::info!(handed, "takeover: sessions handed over");
}

/// Hands every quiesced session that comes through `handoff` to the new process over
/// `channel` until `sessions_done` fires, then says done; returns how many it took. Every
/// send and answer is bounded in time (`STEP`): a new process that stops reading or
/// answering ends the hand-over, never this process's stop. `gone`: the new process is
/// already known gone (every session stays here).
async fn hand_sessions(
    channel: &mut Channel,
    handoff: &mut Handoff,
    sessions_done: &CancellationToken,
    mut gone: bool,
) -> u64 {
    // Pipelined: up to WINDOW sessions on the wire before their answers, so a session waits
    // for the ones ahead of it only as long as it takes to send them, not a round trip each.
    let mut handed = 0u64;
    let mut more = true;
    // The sessions on the wire keep their sockets here until answered: given back to their
    // session (`keep`) unless the new process took them.
    let mut in_flight: VecDeque<Handed> = VecDeque::new();
    while more || !in_flight.is_empty() {
        tokio::select! {
            h = handoff.rx.recv(), if more && (gone || in_flight.len() < WINDOW) => {
                let Some(h) = h else {
                    more = false;
                    continue;
                };
                if gone {
                    h.keep();
                    continue;
                }
                let Some(fds) = h.fds() else { continue };
                let sent = channel
                    .send_within(STEP, json!({"session": {"gateway": h.gateway_name}}), &fds)
                    .await;
                match sent {
                    Ok(()) => in_flight.push_back(h),
                    Err(e) => {
                        // This one's frame did not reach the new process whole (it acts only
                        // on a whole frame): it stays here. No more are sent. The ones
                        // already on the wire may have been taken (a send can fail with the
                        // new process alive: it stopped reading, or a local error): their
                        // answers decide, as below; a new process that is gone answers with
                        // its end (theirs then stay here too).
                        tracing::warn!(error = %e, "takeover: a session could not be sent; the rest stay here");
                        gone = true;
                        h.keep();
                    }
                }
            }
            _ = sessions_done.cancelled(), if more => more = false,
            answer = channel.recv_within(STEP), if !in_flight.is_empty() => {
                let Some(h) = in_flight.pop_front() else { continue };
                match answer {
                    Ok((m, _)) if m["taken"].as_bool() == Some(true) => {
                        handed += 1;
                        h.taken();
                    }
                    // Refused (a gateway it does not have or that is not up): this one only.
                    Ok(_) => h.keep(),
                    Err(e) => {
                        // The new process is gone (its copies closed with it: keep them) or
                        // silent (whether it forwards them is unknown: close them).
                        let close = e.kind() == io::ErrorKind::TimedOut;
                        gone = true;
                        tracing::warn!(error = %e, close, "takeover: the new process stopped answering; the remaining sessions stay here");
                        for h in std::iter::once(h).chain(in_flight.drain(..)) {
                            if close {
                                h.close();
                            } else {
                                h.keep();
                            }
                        }
                    }
                }
            }
        }
    }
    let _ = channel.send_within(STEP, json!({"done": true}), &[]).await;
    handed
}

/// Checks a takeover request: the same user at the other end, and the token.
async fn admit(
    stream: UnixStream,
    token: &str,
    deadlines: &Deadlines,
) -> io::Result<(Channel, u64)> {
    same_user(&stream)?;
    let mut channel = Channel::new(stream, deadlines.clone());
    let (message, _) = channel.recv_within(STEP).await?;
    let offered = message["token"].as_str().unwrap_or_default();
    let version = message["takeover"].as_u64().unwrap_or(1);
    // Compared whole, in time independent of where they differ.
    let same = offered.len() == token.len()
        && offered
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if token.is_empty() || !same {
        return Err(io::Error::other("wrong token"));
    }
    Ok((channel, version))
}

/// Refuses a peer of another user (the socket's peer credentials, as the kernel saw them
/// when it connected or listened), both ways: the old process checks who asks, the new one
/// who answers.
fn same_user(stream: &UnixStream) -> io::Result<()> {
    let peer = rustix::net::sockopt::socket_peercred(stream).map_err(io::Error::from)?;
    if peer.uid != rustix::process::getuid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "takeover: the peer is a process of another user (uid {})",
                peer.uid.as_raw()
            ),
        ));
    }
    Ok(())
}

/// Removes the takeover socket's file and token.
fn forget(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(token_path(path));
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rustix::process::Uid;

    use super::*;

    /// A thread of the user `nobody` (65534) runs `f`: the kernel records a socket's
    /// credentials per thread, so this is another user's peer without another process.
    /// `None`: this process may not change a thread's user (no CAP_SETUID).
    fn as_another_user<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            rustix::thread::set_thread_uid(Uid::from_raw(65534)).ok()?;
            Some(f())
        })
        .join()
        .expect("the other user's thread")
    }

    /// Without CAP_SETUID the test says so and checks nothing, unless
    /// `WASMBED_REQUIRE_SETUID=1` (set by `.ci/run`, which runs as root): then it fails.
    fn cannot_check() {
        assert!(
            std::env::var("WASMBED_REQUIRE_SETUID").is_err(),
            "WASMBED_REQUIRE_SETUID is set but this process cannot change a thread's user"
        );
        eprintln!("no CAP_SETUID: cannot make a peer of another user; nothing checked");
    }

    /// Both ends check the other's user: the old process refuses a new one of another user
    /// (before reading a byte from it), the new process refuses an old one of another user
    /// (before sending it the token or taking descriptors from it). Needs CAP_SETUID
    /// ([`cannot_check`]).
    #[tokio::test]
    async fn a_peer_of_another_user_is_refused_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        // The new process's side: the socket at PATH is served by another user.
        let path = dir.path().join("takeover.sock");
        let theirs = path.clone();
        let Some(foreign) = as_another_user(move || std::os::unix::net::UnixListener::bind(theirs))
        else {
            return cannot_check();
        };
        let _foreign = foreign.expect("the other user binds");
        let Err(refused) = receive(&path, &Deadlines::default()).await else {
            panic!("a proxy of another user taken over")
        };
        assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied, "{refused}");
        assert!(refused.to_string().contains("another user"), "{refused}");
        // The old process's side: another user connects (the socket's mode would stop it
        // first; opened here to reach the second check).
        let ours = dir.path().join("ours.sock");
        let socket = bind(&ours).unwrap();
        std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o666)).unwrap();
        let target = ours.clone();
        let client = as_another_user(move || std::os::unix::net::UnixStream::connect(target))
            .expect("CAP_SETUID, as above");
        let _client = client.expect("the other user connects");
        let (stream, _) = socket.listener.accept().await.unwrap();
        let Err(refused) = admit(stream, &socket.token, &Deadlines::default()).await else {
            panic!("a process of another user admitted")
        };
        assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied, "{refused}");
    }
}

#[cfg(test)]
mod receiving {
    use std::os::fd::AsFd;

    use super::*;

    /// A stand-in for a running proxy at `path` (with its token file) that answers the first
    /// takeover request with `listeners` and `fds`.
    async fn old_process_sending(
        path: &Path,
        listeners: Vec<String>,
        fds: Vec<OwnedFd>,
    ) -> tokio::task::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        std::fs::write(token_path(path), "t0ken").unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut channel = Channel::new(stream, Deadlines::default());
            let _ = channel.recv().await;
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            let message = json!({"listeners": listeners, "admin": []});
            let _ = channel.send(message, &borrowed).await;
        })
    }

    /// A descriptor sent as a listener must be one, bound where the running proxy says:
    /// a TCP listener bound elsewhere, or a UDP socket, is refused, naming the address.
    #[tokio::test]
    async fn a_socket_that_is_not_the_listener_it_is_said_to_be_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_addr = udp.local_addr().unwrap();
        let cases: [(&str, String, OwnedFd); 2] = [
            ("tcp", "127.0.0.1:1".into(), OwnedFd::from(elsewhere)),
            ("udp", udp_addr.to_string(), OwnedFd::from(udp)),
        ];
        for (name, claimed, fd) in cases {
            let path = dir.path().join(format!("{name}.sock"));
            let old = old_process_sending(&path, vec![claimed.clone()], vec![fd]).await;
            let Err(e) = receive(&path, &Deadlines::default()).await else {
                panic!("{name}: taken")
            };
            assert!(
                e.to_string().contains("not a TCP listener bound there"),
                "{name}: {e}"
            );
            assert!(e.to_string().contains(&claimed), "{name}: {e}");
            old.await.unwrap();
        }
    }

    /// A socket at PATH without its token file: the error names the token file, not the
    /// socket (which is there).
    #[tokio::test]
    async fn a_missing_token_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("takeover.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let Err(e) = receive(&path, &Deadlines::default()).await else {
            panic!("taken without a token")
        };
        let token = token_path(&path);
        assert!(e.to_string().contains(&*token.to_string_lossy()), "{e}");
    }

    /// A running proxy that goes silent before sending its run-time changes (wedged) ends
    /// the takeover within one step, and this process's admin endpoint opens: not kept shut
    /// for as long as the old one hangs. (On tokio's paused clock: the step passes at once.)
    #[tokio::test(start_paused = true)]
    async fn an_old_process_silent_before_its_changes_opens_the_admin_endpoint_within_a_step() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let inherited = Inherited {
            listeners: Vec::new(),
            admin: None,
            changes_coming: true,
            channel: Channel::new(ours, Deadlines::default()),
        };
        // It reads this process's `ready`, then says nothing more, its end kept open.
        let old = tokio::spawn(async move {
            let mut channel = Channel::new(theirs, Deadlines::default());
            let _ = channel.recv().await;
            std::future::pending::<()>().await;
        });
        let gate = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let taking = take_sessions(inherited, (|_| async {}, gate.clone()), |_, _, _| true);
        #[expect(
            clippy::disallowed_methods,
            reason = "a test's runtime, its time paused"
        )]
        let taken = tokio::time::timeout(STEP * 3, taking).await;
        let Ok(Err(e)) = taken else {
            panic!("the takeover still waits, or ended without an error: {taken:?}");
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(gate.is_cancelled(), "the admin endpoint opens");
        assert!(started.elapsed() >= STEP);
        old.abort();
    }
}

#[cfg(test)]
mod handing {
    use std::os::fd::{AsRawFd, RawFd};

    use super::*;

    /// A connected pair's two ends: the one a session would hold, and the peer's.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialing = TcpStream::connect(listener.local_addr().unwrap());
        let (dialed, accepted) = tokio::join!(dialing, listener.accept());
        (accepted.unwrap().0, dialed.unwrap())
    }

    /// A session whose hand-over does not happen comes back on its own descriptors: none
    /// is duplicated while it waits (at 9,000 sessions quiesced at once, duplicates would
    /// double the descriptors and meet the process's limit), and the bytes still flow.
    #[tokio::test]
    async fn a_session_not_taken_comes_back_on_its_own_descriptors() {
        // Three ways not to be taken: the new process refuses it (the server gives it back),
        // the server gone with the session on its way (dropped unanswered), and the server
        // gone before it was sent (the send fails).
        for way in ["refused", "dropped on the way", "never sent"] {
            let (handover, mut handoff) = Handover::new();
            let ((device, mut device_peer), (gateway, mut gateway_peer)) =
                (pair().await, pair().await);
            let fds: (RawFd, RawFd) = (device.as_raw_fd(), gateway.as_raw_fd());
            if way == "never sent" {
                handoff.rx.close();
            }
            let giving = tokio::spawn(async move { handover.give(device, gateway, "gw-0").await });
            match way {
                "refused" => {
                    let handed = handoff.rx.recv().await.unwrap();
                    assert_eq!(handed.gateway_name, "gw-0");
                    handed.keep();
                }
                "dropped on the way" => {
                    let handed = handoff.rx.recv().await.unwrap();
                    drop(handoff);
                    drop(handed);
                }
                _ => {}
            }
            let Err((mut device, mut gateway)) = giving.await.unwrap() else {
                panic!("a session not taken was dropped");
            };
            assert_eq!(
                (device.as_raw_fd(), gateway.as_raw_fd()),
                fds,
                "the session came back on other descriptors ({way})"
            );
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            device_peer.write_all(b"up").await.unwrap();
            gateway_peer.write_all(b"down").await.unwrap();
            let (mut up, mut down) = ([0u8; 2], [0u8; 4]);
            device.read_exact(&mut up).await.unwrap();
            gateway.read_exact(&mut down).await.unwrap();
            assert_eq!((&up, &down), (b"up", b"down"));
        }
    }

    /// A send that fails while the new process is still there (here: it stopped reading)
    /// ends the hand-over, but the sessions already on the wire are decided by its answers:
    /// one it took is closed here (not given back: two processes would read one device),
    /// the one not sent stays here.
    #[tokio::test]
    async fn a_failed_send_leaves_the_sessions_on_the_wire_to_their_answers() {
        let (old, new) = UnixStream::pair().unwrap();
        let (mut old, mut new) = (
            Channel::new(old, Deadlines::default()),
            Channel::new(new, Deadlines::default()),
        );
        let (handover, mut handoff) = Handover::new();
        let done = CancellationToken::new();
        let server = {
            let done = done.clone();
            tokio::spawn(async move { hand_sessions(&mut old, &mut handoff, &done, false).await })
        };
        let give = |h: Arc<Handover>| async move {
            let ((device, _dp), (gateway, _gp)) = (pair().await, pair().await);
            h.give(device, gateway, "gw-0").await.is_ok()
        };
        let first = tokio::spawn(give(handover.clone()));
        let (frame, fds) = new.recv().await.unwrap();
        assert_eq!(frame["session"]["gateway"], "gw-0");
        assert_eq!(fds.len(), 2);
        // The new process stops reading: the next send fails (EPIPE).
        socket2::SockRef::from(&new.stream)
            .shutdown(std::net::Shutdown::Read)
            .unwrap();
        let second = tokio::spawn(give(handover.clone()));
        assert!(
            !second.await.unwrap(),
            "a session never sent was not given back"
        );
        // Its answer for the first still comes: taken.
        new.send(json!({"taken": true}), &[]).await.unwrap();
        assert!(
            first.await.unwrap(),
            "a session the new process took was given back"
        );
        done.cancel();
        assert_eq!(server.await.unwrap(), 1);
    }

    /// A session the new process took is closed here.
    #[tokio::test]
    async fn a_session_taken_is_closed_here() {
        let (handover, mut handoff) = Handover::new();
        let ((device, mut device_peer), (gateway, _gateway_peer)) = (pair().await, pair().await);
        let giving = tokio::spawn(async move { handover.give(device, gateway, "gw-0").await });
        handoff.rx.recv().await.unwrap().taken();
        assert!(giving.await.unwrap().is_ok());
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        assert_eq!(device_peer.read(&mut byte).await.unwrap(), 0, "not closed");
    }
}
