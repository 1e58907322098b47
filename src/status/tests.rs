use super::*;

fn snapshot() -> Snapshot {
    Snapshot {
        version: "0.1.0".into(),
        time: 1_800_000_000.0,
        reload: ReloadView {
            loaded_at: 1_799_999_000.0,
            last_successful: true,
            reloads: 2,
        },
        limits: Limits {
            max_connections: 1000,
            max_per_source: 20,
            reserved_for_allowed: 50,
            max_queued: 1000,
            queue_timeout_seconds: 30.0,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            dry_run: false,
        },
        active: 412,
        active_max: 500,
        queued: 3,
        queued_longest_seconds: 12.5,
        sources: 40,
        top_sources: vec![SourceSessions {
            source: "192.0.2.7".into(),
            sessions: 20,
        }],
        top_refused: vec![SourceRefused {
            source: "192.0.2.7".into(),
            refusals: 9,
            reasons: vec![
                ReasonCount {
                    reason: "source_limit".into(),
                    count: 8,
                },
                ReasonCount {
                    reason: "rate_limit".into(),
                    count: 1,
                },
            ],
        }],
        backends: vec![
            BackendView {
                address: "192.0.2.25:25".into(),
                up: true,
                backup: false,
                active: 400,
                limit: Some(450),
                learned: true,
                phase: Some("steady".into()),
                resumed: true,
                last_check: Some(CheckView {
                    result: "passed".into(),
                    seconds_ago: 1.2,
                }),
            },
            BackendView {
                address: "192.0.2.26:25".into(),
                up: false,
                backup: true,
                active: 12,
                limit: None,
                learned: false,
                phase: None,
                resumed: false,
                last_check: None,
            },
        ],
        cluster: None,
        pregreet: None,
    }
}

#[test]
fn the_status_line_reads_at_a_glance() {
    let mut s = snapshot();
    assert_eq!(
        s.status_line(),
        "412/1000 sessions, 3 waiting, 1/2 backends up"
    );
    s.limits.max_connections = 0;
    s.limits.dry_run = true;
    assert_eq!(
        s.status_line(),
        "412 sessions, 3 waiting, 1/2 backends up, dry run"
    );
}

#[test]
fn the_json_reads_back_as_the_same_snapshot() {
    let s = snapshot();
    let text = serde_json::to_string(&s).unwrap();
    let back: Snapshot = serde_json::from_str(&text).unwrap();
    assert_eq!(back, s);
}

#[test]
fn the_tables_show_every_part_of_the_view() {
    let text = client::render(&snapshot());
    for want in [
        "mxgate 0.1.0: 412/1000 sessions, 3 waiting, 1/2 backends up",
        "412 active (limit 1000, peak 500), 3 waiting, the longest for 12.5s (max 1000, timeout 30s), 40 sources",
        "max_per_source 20, reserved_for_allowed 50",
        "2 reloads, last succeeded",
        "  192.0.2.25:25           up      400     450 (learned, steady, resumed)  passed, 1s ago",
        "  192.0.2.26:25 (backup)  DOWN    12      global                          none yet",
        "  192.0.2.7  20",
        "  192.0.2.7  9         source_limit 8, rate_limit 1",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }
}
