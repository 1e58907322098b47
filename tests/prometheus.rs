//! A real Prometheus (Debian's `prometheus`) scrapes mxgate with the shipped scrape example
//! and evaluates the shipped alert rules: the counters it stores equal what the clients saw,
//! and the backend-down alert fires when the backend is killed.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One GET against Prometheus's HTTP API; `None` while it does not answer yet.
async fn api(addr: SocketAddr, path_and_query: &str) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .ok()?;
    let text = String::from_utf8(read_to_end(&mut s).await).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    // Chunked or not: the JSON is the outermost braces.
    let body = &body[body.find('{')?..=body.rfind('}')?];
    serde_json::from_str(body).ok()
}

/// The value of an instant query that returns one sample, if it does.
async fn query(addr: SocketAddr, q: &str) -> Option<f64> {
    let encoded: String = q
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let v = api(addr, &format!("/api/v1/query?query={encoded}")).await?;
    let result = v["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str()?.parse().ok()
}

/// Connects from `source` and expects the sink's greeting.
async fn admitted(source: &str, at: SocketAddr) -> TcpStream {
    let mut s = connect_from(source, at).await.unwrap();
    let line = read_line(&mut s).await;
    assert!(
        line.starts_with(b"220 "),
        "{}",
        String::from_utf8_lossy(&line)
    );
    s
}

/// Polls `q` until it equals `want`, for up to `limit`.
async fn until_value(addr: SocketAddr, q: &str, want: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        last = query(addr, q).await;
        if last == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{q}: wanted {want}, last saw {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_stores_what_clients_saw_and_fires_backend_down() {
    if !require_tool("prometheus") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // A real SMTP dialogue, so the health checks pass until it is killed.
    let backend = mxgate::load::sink::Sink::start().await.unwrap();
    let mut c = config(backend.addr);
    c.max_per_source = 1;
    c.health_checks = true;
    c.health_interval = Duration::from_millis(500);
    c.fall = 2;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let metrics = mx.metrics_addr().unwrap();

    // The shipped scrape example, pointed at this mxgate and scraping every second.
    let dir = std::env::temp_dir().join(format!("mxgate-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let scrape = std::fs::read_to_string(root.join("systemd/prometheus-scrape.yml")).unwrap();
    assert!(scrape.contains("127.0.0.1:9925") && scrape.contains("scrape_interval: 15s"));
    let scrape = scrape
        .replace("127.0.0.1:9925", &metrics.to_string())
        .replace("scrape_interval: 15s", "scrape_interval: 1s");
    let rules = root.join("systemd/mxgate-alerts.yml");
    let config = format!(
        "global:\n  evaluation_interval: 1s\nrule_files:\n  - {}\n{scrape}",
        rules.display()
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    until_value(web, r#"up{job="mxgate"}"#, 1.0, Duration::from_secs(60)).await;

    // Known traffic: 5 sessions admitted and closed, one held, 3 refused over the source limit.
    for i in 0..5 {
        let mut s = admitted(&format!("127.0.1.{}", i + 1), at).await;
        s.write_all(b"QUIT\r\n").await.unwrap();
        let bye = read_to_end(&mut s).await;
        assert!(bye.starts_with(b"221"), "{}", String::from_utf8_lossy(&bye));
    }
    let _held = admitted("127.0.2.1", at).await;
    for _ in 0..3 {
        expect_refusal("127.0.2.1", at, SOURCE_LINE).await;
    }
    until_value(
        web,
        r#"mxgate_connections_accepted_total{job="mxgate"}"#,
        9.0,
        Duration::from_secs(30),
    )
    .await;
    until_value(
        web,
        r#"mxgate_connections_rejected_total{job="mxgate",reason="source_limit"}"#,
        3.0,
        Duration::from_secs(30),
    )
    .await;
    until_value(
        web,
        r#"sum(mxgate_connections_rejected_total{job="mxgate"})"#,
        3.0,
        Duration::from_secs(30),
    )
    .await;
    until_value(
        web,
        r#"mxgate_connections_active{job="mxgate"}"#,
        1.0,
        Duration::from_secs(30),
    )
    .await;
    until_value(
        web,
        r#"mxgate_backend_up{job="mxgate"}"#,
        1.0,
        Duration::from_secs(30),
    )
    .await;

    // The backend dies: marked down, and the alert goes through pending to firing.
    drop(backend);
    until_value(
        web,
        r#"mxgate_backend_up{job="mxgate"}"#,
        0.0,
        Duration::from_secs(30),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut states = Vec::new();
    loop {
        if let Some(v) = api(web, "/api/v1/alerts").await {
            let alerts = v["data"]["alerts"].as_array().cloned().unwrap_or_default();
            let down: Vec<String> = alerts
                .iter()
                .filter(|a| a["labels"]["alertname"] == "MxgateBackendDown")
                .map(|a| a["state"].as_str().unwrap_or("").to_string())
                .collect();
            if states.last() != down.first() {
                states.extend(down.first().cloned());
            }
            if down.iter().any(|s| s == "firing") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "MxgateBackendDown never fired; states seen: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    mx.shutdown(Duration::ZERO).await;
    let _ = std::fs::remove_dir_all(&dir);
}
