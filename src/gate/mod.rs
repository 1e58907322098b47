//! Where a connection is admitted. [`Gate`] is the shared state every accept loop and
//! connection task holds, [`Live`] the part a reload swaps whole. Admission of a new connection
//! is decided here, in the accept loop, without I/O ([`Gate::triage`]): admitted, refused, or
//! put in the wait queue, whose slots [`Gate::capacity`] hands out and whose one dispatcher
//! ([`Gate::dispatch`]) runs here. After a PROXY header the
//! connection's task asks [`Gate::admit`]. The record of reloads ([`Reloads`]) is kept here too.
//!
//! Why a folder of its own, apart from `admission` and `policy`: those two count and apply the
//! rules, with no I/O and nothing above them (the benches and property tests drive them alone);
//! the gate joins them with the queue, the backends' caps and the cluster. Folded into
//! `admission`, the counting would import the queue and the backends, the upward imports this
//! layout removes. The gate never writes or counts a refusal: it hands a [`Refusal`] to
//! [`crate::reply`], which answers and counts it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::admission::{global_cap, Admission, Global, GlobalSlot, Guard};
use crate::backend::{Lease, NoBackend, Pool};
use crate::config::Config;
use crate::forward::{Mode, Traffic};
use crate::metrics::Metrics;
use crate::policy::{mask, Listing, Policy};
use crate::queue::{Entered, Queue, Ticket, Waiter};
use crate::wake::Wake;

mod dispatch;
mod reloads;
use crate::reason::{Refusal, RejectReason};
use crate::reply::{Closer, RejectSummary, Replies, SourceRefusals};
pub use reloads::{LastReload, Reloads};

/// What a reload replaces, as one unit, so a connection never sees half of a new config.
pub struct Live {
    pub(crate) config: Config,
    pub(crate) policy: Policy,
    pub(crate) replies: Arc<Replies>,
    pub(crate) pool: Pool,
}

impl Live {
    /// The runtime state for `config`: policy and rate limiters, replies, backend pool. The one
    /// way it is built, at start-up, on reload and by `mxgate check`, so whatever validation
    /// accepts builds here too. Limiters and backends of `previous` are carried over.
    pub fn build(
        config: Config,
        previous: Option<&Live>,
        clock: crate::policy::PolicyClock,
        metrics: &Metrics,
        wake: &Arc<Wake>,
    ) -> Live {
        Live {
            policy: Policy::new(&config, previous.map(|p| &p.policy), clock),
            replies: Arc::new(
                Replies::new(&config.hostname, &config.replies)
                    .with_pregreet(effective_pregreet(&config)),
            ),
            pool: Pool::new(&config, previous.map(|p| &p.pool), metrics, wake),
            config,
        }
    }

    /// Whether a client that finds the capacity full waits for a slot ([`Config::queues`]).
    pub(crate) fn queues(&self) -> bool {
        self.config.queues()
    }

    /// What the cluster is asked for a session admitted here: the same keys and limits this
    /// instance decided with. Built here, above both, so that admission never names the
    /// cluster's types and the cluster never reads the policy.
    pub(crate) fn cluster_ask(&self, ip: IpAddr, guard: &Guard) -> crate::cluster::Ask {
        let policy = &self.policy;
        let class = policy.classify(ip);
        let allowed = class.listing == Some(Listing::Allow);
        let rule = class.rule;
        crate::cluster::Ask {
            source: guard.source(),
            source_cap: (!allowed).then_some(rule.max_per_source),
            network: if allowed {
                None
            } else {
                rule.network_cap(ip)
                    .map(|(len, cap)| (mask(ip, len, len), cap))
            },
            global_cap: global_cap(policy, allowed),
            enforce: !policy.dry_run,
        }
    }
}

/// The pregreet action in force: a dry run only counts, as `ignore` does.
pub(crate) fn effective_pregreet(config: &Config) -> crate::config::Pregreet {
    use crate::config::Pregreet;
    match config.pregreet.action {
        Pregreet::Enforce | Pregreet::Drop if config.dry_run => Pregreet::Ignore,
        action => action,
    }
}

/// What the wait queue hands a waiter: a global slot, and a backend's slot when backends have
/// caps of their own.
pub struct Grant {
    pub(crate) global: GlobalSlot,
    pub(crate) lease: Option<Lease>,
}

/// An admitted connection, or one that waits for its slot.
pub enum Entry {
    /// Admitted, with its backend's slot when backends have caps.
    Now(Guard, Option<Lease>),
    /// In the queue, holding its source's and network's slots already.
    Wait(Guard, Ticket<Grant>),
}

/// Everything a connection task needs, shared by all of them.
pub struct Gate {
    pub(crate) live: ArcSwap<Live>,
    pub(crate) admission: Admission,
    pub(crate) closer: Closer,
    pub(crate) summary: Arc<RejectSummary>,
    /// Refusals by source: the live view's "refused now" and the per-source log lines.
    pub(crate) sources: Arc<SourceRefusals>,
    /// The last reload's outcome and time, for the live view.
    pub(crate) reloads: Reloads,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) mode: Mode,
    pub(crate) traffic: Traffic,
    /// Set once shutdown starts: new connections get the draining reply.
    pub(crate) draining: AtomicBool,
    /// Cancelled to cut sessions that are still forwarding.
    pub(crate) cut: CancellationToken,
    /// Bounds the connections waiting for a trusted upstream's PROXY header, which hold no
    /// slot yet.
    pub(crate) headers: Arc<tokio::sync::Semaphore>,
    /// Clients waiting for a slot.
    pub(crate) queue: Arc<Queue<Grant>>,
    /// Told when a slot may have freed; wakes the queue's dispatcher.
    pub(crate) wake: Arc<Wake>,
    /// The limits shared with other instances, when a `[cluster]` is configured.
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The pregreet test's cache and counts; here, not in [`Live`], so a reload keeps them.
    pub(crate) pregreet: Arc<crate::pregreet::Screen>,
    /// The pause after a backend socket failed locally: no slot is granted while it lasts.
    pub(crate) local: crate::local_errors::Backoff,
}

/// How many connections may wait for their PROXY header at once; past it a new one gets the
/// global-limit reply, which the upstream relays to its client.
pub const MAX_PENDING_HEADERS: usize = 1024;

/// A connection's place among those waiting for a PROXY header; shown in
/// `mxgate_proxy_headers_pending` while held.
pub struct HeaderWait {
    _slot: tokio::sync::OwnedSemaphorePermit,
    gauge: metrics::Gauge,
}

impl Drop for HeaderWait {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// What the accept loop does with a new connection, decided without waiting.
pub enum Triage {
    /// Refused: the accept loop's [`crate::reply::Door`] answers it and counts it.
    Refuse(Refusal, Arc<Live>),
    /// Anything else goes on in the connection's own task.
    Task(Start),
}

/// Where a connection's task starts.
pub enum Start {
    /// Admission waits for a trusted upstream's PROXY header, which has to be read first.
    AfterHeader(Arc<Live>, HeaderWait),
    /// Admitted by the accept loop, or put in the wait queue.
    Entered(Entry, Arc<Live>),
    /// To be screened by the pregreet test first, holding its per-source slots and its place
    /// under the test only.
    Screen((Guard, crate::pregreet::Place), Arc<Live>),
}

impl Gate {
    /// Decides a new connection in the accept loop: admission needs no I/O unless a PROXY
    /// header has to be read first.
    pub fn triage(&self, peer: SocketAddr) -> Triage {
        let live = self.live.load_full();
        let ip = peer.ip().to_canonical();
        if self.draining.load(Ordering::Acquire) {
            return Triage::Refuse(self.refusal_of(RejectReason::Draining, ip, &live), live);
        }
        if !live.config.accept_proxy_protocol.is_empty() {
            let Ok(slot) = self.headers.clone().try_acquire_owned() else {
                let refusal = self.refusal_of(RejectReason::GlobalLimit, ip, &live);
                return Triage::Refuse(refusal, live);
            };
            let gauge = self.metrics.proxy_headers_pending.clone();
            gauge.increment(1.0);
            return Triage::Task(Start::AfterHeader(live, HeaderWait { _slot: slot, gauge }));
        }
        if let Some(screened) = self.screen_triage(ip, &live) {
            return match screened {
                Ok(screened) => Triage::Task(Start::Screen(screened, live)),
                Err(refusal) => Triage::Refuse(refusal, live),
            };
        }
        match self.admit(ip, &live) {
            Ok(entry) => Triage::Task(Start::Entered(entry, live)),
            Err(refusal) => Triage::Refuse(refusal, live),
        }
    }

    /// Admission for `ip`: the policy first, then the capacity, at once or through the wait
    /// queue. A dry run's would-be refusal is counted here; a refusal carries the source key
    /// admission decided with, for whoever answers it to count.
    pub(crate) fn admit(&self, ip: IpAddr, live: &Live) -> Result<Entry, Refusal> {
        let queues = live.queues();
        let global = if queues { Global::Leave } else { Global::Take };
        let admitted = self.admission.admit_with(&live.policy, ip, global)?;
        if let Some(r) = admitted.would_reject {
            self.metrics.would_reject(r).increment(1);
            self.summary.record_dry_run(r, admitted.guard.source());
        }
        let guard = admitted.guard;
        if !queues {
            return Ok(Entry::Now(guard, None));
        }
        self.enter(guard, ip, admitted.allowed, live)
    }

    /// The capacity for a client whose source is admitted already: the queue's slot at once,
    /// or a place in it. Only while the queue is on.
    pub(crate) fn enter(
        &self,
        mut guard: Guard,
        ip: IpAddr,
        allowed: bool,
        live: &Live,
    ) -> Result<Entry, Refusal> {
        // No slot is ever open to this class (every one reserved for allowed sources): a
        // wait could only end in the 421, so it comes at once.
        if crate::admission::global_cap(&live.policy, allowed) == 0 {
            return Err(Refusal {
                reason: RejectReason::GlobalLimit,
                source: guard.source(),
            });
        }
        let waiter = Waiter { ip, allowed };
        let bounds = (live.config.max_queued, live.config.queue_timeout);
        let entered = self.queue.enter(guard.source(), waiter, bounds, || {
            self.capacity(live, &waiter)
        });
        let reason = match entered {
            Entered::Now(grant) => {
                guard.hold(grant.global);
                return Ok(Entry::Now(guard, grant.lease));
            }
            Entered::Wait(ticket) => return Ok(Entry::Wait(guard, ticket)),
            Entered::Full => RejectReason::QueueFull,
            Entered::Closed => RejectReason::Draining,
        };
        Err(Refusal {
            reason,
            source: guard.source(),
        })
    }

    /// A slot for `waiter`, if one is free: a global slot open to its class and, when
    /// backends have caps, a backend's slot. Nothing is taken unless both are, nor while
    /// grants pause after a local failure. In a cluster that said full, only when this host's
    /// waiters may ask it again ([`crate::cluster::Cluster::may_ask`]): a client granted here
    /// asks the cluster next.
    pub(crate) fn capacity(&self, live: &Live, waiter: &Waiter) -> Option<Grant> {
        // Out of descriptors a moment ago: a slot granted now would fail the same way.
        if self.local.paused_until().is_some() {
            return None;
        }
        let family = live.config.transparent.then_some(waiter.ip);
        let capped = live.pool.capped();
        if capped && live.pool.full(family) {
            return None;
        }
        let global = self.admission.take_global(&live.policy, waiter.allowed)?;
        // Asked only with a local slot in hand: a turn to ask spent while this host is full
        // too would hold its next ask back a whole interval after a slot frees here.
        if self.cluster.as_ref().is_some_and(|c| !c.may_ask()) {
            global.give_back();
            return None;
        }
        let lease = if capped {
            match live.pool.select(&[], family) {
                Ok(lease) => Some(lease),
                // Filled up since the look: no slot after all, and nobody to wake for it.
                Err(NoBackend::AllFull) => {
                    global.give_back();
                    return None;
                }
                // No healthy backend: the session goes on to the backend-unavailable answer.
                Err(NoBackend::AllDown) => None,
            }
        } else {
            None
        };
        Some(Grant { global, lease })
    }

    /// A refusal of `ip` for `reason`, under the source key the policy gives it: what
    /// [`crate::reply`] answers and counts.
    pub(crate) fn refusal_of(&self, reason: RejectReason, ip: IpAddr, live: &Live) -> Refusal {
        Refusal {
            reason,
            source: live.policy.classify(ip).rule.source_key(ip),
        }
    }
}
