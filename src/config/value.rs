//! Small value types that both the command line and the TOML file accept.
//!
//! Each type parses through `FromStr`, so a flag and its config key can never disagree about
//! what a valid value is. Nothing here knows which key a value came from: callers add that.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Implements `Deserialize` through `FromStr`, so serde errors carry the same text as flag errors.
macro_rules! deserialize_from_str {
    ($ty:ty) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(de::Error::custom)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}

/// A duration written as a whole number and a unit: `500ms`, `5s`, `10m`, `1h`; or `0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        if digits.is_empty() {
            return Err(format!(
                "invalid duration {s:?}: expected a number and a unit, such as 500ms, 5s or 10m"
            ));
        }
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            // Zero is zero in any unit: `queue_timeout = "0"` turns the queue off.
            "" if n == 0 => Duration::ZERO,
            "" => {
                return Err(format!(
                    "invalid duration {s:?}: missing unit (ms, s, m or h)"
                ))
            }
            other => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {other:?} (use ms, s, m or h)"
                ))
            }
        };
        Ok(Dur(d))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            _ if ms.is_multiple_of(3_600_000) && ms > 0 => write!(f, "{}h", ms / 3_600_000),
            _ if ms.is_multiple_of(60_000) && ms > 0 => write!(f, "{}m", ms / 60_000),
            _ if ms.is_multiple_of(1000) => write!(f, "{}s", ms / 1000),
            _ => write!(f, "{ms}ms"),
        }
    }
}
deserialize_from_str!(Dur);

/// A `host:port` or `ip:port` to connect to. Names are resolved once, when the config is loaded,
/// so a DNS failure is a config error rather than a per-connection one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    /// What the operator wrote, kept for logs and for `mxgate check`.
    pub text: String,
    /// The first address it resolved to.
    pub addr: SocketAddr,
}

impl FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(HostPort {
                text: s.to_string(),
                addr,
            });
        }
        if !s.contains(':') {
            return Err(format!("invalid address {s:?}: expected HOST:PORT"));
        }
        if is_placeholder(s) {
            return Err(format!(
                "{s:?} is a placeholder under the reserved .invalid domain, which never \
                 resolves: set backend to your mail server's HOST:PORT (for Exchange, the \
                 address and port of its Internet-facing receive connector)"
            ));
        }
        let addr = s
            .to_socket_addrs()
            .map_err(|e| format!("invalid address {s:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("invalid address {s:?}: the name has no address"))?;
        Ok(HostPort {
            text: s.to_string(),
            addr,
        })
    }
}

/// Whether `host:port` names a host under `.invalid` (RFC 2606): the shipped config's
/// placeholder, which must never pass for a configured backend.
fn is_placeholder(host_port: &str) -> bool {
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "invalid" || host.ends_with(".invalid")
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}
deserialize_from_str!(HostPort);

/// Where the metrics endpoint listens, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Off,
    On(SocketAddr),
}

impl FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(MetricsAddr::Off);
        }
        s.parse()
            .map(MetricsAddr::On)
            .map_err(|_| format!("invalid metrics address {s:?}: expected IP:PORT or off"))
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsAddr::Off => f.write_str("off"),
            MetricsAddr::On(a) => write!(f, "{a}"),
        }
    }
}
deserialize_from_str!(MetricsAddr);

/// A listening address. Only literal addresses: binding to a name is ambiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(ListenAddr).map_err(|_| {
            format!("invalid listen address {s:?}: expected IP:PORT, such as 0.0.0.0:25 or [::]:25")
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
deserialize_from_str!(ListenAddr);

/// A complete SMTP reply line that replaces one of mxgate's own, without its CRLF.
///
/// It must be one line of printable ASCII that starts with a 4xx or 5xx code and a space, because
/// a client reads anything else as a protocol error or, worse, as acceptance.
/// `{hostname}` is replaced by the configured host name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyText(pub String);

/// RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets including its CRLF.
const MAX_REPLY_LINE: usize = 510;

impl FromStr for ReplyText {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.contains(['\r', '\n']) {
            return Err("invalid reply: it must be a single line".into());
        }
        if let Some(c) = s.chars().find(|c| !(' '..='~').contains(c)) {
            return Err(format!(
                "invalid reply {s:?}: character {c:?} is not printable ASCII"
            ));
        }
        let b = s.as_bytes();
        let code_ok = b.len() >= 4
            && (b[0] == b'4' || b[0] == b'5')
            && b[1].is_ascii_digit()
            && b[2].is_ascii_digit()
            && b[3] == b' ';
        if !code_ok {
            return Err(format!(
                "invalid reply {s:?}: it must start with a 4xx or 5xx code followed by a space"
            ));
        }
        if s.len() > MAX_REPLY_LINE {
            return Err(format!(
                "invalid reply: {} characters, more than the {MAX_REPLY_LINE} SMTP allows",
                s.len()
            ));
        }
        Ok(ReplyText(s.to_string()))
    }
}

impl fmt::Display for ReplyText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
deserialize_from_str!(ReplyText);

/// A size in bytes: `4096`, `64KiB`, `1MiB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: usize = digits.parse().map_err(|_| {
            format!("invalid size {s:?}: expected bytes, such as 65536, 64KiB or 1MiB")
        })?;
        let mult = match unit {
            "" | "B" => 1,
            "KiB" | "K" => 1024,
            "MiB" | "M" => 1024 * 1024,
            other => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {other:?} (use KiB or MiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            n if n > 0 && n % (1024 * 1024) == 0 => write!(f, "{}MiB", n / (1024 * 1024)),
            n if n > 0 && n % 1024 == 0 => write!(f, "{}KiB", n / 1024),
            n => write!(f, "{n}"),
        }
    }
}
deserialize_from_str!(ByteSize);

/// A network in CIDR form. A bare address means that one address. Host bits must be zero, so
/// `192.0.2.5/24` is refused rather than silently read as `192.0.2.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr(pub ipnet::IpNet);

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            return Ok(Cidr(ipnet::IpNet::from(ip)));
        }
        let net: ipnet::IpNet = s
            .parse()
            .map_err(|_| format!("invalid network {s:?}: expected CIDR such as 192.0.2.0/24"))?;
        if net.trunc() != net {
            return Err(format!(
                "invalid network {s:?}: host bits are set; did you mean {}?",
                net.trunc()
            ));
        }
        Ok(Cidr(net))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
deserialize_from_str!(Cidr);

/// A connection rate: `30/min`, `5/s`, `100/h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid rate {s:?}: expected N/s, N/min or N/h, such as 30/min");
        let (n, unit) = s.split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(format!("invalid rate {s:?}: the count must be at least 1"));
        }
        let per = match unit.trim() {
            "s" | "sec" => Duration::from_secs(1),
            "m" | "min" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}
deserialize_from_str!(Rate);

/// A domain name as it may appear first in an SMTP greeting (RFC 5321 §4.3.1).
pub fn validate_hostname(s: &str) -> Result<(), String> {
    let ok_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if s.is_empty() || s.len() > 253 || !s.trim_end_matches('.').split('.').all(ok_label) {
        return Err(format!(
            "invalid host name {s:?}: expected a domain name such as mx.example.com"
        ));
    }
    Ok(())
}

mod backend;

pub use backend::{one_or_many, BackendSpec};

#[cfg(test)]
mod tests;
