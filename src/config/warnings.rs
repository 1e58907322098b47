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
mod tests {
    use super::*;
    use crate::config::Settings;

    fn config(toml: &str) -> Config {
        Settings::from_toml(&format!("hostname = \"mx.t\"\n{toml}"))
            .unwrap()
            .validate(None)
            .unwrap()
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn a_local_backend_without_the_client_address_warns_of_relaying() {
        for backend in [
            "127.0.0.1:2525",
            "10.1.2.3:25",
            "192.168.0.9:25",
            "[fd00::1]:25",
            "0.0.0.0:2525",
            "[::]:2525",
            "[::ffff:127.0.0.1]:2525",
        ] {
            let w = warnings(
                &config(&format!("backend = \"{backend}\"")),
                &addrs(&["0.0.0.0:25"]),
            );
            assert_eq!(w.len(), 1, "{backend}: {w:?}");
            assert!(w[0].contains("mynetworks"), "{w:?}");
            if backend.contains("127.0.0.1") {
                assert!(w[0].contains("(loopback)"), "{w:?}");
            }
        }
        for safe in [
            "backend = \"192.0.2.10:25\"",
            "backend = \"127.0.0.1:2525\"\nproxy_protocol = \"v2\"",
            "backend = \"127.0.0.1:2525\"\ntransparent = true",
        ] {
            assert!(
                warnings(&config(safe), &addrs(&["127.0.0.1:25"])).is_empty(),
                "{safe}"
            );
        }
    }

    #[test]
    fn a_backend_that_does_not_trust_mxgate_settles_the_relay_warning() {
        let listen = addrs(&["0.0.0.0:25"]);
        let trusting = config("backend = \"127.0.0.1:2525\"\nbackend_trusts_mxgate = true");
        let w = warnings(&trusting, &listen);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("backend_trusts_mxgate = false"), "{w:?}");
        let scoped = config("backend = \"127.0.0.1:2525\"\nbackend_trusts_mxgate = false");
        assert_eq!(warnings(&scoped, &listen), Vec::<String>::new());
    }

    #[test]
    fn a_password_every_user_can_read_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mxgate-perm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("mxgate.toml");
        let text = "backend = \"127.0.0.1:2525\"\nhostname = \"mx.t\"\n[cluster]\n\
                    instance = \"a\"\nredis = \"redis://:pw@127.0.0.1:6379/0\"\n";
        std::fs::write(&file, text).unwrap();
        let c = Settings::from_toml(text).unwrap().validate(None).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let w = file_warnings(&file, &c);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("readable by every user"), "{w:?}");
        assert!(
            !w[0].contains("pw@"),
            "the password itself is never printed: {w:?}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(file_warnings(&file, &c), Vec::<String>::new());
        // Without a password in the URL, a readable file is fine.
        let plain = config("backend = \"127.0.0.1:2525\"");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(file_warnings(&file, &plain), Vec::<String>::new());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_transparent_listener_without_a_backend_of_its_family_warns() {
        let c = config("backend = \"127.0.0.1:2525\"\ntransparent = true");
        let w = warnings(&c, &addrs(&["127.0.0.1:25", "[::1]:25"]));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("IPv6 listener but no IPv6 backend"), "{w:?}");
        assert!(warnings(&c, &addrs(&["127.0.0.1:25"])).is_empty());
    }
}
