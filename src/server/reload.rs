//! Reload: a new config swapped in for new connections, or refused with the old one left in
//! force. Sessions already forwarding are never touched by it, and settings that would need new
//! sockets, threads, a new forwarder or a new security check keep their old values.
//!
//! Also the limit gauges, which start-up and every reload set from the config in force.

use std::sync::Arc;

use crate::config::{keep_restart_only, Config};
use crate::metrics::Metrics;

use super::{preflight, Running};
use crate::gate::Live;

impl Running {
    /// Applies a reloaded config, or counts and logs why it could not be loaded. A failed
    /// reload leaves the old config in force. Returns whether the new config was applied.
    pub fn reload(&self, loaded: anyhow::Result<Config>) -> bool {
        let mut new = match loaded {
            Ok(c) => c,
            Err(e) => {
                self.reload_failed();
                tracing::error!(error = %format!("{e:#}"), "reload failed; the old config stays in force");
                return false;
            }
        };
        let old = self.gate.live.load_full();
        for key in keep_restart_only(&old.config, &mut new) {
            tracing::warn!(
                key,
                "reload cannot change this setting; the old value stays in force until a restart"
            );
        }
        // The descriptor budget is checked again (the caps that hold the limits to it are
        // recomputed), and a backend of a family transparent mode has not checked yet is
        // checked now.
        if let Err(e) = preflight(&mut new) {
            self.reload_failed();
            tracing::error!(error = %format!("{e:#}"), "reload failed; the old config stays in force");
            return false;
        }
        for warning in crate::config::warnings(&new, &self.listen_addrs) {
            tracing::warn!("{warning}");
        }
        let live = Live::build(
            new,
            Some(&old),
            old.policy.clock().clone(),
            &self.gate.metrics,
            &self.gate.wake,
        );
        set_limit_gauges(&self.gate.metrics, &live.config);
        let queues = live.queues();
        self.gate.live.store(Arc::new(live));
        if !queues {
            // The queue is off now (queue_timeout 0, max_connections 0, dry run): nobody is
            // left waiting for a turn that would never come in order.
            self.gate.queue.expire_all();
        }
        // A raised limit admits waiting clients at once.
        self.gate.wake.kick();
        self.reloads_ok.increment(1);
        self.gate.metrics.reloaded(true);
        self.gate.reloads.record(true);
        tracing::info!("config reloaded");
        true
    }

    fn reload_failed(&self) {
        self.reloads_failed.increment(1);
        self.gate.metrics.reloaded(false);
        self.gate.reloads.record(false);
    }
}

pub(super) fn set_limit_gauges(metrics: &Metrics, config: &Config) {
    metrics
        .limit_max_connections
        .set(config.max_connections as f64);
    metrics
        .limit_max_per_source
        .set(config.max_per_source as f64);
    // With the queue off, or no slot ever to wait for, nobody may wait.
    let max_queued = if config.queues() {
        config.max_queued
    } else {
        0
    };
    metrics.limit_max_queued.set(max_queued as f64);
    // With the test off, nobody is tested.
    let testing = if config.pregreet.action == crate::config::Pregreet::Off {
        0
    } else {
        config.pregreet.max_clients
    };
    metrics.limit_pregreet_max_clients.set(testing as f64);
    metrics
        .limit_reserved_for_allowed
        .set(config.reserved_for_allowed as f64);
    metrics.dry_run.set(if config.dry_run { 1.0 } else { 0.0 });
}
