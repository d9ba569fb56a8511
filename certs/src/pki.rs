//! A dev PKI: one CA that issues server certificates (proxy, gateways) and device client
//! certificates. Keys are ECDSA P-256 unless asked for RSA.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::CertError;

/// The kind of key a certificate is issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyKind {
    #[default]
    EcdsaP256,
    Rsa2048,
}

/// A certificate and its key, as PEM and as rustls types.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        crate::certs_from_pem(self.cert_pem.as_bytes()).unwrap_or_default()
    }

    pub fn key(&self) -> Result<PrivateKeyDer<'static>, CertError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| CertError::ClientCa(format!("issued key: {e}")))
    }
}

/// A certificate authority that signs dev certificates.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

fn key_pair(kind: KeyKind) -> Result<KeyPair, CertError> {
    Ok(match kind {
        KeyKind::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        KeyKind::Rsa2048 => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)?
        }
    })
}

fn named(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "wasmbed dev");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A server certificate's parameters: `names` (DNS names or IP addresses) as its SANs, the
/// first as its common name.
fn server_params(names: &[&str]) -> Result<CertificateParams, CertError> {
    let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name = named(names.first().copied().unwrap_or("server"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok(params)
}

impl DevCa {
    /// A new self-signed CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<DevCa, CertError> {
        DevCa::new_ca(common_name, |params, key| params.self_signed(key))
    }

    /// A CA named `common_name`, its certificate made by `sign` (self-signed, or by an issuer).
    fn new_ca(
        common_name: &str,
        sign: impl FnOnce(&CertificateParams, &KeyPair) -> Result<rcgen::Certificate, rcgen::Error>,
    ) -> Result<DevCa, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = named(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = key_pair(KeyKind::EcdsaP256)?;
        let key_pem = key.serialize_pem();
        let cert_pem = sign(&params, &key)?.pem();
        Ok(DevCa {
            issuer: Issuer::new(params, key),
            cert_pem,
            key_pem,
        })
    }

    /// An intermediate CA named `common_name`, issued by this one (an organisation's root over
    /// the devices' CA, as some deployments have it).
    pub fn issue_intermediate(&self, common_name: &str) -> Result<DevCa, CertError> {
        DevCa::new_ca(common_name, |params, key| {
            params.signed_by(key, &self.issuer)
        })
    }

    /// A CA from its PEM certificate and key (as `wasmbed certs init` writes them).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<DevCa, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(DevCa {
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        crate::certs_from_pem(self.cert_pem.as_bytes())
            .ok()
            .and_then(|mut c| c.pop())
            .unwrap_or_else(|| CertificateDer::from(Vec::new()))
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn issue_server(&self, names: &[&str], kind: KeyKind) -> Result<Issued, CertError> {
        self.sign(server_params(names)?, kind)
    }

    /// A server certificate for `names` valid only between `not_before` and `not_after` (for
    /// tests of a certificate that runs out while a connection made with it lives).
    pub fn issue_server_between(
        &self,
        names: &[&str],
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Result<Issued, CertError> {
        let mut params = server_params(names)?;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        self.sign(params, KeyKind::EcdsaP256)
    }

    /// A device client certificate whose subject common name is `device_id`.
    pub fn issue_client(&self, device_id: &str, kind: KeyKind) -> Result<Issued, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = named(device_id);
        params.subject_alt_names = vec![SanType::DnsName(device_id.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, kind)
    }

    /// A device certificate with the serial number `serial` (for tests of two CAs whose
    /// serials meet, as a CA rotation's may).
    pub fn issue_client_numbered(&self, device_id: &str, serial: u64) -> Result<Issued, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = named(device_id);
        params.subject_alt_names = vec![SanType::DnsName(device_id.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        self.sign(params, KeyKind::EcdsaP256)
    }

    /// A client certificate that names no device: an empty subject and only URI SANs (as a
    /// SPIFFE-style identity has), for tests that such a certificate, though its CA signed it,
    /// speaks for no device.
    pub fn issue_client_unnamed(&self, uris: &[&str]) -> Result<Issued, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = uris
            .iter()
            .map(|u| Ok(SanType::URI((*u).try_into()?)))
            .collect::<Result<_, CertError>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, KeyKind::EcdsaP256)
    }

    /// A device certificate with routing attributes: organizational units in its subject and
    /// URI SANs (e.g. `wasmbed://region/eu-west`).
    pub fn issue_client_with(
        &self,
        device_id: &str,
        ous: &[&str],
        uris: &[&str],
    ) -> Result<Issued, CertError> {
        let mut params = CertificateParams::default();
        let mut dn = named(device_id);
        for ou in ous {
            dn.push(DnType::OrganizationalUnitName, *ou);
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(device_id.try_into()?)];
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into()?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, KeyKind::EcdsaP256)
    }

    /// A device certificate valid only between `not_before` and `not_after` (for tests of
    /// expired and not-yet-valid certificates).
    pub fn issue_client_between(
        &self,
        device_id: &str,
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Result<Issued, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = named(device_id);
        params.subject_alt_names = vec![SanType::DnsName(device_id.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        self.sign(params, KeyKind::EcdsaP256)
    }

    /// A CRL (PEM) revoking the certificates of `serials` (as [`crate::serial_of`] gives them),
    /// numbered `number`, valid for `valid_for` from now.
    pub fn crl(
        &self,
        serials: &[Vec<u8>],
        number: u64,
        valid_for: std::time::Duration,
    ) -> Result<String, CertError> {
        let now = time::OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + valid_for,
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(s),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    fn sign(&self, params: CertificateParams, kind: KeyKind) -> Result<Issued, CertError> {
        let key = key_pair(kind)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
