use super::*;

#[test]
fn profiles_parse_and_derive_their_rate() {
    let p: Profile = "users=2000,per-user-per-hour=12,peak=3,size=150KiB"
        .parse()
        .unwrap();
    assert_eq!(p.rate(), 20.0);
    assert_eq!(p.size, Some(150 * 1024));
    assert!(
        p.formula().ends_with("= 20.00 sessions/s"),
        "{}",
        p.formula()
    );
    let q: Profile = "users=100, per-user-per-hour=36".parse().unwrap();
    assert_eq!((q.peak, q.size, q.rate()), (1.0, None, 1.0));
    for (bad, says) in [
        ("per-user-per-hour=1", "users= is required"),
        ("users=1", "per-user-per-hour= is required"),
        ("users=0,per-user-per-hour=1", "above 0"),
        ("users=1,per-user-per-hour=1,peek=2", "unknown key \"peek\""),
        ("users", "not KEY=VALUE"),
        ("users=1,per-user-per-hour=1,size=big", "size="),
        ("users=1e-300,per-user-per-hour=1", "outside"),
        ("users=1e12,per-user-per-hour=1", "outside"),
    ] {
        let e = bad.parse::<Profile>().unwrap_err();
        assert!(e.contains(says), "{bad}: {e}");
    }
}
