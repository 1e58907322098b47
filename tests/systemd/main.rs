//! The Debian package under a real systemd: a minimal Debian booted in a container
//! (`container`), the freshly built `.deb` installed with dpkg, Postfix's `smtp-sink` inside
//! as the backend, and what an operator does checked for real: enable and start, a message
//! sent with swaks through the installed mxgate as a new administrator would try it, a reload
//! with a bad config, an upgrade under socket activation with clients arriving throughout,
//! the watchdog, the unit's exposure score, and warnings in the journal.
//!
//! Needs root, debootstrap, systemd-nspawn (systemd-container) and a `.deb` from
//! `systemd/build-deb.sh`; skips with a reason without them, and fails in CI (`CI=true`).

#[path = "../common/mod.rs"]
mod common;
mod container;
mod smtp;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use container::{Container, Root};
use smtp::{Client, Load};

/// Where mxgate listens inside the container (the shipped `listen`, and mxgate.socket's).
const PORT_25: &str = "127.0.0.1:25";
/// Where smtp-sink listens inside.
const SINK: &str = "127.0.0.1:2526";
const CONF: &str = "/etc/mxgate/mxgate.toml";
const DRAIN_LINE: &str = "421 4.3.2 mx.test Service shutting down, try again later\r\n";

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

use common::in_ci;

/// The .deb `systemd/build-deb.sh` built, or why the test cannot run.
fn ready() -> Result<PathBuf, String> {
    if !common::is_root() {
        return Err("booting a container and installing a package need root".into());
    }
    for tool in [
        "debootstrap",
        "systemd-nspawn",
        "nsenter",
        "dpkg-deb",
        "chroot",
    ] {
        if !common::require_tool(tool) {
            return Err(format!("{tool} is not installed"));
        }
    }
    std::fs::read_dir(target_dir().join("debian"))
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
        })
        .ok_or_else(|| "no .deb built; run systemd/build-deb.sh".into())
}

/// The built package repacked with a higher version, as the next release would come.
fn newer(deb: &Path, dir: &Path) -> (PathBuf, String) {
    let tree = dir.join("newer-tree");
    let _ = std::fs::remove_dir_all(&tree);
    let run = |args: &[&str]| {
        let out = Command::new("dpkg-deb").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["-R", deb.to_str().unwrap(), tree.to_str().unwrap()]);
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    let old = text
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .expect("a Version field")
        .to_string();
    let version = format!("{old}+next1");
    let text = text.replace(
        &format!("Version: {old}\n"),
        &format!("Version: {version}\n"),
    );
    std::fs::write(&control, text).unwrap();
    let out = dir.join("mxgate-next.deb");
    // gzip at its fastest: the package is rebuilt on every run, and xz takes long on it.
    run(&[
        "-Zgzip",
        "-z1",
        "-b",
        tree.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_dir_all(&tree);
    (out, version)
}

/// Sets a top-level key the way an administrator edits the file: the key's line replaced, or
/// the key added before the first table.
fn set_key(text: &str, key: &str, value: &str) -> String {
    let line = format!("{key} = {value}");
    let is_key = |l: &str| {
        l.split_once('=')
            .is_some_and(|(k, _)| k.trim() == key && !l.trim_start().starts_with('#'))
    };
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    if let Some(i) = lines.iter().position(|l| is_key(l)) {
        lines[i] = line;
    } else {
        let table = lines
            .iter()
            .position(|l| l.trim_start().starts_with('['))
            .unwrap_or(lines.len());
        lines.insert(table, line);
    }
    lines.join("\n") + "\n"
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn the_package_under_a_real_systemd() {
    let deb = match ready() {
        Ok(deb) => deb,
        Err(why) => {
            assert!(!in_ci(), "CI must run the systemd test: {why}");
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let run = RunDir(target_dir().join(format!("systemd-run-{}", std::process::id())));
    let run_dir = &run.0;
    let root = Root::cached(&target_dir());
    match root.built_in {
        Some(t) => eprintln!(
            "root built in {:.1} s: {}",
            t.as_secs_f64(),
            root.dir.display()
        ),
        None => eprintln!("root reused from the cache: {}", root.dir.display()),
    }
    let ct = Container::boot(
        &root,
        run_dir.join("root"),
        &format!("mxgate-test-{}", std::process::id()),
    );
    eprintln!(
        "copied and booted to `running` in {:.1} s",
        ct.booted_in.as_secs_f64()
    );
    let (next_deb, next_version) = newer(&deb, run_dir);
    std::fs::copy(&deb, ct.dir.join("root/mxgate.deb")).unwrap();
    std::fs::copy(&next_deb, ct.dir.join("root/mxgate-next.deb")).unwrap();

    let started = Instant::now();
    let sink_greeting = install_and_start(&ct);
    eprintln!(
        "installed and started in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    swaks_through_mxgate(&ct, &sink_greeting);
    reload_with_a_bad_config(&ct, &sink_greeting);
    warnings_reach_the_journal(&ct);
    exposure_score(&ct);
    let started = Instant::now();
    upgrade_under_socket_activation(&ct, &sink_greeting, &next_version);
    eprintln!(
        "upgrade phase took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    watchdog_restarts_a_stopped_process(&ct, &sink_greeting);
    eprintln!(
        "watchdog phase took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The run's own files (the container's copy of the root, the repacked package), removed
/// however the test ends, after the container is gone.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// dpkg -i, smtp-sink started, the backend set as an administrator would, then
/// `systemctl enable --now`: a client gets the backend's greeting through mxgate. Returns that
/// greeting.
fn install_and_start(ct: &Container) -> String {
    ct.ok("dpkg -i /root/mxgate.deb");
    ct.ok(&format!(
        "systemd-run --unit=sink --property=Restart=no /usr/sbin/smtp-sink -u nobody {SINK} 256"
    ));
    let net = ct.net();
    let sink_greeting = smtp::wait_greeting(&net, addr(SINK), Duration::from_secs(15));
    assert!(sink_greeting.starts_with("220 "), "{sink_greeting:?}");

    let conf = ct.read(CONF);
    let conf = set_key(&conf, "backend", &format!("\"{SINK}\""));
    let conf = set_key(&conf, "hostname", "\"mx.test\"");
    // These tests are about the package, not the pregreet test (on by default).
    let conf = set_key(&conf, "pregreet", "\"off\"");
    ct.write(CONF, conf.as_bytes());
    ct.ok("mxgate check --config /etc/mxgate/mxgate.toml");
    ct.ok("systemctl enable --now mxgate.service");
    assert_eq!(ct.ok("systemctl is-active mxgate.service").trim(), "active");
    assert_eq!(
        ct.ok("systemctl is-enabled mxgate.service").trim(),
        "enabled"
    );
    let mut c = Client::connect(&net, "127.0.0.2", addr(PORT_25)).expect("connects");
    assert_eq!(
        c.line(),
        sink_greeting,
        "the backend's greeting through mxgate"
    );
    c.mail_transaction();
    sink_greeting
}

/// Where swaks sends from inside the container: its session line names this address and port.
const SWAKS_SOURCE: &str = "127.0.0.5";
const SWAKS_PORT: &str = "40125";

/// The README's first try, as a new administrator makes it once the package is installed
/// and started: a message with swaks, run on the mxgate host, through mxgate on port 25 to
/// the backend (smtp-sink), which queues it. swaks exits 0, the end of DATA gets smtp-sink's
/// own `250 2.0.0 Ok` through mxgate, and mxgate's session line for that connection reaches
/// the journal with exactly the bytes swaks sent and received.
fn swaks_through_mxgate(ct: &Container, greeting: &str) {
    let out = ct.exec(&[
        "swaks",
        "--server",
        PORT_25,
        "--local-interface",
        SWAKS_SOURCE,
        "--local-port",
        SWAKS_PORT,
        "--helo",
        "client.test",
        "--from",
        "a@client.test",
        "--to",
        "b@backend.test",
        "--header",
        "Subject: swaks through mxgate",
        "--body",
        "hello",
    ]);
    let transcript = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(0),
        "swaks through mxgate:\n{transcript}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = transcript.lines().collect();
    // swaks marks what it received with "<-  " and what it sent with " -> ".
    assert_eq!(
        lines.iter().find(|l| l.starts_with("<-  ")).copied(),
        Some(format!("<-  {}", greeting.trim_end()).as_str()),
        "the backend's greeting through mxgate:\n{transcript}"
    );
    let end_of_data = lines
        .iter()
        .position(|l| *l == " -> .")
        .unwrap_or_else(|| panic!("no end of DATA:\n{transcript}"));
    assert_eq!(
        lines.get(end_of_data + 1).copied(),
        Some("<-  250 2.0.0 Ok"),
        "smtp-sink's queued reply through mxgate:\n{transcript}"
    );
    // Each transcript line is one SMTP line without its CRLF.
    let bytes = |mark: &str| -> usize {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(mark))
            .map(|l| l.len() + 2)
            .sum()
    };
    let (sent, received) = (bytes(" -> "), bytes("<-  "));
    let session = format!(
        "session finished src={SWAKS_SOURCE} port={SWAKS_PORT} source={SWAKS_SOURCE} \
         backend={SINK} "
    );
    let counts = format!(" client_to_backend={sent} backend_to_client={received} ");
    let found = ct.wait_for(
        "journalctl --no-pager -u mxgate.service -o cat",
        Duration::from_secs(10),
        |o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.contains(&session))
        },
    );
    let journal = String::from_utf8_lossy(&found.stdout).to_string();
    let line = journal.lines().find(|l| l.contains(&session)).unwrap();
    assert!(
        line.contains(&counts) && line.ends_with(" end=closed"),
        "want{counts}and end=closed in:\n{line}"
    );
    eprintln!("swaks through mxgate: exit 0, `250 2.0.0 Ok`, journal: {line}");
}

/// `systemctl reload` with a bad config fails where the operator sees it, names the file and
/// the key, and the old config keeps serving in the same process.
fn reload_with_a_bad_config(ct: &Container, greeting: &str) {
    let pid = main_pid(ct);
    let good = ct.read(CONF);
    ct.write(
        CONF,
        set_key(&good, "max_connections", "\"lots\"").as_bytes(),
    );
    let (text, ok) = ct.sh("systemctl reload mxgate.service");
    assert!(!ok, "a bad config must fail the reload: {text}");
    let (status, _) = ct.sh("systemctl status --no-pager --lines=20 mxgate.service");
    let journal = ct.ok("journalctl --no-pager -u mxgate.service");
    assert!(
        journal.contains(CONF) && journal.contains("max_connections"),
        "the failure names the file and the key:\n{journal}"
    );
    assert!(status.contains("active (running)"), "{status}");
    assert_eq!(main_pid(ct), pid, "the same process goes on");
    let net = ct.net();
    let mut c = Client::connect(&net, "127.0.0.3", addr(PORT_25)).expect("connects");
    assert_eq!(c.line(), greeting, "still serving");
    c.quit();
    ct.write(CONF, good.as_bytes());
    ct.ok("systemctl reload mxgate.service");
    eprintln!("reload with a bad config: refused, still serving (pid {pid})");
}

/// What mxgate logs at warning level reaches `journalctl -p warning`: here the relay warning
/// for a loopback backend.
fn warnings_reach_the_journal(ct: &Container) {
    let warnings = ct.ok("journalctl --no-pager -p warning -u mxgate.service -o cat");
    let want = format!("backend {SINK}: every client will reach it from mxgate's own address");
    assert!(warnings.contains(&want), "{warnings}");
}

/// `systemd-analyze security` on the installed unit, under the running systemd.
fn exposure_score(ct: &Container) {
    let text = ct.ok("systemd-analyze security --no-pager mxgate.service");
    let marker = "Overall exposure level for mxgate.service:";
    let score: f64 = text
        .lines()
        .find_map(|l| l.split(marker).nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in:\n{text}"));
    eprintln!("systemd-analyze security mxgate.service: {score}");
    assert!(score <= 1.5, "exposure {score} > 1.5:\n{text}");
}

fn main_pid(ct: &Container) -> u32 {
    let text = ct.ok("systemctl show -p MainPID --value mxgate.service");
    text.trim().parse().unwrap()
}

/// With mxgate.socket holding port 25 and clients arriving throughout, `dpkg -i` of a newer
/// build restarts mxgate: no client is refused or reset, the sessions in progress finish, and
/// the clients waiting in mxgate's queue at that moment get the draining 421 (counted).
fn upgrade_under_socket_activation(ct: &Container, greeting: &str, next_version: &str) {
    const SLOTS: usize = 4;
    const LOAD: usize = 8;
    let conf = ct.read(CONF);
    // Few slots, and a queue that holds every load client for as long as the upgrade takes.
    let conf = set_key(&conf, "max_connections", &SLOTS.to_string());
    let conf = set_key(&conf, "max_queued", "64");
    let conf = set_key(&conf, "queue_timeout", "\"120s\"");
    ct.write(CONF, conf.as_bytes());
    ct.ok("systemctl stop mxgate.service && systemctl enable --now mxgate.socket");
    ct.ok("systemctl start mxgate.service");
    let journal = ct.ok("journalctl --no-pager -u mxgate.service -o cat -n 50");
    assert!(
        journal.contains("socket-activated: the sockets systemd passed are used"),
        "{journal}"
    );
    let old_pid = main_pid(ct);
    let net = ct.net();
    let hold = |src: &str| {
        let mut c = Client::connect(&net, src, addr(PORT_25)).expect("connects");
        assert_eq!(c.line(), greeting);
        c.begin_transaction();
        c
    };
    let mut held = vec![hold("127.0.1.1"), hold("127.0.1.2")];
    let load = Load::start(&net, addr(PORT_25), greeting, LOAD);
    load.wait_served(20, Duration::from_secs(30));
    // The other slots taken too: every load client now waits in the queue.
    held.push(hold("127.0.1.3"));
    held.push(hold("127.0.1.4"));
    let waiting = format!("{SLOTS}/{SLOTS} sessions, {LOAD} waiting, 1/1 backends up");
    ct.wait_for(
        "systemctl show -p StatusText --value mxgate.service",
        Duration::from_secs(30),
        |o| String::from_utf8_lossy(&o.stdout).trim() == waiting,
    );

    let started = Instant::now();
    let mut dpkg = ct.command(&["dpkg", "-i", "/root/mxgate-next.deb"]);
    let dpkg = std::thread::spawn(move || dpkg.output().expect("nsenter"));
    ct.wait_for(
        "systemctl is-active mxgate.service",
        Duration::from_secs(60),
        |o| String::from_utf8_lossy(&o.stdout).trim() == "deactivating",
    );
    let draining_after = started.elapsed();
    // Each finishes and closes, as a real client does after QUIT.
    for mut c in held {
        c.finish_transaction();
    }
    let out = dpkg.join().unwrap();
    assert!(
        out.status.success(),
        "dpkg -i:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dpkg_took = started.elapsed();
    ct.wait_for(
        "systemctl is-active mxgate.service",
        Duration::from_secs(30),
        |o| String::from_utf8_lossy(&o.stdout).trim() == "active",
    );
    let new_pid = main_pid(ct);
    assert_ne!(new_pid, old_pid, "the upgrade restarted mxgate");
    let before = load.served();
    load.wait_served(before + 20, Duration::from_secs(30));
    let report = load.stop();
    eprintln!(
        "upgrade under socket activation: {report}; draining {:.1} s after dpkg -i began, \
         dpkg done after {:.1} s",
        draining_after.as_secs_f64(),
        dpkg_took.as_secs_f64()
    );
    assert_eq!(
        report.failed,
        Vec::<String>::new(),
        "no client refused or reset"
    );
    assert_eq!(
        report.drained, LOAD,
        "the clients queued when the drain began"
    );
    assert!(report.served >= 40, "{report}");
    assert_eq!(
        ct.ok("dpkg-query -W -f='${Version}' mxgate").trim(),
        next_version
    );
    let log = ct.ok(&format!("journalctl --no-pager _PID={old_pid} -o cat"));
    assert!(
        log.contains("no longer accepting") && log.contains(&format!("queued={LOAD}")),
        "{log}"
    );
}

/// SIGSTOP freezes mxgate: its watchdog pings stop, and systemd restarts it.
fn watchdog_restarts_a_stopped_process(ct: &Container, greeting: &str) {
    let pid = main_pid(ct);
    let restarts = ct.ok("systemctl show -p NRestarts --value mxgate.service");
    ct.ok(&format!("kill -STOP {pid}"));
    let stopped = Instant::now();
    ct.wait_for(
        "systemctl show -p MainPID --value mxgate.service; systemctl is-active mxgate.service",
        Duration::from_secs(90),
        |o| {
            let text = String::from_utf8_lossy(&o.stdout);
            let mut lines = text.lines();
            let main = lines.next().unwrap_or_default().trim();
            let active = lines.next().unwrap_or_default().trim();
            main != "0" && main != pid.to_string() && active == "active"
        },
    );
    eprintln!(
        "watchdog: stopped pid {pid}, running again as pid {} after {:.1} s",
        main_pid(ct),
        stopped.elapsed().as_secs_f64()
    );
    let journal = ct.ok("journalctl --no-pager -u mxgate.service -o cat");
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    let after = ct.ok("systemctl show -p NRestarts --value mxgate.service");
    assert_eq!(
        after.trim().parse::<u32>().unwrap(),
        restarts.trim().parse::<u32>().unwrap() + 1
    );
    let net = ct.net();
    let mut c = Client::connect(&net, "127.0.0.4", addr(PORT_25)).expect("connects");
    assert_eq!(c.line(), greeting);
    c.quit();
}
