//! The PROXY protocol (HAProxy's, versions 1 and 2): writing a header toward the backend, and
//! reading one from a trusted upstream load balancer.
//!
//! The parser is strict and bounded: it never looks past [`MAX_HEADER`] bytes, never accepts a
//! header that is not exactly valid, and tells "need more bytes" apart from "invalid". It never
//! panics on any input (a property test feeds it arbitrary bytes). It does no I/O itself;
//! [`read_header`] does the bounded, timed reading around it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes including CRLF (the specification's bound).
pub const V1_MAX: usize = 107;
/// The largest header mxgate accepts: v2's 16-byte prefix plus 520 bytes of addresses and TLVs.
pub const MAX_HEADER: usize = 536;

/// Which version mxgate writes toward the backend.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

/// Why a header was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a PROXY protocol header")]
    Signature,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("PROXY protocol header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("connection closed inside the PROXY protocol header")]
    Truncated,
    #[error("no complete PROXY protocol header in time")]
    Timeout,
    #[error("PROXY protocol header from an untrusted address")]
    Untrusted,
    #[error("reading the PROXY protocol header: {0}")]
    Io(String),
}

/// A complete, valid header.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    /// The original client and the address it connected to; `None` for v1 `UNKNOWN` and v2
    /// `LOCAL`, where the connection's own addresses apply.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// How many bytes the header took.
    pub len: usize,
}

/// Parses a header at the start of `buf`. `Ok(None)`: valid so far, more bytes needed.
pub fn parse(buf: &[u8]) -> Result<Option<Header>, HeaderError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] == b'P' {
        parse_v1(buf)
    } else if buf[0] == b'\r' {
        parse_v2(buf)
    } else {
        Err(HeaderError::Signature)
    }
}

fn parse_v1(buf: &[u8]) -> Result<Option<Header>, HeaderError> {
    const PREFIX: &[u8] = b"PROXY ";
    let n = buf.len().min(PREFIX.len());
    if buf[..n] != PREFIX[..n] {
        return Err(HeaderError::Signature);
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(HeaderError::TooLong);
        }
        // A lone CR or LF anywhere but at the end cannot become valid.
        if window[..window.len().saturating_sub(1)]
            .iter()
            .any(|&b| b == b'\r' || b == b'\n')
            || window.last() == Some(&b'\n')
        {
            return Err(HeaderError::Malformed("stray line break"));
        }
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[PREFIX.len()..end])
        .map_err(|_| HeaderError::Malformed("not ASCII"))?;
    let len = end + 2;
    let mut parts = line.split(' ');
    let proto = parts.next().unwrap_or("");
    if proto == "UNKNOWN" {
        return Ok(Some(Header {
            addresses: None,
            len,
        }));
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(HeaderError::Malformed("expected four fields"));
    };
    let (src, dst): (IpAddr, IpAddr) = match proto {
        "TCP4" => (IpAddr::V4(parse_v4(src)?), IpAddr::V4(parse_v4(dst)?)),
        "TCP6" => (
            IpAddr::V6(
                src.parse::<Ipv6Addr>()
                    .map_err(|_| HeaderError::Malformed("bad IPv6 address"))?,
            ),
            IpAddr::V6(
                dst.parse::<Ipv6Addr>()
                    .map_err(|_| HeaderError::Malformed("bad IPv6 address"))?,
            ),
        ),
        _ => return Err(HeaderError::Malformed("unknown protocol")),
    };
    let addresses = (
        SocketAddr::new(src, parse_port(sport)?),
        SocketAddr::new(dst, parse_port(dport)?),
    );
    Ok(Some(Header {
        addresses: Some(addresses),
        len,
    }))
}

/// Dotted quad only: no shorthand forms, no leading zeros.
fn parse_v4(s: &str) -> Result<Ipv4Addr, HeaderError> {
    let ok = s.split('.').count() == 4
        && s.split('.').all(|o| {
            !o.is_empty()
                && o.len() <= 3
                && o.bytes().all(|b| b.is_ascii_digit())
                && (o == "0" || !o.starts_with('0'))
        });
    if !ok {
        return Err(HeaderError::Malformed("bad IPv4 address"));
    }
    s.parse()
        .map_err(|_| HeaderError::Malformed("bad IPv4 address"))
}

fn parse_port(s: &str) -> Result<u16, HeaderError> {
    let ok = !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    if !ok {
        return Err(HeaderError::Malformed("bad port"));
    }
    s.parse().map_err(|_| HeaderError::Malformed("bad port"))
}

fn parse_v2(buf: &[u8]) -> Result<Option<Header>, HeaderError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(HeaderError::Signature);
    }
    if buf.len() < 16 {
        return Ok(None);
    }
    let (ver_cmd, fam) = (buf[12], buf[13]);
    if ver_cmd >> 4 != 2 {
        return Err(HeaderError::Malformed("version is not 2"));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(HeaderError::Malformed("unknown command")),
    };
    let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + body;
    if len > MAX_HEADER {
        return Err(HeaderError::TooLong);
    }
    // The family must be known before the body arrives, so junk is refused early.
    let need = match fam {
        0x00 => 0,
        0x11 => 12,
        0x21 => 36,
        _ if local => 0,
        _ => return Err(HeaderError::Malformed("unsupported address family")),
    };
    if body < need {
        return Err(HeaderError::Malformed(
            "length too short for the address family",
        ));
    }
    if buf.len() < len {
        return Ok(None);
    }
    if local {
        return Ok(Some(Header {
            addresses: None,
            len,
        }));
    }
    let a = &buf[16..];
    let addresses = match fam {
        0x11 => {
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            )
        }
        0x21 => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            )
        }
        _ => return Err(HeaderError::Malformed("PROXY command without addresses")),
    };
    Ok(Some(Header {
        addresses: Some(addresses),
        len,
    }))
}

/// The header announcing a connection from `src` to `dst`. Mixed families are written as
/// IPv6, with the IPv4 address mapped.
pub fn encode(version: Version, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    match version {
        Version::V1 => {
            let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {proto} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
            .into_bytes()
        }
        Version::V2 => {
            let mut out = Vec::with_capacity(52);
            out.extend_from_slice(&V2_SIGNATURE);
            out.push(0x21);
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11);
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    out.push(0x21);
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&to_v6(s).octets());
                    out.extend_from_slice(&to_v6(d).octets());
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            out
        }
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (s, d) = (canon(src), canon(dst));
    if s.is_ipv4() == d.is_ipv4() {
        (s, d)
    } else {
        let six = |a: SocketAddr| SocketAddr::new(IpAddr::V6(to_v6(a.ip())), a.port());
        (six(s), six(d))
    }
}

/// Reads one header from `stream` within `limit`. Returns it and any bytes that arrived after
/// it, which belong to the client's stream and must be forwarded first.
pub async fn read_header(
    stream: &mut TcpStream,
    limit: Duration,
) -> Result<(Header, Vec<u8>), HeaderError> {
    let mut buf = Vec::with_capacity(MAX_HEADER);
    let read = async {
        let mut chunk = [0u8; MAX_HEADER];
        loop {
            if let Some(h) = parse(&buf)? {
                let rest = buf.split_off(h.len);
                return Ok((h, rest));
            }
            let n = stream
                .read(&mut chunk[..MAX_HEADER - buf.len().min(MAX_HEADER - 1)])
                .await
                .map_err(|e| HeaderError::Io(e.to_string()))?;
            if n == 0 {
                return Err(HeaderError::Truncated);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| HeaderError::Timeout)?
}

#[cfg(test)]
mod tests;
