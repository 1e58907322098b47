//! A Debian root booted with systemd-nspawn: a real systemd as PID 1, with its own network
//! namespace (`--private-network`, so its ports never clash with the host's).
//!
//! - The root is built once with debootstrap (`--variant=minbase`), from the mirror and the
//!   release in the machine's own apt sources (the package under test is built here, against
//!   this release's libc), then the packages the tests run inside ([`EXTRAS`]: Postfix for
//!   its `smtp-sink` under the "No configuration" preset, swaks as the administrator's client)
//!   installed with apt. It is cached under `target/systemd-root/`, keyed by the base recipe;
//!   the extras it holds are listed in a stamp file, and a cached root whose stamp lacks one
//!   is upgraded on a copy with apt rather than rebuilt. An unfinished build or upgrade is
//!   never reused.
//! - Every boot runs a copy of it, removed when the [`Container`] is dropped (after a
//!   poweroff, or a kill past a deadline), so nothing a test installs reaches the next run.
//! - Commands run inside with `nsenter -t PID -a`, PID being the container's systemd; client
//!   sockets are opened inside its network namespace from a thread that joined it.
//!
//! Every wait has a deadline and polls a condition; none sleeps for a guess.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// What goes into the root besides minbase. `adduser` is the package's own dependency.
const PACKAGES: &str = "systemd,systemd-sysv,dbus,iproute2,adduser";
/// Installed after debootstrap, with debconf answers set first.
const POSTFIX_PRESET: &str = "postfix postfix/main_mailer_type select No configuration";
/// Bumped whenever the base steps below (debootstrap and the preset) change what the root
/// holds; a change to [`EXTRAS`] alone upgrades a cached root instead.
const RECIPE: &str = "1";
/// Installed with apt after debootstrap, and each checked by the file it must provide:
/// smtp-sink as the backend, swaks as the client an administrator tries the install with.
pub const EXTRAS: &[(&str, &str)] = &[
    ("postfix", "usr/sbin/smtp-sink"),
    ("swaks", "usr/bin/swaks"),
];
/// The stamp in a cached root that lists the [`EXTRAS`] it holds, one name a line. A root
/// from before the stamp holds postfix only.
const EXTRAS_STAMP: &str = ".extras";

/// The build's log and how long it took, for the test's report.
pub struct Root {
    pub dir: PathBuf,
    /// `None` when the cached root was reused.
    pub built_in: Option<Duration>,
}

/// The Debian release this machine runs (`VERSION_CODENAME`), which the root must match.
fn host_suite() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
}

/// The first mirror in the machine's apt sources that serves `suite` itself (not -security or
/// -updates), from deb822 `.sources` files or one-line `.list` files.
pub fn host_mirror(suite: &str) -> Option<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    files.iter().find_map(|f| {
        let text = std::fs::read_to_string(f).ok()?;
        if f.extension().is_some_and(|x| x == "sources") {
            deb822_mirror(&text, suite)
        } else {
            one_line_mirror(&text, suite)
        }
    })
}

fn deb822_mirror(text: &str, suite: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
            })
        };
        let types = field("Types")?;
        let suites = field("Suites")?;
        let enabled = field("Enabled").is_none_or(|v| v != "no");
        (enabled
            && types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == suite))
        .then(|| field("URIs"))?
        .and_then(|u| u.split_whitespace().next().map(String::from))
    })
}

fn one_line_mirror(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let mut words = l.split_whitespace().filter(|w| !w.starts_with('['));
        // Options in brackets may hold spaces; they never look like a URI or a suite.
        if words.next()? != "deb" {
            return None;
        }
        let rest: Vec<&str> = words.filter(|w| !w.ends_with(']')).collect();
        (rest.len() >= 2 && rest[1] == suite).then(|| rest[0].to_string())
    })
}

fn digest(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        tail(&out.stdout),
        tail(&out.stderr)
    );
}

/// The last lines of a command's output, for a failure message.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n") + "\n"
}

impl Root {
    /// The cached root for this machine's release, built first if there is none.
    pub fn cached(target: &Path) -> Root {
        let suite = host_suite().expect("VERSION_CODENAME in /etc/os-release");
        let arch = String::from_utf8(
            Command::new("dpkg")
                .arg("--print-architecture")
                .output()
                .expect("dpkg")
                .stdout,
        )
        .unwrap();
        let key = format!(
            "{suite}-{}-{:016x}",
            arch.trim(),
            digest(&format!("{RECIPE}|{PACKAGES}|{POSTFIX_PRESET}"))
        );
        let cache = target.join("systemd-root");
        let dir = cache.join(&key);
        let partial = cache.join(format!("{key}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        if dir.join(".complete").exists() {
            let missing = missing_extras(&dir);
            if missing.is_empty() {
                return Root {
                    dir,
                    built_in: None,
                };
            }
            // Upgraded on a copy, swapped in only once done.
            let started = Instant::now();
            run_ok(
                Command::new("cp")
                    .args(["-a", "--reflink=auto"])
                    .arg(&dir)
                    .arg(&partial),
                "copying the cached root",
            );
            install_extras(&partial, &missing, true);
            let old = cache.join(format!("{key}.old"));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&dir, &old).unwrap();
            std::fs::rename(&partial, &dir).unwrap();
            let _ = std::fs::remove_dir_all(&old);
            eprintln!("cached root upgraded with {missing:?}");
            return Root {
                dir,
                built_in: Some(started.elapsed()),
            };
        }
        let mirror = host_mirror(&suite)
            .unwrap_or_else(|| panic!("no mirror for {suite} in the machine's apt sources"));
        let started = Instant::now();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&cache).unwrap();
        run_ok(
            Command::new("debootstrap")
                .args([
                    "--variant=minbase",
                    &format!("--include={PACKAGES}"),
                    &suite,
                ])
                .arg(&partial)
                .arg(&mirror),
            "debootstrap",
        );
        let all: Vec<&str> = EXTRAS.iter().map(|(name, _)| *name).collect();
        install_extras(&partial, &all, false);
        std::fs::write(partial.join(".complete"), format!("{key}\n{mirror}\n")).unwrap();
        std::fs::rename(&partial, &dir).unwrap();
        Root {
            dir,
            built_in: Some(started.elapsed()),
        }
    }
}

/// The [`EXTRAS`] a cached root lacks by its stamp (postfix only without one).
fn missing_extras(root: &Path) -> Vec<&'static str> {
    let stamp = std::fs::read_to_string(root.join(EXTRAS_STAMP))
        .unwrap_or_else(|_| "postfix\n".to_string());
    EXTRAS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !stamp.lines().any(|l| l.trim() == *name))
        .collect()
}

/// Installs `names` in the root with apt (the package lists refreshed first when `update`,
/// for a cached root whose lists may be stale), checks that every extra's file is there, and
/// writes the stamp. Postfix gets its "No configuration" answer first, and its service is
/// masked: nothing but the test's own processes may listen in the container.
fn install_extras(root: &Path, names: &[&str], update: bool) {
    let chroot = |script: &str| {
        let mut cmd = Command::new("chroot");
        cmd.arg(root)
            .args(["sh", "-c", script])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        cmd
    };
    run_ok(
        &mut chroot(&format!("echo '{POSTFIX_PRESET}' | debconf-set-selections")),
        "debconf-set-selections",
    );
    if update {
        run_ok(
            &mut chroot("apt-get update -q"),
            "apt-get update in the root",
        );
    }
    run_ok(
        &mut chroot(&format!(
            "apt-get install -y -q --no-install-recommends {} && apt-get clean",
            names.join(" ")
        )),
        "apt-get install in the root",
    );
    let mask = root.join("etc/systemd/system/postfix.service");
    if std::fs::symlink_metadata(&mask).is_err() {
        std::os::unix::fs::symlink("/dev/null", &mask).unwrap();
    }
    for (name, file) in EXTRAS {
        assert!(root.join(file).exists(), "{name}: no {file} in the root");
    }
    let stamp: String = EXTRAS.iter().map(|(name, _)| format!("{name}\n")).collect();
    std::fs::write(root.join(EXTRAS_STAMP), stamp).unwrap();
}

/// A booted copy of a [`Root`].
pub struct Container {
    nspawn: Child,
    /// The container's systemd, as the host sees it.
    pub pid: u32,
    /// The copy it runs on; files written here appear inside at the same path.
    pub dir: PathBuf,
    /// How long the copy and the boot took.
    pub booted_in: Duration,
}

impl Container {
    /// Copies `root` to `dir` and boots it, waiting until systemd reports `running`.
    pub fn boot(root: &Root, dir: PathBuf, name: &str) -> Container {
        let started = Instant::now();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        run_ok(
            Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(&root.dir)
                .arg(&dir),
            "copying the root",
        );
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        let nspawn = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(&dir)
            .args(["--private-network", "--register=no", "--keep-unit"])
            .args(["--console=passive", "-M", name, "-b"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn starts");
        let mut container = Container {
            pid: 0,
            nspawn,
            dir,
            booted_in: Duration::ZERO,
        };
        container.pid = container.find_systemd();
        let state = container.wait_for(
            "systemctl is-system-running",
            Duration::from_secs(90),
            |o| {
                let s = String::from_utf8_lossy(&o.stdout);
                s.trim() == "running" || s.trim() == "degraded"
            },
        );
        let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
        assert_eq!(
            state,
            "running",
            "the container booted degraded:\n{}",
            container.sh("systemctl --failed --no-legend").0
        );
        container.booted_in = started.elapsed();
        container
    }

    /// The nspawn process's child named systemd, within 30 s.
    fn find_systemd(&mut self) -> u32 {
        let parent = self.nspawn.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let children =
                std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
                    .unwrap_or_default();
            for pid in children.split_whitespace() {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    return pid.parse().unwrap();
                }
            }
            if let Some(status) = self.nspawn.try_wait().unwrap() {
                panic!(
                    "systemd-nspawn exited ({status}):\n{}",
                    std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "no systemd under systemd-nspawn");
            std::thread::yield_now();
        }
    }

    /// Runs `args` inside the container.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("nsenter")
    }

    /// A command that runs `args` inside the container, for the caller to start.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.pid.to_string(), "-a"])
            .args(args)
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", "")
            .env("LC_ALL", "C.UTF-8");
        cmd
    }

    /// Runs a shell line inside: (stdout and stderr, whether it succeeded).
    pub fn sh(&self, script: &str) -> (String, bool) {
        let out = self.exec(&["sh", "-c", script]);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (text, out.status.success())
    }

    /// Runs a shell line inside and panics unless it succeeds; returns its output.
    pub fn ok(&self, script: &str) -> String {
        let (text, ok) = self.sh(script);
        if !ok {
            let (journal, _) = self.sh("journalctl --no-pager -n 40 -o short-monotonic");
            panic!("`{script}` failed:\n{text}\nthe journal's last lines:\n{journal}");
        }
        text
    }

    /// Runs `script` inside until `done` holds for its output, for up to `limit`; returns that
    /// output. Each try is a full command, so the poll is paced by the command itself.
    pub fn wait_for(
        &self,
        script: &str,
        limit: Duration,
        done: impl Fn(&Output) -> bool,
    ) -> Output {
        let deadline = Instant::now() + limit;
        loop {
            let out = self.exec(&["sh", "-c", script]);
            if done(&out) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "`{script}` did not get there in {limit:?}; last:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Writes a file inside the container (through the copy it runs on).
    pub fn write(&self, path: &str, contents: &[u8]) {
        let host = self.dir.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(host.parent().unwrap()).unwrap();
        std::fs::File::create(&host)
            .and_then(|mut f| f.write_all(contents))
            .unwrap_or_else(|e| panic!("{}: {e}", host.display()));
    }

    /// Reads a file inside the container.
    pub fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.dir.join(path.trim_start_matches('/'))).unwrap()
    }

    /// Something that opens client sockets inside the container's network namespace.
    pub fn net(&self) -> NetNs {
        NetNs {
            path: PathBuf::from(format!("/proc/{}/ns/net", self.pid)),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.exec(&["systemctl", "poweroff"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Ok(None) = self.nspawn.try_wait() {
            // The container's init: killing it ends its PID namespace; then our own child.
            if let Some(init) = rustix::process::Pid::from_raw(self.pid as i32) {
                let _ = rustix::process::kill_process(init, rustix::process::Signal::KILL);
            }
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("log"));
    }
}

/// The container's network namespace, which a thread joins to open sockets there; a socket
/// stays in the namespace it was made in, whichever thread uses it later.
#[derive(Clone)]
pub struct NetNs {
    path: PathBuf,
}

impl NetNs {
    /// Moves the calling thread into the namespace. Meant for threads made for this.
    pub fn enter(&self) {
        let ns = std::fs::File::open(&self.path).unwrap();
        // setns(2): only this thread's network namespace changes.
        use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
        move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&ns),
            Some(LinkNameSpaceType::Network),
        )
        .unwrap_or_else(|e| panic!("setns: {e}"));
    }

    /// Connects to `to` from `source` inside the namespace, from a short-lived thread.
    pub fn connect(&self, source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
        let (ns, source) = (self.clone(), source.to_string());
        std::thread::spawn(move || {
            ns.enter();
            connect_from(&source, to)
        })
        .join()
        .unwrap()
    }
}

/// Connects from a chosen loopback source, with a 10 s bound on the handshake.
pub fn connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let from: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&from.into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(10))?;
    Ok(socket.into())
}
