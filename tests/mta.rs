//! A real MTA at both ends: Postfix's `smtp-sink` as the backend and `swaks` as the client.

mod common;

use std::process::Command;

use common::*;

/// Runs swaks from `source` against `server` and returns (success, everything it printed).
async fn swaks(source: &str, server: std::net::SocketAddr) -> (bool, String) {
    let (source, server) = (source.to_string(), server.to_string());
    tokio::task::spawn_blocking(move || {
        let out = Command::new("swaks")
            .args(["--server", &server, "--local-interface", &source])
            .args(["--from", "sender@example.org", "--to", "rcpt@example.net"])
            .args(["--helo", "client.example.org", "--timeout", "10"])
            .output()
            .expect("swaks runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_through_mxgate_to_smtp_sink() {
    if !require_tool("swaks") {
        return;
    }
    let Some(sink) = SmtpSink::start(&[]).await else {
        return;
    };
    let mut c = config(sink.addr);
    c.max_per_source = 1;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];

    // One message passes through untouched.
    let (ok, out) = swaks("127.0.0.5", at).await;
    assert!(ok, "swaks failed:\n{out}");
    assert!(out.contains("<-  220 "), "{out}");
    assert!(
        out.contains("<-  250 2.0.0 Ok"),
        "the message was accepted:\n{out}"
    );
    assert!(out.contains("<-  221 "), "{out}");

    // Over the limit, swaks reports mxgate's own 421.
    let mut held = connect_from("127.0.0.6", at).await.unwrap();
    assert!(read_line(&mut held).await.starts_with(b"220 "));
    let (ok, out) = swaks("127.0.0.6", at).await;
    assert!(!ok, "swaks must fail over the limit:\n{out}");
    assert!(
        out.contains("421 4.7.0 mx.test Too many connections from your address, try again later"),
        "{out}"
    );
    drop(held);
    eventually("slots freed", || mx.admission().active() == 0).await;

    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"source_limit\"}"
        ),
        1.0
    );
    assert_eq!(metric(&m, "mxgate_connections_accepted_total"), 3.0);
    assert_eq!(metric(&m, "mxgate_connections_active"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_passes_the_pregreet_test_and_delivers_through_the_rewritten_greeting() {
    if !require_tool("swaks") {
        return;
    }
    let Some(sink) = SmtpSink::start(&[]).await else {
        return;
    };
    let mut c = config(sink.addr);
    c.pregreet.action = mxgate::config::Pregreet::Drop;
    c.pregreet.wait = std::time::Duration::from_millis(300);
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let (ok, out) = swaks("127.0.0.21", at).await;
    assert!(ok, "swaks failed:\n{out}");
    // The teaser, then smtp-sink's own greeting as the reply's last line.
    assert!(out.contains("<-  220-mx.test ESMTP"), "{out}");
    assert!(out.contains("<-  220 "), "{out}");
    assert!(out.contains("<-  250 2.0.0 Ok"), "delivered:\n{out}");
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(metric(&m, "mxgate_pregreet_total{result=\"pass\"}"), 1.0);
    // Cached: a second message has no teaser.
    let (ok, out) = swaks("127.0.0.21", at).await;
    assert!(ok && !out.contains("220-mx.test"), "{out}");
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(&m, "mxgate_pregreet_total{result=\"cached_pass\"}"),
        1.0
    );
}
