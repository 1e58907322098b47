//! The binary as a service: the sd_notify protocol on our own NOTIFY_SOCKET, the watchdog,
//! socket activation on fd 3, and graceful drain on SIGTERM.

mod common;

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DRAIN_LINE: &[u8] = b"421 4.3.2 mx.test Service shutting down, try again later\r\n";

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mxgate-svc-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A NOTIFY_SOCKET the test reads.
struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn new(tag: &str) -> Notify {
        let path = temp_dir(tag).join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Notify { socket, path }
    }

    /// The next message, as its lines, whatever it says.
    fn any(&self) -> Vec<String> {
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(String::from)
            .collect()
    }

    /// The next message that is not a bare `STATUS=` update (those come whenever the load
    /// changes).
    fn next(&self) -> Vec<String> {
        loop {
            let m = self.any();
            if !m.iter().all(|l| l.starts_with("STATUS=")) {
                return m;
            }
        }
    }

    /// The `STATUS=` text of each message until one equals `want`; panics after 10 s without.
    fn status_until(&self, want: &str) -> Vec<String> {
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            for l in self.any() {
                if let Some(s) = l.strip_prefix("STATUS=") {
                    seen.push(s.to_string());
                    if s == want {
                        return seen;
                    }
                }
            }
        }
        panic!("no STATUS={want:?}; saw {seen:?}");
    }
}

fn signal(child: &std::process::Child, sig: Signal) {
    send_signal(child.id(), sig).unwrap();
}

/// Waits for the child to exit within `limit` and returns its exit code.
fn wait_exit(child: &mut std::process::Child, limit: Duration) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().expect("exited, not killed by a signal");
        }
        assert!(
            Instant::now() < deadline,
            "mxgate did not exit in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_reloading_stopping() {
    let backend = GreetingBackend::start().await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let notify = Notify::new("notify");
    let config = temp_dir("notify").join("mxgate.toml");
    std::fs::write(&config, "max_per_source = 3\n").unwrap();
    let mut child = KillOnDrop(
        mxgate_command(
            backend.addr,
            listen,
            &["--config", config.to_str().unwrap()],
        )
        .env("NOTIFY_SOCKET", &notify.path)
        .spawn()
        .unwrap(),
    );

    let ready = notify.next();
    assert!(ready.contains(&"READY=1".to_string()), "{ready:?}");
    // READY=1 came only once the port accepts: a connection now gets through at once.
    let mut s = expect_admitted("127.0.0.2", listen).await;

    std::fs::write(&config, "max_per_source = 1\n").unwrap();
    signal(&child.0, Signal::HUP);
    let reloading = notify.next();
    assert!(
        reloading.contains(&"RELOADING=1".to_string()),
        "{reloading:?}"
    );
    assert!(
        reloading
            .iter()
            .any(|l| l.starts_with("MONOTONIC_USEC=") && l[15..].parse::<u64>().is_ok()),
        "{reloading:?}"
    );
    let ready = notify.next();
    assert!(ready.contains(&"READY=1".to_string()), "{ready:?}");
    // The reloaded limit applies.
    expect_refusal("127.0.0.2", listen, SOURCE_LINE).await;

    s.shutdown().await.unwrap();
    drop(s);
    signal(&child.0, Signal::TERM);
    let stopping = notify.next();
    assert!(stopping.contains(&"STOPPING=1".to_string()), "{stopping:?}");
    assert_eq!(wait_exit(&mut child.0, Duration::from_secs(10)), 0);
}

/// `systemctl status` shows the load: the `STATUS=` line follows the sessions held, and is
/// sent again only when it changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_line_follows_the_load() {
    let backend = GreetingBackend::start().await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let notify = Notify::new("status-line");
    let mut child = KillOnDrop(
        mxgate_command(
            backend.addr,
            listen,
            &["--max-connections", "10", "--max-per-source", "5"],
        )
        .env("NOTIFY_SOCKET", &notify.path)
        .spawn()
        .unwrap(),
    );
    let ready = notify.any();
    assert!(ready.contains(&"READY=1".to_string()), "{ready:?}");
    assert!(
        ready.contains(&"STATUS=0/10 sessions, 0 waiting, 1/1 backends up".to_string()),
        "{ready:?}"
    );
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(expect_admitted("127.0.0.2", listen).await);
    }
    let seen = notify.status_until("3/10 sessions, 0 waiting, 1/1 backends up");
    // Only changes are sent: no line repeats the one before it.
    assert!(seen.windows(2).all(|w| w[0] != w[1]), "{seen:?}");
    for mut s in held.drain(..) {
        s.shutdown().await.unwrap();
    }
    notify.status_until("0/10 sessions, 0 waiting, 1/1 backends up");
    signal(&child.0, Signal::TERM);
    let stopping = notify.next();
    assert!(stopping.contains(&"STOPPING=1".to_string()), "{stopping:?}");
    assert_eq!(wait_exit(&mut child.0, Duration::from_secs(10)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_is_pinged_while_accept_loops_turn() {
    let backend = GreetingBackend::start().await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let notify = Notify::new("watchdog");
    let _child = KillOnDrop(
        mxgate_command(backend.addr, listen, &[])
            .env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", "1000000")
            .spawn()
            .unwrap(),
    );
    assert!(notify.next().contains(&"READY=1".to_string()));
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(notify.next(), vec!["WATCHDOG=1".to_string()]);
    }
    // Three pings at half of a 1 s period.
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
}

/// mxgate run with `listener` passed as systemd passes it (fd 3, `LISTEN_FDS=1`, `LISTEN_PID`
/// its own pid), against `backend`, with `extra` flags. The caller keeps its own copy of the
/// listener, as systemd does, or drops it.
fn activated(listener: &std::net::TcpListener, backend: SocketAddr, extra: &[&str]) -> Command {
    use std::os::fd::AsRawFd;
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_mxgate"))
        .args([
            "run",
            "--hostname",
            HOST,
            "--metrics",
            "off",
            "--pregreet",
            "off",
        ])
        .args(["--backend", &backend.to_string()])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_uses_the_inherited_listener() {
    let backend = GreetingBackend::start().await;
    let inherited = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = inherited.local_addr().unwrap();
    // `--listen` names another port: with an inherited socket it must not be used.
    let unused: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = activated(&inherited, backend.addr, &["--listen", &unused.to_string()])
        .spawn()
        .unwrap();
    drop(inherited);
    let s = expect_admitted("127.0.0.2", addr).await;
    drop(s);
    assert!(
        std::net::TcpStream::connect(unused).is_err(),
        "--listen was not bound"
    );
    // `listen` was set and is not used: the operator is told at start-up.
    signal(&child, Signal::TERM);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)), 0);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("socket-activated: the sockets systemd passed are used, and `listen` in the config is not"),
        "{err}"
    );
}

/// A restart or upgrade under socket activation: the draining instance stops accepting at
/// once, and a newcomer waits in the backlog of the socket systemd holds until the next
/// instance takes it, instead of getting the draining 421. The session in progress finishes;
/// the client waiting in the queue (this process's own connection) gets the draining 421.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activated_drain_leaves_newcomers_to_the_next_instance() {
    let backend = GreetingBackend::start().await;
    // systemd's socket: this test keeps its copy across both instances.
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let notify = Notify::new("activated-drain");
    let mut old = KillOnDrop(
        activated(&socket, backend.addr, &["--max-connections", "1"])
            .env("NOTIFY_SOCKET", &notify.path)
            .spawn()
            .unwrap(),
    );
    assert!(notify.next().contains(&"READY=1".to_string()));
    let mut held = expect_admitted("127.0.0.2", addr).await;
    let mut queued = connect_from("127.0.0.3", addr).await.unwrap();
    notify.status_until("1/1 sessions, 1 waiting, 1/1 backends up");

    signal(&old.0, Signal::TERM);
    assert!(notify.next().contains(&"STOPPING=1".to_string()));
    // The queue is closed only once no accept loop is left: from here on nothing accepts.
    assert_eq!(read_to_end(&mut queued).await, DRAIN_LINE);
    let mut newcomers = Vec::new();
    for source in ["127.0.0.4", "127.0.0.5", "127.0.0.6"] {
        newcomers.push(connect_from(source, addr).await.unwrap());
    }
    // The session in progress goes on, then ends, and with it the old instance.
    held.write_all(b"NOOP\r\n").await.unwrap();
    let mut echo = [0u8; 6];
    held.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"NOOP\r\n");
    drop(held);
    assert_eq!(wait_exit(&mut old.0, Duration::from_secs(10)), 0);
    assert_eq!(
        backend.accepted(),
        1,
        "only the held session reached the backend"
    );
    // Nothing was said to the newcomers, and nothing closed them: they are still in the backlog.
    let mut nothing = [0u8; 1];
    for s in &newcomers {
        let r = s.try_read(&mut nothing);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a newcomer got {r:?} from the draining instance"
        );
    }

    let next = Notify::new("activated-next");
    let _next = KillOnDrop(
        activated(&socket, backend.addr, &[])
            .env("NOTIFY_SOCKET", &next.path)
            .spawn()
            .unwrap(),
    );
    assert!(!newcomers.is_empty());
    for mut s in newcomers {
        assert_eq!(
            read_line(&mut s).await,
            GREETING,
            "the next instance took it"
        );
    }
    assert_eq!(backend.accepted(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_held_sessions_then_exits_zero() {
    let backend = GreetingBackend::start().await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = KillOnDrop(mxgate_command(backend.addr, listen, &[]).spawn().unwrap());
    eventually("listening", || std::net::TcpStream::connect(listen).is_ok()).await;
    let mut held = expect_admitted("127.0.0.2", listen).await;

    signal(&child.0, Signal::TERM);
    // New clients get the draining reply; poll until the signal has been handled.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = connect_from("127.0.0.3", listen).await.unwrap();
        let line = read_line(&mut s).await;
        if line == DRAIN_LINE {
            assert!(read_to_end(&mut s).await.is_empty(), "then a clean close");
            break;
        }
        // Not handled yet: this client was still admitted.
        assert_eq!(line, GREETING);
        assert!(Instant::now() < deadline, "no draining reply");
    }
    // The held session still works.
    held.write_all(b"NOOP\r\n").await.unwrap();
    let mut echo = [0u8; 6];
    held.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"NOOP\r\n");
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "still running while a session is open"
    );
    drop(held);
    assert_eq!(wait_exit(&mut child.0, Duration::from_secs(10)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_cuts_held_sessions_and_still_exits_zero() {
    let backend = GreetingBackend::start().await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = KillOnDrop(
        mxgate_command(backend.addr, listen, &["--drain-timeout", "1s"])
            .spawn()
            .unwrap(),
    );
    eventually("listening", || std::net::TcpStream::connect(listen).is_ok()).await;
    let mut held = expect_admitted("127.0.0.2", listen).await;
    let sent = Instant::now();
    signal(&child.0, Signal::TERM);
    let rest = read_to_end(&mut held).await;
    let cut_after = sent.elapsed();
    assert!(rest.is_empty());
    assert!(
        cut_after >= Duration::from_millis(900) && cut_after < Duration::from_secs(5),
        "cut after {cut_after:?}"
    );
    assert_eq!(wait_exit(&mut child.0, Duration::from_secs(10)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once() {
    let backend = GreetingBackend::start().await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let notify = Notify::new("twice");
    let mut child = KillOnDrop(
        mxgate_command(backend.addr, listen, &[])
            .env("NOTIFY_SOCKET", &notify.path)
            .spawn()
            .unwrap(),
    );
    assert!(notify.next().contains(&"READY=1".to_string()));
    // A held session would keep the drain going for the default 30 s.
    let _held = expect_admitted("127.0.0.2", listen).await;
    signal(&child.0, Signal::TERM);
    assert!(notify.next().contains(&"STOPPING=1".to_string()));
    let second = Instant::now();
    signal(&child.0, Signal::TERM);
    assert_eq!(wait_exit(&mut child.0, Duration::from_secs(5)), 0);
    assert!(
        second.elapsed() < Duration::from_secs(2),
        "{:?}",
        second.elapsed()
    );
}
