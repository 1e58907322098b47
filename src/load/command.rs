//! `mxgate load` and `mxgate sink` as the command line runs them: flags become [`Options`], the
//! guards that keep the tool from measuring itself (a remote target, an oversized message, too
//! few descriptors, a server that wants TLS) refuse before any load, and the chosen report is
//! printed.
//!
//! It owns the command line's checks and its one print of the result. It must never hold a
//! measurement of its own: what a run counts is the runner's and the stats', so the library
//! callers (the demo, the tests) see the same figures the command prints.

use std::net::SocketAddr;

use anyhow::Context;

use super::args::{LoadArgs, SinkArgs};

use super::{
    nth_source, plot, profile, ramp, run, smtp, Arrivals, Bound, Options, Sizes, Transaction,
    MAX_IN_FLIGHT, MAX_MESSAGE, STEP_TIMEOUT,
};

/// Descriptors the load tool keeps for itself: stdio, the runtime, the probe.
const DESCRIPTOR_RESERVE: usize = 64;

/// Refuses targets that are not on this machine unless explicitly allowed.
pub fn check_target(target: SocketAddr, allow_remote: bool) -> Result<(), String> {
    if target.ip().to_canonical().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(format!(
            "{target} is not a loopback address; pass --allow-remote to load a server you own elsewhere"
        ))
    }
}

/// `mxgate load`: one run, a ramp or a profile; a table or one JSON object on stdout.
pub fn run_command(args: LoadArgs) -> anyhow::Result<()> {
    check_target(args.target.addr, args.allow_remote).map_err(anyhow::Error::msg)?;
    check_sizes(&args)?;
    let mut opts = options(&args);
    fit_descriptors(&args, &mut opts)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    refuse_tls(&runtime, &args, &opts)?;
    let out = measure(&runtime, &args, &opts)?;
    print!("{out}");
    Ok(())
}

fn check_sizes(args: &LoadArgs) -> anyhow::Result<()> {
    if args.message_size.0 > MAX_MESSAGE
        || args
            .profile
            .is_some_and(|p| p.size.is_some_and(|n| n > MAX_MESSAGE))
    {
        anyhow::bail!(
            "messages of at most {} MiB: a larger size measures the disk, not the limits",
            MAX_MESSAGE >> 20
        );
    }
    Ok(())
}

/// The run's bound: what the flags say, else what suits a profile, a ramp or one run.
fn bound(args: &LoadArgs) -> Bound {
    let timed = args.ramp.is_some() || args.profile.is_some();
    match (args.sessions, args.duration) {
        (Some(n), _) => Bound::Sessions(n),
        (None, Some(d)) => Bound::Duration(d.0),
        (None, None) if args.profile.is_some() => {
            Bound::Duration(std::time::Duration::from_secs(60))
        }
        (None, None) if timed => ramp::DEFAULT_STEP,
        (None, None) => Bound::Sessions(1000),
    }
}

fn options(args: &LoadArgs) -> Options {
    let concurrency = args.concurrency as usize;
    let transaction = Transaction {
        ehlo: args.ehlo.clone(),
        from: args.from.clone(),
        to: if args.to.is_empty() {
            vec![smtp::DEFAULT_TO.to_string()]
        } else {
            args.to.clone()
        },
    };
    Options {
        sources: args.sources.map(|c| c.0),
        arrivals: match args.rate {
            Some(r) => Arrivals::Open(r.0),
            None => Arrivals::Closed(concurrency),
        },
        sizes: Sizes::Fixed(args.message_size.0),
        transaction: std::sync::Arc::new(transaction),
        seed: args.seed,
        progress: true,
        ..Options::new(args.target.addr, concurrency, bound(args))
    }
}

/// Each session is one descriptor: a run the descriptor limit cannot hold would count its own
/// EMFILE as the server's connect errors. A closed loop that does not fit is refused; an open
/// one is capped, and says so.
fn fit_descriptors(args: &LoadArgs, opts: &mut Options) -> anyhow::Result<()> {
    let room = descriptors().saturating_sub(DESCRIPTOR_RESERVE);
    let closed = match (args.rate, args.profile, args.ramp) {
        (None, None, Some(r)) => r.max_concurrency(),
        (None, None, None) => Some(args.concurrency as usize),
        _ => None,
    };
    match closed {
        Some(n) if n > room => anyhow::bail!(
            "concurrency {n} needs {n} descriptors, and only {room} are free under the \
             descriptor limit (ulimit -n): raise it, or load with fewer"
        ),
        Some(_) => {}
        None if room < MAX_IN_FLIGHT => {
            eprintln!(
                "mxgate load: at most {room} sessions open at once (the descriptor limit); \
                 arrivals past it are counted as not started"
            );
            opts.max_in_flight = room.max(1);
        }
        None => {}
    }
    Ok(())
}

/// One probe session first: an unreachable server fails here, and one that offers STARTTLS is
/// loaded in plain text only when the operator says so.
fn refuse_tls(
    runtime: &tokio::runtime::Runtime,
    args: &LoadArgs,
    opts: &Options,
) -> anyhow::Result<()> {
    let probe = runtime
        .block_on(smtp::probe(
            args.target.addr,
            opts.sources.map(|n| nth_source(n, 0)),
            &args.ehlo,
            STEP_TIMEOUT,
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
    Ok(())
}

/// Runs the profile, the ramp (and draws its plot) or the one run, and renders its report.
fn measure(
    runtime: &tokio::runtime::Runtime,
    args: &LoadArgs,
    opts: &Options,
) -> anyhow::Result<String> {
    let max_errors = args.max_errors.0;
    Ok(match (args.profile, args.ramp) {
        (Some(p), _) => runtime
            .block_on(profile::profile(opts, p, max_errors))
            .render(args.json),
        (None, Some(r)) => {
            let report = runtime.block_on(ramp::ramp(opts, r, max_errors));
            if let Some(path) = &args.plot {
                std::fs::write(path, plot::svg(&report))
                    .with_context(|| format!("writing the plot to {}", path.display()))?;
            }
            report.render(args.json)
        }
        (None, None) => {
            let stats = runtime.block_on(run(opts));
            if args.json {
                format!("{}\n", stats.to_json())
            } else {
                stats.table()
            }
        }
    })
}

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

/// `mxgate sink`: the embedded sink on its own, until interrupted; prints its counts every
/// second.
pub fn run_sink_command(args: SinkArgs) -> anyhow::Result<()> {
    use super::sink::{Behaviour, Sink};
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
