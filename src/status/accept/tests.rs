use super::*;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

#[test]
fn a_flood_from_one_address_only_evicts_itself() {
    let mut c = Conns::default();
    let first: Vec<_> = (0..MAX_PER_SOURCE)
        .map(|_| c.admit(ip(2)).unwrap())
        .collect();
    assert!(!first.is_empty());
    let (_, scraper_cut) = c.admit(ip(9)).unwrap();
    for _ in 0..100 {
        assert!(c.admit(ip(2)).is_some());
    }
    assert!(!scraper_cut.is_cancelled());
    assert!(first.iter().all(|(_, cut)| cut.is_cancelled()));
    assert_eq!(c.open.len(), MAX_PER_SOURCE + 1);
}

#[test]
fn at_the_bound_the_oldest_idle_connection_goes_and_busy_ones_stay() {
    let mut c = Conns::default();
    let all: Vec<_> = (0..MAX_METRICS_CONNECTIONS as u8)
        .map(|i| c.admit(ip(10 + i)).unwrap())
        .collect();
    assert_eq!(all.len(), MAX_METRICS_CONNECTIONS);
    // The oldest is answering: the next oldest, idle, is pre-empted.
    c.open.get_mut(&all[0].0).unwrap().idle = false;
    assert!(c.admit(ip(200)).is_some());
    assert!(!all[0].1.is_cancelled());
    assert!(all[1].1.is_cancelled());
    // Every one busy: a newcomer is turned away.
    for o in c.open.values_mut() {
        o.idle = false;
    }
    assert!(c.admit(ip(201)).is_none());
}
