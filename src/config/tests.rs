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

#[test]
fn values_past_their_range_are_refused_naming_the_key() {
    let cases = [
        (
            "rate_per_source = \"2000000000/s\"",
            "rate_per_source",
            "faster than",
        ),
        (
            "rate_per_source = \"1000001/s\"",
            "rate_per_source",
            "faster than",
        ),
        (
            "rate_per_source = \"60000000/h\"",
            "rate_per_source",
            "burst",
        ),
        (
            "rate_per_source = \"10/s\"\nrate_burst = 4000000000",
            "rate_burst",
            "more than 1000000",
        ),
        (
            "connect_timeout = \"18446744073709551615s\"",
            "connect_timeout",
            "longer than",
        ),
        ("idle_timeout = \"25h\"", "idle_timeout", "longer than"),
        ("drain_timeout = \"99999h\"", "drain_timeout", "longer than"),
        (
            "backend_greeting_timeout = \"90000s\"",
            "backend_greeting_timeout",
            "longer than",
        ),
        (
            "max_connections = 1000001",
            "max_connections",
            "more than 1000000",
        ),
        (
            "max_per_ipv6_network = 0",
            "max_per_ipv6_network",
            "at least 1",
        ),
        ("max_per_source = 2000000", "max_per_source", "more than"),
        (
            "max_per_ipv6_network = 1000001",
            "max_per_ipv6_network",
            "more than",
        ),
        ("fall = 0", "fall", "1..=1000"),
        ("rise = 4294967295", "rise", "1..=1000"),
        (
            "[[network]]\ncidr = \"192.0.2.0/24\"\nmax_per_source = 2000000",
            "max_per_source",
            "more than",
        ),
        (
            "ipv6_network_prefix = 129",
            "ipv6_network_prefix",
            "0..=128",
        ),
        (
            "[[network]]\ncidr = \"192.0.2.0/24\"\nrate_per_source = \"5000000/s\"",
            "rate_per_source",
            "faster than",
        ),
    ];
    for (toml, key, why) in cases {
        let text = format!("backend = \"127.0.0.1:25\"\nhostname = \"mx.t\"\n{toml}");
        let e = Settings::from_toml(&text)
            .unwrap()
            .validate(None)
            .expect_err(toml);
        assert!(e.key.ends_with(key), "{toml}: key {} ({})", e.key, e.reason);
        assert!(e.reason.contains(why), "{toml}: {}", e.reason);
    }
    // The edges themselves are accepted.
    for toml in [
        "rate_per_source = \"1000000/s\"\nrate_burst = 1000000",
        "connect_timeout = \"24h\"",
        "max_connections = 1000000",
    ] {
        let text = format!("backend = \"127.0.0.1:25\"\nhostname = \"mx.t\"\n{toml}");
        Settings::from_toml(&text)
            .unwrap()
            .validate(None)
            .expect(toml);
    }
}

#[test]
fn the_default_ipv6_network_tier_is_a_tenth_of_the_global_limit_per_48() {
    let c = Settings::from_toml("backend = \"127.0.0.1:25\"\nhostname = \"mx.t\"")
        .unwrap()
        .validate(None)
        .unwrap();
    assert_eq!((c.ipv6_network_prefix, c.max_per_ipv6_network), (48, 100));
    let shown = c.to_toml();
    assert!(shown.contains("ipv6_network_prefix = 48\n"), "{shown}");
    assert!(shown.contains("max_per_ipv6_network = 100\n"), "{shown}");
    let c =
        Settings::from_toml("backend = \"127.0.0.1:25\"\nhostname = \"mx.t\"\nmax_connections = 5")
            .unwrap()
            .validate(None)
            .unwrap();
    assert_eq!(c.max_per_ipv6_network, 1, "never zero");
}

#[test]
fn the_queue_defaults_to_30s_and_five_times_max_connections_and_is_bounded() {
    let c = Settings::from_toml(
        "backend = \"127.0.0.1:25\"\nhostname = \"mx.t\"\nmax_connections = 40",
    )
    .unwrap()
    .validate(None)
    .unwrap();
    assert_eq!(
        (c.queue_timeout, c.max_queued),
        (Duration::from_secs(30), 200)
    );
    // In front of a backend that takes 20, a burst of 100 waits: 20 slots, 80 in the queue.
    let burst = Settings::from_toml(
        "backend = \"127.0.0.1:25\"\nhostname = \"mx.t\"\nmax_connections = 20",
    )
    .unwrap()
    .validate(None)
    .unwrap();
    assert!(burst.max_connections + burst.max_queued >= 100);
    // The default stays within the largest value the key accepts.
    let most = Settings::from_toml(
        "backend = \"127.0.0.1:25\"\nhostname = \"mx.t\"\nmax_connections = 1000000",
    )
    .unwrap()
    .validate(None)
    .unwrap();
    assert_eq!(most.max_queued, MAX_CONNECTIONS);
    let off = Settings::from_toml(
        "backend = \"127.0.0.1:25\"\nhostname = \"mx.t\"\nqueue_timeout = \"0\"\nmax_queued = 5",
    )
    .unwrap()
    .validate(None)
    .unwrap();
    assert_eq!((off.queue_timeout, off.max_queued), (Duration::ZERO, 5));
    // The pregreet test's room follows the queue's, and a config with no queue stays valid
    // under drop (the hostile run found it refused: the default inherited max_queued's 0).
    assert_eq!(off.pregreet.max_clients, 5);
    let no_queue = Settings::from_toml(
        "backend = \"127.0.0.1:25\"\nhostname = \"mx.t\"\nmax_queued = 0\npregreet = \"drop\"",
    )
    .unwrap()
    .validate(None)
    .unwrap();
    assert_eq!((no_queue.max_queued, no_queue.pregreet.max_clients), (0, 1));
    for (toml, key, reason) in [
        (
            "queue_timeout = \"6m\"",
            "queue_timeout",
            "6m is more than 5m: a client waits at most 5 minutes for the greeting (RFC 5321 section 4.5.3.2)",
        ),
        ("max_queued = 1000001", "max_queued", "1000001 is more than 1000000"),
    ] {
        let text = format!("backend = \"127.0.0.1:25\"\nhostname = \"mx.t\"\n{toml}");
        let e = Settings::from_toml(&text).unwrap().validate(None).unwrap_err();
        assert_eq!((e.key.as_str(), e.reason.as_str()), (key, reason), "{toml}");
    }
}

#[test]
fn a_learned_backend_limit_is_written_auto_as_flag_and_key_and_bounded() {
    let flag: BackendSpec = "127.0.0.1:25,max_connections=auto".parse().unwrap();
    assert!(flag.auto && flag.max_connections.is_none());
    assert_eq!(flag.to_string(), "127.0.0.1:25,max_connections=auto");
    let c = Settings::from_toml(
        r#"
        max_connections = 200
        adaptive_min = 8
        backends = [{ address = "127.0.0.1:25", max_connections = "auto" }]
        "#,
    )
    .unwrap()
    .validate(None)
    .unwrap();
    assert!(c.backends[0].auto);
    // The initial limit defaults to the minimum; both survive `check`'s output.
    assert_eq!((c.adaptive_min, c.adaptive_initial), (8, 8));
    let again = Settings::from_toml(&c.to_toml())
        .unwrap()
        .validate(None)
        .unwrap();
    assert!(again.backends[0].auto);
    assert_eq!(again.to_toml(), c.to_toml());
    // A word that is not "auto", and bounds past the global limit, name the key.
    let (key, reason) =
        parse_err(r#"backends = [{ address = "127.0.0.1:25", max_connections = "lots" }]"#);
    assert_eq!(key, "backends[0]");
    assert!(reason.contains("expected a number or \"auto\""), "{reason}");
    for (text, key) in [
        ("max_connections = 10\nadaptive_min = 11", "adaptive_min"),
        ("adaptive_min = 0", "adaptive_min"),
        ("adaptive_min = 5\nadaptive_initial = 4", "adaptive_initial"),
    ] {
        let err = Settings::from_toml(&format!("backend = \"127.0.0.1:25\"\n{text}"))
            .unwrap()
            .validate(None)
            .expect_err(text);
        assert_eq!(err.key, key, "{text}");
    }
}

#[test]
fn the_cluster_table_is_checked_and_named_by_flag_or_file_line() {
    let c = Settings::from_toml(
        "backend = \"127.0.0.1:25\"\nhostname = \"mx1.example\"\n[cluster]\nredis = \"redis://:s3cret@127.0.0.1:6379/0\"\n",
    )
    .unwrap()
    .validate(None)
    .unwrap();
    let cluster = c.cluster.clone().unwrap();
    // The instance defaults to the system's host name, not the name in mxgate's replies
    // (hosts behind one MX often share that); the rest to the documented defaults.
    assert_eq!(cluster.instance, super::system_hostname().unwrap());
    assert_ne!(cluster.instance, "mx1.example");
    assert_eq!(cluster.name, "mxgate");
    assert_eq!(cluster.lease_ttl, Duration::from_secs(10));
    assert_eq!(cluster.fallback_share, 0.5);
    assert_eq!(cluster.admission_timeout, Duration::from_millis(50));
    // `mxgate check` prints the table without the password.
    let printed = c.to_toml();
    assert!(printed.contains("[cluster]"), "{printed}");
    assert!(
        printed.contains("redis://***@127.0.0.1:6379/0"),
        "{printed}"
    );
    assert!(!printed.contains("s3cret"), "{printed}");
    // A unix socket's password is a query value.
    assert_eq!(
        crate::config::redact("unix:///run/redis.sock?db=1&pass=hunter2"),
        "unix:///run/redis.sock?db=1&pass=***"
    );
    assert_eq!(
        crate::config::redact("redis://u:pw@h:1/0"),
        "redis://***@h:1/0"
    );
    // No table, no cluster.
    let alone = Settings::from_toml("backend = \"127.0.0.1:25\"")
        .unwrap()
        .validate(None)
        .unwrap();
    assert!(alone.cluster.is_none());

    for (table, key, reason) in [
        ("name = \"x\"", "cluster.redis", "needs redis"),
        ("redis = \"http://x\"", "cluster.redis", "not a redis://"),
        (
            "redis = \"redis://h\"\nfallback_share = 0.0",
            "cluster.fallback_share",
            "above 0",
        ),
        (
            "redis = \"redis://h\"\nfallback_share = 1.5",
            "cluster.fallback_share",
            "at most 1",
        ),
        (
            "redis = \"redis://h\"\nlease_ttl = \"2s\"",
            "cluster.lease_ttl",
            "at least 3s",
        ),
        (
            "redis = \"redis://h\"\nadmission_timeout = \"1ms\"",
            "cluster.admission_timeout",
            "at least 5ms",
        ),
        (
            "redis = \"redis://h\"\nname = \"a:b\"",
            "cluster.name",
            "characters",
        ),
        (
            "redis = \"redis://h\"\ninstance = \"\"",
            "cluster.instance",
            "characters",
        ),
        (
            "redis = \"redis://h\"\nadmission_timeout = \"6s\"",
            "cluster.admission_timeout",
            "at most 5s",
        ),
        (
            "redis = \"redis://h\"\nleases = 3",
            "cluster.leases",
            "unknown field",
        ),
    ] {
        let text = format!("backend = \"127.0.0.1:25\"\n[cluster]\n{table}\n");
        let e = match Settings::from_toml(&text) {
            Ok(s) => s.validate(None).unwrap_err(),
            Err((key, reason)) => ConfigError {
                file: None,
                key,
                reason,
                line: None,
                flag: None,
            },
        };
        assert_eq!(e.key, key, "{table}");
        assert!(e.reason.contains(reason), "{table}: {}", e.reason);
    }

    // From the file: the file and the line of the key inside the table.
    let dir = std::env::temp_dir().join(format!("mxgate-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mxgate.toml");
    std::fs::write(
        &path,
        "backend = \"127.0.0.1:25\"\n\n[cluster]\nredis = \"redis://h\"\nfallback_share = 2\n",
    )
    .unwrap();
    let e = Config::load(Some(&path), Settings::default()).unwrap_err();
    assert_eq!(
        (e.key.as_str(), e.line, e.flag.as_deref()),
        ("cluster.fallback_share", Some(5), None)
    );
    // From a flag: the flag's own name.
    let flags = Settings {
        cluster: crate::config::ClusterSettings {
            fallback_share: Some(0.0),
            ..Default::default()
        },
        ..Settings::default()
    };
    let e = Config::load(Some(&path), flags).unwrap_err();
    assert_eq!(e.flag.as_deref(), Some("--cluster-fallback-share"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
