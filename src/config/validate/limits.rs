//! The connection limits and the source policy: prefixes, the reserve for allowed sources,
//! allow and deny lists, rates and `[[network]]` rules.

use super::super::*;
use super::{bad, Bad};

/// The connection limits and the source policy.
pub(super) struct CheckedLimits {
    pub(super) max_connections: usize,
    pub(super) ipv4_prefix: u8,
    pub(super) ipv6_prefix: u8,
    pub(super) ipv6_network_prefix: u8,
    pub(super) max_per_ipv6_network: usize,
    pub(super) reserved_for_allowed: usize,
    pub(super) allow: Vec<ipnet::IpNet>,
    pub(super) deny: Vec<ipnet::IpNet>,
}

fn prefix(key: &str, set: Option<u8>, default: u8, max: u8) -> Result<u8, Bad> {
    let p = set.unwrap_or(default);
    if p > max {
        return Err(bad(key, format!("{p} is not in 0..={max}")));
    }
    Ok(p)
}

pub(super) fn limits(s: &Settings) -> Result<CheckedLimits, Bad> {
    let ipv4_prefix = prefix("ipv4_prefix", s.ipv4_prefix, DEFAULT_IPV4_PREFIX, 32)?;
    let ipv6_prefix = prefix("ipv6_prefix", s.ipv6_prefix, DEFAULT_IPV6_PREFIX, 128)?;
    let ipv6_network_prefix = prefix(
        "ipv6_network_prefix",
        s.ipv6_network_prefix,
        DEFAULT_IPV6_NETWORK_PREFIX,
        128,
    )?;
    let max_connections = s.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if max_connections > MAX_CONNECTIONS {
        return Err(bad(
            "max_connections",
            format!("{max_connections} is more than {MAX_CONNECTIONS}"),
        ));
    }
    for (key, n) in [
        ("max_per_source", s.max_per_source),
        ("max_per_ipv6_network", s.max_per_ipv6_network),
    ] {
        if n.is_some_and(|n| n > MAX_CONNECTIONS) {
            return Err(bad(
                key,
                format!("{} is more than {MAX_CONNECTIONS}", n.unwrap_or(0)),
            ));
        }
    }
    let max_per_ipv6_network = match s.max_per_ipv6_network {
        Some(0) => return Err(bad("max_per_ipv6_network", "must be at least 1")),
        Some(n) => n,
        None => (max_connections / DEFAULT_IPV6_NETWORK_SHARE_DIVISOR).max(1),
    };
    let reserved_for_allowed = s.reserved_for_allowed.unwrap_or(0);
    if reserved_for_allowed > max_connections {
        return Err(bad(
            "reserved_for_allowed",
            format!("{reserved_for_allowed} is more than max_connections ({max_connections})"),
        ));
    }
    if reserved_for_allowed > 0 && s.allow.is_empty() {
        return Err(bad(
            "reserved_for_allowed",
            "has no effect without an allow list",
        ));
    }
    validate_rate(s.rate_per_source, s.rate_burst).map_err(|(k, e)| bad(k, e))?;
    let allow: Vec<_> = s.allow.iter().map(|c| c.0).collect();
    let deny: Vec<_> = s.deny.iter().map(|c| c.0).collect();
    if let Some(both) = allow.iter().find(|a| deny.contains(a)) {
        return Err(bad("deny", format!("{both} is in both allow and deny")));
    }
    for (i, rule) in s.networks.iter().enumerate() {
        let key = |k: &str| format!("network[{i}].{k}");
        validate_rule(rule, s.rate_per_source, s.rate_burst).map_err(|(k, e)| bad(&key(k), e))?;
        if s.networks[..i].iter().any(|r| r.cidr == rule.cidr) {
            return Err(bad(&key("cidr"), format!("{} is listed twice", rule.cidr)));
        }
    }
    Ok(CheckedLimits {
        max_connections,
        ipv4_prefix,
        ipv6_prefix,
        ipv6_network_prefix,
        max_per_ipv6_network,
        reserved_for_allowed,
        allow,
        deny,
    })
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
    for (k, n) in [
        ("max_per_source", rule.max_per_source),
        ("max_per_network", rule.max_per_network),
    ] {
        if n.is_some_and(|n| n > MAX_CONNECTIONS) {
            return Err((
                k,
                format!("{} is more than {MAX_CONNECTIONS}", n.unwrap_or(0)),
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
