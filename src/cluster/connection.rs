//! The Redis link's lifecycle: connecting and registering, the lease refresh, and the
//! supervisor that starts over whenever Redis goes away.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Cluster, Link, Seen, Write, LOG_TARGET, UPKEEP_TIMEOUT};
use crate::config::redact;

/// Waits between reconnection tries: from the first to the longest.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Registrations tried in a row while clients keep being admitted alone meanwhile.
const REGISTER_ROUNDS: u32 = 3;
/// A connection that ends sooner than this after it was made is a flap: the next try waits,
/// longer each time up to a quarter of `lease_ttl`, so a Redis slower than
/// `admission_timeout` costs a few tries a lease rather than one per admission. Never longer:
/// an instance that waited past its lease would have its counts taken back while its
/// sessions live.
const STABLE: Duration = Duration::from_secs(30);

impl Cluster {
    /// Redis is unreachable, slow, or lost this instance's lease on connection `generation`:
    /// decide alone until the supervisor has registered again. A failure on an older
    /// connection than the current one changes nothing. Logged once per outage, and at most
    /// once a `LOG_EVERY`.
    pub(super) fn down(&self, generation: u64, why: &str) {
        {
            let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
            match &*conn {
                Some(link) if link.generation == generation => *conn = None,
                _ => return,
            }
        }
        let was = {
            let mut state = self.lock();
            std::mem::replace(&mut state.connected, false)
        };
        self.connected.store(false, Ordering::Release);
        if was {
            self.series.connected.set(0.0);
            self.series.disconnects.increment(1);
            // Alone, the share holds anyway; a new warm-up is learned at the next registration.
            self.set_warming(false);
            let mut outages = self.outages.lock().unwrap_or_else(|e| e.into_inner());
            if outages.may_log_down() {
                tracing::warn!(
                    target: LOG_TARGET,
                    redis = %redact(&self.config.redis),
                    reason = why,
                    fallback_share = self.config.fallback_share,
                    drops_not_logged = outages.quiet,
                    "cluster: Redis unreachable; enforcing the fallback share of each limit alone"
                );
                outages.quiet = 0;
            } else {
                outages.quiet += 1;
                tracing::debug!(target: LOG_TARGET, reason = why, "cluster: Redis dropped again");
            }
        }
        self.kick.notify_one();
    }

    /// Keeps the membership: connects, registers, refreshes the lease, and starts over
    /// whenever Redis goes away.
    pub(super) async fn supervise(self: Arc<Self>) {
        let longest = (self.config.lease_ttl / 4).max(RECONNECT_FIRST);
        let mut wait = RECONNECT_FIRST;
        let mut flap_wait = RECONNECT_FIRST;
        let mut up_since: Option<Instant> = None;
        let mut logged_unreachable = false;
        while !self.stop.is_cancelled() {
            if !self.connected() {
                if let Some(since) = up_since.take() {
                    if since.elapsed() < STABLE {
                        // It did not last: wait, longer each time, on the fallback share.
                        tokio::select! {
                            () = tokio::time::sleep(flap_wait) => {}
                            () = self.stop.cancelled() => return,
                        }
                        flap_wait = (flap_wait * 2).min(longest);
                    } else {
                        flap_wait = RECONNECT_FIRST;
                    }
                }
                match self.connect().await {
                    Ok(()) => {
                        wait = RECONNECT_FIRST;
                        logged_unreachable = false;
                        up_since = Some(Instant::now());
                        continue;
                    }
                    Err(e) => {
                        // Logged once an outage, unless a line saying so was the last one.
                        let log = !logged_unreachable && {
                            let mut outages =
                                self.outages.lock().unwrap_or_else(|e| e.into_inner());
                            if outages.said_down {
                                outages.may_log_down()
                            } else {
                                outages.logged = Some(Instant::now());
                                outages.said_down = true;
                                true
                            }
                        };
                        if log {
                            tracing::warn!(
                                target: LOG_TARGET,
                                redis = %redact(&self.config.redis),
                                error = %e,
                                "cluster: cannot reach Redis; enforcing the fallback share of each limit alone, retrying"
                            );
                        }
                        logged_unreachable = true;
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = self.stop.cancelled() => return,
                        }
                        wait = (wait * 2).min(RECONNECT_MAX).min(longest);
                        continue;
                    }
                }
            }
            // Refreshed early when the warm-up ends, so status and metrics show it then.
            let mut next = self.config.lease_ttl / 3;
            if self.warming() {
                next = next.min(*self.warm_left.lock().unwrap_or_else(|e| e.into_inner()));
            }
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = self.kick.notified() => continue,
                () = self.stop.cancelled() => return,
            }
            if self.connected() {
                self.refresh().await;
            }
        }
    }

    /// Connects, loads the scripts and registers this instance's live sessions; shared counts
    /// resume once Redis has them all.
    async fn connect(&self) -> Result<(), String> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(UPKEEP_TIMEOUT))
            .set_response_timeout(None);
        let mut conn = tokio::time::timeout(
            UPKEEP_TIMEOUT,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        // Loaded now, so an admission is one round trip from the first.
        for s in [
            &self.scripts.admit,
            &self.scripts.release,
            &self.scripts.refresh,
            &self.scripts.register,
            &self.scripts.leave,
        ] {
            tokio::time::timeout(UPKEEP_TIMEOUT, s.prepare_invoke().load_async(&mut conn))
                .await
                .map_err(|_| "loading the scripts timed out".to_string())?
                .map_err(|e| e.to_string())?;
        }
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(Link { generation, conn });
        for round in 1.. {
            if !self.register().await {
                let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
                if conn.as_ref().is_some_and(|l| l.generation == generation) {
                    *conn = None;
                }
                return Err("registration failed".into());
            }
            let mut state = self.lock();
            // Sessions admitted alone while the registration was on its way are not in it:
            // register again. Under a steady stream of clients that may never end, so after a
            // few rounds the few missing ones go in at the next refresh.
            let missing = state.fallback_since_snapshot > 0;
            let current = self
                .conn
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_some_and(|l| l.generation == generation);
            if !current {
                // A release on it failed meanwhile: it is gone.
                return Err("the connection failed while registering".into());
            }
            if !missing || round == REGISTER_ROUNDS {
                state.dirty |= missing || std::mem::take(&mut state.unanswered);
                state.connected = true;
                self.connected.store(true, Ordering::Release);
                drop(state);
                self.series.connected.set(1.0);
                // A recovery is logged when the last line said Redis was lost: the last line
                // logged stays true, and a flapping Redis logs two lines a minute at most.
                if std::mem::take(
                    &mut self
                        .outages
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .said_down,
                ) {
                    tracing::info!(
                        target: LOG_TARGET,
                        redis = %redact(&self.config.redis),
                        instance = %self.config.instance,
                        "cluster: connected; limits are shared"
                    );
                } else {
                    tracing::debug!(target: LOG_TARGET, "cluster: connected again");
                }
                return Ok(());
            }
        }
        unreachable!("the rounds end with a connection")
    }

    /// Sends this instance's counts whole, in order with the releases; true once Redis took
    /// them.
    async fn register(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.lock();
            state.epoch += 1;
            state.fallback_since_snapshot = 0;
            state.dirty = false;
            let counts = state.counts.iter().map(|(k, n)| (k.clone(), *n)).collect();
            if self
                .writes
                .send(Write::Register(state.epoch, counts, tx))
                .is_err()
            {
                return false;
            }
        }
        rx.await.unwrap_or(false)
    }

    /// Renews the lease and reads the cluster's figures; registers again if the copy in Redis
    /// may have drifted.
    async fn refresh(&self) {
        let Some(Link {
            generation,
            mut conn,
        }) = self.link()
        else {
            return;
        };
        let demand = self.demand(&self.lock());
        let mut call = self.scripts.refresh.prepare_invoke();
        call.arg(&self.prefix)
            .arg(&self.config.instance)
            .arg(self.config.lease_ttl.as_millis() as u64)
            .arg(&self.token)
            .arg(demand);
        let answer = tokio::time::timeout(
            UPKEEP_TIMEOUT,
            call.invoke_async::<(i64, u64, u64, u64)>(&mut conn),
        )
        .await;
        match answer {
            Ok(Ok((1, connections, instances, warm))) => self.saw(connections, instances, warm),
            Ok(Ok(_)) => {
                return self.down(
                    generation,
                    "this instance's lease had ended; registering again",
                )
            }
            Ok(Err(e)) => return self.down(generation, &format!("lease refresh failed: {e}")),
            Err(_) => return self.down(generation, "no answer to a lease refresh"),
        }
        let dirty = std::mem::take(&mut self.lock().dirty);
        if dirty && !self.register().await {
            self.down(generation, "registration failed");
        }
    }

    /// The figures an upkeep script answered with; `warm` is what is left of the warm-up, in
    /// ms.
    pub(super) fn saw(&self, connections: u64, instances: u64, warm: u64) {
        *self.warm_left.lock().unwrap_or_else(|e| e.into_inner()) = Duration::from_millis(warm);
        self.set_warming(warm > 0);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Seen {
            connections,
            instances,
        };
        self.series.connections.set(connections as f64);
        self.series.instances.set(instances as f64);
    }
}
