//! Out of descriptors, a client granted a slot whose backend socket cannot be opened waits
//! again at the head of the queue: it never gets the backend-unavailable 421, and the failure
//! is counted as mxgate's own. Alone in its own test binary: it lowers this process's
//! descriptor limit and fills it.

mod common;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

fn metric_of(mx: &mxgate::Running, series: &str) -> f64 {
    mx.render_metrics()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// Takes every descriptor that comes free, until `stop`, as a flood of new clients would.
fn grab_every_free_descriptor(stop: Arc<AtomicBool>, held: Arc<Mutex<Vec<OwnedFd>>>) {
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let fd = OwnedFd::from(devnull);
    while !stop.load(Ordering::Acquire) {
        match fd.try_clone() {
            Ok(dup) => held.lock().unwrap().push(dup),
            Err(_) => std::thread::yield_now(),
        }
    }
}

fn set_soft_nofile(soft: u64) {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(soft),
            maximum: hard,
        },
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_whose_backend_socket_fails_locally_wait_again_instead_of_getting_a_421() {
    let backend = GreetingBackend::start().await;
    let mut c = config(backend.addr);
    c.max_connections = 4;
    c.max_queued = 100;
    c.queue_timeout = Duration::from_secs(60);
    c.threads = 1;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let mut holders = Vec::new();
    for i in 0..4 {
        holders.push(expect_admitted(&format!("127.0.1.{}", i + 1), at).await);
    }
    const WAITERS: usize = 12;
    let mut waiters = Vec::new();
    for i in 0..WAITERS {
        waiters.push(
            connect_from(&format!("127.0.2.{}", i + 1), at)
                .await
                .unwrap(),
        );
    }
    eventually("every waiter queued", || mx.queued() == WAITERS).await;

    // The reload below raises the limit when the config's descriptor budget does not fit:
    // enough are opened first that it fits, so the limit stays where this test puts it.
    let mut raised = mx.config();
    raised.max_connections = 8;
    let budget = mxgate::descriptors::Budget::of(&raised, 1).total() as usize;
    let held: Arc<Mutex<Vec<OwnedFd>>> = Arc::default();
    let devnull = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    while fd_count(std::process::id()) < budget {
        held.lock().unwrap().push(devnull.try_clone().unwrap());
    }
    // Out of descriptors: the limit just above what is open, and every free one taken.
    set_soft_nofile(fd_count(std::process::id()) as u64 + 16);
    let stop = Arc::new(AtomicBool::new(false));
    let grabber = {
        let (stop, held) = (stop.clone(), Arc::clone(&held));
        std::thread::spawn(move || grab_every_free_descriptor(stop, held))
    };
    let taken = || held.lock().unwrap().len();
    let before = taken();
    eventually("the descriptors taken", || taken() >= before + 10).await;
    // Four more slots (a reload raises the limit): each grant's backend socket fails with
    // EMFILE, and nothing frees a descriptor meanwhile.
    assert!(mx.reload(Ok(raised)));
    let failures = r#"mxgate_local_errors_total{op="backend_socket",errno="EMFILE"}"#;
    let unavailable = r#"mxgate_connections_rejected_total{reason="backend_unavailable"}"#;
    eventually("backend sockets failing locally", || {
        metric_of(&mx, failures) >= 4.0
    })
    .await;
    assert_eq!(metric_of(&mx, unavailable), 0.0);
    assert_eq!(mx.queued(), WAITERS, "nobody left the queue");

    // Descriptors again: every waiter is served in turn, none refused.
    stop.store(true, Ordering::Release);
    grabber.join().unwrap();
    held.lock().unwrap().clear();
    set_soft_nofile(4096);
    let failed = metric_of(&mx, failures);
    drop(holders);
    // Each waiter reads its greeting, then leaves, which frees the slot for the next.
    let served: Vec<_> = waiters
        .into_iter()
        .map(|mut w| tokio::spawn(async move { read_line(&mut w).await }))
        .collect();
    assert!(!served.is_empty());
    for (i, s) in served.into_iter().enumerate() {
        assert_eq!(s.await.unwrap(), GREETING, "waiter {i}");
    }
    assert_eq!(metric_of(&mx, unavailable), 0.0);
    println!("{failed} local failures, 0 backend_unavailable, {WAITERS} waiters served");
}

/// The soft limit of a real process under `prlimit`, read from /proc.
fn soft_nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soft_limit_is_raised_toward_the_hard_one_and_a_short_hard_one_warned_of() {
    if !require_tool("prlimit") {
        return;
    }
    let backend = GreetingBackend::start().await;
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Defaults (max_connections 1000, max_queued 5000) need about 10,000: 256 is raised to
    // the hard 8192.
    let mut run = std::process::Command::new("prlimit");
    run.args(["--nofile=256:8192", "--"])
        .arg(env!("CARGO_BIN_EXE_mxgate"))
        .args([
            "run",
            "--hostname",
            HOST,
            "--metrics",
            "off",
            "--threads",
            "1",
            "--pregreet",
            "off",
        ])
        .args([
            "--backend",
            &backend.addr.to_string(),
            "--listen",
            &listen.to_string(),
        ])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = KillOnDrop(run.spawn().unwrap());
    let pid = child.0.id();
    // `prlimit` execs mxgate in place: the pid is mxgate's once it listens.
    eventually("mxgate listening", || {
        std::net::TcpStream::connect(listen).is_ok()
    })
    .await;
    let soft = soft_nofile(pid);
    assert!(soft > 256 && soft <= 8192, "soft limit {soft}");
    drop(child);
    // A hard limit that falls short: `check` under it says so, with the numbers.
    let out = std::process::Command::new("prlimit")
        .args(["--nofile=512:512", "--"])
        .arg(env!("CARGO_BIN_EXE_mxgate"))
        .args(["check", "--hostname", HOST, "--backend", "192.0.2.1:25"])
        .args(["--max-connections", "20", "--max-queued", "2000"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("RLIMIT_NOFILE soft 512, hard 512")
            && text.contains("sessions 40 + queue 2000"),
        "{text}"
    );
}
