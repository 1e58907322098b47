//! The live view: who holds the slots, who is being refused, and how the backends are, right
//! now. One [`Snapshot`] feeds every form of it:
//!
//! | form | module |
//! | --- | --- |
//! | `/status` (JSON), `/` (the HTML page) and `/metrics`, on the metrics listener | `http`, its accept loop `accept` |
//! | `mxgate status`, tables for a person or the raw JSON | `client` |
//! | the systemd `STATUS=` line | [`Snapshot::status_line`] |
//!
//! A snapshot is taken only when asked for: nothing on the connection path pays for the view.
//! It names client addresses, so the `status` key turns `/status` and the page off.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::backend::Member;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::gate::{Gate, Reloads};
use crate::metrics::unix_now;
use crate::reply::display_source;

pub mod accept;
pub mod client;
pub mod http;

/// How many sources each "top" table lists.
pub const TOP: usize = 20;

/// What `/status` shows of the reloads, from the gate's record of them.
fn reload_view(reloads: &Reloads) -> ReloadView {
    let last = reloads.last();
    ReloadView {
        loaded_at: unix_seconds(last.loaded),
        last_successful: last.ok,
        reloads: last.reloads,
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Everything the view shows, as `/status` serves it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub version: String,
    /// Unix seconds when this snapshot was taken.
    pub time: f64,
    pub reload: ReloadView,
    pub limits: Limits,
    /// Admitted sessions open now.
    pub active: usize,
    /// The most open at once since start.
    pub active_max: usize,
    /// Clients waiting in the queue, without a greeting yet: for a slot of this host, or
    /// (in a cluster) for one of the cluster's.
    pub queued: usize,
    /// How long the longest waiting client has waited so far, in seconds (0 with nobody
    /// waiting): its deadline's distance from the `queue_timeout` in force.
    #[serde(default)]
    pub queued_longest_seconds: f64,
    /// Distinct sources with a session open or waiting.
    pub sources: usize,
    /// The sources holding the most sessions (waiting ones included), most first.
    pub top_sources: Vec<SourceSessions>,
    /// The sources refused most in the last minute, most first.
    pub top_refused: Vec<SourceRefused>,
    pub backends: Vec<BackendView>,
    /// The shared limits, when this instance is in a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterView>,
    /// The pregreet test's cache, while the test is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pregreet: Option<PregreetView>,
}

/// The pregreet test's action and its cache's live verdicts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PregreetView {
    /// `ignore`, `enforce` or `drop`.
    pub action: String,
    /// Sources remembered as passed, and as failed.
    pub cached_pass: usize,
    pub cached_fail: usize,
    /// Clients under the test now, and the most there may be (`pregreet_max_clients`).
    #[serde(default)]
    pub testing: usize,
    #[serde(default)]
    pub max_clients: usize,
}

/// This instance's membership in a cluster, and the counts as Redis sees them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClusterView {
    pub name: String,
    pub instance: String,
    /// Whether Redis decides admissions now (false: the fallback share does).
    pub connected: bool,
    /// Whether Redis's counts are younger than one lease, so this instance also holds to its
    /// fallback share.
    #[serde(default)]
    pub warming: bool,
    pub fallback_share: f64,
    /// This instance's sessions, as counted for the cluster.
    pub local_sessions: usize,
    /// Sessions across the cluster, as Redis counted them at the last lease refresh.
    pub cluster_sessions: u64,
    /// Instances with a live lease.
    pub instances: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReloadView {
    /// Unix seconds when the config in force was loaded (the last successful reload, or the
    /// start).
    pub loaded_at: f64,
    /// Whether the last reload tried succeeded; `true` before any.
    pub last_successful: bool,
    /// Reloads tried since start.
    pub reloads: u64,
}

/// The limits in force. 0 means "no limit" for the counts, as in the config.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_per_source: usize,
    pub reserved_for_allowed: usize,
    /// The most that may wait; 0 while the queue is off.
    pub max_queued: usize,
    pub queue_timeout_seconds: f64,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    pub dry_run: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SourceSessions {
    pub source: String,
    pub sessions: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SourceRefused {
    pub source: String,
    pub refusals: u64,
    /// By reason, most first.
    pub reasons: Vec<ReasonCount>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReasonCount {
    pub reason: String,
    pub count: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackendView {
    /// As configured.
    pub address: String,
    pub up: bool,
    pub backup: bool,
    pub active: usize,
    /// The sessions it may take: fixed or learned; `None` without a cap of its own.
    pub limit: Option<usize>,
    /// Whether `limit` is learned (`max_connections = "auto"`).
    pub learned: bool,
    /// A learned limit's growth: `slow start` or `steady`.
    #[serde(default)]
    pub phase: Option<String>,
    /// Whether a learned limit was resumed from the state an earlier run kept.
    #[serde(default)]
    pub resumed: bool,
    pub last_check: Option<CheckView>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckView {
    /// `passed`, `failed`, `busy` (a 4xx greeting: full, not down) or `not_started`.
    pub result: String,
    pub seconds_ago: f64,
}

impl Snapshot {
    /// The view of `gate` now.
    pub fn take(gate: &Gate) -> Snapshot {
        let live = gate.live.load();
        let limits = Limits::of(&live.config);
        let top_sources = top_sources(gate);
        let top_refused = top_refused(gate);
        let backends = live
            .pool
            .members()
            .iter()
            .map(|m| BackendView::of(m))
            .collect();
        Snapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            time: unix_now(),
            reload: reload_view(&gate.reloads),
            limits,
            active: gate.admission.active(),
            active_max: gate.admission.peak(),
            queued: gate.queue.len(),
            queued_longest_seconds: longest_wait(gate, live.config.queue_timeout),
            sources: gate.admission.sources(),
            top_sources,
            top_refused,
            backends,
            cluster: gate.cluster.as_ref().map(|c| ClusterView::of(c)),
            pregreet: (live.replies.pregreet != crate::config::Pregreet::Off).then(|| {
                let counts = gate.pregreet.counts();
                PregreetView {
                    action: format!("{:?}", live.replies.pregreet).to_lowercase(),
                    cached_pass: counts.pass,
                    cached_fail: counts.fail,
                    testing: gate.pregreet.testing(),
                    max_clients: live.config.pregreet.max_clients,
                }
            }),
        }
    }

    /// The one-line summary for systemd's `STATUS=`, as `systemctl status` shows it:
    /// `412/1000 sessions, 3 waiting, 2/2 backends up`.
    pub fn status_line(&self) -> String {
        Line {
            active: self.active,
            max: self.limits.max_connections,
            queued: self.queued,
            up: self.backends.iter().filter(|b| b.up).count(),
            backends: self.backends.len(),
            dry_run: self.limits.dry_run,
        }
        .to_string()
    }
}

/// How long the longest waiting client has waited, in seconds.
fn longest_wait(gate: &Gate, timeout: std::time::Duration) -> f64 {
    gate.queue.soonest_deadline().map_or(0.0, |deadline| {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        timeout.saturating_sub(left).as_secs_f64()
    })
}

/// The sources holding the most sessions, most first.
fn top_sources(gate: &Gate) -> Vec<SourceSessions> {
    gate.admission
        .top_sources(TOP)
        .into_iter()
        .map(|(s, n)| SourceSessions {
            source: display_source(&s),
            sessions: n,
        })
        .collect()
}

/// The sources refused most in the last minute, most first.
fn top_refused(gate: &Gate) -> Vec<SourceRefused> {
    gate.sources
        .top(TOP)
        .into_iter()
        .map(|r| SourceRefused {
            source: display_source(&r.source),
            refusals: r.total,
            reasons: r
                .reasons
                .into_iter()
                .map(|(reason, count)| ReasonCount {
                    reason: reason.label().to_string(),
                    count,
                })
                .collect(),
        })
        .collect()
}

impl Limits {
    /// The limits `c` puts in force; the queue's count as 0 while it is off.
    fn of(c: &Config) -> Limits {
        let queue_on = c.queues();
        Limits {
            max_connections: c.max_connections,
            max_per_source: c.max_per_source,
            reserved_for_allowed: c.reserved_for_allowed,
            max_queued: if queue_on { c.max_queued } else { 0 },
            queue_timeout_seconds: if queue_on {
                c.queue_timeout.as_secs_f64()
            } else {
                0.0
            },
            ipv4_prefix: c.ipv4_prefix,
            ipv6_prefix: c.ipv6_prefix,
            dry_run: c.dry_run,
        }
    }
}

impl BackendView {
    fn of(m: &Member) -> BackendView {
        BackendView {
            address: m.label.clone(),
            up: m.is_up(),
            backup: m.is_backup(),
            active: m.active(),
            limit: m.limit(),
            learned: m.is_auto(),
            phase: m.learning().map(|(p, _)| p.label().to_string()),
            resumed: m.learning().is_some_and(|(_, r)| r),
            last_check: m.last_check().map(|(ago, r)| CheckView {
                result: r.label().to_string(),
                seconds_ago: ago.as_secs_f64(),
            }),
        }
    }
}

impl ClusterView {
    fn of(c: &Cluster) -> ClusterView {
        let seen = c.seen();
        ClusterView {
            name: c.config().name.clone(),
            instance: c.config().instance.clone(),
            connected: c.connected(),
            warming: c.warming(),
            fallback_share: c.config().fallback_share,
            local_sessions: c.local_sessions(),
            cluster_sessions: seen.connections,
            instances: seen.instances,
        }
    }
}

/// What the `STATUS=` line says, taken without a whole snapshot: it is sent every few
/// seconds, and the top lists need a walk over every source.
pub struct Line {
    pub active: usize,
    pub max: usize,
    pub queued: usize,
    pub up: usize,
    pub backends: usize,
    pub dry_run: bool,
}

impl Line {
    pub fn take(gate: &Gate) -> Line {
        let live = gate.live.load();
        let members = live.pool.members();
        Line {
            active: gate.admission.active(),
            max: live.config.max_connections,
            queued: gate.queue.len(),
            up: members.iter().filter(|m| m.is_up()).count(),
            backends: members.len(),
            dry_run: live.config.dry_run,
        }
    }
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.max {
            0 => write!(f, "{} sessions", self.active)?,
            max => write!(f, "{}/{max} sessions", self.active)?,
        }
        write!(
            f,
            ", {} waiting, {}/{} backends up",
            self.queued, self.up, self.backends
        )?;
        if self.dry_run {
            f.write_str(", dry run")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
