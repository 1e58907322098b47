//! A real transparent path across network namespaces this test creates, using only
//! documentation ranges: a client at 192.0.2.10, mxgate at 192.0.2.1 / 198.51.100.1, and a
//! backend at 198.51.100.20 whose route back to clients goes through mxgate. With
//! `--transparent` the backend must see 192.0.2.10 as its peer; without, mxgate's own address.
//! Needs root (in CI it must run; locally it skips when not root).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The three namespaces, torn down however the test ends.
struct Lab {
    client: String,
    mx: String,
    backend: String,
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    fn new() -> Lab {
        let id = std::process::id();
        let lab = Lab {
            client: format!("mxt-c-{id}"),
            mx: format!("mxt-m-{id}"),
            backend: format!("mxt-b-{id}"),
        };
        for ns in [&lab.client, &lab.mx, &lab.backend] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let (c, m, b) = (lab.client.as_str(), lab.mx.as_str(), lab.backend.as_str());
        sh(&[
            "ip", "link", "add", "vc0", "netns", c, "type", "veth", "peer", "name", "vm0", "netns",
            m,
        ]);
        sh(&[
            "ip", "link", "add", "vm1", "netns", m, "type", "veth", "peer", "name", "vb0", "netns",
            b,
        ]);
        sh(&["ip", "-n", c, "addr", "add", "192.0.2.10/24", "dev", "vc0"]);
        sh(&["ip", "-n", m, "addr", "add", "192.0.2.1/24", "dev", "vm0"]);
        sh(&[
            "ip",
            "-n",
            m,
            "addr",
            "add",
            "198.51.100.1/24",
            "dev",
            "vm1",
        ]);
        sh(&[
            "ip",
            "-n",
            b,
            "addr",
            "add",
            "198.51.100.20/24",
            "dev",
            "vb0",
        ]);
        for (ns, dev) in [(c, "vc0"), (m, "vm0"), (m, "vm1"), (b, "vb0")] {
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        sh(&["ip", "-n", c, "route", "add", "default", "via", "192.0.2.1"]);
        // The backend's route back to clients goes through the mxgate host.
        sh(&[
            "ip",
            "-n",
            b,
            "route",
            "add",
            "default",
            "via",
            "198.51.100.1",
        ]);
        // The recipe of docs/deploy-exchange.md, on the mxgate host: marked packets are delivered locally.
        sh(&["ip", "-n", m, "rule", "add", "fwmark", "1", "lookup", "100"]);
        sh(&[
            "ip",
            "-n",
            m,
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            m,
            "nft",
            "add table ip mxgate; \
             add chain ip mxgate prerouting { type filter hook prerouting priority mangle; }; \
             add rule ip mxgate prerouting meta l4proto tcp socket transparent 1 meta mark set 1",
        ]);
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.client, &self.mx, &self.backend] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A backend in its namespace that greets each connection with the peer address it sees.
fn backend(ns: &str) -> KillOnDrop {
    let script = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.51.100.20", 2525))
s.listen(16)
print("ready", flush=True)
while True:
    c, a = s.accept()
    c.sendall(("220 peer " + a[0] + "\r\n").encode())
    c.close()
"#;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Ready once it says so: it is listening.
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    KillOnDrop(child)
}

/// The client, in its namespace: the first line it reads through mxgate, or None.
fn client_line(ns: &str) -> Option<String> {
    let script = r#"
import socket
s = socket.create_connection(("192.0.2.1", 25), timeout=3)
print(s.recv(200).decode().strip())
"#;
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", script])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// mxgate in its namespace; `transparent` adds the flag.
fn mxgate(ns: &str, transparent: bool) -> KillOnDrop {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_mxgate"), "run"])
        .args([
            "--listen",
            "192.0.2.1:25",
            "--backend",
            "198.51.100.20:2525",
        ])
        .args(["--metrics", "off", "--hostname", HOST, "--pregreet", "off"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    if transparent {
        cmd.arg("--transparent");
    }
    KillOnDrop(cmd.spawn().unwrap())
}

/// Polls the client until mxgate answers (it has just been started), within 10 s.
fn first_answer(ns: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = client_line(ns) {
            if !line.is_empty() {
                return line;
            }
        }
        assert!(
            Instant::now() < deadline,
            "mxgate never answered in the lab"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_backend_sees_the_client_address_only_in_transparent_mode() {
    if !is_root() {
        assert!(!in_ci(), "CI runs as root: this test must run there");
        eprintln!("SKIP: network namespaces need root");
        return;
    }
    for tool in ["ip", "nft", "python3"] {
        if !require_tool(tool) {
            return;
        }
    }
    let lab = Lab::new();
    let _backend = backend(&lab.backend);

    let mx = mxgate(&lab.mx, true);
    assert_eq!(first_answer(&lab.client), "220 peer 192.0.2.10");
    drop(mx);

    let mx = mxgate(&lab.mx, false);
    assert_eq!(first_answer(&lab.client), "220 peer 198.51.100.1");
    drop(mx);
}

#[test]
fn transparent_mode_without_the_capability_fails_at_start_up() {
    if !is_root() || !require_tool("setpriv") {
        eprintln!("SKIP: dropping the capability needs root and setpriv");
        return;
    }
    // IP_TRANSPARENT is allowed with CAP_NET_ADMIN or CAP_NET_RAW: drop both.
    let mut child = KillOnDrop(
        Command::new("setpriv")
            .args([
                "--inh-caps=-all",
                "--bounding-set=-net_admin,-net_raw",
                "--",
            ])
            .arg(env!("CARGO_BIN_EXE_mxgate"))
            .args([
                "run",
                "--transparent",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                "off",
            ])
            .args(["--backend", "127.0.0.1:25", "--hostname", HOST])
            .args(["--pregreet", "off"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "mxgate started without the capability"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    assert!(
        err.contains("AmbientCapabilities"),
        "says how the unit grants it: {err}"
    );
}
