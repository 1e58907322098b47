use super::*;
use std::cell::Cell;
use std::task::Waker;

const LONG: Duration = Duration::from_secs(3600);

fn queue() -> Arc<Queue<u32>> {
    Queue::new(Arc::default(), Gauge::noop(), Histogram::noop())
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn waiter(allowed: bool) -> Waiter {
    Waiter {
        ip: "192.0.2.1".parse().unwrap(),
        allowed,
    }
}

/// Puts a waiter of `source` in the queue (nobody gets a slot on entry).
fn join(q: &Arc<Queue<u32>>, source: &str, allowed: bool) -> Ticket<u32> {
    match q.enter(net(source), waiter(allowed), (usize::MAX, LONG), || None) {
        Entered::Wait(t) => t,
        _ => panic!("not queued"),
    }
}

/// Hands out `n` slots, numbered in order, and returns who got which.
fn serve(q: &Queue<u32>, n: u32) {
    let next = Cell::new(0);
    q.serve(|_| {
        let i = next.get();
        (i < n).then(|| {
            next.set(i + 1);
            i
        })
    });
}

/// The outcome decided for `t`, if any, taken as its task would.
fn poll(t: &mut Ticket<u32>) -> Option<WaitEnd<u32>> {
    let mut cx = Context::from_waker(Waker::noop());
    match t.poll_outcome(&mut cx) {
        Poll::Ready(o) => Some(o),
        Poll::Pending => None,
    }
}

fn granted(t: &mut Ticket<u32>) -> Option<u32> {
    match poll(t) {
        Some(WaitEnd::Granted(i)) => Some(i),
        _ => None,
    }
}

#[test]
fn sources_take_turns_and_each_keeps_its_order() {
    let q = queue();
    let mut greedy: Vec<_> = (0..100).map(|_| join(&q, "10.0.0.1/32", false)).collect();
    let mut light: Vec<_> = (2..12)
        .map(|i| join(&q, &format!("10.0.0.{i}/32"), false))
        .collect();
    assert_eq!(q.len(), 110);
    serve(&q, 20);
    assert_eq!(q.len(), 90);
    // The greedy source's first, then every light source once, then the greedy again.
    let light_slots: Vec<_> = light.iter_mut().map(|t| granted(t).unwrap()).collect();
    assert_eq!(light_slots, (1..=10).collect::<Vec<_>>());
    let greedy_slots: Vec<_> = greedy.iter_mut().filter_map(granted).collect();
    assert_eq!(greedy_slots, [0, 11, 12, 13, 14, 15, 16, 17, 18, 19]);
}

#[test]
fn allowed_sources_go_first_and_nobody_jumps_the_queue() {
    let q = queue();
    let mut first = join(&q, "10.0.0.1/32", false);
    let mut allowed = join(&q, "192.0.2.0/24", true);
    // Someone waits: a newcomer is not offered a slot even if one is free.
    let offered = Cell::new(false);
    let entered = q.enter(
        net("10.0.0.9/32"),
        waiter(false),
        (usize::MAX, LONG),
        || {
            offered.set(true);
            Some(99)
        },
    );
    assert!(matches!(entered, Entered::Wait(_)));
    assert!(!offered.get());
    serve(&q, 1);
    assert_eq!(granted(&mut allowed), Some(0));
    assert_eq!(granted(&mut first), None);
    serve(&q, 1);
    assert_eq!(granted(&mut first), Some(0));
}

#[test]
fn leaving_frees_the_place_and_bounds_hold() {
    let q = queue();
    assert!(matches!(
        q.enter(net("10.0.0.1/32"), waiter(false), (5, LONG), || Some(7)),
        Entered::Now(7)
    ));
    let held: Vec<_> = (0..2).map(|_| join(&q, "10.0.0.1/32", false)).collect();
    assert!(matches!(
        q.enter(net("10.0.0.2/32"), waiter(false), (2, LONG), || None),
        Entered::Full
    ));
    let mut held = held.into_iter();
    assert!(held.next().unwrap().leave().is_none());
    assert_eq!(q.len(), 1);
    drop(held);
    assert_eq!(q.len(), 0);
    assert!(q.lock().lines.holds_nothing());
    assert!(q.lock().decided.is_empty());
    // A slot sent to a waiter that then leaves comes back with `leave`.
    let t = join(&q, "10.0.0.3/32", false);
    serve(&q, 1);
    assert!(matches!(t.leave(), Some(WaitEnd::Granted(0))));
}

#[test]
fn close_tells_every_waiter_and_shuts_the_door() {
    let q = queue();
    let t = join(&q, "10.0.0.1/32", false);
    let rest: Vec<_> = (0..3).map(|_| join(&q, "10.0.0.2/32", false)).collect();
    q.close();
    assert!(matches!(t.rx_state(), Some(WaitEnd::Draining)));
    assert!(rest
        .into_iter()
        .all(|t| matches!(t.rx_state(), Some(WaitEnd::Draining))));
    assert_eq!(q.len(), 0);
    assert!(matches!(
        q.enter(net("10.0.0.1/32"), waiter(false), (9, LONG), || None),
        Entered::Closed
    ));
}

#[test]
fn waits_end_at_their_deadline_in_deadline_order() {
    let q = queue();
    let short = |source: &str, timeout| match q.enter(
        net(source),
        waiter(false),
        (usize::MAX, timeout),
        || None,
    ) {
        Entered::Wait(t) => t,
        _ => panic!("not queued"),
    };
    let long = short("10.0.0.1/32", LONG);
    let soon = short("10.0.0.2/32", Duration::from_millis(10));
    let now = Instant::now();
    assert!(q.expire(now).is_some_and(|next| next > now));
    assert_eq!(q.len(), 2);
    let next = q.expire(now + Duration::from_secs(1)).unwrap();
    assert!(next > now + Duration::from_secs(3000));
    assert!(matches!(soon.rx_state(), Some(WaitEnd::TimedOut)));
    assert_eq!(q.len(), 1);
    drop(long);
    assert_eq!(q.expire(now), None);
}

impl Ticket<u32> {
    fn rx_state(mut self) -> Option<WaitEnd<u32>> {
        poll(&mut self)
    }
}

#[test]
fn a_waiter_put_back_goes_first_and_keeps_its_deadline() {
    let q = queue();
    let mut a = join(&q, "10.0.0.1/32", false);
    let mut b = join(&q, "10.0.0.2/32", false);
    serve(&q, 1);
    assert_eq!(granted(&mut a), Some(0));
    // Its backend said busy: back in line, ahead of b and of any newcomer.
    let first = a.entered();
    drop(a);
    let mut c = join(&q, "10.0.0.3/32", false);
    let Entered::Wait(mut again) =
        q.reenter(net("10.0.0.1/32"), waiter(false), (first, LONG), None)
    else {
        panic!("not put back")
    };
    assert_eq!(again.entered(), first);
    assert_eq!(q.len(), 3);
    serve(&q, 2);
    assert_eq!((granted(&mut again), granted(&mut b)), (Some(0), Some(1)));
    assert_eq!(granted(&mut c), None);
    // The deadline counts from the first entry: one already past ends at the next expiry.
    let Entered::Wait(mut late) = q.reenter(
        net("10.0.0.4/32"),
        waiter(false),
        (
            Instant::now() - Duration::from_secs(10),
            Duration::from_secs(5),
        ),
        None,
    ) else {
        panic!("not put back")
    };
    // One that never waited is held to `max_queued`: the queue holds 2 now.
    assert!(matches!(
        q.reenter(net("10.0.0.5/32"), waiter(false), (first, LONG), Some(2)),
        Entered::Full
    ));
    assert_eq!(q.len(), 2);
    q.expire(Instant::now());
    assert!(matches!(poll(&mut late), Some(WaitEnd::TimedOut)));
    assert_eq!(q.len(), 1);
    q.close();
    assert!(matches!(
        q.reenter(net("10.0.0.1/32"), waiter(false), (first, LONG), None),
        Entered::Closed
    ));
}

// Issue 39: a cluster publishes its demand without its waiters only when the dispatcher
// looks; the last waiter giving up left it unwoken until the next lease refresh.
#[tokio::test]
async fn the_last_waiter_giving_up_wakes_the_dispatcher() {
    let wake = Arc::new(Wake::default());
    let q = Queue::<u32>::new(wake.clone(), Gauge::noop(), Histogram::noop());
    let a = join(&q, "10.0.0.1/32", false);
    let b = join(&q, "10.0.0.2/32", false);
    // The entries' own wake-ups, taken.
    wake.notified().await;
    assert!(b.leave().is_none());
    let quiet = tokio::time::timeout(Duration::from_millis(50), wake.notified()).await;
    assert!(quiet.is_err(), "one still waits: nothing to look at");
    assert!(a.leave().is_none());
    assert_eq!(q.len(), 0);
    tokio::time::timeout(Duration::from_secs(5), wake.notified())
        .await
        .expect("the dispatcher is woken");
}
