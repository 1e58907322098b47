//! The server's background tasks: health checks, the wait queue's dispatcher, and
//! housekeeping (rejection summaries, rate-limiter eviction, metric upkeep). Each ends when the
//! server stops.

use crate::metrics;
use crate::policy::EVICT_INTERVAL;

use super::Running;

impl Running {
    /// Health-checks the backends of the config in force, at its interval, when it asks for it.
    pub(super) fn spawn_health_checks(&self) {
        let (gate, stop) = (self.gate.clone(), self.stop.clone());
        self.background.spawn(async move {
            loop {
                let interval = gate.live.load().config.health_interval;
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(interval) => {}
                }
                let live = gate.live.load_full();
                let c = &live.config;
                if c.health_checks {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = live.pool.check_all(c.connect_timeout, c.fall, c.rise) => {}
                    }
                }
            }
        });
    }

    /// The wait queue's one dispatcher: whenever a slot may have freed, hands out every slot
    /// there is, in the queue's order; at the next deadline, ends the waits that reached it;
    /// when a pause after a local failure ends, looks again. In a cluster that said full, it
    /// also looks at each turn of the waiters to ask it.
    pub(super) fn spawn_queue_dispatcher(&self) {
        let (gate, stop) = (self.gate.clone(), self.stop.clone());
        self.background.spawn(async move {
            let mut next: Option<std::time::Instant> = None;
            loop {
                let deadline = next.map(tokio::time::Instant::from_std);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = gate.wake.notified() => {}
                    () = sleep_until_some(deadline) => {}
                }
                let live = gate.live.load_full();
                // The queue's only dispatcher must outlive a bug in one turn: a panic here
                // would leave every waiter unserved until its client gave up. This relies on
                // `panic = "unwind"` (Cargo.toml's profiles keep it): under `abort`,
                // catch_unwind catches nothing and the process ends.
                let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    gate.queue.serve(|waiter| gate.capacity(&live, waiter));
                    let expiry = gate.queue.expire(std::time::Instant::now());
                    let Some(cluster) = &gate.cluster else {
                        return expiry;
                    };
                    cluster.queue_changed();
                    // A full cluster: the next waiter asks it at its turn.
                    let ask = cluster.next_ask().filter(|_| !gate.queue.is_empty());
                    expiry.into_iter().chain(ask).min()
                }));
                next = match turn {
                    // A pause after a local failure ends with a look of its own.
                    Ok(next) => match gate.local.paused_until().map(|t| t.into_std()) {
                        Some(resume) => Some(next.map_or(resume, |n| n.min(resume))),
                        None => next,
                    },
                    Err(_) => {
                        tracing::error!("the wait queue's dispatcher panicked; it goes on");
                        Some(std::time::Instant::now() + std::time::Duration::from_secs(1))
                    }
                };
            }
        });
    }

    /// Writes the learned backend limits to `state_dir` every few seconds while they change.
    pub(super) fn spawn_state_keeper(&self) {
        let Some(keeper) = self.keeper.clone() else {
            return;
        };
        let (gate, stop) = (self.gate.clone(), self.stop.clone());
        self.background.spawn(async move {
            let mut tick = tokio::time::interval(crate::backend::state::SAVE_INTERVAL);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let limits = gate.live.load().pool.learned_limits();
                if !limits.is_empty() {
                    keeper.keep(limits);
                }
            }
        });
    }

    pub(super) fn spawn_housekeeping(&self) {
        let (gate, stop) = (self.gate.clone(), self.stop.clone());
        self.background.spawn(async move {
            let mut summary = tokio::time::interval(crate::reply::SUMMARY_INTERVAL);
            let mut evict = tokio::time::interval(EVICT_INTERVAL);
            let mut upkeep = tokio::time::interval(metrics::UPKEEP_INTERVAL);
            let mut pregreet = tokio::time::interval(crate::pregreet::store::SAVE_INTERVAL);
            pregreet.tick().await;
            summary.tick().await;
            evict.tick().await;
            upkeep.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = summary.tick() => {
                        gate.summary.flush();
                        gate.sources.flush();
                        gate.pregreet.flush_ignored();
                        gate.metrics.sources_refused.set(gate.sources.refused_sources() as f64);
                    }
                    _ = upkeep.tick() => gate.metrics.upkeep(),
                    _ = pregreet.tick() => {
                        gate.pregreet.sweep();
                        if gate.pregreet.keeps_state() {
                            let screen = gate.pregreet.clone();
                            // A file of up to MAX_ENTRIES lines: off the workers' threads.
                            let _ = tokio::task::spawn_blocking(move || screen.save()).await;
                        }
                    }
                    _ = evict.tick() => {
                        for limit in gate.live.load().policy.rate_limits() {
                            limit.evict();
                        }
                    }
                }
            }
        });
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
