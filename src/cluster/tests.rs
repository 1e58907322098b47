//! The cluster against a real `redis-server` (releases that race admissions, failures on an
//! older connection), and the fallback share's rounding.

use super::*;

async fn until(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "never {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A fresh redis-server and one instance connected to it, with a 3 s lease.
async fn joined(
    fallback_share: f64,
    admission_timeout: Duration,
) -> Option<(script::tests::Server, Arc<Cluster>)> {
    let (server, url) = script::tests::server_url()?;
    let config = ClusterConfig {
        redis: url,
        password_file: None,
        name: "t".into(),
        instance: "a".into(),
        lease_ttl: Duration::from_secs(3),
        fallback_share,
        admission_timeout,
    };
    let cluster = Cluster::start(config, &Metrics::new(), Arc::default());
    until("connected", || cluster.connected()).await;
    Some((server, cluster))
}

// One thread: the writer cannot run between a claim's drop and the next admission, so
// the admission reaches Redis before the release, every round.
#[tokio::test(flavor = "current_thread")]
async fn a_slot_freed_here_is_not_refused_to_the_next_client_by_its_release_on_the_way() {
    let Some((_server, cluster)) = joined(1.0, Duration::from_millis(500)).await else {
        return;
    };
    let ask = Ask {
        source: "192.0.2.1/32".parse().unwrap(),
        source_cap: None,
        network: None,
        global_cap: 3,
        enforce: true,
    };
    let mut held = Vec::new();
    for round in 0..23 {
        if held.len() == 3 {
            // The session ends; the next client comes at once.
            held.pop();
        }
        match cluster.admit(&ask).await {
            ClusterVerdict::Admitted(claim, None) => held.push(claim),
            ClusterVerdict::Admitted(_, Some(r)) | ClusterVerdict::Refused(r) => {
                panic!("round {round}: {r:?} with {} held", held.len())
            }
        }
    }
    assert!(matches!(
        cluster.admit(&ask).await,
        ClusterVerdict::Refused(RejectReason::GlobalLimit)
    ));
    assert_eq!(cluster.local_sessions(), 3);
    cluster.abandon();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_on_an_older_connection_leaves_the_newer_one_up() {
    let Some((_server, cluster)) = joined(0.5, Duration::from_millis(50)).await else {
        return;
    };
    let first = cluster.link().unwrap().generation;
    cluster.down(first, "the first connection failed");
    assert!(!cluster.connected());
    until("connected again", || cluster.connected()).await;
    let second = cluster.link().unwrap().generation;
    assert_ne!(first, second);
    // An admission that was in flight on the first connection reports its failure late:
    // the second connection stands.
    cluster.down(first, "late news from the first connection");
    assert!(cluster.connected());
    assert_eq!(cluster.link().unwrap().generation, second);
    cluster.abandon();
}

#[test]
fn a_fallback_share_rounds_down_but_keeps_a_slot() {
    assert_eq!(fallback_cap(10, 0.5), 5);
    assert_eq!(fallback_cap(3, 0.5), 1);
    assert_eq!(fallback_cap(1, 0.1), 1);
    assert_eq!(fallback_cap(0, 1.0), 0);
    assert_eq!(fallback_cap(1000, 1.0), 1000);
}
