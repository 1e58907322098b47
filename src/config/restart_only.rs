//! The one list of restart-only keys: a fact about the keys, so it lives with them. Reload
//! enforces it, the reference and the man page print it, the tests change every key in it.

use super::Config;

/// Declares the one list of restart-only keys and the function that enforces it, from the same
/// names: the docs, the man page and the tests read [`RESTART_ONLY`], reload calls
/// [`keep_restart_only`], so the two cannot disagree.
macro_rules! restart_only {
    ($($key:ident),*) => {
        /// The keys a reload cannot change: they need new sockets, threads, a new forwarder, a
        /// new security check or a new cluster connection. `cluster` is the whole `[cluster]`
        /// table.
        pub const RESTART_ONLY: &[&str] = &[$(stringify!($key)),*];

        /// Puts back, in `new`, every setting a reload cannot change, and names each one that
        /// differed.
        pub fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<&'static str> {
            let mut kept = Vec::new();
            $(
                if old.$key != new.$key {
                    kept.push(stringify!($key));
                    new.$key = old.$key.clone();
                }
            )*
            kept
        }
    };
}

restart_only!(
    listen,
    metrics,
    forwarding,
    pipe_size,
    threads,
    log_format,
    transparent,
    transparent_port,
    cluster,
    state_dir
);
