//! The backend's greeting, read before the client sees it: a busy (4xx) greeting is absorbed
//! and the client served elsewhere or later, a learned limit (`max_connections = "auto"`)
//! finds the backend's hidden capacity, a busy backend is never marked down, and every
//! greeting that is passed on reaches the client byte for byte.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mxgate::load::sink::{Behaviour, Sink, EXCHANGE_BUSY};
use mxgate::load::{self, Bound, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// mxgate in front of one backend with a learned limit, and a queue of `queue_timeout`.
fn opts(target: SocketAddr, sources: &str, concurrency: usize, bound: Bound) -> Options {
    Options {
        sources: Some(sources.parse().unwrap()),
        ..Options::new(target, concurrency, bound)
    }
}

/// Samples `series` every 100 ms from `mx` while `stop` is unset, after the first `skip`.
fn sampler(
    mx: SocketAddr,
    series: &'static str,
    skip: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<f64>> {
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let mut seen = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            let v = metric(&scrape(mx).await, series);
            if started.elapsed() >= skip {
                seen.push(v);
            }
        }
        seen
    })
}

/// The lowest and highest of the samples.
fn span(samples: &[f64]) -> (f64, f64) {
    samples
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backends_421_never_reaches_the_client_and_the_limit_converges() {
    let sink = Sink::start_with("127.0.0.1:0".parse().unwrap(), Behaviour::exchange(37))
        .await
        .unwrap();
    let mx = start(auto_config(sink.addr, 1000, Duration::from_secs(30))).await;
    let metrics = mx.metrics_addr().unwrap();
    let label = sink.addr.to_string();
    let limit_series: &'static str =
        Box::leak(format!("mxgate_backend_limit{{backend=\"{label}\"}}").into_boxed_str());
    let stop = Arc::new(AtomicBool::new(false));
    let limits = sampler(metrics, limit_series, Duration::from_secs(10), stop.clone());
    let stats = load::run(&opts(
        mx.listen_addrs()[0],
        "127.18.0.0/24",
        100,
        Bound::Duration(Duration::from_secs(20)),
    ))
    .await;
    stop.store(true, Ordering::SeqCst);
    let limits = limits.await.unwrap();
    let m = scrape(metrics).await;
    let busy = metric(
        &m,
        &format!("mxgate_backend_busy_total{{backend=\"{label}\"}}"),
    );
    let selected = metric(
        &m,
        &format!("mxgate_backend_selected_total{{backend=\"{label}\"}}"),
    );
    // Every session delivered; no client saw a 4xx, from the backend or from mxgate.
    assert!(stats.delivered > 500, "{}", stats.table());
    assert_eq!(stats.sessions(), stats.delivered, "{}", stats.table());
    assert!(stats.refused.is_empty(), "{:?}", stats.refused);
    assert_eq!(sink.delivered(), stats.delivered);
    // The backend did say busy, and mxgate absorbed every one of those.
    assert!(busy > 0.0);
    assert_eq!(busy as u64, sink.busy());
    assert!(sink.peak() <= 37);
    // After the first 10 s the learned limit stays in 26..=37, and the absorbed 4xx
    // greetings are at most 5 % of the backend connections.
    assert!(!limits.is_empty());
    let (lo, hi) = span(&limits);
    assert!(lo >= 26.0 && hi <= 37.0, "learned limit {lo}..={hi}");
    assert!(
        busy <= 0.05 * selected,
        "{busy} busy greetings of {selected} backend connections"
    );
    mx.shutdown(Duration::from_secs(5)).await;
}

/// A static limit set too high (100 against a hidden 37): the backend says busy again and
/// again, and its busy ceiling comes and goes. A client granted a slot while the backend had
/// no ceiling, which then found one at its connect, got mxgate's global-limit 421 (73 of
/// 53,814 sessions in an 8 s run); it now waits in the queue like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_limit_above_the_backends_own_shows_clients_no_421() {
    let sink = Sink::start_with("127.0.0.1:0".parse().unwrap(), Behaviour::exchange(37))
        .await
        .unwrap();
    let mut c = auto_config(sink.addr, 1000, Duration::from_secs(30));
    c.backends = vec![sink.addr.to_string().parse().unwrap()];
    c.max_connections = 100;
    let mx = start(c).await;
    let stats = load::run(&opts(
        mx.listen_addrs()[0],
        "127.19.0.0/24",
        100,
        Bound::Duration(Duration::from_secs(6)),
    ))
    .await;
    let m = scrape(mx.metrics_addr().unwrap()).await;
    let busy = metric(
        &m,
        &format!("mxgate_backend_busy_total{{backend=\"{}\"}}", sink.addr),
    );
    // The backend did say busy, often: the ceiling was in play.
    assert!(busy > 20.0, "{busy} busy greetings");
    assert!(stats.delivered > 500, "{}", stats.table());
    assert!(stats.refused.is_empty(), "{:?}", stats.refused);
    assert_eq!(stats.sessions(), stats.delivered, "{}", stats.table());
    assert_eq!(
        metric(
            &m,
            r#"mxgate_connections_rejected_total{reason="global_limit"}"#
        ),
        0.0
    );
    mx.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greeting_time_that_climbs_alone_sets_the_limit() {
    // No hard limit; flat up to 30 sessions, then 10 ms more for each one past it.
    let steep = Behaviour {
        limit: None,
        delay_per_session: Duration::ZERO,
        knee: 30,
        steep_delay: Duration::from_millis(10),
        ..Behaviour::default()
    };
    let sink = Sink::start_with("127.0.0.1:0".parse().unwrap(), steep)
        .await
        .unwrap();
    let mx = start(auto_config(sink.addr, 1000, Duration::from_secs(30))).await;
    let metrics = mx.metrics_addr().unwrap();
    let series: &'static str =
        Box::leak(format!("mxgate_backend_limit{{backend=\"{}\"}}", sink.addr).into_boxed_str());
    let stop = Arc::new(AtomicBool::new(false));
    let limits = sampler(metrics, series, Duration::from_secs(10), stop.clone());
    let stats = load::run(&opts(
        mx.listen_addrs()[0],
        "127.18.1.0/24",
        100,
        Bound::Duration(Duration::from_secs(20)),
    ))
    .await;
    stop.store(true, Ordering::SeqCst);
    let limits = limits.await.unwrap();
    assert!(stats.delivered > 100, "{}", stats.table());
    assert!(stats.refused.is_empty(), "{:?}", stats.refused);
    assert!(!limits.is_empty());
    let (lo, hi) = span(&limits);
    assert!(lo >= 20.0 && hi <= 45.0, "learned limit {lo}..={hi}");
    mx.shutdown(Duration::from_secs(5)).await;
}

/// A backend that answers every connection with Exchange's 421 until `open` is set, then
/// greets with 220 and echoes, answering a QUIT (a health check's) with 221. Counts its
/// connections.
struct Switchable {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
}

impl Switchable {
    async fn start() -> Switchable {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let (o, n) = (open.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                let open = o.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    if !open {
                        let _ = s.write_all(EXCHANGE_BUSY).await;
                        let mut buf = [0u8; 64];
                        let _ = s.read(&mut buf).await;
                        return;
                    }
                    if s.write_all(GREETING).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        if buf[..n].starts_with(b"QUIT") {
                            let _ = s.write_all(b"221 2.0.0 Bye\r\n").await;
                            return;
                        }
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Switchable {
            addr,
            open,
            connections,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_says_busy_is_never_marked_down_and_serves_again() {
    let backend = Switchable::start().await;
    let mut c = auto_config(backend.addr, 1000, Duration::from_secs(60));
    // Checked often, and down after two failures: a 421 counted as one would show at once.
    c.health_checks = true;
    c.health_interval = Duration::from_millis(100);
    c.fall = 2;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let metrics = mx.metrics_addr().unwrap();
    let up = format!("mxgate_backend_up{{backend=\"{}\"}}", backend.addr);
    let checks_failed = format!(
        "mxgate_backend_health_checks_total{{backend=\"{}\",result=\"failure\"}}",
        backend.addr
    );
    // A client arrives while every connection gets the 421; it waits, greeted by no one.
    let mut client = connect_from("127.18.2.1", at).await.unwrap();
    client.write_all(b"EHLO early.test\r\n").await.unwrap();
    eventually("the busy greeting absorbed", || {
        backend.connections.load(Ordering::SeqCst) >= 3
    })
    .await;
    // For 10 s the backend says busy: health checks run all along, none is a failure.
    let busy_for = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while busy_for.elapsed() < Duration::from_secs(10) {
        tick.tick().await;
        let m = scrape(metrics).await;
        assert_eq!(metric(&m, &up), 1.0, "marked down for being full");
        assert_eq!(metric(&m, &checks_failed), 0.0);
    }
    assert_eq!(mx.queued(), 1);
    // Now it serves: the waiting client gets the real greeting, and then the echo of what it
    // sent early, in order: it reached the backend that greeted it.
    backend.open.store(true, Ordering::SeqCst);
    let mut line = vec![0u8; GREETING.len()];
    client.read_exact(&mut line).await.unwrap();
    assert_eq!(line, GREETING);
    let mut echo = vec![0u8; b"EHLO early.test\r\n".len()];
    client.read_exact(&mut echo).await.unwrap();
    assert_eq!(echo, b"EHLO early.test\r\n");
    let m = scrape(metrics).await;
    assert_eq!(metric(&m, &up), 1.0);
    assert!(
        metric(
            &m,
            &format!("mxgate_backend_busy_total{{backend=\"{}\"}}", backend.addr)
        ) >= 1.0
    );
    drop(client);
    mx.shutdown(Duration::from_secs(1)).await;
}

/// A backend whose every connection sends `greeting` and then echoes.
async fn greets_with(greeting: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                // Written a few bytes at a time: the judgement must not depend on one read.
                for part in greeting.chunks(3) {
                    if s.write_all(part).await.is_err() {
                        return;
                    }
                    let _ = s.flush().await;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_line_and_5xx_greetings_reach_the_client_byte_for_byte() {
    const MULTI: &[u8] = b"220-mx.example.com ESMTP\r\n220-no UCE\r\n220 ready\r\n";
    const REFUSED: &[u8] = b"554 5.3.2 mx.example.com no SMTP service here\r\n";
    for greeting in [MULTI, REFUSED] {
        let backend = greets_with(greeting).await;
        let mx = start(auto_config(backend, 1000, Duration::from_secs(30))).await;
        let mut s = connect_from("127.18.3.1", mx.listen_addrs()[0])
            .await
            .unwrap();
        let mut got = vec![0u8; greeting.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, greeting);
        s.write_all(b"QUIT\r\n").await.unwrap();
        let mut echo = [0u8; 6];
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"QUIT\r\n");
        let m = scrape(mx.metrics_addr().unwrap()).await;
        assert_eq!(
            metric(
                &m,
                &format!("mxgate_backend_busy_total{{backend=\"{backend}\"}}")
            ),
            0.0
        );
        mx.shutdown(Duration::ZERO).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_queue_off_a_busy_greeting_goes_to_another_backend_or_gets_mxgates_own_421() {
    let busy = greets_with(EXCHANGE_BUSY).await;
    let good = GreetingBackend::start().await;
    let mut c = config(busy);
    c.backends = vec![
        format!("{busy}").parse().unwrap(),
        format!("{}", good.addr).parse().unwrap(),
    ];
    c.balance = mxgate::config::Balance::First;
    c.queue_timeout = Duration::ZERO;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    // The first backend says busy; the client is greeted by the second, early bytes intact.
    let mut s = connect_from("127.18.4.1", at).await.unwrap();
    s.write_all(b"EHLO a\r\n").await.unwrap();
    let mut line = vec![0u8; GREETING.len()];
    s.read_exact(&mut line).await.unwrap();
    assert_eq!(line, GREETING);
    drop(s);
    mx.shutdown(Duration::ZERO).await;
    // Alone, the busy backend's 421 is replaced by mxgate's own backend-unavailable line.
    let mut c = config(busy);
    c.queue_timeout = Duration::ZERO;
    let mx = start(c).await;
    expect_refusal("127.18.4.2", mx.listen_addrs()[0], BACKEND_LINE).await;
    mx.shutdown(Duration::ZERO).await;
}

/// A backend that sees the client's address (PROXY header, or transparent mode) and refuses
/// that client with a 4xx other than `4.3.2` is asked once per session: it used to be asked
/// again at once, for as long as the client stayed (16,874 backend connections in 1.7 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_refuses_this_client_is_not_asked_again_and_again() {
    const PER_CLIENT: &[u8] = b"421 4.7.0 mx.example.com Too many connections from you\r\n";
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = s.write_all(PER_CLIENT).await;
                let mut buf = [0u8; 512];
                while let Ok(1..) = s.read(&mut buf).await {}
            });
        }
    });
    for queue_timeout in [Duration::from_secs(30), Duration::ZERO] {
        let mut c = config(backend);
        c.proxy_protocol = Some(mxgate::proxy_protocol::Version::V1);
        c.queue_timeout = queue_timeout;
        let mx = start(c).await;
        let before = accepted.load(Ordering::SeqCst);
        expect_refusal("127.18.9.1", mx.listen_addrs()[0], BACKEND_LINE).await;
        assert_eq!(accepted.load(Ordering::SeqCst) - before, 1);
        mx.shutdown(Duration::ZERO).await;
    }
}

/// A backend where the client speaks first: it reads until the client's FIN (or `want`
/// bytes), then answers with how many bytes it got.
async fn client_speaks_first(want: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut got = 0;
                let mut buf = [0u8; 4096];
                while got < want {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                let _ = s.write_all(format!("got {got}\r\n").as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_speaks_first_is_forwarded_as_before() {
    // Regression: a half-close, or more than can be replayed, before any greeting stalled
    // the session until the idle timeout.
    let half_close = client_speaks_first(usize::MAX).await;
    let mx = start(auto_config(half_close, 1000, Duration::from_secs(30))).await;
    let mut s = connect_from("127.18.5.1", mx.listen_addrs()[0])
        .await
        .unwrap();
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), read_to_end(&mut s))
        .await
        .expect("answered before the idle timeout");
    assert_eq!(reply, b"got 5\r\n");
    mx.shutdown(Duration::ZERO).await;

    let talker = client_speaks_first(8192).await;
    let mx = start(auto_config(talker, 1000, Duration::from_secs(30))).await;
    let mut s = connect_from("127.18.5.2", mx.listen_addrs()[0])
        .await
        .unwrap();
    s.write_all(&random_bytes(8192, 7)).await.unwrap();
    let mut line = vec![0u8; b"got 8192\r\n".len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut line))
        .await
        .expect("answered before the idle timeout")
        .unwrap();
    assert_eq!(line, b"got 8192\r\n");
    mx.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_does_not_wait_for_a_greeting_that_never_comes() {
    // Regression: the greeting wait ignored shutdown and held the drain for the idle timeout.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = l.local_addr().unwrap();
    let (tx, mut accepted) = tokio::sync::mpsc::channel::<tokio::net::TcpStream>(4);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = tx.send(s).await;
        }
    });
    let mx = start(auto_config(silent, 1000, Duration::from_secs(30))).await;
    let _client = connect_from("127.18.6.1", mx.listen_addrs()[0])
        .await
        .unwrap();
    let _held = accepted.recv().await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        mx.shutdown(Duration::from_millis(200)),
    )
    .await
    .expect("the drain ends at its time");
}

/// A backend whose `n`th connection (from 0) sends `greetings[n]`, or the last one, and then
/// echoes until the client closes.
async fn greets_in_turn(greetings: &'static [&'static [u8]]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = l.accept().await {
            let greeting = greetings[n.min(greetings.len() - 1)];
            n += 1;
            tokio::spawn(async move {
                if s.write_all(greeting).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sent_back_to_the_queue_by_a_busy_greeting_is_one_wait_in_the_histogram() {
    // The first session holds the one slot; the second client waits, is served, is told busy
    // by the backend, waits again at the head of the line, and is then greeted.
    let backend = greets_in_turn(&[GREETING, EXCHANGE_BUSY, GREETING]).await;
    let mut c = config(backend);
    c.max_connections = 1;
    c.max_queued = 10;
    c.queue_timeout = Duration::from_secs(30);
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let metrics = mx.metrics_addr().unwrap();
    let first = expect_admitted("127.18.9.1", at).await;
    let mut second = connect_from("127.18.9.2", at).await.unwrap();
    eventually("the second client waits", || mx.queued() == 1).await;
    drop(first);
    let mut line = vec![0u8; GREETING.len()];
    second.read_exact(&mut line).await.unwrap();
    assert_eq!(line, GREETING);
    second.write_all(b"QUIT\r\n").await.unwrap();
    let mut echo = [0u8; 6];
    second.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"QUIT\r\n");
    let m = scrape(metrics).await;
    assert_eq!(
        metric(
            &m,
            &format!("mxgate_backend_busy_total{{backend=\"{backend}\"}}")
        ),
        1.0
    );
    assert_eq!(metric(&m, "mxgate_queue_wait_seconds_count"), 1.0);
    assert_eq!(
        metric(&m, r#"mxgate_queue_wait_seconds_bucket{le="+Inf"}"#),
        1.0
    );
    assert_eq!(metric(&m, "mxgate_connections_queued"), 0.0);
    drop(second);
    mx.shutdown(Duration::ZERO).await;
}
