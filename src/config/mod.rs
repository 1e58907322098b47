//! Configuration: the flags, the TOML file, their merge, and validation into a typed [`Config`].
//!
//! One struct, [`Settings`], is both the clap flag set and the TOML schema, so every flag has the
//! same key in the file by construction. Loading goes in two stages, as in ripgrep: raw
//! `Settings` (all optional) from the file and from the flags, merged with flags winning, then
//! [`Settings::validate`] into a `Config` in which every value is checked and every default filled.
//! Nothing here binds a socket: a bad config is rejected before anything is opened.

pub mod value;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

pub use value::{ByteSize, Dur, HostPort, ListenAddr, MetricsAddr, ReplyText};

/// Defaults, quoted by the README. Exchange's MaxInboundConnectionPerSource is 20.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:25";
pub const DEFAULT_MAX_CONNECTIONS: usize = 1000;
pub const DEFAULT_MAX_PER_SOURCE: usize = 20;
pub const DEFAULT_IPV4_PREFIX: u8 = 32;
pub const DEFAULT_IPV6_PREFIX: u8 = 64;
pub const DEFAULT_METRICS: &str = "127.0.0.1:9925";
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_PIPE_SIZE: usize = 1024 * 1024;

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
}

/// Every setting, each optional: what one source (flags or file) said.
#[derive(Clone, Debug, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to accept clients on; repeat for several (IPv4 and IPv6) [default: 0.0.0.0:25]
    #[arg(long, value_name = "ADDR")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<ListenAddr>,

    /// The mail server to forward admitted clients to (HOST:PORT)
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<HostPort>,

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
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(p) => write!(f, "config file {}", p.display())?,
            None => f.write_str("command line")?,
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl Settings {
    /// Reads and parses a TOML file. Unknown keys and ill-typed values are errors naming the key.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let err = |key: String, reason: String| ConfigError {
            file: Some(path.to_path_buf()),
            key,
            reason,
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
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f; } )* };
        }
        take!(
            backend,
            max_connections,
            max_per_source,
            ipv4_prefix,
            ipv6_prefix,
            hostname,
            metrics,
            connect_timeout,
            idle_timeout,
            log_format,
            forwarding,
            pipe_size,
            replies
        );
        self
    }

    /// Checks every value and fills every default. `file` only labels the errors.
    pub fn validate(self, file: Option<&Path>) -> Result<Config, ConfigError> {
        let err = |key: &str, reason: String| ConfigError {
            file: file.map(Path::to_path_buf),
            key: key.to_string(),
            reason,
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
        let backend = self.backend.ok_or_else(|| {
            err(
                "backend",
                "is required: the mail server to forward to".into(),
            )
        })?;
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
        let connect_timeout = self
            .connect_timeout
            .map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0);
        if connect_timeout.is_zero() {
            return Err(err("connect_timeout", "must be more than zero".into()));
        }
        let idle_timeout = self.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0);
        if idle_timeout.is_zero() {
            return Err(err("idle_timeout", "must be more than zero".into()));
        }
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
        Ok(Config {
            forwarding,
            pipe_size,
            listen,
            backend,
            max_connections: self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            max_per_source: self.max_per_source.unwrap_or(DEFAULT_MAX_PER_SOURCE),
            ipv4_prefix,
            ipv6_prefix,
            hostname,
            metrics,
            connect_timeout,
            idle_timeout,
            log_format: self.log_format.unwrap_or_default(),
            replies: self.replies.unwrap_or_default(),
        })
    }
}

/// The effective, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub backend: HostPort,
    pub max_connections: usize,
    pub max_per_source: usize,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    pub hostname: String,
    /// `None` when the endpoint is off.
    pub metrics: Option<SocketAddr>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub log_format: LogFormat,
    pub forwarding: Forwarding,
    /// Bytes asked for each splice pipe.
    pub pipe_size: usize,
    pub replies: ReplyOverrides,
}

impl Config {
    /// Loads the file (if any), overlays the flags, and validates the result.
    pub fn load(file: Option<&Path>, flags: Settings) -> Result<Config, ConfigError> {
        let base = match file {
            Some(p) => Settings::from_file(p)?,
            None => Settings::default(),
        };
        // A flag's error names the command line, not the file.
        let merged = base.merge(flags);
        merged.validate(file)
    }

    /// A test-friendly config: listen on loopback port 0, metrics on port 0.
    pub fn for_backend(backend: SocketAddr) -> Config {
        Settings {
            listen: vec![ListenAddr("127.0.0.1:0".parse().expect("literal"))],
            backend: Some(HostPort {
                text: backend.to_string(),
                addr: backend,
            }),
            hostname: Some("mx.test".into()),
            metrics: Some(MetricsAddr::On("127.0.0.1:0".parse().expect("literal"))),
            ..Settings::default()
        }
        .validate(None)
        .expect("the test config is valid")
    }

    /// The effective config as TOML, every key present: what `mxgate check` prints.
    pub fn to_toml(&self) -> String {
        let s = Settings {
            listen: self.listen.iter().copied().map(ListenAddr).collect(),
            backend: Some(self.backend.clone()),
            max_connections: Some(self.max_connections),
            max_per_source: Some(self.max_per_source),
            ipv4_prefix: Some(self.ipv4_prefix),
            ipv6_prefix: Some(self.ipv6_prefix),
            hostname: Some(self.hostname.clone()),
            metrics: Some(self.metrics.map_or(MetricsAddr::Off, MetricsAddr::On)),
            connect_timeout: Some(Dur(self.connect_timeout)),
            idle_timeout: Some(Dur(self.idle_timeout)),
            log_format: Some(self.log_format),
            forwarding: Some(self.forwarding),
            pipe_size: Some(ByteSize(self.pipe_size)),
            replies: Some(self.replies.clone()),
        };
        toml::to_string(&s).expect("settings serialise")
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

fn system_hostname() -> Result<String, String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map_err(|e| e.to_string())?;
    Ok(raw.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> (String, String) {
        Settings::from_toml(text).expect_err("must be rejected")
    }

    #[test]
    fn every_key_parses() {
        let s = Settings::from_toml(
            r#"
            listen = ["127.0.0.1:2525", "[::1]:2525"]
            backend = "127.0.0.1:25"
            max_connections = 30
            max_per_source = 5
            ipv4_prefix = 24
            ipv6_prefix = 48
            hostname = "mx.example.com"
            metrics = "off"
            connect_timeout = "500ms"
            idle_timeout = "5m"
            log_format = "json"
            [replies]
            global_limit = "421 4.3.2 {hostname} busy"
            "#,
        )
        .unwrap();
        let c = s.validate(None).unwrap();
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.max_per_source, 5);
        assert_eq!(c.metrics, None);
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert_eq!(c.log_format, LogFormat::Json);
        // The effective config round-trips through `check`'s output.
        let again = Settings::from_toml(&c.to_toml())
            .unwrap()
            .validate(None)
            .unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("max_conections = 3", "max_conections", "unknown field"),
            ("idle_timeout = \"5x\"", "idle_timeout", "unknown unit"),
            ("backend = \"nowhere\"", "backend", "HOST:PORT"),
            ("listen = [\"1.2.3.4\"]", "listen[0]", "IP:PORT"),
            (
                "max_connections = \"many\"",
                "max_connections",
                "invalid type",
            ),
            (
                "[replies]\nglobal_limit = \"250 ok\"",
                "replies.global_limit",
                "4xx or 5xx",
            ),
            (
                "[replies]\nbogus = \"421 x\"",
                "replies.bogus",
                "unknown field",
            ),
            ("log_format = \"xml\"", "log_format", "xml"),
        ];
        for (text, key, reason) in cases {
            let (k, r) = parse_err(text);
            assert_eq!(k, key, "{text}");
            assert!(r.contains(reason), "{text}: reason {r:?}");
        }
    }

    #[test]
    fn validation_names_the_key() {
        let base =
            || Settings::from_toml("backend = \"127.0.0.1:25\"\nhostname = \"mx.t\"").unwrap();
        let cases: [(Settings, &str); 5] = [
            (
                Settings {
                    ipv4_prefix: Some(33),
                    ..base()
                },
                "ipv4_prefix",
            ),
            (
                Settings {
                    ipv6_prefix: Some(129),
                    ..base()
                },
                "ipv6_prefix",
            ),
            (
                Settings {
                    hostname: Some("a b".into()),
                    ..base()
                },
                "hostname",
            ),
            (
                Settings {
                    backend: None,
                    ..base()
                },
                "backend",
            ),
            (
                Settings {
                    idle_timeout: Some(Dur(Duration::ZERO)),
                    ..base()
                },
                "idle_timeout",
            ),
        ];
        for (s, key) in cases {
            let e = s.validate(Some(Path::new("x.toml"))).unwrap_err();
            assert_eq!(e.key, key);
            assert!(
                e.to_string().starts_with("config file x.toml: key `"),
                "{e}"
            );
        }
    }

    #[test]
    fn flags_override_the_file() {
        let file = Settings::from_toml("max_per_source = 5\nmax_connections = 9").unwrap();
        let flags = Settings {
            max_per_source: Some(7),
            ..Settings::default()
        };
        let m = file.merge(flags);
        assert_eq!(m.max_per_source, Some(7));
        assert_eq!(m.max_connections, Some(9));
    }
}
