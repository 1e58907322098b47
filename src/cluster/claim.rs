//! The bookkeeping of clustered sessions: what an admission asks for ([`Ask`]), its count keys,
//! the [`Claim`] a session holds, and this instance's own counts ([`State`]).

use std::collections::HashMap;
use std::sync::Arc;

use ipnet::IpNet;

use super::Cluster;

/// What one clustered admission asks for: the keys admission decided with and their limits.
#[derive(Clone, Copy, Debug)]
pub struct Ask {
    pub source: IpNet,
    /// `None` for an allowed source, which has no per-source limit (it is still counted).
    pub source_cap: Option<usize>,
    /// The network block and its cap, when the source's rule caps blocks.
    pub network: Option<(IpNet, usize)>,
    pub global_cap: usize,
    /// False in a dry run: counted whatever the outcome, the first failure reported.
    pub enforce: bool,
}

/// The full Redis names of one session's count keys.
#[derive(Clone, Debug)]
pub(super) struct Keys {
    pub(super) global: Arc<str>,
    pub(super) source: Arc<str>,
    pub(super) network: Option<Arc<str>>,
}

impl Keys {
    pub(super) fn iter(&self) -> impl Iterator<Item = &Arc<str>> {
        [
            Some(&self.global),
            Some(&self.source),
            self.network.as_ref(),
        ]
        .into_iter()
        .flatten()
    }
}

/// One session's place in the cluster's counts. Dropping it gives the place back, in the
/// background: the client is never delayed by its release.
#[must_use = "dropping the claim gives the session's place back at once"]
pub struct Claim {
    pub(super) cluster: Arc<Cluster>,
    pub(super) keys: Keys,
    /// Whether Redis counted it at admission (not a fallback admission).
    pub(super) in_redis: bool,
    /// The registration it was admitted under: a later one counted it in Redis too.
    pub(super) epoch: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut state = self.cluster.lock();
        state.remove(&self.keys);
        if self.in_redis || self.epoch != state.epoch {
            // Sent under the lock, so it is ordered with the registrations.
            self.cluster.send_release(&self.keys);
        }
        drop(state);
        self.cluster.pace.freed();
    }
}

/// This instance's own sessions: the truth that Redis holds a copy of.
#[derive(Default)]
pub(super) struct State {
    /// Sessions per full count key, admissions still in flight included.
    pub(super) counts: HashMap<Arc<str>, u64>,
    /// Bumped at each registration.
    pub(super) epoch: u64,
    /// Whether Redis decides admissions now.
    pub(super) connected: bool,
    /// Fallback admissions since the last registration's snapshot: they are not in Redis.
    pub(super) fallback_since_snapshot: usize,
    /// The copy in Redis may have drifted: register again at the next refresh.
    pub(super) dirty: bool,
    /// A script went unanswered since the last registration: Redis may still run it late,
    /// on the old connection, after the next registration; the refresh after it corrects that.
    pub(super) unanswered: bool,
}

impl State {
    pub(super) fn add(&mut self, keys: &Keys) {
        for k in keys.iter() {
            *self.counts.entry(k.clone()).or_insert(0) += 1;
        }
    }

    pub(super) fn remove(&mut self, keys: &Keys) {
        for k in keys.iter() {
            if let Some(n) = self.counts.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(k);
                }
            }
        }
    }

    pub(super) fn count(&self, key: &Arc<str>) -> usize {
        self.counts.get(key).copied().unwrap_or(0) as usize
    }
}
