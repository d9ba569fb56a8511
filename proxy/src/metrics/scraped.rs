//! The series of the whole process that every session touches, kept in plain atomics and
//! rendered at each scrape beside the recorder's output: the byte counts, the open
//! connections, and the latency histograms every connection records.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{BYTES, CONNECT, HANDSHAKE, LATENCY_BUCKETS, OPEN};

/// A counter or gauge of the whole process kept in a plain atomic and rendered at each
/// scrape ([`SERIES`], [`super::render`]), as the per-gateway series are: for the series that every
/// session touches on its way (the byte counts at each chunk read, the open connections).
/// A handle of the recorder's costs two indirect calls and a second atomic (its generation)
/// per touch, a gauge a compare-and-swap loop on a float (measured: docs/performance.md,
/// "The accept loop's waits and the sessions' series").
///
/// Each on a cache line of its own (128 bytes: the line and the one x86 prefetches with it,
/// as crossbeam's `CachePadded`): the workers of a multi-threaded runtime bump them all the
/// time, the upstream and downstream counts from different threads.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct AtomicSeries(AtomicU64);

impl AtomicSeries {
    pub const fn new() -> AtomicSeries {
        AtomicSeries(AtomicU64::new(0))
    }

    pub fn increment(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// A gauge's decrement (each paired with an earlier increment of the same series).
    pub fn decrement(&self, n: u64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A latency histogram of the whole process in plain atomics (per bucket, and the sum in
/// nanoseconds), rendered at each scrape with [`LATENCY_BUCKETS`] as the recorder renders
/// its own: for the two every connection records (its handshake, its gateway connect). A
/// record of the recorder's takes a clock read, an epoch pin and a push into a bucket that
/// its upkeep drains later (about 140 instructions, and 75 more per record in the upkeep;
/// measured: docs/performance.md, "What the gap to the floor is made of"); this one takes a
/// search over 15 bounds and two atomic adds.
#[derive(Debug)]
#[repr(align(128))]
pub struct AtomicHistogram {
    /// Observations per bucket, not cumulative: `[i]` those in `(LATENCY_BUCKETS[i - 1],
    /// LATENCY_BUCKETS[i]]`, the last those above every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    pub const fn new() -> AtomicHistogram {
        AtomicHistogram {
            buckets: [const { AtomicU64::new(0) }; LATENCY_BUCKETS.len() + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn record(&self, elapsed: std::time::Duration) {
        let seconds = elapsed.as_secs_f64();
        // The first bound at or above it (`le` is inclusive); past the last, the `+Inf` bucket.
        let at = LATENCY_BUCKETS.partition_point(|&bound| bound < seconds);
        if let Some(bucket) = self.buckets.get(at) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Appends this histogram's series under `name` with `labels` (`_bucket` cumulative up to
    /// `+Inf`, `_sum` in seconds, `_count`), the family's HELP and TYPE written by the caller.
    pub(super) fn render(&self, out: &mut String, name: &str, labels: &[(&str, &str)]) {
        use wasmbed_admin::exposition::sample;
        let bucket = format!("{name}_bucket");
        // The bounds as the recorder writes them (`f64`'s `Display`: `1`, `0.0001`).
        let les = LATENCY_BUCKETS.iter().map(f64::to_string);
        let les: Vec<String> = les.chain(["+Inf".to_string()]).collect();
        let mut count = 0u64;
        for (n, le) in self.buckets.iter().zip(&les) {
            count += n.load(Ordering::Relaxed);
            let mut with_le = labels.to_vec();
            with_le.push(("le", le));
            sample(out, &bucket, &with_le, count);
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        sample(out, &format!("{name}_sum"), labels, sum);
        sample(out, &format!("{name}_count"), labels, count);
    }
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        AtomicHistogram::new()
    }
}

/// The process's [`AtomicSeries`] and [`AtomicHistogram`]s: one per series, shared by every
/// context (as the recorder's series are).
pub(crate) struct ScrapedSeries {
    /// `wasmbed_proxy_bytes_total{direction="upstream"}`.
    pub bytes_up: AtomicSeries,
    /// `wasmbed_proxy_bytes_total{direction="downstream"}`.
    pub bytes_down: AtomicSeries,
    /// `wasmbed_proxy_connections_open{transport="tcp"}`.
    pub open_tcp: AtomicSeries,
    /// `wasmbed_proxy_connections_open{transport="quic"}`.
    pub open_quic: AtomicSeries,
    /// `wasmbed_proxy_handshake_duration_seconds{transport="tcp"}`.
    pub handshake_tcp: AtomicHistogram,
    /// `wasmbed_proxy_handshake_duration_seconds{transport="quic"}`.
    pub handshake_quic: AtomicHistogram,
    /// `wasmbed_proxy_connect_duration_seconds`.
    pub connect: AtomicHistogram,
}

pub(crate) static SERIES: ScrapedSeries = ScrapedSeries {
    bytes_up: AtomicSeries::new(),
    bytes_down: AtomicSeries::new(),
    open_tcp: AtomicSeries::new(),
    open_quic: AtomicSeries::new(),
    handshake_tcp: AtomicHistogram::new(),
    handshake_quic: AtomicHistogram::new(),
    connect: AtomicHistogram::new(),
};

/// Appends the [`SERIES`], each family in one block as the recorder's are.
pub(super) fn render_atomic_series(out: &mut String) {
    use wasmbed_admin::exposition::{family, sample};
    let t = &SERIES;
    family(
        out,
        BYTES,
        "counter",
        "Bytes forwarded, by direction (upstream, downstream).",
    );
    sample(out, BYTES, &[("direction", "upstream")], t.bytes_up.get());
    sample(
        out,
        BYTES,
        &[("direction", "downstream")],
        t.bytes_down.get(),
    );
    family(
        out,
        OPEN,
        "gauge",
        "Device connections open now, by transport (tcp; quic: past the handshake).",
    );
    // As a signed number: a decrement without its increment would show, not wrap.
    sample(out, OPEN, &[("transport", "tcp")], t.open_tcp.get() as i64);
    sample(
        out,
        OPEN,
        &[("transport", "quic")],
        t.open_quic.get() as i64,
    );
    family(
        out,
        HANDSHAKE,
        "histogram",
        "Time from accept to a classified ClientHello (passthrough) or a finished TLS handshake (terminate); transport=quic: a QUIC device's handshake.",
    );
    t.handshake_tcp
        .render(out, HANDSHAKE, &[("transport", "tcp")]);
    t.handshake_quic
        .render(out, HANDSHAKE, &[("transport", "quic")]);
    family(out, CONNECT, "histogram", "Time to connect to a gateway.");
    t.connect.render(out, CONNECT, &[]);
}
