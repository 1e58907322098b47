//! What a restart keeps of the pregreet cache: one file in `state_dir`, read once at start and
//! written whole, atomically, at most every [`SAVE_INTERVAL`] while the cache changed, and once
//! more at shutdown. Only live entries are written, with their own expiry, so a restart neither
//! forgets a verdict nor stretches one.
//!
//! As with the learned limits: nothing here may stop mxgate from serving. A file that cannot be
//! read, is damaged or of another version is one warning and an empty cache.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::cache::{Cache, Cached, Verdict};

/// The file's name in `state_dir`.
pub const FILE: &str = "pregreet-cache.json";
pub const VERSION: u32 = 1;
/// The most often the file is written while the cache changes.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheFile {
    version: u32,
    entries: Vec<SavedStore>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedStore {
    source: IpAddr,
    verdict: Verdict,
    /// Seconds since the Unix epoch.
    until: u64,
}

#[derive(Deserialize)]
struct VersionedStore {
    version: u32,
}

/// Fills `cache` from the file in `dir`; returns how many live entries it took, or the one
/// warning to log.
pub fn load(dir: &Path, cache: &Cache) -> Result<usize, String> {
    let file = dir.join(FILE);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(empty(&file, &format!("cannot be read ({e})"))),
    };
    let version = serde_json::from_str::<VersionedStore>(&text)
        .map_err(|e| empty(&file, &format!("is not a pregreet cache file ({e})")))?
        .version;
    if version != VERSION {
        return Err(empty(
            &file,
            &format!("has version {version}, and this mxgate reads version {VERSION}"),
        ));
    }
    let saved: CacheFile =
        serde_json::from_str(&text).map_err(|e| empty(&file, &format!("is damaged ({e})")))?;
    let before = cache.len();
    for s in saved.entries {
        let entry = Cached {
            verdict: s.verdict,
            until: s.until,
        };
        cache.insert(s.source.to_canonical(), entry);
    }
    Ok(cache.len() - before)
}

fn empty(file: &Path, why: &str) -> String {
    format!(
        "{} {why}; it is ignored, and the pregreet cache starts empty",
        file.display()
    )
}

/// Keeps the file in step with the cache: writes only when it changed, and warns once when
/// writing starts to fail (and says so when it works again).
pub struct Keeper {
    dir: std::path::PathBuf,
    /// What was written last, to skip a write that would change nothing.
    last: Mutex<Option<Vec<(IpAddr, Cached)>>>,
    failing: AtomicBool,
}

impl Keeper {
    pub fn new(dir: std::path::PathBuf) -> Keeper {
        Keeper {
            dir,
            last: Mutex::new(None),
            failing: AtomicBool::new(false),
        }
    }

    /// Writes the cache's live entries unless they are what was last written.
    pub fn keep(&self, cache: &Cache) -> bool {
        let mut entries = cache.entries();
        entries.sort_unstable_by_key(|(ip, _)| *ip);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref() == Some(&entries) {
            return true;
        }
        let file = CacheFile {
            version: VERSION,
            entries: entries
                .iter()
                .map(|(ip, e)| SavedStore {
                    source: *ip,
                    verdict: e.verdict,
                    until: e.until,
                })
                .collect(),
        };
        let written = serde_json::to_string(&file)
            .map_err(std::io::Error::other)
            .and_then(|text| crate::backend::state::write_atomic(&self.dir, FILE, &(text + "\n")));
        let path = self.dir.join(FILE);
        match written {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(file = %path.display(), "the pregreet cache is saved again");
                }
                *last = Some(entries);
                true
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(file = %path.display(), error = %e, "cannot save the pregreet cache; it will not survive a restart until this is fixed");
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests;
