//! `mxgate load`: a load simulator that runs real SMTP transactions, so limits can be sized
//! from measurements instead of from users' complaints.
//!
//! Sessions arrive either closed loop (`--concurrency N` clients, each starting its next
//! session when the last ends) or open loop (`--rate R/s`, a Poisson schedule that does not
//! wait for the server: latency is measured from each session's scheduled start, so a server
//! that falls behind shows as latency instead of as a slower load). Each session binds a source
//! from `--sources` (so per-source limits apply as they would to many clients), runs
//! greeting → EHLO → MAIL → RCPT → DATA → QUIT with the envelope of `--from`/`--to`, and is
//! counted exactly once: delivered, refused at the greeting (by code and enhanced code),
//! refused later (by step and code), connect error or timeout (by step). Every run stops at
//! its session or duration bound, open-loop runs hold at most `max_in_flight` sessions, and
//! targets that are not loopback are refused unless `--allow-remote` is given.

pub mod args;
mod command;
pub mod plot;
pub mod profile;
pub mod ramp;
pub mod rng;
mod runner;
pub mod sink;
pub mod smtp;
mod stats;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

pub use command::{check_target, run_command, run_sink_command};
pub use ramp::{Ramp, RampReport};
pub use rng::Sizes;
pub use runner::{nth_source, run};
pub use smtp::{Outcome, Transaction};
pub use stats::Stats;

/// How long one SMTP step may take before the session counts as a timeout.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The most sessions an open-loop run holds at once; an arrival past it is not started and is
/// counted as a failure of the run (`not_started`). It bounds the descriptors and the memory a
/// stalled server can make the tool use.
pub const MAX_IN_FLIGHT: usize = 4096;

/// The open-loop rates the tool accepts, in sessions per second.
pub const RATES: std::ops::RangeInclusive<f64> = 0.001..=100_000.0;

/// The largest message the tool generates.
pub const MAX_MESSAGE: usize = 64 << 20;

/// When a run ends.
#[derive(Clone, Copy, Debug)]
pub enum Bound {
    Sessions(u64),
    Duration(Duration),
}

/// How sessions arrive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arrivals {
    /// This many clients, each starting its next session when the last one ends.
    Closed(usize),
    /// Sessions started on a Poisson schedule at this rate per second, whatever the server does.
    Open(f64),
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub target: SocketAddr,
    /// Sources to bind, one address per session in turn; `None` lets the system choose.
    pub sources: Option<IpNet>,
    pub arrivals: Arrivals,
    pub bound: Bound,
    pub sizes: Sizes,
    pub transaction: Arc<Transaction>,
    /// Seeds the arrival schedule and the message sizes.
    pub seed: u64,
    /// Open loop: the most sessions held at once; an arrival past it is not started, and is
    /// counted as such.
    pub max_in_flight: usize,
    /// How long one SMTP step may take, and how long the run waits past its bound for the
    /// sessions still under way.
    pub step: Duration,
    /// Show progress on stderr (a bar on a terminal, plain lines otherwise).
    pub progress: bool,
}

impl Options {
    /// A closed-loop run of `concurrency` clients with 2 KiB messages and the default envelope.
    pub fn new(target: SocketAddr, concurrency: usize, bound: Bound) -> Options {
        Options {
            target,
            sources: None,
            arrivals: Arrivals::Closed(concurrency),
            bound,
            sizes: Sizes::Fixed(2048),
            transaction: Arc::default(),
            seed: 1,
            max_in_flight: MAX_IN_FLIGHT,
            step: STEP_TIMEOUT,
            progress: false,
        }
    }
}

#[cfg(test)]
mod tests;
