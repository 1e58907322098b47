//! Answering at exhaustion (the issue "Trust under exhaustion", point 3), with descriptors
//! that stay exhausted: the real binary under `prlimit --nofile=512:512`, its 20 sessions
//! held, its queue full of silent waiters that never leave, and a burst of silent clients
//! from a denied network, each held in its deny dialogue for [`DENY_TIME`] (at most
//! [`MAX_DENYING`] of them). Those take every descriptor left, and none comes free before
//! the first dialogue ends: nothing a refused client does frees one in time. A new client
//! can then only be answered from an accept loop's reserve descriptor, and a scrape only
//! taken from the metrics listener's.
//!
//! Checked while it lasts, five times over: mxgate holds every descriptor it may, a new
//! client gets the global-limit 421 within 1 s, and a scrape is answered 200 within 2 s.

mod common;
#[path = "exhaustion/shared.rs"]
mod shared;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mxgate::reply::{DENY_TIME, MAX_DENYING};
use shared::*;
use tokio::time::Instant;

const LIMIT: u64 = 512;
const HOLDERS: usize = 20;
const THREADS: usize = 2;
const PROBES: usize = 5;
/// The denied network, from which the burst comes (`source(60, i)`).
const DENIED: &str = "127.60.0.0/16";

/// Clients that connect from `127.{base}.x.y`, `most` at most, one every `pace` (all at once
/// when zero), until `stop`; each keeps its connection open and never sends a byte, whatever
/// it is told. Counts the connections made.
fn silent_clients(
    at: SocketAddr,
    base: usize,
    most: usize,
    pace: Duration,
    stop: Arc<AtomicBool>,
    made: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        let mut tick = tokio::time::interval(pace.max(Duration::from_micros(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 0..most {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if !pace.is_zero() {
                tick.tick().await;
            }
            let (src, made) = (source(base, i), made.clone());
            tasks.spawn(async move {
                let Ok(s) = connect_from(&src, at).await else {
                    return;
                };
                made.fetch_add(1, Ordering::Relaxed);
                let _held = s;
                std::future::pending::<()>().await
            });
        }
        // Until the test aborts this task: the tasks hold their connections.
        let _held = tasks;
        std::future::pending::<()>().await
    })
}

/// Scrapes `m` until `done` holds for the page, for up to `limit`.
async fn scrape_until(m: SocketAddr, limit: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(page) = get_metrics(m).await {
            if done(&page) {
                return page;
            }
        }
        assert!(Instant::now() < deadline, "no such scrape in {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_descriptors_held_exhausted_newcomers_and_scrapes_are_answered() {
    if !require_tool("prlimit") {
        return;
    }
    raise_nofile();
    let backend = GreetingBackend::start().await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir =
        std::env::temp_dir().join(format!("mxgate-exhaustion-reserve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("stderr");
    let mut run = std::process::Command::new("prlimit");
    run.arg(format!("--nofile={LIMIT}:{LIMIT}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_mxgate"))
        .args(["run", "--hostname", HOST, "--threads", &THREADS.to_string()])
        // Not about the pregreet test (on by default as `ignore`): admitted clients get the
        // backend's greeting at once.
        .args(["--pregreet", "off"])
        .args(["--backend", &backend.addr.to_string()])
        .args(["--listen", &listen.to_string()])
        .args(["--metrics", &metrics.to_string()])
        .args(["--max-connections", "20", "--max-queued", "2000"])
        .args(["--queue-timeout", "120s", "--deny", DENIED])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let child = KillOnDrop(run.spawn().unwrap());
    let pid = child.0.id();
    scrape_until(metrics, Duration::from_secs(10), |_| true).await;
    let mut same = mxgate::config::Config::for_backend(backend.addr);
    (same.max_connections, same.max_queued, same.threads) = (20, 2000, THREADS);
    // As the process runs it: with the pregreet test off, which the budget then leaves out.
    same.pregreet.action = mxgate::config::Pregreet::Off;
    let budget = mxgate::descriptors::Budget::of(&same, THREADS);
    let queue = mxgate::descriptors::caps(&same, &budget, LIMIT).max_queued;

    // Every slot held, and the queue full of waiters that stay (they never time out here).
    let mut holders = Vec::new();
    for i in 0..HOLDERS {
        holders.push(expect_admitted(&format!("127.0.1.{}", i + 1), listen).await);
    }
    let never = Arc::new(AtomicBool::new(false));
    let waiting = Arc::new(AtomicUsize::new(0));
    let waiters = silent_clients(listen, 20, queue, Duration::ZERO, never, waiting);
    scrape_until(metrics, Duration::from_secs(20), |p| {
        sample(p, "mxgate_connections_queued") == queue as f64
    })
    .await;

    // The denied burst: more than the descriptors left, all at once.
    let burst_started = Instant::now();
    let arrived = Arc::new(AtomicUsize::new(0));
    let burst = MAX_DENYING + 64;
    let denied = silent_clients(
        listen,
        60,
        burst,
        Duration::ZERO,
        Arc::new(AtomicBool::new(false)),
        arrived.clone(),
    );
    // Out of descriptors: the accept loops have met EMFILE (their warning is logged at once)
    // and mxgate holds every descriptor it may.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logged = std::fs::read_to_string(&log).unwrap();
        if logged.contains("accept failed")
            && logged.contains(&listen.to_string())
            && arrived.load(Ordering::Relaxed) == burst
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never out of descriptors ({} of the burst connected, {} descriptors open):\n{logged}",
            arrived.load(Ordering::Relaxed),
            fd_count(pid)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at_limit = fd_count(pid);

    let mut answers = Vec::new();
    let mut scrapes = Vec::new();
    let mut fds = Vec::new();
    for i in 0..PROBES {
        fds.push(fd_count(pid));
        let t = Instant::now();
        let mut s = connect_from(&format!("127.0.2.{}", i + 1), listen)
            .await
            .unwrap();
        let line = first_line(&mut s, Duration::from_secs(1)).await;
        assert_eq!(
            line.as_deref().map(String::from_utf8_lossy),
            Some(String::from_utf8_lossy(GLOBAL_LINE)),
            "probe {i}: the global-limit 421 within 1 s ({} descriptors open)",
            fd_count(pid)
        );
        answers.push(t.elapsed());
        // Told to go away, it goes, as a real client does.
        drop(s);
        let t = Instant::now();
        let page = tokio::time::timeout(Duration::from_secs(2), get_metrics(metrics))
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| {
                panic!(
                    "probe {i}: no scrape answered within 2 s ({} descriptors open)",
                    fd_count(pid)
                )
            });
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
        scrapes.push(t.elapsed());
    }
    // Exhausted throughout: the probes ended before the first deny dialogue could, and each
    // began with every descriptor held, give or take a health check's socket.
    let took = burst_started.elapsed();
    assert!(
        took < DENY_TIME,
        "the probes outlasted the deny dialogues ({took:?}): nothing was proven"
    );
    let fewest = *fds.iter().min().unwrap();
    assert!(
        fewest as u64 >= LIMIT - 8,
        "descriptors open at the probes: {fds:?} (limit {LIMIT})"
    );
    let page = scrape_until(metrics, Duration::from_secs(10), |_| true).await;
    let emfile = sample(
        &page,
        r#"mxgate_local_errors_total{op="accept",errno="EMFILE"}"#,
    );
    let rejected = |reason: &str| {
        sample(
            &page,
            &format!(r#"mxgate_connections_rejected_total{{reason="{reason}"}}"#),
        )
    };
    let (denied_count, global) = (rejected("denied"), rejected("global_limit"));
    println!(
        "figures: queue held at {queue}, burst of {burst} denied clients: denied {denied_count}, \
         global_limit {global} (answered from the reserve), accept EMFILE {emfile}; \
         descriptors open at exhaustion {at_limit}, at the probes {fds:?}; new client's 421 \
         at exhaustion: worst {} ms of {PROBES}; scrape: worst {} ms of {PROBES}; all within \
         {} ms of the burst",
        answers.iter().max().unwrap().as_millis(),
        scrapes.iter().max().unwrap().as_millis(),
        took.as_millis(),
    );
    denied.abort();
    waiters.abort();
    drop(holders);
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}
