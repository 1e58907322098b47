//! The life of one client connection: admission, then either mxgate's own answer or a backend
//! connection and forwarding until the session ends.
//!
//! Everything here runs in the connection's own task, on the worker thread that accepted it,
//! from where [`Gate::triage`] (in [`crate::gate`]) left it: admitted, or waiting in the queue
//! ([`wait::Waiting::turn`]) for its slot. The settings a reload may change
//! live in [`Live`], swapped whole; a session reads them once when it starts. This module keeps
//! one connection's life and nothing else.
//!
//! A connection's life, from accept to close. The accept loop decides ([`crate::gate::Triage`]);
//! the task goes through its phases (`Phase`), each of which ends in the next one; every
//! refusal is answered and counted by [`crate::reply`].
//!
//! ```text
//! accept ─► Gate::triage (accept loop, no I/O)
//!   ├─ Triage::Refuse ──────────────────────────────► Door: answer, count, close
//!   └─ Triage::Task(Start) ─► the connection's task:
//!        Start::AfterHeader ─► Phase::Header: the PROXY header, then the pregreet test's
//!                              triage or Gate::admit ─────────────────────────► Placed
//!        Start::Entered(Entry) ────────────────────────────────────────────────► Placed
//!        Start::Screen ─► Phase::Open: the pregreet test, then the capacity, as Placed does
//!
//! Placed ─┬─ Entry::Now  ─► Phase::Open
//!         ├─ Entry::Wait ─► Phase::Wait
//!         └─ Placement::Screen (named by a PROXY header) ─► Phase::Open, as Start::Screen
//!
//! Phase::Wait ─┬─ a Grant ─────────────────────────► Phase::Open
//!              ├─ its timeout, a drain (Unserved) ─► Phase::Refuse
//!              └─ the client left ─────────────────► counted, closed
//!
//! Phase::Open (the cluster's word, the backend connect, its greeting) ─► Opened:
//!   Opened::Ready ───► forwarding ─► close, the session line
//!   Opened::Requeue ─► Phase::Wait (every backend full)
//!   Opened::Refuse ──► Phase::Refuse (Unserved): Closer answers, counts, closes
//!   Opened::Done ────► answered already, or the client is gone
//! ```

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::Instrument;

use crate::admission::Guard;
use crate::backend::Lease;
use crate::forward;
use crate::gate::{Entry, Gate, HeaderWait, Live, Start};
use crate::queue::WaitEnd;
use crate::reason::RejectReason;
use crate::reply::display_source;

mod open;
mod origin;
mod screen;
mod wait;

use origin::{upstream_header, Origin};
use wait::{Waited, Waiting};

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
        let mut phase = self.first_phase(client, peer, start, span);
        async move {
            // `phase` is the task's one capture, reused by every phase.
            let (ready, relayed) = loop {
                phase = match phase {
                    Phase::Open(opening) => match opening.await {
                        Opened::Ready(ready, relayed) => break (ready, relayed),
                        Opened::Requeue(waiting) => Phase::Wait(waiting),
                        Opened::Refuse(client, origin, live, reason) => {
                            let span = conn_span(origin.client);
                            let unserved = Unserved {
                                client,
                                reason,
                                origin,
                                live,
                                span,
                            };
                            Phase::Refuse(self.refusal(unserved))
                        }
                        Opened::Done => return,
                    },
                    Phase::Refuse(refusal) => return refusal.await,
                    Phase::Header(header) => {
                        let Some(placed) = header.await else {
                            return;
                        };
                        let span = conn_span(placed.peer);
                        self.placed(placed, span)
                    }
                    Phase::Wait(waiting) => {
                        // Moved out of its box, which is freed here: a box moved out of
                        // lives until the end of its binding's scope, which here would be
                        // after the wait, and each waiter would keep its own dead copy.
                        let mut waiting = {
                            let boxed = waiting;
                            *boxed
                        };
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
                relayed,
                cancel,
            )
            .await;
            self.finished(&ready, report);
        }
    }

    /// The task's first phase, from where triage left the connection.
    fn first_phase(
        self: &Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        start: Start,
        span: tracing::Span,
    ) -> Phase {
        match start {
            Start::Entered(entry, live) => {
                let placed = Placed {
                    client,
                    origin: Origin::peer(peer),
                    live,
                    entry: Placement::Entry(entry),
                    peer,
                };
                self.placed(placed, span)
            }
            Start::Screen(screened, live) => Phase::Open(Box::pin(
                self.clone()
                    .screen(client, screened, Origin::peer(peer), live)
                    .instrument(span),
            )),
            Start::AfterHeader(live, wait) => {
                let header = self.clone().after_header(client, peer, live, wait);
                Phase::Header(Box::pin(header.instrument(span)))
            }
        }
    }

    /// The phase after admission placed a client (in the accept loop, or after its PROXY
    /// header): the pregreet test of a client a trusted upstream's header names, or the
    /// backend connect with the slots admission gave, or the queue.
    fn placed(self: &Arc<Self>, placed: Placed, span: tracing::Span) -> Phase {
        let Placed {
            client,
            origin,
            live,
            entry,
            peer,
        } = placed;
        let entry = match entry {
            Placement::Screen(screened) => {
                let span = conn_span(origin.client);
                return Phase::Open(Box::pin(
                    self.clone()
                        .screen(client, screened, origin, live)
                        .instrument(span),
                ));
            }
            Placement::Entry(entry) => entry,
        };
        match entry {
            Entry::Now(guard, lease) => {
                Phase::Open(
                    self.clone()
                        .opening(client, (guard, lease), origin, live, span),
                )
            }
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
        unserved: Unserved,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let gate = self.clone();
        let Unserved {
            client,
            reason,
            origin,
            live,
            span,
        } = unserved;
        Box::pin(
            async move {
                let ip = origin.client.ip().to_canonical();
                let refusal = gate.refusal_of(reason, ip, &live);
                gate.answer(client, refusal, &origin, &live).await
            }
            .instrument(span),
        )
    }

    /// Where a wait in the queue leads: the backend connect with the slot it got; or the
    /// refusal to send (a timeout, a drain, a word after the pregreet teaser), or nothing
    /// when the client gave up.
    fn after_wait(self: &Arc<Self>, waiting: Waiting, outcome: Waited) -> Option<Phase> {
        let outcome = match outcome {
            Waited::Turn(outcome) => Some(outcome),
            Waited::Gone => None,
            Waited::Spoke => return self.spoke_in_queue(waiting),
        };
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
        // Read again from here on (forwarded, or drained after a refusal): a talker past the
        // early-bytes bound gets the readiness its watch cleared back first. One the reactor
        // will not take again is closed, its wait or its refusal still on record.
        let reason = match outcome {
            Some(WaitEnd::Granted(grant)) => {
                let Some(client) = wait::rearm(client, &origin.early) else {
                    self.queue.record_wait(waited);
                    return None;
                };
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
            Some(WaitEnd::TimedOut) => RejectReason::QueueTimeout,
            Some(WaitEnd::Draining) => RejectReason::Draining,
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
                reason = %reason.label(),
                waited_ms,
                "left the queue without a slot"
            )
        });
        // Counted under the client's own address: behind a PROXY upstream, not the upstream's.
        let ip = origin.client.ip().to_canonical();
        let Some(client) = wait::rearm(client, &origin.early) else {
            self.closer.gone(self.refusal_of(reason, ip, &live));
            return None;
        };
        let unserved = Unserved {
            client,
            reason,
            origin,
            live,
            span,
        };
        Some(Phase::Refuse(self.refusal(unserved)))
    }

    /// A client that spoke in the queue after the pregreet teaser: refused under `enforce` or
    /// `drop` (its place in the queue given up), or back to its wait under `ignore`.
    fn spoke_in_queue(self: &Arc<Self>, mut waiting: Waiting) -> Option<Phase> {
        if !self.spoke(&mut waiting.origin, &waiting.live) {
            return Some(Phase::Wait(Box::new(waiting)));
        }
        let Waiting {
            client,
            guard,
            ticket,
            origin,
            live,
            peer,
        } = waiting;
        drop((ticket, guard));
        let ip = origin.client.ip().to_canonical();
        let Some(client) = wait::rearm(client, &origin.early) else {
            let refusal = self.refusal_of(RejectReason::Pregreet, ip, &live);
            self.closer.gone(refusal);
            return None;
        };
        let gate = self.clone();
        let answer = async move { gate.answer_spoke(client, origin.early, ip, &live).await };
        Some(Phase::Refuse(Box::pin(answer.instrument(conn_span(peer)))))
    }

    /// A connection from a load balancer that must be trusted and send a PROXY header: the
    /// header first, then admission of the client it names; `None` once answered.
    async fn after_header(
        self: Arc<Self>,
        mut client: TcpStream,
        peer: SocketAddr,
        live: Arc<Live>,
        wait: HeaderWait,
    ) -> Option<Placed> {
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
        // The client the header names is tested as any client is, under its own address.
        if let Some(screened) = self.screen_triage(ip, &live) {
            return match screened {
                Ok(screened) => Some(Placed {
                    client,
                    origin,
                    live,
                    entry: Placement::Screen(screened),
                    peer,
                }),
                Err(refusal) => {
                    self.closer.refuse(client, refusal, &live.replies).await;
                    None
                }
            };
        }
        match self.admit(ip, &live) {
            Ok(entry) => Some(Placed {
                client,
                origin,
                live,
                entry: Placement::Entry(entry),
                peer,
            }),
            Err(refusal) => {
                self.closer.refuse(client, refusal, &live.replies).await;
                None
            }
        }
    }

    /// Answers the client for `reason`, counted, and closes; no backend is involved.
    async fn reject(&self, client: TcpStream, reason: RejectReason, ip: IpAddr, live: &Live) {
        let refusal = self.refusal_of(reason, ip, live);
        self.closer.refuse(client, refusal, &live.replies).await
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
            // mxgate's end toward the backend: the port the backend's own log shows.
            local = %ready.backend.local_addr().map_or("-".into(), |a| a.to_string()),
            queued_ms = ready.waited_ms,
            duration_ms = elapsed.as_millis() as u64,
            // The whole session's bytes: those relayed while the greeting was awaited too.
            client_to_backend = report.client_to_backend,
            backend_to_client = report.backend_to_client,
            spliced = report.spliced,
            end = %report.end.label(),
            error,
            "session finished"
        );
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
struct Unserved {
    client: TcpStream,
    reason: RejectReason,
    origin: Origin,
    live: Arc<Live>,
    span: tracing::Span,
}

/// A client admission has placed: admitted at once or to wait in the queue, or (named by a
/// trusted upstream's header) to the pregreet test first.
struct Placed {
    client: TcpStream,
    origin: Origin,
    live: Arc<Live>,
    entry: Placement,
    /// The connection's peer (after a PROXY header, the upstream it came through): its log
    /// lines' `src`.
    peer: SocketAddr,
}

/// Where a placed client goes next.
enum Placement {
    /// The pregreet test first, holding its per-source slots and its place under the test
    /// only.
    Screen((Guard, crate::pregreet::Place)),
    /// Admitted, or in the queue.
    Entry(Entry),
}

type BoxedOpening = std::pin::Pin<Box<dyn std::future::Future<Output = Opened> + Send>>;

/// Where the opening phase leads.
enum Opened {
    /// Connected and greeted: forwarding, with the bytes moved before it began (the client's
    /// early words to the backend, the greeting to the client). Apart from [`Ready`], which
    /// lives as long as the session: they go into the forwarder's own counts.
    Ready(Ready, forward::Relayed),
    /// Every backend was full (each said busy, or filled up before the connect): back in the
    /// queue.
    Requeue(Box<Waiting>),
    /// It could not go back to the queue: closed for a drain, or full for one that never
    /// waited. The reply for that reason.
    Refuse(TcpStream, Origin, Arc<Live>, RejectReason),
    /// Answered, or gone.
    Done,
}

type BoxedHeader = std::pin::Pin<Box<dyn std::future::Future<Output = Option<Placed>> + Send>>;

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
