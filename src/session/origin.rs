//! Who a connection is from and to: its peer, or what a trusted upstream's PROXY header says.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::config::Config;
use crate::proxy_protocol;

/// Who a connection is from and to: the peer and our address, or what a trusted upstream's
/// PROXY header says they are.
pub(super) struct Origin {
    pub(super) client: SocketAddr,
    /// The address the client connected to, when an upstream header said so.
    pub(super) server: Option<SocketAddr>,
    /// Client bytes that arrived behind the header or while it waited in the queue, to be
    /// forwarded before anything else.
    pub(super) early: Vec<u8>,
    /// How long it waited in the queue, if it did.
    pub(super) waited: Option<std::time::Duration>,
    /// The pregreet teaser (`220-`) has gone out: the backend's greeting must end that reply,
    /// and a refusal must complete it first.
    pub(super) teased: bool,
    /// It failed the pregreet test already (under `ignore`, and served anyway): not again.
    pub(super) talked: bool,
    /// It stayed quiet through the pregreet wait. The test ends with the greeting's final
    /// line, so its pass is counted and cached only then, unless it speaks first: a client
    /// still waiting in the queue has not passed yet, and another connection from its address
    /// is tested meanwhile rather than let through on a pass it may still fail.
    pub(super) quiet: bool,
}

impl Origin {
    /// A connection that is its own client: no upstream header.
    pub(super) fn peer(client: SocketAddr) -> Origin {
        Origin {
            client,
            server: None,
            early: Vec::new(),
            waited: None,
            teased: false,
            talked: false,
            quiet: false,
        }
    }
}

/// Reads the PROXY header of a connection from a trusted upstream load balancer.
pub(super) async fn upstream_header(
    client: &mut TcpStream,
    peer: SocketAddr,
    config: &Config,
) -> Result<Origin, proxy_protocol::HeaderError> {
    let ip = peer.ip().to_canonical();
    if !config.accept_proxy_protocol.iter().any(|n| n.contains(&ip)) {
        return Err(proxy_protocol::HeaderError::Untrusted);
    }
    let (header, early) = proxy_protocol::read_header(client, config.proxy_header_timeout).await?;
    let (client, server) = match header.addresses {
        Some((c, s)) => (c, Some(s)),
        None => (peer, None),
    };
    Ok(Origin {
        client,
        server,
        early,
        waited: None,
        teased: false,
        talked: false,
        quiet: false,
    })
}
