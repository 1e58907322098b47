//! The zero-copy forwarder for Linux: socket → pipe → socket with splice(2).
//!
//! Only bulk is spliced. Every burst starts with one userspace read of at most 16 KiB (the
//! `copy` module says why that is cheaper for SMTP's commands and replies); when that read
//! fills up, the rest of the burst goes through a pipe.
//! A direction whose last burst was bulk starts its next burst in the pipe straight away.
//!
//! Rules this module keeps, each learnt from other proxies' bugs:
//! - A direction borrows a pipe from a bounded [`PipePool`] only for a burst and returns it as
//!   soon as it is empty, so an idle session holds no pipe (2 fds, not 6), and thousands of idle
//!   sessions never run into the per-user pipe quota (`fs.pipe-user-pages-soft`).
//! - It only ever splices into an *empty* pipe, so EAGAIN from socket→pipe means "socket empty"
//!   and clearing tokio's readiness is right; EAGAIN from pipe→socket means "destination full".
//! - The length passed is never above the pipe's real size (read back with `F_GETPIPE_SZ`).
//! - The FIN toward the destination is sent only after the pipe has been drained into it.
//! - A pipe that still holds bytes when its session ends is closed, never pooled.
//! - When no pipe is free, that step is copied through userspace instead; when splice itself is
//!   refused (EINVAL, ENOSYS), the session switches to copying and the fallback is counted.
//!
//! This module must never drop, reorder or duplicate a byte, and never block a thread.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::pipe::{PipeFlags, SpliceFlags};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge};
use tokio::io::Interest;

use super::copy::{self, Burst};
use super::{write_ready, Flow, Side};

/// The most pipes a privileged process keeps in existence; each costs two descriptors.
const MAX_PIPES_PRIVILEGED: usize = 1024;
/// The fewest pipes a pool allows, so splice is used at all under a tiny quota.
const MIN_PIPES: usize = 4;

/// A pipe owned by the pool, with the size the kernel actually gave it.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

/// A bounded set of pipes shared by every session.
pub struct PipePool {
    idle: Mutex<Vec<Pipe>>,
    /// Pipes in existence: idle in the pool or borrowed by a direction.
    live: AtomicUsize,
    /// The bound on `live`.
    max: usize,
    /// The size asked for with `F_SETPIPE_SZ`.
    want_size: usize,
    /// Steps that were copied because every pipe was in use.
    exhausted: Counter,
    /// Pipes in existence, as `live`, for operators.
    pipes: Gauge,
}

impl PipePool {
    /// A pool of pipes of about `pipe_size` bytes (capped at `fs.pipe-max-size`), bounded so
    /// that its pipes fit in half of the per-user pipe quota when running unprivileged.
    pub fn new(pipe_size: usize, exhausted: Counter, pipes: Gauge) -> Arc<PipePool> {
        // systemd's ProcSubset=pid hides /proc/sys: then ask the kernel itself.
        let max_size = read_proc_usize("/proc/sys/fs/pipe-max-size")
            .unwrap_or_else(|| largest_pipe_granted(pipe_size));
        let want_size = pipe_size.min(max_size).max(4096);
        Self::with_bound(want_size, pool_bound(want_size), exhausted, pipes)
    }

    /// A pool of at most `max` pipes of about `want_size` bytes.
    pub fn with_bound(
        want_size: usize,
        max: usize,
        exhausted: Counter,
        pipes: Gauge,
    ) -> Arc<PipePool> {
        tracing::debug!(want_size, max_pipes = max, "splice pipe pool");
        Arc::new(PipePool {
            idle: Mutex::new(Vec::new()),
            live: AtomicUsize::new(0),
            max,
            want_size,
            exhausted,
            pipes,
        })
    }

    /// The most pipes this pool keeps in existence.
    pub fn capacity(&self) -> usize {
        self.max
    }

    /// Pipes in existence right now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Borrows an empty pipe, creating one while under the bound. `None` means "copy this step".
    fn borrow(self: &Arc<Self>) -> Option<Loan> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let pipe = match pooled {
            Some(p) => p,
            None => {
                let reserved = self
                    .live
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < self.max).then_some(n + 1)
                    })
                    .is_ok();
                if !reserved {
                    self.exhausted.increment(1);
                    return None;
                }
                match new_pipe(self.want_size) {
                    Ok(p) => {
                        self.pipes.increment(1.0);
                        p
                    }
                    Err(e) => {
                        self.live.fetch_sub(1, Ordering::AcqRel);
                        self.exhausted.increment(1);
                        tracing::debug!(error = %e, "cannot create a pipe; copying this step");
                        return None;
                    }
                }
            }
        };
        Some(Loan {
            pool: self.clone(),
            pipe: Some(pipe),
            filled: 0,
        })
    }
}

/// A borrowed pipe and how many bytes sit in it. Dropping it returns the pipe when empty and
/// closes it otherwise, so stale bytes can never leak into another session.
struct Loan {
    pool: Arc<PipePool>,
    pipe: Option<Pipe>,
    filled: usize,
}

impl Loan {
    fn pipe(&self) -> &Pipe {
        self.pipe.as_ref().expect("present until drop")
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        let pipe = self.pipe.take().expect("present until drop");
        if self.filled == 0 {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(pipe);
        } else {
            drop(pipe);
            self.pool.live.fetch_sub(1, Ordering::AcqRel);
            self.pool.pipes.decrement(1.0);
        }
    }
}

/// The rest of a bulk burst: through a borrowed pipe while one is free and splice works,
/// through userspace otherwise. Returns how the burst ended and how many bytes it moved.
pub(super) async fn burst(
    flow: &Flow<'_>,
    pool: &Arc<PipePool>,
) -> Result<(Burst, usize), (Side, io::Error)> {
    let step = if flow.shared.splice_failed.load(Ordering::Relaxed) {
        None
    } else {
        pool.borrow()
    };
    match step {
        Some(loan) => splice_burst(flow, loan).await,
        None => copy::burst(flow).await,
    }
}

/// Fills the (empty) pipe from the source and drains it into the destination, until the
/// source has nothing more. Falls back to a copy burst if splice is refused.
async fn splice_burst(
    flow: &Flow<'_>,
    mut loan: Loan,
) -> Result<(Burst, usize), (Side, io::Error)> {
    let mut moved = 0;
    loop {
        debug_assert_eq!(loan.filled, 0, "only an empty pipe is filled");
        let (pipe_in, size) = (&loan.pipe().write, loan.pipe().size);
        let filled = flow
            .src
            .try_io(Interest::READABLE, || splice(flow.src, pipe_in, size));
        match filled {
            Ok(0) => return Ok((Burst::Eof, moved)),
            Ok(n) => loan.filled = n,
            // The pipe is empty, so this can only mean the socket is: readiness is cleared.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((Burst::Drained, moved)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                flow.shared.splice_failed.store(true, Ordering::Relaxed);
                flow.shared.traffic.splice_fallbacks.increment(1);
                tracing::warn!(error = %e, "splice refused for this session; copying instead");
                drop(loan);
                let (end, more) = copy::burst(flow).await?;
                return Ok((end, moved + more));
            }
            Err(e) => return Err((flow.from(), e)),
        }
        moved += loan.filled;
        drain(flow, &mut loan).await?;
    }
}

/// Writes the pipe's bytes to the destination, waiting for room as needed.
async fn drain(flow: &Flow<'_>, loan: &mut Loan) -> Result<(), (Side, io::Error)> {
    while loan.filled > 0 {
        write_ready(flow.dst).await.map_err(|e| (flow.to, e))?;
        let len = loan.filled;
        let pipe_out = &loan.pipe().read;
        match flow
            .dst
            .try_io(Interest::WRITABLE, || splice(pipe_out, flow.dst, len))
        {
            Ok(n) => {
                loan.filled -= n;
                flow.shared.moved(flow.to, n);
                flow.shared.spliced.fetch_add(n as u64, Ordering::Relaxed);
                flow.shared.traffic.spliced.increment(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((flow.to, e)),
        }
    }
    Ok(())
}

/// One non-blocking splice of at most `len` bytes.
fn splice(fd_in: impl AsFd, fd_out: impl AsFd, len: usize) -> io::Result<usize> {
    // Null offsets: both ends are sockets or pipes.
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    Ok(rustix::pipe::splice(fd_in, None, fd_out, None, len, flags)?)
}

/// Creates a non-blocking pipe and grows it towards `want` bytes. Under an exceeded quota the
/// kernel refuses to grow it (EPERM); the pipe is then kept at whatever size it has.
fn new_pipe(want: usize) -> io::Result<Pipe> {
    let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
    // Refused (EPERM) past the quota or fs.pipe-max-size: the pipe keeps the size it has.
    let _ = rustix::pipe::fcntl_setpipe_size(&write, want);
    let size = rustix::pipe::fcntl_getpipe_size(&write)?;
    Ok(Pipe { read, write, size })
}

/// How many pipes of `size` bytes to allow: half of the per-user soft quota when it applies to
/// this process, so the pool never pushes its own pipes down to one page.
fn pool_bound(size: usize) -> usize {
    let privileged = rustix::process::geteuid().is_root();
    let soft_pages = read_proc_usize("/proc/sys/fs/pipe-user-pages-soft").unwrap_or(16384);
    if privileged || soft_pages == 0 {
        return MAX_PIPES_PRIVILEGED;
    }
    let budget = soft_pages * 4096 / 2;
    (budget / size).clamp(MIN_PIPES, MAX_PIPES_PRIVILEGED)
}

/// The largest pipe size up to `want` that the kernel grants this process, found by halving:
/// an unprivileged process may not grow a pipe past `fs.pipe-max-size` (EPERM).
fn largest_pipe_granted(want: usize) -> usize {
    let mut size = want;
    while size > 4096 {
        if new_pipe(size).is_ok_and(|p| p.size >= size) {
            return size;
        }
        size /= 2;
    }
    4096
}

fn read_proc_usize(path: &str) -> Option<usize> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests;
