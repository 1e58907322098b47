//! `mxgate load --ramp ... --plot FILE.svg`: delivered per second and p99 session latency
//! against the load, every point the ramp ran (steps and bisection rounds, in load order), with
//! the knee marked. A plain SVG with no script and no external reference, so any browser or
//! README renders it.

use std::fmt::Write as _;

use super::ramp::{RampReport, StepVerdict};

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 440.0;
/// Plot area margins: left, right, top, bottom.
const MARGIN: (f64, f64, f64, f64) = (70.0, 80.0, 50.0, 60.0);
const DELIVERED: &str = "#1f77b4";
const P99: &str = "#d62728";

/// One point as drawn: load, delivered/s, p99 session ms, and whether it ran well.
type Plotted = (f64, f64, f64, bool);

/// The ramp's points in load order, and the scales that place them in the plot area.
struct Frame {
    points: Vec<Plotted>,
    x_max: f64,
    rate_max: f64,
    p99_max: f64,
    what: &'static str,
}

/// The plot area: left, top, width, height.
fn area() -> (f64, f64, f64, f64) {
    let (l, r, t, b) = MARGIN;
    (l, t, WIDTH - l - r, HEIGHT - t - b)
}

impl Frame {
    fn new(report: &RampReport) -> Frame {
        let mut points: Vec<Plotted> = report
            .points
            .iter()
            .map(|p| {
                (
                    p.load,
                    p.stats.delivered_per_second(),
                    p.stats.session.value_at_quantile(0.99) as f64 / 1000.0,
                    p.verdict == StepVerdict::Good,
                )
            })
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let x_max = nice(points.iter().map(|p| p.0).fold(0.0, f64::max));
        let rate_max = nice(points.iter().map(|p| p.1).fold(0.0, f64::max));
        let p99_max = nice(points.iter().map(|p| p.2).fold(0.0, f64::max));
        let what = if report.rate {
            "offered sessions/s"
        } else {
            "concurrency"
        };
        Frame {
            points,
            x_max,
            rate_max,
            p99_max,
            what,
        }
    }

    fn x(&self, v: f64) -> f64 {
        let (l, _, w, _) = area();
        l + v / self.x_max * w
    }

    fn y_rate(&self, v: f64) -> f64 {
        let (_, t, _, h) = area();
        t + h - v / self.rate_max * h
    }

    fn y_p99(&self, v: f64) -> f64 {
        let (_, t, _, h) = area();
        t + h - v / self.p99_max * h
    }
}

/// The SVG text.
pub fn svg(report: &RampReport) -> String {
    let f = Frame::new(report);
    let what = f.what;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<title>mxgate load ramp: delivered/s and p99 against {what}</title>"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    axes(&mut s, &f);
    for (id, colour) in [("delivered", DELIVERED), ("p99", P99)] {
        series(&mut s, &f, id, colour);
    }
    if let Some(k) = report.knee {
        knee(&mut s, &f, k);
    }
    let (l, _, _, _) = area();
    let legend = match report.max_connections {
        Some(n) => format!("recommended max_connections = {n}"),
        None => "no recommendation".into(),
    };
    let _ = writeln!(
        s,
        r#"<text x="{l}" y="20" font-size="14"><tspan fill="{DELIVERED}">delivered/s</tspan> and <tspan fill="{P99}">p99 session latency</tspan> against {what}; {legend}</text>"#
    );
    s += "</svg>\n";
    s
}

/// The frame, the grid with both value scales and the load scale, and the axis titles.
fn axes(s: &mut String, f: &Frame) {
    let (l, t, w, h) = area();
    let what = f.what;
    let _ = writeln!(
        s,
        r##"<g id="axes" stroke="#999" fill="none"><rect x="{l}" y="{t}" width="{w}" height="{h}"/></g>"##
    );
    let mut grid = String::new();
    for k in 0..=4 {
        let frac = k as f64 / 4.0;
        let gy = t + h - frac * h;
        let gx = l + frac * w;
        let _ = write!(
            grid,
            r##"<line x1="{l}" y1="{gy:.1}" x2="{:.1}" y2="{gy:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="{DELIVERED}">{}</text><text x="{:.1}" y="{:.1}" fill="{P99}">{}</text><text x="{gx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            l + w,
            l - 6.0,
            gy + 4.0,
            label(frac * f.rate_max),
            l + w + 6.0,
            gy + 4.0,
            label(frac * f.p99_max),
            t + h + 16.0,
            label(frac * f.x_max),
        );
    }
    let _ = writeln!(s, r#"<g id="grid">{grid}</g>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{what}</text>"#,
        l + w / 2.0,
        HEIGHT - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" fill="{DELIVERED}" transform="rotate(-90 18 {:.1})" text-anchor="middle">delivered/s</text>"#,
        t + h / 2.0,
        t + h / 2.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" fill="{P99}" transform="rotate(90 {:.1} {:.1})" text-anchor="middle">p99 session ms</text>"#,
        WIDTH - 22.0,
        t + h / 2.0,
        WIDTH - 22.0,
        t + h / 2.0
    );
}

/// One series, `delivered` or `p99`: its line, then its points, hollow where the point ran
/// badly.
fn series(s: &mut String, f: &Frame, id: &str, colour: &str) {
    let y = |p: &Plotted| {
        if id == "delivered" {
            f.y_rate(p.1)
        } else {
            f.y_p99(p.2)
        }
    };
    let pts: Vec<String> = f
        .points
        .iter()
        .map(|p| format!("{:.1},{:.1}", f.x(p.0), y(p)))
        .collect();
    let _ = writeln!(
        s,
        r#"<polyline id="{id}" fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
        pts.join(" ")
    );
    let mut dots = String::new();
    for p in &f.points {
        let fill = if p.3 { colour } else { "white" };
        let _ = write!(
            dots,
            r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{fill}" stroke="{colour}"/>"#,
            f.x(p.0),
            y(p)
        );
    }
    let _ = writeln!(s, r#"<g id="{id}-points">{dots}</g>"#);
}

/// The knee: a dashed line at its load, labelled.
fn knee(s: &mut String, f: &Frame, k: f64) {
    let (_, t, _, h) = area();
    let kx = f.x(k);
    let _ = writeln!(
        s,
        r##"<g id="knee"><line x1="{kx:.1}" y1="{t}" x2="{kx:.1}" y2="{:.1}" stroke="#444" stroke-dasharray="5,4"/><text x="{:.1}" y="{:.1}">knee {}</text></g>"##,
        t + h,
        kx + 5.0,
        t + 14.0,
        label(k)
    );
}

/// A round axis maximum at or above `v`: 1, 2 or 5 times a power of ten.
fn nice(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

fn label(v: f64) -> String {
    if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_round() {
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(37.0), 50.0);
        assert_eq!(nice(370.0), 500.0);
        assert_eq!(nice(1.2), 2.0);
        assert_eq!(nice(10.0), 10.0);
        assert_eq!(label(12.5), "12.5");
        assert_eq!(label(250.0), "250");
    }
}
