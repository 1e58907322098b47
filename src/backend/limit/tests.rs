use super::*;

/// Drives `learned` as a demand of `clients` sessions would, against a backend that takes at
/// most `hidden` and greets after `delay(held)`. Returns the limits seen and the busy signals,
/// per attempt, after `warm_up` attempts.
fn drive(
    learned: &mut Learned,
    clients: usize,
    hidden: usize,
    delay: impl Fn(usize) -> Duration,
    attempts: usize,
    warm_up: usize,
) -> (usize, usize, usize) {
    let (mut lo, mut hi, mut busy) = (usize::MAX, 0, 0);
    for i in 0..attempts {
        // The sessions open when this one arrives: as many as the limit lets in.
        let held = learned.allowed().min(clients) - 1;
        if held >= hidden {
            learned.observe(Signal::Busy { held: hidden });
            busy += usize::from(i >= warm_up);
        } else {
            let time = delay(held + 1);
            learned.observe(Signal::Greeted {
                time,
                held: held + 1,
            });
        }
        if i >= warm_up {
            lo = lo.min(learned.limit());
            hi = hi.max(learned.limit());
        }
    }
    (lo, hi, busy)
}

#[test]
fn a_hidden_limit_is_found_from_below_and_held_under() {
    let mut learned = Learned::new(5, 1000, 5);
    let gentle = |n: usize| Duration::from_micros(200 + 20 * n as u64);
    let (lo, hi, busy) = drive(&mut learned, 100, 37, gentle, 20_000, 5_000);
    assert!((26..=37).contains(&lo) && hi <= 37, "{lo}..={hi}");
    // Once it said busy, the backend is not probed past that count again (within the
    // refusal memory, which this run never leaves).
    assert_eq!(busy, 0, "{busy} busy greetings after the warm-up");
}

#[test]
fn a_climbing_greeting_time_alone_sets_the_limit() {
    let mut learned = Learned::new(5, 1000, 5);
    // Flat to 30 sessions, then 10 ms more for each one past it.
    let steep = |n: usize| {
        Duration::from_micros(300) + Duration::from_millis(10 * n.saturating_sub(30) as u64)
    };
    let (lo, hi, busy) = drive(&mut learned, 200, usize::MAX, steep, 20_000, 5_000);
    assert_eq!(busy, 0);
    assert!(lo >= 20 && hi <= 45, "{lo}..={hi}");
}

#[test]
fn bounds_hold_and_moves_past_ten_percent_are_reported() {
    let mut learned = Learned::new(5, 50, 40);
    let moved = learned.observe(Signal::Busy { held: 20 });
    assert_eq!(
        moved,
        Some(Move {
            from: 40,
            to: 18,
            why: Why::Busy
        })
    );
    // Never below the minimum, and a busy signal never raises the limit.
    learned.observe(Signal::Busy { held: 1 });
    assert_eq!(learned.limit(), 5);
    assert_eq!(learned.observe(Signal::Busy { held: 40 }), None);
    assert_eq!(learned.limit(), 5);
    // A limit nobody uses does not grow.
    for _ in 0..1000 {
        learned.observe(Signal::Greeted {
            time: Duration::from_millis(1),
            held: 1,
        });
    }
    assert_eq!(learned.limit(), 5);
    // Growth stops at the maximum, and a reload's new bounds clamp it.
    let mut learned = Learned::new(5, 50, 5);
    for _ in 0..100_000 {
        let held = learned.allowed();
        learned.observe(Signal::Greeted {
            time: Duration::from_millis(1),
            held,
        });
    }
    assert_eq!(learned.limit(), 50);
    learned.rebound(5, 30);
    assert_eq!(learned.limit(), 30);
}

#[test]
fn sessions_greeted_after_a_cut_do_not_undo_it() {
    let mut learned = Learned::new(5, 1000, 40);
    learned.observe(Signal::Busy { held: 40 });
    assert_eq!(learned.limit(), 36);
    // Sessions let in before the cut are greeted after it, with more open than the new limit.
    for held in (37..=41).rev() {
        learned.observe(Signal::Greeted {
            time: Duration::from_millis(1),
            held,
        });
    }
    assert_eq!(learned.limit(), 36);
}

#[test]
fn slow_start_doubles_per_limits_worth_of_greetings_until_the_first_signal() {
    let mut learned = Learned::new(5, 1000, 5);
    assert_eq!(learned.phase(), LimitPhase::SlowStart);
    // A limit's worth of sessions greeted while it is in use doubles it.
    for limit in [5, 10, 20, 40, 80, 160, 320] {
        assert_eq!(learned.limit(), limit);
        for _ in 0..limit {
            let held = learned.limit();
            learned.observe(Signal::Greeted {
                time: Duration::from_millis(1),
                held,
            });
        }
    }
    assert_eq!(learned.limit(), 640);
    assert_eq!(learned.phase(), LimitPhase::SlowStart);
    // The backend says busy with 400 held: the cut is anchored to what it held, and growth is
    // steady from then on (the threshold is half of that).
    learned.observe(Signal::Busy { held: 400 });
    assert_eq!(learned.limit(), 360);
    assert_eq!(learned.phase(), LimitPhase::Steady);
    assert_eq!(learned.saved().threshold, Some(200));
    // A limit's worth more greetings now earns one probe, not a doubling.
    for _ in 0..361 {
        learned.observe(Signal::Greeted {
            time: Duration::from_millis(1),
            held: 360,
        });
    }
    assert_eq!(learned.limit(), 360);
    assert_eq!(learned.allowed(), 361);
}

#[test]
fn a_limit_nobody_fills_does_not_slow_start() {
    let mut learned = Learned::new(5, 1000, 5);
    for _ in 0..10_000 {
        learned.observe(Signal::Greeted {
            time: Duration::from_millis(1),
            held: 2,
        });
    }
    assert_eq!(learned.limit(), 5);
}

#[test]
fn a_slow_greeting_ends_slow_start_and_fast_growth_resumes_only_to_half_the_last_good() {
    let mut learned = Learned::new(5, 1000, 64);
    // The baseline, while quiet.
    learned.observe(Signal::Greeted {
        time: Duration::from_millis(1),
        held: 1,
    });
    // Greetings ten times slower with the limit in use: a window of them shrinks it.
    for _ in 0..200 {
        learned.observe(Signal::Greeted {
            time: Duration::from_millis(100),
            held: 64,
        });
        if learned.limit() < 64 {
            break;
        }
    }
    assert!(learned.limit() < 64, "{}", learned.limit());
    assert_eq!(learned.phase(), LimitPhase::Steady);
    assert_eq!(learned.saved().threshold, Some(32));
    // Busy far below what worked: the cut lands under the threshold, and fast growth resumes
    // from there, but only up to it.
    learned.observe(Signal::Busy { held: 20 });
    assert_eq!(learned.limit(), 18);
    assert_eq!(learned.saved().threshold, Some(10));
    assert_eq!(learned.phase(), LimitPhase::Steady);
}

#[test]
fn the_first_overshoot_is_bounded_by_the_connects_on_their_way() {
    // 600 clients against a backend that takes 400: the limit climbs by one per greeting, so
    // at the first busy greeting it is past what the backend held by at most the sessions let
    // in before it answered. The drive lets one in per observation.
    let mut learned = Learned::new(5, 1000, 5);
    let flat = |_| Duration::from_millis(1);
    let (_, hi, _) = drive(&mut learned, 600, 400, flat, 3_000, 0);
    assert!(hi <= 401, "the limit went to {hi} over a backend of 400");
    assert!(
        (360..=400).contains(&learned.limit()),
        "{}",
        learned.limit()
    );
}

#[test]
fn a_resumed_limit_starts_where_it_was_within_the_bounds() {
    let mut before = Learned::new(5, 1000, 5);
    before.observe(Signal::Greeted {
        time: Duration::from_micros(300),
        held: 1,
    });
    for _ in 0..2000 {
        let held = before.limit();
        before.observe(Signal::Greeted {
            time: Duration::from_micros(300),
            held,
        });
        if before.limit() >= 420 {
            break;
        }
    }
    before.observe(Signal::Busy { held: 400 });
    let saved = before.saved();
    assert_eq!(
        (saved.limit, saved.phase, saved.threshold),
        (360, LimitPhase::Steady, Some(200))
    );
    let resumed = Learned::resume(5, 1000, &saved);
    assert!(resumed.resumed());
    assert_eq!(resumed.saved(), saved);
    // Bounds in force now win.
    assert_eq!(Learned::resume(5, 100, &saved).limit(), 100);
    assert_eq!(Learned::resume(500, 1000, &saved).limit(), 500);
    // A fresh limit has no threshold to keep: it slow-starts.
    assert_eq!(Learned::new(5, 1000, 5).saved().threshold, None);
}
