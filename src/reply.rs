//! mxgate's own SMTP replies, and closing a refused connection so the client actually reads them.
//!
//! A reply followed at once by `close()` while unread client bytes remain makes the kernel send
//! RST, and the client may never see the line. So a refused connection is answered with the line,
//! then `shutdown(SHUT_WR)`, then a bounded read-and-discard, then the close. The number of
//! connections lingering like that is bounded; past the bound they close right after the write.
//!
//! Rejections are also summarised here: at most one log line per reason every
//! [`SUMMARY_INTERVAL`], never one per rejected connection, so a flood cannot flood the journal.
//! Nothing in this module ever opens a backend connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{timeout, Instant};

use crate::admission::RejectReason;
use crate::config::ReplyOverrides;

/// How long a refused connection is read and discarded after the reply, at most.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// How many bytes a refused connection may send after the reply before it is closed anyway.
pub const LINGER_BYTES: usize = 64 * 1024;
/// How many refused connections may linger at once; each holds a file descriptor.
pub const MAX_LINGERING: usize = 1024;
/// How long the reply itself may take to write. It is one short line, so only a client with a
/// zero window can make it block.
const WRITE_TIME: Duration = Duration::from_secs(2);
/// How often, at most, a reason's rejections are logged.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// How many distinct sources a summary window tracks to find the busiest.
const SUMMARY_SOURCES: usize = 4096;

/// The reply templates; `{hostname}` is replaced by the configured host name.
fn default_template(reason: RejectReason) -> &'static str {
    match reason {
        RejectReason::GlobalLimit => "421 4.3.2 {hostname} Too many connections, try again later",
        RejectReason::SourceLimit => {
            "421 4.7.0 {hostname} Too many connections from your address, try again later"
        }
        RejectReason::BackendUnavailable => {
            "421 4.3.2 {hostname} Service not available, try again later"
        }
        RejectReason::RateLimit => {
            "421 4.7.0 {hostname} Connection rate limit exceeded, try again later"
        }
        RejectReason::NetworkLimit => {
            "421 4.7.0 {hostname} Too many connections from your network, try again later"
        }
        RejectReason::Denied => "554 5.7.1 {hostname} Access denied",
        RejectReason::Draining => "421 4.3.2 {hostname} Service shutting down, try again later",
        // Sent to nobody: a bad PROXY header comes from a load balancer, and is closed on.
        RejectReason::BadProxyHeader => "421 4.7.0 {hostname} Bad PROXY protocol header",
    }
}

/// The reply line for every reason, rendered once, CRLF included.
#[derive(Clone, Debug)]
pub struct Replies {
    /// Indexed by `RejectReason as usize`.
    lines: Vec<Box<[u8]>>,
    /// The answer to QUIT in a denied session.
    bye: Box<[u8]>,
}

impl Replies {
    pub fn new(hostname: &str, overrides: &ReplyOverrides) -> Replies {
        let lines = RejectReason::ALL
            .iter()
            .map(|&r| {
                let over = match r {
                    RejectReason::GlobalLimit => &overrides.global_limit,
                    RejectReason::SourceLimit => &overrides.source_limit,
                    RejectReason::BackendUnavailable => &overrides.backend_unavailable,
                    RejectReason::RateLimit => &overrides.rate_limit,
                    RejectReason::NetworkLimit => &overrides.network_limit,
                    RejectReason::Denied => &overrides.denied,
                    RejectReason::Draining => &overrides.draining,
                    RejectReason::BadProxyHeader => &None,
                };
                let template = over.as_ref().map_or(default_template(r), |t| t.0.as_str());
                format!("{}\r\n", template.replace("{hostname}", hostname))
                    .into_bytes()
                    .into_boxed_slice()
            })
            .collect();
        Replies {
            lines,
            bye: format!("221 2.0.0 {hostname} Bye\r\n")
                .into_bytes()
                .into_boxed_slice(),
        }
    }

    pub fn line(&self, reason: RejectReason) -> &[u8] {
        &self.lines[reason as usize]
    }
}

/// How many denied clients may be in their 554 dialogue at once. Apart from the lingering
/// bound: a dialogue lasts up to [`DENY_TIME`], and one denied source must not be able to take
/// the slots other refused clients need to read their 421.
pub const MAX_DENYING: usize = 256;

/// Bounds the connections that linger after a reply, and the denied clients' dialogues.
pub struct Closer {
    lingering: Arc<Semaphore>,
    denying: Arc<Semaphore>,
}

impl Default for Closer {
    fn default() -> Self {
        Closer {
            lingering: Arc::new(Semaphore::new(MAX_LINGERING)),
            denying: Arc::new(Semaphore::new(MAX_DENYING)),
        }
    }
}

impl Closer {
    /// The bound, for the accept loops' own lingering sets.
    pub fn bound(&self) -> Arc<Semaphore> {
        self.lingering.clone()
    }

    /// Denied clients in their dialogue right now.
    pub fn denying(&self) -> usize {
        MAX_DENYING - self.denying.available_permits()
    }

    /// Writes `line`, half-closes, drains what the client still sends for a bounded time, then
    /// closes. Returns whether the whole line was written.
    pub async fn reply_and_close(&self, mut stream: TcpStream, line: &[u8]) -> bool {
        let written = matches!(
            timeout(WRITE_TIME, stream.write_all(line)).await,
            Ok(Ok(()))
        );
        if !written {
            return false;
        }
        // FIN after the line: the client reads the reply, then end-of-file.
        if stream.shutdown().await.is_err() {
            return true;
        }
        if let Ok(_permit) = self.lingering.try_acquire() {
            drain(&stream).await;
        }
        true
    }
}

/// How long a denied client may talk to mxgate before it is closed on.
pub const DENY_TIME: Duration = Duration::from_secs(10);
/// How many bytes a denied client may send before it is closed on.
pub const DENY_BYTES: usize = 4096;
/// RFC 5321 §3.1: after a 554 greeting, every command but QUIT gets this.
const BAD_SEQUENCE: &[u8] = b"503 5.5.1 Bad sequence of commands\r\n";

impl Closer {
    /// RFC 5321 §3.1 for a client that will never be accepted: greet with 554, answer every
    /// command with 503 until QUIT, which gets 221. Bounded by [`DENY_TIME`] and [`DENY_BYTES`],
    /// and by [`MAX_DENYING`]: past it the client gets the greeting and a close.
    pub async fn deny(&self, mut stream: TcpStream, replies: &Replies) {
        let greeting = replies.line(RejectReason::Denied);
        let Ok(_permit) = self.denying.try_acquire() else {
            self.reply_and_close(stream, greeting).await;
            return;
        };
        let dialogue = async {
            stream.write_all(greeting).await?;
            let mut pending: Vec<u8> = Vec::new();
            let mut seen = 0usize;
            let mut buf = [0u8; 512];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 || seen + n > DENY_BYTES {
                    return Ok::<bool, std::io::Error>(false);
                }
                seen += n;
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let verb = line
                        .split(|b| b.is_ascii_whitespace())
                        .next()
                        .unwrap_or(&[]);
                    if verb.eq_ignore_ascii_case(b"QUIT") {
                        stream.write_all(&replies.bye).await?;
                        return Ok(true);
                    }
                    stream.write_all(BAD_SEQUENCE).await?;
                }
            }
        };
        let quit = matches!(timeout(DENY_TIME, dialogue).await, Ok(Ok(true)));
        if quit && stream.shutdown().await.is_ok() {
            // The dialogue's own slot covers this short drain after the 221.
            drain(&stream).await;
        }
    }
}

/// Reads and discards until the client closes, [`LINGER_BYTES`] arrive, or [`LINGER_TIME`]
/// passes. Without this, unread bytes at close() turn the FIN into an RST.
async fn drain(stream: &TcpStream) {
    let deadline = Instant::now() + LINGER_TIME;
    let mut buf = [0u8; 2048];
    let mut seen = 0usize;
    while seen < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Err(_) | Ok(Err(_)) => return,
            Ok(Ok(())) => {}
        }
        match stream.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => seen += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Counts rejections per reason between two log lines, with the busiest source of each.
#[derive(Default)]
pub struct RejectSummary {
    /// Keyed by reason and whether it was a dry-run (would-be) rejection.
    windows: Mutex<HashMap<(RejectReason, bool), Window>>,
}

/// One reason's rejections over one window.
#[derive(Debug, PartialEq, Eq)]
pub struct SummaryLine {
    pub reason: RejectReason,
    pub dry_run: bool,
    pub count: u64,
    /// The source with the most rejections, and how many.
    pub busiest: Option<(IpNet, u64)>,
}

#[derive(Default)]
struct Window {
    count: u64,
    by_source: HashMap<IpNet, u64>,
}

impl RejectSummary {
    pub fn record(&self, reason: RejectReason, source: IpNet) {
        self.add(reason, false, source);
    }

    /// A rejection that dry-run mode only counted.
    pub fn record_dry_run(&self, reason: RejectReason, source: IpNet) {
        self.add(reason, true, source);
    }

    fn add(&self, reason: RejectReason, dry_run: bool, source: IpNet) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = windows.entry((reason, dry_run)).or_default();
        w.count += 1;
        let len = w.by_source.len();
        match w.by_source.get_mut(&source) {
            Some(n) => *n += 1,
            None if len < SUMMARY_SOURCES => {
                w.by_source.insert(source, 1);
            }
            None => {}
        }
    }

    /// Ends the current windows: one entry per reason seen since the last call.
    pub fn take(&self) -> Vec<SummaryLine> {
        let windows = std::mem::take(&mut *self.windows.lock().unwrap_or_else(|p| p.into_inner()));
        let mut lines: Vec<SummaryLine> = windows
            .into_iter()
            .map(|((reason, dry_run), w)| {
                let busiest = w
                    .by_source
                    .iter()
                    .max_by_key(|(_, n)| **n)
                    .map(|(s, n)| (*s, *n));
                SummaryLine {
                    reason,
                    dry_run,
                    count: w.count,
                    busiest,
                }
            })
            .collect();
        lines.sort_by_key(|l| (l.reason as usize, l.dry_run));
        lines
    }

    /// Logs one line per reason seen since the last flush, and starts new windows.
    pub fn flush(&self) {
        for l in self.take() {
            let (busiest, busiest_count) = l
                .busiest
                .map_or((String::from("-"), 0), |(s, n)| (display_source(&s), n));
            tracing::warn!(
                reason = l.reason.label(),
                dry_run = l.dry_run,
                count = l.count,
                busiest_source = %busiest,
                busiest_count,
                window_secs = SUMMARY_INTERVAL.as_secs(),
                "connections rejected"
            );
        }
    }

    /// Flushes every [`SUMMARY_INTERVAL`] until dropped with its task.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
        tick.tick().await;
        loop {
            tick.tick().await;
            self.flush();
        }
    }
}

/// A source as an operator reads it: a bare address for a full-length prefix.
pub fn display_source(s: &IpNet) -> String {
    if s.prefix_len() == s.max_prefix_len() {
        IpAddr::to_string(&s.addr())
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReplyText;

    #[test]
    fn default_lines_are_exact() {
        let r = Replies::new("mx.example.com", &ReplyOverrides::default());
        assert_eq!(
            r.line(RejectReason::GlobalLimit),
            b"421 4.3.2 mx.example.com Too many connections, try again later\r\n"
        );
        assert_eq!(
            r.line(RejectReason::SourceLimit),
            b"421 4.7.0 mx.example.com Too many connections from your address, try again later\r\n"
        );
        assert_eq!(
            r.line(RejectReason::BackendUnavailable),
            b"421 4.3.2 mx.example.com Service not available, try again later\r\n"
        );
    }

    #[test]
    fn summary_counts_per_reason_and_finds_the_busiest_source() {
        let s = RejectSummary::default();
        let a: IpNet = "192.0.2.1/32".parse().unwrap();
        let b: IpNet = "192.0.2.2/32".parse().unwrap();
        for _ in 0..5 {
            s.record(RejectReason::SourceLimit, a);
        }
        s.record(RejectReason::SourceLimit, b);
        s.record(RejectReason::GlobalLimit, b);
        s.record_dry_run(RejectReason::GlobalLimit, a);
        let lines = s.take();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            SummaryLine {
                reason: RejectReason::GlobalLimit,
                dry_run: false,
                count: 1,
                busiest: Some((b, 1))
            }
        );
        assert!(lines[1].dry_run);
        assert_eq!(
            lines[2],
            SummaryLine {
                reason: RejectReason::SourceLimit,
                dry_run: false,
                count: 6,
                busiest: Some((a, 5))
            }
        );
        assert!(s.take().is_empty(), "a new window starts empty");
    }

    #[test]
    fn overrides_replace_one_reason() {
        let o = ReplyOverrides {
            source_limit: Some(ReplyText("421 4.7.0 {hostname} slow down".into())),
            ..ReplyOverrides::default()
        };
        let r = Replies::new("mx.t", &o);
        assert_eq!(
            r.line(RejectReason::SourceLimit),
            b"421 4.7.0 mx.t slow down\r\n"
        );
        assert!(r
            .line(RejectReason::GlobalLimit)
            .starts_with(b"421 4.3.2 mx.t Too many"));
    }
}
