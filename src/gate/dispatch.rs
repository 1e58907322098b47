//! The wait queue's one dispatcher: the task that hands the queue's waiters their slots. The
//! queue (`crate::queue`) keeps the order and the deadlines; which slot a waiter may have is the
//! gate's ([`Gate::capacity`]); this loop joins the two, woken by [`crate::wake::Wake`] whenever
//! a slot may have freed.

use tokio_util::sync::CancellationToken;

use super::Gate;

impl Gate {
    /// Runs the dispatcher until `stop`: whenever a slot may have freed, hands out every slot
    /// there is, in the queue's order; at the next deadline, ends the waits that reached it;
    /// when a pause after a local failure ends, looks again. In a cluster that said full, it
    /// also looks at each turn of the waiters to ask it.
    pub(crate) async fn dispatch(&self, stop: CancellationToken) {
        let mut next: Option<std::time::Instant> = None;
        loop {
            let deadline = next.map(tokio::time::Instant::from_std);
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = sleep_until_some(deadline) => {}
            }
            let live = self.live.load_full();
            // The queue's only dispatcher must outlive a bug in one turn: a panic here would
            // leave every waiter unserved until its client gave up. This relies on
            // `panic = "unwind"` (Cargo.toml's profiles keep it): under `abort`, catch_unwind
            // catches nothing and the process ends.
            let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.queue.serve(|waiter| self.capacity(&live, waiter));
                let expiry = self.queue.expire(std::time::Instant::now());
                let Some(cluster) = &self.cluster else {
                    return expiry;
                };
                cluster.queue_changed();
                // A full cluster: the next waiter asks it at its turn.
                let ask = cluster.next_ask().filter(|_| !self.queue.is_empty());
                expiry.into_iter().chain(ask).min()
            }));
            next = match turn {
                // A pause after a local failure ends with a look of its own.
                Ok(next) => match self.local.paused_until().map(|t| t.into_std()) {
                    Some(resume) => Some(next.map_or(resume, |n| n.min(resume))),
                    None => next,
                },
                Err(_) => {
                    tracing::error!("the wait queue's dispatcher panicked; it goes on");
                    Some(std::time::Instant::now() + std::time::Duration::from_secs(1))
                }
            };
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
