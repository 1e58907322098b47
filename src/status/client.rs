//! `mxgate status`: asks a running instance's `/status` and prints it as tables for a person,
//! or the raw JSON. A plain blocking HTTP/1.1 GET with short timeouts: it runs once, by hand.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context};

use super::{BackendView, ClusterView, Snapshot, SourceRefused, SourceSessions};

/// How long a connect or a read may take before the instance counts as not answering.
const TIMEOUT: Duration = Duration::from_secs(5);
/// A `/status` answer larger than this is not mxgate's.
const MAX_ANSWER: u64 = 4 * 1024 * 1024;

/// The raw `/status` JSON of the instance whose metrics listener is `addr`.
pub fn fetch(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| {
        format!("no mxgate answers on {addr} (is it running, with `metrics` set to this address?)")
    })?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    write!(
        s,
        "GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("cannot ask {addr} for /status"))?;
    let mut answer = Vec::new();
    s.take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .with_context(|| format!("no answer from {addr}"))?;
    let text = String::from_utf8(answer).context("the answer is not UTF-8")?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("{addr} did not answer in HTTP: is it mxgate's metrics listener?");
    };
    let status = head.lines().next().unwrap_or("");
    if status.split(' ').nth(1) == Some("404") {
        bail!("{addr} does not serve /status: the live view is off (`status = false`) or this is not mxgate");
    }
    if status.split(' ').nth(1) != Some("200") {
        bail!("{addr} answered {status:?}");
    }
    Ok(body.to_string())
}

/// The snapshot of the instance whose metrics listener is `addr`.
pub fn snapshot(addr: SocketAddr) -> anyhow::Result<Snapshot> {
    let body = fetch(addr)?;
    serde_json::from_str(&body)
        .with_context(|| format!("{addr} answered something other than mxgate's /status"))
}

fn limit(n: usize) -> String {
    if n == 0 {
        "none".into()
    } else {
        n.to_string()
    }
}

/// Lines of a table, with each column as wide as its widest cell.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |out: &mut String, cells: &[String]| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str("  ");
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(
        out,
        &header.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    );
    for r in rows {
        line(out, r);
    }
}

/// The snapshot as a person reads it.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    summary(&mut out, s);
    if let Some(p) = &s.pregreet {
        out.push_str(&format!(
            "pregreet {}: {} of {} clients under the test, {} sources cached as passed, {} as \
             failed\n",
            p.action, p.testing, p.max_clients, p.cached_pass, p.cached_fail
        ));
    }
    if let Some(c) = &s.cluster {
        cluster(&mut out, c);
    }
    backends(&mut out, &s.backends);
    top_sources(&mut out, &s.top_sources);
    top_refused(&mut out, &s.top_refused);
    out
}

/// The heading lines: version and load, sessions, limits, config.
fn summary(out: &mut String, s: &Snapshot) {
    let l = &s.limits;
    out.push_str(&format!("mxgate {}: {}\n", s.version, s.status_line()));
    out.push_str(&format!(
        "sessions: {} active (limit {}, peak {}), {} waiting{} (max {}), {} sources\n",
        s.active,
        limit(l.max_connections),
        s.active_max,
        s.queued,
        if s.queued > 0 {
            format!(", the longest for {:.1}s", s.queued_longest_seconds)
        } else {
            String::new()
        },
        if l.max_queued == 0 {
            "queue off".to_string()
        } else {
            format!("{}, timeout {}s", l.max_queued, l.queue_timeout_seconds)
        },
        s.sources
    ));
    out.push_str(&format!(
        "limits: max_per_source {}, reserved_for_allowed {}, prefixes /{} (IPv4) /{} (IPv6){}\n",
        limit(l.max_per_source),
        l.reserved_for_allowed,
        l.ipv4_prefix,
        l.ipv6_prefix,
        if l.dry_run {
            ", DRY RUN: nobody is refused"
        } else {
            ""
        }
    ));
    out.push_str(&format!(
        "config: loaded at {} (unix), {} reloads, last {}\n",
        s.reload.loaded_at.round(),
        s.reload.reloads,
        if s.reload.last_successful {
            "succeeded"
        } else {
            "FAILED (the old config is in force)"
        }
    ));
}

/// The cluster line, for an instance in a cluster.
fn cluster(out: &mut String, c: &ClusterView) {
    out.push_str(&format!(
        "cluster {} (instance {}): {}; {} sessions here, {} across {} instances (as Redis counted them)\n",
        c.name,
        c.instance,
        if c.connected && c.warming {
            format!(
                "limits shared, and {} of each held here too while Redis's new counts warm up",
                c.fallback_share
            )
        } else if c.connected {
            "limits shared".to_string()
        } else {
            format!("REDIS UNREACHABLE, enforcing {} of each limit alone", c.fallback_share)
        },
        c.local_sessions,
        c.cluster_sessions,
        c.instances
    ));
}

/// A learned limit, its phase, and whether it was resumed: `400 (learned, steady, resumed)`.
fn learned(n: usize, b: &BackendView) -> String {
    let mut about = vec!["learned"];
    about.extend(b.phase.as_deref());
    if b.resumed {
        about.push("resumed");
    }
    format!("{n} ({})", about.join(", "))
}

/// The backends table.
fn backends(out: &mut String, backends: &[BackendView]) {
    out.push_str("\nbackends\n");
    let rows: Vec<Vec<String>> = backends
        .iter()
        .map(|b| {
            vec![
                format!("{}{}", b.address, if b.backup { " (backup)" } else { "" }),
                if b.up { "up" } else { "DOWN" }.to_string(),
                b.active.to_string(),
                match b.limit {
                    None => "global".to_string(),
                    Some(n) if b.learned => learned(n, b),
                    Some(n) => n.to_string(),
                },
                b.last_check.as_ref().map_or("none yet".into(), |c| {
                    format!("{}, {:.0}s ago", c.result, c.seconds_ago)
                }),
            ]
        })
        .collect();
    table(
        out,
        &["backend", "health", "active", "limit", "last check"],
        &rows,
    );
}

/// The sources holding the most sessions.
fn top_sources(out: &mut String, top: &[SourceSessions]) {
    out.push_str("\ntop sources by open sessions\n");
    if top.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let rows: Vec<Vec<String>> = top
            .iter()
            .map(|t| vec![t.source.clone(), t.sessions.to_string()])
            .collect();
        table(out, &["source", "sessions"], &rows);
    }
}

/// The sources refused most in the last minute, with their reasons.
fn top_refused(out: &mut String, top: &[SourceRefused]) {
    out.push_str("\ntop sources refused in the last minute\n");
    if top.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let rows: Vec<Vec<String>> = top
            .iter()
            .map(|t| {
                let reasons: Vec<String> = t
                    .reasons
                    .iter()
                    .map(|r| format!("{} {}", r.reason, r.count))
                    .collect();
                vec![t.source.clone(), t.refusals.to_string(), reasons.join(", ")]
            })
            .collect();
        table(out, &["source", "refusals", "reasons"], &rows);
    }
}
