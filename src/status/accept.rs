//! The metrics listener's accept loop, made so that slow or idle clients cannot starve a
//! scrape:
//!
//! - every connection must send its request head within [`http::HEAD_TIMEOUT`];
//! - at most [`MAX_METRICS_CONNECTIONS`] are open at once, and at most
//!   [`MAX_PER_SOURCE`] from one address;
//! - a newcomer past either bound pre-empts the oldest connection that is still idle (has
//!   not sent its whole head), from its own address first: so a flood of silent connections
//!   only ever evicts itself, and a scraper, which sends its head at once, always gets in;
//! - out of descriptors, a reserve descriptor is given up for one accept, so a scrape is
//!   answered even then; accept errors are counted and logged at a bounded rate, as on the
//!   SMTP listeners.
//!
//! It never reads a request itself: that is `http`'s.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::http;
use crate::gate::Gate;
use crate::listener::{AcceptErrors, Reserve};
use crate::local_errors::{Errno, Op};

/// How many connections are open at once, at most.
pub const MAX_METRICS_CONNECTIONS: usize = 32;
/// How many of them one address may hold.
pub const MAX_PER_SOURCE: usize = 4;

/// One open connection, as the bounds see it.
struct Open {
    ip: IpAddr,
    /// Still waiting for its request head: may be pre-empted.
    idle: bool,
    /// Cancelled to pre-empt it.
    cut: CancellationToken,
}

/// The open connections, oldest first (by the order they were accepted in).
#[derive(Default)]
struct Conns {
    open: BTreeMap<u64, Open>,
    next: u64,
}

impl Conns {
    /// Makes room for a newcomer from `ip` and registers it; `None` when every connection in
    /// the way is busy answering (then the newcomer is closed).
    fn admit(&mut self, ip: IpAddr) -> Option<(u64, CancellationToken)> {
        let from_ip = self.open.values().filter(|o| o.ip == ip).count();
        if from_ip >= MAX_PER_SOURCE && !self.preempt(|o| o.ip == ip) {
            return None;
        }
        if self.open.len() >= MAX_METRICS_CONNECTIONS
            && !self.preempt(|o| o.ip == ip)
            && !self.preempt(|_| true)
        {
            return None;
        }
        let id = self.next;
        self.next += 1;
        let cut = CancellationToken::new();
        self.open.insert(
            id,
            Open {
                ip,
                idle: true,
                cut: cut.clone(),
            },
        );
        Some((id, cut))
    }

    /// Cuts the oldest idle connection that `which` picks; whether there was one.
    fn preempt(&mut self, which: impl Fn(&Open) -> bool) -> bool {
        let oldest = self
            .open
            .iter()
            .find(|(_, o)| o.idle && which(o))
            .map(|(&id, _)| id);
        match oldest.and_then(|id| self.open.remove(&id)) {
            Some(o) => {
                o.cut.cancel();
                true
            }
            None => false,
        }
    }
}

/// Serves the listener until `stop` is cancelled. Each connection is answered in its own task.
pub async fn serve(listener: TcpListener, gate: Arc<Gate>, stop: CancellationToken) {
    let conns = Arc::new(Mutex::new(Conns::default()));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut errors = AcceptErrors::default();
    let mut reserve = Reserve::open();
    loop {
        reserve.restore();
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => match exhausted(&listener, &gate, &mut reserve, &e).await {
                Some(a) => a,
                None => {
                    let pause = errors.failure(addr, &e);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
            },
        };
        errors.success();
        spawn_exchange(stream, peer.ip().to_canonical(), &conns, &gate);
    }
}

/// Out of descriptors: counts the failure and, giving up the reserve, takes one connection
/// after all, so a scrape is answered even now.
async fn exhausted(
    listener: &TcpListener,
    gate: &Gate,
    reserve: &mut Reserve,
    e: &std::io::Error,
) -> Option<(TcpStream, std::net::SocketAddr)> {
    let errno = Errno::of(e)?;
    gate.metrics
        .local_errors
        .get(Op::MetricsAccept, errno)
        .increment(1);
    if !matches!(errno, Errno::Emfile | Errno::Enfile) || !reserve.release() {
        return None;
    }
    // Ready already: the failed accept left the connection in the backlog.
    let taken = tokio::time::timeout(std::time::Duration::from_millis(10), listener.accept());
    taken.await.ok()?.ok()
}

fn lock(c: &Mutex<Conns>) -> std::sync::MutexGuard<'_, Conns> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

fn spawn_exchange(stream: TcpStream, ip: IpAddr, conns: &Arc<Mutex<Conns>>, gate: &Arc<Gate>) {
    let Some((id, cut)) = lock(conns).admit(ip) else {
        // Every connection in the way is answering: this one is closed, unread.
        return;
    };
    let (conns, gate) = (conns.clone(), gate.clone());
    tokio::spawn(async move {
        let head_read = || {
            if let Some(o) = lock(&conns).open.get_mut(&id) {
                o.idle = false;
            }
        };
        tokio::select! {
            () = cut.cancelled() => {}
            () = http::exchange(stream, &gate, head_read) => {}
        }
        lock(&conns).open.remove(&id);
    });
}

#[cfg(test)]
mod tests;
