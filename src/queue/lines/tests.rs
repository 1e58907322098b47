use super::*;
use std::time::Duration;

#[test]
fn a_node_is_64_bytes() {
    assert_eq!(std::mem::size_of::<Node>(), 64);
    assert_eq!(std::mem::size_of::<Reverse<(u64, u32, u32)>>(), 16);
}

/// The plain statement of the order: every waiter in a list, the first in line the one with
/// the least (class, tag, arrival), the tag rule written out.
#[derive(Default)]
struct Model {
    /// (class, tag, arrival, source, deadline in ms, id)
    waiting: Vec<(usize, u64, u64, u8, u64, usize)>,
    clock: [u64; 2],
    arrivals: u64,
}

impl Model {
    fn push(&mut self, class: usize, source: u8, first: bool, deadline: u64, id: usize) {
        let clock = self.clock[class];
        let mine = || {
            self.waiting
                .iter()
                .filter(|w| w.0 == class && w.3 == source)
        };
        let (latest, count) = (mine().map(|w| w.1).max(), mine().count() as u64);
        // The turn after the source's latest, at most one round per waiter it has past the
        // clock, and never before its latest.
        let tag = if first {
            clock.saturating_sub(1)
        } else {
            latest.map_or(clock + 1, |t| {
                (t.max(clock) + 1).min(clock + count + 1).max(t)
            })
        };
        self.arrivals += 1;
        self.waiting
            .push((class, tag, self.arrivals, source, deadline, id));
    }

    fn first(&self) -> Option<usize> {
        self.waiting
            .iter()
            .min_by_key(|w| (w.0, w.1, w.2))
            .map(|w| w.5)
    }

    fn remove(&mut self, id: usize, served: bool) {
        let at = self.waiting.iter().position(|w| w.5 == id).unwrap();
        let w = self.waiting.swap_remove(at);
        if served {
            self.clock[w.0] = self.clock[w.0].max(w.1);
        }
    }
}

/// A small xorshift: the same sequence every run.
struct TestRng(u64);

impl TestRng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn source(i: u8) -> IpNet {
    IpNet::from(std::net::IpAddr::from([192, 0, 2, i]))
}

/// Random entries, put-backs, turns served, waiters leaving, outcomes left untaken a while
/// and deadlines coming, checked step by step against the model.
#[test]
fn the_calendar_serves_exactly_the_order_of_the_plain_statement() {
    let mut lines = Lines::new();
    let t0 = Instant::now();
    let mut model = Model::default();
    let mut rng = TestRng(0x9e37_79b9_7f4a_7c15);
    // id -> its place; decided places wait to be taken.
    let mut places: Vec<Place> = Vec::new();
    let mut waiting: Vec<usize> = Vec::new();
    let mut decided: Vec<Place> = Vec::new();
    let mut now_ms = 0u64;
    let mut served = 0;
    for step in 0..20_000 {
        match rng.below(10) {
            0..=3 => {
                let (src, allowed) = (rng.below(7) as u8, rng.below(8) == 0);
                let first = rng.below(12) == 0;
                let deadline = now_ms + 1 + rng.below(40);
                let id = places.len();
                let turn = if first { Turn::First } else { Turn::Next };
                let at = t0 + Duration::from_millis(deadline);
                places.push(lines.push(source(src), (src % 2 == 0, allowed), turn, at));
                model.push(usize::from(!allowed), src, first, deadline, id);
                waiting.push(id);
            }
            4..=5 => {
                let got = lines.first();
                let want = model.first();
                assert_eq!(got, want.map(|id| places[id]), "step {step}");
                if let Some(id) = want {
                    assert_eq!(lines.seen(places[id]).allowed, model_class(&model, id) == 0);
                    lines.decide(places[id], true);
                    model.remove(id, true);
                    waiting.retain(|&w| w != id);
                    decided.push(places[id]);
                    served += 1;
                }
            }
            6 if !waiting.is_empty() => {
                let id = waiting.swap_remove(rng.below(waiting.len() as u64) as usize);
                lines.release(places[id]);
                // A second release of the same handle is stale and does nothing.
                lines.release(places[id]);
                model.remove(id, false);
            }
            7 => {
                now_ms += rng.below(5);
                let at = t0 + Duration::from_millis(now_ms) + Duration::from_micros(500);
                let mut due = Vec::new();
                while let Some(place) = lines.due(at) {
                    lines.decide(place, false);
                    decided.push(place);
                    due.push(place);
                }
                let mut want: Vec<_> = model
                    .waiting
                    .iter()
                    .filter(|w| w.4 <= now_ms)
                    .map(|w| w.5)
                    .collect();
                for &id in &want {
                    model.remove(id, false);
                    waiting.retain(|&w| w != id);
                }
                want.sort_by_key(|&id| places[id].index);
                due.sort_by_key(|p| p.index);
                assert_eq!(due, want.iter().map(|&id| places[id]).collect::<Vec<_>>());
                let soonest = model.waiting.iter().map(|w| w.4).min();
                assert_eq!(lines.soonest().is_some(), soonest.is_some(), "step {step}");
            }
            _ if !decided.is_empty() => {
                let place = decided.swap_remove(rng.below(decided.len() as u64) as usize);
                assert!(lines.decided(place));
                lines.release(place);
                assert!(!lines.decided(place));
            }
            _ => {}
        }
        assert_eq!(lines.len(), model.waiting.len(), "step {step}");
        let want_class = model.waiting.iter().map(|w| w.0 as u8).min();
        assert_eq!(lines.first_class(), want_class, "step {step}");
    }
    assert!(served > 1000, "only {served} served");
    for id in waiting {
        lines.release(places[id]);
    }
    for place in decided {
        lines.release(place);
    }
    assert!(lines.holds_nothing());
}

fn model_class(model: &Model, id: usize) -> usize {
    model.waiting.iter().find(|w| w.5 == id).unwrap().0
}

/// Waiters that leave before their deadline leave it in the heap; the heap is swept before it
/// holds more than twice the waiters (plus a constant), so churn cannot grow it.
#[test]
fn deadlines_of_waiters_gone_are_swept() {
    let mut lines = Lines::new();
    let far = Instant::now() + Duration::from_secs(3600);
    let stay: Vec<_> = (0..10)
        .map(|i| lines.push(source(i), (true, false), Turn::Next, far))
        .collect();
    for _ in 0..100_000 {
        let place = lines.push(source(200), (true, false), Turn::Next, far);
        lines.release(place);
        assert!(lines.deadlines.len() <= 2 * (lines.len() + 1) + 1024);
    }
    // The slab reused the one freed node instead of growing.
    assert_eq!(lines.nodes.len(), 11);
    assert_eq!(lines.len(), 10);
    for place in stay {
        lines.release(place);
    }
    assert!(lines.holds_nothing());
}

/// A handle kept past its waiter's end never reaches the waiter that reuses the node.
#[test]
fn a_stale_handle_misses_the_next_waiter_in_its_node() {
    let mut lines = Lines::new();
    let far = Instant::now() + Duration::from_secs(60);
    let old = lines.push(source(1), (true, false), Turn::Next, far);
    lines.release(old);
    let new = lines.push(source(2), (true, false), Turn::Next, far);
    assert_eq!(new.index, old.index);
    assert!(!lines.waiting(old) && lines.waiting(new));
    lines.release(old);
    lines.set_waker(old, Waker::noop());
    assert!(lines.waiting(new) && lines.nodes[new.index as usize].waker.is_none());
    assert_eq!(lines.first(), Some(new));
}

/// A source that keeps three waiters in line, its oldest leaving and a new one coming each
/// time, while nobody is served: its tags stay within a round per waiter of the clock, so a
/// newcomer from another source lays a handful of buckets, not one per cycle, and has the
/// next round. Before the cap the tags climbed by one a cycle.
#[test]
fn a_source_that_churns_its_waiters_does_not_drift_its_tags_away_from_the_clock() {
    let mut lines = Lines::new();
    let far = Instant::now() + Duration::from_secs(3600);
    let churner = source(7);
    let mut mine: VecDeque<Place> = (0..3)
        .map(|_| lines.push(churner, (true, false), Turn::Next, far))
        .collect();
    for _ in 0..100_000 {
        lines.release(mine.pop_front().unwrap());
        mine.push_back(lines.push(churner, (true, false), Turn::Next, far));
        assert!(lines.classes[1].buckets.len() <= 4);
    }
    let tags: Vec<u64> = mine
        .iter()
        .map(|p| lines.nodes[p.index as usize].tag)
        .collect();
    assert!(tags.windows(2).all(|t| t[0] <= t[1]), "{tags:?}");
    assert!(tags.iter().all(|&t| t <= 3), "{tags:?}");
    let newcomer = lines.push(source(8), (true, false), Turn::Next, far);
    assert!(lines.classes[1].buckets.len() <= 4);
    // The newcomer has the next round; the churner's waiters follow in their order.
    let mut order = Vec::new();
    while let Some(place) = lines.first() {
        lines.decide(place, true);
        order.push(place);
    }
    assert_eq!(order, [newcomer, mine[0], mine[1], mine[2]]);
    for place in order {
        lines.release(place);
    }
    assert!(lines.holds_nothing());
}
