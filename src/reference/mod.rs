//! The reference: every config key with its flag, value, default, range and whether a reload
//! changes it; every metric family; every reply text. It is built from the code's own tables
//! (the clap and serde definitions of [`Settings`], the validation bounds, [`RESTART_ONLY`],
//! the metric catalogue, the reply templates) and rendered into `docs/configuration.md`,
//! `docs/metrics.md` and mxgate.toml(5). Nothing in it is kept by hand a second time: a key
//! added to `Settings` with its doc comment appears at the next regeneration, and
//! `tests/docs.rs` fails until the checked-in pages are regenerated.
//!
//! This module only reads those tables; it never decides what a key means.

mod fields;
mod man;
mod render;

use clap::Args;

use crate::config::RESTART_ONLY;
use crate::config::{self, ClusterSettings, NetworkRule, ReplyOverrides, Settings};
use crate::reason::RejectReason;

pub use fields::fields_of;
pub use man::config_man;
pub use render::{configuration_md, kind, metrics_md};

/// Where a key is written in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Top,
    Cluster,
    Network,
    Replies,
}

impl Table {
    /// The key's prefix as errors name it (`cluster.redis`), empty at the top.
    pub fn prefix(self) -> &'static str {
        match self {
            Table::Top => "",
            Table::Cluster => "cluster.",
            Table::Network => "network.",
            Table::Replies => "replies.",
        }
    }
}

/// One key of the config file.
#[derive(Clone, Debug)]
pub struct Key {
    pub table: Table,
    /// The key inside its table (`redis` of `[cluster]`).
    pub name: String,
    /// The flag of `mxgate run` and `mxgate check`, if the key has one.
    pub flag: Option<String>,
    /// What the value looks like (`N`, `DUR`, `ADDR`).
    pub value: String,
    pub help: String,
    pub default: Option<String>,
    pub range: Option<String>,
    /// Whether a reload leaves it as it was until a restart.
    pub restart_only: bool,
}

impl Key {
    /// The key as errors and `mxgate check` name it: `max_connections`, `cluster.redis`.
    pub fn path(&self) -> String {
        format!("{}{}", self.table.prefix(), self.name)
    }
}

/// Every key the config file accepts, in the order the docs list them.
pub fn keys() -> Vec<Key> {
    let cluster_ids: Vec<String> = ClusterSettings::augment_args(clap::Command::new("c"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    let mut top = Vec::new();
    let mut cluster = Vec::new();
    for arg in Settings::augment_args(clap::Command::new("mxgate")).get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let id = arg.get_id().to_string();
        let table = if cluster_ids.contains(&id) {
            Table::Cluster
        } else {
            Table::Top
        };
        let (help, default) =
            split_default(&arg.get_help().map(|h| h.to_string()).unwrap_or_default());
        let key = Key {
            table,
            restart_only: restart_only(table, &id),
            range: range(&format!("{}{id}", table.prefix())),
            name: id,
            flag: Some(format!("--{long}")),
            value: arg
                .get_value_names()
                .and_then(|v| v.first().map(|s| s.to_string()))
                .unwrap_or_else(|| "BOOL".into()),
            help,
            default,
        };
        if key.name == "backend" {
            top.push(key);
            top.push(backends_key());
        } else if table == Table::Cluster {
            cluster.push(key);
        } else {
            top.push(key);
        }
    }
    top.extend(cluster);
    top.extend(network_keys());
    top.extend(reply_keys());
    top
}

/// Every key the parser accepts, named as errors name them: asked of the serde definitions.
pub fn accepted_keys() -> Vec<String> {
    let tables = [
        ("cluster", fields_of::<ClusterSettings>()),
        ("network", fields_of::<NetworkRule>()),
        ("replies", fields_of::<ReplyOverrides>()),
    ];
    let mut out = Vec::new();
    for top in fields_of::<Settings>() {
        match tables.iter().find(|(t, _)| t == top) {
            Some((t, inner)) => out.extend(inner.iter().map(|k| format!("{t}.{k}"))),
            None => out.push(top.to_string()),
        }
    }
    out
}

/// `help [default: X]` into the help and `X`.
fn split_default(help: &str) -> (String, Option<String>) {
    match help.rfind("[default: ") {
        Some(i) if help.ends_with(']') => (
            help[..i].trim_end().to_string(),
            Some(help[i + "[default: ".len()..help.len() - 1].to_string()),
        ),
        _ => (help.to_string(), None),
    }
}

fn restart_only(table: Table, name: &str) -> bool {
    match table {
        Table::Cluster => RESTART_ONLY.contains(&"cluster"),
        _ => RESTART_ONLY.contains(&name),
    }
}

/// The bounds validation holds a key to, from the same constants it uses.
fn range(key: &str) -> Option<String> {
    use config::*;
    let dur = |lo: &str, hi: std::time::Duration| format!("{lo} to {}", Dur(hi));
    Some(match key {
        "max_connections"
        | "max_per_source"
        | "max_per_ipv6_network"
        | "max_queued"
        | "reserved_for_allowed" => format!("0 to {MAX_CONNECTIONS}"),
        "adaptive_min" => "1 to max_connections".into(),
        "adaptive_initial" => "adaptive_min to max_connections".into(),
        "fall" | "rise" => format!("1 to {MAX_CHECKS}"),
        "ipv4_prefix" => "0 to 32".into(),
        "ipv6_prefix" | "ipv6_network_prefix" => "0 to 128".into(),
        "connect_timeout"
        | "idle_timeout"
        | "half_close_timeout"
        | "health_interval"
        | "backend_greeting_timeout"
        | "proxy_header_timeout" => dur("more than 0", MAX_DURATION),
        "drain_timeout" => dur("0", MAX_DURATION),
        "queue_timeout" => dur("0 (off)", MAX_QUEUE_TIMEOUT),
        "pipe_size" => "4KiB to 1GiB".into(),
        "threads" => format!("0 to {MAX_THREADS}"),
        "rate_per_source" => format!("up to {MAX_RATE_PER_SECOND}/s"),
        "rate_burst" => format!("up to {MAX_RATE_BURST}"),
        "cluster.lease_ttl" => dur(&Dur(MIN_LEASE_TTL).to_string(), MAX_DURATION),
        "cluster.fallback_share" => "above 0, at most 1".into(),
        "cluster.admission_timeout" => format!(
            "{} to {}",
            Dur(MIN_CLUSTER_ADMISSION_TIMEOUT),
            Dur(MAX_CLUSTER_ADMISSION_TIMEOUT)
        ),
        "cluster.name" | "cluster.instance" => "1 to 128 of A-Z a-z 0-9 - _ .".into(),
        _ => return None,
    })
}

/// `backends`: file only, so clap does not know it.
fn backends_key() -> Key {
    Key {
        table: Table::Top,
        name: "backends".into(),
        flag: None,
        value: "[{ address = \"HOST:PORT\", weight = N, max_connections = N | \"auto\", backup = BOOL }, ...]".into(),
        help: format!(
            "The backends as a list of strings or tables, instead of backend (file only). \
             weight is 1 to {}; max_connections = \"auto\" learns the backend's own limit, \
             between adaptive_min and the global max_connections; a backup backend takes \
             sessions only while no other is up",
            config::MAX_WEIGHT
        ),
        default: None,
        range: None,
        restart_only: false,
    }
}

/// `[[network]]`: one help line per field; a field without one fails `tests/docs.rs`.
const NETWORK_HELP: &[(&str, &str, &str)] = &[
    (
        "cidr",
        "CIDR",
        "The network this table applies to; the longest matching cidr wins",
    ),
    (
        "max_per_source",
        "N",
        "Replaces max_per_source for sources inside cidr",
    ),
    (
        "rate_per_source",
        "RATE",
        "Replaces rate_per_source for sources inside cidr",
    ),
    (
        "rate_burst",
        "N",
        "Replaces rate_burst for sources inside cidr",
    ),
    (
        "ipv4_prefix",
        "LEN",
        "Replaces ipv4_prefix for sources inside cidr",
    ),
    (
        "ipv6_prefix",
        "LEN",
        "Replaces ipv6_prefix for sources inside cidr",
    ),
    (
        "max_per_network",
        "N",
        "Caps concurrent connections from each network_prefix-sized block inside cidr",
    ),
    (
        "network_prefix",
        "LEN",
        "The block size that max_per_network counts by",
    ),
];

fn network_keys() -> Vec<Key> {
    fields_of::<NetworkRule>()
        .iter()
        .map(|field| {
            let (value, help) = NETWORK_HELP
                .iter()
                .find(|(f, _, _)| f == field)
                .map_or(("", ""), |(_, v, h)| (*v, *h));
            Key {
                table: Table::Network,
                name: field.to_string(),
                flag: None,
                value: value.into(),
                help: help.into(),
                default: (*field != "cidr").then(|| "the global key".into()),
                range: range(field),
                restart_only: false,
            }
        })
        .collect()
}

/// `[replies]`: one key per refusal reason, with mxgate's own line as the default.
fn reply_keys() -> Vec<Key> {
    fields_of::<ReplyOverrides>()
        .iter()
        .map(|field| {
            let reason = RejectReason::ALL.into_iter().find(|r| r.label() == *field);
            Key {
                table: Table::Replies,
                name: field.to_string(),
                flag: None,
                value: "\"CODE TEXT\"".into(),
                help: "One line, a 4xx or 5xx code and a space first, at most 510 characters; \
                       {hostname} is replaced by hostname"
                    .into(),
                default: reason.map(|r| crate::reply::default_template(r).to_string()),
                range: None,
                restart_only: false,
            }
        })
        .collect()
}
