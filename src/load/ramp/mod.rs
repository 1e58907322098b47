//! `mxgate load --ramp`: steps the load up (concurrency, or an open-loop rate) until the knee,
//! bisects between the last good step and the first bad one, and recommends `max_connections`
//! from the refined point.
//!
//! A step is bad when more of its sessions fail than `--max-errors` allows, or when its
//! delivered rate stops growing: under [`FLAT_GAIN`] more than the last good step, or under
//! half the step's own increase in load where that is the smaller (so small steps at high load
//! are not taken for a plateau), or falling. It gives no `max_per_source` advice: a ramp's
//! sources are the tool's own, so nothing it measures says what one real sender needs.

mod report;
mod spec;

use report::recommend;
pub use spec::{Ramp, MAX_CONCURRENCY, MAX_STEPS};

use super::{run, Bound, Options, Stats};

/// Below this gain in delivered/s from the last good step, a step counts as flat.
pub const FLAT_GAIN: f64 = 0.05;
/// Rounds of bisection between the last good step and the first bad one.
pub const BISECT_ROUNDS: usize = 3;

/// Whether a point ran well, judged against the last good one.
#[derive(Clone, Debug, PartialEq)]
pub enum StepVerdict {
    Good,
    /// Failed sessions over the tolerance: the fraction.
    Errors(f64),
    /// Delivered/s grew less than it had to, or fell: the gain over the last good point.
    Flat(f64),
    /// No session ran at all.
    Empty,
}

/// Judges `stats` at `load` against the last good point.
pub fn verdict(
    stats: &Stats,
    load: f64,
    last: Option<(f64, &Stats)>,
    max_errors: f64,
) -> StepVerdict {
    if stats.sessions() == 0 {
        return StepVerdict::Empty;
    }
    let errors = stats.error_fraction();
    if errors > max_errors {
        return StepVerdict::Errors(errors);
    }
    let Some((prev_load, prev)) = last else {
        return StepVerdict::Good;
    };
    let gain = stats.delivered_per_second() / prev.delivered_per_second().max(1e-9) - 1.0;
    let needed = FLAT_GAIN.min((load / prev_load - 1.0) / 2.0);
    if gain < needed {
        StepVerdict::Flat(gain)
    } else {
        StepVerdict::Good
    }
}

/// One point the ramp ran.
pub struct Point {
    pub load: f64,
    /// A step of the ramp, or a bisection round.
    pub bisect: bool,
    pub verdict: StepVerdict,
    pub stats: Stats,
}

/// A ramp's points, where it turned, and what it recommends.
pub struct RampReport {
    pub rate: bool,
    pub points: Vec<Point>,
    /// The lowest load found bad: the knee.
    pub knee: Option<f64>,
    /// The highest load found good.
    pub last_good: Option<f64>,
    pub max_connections: Option<usize>,
    pub reasoning: String,
}

/// Steps the load up to the knee, then bisects.
pub async fn ramp(base: &Options, ramp: Ramp, max_errors: f64) -> RampReport {
    let mut search = Search {
        base,
        ramp,
        max_errors,
        points: Vec::new(),
        good: None,
        bad: None,
    };
    for load in ramp.loads() {
        if !search.try_load(load, false).await {
            break;
        }
    }
    if search.good.is_some() && search.bad.is_some() {
        for _ in 0..BISECT_ROUNDS {
            let g = search.points[search.good.unwrap()].load;
            let b = search.points[search.bad.unwrap()].load;
            let Some(mid) = ramp.between(g, b) else { break };
            search.try_load(mid, true).await;
        }
    }
    recommend(ramp, search.points, search.good, search.bad, max_errors)
}

/// A ramp under way: every point measured, and the best good and first bad among them.
struct Search<'a> {
    base: &'a Options,
    ramp: Ramp,
    max_errors: f64,
    points: Vec<Point>,
    good: Option<usize>,
    bad: Option<usize>,
}

impl Search<'_> {
    /// Measures one load (a step, or a bisection between the good and the bad), judges it
    /// against the last good point, and records it; says whether it was good.
    async fn try_load(&mut self, load: f64, bisect: bool) -> bool {
        let opts = Options {
            arrivals: self.ramp.arrivals(load),
            ..self.base.clone()
        };
        let stats = run(&opts).await;
        let last = self
            .good
            .map(|g| (self.points[g].load, &self.points[g].stats));
        let v = verdict(&stats, load, last, self.max_errors);
        progress(self.base, self.ramp, load, bisect, &stats, &v);
        let ok = v == StepVerdict::Good;
        self.points.push(Point {
            load,
            bisect,
            verdict: v,
            stats,
        });
        if ok {
            self.good = Some(self.points.len() - 1);
        } else {
            self.bad = Some(self.points.len() - 1);
        }
        ok
    }
}

fn progress(base: &Options, ramp: Ramp, load: f64, bisect: bool, stats: &Stats, v: &StepVerdict) {
    if !base.progress {
        return;
    }
    let what = if ramp.is_rate() {
        "rate"
    } else {
        "concurrency"
    };
    let phase = if bisect { "bisect" } else { "step" };
    eprintln!(
        "ramp {phase}: {what} {load}: {:.1} delivered/s, {:.1} % errors, p99 {} µs: {v:?}",
        stats.delivered_per_second(),
        stats.error_fraction() * 100.0,
        stats.session.value_at_quantile(0.99)
    );
}

/// A run bound per step, for a ramp given neither `--sessions` nor `--duration`.
pub const DEFAULT_STEP: Bound = Bound::Duration(std::time::Duration::from_secs(5));

#[cfg(test)]
mod tests;
