//! Configuration: the flags, the TOML file, their merge, and validation into a typed [`Config`].
//!
//! One struct, [`Settings`], is both the clap flag set and the TOML schema, so every flag has the
//! same key in the file by construction. Loading goes in two stages, as in ripgrep: raw
//! `Settings` (all optional) from the file and from the flags, merged with flags winning, then
//! [`Settings::validate`] into a `Config` in which every value is checked and every default filled.
//! Nothing here binds a socket: a bad config is rejected before anything is opened.

mod restart_only;
mod settings;
mod validate;
pub mod value;
mod warnings;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

pub use restart_only::{keep_restart_only, RESTART_ONLY};
pub use settings::{ClusterSettings, Settings};
pub use validate::redact;
pub use value::{
    BackendSpec, ByteSize, Cidr, Dur, HostPort, ListenAddr, MetricsAddr, Rate, ReplyText,
};
pub use warnings::{file_warnings, warnings};

/// Defaults, quoted by the generated reference (docs/configuration.md). Exchange's MaxInboundConnectionPerSource is 20.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:25";
pub const DEFAULT_MAX_CONNECTIONS: usize = 1000;
pub const DEFAULT_MAX_PER_SOURCE: usize = 20;
pub const DEFAULT_IPV4_PREFIX: u8 = 32;
pub const DEFAULT_IPV6_PREFIX: u8 = 64;
/// IPv6 sources are also counted by this block: a site's typical allocation.
pub const DEFAULT_IPV6_NETWORK_PREFIX: u8 = 48;
/// The share of `max_connections` one IPv6 network block may hold by default (one tenth), so a
/// single site cannot take every slot by spreading over its many /64s.
pub const DEFAULT_IPV6_NETWORK_SHARE_DIVISOR: usize = 10;
pub const DEFAULT_METRICS: &str = "127.0.0.1:9925";
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_HALF_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may wait in the queue for a slot before it gets the global-limit 421.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// `max_queued`'s default, in `max_connections`: a waiting client costs one descriptor and
/// about 1.5 KiB, so a burst five times the backend's limit waits instead of being refused.
/// Where the descriptor limit cannot hold that, the queue is held to what fits
/// ([`crate::descriptors`]).
pub const DEFAULT_QUEUED_PER_CONNECTION: usize = 5;
/// The longest queue_timeout: RFC 5321 §4.5.3.2 gives a client 5 minutes for the greeting,
/// and a wait past it would only be cut by the client.
pub const MAX_QUEUE_TIMEOUT: Duration = Duration::from_secs(300);
/// The lowest limit a learned backend limit goes to, and where it starts by default.
pub const DEFAULT_ADAPTIVE_MIN: usize = 5;
pub const DEFAULT_PIPE_SIZE: usize = 1024 * 1024;
pub const DEFAULT_CLUSTER_NAME: &str = "mxgate";
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
pub const DEFAULT_FALLBACK_SHARE: f64 = 0.5;
pub const DEFAULT_CLUSTER_ADMISSION_TIMEOUT: Duration = Duration::from_millis(50);
/// The shortest `cluster.lease_ttl`: the lease is refreshed every third of it, and each refresh
/// may wait a second for Redis.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(3);
/// The bounds of `cluster.admission_timeout`: below a loopback round trip every admission would
/// fall back; above, every clustered client waits too long before its greeting.
pub const MIN_CLUSTER_ADMISSION_TIMEOUT: Duration = Duration::from_millis(5);
pub const MAX_CLUSTER_ADMISSION_TIMEOUT: Duration = Duration::from_secs(5);
/// The pregreet test's wait, and its wait while clients wait in the queue (postscreen's
/// `postscreen_greet_wait`, 6 s, and 2 s under stress).
pub const DEFAULT_PREGREET_WAIT: Duration = Duration::from_secs(6);
pub const DEFAULT_PREGREET_WAIT_BUSY: Duration = Duration::from_secs(2);
/// How long a pass is remembered (postscreen's `postscreen_greet_ttl`), and a failure.
pub const DEFAULT_PREGREET_PASS_TTL: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_PREGREET_FAIL_TTL: Duration = Duration::from_secs(600);
/// The longest pregreet wait: a client waits at most 5 minutes for the greeting (RFC 5321
/// section 4.5.3.2), and a test that long would only be cut by the client.
pub const MAX_PREGREET_WAIT: Duration = Duration::from_secs(60);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The most worker threads `threads` may ask for.
pub const MAX_THREADS: usize = 256;
/// The longest any duration setting may be: anything longer is a typo, and could not be added
/// to a clock reading.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// The fastest connection rate a limiter can represent: one attempt per microsecond.
pub const MAX_RATE_PER_SECOND: u64 = 1_000_000;
/// The largest burst a rate limit may allow.
pub const MAX_RATE_BURST: u32 = 1_000_000;
/// The largest `max_connections` (and any other connection count) accepted.
pub const MAX_CONNECTIONS: usize = 1_000_000;
/// The most consecutive health checks `fall` and `rise` may ask for.
pub const MAX_CHECKS: u32 = 1000;
/// The largest backend weight.
pub const MAX_WEIGHT: u32 = 1000;

/// How bytes are moved between client and backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// splice(2) on Linux, userspace copy elsewhere.
    #[default]
    Auto,
    /// splice(2); an error on platforms without it.
    Splice,
    /// Userspace copy.
    Copy,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// What the pregreet test does to a client that speaks before its turn (postscreen's
/// `postscreen_greet_action`, whose default, `ignore`, is this one's), or `off`: no test at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pregreet {
    /// No test: the greeting is the backend's own, as before the test existed.
    Off,
    /// Run the test, log and count a failure, and serve the client anyway (a dry run).
    #[default]
    Ignore,
    /// Complete the greeting, then answer every command with 550 until QUIT.
    Enforce,
    /// Answer 521 and close.
    Drop,
}

/// How sessions are spread over several backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Fewest active sessions relative to weight; ties taken in turn. The flag's spelling
    /// (`least-connections`) and the key's (`least_connections`) are both accepted, either way.
    #[default]
    #[serde(alias = "least-connections")]
    #[value(alias = "least_connections")]
    LeastConnections,
    /// The first healthy backend with room, in config order (strict failover).
    First,
}

pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_FALL: u32 = 3;
pub const DEFAULT_RISE: u32 = 2;

/// Replacement reply lines, one optional key per reason (`[replies]` in the file).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_limit: Option<ReplyText>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_limit: Option<ReplyText>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_unavailable: Option<ReplyText>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<ReplyText>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_limit: Option<ReplyText>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied: Option<ReplyText>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draining: Option<ReplyText>,
}

/// Limits for one network (`[[network]]`), overriding the global ones for sources inside it.
/// The longest matching `cidr` wins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkRule {
    pub cidr: Cidr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_source: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_per_source: Option<Rate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_burst: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4_prefix: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6_prefix: Option<u8>,
    /// A second tier: concurrent connections from each `network_prefix`-sized block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_network: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_prefix: Option<u8>,
}

/// A configuration error, naming where it came from, the key, and why.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file, or `None` for the command line.
    pub file: Option<PathBuf>,
    /// The key, as written in the file (`replies.global_limit`); empty for a whole-file error.
    pub key: String,
    pub reason: String,
    /// The line of the file the key is on, when the value came from the file.
    pub line: Option<usize>,
    /// The flag (`--max-connections`), when the value came from the command line.
    pub flag: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(flag) = &self.flag {
            return write!(f, "command line: flag `{flag}`: {}", self.reason);
        }
        match &self.file {
            Some(p) => write!(f, "config file {}", p.display())?,
            None => f.write_str("command line")?,
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.reason)?;
        match self.line {
            Some(line) => write!(f, " (line {line})"),
            None => Ok(()),
        }
    }
}

/// The effective, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    /// Whether `listen` was given (file or flag) rather than defaulted: a socket-activated
    /// start warns that it is not used.
    pub listen_set: bool,
    /// Never empty; in config order.
    pub backends: Vec<BackendSpec>,
    pub balance: Balance,
    /// Whether backends are health-checked: with several backends, or `health_interval` set.
    pub health_checks: bool,
    pub health_interval: Duration,
    pub fall: u32,
    pub rise: u32,
    pub max_connections: usize,
    pub max_per_source: usize,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// The default network tier for IPv6 sources: blocks of this length ...
    pub ipv6_network_prefix: u8,
    /// ... hold at most this many sessions.
    pub max_per_ipv6_network: usize,
    pub hostname: String,
    /// `None` when the endpoint is off.
    pub metrics: Option<SocketAddr>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Inactivity allowed once only the client's direction is left.
    pub half_close_timeout: Duration,
    /// `None`: wait for the backend's first byte only as long as the idle timeout.
    pub backend_greeting_timeout: Option<Duration>,
    pub log_format: LogFormat,
    pub forwarding: Forwarding,
    /// Bytes asked for each splice pipe.
    pub pipe_size: usize,
    /// Worker threads asked for; 0 means one per usable CPU.
    pub threads: usize,
    /// How long sessions may go on after a stop signal.
    pub drain_timeout: Duration,
    pub transparent: bool,
    pub transparent_port: bool,
    pub proxy_protocol: Option<crate::proxy_protocol::Version>,
    pub accept_proxy_protocol: Vec<ipnet::IpNet>,
    pub proxy_header_timeout: Duration,
    pub rate_per_source: Option<Rate>,
    /// `None`: the rate's count.
    pub rate_burst: Option<u32>,
    pub allow: Vec<ipnet::IpNet>,
    pub deny: Vec<ipnet::IpNet>,
    pub reserved_for_allowed: usize,
    /// Zero: the queue is off, and a full server refuses at once.
    pub queue_timeout: Duration,
    pub max_queued: usize,
    /// Bounds and start of a learned backend limit (`max_connections = "auto"`).
    pub adaptive_min: usize,
    pub adaptive_initial: usize,
    /// Where learned backend limits are kept across restarts; `None`: not kept.
    pub state_dir: Option<std::path::PathBuf>,
    pub dry_run: bool,
    /// Whether the backend may relay for mxgate's own address: with `false` the operator says
    /// it does not, and the relay warning is not given.
    pub backend_trusts_mxgate: bool,
    /// Whether the metrics listener serves the live view, which names client addresses.
    pub status: bool,
    /// Host names `/status` and the page answer to, besides the listen address and
    /// localhost; lower case.
    pub status_hosts: Vec<String>,
    pub networks: Vec<NetworkRule>,
    pub replies: ReplyOverrides,
    /// Limits shared with other instances through Redis; `None` counts alone.
    pub cluster: Option<ClusterConfig>,
    /// The pregreet test.
    pub pregreet: PregreetConfig,
}

/// The pregreet test's settings, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PregreetConfig {
    pub action: Pregreet,
    pub wait: Duration,
    /// The wait while anyone waits in the queue.
    pub wait_busy: Duration,
    pub pass_ttl: Duration,
    pub fail_ttl: Duration,
    /// Clients under the test at once, at most.
    pub max_clients: usize,
}

/// A validated `[cluster]` table.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    /// The Redis URL, with the password from `password_file` put in (it may carry a password:
    /// never logged).
    pub redis: String,
    /// Where the password came from, if not from the URL.
    pub password_file: Option<PathBuf>,
    pub name: String,
    pub instance: String,
    pub lease_ttl: Duration,
    pub fallback_share: f64,
    pub admission_timeout: Duration,
}

impl Config {
    /// Whether a client that finds the capacity full waits for a slot. Dry run never queues:
    /// it admits everyone and only counts. Nor does a limit of 0, which closes the door:
    /// nobody could ever be served. The queue, its gauge and the live view all ask this.
    pub fn queues(&self) -> bool {
        !self.queue_timeout.is_zero() && !self.dry_run && self.max_connections > 0
    }

    /// Loads the file (if any), overlays the flags, and validates the result. An error names
    /// where the bad value came from: the flag, or the file's key and line.
    pub fn load(file: Option<&Path>, flags: Settings) -> Result<Config, ConfigError> {
        let (base, text) = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError {
                    file: Some(p.to_path_buf()),
                    key: String::new(),
                    reason: e.to_string(),
                    line: None,
                    flag: None,
                })?;
                let base = Settings::from_toml(&text).map_err(|(key, reason)| ConfigError {
                    file: Some(p.to_path_buf()),
                    key,
                    reason,
                    line: None,
                    flag: None,
                })?;
                (base, text)
            }
            None => (Settings::default(), String::new()),
        };
        let from_flags = flags.keys_set();
        base.merge(flags)
            .check()
            .map_err(|validate::Bad(key, reason)| {
                let mut root = key.split(['.', '[']).next().unwrap_or("").to_string();
                // The `[cluster]` table's keys are flags of their own (`--cluster-redis`).
                if root == "cluster" {
                    root = key.clone();
                }
                if from_flags.contains(&root) || file.is_none() {
                    return ConfigError {
                        file: None,
                        flag: Some(format!("--{}", root.replace(['_', '.'], "-"))),
                        key,
                        reason,
                        line: None,
                    };
                }
                ConfigError {
                    file: file.map(Path::to_path_buf),
                    line: line_of(&text, &root),
                    key,
                    reason,
                    flag: None,
                }
            })
    }

    /// A test-friendly config: listen on loopback port 0, metrics on port 0.
    pub fn for_backend(backend: SocketAddr) -> Config {
        Config::on_loopback(backend, Settings::default()).expect("the test config is valid")
    }

    /// A config on loopback port 0 (clients and metrics) in front of `backend`, with `over`
    /// applied, validated like any other: the demo and the tests build theirs this way.
    pub fn on_loopback(backend: SocketAddr, over: Settings) -> Result<Config, ConfigError> {
        Settings {
            listen: vec![ListenAddr("127.0.0.1:0".parse().expect("literal"))],
            backend: vec![BackendSpec {
                address: HostPort {
                    text: backend.to_string(),
                    addr: backend,
                },
                weight: 1,
                max_connections: None,
                auto: false,
                backup: false,
            }],
            hostname: Some("mx.test".into()),
            metrics: Some(MetricsAddr::On("127.0.0.1:0".parse().expect("literal"))),
            ..Settings::default()
        }
        .merge(over)
        .validate(None)
    }

    /// The effective config as TOML, every key present: what `mxgate check` prints.
    pub fn to_toml(&self) -> String {
        let s = Settings {
            listen: self.listen.iter().copied().map(ListenAddr).collect(),
            backend: self.backends.clone(),
            backends: Vec::new(),
            balance: Some(self.balance),
            health_interval: self.health_checks.then_some(Dur(self.health_interval)),
            fall: Some(self.fall),
            rise: Some(self.rise),
            max_connections: Some(self.max_connections),
            max_per_source: Some(self.max_per_source),
            ipv4_prefix: Some(self.ipv4_prefix),
            ipv6_prefix: Some(self.ipv6_prefix),
            ipv6_network_prefix: Some(self.ipv6_network_prefix),
            max_per_ipv6_network: Some(self.max_per_ipv6_network),
            hostname: Some(self.hostname.clone()),
            metrics: Some(self.metrics.map_or(MetricsAddr::Off, MetricsAddr::On)),
            connect_timeout: Some(Dur(self.connect_timeout)),
            idle_timeout: Some(Dur(self.idle_timeout)),
            half_close_timeout: Some(Dur(self.half_close_timeout)),
            backend_greeting_timeout: self.backend_greeting_timeout.map(Dur),
            log_format: Some(self.log_format),
            forwarding: Some(self.forwarding),
            pipe_size: Some(ByteSize(self.pipe_size)),
            threads: Some(self.threads),
            drain_timeout: Some(Dur(self.drain_timeout)),
            transparent: Some(self.transparent),
            transparent_port: Some(self.transparent_port),
            proxy_protocol: self.proxy_protocol,
            accept_proxy_protocol: self
                .accept_proxy_protocol
                .iter()
                .copied()
                .map(Cidr)
                .collect(),
            proxy_header_timeout: (!self.accept_proxy_protocol.is_empty())
                .then_some(Dur(self.proxy_header_timeout)),
            rate_per_source: self.rate_per_source,
            rate_burst: self.rate_burst,
            allow: self.allow.iter().copied().map(Cidr).collect(),
            deny: self.deny.iter().copied().map(Cidr).collect(),
            reserved_for_allowed: Some(self.reserved_for_allowed),
            queue_timeout: Some(Dur(self.queue_timeout)),
            max_queued: Some(self.max_queued),
            adaptive_min: Some(self.adaptive_min),
            adaptive_initial: Some(self.adaptive_initial),
            state_dir: Some(self.state_dir.clone().unwrap_or_default()),
            dry_run: Some(self.dry_run),
            backend_trusts_mxgate: Some(self.backend_trusts_mxgate),
            status: Some(self.status),
            status_hosts: self.status_hosts.clone(),
            networks: self.networks.clone(),
            replies: Some(self.replies.clone()),
            pregreet: Some(self.pregreet.action),
            pregreet_wait: Some(Dur(self.pregreet.wait)),
            pregreet_wait_busy: Some(Dur(self.pregreet.wait_busy)),
            pregreet_pass_ttl: Some(Dur(self.pregreet.pass_ttl)),
            pregreet_fail_ttl: Some(Dur(self.pregreet.fail_ttl)),
            pregreet_max_clients: Some(self.pregreet.max_clients),
            // The password, if the URL has one, is not printed.
            cluster: self
                .cluster
                .as_ref()
                .map_or_else(ClusterSettings::default, |c| ClusterSettings {
                    redis: Some(redact(&c.redis)),
                    password_file: c.password_file.clone(),
                    name: Some(c.name.clone()),
                    instance: Some(c.instance.clone()),
                    lease_ttl: Some(Dur(c.lease_ttl)),
                    fallback_share: Some(c.fallback_share),
                    admission_timeout: Some(Dur(c.admission_timeout)),
                }),
        };
        toml::to_string(&s).expect("settings serialise")
    }
}

/// The line on which `key` is set in a TOML `text`: a `key =` line, or the `[key]` or
/// `[[key]]` table header (`network` for `[[network]]`).
fn line_of(text: &str, key: &str) -> Option<usize> {
    // A key of a table (`cluster.redis`): its line after the table's header.
    if let Some((table, inner)) = key.split_once('.') {
        let header = line_of(text, table)?;
        return text
            .lines()
            .enumerate()
            .skip(header)
            .take_while(|(_, l)| !l.trim_start().starts_with('['))
            .find(|(_, l)| {
                l.trim_start()
                    .strip_prefix(inner)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
            .map_or(Some(header), |(i, _)| Some(i + 1));
    }
    let table = if key == "networks" { "network" } else { key };
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
                || l.trim_start_matches('[').starts_with(&format!("{table}]"))
        })
        .map(|i| i + 1)
}

/// The kernel's host name, from uname(2): no /proc, which systemd's ProcSubset=pid hides.
pub(crate) fn system_hostname() -> Result<String, String> {
    let name = rustix::system::uname();
    let name = name
        .nodename()
        .to_str()
        .map_err(|_| "it is not UTF-8".to_string())?;
    Ok(name.trim().to_string())
}

#[cfg(test)]
mod tests;
