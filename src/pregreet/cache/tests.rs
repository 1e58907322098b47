use super::*;

fn manual(at: u64) -> (Cache, Arc<AtomicU64>) {
    let clock = Arc::new(AtomicU64::new(at));
    (Cache::new(10, Clock::Manual(clock.clone())), clock)
}

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::from(0xC000_0200 + n))
}

#[test]
fn a_verdict_lasts_its_ttl_and_not_a_second_longer() {
    let (c, clock) = manual(1000);
    c.put(ip(1), Verdict::Pass, 86_400);
    c.put(ip(2), Verdict::Fail, 600);
    assert_eq!(c.get(ip(1)), Some(Verdict::Pass));
    assert_eq!(c.get(ip(2)), Some(Verdict::Fail));
    clock.store(1000 + 599, Ordering::Relaxed);
    assert_eq!(c.get(ip(2)), Some(Verdict::Fail));
    clock.store(1000 + 600, Ordering::Relaxed);
    assert_eq!(c.get(ip(2)), None, "a failure ends after pregreet_fail_ttl");
    assert_eq!(c.get(ip(1)), Some(Verdict::Pass));
    clock.store(1000 + 86_400, Ordering::Relaxed);
    assert_eq!(c.get(ip(1)), None, "a pass ends after pregreet_pass_ttl");
    assert!(c.is_empty(), "expired entries looked up are gone");
}

#[test]
fn a_zero_ttl_remembers_nothing() {
    let (c, _) = manual(1000);
    c.put(ip(1), Verdict::Fail, 0);
    assert_eq!(c.get(ip(1)), None);
    assert_eq!(c.len(), 0);
}

#[test]
fn the_sweep_removes_only_the_expired() {
    let (c, clock) = manual(1000);
    for n in 0..4 {
        c.put(ip(n), Verdict::Fail, 10);
    }
    for n in 4..7 {
        c.put(ip(n), Verdict::Pass, 100);
    }
    assert_eq!(c.counts(), Counts { pass: 3, fail: 4 });
    clock.store(1010, Ordering::Relaxed);
    assert_eq!(c.len(), 7, "nothing is removed until looked up or swept");
    assert_eq!(c.counts(), Counts { pass: 3, fail: 0 });
    assert_eq!(c.sweep(), 4);
    assert_eq!(c.len(), 3);
}

#[test]
fn the_bound_holds_and_failures_go_before_passes() {
    let (c, clock) = manual(1000);
    for n in 0..5 {
        c.put(ip(n), Verdict::Pass, 1000 + n as u64);
    }
    for n in 5..10 {
        c.put(ip(n), Verdict::Fail, 600);
    }
    assert_eq!(c.len(), 10);
    clock.store(1001, Ordering::Relaxed);
    // Full: one more makes room for a tenth of the bound, failures first.
    c.put(ip(100), Verdict::Pass, 50);
    assert_eq!(c.len(), 10, "bounded at 10");
    assert_eq!(c.counts(), Counts { pass: 6, fail: 4 });
    for n in 200..1200 {
        c.put(ip(n), Verdict::Fail, 600);
        assert!(c.len() <= 10, "the bound holds through a flood");
    }
    // Then the passes that end soonest: the newest flood stays, bounded.
    assert_eq!(c.len(), 10);
    assert_eq!(c.get(ip(1199)), Some(Verdict::Fail));
}

#[test]
fn an_expired_entry_from_outside_is_not_kept() {
    let (c, _) = manual(1000);
    c.insert(
        ip(1),
        Cached {
            verdict: Verdict::Pass,
            until: 1000,
        },
    );
    c.insert(
        ip(2),
        Cached {
            verdict: Verdict::Pass,
            until: 1001,
        },
    );
    assert_eq!(c.get(ip(1)), None);
    assert_eq!(c.get(ip(2)), Some(Verdict::Pass));
}
