//! The portable forwarder: read into a userspace buffer, write it out.
//!
//! The buffer is allocated when a burst starts and freed when the source runs dry, so an idle
//! session holds none. The splice forwarder also uses [`burst`] for a step when no pipe is free.

use std::io;

use super::{read_ready, write_all, Flow, Side};

/// Large enough that a bulk transfer makes few system calls, small enough to stay below
/// malloc's mmap threshold so a burst's allocation is cheap.
const BUF_SIZE: usize = 64 * 1024;

/// What a burst ended with.
pub(super) enum Burst {
    /// The source has nothing more for now.
    Drained,
    /// The source sent FIN.
    Eof,
}

pub(super) async fn pump(flow: &Flow<'_>) -> Result<(), (Side, io::Error)> {
    loop {
        read_ready(flow.src).await.map_err(|e| (flow.from(), e))?;
        // Boxed, as in the splice pump: idle sessions hold only their readiness waits.
        if let Burst::Eof = Box::pin(burst(flow)).await? {
            return flow.finish();
        }
    }
}

/// Moves what the source has right now, through a buffer that lives only for this burst.
pub(super) async fn burst(flow: &Flow<'_>) -> Result<Burst, (Side, io::Error)> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if buf.capacity() == 0 {
            buf.reserve_exact(BUF_SIZE);
        }
        buf.clear();
        match flow.src.try_read_buf(&mut buf) {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => {
                write_all(flow.dst, &buf[..n])
                    .await
                    .map_err(|e| (flow.to, e))?;
                flow.shared.moved(flow.to, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((flow.from(), e)),
        }
    }
}
