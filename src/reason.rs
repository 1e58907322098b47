//! Why mxgate answered a client itself: the one enum that picks the reply text, the metric's
//! `reason` label and the log line, so the three can never disagree. Admission decides some
//! reasons, the session others (backend unavailable, draining, a bad PROXY header), the wait
//! queue two (its timeout, and a full queue); none of them lives in any of those.

/// A refusal, with the source key it was decided for: the same key the summaries, the
/// per-source logs and the live view count it under. What [`crate::reply`]'s `Door` and
/// `Closer` take, and count as they answer it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RejectReason,
    pub source: ipnet::IpNet,
}

/// Why a client was not admitted. This one enum chooses the reply, the metric label and the log
/// line, so the three can never disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Every global slot (open to this source) is taken.
    GlobalLimit,
    /// The client's source already holds its share.
    SourceLimit,
    /// The backend refused, reset or did not answer within the connect timeout.
    BackendUnavailable,
    /// The source opened connections faster than its rate.
    RateLimit,
    /// The source's network block already holds its share.
    NetworkLimit,
    /// The source is on the deny list.
    Denied,
    /// mxgate is shutting down.
    Draining,
    /// A PROXY protocol header was malformed, late, too large or from an untrusted peer.
    BadProxyHeader,
    /// The client waited in the queue for `queue_timeout` without a slot freeing. Answered
    /// with the global-limit reply.
    QueueTimeout,
    /// The capacity was full and the queue already held `max_queued`. Answered with the
    /// global-limit reply.
    QueueFull,
    /// The client spoke before its turn in the pregreet test, now or within
    /// `pregreet_fail_ttl` before.
    Pregreet,
}

impl RejectReason {
    pub const ALL: [RejectReason; 11] = [
        RejectReason::GlobalLimit,
        RejectReason::SourceLimit,
        RejectReason::BackendUnavailable,
        RejectReason::RateLimit,
        RejectReason::NetworkLimit,
        RejectReason::Denied,
        RejectReason::Draining,
        RejectReason::BadProxyHeader,
        RejectReason::QueueTimeout,
        RejectReason::QueueFull,
        RejectReason::Pregreet,
    ];

    /// The `reason` label value, which dashboards depend on.
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::GlobalLimit => "global_limit",
            RejectReason::SourceLimit => "source_limit",
            RejectReason::BackendUnavailable => "backend_unavailable",
            RejectReason::RateLimit => "rate_limit",
            RejectReason::NetworkLimit => "network_limit",
            RejectReason::Denied => "denied",
            RejectReason::Draining => "draining",
            RejectReason::BadProxyHeader => "bad_proxy_header",
            RejectReason::QueueTimeout => "queue_timeout",
            RejectReason::QueueFull => "queue_full",
            RejectReason::Pregreet => "pregreet",
        }
    }
}
