//! A small TCP load tool for `benches/compare.sh`. It measures what the comparison needs and
//! prints one JSON object on stdout:
//!
//! - `latency TARGET[,TARGET...] COUNT`: sequential connect → first line, p50/p99 in µs, COUNT
//!   samples per target. Several targets are taken in turn, one connection each, so every one
//!   of them sees the same moments of a noisy machine.
//! - `reject TARGET CONCURRENCY SECONDS [RATE]`: connections per second turned away; for each it
//!   reads to EOF and counts complete 421 lines, silent closes and resets. With RATE, the
//!   clients open RATE connections a second between them, evenly paced, instead of each one
//!   opening its next as soon as its last has ended: every proxy then sees the same load, so
//!   its CPU time per connection compares like with like.
//! - `hold TARGET COUNT`: opens COUNT sessions, reads each greeting, prints `ready`, and holds
//!   them until stdin closes.
//! - `greet LISTEN`: a backend that greets every connection with a 220 line and then reads and
//!   discards until the client closes; it holds tens of thousands of idle sessions, which
//!   smtp-sink's select() loop cannot. Prints its port, runs until killed.
//!
//! Every loop is bounded by its count or its duration.

use std::io::BufRead;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn first_line(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    while !line.ends_with(b"\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
    }
    Ok(line)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn latency(targets: &[SocketAddr], count: usize) {
    let mut samples = vec![Vec::with_capacity(count); targets.len()];
    for i in 0..count * targets.len() {
        // Round-robin, starting each round one further on, so no target always follows the
        // same one.
        let which = (i + i / targets.len()) % targets.len();
        let t = Instant::now();
        let mut s = TcpStream::connect(targets[which]).await.expect("connect");
        let line = first_line(&mut s).await.expect("greeting");
        samples[which].push(t.elapsed().as_micros() as u64);
        assert!(
            line.starts_with(b"220"),
            "{}",
            String::from_utf8_lossy(&line)
        );
        let _ = s.write_all(b"QUIT\r\n").await;
    }
    let results: Vec<String> = samples
        .iter_mut()
        .map(|s| {
            s.sort_unstable();
            format!(
                "{{\"count\":{},\"p50_us\":{},\"p99_us\":{}}}",
                s.len(),
                percentile(s, 0.5),
                percentile(s, 0.99)
            )
        })
        .collect();
    println!("{{\"targets\":[{}]}}", results.join(","));
}

async fn reject(target: SocketAddr, concurrency: usize, seconds: u64, rate: Option<f64>) {
    use std::io::ErrorKind;
    #[derive(Default)]
    struct Count {
        /// A complete 421 line, then end of file.
        lines: u64,
        /// End of file with no byte.
        silent: u64,
        /// Reset before any byte.
        resets: u64,
        /// Turned away during the handshake (reset or refused).
        at_connect: u64,
        /// Anything else, such as running out of local ports.
        errors: u64,
        first_error: Option<String>,
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    // Each client's gap between its connections at RATE, and its first one's offset.
    let pace = rate.map(|r| Duration::from_secs_f64(concurrency as f64 / r));
    for i in 0..concurrency {
        workers.push(tokio::spawn(async move {
            let mut c = Count::default();
            let mut next = tokio::time::Instant::now()
                + pace.unwrap_or_default() * i as u32 / concurrency as u32;
            while Instant::now() < deadline {
                if let Some(pace) = pace {
                    tokio::time::sleep_until(next).await;
                    next += pace;
                }
                let mut s = match TcpStream::connect(target).await {
                    Ok(s) => s,
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
                        ) =>
                    {
                        c.at_connect += 1;
                        continue;
                    }
                    Err(e) => {
                        c.errors += 1;
                        c.first_error.get_or_insert(e.to_string());
                        continue;
                    }
                };
                // Read as an SMTP client would, into a buffer larger than any reply line, so
                // a reply and the FIN behind it take one read each.
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                let read = loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break Ok(()),
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e) => break Err(e),
                    }
                };
                match read {
                    Ok(_) if got.starts_with(b"421 ") && got.ends_with(b"\r\n") => c.lines += 1,
                    Ok(_) if got.is_empty() => c.silent += 1,
                    Err(_) if got.is_empty() => c.resets += 1,
                    Ok(_) | Err(_) => {
                        c.errors += 1;
                        c.first_error.get_or_insert(format!(
                            "partial reply {:?}",
                            String::from_utf8_lossy(&got)
                        ));
                    }
                }
            }
            c
        }));
    }
    let mut t = Count::default();
    for w in workers {
        let c = w.await.unwrap();
        t.lines += c.lines;
        t.silent += c.silent;
        t.resets += c.resets;
        t.at_connect += c.at_connect;
        t.errors += c.errors;
        if t.first_error.is_none() {
            t.first_error = c.first_error;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let turned_away = t.lines + t.silent + t.resets + t.at_connect;
    println!(
        "{{\"per_second\":{:.0},\"complete_421\":{},\"silent_close\":{},\"reset\":{},\"refused_at_connect\":{},\"errors\":{},\"first_error\":{:?}}}",
        turned_away as f64 / secs,
        t.lines,
        t.silent,
        t.resets,
        t.at_connect,
        t.errors,
        t.first_error.unwrap_or_default()
    );
}

async fn hold(target: SocketAddr, count: usize) {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let mut s = TcpStream::connect(target).await.expect("connect");
        let line = first_line(&mut s).await.expect("greeting");
        assert!(
            line.starts_with(b"220"),
            "{}",
            String::from_utf8_lossy(&line)
        );
        held.push(s);
    }
    println!("ready");
    // Hold until the caller closes stdin.
    tokio::task::spawn_blocking(|| {
        let stdin = std::io::stdin();
        for _ in stdin.lock().lines() {}
    })
    .await
    .unwrap();
    println!("{{\"held\":{}}}", held.len());
}

async fn greet(listen: SocketAddr) {
    let l = tokio::net::TcpListener::bind(listen).await.expect("bind");
    println!("{}", l.local_addr().unwrap().port());
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if s.write_all(b"220 greeter ESMTP\r\n").await.is_err() {
                return;
            }
            let mut buf = [0u8; 256];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    return;
                }
            }
        });
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: netload latency|reject|hold TARGET ...";
    let targets: Vec<SocketAddr> = args
        .get(1)
        .expect(usage)
        .split(',')
        .map(|t| t.parse().expect("TARGET is IP:PORT"))
        .collect();
    let target = targets[0];
    let num = |i: usize| -> u64 { args.get(i).expect(usage).parse().expect(usage) };
    match args[0].as_str() {
        "latency" => latency(&targets, num(2) as usize).await,
        "reject" => {
            let rate = args
                .get(4)
                .map(|r| r.parse().expect("RATE is connections a second"));
            reject(target, num(2) as usize, num(3), rate).await
        }
        "hold" => hold(target, num(2) as usize).await,
        "greet" => greet(target).await,
        _ => panic!("{usage}"),
    }
}
