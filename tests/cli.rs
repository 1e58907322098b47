//! The binary's edge: `mxgate check`, config errors, and the example configs in the repo.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mxgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .args(args)
        .output()
        .expect("mxgate runs")
}

fn write_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mxgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Every `.toml` the repo ships as an example.
fn example_configs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    for dir in ["systemd", "examples", "docs"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                found.push(p);
            }
        }
    }
    found
}

#[test]
fn every_example_config_passes_check() {
    let configs = example_configs();
    assert!(
        !configs.is_empty(),
        "the repo ships at least one example config"
    );
    for mut p in configs {
        if p.ends_with("systemd/mxgate.toml") {
            // The shipped file's backend is a placeholder that check refuses, saying what to
            // do; with the backend set, it passes like every other example.
            let out = mxgate(&["check", "--config", p.to_str().unwrap()]);
            assert!(!out.status.success());
            let why = String::from_utf8_lossy(&out.stderr);
            assert!(
                why.contains("set backend to your mail server's HOST:PORT"),
                "{why}"
            );
            let set =
                std::env::temp_dir().join(format!("mxgate-shipped-{}.toml", std::process::id()));
            let text = std::fs::read_to_string(&p).unwrap();
            std::fs::write(
                &set,
                text.replace("exchange.example.invalid:2526", "127.0.0.1:2526"),
            )
            .unwrap();
            p = set;
        }
        let out = mxgate(&["check", "--config", p.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8(out.stdout).unwrap();
        assert!(printed.contains("max_connections = "), "{printed}");
    }
}

/// `ExecReload=` runs `check --quiet` first: silent and 0 on a good file, the error and
/// non-zero on a bad one.
#[test]
fn check_quiet_prints_nothing_on_success_and_the_error_on_failure() {
    let good = write_config(
        "quiet-good.toml",
        "backend = \"127.0.0.1:2525\"\nhostname = \"mx.test\"\n",
    );
    let out = mxgate(&["check", "--quiet", "--config", good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let bad = write_config(
        "quiet-bad.toml",
        "backend = \"127.0.0.1:2525\"\nhostname = \"mx.test\"\nidle_timeout = \"5x\"\n",
    );
    let out = mxgate(&["check", "--quiet", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key `idle_timeout`"), "{err}");
}

#[test]
fn check_prints_the_effective_config_with_flags_applied() {
    let p = write_config(
        "ok.toml",
        "backend = \"127.0.0.1:2525\"\nmax_per_source = 5\n",
    );
    let out = mxgate(&[
        "check",
        "--config",
        p.to_str().unwrap(),
        "--max-per-source",
        "7",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("max_per_source = 7\n"), "{text}");
    assert!(text.contains("max_connections = 1000\n"), "{text}");
    assert!(text.contains("idle_timeout = \"10m\"\n"), "{text}");
    assert!(text.contains("half_close_timeout = \"30s\"\n"), "{text}");
}

#[test]
fn bad_configs_fail_naming_file_and_key() {
    let cases = [
        (
            "unknown-key.toml",
            "backend = \"127.0.0.1:25\"\nmax_conections = 5\n",
            "max_conections",
        ),
        (
            "bad-duration.toml",
            "backend = \"127.0.0.1:25\"\nidle_timeout = \"10 minutes\"\n",
            "idle_timeout",
        ),
        (
            "bad-address.toml",
            "backend = \"not an address\"\n",
            "backend",
        ),
        (
            "bad-listen.toml",
            "backend = \"127.0.0.1:25\"\nlisten = [\"0.0.0.0\"]\n",
            "listen[0]",
        ),
        (
            "bad-reply.toml",
            "backend = \"127.0.0.1:25\"\n[replies]\nsource_limit = \"250 fine\"\n",
            "replies.source_limit",
        ),
        (
            "bad-prefix.toml",
            "backend = \"127.0.0.1:25\"\nipv6_prefix = 200\n",
            "ipv6_prefix",
        ),
        (
            "bad-type.toml",
            "backend = \"127.0.0.1:25\"\nmax_connections = -1\n",
            "max_connections",
        ),
        ("bad-toml.toml", "backend = \n", ""),
        ("no-backend.toml", "max_connections = 5\n", "backend"),
    ];
    for (name, text, key) in cases {
        let p = write_config(name, text);
        for sub in ["check", "run"] {
            let out = mxgate(&[sub, "--config", p.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{sub} {name} must fail");
            assert!(err.starts_with("mxgate: config file "), "{name}: {err}");
            assert!(err.contains(name), "{name}: names the file: {err}");
            assert!(
                err.contains(&format!("key `{key}`")) || key.is_empty(),
                "{name}: {err}"
            );
        }
    }
}

#[test]
fn config_is_validated_before_any_socket_is_bound() {
    // Hold the port: if mxgate tried to bind before validating, it would fail on the port.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let p = write_config(
        "late.toml",
        "backend = \"127.0.0.1:25\"\nidle_timeout = \"5x\"\n",
    );
    let out = mxgate(&["run", "--config", p.to_str().unwrap(), "--listen", &listen]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("key `idle_timeout`"), "{err}");
    assert!(!err.contains("in use"), "{err}");

    // With a valid config, the busy port itself is the error, and the exit is non-zero.
    let out = mxgate(&[
        "run",
        "--backend",
        "127.0.0.1:25",
        "--listen",
        &listen,
        "--metrics",
        "off",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("cannot listen on {listen}")), "{err}");
}

#[test]
fn bad_flags_are_rejected_too() {
    let out = mxgate(&["run", "--backend", "127.0.0.1:25", "--idle-timeout", "soon"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--idle-timeout"), "{err}");
}

#[test]
fn every_key_wrong_in_turn_gives_one_clear_error() {
    let cases: &[(&str, &str)] = &[
        ("listen", "listen = [\"nowhere\"]"),
        ("backend", "backend = \"no port\""),
        ("max_connections", "max_connections = \"lots\""),
        ("max_per_source", "max_per_source = -3"),
        ("ipv4_prefix", "ipv4_prefix = 40"),
        ("ipv6_prefix", "ipv6_prefix = 129"),
        ("hostname", "hostname = \"not a host\""),
        ("metrics", "metrics = \"on\""),
        ("connect_timeout", "connect_timeout = \"5\""),
        ("idle_timeout", "idle_timeout = \"0s\""),
        ("half_close_timeout", "half_close_timeout = \"0s\""),
        ("half_close_timeout", "half_close_timeout = \"soon\""),
        (
            "backend_greeting_timeout",
            "backend_greeting_timeout = \"soon\"",
        ),
        ("log_format", "log_format = \"xml\""),
        ("forwarding", "forwarding = \"zerocopy\""),
        ("pipe_size", "pipe_size = \"1GiB\""),
        ("threads", "threads = 1000"),
        ("threads", "threads = -1"),
        ("drain_timeout", "drain_timeout = 30"),
        ("rate_per_source", "rate_per_source = \"30/day\""),
        ("rate_burst", "rate_burst = 5"),
        ("allow", "allow = [\"192.0.2.5/24\"]"),
        ("deny", "deny = [\"not-a-network\"]"),
        ("reserved_for_allowed", "reserved_for_allowed = 5"),
        ("dry_run", "dry_run = \"yes\""),
        (
            "network",
            "[[network]]\ncidr = \"198.51.100.0/24\"\nipv6_prefix = 64",
        ),
        ("replies", "[replies]\nglobal_limit = \"200 fine\""),
    ];
    assert!(!cases.is_empty());
    for (key, line) in cases {
        // Valid backend and hostname, unless the case is about one of them.
        let mut text = String::new();
        if *key != "backend" {
            text.push_str("backend = \"127.0.0.1:25\"\n");
        }
        if *key != "hostname" {
            text.push_str("hostname = \"mx.t\"\n");
        }
        text.push_str(line);
        text.push('\n');
        let p = write_config(&format!("wrong-{key}.toml"), &text);
        let out = mxgate(&["check", "--config", p.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}: {line} must fail");
        assert_eq!(err.lines().count(), 1, "{key}: one clear line: {err}");
        assert!(err.contains(&format!("key `{key}")), "{key}: {err}");
    }
}

#[test]
fn check_warns_of_a_backend_that_would_trust_mxgate_for_relaying() {
    let risky = write_config(
        "relay.toml",
        "backend = \"127.0.0.1:2525\"\nhostname = \"mx.test\"\n",
    );
    let out = mxgate(&["check", "--config", risky.to_str().unwrap()]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mxgate: warning: backend 127.0.0.1:2525")
            && err.contains("mynetworks")
            && err.contains("relay_from_hosts")
            && err.contains("RemoteIPRanges"),
        "{err}"
    );
    for safe in [
        "backend = \"127.0.0.1:2525\"\nhostname = \"mx.test\"\nproxy_protocol = \"v1\"\n",
        "backend = \"192.0.2.25:25\"\nhostname = \"mx.test\"\n",
    ] {
        let p = write_config("safe.toml", safe);
        let out = mxgate(&["check", "--config", p.to_str().unwrap()]);
        assert!(out.status.success());
        assert!(
            out.stderr.is_empty(),
            "{safe}: {:?}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn check_warns_of_a_transparent_listener_no_backend_can_serve() {
    let p = write_config(
        "family.toml",
        "backend = \"192.0.2.25:25\"\nhostname = \"mx.test\"\ntransparent = true\n\
         listen = [\"0.0.0.0:25\", \"[::]:25\"]\n",
    );
    let out = mxgate(&["check", "--config", p.to_str().unwrap()]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("an IPv6 listener but no IPv6 backend"),
        "{err}"
    );
    assert_eq!(err.matches("warning").count(), 1, "{err}");
}

#[test]
fn values_that_once_passed_check_and_crashed_run_are_refused_by_both() {
    for (line, key) in [
        ("rate_per_source = \"2000000000/s\"", "rate_per_source"),
        (
            "connect_timeout = \"18446744073709551615s\"",
            "connect_timeout",
        ),
    ] {
        let p = write_config(
            "range.toml",
            &format!("backend = \"192.0.2.25:25\"\nhostname = \"mx.test\"\n{line}\n"),
        );
        for verb in ["check", "run"] {
            let out = mxgate(&[
                verb,
                "--config",
                p.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ]);
            assert_eq!(out.status.code(), Some(2), "{verb} {line}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(&format!("key `{key}`")) && !err.contains("panicked"),
                "{verb} {line}: {err}"
            );
        }
    }
}

#[test]
fn an_error_names_the_flag_or_the_file_line_its_value_came_from() {
    let p = write_config(
        "origin.toml",
        "backend = \"192.0.2.25:25\"\nhostname = \"mx.test\"\n\nidle_timeout = \"30h\"\n",
    );
    let file = p.to_str().unwrap();
    // From the file: the file, the key and its line.
    let out = mxgate(&["check", "--config", file]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.starts_with(&format!("mxgate: config file {file}: key `idle_timeout`: "))
            && err.trim_end().ends_with("(line 4)"),
        "{err}"
    );
    // The same key from a flag names the flag, not the file.
    let out = mxgate(&["check", "--config", file, "--idle-timeout", "0s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        "mxgate: command line: flag `--idle-timeout`: must be more than zero"
    );
    let out = mxgate(&[
        "check",
        "--config",
        file,
        "--idle-timeout",
        "1m",
        "--max-connections",
        "2000000",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        "mxgate: command line: flag `--max-connections`: 2000000 is more than 1000000"
    );
}

/// mxgate.toml(5) is generated from the same definitions as the flags: every key the file
/// accepts is on the page, and the page renders without a warning.
#[test]
fn the_config_man_page_names_every_key() {
    let out = mxgate(&["man", "mxgate.toml"]);
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    let effective = String::from_utf8(
        mxgate(&[
            "check",
            "--config",
            write_config(
                "man-keys.toml",
                "backend = \"127.0.0.1:2525\"\nhostname = \"mx.test\"\n",
            )
            .to_str()
            .unwrap(),
        ])
        .stdout,
    )
    .unwrap();
    // Every top-level key `mxgate check` prints (the effective config) is documented.
    let keys: Vec<&str> = effective
        .lines()
        .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
        .filter(|k| !k.contains('.') && !k.starts_with('['))
        .collect();
    assert!(keys.len() >= 30, "{keys:?}");
    for key in keys {
        let roff = key.replace('-', "\\-");
        assert!(
            page.contains(&format!("\\fB{roff}\\fR")),
            "{key} missing from mxgate.toml(5)"
        );
    }
    assert!(page.contains("\\fBbackends\\fR"), "backends");
    // Each table is a section of its own, its keys inside it.
    for table in ["[cluster] TABLE", "[[network]] TABLES", "[replies] TABLE"] {
        assert!(page.contains(&format!(".SH {table}\n")), "{table}");
    }
}
