//! Listening sockets, and keeping the accept loop alive when accept() fails.
//!
//! The accept loop must never die: running out of descriptors (EMFILE, ENFILE), of buffers
//! (ENOBUFS, ENOMEM) or a client aborting in the backlog (ECONNABORTED) is met with a short,
//! growing back-off and a rate-limited warning. This module never reads client bytes.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::time::Instant;

/// Listen backlog asked for; the kernel caps it at `net.core.somaxconn`.
const BACKLOG: i32 = 4096;
/// The first pause after a failed accept.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// The longest pause while accept keeps failing.
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How often, at most, accept failures are logged.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Binds a listening socket. IPv6 sockets are IPv6-only, so `0.0.0.0:25` and `[::]:25` can be
/// listed together.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Accepts one connection, non-blocking and close-on-exec, without registering it with the
/// event loop: the caller decides whether it ever needs to be (a refused client does not).
pub fn accept_raw(
    listener: &std::net::TcpListener,
) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    use rustix::net::{acceptfrom_with, SocketFlags};
    let (fd, addr) = acceptfrom_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?;
    let stream = std::net::TcpStream::from(fd);
    let peer = addr
        .and_then(|a| SocketAddr::try_from(a).ok())
        .ok_or_else(|| io::Error::other("accepted a connection that is not TCP/IP"))?;
    Ok((stream, peer))
}

/// A descriptor held for the moment the process runs out: given up for one accept, so a
/// client in the backlog can still be answered, then opened again once there is room.
pub struct Reserve(Option<std::os::fd::OwnedFd>);

impl Reserve {
    pub fn open() -> Reserve {
        let mut r = Reserve(None);
        r.restore();
        r
    }

    /// Closes the reserve, if held; whether there was one to give up.
    pub fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Opens the reserve again if it was given up; a no-op while descriptors are still short.
    pub fn restore(&mut self) {
        if self.0.is_none() {
            use rustix::fs::{Mode, OFlags};
            self.0 =
                rustix::fs::open("/dev/null", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok();
        }
    }
}

/// Back-off and log throttling for accept() failures.
pub struct AcceptErrors {
    /// The next pause; doubles while failures go on, resets on success.
    backoff: Duration,
    /// When the last warning was logged.
    last_warn: Option<Instant>,
    /// Failures since the last warning.
    suppressed: u64,
}

impl Default for AcceptErrors {
    fn default() -> Self {
        AcceptErrors {
            backoff: BACKOFF_MIN,
            last_warn: None,
            suppressed: 0,
        }
    }
}

impl AcceptErrors {
    pub fn success(&mut self) {
        self.backoff = BACKOFF_MIN;
    }

    /// A failure after which clients were still answered (from the reserve): the next pause
    /// stays short, so the backlog keeps being answered, while the warning stays rate-limited.
    pub fn answered(&mut self) {
        self.backoff = BACKOFF_MIN;
    }

    /// Records a failure, logs at most once per [`WARN_INTERVAL`], and returns how long to pause.
    pub fn failure(&mut self, addr: SocketAddr, e: &io::Error) -> Duration {
        self.suppressed += 1;
        let now = Instant::now();
        if self.last_warn.is_none_or(|t| now - t >= WARN_INTERVAL) {
            tracing::warn!(
                listen = %addr,
                error = %e,
                failures = self.suppressed,
                hint = hint(e),
                "accept failed; backing off"
            );
            self.last_warn = Some(now);
            self.suppressed = 0;
        }
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        pause
    }
}

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EMFILE) => "process is out of file descriptors: raise LimitNOFILE",
        Some(libc::ENFILE) => "system is out of file descriptors: raise fs.file-max",
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => "kernel is out of socket memory",
        Some(libc::ECONNABORTED) => "a client gave up while queued",
        _ => "",
    }
}
