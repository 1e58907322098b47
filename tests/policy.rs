//! Source policy over real sockets: rate limits, allow and deny lists, reserved slots,
//! per-network overrides and the network tier, dry run, and live reload.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use mxgate::config::{Config, Settings};
use tokio::io::AsyncWriteExt;

const RATE_LINE: &[u8] = b"421 4.7.0 mx.test Connection rate limit exceeded, try again later\r\n";
const NETWORK_LINE: &[u8] =
    b"421 4.7.0 mx.test Too many connections from your network, try again later\r\n";

/// A config from TOML keys, pointed at `backend`, on port 0.
fn config_toml(backend: SocketAddr, toml: &str) -> Config {
    let text = format!(
        "backend = \"{backend}\"\nhostname = \"{HOST}\"\nlisten = [\"127.0.0.1:0\"]\nmetrics = \"127.0.0.1:0\"\npregreet = \"off\"\n{toml}"
    );
    Settings::from_toml(&text).unwrap().validate(None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_refuses_then_recovers() {
    let backend = GreetingBackend::start().await;
    let mx = start(config_toml(backend.addr, "rate_per_source = \"3/min\"")).await;
    let at = mx.listen_addrs()[0];
    for _ in 0..3 {
        drop(expect_admitted("127.0.0.2", at).await);
    }
    expect_refusal("127.0.0.2", at, RATE_LINE).await;
    expect_refusal("127.0.0.2", at, RATE_LINE).await;
    // Another source has its own quota.
    drop(expect_admitted("127.0.0.3", at).await);
    // One connection's worth comes back every 20 s; the limiter's clock is moved, not slept.
    mx.policy_clock().advance(Duration::from_secs(21));
    drop(expect_admitted("127.0.0.2", at).await);
    expect_refusal("127.0.0.2", at, RATE_LINE).await;

    eventually("sessions ended", || mx.admission().active() == 0).await;
    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"rate_limit\"}"
        ),
        3.0
    );
    assert_eq!(
        backend.accepted(),
        5,
        "rate-limited clients never reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_sources_get_554_then_503_until_quit() {
    let backend = GreetingBackend::start().await;
    let mx = start(config_toml(backend.addr, "deny = [\"127.0.0.66\"]")).await;
    let at = mx.listen_addrs()[0];
    let mut s = connect_from("127.0.0.66", at).await.unwrap();
    assert_eq!(
        read_line(&mut s).await,
        b"554 5.7.1 mx.test Access denied\r\n"
    );
    s.write_all(b"EHLO client.example\r\n").await.unwrap();
    assert_eq!(
        read_line(&mut s).await,
        b"503 5.5.1 Bad sequence of commands\r\n"
    );
    s.write_all(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_line(&mut s).await,
        b"503 5.5.1 Bad sequence of commands\r\n"
    );
    assert_eq!(
        read_line(&mut s).await,
        b"503 5.5.1 Bad sequence of commands\r\n"
    );
    s.write_all(b"quit\r\n").await.unwrap();
    assert_eq!(read_line(&mut s).await, b"221 2.0.0 mx.test Bye\r\n");
    assert!(read_to_end(&mut s).await.is_empty());

    // A client that floods a denied connection is cut off after a few KiB.
    let mut flood = connect_from("127.0.0.66", at).await.unwrap();
    let _ = flood.write_all(&vec![b'x'; 16 * 1024]).await;
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        let mut all = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            use tokio::io::AsyncReadExt;
            match flood.read(&mut buf).await {
                Ok(0) | Err(_) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("closed well within the 10 s bound");
    assert!(got.starts_with(b"554 5.7.1 mx.test Access denied\r\n"));

    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(&m, "mxgate_connections_rejected_total{reason=\"denied\"}"),
        2.0
    );
    assert_eq!(
        backend.accepted(),
        0,
        "no backend connection for a denied client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_sees_the_denial_and_quits_cleanly() {
    if !require_tool("swaks") {
        return;
    }
    let backend = GreetingBackend::start().await;
    let mx = start(config_toml(backend.addr, "deny = [\"127.0.0.66\"]")).await;
    let at = mx.listen_addrs()[0].to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("swaks")
            .args(["--server", &at, "--local-interface", "127.0.0.66"])
            .args([
                "--from",
                "a@example.org",
                "--to",
                "b@example.net",
                "--timeout",
                "10",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("554 5.7.1 mx.test Access denied"), "{text}");
    assert!(
        text.contains("221 2.0.0 mx.test Bye"),
        "swaks sent QUIT and got 221:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_network_keeps_reserved_slots_when_the_rest_is_full() {
    let backend = GreetingBackend::start().await;
    let mx = start(config_toml(
        backend.addr,
        // The queue off: past the open slots, a refusal at once.
        "max_connections = 4\nmax_per_source = 1\nreserved_for_allowed = 2\nallow = [\"127.0.9.0/24\"]\n\
         queue_timeout = \"0\"",
    ))
    .await;
    let at = mx.listen_addrs()[0];
    // Outside sources fill what is open to them: 4 - 2 reserved.
    let mut held = vec![
        expect_admitted("127.0.0.2", at).await,
        expect_admitted("127.0.0.3", at).await,
    ];
    expect_refusal("127.0.0.4", at, GLOBAL_LINE).await;
    // The organisation's relay gets in, past the per-source limit too.
    held.push(expect_admitted("127.0.9.1", at).await);
    held.push(expect_admitted("127.0.9.1", at).await);
    expect_refusal("127.0.9.1", at, GLOBAL_LINE).await;
    drop(held);
    eventually("slots freed", || mx.admission().active() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longest_prefix_override_and_network_tier() {
    let backend = GreetingBackend::start().await;
    let mx = start(config_toml(
        backend.addr,
        "max_per_source = 1\n\
         [[network]]\ncidr = \"127.0.0.0/16\"\nmax_per_source = 3\n\
         [[network]]\ncidr = \"127.0.5.0/24\"\nmax_per_source = 2\nmax_per_network = 3\nnetwork_prefix = 24\n",
    ))
    .await;
    let at = mx.listen_addrs()[0];
    let mut held = Vec::new();
    // 127.0.0.0/16 rule: three per source.
    for _ in 0..3 {
        held.push(expect_admitted("127.0.1.1", at).await);
    }
    expect_refusal("127.0.1.1", at, SOURCE_LINE).await;
    // The /24 rule is longer: two per source ...
    held.push(expect_admitted("127.0.5.1", at).await);
    held.push(expect_admitted("127.0.5.1", at).await);
    expect_refusal("127.0.5.1", at, SOURCE_LINE).await;
    // ... and three for the whole /24, however many addresses it uses.
    held.push(expect_admitted("127.0.5.2", at).await);
    for a in ["127.0.5.3", "127.0.5.4", "127.0.5.99"] {
        expect_refusal(a, at, NETWORK_LINE).await;
    }
    // Outside both rules, the default of one.
    held.push(expect_admitted("127.1.0.1", at).await);
    expect_refusal("127.1.0.1", at, SOURCE_LINE).await;

    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"network_limit\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"source_limit\"}"
        ),
        3.0
    );
    drop(held);
    eventually("slots freed", || mx.admission().active() == 0).await;
    assert_eq!(
        (mx.admission().sources(), mx.admission().network_blocks()),
        (0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_forwards_everyone_and_counts_would_be_rejections() {
    let backend = GreetingBackend::start().await;
    let mx = start(config_toml(
        backend.addr,
        "dry_run = true\nmax_connections = 3\nmax_per_source = 1\ndeny = [\"127.0.0.66\"]",
    ))
    .await;
    let at = mx.listen_addrs()[0];
    let held = vec![
        expect_admitted("127.0.0.2", at).await,
        expect_admitted("127.0.0.2", at).await, // would be source_limit
        expect_admitted("127.0.0.3", at).await,
        expect_admitted("127.0.0.4", at).await, // would be global_limit
        expect_admitted("127.0.0.66", at).await, // would be denied
    ];
    assert_eq!(backend.accepted(), 5);
    let m = scrape(mx.metrics_addr().unwrap()).await;
    let dry = |r: &str| {
        metric(
            &m,
            &format!("mxgate_connections_would_reject_total{{reason=\"{r}\"}}"),
        )
    };
    assert_eq!(dry("source_limit"), 1.0);
    assert_eq!(dry("global_limit"), 1.0);
    assert_eq!(dry("denied"), 1.0);
    for r in ["source_limit", "global_limit", "denied"] {
        assert_eq!(
            metric(
                &m,
                &format!("mxgate_connections_rejected_total{{reason=\"{r}\"}}")
            ),
            0.0
        );
    }
    assert_eq!(metric(&m, "mxgate_connections_active"), 5.0);
    drop(held);
    eventually("slots freed", || mx.admission().active() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_new_limits_without_cutting_held_sessions() {
    use tokio::io::AsyncReadExt;
    let backend = GreetingBackend::start().await;
    let mx = start(config_toml(backend.addr, "max_per_source = 3")).await;
    let at = mx.listen_addrs()[0];
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(expect_admitted("127.0.0.2", at).await);
    }
    // Lower the limit below what is held, and change a reply.
    let applied = mx.reload(Ok(config_toml(
        backend.addr,
        "max_per_source = 1\n[replies]\nsource_limit = \"421 4.7.0 {hostname} slow down\"",
    )));
    assert!(applied);
    // Held sessions still carry bytes both ways.
    for s in held.iter_mut() {
        s.write_all(b"NOOP\r\n").await.unwrap();
        let mut echo = [0u8; 6];
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"NOOP\r\n");
    }
    assert_eq!(
        mx.admission().active(),
        3,
        "slots of held sessions stay counted"
    );
    expect_refusal("127.0.0.2", at, b"421 4.7.0 mx.test slow down\r\n").await;
    let fresh = expect_admitted("127.0.0.3", at).await;
    expect_refusal("127.0.0.3", at, b"421 4.7.0 mx.test slow down\r\n").await;

    // A broken reload keeps the config in force.
    assert!(!mx.reload(Err(anyhow::anyhow!(
        "config file x.toml: key `max_per_source`: bad"
    ))));
    expect_refusal("127.0.0.3", at, b"421 4.7.0 mx.test slow down\r\n").await;

    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(metric(&m, "mxgate_limit{kind=\"max_per_source\"}"), 1.0);
    assert_eq!(
        metric(&m, "mxgate_config_reloads_total{result=\"success\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "mxgate_config_reloads_total{result=\"failure\"}"),
        1.0
    );
    drop((held, fresh));
    eventually("slots freed", || mx.admission().active() == 0).await;
}
