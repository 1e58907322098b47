//! Source policy: what limits apply to a client address. Immutable once built.
//!
//! A [`Policy`] is built from a validated config and swapped whole on reload; connections
//! already admitted keep the slots they hold. It answers three questions about an address:
//! is it denied or allowed (longest prefix across both lists wins), which [`Rule`] applies
//! (the longest `[[network]]` match, else the defaults), and is it within its connection rate.
//!
//! Rate limiters are governor's keyed GCRA over the same source key as the per-source cap. Their
//! state is bounded: keys idle long enough to be indistinguishable from new are evicted every
//! [`EVICT_INTERVAL`], and at [`MAX_RATE_KEYS`] tracked keys no new key is added: sources already
//! tracked stay limited, and only sources the limiter cannot track go through uncounted (fail
//! open for them alone: the concurrency limits still apply) until eviction makes room.
//! This module counts nothing and never touches a socket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::StateStore;
use governor::{Quota, RateLimiter};
use ipnet::IpNet;

use crate::config::{Config, Rate};

/// How often stale rate-limiter keys are evicted.
pub const EVICT_INTERVAL: Duration = Duration::from_secs(10);
/// The most source keys one rate limiter tracks.
pub const MAX_RATE_KEYS: usize = 100_000;

/// The limiter's clock: real monotonic time, plus an offset that only tests advance.
#[derive(Clone, Debug)]
pub struct PolicyClock {
    start: std::time::Instant,
    /// Nanoseconds added to real time; tests move time forward without sleeping.
    offset: Arc<AtomicU64>,
}

impl Default for PolicyClock {
    fn default() -> Self {
        PolicyClock {
            start: std::time::Instant::now(),
            offset: Arc::default(),
        }
    }
}

impl PolicyClock {
    /// Moves this clock (and every clone) forward.
    pub fn advance(&self, by: Duration) {
        self.offset
            .fetch_add(by.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl Clock for PolicyClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        let real = self.start.elapsed().as_nanos() as u64;
        Nanos::from(real + self.offset.load(Ordering::Relaxed))
    }
}

type Keyed = RateLimiter<IpNet, SharedStore, PolicyClock, NoOpMiddleware<Nanos>>;

/// The limiter's key store, shared with [`RateLimit`] so that at the key cap it can tell a
/// tracked key (still limited) from a new one (let through uncounted) without inserting it.
#[derive(Clone, Default)]
struct SharedStore(Arc<DashMapStateStore<IpNet>>);

impl StateStore for SharedStore {
    type Key = IpNet;

    fn measure_and_replace<T, F, E>(&self, key: &IpNet, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<IpNet> for SharedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below)
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&*self.0)
    }

    fn len(&self) -> usize {
        ShrinkableKeyedStateStore::len(&*self.0)
    }

    fn is_empty(&self) -> bool {
        ShrinkableKeyedStateStore::is_empty(&*self.0)
    }
}

/// One rate limit: a quota per source key, with bounded state.
pub struct RateLimit {
    rate: Rate,
    burst: u32,
    limiter: Keyed,
    /// The limiter's keys, to look up without inserting.
    keys: SharedStore,
    /// Set when the limiter tracks [`MAX_RATE_KEYS`] keys or more; checked on the hot path
    /// every [`FULL_CHECK_EVERY`] decisions and at each eviction.
    full: AtomicBool,
    /// Decisions made, to pace the size check.
    decisions: AtomicU64,
}

/// How often, in decisions, the limiter's size is checked against the cap. Bounds the
/// overshoot past [`MAX_RATE_KEYS`] during a flood of new sources.
const FULL_CHECK_EVERY: u64 = 1024;

impl RateLimit {
    fn new(rate: Rate, burst: Option<u32>, clock: &PolicyClock) -> RateLimit {
        let burst = burst.unwrap_or(rate.count);
        let period = rate.per / rate.count;
        let quota = Quota::with_period(period)
            .expect("a validated rate has a non-zero period")
            .allow_burst(NonZeroU32::new(burst).expect("a validated burst is at least 1"));
        let keys = SharedStore::default();
        RateLimit {
            rate,
            burst,
            limiter: RateLimiter::new(quota, keys.clone(), clock.clone()),
            keys,
            full: AtomicBool::new(false),
            decisions: AtomicU64::new(0),
        }
    }

    /// Whether `key` may connect now. Consumes one unit of its quota when it may.
    pub fn check(&self, key: &IpNet) -> RateCheck {
        if self
            .decisions
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(FULL_CHECK_EVERY)
        {
            self.full
                .store(self.limiter.len() >= MAX_RATE_KEYS, Ordering::Relaxed);
        }
        // At the cap, a key already tracked is still limited; only one that would need a new
        // entry goes through uncounted.
        if self.full.load(Ordering::Relaxed) && !self.keys.0.contains_key(key) {
            return RateCheck::Untracked;
        }
        match self.limiter.check_key(key) {
            Ok(()) => RateCheck::Within,
            Err(_) => RateCheck::Exceeded,
        }
    }

    /// Drops keys whose state equals a fresh key's, and updates the full flag.
    pub fn evict(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.full
            .store(self.limiter.len() >= MAX_RATE_KEYS, Ordering::Relaxed);
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateCheck {
    Within,
    Exceeded,
    /// The limiter is at its key cap; the source was not rate-limited.
    Untracked,
}

/// The limits that apply to sources in one network, or the defaults.
pub struct Rule {
    pub max_per_source: usize,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    pub rate: Option<Arc<RateLimit>>,
    /// The second tier for IPv4 sources: `(prefix length, cap)` for the block a source
    /// belongs to.
    pub network_cap_v4: Option<(u8, usize)>,
    /// The same for IPv6 sources; by default every /48 is capped (`max_per_ipv6_network`).
    pub network_cap_v6: Option<(u8, usize)>,
}

impl Rule {
    /// The network tier that applies to `ip`, if any: `(prefix length, cap)`.
    pub fn network_cap(&self, ip: IpAddr) -> Option<(u8, usize)> {
        if ip.to_canonical().is_ipv4() {
            self.network_cap_v4
        } else {
            self.network_cap_v6
        }
    }

    /// The source key of `ip` under this rule: the address masked to the family's prefix.
    pub fn source_key(&self, ip: IpAddr) -> IpNet {
        mask(ip, self.ipv4_prefix, self.ipv6_prefix)
    }
}

/// Masks `ip` (IPv4-mapped counted as IPv4) to the prefix length of its family.
pub fn mask(ip: IpAddr, ipv4_prefix: u8, ipv6_prefix: u8) -> IpNet {
    let ip = ip.to_canonical();
    let len = if ip.is_ipv4() {
        ipv4_prefix
    } else {
        ipv6_prefix
    };
    IpNet::new(ip, len)
        .expect("prefix lengths are validated")
        .trunc()
}

/// Networks mapped to values, looked up by longest prefix. One hash lookup per distinct
/// prefix length in the table, longest first.
pub struct PrefixTable<T> {
    /// `(prefix length, networks of that length)`, longest first; IPv4 and IPv6 apart.
    v4: Vec<(u8, HashMap<IpNet, T>)>,
    v6: Vec<(u8, HashMap<IpNet, T>)>,
}

impl<T> Default for PrefixTable<T> {
    fn default() -> Self {
        PrefixTable {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

impl<T> PrefixTable<T> {
    pub fn insert(&mut self, net: IpNet, value: T) {
        let levels = if net.addr().is_ipv4() {
            &mut self.v4
        } else {
            &mut self.v6
        };
        let len = net.prefix_len();
        let at = match levels.iter().position(|(l, _)| *l <= len) {
            Some(i) if levels[i].0 == len => i,
            Some(i) => {
                levels.insert(i, (len, HashMap::new()));
                i
            }
            None => {
                levels.push((len, HashMap::new()));
                levels.len() - 1
            }
        };
        levels[at].1.insert(net.trunc(), value);
    }

    /// The value of the longest network containing `ip`.
    pub fn longest(&self, ip: IpAddr) -> Option<&T> {
        let ip = ip.to_canonical();
        let levels = if ip.is_ipv4() { &self.v4 } else { &self.v6 };
        levels.iter().find_map(|(len, nets)| {
            let key = IpNet::new(ip, *len)
                .expect("stored lengths are valid")
                .trunc();
            nets.get(&key)
        })
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// What the lists say about an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    Allow,
    Deny,
}

/// Everything admission needs to decide, for one config generation.
pub struct Policy {
    pub max_connections: usize,
    /// Global slots only allowed sources may take.
    pub reserved_for_allowed: usize,
    /// Count would-be rejections but admit everyone.
    pub dry_run: bool,
    pub default: Rule,
    networks: PrefixTable<Rule>,
    lists: PrefixTable<Listing>,
    clock: PolicyClock,
}

/// How one address is classified.
pub struct Class<'a> {
    pub listing: Option<Listing>,
    pub rule: &'a Rule,
}

impl Policy {
    /// Builds the policy for `config`. Rate limiters of `previous` whose network and quota are
    /// unchanged are carried over, so a reload does not hand every source a fresh burst.
    pub fn new(config: &Config, previous: Option<&Policy>, clock: PolicyClock) -> Policy {
        let reuse = |cidr: Option<IpNet>, rate: Rate, burst: Option<u32>| {
            let old = previous.and_then(|p| match cidr {
                None => p.default.rate.clone(),
                Some(c) => p.networks.exact(c).and_then(|r| r.rate.clone()),
            });
            match old {
                Some(l) if l.rate == rate && l.burst == burst.unwrap_or(rate.count) => l,
                _ => Arc::new(RateLimit::new(rate, burst, &clock)),
            }
        };
        let default = Rule {
            max_per_source: config.max_per_source,
            ipv4_prefix: config.ipv4_prefix,
            ipv6_prefix: config.ipv6_prefix,
            rate: config
                .rate_per_source
                .map(|r| reuse(None, r, config.rate_burst)),
            network_cap_v4: None,
            network_cap_v6: Some((config.ipv6_network_prefix, config.max_per_ipv6_network)),
        };
        let mut networks = PrefixTable::default();
        for n in &config.networks {
            let net = n.cidr.0;
            let rate = n.rate_per_source.or(config.rate_per_source);
            let burst = if n.rate_per_source.is_some() {
                n.rate_burst
            } else {
                n.rate_burst.or(config.rate_burst)
            };
            let own_cap = n
                .max_per_network
                .map(|cap| (n.network_prefix.unwrap_or(net.prefix_len()), cap));
            // An IPv6 rule without its own tier inherits the default one, like any other key.
            let (network_cap_v4, network_cap_v6) = match net {
                IpNet::V4(_) => (own_cap, None),
                IpNet::V6(_) => (None, own_cap.or(default.network_cap_v6)),
            };
            let rule = Rule {
                max_per_source: n.max_per_source.unwrap_or(config.max_per_source),
                ipv4_prefix: n.ipv4_prefix.unwrap_or(config.ipv4_prefix),
                ipv6_prefix: n.ipv6_prefix.unwrap_or(config.ipv6_prefix),
                rate: rate.map(|r| reuse(Some(net), r, burst)),
                network_cap_v4,
                network_cap_v6,
            };
            networks.insert(net, rule);
        }
        let mut lists = PrefixTable::default();
        for &net in &config.allow {
            lists.insert(net, Listing::Allow);
        }
        for &net in &config.deny {
            lists.insert(net, Listing::Deny);
        }
        Policy {
            max_connections: config.max_connections,
            reserved_for_allowed: config.reserved_for_allowed,
            dry_run: config.dry_run,
            default,
            networks,
            lists,
            clock,
        }
    }

    pub fn classify(&self, ip: IpAddr) -> Class<'_> {
        Class {
            listing: self.lists.longest(ip).copied(),
            rule: self.networks.longest(ip).unwrap_or(&self.default),
        }
    }

    /// Every rate limiter in this policy, for eviction.
    pub fn rate_limits(&self) -> Vec<Arc<RateLimit>> {
        let mut all: Vec<_> = self.default.rate.iter().cloned().collect();
        for levels in [&self.networks.v4, &self.networks.v6] {
            for (_, nets) in levels {
                all.extend(nets.values().filter_map(|r| r.rate.clone()));
            }
        }
        all
    }

    pub fn clock(&self) -> &PolicyClock {
        &self.clock
    }
}

impl<T> PrefixTable<T> {
    /// The value stored for exactly `net`.
    fn exact(&self, net: IpNet) -> Option<&T> {
        let levels = if net.addr().is_ipv4() {
            &self.v4
        } else {
            &self.v6
        };
        levels
            .iter()
            .find(|(l, _)| *l == net.prefix_len())
            .and_then(|(_, nets)| nets.get(&net))
    }
}

#[cfg(test)]
mod tests;
