//! The load tool's own unit tests: source addresses, the remote-target guard, and how a
//! run's counts are judged and explained.

use super::*;

#[test]
fn sources_walk_the_network() {
    let net: IpNet = "127.0.0.0/30".parse().unwrap();
    let got: Vec<String> = (0..4).map(|i| nth_source(net, i).to_string()).collect();
    assert_eq!(got, ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.1"]);
    let one: IpNet = "127.0.0.9/32".parse().unwrap();
    assert_eq!(nth_source(one, 5).to_string(), "127.0.0.9");
}

#[test]
fn remote_targets_need_permission() {
    assert!(check_target("127.0.0.1:25".parse().unwrap(), false).is_ok());
    assert!(check_target("[::1]:25".parse().unwrap(), false).is_ok());
    assert!(check_target("192.0.2.1:25".parse().unwrap(), false).is_err());
    assert!(check_target("192.0.2.1:25".parse().unwrap(), true).is_ok());
}

#[test]
fn a_backlog_is_not_keeping_up() {
    let with = |arrivals, secs, delivered, held_ms: u64| {
        let mut s = Stats::new();
        s.arrivals = arrivals;
        s.window = Duration::from_secs(secs);
        s.delivered_in_window = delivered;
        for _ in 0..arrivals {
            s.held.record(held_ms * 1000).unwrap();
        }
        // A backlog makes the mean held time, and so Little's law, large.
        s.held_seconds = arrivals as f64 * 2.0;
        s.elapsed = s.window;
        s
    };
    // A server with 90 % of the capacity: 380 of 413 delivered in 8 s, 20 ms each.
    assert!(!with(413, 8, 380, 20).kept_up(0.95));
    // One that keeps up: 10 still held at the end of 3 s at 100/s of 100 ms.
    assert!(with(300, 3, 290, 100).kept_up(0.95));
    assert!(!with(0, 3, 0, 100).kept_up(0.95), "nothing arrived");
}

#[test]
fn a_run_refused_at_one_step_is_explained() {
    let mut s = Stats::new();
    s.refused_later = 3;
    s.refused_later_by.insert("RCPT 550 5.7.54".into(), 3);
    let text = s.explain();
    assert!(
        text.contains("every session (3) was refused at RCPT 550 5.7.54"),
        "{text}"
    );
    assert!(text.contains("--to"), "{text}");
    s.delivered = 1;
    assert_eq!(s.explain(), "", "one delivered: the envelope works");
}
