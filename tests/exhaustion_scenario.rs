//! The exhaustion scenario of the issue "Trust under exhaustion", on the real binary under
//! `prlimit --nofile=512:512`: `max_connections 20`, `max_queued 2000`, `queue_timeout 60s`,
//! 20 sessions held, then silent clients from distinct sources, then the 20 holders quit
//! together. Checked:
//! - the queue is held to what the limit can hold (the warning gives the caps);
//! - at exhaustion a new client gets its 421 within 1 s, and `/metrics` is still answered;
//! - when the holders quit, exactly 20 waiters are served, and none gets
//!   `backend_unavailable`.
//!
//! `MXGATE_EXHAUSTION_CLIENTS` sets how many silent clients (the issue's 3,000 by default, far
//! more than it takes to run out of descriptors; refused ones keep their connection until
//! mxgate closes it, so the flood need not outrun the refusals' closes).

mod common;
#[path = "exhaustion/shared.rs"]
mod shared;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use shared::*;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

const LIMIT: u64 = 512;
const HOLDERS: usize = 20;
const THREADS: usize = 2;

fn clients() -> usize {
    std::env::var("MXGATE_EXHAUSTION_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

/// What a silent client saw first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Greeting,
    TooMany,
    Unavailable,
    Other,
}

fn seen(line: &[u8]) -> Seen {
    match line {
        l if l == GREETING => Seen::Greeting,
        l if l == GLOBAL_LINE => Seen::TooMany,
        l if l == BACKEND_LINE => Seen::Unavailable,
        _ => Seen::Other,
    }
}

/// A scrape answered 200 within 2 s.
async fn scrape_within_2s(m: SocketAddr) -> String {
    let page = tokio::time::timeout(Duration::from_secs(2), get_metrics(m))
        .await
        .expect("a scrape answered within 2 s")
        .expect("a scrape answered");
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    page
}

/// Silent clients from `127.{base}.x.y`, one per source, connecting until `stop` or `most`;
/// each waits for what mxgate sends and keeps its connection. Counts what they saw.
fn silent_clients(
    at: SocketAddr,
    base: usize,
    most: usize,
    stop: Arc<AtomicBool>,
    greeted: Arc<AtomicUsize>,
    unavailable: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        let mut opened = 0;
        while opened < most && !stop.load(Ordering::Relaxed) {
            let source = source(base, opened);
            opened += 1;
            let (greeted, unavailable) = (greeted.clone(), unavailable.clone());
            tasks.spawn(async move {
                let Ok(mut s) = connect_from(&source, at).await else {
                    return;
                };
                let line = first_line(&mut s, Duration::from_secs(120)).await;
                match line.as_deref().map(seen) {
                    Some(Seen::Greeting) => {
                        greeted.fetch_add(1, Ordering::Relaxed);
                        // Holds the session, silent, as the holders did.
                        let mut b = [0u8; 64];
                        while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
                    }
                    Some(Seen::Unavailable) => {
                        unavailable.fetch_add(1, Ordering::Relaxed);
                    }
                    // Refused: it stays until mxgate closes (its refusal lingers), as a
                    // client that does not hang up at once would; closing here would hand
                    // the descriptor back at once, and the flood would have to outrun that.
                    Some(_) => {
                        let mut b = [0u8; 64];
                        while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
                    }
                    None => {}
                }
            });
            // Let the connects go out in a burst without starving the readers.
            if opened % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        // Until the test ends (it aborts this task): the tasks hold their connections.
        let _held = tasks;
        std::future::pending::<()>().await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_descriptors_waiters_are_served_and_newcomers_answered() {
    if !require_tool("prlimit") {
        return;
    }
    raise_nofile();
    let backend = GreetingBackend::start().await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = std::env::temp_dir().join(format!("mxgate-exhaustion-{}", std::process::id()));
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
        .args(["--queue-timeout", "60s"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let child = KillOnDrop(run.spawn().unwrap());
    let started = Instant::now();
    let pid = child.0.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while get_metrics(metrics).await.is_none() {
        assert!(Instant::now() < deadline, "mxgate did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The queue is held to what 512 descriptors hold: the same config, counted by the library.
    let mut same = mxgate::config::Config::for_backend(backend.addr);
    (same.max_connections, same.max_queued, same.threads) = (20, 2000, THREADS);
    // As the process runs it: with the pregreet test off, which the budget then leaves out.
    same.pregreet.action = mxgate::config::Pregreet::Off;
    let budget = mxgate::descriptors::Budget::of(&same, THREADS);
    let caps = mxgate::descriptors::caps(&same, &budget, LIMIT);
    assert_eq!(caps.max_connections, 20);
    assert!(caps.max_queued < 2000 && caps.max_queued > 100, "{caps:?}");
    let page = scrape_within_2s(metrics).await;
    assert_eq!(
        sample(&page, r#"mxgate_limit{kind="max_connections"}"#),
        20.0
    );
    assert_eq!(
        sample(&page, r#"mxgate_limit{kind="max_queued"}"#),
        caps.max_queued as f64
    );
    let warned = std::fs::read_to_string(&log).unwrap();
    let held = format!(
        "max_connections is held at 20 and max_queued at {}",
        caps.max_queued
    );
    assert!(
        warned.contains("RLIMIT_NOFILE soft 512, hard 512") && warned.contains(&held),
        "{warned}"
    );

    let mut holders = Vec::new();
    for i in 0..HOLDERS {
        holders.push(expect_admitted(&format!("127.0.1.{}", i + 1), listen).await);
    }

    // The flood: silent clients, each from its own address.
    let greeted = Arc::new(AtomicUsize::new(0));
    let unavailable = Arc::new(AtomicUsize::new(0));
    let never = Arc::new(AtomicBool::new(false));
    let n = clients();
    let flood = silent_clients(listen, 20, n, never, greeted.clone(), unavailable.clone());
    // Out of descriptors: the accept loops have met EMFILE.
    let emfile = r#"mxgate_local_errors_total{op="accept",errno="EMFILE"}"#;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page = scrape_within_2s(metrics).await;
        if sample(&page, emfile) > 0.0
            && sample(&page, "mxgate_connections_queued") == caps.max_queued as f64
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never out of descriptors: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // At exhaustion, kept there by more newcomers: a new client gets the 421 within 1 s,
    // and scrapes are answered.
    let stop = Arc::new(AtomicBool::new(false));
    let pressure = silent_clients(
        listen,
        60,
        3000,
        stop.clone(),
        greeted.clone(),
        unavailable.clone(),
    );
    let before = sample(&scrape_within_2s(metrics).await, emfile);
    // Scrapers that keep asking meanwhile, so the metrics listener meets EMFILE too.
    let scrapers: Vec<_> = (0..8)
        .map(|i| {
            let stop = stop.clone();
            // Other addresses than the asserted scrapes', as other scrapers would be.
            let source = format!("127.0.3.{}", i + 1);
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let scrape = get_metrics_from(&source, metrics);
                    let _ = tokio::time::timeout(Duration::from_secs(3), scrape).await;
                }
            })
        })
        .collect();
    let mut waits = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        let mut s = connect_from(&format!("127.0.2.{}", i + 1), listen)
            .await
            .unwrap();
        let line = first_line(&mut s, Duration::from_secs(1))
            .await
            .unwrap_or_else(|| panic!("probe {i}: no 421 within 1 s"));
        assert_eq!(
            seen(&line),
            Seen::TooMany,
            "{}",
            String::from_utf8_lossy(&line)
        );
        waits.push(t.elapsed());
        scrape_within_2s(metrics).await;
    }
    let page = scrape_within_2s(metrics).await;
    let during = sample(&page, emfile);
    assert!(
        during > before,
        "descriptors were not exhausted during the probes"
    );
    stop.store(true, Ordering::Relaxed);
    for s in scrapers {
        s.await.unwrap();
    }
    // The metrics listener met EMFILE, and logged it at the SMTP listeners' bounded rate
    // (once per 10 s per loop), not at every retry.
    let page = scrape_within_2s(metrics).await;
    let metrics_emfile = sample(
        &page,
        r#"mxgate_local_errors_total{op="metrics_accept",errno="EMFILE"}"#,
    );
    // At least two: logging each would pass the bound.
    assert!(
        metrics_emfile >= 2.0,
        "the metrics listener ran out {metrics_emfile} times"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    let lines = |addr: SocketAddr| {
        logged
            .lines()
            .filter(|l| l.contains("accept failed") && l.contains(&addr.to_string()))
            .count()
    };
    let bound = 1 + started.elapsed().as_secs() as usize / 10;
    assert!(
        lines(metrics) <= bound && lines(listen) <= THREADS * bound,
        "{} metrics and {} SMTP accept-failure lines for {metrics_emfile} metrics \
         failures in {:?}:\n{logged}",
        lines(metrics),
        lines(listen),
        started.elapsed()
    );

    // The holders quit together: their 20 slots go to 20 waiters, and nobody gets
    // backend_unavailable.
    drop(holders);
    let deadline = Instant::now() + Duration::from_secs(20);
    while greeted.load(Ordering::Relaxed) < HOLDERS {
        assert!(
            Instant::now() < deadline,
            "only {} waiters served after the holders quit",
            greeted.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let page = scrape_within_2s(metrics).await;
    let refused = sample(
        &page,
        r#"mxgate_connections_rejected_total{reason="backend_unavailable"}"#,
    );
    let local = sample(
        &page,
        r#"mxgate_local_errors_total{op="backend_socket",errno="EMFILE"}"#,
    );
    assert_eq!(refused, 0.0);
    assert_eq!(unavailable.load(Ordering::Relaxed), 0);
    assert_eq!(greeted.load(Ordering::Relaxed), HOLDERS);
    assert_eq!(sample(&page, "mxgate_connections_active"), HOLDERS as f64);
    let worst = waits.iter().max().unwrap();
    println!(
        "figures: clients {n}, max_queued held at {}, backend_unavailable {refused}, \
         waiters served {HOLDERS} of {HOLDERS}, backend socket EMFILE {local}, accept EMFILE \
         {during}, metrics accept EMFILE {metrics_emfile}, new client's 421 at exhaustion: worst {} ms of {} probes, open descriptors \
         {}",
        caps.max_queued,
        worst.as_millis(),
        waits.len(),
        fd_count(pid)
    );
    flood.abort();
    pressure.abort();
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}
