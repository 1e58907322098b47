//! The server's shared state: [`Gate`], which every accept loop and connection task holds, and
//! [`Live`], the part a reload swaps whole. Admission of a new connection is decided here, in
//! the accept loop, without I/O ([`Gate::triage`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, Guard};
use crate::backend::Pool;
use crate::config::Config;
use crate::forward::{Mode, Traffic};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::reason::RejectReason;
use crate::reply::{Closer, RejectSummary, Replies};

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
    ) -> Live {
        Live {
            policy: Policy::new(&config, previous.map(|p| &p.policy), clock),
            replies: Arc::new(Replies::new(&config.hostname, &config.replies)),
            pool: Pool::new(&config, previous.map(|p| &p.pool), metrics),
            config,
        }
    }
}

/// Everything a connection task needs, shared by all of them.
pub struct Gate {
    pub(crate) live: ArcSwap<Live>,
    pub(crate) admission: Admission,
    pub(crate) closer: Closer,
    pub(crate) summary: Arc<RejectSummary>,
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
    /// Refused, and already counted: the accept loop's [`crate::reply::Door`] answers it.
    Refuse(RejectReason, Arc<Live>),
    /// Anything else goes on in the connection's own task.
    Task(Start),
}

/// Where a connection's task starts.
pub enum Start {
    /// Admission waits for a trusted upstream's PROXY header, which has to be read first.
    AfterHeader(Arc<Live>, HeaderWait),
    /// Admitted by the accept loop.
    Admitted(Guard, Arc<Live>),
}

impl Gate {
    /// Decides a new connection in the accept loop: admission needs no I/O unless a PROXY
    /// header has to be read first.
    pub fn triage(&self, peer: SocketAddr) -> Triage {
        let live = self.live.load_full();
        let ip = peer.ip().to_canonical();
        if self.draining.load(Ordering::Acquire) {
            self.count_refusal(RejectReason::Draining, ip, &live);
            return Triage::Refuse(RejectReason::Draining, live);
        }
        if !live.config.accept_proxy_protocol.is_empty() {
            let Ok(slot) = self.headers.clone().try_acquire_owned() else {
                self.count_refusal(RejectReason::GlobalLimit, ip, &live);
                return Triage::Refuse(RejectReason::GlobalLimit, live);
            };
            let gauge = self.metrics.proxy_headers_pending.clone();
            gauge.increment(1.0);
            return Triage::Task(Start::AfterHeader(live, HeaderWait { _slot: slot, gauge }));
        }
        match self.admit(ip, &live) {
            Ok(guard) => Triage::Task(Start::Admitted(guard, live)),
            Err(reason) => Triage::Refuse(reason, live),
        }
    }

    /// Admission for `ip`, with the dry run's would-be refusal or the refusal counted under
    /// the source key admission decided with.
    pub(crate) fn admit(&self, ip: IpAddr, live: &Live) -> Result<Guard, RejectReason> {
        match self.admission.admit(&live.policy, ip) {
            Ok(admitted) => {
                if let Some(r) = admitted.would_reject {
                    self.metrics.rejected_dry_run(r).increment(1);
                    self.summary.record_dry_run(r, admitted.guard.source());
                }
                Ok(admitted.guard)
            }
            Err(refusal) => {
                self.metrics.rejected(refusal.reason).increment(1);
                self.summary.record(refusal.reason, refusal.source);
                Err(refusal.reason)
            }
        }
    }

    /// Counts a refusal in the metrics and the periodic summary.
    pub(crate) fn count_refusal(&self, reason: RejectReason, ip: IpAddr, live: &Live) {
        self.metrics.rejected(reason).increment(1);
        self.summary
            .record(reason, live.policy.classify(ip).rule.source_key(ip));
    }
}
