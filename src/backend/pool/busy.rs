//! A backend's busy ceiling: after a busy (4xx) greeting it takes no more sessions than it
//! held then, for a while, and the ceiling then rises step by step. Kept apart from the pool's
//! selection so that the one hot-path read (`Member::cap`) is all the pool sees of it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::super::limit::Signal;
use super::Member;

/// After a busy (4xx) greeting, a backend takes no more sessions than it held then, for this
/// long after the last such greeting: a waiting client is not sent to a full server again at
/// once, and a backend that turns everyone away is asked again only this often.
pub const BUSY_HOLD: Duration = Duration::from_millis(500);

/// What a busy (4xx) greeting is about, as the session that got it can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusyAbout {
    /// The backend's own capacity: its ceiling and the learned limit take it.
    Backend,
    /// This client only, such as a per-client limit of a backend that sees the client's
    /// address: counted, and nothing else.
    Client,
}

/// The state of a backend's busy ceiling.
#[derive(Default)]
pub(super) struct Hold {
    /// The most sessions it may hold; `None` once lifted.
    pub(super) ceiling: Option<usize>,
    /// When the ceiling next rises, in ns of [`since_start`].
    pub(super) until: u64,
    /// A task is raising it.
    pub(super) timer: bool,
}

impl Member {
    /// The backend greeted a session with a 4xx: it is full, not down. When the 4xx is about
    /// the backend ([`BusyAbout::Backend`]), it gets no more sessions than it holds besides
    /// that one for [`BUSY_HOLD`] after the last such greeting, and the learned limit takes the
    /// signal.
    pub fn busy(self: &Arc<Self>, time: Duration, about: BusyAbout) {
        self.m_busy.increment(1);
        self.m_greeting.record(time.as_secs_f64());
        if about == BusyAbout::Client {
            return;
        }
        let held = self.active().saturating_sub(1);
        let start_timer = {
            let mut hold = self.hold();
            hold.until = since_start() + BUSY_HOLD.as_nanos() as u64;
            // The tightest a burst of busy greetings showed.
            hold.ceiling = Some(hold.ceiling.map_or(held, |c| c.min(held)));
            self.ceiling
                .store(hold.ceiling.unwrap_or(usize::MAX), Ordering::Release);
            !std::mem::replace(&mut hold.timer, true)
        };
        self.learn(Signal::Busy { held });
        if start_timer {
            let member = self.clone();
            tokio::spawn(async move { member.lift_ceiling().await });
        }
    }

    fn hold(&self) -> std::sync::MutexGuard<'_, Hold> {
        self.busy_hold.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Raises the busy ceiling each [`BUSY_HOLD`] without a busy greeting: doubled while
    /// sessions press against it (so a backend that recovers is not flooded at once, and one
    /// that was turning everyone away is back to full use in a few steps), lifted once they
    /// no longer do.
    async fn lift_ceiling(&self) {
        loop {
            let wait = {
                let mut hold = self.hold();
                let now = since_start();
                if now < hold.until {
                    hold.until - now
                } else {
                    let active = self.active();
                    hold.ceiling = match hold.ceiling {
                        Some(c) if active >= c => Some(c.saturating_mul(2).max(c + 1)),
                        _ => None,
                    };
                    self.ceiling
                        .store(hold.ceiling.unwrap_or(usize::MAX), Ordering::Release);
                    if hold.ceiling.is_none() {
                        hold.timer = false;
                        drop(hold);
                        self.wake.freed();
                        return;
                    }
                    hold.until = now + BUSY_HOLD.as_nanos() as u64;
                    BUSY_HOLD.as_nanos() as u64
                }
            };
            self.wake.freed();
            tokio::time::sleep(Duration::from_nanos(wait)).await;
        }
    }
}

/// Nanoseconds since the first call: a clock an atomic can hold.
fn since_start() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}
