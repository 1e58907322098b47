use super::*;
use crate::backend::limit::LimitPhase;

const NOW: u64 = 1_800_000_000;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn saved(limit: usize) -> Saved {
    Saved {
        limit,
        baseline: Some(0.000_25),
        phase: LimitPhase::Steady,
        threshold: Some(limit / 2),
    }
}

/// A directory of its own for one test, removed after it.
struct Scratch(PathBuf);

impl Scratch {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir() -> Scratch {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("mxgate-state-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("a scratch directory");
    Scratch(d)
}

fn learning(backends: &[String]) -> Learning<'_> {
    Learning {
        backends,
        min: 5,
        max: 1000,
    }
}

fn two(a: (&str, Saved), b: (&str, Saved)) -> BTreeMap<String, Saved> {
    [(a.0.to_string(), a.1), (b.0.to_string(), b.1)].into()
}

#[test]
fn what_was_saved_is_found_again() {
    let d = dir();
    let backends = vec!["192.0.2.25:25".to_string(), "exchange.example:2526".into()];
    let limits = two((&backends[0], saved(400)), (&backends[1], saved(37)));
    save(d.path(), &limits, at(NOW)).unwrap();
    let found = load(d.path(), &learning(&backends), at(NOW + 60));
    assert_eq!(found.warnings, Vec::<String>::new());
    assert_eq!(found.limits, limits);
    // Written whole: no temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from(FILE)]);
}

#[test]
fn no_file_is_a_quiet_cold_start() {
    let d = dir();
    let found = load(d.path(), &learning(&["192.0.2.25:25".into()]), at(NOW));
    assert!(
        found.limits.is_empty() && found.warnings.is_empty(),
        "{found:?}"
    );
}

/// One warning, naming the file and what is wrong, and nothing resumed.
fn cold_with(text: &str, says: &str) {
    let d = dir();
    std::fs::write(path(d.path()), text).unwrap();
    let found = load(d.path(), &learning(&["192.0.2.25:25".into()]), at(NOW));
    assert!(
        found.limits.is_empty(),
        "{text:?} resumed {:?}",
        found.limits
    );
    assert_eq!(found.warnings.len(), 1, "{text:?}: {:?}", found.warnings);
    let w = &found.warnings[0];
    assert!(
        w.contains(FILE) && w.contains(says) && w.contains("start cold"),
        "{text:?}: {w}"
    );
}

#[test]
fn a_truncated_garbage_or_unknown_file_is_one_warning_and_a_cold_start() {
    let d = dir();
    let limits: BTreeMap<_, _> = [("192.0.2.25:25".to_string(), saved(400))].into();
    save(d.path(), &limits, at(NOW)).unwrap();
    let whole = std::fs::read_to_string(path(d.path())).unwrap();
    assert!(whole.contains("\"version\": 1"), "{whole}");
    cold_with(&whole[..whole.len() / 2], "is not a learned-limits file");
    cold_with(&whole[..whole.len() - 3], "is not a learned-limits file");
    cold_with("", "is not a learned-limits file");
    cold_with("\u{0}\u{1}garbage\n", "is not a learned-limits file");
    cold_with(
        &whole.replace("\"version\": 1", "\"version\": 2"),
        "has version 2, and this mxgate reads version 1",
    );
    cold_with(&whole.replace("\"limit\"", "\"limt\""), "is damaged");
}

#[test]
fn a_gone_backend_and_an_old_entry_are_ignored_with_a_warning_each() {
    let d = dir();
    let limits = two(("192.0.2.25:25", saved(400)), ("192.0.2.26:25", saved(300)));
    save(d.path(), &limits, at(NOW)).unwrap();
    // Only the first is still learned.
    let found = load(d.path(), &learning(&["192.0.2.25:25".into()]), at(NOW));
    assert_eq!(found.limits.keys().collect::<Vec<_>>(), ["192.0.2.25:25"]);
    assert_eq!(found.warnings.len(), 1, "{:?}", found.warnings);
    assert!(
        found.warnings[0].contains("192.0.2.26:25 is no longer configured"),
        "{:?}",
        found.warnings
    );
    // A week and a day later, both are too old.
    let backends = vec!["192.0.2.25:25".to_string(), "192.0.2.26:25".into()];
    let found = load(d.path(), &learning(&backends), at(NOW + 8 * 86_400));
    assert!(found.limits.is_empty(), "{:?}", found.limits);
    assert_eq!(found.warnings.len(), 2, "{:?}", found.warnings);
    assert!(
        found.warnings.iter().all(|w| w.contains("is 8 days old")),
        "{:?}",
        found.warnings
    );
    // Within the week, both resume.
    let found = load(d.path(), &learning(&backends), at(NOW + 6 * 86_400));
    assert_eq!(found.limits, limits);
}

#[test]
fn an_entry_outside_the_bounds_is_clamped_with_a_warning() {
    let d = dir();
    let backends = vec!["192.0.2.25:25".to_string(), "192.0.2.26:25".into()];
    let limits = two((&backends[0], saved(4000)), (&backends[1], saved(2)));
    save(d.path(), &limits, at(NOW)).unwrap();
    let found = load(d.path(), &learning(&backends), at(NOW));
    assert_eq!(found.limits[&backends[0]].limit, 1000);
    assert_eq!(found.limits[&backends[1]].limit, 5);
    assert_eq!(found.warnings.len(), 2, "{:?}", found.warnings);
    assert!(
        found.warnings[0].contains(
            "4000, is outside adaptive_min..=max_connections (5..=1000); it resumes at 1000"
        ),
        "{}",
        found.warnings[0]
    );
    assert!(
        found.warnings[1]
            .contains("2, is outside adaptive_min..=max_connections (5..=1000); it resumes at 5"),
        "{}",
        found.warnings[1]
    );
}

#[test]
fn the_keeper_writes_only_changes_and_survives_an_unwritable_directory() {
    let d = dir();
    let keeper = LimitKeeper::new(d.path().to_path_buf());
    let limits: BTreeMap<_, _> = [("192.0.2.25:25".to_string(), saved(40))].into();
    assert!(keeper.keep(limits.clone()));
    assert!(path(d.path()).exists());
    // Unchanged: not written again.
    std::fs::remove_file(path(d.path())).unwrap();
    assert!(keeper.keep(limits.clone()));
    assert!(!path(d.path()).exists());
    // Changed: written.
    let changed: BTreeMap<_, _> = [("192.0.2.25:25".to_string(), saved(41))].into();
    assert!(keeper.keep(changed.clone()));
    let found = load(
        d.path(),
        &learning(&["192.0.2.25:25".into()]),
        SystemTime::now(),
    );
    assert_eq!(found.limits, changed);
    // A directory that cannot hold the file: no panic, no file, and false.
    let not_a_dir = d.path().join("a-file");
    std::fs::write(&not_a_dir, "").unwrap();
    let keeper = LimitKeeper::new(not_a_dir);
    assert!(!keeper.keep(limits));
}
