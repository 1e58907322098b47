//! A longer soak against the real binary, run by hand: `tests/soak.sh MINUTES`.
//! It mixes a single-source flood, a backend that dies and comes back, resets mid-transfer and
//! integrity checks, then checks that RSS, descriptors and gauges are back to their baseline.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// An echo backend that can be killed (every connection dropped) and started again.
struct Backend {
    addr: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Backend {
    async fn start(addr: SocketAddr) -> Backend {
        let l = TcpListener::bind(addr).await.unwrap();
        let addr = l.local_addr().unwrap();
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let t = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let conn = tokio::spawn(async move {
                    let _ = s.write_all(GREETING).await;
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
                let mut all = t.lock().unwrap();
                all.retain(|h| !h.is_finished());
                all.push(conn);
            }
        });
        tasks.lock().unwrap().push(accept);
        Backend { addr, tasks }
    }

    fn kill(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

#[derive(Default)]
struct Tally {
    rounds: u64,
    refusals_read: u64,
    sessions_verified: u64,
    bytes_verified: u64,
    resets: u64,
    backend_deaths: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a long soak: run tests/soak.sh MINUTES"]
async fn soak() {
    let minutes: u64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(1);
    let mut backend = Backend::start("127.0.0.1:0".parse().unwrap()).await;
    let backend_addr = backend.addr;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = KillOnDrop(
        Spawn::new(backend_addr, listen)
            .metrics(metrics_addr)
            .log(Some("error"))
            .args(["--max-per-source", "16"])
            .command()
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    eventually("listening", || std::net::TcpStream::connect(listen).is_ok()).await;

    let deadline = Instant::now() + Duration::from_secs(60 * minutes);
    let mut t = Tally::default();
    let mut baseline: Option<(u64, usize)> = None;
    // At least one round, then until the deadline.
    loop {
        // Integrity: 8 sessions, 1 MiB each way, echoed back.
        let mut runs = Vec::new();
        for i in 0..8u64 {
            runs.push(tokio::spawn(async move {
                let s = expect_admitted(&format!("127.0.1.{}", i + 1), listen).await;
                let data = random_bytes(1024 * 1024, t_seed(i));
                let got = exchange(s, data.clone(), false).await;
                assert_eq!(digest(&got), digest(&data));
                got.len() as u64
            }));
        }
        for r in runs {
            t.bytes_verified += r.await.unwrap();
            t.sessions_verified += 1;
        }
        // Single-source flood: hold the source's 16 slots, then 2,000 refused attempts.
        let mut held = Vec::new();
        for _ in 0..16 {
            held.push(expect_admitted("127.0.2.1", listen).await);
        }
        for _ in 0..2000 {
            let mut s = connect_from("127.0.2.1", listen).await.unwrap();
            assert_eq!(read_to_end(&mut s).await, SOURCE_LINE);
            t.refusals_read += 1;
        }
        drop(held);
        // Resets mid-transfer.
        for i in 0..10u64 {
            let mut s = expect_admitted("127.0.3.1", listen).await;
            let _ = s.write_all(&random_bytes(256 * 1024, i)).await;
            let s = s.into_std().unwrap();
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(s);
            t.resets += 1;
        }
        // The backend dies under held sessions and comes back.
        let mut victims = Vec::new();
        for i in 0..4 {
            victims.push(expect_admitted(&format!("127.0.4.{}", i + 1), listen).await);
        }
        backend.kill();
        for mut v in victims {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), v.read_to_end(&mut Vec::new())).await;
        }
        // Aborting is asynchronous: wait until the backend's port really refuses.
        eventually("backend gone", || {
            std::net::TcpStream::connect(backend_addr).is_err()
        })
        .await;
        expect_refusal("127.0.4.9", listen, BACKEND_LINE).await;
        backend = Backend::start(backend_addr).await;
        t.backend_deaths += 1;
        t.rounds += 1;

        let m = scrape(metrics_addr).await;
        let settled = metric(&m, "mxgate_connections_active") == 0.0;
        if settled && baseline.is_none() {
            baseline = Some((rss_kib(pid), fd_count(pid)));
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    eventually("sessions ended", || {
        std::net::TcpStream::connect(listen).is_ok()
    })
    .await;
    let m = loop {
        let m = scrape(metrics_addr).await;
        if metric(&m, "mxgate_connections_active") == 0.0 {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (rss0, fds0) = baseline.expect("a settled round");
    let (rss1, fds1) = (rss_kib(pid), fd_count(pid));
    let pipes = metric(&m, "mxgate_splice_pipes") as usize;
    println!("| soak ({minutes} min) | value |");
    println!("|---|---|");
    println!("| rounds | {} |", t.rounds);
    println!("| refusals read whole | {} |", t.refusals_read);
    println!(
        "| sessions verified | {} ({} MiB each way) |",
        t.sessions_verified,
        t.bytes_verified >> 20
    );
    println!("| resets mid-transfer | {} |", t.resets);
    println!("| backend deaths survived | {} |", t.backend_deaths);
    println!("| RSS after round 1 / at end | {rss0} KiB / {rss1} KiB |");
    println!("| descriptors after round 1 / at end | {fds0} / {fds1} ({pipes} pooled pipes) |");
    println!(
        "| active / sources at end | {} / {} |",
        metric(&m, "mxgate_connections_active"),
        metric(&m, "mxgate_sources_active")
    );
    assert_eq!(metric(&m, "mxgate_sources_active"), 0.0);
    assert!(rss1 < rss0 + 4096, "RSS grew from {rss0} to {rss1} KiB");
    assert!(
        fds1 <= fds0.max(8) + 2 * pipes + 4,
        "descriptors grew from {fds0} to {fds1}"
    );
}

fn t_seed(i: u64) -> u64 {
    0x5eed_0000 + i
}
