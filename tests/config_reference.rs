//! The reference and the shipped config against the parser, both ways: every key the parser
//! accepts is in the reference and in the shipped `mxgate.toml`, and every key the reference
//! lists parses when its example line from the shipped file is put in a file.

use std::collections::BTreeSet;
use std::path::Path;

use clap::Parser;
use mxgate::config::{Balance, Settings};
use mxgate::reference::{accepted_keys, keys, Key, Table};

fn shipped() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/mxgate.toml"))
        .unwrap()
}

#[test]
fn the_reference_has_every_key_the_parser_accepts_and_no_other() {
    let accepted: BTreeSet<String> = accepted_keys().into_iter().collect();
    let listed: BTreeSet<String> = keys().iter().map(Key::path).collect();
    assert!(accepted.len() > 40, "{accepted:?}");
    assert!(accepted.contains("cluster.password_file"), "{accepted:?}");
    assert!(accepted.contains("backend_trusts_mxgate"), "{accepted:?}");
    let missing: Vec<_> = accepted.difference(&listed).collect();
    let extra: Vec<_> = listed.difference(&accepted).collect();
    assert!(
        missing.is_empty(),
        "accepted but not in the reference: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "in the reference but not accepted: {extra:?}"
    );
    for key in keys() {
        assert!(!key.help.is_empty(), "{} has no help", key.path());
        assert!(!key.value.is_empty(), "{} has no value form", key.path());
        let needs_default = !matches!(key.name.as_str(), "backend" | "backends" | "cidr");
        assert!(
            key.default.is_some() || !needs_default,
            "{} has no default in its help",
            key.path()
        );
    }
}

/// The line of the shipped file that sets `key` in its table, commented out or not.
fn example_line(text: &str, key: &Key) -> Option<String> {
    let header = match key.table {
        Table::Top => None,
        Table::Cluster => Some("[cluster]"),
        Table::Network => Some("[[network]]"),
        Table::Replies => Some("[replies]"),
    };
    let mut section: Option<String> = None;
    for line in text.lines() {
        let bare = line.trim_start_matches('#').trim();
        if bare.starts_with('[') && !bare.contains('=') {
            section = Some(bare.to_string());
            continue;
        }
        let in_place = section.as_deref() == header;
        let sets = bare
            .strip_prefix(key.name.as_str())
            .is_some_and(|rest| rest.trim_start().starts_with('='));
        if in_place && sets {
            return Some(bare.to_string());
        }
    }
    None
}

#[test]
fn every_key_is_in_the_shipped_file_and_its_example_parses() {
    let text = shipped();
    let all = keys();
    assert!(!all.is_empty());
    for key in &all {
        let line = example_line(&text, key)
            .unwrap_or_else(|| panic!("{} is not in systemd/mxgate.toml", key.path()));
        let file = match key.table {
            Table::Top => format!("{line}\n"),
            Table::Cluster => format!("[cluster]\n{line}\n"),
            Table::Network if key.name == "cidr" => format!("[[network]]\n{line}\n"),
            Table::Network => format!("[[network]]\ncidr = \"192.0.2.0/24\"\n{line}\n"),
            Table::Replies => format!("[replies]\n{line}\n"),
        };
        // A placeholder backend parses as text but fails on purpose: it is checked below.
        if key.name == "backend" || key.name == "backends" {
            continue;
        }
        if let Err((k, reason)) = Settings::from_toml(&file) {
            panic!(
                "{}: the shipped example {line:?} fails: {k}: {reason}",
                key.path()
            );
        }
    }
}

#[test]
fn top_level_keys_come_before_the_first_table_and_no_table_is_left_open() {
    let text = shipped();
    let first_table = text
        .lines()
        .position(|l| l.trim_start_matches('#').trim().starts_with('['))
        .expect("the tables are shown, commented");
    let before: String = text
        .lines()
        .take(first_table)
        .collect::<Vec<_>>()
        .join("\n");
    let top: Vec<Key> = keys()
        .into_iter()
        .filter(|k| k.table == Table::Top)
        .collect();
    assert!(!top.is_empty());
    for key in &top {
        assert!(
            example_line(&before, key).is_some(),
            "{} comes after the first table",
            key.name
        );
    }
    // Every table is commented out, so a key appended at the end is a top-level key.
    let appended =
        text.replace("exchange.example.invalid:2526", "127.0.0.1:2526") + "dry_run = true\n";
    let settings = Settings::from_toml(&appended).expect("the shipped file with a key appended");
    assert_eq!(settings.dry_run, Some(true));
}

#[test]
fn the_shipped_backend_is_refused_until_it_is_set() {
    let text = shipped();
    let err = Settings::from_toml(&text).unwrap_err();
    assert_eq!(err.0, "backend");
    assert!(
        err.1
            .contains("set backend to your mail server's HOST:PORT"),
        "{err:?}"
    );
    let set = text.replace("exchange.example.invalid:2526", "127.0.0.1:2526");
    let config = Settings::from_toml(&set).unwrap().validate(None).unwrap();
    assert_eq!(config.backends.len(), 1);
}

#[test]
fn least_connections_is_spelt_either_way_as_flag_and_key() {
    for spelling in ["least-connections", "least_connections"] {
        let s = Settings::from_toml(&format!("balance = \"{spelling}\"")).unwrap();
        assert_eq!(s.balance, Some(Balance::LeastConnections), "key {spelling}");
        let cli = mxgate::cli::Cli::try_parse_from([
            "mxgate",
            "check",
            "--backend",
            "127.0.0.1:2526",
            "--balance",
            spelling,
        ])
        .unwrap_or_else(|e| panic!("flag {spelling}: {e}"));
        let mxgate::cli::Command::Check(args) = cli.command else {
            panic!("the check subcommand");
        };
        assert_eq!(
            args.run.settings.balance,
            Some(Balance::LeastConnections),
            "flag {spelling}"
        );
    }
}
