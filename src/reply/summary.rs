//! Rejection summaries: at most one log line per reason every [`SUMMARY_INTERVAL`], never one
//! per rejected connection, so a flood cannot flood the journal.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use ipnet::IpNet;

use crate::reason::RejectReason;

/// How often, at most, a reason's rejections are logged.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// How many distinct sources a summary window tracks to find the busiest.
const SUMMARY_SOURCES: usize = 4096;

/// Counts rejections per reason between two log lines, with the busiest source of each.
#[derive(Default)]
pub struct RejectSummary {
    /// Keyed by reason and whether it was a dry-run (would-be) rejection.
    windows: Mutex<HashMap<(RejectReason, bool), Window>>,
}

/// One reason's rejections over one window.
#[derive(Debug, PartialEq, Eq)]
pub struct SummaryLine {
    pub reason: RejectReason,
    pub dry_run: bool,
    pub count: u64,
    /// The source with the most rejections, and how many.
    pub busiest: Option<(IpNet, u64)>,
}

#[derive(Default)]
struct Window {
    count: u64,
    by_source: HashMap<IpNet, u64>,
}

impl RejectSummary {
    pub fn record(&self, reason: RejectReason, source: IpNet) {
        self.add(reason, false, source);
    }

    /// A rejection that dry-run mode only counted.
    pub fn record_dry_run(&self, reason: RejectReason, source: IpNet) {
        self.add(reason, true, source);
    }

    fn add(&self, reason: RejectReason, dry_run: bool, source: IpNet) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = windows.entry((reason, dry_run)).or_default();
        w.count += 1;
        let len = w.by_source.len();
        match w.by_source.get_mut(&source) {
            Some(n) => *n += 1,
            None if len < SUMMARY_SOURCES => {
                w.by_source.insert(source, 1);
            }
            None => {}
        }
    }

    /// Ends the current windows: one entry per reason seen since the last call.
    pub fn take(&self) -> Vec<SummaryLine> {
        let windows = std::mem::take(&mut *self.windows.lock().unwrap_or_else(|p| p.into_inner()));
        let mut lines: Vec<SummaryLine> = windows
            .into_iter()
            .map(|((reason, dry_run), w)| {
                let busiest = w
                    .by_source
                    .iter()
                    .max_by_key(|(_, n)| **n)
                    .map(|(s, n)| (*s, *n));
                SummaryLine {
                    reason,
                    dry_run,
                    count: w.count,
                    busiest,
                }
            })
            .collect();
        lines.sort_by_key(|l| (l.reason as usize, l.dry_run));
        lines
    }

    /// Logs one line per reason seen since the last flush, and starts new windows.
    pub fn flush(&self) {
        for l in self.take() {
            let (busiest, busiest_count) = l
                .busiest
                .map_or((String::from("-"), 0), |(s, n)| (display_source(&s), n));
            tracing::warn!(
                reason = %l.reason.label(),
                dry_run = l.dry_run,
                count = l.count,
                busiest_source = %busiest,
                busiest_count,
                window_secs = SUMMARY_INTERVAL.as_secs(),
                "connections rejected"
            );
        }
    }
}

/// A source as an operator reads it: a bare address for a full-length prefix.
pub fn display_source(s: &IpNet) -> String {
    if s.prefix_len() == s.max_prefix_len() {
        IpAddr::to_string(&s.addr())
    } else {
        s.to_string()
    }
}
