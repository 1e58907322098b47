use super::*;
use std::os::fd::AsRawFd;

#[test]
fn pipes_are_sized_and_reused() {
    let pool = PipePool::new(256 * 1024, Counter::noop(), Gauge::noop());
    let a = pool.borrow().unwrap();
    assert!(a.pipe().size >= 4096 && a.pipe().size <= 256 * 1024);
    let fd = a.pipe().read.as_raw_fd();
    drop(a);
    assert_eq!(pool.live(), 1);
    let b = pool.borrow().unwrap();
    assert_eq!(
        b.pipe().read.as_raw_fd(),
        fd,
        "an empty pipe goes back to the pool"
    );
}

#[test]
fn the_size_is_what_the_kernel_gave() {
    // 100,000 bytes is 24.4 pages; the kernel rounds a pipe up to a power of two of pages.
    let pool = PipePool::new(100_000, Counter::noop(), Gauge::noop());
    assert_eq!(pool.borrow().unwrap().pipe().size, 32 * 4096);
}

#[test]
fn the_size_is_capped_at_the_system_maximum() {
    // Root may grow a pipe past fs.pipe-max-size, so only the pool's own cap keeps it there.
    let max = read_proc_usize("/proc/sys/fs/pipe-max-size").unwrap();
    let pool = PipePool::new(8 * max, Counter::noop(), Gauge::noop());
    assert_eq!(pool.borrow().unwrap().pipe().size, max);
}

#[test]
fn a_pipe_with_bytes_is_destroyed() {
    let pool = PipePool::new(64 * 1024, Counter::noop(), Gauge::noop());
    let mut a = pool.borrow().unwrap();
    a.filled = 10;
    drop(a);
    assert_eq!(pool.live(), 0);
    assert!(pool.idle.lock().unwrap().is_empty());
}

/// Each byte a hash of its offset and `seed`, so a dropped, repeated or reordered chunk
/// shows.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect()
}

/// One stream whose bulk is copied while the only pipe is taken, then spliced once it is
/// free again: the switch between the two happens mid-stream and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_without_a_free_pipe_are_copied_and_the_stream_stays_whole() {
    use super::super::{forward, Mode, Timeouts, Traffic};
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const HALF: usize = 4 << 20;
    let up = pattern(2 * HALF, 7);
    let down = pattern(HALF, 9);
    let exhausted = Arc::new(AtomicU64::new(0));
    let (spliced, up_bytes, down_bytes) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let pool = PipePool::with_bound(
        64 * 1024,
        1,
        Counter::from_arc(exhausted.clone()),
        Gauge::noop(),
    );
    let taken = pool.borrow().expect("the one pipe");

    // client ⇄ (a · mxgate's forwarder · b) ⇄ backend, all on loopback.
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(front.local_addr().unwrap())
        .await
        .unwrap();
    let (a, _) = front.accept().await.unwrap();
    let b = TcpStream::connect(back.local_addr().unwrap())
        .await
        .unwrap();
    let (mut backend, _) = back.accept().await.unwrap();

    let traffic = Traffic {
        client_to_backend: Counter::from_arc(up_bytes.clone()),
        backend_to_client: Counter::from_arc(down_bytes.clone()),
        spliced: Counter::from_arc(spliced.clone()),
        splice_fallbacks: Counter::noop(),
    };
    let mode = Mode::Splice(pool.clone());
    let proxy = tokio::spawn(async move {
        let cancel = std::pin::pin!(std::future::pending::<()>());
        let timeouts = Timeouts::new(Duration::from_secs(30), Duration::from_secs(30));
        forward(
            &a,
            &b,
            &mode,
            timeouts,
            &traffic,
            crate::forward::Relayed::default(),
            cancel,
        )
        .await
    });

    // The backend reads everything, says when the first half is in, then sends its own
    // bytes and closes.
    let (first_half_in, first_half) = tokio::sync::oneshot::channel();
    let down_sent = down.clone();
    let backend = tokio::spawn(async move {
        let mut got = Vec::with_capacity(2 * HALF);
        let mut buf = vec![0u8; 64 * 1024];
        let mut first_half_in = Some(first_half_in);
        loop {
            let n = backend.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() >= HALF {
                if let Some(tx) = first_half_in.take() {
                    let _ = tx.send(());
                }
            }
        }
        backend.write_all(&down_sent).await.unwrap();
        backend.shutdown().await.unwrap();
        got
    });

    client.write_all(&up[..HALF]).await.unwrap();
    first_half.await.unwrap();
    let copied_steps = exhausted.load(Ordering::Relaxed);
    assert!(
        copied_steps > 0,
        "with the pipe taken, bulk steps were copied"
    );
    assert_eq!(spliced.load(Ordering::Relaxed), 0, "no pipe, no splice");
    drop(taken);

    client.write_all(&up[HALF..]).await.unwrap();
    client.shutdown().await.unwrap();
    let mut got_down = Vec::new();
    client.read_to_end(&mut got_down).await.unwrap();
    let got_up = backend.await.unwrap();
    let report = proxy.await.unwrap();

    assert!(got_up == up, "client→backend arrived whole and in order");
    assert!(
        got_down == down,
        "backend→client arrived whole and in order"
    );
    assert_eq!(up_bytes.load(Ordering::Relaxed), 2 * HALF as u64);
    assert_eq!(down_bytes.load(Ordering::Relaxed), HALF as u64);
    assert!(
        spliced.load(Ordering::Relaxed) > 0,
        "once the pipe was free again, bulk went through it"
    );
    assert_eq!(pool.live(), 1, "the pipe went back to the pool, empty");
    drop(report);
}

#[test]
fn the_bound_holds() {
    let pool = PipePool::with_bound(64 * 1024, 8, Counter::noop(), Gauge::noop());
    let held: Vec<_> = (0..pool.capacity())
        .map(|_| pool.borrow().unwrap())
        .collect();
    assert!(pool.borrow().is_none(), "past the bound a step is copied");
    drop(held);
    assert!(pool.borrow().is_some());
}
