//! `wasmbed proxy` configuration: the TOML file, the flags laid over it, and validation.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ConfigError, LogFormat, duration_or, parse_addr, read_toml};

/// What the proxy does with a device's TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Peek at the ClientHello (SNI, ALPN) and forward the device's TLS untouched.
    #[default]
    Passthrough,
    /// Complete the TLS handshake at the proxy and forward the decrypted bytes.
    Terminate,
}

/// How a gateway's health is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheck {
    /// `http` for gateways with a health address, `tcp` for the others.
    #[default]
    Auto,
    /// A TCP connect to the gateway's address.
    Tcp,
    /// A TLS handshake with the gateway (certificate not verified: liveness only).
    Tls,
    /// `GET --health-path` (default /healthz) on the gateway's health (admin) address: 200
    /// means up; 200 or 503 with a body saying `"status": "draining"` means draining (alive,
    /// no new sessions, not down).
    Http,
    /// No probes: every gateway is up unless connects to it fail.
    None,
}

/// Flags of `wasmbed proxy`. Each one, when given, overrides the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ProxyFlags {
    /// TOML config file (see config/examples/proxy.toml). Flags override it.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address devices dial, IP:PORT. Repeatable; replaces the file's listeners.
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<String>,
    /// passthrough: forward the device's TLS untouched; terminate: end TLS here.
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// A gateway: [NAME=]HOST:PORT[;weight=N][;health=HOST:PORT][;pool=P]. Repeatable, or
    /// comma-separated; replaces the file's gateways.
    #[arg(long, value_name = "GATEWAY")]
    pub gateway: Vec<String>,
    #[arg(long, value_name = "ADDR", help = format!("Admin HTTP endpoint (/healthz, /readyz, /metrics, /api/gateways), or `off`. Default {}.", crate::defaults::proxy::ADMIN))]
    pub admin: Option<String>,
    /// Health check kind. auto = http where a gateway has a health address, else tcp.
    #[arg(long, value_enum)]
    pub health: Option<HealthCheck>,
    #[arg(long, value_name = "DURATION", help = format!("Time between two probes of one gateway (jittered by up to 10%). Default {}.", crate::defaults::show(crate::defaults::proxy::HEALTH_INTERVAL)))]
    pub health_interval: Option<String>,
    #[arg(long, value_name = "DURATION", help = format!("Deadline of one probe; must be shorter than the interval. Default: half the interval, at most {}.", crate::defaults::show(crate::defaults::proxy::HEALTH_TIMEOUT_MAX)))]
    pub health_timeout: Option<String>,
    #[arg(long, value_name = "PATH", help = format!("Path of the http probe. Default {} (a gateway's /readyz also reports its sessions, and answers 503 while it drains).", crate::defaults::proxy::HEALTH_PATH))]
    pub health_path: Option<String>,
    /// No liveness watch (`GET /api/alive` held on each gateway's admin address, which finds
    /// a killed gateway at once): probes alone decide. For gateways behind something that
    /// cuts long-lived idle connections, and to measure what the watch saves.
    #[arg(long)]
    pub no_liveness_watch: bool,
    #[arg(long, value_name = "N", help = format!("Consecutive successful probes that mark a down gateway up. Default {}.", crate::defaults::proxy::RISE))]
    pub rise: Option<u32>,
    #[arg(long, value_name = "N", help = format!("Consecutive failed probes (or failed connects) that mark a gateway down. Default {}.", crate::defaults::proxy::FALL))]
    pub fall: Option<u32>,
    /// Terminate mode: the proxy's certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Terminate mode: the proxy's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Terminate mode: CA (PEM) that device certificates must chain to; makes them required.
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// Terminate mode: a CRL (PEM) that device certificates are checked against. Repeatable.
    /// Re-read, with the certificate and key, on SIGHUP: a live session whose device is revoked
    /// then gets ERROR revoked and is closed.
    #[arg(long, value_name = "FILE")]
    pub client_crl: Vec<PathBuf>,
    /// Terminate mode: no TLS session resumption for devices (no session cache, no tickets):
    /// every handshake is a full one. For comparing full handshakes (benchmarks), or when
    /// devices must present their certificate on every connection.
    #[arg(long)]
    pub no_tls_resumption: bool,
    /// Terminate mode: seal the devices' TLS session tickets under this key ring (TOML
    /// `[[key]]` entries, as `wasmbed certs init` writes to proxy-tickets.toml), re-read on
    /// SIGHUP. Replicas given the same file resume each other's devices; without it each
    /// process seals under keys of its own (a device that reaches another replica, or this
    /// one after a restart, runs a full handshake).
    #[arg(long, value_name = "FILE")]
    pub tls_ticket_keys: Option<PathBuf>,
    /// Terminate mode: TLS to the gateways, verified against this CA (PEM).
    #[arg(long, value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,
    /// Terminate mode: the proxy's client certificate chain (PEM) for TLS to the gateways
    /// (with --upstream-key); `wasmbed certs init` writes proxy-client.pem.
    #[arg(long, value_name = "FILE")]
    pub upstream_cert: Option<PathBuf>,
    /// Terminate mode: the key of --upstream-cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub upstream_key: Option<PathBuf>,
    /// Terminate mode: the name checked against every gateway's certificate (as
    /// `[upstream_tls] server_name`). Default: each gateway's host, as it is dialed (an IP
    /// for discovered gateways, whose certificates rarely name their pod's address).
    #[arg(long, value_name = "NAME")]
    pub upstream_server_name: Option<String>,
    /// Accept plain (non-TLS) TCP on the listeners and forward it; otherwise it is closed.
    #[arg(long)]
    pub allow_plain: bool,
    /// Open the listeners with SO_REUSEPORT: several proxy processes on one address, the
    /// kernel spreading new connections over them (replicas on one host, or a new process
    /// started beside the old one before it stops).
    #[arg(long)]
    pub reuse_port: bool,
    #[arg(long, value_name = "DURATION", help = format!("How long the kernel holds a device's connection that has sent nothing before the proxy accepts it (Linux's TCP_DEFER_ACCEPT, on every listener): a connection is accepted once its first bytes (the ClientHello) arrive, so the proxy spends no descriptor, task or wake-up on one that sends nothing; past this it is accepted anyway and handshake_timeout applies. Every mode reads a device's first bytes before anything else, so no protocol waits on it. Linux rounds up to its SYN-ACK schedule (1s, 3s, 7s, 15s, 31s, 63s); 0 accepts at once. Default {}, at most 1m.", crate::defaults::show(crate::defaults::proxy::DEFER_ACCEPT)))]
    pub defer_accept: Option<String>,
    /// Terminate mode: the listeners forward the decrypted bytes as they are, for TLS clients
    /// that are not wasmbed devices (an HTTPS service behind the proxy, a benchmark): the
    /// client certificate is checked as for devices, but there is no HELLO check, no session
    /// anchoring and no moves; the gateway learns the client only from a PROXY v2 header.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, value_name = "N", help = format!("Most device connections open at once; past it the proxy stops accepting until one closes. Default {} (a session holds two descriptors).", crate::defaults::proxy::MAX_CONNECTIONS))]
    pub max_connections: Option<usize>,
    /// Threads serving sessions. Above 1, TCP device sessions run on that many session
    /// workers, each a one-thread event loop, and QUIC devices on a work-stealing runtime of
    /// as many threads. Default: every core this process may run on.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// A file holding the bearer token that POST/PUT/DELETE on the admin endpoint need.
    /// Without it, mutation is allowed only when the admin endpoint is on a loopback address.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub admin_tls: crate::admin::AdminTlsFlags,
    /// Send a PROXY protocol v2 header (the device's address; TLVs: SNI, and in terminate
    /// mode the verified device identity) to the gateways of this pool. Repeatable.
    #[arg(long, value_name = "POOL")]
    pub proxy_protocol: Vec<String>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    #[arg(long, value_name = "SIZE", help = format!("Terminate mode: DATA a session keeps for replay after its last checkpoint, in bytes (suffixes KiB, MiB). When full, the proxy stops reading from that device until a checkpoint frees room. Default {}.", crate::defaults::show_size(crate::defaults::proxy::REPLAY_WINDOW)))]
    pub replay_window: Option<String>,
    /// Terminate mode: CHECKPOINT frames go on to devices (the default; the proxy keeps the
    /// ticket either way), so a device whose proxy dies resumes its session, app state and
    /// all, through another. Kept for old command lines: it is on anyway.
    #[arg(long, conflicts_with = "no_forward_checkpoints")]
    pub forward_checkpoints: bool,
    /// Terminate mode: keep CHECKPOINT frames from the devices (TOML `forward_checkpoints =
    /// false`): devices that cannot store a ticket; a proxy's death then restarts their apps.
    #[arg(long)]
    pub no_forward_checkpoints: bool,
    #[arg(long, value_name = "DURATION", help = format!("Terminate mode: how long a session whose gateway is lost waits for another to take it before the device gets ERROR unavailable. Default {}.", crate::defaults::show(crate::defaults::proxy::MIGRATE_TIMEOUT)))]
    pub migrate_timeout: Option<String>,
    #[arg(long, value_name = "N", help = format!("Terminate mode: most sessions moved per second by drains and rebalancing (failover moves are not paced). Default {}.", crate::defaults::proxy::MOVE_RATE))]
    pub move_rate: Option<u32>,
    /// Terminate mode: move live sessions onto a gateway that joins or recovers, until the
    /// spread is within one (`on`/`off`; default off).
    #[arg(long, value_name = "on|off")]
    pub rebalance: Option<Toggle>,
    #[arg(long, value_name = "N", help = format!("Spread of sessions per gateway (max - min, by weight) above which rebalancing starts. Default {}.", crate::defaults::proxy::REBALANCE_THRESHOLD))]
    pub rebalance_threshold: Option<u32>,
    #[arg(long, value_name = "DURATION", help = format!("A session is not moved by rebalancing twice within this time. Default {}.", crate::defaults::show(crate::defaults::proxy::REBALANCE_COOLDOWN)))]
    pub rebalance_cooldown: Option<String>,
    /// Gateways found in DNS: every A/AAAA address of NAME (e.g. a headless Service) on PORT,
    /// as NAME:PORT[;pool=P][;weight=N][;health-port=N]. Repeatable. Re-resolved at the
    /// answer's TTL (clamped to 1s..30s); an error or an empty answer keeps the last good set.
    #[arg(long, value_name = "NAME:PORT")]
    pub gateway_dns: Vec<String>,
    /// Gateways found in DNS SRV records of NAME (target and port from each record), as
    /// NAME[;pool=P][;weight=N][;health-port=N]. Repeatable.
    #[arg(long, value_name = "NAME")]
    pub gateway_srv: Vec<String>,
    /// DNS server for discovery, IP:PORT. Repeatable. Default: the system's (/etc/resolv.conf,
    /// search domains included).
    #[arg(long, value_name = "ADDR")]
    pub dns_server: Vec<String>,
    #[arg(long, value_name = "DURATION", help = format!("Deadline of one discovery query. Default {}.", crate::defaults::show(crate::defaults::proxy::DNS_TIMEOUT)))]
    pub dns_timeout: Option<String>,
    #[arg(long, value_name = "DURATION", help = format!("An address gone from DNS takes no new sessions (terminate mode: its sessions move); it leaves the set once empty, or after this grace. Default {}.", crate::defaults::show(crate::defaults::proxy::DNS_GRACE)))]
    pub dns_grace: Option<String>,
    #[arg(long, value_name = "DURATION", help = format!("On SIGTERM or SIGINT: how long live sessions get to finish before they are closed (TOML `grace`). Default {}.", crate::defaults::show(crate::defaults::proxy::GRACE)))]
    pub grace: Option<String>,
    #[arg(
        long,
        value_name = "DURATION",
        help = "On SIGTERM or SIGINT: past this, the process ends whatever still runs, with a line naming it (HAProxy's hard-stop-after). Default: --grace plus 10 s. The value in use when the stop begins counts (a reload changes it). A second signal ends the process at once."
    )]
    pub hard_stop_after: Option<String>,
    /// Upgrade in place through the Unix socket at PATH: if a proxy started with the same
    /// PATH runs, this process takes its listening sockets (no connect is refused) and its
    /// passthrough sessions (device and gateway sockets, quiesced first: no byte lost); the
    /// old one hands its terminated sessions back to their devices and exits. Otherwise it
    /// starts fresh. Either way it then serves PATH for the next upgrade. Only a process of
    /// the same user holding the token (PATH.token, mode 0600) may take over.
    #[arg(long, value_name = "PATH")]
    pub takeover: Option<PathBuf>,
    #[arg(long, value_name = "N", help = format!("Most addresses taken from one name's answer (the rest are counted and ignored). Default {}.", crate::defaults::proxy::MAX_DISCOVERED))]
    pub max_discovered: Option<usize>,
    /// Passthrough: forward with splice(2) (socket -> pipe -> socket inside the kernel, no
    /// copy to user space) instead of read/write: `auto` (default) once a direction reads a
    /// full 64 KiB buffer (a bulk transfer), `on` for every chunk, `off` never. A pipe is held
    /// only while bytes are in flight.
    #[arg(long, value_enum, value_name = "off|on|auto")]
    pub splice: Option<SpliceMode>,
    /// Passthrough: when a gateway ends its side (FIN), pass the half-close on to the device and
    /// keep forwarding the device's bytes until it closes too (TCP half-close). Default: a
    /// gateway's end of stream ends the session once its bytes are written to the device, as a
    /// gateway closing its socket means. A device's end of stream is always passed on.
    #[arg(long)]
    pub half_close: bool,
    /// Terminate mode: how sessions reach their gateways: `tcp` (default), a connection each
    /// (TLS with [upstream_tls]); `link`, one multiplexed QUIC connection per gateway and
    /// session worker (`wasmbed gateway --link`, UDP at the gateway's session port) with a
    /// stream per session: no connect or handshake per session or per move, two descriptors
    /// fewer per session. Needs [upstream_tls] with the proxy's client certificate.
    #[arg(long, value_enum, value_name = "tcp|link")]
    pub upstream: Option<UpstreamMode>,
    /// Terminate mode: also accept devices over QUIC on this UDP address (IP:PORT): TLS 1.3
    /// with the same certificate and device CA, ALPN wasmbed/1, the session on the
    /// connection's first stream. A device's address may change mid-session (NAT rebinding).
    #[arg(long, value_name = "ADDR")]
    pub quic_listen: Option<String>,
    #[arg(long, value_name = "DURATION", help = format!("A QUIC device silent this long is gone (devices behind NAT should send keep-alives well within it). Default {}.", crate::defaults::show(crate::defaults::proxy::QUIC_IDLE_TIMEOUT)))]
    pub quic_idle_timeout: Option<String>,
    /// When QUIC devices must first prove their address (a stateless retry, one round trip
    /// more): `auto` (default) while many handshakes are in progress, `always`, `never`.
    #[arg(long, value_enum, value_name = "auto|always|never")]
    pub quic_retry: Option<QuicRetry>,
    #[arg(long, value_name = "N", help = format!("Terminate mode: device TLS handshakes in progress at once, TLS over TCP and QUIC together. Past it a new device waits in line up to --handshake-wait for a slot, its handshake not started; then it is refused (TCP: closed before its handshake; QUIC: CONNECTION_REFUSED) and counted (reason handshakes_busy), and tries again later rather than queue until its own timeout, which under a reconnect storm would waste every handshake finished too late. Default {}.", crate::defaults::proxy::MAX_HANDSHAKES))]
    pub max_handshakes: Option<usize>,
    /// The older name of --max-handshakes (it now counts TLS over TCP too).
    #[arg(long, value_name = "N", hide = true, conflicts_with = "max_handshakes")]
    pub quic_max_handshakes: Option<usize>,
    #[arg(long, value_name = "DURATION", help = format!("Terminate mode: how long a device past --max-handshakes waits in line (first come, first served) for a slot before it is refused. Its handshake has not started: waiting costs the proxy nothing but the connection, and the device keeps the ClientHello it sent (with its TLS ticket: a refused device spends one, and one refused too often resumes no more). Shorter than handshake_timeout, and well under the devices' own connect timeout; 0 refuses at once. Default {} (or 3/5 of a shorter handshake_timeout).", crate::defaults::show(crate::defaults::proxy::HANDSHAKE_WAIT)))]
    pub handshake_wait: Option<String>,
    #[arg(long, value_name = "DURATION", help = format!("With --upstream link: a link that hears nothing from its gateway for this long is lost, and its sessions move (keep-alives go out at a quarter of it). Default {}.", crate::defaults::show(crate::defaults::proxy::LINK_TIMEOUT)))]
    pub link_timeout: Option<String>,
    /// Allow a config with no gateway at all (for example a reload that removes them all):
    /// devices are then refused until one is added. Without it such a config is refused.
    #[arg(long)]
    pub allow_empty: bool,
}

/// How passthrough forwarding moves bytes (`Auto` unless configured; terminate mode: `Off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SpliceMode {
    /// read/write through a per-thread buffer.
    #[default]
    Off,
    /// splice(2) for every chunk.
    On,
    /// Copy until a read fills the buffer, then splice that direction.
    Auto,
}

/// When QUIC devices must prove their address with a retry first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QuicRetry {
    /// While many handshakes are in progress (an Initial flood, perhaps spoofed).
    #[default]
    Auto,
    Always,
    Never,
}

/// QUIC devices (terminate mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicConfig {
    /// `None`: no QUIC listener.
    pub listen: Option<SocketAddr>,
    pub idle_timeout: Duration,
    pub retry: QuicRetry,
}

/// How terminate mode reaches gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamMode {
    /// A TCP connection (TLS with `[upstream_tls]`) per session.
    #[default]
    Tcp,
    /// A stream per session on one QUIC connection per gateway and session worker.
    Link,
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Toggle {
    On,
    Off,
}

/// Terminate mode: how the proxy anchors sessions and moves them between gateways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationConfig {
    /// Bytes of DATA kept per session for replay after its last checkpoint.
    pub replay_window: usize,
    pub forward_checkpoints: bool,
    pub migrate_timeout: Duration,
    /// Moves per second for drains and rebalancing.
    pub move_rate: u32,
    pub rebalance: bool,
    pub rebalance_threshold: u32,
    pub rebalance_cooldown: Duration,
}

/// One address devices dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    /// Forward non-TLS bytes instead of closing the connection.
    pub allow_plain: bool,
    /// Terminate mode: forward the decrypted bytes as they are (no device protocol).
    pub raw: bool,
    pub reuse_port: bool,
    /// How long a connection that has sent nothing is left to the kernel before it is
    /// accepted (`TCP_DEFER_ACCEPT`, Linux); zero: accepted at once.
    pub defer_accept: Duration,
    pub backlog: u32,
}

/// One gateway behind the proxy. (Serialized as it is: what a proxy that is taken over
/// (`--takeover`) tells the new process of the gateways changed at run time.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayConfig {
    pub name: String,
    /// `host:port` of the gateway's device session server.
    pub addr: String,
    /// `host:port` of the gateway's admin endpoint, for `http` health checks.
    pub health_addr: Option<String>,
    pub weight: u32,
    pub pool: String,
}

/// Sends devices whose SNI matches `sni` (exact, or `*.suffix`) to the gateways of `pool`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// A host name, or `*.suffix`; `None`: any SNI (or none).
    pub sni: Option<String>,
    /// An ALPN protocol the device must offer; `None`: any.
    pub alpn: Option<String>,
    /// Terminate mode: a URI SAN the device certificate must carry (exact, or `prefix*`).
    pub cert_uri: Option<String>,
    /// Terminate mode: an organizational unit (OU) the device certificate's subject must have.
    pub cert_ou: Option<String>,
    pub pool: String,
    /// Pools tried in order when `pool` has no gateway taking sessions (then `default`).
    pub fallback: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub check: HealthCheck,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub path: String,
    /// With `http` checks: hold `GET /api/alive` on each gateway (see `--no-liveness-watch`).
    pub watch: bool,
}

/// The proxy's own TLS, in terminate mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminateTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, devices must present a certificate that chains to this CA.
    pub client_ca: Option<PathBuf>,
    /// CRLs (PEM) device certificates are checked against; re-read on SIGHUP.
    pub client_crls: Vec<PathBuf>,
    /// Devices may resume TLS sessions (stateless TLS 1.3 tickets).
    pub resumption: bool,
    /// The key ring the devices' TLS tickets are sealed under (shared by replicas); `None`:
    /// keys of this process's own. Not read with `resumption` off (which wins: turning
    /// resumption off in an incident must not need the ring taken out of the file too).
    pub ticket_keys: Option<PathBuf>,
}

/// TLS from the proxy to the gateways, in terminate mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    pub ca: PathBuf,
    /// Name checked against the gateway certificates. Default: the gateway's host.
    pub server_name: Option<String>,
    /// The proxy's client certificate chain and key (PEM), for gateways that require one
    /// (a `wasmbed gateway` with TLS does; it trusts it by `--proxy-identity`).
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Where a discovered gateway's addresses come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DnsQuery {
    /// The A and AAAA records of a name, all on one port.
    Addresses { name: String, port: u16 },
    /// The SRV records of a name: each gives a target (resolved to addresses) and a port.
    Srv { name: String },
}

/// One discovery source: the gateways it finds share a pool, a weight and a health port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryTarget {
    pub query: DnsQuery,
    pub pool: String,
    pub weight: u32,
    /// The gateways' admin port, for `http` health checks (`None`: tcp probes).
    pub health_port: Option<u16>,
}

impl DiscoveryTarget {
    /// How errors, logs and metrics name this source: `NAME:PORT` or `srv:NAME`.
    pub fn label(&self) -> String {
        match &self.query {
            DnsQuery::Addresses { name, port } => format!("{name}:{port}"),
            DnsQuery::Srv { name } => format!("srv:{name}"),
        }
    }
}

/// DNS discovery of gateways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    pub targets: Vec<DiscoveryTarget>,
    /// Explicit DNS servers; empty: the system's resolver configuration.
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
    pub grace: Duration,
    pub max_addresses: usize,
}

/// The validated configuration `wasmbed_proxy::run` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub mode: Mode,
    pub listeners: Vec<ListenerConfig>,
    pub gateways: Vec<GatewayConfig>,
    pub routes: Vec<RouteConfig>,
    pub admin: Option<SocketAddr>,
    pub health: HealthConfig,
    pub tls: Option<TerminateTls>,
    pub upstream_tls: Option<UpstreamTls>,
    pub max_connections: usize,
    /// Bound on the ClientHello peek (passthrough) or the TLS handshake (terminate).
    pub handshake_timeout: Duration,
    /// Terminate mode: device TLS handshakes in progress (TCP and QUIC together) past which
    /// a new device waits in line (`handshake_wait`), then is refused.
    pub max_handshakes: usize,
    /// Terminate mode: how long a device past `max_handshakes` waits for a slot.
    pub handshake_wait: Duration,
    pub connect_timeout: Duration,
    /// How many other gateways a session tries after a failed connect.
    pub connect_retries: u32,
    pub max_client_hello: usize,
    /// A gateway that just came up gets its share of new sessions ramped over this time.
    pub slow_start: Duration,
    /// How long sessions may finish on shutdown before they are closed.
    pub grace: Duration,
    /// Past this after a stop began, the process ends whatever still runs.
    pub hard_stop_after: Duration,
    /// `--takeover PATH`: the Unix socket of upgrades in place.
    pub takeover: Option<PathBuf>,
    pub threads: Option<usize>,
    /// Who may change things through the admin endpoint.
    pub admin_auth: crate::admin::AdminAuth,
    pub log_format: LogFormat,
    pub migration: MigrationConfig,
    /// Pools whose gateways get a PROXY protocol v2 header first on every connection.
    pub proxy_protocol: Vec<String>,
    pub discovery: DiscoveryConfig,
    /// A config with no gateway (none listed, none discovered) is accepted.
    pub allow_empty: bool,
    /// Passthrough forwarding by splice(2).
    pub splice: SpliceMode,
    /// Passthrough: a gateway's half-close is passed on rather than ending the session.
    pub half_close: bool,
    /// Terminate mode: a connection per session, or a stream on a link per gateway (and
    /// session worker).
    pub upstream: UpstreamMode,
    /// A link silent this long is lost (`--link-timeout`).
    pub link_timeout: Duration,
    /// QUIC devices (`--quic-listen`).
    pub quic: QuicConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    mode: Option<Mode>,
    admin: Option<String>,
    threads: Option<usize>,
    admin_token_file: Option<PathBuf>,
    admin_tls_cert: Option<PathBuf>,
    admin_tls_key: Option<PathBuf>,
    admin_client_ca: Option<PathBuf>,
    #[serde(default)]
    proxy_protocol: Vec<String>,
    log_format: Option<LogFormat>,
    max_connections: Option<usize>,
    handshake_timeout: Option<String>,
    connect_timeout: Option<String>,
    connect_retries: Option<u32>,
    max_client_hello: Option<usize>,
    slow_start: Option<String>,
    grace: Option<String>,
    hard_stop_after: Option<String>,
    takeover: Option<PathBuf>,
    replay_window: Option<String>,
    forward_checkpoints: Option<bool>,
    migrate_timeout: Option<String>,
    move_rate: Option<u32>,
    rebalance: Option<Toggle>,
    rebalance_threshold: Option<u32>,
    rebalance_cooldown: Option<String>,
    #[serde(default)]
    discovery: Vec<RawDiscovery>,
    #[serde(default)]
    dns_server: Vec<String>,
    dns_timeout: Option<String>,
    dns_grace: Option<String>,
    max_discovered: Option<usize>,
    #[serde(default)]
    allow_empty: bool,
    splice: Option<SpliceMode>,
    #[serde(default)]
    half_close: bool,
    upstream: Option<UpstreamMode>,
    link_timeout: Option<String>,
    quic_listen: Option<String>,
    quic_idle_timeout: Option<String>,
    quic_retry: Option<QuicRetry>,
    max_handshakes: Option<usize>,
    quic_max_handshakes: Option<usize>,
    handshake_wait: Option<String>,
    #[serde(default)]
    listener: Vec<RawListener>,
    #[serde(default)]
    gateway: Vec<RawGateway>,
    #[serde(default)]
    route: Vec<RawRoute>,
    #[serde(default)]
    health: RawHealth,
    tls: Option<RawTls>,
    upstream_tls: Option<RawUpstreamTls>,
}

/// `[[discovery]]`: `dns = "NAME:PORT"` or `srv = "NAME"`, with the gateways' pool, weight
/// and health port.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    dns: Option<String>,
    srv: Option<String>,
    pool: Option<String>,
    weight: Option<u32>,
    health_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    addr: String,
    #[serde(default)]
    allow_plain: bool,
    #[serde(default)]
    raw: bool,
    #[serde(default)]
    reuse_port: bool,
    defer_accept: Option<String>,
    backlog: Option<u32>,
}

impl RawListener {
    /// A listener on `addr` with every option at its default.
    fn at(addr: String) -> RawListener {
        RawListener {
            addr,
            allow_plain: false,
            raw: false,
            reuse_port: false,
            defer_accept: None,
            backlog: None,
        }
    }
}

/// A gateway as given, before validation ([`validate::gateway`]): from the file, a flag, or
/// the admin API.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    pub name: Option<String>,
    pub addr: String,
    pub health_addr: Option<String>,
    pub weight: Option<u32>,
    pub pool: Option<String>,
}

type RawGateway = GatewaySpec;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    sni: Option<String>,
    alpn: Option<String>,
    cert_uri: Option<String>,
    cert_ou: Option<String>,
    pool: String,
    #[serde(default)]
    fallback: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: Option<HealthCheck>,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<u32>,
    fall: Option<u32>,
    path: Option<String>,
    watch: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    #[serde(default)]
    client_crl: Vec<PathBuf>,
    resumption: Option<bool>,
    ticket_keys: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    ca: PathBuf,
    server_name: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

use crate::defaults::proxy as defaults;
pub use crate::defaults::proxy::{
    ADMIN as DEFAULT_ADMIN, LISTEN as DEFAULT_LISTEN, POOL as DEFAULT_POOL,
};

impl ProxyConfig {
    /// Reads the file named by `flags.config` (if any), lays the flags over it, validates.
    pub fn load(flags: &ProxyFlags) -> Result<ProxyConfig, ConfigError> {
        let raw = match &flags.config {
            Some(path) => read_toml(path)?,
            None => RawProxy::default(),
        };
        Self::from_raw(raw, flags)
    }

    /// Parses a TOML document (no flags); for tests and embedding.
    pub fn from_toml(text: &str) -> Result<ProxyConfig, ConfigError> {
        let raw: RawProxy = crate::parse_toml(text, Path::new("<inline>"))?;
        Self::from_raw(raw, &ProxyFlags::default())
    }

    fn from_raw(mut raw: RawProxy, flags: &ProxyFlags) -> Result<ProxyConfig, ConfigError> {
        overlay(&mut raw, flags)?;
        let mode = raw.mode.unwrap_or_default();
        let listeners = listeners(&raw)?;
        let discovery = discovery(&raw)?;
        let allow_empty = raw.allow_empty;
        let gateways = gateways(&raw.gateway, !discovery.targets.is_empty() || allow_empty)?;
        let pools: Vec<&str> = gateways
            .iter()
            .map(|g| g.pool.as_str())
            .chain(discovery.targets.iter().map(|t| t.pool.as_str()))
            .collect();
        let routes = routes(&raw.route, &pools)?;
        let health = health(&raw.health)?;
        let migration = migration(&raw)?;
        for (i, pool) in raw.proxy_protocol.iter().enumerate() {
            if !pools.contains(&pool.as_str()) {
                return Err(ConfigError::field(
                    format!("proxy_protocol[{i}]"),
                    format!("no gateway is in pool {pool:?}"),
                ));
            }
        }
        for (i, g) in gateways.iter().enumerate() {
            health_target(&format!("gateway[{i}]"), health.check, g)?;
        }
        let admin = match raw.admin.as_deref().unwrap_or(DEFAULT_ADMIN) {
            "off" => None,
            text => Some(parse_addr("admin", text)?),
        };
        let tls = raw.tls.map(|t| TerminateTls {
            cert: t.cert,
            key: t.key,
            client_ca: t.client_ca,
            client_crls: t.client_crl,
            resumption: t.resumption.unwrap_or(true),
            ticket_keys: t.ticket_keys,
        });

        if tls
            .as_ref()
            .is_some_and(|t| t.client_ca.is_none() && !t.client_crls.is_empty())
        {
            return Err(ConfigError::field(
                "tls.client_crl",
                "needs client_ca (--client-ca): without device certificates there is nothing to revoke",
            ));
        }
        if mode == Mode::Terminate && tls.is_none() {
            return Err(ConfigError::field(
                "tls",
                "terminate mode needs a certificate and key (--tls-cert/--tls-key or [tls])",
            ));
        }
        let upstream_tls = match raw.upstream_tls {
            None => None,
            Some(u) => Some(UpstreamTls {
                ca: u.ca,
                server_name: u.server_name,
                client: match (u.cert, u.key) {
                    (Some(cert), Some(key)) => Some((cert, key)),
                    (None, None) => None,
                    _ => {
                        return Err(ConfigError::field(
                            "upstream_tls",
                            "`cert` and `key` go together (the proxy's client certificate)",
                        ));
                    }
                },
            }),
        };
        if mode == Mode::Passthrough && upstream_tls.is_some() {
            return Err(ConfigError::field(
                "upstream_tls",
                "only applies in terminate mode (in passthrough the device's TLS reaches the gateway)",
            ));
        }
        // A raw listener's bytes are unchecked: under the proxy's client certificate, which
        // gateways trust to state device identities, a client could claim any device.
        if let Some(i) = listeners.iter().position(|l| l.raw)
            && upstream_tls.as_ref().is_some_and(|t| t.client.is_some())
        {
            return Err(ConfigError::field(
                format!("listener[{i}].raw"),
                "not with the proxy's client certificate in [upstream_tls]: gateways trust it to \
                 state device identities, and a raw listener forwards unchecked bytes",
            ));
        }
        let max_connections = raw.max_connections.unwrap_or(defaults::MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(ConfigError::field("max_connections", "must be at least 1"));
        }
        let max_client_hello = raw.max_client_hello.unwrap_or(defaults::MAX_CLIENT_HELLO);
        if !(512..=65_536).contains(&max_client_hello) {
            return Err(ConfigError::field(
                "max_client_hello",
                "must be between 512 and 65536 bytes",
            ));
        }
        if raw.threads == Some(0) {
            return Err(ConfigError::field("threads", "must be at least 1"));
        }
        if mode == Mode::Passthrough
            && let Some(i) = routes
                .iter()
                .position(|r| r.cert_uri.is_some() || r.cert_ou.is_some())
        {
            return Err(ConfigError::field(
                format!("route[{i}]"),
                "cert_uri and cert_ou need terminate mode (in passthrough the proxy sees no certificate)",
            ));
        }
        if mode == Mode::Terminate
            && let Some(i) = routes.iter().position(|r| r.alpn.is_some())
        {
            return Err(ConfigError::field(
                format!("route[{i}].alpn"),
                "alpn routes need passthrough mode (in terminate mode the proxy's TLS negotiates \
                 the protocol, and no offered list is seen: such a route would never match)",
            ));
        }
        if mode == Mode::Terminate && raw.splice.is_some_and(|s| s != SpliceMode::Off) {
            return Err(ConfigError::field(
                "splice",
                "only applies in passthrough (in terminate mode the bytes pass through TLS at the proxy)",
            ));
        }
        if mode == Mode::Terminate && raw.half_close {
            return Err(ConfigError::field(
                "half_close",
                "only applies in passthrough (raw terminate listeners always pass half-closes on)",
            ));
        }
        let upstream = raw.upstream.unwrap_or_default();
        if upstream == UpstreamMode::Link {
            if mode != Mode::Terminate {
                return Err(ConfigError::field(
                    "upstream",
                    "`link` needs terminate mode (in passthrough the device's TLS goes to the gateway as is)",
                ));
            }
            if upstream_tls.as_ref().is_none_or(|u| u.client.is_none()) {
                return Err(ConfigError::field(
                    "upstream",
                    "`link` needs [upstream_tls] with the proxy's client certificate \
                     (--upstream-ca, --upstream-cert, --upstream-key): a link is always mutual TLS",
                ));
            }
        }
        let link_timeout = duration_or(
            "link_timeout",
            raw.link_timeout.as_deref(),
            defaults::LINK_TIMEOUT,
        )?;
        if !(Duration::from_millis(100)..=Duration::from_secs(600)).contains(&link_timeout) {
            return Err(ConfigError::field(
                "link_timeout",
                "must be between 100ms and 10min",
            ));
        }
        let quic_listen = match raw.quic_listen.as_deref() {
            Some(a) => Some(crate::parse_addr("quic_listen", a)?),
            None => None,
        };
        if quic_listen.is_some() && mode != Mode::Terminate {
            return Err(ConfigError::field(
                "quic_listen",
                "needs terminate mode (QUIC devices' TLS ends at the proxy)",
            ));
        }
        if quic_listen.is_some() && raw.takeover.is_some() {
            return Err(ConfigError::field(
                "takeover",
                "not with quic_listen: a QUIC device's connection state cannot move to another \
                 process (run replicas with reuse_port and restart them one at a time instead)",
            ));
        }
        let quic = QuicConfig {
            listen: quic_listen,
            idle_timeout: positive(
                "quic_idle_timeout",
                duration_or(
                    "quic_idle_timeout",
                    raw.quic_idle_timeout.as_deref(),
                    defaults::QUIC_IDLE_TIMEOUT,
                )?,
            )?,
            retry: raw.quic_retry.unwrap_or_default(),
        };
        let max_handshakes = match (raw.max_handshakes, raw.quic_max_handshakes) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::field(
                    "quic_max_handshakes",
                    "is the older name of max_handshakes: give one of them",
                ));
            }
            (Some(0), _) => return Err(ConfigError::field("max_handshakes", "must be at least 1")),
            (_, Some(0)) => {
                return Err(ConfigError::field(
                    "quic_max_handshakes",
                    "must be at least 1",
                ));
            }
            (n, old) => n.or(old).unwrap_or(defaults::MAX_HANDSHAKES),
        };
        if mode == Mode::Passthrough && migration.rebalance {
            return Err(ConfigError::field(
                "rebalance",
                "needs terminate mode (in passthrough the proxy cannot move a session)",
            ));
        }
        let (grace, hard_stop_after) = crate::stop_deadlines(
            raw.grace.as_deref(),
            raw.hard_stop_after.as_deref(),
            defaults::GRACE,
        )?;
        let handshake_timeout = positive(
            "handshake_timeout",
            duration_or(
                "handshake_timeout",
                raw.handshake_timeout.as_deref(),
                defaults::HANDSHAKE_TIMEOUT,
            )?,
        )?;
        // Given, it must end before the handshake's deadline (the wait is part of it); by
        // default, 3 s or 3/5 of a shorter handshake_timeout (the rest for the handshake).
        let handshake_wait = match raw.handshake_wait.as_deref() {
            Some(text) => {
                let wait = crate::parse_duration("handshake_wait", text)?;
                if wait >= handshake_timeout {
                    return Err(ConfigError::field(
                        "handshake_wait",
                        "must be shorter than handshake_timeout (the wait in line is part of the handshake's time)",
                    ));
                }
                wait
            }
            None => defaults::HANDSHAKE_WAIT.min(handshake_timeout * 3 / 5),
        };
        Ok(ProxyConfig {
            mode,
            listeners,
            gateways,
            routes,
            admin,
            health,
            tls,
            upstream_tls,
            max_connections,
            handshake_timeout,
            max_handshakes,
            handshake_wait,
            connect_timeout: positive(
                "connect_timeout",
                duration_or(
                    "connect_timeout",
                    raw.connect_timeout.as_deref(),
                    defaults::CONNECT_TIMEOUT,
                )?,
            )?,
            connect_retries: raw.connect_retries.unwrap_or(defaults::CONNECT_RETRIES),
            max_client_hello,
            slow_start: duration_or(
                "slow_start",
                raw.slow_start.as_deref(),
                defaults::SLOW_START,
            )?,
            grace,
            hard_stop_after,
            takeover: raw.takeover.clone(),
            threads: raw.threads,
            admin_auth: crate::admin::AdminAuth::load_with_tls(
                raw.admin_token_file.as_deref(),
                admin,
                crate::admin::AdminTlsFlags {
                    admin_tls_cert: raw.admin_tls_cert.clone(),
                    admin_tls_key: raw.admin_tls_key.clone(),
                    admin_client_ca: raw.admin_client_ca.clone(),
                },
            )?,
            log_format: raw.log_format.unwrap_or_default(),
            migration,
            proxy_protocol: raw.proxy_protocol.clone(),
            discovery,
            allow_empty,
            // Splicing bulk transfers costs small messages nothing (measured: performance.md).
            splice: raw.splice.unwrap_or(match mode {
                Mode::Passthrough => SpliceMode::Auto,
                Mode::Terminate => SpliceMode::Off,
            }),
            half_close: raw.half_close,
            upstream,
            link_timeout,
            quic,
        })
    }
}

fn migration(raw: &RawProxy) -> Result<MigrationConfig, ConfigError> {
    let replay_window = match raw.replay_window.as_deref() {
        Some(text) => crate::gateway::parse_size("replay_window", text)?,
        None => defaults::REPLAY_WINDOW,
    };
    if replay_window < 1024 {
        return Err(ConfigError::field("replay_window", "must be at least 1KiB"));
    }
    let move_rate = raw.move_rate.unwrap_or(defaults::MOVE_RATE);
    if move_rate == 0 {
        return Err(ConfigError::field("move_rate", "must be at least 1"));
    }
    Ok(MigrationConfig {
        replay_window,
        forward_checkpoints: raw
            .forward_checkpoints
            .unwrap_or(defaults::FORWARD_CHECKPOINTS),
        migrate_timeout: positive(
            "migrate_timeout",
            duration_or(
                "migrate_timeout",
                raw.migrate_timeout.as_deref(),
                defaults::MIGRATE_TIMEOUT,
            )?,
        )?,
        move_rate,
        rebalance: raw.rebalance == Some(Toggle::On),
        rebalance_threshold: raw
            .rebalance_threshold
            .unwrap_or(defaults::REBALANCE_THRESHOLD)
            .max(1),
        rebalance_cooldown: duration_or(
            "rebalance_cooldown",
            raw.rebalance_cooldown.as_deref(),
            defaults::REBALANCE_COOLDOWN,
        )?,
    })
}

/// The listeners a flag for every listener applies to: the file's or `--listen`'s, or else
/// the default one, made here so that the flag is not lost with it.
fn every_listener(raw: &mut RawProxy) -> impl Iterator<Item = &mut RawListener> {
    if raw.listener.is_empty() {
        raw.listener
            .push(RawListener::at(DEFAULT_LISTEN.to_string()));
    }
    raw.listener.iter_mut()
}

fn overlay(raw: &mut RawProxy, f: &ProxyFlags) -> Result<(), ConfigError> {
    if !f.listen.is_empty() {
        raw.listener = f
            .listen
            .iter()
            .flat_map(|l| l.split(','))
            .map(|addr| RawListener::at(addr.to_string()))
            .collect();
    }
    if f.allow_plain {
        every_listener(raw).for_each(|l| l.allow_plain = true);
    }
    if f.reuse_port {
        every_listener(raw).for_each(|l| l.reuse_port = true);
    }
    if let Some(d) = &f.defer_accept {
        every_listener(raw).for_each(|l| l.defer_accept = Some(d.clone()));
    }
    if f.raw {
        every_listener(raw).for_each(|l| l.raw = true);
    }
    if !f.gateway_dns.is_empty() || !f.gateway_srv.is_empty() {
        raw.discovery = f
            .gateway_dns
            .iter()
            .map(|d| parse_discovery_flag("--gateway-dns", d, false))
            .chain(
                f.gateway_srv
                    .iter()
                    .map(|d| parse_discovery_flag("--gateway-srv", d, true)),
            )
            .collect::<Result<_, _>>()?;
    }
    if !f.dns_server.is_empty() {
        raw.dns_server = f.dns_server.clone();
    }
    set(&mut raw.dns_timeout, f.dns_timeout.clone());
    set(&mut raw.dns_grace, f.dns_grace.clone());
    set(&mut raw.grace, f.grace.clone());
    set(&mut raw.hard_stop_after, f.hard_stop_after.clone());
    set(&mut raw.takeover, f.takeover.clone());
    set(&mut raw.max_discovered, f.max_discovered);
    raw.allow_empty |= f.allow_empty;
    set(&mut raw.splice, f.splice);
    raw.half_close |= f.half_close;
    set(&mut raw.upstream, f.upstream);
    set(&mut raw.link_timeout, f.link_timeout.clone());
    set(&mut raw.quic_listen, f.quic_listen.clone());
    set(&mut raw.quic_idle_timeout, f.quic_idle_timeout.clone());
    set(&mut raw.quic_retry, f.quic_retry);
    // A flag overrides the file under either name.
    if f.max_handshakes.is_some() || f.quic_max_handshakes.is_some() {
        raw.max_handshakes = f.max_handshakes;
        raw.quic_max_handshakes = f.quic_max_handshakes;
    }
    set(&mut raw.handshake_wait, f.handshake_wait.clone());
    if !f.gateway.is_empty() {
        // The file's routes name the file's pools: with its gateways replaced, they go too.
        raw.route.clear();
        raw.gateway = f
            .gateway
            .iter()
            .flat_map(|g| g.split(','))
            .map(parse_gateway_flag)
            .collect::<Result<_, _>>()?;
    }
    set(&mut raw.mode, f.mode);
    set(&mut raw.admin, f.admin.clone());
    set(&mut raw.threads, f.threads);
    set(&mut raw.admin_token_file, f.admin_token_file.clone());
    if !f.proxy_protocol.is_empty() {
        raw.proxy_protocol = f.proxy_protocol.clone();
    }
    set(&mut raw.admin_tls_cert, f.admin_tls.admin_tls_cert.clone());
    set(&mut raw.admin_tls_key, f.admin_tls.admin_tls_key.clone());
    set(
        &mut raw.admin_client_ca,
        f.admin_tls.admin_client_ca.clone(),
    );
    set(&mut raw.log_format, f.log_format);
    set(&mut raw.replay_window, f.replay_window.clone());
    if f.forward_checkpoints {
        raw.forward_checkpoints = Some(true);
    }
    if f.no_forward_checkpoints {
        raw.forward_checkpoints = Some(false);
    }
    set(&mut raw.migrate_timeout, f.migrate_timeout.clone());
    set(&mut raw.move_rate, f.move_rate);
    set(&mut raw.rebalance, f.rebalance);
    set(&mut raw.rebalance_threshold, f.rebalance_threshold);
    set(&mut raw.rebalance_cooldown, f.rebalance_cooldown.clone());
    set(&mut raw.max_connections, f.max_connections);
    set(&mut raw.health.check, f.health);
    set(&mut raw.health.interval, f.health_interval.clone());
    set(&mut raw.health.timeout, f.health_timeout.clone());
    set(&mut raw.health.rise, f.rise);
    set(&mut raw.health.fall, f.fall);
    set(&mut raw.health.path, f.health_path.clone());
    if f.no_liveness_watch {
        raw.health.watch = Some(false);
    }
    if f.tls_cert.is_some()
        || f.tls_key.is_some()
        || f.client_ca.is_some()
        || !f.client_crl.is_empty()
    {
        let (cert, key) = match (&f.tls_cert, &f.tls_key, &raw.tls) {
            (Some(c), Some(k), _) => (c.clone(), k.clone()),
            (c, k, Some(t)) => (
                c.clone().unwrap_or(t.cert.clone()),
                k.clone().unwrap_or(t.key.clone()),
            ),
            _ => {
                return Err(ConfigError::field(
                    "tls",
                    "--tls-cert and --tls-key must be given together",
                ));
            }
        };
        let client_ca = f
            .client_ca
            .clone()
            .or(raw.tls.as_ref().and_then(|t| t.client_ca.clone()));
        let client_crl = if f.client_crl.is_empty() {
            raw.tls
                .as_ref()
                .map(|t| t.client_crl.clone())
                .unwrap_or_default()
        } else {
            f.client_crl.clone()
        };
        let resumption = raw.tls.as_ref().and_then(|t| t.resumption);
        let ticket_keys = raw.tls.as_ref().and_then(|t| t.ticket_keys.clone());
        raw.tls = Some(RawTls {
            cert,
            key,
            client_ca,
            client_crl,
            resumption,
            ticket_keys,
        });
    }
    if f.no_tls_resumption
        && let Some(t) = raw.tls.as_mut()
    {
        t.resumption = Some(false);
    }
    if let Some(path) = &f.tls_ticket_keys {
        let Some(t) = raw.tls.as_mut() else {
            return Err(ConfigError::field(
                "tls.ticket_keys",
                "--tls-ticket-keys is for terminate mode's TLS (--tls-cert/--tls-key or [tls])",
            ));
        };
        t.ticket_keys = Some(path.clone());
    }
    if let Some(ca) = &f.upstream_ca {
        let kept = raw.upstream_tls.take();
        raw.upstream_tls = Some(RawUpstreamTls {
            ca: ca.clone(),
            server_name: kept.as_ref().and_then(|u| u.server_name.clone()),
            cert: kept.as_ref().and_then(|u| u.cert.clone()),
            key: kept.as_ref().and_then(|u| u.key.clone()),
        });
    }
    if f.upstream_cert.is_some() || f.upstream_key.is_some() || f.upstream_server_name.is_some() {
        let Some(up) = raw.upstream_tls.as_mut() else {
            return Err(ConfigError::field(
                "upstream_tls",
                "--upstream-cert/--upstream-key/--upstream-server-name need --upstream-ca (or [upstream_tls] ca)",
            ));
        };
        set(&mut up.cert, f.upstream_cert.clone());
        set(&mut up.key, f.upstream_key.clone());
        set(&mut up.server_name, f.upstream_server_name.clone());
    }
    Ok(())
}

fn set<T>(slot: &mut Option<T>, flag: Option<T>) {
    if flag.is_some() {
        *slot = flag;
    }
}

pub mod validate;
use validate::{
    discovery, gateways, health, health_target, listeners, parse_discovery_flag,
    parse_gateway_flag, positive, routes,
};

#[cfg(test)]
mod tests;
