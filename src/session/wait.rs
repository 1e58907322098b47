//! A client waiting in the queue: what its task holds, and the wait itself, which sleeps on the
//! queue's outcome and the client's socket at once, keeping what a talker sends.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::origin::Origin;
use crate::admission::Guard;
use crate::queue::{Outcome, Ticket};
use crate::server::gate::{Grant, Live};

/// How many bytes a client that talks while it waits in the queue may send before mxgate stops
/// reading (TCP flow control then holds the rest). Every byte is forwarded, in order, once a
/// slot is free.
pub const MAX_EARLY_BYTES: usize = 1024;

/// A client waiting in the queue: everything its task holds meanwhile.
pub(super) struct Waiting {
    pub(super) client: TcpStream,
    pub(super) guard: Guard,
    pub(super) ticket: Ticket<Grant>,
    pub(super) origin: Origin,
    pub(super) live: Arc<Live>,
    /// The connection's peer, for its log lines. (A span of its own would hold a slot in the
    /// log registry for the whole wait.)
    pub(super) peer: SocketAddr,
}

impl Waiting {
    /// Waits for a slot, until `queue_timeout` or the client gives up (FIN or RST). A client
    /// that talks meanwhile has its bytes kept, in order, for the backend. No wake-up happens
    /// while nothing does: the task sleeps on its channel and its socket, and the queue's
    /// dispatcher keeps the deadline.
    pub(super) fn turn(&mut self) -> Turn<'_> {
        Turn {
            client: &self.client,
            ticket: &mut self.ticket,
            early: &mut self.origin.early,
        }
    }
}

/// A wait in the queue: ready with the queue's outcome, or `None` once the client has closed
/// or reset its side. Polls the socket's readiness directly, so the wait holds no waiter node
/// or timer of its own.
pub(super) struct Turn<'a> {
    pub(super) client: &'a TcpStream,
    pub(super) ticket: &'a mut Ticket<Grant>,
    early: &'a mut Vec<u8>,
}

impl std::future::Future for Turn<'_> {
    type Output = Option<Outcome<Grant>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = &mut *self;
        if let Poll::Ready(outcome) = this.ticket.poll_outcome(cx) {
            return Poll::Ready(Some(outcome));
        }
        // Past the bound, TCP flow control holds the rest; a close then goes unseen until
        // the slot comes, which costs nothing but that wait.
        while this.early.len() < MAX_EARLY_BYTES {
            match this.client.poll_read_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Ok(())) if read_early(this.client, this.early) => {}
                Poll::Ready(_) => return Poll::Ready(None),
            }
        }
        Poll::Pending
    }
}

/// Waits up to `pause`, keeping what the client sends meanwhile; `false` once the client has
/// closed or reset its side. (Past the early-bytes bound, flow control holds the rest.)
pub(super) async fn pause_watching(
    client: &TcpStream,
    early: &mut Vec<u8>,
    pause: std::time::Duration,
) -> bool {
    let sleep = tokio::time::sleep(pause);
    tokio::pin!(sleep);
    loop {
        if early.len() >= MAX_EARLY_BYTES {
            sleep.await;
            return true;
        }
        tokio::select! {
            () = &mut sleep => return true,
            ready = client.readable() => {
                if ready.is_err() || !read_early(client, early) {
                    return false;
                }
            }
        }
    }
}

/// Reads what a waiting client sent, keeping it for the backend. `false` once the client has
/// closed or reset its side: it has given up.
pub(super) fn read_early(client: &TcpStream, early: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; MAX_EARLY_BYTES];
    let room = MAX_EARLY_BYTES - early.len();
    match client.try_read(&mut buf[..room]) {
        Ok(0) => false,
        Ok(n) => {
            // Exactly what came: a talker's buffer never grows past the bound.
            early.reserve_exact(n);
            early.extend_from_slice(&buf[..n]);
            true
        }
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    }
}
