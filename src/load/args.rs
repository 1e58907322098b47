//! The flags of `mxgate load` and `mxgate sink`, and the values they parse: the load tool's
//! own, so `load` needs nothing from the command line module ([`crate::cli`] only lists them).

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// The SMTP server (or mxgate) to load
    #[arg(long, value_name = "HOST:PORT")]
    pub target: crate::config::HostPort,
    /// Bind each session to the next address of this network, to appear as many clients
    #[arg(long, value_name = "CIDR")]
    pub sources: Option<crate::config::Cidr>,
    /// Closed loop: sessions in flight at once, each client starting its next when one ends
    #[arg(long, value_name = "N", default_value_t = 10, conflicts_with_all = ["rate", "profile"],
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,
    /// Open loop: start sessions on a Poisson schedule at this rate (such as 50/s), whatever
    /// the server does; latency counts from each session's scheduled start
    #[arg(long, value_name = "N/s", conflicts_with_all = ["profile", "ramp"])]
    pub rate: Option<Rate>,
    /// Open loop at the rate of the administrator's numbers, sizes drawn around their mean:
    /// users=N,per-user-per-hour=N[,peak=F][,size=BYTES]
    // The doc comment is clap's help text: its brackets are flag syntax, not links.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, value_name = "KEY=VALUE,...", conflicts_with = "ramp")]
    pub profile: Option<crate::load::profile::Profile>,
    /// Stop after this many sessions [default: 1000; a ramp step or a profile runs for a time]
    #[arg(long, value_name = "N", conflicts_with = "duration",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub sessions: Option<u64>,
    /// Stop after this long (per step with --ramp) [default: 5s per step, 60s for --profile]
    #[arg(long, value_name = "DUR")]
    pub duration: Option<crate::config::Dur>,
    /// Size of each generated message (the mean, with --profile and no size= in it)
    #[arg(long, value_name = "BYTES", default_value = "1024")]
    pub message_size: crate::config::ByteSize,
    /// Step the load up, stopping at the knee and bisecting: concurrency START..END[/STEP], or
    /// open-loop rate START/s..END/s[/STEP]
    #[arg(long, value_name = "START..END[/STEP]")]
    pub ramp: Option<crate::load::Ramp>,
    /// A step is bad past this share of failed sessions (refused, timed out, not connected)
    #[arg(long, value_name = "PERCENT", default_value = "1%")]
    pub max_errors: Percent,
    /// Draw delivered/s and p99 against the load, with the knee, into this SVG file (--ramp)
    #[arg(long, value_name = "FILE.svg", requires = "ramp")]
    pub plot: Option<PathBuf>,
    /// MAIL FROM: for Exchange, an address of one of its accepted domains
    #[arg(long, value_name = "ADDRESS", default_value = crate::load::smtp::DEFAULT_FROM, value_parser = address)]
    pub from: String,
    /// RCPT TO, repeatable, one per session in turn: for Exchange, a mailbox of an accepted
    /// domain, or a journaling or discard address, never a real user's [default: sink@mxgate.test]
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, value_name = "ADDRESS", value_parser = address)]
    pub to: Vec<String>,
    /// The EHLO name
    #[arg(long, value_name = "NAME", default_value = crate::load::smtp::DEFAULT_EHLO, value_parser = ehlo_name)]
    pub ehlo: String,
    /// Load a server that offers STARTTLS in plain text, without asking for TLS (mxgate load
    /// does not speak it); without this flag such a server is not loaded
    #[arg(long)]
    pub starttls_skip: bool,
    /// Seeds the arrival schedule and the message sizes, so a run can be repeated
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object on stdout and nothing else
    #[arg(long)]
    pub json: bool,
    /// Allow a target that is not a loopback address
    #[arg(long)]
    pub allow_remote: bool,
}

/// An arrival rate: `50/s`, or just `50`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate(pub f64);

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Rate, String> {
        s.strip_suffix("/s")
            .unwrap_or(s)
            .parse::<f64>()
            .ok()
            .filter(|r| crate::load::RATES.contains(r))
            .map(Rate)
            .ok_or_else(|| {
                format!(
                    "invalid rate {s:?}: expected sessions per second, such as 50/s, from {}/s to {}/s",
                    crate::load::RATES.start(),
                    crate::load::RATES.end()
                )
            })
    }
}

/// A share in percent: `1%`, `0.5%`. The sign is required: a bare `1` could mean either.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percent(pub f64);

impl std::str::FromStr for Percent {
    type Err = String;

    fn from_str(s: &str) -> Result<Percent, String> {
        s.strip_suffix('%')
            .and_then(|p| p.trim().parse::<f64>().ok())
            .map(|v| v / 100.0)
            .filter(|v| (0.0..=1.0).contains(v))
            .map(Percent)
            .ok_or_else(|| format!("invalid share {s:?}: expected a percentage such as 1% or 0.5%"))
    }
}

/// An envelope address: `local@domain`, nothing that would break the command line it goes in.
fn address(s: &str) -> Result<String, String> {
    // ASCII only: the tool does not ask for SMTPUTF8.
    let bad = s.is_empty()
        || s.len() > 254
        || s.bytes()
            .any(|b| !b.is_ascii_graphic() || b"<>()[]\\,;:\"".contains(&b))
        || !s
            .rsplit_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && is_host_name(d));
    if bad {
        return Err(format!(
            "invalid address {s:?}: expected local@domain in ASCII, without spaces, brackets or quotes"
        ));
    }
    Ok(s.to_string())
}

/// An EHLO name: a host name (RFC 5321 §4.1.2 also allows an address literal, which a load
/// generator does not need).
fn ehlo_name(s: &str) -> Result<String, String> {
    if !is_host_name(s) {
        return Err(format!(
            "invalid EHLO name {s:?}: expected a host name (letters, digits, hyphens and dots)"
        ));
    }
    Ok(s.to_string())
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[derive(Debug, clap::Args)]
pub struct SinkArgs {
    /// Where to listen (loopback)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:2525")]
    pub listen: std::net::SocketAddr,
    /// Sessions served at once; past it, Exchange's 421 and a close
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Greeting delay per session held, in microseconds
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub delay_per_session_us: u64,
    /// Past this many sessions, each one more adds --steep-delay-ms to the greeting
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub knee: usize,
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub steep_delay_ms: u64,
    /// Hold every session this long before its greeting
    #[arg(long, value_name = "DUR", default_value = "0s")]
    pub hold: crate::config::Dur,
    /// Act as Exchange does: recipients outside mxgate.test refused with 550 5.7.54, and
    /// STARTTLS offered (and refused with 454)
    #[arg(long)]
    pub exchange: bool,
}
