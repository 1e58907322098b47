//! The admission decision alone: ns per admit-and-release with 1, 10k and 999k tracked sources
//! (the last as many as `max_connections` allows, less room for the admissions measured),
//! alone and with a second thread admitting at the same time.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mxgate::admission::Admission;
use mxgate::config::Settings;
use mxgate::metrics::Metrics;
use mxgate::policy::{Policy, PolicyClock};

fn policy(rate: bool) -> Policy {
    let mut text = String::from(
        "backend = \"127.0.0.1:25\"\nhostname = \"mx.bench\"\nmax_connections = 1000000\n\
         max_per_source = 20\nipv6_prefix = 128\nmax_per_ipv6_network = 1000000\n",
    );
    if rate {
        text.push_str("rate_per_source = \"1000000/s\"\n");
    }
    let config = Settings::from_toml(&text).unwrap().validate(None).unwrap();
    Policy::new(&config, None, PolicyClock::default())
}

/// The i-th distinct IPv6 source.
fn source(i: u64) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | i as u128))
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("admit_release");
    for &tracked in &[1u64, 10_000, 999_000] {
        for rate in [false, true] {
            let p = Arc::new(policy(rate));
            let a = Admission::new(Metrics::new());
            // Hold one session per tracked source, so the table really has that many entries.
            let held: Vec<_> = (0..tracked)
                .map(|i| a.admit(&p, source(i)).unwrap())
                .collect();
            assert_eq!(a.sources() as u64, tracked);
            let name = if rate { "with_rate" } else { "no_rate" };
            let mut i = 0u64;
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/alone"), tracked),
                &tracked,
                |b, _| {
                    b.iter(|| {
                        i = (i + 7919) % tracked;
                        drop(a.admit(&p, source(i)));
                    })
                },
            );
            // A second thread admitting and releasing other sources all the while.
            let stop = Arc::new(AtomicBool::new(false));
            let other = {
                let (a, p, stop) = (a.clone(), p.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut j = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        j = (j + 104_729) % tracked;
                        drop(a.admit(&p, source(j)));
                    }
                })
            };
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/contended"), tracked),
                &tracked,
                |b, _| {
                    b.iter(|| {
                        i = (i + 7919) % tracked;
                        drop(a.admit(&p, source(i)));
                    })
                },
            );
            stop.store(true, Ordering::Relaxed);
            other.join().unwrap();
            drop(held);
            assert_eq!(a.sources(), 0);
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
