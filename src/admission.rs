//! Admission: counts open sessions globally, per source and per network block, and decides
//! who gets in under the [`Policy`] in force.
//!
//! [`Admission::admit`] returns either an [`Admitted`] holding a [`Guard`], which keeps the
//! session's slots until it is dropped, or a [`RejectReason`]. The guard frees its slots however
//! the session ends (clean close, error, panic, shutdown), so the counts always return to zero.
//!
//! Order of checks: deny list, connection rate, per-source cap, per-network cap, global cap
//! (minus the slots reserved for allowed sources). The first that fails is the reason. With the
//! wait queue on, admission stops before the global cap ([`Global::Leave`]): the queue
//! (`crate::queue`) decides when the client gets its [`GlobalSlot`]. Allowed
//! sources skip the rate, per-source and per-network checks. In dry-run mode every check runs and
//! the first failure is reported as "would reject", but the connection is admitted.
//!
//! A table entry exists only while its count is above zero, which bounds the tables by the
//! number of open sessions. This module never touches a socket and never sleeps.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use ipnet::IpNet;
use metrics::Counter;

use crate::metrics::Metrics;
use crate::policy::{mask, Listing, Policy, RateCheck};
use crate::queue::Wake;
pub use crate::reason::RejectReason;

/// A refusal, with the source key it was decided for: the same key the summaries, the
/// per-source logs and the live view count it under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RejectReason,
    pub source: IpNet,
}

/// The shared counting state behind every guard.
struct Inner {
    /// Sessions admitted and not yet released, from all sources.
    global: AtomicUsize,
    /// Admitted sessions per source key.
    sources: DashMap<IpNet, usize>,
    /// Admitted sessions per network block, for rules with `max_per_network`.
    networks: DashMap<IpNet, usize>,
    metrics: Arc<Metrics>,
    /// Admissions not rate-checked because the limiter was at its key cap.
    rate_untracked: Counter,
    /// Told whenever a global slot is given back, for the wait queue.
    wake: Arc<Wake>,
}

/// The admission controller. Cheap to clone.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

/// One admitted session's slots. Dropping it frees them.
#[must_use = "dropping the guard frees the slot at once"]
pub struct Guard {
    inner: Arc<Inner>,
    /// The source key this session is counted under, kept so a prefix change on reload still
    /// releases the right entry.
    source: IpNet,
    /// Whether a slot of `source` is held.
    holds_source: bool,
    /// The network block whose slot is held, if its rule caps blocks.
    network: Option<IpNet>,
    /// Whether a global slot is held (a waiter in the queue has none yet).
    holds_global: bool,
}

impl Guard {
    pub fn source(&self) -> IpNet {
        self.source
    }

    /// Takes over a global slot handed to this waiter.
    pub fn hold(&mut self, mut slot: GlobalSlot) {
        debug_assert!(!self.holds_global);
        // The slot is the guard's to give back now; its own handle goes quietly.
        slot.inner = None;
        self.holds_global = true;
    }
}

/// One global slot. Dropping it gives it back and tells the wait queue.
#[must_use = "dropping the slot frees it at once"]
pub struct GlobalSlot {
    /// `None` once the slot has passed to a guard or been given back.
    inner: Option<Arc<Inner>>,
}

impl GlobalSlot {
    /// Gives the slot back without waking the queue: for a grant the dispatcher itself
    /// could not complete, which would otherwise wake it again at once.
    pub fn give_back(mut self) {
        if let Some(inner) = self.inner.take() {
            release_global(&inner);
        }
    }
}

impl Drop for GlobalSlot {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            release_global(&inner);
            inner.wake.freed();
        }
    }
}

/// Gives back one global slot.
fn release_global(inner: &Inner) {
    inner.global.fetch_sub(1, Ordering::SeqCst);
    inner.metrics.active.decrement(1.0);
}

/// An admitted connection.
pub struct Admitted {
    pub guard: Guard,
    /// In dry-run mode: the reason it would have been refused.
    pub would_reject: Option<RejectReason>,
    /// Whether the source is on the allow list (served first by the wait queue).
    pub allowed: bool,
}

/// Whether [`Admission::admit`] takes the global slot too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Global {
    /// Take it, or refuse with [`RejectReason::GlobalLimit`].
    Take,
    /// Leave it to the wait queue ([`Admission::take_global`]).
    Leave,
}

/// The source a client address belongs to under the default prefixes.
pub fn source_key(ip: IpAddr, ipv4_prefix: u8, ipv6_prefix: u8) -> IpNet {
    mask(ip, ipv4_prefix, ipv6_prefix)
}

impl Admission {
    pub fn new(metrics: Arc<Metrics>) -> Admission {
        Admission::with_wake(metrics, Arc::default())
    }

    /// An admission controller whose freed global slots tell `wake`.
    pub fn with_wake(metrics: Arc<Metrics>, wake: Arc<Wake>) -> Admission {
        Admission {
            inner: Arc::new(Inner {
                global: AtomicUsize::new(0),
                sources: DashMap::new(),
                networks: DashMap::new(),
                rate_untracked: metrics.rate_untracked.clone(),
                metrics,
                wake,
            }),
        }
    }

    /// Sessions admitted and not yet released.
    pub fn active(&self) -> usize {
        self.inner.global.load(Ordering::SeqCst)
    }

    /// Distinct sources with at least one admitted session.
    pub fn sources(&self) -> usize {
        self.inner.sources.len()
    }

    /// Distinct network blocks with at least one admitted session.
    pub fn network_blocks(&self) -> usize {
        self.inner.networks.len()
    }

    /// Admits `ip` under `policy`, global slot included, or says why not and for which
    /// source key.
    pub fn admit(&self, policy: &Policy, ip: IpAddr) -> Result<Admitted, Refusal> {
        self.admit_with(policy, ip, Global::Take)
    }

    /// [`Admission::admit`], where with [`Global::Leave`] the guard holds no global slot yet:
    /// the wait queue gets it one.
    pub fn admit_with(
        &self,
        policy: &Policy,
        ip: IpAddr,
        global: Global,
    ) -> Result<Admitted, Refusal> {
        let source = policy.classify(ip).rule.source_key(ip);
        self.decide(policy, ip, global)
            .map_err(|reason| Refusal { reason, source })
    }

    /// A global slot, if one is open to this class of source under `policy`.
    pub fn take_global(&self, policy: &Policy, allowed: bool) -> Option<GlobalSlot> {
        take_global(&self.inner.global, global_cap(policy, allowed), true).then(|| {
            self.inner.metrics.active.increment(1.0);
            GlobalSlot {
                inner: Some(self.inner.clone()),
            }
        })
    }

    fn decide(
        &self,
        policy: &Policy,
        ip: IpAddr,
        global: Global,
    ) -> Result<Admitted, RejectReason> {
        let inner = &self.inner;
        let class = policy.classify(ip);
        let rule = class.rule;
        let allowed = class.listing == Some(Listing::Allow);
        let enforce = !policy.dry_run;
        let mut would_reject = None;
        // A failed check: refuse, or in dry run remember the first reason and go on.
        let mut fail = |r: RejectReason| {
            if enforce {
                Err(r)
            } else {
                would_reject.get_or_insert(r);
                Ok(())
            }
        };

        if class.listing == Some(Listing::Deny) {
            fail(RejectReason::Denied)?;
        }
        let source = rule.source_key(ip);
        if let (false, Some(rate)) = (allowed, &rule.rate) {
            match rate.check(&source) {
                RateCheck::Within => {}
                RateCheck::Exceeded => fail(RejectReason::RateLimit)?,
                RateCheck::Untracked => inner.rate_untracked.increment(1),
            }
        }
        let mut guard = Guard {
            inner: self.inner.clone(),
            source,
            holds_source: false,
            network: None,
            holds_global: false,
        };
        let per_source = if allowed {
            usize::MAX
        } else {
            rule.max_per_source
        };
        match take_slot(&inner.sources, source, per_source, enforce) {
            Slot::Refused => fail(RejectReason::SourceLimit)?,
            slot => {
                guard.holds_source = true;
                if slot.is_new() {
                    inner.metrics.sources_active.increment(1.0);
                }
                if slot == Slot::Over || slot == Slot::OverNew {
                    fail(RejectReason::SourceLimit)?;
                }
            }
        }
        if let (false, Some((len, cap))) = (allowed, rule.network_cap(ip)) {
            let block = mask(ip, len, len);
            match take_slot(&inner.networks, block, cap, enforce) {
                Slot::Refused => fail(RejectReason::NetworkLimit)?,
                slot => {
                    guard.network = Some(block);
                    if slot == Slot::Over || slot == Slot::OverNew {
                        fail(RejectReason::NetworkLimit)?;
                    }
                }
            }
        }
        if global == Global::Take || !enforce {
            let within = take_global(&inner.global, global_cap(policy, allowed), enforce);
            if within || !enforce {
                guard.holds_global = true;
                inner.metrics.active.increment(1.0);
            }
            if !within {
                fail(RejectReason::GlobalLimit)?;
            }
        }
        Ok(Admitted {
            guard,
            would_reject,
            allowed,
        })
    }
}

/// The global slots open to a source: all of them for allowed sources, the others less the
/// ones reserved for allowed sources.
pub fn global_cap(policy: &Policy, allowed: bool) -> usize {
    if allowed {
        policy.max_connections
    } else {
        policy.max_connections - policy.reserved_for_allowed
    }
}

/// The outcome of taking a slot in a counting table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Taken, in an existing entry / a new entry.
    Taken,
    TakenNew,
    /// Taken past the limit (dry run only).
    Over,
    OverNew,
    /// Not taken: the limit is reached.
    Refused,
}

impl Slot {
    fn is_new(self) -> bool {
        matches!(self, Slot::TakenNew | Slot::OverNew)
    }
}

/// Takes one slot of `key` if its count is under `limit`, or regardless when not enforcing.
fn take_slot(map: &DashMap<IpNet, usize>, key: IpNet, limit: usize, enforce: bool) -> Slot {
    match map.entry(key) {
        Entry::Occupied(mut e) => {
            let within = *e.get() < limit;
            if !within && enforce {
                return Slot::Refused;
            }
            *e.get_mut() += 1;
            if within {
                Slot::Taken
            } else {
                Slot::Over
            }
        }
        Entry::Vacant(e) => {
            let within = limit > 0;
            if !within && enforce {
                return Slot::Refused;
            }
            e.insert(1);
            if within {
                Slot::TakenNew
            } else {
                Slot::OverNew
            }
        }
    }
}

/// Takes a global slot if under `max`, or regardless when not enforcing; says if within `max`.
fn take_global(global: &AtomicUsize, max: usize, enforce: bool) -> bool {
    if enforce {
        global
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    } else {
        global.fetch_add(1, Ordering::SeqCst) < max
    }
}

/// Gives back one slot of `key`; says whether the entry emptied and left the table.
fn release_slot(map: &DashMap<IpNet, usize>, key: IpNet) -> bool {
    match map.entry(key) {
        Entry::Occupied(mut e) => {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
                true
            } else {
                false
            }
        }
        Entry::Vacant(_) => unreachable!("a held slot's entry lives as long as its guard"),
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let inner = &self.inner;
        if self.holds_source && release_slot(&inner.sources, self.source) {
            inner.metrics.sources_active.decrement(1.0);
        }
        if let Some(block) = self.network {
            release_slot(&inner.networks, block);
        }
        if self.holds_global {
            release_global(inner);
            inner.wake.freed();
        }
    }
}

#[cfg(test)]
mod tests {
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
        let p = policy(
            "dry_run = true\nmax_connections = 2\nmax_per_source = 1\ndeny = [\"192.0.2.1\"]",
        );
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
}
