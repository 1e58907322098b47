//! The one entry point for a refused connection: [`Door::refuse`] in the accept loop, which
//! answers a one-line refusal from its own lingering set and gives anything longer (the deny
//! dialogue, a line the kernel would not take at once) a task, and [`Closer::refuse`], the
//! entry point for connections already in a task. Each counts the refusal it is given, once.

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

use super::{Closer, Replies};
use crate::reason::{Refusal, RejectReason};

/// Where an accept loop sends each refused connection.
pub struct Door {
    #[cfg(target_os = "linux")]
    lingerer: super::linger::Lingerer,
    closer: Closer,
}

impl Door {
    pub fn new(closer: &Closer) -> std::io::Result<Door> {
        Ok(Door {
            #[cfg(target_os = "linux")]
            lingerer: super::linger::Lingerer::new(closer.bound())?,
            closer: closer.clone(),
        })
    }

    /// The lingering set's work that is ready now, without waiting.
    pub fn reap(&mut self) {
        #[cfg(target_os = "linux")]
        self.lingerer.reap();
    }

    /// The lingering set's own work; pending for ever where there is none.
    pub async fn turn(&mut self) {
        #[cfg(target_os = "linux")]
        self.lingerer.turn().await;
        #[cfg(not(target_os = "linux"))]
        std::future::pending::<()>().await;
    }

    /// Counts `refusal`, answers its connection and closes it: here when a line is all it
    /// needs, else in a task of `tasks`. Never waits.
    pub fn refuse(
        &mut self,
        stream: std::net::TcpStream,
        refusal: Refusal,
        replies: &Arc<Replies>,
        tasks: &TaskTracker,
    ) {
        self.closer.count(refusal);
        let reason = refusal.reason;
        #[cfg(target_os = "linux")]
        let stream = match reason {
            RejectReason::Denied | RejectReason::BadProxyHeader => stream,
            RejectReason::Pregreet if replies.pregreet == crate::config::Pregreet::Enforce => {
                stream
            }
            _ => {
                let line = replies.line(reason);
                match self.lingerer.refuse(stream, line) {
                    super::linger::Lingered::Done => return,
                    super::linger::Lingered::Partial { socket, written } => {
                        // Only a zero window at connect time gets here: finish in a task.
                        let rest = line[written..].to_vec();
                        if let Ok(s) = TcpStream::from_std(socket) {
                            let closer = self.closer.clone();
                            tasks.spawn(async move {
                                closer.reply_and_close(s, &rest).await;
                            });
                        }
                        return;
                    }
                }
            }
        };
        let stream = match TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register a connection; closing it");
                return;
            }
        };
        let (closer, replies) = (self.closer.clone(), replies.clone());
        tasks.spawn(async move { closer.answer(stream, reason, &replies).await });
    }
}

impl Closer {
    /// Counts `refusal`, answers its connection, in a task, and closes it.
    pub async fn refuse(&self, client: TcpStream, refusal: Refusal, replies: &Replies) {
        self.count(refusal);
        self.answer(client, refusal.reason, replies).await
    }

    /// The answer for `reason`, counted by the caller.
    async fn answer(&self, client: TcpStream, reason: RejectReason, replies: &Replies) {
        match reason {
            RejectReason::Denied => self.deny(client, replies).await,
            // A cached failure under `enforce`: greeted, then 550 to every command.
            RejectReason::Pregreet if replies.pregreet == crate::config::Pregreet::Enforce => {
                self.enforce(client, &replies.completion, Vec::new()).await
            }
            // A broken or untrusted upstream gets no SMTP text: it is not an SMTP client.
            RejectReason::BadProxyHeader => drop(client),
            _ => {
                self.reply_and_close(client, replies.line(reason)).await;
            }
        }
    }
}
