//! The backend: opening a connection to the mail server for one admitted client.
//!
//! Called from the client's own task, never from the accept loop, and always under the connect
//! timeout, so a backend that is down or black-holed costs one task, not the listener. In
//! transparent mode the connection is made from the client's own address.
//!
//! A failed connect says whose fault it was ([`ConnectError`]): only the backend's own failures
//! may count against its health, never one the client's address or mxgate's own socket set-up
//! caused.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// Why a backend connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// mxgate could not set up its own side (a family mismatch, a transparent bind that failed,
    /// a source port in use, no local port left): says nothing about the backend.
    #[error("local set-up failed: {0}")]
    Local(io::Error),
    /// The backend refused, reset, was unreachable or did not answer within the timeout.
    #[error("{0}")]
    Backend(io::Error),
}

impl ConnectError {
    /// Whether this failure shows the backend's own state, and so counts against its health.
    pub fn is_backend_fault(&self) -> bool {
        matches!(self, ConnectError::Backend(_))
    }

    /// Whether the backend did not answer the connect in time: for a learned limit, a sign
    /// that it is over capacity.
    pub fn is_timeout(&self) -> bool {
        match self {
            ConnectError::Backend(e) => {
                e.kind() == io::ErrorKind::TimedOut || e.raw_os_error() == Some(libc::ETIMEDOUT)
            }
            ConnectError::Local(_) => false,
        }
    }
}

/// Sorts a `connect(2)` error: the backend's fault only when the network or the backend said
/// no (refused, reset, unreachable, timed out). Anything else (EADDRINUSE or EADDRNOTAVAIL for
/// a source address, EAFNOSUPPORT, EPERM from local policy) is mxgate's side.
fn classify(e: io::Error) -> ConnectError {
    let backend = matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::ECONNRESET
                | libc::ECONNABORTED
                | libc::ETIMEDOUT
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::ENETDOWN
        )
    ) || matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::TimedOut
    );
    if backend {
        ConnectError::Backend(e)
    } else {
        ConnectError::Local(e)
    }
}

/// Connects to `addr` within `limit`, from `source` when given (transparent mode: the client's
/// address, which this host does not own). A timeout is a [`ConnectError::Backend`] of kind
/// `io::ErrorKind::TimedOut`.
pub async fn connect(
    addr: SocketAddr,
    limit: Duration,
    source: Option<SocketAddr>,
) -> Result<TcpStream, ConnectError> {
    let socket = local_socket(addr, source).map_err(ConnectError::Local)?;
    match tokio::time::timeout(limit, socket.connect(addr)).await {
        Ok(r) => r.map_err(classify),
        Err(_) => Err(ConnectError::Backend(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {} ms", limit.as_millis()),
        ))),
    }
}

/// mxgate's side of a backend connection, bound to `source` in transparent mode.
fn local_socket(addr: SocketAddr, source: Option<SocketAddr>) -> io::Result<TcpSocket> {
    // Created non-blocking (SOCK_NONBLOCK): two fcntl calls fewer per session.
    let raw = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    // SMTP is a command/reply dialogue: Nagle's algorithm would add a delay to every reply.
    raw.set_tcp_nodelay(true)?;
    if let Some(source) = source {
        if source.is_ipv4() != addr.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("transparent mode cannot connect from {source} to {addr}: address families differ"),
            ));
        }
        set_transparent(&raw, addr.is_ipv6())?;
        raw.bind(&source.into())?;
    }
    Ok(TcpSocket::from_std_stream(raw.into()))
}

/// Sets IP_TRANSPARENT or IPV6_TRANSPARENT, so the socket may bind an address this host does
/// not own. Needs CAP_NET_ADMIN.
pub fn set_transparent(socket: &Socket, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        socket.set_ip_transparent_v6(true)
    } else {
        socket.set_ip_transparent_v4(true)
    }
}

/// Checks at start-up what transparent mode needs, so it fails now rather than on the first
/// connection: the capability (fatal when missing) and the policy routing rule (a warning: the
/// rule could live on a router instead).
pub fn transparent_preflight(backend: SocketAddr) -> anyhow::Result<()> {
    let probe = Socket::new(
        Domain::for_address(backend),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if let Err(e) = set_transparent(&probe, backend.is_ipv6()) {
        anyhow::bail!(
            "transparent mode needs the CAP_NET_ADMIN capability ({e}); under systemd, use the \
             commented lines in mxgate.service: AmbientCapabilities=CAP_NET_BIND_SERVICE \
             CAP_NET_ADMIN and CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_ADMIN"
        );
    }
    let family = if backend.is_ipv6() { "-6" } else { "-4" };
    tracing::info!(
        family = if backend.is_ipv6() { "IPv6" } else { "IPv4" },
        "transparent mode: checking the capability and the policy routing"
    );
    match std::process::Command::new("ip")
        .args([family, "rule", "show"])
        .output()
    {
        // Under the shipped unit, netlink is only open with the transparent-mode lines.
        Ok(out) if !out.status.success() => tracing::warn!(
            error = %String::from_utf8_lossy(&out.stderr).trim(),
            "transparent mode: cannot check the policy routing with `ip rule show` (under \
             systemd, transparent mode needs AF_NETLINK in RestrictAddressFamilies, see the \
             commented lines in mxgate.service)"
        ),
        Ok(out) => {
            let rules = String::from_utf8_lossy(&out.stdout);
            if !rules
                .lines()
                .any(|l| l.contains("fwmark") && l.contains("lookup"))
            {
                tracing::warn!(
                    "transparent mode: no `ip rule ... fwmark ... lookup ...` policy rule; replies \
                     from the backend to client addresses will not reach mxgate (see the routing \
                     recipe in docs/deploy-exchange.md)"
                );
            }
        }
        Err(e) => tracing::warn!(
            error = %e,
            "transparent mode: cannot run `ip rule show` to check the policy routing"
        ),
    }
    Ok(())
}
