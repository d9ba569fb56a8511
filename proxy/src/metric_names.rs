//! metric_names: the name of every metric the proxy exports (`wasmbed_proxy_<what>_<unit>`),
//! at the bottom of the crate so any module may count without importing the exporter.

pub const ACCEPTED: &str = "wasmbed_proxy_connections_accepted_total";
pub const REJECTED: &str = "wasmbed_proxy_connections_rejected_total";
pub const ACCEPT_ERRORS: &str = "wasmbed_proxy_accept_errors_total";
pub const WORKER_MOVES: &str = "wasmbed_proxy_worker_moves_total";
pub const WORKER_SESSIONS: &str = "wasmbed_proxy_worker_sessions";
pub const OPEN: &str = "wasmbed_proxy_connections_open";
pub const SESSIONS_STARTED: &str = "wasmbed_proxy_sessions_started_total";
pub const SESSIONS_CANCELLED: &str = "wasmbed_proxy_sessions_cancelled_total";
pub const SESSIONS: &str = "wasmbed_proxy_gateway_sessions";
pub const GATEWAY_UP: &str = "wasmbed_proxy_gateway_up";
pub const GATEWAY_DRAINING: &str = "wasmbed_proxy_gateway_draining";
pub const GATEWAY_TRANSITIONS: &str = "wasmbed_proxy_gateway_transitions_total";
pub const PROBE_FAILURES: &str = "wasmbed_proxy_health_probe_failures_total";
pub const GONE_DETECTION: &str = "wasmbed_proxy_gateway_gone_detection_seconds";
pub const CONNECT_FAILURES: &str = "wasmbed_proxy_gateway_connect_failures_total";
pub const UPSTREAM_TLS_FAILURES: &str = "wasmbed_proxy_upstream_tls_failures_total";
pub const BYTES: &str = "wasmbed_proxy_bytes_total";
pub const HANDSHAKE: &str = "wasmbed_proxy_handshake_duration_seconds";
pub const CONNECT: &str = "wasmbed_proxy_connect_duration_seconds";
pub const DEVICES: &str = "wasmbed_proxy_authenticated_devices_total";
pub const ROUTED: &str = "wasmbed_proxy_routed_total";
pub const SESSIONS_BY_ALPN: &str = "wasmbed_proxy_sessions_by_alpn_total";
pub const ADMIN_REFUSED: &str = "wasmbed_proxy_admin_refused_total";
pub const MOVES: &str = "wasmbed_proxy_session_moves_total";
pub const MOVE_PAUSE: &str = "wasmbed_proxy_move_pause_seconds";
pub const REPLAYED: &str = "wasmbed_proxy_replayed_frames_total";
pub const DUPLICATES_DROPPED: &str = "wasmbed_proxy_duplicate_answers_dropped_total";
pub const HELD: &str = "wasmbed_proxy_sessions_held";
pub const REPLAY_OVERFLOWS: &str = "wasmbed_proxy_replay_overflows_total";
pub const MOVING: &str = "wasmbed_proxy_gateway_moving";
pub const REVOKED: &str = "wasmbed_proxy_sessions_revoked_total";
pub const OPEN_FILES: &str = "wasmbed_proxy_open_files";
pub const MAX_OPEN_FILES: &str = "wasmbed_proxy_max_open_files";
pub const UPSTREAM_HANDSHAKES: &str = "wasmbed_proxy_upstream_handshakes_total";
pub const CONFIG_RELOADS: &str = "wasmbed_proxy_config_reloads_total";
pub const DISCOVERY_ERRORS: &str = "wasmbed_proxy_discovery_errors_total";
pub const DISCOVERY_CAPPED: &str = "wasmbed_proxy_discovery_capped_total";
pub const DISCOVERED: &str = "wasmbed_proxy_discovered_addresses";
pub const DISCOVERY_CHANGES: &str = "wasmbed_proxy_discovery_changes_total";
pub const LINKS: &str = "wasmbed_proxy_links_total";
pub const QUIC_CONNECTIONS: &str = "wasmbed_proxy_quic_connections_total";
pub const QUIC_STREAMS_REFUSED: &str = "wasmbed_proxy_quic_streams_refused_total";
pub const QUIC_INITIALS_HELD: &str = "wasmbed_proxy_quic_initials_held";
pub const QUIC_INITIALS_DROPPED: &str = "wasmbed_proxy_quic_initials_dropped_total";
pub const HANDSHAKES: &str = "wasmbed_proxy_handshakes_in_progress";
pub const HANDSHAKES_WAITING: &str = "wasmbed_proxy_handshakes_waiting";
pub const TLS_TICKETS: &str = "wasmbed_proxy_tls_tickets_total";
pub const SEATS: &str = "wasmbed_proxy_device_seats";

/// Every metric this process exports (the dashboards and alert rules are checked against it).
pub const ALL: &[&str] = &[
    ACCEPTED,
    REJECTED,
    ACCEPT_ERRORS,
    WORKER_MOVES,
    WORKER_SESSIONS,
    OPEN,
    SESSIONS_STARTED,
    SESSIONS_CANCELLED,
    SESSIONS,
    GATEWAY_UP,
    GATEWAY_DRAINING,
    GATEWAY_TRANSITIONS,
    PROBE_FAILURES,
    GONE_DETECTION,
    CONNECT_FAILURES,
    UPSTREAM_TLS_FAILURES,
    BYTES,
    HANDSHAKE,
    CONNECT,
    DEVICES,
    ROUTED,
    SESSIONS_BY_ALPN,
    ADMIN_REFUSED,
    MOVES,
    MOVE_PAUSE,
    REPLAYED,
    DUPLICATES_DROPPED,
    HELD,
    REPLAY_OVERFLOWS,
    MOVING,
    REVOKED,
    OPEN_FILES,
    MAX_OPEN_FILES,
    UPSTREAM_HANDSHAKES,
    CONFIG_RELOADS,
    DISCOVERY_ERRORS,
    DISCOVERY_CAPPED,
    DISCOVERED,
    DISCOVERY_CHANGES,
    LINKS,
    QUIC_CONNECTIONS,
    QUIC_STREAMS_REFUSED,
    QUIC_INITIALS_HELD,
    QUIC_INITIALS_DROPPED,
    HANDSHAKES,
    HANDSHAKES_WAITING,
    TLS_TICKETS,
    SEATS,
];
