//! The wait queue: a client that passes every policy check but finds the server's capacity full
//! waits here, without a greeting, until a slot frees, instead of getting a `421` at once.
//!
//! The queue is fair between sources. Each waiter gets a tag, `max(source's last tag, the
//! class's clock) + 1`, and the smallest tag is served first, ties by arrival. So sources take
//! turns, round robin, while each source's own connections stay first come, first served: a
//! source with a hundred waiters holds tags 1..100, a newcomer source gets tag 1 and is served
//! in the next round, not after the hundred. Allowed sources form a class of their own that is
//! always served before the others.
//!
//! Nobody jumps the queue: while anyone waits, a newcomer joins it instead of trying for a slot
//! ([`Queue::enter`]). Slots are handed out by one dispatcher (the gate's loop around [`Queue::serve`]), woken through
//! [`Wake`] whenever a slot may have freed (a session's global slot or backend lease returned,
//! a backend up again, a reload). The same dispatcher ends the waits that reach their deadline
//! ([`Queue::expire`]), so a waiter needs no timer of its own: its task sleeps on its one-shot
//! channel and its client socket, and nothing wakes while nothing happens.
//!
//! The queue knows nothing of slots: what a grant is (`T`) and whether one can be had is the
//! caller's, so this module depends on no other but the leaf [`crate::wake`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use metrics::{Gauge, Histogram};
use std::task::{Context, Poll};

use crate::wake::Wake;

mod lines;
use lines::{Lines, Place, Turn};

/// What a waiter carries for the dispatcher's capacity check.
#[derive(Clone, Copy, Debug)]
pub struct Waiter {
    /// The client's address. Only its family is kept while it waits (0.0.0.0 or ::), which
    /// is all a backend choice needs.
    pub ip: std::net::IpAddr,
    /// Allowed sources are served first.
    pub allowed: bool,
}

/// How a wait ended from the queue's side.
pub enum WaitEnd<T> {
    /// A slot, handed over by the dispatcher.
    Granted(T),
    /// The wait reached its deadline.
    TimedOut,
    /// mxgate is shutting down.
    Draining,
}

struct QueueState<T> {
    lines: Lines,
    /// Outcomes decided and not yet taken by their waiter.
    decided: HashMap<Place, WaitEnd<T>>,
    /// Set by [`Queue::close`]: nobody enters any more.
    closed: bool,
}

/// The fair wait queue.
pub struct Queue<T> {
    state: Mutex<QueueState<T>>,
    wake: Arc<Wake>,
    gauge: Gauge,
    wait_seconds: Histogram,
}

/// What [`Queue::enter`] decided.
pub enum Entered<T> {
    /// Nobody was waiting and there was room: the slot, at once.
    Now(T),
    /// In the queue: wait on the ticket.
    Wait(Ticket<T>),
    /// The queue holds `max_queued` already.
    Full,
    /// The queue is closed for shutdown.
    Closed,
}

/// A waiter's hold on its place. Dropping it leaves the queue (a slot already handed to it is
/// dropped too, which frees it).
pub struct Ticket<T> {
    queue: Arc<Queue<T>>,
    place: Place,
    entered: Instant,
    done: bool,
}

impl<T> Queue<T> {
    pub fn new(wake: Arc<Wake>, gauge: Gauge, wait_seconds: Histogram) -> Arc<Queue<T>> {
        gauge.set(0.0);
        Arc::new(Queue {
            state: Mutex::new(QueueState {
                lines: Lines::new(),
                decided: HashMap::new(),
                closed: false,
            }),
            wake,
            gauge,
            wait_seconds,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waiters now.
    pub fn len(&self) -> usize {
        self.wake.waiting()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A newcomer from `source`: a slot at once if nobody waits and `try_now` finds one,
    /// otherwise a place in the queue for at most `timeout`, unless the queue already holds
    /// `max_queued`.
    pub fn enter(
        self: &Arc<Self>,
        source: IpNet,
        waiter: Waiter,
        (max_queued, timeout): (usize, Duration),
        try_now: impl FnOnce() -> Option<T>,
    ) -> Entered<T> {
        // Nobody to jump: nobody waits, or only other sources that an allowed one is served
        // before anyway (the first in line is not allowed).
        let first_in_line =
            self.wake.waiting() == 0 || (waiter.allowed && self.first_class() != Some(0));
        if first_in_line {
            if let Some(slot) = try_now() {
                return Entered::Now(slot);
            }
        }
        let entered = Instant::now();
        let deadline = entered.checked_add(timeout).unwrap_or(entered);
        let place = {
            let mut s = self.lock();
            if s.closed {
                return Entered::Closed;
            }
            // Allowed sources (a site's own relays) are few, and always have room to wait: a
            // flood that fills the queue must not lock them out.
            if s.lines.len() >= max_queued && !waiter.allowed {
                return Entered::Full;
            }
            self.line_up(&mut s, source, waiter, Turn::Next, deadline)
        };
        // A slot may have freed between `try_now` and the insertion, seen by nobody.
        self.wake.kick();
        Entered::Wait(Ticket {
            queue: self.clone(),
            place,
            entered,
            done: false,
        })
    }

    fn line_up(
        &self,
        s: &mut QueueState<T>,
        source: IpNet,
        waiter: Waiter,
        turn: Turn,
        deadline: Instant,
    ) -> Place {
        let family = (waiter.ip.to_canonical().is_ipv4(), waiter.allowed);
        let place = s.lines.push(source, family, turn, deadline);
        self.update(s);
        place
    }

    /// Puts back a waiter that was served a slot it could not use (the backend's own "busy"
    /// greeting, every backend full by the time it connected, or a full cluster): at the head
    /// of its class, ahead of every newcomer, keeping the deadline of its first entry
    /// (`entered` plus `timeout`). One admitted to the queue before is not held to
    /// `max_queued` (`bound` `None`); one that got its slot without waiting is (`Some`). It is
    /// served as soon as the dispatcher finds room, which a busy backend's ceiling (or its
    /// full cap, or the cluster's pace) withholds until a session ends or the ceiling rises.
    pub fn reenter(
        self: &Arc<Self>,
        source: IpNet,
        waiter: Waiter,
        (entered, timeout): (Instant, Duration),
        bound: Option<usize>,
    ) -> Entered<T> {
        let deadline = entered.checked_add(timeout).unwrap_or(entered);
        let place = {
            let mut s = self.lock();
            if s.closed {
                return Entered::Closed;
            }
            if bound.is_some_and(|max| s.lines.len() >= max) {
                return Entered::Full;
            }
            self.line_up(&mut s, source, waiter, Turn::First, deadline)
        };
        self.wake.kick();
        Entered::Wait(Ticket {
            queue: self.clone(),
            place,
            entered,
            done: false,
        })
    }

    /// Hands slots to waiters in turn while `grant` finds one for the next in line. Called by
    /// the one dispatcher whenever [`Wake`] says a slot may have freed.
    pub fn serve(&self, mut grant: impl FnMut(&Waiter) -> Option<T>) {
        let mut s = self.lock();
        while let Some(place) = s.lines.first() {
            let seen = s.lines.seen(place);
            let ip = if seen.v4 {
                std::net::IpAddr::from([0, 0, 0, 0])
            } else {
                std::net::IpAddr::from([0u16; 8])
            };
            let waiter = Waiter {
                ip,
                allowed: seen.allowed,
            };
            let Some(slot) = grant(&waiter) else { break };
            s.decide(place, true, WaitEnd::Granted(slot));
        }
        self.update(&s);
    }

    /// Ends every wait whose deadline has come; returns the next deadline, if anyone waits.
    pub fn expire(&self, now: Instant) -> Option<Instant> {
        let mut s = self.lock();
        while let Some(place) = s.lines.due(now) {
            s.decide(place, false, WaitEnd::TimedOut);
        }
        self.update(&s);
        s.lines.soonest()
    }

    /// The earliest deadline of anyone waiting: the longest wait now is `queue_timeout` less
    /// what is left of it (a client put back keeps its first deadline).
    pub fn soonest_deadline(&self) -> Option<Instant> {
        self.lock().lines.soonest()
    }

    /// The class of the first in line, if anyone waits.
    fn first_class(&self) -> Option<u8> {
        self.lock().lines.first_class()
    }

    /// Ends every wait at once, as if its deadline had come: for a reload that turns the
    /// queue off.
    pub fn expire_all(&self) {
        let mut s = self.lock();
        while let Some(place) = s.lines.first() {
            s.decide(place, false, WaitEnd::TimedOut);
        }
        self.update(&s);
    }

    /// Closes the queue for shutdown: every waiter is told, and nobody enters any more.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        while let Some(place) = s.lines.first() {
            s.decide(place, false, WaitEnd::Draining);
        }
        self.update(&s);
    }

    /// Records the wait of a client that was granted a slot, once it is over for good: it was
    /// greeted, answered, or gone, but not sent back to wait again. Every other end of a wait
    /// is recorded by its ticket.
    pub fn record_wait(&self, waited: Duration) {
        self.wait_seconds.record(waited.as_secs_f64());
    }

    fn update(&self, s: &QueueState<T>) {
        self.wake.set_waiting(s.lines.len());
        self.gauge.set(s.lines.len() as f64);
    }
}

impl<T> QueueState<T> {
    /// Takes a waiter out of line with its outcome, and wakes it to collect it. `served`: it
    /// had its turn, so its class's round moves on to its tag.
    fn decide(&mut self, place: Place, served: bool, outcome: WaitEnd<T>) {
        let waker = self.lines.decide(place, served);
        self.decided.insert(place, outcome);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Ticket<T> {
    /// When this waiter entered the queue.
    pub fn entered(&self) -> Instant {
        self.entered
    }

    /// Ready when the dispatcher hands over a slot, the wait times out or the queue closes.
    pub fn poll_outcome(&mut self, cx: &mut Context<'_>) -> Poll<WaitEnd<T>> {
        let mut s = self.queue.lock();
        if s.lines.waiting(self.place) {
            s.lines.set_waker(self.place, cx.waker());
            return Poll::Pending;
        }
        // Decided, or (which cannot happen while the ticket lives) neither.
        let outcome = s.decided.remove(&self.place);
        s.lines.release(self.place);
        drop(s);
        match outcome {
            // The client may yet come back (a backend that says busy sends it to the head of
            // the line again): its wait is recorded once, by [`Queue::record_wait`], when it
            // is over for good.
            Some(outcome @ WaitEnd::Granted(_)) => {
                self.done = true;
                Poll::Ready(outcome)
            }
            outcome => {
                self.finish();
                Poll::Ready(outcome.unwrap_or(WaitEnd::Draining))
            }
        }
    }

    /// Leaves the queue (the client gave up, or its time is over). `None` if it was still
    /// waiting; otherwise the outcome already decided for it.
    pub fn leave(mut self) -> Option<WaitEnd<T>> {
        let outcome = self.take();
        self.finish();
        outcome
    }

    /// Takes this waiter out of the queue, or its decided outcome.
    fn take(&mut self) -> Option<WaitEnd<T>> {
        let mut s = self.queue.lock();
        let outcome = if s.lines.decided(self.place) {
            s.decided.remove(&self.place)
        } else {
            None
        };
        s.lines.release(self.place);
        self.queue.update(&s);
        // The last waiter gave up: the dispatcher looks (a cluster publishes this host's
        // demand without it, so other hosts stop leaving slots to it).
        if outcome.is_none() && s.lines.len() == 0 {
            self.queue.wake.kick();
        }
        outcome
    }

    /// The wait is over: recorded once.
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.queue.record_wait(self.entered.elapsed());
        }
    }
}

impl<T> Drop for Ticket<T> {
    fn drop(&mut self) {
        if !self.done {
            // A slot already handed over is dropped here, after the lock, and so freed.
            let outcome = self.take();
            self.finish();
            drop(outcome);
        }
    }
}

#[cfg(test)]
mod tests;
