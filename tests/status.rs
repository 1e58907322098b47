//! The live view: `/status`, `mxgate status` and the page agree with what clients saw.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use mxgate::status::Snapshot;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// One GET on the metrics listener: the status code, the content type and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let text = String::from_utf8(read_to_end(&mut s).await).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    let kind = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or("")
        .to_string();
    (code, kind, body.to_string())
}

/// A server holding 3 sessions from 127.0.0.2 and 1 from 127.0.0.3, which has refused
/// 127.0.0.2 twice (its limit) and 127.0.0.66 once (deny list).
struct Scene {
    mx: mxgate::Running,
    _backend: GreetingBackend,
    held: Vec<TcpStream>,
}

async fn scene(status: bool) -> Scene {
    let backend = GreetingBackend::start().await;
    let mut c = config(backend.addr);
    c.max_connections = 10;
    c.max_per_source = 3;
    c.deny = vec!["127.0.0.66/32".parse().unwrap()];
    c.status = status;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(expect_admitted("127.0.0.2", at).await);
    }
    held.push(expect_admitted("127.0.0.3", at).await);
    for _ in 0..2 {
        expect_refusal("127.0.0.2", at, SOURCE_LINE).await;
    }
    // A denied client gets 554 and then 503 until it says QUIT (RFC 5321 §3.1).
    let mut denied = connect_from("127.0.0.66", at).await.unwrap();
    assert_eq!(
        read_line(&mut denied).await,
        b"554 5.7.1 mx.test Access denied\r\n"
    );
    denied.write_all(b"QUIT\r\n").await.unwrap();
    let bye = read_to_end(&mut denied).await;
    assert!(
        bye.starts_with(b"221 "),
        "{}",
        String::from_utf8_lossy(&bye)
    );
    Scene {
        mx,
        _backend: backend,
        held,
    }
}

/// The parts of a snapshot that are the clients' doing, as text.
fn seen(s: &Snapshot) -> String {
    let sources: Vec<String> = s
        .top_sources
        .iter()
        .map(|t| format!("{}={}", t.source, t.sessions))
        .collect();
    let refused: Vec<String> = s
        .top_refused
        .iter()
        .map(|t| {
            let r: Vec<String> = t
                .reasons
                .iter()
                .map(|r| format!("{}:{}", r.reason, r.count))
                .collect();
            format!("{}={}[{}]", t.source, t.refusals, r.join(","))
        })
        .collect();
    format!(
        "active={} queued={} sources={} top=[{}] refused=[{}]",
        s.active,
        s.queued,
        s.sources,
        sources.join(" "),
        refused.join(" ")
    )
}

const SEEN: &str = "active=4 queued=0 sources=2 top=[127.0.0.2=3 127.0.0.3=1] \
                    refused=[127.0.0.2=2[source_limit:2] 127.0.0.66=1[denied:1]]";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_and_the_status_command_agree_with_what_clients_saw() {
    let sc = scene(true).await;
    let metrics = sc.mx.metrics_addr().unwrap();
    let (code, kind, body) = get(metrics, "/status").await;
    assert_eq!((code, kind.as_str()), (200, "application/json"));
    let s: Snapshot = serde_json::from_str(&body).unwrap();
    assert_eq!(seen(&s), SEEN);
    assert_eq!(s.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(s.active_max, 4);
    assert_eq!((s.limits.max_connections, s.limits.max_per_source), (10, 3));
    assert!(s.reload.last_successful);
    assert_eq!(s.backends.len(), 1);
    let b = &s.backends[0];
    assert_eq!(
        (b.up, b.active, b.limit, b.learned),
        (true, 4, None, false),
        "the one backend holds every session, without a cap of its own"
    );

    // The command, against the same instance, from another process.
    let bin = env!("CARGO_BIN_EXE_mxgate");
    let m = metrics.to_string();
    let out = Command::new(bin)
        .args(["status", "--json", "--metrics", &m])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Snapshot = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen(&s), SEEN);
    let out = Command::new(bin)
        .args(["status", "--metrics", &m])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "4/10 sessions, 0 waiting, 1/1 backends up",
        "  127.0.0.2  3\n",
        "  127.0.0.3  1\n",
        "  127.0.0.2   2         source_limit 2\n",
        "  127.0.0.66  1         denied 1\n",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }

    // Sessions end: the view follows.
    let Scene { mx, held, .. } = sc;
    for mut s in held {
        s.shutdown().await.unwrap();
    }
    eventually("every session released", || mx.snapshot().active == 0).await;
    let s = mx.snapshot();
    assert!(s.top_sources.is_empty(), "{:?}", s.top_sources);
    assert_eq!(s.active_max, 4);
    mx.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_status_off_no_address_is_shown() {
    let sc = scene(false).await;
    let metrics = sc.mx.metrics_addr().unwrap();
    let (code, _, body) = get(metrics, "/status").await;
    assert_eq!(code, 404);
    assert!(!body.contains("127.0.0"), "{body}");
    let (code, _, body) = get(metrics, "/").await;
    assert_eq!(
        (code, body.as_str()),
        (200, "mxgate: metrics at /metrics\n")
    );
    // Prometheus still gets its metrics, which carry no address.
    let (code, _, body) = get(metrics, "/metrics").await;
    assert_eq!(code, 200);
    assert!(!body.contains("127.0.0.2"), "{body}");
    let out = Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .args(["status", "--metrics", &metrics.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the live view is off"), "{err}");
    sc.mx.shutdown(Duration::ZERO).await;
}

#[test]
fn the_status_command_without_an_instance_fails_clearly() {
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .args(["status", "--metrics", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("mxgate: no mxgate answers on 127.0.0.1:{port}")),
        "{err}"
    );
}

/// The page, rendered by a real browser: its script has fetched `/status` and filled the
/// tables with the sessions held and the refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_a_real_browser_shows_the_sources() {
    if !require_tool("chromium") {
        return;
    }
    let sc = scene(true).await;
    let metrics = sc.mx.metrics_addr().unwrap();
    let (code, kind, page) = get(metrics, "/").await;
    assert_eq!((code, kind.as_str()), (200, "text/html; charset=utf-8"));
    // Self-contained: nothing is loaded from elsewhere.
    for outside in ["http://", "https://", "//cdn", "src=\""] {
        assert!(!page.contains(outside), "the page loads {outside}");
    }
    let profile = std::env::temp_dir().join(format!("mxgate-chromium-{}", std::process::id()));
    let url = format!("http://{metrics}/");
    let dom = tokio::task::spawn_blocking(move || {
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--virtual-time-budget=10000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--dump-dom", &url])
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&profile);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    })
    .await
    .unwrap();
    for want in [
        "<td>127.0.0.2</td><td class=\"n\">3</td>",
        "<td>127.0.0.3</td><td class=\"n\">1</td>",
        "<td>127.0.0.2</td><td class=\"n\">2</td><td>source_limit 2</td>",
        "<td>127.0.0.66</td><td class=\"n\">1</td><td>denied 1</td>",
        "<span id=\"active\">4 / 10</span>",
        "<td class=\"up\">up</td>",
    ] {
        assert!(
            dom.contains(want),
            "{want:?} missing in the rendered page:\n{dom}"
        );
    }
    assert!(dom.contains("id=\"fill\" style=\"width: 40%;\""), "{dom}");
    sc.mx.shutdown(Duration::ZERO).await;
}
