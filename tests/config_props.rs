//! Property tests of the config: whatever validation accepts builds the runtime state (policy,
//! limiters, replies, backend pool) and admits clients without a panic, and no TOML text, however
//! broken, makes the parser panic.

use std::net::IpAddr;

use mxgate::admission::Admission;
use mxgate::config::Settings;
use mxgate::metrics::Metrics;
use mxgate::policy::{Policy, PolicyClock};
use proptest::prelude::*;

/// A duration as the file writes it, from zero to far past any bound.
fn duration() -> impl Strategy<Value = String> {
    (
        prop_oneof![0u64..100, 0u64..100_000, any::<u64>()],
        prop_oneof![Just("ms"), Just("s"), Just("m"), Just("h")],
    )
        .prop_map(|(n, u)| format!("\"{n}{u}\""))
}

fn rate() -> impl Strategy<Value = String> {
    (
        prop_oneof![1u32..100, 1u32..10_000_000, any::<u32>()],
        prop_oneof![Just("s"), Just("min"), Just("h")],
    )
        .prop_map(|(n, u)| format!("\"{n}/{u}\""))
}

fn count() -> impl Strategy<Value = String> {
    prop_oneof![0u64..50, 0u64..2_000_000, 0u64..(i64::MAX as u64)].prop_map(|n| n.to_string())
}

fn prefix() -> impl Strategy<Value = String> {
    prop_oneof![0u8..=32, 0u8..=128, any::<u8>()].prop_map(|n| n.to_string())
}

fn ipv4() -> impl Strategy<Value = String> {
    any::<[u8; 4]>().prop_map(|o| IpAddr::from(o).to_string())
}

/// A CIDR with its host bits cleared (a set host bit is a documented error, tried too).
fn cidr() -> impl Strategy<Value = String> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(o, l)| {
            let net = ipnet::IpNet::new(IpAddr::from(o), l).unwrap().trunc();
            format!("\"{net}\"")
        }),
        (any::<[u16; 8]>(), 0u8..=128).prop_map(|(s, l)| {
            let net = ipnet::IpNet::new(IpAddr::from(s), l).unwrap().trunc();
            format!("\"{net}\"")
        }),
        (ipv4(), 0u8..=32).prop_map(|(a, l)| format!("\"{a}/{l}\"")),
    ]
}

/// Zero or one `key = value` line.
fn key(name: &'static str, value: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    prop::option::of(value)
        .prop_map(move |v| v.map_or(String::new(), |v| format!("{name} = {v}\n")))
}

fn network() -> impl Strategy<Value = String> {
    (
        cidr(),
        key("max_per_source", count()),
        key("rate_per_source", rate()),
        key("rate_burst", count()),
        key("ipv4_prefix", prefix()),
        key("ipv6_prefix", prefix()),
        key("max_per_network", count()),
        key("network_prefix", prefix()),
    )
        .prop_map(|(c, a, b, d, e, f, g, h)| {
            format!("[[network]]\ncidr = {c}\n{a}{b}{d}{e}{f}{g}{h}")
        })
}

fn backend() -> impl Strategy<Value = String> {
    (
        prop::option::of(0u64..5_000_000_000),
        prop::option::of(count()),
        any::<bool>(),
    )
        .prop_map(|(w, m, backup)| {
            let mut b = String::from("127.0.0.1:2525");
            if let Some(w) = w {
                b += &format!(",weight={w}");
            }
            if let Some(m) = m {
                b += &format!(",max_connections={m}");
            }
            if backup {
                b += ",backup";
            }
            format!("[\"{b}\", \"[::1]:2525\"]")
        })
}

fn config_text() -> impl Strategy<Value = String> {
    let limits = (
        key("max_connections", count()),
        key("max_per_source", count()),
        key("ipv4_prefix", prefix()),
        key("ipv6_prefix", prefix()),
        key("ipv6_network_prefix", prefix()),
        key("max_per_ipv6_network", count()),
        key("reserved_for_allowed", count()),
        key("rate_per_source", rate()),
        key("rate_burst", count()),
        key("dry_run", any::<bool>().prop_map(|b| b.to_string())),
    );
    let timeouts = (
        key("connect_timeout", duration()),
        key("idle_timeout", duration()),
        key("half_close_timeout", duration()),
        key("backend_greeting_timeout", duration()),
        key("drain_timeout", duration()),
        key("health_interval", duration()),
        key("proxy_header_timeout", duration()),
        key("fall", count()),
        key("rise", count()),
        key("pipe_size", count()),
        key("threads", count()),
    );
    let lists = (
        key(
            "allow",
            prop::collection::vec(cidr(), 0..3).prop_map(|v| format!("[{}]", v.join(","))),
        ),
        key(
            "deny",
            prop::collection::vec(cidr(), 0..3).prop_map(|v| format!("[{}]", v.join(","))),
        ),
        key(
            "accept_proxy_protocol",
            prop::collection::vec(cidr(), 0..2).prop_map(|v| format!("[{}]", v.join(","))),
        ),
        key("transparent", any::<bool>().prop_map(|b| b.to_string())),
        key(
            "proxy_protocol",
            prop_oneof![Just("\"v1\"".to_string()), Just("\"v2\"".to_string())],
        ),
        prop::collection::vec(network(), 0..3).prop_map(|v| v.concat()),
    );
    (backend(), limits, timeouts, lists).prop_map(|(b, l, t, x)| {
        let (l0, l1, l2, l3, l4, l5, l6, l7, l8, l9) = l;
        let (t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10) = t;
        let (x0, x1, x2, x3, x4, networks) = x;
        format!(
            "hostname = \"mx.test\"\nmetrics = \"off\"\nbackend = {b}\n\
             {l0}{l1}{l2}{l3}{l4}{l5}{l6}{l7}{l8}{l9}{t0}{t1}{t2}{t3}{t4}{t5}{t6}{t7}{t8}{t9}{t10}\
             {x0}{x1}{x2}{x3}{x4}{networks}"
        )
    })
}

/// Clients of both families, inside and outside typical networks.
fn clients() -> impl Strategy<Value = Vec<IpAddr>> {
    prop::collection::vec(
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u16; 8]>().prop_map(IpAddr::from),
        ],
        1..20,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn whatever_validation_accepts_builds_and_admits(text in config_text(), ips in clients()) {
        let settings = match Settings::from_toml(&text) {
            Ok(s) => s,
            // A number too large for its key's type (a u32 `rise`) is refused naming the key;
            // anything else would be a bug in this generator or the parser.
            Err((key, _)) if !key.is_empty() => return Ok(()),
            Err(e) => panic!("generated config does not parse: {e:?}\n{text}"),
        };
        if let Ok(config) = settings.validate(None) {
            // The effective config `check` prints is accepted again.
            let again = Settings::from_toml(&config.to_toml()).unwrap().validate(None).unwrap();
            prop_assert_eq!(again.to_toml(), config.to_toml());
            let _warnings = mxgate::server::check(config.clone());
            let policy = Policy::new(&config, None, PolicyClock::default());
            let admission = Admission::new(Metrics::new());
            let mut held = Vec::new();
            for ip in &ips {
                if let Ok(a) = admission.admit(&policy, *ip) {
                    held.push(a.guard);
                }
            }
            prop_assert!(admission.active() <= ips.len());
            drop(held);
            prop_assert_eq!(admission.active(), 0);
        }
    }

    #[test]
    fn no_toml_text_makes_the_parser_panic(text in "\\PC{0,400}") {
        if let Ok(s) = Settings::from_toml(&text) {
            let _ = s.validate(None);
        }
    }

    #[test]
    fn no_mangled_config_makes_the_parser_panic(
        text in config_text(),
        cuts in prop::collection::vec((any::<prop::sample::Index>(), any::<char>()), 0..6),
    ) {
        let mut chars: Vec<char> = text.chars().collect();
        for (at, c) in cuts {
            let i = at.index(chars.len().max(1)).min(chars.len());
            chars.insert(i, c);
        }
        let text: String = chars.into_iter().collect();
        if let Ok(s) = Settings::from_toml(&text) {
            if let Ok(config) = s.validate(None) {
                let _ = mxgate::server::check(config);
            }
        }
    }
}
