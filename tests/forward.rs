//! Byte-exact forwarding, in both the copy and the splice forwarder: bulk transfers both ways at
//! once with half-close in either order, 1-byte ping-pong, a slow reader, resets mid-transfer,
//! the idle timeout and the half-close timeout.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use mxgate::config::Forwarding;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BULK: usize = 16 * 1024 * 1024;

/// A backend that accepts one connection and hands it to `f`.
async fn one_shot_backend<F, Fut>(f: F) -> (SocketAddr, tokio::task::JoinHandle<Fut::Output>)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future + Send,
    Fut::Output: Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        f(s).await
    });
    (addr, task)
}

async fn bulk_both_ways(mode: Forwarding, client_closes_first: bool) {
    let m = bulk_session(mode, BULK, client_closes_first).await;
    let spliced = metric(&m, "mxgate_spliced_bytes_total");
    match mode {
        // Proof that splice ran: most bytes went through pipes (a step may be copied when the
        // pool is busy, which is counted separately).
        Forwarding::Splice => {
            let copied_steps = metric(&m, "mxgate_splice_pool_exhausted_total");
            assert!(spliced > 0.0, "splice mode spliced nothing");
            // Each burst's first read (at most 16 KiB) goes through userspace by design; the
            // bulk behind it goes through pipes.
            if copied_steps == 0.0 {
                assert!(
                    spliced >= 0.9 * 2.0 * BULK as f64,
                    "bulk went through pipes: {spliced} bytes"
                );
            }
            assert_eq!(metric(&m, "mxgate_splice_fallbacks_total"), 0.0);
        }
        _ => assert_eq!(spliced, 0.0, "copy mode never splices"),
    }
    assert_eq!(metric(&m, "mxgate_connections_active"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_16mib_each_way_client_closes_first() {
    for mode in modes() {
        bulk_both_ways(mode, true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_16mib_each_way_backend_closes_first() {
    for mode in modes() {
        bulk_both_ways(mode, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_ping_pong_keeps_order() {
    for mode in modes() {
        let backend = GreetingBackend::start().await;
        let mx = start(config_mode(backend.addr, mode)).await;
        let mut s = expect_admitted("127.0.0.2", mx.listen_addrs()[0]).await;
        for i in 0..2000u32 {
            let b = [(i % 251) as u8];
            s.write_all(&b).await.unwrap();
            let mut echo = [0u8; 1];
            s.read_exact(&mut echo).await.unwrap();
            assert_eq!(echo, b, "{mode:?}: byte {i}");
        }
        s.shutdown().await.unwrap();
        assert!(
            read_to_end(&mut s).await.is_empty(),
            "{mode:?}: clean close after the echo"
        );
        eventually("session ended", || mx.admission().active() == 0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_gets_every_byte() {
    const SIZE: usize = 4 * 1024 * 1024;
    for mode in modes() {
        let data = random_bytes(SIZE, 3);
        let sent = data.clone();
        let (addr, backend) = one_shot_backend(move |mut s| async move {
            s.write_all(&sent).await.unwrap();
            s.shutdown().await.unwrap();
            // Hold the connection until the client is done, so only backpressure paces it.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        })
        .await;
        let mx = start(config_mode(addr, mode)).await;
        let mut c = connect_from("127.0.0.2", mx.listen_addrs()[0])
            .await
            .unwrap();
        let mut got = Vec::with_capacity(SIZE);
        let mut chunk = vec![0u8; 32 * 1024];
        loop {
            let n = c.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            // The pace of a slow client, not synchronisation: the buffers fill meanwhile.
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        assert_eq!(got.len(), SIZE, "{mode:?}");
        assert_eq!(digest(&got), digest(&data), "{mode:?}");
        drop(c);
        backend.await.unwrap();
        eventually("session ended", || mx.admission().active() == 0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_mid_transfer_closes_the_backend_and_frees_the_slot() {
    for mode in modes() {
        let (addr, backend) = one_shot_backend(|mut s| async move {
            // Read a little, then wait: the client resets while bytes are still in flight.
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0usize;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        })
        .await;
        let mx = start(config_mode(addr, mode)).await;
        let mut c = connect_from("127.0.0.2", mx.listen_addrs()[0])
            .await
            .unwrap();
        c.write_all(&random_bytes(1024 * 1024, 4)).await.unwrap();
        reset(c);
        let got = tokio::time::timeout(Duration::from_secs(10), backend)
            .await
            .expect("the backend side is closed, not left hanging")
            .unwrap();
        assert!(got <= 1024 * 1024, "{mode:?}");
        eventually("slot freed", || mx.admission().active() == 0).await;
        assert_eq!(mx.admission().sources(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_mid_transfer_closes_the_client_and_frees_the_slot() {
    for mode in modes() {
        let (addr, backend) = one_shot_backend(|mut s| async move {
            s.write_all(&random_bytes(1024 * 1024, 5)).await.unwrap();
            reset(s);
        })
        .await;
        let mx = start(config_mode(addr, mode)).await;
        let mut c = connect_from("127.0.0.2", mx.listen_addrs()[0])
            .await
            .unwrap();
        backend.await.unwrap();
        let mut sink = vec![0u8; 64 * 1024];
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match c.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "{mode:?}: the client saw its connection end");
        eventually("slot freed", || mx.admission().active() == 0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_closed_but_active_ones_are_not() {
    for mode in modes() {
        let backend = GreetingBackend::start().await;
        let mut c = config_mode(backend.addr, mode);
        c.idle_timeout = Duration::from_millis(300);
        let mx = start(c).await;
        let at = mx.listen_addrs()[0];

        // Bytes every 100 ms for 900 ms: three idle timeouts long, never idle.
        let mut busy = expect_admitted("127.0.0.2", at).await;
        for _ in 0..9 {
            busy.write_all(b"NOOP\r\n").await.unwrap();
            let mut echo = [0u8; 6];
            busy.read_exact(&mut echo).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Then silence: the session is closed by mxgate.
        let rest = read_to_end(&mut busy).await;
        assert!(rest.is_empty(), "{mode:?}");
        eventually("slot freed", || mx.admission().active() == 0).await;
    }
}

/// A backend that greets, closes its sending side at once, and returns everything it reads
/// until the connection ends, and how it ended (`Ok` for a FIN).
async fn closing_backend() -> (
    SocketAddr,
    tokio::task::JoinHandle<(Vec<u8>, std::io::Result<()>)>,
) {
    one_shot_backend(|mut s| async move {
        s.write_all(GREETING).await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        let end = s.read_to_end(&mut got).await.map(|_| ());
        (got, end)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_backend_closes_a_silent_client_is_cut_at_the_half_close_timeout() {
    for mode in modes() {
        let (addr, backend) = closing_backend().await;
        let mut c = config_mode(addr, mode);
        c.idle_timeout = Duration::from_secs(60);
        c.half_close_timeout = Duration::from_millis(500);
        let mx = start(c).await;
        let mut client = expect_admitted("127.0.0.2", mx.listen_addrs()[0]).await;
        assert!(
            read_to_end(&mut client).await.is_empty(),
            "{mode:?}: FIN after the greeting"
        );

        // Bytes every 100 ms for 1.5 s after the FIN: three half-close timeouts, never
        // silent for one, so the session stays and every byte reaches the backend.
        for _ in 0..15 {
            client.write_all(b"NOOP\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(mx.admission().active(), 1, "{mode:?}: still forwarding");
        // Then silence, without closing: mxgate ends the session, well before the idle timeout.
        let (got, end) = tokio::time::timeout(Duration::from_secs(10), backend)
            .await
            .expect("the backend's side is closed within 10 s")
            .unwrap();
        assert!(
            end.is_ok(),
            "{mode:?}: an orderly close toward the backend: {end:?}"
        );
        assert_eq!(got, b"NOOP\r\n".repeat(15), "{mode:?}");
        eventually("slot freed", || mx.admission().active() == 0).await;
        drop(client);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_client_closes_a_slow_backend_reply_is_still_delivered() {
    // The other order is not shortened: a client that has sent everything may wait minutes
    // for the reply to its message. Here the backend answers after three half-close timeouts.
    for mode in modes() {
        let (addr, backend) = one_shot_backend(|mut s| async move {
            s.write_all(GREETING).await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            tokio::time::sleep(Duration::from_millis(900)).await;
            s.write_all(b"250 2.0.0 queued\r\n").await.unwrap();
            got
        })
        .await;
        let mut c = config_mode(addr, mode);
        c.idle_timeout = Duration::from_secs(60);
        c.half_close_timeout = Duration::from_millis(300);
        let mx = start(c).await;
        let mut client = expect_admitted("127.0.0.2", mx.listen_addrs()[0]).await;
        client.write_all(b"DATA\r\nbody\r\n.\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        let reply = read_to_end(&mut client).await;
        assert_eq!(reply, b"250 2.0.0 queued\r\n", "{mode:?}");
        assert_eq!(backend.await.unwrap(), b"DATA\r\nbody\r\n.\r\n", "{mode:?}");
        eventually("slot freed", || mx.admission().active() == 0).await;
    }
}

/// Finds, among this process's descriptors, the TCP socket whose peer is `peer` and whose own
/// address is `local`, and says whether it has TCP_NODELAY. The server runs in-process, so its
/// sockets are ours to inspect.
fn nodelay_of(local: SocketAddr, peer: SocketAddr) -> Option<bool> {
    use std::os::fd::BorrowedFd;
    for entry in std::fs::read_dir("/proc/self/fd").ok()? {
        let Ok(fd) = entry.ok()?.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for these calls, and the sockets it could
        // be stay open while the session does; a stale number just fails to match.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let s = socket2::SockRef::from(&fd);
        let addrs = (s.local_addr(), s.peer_addr());
        if let (Ok(l), Ok(p)) = addrs {
            if l.as_socket() == Some(local) && p.as_socket() == Some(peer) {
                return s.tcp_nodelay().ok();
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_legs_of_a_session_have_nodelay() {
    // Replies and commands are small writes: Nagle would hold one back for an ACK.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = l.local_addr().unwrap();
    let mx = start(config_mode(backend_addr, Forwarding::Auto)).await;
    let client = connect_from("127.0.0.2", mx.listen_addrs()[0])
        .await
        .unwrap();
    let (backend_side, mx_addr) = l.accept().await.unwrap();
    let client_leg = nodelay_of(client.peer_addr().unwrap(), client.local_addr().unwrap());
    let backend_leg = nodelay_of(mx_addr, backend_addr);
    assert_eq!(client_leg, Some(true), "mxgate's socket toward the client");
    assert_eq!(
        backend_leg,
        Some(true),
        "mxgate's socket toward the backend"
    );
    drop((client, backend_side));
}
