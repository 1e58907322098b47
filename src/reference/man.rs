//! The reference as mxgate.toml(5), in roff: the same keys as `docs/configuration.md`, with
//! each table as a section of its own.

use std::fmt::Write;

use super::{keys, Key, Table};
use crate::config::RESTART_ONLY;

/// mxgate.toml(5).
pub fn config_man() -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        ".TH MXGATE.TOML 5 \"\" \"mxgate {}\" \"File formats\"\n.SH NAME\nmxgate.toml \\- configuration file of mxgate(1)\n.SH DESCRIPTION",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        out,
        "{}",
        esc("A TOML file, by default /etc/mxgate/mxgate.toml. Every key is optional except backend. \
             A top-level key has a flag of the same name for mxgate run and mxgate check \
             (max_per_source is --max-per-source), and the flag wins. Top-level keys come before \
             the first table. Unknown keys and invalid values are errors that name the file, the \
             key and the reason; mxgate check --config FILE validates a file without starting \
             anything.")
    );
    let _ = writeln!(
        out,
        ".PP\n{}",
        esc(&format!(
            "Durations read 500ms, 5s, 10m, 1h; sizes read 65536, 64KiB, 1MiB. On SIGHUP \
             (systemctl reload mxgate) the file is read again. Every key changes at reload \
             except {}, which keep their old values until a restart, with a warning naming \
             each (cluster is the whole [cluster] table).",
            RESTART_ONLY.join(", ")
        ))
    );
    let all = keys();
    for (table, title) in [
        (Table::Top, "KEYS"),
        (Table::Cluster, "[cluster] TABLE"),
        (Table::Network, "[[network]] TABLES"),
        (Table::Replies, "[replies] TABLE"),
    ] {
        let _ = writeln!(out, ".SH {}", esc(title));
        for key in all.iter().filter(|k| k.table == table) {
            key_roff(&mut out, key);
        }
    }
    out.push_str(".SH FILES\n/etc/mxgate/mxgate.toml\n");
    out.push_str(
        ".SH SEE ALSO\nmxgate(1), mxgate\\-run(1), mxgate\\-check(1), mxgate\\-status(1)\n",
    );
    out
}

fn key_roff(out: &mut String, key: &Key) {
    let _ = writeln!(
        out,
        ".TP\n\\fB{}\\fR = \\fI{}\\fR",
        esc(&key.name),
        esc(&key.value)
    );
    let mut facts = Vec::new();
    if let Some(flag) = &key.flag {
        facts.push(format!("Flag {flag}."));
    }
    if let Some(d) = &key.default {
        facts.push(format!("Default: {d}."));
    }
    if let Some(r) = &key.range {
        facts.push(format!("Range: {r}."));
    }
    if key.restart_only {
        facts.push("Restart only.".into());
    }
    let _ = writeln!(
        out,
        "{}. {}",
        esc(key.help.trim_end_matches('.')),
        esc(&facts.join(" "))
    );
}

/// roff escapes: a backslash, and hyphens that must stay hyphens.
fn esc(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    // A line starting with a dot or a quote would be read as a request.
    match s.chars().next() {
        Some('.') | Some('\'') => format!("\\&{s}"),
        _ => s,
    }
}
