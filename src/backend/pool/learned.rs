//! The pool's side of keeping learned limits across a restart: what each learned backend
//! would keep, and resuming from what an earlier run kept.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::super::limit::{Learned, LimitPhase, Saved};
use super::{Member, Pool};

impl Member {
    /// What a restart would keep of this backend's learned limit; `None` for a fixed one.
    pub fn saved(&self) -> Option<Saved> {
        self.learned().as_ref().map(Learned::saved)
    }

    /// The learned limit's phase and whether it was resumed from a restart's state, for the
    /// live view; `None` for a fixed limit.
    pub fn learning(&self) -> Option<(LimitPhase, bool)> {
        self.learned().as_ref().map(|l| (l.phase(), l.resumed()))
    }

    /// Resumes the learned limit from what a restart kept, within `min..=max`.
    fn resume(&self, saved: &Saved, min: usize, max: usize) {
        let mut learned = self.learned();
        let Some(l) = learned.as_mut() else { return };
        *l = Learned::resume(min, max, saved);
        let (limit, allowed) = (l.limit(), l.allowed());
        self.limit.store(allowed, Ordering::Relaxed);
        drop(learned);
        self.m_limit.set(limit as f64);
        tracing::info!(backend = %self.label, limit, phase = %saved.phase.label(), "learned backend limit resumed");
        self.wake.freed();
    }
}

impl Pool {
    /// The addresses, as configured, of the backends whose limit is learned.
    pub fn learned_backends(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.is_auto())
            .map(|m| m.label.clone())
            .collect()
    }

    /// What a restart would keep, by backend address as configured.
    pub fn learned_limits(&self) -> BTreeMap<String, Saved> {
        self.members
            .iter()
            .filter_map(|m| Some((m.label.clone(), m.saved()?)))
            .collect()
    }

    /// Resumes every learned backend found in `limits` (by address as configured).
    pub fn resume(&self, limits: &BTreeMap<String, Saved>, min: usize, max: usize) {
        for m in &self.members {
            if let Some(saved) = limits.get(&m.label) {
                m.resume(saved, min, max);
            }
        }
    }
}
