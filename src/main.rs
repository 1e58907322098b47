//! The `mxgate` binary: parse flags, load the config, run. Everything else is in the library.

use std::process::ExitCode;

use clap::Parser;
use mxgate::cli::{init_logging, Cli, Command, LoadArgs, RunArgs};
use mxgate::load::{self as sim, Bound, Options};
use mxgate::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => match load_config(args.run) {
            Ok(config) => {
                if !args.quiet {
                    print!("{}", config.to_toml());
                }
                for warning in mxgate::server::check(config) {
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
        Command::Load(args) => match load(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Sink(args) => match sink(args) {
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
            match run(config, args_for_reload) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
    }
}

/// The embedded sink on its own, until interrupted; prints its counts every second.
fn sink(args: mxgate::cli::SinkArgs) -> anyhow::Result<()> {
    use mxgate::load::sink::{Behaviour, Sink};
    if !args.listen.ip().is_loopback() {
        anyhow::bail!("the sink listens on loopback only, not {}", args.listen);
    }
    let like = if args.exchange {
        Behaviour::exchange(0)
    } else {
        Behaviour::default()
    };
    let behaviour = Behaviour {
        limit: args.limit,
        delay_per_session: std::time::Duration::from_micros(args.delay_per_session_us),
        knee: args.knee,
        steep_delay: std::time::Duration::from_millis(args.steep_delay_ms),
        hold: args.hold.0,
        ..like
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let sink = Sink::start_with(args.listen, behaviour).await?;
        println!("sink on {}", sink.addr);
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => println!(
                    "delivered={} busy={} held={} peak={}",
                    sink.delivered(), sink.busy(), sink.held(), sink.peak()
                ),
                r = tokio::signal::ctrl_c() => {
                    r?;
                    println!(
                        "delivered={} busy={} held={} peak={}",
                        sink.delivered(), sink.busy(), sink.held(), sink.peak()
                    );
                    return Ok(());
                }
            }
        }
    })
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

/// `mxgate load`: one run, a ramp or a profile; a table or one JSON object on stdout.
fn load(args: LoadArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    sim::check_target(args.target.addr, args.allow_remote).map_err(anyhow::Error::msg)?;
    let timed = args.ramp.is_some() || args.profile.is_some();
    let concurrency = args.concurrency as usize;
    if args.message_size.0 > sim::MAX_MESSAGE
        || args
            .profile
            .is_some_and(|p| p.size.is_some_and(|n| n > sim::MAX_MESSAGE))
    {
        anyhow::bail!(
            "messages of at most {} MiB: a larger size measures the disk, not the limits",
            sim::MAX_MESSAGE >> 20
        );
    }
    let bound = match (args.sessions, args.duration) {
        (Some(n), _) => Bound::Sessions(n),
        (None, Some(d)) => Bound::Duration(d.0),
        (None, None) if args.profile.is_some() => {
            Bound::Duration(std::time::Duration::from_secs(60))
        }
        (None, None) if timed => sim::ramp::DEFAULT_STEP,
        (None, None) => Bound::Sessions(1000),
    };
    let transaction = sim::Transaction {
        ehlo: args.ehlo.clone(),
        from: args.from.clone(),
        to: if args.to.is_empty() {
            vec![sim::smtp::DEFAULT_TO.to_string()]
        } else {
            args.to.clone()
        },
    };
    let opts = Options {
        sources: args.sources.map(|c| c.0),
        arrivals: match args.rate {
            Some(r) => sim::Arrivals::Open(r.0),
            None => sim::Arrivals::Closed(concurrency),
        },
        sizes: sim::Sizes::Fixed(args.message_size.0),
        transaction: std::sync::Arc::new(transaction),
        seed: args.seed,
        progress: true,
        ..Options::new(args.target.addr, concurrency, bound)
    };
    let mut opts = opts;
    // Each session is one descriptor: a run the descriptor limit cannot hold would count its
    // own EMFILE as the server's connect errors.
    let room = descriptors().saturating_sub(DESCRIPTOR_RESERVE);
    let closed = match (args.rate, args.profile, args.ramp) {
        (None, None, Some(r)) => r.max_concurrency(),
        (None, None, None) => Some(concurrency),
        _ => None,
    };
    match closed {
        Some(n) if n > room => anyhow::bail!(
            "concurrency {n} needs {n} descriptors, and only {room} are free under the \
             descriptor limit (ulimit -n): raise it, or load with fewer"
        ),
        Some(_) => {}
        None if room < sim::MAX_IN_FLIGHT => {
            eprintln!(
                "mxgate load: at most {room} sessions open at once (the descriptor limit); \
                 arrivals past it are counted as not started"
            );
            opts.max_in_flight = room.max(1);
        }
        None => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let probe = runtime
        .block_on(sim::smtp::probe(
            args.target.addr,
            opts.sources.map(|n| sim::nth_source(n, 0)),
            &args.ehlo,
            sim::STEP_TIMEOUT,
        ))
        .map_err(anyhow::Error::msg)?;
    if probe.starttls && !args.starttls_skip {
        anyhow::bail!(
            "{} offers STARTTLS, and mxgate load does not speak TLS: pass --starttls-skip to load \
             it in plain text (the server must accept mail without TLS on this connector; the \
             figures then leave out the cost of TLS)",
            args.target.addr
        );
    }
    let max_errors = args.max_errors.0;
    let out = match (args.profile, args.ramp) {
        (Some(p), _) => runtime
            .block_on(sim::profile::profile(&opts, p, max_errors))
            .render(args.json),
        (None, Some(ramp)) => {
            let report = runtime.block_on(sim::ramp::ramp(&opts, ramp, max_errors));
            if let Some(path) = &args.plot {
                std::fs::write(path, sim::plot::svg(&report))
                    .with_context(|| format!("writing the plot to {}", path.display()))?;
            }
            report.render(args.json)
        }
        (None, None) => {
            let stats = runtime.block_on(sim::run(&opts));
            if args.json {
                format!("{}\n", stats.to_json())
            } else {
                stats.table()
            }
        }
    };
    print!("{out}");
    Ok(())
}

/// Descriptors the load tool keeps for itself: stdio, the runtime, the probe.
const DESCRIPTOR_RESERVE: usize = 64;

/// The soft descriptor limit, first raised to the hard one.
fn descriptors() -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if setrlimit(Resource::Nofile, limit).is_err() {
            limit = getrlimit(Resource::Nofile);
        }
    }
    limit.current.map_or(usize::MAX, |n| n as usize)
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("mxgate: {e:#}");
    ExitCode::from(2)
}
