//! The admin endpoint's transport, shared by the proxy and the gateway; and [`exposition`],
//! the writer of the metrics each writes beside its recorder's.
//!
//! Plain HTTP, or HTTPS (`--admin-tls-cert/--admin-tls-key`). With HTTPS and an admin CA
//! (`--admin-client-ca`) a client *may* present a certificate from that CA; handlers learn
//! whether it did through [`AdminPeer`] (axum's `ConnectInfo`), and the guard lets such a
//! client change things without the bearer token. Reads need neither.
//!
//! TLS handshakes run in tasks of their own, bounded by a timeout, so a client that never
//! finishes one does not hold up the others.

pub mod exposition;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// Bound on an admin client's TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshaken connections waiting for the server to take them.
const QUEUE: usize = 64;

/// Who is on the other end of an admin request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminPeer {
    pub addr: SocketAddr,
    /// The client presented a certificate that the admin CA verified.
    pub client_cert: bool,
}

impl Connected<IncomingStream<'_, TcpListener>> for AdminPeer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        AdminPeer {
            addr: *stream.remote_addr(),
            client_cert: false,
        }
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for AdminPeer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        *stream.remote_addr()
    }
}

/// A listener whose connections arrive with their TLS handshake done.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, AdminPeer)>,
}

impl TlsListener {
    /// Accepts on `listener`, handshakes with `acceptor` in tasks until `stop`.
    pub fn new(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        stop: CancellationToken,
    ) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(QUEUE);
        tokio::spawn(async move {
            loop {
                let (tcp, addr) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::debug!(error = %e, "admin accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = stop.cancelled() => return,
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let tls =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, %addr, "admin TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    let client_cert = tls.get_ref().1.peer_certificates().is_some();
                    let _ = tx.send((tls, AdminPeer { addr, client_cert })).await;
                });
            }
        });
        Ok(TlsListener { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = AdminPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(x) => x,
            // The accepting task ended (stop): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(AdminPeer {
            addr: self.local,
            client_cert: false,
        })
    }
}

/// The acceptor for an admin endpoint configured with `tls` (`None`: plain HTTP). Reads the
/// files now, so that a bad one fails the start.
///
/// `device_cas`: the CA files devices' certificates are checked against here (the gateway's
/// `--client-ca`, terminate mode's `client_ca`): an admin CA that is one of them, or issued by
/// one, is refused, or any device certificate could act as admin.
pub fn acceptor(
    tls: Option<&wasmbed_config::admin::AdminTls>,
    device_cas: &[&std::path::Path],
) -> Result<Option<TlsAcceptor>, wasmbed_certs::CertError> {
    let Some(tls) = tls else {
        return Ok(None);
    };
    let named = wasmbed_certs::CertError::in_setting;
    let chain = wasmbed_certs::load_certs(&tls.cert).map_err(named("--admin-tls-cert"))?;
    let key = wasmbed_certs::load_key(&tls.key).map_err(named("--admin-tls-key"))?;
    let ca = tls
        .client_ca
        .as_deref()
        .map(wasmbed_certs::load_certs)
        .transpose()
        .map_err(named("--admin-client-ca"))?;
    if let Some(admin_ca) = &ca {
        apart_from_devices(tls, admin_ca, device_cas)?;
    }
    let config = wasmbed_certs::admin_server_config(chain, key, ca.as_deref())?;
    Ok(Some(TlsAcceptor::from(config)))
}

/// Refused if the admin endpoint's client CA (`--admin-client-ca`) shares trust with the
/// devices' CA files `device_cas` ([`wasmbed_certs::trust::shares_trust`]): every device
/// certificate could then act as admin. At the start ([`acceptor`]) and at each reload that
/// reads the devices' CA again ([`check_apart`]), since a CA rotated by a reload is as able
/// to issue an admin as the one the process started with.
fn apart_from_devices(
    tls: &wasmbed_config::admin::AdminTls,
    admin_ca: &[tokio_rustls::rustls::pki_types::CertificateDer<'static>],
    device_cas: &[&std::path::Path],
) -> Result<(), wasmbed_certs::CertError> {
    for path in device_cas {
        let devices = wasmbed_certs::load_certs(path)
            .map_err(wasmbed_certs::CertError::in_setting("--client-ca"))?;
        if wasmbed_certs::trust::shares_trust(admin_ca, &devices) {
            return Err(wasmbed_certs::CertError::ClientCa(format!(
                "--admin-client-ca {} is (or is issued by) the devices' CA {}: every device \
                 certificate could then act as admin; give admins a CA of their own \
                 (`wasmbed certs init` writes admin/ca.pem and admin/admin.pem)",
                tls.client_ca.as_deref().unwrap_or(path).display(),
                path.display()
            )));
        }
    }
    Ok(())
}

/// The admin endpoint's client CA (`--admin-client-ca`) as read at the start (empty: none),
/// kept for [`check_apart`] at each reload: the endpoint keeps the CA it started with (a
/// restart-only setting), so that is the one to hold apart, whatever its file holds now.
pub fn admin_client_ca(
    tls: Option<&wasmbed_config::admin::AdminTls>,
) -> Result<Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>, wasmbed_certs::CertError>
{
    match tls.and_then(|t| t.client_ca.as_deref()) {
        Some(path) => wasmbed_certs::load_certs(path)
            .map_err(wasmbed_certs::CertError::in_setting("--admin-client-ca")),
        None => Ok(Vec::new()),
    }
}

/// The check [`acceptor`] makes at the start, for a reload: the admin endpoint's client CA
/// in use (`admin_ca`, as read at the start: [`admin_client_ca`]) against the devices' CA
/// files as the reload reads them. A reload that fails it is refused whole.
pub fn check_apart(
    tls: Option<&wasmbed_config::admin::AdminTls>,
    admin_ca: &[tokio_rustls::rustls::pki_types::CertificateDer<'static>],
    device_cas: &[&std::path::Path],
) -> Result<(), wasmbed_certs::CertError> {
    match tls {
        Some(tls) if !admin_ca.is_empty() => apart_from_devices(tls, admin_ca, device_cas),
        _ => Ok(()),
    }
}

/// Serves `router` on `listener` (HTTPS when `tls` is given) until `stop`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    stop: CancellationToken,
) {
    let result = match tls {
        None => {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<AdminPeer>(),
            )
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        }
        Some(acceptor) => {
            let listener = match TlsListener::new(listener, acceptor, stop.clone()) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "admin endpoint failed");
                    return;
                }
            };
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<AdminPeer>(),
            )
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}

/// Whether `request` may go on under `auth` (see `wasmbed_config::admin`): `None`, or the
/// refusal's status and text. Reads pass; changes need the bearer token, an admin client
/// certificate, or (with neither configured) a loopback admin address; and no change that a
/// web page made a browser send is taken ([`from_a_web_page`]).
pub fn refusal(
    auth: &wasmbed_config::admin::AdminAuth,
    request: &axum::extract::Request,
) -> Option<(u16, &'static str)> {
    if !matches!(request.method().as_str(), "GET" | "HEAD")
        && let Some(why) = from_a_web_page(request, auth.open())
    {
        return Some((403, why));
    }
    let authorization = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    auth.decide_with_cert(
        request.method().as_str(),
        authorization,
        has_client_cert(request),
    )
    .refusal()
}

/// Why a change looks sent by a browser for a web page of another site, which the operator's
/// browser would send with whatever reaches the endpoint (a loopback address open to
/// changes, an admin client certificate the browser presents): `Sec-Fetch-Site` other than
/// `same-origin` or `none`, an `Origin` that is not the endpoint's own, or, where changes are
/// open (loopback, no token), a `Host` that is no loopback name (a page's own name, made to
/// resolve to 127.0.0.1: DNS rebinding). Tools (curl, `wasmbed`, an orchestrator) send none
/// of these headers, or a loopback `Host`.
pub fn from_a_web_page(request: &axum::extract::Request, open: bool) -> Option<&'static str> {
    use axum::http::header::{HOST, ORIGIN};
    let headers = request.headers();
    let site = headers.get("sec-fetch-site").map(|v| v.as_bytes());
    if site.is_some_and(|s| s != b"same-origin" && s != b"none") {
        return Some("refused: a change sent by a web page of another site (Sec-Fetch-Site)\n");
    }
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    if let Some(origin) = headers.get(ORIGIN) {
        let authority = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .map(|(_, a)| a);
        if authority.is_none() || authority != host {
            return Some("refused: a change sent by a web page of another origin (Origin)\n");
        }
    }
    if open && host.is_some_and(|h| !is_loopback_host(h)) {
        return Some(
            "refused: an admin endpoint open to changes (loopback, no token) takes them for a \
             loopback host only (Host: localhost, 127.0.0.1 or [::1]): another name may be a \
             web page's, rebound to this address\n",
        );
    }
    None
}

/// Whether `host` (a `Host` header: a name or address, with or without a port) names this
/// machine's loopback.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or(v6, |(a, _)| a),
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether the request came over TLS with an admin client certificate.
pub fn has_client_cert(request: &axum::extract::Request) -> bool {
    request
        .extensions()
        .get::<axum::extract::ConnectInfo<AdminPeer>>()
        .is_some_and(|c| c.0.client_cert)
}

/// How often histogram samples are folded into their buckets when nobody scrapes.
pub const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds the recorder's histogram samples into their buckets every [`METRICS_UPKEEP`], on a
/// thread of its own. Without it, a process nobody scrapes keeps every sample it recorded
/// (one per call, per checkpoint ...) until the next scrape: memory that only grows.
pub fn keep_metrics_up(handle: metrics_exporter_prometheus::PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(METRICS_UPKEEP);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no metrics upkeep thread: histograms fold only when scraped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmbed_config::admin::AdminAuth;

    fn request(method: &str, headers: &[(&str, &str)]) -> axum::extract::Request {
        let mut r = axum::http::Request::builder()
            .method(method)
            .uri("/api/shutdown");
        for (name, value) in headers {
            r = r.header(*name, *value);
        }
        r.body(axum::body::Body::empty()).unwrap()
    }

    /// A change a web page made a browser send is refused, wherever the endpoint listens and
    /// whatever authorizes changes; tools' requests and reads pass.
    #[test]
    fn a_change_a_web_page_sends_is_refused_and_a_tools_is_not() {
        let loopback = AdminAuth::load(None, Some(([127, 0, 0, 1], 9000).into())).unwrap();
        assert!(loopback.open());
        let host = ("host", "127.0.0.1:9000");
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], bool);
        let cases: &[Case<'_>] = &[
            // Tools: curl, `wasmbed`, an orchestrator.
            ("POST", &[host], true),
            ("POST", &[("host", "localhost:9000")], true),
            ("POST", &[("host", "[::1]:9000")], true),
            ("POST", &[], true),
            // The endpoint's own page, or a browser's address bar.
            ("POST", &[host, ("origin", "http://127.0.0.1:9000")], true),
            ("POST", &[host, ("sec-fetch-site", "same-origin")], true),
            ("POST", &[host, ("sec-fetch-site", "none")], true),
            // Another site's page.
            ("POST", &[host, ("origin", "http://evil.example")], false),
            ("POST", &[host, ("origin", "null")], false),
            ("POST", &[host, ("sec-fetch-site", "cross-site")], false),
            ("POST", &[host, ("sec-fetch-site", "same-site")], false),
            // DNS rebinding: the page's own name, resolved to 127.0.0.1.
            ("POST", &[("host", "evil.example:9000")], false),
            // Reads stay open.
            ("GET", &[host, ("origin", "http://evil.example")], true),
        ];
        for (method, headers, allowed) in cases {
            let refused = refusal(&loopback, &request(method, headers));
            assert_eq!(
                refused.is_none(),
                *allowed,
                "{method} {headers:?}: {refused:?}"
            );
        }
    }

    /// With a token the endpoint may be reached by any name; a cross-site page is refused
    /// still (a browser holding an admin client certificate would present it).
    #[test]
    fn with_a_token_any_host_passes_and_a_web_page_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "0123456789abcdef0123").unwrap();
        let auth = AdminAuth::load(Some(&file), Some(([10, 0, 0, 1], 9000).into())).unwrap();
        let bearer = ("authorization", "Bearer 0123456789abcdef0123");
        let named = ("host", "proxy.internal:9000");
        assert!(refusal(&auth, &request("POST", &[named, bearer])).is_none());
        let page = ("origin", "https://evil.example");
        assert_eq!(
            refusal(&auth, &request("POST", &[named, bearer, page])).map(|r| r.0),
            Some(403)
        );
    }
}
