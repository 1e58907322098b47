//! The real binary under pressure: out of file descriptors, and a slow reader.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn spawn(
    backend: SocketAddr,
    listen: SocketAddr,
    extra: &[&str],
    nofile: Option<u64>,
    log: &std::path::Path,
) -> KillOnDrop {
    let mut cmd = mxgate_command(backend, listen, extra);
    cmd.stderr(std::fs::File::create(log).unwrap());
    if let Some(n) = nofile {
        // SAFETY: setrlimit is async-signal-safe; it runs in the child between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    KillOnDrop(cmd.spawn().unwrap())
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / rustix::param::clock_ticks_per_second() as f64
}

fn log_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("mxgate-{tag}-{}.log", std::process::id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_backs_off_and_recovers() {
    let backend = GreetingBackend::start().await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = log_path("emfile");
    let child = spawn(
        backend.addr,
        listen,
        &["--max-per-source", "5000"],
        Some(256),
        &log,
    );
    let pid = child.0.id();
    eventually("listening", || std::net::TcpStream::connect(listen).is_ok()).await;

    // 1,000 concurrent connections against 256 descriptors.
    let mut clients = Vec::new();
    for i in 0..1000u32 {
        let src = format!("127.0.{}.{}", 1 + i / 200, 1 + i % 200);
        if let Ok(s) = connect_from(&src, listen).await {
            clients.push(s);
        }
    }
    assert!(
        clients.len() >= 900,
        "the kernel queued the attempts: {}",
        clients.len()
    );
    // Overloaded for a while: the process stays up and does not spin.
    let cpu0 = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = cpu_seconds(pid) - cpu0;
    println!(
        "fd exhaustion: {} connections held, mxgate used {cpu:.2} s of CPU in 2 s",
        clients.len()
    );
    assert!(cpu < 1.0, "accept loop spinning: {cpu:.2} s of CPU in 2 s");
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_ok(),
        "mxgate survived"
    );

    drop(clients);
    // Once the load stops, it admits normally again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut s = connect_from("127.0.9.9", listen).await.unwrap();
        let mut line = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let mut b = [0u8; 1];
            while !line.ends_with(b"\n") {
                match s.read(&mut b).await {
                    Ok(1) => line.push(b[0]),
                    _ => break,
                }
            }
        })
        .await;
        if line == GREETING {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never admitted again: {:?}",
            String::from_utf8_lossy(&line)
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let warnings = text.matches("accept failed").count();
    assert!(
        (1..=2).contains(&warnings),
        "rate-limited warnings, not a flood: {warnings}\n{text}"
    );
    assert!(text.contains("raise LimitNOFILE"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_keeps_memory_flat_and_is_not_idle() {
    const SIZE: usize = 1024 * 1024;
    let data = random_bytes(SIZE, 11);
    let sent = data.clone();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = l.local_addr().unwrap();
    // Every connection gets the whole stream, so the readiness probe's own session cannot
    // take the client's place.
    let sent = std::sync::Arc::new(sent);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let sent = sent.clone();
            tokio::spawn(async move {
                if s.write_all(&sent).await.is_ok() {
                    let _ = s.shutdown().await;
                    let _ = s.read_to_end(&mut Vec::new()).await;
                }
            });
        }
    });
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = log_path("slow");
    let child = spawn(backend_addr, listen, &["--idle-timeout", "1s"], None, &log);
    let pid = child.0.id();
    eventually("listening", || std::net::TcpStream::connect(listen).is_ok()).await;
    let mut c = connect_from("127.0.0.2", listen).await.unwrap();
    // Shrink the client's receive buffer so the backlog sits upstream, as with a slow peer.
    socket2::SockRef::from(&c)
        .set_recv_buffer_size(32 * 1024)
        .unwrap();
    let mut got = Vec::with_capacity(SIZE);
    let mut byte = [0u8; 1];
    c.read_exact(&mut byte).await.unwrap();
    got.push(byte[0]);
    let rss_start = rss_kib(pid);
    // One byte per 100 ms for 3 s: three idle timeouts long, yet bytes keep moving.
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.read_exact(&mut byte).await.expect("not cut as idle");
        got.push(byte[0]);
    }
    let rss_end = rss_kib(pid);
    println!("slow reader: mxgate RSS {rss_start} KiB → {rss_end} KiB over 3 s at 10 bytes/s");
    assert!(
        rss_end < rss_start + 512,
        "memory grew: {rss_start} → {rss_end} KiB"
    );
    c.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), SIZE);
    assert_eq!(digest(&got), digest(&data));
}
