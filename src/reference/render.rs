//! The reference as Markdown: `docs/configuration.md` and `docs/metrics.md`.

use std::fmt::Write;

use super::{keys, Key, Table};
use crate::config::RESTART_ONLY;
use crate::metrics::families::{HELP, HISTOGRAMS};

/// The first line of every generated page: what it is and how it is made.
pub const GENERATED: &str =
    "<!-- Generated from the code by `MXGATE_REGENERATE=1 cargo test --release --test docs`; \
do not edit by hand (see docs/contributing.md). -->";

/// `docs/configuration.md`: every key of the file.
pub fn configuration_md() -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{GENERATED}\n");
    out.push_str(INTRO);
    let _ = writeln!(
        out,
        "\nA reload (`systemctl reload mxgate`, SIGHUP) changes every key except these, which \
         keep their old value until a restart, with a warning naming each: {}. `cluster` is the \
         whole `[cluster]` table.\n",
        RESTART_ONLY
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let all = keys();
    for (table, title, about) in SECTIONS {
        let _ = writeln!(out, "## {title}\n\n{about}\n");
        for key in all.iter().filter(|k| k.table == *table) {
            key_md(&mut out, key);
        }
    }
    out
}

const INTRO: &str = "# Configuration reference

The file is TOML, by default `/etc/mxgate/mxgate.toml`. Every key is optional except `backend`.
A key of the top level has a flag of the same name for `mxgate run` and `mxgate check`
(`max_per_source` is `--max-per-source`), and the flag wins over the file. Unknown keys and
invalid values are errors that name the file, the key and the reason, and `mxgate check
--config FILE` tells them without starting anything.

Durations read `500ms`, `5s`, `10m`, `1h`; sizes read `65536`, `64KiB`, `1MiB`; rates read
`30/min` (`N/s`, `N/min`, `N/h`). Top-level keys come before the first `[table]` in the file.
What to set for a deployment in front of Exchange is in [deploy-exchange.md](deploy-exchange.md),
and how to size the limits in [sizing.md](sizing.md).
";

const SECTIONS: &[(Table, &str, &str)] = &[
    (
        Table::Top,
        "Top-level keys",
        "Written before the first table.",
    ),
    (
        Table::Cluster,
        "`[cluster]`",
        "Shared limits across several mxgate hosts through Redis ([cluster.md](cluster.md)). \
         Nothing is shared unless `redis` is set.",
    ),
    (
        Table::Network,
        "`[[network]]`",
        "Limits for one network, overriding the global ones for sources inside it; repeatable.",
    ),
    (
        Table::Replies,
        "`[replies]`",
        "Lines that replace mxgate's own replies. The default of each is the line mxgate sends; \
         `queue_timeout` and `queue_full` refusals get the `global_limit` line.",
    ),
];

fn key_md(out: &mut String, key: &Key) {
    let _ = writeln!(out, "### `{}`\n", key.path());
    let mut facts = vec![format!("`{} = {}`", key.name, key.value)];
    if let Some(flag) = &key.flag {
        facts.push(format!("flag `{flag}`"));
    } else {
        facts.push("file only".into());
    }
    match &key.default {
        Some(d) => facts.push(format!("default: `{d}`")),
        None if key.name == "backend" => facts.push("required".into()),
        None => {}
    }
    if let Some(r) = &key.range {
        facts.push(format!("range: {r}"));
    }
    facts.push(if key.restart_only {
        "restart only".into()
    } else {
        "changes at reload".into()
    });
    let _ = writeln!(out, "{}\n", facts.join(" · "));
    let _ = writeln!(out, "{}.\n", key.help.trim_end_matches('.'));
}

/// The Prometheus type a family is exported as: counters end in `_total`, histograms have
/// buckets, the rest are gauges (the exporter's rule and ours; `tests/docs.rs` checks it
/// against a real scrape).
pub fn kind(name: &str) -> &'static str {
    if HISTOGRAMS.iter().any(|(h, _)| *h == name) {
        "histogram"
    } else if name.ends_with("_total") {
        "counter"
    } else {
        "gauge"
    }
}

/// `docs/metrics.md`: every family `/metrics` exports.
pub fn metrics_md() -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{GENERATED}\n");
    out.push_str(
        "# Metrics reference

`/metrics` on the `metrics` listener (default `127.0.0.1:9925`) serves these families in the
Prometheus text format. What to watch and alert on is in [operations.md](operations.md); the
shipped alert rules and dashboard are `mxgate-alerts.yml` and `grafana-dashboard.json` in
`/usr/share/doc/mxgate/`.

No label carries a client address, so the number of series is fixed; `backend` is the
configured backend address, a bounded set.

| family | type | labels | help |
| --- | --- | --- | --- |
",
    );
    let labels = labels_seen();
    let mut families: Vec<_> = HELP.iter().collect();
    families.sort_by_key(|(name, _, _)| *name);
    for (name, _, help) in families {
        let l = labels.get(*name).map_or(String::new(), |l| l.join("; "));
        let _ = writeln!(out, "| `{name}` | {} | {l} | {help} |", kind(name));
    }
    let _ = writeln!(
        out,
        "\nThe process's own families, under the names every Prometheus client library uses:\n\n\
         | family | type | help |\n| --- | --- | --- |"
    );
    for (name, kind, help) in process_families() {
        let _ = writeln!(out, "| `{name}` | {kind} | {help} |");
    }
    let _ = writeln!(out, "\n## Histogram buckets (upper bounds, seconds)\n");
    for (name, buckets) in HISTOGRAMS {
        let list: Vec<String> = buckets.iter().map(|b| b.to_string()).collect();
        let _ = writeln!(out, "- `{name}`: {}", list.join(", "));
    }
    out
}

/// Each family's labels, as a scrape of a fresh instance with one backend shows them: a
/// label's values are listed, but for `backend` (an address) and `version`.
fn labels_seen() -> std::collections::BTreeMap<String, Vec<String>> {
    use std::collections::BTreeMap;
    let metrics = crate::metrics::Metrics::new();
    let _series = metrics.backend("192.0.2.25:25");
    let mut seen: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for line in metrics.render().lines().filter(|l| !l.starts_with('#')) {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let name = HELP
            .iter()
            .map(|(n, _, _)| *n)
            .find(|n| {
                name == *n
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name == format!("{n}{s}"))
            })
            .unwrap_or(name);
        let inner = rest.split_once('}').map_or("", |(i, _)| i);
        for pair in inner.split(',') {
            let Some((key, value)) = pair.split_once('=') else {
                continue;
            };
            if key == "le" {
                continue;
            }
            let values = seen
                .entry(name.to_string())
                .or_default()
                .entry(key.to_string())
                .or_default();
            let value = value.trim_matches('"').to_string();
            if !values.contains(&value) {
                values.push(value);
            }
        }
    }
    seen.into_iter()
        .map(|(name, keys)| {
            let list = keys
                .into_iter()
                .map(|(key, mut values)| match key.as_str() {
                    "backend" | "version" => format!("`{key}`"),
                    _ => {
                        values.sort();
                        format!("`{key}`: {}", values.join(", "))
                    }
                })
                .collect();
            (name, list)
        })
        .collect()
}

/// The `process_*` families as a scrape shows them: name, type and HELP.
fn process_families() -> Vec<(String, String, String)> {
    let mut text = String::new();
    crate::metrics::process::render(&mut text);
    let mut out = Vec::new();
    let mut help = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest
                .split_once(' ')
                .map(|(n, h)| (n.to_string(), h.to_string()));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let (Some((name, h)), Some((_, kind))) = (help.take(), rest.split_once(' ')) {
                out.push((name, kind.to_string(), h));
            }
        }
    }
    out
}
