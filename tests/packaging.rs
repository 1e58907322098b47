//! What ships: the systemd units, the monitoring files, the man pages, and the Debian package
//! installed for real with dpkg (as root; `.ci/run` builds it with `systemd/build-deb.sh`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn ok(out: &Output) -> String {
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn alert_rules_pass_promtool() {
    if !require_tool("promtool") {
        return;
    }
    let rules = root().join("systemd/mxgate-alerts.yml");
    let text = ok(&run(
        "promtool",
        &["check", "rules", rules.to_str().unwrap()],
    ));
    assert!(text.contains("SUCCESS: 13 rules found"), "{text}");
}

#[test]
fn grafana_dashboard_parses_and_uses_real_metrics() {
    let text = std::fs::read_to_string(root().join("systemd/grafana-dashboard.json")).unwrap();
    // A JSON parse through python3, which every Debian machine has, keeps serde_json out of the
    // dependency tree; the metric names are checked against the contract.
    let out = Command::new("python3")
        .args([
            "-c",
            "import json,sys; d=json.load(sys.stdin); print(len(d['panels']))",
        ])
        .stdin(std::fs::File::open(root().join("systemd/grafana-dashboard.json")).unwrap())
        .output()
        .unwrap();
    assert_eq!(ok(&out).trim(), "16");
    // Nothing is summed across instances, and the dry-run label is gone.
    assert!(!text.contains("dry_run"), "a dry_run selector is left");
    for sum in text.match_indices("sum by (") {
        let by = &text[sum.0..][..text[sum.0..].find(')').unwrap()];
        assert!(by.contains("instance"), "{by}: sums across instances");
    }
    for name in [
        "mxgate_connections_active",
        "mxgate_connections_queued",
        "mxgate_queue_wait_seconds_bucket",
        "mxgate_limit{kind=\\\"max_queued\\\"",
        "mxgate_limit{kind=\\\"max_connections\\\"",
        "mxgate_connections_accepted_total",
        "mxgate_connections_rejected_total",
        "mxgate_bytes_total",
        "mxgate_backend_limit",
        "mxgate_backend_busy_total",
        "mxgate_backend_greeting_seconds_bucket",
        "mxgate_connections_would_reject_total",
        "mxgate_backend_up",
        "mxgate_backend_health_checks_total",
        "mxgate_session_duration_seconds_bucket",
        "mxgate_config_last_reload_successful",
        "mxgate_config_reloads_total",
        "mxgate_connections_active_max",
        "mxgate_sources_refused",
        "mxgate_cluster_connections",
        "mxgate_cluster_instances",
        "mxgate_cluster_connected",
        "mxgate_cluster_warming",
        "mxgate_cluster_disconnects_total",
        "mxgate_cluster_admission_seconds_bucket",
        "mxgate_cluster_fallback_admissions_total",
    ] {
        assert!(text.contains(name), "dashboard uses {name}");
    }
    // And every series it queries is one mxgate exports (a histogram through its buckets).
    let exported = std::fs::read_to_string(root().join("src/metrics/mod.rs")).unwrap();
    for (at, _) in text.match_indices("mxgate_") {
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let family = name.strip_suffix("_bucket").unwrap_or(&name);
        assert!(
            exported.contains(&format!("\"{family}\"")),
            "the dashboard queries {name}, which mxgate does not export"
        );
    }
}

/// `man -l` of one page, with groff's warnings on: the rendered text, which must come with
/// nothing on stderr.
fn render_man(path: &Path) -> String {
    let out = Command::new("man")
        .args(["--warnings", "-l", path.to_str().unwrap()])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    let text = ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim().is_empty(), "{}: {stderr}", path.display());
    text
}

#[test]
fn generated_man_pages_render() {
    if !require_tool("man") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("mxgate-man-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (page, expect) in [
        (None, "mxgate"),
        (Some("run"), "--max-per-source"),
        (Some("check"), "--config"),
        (Some("load"), "--target"),
        (Some("demo"), "greedy source"),
        (Some("status"), "--metrics"),
    ] {
        let mut args = vec!["man"];
        args.extend(page);
        let out = run(env!("CARGO_BIN_EXE_mxgate"), &args);
        assert!(out.status.success());
        let path = dir.join(format!("{}.1", page.unwrap_or("mxgate")));
        std::fs::write(&path, &out.stdout).unwrap();
        let text = render_man(&path);
        assert!(text.contains(expect), "{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_man_page_renders() {
    if !require_tool("man") {
        return;
    }
    let out = run(env!("CARGO_BIN_EXE_mxgate"), &["man", "mxgate.toml"]);
    let path = std::env::temp_dir().join(format!("mxgate.toml-{}.5", std::process::id()));
    std::fs::write(&path, ok(&out)).unwrap();
    let text = render_man(&path);
    let _ = std::fs::remove_file(&path);
    for key in ["max_per_source", "max_connections", "drain_timeout"] {
        assert!(text.contains(key), "mxgate.toml(5) describes {key}: {text}");
    }
}

#[test]
fn completions_cover_the_real_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(env!("CARGO_BIN_EXE_mxgate"), &["completions", shell]);
        let text = ok(&out);
        for flag in ["max-per-source", "rate-per-source", "drain-timeout"] {
            assert!(text.contains(flag), "{shell} completions know --{flag}");
        }
    }
}

#[test]
fn unit_exposure_score_stays_at_most_1_5() {
    if !require_tool("systemd-analyze") {
        return;
    }
    let unit = root().join("systemd/mxgate.service");
    // Without --threshold the exit status is 0 whatever the score (252 takes --threshold in
    // tenths, as an integer), so the score is read from the report. No colours: they would
    // split the line.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", unit.to_str().unwrap()])
        .env("SYSTEMD_COLORS", "0")
        .output()
        .unwrap();
    let text = ok(&out);
    let marker = "Overall exposure level for mxgate.service:";
    let line = text
        .lines()
        .find(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no overall exposure line: {text}"));
    let score: f64 = line
        .split(marker)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in: {line}"));
    assert!(
        score <= 1.5,
        "exposure {score} > 1.5; what is exposed:\n{text}"
    );
}

/// The .deb that `systemd/build-deb.sh` built, if any.
fn built_deb() -> Option<PathBuf> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("debian");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
}

/// The built package repacked as version 0.0.1-1 with the service unit where it used to be,
/// lib/systemd/system/, as the packages before the unit went to usr/lib/ had it.
fn old_layout(deb: &Path) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mxgate-old-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tree = dir.join("tree");
    ok(&run(
        "dpkg-deb",
        &["-R", deb.to_str().unwrap(), tree.to_str().unwrap()],
    ));
    std::fs::create_dir_all(tree.join("lib/systemd/system")).unwrap();
    std::fs::rename(
        tree.join("usr/lib/systemd/system/mxgate.service"),
        tree.join("lib/systemd/system/mxgate.service"),
    )
    .unwrap();
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    let text: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("Version:") {
                "Version: 0.0.1-1".to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&control, text.join("\n") + "\n").unwrap();
    // md5sums names files by path; drop it rather than keep stale lines (it is optional).
    let _ = std::fs::remove_file(tree.join("DEBIAN/md5sums"));
    let out = dir.join("old.deb");
    ok(&run(
        "dpkg-deb",
        &["-b", tree.to_str().unwrap(), out.to_str().unwrap()],
    ));
    let _ = std::fs::remove_dir_all(&tree);
    out
}

/// Purges the package however the test ends.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = run("dpkg", &["--purge", "mxgate"]);
    }
}

#[test]
fn deb_installs_every_file_and_purges() {
    let Some(deb) = built_deb() else {
        assert!(
            !in_ci(),
            "CI must build the package first (systemd/build-deb.sh)"
        );
        eprintln!("SKIP: no .deb built; run systemd/build-deb.sh");
        return;
    };
    if !is_root() {
        assert!(!in_ci(), "CI runs as root");
        eprintln!("SKIP: installing a package needs root");
        return;
    }
    if !(require_tool("dpkg") && require_tool("systemd-analyze")) {
        return;
    }
    let _purge = Purge;
    // First the layout the package had before (the unit under lib/), then this one over it: on a
    // merged-/usr system both paths name one file, and dpkg must not remove it as obsolete.
    let old = old_layout(&deb);
    ok(&run("dpkg", &["-i", old.to_str().unwrap()]));
    assert!(Path::new("/lib/systemd/system/mxgate.service").exists());
    let over = ok(&run("dpkg", &["-i", deb.to_str().unwrap()]));
    assert!(over.contains("over (0.0.1-1)"), "an upgrade: {over}");
    let _ = std::fs::remove_file(&old);
    ok(&run("dpkg", &["--purge", "mxgate"]));
    ok(&run("dpkg", &["-i", deb.to_str().unwrap()]));
    for f in [
        "/usr/bin/mxgate",
        "/etc/mxgate/mxgate.toml",
        "/usr/lib/systemd/system/mxgate.service",
        "/lib/systemd/system/mxgate.socket",
        "/usr/share/bash-completion/completions/mxgate",
        "/usr/share/zsh/vendor-completions/_mxgate",
        "/usr/share/fish/vendor_completions.d/mxgate.fish",
        "/usr/share/doc/mxgate/mxgate-alerts.yml",
        "/usr/share/doc/mxgate/docs/configuration.md",
        "/etc/fail2ban/jail.d/mxgate.conf",
        "/etc/fail2ban/filter.d/mxgate.conf",
    ]
    .into_iter()
    .chain(MAN_PAGES)
    {
        assert!(Path::new(f).exists(), "{f} installed");
    }
    let conffiles = ok(&run("dpkg-query", &["-W", "-f=${Conffiles}", "mxgate"]));
    for conffile in [
        "/etc/mxgate/mxgate.toml",
        "/etc/fail2ban/jail.d/mxgate.conf",
        "/etc/fail2ban/filter.d/mxgate.conf",
    ] {
        assert!(conffiles.contains(conffile), "{conffile}: {conffiles}");
    }
    ok(&run("getent", &["passwd", "mxgate"]));
    let conf = "/etc/mxgate/mxgate.toml";
    readable_by_root_and_mxgate_only(conf);
    // The shipped backend is a placeholder: check (and so ExecStartPre) refuses it, saying
    // what to do; once the operator sets it, the file passes.
    let refused = run("/usr/bin/mxgate", &["check", "--config", conf]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("key `backend`"), "{why}");
    assert!(
        why.contains("set backend to your mail server's HOST:PORT"),
        "{why}"
    );
    let set = std::fs::read_to_string(conf)
        .unwrap()
        .replace("exchange.example.invalid:2526", "127.0.0.1:2526");
    std::fs::write(conf, &set).unwrap();
    let check = ok(&run("/usr/bin/mxgate", &["check", "--config", conf]));
    assert!(check.contains("max_per_source = 20"), "{check}");
    let verify = run(
        "systemd-analyze",
        &[
            "verify",
            "/usr/lib/systemd/system/mxgate.service",
            "/lib/systemd/system/mxgate.socket",
        ],
    );
    let text = ok(&verify);
    assert!(
        !text.contains("mxgate.service:"),
        "no complaint about the unit: {text}"
    );
    if require_tool("man") {
        for page in MAN_PAGES {
            let text = render_man(Path::new(page));
            assert!(text.contains("mxgate"), "{page}: {text}");
        }
        let run_page = render_man(Path::new("/usr/share/man/man1/mxgate-run.1.gz"));
        assert!(run_page.contains("--max-per-source"));
    }

    // Neither unit is enabled or started on install: the shipped backend is a placeholder, and
    // port 25 is often still the old server's. The operator edits the file, then enables.
    assert!(
        !Path::new(SERVICE_WANTS).exists(),
        "mxgate.service not enabled"
    );
    assert!(
        !Path::new(SOCKET_WANTS).exists(),
        "mxgate.socket not enabled"
    );
    maintainer_scripts_restart_the_service();

    // An upgrade (the same version over itself runs the same path: prerm upgrade, unpack,
    // postinst configure <old version>) keeps the operator's edit of the conffile.
    let edited = std::fs::read_to_string(conf).unwrap().replace(
        "#max_per_source = 20",
        "max_per_source = 21 # the operator's",
    );
    assert_ne!(edited, set);
    std::fs::write(conf, &edited).unwrap();
    let upgrade = ok(&run("dpkg", &["-i", deb.to_str().unwrap()]));
    assert!(upgrade.contains("over (0."), "an upgrade: {upgrade}");
    assert_eq!(std::fs::read_to_string(conf).unwrap(), edited);
    let check = ok(&run("/usr/bin/mxgate", &["check", "--config", conf]));
    assert!(check.contains("max_per_source = 21"), "{check}");
    readable_by_root_and_mxgate_only(conf);
    ok(&run("getent", &["passwd", "mxgate"]));
    assert!(!Path::new(SERVICE_WANTS).exists(), "still not enabled");
    assert!(!Path::new(SOCKET_WANTS).exists(), "still not enabled");

    ok(&run("dpkg", &["--purge", "mxgate"]));
    assert!(!Path::new("/usr/bin/mxgate").exists());
    assert!(!Path::new("/etc/mxgate/mxgate.toml").exists());
    assert!(!Path::new(SERVICE_WANTS).exists());
}

/// The config may hold a Redis password: 0640, root:mxgate.
fn readable_by_root_and_mxgate_only(path: &str) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o640, "{path}");
    assert_eq!(meta.uid(), 0, "{path}");
    let group = ok(&run("getent", &["group", "mxgate"]));
    let gid: u32 = group.split(':').nth(2).unwrap().trim().parse().unwrap();
    assert_eq!(meta.gid(), gid, "{path}");
}

const MAN_PAGES: [&str; 7] = [
    "/usr/share/man/man1/mxgate.1.gz",
    "/usr/share/man/man1/mxgate-run.1.gz",
    "/usr/share/man/man1/mxgate-check.1.gz",
    "/usr/share/man/man1/mxgate-load.1.gz",
    "/usr/share/man/man1/mxgate-demo.1.gz",
    "/usr/share/man/man1/mxgate-status.1.gz",
    "/usr/share/man/man5/mxgate.toml.5.gz",
];
const SERVICE_WANTS: &str = "/etc/systemd/system/multi-user.target.wants/mxgate.service";
const SOCKET_WANTS: &str = "/etc/systemd/system/sockets.target.wants/mxgate.socket";

/// What the installed maintainer scripts would ask of systemd. There is no systemd to ask here,
/// so each script runs with its `[ -d /run/systemd/system ]` test taken as true and with
/// deb-systemd-invoke and systemctl replaced by stubs that log their arguments (the real
/// deb-systemd-helper runs: it only keeps links and state files): this checks the scripts'
/// decisions, not a real restart.
fn maintainer_scripts_restart_the_service() {
    let dir = std::env::temp_dir().join(format!("mxgate-maint-{}", std::process::id()));
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = dir.join("log");
    for tool in ["deb-systemd-invoke", "systemctl"] {
        let path = bin.join(tool);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho \"{tool} $*\" >> \"$STUB_LOG\"\n"),
        )
        .unwrap();
        ok(&run("chmod", &["755", path.to_str().unwrap()]));
    }
    let calls = |script: &str, args: &[&str]| -> String {
        let text = std::fs::read_to_string(format!("/var/lib/dpkg/info/mxgate.{script}")).unwrap();
        assert!(!text.contains("#DEBHELPER#"), "{script}: token replaced");
        let copy = dir.join(script);
        std::fs::write(&copy, text.replace("[ -d /run/systemd/system ]", "true")).unwrap();
        let _ = std::fs::remove_file(&log);
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        let out = Command::new("sh")
            .arg(&copy)
            .args(args)
            .env("PATH", path)
            .env("STUB_LOG", &log)
            .output()
            .unwrap();
        ok(&out);
        std::fs::read_to_string(&log).unwrap_or_default()
    };

    // First install: a daemon-reload, and neither unit enabled or started.
    let install = calls("postinst", &["configure"]);
    assert_eq!(install, "systemctl --system daemon-reload\n");
    assert!(!Path::new(SERVICE_WANTS).exists(), "postinst enabled it");
    // Upgrade: nothing stops the service before the unpack; postinst restarts it after if it
    // runs (try-restart), and leaves mxgate.socket, so its listening socket stays open.
    let prerm = calls("prerm", &["upgrade", "0.1.0"]);
    assert_eq!(prerm, "");
    let upgrade = calls("postinst", &["configure", "0.1.0"]);
    assert_eq!(
        upgrade,
        "systemctl --system daemon-reload\ndeb-systemd-invoke try-restart mxgate.service\n"
    );
    // Removal: the socket first, so that no client starts the service again, then the service.
    let remove = calls("prerm", &["remove"]);
    assert_eq!(
        remove,
        "deb-systemd-invoke stop mxgate.socket\ndeb-systemd-invoke stop mxgate.service\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
