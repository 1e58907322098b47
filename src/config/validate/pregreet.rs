//! The pregreet test's keys: the action, its two waits, the cache's two lifetimes and the
//! room for clients under the test.

use super::*;

pub(super) fn pregreet(s: &Settings, max_queued: usize) -> Result<PregreetConfig, Bad> {
    let wait = wait("pregreet_wait", s.pregreet_wait, DEFAULT_PREGREET_WAIT)?;
    let wait_busy = wait_limit(s, wait)?;
    let action = s.pregreet.unwrap_or_default();
    Ok(PregreetConfig {
        action,
        max_clients: max_clients(s, action, max_queued)?,
        wait,
        wait_busy,
        pass_ttl: ttl(
            "pregreet_pass_ttl",
            s.pregreet_pass_ttl,
            DEFAULT_PREGREET_PASS_TTL,
        )?,
        fail_ttl: ttl(
            "pregreet_fail_ttl",
            s.pregreet_fail_ttl,
            DEFAULT_PREGREET_FAIL_TTL,
        )?,
    })
}

/// A wait: more than zero (a test of no time passes everyone), at most
/// [`MAX_PREGREET_WAIT`].
fn wait(key: &str, set: Option<Dur>, default: Duration) -> Result<Duration, Bad> {
    let d = positive(key, set, default)?;
    if d > MAX_PREGREET_WAIT {
        return Err(bad(
            key,
            format!(
                "{} is more than {}: every new sender waits this long for the greeting",
                Dur(d),
                Dur(MAX_PREGREET_WAIT)
            ),
        ));
    }
    Ok(d)
}

/// The busy wait: like the wait, and no longer than it (it is the wait under stress).
fn wait_limit(s: &Settings, wait_: Duration) -> Result<Duration, Bad> {
    let key = "pregreet_wait_busy";
    let default = DEFAULT_PREGREET_WAIT_BUSY.min(wait_);
    let d = wait(key, s.pregreet_wait_busy, default)?;
    if d > wait_ {
        return Err(bad(
            key,
            format!(
                "{} is more than pregreet_wait ({}): the busy wait is the shorter one",
                Dur(d),
                Dur(wait_)
            ),
        ));
    }
    Ok(d)
}

/// The room for clients under the test: like the queue's by default (a client under the test
/// waits as a queued one does, on one descriptor); with no queue (`max_queued = 0`), at least
/// one place, so that a config valid before the key existed stays valid. 0 set under enforce
/// or drop would refuse every client the test applies to, so it is refused; under ignore it
/// only means nobody is tested.
fn max_clients(s: &Settings, action: Pregreet, max_queued: usize) -> Result<usize, Bad> {
    let key = "pregreet_max_clients";
    let n = s.pregreet_max_clients.unwrap_or(max_queued.max(1));
    if n > MAX_CONNECTIONS {
        return Err(bad(key, format!("{n} is more than {MAX_CONNECTIONS}")));
    }
    if n == 0 && action.refuses() {
        return Err(bad(
            key,
            format!(
                "0 leaves no room for the test, and pregreet = \"{}\" would answer every \
                 client it applies to with the 421; set it to at least 1 (or max_queued, \
                 its default, above 0), or pregreet = \"off\"",
                action.name()
            ),
        ));
    }
    Ok(n)
}

/// A cache lifetime: 0 (not remembered) or whole seconds, as Redis keeps them.
fn ttl(key: &str, set: Option<Dur>, default: Duration) -> Result<Duration, Bad> {
    let d = set.map_or(default, |d| d.0);
    if !d.is_zero() && d.subsec_nanos() != 0 {
        return Err(bad(
            key,
            format!("{} is not a whole number of seconds", Dur(d)),
        ));
    }
    bounded(d).map_err(|e| bad(key, e))
}
