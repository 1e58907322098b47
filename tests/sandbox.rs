//! What the shipped unit's sandbox leaves mxgate: no /proc/sys (ProcSubset=pid), and the
//! transparent-mode start-up check done once. Needs root for the mount namespace.

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};

use common::*;

fn can_run() -> bool {
    if !is_root() {
        assert!(!in_ci(), "CI runs as root");
        eprintln!("SKIP: a mount namespace needs root");
        return false;
    }
    require_tool("unshare")
}

/// Runs mxgate with `args` in a private mount namespace whose /proc/sys is an empty tmpfs.
fn without_proc_sys(args: &str) -> std::process::Output {
    let bin = env!("CARGO_BIN_EXE_mxgate");
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /proc/sys && test ! -e /proc/sys/kernel/hostname && exec {bin} {args}"
        ))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn mxgate_needs_nothing_from_proc_sys() {
    if !can_run() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("mxgate-sandbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mxgate.toml");
    std::fs::write(&file, "backend = \"192.0.2.25:25\"\n").unwrap();
    // The host name comes from uname(2), not /proc/sys/kernel/hostname.
    let out = without_proc_sys(&format!("check --config {}", file.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uname = Command::new("uname").arg("-n").output().unwrap();
    let name = String::from_utf8_lossy(&uname.stdout).trim().to_string();
    assert!(!name.is_empty());
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains(&format!("hostname = \"{name}\"")), "{shown}");
    // The whole job, splice pipes included, runs without /proc/sys/fs.
    let demo = without_proc_sys("demo");
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_transparent_start_up_check_runs_once() {
    if !can_run() {
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .args([
            "run",
            "--hostname",
            HOST,
            "--metrics",
            "off",
            "--transparent",
        ])
        .args(["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:2525"])
        .args(["--backend", "127.0.0.1:2526", "--pregreet", "off"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut checks = 0;
    let mut accepting = false;
    for line in stderr.lines().map_while(Result::ok) {
        if line.contains("transparent mode: checking") {
            checks += 1;
        }
        if line.contains("accepting") {
            accepting = true;
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(accepting, "mxgate started");
    assert_eq!(checks, 1, "one check for the one backend family");
}
