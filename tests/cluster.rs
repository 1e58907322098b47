//! Shared limits across mxgate processes through a real `redis-server`, which each test starts
//! on its own loopback port with persistence off.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use rustix::process::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A `redis-server` on loopback with no persistence, killed on drop.
struct Redis {
    port: u16,
    child: Option<Child>,
}

impl Redis {
    /// `None` when redis-server is not installed (outside CI).
    async fn start() -> Option<Redis> {
        if !require_tool("redis-server") {
            return None;
        }
        let mut r = Redis {
            port: free_port(),
            child: None,
        };
        r.up().await;
        Some(r)
    }

    async fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let url = self.url();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ping = redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ping.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not answer");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url().as_str())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// A count as the cluster sees it: the sum of every instance's field.
    fn count(&self, cluster: &str, key: &str) -> i64 {
        let vals: Vec<i64> = redis::cmd("HVALS")
            .arg(format!("mxgate:{cluster}:{key}"))
            .query(&mut self.conn())
            .unwrap();
        vals.iter().sum()
    }

    /// This instance's field in a count.
    fn field(&self, cluster: &str, key: &str, instance: &str) -> i64 {
        let v: Option<i64> = redis::cmd("HGET")
            .arg(format!("mxgate:{cluster}:{key}"))
            .arg(instance)
            .query(&mut self.conn())
            .unwrap();
        v.unwrap_or(0)
    }

    fn leases(&self, cluster: &str) -> Vec<String> {
        redis::cmd("ZRANGE")
            .arg(format!("mxgate:{cluster}:leases"))
            .arg(0)
            .arg(-1)
            .query(&mut self.conn())
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.down();
    }
}

/// One mxgate process in a cluster, killed on drop.
struct Instance {
    child: Child,
    listen: SocketAddr,
    metrics: SocketAddr,
}

impl Instance {
    /// Starts the real binary and waits until Redis has its registration and the warm-up of
    /// a new copy of the counts is over (limits are then shared whole).
    async fn start(
        backend: SocketAddr,
        redis: &Redis,
        cluster: &str,
        name: &str,
        extra: &[&str],
    ) -> Instance {
        let i = Instance::spawn(backend, redis, cluster, name, extra, Stdio::inherit());
        i.wait_connected(true).await;
        i.wait_gauge("mxgate_cluster_warming", 0.0).await;
        i
    }

    /// Starts the real binary, its log (at `warn`) to `log`, without waiting for anything.
    fn spawn(
        backend: SocketAddr,
        redis: &Redis,
        cluster: &str,
        name: &str,
        extra: &[&str],
        log: Stdio,
    ) -> Instance {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Spawn::new(backend, listen)
            .metrics(metrics)
            .args(
                (!extra.contains(&"--cluster-redis"))
                    .then(|| ["--cluster-redis".to_string(), redis.url()])
                    .into_iter()
                    .flatten(),
            )
            .args(["--cluster-name", cluster, "--cluster-instance", name])
            // A test that is not about Redis's delay gives it a second: on a loaded host a
            // loopback answer can come later than the 50 ms default, and the instance then
            // decides alone under its fallback share, which such a test does not expect.
            .args(
                (!extra.contains(&"--cluster-admission-timeout"))
                    .then_some(["--cluster-admission-timeout", "1s"])
                    .into_iter()
                    .flatten(),
            )
            .args(extra)
            .command()
            .stderr(log)
            .spawn()
            .expect("mxgate starts");
        Instance {
            child,
            listen,
            metrics,
        }
    }

    /// A gauge's value, or `None` while the metrics listener is not up.
    async fn gauge(&self, name: &str) -> Option<f64> {
        let mut s = TcpStream::connect(self.metrics).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    async fn wait_gauge(&self, name: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.gauge(name).await != Some(want) {
            assert!(Instant::now() < deadline, "{name} never became {want}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_connected(&self, want: bool) {
        self.wait_gauge("mxgate_cluster_connected", if want { 1.0 } else { 0.0 })
            .await;
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) {
        let _ = send_signal(self.child.id(), Signal::TERM);
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "mxgate exits cleanly on SIGTERM: {status}"
        );
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Holds a session: the greeting came, and the session echoes.
async fn hold(source: &str, to: SocketAddr) -> TcpStream {
    let mut s = expect_admitted(source, to).await;
    s.write_all(b"NOOP\r\n").await.unwrap();
    assert_eq!(read_line(&mut s).await, b"NOOP\r\n");
    s
}

/// The limits of most tests, with a short lease (the warm-up of a new copy of the counts in
/// Redis lasts one lease).
const LIMITS: &[&str] = &[
    "--max-connections",
    "10",
    "--max-per-source",
    "3",
    "--queue-timeout",
    "0",
    "--cluster-lease-ttl",
    "3s",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_exactly_across_two_instances() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let backend = GreetingBackend::start().await;
    let a = Instance::start(backend.addr, &redis, "exact", "a", LIMITS).await;
    let b = Instance::start(backend.addr, &redis, "exact", "b", LIMITS).await;
    assert_eq!(redis.leases("exact"), ["a", "b"]);

    // A source holding 3 on one host is refused on the other.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(hold("127.0.0.2", a.listen).await);
    }
    expect_refusal("127.0.0.2", b.listen, SOURCE_LINE).await;
    expect_refusal("127.0.0.2", a.listen, SOURCE_LINE).await;
    assert_eq!(redis.count("exact", "s:127.0.0.2/32"), 3);

    // 10 in all, split 6 / 4; the 11th is refused on either host.
    for i in 3..6 {
        held.push(hold(&format!("127.0.0.{i}"), a.listen).await);
    }
    for i in 6..10 {
        held.push(hold(&format!("127.0.0.{i}"), b.listen).await);
    }
    assert_eq!(redis.count("exact", "g"), 10);
    assert_eq!(redis.field("exact", "g", "a"), 6);
    assert_eq!(redis.field("exact", "g", "b"), 4);
    expect_refusal("127.0.0.20", a.listen, GLOBAL_LINE).await;
    expect_refusal("127.0.0.21", b.listen, GLOBAL_LINE).await;
    assert_eq!(redis.count("exact", "g"), 10, "refusals take nothing");

    // Every session closed: every count returns to zero, and the keys go.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.count("exact", "g") != 0 {
        assert!(Instant::now() < deadline, "the counts never returned to 0");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(redis.count("exact", "s:127.0.0.2/32"), 0);
    // The slots are usable again, on either host.
    let again = hold("127.0.0.2", b.listen).await;
    assert_eq!(redis.count("exact", "g"), 1);
    drop((again, a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bursts_against_both_hosts_never_overshoot() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let backend = GreetingBackend::start().await;
    let limits = [
        "--max-connections",
        "10",
        "--max-per-source",
        "100",
        "--queue-timeout",
        "0",
        "--cluster-lease-ttl",
        "3s",
    ];
    let a = Instance::start(backend.addr, &redis, "burst", "a", &limits).await;
    let b = Instance::start(backend.addr, &redis, "burst", "b", &limits).await;
    for round in 0..3u8 {
        // 60 clients at once, 30 at each host, each from its own source.
        let mut tasks = Vec::new();
        for i in 0..60u8 {
            let to = if i % 2 == 0 { a.listen } else { b.listen };
            let source = format!("127.1.{round}.{}", i + 1);
            tasks.push(tokio::spawn(async move {
                let mut s = connect_from(&source, to).await.unwrap();
                let line = read_line(&mut s).await;
                (line, s)
            }));
        }
        let mut admitted = Vec::new();
        let mut refused = 0;
        for t in tasks {
            let (line, s) = t.await.unwrap();
            if line == GREETING {
                admitted.push(s);
            } else {
                assert_eq!(
                    String::from_utf8_lossy(&line),
                    String::from_utf8_lossy(GLOBAL_LINE)
                );
                refused += 1;
            }
        }
        // Every admitted session is still open: exactly the limit, no more.
        assert_eq!(admitted.len(), 10, "round {round}");
        assert_eq!(refused, 50);
        assert_eq!(redis.count("burst", "g"), 10, "the peak in Redis");
        drop(admitted);
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.count("burst", "g") != 0 {
            assert!(Instant::now() < deadline, "the counts never returned to 0");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_gives_its_slots_back_within_the_lease() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let backend = GreetingBackend::start().await;
    let limits = LIMITS.to_vec();
    let mut a = Instance::start(backend.addr, &redis, "crash", "a", &limits).await;
    let b = Instance::start(backend.addr, &redis, "crash", "b", &limits).await;
    let mut on_a = Vec::new();
    for i in 0..6 {
        on_a.push(hold(&format!("127.0.2.{}", i + 1), a.listen).await);
    }
    let mut on_b = Vec::new();
    for i in 0..4 {
        on_b.push(hold(&format!("127.0.3.{}", i + 1), b.listen).await);
    }
    expect_refusal("127.0.3.100", b.listen, GLOBAL_LINE).await;

    a.kill9();
    let killed = Instant::now();
    // Within lease_ttl plus a second, b can use all six slots a held.
    while on_b.len() < 10 {
        assert!(
            killed.elapsed() < Duration::from_secs(4),
            "only {} of 10 slots usable {:?} after the kill",
            on_b.len(),
            killed.elapsed()
        );
        let source = format!("127.0.3.{}", on_b.len() + 1);
        let mut s = connect_from(&source, b.listen).await.unwrap();
        if read_line(&mut s).await == GREETING {
            on_b.push(s);
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(redis.count("crash", "g"), 10);
    assert_eq!(redis.field("crash", "g", "a"), 0);
    assert_eq!(redis.leases("crash"), ["b"]);
    expect_refusal("127.0.3.101", b.listen, GLOBAL_LINE).await;
    drop(on_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_gives_the_slots_back_at_once() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let backend = GreetingBackend::start().await;
    let mut limits = LIMITS.to_vec();
    limits.extend(["--drain-timeout", "1s"]);
    let mut a = Instance::start(backend.addr, &redis, "stop", "a", &limits).await;
    let b = Instance::start(backend.addr, &redis, "stop", "b", &limits).await;
    let held: Vec<_> = futures_hold(a.listen, "127.0.4", 5).await;
    assert_eq!(redis.field("stop", "g", "a"), 5);
    a.terminate();
    // Gone from Redis when the process has exited: no lease to wait for.
    assert_eq!(redis.count("stop", "g"), 0);
    assert_eq!(redis.leases("stop"), ["b"]);
    drop(held);
    let mut on_b = futures_hold(b.listen, "127.0.5", 10).await;
    expect_refusal("127.0.5.200", b.listen, GLOBAL_LINE).await;
    on_b.clear();
}

/// Holds `n` sessions from `prefix.1` .. `prefix.n`.
async fn futures_hold(to: SocketAddr, prefix: &str, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for i in 1..=n {
        held.push(hold(&format!("{prefix}.{i}"), to).await);
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_falls_back_to_the_share_and_back_registers_the_live_sessions() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let backend = GreetingBackend::start().await;
    let mut limits = LIMITS.to_vec();
    limits.extend(["--cluster-fallback-share", "0.5"]);
    let a = Instance::start(backend.addr, &redis, "down", "a", &limits).await;
    let mut held = futures_hold(a.listen, "127.0.6", 2).await;
    assert_eq!(redis.count("down", "g"), 2);

    redis.down();
    // The first admission after the loss is still served, alone.
    held.push(hold("127.0.6.3", a.listen).await);
    a.wait_connected(false).await;
    // Up to half of each limit: 5 of 10 in all (and 1 of 3 per source).
    held.push(hold("127.0.6.4", a.listen).await);
    held.push(hold("127.0.6.5", a.listen).await);
    expect_refusal("127.0.6.6", a.listen, GLOBAL_LINE).await;
    // Nothing held was dropped: every session still echoes.
    for s in &mut held {
        s.write_all(b"RSET\r\n").await.unwrap();
        assert_eq!(read_line(s).await, b"RSET\r\n");
    }

    // Back: Redis gets the live sessions whole (it restarted empty), and limits are shared
    // once the new copy's warm-up is over.
    redis.up().await;
    a.wait_connected(true).await;
    assert_eq!(redis.count("down", "g"), 5);
    assert_eq!(redis.field("down", "s:127.0.6.1/32", "a"), 1);
    assert_eq!(redis.leases("down"), ["a"]);
    a.wait_gauge("mxgate_cluster_warming", 0.0).await;
    // Shared again: the whole limit of 10, not the share.
    for i in 6..=10 {
        held.push(hold(&format!("127.0.6.{i}"), a.listen).await);
    }
    expect_refusal("127.0.6.11", a.listen, GLOBAL_LINE).await;
    assert_eq!(redis.count("down", "g"), 10);
    held.truncate(4);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.count("down", "g") != 4 {
        assert!(Instant::now() < deadline, "releases never reached Redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_costs_an_admission_its_timeout_not_its_session() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let backend = GreetingBackend::start().await;
    let mut limits = LIMITS.to_vec();
    limits.extend(["--cluster-admission-timeout", "50ms"]);
    let a = Instance::start(backend.addr, &redis, "slow", "a", &limits).await;
    let mut held = futures_hold(a.listen, "127.0.7", 2).await;
    // Redis still holds the connection open but answers nothing.
    let pid = redis.child.as_ref().unwrap().id();
    let _ = send_signal(pid, Signal::STOP);
    let started = Instant::now();
    held.push(hold("127.0.7.3", a.listen).await);
    // Served alone once the admission's 50 ms ran out, not after a TCP timeout.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    a.wait_connected(false).await;
    held.push(hold("127.0.7.4", a.listen).await);
    let _ = send_signal(pid, Signal::CONT);
    a.wait_connected(true).await;
    // What Redis counts is the live sessions, the two admitted alone included.
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.count("slow", "g") != 4 {
        assert!(
            Instant::now() < deadline,
            "Redis counts {} sessions, 4 are open",
            redis.count("slow", "g")
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(held);
    while redis.count("slow", "g") != 0 {
        assert!(Instant::now() < deadline, "releases never reached Redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    redis.down();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_host_given_the_same_instance_name_cannot_wipe_the_first_ones_counts() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let backend = GreetingBackend::start().await;
    let limits = LIMITS.to_vec();
    let mut a = Instance::start(backend.addr, &redis, "dup", "same", &limits).await;
    let on_a = futures_hold(a.listen, "127.0.8", 3).await;
    // The copy-pasted config: b is given a's name. It is refused by Redis and decides alone.
    let b = Instance::spawn(backend.addr, &redis, "dup", "same", &limits, Stdio::null());
    b.wait_connected(false).await;
    let on_b = hold("127.0.9.1", b.listen).await;
    assert_eq!(redis.count("dup", "g"), 3, "a's counts are intact");
    assert_eq!(redis.field("dup", "g", "same"), 3);
    // Once a is gone and its lease has ended, b takes the name and registers what it holds.
    a.kill9();
    drop(on_a);
    b.wait_connected(true).await;
    assert_eq!(redis.count("dup", "g"), 1);
    drop(on_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_holds_each_host_to_its_share_until_every_host_registered() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let backend = GreetingBackend::start().await;
    let mut limits = LIMITS.to_vec();
    limits.extend(["--cluster-fallback-share", "0.5"]);
    let a = Instance::start(backend.addr, &redis, "empty", "a", &limits).await;
    let b = Instance::start(backend.addr, &redis, "empty", "b", &limits).await;
    let mut on_b = futures_hold(b.listen, "127.0.10", 8).await;
    assert_eq!(redis.count("empty", "g"), 8);

    // b cannot run (it stays silent as a slow host would), and Redis comes back empty.
    let b_pid = b.child.id();
    let _ = send_signal(b_pid, Signal::STOP);
    redis.down();
    redis.up().await;
    // a's next refresh finds no lease; it registers into the new, empty copy.
    a.wait_gauge("mxgate_cluster_warming", 1.0).await;
    a.wait_connected(true).await;
    assert_eq!(redis.leases("empty"), ["a"], "b has not registered yet");
    // Redis sees 10 free slots, but b's 8 are still open: a holds to its share, 5.
    let on_a = futures_hold(a.listen, "127.0.11", 5).await;
    expect_refusal("127.0.11.6", a.listen, GLOBAL_LINE).await;
    assert_eq!(
        a.gauge("mxgate_cluster_warming").await,
        Some(1.0),
        "still warming: the refusal was the share's"
    );
    assert_eq!(redis.count("empty", "g"), 5, "the refusal took nothing");

    // b runs again, finds its lease gone and registers its 8.
    let _ = send_signal(b_pid, Signal::CONT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.count("empty", "g") != 13 {
        assert!(
            Instant::now() < deadline,
            "Redis counts {}, 13 are open",
            redis.count("empty", "g")
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Past the warm-up, the shared limit holds: over it, nothing more on either host...
    a.wait_gauge("mxgate_cluster_warming", 0.0).await;
    expect_refusal("127.0.11.7", a.listen, GLOBAL_LINE).await;
    expect_refusal("127.0.10.9", b.listen, GLOBAL_LINE).await;
    // ... and once b is down to 3, a may take exactly the 2 left.
    on_b.truncate(3);
    while redis.count("empty", "g") != 8 {
        assert!(Instant::now() < deadline, "releases never reached Redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let more = futures_hold(a.listen, "127.0.12", 2).await;
    expect_refusal("127.0.12.3", a.listen, GLOBAL_LINE).await;
    assert_eq!(redis.count("empty", "g"), 10);
    drop((on_a, on_b, more));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_redis_backs_off_and_logs_one_line_not_one_per_drop() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let backend = GreetingBackend::start().await;
    let log_path = std::env::temp_dir().join(format!("mxgate-flap-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    let a = Instance::spawn(backend.addr, &redis, "flap", "a", LIMITS, log.into());
    a.wait_connected(true).await;
    let mut held = Vec::new();
    let mut reconnect = Vec::new();
    for drop_no in 1..=5u8 {
        // Redis drops the connection; the next admission finds out, and is served alone.
        redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"][..])
            .query::<i64>(&mut redis.conn())
            .unwrap();
        held.push(hold(&format!("127.0.13.{drop_no}"), a.listen).await);
        let dropped = Instant::now();
        a.wait_connected(true).await;
        reconnect.push(dropped.elapsed());
    }
    // Each drop came soon after the connection was made: each wait is twice the one before,
    // from 100 ms, up to a quarter of the 3 s lease (750 ms), never more.
    assert!(
        reconnect[3] >= Duration::from_millis(750) && reconnect[4] >= Duration::from_millis(750),
        "reconnected after {reconnect:?}"
    );
    assert_eq!(redis.leases("flap"), ["a"]);
    assert_eq!(a.gauge("mxgate_cluster_disconnects_total").await, Some(5.0));
    assert_eq!(
        redis.count("flap", "g"),
        5,
        "the sessions admitted alone are registered"
    );
    let text = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert_eq!(
        text.matches("Redis unreachable").count(),
        1,
        "one line for the outage, the drops after it counted quietly:\n{text}"
    );
    drop(held);
}

/// A backend that answers every connection with Exchange's 421; counts them.
async fn always_busy() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = s.write_all(mxgate::load::sink::EXCHANGE_BUSY).await;
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
            });
        }
    });
    (addr, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sent_back_to_the_queue_by_a_busy_backend_holds_no_cluster_slot_while_it_waits() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let (busy, tries) = always_busy().await;
    let backend = GreetingBackend::start().await;
    let limits = [
        "--max-connections",
        "1",
        "--queue-timeout",
        "20s",
        "--cluster-lease-ttl",
        "3s",
        "--cluster-fallback-share",
        "1",
    ];
    // One slot in the whole cluster. a's backend is full, and says so.
    let a = Instance::start(busy, &redis, "requeue", "a", &limits).await;
    let b = Instance::start(backend.addr, &redis, "requeue", "b", &limits).await;
    let mut waiting = connect_from("127.0.14.1", a.listen).await.unwrap();
    waiting.write_all(b"EHLO waits.test\r\n").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tries.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "a's client was never sent back");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Waiting on a, it leaves the slot to a client of b, which reaches its backend.
    let on_b = hold("127.0.14.2", b.listen).await;
    assert_eq!(redis.field("requeue", "g", "b"), 1);
    // a's client still waits for its own backend, greeted by no one.
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(100), waiting.read(&mut byte))
            .await
            .is_err(),
        "a's client is still waiting"
    );
    drop((on_b, waiting));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_redis_connection_keeps_dropping_never_loses_its_counts_to_another() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let backend = GreetingBackend::start().await;
    // a reaches Redis as its own user, so its connections alone can be cut.
    redis::cmd("ACL")
        .arg(&["SETUSER", "flappy", "on", ">pw", "~*", "&*", "+@all"][..])
        .query::<String>(&mut redis.conn())
        .unwrap();
    let a_url = redis.url().replace("redis://", "redis://flappy:pw@");
    let mut a_limits = LIMITS.to_vec();
    a_limits.extend(["--cluster-redis", &a_url]);
    let a = Instance::start(backend.addr, &redis, "lapse", "a", &a_limits).await;
    let b = Instance::start(backend.addr, &redis, "lapse", "b", LIMITS).await;
    let on_a = futures_hold(a.listen, "127.0.15", 5).await;
    let on_b = futures_hold(b.listen, "127.0.16", 5).await;
    for cut in 0..8 {
        redis::cmd("CLIENT")
            .arg(&["KILL", "USER", "flappy"][..])
            .query::<i64>(&mut redis.conn())
            .unwrap();
        // a finds out at its next refresh, and waits longer each time before it reconnects;
        // never so long that its 3 s lease ends and Redis (at b's next refresh) takes its 5
        // slots back while its sessions live.
        a.wait_gauge("mxgate_cluster_disconnects_total", f64::from(cut + 1))
            .await;
        while a.gauge("mxgate_cluster_connected").await != Some(1.0) {
            assert_eq!(
                redis.field("lapse", "g", "a"),
                5,
                "cut {cut}: a's lease ended"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(redis.field("lapse", "g", "a"), 5, "cut {cut}");
        expect_refusal(&format!("127.0.17.{}", cut + 1), b.listen, GLOBAL_LINE).await;
    }
    drop((on_a, on_b));
}

/// The body of one GET on an instance's metrics listener.
async fn get_body(metrics: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(metrics).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// Reads nothing for `quiet`: the client is still waiting, greeted by no one.
async fn still_waiting(s: &mut TcpStream, quiet: Duration) -> bool {
    let mut byte = [0u8; 1];
    tokio::time::timeout(quiet, s.read(&mut byte))
        .await
        .is_err()
}

/// The first line from whichever of `waiting` is sent one first (within 5 s), and that client,
/// taken out of `waiting` (kept open by the caller: its session goes on).
async fn greeted(waiting: &mut Vec<TcpStream>) -> (Vec<u8>, TcpStream) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for i in 0..waiting.len() {
            let mut byte = [0u8; 1];
            let peeked = tokio::time::timeout(Duration::from_millis(5), waiting[i].peek(&mut byte));
            if let Ok(Ok(_)) = peeked.await {
                let mut s = waiting.remove(i);
                return (read_line(&mut s).await, s);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no waiter was sent a line within 5 s"
        );
    }
}

// Issue 39, defect 2: a client waiting for a cluster slot showed as active and filled the
// host's own slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_for_a_cluster_slot_is_queued_not_active() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let backend = GreetingBackend::start().await;
    let limits = [
        "--max-connections",
        "5",
        "--max-queued",
        "4",
        "--queue-timeout",
        "3s",
        "--cluster-lease-ttl",
        "3s",
    ];
    let a = Instance::start(backend.addr, &redis, "honest", "a", &limits).await;
    let b = Instance::start(backend.addr, &redis, "honest", "b", &limits).await;
    let on_a = futures_hold(a.listen, "127.0.18", 5).await;
    assert_eq!(redis.count("honest", "g"), 5);

    // 4 clients of b wait for the cluster: queued, none active, none holding b's own slots.
    let mut waiting = Vec::new();
    for i in 1..=4u8 {
        let mut s = connect_from(&format!("127.0.19.{i}"), b.listen)
            .await
            .unwrap();
        s.write_all(b"EHLO waits.test\r\n").await.unwrap();
        waiting.push(s);
        b.wait_gauge("mxgate_connections_queued", f64::from(i))
            .await;
    }
    assert_eq!(b.gauge("mxgate_connections_active").await, Some(0.0));
    let status: serde_json::Value =
        serde_json::from_str(&get_body(b.metrics, "/status").await).unwrap();
    assert_eq!(status["active"], 0);
    assert_eq!(status["queued"], 4);
    assert!(status["queued_longest_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(status["cluster"]["local_sessions"], 0);
    // max_queued holds for them: the 5th waiter of b is refused at once.
    expect_refusal("127.0.19.5", b.listen, GLOBAL_LINE).await;
    b.wait_gauge(
        r#"mxgate_connections_rejected_total{reason="queue_full"}"#,
        1.0,
    )
    .await;
    for s in &mut waiting {
        assert!(still_waiting(s, Duration::from_millis(20)).await);
    }
    // queue_timeout ends their wait, with the global-limit line, counted as such.
    for s in &mut waiting {
        assert_eq!(read_line(s).await, GLOBAL_LINE);
    }
    b.wait_gauge(
        r#"mxgate_connections_rejected_total{reason="queue_timeout"}"#,
        4.0,
    )
    .await;
    b.wait_gauge("mxgate_connections_queued", 0.0).await;
    assert_eq!(redis.field("honest", "g", "b"), 0);
    drop(on_a);
}

// Issue 39, defect 1: a host whose freed slot went straight to its own waiter took every slot,
// while another host's waiters asked on a growing backoff and got none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_over_its_share_leaves_a_freed_slot_to_another_hosts_waiter() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let backend = GreetingBackend::start().await;
    let limits = [
        "--max-connections",
        "4",
        "--queue-timeout",
        "20s",
        "--cluster-lease-ttl",
        "3s",
    ];
    let a = Instance::start(backend.addr, &redis, "share", "a", &limits).await;
    let b = Instance::start(backend.addr, &redis, "share", "b", &limits).await;
    let mut on_a = futures_hold(a.listen, "127.0.20", 4).await;
    // a has 2 more clients waiting, b 2: demands 6 and 2 under 4, shares 2 and 2.
    let mut a_waiting = Vec::new();
    for i in 1..=2u8 {
        a_waiting.push(
            connect_from(&format!("127.0.21.{i}"), a.listen)
                .await
                .unwrap(),
        );
        a.wait_gauge("mxgate_connections_queued", f64::from(i))
            .await;
    }
    let mut b_waiting = Vec::new();
    for i in 1..=2u8 {
        b_waiting.push(
            connect_from(&format!("127.0.22.{i}"), b.listen)
                .await
                .unwrap(),
        );
        b.wait_gauge("mxgate_connections_queued", f64::from(i))
            .await;
    }
    // Each session a ends goes to b's waiters, until a is down to its share. Which of b's
    // waiters gets it is not asserted: while one's ask is on its way to Redis, the next may
    // ask too (a freed slot lets it at once), and either may land first.
    let mut on_b = Vec::new();
    for ended in 1..=2i64 {
        drop(on_a.pop());
        let (got, s) = greeted(&mut b_waiting).await;
        assert_eq!(got, GREETING, "session {ended} of a ended");
        assert_eq!(redis.field("share", "g", "b"), ended);
        on_b.push(s);
    }
    assert!(b_waiting.is_empty());
    b.wait_gauge("mxgate_connections_queued", 0.0).await;
    for s in &mut a_waiting {
        assert!(still_waiting(s, Duration::from_millis(50)).await);
    }
    // At its share, a gets its next freed slot back for one of its own waiters.
    drop(on_a.pop());
    let (got, _served) = greeted(&mut a_waiting).await;
    assert_eq!(got, GREETING);
    assert_eq!(redis.field("share", "g", "a"), 2);
    assert_eq!(redis.field("share", "g", "b"), 2);
    assert!(still_waiting(&mut a_waiting[0], Duration::from_millis(50)).await);
    drop((on_a, on_b, a_waiting, b_waiting));
}
