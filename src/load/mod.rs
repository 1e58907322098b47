//! `mxgate load`: a load simulator that runs real SMTP transactions, so limits can be sized
//! from measurements instead of from users' complaints.
//!
//! Sessions arrive either closed loop (`--concurrency N` clients, each starting its next
//! session when the last ends) or open loop (`--rate R/s`, a Poisson schedule that does not
//! wait for the server: latency is measured from each session's scheduled start, so a server
//! that falls behind shows as latency instead of as a slower load). Each session binds a source
//! from `--sources` (so per-source limits apply as they would to many clients), runs
//! greeting → EHLO → MAIL → RCPT → DATA → QUIT with the envelope of `--from`/`--to`, and is
//! counted exactly once: delivered, refused at the greeting (by code and enhanced code),
//! refused later (by step and code), connect error or timeout (by step). Every run stops at
//! its session or duration bound, open-loop runs hold at most `max_in_flight` sessions, and
//! targets that are not loopback are refused unless `--allow-remote` is given.

pub mod plot;
pub mod profile;
pub mod ramp;
pub mod rng;
pub mod sink;
pub mod smtp;

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use ipnet::IpNet;
use tokio::time::Instant;

pub use ramp::{Ramp, RampReport};
pub use rng::Sizes;
pub use smtp::{Outcome, Transaction};

/// How long one SMTP step may take before the session counts as a timeout.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The most sessions an open-loop run holds at once; an arrival past it is not started and is
/// counted as a failure of the run (`not_started`). It bounds the descriptors and the memory a
/// stalled server can make the tool use.
pub const MAX_IN_FLIGHT: usize = 4096;

/// The open-loop rates the tool accepts, in sessions per second.
pub const RATES: std::ops::RangeInclusive<f64> = 0.001..=100_000.0;

/// The largest message the tool generates.
pub const MAX_MESSAGE: usize = 64 << 20;

// Past its bound, a run waits one step timeout (`Options::step`) for the sessions still under
// way; then they are cut and counted as timeouts (`end of run`). A run thus ends within its
// bound and one step timeout.

/// How often the open-session count is sampled, for the mean that checks Little's law.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// When a run ends.
#[derive(Clone, Copy, Debug)]
pub enum Bound {
    Sessions(u64),
    Duration(Duration),
}

/// How sessions arrive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arrivals {
    /// This many clients, each starting its next session when the last one ends.
    Closed(usize),
    /// Sessions started on a Poisson schedule at this rate per second, whatever the server does.
    Open(f64),
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub target: SocketAddr,
    /// Sources to bind, one address per session in turn; `None` lets the system choose.
    pub sources: Option<IpNet>,
    pub arrivals: Arrivals,
    pub bound: Bound,
    pub sizes: Sizes,
    pub transaction: Arc<Transaction>,
    /// Seeds the arrival schedule and the message sizes.
    pub seed: u64,
    /// Open loop: the most sessions held at once; an arrival past it is not started, and is
    /// counted as such.
    pub max_in_flight: usize,
    /// How long one SMTP step may take, and how long the run waits past its bound for the
    /// sessions still under way.
    pub step: Duration,
    /// Show progress on stderr (a bar on a terminal, plain lines otherwise).
    pub progress: bool,
}

impl Options {
    /// A closed-loop run of `concurrency` clients with 2 KiB messages and the default envelope.
    pub fn new(target: SocketAddr, concurrency: usize, bound: Bound) -> Options {
        Options {
            target,
            sources: None,
            arrivals: Arrivals::Closed(concurrency),
            bound,
            sizes: Sizes::Fixed(2048),
            transaction: Arc::default(),
            seed: 1,
            max_in_flight: MAX_IN_FLIGHT,
            step: STEP_TIMEOUT,
            progress: false,
        }
    }
}

/// Counts and latencies of one run.
pub struct Stats {
    pub delivered: u64,
    /// Refused at the greeting, by `CODE ENHANCED`.
    pub refused: BTreeMap<String, u64>,
    pub refused_later: u64,
    /// Refused after the greeting, by `STEP CODE ENHANCED` (or `STEP closed`).
    pub refused_later_by: BTreeMap<String, u64>,
    pub connect_errors: u64,
    /// Open loop: arrivals not started because `max_in_flight` sessions were already open.
    pub not_started: u64,
    pub timeouts: u64,
    /// Timeouts by the step that ran out of time.
    pub timeouts_by: BTreeMap<String, u64>,
    /// Scheduled start → greeting, µs.
    pub greeting: Histogram<u64>,
    /// Scheduled start → end of session, µs.
    pub session: Histogram<u64>,
    /// Connect → end of session, µs: how long the server held each.
    pub held: Histogram<u64>,
    /// Seconds the server held sessions, summed: with `elapsed`, the mean concurrency by
    /// Little's law.
    pub held_seconds: f64,
    /// The most sessions open at once.
    pub peak_concurrency: usize,
    /// The open-session count, sampled every 5 ms and averaged.
    pub sampled_concurrency: f64,
    /// The most sessions one source address had open at once, when `--sources` was given.
    pub per_source_peak: Option<usize>,
    /// The open-loop rate asked for.
    pub offered_rate: Option<f64>,
    /// Open loop: sessions the schedule started, over how long, and how many were delivered
    /// within that time (the rest were still under way, or waiting, when the schedule ended).
    pub arrivals: u64,
    pub window: Duration,
    pub delivered_in_window: u64,
    /// Message bytes sent, over every session that got as far as the message.
    pub bytes: u64,
    pub messages: u64,
    pub elapsed: Duration,
}

impl Stats {
    fn new() -> Stats {
        let h = || Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds");
        Stats {
            delivered: 0,
            refused: BTreeMap::new(),
            refused_later: 0,
            refused_later_by: BTreeMap::new(),
            connect_errors: 0,
            not_started: 0,
            timeouts: 0,
            timeouts_by: BTreeMap::new(),
            greeting: h(),
            session: h(),
            held: h(),
            held_seconds: 0.0,
            peak_concurrency: 0,
            sampled_concurrency: 0.0,
            per_source_peak: None,
            offered_rate: None,
            arrivals: 0,
            window: Duration::ZERO,
            delivered_in_window: 0,
            bytes: 0,
            messages: 0,
            elapsed: Duration::ZERO,
        }
    }

    fn record(&mut self, m: &smtp::Measured) {
        match &m.outcome {
            Outcome::Delivered => self.delivered += 1,
            Outcome::RefusedAtGreeting(k) => *self.refused.entry(k.clone()).or_default() += 1,
            Outcome::RefusedLater(k) => {
                self.refused_later += 1;
                *self.refused_later_by.entry(k.clone()).or_default() += 1;
            }
            Outcome::ConnectError => self.connect_errors += 1,
            Outcome::Timeout(step) => {
                self.timeouts += 1;
                *self.timeouts_by.entry(step.to_string()).or_default() += 1;
            }
        }
        if let Some(g) = m.greeting {
            self.greeting.saturating_record(g.as_micros() as u64);
        }
        self.session.saturating_record(m.session.as_micros() as u64);
        self.held.saturating_record(m.held.as_micros() as u64);
        self.held_seconds += m.held.as_secs_f64();
        if m.sent > 0 {
            self.bytes += m.sent;
            self.messages += 1;
        }
    }

    pub fn sessions(&self) -> u64 {
        self.delivered
            + self.refused.values().sum::<u64>()
            + self.refused_later
            + self.connect_errors
            + self.not_started
            + self.timeouts
    }

    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum::<u64>() + self.refused_later
    }

    /// Sessions that did not deliver: refusals, timeouts and connect errors.
    pub fn errors(&self) -> u64 {
        self.sessions() - self.delivered
    }

    /// [`Stats::errors`] as a fraction of the sessions.
    pub fn error_fraction(&self) -> f64 {
        self.errors() as f64 / self.sessions().max(1) as f64
    }

    pub fn sessions_per_second(&self) -> f64 {
        self.sessions() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn delivered_per_second(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Open loop: whether the server kept up with the arrivals. Delivered within the schedule's
    /// window, plus what a server that keeps up still holds at its end, must come to `share` of
    /// the arrivals; a server that falls behind leaves a backlog that only drains after the
    /// window. What it "still holds" is the arrival rate times its quick sessions' time (the
    /// 10th percentile held): a backlog lengthens the slow ones, never the quick ones, so a
    /// backlog cannot excuse itself.
    pub fn kept_up(&self, share: f64) -> bool {
        let window = self.window.as_secs_f64();
        if self.arrivals == 0 || window <= 0.0 {
            return false;
        }
        let quick = self.held.value_at_quantile(0.10) as f64 / 1e6;
        let held_at_end = self.arrivals as f64 / window * quick;
        self.delivered_in_window as f64 + held_at_end >= share * self.arrivals as f64
    }

    /// The mean concurrency by Little's law: arrival rate × mean time held, which over one run
    /// is the held time summed over the run's length.
    pub fn little_concurrency(&self) -> f64 {
        self.held_seconds / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `--json` object.
    pub fn to_json(&self) -> serde_json::Value {
        let pct = |h: &Histogram<u64>| {
            serde_json::json!({
                "p50": h.value_at_quantile(0.50),
                "p90": h.value_at_quantile(0.90),
                "p99": h.value_at_quantile(0.99),
                "max": h.max(),
            })
        };
        let round = |x: f64| (x * 10.0).round() / 10.0;
        serde_json::json!({
            "delivered": self.delivered,
            "refused": self.refused,
            "refused_later": self.refused_later,
            "refused_later_by": self.refused_later_by,
            "connect_errors": self.connect_errors,
            "not_started": self.not_started,
            "timeouts": self.timeouts,
            "timeouts_by": self.timeouts_by,
            "latency_us": { "greeting": pct(&self.greeting), "session": pct(&self.session) },
            "sessions_per_second": round(self.sessions_per_second()),
            "delivered_per_second": round(self.delivered_per_second()),
            "offered_rate": self.offered_rate,
            "arrivals": self.offered_rate.map(|_| self.arrivals),
            "delivered_in_window": self.offered_rate.map(|_| self.delivered_in_window),
            "concurrency": {
                "peak": self.peak_concurrency,
                "mean_sampled": round(self.sampled_concurrency),
                "mean_little": round(self.little_concurrency()),
                "per_source_peak": self.per_source_peak,
            },
            "mean_message_bytes": self.bytes.checked_div(self.messages),
        })
    }

    /// A short human-readable table.
    pub fn table(&self) -> String {
        let mut out = format!("{:<28}{:>10}\n", "delivered", self.delivered);
        for (k, n) in &self.refused {
            out += &format!("{:<28}{:>10}\n", format!("refused {k}"), n);
        }
        out += &format!("{:<28}{:>10}\n", "refused later", self.refused_later);
        for (k, n) in &self.refused_later_by {
            out += &format!("{:<28}{:>10}\n", format!("  at {k}"), n);
        }
        out += &format!("{:<28}{:>10}\n", "connect errors", self.connect_errors);
        if self.not_started > 0 {
            out += &format!(
                "{:<28}{:>10}  (the tool's own cap of sessions open at once)\n",
                "not started", self.not_started
            );
        }
        out += &format!("{:<28}{:>10}\n", "timeouts", self.timeouts);
        for (k, n) in &self.timeouts_by {
            out += &format!("{:<28}{:>10}\n", format!("  waiting for {k}"), n);
        }
        if let Some(rate) = self.offered_rate {
            out += &format!("{:<28}{:>10.1}\n", "offered sessions/s", rate);
        }
        out += &format!("{:<28}{:>10.1}\n", "sessions/s", self.sessions_per_second());
        out += &format!(
            "{:<28}{:>10.1}\n",
            "delivered/s",
            self.delivered_per_second()
        );
        out += &format!(
            "{:<28}{:>10}  (mean {:.1} sampled, {:.1} by Little's law)\n",
            "concurrency peak",
            self.peak_concurrency,
            self.sampled_concurrency,
            self.little_concurrency()
        );
        if let Some(p) = self.per_source_peak {
            out += &format!("{:<28}{:>10}\n", "busiest source peak", p);
        }
        for (name, h) in [
            ("greeting µs", &self.greeting),
            ("session µs", &self.session),
        ] {
            out += &format!(
                "{:<28}p50 {} p90 {} p99 {} max {}\n",
                name,
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99),
                h.max()
            );
        }
        out += &self.explain();
        out
    }

    /// Plain words for a run in which every session failed the same way at one step: the
    /// usual cause is the envelope, not the load.
    pub fn explain(&self) -> String {
        let sessions = self.sessions();
        if sessions == 0 || self.delivered > 0 || self.refused_later_by.len() != 1 {
            return String::new();
        }
        let (key, n) = self.refused_later_by.iter().next().expect("one entry");
        if *n != sessions {
            return String::new();
        }
        let step = key.split(' ').next().unwrap_or_default();
        let why = match step {
            "RCPT" => {
                "the server does not accept the recipient: give --to an address it takes (a \
                 mailbox of one of its accepted domains, or a journaling or discard address)"
            }
            "MAIL" if key.contains(" 530") => {
                "the server wants STARTTLS before mail, which mxgate load does not speak: \
                 load a receive connector that accepts mail without TLS"
            }
            "MAIL" => "the server does not accept the sender: give --from an address it takes",
            "EHLO" | "HELO" => {
                "the server does not accept the greeting name: give --ehlo one it takes"
            }
            _ => "the server refuses the transaction at this step",
        };
        format!("\nevery session ({n}) was refused at {key}: {why}.\n")
    }
}

/// Refuses targets that are not on this machine unless explicitly allowed.
pub fn check_target(target: SocketAddr, allow_remote: bool) -> Result<(), String> {
    if target.ip().to_canonical().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(format!(
            "{target} is not a loopback address; pass --allow-remote to load a server you own elsewhere"
        ))
    }
}

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
struct Shared {
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

impl Shared {
    fn new(opts: &Options) -> Arc<Shared> {
        let largest = match opts.sizes {
            Sizes::Fixed(n) => n,
            Sizes::LogNormal { mean } => (mean as f64 * rng::LOG_NORMAL_CAP) as usize,
        }
        .min(MAX_MESSAGE);
        Arc::new(Shared {
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
    let shared = Shared::new(opts);
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
async fn closed_loop(shared: &Arc<Shared>, n: usize, started: Instant) {
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
fn cut(shared: &Shared, n: u64) {
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
async fn open_loop(shared: &Arc<Shared>, rate: f64, started: Instant) {
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
fn spawn_sampler(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
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
fn spawn_progress(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_walk_the_network() {
        let net: IpNet = "127.0.0.0/30".parse().unwrap();
        let got: Vec<String> = (0..4).map(|i| nth_source(net, i).to_string()).collect();
        assert_eq!(got, ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.1"]);
        let one: IpNet = "127.0.0.9/32".parse().unwrap();
        assert_eq!(nth_source(one, 5).to_string(), "127.0.0.9");
    }

    #[test]
    fn remote_targets_need_permission() {
        assert!(check_target("127.0.0.1:25".parse().unwrap(), false).is_ok());
        assert!(check_target("[::1]:25".parse().unwrap(), false).is_ok());
        assert!(check_target("192.0.2.1:25".parse().unwrap(), false).is_err());
        assert!(check_target("192.0.2.1:25".parse().unwrap(), true).is_ok());
    }

    #[test]
    fn a_backlog_is_not_keeping_up() {
        let with = |arrivals, secs, delivered, held_ms: u64| {
            let mut s = Stats::new();
            s.arrivals = arrivals;
            s.window = Duration::from_secs(secs);
            s.delivered_in_window = delivered;
            for _ in 0..arrivals {
                s.held.record(held_ms * 1000).unwrap();
            }
            // A backlog makes the mean held time, and so Little's law, large.
            s.held_seconds = arrivals as f64 * 2.0;
            s.elapsed = s.window;
            s
        };
        // A server with 90 % of the capacity: 380 of 413 delivered in 8 s, 20 ms each.
        assert!(!with(413, 8, 380, 20).kept_up(0.95));
        // One that keeps up: 10 still held at the end of 3 s at 100/s of 100 ms.
        assert!(with(300, 3, 290, 100).kept_up(0.95));
        assert!(!with(0, 3, 0, 100).kept_up(0.95), "nothing arrived");
    }

    #[test]
    fn a_run_refused_at_one_step_is_explained() {
        let mut s = Stats::new();
        s.refused_later = 3;
        s.refused_later_by.insert("RCPT 550 5.7.54".into(), 3);
        let text = s.explain();
        assert!(
            text.contains("every session (3) was refused at RCPT 550 5.7.54"),
            "{text}"
        );
        assert!(text.contains("--to"), "{text}");
        s.delivered = 1;
        assert_eq!(s.explain(), "", "one delivered: the envelope works");
    }
}
