use super::*;
use crate::config::ReplyText;
use ipnet::IpNet;

#[test]
fn default_lines_are_exact() {
    let r = Replies::new("mx.example.com", &ReplyOverrides::default());
    assert_eq!(
        r.line(RejectReason::GlobalLimit),
        b"421 4.3.2 mx.example.com Too many connections, try again later\r\n"
    );
    assert_eq!(
        r.line(RejectReason::SourceLimit),
        b"421 4.7.0 mx.example.com Too many connections from your address, try again later\r\n"
    );
    assert_eq!(
        r.line(RejectReason::BackendUnavailable),
        b"421 4.3.2 mx.example.com Service not available, try again later\r\n"
    );
}

#[test]
fn summary_counts_per_reason_and_finds_the_busiest_source() {
    let s = RejectSummary::default();
    let a: IpNet = "192.0.2.1/32".parse().unwrap();
    let b: IpNet = "192.0.2.2/32".parse().unwrap();
    for _ in 0..5 {
        s.record(RejectReason::SourceLimit, a);
    }
    s.record(RejectReason::SourceLimit, b);
    s.record(RejectReason::GlobalLimit, b);
    s.record_dry_run(RejectReason::GlobalLimit, a);
    let lines = s.take();
    assert_eq!(lines.len(), 3);
    assert_eq!(
        lines[0],
        SummaryLine {
            reason: RejectReason::GlobalLimit,
            dry_run: false,
            count: 1,
            busiest: Some((b, 1))
        }
    );
    assert!(lines[1].dry_run);
    assert_eq!(
        lines[2],
        SummaryLine {
            reason: RejectReason::SourceLimit,
            dry_run: false,
            count: 6,
            busiest: Some((a, 5))
        }
    );
    assert!(s.take().is_empty(), "a new window starts empty");
}

#[test]
fn overrides_replace_one_reason() {
    let o = ReplyOverrides {
        source_limit: Some(ReplyText("421 4.7.0 {hostname} slow down".into())),
        ..ReplyOverrides::default()
    };
    let r = Replies::new("mx.t", &o);
    assert_eq!(
        r.line(RejectReason::SourceLimit),
        b"421 4.7.0 mx.t slow down\r\n"
    );
    assert!(r
        .line(RejectReason::GlobalLimit)
        .starts_with(b"421 4.3.2 mx.t Too many"));
}
