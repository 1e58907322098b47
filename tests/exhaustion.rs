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

    // Out of descriptors: the limit just above what is open, and every free one taken.
    set_soft_nofile(fd_count(std::process::id()) as u64 + 16);
    let (stop, held) = (Arc::new(AtomicBool::new(false)), Arc::default());
    let grabber = {
        let (stop, held) = (stop.clone(), Arc::clone(&held));
        std::thread::spawn(move || grab_every_free_descriptor(stop, held))
    };
    let taken = || held.lock().unwrap().len();
    eventually("the descriptors taken", || taken() >= 10).await;
    // Four more slots (a reload raises the limit): each grant's backend socket fails with
    // EMFILE, and nothing frees a descriptor meanwhile.
    let mut raised = mx.config();
    raised.max_connections = 8;
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
