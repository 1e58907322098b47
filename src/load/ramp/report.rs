//! What a finished ramp says: the knee, the last good point, the `max_connections` they
//! support and the reasoning in words, rendered as the table or the `--json` object.
//!
//! It works on points already measured and must never run a load: the recommendation follows
//! from the points alone, so the same points always give the same report.

use super::{Point, Ramp, RampReport, StepVerdict};

pub(super) fn recommend(
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
        StepVerdict::Errors(f) => format!(
            "{:.1} % of its sessions failed (refused, timed out or not connected; --max-errors allows {:.1} %)",
            f * 100.0,
            max_errors * 100.0
        ),
        StepVerdict::Flat(g) if g < 0.0 => format!("its delivered rate fell ({:+.1} %)", g * 100.0),
        StepVerdict::Flat(g) => format!("its delivered rate grew only {:+.1} %", g * 100.0),
        StepVerdict::Empty => "no session ran in the step (lengthen --duration)".to_string(),
        StepVerdict::Good => unreachable!("a bad point"),
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
                            StepVerdict::Good => "good",
                            StepVerdict::Errors(_) => "errors",
                            StepVerdict::Flat(_) => "flat",
                            StepVerdict::Empty => "empty",
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
                    StepVerdict::Good => "good",
                    StepVerdict::Errors(_) => "errors",
                    StepVerdict::Flat(_) => "flat",
                    StepVerdict::Empty => "empty",
                }
            );
        }
        if let Some(first_bad) = self.points.iter().find(|p| p.verdict != StepVerdict::Good) {
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
