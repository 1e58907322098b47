use super::*;

#[test]
fn the_budget_counts_two_per_session_and_one_per_waiter() {
    let mut c = Config::for_backend("127.0.0.1:25".parse().unwrap());
    c.max_connections = 20;
    c.max_queued = 2000;
    c.forwarding = crate::config::Forwarding::Copy;
    let b = Budget::of(&c, 2);
    assert_eq!((b.sessions, b.queue, b.pipes), (40, 2000, 0));
    assert_eq!(b.listeners, 3 * 2 + 34);
    assert_eq!(b.total(), 40 + 2000 + 1280 + 40 + MARGIN);
}

#[test]
fn under_a_short_limit_sessions_keep_their_slots_and_the_queue_gets_what_fits() {
    let mut c = Config::for_backend("127.0.0.1:25".parse().unwrap());
    c.max_connections = 20;
    c.max_queued = 2000;
    c.forwarding = crate::config::Forwarding::Copy;
    let b = Budget::of(&c, 2);
    // 512 - (listeners 40 + margin 64) = 408; lingering 102 of it; 306 left.
    let got = caps(&c, &b, 512);
    assert_eq!(
        got,
        Caps {
            max_connections: 20,
            max_queued: 306 - 40
        }
    );
    // Sessions, splicing, take at most half of what is left.
    c.max_connections = 1000;
    c.forwarding = crate::config::Forwarding::Auto;
    let b = Budget::of(&c, 2);
    let got = caps(&c, &b, 512);
    assert_eq!(
        got,
        Caps {
            max_connections: 306 / 2 / 4,
            max_queued: 306 - 38 * 4
        }
    );
    // What is counted under the caps fits the limit.
    let mut held = c.clone();
    held.max_connections = got.max_connections;
    held.max_queued = got.max_queued;
    let b = Budget::of(&held, 2);
    assert!(b.sessions + b.queue + 2 * got.max_connections as u64 <= 306);
    // Nothing left: one session still, never 0, which would refuse everyone.
    assert_eq!(caps(&c, &b, 10).max_connections, 1);
    c.max_connections = 0;
    assert_eq!(caps(&c, &b, 10).max_connections, 0);
}
