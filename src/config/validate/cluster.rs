//! The `[cluster]` table: the Redis URL, the names that go into Redis keys, the lease and the
//! fallback. Also [`redact`], so that no error message or log line ever shows a Redis password.

use super::super::*;
use super::{bad, positive, Bad};

/// The `[cluster]` table: nothing unless `redis` is set, and then every key checked.
pub(super) fn cluster(c: &ClusterSettings) -> Result<Option<ClusterConfig>, Bad> {
    let Some(redis) = &c.redis else {
        if !c.is_empty() {
            return Err(bad(
                "cluster.redis",
                "the [cluster] table needs redis (redis://HOST:PORT/DB)",
            ));
        }
        return Ok(None);
    };
    if !(redis.starts_with("redis://") || redis.starts_with("unix://")) {
        return Err(bad(
            "cluster.redis",
            format!("{:?} is not a redis:// or unix:// URL", redact(redis)),
        ));
    }
    let redis = match &c.password_file {
        Some(file) => with_password(redis, &read_password(file)?)?,
        None => redis.clone(),
    };
    if let Err(e) = redis::Client::open(redis.as_str()) {
        return Err(bad("cluster.redis", format!("{:?}: {e}", redact(&redis))));
    }
    let name = c
        .name
        .clone()
        .unwrap_or_else(|| DEFAULT_CLUSTER_NAME.into());
    key_part("cluster.name", &name)?;
    // The system's host name, not the one in mxgate's replies: hosts behind one MX name often
    // share that, and two instances with one name are refused by Redis.
    let instance = match &c.instance {
        Some(i) => i.clone(),
        None => system_hostname().map_err(|e| {
            bad(
                "cluster.instance",
                format!("not set, and the system host name is unusable: {e}"),
            )
        })?,
    };
    key_part("cluster.instance", &instance)?;
    let lease_ttl = positive("cluster.lease_ttl", c.lease_ttl, DEFAULT_LEASE_TTL)?;
    if lease_ttl < MIN_LEASE_TTL {
        return Err(bad(
            "cluster.lease_ttl",
            format!(
                "must be at least {}: the lease is refreshed every third of it, and each \
                 refresh may wait a second for Redis",
                Dur(MIN_LEASE_TTL)
            ),
        ));
    }
    let fallback_share = c.fallback_share.unwrap_or(DEFAULT_FALLBACK_SHARE);
    if !(fallback_share > 0.0 && fallback_share <= 1.0) {
        return Err(bad(
            "cluster.fallback_share",
            format!(
                "{fallback_share} is not a fraction above 0 and at most 1: with 0, every \
                 client would be refused while Redis is down"
            ),
        ));
    }
    let admission_timeout = positive(
        "cluster.admission_timeout",
        c.admission_timeout,
        DEFAULT_CLUSTER_ADMISSION_TIMEOUT,
    )?;
    if admission_timeout < MIN_CLUSTER_ADMISSION_TIMEOUT {
        return Err(bad(
            "cluster.admission_timeout",
            format!(
                "must be at least {}: below a loopback round trip, every admission would fall back",
                Dur(MIN_CLUSTER_ADMISSION_TIMEOUT)
            ),
        ));
    }
    if admission_timeout > MAX_CLUSTER_ADMISSION_TIMEOUT {
        return Err(bad(
            "cluster.admission_timeout",
            format!(
                "must be at most {}: every clustered client waits for it before its greeting",
                Dur(MAX_CLUSTER_ADMISSION_TIMEOUT)
            ),
        ));
    }
    Ok(Some(ClusterConfig {
        redis,
        password_file: c.password_file.clone(),
        name,
        instance,
        lease_ttl,
        fallback_share,
        admission_timeout,
    }))
}

/// The password in `file`: its first line. A bare name (no `/`) is a systemd credential, read
/// from `$CREDENTIALS_DIRECTORY`, which `LoadCredential=` sets for the service alone.
fn read_password(file: &Path) -> Result<String, Bad> {
    const KEY: &str = "cluster.password_file";
    let path = if file.components().count() == 1 && file.is_relative() {
        let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
            bad(
                KEY,
                format!(
                    "{:?} is a credential name, but CREDENTIALS_DIRECTORY is not set (give \
                     an absolute path, or LoadCredential={}:/path in the unit)",
                    file.display().to_string(),
                    file.display()
                ),
            )
        })?;
        PathBuf::from(dir).join(file)
    } else {
        file.to_path_buf()
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| bad(KEY, format!("{}: {e}", path.display())))?;
    let password = text.lines().next().unwrap_or("").to_string();
    if password.is_empty() {
        return Err(bad(
            KEY,
            format!("{}: the first line is empty", path.display()),
        ));
    }
    Ok(password)
}

/// `url` with `password` put in: the user part of a `redis://` URL (percent-encoded), or
/// `pass=` for a `unix://` socket. A URL that has a password already is an error: two sources
/// for one secret would leave the operator guessing which one is used.
fn with_password(url: &str, password: &str) -> Result<String, Bad> {
    if redact(url) != url {
        return Err(bad(
            "cluster.password_file",
            "the redis URL has a password already: remove it from the URL",
        ));
    }
    let encoded: String = password
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    Ok(match url.strip_prefix("unix://") {
        Some(rest) => {
            let sep = if rest.contains('?') { '&' } else { '?' };
            format!("unix://{rest}{sep}pass={encoded}")
        }
        None => {
            let rest = url.strip_prefix("redis://").unwrap_or(url);
            format!("redis://:{encoded}@{rest}")
        }
    })
}

/// A name that goes into Redis keys: printable, no separator, not empty.
fn key_part(key: &str, value: &str) -> Result<(), Bad> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(bad(
            key,
            format!("{value:?} must be 1 to 128 of the characters A-Z a-z 0-9 - _ ."),
        ))
    }
}

/// A Redis URL with any password replaced, for error messages and logs: the user part
/// (`redis://:pw@host`) and a `pass=` or `password=` query value (`unix://...?pass=pw`).
pub fn redact(url: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((u, q)) => (u, Some(q)),
        None => (url, None),
    };
    let mut out = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    };
    if let Some(q) = query {
        let parts: Vec<String> = q
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k == "pass" || k == "password" => format!("{k}=***"),
                _ => p.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&parts.join("&"));
    }
    out
}

#[cfg(test)]
mod tests;
