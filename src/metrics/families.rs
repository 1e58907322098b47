//! The catalogue of every family mxgate exports: its HELP text, its unit, and for a histogram
//! its buckets; and the recorder built with all of them.
//!
//! A family's name here must match, letter for letter, the name its handles are registered
//! under (in the parent module): a family missing here is exported without HELP, and a histogram
//! missing its buckets falls back to a summary.

use metrics::{Recorder, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

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

/// Every metric family mxgate exports, with its unit and HELP text.
pub const HELP: &[(&str, Option<Unit>, &str)] = &[
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
        "mxgate_pregreet_total",
        None,
        "Pregreet test results, by result: pass (quiet until its greeting's final line), fail (spoke before it), cached_pass and cached_fail (decided by the cache, not tested). A tested connection counts once.",
    ),
    (
        "mxgate_pregreet_cache_entries",
        None,
        "Addresses in this instance's pregreet cache (passes and failures not yet expired or swept).",
    ),
    (
        "mxgate_pregreet_testing",
        None,
        "Clients under the pregreet test now (each holds a descriptor, no slot): at most pregreet_max_clients, except for a moment after a reload lowers it.",
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
        "mxgate_local_errors_total",
        None,
        "mxgate's own resource failures, by operation (accept, metrics_accept, backend_socket) and errno (EMFILE, ENFILE, ENOBUFS, ENOMEM): never counted against a client or a backend.",
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

/// Every histogram family and its buckets: the recorder sets them, the reference prints them.
pub const HISTOGRAMS: &[(&str, &[f64])] = &[
    ("mxgate_backend_connect_seconds", CONNECT_BUCKETS),
    ("mxgate_backend_greeting_seconds", CONNECT_BUCKETS),
    ("mxgate_cluster_admission_seconds", CONNECT_BUCKETS),
    ("mxgate_session_duration_seconds", SESSION_BUCKETS),
    ("mxgate_queue_wait_seconds", QUEUE_WAIT_BUCKETS),
];

/// A recorder with every histogram's buckets set and every family's HELP text described.
pub(super) fn recorder() -> PrometheusRecorder {
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in HISTOGRAMS {
        builder = builder
            .set_buckets_for_metric(Matcher::Full((*name).into()), buckets)
            .expect("non-empty buckets");
    }
    let recorder = builder.build_recorder();
    // Every family's HELP text, in one place (`describe_*` all fill the same table).
    for (name, unit, help) in HELP {
        recorder.describe_counter((*name).into(), *unit, (*help).into());
    }
    recorder
}
