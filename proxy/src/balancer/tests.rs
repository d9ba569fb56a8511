use std::thread;

use super::*;

fn config(name: &str, weight: u32, pool: &str) -> GatewayConfig {
    GatewayConfig {
        name: name.into(),
        addr: format!("{name}:1"),
        health_addr: None,
        weight,
        pool: pool.into(),
    }
}

fn set(weights: &[u32]) -> GatewaySet {
    let configs: Vec<_> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| config(&format!("g{i}"), w, "default"))
        .collect();
    GatewaySet::new(&configs, Duration::ZERO)
}

fn counts(set: &GatewaySet) -> Vec<u64> {
    set.snapshot().iter().map(|g| g.sessions()).collect()
}

#[test]
fn concurrent_acquisitions_end_within_one_of_each_other() {
    let set = Arc::new(set(&[1, 1, 1, 1, 1]));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let set = set.clone();
            thread::spawn(move || {
                (0..2_001)
                    .map(|_| set.acquire("default", &[]).expect("a gateway"))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let leases: Vec<Vec<Lease>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let c = counts(&set);
    assert_eq!(c.iter().sum::<u64>(), 8 * 2_001);
    let (max, min) = (c.iter().max().unwrap(), c.iter().min().unwrap());
    assert!(max - min <= 1, "spread {c:?}");
    drop(leases);
    assert_eq!(counts(&set), vec![0; 5], "every lease gave its count back");
}

#[test]
fn weights_are_respected() {
    let set = set(&[1, 3, 2]);
    let leases: Vec<_> = (0..600)
        .map(|_| set.acquire("default", &[]).unwrap())
        .collect();
    assert_eq!(counts(&set), vec![100, 300, 200]);
    drop(leases);
}

#[test]
fn releases_make_room_where_they_happen() {
    let set = set(&[1, 1]);
    let mut leases: Vec<_> = (0..10)
        .map(|_| set.acquire("default", &[]).unwrap())
        .collect();
    leases.retain(|l| l.gateway().name != "g1"); // g1's five sessions end
    for _ in 0..5 {
        assert_eq!(set.acquire("default", &[]).unwrap().gateway().name, "g1");
        leases.push(set.acquire("default", &[]).unwrap());
    }
    assert_eq!(counts(&set), vec![5, 5]);
}

#[test]
fn down_and_draining_gateways_take_no_sessions() {
    let set = set(&[1, 1, 1]);
    let snap = set.snapshot();
    assert_eq!(snap[0].observe(false, 2, 2), None);
    assert_eq!(snap[0].observe(false, 2, 2), Some(Transition::Down));
    snap[1].set_draining(true);
    let leases: Vec<_> = (0..10)
        .map(|_| set.acquire("default", &[]).unwrap())
        .collect();
    assert!(leases.iter().all(|l| l.gateway().name == "g2"));
    snap[2].observe(false, 2, 1);
    assert!(set.acquire("default", &[]).is_none(), "nothing eligible");
    assert!(!set.any_eligible());
}

#[test]
fn marking_down_cancels_the_gateways_sessions() {
    let set = set(&[1]);
    let g = set.snapshot()[0].clone();
    let trigger = g.cut_trigger().expect("healthy");
    g.observe(false, 1, 1);
    assert!(trigger.is_fired());
    assert!(
        g.cut_trigger().is_none(),
        "a down gateway hands out no trigger"
    );
    assert_eq!(g.observe(true, 2, 1), None, "rise needs two successes");
    assert_eq!(g.observe(true, 2, 1), Some(Transition::Up));
    let fresh = g.cut_trigger().expect("up again");
    assert!(!fresh.is_fired());
}

#[test]
fn a_success_resets_the_failure_streak() {
    let set = set(&[1]);
    let g = set.snapshot()[0].clone();
    for _ in 0..5 {
        assert_eq!(g.observe(false, 1, 2), None);
        assert_eq!(g.observe(true, 1, 2), None);
    }
    assert!(g.is_healthy());
}

#[test]
fn pools_and_exclusions_narrow_the_choice() {
    let configs = [
        config("a", 1, "eu"),
        config("b", 1, "us"),
        config("c", 1, "eu"),
    ];
    let set = GatewaySet::new(&configs, Duration::ZERO);
    for _ in 0..6 {
        assert_ne!(set.acquire("eu", &[]).unwrap().gateway().name, "b");
    }
    let a = set.find("a").unwrap();
    for _ in 0..3 {
        let l = set.acquire("eu", std::slice::from_ref(&a)).unwrap();
        assert_eq!(l.gateway().name, "c");
    }
    assert!(set.acquire("asia", &[]).is_none());
}

#[test]
fn a_recovered_gateway_ramps_up_in_slow_start() {
    let configs = [config("old", 1, "p"), config("new", 1, "p")];
    let set = GatewaySet::new(&configs, Duration::from_secs(3600));
    let new = set.find("new").unwrap();
    new.observe(false, 1, 1);
    let mut leases: Vec<_> = (0..100).map(|_| set.acquire("p", &[]).unwrap()).collect();
    new.observe(true, 1, 1); // back up, at the start of an hour-long ramp
    leases.extend((0..100).map(|_| set.acquire("p", &[]).unwrap()));
    // At 10% weight it takes (n + 1) / 0.1 <= (m + 1): about a tenth of the old one's count.
    let (old_n, new_n) = (set.find("old").unwrap().sessions(), new.sessions());
    assert_eq!(old_n + new_n, 200);
    assert!(new_n <= old_n / 10 + 1, "new {new_n}, old {old_n}");
    assert!(new_n >= 10, "but it does take sessions: {new_n}");
}

#[test]
fn a_gateway_added_at_run_time_takes_the_new_sessions() {
    let set = set(&[1, 1]);
    let leases: Vec<_> = (0..20)
        .map(|_| set.acquire("default", &[]).unwrap())
        .collect();
    assert!(set.add(&config("g2", 1, "default")).is_some());
    assert!(
        set.add(&config("g2", 1, "default")).is_none(),
        "names are unique"
    );
    let more: Vec<_> = (0..10)
        .map(|_| set.acquire("default", &[]).unwrap())
        .collect();
    assert!(more.iter().all(|l| l.gateway().name == "g2"));
    assert_eq!(counts(&set), vec![10, 10, 10]);
    drop((leases, more));
}
