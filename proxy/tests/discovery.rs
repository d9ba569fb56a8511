//! Gateways found in DNS, against a real DNS server started by the test (hickory-server)
//! whose records the test changes: scale up, scale down, an empty answer, NXDOMAIN, a server
//! that stops answering, a flapping record, an answer too large to take whole.
#![allow(
    clippy::disallowed_methods,
    reason = "tests make their timers on runtimes with a time driver (proxy/clippy.toml)"
)]

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use support::frames::*;
use support::*;
use wasmbed_certs::pki::KeyKind;
use wasmbed_config::proxy::{DiscoveryTarget, DnsQuery};
use wasmbed_config::{HealthCheck, Mode, ProxyConfig};
use wasmbed_testkit::dns::DnsServer;

const NAME: &str = "gateways.wasmbed.test";

/// Gateways from the A records of [`NAME`] on `port`.
fn by_name(dns: &DnsServer, port: u16) -> ProxyConfig {
    discovering(
        dns,
        DnsQuery::Addresses {
            name: NAME.into(),
            port,
        },
    )
}

fn discovering(dns: &DnsServer, query: DnsQuery) -> ProxyConfig {
    let mut c = config(Vec::new());
    c.allow_empty = true;
    c.health.check = HealthCheck::Tcp;
    c.discovery.servers = vec![dns.addr];
    c.discovery.timeout = Duration::from_millis(300);
    c.discovery.grace = Duration::from_secs(2);
    c.discovery.targets = vec![DiscoveryTarget {
        query,
        pool: "default".into(),
        weight: 1,
        health_port: None,
    }];
    c
}

/// Gateways that take sessions now (up, not draining), by address.
fn taking(proxy: &RunningProxy) -> Vec<String> {
    let mut v: Vec<String> = proxy
        .gateways
        .snapshot()
        .iter()
        .filter(|g| g.is_healthy() && !g.is_draining())
        .map(|g| g.addr.clone())
        .collect();
    v.sort();
    v
}

async fn until_taking(proxy: &RunningProxy, want: &[SocketAddr]) {
    let mut want: Vec<String> = want.iter().map(ToString::to_string).collect();
    want.sort();
    until(
        Duration::from_secs(10),
        &format!("gateways {want:?}"),
        || taking(proxy) == want,
    )
    .await;
}

/// `n` echo backends on 127.0.0.2.. sharing one port (as a headless Service's pods do).
async fn backends(n: usize) -> (Vec<Backend>, u16) {
    'port: loop {
        let first = Backend::spawn_at("127.0.0.2:0".parse().unwrap())
            .await
            .unwrap();
        let port = first.addr.port();
        let mut all = vec![first];
        for i in 1..n {
            let ip = Ipv4Addr::new(127, 0, 0, 2 + i as u8);
            match Backend::spawn_at(SocketAddr::new(ip.into(), port)).await {
                Some(b) => all.push(b),
                None => continue 'port,
            }
        }
        return (all, port);
    }
}

fn ips(b: &[&Backend]) -> Vec<Ipv4Addr> {
    b.iter()
        .map(|b| match b.addr.ip() {
            std::net::IpAddr::V4(ip) => ip,
            other => panic!("{other}"),
        })
        .collect()
}

fn addrs(b: &[&Backend]) -> Vec<SocketAddr> {
    b.iter().map(|b| b.addr).collect()
}

#[tokio::test]
async fn gateways_follow_the_dns_answer_up_and_down() {
    let dns = DnsServer::start().await.unwrap();
    let (b, port) = backends(3).await;
    dns.set_a(NAME, &ips(&[&b[0]]), 1).await;
    let proxy = start(by_name(&dns, port)).await;
    until_taking(&proxy, &addrs(&[&b[0]])).await;
    // Scale up: two more pods.
    dns.set_a(NAME, &ips(&[&b[0], &b[1], &b[2]]), 1).await;
    until_taking(&proxy, &addrs(&[&b[0], &b[1], &b[2]])).await;
    let mut sessions = Vec::new();
    for _ in 0..6 {
        sessions.push(device(proxy.addr).await);
    }
    assert_eq!((b[0].live(), b[1].live(), b[2].live()), (2, 2, 2));
    // Scale down: b[2] leaves the answer. It takes no new session at once, keeps its live
    // ones (passthrough) and leaves the set after the grace.
    dns.set_a(NAME, &ips(&[&b[0], &b[1]]), 1).await;
    until_taking(&proxy, &addrs(&[&b[0], &b[1]])).await;
    assert_eq!(b[2].live(), 2, "its sessions are not cut");
    for _ in 0..2 {
        sessions.push(device(proxy.addr).await);
    }
    assert_eq!((b[0].live(), b[1].live(), b[2].live()), (3, 3, 2));
    until(
        Duration::from_secs(10),
        "gone from the set after the grace",
        || proxy.gateways.snapshot().len() == 2,
    )
    .await;
    let source = format!("{NAME}:{port}");
    for (change, n) in [("added", 3.0), ("gone", 1.0), ("removed", 1.0)] {
        let series = format!(
            "wasmbed_proxy_discovery_changes_total{{change=\"{change}\",source=\"{source}\"}}"
        );
        // Counted just after the set changes, on the probes' thread: waited for.
        proxy.until_metric(&series, n).await;
    }
}

#[tokio::test]
async fn errors_and_empty_answers_keep_the_last_good_set() {
    let dns = DnsServer::start().await.unwrap();
    let (b, port) = backends(2).await;
    dns.set_a(NAME, &ips(&[&b[0], &b[1]]), 1).await;
    let proxy = start(by_name(&dns, port)).await;
    let both = addrs(&[&b[0], &b[1]]);
    until_taking(&proxy, &both).await;
    let source = format!("{NAME}:{port}");
    let errors = |reason: &str| {
        format!("wasmbed_proxy_discovery_errors_total{{reason=\"{reason}\",source=\"{source}\"}}")
    };
    // An empty answer (the name exists, no address), then NXDOMAIN, then no answer at all.
    dns.set_empty(NAME).await;
    wait_until(&proxy, &errors("empty"), 1.0).await;
    assert_eq!(
        taking(&proxy),
        sorted(&both),
        "an empty answer changes nothing"
    );
    dns.remove(NAME).await;
    wait_until(&proxy, &errors("nxdomain"), 1.0).await;
    assert_eq!(taking(&proxy), sorted(&both), "NXDOMAIN changes nothing");
    dns.stall(true);
    wait_until(&proxy, &errors("timeout"), 1.0).await;
    assert_eq!(taking(&proxy), sorted(&both), "a timeout changes nothing");
    // Devices are still served by both.
    let _a = device(proxy.addr).await;
    let _b = device(proxy.addr).await;
    assert_eq!((b[0].live(), b[1].live()), (1, 1));
}

fn sorted(a: &[SocketAddr]) -> Vec<String> {
    let mut v: Vec<String> = a.iter().map(ToString::to_string).collect();
    v.sort();
    v
}

/// Terminate mode, gateways from SRV records: a record that flaps moves no session; one
/// that stays gone has its sessions moved (app state along) and leaves the set.
#[tokio::test]
async fn srv_records_a_flap_costs_nothing_a_removal_moves_sessions() {
    let dns = DnsServer::start().await.unwrap();
    let pki = pki(KeyKind::EcdsaP256);
    let (a, b) = (
        FrameGateway::spawn("a").await,
        FrameGateway::spawn("b").await,
    );
    dns.set_a("gw-a", &[Ipv4Addr::LOCALHOST], 1).await;
    dns.set_a("gw-b", &[Ipv4Addr::LOCALHOST], 1).await;
    let srv = "_wasmbed._tcp.wasmbed.test";
    let both = [("gw-a", a.addr.port()), ("gw-b", b.addr.port())];
    dns.set_srv(srv, &both, 1).await;
    let mut c = discovering(&dns, DnsQuery::Srv { name: srv.into() });
    c.mode = Mode::Terminate;
    c.tls = Some(pki.tls.clone());
    c.discovery.grace = Duration::from_secs(30);
    let proxy = start(c).await;
    until_taking(&proxy, &[a.addr, b.addr]).await;
    let mut devices = Vec::new();
    for i in 0..4 {
        let name = format!("device-{i:04}");
        let tls = tls_connect(proxy.addr, device_tls(&pki.ca, Some(&pki.ca), &name, false))
            .await
            .unwrap();
        let mut d = wasmbed_testkit::Device::new(tls);
        d.open(&name, "counter").await;
        assert_eq!(&d.data(b"tick").await.body[..], b"1");
        devices.push(d);
    }
    assert_eq!((a.live(), b.live()), (2, 2));
    let label = format!("srv:{srv}");
    let change = |what: &str| {
        format!("wasmbed_proxy_discovery_changes_total{{change=\"{what}\",source=\"{label}\"}}")
    };
    // b flaps: gone from one answer, back in the next, three times.
    for round in 1..=3 {
        dns.set_srv(srv, &both[..1], 1).await;
        wait_until(&proxy, &change("gone"), f64::from(round)).await;
        dns.set_srv(srv, &both, 1).await;
        wait_until(&proxy, &change("returned"), f64::from(round)).await;
    }
    let moved = proxy
        .metric("wasmbed_proxy_session_moves_total{cause=\"drain\",result=\"resumed\"}")
        .await;
    assert_eq!(moved, 0.0, "a flapping record moves no session");
    assert_eq!((a.live(), b.live()), (2, 2));
    assert_eq!(b.hellos(), 2, "no session reopened on b either");
    // b leaves for good: its two sessions move to a, their state intact, then it is removed.
    dns.set_srv(srv, &both[..1], 1).await;
    until(Duration::from_secs(10), "b's sessions moved", || {
        a.live() == 4 && b.live() == 0
    })
    .await;
    until(Duration::from_secs(10), "b removed", || {
        proxy.gateways.snapshot().len() == 1
    })
    .await;
    for d in &mut devices {
        let f = d.data(b"tick").await;
        assert_eq!(f.kind, wasmbed_protocol::Kind::Reply);
        assert_eq!(
            &f.body[..],
            b"2",
            "the count goes on: the app state moved along"
        );
    }
    wait_until(&proxy, &change("removed"), 1.0).await;
}

async fn wait_until(proxy: &RunningProxy, series: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = proxy.metric(series).await;
        if v >= want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is {v}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An answer with more addresses than --max-discovered: the lowest are taken, the rest
/// counted. (1,000 A records, over TCP after the truncated UDP answer: one DNS message holds
/// at most 64 KiB, about 4,000 addresses, so a 10,000-address answer cannot be sent whole, and
/// the test server truncates past ~1,500.)
#[tokio::test]
async fn a_huge_answer_is_capped_and_counted() {
    let dns = DnsServer::start().await.unwrap();
    let many: Vec<Ipv4Addr> = (0..1000u32)
        .map(|i| Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8))
        .collect();
    dns.set_a(NAME, &many, 30).await;
    let mut c = by_name(&dns, 9);
    c.discovery.max_addresses = 50;
    c.discovery.timeout = Duration::from_secs(2);
    let proxy = start(c).await;
    wait_until(
        &proxy,
        &format!("wasmbed_proxy_discovery_capped_total{{source=\"{NAME}:9\"}}"),
        1.0,
    )
    .await;
    let set = proxy.gateways.snapshot();
    assert_eq!(set.len(), 50);
    assert!(
        set.iter().any(|g| g.addr == "127.1.0.1:9"),
        "the lowest are kept"
    );
    // Nothing listens there: unproven, they never take a session.
    assert!(set.iter().all(|g| !g.is_healthy()));
}

/// A reload that changes a source's settings: a new weight is applied to the gateways in
/// place (their sessions stay), a new pool replaces them.
#[tokio::test]
async fn a_reload_reweights_or_replaces_a_sources_gateways() {
    let dns = DnsServer::start().await.unwrap();
    let (b, port) = backends(2).await;
    dns.set_a(NAME, &ips(&[&b[0], &b[1]]), 1).await;
    let proxy = start(by_name(&dns, port)).await;
    until_taking(&proxy, &addrs(&[&b[0], &b[1]])).await;
    let _session = device(proxy.addr).await;
    let first = proxy.gateways.snapshot();
    let mut c = proxy.live.context().config.clone();
    c.discovery.targets[0].weight = 3;
    proxy.live.apply(c.clone()).unwrap();
    until(Duration::from_secs(10), "weight 3 on both", || {
        proxy.gateways.snapshot().iter().all(|g| g.weight() == 3)
    })
    .await;
    let now = proxy.gateways.snapshot();
    assert!(
        first
            .iter()
            .zip(now.iter())
            .all(|(a, b)| std::sync::Arc::ptr_eq(a, b)),
        "the same gateways, re-weighted in place"
    );
    assert_eq!(b[0].live() + b[1].live(), 1, "the session stayed");
    c.discovery.targets[0].pool = "other".into();
    proxy.live.apply(c).unwrap();
    until(Duration::from_secs(10), "both back in pool `other`", || {
        let s = proxy.gateways.snapshot();
        s.len() == 2 && s.iter().all(|g| g.pool == "other" && g.is_healthy())
    })
    .await;
}

/// A reload that gives the source weight `weight` (which restarts it), once its gateways
/// have it.
async fn restart_the_source(proxy: &RunningProxy, weight: u32) {
    let mut c = proxy.live.context().config.clone();
    c.discovery.targets[0].weight = weight;
    proxy.live.apply(c).unwrap();
    until(Duration::from_secs(10), "the source restarted", || {
        proxy
            .gateways
            .snapshot()
            .iter()
            .all(|g| g.weight() == weight)
    })
    .await;
}

/// An address that left the answer, then a reload that restarts its source, then the address
/// back: it takes sessions again. The restarted source knew it as in the answer (its drain
/// not its own), so its return undid nothing and it drained for good.
#[tokio::test]
async fn a_gone_address_back_after_a_reload_takes_sessions_again() {
    let dns = DnsServer::start().await.unwrap();
    let (b, port) = backends(2).await;
    dns.set_a(NAME, &ips(&[&b[0], &b[1]]), 1).await;
    let mut c = by_name(&dns, port);
    c.discovery.grace = Duration::from_secs(60);
    let proxy = start(c).await;
    until_taking(&proxy, &addrs(&[&b[0], &b[1]])).await;
    // A session keeps b[1] in the set (not reaped) while it is gone.
    let mut held = Vec::new();
    while b[1].live() == 0 {
        held.push(device(proxy.addr).await);
    }
    dns.set_a(NAME, &ips(&[&b[0]]), 1).await;
    until_taking(&proxy, &addrs(&[&b[0]])).await;
    // Back in DNS before the restarted source's first answer (the server holds the queries
    // until then): that answer is the first it sees.
    dns.stall(true);
    dns.set_a(NAME, &ips(&[&b[0], &b[1]]), 1).await;
    restart_the_source(&proxy, 2).await;
    dns.stall(false);
    until_taking(&proxy, &addrs(&[&b[0], &b[1]])).await;
}

/// A gone address's grace runs from when it left the answer, through a reload that restarts
/// its source: the restarted source knows since when it has been gone, and does not start a
/// grace of its own (a reload every few minutes would keep a gone gateway for good).
#[tokio::test]
async fn a_gone_address_keeps_its_grace_through_a_reload() {
    let dns = DnsServer::start().await.unwrap();
    let (b, port) = backends(2).await;
    dns.set_a(NAME, &ips(&[&b[0], &b[1]]), 1).await;
    let mut c = by_name(&dns, port);
    let grace = Duration::from_secs(8);
    c.discovery.grace = grace;
    let proxy = start(c).await;
    until_taking(&proxy, &addrs(&[&b[0], &b[1]])).await;
    // A session keeps b[1] in the set (not reaped as empty) until its grace is over.
    let mut held = Vec::new();
    while b[1].live() == 0 {
        held.push(device(proxy.addr).await);
    }
    let gone_at = tokio::time::Instant::now();
    dns.set_a(NAME, &ips(&[&b[0]]), 1).await;
    until_taking(&proxy, &addrs(&[&b[0]])).await;
    // Late in its grace a reload restarts the source. (No event marks "late in the grace":
    // the clock places it.)
    tokio::time::sleep_until(gone_at + grace * 4 / 5).await;
    restart_the_source(&proxy, 2).await;
    // Reaped once the grace from its leaving is over (the source's answer within the TTL,
    // 1 s, and its look at gone addresses every second after), long before a grace counted
    // from the reload would be (`grace * 9 / 5` from its leaving, at the earliest).
    let gone = b[1].addr.to_string();
    let by = (gone_at + grace + Duration::from_secs(4))
        .saturating_duration_since(tokio::time::Instant::now());
    until(by, "the gone gateway reaped", || {
        proxy.gateways.snapshot().iter().all(|g| g.addr != gone)
    })
    .await;
    drop(held);
}

/// A found gateway an operator removed (`DELETE`) stays out while its address is still in
/// the answer, a reload that restarts its source too: the reload keeps it out, as its report
/// says.
#[tokio::test]
async fn a_found_gateway_removed_by_an_operator_stays_out_through_a_reload() {
    let dns = DnsServer::start().await.unwrap();
    let (b, port) = backends(2).await;
    dns.set_a(NAME, &ips(&[&b[0], &b[1]]), 1).await;
    let proxy = start(by_name(&dns, port)).await;
    until_taking(&proxy, &addrs(&[&b[0], &b[1]])).await;
    let name = format!("{NAME}:{port}/{}", b[1].addr);
    // Its name holds a `/`: escaped in the path.
    let path = format!("/api/gateways/{}", name.replace('/', "%2F"));
    let (status, body) = proxy.admin("DELETE", &path).await;
    assert_eq!(status, 200, "{body}");
    restart_the_source(&proxy, 2).await;
    // Two answers of the restarted source later (TTL 1 s), still one gateway.
    let asked = dns.queries();
    until(Duration::from_secs(10), "two more answers", || {
        dns.queries() >= asked + 2
    })
    .await;
    let names: Vec<String> = proxy
        .gateways
        .snapshot()
        .iter()
        .map(|g| g.name.clone())
        .collect();
    assert!(!names.contains(&name), "{names:?}");
}
