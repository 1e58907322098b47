//! The counts and latencies of one run, and how they read: the derived rates, the `--json`
//! object, the table and the plain-words explanation of a run that failed at one step.
//!
//! It owns the arithmetic of a finished run only; it never opens a connection, reads a clock
//! or prints, so every rendering of the same counts is the same text.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::smtp::{self, Outcome};

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
    pub(super) fn new() -> Stats {
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

    pub(super) fn record(&mut self, m: &smtp::Measured) {
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
