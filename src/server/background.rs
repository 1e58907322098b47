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

    /// The wait queue's one dispatcher ([`crate::gate::Gate::dispatch`]).
    pub(super) fn spawn_queue_dispatcher(&self) {
        let (gate, stop) = (self.gate.clone(), self.stop.clone());
        self.background
            .spawn(async move { gate.dispatch(stop).await });
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
