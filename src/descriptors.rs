//! The descriptor budget: how many file descriptors a config can hold open at once, checked
//! against `RLIMIT_NOFILE` at start-up, on reload and by `mxgate check`. A soft limit that
//! falls short is raised toward the hard one, as HAProxy does from its `maxconn`; a hard
//! limit that still falls short is warned about, with the numbers.
//!
//! This module only counts and raises the limit; it does not change the config.

use crate::config::Config;

/// Descriptors kept free beyond the count: log files, the journal socket, health checks, a
/// cluster's Redis connections, runtimes' own.
const MARGIN: u64 = 64;

/// What a config needs, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Two per session (client and backend).
    pub sessions: u64,
    /// One per waiting client.
    pub queue: u64,
    /// Refused clients lingering, and denied ones in their dialogue.
    pub lingering: u64,
    /// Connections waiting for a trusted upstream's PROXY header.
    pub headers: u64,
    /// Splice pipes, two descriptors each, at the pool's bound.
    pub pipes: u64,
    /// Listening sockets (one per worker and listener), their reserves, the metrics
    /// listener and its connections.
    pub listeners: u64,
    pub margin: u64,
}

impl Budget {
    /// The budget of `config`, served by `workers` threads.
    pub fn of(config: &Config, workers: usize) -> Budget {
        let loops = (config.listen.len() * workers) as u64;
        let metrics = config.metrics.map_or(0, |_| {
            2 + crate::status::accept::MAX_METRICS_CONNECTIONS as u64
        });
        let splice = !matches!(config.forwarding, crate::config::Forwarding::Copy);
        Budget {
            sessions: 2 * config.max_connections as u64,
            queue: config.max_queued as u64,
            lingering: (crate::reply::MAX_LINGERING + crate::reply::MAX_DENYING) as u64,
            headers: if config.accept_proxy_protocol.is_empty() {
                0
            } else {
                crate::gate::MAX_PENDING_HEADERS as u64
            },
            // Pipes are borrowed only for bulk, and fall back to copying when none is free:
            // counted at one per session, up to the pool's usual bound.
            pipes: if splice {
                2 * (config.max_connections as u64).min(1024)
            } else {
                0
            },
            // Each accept loop: a listener copy, its reserve and its lingering set's epoll.
            listeners: 3 * loops + metrics,
            margin: MARGIN,
        }
    }

    pub fn total(&self) -> u64 {
        self.sessions
            + self.queue
            + self.lingering
            + self.headers
            + self.pipes
            + self.listeners
            + self.margin
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} = sessions {} + queue {} + lingering {} + PROXY headers {} + pipes {} + \
             listeners {} + margin {}",
            self.total(),
            self.sessions,
            self.queue,
            self.lingering,
            self.headers,
            self.pipes,
            self.listeners,
            self.margin
        )
    }
}

/// The soft and hard `RLIMIT_NOFILE` (`None`: unlimited).
pub fn limits() -> (Option<u64>, Option<u64>) {
    let l = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    (l.current, l.maximum)
}

/// Raises the soft limit toward the hard one when it falls short of `budget` (only `raise`
/// does: `mxgate check` reports without changing its own process). Returns the warning when
/// the limit in force, after that, still falls short.
pub fn fit(budget: &Budget, raise: bool) -> Option<String> {
    let need = budget.total();
    let (soft, hard) = limits();
    if soft.is_none_or(|s| s >= need) {
        return None;
    }
    let target = hard.map_or(need, |h| h.min(need));
    if raise && soft.is_some_and(|s| s < target) {
        let set = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(target),
                maximum: hard,
            },
        );
        match set {
            Ok(()) => tracing::info!(
                from = soft,
                to = target,
                "raised the soft descriptor limit (RLIMIT_NOFILE) toward the hard one"
            ),
            Err(e) => tracing::debug!(error = %e, "cannot raise RLIMIT_NOFILE"),
        }
    }
    let now = limits().0.unwrap_or(u64::MAX);
    let reachable = if raise { now } else { target };
    (reachable < need).then(|| {
        format!(
            "the descriptor limit (RLIMIT_NOFILE soft {now}, hard {}) is below what this \
             config can hold open, {budget}: raise LimitNOFILE to at least {need}, or lower \
             max_connections or max_queued; until then a flood can run mxgate out of \
             descriptors, when waiting clients wait longer and new ones get the 421 at once",
            hard.map_or("unlimited".to_string(), |h| h.to_string()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_counts_two_per_session_and_one_per_waiter() {
        let mut c = Config::for_backend("127.0.0.1:25".parse().unwrap());
        c.max_connections = 20;
        c.max_queued = 2000;
        c.forwarding = crate::config::Forwarding::Copy;
        let b = Budget::of(&c, 2);
        assert_eq!((b.sessions, b.queue, b.pipes), (40, 2000, 0));
        assert_eq!(b.listeners, 3 * 2 + 34);
        assert_eq!(b.total(), 40 + 2000 + 1280 + 40 + MARGIN);
    }
}
