//! The reloads tried and the last one's outcome: the gate records each, the live view reads them.

use std::sync::Mutex;
use std::time::SystemTime;

/// The last reload's outcome, kept for the live view.
pub struct Reloads {
    state: Mutex<LastReload>,
}

/// The reloads as they stand.
#[derive(Clone, Copy)]
pub struct LastReload {
    /// When the config in force was loaded: the last successful reload, or the start.
    pub loaded: SystemTime,
    /// Whether the last reload tried succeeded (`true` before any).
    pub ok: bool,
    /// Reloads tried since start.
    pub reloads: u64,
}

impl Default for Reloads {
    fn default() -> Self {
        Reloads {
            state: Mutex::new(LastReload {
                loaded: SystemTime::now(),
                ok: true,
                reloads: 0,
            }),
        }
    }
}

impl Reloads {
    pub fn record(&self, ok: bool) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.ok = ok;
        s.reloads += 1;
        if ok {
            s.loaded = SystemTime::now();
        }
    }

    /// The reloads as they stand now.
    pub fn last(&self) -> LastReload {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}
