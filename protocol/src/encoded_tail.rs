//! The wire encoding of each origin's newest events, as the first feed to send them encoded
//! them: the other feeds copy the bytes instead of encoding the same events again.
//!
//! A region sends each of its own writes to every neighbor, and relays the events it forwards
//! to every subscriber of their origin: one event goes out on several feeds, each at its own
//! pace (a feed sends when its peer's acknowledgements open its window). The feeds are rarely
//! more than a window apart, so a short run of encodings per origin, kept in the order of
//! sequence numbers, serves nearly all of them.
//!
//! The tails mirror the change log: they only ever hold events the log lent, and they drop what
//! the log drops ([`EncodedTails::trim`]), so a batch built from them is the batch the log would
//! have given, byte for byte. An origin and sequence number name one event for good (the
//! replica commits an event only right after its origin's last), so a kept encoding never goes
//! stale.

use std::collections::{BTreeMap, VecDeque};

use crate::ids::{NodeId, Seq, VersionVector};
use crate::message::EncodedEvents;

/// Bytes of encodings kept per origin; past it the oldest go. 256 KiB holds the events of
/// several windows of every feed at thousands of writes per second.
pub(crate) const ENCODED_TAIL_BYTES_MAX: usize = 256 * 1024;

/// Bytes of encodings kept over every origin: a mesh of sixteen origins keeps each one's whole
/// tail; past that, an origin keeps what the others leave when it next appends (first come,
/// first served until a trim frees some). The memory held is a small multiple of this: between
/// compactions a buffer holds up to twice its allowance, its capacity grows to twice that
/// before it is given back, and each event kept takes 16 bytes of offsets beside its encoding.
pub(crate) const ENCODED_TAILS_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Per origin, the encodings of a run of consecutive events.
#[derive(Debug, Default)]
pub(crate) struct EncodedTails {
    tails: BTreeMap<NodeId, Tail>,
    /// The tails' live bytes, together.
    live: usize,
}

/// What [`EncodedTails::lend`] put into a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lent {
    /// The last sequence number lent (the `after` given, if none).
    pub last: Seq,
    /// How many events.
    pub events: usize,
    /// Their sizes, as [`crate::storage::event_size_bytes`] counts them.
    pub bytes: usize,
}

/// One origin's run: the events from `first` on, each encoded, one after another in `bytes`.
#[derive(Debug, Default)]
struct Tail {
    /// The sequence number of the first event kept.
    first: Seq,
    /// For each event kept, in order: where its encoding ends in `bytes`, and its size as the
    /// storage counts it against a batch's byte limit.
    ends: VecDeque<(usize, usize)>,
    /// Where the first event's encoding starts in `bytes` (the bytes before it are dropped).
    start: usize,
    bytes: Vec<u8>,
}

impl Tail {
    /// The sequence number the next event appended must have.
    fn next(&self) -> Seq {
        Seq(self.first.0 + self.ends.len() as u64)
    }

    /// Where the encoding of the event at `index` (from `first`) starts.
    fn start_of(&self, index: usize) -> usize {
        match index {
            0 => self.start,
            _ => self.ends[index - 1].0,
        }
    }

    fn live_bytes(&self) -> usize {
        self.bytes.len() - self.start
    }

    /// Drops the first event.
    fn pop_front(&mut self) {
        if let Some((end, _)) = self.ends.pop_front() {
            self.start = end;
            self.first = self.first.next();
        }
        if self.ends.is_empty() {
            self.bytes.clear();
            self.start = 0;
        }
    }

    /// Keeps the encoding of event `seq`, holding no more than `allowance` bytes: see
    /// [`EncodedTails::keep`].
    fn keep(&mut self, seq: Seq, encoded: &[u8], size: usize, allowance: usize) {
        if !self.ends.is_empty() && seq < self.next() {
            // Already kept, or older than the run: a lagging feed reading the log.
            return;
        }
        if encoded.len() > allowance {
            // Larger than all it may hold: not kept, and the run it breaks starts again.
            *self = Tail::default();
            return;
        }
        if seq > self.next() {
            // A gap: the run starts again at `seq` (below, once empty).
            self.ends.clear();
            self.bytes.clear();
            self.start = 0;
        }
        while !self.ends.is_empty() && self.live_bytes() + encoded.len() > allowance {
            self.pop_front();
        }
        if self.ends.is_empty() {
            self.first = seq;
        }
        self.compact();
        // A buffer grown under a larger allowance gives the excess back (past twice what it
        // can grow to under this one, so that growing and shrinking do not alternate).
        let grown_max = 2 * (2 * allowance + encoded.len());
        if self.bytes.capacity() > 2 * grown_max {
            self.bytes.shrink_to(grown_max);
        }
        self.bytes.extend_from_slice(encoded);
        self.ends.push_back((self.bytes.len(), size));
        assert!(self.live_bytes() <= allowance);
    }

    /// Moves the live bytes to the front once the dropped ones are most of the buffer: each
    /// byte is moved at most once per time the buffer fills, so appending stays linear.
    fn compact(&mut self) {
        if self.start == 0 || self.start < self.bytes.len() / 2 {
            return;
        }
        let dropped = self.start;
        self.bytes.drain(..dropped);
        for (end, _) in &mut self.ends {
            *end -= dropped;
        }
        self.start = 0;
    }
}

impl EncodedTails {
    /// Copies into `batch` the encodings kept of `origin`'s events after `after`, in order, as
    /// a storage lends them (see [`crate::storage::Storage::log_after_each`]): at most
    /// `events_max` of them, stopping once their sizes reach `bytes_max` (at least one is lent
    /// if the tail holds the next). Lends nothing unless the tail holds the event after `after`.
    pub(crate) fn lend(
        &self,
        origin: NodeId,
        after: Seq,
        events_max: usize,
        bytes_max: usize,
        batch: &mut EncodedEvents,
    ) -> Lent {
        let mut lent = Lent {
            last: after,
            events: 0,
            bytes: 0,
        };
        let Some(tail) = self.tails.get(&origin) else {
            return lent;
        };
        let from_seq = after.next();
        if from_seq < tail.first || from_seq >= tail.next() {
            return lent;
        }
        let from = (from_seq.0 - tail.first.0) as usize;
        let mut to = from;
        while to < tail.ends.len() {
            if lent.events >= events_max || (lent.bytes >= bytes_max && lent.events > 0) {
                break;
            }
            lent.bytes += tail.ends[to].1;
            lent.events += 1;
            to += 1;
        }
        if lent.events == 0 {
            return lent;
        }
        // One copy for the whole run: the encodings lie one after another.
        batch.append_encoded(
            &tail.bytes[tail.start_of(from)..tail.ends[to - 1].0],
            lent.events,
        );
        lent.last = Seq(after.0 + lent.events as u64);
        lent
    }

    /// Keeps the encoding of `origin`'s event `seq`, which the change log holds, with its size
    /// as the storage counted it. The tail holds one run of consecutive events: an event right
    /// after it extends it; one further on starts it again (the newest events are the ones the
    /// feeds still want); one already in it, or before it, is not kept again.
    pub(crate) fn keep(&mut self, origin: NodeId, seq: Seq, encoded: &[u8], size: usize) {
        let tail = self.tails.entry(origin).or_default();
        let before = tail.live_bytes();
        // What the other origins leave of the whole budget, and no more than an origin's own.
        let allowance = ENCODED_TAIL_BYTES_MAX.min(ENCODED_TAILS_BYTES_MAX - (self.live - before));
        tail.keep(seq, encoded, size, allowance);
        self.live = self.live - before + tail.live_bytes();
        if tail.ends.is_empty() {
            self.tails.remove(&origin);
        }
        assert!(self.live <= ENCODED_TAILS_BYTES_MAX);
    }

    /// Drops, per origin, every event at or below `through[origin]`, as the change log does.
    pub(crate) fn trim(&mut self, through: &VersionVector) {
        for (origin, seq) in through.iter() {
            if let Some(tail) = self.tails.get_mut(&origin) {
                let before = tail.live_bytes();
                while !tail.ends.is_empty() && tail.first <= seq {
                    tail.pop_front();
                }
                self.live = self.live - before + tail.live_bytes();
                if tail.ends.is_empty() {
                    self.tails.remove(&origin);
                }
            }
        }
    }

    /// Bytes of encodings kept, over every origin.
    #[cfg(test)]
    fn live_bytes(&self) -> usize {
        let live = self.tails.values().map(Tail::live_bytes).sum();
        assert_eq!(live, self.live, "the count of live bytes is kept right");
        live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u64) -> NodeId {
        NodeId(n)
    }

    /// An event's stand-in encoding: its sequence number, repeated `len` times.
    fn encoding(seq: u64, len: usize) -> Vec<u8> {
        vec![seq as u8; len]
    }

    /// How many events `tails` lends of `origin` after `after`, with no limit but the tail's.
    fn lendable(tails: &EncodedTails, origin: u64, after: u64) -> usize {
        let mut batch = EncodedEvents::default();
        let lent = tails.lend(node(origin), Seq(after), 1000, usize::MAX, &mut batch);
        assert_eq!(lent.events, batch.events());
        lent.events
    }

    fn keep_run(tails: &mut EncodedTails, origin: NodeId, seqs: std::ops::RangeInclusive<u64>) {
        for seq in seqs {
            tails.keep(origin, Seq(seq), &encoding(seq, 10), 30);
        }
    }

    #[test]
    fn lends_a_run_in_one_piece_within_the_limits() {
        let mut tails = EncodedTails::default();
        keep_run(&mut tails, node(1), 1..=5);
        let mut batch = EncodedEvents::default();
        let lent = tails.lend(node(1), Seq(1), 3, usize::MAX, &mut batch);
        assert_eq!(
            lent,
            Lent {
                last: Seq(4),
                events: 3,
                bytes: 90
            }
        );
        assert_eq!(batch.events(), 3);
        let expected: Vec<u8> = (2..=4).flat_map(|s| encoding(s, 10)).collect();
        assert_eq!(batch.bytes(), &expected[..]);
        // The byte limit stops the run once reached, but never before the first event.
        let mut batch = EncodedEvents::default();
        assert_eq!(tails.lend(node(1), Seq(0), 10, 31, &mut batch).events, 2);
        let mut batch = EncodedEvents::default();
        assert_eq!(tails.lend(node(1), Seq(0), 10, 1, &mut batch).events, 1);
    }

    #[test]
    fn lends_nothing_it_does_not_hold_the_start_of() {
        let mut tails = EncodedTails::default();
        keep_run(&mut tails, node(1), 5..=8);
        assert_eq!(lendable(&tails, 1, 3), 0);
        assert_eq!(lendable(&tails, 1, 8), 0);
        assert_eq!(lendable(&tails, 2, 0), 0);
        assert_eq!(lendable(&tails, 1, 4), 4);
    }

    #[test]
    fn a_gap_starts_the_run_again_and_old_events_are_not_kept_twice() {
        let mut tails = EncodedTails::default();
        keep_run(&mut tails, node(1), 1..=3);
        tails.keep(node(1), Seq(2), &encoding(99, 10), 30);
        let mut batch = EncodedEvents::default();
        tails.lend(node(1), Seq(0), 10, usize::MAX, &mut batch);
        assert_eq!(batch.events(), 3);
        assert!(!batch.bytes().contains(&99));
        keep_run(&mut tails, node(1), 7..=7);
        assert_eq!(lendable(&tails, 1, 0), 0);
        assert_eq!(lendable(&tails, 1, 6), 1);
    }

    #[test]
    fn trimming_drops_what_the_log_drops() {
        let mut tails = EncodedTails::default();
        keep_run(&mut tails, node(1), 1..=5);
        keep_run(&mut tails, node(2), 1..=2);
        tails.trim(&VersionVector::from_entries(vec![
            (node(1), Seq(3)),
            (node(2), Seq(9)),
        ]));
        assert_eq!(lendable(&tails, 1, 2), 0);
        assert_eq!(lendable(&tails, 1, 3), 2);
        assert_eq!(lendable(&tails, 2, 0), 0);
        assert_eq!(tails.tails.len(), 1);
    }

    #[test]
    fn many_origins_share_one_bound() {
        let mut tails = EncodedTails::default();
        let len = 4096;
        let origins = 2 * ENCODED_TAILS_BYTES_MAX / ENCODED_TAIL_BYTES_MAX;
        for seq in 1..=(ENCODED_TAIL_BYTES_MAX / len) as u64 {
            for origin in 1..=origins as u64 {
                tails.keep(node(origin), Seq(seq), &encoding(seq, len), len);
                assert!(tails.live_bytes() <= ENCODED_TAILS_BYTES_MAX);
            }
        }
        assert!(tails.live_bytes() > ENCODED_TAILS_BYTES_MAX - origins * len);
        // Each origin still lends its newest event, and trimming gives its bytes back.
        for origin in 1..=origins as u64 {
            let newest = (ENCODED_TAIL_BYTES_MAX / len) as u64;
            assert_eq!(lendable(&tails, origin, newest - 1), 1);
            tails.trim(&VersionVector::from_entries(vec![(
                node(origin),
                Seq(newest),
            )]));
        }
        assert_eq!(tails.live_bytes(), 0);
        assert!(tails.tails.is_empty());
    }

    #[test]
    fn a_tail_whose_allowance_shrinks_gives_its_memory_back() {
        let mut tail = Tail::default();
        let len = 1000;
        for seq in 1..=1000 {
            tail.keep(Seq(seq), &encoding(seq, len), len, ENCODED_TAIL_BYTES_MAX);
        }
        assert!(tail.bytes.capacity() >= ENCODED_TAIL_BYTES_MAX);
        let small = 4 * len;
        for seq in 1001..=1010 {
            tail.keep(Seq(seq), &encoding(seq, len), len, small);
            assert!(tail.live_bytes() <= small);
        }
        assert!(tail.bytes.capacity() <= 4 * (2 * small + len));
        // Already kept, or older than the run: never kept again, whatever its size.
        let next = tail.next();
        tail.keep(Seq(1009), &encoding(0, 10 * small), 1, small);
        tail.keep(Seq(2), &encoding(0, 10 * small), 1, small);
        assert_eq!(tail.next(), next);
    }

    #[test]
    fn memory_stays_within_the_bound_and_the_newest_are_kept() {
        let mut tails = EncodedTails::default();
        let len = 1000;
        let count = 3 * ENCODED_TAIL_BYTES_MAX / len;
        for seq in 1..=count as u64 {
            tails.keep(node(1), Seq(seq), &encoding(seq, len), len);
            assert!(tails.live_bytes() <= ENCODED_TAIL_BYTES_MAX);
        }
        let tail = &tails.tails[&node(1)];
        assert_eq!(tail.next(), Seq(count as u64 + 1));
        assert_eq!(tail.ends.len(), ENCODED_TAIL_BYTES_MAX / len);
        // The buffer is compacted: never much more than twice the bound.
        assert!(tail.bytes.len() <= 2 * ENCODED_TAIL_BYTES_MAX + len);
        let mut batch = EncodedEvents::default();
        let last = count as u64;
        assert_eq!(
            tails
                .lend(node(1), Seq(last - 1), 10, usize::MAX, &mut batch)
                .events,
            1
        );
        assert_eq!(batch.bytes(), &encoding(last, len)[..]);
        // An encoding larger than the bound is not kept, and breaks the run.
        tails.keep(
            node(1),
            Seq(last + 1),
            &encoding(0, ENCODED_TAIL_BYTES_MAX + 1),
            1,
        );
        assert_eq!(tails.live_bytes(), 0);
    }
}
