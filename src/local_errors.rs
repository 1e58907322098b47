//! Local resource failures: mxgate itself out of descriptors (EMFILE, ENFILE) or of socket
//! memory (ENOBUFS, ENOMEM). Such a failure says nothing about a client or a backend, so it
//! must never be answered as one: it is counted in `mxgate_local_errors_total{op, errno}`,
//! logged at a bounded rate ([`Throttle`]), and met with a short, growing pause
//! ([`Backoff`]) instead of a retry in a tight loop.
//!
//! This module decides nothing about admission; it only classifies, counts and paces.

use std::io;
use std::sync::Mutex;
use std::time::Duration;

use metrics::Counter;
use tokio::time::Instant;

/// Where a local failure happened: the `op` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// accept() on an SMTP listener.
    Accept,
    /// accept() on the metrics listener.
    MetricsAccept,
    /// socket() (and its set-up) for a backend connection.
    BackendSocket,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::Accept, Op::MetricsAccept, Op::BackendSocket];

    pub fn label(self) -> &'static str {
        match self {
            Op::Accept => "accept",
            Op::MetricsAccept => "metrics_accept",
            Op::BackendSocket => "backend_socket",
        }
    }
}

/// Which resource ran out: the `errno` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Errno {
    Emfile,
    Enfile,
    Enobufs,
    Enomem,
}

impl Errno {
    pub const ALL: [Errno; 4] = [Errno::Emfile, Errno::Enfile, Errno::Enobufs, Errno::Enomem];

    /// The local resource `e` says ran out, if it is one of those.
    pub fn of(e: &io::Error) -> Option<Errno> {
        match e.raw_os_error()? {
            libc::EMFILE => Some(Errno::Emfile),
            libc::ENFILE => Some(Errno::Enfile),
            libc::ENOBUFS => Some(Errno::Enobufs),
            libc::ENOMEM => Some(Errno::Enomem),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Errno::Emfile => "EMFILE",
            Errno::Enfile => "ENFILE",
            Errno::Enobufs => "ENOBUFS",
            Errno::Enomem => "ENOMEM",
        }
    }

    /// What the operator can do about it.
    pub fn hint(self) -> &'static str {
        match self {
            Errno::Emfile => "process is out of file descriptors: raise LimitNOFILE",
            Errno::Enfile => "system is out of file descriptors: raise fs.file-max",
            Errno::Enobufs | Errno::Enomem => "kernel is out of socket memory",
        }
    }
}

/// One counter per `(op, errno)`, all registered up front so each series exists from the
/// start at 0.
pub struct LocalErrorCounters {
    counters: Vec<Counter>,
}

impl LocalErrorCounters {
    pub fn new(mut register: impl FnMut(&'static str, &'static str) -> Counter) -> Self {
        let counters = Op::ALL
            .iter()
            .flat_map(|op| Errno::ALL.iter().map(move |e| (op.label(), e.label())))
            .map(|(op, errno)| register(op, errno))
            .collect();
        LocalErrorCounters { counters }
    }

    pub fn get(&self, op: Op, errno: Errno) -> &Counter {
        let i = Op::ALL.iter().position(|&o| o == op).unwrap_or(0) * Errno::ALL.len()
            + Errno::ALL.iter().position(|&e| e == errno).unwrap_or(0);
        &self.counters[i]
    }
}

/// How often, at most, one kind of local failure is logged.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Lets a warning through at most once per interval, and counts what it held back.
pub struct Throttle {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// One more failure: `Some(failures since the last warning, this one included)` when it
    /// is time to log, `None` while the warning is held back.
    pub fn hit(&mut self) -> Option<u64> {
        self.suppressed += 1;
        let now = Instant::now();
        if self.last.is_some_and(|t| now - t < self.interval) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The first pause after a local failure on the backend socket.
const PAUSE_FIRST: Duration = Duration::from_millis(20);
/// The longest pause while the failures go on.
const PAUSE_MAX: Duration = Duration::from_secs(1);

/// The pause that follows a local failure of a backend socket, shared by every session: no
/// waiter is granted a slot until it is over, so the freed slot is not handed to the next
/// waiter to fail the same way at once. It doubles while failures go on and resets on the
/// next backend connection made.
pub struct Backoff {
    state: Mutex<BackoffState>,
    throttle: Mutex<Throttle>,
}

struct BackoffState {
    next: Duration,
    until: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            state: Mutex::new(BackoffState {
                next: PAUSE_FIRST,
                until: None,
            }),
            throttle: Mutex::new(Throttle::new(WARN_INTERVAL)),
        }
    }
}

impl Backoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, BackoffState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A backend socket failed locally with `errno`: pauses grants, and logs at a bounded
    /// rate. Returns the pause.
    pub fn failed(&self, errno: Errno, error: &io::Error) -> Duration {
        let pause = {
            let mut s = self.lock();
            let pause = s.next;
            s.next = (s.next * 2).min(PAUSE_MAX);
            s.until = Some(Instant::now() + pause);
            pause
        };
        let logged = self
            .throttle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .hit();
        if let Some(failures) = logged {
            tracing::warn!(
                op = Op::BackendSocket.label(),
                errno = errno.label(),
                error = %error,
                failures,
                pause_ms = pause.as_millis() as u64,
                hint = errno.hint(),
                "cannot open a backend socket; the client waits again at the head of the queue"
            );
        }
        pause
    }

    /// A backend connection was made: the next failure starts from the shortest pause.
    pub fn succeeded(&self) {
        let mut s = self.lock();
        if s.until.is_some() {
            s.next = PAUSE_FIRST;
            s.until = None;
        }
    }

    /// When grants may start again, while a pause is on.
    pub fn paused_until(&self) -> Option<Instant> {
        // An instant past is kept as "a failure was seen" for `succeeded`; it pauses no more.
        self.lock().until.filter(|&t| t > Instant::now())
    }
}

#[cfg(test)]
mod tests;
