//! One real SMTP transaction for the load tool: greeting, EHLO, MAIL, RCPT, DATA, QUIT, with
//! multi-line replies parsed and every step under a timeout. It classifies how the session
//! ended; it never retries.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};

use crate::smtp::{read_reply, Failure, Reply};

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

    #[test]
    fn message_size_and_terminator() {
        let m = message(10_000);
        assert!(m.len() <= 10_003 && m.len() > 9_900);
        assert!(m.ends_with(b"\r\n.\r\n"));
        assert!(!m.windows(3).any(|w| w == b"\n.x"));
    }
}
