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
/// What each session sends once all are open; well above the first read, so it is spliced.
const PAYLOAD: usize = 128 * 1024;

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
        .args(["--pregreet", "off"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd.spawn().expect("mxgate starts")
}

/// Bytes forwarded both ways so far.
fn forwarded(metrics: &std::collections::HashMap<String, f64>) -> f64 {
    metric(
        metrics,
        "mxgate_bytes_total{direction=\"client_to_backend\"}",
    ) + metric(
        metrics,
        "mxgate_bytes_total{direction=\"backend_to_client\"}",
    )
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
    let forwarded_before = forwarded(&m);
    // Two sockets per idle session; pooled pipes and the process's own descriptors on top.
    let extra = idle_fds - 2 * SESSIONS;
    assert!(
        extra < 2 * 1024 + 64,
        "idle sessions hold no pipes: {idle_fds} fds in all"
    );

    // Every session now talks: a bulk payload of its own goes through and comes back intact.
    // Bulk, because only bulk is spliced; commands of a few bytes are copied by design.
    for (i, s) in sessions.iter_mut().enumerate() {
        let payload: Vec<u8> = (0..PAYLOAD).map(|k| (k * 31 + i * 7) as u8).collect();
        let (mut rd, mut wr) = s.split();
        let mut echo = vec![0u8; PAYLOAD];
        let (w, r) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(wr.write_all(&payload), rd.read_exact(&mut echo))
        })
        .await
        .expect("echo in time");
        w.unwrap();
        r.unwrap();
        assert!(echo == payload, "session {i}: the echo differs");
    }
    let m = scrape(metrics_addr).await;
    assert_eq!(
        metric(&m, "mxgate_splice_pool_exhausted_total"),
        0.0,
        "no step lacked a pipe"
    );
    assert_eq!(metric(&m, "mxgate_splice_fallbacks_total"), 0.0);
    let forwarded = forwarded(&m);
    assert_eq!(
        forwarded - forwarded_before,
        (SESSIONS * 2 * PAYLOAD) as f64,
        "every byte forwarded once"
    );
    let spliced = metric(&m, "mxgate_spliced_bytes_total");
    assert!(
        spliced * 2.0 > forwarded,
        "most bytes went through pipes: {spliced} of {forwarded}"
    );

    drop(sessions);
    drop(child);
}
