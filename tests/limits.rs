//! Admission over real sockets: per-source and global limits, IPv6 grouping, a backend that is
//! down, and the metrics that must agree with what clients saw.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_limit_refuses_the_extra_connection_only() {
    let backend = GreetingBackend::start().await;
    let mut c = config(backend.addr);
    c.max_per_source = 3;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];

    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(expect_admitted("127.0.0.2", at).await);
    }
    expect_refusal("127.0.0.2", at, SOURCE_LINE).await;
    let other = expect_admitted("127.0.0.3", at).await;
    assert_eq!(
        backend.accepted(),
        4,
        "the refused client never reached the backend"
    );

    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(metric(&m, "mxgate_connections_active"), 4.0);
    assert_eq!(metric(&m, "mxgate_sources_active"), 2.0);
    assert_eq!(metric(&m, "mxgate_connections_accepted_total"), 5.0);
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"source_limit\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"global_limit\"}"
        ),
        0.0
    );
    assert_eq!(metric(&m, "mxgate_limit{kind=\"max_per_source\"}"), 3.0);
    assert_eq!(metric(&m, "mxgate_limit{kind=\"max_connections\"}"), 1000.0);

    drop(held);
    drop(other);
    eventually("slots freed", || mx.admission().active() == 0).await;
    assert_eq!(mx.admission().sources(), 0, "empty sources leave the table");
    let again = expect_admitted("127.0.0.2", at).await;
    drop(again);
    eventually("slots freed", || mx.admission().active() == 0).await;

    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(metric(&m, "mxgate_connections_active"), 0.0);
    assert_eq!(metric(&m, "mxgate_sources_active"), 0.0);
    assert_eq!(metric(&m, "mxgate_session_duration_seconds_count"), 5.0);
    assert_eq!(metric(&m, "mxgate_backend_connect_seconds_count"), 5.0);
    // Greeting bytes were forwarded: 5 sessions × the greeting.
    assert_eq!(
        metric(&m, "mxgate_bytes_total{direction=\"backend_to_client\"}"),
        5.0 * GREETING.len() as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_limit_across_sources() {
    let backend = GreetingBackend::start().await;
    let mut c = config(backend.addr);
    c.max_connections = 3;
    c.max_per_source = 2;
    // With the queue off, a full server refuses at once (tests/queue.rs has the queue on).
    c.queue_timeout = Duration::ZERO;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];

    let held = vec![
        expect_admitted("127.0.0.2", at).await,
        expect_admitted("127.0.0.2", at).await,
        expect_admitted("127.0.0.3", at).await,
    ];
    expect_refusal("127.0.0.4", at, GLOBAL_LINE).await;
    expect_refusal("127.0.0.3", at, GLOBAL_LINE).await;
    // At its own limit, a source is told so even though the global limit is full as well.
    expect_refusal("127.0.0.2", at, SOURCE_LINE).await;
    assert_eq!(backend.accepted(), 3);

    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"global_limit\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"source_limit\"}"
        ),
        1.0
    );
    assert_eq!(metric(&m, "mxgate_connections_active"), 3.0);

    drop(held);
    eventually("slots freed", || mx.admission().active() == 0).await;
    let s = expect_admitted("127.0.0.4", at).await;
    drop(s);
    eventually("slots freed", || mx.admission().active() == 0).await;
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(metric(&m, "mxgate_connections_active"), 0.0);
    assert_eq!(metric(&m, "mxgate_sources_active"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_sources_group_by_prefix() {
    let backend = GreetingBackend::start().await;
    let mut c = config(backend.addr);
    c.listen = vec!["[::1]:0".parse().unwrap()];
    c.max_per_source = 1;
    c.ipv6_prefix = 64;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let held = expect_admitted("::1", at).await;
    expect_refusal("::1", at, SOURCE_LINE).await;
    assert_eq!(mx.source_key("::1".parse().unwrap()).to_string(), "::/64");
    drop(held);
    eventually("slots freed", || mx.admission().active() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_mapped_clients_count_as_ipv4() {
    let backend = GreetingBackend::start().await;
    let mut c = config(backend.addr);
    c.max_per_source = 1;
    // A dual-stack listener: IPv4 clients arrive as ::ffff:a.b.c.d.
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    socket.set_only_v6(false).unwrap();
    socket
        .bind(&"[::]:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(64).unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    let mx = mxgate::start_with(vec![socket.into()], c).await.unwrap();
    let at: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let held = expect_admitted("127.0.0.9", at).await;
    // IPv4 prefix 32 applies, so 127.0.0.10 is another source and 127.0.0.9 is at its limit.
    let other = expect_admitted("127.0.0.10", at).await;
    expect_refusal("127.0.0.9", at, SOURCE_LINE).await;
    assert_eq!(
        mx.source_key("::ffff:127.0.0.9".parse().unwrap())
            .to_string(),
        "127.0.0.9/32"
    );
    drop((held, other));
    eventually("slots freed", || mx.admission().active() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refusing_connections_gets_the_unavailable_line() {
    // A port with nothing listening: the connect is refused at once.
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mx = start(config(dead)).await;
    let at = mx.listen_addrs()[0];
    expect_refusal("127.0.0.2", at, BACKEND_LINE).await;
    expect_refusal("127.0.0.2", at, BACKEND_LINE).await;
    eventually("slots freed", || mx.admission().active() == 0).await;
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"backend_unavailable\"}"
        ),
        2.0
    );
    assert_eq!(metric(&m, "mxgate_connections_active"), 0.0);
    assert_eq!(metric(&m, "mxgate_sources_active"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_not_answering_times_out_within_the_connect_timeout() {
    // A listener that never accepts, with its backlog filled: further SYNs go unanswered.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let black_hole = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&black_hole.into());
        fillers.push(s);
    }

    let mut c = config(black_hole);
    c.connect_timeout = Duration::from_millis(300);
    let mx = start(c).await;
    let started = tokio::time::Instant::now();
    expect_refusal("127.0.0.2", mx.listen_addrs()[0], BACKEND_LINE).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "answered after {waited:?}, before the timeout"
    );
    eventually("slot freed", || mx.admission().active() == 0).await;
    drop(fillers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_is_read_even_when_the_client_already_sent_bytes() {
    // Unread client bytes at close() would turn the FIN into an RST and lose the reply.
    let backend = GreetingBackend::start().await;
    let mut c = config(backend.addr);
    c.max_per_source = 0;
    let mx = start(c).await;
    let mut s = connect_from("127.0.0.2", mx.listen_addrs()[0])
        .await
        .unwrap();
    use tokio::io::AsyncWriteExt;
    s.write_all(&vec![b'x'; 32 * 1024]).await.unwrap();
    s.write_all(b"EHLO pipelining.example\r\n").await.unwrap();
    let got = read_to_end(&mut s).await;
    assert_eq!(got, SOURCE_LINE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_answers_garbage_with_http_errors() {
    use tokio::io::AsyncWriteExt;
    let backend = GreetingBackend::start().await;
    let mx = start(config(backend.addr)).await;
    let m = mx.metrics_addr().unwrap();
    let cases: [(&[u8], &str); 5] = [
        (b"\x00\x01\x02garbage\r\n\r\n", "HTTP/1.1 400 "),
        (b"POST /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 405 "),
        (b"GET /nope HTTP/1.1\r\n\r\n", "HTTP/1.1 404 "),
        (b"GET /metrics SMTP/1.0\r\n\r\n", "HTTP/1.1 400 "),
        (&[b'A'; 9000], "HTTP/1.1 400 "),
    ];
    for (req, want) in cases {
        let mut s = tokio::net::TcpStream::connect(m).await.unwrap();
        s.write_all(req).await.unwrap();
        let got = read_to_end(&mut s).await;
        assert!(String::from_utf8_lossy(&got).starts_with(want), "{req:?}");
    }
    // Still serving.
    let metrics = scrape(m).await;
    assert_eq!(metric(&metrics, "mxgate_connections_active"), 0.0);
}
