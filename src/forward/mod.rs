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
//! Bytes are never altered, dropped or reordered. This module never decides admission and never
//! writes anything of its own to either peer.

mod copy;
#[cfg(target_os = "linux")]
pub mod splice;

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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

/// How a forwarded session ended.
#[derive(Debug)]
pub enum End {
    /// Both sides finished sending and every byte was delivered.
    Closed,
    /// No byte moved in either direction for the idle timeout.
    Idle,
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
            End::Fault(Side::Client, _) => "client_error",
            End::Fault(Side::Backend, _) => "backend_error",
            End::Cancelled => "cancelled",
        }
    }
}

/// What a session moved, and how it ended.
#[derive(Debug)]
pub struct Report {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    /// Of those bytes, how many went through a pipe rather than userspace.
    pub spliced: u64,
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
struct Shared<'a> {
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

impl<'a> Shared<'a> {
    /// A session's shared state, starting now with nothing moved.
    fn new(traffic: &'a Traffic) -> Shared<'a> {
        Shared {
            traffic,
            start: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            c2b: AtomicU64::new(0),
            b2c: AtomicU64::new(0),
            spliced: AtomicU64::new(0),
            splice_failed: AtomicBool::new(false),
        }
    }

    fn moved(&self, to: Side, n: usize) {
        let n = n as u64;
        let (total, counter) = match to {
            Side::Backend => (&self.c2b, &self.traffic.client_to_backend),
            Side::Client => (&self.b2c, &self.traffic.backend_to_client),
        };
        total.fetch_add(n, Ordering::Relaxed);
        counter.increment(n);
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }
}

/// One direction of a session: bytes flow from `src` to `dst`.
struct Flow<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    /// The peer `dst` belongs to; `src` is the other one.
    to: Side,
    shared: &'a Shared<'a>,
    /// Whether the last burst was bulk: the next one then skips the small first read.
    bulk: AtomicBool,
}

impl Flow<'_> {
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

/// Moves bytes both ways until both sides have finished, one side fails, no byte moves for
/// `idle`, or `cancel` resolves.
pub async fn forward(
    client: &TcpStream,
    backend: &TcpStream,
    mode: &Mode,
    idle: Duration,
    traffic: &Traffic,
    cancel: impl std::future::Future<Output = ()>,
) -> Report {
    let shared = Shared::new(traffic);
    let up = Flow {
        src: client,
        dst: backend,
        to: Side::Backend,
        shared: &shared,
        bulk: AtomicBool::new(false),
    };
    let down = Flow {
        src: backend,
        dst: client,
        to: Side::Client,
        shared: &shared,
        bulk: AtomicBool::new(false),
    };
    let end = tokio::select! {
        r = async { tokio::try_join!(pump(&up, mode), pump(&down, mode)) } => match r {
            Ok(_) => End::Closed,
            Err((side, e)) => End::Fault(side, e),
        },
        () = idle_watch(&shared, idle) => End::Idle,
        () = cancel => End::Cancelled,
    };
    Report {
        client_to_backend: shared.c2b.load(Ordering::Relaxed),
        backend_to_client: shared.b2c.load(Ordering::Relaxed),
        spliced: shared.spliced.load(Ordering::Relaxed),
        end,
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
        if !flow.bulk.load(Ordering::Relaxed) {
            match copy::first_read(flow)? {
                copy::First::Eof => return flow.finish(),
                copy::First::Drained { rest } => {
                    if !rest.is_empty() {
                        Box::pin(copy::write_rest(flow, rest)).await?;
                    }
                    continue;
                }
                copy::First::Full { rest } => {
                    if !rest.is_empty() {
                        Box::pin(copy::write_rest(flow, rest)).await?;
                    }
                }
            }
        }
        let (end, moved) = match mode {
            Mode::Copy => Box::pin(copy::burst(flow)).await?,
            #[cfg(target_os = "linux")]
            Mode::Splice(pool) => Box::pin(splice::burst(flow, pool)).await?,
        };
        flow.bulk.store(moved >= copy::SMALL, Ordering::Relaxed);
        if let copy::Burst::Eof = end {
            return flow.finish();
        }
    }
}

/// Resolves once no byte has moved for `idle`. One timer, re-armed in place when it fires
/// early because bytes moved meanwhile, so moving bytes never touches the timer.
async fn idle_watch(shared: &Shared<'_>, idle: Duration) {
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    std::future::poll_fn(|cx| loop {
        std::task::ready!(timer.as_mut().poll(cx));
        let last = Duration::from_millis(shared.last_activity_ms.load(Ordering::Relaxed));
        let deadline = shared.start + last + idle;
        if Instant::now() >= deadline {
            return std::task::Poll::Ready(());
        }
        timer.as_mut().reset(deadline);
    })
    .await
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
mod tests {
    use super::*;

    /// Every idle session keeps its forwarding state in memory for its whole life, so that state
    /// must stay small: an idle direction holds only a wait on its socket, never a buffer, a pipe
    /// or a pending write. These bounds catch a change that inlines a burst again.
    #[tokio::test]
    async fn idle_state_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        let traffic = Traffic {
            client_to_backend: Counter::noop(),
            backend_to_client: Counter::noop(),
            spliced: Counter::noop(),
            splice_fallbacks: Counter::noop(),
        };
        let shared = Shared::new(&traffic);
        let flow = Flow {
            src: &a,
            dst: &b,
            to: Side::Backend,
            shared: &shared,
            bulk: AtomicBool::new(false),
        };
        #[cfg(target_os = "linux")]
        let mode = Mode::Splice(splice::PipePool::new(
            65536,
            Counter::noop(),
            metrics::Gauge::noop(),
        ));
        #[cfg(not(target_os = "linux"))]
        let mode = Mode::Copy;
        let pump_size = std::mem::size_of_val(&pump(&flow, &mode));
        assert!(pump_size <= 160, "a pump's state is {pump_size} bytes");
        let token = tokio_util::sync::CancellationToken::new();
        let idle = Duration::from_secs(1);
        let whole = forward(&a, &b, &mode, idle, &traffic, token.cancelled());
        let size = std::mem::size_of_val(&whole);
        assert!(size <= 900, "a session's forwarding state is {size} bytes");
    }
}
