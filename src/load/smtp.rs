//! One real SMTP transaction for the load tool: greeting, EHLO (HELO if EHLO is refused), MAIL,
//! RCPT, DATA, QUIT, with multi-line replies parsed and every step under a timeout. It
//! classifies how the session ended, and at which step; it never retries. STARTTLS is never
//! asked for: whether a server that offers it may be loaded in plain text is decided once,
//! before a run, by [`probe`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};

use crate::smtp::{read_reply, read_reply_lines, Failure, Reply};

/// The envelope and greeting name each session uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// The EHLO (or HELO) name.
    pub ehlo: String,
    /// MAIL FROM.
    pub from: String,
    /// RCPT TO, one per session, used in turn; never empty.
    pub to: Vec<String>,
}

/// The EHLO name, sender and recipient when none are given: they suit the embedded sink and
/// Postfix's smtp-sink, and a real server will refuse the recipient (see `--to`).
pub const DEFAULT_EHLO: &str = "load.mxgate.test";
pub const DEFAULT_FROM: &str = "load@mxgate.test";
pub const DEFAULT_TO: &str = "sink@mxgate.test";

impl Default for Transaction {
    fn default() -> Transaction {
        Transaction {
            ehlo: DEFAULT_EHLO.into(),
            from: DEFAULT_FROM.into(),
            to: vec![DEFAULT_TO.into()],
        }
    }
}

impl Transaction {
    /// The recipient of the `i`-th session.
    pub fn recipient(&self, i: u64) -> &str {
        &self.to[(i % self.to.len().max(1) as u64) as usize]
    }
}

/// How one session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The message was accepted (`250` after DATA).
    Delivered,
    /// The greeting was not 2xx; the key is the code and enhanced code, such as `421 4.7.0`.
    RefusedAtGreeting(String),
    /// A later step failed; the key is the step and the reply, such as `RCPT 550 5.7.54`, or
    /// the step and `closed` when the server hung up.
    RefusedLater(String),
    ConnectError,
    /// A step took longer than its limit; the key is the step, such as `greeting` or `DATA`.
    Timeout(&'static str),
}

/// What one session measured.
pub struct Measured {
    pub outcome: Outcome,
    /// From the scheduled start to the end of the greeting.
    pub greeting: Option<Duration>,
    /// From the scheduled start to the end of the session: with open-loop arrivals, the time a
    /// session waited to start counts, so a server that falls behind shows as latency.
    pub session: Duration,
    /// From the connect to the end: how long the server held the session.
    pub held: Duration,
    /// Message bytes sent.
    pub sent: u64,
}

/// One session's inputs.
pub struct Session<'a> {
    pub target: SocketAddr,
    pub source: Option<IpAddr>,
    pub transaction: &'a Transaction,
    /// Which session of the run this is: picks the recipient and names the message.
    pub index: u64,
    /// The message body: CRLF-terminated lines, none starting with a dot; the session sends the
    /// terminating dot itself.
    pub body: &'a [u8],
    /// When the session was due to start.
    pub scheduled: Instant,
    pub step: Duration,
}

/// The halves of a session's connection.
type Reader = BufReader<tokio::net::tcp::OwnedReadHalf>;
type Writer = tokio::net::tcp::OwnedWriteHalf;

/// Runs one transaction.
pub async fn session(s: Session<'_>) -> Measured {
    let started = Instant::now();
    let done = |outcome, greeting: Option<Instant>, sent| Measured {
        outcome,
        greeting: greeting.map(|g| g - s.scheduled),
        session: s.scheduled.elapsed(),
        held: started.elapsed(),
        sent,
    };
    let stream = match timeout(s.step, connect(s.target, s.source)).await {
        Err(_) => return done(Outcome::Timeout("connect"), None, 0),
        Ok(Err(_)) => return done(Outcome::ConnectError, None, 0),
        Ok(Ok(stream)) => stream,
    };
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let greeted = match greeting(&mut r, s.step).await {
        Ok(at) => Some(at),
        Err((o, at)) => return done(o, at, 0),
    };
    if let Some(o) = envelope(&mut r, &mut w, &s).await {
        return done(o, greeted, 0);
    }
    let (outcome, sent) = message(&mut r, &mut w, &s).await;
    if let Some(o) = outcome {
        return done(o, greeted, sent);
    }
    // Delivered; QUIT is a courtesy whose answer does not change the outcome.
    let _ = exchange(&mut r, &mut w, b"QUIT\r\n", s.step).await;
    done(Outcome::Delivered, greeted, sent)
}

/// Reads the greeting: when a 2xx one ended, or how the session ended instead (and when it
/// was greeted, if it was).
async fn greeting(r: &mut Reader, step: Duration) -> Result<Instant, (Outcome, Option<Instant>)> {
    let greeting = match read_reply(r, step).await {
        Ok(g) => g,
        Err(Failure::Timeout) => return Err((Outcome::Timeout("greeting"), None)),
        Err(Failure::Broken) => {
            return Err((Outcome::RefusedLater("greeting closed".into()), None))
        }
    };
    let greeted = Instant::now();
    if greeting.code / 100 != 2 {
        return Err((
            Outcome::RefusedAtGreeting(reply_key(&greeting)),
            Some(greeted),
        ));
    }
    Ok(greeted)
}

/// EHLO (HELO if refused), MAIL, RCPT and DATA: `None` once DATA is answered 3xx, else how the
/// session ended.
async fn envelope(r: &mut Reader, w: &mut Writer, s: &Session<'_>) -> Option<Outcome> {
    let t = s.transaction;
    let ehlo = format!("EHLO {}\r\n", t.ehlo);
    let helo = format!("HELO {}\r\n", t.ehlo);
    let mail = format!("MAIL FROM:<{}>\r\n", t.from);
    let rcpt = format!("RCPT TO:<{}>\r\n", t.recipient(s.index));
    let mut steps: Vec<(&str, &[u8], u16)> = vec![
        ("EHLO", ehlo.as_bytes(), 2),
        ("MAIL", mail.as_bytes(), 2),
        ("RCPT", rcpt.as_bytes(), 2),
        ("DATA", b"DATA\r\n", 3),
    ];
    let mut i = 0;
    while i < steps.len() {
        let (name, command, class) = steps[i];
        let outcome = match exchange(r, w, command, s.step).await {
            Ok(reply) if reply.code / 100 == class => None,
            // A server that does not know EHLO is asked with HELO, as RFC 5321 §3.2 says.
            Ok(reply) if name == "EHLO" && reply.code / 100 == 5 => {
                steps[i] = ("HELO", helo.as_bytes(), 2);
                continue;
            }
            Ok(reply) => Some(Outcome::RefusedLater(format!(
                "{name} {}",
                reply_key(&reply)
            ))),
            Err(Failure::Broken) => Some(Outcome::RefusedLater(format!("{name} closed"))),
            Err(Failure::Timeout) => Some(Outcome::Timeout(name)),
        };
        if outcome.is_some() {
            return outcome;
        }
        i += 1;
    }
    None
}

/// The message: headers then body, then the reply to the final dot. `None` when it was
/// accepted, else how the session ended; with the bytes sent, counted once all were written.
async fn message(r: &mut Reader, w: &mut Writer, s: &Session<'_>) -> (Option<Outcome>, u64) {
    let headers = headers(s.transaction, s.index);
    let write = async {
        w.write_all(headers.as_bytes()).await?;
        w.write_all(s.body).await?;
        w.write_all(b".\r\n").await
    };
    match timeout(s.step, write).await {
        Ok(Ok(())) => {
            let sent = (headers.len() + s.body.len() + 3) as u64;
            let outcome = match read_reply(r, s.step).await {
                Ok(reply) if reply.code / 100 == 2 => None,
                Ok(reply) => Some(Outcome::RefusedLater(format!(
                    "message {}",
                    reply_key(&reply)
                ))),
                Err(Failure::Broken) => Some(Outcome::RefusedLater("message closed".into())),
                Err(Failure::Timeout) => Some(Outcome::Timeout("message")),
            };
            (outcome, sent)
        }
        Ok(Err(_)) => (Some(Outcome::RefusedLater("message closed".into())), 0),
        Err(_) => (Some(Outcome::Timeout("message")), 0),
    }
}

/// Writes one command and reads its reply, both within `step`.
async fn exchange(
    r: &mut Reader,
    w: &mut Writer,
    command: &[u8],
    step: Duration,
) -> Result<Reply, Failure> {
    match timeout(step, w.write_all(command)).await {
        Err(_) => return Err(Failure::Timeout),
        Ok(Err(_)) => return Err(Failure::Broken),
        Ok(Ok(())) => {}
    }
    read_reply(r, step).await
}

/// What one session learns of a server before a run.
#[derive(Debug)]
pub struct Probe {
    /// The greeting, as `CODE ENHANCED`-keyed text.
    pub greeting: Reply,
    /// The server's EHLO reply offers STARTTLS.
    pub starttls: bool,
}

/// Connects once, reads the greeting and the EHLO reply, and says QUIT: enough to tell the
/// operator before a run that the server offers STARTTLS, or cannot be reached at all.
pub async fn probe(
    target: SocketAddr,
    source: Option<IpAddr>,
    ehlo: &str,
    step: Duration,
) -> Result<Probe, String> {
    let stream = match timeout(step, connect(target, source)).await {
        Err(_) => return Err(format!("connecting to {target} took over {step:?}")),
        Ok(Err(e)) => return Err(format!("cannot connect to {target}: {e}")),
        Ok(Ok(s)) => s,
    };
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let greeting = read_reply(&mut r, step)
        .await
        .map_err(|f| format!("{target} sent no greeting ({f:?})"))?;
    let mut starttls = false;
    if greeting.code / 100 == 2 {
        let command = format!("EHLO {ehlo}\r\n");
        if let Ok(Ok(())) = timeout(step, w.write_all(command.as_bytes())).await {
            if let Ok((reply, lines)) = read_reply_lines(&mut r, step).await {
                starttls = reply.code / 100 == 2
                    && lines.iter().any(|l| {
                        l.get(4..)
                            .is_some_and(|ext| ext.trim().eq_ignore_ascii_case("STARTTLS"))
                    });
            }
        }
    }
    if let Ok(Ok(())) = timeout(step, w.write_all(b"QUIT\r\n")).await {
        let _ = read_reply(&mut r, step).await;
    }
    Ok(Probe { greeting, starttls })
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
pub fn reply_key(reply: &Reply) -> String {
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

/// The header of the `i`-th message: the envelope's addresses, and a Message-ID that names the
/// session, so a message found in a mailbox can be traced to its run.
fn headers(t: &Transaction, i: u64) -> String {
    format!(
        "From: <{}>\r\nTo: <{}>\r\nSubject: mxgate load {i}\r\nMessage-ID: <load.{i}.{}@{}>\r\n\r\n",
        t.from,
        t.recipient(i),
        std::process::id(),
        t.ehlo
    )
}

/// Message bodies of any size up to a largest one: 76-character lines of text, cut from one
/// buffer so no session allocates its own. No line starts with a dot, so no dot-stuffing is
/// needed.
pub struct Bodies(Vec<u8>);

const LINE: usize = 78;

impl Bodies {
    pub fn new(largest: usize) -> Bodies {
        let lines = largest / LINE;
        let mut b = Vec::with_capacity(lines * LINE);
        for _ in 0..lines {
            b.extend_from_slice(&[b'x'; LINE - 2]);
            b.extend_from_slice(b"\r\n");
        }
        Bodies(b)
    }

    /// The body of a message of about `size` bytes with its terminating dot: whole lines, at
    /// most `size - 3` bytes of them.
    pub fn get(&self, size: usize) -> &[u8] {
        let lines = (size.saturating_sub(3) / LINE).min(self.0.len() / LINE);
        &self.0[..lines * LINE]
    }
}

#[cfg(test)]
mod tests;
