//! The life of one client connection: admission, then either mxgate's own answer or a backend
//! connection and forwarding until the session ends.
//!
//! [`Gate::triage`] runs in the accept loop and never waits; everything else here runs in the
//! connection's own task, on the worker thread that accepted it. The settings a reload may
//! change live in [`Live`], swapped whole; a session reads them once when it starts.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admission::{Admission, Guard, RejectReason};
use crate::backend;
use crate::backends::{Lease, NoBackend, Pool};
use crate::config::Config;
use crate::forward::{self, Mode, Traffic};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::proxy_protocol;
use crate::reply::{display_source, Closer, RejectSummary, Replies};

/// What a reload replaces, as one unit, so a connection never sees half of a new config.
pub struct Live {
    pub config: Config,
    pub policy: Policy,
    pub replies: Replies,
    pub pool: Pool,
}

impl Live {
    /// The runtime state for `config`: policy and rate limiters, replies, backend pool. The one
    /// way it is built, at start-up, on reload and by `mxgate check`, so whatever validation
    /// accepts builds here too. Limiters and backends of `previous` are carried over.
    pub fn build(
        config: Config,
        previous: Option<&Live>,
        clock: crate::policy::PolicyClock,
        metrics: &Metrics,
    ) -> Live {
        Live {
            policy: Policy::new(&config, previous.map(|p| &p.policy), clock),
            replies: Replies::new(&config.hostname, &config.replies),
            pool: Pool::new(&config, previous.map(|p| &p.pool), metrics),
            config,
        }
    }
}

/// Everything a connection task needs, shared by all of them.
pub struct Gate {
    pub live: ArcSwap<Live>,
    pub admission: Admission,
    pub closer: Closer,
    pub summary: Arc<RejectSummary>,
    pub metrics: Arc<Metrics>,
    pub mode: Mode,
    pub traffic: Traffic,
    /// Set once shutdown starts: new connections get the draining reply.
    pub draining: AtomicBool,
    /// Cancelled to cut sessions that are still forwarding.
    pub cut: CancellationToken,
    /// Bounds the connections waiting for a trusted upstream's PROXY header, which hold no
    /// slot yet.
    pub headers: Arc<tokio::sync::Semaphore>,
}

/// How many connections may wait for their PROXY header at once; past it a new one gets the
/// global-limit reply, which the upstream relays to its client.
pub const MAX_PENDING_HEADERS: usize = 1024;

/// A connection's place among those waiting for a PROXY header; shown in
/// `mxgate_proxy_headers_pending` while held.
pub struct HeaderWait {
    _slot: tokio::sync::OwnedSemaphorePermit,
    gauge: metrics::Gauge,
}

impl Drop for HeaderWait {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// What the accept loop does with a new connection, decided without waiting.
pub enum Triage {
    /// Refused with a one-line reply, which the accept loop can send and linger on itself.
    /// The refusal is already counted.
    Refuse(RejectReason, Arc<Live>),
    /// Anything else goes on in the connection's own task.
    Task(Start),
}

/// Where a connection's task starts.
pub enum Start {
    /// Admission waits for a trusted upstream's PROXY header, which has to be read first.
    AfterHeader(Arc<Live>, HeaderWait),
    /// Admitted by the accept loop.
    Admitted(Guard, Arc<Live>),
    /// Refused with more than a line: the denied client's dialogue, or a line that has to
    /// be written asynchronously.
    Refused(RejectReason, Arc<Live>),
}

impl Gate {
    /// Decides a new connection in the accept loop: admission needs no I/O unless a PROXY
    /// header has to be read first.
    pub fn triage(&self, peer: SocketAddr) -> Triage {
        let live = self.live.load_full();
        let ip = peer.ip().to_canonical();
        if self.draining.load(Ordering::Acquire) {
            self.count_refusal(RejectReason::Draining, ip, &live);
            return Triage::Refuse(RejectReason::Draining, live);
        }
        if !live.config.accept_proxy_protocol.is_empty() {
            let Ok(slot) = self.headers.clone().try_acquire_owned() else {
                self.count_refusal(RejectReason::GlobalLimit, ip, &live);
                return Triage::Refuse(RejectReason::GlobalLimit, live);
            };
            let gauge = self.metrics.proxy_headers_pending.clone();
            gauge.increment(1.0);
            return Triage::Task(Start::AfterHeader(live, HeaderWait { _slot: slot, gauge }));
        }
        match self.admit(ip, &live) {
            Ok(guard) => Triage::Task(Start::Admitted(guard, live)),
            Err(RejectReason::Denied) => Triage::Task(Start::Refused(RejectReason::Denied, live)),
            Err(reason) => Triage::Refuse(reason, live),
        }
    }

    /// Admission for `ip`, with the dry run's would-be refusal or the refusal counted.
    fn admit(&self, ip: IpAddr, live: &Live) -> Result<Guard, RejectReason> {
        match self.admission.admit(&live.policy, ip) {
            Ok(admitted) => {
                if let Some(r) = admitted.would_reject {
                    self.metrics.rejected_dry_run(r).increment(1);
                    self.summary
                        .record_dry_run(r, live.policy.default.source_key(ip));
                }
                Ok(admitted.guard)
            }
            Err(reason) => {
                self.count_refusal(reason, ip, live);
                Err(reason)
            }
        }
    }

    /// A connection's task, from where [`Gate::triage`] left it to the end.
    ///
    /// Two phases, so that an idle session's task holds no more than it needs. Everything up
    /// to forwarding (PROXY header, backend connect, refusals) is one boxed future, freed as
    /// soon as it is done; the long forwarding phase that follows holds only the two streams,
    /// the session's slots and the forwarder's own small state. (Inline, the opening phase's
    /// locals would stay reserved in the task for the session's whole life.)
    pub fn run(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        start: Start,
    ) -> impl std::future::Future<Output = ()> + Send {
        // The span gives the opening phase's log lines their client; the long forwarding
        // phase carries none (it would sit in every idle session's task), and its one line,
        // "session finished", names the client itself.
        let span = tracing::info_span!("conn", src = %peer.ip().to_canonical(), port = peer.port());
        let opening = Box::pin(self.clone().open(client, peer, start).instrument(span));
        async move {
            // `opening` is consumed here, so its box is freed before forwarding starts.
            let Some(ready) = opening.await else {
                return;
            };
            let cancel = std::pin::pin!(self.cut.cancelled());
            let timeouts = {
                let live = self.live.load();
                forward::Timeouts::new(live.config.idle_timeout, live.config.half_close_timeout)
            };
            let report = forward::forward(
                &ready.client,
                &ready.backend,
                &self.mode,
                timeouts,
                &self.traffic,
                cancel,
            )
            .await;
            self.finished(&ready, report);
        }
    }

    /// The opening phase: admission if still to do, then the backend. `None` when the client
    /// has been answered by mxgate instead.
    async fn open(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        start: Start,
    ) -> Option<Ready> {
        match start {
            Start::AfterHeader(live, wait) => self.after_header(client, peer, live, wait).await,
            Start::Admitted(guard, live) => {
                let origin = Origin {
                    client: peer,
                    server: None,
                    early: Vec::new(),
                };
                self.prepare(client, guard, origin, live, Instant::now())
                    .await
            }
            Start::Refused(reason, live) => {
                self.answer(client, reason, &live).await;
                None
            }
        }
    }

    /// Counts a refusal in the metrics and the periodic summary.
    fn count_refusal(&self, reason: RejectReason, ip: IpAddr, live: &Live) {
        self.metrics.rejected(reason).increment(1);
        self.summary
            .record(reason, live.policy.classify(ip).rule.source_key(ip));
    }

    /// A connection from a load balancer that must be trusted and send a PROXY header: the
    /// header first, then admission of the client it names.
    async fn after_header(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        live: Arc<Live>,
        wait: HeaderWait,
    ) -> Option<Ready> {
        let header = upstream_header(&mut client, peer, &live.config).await;
        drop(wait);
        let origin = match header {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(error = %e, "refused a PROXY protocol header");
                let ip = peer.ip().to_canonical();
                self.reject(client, RejectReason::BadProxyHeader, ip, &live)
                    .await;
                return None;
            }
        };
        let ip = origin.client.ip().to_canonical();
        // A drain that began while the header was on its way refuses this client too.
        if self.draining.load(Ordering::Acquire) {
            self.reject(client, RejectReason::Draining, ip, &live).await;
            return None;
        }
        match self.admit(ip, &live) {
            Ok(guard) => {
                self.prepare(client, guard, origin, live, Instant::now())
                    .await
            }
            Err(reason) => {
                self.answer(client, reason, &live).await;
                None
            }
        }
    }

    /// Counts a refusal, answers the client for `reason` and closes; no backend is involved.
    async fn reject(&self, client: TcpStream, reason: RejectReason, ip: IpAddr, live: &Live) {
        self.count_refusal(reason, ip, live);
        self.answer(client, reason, live).await
    }

    /// Answers the client for an already counted refusal, and closes.
    async fn answer(&self, client: TcpStream, reason: RejectReason, live: &Live) {
        match reason {
            RejectReason::Denied => self.closer.deny(client, &live.replies).await,
            // A broken or untrusted upstream gets no SMTP text: it is not an SMTP client.
            RejectReason::BadProxyHeader => drop(client),
            _ => {
                self.closer
                    .reply_and_close(client, live.replies.line(reason))
                    .await;
            }
        }
    }

    /// Records and logs how a forwarded session went.
    fn finished(&self, ready: &Ready, report: forward::Report) {
        let elapsed = report.duration;
        self.metrics
            .session_duration_seconds
            .record(elapsed.as_secs_f64());
        let error = match &report.end {
            forward::End::Fault(_, e) => Some(e.to_string()),
            _ => None,
        };
        tracing::info!(
            src = %ready.peer.ip().to_canonical(),
            port = ready.peer.port(),
            source = %display_source(&ready.guard.source()),
            backend = %ready.lease.member.label,
            duration_ms = elapsed.as_millis() as u64,
            client_to_backend = report.client_to_backend,
            backend_to_client = report.backend_to_client,
            spliced = report.spliced,
            end = report.end.label(),
            error,
            "session finished"
        );
    }

    /// Everything between admission and forwarding: choose and connect a backend, send the
    /// PROXY header and any early client bytes, wait for the greeting if asked. On failure the
    /// client has been answered and `None` is returned.
    async fn prepare(
        &self,
        client: TcpStream,
        guard: Guard,
        origin: Origin,
        live: Arc<Live>,
        started: Instant,
    ) -> Option<Ready> {
        // On Linux the client's socket has TCP_NODELAY from its listener already.
        #[cfg(not(target_os = "linux"))]
        let _ = client.set_nodelay(true);
        let ip = origin.client.ip().to_canonical();
        let config = &live.config;
        let source = config.transparent.then(|| {
            let port = if config.transparent_port {
                origin.client.port()
            } else {
                0
            };
            SocketAddr::new(ip, port)
        });
        let (mut backend, lease) = match self.connect_backend(&live, source).await {
            Ok(connected) => connected,
            Err(reason) => {
                drop(guard);
                self.reject(client, reason, ip, &live).await;
                return None;
            }
        };
        self.metrics
            .backend_connect_seconds
            .record(started.elapsed().as_secs_f64());
        // The PROXY header first, then whatever the client sent behind the upstream's header,
        // then the stream: nothing reaches the backend out of order.
        if let Some(version) = config.proxy_protocol {
            // Our own address, asked of the kernel only when a header needs it.
            let server = origin
                .server
                .unwrap_or_else(|| client.local_addr().unwrap_or(origin.client));
            let header = proxy_protocol::encode(version, origin.client, server);
            if let Err(e) = backend.write_all(&header).await {
                tracing::debug!(error = %e, "backend closed before the PROXY header");
                drop((backend, guard, lease));
                self.reject(client, RejectReason::BackendUnavailable, ip, &live)
                    .await;
                return None;
            }
        }
        if !origin.early.is_empty() {
            backend.write_all(&origin.early).await.ok()?;
            self.traffic
                .client_to_backend
                .increment(origin.early.len() as u64);
        }
        if let Some(limit) = config.backend_greeting_timeout {
            if !backend_speaks(&backend, limit).await {
                tracing::debug!(backend = %lease.member.label, "backend sent no greeting in time");
                // A backend that accepts but never greets is failing, as a health check sees it.
                if config.health_checks {
                    lease.member.observe(false, config.fall, config.rise);
                }
                drop((backend, guard, lease));
                self.reject(client, RejectReason::BackendUnavailable, ip, &live)
                    .await;
                return None;
            }
        }
        Some(Ready {
            client,
            backend,
            guard,
            lease,
            peer: origin.client,
        })
    }
}

/// Whether the backend sends its first byte within `limit`. No byte has reached the client yet,
/// so a silent backend can still be answered with mxgate's own 421.
async fn backend_speaks(backend: &TcpStream, limit: std::time::Duration) -> bool {
    let mut probe = [0u8; 1];
    matches!(
        tokio::time::timeout(limit, backend.peek(&mut probe)).await,
        Ok(Ok(1))
    )
}

impl Gate {
    /// Picks a backend and connects to it, falling through to the next healthy one on a
    /// connect failure, all within one connect-timeout budget: no byte has reached the client
    /// yet, so a failure here is still invisible to it. Only the backend's own failures count
    /// against its health; one caused by the client's address or mxgate's own socket never does.
    async fn connect_backend(
        &self,
        live: &Live,
        source: Option<SocketAddr>,
    ) -> Result<(TcpStream, Lease), RejectReason> {
        let config = &live.config;
        let deadline = deadline_after(config.connect_timeout);
        let mut tried: Vec<SocketAddr> = Vec::new();
        loop {
            let lease = match live.pool.select(&tried, source.map(|s| s.ip())) {
                Ok(l) => l,
                Err(_) if !tried.is_empty() => return Err(RejectReason::BackendUnavailable),
                Err(NoBackend::AllFull) => return Err(RejectReason::GlobalLimit),
                Err(NoBackend::AllDown) => return Err(RejectReason::BackendUnavailable),
            };
            let addr = lease.member.addr;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RejectReason::BackendUnavailable);
            }
            match backend::connect(addr, left, source).await {
                Ok(s) => return Ok((s, lease)),
                Err(e) => {
                    tracing::debug!(backend = %lease.member.label, error = %e, "backend connect failed; trying the next");
                    if config.health_checks && e.is_backend_fault() {
                        lease.member.observe(false, config.fall, config.rise);
                    }
                    tried.push(addr);
                }
            }
        }
    }
}

/// `after` from now, or as far as the clock goes: a deadline never overflows.
fn deadline_after(after: std::time::Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(86400 * 365 * 30))
}

/// An admitted session, connected and ready to forward. Its fields hold the session's
/// slots (admission guard, backend lease) until it ends.
struct Ready {
    client: TcpStream,
    backend: TcpStream,
    guard: Guard,
    lease: Lease,
    /// The client: the connection's peer, or what a trusted upstream's header says it is.
    peer: SocketAddr,
}

/// Who a connection is from and to: the peer and our address, or what a trusted upstream's
/// PROXY header says they are.
struct Origin {
    client: SocketAddr,
    /// The address the client connected to, when an upstream header said so.
    server: Option<SocketAddr>,
    /// Client bytes that arrived behind the header, to be forwarded before anything else.
    early: Vec<u8>,
}

/// Reads the PROXY header of a connection from a trusted upstream load balancer.
async fn upstream_header(
    client: &mut TcpStream,
    peer: SocketAddr,
    config: &Config,
) -> Result<Origin, proxy_protocol::HeaderError> {
    let ip = peer.ip().to_canonical();
    if !config.accept_proxy_protocol.iter().any(|n| n.contains(&ip)) {
        return Err(proxy_protocol::HeaderError::Untrusted);
    }
    let (header, early) = proxy_protocol::read_header(client, config.proxy_header_timeout).await?;
    let (client, server) = match header.addresses {
        Some((c, s)) => (c, Some(s)),
        None => (peer, None),
    };
    Ok(Origin {
        client,
        server,
        early,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned_size<F, A, B, C, D, R>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// A session's task is kept in memory for the session's whole life, most of it idle, so
    /// its size is what an idle session costs beyond its two sockets. The opening phase is
    /// boxed and freed before forwarding; this catches a change that inlines it again, or
    /// keeps something else for the session's life.
    ///
    /// The bound matters to the byte: tokio allocates a task as a 128-byte aligned cell of
    /// about 112 bytes plus the future, so up to 784 bytes of future fit an 896-byte cell,
    /// and one byte more costs 128 bytes per session (issue 3's target is 2 KiB per idle
    /// session, two sockets' registrations included).
    #[test]
    fn a_session_task_stays_small() {
        let task = returned_size(Gate::run);
        assert!(task <= 776, "a session's task is {task} bytes");
    }
}
