//! Trust: what no client, config or reload may do to mxgate (issue "Trust"). One test per
//! behaviour, each against the real server on loopback.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use mxgate::config::{Config, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config_toml(backend: SocketAddr, toml: &str) -> Config {
    let text = format!(
        "backend = \"{backend}\"\nhostname = \"{HOST}\"\nlisten = [\"127.0.0.1:0\"]\n\
         metrics = \"127.0.0.1:0\"\npregreet = \"off\"\n{toml}"
    );
    Settings::from_toml(&text).unwrap().validate(None).unwrap()
}

/// `backend` is still up, and no failed check was counted against it.
fn assert_up_without_failures(m: &std::collections::HashMap<String, f64>, backend: SocketAddr) {
    let label = format!("backend=\"{backend}\"");
    assert_eq!(metric(m, &format!("mxgate_backend_up{{{label}}}")), 1.0);
    assert_eq!(
        metric(
            m,
            &format!("mxgate_backend_health_checks_total{{{label},result=\"failure\"}}")
        ),
        0.0
    );
}

/// Transparent mode needs CAP_NET_ADMIN: root here, and always in CI.
fn can_be_transparent() -> bool {
    if is_root() {
        return true;
    }
    assert!(!in_ci(), "CI runs as root");
    eprintln!("SKIP: transparent mode needs root (CAP_NET_ADMIN)");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_family_no_backend_takes_cannot_mark_the_backend_down() {
    if !can_be_transparent() {
        return;
    }
    let backend = GreetingBackend::start().await;
    // Health checks on (interval set), but far apart: only sessions could move the state, and
    // one failure would be enough to mark the backend down.
    let mut config = config_toml(
        backend.addr,
        "transparent = true\nhealth_interval = \"1h\"\nfall = 1",
    );
    config.listen = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
    let mx = start(config).await;
    let (v4, v6) = (mx.listen_addrs()[0], mx.listen_addrs()[1]);
    for _ in 0..5 {
        expect_refusal("::1", v6, BACKEND_LINE).await;
    }
    assert_eq!(
        backend.accepted(),
        0,
        "no backend was tried for an IPv6 client"
    );
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_up_without_failures(&m, backend.addr);
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"backend_unavailable\"}"
        ),
        5.0
    );
    // An IPv4 client is still served, from its own address.
    let _s = expect_admitted("127.0.0.2", v4).await;
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_address_mxgate_cannot_bind_does_not_count_against_the_backend() {
    if !can_be_transparent() {
        return;
    }
    let backend = GreetingBackend::start().await;
    let mut config = config_toml(
        backend.addr,
        "transparent = true\ntransparent_port = true\nhealth_interval = \"1h\"\nfall = 1",
    );
    config.listen = vec!["127.0.0.1:0".parse().unwrap()];
    let mx = start(config).await;
    let at = mx.listen_addrs()[0];
    // On loopback the client's own address and port are this host's, held by the client's
    // socket, so binding them for the backend connection fails with EADDRINUSE: a source port
    // in use, mxgate's side of the connection, not the backend's.
    for _ in 0..3 {
        expect_refusal("127.0.0.3", at, BACKEND_LINE).await;
    }
    assert_eq!(backend.accepted(), 0);
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_up_without_failures(&m, backend.addr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_refuses_still_goes_down() {
    // The other side of the rule: the backend's own failures do count.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mx = start(config_toml(dead, "health_interval = \"1h\"\nfall = 2")).await;
    let at = mx.listen_addrs()[0];
    for _ in 0..2 {
        expect_refusal("127.0.0.2", at, BACKEND_LINE).await;
    }
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(&m, &format!("mxgate_backend_up{{backend=\"{dead}\"}}")),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_source_cannot_take_the_slots_other_refusals_linger_in() {
    let backend = GreetingBackend::start().await;
    let mx = start(config_toml(
        backend.addr,
        "max_connections = 0\ndeny = [\"127.0.0.9\"]",
    ))
    .await;
    let at = mx.listen_addrs()[0];
    let denied_line = b"554 5.7.1 mx.test Access denied\r\n";
    let extra = 10;
    let mut held = Vec::new();
    for _ in 0..mxgate::reply::MAX_DENYING + extra {
        let mut s = connect_from("127.0.0.9", at).await.unwrap();
        assert_eq!(read_line(&mut s).await, denied_line);
        held.push(s);
    }
    assert!(!held.is_empty());
    eventually("the dialogues are at their own bound", || {
        mx.denying() == mxgate::reply::MAX_DENYING
    })
    .await;
    // Even the denied clients past the bound, still open, hold no lingering slot.
    assert_eq!(mx.lingering(), 0);
    // Past the bound, a denied client gets the greeting and a close.
    let past: Vec<_> = held.split_off(mxgate::reply::MAX_DENYING);
    assert_eq!(past.len(), extra);
    for mut s in past {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("closed at once")
            .unwrap();
        assert!(rest.is_empty());
    }
    eventually("the dialogues are at their own bound", || {
        mx.denying() == mxgate::reply::MAX_DENYING
    })
    .await;
    eventually("the closed ones stop lingering", || mx.lingering() == 0).await;
    assert_eq!(
        mx.denying(),
        mxgate::reply::MAX_DENYING,
        "dialogues hold no lingering slot"
    );
    // Another refused client that talks before reading still reads its whole 421.
    let mut s = connect_from("127.0.0.2", at).await.unwrap();
    s.write_all(b"EHLO early.test\r\n").await.unwrap();
    assert_eq!(read_to_end(&mut s).await, GLOBAL_LINE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_waiting_for_a_proxy_header_are_bounded_and_counted() {
    let backend = GreetingBackend::start().await;
    let mx = start(config_toml(
        backend.addr,
        "accept_proxy_protocol = [\"127.0.0.0/8\"]\nproxy_header_timeout = \"1m\"",
    ))
    .await;
    let at = mx.listen_addrs()[0];
    let bound = mxgate::gate::MAX_PENDING_HEADERS;
    let mut waiting = Vec::new();
    for _ in 0..bound {
        waiting.push(connect_from("127.0.0.2", at).await.unwrap());
    }
    let metrics = mx.metrics_addr().unwrap();
    let mut pending = 0.0;
    for _ in 0..500 {
        pending = metric(&scrape(metrics).await, "mxgate_proxy_headers_pending");
        if pending == bound as f64 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(pending, bound as f64);
    // One more is refused at once, with the line its upstream relays to the client.
    let mut late = connect_from("127.0.0.2", at).await.unwrap();
    assert_eq!(read_to_end(&mut late).await, GLOBAL_LINE);
    // A waiting connection whose header arrives is served and leaves the count.
    let mut first = waiting.remove(0);
    first
        .write_all(b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n")
        .await
        .unwrap();
    assert_eq!(read_line(&mut first).await, GREETING);
    let m = scrape(metrics).await;
    assert_eq!(
        metric(&m, "mxgate_proxy_headers_pending"),
        (bound - 1) as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_admitted_after_its_proxy_header_during_a_drain_gets_the_draining_reply() {
    let backend = GreetingBackend::start().await;
    let mx = start(config_toml(
        backend.addr,
        "accept_proxy_protocol = [\"127.0.0.0/8\"]",
    ))
    .await;
    let at = mx.listen_addrs()[0];
    let mut s = connect_from("127.0.0.2", at).await.unwrap();
    // The connection is accepted (and waiting for its header) before the drain begins.
    eventually("the connection waits for its header", || {
        mx.render_metrics()
            .contains("mxgate_proxy_headers_pending 1\n")
    })
    .await;
    mx.begin_drain();
    s.write_all(b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_to_end(&mut s).await,
        b"421 4.3.2 mx.test Service shutting down, try again later\r\n"
    );
    assert_eq!(backend.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_seen_from_a_clients_own_address_does_not_mark_the_backend_down() {
    if !can_be_transparent() {
        return;
    }
    // From the client's own address a refusal may be aimed at that client alone (a firewall
    // ban): only health checks, from mxgate's own address, may judge the backend.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mx = start(config_toml(
        closed,
        "transparent = true\nhealth_interval = \"1h\"\nfall = 1",
    ))
    .await;
    let at = mx.listen_addrs()[0];
    for _ in 0..3 {
        expect_refusal("127.0.0.2", at, BACKEND_LINE).await;
    }
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_up_without_failures(&m, closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_waiting_for_its_proxy_header_ends_with_the_drain() {
    let backend = GreetingBackend::start().await;
    let mx = start(config_toml(
        backend.addr,
        "accept_proxy_protocol = [\"127.0.0.0/8\"]\nproxy_header_timeout = \"1h\"",
    ))
    .await;
    let at = mx.listen_addrs()[0];
    let mut s = connect_from("127.0.0.2", at).await.unwrap();
    eventually("the connection waits for its header", || {
        mx.render_metrics()
            .contains("mxgate_proxy_headers_pending 1\n")
    })
    .await;
    tokio::time::timeout(
        Duration::from_secs(5),
        mx.shutdown(Duration::from_millis(100)),
    )
    .await
    .expect("shutdown does not wait for the header");
    assert_eq!(
        read_to_end(&mut s).await,
        b"421 4.3.2 mx.test Service shutting down, try again later\r\n"
    );
}
