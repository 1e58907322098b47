//! The answers of the pregreet test (`crate::pregreet`): a failed client's dialogue under
//! `enforce`, a backend's own refusal in its greeting, and any of mxgate's refusals after the
//! teaser. Each must first complete the `220` reply the teaser began (a multi-line reply keeps
//! one code) and can only then refuse, at the client's commands: mxgate's 421 at the first
//! (RFC 5321 §3.8), a 5xx at every one until QUIT (§3.1's refusal at the greeting).
//!
//! All are bounded like the deny dialogue: [`DENY_TIME`], [`DENY_BYTES`], and the same
//! [`super::MAX_DENYING`] places; past them, the completion, the answer and a close.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::close::{drain, line_and_close};
use super::{Closer, Replies, DENY_BYTES, DENY_TIME};
use crate::config::Pregreet;
use crate::pregreet::{BYE_LINE, ENFORCE_LINE};
use crate::reason::{Refusal, RejectReason};

/// How a dialogue answers.
#[derive(Clone, Copy)]
enum Answer<'a> {
    /// This reply to every command (`enforce`'s 550, or a backend's refusal), 221 to QUIT,
    /// for as long as the client goes on.
    Every(&'a [u8]),
    /// A refusal after the teaser: this line to the first command, whatever it is, then close.
    First(&'a [u8]),
}

impl Closer {
    /// `enforce` for a client that failed the test, counted by the caller: `opening` (the
    /// greeting's final line, or nothing if it was sent), then `550 5.5.1 Protocol error` to
    /// every command, `heard` first (what it said before its turn), until QUIT, which gets
    /// `221 2.0.0 Bye`.
    pub(super) async fn enforce(&self, stream: TcpStream, opening: &[u8], heard: Vec<u8>) {
        self.dialogue(stream, opening, heard, Answer::Every(ENFORCE_LINE))
            .await
    }

    /// A backend that refused in its greeting (a 5xx) after the teaser: `completion` ends the
    /// greeting, then the backend's own `refusal` answers every command (`heard` first), until
    /// QUIT gets `221 2.0.0 Bye`. The refusal stays permanent: a client that tries HELO after
    /// a refused EHLO is refused again, not cut off into a retry. It is the backend's answer,
    /// not a refusal of mxgate's: nothing is counted here.
    pub async fn backend_refused(
        &self,
        stream: TcpStream,
        completion: &[u8],
        heard: Vec<u8>,
        refusal: &[u8],
    ) {
        self.dialogue(stream, completion, heard, Answer::Every(refusal))
            .await
    }

    /// Counts the `pregreet` refusal of a client that spoke after the teaser, before the
    /// greeting's end, and answers it: `drop`'s 521 and a close, or `enforce`'s greeting
    /// completed and 550 to every command (`heard` first) until QUIT.
    pub async fn refuse_spoke(
        &self,
        stream: TcpStream,
        refusal: Refusal,
        heard: Vec<u8>,
        replies: &Replies,
    ) {
        self.count(refusal);
        if replies.pregreet == Pregreet::Enforce {
            self.enforce(stream, &replies.completion, heard).await
        } else {
            let line = replies.line(RejectReason::Pregreet);
            self.reply_and_close(stream, line).await;
        }
    }

    /// Counts a refusal after the teaser and answers it: the completion ends the greeting,
    /// then the reason's line goes to the client's first command, and the connection closes.
    /// `heard` is what the client sent already.
    pub async fn after_teaser(
        &self,
        stream: TcpStream,
        refusal: Refusal,
        heard: Vec<u8>,
        replies: &Replies,
    ) {
        self.count(refusal);
        let answer = Answer::First(replies.line(refusal.reason));
        self.dialogue(stream, &replies.completion, heard, answer)
            .await
    }

    async fn dialogue(
        &self,
        mut stream: TcpStream,
        opening: &[u8],
        heard: Vec<u8>,
        answer: Answer<'_>,
    ) {
        let Ok(_permit) = self.denying.try_acquire() else {
            // Past the bound: the opening, the answer (the client reads it as its first
            // command's) and a close.
            let line = match answer {
                Answer::First(line) | Answer::Every(line) => line,
            };
            return line_and_close(stream, &[opening, line].concat()).await;
        };
        let talk = async {
            stream.write_all(opening).await?;
            let mut pending = heard;
            let mut seen = pending.len();
            let mut buf = [0u8; 512];
            loop {
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let verb = line
                        .split(|b| b.is_ascii_whitespace())
                        .next()
                        .unwrap_or(&[]);
                    match answer {
                        Answer::First(reply) => {
                            stream.write_all(reply).await?;
                            return Ok::<bool, std::io::Error>(true);
                        }
                        Answer::Every(_) if verb.eq_ignore_ascii_case(b"QUIT") => {
                            stream.write_all(BYE_LINE).await?;
                            return Ok(true);
                        }
                        Answer::Every(reply) => stream.write_all(reply).await?,
                    }
                }
                let n = stream.read(&mut buf).await?;
                if n == 0 || seen + n > DENY_BYTES {
                    return Ok(false);
                }
                seen += n;
                pending.extend_from_slice(&buf[..n]);
            }
        };
        let answered = matches!(timeout(DENY_TIME, talk).await, Ok(Ok(true)));
        if answered && stream.shutdown().await.is_ok() {
            drain(&stream).await;
        }
    }
}
