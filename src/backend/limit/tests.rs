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
