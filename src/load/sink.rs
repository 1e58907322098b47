//! A minimal SMTP sink: greets, accepts any envelope, swallows DATA, counts what it accepted.
//! It backs `mxgate demo` and lets tests compare the load tool's counts with what really
//! arrived. Loopback only, bounded line length, never stores a message.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The longest command or data line the sink reads (RFC 5321 allows 1,000 octets).
const MAX_LINE: usize = 4096;

/// A running sink.
pub struct Sink {
    pub addr: SocketAddr,
    /// Messages accepted with `250` after DATA.
    delivered: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Sink {
    pub async fn start() -> std::io::Result<Sink> {
        Self::start_on("127.0.0.1:0".parse().expect("literal")).await
    }

    /// A sink on a given address, for a backend that comes back where it was.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Sink> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let delivered = Arc::new(AtomicU64::new(0));
        let count = delivered.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let _ = session(s, &count).await;
                });
            }
        });
        Ok(Sink {
            addr,
            delivered,
            task,
        })
    }

    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::SeqCst)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn session(s: TcpStream, delivered: &AtomicU64) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 sink.mxgate.test ESMTP\r\n").await?;
    let mut line = Vec::with_capacity(128);
    loop {
        if read_line(&mut r, &mut line).await? == 0 {
            return Ok(());
        }
        let verb: Vec<u8> = line
            .iter()
            .take_while(|b| !b.is_ascii_whitespace())
            .map(u8::to_ascii_uppercase)
            .collect();
        match verb.as_slice() {
            b"EHLO" => {
                w.write_all(b"250-sink.mxgate.test\r\n250 PIPELINING\r\n")
                    .await?
            }
            b"HELO" | b"MAIL" | b"RCPT" | b"RSET" | b"NOOP" => {
                w.write_all(b"250 2.0.0 Ok\r\n").await?
            }
            b"DATA" => {
                w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                loop {
                    if read_line(&mut r, &mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" || line == b".\n" {
                        break;
                    }
                }
                delivered.fetch_add(1, Ordering::SeqCst);
                w.write_all(b"250 2.0.0 Ok: queued\r\n").await?;
            }
            b"QUIT" => {
                w.write_all(b"221 2.0.0 Bye\r\n").await?;
                return w.shutdown().await;
            }
            _ => w.write_all(b"502 5.5.2 Command not recognized\r\n").await?,
        }
    }
}

/// Reads one line (LF-terminated) of at most [`MAX_LINE`] bytes into `line`.
async fn read_line(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    line.clear();
    let n = (&mut *r)
        .take(MAX_LINE as u64)
        .read_until(b'\n', line)
        .await?;
    if n == MAX_LINE && !line.ends_with(b"\n") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "line too long",
        ));
    }
    Ok(n)
}

use tokio::io::AsyncReadExt as _;
