//! Every default, once: the config uses these, the `--help` texts print them, and a test
//! checks that `docs/proxy.md` and `docs/gateway.md` show the same values.

use std::time::Duration;

/// Defaults of `wasmbed proxy`.
pub mod proxy {
    use super::Duration;

    pub const LISTEN: &str = "127.0.0.1:8443";
    pub const ADMIN: &str = "127.0.0.1:9900";
    pub const POOL: &str = "default";
    pub const BACKLOG: u32 = 4096;
    /// `[[listener]] defer_accept`: one SYN-ACK's wait, as HAProxy's `defer-accept`.
    pub const DEFER_ACCEPT: Duration = Duration::from_secs(1);
    pub const WEIGHT: u32 = 1;
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
    /// The probe deadline is half the interval, at most this.
    pub const HEALTH_TIMEOUT_MAX: Duration = Duration::from_millis(500);
    pub const HEALTH_PATH: &str = "/healthz";
    pub const RISE: u32 = 2;
    pub const FALL: u32 = 3;
    pub const MAX_CONNECTIONS: usize = 9_500;
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    pub const CONNECT_RETRIES: u32 = 2;
    pub const MAX_CLIENT_HELLO: usize = 16 * 1024;
    pub const SLOW_START: Duration = Duration::ZERO;
    pub const GRACE: Duration = Duration::from_secs(10);
    /// Terminate mode passes CHECKPOINTs on to devices: a proxy's death costs a reconnect,
    /// never app state.
    pub const FORWARD_CHECKPOINTS: bool = true;
    /// Bytes (64 KiB). Reading stops once the window holds this much, so it may exceed it by
    /// the one frame that crossed the line.
    pub const REPLAY_WINDOW: usize = 64 << 10;
    pub const MIGRATE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const MOVE_RATE: u32 = 2_000;
    pub const REBALANCE_THRESHOLD: u32 = 2;
    pub const REBALANCE_COOLDOWN: Duration = Duration::from_secs(60);
    /// DNS discovery: how long one query may take.
    pub const DNS_TIMEOUT: Duration = Duration::from_secs(2);
    /// DNS discovery: how long an address gone from the answers keeps its sessions (drained)
    /// before it leaves the set.
    pub const DNS_GRACE: Duration = Duration::from_secs(60);
    /// DNS discovery: most addresses taken from one name's answer.
    pub const MAX_DISCOVERED: usize = 1024;
    /// DNS discovery: answers are re-resolved at their TTL, clamped to this range.
    pub const DNS_REFRESH_MIN: Duration = Duration::from_secs(1);
    pub const DNS_REFRESH_MAX: Duration = Duration::from_secs(30);
    /// `--upstream link`: a link silent this long is lost.
    pub const LINK_TIMEOUT: Duration = Duration::from_secs(1);
    /// A QUIC device silent this long is gone.
    pub const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    /// Device handshakes in progress at once (TLS over TCP and QUIC); past it new devices
    /// wait in line for [`HANDSHAKE_WAIT`], then are refused.
    pub const MAX_HANDSHAKES: usize = 512;
    /// How long a device past [`MAX_HANDSHAKES`] waits for a slot (at most 3/5 of the
    /// handshake's own timeout when not given). Long enough that a storm's devices keep
    /// their TLS tickets (a refused QUIC attempt spends one), short enough to leave a
    /// resumed handshake its time within a device's 5 s connect timeout.
    pub const HANDSHAKE_WAIT: Duration = Duration::from_secs(3);
}

/// Defaults of `wasmbed gateway`.
pub mod gateway {
    use super::Duration;

    pub const LISTEN: &str = "127.0.0.1:9001";
    pub const ADMIN: &str = "127.0.0.1:9101";
    pub const NAME: &str = "gateway";
    pub const CALL_TIMEOUT: Duration = Duration::from_millis(50);
    /// Bytes (4 MiB).
    pub const MAX_MEMORY: usize = 4 << 20;
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const GRACE: Duration = Duration::from_secs(10);
    pub const MAX_SESSIONS: u32 = 10_000;
    pub const MAX_FRAME: usize = wasmbed_protocol::DEFAULT_MAX_FRAME;
    /// Bytes (16 KiB).
    pub const MAX_STATE: usize = 16 << 10;
    pub const TICKET_LIFETIME: Duration = Duration::from_secs(24 * 3600);
    pub const CHECKPOINT: &str = "every";
    /// Bytes (16 MiB).
    pub const MAX_APP_SIZE: usize = 16 << 20;
}

/// A duration as the docs and `--help` write it: `1s`, `50ms`, `0s`.
pub fn show(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A size in bytes as the docs write it: `4MiB`, `512KiB`, `100`.
pub fn show_size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => b.to_string(),
    }
}

/// `(documented option, its default as the docs show it)` for `docs/proxy.md`: the option is
/// the text of the row's first column (a flag) or second (a file key).
pub fn proxy_documented() -> Vec<(&'static str, String)> {
    use proxy::*;
    vec![
        ("`--listen ADDR`", format!("`{LISTEN}`")),
        ("`[[listener]] backlog`", format!("`{BACKLOG}`")),
        (
            "`[[listener]] defer_accept`",
            format!("`{}`", show(DEFER_ACCEPT)),
        ),
        ("`[[gateway]] weight`", format!("`{WEIGHT}`")),
        ("`[[gateway]] pool`", format!("`{POOL}`")),
        ("`--admin ADDR\\|off`", format!("`{ADMIN}`")),
        (
            "`--health-interval D`",
            format!("`{}`", show(HEALTH_INTERVAL)),
        ),
        (
            "`--health-timeout D`",
            format!("half the interval, at most `{}`", show(HEALTH_TIMEOUT_MAX)),
        ),
        ("`--health-path PATH`", format!("`{HEALTH_PATH}`")),
        ("`--rise N`", format!("`{RISE}`")),
        ("`--fall N`", format!("`{FALL}`")),
        ("`--max-connections N`", format!("`{MAX_CONNECTIONS}`")),
        (
            "`handshake_timeout`",
            format!("`{}`", show(HANDSHAKE_TIMEOUT)),
        ),
        (
            "`--handshake-wait D`",
            format!("`{}`", show(HANDSHAKE_WAIT)),
        ),
        ("`connect_timeout`", format!("`{}`", show(CONNECT_TIMEOUT))),
        ("`connect_retries`", format!("`{CONNECT_RETRIES}`")),
        ("`max_client_hello`", format!("`{MAX_CLIENT_HELLO}`")),
        ("`slow_start`", format!("`{}`", show(SLOW_START))),
        ("`--grace D`", format!("`{}`", show(GRACE))),
        (
            "`--replay-window SIZE`",
            format!("`{}`", show_size(REPLAY_WINDOW)),
        ),
        (
            "`--migrate-timeout D`",
            format!("`{}`", show(MIGRATE_TIMEOUT)),
        ),
        ("`--move-rate N`", format!("`{MOVE_RATE}`")),
        (
            "`--rebalance-threshold N`",
            format!("`{REBALANCE_THRESHOLD}`"),
        ),
        (
            "`--rebalance-cooldown D`",
            format!("`{}`", show(REBALANCE_COOLDOWN)),
        ),
    ]
}

/// The same for `docs/gateway.md` (whose table has no file-key column).
pub fn gateway_documented() -> Vec<(&'static str, String)> {
    use gateway::*;
    vec![
        ("`--listen ADDR`", format!("`{LISTEN}`")),
        ("`--admin ADDR\\|off`", format!("`{ADMIN}`")),
        ("`--name NAME`", format!("`{NAME}`")),
        ("`--call-timeout D`", format!("`{}`", show(CALL_TIMEOUT))),
        (
            "`--max-memory SIZE`",
            format!("`{}`", show_size(MAX_MEMORY)),
        ),
        ("`--idle-timeout D`", format!("`{}`", show(IDLE_TIMEOUT))),
        ("`--grace D`", format!("`{}`", show(GRACE))),
        ("`--max-sessions N`", format!("`{MAX_SESSIONS}`")),
        ("`--max-frame BYTES`", format!("`{MAX_FRAME}`")),
        ("`--max-state SIZE`", format!("`{}`", show_size(MAX_STATE))),
        (
            "`--ticket-lifetime D`",
            format!("`{}`", show(TICKET_LIFETIME)),
        ),
        ("`--checkpoint every\\|N\\|off`", format!("`{CHECKPOINT}`")),
        (
            "`--max-app-size SIZE`",
            format!("`{}`", show_size(MAX_APP_SIZE)),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default column of the table row whose first or second column is `option`.
    fn documented_default(doc: &str, option: &str, default_column: usize) -> Option<String> {
        doc.lines().find_map(|line| {
            let cols: Vec<&str> = split_row(line);
            let names = &cols[..default_column.min(cols.len())];
            names
                .iter()
                .any(|c| {
                    c.split(" (").next() == Some(option) || c.starts_with(&format!("{option},"))
                })
                .then(|| cols.get(default_column).map(|c| c.to_string()))
                .flatten()
        })
    }

    /// Table cells, splitting on `|` but not on `\|`.
    fn split_row(line: &str) -> Vec<&str> {
        let t = line.trim();
        if !t.starts_with('|') {
            return Vec::new();
        }
        let mut cells = Vec::new();
        let mut start = 1;
        let bytes = t.as_bytes();
        for i in 1..bytes.len() {
            if bytes[i] == b'|' && bytes[i - 1] != b'\\' {
                cells.push(t[start..i].trim());
                start = i + 1;
            }
        }
        cells
    }

    fn check(doc: &str, name: &str, rows: Vec<(&'static str, String)>, column: usize) {
        for (option, default) in rows {
            let shown = documented_default(doc, option, column)
                .unwrap_or_else(|| panic!("{name} has no row for {option}"));
            assert_eq!(shown, default, "{name}: the default of {option}");
        }
    }

    #[test]
    fn the_docs_show_the_defaults_the_code_uses() {
        check(
            include_str!("../../docs/proxy.md"),
            "docs/proxy.md",
            proxy_documented(),
            2,
        );
        check(
            include_str!("../../docs/gateway.md"),
            "docs/gateway.md",
            gateway_documented(),
            1,
        );
    }

    #[test]
    fn shown_values_read_as_the_docs_write_them() {
        assert_eq!(show(Duration::from_millis(50)), "50ms");
        assert_eq!(show(Duration::ZERO), "0s");
        assert_eq!(show_size(4 << 20), "4MiB");
        assert_eq!(show_size(512 << 10), "512KiB");
        assert_eq!(show_size(100), "100");
    }
}
