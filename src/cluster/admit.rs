//! Admission across the cluster: one script call to Redis while it answers in time, this
//! instance's fallback share of each limit otherwise.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

use super::{fallback_cap, Ask, Claim, Cluster, ClusterVerdict, Keys, Link, State};
use crate::reason::RejectReason;

impl Cluster {
    /// Admits one session across the cluster, or refuses it with the limit it hit. Redis
    /// decides while it answers within `admission_timeout`; otherwise this instance does,
    /// under its fallback share. Never refuses because Redis is down. A refusal for the
    /// global limit (or this host's share of it) paces this host's next asks
    /// ([`super::pace`]).
    pub async fn admit(self: &Arc<Self>, ask: &Ask) -> ClusterVerdict {
        let verdict = self.decide(ask).await;
        match &verdict {
            ClusterVerdict::Refused(RejectReason::GlobalLimit) => self.pace.refused(),
            ClusterVerdict::Admitted(..) => {
                if self.pace.admitted(self.wake.waiting()) {
                    self.wake.kick();
                }
            }
            ClusterVerdict::Refused(_) => {}
        }
        verdict
    }

    async fn decide(self: &Arc<Self>, ask: &Ask) -> ClusterVerdict {
        let keys = self.keys(ask);
        let link = if self.connected() { self.link() } else { None };
        // Counted here first, so a registration meanwhile includes it: drift over-counts.
        let (epoch, demand) = {
            let mut state = self.lock();
            state.add(&keys);
            (state.epoch, self.demand(&state))
        };
        let Some(link) = link else {
            return self.alone(keys, ask, epoch);
        };
        match self.ask_redis(link, ask, (epoch, demand)).await {
            Some((code, warming)) => self.settle(keys, ask, epoch, code, warming),
            None => self.alone(keys, ask, epoch),
        }
    }

    /// Redis's answer to one admission: its code and whether its counts are warming up, or
    /// `None` once the link has been taken down (the admission is then decided alone).
    async fn ask_redis(
        &self,
        link: Link,
        ask: &Ask,
        (epoch, demand): (u64, u64),
    ) -> Option<(i64, bool)> {
        let Link {
            generation,
            mut conn,
        } = link;
        // Releases this host sent before the client came: Redis may not have applied them yet.
        let released = self.releases_sent.load(Ordering::Acquire);
        let mut retried = false;
        loop {
            // Whether some were still pending as this admission was sent.
            let overtaking = self.releases_done.load(Ordering::Acquire) < released;
            let (code, warming) = self
                .invoke_admit(generation, &mut conn, ask, (epoch, demand))
                .await?;
            // Refused while a release from this host was still on its way: the admission
            // overtook it (releases go through the writer, admissions straight to Redis).
            // Ask once more after it has landed, so a slot freed here before the client came
            // is not refused to it.
            if code > 0
                && ask.enforce
                && overtaking
                && !retried
                && self.releases_landed(released).await
            {
                retried = true;
                continue;
            }
            return Some((code, warming));
        }
    }

    /// Runs the admission script once on connection `generation`, timed; a failure or a lost
    /// lease takes the link down and gives `None`.
    async fn invoke_admit(
        &self,
        generation: u64,
        conn: &mut MultiplexedConnection,
        ask: &Ask,
        (epoch, demand): (u64, u64),
    ) -> Option<(i64, bool)> {
        let started = Instant::now();
        let mut call = self.scripts.admit.prepare_invoke();
        call.arg(&self.prefix)
            .arg(&self.config.instance)
            .arg(ask.source.to_string())
            .arg(ask.source_cap.map_or(-1, |c| c as i64))
            .arg(ask.network.map_or(String::new(), |(b, _)| b.to_string()))
            .arg(ask.network.map_or(0, |(_, c)| c as i64))
            .arg(ask.global_cap as i64)
            .arg(if ask.enforce { 1 } else { 0 })
            .arg(&self.token)
            .arg(epoch)
            .arg(demand);
        let answer = tokio::time::timeout(
            self.config.admission_timeout,
            call.invoke_async::<(i64, i64, i64)>(conn),
        )
        .await;
        self.series
            .admission_seconds
            .record(started.elapsed().as_secs_f64());
        match answer {
            Ok(Ok((code, _total, warming))) if code >= 0 => Some((code, warming == 1)),
            Ok(Ok(_)) => {
                self.down(
                    generation,
                    "this instance's lease had ended; registering again",
                );
                None
            }
            Ok(Err(e)) => {
                self.down(generation, &format!("admission failed: {e}"));
                None
            }
            Err(_) => {
                self.lock().unanswered = true;
                self.down(
                    generation,
                    &format!(
                        "no answer to an admission within {} ms",
                        self.config.admission_timeout.as_millis()
                    ),
                );
                None
            }
        }
    }

    /// The verdict on Redis's answer: refused with the limit its code names, or admitted,
    /// held to the fallback share too while Redis's counts warm up.
    fn settle(
        self: &Arc<Self>,
        keys: Keys,
        ask: &Ask,
        epoch: u64,
        code: i64,
        warming: bool,
    ) -> ClusterVerdict {
        self.set_warming(warming);
        let reason = match code {
            1 => Some(RejectReason::SourceLimit),
            2 => Some(RejectReason::NetworkLimit),
            3 => Some(RejectReason::GlobalLimit),
            _ => None,
        };
        if let (Some(reason), true) = (reason, ask.enforce) {
            self.unclaim(&keys, epoch);
            return ClusterVerdict::Refused(reason);
        }
        let claim = Claim {
            cluster: self.clone(),
            keys,
            in_redis: true,
            epoch,
        };
        // Redis's counts may still miss instances that have not registered since it began:
        // the share holds too.
        let over = warming
            .then(|| self.over_share(&self.lock(), &claim.keys, ask))
            .flatten();
        match over {
            Some(over) if ask.enforce => {
                // Counted in Redis: the claim's drop gives it back there too.
                drop(claim);
                ClusterVerdict::Refused(over)
            }
            over => ClusterVerdict::Admitted(claim, reason.or(over)),
        }
    }

    /// Takes back a session counted here but refused by Redis. A registration since it was
    /// counted put it in Redis too, so Redis is told.
    fn unclaim(&self, keys: &Keys, epoch: u64) {
        let mut state = self.lock();
        state.remove(keys);
        if state.epoch != epoch {
            self.send_release(keys);
        }
    }

    /// The limit this instance's own sessions (the asking one already counted) exceed under
    /// `fallback_share` of each limit, if any.
    fn over_share(&self, state: &State, keys: &Keys, ask: &Ask) -> Option<RejectReason> {
        let share = |limit: usize| fallback_cap(limit, self.config.fallback_share);
        if ask
            .source_cap
            .is_some_and(|cap| state.count(&keys.source) > share(cap))
        {
            Some(RejectReason::SourceLimit)
        } else if let (Some((_, cap)), Some(key)) = (ask.network, &keys.network) {
            (state.count(key) > share(cap)).then_some(RejectReason::NetworkLimit)
        } else {
            None
        }
        .or_else(|| {
            (state.count(&keys.global) > share(ask.global_cap)).then_some(RejectReason::GlobalLimit)
        })
    }

    /// The decision without Redis: this instance's own sessions against `fallback_share` of
    /// each limit.
    fn alone(self: &Arc<Self>, keys: Keys, ask: &Ask, epoch: u64) -> ClusterVerdict {
        let mut state = self.lock();
        let over = self.over_share(&state, &keys, ask);
        if let (Some(reason), true) = (over, ask.enforce) {
            state.remove(&keys);
            if state.epoch != epoch {
                self.send_release(&keys);
            }
            return ClusterVerdict::Refused(reason);
        }
        state.fallback_since_snapshot += 1;
        if state.connected {
            // Redis came back while this was decided alone: it is missing from the copy.
            state.dirty = true;
        }
        drop(state);
        self.series.fallback_admissions.increment(1);
        ClusterVerdict::Admitted(
            Claim {
                cluster: self.clone(),
                keys,
                in_redis: false,
                epoch,
            },
            over,
        )
    }
}
