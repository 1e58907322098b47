//! The shipped alert rules, unit-tested with `promtool test rules` on synthetic series: each
//! alert fires when it should, and stays quiet for the look-alikes (one abusive source, deny
//! list hits, a queue that empties, a backend that flapped once, a limit of 0).

mod common;

use std::path::Path;
use std::process::Command;

use common::require_tool;

#[test]
fn every_alert_fires_and_stays_quiet_when_it_should() {
    if !require_tool("promtool") {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/alerts");
    let out = Command::new("promtool")
        .args(["test", "rules", "mxgate-alerts.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every alert in the rules file has a test case.
    let rules = std::fs::read_to_string(dir.join("../../systemd/mxgate-alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("mxgate-alerts.test.yml")).unwrap();
    let names: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(names.len() >= 10, "{names:?}");
    for n in names {
        assert!(
            tests.contains(&format!("alertname: {n}\n")),
            "no promtool test for {n}"
        );
    }
}
