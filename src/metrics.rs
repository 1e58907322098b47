//! Prometheus metrics: the fixed set of series mxgate exports, and the `/metrics` endpoint.
//!
//! Each running instance owns its own recorder instead of installing a process-wide one, so
//! several instances (the tests run many in one process) never mix their counts. Handles are
//! registered once at start-up; the hot path only touches atomics. No label ever carries an
//! address, so the number of series is fixed.
//!
//! The endpoint is a deliberately tiny HTTP/1.x responder: it reads one bounded request head,
//! answers it and closes. Anything it cannot parse gets a 400, never a crash.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::reason::RejectReason;

/// Buckets for the connect-time histogram: loopback connects take tens of µs, a remote backend
/// under load can take seconds.
const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Buckets for session length: SMTP sessions last from milliseconds to the idle timeout.
const SESSION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
/// Buckets for the wait in the queue: from a slot that frees at once to the longest
/// `queue_timeout` clients will sit through.
const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// A request head larger than this is not a metrics scrape.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A scraper that has not sent its request head by then is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often recorded histogram samples are folded into buckets, scraped or not.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How many metrics connections are served at once; past it new ones wait in the kernel's
/// backlog, so slow or idle clients of the endpoint cannot pile up tasks.
pub const MAX_METRICS_CONNECTIONS: usize = 32;

/// Every metric family mxgate exports, with its unit and HELP text.
const HELP: &[(&str, Option<Unit>, &str)] = &[
    (
        "mxgate_connections_accepted_total",
        None,
        "Client connections accepted by the listeners, admitted or not.",
    ),
    (
        "mxgate_connections_active",
        None,
        "Admitted client sessions now open.",
    ),
    (
        "mxgate_sources_active",
        None,
        "Distinct sources (address masked to its prefix) with an admitted session open.",
    ),
    (
        "mxgate_connections_rejected_total",
        None,
        "Client connections answered by mxgate itself instead of the backend, by reason.",
    ),
    (
        "mxgate_bytes_total",
        Some(Unit::Bytes),
        "Bytes forwarded, by direction.",
    ),
    ("mxgate_limit", None, "The limits in force."),
    (
        "mxgate_backend_connect_seconds",
        Some(Unit::Seconds),
        "Time to connect to the backend.",
    ),
    (
        "mxgate_session_duration_seconds",
        Some(Unit::Seconds),
        "Length of forwarded sessions.",
    ),
    (
        "mxgate_connections_queued",
        None,
        "Clients waiting in the queue for a slot, without a greeting yet.",
    ),
    (
        "mxgate_queue_wait_seconds",
        Some(Unit::Seconds),
        "Time each client spent in the queue, admitted or not.",
    ),
    (
        "mxgate_proxy_headers_pending",
        None,
        "Connections from trusted upstreams waiting for their PROXY header (no slot held yet).",
    ),
    (
        "mxgate_spliced_bytes_total",
        Some(Unit::Bytes),
        "Bytes moved by splice(2), both directions together (a part of mxgate_bytes_total).",
    ),
    (
        "mxgate_splice_fallbacks_total",
        None,
        "Sessions that switched from splice to copying because the kernel refused splice.",
    ),
    (
        "mxgate_splice_pool_exhausted_total",
        None,
        "Forwarding steps copied because every splice pipe was in use.",
    ),
    (
        "mxgate_splice_pipes",
        None,
        "Splice pipes in existence, pooled or in use.",
    ),
    (
        "mxgate_config_reloads_total",
        None,
        "Config reloads, by result (success, failure).",
    ),
    (
        "mxgate_rate_limit_untracked_total",
        None,
        "Admissions not rate-checked because the rate limiter was at its key cap.",
    ),
    (
        "mxgate_backend_limit",
        None,
        "Sessions a backend may take: its fixed max_connections, its learned limit (auto), or the global limit when it has no cap of its own.",
    ),
    (
        "mxgate_backend_busy_total",
        None,
        "Temporary (4xx) greetings from a backend that mxgate absorbed: the client never saw them.",
    ),
    (
        "mxgate_backend_greeting_seconds",
        Some(Unit::Seconds),
        "Time from the backend connect to its greeting.",
    ),
    (
        "mxgate_backend_up",
        None,
        "1 when the backend is healthy, 0 when marked down.",
    ),
    (
        "mxgate_backend_connections_active",
        None,
        "Sessions on this backend now.",
    ),
    (
        "mxgate_backend_selected_total",
        None,
        "Sessions given to this backend.",
    ),
    (
        "mxgate_backend_health_checks_total",
        None,
        "Backend health observations, by result (failed session connects included).",
    ),
];

/// One backend's series, labelled by its configured address (a bounded set).
pub struct BackendSeries {
    pub limit: Gauge,
    pub busy: Counter,
    pub greeting_seconds: Histogram,
    pub up: Gauge,
    pub active: Gauge,
    pub selected: Counter,
    pub checks_ok: Counter,
    pub checks_failed: Counter,
}

/// Every series mxgate exports, as ready-to-use handles.
pub struct Metrics {
    /// The recorder that owns the storage behind every handle below.
    recorder: PrometheusRecorder,
    /// Renders the text exposition format on each scrape.
    handle: PrometheusHandle,
    pub accepted: Counter,
    pub active: Gauge,
    pub sources_active: Gauge,
    /// Indexed by `RejectReason as usize`.
    rejected: Vec<Counter>,
    pub bytes_client_to_backend: Counter,
    pub bytes_backend_to_client: Counter,
    pub limit_max_connections: Gauge,
    pub limit_max_per_source: Gauge,
    pub limit_max_queued: Gauge,
    pub queued: Gauge,
    pub queue_wait_seconds: Histogram,
    /// Connections from a trusted upstream whose PROXY header has not arrived yet.
    pub proxy_headers_pending: Gauge,
    pub spliced_bytes: Counter,
    pub splice_fallbacks: Counter,
    pub splice_pool_exhausted: Counter,
    pub splice_pipes: Gauge,
    pub reloads_ok: Counter,
    pub reloads_failed: Counter,
    pub rate_untracked: Counter,
    pub backend_connect_seconds: Histogram,
    pub session_duration_seconds: Histogram,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("mxgate_backend_connect_seconds".into()),
                CONNECT_BUCKETS,
            )
            .expect("non-empty buckets")
            .set_buckets_for_metric(
                Matcher::Full("mxgate_backend_greeting_seconds".into()),
                CONNECT_BUCKETS,
            )
            .expect("non-empty buckets")
            .set_buckets_for_metric(
                Matcher::Full("mxgate_session_duration_seconds".into()),
                SESSION_BUCKETS,
            )
            .expect("non-empty buckets")
            .set_buckets_for_metric(
                Matcher::Full("mxgate_queue_wait_seconds".into()),
                QUEUE_WAIT_BUCKETS,
            )
            .expect("non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Every family's HELP text, in one place (`describe_*` all fill the same table).
        for (name, unit, help) in HELP {
            recorder.describe_counter((*name).into(), *unit, (*help).into());
        }

        let meta = Metadata::new(module_path!(), metrics::Level::INFO, None);
        let key = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            Key::from_parts(
                name,
                labels
                    .iter()
                    .map(|(k, v)| Label::new(*k, *v))
                    .collect::<Vec<_>>(),
            )
        };
        let counter = |name, labels: &[(&'static str, &'static str)]| {
            recorder.register_counter(&key(name, labels), &meta)
        };
        let gauge = |name, labels: &[(&'static str, &'static str)]| {
            recorder.register_gauge(&key(name, labels), &meta)
        };
        let histogram = |name| recorder.register_histogram(&key(name, &[]), &meta);

        let rejected = RejectReason::ALL
            .iter()
            .map(|r| {
                counter(
                    "mxgate_connections_rejected_total",
                    &[("reason", r.label())],
                )
            })
            .collect();
        let m = Metrics {
            accepted: counter("mxgate_connections_accepted_total", &[]),
            active: gauge("mxgate_connections_active", &[]),
            sources_active: gauge("mxgate_sources_active", &[]),
            rejected,
            bytes_client_to_backend: counter(
                "mxgate_bytes_total",
                &[("direction", "client_to_backend")],
            ),
            bytes_backend_to_client: counter(
                "mxgate_bytes_total",
                &[("direction", "backend_to_client")],
            ),
            limit_max_connections: gauge("mxgate_limit", &[("kind", "max_connections")]),
            limit_max_per_source: gauge("mxgate_limit", &[("kind", "max_per_source")]),
            limit_max_queued: gauge("mxgate_limit", &[("kind", "max_queued")]),
            queued: gauge("mxgate_connections_queued", &[]),
            queue_wait_seconds: histogram("mxgate_queue_wait_seconds"),
            proxy_headers_pending: gauge("mxgate_proxy_headers_pending", &[]),
            spliced_bytes: counter("mxgate_spliced_bytes_total", &[]),
            splice_fallbacks: counter("mxgate_splice_fallbacks_total", &[]),
            splice_pool_exhausted: counter("mxgate_splice_pool_exhausted_total", &[]),
            splice_pipes: gauge("mxgate_splice_pipes", &[]),
            reloads_ok: counter("mxgate_config_reloads_total", &[("result", "success")]),
            reloads_failed: counter("mxgate_config_reloads_total", &[("result", "failure")]),
            rate_untracked: counter("mxgate_rate_limit_untracked_total", &[]),
            backend_connect_seconds: histogram("mxgate_backend_connect_seconds"),
            session_duration_seconds: histogram("mxgate_session_duration_seconds"),
            handle,
            recorder,
        };
        Arc::new(m)
    }

    pub fn rejected(&self, reason: RejectReason) -> &Counter {
        &self.rejected[reason as usize]
    }

    /// The dry-run twin of [`Metrics::rejected`]: would-be rejections, `dry_run="true"`.
    /// Registered on first use, so the series exist only where dry run was ever on.
    pub fn rejected_dry_run(&self, reason: RejectReason) -> Counter {
        let meta = Metadata::new(module_path!(), metrics::Level::INFO, None);
        let labels = vec![
            Label::new("reason", reason.label()),
            Label::new("dry_run", "true"),
        ];
        self.recorder.register_counter(
            &Key::from_parts("mxgate_connections_rejected_total", labels),
            &meta,
        )
    }

    /// The series of the backend configured as `label` (registered on first use, found after).
    pub fn backend(&self, label: &str) -> BackendSeries {
        let meta = Metadata::new(module_path!(), metrics::Level::INFO, None);
        let key = |name: &'static str, result: Option<&'static str>| {
            let mut labels = vec![Label::new("backend", label.to_string())];
            if let Some(r) = result {
                labels.push(Label::new("result", r));
            }
            Key::from_parts(name, labels)
        };
        BackendSeries {
            limit: self
                .recorder
                .register_gauge(&key("mxgate_backend_limit", None), &meta),
            busy: self
                .recorder
                .register_counter(&key("mxgate_backend_busy_total", None), &meta),
            greeting_seconds: self
                .recorder
                .register_histogram(&key("mxgate_backend_greeting_seconds", None), &meta),
            up: self
                .recorder
                .register_gauge(&key("mxgate_backend_up", None), &meta),
            active: self
                .recorder
                .register_gauge(&key("mxgate_backend_connections_active", None), &meta),
            selected: self
                .recorder
                .register_counter(&key("mxgate_backend_selected_total", None), &meta),
            checks_ok: self.recorder.register_counter(
                &key("mxgate_backend_health_checks_total", Some("success")),
                &meta,
            ),
            checks_failed: self.recorder.register_counter(
                &key("mxgate_backend_health_checks_total", Some("failure")),
                &meta,
            ),
        }
    }

    /// Folds the histogram samples recorded since the last call into their buckets. The
    /// recorder otherwise keeps every sample until a scrape, so without a scraper (or with the
    /// endpoint off) memory would grow with every session.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The text exposition format, as served on `/metrics`.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

/// Serves `/metrics` until `stop` is cancelled. Each request is handled in its own task.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
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
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &metrics)).await;
            drop(slot);
        });
    }
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
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
    let (status, body) = if !complete {
        ("400 Bad Request", String::from("bad request\n"))
    } else {
        route(&head, metrics)
    };
    let is_head = head.starts_with(b"HEAD ");
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    if !is_head {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

fn route(head: &[u8], metrics: &Metrics) -> (&'static str, String) {
    let line_end = head
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return ("400 Bad Request", "bad request\n".into());
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return ("400 Bad Request", "bad request\n".into());
    };
    if !version.starts_with("HTTP/1.") {
        return ("400 Bad Request", "bad request\n".into());
    }
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", "only GET and HEAD\n".into());
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => ("200 OK", metrics.render()),
        "/" => ("200 OK", "mxgate: metrics at /metrics\n".into()),
        _ => ("404 Not Found", "not found\n".into()),
    }
}

/// Binds the metrics listener, so a busy port is an error at start-up.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
