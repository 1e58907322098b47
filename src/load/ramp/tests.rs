//! The ramp's parse, its steps and bisection points, and the verdicts it gives a point.

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
    assert_eq!(verdict(&base, 10.0, None, 0.01), StepVerdict::Good);
    // 2 errors in 102 sessions is over 1 %.
    assert!(matches!(
        verdict(&stats(100, 2, 1.0), 10.0, None, 0.01),
        StepVerdict::Errors(_)
    ));
    let last = Some((10.0, &base));
    // Doubling the load: 5 % gain needed.
    assert_eq!(
        verdict(&stats(110, 0, 1.0), 20.0, last, 0.01),
        StepVerdict::Good
    );
    assert!(matches!(
        verdict(&stats(104, 0, 1.0), 20.0, last, 0.01),
        StepVerdict::Flat(_)
    ));
    assert!(matches!(
        verdict(&stats(90, 0, 1.0), 20.0, last, 0.01),
        StepVerdict::Flat(g) if g < 0.0
    ));
    assert_eq!(verdict(&Stats::new(), 20.0, last, 0.01), StepVerdict::Empty);
    // A 4 % step in load needs only a 2 % gain.
    assert_eq!(
        verdict(&stats(103, 0, 1.0), 10.4, last, 0.01),
        StepVerdict::Good
    );
}
