//! error: why the proxy could not start, or a reload was refused (the bottom of the crate:
//! every module that can fail at start or reload returns it).

use std::net::SocketAddr;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener: `devices` or `admin` (the flag that sets it: --listen, --admin).
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Certs(#[from] wasmbed_certs::CertError),
    /// A config reload that was refused (the running config stays).
    #[error("{0}")]
    Reload(String),
    #[error("takeover: {0}")]
    Takeover(String),
    #[error(
        "cannot start a control thread (health probes, admin endpoint, connection deadlines): {0}"
    )]
    Control(std::io::Error),
    #[error("cannot start the session workers (--threads), or register a listener with one: {0}")]
    Workers(std::io::Error),
}
