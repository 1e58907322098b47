//! Reloads against the real binary: a reload never changes what only a restart may change, and
//! a reload with a value past its range keeps the old config and the process.

mod common;

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use rustix::process::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that greets, echoes, and reports each connection's peer address.
async fn peer_backend() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<SocketAddr>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = l.accept().await {
            let _ = tx.send(peer);
            tokio::spawn(async move {
                let _ = s.write_all(GREETING).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, rx)
}

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// The mxgate child, killed when the test ends, passed or not.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The worker threads the process runs now.
fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("mxgate-"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_every_restart_only_key_as_it_was() {
    let (backend, mut peers) = peer_backend().await;
    let (listen_a, listen_b, metrics_a, metrics_b) = (addr(), addr(), addr(), addr());
    let dir = std::env::temp_dir().join(format!("mxgate-reload-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mxgate.toml");
    let common = format!("backend = \"{backend}\"\nhostname = \"{HOST}\"\npregreet = \"off\"\n");
    std::fs::write(
        &file,
        format!(
            "{common}listen = [\"{listen_a}\"]\nmetrics = \"{metrics_a}\"\nforwarding = \"copy\"\n\
             pipe_size = \"64KiB\"\nthreads = 1\nlog_format = \"text\"\ntransparent = false\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .args(["run", "--config", file.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map(Child)
        .unwrap();
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let next_line_with = |needle: &str| -> String {
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("a log line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    };
    next_line_with("accepting");
    // A thread names itself once it runs, which may be a moment after the log line.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while worker_threads(child.0.id()) != 1 {
        assert!(std::time::Instant::now() < deadline, "one worker thread");
        std::thread::yield_now();
    }

    // Every restart-only key changes; transparent would even need a capability check, and the
    // cluster a Redis (none listens on port 9: a restart-only table is never connected to).
    std::fs::write(
        &file,
        format!(
            "{common}listen = [\"{listen_b}\"]\nmetrics = \"{metrics_b}\"\nforwarding = \"splice\"\n\
             pipe_size = \"1MiB\"\nthreads = 2\nlog_format = \"json\"\ntransparent = true\n\
             transparent_port = true\nstate_dir = \"/nonexistent/mxgate-state\"\n[cluster]\nredis = \"redis://127.0.0.1:9/0\"\n\
             instance = \"reload-test\"\n"
        ),
    )
    .unwrap();
    send_signal(child.0.id(), Signal::HUP).unwrap();
    let mut named = Vec::new();
    // The reloaded config's warnings are logged like start-up's (a loopback backend without
    // proxy_protocol or transparent in force).
    let mut relay_warned = false;
    loop {
        let line = next_line_with("");
        if line.contains("config reloaded") {
            assert!(!line.starts_with('{'), "still text logs: {line}");
            break;
        }
        if line.contains("mynetworks") {
            relay_warned = true;
        }
        if line.contains("stays in force") {
            assert!(!line.starts_with('{'), "still text logs: {line}");
            named.push(line);
        }
    }
    // The one list reload enforces and the docs print: every key in it changed above.
    assert!(!mxgate::config::RESTART_ONLY.is_empty());
    for key in mxgate::config::RESTART_ONLY {
        assert!(
            named.iter().any(|l| l.contains(&format!("key=\"{key}\""))),
            "a warning names {key}: {named:#?}"
        );
    }
    assert_eq!(
        named.len(),
        mxgate::config::RESTART_ONLY.len(),
        "{named:#?}"
    );
    assert!(relay_warned, "the relay warning is logged on reload");

    // listen and metrics: the old sockets serve, the new addresses are not bound.
    assert!(TcpStream::connect(listen_b).await.is_err());
    assert!(TcpStream::connect(metrics_b).await.is_err());
    let m = scrape(metrics_a).await;
    assert_eq!(
        metric(&m, "mxgate_config_reloads_total{result=\"success\"}"),
        1.0
    );
    // threads: still one worker.
    assert_eq!(worker_threads(child.0.id()), 1);
    // forwarding: a bulk session is still copied, never spliced; transparent: the backend
    // still sees mxgate's address, not the client's.
    let mut s = connect_from("127.0.0.7", listen_a).await.unwrap();
    assert_eq!(read_line(&mut s).await, GREETING);
    let peer = tokio::time::timeout(Duration::from_secs(5), peers.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        peer.ip().to_string(),
        "127.0.0.1",
        "not the client's address"
    );
    let payload = random_bytes(2 << 20, 7);
    let (mut r, mut w) = s.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(digest(&echoed), digest(&payload));
    let m = scrape(metrics_a).await;
    assert_eq!(metric(&m, "mxgate_spliced_bytes_total"), 0.0);
    assert!(
        metric(&m, "mxgate_bytes_total{direction=\"client_to_backend\"}") >= payload.len() as f64
    );
    // pipe_size has no effect in copy mode, and it is kept like the others (named above).

    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_value_past_its_range_keeps_the_old_config_and_the_process() {
    let (backend, _peers) = peer_backend().await;
    let (listen, metrics) = (addr(), addr());
    let dir = std::env::temp_dir().join(format!("mxgate-reload-range-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mxgate.toml");
    let base = format!(
        "backend = \"{backend}\"\nhostname = \"{HOST}\"\nlisten = [\"{listen}\"]\n\
         metrics = \"{metrics}\"\nmax_per_source = 1\npregreet = \"off\"\n"
    );
    std::fs::write(&file, &base).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .args(["run", "--config", file.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Child)
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(metrics).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "mxgate serves metrics"
        );
        tokio::task::yield_now().await;
    }
    for (round, bad) in [
        "rate_per_source = \"2000000000/s\"\n",
        "connect_timeout = \"18446744073709551615s\"\n",
    ]
    .into_iter()
    .enumerate()
    {
        std::fs::write(&file, format!("{base}{bad}")).unwrap();
        send_signal(child.0.id(), Signal::HUP).unwrap();
        let want = (round + 1) as f64;
        let mut failed = 0.0;
        for _ in 0..1000 {
            failed = metric(
                &scrape(metrics).await,
                "mxgate_config_reloads_total{result=\"failure\"}",
            );
            if failed == want {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(failed, want, "the reload with {bad:?} failed");
        assert!(child.0.try_wait().unwrap().is_none(), "still running");
        // The old config still serves: one session per source, then the source's 421.
        let _held = expect_admitted("127.0.0.2", listen).await;
        expect_refusal("127.0.0.2", listen, SOURCE_LINE).await;
    }
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}
