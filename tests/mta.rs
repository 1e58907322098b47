//! A real MTA at both ends: Postfix's `smtp-sink` as the backend and `swaks` as the client.

mod common;

use std::process::Command;

use common::*;

/// Runs swaks from `source` against `server` and returns (success, everything it printed).
async fn swaks(source: &str, server: std::net::SocketAddr) -> (bool, String) {
    let (source, server) = (source.to_string(), server.to_string());
    tokio::task::spawn_blocking(move || {
        let out = Command::new("swaks")
            .args(["--server", &server, "--local-interface", &source])
            .args(["--from", "sender@example.org", "--to", "rcpt@example.net"])
            .args(["--helo", "client.example.org", "--timeout", "10"])
            .output()
            .expect("swaks runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_through_mxgate_to_smtp_sink() {
    if !require_tool("swaks") {
        return;
    }
    let Some(sink) = SmtpSink::start(&[]).await else {
        return;
    };
    let mut c = config(sink.addr);
    c.max_per_source = 1;
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];

    // One message passes through untouched.
    let (ok, out) = swaks("127.0.0.5", at).await;
    assert!(ok, "swaks failed:\n{out}");
    assert!(out.contains("<-  220 "), "{out}");
    assert!(
        out.contains("<-  250 2.0.0 Ok"),
        "the message was accepted:\n{out}"
    );
    assert!(out.contains("<-  221 "), "{out}");

    // Over the limit, swaks reports mxgate's own 421.
    let mut held = connect_from("127.0.0.6", at).await.unwrap();
    assert!(read_line(&mut held).await.starts_with(b"220 "));
    let (ok, out) = swaks("127.0.0.6", at).await;
    assert!(!ok, "swaks must fail over the limit:\n{out}");
    assert!(
        out.contains("421 4.7.0 mx.test Too many connections from your address, try again later"),
        "{out}"
    );
    drop(held);
    eventually("slots freed", || mx.admission().active() == 0).await;

    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"source_limit\"}"
        ),
        1.0
    );
    assert_eq!(metric(&m, "mxgate_connections_accepted_total"), 3.0);
    assert_eq!(metric(&m, "mxgate_connections_active"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_passes_the_pregreet_test_and_delivers_through_the_rewritten_greeting() {
    if !require_tool("swaks") {
        return;
    }
    let Some(sink) = SmtpSink::start(&[]).await else {
        return;
    };
    let mut c = config(sink.addr);
    c.pregreet.action = mxgate::config::Pregreet::Drop;
    c.pregreet.wait = std::time::Duration::from_millis(300);
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let (ok, out) = swaks("127.0.0.21", at).await;
    assert!(ok, "swaks failed:\n{out}");
    // The teaser, then smtp-sink's own greeting as the reply's last line.
    assert!(out.contains("<-  220-mx.test ESMTP"), "{out}");
    assert!(out.contains("<-  220 "), "{out}");
    assert!(out.contains("<-  250 2.0.0 Ok"), "delivered:\n{out}");
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(metric(&m, "mxgate_pregreet_total{result=\"pass\"}"), 1.0);
    // Cached: a second message has no teaser.
    let (ok, out) = swaks("127.0.0.21", at).await;
    assert!(ok && !out.contains("220-mx.test"), "{out}");
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(&m, "mxgate_pregreet_total{result=\"cached_pass\"}"),
        1.0
    );
}

/// A private Postfix instance that relays everything to `relayhost` from `source`: its own
/// config, queue and data directories in a temporary directory, no smtpd listener. Started
/// with `postfix -c DIR start`, fed with `sendmail -C DIR`; stopped and removed on drop.
struct Postfix {
    dir: std::path::PathBuf,
}

impl Postfix {
    /// `None` (with a printed reason) when not root or Postfix is missing, outside CI.
    fn start(relayhost: std::net::SocketAddr, source: &str) -> Option<Postfix> {
        if !is_root() {
            assert!(!in_ci(), "a private Postfix needs root in CI");
            eprintln!("SKIP: a private Postfix instance needs root");
            return None;
        }
        if !require_tool("postfix") || !require_tool("sendmail") {
            return None;
        }
        let dir = std::env::temp_dir().join(format!("mxgate-postfix-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["etc", "queue", "data"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let chown = Command::new("chown")
            .arg("postfix")
            .arg(dir.join("data"))
            .status()
            .unwrap();
        assert!(chown.success(), "the data directory is postfix's");
        let d = dir.display();
        std::fs::write(
            dir.join("etc/main.cf"),
            format!(
                "compatibility_level = 3.6\n\
                 queue_directory = {d}/queue\ndata_directory = {d}/data\n\
                 meta_directory = /etc/postfix\nmail_owner = postfix\nsetgid_group = postdrop\n\
                 myhostname = client.example.org\nmydestination =\n\
                 inet_interfaces = loopback-only\ninet_protocols = ipv4\n\
                 relayhost = [{}]:{}\nsmtp_bind_address = {source}\n\
                 smtp_dns_support_level = disabled\nsmtp_tls_security_level = none\n\
                 alias_maps =\nalias_database =\n\
                 maillog_file = {d}/maillog\nmaillog_file_prefixes = {d}\n\
                 syslog_name = postfix-mxgate-test\n",
                relayhost.ip(),
                relayhost.port()
            ),
        )
        .unwrap();
        // No smtpd: nothing listens; mail comes in by sendmail only.
        std::fs::write(
            dir.join("etc/master.cf"),
            "pickup unix n - n 60 1 pickup\ncleanup unix n - n - 0 cleanup\n\
             qmgr unix n - n 300 1 qmgr\nrewrite unix - - n - - trivial-rewrite\n\
             bounce unix - - n - 0 bounce\ndefer unix - - n - 0 bounce\n\
             trace unix - - n - 0 bounce\nverify unix - - n - 1 verify\n\
             flush unix n - n 1000? 0 flush\nproxymap unix - - n - - proxymap\n\
             smtp unix - - n - - smtp\nrelay unix - - n - - smtp\n\
             showq unix n - n - - showq\nerror unix - - n - - error\n\
             retry unix - - n - - error\ndiscard unix - - n - - discard\n\
             anvil unix - - n - 1 anvil\nscache unix - - n - 1 scache\n\
             postlog unix-dgram n - n - 1 postlogd\n",
        )
        .unwrap();
        let pf = Postfix { dir };
        let out = Command::new("postfix")
            .args(["-c", &pf.config(), "start"])
            .output()
            .unwrap();
        assert!(out.status.success(), "postfix start:\n{}", pf.log());
        Some(pf)
    }

    fn config(&self) -> String {
        self.dir.join("etc").display().to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }

    /// Queues one message to `rcpt` through Postfix's own sendmail.
    fn send(&self, rcpt: &str) {
        use std::io::Write;
        let mut child = Command::new("sendmail")
            .args(["-C", &self.config(), "-f", "sender@example.org", rcpt])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"Subject: through mxgate\n\nhello\n")
            .unwrap();
        assert!(child.wait().unwrap().success(), "sendmail queued it");
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .args(["-c", &self.config(), "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Messages smtp-sink (started with `-d DIR/m.`) has written to `dir`.
fn dumped(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_postfix_passes_the_pregreet_test_and_delivers_through_the_rewritten_greeting() {
    let dump = std::env::temp_dir().join(format!("mxgate-postfix-sink-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dump);
    std::fs::create_dir_all(&dump).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dump, std::fs::Permissions::from_mode(0o777)).unwrap();
    let template = format!("{}/m.", dump.display());
    // smtp-sink's greeting ends the teaser's reply: Postfix's client reads the whole
    // multi-line reply, and would not go on if the rewrite broke it.
    let Some(sink) = SmtpSink::start(&["-d", &template]).await else {
        return;
    };
    let mut c = config(sink.addr);
    c.pregreet.action = mxgate::config::Pregreet::Drop;
    c.pregreet.wait = std::time::Duration::from_millis(500);
    c.pregreet.wait_busy = std::time::Duration::from_millis(500);
    let mx = start(c).await;
    let at = mx.listen_addrs()[0];
    let Some(postfix) = Postfix::start(at, "127.0.0.33") else {
        return;
    };
    const MESSAGES: usize = 3;
    for i in 0..MESSAGES {
        postfix.send(&format!("rcpt{i}@example.net"));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while dumped(&dump) < MESSAGES {
        assert!(
            std::time::Instant::now() < deadline,
            "smtp-sink has {} of {MESSAGES}; Postfix's log:\n{}",
            dumped(&dump),
            postfix.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let log = postfix.log();
    let sent = log.lines().filter(|l| l.contains("status=sent")).count();
    assert_eq!(sent, MESSAGES, "{log}");
    assert!(!log.contains("status=deferred"), "{log}");
    let m = scrape(mx.metrics_addr().unwrap()).await;
    // Every connection of Postfix's passed the test (those it opened at once, each a first
    // contact) or was a cached pass; none failed.
    let pass = metric(&m, "mxgate_pregreet_total{result=\"pass\"}");
    let cached = metric(&m, "mxgate_pregreet_total{result=\"cached_pass\"}");
    assert!(pass >= 1.0, "{pass}");
    assert_eq!(
        pass + cached,
        metric(&m, "mxgate_connections_accepted_total")
    );
    assert_eq!(metric(&m, "mxgate_pregreet_total{result=\"fail\"}"), 0.0);
    drop(postfix);
    let _ = std::fs::remove_dir_all(&dump);
}
