//! The fleet report: a table for people, JSON for scripts.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use wasmbed_config::LoadtestSettings;

use crate::{DeviceOutcome, Histograms};

/// Percentiles of one latency, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Devices per gateway, with its summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Spread {
    pub gateways: BTreeMap<String, usize>,
    pub mean: f64,
    pub variance: f64,
    pub max_minus_min: usize,
}

impl Spread {
    pub fn of(gateways: &BTreeMap<String, usize>) -> Spread {
        let n = gateways.len().max(1) as f64;
        let mean = gateways.values().sum::<usize>() as f64 / n;
        let variance = gateways
            .values()
            .map(|&c| (c as f64 - mean).powi(2))
            .sum::<f64>()
            / n
            // An empty float sum is -0.0: print 0.00, not -0.00, when no device connected.
            + 0.0;
        let max = gateways.values().max().copied().unwrap_or(0);
        let min = gateways.values().min().copied().unwrap_or(0);
        Spread {
            gateways: gateways.clone(),
            mean,
            variance,
            max_minus_min: max - min,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Messages {
    pub sent: u64,
    pub answered: u64,
    pub errors: u64,
    /// The ERRORs counted in `errors`, by cause (`ERROR frame_too_large (...)`).
    pub error_causes: BTreeMap<String, u64>,
    /// Sent but never answered (not even after a resend).
    pub lost: u64,
    pub duplicated: u64,
}

/// What a fleet run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub app: String,
    pub devices: usize,
    pub connected: usize,
    /// Devices that never got a session, by their last reason.
    pub failed: BTreeMap<String, usize>,
    pub spread: Spread,
    pub messages: Messages,
    pub reconnects: u64,
    /// `--rebind-after`: the fleet's UDP sockets moved to a new port (QUIC).
    pub rebinds: u64,
    /// Devices whose app state restarted during the run (checked with the `counter` app only:
    /// a REPLY whose message count went down).
    pub state_resets: usize,
    /// Devices that got at least one CHECKPOINT (the gateways seal tickets).
    pub tickets: usize,
    /// Reconnections that resumed their session from a ticket.
    pub resumed: u64,
    /// Tickets refused, by reason.
    pub resume_refused: BTreeMap<String, u64>,
    /// DATA the resumed session already covered: answered ERROR `duplicate`, or its answer
    /// lost with the connection (`Covered` events of the device library).
    pub duplicates_refused: u64,
    pub handshake_us: Percentiles,
    pub welcome_us: Percentiles,
    pub reply_us: Percentiles,
    pub rehome_us: Percentiles,
    pub seconds: f64,
}

impl Report {
    pub fn build(
        settings: &LoadtestSettings,
        outcomes: &[DeviceOutcome],
        spread: &BTreeMap<String, usize>,
        hist: &Histograms,
        elapsed: Duration,
    ) -> Report {
        let mut r = Report {
            app: settings.app.clone(),
            devices: settings.devices,
            spread: Spread::of(spread),
            handshake_us: Percentiles::of(&hist.handshake),
            welcome_us: Percentiles::of(&hist.welcome),
            reply_us: Percentiles::of(&hist.reply),
            rehome_us: Percentiles::of(&hist.rehome),
            seconds: elapsed.as_secs_f64(),
            ..Report::default()
        };
        for o in outcomes {
            if o.welcomed {
                r.connected += 1;
            } else {
                let reason = o.failure.clone().unwrap_or_else(|| "not started".into());
                *r.failed.entry(reason).or_default() += 1;
            }
            r.messages.sent += o.sent;
            r.messages.answered += o.answered;
            r.messages.errors += o.errors;
            for (cause, n) in &o.error_causes {
                *r.messages.error_causes.entry(cause.clone()).or_default() += n;
            }
            r.messages.lost += o.lost;
            r.messages.duplicated += o.duplicated;
            r.reconnects += o.reconnects;
            r.state_resets += usize::from(o.state_resets > 0);
            r.tickets += usize::from(o.tickets);
            r.resumed += o.resumed;
            r.duplicates_refused += o.duplicates_refused;
            for (reason, n) in &o.resume_refused {
                *r.resume_refused.entry(reason.clone()).or_default() += n;
            }
        }
        r
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The report as a table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "devices   {} connected of {} ({:.1} s)",
            self.connected, self.devices, self.seconds
        );
        for (reason, n) in &self.failed {
            let _ = writeln!(t, "  failed  {n:>6}  {reason}");
        }
        let s = &self.spread;
        let gws: Vec<String> = s.gateways.iter().map(|(g, n)| format!("{g}={n}")).collect();
        let _ = writeln!(
            t,
            "spread    {}  (mean {:.1}, variance {:.2}, max-min {})",
            gws.join(" "),
            s.mean,
            s.variance,
            s.max_minus_min
        );
        let m = &self.messages;
        let _ = writeln!(
            t,
            "messages  sent {}  answered {}  errors {}  lost {}  duplicated {}",
            m.sent, m.answered, m.errors, m.lost, m.duplicated
        );
        // The causes, most frequent first (at most five lines).
        let mut causes: Vec<(&String, &u64)> = m.error_causes.iter().collect();
        causes.sort_by(|a, b| b.1.cmp(a.1));
        for (cause, n) in causes.iter().take(5) {
            let _ = writeln!(t, "  errors {n:>6}  {cause}");
        }
        let _ = writeln!(t, "reconnects {}", self.reconnects);
        if self.rebinds > 0 {
            let _ = writeln!(
                t,
                "rebinds   {} UDP sockets moved (every device's source port changed mid-session)",
                self.rebinds
            );
        }
        if self.tickets > 0 {
            let refused: Vec<String> = self
                .resume_refused
                .iter()
                .map(|(r, n)| format!("{r}={n}"))
                .collect();
            let _ = writeln!(
                t,
                "sessions  {} devices got tickets; resumed {}; refused [{}]; duplicates refused {}",
                self.tickets,
                self.resumed,
                refused.join(" "),
                self.duplicates_refused
            );
        }
        if checks_state(self) {
            let _ = writeln!(
                t,
                "state     {} devices saw their app state restart",
                self.state_resets
            );
        }
        let _ = writeln!(
            t,
            "latency (us)      count      p50      p90      p99    p99.9      max"
        );
        for (name, p) in [
            ("handshake", &self.handshake_us),
            ("welcome", &self.welcome_us),
            ("reply", &self.reply_us),
            ("re-home", &self.rehome_us),
        ] {
            let _ = writeln!(
                t,
                "  {name:<12} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}",
                p.count, p.p50, p.p90, p.p99, p.p999, p.max
            );
        }
        t
    }
}

impl Report {
    /// Whether the run kept its promises: every device connected, nothing lost, and, where
    /// the gateways sealed tickets, no app state restarted.
    pub fn passed(&self) -> bool {
        self.connected == self.devices
            && self.messages.lost == 0
            && (self.tickets == 0 || self.state_resets == 0)
    }
}

/// Whether the run's app was one whose state the fleet checks.
fn checks_state(r: &Report) -> bool {
    r.app == crate::COUNTER_APP
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_summarises_counts() {
        let m: BTreeMap<String, usize> = [("a", 24), ("b", 23), ("c", 20), ("d", 19), ("e", 14)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let s = Spread::of(&m);
        assert_eq!(s.max_minus_min, 10);
        assert!((s.mean - 20.0).abs() < 1e-9);
        assert!((s.variance - 12.4).abs() < 1e-9);
        let empty = Spread::of(&BTreeMap::new());
        assert_eq!(format!("{:.2}", empty.variance), "0.00");
    }
}
