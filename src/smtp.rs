//! Reading SMTP replies: the one small parser both the backend health check and the load tool
//! use. It reads one complete reply, multi-line `250-` continuations included, under a time
//! limit, and never reads past it.

use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::time::timeout;

/// Longest reply line, and most lines in one reply, accepted from a server.
const MAX_REPLY_LINE: usize = 2048;
const MAX_REPLY_LINES: usize = 64;

/// RFC 5321 §4.5.3.2.1: a client waits 5 minutes for the initial 220 greeting. A backend
/// without a greeting timeout of its own has this much.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// RFC 3463's X.3.2, "system not accepting network messages": a 4xx with it speaks of the
/// server's capacity (Exchange's connection limit), not of the client.
pub const NOT_ACCEPTING: &[u8] = b"4.3.2";

/// The enhanced status code (RFC 3463) of a reply line, `421 4.3.2 text` → `4.3.2`: the word
/// after the three-digit code and its separator, if it is one.
pub fn enhanced_code(line: &[u8]) -> Option<&[u8]> {
    let rest = line.get(4..)?;
    let word = rest.split(|b| b.is_ascii_whitespace()).next()?;
    let mut parts = word.split(|&b| b == b'.');
    let valid = (0..3).all(|_| {
        parts
            .next()
            .is_some_and(|p| (1..=3).contains(&p.len()) && p.iter().all(u8::is_ascii_digit))
    }) && parts.next().is_none();
    valid.then_some(word)
}

/// One complete reply: its code and its last line's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

/// Why no reply was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Nothing complete within the step's time.
    Timeout,
    /// The peer closed, or sent something that is not a reply.
    Broken,
}

/// Reads a complete reply: `250-...` lines continue until `250 ...`.
pub async fn read_reply<R: AsyncBufRead + Unpin>(
    r: &mut R,
    step: Duration,
) -> Result<Reply, Failure> {
    read(r, step, None).await
}

/// Reads a complete reply and keeps the text of every line, as an EHLO reply's extensions need.
pub async fn read_reply_lines<R: AsyncBufRead + Unpin>(
    r: &mut R,
    step: Duration,
) -> Result<(Reply, Vec<String>), Failure> {
    let mut lines = Vec::new();
    let reply = read(r, step, Some(&mut lines)).await?;
    Ok((reply, lines))
}

async fn read<R: AsyncBufRead + Unpin>(
    r: &mut R,
    step: Duration,
    mut keep: Option<&mut Vec<String>>,
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
            let last = match text.as_bytes().get(3) {
                Some(b'-') => false,
                Some(b' ') | None => true,
                Some(_) => return Err(Failure::Broken),
            };
            if let Some(lines) = keep.as_deref_mut() {
                lines.push(text.clone());
            }
            if last {
                return Ok(Reply { code, text });
            }
        }
        Err(Failure::Broken)
    };
    timeout(step, read).await.map_err(|_| Failure::Timeout)?
}

/// The code of one complete reply, or `None` on a timeout, a close or anything that is not a
/// reply.
pub async fn reply_code<R: AsyncBufRead + Unpin>(r: &mut R, step: Duration) -> Option<u16> {
    read_reply(r, step).await.ok().map(|reply| reply.code)
}

#[cfg(test)]
mod tests;
