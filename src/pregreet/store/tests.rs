use super::*;
use crate::pregreet::cache::Clock;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

fn dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mxgate-pregreet-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn live_entries_survive_a_restart_with_their_own_expiry() {
    let d = dir("restart");
    let clock = Arc::new(AtomicU64::new(5000));
    let before = Cache::new(100, Clock::Manual(clock.clone()));
    let a: IpAddr = "192.0.2.1".parse().unwrap();
    let b: IpAddr = "2001:db8::1".parse().unwrap();
    let gone: IpAddr = "192.0.2.9".parse().unwrap();
    before.put(a, Verdict::Pass, 86_400);
    before.put(b, Verdict::Fail, 600);
    before.put(gone, Verdict::Fail, 10);
    clock.store(5010, Ordering::Relaxed);
    assert!(Keeper::new(d.clone()).keep(&before));
    let after = Cache::new(100, Clock::Manual(clock.clone()));
    assert_eq!(load(&d, &after), Ok(2));
    assert_eq!(after.get(a), Some(Verdict::Pass));
    assert_eq!(after.get(b), Some(Verdict::Fail));
    assert_eq!(after.get(gone), None);
    clock.store(5600, Ordering::Relaxed);
    assert_eq!(after.get(b), None, "the failure keeps its first expiry");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_damaged_file_is_one_warning_and_an_empty_cache() {
    let d = dir("damaged");
    std::fs::write(
        d.join(FILE),
        "{\"version\":1,\"entries\":[{\"source\":\"x\"",
    )
    .unwrap();
    let cache = Cache::new(100, Clock::System);
    let warning = load(&d, &cache).unwrap_err();
    assert!(
        warning.contains("is damaged") || warning.contains("is not a pregreet cache file"),
        "{warning}"
    );
    assert!(
        warning.ends_with("it is ignored, and the pregreet cache starts empty"),
        "{warning}"
    );
    assert!(cache.is_empty());
    std::fs::write(d.join(FILE), "{\"version\":7,\"entries\":[]}").unwrap();
    let warning = load(&d, &cache).unwrap_err();
    assert!(warning.contains("has version 7"), "{warning}");
    let _ = std::fs::remove_dir_all(&d);
}
