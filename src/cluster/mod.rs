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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{redact, ClusterConfig};
use crate::metrics::{ClusterSeries, Metrics};
use crate::reason::RejectReason;

mod script;

use script::Scripts;

/// The longest a lease refresh, a registration or a batch of releases waits for Redis before
/// the instance counts it as unreachable.
const UPKEEP_TIMEOUT: Duration = Duration::from_secs(1);
/// Waits between reconnection tries: from the first to the longest.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Registrations tried in a row while clients keep being admitted alone meanwhile.
const REGISTER_ROUNDS: u32 = 3;
/// Releases sent in one script call at most.
const RELEASE_BATCH: usize = 512;
/// A connection that ends sooner than this after it was made is a flap: the next try waits,
/// longer each time up to a quarter of `lease_ttl`, so a Redis slower than
/// `admission_timeout` costs a few tries a lease rather than one per admission. Never longer:
/// an instance that waited past its lease would have its counts taken back while its
/// sessions live.
const STABLE: Duration = Duration::from_secs(30);
/// Outage and recovery lines are logged at most once in this long; the drops in between are
/// counted in the next line.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// What one clustered admission asks for: the keys admission decided with and their limits.
#[derive(Clone, Copy, Debug)]
pub struct Ask {
    pub source: IpNet,
    /// `None` for an allowed source, which has no per-source limit (it is still counted).
    pub source_cap: Option<usize>,
    /// The network block and its cap, when the source's rule caps blocks.
    pub network: Option<(IpNet, usize)>,
    pub global_cap: usize,
    /// False in a dry run: counted whatever the outcome, the first failure reported.
    pub enforce: bool,
}

/// The cluster's answer.
pub enum Verdict {
    /// Admitted, with what a dry run would have refused.
    Admitted(Claim, Option<RejectReason>),
    Refused(RejectReason),
}

/// The full Redis names of one session's count keys.
#[derive(Clone, Debug)]
struct Keys {
    global: Arc<str>,
    source: Arc<str>,
    network: Option<Arc<str>>,
}

impl Keys {
    fn iter(&self) -> impl Iterator<Item = &Arc<str>> {
        [
            Some(&self.global),
            Some(&self.source),
            self.network.as_ref(),
        ]
        .into_iter()
        .flatten()
    }
}

/// One session's place in the cluster's counts. Dropping it gives the place back, in the
/// background: the client is never delayed by its release.
#[must_use = "dropping the claim gives the session's place back at once"]
pub struct Claim {
    cluster: Arc<Cluster>,
    keys: Keys,
    /// Whether Redis counted it at admission (not a fallback admission).
    in_redis: bool,
    /// The registration it was admitted under: a later one counted it in Redis too.
    epoch: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut state = self.cluster.lock();
        state.remove(&self.keys);
        if self.in_redis || self.epoch != state.epoch {
            // Sent under the lock, so it is ordered with the registrations.
            self.cluster.send_release(&self.keys);
        }
    }
}

/// This instance's own sessions: the truth that Redis holds a copy of.
#[derive(Default)]
struct State {
    /// Sessions per full count key, admissions still in flight included.
    counts: HashMap<Arc<str>, u64>,
    /// Bumped at each registration.
    epoch: u64,
    /// Whether Redis decides admissions now.
    connected: bool,
    /// Fallback admissions since the last registration's snapshot: they are not in Redis.
    fallback_since_snapshot: usize,
    /// The copy in Redis may have drifted: register again at the next refresh.
    dirty: bool,
    /// A script went unanswered since the last registration: Redis may still run it late,
    /// on the old connection, after the next registration; the refresh after it corrects that.
    unanswered: bool,
}

impl State {
    fn add(&mut self, keys: &Keys) {
        for k in keys.iter() {
            *self.counts.entry(k.clone()).or_insert(0) += 1;
        }
    }

    fn remove(&mut self, keys: &Keys) {
        for k in keys.iter() {
            if let Some(n) = self.counts.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(k);
                }
            }
        }
    }

    fn count(&self, key: &Arc<str>) -> usize {
        self.counts.get(key).copied().unwrap_or(0) as usize
    }
}

/// Writes that must reach Redis in the order they were decided.
enum Write {
    Release(Vec<Arc<str>>),
    /// This instance's counts, whole; the answer says whether Redis took them.
    Register(u64, Vec<(Arc<str>, u64)>, oneshot::Sender<bool>),
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
}

impl Cluster {
    /// Joins the cluster in the background: admissions use the fallback share until Redis
    /// has taken this instance's registration. Must run inside the tokio runtime.
    pub fn start(config: ClusterConfig, metrics: &Metrics) -> Arc<Cluster> {
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

    /// Queues one session's release; the writer sends it in order with registrations.
    fn send_release(&self, keys: &Keys) {
        self.releases_sent.fetch_add(1, Ordering::AcqRel);
        let _ = self
            .writes
            .send(Write::Release(keys.iter().cloned().collect()));
    }

    /// Waits, at most `admission_timeout`, until the writer has dealt with the first
    /// `sent` releases; true once it has.
    async fn releases_landed(&self, sent: u64) -> bool {
        let wait = async {
            loop {
                let flushed = self.flushed.notified();
                if self.releases_done.load(Ordering::Acquire) >= sent {
                    return;
                }
                flushed.await;
            }
        };
        tokio::time::timeout(self.config.admission_timeout, wait)
            .await
            .is_ok()
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

    /// Admits one session across the cluster, or refuses it with the limit it hit. Redis
    /// decides while it answers within `admission_timeout`; otherwise this instance does,
    /// under its fallback share. Never refuses because Redis is down.
    pub async fn admit(self: &Arc<Self>, ask: &Ask) -> Verdict {
        let keys = self.keys(ask);
        let link = if self.connected() { self.link() } else { None };
        // Counted here first, so a registration meanwhile includes it: drift over-counts.
        let epoch = {
            let mut state = self.lock();
            state.add(&keys);
            state.epoch
        };
        let Some(Link {
            generation,
            mut conn,
        }) = link
        else {
            return self.alone(keys, ask, epoch);
        };
        // Releases this host sent before the client came: Redis may not have applied them yet.
        let released = self.releases_sent.load(Ordering::Acquire);
        let mut retried = false;
        let (code, warming) = loop {
            // Whether some were still pending as this admission was sent.
            let overtaking = self.releases_done.load(Ordering::Acquire) < released;
            let started = Instant::now();
            let mut call = self.scripts.admit.prepare_invoke();
            call.arg(&self.prefix)
                .arg(&self.config.instance)
                .arg(ask.source.to_string())
                .arg(ask.source_cap.map_or(-1, |c| c as i64))
                .arg(ask.network.map_or(String::new(), |(b, _)| b.to_string()))
                .arg(ask.network.map_or(0, |(_, c)| c as i64))
                .arg(ask.global_cap as i64)
                .arg(if ask.enforce { 1 } else { 0 })
                .arg(&self.token)
                .arg(epoch);
            let answer = tokio::time::timeout(
                self.config.admission_timeout,
                call.invoke_async::<(i64, i64, i64)>(&mut conn),
            )
            .await;
            self.series
                .admission_seconds
                .record(started.elapsed().as_secs_f64());
            let (code, warming) = match answer {
                Ok(Ok((code, _total, warming))) if code >= 0 => (code, warming == 1),
                Ok(Ok(_)) => {
                    self.down(
                        generation,
                        "this instance's lease had ended; registering again",
                    );
                    return self.alone(keys, ask, epoch);
                }
                Ok(Err(e)) => {
                    self.down(generation, &format!("admission failed: {e}"));
                    return self.alone(keys, ask, epoch);
                }
                Err(_) => {
                    self.lock().unanswered = true;
                    self.down(
                        generation,
                        &format!(
                            "no answer to an admission within {} ms",
                            self.config.admission_timeout.as_millis()
                        ),
                    );
                    return self.alone(keys, ask, epoch);
                }
            };
            // Refused while a release from this host was still on its way: the admission
            // overtook it (releases go through the writer, admissions straight to Redis).
            // Ask once more after it has landed, so a slot freed here before the client came
            // is not refused to it.
            if code > 0
                && ask.enforce
                && overtaking
                && !retried
                && self.releases_landed(released).await
            {
                retried = true;
                continue;
            }
            break (code, warming);
        };
        self.set_warming(warming);
        let reason = match code {
            1 => Some(RejectReason::SourceLimit),
            2 => Some(RejectReason::NetworkLimit),
            3 => Some(RejectReason::GlobalLimit),
            _ => None,
        };
        if let (Some(reason), true) = (reason, ask.enforce) {
            self.unclaim(&keys, epoch);
            return Verdict::Refused(reason);
        }
        let claim = Claim {
            cluster: self.clone(),
            keys,
            in_redis: true,
            epoch,
        };
        // Redis's counts may still miss instances that have not registered since it began:
        // the share holds too.
        let over = warming
            .then(|| self.over_share(&self.lock(), &claim.keys, ask))
            .flatten();
        match over {
            Some(over) if ask.enforce => {
                // Counted in Redis: the claim's drop gives it back there too.
                drop(claim);
                Verdict::Refused(over)
            }
            over => Verdict::Admitted(claim, reason.or(over)),
        }
    }

    /// Takes back a session counted here but refused by Redis. A registration since it was
    /// counted put it in Redis too, so Redis is told.
    fn unclaim(&self, keys: &Keys, epoch: u64) {
        let mut state = self.lock();
        state.remove(keys);
        if state.epoch != epoch {
            self.send_release(keys);
        }
    }

    /// The limit this instance's own sessions (the asking one already counted) exceed under
    /// `fallback_share` of each limit, if any.
    fn over_share(&self, state: &State, keys: &Keys, ask: &Ask) -> Option<RejectReason> {
        let share = |limit: usize| fallback_cap(limit, self.config.fallback_share);
        if ask
            .source_cap
            .is_some_and(|cap| state.count(&keys.source) > share(cap))
        {
            Some(RejectReason::SourceLimit)
        } else if let (Some((_, cap)), Some(key)) = (ask.network, &keys.network) {
            (state.count(key) > share(cap)).then_some(RejectReason::NetworkLimit)
        } else {
            None
        }
        .or_else(|| {
            (state.count(&keys.global) > share(ask.global_cap)).then_some(RejectReason::GlobalLimit)
        })
    }

    /// The decision without Redis: this instance's own sessions against `fallback_share` of
    /// each limit.
    fn alone(self: &Arc<Self>, keys: Keys, ask: &Ask, epoch: u64) -> Verdict {
        let mut state = self.lock();
        let over = self.over_share(&state, &keys, ask);
        if let (Some(reason), true) = (over, ask.enforce) {
            state.remove(&keys);
            if state.epoch != epoch {
                self.send_release(&keys);
            }
            return Verdict::Refused(reason);
        }
        state.fallback_since_snapshot += 1;
        if state.connected {
            // Redis came back while this was decided alone: it is missing from the copy.
            state.dirty = true;
        }
        drop(state);
        self.series.fallback_admissions.increment(1);
        Verdict::Admitted(
            Claim {
                cluster: self.clone(),
                keys,
                in_redis: false,
                epoch,
            },
            over,
        )
    }

    /// Redis is unreachable, slow, or lost this instance's lease on connection `generation`:
    /// decide alone until the supervisor has registered again. A failure on an older
    /// connection than the current one changes nothing. Logged once per outage, and at most
    /// once a `LOG_EVERY`.
    fn down(&self, generation: u64, why: &str) {
        {
            let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
            match &*conn {
                Some(link) if link.generation == generation => *conn = None,
                _ => return,
            }
        }
        let was = {
            let mut state = self.lock();
            std::mem::replace(&mut state.connected, false)
        };
        self.connected.store(false, Ordering::Release);
        if was {
            self.series.connected.set(0.0);
            self.series.disconnects.increment(1);
            // Alone, the share holds anyway; a new warm-up is learned at the next registration.
            self.set_warming(false);
            let mut outages = self.outages.lock().unwrap_or_else(|e| e.into_inner());
            if outages.may_log_down() {
                tracing::warn!(
                    redis = %redact(&self.config.redis),
                    reason = why,
                    fallback_share = self.config.fallback_share,
                    drops_not_logged = outages.quiet,
                    "cluster: Redis unreachable; enforcing the fallback share of each limit alone"
                );
                outages.quiet = 0;
            } else {
                outages.quiet += 1;
                tracing::debug!(reason = why, "cluster: Redis dropped again");
            }
        }
        self.kick.notify_one();
    }

    /// Keeps the membership: connects, registers, refreshes the lease, and starts over
    /// whenever Redis goes away.
    async fn supervise(self: Arc<Self>) {
        let longest = (self.config.lease_ttl / 4).max(RECONNECT_FIRST);
        let mut wait = RECONNECT_FIRST;
        let mut flap_wait = RECONNECT_FIRST;
        let mut up_since: Option<Instant> = None;
        let mut logged_unreachable = false;
        while !self.stop.is_cancelled() {
            if !self.connected() {
                if let Some(since) = up_since.take() {
                    if since.elapsed() < STABLE {
                        // It did not last: wait, longer each time, on the fallback share.
                        tokio::select! {
                            () = tokio::time::sleep(flap_wait) => {}
                            () = self.stop.cancelled() => return,
                        }
                        flap_wait = (flap_wait * 2).min(longest);
                    } else {
                        flap_wait = RECONNECT_FIRST;
                    }
                }
                match self.connect().await {
                    Ok(()) => {
                        wait = RECONNECT_FIRST;
                        logged_unreachable = false;
                        up_since = Some(Instant::now());
                        continue;
                    }
                    Err(e) => {
                        // Logged once an outage, unless a line saying so was the last one.
                        let log = !logged_unreachable && {
                            let mut outages =
                                self.outages.lock().unwrap_or_else(|e| e.into_inner());
                            if outages.said_down {
                                outages.may_log_down()
                            } else {
                                outages.logged = Some(Instant::now());
                                outages.said_down = true;
                                true
                            }
                        };
                        if log {
                            tracing::warn!(
                                redis = %redact(&self.config.redis),
                                error = %e,
                                "cluster: cannot reach Redis; enforcing the fallback share of each limit alone, retrying"
                            );
                        }
                        logged_unreachable = true;
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = self.stop.cancelled() => return,
                        }
                        wait = (wait * 2).min(RECONNECT_MAX).min(longest);
                        continue;
                    }
                }
            }
            // Refreshed early when the warm-up ends, so status and metrics show it then.
            let mut next = self.config.lease_ttl / 3;
            if self.warming() {
                next = next.min(*self.warm_left.lock().unwrap_or_else(|e| e.into_inner()));
            }
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = self.kick.notified() => continue,
                () = self.stop.cancelled() => return,
            }
            if self.connected() {
                self.refresh().await;
            }
        }
    }

    /// Connects, loads the scripts and registers this instance's live sessions; shared counts
    /// resume once Redis has them all.
    async fn connect(&self) -> Result<(), String> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(UPKEEP_TIMEOUT))
            .set_response_timeout(None);
        let mut conn = tokio::time::timeout(
            UPKEEP_TIMEOUT,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        // Loaded now, so an admission is one round trip from the first.
        for s in [
            &self.scripts.admit,
            &self.scripts.release,
            &self.scripts.refresh,
            &self.scripts.register,
            &self.scripts.leave,
        ] {
            tokio::time::timeout(UPKEEP_TIMEOUT, s.prepare_invoke().load_async(&mut conn))
                .await
                .map_err(|_| "loading the scripts timed out".to_string())?
                .map_err(|e| e.to_string())?;
        }
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(Link { generation, conn });
        for round in 1.. {
            if !self.register().await {
                let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
                if conn.as_ref().is_some_and(|l| l.generation == generation) {
                    *conn = None;
                }
                return Err("registration failed".into());
            }
            let mut state = self.lock();
            // Sessions admitted alone while the registration was on its way are not in it:
            // register again. Under a steady stream of clients that may never end, so after a
            // few rounds the few missing ones go in at the next refresh.
            let missing = state.fallback_since_snapshot > 0;
            let current = self
                .conn
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_some_and(|l| l.generation == generation);
            if !current {
                // A release on it failed meanwhile: it is gone.
                return Err("the connection failed while registering".into());
            }
            if !missing || round == REGISTER_ROUNDS {
                state.dirty |= missing || std::mem::take(&mut state.unanswered);
                state.connected = true;
                self.connected.store(true, Ordering::Release);
                drop(state);
                self.series.connected.set(1.0);
                // A recovery is logged when the last line said Redis was lost: the last line
                // logged stays true, and a flapping Redis logs two lines a minute at most.
                if std::mem::take(
                    &mut self
                        .outages
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .said_down,
                ) {
                    tracing::info!(
                        redis = %redact(&self.config.redis),
                        instance = %self.config.instance,
                        "cluster: connected; limits are shared"
                    );
                } else {
                    tracing::debug!("cluster: connected again");
                }
                return Ok(());
            }
        }
        unreachable!("the rounds end with a connection")
    }

    /// Sends this instance's counts whole, in order with the releases; true once Redis took
    /// them.
    async fn register(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.lock();
            state.epoch += 1;
            state.fallback_since_snapshot = 0;
            state.dirty = false;
            let counts = state.counts.iter().map(|(k, n)| (k.clone(), *n)).collect();
            if self
                .writes
                .send(Write::Register(state.epoch, counts, tx))
                .is_err()
            {
                return false;
            }
        }
        rx.await.unwrap_or(false)
    }

    /// Renews the lease and reads the cluster's figures; registers again if the copy in Redis
    /// may have drifted.
    async fn refresh(&self) {
        let Some(Link {
            generation,
            mut conn,
        }) = self.link()
        else {
            return;
        };
        let mut call = self.scripts.refresh.prepare_invoke();
        call.arg(&self.prefix)
            .arg(&self.config.instance)
            .arg(self.config.lease_ttl.as_millis() as u64)
            .arg(&self.token);
        let answer = tokio::time::timeout(
            UPKEEP_TIMEOUT,
            call.invoke_async::<(i64, u64, u64, u64)>(&mut conn),
        )
        .await;
        match answer {
            Ok(Ok((1, connections, instances, warm))) => self.saw(connections, instances, warm),
            Ok(Ok(_)) => {
                return self.down(
                    generation,
                    "this instance's lease had ended; registering again",
                )
            }
            Ok(Err(e)) => return self.down(generation, &format!("lease refresh failed: {e}")),
            Err(_) => return self.down(generation, "no answer to a lease refresh"),
        }
        let dirty = std::mem::take(&mut self.lock().dirty);
        if dirty && !self.register().await {
            self.down(generation, "registration failed");
        }
    }

    /// The figures an upkeep script answered with; `warm` is what is left of the warm-up, in
    /// ms.
    fn saw(&self, connections: u64, instances: u64, warm: u64) {
        *self.warm_left.lock().unwrap_or_else(|e| e.into_inner()) = Duration::from_millis(warm);
        self.set_warming(warm > 0);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Seen {
            connections,
            instances,
        };
        self.series.connections.set(connections as f64);
        self.series.instances.set(instances as f64);
    }

    /// Sends one batch of releases.
    async fn release(&self, link: Link, keys: &[Arc<str>]) {
        let Link {
            generation,
            mut conn,
        } = link;
        let mut call = self.scripts.release.prepare_invoke();
        call.arg(&self.prefix)
            .arg(&self.config.instance)
            .arg(&self.token);
        for k in keys {
            call.arg(&**k);
        }
        let done = tokio::time::timeout(UPKEEP_TIMEOUT, call.invoke_async::<i64>(&mut conn)).await;
        match done {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => self.down(generation, &format!("release failed: {e}")),
            Err(_) => {
                self.lock().unanswered = true;
                self.down(generation, "no answer to a release");
            }
        }
    }

    /// Applies the ordered writes: releases in batches, registrations whole. With no
    /// connection, a release is dropped: the next registration sends the truth anyway.
    async fn writer(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Write>) {
        let mut next = None;
        loop {
            let write = match next.take() {
                Some(w) => w,
                None => tokio::select! {
                    biased;
                    () = self.stop.cancelled() => return,
                    w = rx.recv() => match w {
                        Some(w) => w,
                        None => return,
                    },
                },
            };
            let link = self.link();
            match write {
                Write::Release(mut keys) => {
                    let mut sessions = 1;
                    while keys.len() < RELEASE_BATCH {
                        match rx.try_recv() {
                            Ok(Write::Release(more)) => {
                                keys.extend(more);
                                sessions += 1;
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if let Some(link) = link {
                        self.release(link, &keys).await;
                    }
                    self.releases_done.fetch_add(sessions, Ordering::AcqRel);
                    self.flushed.notify_waiters();
                }
                Write::Register(epoch, counts, answer) => {
                    let Some(Link { mut conn, .. }) = link else {
                        let _ = answer.send(false);
                        continue;
                    };
                    let mut call = self.scripts.register.prepare_invoke();
                    call.arg(&self.prefix)
                        .arg(&self.config.instance)
                        .arg(self.config.lease_ttl.as_millis() as u64)
                        .arg(&self.token)
                        .arg(epoch);
                    for (k, n) in &counts {
                        call.arg(&**k).arg(*n);
                    }
                    let done = tokio::time::timeout(
                        UPKEEP_TIMEOUT,
                        call.invoke_async::<(i64, u64, u64, u64)>(&mut conn),
                    )
                    .await;
                    match done {
                        Ok(Ok((0, connections, instances, warm))) => {
                            self.saw(connections, instances, warm);
                            let _ = answer.send(true);
                        }
                        Ok(Ok((-1, ..))) => {
                            tracing::error!(
                                instance = %self.config.instance,
                                "cluster: another process holds a live lease under this instance name; \
                                 give every host its own cluster.instance. Deciding alone until it ends"
                            );
                            let _ = answer.send(false);
                        }
                        Ok(Ok(_)) => {
                            let _ = answer.send(false);
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "cluster: registration failed");
                            let _ = answer.send(false);
                        }
                        Err(_) => {
                            // It may still be applied late; the epoch makes Redis drop it then.
                            self.lock().unanswered = true;
                            let _ = answer.send(false);
                        }
                    }
                }
            }
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
mod tests {
    use super::*;

    async fn until(what: &str, ok: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "never {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A fresh redis-server and one instance connected to it, with a 3 s lease.
    async fn joined(
        fallback_share: f64,
        admission_timeout: Duration,
    ) -> Option<(script::tests::Server, Arc<Cluster>)> {
        let (server, url) = script::tests::server_url()?;
        let config = ClusterConfig {
            redis: url,
            name: "t".into(),
            instance: "a".into(),
            lease_ttl: Duration::from_secs(3),
            fallback_share,
            admission_timeout,
        };
        let cluster = Cluster::start(config, &Metrics::new());
        until("connected", || cluster.connected()).await;
        Some((server, cluster))
    }

    // One thread: the writer cannot run between a claim's drop and the next admission, so
    // the admission reaches Redis before the release, every round.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slot_freed_here_is_not_refused_to_the_next_client_by_its_release_on_the_way() {
        let Some((_server, cluster)) = joined(1.0, Duration::from_millis(500)).await else {
            return;
        };
        let ask = Ask {
            source: "192.0.2.1/32".parse().unwrap(),
            source_cap: None,
            network: None,
            global_cap: 3,
            enforce: true,
        };
        let mut held = Vec::new();
        for round in 0..23 {
            if held.len() == 3 {
                // The session ends; the next client comes at once.
                held.pop();
            }
            match cluster.admit(&ask).await {
                Verdict::Admitted(claim, None) => held.push(claim),
                Verdict::Admitted(_, Some(r)) | Verdict::Refused(r) => {
                    panic!("round {round}: {r:?} with {} held", held.len())
                }
            }
        }
        assert!(matches!(
            cluster.admit(&ask).await,
            Verdict::Refused(RejectReason::GlobalLimit)
        ));
        assert_eq!(cluster.local_sessions(), 3);
        cluster.abandon();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failure_on_an_older_connection_leaves_the_newer_one_up() {
        let Some((_server, cluster)) = joined(0.5, Duration::from_millis(50)).await else {
            return;
        };
        let first = cluster.link().unwrap().generation;
        cluster.down(first, "the first connection failed");
        assert!(!cluster.connected());
        until("connected again", || cluster.connected()).await;
        let second = cluster.link().unwrap().generation;
        assert_ne!(first, second);
        // An admission that was in flight on the first connection reports its failure late:
        // the second connection stands.
        cluster.down(first, "late news from the first connection");
        assert!(cluster.connected());
        assert_eq!(cluster.link().unwrap().generation, second);
        cluster.abandon();
    }

    #[test]
    fn a_fallback_share_rounds_down_but_keeps_a_slot() {
        assert_eq!(fallback_cap(10, 0.5), 5);
        assert_eq!(fallback_cap(3, 0.5), 1);
        assert_eq!(fallback_cap(1, 0.1), 1);
        assert_eq!(fallback_cap(0, 1.0), 0);
        assert_eq!(fallback_cap(1000, 1.0), 1000);
    }
}
