//! The life of one client connection: admission, then either mxgate's own answer or a backend
//! connection and forwarding until the session ends.
//!
//! Everything here runs in the connection's own task, on the worker thread that accepted it,
//! from where [`Gate::triage`] (in `server::gate`) left it: admitted, or waiting in the queue
//! ([`Gate::wait_turn`]) for its slot. The settings a reload may change
//! live in [`Live`], swapped whole; a session reads them once when it starts. This module keeps
//! one connection's life and nothing else.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::Instrument;

use crate::admission::Guard;
use crate::backend::{greeting, Greeting, Lease};
use crate::config::Config;
use crate::forward;
use crate::policy::Listing;
use crate::proxy_protocol;
use crate::queue::{Entered, Outcome, Waiter};
use crate::reason::RejectReason;
use crate::reply::display_source;
use crate::server::gate::{Entry, Gate, Grant, HeaderWait, Live, Start};

mod origin;
mod wait;

use origin::{upstream_header, Origin};
use wait::Waiting;

impl Gate {
    /// A connection's task, from where [`Gate::triage`] left it to the end.
    ///
    /// In phases, so that a task holds no more than its phase needs. A PROXY header is read
    /// in a boxed future, and so is everything from the backend connect to forwarding; each
    /// box is freed as soon as it is done. The wait in the queue and the long forwarding
    /// phase are inline: they hold only the client, the slots and their own small state, so a
    /// waiting client costs no more than an idle session. (Inline, the boxed phases' locals
    /// would stay reserved in the task for the session's whole life.)
    pub fn run(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        start: Start,
    ) -> impl std::future::Future<Output = ()> + Send {
        // The span gives the opening phases' log lines their client; the long forwarding
        // phase carries none (it would sit in every idle session's task), and its one line,
        // "session finished", names the client itself.
        let span = conn_span(peer);
        // What the task starts with is one small value: an async block keeps what it
        // captures for its whole life, so the captures are boxed and moved out at once.
        let mut phase = match start {
            Start::Admitted(guard, lease, live) => {
                let origin = Origin::peer(peer);
                Phase::Open(
                    self.clone()
                        .opening(client, (guard, lease), origin, live, span),
                )
            }
            Start::Queued(guard, ticket, live) => Phase::Wait(Box::new(Waiting {
                client,
                guard,
                ticket,
                origin: Origin::peer(peer),
                live,
                peer,
            })),
            Start::AfterHeader(live, wait) => {
                let header = self.clone().after_header(client, peer, live, wait);
                Phase::Header(Box::pin(header.instrument(span)))
            }
        };
        async move {
            // `phase` is the task's one capture, reused by every phase.
            let ready = loop {
                phase = match phase {
                    Phase::Open(opening) => match opening.await {
                        Opened::Ready(ready) => break ready,
                        Opened::Requeue(waiting) => Phase::Wait(waiting),
                        Opened::Refuse(client, peer, live) => {
                            let span = conn_span(peer);
                            let ip = peer.ip().to_canonical();
                            Phase::Refuse(self.refusal((
                                client,
                                RejectReason::Draining,
                                ip,
                                live,
                                span,
                            )))
                        }
                        Opened::Done => return,
                    },
                    Phase::Refuse(refusal) => return refusal.await,
                    Phase::Header(header) => {
                        let Some((client, origin, live, entry, peer)) = header.await else {
                            return;
                        };
                        match entry {
                            Entry::Now(guard, lease) => Phase::Open(self.clone().opening(
                                client,
                                (guard, lease),
                                origin,
                                live,
                                conn_span(peer),
                            )),
                            Entry::Wait(guard, ticket) => Phase::Wait(Box::new(Waiting {
                                client,
                                guard,
                                ticket,
                                origin,
                                live,
                                peer,
                            })),
                        }
                    }
                    Phase::Wait(waiting) => {
                        let mut waiting = *waiting;
                        let outcome = waiting.turn().await;
                        match self.after_wait(waiting, outcome) {
                            Some(next) => next,
                            None => return,
                        }
                    }
                };
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

    /// The boxed phase from the backend connect to forwarding.
    fn opening(
        self: Arc<Self>,
        client: TcpStream,
        slots: (Guard, Option<Lease>),
        origin: Origin,
        live: Arc<Live>,
        span: tracing::Span,
    ) -> BoxedOpening {
        Box::pin(self.prepare(client, slots, origin, live).instrument(span))
    }

    /// mxgate's own answer to a client that left the queue without a slot, boxed.
    fn refusal(
        self: &Arc<Self>,
        (client, reason, ip, live, span): Unserved,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let gate = self.clone();
        Box::pin(async move { gate.reject(client, reason, ip, &live).await }.instrument(span))
    }

    /// Where a wait in the queue leads: the backend connect with the slot it got; or the
    /// refusal to send (a timeout, a drain), or nothing when the client gave up.
    fn after_wait(
        self: &Arc<Self>,
        waiting: Waiting,
        outcome: Option<Outcome<Grant>>,
    ) -> Option<Phase> {
        let Waiting {
            client,
            mut guard,
            ticket,
            mut origin,
            live,
            peer,
        } = waiting;
        let span = conn_span(peer);
        let waited = ticket.entered().elapsed();
        origin.waited = Some(waited);
        let waited_ms = waited.as_millis() as u64;
        let reason = match outcome {
            Some(Outcome::Granted(grant)) => {
                guard.hold(grant.global);
                let slots = (guard, grant.lease);
                // The config in force now, which the slot was granted under (a reload may have
                // come while it waited), not the one it arrived under.
                drop(live);
                let live = self.live.load_full();
                return Some(Phase::Open(
                    self.clone().opening(client, slots, origin, live, span),
                ));
            }
            Some(Outcome::TimedOut) => RejectReason::QueueTimeout,
            Some(Outcome::Draining) => RejectReason::Draining,
            None => {
                // Gone: the ticket leaves the queue, and a slot sent meanwhile is freed.
                drop(ticket);
                span.in_scope(|| {
                    tracing::debug!(waited_ms, "client gave up while waiting in the queue")
                });
                return None;
            }
        };
        span.in_scope(|| {
            tracing::debug!(
                reason = reason.label(),
                waited_ms,
                "left the queue without a slot"
            )
        });
        // Counted under the client's own address: behind a PROXY upstream, not the upstream's.
        let ip = origin.client.ip().to_canonical();
        Some(Phase::Refuse(
            self.refusal((client, reason, ip, live, span)),
        ))
    }

    /// A connection from a load balancer that must be trusted and send a PROXY header: the
    /// header first, then admission of the client it names; `None` once answered.
    async fn after_header(
        self: Arc<Self>,
        mut client: TcpStream,
        peer: SocketAddr,
        live: Arc<Live>,
        wait: HeaderWait,
    ) -> Option<Admitted> {
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
            Ok(entry) => Some((client, origin, live, entry, peer)),
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
            queued_ms = ready.waited_ms,
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
    /// PROXY header and any early client bytes, and read the greeting before the client sees
    /// it. A busy (4xx) greeting is absorbed: the client tries another backend with room, or
    /// goes back to the head of the queue, or (with no queue) gets mxgate's own 421. On a
    /// failure the client has been answered.
    async fn prepare(
        self: Arc<Self>,
        client: TcpStream,
        (mut guard, mut first): (Guard, Option<Lease>),
        mut origin: Origin,
        live: Arc<Live>,
    ) -> Opened {
        let started = Instant::now();
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
        // Without a greeting timeout of its own, a backend has what RFC 5321 gives it.
        let greeting_limit = config
            .backend_greeting_timeout
            .unwrap_or(crate::config::MAX_QUEUE_TIMEOUT)
            .min(config.idle_timeout);
        // A 4xx from a backend that sees the client's own address (transparent mode, a PROXY
        // header) may be about that client alone; only Exchange's "system capacity" code is
        // then taken as the whole backend being full.
        let client_seen = config.transparent || config.proxy_protocol.is_some();
        let mut tried = Vec::new();
        let mut absorbed = 0u32;
        loop {
            // Each try has its own connect budget: a wait for a busy greeting is not charged
            // to the next backend's connect.
            let deadline = deadline_after(config.connect_timeout);
            let connected = live
                .pool
                .connect(config, source, deadline, first.take(), &mut tried)
                .await;
            let (backend, lease) = match connected {
                Ok(connected) => connected,
                // Every backend with room said busy: back to the queue, if there is one.
                Err(RejectReason::GlobalLimit) if absorbed > 0 && live.queues() => {
                    return self.requeue(client, guard, origin, live, started);
                }
                Err(reason) => {
                    let reason = if absorbed > 0 {
                        RejectReason::BackendUnavailable
                    } else {
                        reason
                    };
                    drop(guard);
                    self.reject(client, reason, ip, &live).await;
                    return Opened::Done;
                }
            };
            let connected_at = Instant::now();
            self.metrics
                .backend_connect_seconds
                .record(connected_at.duration_since(started).as_secs_f64());
            if !self.opening_bytes(&client, &backend, &origin, config).await {
                drop((backend, guard, lease));
                self.reject(client, RejectReason::BackendUnavailable, ip, &live)
                    .await;
                return Opened::Done;
            }
            let mut kept = std::mem::take(&mut origin.early);
            let greeting = tokio::select! {
                g = greeting::read(&backend, &client, &mut kept, greeting_limit) => g,
                // Shutdown: a greeting still on its way is not waited for past the drain.
                () = self.cut.cancelled() => Greeting::Silent,
            };
            let time = connected_at.elapsed();
            match greeting {
                Greeting::Pass(first_words) => {
                    // A close without a word is no greeting to learn from.
                    if !first_words.is_empty() {
                        lease.member.greeted(time);
                    }
                    self.traffic.client_to_backend.increment(kept.len() as u64);
                    if !first_words.is_empty() {
                        if greeting::write_all(&client, &first_words).await.is_err() {
                            return Opened::Done;
                        }
                        self.traffic
                            .backend_to_client
                            .increment(first_words.len() as u64);
                    }
                    return Opened::Ready(Ready {
                        client,
                        backend,
                        guard,
                        lease,
                        peer: origin.client,
                        waited_ms: origin
                            .waited
                            .map(|w| u32::try_from(w.as_millis()).unwrap_or(u32::MAX)),
                    });
                }
                Greeting::Busy(words) => {
                    tracing::debug!(backend = %lease.member.label, "backend busy; greeting absorbed");
                    let capacity = words.get(4..9) == Some(&b"4.3.2"[..]);
                    lease.member.busy(time, !client_seen || capacity);
                    greeting::quit(backend);
                    drop(lease);
                    absorbed += 1;
                    // Whatever the client said goes again, in order, to the next backend.
                    origin.early = kept;
                    // Its global slot stays held for the next try; a requeue gives it back.
                    let _ = &mut guard;
                }
                // No greeting timeout of its own: the idle timeout ended the wait, and the
                // session ends as an idle one does, with a close.
                Greeting::Silent if config.backend_greeting_timeout.is_none() => {
                    tracing::debug!(backend = %lease.member.label, "backend sent no greeting within the idle timeout");
                    return Opened::Done;
                }
                Greeting::Silent | Greeting::Failed => {
                    tracing::debug!(backend = %lease.member.label, "backend sent no greeting");
                    drop((backend, guard, lease));
                    self.reject(client, RejectReason::BackendUnavailable, ip, &live)
                        .await;
                    return Opened::Done;
                }
                Greeting::ClientGone => return Opened::Done,
            }
        }
    }

    /// The PROXY header, then whatever the client sent before the backend was connected:
    /// nothing reaches the backend out of order. `false` if the backend closed meanwhile.
    async fn opening_bytes(
        &self,
        client: &TcpStream,
        backend: &TcpStream,
        origin: &Origin,
        config: &Config,
    ) -> bool {
        if let Some(version) = config.proxy_protocol {
            // Our own address, asked of the kernel only when a header needs it.
            let server = origin
                .server
                .unwrap_or_else(|| client.local_addr().unwrap_or(origin.client));
            let header = proxy_protocol::encode(version, origin.client, server);
            if let Err(e) = greeting::write_all(backend, &header).await {
                tracing::debug!(error = %e, "backend closed before the PROXY header");
                return false;
            }
        }
        origin.early.is_empty() || greeting::write_all(backend, &origin.early).await.is_ok()
    }

    /// A client whose backends all said busy waits again, at the head of the queue, with the
    /// deadline of its first wait; its global slot goes back meanwhile.
    fn requeue(
        &self,
        client: TcpStream,
        mut guard: Guard,
        mut origin: Origin,
        live: Arc<Live>,
        started: Instant,
    ) -> Opened {
        let ip = origin.client.ip().to_canonical();
        let waiter = Waiter {
            ip,
            allowed: live.policy.classify(ip).listing == Some(Listing::Allow),
        };
        let started = started.into_std();
        let waited = origin.waited.take().unwrap_or_default();
        let entered = started.checked_sub(waited).unwrap_or(started);
        let entry = self
            .queue
            .reenter(guard.source(), waiter, entered, live.config.queue_timeout);
        guard.release_global();
        match entry {
            Entered::Wait(ticket) => Opened::Requeue(Box::new(Waiting {
                client,
                guard,
                ticket,
                peer: origin.client,
                origin,
                live,
            })),
            // Shut down meanwhile.
            _ => Opened::Refuse(client, origin.client, live),
        }
    }
}

/// The span that gives a connection's opening log lines their client.
fn conn_span(peer: SocketAddr) -> tracing::Span {
    tracing::info_span!("conn", src = %peer.ip().to_canonical(), port = peer.port())
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
    /// How long it waited in the queue, if it did.
    waited_ms: Option<u32>,
}

/// A client that left the queue without a slot, and what its refusal needs.
type Unserved = (TcpStream, RejectReason, IpAddr, Arc<Live>, tracing::Span);

/// A client admitted after its PROXY header: at once or to wait, and the upstream it came
/// through (its log lines' `src`).
type Admitted = (TcpStream, Origin, Arc<Live>, Entry, SocketAddr);

type BoxedOpening = std::pin::Pin<Box<dyn std::future::Future<Output = Opened> + Send>>;

/// Where the opening phase leads.
enum Opened {
    /// Connected and greeted: forwarding.
    Ready(Ready),
    /// Every backend with room said busy: back in the queue.
    Requeue(Box<Waiting>),
    /// The queue closed for a drain while it went back: the draining reply.
    Refuse(TcpStream, SocketAddr, Arc<Live>),
    /// Answered, or gone.
    Done,
}

type BoxedHeader = std::pin::Pin<Box<dyn std::future::Future<Output = Option<Admitted>> + Send>>;

/// Where a connection's task is: each phase is one small value.
enum Phase {
    /// Reading a trusted upstream's PROXY header.
    Header(BoxedHeader),
    /// Waiting in the queue.
    Wait(Box<Waiting>),
    /// Connecting the backend, up to forwarding.
    Open(BoxedOpening),
    /// Answering a client that left the queue without a slot.
    Refuse(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>),
}

#[cfg(test)]
mod tests;
