//! One real SMTP transaction for the load tool: greeting, EHLO, MAIL, RCPT, DATA, QUIT, with
//! multi-line replies parsed and every step under a timeout. It classifies how the session
//! ended; it never retries.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};

/// Longest reply line, and most lines in one reply, accepted from a server.
const MAX_REPLY_LINE: usize = 2048;
const MAX_REPLY_LINES: usize = 64;

/// How one session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The message was accepted (`250` after DATA).
    Delivered,
    /// The greeting was not 2xx; the key is the code and enhanced code, such as `421 4.7.0`.
    RefusedAtGreeting(String),
    /// A later reply was not what the transaction needed.
    RefusedLater,
    ConnectError,
    Timeout,
}

/// What one session measured.
pub struct Measured {
    pub outcome: Outcome,
    /// Connect to the end of the greeting.
    pub greeting: Option<Duration>,
    /// Connect to the end of the session.
    pub session: Duration,
}

/// A reply: its code and the text of its last line.
struct Reply {
    code: u16,
    text: String,
}

enum Failure {
    Timeout,
    Broken,
}

/// Runs one transaction against `target`, from `source` when given.
pub async fn session(
    target: SocketAddr,
    source: Option<IpAddr>,
    message: &[u8],
    step: Duration,
) -> Measured {
    let started = Instant::now();
    let done = |outcome, greeting| Measured {
        outcome,
        greeting,
        session: started.elapsed(),
    };
    let stream = match timeout(step, connect(target, source)).await {
        Err(_) => return done(Outcome::Timeout, None),
        Ok(Err(_)) => return done(Outcome::ConnectError, None),
        Ok(Ok(s)) => s,
    };
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let greeting = match read_reply(&mut r, step).await {
        Ok(g) => g,
        Err(Failure::Timeout) => return done(Outcome::Timeout, None),
        Err(Failure::Broken) => return done(Outcome::RefusedLater, None),
    };
    let greeted = Some(started.elapsed());
    if greeting.code / 100 != 2 {
        return done(Outcome::RefusedAtGreeting(reply_key(&greeting)), greeted);
    }
    let steps: [(&[u8], u16); 5] = [
        (b"EHLO load.mxgate.test\r\n", 2),
        (b"MAIL FROM:<load@mxgate.test>\r\n", 2),
        (b"RCPT TO:<sink@mxgate.test>\r\n", 2),
        (b"DATA\r\n", 3),
        (message, 2),
    ];
    for (command, class) in steps {
        if timeout(step, w.write_all(command))
            .await
            .map_or(true, |r| r.is_err())
        {
            return done(Outcome::RefusedLater, greeted);
        }
        match read_reply(&mut r, step).await {
            Ok(reply) if reply.code / 100 == class => {}
            Ok(_) | Err(Failure::Broken) => return done(Outcome::RefusedLater, greeted),
            Err(Failure::Timeout) => return done(Outcome::Timeout, greeted),
        }
    }
    // Delivered; QUIT is a courtesy whose answer does not change the outcome.
    if let Ok(Ok(())) = timeout(step, w.write_all(b"QUIT\r\n")).await {
        let _ = read_reply(&mut r, step).await;
    }
    done(Outcome::Delivered, greeted)
}

async fn connect(target: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(target).await
}

/// Reads a complete reply: `250-...` lines continue until `250 ...`.
async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    step: Duration,
) -> Result<Reply, Failure> {
    let read = async {
        let mut line = Vec::with_capacity(128);
        for _ in 0..MAX_REPLY_LINES {
            line.clear();
            let n = tokio::io::AsyncReadExt::take(&mut *r, MAX_REPLY_LINE as u64)
                .read_until(b'\n', &mut line)
                .await
                .map_err(|_| Failure::Broken)?;
            if n == 0 || !line.ends_with(b"\n") || line.len() < 3 {
                return Err(Failure::Broken);
            }
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            let code: u16 = text
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or(Failure::Broken)?;
            match text.as_bytes().get(3) {
                Some(b'-') => continue,
                Some(b' ') | None => return Ok(Reply { code, text }),
                Some(_) => return Err(Failure::Broken),
            }
        }
        Err(Failure::Broken)
    };
    timeout(step, read).await.map_err(|_| Failure::Timeout)?
}

/// The code of one complete (possibly multi-line) reply, or `None` on a timeout, a close or
/// anything that is not a reply. Shared with the backend health check.
pub(crate) async fn reply_code<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    step: Duration,
) -> Option<u16> {
    read_reply(r, step).await.ok().map(|reply| reply.code)
}

/// `421 4.7.0` from `421 4.7.0 mx Too many ...`; just `421` without an enhanced code.
fn reply_key(reply: &Reply) -> String {
    let enhanced = reply
        .text
        .get(4..)
        .and_then(|rest| rest.split(' ').next())
        .filter(|e| {
            let parts: Vec<&str> = e.split('.').collect();
            parts.len() == 3
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        });
    match enhanced {
        Some(e) => format!("{} {e}", reply.code),
        None => reply.code.to_string(),
    }
}

/// A message of about `size` bytes: headers, then 76-character lines of text. No line starts
/// with a dot, so no dot-stuffing is needed; ends with the CRLF.CRLF terminator.
pub fn message(size: usize) -> Vec<u8> {
    let mut m =
        b"From: <load@mxgate.test>\r\nTo: <sink@mxgate.test>\r\nSubject: mxgate load\r\n\r\n"
            .to_vec();
    while m.len() + 78 <= size {
        m.extend_from_slice(&[b'x'; 76]);
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(b".\r\n");
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_keys() {
        let k = |t: &str| {
            reply_key(&Reply {
                code: t[..3].parse().unwrap(),
                text: t.into(),
            })
        };
        assert_eq!(k("421 4.7.0 mx Too many connections"), "421 4.7.0");
        assert_eq!(k("554 5.7.1 mx Access denied"), "554 5.7.1");
        assert_eq!(k("421 Service not available"), "421");
        assert_eq!(k("421"), "421");
    }

    #[tokio::test]
    async fn multi_line_replies_are_read_whole() {
        let mut r = BufReader::new(&b"220-first\r\n220-second\r\n220 last\r\nnext"[..]);
        let reply = read_reply(&mut r, Duration::from_secs(1))
            .await
            .ok()
            .unwrap();
        assert_eq!((reply.code, reply.text.as_str()), (220, "220 last"));
        let mut bad = BufReader::new(&b"22x oops\r\n"[..]);
        assert!(read_reply(&mut bad, Duration::from_secs(1)).await.is_err());
    }

    #[test]
    fn message_size_and_terminator() {
        let m = message(10_000);
        assert!(m.len() <= 10_003 && m.len() > 9_900);
        assert!(m.ends_with(b"\r\n.\r\n"));
        assert!(!m.windows(3).any(|w| w == b"\n.x"));
    }
}
