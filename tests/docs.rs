//! The generated reference pages: each checked-in page is exactly what the code generates, so
//! a key, a default, a metric family or a reply text changed in code without a regeneration
//! fails here. `MXGATE_REGENERATE=1 cargo test --release --test docs` rewrites them.

use std::path::Path;

/// Each generated page and its generator.
fn pages() -> Vec<(&'static str, String)> {
    vec![
        (
            "docs/configuration.md",
            mxgate::reference::configuration_md(),
        ),
        ("docs/metrics.md", mxgate::reference::metrics_md()),
        ("docs/mxgate.toml.5", mxgate::reference::config_man()),
    ]
}

#[test]
fn every_generated_page_is_what_the_code_generates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pages = pages();
    assert!(!pages.is_empty());
    let regenerate = std::env::var_os("MXGATE_REGENERATE").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for (path, generated) in pages {
        let file = root.join(path);
        if regenerate {
            std::fs::write(&file, &generated).unwrap();
            continue;
        }
        let checked_in = std::fs::read_to_string(&file).unwrap_or_default();
        if checked_in != generated {
            stale.push(path);
        }
    }
    assert!(
        stale.is_empty(),
        "{stale:?} differ from what the code generates: run \
         `MXGATE_REGENERATE=1 cargo test --release --test docs` and commit the result"
    );
}

#[test]
fn the_pages_carry_every_key_metric_and_reply() {
    let conf = mxgate::reference::configuration_md();
    let keys = mxgate::reference::keys();
    assert!(keys.len() > 40, "{}", keys.len());
    for key in &keys {
        assert!(
            conf.contains(&format!("### `{}`", key.path())),
            "{}",
            key.path()
        );
    }
    // The man page has [cluster] as a table, never its keys at the top.
    let man = mxgate::reference::config_man();
    assert!(man.contains(".SH [cluster] TABLE"), "{man}");
    assert!(!man.contains("cluster_redis"), "{man}");
    let metrics = mxgate::reference::metrics_md();
    assert!(!mxgate::metrics::families::HELP.is_empty());
    for (name, _, _) in mxgate::metrics::families::HELP {
        assert!(metrics.contains(&format!("| `{name}` |")), "{name}");
    }
    assert!(
        metrics.contains("| `process_open_fds` | gauge |"),
        "{metrics}"
    );
    // mxgate's own reply lines are the [replies] defaults.
    assert!(conf.contains(
        "default: `421 4.7.0 {hostname} Too many connections from your address, try again later`"
    ));
}

/// The type the page gives each family is the type a real scrape declares.
#[test]
fn the_metric_types_match_a_scrape() {
    let text = mxgate::metrics::Metrics::new().render();
    let mut seen = 0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        if name.starts_with("process_") {
            continue;
        }
        // The exporter declares a histogram's family without a suffix.
        assert_eq!(mxgate::reference::kind(name), kind, "{name}");
        seen += 1;
    }
    assert!(seen > 10, "{seen} families in a fresh scrape:\n{text}");
}

/// Every warning and error mxgate logs has its entry in docs/troubleshooting.md: each
/// `warn!`/`error!` call's message, read from the source, appears there word for word (up to
/// its first formatted part or punctuation that the page may cut).
#[test]
fn every_logged_warning_is_in_troubleshooting() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let page = std::fs::read_to_string(root.join("docs/troubleshooting.md")).unwrap();
    let mut messages = Vec::new();
    let mut stack = vec![root.join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                messages.extend(logged_messages(&text));
            }
        }
    }
    assert!(messages.len() > 15, "{messages:?}");
    let missing: Vec<&String> = messages
        .iter()
        .filter(|m| !page.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "not in docs/troubleshooting.md: {missing:#?}"
    );
}

/// The fixed message of each `tracing::warn!` and `tracing::error!` call in `text`: its last
/// string literal, up to its first `{` (a formatted part), `;` or `(`, continuations joined.
/// Test modules are left out.
fn logged_messages(text: &str) -> Vec<String> {
    let text = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut out = Vec::new();
    for start in ["tracing::warn!(", "tracing::error!("] {
        for (i, _) in text.match_indices(start) {
            let call = &text[i + start.len()..];
            let call = &call[..macro_end(call)];
            let Some(close) = call.rfind('"') else {
                continue;
            };
            let Some(open) = call[..close].rfind('"') else {
                continue;
            };
            let literal = &call[open + 1..close];
            let joined: String = literal
                .split("\\\n")
                .map(str::trim_start)
                .collect::<Vec<_>>()
                .join("");
            let fixed = joined.split(['{', ';', '(']).next().unwrap_or("").trim();
            if fixed.len() >= 10 {
                out.push(fixed.to_string());
            }
        }
    }
    out
}

/// Where the macro call whose arguments begin `call` closes: its matching `)`, with
/// parentheses inside string literals not counted.
fn macro_end(call: &str) -> usize {
    let (mut depth, mut in_string, mut escaped) = (1usize, false, false);
    for (i, c) in call.char_indices() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => in_string = false,
            (true, false, _) => {}
            (false, _, '"') => in_string = true,
            (false, _, '(') => depth += 1,
            (false, _, ')') => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    call.len()
}
