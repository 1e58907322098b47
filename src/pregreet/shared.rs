//! The pregreet cache shared between the hosts of a `[cluster]`, through its Redis: one key per
//! address, `{prefix}pregreet:{address}`, holding `pass` or `fail`, with the verdict's TTL on
//! the key itself, so Redis forgets it when the local caches would.
//!
//! Only a local miss asks (one round trip, bounded by `admission_timeout`); a verdict is written
//! through in a task of its own, never waited for. A Redis that is down, slow or answers
//! nonsense is a miss, never a refusal.

use std::net::IpAddr;
use std::sync::Arc;

use super::cache::{Cached, Verdict};
use crate::cluster::Cluster;

pub struct Shared {
    cluster: Arc<Cluster>,
}

fn key(prefix: &str, ip: IpAddr) -> String {
    format!("{prefix}pregreet:{ip}")
}

impl Shared {
    pub fn new(cluster: Arc<Cluster>) -> Shared {
        Shared { cluster }
    }

    /// The cluster's verdict on `ip` and when it ends (`now` plus the key's TTL), if Redis
    /// has one and answers in time.
    pub async fn get(&self, ip: IpAddr, now: u64) -> Option<Cached> {
        let (mut conn, prefix) = self.cluster.shared_link()?;
        let key = key(prefix, ip);
        let timeout = self.cluster.config().admission_timeout;
        let mut pipe = redis::pipe();
        pipe.get(&key).ttl(&key);
        let ask = pipe.query_async::<(Option<String>, i64)>(&mut conn);
        let (value, ttl) = match tokio::time::timeout(timeout, ask).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "pregreet: Redis did not answer; a local miss");
                return None;
            }
            Err(_) => return None,
        };
        let verdict = match value.as_deref() {
            Some("pass") => Verdict::Pass,
            Some("fail") => Verdict::Fail,
            _ => return None,
        };
        // A key without a TTL (-1) was not written by mxgate: not trusted.
        let ttl = u64::try_from(ttl).ok().filter(|&t| t > 0)?;
        Some(Cached {
            verdict,
            until: now.saturating_add(ttl),
        })
    }

    /// Writes `verdict` on `ip` through to Redis for `ttl_secs`, in the background.
    pub fn put(&self, ip: IpAddr, verdict: Verdict, ttl_secs: u64) {
        if ttl_secs == 0 {
            return;
        }
        let Some((mut conn, prefix)) = self.cluster.shared_link() else {
            return;
        };
        let key = key(prefix, ip);
        let value = match verdict {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
        };
        let timeout = crate::cluster::UPKEEP_TIMEOUT;
        tokio::spawn(async move {
            let mut cmd = redis::cmd("SET");
            cmd.arg(&key).arg(value).arg("EX").arg(ttl_secs);
            let set = cmd.query_async::<()>(&mut conn);
            if let Ok(Err(e)) = tokio::time::timeout(timeout, set).await {
                tracing::debug!(error = %e, "pregreet: a verdict was not written to Redis");
            }
        });
    }
}
