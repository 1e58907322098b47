//! The local pregreet cache: a verdict per client address until its expiry, bounded in entries
//! (so in memory), swept of expired entries. Expiries are wall-clock seconds since the Unix
//! epoch, as the state file and Redis keep them; the clock is given, so tests move it by hand.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The most addresses the cache holds. An entry costs about 64 bytes in the table (address,
/// verdict, expiry, the hash table's own overhead), so the cache stays under ~8 MiB.
pub const MAX_ENTRIES: usize = 100_000;

/// What a source did in the test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// It waited for the greeting.
    Pass,
    /// It spoke before its turn.
    Fail,
}

/// Seconds since the Unix epoch.
#[derive(Clone)]
pub enum Clock {
    System,
    /// A hand-moved clock, for tests.
    Manual(Arc<AtomicU64>),
}

impl Clock {
    pub fn now(&self) -> u64 {
        match self {
            Clock::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            Clock::Manual(at) => at.load(Ordering::Relaxed),
        }
    }
}

/// How many verdicts the cache holds now, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub pass: usize,
    pub fail: usize,
}

/// One address's verdict and when it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cached {
    pub verdict: Verdict,
    /// Seconds since the Unix epoch.
    pub until: u64,
}

pub struct Cache {
    table: Mutex<HashMap<IpAddr, Cached>>,
    bound: usize,
    clock: Clock,
}

impl Cache {
    pub fn new(bound: usize, clock: Clock) -> Cache {
        Cache {
            table: Mutex::new(HashMap::new()),
            bound: bound.max(1),
            clock,
        }
    }

    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Cached>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The verdict on `ip` in force now; an expired one is removed.
    pub fn get(&self, ip: IpAddr) -> Option<Verdict> {
        let now = self.now();
        let mut table = self.lock();
        match table.get(&ip) {
            Some(e) if e.until > now => Some(e.verdict),
            Some(_) => {
                table.remove(&ip);
                None
            }
            None => None,
        }
    }

    /// Remembers `verdict` on `ip` for `ttl_secs` from now (0: not at all).
    pub fn put(&self, ip: IpAddr, verdict: Verdict, ttl_secs: u64) {
        if ttl_secs == 0 {
            return;
        }
        let until = self.now().saturating_add(ttl_secs);
        self.insert(ip, Cached { verdict, until });
    }

    /// Keeps `entry` for `ip` (from the state file or Redis) unless it has expired.
    pub fn insert(&self, ip: IpAddr, entry: Cached) {
        let now = self.now();
        if entry.until <= now {
            return;
        }
        let mut table = self.lock();
        if table.len() >= self.bound && !table.contains_key(&ip) {
            make_room(&mut table, self.bound, now);
        }
        table.insert(ip, entry);
    }

    /// Removes every expired entry; returns how many went.
    pub fn sweep(&self) -> usize {
        let now = self.now();
        let mut table = self.lock();
        let before = table.len();
        table.retain(|_, e| e.until > now);
        before - table.len()
    }

    pub fn counts(&self) -> Counts {
        let now = self.now();
        let table = self.lock();
        let mut c = Counts::default();
        for e in table.values().filter(|e| e.until > now) {
            match e.verdict {
                Verdict::Pass => c.pass += 1,
                Verdict::Fail => c.fail += 1,
            }
        }
        c
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live entry, for the state file.
    pub fn entries(&self) -> Vec<(IpAddr, Cached)> {
        let now = self.now();
        let table = self.lock();
        table
            .iter()
            .filter(|(_, e)| e.until > now)
            .map(|(ip, e)| (*ip, *e))
            .collect()
    }
}

/// A full table makes room for a tenth of its bound at once, so that a flood of new addresses
/// costs one scan per tenth, not one per address: the expired go first, then failures (cheap to
/// lose: a bot is tested again), then the entries that would expire soonest.
fn make_room(table: &mut HashMap<IpAddr, Cached>, bound: usize, now: u64) {
    table.retain(|_, e| e.until > now);
    let keep = bound - bound.div_ceil(10);
    if table.len() <= keep {
        return;
    }
    let mut order: Vec<(bool, u64, IpAddr)> = table
        .iter()
        .map(|(ip, e)| (e.verdict == Verdict::Pass, e.until, *ip))
        .collect();
    let drop = order.len() - keep;
    order.select_nth_unstable(drop - 1);
    for (_, _, ip) in &order[..drop] {
        table.remove(ip);
    }
}

#[cfg(test)]
mod tests;
