//! A client-certificate verifier that remembers the chains it has passed, so that a device's
//! chain is checked once per trust object rather than at every handshake.
//!
//! Why: a terminating proxy checks a device's chain at its full handshake and again at every
//! resumption ([`crate::ClientCheck`]), and that check is a signature verification (the CA's
//! over the device's certificate): measured at about a tenth of the proxy's CPU in a
//! 9,000-device reconnect storm (docs/performance.md). The answer depends on nothing but the
//! chain, the verifier's roots and CRLs, and the time: so a chain that passed is remembered
//! with the window in which every one of its certificates is valid, and passes again without
//! a verification while the time is inside that window. What it does not skip: the proof that
//! the client holds the certificate's key (the handshake's signature, verified every time) and
//! the check of the CRLs in use ([`crate::Revokes`], run per session by the proxy). A new
//! trust object (a reload: another CA, other CRLs) starts with nothing remembered. Failures
//! are never remembered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::Validity;

/// At most this many chains are remembered: about 96 bytes each in the map (a 32-byte key, a
/// 16-byte window, the table's spare room), 12 MiB at most. Past it, all are forgotten at once
/// (a new map): a scan for expired ones at each insert would let anyone who copies one valid
/// device certificate and appends made-up intermediates (each a new chain that passes, since
/// webpki does not use them) stall every handshake on the lock, where a clear costs them
/// only what a verification costs.
const MOST: usize = 1 << 17;

/// The chain's digest: SHA-256 over each certificate's length and bytes, end entity first.
fn digest(end: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for cert in std::iter::once(end).chain(intermediates) {
        ctx.update(&(cert.len() as u64).to_be_bytes());
        ctx.update(cert.as_ref());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// `inner`, remembering the chains it passed (see the module's text).
#[derive(Debug)]
pub(crate) struct Remembering {
    inner: Arc<dyn ClientCertVerifier>,
    passed: Mutex<HashMap<[u8; 32], Validity>>,
    /// How many chains it remembers at most ([`MOST`]).
    room: usize,
    /// Chains given to `inner` to verify.
    #[cfg(test)]
    verified: std::sync::atomic::AtomicUsize,
}

impl Remembering {
    pub(crate) fn new(inner: Arc<dyn ClientCertVerifier>) -> Remembering {
        Remembering {
            inner,
            passed: Mutex::default(),
            room: MOST,
            #[cfg(test)]
            verified: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn passed(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Validity>> {
        // The map holds no invariant a panic could break halfway.
        self.passed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, key: [u8; 32], window: Validity) {
        let mut passed = self.passed();
        if passed.len() >= self.room {
            *passed = HashMap::new();
        }
        passed.insert(key, window);
    }
}

impl ClientCertVerifier for Remembering {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let key = digest(end_entity, intermediates);
        let known = self.passed().get(&key).copied();
        if known.is_some_and(|w| w.holds(now)) {
            return Ok(ClientCertVerified::assertion());
        }
        #[cfg(test)]
        self.verified
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(window) = Validity::of_parts(end_entity, intermediates) {
            self.remember(key, window);
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{DevCa, KeyKind};
    use std::sync::atomic::Ordering;
    use std::time::{Duration, SystemTime};

    /// A remembering verifier over `ca`'s real one.
    fn remembering(ca: &DevCa) -> Remembering {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der()).expect("the CA is a root");
        let real = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            crate::provider(),
        )
        .build()
        .expect("a verifier");
        Remembering::new(real)
    }

    fn at(t: SystemTime) -> UnixTime {
        UnixTime::since_unix_epoch(
            t.duration_since(SystemTime::UNIX_EPOCH)
                .expect("after 1970"),
        )
    }

    #[test]
    fn a_chain_that_passed_passes_again_without_a_verification_while_valid() {
        let ca = DevCa::generate("ca").expect("a CA");
        let v = remembering(&ca);
        // Whole seconds, as certificates carry them.
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        let device = ca
            .issue_client_between(
                "dev-1",
                now - Duration::from_secs(60),
                now + Duration::from_secs(3600),
            )
            .expect("a device certificate")
            .chain();
        let other = ca
            .issue_client("dev-2", KeyKind::EcdsaP256)
            .expect("a device certificate")
            .chain();
        let asked = || v.verified.load(Ordering::Relaxed);
        v.verify_client_cert(&device[0], &device[1..], at(now))
            .expect("a valid chain passes");
        assert_eq!(asked(), 1);
        v.verify_client_cert(&device[0], &device[1..], at(now + Duration::from_secs(60)))
            .expect("and passes again");
        assert_eq!(asked(), 1, "a chain that passed is not verified again");
        v.verify_client_cert(&other[0], &other[1..], at(now))
            .expect("another chain passes");
        assert_eq!(asked(), 2, "another chain is verified");
        // At its notAfter it still passes (webpki's bounds are inclusive); a second later, and
        // before its notBefore, it is verified (and fails) as the first time.
        let last = at(now + Duration::from_secs(3600));
        v.verify_client_cert(&device[0], &device[1..], last)
            .expect("valid through its notAfter");
        assert_eq!(asked(), 2, "not verified again at its notAfter");
        let late = at(now + Duration::from_secs(3601));
        assert!(
            v.verify_client_cert(&device[0], &device[1..], late)
                .is_err()
        );
        assert_eq!(asked(), 3, "an expired chain is verified again");
        let early = at(now - Duration::from_secs(3600));
        assert!(
            v.verify_client_cert(&device[0], &device[1..], early)
                .is_err()
        );
        assert_eq!(asked(), 4, "a chain not yet valid is verified again");
    }

    #[test]
    fn the_same_certificate_with_other_intermediates_is_another_chain() {
        let ca = DevCa::generate("ca").expect("a CA");
        let v = remembering(&ca);
        let device = ca
            .issue_client("dev-1", KeyKind::EcdsaP256)
            .expect("a device certificate")
            .chain();
        let now = at(SystemTime::now());
        v.verify_client_cert(&device[0], &[], now)
            .expect("a valid chain passes");
        // An extra certificate the path does not need: the chain still passes, but it is not
        // the one remembered.
        v.verify_client_cert(&device[0], &[ca.cert_der()], now)
            .expect("with an unused intermediate too");
        assert_eq!(v.verified.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn past_its_room_it_forgets_everything_at_once() {
        let ca = DevCa::generate("ca").expect("a CA");
        let mut v = remembering(&ca);
        v.room = 2;
        let now = at(SystemTime::now());
        let chains: Vec<_> = (0..3)
            .map(|i| {
                ca.issue_client(&format!("dev-{i}"), KeyKind::EcdsaP256)
                    .expect("a device certificate")
                    .chain()
            })
            .collect();
        for c in &chains {
            v.verify_client_cert(&c[0], &c[1..], now).expect("passes");
        }
        assert_eq!(v.verified.load(Ordering::Relaxed), 3);
        assert_eq!(
            v.passed().len(),
            1,
            "the third found the map full and cleared it"
        );
        for c in &chains[..2] {
            v.verify_client_cert(&c[0], &c[1..], now).expect("passes");
        }
        assert_eq!(
            v.verified.load(Ordering::Relaxed),
            5,
            "the first two were forgotten"
        );
    }

    #[test]
    fn a_chain_that_failed_is_verified_every_time() {
        let ca = DevCa::generate("ca").expect("a CA");
        let stranger = DevCa::generate("another ca").expect("a CA");
        let v = remembering(&ca);
        let foreign = stranger
            .issue_client("dev-1", KeyKind::EcdsaP256)
            .expect("a device certificate")
            .chain();
        let now = at(SystemTime::now());
        for round in 1..=2 {
            assert!(
                v.verify_client_cert(&foreign[0], &foreign[1..], now)
                    .is_err()
            );
            assert_eq!(v.verified.load(Ordering::Relaxed), round);
        }
    }
}
