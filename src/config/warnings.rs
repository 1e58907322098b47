//! Warnings about a valid config that is probably not what the operator meant: printed by
//! `mxgate check` and logged at start-up, never an error. Nothing here changes the config.

use std::net::{IpAddr, SocketAddr};

use super::Config;

/// Every warning for `config` served on `listen` (the bound or inherited listeners' addresses).
pub fn warnings(config: &Config, listen: &[SocketAddr]) -> Vec<String> {
    let mut out = Vec::new();
    if config.transparent {
        for family in [true, false] {
            let listens = listen.iter().any(|a| a.is_ipv4() == family);
            let backend = config
                .backends
                .iter()
                .any(|b| b.address.addr.is_ipv4() == family);
            if listens && !backend {
                let name = if family { "IPv4" } else { "IPv6" };
                out.push(format!(
                    "transparent mode: an {name} listener but no {name} backend; every {name} \
                     client will get the backend_unavailable reply, since a connection from its \
                     own address can only reach a backend of the same family"
                ));
            }
        }
    }
    if config.backend_trusts_mxgate && !config.transparent && config.proxy_protocol.is_none() {
        for b in &config.backends {
            let ip = b.address.addr.ip().to_canonical();
            if is_local_or_private(ip) {
                out.push(format!(
                    "backend {}: every client will reach it from mxgate's own address ({}), \
                     which mail servers commonly trust for relaying (Postfix's default \
                     mynetworks, Exim's relay_from_hosts, an Exchange receive connector whose \
                     RemoteIPRanges includes it): set proxy_protocol or transparent, or make \
                     sure the backend does not trust that address and then set \
                     backend_trusts_mxgate = false (see docs/security.md, installed in \
                     /usr/share/doc/mxgate/)",
                    b.address,
                    if ip.is_loopback() || ip.is_unspecified() {
                        "loopback"
                    } else {
                        "a private address"
                    }
                ));
            }
        }
    }
    out
}

/// Warnings about the config file itself: a Redis password that every local user can read,
/// in the file's `cluster.redis` URL or in the `cluster.password_file` it names.
pub fn file_warnings(path: &std::path::Path, config: &Config) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let world_readable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
    };
    let mut out = Vec::new();
    let Some(cluster) = &config.cluster else {
        return out;
    };
    match &cluster.password_file {
        Some(file) if file.is_absolute() && world_readable(file) => out.push(format!(
            "cluster.password_file {} is readable by every user: chmod 0640 it, owned by \
             root:mxgate",
            file.display()
        )),
        None if super::redact(&cluster.redis) != cluster.redis && world_readable(path) => {
            out.push(format!(
                "config file {} is readable by every user and its cluster.redis URL holds the \
                 Redis password: chmod 0640 the file (root:mxgate), or move the password to \
                 cluster.password_file",
                path.display()
            ))
        }
        _ => {}
    }
    out
}

/// Loopback (and the unspecified address, which Linux connects to loopback), private (RFC
/// 1918, ULA), link-local or shared (RFC 6598) addresses: the ones a mail server's default
/// relay trust covers.
fn is_local_or_private(ip: IpAddr) -> bool {
    if ip.to_canonical().is_unspecified() {
        return true;
    }
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(a) => {
            let first = a.segments()[0];
            a.is_loopback() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests;
