//! Several backends: least-connections spread, per-backend caps, failover to a backup, health
//! checks that mark a killed backend down and bring it back, connect failures that fall
//! through without a 421, and state that survives a reload.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use mxgate::config::{Config, Settings};
use mxgate::load::sink::Sink;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const SINK_GREETING: &[u8] = b"220 sink.mxgate.test ESMTP\r\n";

fn config_toml(toml: &str) -> Config {
    let text = format!(
        "hostname = \"{HOST}\"\nlisten = [\"127.0.0.1:0\"]\nmetrics = \"127.0.0.1:0\"\npregreet = \"off\"\n{toml}"
    );
    Settings::from_toml(&text).unwrap().validate(None).unwrap()
}

async fn admitted(at: SocketAddr) -> TcpStream {
    let mut s = connect_from("127.0.0.2", at).await.unwrap();
    assert_eq!(read_line(&mut s).await, SINK_GREETING);
    s
}

fn backend_metric(m: &HashMap<String, f64>, name: &str, backend: SocketAddr) -> f64 {
    metric(m, &format!("{name}{{backend=\"{backend}\"}}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_spreads_held_sessions() {
    let (a, b) = (Sink::start().await.unwrap(), Sink::start().await.unwrap());
    let mx = start(config_toml(&format!(
        "backend = [\"{}\", \"{}\"]\nmax_per_source = 100\nhealth_interval = \"1h\"",
        a.addr, b.addr
    )))
    .await;
    let at = mx.listen_addrs()[0];
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(admitted(at).await);
    }
    let m = scrape(mx.metrics_addr().unwrap()).await;
    for s in [&a, &b] {
        assert_eq!(
            backend_metric(&m, "mxgate_backend_connections_active", s.addr),
            5.0
        );
        assert_eq!(
            backend_metric(&m, "mxgate_backend_selected_total", s.addr),
            5.0
        );
        assert_eq!(backend_metric(&m, "mxgate_backend_up", s.addr), 1.0);
    }
    drop(held);
    eventually("slots freed", || mx.admission().active() == 0).await;
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        backend_metric(&m, "mxgate_backend_connections_active", a.addr),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_shape_the_spread() {
    let (a, b) = (Sink::start().await.unwrap(), Sink::start().await.unwrap());
    let mx = start(config_toml(&format!(
        "backends = [{{ address = \"{}\", weight = 3 }}, \"{}\"]\nmax_per_source = 100\nhealth_interval = \"1h\"",
        a.addr, b.addr
    )))
    .await;
    let at = mx.listen_addrs()[0];
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(admitted(at).await);
    }
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        backend_metric(&m, "mxgate_backend_connections_active", a.addr),
        6.0
    );
    assert_eq!(
        backend_metric(&m, "mxgate_backend_connections_active", b.addr),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_is_marked_down_then_recovers() {
    let (a, b) = (Sink::start().await.unwrap(), Sink::start().await.unwrap());
    let a_addr = a.addr;
    let mx = start(config_toml(&format!(
        "backend = [\"{}\", \"{}\"]\nmax_per_source = 100\nhealth_interval = \"100ms\"\nfall = 3\nrise = 2",
        a.addr, b.addr
    )))
    .await;
    let at = mx.listen_addrs()[0];
    let metrics = mx.metrics_addr().unwrap();
    let up = |m: &HashMap<String, f64>| backend_metric(m, "mxgate_backend_up", a_addr);

    drop(a);
    let killed = tokio::time::Instant::now();
    loop {
        if up(&scrape(metrics).await) == 0.0 {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "never marked down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "marked down {:?} after the kill (fall 3 × interval 100 ms)",
        killed.elapsed()
    );
    let before = scrape(metrics).await;
    // New clients are not refused, and none goes to the dead backend.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(admitted(at).await);
    }
    let after = scrape(metrics).await;
    let selected =
        |m: &HashMap<String, f64>, s| backend_metric(m, "mxgate_backend_selected_total", s);
    assert_eq!(selected(&after, a_addr), selected(&before, a_addr));
    assert_eq!(selected(&after, b.addr) - selected(&before, b.addr), 6.0);
    assert!(
        metric(
            &after,
            &format!(
                "mxgate_backend_health_checks_total{{backend=\"{a_addr}\",result=\"failure\"}}"
            )
        ) >= 3.0
    );

    // It comes back where it was: up again after `rise` good checks.
    let _a = Sink::start_on(a_addr).await.unwrap();
    let back = tokio::time::Instant::now();
    loop {
        if up(&scrape(metrics).await) == 1.0 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "never marked up again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    held.push(admitted(at).await);
    let m = scrape(metrics).await;
    assert_eq!(
        backend_metric(&m, "mxgate_backend_connections_active", a_addr),
        1.0,
        "least-connections picks the empty one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_is_used_only_when_every_primary_is_down() {
    let (p, b) = (Sink::start().await.unwrap(), Sink::start().await.unwrap());
    let (p_addr, b_addr) = (p.addr, b.addr);
    let mx = start(config_toml(&format!(
        "backends = [\"{}\", {{ address = \"{}\", backup = true }}]\nmax_per_source = 100\nhealth_interval = \"100ms\"\nfall = 2",
        p.addr, b.addr
    )))
    .await;
    let at = mx.listen_addrs()[0];
    let metrics = mx.metrics_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(admitted(at).await);
    }
    let m = scrape(metrics).await;
    assert_eq!(
        backend_metric(&m, "mxgate_backend_selected_total", b_addr),
        0.0
    );
    drop(held);
    drop(p);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while backend_metric(&scrape(metrics).await, "mxgate_backend_up", p_addr) != 0.0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _s = admitted(at).await;
    let m = scrape(metrics).await;
    assert_eq!(
        backend_metric(&m, "mxgate_backend_selected_total", b_addr),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backend_is_skipped_and_all_full_gets_the_global_421() {
    // With the queue off; tests/queue.rs has every backend full with the queue on.
    let (a, b) = (Sink::start().await.unwrap(), Sink::start().await.unwrap());
    let mx = start(config_toml(&format!(
        "backends = [{{ address = \"{}\", max_connections = 2 }}, {{ address = \"{}\", max_connections = 1 }}]\n\
         balance = \"first\"\nmax_per_source = 100\nhealth_interval = \"1h\"\n\
         queue_timeout = \"0\"",
        a.addr, b.addr
    )))
    .await;
    let at = mx.listen_addrs()[0];
    let held = vec![admitted(at).await, admitted(at).await, admitted(at).await];
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        backend_metric(&m, "mxgate_backend_connections_active", a.addr),
        2.0
    );
    assert_eq!(
        backend_metric(&m, "mxgate_backend_connections_active", b.addr),
        1.0,
        "the overflow went to the other"
    );
    expect_refusal("127.0.0.2", at, GLOBAL_LINE).await;
    drop(held);
    eventually("slots freed", || mx.admission().active() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_failure_falls_through_with_no_421() {
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let live = Sink::start().await.unwrap();
    let mx = start(config_toml(&format!(
        "backend = [\"{dead}\", \"{}\"]\nbalance = \"first\"\nhealth_interval = \"1h\"",
        live.addr
    )))
    .await;
    let mut s = admitted(mx.listen_addrs()[0]).await;
    s.write_all(b"QUIT\r\n").await.unwrap();
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"backend_unavailable\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            &format!("mxgate_backend_health_checks_total{{backend=\"{dead}\",result=\"failure\"}}")
        ),
        1.0,
        "marked suspect"
    );
}

/// A backend with a scripted greeting that answers QUIT with 221.
async fn scripted(greeting: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(greeting).await;
                let mut line = Vec::new();
                if tokio::io::AsyncReadExt::read_buf(&mut s, &mut line)
                    .await
                    .is_ok()
                {
                    let _ = s.write_all(b"221 2.0.0 Bye\r\n").await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_reads_multi_line_greetings_and_takes_a_421_as_busy_not_down() {
    let multi = scripted(b"220-mx.example.com ESMTP\r\n220-please wait\r\n220 ready\r\n").await;
    assert!(mxgate::backend::check(multi, Duration::from_secs(2)).await);
    let busy = scripted(b"421 4.3.2 busy\r\n").await;
    assert!(!mxgate::backend::check(busy, Duration::from_secs(2)).await);
    // Busy is not down: the check counts neither way.
    assert_eq!(
        mxgate::backend::probe(busy, Duration::from_secs(2)).await,
        None
    );
    let refused = scripted(b"554 5.3.2 not here\r\n").await;
    assert_eq!(
        mxgate::backend::probe(refused, Duration::from_secs(2)).await,
        Some(false)
    );
    let truncated = scripted(b"220-first line only\r\n").await;
    assert!(!mxgate::backend::check(truncated, Duration::from_millis(300)).await);
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    assert!(!mxgate::backend::check(dead, Duration::from_secs(1)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_active_counts_survive_a_reload() {
    let (a, b, c) = (
        Sink::start().await.unwrap(),
        Sink::start().await.unwrap(),
        Sink::start().await.unwrap(),
    );
    let mx = start(config_toml(&format!(
        "backend = [\"{}\", \"{}\"]\nmax_per_source = 100\nhealth_interval = \"1h\"",
        a.addr, b.addr
    )))
    .await;
    let at = mx.listen_addrs()[0];
    let held = vec![admitted(at).await, admitted(at).await];
    // b is removed, c is added; a keeps its state.
    assert!(mx.reload(Ok(config_toml(&format!(
        "backend = [\"{}\", \"{}\"]\nmax_per_source = 100\nhealth_interval = \"1h\"",
        a.addr, c.addr
    )))));
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        backend_metric(&m, "mxgate_backend_connections_active", a.addr),
        1.0
    );
    let fresh = admitted(at).await;
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        backend_metric(&m, "mxgate_backend_connections_active", c.addr),
        1.0,
        "the new backend takes new sessions"
    );
    assert_eq!(
        backend_metric(&m, "mxgate_backend_connections_active", b.addr),
        1.0,
        "the removed one keeps its session"
    );
    drop((held, fresh));
    eventually("slots freed", || mx.admission().active() == 0).await;
}
