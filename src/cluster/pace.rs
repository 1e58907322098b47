//! When this host's waiting clients may ask the cluster for a slot: at once while the cluster
//! has room; one at a time, every [`ASK_EVERY`], once it has said full.
//!
//! A client the cluster finds full goes back to wait in this host's own queue, holding no
//! local slot (`session::open`). The queue's dispatcher grants its slots only when [`Pace`]
//! says a client may ask, so a full cluster costs one admission script per host per
//! `ASK_EVERY`, not one per waiter; and the waiter asks in the queue's own order (fair between
//! sources, first come first served within one). Every host's waiters ask at the same steady
//! pace, so none loses the race for a freed slot to another host's backoff; which host is
//! entitled to it is the admission script's max-min share (`script::ADMIT`).
//!
//! Once a client is admitted while the cluster was full, the next in line asks at once, and so
//! on until one is refused (full again) or nobody waits (the cluster has room). A session that
//! ends here lets the next in line ask at once too: the slot it freed is this host's to take
//! back if its share allows.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How often a host whose cluster is full lets one waiter ask again. Short against a session
/// (a freed slot stays idle this long at most), long against a script (about 20 µs of Redis's
/// time each).
pub const ASK_EVERY: Duration = Duration::from_millis(20);

/// Whether and when this host's waiters may ask the cluster.
#[derive(Default)]
pub(super) struct Pace {
    state: Mutex<PaceState>,
}

#[derive(Default)]
struct PaceState {
    /// The cluster refused a client for its global limit, and has admitted none since with
    /// nobody left waiting: asks are paced.
    full: bool,
    /// While full: when the next client may ask.
    next: Option<Instant>,
    /// A session of this host ended since the last ask went out: a refusal of that ask may
    /// not have seen the slot it freed, so the next client asks at once.
    freed_since_ask: bool,
}

impl Pace {
    fn lock(&self) -> std::sync::MutexGuard<'_, PaceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a client may ask now; if it may while the cluster is full, the next one may
    /// only after [`ASK_EVERY`] (unless this one is admitted).
    pub(super) fn may_ask(&self) -> bool {
        let mut s = self.lock();
        if !s.full {
            return true;
        }
        let now = Instant::now();
        match s.next {
            Some(next) if next > now => false,
            _ => {
                s.next = Some(now + ASK_EVERY);
                s.freed_since_ask = false;
                true
            }
        }
    }

    /// When the next client may ask, while the cluster is full.
    pub(super) fn next(&self) -> Option<Instant> {
        let s = self.lock();
        s.full.then_some(s.next).flatten()
    }

    /// The cluster refused a client for its global limit. The next asks after [`ASK_EVERY`],
    /// or at once if a session here ended while this one was asking (the slot it freed would
    /// otherwise stay idle for a whole interval).
    pub(super) fn refused(&self) {
        let mut s = self.lock();
        let now = Instant::now();
        s.next = Some(if s.full && s.freed_since_ask {
            now
        } else {
            now + ASK_EVERY
        });
        s.full = true;
        s.freed_since_ask = false;
    }

    /// The cluster admitted a client: the next in line asks at once; with nobody waiting, the
    /// cluster has room again. True when a waiter may ask now (the dispatcher is to look).
    pub(super) fn admitted(&self, waiting: usize) -> bool {
        let mut s = self.lock();
        if !s.full {
            return false;
        }
        if waiting == 0 {
            *s = PaceState::default();
        } else {
            s.next = Some(Instant::now());
        }
        true
    }

    /// A session of this host ended: the next in line may ask at once.
    pub(super) fn freed(&self) {
        let mut s = self.lock();
        if s.full {
            s.next = Some(Instant::now());
            s.freed_since_ask = true;
        }
    }
}

#[cfg(test)]
mod tests;
