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
                    // A check mxgate could not even start (no descriptor left) says nothing.
                    if let Some(ok) = probe(m.addr, timeout).await {
                        m.observe(ok, fall, rise);
                    }
                })
            })
            .collect();
        for c in checks {
            let _ = c.await;
        }
    }
}

/// One SMTP health check: the whole greeting must be 2xx, and QUIT must get a 2xx.
pub async fn check(addr: SocketAddr, timeout: Duration) -> bool {
    probe(addr, timeout).await == Some(true)
}

/// [`check`], or `None` when mxgate's own side failed, which says nothing about the backend.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Option<bool> {
    match super::connect(addr, timeout, None).await {
        Ok(stream) => converse(stream, timeout).await,
        Err(e) if e.is_backend_fault() => Some(false),
        Err(e) => {
            tracing::debug!(%addr, error = %e, "health check not started");
            None
        }
    }
}

/// The health check's dialogue on a connected backend: `None` for a busy (4xx) greeting,
/// which is not counted either way.
async fn converse(stream: tokio::net::TcpStream, timeout: Duration) -> Option<bool> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let greeting = reply_code(&mut r, timeout).await;
    let busy = greeting.is_some_and(|c| c / 100 == 4);
    if greeting.is_none_or(|c| c / 100 != 2) && !busy {
        return Some(false);
    }
    if tokio::time::timeout(timeout, w.write_all(b"QUIT\r\n"))
        .await
        .map_or(true, |r| r.is_err())
    {
        return (!busy).then_some(false);
    }
    if busy {
        return None;
    }
    Some(
        reply_code(&mut r, timeout)
            .await
            .is_some_and(|c| c / 100 == 2),
    )
}
