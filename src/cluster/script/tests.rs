//! The scripts against a real `redis-server`, in orders the instances can produce.

use super::*;

pub(in crate::cluster) struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn server() -> Option<(Server, redis::Connection)> {
    let (server, url) = server_url()?;
    let client = redis::Client::open(url).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Ok(c) = client.get_connection() {
            return Some((server, c));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A fresh `redis-server` on a loopback port and its URL; `None` when it is not installed
/// (outside CI). It may still be starting.
pub(in crate::cluster) fn server_url() -> Option<(Server, String)> {
    let found = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "redis-server is required in CI"
        );
        eprintln!("SKIP: redis-server is not installed");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Some((Server(child), format!("redis://127.0.0.1:{port}/0")))
}

const P: &str = "mxgate:t:";

fn register(c: &mut redis::Connection, token: &str, epoch: u64, counts: &[(&str, u64)]) -> i64 {
    let s = Scripts::new();
    let mut call = s.register.prepare_invoke();
    call.arg(P).arg("a").arg(10_000).arg(token).arg(epoch);
    for (k, n) in counts {
        call.arg(format!("{P}{k}")).arg(*n);
    }
    call.invoke::<(i64, u64, u64, u64)>(c).unwrap().0
}

fn admit(c: &mut redis::Connection, token: &str, epoch: u64, source: &str) -> i64 {
    admit_warming(c, token, epoch, source).0
}

/// The code and whether the copy is warming up.
fn admit_warming(c: &mut redis::Connection, token: &str, epoch: u64, source: &str) -> (i64, bool) {
    let s = Scripts::new();
    let mut call = s.admit.prepare_invoke();
    call.arg(P)
        .arg("a")
        .arg(source)
        .arg(3)
        .arg("")
        .arg(0)
        .arg(10)
        .arg(1)
        .arg(token)
        .arg(epoch)
        .arg(1);
    let (code, _, warming) = call.invoke::<(i64, i64, i64)>(c).unwrap();
    (code, warming == 1)
}

fn global(c: &mut redis::Connection) -> i64 {
    let v: Vec<i64> = redis::cmd("HVALS").arg(format!("{P}g")).query(c).unwrap();
    v.iter().sum()
}

#[test]
fn an_admission_that_overtakes_its_registration_is_kept() {
    let Some((_server, mut c)) = server() else {
        return;
    };
    assert_eq!(register(&mut c, "t1", 1, &[]), 0);
    assert_eq!(admit(&mut c, "t1", 1, "192.0.2.1/32"), 0);
    // The instance snapshots (1 session) for registration 2; a new admission, counted
    // after that snapshot, reaches Redis before the registration does.
    assert_eq!(admit(&mut c, "t1", 2, "192.0.2.2/32"), 0);
    assert_eq!(
        register(&mut c, "t1", 2, &[("g", 1), ("s:192.0.2.1/32", 1)]),
        0
    );
    assert_eq!(global(&mut c), 2, "the overtaking admission survives");
    // One counted before the snapshot, arriving after the registration: already in it.
    assert_eq!(
        register(
            &mut c,
            "t1",
            3,
            &[
                ("g", 3),
                ("s:192.0.2.1/32", 1),
                ("s:192.0.2.2/32", 1),
                ("s:192.0.2.3/32", 1)
            ]
        ),
        0
    );
    assert_eq!(admit(&mut c, "t1", 2, "192.0.2.3/32"), 0);
    assert_eq!(global(&mut c), 3, "not counted twice");
    // A registration that arrives late, after a newer one, is dropped.
    assert_eq!(register(&mut c, "t1", 2, &[]), -2);
    assert_eq!(global(&mut c), 3);
}

#[test]
fn a_second_process_under_the_same_name_cannot_take_its_counts() {
    let Some((_server, mut c)) = server() else {
        return;
    };
    assert_eq!(register(&mut c, "first", 1, &[("g", 4)]), 0);
    assert_eq!(register(&mut c, "second", 1, &[]), -1);
    assert_eq!(admit(&mut c, "second", 1, "192.0.2.9/32"), -1);
    assert_eq!(global(&mut c), 4);
    // Nor can its releases (of sessions it admitted alone) take from the first's counts.
    let s = Scripts::new();
    let mut call = s.release.prepare_invoke();
    call.arg(P).arg("a").arg("second").arg(0);
    call.arg(format!("{P}g")).arg(format!("{P}g"));
    call.invoke::<i64>(&mut c).unwrap();
    assert_eq!(global(&mut c), 4);
}

#[test]
fn a_copy_that_begins_empty_warms_up_for_one_lease_and_only_then() {
    let Some((_server, mut c)) = server() else {
        return;
    };
    // The first registration into a Redis with no copy starts the warm-up.
    assert_eq!(register(&mut c, "t1", 1, &[]), 0);
    let left: i64 = redis::cmd("PTTL")
        .arg(format!("{P}warm"))
        .query(&mut c)
        .unwrap();
    assert!(
        left > 9_000 && left <= 10_000,
        "one lease of 10 s: {left} ms"
    );
    assert_eq!(admit_warming(&mut c, "t1", 1, "192.0.2.1/32"), (0, true));
    // A later registration (another instance, or this one again) does not extend it.
    redis::cmd("PEXPIRE")
        .arg(format!("{P}warm"))
        .arg(1)
        .query::<i64>(&mut c)
        .unwrap();
    while redis::cmd("EXISTS")
        .arg(format!("{P}warm"))
        .query::<i64>(&mut c)
        .unwrap()
        == 1
    {
        std::thread::yield_now();
    }
    assert_eq!(
        register(&mut c, "t1", 2, &[("g", 1), ("s:192.0.2.1/32", 1)]),
        0
    );
    assert_eq!(admit_warming(&mut c, "t1", 2, "192.0.2.2/32"), (0, false));
    // Every lease ended while the copy stayed (Redis stalled, or away with persistence):
    // warms again.
    redis::cmd("ZADD")
        .arg(format!("{P}leases"))
        .arg(0)
        .arg("a")
        .query::<i64>(&mut c)
        .unwrap();
    assert_eq!(register(&mut c, "t1", 3, &[("g", 2)]), 0);
    assert_eq!(admit_warming(&mut c, "t1", 3, "192.0.2.3/32"), (0, true));
    // A warm-up made to last by hand ends at the next script.
    redis::cmd("PERSIST")
        .arg(format!("{P}warm"))
        .query::<i64>(&mut c)
        .unwrap();
    assert_eq!(admit_warming(&mut c, "t1", 3, "192.0.2.4/32"), (0, false));
    // The copy is lost (a restart without persistence): the next registration warms again.
    redis::cmd("FLUSHDB").query::<()>(&mut c).unwrap();
    assert_eq!(register(&mut c, "t1", 4, &[("g", 2)]), 0);
    assert_eq!(admit_warming(&mut c, "t1", 4, "192.0.2.5/32"), (0, true));
    assert_eq!(global(&mut c), 3);
}

/// One admission of `inst` (holding the name with `token`, epoch 1) under a global cap of
/// `cap`, with `demand`; its code.
fn admit_as(c: &mut redis::Connection, inst: &str, cap: i64, demand: u64) -> i64 {
    let s = Scripts::new();
    let mut call = s.admit.prepare_invoke();
    call.arg(P)
        .arg(inst)
        .arg("192.0.2.1/32")
        .arg(-1)
        .arg("")
        .arg(0);
    call.arg(cap).arg(1).arg(inst).arg(1).arg(demand);
    call.invoke::<(i64, i64, i64)>(c).unwrap().0
}

fn demand_field(c: &mut redis::Connection, inst: &str) -> String {
    redis::cmd("HGET")
        .arg(format!("{P}d"))
        .arg(inst)
        .query(c)
        .unwrap()
}

// Issue 39: a light host's session ended, its demand fell by one, and another host's waiter
// took the freed slot in the millisecond before the light host's client came back.
#[test]
fn a_demand_that_fell_is_held_for_one_pace() {
    let Some((_server, mut c)) = server() else {
        return;
    };
    for inst in ["a", "b"] {
        let s = Scripts::new();
        let mut call = s.register.prepare_invoke();
        call.arg(P).arg(inst).arg(10_000).arg(inst).arg(1);
        call.arg(format!("{P}g")).arg(1);
        assert_eq!(call.invoke::<(i64, u64, u64, u64)>(&mut c).unwrap().0, 0);
    }
    // b's one session ends, and nobody waits on b: its demand falls from 1 to 0.
    assert_eq!(admit_as(&mut c, "b", 2, 1), 3, "full: b publishes 1");
    assert_eq!(demand_field(&mut c, "b"), "1");
    let s = Scripts::new();
    let mut call = s.release.prepare_invoke();
    call.arg(P).arg("b").arg("b").arg(0).arg(format!("{P}g"));
    call.invoke::<i64>(&mut c).unwrap();
    let field = demand_field(&mut c, "b");
    assert!(field.starts_with("0 1 "), "held: {field}");
    // a, one session, asks for the slot b freed for a client with another waiting behind it:
    // b's demand is still read as 1 (shares 1 and 1), so a, at its share, leaves the slot to
    // b's returning client.
    assert_eq!(admit_as(&mut c, "a", 2, 3), 3);
    assert_eq!(global(&mut c), 1);
    // The hold runs out: the slot is a's.
    let till: u64 = field.rsplit(' ').next().unwrap().parse().unwrap();
    let expired = format!("0 1 {}", till - DEMAND_HOLD.as_millis() as u64 - 1);
    redis::cmd("HSET")
        .arg(format!("{P}d"))
        .arg("b")
        .arg(&expired)
        .query::<i64>(&mut c)
        .unwrap();
    assert_eq!(admit_as(&mut c, "a", 2, 3), 0);
    assert_eq!(global(&mut c), 2);
    // A demand back at the held one ends the hold.
    assert_eq!(admit_as(&mut c, "b", 2, 1), 3);
    assert_eq!(demand_field(&mut c, "b"), "1");
}
