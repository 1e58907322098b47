//! A flood from 1,000,000 distinct IPv6 addresses through the admission decision, with a rate
//! limit on: the rate limiter stops tracking new keys at its cap, the source table empties, and
//! RSS stays bounded. Alone in its test binary so that RSS is this test's own.

use std::net::{IpAddr, Ipv6Addr};

mod common;

use common::rss_kib;
use mxgate::admission::Admission;
use mxgate::config::Settings;
use mxgate::metrics::Metrics;
use mxgate::policy::{Policy, PolicyClock, MAX_RATE_KEYS};

#[test]
fn a_million_fresh_ipv6_sources_leave_memory_bounded() {
    const SOURCES: u64 = 1_000_000;
    let config = Settings::from_toml(
        "backend = \"127.0.0.1:25\"\nhostname = \"mx.t\"\nipv6_prefix = 128\nrate_per_source = \"10/min\"",
    )
    .unwrap()
    .validate(None)
    .unwrap();
    let policy = Policy::new(&config, None, PolicyClock::default());
    let admission = Admission::new(Metrics::new());
    let before = rss_kib(std::process::id());
    let mut held = Vec::new();
    for i in 0..SOURCES {
        let ip = IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | i as u128));
        if let Ok(a) = admission.admit(&policy, ip) {
            // Hold a few at a time, as open sessions would be.
            held.push(a.guard);
            if held.len() > 100 {
                held.clear();
            }
        }
    }
    drop(held);
    let after = rss_kib(std::process::id());
    let tracked: usize = policy.rate_limits().iter().map(|r| r.tracked()).sum();
    println!(
        "1,000,000 distinct IPv6 sources: RSS {before} KiB before, {after} KiB after (+{} KiB); \
         rate limiter tracks {tracked} keys (cap {MAX_RATE_KEYS})",
        after - before
    );
    assert_eq!((admission.active(), admission.sources()), (0, 0));
    assert!(
        tracked <= MAX_RATE_KEYS + 1024,
        "the key cap held: {tracked}"
    );
    assert!(
        after - before < 64 * 1024,
        "RSS grew by {} KiB",
        after - before
    );
}
