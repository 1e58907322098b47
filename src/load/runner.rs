//! The connection loop: runs sessions closed loop or open loop until the run's bound, binds
//! each to its source, counts the sessions open at once (overall, per source, sampled), and
//! hands every finished session to [`Stats`] exactly once.
//!
//! It must never run past its bound and one step timeout, nor hold more than `max_in_flight`
//! sessions open loop: a stalled server would otherwise make the tool itself the bottleneck.
//! Reporting is [`super::stats`]'s; the only output here is the progress on stderr.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tokio::time::Instant;

use super::{rng, smtp, Arrivals, Bound, Options, Outcome, Sizes, Stats, MAX_MESSAGE};

// Past its bound, a run waits one step timeout (`Options::step`) for the sessions still under
// way; then they are cut and counted as timeouts (`end of run`). A run thus ends within its
// bound and one step timeout.

/// How often the open-session count is sampled, for the mean that checks Little's law.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// The `i`-th source address of `net`, skipping the network address where there is room.
pub fn nth_source(net: IpNet, i: u64) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let size = 1u64 << (32 - n.prefix_len());
            let offset = if size > 2 {
                1 + i % (size - 1)
            } else {
                i % size
            };
            IpAddr::from(((u32::from(n.network()) as u64 + offset) as u32).to_be_bytes())
        }
        IpNet::V6(n) => {
            let bits = 128 - n.prefix_len() as u32;
            let size = if bits >= 64 { u64::MAX } else { 1u64 << bits };
            let offset = if size > 2 {
                1 + i % (size - 1)
            } else {
                i % size
            };
            IpAddr::from((u128::from(n.network()) + offset as u128).to_be_bytes())
        }
    }
}

/// What a run shares between its sessions.
struct RunShared {
    opts: Options,
    bodies: smtp::Bodies,
    stats: Mutex<Stats>,
    open: AtomicUsize,
    peak: AtomicUsize,
    /// Open sessions per source, when sources are bound.
    per_source: Option<Mutex<HashMap<IpAddr, usize>>>,
    per_source_peak: AtomicUsize,
    done: AtomicU64,
    /// Set while an open-loop schedule is still starting sessions.
    scheduling: std::sync::atomic::AtomicBool,
    delivered_in_window: AtomicU64,
    /// The open count summed over samples, and the number of samples.
    sampled_open: AtomicU64,
    samples: AtomicU64,
}

impl RunShared {
    fn new(opts: &Options) -> Arc<RunShared> {
        let largest = match opts.sizes {
            Sizes::Fixed(n) => n,
            Sizes::LogNormal { mean } => (mean as f64 * rng::LOG_NORMAL_CAP) as usize,
        }
        .min(MAX_MESSAGE);
        Arc::new(RunShared {
            opts: opts.clone(),
            bodies: smtp::Bodies::new(largest),
            stats: Mutex::new(Stats::new()),
            open: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            per_source: opts.sources.map(|_| Mutex::new(HashMap::new())),
            per_source_peak: AtomicUsize::new(0),
            done: AtomicU64::new(0),
            scheduling: std::sync::atomic::AtomicBool::new(false),
            delivered_in_window: AtomicU64::new(0),
            sampled_open: AtomicU64::new(0),
            samples: AtomicU64::new(0),
        })
    }

    /// Runs the `i`-th session, due at `scheduled`, and records it.
    async fn session(&self, i: u64, scheduled: Instant) {
        let o = &self.opts;
        let source = o.sources.map(|net| nth_source(net, i));
        let now = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.source_opened(source, 1);
        let size = o.sizes.size(o.seed, i);
        let m = smtp::session(smtp::Session {
            target: o.target,
            source,
            transaction: &o.transaction,
            index: i,
            body: self.bodies.get(size),
            scheduled,
            step: o.step,
        })
        .await;
        self.source_opened(source, -1);
        self.open.fetch_sub(1, Ordering::SeqCst);
        if m.outcome == Outcome::Delivered && self.scheduling.load(Ordering::SeqCst) {
            self.delivered_in_window.fetch_add(1, Ordering::SeqCst);
        }
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(&m);
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    fn source_opened(&self, source: Option<IpAddr>, by: isize) {
        let (Some(map), Some(ip)) = (&self.per_source, source) else {
            return;
        };
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_default();
        *n = n.saturating_add_signed(by);
        self.per_source_peak.fetch_max(*n, Ordering::SeqCst);
        if *n == 0 {
            map.remove(&ip);
        }
    }
}

/// Runs one load until its bound: closed or open loop, as `opts.arrivals` says.
pub async fn run(opts: &Options) -> Stats {
    let shared = RunShared::new(opts);
    let started = Instant::now();
    let progress = opts.progress.then(|| spawn_progress(shared.clone()));
    let sampler = spawn_sampler(shared.clone());
    match opts.arrivals {
        Arrivals::Closed(n) => closed_loop(&shared, n, started).await,
        Arrivals::Open(rate) => open_loop(&shared, rate, started).await,
    }
    let elapsed = started.elapsed();
    for task in [progress, Some(sampler)].into_iter().flatten() {
        task.abort();
    }
    let mut stats = std::mem::replace(
        &mut *shared.stats.lock().unwrap_or_else(|p| p.into_inner()),
        Stats::new(),
    );
    stats.elapsed = elapsed;
    stats.peak_concurrency = shared.peak.load(Ordering::SeqCst);
    stats.per_source_peak = opts
        .sources
        .map(|_| shared.per_source_peak.load(Ordering::SeqCst));
    let samples = shared.samples.load(Ordering::SeqCst);
    stats.sampled_concurrency = if samples == 0 {
        0.0
    } else {
        shared.sampled_open.load(Ordering::SeqCst) as f64 / samples as f64
    };
    if let Arrivals::Open(rate) = opts.arrivals {
        stats.offered_rate = Some(rate);
        stats.delivered_in_window = shared.delivered_in_window.load(Ordering::SeqCst);
    }
    stats
}

/// `n` clients in a loop: each starts its next session when its last one ends.
async fn closed_loop(shared: &Arc<RunShared>, n: usize, started: Instant) {
    let issued = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..n.max(1) {
        let (shared, issued) = (shared.clone(), issued.clone());
        workers.spawn(async move {
            loop {
                let i = issued.fetch_add(1, Ordering::Relaxed);
                let more = match shared.opts.bound {
                    Bound::Sessions(n) => i < n,
                    Bound::Duration(d) => started.elapsed() < d,
                };
                if !more {
                    return;
                }
                shared.session(i, Instant::now()).await;
            }
        });
    }
    if let Bound::Duration(d) = shared.opts.bound {
        let deadline = started + d + shared.opts.step;
        let all = async { while workers.join_next().await.is_some() {} };
        if tokio::time::timeout_at(deadline, all).await.is_err() {
            cut(shared, shared.open.load(Ordering::SeqCst) as u64);
            workers.abort_all();
        }
    }
    while workers.join_next().await.is_some() {}
}

/// Counts `n` sessions cut at the end of the run as timeouts.
fn cut(shared: &RunShared, n: u64) {
    if n == 0 {
        return;
    }
    let mut stats = shared.stats.lock().unwrap_or_else(|p| p.into_inner());
    stats.timeouts += n;
    *stats.timeouts_by.entry("end of run".into()).or_default() += n;
}

/// Sessions on a Poisson schedule at `rate` per second, started whether or not the server has
/// finished the earlier ones. Past `max_in_flight` open, an arrival is not started; past the
/// window and one step timeout, the sessions still under way are cut.
async fn open_loop(shared: &Arc<RunShared>, rate: f64, started: Instant) {
    let mut gaps = rng::Rng::new(shared.opts.seed);
    let slots = Arc::new(tokio::sync::Semaphore::new(
        shared.opts.max_in_flight.max(1),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    let mut due = started;
    let mut arrivals = 0;
    let mut not_started = 0;
    shared.scheduling.store(true, Ordering::SeqCst);
    let window_end = loop {
        let next = due + gaps.exponential_gap(rate);
        match shared.opts.bound {
            Bound::Sessions(n) if arrivals >= n => break due,
            Bound::Duration(d) if next - started >= d => break started + d,
            _ => {}
        }
        due = next;
        tokio::time::sleep_until(due).await;
        while tasks.try_join_next().is_some() {}
        arrivals += 1;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            not_started += 1;
            continue;
        };
        let (shared, i) = (shared.clone(), arrivals - 1);
        tasks.spawn(async move {
            let _slot = slot;
            shared.session(i, due).await;
        });
    };
    tokio::time::sleep_until(window_end).await;
    shared.scheduling.store(false, Ordering::SeqCst);
    {
        let mut stats = shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.arrivals = arrivals;
        stats.not_started = not_started;
        stats.window = window_end - started;
    }
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout_at(window_end + shared.opts.step, all)
        .await
        .is_err()
    {
        cut(shared, tasks.len() as u64);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Samples the open-session count every [`SAMPLE_EVERY`], for a mean measured independently of
/// Little's law.
fn spawn_sampler(shared: Arc<RunShared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let open = shared.open.load(Ordering::SeqCst) as u64;
            shared.sampled_open.fetch_add(open, Ordering::SeqCst);
            shared.samples.fetch_add(1, Ordering::SeqCst);
        }
    })
}

/// Progress on stderr: a bar on a terminal, a plain line every second otherwise.
fn spawn_progress(shared: Arc<RunShared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        let bound = shared.opts.bound;
        let total = match bound {
            Bound::Sessions(n) => n,
            Bound::Duration(d) => d.as_secs().max(1),
        };
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
                    .expect("a valid template"),
            );
            b
        });
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let (delivered, refused) = {
                let s = shared.stats.lock().unwrap_or_else(|p| p.into_inner());
                (s.delivered, s.refused_total())
            };
            let n = shared.done.load(Ordering::Relaxed);
            let open = shared.open.load(Ordering::Relaxed);
            let pos = match bound {
                Bound::Sessions(_) => n,
                Bound::Duration(_) => started.elapsed().as_secs(),
            };
            let msg = format!("delivered {delivered} refused {refused} open {open}");
            match &bar {
                Some(b) => {
                    b.set_position(pos.min(total));
                    b.set_message(msg);
                }
                None => eprintln!("progress: {n} sessions, {msg}"),
            }
        }
    })
}
