//! The server: accept loops, and the life of one client connection.
//!
//! Each accepted connection gets its own task at once; admission, the backend connect and the
//! forwarding all happen there, never in the accept loop. A connection is either admitted, and
//! then holds a [`Guard`] for its whole life, or answered by mxgate itself and closed.
//!
//! [`start`] binds everything (or adopts inherited listeners) and returns a [`Running`] handle;
//! tests use it to run the real server in-process on port 0.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admission::{Admission, Guard, Limits, RejectReason};
use crate::backend;
use crate::config::{Config, Forwarding};
use crate::forward::{self, Mode, Traffic};
use crate::listener::{self, AcceptErrors};
use crate::metrics::{self, Metrics};
use crate::reply::{display_source, Closer, RejectSummary, Replies};

/// Everything a connection task needs, shared by all of them.
struct Gate {
    config: Config,
    admission: Admission,
    replies: Replies,
    closer: Closer,
    summary: Arc<RejectSummary>,
    metrics: Arc<Metrics>,
    mode: Mode,
    traffic: Traffic,
    /// Cancelled to cut sessions that are still forwarding.
    cut: CancellationToken,
}

/// A running mxgate instance.
pub struct Running {
    listen_addrs: Vec<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    gate: Arc<Gate>,
    /// Cancelled to stop the accept loops and the metrics endpoint.
    stop: CancellationToken,
    /// Connection tasks, so shutdown can wait for them.
    sessions: TaskTracker,
    /// Accept loops and helpers.
    background: TaskTracker,
}

/// Binds every listener and the metrics endpoint, then starts serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
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

    let gate = Arc::new(Gate::new(config, metrics.clone()));
    let stop = CancellationToken::new();
    let background = TaskTracker::new();
    let sessions = TaskTracker::new();
    if let Some(l) = metrics_listener {
        background.spawn(metrics::serve(l, metrics, stop.clone()));
    }
    let summary = gate.summary.clone();
    let summary_stop = stop.clone();
    background.spawn(async move {
        tokio::select! {
            () = summary.clone().run() => {}
            () = summary_stop.cancelled() => summary.flush(),
        }
    });
    for (l, addr) in tokio_listeners.into_iter().zip(&listen_addrs) {
        tracing::info!(listen = %addr, backend = %gate.config.backend, "accepting");
        background.spawn(accept_loop(
            l,
            *addr,
            gate.clone(),
            sessions.clone(),
            stop.clone(),
        ));
    }
    Ok(Running {
        listen_addrs,
        metrics_addr,
        gate,
        stop,
        sessions,
        background,
    })
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

    /// The metrics, as `/metrics` would render them.
    pub fn render_metrics(&self) -> String {
        self.gate.metrics.render()
    }

    /// Stops accepting, lets forwarding sessions finish for up to `drain`, cuts the rest, and
    /// waits until every connection task has ended.
    pub async fn shutdown(self, drain: Duration) {
        self.stop.cancel();
        self.background.close();
        self.background.wait().await;
        self.sessions.close();
        if tokio::time::timeout(drain, self.sessions.wait())
            .await
            .is_err()
        {
            tracing::info!(
                remaining = self.gate.admission.active(),
                "drain time over; closing sessions"
            );
            self.gate.cut.cancel();
            self.sessions.wait().await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
        self.gate.cut.cancel();
    }
}

impl Gate {
    fn new(config: Config, metrics: Arc<Metrics>) -> Gate {
        let admission = Admission::new(
            Limits {
                max_connections: config.max_connections.into(),
                max_per_source: config.max_per_source.into(),
                ipv4_prefix: config.ipv4_prefix.into(),
                ipv6_prefix: config.ipv6_prefix.into(),
            },
            metrics.clone(),
        );
        let traffic = Traffic {
            client_to_backend: metrics.bytes_client_to_backend.clone(),
            backend_to_client: metrics.bytes_backend_to_client.clone(),
            spliced: metrics.counter("mxgate_spliced_bytes_total", &[]),
            splice_fallbacks: metrics.counter("mxgate_splice_fallbacks_total", &[]),
        };
        let mode = forwarding_mode(&config, &metrics);
        Gate {
            replies: Replies::new(&config.hostname, &config.replies),
            admission,
            closer: Closer::default(),
            summary: Arc::default(),
            metrics,
            mode,
            traffic,
            cut: CancellationToken::new(),
            config,
        }
    }

    /// One client connection, from admission to close.
    async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let ip = peer.ip().to_canonical();
        match self.admission.admit(ip) {
            Ok(guard) => self.serve(client, guard, ip).await,
            Err(reason) => self.reject(client, reason, ip).await,
        }
    }

    /// Answers the client with the reply for `reason` and closes; no backend is involved.
    async fn reject(&self, client: TcpStream, reason: RejectReason, ip: IpAddr) {
        self.metrics.rejected(reason).increment(1);
        self.summary.record(reason, self.admission.key(ip));
        self.closer
            .reply_and_close(client, self.replies.line(reason))
            .await;
    }

    /// Connects the admitted client to the backend and forwards until the session ends.
    async fn serve(&self, client: TcpStream, guard: Guard, ip: IpAddr) {
        let _ = client.set_nodelay(true);
        let started = Instant::now();
        let backend_addr = self.config.backend.addr;
        let backend = match backend::connect(backend_addr, self.config.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(backend = %backend_addr, error = %e, "backend unavailable");
                drop(guard);
                return self
                    .reject(client, RejectReason::BackendUnavailable, ip)
                    .await;
            }
        };
        self.metrics
            .backend_connect_seconds
            .record(started.elapsed().as_secs_f64());
        let report = forward::forward(
            &client,
            &backend,
            &self.mode,
            self.config.idle_timeout,
            &self.traffic,
            self.cut.cancelled(),
        )
        .await;
        let elapsed = started.elapsed();
        self.metrics
            .session_duration_seconds
            .record(elapsed.as_secs_f64());
        let error = match &report.end {
            forward::End::Fault(_, e) => Some(e.to_string()),
            _ => None,
        };
        tracing::info!(
            source = %display_source(&guard.source()),
            duration_ms = elapsed.as_millis() as u64,
            client_to_backend = report.client_to_backend,
            backend_to_client = report.backend_to_client,
            spliced = report.spliced,
            end = report.end.label(),
            error,
            "session finished"
        );
    }
}

/// Accepts until `stop`, handing each connection to its own task.
async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    gate: Arc<Gate>,
    sessions: TaskTracker,
    stop: CancellationToken,
) {
    let mut errors = AcceptErrors::default();
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            r = listener.accept() => r,
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
                    () = stop.cancelled() => return,
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
