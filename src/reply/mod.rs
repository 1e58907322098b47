//! Refusals: mxgate's own SMTP replies, and closing a refused connection so that the client
//! actually reads them. Everything a refused connection goes through lives here.
//!
//! | concern | module |
//! | --- | --- |
//! | the reply texts | here |
//! | the one entry point for a refused connection, accept loop or task | `door` |
//! | the graceful close (write, half-close, bounded drain) and the deny dialogue | `close` |
//! | the accept loop's own lingering set (Linux) | `linger` |
//! | rejection summaries in the log | `summary` |
//! | the pregreet test's answers: `enforce`'s 550 dialogue, refusals after the teaser | `teased` |
//! | who was refused: per-source counts for the view, and the per-source (fail2ban) lines | `sources` |
//!
//! A reply followed at once by `close()` while unread client bytes remain makes the kernel send
//! RST, and the client may never see the line. So a refused connection is answered with the
//! line, then `shutdown(SHUT_WR)`, then a bounded read-and-discard, then the close. Nothing in
//! this module ever opens a backend connection.

mod close;
mod door;
#[cfg(target_os = "linux")]
pub mod linger;
mod sources;
mod summary;
mod tally;
mod teased;

pub use close::{
    Closer, DENY_BYTES, DENY_TIME, LINGER_BYTES, LINGER_TIME, MAX_DENYING, MAX_LINGERING,
};
pub use door::Door;
pub use sources::{Refused, SourceLine, SourceRefusals, LINE_INTERVAL, MAX_SOURCES};
pub use summary::{display_source, RejectSummary, SummaryLine, SUMMARY_INTERVAL};
pub use tally::Tally;

use crate::config::ReplyOverrides;
use crate::reason::RejectReason;

/// The reply templates; `{hostname}` is replaced by the configured host name.
pub fn default_template(reason: RejectReason) -> &'static str {
    match reason {
        // A wait in the queue that ends without a slot is the same answer as a full server.
        RejectReason::GlobalLimit | RejectReason::QueueTimeout | RejectReason::QueueFull => {
            "421 4.3.2 {hostname} Too many connections, try again later"
        }
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
        // postscreen's own line after its teaser; a cached failure gets it as its greeting.
        RejectReason::Pregreet => crate::pregreet::DROP_LINE,
    }
}

/// The reply line for every reason, rendered once, CRLF included.
#[derive(Clone, Debug)]
pub struct Replies {
    /// Indexed by `RejectReason as usize`.
    lines: Vec<Box<[u8]>>,
    /// The answer to QUIT in a denied session.
    bye: Box<[u8]>,
    /// What the pregreet test does to a client that fails it.
    pub pregreet: crate::config::Pregreet,
    /// `220-{hostname} ESMTP`: the pregreet test's teaser.
    pub teaser: Box<[u8]>,
    /// `220 {hostname} ESMTP`: the final line that completes the teaser's reply.
    pub completion: Box<[u8]>,
}

impl Replies {
    pub fn new(hostname: &str, overrides: &ReplyOverrides) -> Replies {
        let lines = RejectReason::ALL
            .iter()
            .map(|&r| {
                let over = match r {
                    RejectReason::GlobalLimit
                    | RejectReason::QueueTimeout
                    | RejectReason::QueueFull => &overrides.global_limit,
                    RejectReason::SourceLimit => &overrides.source_limit,
                    RejectReason::BackendUnavailable => &overrides.backend_unavailable,
                    RejectReason::RateLimit => &overrides.rate_limit,
                    RejectReason::NetworkLimit => &overrides.network_limit,
                    RejectReason::Denied => &overrides.denied,
                    RejectReason::Draining => &overrides.draining,
                    RejectReason::BadProxyHeader | RejectReason::Pregreet => &None,
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
            pregreet: crate::config::Pregreet::default(),
            teaser: crate::pregreet::teaser(hostname).into_boxed_slice(),
            completion: crate::pregreet::completion(hostname).into_boxed_slice(),
        }
    }

    /// These replies, with a failed pregreet test answered under `action`.
    pub fn with_pregreet(mut self, action: crate::config::Pregreet) -> Replies {
        self.pregreet = action;
        self
    }

    pub fn line(&self, reason: RejectReason) -> &[u8] {
        &self.lines[reason as usize]
    }
}

#[cfg(test)]
mod tests;
