use std::time::{Duration, Instant};

use super::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn a_source_gets_one_line_at_once_then_at_most_one_a_minute_with_the_count() {
    let r = SourceRefusals::default();
    let t0 = Instant::now();
    let a = net("192.0.2.7/32");
    for _ in 0..3 {
        r.record_at(RejectReason::SourceLimit, a, t0);
    }
    let (lines, untracked) = r.take_at(t0 + Duration::from_secs(1));
    assert_eq!(untracked, 0);
    assert_eq!(
        lines,
        vec![SourceLine {
            source: a,
            reason: RejectReason::SourceLimit,
            count: 3
        }]
    );
    // More refusals within the minute: counted, not yet written.
    for _ in 0..5 {
        r.record_at(RejectReason::SourceLimit, a, t0 + Duration::from_secs(20));
    }
    assert!(r.take_at(t0 + Duration::from_secs(30)).0.is_empty());
    assert!(r.take_at(t0 + Duration::from_secs(60)).0.is_empty());
    // A minute after the last line: one line with everything since.
    let (lines, _) = r.take_at(t0 + Duration::from_secs(61));
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].count, 5);
    // Nothing new: no line, and the source is forgotten once nothing needs it.
    assert!(r.take_at(t0 + Duration::from_secs(200)).0.is_empty());
    assert!(r.is_empty());
}

#[test]
fn each_reason_of_a_source_has_its_own_line() {
    let r = SourceRefusals::default();
    let t0 = Instant::now();
    let a = net("192.0.2.7/32");
    let b = net("2001:db8:1:2::/64");
    r.record_at(RejectReason::RateLimit, a, t0);
    r.record_at(RejectReason::SourceLimit, a, t0);
    r.record_at(RejectReason::SourceLimit, b, t0);
    let (lines, _) = r.take_at(t0);
    let got: Vec<(IpNet, RejectReason, u64)> = lines
        .iter()
        .map(|l| (l.source, l.reason, l.count))
        .collect();
    assert_eq!(
        got,
        vec![
            (a, RejectReason::SourceLimit, 1),
            (a, RejectReason::RateLimit, 1),
            (b, RejectReason::SourceLimit, 1),
        ]
    );
}

#[test]
fn the_view_counts_the_last_minute_only_most_refused_first() {
    let r = SourceRefusals::default();
    let t0 = Instant::now();
    let (a, b) = (net("192.0.2.7/32"), net("192.0.2.8/32"));
    for _ in 0..4 {
        r.record_at(RejectReason::SourceLimit, a, t0);
    }
    r.record_at(RejectReason::Denied, a, t0);
    for _ in 0..2 {
        r.record_at(RejectReason::GlobalLimit, b, t0 + Duration::from_secs(30));
    }
    let top = r.top_at(20, t0 + Duration::from_secs(31));
    assert_eq!(
        top,
        vec![
            Refused {
                source: a,
                total: 5,
                reasons: vec![(RejectReason::SourceLimit, 4), (RejectReason::Denied, 1)],
            },
            Refused {
                source: b,
                total: 2,
                reasons: vec![(RejectReason::GlobalLimit, 2)],
            },
        ]
    );
    assert_eq!(r.top_at(1, t0 + Duration::from_secs(31)).len(), 1);
    // 70 s on, a's refusals have left the minute; b's are still in it.
    let top = r.top_at(20, t0 + Duration::from_secs(70));
    assert_eq!(top.len(), 1);
    assert_eq!(top[0].source, b);
    // And later nobody is.
    assert!(r.top_at(20, t0 + Duration::from_secs(200)).is_empty());
}

#[test]
fn deny_list_refusals_do_not_count_as_refused_sources() {
    let r = SourceRefusals::default();
    r.record(RejectReason::Denied, net("192.0.2.66/32"));
    assert_eq!(r.refused_sources(), 0);
    r.record(RejectReason::SourceLimit, net("192.0.2.7/32"));
    r.record(RejectReason::GlobalLimit, net("192.0.2.8/32"));
    assert_eq!(r.refused_sources(), 2);
}

#[test]
fn the_table_is_bounded_and_says_how_many_it_left_out() {
    let r = SourceRefusals::default();
    let t0 = Instant::now();
    for i in 0..(MAX_SOURCES as u32 + 10) {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        r.record_at(
            RejectReason::GlobalLimit,
            IpNet::from(std::net::IpAddr::V4(ip)),
            t0,
        );
    }
    assert_eq!(r.len(), MAX_SOURCES);
    let (lines, untracked) = r.take_at(t0);
    assert_eq!(lines.len(), MAX_SOURCES);
    assert_eq!(untracked, 10);
    // A tracked source still counts while the table is full.
    r.record_at(
        RejectReason::GlobalLimit,
        IpNet::from(std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000))),
        t0,
    );
    assert_eq!(r.take_at(t0).1, 0);
}
