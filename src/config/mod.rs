//! Configuration: the flags, the TOML file, their merge, and validation into a typed [`Config`].
//!
//! One struct, [`Settings`], is both the clap flag set and the TOML schema, so every flag has the
//! same key in the file by construction. Loading goes in two stages, as in ripgrep: raw
//! `Settings` (all optional) from the file and from the flags, merged with flags winning, then
//! [`Settings::validate`] into a `Config` in which every value is checked and every default filled.
//! Nothing here binds a socket: a bad config is rejected before anything is opened.

mod validate;
pub mod value;
mod warnings;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

pub use value::{
    BackendSpec, ByteSize, Cidr, Dur, HostPort, ListenAddr, MetricsAddr, Rate, ReplyText,
};
pub use warnings::warnings;

/// Defaults, quoted by the README. Exchange's MaxInboundConnectionPerSource is 20.
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
/// The longest queue_timeout: RFC 5321 §4.5.3.2 gives a client 5 minutes for the greeting,
/// and a wait past it would only be cut by the client.
pub const MAX_QUEUE_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_PIPE_SIZE: usize = 1024 * 1024;
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

/// How sessions are spread over several backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Fewest active sessions relative to weight; ties taken in turn.
    #[default]
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

/// Every setting, each optional: what one source (flags or file) said.
#[derive(Clone, Debug, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to accept clients on; repeat for several (IPv4 and IPv6) [default: 0.0.0.0:25]
    #[arg(long, value_name = "ADDR")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<ListenAddr>,

    /// The mail server to forward admitted clients to; repeat for several:
    /// HOST:PORT[,weight=N][,max_connections=N][,backup]
    #[arg(long, value_name = "ADDR")]
    #[serde(
        default,
        deserialize_with = "value::one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub backend: Vec<BackendSpec>,

    /// Backends as a list of strings or tables (file only); use either this or `backend`
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendSpec>,

    /// How new sessions are spread over several backends [default: least-connections]
    #[arg(long, value_name = "POLICY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,

    /// How often each backend's SMTP health is checked (on by default with several backends)
    /// [default: 5s]
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_interval: Option<Dur>,

    /// Consecutive failed checks that mark a backend down [default: 3]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,

    /// Consecutive good checks that mark a backend up again [default: 2]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,

    /// Cap on concurrent connections from all sources together [default: 1000]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,

    /// Cap on concurrent connections from one source [default: 20]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_source: Option<usize>,

    /// IPv4 addresses are grouped into sources by this prefix length [default: 32]
    #[arg(long, value_name = "LEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4_prefix: Option<u8>,

    /// IPv6 addresses are grouped into sources by this prefix length [default: 64]
    #[arg(long, value_name = "LEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6_prefix: Option<u8>,

    /// IPv6 sources are also counted together by networks of this prefix length, for
    /// max_per_ipv6_network [default: 48]
    #[arg(long, value_name = "LEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6_network_prefix: Option<u8>,

    /// Cap on concurrent connections from one IPv6 network of ipv6_network_prefix
    /// [default: a tenth of max_connections]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_ipv6_network: Option<usize>,

    /// Name mxgate gives in its own replies [default: the system host name]
    #[arg(long, value_name = "FQDN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,

    /// Where /metrics is served, or "off" [default: 127.0.0.1:9925]
    #[arg(long, value_name = "ADDR|off")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsAddr>,

    /// How long to wait for the backend to accept [default: 5s]
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Dur>,

    /// Close a session in which no byte moved for this long; keep it above the backend's own
    /// inactivity timeout [default: 10m]
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Dur>,

    /// Once the backend has closed its side, close the session if the client sends nothing
    /// and does not close for this long [default: 30s]
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub half_close_timeout: Option<Dur>,

    /// If the backend sends no byte within this time after accepting, answer the client 421
    /// and close both sides [default: off]
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_greeting_timeout: Option<Dur>,

    /// Log line format [default: text]
    #[arg(long, value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,

    /// How bytes are moved: auto (splice on Linux), splice or copy [default: auto]
    #[arg(long, value_name = "MODE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarding: Option<Forwarding>,

    /// Size asked for each splice pipe, capped at fs.pipe-max-size [default: 1MiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipe_size: Option<ByteSize>,

    /// Worker threads that accept and forward, each with its own event loop; 0 means one per
    /// CPU mxgate may run on [default: 0]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,

    /// On SIGTERM, how long forwarding sessions may go on before they are closed [default: 30s]
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<Dur>,

    /// Connect to the backend from the client's own address (IP_TRANSPARENT; needs
    /// CAP_NET_ADMIN and policy routing, see the README)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transparent: Option<bool>,

    /// With --transparent, keep the client's source port as well
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transparent_port: Option<bool>,

    /// Send a PROXY protocol header (v1 or v2) to the backend before any client byte
    #[arg(long, value_name = "VERSION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<crate::proxy_protocol::Version>,

    /// Networks of upstream load balancers that send a PROXY protocol header; repeatable.
    /// When set, every connection must come from one of them and carry a header
    #[arg(long, value_name = "CIDR")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accept_proxy_protocol: Vec<Cidr>,

    /// How long an upstream may take to send its PROXY protocol header [default: 5s]
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_header_timeout: Option<Dur>,

    /// Connection rate allowed per source, such as 30/min (N/s, N/min, N/h) [default: off]
    #[arg(long, value_name = "RATE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_per_source: Option<Rate>,

    /// Connections a source may open in a burst before the rate applies [default: the rate's N]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_burst: Option<u32>,

    /// Network exempt from the per-source and rate limits; repeatable
    #[arg(long, value_name = "CIDR")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Cidr>,

    /// Network greeted with 554 and never forwarded; repeatable
    #[arg(long, value_name = "CIDR")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Cidr>,

    /// How long a client that finds the server full may wait, without a greeting, for a slot
    /// before it gets the 421; 0 turns the queue off [default: 30s]
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_timeout: Option<Dur>,

    /// How many clients may wait in the queue at once; past it a newcomer gets the 421 at once
    /// [default: max_connections]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<usize>,

    /// Global slots kept for allowed networks only [default: 0]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_for_allowed: Option<usize>,

    /// Evaluate every limit and count would-be rejections, but forward every connection
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,

    /// Per-network overrides (file only, `[[network]]`)
    #[arg(skip)]
    #[serde(default, rename = "network", skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NetworkRule>,

    /// Reply lines that replace mxgate's own (file only)
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replies: Option<ReplyOverrides>,
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

impl Settings {
    /// Reads and parses a TOML file. Unknown keys and ill-typed values are errors naming the key.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let err = |key: String, reason: String| ConfigError {
            file: Some(path.to_path_buf()),
            key,
            reason,
            line: None,
            flag: None,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(String::new(), e.to_string()))?;
        Self::from_toml(&text).map_err(|(key, reason)| err(key, reason))
    }

    /// Parses TOML text; the error is `(key, reason)`.
    pub fn from_toml(text: &str) -> Result<Settings, (String, String)> {
        let de =
            toml::Deserializer::parse(text).map_err(|e| (String::new(), toml_reason(&e, text)))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            (key, toml_reason(e.inner(), text))
        })
    }

    /// Overlays `over` on `self`: every value `over` sets wins.
    pub fn merge(mut self, over: Settings) -> Settings {
        if !over.listen.is_empty() {
            self.listen = over.listen;
        }
        if !over.backend.is_empty() {
            self.backend = over.backend;
            self.backends.clear();
        }
        if !over.allow.is_empty() {
            self.allow = over.allow;
        }
        if !over.deny.is_empty() {
            self.deny = over.deny;
        }
        if !over.networks.is_empty() {
            self.networks = over.networks;
        }
        if !over.accept_proxy_protocol.is_empty() {
            self.accept_proxy_protocol = over.accept_proxy_protocol;
        }
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f; } )* };
        }
        take!(
            balance,
            health_interval,
            fall,
            rise,
            max_connections,
            max_per_source,
            ipv4_prefix,
            ipv6_prefix,
            ipv6_network_prefix,
            max_per_ipv6_network,
            hostname,
            metrics,
            connect_timeout,
            idle_timeout,
            half_close_timeout,
            backend_greeting_timeout,
            log_format,
            forwarding,
            pipe_size,
            threads,
            drain_timeout,
            transparent,
            transparent_port,
            proxy_protocol,
            proxy_header_timeout,
            rate_per_source,
            rate_burst,
            reserved_for_allowed,
            queue_timeout,
            max_queued,
            dry_run,
            replies
        );
        self
    }
}

/// The effective, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
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
    pub dry_run: bool,
    pub networks: Vec<NetworkRule>,
    pub replies: ReplyOverrides,
}

impl Config {
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
                let root = key.split(['.', '[']).next().unwrap_or("").to_string();
                if from_flags.contains(&root) || file.is_none() {
                    return ConfigError {
                        file: None,
                        flag: Some(format!("--{}", root.replace('_', "-"))),
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
            dry_run: Some(self.dry_run),
            networks: self.networks.clone(),
            replies: Some(self.replies.clone()),
        };
        toml::to_string(&s).expect("settings serialise")
    }
}

impl Settings {
    /// The top-level keys these settings give a value to (the flags an operator passed).
    fn keys_set(&self) -> Vec<String> {
        match toml::Value::try_from(self) {
            Ok(toml::Value::Table(t)) => t.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }
}

/// The line on which `key` is set in a TOML `text`: a `key =` line, or the `[key]` or
/// `[[key]]` table header (`network` for `[[network]]`).
fn line_of(text: &str, key: &str) -> Option<usize> {
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

/// The toml error's own message plus the line it points at, without its multi-line snippet.
fn toml_reason(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim_end().to_string();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{msg} (line {line})")
        }
        None => msg,
    }
}

/// The kernel's host name, from uname(2): no /proc, which systemd's ProcSubset=pid hides.
fn system_hostname() -> Result<String, String> {
    let name = rustix::system::uname();
    let name = name
        .nodename()
        .to_str()
        .map_err(|_| "it is not UTF-8".to_string())?;
    Ok(name.trim().to_string())
}

#[cfg(test)]
mod tests;
