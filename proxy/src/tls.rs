//! One device-trust object for every device listener: TLS over TCP, QUIC and raw listeners
//! all read the same [`DeviceTls`] per handshake, and a reload (SIGHUP, `POST /api/reload`,
//! a config that names other files) rebuilds the TCP and the QUIC server configs together
//! from one read of the files, then swaps them as one. A revoked device is refused by every
//! transport from the reload on (a resumed handshake too: its chain is checked again where
//! it ends), and every anchored session checks itself against the new CRLs (a raw
//! listener's live connections are not cut: docs/proxy.md says so).

pub mod joiner;
mod records;
#[cfg(feature = "model")]
pub use records::model as records_model;
mod unbuffered;
pub(crate) use unbuffered::TlsStream;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use quinn::VarInt;
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use wasmbed_certs::ring::{KeyRing, PROXY_TLS, RingTicketer};
use wasmbed_certs::{Named, Reloadable, Revokes, ServerTrust};
use wasmbed_config::{ProxyConfig, TerminateTls};

use crate::error::ProxyError;

/// The device protocol's ALPN on QUIC (TCP devices may offer it or none).
pub const QUIC_ALPN: &[u8] = b"wasmbed/1";

/// Terminate mode's device trust as read from its files, in use for every transport.
pub struct DeviceTrust {
    /// The files it was read from (a SIGHUP re-reads them).
    settings: TerminateTls,
    /// TLS over TCP (device and raw listeners).
    pub(crate) tcp: Arc<rustls::ServerConfig>,
    /// QUIC devices (`--quic-listen`): the same rustls config with ALPN `wasmbed/1` and no
    /// 0-RTT, with the listener's transport settings.
    pub(crate) quic: Option<Arc<quinn::ServerConfig>>,
    revoked: HashSet<Vec<u8>>,
    /// The device-certificate check the handshakes run, for those that skip it (resumed).
    client_check: wasmbed_certs::ClientCheck,
}

impl Revokes for DeviceTrust {
    fn revokes(&self, key: &[u8]) -> bool {
        self.revoked.contains(key)
    }
}

/// The device trust in use (`None` in passthrough mode), and how to rebuild it.
pub struct DeviceTls {
    pub(crate) trust: Reloadable<DeviceTrust>,
    /// QUIC's transport settings (restart-only): `None` without `--quic-listen`.
    quic: Option<Arc<quinn::TransportConfig>>,
    /// Device handshake slots, TLS over TCP and QUIC together (one process, one count:
    /// they share the cores): `max_handshakes` permits of a fair semaphore (a freed slot
    /// goes to the first device in line, and a newcomer cannot take one while any device
    /// waits), [`DeviceTls::admit_by`].
    slots: Arc<tokio::sync::Semaphore>,
    /// The cap the slots stand for now ([`DeviceTls::set_cap`], at start and each reload),
    /// and the slots still to take out of use as they come back (a cap lowered below the
    /// handshakes in progress).
    cap: AtomicUsize,
    owed: AtomicUsize,
    /// Handshakes in progress and devices in line, and their gauges.
    handshakes: AtomicUsize,
    handshakes_gauge: metrics::Gauge,
    waiting: AtomicUsize,
    waiting_gauge: metrics::Gauge,
    /// The TLS tickets' keys when no ring file is named: this process's own, made once
    /// (rustls' rotating ticketer), so that a reload keeps the tickets devices hold.
    own_tickets: Arc<dyn rustls::server::ProducesTickets>,
}

/// One device handshake admitted: its slot, counted, until dropped.
pub(crate) struct Handshake {
    tls: Arc<DeviceTls>,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.tls.handshakes.fetch_sub(1, Ordering::Relaxed);
        self.tls.handshakes_gauge.decrement(1.0);
        // The slot goes back (to the first device in line, if any), unless the cap was
        // lowered since: then it goes out of use.
        let owed = self
            .tls
            .owed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if let (Ok(_), Some(slot)) = (owed, self.slot.take()) {
            slot.forget();
        }
    }
}

/// A device counted in line until dropped.
struct InLine<'a>(&'a DeviceTls);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
        self.0.waiting_gauge.decrement(1.0);
    }
}

/// Device trust read from files and checked, not yet in use ([`DeviceTls::install`]).
pub(crate) struct Prepared(Option<DeviceTrust>);

/// TLS 1.3 tickets sent to a device after each handshake (rustls sends 2). A device's TLS
/// client spends one on every attempt, also one the proxy refuses: over QUIC the ticket is
/// in the Initial the refusal answers. With 2, a device refused twice in a storm resumed no
/// more, and the full handshakes that followed slowed the line and refused more devices.
/// Each costs the proxy a sealed ticket of about 200 bytes; a device keeps what it can (the
/// SDK's fleet keeps 4: `wasmbed_certs::DEVICE_TICKETS`).
pub(crate) const TICKETS_PER_HANDSHAKE: usize = 4;

impl DeviceTls {
    pub(crate) fn load(config: &ProxyConfig) -> Result<DeviceTls, ProxyError> {
        let tls = DeviceTls {
            trust: Reloadable::new(None),
            quic: config.quic.listen.map(|_| quic_transport(config)),
            slots: Arc::new(tokio::sync::Semaphore::new(0)),
            cap: AtomicUsize::new(0),
            owed: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            handshakes_gauge: metrics::gauge!(crate::metric_names::HANDSHAKES),
            waiting: AtomicUsize::new(0),
            waiting_gauge: metrics::gauge!(crate::metric_names::HANDSHAKES_WAITING),
            own_tickets: rustls::crypto::aws_lc_rs::Ticketer::new()
                .map_err(|e| ProxyError::Reload(format!("TLS ticket keys: {e}")))?,
        };
        if tls.quic.is_some() && of(config).is_none() {
            return Err(ProxyError::Reload(
                "--quic-listen needs terminate mode's TLS".into(),
            ));
        }
        tls.install(tls.prepare(of(config))?);
        tls.set_cap(config.max_handshakes);
        Ok(tls)
    }

    /// Sets the number of handshake slots (`max_handshakes`; at start and at each reload).
    /// Raised: the new slots go to the devices in line at once. Lowered: free slots go out
    /// of use now, the others as their handshakes end.
    pub(crate) fn set_cap(&self, cap: usize) {
        let cap = cap.min(tokio::sync::Semaphore::MAX_PERMITS);
        let old = self.cap.swap(cap, Ordering::Relaxed);
        if cap > old {
            // Slots still owed out of use are kept instead, first.
            let more = cap - old;
            let owed = self
                .owed
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n - n.min(more))
                })
                .unwrap_or(0);
            self.slots.add_permits(more - owed.min(more));
        } else if cap < old {
            // Owed first, so that a handshake ending meanwhile takes its slot out of use
            // rather than giving it back; then the free slots go now and are paid off.
            let fewer = old - cap;
            self.owed.fetch_add(fewer, Ordering::Relaxed);
            let now = self.slots.forget_permits(fewer);
            let owed = self
                .owed
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(now))
                })
                .unwrap_or(0);
            // Handshakes that ended in between paid some of it: those slots come back.
            self.slots.add_permits(now - owed.min(now));
        }
    }

    /// A slot for a device's handshake, TLS over TCP and QUIC alike: at once if one is
    /// free and no device waits, else in line (first come, first served) for up to
    /// `handshake_wait`, within the handshake's `deadline` (counted from the device's
    /// arrival). `None`: refuse the device ([`Refusal::HandshakesBusy`]). Its handshake has
    /// not started, so its wait costs only its connection, and it keeps the attempt it made
    /// (and the TLS ticket in its ClientHello, which a refusal would spend); a line longer
    /// than the devices' patience would finish handshakes for devices that gave up.
    ///
    /// [`Refusal::HandshakesBusy`]: crate::refusal::Refusal::HandshakesBusy
    pub(crate) async fn admit_by(
        self: &Arc<Self>,
        config: &ProxyConfig,
        deadlines: &crate::deadlines::Deadlines,
        deadline: tokio::time::Instant,
    ) -> Option<Handshake> {
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let wait = config
                    .handshake_wait
                    .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
                if wait.is_zero() {
                    return None;
                }
                self.waiting.fetch_add(1, Ordering::Relaxed);
                self.waiting_gauge.increment(1.0);
                let _in_line = InLine(self);
                let slot = deadlines.timeout(wait, self.slots.clone().acquire_owned());
                slot.await.ok()?.ok()?
            }
        };
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        self.handshakes_gauge.increment(1.0);
        Some(Handshake {
            tls: self.clone(),
            slot: Some(slot),
        })
    }

    /// Devices in line for a handshake slot now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Device handshakes in progress now.
    pub(crate) fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Reads and checks the files `settings` names; nothing changes yet.
    pub(crate) fn prepare(&self, settings: Option<TerminateTls>) -> Result<Prepared, ProxyError> {
        let Some(settings) = settings else {
            return Ok(Prepared(None));
        };
        let ca: Vec<Named<'_>> = settings
            .client_ca
            .iter()
            .map(|p| Named::new(p, "tls.client_ca (--client-ca)"))
            .collect();
        let ServerTrust {
            config: mut server,
            revoked,
            client_check,
            ..
        } = ServerTrust::load(
            Named::new(&settings.cert, "tls.cert (--tls-cert)"),
            Named::new(&settings.key, "tls.key (--tls-key)"),
            &ca,
            (&settings.client_crls, "tls.client_crl (--client-crl)"),
        )?;
        let mut config = (*server).clone();
        if settings.resumption {
            // Stateless TLS 1.3 tickets: the session sealed into the ticket the device keeps,
            // so any number of devices resume (rustls' default, a stateful cache of 256
            // sessions, turned a reconnect storm of thousands into full handshakes), and
            // under a shared ring on any replica. Resumption skips the certificate's
            // verification, not its revocation: every session checks its device's serial
            // against the CRLs in use when it starts (the anchor and the upstream paths).
            let inner = match &settings.ticket_keys {
                Some(path) => {
                    let ring = KeyRing::load(path).map_err(|e| {
                        ProxyError::Reload(format!("tls.ticket_keys (--tls-ticket-keys): {e}"))
                    })?;
                    Arc::new(RingTicketer {
                        keys: Arc::new(arc_swap::ArcSwapOption::from_pointee(ring)),
                        lifetime: TICKET_LIFETIME,
                        domain: PROXY_TLS,
                    }) as Arc<dyn rustls::server::ProducesTickets>
                }
                None => self.own_tickets.clone(),
            };
            config.ticketer = Arc::new(CountedTickets::new(inner));
            config.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
        } else {
            // Every handshake a full one: no session cache, no tickets.
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        server = Arc::new(config);
        let quic = match &self.quic {
            Some(transport) => Some(quic_server(&server, transport.clone())?),
            None => None,
        };
        // TLS over TCP runs rustls' unbuffered connection, which does not tell the server
        // name: the resolver notes it (QUIC's config, made above, keeps its own resolver).
        Ok(Prepared(Some(DeviceTrust {
            settings,
            tcp: unbuffered::noting_server_names(server),
            quic,
            revoked,
            client_check,
        })))
    }

    /// Puts prepared trust in use for every transport at once: new handshakes take it;
    /// live sessions check their device against the new CRLs. Returns the number of revoked
    /// serials.
    pub(crate) fn install(&self, prepared: Prepared) -> usize {
        let n = prepared.0.as_ref().map_or(0, |t| t.revoked.len());
        self.trust.install(prepared.0);
        n
    }

    /// Fired when trust is next installed (a reload): then take this again, and check.
    pub(crate) fn installs(&self) -> wasmbed_certs::Trigger {
        self.trust.installs()
    }

    /// Re-reads the certificate, key, device CA and CRLs from the same files. New handshakes
    /// on every transport use them at once; a live session whose device is now revoked gets
    /// ERROR `revoked` and is closed. A bad file keeps everything as it was.
    pub fn reload(&self) -> Result<(), ProxyError> {
        let settings = self.trust.load().map(|t| t.settings.clone());
        let prepared = self.prepare(settings)?;
        let revoked = self.install(prepared);
        tracing::info!(
            revoked,
            "device TLS reloaded (certificate, CA, CRLs) for TCP and QUIC"
        );
        Ok(())
    }

    /// The number of certificates the CRLs in use revoke.
    pub fn revoked_serials(&self) -> usize {
        self.trust.load().map_or(0, |t| t.revoked.len())
    }

    /// Whether the CRLs in use revoke the certificate with this revocation key (its issuer and
    /// serial number: [`wasmbed_certs::Leaf::revocation_key`]).
    pub(crate) fn is_revoked(&self, key: &[u8]) -> bool {
        self.trust.is_revoked(key)
    }

    /// Whether a device's chain passes the certificate check in use now (CA, validity,
    /// CRLs): for a handshake resumed from a ticket, which skipped it.
    pub(crate) fn check_client(
        &self,
        chain: &[rustls::pki_types::CertificateDer<'_>],
    ) -> Result<(), String> {
        match self.trust.load() {
            Some(t) => t.client_check.check(chain),
            None => Err("no device TLS in use".into()),
        }
    }

    /// The TLS-over-TCP server config in use (read once per handshake).
    pub(crate) fn tcp(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.trust.load().map(|t| t.tcp.clone())
    }

    /// The QUIC server config in use (read once per handshake).
    pub(crate) fn quic(&self) -> Option<Arc<quinn::ServerConfig>> {
        self.trust.load().and_then(|t| t.quic.clone())
    }
}

/// The device TLS settings of `config`: terminate mode's only.
pub(crate) fn of(config: &ProxyConfig) -> Option<TerminateTls> {
    match config.mode {
        wasmbed_config::Mode::Terminate => config.tls.clone(),
        wasmbed_config::Mode::Passthrough => None,
    }
}

/// The lifetime hint sent with a device's TLS ticket (rustls' own ticketer's, half a day).
/// rustls does not refuse an older ticket; the process's own keys rotate (and end theirs),
/// a ring's last until removed from the file: what bounds a resumed session is the
/// certificate check it passes again ([`DeviceTls::check_client`]).
const TICKET_LIFETIME: u32 = 12 * 3600;

/// The devices' TLS tickets, counted: issued, and presented by devices (opened, or not: an
/// expired key, another replica's ring, a forgery), for TLS over TCP and QUIC alike. The
/// counters are registered once, not looked up at each handshake.
struct CountedTickets {
    inner: Arc<dyn rustls::server::ProducesTickets>,
    issued: metrics::Counter,
    opened: metrics::Counter,
    refused: metrics::Counter,
}

impl CountedTickets {
    fn new(inner: Arc<dyn rustls::server::ProducesTickets>) -> CountedTickets {
        let counter = |result: &'static str| metrics::counter!(crate::metric_names::TLS_TICKETS, "result" => result);
        CountedTickets {
            inner,
            issued: counter("issued"),
            opened: counter("opened"),
            refused: counter("refused"),
        }
    }
}

impl std::fmt::Debug for CountedTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CountedTickets").field(&self.inner).finish()
    }
}

impl rustls::server::ProducesTickets for CountedTickets {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }

    fn lifetime(&self) -> u32 {
        self.inner.lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let sealed = self.inner.encrypt(plain);
        if sealed.is_some() {
            self.issued.increment(1);
        }
        sealed
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.inner.decrypt(cipher);
        match plain {
            Some(_) => self.opened.increment(1),
            None => self.refused.increment(1),
        }
        plain
    }
}

/// QUIC's server config over the device `server` config.
fn quic_server(
    server: &Arc<rustls::ServerConfig>,
    transport: Arc<quinn::TransportConfig>,
) -> Result<Arc<quinn::ServerConfig>, ProxyError> {
    let mut tls = (**server).clone();
    tls.alpn_protocols = vec![QUIC_ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| ProxyError::Reload(format!("QUIC TLS: {e}")))?;
    let mut quic = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    quic.transport_config(transport);
    quic.migration(true);
    Ok(Arc::new(quic))
}

/// The QUIC listener's transport settings, sized for many small sessions rather than
/// quinn's bulk defaults (a 10 MiB window per connection): a device's frames are at most
/// 64 KiB.
fn quic_transport(config: &ProxyConfig) -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    // Two streams at a time: the session's, and one more that is reset at once and counted
    // (a device that ignores the limit breaks the protocol and loses its connection).
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(2))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(128 << 10))
        .receive_window(VarInt::from_u32(128 << 10))
        .send_window(128 << 10)
        .max_idle_timeout(quinn::IdleTimeout::try_from(config.quic.idle_timeout).ok())
        // One datagram per send: a connection's send buffer then stays one datagram large
        // (with segmentation offload it grows to ten and is kept). Devices send little.
        .enable_segmentation_offload(false)
        // No unreliable datagrams: nothing uses them, so no buffer is reserved for them.
        .datagram_receive_buffer_size(None)
        // No path MTU discovery: a device's frames are small, so QUIC's 1,200-byte minimum
        // datagram costs them nothing, and each connection's send buffer stays that size
        // (a probe grows it to 2,400 bytes and it is kept: measured with heaptrack), and no
        // probe datagrams are sent.
        .mtu_discovery_config(None);
    Arc::new(transport)
}

pub(crate) type TlsSetup = (Arc<DeviceTls>, Option<Arc<rustls::ClientConfig>>);

/// The TLS client settings towards gateways over TCP (terminate mode with `[upstream_tls]`):
/// [`upstream_client_config`], its secrets handed over after the handshake so that the
/// records are the proxy's own (`TlsStream::shed_handshake`). Its ticket store is its own (the
/// links build theirs: a QUIC ticket carries QUIC's parameters), made again at a reload.
pub(crate) fn connector(
    config: &ProxyConfig,
) -> Result<Option<Arc<rustls::ClientConfig>>, ProxyError> {
    Ok(upstream_client_config(config)?.map(|client| {
        let mut client = (*client).clone();
        client.enable_secret_extraction = true;
        Arc::new(client)
    }))
}

/// The TLS client settings towards gateways (`[upstream_tls]`), for TCP and for links.
pub(crate) fn upstream_client_config(
    config: &ProxyConfig,
) -> Result<Option<Arc<rustls::ClientConfig>>, ProxyError> {
    let Some(up) = &config.upstream_tls else {
        return Ok(None);
    };
    let ca = wasmbed_certs::load_certs(&up.ca)
        .map_err(wasmbed_certs::CertError::in_setting("upstream_tls.ca"))?;
    let client = match &up.client {
        Some((cert, key)) => Some((
            wasmbed_certs::load_certs(cert)
                .map_err(wasmbed_certs::CertError::in_setting("upstream_tls.cert"))?,
            wasmbed_certs::load_key(key)
                .map_err(wasmbed_certs::CertError::in_setting("upstream_tls.key"))?,
        )),
        None => None,
    };
    Ok(Some(wasmbed_certs::client_config(&ca, client)?))
}

/// The connection to a gateway in terminate mode: plain TCP, or TLS (`[upstream_tls]`).
pub(crate) trait Upstream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Upstream for T {}

/// Whether an I/O error is rustls' (an alert, a certificate problem).
pub(crate) fn is_tls_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
}

/// The name a gateway's certificate is checked against: `[upstream_tls] server_name`, or
/// the host of its address.
pub(crate) fn upstream_name(config: &ProxyConfig, addr: &str) -> ServerName<'static> {
    let configured = config
        .upstream_tls
        .as_ref()
        .and_then(|u| u.server_name.clone());
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    ServerName::try_from(configured.unwrap_or(host))
        .unwrap_or_else(|_| ServerName::try_from("gateway").expect("static valid name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The handshake slots follow the cap through reloads: lowered below the handshakes in
    /// progress, the slots leave as those end; raised while some are still owed, the debt
    /// is paid first; never more slots than the cap, none lost.
    #[tokio::test]
    async fn the_slots_follow_the_cap_through_reloads() {
        let config = ProxyConfig::from_toml("[[gateway]]\naddr = \"127.0.0.1:1\"").unwrap();
        let tls = Arc::new(DeviceTls::load(&config).unwrap());
        let mut at_once = config.clone();
        at_once.handshake_wait = std::time::Duration::ZERO;
        let now = || tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let admit = || async { tls.admit_by(&at_once, &Default::default(), now()).await };
        // How many handshakes may start now, counted by starting them (and ending them).
        let free = || async {
            let mut started = Vec::new();
            while let Some(h) = admit().await {
                started.push(h);
            }
            started.len()
        };
        tls.set_cap(2);
        let (a, b) = (admit().await.unwrap(), admit().await.unwrap());
        assert_eq!(free().await, 0, "two in progress at a cap of 2");
        // Lowered to 1 with two in progress: the first to end leaves, the next stays.
        tls.set_cap(1);
        drop(a);
        assert_eq!(free().await, 0, "one in progress at a cap of 1");
        drop(b);
        assert_eq!(free().await, 1);
        // Lowered to 0 with three in progress (cap 3), raised to 2 while two are owed.
        tls.set_cap(3);
        let held: Vec<_> = [admit().await, admit().await, admit().await]
            .into_iter()
            .map(Option::unwrap)
            .collect();
        tls.set_cap(0);
        tls.set_cap(2);
        drop(held);
        assert_eq!(free().await, 2, "the cap, no more, no fewer");
        assert_eq!(tls.handshakes(), 0);
    }
}
