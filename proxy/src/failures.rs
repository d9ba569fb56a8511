//! failures: what reaching a gateway ready for a session can fail at, and how each counts
//! against the gateway, the same for every upstream (TCP, TLS, the link) and every caller (a
//! session's open, a move, a raw listener): a failed connect or link attempt, a TLS failure
//! (either end refusing the other's certificate), the proxy's own failure (counted against
//! nothing), the proxy out of descriptors.

use std::io;
use std::sync::Arc;

use wasmbed_config::{HealthCheck, ProxyConfig};

use crate::balancer::{Counts, Gateway};

/// A failed connect is counted against the gateway, wakes its prober, and counts as a failed
/// health observation.
pub(crate) fn connect_failed(config: &ProxyConfig, gateway: &Arc<Gateway>, error: &io::Error) {
    Counts::bump(&gateway.counts.connect_failures);
    observe_failure(config, gateway, error);
}

/// A gateway that could not be made ready for a session: counted by kind (a failed connect,
/// link or stream; a TLS failure, logged at warn since it is a configuration to mend), its
/// prober woken, and a failed health observation. The same for every upstream (TCP, TLS,
/// link) and every caller (a session's open, a move, a raw listener).
pub(crate) fn failed(config: &ProxyConfig, gateway: &Arc<Gateway>, error: &io::Error) {
    if is_tls_failure(error) {
        Counts::bump(&gateway.counts.upstream_tls_failures);
        tracing::warn!(gateway = %gateway.name, %error, "TLS with the gateway failed");
        observe_failure(config, gateway, error);
    } else if !is_fd_exhaustion(error) && !is_own_failure(error) {
        connect_failed(config, gateway, error);
    }
}

fn observe_failure(config: &ProxyConfig, gateway: &Arc<Gateway>, error: &io::Error) {
    gateway.suspect();
    tracing::debug!(gateway = %gateway.name, %error, "reaching the gateway failed");
    let health = &config.health;
    if health.check != HealthCheck::None && !gateway.refusal_is_its_drain(error) {
        let change = gateway.observe(false, health.rise, health.fall);
        crate::health::report(gateway, change, &error.to_string());
    }
}

/// A failure of the proxy's own, not the gateway's: the TLS records not handed over
/// (refused `internal`, not counted against the gateway, no other gateway tried).
#[derive(Debug, thiserror::Error)]
#[error("the proxy's own: {0}")]
pub(crate) struct OwnFailure(pub(crate) io::Error);

pub(crate) fn is_own_failure(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|i| i.downcast_ref::<OwnFailure>().is_some())
}

/// Whether `e` is a TLS failure with a gateway: rustls' (TCP), or a QUIC connection closed
/// with a TLS alert by either end (a link).
pub(crate) fn is_tls_failure(e: &io::Error) -> bool {
    if crate::tls::is_tls_error(e) {
        return true;
    }
    let crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match e
        .get_ref()
        .and_then(|i| i.downcast_ref::<quinn::ConnectionError>())
    {
        Some(quinn::ConnectionError::TransportError(t)) => crypto(t.code),
        Some(quinn::ConnectionError::ConnectionClosed(c)) => crypto(c.error_code),
        _ => false,
    }
}

/// The proxy is out of descriptors (its own limit, not the gateway's failure).
pub(crate) fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}
