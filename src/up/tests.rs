use super::*;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    up: UpArgs,
}

/// Every gateway `up` starts runs the same flags (scale-up's added gateway once dropped
/// `--no-tls-tickets`): a run with more room differs in its `--max-sessions` value alone, and
/// the `--gateway-arg`s come last, in order.
#[test]
fn every_gateway_runs_the_flags_given_for_gateways() {
    let cli = Cli::try_parse_from([
        "up",
        "--no-tls-tickets",
        "--gateway-arg=--threads=1",
        "--gateway-arg",
        "--log-format=json",
    ])
    .expect("the flags parse");
    let first = GatewayRun::new(&cli.up, 10_000);
    let added = first.with_room(20_000);
    let line = |run: &GatewayRun| {
        let at = GatewayAt {
            name: "gw-0".into(),
            certificate: 0,
            listen: "127.0.0.1:0".into(),
            admin: "127.0.0.1:0".into(),
        };
        let cmd = gateway_command(Path::new("wasmbed"), run, Path::new("/pki"), at);
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    let (a, b) = (line(&first), line(&added));
    assert!(a.contains(&"--no-tls-tickets".to_string()), "{a:?}");
    assert_eq!(a[a.len() - 2..], ["--threads=1", "--log-format=json"]);
    let room = a
        .iter()
        .position(|x| x == "--max-sessions")
        .expect("a room")
        + 1;
    assert_eq!((a[room].as_str(), b[room].as_str()), ("10000", "20000"));
    let without_room = |mut v: Vec<String>| {
        v.remove(room);
        v
    };
    assert_eq!(without_room(a), without_room(b));
}
