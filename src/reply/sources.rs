//! Who was refused: per-source refusal counts over the last minute, for the live view, and one
//! log line per refused source and reason at most once a [`LINE_INTERVAL`], for fail2ban.
//!
//! Recording only counts (under a short lock, no I/O), so the accept loop never writes to the
//! journal. The lines are written by [`SourceRefusals::flush`], which the housekeeping tick calls
//! every [`super::SUMMARY_INTERVAL`]: a source's first refusal is in the log within that, and
//! after it at most one line a minute carries the count since the previous one.
//!
//! The table holds at most [`MAX_SOURCES`] sources. Past it, a newcomer is left out of the
//! per-source lines and the view (the 10 s summaries still count it), and the next summary says
//! how many were left out: a flood from that many addresses is not one abusive source, and a
//! line per address would only flood the journal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::display_source;
use crate::reason::RejectReason;

/// At most one line per source and reason this often.
pub const LINE_INTERVAL: Duration = Duration::from_secs(60);
/// The sources tracked at once.
pub const MAX_SOURCES: usize = 10_000;
/// The view's minute is kept in this many buckets.
const BUCKETS: usize = 6;
/// Each bucket's span: [`BUCKETS`] of them make the minute.
const BUCKET: Duration = Duration::from_secs(10);

/// Refusals by source, for the view and the per-source lines.
pub struct SourceRefusals {
    table: Mutex<SourceTable>,
    /// Bucket numbers count from here.
    epoch: Instant,
}

#[derive(Default)]
struct SourceTable {
    sources: HashMap<IpNet, Vec<SourceCount>>,
    /// Newcomers not tracked because the table was full, since the last flush.
    untracked: u64,
}

/// One source's refusals for one reason.
struct SourceCount {
    reason: RejectReason,
    /// Refusals per bucket; `ring[b % BUCKETS]` holds bucket `b` when `stamp[..]` says so.
    ring: [u32; BUCKETS],
    stamp: [u64; BUCKETS],
    /// Refusals since the last line.
    pending: u64,
    /// When the last line was written.
    last_line: Option<Instant>,
}

/// One source as the view shows it: its refusals in the last minute, by reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub source: IpNet,
    pub total: u64,
    /// Most first.
    pub reasons: Vec<(RejectReason, u64)>,
}

/// One per-source log line.
#[derive(Debug, PartialEq, Eq)]
pub struct SourceLine {
    pub source: IpNet,
    pub reason: RejectReason,
    pub count: u64,
}

impl Default for SourceRefusals {
    fn default() -> Self {
        SourceRefusals {
            table: Mutex::default(),
            epoch: Instant::now(),
        }
    }
}

impl SourceCount {
    fn new(reason: RejectReason) -> SourceCount {
        SourceCount {
            reason,
            ring: [0; BUCKETS],
            stamp: [0; BUCKETS],
            pending: 0,
            last_line: None,
        }
    }

    fn add(&mut self, bucket: u64) {
        let i = (bucket % BUCKETS as u64) as usize;
        if self.stamp[i] != bucket {
            self.stamp[i] = bucket;
            self.ring[i] = 0;
        }
        self.ring[i] = self.ring[i].saturating_add(1);
        self.pending += 1;
    }

    /// Refusals in the buckets of the minute that ends with `bucket`.
    fn in_minute(&self, bucket: u64) -> u64 {
        (0..BUCKETS)
            .filter(|&i| self.stamp[i] + (BUCKETS as u64) > bucket && self.stamp[i] <= bucket)
            .map(|i| u64::from(self.ring[i]))
            .sum()
    }

    /// Whether a line is due at `now`: something to say, and the last line old enough.
    fn due(&self, now: Instant) -> bool {
        self.pending > 0
            && self
                .last_line
                .is_none_or(|t| now.duration_since(t) >= LINE_INTERVAL)
    }

    /// Nothing left that the view or the lines need: forgetting it changes nothing.
    fn spent(&self, now: Instant, bucket: u64) -> bool {
        self.pending == 0
            && self.in_minute(bucket) == 0
            && self
                .last_line
                .is_none_or(|t| now.duration_since(t) >= LINE_INTERVAL)
    }
}

impl SourceRefusals {
    fn bucket(&self, now: Instant) -> u64 {
        // Bucket 0 is never a real one, so an unset stamp never reads as current.
        (now.duration_since(self.epoch).as_secs() / BUCKET.as_secs()) + 1
    }

    pub fn record(&self, reason: RejectReason, source: IpNet) {
        self.record_at(reason, source, Instant::now());
    }

    pub fn record_at(&self, reason: RejectReason, source: IpNet, now: Instant) {
        let bucket = self.bucket(now);
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let full = t.sources.len() >= MAX_SOURCES;
        let tallies = match t.sources.get_mut(&source) {
            Some(v) => v,
            None if full => {
                t.untracked += 1;
                return;
            }
            None => t.sources.entry(source).or_default(),
        };
        match tallies.iter_mut().find(|x| x.reason == reason) {
            Some(x) => x.add(bucket),
            None => {
                let mut x = SourceCount::new(reason);
                x.add(bucket);
                tallies.push(x);
            }
        }
    }

    /// The `n` sources refused most in the last minute, most first.
    pub fn top(&self, n: usize) -> Vec<Refused> {
        self.top_at(n, Instant::now())
    }

    pub fn top_at(&self, n: usize, now: Instant) -> Vec<Refused> {
        let bucket = self.bucket(now);
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<Refused> = t
            .sources
            .iter()
            .filter_map(|(source, tallies)| {
                let mut reasons: Vec<(RejectReason, u64)> = tallies
                    .iter()
                    .map(|x| (x.reason, x.in_minute(bucket)))
                    .filter(|(_, n)| *n > 0)
                    .collect();
                reasons.sort_by(|a, b| b.1.cmp(&a.1).then((a.0 as usize).cmp(&(b.0 as usize))));
                let total = reasons.iter().map(|(_, n)| n).sum();
                (total > 0).then_some(Refused {
                    source: *source,
                    total,
                    reasons,
                })
            })
            .collect();
        drop(t);
        all.sort_by(|a, b| b.total.cmp(&a.total).then(a.source.cmp(&b.source)));
        all.truncate(n);
        all
    }

    /// Distinct sources refused in the last minute for something other than the deny list:
    /// the deny list's refusals are expected and say nothing about load or abuse.
    pub fn refused_sources(&self) -> usize {
        let bucket = self.bucket(Instant::now());
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.sources
            .values()
            .filter(|v| {
                v.iter()
                    .any(|x| x.reason != RejectReason::Denied && x.in_minute(bucket) > 0)
            })
            .count()
    }

    /// Takes the lines due at `now`, forgets what nobody needs any more, and says how many
    /// newcomers were left out since the last call.
    pub fn take_at(&self, now: Instant) -> (Vec<SourceLine>, u64) {
        let bucket = self.bucket(now);
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut lines = Vec::new();
        for (source, tallies) in t.sources.iter_mut() {
            for x in tallies.iter_mut().filter(|x| x.due(now)) {
                lines.push(SourceLine {
                    source: *source,
                    reason: x.reason,
                    count: x.pending,
                });
                x.pending = 0;
                x.last_line = Some(now);
            }
            tallies.retain(|x| !x.spent(now, bucket));
        }
        t.sources.retain(|_, v| !v.is_empty());
        let untracked = std::mem::take(&mut t.untracked);
        drop(t);
        lines.sort_by_key(|l| (l.source, l.reason as usize));
        (lines, untracked)
    }

    /// Writes the lines due now: `source refused source=ADDR reason=REASON count=N`, the line
    /// the shipped fail2ban filter reads.
    pub fn flush(&self) {
        let (lines, untracked) = self.take_at(Instant::now());
        for l in lines {
            tracing::warn!(
                source = %display_source(&l.source),
                reason = %l.reason.label(),
                count = l.count,
                window_secs = LINE_INTERVAL.as_secs(),
                "source refused"
            );
        }
        if untracked > 0 {
            tracing::warn!(
                untracked,
                max_sources = MAX_SOURCES,
                "refused sources past the per-source table: counted in the summaries only"
            );
        }
    }

    /// Sources tracked now (for tests of the bound).
    pub fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sources
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
