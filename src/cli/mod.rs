//! The command line: subcommands and their flags. The flags of `load` and `sink` are the load
//! tool's own ([`crate::load::args`]); the man pages and completions are written by `man`.
//!
//! The flag set of `run` is [`Settings`] itself, so every flag has its config key by construction.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Settings;
pub use crate::load::args::{LoadArgs, SinkArgs};

mod man;
pub use man::{write_completions, write_config_man, write_man};

#[derive(Debug, Parser)]
#[command(
    name = "mxgate",
    version,
    about = "Connection-limiting SMTP proxy: caps connections globally and per source, \
             answers the rest with 421, forwards everything else byte for byte"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Accept clients and forward them to the backend
    Run(RunArgs),
    /// Validate a config and print the effective settings; exit non-zero if invalid
    Check(CheckArgs),
    /// Show a running instance's live view: sessions, queue, top sources, refusals, backends
    Status(StatusArgs),
    /// Drive real SMTP sessions at a server to size its limits
    Load(LoadArgs),
    /// Show the whole job on this machine: a sink, mxgate in front, load from many sources
    /// and from one greedy source, and the resulting counts
    Demo,
    /// Run the embedded SMTP sink on its own, optionally Exchange-like (a hidden connection
    /// limit, a greeting delay that grows with load): a backend for trials and benchmarks
    #[command(hide = true)]
    Sink(SinkArgs),
    /// Print a man page (roff), generated from these very flags: mxgate(1), or the page of a
    /// subcommand (`run`, `check`, `load`, `demo`, `status`), or mxgate.toml(5) (`mxgate.toml`)
    #[command(hide = true)]
    Man { subcommand: Option<String> },
    /// Print shell completions, generated from these very flags
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Print nothing on success but warnings, on stderr (for `ExecReload=`)
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The instance's metrics listener [default: 127.0.0.1:9925, or the `metrics` of --config]
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Read the metrics address from this config file
    #[arg(long, value_name = "FILE", conflicts_with = "metrics")]
    pub config: Option<PathBuf>,
    /// Print the raw JSON of `/status`
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// TOML config file; flags override its keys
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub settings: Settings,
}
