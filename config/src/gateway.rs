//! `wasmbed gateway` configuration: flags (and an optional TOML file), validated.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::defaults::gateway as defaults;
use crate::{ConfigError, LogFormat, duration_or, parse_addr, read_toml};

/// Flags of `wasmbed gateway`. Each one, when given, overrides the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GatewayFlags {
    /// TOML config file with the same keys as these flags (snake_case). Flags override it.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(long, value_name = "ADDR", help = format!("Device session server address, IP:PORT. Default {}.", crate::defaults::gateway::LISTEN))]
    pub listen: Option<String>,
    #[arg(long, value_name = "ADDR", help = format!("Admin HTTP endpoint (/healthz, /readyz, /metrics, /api/apps, /api/drain), or `off`. Default {}.", crate::defaults::gateway::ADMIN))]
    pub admin: Option<String>,
    #[arg(long, help = format!("This gateway's name, sent in WELCOME and used in metrics. Default {:?}.", crate::defaults::gateway::NAME))]
    pub name: Option<String>,
    /// Directory of applications (NAME.wasm or NAME.wat), loaded and compiled at start.
    #[arg(long, value_name = "DIR")]
    pub apps: Option<PathBuf>,
    /// Server certificate chain (PEM). Required unless --insecure-plaintext.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that device client certificates must chain to; required with TLS.
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// Plain TCP sessions with no TLS: for tests, or a port that only a terminating proxy can
    /// reach. Nothing is authenticated: any client may name any device in HELLO. A terminating
    /// proxy should use TLS with its client certificate (--proxy-identity, --trusted-proxy-ca).
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// With TLS: a client certificate identity (its common name) that belongs to a
    /// terminating proxy. Its sessions may name any device in HELLO: the proxy verified the
    /// device's certificate and checked HELLO against it. Repeatable. Any other client must
    /// name its own certificate's device.
    #[arg(long, value_name = "NAME")]
    pub proxy_identity: Vec<String>,
    /// With TLS: the CA (PEM) of terminating proxies' client certificates. A client whose
    /// certificate chains to it may name any device in HELLO. It must be a CA of its own,
    /// not the devices' (--client-ca): with that, every device could speak for any other.
    #[arg(long, value_name = "FILE")]
    pub trusted_proxy_ca: Option<PathBuf>,
    /// With TLS: a CRL (PEM) device certificates are checked against. Repeatable. Re-read on
    /// SIGHUP: a live session whose device is revoked then gets ERROR revoked and is closed.
    #[arg(long, value_name = "FILE")]
    pub client_crl: Vec<PathBuf>,
    #[arg(long, value_name = "DURATION", help = format!("How long one application call may run: its running only, checked at every 2 ms tick (the call yields there; the time it then waits for a busy host's CPU does not count, and a stretch between two ticks counts two ticks at most). Default {}.", crate::defaults::show(crate::defaults::gateway::CALL_TIMEOUT)))]
    pub call_timeout: Option<String>,
    #[arg(long, value_name = "SIZE", help = format!("Linear memory cap of one application instance, in bytes (suffixes KiB, MiB, GiB; any case). Default {}.", crate::defaults::show_size(crate::defaults::gateway::MAX_MEMORY)))]
    pub max_memory: Option<String>,
    #[arg(long, value_name = "DURATION", help = format!("A session with no frame for this long is closed. Default {}.", crate::defaults::show(crate::defaults::gateway::IDLE_TIMEOUT)))]
    pub idle_timeout: Option<String>,
    #[arg(long, value_name = "DURATION", help = format!("On SIGTERM or SIGINT, how long sessions get after GOAWAY before the gateway exits. (A drain through the admin API sends the same GOAWAY but the gateway stays up, serving its admin endpoint, until it is stopped.) Default {}.", crate::defaults::show(crate::defaults::gateway::GRACE)))]
    pub grace: Option<String>,
    #[arg(
        long,
        value_name = "DURATION",
        help = "On SIGTERM or SIGINT: past this, the process ends whatever still runs, with a line naming it (HAProxy's hard-stop-after). Default: --grace plus 10 s. A second signal ends the process at once."
    )]
    pub hard_stop_after: Option<String>,
    #[arg(long, value_name = "N", help = format!("Most sessions (and application instances) at once; past it a device gets ERROR `unavailable`. Default {}.", crate::defaults::gateway::MAX_SESSIONS))]
    pub max_sessions: Option<u32>,
    #[arg(long, value_name = "BYTES", help = format!("Largest frame accepted, in bytes. Default {}.", crate::defaults::gateway::MAX_FRAME))]
    pub max_frame: Option<usize>,
    /// The fleet's session key ring (TOML `[[key]] id, key` entries, `certs init` writes one):
    /// with it, sessions are checkpointed into sealed tickets any gateway of the fleet opens.
    /// Re-read on SIGHUP. Without it, sessions are not checkpointed and `resume` is refused.
    #[arg(long, value_name = "FILE")]
    pub session_keys: Option<PathBuf>,
    #[arg(long, value_name = "SIZE", help = format!("Largest app state a checkpoint may carry (suffixes KiB, MiB). Default {}.", crate::defaults::show_size(crate::defaults::gateway::MAX_STATE)))]
    pub max_state: Option<String>,
    #[arg(long, value_name = "every|N|off", help = format!("When to send CHECKPOINT: after every REPLY, after every Nth, or never. Default {}.", crate::defaults::gateway::CHECKPOINT))]
    pub checkpoint: Option<String>,
    #[arg(long, value_name = "DURATION", help = format!("How long a ticket opens after it was sealed. Default {}.", crate::defaults::show(crate::defaults::gateway::TICKET_LIFETIME)))]
    pub ticket_lifetime: Option<String>,
    /// With TLS and --session-keys, TLS session tickets are issued under the key ring, so
    /// a device that re-homes resumes TLS on any gateway: this turns them off.
    #[arg(long)]
    pub no_tls_tickets: bool,
    /// Also serve the multiplexed link of terminating proxies (`wasmbed proxy --upstream
    /// link`): QUIC on UDP at the --listen address and port, ALPN `wasmbed-link/1`, one stream
    /// per device session. Needs TLS and the proxies' certificates (--trusted-proxy-ca or
    /// --proxy-identity): only a proxy may open a link; a device certificate is refused.
    #[arg(long)]
    pub link: bool,
    /// Worker threads. Default: every core this process may run on.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// A file holding the bearer token that PUT/DELETE/POST on the admin endpoint need.
    /// Without it, mutation is allowed only when the admin endpoint is on a loopback address.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub admin_tls: crate::admin::AdminTlsFlags,
    /// Read a PROXY protocol v2 header (sent by `wasmbed proxy --proxy-protocol`) from
    /// connections of the --proxy-protocol-from networks, and use the device's address it
    /// carries in logs. A header from any other source closes the connection.
    #[arg(long)]
    pub accept_proxy_protocol: bool,
    /// A network (CIDR, e.g. 10.0.0.0/8) whose connections may carry a PROXY header.
    /// Repeatable; required with --accept-proxy-protocol.
    #[arg(long, value_name = "CIDR")]
    pub proxy_protocol_from: Vec<String>,
    #[arg(long, value_name = "SIZE", help = format!("Largest app upload accepted by the admin API (413 above). Default {}.", crate::defaults::show_size(crate::defaults::gateway::MAX_APP_SIZE)))]
    pub max_app_size: Option<String>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    listen: Option<String>,
    admin: Option<String>,
    name: Option<String>,
    apps: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    #[serde(default)]
    insecure_plaintext: bool,
    #[serde(default)]
    proxy_identity: Vec<String>,
    trusted_proxy_ca: Option<PathBuf>,
    #[serde(default)]
    client_crl: Vec<PathBuf>,
    call_timeout: Option<String>,
    max_memory: Option<String>,
    idle_timeout: Option<String>,
    grace: Option<String>,
    hard_stop_after: Option<String>,
    max_sessions: Option<u32>,
    max_frame: Option<usize>,
    session_keys: Option<PathBuf>,
    max_state: Option<String>,
    checkpoint: Option<String>,
    ticket_lifetime: Option<String>,
    #[serde(default)]
    no_tls_tickets: bool,
    #[serde(default)]
    link: bool,
    threads: Option<usize>,
    admin_token_file: Option<PathBuf>,
    admin_tls_cert: Option<PathBuf>,
    admin_tls_key: Option<PathBuf>,
    admin_client_ca: Option<PathBuf>,
    #[serde(default)]
    accept_proxy_protocol: bool,
    #[serde(default)]
    proxy_protocol_from: Vec<String>,
    max_app_size: Option<String>,
    log_format: Option<LogFormat>,
}

/// The gateway's TLS: its certificate and the CA of device certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// Client certificate identities (from the same CA) of terminating proxies: a session
    /// from one of them may name any device in HELLO, because that proxy checked it.
    pub proxy_identities: Vec<String>,
    /// The CA of terminating proxies' client certificates (`--trusted-proxy-ca`).
    pub trusted_proxy_ca: Option<PathBuf>,
    /// CRLs of device certificates (`--client-crl`), re-read on SIGHUP.
    pub client_crls: Vec<PathBuf>,
}

/// The validated configuration `wasmbed_gateway` runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewaySettings {
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub name: String,
    pub apps: Option<PathBuf>,
    /// `None`: plain TCP (`--insecure-plaintext`).
    pub tls: Option<GatewayTls>,
    pub call_timeout: Duration,
    pub max_memory: usize,
    pub idle_timeout: Duration,
    pub grace: Duration,
    /// Past this after a stop began, the process ends whatever still runs.
    pub hard_stop_after: Duration,
    pub max_sessions: u32,
    pub max_frame: usize,
    /// The key ring file; `None`: no checkpoints, resumes refused.
    pub session_keys: Option<PathBuf>,
    pub max_state: usize,
    /// A CHECKPOINT after every Nth REPLY; `None`: never.
    pub checkpoint_every: Option<u32>,
    pub ticket_lifetime: Duration,
    /// TLS session tickets under the key ring (with TLS and `session_keys`).
    pub tls_tickets: bool,
    /// Serve the proxies' multiplexed QUIC link on UDP at the session port (`--link`).
    pub link: bool,
    pub threads: Option<usize>,
    /// Who may change things through the admin endpoint.
    pub admin_auth: crate::admin::AdminAuth,
    /// Largest app upload accepted (413 above).
    pub max_app_size: usize,
    pub log_format: LogFormat,
    /// Networks whose connections may start with a PROXY v2 header (empty: none may).
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

/// Parses "4MiB", "512KiB", "65536".
/// `--accept-proxy-protocol` with its `--proxy-protocol-from` networks.
fn proxy_networks(accept: bool, from: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    if !accept {
        if !from.is_empty() {
            return Err(ConfigError::field(
                "proxy_protocol_from",
                "needs --accept-proxy-protocol",
            ));
        }
        return Ok(Vec::new());
    }
    if from.is_empty() {
        return Err(ConfigError::field(
            "proxy_protocol_from",
            "--accept-proxy-protocol needs the networks its headers may come from (CIDR)",
        ));
    }
    from.iter()
        .map(|n| {
            n.trim().parse::<ipnet::IpNet>().map_err(|_| {
                ConfigError::field(
                    "proxy_protocol_from",
                    format!("{n:?} is not a network (CIDR, e.g. 10.0.0.0/8)"),
                )
            })
        })
        .collect()
}

/// Whether two paths name the same file (the same inode, through any link), or files with
/// the same bytes. A file that cannot be read gives no verdict here (loading it says why);
/// one that is not a regular file of a certificate's size (at most 1 MiB) cannot be compared
/// and is refused: reading a pipe or a device (`/dev/zero`) might never end.
fn same_file_or_content(a: &std::path::Path, b: &std::path::Path) -> Result<bool, String> {
    use std::os::unix::fs::MetadataExt;
    if a == b {
        return Ok(true);
    }
    let (ma, mb) = (std::fs::metadata(a), std::fs::metadata(b));
    if let (Ok(x), Ok(y)) = (&ma, &mb)
        && (x.dev(), x.ino()) == (y.dev(), y.ino())
    {
        return Ok(true);
    }
    for (path, m) in [(a, &ma), (b, &mb)] {
        if let Ok(m) = m
            && (!m.is_file() || m.len() > 1 << 20)
        {
            return Err(format!(
                "{} is not a regular file of at most 1 MiB: it cannot be a CA bundle",
                path.display()
            ));
        }
    }
    Ok(match (std::fs::read(a), std::fs::read(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    })
}

pub fn parse_size(field: &str, text: &str) -> Result<usize, ConfigError> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: usize = digits
        .parse()
        .map_err(|_| ConfigError::field(field, format!("invalid size {text:?}")))?;
    // Binary units whatever the case: `4MiB`, `4MB`, `4mb`, `4m` are all 4 << 20.
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" | "kb" => 1 << 10,
        "mib" | "m" | "mb" => 1 << 20,
        "gib" | "g" | "gb" => 1 << 30,
        u => {
            return Err(ConfigError::field(
                field,
                format!("unknown unit {u:?} (use KiB, MiB)"),
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| ConfigError::field(field, "too large"))
}

impl GatewaySettings {
    pub fn load(f: &GatewayFlags) -> Result<GatewaySettings, ConfigError> {
        let mut raw: RawGateway = match &f.config {
            Some(path) => read_toml(path)?,
            None => RawGateway::default(),
        };
        macro_rules! over {
            ($($field:ident),*) => { $( if f.$field.is_some() { raw.$field = f.$field.clone(); } )* };
        }
        over!(
            listen,
            admin,
            name,
            apps,
            tls_cert,
            tls_key,
            client_ca,
            call_timeout,
            max_memory,
            idle_timeout,
            grace,
            hard_stop_after,
            max_sessions,
            max_frame,
            session_keys,
            max_state,
            checkpoint,
            ticket_lifetime,
            admin_token_file,
            max_app_size,
            threads,
            log_format
        );
        raw.insecure_plaintext |= f.insecure_plaintext;
        raw.accept_proxy_protocol |= f.accept_proxy_protocol;
        if !f.proxy_protocol_from.is_empty() {
            raw.proxy_protocol_from = f.proxy_protocol_from.clone();
        }
        if f.admin_tls.admin_tls_cert.is_some() {
            raw.admin_tls_cert = f.admin_tls.admin_tls_cert.clone();
        }
        if f.admin_tls.admin_tls_key.is_some() {
            raw.admin_tls_key = f.admin_tls.admin_tls_key.clone();
        }
        if f.admin_tls.admin_client_ca.is_some() {
            raw.admin_client_ca = f.admin_tls.admin_client_ca.clone();
        }
        raw.no_tls_tickets |= f.no_tls_tickets;
        raw.link |= f.link;
        if !f.proxy_identity.is_empty() {
            raw.proxy_identity = f.proxy_identity.clone();
        }
        if f.trusted_proxy_ca.is_some() {
            raw.trusted_proxy_ca = f.trusted_proxy_ca.clone();
        }
        if !f.client_crl.is_empty() {
            raw.client_crl = f.client_crl.clone();
        }
        Self::from_raw(raw)
    }

    /// Parses and validates a TOML document (no flags); for tests and the fuzz target.
    pub fn from_toml(text: &str) -> Result<GatewaySettings, ConfigError> {
        let raw: RawGateway = crate::parse_toml(text, std::path::Path::new("<inline>"))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawGateway) -> Result<GatewaySettings, ConfigError> {
        let listen = parse_addr("listen", raw.listen.as_deref().unwrap_or(defaults::LISTEN))?;
        let admin = match raw.admin.as_deref().unwrap_or(defaults::ADMIN) {
            "off" => None,
            a => Some(parse_addr("admin", a)?),
        };
        let name = raw.name.unwrap_or_else(|| defaults::NAME.into());
        if name.is_empty() || name.len() > 64 {
            return Err(ConfigError::field("name", "must be 1 to 64 characters"));
        }
        let tls = match (
            raw.insecure_plaintext,
            raw.tls_cert,
            raw.tls_key,
            raw.client_ca,
        ) {
            (true, None, None, None) if !raw.proxy_identity.is_empty() => {
                return Err(ConfigError::field(
                    "proxy_identity",
                    "needs TLS: without it the gateway sees no certificate to match",
                ));
            }
            (true, None, None, None) if !raw.client_crl.is_empty() => {
                return Err(ConfigError::field(
                    "client_crl",
                    "needs TLS: without it the gateway sees no device certificate to check",
                ));
            }
            (true, None, None, None) if raw.trusted_proxy_ca.is_some() => {
                return Err(ConfigError::field(
                    "trusted_proxy_ca",
                    "needs TLS: without it the gateway sees no certificate to check",
                ));
            }
            (true, None, None, None) => None,
            (true, ..) => {
                return Err(ConfigError::field(
                    "insecure_plaintext",
                    "cannot be combined with --tls-cert/--tls-key/--client-ca",
                ));
            }
            (false, Some(cert), Some(key), Some(client_ca)) => {
                if let Some(proxy_ca) = &raw.trusted_proxy_ca
                    && same_file_or_content(proxy_ca, &client_ca)
                        .map_err(|e| ConfigError::field("trusted_proxy_ca", e))?
                {
                    return Err(ConfigError::field(
                        "trusted_proxy_ca",
                        "is the devices' CA (--client-ca): every device could then name any \
                         other; give the proxies a CA of their own, or use --proxy-identity",
                    ));
                }
                Some(GatewayTls {
                    cert,
                    key,
                    client_ca,
                    proxy_identities: raw.proxy_identity.clone(),
                    trusted_proxy_ca: raw.trusted_proxy_ca.clone(),
                    client_crls: raw.client_crl.clone(),
                })
            }
            (false, ..) => {
                return Err(ConfigError::field(
                    "tls",
                    "--tls-cert, --tls-key and --client-ca are required (or --insecure-plaintext \
                     behind a terminating proxy)",
                ));
            }
        };
        if raw.link
            && tls
                .as_ref()
                .is_none_or(|t| t.trusted_proxy_ca.is_none() && t.proxy_identities.is_empty())
        {
            return Err(ConfigError::field(
                "link",
                "needs TLS and the proxies' certificates (--trusted-proxy-ca or \
                 --proxy-identity): a link is opened only by an authenticated proxy",
            ));
        }
        let call_timeout = duration_or(
            "call_timeout",
            raw.call_timeout.as_deref(),
            defaults::CALL_TIMEOUT,
        )?;
        if call_timeout < Duration::from_millis(1) {
            return Err(ConfigError::field("call_timeout", "must be at least 1ms"));
        }
        let max_memory = match raw.max_memory.as_deref() {
            Some(t) => parse_size("max_memory", t)?,
            None => defaults::MAX_MEMORY,
        };
        if !(64 << 10..=1 << 30).contains(&max_memory) {
            return Err(ConfigError::field(
                "max_memory",
                "must be between 64KiB (one Wasm page) and 1GiB",
            ));
        }
        let max_sessions = raw.max_sessions.unwrap_or(defaults::MAX_SESSIONS);
        if max_sessions == 0 {
            return Err(ConfigError::field("max_sessions", "must be at least 1"));
        }
        let max_frame = raw.max_frame.unwrap_or(defaults::MAX_FRAME);
        if !(64..=16 << 20).contains(&max_frame) {
            return Err(ConfigError::field(
                "max_frame",
                "must be between 64 bytes and 16MiB",
            ));
        }
        let max_state = match raw.max_state.as_deref() {
            Some(t) => parse_size("max_state", t)?,
            None => defaults::MAX_STATE,
        };
        if max_state > 1 << 20 {
            return Err(ConfigError::field("max_state", "at most 1MiB"));
        }
        let checkpoint_every = match raw.checkpoint.as_deref().unwrap_or(defaults::CHECKPOINT) {
            "every" => Some(1),
            "off" => None,
            n => Some(n.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                ConfigError::field(
                    "checkpoint",
                    "`every`, `off`, or a number of REPLYs (1 or more)",
                )
            })?),
        };
        let ticket_lifetime = duration_or(
            "ticket_lifetime",
            raw.ticket_lifetime.as_deref(),
            defaults::TICKET_LIFETIME,
        )?;
        if ticket_lifetime.is_zero() {
            return Err(ConfigError::field("ticket_lifetime", "must be above 0"));
        }
        let (grace, hard_stop_after) = crate::stop_deadlines(
            raw.grace.as_deref(),
            raw.hard_stop_after.as_deref(),
            defaults::GRACE,
        )?;
        Ok(GatewaySettings {
            tls_tickets: !raw.no_tls_tickets,
            link: raw.link,
            session_keys: raw.session_keys,
            max_state,
            checkpoint_every,
            ticket_lifetime,
            listen,
            admin,
            name,
            apps: raw.apps,
            tls,
            call_timeout,
            max_memory,
            idle_timeout: duration_or(
                "idle_timeout",
                raw.idle_timeout.as_deref(),
                defaults::IDLE_TIMEOUT,
            )?,
            grace,
            hard_stop_after,
            max_sessions,
            max_frame,
            threads: raw.threads,
            admin_auth: crate::admin::AdminAuth::load_with_tls(
                raw.admin_token_file.as_deref(),
                admin,
                crate::admin::AdminTlsFlags {
                    admin_tls_cert: raw.admin_tls_cert.clone(),
                    admin_tls_key: raw.admin_tls_key.clone(),
                    admin_client_ca: raw.admin_client_ca.clone(),
                },
            )?,
            max_app_size: match raw.max_app_size.as_deref() {
                Some(t) => parse_size("max_app_size", t)?,
                None => defaults::MAX_APP_SIZE,
            },
            log_format: raw.log_format.unwrap_or_default(),
            proxy_protocol_from: proxy_networks(
                raw.accept_proxy_protocol,
                &raw.proxy_protocol_from,
            )?,
        })
    }
}

impl GatewaySettings {
    /// What the settings allow but an operator should hear about at start (logged as
    /// warnings). A gateway behind a terminating proxy (it trusts a proxy to state devices, or
    /// speaks plaintext) with no `--session-keys` seals no tickets: every session the proxy
    /// moves onto it (failover, drain, rebalance) starts its app afresh, with no error
    /// anywhere.
    pub fn warnings(&self) -> Vec<String> {
        let behind_proxy = self
            .tls
            .as_ref()
            .is_none_or(|t| t.trusted_proxy_ca.is_some() || !t.proxy_identities.is_empty());
        let mut out = Vec::new();
        out.extend(crate::hard_stop_warning(self.grace, self.hard_stop_after));
        if behind_proxy && self.session_keys.is_none() {
            out.push(
                "no --session-keys: this gateway seals no session tickets, so a session a \
                 terminating proxy moves here (failover, drain, rebalance) or away restarts \
                 its app with its state lost; give every gateway of the fleet the same key ring \
                 (`wasmbed certs init` writes session-keys.toml)"
                    .to_string(),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> GatewayFlags {
        GatewayFlags {
            insecure_plaintext: true,
            ..Default::default()
        }
    }

    #[test]
    fn a_gateway_behind_a_proxy_without_session_keys_is_warned() {
        let plain = GatewaySettings::load(&flags()).unwrap();
        assert_eq!(plain.warnings().len(), 1, "plaintext, behind a proxy");
        let with_keys = GatewaySettings::load(&GatewayFlags {
            session_keys: Some("keys.toml".into()),
            ..flags()
        })
        .unwrap();
        assert!(
            with_keys.warnings().is_empty(),
            "{:?}",
            with_keys.warnings()
        );
    }

    #[test]
    fn defaults_work_on_a_laptop() {
        let s = GatewaySettings::load(&flags()).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:9001");
        assert_eq!(s.call_timeout, Duration::from_millis(50));
        assert_eq!(s.max_memory, 4 << 20);
        assert!(s.tls.is_none());
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (
                GatewayFlags {
                    max_memory: Some("4 parsecs".into()),
                    ..flags()
                },
                "max_memory",
            ),
            (
                GatewayFlags {
                    call_timeout: Some("0ms".into()),
                    ..flags()
                },
                "call_timeout",
            ),
            (
                GatewayFlags {
                    listen: Some("nowhere".into()),
                    ..flags()
                },
                "listen",
            ),
            (
                GatewayFlags {
                    insecure_plaintext: false,
                    ..flags()
                },
                "tls",
            ),
            (
                GatewayFlags {
                    tls_cert: Some("a".into()),
                    ..flags()
                },
                "insecure_plaintext",
            ),
        ];
        for (f, field) in cases {
            let e = GatewaySettings::load(&f).unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
        }
    }

    #[test]
    fn the_devices_ca_cannot_be_the_proxies_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let copy = dir.path().join("copy.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        std::fs::write(&copy, "-----BEGIN CERTIFICATE-----\n").unwrap();
        for proxy_ca in [&ca, &copy] {
            let flags = GatewayFlags {
                tls_cert: Some(dir.path().join("gw.pem")),
                tls_key: Some(dir.path().join("gw.key")),
                client_ca: Some(ca.clone()),
                trusted_proxy_ca: Some(proxy_ca.clone()),
                ..GatewayFlags::default()
            };
            let e = GatewaySettings::load(&flags).unwrap_err().to_string();
            assert!(e.contains("trusted_proxy_ca"), "{e}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("m", "4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_size("m", "512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("m", "70000").unwrap(), 70000);
        assert_eq!(parse_size("m", "4mb").unwrap(), 4 << 20);
        assert_eq!(parse_size("m", "4MB").unwrap(), 4 << 20);
        assert!(parse_size("m", "12XB").is_err());
    }

    /// The gateway's config with `client_ca` and `trusted_proxy_ca` as given.
    fn with_cas(
        client_ca: &std::path::Path,
        proxy_ca: &std::path::Path,
    ) -> Result<GatewaySettings, ConfigError> {
        GatewaySettings::from_toml(&format!(
            "tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\nclient_ca = {:?}\ntrusted_proxy_ca = {:?}\n",
            client_ca, proxy_ca
        ))
    }

    #[test]
    fn the_proxies_ca_may_not_be_the_devices_ca_by_any_path() {
        let dir = tempfile::tempdir().unwrap();
        let (devices, proxies) = (
            dir.path().join("devices.pem"),
            dir.path().join("proxies.pem"),
        );
        std::fs::write(&devices, "devices").unwrap();
        std::fs::write(&proxies, "proxies").unwrap();
        assert!(with_cas(&devices, &proxies).is_ok());
        // The same file by a link, and a copy of its bytes.
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&devices, &link).unwrap();
        let copy = dir.path().join("copy.pem");
        std::fs::write(&copy, "devices").unwrap();
        for same in [&link, &copy] {
            let e = with_cas(&devices, same).unwrap_err().to_string();
            assert!(e.contains("is the devices' CA"), "{e}");
        }
        // A device or a pipe is never read (it might not end): refused as no CA bundle.
        let e = with_cas(&devices, std::path::Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
