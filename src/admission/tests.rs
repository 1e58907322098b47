use super::*;
use crate::config::Settings;
use crate::policy::PolicyClock;

/// A policy from TOML keys (backend and hostname filled in).
fn policy(toml: &str) -> Policy {
    let text = format!("backend = \"127.0.0.1:25\"\nhostname = \"mx.t\"\n{toml}");
    let config = Settings::from_toml(&text).unwrap().validate(None).unwrap();
    Policy::new(&config, None, PolicyClock::default())
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn admission() -> Admission {
    Admission::new(Metrics::new())
}

fn reason(r: Result<Admitted, Refusal>) -> Option<RejectReason> {
    r.err().map(|e| e.reason)
}

#[test]
fn per_source_then_global() {
    let (a, p) = (
        admission(),
        policy("max_connections = 3\nmax_per_source = 2"),
    );
    let g1 = a.admit(&p, ip("10.0.0.1")).unwrap();
    let g2 = a.admit(&p, ip("10.0.0.1")).unwrap();
    assert_eq!(
        reason(a.admit(&p, ip("10.0.0.1"))),
        Some(RejectReason::SourceLimit)
    );
    let g3 = a.admit(&p, ip("10.0.0.2")).unwrap();
    assert_eq!(
        reason(a.admit(&p, ip("10.0.0.3"))),
        Some(RejectReason::GlobalLimit)
    );
    // A source at its own limit reports that first, even when the global one is full too.
    assert_eq!(
        reason(a.admit(&p, ip("10.0.0.1"))),
        Some(RejectReason::SourceLimit)
    );
    assert_eq!((a.active(), a.sources()), (3, 2));
    drop((g1, g2, g3));
    assert_eq!((a.active(), a.sources()), (0, 0));
}

#[test]
fn ipv6_prefix_groups_addresses() {
    let (a, p) = (admission(), policy("max_per_source = 1\nipv6_prefix = 64"));
    let _g = a.admit(&p, ip("2001:db8:1:2::1")).unwrap();
    assert_eq!(
        reason(a.admit(&p, ip("2001:db8:1:2:ffff::9"))),
        Some(RejectReason::SourceLimit)
    );
    let _h = a.admit(&p, ip("2001:db8:1:3::1")).unwrap();
    assert_eq!(a.sources(), 2);
}

#[test]
fn mapped_ipv4_counts_as_ipv4() {
    let (a, p) = (admission(), policy("max_per_source = 1"));
    let _g = a.admit(&p, ip("192.0.2.7")).unwrap();
    assert_eq!(
        reason(a.admit(&p, ip("::ffff:192.0.2.7"))),
        Some(RejectReason::SourceLimit)
    );
    assert_eq!(
        source_key(ip("::ffff:192.0.2.7"), 24, 64).to_string(),
        "192.0.2.0/24"
    );
}

#[test]
fn zero_limits_reject_without_leaving_entries() {
    let a = admission();
    let p = policy("max_connections = 0");
    assert_eq!(
        reason(a.admit(&p, ip("10.0.0.1"))),
        Some(RejectReason::GlobalLimit)
    );
    assert_eq!((a.sources(), a.active()), (0, 0));
    let p = policy("max_per_source = 0");
    assert_eq!(
        reason(a.admit(&p, ip("10.0.0.1"))),
        Some(RejectReason::SourceLimit)
    );
    assert_eq!((a.sources(), a.active()), (0, 0));
}

#[test]
fn deny_and_allow_longest_prefix_wins() {
    let a = admission();
    let p = policy(
        "max_per_source = 1\nallow = [\"192.0.2.0/24\", \"198.51.100.7\"]\n\
         deny = [\"192.0.2.66\", \"198.51.100.0/24\"]",
    );
    assert_eq!(
        reason(a.admit(&p, ip("192.0.2.66"))),
        Some(RejectReason::Denied)
    );
    assert_eq!(
        reason(a.admit(&p, ip("198.51.100.8"))),
        Some(RejectReason::Denied)
    );
    // Allowed sources are exempt from the per-source limit.
    let held: Vec<_> = (0..5)
        .map(|_| a.admit(&p, ip("198.51.100.7")).unwrap())
        .collect();
    assert_eq!(held.len(), 5);
    assert_eq!(a.sources(), 1);
}

#[test]
fn reserved_slots_are_for_allowed_sources_only() {
    let a = admission();
    let p = policy("max_connections = 3\nreserved_for_allowed = 1\nallow = [\"192.0.2.0/24\"]");
    let _g1 = a.admit(&p, ip("203.0.113.1")).unwrap();
    let _g2 = a.admit(&p, ip("203.0.113.2")).unwrap();
    assert_eq!(
        reason(a.admit(&p, ip("203.0.113.3"))),
        Some(RejectReason::GlobalLimit)
    );
    let _g3 = a.admit(&p, ip("192.0.2.9")).unwrap();
    assert_eq!(
        reason(a.admit(&p, ip("192.0.2.10"))),
        Some(RejectReason::GlobalLimit)
    );
}

#[test]
fn rate_limit_applies_per_source_and_recovers() {
    let a = admission();
    let p = policy("rate_per_source = \"2/min\"\nallow = [\"192.0.2.1\"]");
    for _ in 0..2 {
        drop(a.admit(&p, ip("203.0.113.1")).unwrap());
    }
    assert_eq!(
        reason(a.admit(&p, ip("203.0.113.1"))),
        Some(RejectReason::RateLimit)
    );
    drop(a.admit(&p, ip("203.0.113.2")).unwrap());
    for _ in 0..10 {
        drop(a.admit(&p, ip("192.0.2.1")).unwrap());
    }
    p.clock().advance(std::time::Duration::from_secs(31));
    drop(a.admit(&p, ip("203.0.113.1")).unwrap());
    assert_eq!(
        reason(a.admit(&p, ip("203.0.113.1"))),
        Some(RejectReason::RateLimit)
    );
}

#[test]
fn network_rules_override_by_longest_prefix() {
    let a = admission();
    let p = policy(
        "max_per_source = 1\n\
         [[network]]\ncidr = \"198.51.100.0/24\"\nmax_per_source = 3\n\
         [[network]]\ncidr = \"198.51.100.128/25\"\nmax_per_source = 2\n",
    );
    let count = |src: &str| {
        let mut held = Vec::new();
        while let Ok(g) = a.admit(&p, ip(src)) {
            held.push(g);
        }
        held.len()
    };
    assert_eq!(count("198.51.100.5"), 3);
    assert_eq!(count("198.51.100.200"), 2);
    assert_eq!(count("203.0.113.5"), 1);
    assert_eq!(a.active(), 0);
}

#[test]
fn network_tier_caps_fresh_addresses_in_one_prefix() {
    let a = admission();
    let p = policy(
        "max_per_source = 5\nipv6_prefix = 128\n\
         [[network]]\ncidr = \"2001:db8::/32\"\nmax_per_network = 3\nnetwork_prefix = 48\n",
    );
    // A fresh address per connection: every one is its own source, but one /48.
    let held: Vec<_> = (1..=3)
        .map(|i| a.admit(&p, ip(&format!("2001:db8:1::{i}"))).unwrap())
        .collect();
    assert_eq!(
        reason(a.admit(&p, ip("2001:db8:1::99"))),
        Some(RejectReason::NetworkLimit)
    );
    let _other = a.admit(&p, ip("2001:db8:2::1")).unwrap();
    assert_eq!(a.network_blocks(), 2);
    drop(held);
    assert_eq!(a.network_blocks(), 1);
}

#[test]
fn dry_run_admits_and_reports_the_first_reason() {
    let a = admission();
    let p =
        policy("dry_run = true\nmax_connections = 2\nmax_per_source = 1\ndeny = [\"192.0.2.1\"]");
    let first = a.admit(&p, ip("203.0.113.1")).unwrap();
    assert_eq!(first.would_reject, None);
    let second = a.admit(&p, ip("203.0.113.1")).unwrap();
    assert_eq!(second.would_reject, Some(RejectReason::SourceLimit));
    let third = a.admit(&p, ip("203.0.113.2")).unwrap();
    assert_eq!(third.would_reject, Some(RejectReason::GlobalLimit));
    let denied = a.admit(&p, ip("192.0.2.1")).unwrap();
    assert_eq!(denied.would_reject, Some(RejectReason::Denied));
    assert_eq!(a.active(), 4);
    drop((first, second, third, denied));
    assert_eq!((a.active(), a.sources()), (0, 0));
}

#[test]
fn with_the_defaults_no_ipv6_48_holds_more_than_a_tenth_of_the_slots() {
    let a = admission();
    let p = policy("");
    // 256 sources (/64s) of one /56, each trying for its whole per-source share.
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for net in 0..256u32 {
        for host in 0..20u32 {
            let ip = IpAddr::from(std::net::Ipv6Addr::new(
                0x2001,
                0xdb8,
                0x1,
                net as u16,
                0,
                0,
                0,
                host as u16 + 1,
            ));
            match a.admit(&p, ip) {
                Ok(g) => held.push(g),
                Err(r) => refused.push(r),
            }
        }
    }
    assert_eq!(held.len(), 100, "a tenth of the default 1000");
    assert!(refused
        .iter()
        .all(|r| r.reason == RejectReason::NetworkLimit));
    // Another /48 has its own share, and IPv4 has no such tier.
    let _other = a.admit(&p, ip("2001:db8:2::1")).unwrap();
    let _v4 = a.admit(&p, ip("192.0.2.1")).unwrap();
    // An operator can widen it.
    let wide = policy("max_per_ipv6_network = 1000");
    let b = admission();
    let many: Vec<_> = (0..300u16)
        .filter_map(|n| {
            b.admit(
                &wide,
                IpAddr::from(std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, n, 0, 0, 0, 1)),
            )
            .ok()
        })
        .collect();
    assert_eq!(many.len(), 300);
}

#[test]
fn an_ipv6_network_rule_inherits_the_default_tier_unless_it_sets_its_own() {
    let a = admission();
    let p = policy(
        "max_connections = 50
         [[network]]
cidr = \"2001:db8:1::/48\"
max_per_source = 10
         [[network]]
cidr = \"2001:db8:2::/48\"
max_per_network = 30
",
    );
    let count = |prefix: u16| {
        (0..40u16)
            .filter_map(|n| {
                a.admit(
                    &p,
                    IpAddr::from(std::net::Ipv6Addr::new(
                        0x2001, 0xdb8, prefix, n, 0, 0, 0, 1,
                    )),
                )
                .ok()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(count(1).len(), 5, "inherited: a tenth of 50");
    assert_eq!(count(2).len(), 30, "its own tier");
}

#[test]
fn a_global_slot_given_back_or_held_leaves_no_reference_behind() {
    let a = admission();
    let p = policy("max_connections = 2");
    let slot = a.take_global(&p, false).unwrap();
    assert_eq!((a.active(), Arc::strong_count(&a.inner)), (1, 2));
    slot.give_back();
    assert_eq!((a.active(), Arc::strong_count(&a.inner)), (0, 1));
    let mut waiter = a.admit_with(&p, ip("10.0.0.1"), Global::Leave).unwrap();
    assert_eq!(a.active(), 0);
    waiter.guard.hold(a.take_global(&p, false).unwrap());
    assert_eq!((a.active(), Arc::strong_count(&a.inner)), (1, 2));
    drop(waiter);
    assert_eq!((a.active(), Arc::strong_count(&a.inner)), (0, 1));
}

#[test]
fn counts_return_to_zero_under_contention() {
    let a = admission();
    let p = policy("max_connections = 64\nmax_per_source = 4");
    std::thread::scope(|s| {
        for t in 0..4 {
            let (a, p) = (a.clone(), &p);
            s.spawn(move || {
                let mut held = Vec::new();
                for i in 0..20_000u32 {
                    let src = IpAddr::from([10, t, (i % 7) as u8, 1]);
                    if let Ok(g) = a.admit(p, src) {
                        held.push(g);
                    }
                    if held.len() > 8 || i % 3 == 0 {
                        held.pop();
                    }
                    assert!(a.active() <= 64);
                }
            });
        }
    });
    assert_eq!((a.active(), a.sources()), (0, 0));
    let text = a.inner.metrics.render();
    assert!(text.contains("mxgate_connections_active 0\n"), "{text}");
    assert!(text.contains("mxgate_sources_active 0\n"), "{text}");
}

#[test]
fn the_top_sources_are_the_busiest_in_order_and_the_peak_stays() {
    let (a, p) = (
        admission(),
        policy("max_connections = 1000\nmax_per_source = 100"),
    );
    // Source 10.0.0.i holds i sessions, for 30 sources: more than the 20 listed.
    let mut held = Vec::new();
    for i in 1..=30u32 {
        for _ in 0..i {
            held.push(a.admit(&p, ip(&format!("10.0.0.{i}"))).unwrap());
        }
    }
    let top = a.top_sources(20);
    let want: Vec<(IpNet, usize)> = (11..=30u32)
        .rev()
        .map(|i| (format!("10.0.0.{i}/32").parse().unwrap(), i as usize))
        .collect();
    assert_eq!(top, want);
    assert_eq!(a.top_sources(0), vec![]);
    assert_eq!(a.peak(), 465);
    held.truncate(10);
    assert_eq!(a.active(), 10);
    assert_eq!(a.peak(), 465, "the high-water mark does not fall");
    let text = a.inner.metrics.render();
    assert!(
        text.contains("mxgate_connections_active_max 465\n"),
        "{text}"
    );
}

/// A guard is carried in every idle session's task, so its size is memory per idle session:
/// the cluster's place held as a fat pointer (8 bytes more) cost 0.28 KiB per idle session in
/// `benches/compare.sh`, through the allocator's size steps. It stays one thin pointer.
#[test]
fn a_guard_stays_as_small_as_it_was() {
    assert_eq!(std::mem::size_of::<Guard>(), 56);
}
