//! The descriptor budget: how many file descriptors a config can hold open at once, checked
//! against `RLIMIT_NOFILE` at start-up, on reload and by `mxgate check`. A soft limit that
//! falls short is raised toward the hard one, as HAProxy does from its `maxconn`; a hard
//! limit that still falls short is warned about, with the numbers, and `max_connections`,
//! `max_queued` and `pregreet_max_clients` are held to what fits under it ([`caps`]), so that
//! a client granted a slot always has its backend descriptor.

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
    /// One per client under the pregreet test.
    pub screening: u64,
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
            screening: if config.pregreet.action == crate::config::Pregreet::Off {
                0
            } else {
                config.pregreet.max_clients as u64
            },
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
            + self.screening
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
            "{} = sessions {} + queue {} + pregreet test {} + lingering {} + PROXY headers {} + \
             pipes {} + listeners {} + margin {}",
            self.total(),
            self.sessions,
            self.queue,
            self.screening,
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

/// The limits held while the descriptor limit cannot hold what the config asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub max_connections: usize,
    pub max_queued: usize,
    pub pregreet_max_clients: usize,
}

/// A descriptor limit short of a config's budget: what it is, and the caps that fit under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub budget: Budget,
    /// The soft limit in force.
    pub soft: u64,
    pub hard: Option<u64>,
    /// `max_connections`, `max_queued` and `pregreet_max_clients` held to what fits under the
    /// reachable limit.
    pub caps: Caps,
}

impl Shortfall {
    /// Holds `config`'s admission and queue to the caps; the caller logs the warning.
    pub fn apply(&self, config: &mut Config) {
        config.max_connections = self.caps.max_connections;
        config.max_queued = self.caps.max_queued;
        config.pregreet.max_clients = self.caps.pregreet_max_clients;
    }
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The pregreet test's room is named only while the test is on (and counted).
        let (held, lower) = if self.budget.screening == 0 {
            (
                format!(
                    "max_connections is held at {} and max_queued at {}",
                    self.caps.max_connections, self.caps.max_queued
                ),
                "max_connections or max_queued",
            )
        } else {
            (
                format!(
                    "max_connections is held at {}, max_queued at {} and pregreet_max_clients \
                     at {}",
                    self.caps.max_connections, self.caps.max_queued, self.caps.pregreet_max_clients
                ),
                "max_connections, max_queued or pregreet_max_clients",
            )
        };
        write!(
            f,
            "the descriptor limit (RLIMIT_NOFILE soft {}, hard {}) is below what this config \
             can hold open, {}: until it is raised, {held}, so that a client granted a slot \
             has its backend descriptor; raise LimitNOFILE to at least {}, or lower {lower}",
            self.soft,
            self.hard.map_or("unlimited".to_string(), |h| h.to_string()),
            self.budget,
            self.budget.total(),
        )
    }
}

/// `max_connections`, `max_queued` and `pregreet_max_clients` held to what fits under `limit`
/// descriptors. The listeners, PROXY-header waits and the margin come first; the refused
/// clients lingering get at most a quarter of the rest (past their share they are closed
/// sooner, or wait in the backlog); sessions (two descriptors, and a pipe's two when splicing)
/// at most half of what is left, and the queue and the pregreet test the remainder, in
/// proportion to what each asks for. A waiter granted a slot then finds its backend
/// descriptor free: every waiter's, tested client's and session's descriptors are counted.
pub fn caps(config: &Config, budget: &Budget, limit: u64) -> Caps {
    let rest = limit.saturating_sub(budget.headers + budget.listeners + budget.margin);
    let room = rest - budget.lingering.min(rest / 4);
    let per_session = if budget.pipes > 0 { 4 } else { 2 };
    let configured = config.max_connections as u64;
    // Never 0 from a nonzero limit: 0 would refuse everyone.
    let sessions = configured
        .min(room / 2 / per_session)
        .max(configured.min(1));
    let left = room.saturating_sub(sessions * per_session);
    let (queue, screening) = (config.max_queued as u64, budget.screening);
    let (queue, screening) = if queue + screening <= left {
        (queue, screening)
    } else {
        let queue = left * queue / (queue + screening);
        (queue, left - queue)
    };
    Caps {
        max_connections: sessions as usize,
        max_queued: queue as usize,
        // With the test off it is not counted: kept as configured. Never 0 from a nonzero
        // room, as for sessions: under drop or enforce, 0 would refuse every new client.
        pregreet_max_clients: if budget.screening == 0 {
            config.pregreet.max_clients
        } else {
            screening.max(budget.screening.min(1)) as usize
        },
    }
}

/// Raises the soft limit toward the hard one when it falls short of the budget of `config`
/// served by `workers` threads (only `raise` does: `mxgate check` reports without changing
/// its own process). Returns the shortfall, with the caps that fit, when the limit that can
/// be reached still falls short.
pub fn fit(config: &Config, workers: usize, raise: bool) -> Option<Shortfall> {
    let budget = Budget::of(config, workers);
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
    (reachable < need).then(|| Shortfall {
        budget,
        soft: now,
        hard,
        caps: caps(config, &budget, reachable),
    })
}

#[cfg(test)]
mod tests;
