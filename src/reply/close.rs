//! The graceful close, in a task: the reply line, the half-close, a drain bounded in time and
//! bytes, then the close; and RFC 5321's dialogue for a client that will never be accepted.
//! The accept loop's lingering set (`linger`) runs the same drain step, [`discard`], at its
//! first look and then from its own epoll set.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{timeout, Instant};

use super::{Replies, Tally};
use crate::reason::{Refusal, RejectReason};

/// How long a refused connection is read and discarded after the reply, at most.
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// How many bytes a refused connection may send after the reply before it is closed anyway.
pub const LINGER_BYTES: usize = 64 * 1024;

/// How many refused connections may linger at once; each holds a file descriptor.
pub const MAX_LINGERING: usize = 1024;

/// How long the reply itself may take to write. It is one short line, so only a client with a
/// zero window can make it block.
pub(super) const WRITE_TIME: Duration = Duration::from_secs(2);

/// How many denied clients may be in their 554 dialogue at once. Apart from the lingering
/// bound: a dialogue lasts up to [`DENY_TIME`], and one denied source must not be able to take
/// the slots other refused clients need to read their 421.
pub const MAX_DENYING: usize = 256;

/// Answers refused connections and counts each refusal it answers ([`Tally`]); bounds the
/// connections that linger after a reply, and the denied clients' dialogues. Cheap to clone:
/// every clone shares the same bounds and counts.
#[derive(Clone)]
pub struct Closer {
    pub(super) lingering: Arc<Semaphore>,
    pub(super) denying: Arc<Semaphore>,
    tally: Arc<Tally>,
}

impl Closer {
    pub fn new(tally: Tally) -> Closer {
        Closer {
            lingering: Arc::new(Semaphore::new(MAX_LINGERING)),
            denying: Arc::new(Semaphore::new(MAX_DENYING)),
            tally: Arc::new(tally),
        }
    }

    /// Counts `refusal`: for the answers in this module's siblings, each of which counts the
    /// refusal it writes.
    pub(super) fn count(&self, refusal: Refusal) {
        self.tally.count(refusal);
    }

    /// Counts a refusal whose client went away before it could be answered.
    pub fn gone(&self, refusal: Refusal) {
        self.count(refusal);
    }

    /// Counts `refusal` and answers it with `line` at once, without waiting and without a
    /// linger: for the accept loop out of descriptors, which needs this one back at once. A
    /// client at connect time has sent nothing, so the close is no reset.
    pub fn refuse_now(&self, stream: &std::net::TcpStream, refusal: Refusal, line: &[u8]) {
        use std::io::Write;
        self.count(refusal);
        // One short line into an empty send buffer: it fits.
        let _ = (&*stream).write(line);
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }

    /// The bound, for the accept loops' own lingering sets.
    pub fn bound(&self) -> Arc<Semaphore> {
        self.lingering.clone()
    }

    /// Denied clients in their dialogue right now.
    pub fn denying(&self) -> usize {
        MAX_DENYING - self.denying.available_permits()
    }

    /// Writes `line`, half-closes, drains what the client still sends for a bounded time, then
    /// closes. Returns whether the whole line was written.
    pub async fn reply_and_close(&self, mut stream: TcpStream, line: &[u8]) -> bool {
        let written = matches!(
            timeout(WRITE_TIME, stream.write_all(line)).await,
            Ok(Ok(()))
        );
        if !written {
            return false;
        }
        // FIN after the line: the client reads the reply, then end-of-file.
        if stream.shutdown().await.is_err() {
            return true;
        }
        if let Ok(_permit) = self.lingering.try_acquire() {
            drain(&stream).await;
        }
        true
    }
}

/// How long a denied client may talk to mxgate before it is closed on.
pub const DENY_TIME: Duration = Duration::from_secs(10);
/// How many bytes a denied client may send before it is closed on.
pub const DENY_BYTES: usize = 4096;
/// RFC 5321 §3.1: after a 554 greeting, every command but QUIT gets this.
const BAD_SEQUENCE: &[u8] = b"503 5.5.1 Bad sequence of commands\r\n";

impl Closer {
    /// RFC 5321 §3.1 for a client that will never be accepted: greet with 554, answer every
    /// command with 503 until QUIT, which gets 221. Bounded by [`DENY_TIME`] and [`DENY_BYTES`],
    /// and by [`MAX_DENYING`]: past it the client gets the greeting and a close.
    pub async fn deny(&self, mut stream: TcpStream, replies: &Replies) {
        let greeting = replies.line(RejectReason::Denied);
        let Ok(_permit) = self.denying.try_acquire() else {
            // Past the bound: the greeting and a close, without taking one of the lingering
            // slots the other refused clients need.
            return line_and_close(stream, greeting).await;
        };
        let dialogue = async {
            stream.write_all(greeting).await?;
            let mut pending: Vec<u8> = Vec::new();
            let mut seen = 0usize;
            let mut buf = [0u8; 512];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 || seen + n > DENY_BYTES {
                    return Ok::<bool, std::io::Error>(false);
                }
                seen += n;
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let verb = line
                        .split(|b| b.is_ascii_whitespace())
                        .next()
                        .unwrap_or(&[]);
                    if verb.eq_ignore_ascii_case(b"QUIT") {
                        stream.write_all(&replies.bye).await?;
                        return Ok(true);
                    }
                    stream.write_all(BAD_SEQUENCE).await?;
                }
            }
        };
        let quit = matches!(timeout(DENY_TIME, dialogue).await, Ok(Ok(true)));
        if quit && stream.shutdown().await.is_ok() {
            // The dialogue's own slot covers this short drain after the 221.
            drain(&stream).await;
        }
    }
}

/// Writes `line` (within [`WRITE_TIME`]) and half-closes, with no drain: the answer of a
/// dialogue past its bound, which must not take a lingering slot.
pub(super) async fn line_and_close(mut stream: TcpStream, line: &[u8]) {
    if matches!(
        timeout(WRITE_TIME, stream.write_all(line)).await,
        Ok(Ok(()))
    ) {
        let _ = stream.shutdown().await;
    }
}

/// Reads and discards until the client closes, [`LINGER_BYTES`] arrive, or [`LINGER_TIME`]
/// passes. Without this, unread bytes at close() turn the FIN into an RST.
pub(super) async fn drain(stream: &TcpStream) {
    let deadline = Instant::now() + LINGER_TIME;
    let mut seen = 0usize;
    loop {
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Err(_) | Ok(Err(_)) => return,
            Ok(Ok(())) => {}
        }
        if discard(|buf| stream.try_read(buf), &mut seen) == Drained::Done {
            return;
        }
    }
}

/// Where a lingering socket stands after reading what was ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Drained {
    /// Nothing more to read now; keep waiting for the FIN.
    Waiting,
    /// The client closed, failed, or sent [`LINGER_BYTES`]: close the socket.
    Done,
}

/// The drain step both closers run when they look at a refused socket (it is readable, or its
/// first look is due): read and discard what is there, counting it in `seen`, and say whether
/// the socket can be closed. `read` is a non-blocking read.
pub(crate) fn discard(
    mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
    seen: &mut usize,
) -> Drained {
    let mut buf = [0u8; 4096];
    loop {
        match read(&mut buf) {
            Ok(0) => return Drained::Done,
            Ok(n) => {
                *seen += n;
                if *seen >= LINGER_BYTES {
                    return Drained::Done;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Waiting,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Drained::Done,
        }
    }
}
