//! The server: binding, accept loops, reload and shutdown.
//!
//! [`start`] binds everything (or adopts inherited listeners) and returns a [`Running`] handle;
//! tests use it to run the real server in-process on port 0. The accept loops only accept and
//! spawn: admission and everything after happen in the connection's task ([`crate::session`]).
//!
//! A reload swaps the policy, replies, backend and timeouts for new connections at once.
//! Sessions already forwarding are never cut and keep their slots. Settings that would need new
//! sockets or a new forwarder (listen, metrics, forwarding, pipe_size, log_format) are kept as
//! they are, with a warning naming each.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::metrics::Counter;
use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admission::Admission;
use crate::backends::Pool;
use crate::config::{Config, Forwarding};
use crate::forward::{self, Mode, Traffic};
use crate::listener::{self, AcceptErrors};
use crate::metrics::{self, Metrics};
use crate::policy::{Policy, PolicyClock, EVICT_INTERVAL};
use crate::reply::{Closer, Replies};
use crate::session::{Gate, Live};

/// How often an idle accept loop wakes to show it is alive; the watchdog needs a period of at
/// least four times this.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);

/// A running mxgate instance.
pub struct Running {
    listen_addrs: Vec<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    gate: Arc<Gate>,
    /// Cancelled to stop the accept loops and helpers.
    stop: CancellationToken,
    /// Connection tasks, so shutdown can wait for them.
    sessions: TaskTracker,
    /// Accept loops and helpers.
    background: TaskTracker,
    reloads_ok: Counter,
    reloads_failed: Counter,
    /// One counter per accept loop, bumped on each turn, for the watchdog.
    heartbeats: Vec<Arc<AtomicU64>>,
}

/// Binds every listener and the metrics endpoint, then starts serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    if config.transparent {
        for b in &config.backends {
            crate::backend::transparent_preflight(b.address.addr)?;
        }
    }
    let listeners = config
        .listen
        .iter()
        .map(|&a| listener::bind(a).with_context(|| format!("cannot listen on {a}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    start_with(listeners, config).await
}

/// Starts serving on listeners the caller already holds (socket activation, tests).
pub async fn start_with(
    listeners: Vec<std::net::TcpListener>,
    config: Config,
) -> anyhow::Result<Running> {
    ignore_sigpipe();
    if config.transparent {
        for b in &config.backends {
            crate::backend::transparent_preflight(b.address.addr)?;
        }
    }
    let metrics = Metrics::new();
    let metrics_listener = match config.metrics {
        Some(a) => Some(
            metrics::bind(a)
                .await
                .with_context(|| format!("cannot serve metrics on {a}"))?,
        ),
        None => None,
    };
    let mut tokio_listeners = Vec::with_capacity(listeners.len());
    for l in listeners {
        l.set_nonblocking(true)?;
        tokio_listeners.push(TcpListener::from_std(l)?);
    }
    let listen_addrs = tokio_listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<std::io::Result<Vec<_>>>()?;
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };

    let traffic = Traffic {
        client_to_backend: metrics.bytes_client_to_backend.clone(),
        backend_to_client: metrics.bytes_backend_to_client.clone(),
        spliced: metrics.counter("mxgate_spliced_bytes_total", &[]),
        splice_fallbacks: metrics.counter("mxgate_splice_fallbacks_total", &[]),
    };
    let live = live(config, None, PolicyClock::default(), &metrics);
    set_limit_gauges(&metrics, &live.config);
    let gate = Arc::new(Gate {
        mode: forwarding_mode(&live.config, &metrics),
        live: ArcSwap::from_pointee(live),
        admission: Admission::new(metrics.clone()),
        closer: Closer::default(),
        summary: Arc::default(),
        metrics: metrics.clone(),
        traffic,
        draining: AtomicBool::new(false),
        cut: CancellationToken::new(),
    });
    let running = Running {
        reloads_ok: metrics.counter("mxgate_config_reloads_total", &[("result", "success")]),
        reloads_failed: metrics.counter("mxgate_config_reloads_total", &[("result", "failure")]),
        listen_addrs: listen_addrs.clone(),
        metrics_addr,
        gate: gate.clone(),
        stop: CancellationToken::new(),
        sessions: TaskTracker::new(),
        background: TaskTracker::new(),
        heartbeats: listen_addrs.iter().map(|_| Arc::default()).collect(),
    };
    if let Some(l) = metrics_listener {
        running
            .background
            .spawn(metrics::serve(l, metrics, running.stop.clone()));
    }
    running.spawn_housekeeping();
    running.spawn_health_checks();
    for ((l, addr), heartbeat) in tokio_listeners
        .into_iter()
        .zip(listen_addrs)
        .zip(running.heartbeats.clone())
    {
        let backends: Vec<String> = gate
            .live
            .load()
            .config
            .backends
            .iter()
            .map(|b| b.to_string())
            .collect();
        tracing::info!(listen = %addr, backends = ?backends, "accepting");
        running.background.spawn(accept_loop(
            l,
            addr,
            gate.clone(),
            running.sessions.clone(),
            running.stop.clone(),
            heartbeat,
        ));
    }
    Ok(running)
}

impl Running {
    /// The addresses the listeners are bound to, in config order.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen_addrs
    }

    /// Where `/metrics` is served, if it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The admission controller, for its counts.
    pub fn admission(&self) -> &Admission {
        &self.gate.admission
    }

    /// The source key `ip` is counted under by the policy in force.
    pub fn source_key(&self, ip: std::net::IpAddr) -> ipnet::IpNet {
        self.gate
            .live
            .load()
            .policy
            .classify(ip)
            .rule
            .source_key(ip)
    }

    /// The metrics, as `/metrics` would render them.
    pub fn render_metrics(&self) -> String {
        self.gate.metrics.render()
    }

    /// The rate limiters' clock, which tests advance instead of sleeping.
    pub fn policy_clock(&self) -> PolicyClock {
        self.gate.live.load().policy.clock().clone()
    }

    /// One counter per accept loop, bumped on each turn; a wedged loop's stands still.
    pub fn heartbeats(&self) -> Vec<Arc<AtomicU64>> {
        self.heartbeats.clone()
    }

    /// Applies a reloaded config, or counts and logs why it could not be loaded. A failed
    /// reload leaves the old config in force. Returns whether the new config was applied.
    pub fn reload(&self, loaded: anyhow::Result<Config>) -> bool {
        let new = match loaded {
            Ok(c) => c,
            Err(e) => {
                self.reloads_failed.increment(1);
                tracing::error!(error = %format!("{e:#}"), "reload failed; the old config stays in force");
                return false;
            }
        };
        let old = self.gate.live.load_full();
        for key in kept_on_reload(&old.config, &new) {
            tracing::warn!(
                key,
                "reload cannot change this setting; restart mxgate to apply it"
            );
        }
        let live = live(
            new,
            Some(&old),
            old.policy.clock().clone(),
            &self.gate.metrics,
        );
        set_limit_gauges(&self.gate.metrics, &live.config);
        self.gate.live.store(Arc::new(live));
        self.reloads_ok.increment(1);
        tracing::info!("config reloaded");
        true
    }

    /// Stops admitting: from now on new connections get the draining reply. Sessions already
    /// forwarding go on.
    pub fn begin_drain(&self) {
        self.gate.draining.store(true, Ordering::Release);
    }

    /// Stops accepting, lets forwarding sessions finish for up to `drain`, cuts the rest, and
    /// waits until every connection task has ended.
    pub async fn shutdown(self, drain: Duration) {
        self.begin_drain();
        if tokio::time::timeout(drain, self.wait_sessions())
            .await
            .is_err()
        {
            tracing::info!(
                remaining = self.gate.admission.active(),
                "drain time over; closing sessions"
            );
            self.gate.cut.cancel();
        }
        self.stop.cancel();
        self.background.close();
        self.sessions.close();
        self.background.wait().await;
        self.sessions.wait().await;
        self.gate.summary.flush();
    }

    /// Resolves once no admitted session is open.
    async fn wait_sessions(&self) {
        while self.gate.admission.active() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Health-checks the backends of the config in force, at its interval, when it asks for it.
    fn spawn_health_checks(&self) {
        let (gate, stop) = (self.gate.clone(), self.stop.clone());
        self.background.spawn(async move {
            loop {
                let interval = gate.live.load().config.health_interval;
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(interval) => {}
                }
                let live = gate.live.load_full();
                let c = &live.config;
                if c.health_checks {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = live.pool.check_all(c.connect_timeout, c.fall, c.rise) => {}
                    }
                }
            }
        });
    }

    fn spawn_housekeeping(&self) {
        let (gate, stop) = (self.gate.clone(), self.stop.clone());
        self.background.spawn(async move {
            let mut summary = tokio::time::interval(crate::reply::SUMMARY_INTERVAL);
            let mut evict = tokio::time::interval(EVICT_INTERVAL);
            summary.tick().await;
            evict.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = summary.tick() => gate.summary.flush(),
                    _ = evict.tick() => {
                        for limit in gate.live.load().policy.rate_limits() {
                            limit.evict();
                        }
                    }
                }
            }
        });
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
        self.gate.cut.cancel();
    }
}

fn live(config: Config, previous: Option<&Live>, clock: PolicyClock, metrics: &Metrics) -> Live {
    Live {
        policy: Policy::new(&config, previous.map(|p| &p.policy), clock),
        replies: Replies::new(&config.hostname, &config.replies),
        pool: Pool::new(&config, previous.map(|p| &p.pool), metrics),
        config,
    }
}

fn set_limit_gauges(metrics: &Metrics, config: &Config) {
    metrics
        .limit_max_connections
        .set(config.max_connections as f64);
    metrics
        .limit_max_per_source
        .set(config.max_per_source as f64);
}

/// The keys whose change a reload cannot apply.
fn kept_on_reload(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    if old.listen != new.listen {
        kept.push("listen");
    }
    if old.metrics != new.metrics {
        kept.push("metrics");
    }
    if old.forwarding != new.forwarding {
        kept.push("forwarding");
    }
    if old.pipe_size != new.pipe_size {
        kept.push("pipe_size");
    }
    if old.log_format != new.log_format {
        kept.push("log_format");
    }
    if (old.transparent, old.transparent_port) != (new.transparent, new.transparent_port) {
        kept.push("transparent");
    }
    kept
}

/// Accepts until `stop`, handing each connection to its own task.
async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    gate: Arc<Gate>,
    sessions: TaskTracker,
    stop: CancellationToken,
    heartbeat: Arc<AtomicU64>,
) {
    let mut errors = AcceptErrors::default();
    // Wake now and then even when idle, so the heartbeat shows the loop is alive.
    let mut alive = tokio::time::interval(HEARTBEAT_INTERVAL);
    alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Registered once: a fresh cancellation wait per accept would take a lock each time.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        heartbeat.fetch_add(1, Ordering::Relaxed);
        let accepted = tokio::select! {
            biased;
            () = &mut stopped => return,
            r = listener.accept() => r,
            _ = alive.tick() => continue,
        };
        match accepted {
            Ok((stream, peer)) => {
                errors.success();
                gate.metrics.accepted.increment(1);
                let span = tracing::info_span!("conn", src = %peer.ip().to_canonical(), port = peer.port());
                sessions.spawn(gate.clone().handle(stream, peer).instrument(span));
            }
            Err(e) => {
                let pause = errors.failure(addr, &e);
                tokio::select! {
                    () = &mut stopped => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

fn forwarding_mode(config: &Config, metrics: &Metrics) -> Mode {
    match config.forwarding {
        Forwarding::Copy => Mode::Copy,
        #[cfg(target_os = "linux")]
        Forwarding::Auto | Forwarding::Splice => Mode::Splice(forward::splice::PipePool::new(
            config.pipe_size,
            metrics.counter("mxgate_splice_pool_exhausted_total", &[]),
            metrics.gauge("mxgate_splice_pipes", &[]),
        )),
        #[cfg(not(target_os = "linux"))]
        Forwarding::Auto | Forwarding::Splice => {
            let _ = metrics;
            Mode::Copy
        }
    }
}

/// A write to a peer that has gone must be an error on that session, never a signal that
/// kills the process. (Rust binaries already ignore SIGPIPE; a library must not assume it.)
fn ignore_sigpipe() {
    // SAFETY: installing SIG_IGN for SIGPIPE has no preconditions and touches no memory.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}
