//! The wasmbed gateway: device sessions, each running its application as a WebAssembly
//! instance in wasmtime.
//!
//! The path of one session: accept (TLS with device certificates, or plain TCP behind a
//! terminating proxy) -> hello ([`session`]) -> app call ([`host`]) -> reply. Beside it:
//! [`admin`] (health, metrics, app upload, drain) and [`metrics`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod host;
pub mod link;
pub mod metrics;
pub mod proxy_header;
pub mod session;
pub mod ticket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use wasmbed_config::GatewaySettings;

use crate::host::{AppError, Host, Limits};

/// How long a device may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener: device sessions (--listen) or admin (--admin).
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Certs(#[from] wasmbed_certs::CertError),
    #[error("applications: {0}")]
    Apps(#[from] AppError),
    #[error("--session-keys: {0}")]
    Keys(#[from] ticket::KeyRingError),
    #[error("--link: {0}")]
    Link(String),
}

/// What every session and the admin endpoint share.
pub struct Shared {
    pub settings: GatewaySettings,
    /// The admin endpoint's client CA as read at the start, held apart from the devices' CA
    /// at each TLS reload ([`wasmbed_admin::check_apart`]).
    admin_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub host: Host,
    pub sessions: AtomicUsize,
    pub meters: metrics::Meters,
    /// Cancelled on drain (admin or SIGTERM): sessions get GOAWAY, accepting stops.
    pub draining: CancellationToken,
    /// The fleet's session key ring (`--session-keys`), swapped whole on SIGHUP; the TLS
    /// ticketer reads the same one.
    pub keys: Arc<arc_swap::ArcSwapOption<ticket::KeyRing>>,
    /// The TLS in use (`None`: `--insecure-plaintext`), swapped on SIGHUP, read per
    /// handshake: the same reloadable trust object as the proxy's (`wasmbed_certs::trust`);
    /// live sessions watch it to check their device against new CRLs.
    pub tls: wasmbed_certs::Reloadable<DeviceTls>,
    /// The proxies' link endpoint (`--link`): a TLS reload gives it the new configuration.
    pub link: Option<quinn::Endpoint>,
    /// Cancelled when the gateway has finished with its sessions and stops: `/api/alive`
    /// watches end cleanly then (an abrupt end means the process died).
    pub stopped: CancellationToken,
    /// Open `/api/alive` watches (bounded by [`admin::MAX_ALIVE_WATCHES`]).
    pub alive_watches: AtomicUsize,
    /// Links from proxies open now (`--link`), for `wasmbed_gateway_links_open`.
    pub links: AtomicUsize,
}

impl Shared {
    /// Re-reads the TLS files (certificate, key, CAs, CRLs; on SIGHUP). New handshakes use them
    /// at once; a live session whose device certificate is now revoked gets ERROR `revoked` and
    /// is closed. A bad file keeps what is in use.
    pub fn reload_tls(&self) -> Result<(), GatewayError> {
        let Some(tls) = DeviceTls::load(&self.settings, &self.keys)? else {
            return Ok(());
        };
        // The admin endpoint's CA stays apart from the devices' CA as read again, as at the
        // start (a rotated device CA could otherwise issue admins).
        let device_cas: Vec<&std::path::Path> = self
            .settings
            .tls
            .iter()
            .map(|t| t.client_ca.as_path())
            .collect();
        let admin = self.settings.admin_auth.tls.as_ref();
        wasmbed_admin::check_apart(admin, &self.admin_ca, &device_cas)?;
        let revoked = tls.revoked.len();
        if let Some(endpoint) = &self.link {
            let s = &self.settings;
            endpoint.set_server_config(Some(link::server_config(
                &tls,
                s.max_sessions,
                s.max_frame,
            )?));
        }
        self.tls.install(Some(tls));
        tracing::info!(revoked, "TLS reloaded (certificate, CAs, CRLs)");
        Ok(())
    }

    /// Whether a CRL in use revokes the certificate with this revocation key
    /// ([`wasmbed_certs::Leaf::revocation_key`]).
    pub fn is_revoked(&self, key: &[u8]) -> bool {
        self.tls.is_revoked(key)
    }

    /// Re-reads `--session-keys` (on SIGHUP). A bad file keeps the ring in use.
    pub fn reload_keys(&self) -> Result<(), ticket::KeyRingError> {
        if let Some(path) = &self.settings.session_keys {
            let ring = ticket::KeyRing::load(path)?;
            tracing::info!(keys = ?ring.ids(), "session key ring reloaded");
            self.keys.store(Some(Arc::new(ring)));
        }
        Ok(())
    }
}

/// A gateway whose sockets are bound and applications compiled; [`Gateway::run`] serves.
pub struct Gateway {
    shared: Arc<Shared>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    admin_tls: Option<TlsAcceptor>,
}

/// The gateway's TLS, as read from its files: swapped whole on SIGHUP.
pub struct DeviceTls {
    pub acceptor: TlsAcceptor,
    /// `--trusted-proxy-ca`: client certificates from it belong to terminating proxies.
    pub proxy_ca: Option<wasmbed_certs::ProxyCa>,
    /// What the `--client-crl` files revoke, by [`wasmbed_certs::Leaf::revocation_key`] (issuer and
    /// serial number).
    pub revoked: std::collections::HashSet<Vec<u8>>,
    /// The client-certificate check the handshakes run, for those resumed from a ticket
    /// (which skip it).
    pub client_check: wasmbed_certs::ClientCheck,
}

impl wasmbed_certs::Revokes for DeviceTls {
    fn revokes(&self, key: &[u8]) -> bool {
        self.revoked.contains(key)
    }
}

/// Who a client's verified chain speaks as ([`DeviceTls::speaker`]).
pub(crate) enum Speaker {
    /// A terminating proxy (its name, when its certificate gives one), which states the
    /// devices behind it.
    Proxy(Option<String>),
    /// A device: the device its certificate names (`None`: anonymous, where no client CA is
    /// set), and its certificate's revocation key (issuer and serial, for the live session's
    /// checks at each reload), read once.
    Device {
        identity: Option<String>,
        key: Option<Vec<u8>>,
    },
}

impl DeviceTls {
    /// What a handshake's end makes of its client's chain, the same for devices and proxies
    /// over TCP and for links (`resumed`: the handshake resumed from a TLS ticket, or not
    /// known to be full, as QUIC's): a resumed handshake skipped the certificate's check, so
    /// it runs again on the chain (CA, validity, CRLs); any chain a CRL in use revokes
    /// (perhaps installed during the handshake) is refused, as the handshake would refuse it;
    /// then a proxy's chain speaks for devices, and a device's for the device it names (one
    /// that names none is refused: [`wasmbed_certs::device_identity`]).
    pub(crate) fn speaker(
        &self,
        settings: &GatewaySettings,
        chain: &[CertificateDer<'_>],
        resumed: bool,
    ) -> Result<Speaker, String> {
        if resumed {
            self.client_check.check(chain)?;
        }
        // The leaf read once, for its revocation key and the name it speaks by.
        let leaf = wasmbed_certs::Leaf::of(chain);
        let key = leaf.as_ref().and_then(|l| l.revocation_key.clone());
        if key.as_ref().is_some_and(|k| self.revoked.contains(k)) {
            return Err("certificate revoked".into());
        }
        if self.speaks_for_devices(settings, chain, leaf.as_ref()) {
            return Ok(Speaker::Proxy(leaf.and_then(|l| l.identity)));
        }
        let identity = wasmbed_certs::device_identity(leaf.as_ref())?;
        Ok(Speaker::Device { identity, key })
    }

    /// Whether `chain` (whose leaf reads as `leaf`) is a terminating proxy's, which speaks
    /// for the devices behind it: by its identity (`--proxy-identity`) or its CA
    /// (`--trusted-proxy-ca`).
    fn speaks_for_devices(
        &self,
        settings: &GatewaySettings,
        chain: &[CertificateDer<'_>],
        leaf: Option<&wasmbed_certs::Leaf>,
    ) -> bool {
        let by_ca = self.proxy_ca.as_ref().is_some_and(|p| p.vouches_for(chain));
        let by_name = || {
            let proxies = settings
                .tls
                .as_ref()
                .map_or(&[][..], |t| &t.proxy_identities[..]);
            leaf.and_then(|l| l.identity.as_ref())
                .is_some_and(|id| proxies.contains(id))
        };
        by_ca || by_name()
    }

    /// Reads certificate, key, device CA, proxies' CA and CRLs (`None`: plaintext).
    fn load(
        settings: &GatewaySettings,
        keys: &Arc<arc_swap::ArcSwapOption<ticket::KeyRing>>,
    ) -> Result<Option<DeviceTls>, GatewayError> {
        let Some(t) = &settings.tls else {
            return Ok(None);
        };
        use wasmbed_certs::Named;
        let mut cas = vec![Named::new(&t.client_ca, "--client-ca")];
        if let Some(path) = &t.trusted_proxy_ca {
            // Proxies' certificates must pass the handshake too.
            cas.push(Named::new(path, "--trusted-proxy-ca"));
        }
        let wasmbed_certs::ServerTrust {
            mut config,
            revoked,
            client_ca,
            client_check,
        } = wasmbed_certs::ServerTrust::load(
            Named::new(&t.cert, "--tls-cert"),
            Named::new(&t.key, "--tls-key"),
            &cas,
            (&t.client_crls, "--client-crl"),
        )?;
        // The proxies' CA as read for the handshake (the second client CA), not read again.
        let proxy_ca = match client_ca.get(1) {
            Some(certs) => Some(wasmbed_certs::ProxyCa::new(certs)?),
            None => None,
        };
        if settings.session_keys.is_some() && settings.tls_tickets {
            // TLS tickets under the fleet's ring: a re-homing device resumes its TLS
            // session on any gateway.
            let mut c = (*config).clone();
            c.ticketer = Arc::new(ticket::RingTicketer {
                keys: keys.clone(),
                lifetime: settings.ticket_lifetime.as_secs().min(7 * 24 * 3600) as u32,
                domain: wasmbed_certs::ring::GATEWAY_TLS,
            });
            // Two per handshake: a client that resumes spends one and gains two, so a
            // terminating proxy's store grows to about one ticket per live link, and a
            // failover's burst of new links resumes instead of running full handshakes.
            c.send_tls13_tickets = 2;
            config = Arc::new(c);
        }
        Ok(Some(DeviceTls {
            acceptor: TlsAcceptor::from(config),
            proxy_ca,
            revoked,
            client_check,
        }))
    }
}

impl Gateway {
    pub async fn bind(settings: GatewaySettings) -> Result<Gateway, GatewayError> {
        let host = Host::new(Limits {
            call_timeout: settings.call_timeout,
            max_memory: settings.max_memory,
            max_instances: settings.max_sessions,
            max_frame: settings.max_frame,
            max_state: settings.max_state,
        })?;
        if let Some(dir) = &settings.apps {
            let n = host.load_dir(dir)?;
            tracing::info!(dir = %dir.display(), apps = n, "applications loaded");
        }
        let keys = match &settings.session_keys {
            Some(path) => Some(Arc::new(ticket::KeyRing::load(path)?)),
            None => None,
        };
        let keys = Arc::new(arc_swap::ArcSwapOption::new(keys));
        let tls = DeviceTls::load(&settings, &keys)?;
        let device_cas: Vec<&std::path::Path> =
            settings.tls.iter().map(|t| t.client_ca.as_path()).collect();
        let admin_tls = wasmbed_admin::acceptor(settings.admin_auth.tls.as_ref(), &device_cas)?;
        let admin_ca = wasmbed_admin::admin_client_ca(settings.admin_auth.tls.as_ref())?;
        let bind = |addr: SocketAddr, what: &'static str, link: bool| {
            let error = |source| GatewayError::Bind { what, addr, source };
            let (tcp, udp) = link::bind_pair(addr, link).map_err(error)?;
            Ok::<_, GatewayError>((TcpListener::from_std(tcp).map_err(error)?, udp))
        };
        let (listener, udp) = bind(settings.listen, "device sessions, --listen", settings.link)?;
        let admin = match settings.admin {
            Some(a) => Some(bind(a, "admin, --admin", false)?.0),
            None => None,
        };
        let link = match (udp, &tls) {
            (Some(udp), Some(tls)) => {
                let config = link::server_config(tls, settings.max_sessions, settings.max_frame)?;
                let runtime = quinn::default_runtime()
                    .ok_or_else(|| GatewayError::Link("no async runtime".into()))?;
                let endpoint = quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    Some(config),
                    udp,
                    runtime,
                )
                .map_err(|e| GatewayError::Link(e.to_string()))?;
                Some(endpoint)
            }
            _ => None,
        };
        let shared = Arc::new(Shared {
            admin_ca,
            keys,
            tls: wasmbed_certs::Reloadable::new(tls),
            link,
            settings,
            host,
            sessions: AtomicUsize::new(0),
            meters: metrics::Meters::new(),
            draining: CancellationToken::new(),
            stopped: CancellationToken::new(),
            alive_watches: AtomicUsize::new(0),
            links: AtomicUsize::new(0),
        });
        Ok(Gateway {
            shared,
            listener,
            admin,
            admin_tls,
        })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.shared.settings.listen)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown`: then GOAWAY to every session, no new sessions, and return once
    /// they have closed or the grace period is over.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), GatewayError> {
        let shared = self.shared;
        let admin_stop = CancellationToken::new();
        let background = TaskTracker::new();
        for warning in shared.settings.warnings() {
            tracing::warn!("{warning}");
        }
        if let Some(admin) = self.admin {
            for warning in shared.settings.admin_auth.warnings() {
                tracing::warn!("{warning}");
            }
            background.spawn(wasmbed_admin::serve(
                admin,
                self.admin_tls,
                admin::router(shared.clone()),
                admin_stop.clone(),
            ));
        }
        let sessions = TaskTracker::new();
        let link_stop = CancellationToken::new();
        if let Some(endpoint) = shared.link.clone() {
            tracing::info!(addr = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), "link (QUIC) listening");
            background.spawn(link::serve(
                shared.clone(),
                endpoint,
                sessions.clone(),
                link_stop.clone(),
            ));
        }
        tracing::info!(addr = %self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            name = %shared.settings.name, tls = shared.tls.load().is_some(), "gateway listening");
        loop {
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                _ = shared.draining.cancelled() => break,
                _ = shutdown.cancelled() => break,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            metrics::handle();
            ::metrics::counter!(metrics::SESSIONS_TOTAL).increment(1);
            let span = tracing::info_span!("session", %peer, device_addr = tracing::field::Empty, sni = tracing::field::Empty, proxy = tracing::field::Empty, device = tracing::field::Empty, app = tracing::field::Empty);
            let tls = shared.tls.load();
            sessions.spawn(accept(shared.clone(), (stream, peer), tls).instrument(span));
        }
        drop(self.listener);
        shared.draining.cancel();
        // Drained by an operator: stay up (admin, metrics) until told to stop. Then, as at a
        // stop without a drain, what still runs (a session still answering, a link stream
        // taken while draining, a last checkpoint on its way) has the grace.
        shutdown.cancelled().await;
        sessions.close();
        let grace = shared.settings.grace;
        if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
            tracing::warn!(open = sessions.len(), "grace period over");
        }
        shared.stopped.cancel();
        admin_stop.cancel();
        link_stop.cancel();
        if let Some(endpoint) = &shared.link {
            endpoint.close(quinn::VarInt::from_u32(link::SHUTDOWN), b"gateway stopping");
        }
        background.close();
        background.wait().await;
        Ok(())
    }
}

/// Counts an accepted PROXY header and puts the device's address and SNI in the session's
/// span (TCP and link streams alike).
fn header_accepted(info: &proxy_header::ProxyInfo) {
    ::metrics::counter!(metrics::PROXY_HEADERS, "result" => "accepted").increment(1);
    let span = tracing::Span::current();
    if let Some(src) = info.src {
        span.record("device_addr", tracing::field::display(src));
    }
    if let Some(sni) = &info.sni {
        span.record("sni", sni.as_str());
    }
}

async fn accept(
    shared: Arc<Shared>,
    (mut stream, peer): (TcpStream, SocketAddr),
    tls: Option<Arc<DeviceTls>>,
) {
    let drain = shared.draining.clone();
    // A PROXY header from a front proxy (`--accept-proxy-protocol`): the device's address for
    // the logs, and the identity a terminating proxy verified.
    let mut stated = None;
    if !shared.settings.proxy_protocol_from.is_empty() {
        let allowed = &shared.settings.proxy_protocol_from;
        match proxy_header::read(&mut stream, peer, allowed, HANDSHAKE_TIMEOUT).await {
            Ok(None) => {}
            Ok(Some(info)) => {
                header_accepted(&info);
                stated = info.identity;
            }
            Err(refused) => {
                ::metrics::counter!(metrics::PROXY_HEADERS, "result" => refused.as_str())
                    .increment(1);
                tracing::debug!(reason = refused.as_str(), "PROXY header refused: closed");
                return;
            }
        }
    }
    match tls {
        // Plaintext: only a proxy's header can say who the device is.
        None => session::serve(shared, stream, (stated, None), drain).await,
        Some(device_tls) => {
            let acceptor = &device_tls.acceptor;
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    ::metrics::counter!(metrics::TLS_REJECTED, "reason" => "handshake")
                        .increment(1);
                    // Often a device with a bad certificate; at warn it would let any
                    // client fill the log, so debug, and counted.
                    tracing::debug!(error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    ::metrics::counter!(metrics::TLS_REJECTED, "reason" => "timeout").increment(1);
                    return;
                }
            };
            let conn = tls.get_ref().1;
            let chain = conn.peer_certificates().unwrap_or(&[]);
            let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            // Held to the trust in use now, as a link's proxy is: a reload during the
            // handshake (which a device may stretch to its timeout) may have revoked the
            // certificate, or replaced the CAs its chain was checked against (then checked
            // again, as a resumed one is).
            let now = shared.tls.load();
            let replaced = now.as_ref().is_none_or(|n| !Arc::ptr_eq(n, &device_tls));
            let checking = now.as_deref().unwrap_or(&device_tls);
            let speaker = match checking.speaker(&shared.settings, chain, resumed || replaced) {
                Ok(speaker) => speaker,
                Err(why) => {
                    ::metrics::counter!(metrics::TLS_REJECTED, "reason" => "client_cert")
                        .increment(1);
                    tracing::debug!(
                        why,
                        resumed,
                        "client certificate refused after the handshake"
                    );
                    return;
                }
            };
            let (identity, serial) = match speaker {
                Speaker::Proxy(name) => {
                    // The proxy's statement of the device (PROXY header), when it made one.
                    if let Some(id) = &name {
                        tracing::Span::current().record("proxy", id.as_str());
                    }
                    (stated, None)
                }
                Speaker::Device { identity, key } => (identity, key),
            };
            session::serve(shared, tls, (identity, serial), drain).await;
        }
    }
}

/// Binds and serves until `shutdown` (see [`Gateway`]).
pub async fn run(
    settings: GatewaySettings,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    Gateway::bind(settings).await?.run(shutdown).await
}
