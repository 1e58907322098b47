//! The life of one client connection: admission, then either mxgate's own answer or a backend
//! connection and forwarding until the session ends.
//!
//! Everything here runs in the connection's own task, on the worker thread that accepted it,
//! from where [`Gate::triage`] (in `server::gate`) left it. The settings a reload may change
//! live in [`Live`], swapped whole; a session reads them once when it starts. This module keeps
//! one connection's life and nothing else.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::Instrument;

use crate::admission::Guard;
use crate::backend::Lease;
use crate::config::Config;
use crate::forward;
use crate::proxy_protocol;
use crate::reason::RejectReason;
use crate::reply::display_source;
use crate::server::gate::{Gate, HeaderWait, Live, Start};

impl Gate {
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
        }
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
        let header = tokio::select! {
            h = upstream_header(&mut client, peer, &live.config) => h,
            // Shutdown: a header still on its way is not waited for past the drain.
            () = self.cut.cancelled() => {
                drop(wait);
                let ip = peer.ip().to_canonical();
                self.reject(client, RejectReason::Draining, ip, &live).await;
                return None;
            }
        };
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
                self.closer.refuse(client, reason, &live.replies).await;
                None
            }
        }
    }

    /// Counts a refusal, answers the client for `reason` and closes; no backend is involved.
    async fn reject(&self, client: TcpStream, reason: RejectReason, ip: IpAddr, live: &Live) {
        self.count_refusal(reason, ip, live);
        self.closer.refuse(client, reason, &live.replies).await
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
        let deadline = deadline_after(config.connect_timeout);
        let (mut backend, lease) = match live.pool.connect(config, source, deadline).await {
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

/// `after` from now, or as far as the clock goes: a deadline never overflows.
fn deadline_after(after: std::time::Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .or_else(|| now.checked_add(crate::config::MAX_DURATION))
        .unwrap_or(now)
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
