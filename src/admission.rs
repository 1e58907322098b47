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
pub use crate::reason::{Refusal, RejectReason};
use crate::wake::Wake;

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
    /// The most sessions ever open at once since start: a peak that falls between two
    /// scrapes still shows in `mxgate_connections_active_max`.
    peak: AtomicUsize,
}

/// Counts one global slot just taken in the active gauge and the high-water mark.
fn took_global(inner: &Inner) {
    inner.metrics.active.increment(1.0);
    let now = inner.global.load(Ordering::SeqCst);
    if inner.peak.fetch_max(now, Ordering::Relaxed) < now {
        inner.metrics.active_max.set(now as f64);
    }
}

/// The admission controller. Cheap to clone.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

/// A place a session holds outside this host's counts (the cluster's), of a type admission
/// does not name; dropping it releases the place.
struct Elsewhere(#[allow(dead_code)] Box<dyn std::any::Any + Send + Sync>);

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
    /// The session's place in the cluster's counts, once the cluster admitted it. Admission
    /// does not name the cluster's type (the cluster sits above it): it keeps the place alive
    /// as long as the session's own slots and releases it first. (Boxed twice, so the field is
    /// one thin pointer: an unclustered session holds none, and every guard is carried in
    /// each idle session's task, where 8 more bytes cost 0.28 KiB per idle session in
    /// `benches/compare.sh`, from the allocator's size steps.)
    claim: Option<Box<Elsewhere>>,
}

impl Guard {
    /// Takes a slot for the guard's source, under `cap`; false if the source is at or over it.
    /// In dry run (`enforce` false) the slot is taken even past `cap`, so the counts stay what
    /// enforcing would see.
    fn take_source(&mut self, cap: usize, enforce: bool) -> bool {
        let slot = take_slot(&self.inner.sources, self.source, cap, enforce);
        if slot == Slot::Refused {
            return false;
        }
        self.holds_source = true;
        if slot.is_new() {
            self.inner.metrics.sources_active.increment(1.0);
        }
        !matches!(slot, Slot::Over | Slot::OverNew)
    }

    /// Takes a slot for the network `block`, under `cap`, as [`Guard::take_source`] does for the
    /// source.
    fn take_network(&mut self, block: IpNet, cap: usize, enforce: bool) -> bool {
        let slot = take_slot(&self.inner.networks, block, cap, enforce);
        if slot == Slot::Refused {
            return false;
        }
        self.network = Some(block);
        !matches!(slot, Slot::Over | Slot::OverNew)
    }

    pub fn source(&self) -> IpNet {
        self.source
    }

    /// Whether the cluster has admitted this session already (a requeued client keeps it).
    pub fn clustered(&self) -> bool {
        self.claim.is_some()
    }

    /// Gives the cluster's place back: for a client that goes back to wait in the queue, which
    /// is this host's alone.
    pub fn release_claim(&mut self) {
        self.claim = None;
    }

    /// Keeps the cluster's place (its `cluster::Claim`, released by its drop) for as long as
    /// the session's own slots.
    pub fn hold_claim<C: Send + Sync + 'static>(&mut self, claim: C) {
        self.claim = Some(Box::new(Elsewhere(Box::new(claim))));
    }

    /// Takes over a global slot handed to this waiter.
    pub fn hold(&mut self, mut slot: GlobalSlot) {
        debug_assert!(!self.holds_global);
        // The slot is the guard's to give back now; its own handle goes quietly.
        slot.inner = None;
        self.holds_global = true;
    }

    /// Gives back the global slot this guard holds, keeping its source's and network's: for a
    /// client that goes back to wait in the queue.
    pub fn release_global(&mut self) {
        if std::mem::take(&mut self.holds_global) {
            release_global(&self.inner);
            self.inner.wake.freed();
        }
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
                peak: AtomicUsize::new(0),
            }),
        }
    }

    /// The `n` sources holding the most sessions (waiting ones included: they count against
    /// their source's limit too), most first, ties in address order.
    pub fn top_sources(&self, n: usize) -> Vec<(IpNet, usize)> {
        let mut all: Vec<(IpNet, usize)> = self
            .inner
            .sources
            .iter()
            .map(|e| (*e.key(), *e.value()))
            .collect();
        let order = |a: &(IpNet, usize), b: &(IpNet, usize)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
        // Linear in the sources, whatever their number: only the first `n` get sorted.
        if all.len() > n && n > 0 {
            all.select_nth_unstable_by(n - 1, order);
        }
        all.truncate(n);
        all.sort_by(order);
        all
    }

    /// The most sessions open at once since start.
    pub fn peak(&self) -> usize {
        self.inner.peak.load(Ordering::Relaxed)
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
            took_global(&self.inner);
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
            claim: None,
        };
        let per_source = if allowed {
            usize::MAX
        } else {
            rule.max_per_source
        };
        if !guard.take_source(per_source, enforce) {
            fail(RejectReason::SourceLimit)?;
        }
        if let (false, Some((len, cap))) = (allowed, rule.network_cap(ip)) {
            if !guard.take_network(mask(ip, len, len), cap, enforce) {
                fail(RejectReason::NetworkLimit)?;
            }
        }
        if global == Global::Take || !enforce {
            let within = take_global(&inner.global, global_cap(policy, allowed), enforce);
            if within || !enforce {
                guard.holds_global = true;
                took_global(inner);
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
        // The cluster's place goes first, so its release is on its way before a local slot
        // frees for the next client.
        drop(self.claim.take());
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
mod tests;
