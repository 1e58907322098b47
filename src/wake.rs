//! The signal that a slot may have freed: a leaf that the wait queue ([`crate::queue`]), admission
//! ([`crate::admission`]), the backends ([`crate::backend`]) and the cluster all share. It knows
//! nothing of them: whoever returns a slot calls [`Wake::freed`], the queue sets how many wait,
//! and the queue's dispatcher sleeps on [`Wake::notified`].

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// The signal that a slot may have freed, shared by everything that holds slots. Cheap when
/// nobody waits: one atomic load.
#[derive(Default)]
pub struct Wake {
    /// Waiters in the queue now.
    waiting: AtomicUsize,
    notify: Notify,
}

impl Wake {
    /// A slot was given back: the dispatcher looks again, if anyone waits.
    pub fn freed(&self) {
        // SeqCst pairs with the store in `Queue::enter`: either this load sees the new
        // waiter, or the waiter's own kick sees the freed slot.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_one();
        }
    }

    /// Capacity may have grown (a reload): the dispatcher looks again.
    pub fn kick(&self) {
        self.notify.notify_one();
    }

    /// Waiters in the queue now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// The queue sets how many wait, after each change to its lines.
    pub(crate) fn set_waiting(&self, n: usize) {
        self.waiting.store(n, Ordering::SeqCst);
    }

    /// Resolves when the dispatcher should look at the queue.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}
