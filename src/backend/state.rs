//! What a restart keeps of the learned backend limits: one file in `state_dir`, read once at
//! start and written whole, atomically (a temporary file beside it, fsync, rename), at most
//! every [`SAVE_INTERVAL`] while something changed, and once more at shutdown.
//!
//! Nothing here may stop mxgate from serving: a missing or read-only directory, or a file that
//! is truncated, garbage, of an unknown version, or names a backend that is gone, is one clear
//! warning and a cold start (the limit climbs again from `adaptive_min`, as without the file).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::limit::Saved;

/// The file's name in `state_dir`.
pub const FILE: &str = "learned-limits.json";
/// The version this mxgate writes and reads; a file of another is ignored, with a warning.
pub const VERSION: u32 = 1;
/// The most often the file is written while learned limits change.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(5);
/// An entry older than this describes a backend that may have changed since: ignored.
pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The file as written.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    /// By backend address, as configured.
    backends: BTreeMap<String, SavedBackend>,
}

/// Only the version, read first, so that a file of a newer layout is named as such.
#[derive(Deserialize)]
struct VersionedState {
    version: u32,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedBackend {
    #[serde(flatten)]
    saved: Saved,
    /// When it was written, seconds since the Unix epoch.
    saved_at: u64,
}

/// What start-up found: the limits to resume, by backend address, and one warning per thing
/// it ignored or clamped.
#[derive(Debug, Default)]
pub struct Found {
    pub limits: BTreeMap<String, Saved>,
    pub warnings: Vec<String>,
}

/// The learned backends start-up resumes: their addresses and the bounds in force.
pub struct Learning<'a> {
    pub backends: &'a [String],
    pub min: usize,
    pub max: usize,
}

/// The state file's path in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Reads what an earlier run kept, for the learned backends in `learning`, at `now`.
pub fn load(dir: &Path, learning: &Learning<'_>, now: SystemTime) -> Found {
    let mut found = Found::default();
    let file = path(dir);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        // The first run; a missing directory is named when the first save fails.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return found,
        Err(e) => {
            found
                .warnings
                .push(cold(&file, &format!("cannot be read ({e})")));
            return found;
        }
    };
    let state = match parse(&text) {
        Ok(s) => s,
        Err(why) => {
            found.warnings.push(cold(&file, &why));
            return found;
        }
    };
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    for (backend, entry) in state.backends {
        if !learning.backends.contains(&backend) {
            found.warnings.push(format!(
                "{}: backend {backend} is no longer configured with max_connections = \"auto\"; its learned limit is ignored",
                file.display()
            ));
            continue;
        }
        let age = now.saturating_sub(entry.saved_at);
        if age > MAX_AGE.as_secs() {
            found.warnings.push(format!(
                "{}: the learned limit of {backend} is {} days old; it starts cold",
                file.display(),
                age / 86_400
            ));
            continue;
        }
        let mut saved = entry.saved;
        let (min, max) = (learning.min.max(1), learning.max.max(learning.min.max(1)));
        if !(min..=max).contains(&saved.limit) {
            let clamped = saved.limit.clamp(min, max);
            found.warnings.push(format!(
                "{}: the learned limit of {backend}, {}, is outside adaptive_min..=max_connections ({min}..={max}); it resumes at {clamped}",
                file.display(),
                saved.limit
            ));
            saved.limit = clamped;
        }
        found.limits.insert(backend, saved);
    }
    found
}

/// The file's contents, or why they cannot be used.
fn parse(text: &str) -> Result<StateFile, String> {
    let version = serde_json::from_str::<VersionedState>(text)
        .map_err(|e| format!("is not a learned-limits file ({e})"))?
        .version;
    if version != VERSION {
        return Err(format!(
            "has version {version}, and this mxgate reads version {VERSION}"
        ));
    }
    serde_json::from_str(text).map_err(|e| format!("is damaged ({e})"))
}

fn cold(file: &Path, why: &str) -> String {
    format!(
        "{} {why}; it is ignored, and learned backend limits start cold",
        file.display()
    )
}

/// Writes `limits` as the whole file, atomically: a reader sees the old file or the new one,
/// never a part.
pub fn save(dir: &Path, limits: &BTreeMap<String, Saved>, now: SystemTime) -> std::io::Result<()> {
    let saved_at = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let state = StateFile {
        version: VERSION,
        backends: limits
            .iter()
            .map(|(b, s)| {
                (
                    b.clone(),
                    SavedBackend {
                        saved: *s,
                        saved_at,
                    },
                )
            })
            .collect(),
    };
    let mut text = serde_json::to_string_pretty(&state).map_err(std::io::Error::other)?;
    text.push('\n');
    write_atomic(dir, FILE, &text)
}

/// Writes `text` as the whole file `name` in `dir`, atomically (a temporary file beside it,
/// fsync, rename, then the directory's fsync): a reader sees the old file or the new one,
/// never a part. Shared by every file kept in `state_dir`.
pub fn write_atomic(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    let file = dir.join(name);
    let temporary = dir.join(format!(".{name}.{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&temporary)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&temporary, &file)?;
        // The rename itself is durable once the directory is.
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

/// Keeps the file in step with the learned limits: writes only what changed, and warns once
/// when writing starts to fail (and says so when it works again), not at every attempt.
pub struct LimitKeeper {
    dir: PathBuf,
    last: std::sync::Mutex<Option<BTreeMap<String, Saved>>>,
    failing: std::sync::atomic::AtomicBool,
}

impl LimitKeeper {
    pub fn new(dir: PathBuf) -> LimitKeeper {
        LimitKeeper {
            dir,
            last: std::sync::Mutex::new(None),
            failing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `limits` unless they are what was last written. Returns whether the file holds
    /// them now.
    pub fn keep(&self, limits: BTreeMap<String, Saved>) -> bool {
        use std::sync::atomic::Ordering;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref() == Some(&limits) {
            return true;
        }
        match save(&self.dir, &limits, SystemTime::now()) {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(file = %path(&self.dir).display(), "learned backend limits are saved again");
                }
                *last = Some(limits);
                true
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(file = %path(&self.dir).display(), error = %e, "cannot save learned backend limits; they will not survive a restart until this is fixed");
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests;
