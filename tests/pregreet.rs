//! The pregreet test through real sockets: the teaser, a pass and the rewritten greeting, a
//! failure under each action with its exact replies, a word in the queue, a refusal after the
//! teaser, the cache across a restart (state_dir) and between hosts (a real redis-server).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mxgate::config::{Config, Pregreet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TEASER: &[u8] = b"220-mx.test ESMTP\r\n";
const COMPLETION: &[u8] = b"220 mx.test ESMTP\r\n";
const DROP: &[u8] = b"521 5.5.1 Protocol error\r\n";
const ENFORCE: &[u8] = b"550 5.5.1 Protocol error\r\n";
const BYE: &[u8] = b"221 2.0.0 Bye\r\n";
const MULTI: &[u8] = b"220-backend.test first\r\n220-second line\r\n220 backend.test ready\r\n";

/// A backend that greets with `greeting`, then echoes; counts its connections.
struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

async fn backend(greeting: &'static [u8]) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if s.write_all(greeting).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Backend { addr, accepted }
}

fn screened(backend: SocketAddr, action: Pregreet) -> Config {
    let mut c = config(backend);
    c.pregreet.action = action;
    c.pregreet.wait = Duration::from_millis(300);
    c.pregreet.wait_busy = Duration::from_millis(300);
    c
}

/// Reads exactly `want.len()` bytes (5 s at most) and compares them.
async fn expect(s: &mut TcpStream, want: &[u8], what: &str) {
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 5 s"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(want),
        "{what}"
    );
}

async fn metrics_of(mx: &mxgate::Running) -> std::collections::HashMap<String, f64> {
    scrape(mx.metrics_addr().unwrap()).await
}

fn result(m: &std::collections::HashMap<String, f64>, r: &str) -> f64 {
    metric(m, &format!("mxgate_pregreet_total{{result=\"{r}\"}}"))
}

fn rejected(m: &std::collections::HashMap<String, f64>) -> f64 {
    metric(m, "mxgate_connections_rejected_total{reason=\"pregreet\"}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_client_passes_with_one_valid_multi_line_greeting_then_is_cached() {
    let b = backend(MULTI).await;
    let mx = start(screened(b.addr, Pregreet::Drop)).await;
    let at = mx.listen_addrs()[0];

    let mut s = connect_from("127.0.0.2", at).await.unwrap();
    expect(&mut s, TEASER, "the teaser first").await;
    assert_eq!(
        b.accepted.load(Ordering::SeqCst),
        0,
        "no backend during the test"
    );
    // The backend's three lines end the same reply, every one 220-, the last 220 .
    expect(&mut s, MULTI, "the backend's greeting ends the reply").await;
    s.write_all(b"EHLO c\r\n").await.unwrap();
    expect(&mut s, b"EHLO c\r\n", "then forwarding").await;
    let m = metrics_of(&mx).await;
    assert_eq!((result(&m, "pass"), result(&m, "fail")), (1.0, 0.0));
    assert_eq!(metric(&m, "mxgate_pregreet_cache_entries"), 1.0);

    // Cached: the backend's own greeting at once, no teaser.
    let mut again = connect_from("127.0.0.2", at).await.unwrap();
    expect(&mut again, MULTI, "a cached pass skips the test").await;
    let m = metrics_of(&mx).await;
    assert_eq!((result(&m, "pass"), result(&m, "cached_pass")), (1.0, 1.0));
    let view = mx.snapshot().pregreet.expect("the view shows the cache");
    assert_eq!(
        (view.action.as_str(), view.cached_pass, view.cached_fail),
        ("drop", 1, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_answers_521_and_closes_and_the_failure_is_cached() {
    let b = backend(MULTI).await;
    let mx = start(screened(b.addr, Pregreet::Drop)).await;
    let at = mx.listen_addrs()[0];
    let mut s = connect_from("127.0.0.3", at).await.unwrap();
    expect(&mut s, TEASER, "the teaser").await;
    s.write_all(b"EHLO bot\r\n").await.unwrap();
    assert_eq!(read_to_end(&mut s).await, DROP);
    // The failure is remembered: the 521 is the greeting, with no test.
    expect_refusal("127.0.0.3", at, DROP).await;
    let m = metrics_of(&mx).await;
    assert_eq!((result(&m, "fail"), result(&m, "cached_fail")), (1.0, 1.0));
    assert_eq!(rejected(&m), 2.0);
    assert_eq!(
        b.accepted.load(Ordering::SeqCst),
        0,
        "a bot never reaches the backend"
    );
    // A reload keeps the cache.
    assert!(mx.reload(Ok(screened(b.addr, Pregreet::Drop))));
    expect_refusal("127.0.0.3", at, DROP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_completes_the_greeting_then_550_until_quit() {
    let b = backend(MULTI).await;
    let mx = start(screened(b.addr, Pregreet::Enforce)).await;
    let at = mx.listen_addrs()[0];
    // A bot that speaks before reading anything.
    let mut s = connect_from("127.0.0.4", at).await.unwrap();
    s.write_all(b"EHLO bot\r\n").await.unwrap();
    let mut want = TEASER.to_vec();
    want.extend_from_slice(COMPLETION);
    want.extend_from_slice(ENFORCE);
    expect(&mut s, &want, "teaser, completion, 550 to the early EHLO").await;
    s.write_all(b"MAIL FROM:<a@b>\r\n").await.unwrap();
    expect(&mut s, ENFORCE, "550 to every command").await;
    s.write_all(b"QUIT\r\n").await.unwrap();
    assert_eq!(read_to_end(&mut s).await, BYE);
    // Cached: the completion line is its greeting.
    let mut again = connect_from("127.0.0.4", at).await.unwrap();
    expect(&mut again, COMPLETION, "a cached failure under enforce").await;
    again.write_all(b"EHLO bot\r\nQUIT\r\n").await.unwrap();
    let mut rest = ENFORCE.to_vec();
    rest.extend_from_slice(BYE);
    assert_eq!(read_to_end(&mut again).await, rest);
    assert_eq!(b.accepted.load(Ordering::SeqCst), 0);
    let m = metrics_of(&mx).await;
    assert_eq!(rejected(&m), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_counts_a_talker_and_serves_it_and_tests_it_again() {
    let b = backend(b"220 backend.test ready\r\n").await;
    let mx = start(screened(b.addr, Pregreet::Ignore)).await;
    let at = mx.listen_addrs()[0];
    for round in 1..=2 {
        let mut s = connect_from("127.0.0.5", at).await.unwrap();
        s.write_all(b"EHLO early\r\n").await.unwrap();
        let mut want = TEASER.to_vec();
        want.extend_from_slice(b"220 backend.test ready\r\nEHLO early\r\n");
        expect(&mut s, &want, "served anyway, its words forwarded").await;
        let m = metrics_of(&mx).await;
        assert_eq!(result(&m, "fail"), round as f64, "tested again each time");
        assert_eq!(rejected(&m), 0.0);
    }
}

/// mxgate under `drop` with its one slot held by an allowed source (127.0.0.50), untested,
/// whose backend greeting has been read: the next clients wait in the queue, or with a
/// `queue_timeout` of 0 are refused.
async fn one_slot_held(
    queue_timeout: Duration,
) -> (Backend, mxgate::Running, SocketAddr, TcpStream) {
    let b = backend(b"220 backend.test ready\r\n").await;
    let mut c = screened(b.addr, Pregreet::Drop);
    c.max_connections = 1;
    c.queue_timeout = queue_timeout;
    c.allow = vec!["127.0.0.50/32".parse().unwrap()];
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let mut holder = connect_from("127.0.0.50", at).await.unwrap();
    expect(
        &mut holder,
        b"220 backend.test ready\r\n",
        "allowed: no teaser",
    )
    .await;
    (b, mx, at, holder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_serves_a_talker_and_counts_what_drop_would_have_done() {
    let b = backend(b"220 backend.test ready\r\n").await;
    let mut c = screened(b.addr, Pregreet::Drop);
    c.dry_run = true;
    let mx = start(c).await;
    let mut s = connect_from("127.0.0.14", mx.listen_addrs()[0])
        .await
        .unwrap();
    s.write_all(b"EHLO early\r\n").await.unwrap();
    let mut want = TEASER.to_vec();
    want.extend_from_slice(b"220 backend.test ready\r\nEHLO early\r\n");
    expect(&mut s, &want, "served, as ignore serves it").await;
    let m = metrics_of(&mx).await;
    assert_eq!(result(&m, "fail"), 1.0);
    assert_eq!(rejected(&m), 0.0);
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_would_reject_total{reason=\"pregreet\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_word_in_the_queue_fails_and_allowed_sources_skip_the_test() {
    // The allowed holder gets the backend's greeting at once, untested.
    let (b, mx, at, holder) = one_slot_held(Duration::from_secs(30)).await;
    let mut s = connect_from("127.0.0.6", at).await.unwrap();
    expect(&mut s, TEASER, "the teaser").await;
    eventually("the screened client waits in the queue", || {
        mx.queued() == 1
    })
    .await;
    // Quiet through its wait, but its greeting has not ended: no pass yet, so a second
    // connection from its address is tested, not let through on the first one's account.
    let m = metrics_of(&mx).await;
    assert_eq!((result(&m, "pass"), result(&m, "fail")), (0.0, 0.0));
    let mut sibling = connect_from("127.0.0.6", at).await.unwrap();
    expect(&mut sibling, TEASER, "the sibling is tested too").await;
    drop(sibling);
    s.write_all(b"EHLO bot\r\n").await.unwrap();
    assert_eq!(read_to_end(&mut s).await, DROP);
    eventually("its place is given up", || mx.queued() == 0).await;
    let m = metrics_of(&mx).await;
    assert_eq!(
        (result(&m, "pass"), result(&m, "fail")),
        (0.0, 1.0),
        "one verdict for the connection: it failed"
    );
    assert_eq!(b.accepted.load(Ordering::SeqCst), 1, "only the holder's");

    // A quiet client that waits in the queue passes when its greeting ends, not before.
    let mut quiet = connect_from("127.0.0.9", at).await.unwrap();
    expect(&mut quiet, TEASER, "the teaser").await;
    eventually("the quiet client waits in the queue", || mx.queued() == 1).await;
    assert_eq!(result(&metrics_of(&mx).await, "pass"), 0.0);
    drop(holder);
    expect(
        &mut quiet,
        b"220 backend.test ready\r\n",
        "its greeting ends the reply",
    )
    .await;
    let m = metrics_of(&mx).await;
    assert_eq!((result(&m, "pass"), result(&m, "fail")), (1.0, 1.0));
    assert_eq!(metric(&m, "mxgate_pregreet_cache_entries"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_never_replaces_a_failure_that_another_connection_earned_meanwhile() {
    let (_b, mx, at, holder) = one_slot_held(Duration::from_secs(30)).await;
    // A bot's patient connection waits out the test and queues...
    let mut patient = connect_from("127.0.0.10", at).await.unwrap();
    expect(&mut patient, TEASER, "the teaser").await;
    eventually("the patient connection waits in the queue", || {
        mx.queued() == 1
    })
    .await;
    // ...while another of its connections speaks first and fails.
    let mut eager = connect_from("127.0.0.10", at).await.unwrap();
    eager.write_all(b"EHLO bot\r\n").await.unwrap();
    let mut want = TEASER.to_vec();
    want.extend_from_slice(DROP);
    assert_eq!(read_to_end(&mut eager).await, want);
    // The patient one is served and passes, but its pass does not clear the failure.
    drop(holder);
    expect(&mut patient, b"220 backend.test ready\r\n", "its greeting").await;
    let m = metrics_of(&mx).await;
    assert_eq!((result(&m, "pass"), result(&m, "fail")), (1.0, 1.0));
    let mut next = connect_from("127.0.0.10", at).await.unwrap();
    assert_eq!(
        read_to_end(&mut next).await,
        DROP,
        "the address is still refused at connect"
    );
    assert_eq!(result(&metrics_of(&mx).await, "cached_fail"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_speaks_while_a_backend_fails_to_greet_fails_the_test() {
    // A backend that accepts and never greets.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    let mut c = screened(addr, Pregreet::Drop);
    c.backend_greeting_timeout = Some(Duration::from_secs(3));
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let mut s = connect_from("127.0.0.11", at).await.unwrap();
    expect(&mut s, TEASER, "the teaser").await;
    eventually("past its wait, at the backend", || {
        accepted.load(Ordering::SeqCst) == 1
    })
    .await;
    s.write_all(b"EHLO early\r\n").await.unwrap();
    // Its words were kept while the backend said nothing: it spoke before its greeting.
    assert_eq!(read_to_end(&mut s).await, DROP);
    let m = metrics_of(&mx).await;
    assert_eq!((result(&m, "pass"), result(&m, "fail")), (0.0, 1.0));
    assert_eq!(rejected(&m), 1.0);
}

/// A backend that sends the first line of its greeting, then the last when told, then echoes.
async fn greeting_in_two_pieces() -> (SocketAddr, Arc<AtomicUsize>, Arc<tokio::sync::Notify>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (first_sent, rest) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(tokio::sync::Notify::new()),
    );
    let (sent, go) = (first_sent.clone(), rest.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (sent, go) = (sent.clone(), go.clone());
            tokio::spawn(async move {
                s.write_all(b"220-backend.test first\r\n").await.unwrap();
                sent.fetch_add(1, Ordering::SeqCst);
                go.notified().await;
                s.write_all(b"220 backend.test last\r\n").await.unwrap();
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, first_sent, rest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_word_between_the_pieces_of_a_backend_greeting_fails_the_test() {
    let (addr, first_sent, rest) = greeting_in_two_pieces().await;
    let mx = start(screened(addr, Pregreet::Drop)).await;
    let at = mx.listen_addrs()[0];
    let mut s = connect_from("127.0.0.12", at).await.unwrap();
    expect(&mut s, TEASER, "the teaser").await;
    eventually("the backend sent its first line", || {
        first_sent.load(Ordering::SeqCst) == 1
    })
    .await;
    let m = metrics_of(&mx).await;
    assert_eq!(
        (result(&m, "pass"), result(&m, "fail")),
        (0.0, 0.0),
        "no pass before the greeting is whole"
    );
    s.write_all(b"EHLO early\r\n").await.unwrap();
    rest.notify_one();
    assert_eq!(
        read_to_end(&mut s).await,
        DROP,
        "it spoke before its greeting"
    );
    let m = metrics_of(&mx).await;
    assert_eq!((result(&m, "pass"), result(&m, "fail")), (0.0, 1.0));

    // Under ignore, the same talker is served, its words forwarded after the greeting.
    let (addr, first_sent, rest) = greeting_in_two_pieces().await;
    let mx = start(screened(addr, Pregreet::Ignore)).await;
    let mut s = connect_from("127.0.0.13", mx.listen_addrs()[0])
        .await
        .unwrap();
    expect(&mut s, TEASER, "the teaser").await;
    eventually("the backend sent its first line", || {
        first_sent.load(Ordering::SeqCst) == 1
    })
    .await;
    s.write_all(b"EHLO early\r\n").await.unwrap();
    rest.notify_one();
    expect(
        &mut s,
        b"220-backend.test first\r\n220 backend.test last\r\nEHLO early\r\n",
        "the greeting whole, then the echo of its words",
    )
    .await;
    assert_eq!(result(&metrics_of(&mx).await, "fail"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_after_the_teaser_completes_the_greeting_then_answers_421() {
    let (_b, _mx, at, holder) = one_slot_held(Duration::ZERO).await;
    let mut s = connect_from("127.0.0.7", at).await.unwrap();
    let mut want = TEASER.to_vec();
    want.extend_from_slice(COMPLETION);
    expect(
        &mut s,
        &want,
        "the greeting completed: a 421 cannot follow 220-",
    )
    .await;
    s.write_all(b"EHLO c\r\n").await.unwrap();
    assert_eq!(read_to_end(&mut s).await, GLOBAL_LINE);
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_refusal_after_the_teaser_stays_its_own_permanent_reply() {
    // A multi-line 5xx, its second line under another 5xx code: one reply, one code.
    let b = backend(b"554-5.7.1 backend.test no\r\n550-not you\r\n554 5.7.1 go away\r\n").await;
    let mx = start(screened(b.addr, Pregreet::Drop)).await;
    let at = mx.listen_addrs()[0];
    let mut s = connect_from("127.0.0.8", at).await.unwrap();
    let mut want = TEASER.to_vec();
    want.extend_from_slice(COMPLETION);
    expect(&mut s, &want, "the greeting completed").await;
    const REFUSAL: &[u8] = b"554-5.7.1 backend.test no\r\n554-not you\r\n554 5.7.1 go away\r\n";
    s.write_all(b"EHLO c\r\n").await.unwrap();
    expect(&mut s, REFUSAL, "the backend's refusal, not a 421").await;
    // A client that tries HELO after a refused EHLO is refused again, not cut off.
    s.write_all(b"HELO c\r\n").await.unwrap();
    expect(&mut s, REFUSAL, "again at the next command").await;
    s.write_all(b"QUIT\r\n").await.unwrap();
    assert_eq!(read_to_end(&mut s).await, BYE, "then 221 and a clean close");
    assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
    let m = metrics_of(&mx).await;
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"backend_unavailable\"}"
        ),
        0.0,
        "the backend refused, not mxgate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_is_no_smtp_or_busy_after_the_teaser_gets_the_421_at_the_first_command() {
    for greeting in [
        &b"SSH-2.0-OpenSSH\r\n"[..],
        b"421 4.3.2 backend.test busy\r\n",
    ] {
        let b = backend(greeting).await;
        let mut c = screened(b.addr, Pregreet::Drop);
        c.queue_timeout = Duration::ZERO;
        let mx = start(c).await;
        let at = mx.listen_addrs()[0];
        let mut s = connect_from("127.0.0.8", at).await.unwrap();
        let mut want = TEASER.to_vec();
        want.extend_from_slice(COMPLETION);
        expect(&mut s, &want, "completed").await;
        s.write_all(b"EHLO c\r\n").await.unwrap();
        assert_eq!(
            read_to_end(&mut s).await,
            BACKEND_LINE,
            "{}",
            String::from_utf8_lossy(greeting)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_behind_a_trusted_proxy_upstream_is_tested_under_its_own_address() {
    let b = backend(b"220 backend.test ready\r\n").await;
    let mut c = screened(b.addr, Pregreet::Drop);
    c.accept_proxy_protocol = vec!["127.0.0.40/32".parse().unwrap()];
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let header = |client: &str| format!("PROXY TCP4 {client} 127.0.0.1 40000 25\r\n");
    // A quiet client: the teaser, the wait, then the backend's greeting.
    let mut s = connect_from("127.0.0.40", at).await.unwrap();
    s.write_all(header("192.0.2.7").as_bytes()).await.unwrap();
    expect(&mut s, TEASER, "the client the header names is tested").await;
    expect(&mut s, b"220 backend.test ready\r\n", "it passed").await;
    drop(s);
    // A bot behind the same upstream: the 521, remembered under its own address only.
    let mut bot = connect_from("127.0.0.40", at).await.unwrap();
    bot.write_all(header("192.0.2.8").as_bytes()).await.unwrap();
    expect(&mut bot, TEASER, "the teaser").await;
    bot.write_all(b"EHLO bot\r\n").await.unwrap();
    assert_eq!(read_to_end(&mut bot).await, DROP);
    // One that spoke with its header, before any greeting, fails too.
    let mut early = connect_from("127.0.0.40", at).await.unwrap();
    let mut said = header("192.0.2.9").into_bytes();
    said.extend_from_slice(b"EHLO bot\r\n");
    early.write_all(&said).await.unwrap();
    let mut want = TEASER.to_vec();
    want.extend_from_slice(DROP);
    assert_eq!(read_to_end(&mut early).await, want);
    // The pass is 192.0.2.7's: cached, no teaser; the bot's failure is 192.0.2.8's.
    let mut again = connect_from("127.0.0.40", at).await.unwrap();
    again
        .write_all(header("192.0.2.7").as_bytes())
        .await
        .unwrap();
    expect(&mut again, b"220 backend.test ready\r\n", "a cached pass").await;
    let mut bot = connect_from("127.0.0.40", at).await.unwrap();
    bot.write_all(header("192.0.2.8").as_bytes()).await.unwrap();
    assert_eq!(read_to_end(&mut bot).await, DROP, "a cached failure");
    let m = metrics_of(&mx).await;
    assert_eq!(
        (
            result(&m, "pass"),
            result(&m, "fail"),
            result(&m, "cached_pass"),
            result(&m, "cached_fail")
        ),
        (1.0, 2.0, 1.0, 1.0)
    );
    assert_eq!(
        b.accepted.load(Ordering::SeqCst),
        2,
        "the sender's two only"
    );
    drop(again);
}

#[test]
fn ignore_is_the_default() {
    let c = Config::for_backend("127.0.0.1:25".parse().unwrap());
    assert_eq!(c.pregreet.action, Pregreet::Ignore);
    assert_eq!(
        (c.pregreet.wait, c.pregreet.wait_busy),
        (Duration::from_secs(6), Duration::from_secs(2))
    );
    assert_eq!(
        (c.pregreet.pass_ttl, c.pregreet.fail_ttl),
        (Duration::from_secs(86_400), Duration::from_secs(600))
    );
}

/// The real binary with no `pregreet` key: a failure is served, tested again, and logged per
/// source at the default log level, in one line for both; a pass is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_failure_is_served_and_logged_once_per_source_and_a_pass_is_cached() {
    let b = backend(b"220 backend.test ready\r\n").await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = state_dir("default-log");
    let log = dir.join("stderr.log");
    let mut child = Spawn::new(b.addr, listen)
        .metrics(metrics)
        .default_pregreet()
        .log(None)
        .args(["--pregreet-wait", "300ms"])
        .command()
        .env_remove("STATE_DIRECTORY")
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(metrics).await.is_err() {
        assert!(Instant::now() < deadline, "mxgate serves metrics");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.31", listen).await.unwrap();
        s.write_all(b"EHLO early\r\n").await.unwrap();
        let mut want = TEASER.to_vec();
        want.extend_from_slice(b"220 backend.test ready\r\nEHLO early\r\n");
        expect(&mut s, &want, "tested every time, served anyway").await;
    }
    let mut good = connect_from("127.0.0.32", listen).await.unwrap();
    expect(&mut good, TEASER, "a first contact").await;
    expect(&mut good, b"220 backend.test ready\r\n", "passed").await;
    let mut good = connect_from("127.0.0.32", listen).await.unwrap();
    expect(&mut good, b"220 backend.test ready\r\n", "cached").await;
    let m = scrape(metrics).await;
    assert_eq!(
        (
            result(&m, "fail"),
            result(&m, "pass"),
            result(&m, "cached_pass")
        ),
        (2.0, 1.0, 1.0)
    );
    assert_eq!(rejected(&m), 0.0, "nobody refused");
    assert_eq!(
        metric(&m, "mxgate_pregreet_cache_entries"),
        1.0,
        "the pass only"
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("pregreet failure ignored"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].contains(" INFO ")
            && lines[0].ends_with(
                "pregreet failure ignored source=127.0.0.31 reason=pregreet count=2 window_secs=60"
            ),
        "{text}"
    );
    assert!(!text.contains("source refused"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Polls `/metrics` until `series` reads `want` (10 s at most).
async fn wait_metric(mx: &mxgate::Running, series: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = metric(&metrics_of(mx).await, series);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{series} is {got}, never {want}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Two clients under the test from their own sources, quiet (the test's wait is long).
async fn two_under_the_test(
    action: Pregreet,
    dry_run: bool,
) -> (Backend, mxgate::Running, Vec<TcpStream>) {
    let b = backend(b"220 backend.test ready\r\n").await;
    let mut c = screened(b.addr, action);
    c.dry_run = dry_run;
    c.pregreet.wait = Duration::from_secs(30);
    c.pregreet.wait_busy = Duration::from_secs(30);
    c.pregreet.max_clients = 2;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let mut quiet = Vec::new();
    for i in 1..=2 {
        let mut s = connect_from(&format!("127.0.61.{i}"), at).await.unwrap();
        expect(&mut s, TEASER, "under the test").await;
        quiet.push(s);
    }
    wait_metric(&mx, "mxgate_pregreet_testing", 2.0).await;
    (b, mx, quiet)
}

// Found by the hostile run of the last round: clients under the test held a descriptor each and
// were bounded by nothing, so silent clients from many sources took every descriptor and a
// legitimate client was never answered. Past pregreet_max_clients, drop and enforce answer a
// newcomer with the global-limit 421 before any teaser, counted as queue_full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_pregreet_max_clients_a_newcomer_gets_the_421_at_once_and_a_freed_place_is_reused() {
    let (b, mx, mut quiet) = two_under_the_test(Pregreet::Drop, false).await;
    let at = mx.listen_addrs()[0];
    expect_refusal("127.0.61.3", at, GLOBAL_LINE).await;
    let m = metrics_of(&mx).await;
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"queue_full\"}"
        ),
        1.0
    );
    assert_eq!(rejected(&m), 0.0, "not a pregreet failure");
    assert_eq!(metric(&m, "mxgate_pregreet_testing"), 2.0);
    assert_eq!(b.accepted.load(Ordering::SeqCst), 0);
    // One leaves: its place goes to the next newcomer, which is tested.
    drop(quiet.pop());
    wait_metric(&mx, "mxgate_pregreet_testing", 1.0).await;
    let mut next = connect_from("127.0.61.4", at).await.unwrap();
    expect(&mut next, TEASER, "a freed place").await;
    wait_metric(&mx, "mxgate_pregreet_testing", 2.0).await;
    drop(quiet);
    drop(next);
    wait_metric(&mx, "mxgate_pregreet_testing", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_ignore_a_full_room_serves_a_newcomer_untested() {
    // A dry run of drop acts as ignore; the client past the room is admitted as any client is,
    // and counted once at most (here, under the limits, not at all: the hostile run found it
    // counted as a would-be queue_full and then again by admission).
    for dry_run in [false, true] {
        let action = if dry_run {
            Pregreet::Drop
        } else {
            Pregreet::Ignore
        };
        let (b, mx, quiet) = two_under_the_test(action, dry_run).await;
        let at = mx.listen_addrs()[0];
        let mut s = connect_from("127.0.61.3", at).await.unwrap();
        expect(
            &mut s,
            b"220 backend.test ready\r\n",
            "no teaser: served as before",
        )
        .await;
        let m = metrics_of(&mx).await;
        let refused: f64 = m
            .iter()
            .filter(|(k, _)| {
                k.starts_with("mxgate_connections_rejected_total")
                    || k.starts_with("mxgate_connections_would_reject_total")
            })
            .map(|(_, v)| v)
            .sum();
        assert_eq!(refused, 0.0, "dry run {dry_run}");
        assert_eq!(metric(&m, "mxgate_pregreet_testing"), 2.0);
        assert_eq!(
            metric(&m, "mxgate_limit{kind=\"pregreet_max_clients\"}"),
            2.0
        );
        assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
        drop(quiet);
    }
}

/// A bad value for each key: `mxgate check` names the file, the key and the reason, and fails.
#[test]
fn a_bad_value_names_its_file_key_and_reason() {
    let dir = state_dir("keys");
    let cases: [(&str, &str); 10] = [
        (
            "pregreet = \"reject\"",
            "unknown variant `reject`, expected one of `off`, `ignore`, `enforce`, `drop`",
        ),
        ("pregreet_wait = \"0s\"", "must be more than zero"),
        (
            "pregreet_wait = \"2m\"",
            "2m is more than 1m: every new sender waits this long for the greeting",
        ),
        ("pregreet_wait_busy = \"0s\"", "must be more than zero"),
        (
            "pregreet_wait_busy = \"10s\"",
            "10s is more than pregreet_wait (6s): the busy wait is the shorter one",
        ),
        (
            "pregreet_pass_ttl = \"1500ms\"",
            "1500ms is not a whole number of seconds",
        ),
        ("pregreet_fail_ttl = \"2.5s\"", "invalid duration \"2.5s\""),
        ("pregreet_fail_ttl = \"soon\"", "invalid duration \"soon\""),
        (
            "pregreet = \"drop\"\npregreet_max_clients = 0",
            "0 leaves no room for the test, and pregreet = \"drop\" would answer every client \
             it applies to with the 421; set it to at least 1 (or max_queued, its default, \
             above 0), or pregreet = \"off\"",
        ),
        (
            "pregreet_max_clients = 1000001",
            "1000001 is more than 1000000",
        ),
    ];
    for (line, reason) in cases {
        let key = line.lines().last().unwrap().split(' ').next().unwrap();
        let file = dir.join("mxgate.toml");
        std::fs::write(
            &file,
            format!("backend = \"127.0.0.1:2525\"\nhostname = \"{HOST}\"\n{line}\n"),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_mxgate"))
            .args(["check", "--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{line}: accepted\n{err}");
        assert!(
            err.contains(&format!(
                "config file {}: key `{key}`: {reason}",
                file.display()
            )),
            "{line}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn state_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mxgate-pregreet-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_survives_a_restart_in_state_dir() {
    let b = backend(b"220 backend.test ready\r\n").await;
    let dir = state_dir("restart");
    let mut c = screened(b.addr, Pregreet::Drop);
    c.state_dir = Some(dir.clone());
    let mx = start(c.clone()).await;
    let at = mx.listen_addrs()[0];
    let mut bot = connect_from("127.0.0.9", at).await.unwrap();
    bot.write_all(b"EHLO bot\r\n").await.unwrap();
    let mut want = TEASER.to_vec();
    want.extend_from_slice(DROP);
    assert_eq!(read_to_end(&mut bot).await, want);
    let mut good = connect_from("127.0.0.10", at).await.unwrap();
    expect(&mut good, TEASER, "a sender's first contact").await;
    expect(&mut good, b"220 backend.test ready\r\n", "passed").await;
    drop(good);
    mx.shutdown(Duration::from_secs(1)).await;
    assert!(dir.join("pregreet-cache.json").exists());

    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let m = metrics_of(&mx).await;
    assert_eq!(metric(&m, "mxgate_pregreet_cache_entries"), 2.0);
    expect_refusal("127.0.0.9", at, DROP).await;
    let mut good = connect_from("127.0.0.10", at).await.unwrap();
    expect(
        &mut good,
        b"220 backend.test ready\r\n",
        "the pass is remembered",
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `redis-server` on loopback with no persistence, killed on drop.
struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    async fn start() -> Option<Redis> {
        if !require_tool("redis-server") {
            return None;
        }
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let r = Redis { port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis::Client::open(r.url().as_str())
            .and_then(|c| c.get_connection())
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not answer");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Some(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn clustered(backend: SocketAddr, redis: &Redis, name: &str) -> mxgate::Running {
    let mut c = screened(backend, Pregreet::Drop);
    c.cluster = Some(mxgate::config::ClusterConfig {
        redis: redis.url(),
        name: "pg".into(),
        instance: name.into(),
        lease_ttl: Duration::from_secs(10),
        fallback_share: 0.5,
        admission_timeout: Duration::from_millis(500),
        password_file: None,
    });
    let mx = start(c).await;
    let addr = mx.metrics_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&scrape(addr).await, "mxgate_cluster_connected") != 1.0 {
        assert!(Instant::now() < deadline, "{name} did not join the cluster");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    mx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_that_failed_at_one_host_is_refused_at_another_through_redis() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let b = backend(b"220 backend.test ready\r\n").await;
    let one = clustered(b.addr, &redis, "one").await;
    let two = clustered(b.addr, &redis, "two").await;
    let mut bot = connect_from("127.0.0.11", one.listen_addrs()[0])
        .await
        .unwrap();
    bot.write_all(b"EHLO bot\r\n").await.unwrap();
    let mut want = TEASER.to_vec();
    want.extend_from_slice(DROP);
    assert_eq!(read_to_end(&mut bot).await, want);
    // Written through, with the failure's TTL on the key.
    let mut conn = redis::Client::open(redis.url().as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let key = "mxgate:pg:pregreet:127.0.0.11";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: Option<String> = redis::cmd("GET").arg(key).query(&mut conn).unwrap();
        if v.is_some() {
            assert_eq!(v.as_deref(), Some("fail"));
            break;
        }
        assert!(Instant::now() < deadline, "the verdict never reached Redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ttl: i64 = redis::cmd("TTL").arg(key).query(&mut conn).unwrap();
    assert!((590..=600).contains(&ttl), "TTL {ttl}");
    // The other host asks Redis on its local miss: the 521 at once, no teaser.
    let mut again = connect_from("127.0.0.11", two.listen_addrs()[0])
        .await
        .unwrap();
    assert_eq!(read_to_end(&mut again).await, DROP);
    let m = metrics_of(&two).await;
    assert_eq!((result(&m, "cached_fail"), result(&m, "fail")), (1.0, 0.0));
    assert_eq!(b.accepted.load(Ordering::SeqCst), 0);
}
