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
    /// Create a dev PKI (ECDSA P-256 unless --rsa) in DIR. It writes: ca.pem and ca.key
    /// (the CA); proxy.pem and proxy.key (the proxy's server certificate: localhost,
    /// 127.0.0.1, --san); proxy-client.pem and proxy-client.key (the proxy's client
    /// certificate towards gateways, identity wasmbed-proxy); gateway-N.pem and gateway-N.key
    /// (--gateways); devices/device-NNNN.pem and .key (--devices); session-keys.toml (the
    /// fleet's ticket key ring, for every gateway's --session-keys); proxy-tickets.toml (the
    /// key ring of the devices' TLS tickets, for every proxy replica's --tls-ticket-keys);
    /// crl.pem (an empty CRL of
    /// the CA, so --client-crl can be on from the first day; `certs revoke` rewrites it) and
    /// revoked.json (what `certs revoke` has revoked); admin/ca.pem and admin/ca.key (a CA
    /// for admins only) with admin/admin.pem and .key (an admin client certificate, for
    /// --admin-client-ca admin/ca.pem); index.json (every path above). Keys and the key ring
    /// are written 0600, directories 0700. --force removes what it replaces first (old device,
    /// admin and gateway certificates).
    Init(InitArgs),
    /// Revoke device certificates of a dev PKI: writes DIR/crl.pem, the CA's CRL of every
    /// device revoked so far (listed in DIR/revoked.json). Give it to the proxy and gateways
    /// with --client-crl and send them SIGHUP: new handshakes of those devices are refused,
    /// their live sessions get ERROR revoked and are closed.
    Revoke(RevokeArgs),
}

#[derive(Debug, clap::Args)]
struct RevokeArgs {
    /// The PKI directory (as `certs init` wrote it: ca.pem, ca.key, devices/).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Devices to revoke: a name (DIR/devices/NAME.pem) or the path of a certificate (PEM).
    #[arg(required = true, value_name = "DEVICE")]
    devices: Vec<String>,
}

/// What `certs revoke` has revoked so far (DIR/revoked.json).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Revoked {
    /// The number of the last CRL written.
    crl_number: u64,
    revoked: Vec<RevokedEntry>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
struct RevokedEntry {
    device: String,
    /// The certificate's serial number, hex.
    serial: String,
}

/// How long a CRL that `certs revoke` writes says it is good for.
const CRL_VALIDITY: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

fn read_file(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|e| CertError::File {
        path: path.to_owned(),
        problem: e.to_string(),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn revoke(a: &RevokeArgs) -> Result<(), CertError> {
    let ca = DevCa::load(
        &read_file(&a.dir.join("ca.pem"))?,
        &read_file(&a.dir.join("ca.key"))?,
    )?;
    let list_path = a.dir.join("revoked.json");
    let mut list: Revoked = match std::fs::read_to_string(&list_path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| CertError::File {
            path: list_path.clone(),
            problem: format!("not a revocation list of `certs revoke`: {e}"),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Revoked::default(),
        Err(e) => {
            return Err(CertError::File {
                path: list_path,
                problem: e.to_string(),
            });
        }
    };
    for device in &a.devices {
        let as_path = Path::new(device);
        let path = if as_path.is_file() {
            as_path.to_path_buf()
        } else {
            a.dir.join("devices").join(format!("{device}.pem"))
        };
        let certs = wasmbed_certs::load_certs(&path)?;
        let serial = certs
            .first()
            .and_then(wasmbed_certs::serial_of)
            .ok_or_else(|| CertError::File {
                path: path.clone(),
                problem: "no readable certificate".into(),
            })?;
        let name = certs
            .first()
            .and_then(wasmbed_certs::peer_identity)
            .unwrap_or_else(|| device.clone());
        let entry = RevokedEntry {
            device: name,
            serial: hex(&serial),
        };
        if !list.revoked.contains(&entry) {
            say!("revoked {} (serial {})", entry.device, entry.serial);
            list.revoked.push(entry);
        }
    }
    list.crl_number += 1;
    let serials: Vec<Vec<u8>> = list
        .revoked
        .iter()
        .filter_map(|e| unhex(&e.serial))
        .collect();
    let crl = ca.crl(&serials, list.crl_number, CRL_VALIDITY)?;
    let crl_path = a.dir.join("crl.pem");
    write(&crl_path, &crl)?;
    write(
        &list_path,
        &serde_json::to_string_pretty(&list).unwrap_or_default(),
    )?;
    say!(
        "wrote {} (CRL number {}, {} devices revoked); reload the proxy and gateways (SIGHUP) that read it with --client-crl",
        crl_path.display(),
        list.crl_number,
        list.revoked.len()
    );
    Ok(())
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
    /// Also write Kubernetes Secrets (DIR2/secrets.yaml, for `kubectl apply -f`) holding
    /// what deploy/k8s mounts: the CA certificate (not its key), the proxy's server and client
    /// certificates, a gateway certificate for the name `wasmbed-gateway` (the name the proxy
    /// checks on every gateway), the session key ring and an admin token.
    #[arg(long, value_name = "DIR2")]
    k8s_secrets: Option<PathBuf>,
}

pub fn run(args: CertsArgs) -> Result<(), CertError> {
    match args.command {
        CertsCommand::Init(a) => init(&a),
        CertsCommand::Revoke(a) => revoke(&a),
    }
}

/// Writes a public file (a certificate, a CRL, a list): mode 0644.
fn write(path: &Path, body: &str) -> Result<(), CertError> {
    write_mode(path, body, 0o644)
}

/// Writes a secret (a private key, the session key ring): mode 0600, whatever the file was.
fn write_secret(path: &Path, body: &str) -> Result<(), CertError> {
    write_mode(path, body, 0o600)
}

fn write_mode(path: &Path, body: &str, mode: u32) -> Result<(), CertError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let failed = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    // The mode is set before a byte is written (`mode` applies to a new file; an existing one
    // is narrowed first), so a key is never readable by others, not even for a moment.
    // O_NOFOLLOW: a planted symlink is refused, not followed; the mode is set on the open
    // file (no path race) before it is truncated and written.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(failed)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(failed)?;
    file.set_len(0).map_err(failed)?;
    file.write_all(body.as_bytes()).map_err(failed)
}

/// Creates `dir` (and its parents) with mode 0700, or narrows it to 0700: it holds keys.
fn private_dir(dir: &Path) -> Result<(), CertError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let failed = |source| CertError::Write {
        path: dir.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(failed)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)
}

fn write_pair(dir: &Path, stem: &str, issued: &Issued) -> Result<serde_json::Value, CertError> {
    let (cert, key) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    write(&cert, &issued.cert_pem)?;
    write_secret(&key, &issued.key_pem)?;
    Ok(serde_json::json!({ "cert": cert, "key": key }))
}

/// What `certs init --force` replaces and so removes first: the device and admin
/// directories, and every `gateway-N` pair (a smaller PKI leaves none of the old CA's behind).
/// Files it does not write are left alone.
fn remove_replaced(dir: &Path) -> Result<(), CertError> {
    let failed = |path: &Path| {
        let path = path.to_owned();
        move |source| CertError::Write { path, source }
    };
    for sub in ["devices", "admin"] {
        let path = dir.join(sub);
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(failed(&path))?;
        }
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let gateway_pair = name
            .strip_prefix("gateway-")
            .and_then(|rest| {
                rest.strip_suffix(".pem")
                    .or_else(|| rest.strip_suffix(".key"))
            })
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if gateway_pair {
            std::fs::remove_file(entry.path()).map_err(failed(&entry.path()))?;
        }
    }
    Ok(())
}

fn init(a: &InitArgs) -> Result<(), CertError> {
    let ca_path = a.dir.join("ca.pem");
    if ca_path.exists() && !a.force {
        return Err(CertError::File {
            path: ca_path,
            problem: "exists already (pass --force to replace this PKI)".into(),
        });
    }
    // Only a PKI is replaced: without its ca.pem, `devices/` or `admin/` are someone else's.
    if a.force && ca_path.exists() {
        remove_replaced(&a.dir)?;
    }
    // A PKI `up` wrote and `certs init` replaces is no longer `up`'s to replace.
    let _ = std::fs::remove_file(a.dir.join(".wasmbed-up"));
    write_pki(a)?;
    say!(
        "wrote a dev PKI to {}: CA, proxy, gateways: {}, devices: {}, admin CA and admin certificate (admin/), session key ring; index.json lists them",
        a.dir.display(),
        a.gateways,
        a.devices
    );
    if let Some(out) = &a.k8s_secrets {
        let path = write_k8s_secrets(a, out)?;
        say!(
            "wrote Kubernetes Secrets to {} (kubectl apply -n NAMESPACE -f {})",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

/// The name every gateway's certificate carries in Kubernetes: the proxy reaches gateways by
/// pod address and checks this name (`[upstream_tls] server_name`).
pub const K8S_GATEWAY_NAME: &str = "wasmbed-gateway";

/// One Secret as YAML, its values as block scalars (`stringData`: no base64 to get wrong).
fn secret_yaml(name: &str, kind: &str, entries: &[(&str, &str)]) -> String {
    let mut y = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  labels:\n    app.kubernetes.io/part-of: wasmbed\ntype: {kind}\nstringData:\n"
    );
    for (key, value) in entries {
        y.push_str(&format!("  {key}: |\n"));
        for line in value.lines() {
            y.push_str("    ");
            y.push_str(line);
            y.push('\n');
        }
    }
    y
}

fn write_k8s_secrets(a: &InitArgs, out: &Path) -> Result<PathBuf, CertError> {
    std::fs::create_dir_all(out).map_err(|source| CertError::Write {
        path: out.to_owned(),
        source,
    })?;
    let read = |name: &str| read_file(&a.dir.join(name));
    let ca_pem = read("ca.pem")?;
    let ca = DevCa::load(&ca_pem, &read("ca.key")?)?;
    let kind = if a.rsa {
        KeyKind::Rsa2048
    } else {
        KeyKind::EcdsaP256
    };
    let mut names = vec![K8S_GATEWAY_NAME];
    names.extend(a.sans.iter().map(String::as_str));
    let gateway = ca.issue_server(&names, kind)?;
    let mut token = [0u8; 32];
    wasmbed_certs::provider()
        .secure_random
        .fill(&mut token)
        .map_err(|_| CertError::Random("the admin token"))?;
    let token = hex(&token);
    let tls = "kubernetes.io/tls";
    let text = [
        secret_yaml("wasmbed-ca", "Opaque", &[("ca.crt", &ca_pem)]),
        secret_yaml(
            "wasmbed-proxy-tls",
            tls,
            &[
                ("tls.crt", &read("proxy.pem")?),
                ("tls.key", &read("proxy.key")?),
            ],
        ),
        secret_yaml(
            "wasmbed-proxy-client",
            tls,
            &[
                ("tls.crt", &read("proxy-client.pem")?),
                ("tls.key", &read("proxy-client.key")?),
            ],
        ),
        secret_yaml(
            "wasmbed-gateway-tls",
            tls,
            &[
                ("tls.crt", &gateway.cert_pem),
                ("tls.key", &gateway.key_pem),
            ],
        ),
        secret_yaml(
            "wasmbed-session-keys",
            "Opaque",
            &[("session-keys.toml", &read("session-keys.toml")?)],
        ),
        secret_yaml(
            "wasmbed-proxy-tickets",
            "Opaque",
            &[("proxy-tickets.toml", &read("proxy-tickets.toml")?)],
        ),
        secret_yaml("wasmbed-admin-token", "Opaque", &[("token", &token)]),
    ]
    .concat();
    let path = out.join("secrets.yaml");
    write_secret(&path, &text)?;
    Ok(path)
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
        k8s_secrets: None,
    })
}

/// The identity of the admin client certificate that `certs init` issues (admin/admin.pem).
pub const ADMIN_IDENTITY: &str = "wasmbed-admin";

/// The identity of the proxy's client certificate that `certs init` issues.
pub const PROXY_IDENTITY: &str = "wasmbed-proxy";

fn write_pki(a: &InitArgs) -> Result<(), CertError> {
    let ca_path = a.dir.join("ca.pem");
    let devices_dir = a.dir.join("devices");
    let admin_dir = a.dir.join("admin");
    // DIR itself is narrowed only when this creates it (`--dir .` stays as it was); the
    // directories of keys it writes are its own.
    let created = !a.dir.exists();
    std::fs::create_dir_all(&a.dir).map_err(|source| CertError::Write {
        path: a.dir.clone(),
        source,
    })?;
    if created {
        private_dir(&a.dir)?;
    }
    for dir in [&devices_dir, &admin_dir] {
        private_dir(dir)?;
    }
    let kind = if a.rsa {
        KeyKind::Rsa2048
    } else {
        KeyKind::EcdsaP256
    };
    let ca = DevCa::generate("wasmbed dev CA")?;
    write(&ca_path, &ca.cert_pem())?;
    write_secret(&a.dir.join("ca.key"), ca.key_pem())?;
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
    // Admins get a CA of their own: the admin endpoint refuses the devices' CA as its
    // `--admin-client-ca` (any device certificate would then be an admin).
    let admin_ca = DevCa::generate("wasmbed admin CA")?;
    let admin_ca_path = admin_dir.join("ca.pem");
    write(&admin_ca_path, &admin_ca.cert_pem())?;
    write_secret(&admin_dir.join("ca.key"), admin_ca.key_pem())?;
    let admin = write_pair(
        &admin_dir,
        "admin",
        &admin_ca.issue_client(ADMIN_IDENTITY, kind)?,
    )?;
    // The fleet's session key ring: every gateway gets the same file (`--session-keys`).
    let keys_path = a.dir.join("session-keys.toml");
    let ring = wasmbed_gateway::ticket::KeyRing::generate("k1")
        .map_err(|_| CertError::Random("the session key"))?;
    write_secret(&keys_path, &ring)?;
    // The proxies' ring for the devices' TLS tickets: every replica gets the same file
    // (`--tls-ticket-keys`); a key of its own, not the gateways' (what each trusts differs).
    let tickets_path = a.dir.join("proxy-tickets.toml");
    let tickets =
        wasmbed_certs::ring::KeyRing::generate_for("k1", "The proxies' TLS ticket key ring")
            .map_err(|_| CertError::Random("the TLS ticket key"))?;
    write_secret(&tickets_path, &tickets)?;
    // An empty CRL, number 1: `--client-crl DIR/crl.pem` works before the first revocation,
    // and `certs revoke` numbers its CRLs on from it.
    let crl_path = a.dir.join("crl.pem");
    write(&crl_path, &ca.crl(&[], 1, CRL_VALIDITY)?)?;
    let list = Revoked {
        crl_number: 1,
        revoked: Vec::new(),
    };
    write(
        &a.dir.join("revoked.json"),
        &serde_json::to_string_pretty(&list).unwrap_or_default(),
    )?;
    let index = serde_json::json!({
        "session_keys": keys_path,
        "proxy_tickets": tickets_path,
        "crl": crl_path,
        "ca": { "cert": ca_path, "key": a.dir.join("ca.key") },
        "proxy": proxy,
        "proxy_client": proxy_client,
        "admin": { "ca": admin_ca_path, "client": admin },
        "gateways": gateways,
        "devices": devices,
    });
    let text = serde_json::to_string_pretty(&index).unwrap_or_default();
    write(&a.dir.join("index.json"), &text)
}
