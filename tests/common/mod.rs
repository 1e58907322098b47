//! Shared helpers for the integration tests: real sockets only.
//!
//! - Backends are real TCP servers in the test process, or Postfix's `smtp-sink`.
//! - Clients bind a chosen source in 127.0.0.0/8 before connecting, to appear as distinct sources.
//! - Waiting is on a condition with a deadline, never on a fixed sleep.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mxgate::config::{Config, Forwarding};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;

pub const HOST: &str = "mx.test";
pub const GREETING: &[u8] = b"220 backend.test ESMTP ready\r\n";

/// The exact reply lines for `HOST`.
pub const GLOBAL_LINE: &[u8] = b"421 4.3.2 mx.test Too many connections, try again later\r\n";
pub const SOURCE_LINE: &[u8] =
    b"421 4.7.0 mx.test Too many connections from your address, try again later\r\n";
pub const BACKEND_LINE: &[u8] = b"421 4.3.2 mx.test Service not available, try again later\r\n";

/// A config for tests: loopback port 0 for clients and metrics.
/// The tests' config: loopback, port 0, and no pregreet test (on by default as `ignore`), so
/// that a test not about it sees the backend's own greeting at once. Pregreet's tests set it.
pub fn config(backend: SocketAddr) -> Config {
    let mut c = Config::for_backend(backend);
    c.pregreet.action = mxgate::config::Pregreet::Off;
    c
}

pub fn config_mode(backend: SocketAddr, mode: Forwarding) -> Config {
    let mut c = config(backend);
    c.forwarding = mode;
    c
}

/// Starts mxgate in-process.
pub async fn start(config: Config) -> mxgate::Running {
    mxgate::start(config).await.expect("mxgate starts")
}

/// A backend that greets every connection with [`GREETING`], then echoes whatever it reads
/// until the client closes. It counts the connections it accepted.
pub struct GreetingBackend {
    pub addr: SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl GreetingBackend {
    pub async fn start() -> GreetingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    if s.write_all(GREETING).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        GreetingBackend {
            addr,
            accepted,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for GreetingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects to `to` from `source` (any port).
pub async fn connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let ip: IpAddr = source.parse().unwrap();
    let socket = if ip.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(to).await
}

/// Reads one line up to and including LF, within 5 s.
pub async fn read_line(s: &mut TcpStream) -> Vec<u8> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    let read = async {
        while !line.ends_with(b"\n") {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(_) => line.push(b[0]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("a line within 5 s");
    line
}

/// Reads until EOF within 5 s, and returns what came.
pub async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("EOF within 5 s")
        .expect("a clean close, not a reset");
    out
}

/// Connects from `source` and expects exactly `line`, then a clean EOF.
pub async fn expect_refusal(source: &str, to: SocketAddr, line: &[u8]) {
    let mut s = connect_from(source, to).await.unwrap();
    let got = read_to_end(&mut s).await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(line),
        "refusal for {source}"
    );
}

/// Connects from `source` and expects the backend's greeting; returns the open stream.
pub async fn expect_admitted(source: &str, to: SocketAddr) -> TcpStream {
    let mut s = connect_from(source, to).await.unwrap();
    let got = read_line(&mut s).await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(GREETING),
        "greeting for {source}"
    );
    s
}

/// Polls `cond` until it holds, failing after 10 s. For state that settles asynchronously,
/// such as a slot freed by a task after its client closed.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Fetches `/metrics` over HTTP and returns every sample, keyed by its full series text.
pub async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let body = read_to_end(&mut s).await;
    let text = String::from_utf8(body).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

/// One sample; panics if the series is missing.
pub fn metric(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("series {series} missing"))
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A 64-bit FNV-1a digest, enough to tell two 16 MiB streams apart.
pub fn digest(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Whether this run is CI's (`CI=true`), where a test that cannot run fails instead of
/// skipping. The one test of it.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Whether an outside program is on PATH. Locally a missing tool skips with a printed reason;
/// in CI (`CI=true`) it fails the test, so nothing is silently skipped there.
pub fn require_tool(name: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if in_ci() {
            panic!("{name} is required in CI but is not installed");
        }
        eprintln!("SKIP: {name} is not installed");
    }
    found
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A free loopback TCP port, for outside programs that cannot take port 0.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Postfix's `smtp-sink`, listening on loopback, killed on drop.
pub struct SmtpSink {
    pub addr: SocketAddr,
    child: Child,
}

impl SmtpSink {
    /// Starts `smtp-sink` with extra flags; `None` when it is not installed (outside CI).
    pub async fn start(flags: &[&str]) -> Option<SmtpSink> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Self::start_on(addr, flags).await
    }

    /// Starts `smtp-sink` on a given address, for a backend that comes back where it was.
    pub async fn start_on(addr: SocketAddr, flags: &[&str]) -> Option<SmtpSink> {
        if !require_tool("smtp-sink") {
            return None;
        }
        let mut cmd = Command::new("smtp-sink");
        if is_root() {
            cmd.args(["-u", "nobody"]);
        }
        cmd.args(flags)
            .arg(addr.to_string())
            .arg("256")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("smtp-sink starts");
        let sink = SmtpSink { addr, child };
        sink.wait_ready().await;
        Some(sink)
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = TcpStream::connect(self.addr).await {
                let line = read_line(&mut s).await;
                if line.starts_with(b"220") {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "smtp-sink did not come up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Both forwarding modes, for tests that must hold in each.
pub fn modes() -> Vec<Forwarding> {
    let m = vec![Forwarding::Copy, Forwarding::Splice];
    assert!(!m.is_empty());
    m
}

/// Sends `sig` to the test's own child `pid`, with rustix's safe `kill`.
pub fn send_signal(pid: u32, sig: rustix::process::Signal) -> rustix::io::Result<()> {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a child's pid is positive");
    rustix::process::kill_process(pid, sig)
}

/// A child process that is killed when the test ends, even by a panic.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Closes with SO_LINGER 0, which sends RST.
pub fn reset(s: TcpStream) {
    let s = s.into_std().unwrap();
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

/// A process's resident memory, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A process's open file descriptors.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A config whose one backend learns its limit (`max_connections=auto`), with global and
/// per-source limits far above it, so the learned limit is the one that binds; clients over it
/// wait up to `queue_timeout`, at most `max_queued` of them.
pub fn auto_config(backend: SocketAddr, max_queued: usize, queue_timeout: Duration) -> Config {
    let mut c = config(backend);
    let spec: mxgate::config::BackendSpec =
        format!("{backend},max_connections=auto").parse().unwrap();
    c.backends = vec![spec];
    c.max_connections = 1000;
    c.max_per_source = 1000;
    c.max_per_ipv6_network = 1000;
    c.max_queued = max_queued;
    c.queue_timeout = queue_timeout;
    c
}

/// How a test starts the real binary's `run`, in front of `backend` on `listen`. As built by
/// [`Spawn::new`]: the test host name, metrics off, no pregreet test, `RUST_LOG=warn`, stdout
/// discarded and stderr the test's own; each option changes one of these, and [`Spawn::args`]
/// appends flags. [`Spawn::command`] gives the `Command`, for a test to redirect or extend.
pub struct Spawn {
    backend: String,
    listen: SocketAddr,
    metrics: String,
    hostname: bool,
    pregreet_off: bool,
    log: Option<&'static str>,
    args: Vec<String>,
}

impl Spawn {
    /// `backend` is a backend spec: an address, or one with options such as
    /// `max_connections=auto`.
    pub fn new(backend: impl ToString, listen: SocketAddr) -> Spawn {
        Spawn {
            backend: backend.to_string(),
            listen,
            metrics: "off".into(),
            hostname: true,
            pregreet_off: true,
            log: Some("warn"),
            args: Vec::new(),
        }
    }

    /// Serves metrics on `at` (an address, or `off`).
    pub fn metrics(mut self, at: impl ToString) -> Spawn {
        self.metrics = at.to_string();
        self
    }

    /// Leaves the host name to its default (the machine's).
    pub fn default_hostname(mut self) -> Spawn {
        self.hostname = false;
        self
    }

    /// Leaves the pregreet test to its default.
    pub fn default_pregreet(mut self) -> Spawn {
        self.pregreet_off = false;
        self
    }

    /// `RUST_LOG` set to `level`, or, with `None`, removed, so the default level applies.
    pub fn log(mut self, level: Option<&'static str>) -> Spawn {
        self.log = level;
        self
    }

    /// Flags appended after the ones above.
    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Spawn {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mxgate"));
        c.arg("run");
        if self.hostname {
            c.args(["--hostname", HOST]);
        }
        c.args(["--metrics", &self.metrics]);
        if self.pregreet_off {
            c.args(["--pregreet", "off"]);
        }
        c.args(["--backend", &self.backend])
            .args(["--listen", &self.listen.to_string()])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        match self.log {
            Some(level) => c.env("RUST_LOG", level),
            None => c.env_remove("RUST_LOG"),
        };
        c
    }
}

/// The real binary's `run` as [`Spawn::new`] has it, in front of `backend` on `listen`; `extra`
/// flags are appended.
pub fn mxgate_command(backend: SocketAddr, listen: SocketAddr, extra: &[&str]) -> Command {
    Spawn::new(backend, listen).args(extra).command()
}

/// Sends `payload` and reads everything the other side sends, concurrently. When
/// `fin_after_eof` is set, this side's FIN waits until the other side's FIN has arrived, so
/// the two directions close in a chosen order. Returns what was received.
pub async fn exchange(stream: TcpStream, payload: Vec<u8>, fin_after_eof: bool) -> Vec<u8> {
    let payload_len = payload.len();
    let (mut r, mut w) = stream.into_split();
    let (eof_tx, eof_rx) = tokio::sync::oneshot::channel();
    let reader = async move {
        let mut got = Vec::with_capacity(payload_len);
        r.read_to_end(&mut got).await.expect("no reset");
        let _ = eof_tx.send(());
        got
    };
    let writer = async move {
        w.write_all(&payload).await.expect("write");
        if fin_after_eof {
            let _ = eof_rx.await;
        }
        w.shutdown().await.expect("shutdown");
    };
    let (got, ()) = tokio::join!(reader, writer);
    got
}

/// One session through a fresh mxgate forwarding in `mode`: `len` random bytes each way at
/// once, the client's FIN after the backend's unless `client_closes_first`. Asserts every byte
/// arrived in order, the session ended and `mxgate_bytes_total` counted exactly `len` each way;
/// returns the metrics for what the caller checks next.
pub async fn bulk_session(
    mode: Forwarding,
    len: usize,
    client_closes_first: bool,
) -> HashMap<String, f64> {
    let label = format!("{mode:?}");
    let up = random_bytes(len, 1);
    let down = random_bytes(len, 2);
    let down_copy = down.clone();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = config_mode(l.local_addr().unwrap(), mode);
    let backend = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        exchange(s, down_copy, client_closes_first).await
    });
    let mx = start(config).await;
    let client = connect_from("127.0.0.2", mx.listen_addrs()[0])
        .await
        .unwrap();
    let got_down = exchange(client, up.clone(), !client_closes_first).await;
    let got_up = backend.await.unwrap();
    assert_eq!(got_up.len(), len, "{label}: client→backend length");
    assert_eq!(got_down.len(), len, "{label}: backend→client length");
    assert_eq!(
        digest(&got_up),
        digest(&up),
        "{label}: client→backend bytes"
    );
    assert_eq!(
        digest(&got_down),
        digest(&down),
        "{label}: backend→client bytes"
    );

    eventually("session ended", || mx.admission().active() == 0).await;
    let m = scrape(mx.metrics_addr().unwrap()).await;
    for direction in ["client_to_backend", "backend_to_client"] {
        assert_eq!(
            metric(
                &m,
                &format!("mxgate_bytes_total{{direction=\"{direction}\"}}")
            ),
            len as f64,
            "{label}: {direction}"
        );
    }
    m
}
