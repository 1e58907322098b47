//! A minimal SMTP sink: greets, accepts any envelope, swallows DATA, counts what it accepted.
//! It backs `mxgate demo` and lets tests compare the load tool's counts with what really
//! arrived. Loopback only, bounded line length, never stores a message.
//!
//! In its Exchange-like mode ([`Behaviour`]) it has a hidden concurrency limit, past which it
//! greets with Exchange's own 421 and closes, and a greeting delay that grows with its load:
//! a backend whose capacity has to be found, for tests, the demo and the load tool.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The longest command or data line the sink reads (RFC 5321 allows 1,000 octets).
const MAX_LINE: usize = 4096;

/// Exchange's reply past its concurrent connection limit (MaxInboundConnection).
pub const EXCHANGE_BUSY: &[u8] = b"421 4.3.2 The maximum number of concurrent server connections has exceeded a limit, closing transmission channel\r\n";

/// How the sink behaves under load. The default is an ideal server: no limit, no delay.
#[derive(Clone, Copy, Debug, Default)]
pub struct Behaviour {
    /// Sessions it serves at once; past it, a newcomer gets [`EXCHANGE_BUSY`].
    pub limit: Option<usize>,
    /// Greeting delay for each session it holds.
    pub delay_per_session: Duration,
    /// Past this many sessions, each one more adds `steep_delay` to the greeting.
    pub knee: usize,
    pub steep_delay: Duration,
    /// A fixed greeting delay for every session: a server that holds each session this long.
    pub hold: Duration,
    /// Recipients outside this domain get Exchange's relay refusal; `None` accepts any.
    pub accepted_domain: Option<&'static str>,
    /// The EHLO reply offers STARTTLS (and the command is answered 454: no TLS here).
    pub offer_starttls: bool,
}

/// Exchange's reply to a recipient outside its accepted domains.
pub const EXCHANGE_RELAY_DENIED: &[u8] =
    b"550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain\r\n";

impl Behaviour {
    /// An Exchange-like server: turns away the session past `limit`, and greets a little more
    /// slowly the more it holds.
    pub fn exchange(limit: usize) -> Behaviour {
        Behaviour {
            limit: Some(limit),
            delay_per_session: Duration::from_micros(20),
            accepted_domain: Some("mxgate.test"),
            offer_starttls: true,
            ..Behaviour::default()
        }
    }

    /// The greeting delay with `held` sessions open, this one included.
    fn delay(&self, held: usize) -> Duration {
        self.hold
            + self.delay_per_session * held as u32
            + self.steep_delay * held.saturating_sub(self.knee.max(1)) as u32
    }
}

/// A running sink.
pub struct Sink {
    pub addr: SocketAddr,
    /// Messages accepted with `250` after DATA.
    delivered: Arc<AtomicU64>,
    /// Sessions turned away with the busy greeting.
    busy: Arc<AtomicU64>,
    /// Sessions open now, and the most ever open at once (not counting those turned away).
    held: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    stall: Stall,
    task: JoinHandle<()>,
}

/// When the sink stops answering: from, until.
type Stall = Arc<std::sync::Mutex<Option<(Instant, Instant)>>>;

/// Waits out a stall that covers now.
async fn stalled(stall: &Stall) {
    let until = match *stall.lock().unwrap_or_else(|p| p.into_inner()) {
        Some((from, until)) if (from..until).contains(&Instant::now()) => until,
        _ => return,
    };
    tokio::time::sleep_until(until.into()).await;
}

impl Sink {
    pub async fn start() -> std::io::Result<Sink> {
        Self::start_on("127.0.0.1:0".parse().expect("literal")).await
    }

    /// A sink on a given address, for a backend that comes back where it was.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Sink> {
        Self::start_with(addr, Behaviour::default()).await
    }

    /// A sink that behaves as `behaviour` says under load.
    pub async fn start_with(addr: SocketAddr, behaviour: Behaviour) -> std::io::Result<Sink> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let delivered = Arc::new(AtomicU64::new(0));
        let busy = Arc::new(AtomicU64::new(0));
        let held = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let stall = Stall::default();
        let (count, turned, open, top, paused) = (
            delivered.clone(),
            busy.clone(),
            held.clone(),
            peak.clone(),
            stall.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                if behaviour.limit.is_some_and(|l| now > l) {
                    open.fetch_sub(1, Ordering::SeqCst);
                    turned.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(turn_away(s));
                    continue;
                }
                top.fetch_max(now, Ordering::SeqCst);
                let (count, open, paused) = (count.clone(), open.clone(), paused.clone());
                tokio::spawn(async move {
                    let delay = behaviour.delay(now);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let _ = session(s, &count, &behaviour, &paused).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Sink {
            addr,
            delivered,
            busy,
            held,
            peak,
            stall,
            task,
        })
    }

    /// Stops answering from `from` for `len`: sessions that arrive or are under way then wait,
    /// as behind a server that stalls (a full disk, a garbage collection, a backup).
    pub fn stall(&self, from: Instant, len: Duration) {
        *self.stall.lock().unwrap_or_else(|p| p.into_inner()) = Some((from, from + len));
    }

    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::SeqCst)
    }

    /// Sessions turned away with the busy greeting.
    pub fn busy(&self) -> u64 {
        self.busy.load(Ordering::SeqCst)
    }

    /// Sessions open now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// The most sessions it ever served at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Exchange's answer past its limit: the 421, then, after the client's QUIT or close, the end.
async fn turn_away(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    if s.write_all(EXCHANGE_BUSY).await.is_ok() {
        let mut buf = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        let _ = s.shutdown().await;
    }
}

async fn session(
    s: TcpStream,
    delivered: &AtomicU64,
    behaviour: &Behaviour,
    stall: &Stall,
) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    stalled(stall).await;
    w.write_all(b"220 sink.mxgate.test ESMTP\r\n").await?;
    let mut line = Vec::with_capacity(128);
    loop {
        if read_line(&mut r, &mut line).await? == 0 {
            return Ok(());
        }
        stalled(stall).await;
        let verb: Vec<u8> = line
            .iter()
            .take_while(|b| !b.is_ascii_whitespace())
            .map(u8::to_ascii_uppercase)
            .collect();
        match verb.as_slice() {
            b"EHLO" if behaviour.offer_starttls => {
                w.write_all(b"250-sink.mxgate.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
                    .await?
            }
            b"EHLO" => {
                w.write_all(b"250-sink.mxgate.test\r\n250 PIPELINING\r\n")
                    .await?
            }
            b"STARTTLS" => {
                w.write_all(b"454 4.7.0 TLS not available due to temporary reason\r\n")
                    .await?
            }
            b"RCPT" if !accepts(behaviour, &line) => w.write_all(EXCHANGE_RELAY_DENIED).await?,
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
                stalled(stall).await;
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

/// Whether a `RCPT TO:<local@domain>` line names a recipient the sink takes.
fn accepts(behaviour: &Behaviour, line: &[u8]) -> bool {
    let Some(domain) = behaviour.accepted_domain else {
        return true;
    };
    let text = String::from_utf8_lossy(line);
    let address = text
        .split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(a, _)| a)
        .unwrap_or_default();
    address
        .rsplit_once('@')
        .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain))
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
