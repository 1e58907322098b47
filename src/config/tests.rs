//! Unit tests of parsing, merging and validation.

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
    let base = || Settings::from_toml("backend = \"127.0.0.1:25\"\nhostname = \"mx.t\"").unwrap();
    let cases: [(Settings, &str); 6] = [
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
                backend: Vec::new(),
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
        (
            Settings {
                half_close_timeout: Some(Dur(Duration::ZERO)),
                ..base()
            },
            "half_close_timeout",
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
