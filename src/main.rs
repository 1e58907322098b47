//! The `mxgate` binary: parse flags, load the config, run. Everything else is in the library.

use std::process::ExitCode;

use clap::Parser;
use mxgate::cli::{init_logging, Cli, Command, RunArgs};
use mxgate::Config;

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
        Command::Man { subcommand } => {
            match mxgate::cli::write_man(subcommand.as_deref(), &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e.into()),
            }
        }
        Command::Completions { shell } => {
            mxgate::cli::write_completions(shell, &mut std::io::stdout());
            ExitCode::SUCCESS
        }
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(mxgate::service::run(config, || load(args.clone())))
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("mxgate: {e:#}");
    ExitCode::from(2)
}
