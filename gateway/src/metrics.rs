//! Metrics of the gateway: names, help texts, the Prometheus recorder.

use std::sync::OnceLock;

use metrics::{
    Counter, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use wasmbed_protocol::Kind;

pub const SESSIONS: &str = "wasmbed_gateway_sessions";
pub const MAX_SESSIONS: &str = "wasmbed_gateway_max_sessions";
pub const SESSIONS_TOTAL: &str = "wasmbed_gateway_sessions_accepted_total";
pub const FRAMES_IN: &str = "wasmbed_gateway_frames_in_total";
pub const FRAMES_OUT: &str = "wasmbed_gateway_frames_out_total";
pub const CALLS: &str = "wasmbed_gateway_app_calls_total";
pub const CALL: &str = "wasmbed_gateway_call_duration_seconds";
pub const TRAPS: &str = "wasmbed_gateway_app_failures_total";
pub const INSTANTIATE: &str = "wasmbed_gateway_instantiation_duration_seconds";
pub const ERRORS: &str = "wasmbed_gateway_errors_sent_total";
pub const TLS_REJECTED: &str = "wasmbed_gateway_tls_rejected_total";
pub const REVOKED: &str = "wasmbed_gateway_sessions_revoked_total";
pub const PROXY_HEADERS: &str = "wasmbed_gateway_proxy_headers_total";
pub const UPLOADS: &str = "wasmbed_gateway_app_uploads_total";
pub const APPS: &str = "wasmbed_gateway_apps";
pub const RESUMES: &str = "wasmbed_gateway_resumes_total";
pub const ADMIN_REFUSED: &str = "wasmbed_gateway_admin_refused_total";
pub const CHECKPOINTS: &str = "wasmbed_gateway_checkpoints_total";
pub const TICKET_BYTES: &str = "wasmbed_gateway_ticket_bytes";
pub const SNAPSHOT: &str = "wasmbed_gateway_snapshot_duration_seconds";
pub const RESTORE: &str = "wasmbed_gateway_restore_duration_seconds";
pub const LINKS: &str = "wasmbed_gateway_links_total";
pub const LINKS_OPEN: &str = "wasmbed_gateway_links_open";
pub const LINK_ENDS: &str = "wasmbed_gateway_link_ends_total";
pub const LINK_STREAMS_REFUSED: &str = "wasmbed_gateway_link_streams_refused_total";

/// Every metric this process exports (the dashboards and alert rules are checked against it).
pub const ALL: &[&str] = &[
    SESSIONS,
    MAX_SESSIONS,
    SESSIONS_TOTAL,
    FRAMES_IN,
    FRAMES_OUT,
    CALLS,
    CALL,
    TRAPS,
    INSTANTIATE,
    ERRORS,
    TLS_REJECTED,
    REVOKED,
    PROXY_HEADERS,
    UPLOADS,
    APPS,
    RESUMES,
    ADMIN_REFUSED,
    CHECKPOINTS,
    TICKET_BYTES,
    SNAPSHOT,
    RESTORE,
    LINKS,
    LINKS_OPEN,
    LINK_ENDS,
    LINK_STREAMS_REFUSED,
];

const BUCKETS: &[f64] = &[
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
];

/// The process-wide recorder's handle; installs the recorder on first use. (A process that
/// already installed another recorder, such as a test running a proxy too, keeps that one.)
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
            .expect("static, non-empty bucket list")
            .build_recorder();
        let handle = recorder.handle();
        let _ = metrics::set_global_recorder(recorder);
        describe();
        wasmbed_admin::keep_metrics_up(handle.clone());
        handle
    })
}

fn describe() {
    describe_gauge!(SESSIONS, "Live device sessions.");
    describe_gauge!(
        MAX_SESSIONS,
        "The gateway's capacity (--max-sessions): past it, new sessions get ERROR unavailable."
    );
    describe_counter!(SESSIONS_TOTAL, "Device connections accepted.");
    describe_counter!(FRAMES_IN, "Frames received from devices, by type.");
    describe_counter!(FRAMES_OUT, "Frames sent to devices, by type.");
    describe_histogram!(CALL, Unit::Seconds, "Duration of one on_message call.");
    describe_counter!(
        TRAPS,
        "Failed application calls, by kind (trap, timeout, memory, bad_pointer)."
    );
    describe_histogram!(
        INSTANTIATE,
        Unit::Seconds,
        "Time to instantiate an app for a session."
    );
    describe_counter!(ERRORS, "ERROR frames sent, by code.");
    describe_counter!(
        PROXY_HEADERS,
        "PROXY protocol v2 headers read (--accept-proxy-protocol), by result: accepted, not_allowed (from a network not in --proxy-protocol-from), truncated, too_long, malformed; every refused one closed its connection."
    );
    describe_counter!(
        REVOKED,
        "Live sessions closed (ERROR revoked) because a TLS reload's CRL revoked the device's certificate."
    );
    describe_counter!(
        TLS_REJECTED,
        "TLS handshakes refused, by reason: handshake (a bad or missing client certificate, or another TLS failure), timeout, client_cert (a certificate that no longer passes after a handshake resumed from a ticket, or one a CRL in use revokes)."
    );
    describe_counter!(
        UPLOADS,
        "App uploads over the admin API, by result (accepted, refused)."
    );
    describe_gauge!(APPS, "Applications loaded.");
    describe_counter!(
        RESUMES,
        "HELLOs with a ticket, by outcome: restored, fresh (resumed, the app keeps no state), \
         expired, bad_ticket, other_device, other_app, restore_failed."
    );
    describe_counter!(
        CHECKPOINTS,
        "CHECKPOINTs, by result: sent, failed (snapshot trapped, timed out or too large)."
    );
    describe_histogram!(TICKET_BYTES, Unit::Bytes, "Size of a sealed ticket.");
    describe_counter!(
        ADMIN_REFUSED,
        "Admin requests refused, by status: 401 (no token), 403 (wrong token, or no token configured off loopback), 413 (upload over --max-app-size)."
    );
    describe_histogram!(SNAPSHOT, Unit::Seconds, "Time of an app's snapshot call.");
    describe_histogram!(RESTORE, Unit::Seconds, "Time of an app's restore call.");
    describe_counter!(
        LINKS,
        "Links (QUIC) from terminating proxies, by result: accepted, not_a_proxy, client_cert (a proxy's certificate the TLS in use no longer passes), handshake, timeout."
    );
    describe_gauge!(
        LINKS_OPEN,
        "Links (QUIC) from terminating proxies open now."
    );
    describe_counter!(
        LINK_STREAMS_REFUSED,
        "New sessions refused on a link (the stream reset) because its proxy's certificate no longer passes the TLS in use (a reload revoked it or stopped trusting its CA); the sessions already open go on."
    );
    describe_counter!(
        LINK_ENDS,
        "Links from proxies that ended, by cause: closed (by the proxy, as at its stop), timeout (silent past the idle timeout: a proxy gone without closing), local (closed by this gateway), reset, error."
    );
}

/// Appends `wasmbed_gateway_app_calls_total{app}`: one series per loaded app (from 0), none
/// for a deleted one.
pub fn render_app_calls(text: &mut String, apps: &[std::sync::Arc<crate::host::App>]) {
    use wasmbed_admin::exposition::{family, sample};
    let mut apps: Vec<_> = apps.iter().collect();
    apps.sort_by(|a, b| a.name.cmp(&b.name));
    family(
        text,
        CALLS,
        "counter",
        "Application calls (on_message), by app.",
    );
    for app in apps {
        let calls = app.calls.load(std::sync::atomic::Ordering::Relaxed);
        sample(text, CALLS, &[("app", app.name.as_str())], calls);
    }
}

/// Metrics the session path records into, registered once so a frame or a call costs an
/// atomic add, not a key built and hashed.
pub struct Meters {
    pub instantiate: Histogram,
    pub call: Histogram,
    pub snapshot: Histogram,
    pub restore: Histogram,
    pub ticket_bytes: Histogram,
    pub checkpoints: Counter,
    pub checkpoint_failed: Counter,
    /// In the order of [`Kind::ALL`]: the frame type byte minus one.
    frames_in: Vec<Counter>,
    frames_out: Vec<Counter>,
}

fn per_kind(name: &'static str) -> Vec<Counter> {
    Kind::ALL
        .iter()
        .map(|k| counter!(name, "type" => k.as_str()))
        .collect()
}

impl Meters {
    pub fn new() -> Meters {
        handle();
        Meters {
            instantiate: histogram!(INSTANTIATE),
            call: histogram!(CALL),
            snapshot: histogram!(SNAPSHOT),
            restore: histogram!(RESTORE),
            ticket_bytes: histogram!(TICKET_BYTES),
            checkpoints: counter!(CHECKPOINTS, "result" => "sent"),
            checkpoint_failed: counter!(CHECKPOINTS, "result" => "failed"),
            frames_in: per_kind(FRAMES_IN),
            frames_out: per_kind(FRAMES_OUT),
        }
    }

    pub fn frame_in(&self, kind: Kind) {
        if let Some(c) = self.frames_in.get(kind as usize - 1) {
            c.increment(1);
        }
    }

    pub fn frame_out(&self, kind: Kind) {
        if let Some(c) = self.frames_out.get(kind as usize - 1) {
            c.increment(1);
        }
    }
}

impl Default for Meters {
    fn default() -> Self {
        Meters::new()
    }
}
