//! The forwarder alone: splice against copy, in-process over loopback, for 4 KiB, 64 KiB and
//! 16 MiB transfers on a held session (client → mxgate → backend, one-byte acknowledgement back).

use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mxgate::config::{Config, Forwarding};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that reads `size` bytes, then acknowledges with one byte, forever.
async fn backend(size: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let mut left = size;
            while left > 0 {
                let n = s.read(&mut buf[..left.min(1 << 20)]).await.unwrap();
                if n == 0 {
                    return;
                }
                left -= n;
            }
            s.write_all(b"k").await.unwrap();
        }
    });
    addr
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("forward");
    for &size in &[4usize << 10, 64 << 10, 16 << 20] {
        group.throughput(Throughput::Bytes(size as u64));
        if size >= 16 << 20 {
            group.sample_size(20);
        }
        for mode in [Forwarding::Splice, Forwarding::Copy] {
            let (mx, mut client) = rt.block_on(async {
                let mut config = Config::for_backend(backend(size).await);
                config.forwarding = mode;
                config.metrics = None;
                config.pregreet.action = mxgate::config::Pregreet::Off;
                let mx = mxgate::start(config).await.unwrap();
                let client = TcpStream::connect(mx.listen_addrs()[0]).await.unwrap();
                client.set_nodelay(true).unwrap();
                (mx, client)
            });
            let payload = vec![0x5au8; size];
            let label = format!("{mode:?}").to_lowercase();
            group.bench_with_input(BenchmarkId::new(label, size), &size, |b, _| {
                b.iter(|| {
                    rt.block_on(async {
                        client.write_all(&payload).await.unwrap();
                        let mut ack = [0u8; 1];
                        client.read_exact(&mut ack).await.unwrap();
                    })
                })
            });
            drop(client);
            rt.block_on(mx.shutdown(std::time::Duration::from_secs(1)));
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
