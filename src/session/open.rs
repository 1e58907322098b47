//! The opening of a session: from its slots to a greeted backend. The backend is connected,
//! sent the PROXY header and the client's early bytes, and its greeting is read before the
//! client sees it; a busy (4xx) greeting is absorbed, and the client tries another backend or
//! goes back to the head of the queue. So does a client whose backend socket mxgate could not
//! open (out of descriptors or socket memory): that failure is nobody's but mxgate's.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::origin::Origin;
use super::wait::{Waiting, MAX_EARLY_BYTES};
use super::{deadline_after, Opened, Ready};
use crate::admission::Guard;
use crate::backend::{greeting, BusyAbout, Greeting, Lease, Unconnected};
use crate::config::Config;
use crate::forward;
use crate::gate::{Gate, Live};
use crate::local_errors::{Errno, Op};
use crate::policy::Listing;
use crate::pregreet::Rewrite;
use crate::proxy_protocol;
use crate::queue::{Entered, Waiter};
use crate::reason::RejectReason;

/// What the cluster said of a client admitted here.
enum Said {
    /// Admitted (or no cluster): its claim is in the guard.
    Admitted,
    /// Full, and the queue is on: the client waits for its turn to ask again.
    Full,
    Refused(RejectReason),
}

impl Gate {
    /// Everything between admission and forwarding: choose and connect a backend, send the
    /// PROXY header and any early client bytes, and read the greeting before the client sees
    /// it. A busy (4xx) greeting is absorbed: the client tries another backend with room, or
    /// goes back to the head of the queue, or (with no queue) gets mxgate's own 421. On a
    /// failure the client has been answered.
    pub(super) async fn prepare(
        self: Arc<Self>,
        client: TcpStream,
        slots: (Guard, Option<Lease>),
        origin: Origin,
        live: Arc<Live>,
    ) -> Opened {
        // A client served from the queue: its wait is over for good unless it goes back. A
        // greeted one's is recorded before the greeting reaches it, the others' here.
        let mut unrecorded = origin.waited;
        let opened = self
            .clone()
            .open(client, slots, origin, live, &mut unrecorded)
            .await;
        if let (Some(waited), false) = (unrecorded, matches!(opened, Opened::Requeue(_))) {
            self.queue.record_wait(waited);
        }
        opened
    }

    async fn open(
        self: Arc<Self>,
        client: TcpStream,
        (mut guard, mut first): (Guard, Option<Lease>),
        mut origin: Origin,
        live: Arc<Live>,
        unrecorded: &mut Option<std::time::Duration>,
    ) -> Opened {
        let started = Instant::now();
        // On Linux the client's socket has TCP_NODELAY from its listener already.
        #[cfg(not(target_os = "linux"))]
        let _ = client.set_nodelay(true);
        let ip = origin.client.ip().to_canonical();
        let config = &live.config;
        let plan = Plan::new(config, origin.client);
        match self.cluster_verdict(&mut guard, &origin, &live).await {
            Said::Admitted => {}
            // A waiter like any other, holding no local slot: back to this host's queue, to
            // ask again at its turn (`cluster::pace`).
            Said::Full => {
                drop(first);
                return self.requeue(client, guard, origin, live, started);
            }
            Said::Refused(reason) => {
                drop((guard, first));
                let refusal = self.refusal_of(reason, ip, &live);
                self.answer(client, refusal, &origin, &live).await;
                return Opened::Done;
            }
        }
        let mut tried = Vec::new();
        let mut absorbed = false;
        loop {
            let connected = self
                .connect_next(&live, plan.source, first.take(), &mut tried, started)
                .await;
            let (backend, lease) = match connected {
                Ok(connected) => connected,
                Err(Unconnected::Refused(reason)) => {
                    let left = (client, guard, origin);
                    return self
                        .not_connected(reason, absorbed, left, live, started)
                        .await;
                }
                Err(Unconnected::Local(errno, e)) => {
                    let left = (client, guard, origin);
                    return self.failed_locally((errno, e), left, live, started).await;
                }
            };
            let connected_at = Instant::now();
            if !self.opening_bytes(&client, &backend, &origin, config).await {
                drop((backend, guard, lease));
                return self.unavailable(client, &origin, &live).await;
            }
            let mut kept = std::mem::take(&mut origin.early);
            let greeting = tokio::select! {
                g = greeting::read(&backend, &client, &mut kept, plan.greeting_limit) => g,
                // Shutdown: a greeting still on its way is not waited for past the drain.
                () = self.cut.cancelled() => Greeting::Silent,
            };
            let time = connected_at.elapsed();
            match greeting {
                Greeting::Pass(mut first_words) => {
                    if origin.teased {
                        origin.early = kept;
                        let screened = self
                            .after_teaser(&client, &backend, first_words, &mut origin, &plan, &live)
                            .await;
                        first_words = match screened {
                            Teased::Greeted(words) => words,
                            other => {
                                greeting::quit(backend);
                                drop((guard, lease));
                                self.answer_teased(client, other, &origin, &live).await;
                                return Opened::Done;
                            }
                        };
                        kept = std::mem::take(&mut origin.early);
                    }
                    let connected = (client, backend, guard, lease);
                    let said = (first_words, kept.len(), time);
                    if let Some(waited) = unrecorded.take() {
                        self.queue.record_wait(waited);
                    }
                    return self.greeted(connected, said, &origin).await;
                }
                Greeting::Busy(words) => {
                    absorb_busy((backend, lease), &words, time, plan.client_seen, &mut tried);
                    absorbed = true;
                    // Whatever the client said goes again, in order, to the next backend.
                    // Its global slot stays held for the next try; a requeue gives it back.
                    origin.early = kept;
                }
                // No greeting timeout of its own: the idle timeout ended the wait, and the
                // session ends as an idle one does, with a close.
                Greeting::Silent if config.backend_greeting_timeout.is_none() => {
                    tracing::debug!(backend = %lease.member.label, "backend sent no greeting within the idle timeout");
                    return Opened::Done;
                }
                Greeting::Silent | Greeting::Failed => {
                    tracing::debug!(backend = %lease.member.label, "backend sent no greeting");
                    // What the client said meanwhile: a teased client that spoke fails.
                    origin.early = kept;
                    drop((backend, guard, lease));
                    return self.unavailable(client, &origin, &live).await;
                }
                Greeting::ClientGone => return Opened::Done,
            }
        }
    }

    /// The next backend with room, connected. Each try has its own connect budget: a wait
    /// for a busy greeting is not charged to the next backend's connect.
    async fn connect_next(
        &self,
        live: &Live,
        source: Option<SocketAddr>,
        first: Option<Lease>,
        tried: &mut Vec<SocketAddr>,
        started: Instant,
    ) -> Result<(TcpStream, Lease), Unconnected> {
        let config = &live.config;
        let deadline = deadline_after(config.connect_timeout);
        let connected = live
            .pool
            .connect(config, source, deadline, first, tried)
            .await?;
        self.local.succeeded();
        self.metrics
            .backend_connect_seconds
            .record(started.elapsed().as_secs_f64());
        Ok(connected)
    }

    /// mxgate's own backend-unavailable answer, its slots already given back.
    async fn unavailable(&self, client: TcpStream, origin: &Origin, live: &Live) -> Opened {
        let ip = origin.client.ip().to_canonical();
        let refusal = self.refusal_of(RejectReason::BackendUnavailable, ip, live);
        self.answer(client, refusal, origin, live).await;
        Opened::Done
    }

    /// A backend greeted a client that had the pregreet teaser: its greeting is read whole and
    /// rewritten to end the teaser's reply. A word from the client before that fails the test:
    /// while the greeting's first part came (kept already) or its rest, for a greeting that
    /// comes in pieces (read here from the client's socket, to be forwarded in order after
    /// the greeting when the client goes on).
    async fn after_teaser(
        &self,
        client: &TcpStream,
        backend: &TcpStream,
        first_words: Vec<u8>,
        origin: &mut Origin,
        plan: &Plan,
        live: &Live,
    ) -> Teased {
        let read = crate::pregreet::read_greeting(backend, first_words, plan.greeting_limit).await;
        // What the greeting's first read kept has gone to the backend already; what is taken
        // here has not.
        let forwarded = origin.early.len();
        if !origin.talked {
            take_available(client, &mut origin.early);
        }
        if !origin.talked && !origin.early.is_empty() && self.spoke(origin, live) {
            return Teased::Spoke;
        }
        self.greeting_ends(origin, live);
        match read {
            Some(Rewrite::Whole(words)) => {
                let taken = &origin.early[forwarded..];
                if !taken.is_empty() && greeting::write_all(backend, taken).await.is_err() {
                    return Teased::Unusable;
                }
                Teased::Greeted(words)
            }
            Some(Rewrite::Refused(reply)) => Teased::Refused(reply),
            // No SMTP, a close or silence: the backend is not there for this client.
            _ => Teased::Unusable,
        }
    }

    /// The answer to a teased client whose backend will not serve it, its slots given back
    /// and its backend closed: each completes the greeting first.
    async fn answer_teased(&self, client: TcpStream, teased: Teased, origin: &Origin, live: &Live) {
        match teased {
            Teased::Greeted(_) => {}
            Teased::Spoke => {
                let ip = origin.client.ip().to_canonical();
                self.answer_spoke(client, origin.early.clone(), ip, live)
                    .await
            }
            // The backend's own refusal, permanent as it said it: its code and text answer
            // the client's commands (RFC 5321 §3.1), not mxgate's transient 421.
            Teased::Refused(reply) => {
                tracing::debug!(
                    code = %String::from_utf8_lossy(&reply[..3]),
                    "backend refused in its greeting after the pregreet teaser; relayed at the client's commands"
                );
                let heard = origin.early.clone();
                self.closer
                    .backend_refused(client, &live.replies.completion, heard, &reply)
                    .await
            }
            Teased::Unusable => {
                tracing::debug!("backend greeting cannot end the pregreet teaser's reply");
                self.unavailable(client, origin, live).await;
            }
        }
    }

    /// No backend connected. If every backend is full (`GlobalLimit`: each said busy, or is at
    /// its cap or under a busy ceiling, which another session's busy greeting may have set
    /// between this client's grant and its connect), the client goes back to the queue when
    /// there is one; otherwise it gets mxgate's own answer.
    async fn not_connected(
        &self,
        reason: RejectReason,
        absorbed: bool,
        (client, guard, origin): (TcpStream, Guard, Origin),
        live: Arc<Live>,
        started: Instant,
    ) -> Opened {
        if reason == RejectReason::GlobalLimit && live.queues() {
            return self.requeue(client, guard, origin, live, started);
        }
        let reason = if absorbed {
            RejectReason::BackendUnavailable
        } else {
            reason
        };
        drop(guard);
        let ip = origin.client.ip().to_canonical();
        let refusal = self.refusal_of(reason, ip, &live);
        self.answer(client, refusal, &origin, &live).await;
        Opened::Done
    }

    /// mxgate could not open its own backend socket (out of descriptors or socket memory).
    /// Neither the client's doing nor the backend's: the client goes back to the head of the
    /// queue, and grants pause for a short, growing while ([`crate::local_errors::Backoff`]),
    /// so the slot it gives back is not handed to the next waiter to fail the same way at
    /// once. With no queue there is nowhere to wait: mxgate is out of room, which is what the
    /// global-limit answer says.
    async fn failed_locally(
        &self,
        (errno, error): (Errno, std::io::Error),
        (client, guard, origin): (TcpStream, Guard, Origin),
        live: Arc<Live>,
        started: Instant,
    ) -> Opened {
        self.metrics
            .local_errors
            .get(Op::BackendSocket, errno)
            .increment(1);
        self.local.failed(errno, &error);
        if live.queues() {
            return self.requeue(client, guard, origin, live, started);
        }
        drop(guard);
        let ip = origin.client.ip().to_canonical();
        self.reject(client, RejectReason::GlobalLimit, ip, &live)
            .await;
        Opened::Done
    }

    /// The cluster's admission, when limits are shared, in the connection's task, never the
    /// accept loop.
    async fn cluster_verdict(&self, guard: &mut Guard, origin: &Origin, live: &Live) -> Said {
        let Some(cluster) = &self.cluster else {
            return Said::Admitted;
        };
        if guard.clustered() {
            return Said::Admitted;
        }
        let ip = origin.client.ip().to_canonical();
        let ask = live.cluster_ask(ip, guard);
        match cluster.admit(&ask).await {
            crate::cluster::ClusterVerdict::Admitted(claim, would_reject) => {
                if let Some(r) = would_reject {
                    self.metrics.would_reject(r).increment(1);
                    self.summary.record_dry_run(r, guard.source());
                }
                guard.hold_claim(claim);
                Said::Admitted
            }
            crate::cluster::ClusterVerdict::Refused(RejectReason::GlobalLimit) if live.queues() => {
                Said::Full
            }
            crate::cluster::ClusterVerdict::Refused(reason) => Said::Refused(reason),
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

    /// A client that found every backend full (each said busy, or filled up between its grant
    /// and its connect), or the cluster full, or whose backend socket failed locally, waits
    /// again, at the head of the queue, with the deadline of its first wait; its global slot
    /// and its cluster claim go back meanwhile. One that never waited takes a place in the
    /// queue only if `max_queued` has room.
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
        // A place in the queue already had room for it.
        let bound = (origin.waited.is_none() && !waiter.allowed).then_some(live.config.max_queued);
        let entry = self.queue.reenter(
            guard.source(),
            waiter,
            (entered, live.config.queue_timeout),
            bound,
        );
        guard.release_global();
        // The queue is this host's own: the cluster is asked again once a slot is granted.
        guard.release_claim();
        match entry {
            Entered::Wait(ticket) => Opened::Requeue(Box::new(Waiting {
                client,
                guard,
                ticket,
                peer: origin.client,
                origin,
                live,
            })),
            Entered::Full => Opened::Refuse(client, origin, live, RejectReason::QueueFull),
            // Shut down meanwhile.
            _ => Opened::Refuse(client, origin, live, RejectReason::Draining),
        }
    }
    /// A backend greeted (with anything but a 4xx) `time` after the connect: its first words go
    /// to the client, then forwarding.
    async fn greeted(
        &self,
        (client, backend, guard, lease): (TcpStream, TcpStream, Guard, Lease),
        (first_words, kept, time): (Vec<u8>, usize, std::time::Duration),
        origin: &Origin,
    ) -> Opened {
        // A close without a word is no greeting to learn from.
        if !first_words.is_empty() {
            lease.member.greeted(time);
        }
        self.traffic.client_to_backend.increment(kept as u64);
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let relayed = forward::Relayed {
            client_to_backend: count(kept),
            backend_to_client: count(first_words.len()),
        };
        if !first_words.is_empty() {
            if greeting::write_all(&client, &first_words).await.is_err() {
                return Opened::Done;
            }
            self.traffic
                .backend_to_client
                .increment(first_words.len() as u64);
        }
        // Only when asked for: the address costs a system call.
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(
                source = %crate::reply::display_source(&guard.source()),
                backend = %lease.member.label,
                local = %backend.local_addr().map_or("-".into(), |a| a.to_string()),
                "session started"
            );
        }
        Opened::Ready(
            Ready {
                client,
                backend,
                guard,
                lease,
                peer: origin.client,
                waited_ms: origin
                    .waited
                    .map(|w| u32::try_from(w.as_millis()).unwrap_or(u32::MAX)),
            },
            relayed,
        )
    }
}

/// Moves what the client has sent and mxgate has not read into `early`, up to
/// [`MAX_EARLY_BYTES`] in all, without waiting; the rest stays in the socket, in order behind it.
fn take_available(client: &TcpStream, early: &mut Vec<u8>) {
    let mut buf = [0u8; 1024];
    while early.len() < MAX_EARLY_BYTES {
        let room = (MAX_EARLY_BYTES - early.len()).min(buf.len());
        match client.try_read(&mut buf[..room]) {
            Ok(0) | Err(_) => return,
            Ok(n) => early.extend_from_slice(&buf[..n]),
        }
    }
}

/// What became of a teased client's backend greeting.
enum Teased {
    /// A 2xx greeting, rewritten to end the teaser's reply.
    Greeted(Vec<u8>),
    /// The client spoke while the backend greeted: it failed the test and is refused.
    Spoke,
    /// The backend refused in its greeting (a 4xx or 5xx reply, kept whole).
    Refused(Vec<u8>),
    /// No SMTP greeting came: a close, silence, or something else.
    Unusable,
}

/// What a session's backend tries share.
struct Plan {
    /// The client's own address to connect from, in transparent mode.
    source: Option<SocketAddr>,
    /// How long a backend has to greet.
    greeting_limit: std::time::Duration,
    /// The backend sees the client's own address (transparent mode, a PROXY header): a 4xx
    /// may be about that client alone, and only Exchange's "system capacity" code is taken as
    /// the whole backend being full.
    client_seen: bool,
}

impl Plan {
    fn new(config: &Config, client: SocketAddr) -> Plan {
        let source = config.transparent.then(|| {
            let port = if config.transparent_port {
                client.port()
            } else {
                0
            };
            SocketAddr::new(client.ip().to_canonical(), port)
        });
        Plan {
            source,
            // Without a greeting timeout of its own, a backend has what RFC 5321 gives it.
            greeting_limit: config
                .backend_greeting_timeout
                .unwrap_or(crate::smtp::GREETING_TIMEOUT)
                .min(config.idle_timeout),
            client_seen: config.transparent || config.proxy_protocol.is_some(),
        }
    }
}

/// A busy (4xx) greeting absorbed: the signal booked to the backend (a `4.3.2`, or any 4xx
/// from a backend that cannot see the client's address, speaks of its capacity), then `QUIT`
/// and the close. A refusal of this client instead (a per-client limit of a backend that sees
/// its address) sets no ceiling, so the same backend would be picked and refuse again at
/// once, for as long as the client stays: it goes into `tried`, not asked again in this
/// session. With no other backend left, the client gets mxgate's backend-unavailable 421.
fn absorb_busy(
    (backend, lease): (TcpStream, Lease),
    words: &[u8],
    time: std::time::Duration,
    client_seen: bool,
    tried: &mut Vec<SocketAddr>,
) {
    tracing::debug!(backend = %lease.member.label, "backend busy; greeting absorbed");
    let capacity =
        !client_seen || crate::smtp::enhanced_code(words) == Some(crate::smtp::NOT_ACCEPTING);
    let about = if capacity {
        BusyAbout::Backend
    } else {
        BusyAbout::Client
    };
    lease.member.busy(time, about);
    if !capacity {
        tried.push(lease.member.addr);
    }
    greeting::quit(backend);
}
