use super::*;

#[test]
fn a_throttle_lets_one_warning_through_per_interval_and_counts_the_rest() {
    let mut t = Throttle::new(Duration::from_secs(3600));
    assert_eq!(t.hit(), Some(1));
    for _ in 0..99 {
        assert_eq!(t.hit(), None);
    }
    let mut t = Throttle::new(Duration::ZERO);
    assert_eq!(t.hit(), Some(1));
    assert_eq!(t.hit(), Some(1));
}

#[test]
fn the_pause_doubles_up_to_its_most_and_resets_on_success() {
    let b = Backoff::default();
    let e = io::Error::from_raw_os_error(libc::EMFILE);
    let pauses: Vec<Duration> = (0..8).map(|_| b.failed(Errno::Emfile, &e)).collect();
    assert_eq!(pauses[0], PAUSE_FIRST);
    assert_eq!(pauses[1], PAUSE_FIRST * 2);
    assert_eq!(*pauses.last().unwrap(), PAUSE_MAX);
    assert!(b.paused_until().is_some());
    b.succeeded();
    assert!(b.paused_until().is_none());
    assert_eq!(b.failed(Errno::Emfile, &e), PAUSE_FIRST);
}

#[test]
fn only_resource_errors_are_local_failures() {
    for (n, label) in [
        (libc::EMFILE, "EMFILE"),
        (libc::ENFILE, "ENFILE"),
        (libc::ENOBUFS, "ENOBUFS"),
        (libc::ENOMEM, "ENOMEM"),
    ] {
        let e = io::Error::from_raw_os_error(n);
        assert_eq!(Errno::of(&e).map(Errno::label), Some(label));
    }
    assert!(Errno::of(&io::Error::from_raw_os_error(libc::ECONNREFUSED)).is_none());
}
