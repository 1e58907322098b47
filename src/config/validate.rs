//! Validation: raw [`Settings`] into a typed [`Config`], every value checked, every default
//! filled. Each error names the key it is about.

use std::net::SocketAddr;
use std::path::Path;

use super::*;

impl Settings {
    /// Checks every value and fills every default. `file` only labels the errors.
    pub fn validate(self, file: Option<&Path>) -> Result<Config, ConfigError> {
        let err = |key: &str, reason: String| ConfigError {
            file: file.map(Path::to_path_buf),
            key: key.to_string(),
            reason,
        };
        // A duration that must be positive when set, with its default otherwise.
        let positive = |key: &str, set: Option<Dur>, default: Duration| match set {
            Some(d) if d.0.is_zero() => Err(err(key, "must be more than zero".into())),
            Some(d) => bounded(d.0).map_err(|e| err(key, e)),
            None => Ok(default),
        };
        let listen: Vec<SocketAddr> = if self.listen.is_empty() {
            vec![DEFAULT_LISTEN
                .parse()
                .expect("default listen address parses")]
        } else {
            self.listen.iter().map(|l| l.0).collect()
        };
        for (i, a) in listen.iter().enumerate() {
            if listen[..i].contains(a) {
                return Err(err("listen", format!("{a} is listed twice")));
            }
        }
        if !self.backend.is_empty() && !self.backends.is_empty() {
            return Err(err(
                "backends",
                "use either backend or backends, not both".into(),
            ));
        }
        let (key, backends) = if self.backends.is_empty() {
            ("backend", self.backend)
        } else {
            ("backends", self.backends)
        };
        if backends.is_empty() {
            return Err(err(
                "backend",
                "is required: the mail server to forward to".into(),
            ));
        }
        for (i, b) in backends.iter().enumerate() {
            if backends[..i]
                .iter()
                .any(|o| o.address.addr == b.address.addr)
            {
                return Err(err(key, format!("{} is listed twice", b.address)));
            }
        }
        if backends.iter().all(|b| b.backup) {
            return Err(err(key, "at least one backend must not be a backup".into()));
        }
        let health_interval = positive(
            "health_interval",
            self.health_interval,
            DEFAULT_HEALTH_INTERVAL,
        )?;
        let (fall, rise) = (
            self.fall.unwrap_or(DEFAULT_FALL),
            self.rise.unwrap_or(DEFAULT_RISE),
        );
        if fall == 0 {
            return Err(err("fall", "must be at least 1".into()));
        }
        if rise == 0 {
            return Err(err("rise", "must be at least 1".into()));
        }
        let ipv4_prefix = self.ipv4_prefix.unwrap_or(DEFAULT_IPV4_PREFIX);
        if ipv4_prefix > 32 {
            return Err(err(
                "ipv4_prefix",
                format!("{ipv4_prefix} is not in 0..=32"),
            ));
        }
        let ipv6_prefix = self.ipv6_prefix.unwrap_or(DEFAULT_IPV6_PREFIX);
        if ipv6_prefix > 128 {
            return Err(err(
                "ipv6_prefix",
                format!("{ipv6_prefix} is not in 0..=128"),
            ));
        }
        let ipv6_network_prefix = self
            .ipv6_network_prefix
            .unwrap_or(DEFAULT_IPV6_NETWORK_PREFIX);
        if ipv6_network_prefix > 128 {
            return Err(err(
                "ipv6_network_prefix",
                format!("{ipv6_network_prefix} is not in 0..=128"),
            ));
        }
        let hostname = match self.hostname {
            Some(h) => h,
            None => system_hostname().map_err(|e| {
                err(
                    "hostname",
                    format!("not set, and the system host name is unusable: {e}"),
                )
            })?,
        };
        value::validate_hostname(&hostname).map_err(|e| err("hostname", e))?;
        let connect_timeout = positive(
            "connect_timeout",
            self.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        )?;
        let idle_timeout = positive("idle_timeout", self.idle_timeout, DEFAULT_IDLE_TIMEOUT)?;
        let half_close_timeout = positive(
            "half_close_timeout",
            self.half_close_timeout,
            DEFAULT_HALF_CLOSE_TIMEOUT,
        )?;
        let metrics = match self.metrics {
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
                return Err(err("metrics", format!("{m} is also a listen address")));
            }
        }
        let forwarding = self.forwarding.unwrap_or_default();
        if forwarding == Forwarding::Splice && !cfg!(target_os = "linux") {
            return Err(err(
                "forwarding",
                "splice is only available on Linux".into(),
            ));
        }
        let pipe_size = self.pipe_size.map_or(DEFAULT_PIPE_SIZE, |s| s.0);
        if !(4096..=1 << 30).contains(&pipe_size) {
            return Err(err(
                "pipe_size",
                format!("{pipe_size} is not between 4KiB and 1GiB"),
            ));
        }
        let threads = self.threads.unwrap_or(0);
        if threads > MAX_THREADS {
            return Err(err(
                "threads",
                format!("{threads} is more than {MAX_THREADS}"),
            ));
        }
        let max_connections = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections > MAX_CONNECTIONS {
            return Err(err(
                "max_connections",
                format!("{max_connections} is more than {MAX_CONNECTIONS}"),
            ));
        }
        let reserved_for_allowed = self.reserved_for_allowed.unwrap_or(0);
        if reserved_for_allowed > max_connections {
            return Err(err(
                "reserved_for_allowed",
                format!("{reserved_for_allowed} is more than max_connections ({max_connections})"),
            ));
        }
        let max_per_ipv6_network = match self.max_per_ipv6_network {
            Some(0) => return Err(err("max_per_ipv6_network", "must be at least 1".into())),
            Some(n) => n,
            None => (max_connections / DEFAULT_IPV6_NETWORK_SHARE_DIVISOR).max(1),
        };
        if reserved_for_allowed > 0 && self.allow.is_empty() {
            return Err(err(
                "reserved_for_allowed",
                "has no effect without an allow list".into(),
            ));
        }
        validate_rate(self.rate_per_source, self.rate_burst).map_err(|(k, e)| err(k, e))?;
        let allow: Vec<_> = self.allow.iter().map(|c| c.0).collect();
        let deny: Vec<_> = self.deny.iter().map(|c| c.0).collect();
        if let Some(both) = allow.iter().find(|a| deny.contains(a)) {
            return Err(err("deny", format!("{both} is in both allow and deny")));
        }
        for (i, rule) in self.networks.iter().enumerate() {
            let key = |k: &str| format!("network[{i}].{k}");
            validate_rule(rule, self.rate_per_source, self.rate_burst)
                .map_err(|(k, e)| err(&key(k), e))?;
            if self.networks[..i].iter().any(|r| r.cidr == rule.cidr) {
                return Err(err(&key("cidr"), format!("{} is listed twice", rule.cidr)));
            }
        }
        let backend_greeting_timeout = match self.backend_greeting_timeout {
            Some(d) => Some(positive("backend_greeting_timeout", Some(d), d.0)?),
            None => None,
        };
        let drain_timeout = match self.drain_timeout {
            Some(d) => bounded(d.0).map_err(|e| err("drain_timeout", e))?,
            None => DEFAULT_DRAIN_TIMEOUT,
        };
        let transparent = self.transparent.unwrap_or(false);
        let transparent_port = self.transparent_port.unwrap_or(false);
        if transparent_port && !transparent {
            return Err(err(
                "transparent_port",
                "has no effect without transparent".into(),
            ));
        }
        let proxy_header_timeout = positive(
            "proxy_header_timeout",
            self.proxy_header_timeout,
            DEFAULT_PROXY_HEADER_TIMEOUT,
        )?;
        if self.proxy_header_timeout.is_some() && self.accept_proxy_protocol.is_empty() {
            return Err(err(
                "proxy_header_timeout",
                "has no effect without accept_proxy_protocol".into(),
            ));
        }
        Ok(Config {
            transparent,
            transparent_port,
            proxy_protocol: self.proxy_protocol,
            accept_proxy_protocol: self.accept_proxy_protocol.iter().map(|c| c.0).collect(),
            proxy_header_timeout,
            backend_greeting_timeout,
            drain_timeout,
            rate_per_source: self.rate_per_source,
            rate_burst: self.rate_burst,
            allow,
            deny,
            reserved_for_allowed,
            dry_run: self.dry_run.unwrap_or(false),
            networks: self.networks,
            forwarding,
            pipe_size,
            threads,
            listen,
            health_checks: backends.len() > 1 || self.health_interval.is_some(),
            backends,
            balance: self.balance.unwrap_or_default(),
            health_interval,
            fall,
            rise,
            max_connections,
            max_per_source: self.max_per_source.unwrap_or(DEFAULT_MAX_PER_SOURCE),
            ipv4_prefix,
            ipv6_prefix,
            ipv6_network_prefix,
            max_per_ipv6_network,
            hostname,
            metrics,
            connect_timeout,
            idle_timeout,
            half_close_timeout,
            log_format: self.log_format.unwrap_or_default(),
            replies: self.replies.unwrap_or_default(),
        })
    }
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

/// Checks a rate and its burst against what the limiter can represent; the error is
/// `(key, reason)`.
fn validate_rate(rate: Option<Rate>, burst: Option<u32>) -> Result<(), (&'static str, String)> {
    match (rate, burst) {
        (_, Some(0)) => return Err(("rate_burst", "must be at least 1".into())),
        (None, Some(_)) => {
            return Err(("rate_burst", "has no effect without rate_per_source".into()))
        }
        (None, None) => return Ok(()),
        (Some(_), _) => {}
    }
    let rate = rate.expect("checked above");
    // One attempt per microsecond at most: the limiter's period must not round to zero.
    let period_ns = rate.per.as_nanos() / u128::from(rate.count);
    if period_ns < 1_000 {
        return Err((
            "rate_per_source",
            format!("{rate} is faster than the most allowed, {MAX_RATE_PER_SECOND}/s"),
        ));
    }
    let effective = burst.unwrap_or(rate.count);
    if effective > MAX_RATE_BURST {
        let reason = match burst {
            Some(b) => format!("{b} is more than {MAX_RATE_BURST}"),
            None => {
                return Err((
                    "rate_per_source",
                    format!(
                        "{rate} makes a burst of {effective}, more than {MAX_RATE_BURST}; \
                         set rate_burst"
                    ),
                ))
            }
        };
        return Err(("rate_burst", reason));
    }
    Ok(())
}

/// Checks one `[[network]]` rule; the error is `(key within the rule, reason)`.
fn validate_rule(
    rule: &NetworkRule,
    global_rate: Option<Rate>,
    global_burst: Option<u32>,
) -> Result<(), (&'static str, String)> {
    let net = rule.cidr.0;
    let (own, other, own_key, other_key) = match net {
        ipnet::IpNet::V4(_) => (
            rule.ipv4_prefix,
            rule.ipv6_prefix,
            "ipv4_prefix",
            "ipv6_prefix",
        ),
        ipnet::IpNet::V6(_) => (
            rule.ipv6_prefix,
            rule.ipv4_prefix,
            "ipv6_prefix",
            "ipv4_prefix",
        ),
    };
    if other.is_some() {
        return Err((
            other_key,
            format!("has no effect in {net}, which is not of that family"),
        ));
    }
    if let Some(p) = own {
        if p > net.max_prefix_len() || p < net.prefix_len() {
            return Err((
                own_key,
                format!(
                    "{p} must be between {} and {}",
                    net.prefix_len(),
                    net.max_prefix_len()
                ),
            ));
        }
    }
    match (rule.max_per_network, rule.network_prefix) {
        (None, Some(_)) => {
            return Err((
                "network_prefix",
                "has no effect without max_per_network".into(),
            ))
        }
        (Some(_), Some(p)) if p > net.max_prefix_len() || p < net.prefix_len() => {
            return Err((
                "network_prefix",
                format!(
                    "{p} must be between {} and {}",
                    net.prefix_len(),
                    net.max_prefix_len()
                ),
            ))
        }
        _ => {}
    }
    // The rate and burst this rule ends up with, as the policy builds them.
    let burst = match rule.rate_per_source {
        Some(_) => rule.rate_burst,
        None => rule.rate_burst.or(global_burst),
    };
    validate_rate(rule.rate_per_source.or(global_rate), burst)
}
