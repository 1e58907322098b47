//! Log lines as journald and fail2ban read them: priorities, no colour codes, and per-source
//! refusal lines that the shipped filter matches for the refused sources only.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;
use tokio::io::AsyncWriteExt;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mxgate-logs-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the real binary with stderr in `log`, through one scene: sessions admitted and
/// closed, and refusals for a source over its limit (127.0.0.2), a full server (127.0.0.4)
/// and the deny list (127.0.0.66); 127.0.0.3's session says NOOP and hears it echoed. `journal` sets `JOURNAL_STREAM` to the log file, as
/// systemd does when stderr goes to the journal. Returns once mxgate has exited.
async fn scene(dir: &Path, journal: bool, format: &str) -> String {
    let backend = GreetingBackend::start().await;
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.join("stderr.log");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut cmd = mxgate_command(
        backend.addr,
        listen,
        &[
            "--max-connections",
            "3",
            "--max-per-source",
            "2",
            "--queue-timeout",
            "0",
            "--deny",
            "127.0.0.66",
            "--log-format",
            format,
        ],
    );
    cmd.env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::from(file));
    if journal {
        cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    } else {
        cmd.env_remove("JOURNAL_STREAM");
    }
    let child = spawn_ready(&mut cmd, &notify);

    let a = expect_admitted("127.0.0.2", listen).await;
    let b = expect_admitted("127.0.0.2", listen).await;
    expect_refusal("127.0.0.2", listen, SOURCE_LINE).await;
    let mut c = expect_admitted("127.0.0.3", listen).await;
    expect_refusal("127.0.0.4", listen, GLOBAL_LINE).await;
    let mut denied = connect_from("127.0.0.66", listen).await.unwrap();
    assert_eq!(
        read_line(&mut denied).await,
        b"554 5.7.1 mx.test Access denied\r\n"
    );
    denied.write_all(b"QUIT\r\n").await.unwrap();
    read_to_end(&mut denied).await;
    c.write_all(b"NOOP\r\n").await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut c).await, b"NOOP\r\n", "the backend's echo");
    drop((a, b));

    stop(child);
    std::fs::read_to_string(&log).unwrap()
}

/// Starts `cmd` and returns once it has said `READY=1` on `notify`.
fn spawn_ready(cmd: &mut Command, notify: &UnixDatagram) -> std::process::Child {
    let mut child = cmd.spawn().unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let said = notify.recv(&mut buf).map(|n| {
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "READY=1")
        });
        match said {
            Ok(true) => return child,
            Ok(false) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no READY=1 within 10 s: {e}");
            }
        }
    }
}

/// SIGTERM, then the exit, which must be a clean one within 20 s.
fn stop(mut child: std::process::Child) {
    send_signal(child.id(), Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "mxgate did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_journald_each_line_carries_its_priority_and_no_colour() {
    let dir = temp_dir("journal");
    let text = scene(&dir, true, "text").await;
    assert!(!text.contains('\x1b'), "escape codes in:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 5, "{text}");
    for l in &lines {
        let want = if l.contains(" WARN ") {
            "<4>"
        } else if l.contains(" ERROR ") {
            "<3>"
        } else if l.contains(" INFO ") {
            "<6>"
        } else {
            "<7>"
        };
        assert!(l.starts_with(want), "{want} missing: {l}");
    }
    assert!(text.contains(" WARN "), "{text}");
    assert!(text.contains(" INFO "), "{text}");
    // The session line names mxgate's own end toward the backend, as the backend logs it.
    let session = lines
        .iter()
        .find(|l| l.contains("session finished") && l.contains("src=127.0.0.3"))
        .unwrap_or_else(|| panic!("no session line in:\n{text}"));
    assert!(session.contains(" local=127.0.0.1:"), "{session}");
    // Its byte counts are the whole session's: the greeting relayed before forwarding began
    // is in them, as it is in mxgate_bytes_total.
    let to_client = GREETING.len() + b"NOOP\r\n".len();
    assert!(session.contains(" client_to_backend=6 "), "{session}");
    assert!(session.ends_with(" end=closed"), "{session}");
    assert!(
        session.contains(&format!(" backend_to_client={to_client} ")),
        "{session}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_or_pipe_gets_plain_lines_without_priorities() {
    let dir = temp_dir("plain");
    let text = scene(&dir, false, "text").await;
    assert!(!text.contains('\x1b'), "escape codes in:\n{text}");
    assert!(!text.lines().any(|l| l.starts_with('<')), "{text}");
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("source refused"))
        .map(|l| l.split_once("source refused ").unwrap().1)
        .collect();
    assert_eq!(
        refused,
        vec![
            "source=127.0.0.2 reason=source_limit count=1 window_secs=60",
            "source=127.0.0.4 reason=global_limit count=1 window_secs=60",
            "source=127.0.0.66 reason=denied count=1 window_secs=60",
        ],
        "{text}"
    );
    // The rejection summary, flushed at the drain, spells its reasons as the lines above do.
    let mut summaries: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("connections rejected "))
        .map(|l| l.split_once("connections rejected ").unwrap().1)
        .collect();
    summaries.sort();
    assert_eq!(
        summaries,
        vec![
            "reason=denied dry_run=false count=1 busiest_source=127.0.0.66 busiest_count=1 window_secs=10",
            "reason=global_limit dry_run=false count=1 busiest_source=127.0.0.4 busiest_count=1 window_secs=10",
            "reason=source_limit dry_run=false count=1 busiest_source=127.0.0.2 busiest_count=1 window_secs=10",
        ],
        "{text}"
    );
}

/// The addresses `fail2ban-regex` finds in `log` with the shipped filter.
fn banned(log: &Path) -> Vec<String> {
    let filter =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/fail2ban/filter.d/mxgate.conf");
    let out = Command::new("fail2ban-regex")
        .args(["-o", "ip"])
        .arg(log)
        .arg(&filter)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ips: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    ips.sort();
    ips
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fail2ban_filter_matches_the_refused_sources_and_only_those() {
    if !require_tool("fail2ban-regex") {
        return;
    }
    for (format, journal) in [("text", false), ("text", true), ("json", false)] {
        let dir = temp_dir(&format!("fail2ban-{format}-{journal}"));
        let text = scene(&dir, journal, format).await;
        // Every client address is in the log: admitted ones on their session lines, the
        // full server's refusal on its own line.
        for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.66"] {
            assert!(text.contains(ip), "{ip} not logged:\n{text}");
        }
        // One refusal a minute is nobody hammering: the shipped filter wants 50 in a line.
        assert_eq!(
            banned(&dir.join("stderr.log")),
            Vec::<String>::new(),
            "{text}"
        );
        // The same lines with a count of 50: only the sources' own doing bans, over their
        // limit or deny-listed. A full server (127.0.0.4) is nobody's fault, and an admitted
        // client (127.0.0.3) did nothing.
        let many = dir.join("many.log");
        std::fs::write(
            &many,
            text.replace(" count=1 ", " count=50 ")
                .replace("\"count\":1,", "\"count\":50,"),
        )
        .unwrap();
        assert_eq!(
            banned(&many),
            vec!["127.0.0.2".to_string(), "127.0.0.66".to_string()],
            "format {format}, journal {journal}:\n{text}"
        );
    }
}

/// A backend that greets its first connection with Exchange's busy reply and closes it, and
/// greets every later one with `220` and holds it until the client closes.
async fn busy_once() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut s, _)) = l.accept().await {
            let busy = std::mem::take(&mut first);
            tokio::spawn(async move {
                let greeting: &[u8] = if busy {
                    b"421 4.3.2 The maximum number of concurrent server connections has exceeded a limit, closing transmission channel\r\n"
                } else {
                    b"220 backend.test ESMTP\r\n"
                };
                if s.write_all(greeting).await.is_err() || busy {
                    return;
                }
                let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_limit_that_moves_more_than_ten_percent_is_logged_with_its_reason() {
    let dir = temp_dir("learned");
    let backend = busy_once().await;
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.join("stderr.log");
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mxgate"));
    cmd.args([
        "run",
        "--hostname",
        "mx.test",
        "--metrics",
        "off",
        "--pregreet",
        "off",
    ])
    .args([
        "--backend",
        &format!("{backend},max_connections=auto"),
        "--listen",
        &listen.to_string(),
        "--adaptive-min",
        "5",
        "--adaptive-initial",
        "20",
        "--queue-timeout",
        "10s",
    ])
    .stdout(Stdio::null());
    cmd.env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("JOURNAL_STREAM")
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
    let child = spawn_ready(&mut cmd, &notify);

    // The first session's backend says busy: the limit is cut from 20 to the minimum, and
    // the client, sent back to the queue, is greeted by the next connection.
    let mut c = connect_from("127.0.0.2", listen).await.unwrap();
    assert_eq!(read_line(&mut c).await, b"220 backend.test ESMTP\r\n");
    c.shutdown().await.unwrap();
    read_to_end(&mut c).await;
    stop(child);

    let text = std::fs::read_to_string(&log).unwrap();
    let moved: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("learned backend limit moved"))
        .map(|l| l.split_once("learned backend limit moved ").unwrap().1)
        .collect();
    assert_eq!(
        moved,
        vec![format!(
            "backend={backend} from=20 to=5 reason=busy_greeting"
        )],
        "{text}"
    );
}

/// Returns once `log` has a line containing `needle`, within 30 s.
async fn wait_for_line(log: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(log).unwrap().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `line` with its leading timestamp replaced by the time `ago` before now (UTC, as mxgate
/// writes it).
fn restamped(line: &str, ago: Duration) -> String {
    let at = std::time::SystemTime::now() - ago;
    let secs = at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let out = Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{secs}"),
            "+%Y-%m-%dT%H:%M:%S.000000Z",
        ])
        .output()
        .unwrap();
    let stamp = String::from_utf8(out.stdout).unwrap();
    let (_, rest) = line.split_once(' ').unwrap();
    format!("{} {rest}", stamp.trim())
}

/// A fail2ban set-up in `dir`: the shipped filter and jail, with the jail enabled on `log`
/// (polled, not the journal) and a ban action that writes `ban ADDR` to `bans` instead of
/// touching the firewall. Everything else is the shipped jail's: maxretry, findtime, bantime.
fn fail2ban_conf(dir: &Path, log: &Path, bans: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/fail2ban");
    for sub in ["filter.d", "jail.d", "action.d"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    for file in ["filter.d/mxgate.conf", "jail.d/mxgate.conf"] {
        std::fs::copy(root.join(file), dir.join(file)).unwrap();
    }
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    write(
        "fail2ban.conf",
        format!(
            "[Definition]\nloglevel = INFO\nlogtarget = {d}/fail2ban.log\nsocket = {d}/f2b.sock\n\
             pidfile = {d}/f2b.pid\ndbfile = :memory:\n",
            d = dir.display()
        ),
    );
    write("jail.conf", "[DEFAULT]\n".into());
    write(
        "action.d/logban.conf",
        format!(
            "[Definition]\nactionstart =\nactionstop =\nactioncheck =\n\
             actionban = echo ban <ip> >> {}\nactionunban =\n",
            bans.display()
        ),
    );
    write(
        "jail.d/zz-test.local",
        format!(
            "[mxgate]\nenabled = true\nbackend = polling\nlogpath = {}\naction = logban\n\
             ignoreself = false\nignoreip =\n",
            log.display()
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_fail2ban_bans_a_hammering_source_and_not_a_bulk_sender() {
    if !require_tool("fail2ban-server") {
        return;
    }
    let dir = temp_dir("fail2ban-server");
    // Real lines: 127.0.0.2 reconnects 60 times past its limit, 127.0.0.3 (a bulk sender
    // opening a few past the limit) 10 times.
    let backend = GreetingBackend::start().await;
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.join("stderr.log");
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let flags = ["--max-per-source", "1", "--queue-timeout", "0"];
    let mut cmd = mxgate_command(backend.addr, listen, &flags);
    cmd.env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("JOURNAL_STREAM")
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
    let child = spawn_ready(&mut cmd, &notify);
    let held = [
        expect_admitted("127.0.0.2", listen).await,
        expect_admitted("127.0.0.3", listen).await,
    ];
    // The lines are written on a 10 s tick: the burst starts right after one (a refusal of
    // 127.0.0.9 seen in the log), so each source's refusals fall in one line.
    let third = expect_admitted("127.0.0.9", listen).await;
    expect_refusal("127.0.0.9", listen, SOURCE_LINE).await;
    wait_for_line(&log, "source refused source=127.0.0.9 ").await;
    for (source, times) in [("127.0.0.2", 60), ("127.0.0.3", 10)] {
        for _ in 0..times {
            expect_refusal(source, listen, SOURCE_LINE).await;
        }
    }
    wait_for_line(&log, "source refused source=127.0.0.3 ").await;
    drop((held, third));
    stop(child);
    let text = std::fs::read_to_string(&log).unwrap();
    let line_of = |source: &str| -> String {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&format!("source refused source={source} ")))
            .collect();
        assert_eq!(lines.len(), 1, "{source}:\n{text}");
        lines[0].to_string()
    };
    let (hammer, bulk) = (line_of("127.0.0.2"), line_of("127.0.0.3"));
    assert!(
        hammer.ends_with("reason=source_limit count=60 window_secs=60"),
        "{hammer}"
    );
    assert!(
        bulk.ends_with("reason=source_limit count=10 window_secs=60"),
        "{bulk}"
    );

    // mxgate writes one such line a minute per source: five minutes of each, stamped a minute
    // apart within the jail's findtime, the bulk sender's first.
    let feed = dir.join("feed.log");
    let mut lines = Vec::new();
    for line in [&bulk, &hammer] {
        for minute in (0..5).rev() {
            lines.push(restamped(line, Duration::from_secs(60 * minute)));
        }
    }
    std::fs::write(&feed, lines.join("\n") + "\n").unwrap();
    let conf = dir.join("conf");
    let bans = dir.join("bans.log");
    fail2ban_conf(&conf, &feed, &bans);
    let server = Command::new("fail2ban-server")
        .args(["-f", "-x", "-c"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("server.err")).unwrap(),
        ))
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let server = Kill(server);
    let deadline = Instant::now() + Duration::from_secs(60);
    let banned = loop {
        let b = std::fs::read_to_string(&bans).unwrap_or_default();
        if !b.is_empty() {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "no ban within 60 s: {}",
            std::fs::read_to_string(conf.join("fail2ban.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(banned, "ban 127.0.0.2\n");
    let status = Command::new("fail2ban-client")
        .arg("-c")
        .arg(&conf)
        .args(["status", "mxgate"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    // The bulk sender's lines were read first and matched none; the hammering source's five
    // all matched, and it alone is banned.
    assert!(status.contains("Total failed:\t5"), "{status}");
    assert!(status.contains("Banned IP list:\t127.0.0.2\n"), "{status}");
    drop(server);
}
