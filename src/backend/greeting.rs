//! Reading the backend's greeting before the client sees any of it.
//!
//! The first line's reply code decides: a 4xx means the backend is busy (Exchange's "421 4.3.2
//! The maximum number of concurrent server connections has exceeded a limit"), and mxgate
//! absorbs it; anything else, a 220 or a 5xx, multi-line or not, is passed on byte for byte,
//! with whatever else came in the same burst. So only the first four bytes are ever judged, and
//! a backend that is not SMTP at all (its first byte is not a `4`) is forwarded as before.
//!
//! The first burst is read in userspace, and handed to the client by one write: what the
//! forwarder would have done with it. A read shorter than the buffer proves the socket empty,
//! so the forwarder does not ask again.
//!
//! While it waits, what the client sends (an early talker, or a protocol where the client
//! speaks first) goes on to the backend and a copy is kept, up to [`MAX_KEPT`], so that it
//! can be sent again, in order, to the next backend if this one turns out to be busy. A client
//! that sends more than that, or half-closes, before any greeting has committed itself to this
//! backend: the wait ends and forwarding takes over, the backend's answer included.

use std::io;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// The most client bytes kept for a replay; past it the client is read no further until the
/// greeting comes (TCP flow control holds the rest).
pub const MAX_KEPT: usize = 1024;

/// The first read of the greeting.
const FIRST_READ: usize = 4096;

/// What the backend's first words were.
#[derive(Debug, PartialEq, Eq)]
pub enum Greeting {
    /// Not a temporary refusal, or the client committed itself to this backend: these bytes
    /// go to the client first, then forwarding. Empty when the backend closed without a word.
    Pass(Vec<u8>),
    /// A 4xx greeting, with what was read of it: the backend is full.
    Busy(Vec<u8>),
    /// Nothing within the time.
    Silent,
    /// The backend failed (a reset) before its greeting.
    Failed,
    /// The client reset its connection while waiting.
    ClientGone,
}

/// How far the bytes so far go to decide.
fn judge(first: &[u8]) -> Option<bool> {
    let busy_prefix = |i: usize, b: u8| match i {
        0 => b == b'4',
        1 | 2 => b.is_ascii_digit(),
        _ => matches!(b, b' ' | b'-' | b'\r' | b'\n'),
    };
    for (i, &b) in first.iter().take(4).enumerate() {
        if !busy_prefix(i, b) {
            return Some(false);
        }
    }
    (first.len() >= 4).then_some(true)
}

/// Waits for the backend's greeting for at most `limit`, moving what the client sends
/// meanwhile to the backend and keeping a copy of it in `kept`.
pub async fn read(
    backend: &TcpStream,
    client: &TcpStream,
    kept: &mut Vec<u8>,
    limit: Duration,
) -> Greeting {
    tokio::time::timeout(limit, exchange(backend, client, kept))
        .await
        .unwrap_or(Greeting::Silent)
}

async fn exchange(backend: &TcpStream, client: &TcpStream, kept: &mut Vec<u8>) -> Greeting {
    let mut first: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            biased;
            ready = backend.readable() => {
                let burst = match ready {
                    Ok(()) => read_burst(backend, &mut first),
                    Err(e) => Err(e),
                };
                match burst {
                    Ok(None) => continue,
                    // Closed: what it said, if anything, goes to the client as it would have.
                    Ok(Some(0)) => return Greeting::Pass(first),
                    Ok(Some(_)) => {}
                    Err(_) => return Greeting::Failed,
                }
                match judge(&first) {
                    Some(true) => return Greeting::Busy(first),
                    Some(false) => return Greeting::Pass(first),
                    None => {}
                }
            }
            ready = client.readable() => {
                if ready.is_err() {
                    return Greeting::ClientGone;
                }
                let mut buf = [0u8; MAX_KEPT];
                let room = MAX_KEPT - kept.len();
                match client.try_read(&mut buf[..room]) {
                    // A half-close: the forwarder passes it on, after whatever the backend says.
                    Ok(0) => return Greeting::Pass(first),
                    Ok(n) => {
                        if write_all(backend, &buf[..n]).await.is_err() {
                            return Greeting::Failed;
                        }
                        kept.extend_from_slice(&buf[..n]);
                        // More than can be replayed: this backend it is.
                        if kept.len() >= MAX_KEPT {
                            return Greeting::Pass(first);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Greeting::ClientGone,
                }
            }
        }
    }
}

/// One read of the backend's first burst into `first`: `Some(n)` for `n` bytes (0 at its
/// close), `None` when it was not ready after all. A short read clears the socket's
/// readiness, so the forwarder's first step waits for new bytes instead of asking the kernel
/// for none.
fn read_burst(backend: &TcpStream, first: &mut Vec<u8>) -> io::Result<Option<usize>> {
    let mut buf = [0u8; FIRST_READ];
    let mut got = 0;
    let res = backend.try_io(Interest::READABLE, || {
        let (n, _) = rustix::net::recv(backend, &mut buf, rustix::net::RecvFlags::empty())
            .map_err(io::Error::from)?;
        got = n;
        if n > 0 && n < FIRST_READ {
            // Drained: tell the reactor so, without a second call.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match res {
        Ok(n) => {
            first.extend_from_slice(&buf[..n]);
            Ok(Some(n))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            first.extend_from_slice(&buf[..got]);
            Ok((got > 0).then_some(got))
        }
        Err(e) => Err(e),
    }
}

/// Writes all of `bytes` to a stream shared by reference.
pub async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How long a busy backend has to answer QUIT and close.
const QUIT_WAIT: Duration = Duration::from_secs(2);

/// Ends the conversation with a busy backend politely: QUIT, then its answer and close are
/// read (for at most [`QUIT_WAIT`]), so that the close is an orderly one, not a reset.
pub fn quit(backend: TcpStream) {
    if backend.try_write(b"QUIT\r\n").is_err() {
        return;
    }
    let _ = socket2::SockRef::from(&backend).shutdown(std::net::Shutdown::Write);
    tokio::spawn(async move {
        let drain = async {
            let mut sink = [0u8; 512];
            loop {
                if backend.readable().await.is_err() {
                    return;
                }
                match backend.try_read(&mut sink) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(QUIT_WAIT, drain).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_four_bytes_decide() {
        assert_eq!(judge(b"421 4.3.2 The maximum"), Some(true));
        assert_eq!(judge(b"421-busy\r\n"), Some(true));
        assert_eq!(judge(b"450\r\n"), Some(true));
        assert_eq!(judge(b"42"), None);
        assert_eq!(judge(b""), None);
        assert_eq!(judge(b"220 mx ESMTP"), Some(false));
        assert_eq!(judge(b"554 no"), Some(false));
        assert_eq!(judge(b"4x"), Some(false));
        assert_eq!(judge(b"4211"), Some(false));
        assert_eq!(judge(b"HTTP"), Some(false));
    }
}
