//! Backend health: SMTP-aware checks. A check connects, reads the complete greeting
//! (multi-line `220-` replies included), sends QUIT and reads the 221. A check mxgate could not
//! even start (its own side failed) says nothing about the backend and is not counted. Nor does
//! a 4xx greeting: the backend is full, not down, and marking it down exactly when it is at its
//! limit would send every client to "Service not available".

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};

use super::Pool;
use crate::smtp::reply_code;

impl Pool {
    /// Checks every backend once, concurrently, and waits for all the checks.
    pub async fn check_all(&self, timeout: Duration, fall: u32, rise: u32) {
        let checks: Vec<_> = self
            .members
            .iter()
            .cloned()
            .map(|m| {
                tokio::spawn(async move {
                    let result = examine(m.addr, timeout).await;
                    m.checked(result);
                    // A check mxgate could not even start (no descriptor left) says nothing.
                    if let Some(ok) = result.counts() {
                        m.health_checked(ok, fall, rise);
                    }
                })
            })
            .collect();
        for c in checks {
            let _ = c.await;
        }
    }
}

/// What one health check found, as the live view shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// A 2xx greeting and a 2xx answer to QUIT.
    Passed,
    /// No connection, no greeting, or a 5xx or malformed answer.
    Failed,
    /// A 4xx greeting: full, not down. Not counted.
    Busy,
    /// mxgate's own side failed (no descriptor left, say): says nothing. Not counted.
    NotStarted,
}

impl Check {
    /// The observation it makes for the up/down state: `None` for one that says nothing.
    pub fn counts(self) -> Option<bool> {
        match self {
            Check::Passed => Some(true),
            Check::Failed => Some(false),
            Check::Busy | Check::NotStarted => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Check::Passed => "passed",
            Check::Failed => "failed",
            Check::Busy => "busy",
            Check::NotStarted => "not_started",
        }
    }
}

/// One SMTP health check: the whole greeting must be 2xx, and QUIT must get a 2xx.
pub async fn check(addr: SocketAddr, timeout: Duration) -> bool {
    examine(addr, timeout).await == Check::Passed
}

/// [`check`], or `None` when the check says nothing either way (busy, or not started).
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Option<bool> {
    examine(addr, timeout).await.counts()
}

/// One health check, with what it found.
pub async fn examine(addr: SocketAddr, timeout: Duration) -> Check {
    match super::connect(addr, timeout, None).await {
        Ok(stream) => converse(stream, timeout).await,
        Err(e) if e.is_backend_fault() => Check::Failed,
        Err(e) => {
            tracing::debug!(%addr, error = %e, "health check not started");
            Check::NotStarted
        }
    }
}

/// The health check's dialogue on a connected backend.
async fn converse(stream: tokio::net::TcpStream, timeout: Duration) -> Check {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let greeting = reply_code(&mut r, timeout).await;
    let busy = greeting.is_some_and(|c| c / 100 == 4);
    if greeting.is_none_or(|c| c / 100 != 2) && !busy {
        return Check::Failed;
    }
    let quit = tokio::time::timeout(timeout, w.write_all(b"QUIT\r\n")).await;
    if busy {
        return Check::Busy;
    }
    if quit.map_or(true, |r| r.is_err()) {
        return Check::Failed;
    }
    if reply_code(&mut r, timeout)
        .await
        .is_some_and(|c| c / 100 == 2)
    {
        Check::Passed
    } else {
        Check::Failed
    }
}
