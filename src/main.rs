//! The `mxgate` binary: parse flags, load the config, run. Everything else is in the library.

use std::process::ExitCode;

use clap::Parser;
use mxgate::cli::{Cli, Command, RunArgs};
use mxgate::logging::init_logging;
use mxgate::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => match load_config(args.run.clone()) {
            Ok(config) => {
                if !args.quiet {
                    print!("{}", config.to_toml());
                }
                let mut warnings = match &args.run.config {
                    Some(file) => mxgate::config::file_warnings(file, &config),
                    None => Vec::new(),
                };
                warnings.extend(mxgate::server::check(config));
                for warning in warnings {
                    eprintln!("mxgate: warning: {warning}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Man { subcommand } => {
            let mut out = std::io::stdout();
            let written = match subcommand.as_deref() {
                Some("mxgate.toml") => mxgate::cli::write_config_man(&mut out),
                other => mxgate::cli::write_man(other, &mut out),
            };
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e.into()),
            }
        }
        Command::Completions { shell } => {
            mxgate::cli::write_completions(shell, &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Status(args) => match status(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Load(args) => match mxgate::load::run_command(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Sink(args) => match mxgate::load::run_sink_command(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Demo => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build();
            match runtime
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(mxgate::demo::run()))
            {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Run(args) => {
            let args_for_reload = args.clone();
            let config = match load_config(args) {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            init_logging(config.log_format);
            if let Some(file) = &args_for_reload.config {
                for warning in mxgate::config::file_warnings(file, &config) {
                    tracing::warn!("{warning}");
                }
            }
            match run(config, args_for_reload) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
    }
}

/// `mxgate status`: a running instance's live view, as tables or the raw JSON.
fn status(args: mxgate::cli::StatusArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let addr = match (args.metrics, &args.config) {
        (Some(a), _) => a,
        (None, Some(file)) => Config::load(Some(file), Default::default())?
            .metrics
            .with_context(|| {
                format!(
                    "{}: `metrics` is off, so there is no live view to ask",
                    file.display()
                )
            })?,
        (None, None) => mxgate::config::DEFAULT_METRICS
            .parse()
            .expect("the default metrics address parses"),
    };
    if args.json {
        println!("{}", mxgate::status::client::fetch(addr)?);
    } else {
        print!(
            "{}",
            mxgate::status::client::render(&mxgate::status::client::snapshot(addr)?)
        );
    }
    Ok(())
}

fn load_config(args: RunArgs) -> anyhow::Result<Config> {
    Ok(Config::load(args.config.as_deref(), args.settings)?)
}

fn run(config: Config, args: RunArgs) -> anyhow::Result<()> {
    // Control work only (signals, reload, metrics, health checks): connections run on the
    // server's own worker threads.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(mxgate::service::run(config, || load_config(args.clone())))
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("mxgate: {e:#}");
    ExitCode::from(2)
}
