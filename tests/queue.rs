//! The wait queue, over real sockets: a full server means a short wait in a queue that is fair
//! between sources, not an error. Clients bind distinct addresses in 127.0.0.0/8 to be distinct
//! sources. Backends are real TCP servers in the test process whose sessions end when the test
//! says, so every step is ordered by the test, never by a sleep.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use mxgate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const DRAINING_LINE: &[u8] = b"421 4.3.2 mx.test Service shutting down, try again later\r\n";

/// A backend that greets each connection, then holds it (echoing what it reads) until the test
/// releases it. Releasing the oldest session is how a test frees exactly one slot.
struct HoldBackend {
    addr: SocketAddr,
    held: Arc<Mutex<VecDeque<tokio::sync::oneshot::Sender<()>>>>,
    accepted: Arc<AtomicUsize>,
}

impl HoldBackend {
    async fn start() -> HoldBackend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let held: Arc<Mutex<VecDeque<tokio::sync::oneshot::Sender<()>>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (h, a) = (held.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let (tx, mut rx) = tokio::sync::oneshot::channel();
                h.lock().unwrap().push_back(tx);
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if s.write_all(GREETING).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    loop {
                        tokio::select! {
                            _ = &mut rx => return,
                            n = s.read(&mut buf) => match n {
                                Ok(0) | Err(_) => return,
                                Ok(n) => if s.write_all(&buf[..n]).await.is_err() { return },
                            },
                        }
                    }
                });
            }
        });
        HoldBackend {
            addr,
            held,
            accepted,
        }
    }

    /// Ends the oldest session still held.
    fn release_one(&self) {
        let tx = self
            .held
            .lock()
            .unwrap()
            .pop_front()
            .expect("a session to end");
        let _ = tx.send(());
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn queue_config(backend: SocketAddr, max_connections: usize) -> Config {
    let mut c = config(backend);
    c.max_connections = max_connections;
    c.max_per_source = 1000;
    c.max_per_ipv6_network = 1000;
    c.max_queued = 10_000;
    c.queue_timeout = Duration::from_secs(60);
    c
}

/// A client that reads its greeting and then holds the session until the backend ends it.
/// Reports its name once greeted.
fn client(
    source: String,
    to: SocketAddr,
    greeted: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut s = connect_from(&source, to).await.unwrap();
        let mut line = vec![0u8; GREETING.len()];
        // Clients still waiting when the test ends get the draining reply instead.
        if s.read_exact(&mut line).await.is_err() || line != GREETING {
            return;
        }
        greeted.lock().unwrap().push(source);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    })
}

/// Reads exactly the backend's greeting: the client was admitted.
async fn greeted(s: &mut tokio::net::TcpStream) {
    let mut line = vec![0u8; GREETING.len()];
    s.read_exact(&mut line).await.unwrap();
    assert_eq!(line, GREETING);
}

/// `n` clients from `net.1`, `net.2`, ..., each left waiting in the queue, which then holds
/// exactly `n`.
async fn wait_from(mx: &mxgate::Running, net: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    let at = mx.listen_addrs()[0];
    let mut clients = Vec::new();
    for i in 1..=n {
        clients.push(connect_from(&format!("{net}.{i}"), at).await.unwrap());
    }
    queued_is(mx, n).await;
    clients
}

async fn queued_is(mx: &mxgate::Running, n: usize) {
    eventually(&format!("{n} waiting"), || mx.queued() == n).await;
}

/// One scrape's value of `series`.
async fn sample(mx: &mxgate::Running, series: &str) -> f64 {
    metric(&scrape(mx.metrics_addr().unwrap()).await, series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_light_source_is_not_stuck_behind_a_greedy_one() {
    let backend = HoldBackend::start().await;
    let mx = start(queue_config(backend.addr, 10)).await;
    let at = mx.listen_addrs()[0];
    let greeted: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..10 {
        tasks.push(client(format!("127.3.0.{}", i + 1), at, greeted.clone()));
    }
    eventually("10 sessions", || greeted.lock().unwrap().len() == 10).await;
    // One source with 100 waiting connections, then 10 others once each.
    for _ in 0..100 {
        tasks.push(client("127.3.1.1".into(), at, greeted.clone()));
    }
    queued_is(&mx, 100).await;
    for i in 0..10 {
        tasks.push(client(format!("127.3.2.{}", i + 1), at, greeted.clone()));
    }
    queued_is(&mx, 110).await;
    assert_eq!(sample(&mx, "mxgate_connections_queued").await, 110.0);
    // Free 20 slots, one at a time, each taken before the next is freed.
    for freed in 1..=20 {
        backend.release_one();
        eventually("the freed slot taken", || {
            greeted.lock().unwrap().len() == 10 + freed
        })
        .await;
    }
    let order = greeted.lock().unwrap()[10..].to_vec();
    let light = |s: &String| s.starts_with("127.3.2.");
    assert_eq!(
        order.iter().filter(|s| light(s)).count(),
        10,
        "every light source within 20 freed slots: {order:?}"
    );
    // Round robin: the greedy source's first waiter, then every light source once (in the
    // order they arrived, which their concurrent connects leave open), then the greedy source.
    assert_eq!(order[0], "127.3.1.1");
    assert!(order[1..11].iter().all(light), "{order:?}");
    assert!(order[11..].iter().all(|s| s == "127.3.1.1"), "{order:?}");
    assert_eq!(mx.queued(), 90);
    assert_eq!(backend.accepted(), 30);
    mx.shutdown(Duration::ZERO).await;
    for t in tasks {
        t.await.ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_past_queue_timeout_and_a_full_queue_get_the_global_limit_line() {
    let backend = HoldBackend::start().await;
    let mut c = queue_config(backend.addr, 1);
    c.queue_timeout = Duration::from_secs(2);
    c.max_queued = 1;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let _held = expect_admitted("127.4.0.1", at).await;
    // Waits, then gets the exact 421 when its time is up, and a clean close.
    let started = tokio::time::Instant::now();
    let mut waiting = connect_from("127.4.0.2", at).await.unwrap();
    queued_is(&mx, 1).await;
    // The queue is full: the next one is answered at once, while the first still waits.
    expect_refusal("127.4.0.3", at, GLOBAL_LINE).await;
    assert_eq!(mx.queued(), 1);
    let got = read_to_end(&mut waiting).await;
    assert_eq!(got, GLOBAL_LINE);
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(mx.queued(), 0);
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            r#"mxgate_connections_rejected_total{reason="queue_timeout"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"mxgate_connections_rejected_total{reason="queue_full"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"mxgate_connections_rejected_total{reason="global_limit"}"#
        ),
        0.0
    );
    assert_eq!(metric(&m, "mxgate_queue_wait_seconds_count"), 1.0);
    assert!(metric(&m, "mxgate_queue_wait_seconds_sum") >= 2.0);
    assert_eq!(metric(&m, r#"mxgate_limit{kind="max_queued"}"#), 1.0);
    assert_eq!(metric(&m, "mxgate_connections_queued"), 0.0);
    assert_eq!(backend.accepted(), 1);
    mx.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_leaves_at_once_and_wastes_no_slot() {
    let backend = HoldBackend::start().await;
    let mx = start(queue_config(backend.addr, 1)).await;
    let at = mx.listen_addrs()[0];
    let held = expect_admitted("127.5.0.1", at).await;
    let quitter = connect_from("127.5.0.2", at).await.unwrap();
    queued_is(&mx, 1).await;
    let resetter = connect_from("127.5.0.3", at).await.unwrap();
    queued_is(&mx, 2).await;
    let mut patient = connect_from("127.5.0.4", at).await.unwrap();
    queued_is(&mx, 3).await;
    drop(quitter); // FIN
    queued_is(&mx, 2).await;
    reset(resetter); // RST
    queued_is(&mx, 1).await;
    assert_eq!(sample(&mx, "mxgate_connections_queued").await, 1.0);
    // The freed slot goes to the one still waiting, not to either that left.
    drop(held);
    greeted(&mut patient).await;
    assert_eq!(backend.accepted(), 2);
    assert_eq!(mx.queued(), 0);
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(metric(&m, "mxgate_queue_wait_seconds_count"), 3.0);
    for reason in ["queue_timeout", "queue_full", "global_limit"] {
        let series = format!(r#"mxgate_connections_rejected_total{{reason="{reason}"}}"#);
        assert_eq!(metric(&m, &series), 0.0, "{reason}");
    }
    mx.shutdown(Duration::ZERO).await;
}

/// A talker past the early-bytes bound is read no further, yet its FIN or RST takes it out of
/// the queue at once. (Its close went unseen until its turn, and that slot went to nobody.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_talker_past_the_early_bytes_bound_that_gives_up_leaves_at_once() {
    let backend = HoldBackend::start().await;
    let mx = start(queue_config(backend.addr, 1)).await;
    let at = mx.listen_addrs()[0];
    let held = expect_admitted("127.5.1.1", at).await;
    let mut quitter = connect_from("127.5.1.2", at).await.unwrap();
    queued_is(&mx, 1).await;
    let mut resetter = connect_from("127.5.1.3", at).await.unwrap();
    queued_is(&mx, 2).await;
    let mut patient = connect_from("127.5.1.4", at).await.unwrap();
    queued_is(&mx, 3).await;
    // Far past what mxgate reads while a client waits: the rest stays in the kernel.
    for talker in [&mut quitter, &mut resetter] {
        talker.write_all(&random_bytes(16_000, 11)).await.unwrap();
    }
    assert_eq!(mx.queued(), 3);
    drop(quitter); // FIN
    queued_is(&mx, 2).await;
    reset(resetter); // RST
    queued_is(&mx, 1).await;
    drop(held);
    greeted(&mut patient).await;
    assert_eq!(backend.accepted(), 2);
    mx.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_talker_waits_and_its_bytes_reach_the_backend_in_order() {
    let backend = GreetingBackend::start().await; // echoes after its greeting
    let mx = start(queue_config(backend.addr, 1)).await;
    let at = mx.listen_addrs()[0];
    let held = expect_admitted("127.6.0.1", at).await;
    let mut talker = connect_from("127.6.0.2", at).await.unwrap();
    queued_is(&mx, 1).await;
    // Talks before its greeting: a pipelining command, then far more than mxgate reads
    // while it waits (the rest waits in the kernel, held by flow control).
    let mut early = b"EHLO early.test\r\n".to_vec();
    early.extend(random_bytes(100_000, 7));
    talker.write_all(&early).await.unwrap();
    // Still waiting: nothing it sent made it leave or reach the backend.
    talker.write_all(b"NOOP\r\n").await.unwrap();
    early.extend_from_slice(b"NOOP\r\n");
    assert_eq!(mx.queued(), 1);
    assert_eq!(backend.accepted(), 1);
    drop(held);
    let mut got = vec![0u8; GREETING.len() + early.len()];
    tokio::time::timeout(Duration::from_secs(5), talker.read_exact(&mut got))
        .await
        .expect("greeting and echo in time")
        .unwrap();
    assert_eq!(&got[..GREETING.len()], GREETING);
    assert_eq!(digest(&got[GREETING.len()..]), digest(&early));
    // And the session goes on as any other.
    talker.write_all(b"QUIT\r\n").await.unwrap();
    let mut echo = [0u8; 6];
    talker.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"QUIT\r\n");
    mx.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_answers_waiting_clients_and_a_raised_limit_admits_them() {
    let backend = HoldBackend::start().await;
    let c = queue_config(backend.addr, 1);
    let mx = start(c.clone()).await;
    let at = mx.listen_addrs()[0];
    let _held = expect_admitted("127.7.0.1", at).await;
    let mut waiting = wait_from(&mx, "127.7.1", 3).await;
    // A reload that raises the limit admits them at once: no slot was freed.
    let mut raised = c.clone();
    raised.max_connections = 4;
    assert!(mx.reload(Ok(raised)));
    for s in &mut waiting {
        greeted(s).await;
    }
    assert_eq!(mx.queued(), 0);
    assert_eq!(backend.accepted(), 4);
    // Now full again; two more wait, then a drain answers them.
    let mut late = wait_from(&mx, "127.7.2", 2).await;
    mx.begin_drain();
    for s in &mut late {
        assert_eq!(read_to_end(s).await, DRAINING_LINE);
    }
    assert_eq!(mx.queued(), 0);
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            r#"mxgate_connections_rejected_total{reason="draining"}"#
        ),
        2.0
    );
    assert_eq!(metric(&m, "mxgate_queue_wait_seconds_count"), 5.0);
    assert_eq!(backend.accepted(), 4);
    mx.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_queue_timeout_zero_a_full_server_refuses_at_once() {
    let backend = HoldBackend::start().await;
    let mut c = queue_config(backend.addr, 1);
    c.queue_timeout = Duration::ZERO;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let _held = expect_admitted("127.8.0.1", at).await;
    expect_refusal("127.8.0.2", at, GLOBAL_LINE).await;
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            r#"mxgate_connections_rejected_total{reason="global_limit"}"#
        ),
        1.0
    );
    assert_eq!(metric(&m, "mxgate_queue_wait_seconds_count"), 0.0);
    assert_eq!(metric(&m, r#"mxgate_limit{kind="max_queued"}"#), 0.0);
    assert_eq!(mx.queued(), 0);
    mx.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_sources_are_served_first_and_a_limit_of_zero_refuses_at_once() {
    let backend = HoldBackend::start().await;
    let mut c = queue_config(backend.addr, 1);
    c.allow = vec!["127.12.9.0/24".parse().unwrap()];
    let mx = start(c.clone()).await;
    let at = mx.listen_addrs()[0];
    let held = expect_admitted("127.12.0.1", at).await;
    let mut other = connect_from("127.12.0.2", at).await.unwrap();
    queued_is(&mx, 1).await;
    let mut relay = connect_from("127.12.9.1", at).await.unwrap();
    queued_is(&mx, 2).await;
    // The allowed relay came second but is served first.
    drop(held);
    greeted(&mut relay).await;
    assert_eq!(mx.queued(), 1);
    drop(relay);
    greeted(&mut other).await;
    // A limit of 0 closes the door: nobody could ever be served, so nobody waits.
    let mut closed = c;
    closed.max_connections = 0;
    assert!(mx.reload(Ok(closed)));
    expect_refusal("127.12.0.3", at, GLOBAL_LINE).await;
    assert_eq!(mx.queued(), 0);
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(metric(&m, r#"mxgate_limit{kind="max_queued"}"#), 0.0);
    mx.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_does_not_lock_allowed_sources_out_of_their_reserved_slots() {
    let backend = HoldBackend::start().await;
    let mut c = queue_config(backend.addr, 2);
    c.reserved_for_allowed = 1;
    c.allow = vec!["127.14.9.0/24".parse().unwrap()];
    c.max_queued = 1;
    let mx = start(c.clone()).await;
    let at = mx.listen_addrs()[0];
    // The one slot open to others is taken, one waits, and the queue is full.
    let first = expect_admitted("127.14.0.1", at).await;
    let _second = connect_from("127.14.0.2", at).await.unwrap();
    queued_is(&mx, 1).await;
    expect_refusal("127.14.0.3", at, GLOBAL_LINE).await;
    // The relay still gets the reserved slot, at once.
    let _relay = expect_admitted("127.14.9.1", at).await;
    // Now everything is full: a second relay waits (the queue's bound is not for it) ...
    let mut relay2 = connect_from("127.14.9.2", at).await.unwrap();
    queued_is(&mx, 2).await;
    // ... and is served first when a slot frees.
    drop(first);
    greeted(&mut relay2).await;
    assert_eq!(mx.queued(), 1);
    // With every slot reserved, others could never be served: refused at once.
    let mut all_reserved = c;
    all_reserved.reserved_for_allowed = 2;
    assert!(mx.reload(Ok(all_reserved)));
    expect_refusal("127.14.0.4", at, GLOBAL_LINE).await;
    mx.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_turns_the_queue_off_ends_every_wait_at_once() {
    let backend = HoldBackend::start().await;
    let c = queue_config(backend.addr, 1); // queue_timeout 60 s
    let mx = start(c.clone()).await;
    let at = mx.listen_addrs()[0];
    let _held = expect_admitted("127.15.0.1", at).await;
    let mut waiting = wait_from(&mx, "127.15.1", 3).await;
    let mut off = c;
    off.queue_timeout = Duration::ZERO;
    assert!(mx.reload(Ok(off)));
    // Within read_to_end's 5 s, far short of the 60 s they were given.
    for s in &mut waiting {
        assert_eq!(read_to_end(s).await, GLOBAL_LINE);
    }
    assert_eq!(mx.queued(), 0);
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            r#"mxgate_connections_rejected_total{reason="queue_timeout"}"#
        ),
        3.0
    );
    assert_eq!(metric(&m, r#"mxgate_limit{kind="max_queued"}"#), 0.0);
    mx.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_never_queues_and_says_so() {
    let backend = HoldBackend::start().await;
    let mut c = queue_config(backend.addr, 1);
    c.dry_run = true;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let _a = expect_admitted("127.16.0.1", at).await;
    // Over the limit, but dry run forwards everyone, at once.
    let _b = expect_admitted("127.16.0.2", at).await;
    assert_eq!(mx.queued(), 0);
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(metric(&m, r#"mxgate_limit{kind="max_queued"}"#), 0.0);
    assert_eq!(
        metric(
            &m,
            r#"mxgate_connections_would_reject_total{reason="global_limit"}"#
        ),
        1.0
    );
    mx.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_counts_against_the_source_limit() {
    let backend = HoldBackend::start().await;
    let mut c = queue_config(backend.addr, 1);
    c.max_per_source = 3;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let _held = expect_admitted("127.9.0.1", at).await;
    let _w1 = connect_from("127.9.0.2", at).await.unwrap();
    let _w2 = connect_from("127.9.0.2", at).await.unwrap();
    let _w3 = connect_from("127.9.0.2", at).await.unwrap();
    queued_is(&mx, 3).await;
    // A fourth from the same source is over its own limit: refused at once, not queued.
    expect_refusal("127.9.0.2", at, SOURCE_LINE).await;
    assert_eq!(mx.queued(), 3);
    mx.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_at_its_own_cap_means_a_wait_too() {
    let backend = HoldBackend::start().await;
    let mut c = queue_config(backend.addr, 100);
    c.backends[0].max_connections = Some(1);
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let held = expect_admitted("127.10.0.1", at).await;
    let mut waiting = connect_from("127.10.0.2", at).await.unwrap();
    queued_is(&mx, 1).await;
    // The waiter holds no global slot meanwhile.
    assert_eq!(mx.admission().active(), 1);
    drop(held);
    greeted(&mut waiting).await;
    assert_eq!(backend.accepted(), 2);
    mx.shutdown(Duration::ZERO).await;
}

/// A backend that speaks SMTP and holds each message about `hold` before accepting it.
async fn slow_smtp(hold: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let delivered = Arc::new(AtomicUsize::new(0));
    let count = delivered.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = tokio::io::BufReader::new(r);
                let mut line = String::new();
                let mut data = false;
                if w.write_all(b"220 slow.test ESMTP\r\n").await.is_err() {
                    return;
                }
                loop {
                    line.clear();
                    match tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let reply: &[u8] = if data {
                        if line != ".\r\n" {
                            continue;
                        }
                        data = false;
                        tokio::time::sleep(hold).await; // the backend's work, not a wait for state
                        count.fetch_add(1, Ordering::SeqCst);
                        b"250 2.0.0 queued\r\n"
                    } else if line.starts_with("DATA") {
                        data = true;
                        b"354 go ahead\r\n"
                    } else if line.starts_with("QUIT") {
                        let _ = w.write_all(b"221 2.0.0 bye\r\n").await;
                        return;
                    } else if line.starts_with("EHLO") {
                        b"250 slow.test\r\n"
                    } else {
                        b"250 2.1.0 ok\r\n"
                    };
                    if w.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, delivered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_200_behind_a_limit_of_20_is_delivered_without_a_421() {
    let (backend, delivered) = slow_smtp(Duration::from_millis(200)).await;
    let mut c = queue_config(backend, 20);
    c.queue_timeout = Duration::from_secs(30);
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    // 200 sessions, all at once, each from its own source.
    let stats = mxgate::load::run(&mxgate::load::Options {
        sources: Some("127.11.0.0/16".parse().unwrap()),
        sizes: mxgate::load::Sizes::Fixed(1024),
        ..mxgate::load::Options::new(at, 200, mxgate::load::Bound::Sessions(200))
    })
    .await;
    assert_eq!(stats.delivered, 200, "refused: {:?}", stats.refused);
    assert!(stats.refused.is_empty(), "{:?}", stats.refused);
    assert_eq!(
        (stats.refused_later, stats.connect_errors, stats.timeouts),
        (0, 0, 0)
    );
    assert_eq!(delivered.load(Ordering::SeqCst), 200);
    eventually("sessions closed", || mx.admission().active() == 0).await;
    let m = scrape(mx.metrics_addr().unwrap()).await;
    let rejected: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("mxgate_connections_rejected_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(rejected, 0.0);
    assert_eq!(metric(&m, "mxgate_connections_accepted_total"), 200.0);
    // 20 slots each free every ~200 ms: whatever the arrival order, at least 100 of the 200
    // found the server full and waited; each left the queue admitted.
    let waited = metric(&m, "mxgate_queue_wait_seconds_count");
    assert!((100.0..=180.0).contains(&waited), "{waited} waited");
    assert_eq!(
        metric(&m, r#"mxgate_queue_wait_seconds_bucket{le="+Inf"}"#),
        waited
    );
    // The last waited about 180/20 rounds of 200 ms: well under a second per round, never
    // near the timeout.
    assert!(metric(&m, r#"mxgate_queue_wait_seconds_bucket{le="0.001"}"#) < waited);
    assert_eq!(
        metric(&m, r#"mxgate_queue_wait_seconds_bucket{le="5"}"#),
        waited
    );
    assert!(metric(&m, "mxgate_queue_wait_seconds_sum") > 0.2 * waited / 2.0);
    assert_eq!(metric(&m, "mxgate_connections_queued"), 0.0);
    mx.shutdown(Duration::from_secs(1)).await;
}
