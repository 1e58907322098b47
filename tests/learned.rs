//! A learned limit (`max_connections = "auto"`) at production scale: from a cold start it
//! reaches a backend's hidden limit of hundreds within a few session lengths (slow start),
//! its first overshoot stays bounded, and a restart with a state directory resumes it at once.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mxgate::config::Config;
use mxgate::load::sink::{Behaviour, Sink};
use mxgate::load::{self, Bound, Options};
use tokio::time::Instant;

/// The backend's hidden limit, and how long it holds each session before its greeting.
const HIDDEN: usize = 300;
const HOLD: Duration = Duration::from_millis(300);

async fn exchange_sink() -> Sink {
    let behaviour = Behaviour {
        limit: Some(HIDDEN),
        hold: HOLD,
        ..Behaviour::exchange(HIDDEN)
    };
    Sink::start_with("127.0.0.1:0".parse().unwrap(), behaviour)
        .await
        .unwrap()
}

/// The learned-limit config of these tests: up to 2000 clients wait a minute, and the
/// learned limit is kept in `state_dir` when there is one.
fn learned_config(backend: SocketAddr, state_dir: Option<&Path>) -> Config {
    let mut c = auto_config(backend, 2000, Duration::from_secs(60));
    c.state_dir = state_dir.map(Path::to_path_buf);
    c
}

fn limit_of(mx: &mxgate::Running) -> usize {
    mx.snapshot().backends[0].limit.expect("a learned limit")
}

/// Runs `concurrency` closed-loop clients against `mx` for `len`, and samples the learned
/// limit every 50 ms meanwhile: returns the load's stats and (time since start, limit) pairs.
async fn climb(
    mx: &Arc<mxgate::Running>,
    concurrency: usize,
    len: Duration,
) -> (load::Stats, Vec<(Duration, usize)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (mx, stop) = (mx.clone(), stop.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut seen = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                seen.push((started.elapsed(), limit_of(&mx)));
            }
            seen
        })
    };
    let opts = Options {
        sources: Some("127.21.0.0/16".parse().unwrap()),
        ..Options::new(mx.listen_addrs()[0], concurrency, Bound::Duration(len))
    };
    let stats = load::run(&opts).await;
    stop.store(true, Ordering::SeqCst);
    (stats, sampler.await.unwrap())
}

fn backend_series(mx: &mxgate::Running, name: &str, backend: SocketAddr) -> f64 {
    let text = mx.render_metrics();
    let series = format!("{name}{{backend=\"{backend}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn state_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mxgate-learned-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// From 5, a hidden 300 is reached (85 %) within 10 s of 300 ms sessions; before slow start,
/// one step per limit's worth of sessions took it from 5 to about 15 in that time. The
/// first overshoot is bounded: the limit never goes far past what the backend held, the cut
/// lands under it, and no client sees a 421 of any kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_limit_climbs_to_hundreds_in_seconds_with_a_bounded_overshoot() {
    let sink = exchange_sink().await;
    let mx = Arc::new(start(learned_config(sink.addr, None)).await);
    assert_eq!(limit_of(&mx), 5);
    assert_eq!(
        mx.snapshot().backends[0].phase.as_deref(),
        Some("slow start")
    );
    let (stats, seen) = climb(&mx, 450, Duration::from_secs(15)).await;
    assert!(!seen.is_empty());
    let reached = seen
        .iter()
        .find(|(_, l)| *l * 100 >= HIDDEN * 85)
        .map(|(t, _)| *t);
    let peak = seen.iter().map(|(_, l)| *l).max().unwrap();
    let busy = backend_series(&mx, "mxgate_backend_busy_total", sink.addr);
    let selected = backend_series(&mx, "mxgate_backend_selected_total", sink.addr);
    let at_end = limit_of(&mx);
    let view = mx.snapshot().backends[0].clone();
    eprintln!(
        "reached 85% after {reached:?}; peak limit {peak}; at end {at_end} ({:?}); \
         {busy} busy of {selected} backend connections; backend peak {}",
        view.phase,
        sink.peak()
    );
    let reached = reached.expect("the learned limit reached 85 % of the hidden one");
    assert!(reached <= Duration::from_secs(10), "85 % after {reached:?}");
    // The overshoot: the backend never held more than its limit, the limit went past it by
    // no more than a tenth, and the cut left it under what the backend held.
    assert!(sink.peak() <= HIDDEN);
    assert!(peak <= HIDDEN + HIDDEN / 10, "the limit went to {peak}");
    assert!(
        busy > 0.0,
        "the backend never said busy: the climb never reached it"
    );
    assert!((HIDDEN * 8 / 10..=HIDDEN).contains(&at_end), "{at_end}");
    assert_eq!(view.phase.as_deref(), Some("steady"));
    assert!(!view.resumed);
    assert!(
        busy <= 0.05 * selected,
        "{busy} busy greetings of {selected} backend connections"
    );
    // Every busy greeting was absorbed: no client saw a 421.
    assert!(stats.refused.is_empty(), "{:?}", stats.refused);
    assert_eq!(stats.refused_later, 0, "{}", stats.table());
    assert_eq!(busy as u64, sink.busy());
    assert!(stats.delivered > 1000, "{}", stats.table());
    Arc::try_unwrap(mx)
        .ok()
        .unwrap()
        .shutdown(Duration::from_secs(5))
        .await;
}

/// The learned limit, its baseline and phase are written to the state directory and read
/// back by the next start, which serves at that limit from its first client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_the_state_directory_resumes_the_learned_limit() {
    let sink = exchange_sink().await;
    let dir = state_dir("restart");
    let mx = Arc::new(start(learned_config(sink.addr, Some(&dir))).await);
    let (_, seen) = climb(&mx, 450, Duration::from_secs(12)).await;
    assert!(!seen.is_empty());
    let learned = limit_of(&mx);
    assert!(learned * 100 >= HIDDEN * 80, "learned only {learned}");
    let mx = Arc::try_unwrap(mx).ok().unwrap();
    mx.shutdown(Duration::from_secs(5)).await;
    let text = std::fs::read_to_string(dir.join("learned-limits.json")).unwrap();
    assert!(text.contains(&format!("\"limit\": {learned}")), "{text}");
    assert!(text.contains("\"phase\": \"steady\""), "{text}");

    // The next start resumes it before any client comes, and says so.
    let mx = start(learned_config(sink.addr, Some(&dir))).await;
    assert_eq!(limit_of(&mx), learned);
    assert_eq!(
        backend_series(&mx, "mxgate_backend_limit", sink.addr),
        learned as f64
    );
    let view = mx.snapshot().backends[0].clone();
    assert!(view.resumed);
    assert_eq!(view.phase.as_deref(), Some("steady"));
    mx.shutdown(Duration::from_secs(5)).await;

    // Without the directory, the same backend starts cold.
    let cold = start(learned_config(sink.addr, None)).await;
    assert_eq!(limit_of(&cold), 5);
    assert!(!cold.snapshot().backends[0].resumed);
    cold.shutdown(Duration::from_secs(5)).await;

    // A damaged file is ignored: a cold start, and the next save replaces it.
    std::fs::write(dir.join("learned-limits.json"), "{\"version\": 1, \"backe").unwrap();
    let mx = start(learned_config(sink.addr, Some(&dir))).await;
    assert_eq!(limit_of(&mx), 5);
    mx.shutdown(Duration::from_secs(5)).await;
    let text = std::fs::read_to_string(dir.join("learned-limits.json")).unwrap();
    assert!(text.contains("\"limit\": 5"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A state directory that cannot be written is a warning, not a failure: mxgate serves.
#[tokio::test]
async fn an_unwritable_state_directory_does_not_stop_mxgate() {
    let sink = exchange_sink().await;
    let dir = state_dir("unwritable");
    // A file where the directory should be: nothing can be created under it, even by root.
    let not_a_dir = dir.join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let mx = start(learned_config(sink.addr, Some(&not_a_dir))).await;
    let mut client = connect_from("127.0.0.1", mx.listen_addrs()[0])
        .await
        .unwrap();
    let greeting = read_line(&mut client).await;
    assert!(
        greeting.starts_with(b"220 "),
        "{:?}",
        String::from_utf8_lossy(&greeting)
    );
    drop(client);
    mx.shutdown(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `mxgate run` under systemd's `StateDirectory=`: the directory comes from
/// `$STATE_DIRECTORY`, the file is there once mxgate listens, and a damaged file is named in
/// exactly one warning. A relative `state_dir` is refused with the key named.
#[tokio::test]
async fn the_binary_takes_its_state_directory_from_systemd_and_warns_once_about_a_damaged_file() {
    use std::process::{Command, Stdio};
    let sink = exchange_sink().await;
    let dir = state_dir("systemd");
    let backend = format!("{},max_connections=auto", sink.addr);
    let run = |log: &Path| {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Spawn::new(&backend, listen)
            .default_hostname()
            .command()
            .env("STATE_DIRECTORY", &dir)
            .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
            .spawn()
            .unwrap();
        child
    };
    let stop = |mut child: std::process::Child| {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        assert!(child.wait().unwrap().success());
    };
    // Saved once at start, before any client is served: the directory is known to be
    // writable from the first moment.
    let saved_cold = |file: PathBuf| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            if text.contains("\"limit\": 5") {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no cold state in {}: {text}",
                file.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let file = dir.join("learned-limits.json");
    let log = dir.join("first.log");
    let child = run(&log);
    let text = saved_cold(file.clone()).await;
    assert!(text.contains("slow_start"), "{text}");
    stop(child);
    let about_state = |log: &Path| -> Vec<String> {
        std::fs::read_to_string(log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("learned"))
            .map(String::from)
            .collect()
    };
    assert_eq!(about_state(&log), Vec::<String>::new());

    std::fs::write(&file, "garbage").unwrap();
    let log = dir.join("second.log");
    let child = run(&log);
    saved_cold(file.clone()).await;
    stop(child);
    let warnings = about_state(&log);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("learned-limits.json is not a learned-limits file")
            && warnings[0].contains("learned backend limits start cold"),
        "{warnings:?}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .args([
            "check",
            "--backend",
            &backend,
            "--state-dir",
            "relative/dir",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("--state-dir") && said.contains("relative/dir is not an absolute path"),
        "{said}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--state-dir ""` turns the state directory off, even under systemd's `$STATE_DIRECTORY`.
#[test]
fn an_empty_state_dir_flag_turns_it_off() {
    use std::process::Command;
    let dir = state_dir("off");
    let out = Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .args(["check", "--backend", "127.0.0.1:2526,max_connections=auto"])
        .args(["--state-dir", ""])
        .env("STATE_DIRECTORY", &dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        settings: mxgate::config::Settings,
    }
    let flags = <Flags as clap::Parser>::try_parse_from([
        "mxgate",
        "--backend",
        "127.0.0.1:2526",
        "--state-dir",
        "",
    ])
    .unwrap();
    assert_eq!(
        flags.settings.state_dir.as_deref(),
        Some(std::path::Path::new(""))
    );
    let config = flags.settings.validate(None).unwrap();
    assert_eq!(config.state_dir, None);
    let _ = std::fs::remove_dir_all(&dir);
}
