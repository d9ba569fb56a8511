//! Certificates for wasmbed: a dev PKI (rcgen) and the rustls configs that proxy, gateway and
//! loadtest share.
//!
//! - [`pki`]: a dev CA that issues server and device certificates, as PEM.
//! - [`load_certs`], [`load_key`]: read PEM files, with one error naming the file.
//! - [`server_config`], [`client_config`], [`probe_client_config`]: rustls configs, all on one
//!   crypto provider (aws-lc-rs), so no process ever has two.
//! - [`peer_identity`]: the device identity (subject common name) of a certificate;
//!   [`Leaf`]: what a handshake's end reads of its client's certificate, in one parse;
//!   [`device_identity`]: the device it speaks for, a certificate that names none refused.

pub mod pki;
mod remembered;
pub mod ring;
pub mod signal;
pub mod trust;
pub mod udp;

pub use signal::{Fired, Signal, Trigger};
pub use trust::{ClientCheck, Named, Reloadable, Revokes, ServerTrust};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// A certificate problem, naming the file or the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    ClientCa(String),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("no randomness for {0}")]
    Random(&'static str),
    /// A file problem, with the setting that named the file.
    #[error("{setting}: {source}")]
    Setting {
        setting: &'static str,
        source: Box<CertError>,
    },
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl CertError {
    /// Names the setting (flag or config key) a certificate, key or CRL file came from in its
    /// error: `.map_err(CertError::in_setting("--tls-cert"))`.
    pub fn in_setting(setting: &'static str) -> impl Fn(CertError) -> CertError {
        move |e| CertError::Setting {
            setting,
            source: Box::new(e),
        }
    }
}

fn file_error(path: &Path, problem: impl std::fmt::Display) -> CertError {
    CertError::File {
        path: path.to_owned(),
        problem: problem.to_string(),
    }
}

/// The process-wide crypto provider (aws-lc-rs). Every config here is built on it.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    // TLS_AES_128_GCM_SHA256 first (rustls lists AES-256-GCM-SHA384 first): SHA-256 runs on
    // the SHA instructions most CPUs have, SHA-384 does not, and a handshake hashes its whole
    // transcript and derives every key with it. Measured on an AMD EPYC host: about 15% less
    // CPU per full handshake at a terminating proxy. The rest keep rustls' order; servers
    // apply this order over the client's (`ignore_client_order`).
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Reads every CRL of a PEM file (`X509 CRL` blocks); an empty or malformed file is an error.
pub fn load_crls(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, CertError> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
    let crls: Vec<_> = rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, format!("not a PEM CRL: {e}")))?;
    if crls.is_empty() {
        return Err(file_error(path, "no X509 CRL in it"));
    }
    Ok(crls)
}

/// What routes may match in a device certificate: its subject's organizational units and
/// its URI SANs (e.g. `wasmbed://region/eu-west`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertAttributes {
    pub ous: Vec<String>,
    pub uris: Vec<String>,
}

fn attributes_in(parsed: &x509_parser::certificate::X509Certificate<'_>) -> CertAttributes {
    let ous = parsed
        .subject()
        .iter_organizational_unit()
        .filter_map(|a| a.as_str().ok().map(str::to_string))
        .collect();
    let uris = match parsed.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    CertAttributes { ous, uris }
}

/// What a handshake's end reads from its client's leaf certificate, in one parse (the proxy
/// and the gateway read all three of every device). A certificate that does not parse reads
/// as none of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leaf {
    /// What a CRL entry revoking it is matched by ([`revoked_keys`]): its issuer's name (DER,
    /// as the CRL's issuer names it) and its serial number.
    pub revocation_key: Option<Vec<u8>>,
    /// The device it names ([`peer_identity`]).
    pub identity: Option<String>,
    /// What routes may match in it.
    pub attributes: CertAttributes,
}

impl Leaf {
    /// The chain's leaf, read; `None` for no chain (an anonymous client).
    pub fn of(chain: &[CertificateDer<'_>]) -> Option<Leaf> {
        let cert = chain.first()?;
        let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
            return Some(Leaf::default());
        };
        Some(Leaf {
            revocation_key: Some(key_in(&parsed)),
            identity: identity_in(&parsed),
            attributes: attributes_in(&parsed),
        })
    }
}

/// The seconds (Unix time) between which every certificate of a chain is valid: the latest
/// `notBefore` and the earliest `notAfter` of its certificates, so what a verification's
/// answer holds for as time goes. A chain the client verifier remembers as passed is trusted
/// again only inside it, and a link's new sessions are held to its peer's certificate's
/// ([`Validity::of_leaf`]; the proxy's and the gateway's ends of `--upstream link` alike): a
/// connection that lives longer than its peer's certificate carries no new session past it,
/// as a full handshake would refuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// The latest `notBefore`.
    pub from: u64,
    /// The earliest `notAfter`.
    pub until: u64,
}

impl Validity {
    /// The validity of `chain`'s end entity alone: the one certificate every verified path
    /// holds (a peer may send intermediates the path does not use, an expired cross-sign
    /// among them). What a link's sessions are held to.
    pub fn of_leaf(chain: &[CertificateDer<'_>]) -> Option<Validity> {
        Validity::of_parts(chain.first()?, &[])
    }

    /// The validity of a chain, end entity first; `None` for a certificate that cannot be
    /// read.
    pub(crate) fn of_parts(
        end: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Option<Validity> {
        let mut w = Validity {
            from: 0,
            until: u64::MAX,
        };
        for cert in std::iter::once(end).chain(intermediates) {
            let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
            let v = parsed.validity();
            w.from = w.from.max(u64::try_from(v.not_before.timestamp()).ok()?);
            w.until = w.until.min(u64::try_from(v.not_after.timestamp()).ok()?);
        }
        Some(w)
    }

    /// Whether `now` is inside, as webpki reads a validity: from `notBefore` to `notAfter`,
    /// both included.
    pub fn holds(&self, now: UnixTime) -> bool {
        (self.from..=self.until).contains(&now.as_secs())
    }

    /// Whether it holds now (the system's clock, as rustls' verifiers read it).
    pub fn holds_now(&self) -> bool {
        self.holds(UnixTime::now())
    }
}

/// The serial number of a certificate (big-endian bytes), for a CRL entry.
pub fn serial_of(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.raw_serial().to_vec())
}

/// Reads every certificate of a PEM file; an empty or malformed file is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
    certs_from_pem(&bytes).map_err(|p| file_error(path, p))
}

/// Parses every certificate of PEM text.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("malformed PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(certs)
}

/// Reads the private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| file_error(path, format!("no usable private key: {e}")))
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<RootCertStore, CertError> {
    let mut store = RootCertStore::empty();
    for cert in ca {
        store
            .add(cert.clone())
            .map_err(|e| CertError::ClientCa(e.to_string()))?;
    }
    Ok(store)
}

/// A TLS 1.2 + 1.3 server config. With `client_ca`, clients must present a certificate that
/// chains to it.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<&[CertificateDer<'static>]>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, CertError> {
    server_config_with_crls(chain, key, client_ca, Vec::new(), alpn)
}

/// [`server_config`], with device certificates also checked against `crls` (the end entity
/// only; a certificate from a CA no CRL covers is not refused for that).
pub fn server_config_with_crls(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<&[CertificateDer<'static>]>,
    crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, CertError> {
    server_config_checking(chain, key, client_ca, crls, alpn).map(|(config, _)| config)
}

/// As [`server_config_with_crls`], with the client-certificate check the config runs, to run
/// again where a handshake skipped it ([`trust::ClientCheck`]).
pub fn server_config_checking(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<&[CertificateDer<'static>]>,
    crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
    alpn: &[&[u8]],
) -> Result<(Arc<ServerConfig>, trust::ClientCheck), CertError> {
    let clients = client_ca.map(|ca| ClientAuth {
        ca,
        crls,
        optional: false,
    });
    build_server_checking(chain, key, clients, alpn)
}

/// The admin endpoint's HTTPS: client certificates from `client_ca` are asked for but not
/// required (reads need none; a verified one may authorize changes).
pub fn admin_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<&[CertificateDer<'static>]>,
) -> Result<Arc<ServerConfig>, CertError> {
    let clients = client_ca.map(|ca| ClientAuth {
        ca,
        crls: Vec::new(),
        optional: true,
    });
    build_server(chain, key, clients, &[b"http/1.1"])
}

/// How a server checks its clients' certificates.
struct ClientAuth<'a> {
    ca: &'a [CertificateDer<'static>],
    crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
    /// A client may present none (then it is anonymous).
    optional: bool,
}

fn build_server(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    clients: Option<ClientAuth<'_>>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, CertError> {
    build_server_checking(chain, key, clients, alpn).map(|(config, _)| config)
}

fn build_server_checking(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    clients: Option<ClientAuth<'_>>,
    alpn: &[&[u8]],
) -> Result<(Arc<ServerConfig>, trust::ClientCheck), CertError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let mut check = trust::ClientCheck::default();
    let builder = match clients {
        Some(c) => {
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(c.ca)?), provider);
            if !c.crls.is_empty() {
                // CRLs' expiry is not enforced (rustls' default): their answer does not change
                // with the time, which `remembered` relies on (enforcing it would make a chain's
                // window end at the CRLs' nextUpdate too).
                verifier = verifier
                    .with_crls(c.crls)
                    .only_check_end_entity_revocation()
                    .allow_unknown_revocation_status();
            }
            if c.optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| CertError::ClientCa(e.to_string()))?;
            // One verification per chain and trust object, shared by the handshakes and the
            // check after a resumption (`remembered`: why, and what is still checked each time).
            let verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> =
                Arc::new(remembered::Remembering::new(verifier));
            check = trust::ClientCheck::new(verifier.clone());
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key)?;
    // Our cipher order ([`provider`]), not the client's.
    config.ignore_client_order = true;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok((Arc::new(config), check))
}

/// The certificates a set of CRLs revokes, each as its [`Leaf::revocation_key`]: its issuer (the
/// CRL's) and its serial number. Checked at every handshake's end and, for live sessions, at
/// each reload. By issuer too, as the handshake's own check is: serial numbers are unique only
/// within a CA, and a fleet's trust may hold two (a CA rotation), whose serials may meet.
pub fn revoked_keys(
    crls: &[rustls::pki_types::CertificateRevocationListDer<'_>],
) -> std::collections::HashSet<Vec<u8>> {
    crls.iter()
        .filter_map(|c| x509_parser::parse_x509_crl(c.as_ref()).ok())
        .flat_map(|(_, crl)| {
            let issuer = crl.issuer().as_raw();
            crl.iter_revoked_certificates()
                .map(|r| key(issuer, r.raw_serial()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn key_in(parsed: &x509_parser::certificate::X509Certificate<'_>) -> Vec<u8> {
    key(parsed.issuer().as_raw(), parsed.raw_serial())
}

/// The issuer's length (so that no issuer and serial read as another pair), the issuer, the
/// serial.
fn key(issuer: &[u8], serial: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + issuer.len() + serial.len());
    k.extend_from_slice(
        &u32::try_from(issuer.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    k.extend_from_slice(issuer);
    k.extend_from_slice(serial);
    k
}

/// Tells terminating proxies from devices by their CA: a client certificate that chains to
/// the proxies' own CA (`wasmbed gateway --trusted-proxy-ca`) belongs to a proxy.
pub struct ProxyCa {
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl std::fmt::Debug for ProxyCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyCa")
    }
}

impl ProxyCa {
    pub fn new(ca: &[CertificateDer<'static>]) -> Result<ProxyCa, CertError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                .build()
                .map_err(|e| CertError::ClientCa(e.to_string()))?;
        Ok(ProxyCa { verifier })
    }

    /// Whether `chain` (end entity first, as the peer sent it) is a valid certificate from the
    /// proxies' CA now.
    pub fn vouches_for(&self, chain: &[CertificateDer<'_>]) -> bool {
        let Some((end, intermediates)) = chain.split_first() else {
            return false;
        };
        self.verifier
            .verify_client_cert(end, intermediates, UnixTime::now())
            .is_ok()
    }
}

/// A client's store of TLS session tickets that keeps many TLS 1.3 tickets per server (rustls'
/// default keeps 8). A terminating proxy opens one TLS link per session to its gateways; when a
/// gateway dies, hundreds of sessions open links to the others at once, and every link that
/// resumes (a ticket of the fleet's ring, good on any gateway) skips the certificate
/// exchange and both signatures. Each established link brings one ticket, so the store holds
/// about one per live link, up to `per_server`. Everything else is rustls' own cache.
#[derive(Debug)]
pub struct TicketStore {
    inner: rustls::client::ClientSessionMemoryCache,
    tls13: std::sync::Mutex<
        std::collections::HashMap<
            ServerName<'static>,
            std::collections::VecDeque<rustls::client::Tls13ClientSessionValue>,
        >,
    >,
    per_server: usize,
}

impl TicketStore {
    /// A store for up to `servers` server names (rustls' cache allocates room for all of
    /// them at once), keeping `per_server` TLS 1.3 tickets each.
    pub fn new(servers: usize, per_server: usize) -> TicketStore {
        TicketStore {
            inner: rustls::client::ClientSessionMemoryCache::new(servers.max(1)),
            tls13: Default::default(),
            per_server: per_server.max(1),
        }
    }
}

impl rustls::client::ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.inner.set_tls12_session(server_name, value);
    }

    fn tls12_session(
        &self,
        server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        let mut map = self.tls13.lock().unwrap_or_else(|e| e.into_inner());
        let queue = map.entry(server_name).or_default();
        if queue.len() >= self.per_server {
            queue.pop_front();
        }
        queue.push_back(value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        let mut map = self.tls13.lock().unwrap_or_else(|e| e.into_inner());
        // Newest first: the likeliest to be within its lifetime.
        map.get_mut(server_name)?.pop_back()
    }
}

/// A TLS client config trusting `ca`, optionally presenting a client certificate.
pub fn client_config(
    ca: &[CertificateDer<'static>],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, CertError> {
    client_config_with(
        ca,
        identity,
        TicketStore::new(256, UPSTREAM_TICKETS),
        (provider(), rustls::DEFAULT_VERSIONS),
    )
}

/// A device's client config: as [`client_config`], with room for the tickets of the one
/// server a device talks to (a fleet simulator holds one config per device: rustls' default
/// cache would cost it tens of KB each).
pub fn device_client_config(
    ca: &[CertificateDer<'static>],
    identity: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> Result<Arc<ClientConfig>, CertError> {
    device_client_config_tls(ca, identity, false)
}

/// As [`device_client_config`]; with `tls12_only`, a device that speaks TLS 1.2 and nothing
/// newer, as one on mbedTLS 2.28 (its long-term-support branch) does.
pub fn device_client_config_tls(
    ca: &[CertificateDer<'static>],
    identity: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    tls12_only: bool,
) -> Result<Arc<ClientConfig>, CertError> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    client_config_with(
        ca,
        Some(identity),
        TicketStore::new(1, DEVICE_TICKETS),
        (device_provider(), versions),
    )
}

/// A device's crypto: [`provider`] with the key exchanges of an embedded TLS stack (X25519,
/// then P-256; mbedTLS and wolfSSL offer no post-quantum hybrid), so a simulated device's
/// ClientHello is one QUIC Initial datagram, not two, and costs what a device's does.
pub fn device_provider() -> Arc<CryptoProvider> {
    let mut provider = (*provider()).clone();
    provider.kx_groups = vec![
        rustls::crypto::aws_lc_rs::kx_group::X25519,
        rustls::crypto::aws_lc_rs::kx_group::SECP256R1,
    ];
    Arc::new(provider)
}

/// TLS 1.3 tickets a device keeps: enough for the reconnections of one outage.
pub const DEVICE_TICKETS: usize = 4;

fn client_config_with(
    ca: &[CertificateDer<'static>],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    tickets: TicketStore,
    (provider, versions): (
        Arc<CryptoProvider>,
        &[&'static rustls::SupportedProtocolVersion],
    ),
) -> Result<Arc<ClientConfig>, CertError> {
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(roots(ca)?);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.resumption = rustls::client::Resumption::store(Arc::new(tickets));
    Ok(Arc::new(config))
}

/// TLS 1.3 tickets a client keeps per server (see [`TicketStore`]): about one per live link
/// of a proxy at its default `--max-connections`, a few MiB at most.
pub const UPSTREAM_TICKETS: usize = 10_000;

/// A client config for health probes: it completes a handshake with any certificate, because a
/// `tls` probe asks "does the gateway's TLS stack answer", not "who is it". Never use it for
/// data.
pub fn probe_client_config() -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(AnyCertificate(provider.clone()));
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the aws-lc-rs provider supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(config)
}

#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The device a handshake's verified chain speaks for (its [`Leaf`]), the same way on every
/// transport and at both ends (proxy and gateway): no chain is an anonymous client
/// (`Ok(None)`: only where no client CA is set, since one set requires a certificate); a
/// certificate naming a device ([`peer_identity`]) speaks for it; and a certificate its CA
/// signed that names none (no common name and no DNS SAN, say URI SANs only, or one this
/// reader cannot parse although the verifier took it) is refused: without a name to hold its
/// HELLO to, such a device could claim any device's session.
pub fn device_identity(leaf: Option<&Leaf>) -> Result<Option<String>, String> {
    match leaf {
        None => Ok(None),
        Some(leaf) => leaf.identity.clone().map(Some).ok_or_else(|| {
            "the certificate names no device (no common name, no DNS name)".to_string()
        }),
    }
}

/// The identity a certificate names: its subject common name, else its first DNS SAN.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    identity_in(&parsed)
}

fn identity_in(parsed: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    cn.or_else(|| {
        let san = parsed.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
    })
}

#[cfg(test)]
mod tests;
