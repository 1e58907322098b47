//! The command line: subcommands and their flags, and the logging set-up they share.
//!
//! The flag set of `run` is [`Settings`] itself, so every flag has its config key by construction.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{LogFormat, Settings};

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
    Check(RunArgs),
}

#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// TOML config file; flags override its keys
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub settings: Settings,
}

/// Installs the tracing subscriber. `RUST_LOG` overrides the default level (info).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
