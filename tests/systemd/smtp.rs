//! SMTP clients inside the container's network namespace: one [`Client`] for a scripted
//! dialogue, and a [`Load`] of clients arriving throughout a phase, each one classified.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::container::{connect_from, NetNs};
use crate::DRAIN_LINE;

/// How long a client waits for a line: a newcomer in the backlog waits for the next instance.
const LINE_WAIT: Duration = Duration::from_secs(60);

/// One SMTP client.
pub struct Client {
    stream: TcpStream,
}

impl Client {
    pub fn connect(net: &NetNs, source: &str, to: SocketAddr) -> std::io::Result<Client> {
        Client::wrap(net.connect(source, to)?)
    }

    fn wrap(stream: TcpStream) -> std::io::Result<Client> {
        stream.set_read_timeout(Some(LINE_WAIT))?;
        Ok(Client { stream })
    }

    /// The next line, up to and including LF; empty at EOF.
    pub fn try_line(&mut self) -> std::io::Result<String> {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\n") {
            if self.stream.read(&mut b)? == 0 {
                break;
            }
            line.push(b[0]);
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    pub fn line(&mut self) -> String {
        self.try_line().expect("a line")
    }

    /// Sends `command` and returns the last line of the reply (multi-line replies read out).
    pub fn ask(&mut self, command: &str) -> String {
        self.stream.write_all(command.as_bytes()).unwrap();
        loop {
            let line = self.line();
            if line.as_bytes().get(3) != Some(&b'-') {
                return line;
            }
        }
    }

    fn expect(&mut self, command: &str, code: &str) {
        let reply = self.ask(command);
        assert!(reply.starts_with(code), "{command:?} got {reply:?}");
    }

    /// EHLO and MAIL FROM, then the session stays open.
    pub fn begin_transaction(&mut self) {
        self.expect("EHLO client.test\r\n", "250 ");
        self.expect("MAIL FROM:<a@client.test>\r\n", "250 ");
    }

    /// RCPT, DATA, the message and QUIT.
    pub fn finish_transaction(&mut self) {
        self.expect("RCPT TO:<b@backend.test>\r\n", "250 ");
        self.expect("DATA\r\n", "354 ");
        self.expect("Subject: through mxgate\r\n\r\nhello\r\n.\r\n", "250 ");
        self.quit();
    }

    pub fn mail_transaction(&mut self) {
        self.begin_transaction();
        self.finish_transaction();
    }

    pub fn quit(&mut self) {
        self.expect("QUIT\r\n", "221 ");
    }
}

/// Waits until something at `to` greets with a 220, and returns that greeting.
pub fn wait_greeting(net: &NetNs, to: SocketAddr, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(mut c) = Client::connect(net, "127.0.0.1", to) {
            if let Ok(line) = c.try_line() {
                if line.starts_with("220 ") {
                    c.quit();
                    return line;
                }
            }
        }
        assert!(Instant::now() < deadline, "nothing greets on {to}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How many clients one load thread makes at most, and the pause between two of them: the
/// load is bounded in count and in rate.
const CLIENTS_PER_THREAD: usize = 6000;
const PACE: Duration = Duration::from_millis(10);

/// Clients arriving throughout, each from its own thread and source, one after another:
/// greeted then QUIT (served), the draining 421 then a clean close (drained), or anything
/// else (failed, with what happened).
pub struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<Report>>,
}

/// What the clients of a [`Load`] got.
#[derive(Debug, Default)]
pub struct Report {
    pub served: usize,
    pub drained: usize,
    pub failed: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} clients: {} served, {} got the draining 421 while queued, {} failed",
            self.served + self.drained + self.failed.len(),
            self.served,
            self.drained,
            self.failed.len()
        )
    }
}

impl Load {
    pub fn start(net: &NetNs, to: SocketAddr, greeting: &str, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let threads = (0..threads)
            .map(|i| {
                let (net, stop, served) = (net.clone(), stop.clone(), served.clone());
                let source = format!("127.0.2.{}", i + 1);
                let greeting = greeting.to_string();
                std::thread::spawn(move || {
                    net.enter();
                    let mut report = Report::default();
                    for _ in 0..CLIENTS_PER_THREAD {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match one_client(&source, to, &greeting) {
                            Ok(true) => {
                                report.served += 1;
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(false) => report.drained += 1,
                            Err(e) => report.failed.push(format!("{source}: {e}")),
                        }
                        std::thread::sleep(PACE);
                    }
                    report
                })
            })
            .collect();
        Load {
            stop,
            served,
            threads,
        }
    }

    /// Clients served so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    /// Waits until `count` clients have been served in all.
    pub fn wait_served(&self, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.served() < count {
            assert!(
                Instant::now() < deadline,
                "{} of {count} clients served in {limit:?}",
                self.served()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Report::default();
        for t in self.threads {
            let r = t.join().unwrap();
            all.served += r.served;
            all.drained += r.drained;
            all.failed.extend(r.failed);
        }
        all
    }
}

/// One client: `Ok(true)` served, `Ok(false)` the draining 421 and a clean close, `Err` with
/// what happened otherwise (refused, reset, another reply, silence).
fn one_client(source: &str, to: SocketAddr, greeting: &str) -> Result<bool, String> {
    let stream = connect_from(source, to).map_err(|e| format!("connect: {e}"))?;
    let mut c = Client::wrap(stream).map_err(|e| e.to_string())?;
    let first = c.try_line().map_err(|e| format!("greeting: {e}"))?;
    if first == greeting {
        c.stream
            .write_all(b"QUIT\r\n")
            .map_err(|e| format!("QUIT: {e}"))?;
        let bye = c.try_line().map_err(|e| format!("QUIT: {e}"))?;
        return if bye.starts_with("221 ") {
            Ok(true)
        } else {
            Err(format!("QUIT got {bye:?}"))
        };
    }
    if first == DRAIN_LINE {
        let mut rest = Vec::new();
        c.stream
            .read_to_end(&mut rest)
            .map_err(|e| format!("after the draining 421: {e}"))?;
        return if rest.is_empty() {
            Ok(false)
        } else {
            Err(format!("more after the draining 421: {rest:?}"))
        };
    }
    Err(format!("first line {first:?}"))
}
