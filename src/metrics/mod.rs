//! Prometheus metrics: the fixed set of series mxgate exports, and the `/metrics` endpoint.
//!
//! Each running instance owns its own recorder instead of installing a process-wide one, so
//! several instances (the tests run many in one process) never mix their counts. Handles are
//! registered once at start-up; the hot path only touches atomics. No label ever carries an
//! address, so the number of series is fixed.
//!
//! The process's own descriptors, memory and CPU (`process_*`, the names every Prometheus
//! client library uses) are read from `/proc` at each scrape ([`process`]). The endpoint that
//! serves all this lives with the live view, in `crate::status`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::reason::RejectReason;

mod process;

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
/// How often recorded histogram samples are folded into buckets, scraped or not.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Every metric family mxgate exports, with its unit and HELP text.
const HELP: &[(&str, Option<Unit>, &str)] = &[
    (
        "mxgate_cluster_connected",
        None,
        "1 while the cluster's Redis decides admissions, 0 while the fallback share does.",
    ),
    (
        "mxgate_cluster_admission_seconds",
        Some(Unit::Seconds),
        "Time of each clustered admission's round trip to Redis, answered or timed out.",
    ),
    (
        "mxgate_cluster_fallback_admissions_total",
        None,
        "Admissions decided alone, under the fallback share, because Redis was unreachable.",
    ),
    (
        "mxgate_cluster_connections",
        None,
        "Sessions open across the whole cluster, as Redis counted them at the last lease refresh.",
    ),
    (
        "mxgate_cluster_instances",
        None,
        "Instances holding a live lease in the cluster, this one included.",
    ),
    (
        "mxgate_cluster_warming",
        None,
        "1 for one lease after the cluster's Redis began its counts empty (first start, or a restart without persistence): admissions then also hold to the fallback share.",
    ),
    (
        "mxgate_cluster_disconnects_total",
        None,
        "Times this instance lost Redis and fell back to deciding alone under its share.",
    ),
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
        "mxgate_connections_active_max",
        None,
        "The most admitted sessions open at once since start: catches peaks between scrapes.",
    ),
    (
        "mxgate_sources_refused",
        None,
        "Distinct sources refused in the last minute, deny-listed ones not counted.",
    ),
    (
        "mxgate_connections_would_reject_total",
        None,
        "Dry run: connections that would have been refused, by reason (they were forwarded).",
    ),
    (
        "mxgate_dry_run",
        None,
        "1 while dry_run is on: limits are only counted, nobody is refused.",
    ),
    (
        "mxgate_build_info",
        None,
        "Always 1; the version label says which mxgate runs.",
    ),
    (
        "mxgate_config_last_reload_successful",
        None,
        "1 if the last config reload succeeded (or none was tried), 0 if it failed.",
    ),
    (
        "mxgate_config_last_reload_success_timestamp_seconds",
        Some(Unit::Seconds),
        "When the config in force was loaded: the last successful reload, or the start.",
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

/// The cluster's series, registered only when a cluster is configured (an instance that counts
/// alone shows none, so no alert fires on a 0 that means nothing).
pub struct ClusterSeries {
    pub connected: Gauge,
    pub admission_seconds: Histogram,
    pub fallback_admissions: Counter,
    pub connections: Gauge,
    pub instances: Gauge,
    pub warming: Gauge,
    pub disconnects: Counter,
}

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
    pub active_max: Gauge,
    pub sources_refused: Gauge,
    /// Indexed by `RejectReason as usize`.
    rejected: Vec<Counter>,
    /// Dry run's would-be refusals, indexed like `rejected`.
    would_reject: Vec<Counter>,
    pub dry_run: Gauge,
    pub last_reload_successful: Gauge,
    pub last_reload_success_timestamp: Gauge,
    pub bytes_client_to_backend: Counter,
    pub bytes_backend_to_client: Counter,
    pub limit_max_connections: Gauge,
    pub limit_max_per_source: Gauge,
    pub limit_max_queued: Gauge,
    pub limit_reserved_for_allowed: Gauge,
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
                Matcher::Full("mxgate_cluster_admission_seconds".into()),
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
        let would_reject = RejectReason::ALL
            .iter()
            .map(|r| {
                counter(
                    "mxgate_connections_would_reject_total",
                    &[("reason", r.label())],
                )
            })
            .collect();
        gauge(
            "mxgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
        )
        .set(1.0);
        let last_reload_successful = gauge("mxgate_config_last_reload_successful", &[]);
        last_reload_successful.set(1.0);
        let last_reload_success_timestamp =
            gauge("mxgate_config_last_reload_success_timestamp_seconds", &[]);
        last_reload_success_timestamp.set(unix_now());
        let m = Metrics {
            active_max: gauge("mxgate_connections_active_max", &[]),
            sources_refused: gauge("mxgate_sources_refused", &[]),
            would_reject,
            dry_run: gauge("mxgate_dry_run", &[]),
            last_reload_successful,
            last_reload_success_timestamp,
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
            limit_reserved_for_allowed: gauge("mxgate_limit", &[("kind", "reserved_for_allowed")]),
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

    /// The dry-run twin of [`Metrics::rejected`]: a refusal that was only counted.
    pub fn would_reject(&self, reason: RejectReason) -> &Counter {
        &self.would_reject[reason as usize]
    }

    /// Records a reload's outcome in the `mxgate_config_last_reload_*` gauges.
    pub fn reloaded(&self, ok: bool) {
        self.last_reload_successful.set(if ok { 1.0 } else { 0.0 });
        if ok {
            self.last_reload_success_timestamp.set(unix_now());
        }
    }

    /// The series of the backend configured as `label` (registered on first use, found after).
    pub fn cluster(&self) -> ClusterSeries {
        let meta = Metadata::new(module_path!(), metrics::Level::INFO, None);
        let key = |name: &'static str| Key::from_name(name);
        let r = &self.recorder;
        ClusterSeries {
            connected: r.register_gauge(&key("mxgate_cluster_connected"), &meta),
            admission_seconds: r
                .register_histogram(&key("mxgate_cluster_admission_seconds"), &meta),
            fallback_admissions: r
                .register_counter(&key("mxgate_cluster_fallback_admissions_total"), &meta),
            connections: r.register_gauge(&key("mxgate_cluster_connections"), &meta),
            instances: r.register_gauge(&key("mxgate_cluster_instances"), &meta),
            warming: r.register_gauge(&key("mxgate_cluster_warming"), &meta),
            disconnects: r.register_counter(&key("mxgate_cluster_disconnects_total"), &meta),
        }
    }

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

    /// The text exposition format, as served on `/metrics`: mxgate's series, then the
    /// process's own.
    pub fn render(&self) -> String {
        let mut text = self.handle.render();
        process::render(&mut text);
        text
    }
}

/// Seconds since the Unix epoch, as Prometheus timestamps are.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
