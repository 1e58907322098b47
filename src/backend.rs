//! The backend: opening a connection to the mail server for one admitted client.
//!
//! Called from the client's own task, never from the accept loop, and always under the connect
//! timeout, so a backend that is down or black-holed costs one task, not the listener.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

/// Connects to `addr` within `limit`. A timeout is reported as `io::ErrorKind::TimedOut`.
pub async fn connect(addr: SocketAddr, limit: Duration) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // SMTP is a command/reply dialogue: Nagle's algorithm would add a delay to every reply.
    socket.set_nodelay(true)?;
    match tokio::time::timeout(limit, socket.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {} ms", limit.as_millis()),
        )),
    }
}
