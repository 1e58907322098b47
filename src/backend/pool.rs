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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{BackendSpec, Balance, Config};
use crate::metrics::Metrics;
use crate::reason::RejectReason;
use crate::wake::Wake;

use super::limit::{Learned, Signal};
use super::ConnectError;
use crate::local_errors::Errno;

mod busy;
pub use busy::BusyAbout;
mod learned;

use busy::Hold;

/// One backend and its live state.
pub struct Member {
    pub addr: SocketAddr,
    /// The address as configured, the metric label.
    pub label: String,
    /// Settings a reload may change in place.
    weight: AtomicU32,
    max_connections: AtomicUsize,
    backup: AtomicBool,
    /// The learned limit, for `max_connections = "auto"`.
    learned: Mutex<Option<Learned>>,
    /// The sessions it may take: `max_connections`, or what the learned limit allows.
    limit: AtomicUsize,
    /// Since its last busy greeting, no more than it held then (`usize::MAX`: no ceiling).
    ceiling: AtomicUsize,
    /// The busy hold behind `ceiling`, changed only under its lock.
    busy_hold: Mutex<Hold>,
    /// Sessions on this backend now.
    active: AtomicUsize,
    up: AtomicBool,
    /// The last health check: when, and what it found (for the live view).
    last_check: Mutex<Option<(Instant, super::Check)>>,
    /// Consecutive failed and successful checks.
    fails: AtomicU32,
    oks: AtomicU32,
    m_up: Gauge,
    m_active: Gauge,
    m_selected: Counter,
    m_ok: Counter,
    m_fail: Counter,
    m_limit: Gauge,
    m_busy: Counter,
    m_greeting: Histogram,
    /// Told when a slot of this backend is given back or it comes up, for the wait queue.
    wake: Arc<Wake>,
}

impl Member {
    fn new(spec: &BackendSpec, config: &Config, metrics: &Metrics, wake: &Arc<Wake>) -> Member {
        let label = spec.address.text.clone();
        let series = metrics.backend(&label);
        let m = Member {
            addr: spec.address.addr,
            weight: AtomicU32::new(spec.weight),
            max_connections: AtomicUsize::new(spec.max_connections.unwrap_or(usize::MAX)),
            backup: AtomicBool::new(spec.backup),
            learned: Mutex::new(None),
            limit: AtomicUsize::new(usize::MAX),
            ceiling: AtomicUsize::new(usize::MAX),
            busy_hold: Mutex::new(Hold::default()),
            active: AtomicUsize::new(0),
            up: AtomicBool::new(true),
            last_check: Mutex::new(None),
            fails: AtomicU32::new(0),
            oks: AtomicU32::new(0),
            m_up: series.up,
            m_active: series.active,
            m_selected: series.selected,
            m_ok: series.checks_ok,
            m_fail: series.checks_failed,
            m_limit: series.limit,
            m_busy: series.busy,
            m_greeting: series.greeting_seconds,
            wake: wake.clone(),
            label,
        };
        m.m_up.set(1.0);
        m.update(spec, config);
        m
    }

    /// Applies a backend's settings, at start and at a reload. A learned limit the backend
    /// already had is kept, within the new bounds.
    fn update(&self, spec: &BackendSpec, config: &Config) {
        self.weight.store(spec.weight, Ordering::Relaxed);
        self.max_connections.store(
            spec.max_connections.unwrap_or(usize::MAX),
            Ordering::Relaxed,
        );
        self.backup.store(spec.backup, Ordering::Relaxed);
        let mut learned = self.learned();
        let top = config.max_connections;
        match (&mut *learned, spec.auto) {
            (Some(l), true) => l.rebound(config.adaptive_min, top),
            (None, true) => {
                *learned = Some(Learned::new(
                    config.adaptive_min,
                    top,
                    config.adaptive_initial,
                ))
            }
            (_, false) => *learned = None,
        }
        let limit = match &*learned {
            Some(l) => l.allowed(),
            None => spec.max_connections.unwrap_or(usize::MAX),
        };
        self.limit.store(limit, Ordering::Relaxed);
        let shown = learned.as_ref().map_or(limit, Learned::limit);
        drop(learned);
        // No cap of its own: the global limit is what it may get.
        self.m_limit.set(shown.min(top) as f64);
        // A raised limit may let a waiting client in.
        self.wake.freed();
    }

    fn learned(&self) -> std::sync::MutexGuard<'_, Option<Learned>> {
        self.learned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this backend's limit is learned.
    pub fn is_auto(&self) -> bool {
        self.learned().is_some()
    }

    /// The limit in force: fixed, learned, or `None` for no cap of its own.
    pub fn limit(&self) -> Option<usize> {
        if let Some(l) = &*self.learned() {
            return Some(l.limit());
        }
        let max = self.max_connections.load(Ordering::Relaxed);
        (max != usize::MAX).then_some(max)
    }

    /// The sessions it may take now: its limit, and under a busy ceiling no more than it held.
    fn cap(&self) -> usize {
        let ceiling = self.ceiling.load(Ordering::Acquire);
        self.limit.load(Ordering::Relaxed).min(ceiling)
    }

    /// Whether new sessions need one of this backend's slots: it has a cap of some kind now.
    fn is_capped(&self) -> bool {
        self.cap() != usize::MAX
    }

    /// A signal for the learned limit; applies it and logs a move past 10 %.
    fn learn(&self, signal: Signal) {
        let mut learned = self.learned();
        let Some(l) = learned.as_mut() else { return };
        let moved = l.observe(signal);
        let (limit, allowed) = (l.limit(), l.allowed());
        // Under the lock, so that concurrent signals leave the last word in force.
        let before = self.limit.swap(allowed, Ordering::AcqRel);
        drop(learned);
        self.m_limit.set(limit as f64);
        if let Some(m) = moved {
            tracing::info!(backend = %self.label, from = m.from, to = m.to, reason = %m.why.label(), "learned backend limit moved");
        }
        if allowed > before {
            self.wake.freed();
        }
    }

    /// The backend greeted a session (with anything but a 4xx) `time` after the connect.
    pub fn greeted(&self, time: Duration) {
        self.m_greeting.record(time.as_secs_f64());
        let held = self.active();
        self.learn(Signal::Greeted { time, held });
    }

    /// A connect to this backend timed out: for a learned limit, a sign of overload.
    fn connect_timed_out(&self) {
        let held = self.active().saturating_sub(1);
        self.learn(Signal::ConnectTimeout { held });
    }

    /// Records a health check's result for the live view.
    pub fn checked(&self, result: super::Check) {
        *self.last_check.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), result));
    }

    /// The last health check: how long ago, and what it found.
    pub fn last_check(&self) -> Option<(Duration, super::Check)> {
        let last = *self.last_check.lock().unwrap_or_else(|p| p.into_inner());
        last.map(|(at, c)| (at.elapsed(), c))
    }

    pub fn is_backup(&self) -> bool {
        self.backup.load(Ordering::Relaxed)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Takes one of this backend's slots if it has room.
    fn take(&self) -> bool {
        let max = self.cap();
        self.active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Whether every slot of this backend is taken.
    fn is_full(&self) -> bool {
        self.active() >= self.cap()
    }

    /// Records one health observation and moves the up/down state by `fall`/`rise`.
    pub fn health_checked(&self, ok: bool, fall: u32, rise: u32) {
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

/// Why [`Pool::connect`] made no backend connection.
#[derive(Debug)]
pub enum Unconnected {
    /// The answer the client gets (or, for a full house, the queue it goes back to).
    Refused(RejectReason),
    /// mxgate's own socket could not be made: out of descriptors or socket memory. Neither
    /// the client's nor any backend's doing.
    Local(Errno, std::io::Error),
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
    /// The backends, in config order (for the live view).
    pub fn members(&self) -> &[Arc<Member>] {
        &self.members
    }

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
                        m.update(spec, config);
                        m.clone()
                    }
                    None => Arc::new(Member::new(spec, config, metrics, wake)),
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
        self.members.iter().any(|m| m.is_capped())
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
    /// `first`, a slot the wait queue already took, is tried first. `tried` lists the
    /// backends whose connect failed for this session, across calls.
    pub async fn connect(
        &self,
        config: &Config,
        source: Option<SocketAddr>,
        deadline: Instant,
        mut first: Option<Lease>,
        tried: &mut Vec<SocketAddr>,
    ) -> Result<(TcpStream, Lease), Unconnected> {
        use Unconnected::Refused;
        loop {
            let chosen = match first.take() {
                Some(l) => Ok(l),
                None => self.select(tried, source.map(|s| s.ip())),
            };
            let lease = match chosen {
                Ok(l) => l,
                Err(_) if !tried.is_empty() => {
                    return Err(Refused(RejectReason::BackendUnavailable))
                }
                Err(NoBackend::AllFull) => return Err(Refused(RejectReason::GlobalLimit)),
                Err(NoBackend::AllDown) => return Err(Refused(RejectReason::BackendUnavailable)),
            };
            let addr = lease.member.addr;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Refused(RejectReason::BackendUnavailable));
            }
            match super::connect(addr, left, source).await {
                Ok(s) => return Ok((s, lease)),
                // Out of descriptors or socket memory: no other backend would fare better, and
                // none of them is to blame. The lease goes back with this return.
                Err(ConnectError::Local(e)) if Errno::of(&e).is_some() => {
                    let errno = Errno::of(&e).expect("checked in the guard");
                    return Err(Unconnected::Local(errno, e));
                }
                Err(e) => {
                    tracing::debug!(backend = %lease.member.label, error = %e, "backend connect failed; trying the next");
                    // From the client's own address (transparent mode) a refusal or timeout
                    // may be aimed at that client (a firewall ban, its own network): only
                    // health checks, made from mxgate's address, judge the backend then.
                    if config.health_checks && source.is_none() && e.is_backend_fault() {
                        lease.member.health_checked(false, config.fall, config.rise);
                    }
                    // From the client's own address a timeout may be aimed at that client.
                    if e.is_timeout() && source.is_none() {
                        lease.member.connect_timed_out();
                    }
                    tried.push(addr);
                }
            }
        }
    }
}
