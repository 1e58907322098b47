//! The per-user pipe quota: the real binary, run as an unprivileged user in splice mode, holds
//! 2,000 idle sessions, then every one of them exchanges data, with no step copied for lack of a
//! pipe. Holding pipes for a session's whole life would hit `fs.pipe-user-pages-soft` after about
//! 500 sessions.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SESSIONS: usize = 2000;

/// Starts the real binary, as `nobody` when the tests run as root.
fn spawn_unprivileged(backend: SocketAddr, listen: SocketAddr, metrics: SocketAddr) -> Child {
    // A copy outside the build tree, so `nobody` can execute it whatever the checkout's modes.
    let dir = std::env::temp_dir().join(format!("mxgate-unpriv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("mxgate");
    std::fs::copy(env!("CARGO_BIN_EXE_mxgate"), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut cmd = if is_root() {
        assert!(
            require_tool("setpriv"),
            "setpriv is needed to drop to nobody"
        );
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]);
        c.arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    cmd.args(["run", "--forwarding", "splice", "--hostname", "mx.test"])
        .args(["--listen", &listen.to_string()])
        .args(["--backend", &backend.to_string()])
        .args(["--metrics", &metrics.to_string()])
        .args(["--max-connections", "5000", "--max-per-source", "5000"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd.spawn().expect("mxgate starts")
}

fn process_uid(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_sessions_unprivileged_in_splice_mode() {
    let backend = GreetingBackend::start().await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = KillOnDrop(spawn_unprivileged(backend.addr, listen, metrics_addr));
    let pid = child.0.id();
    // Ready when the listener accepts and greets through to the backend.
    eventually("mxgate listening", || {
        std::net::TcpStream::connect(listen).is_ok()
    })
    .await;
    assert_ne!(process_uid(pid), 0, "mxgate must run unprivileged");

    let mut sessions = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let source = format!("127.0.{}.{}", 1 + i / 250, 1 + i % 250);
        sessions.push(expect_admitted(&source, listen).await);
    }
    eventually("all sessions counted", || fd_count(pid) >= 2 * SESSIONS).await;
    let idle_fds = fd_count(pid);
    let m = scrape(metrics_addr).await;
    assert_eq!(metric(&m, "mxgate_connections_active"), SESSIONS as f64);
    // Two sockets per idle session; pooled pipes and the process's own descriptors on top.
    let extra = idle_fds - 2 * SESSIONS;
    assert!(
        extra < 2 * 1024 + 64,
        "idle sessions hold no pipes: {idle_fds} fds in all"
    );

    // Every session now talks: each ping comes back intact through a pipe.
    for (i, s) in sessions.iter_mut().enumerate() {
        let ping = format!("NOOP session {i}\r\n");
        s.write_all(ping.as_bytes()).await.unwrap();
        let mut echo = vec![0u8; ping.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(echo, ping.as_bytes());
    }
    let m = scrape(metrics_addr).await;
    assert_eq!(
        metric(&m, "mxgate_splice_pool_exhausted_total"),
        0.0,
        "no step lacked a pipe"
    );
    assert_eq!(metric(&m, "mxgate_splice_fallbacks_total"), 0.0);
    let forwarded = metric(&m, "mxgate_bytes_total{direction=\"client_to_backend\"}")
        + metric(&m, "mxgate_bytes_total{direction=\"backend_to_client\"}");
    assert_eq!(
        metric(&m, "mxgate_spliced_bytes_total"),
        forwarded,
        "every byte was spliced"
    );
    assert!(forwarded > (SESSIONS * GREETING.len()) as f64);

    drop(sessions);
    drop(child);
}
