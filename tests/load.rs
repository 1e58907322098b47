//! `mxgate load` and `mxgate demo`: counts that match what the sink accepted and what mxgate's
//! `/metrics` says, JSON output, the ramp's knee, and the loopback guard.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;
use mxgate::load::sink::{Behaviour, Sink};
use mxgate::load::{self, Arrivals, Bound, Options, Sizes};
use std::time::Duration;

fn opts(target: SocketAddr, sources: &str, concurrency: usize, sessions: u64) -> Options {
    Options {
        sources: Some(sources.parse().unwrap()),
        sizes: Sizes::Fixed(4096),
        ..Options::new(target, concurrency, Bound::Sessions(sessions))
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
    let ramp: Vec<&serde_json::Value> = steps.iter().filter(|s| s["phase"] == "step").collect();
    assert!(!ramp.is_empty());
    // The ramp stopped at its first bad step; bisection then looked below it.
    let stop = ramp.last().unwrap();
    assert_ne!(stop["verdict"], "good", "{v}");
    assert!(knee <= stop["concurrency"].as_u64().unwrap());
    let recommended = v["recommended"]["max_connections"].as_u64().unwrap();
    assert!(recommended < knee && recommended <= 4, "{v}");
    assert_eq!(v["last_good"], recommended);
    assert!(v["reasoning"].as_str().unwrap().contains("max_connections"));
    assert!(
        v["recommended"].get("max_per_source").is_none(),
        "not measured: {v}"
    );
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

/// Runs `mxgate load ARGS...` off the runtime and returns its status, stdout and stderr.
async fn mxgate_load_owned(args: Vec<String>) -> (bool, String, String) {
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        mxgate_load(&args)
    })
    .await
    .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// An Exchange-like server with a hidden limit of 37 that holds each session 100 ms, so its
/// delivered rate grows with concurrency up to the limit.
async fn exchange_37() -> Sink {
    let behaviour = Behaviour {
        hold: Duration::from_millis(100),
        ..Behaviour::exchange(37)
    };
    Sink::start_with("127.0.0.1:0".parse().unwrap(), behaviour)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ramp_without_mxgate_finds_the_hidden_limit_and_plots_it() {
    let sink = exchange_37().await;
    let plot = std::env::temp_dir().join(format!("mxgate-ramp-{}.svg", std::process::id()));
    let target = sink.addr.to_string();
    let base = [
        "--target",
        &target,
        "--ramp",
        "5..60/5",
        "--duration",
        "1500ms",
    ];
    // The server offers STARTTLS: not loaded until the operator says plain text will do.
    let (ok, _, err) = mxgate_load_owned(strings(&base)).await;
    assert!(!ok);
    assert!(
        err.contains("offers STARTTLS") && err.contains("--starttls-skip"),
        "{err}"
    );
    assert_eq!(sink.delivered(), 0, "nothing was sent");

    let mut args = strings(&base);
    args.extend(strings(&[
        "--starttls-skip",
        "--sources",
        "127.0.9.0/24",
        "--json",
    ]));
    args.extend(["--plot".to_string(), plot.display().to_string()]);
    let (ok, text, err) = mxgate_load_owned(args).await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let knee = v["knee"].as_f64().expect("a knee");
    let limit = v["recommended"]["max_connections"].as_f64().unwrap();
    for (what, x) in [("knee", knee), ("recommended", limit)] {
        assert!(
            (x - 37.0).abs() <= 0.2 * 37.0,
            "{what} {x} is not within 20 % of 37: {v}"
        );
    }
    // The steps past the limit failed for refusals, which the summaries name.
    let steps = v["steps"].as_array().unwrap();
    let bisected = steps.iter().filter(|s| s["phase"] == "bisect").count();
    assert!((1..=3).contains(&bisected), "{v}");
    let bad = steps
        .iter()
        .find(|s| s["verdict"] == "errors")
        .expect("a step with errors");
    assert!(
        bad["summary"]["refused"]["421 4.3.2"].as_u64().unwrap() > 0,
        "{bad}"
    );

    // The plot: an SVG with both series over every point run, and the knee marked.
    let check = format!(
        r#"
import sys, xml.etree.ElementTree as ET
ns = {{"s": "http://www.w3.org/2000/svg"}}
root = ET.parse(sys.argv[1]).getroot()
assert root.tag == "{{http://www.w3.org/2000/svg}}svg", root.tag
for id in ("delivered", "p99"):
    line = root.find(f".//s:polyline[@id='{{id}}']", ns)
    pts = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
    assert len(pts) == {n}, (id, len(pts))
    xs = [p[0] for p in pts]
    assert xs == sorted(xs), xs
knee = root.find(".//s:g[@id='knee']", ns)
text = "".join(knee.itertext())
assert text == "knee {knee}", text
print("ok")
"#,
        n = steps.len(),
        knee = knee as u64
    );
    let out = Command::new("python3")
        .args(["-c", &check, plot.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&plot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_the_server_refuses_is_reported_in_plain_words() {
    let sink = exchange_37().await;
    let target = sink.addr.to_string();
    let args = [
        "--target",
        &target,
        "--starttls-skip",
        "--sessions",
        "20",
        "--concurrency",
        "4",
        "--to",
        "someone@example.org",
    ];
    let (ok, table, err) = mxgate_load_owned(strings(&args)).await;
    assert!(ok, "{err}");
    assert!(
        table.contains("every session (20) was refused at RCPT 550 5.7.54: the server does not accept the recipient: give --to an address it takes"),
        "{table}"
    );
    let mut json = strings(&args);
    json.push("--json".into());
    let (ok, text, err) = mxgate_load_owned(json).await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["delivered"], 0);
    assert_eq!(v["refused_later"], 20);
    assert_eq!(
        v["refused_later_by"],
        serde_json::json!({"RCPT 550 5.7.54": 20})
    );
    assert_eq!(sink.delivered(), 0);

    // Accepted recipients, used in turn, with the operator's sender and EHLO name.
    let args = [
        "--target",
        &target,
        "--starttls-skip",
        "--sessions",
        "10",
        "--to",
        "a@mxgate.test",
        "--to",
        "b@MXGATE.test",
        "--from",
        "probe@mxgate.test",
        "--ehlo",
        "loadgen.example",
        "--json",
    ];
    let (ok, text, err) = mxgate_load_owned(strings(&args)).await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["delivered"], 10, "{v}");
    assert_eq!(sink.delivered(), 10);
    // A malformed address is refused before anything is sent.
    let (ok, _, err) = mxgate_load_owned(strings(&["--target", &target, "--to", "a b@x"])).await;
    assert!(!ok && err.contains("invalid address"), "{err}");
}

/// A sink that holds each session `hold`.
async fn holding(hold: Duration) -> Sink {
    let behaviour = Behaviour {
        hold,
        ..Behaviour::default()
    };
    Sink::start_with("127.0.0.1:0".parse().unwrap(), behaviour)
        .await
        .unwrap()
}

fn open(target: SocketAddr, rate: f64, secs: u64) -> Options {
    Options {
        arrivals: Arrivals::Open(rate),
        ..Options::new(target, 1, Bound::Duration(Duration::from_secs(secs)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_concurrency_follows_littles_law() {
    let sink = holding(Duration::from_millis(100)).await;
    let stats = load::run(&open(sink.addr, 100.0, 3)).await;
    assert_eq!(stats.errors(), 0, "{}", stats.table());
    assert_eq!(stats.delivered, sink.delivered());
    // 100 sessions/s held 0.1 s each: 10 at once on average.
    for (what, mean) in [
        ("sampled", stats.sampled_concurrency),
        ("Little's law", stats.little_concurrency()),
    ] {
        assert!(
            (mean - 10.0).abs() <= 1.0,
            "{what} mean {mean}: {}",
            stats.table()
        );
    }
    assert!(stats.peak_concurrency as f64 > stats.sampled_concurrency);
    assert_eq!(stats.offered_rate, Some(100.0));
    // Arrivals are Poisson: the count in 3 s is near 300, and set by the seed.
    assert!(
        (250..=350).contains(&stats.sessions()),
        "{}",
        stats.sessions()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_shows_in_open_loop_latency_and_hides_from_a_closed_loop() {
    let p90 = |s: &load::Stats| s.session.value_at_quantile(0.90) as f64;
    let stalled_run = |opts: Options| async move {
        let sink = holding(Duration::from_millis(20)).await;
        let opts = Options {
            target: sink.addr,
            ..opts
        };
        sink.stall(
            std::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        load::run(&opts).await
    };
    let steady_run = |opts: Options| async move {
        let sink = holding(Duration::from_millis(20)).await;
        let opts = Options {
            target: sink.addr,
            ..opts
        };
        load::run(&opts).await
    };
    let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
    // 100 sessions/s of 20 ms: the same work as 2 clients in a loop.
    let open_loop = open(unused, 100.0, 3);
    let closed_loop = Options::new(unused, 2, Bound::Duration(Duration::from_secs(3)));
    let open_steady = steady_run(open_loop.clone()).await;
    let open_stalled = stalled_run(open_loop).await;
    let closed_steady = steady_run(closed_loop.clone()).await;
    let closed_stalled = stalled_run(closed_loop).await;
    for s in [&open_steady, &open_stalled, &closed_steady, &closed_stalled] {
        assert_eq!(s.errors(), 0, "{}", s.table());
    }
    // Every session due during the stall waited for it, and says so.
    assert!(
        p90(&open_stalled) > 10.0 * p90(&open_steady),
        "open loop p90 {} vs {}",
        p90(&open_stalled),
        p90(&open_steady)
    );
    // Two clients stuck in the stall are two samples: the closed loop's p90 does not move.
    assert!(
        p90(&closed_stalled) < 2.0 * p90(&closed_steady),
        "closed loop p90 {} vs {}",
        p90(&closed_stalled),
        p90(&closed_steady)
    );
    assert!(closed_stalled.sessions() < closed_steady.sessions());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_derives_its_rate_and_delivers_it() {
    let sink = Sink::start().await.unwrap();
    let target = sink.addr.to_string();
    let (ok, text, err) = mxgate_load_owned(strings(&[
        "--target",
        &target,
        "--profile",
        "users=3000,per-user-per-hour=24,peak=5,size=8KiB",
        "--duration",
        "3s",
        "--sources",
        "127.0.10.0/24",
        "--json",
    ]))
    .await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    // docs/sizing.md's formula: users × per user per hour × peak ÷ 3600.
    assert_eq!(v["derived_rate"], 100.0);
    assert_eq!(
        v["formula"],
        "3000 users × 24 messages per user per hour × peak factor 5 ÷ 3600 s = 100.00 sessions/s"
    );
    // Every session the seeded schedule started was delivered.
    let mut gaps = mxgate::load::rng::Rng::new(1);
    let mut t = 0.0;
    let mut due = 0u64;
    loop {
        t += gaps.exponential_gap(100.0).as_secs_f64();
        if t >= 3.0 {
            break;
        }
        due += 1;
    }
    let summary = &v["summary"];
    assert_eq!(summary["delivered"], due, "{v}");
    assert_eq!(sink.delivered(), due);
    let rate = summary["delivered_per_second"].as_f64().unwrap();
    assert!((85.0..=115.0).contains(&rate), "{rate}");
    let mean = summary["mean_message_bytes"].as_f64().unwrap();
    assert!((mean / 8192.0 - 1.0).abs() < 0.25, "mean size {mean}");
    let peak = summary["concurrency"]["peak"].as_f64().unwrap();
    assert_eq!(
        v["recommended"]["max_connections"],
        (peak * 1.5).ceil() as u64,
        "{v}"
    );
    let busiest = summary["concurrency"]["per_source_peak"].as_f64().unwrap();
    assert_eq!(
        v["recommended"]["max_per_source"],
        (busiest * 1.5).ceil() as u64
    );
    assert!(v["reasoning"].as_str().unwrap().contains("max_connections"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_the_server_cannot_keep_up_with_gets_no_recommendation() {
    // 20 sessions/s of capacity (2 at once, 100 ms each) behind mxgate's queue; 50/s arrive.
    let sink = holding(Duration::from_millis(100)).await;
    let mut c = config(sink.addr);
    c.max_connections = 2;
    c.max_queued = 1000;
    c.queue_timeout = Duration::from_secs(30);
    let mx = start(c).await;
    let profile: load::profile::Profile = "users=1000,per-user-per-hour=60,peak=3".parse().unwrap();
    let base = Options {
        sources: Some("127.0.11.0/24".parse().unwrap()),
        ..Options::new(
            mx.listen_addrs()[0],
            1,
            Bound::Duration(Duration::from_secs(2)),
        )
    };
    let report = load::profile::profile(&base, profile, 0.01).await;
    let s = &report.stats;
    // Nobody was refused: the queue held them, and the wait shows as latency.
    assert_eq!(s.errors(), 0, "{}", s.table());
    assert_eq!(s.delivered, sink.delivered());
    assert!(!s.kept_up(load::profile::KEPT_UP), "{}", s.table());
    assert!(s.delivered_in_window * 2 < s.arrivals, "{}", s.table());
    assert!(
        s.session.value_at_quantile(0.9) > 1_000_000,
        "{}",
        s.table()
    );
    assert_eq!(
        (report.max_connections, report.max_per_source),
        (None, None)
    );
    assert!(
        report.reasoning.contains("did not keep up"),
        "{}",
        report.reasoning
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_run_against_a_silent_server_ends_at_its_bound_and_its_cap() {
    // Accepts every connection and never greets.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            open.push(s);
        }
    });
    let opts = Options {
        max_in_flight: 5,
        // Longer than the run: the first five hold their slots through it.
        step: Duration::from_secs(2),
        ..open(addr, 200.0, 1)
    };
    let started = std::time::Instant::now();
    let stats = load::run(&opts).await;
    let took = started.elapsed();
    held.abort();
    assert!(stats.arrivals > 100, "{}", stats.table());
    assert_eq!(
        stats.sessions(),
        stats.arrivals,
        "each arrival counted once"
    );
    assert_eq!(stats.not_started, stats.arrivals - 5, "{}", stats.table());
    assert_eq!(stats.timeouts, 5, "{}", stats.table());
    assert_eq!(stats.delivered, 0);
    // The bound (1 s) and one step (2 s), with room for a busy machine, not 30 s per step.
    assert!(took < Duration::from_secs(6), "took {took:?}");
}

#[test]
fn load_flags_that_cannot_run_well_are_refused_up_front() {
    for (args, says) in [
        (&["--sessions", "0"][..], "--sessions"),
        (&["--concurrency", "0"], "--concurrency"),
        (&["--max-errors", "1"], "1% or 0.5%"),
        (&["--rate", "1e-300/s"], "invalid rate"),
        (&["--rate", "5/s", "--ramp", "1..2"], "cannot be used with"),
        (&["--ramp", "1/s..1e9/s/1e-9"], "invalid ramp"),
        (&["--ramp", "1/s..100000/s/0.01"], "steps; at most 1000"),
        (&["--ramp", "1..18446744073709551615/1"], "invalid ramp"),
        (&["--profile", "users=1e12,per-user-per-hour=1"], "outside"),
        (
            &["--profile", "users=10,per-user-per-hour=10,size=200MiB"],
            "at most 64 MiB",
        ),
        (&["--message-size", "100MiB"], "at most 64 MiB"),
        (&["--ehlo", "x>y"], "invalid EHLO name"),
        (&["--to", "é@example.org"], "invalid address"),
        (&["--from", "a@b>c"], "invalid address"),
        (&["--plot", "x.svg"], "--ramp"),
    ] {
        let mut all = vec!["--target", "127.0.0.1:9"];
        all.extend_from_slice(args);
        let out = mxgate_load(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn a_concurrency_the_descriptor_limit_cannot_hold_is_refused() {
    let bin = env!("CARGO_BIN_EXE_mxgate");
    let out = Command::new("sh")
        .args([
            "-c",
            &format!("ulimit -n 128 && exec {bin} load --target 127.0.0.1:9 --concurrency 200"),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("concurrency 200 needs 200 descriptors, and only 64 are free"),
        "{err}"
    );
}
