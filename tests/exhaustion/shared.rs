//! What the two exhaustion tests (`exhaustion_reserve.rs`, `exhaustion_scenario.rs`) share:
//! the descriptor limit raised for the clients' side, a client's first line, the scrape, and
//! the client addresses. Included by path, next to `common`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::common::connect_from;

/// Raises this process's soft RLIMIT_NOFILE to its hard limit: the test holds thousands of
/// client sockets while mxgate runs out of its own 512.
pub fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        },
    );
}

/// The first line a client reads, within `wait`; `None` if nothing whole came.
pub async fn first_line(s: &mut tokio::net::TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    let read = async {
        while !line.ends_with(b"\n") {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(_) => line.push(b[0]),
            }
        }
    };
    tokio::time::timeout(wait, read).await.ok()?;
    line.ends_with(b"\n").then_some(line)
}

/// One scrape of `/metrics` from 127.0.0.1, whole, or `None`.
pub async fn get_metrics(m: SocketAddr) -> Option<String> {
    get_metrics_from("127.0.0.1", m).await
}

/// One scrape of `/metrics` from `source`, whole, or `None`.
pub async fn get_metrics_from(source: &str, m: SocketAddr) -> Option<String> {
    let mut s = connect_from(source, m).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    String::from_utf8(out).ok()
}

/// The value of `series` on a scraped page; panics if it is missing.
pub fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("series {series} missing"))
        .parse()
        .unwrap()
}

/// The address of the `i`th client of a group, each from its own source.
pub fn source(base: usize, i: usize) -> String {
    format!(
        "127.{}.{}.{}",
        base + i / 62_500,
        (i / 250) % 250,
        1 + i % 250
    )
}
