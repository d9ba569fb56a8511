//! The wasmbed front proxy: every device dials one address; each connection goes to the
//! gateway with the fewest live sessions.
//!
//! The path of one connection, module by module:
//! - `listener`: accept (socket2 listeners, backoff on `EMFILE`) on a session worker
//!   (`workers`, with more than one thread), then `session` there or on a worker with fewer;
//! - `passthrough` (peek the ClientHello) or `terminate` (TLS ended here; QUIC devices join
//!   it from [`quic`]), both over the one device-trust object of `tls`;
//! - `route` and `balancer`: the pools, then the pick (lock-free least sessions, RAII lease);
//! - `upstream`: connect (retry the next best gateway), open a terminate-mode link;
//! - `forward` (passthrough) or [`anchor`] (terminate: a sans-I/O core and its driver).
//!
//! Beside the path: `health` (active probes, rise/fall, cancel on down), [`admin`] (HTTP
//! endpoint), [`metrics`] (Prometheus), [`live`] (reloads). `docs/architecture.md` maps every
//! module and what it may import; `tests/layers.rs` holds them to it.
//!
//! ```no_run
//! # async fn demo(config: wasmbed_config::ProxyConfig) -> Result<(), wasmbed_proxy::ProxyError> {
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let proxy = wasmbed_proxy::Proxy::bind(config).await?;
//! println!("devices dial {:?}", proxy.listen_addrs());
//! proxy.run(shutdown).await
//! # }
//! ```

#![deny(unsafe_code)] // allowed in one module, `sockopt`, which says why
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        reason = "tests make their own timers, on runtimes with a time driver"
    )
)]

pub mod admin;
mod alive;
pub mod anchor;
mod balancer;
/// The ClientHello reader (public for the fuzz targets).
pub mod clienthello;
mod context;
mod control;
mod dashboard;
mod deadlines;
mod dial;
mod discovery;
mod error;
mod events;
mod failures;
mod forward;
mod health;
mod link;
mod listener;
pub mod live;
mod metric_names;
pub mod metrics;
mod passthrough;
mod proxy_protocol;
pub mod quic;
mod rebalance;
mod refusal;
mod route;
mod seats;
mod session;
mod sockopt;
mod takeover;
mod terminate;
mod tls;
/// Handshake messages joined across TLS records (public for the fuzz targets).
pub use tls::joiner as tls_joiner;
/// The TLS record layer without a socket (for the fuzz targets).
#[cfg(feature = "model")]
pub use tls::records_model as tls_records;
mod upstream;
mod workers;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmbed_config::{ListenerConfig, ProxyConfig};
use workers::Placed;

pub use balancer::{Gateway, GatewaySet, Lease};
pub use deadlines::{Bounded, Deadlines, data_plane_timers};
pub use error::ProxyError;
pub use events::{Totals, totals as session_totals};
/// Pipes splicing took on the calling thread (tests: a session's pipes, not the process's).
#[doc(hidden)]
pub use forward::splice::taken_on_this_thread as splice_pipes_taken_here;
pub use tls::DeviceTls;

/// A proxy whose sockets are bound; [`Proxy::run`] serves them.
pub struct Proxy {
    listeners: Vec<(Arc<ListenerConfig>, TcpListener)>,
    admin: Option<TcpListener>,
    live: Arc<live::Live>,
    hard_stop: wasmbed_certs::Trigger,
    probes_stop: CancellationToken,
    admin_tls: Option<tokio_rustls::TlsAcceptor>,
    /// `--quic-listen`: QUIC devices.
    quic: Option<quinn::Endpoint>,
    /// `--takeover`: what was taken from the process this one replaces (its sessions come
    /// once this one accepts), the socket this one serves for the next, and where its own
    /// passthrough sessions go then.
    takeover: Option<Takeover>,
    /// With more than one thread, the session workers (`workers`): started with the rest,
    /// before the proxy says it is ready.
    workers: Option<Arc<workers::Workers>>,
}

struct Takeover {
    inherited: Option<takeover::Inherited>,
    socket: takeover::Socket,
    handoff: (Arc<takeover::Handover>, takeover::Handoff),
}

impl Proxy {
    /// Binds every listener and the admin endpoint, and loads the TLS material, so that every
    /// start-up error surfaces here, before anything is served.
    pub async fn bind(config: ProxyConfig) -> Result<Proxy, ProxyError> {
        crate::metrics::handle();
        // The threads first: what follows waits through them (the takeover's answers, the
        // first probe round), and the data plane may have no time driver of its own.
        let control = control::Control::start("wasmbed-probes").map_err(ProxyError::Control)?;
        // With more than one thread, TCP device sessions run on one-thread runtimes of their
        // own (`workers`: why), each registering its sockets where it runs.
        let workers = match workers::threads(config.threads) {
            0 | 1 => None,
            n => Some(Arc::new(
                workers::Workers::start(n, data_plane_timers(&config))
                    .map_err(ProxyError::Workers)?,
            )),
        };
        let deadlines = deadlines::Deadlines::start(deadlines::floor_period(&config))
            .await
            .map_err(ProxyError::Control)?;
        // An upgrade in place: the running proxy's listening sockets, when one serves the path.
        let mut inherited = match &config.takeover {
            Some(path) => takeover::receive(path, &deadlines)
                .await
                .map_err(|e| ProxyError::Takeover(format!("{}: {e}", path.display())))?,
            None => None,
        };
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let taken = inherited.as_mut().and_then(|i| i.take_listener(l.addr));
            let bound = match taken {
                Some(socket) => listener::adopt(socket, l),
                None => listener::bind(l),
            }
            .map_err(|source| ProxyError::Bind {
                what: "devices, --listen",
                addr: l.addr,
                source,
            })?;
            let mut l = l.clone();
            l.addr = bound.local_addr().unwrap_or(l.addr);
            listeners.push((Arc::new(l), bound));
        }
        let inherited_admin = inherited
            .as_mut()
            .and_then(|i| i.admin.take())
            .filter(|(a, _)| Some(*a) == config.admin);
        let admin = match (config.admin, inherited_admin) {
            (Some(addr), Some((_, socket))) => Some(TcpListener::from_std(socket).map_err(
                |source| ProxyError::Bind {
                    what: "admin, --admin",
                    addr,
                    source,
                },
            )?),
            (Some(addr), None) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ProxyError::Bind {
                            what: "admin, --admin",
                            addr,
                            source,
                        })?,
                )
            }
            (None, _) => None,
        };
        // Inherited listeners this config does not name: closed now (the old process closes
        // its copies too), not left accepting into a backlog nobody reads.
        if let Some(i) = inherited.as_mut() {
            for (addr, _) in i.listeners.drain(..).chain(i.admin.take()) {
                tracing::warn!(%addr, "takeover: the running proxy listened here; this config does not: closed");
            }
        }
        // Load certificates now, so a bad file fails the start, not the first device.
        let tls = tls_setup(&config)?;
        let device_cas: Vec<&std::path::Path> = config
            .tls
            .iter()
            .filter_map(|t| t.client_ca.as_deref())
            .collect();
        let admin_tls = wasmbed_admin::acceptor(config.admin_auth.tls.as_ref(), &device_cas)?;
        let admin_ca = wasmbed_admin::admin_client_ca(config.admin_auth.tls.as_ref())?;
        let gateways = Arc::new(GatewaySet::new(&config.gateways, config.slow_start));
        // Every gateway waits for its first passed probe (none when health checks are off:
        // taken on trust); that first round runs now, so "ready" means probed.
        if config.health.check != wasmbed_config::HealthCheck::None {
            let set = gateways.snapshot();
            set.iter().for_each(|g| g.await_first_probe());
            health::first_round_on(control.handle(), set, config.health.clone()).await;
        }
        let hard_stop = wasmbed_certs::Trigger::new();
        let probes_stop = CancellationToken::new();
        let links = link::Links::new(&config, workers.as_deref())?;
        let quic = quic::bind(&config, &tls.0)?;
        let takeover = match &config.takeover {
            Some(path) => {
                let socket = takeover::bind(path)
                    .map_err(|e| ProxyError::Takeover(format!("{}: {e}", path.display())))?;
                Some(Takeover {
                    inherited,
                    socket,
                    handoff: takeover::Handover::new(),
                })
            }
            None => None,
        };
        let mut ctx = context::Context::new(config, gateways, tls, hard_stop.clone(), deadlines);
        ctx.links = links;
        ctx.handover = takeover.as_ref().map(|t| t.handoff.0.clone());
        let live = live::Live::new(ctx, probes_stop.clone(), control);
        let _ = live.admin_ca.set(admin_ca);
        Ok(Proxy {
            listeners,
            admin,
            live: Arc::new(live),
            hard_stop,
            probes_stop,
            admin_tls,
            quic,
            takeover,
            workers,
        })
    }

    /// The UDP address QUIC devices dial (`--quic-listen`), when there is one.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic.as_ref().and_then(|e| e.local_addr().ok())
    }

    /// The running config and its reload (SIGHUP, `POST /api/reload`).
    pub fn live(&self) -> Arc<live::Live> {
        self.live.clone()
    }

    /// Past this after a stop began, the process should end whatever still runs.
    pub fn hard_stop_after(&self) -> std::time::Duration {
        self.live.context().config.hard_stop_after
    }

    /// The addresses devices dial (with the ports the OS chose for `:0`).
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|(l, _)| l.addr).collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// Reloads terminate mode's device TLS (certificate, key, CA, CRLs): for SIGHUP.
    pub fn device_tls(&self) -> Arc<DeviceTls> {
        self.live.context().device_tls.clone()
    }

    /// The live gateway set (for tests and embedding programs).
    pub fn gateways(&self) -> Arc<GatewaySet> {
        self.live.context().gateways.clone()
    }

    /// Serves until `shutdown`; then stops accepting, lets sessions finish for the grace period,
    /// closes the rest, and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ProxyError> {
        let Proxy {
            listeners,
            admin,
            live,
            hard_stop,
            probes_stop,
            admin_tls,
            quic,
            takeover,
            workers,
        } = self;
        // Copies of the listening sockets, for a takeover: taken before the accept loops own
        // them, dropped when the takeover server ends (at the latest, when this one stops).
        let dup = |l: &TcpListener| -> Option<(SocketAddr, std::os::fd::OwnedFd)> {
            use std::os::fd::AsFd;
            Some((l.local_addr().ok()?, l.as_fd().try_clone_to_owned().ok()?))
        };
        let offer = takeover.as_ref().map(|_| takeover::Offer {
            listeners: listeners.iter().filter_map(|(_, l)| dup(l)).collect(),
            admin: admin.as_ref().and_then(dup),
        });
        let ctx = live.context();
        let gateways = ctx.gateways.clone();
        let background = TaskTracker::new();
        // Dropped before its end (an embedder's select!, a test), `run` still stops the probes
        // and the admin endpoint: they run on threads of their own.
        let _stop_probes = probes_stop.clone().drop_guard();
        let mut admin_thread = None;
        // The admin endpoint is served by one process at a time through an upgrade: the old
        // one stops it (`admin_stop`) and, once it has closed (`admin_closed`), hands its
        // run-time changes over; the new one serves it only once they are applied
        // (`admin_gate`), so no change made through it is lost or made on the wrong process.
        let admin_stop = probes_stop.child_token();
        let admin_closed = CancellationToken::new();
        let admin_gate = CancellationToken::new();
        if takeover.as_ref().is_none_or(|t| t.inherited.is_none()) {
            admin_gate.cancel();
        }
        live.probes.start(&gateways.snapshot(), &ctx.config.health);
        let terminate = ctx.config.mode == wasmbed_config::Mode::Terminate;
        if terminate {
            background.spawn(rebalance::run(live.clone(), probes_stop.clone()));
        }
        // On the probes' thread: DNS and its timers are control work (and hickory's timers
        // need a time driver, which a passthrough data plane does not have).
        background.spawn_on(
            discovery::run(live.clone(), probes_stop.clone()),
            live.probes.control.handle(),
        );
        if let Some(listener) = admin {
            for warning in ctx.config.admin_auth.warnings() {
                tracing::warn!("{warning}");
            }
            // On a thread of its own, the listener registered with that runtime: the admin
            // endpoint answers while the data plane is saturated, and its clients cannot
            // delay the probes. The dashboard's snapshots are made there too, so that its tick
            // is not a timer in the data plane's wheel (`deadlines`).
            let thread = control::Control::start("wasmbed-admin").map_err(ProxyError::Control)?;
            // Its end ends the event streams (SSE), so a stop of the admin endpoint (a
            // takeover) is not held up by an open dashboard.
            let feed = dashboard::spawn(
                live.clone(),
                (&background, thread.handle()),
                admin_stop.clone(),
            );
            let admin = Arc::new(admin::Admin {
                live: live.clone(),
                auth: ctx.config.admin_auth.clone(),
                can_move: terminate,
                feed,
                workers: workers.as_ref().map(Arc::downgrade),
                shutdown: shutdown.clone(),
            });
            let listener = {
                let _in = thread.handle().enter();
                listener
                    .into_std()
                    .and_then(TcpListener::from_std)
                    .map_err(ProxyError::Control)?
            };
            let serve = wasmbed_admin::serve(
                listener,
                admin_tls,
                admin::router(admin),
                admin_stop.clone(),
            );
            let (gate, closed) = (admin_gate.clone(), admin_closed.clone());
            let stop = admin_stop.clone();
            let serve = async move {
                tokio::select! {
                    _ = gate.cancelled() => serve.await,
                    // Stopped before it was ever served (a takeover of this process).
                    _ = stop.cancelled() => {}
                }
                closed.cancel();
            };
            background.spawn_on(serve, thread.handle());
            admin_thread = Some(thread);
        }
        let sessions = TaskTracker::new();
        // Dropped before its end, `run` stops the workers too (their accept loops and sessions
        // hold them, and only the stop below would end those). Their links then end unclosed:
        // each gateway finds it by its idle timeout, as for a killed proxy.
        let _stop_workers = workers.as_ref().map(|w| w.stop_guard());
        let limit = Arc::new(Semaphore::new(ctx.config.max_connections));
        let accepting = TaskTracker::new();
        // The accept loops wait on a trigger, fired when `shutdown` is (below): one flag read
        // per poll, where a token's wait takes a lock (`listener::accept_loop`).
        let stop_accepting = wasmbed_certs::Trigger::new();
        // With workers, each listener registered with the one its accept loop runs on (in
        // turn), all before any loop starts: a failure is the start's.
        let mut homed = Vec::with_capacity(listeners.len());
        for (i, (config, listener)) in listeners.into_iter().enumerate() {
            let home = workers.as_deref().map(|w| w.host_loop(i));
            let listener = match &home {
                Some((home, _)) => listener.into_std().and_then(|l| {
                    let _home = home.enter();
                    TcpListener::from_std(l)
                }),
                None => Ok(listener),
            }
            .map_err(ProxyError::Workers)?;
            homed.push((i, config, listener, home.map(|(h, mark)| (h.clone(), mark))));
        }
        let moves = ::metrics::counter!(metric_names::WORKER_MOVES);
        for (i, config, listener, home) in homed {
            tracing::info!(addr = %config.addr, mode = ?ctx.config.mode, "listening for devices");
            let config = Arc::new(session::Listener::new(Arc::unwrap_or_clone(config)));
            let (live, sessions_t, placing) = (live.clone(), sessions.clone(), workers.clone());
            let moves = moves.clone();
            let accept = listener::accept_loop(
                listener,
                limit.clone(),
                ctx.deadlines.clone(),
                stop_accepting.clone(),
                move |a: listener::Accepted| {
                    // Served where it was accepted, or moved to the worker with the fewest.
                    let (a, on) = match placing.as_deref().map(|w| w.place(i)) {
                        Some(Placed::Away(on)) => match a.moved_to(on) {
                            Some(a) => {
                                moves.increment(1);
                                (a, Some(on))
                            }
                            None => return,
                        },
                        _ => (a, None),
                    };
                    let ctx = live.context();
                    match ctx.config.mode {
                        wasmbed_config::Mode::Passthrough => spawn_session(
                            &sessions_t,
                            on,
                            session::serve_passthrough(ctx, config.clone(), a),
                        ),
                        wasmbed_config::Mode::Terminate => spawn_session(
                            &sessions_t,
                            on,
                            session::serve_terminate(ctx, config.clone(), a, sessions_t.clone()),
                        ),
                    }
                },
            );
            // With workers, each listener's accept loop runs on one of them (in turn): an
            // accept is a one-thread runtime's turn, and a session served on that worker starts
            // there without waking another thread.
            match home {
                Some((home, mark)) => {
                    let accept = async move {
                        let _mark = mark;
                        accept.await;
                    };
                    drop(accepting.spawn_on(accept, &home));
                }
                None => drop(accepting.spawn(accept)),
            }
        }
        if let Some(endpoint) = &quic {
            tracing::info!(addr = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening for QUIC devices");
            let live = live.clone();
            accepting.spawn(quic::accept_loop(
                move || live.context(),
                endpoint.clone(),
                (limit.clone(), sessions.clone()),
                stop_accepting.clone(),
            ));
        }
        let sessions_done = CancellationToken::new();
        if let (Some(t), Some(offer)) = (takeover, offer) {
            let Takeover {
                inherited,
                socket,
                handoff,
            } = t;
            let changes = {
                let live = live.clone();
                move || serde_json::to_value(live.run_time_changes()).unwrap_or_default()
            };
            let admin = takeover::AdminHandoff {
                stop: admin_stop.clone(),
                closed: admin_closed.clone(),
                changes: Box::new(changes),
            };
            if admin_thread.is_none() {
                // No admin endpoint here: nothing to wait for.
                admin_closed.cancel();
            }
            background.spawn(takeover::serve(
                socket,
                offer,
                (handoff, admin),
                shutdown.clone(),
                sessions_done.clone(),
                live.context().deadlines.clone(),
            ));
            if let Some(inherited) = inherited {
                let (live, sessions, limit) = (live.clone(), sessions.clone(), limit.clone());
                let workers = workers.clone();
                background.spawn(async move {
                    let adopt = |name: String, device, gateway| {
                        let ctx = live.context();
                        let Some(lease) = ctx.gateways.lease_on(&name) else {
                            tracing::warn!(gateway = %name, "takeover: a session of a gateway this proxy does not have: closed");
                            return false;
                        };
                        // On the worker with the fewest sessions, its sockets registered there.
                        let on = workers.as_deref().map(workers::Workers::least);
                        let registered = {
                            let _on = on.map(tokio::runtime::Handle::enter);
                            let register = tokio::net::TcpStream::from_std;
                            (register(device), register(gateway))
                        };
                        let (Ok(device), Ok(gateway)) = registered else {
                            tracing::warn!(gateway = %name, "takeover: a session's sockets could not be registered: closed");
                            return false;
                        };
                        let permit = limit.clone().try_acquire_owned().ok();
                        let adopted = session::adopt(ctx, (device, gateway), lease, permit);
                        spawn_session(&sessions, on, adopted);
                        true
                    };
                    let adopt_changes = |changes: serde_json::Value| {
                        let live = live.clone();
                        async move {
                            let changes = match serde_json::from_value(changes) {
                                Ok(c) => c,
                                Err(e) => {
                                    tracing::warn!(error = %e, "takeover: the old process's run-time changes could not be read: the config file's gateways as they are");
                                    return;
                                }
                            };
                            let (kept, added) = live.adopt_run_time_changes(changes);
                            // As `POST /api/gateways`: a first probe round before they take
                            // sessions (the old process's are handed over next).
                            let health = live.context().config.health.clone();
                            let on = live.probes.control.handle();
                            health::first_round_on(on, Arc::new(added), health).await;
                            tracing::info!(?kept, "takeover: the old process's run-time changes kept");
                        }
                    };
                    let taken =
                        takeover::take_sessions(inherited, (adopt_changes, admin_gate), adopt)
                            .await;
                    if let Err(e) = taken {
                        tracing::warn!(error = %e, "takeover: the old process stopped handing sessions over");
                    }
                });
            }
        }
        drop(ctx);
        let stopping = gateways.clone();
        let stop_said = shutdown.clone();
        background.spawn(async move {
            stop_said.cancelled().await;
            // The accept loops first: no session starts once the stop has begun.
            stop_accepting.fire();
            stopping.set_stopping();
        });
        accepting.close();
        accepting.wait().await;
        sessions.close();
        let open = sessions.len();
        let grace = live.context().config.grace;
        tracing::info!(
            sessions = open,
            ?grace,
            "shutting down: no longer accepting"
        );
        let deadlines = live.context().deadlines.clone();
        if deadlines.timeout(grace, sessions.wait()).await.is_err() {
            tracing::info!(
                sessions = sessions.len(),
                "grace period over: closing sessions"
            );
            // The stop's start first (a session waits for the hard stop only once it has
            // seen the start: anchor's `stop`); normally set long before, by the task above.
            gateways.set_stopping();
            hard_stop.fire();
            gateways.cut_all();
            sessions.wait().await;
        }
        sessions_done.cancel();
        if let Some(endpoint) = &quic {
            quic::close(endpoint).await;
        }
        if let Some(links) = &live.context().links {
            links.close().await;
        }
        // No session is left on the workers: their threads end.
        drop(workers);
        probes_stop.cancel();
        background.close();
        background.wait().await;
        live.probes.tracker.close();
        live.probes.tracker.wait().await;
        // The admin endpoint ended in order above; its thread ends now.
        drop(admin_thread);
        tracing::info!("proxy stopped");
        Ok(())
    }
}

/// A session's task, tracked by `sessions`, on the runtime `on` (the worker its sockets were
/// registered with), or else on the current one (where its accept loop runs).
fn spawn_session<F>(sessions: &TaskTracker, on: Option<&tokio::runtime::Handle>, session: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    match on {
        Some(on) => drop(sessions.spawn_on(session, on)),
        None => drop(sessions.spawn(session)),
    }
}

fn tls_setup(config: &ProxyConfig) -> Result<tls::TlsSetup, ProxyError> {
    let acceptor = Arc::new(DeviceTls::load(config)?);
    Ok((acceptor, tls::connector(config)?))
}

/// Binds and serves `config` until `shutdown` (see [`Proxy`]).
pub async fn run(config: ProxyConfig, shutdown: CancellationToken) -> Result<(), ProxyError> {
    Proxy::bind(config).await?.run(shutdown).await
}
