//! `wasmbed loadtest` and `wasmbed up` configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{ConfigError, parse_addr, parse_duration};

/// Flags of `wasmbed loadtest`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadtestFlags {
    /// Address the devices dial (the proxy).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub target: String,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Devices started per second, or `all` to start them at once.
    #[arg(long, default_value = "all")]
    pub ramp: String,
    /// How long the devices send DATA; then they wait (a short grace) for the last replies.
    #[arg(long, default_value = "10s")]
    pub duration: String,
    /// DATA messages per second per device.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// DATA body size in bytes.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Application named in HELLO.
    #[arg(long, default_value = "echo")]
    pub app: String,
    /// Server name sent in the TLS handshake (and checked against the proxy or gateway certificate).
    #[arg(long, default_value = "localhost")]
    pub sni: String,
    /// A `wasmbed certs init` directory: its CA (ca.pem, ca.key) issues each device its own
    /// client certificate in memory, and ca.pem is trusted for the server.
    #[arg(long, value_name = "DIR")]
    pub ca_dir: PathBuf,
    /// Use the device certificates `certs init` wrote (DIR: the PKI directory or its
    /// `devices/`; device-NNNN.pem and .key) instead of issuing new ones: real identities, so revocation
    /// (`certs revoke` + the CRL) and affinity by certificate can be load-tested. DIR must
    /// hold at least --devices of them; ca.key is then not needed.
    #[arg(long, value_name = "DIR")]
    pub devices_from: Option<PathBuf>,
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// How devices reach the target: `tcp` (TLS over TCP) or `quic` (a terminating proxy's
    /// `--quic-listen`: a QUIC connection per device, devices sharing UDP sockets as
    /// `--devices-per-socket` says).
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: Transport,
    /// With `--transport quic`: devices per UDP socket (and per QUIC endpoint) of the fleet.
    /// A real device has a socket of its own; one socket for thousands of devices makes the
    /// fleet's single receive loop, not the target, the bottleneck in a reconnect storm.
    #[arg(long, value_name = "N", default_value_t = DEVICES_PER_SOCKET)]
    pub devices_per_socket: u32,
    /// With `--transport quic`: after this long, move the whole fleet to a new UDP socket
    /// (a new source port for every device, as a NAT rebinding does); sessions must go on.
    #[arg(long, value_name = "DURATION")]
    pub rebind_after: Option<String>,
    /// Devices speak TLS 1.2 and nothing newer, as devices on mbedTLS 2.28 (its long-term
    /// support branch) do. TLS over TCP only: QUIC is TLS 1.3.
    #[arg(long)]
    pub tls12: bool,
}

/// How simulated devices reach the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Transport {
    #[default]
    Tcp,
    Quic,
}

/// The validated fleet parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadtestSettings {
    pub target: SocketAddr,
    pub devices: usize,
    /// Devices per second; `None`: all at once.
    pub ramp: Option<f64>,
    pub duration: Duration,
    pub rate: f64,
    pub payload: usize,
    pub app: String,
    pub sni: String,
    pub ca_dir: PathBuf,
    /// Device certificates to use as they are (a `certs init` directory's `devices/`).
    pub devices_from: Option<PathBuf>,
    pub json: Option<PathBuf>,
    /// The first device's number (device ids are `device-NNNN`), so that two fleets of one
    /// run have distinct identities.
    pub first_device: usize,
    pub transport: Transport,
    /// QUIC: when the fleet moves to a new UDP socket (`None`: never).
    pub rebind_after: Option<Duration>,
    /// QUIC: devices per UDP socket (at least 1).
    pub devices_per_socket: usize,
    /// Devices speak TLS 1.2 only (TCP only).
    pub tls12: bool,
}

/// QUIC devices of a fleet per UDP socket, by default: each socket has its own quinn endpoint
/// (its own receive loop and kernel buffer), so 9,000 devices use 141 of them.
pub const DEVICES_PER_SOCKET: u32 = 64;

/// The most DATA messages per second one simulated device sends.
pub const MAX_RATE: f64 = 10_000.0;

/// A device's DATA rate must be a number above 0 and at most [`MAX_RATE`] per second.
pub fn check_rate(rate: f64) -> Result<f64, ConfigError> {
    if rate > 0.0 && rate <= MAX_RATE {
        Ok(rate)
    } else {
        Err(ConfigError::field(
            "rate",
            "must be above 0 and at most 10000 per second",
        ))
    }
}

/// Devices limited to TLS 1.2 reach the target over TCP only: QUIC is TLS 1.3.
pub fn check_tls12(tls12: bool, transport: Transport) -> Result<(), ConfigError> {
    if tls12 && transport == Transport::Quic {
        return Err(ConfigError::field(
            "tls12",
            "needs --transport tcp (QUIC is TLS 1.3 only)",
        ));
    }
    Ok(())
}

impl LoadtestSettings {
    pub fn load(f: &LoadtestFlags) -> Result<LoadtestSettings, ConfigError> {
        let ramp = match f.ramp.trim() {
            "all" => None,
            r => Some(r.parse::<f64>().ok().filter(|r| *r > 0.0).ok_or_else(|| {
                ConfigError::field("ramp", "a positive number of devices per second, or `all`")
            })?),
        };
        if f.devices == 0 {
            return Err(ConfigError::field("devices", "must be at least 1"));
        }
        check_rate(f.rate)?;
        if f.payload > 60_000 {
            return Err(ConfigError::field("payload", "at most 60000 bytes"));
        }
        let rebind_after = match f.rebind_after.as_deref() {
            Some(d) if f.transport == Transport::Quic => Some(parse_duration("rebind_after", d)?),
            Some(_) => {
                return Err(ConfigError::field(
                    "rebind_after",
                    "needs --transport quic (a TCP connection cannot change its address)",
                ));
            }
            None => None,
        };
        check_tls12(f.tls12, f.transport)?;
        if f.devices_per_socket == 0 {
            return Err(ConfigError::field(
                "devices_per_socket",
                "must be at least 1",
            ));
        }
        Ok(LoadtestSettings {
            rebind_after,
            devices_per_socket: f.devices_per_socket as usize,
            target: parse_addr("target", &f.target)?,
            devices: f.devices,
            ramp,
            duration: parse_duration("duration", &f.duration)?,
            rate: f.rate,
            payload: f.payload,
            app: f.app.clone(),
            sni: f.sni.clone(),
            ca_dir: f.ca_dir.clone(),
            devices_from: f.devices_from.clone(),
            json: f.json.clone(),
            first_device: 0,
            transport: f.transport,
            tls12: f.tls12,
        })
    }
}
