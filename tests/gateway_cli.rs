//! `wasmbed gateway` and `wasmbed certs init` as real processes.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{BIN, addr_in, spawn_ready};

fn frame(kind: u8, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut f = ((9 + body.len()) as u32).to_be_bytes().to_vec();
    f.push(kind);
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn read_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 13];
    s.read_exact(&mut head).ok()?;
    let len = u32::from_be_bytes(head[..4].try_into().ok()?) as usize;
    let mut body = vec![0u8; len - 9];
    s.read_exact(&mut body).ok()?;
    Some((head[4], body))
}

#[test]
fn certs_init_writes_a_pki_the_gateway_starts_with() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = Command::new(BIN)
        .args([
            "certs",
            "init",
            "--dir",
            d,
            "--devices",
            "3",
            "--gateways",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("index.json")).unwrap())
            .unwrap();
    assert_eq!(index["devices"].as_array().unwrap().len(), 3);
    assert_eq!(index["devices"][2]["id"], "device-0002");
    assert!(
        dir.path().join("proxy-client.pem").exists(),
        "the proxy's client certificate"
    );
    // A second init refuses to overwrite the CA.
    let again = Command::new(BIN)
        .args(["certs", "init", "--dir", d])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    // The gateway starts on these files.
    let (mut gw, line) = spawn_ready(
        Command::new(BIN)
            .args(["gateway", "--listen", "127.0.0.1:0", "--admin", "off"])
            .args([
                "--tls-cert",
                &format!("{d}/gateway-0.pem"),
                "--tls-key",
                &format!("{d}/gateway-0.key"),
            ])
            .args(["--client-ca", &format!("{d}/ca.pem")]),
    );
    assert!(line.starts_with("ready listen=127.0.0.1:"), "{line}");
    let _ = gw.kill();
    let _ = gw.wait();
}

#[test]
fn a_bad_gateway_flag_or_missing_file_is_one_line() {
    for (args, want) in [
        (
            &["gateway", "--insecure-plaintext", "--max-memory", "lots"][..],
            "`max_memory`",
        ),
        (&["gateway"][..], "`tls`"),
        (
            &[
                "gateway",
                "--insecure-plaintext",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "off",
                "--apps",
                "/nonexistent/apps",
            ][..],
            "/nonexistent/apps",
        ),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn sigterm_sends_goaway_and_exits_within_the_grace_period() {
    let apps = concat!(env!("CARGO_MANIFEST_DIR"), "/apps");
    let (mut gw, line) = spawn_ready(
        Command::new(BIN)
            .args(["gateway", "--insecure-plaintext", "--listen", "127.0.0.1:0"])
            .args(["--admin", "off", "--apps", apps, "--grace", "5s"]),
    );
    let addr = addr_in(&line, "listen=");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // HELLO {device: "d1", app: "echo"} (the CBOR of PROTOCOL.md's example).
    let hello = [
        0xa2, 0x66, b'd', b'e', b'v', b'i', b'c', b'e', 0x62, b'd', b'1', 0x63, b'a', b'p', b'p',
        0x64, b'e', b'c', b'h', b'o',
    ];
    s.write_all(&frame(1, 0, &hello)).unwrap();
    assert_eq!(read_frame(&mut s).map(|f| f.0), Some(2), "WELCOME");
    let started = Instant::now();
    // SAFETY: kill(2) on the child we spawned; no memory is touched.
    assert_eq!(unsafe { libc::kill(gw.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(read_frame(&mut s).map(|f| f.0), Some(9), "GOAWAY");
    assert!(read_frame(&mut s).is_none(), "closed after GOAWAY");
    let status = gw.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exited within the grace period"
    );
}
