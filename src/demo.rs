//! `mxgate demo`: the whole job on this machine, with nothing else installed. An embedded SMTP
//! sink on loopback, mxgate in front of it with small limits, and the load simulator driving it
//! from many sources and from one greedy source at once, then a burst far over the global
//! limit, absorbed by the wait queue, and the same burst again with the queue off. Last, an
//! Exchange-like server with a hidden connection limit behind a learned limit
//! (`max_connections = "auto"`): its own 421s are absorbed and its capacity found. Prints short
//! tables and the live `/metrics` excerpt, then stops everything it started.

use std::time::Duration;

use crate::config::Config;
use crate::load::sink::{Behaviour, Sink};
use crate::load::{self, Bound, Options, Stats};

const MAX_CONNECTIONS: usize = 12;
const MAX_PER_SOURCE: usize = 3;
const SESSIONS: u64 = 300;
/// Sessions that arrive at once in the burst: ten times the global limit.
const BURST: u64 = 120;
/// Room in the queue for the whole burst (the default is max_connections).
const MAX_QUEUED: usize = 200;
/// The Exchange-like server's hidden limit, and the load put on it.
const HIDDEN_LIMIT: usize = 15;
const LEARNING_CONCURRENCY: usize = 40;
const LEARNING_TIME: Duration = Duration::from_secs(3);

/// The demo's config: small limits on loopback, validated like an operator's, so every value
/// derived from them (the IPv6 network tier) follows.
fn config(sink: std::net::SocketAddr) -> Result<Config, crate::config::ConfigError> {
    Config::on_loopback(
        sink,
        crate::config::Settings {
            hostname: Some("mx.demo".into()),
            max_connections: Some(MAX_CONNECTIONS),
            max_per_source: Some(MAX_PER_SOURCE),
            max_queued: Some(MAX_QUEUED),
            // Its load's clients are new senders each: the pregreet test would add its wait
            // to every session and show nothing about the limits.
            pregreet: Some(crate::config::Pregreet::Off),
            ..Default::default()
        },
    )
}

/// Runs the demo and returns its report.
pub async fn run() -> anyhow::Result<String> {
    let sink = Sink::start().await?;
    let mx = crate::start(config(sink.addr)?).await?;
    let at = mx.listen_addrs()[0];
    let base = Options::new(at, 8, Bound::Sessions(SESSIONS));
    let many = Options {
        sources: Some("127.77.0.0/16".parse()?),
        ..base.clone()
    };
    let greedy = Options {
        sources: Some("127.99.0.1/32".parse()?),
        ..base
    };
    // A burst of ten times the limit, all at once, each from its own address.
    let burst = Options {
        sources: Some("127.88.0.0/16".parse()?),
        arrivals: load::Arrivals::Closed(BURST as usize),
        bound: Bound::Sessions(BURST),
        ..many.clone()
    };
    let (many, greedy) = tokio::join!(load::run(&many), load::run(&greedy));
    settle(&mx).await;
    let queued = load::run(&burst).await;
    settle(&mx).await;
    let metrics = mx.render_metrics();
    let config = mx.config();
    // The same burst with the queue off, as a peer without one would answer it.
    let mut off = mx.config();
    off.queue_timeout = Duration::ZERO;
    mx.reload(Ok(off));
    let unqueued = load::run(&burst).await;
    settle(&mx).await;
    let burst = BurstResults {
        queued,
        unqueued,
        config,
    };
    let mut report = report(&sink, at, (&many, &greedy), &burst, &metrics);
    mx.shutdown(Duration::from_secs(1)).await;
    report += &learning().await?;
    Ok(report)
}

/// An Exchange-like server whose limit nobody told mxgate: its 421s never reach a client, and
/// the limit is learned.
async fn learning() -> anyhow::Result<String> {
    let exchange = Sink::start_with(
        "127.0.0.1:0".parse().expect("literal"),
        Behaviour::exchange(HIDDEN_LIMIT),
    )
    .await?;
    let backend: crate::config::BackendSpec = format!("{},max_connections=auto", exchange.addr)
        .parse()
        .map_err(anyhow::Error::msg)?;
    let config = Config::on_loopback(
        exchange.addr,
        crate::config::Settings {
            hostname: Some("mx.demo".into()),
            backend: vec![backend],
            max_connections: Some(100),
            max_per_source: Some(100),
            max_queued: Some(MAX_QUEUED),
            // Its load's clients are new senders each: the pregreet test would add its wait
            // to every session and show nothing about the limits.
            pregreet: Some(crate::config::Pregreet::Off),
            ..Default::default()
        },
    )?;
    let mx = crate::start(config).await?;
    let stats = load::run(&Options {
        sources: Some("127.66.0.0/16".parse()?),
        ..Options::new(
            mx.listen_addrs()[0],
            LEARNING_CONCURRENCY,
            Bound::Duration(LEARNING_TIME),
        )
    })
    .await;
    settle(&mx).await;
    let metrics = mx.render_metrics();
    let value = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let row = |label: &str, v: String| format!("{label:<36}{v:>12}\n");
    let mut out = format!(
        "\nan Exchange-like server that takes at most {HIDDEN_LIMIT} sessions and greets the next with its own 421,\n\
         behind max_connections=auto, {LEARNING_CONCURRENCY} sessions at a time for {}s:\n",
        LEARNING_TIME.as_secs()
    );
    out += &row("delivered", stats.delivered.to_string());
    out += &row(
        "refused 421 (seen by clients)",
        stats.refused_total().to_string(),
    );
    out += &row("backend 421s absorbed", exchange.busy().to_string());
    out += &row("most sessions the server held", exchange.peak().to_string());
    out += &row(
        "learned limit",
        (value("mxgate_backend_limit") as u64).to_string(),
    );
    mx.shutdown(Duration::from_secs(1)).await;
    Ok(out)
}

/// Lets the last sessions' slots return before the counters are read.
async fn settle(mx: &crate::Running) {
    for _ in 0..500 {
        if mx.admission().active() == 0 && mx.queued() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The burst, with the queue and without.
struct BurstResults {
    queued: Stats,
    unqueued: Stats,
    config: Config,
}

fn report(
    sink: &Sink,
    at: std::net::SocketAddr,
    (many, greedy): (&Stats, &Stats),
    burst: &BurstResults,
    metrics: &str,
) -> String {
    let mut out = format!(
        "mxgate demo: SMTP sink on {}, mxgate on {at} (max_connections {MAX_CONNECTIONS}, max_per_source {MAX_PER_SOURCE})\n\
         {SESSIONS} sessions from 127.77.0.0/16 and {SESSIONS} from the single address 127.99.0.1, 8 at a time each\n\n",
        sink.addr
    );
    out += &sources_table(many, greedy);
    out += &burst_table(burst);
    let (on, off) = (&burst.queued, &burst.unqueued);
    let delivered = many.delivered + greedy.delivered + on.delivered + off.delivered;
    out += &format!(
        "\nthe sink accepted {} messages (delivered: {delivered})\n\n/metrics excerpt, before the queue was turned off:\n",
        sink.delivered(),
    );
    out += &metrics_excerpt(metrics);
    out
}

/// One line of a two-column table.
fn row(label: &str, a: String, b: String) -> String {
    format!("{label:<28}{a:>16}{b:>16}\n")
}

/// Many sources against one greedy source, side by side.
fn sources_table(many: &Stats, greedy: &Stats) -> String {
    let mut keys: Vec<&String> = many.refused.keys().chain(greedy.refused.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = row("", "many sources".into(), "greedy source".into());
    out += &row(
        "delivered",
        many.delivered.to_string(),
        greedy.delivered.to_string(),
    );
    for k in keys {
        let n = |s: &Stats| s.refused.get(k).copied().unwrap_or(0).to_string();
        out += &row(&format!("refused {k}"), n(many), n(greedy));
    }
    out += &row(
        "refused later",
        many.refused_later.to_string(),
        greedy.refused_later.to_string(),
    );
    out += &row(
        "connect errors + timeouts",
        (many.connect_errors + many.timeouts).to_string(),
        (greedy.connect_errors + greedy.timeouts).to_string(),
    );
    let lat = |s: &Stats| {
        format!(
            "{}/{}",
            s.session.value_at_quantile(0.5),
            s.session.value_at_quantile(0.99)
        )
    };
    out += &row("session p50/p99 µs", lat(many), lat(greedy));
    out
}

/// The burst with the queue on and off, side by side, and the queue's settings.
fn burst_table(burst: &BurstResults) -> String {
    let mut out = format!(
        "\na burst of {BURST} sessions at once from 127.88.0.0/16, ten times max_connections:\n"
    );
    out += &row("", "queue on".into(), "queue off".into());
    let (on, off) = (&burst.queued, &burst.unqueued);
    out += &row(
        "delivered",
        on.delivered.to_string(),
        off.delivered.to_string(),
    );
    let refused = |s: &Stats| s.refused.values().sum::<u64>().to_string();
    out += &row("refused 421", refused(on), refused(off));
    let wait = |s: &Stats| {
        format!(
            "{}/{}",
            s.greeting.value_at_quantile(0.5) / 1000,
            s.greeting.value_at_quantile(0.99) / 1000
        )
    };
    out += &row("greeting wait p50/p99 ms", wait(on), wait(off));
    out += &format!(
        "(queue_timeout {}, max_queued {})\n",
        crate::config::Dur(burst.config.queue_timeout),
        burst.config.max_queued
    );
    out
}

/// The connection, limit and queue-wait series that moved, indented.
fn metrics_excerpt(metrics: &str) -> String {
    let mut out = String::new();
    for line in metrics.lines() {
        let wanted = line.starts_with("mxgate_connections_")
            || line.starts_with("mxgate_limit")
            || line.starts_with("mxgate_queue_wait_seconds_count")
            || line.starts_with("mxgate_queue_wait_seconds_sum");
        if wanted && !line.ends_with(" 0") {
            out += &format!("  {line}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_demo_config_is_validated_with_its_own_limits() {
        let c = super::config("127.0.0.1:2525".parse().unwrap()).unwrap();
        assert_eq!((c.max_connections, c.max_per_source), (12, 3));
        assert_eq!((c.max_queued, c.queue_timeout.as_secs()), (200, 30));
        assert_eq!(c.hostname, "mx.demo");
        // Derived from the demo's own limit, not from the default 1000.
        assert_eq!(c.max_per_ipv6_network, 1);
    }
}
