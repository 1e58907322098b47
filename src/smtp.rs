//! Reading SMTP replies: the one small parser both the backend health check and the load tool
//! use. It reads one complete reply, multi-line `250-` continuations included, under a time
//! limit, and never reads past it.

use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::time::timeout;

/// Longest reply line, and most lines in one reply, accepted from a server.
const MAX_REPLY_LINE: usize = 2048;
const MAX_REPLY_LINES: usize = 64;

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
mod tests {
    use super::*;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn every_line_is_kept_when_asked() {
        let mut r = BufReader::new(&b"250-mx\r\n250-STARTTLS\r\n250 SIZE\r\n"[..]);
        let (reply, lines) = read_reply_lines(&mut r, Duration::from_secs(1))
            .await
            .ok()
            .unwrap();
        assert_eq!(reply.text, "250 SIZE");
        assert_eq!(lines, ["250-mx", "250-STARTTLS", "250 SIZE"]);
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
}
