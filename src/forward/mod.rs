//! Forwarding: moves bytes between an admitted client and its backend, both ways, unchanged.
//!
//! [`forward`] runs the two directions concurrently in the session's own task, plus an idle
//! watchdog. Each direction is a *pump* that moves bytes in bursts: wait until the source is
//! readable, move everything it has, go back to waiting. Between bursts a direction holds no
//! buffer and no pipe, so an idle SMTP session costs two sockets and a small task.
//!
//! A FIN from one side shuts down writing toward the other side only once everything before it
//! has been written (half-close), and the other direction goes on until it ends too. An error on
//! either side ends the session: both sockets are closed when the streams drop.
//!
//! Two inactivity limits apply ([`Timeouts`]): the idle timeout while both directions are open,
//! and the shorter half-close timeout once the backend has finished and only the client's
//! direction is left. A backend that has closed has ended the SMTP session (after its 221 or its
//! own 421), so a client that then neither sends nor closes is only holding a slot. The other
//! order is not shortened: a client that finished sending may be waiting for the reply to its
//! message, which a busy server can take minutes to give.
//!
//! Bytes are never altered, dropped or reordered. This module never decides admission and never
//! writes anything of its own to either peer.

mod copy;
#[cfg(target_os = "linux")]
pub mod splice;

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use metrics::Counter;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How bytes are moved. `Splice` is Linux's zero-copy path; `Copy` goes through userspace.
#[derive(Clone)]
pub enum Mode {
    Copy,
    #[cfg(target_os = "linux")]
    Splice(Arc<splice::PipePool>),
}

/// Which peer a fault came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

/// The inactivity limits of a forwarded session. Kept in whole milliseconds, because a copy
/// sits in every idle session's state (a limit beyond 49 days counts as 49 days).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    idle_ms: u32,
    half_close_ms: u32,
}

impl Timeouts {
    /// `idle` applies while both directions are open: no byte moved either way for that long
    /// ends the session. `half_close` applies once the backend has finished: the client sent
    /// nothing and did not close for that long. It is never longer than `idle`.
    pub fn new(idle: Duration, half_close: Duration) -> Timeouts {
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        Timeouts {
            idle_ms: ms(idle),
            half_close_ms: ms(half_close.min(idle)),
        }
    }

    fn idle(self) -> Duration {
        Duration::from_millis(self.idle_ms.into())
    }

    fn half_close(self) -> Duration {
        Duration::from_millis(self.half_close_ms.into())
    }
}

/// How a forwarded session ended.
#[derive(Debug)]
pub enum End {
    /// Both sides finished sending and every byte was delivered.
    Closed,
    /// No byte moved in either direction for the idle timeout.
    Idle,
    /// The backend had finished, and the client neither sent nor closed for the half-close
    /// timeout.
    HalfClosed,
    /// A read or write on one side failed (reset, broken pipe, ...).
    Fault(Side, io::Error),
    /// The session was cut from outside (drain deadline).
    Cancelled,
}

impl End {
    /// A short word for logs.
    pub fn label(&self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle_timeout",
            End::HalfClosed => "half_close_timeout",
            End::Fault(Side::Client, _) => "client_error",
            End::Fault(Side::Backend, _) => "backend_error",
            End::Cancelled => "cancelled",
        }
    }
}

/// Bytes a session moved before forwarding began (the client's early words, the backend's
/// greeting), already counted in [`Traffic`]: the report's totals start from them. Each is at
/// most a few KiB; 32 bits apiece keep a copy in every idle session's state small.
#[derive(Clone, Copy, Debug, Default)]
pub struct Relayed {
    pub client_to_backend: u32,
    pub backend_to_client: u32,
}

/// What a session moved, and how it ended.
#[derive(Debug)]
pub struct Report {
    /// The session's whole bytes each way, what was relayed before forwarding included.
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    /// Of those bytes, how many went through a pipe rather than userspace.
    pub spliced: u64,
    /// From the start of forwarding to its end.
    pub duration: Duration,
    pub end: End,
}

/// Process-wide counters the pumps feed while bytes move, so long sessions show up live.
#[derive(Clone)]
pub struct Traffic {
    pub client_to_backend: Counter,
    pub backend_to_client: Counter,
    pub spliced: Counter,
    pub splice_fallbacks: Counter,
}

/// State the two pumps of one session share.
struct PumpShared<'a> {
    traffic: &'a Traffic,
    /// When the session started; activity is measured from here.
    start: Instant,
    /// Milliseconds from `start` to the last byte moved in either direction.
    last_activity_ms: AtomicU64,
    c2b: AtomicU64,
    b2c: AtomicU64,
    spliced: AtomicU64,
    /// Set when splice turned out not to work for these sockets; both directions then copy.
    splice_failed: AtomicBool,
}

impl<'a> PumpShared<'a> {
    /// A session's shared state, starting now with what was `relayed` before it.
    fn new(traffic: &'a Traffic, relayed: Relayed) -> PumpShared<'a> {
        PumpShared {
            traffic,
            start: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            c2b: AtomicU64::new(relayed.client_to_backend.into()),
            b2c: AtomicU64::new(relayed.backend_to_client.into()),
            spliced: AtomicU64::new(0),
            splice_failed: AtomicBool::new(false),
        }
    }

    /// When the session ends for inactivity if nothing happens before then.
    fn idle_deadline(&self, limit: Duration) -> Instant {
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        self.start + last + limit
    }

    /// Marks now as the last activity.
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    fn moved(&self, to: Side, n: usize) {
        let n = n as u64;
        let (total, counter) = match to {
            Side::Backend => (&self.c2b, &self.traffic.client_to_backend),
            Side::Client => (&self.b2c, &self.traffic.backend_to_client),
        };
        total.fetch_add(n, Ordering::Relaxed);
        counter.increment(n);
        self.touch();
    }
}

/// One direction of a session: bytes flow from `src` to `dst`.
struct Flow<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    /// The peer `dst` belongs to; `src` is the other one.
    to: Side,
    shared: &'a PumpShared<'a>,
    /// Whether the last burst was bulk: the next one then skips the small first read.
    bulk: AtomicBool,
}

impl<'a> Flow<'a> {
    fn new(src: &'a TcpStream, dst: &'a TcpStream, to: Side, shared: &'a PumpShared<'a>) -> Self {
        Flow {
            src,
            dst,
            to,
            shared,
            bulk: AtomicBool::new(false),
        }
    }

    fn from(&self) -> Side {
        match self.to {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }

    /// Propagates the source's FIN: no more bytes will be written toward `dst`.
    fn finish(&self) -> Result<(), (Side, io::Error)> {
        match socket2::SockRef::from(self.dst).shutdown(std::net::Shutdown::Write) {
            Ok(()) => Ok(()),
            // The peer is already gone; the other direction reports how.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            Err(e) => Err((self.to, e)),
        }
    }
}

/// Moves bytes both ways until both sides have finished, one side fails, the session is
/// inactive past one of its `timeouts`, or `cancel` resolves.
pub async fn forward(
    client: &TcpStream,
    backend: &TcpStream,
    mode: &Mode,
    timeouts: Timeouts,
    traffic: &Traffic,
    relayed: Relayed,
    cancel: std::pin::Pin<&mut (dyn Future<Output = ()> + Send)>,
) -> Report {
    let shared = PumpShared::new(traffic, relayed);
    let mut cancel = cancel;
    let up = Flow::new(client, backend, Side::Backend, &shared);
    let down = Flow::new(backend, client, Side::Client, &shared);
    let mut up_pump = std::pin::pin!(pump(&up, mode));
    let mut down_pump = std::pin::pin!(pump(&down, mode));
    let (mut up_done, mut down_done) = (false, false);
    // One timer, re-armed in place when it fires early because bytes moved meanwhile, so
    // moving bytes never touches the timer. It is brought forward once, when the backend
    // finishes and the shorter half-close limit starts to apply.
    let mut timer = std::pin::pin!(tokio::time::sleep(timeouts.idle()));
    // Hand-written rather than select! and try_join!: each future is kept once, pinned where
    // it is, which keeps every idle session's state small.
    // The closure owns the pins and flags rather than borrowing each: one word apiece.
    let shared_ref = &shared;
    let end = std::future::poll_fn(move |cx| {
        if cancel.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::Cancelled);
        }
        let mut backend_finished_now = false;
        for (pump, done, from_backend) in [
            (up_pump.as_mut(), &mut up_done, false),
            (down_pump.as_mut(), &mut down_done, true),
        ] {
            if *done {
                continue;
            }
            match pump.poll(cx) {
                Poll::Ready(Ok(())) => {
                    *done = true;
                    backend_finished_now = from_backend;
                }
                Poll::Ready(Err((side, e))) => return Poll::Ready(End::Fault(side, e)),
                Poll::Pending => {}
            }
        }
        if up_done && down_done {
            return Poll::Ready(End::Closed);
        }
        // Only the client's direction is left: the half-close limit, counted from the FIN.
        if backend_finished_now {
            shared_ref.touch();
            timer
                .as_mut()
                .reset(shared_ref.idle_deadline(timeouts.half_close()));
        }
        let (limit, end) = if down_done {
            (timeouts.half_close(), End::HalfClosed)
        } else {
            (timeouts.idle(), End::Idle)
        };
        poll_idle(timer.as_mut(), shared_ref, limit, end, cx)
    })
    .await;
    Report {
        client_to_backend: shared.c2b.load(Ordering::Relaxed),
        backend_to_client: shared.b2c.load(Ordering::Relaxed),
        spliced: shared.spliced.load(Ordering::Relaxed),
        duration: shared.start.elapsed(),
        end,
    }
}

/// Ends the session with `end` once it has been inactive for `limit`. The timer fires at the
/// deadline it was last set for; if bytes moved since, it is re-armed for the later deadline
/// instead, so moving bytes never touches it.
fn poll_idle(
    mut timer: std::pin::Pin<&mut tokio::time::Sleep>,
    shared: &PumpShared<'_>,
    limit: Duration,
    end: End,
    cx: &mut std::task::Context<'_>,
) -> Poll<End> {
    loop {
        std::task::ready!(timer.as_mut().poll(cx));
        let deadline = shared.idle_deadline(limit);
        if Instant::now() >= deadline {
            return Poll::Ready(end);
        }
        timer.as_mut().reset(deadline);
    }
}

/// Runs one direction to its end: wait until the source is readable, move a burst, repeat.
///
/// A burst starts with one small read written straight on ([`copy::first_read`]); only when
/// that read fills up does the burst go on in bulk, through a pipe in splice mode. Everything
/// that may wait is boxed, so an idle direction's state is only its readiness wait.
async fn pump(flow: &Flow<'_>, mode: &Mode) -> Result<(), (Side, io::Error)> {
    loop {
        read_ready(flow.src).await.map_err(|e| (flow.from(), e))?;
        // The common case ends here, without a further await: a short read written whole.
        // Anything else continues in one boxed step. Built in this one expression, so that no
        // local of it is kept in the pump's state across the await below.
        let step = match first_step(flow)? {
            Step::Done => continue,
            Step::Eof => return flow.finish(),
            Step::More { rest, bulk } => Box::pin(slow_step(flow, mode, rest, bulk)),
        };
        if let copy::Burst::Eof = step.await? {
            return flow.finish();
        }
    }
}

/// What a direction does after its source became readable.
enum Step {
    /// Moved everything there was; wait for readiness again.
    Done,
    /// The source sent FIN.
    Eof,
    /// Bytes the destination could not take yet, and, if `bulk`, a bulk burst to run.
    More { rest: Vec<u8>, bulk: bool },
}

/// The first, synchronous part of a burst: the small read, unless the direction is in bulk.
fn first_step(flow: &Flow<'_>) -> Result<Step, (Side, io::Error)> {
    if flow.bulk.load(Ordering::Relaxed) {
        return Ok(Step::More {
            rest: Vec::new(),
            bulk: true,
        });
    }
    Ok(match copy::first_read(flow)? {
        copy::First::Eof => Step::Eof,
        copy::First::Drained { rest } if rest.is_empty() => Step::Done,
        copy::First::Drained { rest } => Step::More { rest, bulk: false },
        copy::First::Full { rest } => Step::More { rest, bulk: true },
    })
}

/// The rest of a burst that could not finish at once: write what is pending, then, after a
/// full first read, move the bulk behind it.
async fn slow_step(
    flow: &Flow<'_>,
    mode: &Mode,
    rest: Vec<u8>,
    bulk: bool,
) -> Result<copy::Burst, (Side, io::Error)> {
    if !rest.is_empty() {
        copy::write_rest(flow, rest).await?;
    }
    if !bulk {
        return Ok(copy::Burst::Drained);
    }
    let (end, moved) = match mode {
        Mode::Copy => copy::burst(flow).await?,
        #[cfg(target_os = "linux")]
        Mode::Splice(pool) => splice::burst(flow, pool).await?,
    };
    flow.bulk.store(moved >= copy::SMALL, Ordering::Relaxed);
    Ok(end)
}

/// Waits until `s` may have bytes to read. Uses the socket's own reader waker slot instead of a
/// stored readiness future, which keeps an idle session's task small; each socket has exactly
/// one reader (the pump it feeds), so the one slot is enough.
async fn read_ready(s: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| s.poll_read_ready(cx)).await
}

/// Waits until `s` may take more bytes; each socket has exactly one writer, as with reads.
async fn write_ready(s: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| s.poll_write_ready(cx)).await
}

/// Writes all of `data` to `dst`, waiting for room as needed.
async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        write_ready(dst).await?;
        match dst.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
