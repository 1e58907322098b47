//! The learned backend limit, for a backend with `max_connections = "auto"`: how many
//! sessions it takes before it says "busy" or slows down.
//!
//! Three signals move it, each per backend:
//! - **Over capacity**: a 4xx greeting, or a connect timeout. The limit is cut to a fraction
//!   ([`CUT`]) of the sessions the backend held at that moment, which is what it proved it can
//!   take, and never raised by it. Signals from one burst compound no further than that: the
//!   backend still holds about as many sessions, so the cut lands in the same place.
//! - **Greeting time** against the backend's own quiet-time baseline, as in a gradient
//!   controller. The baseline is the greeting time seen while the backend held at most half
//!   its limit (the lowest, or a slow average of such samples, so it follows a backend that
//!   became slower for good, but never under load). While the smoothed greeting time stays
//!   within [`TOLERANCE`] × baseline + [`SLACK`], the limit may grow; above it, the limit
//!   shrinks in proportion to how far above it is.
//! - **Success while full**: growth happens only when a session greeted with 220 while the
//!   limit was in use.
//!
//! Growth has two phases, as TCP's congestion window does:
//! - **Slow start**, below a threshold ([`LimitPhase::SlowStart`]): every session greeted while the
//!   limit is in use raises the limit by one, so the limit doubles per limit's worth of greeted
//!   sessions. From 5, a backend that takes 400 is reached in about seven limit's worths, a few
//!   session lengths, instead of the hundreds that one step per limit's worth would take. The
//!   threshold starts at the maximum: until the backend first signals, nothing is known about it,
//!   and each step is still one greeted session past the last.
//! - **Steady**, at or above the threshold: after a limit's worth of such sessions (additive,
//!   as TCP's congestion avoidance), one more session is let in as a probe, and the limit rises
//!   only once that probe is greeted. The limit in force is a number of sessions the backend
//!   has been seen to take. A limit nobody uses never creeps up.
//!
//! Any signal (a busy greeting, a connect timeout, a shrink for slow greetings) sets the
//! threshold to half the last good value: the sessions the backend held, or the limit before
//! the shrink, as TCP halves `ssthresh` on a loss. A cut lands at [`CUT`] of what was held,
//! above that half, so the limit goes on steadily; only a limit that later falls far below
//! what once worked grows fast again, and then only up to that half. Why the first overshoot
//! stays bounded: the limit grows by one per greeting, so when the backend says busy it is
//! past what the backend held by no more than the connects then on their way (each greeting
//! lets at most one more in), and the cut is anchored to what was held, not to the limit.
//!
//! - **A refusal is remembered**: for [`REFUSAL_MEMORY`] after a busy greeting, the limit does
//!   not probe past the number of sessions the backend held when it said busy; after that it
//!   may probe again, in case the backend's own limit was raised.
//!
//! Why it settles rather than oscillates: steady growth is slow (linear, and only when proven
//! useful), shrinking is proportional to the overload, the greeting time is smoothed, and a
//! cut is anchored to what the backend held, not to the limit. The limit ends just under the
//! point where the backend first says busy or its greeting time climbs, and each overshoot
//! costs one absorbed 4xx per limit's worth of sessions.
//!
//! What a restart keeps ([`Saved`]): the limit, the baseline and the threshold, so that a
//! restarted mxgate resumes where it was instead of climbing again (see
//! [`crate::backend::state`]).

use std::time::Duration;

/// An over-capacity signal cuts the limit to this share of the sessions the backend held.
pub const CUT: f64 = 0.9;
/// Greeting time up to this many times the baseline counts as "near the baseline" ...
pub const TOLERANCE: f64 = 2.0;
/// ... plus this much, so that a loopback baseline of a few µs does not make noise a signal.
pub const SLACK: Duration = Duration::from_millis(5);
/// Weight of a new greeting time in the smoothed one.
const SMOOTHING: f64 = 0.2;
/// Weight of a quiet-time sample in the baseline when it is above the baseline.
const BASELINE_DRIFT: f64 = 0.01;
/// The most one window of slow greetings can shrink the limit by.
const MAX_SHRINK: f64 = 0.1;
/// How long the count at which a backend said busy caps the limit's probing.
pub const REFUSAL_MEMORY: Duration = Duration::from_secs(30);

/// Why the limit moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// A 4xx greeting: the backend said it is full.
    Busy,
    /// A connect timed out.
    ConnectTimeout,
    /// Greeting time above the baseline's tolerance.
    SlowGreeting,
    /// Sessions succeeded with the limit in use and the greeting time near the baseline.
    Growth,
}

impl Why {
    pub fn label(self) -> &'static str {
        match self {
            Why::Busy => "busy_greeting",
            Why::ConnectTimeout => "connect_timeout",
            Why::SlowGreeting => "slow_greeting",
            Why::Growth => "growth",
        }
    }
}

/// How the limit grows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitPhase {
    /// Below the threshold: one more session per session greeted while the limit is in use.
    SlowStart,
    /// At or above it: one more per limit's worth of such sessions, after a greeted probe.
    Steady,
}

impl LimitPhase {
    pub fn label(self) -> &'static str {
        match self {
            LimitPhase::SlowStart => "slow start",
            LimitPhase::Steady => "steady",
        }
    }
}

/// What a restart keeps of a learned limit.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Saved {
    /// The limit in force.
    pub limit: usize,
    /// The quiet-time greeting time, seconds, once one was seen.
    pub baseline: Option<f64>,
    /// The phase, for the reader; the threshold below decides it.
    pub phase: LimitPhase,
    /// Fast growth up to here; `None` until the backend first signalled.
    pub threshold: Option<usize>,
}

/// What the backend just showed.
#[derive(Debug, Clone, Copy)]
pub enum Signal {
    /// A 4xx greeting, with the sessions the backend held besides the one it turned down.
    Busy { held: usize },
    /// A connect timeout, likewise.
    ConnectTimeout { held: usize },
    /// A 220 (or any non-4xx) greeting after `time`, with the sessions it now holds, this one
    /// included.
    Greeted { time: Duration, held: usize },
}

/// A move worth a log line: more than 10 % since the last one logged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Move {
    pub from: usize,
    pub to: usize,
    pub why: Why,
}

/// One backend's learned limit.
#[derive(Debug, Clone)]
pub struct Learned {
    limit: f64,
    min: f64,
    max: f64,
    /// Quiet-time greeting time, seconds.
    baseline: Option<f64>,
    /// Smoothed greeting time, seconds.
    recent: Option<f64>,
    /// Below this the limit grows fast (slow start); half the last good value after a signal.
    threshold: f64,
    /// Whether the limit was resumed from a restart's saved state.
    resumed: bool,
    /// Progress towards the next probe, in probes.
    credit: f64,
    /// One session past the limit may try: the limit rises if it is greeted.
    probe: bool,
    /// The sessions the backend held when it last said busy, and when: the limit does not
    /// probe past it for [`REFUSAL_MEMORY`].
    refused_at: Option<(usize, std::time::Instant)>,
    /// Greetings since the greeting time was last judged.
    window: usize,
    /// The limit last logged.
    logged: usize,
}

impl Learned {
    pub fn new(min: usize, max: usize, initial: usize) -> Learned {
        let (min, max) = (min.max(1), max.max(min.max(1)));
        let limit = initial.clamp(min, max);
        Learned {
            limit: limit as f64,
            min: min as f64,
            max: max as f64,
            baseline: None,
            recent: None,
            threshold: max as f64,
            resumed: false,
            credit: 0.0,
            probe: false,
            refused_at: None,
            window: 0,
            logged: limit,
        }
    }

    /// A limit resumed from what a restart kept, within `min..=max`. The saved limit was in
    /// force before the restart, so the backend has been seen to take it.
    pub fn resume(min: usize, max: usize, saved: &Saved) -> Learned {
        let mut learned = Learned::new(min, max, saved.limit);
        learned.baseline = saved.baseline.filter(|b| b.is_finite() && *b >= 0.0);
        if let Some(t) = saved.threshold {
            learned.threshold = (t as f64).clamp(1.0, learned.max);
        }
        learned.resumed = true;
        learned
    }

    /// What a restart keeps.
    pub fn saved(&self) -> Saved {
        Saved {
            limit: self.limit(),
            baseline: self.baseline,
            phase: self.phase(),
            threshold: (self.threshold < self.max).then_some(self.threshold as usize),
        }
    }

    /// New bounds at a reload; the learned value is kept, within them.
    pub fn rebound(&mut self, min: usize, max: usize) {
        let unsignalled = self.threshold >= self.max;
        self.min = min.max(1) as f64;
        self.max = (max as f64).max(self.min);
        self.limit = self.limit.clamp(self.min, self.max);
        // Nothing learned yet: slow start goes on to the new maximum.
        if unsignalled || self.threshold > self.max {
            self.threshold = self.max;
        }
    }

    /// How the limit grows now.
    pub fn phase(&self) -> LimitPhase {
        if self.limit < self.threshold {
            LimitPhase::SlowStart
        } else {
            LimitPhase::Steady
        }
    }

    /// Whether the limit was resumed from a restart's saved state.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The limit in force.
    pub fn limit(&self) -> usize {
        self.limit.floor() as usize
    }

    /// The sessions the backend may take now: the limit, and a probe past it when one is due.
    pub fn allowed(&self) -> usize {
        self.limit() + usize::from(self.probe)
    }

    /// Takes one signal in; a move of more than 10 % since the last one logged is returned.
    pub fn observe(&mut self, signal: Signal) -> Option<Move> {
        let why = match signal {
            Signal::Busy { held } => self.cut(held, Why::Busy),
            Signal::ConnectTimeout { held } => self.cut(held, Why::ConnectTimeout),
            Signal::Greeted { time, held } => self.greeted(time.as_secs_f64(), held),
        }?;
        let (from, to) = (self.logged, self.limit());
        if from.abs_diff(to) * 10 > from {
            self.logged = to;
            return Some(Move { from, to, why });
        }
        None
    }

    fn cut(&mut self, held: usize, why: Why) -> Option<Why> {
        self.probe = false;
        self.credit = 0.0;
        let now = std::time::Instant::now();
        let refused = match self.refused_at {
            Some((n, at)) if now.duration_since(at) < REFUSAL_MEMORY => n.min(held),
            _ => held,
        };
        self.refused_at = Some((refused, now));
        self.halve_threshold(held as f64);
        let target = (held as f64 * CUT).floor().max(self.min);
        (target < self.limit).then(|| {
            self.limit = target;
            why
        })
    }

    /// A signal: fast growth from now on only up to half of `good`, what last worked (as TCP
    /// sets `ssthresh` to half the window at each loss). The cut or shrink that comes with it
    /// leaves the limit above that half, so growth goes on steadily.
    fn halve_threshold(&mut self, good: f64) {
        self.threshold = (good / 2.0).floor().max(self.min);
    }

    fn greeted(&mut self, t: f64, held: usize) -> Option<Why> {
        let quiet = (held as f64) <= self.limit / 2.0;
        self.baseline = Some(match self.baseline {
            None => t,
            Some(b) if t < b => t,
            Some(b) if quiet => b + BASELINE_DRIFT * (t - b),
            Some(b) => b,
        });
        let recent = match self.recent {
            None => t,
            Some(r) => r + SMOOTHING * (t - r),
        };
        self.recent = Some(recent);
        let baseline = self.baseline.unwrap_or(t);
        let threshold = baseline * TOLERANCE + SLACK.as_secs_f64();
        // The greeting time is judged once per window of a limit's worth of greetings, so that
        // the sessions let in before a shrink, greeted after it, do not shrink it again.
        self.window += 1;
        if recent > threshold {
            self.probe = false;
            self.credit = 0.0;
            if (self.window as f64) < self.limit {
                return None;
            }
            self.window = 0;
            let gradient = threshold / recent;
            let shrunk = (self.limit * (1.0 - MAX_SHRINK * (1.0 - gradient))).max(self.min);
            self.halve_threshold(self.limit);
            let moved = shrunk < self.limit;
            self.limit = shrunk;
            return moved.then_some(Why::SlowGreeting);
        }
        // The probe was greeted: the backend takes one more. (A session that was let in
        // before a cut and greeted after it proves nothing new.)
        if self.probe && held > self.limit() {
            self.probe = false;
            self.limit = (self.limit() as f64 + 1.0).min(self.max);
            return Some(Why::Growth);
        }
        // Not past a count the backend recently turned away.
        let below_refusal = match self.refused_at {
            Some((n, at)) if at.elapsed() < REFUSAL_MEMORY => self.limit() < n,
            _ => true,
        };
        let in_use = held + 1 >= self.limit();
        // Slow start: every session greeted while the limit is in use earns one more.
        if self.limit < self.threshold && in_use && below_refusal {
            self.limit = (self.limit() as f64 + 1.0)
                .min(self.threshold)
                .min(self.max);
            self.probe = false;
            self.credit = 0.0;
            return Some(Why::Growth);
        }
        // In use: this session took one of the last slots.
        if in_use && self.limit < self.max && !self.probe && below_refusal {
            self.credit += 1.0 / self.limit;
            if self.credit >= 1.0 {
                self.credit = 0.0;
                self.probe = true;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests;
