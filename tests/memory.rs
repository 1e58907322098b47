//! Memory stays flat when nobody scrapes the metrics: the recorder keeps histogram samples
//! until they are folded into buckets, and without a scraper only mxgate's own upkeep does it.
//! Runs the real binary, so the RSS measured is mxgate's alone.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sessions before the first reading, so allocator pools and tables reach their working size.
const WARM_UP: usize = 20_000;
/// Sessions between the two readings (the issue asks for at least 100,000). Each session
/// records two histogram samples; unfolded, 150,000 sessions hold about 2.5 MiB of them.
const MEASURED: usize = 150_000;
/// Allowed growth between the readings.
const MAX_GROWTH_KIB: u64 = 2048;
/// Clients at once.
const LOOPS: usize = 16;

/// A backend that greets and closes at once: the cheapest complete session.
async fn greet_and_close() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(GREETING).await;
            });
        }
    });
    addr
}

/// `count` sessions through `target`, `LOOPS` at a time; each must see the whole greeting.
async fn sessions(target: SocketAddr, count: usize) {
    let per_loop = count / LOOPS;
    let loops: Vec<_> = (0..LOOPS)
        .map(|_| {
            tokio::spawn(async move {
                for _ in 0..per_loop {
                    let mut s = TcpStream::connect(target).await.unwrap();
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).await.unwrap();
                    assert_eq!(got, GREETING);
                }
            })
        })
        .collect();
    assert!(!loops.is_empty());
    for l in loops {
        tokio::time::timeout(Duration::from_secs(300), l)
            .await
            .expect("sessions finish in time")
            .unwrap();
    }
}

async fn growth_with_metrics(metrics: &str) -> u64 {
    let backend = greet_and_close().await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = Spawn::new(backend, listen)
        .metrics(metrics)
        .args(["--max-per-source", "100", "--threads", "1"])
        .command()
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "mxgate listens");
        tokio::task::yield_now().await;
    }
    sessions(listen, WARM_UP).await;
    let before = rss_kib(child.id());
    sessions(listen, MEASURED).await;
    let after = rss_kib(child.id());
    child.kill().unwrap();
    child.wait().unwrap();
    eprintln!("metrics {metrics}: RSS {before} KiB -> {after} KiB over {MEASURED} sessions");
    after.saturating_sub(before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_flat_with_metrics_off() {
    let growth = growth_with_metrics("off").await;
    assert!(
        growth < MAX_GROWTH_KIB,
        "RSS grew {growth} KiB over {MEASURED} sessions with metrics off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_flat_with_metrics_on_but_never_scraped() {
    let growth = growth_with_metrics("127.0.0.1:0").await;
    assert!(
        growth < MAX_GROWTH_KIB,
        "RSS grew {growth} KiB over {MEASURED} sessions with nobody scraping"
    );
}
