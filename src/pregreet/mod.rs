//! The pregreet test (Postfix postscreen's): bots that speak before the greeting never reach
//! the backend. This module owns the test's pieces and its cache; the session runs them
//! (`crate::session`'s `screen` phase) and `crate::reply` answers a failed client.
//!
//! ```text
//!  connect ──(allow-listed, off, cached pass)──────────────────────────▶ as before
//!     │
//!     ├─(cached fail: enforce/drop)──▶ refused at once (521, or the 550 dialogue)
//!     │
//!     ▼ per-source slots only: no global slot, no backend
//!  "220-{hostname} ESMTP" ── pregreet_wait (pregreet_wait_busy while anyone queues) ──┐
//!     │ spoke: fail                                                         quiet: goes on
//!     ▼                                                                                ▼
//!  ignore: served anyway · enforce: "220 {hostname} ESMTP", then 550s · drop: 521
//!                          global slot or the queue ─▶ backend greeting, rewritten to "220-…"/"220 …"
//!                          (spoke meanwhile: fail, as above; quiet until the greeting: pass)
//! ```
//!
//! After the teaser, a reply must stay valid: every later refusal completes the greeting
//! (`220 {hostname} ESMTP`) and answers the first command with its 421. A client that speaks
//! before the final line (while it waits in the queue or the backend greets) fails too, so a
//! pass is counted and cached only when the greeting ends.
//!
//! The cache ([`cache`]) is a verdict per address, kept in `state_dir` ([`store`]) and, with a
//! `[cluster]`, shared through Redis ([`shared`]). It lives in the server's shared state, not
//! in what a reload replaces: a reload keeps it.

pub mod cache;
mod shared;
pub mod store;

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

pub use cache::{Cache, Counts, Verdict, MAX_ENTRIES};

use ipnet::IpNet;

use crate::config::{Pregreet, PregreetConfig};
use crate::metrics::{Metrics, PregreetSeries};
use crate::reason::RejectReason;
use crate::reply::{SourceRefusals, LINE_INTERVAL, MAX_SOURCES};

/// `drop`'s answer, as postscreen sends it after its teaser, and a cached failure's greeting.
pub const DROP_LINE: &str = "521 5.5.1 Protocol error";
/// `enforce`'s answer to every command but QUIT.
pub const ENFORCE_LINE: &[u8] = b"550 5.5.1 Protocol error\r\n";
/// `enforce`'s answer to QUIT.
pub const BYE_LINE: &[u8] = b"221 2.0.0 Bye\r\n";
/// The most a backend's greeting may take for a rewrite; past it, it is no greeting.
pub const MAX_GREETING: usize = 16 * 1024;

/// The teaser: the first line of the multi-line greeting.
pub fn teaser(hostname: &str) -> Vec<u8> {
    format!("220-{hostname} ESMTP\r\n").into_bytes()
}

/// The final line that completes the greeting mxgate began, when the backend's is not to come.
pub fn completion(hostname: &str) -> Vec<u8> {
    format!("220 {hostname} ESMTP\r\n").into_bytes()
}

impl Pregreet {
    /// Whether a failure is answered by mxgate (and remembered), rather than only counted.
    pub fn refuses(self) -> bool {
        matches!(self, Pregreet::Enforce | Pregreet::Drop)
    }

    /// The value as the config spells it.
    pub fn name(self) -> &'static str {
        match self {
            Pregreet::Off => "off",
            Pregreet::Ignore => "ignore",
            Pregreet::Enforce => "enforce",
            Pregreet::Drop => "drop",
        }
    }
}

/// What the client did while it was watched.
#[derive(Debug, PartialEq, Eq)]
pub enum Watched {
    /// Nothing: it goes on, and passes if it stays quiet until its greeting ends.
    Quiet,
    /// It spoke; its bytes are in `early`.
    Talked,
    /// It closed or reset without a word.
    Gone,
}

/// Watches `client` for `wait`: whether it speaks before its turn. What it sends is kept in
/// `early` (at most `max` bytes), for the backend under `ignore` or for the 550 dialogue.
pub async fn watch(client: &TcpStream, wait: Duration, early: &mut Vec<u8>, max: usize) -> Watched {
    let listen = async {
        loop {
            if client.readable().await.is_err() {
                return Watched::Gone;
            }
            let mut buf = [0u8; 1024];
            let room = max.saturating_sub(early.len()).clamp(1, buf.len());
            match client.try_read(&mut buf[..room]) {
                Ok(0) => return Watched::Gone,
                Ok(n) => {
                    early.extend_from_slice(&buf[..n]);
                    return Watched::Talked;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Watched::Gone,
            }
        }
    };
    tokio::time::timeout(wait, listen)
        .await
        .unwrap_or(Watched::Quiet)
}

/// A backend's greeting made the last lines of the reply the teaser began.
#[derive(Debug, PartialEq, Eq)]
pub enum Rewrite {
    /// Every line `220-`, the last `220 `, then whatever came after it unchanged.
    Whole(Vec<u8>),
    /// A refusal (a 5xx, or a 4xx that reached here): it cannot end a `220-` reply, so it is
    /// kept whole, every line under its first line's code, to answer the client's commands.
    Refused(Vec<u8>),
    /// Its final line has not come yet.
    More,
    /// Not an SMTP reply (nor one that can be relayed as a refusal).
    Not,
}

/// Rewrites a backend's greeting to end the multi-line `220` reply mxgate began: each line's
/// code becomes `220`, and only the last keeps its own separator (RFC 5321 §4.2.1: one code
/// for all the lines of a reply). A 4xx or 5xx greeting is kept as its own reply instead,
/// each line's code made its first line's, so a multi-line one stays valid.
pub fn rewrite(greeting: &[u8]) -> Rewrite {
    let Some(&class) = greeting.first() else {
        return Rewrite::More;
    };
    if !matches!(class, b'2' | b'4' | b'5') {
        return Rewrite::Not;
    }
    let mut code = *b"220";
    let mut out = Vec::with_capacity(greeting.len());
    let mut rest = greeting;
    loop {
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return check_partial(greeting, rest, class);
        };
        let (line, after) = rest.split_at(end + 1);
        let Some(this) = line.get(..3).filter(|c| c.iter().all(u8::is_ascii_digit)) else {
            return Rewrite::Not;
        };
        if this[0] != class {
            return Rewrite::Not;
        }
        if class != b'2' && out.is_empty() {
            code.copy_from_slice(this);
        }
        out.extend_from_slice(&code);
        out.extend_from_slice(&line[3..]);
        if line.get(3) != Some(&b'-') {
            if class != b'2' {
                // Nothing after a refusal is the client's: the backend is done with it.
                return Rewrite::Refused(out);
            }
            out.extend_from_slice(after);
            return Rewrite::Whole(out);
        }
        rest = after;
    }
}

/// A greeting cut short: more to read, unless what came already says it is no reply of the
/// first line's class.
fn check_partial(whole: &[u8], rest: &[u8], class: u8) -> Rewrite {
    if whole.len() >= MAX_GREETING {
        return Rewrite::Not;
    }
    let bad = |(i, b): (usize, &u8)| match i {
        0 => *b != class,
        1 | 2 => !b.is_ascii_digit(),
        _ => false,
    };
    if rest.iter().enumerate().take(3).any(bad) {
        return Rewrite::Not;
    }
    Rewrite::More
}

/// Reads the rest of a backend's greeting until [`rewrite`] can decide, for at most `limit`.
/// `None` if the backend closed, failed or took too long first.
pub async fn read_greeting(
    backend: &TcpStream,
    first: Vec<u8>,
    limit: Duration,
) -> Option<Rewrite> {
    let mut got = first;
    let more = async {
        loop {
            match rewrite(&got) {
                Rewrite::More => {}
                done => return Some(done),
            }
            backend.readable().await.ok()?;
            let mut buf = [0u8; 4096];
            match backend.try_read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return None,
            }
        }
    };
    tokio::time::timeout(limit, more).await.ok().flatten()
}

/// The pregreet cache and counts of a running instance: in the server's shared state, so a
/// reload keeps them.
pub struct Screen {
    cache: Cache,
    shared: Option<shared::Shared>,
    series: PregreetSeries,
    keeper: Option<store::Keeper>,
    /// Failures served anyway (`ignore`), by source: one log line per source a minute at most,
    /// as the refusals' own lines are bounded; not refusals, so not in those lines' table.
    ignored: SourceRefusals,
    /// Clients under the test now: each holds a descriptor and no slot, so they are bounded
    /// ([`Screen::place`]).
    room: Arc<Room>,
}

/// The clients under the test now, and their gauge.
struct Room {
    testing: AtomicUsize,
    gauge: metrics::Gauge,
}

/// A client's place among those under the test, held from its triage until it goes on (to a
/// slot, the queue or its answer); shown in `mxgate_pregreet_testing`. One pointer: it rides
/// in every session task's first phase.
#[must_use = "dropping the place ends the client's test at once"]
pub struct Place(Arc<Room>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.testing.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.decrement(1.0);
    }
}

impl Screen {
    /// The cache, filled from `state_dir`'s file when there is one (with one warning if it
    /// cannot be used), and shared through `cluster`'s Redis when there is one.
    pub fn new(
        metrics: &Metrics,
        cluster: Option<Arc<crate::cluster::Cluster>>,
        state_dir: Option<&Path>,
    ) -> Screen {
        Screen::with_cache(
            metrics,
            cluster,
            state_dir,
            Cache::new(MAX_ENTRIES, cache::Clock::System),
        )
    }

    pub fn with_cache(
        metrics: &Metrics,
        cluster: Option<Arc<crate::cluster::Cluster>>,
        state_dir: Option<&Path>,
        cache: Cache,
    ) -> Screen {
        if let Some(dir) = state_dir {
            match store::load(dir, &cache) {
                Ok(0) => {}
                Ok(n) => tracing::info!(entries = n, "pregreet cache resumed"),
                Err(warning) => tracing::warn!("{warning}"),
            }
        }
        let screen = Screen {
            cache,
            shared: cluster.map(shared::Shared::new),
            series: metrics.pregreet(),
            keeper: state_dir.map(|d| store::Keeper::new(d.to_path_buf())),
            ignored: SourceRefusals::default(),
            room: Arc::new(Room {
                testing: AtomicUsize::new(0),
                gauge: metrics.pregreet_testing(),
            }),
        };
        screen.series.cache_entries.set(screen.cache.len() as f64);
        screen
    }

    /// A place under the test, while fewer than `max_clients` hold one; `None` when the room
    /// is full.
    pub fn place(&self, max_clients: usize) -> Option<Place> {
        self.room
            .testing
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_clients).then_some(n + 1)
            })
            .ok()?;
        self.room.gauge.increment(1.0);
        Some(Place(self.room.clone()))
    }

    /// Clients under the test now.
    pub fn testing(&self) -> usize {
        self.room.testing.load(Ordering::Acquire)
    }

    /// The local verdict on `ip`, counted as a cached result when there is one.
    pub fn known(&self, ip: IpAddr) -> Option<Verdict> {
        let verdict = self.cache.get(ip)?;
        self.count_cached(verdict);
        Some(verdict)
    }

    /// The cluster's verdict on `ip` after a local miss, kept locally and counted; `None`
    /// without a cluster, or when Redis has none or does not answer in time.
    pub async fn ask_cluster(&self, ip: IpAddr) -> Option<Verdict> {
        let shared = self.shared.as_ref()?;
        let entry = shared.get(ip, self.cache.now()).await?;
        self.cache.insert(ip, entry);
        self.series.cache_entries.set(self.cache.len() as f64);
        self.count_cached(entry.verdict);
        Some(entry.verdict)
    }

    fn count_cached(&self, verdict: Verdict) {
        match verdict {
            Verdict::Pass => self.series.cached_pass.increment(1),
            Verdict::Fail => self.series.cached_fail.increment(1),
        }
    }

    /// A client that stayed quiet until its greeting: counted, remembered for
    /// `pregreet_pass_ttl`, unless another connection from its address failed meanwhile: a
    /// failure stands for its `pregreet_fail_ttl`, or one patient connection of a bot would
    /// clear it for all the others.
    pub fn passed(&self, ip: IpAddr, config: &PregreetConfig) {
        self.series.pass.increment(1);
        if self.cache.get(ip) == Some(Verdict::Fail) {
            return;
        }
        self.remember(ip, Verdict::Pass, config.pass_ttl);
    }

    /// A client that spoke before its turn: counted, and remembered for `pregreet_fail_ttl`
    /// when it is refused for it. Under `ignore` it is served, tested again next time (as
    /// postscreen does), and its source (the key `source`) is in the next flush's lines.
    pub fn failed(&self, ip: IpAddr, config: &PregreetConfig, refused: bool, source: IpNet) {
        self.series.fail.increment(1);
        if refused {
            self.remember(ip, Verdict::Fail, config.fail_ttl);
        } else {
            self.ignored.record(RejectReason::Pregreet, source);
        }
    }

    /// Writes the lines due now for failures served anyway: `pregreet failure ignored
    /// source=ADDR reason=pregreet count=N`, one per source a minute at most. Info, not a
    /// warning, and not `source refused`: nobody was refused, and fail2ban must not ban for it.
    pub fn flush_ignored(&self) {
        let (lines, untracked) = self.ignored.take_at(std::time::Instant::now());
        for l in lines {
            tracing::info!(
                source = %crate::reply::display_source(&l.source),
                reason = %l.reason.label(),
                count = l.count,
                window_secs = LINE_INTERVAL.as_secs(),
                "pregreet failure ignored"
            );
        }
        if untracked > 0 {
            tracing::info!(
                untracked,
                max_sources = MAX_SOURCES,
                "pregreet failures ignored past the per-source table: counted in mxgate_pregreet_total only"
            );
        }
    }

    fn remember(&self, ip: IpAddr, verdict: Verdict, ttl: Duration) {
        let secs = ttl.as_secs();
        self.cache.put(ip, verdict, secs);
        self.series.cache_entries.set(self.cache.len() as f64);
        if let Some(shared) = &self.shared {
            shared.put(ip, verdict, secs);
        }
    }

    /// Sweeps expired entries and updates the entries gauge.
    pub fn sweep(&self) {
        self.cache.sweep();
        self.series.cache_entries.set(self.cache.len() as f64);
    }

    /// The live verdicts now, by kind.
    pub fn counts(&self) -> Counts {
        self.cache.counts()
    }

    /// Writes the cache to `state_dir` if it changed (blocking: call off the runtime's
    /// threads, or at shutdown).
    pub fn save(&self) {
        if let Some(keeper) = &self.keeper {
            keeper.keep(&self.cache);
        }
    }

    pub fn keeps_state(&self) -> bool {
        self.keeper.is_some()
    }
}

#[cfg(test)]
mod tests;
