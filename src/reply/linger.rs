//! Refusals answered by the accept loop itself, with no task and no event-loop registration.
//!
//! Most refused connections need nothing but their one reply line and a clean close, and a
//! flood consists of nothing else. So the accept loop writes the line at once, half-closes, and
//! hands the socket to its [`Lingerer`], which waits for the client's FIN, reading and
//! discarding what the client sends, for at most [`LINGER_TIME`] and
//! [`LINGER_BYTES`](super::LINGER_BYTES), with the same drain step as a task's close
//! (`close::discard`).
//!
//! The wait has two steps:
//! 1. The first look, [`FIRST_LOOK`] after the reply: one non-blocking read, taken with every
//!    other look then due, by a busy accept loop between its accepts or by one timer. A client
//!    on the same host or network has read its line and closed by then, so its socket is
//!    closed at that look, and its FIN woke no thread: the refusal cost accept, send, shutdown,
//!    one read and the close.
//! 2. A client whose FIN has not come by then (a farther one, or one that reads late) is
//!    watched in a small level-triggered epoll set of the lingerer's own and closed when its
//!    FIN is read, so its descriptor and its share of the lingering bound are held about one
//!    round trip, not until some later look. Closing the socket takes it out of the set.
//!
//! The line is sent with `MSG_MORE` and the half-close follows at once, so the kernel puts the
//! FIN in the same segment as the line: the client reads the reply and the end of the stream
//! together.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use rustix::buffer::spare_capacity;
use rustix::event::epoll;
use rustix::net::SendFlags;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use super::close::{discard, Drained};
use super::LINGER_TIME;

/// Events taken from the set per `epoll_wait`.
const EVENTS: usize = 64;

/// How long after its reply a refused socket is first looked at. A few round trips on a LAN,
/// and long enough that a loopback or LAN client has read its line and sent its FIN; short
/// enough that the sockets waiting for it stay few (a flood of 20,000 refusals a second holds
/// about 40 of them).
pub const FIRST_LOOK: Duration = Duration::from_millis(2);

/// The sockets one accept loop is lingering on.
pub struct Lingerer {
    /// Sockets waiting for their first look, oldest first.
    fresh: VecDeque<Fresh>,
    /// Looks that found the client's end already.
    #[cfg(test)]
    closed_at_first_look: u64,
    epoll: AsyncFd<OwnedFd>,
    /// Watched sockets by descriptor. A descriptor is only reused by the kernel once its socket
    /// has been closed, and a watched socket is closed only by its removal from here.
    open: HashMap<RawFd, WatchedSocket>,
    /// Deadlines in order (every socket lingers equally long), with the entry's generation so a
    /// reused descriptor is never closed by its predecessor's deadline.
    deadlines: VecDeque<(Instant, RawFd, u64)>,
    generation: u64,
    timer: Pin<Box<Sleep>>,
    /// The instant `timer` is set for (a first look or a watched socket's deadline), if any.
    armed: Option<Instant>,
    /// Shared bound on lingering connections across the process.
    bound: Arc<Semaphore>,
    linger_time: Duration,
}

/// A socket waiting for its first look.
struct Fresh {
    socket: TcpStream,
    /// When the reply was sent.
    since: Instant,
    _permit: OwnedSemaphorePermit,
}

/// A socket watched in the epoll set.
struct WatchedSocket {
    socket: TcpStream,
    /// Bytes read and discarded so far.
    seen: usize,
    generation: u64,
    _permit: OwnedSemaphorePermit,
}

/// What became of a refusal.
pub enum Lingered {
    /// The line was written and the socket half-closed; it lingers or is closed.
    Done,
    /// The client's window could not take the whole line at once (it has a zero window): the
    /// caller finishes the reply asynchronously from `written` bytes on.
    Partial { socket: TcpStream, written: usize },
}

impl Lingerer {
    /// A lingerer on the current runtime. `bound` is shared by every path that lingers.
    pub fn new(bound: Arc<Semaphore>) -> io::Result<Lingerer> {
        Self::with_time(bound, LINGER_TIME)
    }

    /// As [`Lingerer::new`], lingering `linger_time` at most (tests shorten it).
    pub fn with_time(bound: Arc<Semaphore>, linger_time: Duration) -> io::Result<Lingerer> {
        let epoll: OwnedFd = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        // SAFETY: an OwnedFd keeps its one descriptor open, unchanged, until it is dropped,
        // which happens only with the AsyncFd.
        let epoll = unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }?;
        Ok(Lingerer {
            fresh: VecDeque::new(),
            #[cfg(test)]
            closed_at_first_look: 0,
            epoll,
            open: HashMap::new(),
            deadlines: VecDeque::new(),
            generation: 0,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: None,
            bound,
            linger_time,
        })
    }

    /// Sockets lingering now.
    pub fn lingering(&self) -> usize {
        self.fresh.len() + self.open.len()
    }

    /// Answers a refused client with `line`, half-closes, and lingers on the socket (or closes
    /// it at once past the bound). Never waits.
    pub fn refuse(&mut self, socket: TcpStream, line: &[u8]) -> Lingered {
        let written = match send_more(&socket, line) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            // Reset or gone already: nobody to answer.
            Err(_) => return Lingered::Done,
        };
        if written < line.len() {
            return Lingered::Partial { socket, written };
        }
        // FIN after the line, in the same segment: the client reads the reply, then the end.
        if socket.shutdown(std::net::Shutdown::Write).is_err() {
            return Lingered::Done;
        }
        let Ok(permit) = self.bound.clone().try_acquire_owned() else {
            return Lingered::Done;
        };
        self.fresh.push_back(Fresh {
            socket,
            since: Instant::now(),
            _permit: permit,
        });
        Lingered::Done
    }

    /// Takes the first looks due by `now`: closes the sockets whose client has finished, and
    /// watches the others in the epoll set until their FIN or their time.
    fn first_looks(&mut self, now: Instant) {
        while let Some(f) = self.fresh.front() {
            if f.since + FIRST_LOOK > now {
                break;
            }
            let f = self.fresh.pop_front().expect("a front entry");
            let mut seen = 0;
            let socket = &f.socket;
            if discard(|buf| (&*socket).read(buf), &mut seen) == Drained::Done {
                #[cfg(test)]
                {
                    self.closed_at_first_look += 1;
                }
                continue;
            }
            self.watch(f, seen);
        }
    }

    /// Adds a socket past its first look to the epoll set; closes it if it cannot be added.
    fn watch(&mut self, f: Fresh, seen: usize) {
        let fd = f.socket.as_raw_fd();
        let added = epoll::add(
            self.epoll.get_ref(),
            &f.socket,
            epoll::EventData::new_u64(fd as u64),
            epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
        );
        if added.is_err() {
            return;
        }
        self.generation += 1;
        self.open.insert(
            fd,
            WatchedSocket {
                socket: f.socket,
                seen,
                generation: self.generation,
                _permit: f._permit,
            },
        );
        self.deadlines
            .push_back((f.since + self.linger_time, fd, self.generation));
        // Entries that closed early leave their deadline behind; drop those now and then so
        // the queue stays proportional to what is open.
        if self.deadlines.len() > 4 * self.open.len() + 1024 {
            let open = &self.open;
            self.deadlines
                .retain(|&(_, fd, g)| open.get(&fd).is_some_and(|e| e.generation == g));
        }
    }

    /// Waits for the next thing to do (a first look, a watched client's bytes or FIN, or a
    /// deadline) and does it. Cancel-safe: it can lose a `select!` at any point without losing
    /// anything.
    pub async fn turn(&mut self) {
        if self.lingering() == 0 {
            return std::future::pending().await;
        }
        let look = self.fresh.front().map(|f| f.since + FIRST_LOOK);
        let deadline = self.deadlines.front().map(|d| d.0);
        let next = look.into_iter().chain(deadline).min();
        if let Some(at) = next {
            if self.armed != Some(at) {
                self.timer.as_mut().reset(at);
                self.armed = Some(at);
            }
        }
        let watching = !self.open.is_empty();
        let fired = tokio::select! {
            ready = self.epoll.readable(), if watching => match ready {
                Ok(mut guard) => {
                    let fired = wait_events(guard.get_inner());
                    // Fewer events than asked for: the set is empty of events now.
                    if fired.len() < EVENTS {
                        guard.clear_ready();
                    }
                    fired
                }
                Err(_) => Vec::new(),
            },
            () = self.timer.as_mut(), if next.is_some() => {
                self.armed = None;
                let now = Instant::now();
                self.first_looks(now);
                self.expire(now);
                Vec::new()
            }
        };
        self.take(fired);
    }

    /// Handles what is ready now, without waiting: called by a busy accept loop every few
    /// accepts, since under a flood it may not come back to [`Lingerer::turn`] for a while.
    pub fn reap(&mut self) {
        if self.lingering() == 0 {
            return;
        }
        let now = Instant::now();
        self.first_looks(now);
        if self.open.is_empty() {
            return;
        }
        while self.take(wait_events(self.epoll.get_ref())) {}
        self.expire(now);
    }

    /// Handles the sockets `fired` names; returns whether there may be more (a full batch).
    fn take(&mut self, fired: Vec<RawFd>) -> bool {
        let more = fired.len() == EVENTS;
        for fd in fired {
            self.read_from(fd);
        }
        more
    }

    /// Reads and discards what a lingering client sent; closes at its end or past the cap.
    fn read_from(&mut self, fd: RawFd) {
        let Some(entry) = self.open.get_mut(&fd) else {
            return;
        };
        let socket = &entry.socket;
        if discard(|buf| (&*socket).read(buf), &mut entry.seen) == Drained::Done {
            // Closing the only descriptor also takes the socket out of the epoll set.
            self.open.remove(&fd);
        }
    }

    /// Closes the watched sockets whose time is up by `now`.
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, fd, generation)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            if self
                .open
                .get(&fd)
                .is_some_and(|e| e.generation == generation)
            {
                self.open.remove(&fd);
            }
        }
    }
}

/// The descriptors with events in an epoll set, without waiting.
fn wait_events(epoll: &OwnedFd) -> Vec<RawFd> {
    let mut events = Vec::with_capacity(EVENTS);
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // A zero timeout never blocks; an error (EINTR) reads as no events this time.
    let _ = epoll::wait(epoll, spare_capacity(&mut events), Some(&now));
    events.iter().map(|ev| ev.data.u64() as RawFd).collect()
}

/// One non-blocking send that lets the kernel hold the bytes for the FIN that follows.
fn send_more(socket: &TcpStream, line: &[u8]) -> io::Result<usize> {
    let flags = SendFlags::MORE | SendFlags::NOSIGNAL | SendFlags::DONTWAIT;
    loop {
        match rustix::net::send(socket, line, flags) {
            Err(rustix::io::Errno::INTR) => {}
            r => return Ok(r?),
        }
    }
}

#[cfg(test)]
mod tests;
