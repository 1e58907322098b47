//! Admission: counts open sessions globally and per source, and decides who gets in.
//!
//! [`Admission::admit`] returns either a [`Guard`], which holds one global slot and one slot of
//! its source until it is dropped, or a [`RejectReason`]. The guard frees both slots however the
//! session ends (clean close, error, panic, shutdown), so the counts always return to zero.
//!
//! A source's table entry exists only while its count is above zero, which bounds the table by
//! `max_connections`. This module never touches a socket and never sleeps.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use ipnet::IpNet;

use crate::metrics::Metrics;

/// Why a client was not admitted. This one enum chooses the reply, the metric label and the log
/// line, so the three can never disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Every global slot is taken.
    GlobalLimit,
    /// The client's source already holds its share.
    SourceLimit,
    /// The backend refused, reset or did not answer within the connect timeout.
    BackendUnavailable,
}

impl RejectReason {
    pub const ALL: [RejectReason; 3] = [
        RejectReason::GlobalLimit,
        RejectReason::SourceLimit,
        RejectReason::BackendUnavailable,
    ];

    /// The `reason` label value, which dashboards depend on.
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::GlobalLimit => "global_limit",
            RejectReason::SourceLimit => "source_limit",
            RejectReason::BackendUnavailable => "backend_unavailable",
        }
    }
}

/// The limits in force. Reading them is a few relaxed loads; a reload stores new values.
#[derive(Debug)]
pub struct Limits {
    pub max_connections: AtomicUsize,
    pub max_per_source: AtomicUsize,
    pub ipv4_prefix: AtomicU8,
    pub ipv6_prefix: AtomicU8,
}

/// The shared counting state behind every guard.
struct Inner {
    limits: Limits,
    /// Sessions admitted and not yet released, from all sources.
    global: AtomicUsize,
    /// Admitted sessions per source; an entry is removed when it reaches zero.
    sources: DashMap<IpNet, usize>,
    metrics: Arc<Metrics>,
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
    /// The source this session is counted under, kept so a prefix change on reload still
    /// releases the right entry.
    source: IpNet,
}

impl Guard {
    pub fn source(&self) -> IpNet {
        self.source
    }
}

/// The source a client address belongs to: the address masked to its family's prefix length.
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) count as the IPv4 address they carry.
pub fn source_key(ip: IpAddr, ipv4_prefix: u8, ipv6_prefix: u8) -> IpNet {
    let ip = ip.to_canonical();
    let len = match ip {
        IpAddr::V4(_) => ipv4_prefix,
        IpAddr::V6(_) => ipv6_prefix,
    };
    IpNet::new(ip, len)
        .expect("prefix lengths are validated")
        .trunc()
}

impl Admission {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Admission {
        metrics
            .limit_max_connections
            .set(limits.max_connections.load(Ordering::Relaxed) as f64);
        metrics
            .limit_max_per_source
            .set(limits.max_per_source.load(Ordering::Relaxed) as f64);
        Admission {
            inner: Arc::new(Inner {
                limits,
                global: AtomicUsize::new(0),
                sources: DashMap::new(),
                metrics,
            }),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Sessions admitted and not yet released.
    pub fn active(&self) -> usize {
        self.inner.global.load(Ordering::Acquire)
    }

    /// Distinct sources with at least one admitted session.
    pub fn sources(&self) -> usize {
        self.inner.sources.len()
    }

    /// The source key for `ip` under the prefix lengths in force.
    pub fn key(&self, ip: IpAddr) -> IpNet {
        let l = &self.inner.limits;
        source_key(
            ip,
            l.ipv4_prefix.load(Ordering::Relaxed),
            l.ipv6_prefix.load(Ordering::Relaxed),
        )
    }

    /// Admits `ip` or says why not. The per-source limit is checked first, then the global one;
    /// the first that fails is the reason.
    pub fn admit(&self, ip: IpAddr) -> Result<Guard, RejectReason> {
        let inner = &self.inner;
        let source = self.key(ip);
        let per_source = inner.limits.max_per_source.load(Ordering::Relaxed);
        let max = inner.limits.max_connections.load(Ordering::Relaxed);

        // Take the source slot under the shard lock, then the global slot; undo the first if
        // the second fails. Holding the entry while taking the global slot keeps the undo
        // from racing with another session of the same source.
        match inner.sources.entry(source) {
            Entry::Occupied(mut e) => {
                if *e.get() >= per_source {
                    return Err(RejectReason::SourceLimit);
                }
                if !take_global(&inner.global, max) {
                    return Err(RejectReason::GlobalLimit);
                }
                *e.get_mut() += 1;
            }
            Entry::Vacant(e) => {
                if per_source == 0 {
                    return Err(RejectReason::SourceLimit);
                }
                if !take_global(&inner.global, max) {
                    return Err(RejectReason::GlobalLimit);
                }
                e.insert(1);
                inner.metrics.sources_active.increment(1.0);
            }
        }
        inner.metrics.active.increment(1.0);
        Ok(Guard {
            inner: self.inner.clone(),
            source,
        })
    }
}

fn take_global(global: &AtomicUsize, max: usize) -> bool {
    global
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl Drop for Guard {
    fn drop(&mut self) {
        let inner = &self.inner;
        let emptied = match inner.sources.entry(self.source) {
            Entry::Occupied(mut e) => {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                    true
                } else {
                    false
                }
            }
            Entry::Vacant(_) => unreachable!("a guard's source entry lives as long as the guard"),
        };
        inner.global.fetch_sub(1, Ordering::AcqRel);
        if emptied {
            inner.metrics.sources_active.decrement(1.0);
        }
        inner.metrics.active.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: usize, per_source: usize, v6: u8) -> Admission {
        Admission::new(
            Limits {
                max_connections: AtomicUsize::new(max),
                max_per_source: AtomicUsize::new(per_source),
                ipv4_prefix: AtomicU8::new(32),
                ipv6_prefix: AtomicU8::new(v6),
            },
            Metrics::new(),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_source_then_global() {
        let a = admission(3, 2, 64);
        let g1 = a.admit(ip("10.0.0.1")).unwrap();
        let g2 = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.1")).err(),
            Some(RejectReason::SourceLimit)
        );
        let g3 = a.admit(ip("10.0.0.2")).unwrap();
        // Source 10.0.0.3 is under its own limit, so the global limit is the reason.
        assert_eq!(
            a.admit(ip("10.0.0.3")).err(),
            Some(RejectReason::GlobalLimit)
        );
        // A source at its own limit reports that first, even when the global one is full too.
        assert_eq!(
            a.admit(ip("10.0.0.1")).err(),
            Some(RejectReason::SourceLimit)
        );
        assert_eq!((a.active(), a.sources()), (3, 2));
        drop((g1, g2, g3));
        assert_eq!((a.active(), a.sources()), (0, 0));
    }

    #[test]
    fn ipv6_prefix_groups_addresses() {
        let a = admission(100, 1, 64);
        let _g = a.admit(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            a.admit(ip("2001:db8:1:2:ffff::9")).err(),
            Some(RejectReason::SourceLimit)
        );
        let _h = a.admit(ip("2001:db8:1:3::1")).unwrap();
        assert_eq!(a.sources(), 2);
    }

    #[test]
    fn mapped_ipv4_counts_as_ipv4() {
        let a = admission(100, 1, 64);
        let _g = a.admit(ip("192.0.2.7")).unwrap();
        assert_eq!(
            a.admit(ip("::ffff:192.0.2.7")).err(),
            Some(RejectReason::SourceLimit)
        );
        assert_eq!(
            source_key(ip("::ffff:192.0.2.7"), 24, 64).to_string(),
            "192.0.2.0/24"
        );
    }

    #[test]
    fn zero_limits_reject_without_leaving_entries() {
        let a = admission(0, 5, 64);
        assert_eq!(
            a.admit(ip("10.0.0.1")).err(),
            Some(RejectReason::GlobalLimit)
        );
        assert_eq!(a.sources(), 0);
        let b = admission(5, 0, 64);
        assert_eq!(
            b.admit(ip("10.0.0.1")).err(),
            Some(RejectReason::SourceLimit)
        );
        assert_eq!(b.sources(), 0);
    }

    #[test]
    fn counts_return_to_zero_under_contention() {
        let a = admission(64, 4, 64);
        std::thread::scope(|s| {
            for t in 0..4 {
                let a = a.clone();
                s.spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..20_000u32 {
                        let src = IpAddr::from([10, t, (i % 7) as u8, 1]);
                        if let Ok(g) = a.admit(src) {
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
