//! The process's own series, under the names every Prometheus client library uses
//! (`process_open_fds`, `process_resident_memory_bytes`, ...), so existing alerts and
//! dashboards for "a process near its descriptor limit" work unchanged.
//!
//! They are read from `/proc/self` at each scrape rather than kept up to date: nothing on the
//! connection path pays for them. The `metrics-process` crate does the same, but it reports
//! through the process-wide recorder, which mxgate does not install (each instance owns its
//! recorder). Only `/proc/self` is read, which systemd's `ProcSubset=pid` leaves visible.

use std::fmt::Write;
use std::sync::OnceLock;

/// Linux reports CPU times in /proc in USER_HZ ticks, which is 100 on every architecture.
const TICKS_PER_SECOND: f64 = 100.0;

/// When this process started, as Unix seconds: read once, at the first scrape or start-up.
fn start_time() -> f64 {
    static START: OnceLock<f64> = OnceLock::new();
    *START.get_or_init(|| started_from_proc().unwrap_or_else(super::unix_now))
}

/// The start time from the kernel: boot time plus the process's start in ticks. `None` where
/// `/proc/stat` is hidden (`ProcSubset=pid`); the first call's clock is used then.
fn started_from_proc() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let boot: f64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let ticks: f64 = self_stat_field(21)?.parse().ok()?;
    Some(boot + ticks / TICKS_PER_SECOND)
}

/// Field `index` (0-based, as in proc(5) minus one) of /proc/self/stat. The command name, in
/// parentheses, may hold spaces, so fields are counted after its closing parenthesis.
fn self_stat_field(index: usize) -> Option<String> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")" come the fields from number 3 (state) on, that is index 2.
    rest.split_whitespace()
        .nth(index.checked_sub(2)?)
        .map(str::to_string)
}

/// A `VmRSS:`-style line of /proc/self/status, in bytes (the file says kB).
fn status_kib(status: &str, key: &str) -> Option<f64> {
    let line = status.lines().find_map(|l| l.strip_prefix(key))?;
    let kib: f64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024.0)
}

/// Appends the `process_*` families to a text exposition. A value /proc does not give is left
/// out rather than reported as 0.
pub fn render(out: &mut String) {
    let mut family = |name: &str, kind: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            );
        }
    };
    let fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as f64);
    family("process_open_fds", "gauge", "Open file descriptors.", fds);
    let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .map(|n| n as f64);
    family(
        "process_max_fds",
        "gauge",
        "The descriptor limit (RLIMIT_NOFILE, soft).",
        max_fds,
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory.",
        status_kib(&status, "VmRSS:"),
    );
    family(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory.",
        status_kib(&status, "VmSize:"),
    );
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|t| t.trim().parse::<f64>().ok());
    family("process_threads", "gauge", "OS threads.", threads);
    let cpu = match (self_stat_field(13), self_stat_field(14)) {
        (Some(u), Some(s)) => match (u.parse::<f64>(), s.parse::<f64>()) {
            (Ok(u), Ok(s)) => Some((u + s) / TICKS_PER_SECOND),
            _ => None,
        },
        _ => None,
    };
    family(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent.",
        cpu,
    );
    family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since the Unix epoch.",
        Some(start_time()),
    );
}

#[cfg(test)]
mod tests;
