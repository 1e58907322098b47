//! A client waiting in the queue: what its task holds, and the wait itself, which sleeps on the
//! queue's outcome and the client's socket at once, keeping what a talker sends.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::origin::Origin;
use crate::admission::Guard;
use crate::gate::{Grant, Live};
use crate::queue::{Ticket, WaitEnd};

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
    pub(super) fn turn(&mut self) -> WaitTurn<'_> {
        WaitTurn {
            client: &self.client,
            ticket: &mut self.ticket,
            // After the pregreet teaser, a word before the greeting's end fails the test.
            stop_on_word: self.origin.teased && !self.origin.talked,
            early: &mut self.origin.early,
        }
    }
}

/// How a wait in the queue ended.
pub(super) enum Waited {
    /// The queue's outcome: a slot, its timeout, or a drain.
    Turn(WaitEnd<Grant>),
    /// The client closed or reset its side.
    Gone,
    /// The client spoke after the pregreet teaser, before the greeting's end.
    Spoke,
}

/// A wait in the queue: ready with the queue's outcome, once the client has closed or reset its
/// side, or once it spoke after the pregreet teaser. Polls the socket's readiness directly, so the wait holds no waiter node
/// or timer of its own.
pub(super) struct WaitTurn<'a> {
    pub(super) client: &'a TcpStream,
    pub(super) ticket: &'a mut Ticket<Grant>,
    stop_on_word: bool,
    early: &'a mut Vec<u8>,
}

impl std::future::Future for WaitTurn<'_> {
    type Output = Waited;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = &mut *self;
        if let Poll::Ready(outcome) = this.ticket.poll_outcome(cx) {
            return Poll::Ready(Waited::Turn(outcome));
        }
        match poll_gone(this.client, this.early, cx) {
            Poll::Ready(()) => Poll::Ready(Waited::Gone),
            Poll::Pending if this.stop_on_word && !this.early.is_empty() => {
                Poll::Ready(Waited::Spoke)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Ready once a waiting client has closed or reset its side: it has given up. Meanwhile what
/// it sends is kept for the backend, up to [`MAX_EARLY_BYTES`]; past that bound nothing more
/// is read (TCP flow control holds the rest), yet its FIN or RST is still seen at once: each
/// time the socket turns readable, the kernel is asked whether the peer has shut down, and the
/// readiness is cleared until the next segment (and given back by [`rearm`] when the watch
/// ends). Each wake-up past the bound is the client's own doing, one per segment it sends
/// until the receive window closes: a bulk writer fills it in a few, a trickler pays one
/// wake-up per packet, as it would in any session. A FIN queued behind more than the window
/// can hold is not seen until the wait ends; a reset always is. A half-close is taken as
/// giving up, as it is under the bound.
fn poll_gone(
    client: &TcpStream,
    early: &mut Vec<u8>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<()> {
    use std::task::Poll;
    loop {
        match client.poll_read_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(())) => {}
        }
        if early.len() < MAX_EARLY_BYTES {
            if !read_early(client, early) {
                return Poll::Ready(());
            }
        } else if peer_finished(client) {
            return Poll::Ready(());
        } else {
            // Nothing read: the readiness is cleared by hand, so that the next poll sleeps
            // until the socket's next event.
            let _ = client.try_io(tokio::io::Interest::READABLE, || {
                Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
            });
        }
    }
}

/// Gives a client watched past the early-bytes bound its readiness back, once the watch is
/// over and the socket is to be read again: [`poll_gone`] cleared it by hand with bytes still
/// unread, and an edge-triggered reactor would not report them again until more came. The
/// socket is registered anew (`EPOLL_CTL_DEL`, then `EPOLL_CTL_ADD`, which reports a socket
/// that is already readable at once, on any kernel). A client under the bound was never
/// cleared, and is given back as it is. `None` if the reactor would not take it again.
pub(super) fn rearm(client: TcpStream, early: &[u8]) -> Option<TcpStream> {
    if early.len() < MAX_EARLY_BYTES {
        return Some(client);
    }
    let again = client
        .into_std()
        .and_then(TcpStream::from_std)
        .inspect_err(|e| tracing::debug!(error = %e, "cannot register a waiting client again"));
    again.ok()
}

/// Whether the peer has shut down its side (FIN) or reset the connection, asked of the
/// kernel without reading: bytes still unread stay where they are.
fn peer_finished(client: &TcpStream) -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [PollFd::new(client, PollFlags::RDHUP)];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        match poll(&mut fds, Some(&zero)) {
            Ok(_) => {
                return fds[0]
                    .revents()
                    .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR)
            }
            // A signal (a reload's SIGHUP) arrived during the call: ask again.
            Err(rustix::io::Errno::INTR) => continue,
            // Cannot tell: taken as gone rather than risk asking again and again in one
            // poll (a reset leaves the socket's readiness set for good).
            Err(_) => return true,
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
