//! `mxgate load` and `mxgate demo`: counts that match what the sink accepted and what mxgate's
//! `/metrics` says, JSON output, the ramp's knee, and the loopback guard.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;
use mxgate::load::{self, sink::Sink, Bound, Options};

fn opts(target: SocketAddr, sources: &str, concurrency: usize, sessions: u64) -> Options {
    Options {
        target,
        sources: Some(sources.parse().unwrap()),
        concurrency,
        bound: Bound::Sessions(sessions),
        message_size: 4096,
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_match_what_the_sink_accepted_directly_and_through_mxgate() {
    let sink = Sink::start().await.unwrap();
    let direct = load::run(&opts(sink.addr, "127.0.3.0/24", 8, 200)).await;
    assert_eq!(direct.delivered, 200);
    assert_eq!(sink.delivered(), 200);
    assert_eq!(direct.sessions(), 200);

    let mx = start(config(sink.addr)).await;
    let through = load::run(&opts(mx.listen_addrs()[0], "127.0.4.0/24", 8, 200)).await;
    assert_eq!(through.delivered, 200, "{}", through.table());
    assert_eq!(sink.delivered(), 400);
    assert!(through.greeting.len() == 200 && through.session.len() == 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_limit_refusals_counted_by_load_equal_the_metrics() {
    let sink = Sink::start().await.unwrap();
    let mut c = config(sink.addr);
    c.max_per_source = 2;
    let mx = start(c).await;
    let stats = load::run(&opts(mx.listen_addrs()[0], "127.0.0.2/32", 10, 300)).await;
    eventually("sessions ended", || mx.admission().active() == 0).await;
    let refused = stats.refused.get("421 4.7.0").copied().unwrap_or(0);
    assert!(refused > 0, "the limit was hit: {}", stats.table());
    assert_eq!(stats.delivered + refused, 300, "{}", stats.table());
    assert_eq!(stats.delivered, sink.delivered());
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"source_limit\"}"
        ),
        refused as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_against_postfix_smtp_sink_through_mxgate() {
    let Some(sink) = SmtpSink::start(&[]).await else {
        return;
    };
    let mx = start(config(sink.addr)).await;
    let stats = load::run(&opts(mx.listen_addrs()[0], "127.0.6.0/24", 8, 300)).await;
    assert_eq!(stats.delivered, 300, "{}", stats.table());
}

fn mxgate_load(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .arg("load")
        .args(args)
        .output()
        .unwrap()
}

/// Runs `mxgate load --target TARGET ARGS... --json` off the runtime, requires success, and
/// returns its standard output.
async fn mxgate_load_json(target: String, args: &'static [&'static str]) -> String {
    let out = tokio::task::spawn_blocking(move || {
        let mut all = vec!["--target", target.as_str()];
        all.extend_from_slice(args);
        all.push("--json");
        mxgate_load(&all)
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_is_one_object_with_every_field() {
    let sink = Sink::start().await.unwrap();
    let target = sink.addr.to_string();
    let text = mxgate_load_json(target, &["--sessions", "50", "--sources", "127.0.7.0/24"]).await;
    assert_eq!(
        text.trim().lines().count(),
        1,
        "nothing else on stdout: {text}"
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["delivered"], 50);
    for key in ["connect_errors", "timeouts", "refused_later"] {
        assert_eq!(v[key], 0, "{key}");
    }
    assert!(v["refused"].as_object().unwrap().is_empty());
    for which in ["greeting", "session"] {
        for p in ["p50", "p90", "p99", "max"] {
            assert!(
                v["latency_us"][which][p].as_u64().unwrap() > 0,
                "{which} {p}"
            );
        }
    }
    assert!(v["sessions_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(sink.delivered(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ramp_stops_at_the_knee_and_recommends_limits() {
    let sink = Sink::start().await.unwrap();
    let mut c = config(sink.addr);
    c.max_connections = 4;
    // The ramp finds the knee where refusals begin: with the queue off, a full server refuses.
    c.queue_timeout = std::time::Duration::ZERO;
    let mx = start(c).await;
    let target = mx.listen_addrs()[0].to_string();
    let text = mxgate_load_json(
        target,
        &[
            "--ramp",
            "2..12/2",
            "--sessions",
            "60",
            "--sources",
            "127.0.8.0/24",
        ],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let knee = v["knee"]
        .as_u64()
        .expect("a knee below the end of the ramp");
    assert!(
        knee <= 6,
        "refusals must appear once concurrency passes the limit of 4: {v}"
    );
    let steps = v["steps"].as_array().unwrap();
    assert!(!steps.is_empty());
    assert_eq!(steps.last().unwrap()["concurrency"], knee);
    let recommended = v["recommended"]["max_connections"].as_u64().unwrap();
    assert!(recommended < knee && recommended <= 4, "{v}");
    assert!(v["reasoning"].as_str().unwrap().contains("max_connections"));
}

#[test]
fn remote_targets_are_refused_without_allow_remote() {
    let out = mxgate_load(&["--target", "192.0.2.1:25", "--sessions", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));
}

#[test]
fn demo_runs_to_completion_with_deliveries_and_refusals() {
    let out = Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .arg("demo")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let row = |label: &str| -> Vec<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("{label}: {text}"));
        line[label.len()..]
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    // Two tables: many and greedy sources, then the burst with the queue on and off.
    let rows = |label: &str| -> Vec<Vec<u64>> {
        text.lines()
            .filter(|l| l.starts_with(label))
            .map(|l| {
                l[label.len()..]
                    .split_whitespace()
                    .map(|n| n.parse().unwrap())
                    .collect()
            })
            .collect()
    };
    // Three tables: the last is the learned limit in front of an Exchange-like server.
    let mut delivered = rows("delivered").concat();
    assert_eq!(delivered.len(), 5, "{text}");
    assert!(delivered.iter().all(|&n| n > 0), "{text}");
    delivered.pop();
    // Its own 421s never reached a client; it was never given more than its hidden 15.
    assert_eq!(row("refused 421 (seen by clients)"), [0], "{text}");
    assert!(row("most sessions the server held")[0] <= 15, "{text}");
    let learned = row("learned limit")[0];
    assert!((5..=15).contains(&learned), "{text}");
    // The burst of 120: absorbed by the queue, refused past the limit without it.
    assert_eq!(delivered[2], 120, "{text}");
    assert_eq!(rows("refused 421  "), [vec![0u64, 108]], "{text}");
    let source_refusals = row("refused 421 4.7.0");
    assert!(
        source_refusals[1] > 0,
        "the greedy source was refused: {text}"
    );
    assert!(
        text.contains("mxgate_connections_rejected_total{reason=\"source_limit\"}"),
        "{text}"
    );
    let accepted: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("the sink accepted "))
        .and_then(|r| r.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(accepted, delivered.iter().sum::<u64>());
}
