//! `mxgate load`: a load simulator that runs real SMTP transactions, so limits can be sized
//! from measurements instead of from users' complaints.
//!
//! Each session binds a source from `--sources` (so per-source limits apply as they would to
//! many clients), runs greeting → EHLO → MAIL → RCPT → DATA → QUIT, and is counted exactly once:
//! delivered, refused at the greeting (by code and enhanced code), refused later, connect
//! error or timeout. Every run stops at its session or duration bound, and targets that are
//! not loopback are refused unless `--allow-remote` is given.

pub mod sink;
pub mod smtp;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use ipnet::IpNet;
use tokio::time::Instant;

pub use smtp::Outcome;

/// How long one SMTP step may take before the session counts as a timeout.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// When a run ends.
#[derive(Clone, Copy, Debug)]
pub enum Bound {
    Sessions(u64),
    Duration(Duration),
}

/// A concurrency ramp: `START..END/STEP`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ramp {
    pub start: usize,
    pub end: usize,
    pub step: usize,
}

impl std::str::FromStr for Ramp {
    type Err = String;

    fn from_str(s: &str) -> Result<Ramp, String> {
        let bad = || {
            format!(
                "invalid ramp {s:?}: expected START..END or START..END/STEP, such as 10..500/10"
            )
        };
        let (range, step) = match s.split_once('/') {
            Some((r, st)) => (r, st.parse().map_err(|_| bad())?),
            None => (s, 0),
        };
        let (a, b) = range.split_once("..").ok_or_else(bad)?;
        let (start, end): (usize, usize) =
            (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        let step = if step == 0 { start.max(1) } else { step };
        if start == 0 || end < start {
            return Err(bad());
        }
        Ok(Ramp { start, end, step })
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub target: SocketAddr,
    /// Sources to bind, one address per session in turn; `None` lets the system choose.
    pub sources: Option<IpNet>,
    pub concurrency: usize,
    pub bound: Bound,
    pub message_size: usize,
    /// Show progress on stderr (a bar on a terminal, plain lines otherwise).
    pub progress: bool,
}

/// Counts and latencies of one run.
pub struct Stats {
    pub delivered: u64,
    /// Refused at the greeting, by `CODE ENHANCED`.
    pub refused: BTreeMap<String, u64>,
    pub refused_later: u64,
    pub connect_errors: u64,
    pub timeouts: u64,
    /// Connect → greeting, µs.
    pub greeting: Histogram<u64>,
    /// Connect → end of session, µs.
    pub session: Histogram<u64>,
    pub elapsed: Duration,
}

impl Stats {
    fn new() -> Stats {
        let h = || Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds");
        Stats {
            delivered: 0,
            refused: BTreeMap::new(),
            refused_later: 0,
            connect_errors: 0,
            timeouts: 0,
            greeting: h(),
            session: h(),
            elapsed: Duration::ZERO,
        }
    }

    fn record(&mut self, m: &smtp::Measured) {
        match &m.outcome {
            Outcome::Delivered => self.delivered += 1,
            Outcome::RefusedAtGreeting(k) => *self.refused.entry(k.clone()).or_default() += 1,
            Outcome::RefusedLater => self.refused_later += 1,
            Outcome::ConnectError => self.connect_errors += 1,
            Outcome::Timeout => self.timeouts += 1,
        }
        if let Some(g) = m.greeting {
            self.greeting.saturating_record(g.as_micros() as u64);
        }
        self.session.saturating_record(m.session.as_micros() as u64);
    }

    pub fn sessions(&self) -> u64 {
        self.delivered
            + self.refused.values().sum::<u64>()
            + self.refused_later
            + self.connect_errors
            + self.timeouts
    }

    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum::<u64>() + self.refused_later
    }

    pub fn sessions_per_second(&self) -> f64 {
        self.sessions() as f64 / self.elapsed.as_secs_f64().max(1e-9)
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
        serde_json::json!({
            "delivered": self.delivered,
            "refused": self.refused,
            "refused_later": self.refused_later,
            "connect_errors": self.connect_errors,
            "timeouts": self.timeouts,
            "latency_us": { "greeting": pct(&self.greeting), "session": pct(&self.session) },
            "sessions_per_second": (self.sessions_per_second() * 10.0).round() / 10.0,
        })
    }

    /// A short human-readable table.
    pub fn table(&self) -> String {
        let mut out = format!("{:<24}{:>10}\n", "delivered", self.delivered);
        for (k, n) in &self.refused {
            out += &format!("{:<24}{:>10}\n", format!("refused {k}"), n);
        }
        out += &format!("{:<24}{:>10}\n", "refused later", self.refused_later);
        out += &format!("{:<24}{:>10}\n", "connect errors", self.connect_errors);
        out += &format!("{:<24}{:>10}\n", "timeouts", self.timeouts);
        out += &format!("{:<24}{:>10.1}\n", "sessions/s", self.sessions_per_second());
        for (name, h) in [
            ("greeting µs", &self.greeting),
            ("session µs", &self.session),
        ] {
            out += &format!(
                "{:<24}p50 {} p90 {} p99 {} max {}\n",
                name,
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99),
                h.max()
            );
        }
        out
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
fn nth_source(net: IpNet, i: u64) -> IpAddr {
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

/// Runs one load at a fixed concurrency until its bound.
pub async fn run(opts: &Options) -> Stats {
    let message: Arc<[u8]> = smtp::message(opts.message_size).into();
    let stats = Arc::new(Mutex::new(Stats::new()));
    let started = Instant::now();
    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let progress = opts
        .progress
        .then(|| spawn_progress(opts.bound, done.clone(), stats.clone()));
    let mut workers = Vec::with_capacity(opts.concurrency);
    for _ in 0..opts.concurrency.max(1) {
        let (message, stats, issued, done) =
            (message.clone(), stats.clone(), issued.clone(), done.clone());
        let opts = opts.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let i = issued.fetch_add(1, Ordering::Relaxed);
                let more = match opts.bound {
                    Bound::Sessions(n) => i < n,
                    Bound::Duration(d) => started.elapsed() < d,
                };
                if !more {
                    return;
                }
                let source = opts.sources.map(|net| nth_source(net, i));
                let m = smtp::session(opts.target, source, &message, STEP_TIMEOUT).await;
                stats.lock().unwrap_or_else(|p| p.into_inner()).record(&m);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    if let Some(p) = progress {
        p.abort();
        let _ = p.await;
    }
    let mut stats = Arc::try_unwrap(stats)
        .ok()
        .expect("every worker has finished")
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    stats.elapsed = started.elapsed();
    stats
}

/// Progress on stderr: a bar on a terminal, a plain line every second otherwise.
fn spawn_progress(
    bound: Bound,
    done: Arc<AtomicU64>,
    stats: Arc<Mutex<Stats>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
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
                let s = stats.lock().unwrap_or_else(|p| p.into_inner());
                (s.delivered, s.refused_total())
            };
            let n = done.load(Ordering::Relaxed);
            let pos = match bound {
                Bound::Sessions(_) => n,
                Bound::Duration(_) => started.elapsed().as_secs(),
            };
            let msg = format!("delivered {delivered} refused {refused}");
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

/// One step of a ramp.
pub struct Step {
    pub concurrency: usize,
    pub stats: Stats,
}

/// A ramp's steps, where it stopped, and what it recommends.
pub struct RampReport {
    pub steps: Vec<Step>,
    /// The first step where refusals appeared or p99 doubled, if any.
    pub knee: Option<usize>,
    pub max_connections: usize,
    pub max_per_source: usize,
    pub reasoning: String,
}

/// Steps the concurrency up and stops at the knee.
pub async fn ramp(base: &Options, ramp: Ramp) -> RampReport {
    let mut steps: Vec<Step> = Vec::new();
    let mut knee = None;
    let mut c = ramp.start;
    while c <= ramp.end {
        let opts = Options {
            concurrency: c,
            ..base.clone()
        };
        let stats = run(&opts).await;
        let baseline = steps
            .first()
            .map(|s| s.stats.session.value_at_quantile(0.99));
        let p99 = stats.session.value_at_quantile(0.99);
        let refused = stats.refused_total() + stats.timeouts + stats.connect_errors > 0;
        let slow = baseline.is_some_and(|b| p99 > 2 * b.max(1));
        if base.progress {
            let rate = stats.delivered as f64 / stats.elapsed.as_secs_f64().max(1e-9);
            let refused = stats.refused_total();
            eprintln!(
                "ramp: concurrency {c}: {rate:.1} delivered/s, {refused} refused, p99 {p99} µs"
            );
        }
        steps.push(Step {
            concurrency: c,
            stats,
        });
        if refused || slow {
            knee = Some(c);
            break;
        }
        c += ramp.step;
    }
    let good = steps
        .iter()
        .rev()
        .find(|s| Some(s.concurrency) != knee)
        .map_or(ramp.start, |s| s.concurrency);
    let sources = base.sources.map_or(1, |n| match n {
        IpNet::V4(v) => (1u64 << (32 - v.prefix_len())).min(good as u64) as usize,
        IpNet::V6(_) => good,
    });
    let per_source = good.div_ceil(sources.max(1)).max(1);
    let reasoning = match knee {
        Some(k) => format!(
            "Concurrency {good} was the highest step that ran without refusals, timeouts or a doubled \
             p99 session latency; at {k} the target began to refuse or slow down, so it is the knee. \
             Set max_connections to {good}, so mxgate answers 421 itself before the server degrades. \
             The load used {sources} source address(es), so each needed at most {per_source} \
             concurrent sessions: set max_per_source to {per_source}, and raise it for known bulk \
             senders with a [[network]] rule rather than for everyone."
        ),
        None => format!(
            "No knee up to concurrency {good}: every step ran without refusals and p99 stayed within \
             twice the first step's. max_connections = {good} is safe as far as measured; ramp higher \
             to find the real limit. With {sources} source address(es), max_per_source = {per_source}."
        ),
    };
    RampReport {
        steps,
        knee,
        max_connections: good,
        max_per_source: per_source,
        reasoning,
    }
}

impl RampReport {
    /// The ramp as the operator reads it: a table and the recommendation, or one JSON object.
    pub fn render(&self, json: bool) -> String {
        if json {
            let steps: Vec<_> = self
                .steps
                .iter()
                .map(|s| serde_json::json!({"concurrency": s.concurrency, "summary": s.stats.to_json()}))
                .collect();
            let out = serde_json::json!({
                "steps": steps,
                "knee": self.knee,
                "recommended": {
                    "max_connections": self.max_connections,
                    "max_per_source": self.max_per_source,
                },
                "reasoning": self.reasoning,
            });
            return format!("{out}\n");
        }
        let mut out = format!(
            "{:>12}{:>16}{:>10}{:>14}\n",
            "concurrency", "delivered/s", "refused", "p99 µs"
        );
        for s in &self.steps {
            let rate = s.stats.delivered as f64 / s.stats.elapsed.as_secs_f64().max(1e-9);
            out += &format!(
                "{:>12}{:>16.1}{:>10}{:>14}\n",
                s.concurrency,
                rate,
                s.stats.refused_total(),
                s.stats.session.value_at_quantile(0.99)
            );
        }
        out += &format!(
            "\nrecommended: max_connections = {}, max_per_source = {}\n\n{}\n",
            self.max_connections, self.max_per_source, self.reasoning
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramps_parse() {
        assert_eq!(
            "10..500/10".parse::<Ramp>().unwrap(),
            Ramp {
                start: 10,
                end: 500,
                step: 10
            }
        );
        assert_eq!(
            "5..20".parse::<Ramp>().unwrap(),
            Ramp {
                start: 5,
                end: 20,
                step: 5
            }
        );
        for bad in ["", "10", "0..5", "9..3", "a..b/1"] {
            assert!(bad.parse::<Ramp>().is_err(), "{bad:?}");
        }
    }

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
}
