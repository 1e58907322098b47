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
    /// Print a man page (roff), generated from these very flags: mxgate(1), or the page of a
    /// subcommand (`run`, `check`)
    #[command(hide = true)]
    Man { subcommand: Option<String> },
    /// Print shell completions, generated from these very flags
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Writes the man page of the whole command, or of one subcommand (`mxgate-run(1)`), to `out`.
pub fn write_man(subcommand: Option<&str>, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap::CommandFactory;
    let top = Cli::command();
    let cmd = match subcommand {
        None => top,
        Some(name) => {
            let sub = top.find_subcommand(name).cloned().ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no subcommand {name:?}"),
                )
            })?;
            let full: &'static str = Box::leak(format!("mxgate-{name}").into_boxed_str());
            sub.name(full)
        }
    };
    clap_mangen::Man::new(cmd).render(out)
}

/// Writes completions for `shell` to `out`.
pub fn write_completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "mxgate", out);
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
