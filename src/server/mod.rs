//! The server: binding, worker threads, accept loops, reload and shutdown.
//!
//! [`start`] binds everything (or adopts inherited listeners), starts the worker threads and
//! returns a [`Running`] handle; tests use it to run the real server in-process on port 0.
//! Every worker runs an accept loop on every listener (`accept`). An accept loop decides
//! admission with the shared state in [`crate::gate`] (no I/O, unless a PROXY header must be read
//! first), sends refusals to [`crate::reply`], and gives every other connection its own task
//! ([`crate::session`]).
//!
//! The background tasks (`background`): health checks, housekeeping, and the queue's
//! dispatcher ([`crate::gate::Gate::dispatch`], which hands freed slots to clients waiting in
//! [`crate::queue`]), spawned here and run by the gate.
//!
//! A reload (`reload`) swaps the policy, replies, backend and timeouts for new connections at
//! once. Sessions already forwarding are never cut and keep their slots. Settings that would
//! need new sockets, threads, a new forwarder or a new security check
//! ([`RESTART_ONLY`](crate::config::RESTART_ONLY)) keep their old values in force, with a
//! warning naming each.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::metrics::Counter;
use anyhow::Context;
use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::config::{Config, Forwarding};
use crate::forward::{self, Mode, Traffic};
use crate::listener;
use crate::metrics::Metrics;
use crate::policy::PolicyClock;
use crate::queue::Queue;
use crate::reply::{Closer, Tally};
use crate::wake::Wake;
mod accept;
mod background;
mod reload;

use accept::{worker_count, AcceptLoop, Workers};

use crate::gate::{self, Gate, Live};
use reload::set_limit_gauges;

/// A running mxgate instance.
pub struct Running {
    listen_addrs: Vec<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    gate: Arc<Gate>,
    /// Cancelled to stop the accept loops and helpers.
    stop: CancellationToken,
    /// Cancelled to stop the accept loops alone (a child of `stop`), for a drain that leaves
    /// newcomers in the listening sockets' backlog.
    accepting: CancellationToken,
    /// The accept loops, so a drain can wait until none accepts any more.
    accept_loops: TaskTracker,
    /// Connection tasks, so shutdown can wait for them.
    sessions: TaskTracker,
    /// Accept loops and helpers.
    background: TaskTracker,
    reloads_ok: Counter,
    reloads_failed: Counter,
    /// One counter per accept loop, bumped on each turn, for the watchdog.
    heartbeats: Vec<Arc<AtomicU64>>,
    /// The threads that accept and run sessions.
    workers: Workers,
    /// Keeps the learned backend limits in `state_dir`, when one is set.
    keeper: Option<Arc<crate::backend::state::LimitKeeper>>,
}

/// What `mxgate check` does beyond validation: builds the runtime state exactly as start-up
/// and reload do, and returns the warnings start-up would log.
pub fn check(config: Config) -> Vec<String> {
    let mut warnings = crate::config::warnings(&config, &config.listen);
    warnings.extend(
        crate::descriptors::fit(&config, worker_count(&config), false).map(|s| s.to_string()),
    );
    drop(Live::build(
        config,
        None,
        PolicyClock::default(),
        &Metrics::new(),
        &Arc::default(),
    ));
    warnings
}

/// Binds every listener and the metrics endpoint, then starts serving.
pub async fn start(mut config: Config) -> anyhow::Result<Running> {
    preflight(&mut config)?;
    let listeners = config
        .listen
        .iter()
        .map(|&a| listener::bind(a).with_context(|| format!("cannot listen on {a}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    serve(listeners, config).await
}

/// Starts serving on listeners the caller already holds (socket activation, tests).
pub async fn start_with(
    listeners: Vec<std::net::TcpListener>,
    mut config: Config,
) -> anyhow::Result<Running> {
    preflight(&mut config)?;
    serve(listeners, config).await
}

/// What must hold before anything is served: descriptors for what the config can hold open
/// (the soft limit raised when short; when it stays short, a warning and admission and the
/// queue held to what fits), transparent mode's capability (checked once per backend family)
/// and routing.
fn preflight(config: &mut Config) -> anyhow::Result<()> {
    if let Some(shortfall) = crate::descriptors::fit(config, worker_count(config), true) {
        tracing::warn!("{shortfall}");
        shortfall.apply(config);
    }
    if !config.transparent {
        return Ok(());
    }
    let mut families = Vec::new();
    for b in &config.backends {
        let v4 = b.address.addr.is_ipv4();
        if !families.contains(&v4) {
            families.push(v4);
            crate::backend::transparent_preflight(b.address.addr)?;
        }
    }
    Ok(())
}

/// Everything [`start`] and [`start_with`] share, once the listeners are held.
async fn serve(listeners: Vec<std::net::TcpListener>, config: Config) -> anyhow::Result<Running> {
    ignore_sigpipe();
    let metrics = Metrics::new();
    let metrics_listener = match config.metrics {
        Some(a) => Some(
            crate::status::http::bind(a)
                .await
                .with_context(|| format!("cannot serve metrics on {a}"))?,
        ),
        None => None,
    };
    let listen_addrs = prepare_listeners(&listeners)?;
    for warning in crate::config::warnings(&config, &listen_addrs) {
        tracing::warn!("{warning}");
    }
    let workers = Workers::start(worker_count(&config)).context("cannot start worker threads")?;
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let gate = build_gate(config, &metrics);
    let keeper = resume_learned(&gate);
    let stop = CancellationToken::new();
    let running = Running {
        reloads_ok: metrics.reloads_ok.clone(),
        reloads_failed: metrics.reloads_failed.clone(),
        listen_addrs: listen_addrs.clone(),
        metrics_addr,
        gate: gate.clone(),
        accepting: stop.child_token(),
        stop,
        accept_loops: TaskTracker::new(),
        sessions: TaskTracker::new(),
        background: TaskTracker::new(),
        heartbeats: Vec::new(),
        workers,
        keeper,
    };
    if let Some(l) = metrics_listener {
        running.background.spawn(crate::status::accept::serve(
            l,
            gate.clone(),
            running.stop.clone(),
        ));
    }
    running.spawn_housekeeping();
    running.spawn_health_checks();
    running.spawn_queue_dispatcher();
    running.spawn_state_keeper();
    let mut running = running;
    running.accept_on(listeners, listen_addrs).await?;
    Ok(running)
}

/// Resumes the learned backend limits an earlier run kept in `state_dir`, with one warning
/// for each thing ignored or clamped, and returns what keeps them from now on; `None` without
/// a `state_dir`. Saving once here tells at start whether the directory can be written.
fn resume_learned(gate: &Gate) -> Option<Arc<crate::backend::state::LimitKeeper>> {
    use crate::backend::state;
    let live = gate.live.load();
    let config = &live.config;
    let dir = config.state_dir.clone()?;
    let backends = live.pool.learned_backends();
    let learning = state::Learning {
        backends: &backends,
        min: config.adaptive_min,
        max: config.max_connections,
    };
    let found = state::load(&dir, &learning, std::time::SystemTime::now());
    for warning in &found.warnings {
        tracing::warn!("{warning}");
    }
    live.pool
        .resume(&found.limits, config.adaptive_min, config.max_connections);
    let keeper = Arc::new(state::LimitKeeper::new(dir));
    if !backends.is_empty() {
        keeper.keep(live.pool.learned_limits());
    }
    Some(keeper)
}

/// Readies the listening sockets for the workers' event loops, and returns their addresses.
fn prepare_listeners(listeners: &[std::net::TcpListener]) -> std::io::Result<Vec<SocketAddr>> {
    for l in listeners {
        l.set_nonblocking(true)?;
        // Replies and commands are small writes that must go out at once. Set here, on the
        // listening socket, Linux gives it to every accepted connection: no call per session.
        socket2::SockRef::from(l).set_tcp_nodelay(true)?;
    }
    listeners
        .iter()
        .map(std::net::TcpListener::local_addr)
        .collect()
}

/// The state every accept loop and connection task shares, built for `config`; joins the
/// cluster when one is configured.
fn build_gate(config: Config, metrics: &Arc<Metrics>) -> Arc<Gate> {
    let traffic = Traffic {
        client_to_backend: metrics.bytes_client_to_backend.clone(),
        backend_to_client: metrics.bytes_backend_to_client.clone(),
        spliced: metrics.spliced_bytes.clone(),
        splice_fallbacks: metrics.splice_fallbacks.clone(),
    };
    let wake = Arc::new(Wake::default());
    let cluster = config
        .cluster
        .clone()
        .map(|c| crate::cluster::Cluster::start(c, metrics, wake.clone()));
    let live = Live::build(config, None, PolicyClock::default(), metrics, &wake);
    set_limit_gauges(metrics, &live.config);
    let pregreet =
        crate::pregreet::Screen::new(metrics, cluster.clone(), live.config.state_dir.as_deref());
    let (summary, sources) = (Arc::default(), Arc::default());
    let tally = Tally::new(metrics.clone(), Arc::clone(&summary), Arc::clone(&sources));
    Arc::new(Gate {
        pregreet: Arc::new(pregreet),
        mode: forwarding_mode(&live.config, metrics),
        live: ArcSwap::from_pointee(live),
        admission: Admission::with_wake(metrics.clone(), wake.clone()),
        queue: Queue::new(
            wake.clone(),
            metrics.queued.clone(),
            metrics.queue_wait_seconds.clone(),
        ),
        wake,
        closer: Closer::new(tally),
        summary,
        sources,
        reloads: crate::gate::Reloads::default(),
        metrics: metrics.clone(),
        traffic,
        draining: AtomicBool::new(false),
        cut: CancellationToken::new(),
        headers: Arc::new(tokio::sync::Semaphore::new(gate::MAX_PENDING_HEADERS)),
        cluster,
        local: Default::default(),
    })
}

impl Running {
    /// Starts an accept loop on every worker for every listener, and returns once all of them
    /// are in place, so a failure is the caller's to see.
    async fn accept_on(
        &mut self,
        listeners: Vec<std::net::TcpListener>,
        listen_addrs: Vec<SocketAddr>,
    ) -> anyhow::Result<()> {
        let gate = self.gate.clone();
        let mut readies = Vec::new();
        for (l, addr) in listeners.into_iter().zip(listen_addrs) {
            let backends: Vec<String> = gate
                .live
                .load()
                .config
                .backends
                .iter()
                .map(|b| b.to_string())
                .collect();
            tracing::info!(listen = %addr, backends = ?backends, workers = self.workers.handles.len(), "accepting");
            // Every worker accepts on the same socket: whichever is free takes the next client.
            for worker in self.workers.handles.clone() {
                let l = l
                    .try_clone()
                    .context("cannot share a listener between workers")?;
                let heartbeat = Arc::new(AtomicU64::new(0));
                self.heartbeats.push(heartbeat.clone());
                let (gate, sessions, stop) =
                    (gate.clone(), self.sessions.clone(), self.accepting.clone());
                let (set_up, ready) = tokio::sync::oneshot::channel();
                let task = self.accept_loops.track_future(async move {
                    // Set up on the worker itself: its sockets belong to the worker's event loop.
                    match AcceptLoop::new(l, addr, &gate) {
                        Ok(accept) => {
                            let _ = set_up.send(Ok(()));
                            accept.run(gate, sessions, stop, heartbeat).await;
                        }
                        Err(e) => {
                            let _ = set_up.send(Err(e));
                        }
                    }
                });
                worker.spawn(task);
                readies.push((addr, ready));
            }
        }
        for (addr, ready) in readies {
            match ready.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e).with_context(|| format!("cannot accept on {addr}")),
                Err(_) => anyhow::bail!("the worker for {addr} ended before accepting"),
            }
        }
        Ok(())
    }
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

    /// Refused connections lingering right now (answered, waiting for the client's FIN).
    pub fn lingering(&self) -> usize {
        crate::reply::MAX_LINGERING - self.gate.closer.bound().available_permits()
    }

    /// Denied clients in their 554 dialogue right now.
    pub fn denying(&self) -> usize {
        self.gate.closer.denying()
    }

    /// The config in force (a reload keeps the restart-only keys as they were).
    pub fn config(&self) -> Config {
        self.gate.live.load().config.clone()
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

    /// The live view, as `/status` would serve it.
    pub fn snapshot(&self) -> crate::status::Snapshot {
        crate::status::Snapshot::take(&self.gate)
    }

    /// The load at a glance, for systemd's `STATUS=`.
    pub fn status_line(&self) -> String {
        crate::status::Line::take(&self.gate).to_string()
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

    /// Stops admitting: from now on new connections get the draining reply, and so does every
    /// client waiting in the queue. Sessions already forwarding go on.
    pub fn begin_drain(&self) {
        self.gate.draining.store(true, Ordering::Release);
        self.gate.queue.close();
    }

    /// Stops accepting: every accept loop ends and closes its copy of the listening sockets,
    /// and connections not yet accepted stay in the kernel's backlog. Under socket activation
    /// the sockets are systemd's, which keeps them open for the next instance, so a newcomer
    /// during a restart or an upgrade waits there instead of getting the draining reply.
    /// Returns once no accept loop is left.
    pub async fn stop_accepting(&self) {
        self.accepting.cancel();
        self.accept_loops.close();
        self.accept_loops.wait().await;
    }

    /// Clients waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.gate.queue.len()
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
        }
        // Whatever is left (sessions past the drain time, connections still waiting for a
        // PROXY header) ends now.
        self.gate.cut.cancel();
        self.stop.cancel();
        self.accept_loops.close();
        self.background.close();
        self.sessions.close();
        self.accept_loops.wait().await;
        self.background.wait().await;
        self.sessions.wait().await;
        // Every session has ended: the cluster gets this instance's slots back at once.
        if let Some(cluster) = &self.gate.cluster {
            cluster.leave().await;
        }
        self.gate.summary.flush();
        self.gate.sources.flush();
        self.gate.pregreet.flush_ignored();
        if let Some(keeper) = &self.keeper {
            keeper.keep(self.gate.live.load().pool.learned_limits());
        }
        self.gate.pregreet.save();
    }

    /// Resolves once no admitted session is open.
    async fn wait_sessions(&self) {
        while self.gate.admission.active() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
        self.gate.cut.cancel();
        if let Some(cluster) = &self.gate.cluster {
            cluster.abandon();
        }
    }
}

fn forwarding_mode(config: &Config, metrics: &Metrics) -> Mode {
    match config.forwarding {
        Forwarding::Copy => Mode::Copy,
        #[cfg(target_os = "linux")]
        Forwarding::Auto | Forwarding::Splice => Mode::Splice(forward::splice::PipePool::new(
            config.pipe_size,
            metrics.splice_pool_exhausted.clone(),
            metrics.splice_pipes.clone(),
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
