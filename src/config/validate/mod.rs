//! Validation: raw [`Settings`] into a typed [`Config`], every value checked, every default
//! filled. One short function per concern; each error names the key it is about, and the
//! caller ([`Settings::validate`]) says where that key's value came from.

use std::net::SocketAddr;
use std::path::Path;

use super::*;

mod cluster;
mod limits;
mod pregreet;

use cluster::cluster;
pub use cluster::redact;
use limits::limits;

/// A validation failure: the key (as written in the file) and the reason.
pub(super) struct Bad(pub String, pub String);

fn bad(key: &str, reason: impl Into<String>) -> Bad {
    Bad(key.to_string(), reason.into())
}

impl Settings {
    /// Checks every value and fills every default. `file` only labels the errors.
    pub fn validate(self, file: Option<&Path>) -> Result<Config, ConfigError> {
        self.check().map_err(|Bad(key, reason)| ConfigError {
            file: file.map(Path::to_path_buf),
            key,
            reason,
            line: None,
            flag: None,
        })
    }

    /// Validation proper: every concern in turn, first error wins.
    pub(super) fn check(self) -> Result<Config, Bad> {
        let (listen, metrics) = listeners(&self)?;
        let backends = backends(&self)?;
        let limits = limits(&self)?;
        let timeouts = timeouts(&self)?;
        let queue = queue(&self, limits.max_connections)?;
        let adaptive = adaptive(&self, limits.max_connections)?;
        let edge = transparency_and_proxy(&self)?;
        let moving = forwarding(&self)?;
        let hostname = hostname(self.hostname.clone())?;
        let cluster = cluster(&self.cluster)?;
        let pregreet = pregreet::pregreet(&self, queue.max_queued)?;
        Ok(Config {
            listen,
            listen_set: !self.listen.is_empty(),
            metrics,
            health_checks: backends.list.len() > 1 || self.health_interval.is_some(),
            backends: backends.list,
            balance: self.balance.unwrap_or_default(),
            health_interval: backends.health_interval,
            fall: backends.fall,
            rise: backends.rise,
            max_connections: limits.max_connections,
            max_per_source: self.max_per_source.unwrap_or(DEFAULT_MAX_PER_SOURCE),
            ipv4_prefix: limits.ipv4_prefix,
            ipv6_prefix: limits.ipv6_prefix,
            ipv6_network_prefix: limits.ipv6_network_prefix,
            max_per_ipv6_network: limits.max_per_ipv6_network,
            reserved_for_allowed: limits.reserved_for_allowed,
            queue_timeout: queue.timeout,
            max_queued: queue.max_queued,
            adaptive_min: adaptive.0,
            adaptive_initial: adaptive.1,
            state_dir: state_dir(self.state_dir.as_deref())?,
            rate_per_source: self.rate_per_source,
            rate_burst: self.rate_burst,
            allow: limits.allow,
            deny: limits.deny,
            dry_run: self.dry_run.unwrap_or(false),
            backend_trusts_mxgate: self.backend_trusts_mxgate.unwrap_or(true),
            status: self.status.unwrap_or(true),
            status_hosts: status_hosts(&self.status_hosts)?,
            networks: self.networks,
            hostname,
            connect_timeout: timeouts.connect,
            idle_timeout: timeouts.idle,
            half_close_timeout: timeouts.half_close,
            backend_greeting_timeout: timeouts.greeting,
            drain_timeout: timeouts.drain,
            transparent: edge.transparent,
            transparent_port: edge.transparent_port,
            proxy_protocol: self.proxy_protocol,
            accept_proxy_protocol: edge.accept_proxy_protocol,
            proxy_header_timeout: edge.proxy_header_timeout,
            forwarding: moving.forwarding,
            pipe_size: moving.pipe_size,
            threads: moving.threads,
            log_format: self.log_format.unwrap_or_default(),
            replies: self.replies.unwrap_or_default(),
            cluster,
            pregreet,
        })
    }
}

/// A duration that must be positive when set, within range, with its default otherwise.
fn positive(key: &str, set: Option<Dur>, default: Duration) -> Result<Duration, Bad> {
    match set {
        Some(d) if d.0.is_zero() => Err(bad(key, "must be more than zero")),
        Some(d) => bounded(d.0).map_err(|e| bad(key, e)),
        None => Ok(default),
    }
}

/// Where clients and scrapers connect.
fn listeners(s: &Settings) -> Result<(Vec<SocketAddr>, Option<SocketAddr>), Bad> {
    let listen: Vec<SocketAddr> = if s.listen.is_empty() {
        vec![DEFAULT_LISTEN
            .parse()
            .expect("default listen address parses")]
    } else {
        s.listen.iter().map(|l| l.0).collect()
    };
    for (i, a) in listen.iter().enumerate() {
        if listen[..i].contains(a) {
            return Err(bad("listen", format!("{a} is listed twice")));
        }
    }
    let metrics = match s.metrics {
        Some(MetricsAddr::On(a)) => Some(a),
        Some(MetricsAddr::Off) => None,
        None => Some(
            DEFAULT_METRICS
                .parse()
                .expect("default metrics address parses"),
        ),
    };
    if let Some(m) = metrics {
        if m.port() != 0 && listen.contains(&m) {
            return Err(bad("metrics", format!("{m} is also a listen address")));
        }
    }
    Ok((listen, metrics))
}

/// The backends and their health checking.
struct Backends {
    list: Vec<BackendSpec>,
    health_interval: Duration,
    fall: u32,
    rise: u32,
}

fn backends(s: &Settings) -> Result<Backends, Bad> {
    if !s.backend.is_empty() && !s.backends.is_empty() {
        return Err(bad("backends", "use either backend or backends, not both"));
    }
    let (key, list) = if s.backends.is_empty() {
        ("backend", s.backend.clone())
    } else {
        ("backends", s.backends.clone())
    };
    if list.is_empty() {
        return Err(bad("backend", "is required: the mail server to forward to"));
    }
    for (i, b) in list.iter().enumerate() {
        if list[..i].iter().any(|o| o.address.addr == b.address.addr) {
            return Err(bad(key, format!("{} is listed twice", b.address)));
        }
    }
    if list.iter().all(|b| b.backup) {
        return Err(bad(key, "at least one backend must not be a backup"));
    }
    let health_interval = positive(
        "health_interval",
        s.health_interval,
        DEFAULT_HEALTH_INTERVAL,
    )?;
    let (fall, rise) = (
        s.fall.unwrap_or(DEFAULT_FALL),
        s.rise.unwrap_or(DEFAULT_RISE),
    );
    for (key, n) in [("fall", fall), ("rise", rise)] {
        if !(1..=MAX_CHECKS).contains(&n) {
            return Err(bad(key, format!("{n} is not in 1..={MAX_CHECKS}")));
        }
    }
    for b in &list {
        if b.weight > MAX_WEIGHT {
            return Err(bad(
                key,
                format!(
                    "{}: weight {} is more than {MAX_WEIGHT}",
                    b.address, b.weight
                ),
            ));
        }
        if b.auto && b.max_connections.is_some() {
            return Err(bad(
                key,
                format!("{}: max_connections is given twice", b.address),
            ));
        }
        if b.max_connections.is_some_and(|n| n > MAX_CONNECTIONS) {
            return Err(bad(
                key,
                format!(
                    "{}: max_connections is more than {MAX_CONNECTIONS}",
                    b.address
                ),
            ));
        }
    }
    Ok(Backends {
        list,
        health_interval,
        fall,
        rise,
    })
}

/// Every timeout.
struct CheckedTimeouts {
    connect: Duration,
    idle: Duration,
    half_close: Duration,
    greeting: Option<Duration>,
    drain: Duration,
}

fn timeouts(s: &Settings) -> Result<CheckedTimeouts, Bad> {
    let greeting = match s.backend_greeting_timeout {
        Some(d) => Some(positive("backend_greeting_timeout", Some(d), d.0)?),
        None => None,
    };
    let drain = match s.drain_timeout {
        Some(d) => bounded(d.0).map_err(|e| bad("drain_timeout", e))?,
        None => DEFAULT_DRAIN_TIMEOUT,
    };
    Ok(CheckedTimeouts {
        connect: positive(
            "connect_timeout",
            s.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        )?,
        idle: positive("idle_timeout", s.idle_timeout, DEFAULT_IDLE_TIMEOUT)?,
        half_close: positive(
            "half_close_timeout",
            s.half_close_timeout,
            DEFAULT_HALF_CLOSE_TIMEOUT,
        )?,
        greeting,
        drain,
    })
}

/// The wait queue.
struct QueueSettings {
    timeout: Duration,
    max_queued: usize,
}

fn queue(s: &Settings, max_connections: usize) -> Result<QueueSettings, Bad> {
    let timeout = s.queue_timeout.map_or(DEFAULT_QUEUE_TIMEOUT, |d| d.0);
    if timeout > MAX_QUEUE_TIMEOUT {
        return Err(bad(
            "queue_timeout",
            format!(
                "{} is more than {}: a client waits at most 5 minutes for the greeting \
                 (RFC 5321 section 4.5.3.2)",
                Dur(timeout),
                Dur(MAX_QUEUE_TIMEOUT)
            ),
        ));
    }
    let max_queued = s.max_queued.unwrap_or(
        max_connections
            .saturating_mul(DEFAULT_QUEUED_PER_CONNECTION)
            .min(MAX_CONNECTIONS),
    );
    if max_queued > MAX_CONNECTIONS {
        return Err(bad(
            "max_queued",
            format!("{max_queued} is more than {MAX_CONNECTIONS}"),
        ));
    }
    Ok(QueueSettings {
        timeout,
        max_queued,
    })
}

/// Where learned limits are kept: the key or flag (empty: off), else systemd's
/// `$STATE_DIRECTORY` (its first entry), else nowhere. A relative path would depend on the
/// directory mxgate happened to start in, so it is refused.
fn state_dir(set: Option<&std::path::Path>) -> Result<Option<std::path::PathBuf>, Bad> {
    let dir = match set {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("STATE_DIRECTORY") {
            Some(v) => std::env::split_paths(&v).next().unwrap_or_default(),
            None => return Ok(None),
        },
    };
    if dir.as_os_str().is_empty() {
        return Ok(None);
    }
    if !dir.is_absolute() {
        return Err(bad(
            "state_dir",
            format!("{} is not an absolute path", dir.display()),
        ));
    }
    Ok(Some(dir))
}

/// The bounds of a learned backend limit: `(adaptive_min, adaptive_initial)`, both within
/// 1..=max_connections (a learned limit never exceeds the global one).
fn adaptive(s: &Settings, max_connections: usize) -> Result<(usize, usize), Bad> {
    let top = max_connections.max(1);
    let min = s.adaptive_min.unwrap_or(DEFAULT_ADAPTIVE_MIN.min(top));
    if min == 0 || min > top {
        return Err(bad(
            "adaptive_min",
            format!("{min} is not in 1..={top} (max_connections)"),
        ));
    }
    let initial = s.adaptive_initial.unwrap_or(min);
    if initial < min || initial > top {
        return Err(bad(
            "adaptive_initial",
            format!("{initial} is not in {min}..={top} (adaptive_min..=max_connections)"),
        ));
    }
    Ok((min, initial))
}

/// Source transparency and the PROXY protocol, both ways.
struct Edge {
    transparent: bool,
    transparent_port: bool,
    accept_proxy_protocol: Vec<ipnet::IpNet>,
    proxy_header_timeout: Duration,
}

fn transparency_and_proxy(s: &Settings) -> Result<Edge, Bad> {
    let transparent = s.transparent.unwrap_or(false);
    let transparent_port = s.transparent_port.unwrap_or(false);
    if transparent_port && !transparent {
        return Err(bad("transparent_port", "has no effect without transparent"));
    }
    let proxy_header_timeout = positive(
        "proxy_header_timeout",
        s.proxy_header_timeout,
        DEFAULT_PROXY_HEADER_TIMEOUT,
    )?;
    if s.proxy_header_timeout.is_some() && s.accept_proxy_protocol.is_empty() {
        return Err(bad(
            "proxy_header_timeout",
            "has no effect without accept_proxy_protocol",
        ));
    }
    Ok(Edge {
        transparent,
        transparent_port,
        accept_proxy_protocol: s.accept_proxy_protocol.iter().map(|c| c.0).collect(),
        proxy_header_timeout,
    })
}

/// How bytes move, and on how many threads.
struct Moving {
    forwarding: Forwarding,
    pipe_size: usize,
    threads: usize,
}

fn forwarding(s: &Settings) -> Result<Moving, Bad> {
    let forwarding = s.forwarding.unwrap_or_default();
    if forwarding == Forwarding::Splice && !cfg!(target_os = "linux") {
        return Err(bad("forwarding", "splice is only available on Linux"));
    }
    let pipe_size = s.pipe_size.map_or(DEFAULT_PIPE_SIZE, |s| s.0);
    if !(4096..=1 << 30).contains(&pipe_size) {
        return Err(bad(
            "pipe_size",
            format!("{pipe_size} is not between 4KiB and 1GiB"),
        ));
    }
    let threads = s.threads.unwrap_or(0);
    if threads > MAX_THREADS {
        return Err(bad(
            "threads",
            format!("{threads} is more than {MAX_THREADS}"),
        ));
    }
    Ok(Moving {
        forwarding,
        pipe_size,
        threads,
    })
}

/// The names `/status` answers to: host names, or IP addresses, as a Host header gives them
/// (without a port); kept in lower case, as they are compared.
fn status_hosts(names: &[String]) -> Result<Vec<String>, Bad> {
    names
        .iter()
        .map(|n| {
            let bare = n.trim_start_matches('[').trim_end_matches(']');
            if bare.parse::<std::net::IpAddr>().is_err() {
                value::validate_hostname(n)
                    .map_err(|e| bad("status_hosts", format!("{n:?}: {e}")))?;
            }
            Ok(bare.to_ascii_lowercase())
        })
        .collect()
}

/// The name in mxgate's own replies: as set, or the system's.
fn hostname(set: Option<String>) -> Result<String, Bad> {
    let hostname = match set {
        Some(h) => h,
        None => system_hostname().map_err(|e| {
            bad(
                "hostname",
                format!("not set, and the system host name is unusable: {e}"),
            )
        })?,
    };
    value::validate_hostname(&hostname).map_err(|e| bad("hostname", e))?;
    Ok(hostname)
}

/// A duration within [`MAX_DURATION`]: longer is a typo, and could not be added to a clock.
fn bounded(d: Duration) -> Result<Duration, String> {
    if d > MAX_DURATION {
        return Err(format!(
            "{} is longer than the most allowed, {}",
            Dur(d),
            Dur(MAX_DURATION)
        ));
    }
    Ok(d)
}
