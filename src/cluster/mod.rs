//! Limits shared by several mxgate instances through Redis: the global, per-source and
//! per-network counts hold across every instance with the same `[cluster]` name.
//!
//! Local admission (`crate::admission`) still runs first, in the accept loop, with the same
//! limits: an instance never holds more than the cluster does, so its own counts can only refuse
//! what the cluster would. A client that passes it is then admitted by the cluster in its own
//! task ([`Cluster::admit`]), in one round trip to a server-side script ([`script`]), so two
//! instances deciding at once can never both take the last slot. The accept loop never waits on
//! Redis.
//!
//! Each instance keeps the truth about its own sessions here ([`State`]), and Redis a copy under
//! a lease the instance refreshes. A lease that ends (the instance died) takes its counts with
//! it, at the next script any instance runs. While Redis is unreachable or slower than
//! `admission_timeout`, the instance decides alone, under `fallback_share` of each limit; once
//! Redis answers again, it registers its live sessions whole, and shares again.
//!
//! Registration and admissions race: a registration's snapshot goes through the ordered writer,
//! admissions straight to Redis. Each admission carries the epoch (registration) it was counted
//! under, so the scripts keep the copy exact whichever arrives first (see `script::ADMIT`).
//! What can still drift: a script that went unanswered (Redis stalled) may run late, after the
//! registration that follows, and sessions admitted alone while a registration was on its way
//! are missing from it. Both set a flag, and the next lease refresh registers again, so such
//! drift lasts at most a third of `lease_ttl`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::metrics::{ClusterSeries, Metrics};
use crate::reason::RejectReason;
use crate::wake::Wake;

mod admit;
mod claim;
mod connection;
mod pace;
mod script;
mod writer;

pub use claim::{Ask, Claim};
use claim::{Keys, State};
use pace::Pace;
pub use pace::ASK_EVERY;
use script::Scripts;
use writer::Write;

/// The target of every cluster log line, whichever submodule logs it.
const LOG_TARGET: &str = "mxgate::cluster";
/// The longest a lease refresh, a registration or a batch of releases waits for Redis before
/// the instance counts it as unreachable.
pub(crate) const UPKEEP_TIMEOUT: Duration = Duration::from_secs(1);
/// Outage and recovery lines are logged at most once in this long; the drops in between are
/// counted in the next line.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The cluster's answer.
pub enum ClusterVerdict {
    /// Admitted, with what a dry run would have refused.
    Admitted(Claim, Option<RejectReason>),
    Refused(RejectReason),
}

/// The cluster-wide figures Redis gave at the last refresh, for `mxgate status`.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Seen {
    pub connections: u64,
    pub instances: u64,
}

/// One connection to Redis. The generation tells a failure on it from one on an older
/// connection, which must not take the newer one down.
#[derive(Clone)]
struct Link {
    generation: u64,
    conn: MultiplexedConnection,
}

/// What the outage log has said, so a flapping Redis cannot flood it.
#[derive(Default)]
struct Outages {
    /// When the last outage line was logged.
    logged: Option<Instant>,
    /// Drops since then that were not logged.
    quiet: u64,
    /// Whether the last line logged said Redis was lost (so the recovery is logged too).
    said_down: bool,
}

impl Outages {
    /// Whether an outage line may be logged now; if so, it is counted as logged.
    fn may_log_down(&mut self) -> bool {
        if self.logged.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            return false;
        }
        self.logged = Some(Instant::now());
        self.said_down = true;
        true
    }
}

/// One instance's membership in a cluster.
pub struct Cluster {
    config: ClusterConfig,
    /// Tells this process from another one given the same instance name.
    token: String,
    prefix: String,
    client: redis::Client,
    scripts: Scripts,
    conn: Mutex<Option<Link>>,
    /// The generation the next connection gets.
    generations: AtomicU64,
    /// Mirrors `State::connected`, read without the lock on the admission path.
    connected: AtomicBool,
    /// Whether Redis's copy is younger than one lease (see `script::REGISTER`): admissions
    /// then also hold to the fallback share.
    warming: AtomicBool,
    /// What was left of the warm-up at the last answer that said.
    warm_left: Mutex<Duration>,
    outages: Mutex<Outages>,
    state: Mutex<State>,
    writes: mpsc::UnboundedSender<Write>,
    /// Releases queued for the writer, and those it has dealt with (sent, or dropped with no
    /// connection); `flushed` wakes admissions waiting for them.
    releases_sent: AtomicU64,
    releases_done: AtomicU64,
    flushed: Notify,
    /// Wakes the supervisor: Redis went away, or the instance stops.
    kick: Notify,
    stop: CancellationToken,
    series: ClusterSeries,
    seen: Mutex<Seen>,
    /// When this host's waiters may ask for a slot (see [`pace`]).
    pace: Pace,
    /// This host's queue: its waiters are part of the demand published to Redis, and its
    /// dispatcher is woken when a waiter may ask.
    wake: Arc<Wake>,
    /// The waiters in the demand last published.
    published_waiting: AtomicU64,
}

impl Cluster {
    /// Joins the cluster in the background: admissions use the fallback share until Redis
    /// has taken this instance's registration. Must run inside the tokio runtime.
    pub fn start(config: ClusterConfig, metrics: &Metrics, wake: Arc<Wake>) -> Arc<Cluster> {
        let client = redis::Client::open(config.redis.as_str())
            .expect("the URL was checked when the config was validated");
        let (writes, rx) = mpsc::unbounded_channel();
        let series = metrics.cluster();
        series.connected.set(0.0);
        series.warming.set(0.0);
        let cluster = Arc::new(Cluster {
            token: process_token(),
            prefix: format!("mxgate:{}:", config.name),
            config,
            client,
            scripts: Scripts::new(),
            conn: Mutex::new(None),
            generations: AtomicU64::new(1),
            connected: AtomicBool::new(false),
            warming: AtomicBool::new(false),
            warm_left: Mutex::new(Duration::ZERO),
            outages: Mutex::new(Outages::default()),
            state: Mutex::new(State::default()),
            writes,
            releases_sent: AtomicU64::new(0),
            releases_done: AtomicU64::new(0),
            flushed: Notify::new(),
            kick: Notify::new(),
            stop: CancellationToken::new(),
            series,
            seen: Mutex::new(Seen::default()),
            pace: Pace::default(),
            wake,
            published_waiting: AtomicU64::new(0),
        });
        tokio::spawn(cluster.clone().writer(rx));
        tokio::spawn(cluster.clone().supervise());
        cluster
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Whether Redis decides admissions now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Whether the cluster's copy of the counts is younger than one lease, so this instance
    /// also holds to its fallback share.
    pub fn warming(&self) -> bool {
        self.warming.load(Ordering::Acquire)
    }

    fn set_warming(&self, warming: bool) {
        if self.warming.swap(warming, Ordering::AcqRel) != warming {
            self.series.warming.set(if warming { 1.0 } else { 0.0 });
            if warming {
                tracing::info!(
                    fallback_share = self.config.fallback_share,
                    "cluster: Redis's counts are new (first start, or it restarted empty); \
                     for one lease, until every live instance has registered, this one also \
                     holds to its fallback share"
                );
            }
        }
    }

    fn link(&self) -> Option<Link> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A connection to the cluster's Redis and the cluster's key prefix, while Redis answers:
    /// for what other modules share through it (the pregreet cache, `crate::pregreet`).
    pub fn shared_link(&self) -> Option<(MultiplexedConnection, &str)> {
        if !self.connected() {
            return None;
        }
        self.link().map(|l| (l.conn, self.prefix.as_str()))
    }

    /// The cluster-wide figures as Redis gave them at the last refresh.
    pub fn seen(&self) -> Seen {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This instance's own sessions, as it counts them for the cluster.
    pub fn local_sessions(&self) -> usize {
        let global = self.global_key();
        self.lock().count(&global)
    }

    /// Whether a waiting client may ask for a slot now. Always while the cluster has room;
    /// once it said full, one client per [`ASK_EVERY`], in the queue's order.
    pub fn may_ask(&self) -> bool {
        self.pace.may_ask()
    }

    /// When the next waiting client may ask, while the cluster is full: the queue's
    /// dispatcher looks again then.
    pub fn next_ask(&self) -> Option<std::time::Instant> {
        self.pace.next().map(Instant::into_std)
    }

    /// This host's demand, as published to Redis: its sessions (admissions in flight
    /// included) and the clients waiting in its queue.
    fn demand(&self, state: &State) -> u64 {
        let waiting = self.wake.waiting() as u64;
        self.published_waiting.store(waiting, Ordering::Relaxed);
        state.count(&self.global_key()) as u64 + waiting
    }

    /// Publishes this host's demand again if its queue emptied since it was last published,
    /// so other hosts stop leaving slots to waiters that are gone. Called by the queue's
    /// dispatcher; a round trip only for a host whose clients waited.
    pub fn queue_changed(&self) {
        if self.wake.waiting() == 0 && self.published_waiting.load(Ordering::Relaxed) > 0 {
            self.published_waiting.store(0, Ordering::Relaxed);
            let _ = self.writes.send(Write::Demand);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn global_key(&self) -> Arc<str> {
        format!("{}g", self.prefix).into()
    }

    fn keys(&self, ask: &Ask) -> Keys {
        Keys {
            global: self.global_key(),
            source: format!("{}s:{}", self.prefix, ask.source).into(),
            network: ask
                .network
                .map(|(block, _)| format!("{}n:{block}", self.prefix).into()),
        }
    }

    /// Stops the background work without giving the slots back: they return when the lease
    /// ends, as after a crash.
    pub fn abandon(&self) {
        self.stop.cancel();
    }

    /// A clean stop: this instance's counts are given back at once, and its lease ended.
    pub async fn leave(&self) {
        self.stop.cancel();
        let Some(Link { mut conn, .. }) = self.link() else {
            return;
        };
        let mut call = self.scripts.leave.prepare_invoke();
        call.arg(&self.prefix)
            .arg(&self.config.instance)
            .arg(&self.token);
        match tokio::time::timeout(UPKEEP_TIMEOUT, call.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(_)) => tracing::info!("cluster: left; this instance's slots are free"),
            _ => tracing::warn!(
                "cluster: could not give this instance's slots back; they return when its lease ends"
            ),
        }
        self.series.connected.set(0.0);
    }
}

/// A token for this process: its id, the time and an address from the heap, enough to tell
/// two processes apart (it is no secret).
fn process_token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let heap = Box::new(0u8);
    format!(
        "{:x}-{:x}-{:x}",
        std::process::id(),
        nanos,
        &*heap as *const u8 as usize
    )
}

/// What an instance enforces alone of `limit`: its share, rounded down, but at least one slot
/// of any limit above zero (a share must never refuse everyone).
pub fn fallback_cap(limit: usize, share: f64) -> usize {
    if limit == 0 {
        return 0;
    }
    ((limit as f64 * share).floor() as usize).max(1)
}

#[cfg(test)]
mod tests;
