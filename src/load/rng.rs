//! The load tool's randomness: a seeded generator (SplitMix64), so a run's arrival times and
//! message sizes are the same every time it is given the same `--seed`, and the two
//! distributions it draws from. Never used for anything that needs to be unpredictable.

use std::time::Duration;

/// SplitMix64: small, fast, and good enough to draw arrival gaps and sizes.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// A generator for the `i`-th item of a run, independent of the order items are drawn in.
    pub fn for_item(seed: u64, i: u64) -> Rng {
        let mut r = Rng(seed ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so its logarithm is finite.
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// The gap to the next arrival of a Poisson process at `rate` per second.
    pub fn exponential_gap(&mut self, rate: f64) -> Duration {
        Duration::from_secs_f64(-self.unit().ln() / rate)
    }

    /// A standard normal draw (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// How message sizes are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sizes {
    /// Every message the same size.
    Fixed(usize),
    /// Log-normal around a mean: most mail is small and a few messages carry attachments.
    /// Draws are kept between [`MIN_SIZE`] and [`LOG_NORMAL_CAP`] times the mean.
    LogNormal { mean: usize },
}

/// The spread of the log-normal sizes (σ of the logarithm): the median is 61 % of the mean
/// and one message in a hundred is over 6 times it.
pub const LOG_NORMAL_SIGMA: f64 = 1.0;
/// The smallest message drawn: headers and a line.
pub const MIN_SIZE: usize = 1024;
/// The largest draw, as a multiple of the mean, so one draw cannot blow up a short run.
pub const LOG_NORMAL_CAP: f64 = 20.0;

impl Sizes {
    /// The size of the `i`-th message of a run.
    pub fn size(&self, seed: u64, i: u64) -> usize {
        match *self {
            Sizes::Fixed(n) => n,
            Sizes::LogNormal { mean } => {
                let sigma = LOG_NORMAL_SIGMA;
                let mu = (mean.max(1) as f64).ln() - sigma * sigma / 2.0;
                let draw = (mu + sigma * Rng::for_item(seed, i).normal()).exp();
                (draw.min(mean as f64 * LOG_NORMAL_CAP) as usize).max(MIN_SIZE)
            }
        }
    }
}

#[cfg(test)]
mod tests;
