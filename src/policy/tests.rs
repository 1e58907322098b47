use super::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn longest_prefix_wins() {
    let mut t = PrefixTable::default();
    t.insert(net("198.51.100.0/24"), "wide");
    t.insert(net("198.51.100.128/25"), "narrow");
    t.insert(net("2001:db8::/32"), "v6");
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(t.longest(ip("198.51.100.200")), Some(&"narrow"));
    assert_eq!(t.longest(ip("198.51.100.5")), Some(&"wide"));
    assert_eq!(t.longest(ip("::ffff:198.51.100.5")), Some(&"wide"));
    assert_eq!(t.longest(ip("2001:db8:5::1")), Some(&"v6"));
    assert_eq!(t.longest(ip("192.0.2.1")), None);
}

#[test]
fn rate_limit_recovers_with_time() {
    let clock = PolicyClock::default();
    let r = RateLimit::new("2/min".parse().unwrap(), None, &clock);
    let k = net("192.0.2.1/32");
    assert_eq!(r.check(&k), RateCheck::Within);
    assert_eq!(r.check(&k), RateCheck::Within);
    assert_eq!(r.check(&k), RateCheck::Exceeded);
    // One unit comes back every 30 s.
    clock.advance(Duration::from_secs(29));
    assert_eq!(r.check(&k), RateCheck::Exceeded);
    clock.advance(Duration::from_secs(2));
    assert_eq!(r.check(&k), RateCheck::Within);
    assert_eq!(r.check(&k), RateCheck::Exceeded);
    // Another source has its own quota.
    assert_eq!(r.check(&net("192.0.2.2/32")), RateCheck::Within);
}

#[test]
fn at_the_key_cap_tracked_sources_stay_limited_and_only_new_ones_go_untracked() {
    let clock = PolicyClock::default();
    let r = RateLimit::new("1/min".parse().unwrap(), Some(1), &clock);
    let tracked = net("192.0.2.1/32");
    assert_eq!(r.check(&tracked), RateCheck::Within);
    assert_eq!(r.check(&tracked), RateCheck::Exceeded);
    for i in 0..MAX_RATE_KEYS as u32 {
        let k = IpNet::from(IpAddr::from((0x0a00_0000 + i).to_be_bytes()));
        r.check(&k);
    }
    // Every key is within its minute, so eviction keeps them all: the limiter is full.
    r.evict();
    assert!(r.tracked() > MAX_RATE_KEYS);
    assert_eq!(r.check(&tracked), RateCheck::Exceeded, "still limited");
    let fresh = net("198.51.100.1/32");
    assert_eq!(r.check(&fresh), RateCheck::Untracked);
    assert_eq!(r.check(&fresh), RateCheck::Untracked, "and not inserted");
    assert_eq!(r.tracked(), MAX_RATE_KEYS + 1);
    // Once the keys age out (a state a full period old is a fresh one), new sources are
    // tracked again.
    clock.advance(Duration::from_secs(121));
    r.evict();
    assert_eq!(r.check(&fresh), RateCheck::Within);
    assert_eq!(r.check(&fresh), RateCheck::Exceeded);
}

#[test]
fn stale_keys_are_evicted() {
    let clock = PolicyClock::default();
    let r = RateLimit::new("10/s".parse().unwrap(), Some(1), &clock);
    for i in 0..1000u32 {
        let k = IpNet::from(IpAddr::from(i.to_be_bytes()));
        assert_eq!(r.check(&k), RateCheck::Within);
    }
    assert_eq!(r.tracked(), 1000);
    clock.advance(Duration::from_secs(1));
    r.evict();
    assert_eq!(r.tracked(), 0, "keys back at a full burst are dropped");
}
