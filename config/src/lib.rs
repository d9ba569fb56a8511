//! Typed configuration for every `wasmbed` subcommand.
//!
//! Config flows raw -> validated: a TOML file is read into `Raw*` structs (serde,
//! `deny_unknown_fields`), command-line flags are laid over it (a flag always wins), and
//! `validate` turns the result into the typed config the libraries run on. Every problem is
//! one [`ConfigError`] that names the field.

pub mod admin;
pub mod defaults;
pub mod gateway;
pub mod loadtest;
pub mod proxy;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use gateway::{GatewayFlags, GatewaySettings, GatewayTls};
pub use loadtest::{LoadtestFlags, LoadtestSettings};
pub use proxy::{
    GatewayConfig, HealthCheck, HealthConfig, ListenerConfig, Mode, ProxyConfig, ProxyFlags,
    RouteConfig, TerminateTls, UpstreamTls,
};

/// A configuration problem: which field, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("`{field}`: {problem}")]
    Field { field: String, problem: String },
}

impl ConfigError {
    pub fn field(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError::Field {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Reads and parses a TOML file into `T`, with errors that name the file and the field.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(&text, path)
}

/// Parses a TOML document into `T`; `path` names it in errors (`<inline>` for text given
/// directly).
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().replace('\n', " ").trim().to_string(),
    })
}

/// Parses a human duration ("500ms", "2s", "1m 30s").
pub fn parse_duration(field: &str, text: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| ConfigError::field(field, format!("invalid duration {text:?}: {e}")))?;
    if d > MAX_DURATION {
        return Err(ConfigError::field(
            field,
            format!("{text:?} is longer than any setting needs (at most 10 years)"),
        ));
    }
    Ok(d)
}

/// The longest duration any setting takes: every deadline and sum made from settings (a
/// stop's grace plus its margin, `now` plus a timeout) then stays far from overflowing. A
/// grace of `u64::MAX` seconds, found by the config fuzz target, panicked in the sum.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parses an optional human duration, falling back to `default`.
pub(crate) fn duration_or(
    field: &str,
    text: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    text.map_or(Ok(default), |t| parse_duration(field, t))
}

/// `hard_stop_after` defaults to the grace plus this: time to close what the grace left (proxy
/// and gateway alike).
pub const HARD_STOP_MARGIN: Duration = Duration::from_secs(10);

/// How a stop is bounded, for the proxy and the gateway alike: the grace sessions get (its
/// default given), and `hard_stop_after` (default: the grace plus [`HARD_STOP_MARGIN`]; zero
/// would end every stop at once: refused; shorter than the grace is allowed, see
/// [`hard_stop_warning`]).
pub(crate) fn stop_deadlines(
    grace: Option<&str>,
    hard_stop_after: Option<&str>,
    default_grace: Duration,
) -> Result<(Duration, Duration), ConfigError> {
    let grace = duration_or("grace", grace, default_grace)?;
    let hard = duration_or("hard_stop_after", hard_stop_after, grace + HARD_STOP_MARGIN)?;
    if hard.is_zero() {
        return Err(ConfigError::field("hard_stop_after", "must be above 0"));
    }
    Ok((grace, hard))
}

/// The start-up warning for a hard stop that comes before the grace is over.
pub fn hard_stop_warning(grace: Duration, hard_stop_after: Duration) -> Option<String> {
    (hard_stop_after <= grace).then(|| {
        format!(
            "--hard-stop-after ({hard_stop_after:?}) is not longer than the grace ({grace:?}): a \
             stop ends the process before the grace is over"
        )
    })
}

/// Parses an `IP:PORT` socket address.
pub fn parse_addr(field: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.trim().parse().map_err(|_| {
        ConfigError::field(
            field,
            format!("invalid address {text:?}: expected IP:PORT, e.g. 127.0.0.1:8443"),
        )
    })
}

/// Checks a `host:port` endpoint (the host may be a DNS name, resolved when used).
pub fn check_endpoint(field: &str, text: &str) -> Result<String, ConfigError> {
    let text = text.trim();
    let bad = || {
        ConfigError::field(
            field,
            format!("invalid address {text:?}: expected HOST:PORT, e.g. 10.0.0.5:9000"),
        )
    };
    if text.parse::<SocketAddr>().is_ok() {
        return Ok(text.to_string());
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if !host_ok || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_name_the_field() {
        assert_eq!(
            parse_duration("x", "250ms").ok(),
            Some(Duration::from_millis(250))
        );
        let err = parse_duration("health.interval", "5 parsecs").unwrap_err();
        assert!(err.to_string().contains("health.interval"), "{err}");
    }

    #[test]
    fn endpoints_accept_ips_and_names_only_with_ports() {
        assert!(check_endpoint("g", "127.0.0.1:9000").is_ok());
        assert!(check_endpoint("g", "[::1]:9000").is_ok());
        assert!(check_endpoint("g", "gw-0.gateways.svc:9000").is_ok());
        assert!(check_endpoint("g", "gw-0").is_err());
        assert!(check_endpoint("g", "gw-0:0").is_err());
        assert!(check_endpoint("g", "gw 0:80").is_err());
        assert!(check_endpoint("g", ":80").is_err());
    }
}
