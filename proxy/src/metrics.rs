//! Metrics of the proxy: names, help texts, and the process-wide Prometheus recorder.
//!
//! Counters are bumped once per connection or per session, and the byte counters once per
//! chunk read (never per byte), so that long-lived sessions show their traffic. Every
//! per-gateway series (live sessions, up, draining, and the counters by gateway) is read from
//! the gateway set's atomics when `/metrics` is scraped, and so are the series every session
//! touches on its way ([`AtomicSeries`]: bytes, open connections; [`AtomicHistogram`]: each
//! connection's handshake and gateway connect): the hot path bumps plain atomics and never a
//! handle of the recorder, and a gateway that leaves the set leaves `/metrics` with it.

use std::sync::OnceLock;

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::balancer::{Cancel, Counts, Gateway, GatewaySet, UNASSIGNED};

pub use crate::metric_names::*;

mod scraped;
pub(crate) use scraped::SERIES;
use scraped::render_atomic_series;
pub use scraped::{AtomicHistogram, AtomicSeries};

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A move's pause is judged against 250 ms: finer steps around it.
const PAUSE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7,
    0.8, 0.9, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
];

/// The process-wide recorder's handle; installs the recorder on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("static, non-empty bucket list")
            .set_buckets_for_metric(Matcher::Full(MOVE_PAUSE.into()), PAUSE_BUCKETS)
            .expect("static, non-empty bucket list")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding program's): then this
        // handle renders only what is described here, and the program's recorder gets the rest.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        wasmbed_admin::keep_metrics_up(handle.clone());
        handle
    })
}

fn describe() {
    describe_counter!(
        ACCEPTED,
        "Device connections accepted, by listener (with defer_accept, once the device has sent its first bytes or the kernel let it through)."
    );
    describe_counter!(
        REJECTED,
        "Device connections closed before reaching a gateway, by reason."
    );
    describe_counter!(
        ACCEPT_ERRORS,
        "Failed accept() calls, by kind (emfile, other; register: an accepted connection that \
         could not be moved to its session worker)."
    );
    describe_counter!(
        WORKER_MOVES,
        "Connections moved at accept to another session worker, which had fewer sessions."
    );
    describe_histogram!(
        GONE_DETECTION,
        Unit::Seconds,
        "A gateway found gone by its liveness watch (GET /api/alive on its admin address, cut by its kernel when the process died): time from the cut to the gateway marked down, its sessions moving."
    );
    describe_counter!(
        DEVICES,
        "Sessions whose device presented a verified client certificate."
    );
    describe_counter!(ROUTED, "Sessions routed to a gateway pool, by pool.");
    describe_counter!(
        ADMIN_REFUSED,
        "Admin requests refused, by status: 401 (no token), 403 (wrong token, or no token configured off loopback), 413 (body too large)."
    );
    describe_counter!(
        MOVES,
        "Terminate mode: sessions moved to another gateway, by cause (failover, goaway, drain, rebalance) and result (resumed: the app state went along; fresh: a new app instance; failed: no gateway took it within --migrate-timeout)."
    );
    describe_histogram!(
        MOVE_PAUSE,
        Unit::Seconds,
        "Terminate mode: how long a moved session had no gateway, from the move's start (the old gateway found lost, or a paced move's turn) to the new gateway's WELCOME."
    );
    describe_counter!(
        REPLAYED,
        "Terminate mode: DATA frames sent again to the new gateway after a move (not covered by the ticket)."
    );
    describe_counter!(
        DUPLICATES_DROPPED,
        "Terminate mode: answers (REPLY, ERROR, PUSH) the device had already received, dropped after a move."
    );
    describe_gauge!(
        HELD,
        "Terminate mode: sessions waiting for a gateway to take them (held up to --migrate-timeout)."
    );
    describe_counter!(
        REPLAY_OVERFLOWS,
        "Terminate mode: sessions whose replay window filled with answered DATA and no new checkpoint: the ticket was dropped (a later move starts the app afresh)."
    );
    describe_counter!(
        REVOKED,
        "Terminate mode: live sessions closed (ERROR revoked) because a CRL reload revoked the device's certificate."
    );
    describe_gauge!(
        OPEN_FILES,
        "Descriptors the proxy has open (a passthrough session holds two)."
    );
    describe_gauge!(
        MAX_OPEN_FILES,
        "The proxy's open-files limit (soft RLIMIT_NOFILE)."
    );
    describe_counter!(
        UPSTREAM_HANDSHAKES,
        "TLS handshakes with gateways ([upstream_tls]), by kind: full, or resumed from a ticket of the fleet's ring (no certificates, no signatures)."
    );
    describe_counter!(
        CONFIG_RELOADS,
        "Config reloads (SIGHUP, POST /api/reload), by result: ok, or error (the running config stays)."
    );
    describe_counter!(
        DISCOVERY_ERRORS,
        "DNS discovery answers not used, by source and reason (nxdomain, empty, timeout, error): the last good set stays."
    );
    describe_counter!(
        DISCOVERY_CAPPED,
        "DNS discovery answers with more addresses than --max-discovered, by source (the rest ignored)."
    );
    describe_gauge!(
        DISCOVERED,
        "Addresses in the last good DNS answer, by source."
    );
    describe_counter!(
        DISCOVERY_CHANGES,
        "Gateways changed by DNS discovery, by source and change: added, gone (drained), returned (undrained), removed."
    );
    describe_counter!(
        LINKS,
        "--upstream link: links (QUIC connections) to gateways, by result: up, failed (could not be made), lost (closed by the gateway or silent for --link-timeout)."
    );
    describe_counter!(
        QUIC_CONNECTIONS,
        "QUIC device connections, by result: accepted, handshake_failed, retry (address validation asked), refused_full (--max-connections), refused_busy (--max-handshakes)."
    );
    describe_gauge!(
        HANDSHAKES,
        "Device TLS handshakes in progress (terminate mode, TLS over TCP and QUIC together), against max_handshakes."
    );
    describe_gauge!(
        HANDSHAKES_WAITING,
        "Devices waiting in line for a handshake slot (past max_handshakes, for up to handshake_wait), TLS over TCP and QUIC together."
    );
    describe_gauge!(
        SEATS,
        "Terminated sessions holding their device's seat (one per device and app named by a certificate): equal to such sessions; more would be a seat not given back."
    );
    describe_counter!(
        TLS_TICKETS,
        "Devices' TLS session tickets (terminate mode, TLS over TCP and QUIC): issued, and presented to resume: opened, or refused (an expired key, another replica's ring, a forgery: a full handshake follows)."
    );
    describe_counter!(
        QUIC_STREAMS_REFUSED,
        "Streams a QUIC device opened beyond its session's (reset: one session per connection)."
    );
    describe_gauge!(
        QUIC_INITIALS_HELD,
        "QUIC datagrams held as newcomers (ClientHellos, junk: 1,200 bytes or more, not to a connection the proxy made), read from the socket and held for quinn behind the traffic of connections under way (served newest first)."
    );
    describe_counter!(
        QUIC_INITIALS_DROPPED,
        "QUIC newcomers' datagrams dropped, oldest first, past the queue's bound (8 MiB) or held past handshake_timeout: their devices send them again, as after a drop in the kernel."
    );
    describe_counter!(
        SESSIONS_BY_ALPN,
        "Device connections by the ALPN protocol offered: the routes' protocols, wasmbed/1, none, other."
    );
}

/// The per-gateway series: name, type, help, and the series of one gateway (an extra label,
/// the value). Rendered from the gateway set at each scrape ([`render`]), not kept in the
/// recorder: a gateway that leaves the set leaves `/metrics` with it. Kept in the recorder, a
/// removed gateway's last values stayed until the proxy restarted (its `gateway_up` at 0:
/// `WasmbedGatewayDown` paging for a gateway nobody runs), and every gateway name ever seen
/// added series (gateways found in DNS come and go by address).
#[allow(clippy::type_complexity)]
const PER_GATEWAY: [(&str, &str, &str, fn(&Gateway, &mut Vec<Sample>)); 10] = [
    (
        SESSIONS,
        "gauge",
        "Live sessions per gateway (the balancer's counter).",
        |g, s| s.push((None, g.sessions())),
    ),
    (
        GATEWAY_UP,
        "gauge",
        "1 when the gateway passes its health checks.",
        |g, s| s.push((None, u64::from(g.is_healthy()))),
    ),
    (
        GATEWAY_DRAINING,
        "gauge",
        "1 when the gateway takes no new session because it drains: drained here (operator, DNS, removal) or by its own word (its health body, a GOAWAY).",
        |g, s| s.push((None, u64::from(g.is_draining()))),
    ),
    (
        MOVING,
        "gauge",
        "Sessions ordered to move off a gateway (drain by moving, rebalancing) and not moved yet.",
        |g, s| s.push((None, g.moving())),
    ),
    (
        SESSIONS_STARTED,
        "counter",
        "Sessions forwarded to a gateway, by gateway.",
        |g, s| s.push((None, read(&g.counts.sessions_started))),
    ),
    (
        SESSIONS_CANCELLED,
        "counter",
        "Sessions closed by the proxy, by gateway and cause (gateway_down, shutdown, superseded: a newer connection of the device took its session); gateway=\"\": before a gateway was theirs.",
        |g, s| cancelled(&g.counts, s),
    ),
    (
        GATEWAY_TRANSITIONS,
        "counter",
        "Health state changes, by gateway and new state.",
        |g, s| {
            s.push((Some(("to", "up")), read(&g.counts.went_up)));
            s.push((Some(("to", "down")), read(&g.counts.went_down)));
        },
    ),
    (
        PROBE_FAILURES,
        "counter",
        "Failed health probes, by gateway.",
        |g, s| s.push((None, read(&g.counts.probe_failures))),
    ),
    (
        CONNECT_FAILURES,
        "counter",
        "Failed connects to a gateway, by gateway.",
        |g, s| s.push((None, read(&g.counts.connect_failures))),
    ),
    (
        UPSTREAM_TLS_FAILURES,
        "counter",
        "TLS handshakes with a gateway ([upstream_tls]) that failed, by gateway.",
        |g, s| s.push((None, read(&g.counts.upstream_tls_failures))),
    ),
];

/// One series of a gateway: its label besides `gateway` and `pool` (if any), its value.
type Sample = (Option<(&'static str, &'static str)>, u64);

fn read(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

fn cancelled(counts: &Counts, s: &mut Vec<Sample>) {
    for cause in Cancel::ALL {
        s.push((
            Some(("cause", cause.label())),
            read(&counts.cancelled[cause as usize]),
        ));
    }
}

/// Renders the Prometheus text: the recorder's metrics, then the [`SERIES`] and the
/// per-gateway series of the gateways in `gateways` now.
pub fn render(gateways: &GatewaySet) -> String {
    let handle = handle();
    if let Some((open, max)) = descriptors() {
        gauge!(OPEN_FILES).set(open as f64);
        gauge!(MAX_OPEN_FILES).set(max as f64);
    }
    handle.run_upkeep();
    let mut out = handle.render();
    render_atomic_series(&mut out);
    render_per_gateway(&mut out, &gateways.snapshot());
    out
}

/// Appends [`WORKER_SESSIONS`], one sample per session worker (none without workers: with
/// one thread, every session is on the main runtime).
pub(crate) fn render_per_worker(out: &mut String, sessions: &[usize]) {
    use wasmbed_admin::exposition::{family, sample};
    if sessions.is_empty() {
        return;
    }
    family(
        out,
        WORKER_SESSIONS,
        "gauge",
        "Sessions on each session worker (--threads above 1), by worker: its live tasks but for its accept loops and its links' own tasks, which is what a connection's placement compares (a terminated session counts twice for the moment its handshake hands over).",
    );
    for (i, n) in sessions.iter().enumerate() {
        sample(out, WORKER_SESSIONS, &[("worker", &i.to_string())], n);
    }
}

/// Appends [`PER_GATEWAY`] for `gateways`, by name. `pool` on the gauges: the balance is kept
/// within a pool, so a spread is only meaningful there (alerts and panels group by it).
fn render_per_gateway(out: &mut String, gateways: &[std::sync::Arc<Gateway>]) {
    use wasmbed_admin::exposition::{family, sample};
    let mut gateways: Vec<_> = gateways.iter().collect();
    gateways.sort_by(|a, b| a.name.cmp(&b.name));
    let mut samples = Vec::new();
    for (name, kind, help, each) in PER_GATEWAY {
        family(out, name, kind, help);
        for g in &gateways {
            samples.clear();
            each(g, &mut samples);
            for (label, value) in &samples {
                // gateway, then pool (gauges: the balance is kept within a pool), then the
                // sample's own label.
                let mut labels = [("gateway", g.name.as_str()), ("", ""), ("", "")];
                let mut n = 1;
                if kind == "gauge" {
                    labels[n] = ("pool", g.pool.as_str());
                    n += 1;
                }
                if let Some(l) = label {
                    labels[n] = *l;
                    n += 1;
                }
                sample(out, name, &labels[..n], value);
            }
        }
        if name == SESSIONS_CANCELLED {
            samples.clear();
            cancelled(&UNASSIGNED, &mut samples);
            for (label, value) in samples.iter().filter(|(_, v)| *v > 0) {
                if let Some(label) = label {
                    sample(out, name, &[("gateway", ""), *label], value);
                }
            }
        }
    }
}

/// Open descriptors and the soft limit, read at scrape time (Linux: /proc/self/fd).
fn descriptors() -> Option<(usize, u64)> {
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count();
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).ok()?;
    Some((open, soft))
}

/// Handles to the metrics a session touches, registered once so that the per-connection path
/// bumps atomics instead of building and hashing metric keys.
pub struct Meters {
    /// Device connections open now, TCP (`transport="tcp"`).
    pub open: &'static AtomicSeries,
    /// QUIC device connections past their handshake, open now (`transport="quic"`).
    pub open_quic: &'static AtomicSeries,
    /// TLS handshakes with devices over TCP.
    pub handshake: &'static AtomicHistogram,
    /// QUIC handshakes with devices.
    pub handshake_quic: &'static AtomicHistogram,
    pub connect: &'static AtomicHistogram,
    pub bytes_up: &'static AtomicSeries,
    pub bytes_down: &'static AtomicSeries,
    pub devices: Counter,
    pub replayed: Counter,
    pub duplicates: Counter,
    pub held: Gauge,
    pub pause: Histogram,
    pub overflows: Counter,
    /// QUIC device connections by what became of them (`wasmbed_proxy_quic_connections_total`).
    pub quic: QuicMeters,
}

/// `wasmbed_proxy_quic_connections_total`, by `result`.
pub struct QuicMeters {
    pub accepted: Counter,
    pub handshake_failed: Counter,
    pub retry: Counter,
    pub refused_full: Counter,
    pub refused_busy: Counter,
}

impl Meters {
    pub fn new() -> Meters {
        handle();
        Meters {
            open: &SERIES.open_tcp,
            open_quic: &SERIES.open_quic,
            handshake: &SERIES.handshake_tcp,
            handshake_quic: &SERIES.handshake_quic,
            connect: &SERIES.connect,
            bytes_up: &SERIES.bytes_up,
            bytes_down: &SERIES.bytes_down,
            devices: counter!(DEVICES),
            replayed: counter!(REPLAYED),
            duplicates: counter!(DUPLICATES_DROPPED),
            held: gauge!(HELD),
            pause: histogram!(MOVE_PAUSE),
            overflows: counter!(REPLAY_OVERFLOWS),
            quic: QuicMeters {
                accepted: counter!(QUIC_CONNECTIONS, "result" => "accepted"),
                handshake_failed: counter!(QUIC_CONNECTIONS, "result" => "handshake_failed"),
                retry: counter!(QUIC_CONNECTIONS, "result" => "retry"),
                refused_full: counter!(QUIC_CONNECTIONS, "result" => "refused_full"),
                refused_busy: counter!(QUIC_CONNECTIONS, "result" => "refused_busy"),
            },
        }
    }
}

impl Default for Meters {
    fn default() -> Self {
        Meters::new()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wasmbed_config::GatewayConfig;

    use super::*;

    /// A histogram kept in atomics renders as the recorder's did: cumulative buckets with
    /// the recorder's bounds (a value at a bound counts in that bound's bucket, `le` being
    /// inclusive), `+Inf`, the sum in seconds, the count.
    #[test]
    fn an_atomic_histogram_renders_cumulative_buckets_sum_and_count() {
        let h = AtomicHistogram::new();
        for micros in [100, 300, 1_000_000, 10_000_000] {
            h.record(Duration::from_micros(micros));
        }
        let mut text = String::new();
        h.render(&mut text, "t_seconds", &[("transport", "tcp")]);
        for line in [
            r#"t_seconds_bucket{transport="tcp",le="0.0001"} 1"#,
            r#"t_seconds_bucket{transport="tcp",le="0.00025"} 1"#,
            r#"t_seconds_bucket{transport="tcp",le="0.0005"} 2"#,
            r#"t_seconds_bucket{transport="tcp",le="0.5"} 2"#,
            r#"t_seconds_bucket{transport="tcp",le="1"} 3"#,
            r#"t_seconds_bucket{transport="tcp",le="5"} 3"#,
            r#"t_seconds_bucket{transport="tcp",le="+Inf"} 4"#,
            r#"t_seconds_sum{transport="tcp"} 11.0004"#,
            r#"t_seconds_count{transport="tcp"} 4"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing: {text}");
        }
        assert_eq!(text.lines().count(), LATENCY_BUCKETS.len() + 3, "{text}");
    }

    /// The per-gateway series beside the recorder's: each metric's HELP and TYPE once, a
    /// name with the text format's special characters escaped (a gateway named in DNS or by
    /// the admin API must not break the page), and a gateway gone from the set gone from it.
    #[test]
    fn per_gateway_series_are_one_block_each_escaped_and_of_the_set() {
        let config = |name: &str| GatewayConfig {
            name: name.into(),
            addr: "127.0.0.1:1".into(),
            health_addr: None,
            weight: 1,
            pool: "default".into(),
        };
        let odd = "a\"b\\c\nd";
        let set = GatewaySet::new(&[config("gw-0"), config(odd)], Duration::ZERO);
        let text = render(&set);
        // The atomic series too (kept apart from the recorder, rendered beside it).
        let atomic = [BYTES, OPEN, HANDSHAKE, CONNECT];
        for name in PER_GATEWAY.iter().map(|(name, ..)| *name).chain(atomic) {
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name}: {text}"
            );
        }
        for series in [
            r#"wasmbed_proxy_bytes_total{direction="upstream"} "#,
            r#"wasmbed_proxy_bytes_total{direction="downstream"} "#,
            r#"wasmbed_proxy_connections_open{transport="tcp"} "#,
            r#"wasmbed_proxy_connections_open{transport="quic"} "#,
            r#"wasmbed_proxy_handshake_duration_seconds_count{transport="tcp"} "#,
            r#"wasmbed_proxy_handshake_duration_seconds_count{transport="quic"} "#,
            r#"wasmbed_proxy_connect_duration_seconds_bucket{le="+Inf"} "#,
        ] {
            assert_eq!(text.matches(series).count(), 1, "{series}: {text}");
        }
        assert!(
            text.contains(r#"wasmbed_proxy_gateway_up{gateway="a\"b\\c\nd",pool="default"} 1"#),
            "{text}"
        );
        assert!(
            !text.contains("a\"b\\c\nd"),
            "a raw name in the page: {text}"
        );
        set.remove(odd);
        let text = render(&set);
        assert!(!text.contains(r#"gateway="a\"b"#), "{text}");
        assert!(text.contains(r#"wasmbed_proxy_sessions_started_total{gateway="gw-0"} 0"#));
    }
}
