//! Refusals answered by the accept loop itself, with no task and no event-loop registration.
//!
//! Most refused connections need nothing but their one reply line and a clean close, and a
//! flood consists of nothing else. So the accept loop writes the line at once, half-closes, and
//! hands the socket to its [`Lingerer`], which waits for the client's FIN, reading and
//! discarding what the client sends, for at most [`LINGER_TIME`](super::LINGER_TIME) and
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
    open: HashMap<RawFd, Entry>,
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
struct Entry {
    socket: TcpStream,
    /// Bytes read and discarded so far.
    seen: usize,
    generation: u64,
    _permit: OwnedSemaphorePermit,
}

/// What became of a refusal.
pub enum Refusal {
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
    pub fn refuse(&mut self, socket: TcpStream, line: &[u8]) -> Refusal {
        let written = match send_more(&socket, line) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            // Reset or gone already: nobody to answer.
            Err(_) => return Refusal::Done,
        };
        if written < line.len() {
            return Refusal::Partial { socket, written };
        }
        // FIN after the line, in the same segment: the client reads the reply, then the end.
        if socket.shutdown(std::net::Shutdown::Write).is_err() {
            return Refusal::Done;
        }
        let Ok(permit) = self.bound.clone().try_acquire_owned() else {
            return Refusal::Done;
        };
        self.fresh.push_back(Fresh {
            socket,
            since: Instant::now(),
            _permit: permit,
        });
        Refusal::Done
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
            Entry {
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
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LINE: &[u8] = b"421 4.3.2 mx.test Too many connections, try again later\r\n";

    /// A connected pair: the client's tokio stream and the server's blocking-free std socket.
    async fn pair() -> (tokio::net::TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (c, s)
    }

    /// Drives the lingerer until `done` holds, failing after five seconds.
    async fn drive_until(l: &mut Lingerer, done: impl Fn(&Lingerer) -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !done(l) {
                l.turn().await;
            }
        })
        .await
        .expect("the lingerer got there in time");
    }

    #[tokio::test]
    async fn the_client_reads_the_line_then_the_end_and_the_socket_closes() {
        let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
        let (mut c, s) = pair().await;
        assert!(matches!(l.refuse(s, LINE), Refusal::Done));
        assert_eq!(l.lingering(), 1);
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, LINE);
        drop(c);
        drive_until(&mut l, |l| l.lingering() == 0).await;
    }

    #[tokio::test]
    async fn a_client_that_has_closed_by_the_first_look_is_closed_there_and_never_watched() {
        let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
        let (mut c, s) = pair().await;
        assert!(matches!(l.refuse(s, LINE), Refusal::Done));
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, LINE);
        drop(c);
        // Until the FIN has reached the server's socket (the kernel may defer delivering it),
        // without taking the first look.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let peek = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
        while !matches!(
            rustix::net::recv(&l.fresh[0].socket, &mut [0u8; 1], peek),
            Ok((0, _))
        ) {
            assert!(std::time::Instant::now() < deadline, "the FIN arrived");
            tokio::task::yield_now().await;
        }
        drive_until(&mut l, |l| l.lingering() == 0).await;
        assert_eq!(l.closed_at_first_look, 1);
        assert_eq!(l.generation, 0, "nothing was added to the epoll set");
    }

    #[tokio::test]
    async fn a_client_whose_fin_comes_after_the_first_look_is_closed_on_its_fin() {
        // A farther client: its FIN comes well after the first look. It must give its share of
        // the lingering bound back when that FIN arrives, not at some later look or at its time
        // (here 30 s).
        let mut l =
            Lingerer::with_time(Arc::new(Semaphore::new(8)), Duration::from_secs(30)).unwrap();
        let (mut c, s) = pair().await;
        assert!(matches!(l.refuse(s, LINE), Refusal::Done));
        drive_until(&mut l, |l| l.open.len() == 1).await;
        assert_eq!(l.closed_at_first_look, 0);
        // The scenario: this client closes a while after its first look.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, LINE);
        drop(c);
        let fin = Instant::now();
        drive_until(&mut l, |l| l.lingering() == 0).await;
        assert!(
            fin.elapsed() < Duration::from_secs(3),
            "closed on the FIN, not at a later look: {:?}",
            fin.elapsed()
        );
    }

    #[tokio::test]
    async fn a_client_that_reads_late_still_reads_the_whole_line() {
        let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
        let (mut c, s) = pair().await;
        assert!(matches!(l.refuse(s, LINE), Refusal::Done));
        // The scenario, not a synchronisation: this client looks at its socket a while after
        // mxgate has answered it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, LINE);
        drop(c);
        drive_until(&mut l, |l| l.lingering() == 0).await;
    }

    #[tokio::test]
    async fn a_client_that_sends_quit_after_the_line_gets_no_reset() {
        // As Postfix does: read the 421, then QUIT, then close.
        let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
        let (c, s) = pair().await;
        assert!(matches!(l.refuse(s, LINE), Refusal::Done));
        let mut c = tokio::io::BufReader::new(c);
        let mut line = Vec::new();
        tokio::io::AsyncBufReadExt::read_until(&mut c, b'\n', &mut line)
            .await
            .unwrap();
        assert_eq!(line, LINE);
        c.get_mut().write_all(b"QUIT\r\n").await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "end of stream after the line, no reset");
        drop(c);
        drive_until(&mut l, |l| l.lingering() == 0).await;
    }

    #[tokio::test]
    async fn a_client_that_talks_only_after_its_line_was_sent_can_still_write_and_read() {
        // Why every refused socket lingers, not only those whose receive queue is already
        // non-empty when the line is sent: a client that pipelines without waiting for the
        // greeting may have its bytes in flight at that moment. Were the socket closed then,
        // its bytes would draw a reset and its writes fail before it reads the reply.
        let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
        let (mut c, s) = pair().await;
        assert!(matches!(l.refuse(s, LINE), Refusal::Done));
        let mut head = [0u8; 1];
        c.read_exact(&mut head).await.unwrap();
        let drive = async {
            loop {
                l.turn().await;
            }
        };
        let client = async {
            // 48 KiB, under the byte cap.
            for _ in 0..6 {
                c.write_all(&[b'x'; 8 * 1024]).await.unwrap();
            }
            let mut got = head.to_vec();
            c.read_to_end(&mut got).await.unwrap();
            got
        };
        let got = tokio::select! {
            got = client => got,
            _ = drive => unreachable!(),
        };
        assert_eq!(got, LINE);
    }

    #[tokio::test]
    async fn bytes_the_client_sends_are_read_so_no_reset_loses_the_line() {
        let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
        let (mut c, s) = pair().await;
        c.write_all(&[b'x'; 20_000]).await.unwrap();
        assert!(matches!(l.refuse(s, LINE), Refusal::Done));
        c.write_all(b"QUIT\r\n").await.unwrap();
        // Past the first look (which read what was there) and watched, until every byte is
        // read: the early ones counted at the first look carry into the watched entry.
        drive_until(&mut l, |l| {
            l.fresh.is_empty() && l.open.len() == 1 && l.open.values().all(|e| e.seen == 20_006)
        })
        .await;
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, LINE, "the line, then a clean end of stream");
        c.shutdown().await.unwrap();
        drive_until(&mut l, |l| l.lingering() == 0).await;
    }

    #[tokio::test]
    async fn a_client_that_keeps_sending_is_closed_past_the_byte_cap() {
        let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
        let (c, s) = pair().await;
        assert!(matches!(l.refuse(s, LINE), Refusal::Done));
        let mut c = c.into_std().unwrap();
        c.set_nonblocking(false).unwrap();
        let writer = std::thread::spawn(move || {
            let chunk = [b'y'; 8192];
            // Stops at the reset that follows the close past the cap.
            while c.write_all(&chunk).is_ok() {}
        });
        drive_until(&mut l, |l| l.lingering() == 0).await;
        writer.join().unwrap();
    }

    #[tokio::test]
    async fn reap_closes_what_is_ready_without_the_event_loop() {
        // A busy accept loop calls reap() every few accepts instead of waiting in turn().
        let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
        let (mut c, s) = pair().await;
        assert!(matches!(l.refuse(s, LINE), Refusal::Done));
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        drop(c);
        // The client's FIN is in flight on loopback; reap only ever looks, never waits.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while l.lingering() > 0 {
            assert!(std::time::Instant::now() < deadline, "reaped in time");
            l.reap();
            std::thread::yield_now();
        }
        assert_eq!(got, LINE);
    }

    #[tokio::test]
    async fn a_silent_client_is_closed_when_its_time_is_up() {
        let time = Duration::from_millis(100);
        let mut l = Lingerer::with_time(Arc::new(Semaphore::new(8)), time).unwrap();
        let (_c, s) = pair().await;
        let start = Instant::now();
        assert!(matches!(l.refuse(s, LINE), Refusal::Done));
        drive_until(&mut l, |l| l.lingering() == 0).await;
        assert!(start.elapsed() >= time, "not before its time");
        assert!(l.deadlines.is_empty());
    }

    #[tokio::test]
    async fn past_the_bound_the_socket_is_closed_right_after_the_line() {
        let bound = Arc::new(Semaphore::new(1));
        let mut l = Lingerer::new(bound).unwrap();
        let (_held, s1) = pair().await;
        let (mut c2, s2) = pair().await;
        assert!(matches!(l.refuse(s1, LINE), Refusal::Done));
        assert!(matches!(l.refuse(s2, LINE), Refusal::Done));
        assert_eq!(l.lingering(), 1, "the second is not kept");
        let mut got = Vec::new();
        c2.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, LINE);
    }
}
