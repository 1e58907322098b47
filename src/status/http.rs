//! The metrics listener: `/metrics` for Prometheus, `/status` (JSON) and `/` (the page) for
//! people. A deliberately tiny HTTP/1.x responder: it reads one bounded request head, answers
//! it and closes. Anything it cannot parse gets a 400, never a crash. With `status = false`,
//! `/status` is a 404 and `/` says where the metrics are, so no client address is shown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::Snapshot;
use crate::server::gate::Gate;

/// A request head larger than this is not a scrape.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A client that has not sent its request head by then is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How many connections are served at once; past it new ones wait in the kernel's backlog,
/// so slow or idle clients of the endpoint cannot pile up tasks.
pub const MAX_METRICS_CONNECTIONS: usize = 32;

/// The page, self-contained: its script asks `/status` every few seconds.
const PAGE: &str = include_str!("page.html");

const TEXT: &str = "text/plain; charset=utf-8";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The page may run its own inline script and style and ask its own origin, nothing else.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One answer: status line, content type, body.
struct Answer {
    status: &'static str,
    kind: &'static str,
    body: String,
}

impl Answer {
    fn text(status: &'static str, body: &str) -> Answer {
        Answer {
            status,
            kind: TEXT,
            body: body.to_string(),
        }
    }
}

/// Serves the listener until `stop` is cancelled. Each request is handled in its own task.
pub async fn serve(listener: TcpListener, gate: Arc<Gate>, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    loop {
        // A slot first: with every slot taken, new connections wait in the kernel's backlog
        // rather than each getting a task.
        let slot = tokio::select! {
            _ = stop.cancelled() => return,
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let gate = gate.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &gate)).await;
            drop(slot);
        });
    }
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, gate: &Gate) -> std::io::Result<()> {
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
    let a = if complete {
        route(&head, gate)
    } else {
        Answer::text("400 Bad Request", "bad request\n")
    };
    let is_head = head.starts_with(b"HEAD ");
    let policy = if a.kind.starts_with("text/html") {
        format!("Content-Security-Policy: {PAGE_POLICY}\r\n")
    } else {
        String::new()
    };
    let response = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n{policy}Connection: close\r\n\r\n",
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

fn route(head: &[u8], gate: &Gate) -> Answer {
    let line_end = head
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Answer::text("400 Bad Request", "bad request\n");
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Answer::text("400 Bad Request", "bad request\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Answer::text("400 Bad Request", "bad request\n");
    }
    if method != "GET" && method != "HEAD" {
        return Answer::text("405 Method Not Allowed", "only GET and HEAD\n");
    }
    let path = target.split('?').next().unwrap_or("");
    let status_on = gate.live.load().config.status;
    match path {
        "/metrics" => {
            // Counted at the scrape, so it is never a tick behind.
            let refused = gate.sources.refused_sources();
            gate.metrics.sources_refused.set(refused as f64);
            Answer {
                status: "200 OK",
                kind: PROMETHEUS,
                body: gate.metrics.render(),
            }
        }
        "/status" if status_on => Answer {
            status: "200 OK",
            kind: "application/json",
            body: serde_json::to_string(&Snapshot::take(gate)).expect("a snapshot serialises"),
        },
        "/status" => Answer::text("404 Not Found", "the live view is off (status = false)\n"),
        "/" if status_on => Answer {
            status: "200 OK",
            kind: "text/html; charset=utf-8",
            body: PAGE.to_string(),
        },
        "/" => Answer::text("200 OK", "mxgate: metrics at /metrics\n"),
        _ => Answer::text("404 Not Found", "not found\n"),
    }
}

/// Binds the metrics listener, so a busy port is an error at start-up.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
