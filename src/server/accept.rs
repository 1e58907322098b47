//! The threads that accept, and their accept loops. Every worker runs an accept loop on every
//! listener; an accept loop decides admission ([`Gate::triage`]), sends refusals to its
//! [`Door`], and gives every other connection its own task on the same worker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::gate::{Gate, Triage};
use crate::listener::{self, AcceptErrors, Reserve};
use crate::local_errors::{Errno, Op};
use crate::reason::RejectReason;
use crate::reply::Door;

/// How often an idle accept loop wakes to show it is alive; the watchdog needs a period of at
/// least four times this.
pub(super) const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);

/// The threads that accept connections and run their sessions, each with a single-threaded
/// runtime of its own, as HAProxy and nginx run one event loop per core. A session lives on
/// the thread that accepted it: its wake-ups never cross threads, and no thread is woken to
/// steal work. The caller's runtime keeps the control work (signals, reload, metrics, health
/// checks).
pub(super) struct Workers {
    pub(super) handles: Vec<tokio::runtime::Handle>,
    /// Cancelled to let the threads end, dropping whatever tasks they still hold.
    done: CancellationToken,
}

impl Workers {
    pub(super) fn start(count: usize) -> std::io::Result<Workers> {
        let done = CancellationToken::new();
        let mut handles = Vec::with_capacity(count);
        for i in 0..count {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let end = done.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("mxgate-{i}"))
                .spawn(move || rt.block_on(end.cancelled()));
            if let Err(e) = spawned {
                done.cancel();
                return Err(e);
            }
        }
        Ok(Workers { handles, done })
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.done.cancel();
    }
}

/// How many worker threads to run: as configured, or one per CPU this process may run on
/// (which honours a systemd `CPUAffinity=` or a container's CPU limit).
pub(super) fn worker_count(config: &Config) -> usize {
    match config.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// How many connections one turn of an accept loop takes before it looks at its other work.
const ACCEPT_BATCH: usize = 64;
/// How often, in accepted connections, a busy accept loop looks at its lingering refusals.
const LINGER_EVERY: usize = 16;

/// One worker's accept loop on one listener.
pub(super) struct AcceptLoop {
    listener: AsyncFd<std::net::TcpListener>,
    addr: SocketAddr,
    door: Door,
}

impl AcceptLoop {
    /// Registers the listener with the current (worker) runtime and sets up its refusal set.
    pub(super) fn new(
        listener: std::net::TcpListener,
        addr: SocketAddr,
        gate: &Gate,
    ) -> std::io::Result<Self> {
        // SAFETY: the std listener owns its descriptor and keeps it open, unchanged, until it
        // is dropped, which happens only with the AsyncFd.
        let listener = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }?;
        Ok(AcceptLoop {
            listener,
            addr,
            door: Door::new(&gate.closer)?,
        })
    }

    /// Accepts until `stop`. Admission is decided here; a refusal with a one-line reply is
    /// answered here too (see `linger`), and every other connection gets its own task.
    pub(super) async fn run(
        mut self,
        gate: Arc<Gate>,
        sessions: TaskTracker,
        stop: CancellationToken,
        heartbeat: Arc<AtomicU64>,
    ) {
        let (listener, door) = (&self.listener, &mut self.door);
        let mut errors = AcceptErrors::default();
        let mut reserve = Reserve::open();
        // Wake now and then even when idle, so the heartbeat shows the loop is alive.
        let mut alive = tokio::time::interval(HEARTBEAT_INTERVAL);
        alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // Registered once: a fresh cancellation wait per accept would take a lock each time.
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            heartbeat.fetch_add(1, Ordering::Relaxed);
            let accepted = tokio::select! {
                biased;
                () = &mut stopped => return,
                // Before accepting: under a flood the listener is always ready, and lingering
                // clients whose FIN is never read would fill the set until every refusal is
                // closed at once.
                () = door.turn() => continue,
                r = listener.async_io(Interest::READABLE, listener::accept_raw) => r,
                _ = alive.tick() => continue,
            };
            // Take what is queued, up to a batch, before looking at anything else.
            let mut next = Some(accepted);
            let mut taken = 0;
            while let Some(accepted) = next.take() {
                match accepted {
                    Ok((stream, peer)) => {
                        errors.success();
                        gate.metrics.accepted.increment(1);
                        dispatch(door, &gate, &sessions, stream, peer);
                    }
                    Err(e) => {
                        if exhausted(listener.get_ref(), &gate, &mut reserve, &e) > 0 {
                            errors.answered();
                        }
                        reserve.restore();
                        let pause = errors.failure(self.addr, &e);
                        tokio::select! {
                            () = &mut stopped => return,
                            () = tokio::time::sleep(pause) => {}
                        }
                        break;
                    }
                }
                taken += 1;
                if taken % LINGER_EVERY == 0 {
                    door.reap();
                }
                if taken < ACCEPT_BATCH {
                    next = match listener.try_io(Interest::READABLE, listener::accept_raw) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                        r => Some(r),
                    };
                }
            }
        }
    }
}

/// Out of descriptors: counts the failure and, giving up the reserve descriptor, answers the
/// clients in the backlog with the global-limit 421 and closes each at once, so none sits
/// there unanswered. Returns how many were answered.
fn exhausted(
    listener: &std::net::TcpListener,
    gate: &Gate,
    reserve: &mut Reserve,
    e: &std::io::Error,
) -> usize {
    let Some(errno) = Errno::of(e) else { return 0 };
    gate.metrics
        .local_errors
        .get(Op::Accept, errno)
        .increment(1);
    if !matches!(errno, Errno::Emfile | Errno::Enfile) || !reserve.release() {
        return 0;
    }
    let live = gate.live.load_full();
    let line = live.replies.line(RejectReason::GlobalLimit);
    let mut answered = 0;
    while answered < ACCEPT_BATCH {
        let Ok((stream, peer)) = listener::accept_raw(listener) else {
            break;
        };
        gate.metrics.accepted.increment(1);
        let ip = peer.ip().to_canonical();
        let refusal = gate.refusal_of(RejectReason::GlobalLimit, ip, &live);
        gate.closer.refuse_now(&stream, refusal, line);
        answered += 1;
    }
    answered
}

/// Sends a new connection where triage says: a task of its own, or the refusal door.
fn dispatch(
    door: &mut Door,
    gate: &Arc<Gate>,
    sessions: &TaskTracker,
    stream: std::net::TcpStream,
    peer: SocketAddr,
) {
    match gate.triage(peer) {
        Triage::Refuse(refusal, live) => door.refuse(stream, refusal, &live.replies, sessions),
        Triage::Task(start) => match TcpStream::from_std(stream) {
            Ok(s) => {
                sessions.spawn(gate.clone().run(s, peer, start));
            }
            Err(e) => tracing::warn!(error = %e, "cannot register a connection; closing it"),
        },
    }
}
