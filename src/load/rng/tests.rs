use super::*;

#[test]
fn gaps_average_to_the_rate() {
    let mut r = Rng::new(7);
    let n = 100_000;
    let total: f64 = (0..n).map(|_| r.exponential_gap(50.0).as_secs_f64()).sum();
    let mean = total / n as f64;
    assert!((mean - 0.02).abs() < 0.0005, "{mean}");
}

#[test]
fn the_same_seed_draws_the_same() {
    let a: Vec<u64> = (0..5).map(|i| Rng::for_item(3, i).next_u64()).collect();
    let b: Vec<u64> = (0..5).map(|i| Rng::for_item(3, i).next_u64()).collect();
    assert_eq!(a, b);
    assert_ne!(a[0], Rng::for_item(4, 0).next_u64());
}

#[test]
fn log_normal_sizes_keep_their_mean() {
    let s = Sizes::LogNormal { mean: 150 * 1024 };
    let n = 50_000u64;
    let sizes: Vec<usize> = (0..n).map(|i| s.size(1, i)).collect();
    let mean = sizes.iter().sum::<usize>() as f64 / n as f64;
    assert!((mean / (150.0 * 1024.0) - 1.0).abs() < 0.03, "{mean}");
    let mut sorted = sizes.clone();
    sorted.sort_unstable();
    let median = sorted[sorted.len() / 2] as f64 / (150.0 * 1024.0);
    assert!((median - 0.607).abs() < 0.03, "{median}");
    assert!(sizes
        .iter()
        .all(|&x| (MIN_SIZE..=150 * 1024 * 20).contains(&x)));
    assert_eq!(Sizes::Fixed(9).size(1, 5), 9);
}
