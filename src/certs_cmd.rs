//! `wasmbed certs init`: writes a dev PKI to a directory.

use std::path::{Path, PathBuf};

use wasmbed_certs::CertError;
use wasmbed_certs::pki::{DevCa, Issued, KeyKind};

#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CertsCommand {
    /// Create a dev CA, a proxy server certificate, gateway server certificates and device
    /// client certificates (ECDSA P-256) as PEM files, with an index.json.
    Init(InitArgs),
}

#[derive(Debug, clap::Args)]
struct InitArgs {
    /// Directory to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Device client certificates to issue (device-0000, device-0001, ...).
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Gateway server certificates to issue (gateway-0, gateway-1, ...).
    #[arg(long, default_value_t = 3)]
    gateways: usize,
    /// Extra DNS names or IPs for the proxy and gateway certificates (always: localhost,
    /// 127.0.0.1). Repeatable.
    #[arg(long = "san", value_name = "NAME")]
    sans: Vec<String>,
    /// Issue RSA 2048 keys instead of ECDSA P-256 (the CA stays ECDSA).
    #[arg(long)]
    rsa: bool,
    /// Overwrite an existing PKI in DIR.
    #[arg(long)]
    force: bool,
}

pub fn run(args: CertsArgs) -> Result<(), CertError> {
    match args.command {
        CertsCommand::Init(a) => init(&a),
    }
}

fn write(path: &Path, body: &str) -> Result<(), CertError> {
    std::fs::write(path, body).map_err(|source| CertError::Write {
        path: path.to_owned(),
        source,
    })
}

fn write_pair(dir: &Path, stem: &str, issued: &Issued) -> Result<serde_json::Value, CertError> {
    let (cert, key) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    write(&cert, &issued.cert_pem)?;
    write(&key, &issued.key_pem)?;
    Ok(serde_json::json!({ "cert": cert, "key": key }))
}

fn init(a: &InitArgs) -> Result<(), CertError> {
    let ca_path = a.dir.join("ca.pem");
    if ca_path.exists() && !a.force {
        return Err(CertError::File {
            path: ca_path,
            problem: "exists already (pass --force to replace this PKI)".into(),
        });
    }
    write_pki(a)?;
    println!(
        "wrote a dev PKI to {}: CA, proxy, {} gateways, {} devices (index.json lists them)",
        a.dir.display(),
        a.gateways,
        a.devices
    );
    Ok(())
}

/// Writes a dev PKI (for `wasmbed up`): CA, proxy and `gateways` server certificates.
pub fn write_dev_pki(dir: &std::path::Path, gateways: usize) -> Result<(), CertError> {
    write_pki(&InitArgs {
        dir: dir.to_owned(),
        devices: 0,
        gateways,
        sans: Vec::new(),
        rsa: false,
        force: true,
    })
}

/// The identity of the proxy's client certificate that `certs init` issues.
pub const PROXY_IDENTITY: &str = "wasmbed-proxy";

fn write_pki(a: &InitArgs) -> Result<(), CertError> {
    let ca_path = a.dir.join("ca.pem");
    let devices_dir = a.dir.join("devices");
    std::fs::create_dir_all(&devices_dir).map_err(|source| CertError::Write {
        path: devices_dir.clone(),
        source,
    })?;
    let kind = if a.rsa {
        KeyKind::Rsa2048
    } else {
        KeyKind::EcdsaP256
    };
    let ca = DevCa::generate("wasmbed dev CA")?;
    write(&ca_path, &ca.cert_pem())?;
    write(&a.dir.join("ca.key"), ca.key_pem())?;
    let mut names: Vec<&str> = vec!["localhost", "127.0.0.1"];
    names.extend(a.sans.iter().map(String::as_str));
    let proxy = write_pair(&a.dir, "proxy", &ca.issue_server(&names, kind)?)?;
    // The proxy's client certificate for TLS to the gateways ([upstream_tls] cert/key); the
    // gateways trust it with `--proxy-identity wasmbed-proxy`.
    let proxy_client = write_pair(
        &a.dir,
        "proxy-client",
        &ca.issue_client(PROXY_IDENTITY, kind)?,
    )?;
    let gateways = (0..a.gateways)
        .map(|i| {
            let name = format!("gateway-{i}");
            let mut n = vec![name.as_str()];
            n.extend(&names);
            write_pair(&a.dir, &name, &ca.issue_server(&n, kind)?)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let devices = (0..a.devices)
        .map(|i| {
            let id = format!("device-{i:04}");
            let mut entry = write_pair(&devices_dir, &id, &ca.issue_client(&id, kind)?)?;
            entry["id"] = id.into();
            Ok(entry)
        })
        .collect::<Result<Vec<_>, CertError>>()?;
    // The fleet's session key ring: every gateway gets the same file (`--session-keys`).
    let keys_path = a.dir.join("session-keys.toml");
    let ring = wasmbed_gateway::ticket::KeyRing::generate("k1")
        .map_err(|_| CertError::Random("the session key"))?;
    write(&keys_path, &ring)?;
    let index = serde_json::json!({
        "session_keys": keys_path,
        "ca": { "cert": ca_path, "key": a.dir.join("ca.key") },
        "proxy": proxy,
        "proxy_client": proxy_client,
        "gateways": gateways,
        "devices": devices,
    });
    let text = serde_json::to_string_pretty(&index).unwrap_or_default();
    write(&a.dir.join("index.json"), &text)
}
