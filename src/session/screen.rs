//! The pregreet test in a connection's life (`crate::pregreet` owns its pieces): the decision
//! in the accept loop, the teaser and the watch in the task, then the capacity (a global slot,
//! or the queue) for a client that passed. Also the answers a client gets once the teaser has
//! gone out: a failure's, under the configured action, and any later refusal's.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::origin::Origin;
use super::wait::{Waiting, MAX_EARLY_BYTES};
use super::Opened;
use crate::admission::{Global, Guard};
use crate::backend::greeting;
use crate::config::Pregreet;
use crate::gate::{Entry, Gate, Live};
use crate::pregreet::{Place, Verdict, Watched};
use crate::reason::{Refusal, RejectReason};

impl Gate {
    /// In the accept loop, without I/O: whether a new client is screened, and if so its
    /// per-source slots (the test holds no global slot) and its place under the test, or its
    /// refusal.
    /// `None`: the test does not apply (off, an allowed or denied source, a cached pass, or a
    /// cached failure under `ignore`; or every place under the test is taken, under `ignore`
    /// or a dry run), and admission goes on as before.
    ///
    /// The room is checked before the per-source limits: a client that finds it full is
    /// refused as `queue_full` even if its source is over its own limit too.
    ///
    /// The places (`pregreet_max_clients`) bound the clients that hold a descriptor and no
    /// slot while they are tested: without them, silent clients from many sources would take
    /// every descriptor. Past them, `enforce` and `drop` answer a new client with the
    /// global-limit 421 (`queue_full`, as a full queue does) before any teaser.
    pub(crate) fn screen_triage(
        &self,
        ip: IpAddr,
        live: &Live,
    ) -> Option<Result<(Guard, Place), Refusal>> {
        let action = live.replies.pregreet;
        if action == Pregreet::Off || live.policy.classify(ip).listing.is_some() {
            return None;
        }
        match self.pregreet.known(ip) {
            Some(Verdict::Fail) if action.refuses() => {
                return Some(Err(self.refusal_of(RejectReason::Pregreet, ip, live)));
            }
            Some(_) => return None,
            None => {}
        }
        let Some(place) = self.pregreet.place(live.config.pregreet.max_clients) else {
            if action.refuses() {
                return Some(Err(self.refusal_of(RejectReason::QueueFull, ip, live)));
            }
            // Untested, it is admitted (and a dry run's would-be refusals counted) as any
            // client is.
            return None;
        };
        match self.admission.admit_with(&live.policy, ip, Global::Leave) {
            Ok(admitted) => {
                if let Some(r) = admitted.would_reject {
                    self.metrics.would_reject(r).increment(1);
                    self.summary.record_dry_run(r, admitted.guard.source());
                }
                Some(Ok((admitted.guard, place)))
            }
            Err(refusal) => Some(Err(refusal)),
        }
    }

    /// The test itself, in the connection's task: the cluster's verdict after a local miss,
    /// else the teaser and the watch; then, for a client that may go on, its capacity. The
    /// client's `place` under the test is given back as soon as it has a verdict.
    pub(super) async fn screen(
        self: Arc<Self>,
        client: TcpStream,
        (guard, place): (Guard, Place),
        mut origin: Origin,
        live: Arc<Live>,
    ) -> Opened {
        let ip = origin.client.ip().to_canonical();
        let action = live.replies.pregreet;
        match self.pregreet.ask_cluster(ip).await {
            Some(Verdict::Fail) if action.refuses() => {
                drop((guard, place));
                self.reject(client, RejectReason::Pregreet, ip, &live).await;
                return Opened::Done;
            }
            Some(_) => {
                drop(place);
                return self.after_screen(client, guard, origin, live).await;
            }
            None => {}
        }
        if greeting::write_all(&client, &live.replies.teaser)
            .await
            .is_err()
        {
            return Opened::Done;
        }
        origin.teased = true;
        let config = &live.config.pregreet;
        // postscreen's "stress": anyone waiting for a slot.
        let wait = if self.queue.is_empty() {
            config.wait
        } else {
            config.wait_busy
        };
        let watched = if !origin.early.is_empty() {
            // Bytes behind an upstream's PROXY header came before the teaser: it spoke first.
            Some(Watched::Talked)
        } else {
            tokio::select! {
                w = crate::pregreet::watch(&client, wait, &mut origin.early, MAX_EARLY_BYTES) => Some(w),
                // Shutdown cut the wait short: no verdict either way; the drain's refusal
                // follows, after the greeting's completion.
                () = self.cut.cancelled() => None,
            }
        };
        // Tested: the place goes to the next client, whatever comes next for this one (its
        // answer, a slot, the queue, or the backend's greeting, which ends the test).
        drop(place);
        match watched {
            None => {}
            Some(Watched::Gone) => return Opened::Done,
            // Counted and cached when its greeting ends ([`Gate::greeting_ends`]).
            Some(Watched::Quiet) => origin.quiet = true,
            Some(Watched::Talked) if self.spoke(&mut origin, &live) => {
                drop(guard);
                self.answer_spoke(client, origin.early, ip, &live).await;
                return Opened::Done;
            }
            // Under `ignore` it goes on, tested no more.
            Some(Watched::Talked) => {}
        }
        self.after_screen(client, guard, origin, live).await
    }

    /// A client that may go on after the test: a global slot, or its place in the queue,
    /// then the backend as for any client.
    async fn after_screen(
        self: Arc<Self>,
        client: TcpStream,
        mut guard: Guard,
        origin: Origin,
        live: Arc<Live>,
    ) -> Opened {
        let ip = origin.client.ip().to_canonical();
        let entry = if self.draining.load(Ordering::Acquire) {
            Err(Refusal {
                reason: RejectReason::Draining,
                source: guard.source(),
            })
        } else if live.queues() {
            self.enter(guard, ip, false, &live)
        } else if live.policy.dry_run {
            // Dry run's admission took the global slot already.
            Ok(Entry::Now(guard, None))
        } else if let Some(slot) = self.admission.take_global(&live.policy, false) {
            guard.hold(slot);
            Ok(Entry::Now(guard, None))
        } else {
            Err(Refusal {
                reason: RejectReason::GlobalLimit,
                source: guard.source(),
            })
        };
        match entry {
            Ok(Entry::Now(guard, lease)) => {
                self.prepare(client, (guard, lease), origin, live).await
            }
            Ok(Entry::Wait(guard, ticket)) => Opened::Requeue(Box::new(Waiting {
                client,
                guard,
                ticket,
                peer: origin.client,
                origin,
                live,
            })),
            Err(refusal) => {
                self.answer(client, refusal, &origin, &live).await;
                Opened::Done
            }
        }
    }

    /// A client spoke after the teaser, before the greeting's end: logged (under `ignore`, its
    /// own per-source line) and remembered when the action refuses it. Returns whether it is
    /// refused (`enforce`, `drop`: [`Gate::answer_spoke`] answers and counts the refusal);
    /// under `ignore` it goes on, tested no more.
    pub(super) fn spoke(&self, origin: &mut Origin, live: &Live) -> bool {
        origin.talked = true;
        origin.quiet = false;
        self.failed_test(origin, live)
    }

    /// The failure of `origin`'s client, counted and (when the action refuses it) cached;
    /// returns whether it is refused.
    fn failed_test(&self, origin: &Origin, live: &Live) -> bool {
        let ip = origin.client.ip().to_canonical();
        let action = live.replies.pregreet;
        let source = live.policy.classify(ip).rule.source_key(ip);
        self.pregreet
            .failed(ip, &live.config.pregreet, action.refuses(), source);
        // Dry run serves it (the action in force is `ignore`), but counts what the configured
        // action would have done, as for every other reason.
        if live.config.dry_run && live.config.pregreet.action.refuses() {
            self.metrics
                .would_reject(RejectReason::Pregreet)
                .increment(1);
            self.summary.record_dry_run(RejectReason::Pregreet, source);
        }
        tracing::debug!(
            src = %ip,
            action = ?action,
            bytes = origin.early.len(),
            "pregreet: the client spoke before its turn"
        );
        action.refuses()
    }

    /// The answer to `ip`, refused for speaking first, counted: `drop`'s 521 and a close, or
    /// `enforce`'s greeting completed and 550 to every command (`heard` first) until QUIT.
    pub(super) async fn answer_spoke(
        &self,
        client: TcpStream,
        heard: Vec<u8>,
        ip: IpAddr,
        live: &Live,
    ) {
        let refusal = self.refusal_of(RejectReason::Pregreet, ip, live);
        self.closer
            .refuse_spoke(client, refusal, heard, &live.replies)
            .await
    }

    /// The backend's greeting has come whole for a teased client that has not spoken: one
    /// that stayed quiet through the pregreet wait, the queue and the greeting passes the
    /// test, counted and cached now.
    pub(super) fn greeting_ends(&self, origin: &mut Origin, live: &Live) {
        if std::mem::take(&mut origin.quiet) {
            let ip = origin.client.ip().to_canonical();
            self.pregreet.passed(ip, &live.config.pregreet);
        }
    }

    /// mxgate's own answer to `refusal`, counted: the reply line as always, or, once the
    /// teaser has gone out, the greeting completed (the test passed, if the client was quiet
    /// and its pass not yet counted) and the line at the client's first command.
    pub(super) async fn answer(
        &self,
        client: TcpStream,
        refusal: Refusal,
        origin: &Origin,
        live: &Live,
    ) {
        if origin.quiet {
            let ip = origin.client.ip().to_canonical();
            if origin.early.is_empty() {
                self.pregreet.passed(ip, &live.config.pregreet);
            } else if self.failed_test(origin, live) {
                // It spoke while a backend greeted (then failed, or said busy): a failure,
                // answered as one rather than with this refusal.
                self.answer_spoke(client, origin.early.clone(), ip, live)
                    .await;
                return;
            }
        }
        if origin.teased {
            let heard = origin.early.clone();
            self.closer
                .after_teaser(client, refusal, heard, &live.replies)
                .await
        } else {
            self.closer.refuse(client, refusal, &live.replies).await
        }
    }
}
