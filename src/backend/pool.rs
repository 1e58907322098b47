//! The backend pool: choosing a backend per session, per-backend caps, and failing over.
//!
//! Selection happens in the session's task, after admission, through [`Pool::connect`], which
//! owns the whole failover: a session asks once for a connected backend before its deadline. Least-connections picks the
//! healthy primary with the fewest active sessions relative to its weight, taking ties in turn;
//! `first` is strict failover in config order. A backend at its own `max_connections` is
//! skipped, not failed. Backups are used only when no primary is healthy.
//!
//! `fall` consecutive failures mark a backend down, `rise` successes mark it up again (see
//! [`super::health`]); a failed connect from a live session counts as a failure too, but only
//! when it is the backend's own fault. Members are matched by address across reloads, so health and active counts survive them.
//! Every metric here is labelled by configured backend address, a bounded set.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use metrics::{Counter, Gauge};

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{BackendSpec, Balance, Config};
use crate::metrics::Metrics;
use crate::queue::Wake;
use crate::reason::RejectReason;

/// One backend and its live state.
pub struct Member {
    pub addr: SocketAddr,
    /// The address as configured, the metric label.
    pub label: String,
    /// Settings a reload may change in place.
    weight: AtomicU32,
    max_connections: AtomicUsize,
    backup: AtomicBool,
    /// Sessions on this backend now.
    active: AtomicUsize,
    up: AtomicBool,
    /// Consecutive failed and successful checks.
    fails: AtomicU32,
    oks: AtomicU32,
    m_up: Gauge,
    m_active: Gauge,
    m_selected: Counter,
    m_ok: Counter,
    m_fail: Counter,
    /// Told when a slot of this backend is given back or it comes up, for the wait queue.
    wake: Arc<Wake>,
}

impl Member {
    fn new(spec: &BackendSpec, metrics: &Metrics, wake: &Arc<Wake>) -> Member {
        let label = spec.address.text.clone();
        let series = metrics.backend(&label);
        let m = Member {
            addr: spec.address.addr,
            weight: AtomicU32::new(spec.weight),
            max_connections: AtomicUsize::new(spec.max_connections.unwrap_or(usize::MAX)),
            backup: AtomicBool::new(spec.backup),
            active: AtomicUsize::new(0),
            up: AtomicBool::new(true),
            fails: AtomicU32::new(0),
            oks: AtomicU32::new(0),
            m_up: series.up,
            m_active: series.active,
            m_selected: series.selected,
            m_ok: series.checks_ok,
            m_fail: series.checks_failed,
            wake: wake.clone(),
            label,
        };
        m.m_up.set(1.0);
        m
    }

    fn update(&self, spec: &BackendSpec) {
        self.weight.store(spec.weight, Ordering::Relaxed);
        self.max_connections.store(
            spec.max_connections.unwrap_or(usize::MAX),
            Ordering::Relaxed,
        );
        self.backup.store(spec.backup, Ordering::Relaxed);
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Takes one of this backend's slots if it has room.
    fn take(&self) -> bool {
        let max = self.max_connections.load(Ordering::Relaxed);
        self.active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Whether every slot of this backend is taken.
    fn is_full(&self) -> bool {
        self.active() >= self.max_connections.load(Ordering::Relaxed)
    }

    /// Records one health observation and moves the up/down state by `fall`/`rise`.
    pub fn observe(&self, ok: bool, fall: u32, rise: u32) {
        if ok {
            self.m_ok.increment(1);
            self.fails.store(0, Ordering::Relaxed);
            let oks = self.oks.fetch_add(1, Ordering::Relaxed) + 1;
            if !self.is_up() && oks >= rise {
                self.up.store(true, Ordering::Release);
                self.m_up.set(1.0);
                tracing::info!(backend = %self.label, "backend is up");
                self.wake.freed();
            }
        } else {
            self.m_fail.increment(1);
            self.oks.store(0, Ordering::Relaxed);
            let fails = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
            if self.is_up() && fails >= fall {
                self.up.store(false, Ordering::Release);
                self.m_up.set(0.0);
                tracing::warn!(backend = %self.label, fails, "backend is down");
                // Sessions now go to other backends (the backups, say), which may have room.
                self.wake.freed();
            }
        }
    }
}

/// A session's hold on one backend's slot, released when dropped.
pub struct Lease {
    pub member: Arc<Member>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.member.active.fetch_sub(1, Ordering::SeqCst);
        self.member.m_active.decrement(1.0);
        self.member.wake.freed();
    }
}

/// Why no backend could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBackend {
    /// Healthy backends exist, but every one is at its own cap.
    AllFull,
    /// No backend (left to try) is healthy.
    AllDown,
}

/// The configured backends.
pub struct Pool {
    pub(super) members: Vec<Arc<Member>>,
    balance: Balance,
    /// Where the next tie-break starts.
    turn: AtomicUsize,
}

impl Pool {
    /// Builds the pool for `config`, keeping the members of `previous` with the same address.
    pub fn new(
        config: &Config,
        previous: Option<&Pool>,
        metrics: &Metrics,
        wake: &Arc<Wake>,
    ) -> Pool {
        let members = config
            .backends
            .iter()
            .map(|spec| {
                let old =
                    previous.and_then(|p| p.members.iter().find(|m| m.addr == spec.address.addr));
                match old {
                    Some(m) => {
                        m.update(spec);
                        m.clone()
                    }
                    None => Arc::new(Member::new(spec, metrics, wake)),
                }
            })
            .collect();
        Pool {
            members,
            balance: config.balance,
            turn: AtomicUsize::new(0),
        }
    }

    /// Whether some backend has a cap of its own, so that a session needs one of its slots
    /// before it can be admitted.
    pub fn capped(&self) -> bool {
        self.members
            .iter()
            .any(|m| m.max_connections.load(Ordering::Relaxed) != usize::MAX)
    }

    /// Whether a session would find healthy backends, all at their own caps (for `family`,
    /// as in [`Pool::select`]). With no healthy backend at all this is `false`: the session
    /// goes on and gets the backend-unavailable answer, as it would without a queue.
    pub fn full(&self, family: Option<std::net::IpAddr>) -> bool {
        let tier = self.tier(&[], family);
        !tier.is_empty() && tier.iter().all(|m| m.is_full())
    }

    /// The backends a new session may use: the healthy primaries, or the healthy backups when
    /// no primary is healthy.
    fn tier(&self, tried: &[SocketAddr], family: Option<std::net::IpAddr>) -> Vec<&Arc<Member>> {
        let usable = |m: &&Arc<Member>| {
            m.is_up()
                && !tried.contains(&m.addr)
                && family.is_none_or(|ip| ip.is_ipv4() == m.addr.is_ipv4())
        };
        let primaries: Vec<&Arc<Member>> = self
            .members
            .iter()
            .filter(|m| !m.backup.load(Ordering::Relaxed))
            .filter(usable)
            .collect();
        if primaries.is_empty() {
            self.members
                .iter()
                .filter(|m| m.backup.load(Ordering::Relaxed))
                .filter(usable)
                .collect()
        } else {
            primaries
        }
    }

    /// Chooses a backend for a new session, skipping `tried` ones, and takes one of its slots.
    /// With `family` (transparent mode: the client's address), only backends of that address
    /// family can take the session.
    pub fn select(
        &self,
        tried: &[SocketAddr],
        family: Option<std::net::IpAddr>,
    ) -> Result<Lease, NoBackend> {
        let tier = self.tier(tried, family);
        if tier.is_empty() {
            return Err(NoBackend::AllDown);
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        // A candidate that filled up between the look and the take is simply passed over.
        for _ in 0..tier.len() * 2 {
            let pick = match self.balance {
                Balance::First => tier.iter().copied().find(|m| !m.is_full()),
                Balance::LeastConnections => (0..tier.len())
                    .map(|i| tier[(start + i) % tier.len()])
                    .filter(|m| !m.is_full())
                    // Compare active/weight without division: a/w < b/v ⇔ a·v < b·w.
                    .reduce(|best, m| {
                        let (a, w) = (
                            best.active() as u64,
                            best.weight.load(Ordering::Relaxed) as u64,
                        );
                        let (b, v) = (m.active() as u64, m.weight.load(Ordering::Relaxed) as u64);
                        if b * w < a * v {
                            m
                        } else {
                            best
                        }
                    }),
            };
            let Some(m) = pick else {
                return Err(NoBackend::AllFull);
            };
            if m.take() {
                m.m_active.increment(1.0);
                m.m_selected.increment(1);
                return Ok(Lease {
                    member: (*m).clone(),
                });
            }
        }
        Err(NoBackend::AllFull)
    }

    /// A connected backend for a new session, before `deadline`: picks one and connects,
    /// falling through to the next healthy one on a connect failure. No byte has reached the
    /// client yet, so a failure here is still invisible to it. Only the backend's own failures
    /// count against its health; one caused by the client's address or mxgate's own socket
    /// never does. With `source` (transparent mode), only backends of its family are tried.
    /// `first`, a slot the wait queue already took, is tried first.
    pub async fn connect(
        &self,
        config: &Config,
        source: Option<SocketAddr>,
        deadline: Instant,
        mut first: Option<Lease>,
    ) -> Result<(TcpStream, Lease), RejectReason> {
        let mut tried: Vec<SocketAddr> = Vec::new();
        loop {
            let chosen = match first.take() {
                Some(l) => Ok(l),
                None => self.select(&tried, source.map(|s| s.ip())),
            };
            let lease = match chosen {
                Ok(l) => l,
                Err(_) if !tried.is_empty() => return Err(RejectReason::BackendUnavailable),
                Err(NoBackend::AllFull) => return Err(RejectReason::GlobalLimit),
                Err(NoBackend::AllDown) => return Err(RejectReason::BackendUnavailable),
            };
            let addr = lease.member.addr;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RejectReason::BackendUnavailable);
            }
            match super::connect(addr, left, source).await {
                Ok(s) => return Ok((s, lease)),
                Err(e) => {
                    tracing::debug!(backend = %lease.member.label, error = %e, "backend connect failed; trying the next");
                    // From the client's own address (transparent mode) a refusal or timeout
                    // may be aimed at that client (a firewall ban, its own network): only
                    // health checks, made from mxgate's address, judge the backend then.
                    if config.health_checks && source.is_none() && e.is_backend_fault() {
                        lease.member.observe(false, config.fall, config.rise);
                    }
                    tried.push(addr);
                }
            }
        }
    }
}
