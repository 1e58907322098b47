//! `mxgate load --ramp`: steps the load up (concurrency, or an open-loop rate) until the knee,
//! bisects between the last good step and the first bad one, and recommends `max_connections`
//! from the refined point.
//!
//! A step is bad when more of its sessions fail than `--max-errors` allows, or when its
//! delivered rate stops growing: under [`FLAT_GAIN`] more than the last good step, or under
//! half the step's own increase in load where that is the smaller (so small steps at high load
//! are not taken for a plateau), or falling. It gives no `max_per_source` advice: a ramp's
//! sources are the tool's own, so nothing it measures says what one real sender needs.

use super::{run, Arrivals, Bound, Options, Stats};

/// Below this gain in delivered/s from the last good step, a step counts as flat.
pub const FLAT_GAIN: f64 = 0.05;
/// Rounds of bisection between the last good step and the first bad one.
pub const BISECT_ROUNDS: usize = 3;
/// The default `--max-errors`.
pub const DEFAULT_MAX_ERRORS: f64 = 0.01;

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
            if end < start || !super::RATES.contains(&end) || !super::RATES.contains(&start) {
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

    fn is_rate(&self) -> bool {
        matches!(self, Ramp::Rate { .. })
    }

    /// The loads the ramp steps through, in order.
    fn loads(&self) -> Vec<f64> {
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
    fn between(&self, good: f64, bad: f64) -> Option<f64> {
        let mid = if self.is_rate() {
            ((good + bad) / 2.0 * 10.0).round() / 10.0
        } else {
            ((good + bad) / 2.0).floor()
        };
        (mid > good && mid < bad).then_some(mid)
    }

    fn arrivals(&self, load: f64) -> Arrivals {
        if self.is_rate() {
            Arrivals::Open(load)
        } else {
            Arrivals::Closed(load as usize)
        }
    }
}

/// Whether a point ran well, judged against the last good one.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Good,
    /// Failed sessions over the tolerance: the fraction.
    Errors(f64),
    /// Delivered/s grew less than it had to, or fell: the gain over the last good point.
    Flat(f64),
    /// No session ran at all.
    Empty,
}

/// Judges `stats` at `load` against the last good point.
pub fn verdict(stats: &Stats, load: f64, last: Option<(f64, &Stats)>, max_errors: f64) -> Verdict {
    if stats.sessions() == 0 {
        return Verdict::Empty;
    }
    let errors = stats.error_fraction();
    if errors > max_errors {
        return Verdict::Errors(errors);
    }
    let Some((prev_load, prev)) = last else {
        return Verdict::Good;
    };
    let gain = stats.delivered_per_second() / prev.delivered_per_second().max(1e-9) - 1.0;
    let needed = FLAT_GAIN.min((load / prev_load - 1.0) / 2.0);
    if gain < needed {
        Verdict::Flat(gain)
    } else {
        Verdict::Good
    }
}

/// One point the ramp ran.
pub struct Point {
    pub load: f64,
    /// A step of the ramp, or a bisection round.
    pub bisect: bool,
    pub verdict: Verdict,
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
        let ok = v == Verdict::Good;
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

fn progress(base: &Options, ramp: Ramp, load: f64, bisect: bool, stats: &Stats, v: &Verdict) {
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

fn recommend(
    ramp: Ramp,
    points: Vec<Point>,
    good: Option<usize>,
    bad: Option<usize>,
    max_errors: f64,
) -> RampReport {
    let what = if ramp.is_rate() {
        "sessions per second"
    } else {
        "concurrency"
    };
    let knee = bad.map(|b| points[b].load);
    let last_good = good.map(|g| points[g].load);
    let cause = bad.map(|b| match points[b].verdict {
        Verdict::Errors(f) => format!(
            "{:.1} % of its sessions failed (refused, timed out or not connected; --max-errors allows {:.1} %)",
            f * 100.0,
            max_errors * 100.0
        ),
        Verdict::Flat(g) if g < 0.0 => format!("its delivered rate fell ({:+.1} %)", g * 100.0),
        Verdict::Flat(g) => format!("its delivered rate grew only {:+.1} %", g * 100.0),
        Verdict::Empty => "no session ran in the step (lengthen --duration)".to_string(),
        Verdict::Good => unreachable!("a bad point"),
    });
    let (max_connections, reasoning) = match (good, knee, cause) {
        (None, _, cause) => (
            None,
            format!(
                "The first step already failed: {}. Start the ramp lower, or check the \
                 envelope (--from, --to) and the target.",
                cause.unwrap_or_default()
            ),
        ),
        (Some(g), Some(k), Some(cause)) => {
            let p = &points[g];
            let (limit, from) = limit_at(ramp, p);
            (
                Some(limit),
                format!(
                    "At {what} {k}, {cause}, so that is the knee; {what} {} was the highest that \
                     ran well ({:.1} delivered/s, p99 {} ms).{from} Set max_connections to \
                     {limit}: past it mxgate queues or answers 421 itself, instead of handing \
                     the server more than it can deliver.",
                    p.load,
                    p.stats.delivered_per_second(),
                    p.stats.session.value_at_quantile(0.99) / 1000
                ),
            )
        }
        (Some(g), _, _) => {
            let p = &points[g];
            let (limit, from) = limit_at(ramp, p);
            (
                Some(limit),
                format!(
                    "No knee up to {what} {}: no step failed or stopped growing.{from} max_connections = {limit} is safe as far as \
                     measured; ramp higher to find the real limit.",
                    p.load
                ),
            )
        }
    };
    RampReport {
        rate: ramp.is_rate(),
        points,
        knee,
        last_good,
        max_connections,
        reasoning,
    }
}

/// The limit a good point supports, and where it comes from.
fn limit_at(ramp: Ramp, p: &Point) -> (usize, String) {
    if ramp.is_rate() {
        let peak = p.stats.peak_concurrency.max(1);
        (
            peak,
            format!(
                " At that rate the server needed {peak} sessions at once at the peak (mean {:.1}).",
                p.stats.little_concurrency()
            ),
        )
    } else {
        (p.load as usize, String::new())
    }
}

impl RampReport {
    /// The ramp as the operator reads it: a table and the recommendation, or one JSON object.
    pub fn render(&self, json: bool) -> String {
        let what = if self.rate { "rate" } else { "concurrency" };
        let load = |x: f64| -> serde_json::Value {
            if self.rate {
                serde_json::json!(x)
            } else {
                serde_json::json!(x as u64)
            }
        };
        if json {
            let steps: Vec<_> = self
                .points
                .iter()
                .map(|p| {
                    serde_json::json!({
                        what: load(p.load),
                        "phase": if p.bisect { "bisect" } else { "step" },
                        "verdict": match p.verdict {
                            Verdict::Good => "good",
                            Verdict::Errors(_) => "errors",
                            Verdict::Flat(_) => "flat",
                            Verdict::Empty => "empty",
                        },
                        "summary": p.stats.to_json(),
                    })
                })
                .collect();
            let out = serde_json::json!({
                "kind": what,
                "steps": steps,
                "knee": self.knee.map(load),
                "last_good": self.last_good.map(load),
                "recommended": { "max_connections": self.max_connections },
                "reasoning": self.reasoning,
            });
            return format!("{out}\n");
        }
        let mut out = format!(
            "{:>12} {:<7}{:>13}{:>10}{:>9}{:>10}{:>10}{:>8}  verdict\n",
            what, "", "delivered/s", "errors %", "refused", "timeouts", "p99 ms", "peak"
        );
        for p in &self.points {
            let s = &p.stats;
            out += &format!(
                "{:>12} {:<7}{:>13.1}{:>10.1}{:>9}{:>10}{:>10.1}{:>8}  {}\n",
                p.load,
                if p.bisect { "bisect" } else { "" },
                s.delivered_per_second(),
                s.error_fraction() * 100.0,
                s.refused_total(),
                s.timeouts,
                s.session.value_at_quantile(0.99) as f64 / 1000.0,
                s.peak_concurrency,
                match p.verdict {
                    Verdict::Good => "good",
                    Verdict::Errors(_) => "errors",
                    Verdict::Flat(_) => "flat",
                    Verdict::Empty => "empty",
                }
            );
        }
        if let Some(first_bad) = self.points.iter().find(|p| p.verdict != Verdict::Good) {
            out += &first_bad.stats.explain();
        }
        match self.max_connections {
            Some(n) => out += &format!("\nrecommended: max_connections = {n}\n\n"),
            None => out += "\nno recommendation\n\n",
        }
        out += &self.reasoning;
        out += "\n";
        out
    }
}

/// A run bound per step, for a ramp given neither `--sessions` nor `--duration`.
pub const DEFAULT_STEP: Bound = Bound::Duration(std::time::Duration::from_secs(5));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramps_parse() {
        let c = |start, end, step| Ramp::Concurrency { start, end, step };
        assert_eq!("10..500/10".parse::<Ramp>().unwrap(), c(10, 500, 10));
        assert_eq!("5..20".parse::<Ramp>().unwrap(), c(5, 20, 5));
        let r = |start, end, step| Ramp::Rate { start, end, step };
        assert_eq!(
            "10/s..200/s/10".parse::<Ramp>().unwrap(),
            r(10.0, 200.0, 10.0)
        );
        assert_eq!(
            "10/s..200/s/10/s".parse::<Ramp>().unwrap(),
            r(10.0, 200.0, 10.0)
        );
        assert_eq!("2.5/s..10/s".parse::<Ramp>().unwrap(), r(2.5, 10.0, 2.5));
        for bad in [
            "",
            "10",
            "0..5",
            "9..3",
            "a..b/1",
            "10/s..5/s",
            "0/s..5/s",
            "10/s..20",
            "1/s..2/s/",
            "1/s..2/s/x",
        ] {
            assert!(bad.parse::<Ramp>().is_err(), "{bad:?}");
        }
        assert_eq!(c(10, 30, 10).loads(), [10.0, 20.0, 30.0]);
        assert_eq!(r(10.0, 30.0, 10.0).loads(), [10.0, 20.0, 30.0]);
        assert_eq!(c(35, 40, 5).between(35.0, 40.0), Some(37.0));
        assert_eq!(c(35, 40, 5).between(37.0, 38.0), None);
        assert_eq!(r(1.0, 2.0, 1.0).between(10.0, 20.0), Some(15.0));
    }

    fn stats(delivered: u64, errors: u64, secs: f64) -> Stats {
        let mut s = Stats::new();
        s.delivered = delivered;
        s.timeouts = errors;
        s.elapsed = std::time::Duration::from_secs_f64(secs);
        s
    }

    #[test]
    fn verdicts_weigh_errors_then_gain() {
        let base = stats(100, 0, 1.0);
        assert_eq!(verdict(&base, 10.0, None, 0.01), Verdict::Good);
        // 2 errors in 102 sessions is over 1 %.
        assert!(matches!(
            verdict(&stats(100, 2, 1.0), 10.0, None, 0.01),
            Verdict::Errors(_)
        ));
        let last = Some((10.0, &base));
        // Doubling the load: 5 % gain needed.
        assert_eq!(
            verdict(&stats(110, 0, 1.0), 20.0, last, 0.01),
            Verdict::Good
        );
        assert!(matches!(
            verdict(&stats(104, 0, 1.0), 20.0, last, 0.01),
            Verdict::Flat(_)
        ));
        assert!(matches!(
            verdict(&stats(90, 0, 1.0), 20.0, last, 0.01),
            Verdict::Flat(g) if g < 0.0
        ));
        assert_eq!(verdict(&Stats::new(), 20.0, last, 0.01), Verdict::Empty);
        // A 4 % step in load needs only a 2 % gain.
        assert_eq!(
            verdict(&stats(103, 0, 1.0), 10.4, last, 0.01),
            Verdict::Good
        );
    }
}
