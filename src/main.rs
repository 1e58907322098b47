//! The `mxgate` binary: parse flags, load the config, run. Everything else is in the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use mxgate::cli::{init_logging, Cli, Command, RunArgs};
use mxgate::Config;

/// How long sessions may go on after SIGTERM or SIGINT before they are cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => match load(args) {
            Ok(config) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Run(args) => {
            let args_for_reload = args.clone();
            let config = match load(args) {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            init_logging(config.log_format);
            match run(config, args_for_reload) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
    }
}

fn load(args: RunArgs) -> anyhow::Result<Config> {
    Ok(Config::load(args.config.as_deref(), args.settings)?)
}

fn run(config: Config, args: RunArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let running = mxgate::start(config).await?;
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    running.reload(load(args.clone()));
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        tracing::info!("stopping");
        running.shutdown(DRAIN_TIMEOUT).await;
        Ok(())
    })
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("mxgate: {e:#}");
    ExitCode::from(2)
}
