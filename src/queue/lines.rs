//! The queue's storage, laid out so that a waiting client costs less than an idle session:
//! about 90 bytes each, in a few large blocks, where a B-tree per order cost over 300.
//!
//! - Every waiter is one fixed-size [`Node`] in a slab, found again by its index and checked
//!   by a generation, so a stale handle never touches a newer waiter.
//! - The order is a calendar of tags: a class keeps one bucket per tag, each bucket a list of
//!   its waiters in arrival order, linked through the nodes. The first in line is the head of
//!   the first bucket that holds anyone.
//! - A source's waiters are linked too, and a table of 8-byte entries finds a source's latest
//!   waiter, whose tag is the source's last turn, and counts its waiters. A source with nobody
//!   waiting has no entry.
//! - Deadlines are a binary heap of small entries. One whose waiter has left is dropped when it
//!   comes up, or when the heap has grown to twice the waiters.
//!
//! It decides nothing: the tags, the turns and what an outcome is are the queue's.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::hash::BuildHasher;
use std::task::Waker;
use std::time::Instant;

use hashbrown::HashTable;
use ipnet::IpNet;

/// No node: the end of a list.
const NIL: u32 = u32::MAX;

const V4: u8 = 1;
const ALLOWED: u8 = 2;
/// In line, in its bucket and its source's list.
const WAITING: u8 = 4;
/// Out of line with an outcome its ticket has not taken yet; the index stays reserved.
const DECIDED: u8 = 8;

/// A waiter. 64 bytes.
struct Node {
    /// The waiter's task, woken when its outcome is ready.
    waker: Option<Waker>,
    tag: u64,
    /// Neighbours in its tag's bucket. A free node's `next` links the free list.
    prev: u32,
    next: u32,
    /// Neighbours among its source's waiters, lowest tag first.
    src_prev: u32,
    src_next: u32,
    /// Bumped whenever the node is freed, so that old handles and deadlines miss.
    generation: u32,
    source: IpNet,
    flags: u8,
}

impl Node {
    fn class(&self) -> usize {
        usize::from(self.flags & ALLOWED == 0)
    }
}

/// A source's entry: its latest waiter and its number of waiters in line.
#[derive(Clone, Copy)]
struct Latest {
    index: u32,
    count: u32,
}

/// A handle on one waiter: its slab index and the generation it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Place {
    index: u32,
    generation: u32,
}

/// One class's calendar: bucket `i` holds the waiters of tag `base + i`, as (head, tail).
#[derive(Default)]
struct Calendar {
    base: u64,
    buckets: VecDeque<(u32, u32)>,
    waiting: usize,
    /// The tag the class served last.
    clock: u64,
}

/// Where a waiter joins its class.
pub(super) enum Turn {
    /// After its source's latest waiter, or in the class's next round.
    Next,
    /// Ahead of everyone in its class.
    First,
}

/// What the dispatcher needs to know of a waiter.
pub(super) struct WaiterView {
    pub(super) v4: bool,
    pub(super) allowed: bool,
}

pub(super) struct Lines {
    nodes: Vec<Node>,
    /// The head of the free list, through `Node::next`.
    free: u32,
    classes: [Calendar; 2],
    /// Each source's latest waiter and how many it has in line, by (class, source).
    sources: HashTable<Latest>,
    hasher: std::hash::RandomState,
    /// (deadline in µs from `epoch`, index, generation), soonest on top.
    deadlines: BinaryHeap<Reverse<(u64, u32, u32)>>,
    epoch: Instant,
}

impl Lines {
    pub(super) fn new() -> Lines {
        Lines {
            nodes: Vec::new(),
            free: NIL,
            classes: Default::default(),
            sources: HashTable::new(),
            hasher: Default::default(),
            deadlines: BinaryHeap::new(),
            epoch: Instant::now(),
        }
    }

    /// Waiters in line.
    pub(super) fn len(&self) -> usize {
        self.classes[0].waiting + self.classes[1].waiting
    }

    /// The class of the first in line (0 for allowed sources), if anyone waits.
    pub(super) fn first_class(&self) -> Option<u8> {
        (0..2u8).find(|&c| self.classes[c as usize].waiting > 0)
    }

    /// Puts a waiter in line; its tag follows `turn`.
    pub(super) fn push(
        &mut self,
        source: IpNet,
        (v4, allowed): (bool, bool),
        turn: Turn,
        deadline: Instant,
    ) -> Place {
        let class = usize::from(!allowed);
        let hash = self.hasher.hash_one((class, source));
        let latest = {
            let nodes = &self.nodes;
            self.sources
                .find(hash, |l| {
                    same_source(&nodes[l.index as usize], class, source)
                })
                .copied()
        };
        let clock = self.classes[class].clock;
        let tag = match turn {
            Turn::Next => match latest {
                None => clock + 1,
                // The turn after its latest, but never past one round per waiter it has: a
                // source whose waiters keep leaving and coming back would otherwise push its
                // tags up without bound while the clock stands, and a newcomer would have to
                // lay one empty bucket per tag. Past that, it shares its latest's turn, behind
                // it, so a source's waiters still go in their order.
                Some(l) => {
                    let last = self.nodes[l.index as usize].tag;
                    (last.max(clock) + 1)
                        .min(clock + u64::from(l.count) + 1)
                        .max(last)
                }
            },
            // Every waiting tag is at least the class clock (one served in the same round as
            // others leaves the clock at their tag): one below it goes first.
            Turn::First => clock.saturating_sub(1),
        };
        let flags = WAITING | if v4 { V4 } else { 0 } | if allowed { ALLOWED } else { 0 };
        let index = self.alloc(Node {
            waker: None,
            tag,
            prev: NIL,
            next: NIL,
            src_prev: NIL,
            src_next: NIL,
            generation: 0,
            source,
            flags,
        });
        self.link_source(index, latest, hash, turn);
        self.link_bucket(class, index);
        let place = Place {
            index,
            generation: self.nodes[index as usize].generation,
        };
        self.push_deadline(place, deadline);
        place
    }

    /// The first in line, if anyone waits.
    pub(super) fn first(&mut self) -> Option<Place> {
        for class in &mut self.classes {
            if class.waiting == 0 {
                continue;
            }
            while class.buckets.front().is_some_and(|&(head, _)| head == NIL) {
                class.buckets.pop_front();
                class.base += 1;
            }
            let &(head, _) = class
                .buckets
                .front()
                .expect("a class with waiters has a bucket");
            let generation = self.nodes[head as usize].generation;
            return Some(Place {
                index: head,
                generation,
            });
        }
        None
    }

    pub(super) fn seen(&self, place: Place) -> WaiterView {
        let flags = self.nodes[place.index as usize].flags;
        WaiterView {
            v4: flags & V4 != 0,
            allowed: flags & ALLOWED != 0,
        }
    }

    /// Whether `place` is still in line.
    pub(super) fn waiting(&self, place: Place) -> bool {
        self.state(place) == Some(WAITING)
    }

    /// Whether `place` is out of line with an outcome not yet taken.
    pub(super) fn decided(&self, place: Place) -> bool {
        self.state(place) == Some(DECIDED)
    }

    fn state(&self, place: Place) -> Option<u8> {
        let node = self.nodes.get(place.index as usize)?;
        (node.generation == place.generation).then_some(node.flags & (WAITING | DECIDED))
    }

    /// Takes a waiter out of line, keeping its place reserved for its outcome; returns the
    /// waker to wake. `served` moves its class's clock to its tag.
    pub(super) fn decide(&mut self, place: Place, served: bool) -> Option<Waker> {
        debug_assert!(self.waiting(place));
        self.unlink(place.index);
        let node = &mut self.nodes[place.index as usize];
        node.flags = (node.flags & !WAITING) | DECIDED;
        if served {
            let (class, tag) = (node.class(), node.tag);
            let clock = &mut self.classes[class].clock;
            *clock = (*clock).max(tag);
        }
        self.nodes[place.index as usize].waker.take()
    }

    /// Frees a place, in line or decided. A stale handle does nothing.
    pub(super) fn release(&mut self, place: Place) {
        match self.state(place) {
            Some(WAITING) => self.unlink(place.index),
            Some(DECIDED) => {}
            _ => return,
        }
        let node = &mut self.nodes[place.index as usize];
        node.flags = 0;
        node.waker = None;
        node.generation = node.generation.wrapping_add(1);
        node.next = self.free;
        self.free = place.index;
    }

    /// Keeps `waker` to wake a waiter in line.
    pub(super) fn set_waker(&mut self, place: Place, waker: &Waker) {
        if self.waiting(place) {
            let slot = &mut self.nodes[place.index as usize].waker;
            if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
                *slot = Some(waker.clone());
            }
        }
    }

    /// The waiter whose deadline has come by `now`, if any.
    pub(super) fn due(&mut self, now: Instant) -> Option<Place> {
        let now = self.micros(now);
        let (deadline, place) = self.next_deadline()?;
        (deadline <= now).then(|| {
            self.deadlines.pop();
            place
        })
    }

    /// The soonest deadline of a waiter in line.
    pub(super) fn soonest(&mut self) -> Option<Instant> {
        let (micros, _) = self.next_deadline()?;
        Some(self.epoch + std::time::Duration::from_micros(micros))
    }

    /// The top deadline that still has its waiter, dropping those that do not.
    fn next_deadline(&mut self) -> Option<(u64, Place)> {
        while let Some(&Reverse((deadline, index, generation))) = self.deadlines.peek() {
            let place = Place { index, generation };
            if self.waiting(place) {
                return Some((deadline, place));
            }
            self.deadlines.pop();
        }
        None
    }

    fn push_deadline(&mut self, place: Place, deadline: Instant) {
        // Rounded up: a wait never ends before its deadline.
        let since = deadline.saturating_duration_since(self.epoch);
        let micros =
            since.as_micros() as u64 + u64::from(!since.subsec_nanos().is_multiple_of(1000));
        self.deadlines
            .push(Reverse((micros, place.index, place.generation)));
        // Deadlines of waiters who left early stay until they come up; past twice the
        // waiters, they are swept, so the heap never holds more than that.
        if self.deadlines.len() > 2 * self.len() + 1024 {
            let nodes = &self.nodes;
            self.deadlines.retain(|&Reverse((_, index, generation))| {
                let node = &nodes[index as usize];
                node.generation == generation && node.flags & WAITING != 0
            });
        }
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn alloc(&mut self, node: Node) -> u32 {
        if self.free == NIL {
            let index = u32::try_from(self.nodes.len()).expect("fewer than 2^32 waiters");
            assert!(index != NIL, "fewer than 2^32 waiters");
            self.nodes.push(node);
            return index;
        }
        let index = self.free;
        let slot = &mut self.nodes[index as usize];
        self.free = slot.next;
        let generation = slot.generation;
        *slot = Node { generation, ..node };
        index
    }

    /// Links a new waiter into its source's list: after its latest for the next turn, ahead of
    /// all for the first.
    fn link_source(&mut self, index: u32, latest: Option<Latest>, hash: u64, turn: Turn) {
        let Some(Latest { index: latest, .. }) = latest else {
            let nodes = &self.nodes;
            let hasher = &self.hasher;
            let entry = Latest { index, count: 1 };
            self.sources.insert_unique(hash, entry, |l| {
                let n = &nodes[l.index as usize];
                hasher.hash_one((n.class(), n.source))
            });
            return;
        };
        let entry = self.latest_mut(hash, latest);
        entry.count += 1;
        match turn {
            Turn::Next => {
                entry.index = index;
                self.nodes[latest as usize].src_next = index;
                self.nodes[index as usize].src_prev = latest;
            }
            Turn::First => {
                let mut head = latest;
                while self.nodes[head as usize].src_prev != NIL {
                    head = self.nodes[head as usize].src_prev;
                }
                self.nodes[head as usize].src_prev = index;
                self.nodes[index as usize].src_next = head;
            }
        }
    }

    /// The table entry whose latest waiter is `latest`.
    fn latest_mut(&mut self, hash: u64, latest: u32) -> &mut Latest {
        let Some(entry) = self.sources.find_mut(hash, |l| l.index == latest) else {
            unreachable!("a source's latest waiter is in the table");
        };
        entry
    }

    fn link_bucket(&mut self, class: usize, index: u32) {
        let tag = self.nodes[index as usize].tag;
        let cal = &mut self.classes[class];
        if cal.buckets.is_empty() {
            cal.base = tag;
        }
        while tag < cal.base {
            cal.buckets.push_front((NIL, NIL));
            cal.base -= 1;
        }
        let at = (tag - cal.base) as usize;
        if at >= cal.buckets.len() {
            cal.buckets.resize(at + 1, (NIL, NIL));
        }
        let (head, tail) = &mut cal.buckets[at];
        let old_tail = *tail;
        *tail = index;
        if old_tail == NIL {
            *head = index;
        } else {
            self.nodes[old_tail as usize].next = index;
            self.nodes[index as usize].prev = old_tail;
        }
        cal.waiting += 1;
    }

    /// Takes a waiter out of its bucket and its source's list.
    fn unlink(&mut self, index: u32) {
        let node = &self.nodes[index as usize];
        let (prev, next, src_prev, src_next) = (node.prev, node.next, node.src_prev, node.src_next);
        let (class, tag, source) = (node.class(), node.tag, node.source);
        // The bucket.
        let cal = &mut self.classes[class];
        let bucket = &mut cal.buckets[(tag - cal.base) as usize];
        match prev {
            NIL => bucket.0 = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => bucket.1 = prev,
            n => self.nodes[n as usize].prev = prev,
        }
        cal.waiting -= 1;
        if cal.waiting == 0 {
            cal.buckets.clear();
            // A burst's calendar is not kept once it has gone.
            if cal.buckets.capacity() > 4096 {
                cal.buckets.shrink_to(64);
            }
        }
        // The source's list; its latest waiter is the table's entry, with its count.
        if src_prev != NIL {
            self.nodes[src_prev as usize].src_next = src_next;
        }
        if src_next != NIL {
            self.nodes[src_next as usize].src_prev = src_prev;
        }
        let hash = self.hasher.hash_one((class, source));
        let nodes = &self.nodes;
        let found = self.sources.find_entry(hash, |l| {
            same_source(&nodes[l.index as usize], class, source)
        });
        let Ok(mut entry) = found else {
            unreachable!("a source's latest waiter is in the table");
        };
        let l = entry.get_mut();
        l.count -= 1;
        if l.index == index {
            l.index = src_prev;
        }
        if l.count == 0 {
            debug_assert_eq!(src_prev, NIL);
            entry.remove();
        }
        let node = &mut self.nodes[index as usize];
        (node.prev, node.next, node.src_prev, node.src_next) = (NIL, NIL, NIL, NIL);
    }
}

#[cfg(test)]
impl Lines {
    /// Nobody in line or decided, no source entry and no live deadline.
    pub(super) fn holds_nothing(&mut self) -> bool {
        self.next_deadline().is_none()
            && self.sources.is_empty()
            && self.len() == 0
            && self.nodes.iter().all(|n| n.flags == 0)
    }
}

fn same_source(node: &Node, class: usize, source: IpNet) -> bool {
    node.class() == class && node.source == source
}

#[cfg(test)]
mod tests;
