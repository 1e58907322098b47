//! Running as a service: systemd notifications, socket activation, signals, reload and drain.
//!
//! - `READY=1` is sent only once every listener is bound and the metrics endpoint is up.
//! - SIGHUP sends `RELOADING=1` with `MONOTONIC_USEC`, reloads, then `READY=1`.
//! - SIGTERM or SIGINT sends `STOPPING=1` and drains: new clients get the draining 421,
//!   forwarding sessions go on until they end or the drain timeout cuts them, then the process
//!   exits 0. A second SIGTERM or SIGINT exits at once.
//! - Socket-activated, the listening sockets are systemd's and outlive this process: a drain
//!   stops accepting at once and leaves newcomers in the backlog for the next instance (a
//!   restart or a package upgrade refuses no one). Clients already waiting in the queue still
//!   get the draining 421: they are this process's connections.
//! - With `WATCHDOG_USEC` set, `WATCHDOG=1` is sent every half period, but only while the
//!   accept loops' heartbeat moves: a wedged loop lets the watchdog fire.
//!
//! - `STATUS=` carries the load at a glance (`412/1000 sessions, 3 waiting, 2/2 backends up`),
//!   checked every [`STATUS_INTERVAL`] and sent only when it changed.
//!
//! Notifications are best-effort: without `NOTIFY_SOCKET` they are no-ops.

use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context};
use sd_notify::NotifyState;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::Running;

/// How often the `STATUS=` line is brought up to date (when it changed).
pub const STATUS_INTERVAL: Duration = Duration::from_secs(2);

/// Listening sockets passed by systemd (`LISTEN_FDS`, `LISTEN_PID`), if any.
pub fn inherited_listeners() -> anyhow::Result<Vec<std::net::TcpListener>> {
    let fds = sd_notify::listen_fds().context("socket activation variables are invalid")?;
    fds.map(adopt).collect()
}

fn adopt(fd: RawFd) -> anyhow::Result<std::net::TcpListener> {
    // SAFETY: systemd passed this descriptor to this process (LISTEN_PID matched) for it to own;
    // nothing else in the process refers to it.
    let socket = unsafe { socket2::Socket::from_raw_fd(fd) };
    let listening = socket.is_listener().unwrap_or(false);
    let stream = socket
        .r#type()
        .map(|t| t == socket2::Type::STREAM)
        .unwrap_or(false);
    if !listening || !stream {
        bail!("inherited descriptor {fd} is not a listening TCP socket (check the .socket unit)");
    }
    Ok(socket.into())
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Runs until stopped by a signal. `reload` loads the config again for SIGHUP.
pub async fn run(
    config: Config,
    reload: impl Fn() -> anyhow::Result<Config>,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;

    let drain_timeout = config.drain_timeout;
    let inherited = inherited_listeners()?;
    let activated = !inherited.is_empty();
    let running = if inherited.is_empty() {
        crate::start(config).await?
    } else {
        if config.listen_set {
            let listen: Vec<String> = config.listen.iter().map(|a| a.to_string()).collect();
            tracing::warn!(
                sockets = inherited.len(),
                listen = ?listen,
                "socket-activated: the sockets systemd passed are used, and `listen` in the config is not (set ListenStream= in mxgate.socket instead, or disable the socket unit)"
            );
        } else {
            tracing::info!(sockets = inherited.len(), "using sockets passed by systemd");
        }
        crate::start_with(inherited, config).await?
    };
    let mut shown = running.status_line();
    notify(&[NotifyState::Ready, NotifyState::Status(&shown)]);
    let watchdog = tokio::spawn(watchdog(&running));
    let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
    status_tick.tick().await;

    loop {
        tokio::select! {
            _ = hup.recv() => {
                let mut states = vec![NotifyState::Reloading];
                if let Ok(now) = NotifyState::monotonic_usec_now() {
                    states.push(now);
                }
                notify(&states);
                running.reload(reload());
                shown = running.status_line();
                notify(&[NotifyState::Ready, NotifyState::Status(&shown)]);
            }
            _ = status_tick.tick() => {
                // Only a change is sent: systemd keeps the last line.
                let line = running.status_line();
                if line != shown {
                    notify(&[NotifyState::Status(&line)]);
                    shown = line;
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    // systemd stops watching once told STOPPING=1, and the accept loops' heartbeat may stop
    // now: no more pings, and no error about the loops.
    watchdog.abort();
    tokio::select! {
        () = drain(running, drain_timeout, activated) => {}
        _ = term.recv() => tracing::warn!("second stop signal: exiting now"),
        _ = int.recv() => tracing::warn!("second stop signal: exiting now"),
    }
    Ok(())
}

/// Lets forwarding sessions finish. Socket-activated, accepting stops first, so that newcomers
/// wait in systemd's backlog for the next instance rather than get the draining reply.
async fn drain(running: crate::Running, drain_timeout: Duration, activated: bool) {
    if activated {
        running.stop_accepting().await;
        tracing::info!(
            drain_timeout_ms = drain_timeout.as_millis() as u64,
            queued = running.queued(),
            "stopping: no longer accepting (new clients wait in systemd's backlog for the next instance); draining sessions"
        );
    } else {
        tracing::info!(
            drain_timeout_ms = drain_timeout.as_millis() as u64,
            "stopping: draining sessions"
        );
    }
    running.shutdown(drain_timeout).await;
}

/// Pings the watchdog at half its period while the accept loops' heartbeat moves.
fn watchdog(running: &Running) -> impl std::future::Future<Output = ()> + Send + 'static {
    let heartbeats = running.heartbeats();
    let read = move || -> Vec<u64> {
        heartbeats
            .iter()
            .map(|h| h.load(Ordering::Relaxed))
            .collect()
    };
    async move {
        let Some(period) = sd_notify::watchdog_enabled() else {
            return;
        };
        let half = (period / 2).max(Duration::from_millis(10));
        let mut last = read();
        let mut tick = tokio::time::interval(half);
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = read();
            if all_turned(&last, &now) {
                notify(&[NotifyState::Watchdog]);
            } else {
                tracing::error!("accept loops have not turned for half a watchdog period; not pinging the watchdog");
            }
            last = now;
        }
    }
}

/// Whether every accept loop turned since the last look: one wedged loop is enough to stop
/// the pings, so that systemd restarts the service.
fn all_turned(last: &[u64], now: &[u64]) -> bool {
    last.len() == now.len() && last.iter().zip(now).all(|(a, b)| a != b)
}

#[cfg(test)]
mod tests {
    use super::all_turned;

    #[test]
    fn one_wedged_loop_stops_the_pings() {
        assert!(all_turned(&[1, 7], &[2, 9]));
        assert!(
            !all_turned(&[1, 7], &[2, 7]),
            "the second loop did not turn"
        );
        assert!(!all_turned(&[1], &[1]));
        assert!(all_turned(&[], &[]), "no listener, nothing to wedge");
    }
}
