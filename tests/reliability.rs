//! The day things go wrong: floods, a backend that dies or never speaks, integrity under load,
//! slow readers, and odd but legal clients. Counts and times are bounded; figures are printed.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn percentile(sorted: &[u64], p: f64) -> u64 {
    assert!(!sorted.is_empty());
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_source_flood_gets_full_421_lines_while_others_get_in() {
    const ATTEMPTS: u64 = 20_000;
    const WORKERS: u64 = 16;
    let backend = GreetingBackend::start().await;
    let mut c = config(backend.addr);
    c.max_per_source = 5;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    // The flooding source holds its five slots: every further attempt is over its limit.
    let held: Vec<_> = futures_join(5, || expect_admitted("127.0.0.2", at)).await;

    let lines = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    for _ in 0..WORKERS {
        let lines = lines.clone();
        flood.push(tokio::spawn(async move {
            for _ in 0..ATTEMPTS / WORKERS {
                let mut s = connect_from("127.0.0.2", at).await.unwrap();
                let mut got = Vec::new();
                // A reset before the line would be an error here, not an empty read.
                s.read_to_end(&mut got)
                    .await
                    .expect("no RST before the reply");
                assert_eq!(got, SOURCE_LINE);
                lines.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Meanwhile a legitimate client keeps connecting from another source.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = done.clone();
    let legit = tokio::spawn(async move {
        let mut latencies = Vec::new();
        while !flooding.load(Ordering::Relaxed) && latencies.len() < 5000 {
            let t = Instant::now();
            let mut s = connect_from("127.0.0.3", at).await.unwrap();
            let line = read_line(&mut s).await;
            latencies.push(t.elapsed().as_micros() as u64);
            assert_eq!(line, GREETING, "the legitimate client is never refused");
        }
        latencies
    });
    for f in flood {
        f.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let mut latencies = legit.await.unwrap();
    latencies.sort_unstable();
    assert!(!latencies.is_empty());
    println!(
        "single-source flood: {} complete 421 lines read; legitimate client: {} connections, connect→greeting p50 {} µs, p99 {} µs",
        lines.load(Ordering::Relaxed),
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    assert_eq!(lines.load(Ordering::Relaxed), ATTEMPTS);
    drop(held);
    eventually("slots freed", || mx.admission().active() == 0).await;
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"source_limit\"}"
        ),
        ATTEMPTS as f64
    );
    assert_eq!(metric(&m, "mxgate_connections_active"), 0.0);
}

/// Runs `n` copies of a future-making closure one after another and collects the results.
async fn futures_join<F, Fut, T>(n: usize, f: F) -> Vec<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(f().await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_source_flood_leaves_no_state_and_metrics_agree() {
    const SOURCES: u32 = 50_000;
    const WORKERS: u32 = 64;
    let backend = GreetingBackend::start().await;
    let mut c = config(backend.addr);
    c.max_connections = 20;
    c.max_per_source = 1;
    // A refusal flood: with the queue off, every client past the limit is answered at once.
    c.queue_timeout = Duration::ZERO;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let rss_before = rss_kib(std::process::id());
    let (admitted, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (admitted, refused) = (admitted.clone(), refused.clone());
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while i < SOURCES {
                // 127.0.0.0/8 minus 127.0.0.0/24, one distinct address per attempt.
                let n = i + 256;
                let source = format!("127.{}.{}.{}", n >> 16, (n >> 8) & 255, n & 255);
                let mut s = connect_from(&source, at).await.unwrap();
                let line = read_line(&mut s).await;
                if line == GREETING {
                    admitted.fetch_add(1, Ordering::Relaxed);
                } else {
                    assert_eq!(line, GLOBAL_LINE);
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                i += WORKERS;
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let rss_after = rss_kib(std::process::id());
    let (admitted, refused) = (
        admitted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    eventually("all sessions ended", || mx.admission().active() == 0).await;
    println!(
        "many-source flood: {SOURCES} sources, {admitted} admitted, {refused} refused; test process RSS {rss_before} KiB before, {rss_after} KiB after"
    );
    assert_eq!(admitted + refused, SOURCES as u64);
    assert!(refused > 0, "the low global limit was reached");
    assert_eq!(mx.admission().sources(), 0);
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(&m, "mxgate_connections_accepted_total"),
        SOURCES as f64
    );
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"global_limit\"}"
        ),
        refused as f64
    );
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"source_limit\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(&m, "mxgate_session_duration_seconds_count"),
        admitted as f64
    );
    assert_eq!(metric(&m, "mxgate_connections_active"), 0.0);
    assert_eq!(metric(&m, "mxgate_sources_active"), 0.0);
    // Bounded: tens of MiB at most, not growing with the number of sources seen.
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew by {} KiB",
        rss_after - rss_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_dying_mid_session_closes_clients_and_recovers() {
    let Some(mut sink) = SmtpSink::start(&[]).await else {
        return;
    };
    let sink_addr = sink.addr;
    let mx = start(config(sink_addr)).await;
    let at = mx.listen_addrs()[0];
    let mut sessions = Vec::new();
    for i in 0..5 {
        let mut s = connect_from(&format!("127.0.0.{}", 10 + i), at)
            .await
            .unwrap();
        assert!(read_line(&mut s).await.starts_with(b"220 "));
        s.write_all(b"EHLO client.example\r\n").await.unwrap();
        sessions.push(s);
    }
    sink.kill();
    for s in sessions.iter_mut() {
        // Closed, never a hang: read until EOF or reset within the helper's 5 s.
        let mut buf = vec![0u8; 4096];
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the client saw its connection end");
    }
    // As an SMTP client does on end of file, close; a half-closed session would otherwise
    // legitimately stay open until the client is done sending (or the idle timeout).
    drop(sessions);
    eventually("slots freed", || mx.admission().active() == 0).await;
    expect_refusal("127.0.0.20", at, BACKEND_LINE).await;
    // The backend comes back on the same address: admitted again, no restart of mxgate.
    let _sink = SmtpSink::start_on(sink_addr, &[])
        .await
        .expect("smtp-sink restarts");
    let mut s = connect_from("127.0.0.21", at).await.unwrap();
    assert!(read_line(&mut s).await.starts_with(b"220 "));
}

/// A backend that accepts and never says a word; returns what each connection finally saw.
async fn silent_backend() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<usize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                let _ = tx.send(got.len());
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_never_speaks_gets_the_greeting_timeout() {
    let (addr, mut closed) = silent_backend().await;
    let mut c = config(addr);
    c.backend_greeting_timeout = Some(Duration::from_millis(300));
    let mx = start(c).await;
    let started = Instant::now();
    expect_refusal("127.0.0.2", mx.listen_addrs()[0], BACKEND_LINE).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    let backend_saw = tokio::time::timeout(Duration::from_secs(5), closed.recv())
        .await
        .unwrap();
    assert_eq!(backend_saw, Some(0), "the backend side was closed too");
    eventually("slot freed", || mx.admission().active() == 0).await;
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"backend_unavailable\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_greeting_timeout_the_idle_timeout_ends_a_silent_backend() {
    let (addr, mut closed) = silent_backend().await;
    let mut c = config(addr);
    c.idle_timeout = Duration::from_millis(300);
    let mx = start(c).await;
    let mut s = connect_from("127.0.0.2", mx.listen_addrs()[0])
        .await
        .unwrap();
    assert!(read_to_end(&mut s).await.is_empty());
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), closed.recv())
            .await
            .unwrap(),
        Some(0)
    );
    eventually("slot freed", || mx.admission().active() == 0).await;
}

/// A deterministic byte stream for session `id`, generated on the fly so that 64 × 8 MiB never
/// sits in memory: the receiver recomputes the digest of what it expects.
fn stream_chunk(seed: u64, offset: usize, len: usize) -> Vec<u8> {
    random_bytes(
        len,
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (offset as u64 / 8 + 1),
    )
}

/// Sends `size` bytes of stream `seed` then FIN, while reading everything the other side sends;
/// returns the digest of what was read.
async fn pump_stream(s: TcpStream, seed: u64, size: usize) -> (u64, usize) {
    const CHUNK: usize = 64 * 1024;
    let (mut r, mut w) = s.into_split();
    let writer = async move {
        let mut off = 0;
        while off < size {
            let n = CHUNK.min(size - off);
            w.write_all(&stream_chunk(seed, off, n)).await.unwrap();
            off += n;
        }
        w.shutdown().await.unwrap();
    };
    let reader = async move {
        let mut h = 0xcbf29ce484222325u64;
        let mut total = 0usize;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = r.read(&mut buf).await.expect("no reset");
            if n == 0 {
                return (h, total);
            }
            for &b in &buf[..n] {
                h = (h ^ b as u64).wrapping_mul(0x100000001b3);
            }
            total += n;
        }
    };
    let ((), got) = tokio::join!(writer, reader);
    got
}

fn expected_digest(seed: u64, size: usize) -> u64 {
    const CHUNK: usize = 64 * 1024;
    let mut h = 0xcbf29ce484222325u64;
    let mut off = 0;
    while off < size {
        let n = CHUNK.min(size - off);
        for b in stream_chunk(seed, off, n) {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        off += n;
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrity_under_load_64_sessions_of_8mib_each_way() {
    const SESSIONS: u64 = 64;
    const SIZE: usize = 8 * 1024 * 1024;
    for mode in modes() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = l.local_addr().unwrap();
        // Accept order need not match connect order, so each side sends a stream seeded by its
        // own order and the digests are matched as sets below.
        let backend = tokio::spawn(async move {
            let mut streams = Vec::new();
            for _ in 0..SESSIONS {
                streams.push(l.accept().await.unwrap().0);
            }
            streams
        });
        let mut c = config_mode(backend_addr, mode);
        c.max_per_source = SESSIONS as usize;
        let mx = start(c).await;
        let at = mx.listen_addrs()[0];
        let mut clients = Vec::new();
        for _ in 0..SESSIONS {
            clients.push(connect_from("127.0.0.2", at).await.unwrap());
        }
        let backend_streams = backend.await.unwrap();
        let mut runs = Vec::new();
        for (i, s) in clients.into_iter().enumerate() {
            runs.push(tokio::spawn(pump_stream(s, 1000 + i as u64, SIZE)));
        }
        for (i, s) in backend_streams.into_iter().enumerate() {
            runs.push(tokio::spawn(pump_stream(s, 5000 + i as u64, SIZE)));
        }
        let mut client_got = Vec::new();
        let mut backend_got = Vec::new();
        for (i, r) in runs.into_iter().enumerate() {
            let (digest, len) = r.await.unwrap();
            assert_eq!(len, SIZE, "{mode:?}: every byte arrived");
            if (i as u64) < SESSIONS {
                client_got.push(digest);
            } else {
                backend_got.push(digest);
            }
        }
        // Connections pair up by accept order, which the test cannot see; every digest sent by
        // one side must have arrived whole and in order at the other, so compare as sets.
        let mut sent_up: Vec<u64> = (0..SESSIONS)
            .map(|i| expected_digest(1000 + i, SIZE))
            .collect();
        let mut sent_down: Vec<u64> = (0..SESSIONS)
            .map(|i| expected_digest(5000 + i, SIZE))
            .collect();
        for v in [
            &mut sent_up,
            &mut sent_down,
            &mut client_got,
            &mut backend_got,
        ] {
            v.sort_unstable();
        }
        assert_eq!(backend_got, sent_up, "{mode:?}: client→backend streams");
        assert_eq!(client_got, sent_down, "{mode:?}: backend→client streams");
        eventually("sessions ended", || mx.admission().active() == 0).await;
        let m = scrape(mx.metrics_addr().unwrap()).await;
        let total = (SESSIONS as usize * SIZE) as f64;
        assert_eq!(
            metric(&m, "mxgate_bytes_total{direction=\"client_to_backend\"}"),
            total
        );
        assert_eq!(
            metric(&m, "mxgate_bytes_total{direction=\"backend_to_client\"}"),
            total
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_talking_before_the_greeting_is_forwarded_like_any_other() {
    for mode in modes() {
        let backend = GreetingBackend::start().await;
        let mx = start(config_mode(backend.addr, mode)).await;
        let s = connect_from("127.0.0.2", mx.listen_addrs()[0])
            .await
            .unwrap();
        let early = random_bytes(1024 * 1024, 9);
        let got = exchange(s, early.clone(), false).await;
        // The greeting, then the echo of every early byte, in order.
        assert_eq!(&got[..GREETING.len()], GREETING, "{mode:?}");
        assert_eq!(digest(&got[GREETING.len()..]), digest(&early), "{mode:?}");
        eventually("session ended", || mx.admission().active() == 0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_keep_lingering_properly_through_a_flood() {
    // Clients that talk before the greeting leave bytes unread when mxgate answers; only the
    // lingering close (read what they sent, wait for their FIN, then close) keeps a reset from
    // destroying the reply on stacks that drop unread data on RST. Under a flood the accept
    // loop must still look after the sockets it lingers on, or the set fills up and every
    // further refusal is closed at once. Plain threads with blocking sockets keep the
    // listener's queue from ever running dry, as a real flood does.
    const CLIENTS: usize = 32;
    const EACH: usize = 500;
    let backend = GreetingBackend::start().await;
    let mut c = config(backend.addr);
    c.max_connections = 0;
    let mx = Arc::new(start(c).await);
    let at = mx.listen_addrs()[0];
    let most = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (mx, most) = (mx.clone(), most.clone());
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                for _ in 0..EACH {
                    let mut s = std::net::TcpStream::connect(at).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    s.write_all(b"EHLO early.example\r\n").unwrap();
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).expect("a clean end, not a reset");
                    assert_eq!(got, GLOBAL_LINE);
                    drop(s);
                    most.fetch_max(mx.lingering() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        for t in threads {
            t.join().unwrap();
        }
    })
    .await
    .unwrap();
    let most = most.load(Ordering::Relaxed);
    println!(
        "{} refusals; at most {most} lingering at once",
        CLIENTS * EACH
    );
    // Looked after, the set holds about as many as there are clients between two looks
    // (under 100 here); left alone it climbs towards its bound of 1,024.
    assert!(most < 400, "lingering refusals piled up: {most} at once");
    eventually("every lingering refusal closed", || mx.lingering() == 0).await;
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"global_limit\"}"
        ),
        (CLIENTS * EACH) as f64
    );
}
