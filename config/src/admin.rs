//! Who may change things through an admin endpoint (proxy and gateway alike).
//!
//! Read-only requests (GET, HEAD) are always allowed: health, readiness, metrics, lists.
//! A mutating request (POST, PUT, DELETE, anything else) needs `Authorization: Bearer TOKEN`
//! with the token of `--admin-token-file` (compared in constant time). With no token
//! configured, mutation is allowed only when the admin endpoint listens on a loopback address
//! (anyone who can reach it is on this host), and refused otherwise.

use std::net::SocketAddr;
use std::path::Path;

use subtle::ConstantTimeEq;

use crate::ConfigError;

/// Shortest token accepted from a token file.
pub const MIN_TOKEN: usize = 16;

/// What an admin endpoint requires of a mutating request.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminAuth {
    token: Option<Vec<u8>>,
    loopback: bool,
    /// The token file can be read by other users than its owner (group or others).
    token_file_shared: bool,
    /// HTTPS on the admin endpoint (and, with `client_ca`, admin client certificates).
    pub tls: Option<AdminTls>,
}

/// The admin endpoint's TLS: `--admin-tls-cert`, `--admin-tls-key`, `--admin-client-ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// A client certificate from this CA may change things without the token.
    pub client_ca: Option<std::path::PathBuf>,
}

/// The admin endpoint's TLS flags (the same on the proxy and the gateway).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AdminTlsFlags {
    /// Serve the admin endpoint over HTTPS with this certificate chain (PEM); with --admin-tls-key.
    #[arg(long, value_name = "FILE")]
    pub admin_tls_cert: Option<std::path::PathBuf>,
    /// The key of --admin-tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub admin_tls_key: Option<std::path::PathBuf>,
    /// With --admin-tls-cert: a client certificate from this CA (PEM) may make changes
    /// (POST/PUT/DELETE) without the bearer token. Reads need no certificate. Never the
    /// devices' CA (refused at start and at a reload): `certs init` writes admin/ca.pem for it.
    #[arg(long, value_name = "FILE")]
    pub admin_client_ca: Option<std::path::PathBuf>,
}

impl AdminTlsFlags {
    /// The validated setting (`None`: plain HTTP).
    pub fn resolve(&self) -> Result<Option<AdminTls>, ConfigError> {
        match (
            &self.admin_tls_cert,
            &self.admin_tls_key,
            &self.admin_client_ca,
        ) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), ca) => Ok(Some(AdminTls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
            })),
            (None, None, Some(_)) => Err(ConfigError::field(
                "admin_client_ca",
                "needs --admin-tls-cert and --admin-tls-key (client certificates need HTTPS)",
            )),
            _ => Err(ConfigError::field(
                "admin_tls_cert",
                "--admin-tls-cert and --admin-tls-key go together",
            )),
        }
    }
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("loopback", &self.loopback)
            .finish()
    }
}

/// The answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// 401: a mutating request without a bearer token.
    Unauthorized,
    /// 403: a wrong token, or mutation with no token configured on a non-loopback address.
    Forbidden,
}

impl Decision {
    /// For a refusal: the HTTP status and the text to answer with.
    pub fn refusal(self) -> Option<(u16, &'static str)> {
        match self {
            Decision::Allow => None,
            Decision::Unauthorized => Some((
                401,
                "this request changes the service: send Authorization: Bearer <admin token>\n",
            )),
            Decision::Forbidden => Some((
                403,
                "refused: wrong token, or no admin token configured on a non-loopback address\n",
            )),
        }
    }
}

impl AdminAuth {
    /// `token_file`: `--admin-token-file` (its contents, trimmed, at least 16 characters).
    pub fn load(
        token_file: Option<&Path>,
        admin: Option<SocketAddr>,
    ) -> Result<AdminAuth, ConfigError> {
        let mut token_file_shared = false;
        let token = match token_file {
            None => None,
            Some(path) => {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    token_file_shared =
                        std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0);
                }
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::field("admin_token_file", format!("{}: {e}", path.display()))
                })?;
                let t = text.trim();
                if t.len() < MIN_TOKEN || t.chars().any(char::is_whitespace) {
                    return Err(ConfigError::field(
                        "admin_token_file",
                        format!(
                            "{}: the token must be at least {MIN_TOKEN} characters with no spaces",
                            path.display()
                        ),
                    ));
                }
                Some(t.as_bytes().to_vec())
            }
        };
        Ok(AdminAuth {
            token,
            loopback: admin.is_none_or(|a| a.ip().is_loopback()),
            token_file_shared,
            tls: None,
        })
    }

    /// Mutation is open to anyone who reaches the endpoint (no token, loopback).
    /// [`AdminAuth::load`], with the admin endpoint's TLS (`tls`, validated).
    pub fn load_with_tls(
        token_file: Option<&Path>,
        admin: Option<SocketAddr>,
        tls: AdminTlsFlags,
    ) -> Result<AdminAuth, ConfigError> {
        let mut auth = AdminAuth::load(token_file, admin)?;
        auth.tls = tls.resolve()?;
        Ok(auth)
    }

    /// What is risky about this setting, to log at start: a token file other users can read,
    /// a token that would cross the network in clear (plain HTTP off loopback), an endpoint
    /// off loopback that nobody may change.
    pub fn warnings(&self) -> Vec<&'static str> {
        let mut w = Vec::new();
        if self.token_file_shared {
            w.push("the admin token file can be read by other users: make it 0600 (or 0400)");
        }
        if self.token.is_some() && !self.loopback && self.tls.is_none() {
            w.push(
                "the admin endpoint is off loopback over plain HTTP: the bearer token crosses \
                 the network in clear (serve it over HTTPS with --admin-tls-cert/--admin-tls-key)",
            );
        }
        if self.locked_out() {
            w.push(
                "the admin endpoint is not on a loopback address and no --admin-token-file \
                 (or --admin-client-ca) is set: changes on it are refused (GETs stay open)",
            );
        }
        w
    }

    pub fn open(&self) -> bool {
        self.token.is_none() && self.loopback
    }

    /// Mutation is refused to everyone (no token, not loopback): worth a warning at start.
    pub fn locked_out(&self) -> bool {
        self.token.is_none() && !self.loopback && !self.client_certs()
    }

    /// Admin client certificates can authorize changes (HTTPS with an admin CA).
    pub fn client_certs(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.client_ca.is_some())
    }

    /// [`AdminAuth::decide`], for a client that may have presented an admin certificate
    /// (verified by the admin CA during the TLS handshake).
    pub fn decide_with_cert(
        &self,
        method: &str,
        authorization: Option<&[u8]>,
        client_cert: bool,
    ) -> Decision {
        if client_cert && self.client_certs() {
            return Decision::Allow;
        }
        self.decide(method, authorization)
    }

    pub fn decide(&self, method: &str, authorization: Option<&[u8]>) -> Decision {
        if matches!(method, "GET" | "HEAD") {
            return Decision::Allow;
        }
        let Some(token) = &self.token else {
            return if self.loopback {
                Decision::Allow
            } else {
                Decision::Forbidden
            };
        };
        let Some(given) = authorization.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return Decision::Unauthorized;
        };
        if bool::from(given.ct_eq(token)) {
            Decision::Allow
        } else {
            Decision::Forbidden
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_open_and_writes_need_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "0123456789abcdef-secret\n").unwrap();
        let lo: SocketAddr = "127.0.0.1:9900".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:9900".parse().unwrap();
        let with = AdminAuth::load(Some(&file), Some(any)).unwrap();
        assert_eq!(with.decide("GET", None), Decision::Allow);
        assert_eq!(with.decide("POST", None), Decision::Unauthorized);
        assert_eq!(
            with.decide("POST", Some(b"Bearer nope")),
            Decision::Forbidden
        );
        assert_eq!(
            with.decide("POST", Some(b"Basic 0123456789abcdef-secret")),
            Decision::Unauthorized
        );
        assert_eq!(
            with.decide("DELETE", Some(b"Bearer 0123456789abcdef-secret")),
            Decision::Allow
        );
        let open = AdminAuth::load(None, Some(lo)).unwrap();
        assert!(open.open());
        assert_eq!(open.decide("PUT", None), Decision::Allow);
        let exposed = AdminAuth::load(None, Some(any)).unwrap();
        assert!(exposed.locked_out());
        assert_eq!(
            exposed.decide("POST", Some(b"Bearer x")),
            Decision::Forbidden
        );
        assert_eq!(exposed.decide("GET", None), Decision::Allow);
        std::fs::write(&file, "short").unwrap();
        let e = AdminAuth::load(Some(&file), Some(lo))
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin_token_file") && e.contains("16"), "{e}");
        let e = AdminAuth::load(Some(&dir.path().join("none")), Some(lo))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none"), "{e}");
    }

    #[test]
    fn risky_settings_are_named_for_the_start_up_log() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "0123456789abcdef-secret\n").unwrap();
        let lo: SocketAddr = "127.0.0.1:9900".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:9900".parse().unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(
            AdminAuth::load(Some(&file), Some(lo))
                .unwrap()
                .warnings()
                .is_empty()
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let w = AdminAuth::load(Some(&file), Some(lo)).unwrap().warnings();
        assert!(w.iter().any(|w| w.contains("other users")), "{w:?}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let w = AdminAuth::load(Some(&file), Some(any)).unwrap().warnings();
        assert!(w.iter().any(|w| w.contains("in clear")), "{w:?}");
        let mut https = AdminAuth::load(Some(&file), Some(any)).unwrap();
        https.tls = Some(AdminTls {
            cert: "c".into(),
            key: "k".into(),
            client_ca: None,
        });
        assert!(https.warnings().is_empty());
        let w = AdminAuth::load(None, Some(any)).unwrap().warnings();
        assert!(w.iter().any(|w| w.contains("refused")), "{w:?}");
    }
}
