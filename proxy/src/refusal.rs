//! Why a device connection was closed before it reached a gateway: one closed set of reasons,
//! each the value of the `reason` label of `wasmbed_proxy_connections_rejected_total`.

use wasmbed_protocol::ErrorCode;

use crate::clienthello::HelloError;

/// Why a connection was refused. [`Refusal::as_label`] is its metric label; `docs/proxy.md`
/// lists every label (a test checks the list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The device closed before its ClientHello (passthrough) was complete.
    ClientClosed,
    /// Reading from the device failed (reset, or a TLS alert that was not about certificates).
    ClientError,
    /// No complete ClientHello, TLS handshake or first frame within `handshake_timeout`.
    HandshakeTimeout,
    /// Plain TCP on a listener without `allow_plain`.
    NotTls,
    /// A ClientHello over `max_client_hello`.
    HelloTooLarge,
    /// A ClientHello that does not parse.
    HelloMalformed,
    /// An SNI that is not a valid host name.
    BadSni,
    /// Terminate mode: no client certificate, or one the client CA does not vouch for.
    ClientCert,
    /// Terminate mode: another TLS handshake failure.
    TlsHandshake,
    /// Terminate mode: the first frame is not a well-formed frame (ERROR sent).
    BadFrame,
    /// Terminate mode: the first frame is not HELLO (ERROR `no_session` sent).
    NoSession,
    /// Terminate mode: a HELLO whose body does not decode (ERROR `bad_hello` sent).
    BadHello,
    /// Terminate mode: HELLO names a device other than the verified certificate's
    /// (ERROR `identity_mismatch` sent).
    IdentityMismatch,
    /// No gateway of the pool is up and not draining.
    NoGateway,
    /// Every gateway tried refused the connection, or did not take it (or its TLS, or its
    /// link's stream) in time.
    GatewayUnreachable,
    /// A gateway made ready did not open the session (HELLO not answered in time, a bad
    /// frame, a close).
    GatewayError,
    /// TLS with a gateway (`[upstream_tls]`, per session or its link's) failed, and no
    /// other gateway took the session.
    UpstreamTls,
    /// The proxy is out of file descriptors.
    FdLimit,
    /// Terminate mode: `max_handshakes` device TLS handshakes (TCP and QUIC) were already in
    /// progress; the device was refused before its own.
    HandshakesBusy,
    /// QUIC: no connection place (`max_connections`) for a device about to start its
    /// handshake, or more QUIC devices waiting without a place than places free. (TCP
    /// devices past `max_connections` wait in the listen backlog: not refused.)
    ConnectionsFull,
    /// The proxy's own failure (a bug): a configuration it should have refused at start, or
    /// a TLS connection whose records rustls did not hand over (`TlsStream::shed_handshake`).
    Internal,
}

impl Refusal {
    /// Every reason: the closed set of label values.
    #[cfg(test)]
    pub const ALL: [Refusal; 21] = [
        Refusal::ClientClosed,
        Refusal::ClientError,
        Refusal::HandshakeTimeout,
        Refusal::NotTls,
        Refusal::HelloTooLarge,
        Refusal::HelloMalformed,
        Refusal::BadSni,
        Refusal::ClientCert,
        Refusal::TlsHandshake,
        Refusal::BadFrame,
        Refusal::NoSession,
        Refusal::BadHello,
        Refusal::IdentityMismatch,
        Refusal::NoGateway,
        Refusal::GatewayUnreachable,
        Refusal::GatewayError,
        Refusal::UpstreamTls,
        Refusal::FdLimit,
        Refusal::HandshakesBusy,
        Refusal::ConnectionsFull,
        Refusal::Internal,
    ];

    /// The `reason` label.
    pub fn as_label(self) -> &'static str {
        match self {
            Refusal::ClientClosed => "client_closed",
            Refusal::ClientError => "client_error",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::NotTls => "not_tls",
            Refusal::HelloTooLarge => "hello_too_large",
            Refusal::HelloMalformed => "hello_malformed",
            Refusal::BadSni => "bad_sni",
            Refusal::ClientCert => "client_cert",
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::BadFrame => "bad_frame",
            Refusal::NoSession => "no_session",
            Refusal::BadHello => "bad_hello",
            Refusal::IdentityMismatch => "identity_mismatch",
            Refusal::NoGateway => "no_gateway",
            Refusal::GatewayUnreachable => "gateway_unreachable",
            Refusal::GatewayError => "gateway_error",
            Refusal::UpstreamTls => "upstream_tls",
            Refusal::FdLimit => "fd_limit",
            Refusal::HandshakesBusy => "handshakes_busy",
            Refusal::ConnectionsFull => "connections_full",
            Refusal::Internal => "internal",
        }
    }

    /// The reason a ClientHello was not taken (`Incomplete` is not a refusal; it maps to
    /// `client_closed`, the only way a read can end with an incomplete hello).
    pub fn of_hello(e: &HelloError) -> Refusal {
        match e {
            HelloError::Incomplete => Refusal::ClientClosed,
            HelloError::NotTls => Refusal::NotTls,
            HelloError::TooLarge => Refusal::HelloTooLarge,
            HelloError::Malformed(_) => Refusal::HelloMalformed,
            HelloError::BadSni(_) => Refusal::BadSni,
        }
    }
}

impl Refusal {
    /// The reason a TLS handshake with a device failed, from rustls' error (TLS over TCP).
    pub fn of_tls(e: &rustls::Error) -> Refusal {
        match e {
            rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_) => {
                Refusal::ClientCert
            }
            _ => Refusal::TlsHandshake,
        }
    }

    /// The reason a TLS handshake with a device failed, from the alert the proxy sent (QUIC
    /// carries it in its CONNECTION_CLOSE): the certificate alerts are `client_cert`, as the
    /// same failure is over TCP ([`Refusal::of_tls`]).
    pub fn of_tls_alert(alert: u8) -> Refusal {
        use rustls::AlertDescription as A;
        match A::from(alert) {
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::CertificateRequired => Refusal::ClientCert,
            _ => Refusal::TlsHandshake,
        }
    }
}

/// A refusal with its detail, for the log, and the ERROR the device gets before the close
/// (where it speaks the session protocol: terminate mode, after its TLS handshake).
#[derive(Debug)]
pub struct Refused {
    pub reason: Refusal,
    pub detail: String,
    /// The ERROR's code, its sequence, and (when the detail is for the log only) the text the
    /// device gets instead.
    pub answer: Option<(ErrorCode, u64, Option<&'static str>)>,
}

pub fn refused(reason: Refusal, detail: impl ToString) -> Refused {
    Refused {
        reason,
        detail: detail.to_string(),
        answer: None,
    }
}

impl Refused {
    /// The device is told with ERROR `code` (for frame `seq`), the detail as its text (a
    /// detail about the device's own frames).
    pub fn answered(mut self, code: ErrorCode, seq: u64) -> Refused {
        self.answer = Some((code, seq, None));
        self
    }

    /// The device is told with ERROR `code` and `text`; the detail (pools, gateways, errors
    /// inside the proxy's network) stays in the log.
    pub fn answered_with(mut self, code: ErrorCode, text: &'static str) -> Refused {
        self.answer = Some((code, 0, Some(text)));
        self
    }

    /// The ERROR frame the device gets, encoded (empty when there is none).
    pub fn error_frame(&self) -> Vec<u8> {
        self.answer
            .map(|(code, seq, text)| {
                let text = text.map_or_else(|| self.detail.clone(), str::to_string);
                code.frame(seq, text).encode()
            })
            .unwrap_or_default()
    }

    /// Counts the refusal the same way on every transport: the `reason` label of
    /// `wasmbed_proxy_connections_rejected_total`, the dashboard's refused rate, one log line
    /// (in the session's span).
    pub(crate) fn count(&self) {
        metrics::counter!(crate::metric_names::REJECTED, "reason" => self.reason.as_label())
            .increment(1);
        crate::events::COUNTS
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(reason = self.reason.as_label(), detail = %self.detail, "connection refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique_and_documented() {
        let labels: std::collections::HashSet<_> =
            Refusal::ALL.iter().map(|r| r.as_label()).collect();
        assert_eq!(labels.len(), Refusal::ALL.len());
        let doc = include_str!("../../docs/proxy.md");
        for label in labels {
            assert!(
                doc.contains(&format!("`{label}`")),
                "docs/proxy.md does not list the refusal reason `{label}`"
            );
        }
    }
}
