//! What a ramp is: `START..END[/STEP]` of concurrency or `START/s..END/s[/STEP]` of rate,
//! parsed and bounded, and the loads it steps through and bisects between.
//!
//! It owns the ramp's arithmetic only: it never runs a load or judges one, so the parse can be
//! checked before anything connects.

use crate::load::{Arrivals, RATES};

/// A ramp: `START..END[/STEP]` of concurrency, or `START/s..END/s[/STEP]` of arrival rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ramp {
    Concurrency {
        start: usize,
        end: usize,
        step: usize,
    },
    Rate {
        start: f64,
        end: f64,
        step: f64,
    },
}

impl std::str::FromStr for Ramp {
    type Err = String;

    fn from_str(s: &str) -> Result<Ramp, String> {
        let bad = || {
            format!(
                "invalid ramp {s:?}: expected START..END[/STEP] of concurrency, such as \
                 10..500/10, or START/s..END/s[/STEP] of sessions per second, such as 10/s..200/s/10"
            )
        };
        let (a, rest) = s.split_once("..").ok_or_else(bad)?;
        if let Some(start) = a.strip_suffix("/s") {
            let (end, step) = match rest.split_once("/s") {
                Some((end, tail)) => (end, tail.strip_prefix('/')),
                None => return Err(bad()),
            };
            let num = |t: &str| -> Result<f64, String> {
                let v: f64 = t.trim_end_matches("/s").parse().map_err(|_| bad())?;
                (v.is_finite() && v > 0.0).then_some(v).ok_or_else(bad)
            };
            let (start, end) = (num(start)?, num(end)?);
            let step = match step {
                Some(st) if !st.is_empty() => num(st)?,
                Some(_) => return Err(bad()),
                None => start,
            };
            if end < start || !RATES.contains(&end) || !RATES.contains(&start) {
                return Err(bad());
            }
            return Ramp::Rate { start, end, step }.checked(s);
        }
        let (b, step) = match rest.split_once('/') {
            Some((b, st)) => (b, st.parse().map_err(|_| bad())?),
            None => (rest, 0),
        };
        let (start, end): (usize, usize) =
            (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        let step = if step == 0 { start.max(1) } else { step };
        if start == 0 || end < start || end > MAX_CONCURRENCY {
            return Err(bad());
        }
        Ramp::Concurrency { start, end, step }.checked(s)
    }
}

/// The most steps a ramp may have, and the highest concurrency it may reach.
pub const MAX_STEPS: f64 = 1000.0;
pub const MAX_CONCURRENCY: usize = 100_000;

impl Ramp {
    /// The ramp, if it has at most [`MAX_STEPS`] steps.
    fn checked(self, text: &str) -> Result<Ramp, String> {
        let steps = match self {
            Ramp::Concurrency { start, end, step } => ((end - start) / step + 1) as f64,
            Ramp::Rate { start, end, step } => (end - start) / step + 1.0,
        };
        if steps > MAX_STEPS {
            return Err(format!(
                "ramp {text:?} has {steps:.0} steps; at most {MAX_STEPS} (take a larger STEP)"
            ));
        }
        Ok(self)
    }

    /// The highest concurrency a concurrency ramp reaches.
    pub fn max_concurrency(&self) -> Option<usize> {
        match *self {
            Ramp::Concurrency { end, .. } => Some(end),
            Ramp::Rate { .. } => None,
        }
    }

    pub(super) fn is_rate(&self) -> bool {
        matches!(self, Ramp::Rate { .. })
    }

    /// The loads the ramp steps through, in order.
    pub(super) fn loads(&self) -> Vec<f64> {
        match *self {
            Ramp::Concurrency { start, end, step } => {
                (start..=end).step_by(step).map(|c| c as f64).collect()
            }
            Ramp::Rate { start, end, step } => {
                let n = ((end - start) / step + 1e-9).floor() as usize;
                (0..=n).map(|k| start + k as f64 * step).collect()
            }
        }
    }

    /// The point halfway between two loads, or `None` when there is none left to try.
    pub(super) fn between(&self, good: f64, bad: f64) -> Option<f64> {
        let mid = if self.is_rate() {
            ((good + bad) / 2.0 * 10.0).round() / 10.0
        } else {
            ((good + bad) / 2.0).floor()
        };
        (mid > good && mid < bad).then_some(mid)
    }

    pub(super) fn arrivals(&self, load: f64) -> Arrivals {
        if self.is_rate() {
            Arrivals::Open(load)
        } else {
            Arrivals::Closed(load as usize)
        }
    }
}
