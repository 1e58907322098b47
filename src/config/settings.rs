//! The raw settings: one struct that is both the clap flag set and the TOML schema, so every
//! flag has the same key in the file by construction. Everything here is optional; nothing is
//! checked until [`Settings::validate`] turns it into a [`Config`](super::Config).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::value::{self, BackendSpec, ByteSize, Cidr, Dur, ListenAddr, MetricsAddr, Rate};
use super::{Balance, ConfigError, Forwarding, LogFormat, NetworkRule, ReplyOverrides};

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
    // The doc comment is clap's help text: its brackets are flag syntax, not links.
    #[allow(rustdoc::broken_intra_doc_links)]
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

    /// How new sessions are spread over several backends: least_connections (also spelt
    /// least-connections) or first [default: least_connections]
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
    /// CAP_NET_ADMIN and policy routing, see docs/deploy-exchange.md) [default: false]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transparent: Option<bool>,

    /// With --transparent, keep the client's source port as well [default: false]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transparent_port: Option<bool>,

    /// Send a PROXY protocol header (v1 or v2) to the backend before any client byte
    /// [default: none]
    #[arg(long, value_name = "VERSION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<crate::proxy_protocol::Version>,

    /// Networks of upstream load balancers that send a PROXY protocol header; repeatable.
    /// When set, every connection must come from one of them and carry a header, and the
    /// header's address is the client's for allow, deny and reserved_for_allowed too [default: none]
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

    /// Network exempt from the per-source and rate limits; repeatable [default: none]
    #[arg(long, value_name = "CIDR")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Cidr>,

    /// Network greeted with 554 and never forwarded; repeatable [default: none]
    #[arg(long, value_name = "CIDR")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Cidr>,

    /// How long a client that finds the server full may wait, without a greeting, for a slot
    /// before it gets the 421; 0 turns the queue off [default: 30s]
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_timeout: Option<Dur>,

    /// How many clients may wait in the queue at once; past it a newcomer gets the 421 at once.
    /// Held lower while the descriptor limit cannot hold it [default: 5 × max_connections]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<usize>,

    /// The lowest limit learned for a backend with `max_connections=auto` [default: 5]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive_min: Option<usize>,

    /// Where a learned backend limit starts [default: adaptive_min]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive_initial: Option<usize>,

    /// Directory where learned backend limits are kept across restarts; "" turns it off
    /// [default: $STATE_DIRECTORY (systemd's StateDirectory=) when set, otherwise off]
    // Parsed as any OS string: clap's path parser refuses the empty value that turns it off.
    #[arg(long, value_name = "DIR", value_parser = clap::builder::TypedValueParser::map(clap::builder::OsStringValueParser::new(), std::path::PathBuf::from))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<std::path::PathBuf>,

    /// The pregreet test (postscreen's): mxgate sends `220-{hostname} ESMTP` first and waits;
    /// a client that speaks before the greeting ends fails. ignore: test, log and count only
    /// (a dry run); enforce: 550 to every command; drop: 521 and close; off: no test at all
    /// [default: ignore]
    #[arg(long, value_name = "ACTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pregreet: Option<crate::config::Pregreet>,

    /// How long the pregreet test watches a new client before the backend is asked
    /// [default: 6s]
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pregreet_wait: Option<Dur>,

    /// The pregreet test's wait while clients wait in the queue [default: 2s]
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pregreet_wait_busy: Option<Dur>,

    /// How long a source that passed the pregreet test skips it [default: 24h]
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pregreet_pass_ttl: Option<Dur>,

    /// How long a source that failed the pregreet test is refused at connect [default: 10m]
    #[arg(long, value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pregreet_fail_ttl: Option<Dur>,

    /// How many clients may be under the pregreet test at once (each holds a descriptor and
    /// no slot); past it, enforce and drop answer a new client with the global-limit 421
    /// (counted as queue_full), and ignore serves it untested. Held lower while the
    /// descriptor limit cannot hold it [default: max_queued, at least 1]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pregreet_max_clients: Option<usize>,

    /// Global slots kept for allowed networks only [default: 0]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_for_allowed: Option<usize>,

    /// Evaluate every limit and count would-be rejections, but forward every connection
    /// [default: false]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,

    /// Whether the backend may trust mxgate's own address for relaying. Leave it true until
    /// the backend's relay trust (Postfix mynetworks, an Exchange receive connector's
    /// RemoteIPRanges) is scoped so that connections from mxgate are not trusted; then set
    /// false to silence the open-relay warning [default: true]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_trusts_mxgate: Option<bool>,

    /// Serve the live view (`/status` and the page at `/`) on the metrics listener; it shows
    /// client addresses [default: true]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<bool>,

    /// Host names, besides the metrics listen address and localhost, under which `/status` and
    /// the page may be asked for (any other Host header gets 403, against DNS rebinding);
    /// repeatable [default: none]
    #[arg(long, value_name = "NAME")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_hosts: Vec<String>,

    /// Shared limits across several mxgate hosts (`[cluster]`)
    #[command(flatten)]
    #[serde(default, skip_serializing_if = "ClusterSettings::is_empty")]
    pub cluster: ClusterSettings,

    /// Per-network overrides (file only, `[[network]]`)
    #[arg(skip)]
    #[serde(default, rename = "network", skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NetworkRule>,

    /// Reply lines that replace mxgate's own (file only)
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replies: Option<ReplyOverrides>,
}

/// The `[cluster]` table: with `redis` set, the global, per-source and per-network limits hold
/// across every instance that shares the store and `name`.
#[derive(Clone, Debug, Default, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// Share the limits with other instances through this Redis: redis://HOST:PORT/DB, or
    /// unix:///PATH?db=N [default: none, each instance counts alone]
    #[arg(long = "cluster-redis", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<String>,

    /// Namespaces the cluster's keys: instances with the same name share limits [default: mxgate]
    #[arg(long = "cluster-name", value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,

    /// A file holding the Redis password (one line), kept out of the URL and of the config
    /// file. A bare name is a systemd credential: `$CREDENTIALS_DIRECTORY/NAME`, as
    /// `LoadCredential=NAME:/path` in the unit provides it [default: none]
    #[arg(long = "cluster-password-file", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<std::path::PathBuf>,

    /// This instance's name in the cluster; unique per host [default: the system host name]
    #[arg(long = "cluster-instance", value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,

    /// How long a dead instance's slots stay counted before they return [default: 10s]
    #[arg(long = "cluster-lease-ttl", value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ttl: Option<Dur>,

    /// The fraction of each limit this instance enforces alone while Redis is unreachable
    /// [default: 0.5]
    #[arg(long = "cluster-fallback-share", value_name = "FRACTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_share: Option<f64>,

    /// How long one admission waits for Redis before the fallback share decides [default: 50ms]
    #[arg(long = "cluster-admission-timeout", value_name = "DUR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admission_timeout: Option<Dur>,
}

impl ClusterSettings {
    pub fn is_empty(&self) -> bool {
        *self == ClusterSettings::default()
    }

    /// Overlays `over`: every value it sets wins.
    fn merge(&mut self, over: ClusterSettings) {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f; } )* };
        }
        take!(
            redis,
            password_file,
            name,
            instance,
            lease_ttl,
            fallback_share,
            admission_timeout
        );
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
        if !over.status_hosts.is_empty() {
            self.status_hosts = over.status_hosts;
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
        self.cluster.merge(over.cluster);
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
            adaptive_min,
            adaptive_initial,
            state_dir,
            dry_run,
            backend_trusts_mxgate,
            status,
            replies,
            pregreet,
            pregreet_wait,
            pregreet_wait_busy,
            pregreet_pass_ttl,
            pregreet_fail_ttl,
            pregreet_max_clients
        );
        self
    }
}

impl Settings {
    /// The top-level keys these settings give a value to (the flags an operator passed).
    pub(super) fn keys_set(&self) -> Vec<String> {
        let Ok(toml::Value::Table(t)) = toml::Value::try_from(self) else {
            return Vec::new();
        };
        let mut keys = Vec::new();
        for (key, value) in t {
            // A table's keys are named with it (`cluster.redis`), as the errors name them.
            match (key.as_str(), value) {
                ("cluster", toml::Value::Table(inner)) => {
                    keys.extend(inner.keys().map(|k| format!("cluster.{k}")))
                }
                _ => keys.push(key),
            }
        }
        keys
    }
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
