use super::*;

fn noop_traffic() -> Traffic {
    Traffic {
        client_to_backend: Counter::noop(),
        backend_to_client: Counter::noop(),
        spliced: Counter::noop(),
        splice_fallbacks: Counter::noop(),
    }
}

/// Two connected sockets: (the far end, mxgate's end).
async fn pair(l: &tokio::net::TcpListener) -> (TcpStream, TcpStream) {
    let far = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (near, _) = l.accept().await.unwrap();
    (far, near)
}

/// The half-close limit ends a session only once the backend has finished, and the report
/// says so; until then the idle limit applies.
#[tokio::test]
async fn the_half_close_limit_starts_when_the_backend_finishes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (mut client, client_near) = pair(&l).await;
    let (mut backend, backend_near) = pair(&l).await;
    let traffic = noop_traffic();
    let half = Duration::from_millis(200);
    let timeouts = Timeouts::new(Duration::from_secs(60), half);
    let cancel = std::pin::pin!(std::future::pending::<()>());
    let session = forward(
        &client_near,
        &backend_near,
        &Mode::Copy,
        timeouts,
        &traffic,
        Relayed::default(),
        cancel,
    );
    let drive = async {
        backend.write_all(b"221 bye\r\n").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"221 bye\r\n");
        std::future::pending::<()>().await
    };
    let report = tokio::select! {
        r = session => r,
        _ = drive => unreachable!(),
    };
    assert!(matches!(report.end, End::HalfClosed), "{:?}", report.end);
    assert_eq!(report.end.label(), "half_close_timeout");
    assert_eq!((report.client_to_backend, report.backend_to_client), (0, 9));
    assert!(report.duration >= half, "{:?}", report.duration);
    assert!(
        report.duration < Duration::from_secs(60),
        "{:?}",
        report.duration
    );
}

#[test]
fn the_half_close_limit_is_never_longer_than_the_idle_one() {
    let t = Timeouts::new(Duration::from_secs(5), Duration::from_secs(30));
    assert_eq!(
        (t.idle(), t.half_close()),
        (Duration::from_secs(5), Duration::from_secs(5))
    );
    let t = Timeouts::new(Duration::from_secs(600), Duration::from_millis(1500));
    assert_eq!(t.half_close(), Duration::from_millis(1500));
    let far = Timeouts::new(Duration::from_secs(u64::MAX / 4), Duration::from_secs(30));
    assert_eq!(far.idle(), Duration::from_millis(u32::MAX.into()));
}

/// Every idle session keeps its forwarding state in memory for its whole life, so that state
/// must stay small: an idle direction holds only a wait on its socket, never a buffer, a pipe
/// or a pending write. These bounds catch a change that inlines a burst again.
#[tokio::test]
async fn idle_state_stays_small() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    let traffic = noop_traffic();
    let shared = PumpShared::new(&traffic, Relayed::default());
    let flow = Flow {
        src: &a,
        dst: &b,
        to: Side::Backend,
        shared: &shared,
        bulk: AtomicBool::new(false),
    };
    #[cfg(target_os = "linux")]
    let mode = Mode::Splice(splice::PipePool::new(
        65536,
        Counter::noop(),
        metrics::Gauge::noop(),
    ));
    #[cfg(not(target_os = "linux"))]
    let mode = Mode::Copy;
    let pump_size = std::mem::size_of_val(&pump(&flow, &mode));
    assert!(pump_size <= 64, "a pump's state is {pump_size} bytes");
    let token = tokio_util::sync::CancellationToken::new();
    let timeouts = Timeouts::new(Duration::from_secs(1), Duration::from_secs(1));
    let cancel = std::pin::pin!(token.cancelled());
    let whole = forward(
        &a,
        &b,
        &mode,
        timeouts,
        &traffic,
        Relayed::default(),
        cancel,
    );
    let size = std::mem::size_of_val(&whole);
    assert!(size <= 560, "a session's forwarding state is {size} bytes");
}
