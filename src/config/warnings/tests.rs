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
