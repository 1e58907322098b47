//! Moving bytes through userspace: the portable forwarder, and the first read of every burst.
//!
//! Every burst, in either mode, starts with [`first_read`]: one read of at most [`SMALL`] bytes
//! into a per-thread scratch buffer, written straight on. SMTP traffic is almost all commands
//! and replies of a few hundred bytes, and for those one read and one write is the cheapest way
//! there is: splicing them would take three system calls instead of two (socket → pipe,
//! pipe → socket, and the EAGAIN that proves the socket empty), because a short splice cannot
//! tell "socket empty" from "pipe slots full". A short read from a TCP socket can: it means
//! the receive queue is empty, so the socket's readiness is cleared at once, with no
//! confirming EAGAIN. (HAProxy's `splice-auto` makes the same choice.)
//!
//! Only when the first read fills the scratch buffer is more probably waiting; the rest of the
//! burst then goes through [`burst`] here, or through a pipe in splice mode.
//!
//! Scratch memory is per thread, not per session, and is never held across an await: the
//! read and the write that follows it both happen without yielding. Only bytes the
//! destination could not take at once are moved to the heap, and only until written.

use std::cell::RefCell;
use std::io::{self, Read};

use socket2::SockRef;
use tokio::io::Interest;

use super::{write_all, Flow, Side};

/// The most a burst's first read takes. Above any SMTP command or reply; a read that fills it
/// is a bulk transfer (message data), which splice mode then moves through a pipe.
pub(super) const SMALL: usize = 16 * 1024;

/// The buffer of a bulk copy burst. Large enough that a bulk transfer makes few system calls,
/// small enough to stay below malloc's mmap threshold so a burst's allocation is cheap.
const BUF_SIZE: usize = 64 * 1024;

thread_local! {
    /// The first read's buffer; borrowed only by code that does not yield.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SMALL]);
}

/// What a burst ended with.
pub(super) enum Burst {
    /// The source has nothing more for now.
    Drained,
    /// The source sent FIN.
    Eof,
}

/// What a burst's first read found.
pub(super) enum First {
    /// The source had fewer than [`SMALL`] bytes (possibly none), and they have been written
    /// on; its readiness is cleared. `rest` holds what the destination could not take yet.
    Drained { rest: Vec<u8> },
    /// The source sent FIN.
    Eof,
    /// The read filled the buffer, so more is probably waiting: the burst goes on. `rest` is
    /// as for `Drained`.
    Full { rest: Vec<u8> },
}

/// Reads once, at most [`SMALL`] bytes, and writes what it got to the destination, all without
/// yielding.
pub(super) fn first_read(flow: &Flow<'_>) -> Result<First, (Side, io::Error)> {
    SCRATCH.with_borrow_mut(|buf| {
        let mut got = 0;
        // A short read is reported to tokio as WouldBlock, which clears the readiness it was
        // woken for (only if no newer event arrived meanwhile): the queue was empty.
        let read = flow.src.try_io(Interest::READABLE, || {
            let n = (&*SockRef::from(flow.src)).read(buf)?;
            got = n;
            if n > 0 && n < buf.len() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let full = match read {
            Ok(0) => return Ok(First::Eof),
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            // Readiness stays set, so the pump simply comes back.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(e) => return Err((flow.from(), e)),
        };
        if got == 0 {
            return Ok(First::Drained { rest: Vec::new() });
        }
        let data = &buf[..got];
        let written = match flow.dst.try_write(data) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Err(e) => return Err((flow.to, e)),
        };
        if written > 0 {
            flow.shared.moved(flow.to, written);
        }
        let rest = data[written..].to_vec();
        Ok(if full {
            First::Full { rest }
        } else {
            First::Drained { rest }
        })
    })
}

/// Writes bytes the destination could not take at once.
pub(super) async fn write_rest(flow: &Flow<'_>, rest: Vec<u8>) -> Result<(), (Side, io::Error)> {
    write_all(flow.dst, &rest).await.map_err(|e| (flow.to, e))?;
    flow.shared.moved(flow.to, rest.len());
    Ok(())
}

/// Moves what the source has right now, through a buffer that lives only for this burst.
/// Returns how the burst ended and how many bytes it moved.
pub(super) async fn burst(flow: &Flow<'_>) -> Result<(Burst, usize), (Side, io::Error)> {
    let mut buf: Vec<u8> = Vec::new();
    let mut moved = 0;
    loop {
        if buf.capacity() == 0 {
            buf.reserve_exact(BUF_SIZE);
        }
        buf.clear();
        match flow.src.try_read_buf(&mut buf) {
            Ok(0) => return Ok((Burst::Eof, moved)),
            Ok(n) => {
                write_all(flow.dst, &buf[..n])
                    .await
                    .map_err(|e| (flow.to, e))?;
                flow.shared.moved(flow.to, n);
                moved += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((Burst::Drained, moved)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((flow.from(), e)),
        }
    }
}
