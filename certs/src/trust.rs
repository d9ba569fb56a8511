//! One reloadable trust object for every server that checks client certificates: the
//! certificate and key it presents, the client CAs it accepts, the CRLs it refuses by, and
//! the certificates those CRLs revoke (by issuer and serial number: `crate::Leaf::revocation_key`).
//!
//! [`ServerTrust::load`] reads and checks the files (nothing is in use yet: a bad file
//! changes nothing); [`Reloadable`] holds what is in use, swapped whole by a reload and read
//! per handshake by every device listener (TLS over TCP, QUIC, raw; a gateway's link endpoint
//! is given the new config at each install), and tells
//! live sessions that a reload happened so each checks its certificate against the new CRLs.
//! The proxy and the gateway both keep their device trust in one of these, so a reload
//! reaches every transport of both processes the same way.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;

use crate::CertError;

/// A file and the setting (flag or config key) that named it, for errors.
#[derive(Debug, Clone, Copy)]
pub struct Named<'a> {
    pub path: &'a Path,
    pub setting: &'static str,
}

impl<'a> Named<'a> {
    pub fn new(path: &'a Path, setting: &'static str) -> Named<'a> {
        Named { path, setting }
    }
}

/// A server's TLS as read from its files: the rustls config (client certificates required
/// when a client CA is given, checked against the CRLs) and the certificates the CRLs revoke (`crate::revoked_keys`).
#[derive(Debug)]
pub struct ServerTrust {
    pub config: Arc<ServerConfig>,
    /// The client-certificate check `config` runs, for sessions resumed without it.
    pub client_check: ClientCheck,
    /// What the CRLs revoke, by [`crate::Leaf::revocation_key`] (issuer and serial number).
    pub revoked: HashSet<Vec<u8>>,
    /// Each client CA's certificates, as read, in the order given (a caller may tell some of
    /// them apart: a gateway's proxies' CA), so no file is read twice.
    pub client_ca: Vec<Vec<CertificateDer<'static>>>,
}

impl ServerTrust {
    /// Reads `cert`, `key`, every client CA and every CRL; each error names its setting.
    /// With no client CA, clients present no certificate (and the CRLs are not used).
    pub fn load(
        cert: Named<'_>,
        key: Named<'_>,
        client_ca: &[Named<'_>],
        crls: (&[PathBuf], &'static str),
    ) -> Result<ServerTrust, CertError> {
        let chain = crate::load_certs(cert.path).map_err(CertError::in_setting(cert.setting))?;
        let key = crate::load_key(key.path).map_err(CertError::in_setting(key.setting))?;
        let mut read = Vec::new();
        for named in client_ca {
            read.push(crate::load_certs(named.path).map_err(CertError::in_setting(named.setting))?);
        }
        let ca: Vec<CertificateDer<'static>> = read.iter().flatten().cloned().collect();
        let mut revocations = Vec::new();
        for path in crls.0 {
            revocations.extend(crate::load_crls(path).map_err(CertError::in_setting(crls.1))?);
        }
        let revoked = crate::revoked_keys(&revocations);
        let clients = (!client_ca.is_empty()).then_some(&ca[..]);
        let (config, client_check) =
            crate::server_config_checking(chain, key, clients, revocations, &[])?;
        Ok(ServerTrust {
            config,
            client_check,
            revoked,
            client_ca: read,
        })
    }
}

/// A server's client-certificate check (chain to the client CA, validity now, the CRLs), to
/// run again where a handshake skipped it: a TLS session resumed from a ticket proves it holds
/// the session, not that the certificate it was made with is still good. A stateless ticket
/// carries the chain and is renewed at each resumption, so without this a device that
/// reconnects often would never have an expired, revoked or no-longer-trusted certificate
/// looked at again. One verification (no signature of the client's): cheaper than the full
/// handshake a resumption saves.
#[derive(Clone, Default)]
pub struct ClientCheck(Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>);

impl std::fmt::Debug for ClientCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ClientCheck(client CA)"
        } else {
            "ClientCheck(none)"
        })
    }
}

impl ClientCheck {
    pub(crate) fn new(verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>) -> Self {
        ClientCheck(Some(verifier))
    }

    /// Whether `chain` (end entity first, as the handshake gave it) passes the check now. A
    /// server without a client CA takes anything; one with a client CA requires a chain.
    pub fn check(&self, chain: &[CertificateDer<'_>]) -> Result<(), String> {
        let Some(verifier) = &self.0 else {
            return Ok(());
        };
        let (end, intermediates) = chain
            .split_first()
            .ok_or_else(|| "no client certificate".to_string())?;
        verifier
            .verify_client_cert(end, intermediates, rustls::pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// What a trust object revokes, for live sessions to check themselves at a reload.
pub trait Revokes {
    /// Whether the certificate with this revocation key (its issuer and serial number:
    /// [`crate::Leaf::revocation_key`]) is revoked.
    fn revokes(&self, key: &[u8]) -> bool;
}

impl Revokes for ServerTrust {
    fn revokes(&self, serial: &[u8]) -> bool {
        self.revoked.contains(serial)
    }
}

/// The trust in use (`None`: no TLS), swapped whole by [`Reloadable::install`] and read per
/// handshake with [`Reloadable::load`]. Each install bumps a generation that live sessions
/// watch ([`Reloadable::subscribe`]) and fires a trigger they may wait on instead
/// ([`Reloadable::installs`]: one persistent wait of 32 bytes, a flag read per poll, where a
/// `watch` wait made at each turn of a session's loop is 136; the proxy's idle sessions count
/// those bytes).
pub struct Reloadable<T> {
    current: ArcSwapOption<T>,
    generation: tokio::sync::watch::Sender<u64>,
    installed: crate::Signal,
}

impl<T> Reloadable<T> {
    pub fn new(trust: Option<T>) -> Reloadable<T> {
        Reloadable {
            current: ArcSwapOption::new(trust.map(Arc::new)),
            generation: tokio::sync::watch::Sender::new(0),
            installed: Default::default(),
        }
    }

    /// What is in use now: read it once per handshake.
    pub fn load(&self) -> Option<Arc<T>> {
        self.current.load_full()
    }

    /// Puts `trust` in use: new handshakes take it at once, live sessions are told.
    pub fn install(&self, trust: Option<T>) {
        self.current.store(trust.map(Arc::new));
        self.generation.send_modify(|n| *n = n.wrapping_add(1));
        // After the trust is in use: a session woken by this reads the new trust.
        self.installed.fire();
    }

    /// Fired at the next install: then take this again, and read the trust.
    pub fn installs(&self) -> crate::Trigger {
        self.installed.trigger()
    }

    /// A receiver that wakes at each later install.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        let mut rx = self.generation.subscribe();
        rx.mark_unchanged();
        rx
    }
}

impl<T: Revokes> Reloadable<T> {
    /// Whether the trust in use revokes the certificate with this revocation key
    /// ([`crate::Leaf::revocation_key`]).
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|t| t.revokes(serial))
    }
}

/// Whether a client CA bundle (`admin`) and another (`devices`) share trust: a certificate
/// in both, one of `admin`'s issued by one of `devices'`, or one of `devices'` issued by one of
/// `admin`'s (an organisation root as the admin CA over the devices' intermediate: a device
/// presenting its intermediate would chain to the admin root). Issuer and subject names are
/// compared (a look-alike name is refused too: the safe side), and a certificate that cannot
/// be parsed counts as shared. Either way a device certificate could act as admin.
pub fn shares_trust(
    admin: &[CertificateDer<'static>],
    devices: &[CertificateDer<'static>],
) -> bool {
    use x509_parser::prelude::*;
    fn parse<'a>(c: &'a CertificateDer<'static>) -> Option<X509Certificate<'a>> {
        parse_x509_certificate(c.as_ref()).ok().map(|(_, c)| c)
    }
    let admins: Vec<Option<X509Certificate<'_>>> = admin.iter().map(parse).collect();
    let devs: Vec<Option<X509Certificate<'_>>> = devices.iter().map(parse).collect();
    if admins.iter().chain(devs.iter()).any(Option::is_none) {
        return true;
    }
    let (admins, devs): (Vec<_>, Vec<_>) = (
        admins.into_iter().flatten().collect(),
        devs.into_iter().flatten().collect(),
    );
    admin
        .iter()
        .any(|a| devices.iter().any(|d| a.as_ref() == d.as_ref()))
        || admins.iter().any(|a| {
            devs.iter()
                .any(|d| a.issuer() == d.subject() || d.issuer() == a.subject())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Set(HashSet<Vec<u8>>);
    impl Revokes for Set {
        fn revokes(&self, serial: &[u8]) -> bool {
            self.0.contains(serial)
        }
    }

    #[test]
    fn an_admin_ca_sharing_trust_with_the_devices_ca_either_way_is_found() {
        use crate::pki::DevCa;
        let root = DevCa::generate("org root").unwrap();
        let devices = root.issue_intermediate("devices").unwrap();
        let admins = DevCa::generate("admins").unwrap();
        let (r, d, a) = (root.cert_der(), devices.cert_der(), admins.cert_der());
        assert!(
            shares_trust(std::slice::from_ref(&d), std::slice::from_ref(&d)),
            "the same CA"
        );
        assert!(
            shares_trust(std::slice::from_ref(&r), std::slice::from_ref(&d)),
            "the admin CA is the root over the devices' intermediate"
        );
        assert!(
            shares_trust(std::slice::from_ref(&d), std::slice::from_ref(&r)),
            "the admin CA is issued by the devices' CA"
        );
        assert!(
            !shares_trust(std::slice::from_ref(&a), &[r, d]),
            "a CA of its own"
        );
        let junk = CertificateDer::from(vec![0u8; 16]);
        assert!(shares_trust(&[junk], &[a]), "unparsable: refused");
    }

    #[test]
    fn an_install_is_seen_by_readers_and_watchers() {
        let trust = Reloadable::new(Some(Set(HashSet::new())));
        let watcher = trust.subscribe();
        assert!(!trust.is_revoked(b"\x01"));
        assert!(!watcher.has_changed().unwrap());
        trust.install(Some(Set([b"\x01".to_vec()].into())));
        assert!(watcher.has_changed().unwrap());
        assert!(trust.is_revoked(b"\x01"));
        trust.install(None);
        assert!(trust.load().is_none());
        assert!(!trust.is_revoked(b"\x01"));
    }
}
