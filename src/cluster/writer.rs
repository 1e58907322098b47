//! The ordered write path to Redis: releases, batched, and registrations, whole, in the order
//! they were decided.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{Cluster, Keys, Link, LOG_TARGET, UPKEEP_TIMEOUT};

/// Releases sent in one script call at most.
const RELEASE_BATCH: usize = 512;

/// Writes that must reach Redis in the order they were decided.
pub(super) enum Write {
    Release(Vec<Arc<str>>),
    /// This host's demand only (its queue emptied): a release of no session.
    Demand,
    /// This instance's counts, whole; the answer says whether Redis took them.
    Register(u64, Vec<(Arc<str>, u64)>, oneshot::Sender<bool>),
}

impl Cluster {
    /// Queues one session's release; the writer sends it in order with registrations.
    pub(super) fn send_release(&self, keys: &Keys) {
        self.releases_sent.fetch_add(1, Ordering::AcqRel);
        let _ = self
            .writes
            .send(Write::Release(keys.iter().cloned().collect()));
    }

    /// Waits, at most `admission_timeout`, until the writer has dealt with the first
    /// `sent` releases; true once it has.
    pub(super) async fn releases_landed(&self, sent: u64) -> bool {
        let wait = async {
            loop {
                let flushed = self.flushed.notified();
                if self.releases_done.load(Ordering::Acquire) >= sent {
                    return;
                }
                flushed.await;
            }
        };
        tokio::time::timeout(self.config.admission_timeout, wait)
            .await
            .is_ok()
    }

    /// Applies the ordered writes: releases in batches, registrations whole. With no
    /// connection, a release is dropped: the next registration sends the truth anyway.
    pub(super) async fn writer(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Write>) {
        let mut next = None;
        loop {
            let write = match next.take() {
                Some(w) => w,
                None => tokio::select! {
                    biased;
                    () = self.stop.cancelled() => return,
                    w = rx.recv() => match w {
                        Some(w) => w,
                        None => return,
                    },
                },
            };
            let link = self.link();
            match write {
                Write::Release(keys) => next = self.release_batch(link, keys, &mut rx).await,
                Write::Demand => {
                    if let Some(link) = link {
                        self.release(link, &[]).await;
                    }
                }
                Write::Register(epoch, counts, answer) => {
                    let took = match link {
                        Some(link) => self.register_whole(link, epoch, &counts).await,
                        None => false,
                    };
                    let _ = answer.send(took);
                }
            }
        }
    }

    /// Sends one release with those queued right behind it, up to `RELEASE_BATCH` keys, and
    /// counts them dealt with; gives back the first other write it met.
    async fn release_batch(
        &self,
        link: Option<Link>,
        mut keys: Vec<Arc<str>>,
        rx: &mut mpsc::UnboundedReceiver<Write>,
    ) -> Option<Write> {
        let mut next = None;
        let mut sessions = 1;
        while keys.len() < RELEASE_BATCH {
            match rx.try_recv() {
                Ok(Write::Release(more)) => {
                    keys.extend(more);
                    sessions += 1;
                }
                // The batch carries the demand anyway.
                Ok(Write::Demand) => {}
                Ok(other) => {
                    next = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        if let Some(link) = link {
            self.release(link, &keys).await;
        }
        self.releases_done.fetch_add(sessions, Ordering::AcqRel);
        self.flushed.notify_waiters();
        next
    }

    /// Sends one batch of releases, with this host's demand as it is now.
    async fn release(&self, link: Link, keys: &[Arc<str>]) {
        let Link {
            generation,
            mut conn,
        } = link;
        let demand = self.demand(&self.lock());
        let mut call = self.scripts.release.prepare_invoke();
        call.arg(&self.prefix)
            .arg(&self.config.instance)
            .arg(&self.token)
            .arg(demand);
        for k in keys {
            call.arg(&**k);
        }
        let done = tokio::time::timeout(UPKEEP_TIMEOUT, call.invoke_async::<i64>(&mut conn)).await;
        match done {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => self.down(generation, &format!("release failed: {e}")),
            Err(_) => {
                self.lock().unanswered = true;
                self.down(generation, "no answer to a release");
            }
        }
    }

    /// Sends one registration of `epoch`, this instance's counts whole; true once Redis took
    /// them.
    async fn register_whole(&self, link: Link, epoch: u64, counts: &[(Arc<str>, u64)]) -> bool {
        let Link { mut conn, .. } = link;
        let mut call = self.scripts.register.prepare_invoke();
        call.arg(&self.prefix)
            .arg(&self.config.instance)
            .arg(self.config.lease_ttl.as_millis() as u64)
            .arg(&self.token)
            .arg(epoch);
        for (k, n) in counts {
            call.arg(&**k).arg(*n);
        }
        let done = tokio::time::timeout(
            UPKEEP_TIMEOUT,
            call.invoke_async::<(i64, u64, u64, u64)>(&mut conn),
        )
        .await;
        match done {
            Ok(Ok((0, connections, instances, warm))) => {
                self.saw(connections, instances, warm);
                true
            }
            Ok(Ok((-1, ..))) => {
                tracing::error!(
                    target: LOG_TARGET,
                    instance = %self.config.instance,
                    "cluster: another process holds a live lease under this instance name; \
                     give every host its own cluster.instance. Deciding alone until it ends"
                );
                false
            }
            Ok(Ok(_)) => false,
            Ok(Err(e)) => {
                tracing::debug!(target: LOG_TARGET, error = %e, "cluster: registration failed");
                false
            }
            Err(_) => {
                // It may still be applied late; the epoch makes Redis drop it then.
                self.lock().unanswered = true;
                false
            }
        }
    }
}
