use super::*;
use std::io::Write;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LINE: &[u8] = b"421 4.3.2 mx.test Too many connections, try again later\r\n";

/// A connected pair: the client's tokio stream and the server's blocking-free std socket.
async fn pair() -> (tokio::net::TcpStream, TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (s, _) = l.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    (c, s)
}

/// Drives the lingerer until `done` holds, failing after five seconds.
async fn drive_until(l: &mut Lingerer, done: impl Fn(&Lingerer) -> bool) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !done(l) {
            l.turn().await;
        }
    })
    .await
    .expect("the lingerer got there in time");
}

#[tokio::test]
async fn the_client_reads_the_line_then_the_end_and_the_socket_closes() {
    let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
    let (mut c, s) = pair().await;
    assert!(matches!(l.refuse(s, LINE), Lingered::Done));
    assert_eq!(l.lingering(), 1);
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, LINE);
    drop(c);
    drive_until(&mut l, |l| l.lingering() == 0).await;
}

#[tokio::test]
async fn a_client_that_has_closed_by_the_first_look_is_closed_there_and_never_watched() {
    let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
    let (mut c, s) = pair().await;
    assert!(matches!(l.refuse(s, LINE), Lingered::Done));
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, LINE);
    drop(c);
    // Until the FIN has reached the server's socket (the kernel may defer delivering it),
    // without taking the first look.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let peek = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
    while !matches!(
        rustix::net::recv(&l.fresh[0].socket, &mut [0u8; 1], peek),
        Ok((0, _))
    ) {
        assert!(std::time::Instant::now() < deadline, "the FIN arrived");
        tokio::task::yield_now().await;
    }
    drive_until(&mut l, |l| l.lingering() == 0).await;
    assert_eq!(l.closed_at_first_look, 1);
    assert_eq!(l.generation, 0, "nothing was added to the epoll set");
}

#[tokio::test]
async fn a_client_whose_fin_comes_after_the_first_look_is_closed_on_its_fin() {
    // A farther client: its FIN comes well after the first look. It must give its share of
    // the lingering bound back when that FIN arrives, not at some later look or at its time
    // (here 30 s).
    let mut l = Lingerer::with_time(Arc::new(Semaphore::new(8)), Duration::from_secs(30)).unwrap();
    let (mut c, s) = pair().await;
    assert!(matches!(l.refuse(s, LINE), Lingered::Done));
    drive_until(&mut l, |l| l.open.len() == 1).await;
    assert_eq!(l.closed_at_first_look, 0);
    // The scenario: this client closes a while after its first look.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, LINE);
    drop(c);
    let fin = Instant::now();
    drive_until(&mut l, |l| l.lingering() == 0).await;
    assert!(
        fin.elapsed() < Duration::from_secs(3),
        "closed on the FIN, not at a later look: {:?}",
        fin.elapsed()
    );
}

#[tokio::test]
async fn a_client_that_reads_late_still_reads_the_whole_line() {
    let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
    let (mut c, s) = pair().await;
    assert!(matches!(l.refuse(s, LINE), Lingered::Done));
    // The scenario, not a synchronisation: this client looks at its socket a while after
    // mxgate has answered it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, LINE);
    drop(c);
    drive_until(&mut l, |l| l.lingering() == 0).await;
}

#[tokio::test]
async fn a_client_that_sends_quit_after_the_line_gets_no_reset() {
    // As Postfix does: read the 421, then QUIT, then close.
    let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
    let (c, s) = pair().await;
    assert!(matches!(l.refuse(s, LINE), Lingered::Done));
    let mut c = tokio::io::BufReader::new(c);
    let mut line = Vec::new();
    tokio::io::AsyncBufReadExt::read_until(&mut c, b'\n', &mut line)
        .await
        .unwrap();
    assert_eq!(line, LINE);
    c.get_mut().write_all(b"QUIT\r\n").await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "end of stream after the line, no reset");
    drop(c);
    drive_until(&mut l, |l| l.lingering() == 0).await;
}

#[tokio::test]
async fn a_client_that_talks_only_after_its_line_was_sent_can_still_write_and_read() {
    // Why every refused socket lingers, not only those whose receive queue is already
    // non-empty when the line is sent: a client that pipelines without waiting for the
    // greeting may have its bytes in flight at that moment. Were the socket closed then,
    // its bytes would draw a reset and its writes fail before it reads the reply.
    let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
    let (mut c, s) = pair().await;
    assert!(matches!(l.refuse(s, LINE), Lingered::Done));
    let mut head = [0u8; 1];
    c.read_exact(&mut head).await.unwrap();
    let drive = async {
        loop {
            l.turn().await;
        }
    };
    let client = async {
        // 48 KiB, under the byte cap.
        for _ in 0..6 {
            c.write_all(&[b'x'; 8 * 1024]).await.unwrap();
        }
        let mut got = head.to_vec();
        c.read_to_end(&mut got).await.unwrap();
        got
    };
    let got = tokio::select! {
        got = client => got,
        _ = drive => unreachable!(),
    };
    assert_eq!(got, LINE);
}

#[tokio::test]
async fn bytes_the_client_sends_are_read_so_no_reset_loses_the_line() {
    let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
    let (mut c, s) = pair().await;
    c.write_all(&[b'x'; 20_000]).await.unwrap();
    assert!(matches!(l.refuse(s, LINE), Lingered::Done));
    c.write_all(b"QUIT\r\n").await.unwrap();
    // Past the first look (which read what was there) and watched, until every byte is
    // read: the early ones counted at the first look carry into the watched entry.
    drive_until(&mut l, |l| {
        l.fresh.is_empty() && l.open.len() == 1 && l.open.values().all(|e| e.seen == 20_006)
    })
    .await;
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, LINE, "the line, then a clean end of stream");
    c.shutdown().await.unwrap();
    drive_until(&mut l, |l| l.lingering() == 0).await;
}

#[tokio::test]
async fn a_client_that_keeps_sending_is_closed_past_the_byte_cap() {
    let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
    let (c, s) = pair().await;
    assert!(matches!(l.refuse(s, LINE), Lingered::Done));
    let mut c = c.into_std().unwrap();
    c.set_nonblocking(false).unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = [b'y'; 8192];
        // Stops at the reset that follows the close past the cap.
        while c.write_all(&chunk).is_ok() {}
    });
    drive_until(&mut l, |l| l.lingering() == 0).await;
    writer.join().unwrap();
}

#[tokio::test]
async fn reap_closes_what_is_ready_without_the_event_loop() {
    // A busy accept loop calls reap() every few accepts instead of waiting in turn().
    let mut l = Lingerer::new(Arc::new(Semaphore::new(8))).unwrap();
    let (mut c, s) = pair().await;
    assert!(matches!(l.refuse(s, LINE), Lingered::Done));
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.unwrap();
    drop(c);
    // The client's FIN is in flight on loopback; reap only ever looks, never waits.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while l.lingering() > 0 {
        assert!(std::time::Instant::now() < deadline, "reaped in time");
        l.reap();
        std::thread::yield_now();
    }
    assert_eq!(got, LINE);
}

#[tokio::test]
async fn a_silent_client_is_closed_when_its_time_is_up() {
    let time = Duration::from_millis(100);
    let mut l = Lingerer::with_time(Arc::new(Semaphore::new(8)), time).unwrap();
    let (_c, s) = pair().await;
    let start = Instant::now();
    assert!(matches!(l.refuse(s, LINE), Lingered::Done));
    drive_until(&mut l, |l| l.lingering() == 0).await;
    assert!(start.elapsed() >= time, "not before its time");
    assert!(l.deadlines.is_empty());
}

#[tokio::test]
async fn past_the_bound_the_socket_is_closed_right_after_the_line() {
    let bound = Arc::new(Semaphore::new(1));
    let mut l = Lingerer::new(bound).unwrap();
    let (_held, s1) = pair().await;
    let (mut c2, s2) = pair().await;
    assert!(matches!(l.refuse(s1, LINE), Lingered::Done));
    assert!(matches!(l.refuse(s2, LINE), Lingered::Done));
    assert_eq!(l.lingering(), 1, "the second is not kept");
    let mut got = Vec::new();
    c2.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, LINE);
}
