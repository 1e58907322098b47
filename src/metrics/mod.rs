//! Prometheus metrics: the fixed set of series mxgate exports, and the `/metrics` endpoint.
//!
//! Each running instance owns its own recorder instead of installing a process-wide one, so
//! several instances (the tests run many in one process) never mix their counts. Handles are
//! registered once at start-up; the hot path only touches atomics. No label ever carries an
//! address, so the number of series is fixed.
//!
//! The process's own descriptors, memory and CPU (`process_*`, the names every Prometheus
//! client library uses) are read from `/proc` at each scrape ([`process`]). The endpoint that
//! serves all this lives with the live view, in `crate::status`. Every family's HELP text and
//! a histogram's buckets are listed in `families`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusHandle, PrometheusRecorder};

use crate::reason::RejectReason;

pub mod families;
pub mod process;

/// How often recorded histogram samples are folded into buckets, scraped or not.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

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

/// The pregreet test's series.
pub struct PregreetSeries {
    pub pass: Counter,
    pub fail: Counter,
    pub cached_pass: Counter,
    pub cached_fail: Counter,
    pub cache_entries: Gauge,
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
    pub limit_pregreet_max_clients: Gauge,
    pub limit_reserved_for_allowed: Gauge,
    pub queued: Gauge,
    pub queue_wait_seconds: Histogram,
    /// Connections from a trusted upstream whose PROXY header has not arrived yet.
    pub proxy_headers_pending: Gauge,
    pub spliced_bytes: Counter,
    pub splice_fallbacks: Counter,
    pub splice_pool_exhausted: Counter,
    pub splice_pipes: Gauge,
    /// mxgate's own resource failures, by operation and errno.
    pub local_errors: crate::local_errors::LocalErrorCounters,
    pub reloads_ok: Counter,
    pub reloads_failed: Counter,
    pub rate_untracked: Counter,
    pub backend_connect_seconds: Histogram,
    pub session_duration_seconds: Histogram,
}

/// Registers handles in one recorder, every one with the same metadata.
struct Registrar<'a> {
    recorder: &'a PrometheusRecorder,
    meta: Metadata<'static>,
}

impl<'a> Registrar<'a> {
    fn new(recorder: &'a PrometheusRecorder) -> Self {
        Registrar {
            recorder,
            meta: Metadata::new(module_path!(), metrics::Level::INFO, None),
        }
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
        self.recorder
            .register_counter(&key(name, labels), &self.meta)
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &self.meta)
    }

    fn histogram(&self, name: &'static str) -> Histogram {
        self.recorder
            .register_histogram(&key(name, &[]), &self.meta)
    }

    /// One counter of `name` per refusal reason, indexed by `RejectReason as usize`.
    fn by_reason(&self, name: &'static str) -> Vec<Counter> {
        RejectReason::ALL
            .iter()
            .map(|r| self.counter(name, &[("reason", r.label())]))
            .collect()
    }

    /// The build's and the config's gauges, set as they stand at start-up: the version runs,
    /// and the config in force loaded now. Returns the two a reload updates.
    fn build_and_config(&self) -> (Gauge, Gauge) {
        self.gauge(
            "mxgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
        )
        .set(1.0);
        let last_reload_successful = self.gauge("mxgate_config_last_reload_successful", &[]);
        last_reload_successful.set(1.0);
        let last_reload_success_timestamp =
            self.gauge("mxgate_config_last_reload_success_timestamp_seconds", &[]);
        last_reload_success_timestamp.set(unix_now());
        (last_reload_successful, last_reload_success_timestamp)
    }
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| Label::new(*k, *v))
            .collect::<Vec<_>>(),
    )
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let recorder = families::recorder();
        let handle = recorder.handle();
        let r = Registrar::new(&recorder);
        let rejected = r.by_reason("mxgate_connections_rejected_total");
        let would_reject = r.by_reason("mxgate_connections_would_reject_total");
        let (last_reload_successful, last_reload_success_timestamp) = r.build_and_config();
        let m = Metrics {
            // Connections and sources.
            accepted: r.counter("mxgate_connections_accepted_total", &[]),
            active: r.gauge("mxgate_connections_active", &[]),
            active_max: r.gauge("mxgate_connections_active_max", &[]),
            sources_active: r.gauge("mxgate_sources_active", &[]),
            sources_refused: r.gauge("mxgate_sources_refused", &[]),
            // Refusals, and what dry run only counts.
            rejected,
            would_reject,
            dry_run: r.gauge("mxgate_dry_run", &[]),
            rate_untracked: r.counter("mxgate_rate_limit_untracked_total", &[]),
            // The limits in force.
            limit_max_connections: r.gauge("mxgate_limit", &[("kind", "max_connections")]),
            limit_max_per_source: r.gauge("mxgate_limit", &[("kind", "max_per_source")]),
            limit_max_queued: r.gauge("mxgate_limit", &[("kind", "max_queued")]),
            limit_pregreet_max_clients: r
                .gauge("mxgate_limit", &[("kind", "pregreet_max_clients")]),
            limit_reserved_for_allowed: r
                .gauge("mxgate_limit", &[("kind", "reserved_for_allowed")]),
            // The queue, and the wait for a PROXY header before admission.
            queued: r.gauge("mxgate_connections_queued", &[]),
            queue_wait_seconds: r.histogram("mxgate_queue_wait_seconds"),
            proxy_headers_pending: r.gauge("mxgate_proxy_headers_pending", &[]),
            // Forwarding.
            backend_connect_seconds: r.histogram("mxgate_backend_connect_seconds"),
            session_duration_seconds: r.histogram("mxgate_session_duration_seconds"),
            bytes_client_to_backend: r
                .counter("mxgate_bytes_total", &[("direction", "client_to_backend")]),
            bytes_backend_to_client: r
                .counter("mxgate_bytes_total", &[("direction", "backend_to_client")]),
            spliced_bytes: r.counter("mxgate_spliced_bytes_total", &[]),
            splice_fallbacks: r.counter("mxgate_splice_fallbacks_total", &[]),
            splice_pool_exhausted: r.counter("mxgate_splice_pool_exhausted_total", &[]),
            splice_pipes: r.gauge("mxgate_splice_pipes", &[]),
            local_errors: crate::local_errors::LocalErrorCounters::new(|op, errno| {
                r.counter("mxgate_local_errors_total", &[("op", op), ("errno", errno)])
            }),
            // Config reloads.
            last_reload_successful,
            last_reload_success_timestamp,
            reloads_ok: r.counter("mxgate_config_reloads_total", &[("result", "success")]),
            reloads_failed: r.counter("mxgate_config_reloads_total", &[("result", "failure")]),
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

    /// The cluster's series: asked for only when a cluster is configured.
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

    /// The pregreet test's series.
    pub fn pregreet(&self) -> PregreetSeries {
        let r = Registrar::new(&self.recorder);
        let result = |v: &'static str| r.counter("mxgate_pregreet_total", &[("result", v)]);
        PregreetSeries {
            pass: result("pass"),
            fail: result("fail"),
            cached_pass: result("cached_pass"),
            cached_fail: result("cached_fail"),
            cache_entries: r.gauge("mxgate_pregreet_cache_entries", &[]),
        }
    }

    /// Clients under the pregreet test now.
    pub fn pregreet_testing(&self) -> Gauge {
        Registrar::new(&self.recorder).gauge("mxgate_pregreet_testing", &[])
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
