//! The wasmbed front proxy: every device dials one address; each connection goes to the
//! gateway with the fewest live sessions.
//!
//! The path of one connection, module by module:
//! - `listener`: accept (socket2 listeners, backoff on `EMFILE`), then `session`;
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

#![forbid(unsafe_code)]

pub mod admin;
mod alive;
pub mod anchor;
mod balancer;
mod clienthello;
mod context;
mod dashboard;
mod discovery;
mod error;
mod events;
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
mod session;
mod terminate;
mod tls;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmbed_config::{ListenerConfig, ProxyConfig};

pub use balancer::{Gateway, GatewaySet, Lease};
pub use error::ProxyError;
pub use tls::DeviceTls;

/// A proxy whose sockets are bound; [`Proxy::run`] serves them.
pub struct Proxy {
    listeners: Vec<(Arc<ListenerConfig>, TcpListener)>,
    admin: Option<TcpListener>,
    live: Arc<live::Live>,
    hard_stop: CancellationToken,
    probes_stop: CancellationToken,
    admin_tls: Option<tokio_rustls::TlsAcceptor>,
    /// `--quic-listen`: QUIC devices.
    quic: Option<quinn::Endpoint>,
}

impl Proxy {
    /// Binds every listener and the admin endpoint, and loads the TLS material, so that every
    /// start-up error surfaces here, before anything is served.
    pub async fn bind(config: ProxyConfig) -> Result<Proxy, ProxyError> {
        crate::metrics::handle();
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let bound = listener::bind(l).map_err(|source| ProxyError::Bind {
                what: "devices, --listen",
                addr: l.addr,
                source,
            })?;
            let mut l = l.clone();
            l.addr = bound.local_addr().unwrap_or(l.addr);
            listeners.push((Arc::new(l), bound));
        }
        let admin = match config.admin {
            Some(addr) => {
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
            None => None,
        };
        // Load certificates now, so a bad file fails the start, not the first device.
        let tls = tls_setup(&config)?;
        let device_cas: Vec<&std::path::Path> = config
            .tls
            .iter()
            .filter_map(|t| t.client_ca.as_deref())
            .collect();
        let admin_tls = wasmbed_admin::acceptor(config.admin_auth.tls.as_ref(), &device_cas)?;
        let gateways = Arc::new(GatewaySet::new(&config.gateways, config.slow_start));
        // Every gateway waits for its first passed probe (none when health checks are off:
        // taken on trust); that first round runs now, so "ready" means probed.
        if config.health.check != wasmbed_config::HealthCheck::None {
            let set = gateways.snapshot();
            set.iter().for_each(|g| g.await_first_probe());
            health::first_round(&set, &config.health).await;
        }
        let hard_stop = CancellationToken::new();
        let probes_stop = CancellationToken::new();
        let links = link::Links::new(&config)?;
        let quic = quic::bind(&config, &tls.0)?;
        let mut ctx = context::Context::new(config, gateways, tls, hard_stop.clone());
        ctx.links = links;
        Ok(Proxy {
            listeners,
            admin,
            live: Arc::new(live::Live::new(ctx, probes_stop.clone())),
            hard_stop,
            probes_stop,
            admin_tls,
            quic,
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
        } = self;
        let ctx = live.context();
        let gateways = ctx.gateways.clone();
        let background = TaskTracker::new();
        live.probes.start(&gateways.snapshot(), &ctx.config.health);
        let terminate = ctx.config.mode == wasmbed_config::Mode::Terminate;
        if terminate {
            background.spawn(rebalance::run(live.clone(), probes_stop.clone()));
        }
        background.spawn(discovery::run(live.clone(), probes_stop.clone()));
        if let Some(listener) = admin {
            for warning in ctx.config.admin_auth.warnings() {
                tracing::warn!("{warning}");
            }
            let feed = dashboard::spawn(live.clone(), &background, probes_stop.clone());
            let admin = Arc::new(admin::Admin {
                live: live.clone(),
                auth: ctx.config.admin_auth.clone(),
                can_move: terminate,
                feed,
                shutdown: shutdown.clone(),
            });
            background.spawn(wasmbed_admin::serve(
                listener,
                admin_tls,
                admin::router(admin),
                probes_stop.clone(),
            ));
        }
        let sessions = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(ctx.config.max_connections));
        let accepting = TaskTracker::new();
        for (config, listener) in listeners {
            tracing::info!(addr = %config.addr, mode = ?ctx.config.mode, "listening for devices");
            let config = Arc::new(session::Listener::new(Arc::unwrap_or_clone(config)));
            let (live, sessions_t) = (live.clone(), sessions.clone());
            accepting.spawn(listener::accept_loop(
                listener,
                limit.clone(),
                shutdown.clone(),
                move |a| {
                    sessions_t.spawn(session::serve(live.context(), config.clone(), a));
                },
            ));
        }
        if let Some(endpoint) = &quic {
            tracing::info!(addr = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening for QUIC devices");
            let live = live.clone();
            accepting.spawn(quic::accept_loop(
                move || live.context(),
                endpoint.clone(),
                (limit.clone(), sessions.clone()),
                shutdown.clone(),
            ));
        }
        drop(ctx);
        let stopping = gateways.clone();
        let stop_said = shutdown.clone();
        background.spawn(async move {
            stop_said.cancelled().await;
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
        if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
            tracing::info!(
                sessions = sessions.len(),
                "grace period over: closing sessions"
            );
            hard_stop.cancel();
            gateways.snapshot().iter().for_each(|g| g.cut_sessions());
            sessions.wait().await;
        }
        if let Some(endpoint) = &quic {
            quic::close(endpoint).await;
        }
        if let Some(links) = &live.context().links {
            links.close().await;
        }
        probes_stop.cancel();
        background.close();
        background.wait().await;
        live.probes.tracker.close();
        live.probes.tracker.wait().await;
        tracing::info!("proxy stopped");
        Ok(())
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
