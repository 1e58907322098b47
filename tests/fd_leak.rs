//! No descriptor leaks when peers reset mid-transfer. Alone in its own test binary, so that
//! `/proc/self/fd` counts only what this test opens.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn open_fds() -> usize {
    fd_count(std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_mid_transfer_leak_no_descriptor() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = l.local_addr().unwrap();
    // The backend streams bytes until its peer goes away, and resets every fourth connection.
    tokio::spawn(async move {
        let mut n = 0u32;
        while let Ok((mut s, _)) = l.accept().await {
            n += 1;
            let reset_it = n.is_multiple_of(4);
            tokio::spawn(async move {
                let chunk = random_bytes(256 * 1024, n as u64);
                if reset_it {
                    let _ = s.write_all(&chunk).await;
                    reset(s);
                    return;
                }
                let (mut r, mut w) = s.split();
                let mut buf = vec![0u8; 64 * 1024];
                let drain = async {
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                    }
                };
                let stream = async { while w.write_all(&chunk).await.is_ok() {} };
                tokio::select! {
                    () = drain => {}
                    () = stream => {}
                }
            });
        }
    });
    for mode in modes() {
        let mx = start(config_mode(backend_addr, mode)).await;
        let at = mx.listen_addrs()[0];
        let baseline = open_fds();
        for round in 0..40u64 {
            let mut c = connect_from("127.0.0.2", at).await.unwrap();
            c.write_all(&random_bytes(512 * 1024, round)).await.ok();
            let mut some = vec![0u8; 64 * 1024];
            let _ = c.read(&mut some).await;
            reset(c);
        }
        eventually("slots freed", || mx.admission().active() == 0).await;
        // Idle pipes kept in the splice pool are the only descriptors allowed to remain.
        let pooled = || {
            mx.render_metrics()
                .lines()
                .find_map(|l| l.strip_prefix("mxgate_splice_pipes "))
                .map_or(0, |v| v.parse::<f64>().unwrap() as usize)
        };
        eventually("descriptors back to baseline", || {
            open_fds() <= baseline + 2 * pooled()
        })
        .await;
        println!(
            "{mode:?}: {baseline} descriptors before, {} after 40 resets ({} pooled pipes)",
            open_fds(),
            pooled()
        );
        let m = scrape(mx.metrics_addr().unwrap()).await;
        assert_eq!(metric(&m, "mxgate_connections_active"), 0.0);
    }
}
