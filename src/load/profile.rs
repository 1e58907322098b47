//! `mxgate load --profile`: sizing from the administrator's own numbers. Users, messages per
//! user per hour, the peak factor and the mean message size become an open-loop arrival rate
//! and a size distribution; the run then says what the server delivered, how many sessions it
//! needed at once, and what `max_connections` to set.

use super::{rng::Sizes, run, Arrivals, Options, Stats};

/// The margin a recommendation leaves above the concurrency measured at the peak.
pub const HEADROOM: f64 = 1.5;
/// Below this share of the offered rate delivered, the server did not keep up.
pub const KEPT_UP: f64 = 0.95;
/// Fewer arrivals than this are too few to size from.
pub const MIN_ARRIVALS: u64 = 20;

/// The administrator's numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Profile {
    pub users: f64,
    /// Messages each user receives in an average hour.
    pub per_user_per_hour: f64,
    /// How much busier the peak hour is than the average one.
    pub peak: f64,
    /// The mean message size, attachments included; `None` uses `--message-size`.
    pub size: Option<usize>,
}

impl std::str::FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Profile, String> {
        let mut users = None;
        let mut per_user = None;
        let mut peak = None;
        let mut size = None;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                format!("profile: {part:?} is not KEY=VALUE (keys: users, per-user-per-hour, peak, size)")
            })?;
            let number = || -> Result<f64, String> {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .ok_or_else(|| format!("profile: {key}={value:?} must be a number above 0"))
            };
            match key {
                "users" => users = Some(number()?),
                "per-user-per-hour" => per_user = Some(number()?),
                "peak" => peak = Some(number()?),
                "size" => {
                    let bytes = value
                        .parse::<crate::config::ByteSize>()
                        .map_err(|e| format!("profile: size={value:?}: {e}"))?
                        .0;
                    if bytes == 0 {
                        return Err("profile: size must be above 0".into());
                    }
                    size = Some(bytes);
                }
                other => {
                    return Err(format!(
                    "profile: unknown key {other:?} (keys: users, per-user-per-hour, peak, size)"
                ))
                }
            }
        }
        let p = Profile {
            users: users.ok_or("profile: users= is required")?,
            per_user_per_hour: per_user.ok_or("profile: per-user-per-hour= is required")?,
            peak: peak.unwrap_or(1.0),
            size,
        };
        if !super::RATES.contains(&p.rate()) {
            return Err(format!(
                "profile: {} is outside {}/s to {}/s",
                p.formula(),
                super::RATES.start(),
                super::RATES.end()
            ));
        }
        Ok(p)
    }
}

impl Profile {
    /// Sessions per second at the peak: one message per session.
    pub fn rate(&self) -> f64 {
        self.users * self.per_user_per_hour * self.peak / 3600.0
    }

    /// How the rate was derived, in one line.
    pub fn formula(&self) -> String {
        format!(
            "{} users × {} messages per user per hour × peak factor {} ÷ 3600 s = {:.2} sessions/s",
            self.users,
            self.per_user_per_hour,
            self.peak,
            self.rate()
        )
    }
}

/// What a profile run found.
pub struct ProfileReport {
    pub profile: Profile,
    pub mean_size: usize,
    pub stats: Stats,
    pub max_connections: Option<usize>,
    pub max_per_source: Option<usize>,
    pub reasoning: String,
}

/// Runs the profile open loop, with sizes drawn log-normal around its mean.
pub async fn profile(base: &Options, p: Profile, max_errors: f64) -> ProfileReport {
    let mean_size = p.size.unwrap_or(match base.sizes {
        Sizes::Fixed(n) | Sizes::LogNormal { mean: n } => n,
    });
    let opts = Options {
        arrivals: Arrivals::Open(p.rate()),
        sizes: Sizes::LogNormal { mean: mean_size },
        ..base.clone()
    };
    let stats = run(&opts).await;
    let delivered = stats.delivered_per_second();
    let kept_up = stats.kept_up(KEPT_UP) && stats.error_fraction() <= max_errors;
    let peak = stats.peak_concurrency.max(1);
    let (max_connections, max_per_source, reasoning) = if stats.arrivals < MIN_ARRIVALS {
        (
            None,
            None,
            format!(
                "Only {} sessions arrived in {:.0} s, too few to size from: lengthen --duration \
                 (at {:.2} sessions/s, {:.0} s gives about 200).",
                stats.arrivals,
                stats.window.as_secs_f64(),
                p.rate(),
                (200.0 / p.rate()).ceil()
            ),
        )
    } else if kept_up {
        let limit = (peak as f64 * HEADROOM).ceil() as usize;
        let per_source = stats
            .per_source_peak
            .filter(|_| base.sources.is_some())
            .map(|k| (k.max(1) as f64 * HEADROOM).ceil() as usize);
        let mut why = format!(
            "At the peak rate of {:.2} sessions/s the server delivered {delivered:.2}/s and \
             held at most {peak} at once (mean {:.1}); max_connections = {limit} \
             leaves {:.0} % above that peak for a busier hour, and past it mxgate queues the \
             rest rather than overloading the server. Check with --ramp that the server still \
             delivers at {limit} at once.",
            p.rate(),
            stats.little_concurrency(),
            (HEADROOM - 1.0) * 100.0
        );
        if let (Some(k), Some(n)) = (stats.per_source_peak, per_source) {
            why += &format!(
                " The busiest single source held {k} at once, so max_per_source = {n} \
                 gives a sender like it room; it measures this run's sources, so compare it \
                 with the senders the server really sees."
            );
        }
        (Some(limit), per_source, why)
    } else {
        (
            None,
            None,
            format!(
                "The server did not keep up with the profile: of {} sessions that arrived in {:.0} \
                 s it delivered {} within that time, and {:.1} % of sessions failed. No limit on \
                 mxgate makes it faster: find its knee with --ramp, then give it more capacity or \
                 spread the peak.",
                stats.arrivals,
                stats.window.as_secs_f64(),
                stats.delivered_in_window,
                stats.error_fraction() * 100.0
            ),
        )
    };
    ProfileReport {
        profile: p,
        mean_size,
        stats,
        max_connections,
        max_per_source,
        reasoning,
    }
}

impl ProfileReport {
    pub fn render(&self, json: bool) -> String {
        let p = &self.profile;
        if json {
            let out = serde_json::json!({
                "profile": {
                    "users": p.users,
                    "per_user_per_hour": p.per_user_per_hour,
                    "peak": p.peak,
                    "size": self.mean_size,
                },
                "derived_rate": p.rate(),
                "formula": p.formula(),
                "summary": self.stats.to_json(),
                "recommended": {
                    "max_connections": self.max_connections,
                    "max_per_source": self.max_per_source,
                },
                "reasoning": self.reasoning,
            });
            return format!("{out}\n");
        }
        let s = &self.stats;
        let mut out = format!("rate: {}\n", p.formula());
        out += &format!(
            "sizes: log-normal around a mean of {} bytes (σ {}, median {:.0} %); {} messages \
             sent averaged {} bytes\n\n",
            self.mean_size,
            super::rng::LOG_NORMAL_SIGMA,
            (-super::rng::LOG_NORMAL_SIGMA.powi(2) / 2.0).exp() * 100.0,
            s.messages,
            s.bytes.checked_div(s.messages).unwrap_or(0)
        );
        out += &s.table();
        out += "\n";
        match (self.max_connections, self.max_per_source) {
            (Some(n), Some(k)) => {
                out += &format!("recommended: max_connections = {n}, max_per_source = {k}\n\n")
            }
            (Some(n), None) => out += &format!("recommended: max_connections = {n}\n\n"),
            _ => out += "no recommendation\n\n",
        }
        out += &self.reasoning;
        out += "\n";
        out
    }
}

#[cfg(test)]
mod tests;
