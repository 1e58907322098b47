//! The metrics listener under hostile clients (issue "Trust under exhaustion"): slow and idle
//! connections cannot starve a scrape, and the HTTP it speaks is strict (Host check on the
//! live view, `Allow` on 405, 505 for other versions). Attackers and the scraper use
//! different loopback addresses, as they would in life.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Sends `request` from `source` and returns the whole answer.
async fn ask(source: &str, addr: SocketAddr, request: &str) -> String {
    let mut s = connect_from(source, addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    String::from_utf8(read_to_end(&mut s).await).unwrap()
}

async fn server() -> (mxgate::Running, GreetingBackend) {
    let backend = GreetingBackend::start().await;
    let mut c = config(backend.addr);
    c.status_hosts = vec!["mxgate.example.com".into()];
    (start(c).await, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_view_answers_only_a_host_naming_this_listener() {
    let (mx, _b) = server().await;
    let m = mx.metrics_addr().unwrap();
    let get = |path: &str, host: &str| format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let known = [
        "localhost".to_string(),
        format!("localhost:{}", m.port()),
        m.to_string(),
        "127.0.0.1".to_string(),
        "MXGATE.example.com".to_string(),
    ];
    assert!(!known.is_empty());
    for host in &known {
        for path in ["/status", "/"] {
            let a = ask("127.0.0.9", m, &get(path, host)).await;
            assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{path} {host}: {a}");
        }
    }
    for host in ["attacker.example", "x", "127.0.0.2", ""] {
        for path in ["/status", "/"] {
            let a = ask("127.0.0.9", m, &get(path, host)).await;
            assert!(
                a.starts_with("HTTP/1.1 403 Forbidden\r\n"),
                "{path} {host:?}: {a}"
            );
            assert!(!a.contains("127.0.0."), "{a}");
        }
        let a = ask("127.0.0.9", m, &get("/metrics", host)).await;
        assert!(
            a.starts_with("HTTP/1.1 200 OK\r\n"),
            "/metrics {host:?}: {a}"
        );
    }
    let no_host = ask("127.0.0.9", m, "GET /status HTTP/1.0\r\n\r\n").await;
    assert!(
        no_host.starts_with("HTTP/1.1 403 Forbidden\r\n"),
        "{no_host}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_405_says_what_is_allowed_and_other_http_versions_get_505() {
    let (mx, _b) = server().await;
    let m = mx.metrics_addr().unwrap();
    let a = ask(
        "127.0.0.9",
        m,
        "POST /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert!(a.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{a}");
    assert!(a.contains("\r\nAllow: GET, HEAD\r\n"), "{a}");
    for version in ["HTTP/1.9", "HTTP/2.0", "HTTP/0.9"] {
        let a = ask(
            "127.0.0.9",
            m,
            &format!("GET / {version}\r\nHost: localhost\r\n\r\n"),
        )
        .await;
        assert!(
            a.starts_with("HTTP/1.1 505 HTTP Version Not Supported\r\n"),
            "{version}: {a}"
        );
    }
    let a = ask("127.0.0.9", m, "GET /metrics HTTP/1.0\r\n\r\n").await;
    assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
}

/// Connections that trickle one byte a second from `sources`, each reconnecting when closed,
/// until `stop`.
fn trickle(
    at: SocketAddr,
    sources: Vec<String>,
    stop: Arc<AtomicBool>,
    connects: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    assert!(!sources.is_empty());
    sources
        .into_iter()
        .map(|source| {
            let (stop, connects) = (stop.clone(), connects.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = connect_from(&source, at).await else {
                        continue;
                    };
                    connects.fetch_add(1, Ordering::Relaxed);
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\n".iter().cycle() {
                        tick.tick().await;
                        if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).await.is_err() {
                            break;
                        }
                    }
                }
            })
        })
        .collect()
}

/// Five scrapes from 127.0.0.9, in turn; each must be answered within 2 s.
async fn five_scrapes_within_2s(m: SocketAddr) {
    for i in 0..5 {
        let t = Instant::now();
        let a = tokio::time::timeout(
            Duration::from_secs(2),
            ask(
                "127.0.0.9",
                m,
                "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("scrape {i} not answered within 2 s"));
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        println!("scrape {i}: {} ms", t.elapsed().as_millis());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_trickling_connections_do_not_stop_scrapes() {
    let (mx, _b) = server().await;
    let m = mx.metrics_addr().unwrap();
    for sources in [
        vec!["127.0.5.1".to_string(); 100],
        (0..100).map(|i| format!("127.0.6.{}", i + 1)).collect(),
    ] {
        let stop = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(AtomicUsize::new(0));
        let tasks = trickle(m, sources, stop.clone(), connects.clone());
        // Every trickler has connected before the scrapes start.
        eventually("100 trickling connections", || {
            connects.load(Ordering::Relaxed) >= 100
        })
        .await;
        five_scrapes_within_2s(m).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.abort();
        }
    }
}

fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_idle_connections_hold_scraping_up_for_under_5s() {
    raise_nofile();
    let (mx, _b) = server().await;
    let m = mx.metrics_addr().unwrap();
    let started = Instant::now();
    let mut idle = Vec::new();
    for i in 0..5000u32 {
        let source = format!("127.0.{}.{}", 10 + i / 250, 1 + i % 250);
        if let Ok(s) = connect_from(&source, m).await {
            idle.push(s);
        }
    }
    assert!(idle.len() >= 4900, "{} connected", idle.len());
    // Scraping is back within 5 s of the flood's start.
    let deadline = started + Duration::from_secs(5);
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_millis(500),
            ask(
                "127.0.0.9",
                m,
                "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
            ),
        )
        .await;
        if let Ok(a) = attempt {
            assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
            break;
        }
        assert!(Instant::now() < deadline, "no scrape answered within 5 s");
    }
    println!(
        "scraping answered {} ms after 5,000 idle connections began",
        started.elapsed().as_millis()
    );
    five_scrapes_within_2s(m).await;
    // The idle ones were closed by the server, not kept.
    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(2), idle[0].read(&mut b)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
}
