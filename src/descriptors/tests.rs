use super::*;
use crate::config::Pregreet;

#[test]
fn the_budget_counts_two_per_session_and_one_per_waiter() {
    let mut c = Config::for_backend("127.0.0.1:25".parse().unwrap());
    c.max_connections = 20;
    c.max_queued = 2000;
    c.forwarding = crate::config::Forwarding::Copy;
    c.pregreet.action = Pregreet::Off;
    let b = Budget::of(&c, 2);
    assert_eq!(
        (b.sessions, b.queue, b.screening, b.pipes),
        (40, 2000, 0, 0)
    );
    assert_eq!(b.listeners, 3 * 2 + 34);
    assert_eq!(b.total(), 40 + 2000 + 1280 + 40 + MARGIN);
}

#[test]
fn under_a_short_limit_sessions_keep_their_slots_and_the_queue_gets_what_fits() {
    let mut c = Config::for_backend("127.0.0.1:25".parse().unwrap());
    c.max_connections = 20;
    c.max_queued = 2000;
    c.forwarding = crate::config::Forwarding::Copy;
    c.pregreet.action = Pregreet::Off;
    let b = Budget::of(&c, 2);
    // 512 - (listeners 40 + margin 64) = 408; lingering 102 of it; 306 left.
    let got = caps(&c, &b, 512);
    assert_eq!(
        got,
        Caps {
            max_connections: 20,
            max_queued: 306 - 40,
            pregreet_max_clients: c.pregreet.max_clients,
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
            max_queued: 306 - 38 * 4,
            pregreet_max_clients: c.pregreet.max_clients,
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

#[test]
fn clients_under_the_pregreet_test_are_counted_and_held_with_the_queue() {
    let mut c = Config::for_backend("127.0.0.1:25".parse().unwrap());
    c.max_connections = 20;
    c.max_queued = 300;
    c.forwarding = crate::config::Forwarding::Copy;
    c.pregreet.action = Pregreet::Drop;
    c.pregreet.max_clients = 100;
    let b = Budget::of(&c, 2);
    assert_eq!((b.queue, b.screening), (300, 100));
    assert_eq!(b.total(), 40 + 300 + 100 + 1280 + 40 + MARGIN);
    // Room for both: as configured.
    let roomy = caps(&c, &b, 100_000);
    assert_eq!((roomy.max_queued, roomy.pregreet_max_clients), (300, 100));
    // 512: 306 left after listeners, margin and lingering; sessions 40; 266 for the queue and
    // the test, in proportion to 300 and 100.
    let got = caps(&c, &b, 512);
    assert_eq!(
        got,
        Caps {
            max_connections: 20,
            max_queued: 266 * 300 / 400,
            pregreet_max_clients: 266 - 266 * 300 / 400,
        }
    );
    // What is counted under the caps fits the limit.
    let mut held = c.clone();
    Shortfall {
        budget: b,
        soft: 512,
        hard: Some(512),
        caps: got,
    }
    .apply(&mut held);
    assert_eq!(held.pregreet.max_clients, got.pregreet_max_clients);
    let said = Shortfall {
        budget: b,
        soft: 512,
        hard: Some(512),
        caps: got,
    }
    .to_string();
    assert!(
        said.contains(&format!(
            "max_connections is held at 20, max_queued at {} and pregreet_max_clients at {}",
            got.max_queued, got.pregreet_max_clients
        )) && said.contains("pregreet test 100"),
        "{said}"
    );
    let b_held = Budget::of(&held, 2);
    assert!(b_held.sessions + b_held.queue + b_held.screening <= 306);
    // Nothing left: one place still, never 0, which under drop would refuse everyone (found by
    // the hostile run: held at 0 under a limit of 106).
    assert_eq!(caps(&c, &b, 10).pregreet_max_clients, 1);
    // The test off: nothing counted for it, and the queue gets all that is left.
    c.pregreet.action = Pregreet::Off;
    let b = Budget::of(&c, 2);
    assert_eq!(b.screening, 0);
    assert_eq!(caps(&c, &b, 512).max_queued, 266);
}
