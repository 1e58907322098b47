//! The metrics listener: `/metrics` for Prometheus, `/status` (JSON) and `/` (the page) for
//! people. A deliberately tiny HTTP/1.x responder: it reads one bounded request head, answers
//! it and closes. Anything it cannot parse gets a 400, never a crash; a version other than
//! HTTP/1.0 and 1.1 a 505; a method other than GET and HEAD a 405 with `Allow`. With
//! `status = false`, `/status` is a 404 and `/` says where the metrics are, so no client
//! address is shown; with it on, they answer only a Host that names this listener (its
//! address, `localhost`, or a name in `status_hosts`), so a page elsewhere cannot read them
//! through DNS rebinding. `/metrics` answers any Host. The accept loop is `accept`'s.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Snapshot;
use crate::gate::Gate;

/// A request head larger than this is not a scrape.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A client that has not sent its whole request head by then is dropped: Prometheus and a
/// browser send theirs at once, so only a slow or idle client ever waits this long.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// The whole exchange, the answer's write included, ends by then.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The page, self-contained: its script asks `/status` every few seconds.
const PAGE: &str = include_str!("page.html");

const TEXT: &str = "text/plain; charset=utf-8";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The page may run its own inline script and style and ask its own origin, nothing else.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One answer: status line, content type, body.
struct Response {
    status: &'static str,
    kind: &'static str,
    body: String,
    /// A HEAD request: the head alone.
    head_only: bool,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Response {
        Response {
            status,
            kind: TEXT,
            body: body.to_string(),
            head_only: false,
        }
    }
}

/// Answers one connection: its request head within [`HEAD_TIMEOUT`], the whole exchange within
/// a few seconds more. `head_read` is told once the head is in, so the connection is no longer
/// idle and may not be pre-empted.
pub(super) async fn exchange(stream: TcpStream, gate: &Gate, head_read: impl FnOnce()) {
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, answer(stream, gate, head_read)).await;
}

/// Reads one request head and answers it.
async fn answer(
    mut stream: TcpStream,
    gate: &Gate,
    head_read: impl FnOnce(),
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        // Too slow for a scrape: dropped without a word.
        Err(_) => return Ok(()),
    };
    head_read();
    let local = stream.local_addr().ok();
    let a = match head {
        Some(head) => route(&head, gate, local),
        None => Response::text("400 Bad Request", "bad request\n"),
    };
    let is_head = a.head_only;
    let policy = if a.kind.starts_with("text/html") {
        format!("Content-Security-Policy: {PAGE_POLICY}\r\n")
    } else {
        String::new()
    };
    let allow = if a.status.starts_with("405") {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let response = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n{allow}{policy}Connection: close\r\n\r\n",
        a.status,
        a.kind,
        a.body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    if !is_head {
        stream.write_all(a.body.as_bytes()).await?;
    }
    stream.shutdown().await
}

/// One request head, or `None` for a client that closed first or sent too much.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break false;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() > MAX_REQUEST_HEAD {
            break false;
        }
    };
    Ok(complete.then_some(head))
}

fn route(head: &[u8], gate: &Gate, local: Option<SocketAddr>) -> Response {
    let line_end = head
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Response::text("400 Bad Request", "bad request\n");
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text("400 Bad Request", "bad request\n");
    };
    if !version.starts_with("HTTP/") {
        return Response::text("400 Bad Request", "bad request\n");
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Response::text("505 HTTP Version Not Supported", "only HTTP/1.0 and 1.1\n");
    }
    if method != "GET" && method != "HEAD" {
        return Response::text("405 Method Not Allowed", "only GET and HEAD\n");
    }
    let path = target.split('?').next().unwrap_or("");
    let live = gate.live.load();
    let status_on = live.config.status;
    // The view names client addresses: a page on another origin must not read it through
    // DNS rebinding, so it answers only a Host that names this listener.
    if matches!(path, "/status" | "/") && status_on {
        let known =
            host_header(head).is_some_and(|h| host_allowed(h, local, &live.config.status_hosts));
        if !known {
            return Response::text(
                "403 Forbidden",
                "unknown Host: use the listen address, localhost, or a name in status_hosts\n",
            );
        }
    }
    let mut a = match path {
        "/metrics" => {
            // Counted at the scrape, so it is never a tick behind.
            let refused = gate.sources.refused_sources();
            gate.metrics.sources_refused.set(refused as f64);
            Response {
                status: "200 OK",
                kind: PROMETHEUS,
                body: gate.metrics.render(),
                head_only: false,
            }
        }
        "/status" if status_on => Response {
            status: "200 OK",
            kind: "application/json",
            body: serde_json::to_string(&Snapshot::take(gate)).expect("a snapshot serialises"),
            head_only: false,
        },
        "/status" => Response::text("404 Not Found", "the live view is off (status = false)\n"),
        "/" if status_on => Response {
            status: "200 OK",
            kind: "text/html; charset=utf-8",
            body: PAGE.to_string(),
            head_only: false,
        },
        "/" => Response::text("200 OK", "mxgate: metrics at /metrics\n"),
        _ => Response::text("404 Not Found", "not found\n"),
    };
    a.head_only = method == "HEAD";
    a
}

/// The value of the request's Host header, if it has one.
fn host_header(head: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(head).ok()?;
    text.lines().skip(1).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("host")
            .then(|| value.trim())
    })
}

/// Whether `host` (a Host header's value, perhaps with a port) names this listener: its
/// address, `localhost`, or one of `names`.
fn host_allowed(host: &str, local: Option<SocketAddr>, names: &[String]) -> bool {
    // Without the port: `[::1]:9925`, `127.0.0.1:9925`, `name:9925`, or bare.
    let bare = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let bare = bare.trim_end_matches('.').to_ascii_lowercase();
    if bare.is_empty() {
        return false;
    }
    if bare == "localhost" || names.iter().any(|n| n.trim_end_matches('.') == bare) {
        return true;
    }
    match (bare.parse::<std::net::IpAddr>(), local) {
        (Ok(ip), Some(l)) => ip.to_canonical() == l.ip().to_canonical(),
        _ => false,
    }
}

/// Binds the metrics listener, so a busy port is an error at start-up.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
