//! The `wasmbed` binary end to end: flags, errors, signals, descriptor exhaustion.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run wasmbed");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_explains_every_proxy_option() {
    let (code, out, _) = run(&["proxy", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--config",
        "--listen",
        "--mode",
        "--gateway",
        "--admin",
        "--health",
        "--health-interval",
        "--health-timeout",
        "--rise",
        "--fall",
        "--tls-cert",
        "--tls-key",
        "--client-ca",
        "--allow-plain",
        "--max-connections",
        "--threads",
        "--log-format",
    ] {
        assert!(out.contains(flag), "{flag} missing from --help");
    }
    // What a flag's text says is what it does: past --max-handshakes a device waits in line
    // (--handshake-wait) before it is refused, not refused at once.
    let text = |flag: &str| {
        let start = out.find(&format!("{flag} <")).expect("the flag's entry");
        let rest = &out[start + flag.len()..];
        rest[..rest.find("\n      --").unwrap_or(rest.len())].to_string()
    };
    let max_handshakes = text("--max-handshakes");
    assert!(
        max_handshakes.contains("waits in line up to --handshake-wait"),
        "{max_handshakes}"
    );
}

#[test]
fn a_bad_flag_or_file_is_one_line_naming_the_field() {
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "proxy",
                "--gateway",
                "127.0.0.1:9",
                "--health-interval",
                "5x",
            ],
            "health.interval",
        ),
        (&["proxy", "--gateway", "nowhere"], "gateway[0].addr"),
        (&["proxy"], "`gateway`"),
        (
            &["proxy", "--config", "/nonexistent.toml"],
            "/nonexistent.toml",
        ),
    ];
    for (args, field) in cases {
        let (code, _, err) = run(args);
        assert_eq!(code, 2, "{args:?}");
        assert!(err.contains(field), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn a_missing_certificate_fails_the_start_naming_the_file() {
    let (code, _, err) = run(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "off",
        "--gateway",
        "127.0.0.1:9",
        "--mode",
        "terminate",
        "--tls-cert",
        "/nonexistent/proxy.pem",
        "--tls-key",
        "/nonexistent/proxy.key",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/proxy.pem"), "{err}");
    assert!(err.contains("--tls-cert"), "the setting is named: {err}");
}

#[test]
fn an_address_in_use_names_the_listener() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for (flag, other, what) in [
        ("--listen", "--admin", "--listen"),
        ("--admin", "--listen", "--admin"),
    ] {
        let (code, _, err) = run(&[
            "proxy",
            flag,
            &addr,
            other,
            "127.0.0.1:0",
            "--gateway",
            "127.0.0.1:9",
        ]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(&addr) && err.contains(what), "{err}");
    }
}

#[test]
fn sigterm_exits_zero() {
    let gw = echo_server();
    let mut p = ProxyProcess::start(
        &[],
        &[
            "--allow-plain",
            "--gateway",
            &gw.to_string(),
            "--health",
            "tcp",
        ],
    );
    assert_eq!(
        echo(p.listen, b"through the binary").unwrap(),
        b"through the binary"
    );
    p.signal(libc::SIGTERM);
    let status = p.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// With 48 descriptors the proxy soon runs out; it must back off (not spin, not exit), keep
/// serving the sessions it has, and serve again once descriptors are free.
#[test]
fn out_of_descriptors_the_proxy_backs_off_and_recovers() {
    let gw = echo_server();
    let mut p = ProxyProcess::start(
        &["prlimit", "--nofile=48:48", "--"],
        &[
            "--allow-plain",
            "--gateway",
            &gw.to_string(),
            "--health",
            "none",
            "--threads",
            "1",
        ],
    );
    // Five live sessions (two descriptors each)...
    let mut live: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut s = TcpStream::connect(p.listen).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).expect("served before the limit");
            s
        })
        .collect();
    // ...then connections that sent the first byte of a TLS record and no more, each holding a
    // descriptor while the proxy waits for the rest of its hello, until accept() fails with
    // EMFILE. (One that sent nothing would stay the kernel's: `defer_accept`.)
    let silent: Vec<TcpStream> = (0..60)
        .map(|_| {
            let mut s = TcpStream::connect(p.listen).unwrap();
            s.write_all(&[22]).unwrap();
            s
        })
        .collect();
    // Stay at the limit for a while: a spinning accept loop would fail thousands of times.
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(p.child_alive(), "the proxy did not exit");
    for s in live.iter_mut() {
        s.write_all(b"y").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .expect("live sessions keep working at the limit");
        assert_eq!(&b, b"y");
    }
    drop(silent);
    // Serves again once descriptors are free (after at most one backoff step).
    let deadline = Instant::now() + Duration::from_secs(5);
    let answer = loop {
        match echo(p.listen, b"again") {
            Ok(a) => break a,
            Err(e) => assert!(Instant::now() < deadline, "never recovered: {e}"),
        }
    };
    assert_eq!(answer, b"again");
    let errors = p.metric("wasmbed_proxy_accept_errors_total{kind=\"emfile\"}");
    let elapsed = started.elapsed().as_secs_f64();
    assert!(errors >= 1.0, "EMFILE was hit and counted");
    // Backoff doubles from 10ms to 1s: a handful of failed accepts, not a spin of thousands.
    assert!(
        errors < 20.0 * elapsed + 10.0,
        "{errors} accept errors in {elapsed:.1}s: spinning"
    );
}

#[test]
fn up_help_names_every_scenario_and_the_stop_signals() {
    let (code, out, _) = run(&["up", "--help"]);
    assert_eq!(code, 0);
    for word in ["failover", "drain", "scale-up", "SIGTERM", "SIGHUP"] {
        assert!(out.contains(word), "`up --help` lacks {word}: {out}");
    }
    let (code, out, _) = run(&["gateway", "--help"]);
    assert_eq!(code, 0);
    // Defaults in --help come from the same constants as the config.
    for word in [
        "Default 50ms",
        "Default 4MiB",
        "Default 10000",
        "--proxy-identity",
    ] {
        assert!(out.contains(word), "`gateway --help` lacks {word}: {out}");
    }
}
