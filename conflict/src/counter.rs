//! A PN-counter's per-origin running totals, the state of the `counter` type and what a `DEL`
//! of a counter observes.
//!
//! It is `crdts::PNCounter`'s state and meaning, kept in two sorted small vectors (`Dots`)
//! where `PNCounter` keeps two `VClock` B-trees: a counter holds a total per origin that wrote
//! it, a handful, and a B-tree allocates a node of about 200 bytes for even one. Its value is
//! summed in `i128`, where `PNCounter::read` builds a `BigInt`. It encodes as the `PNCounter`
//! it stands for (a struct of two `GCounter`s, each a struct of one `VClock`), so stored and
//! sent states and operations keep their bytes.

use crdts::Dot;
use serde::{Deserialize, Serialize};

use crate::dots::Dots;
use crate::value::Direction;
use crate::NodeId;

/// Per origin, the greatest running total of its increments and of its decrements. See the
/// module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename = "PNCounter")]
pub struct CounterTotals {
    p: GCounterTotals,
    n: GCounterTotals,
}

/// One direction's totals, named and nested as `crdts::GCounter` is, for the encoding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename = "GCounter")]
struct GCounterTotals {
    inner: Dots,
}

impl CounterTotals {
    /// No totals: a counter at zero that nobody wrote.
    pub fn new() -> CounterTotals {
        CounterTotals::default()
    }

    /// `origin`'s running total in `direction` becomes at least `total` (a total below the one
    /// held is a duplicate or a reordering, and changes nothing).
    pub fn advance(&mut self, origin: NodeId, direction: Direction, total: u64) {
        let totals = match direction {
            Direction::Up => &mut self.p.inner,
            Direction::Down => &mut self.n.inner,
        };
        totals.apply(Dot::new(origin, total));
    }

    /// `origin`'s running total of increments, 0 if it has none.
    pub fn up(&self, origin: NodeId) -> u64 {
        self.p.inner.get(origin)
    }

    /// `origin`'s running total of decrements, 0 if it has none.
    pub fn down(&self, origin: NodeId) -> u64 {
        self.n.inner.get(origin)
    }

    /// Increments minus decrements over every origin. Each total is a `u64` and a mesh has at
    /// most a few hundred origins, far inside `i128`; it saturates rather than wraps should a
    /// damaged state carry more.
    pub fn value(&self) -> i128 {
        let sum = |totals: &Dots| {
            totals.iter().fold(0i128, |sum, &(_, total)| {
                sum.saturating_add(i128::from(total))
            })
        };
        sum(&self.p.inner).saturating_sub(sum(&self.n.inner))
    }

    /// Takes the greater of each origin's totals here and in `other` (state-based merge).
    pub fn merge(&mut self, other: &CounterTotals) {
        self.p.inner.merge(&other.p.inner);
        self.n.inner.merge(&other.n.inner);
    }

    /// How many totals are held: one per origin and direction.
    pub fn origins(&self) -> usize {
        self.p.inner.len() + self.n.inner.len()
    }

    /// Whether no origin has a total.
    pub fn is_empty(&self) -> bool {
        self.p.inner.is_empty() && self.n.inner.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crdts::{CmRDT, CvRDT, PNCounter};
    use proptest::prelude::*;

    /// A counter write: an origin, a direction, and a running total.
    fn step() -> impl Strategy<Value = (u64, bool, u64)> {
        (1..5u64, any::<bool>(), prop_oneof![0..8u64, Just(u64::MAX)])
    }

    /// `totals` as `PNCounter` holds them, written through its own operations.
    fn pncounter_of(steps: &[(u64, bool, u64)]) -> PNCounter<NodeId> {
        let mut counter = PNCounter::new();
        for &(origin, up, total) in steps {
            let dot = Dot::new(NodeId(origin), total);
            let dir = match up {
                true => crdts::pncounter::Dir::Pos,
                false => crdts::pncounter::Dir::Neg,
            };
            counter.apply(crdts::pncounter::Op { dot, dir });
        }
        counter
    }

    fn totals_of(steps: &[(u64, bool, u64)]) -> CounterTotals {
        let mut totals = CounterTotals::new();
        for &(origin, up, total) in steps {
            let direction = if up { Direction::Up } else { Direction::Down };
            totals.advance(NodeId(origin), direction, total);
        }
        totals
    }

    proptest! {
        /// The totals answer, merge and encode as the `PNCounter` written with the same
        /// operations.
        #[test]
        fn totals_behave_and_encode_as_a_pncounter(
            ours in prop::collection::vec(step(), 0..16),
            theirs in prop::collection::vec(step(), 0..16),
        ) {
            let totals = totals_of(&ours);
            let counter = pncounter_of(&ours);
            prop_assert_eq!(totals.is_empty(), counter == PNCounter::new());
            let read = counter.read();
            prop_assert_eq!(num_bigint::BigInt::from(totals.value()), read);
            for origin in 0..6 {
                let origin = NodeId(origin);
                prop_assert_eq!(totals.up(origin), counter.inc_many(origin, 0).dot.counter);
                prop_assert_eq!(totals.down(origin), counter.dec_many(origin, 0).dot.counter);
            }

            let mut merged = totals.clone();
            merged.merge(&totals_of(&theirs));
            let mut merged_counter = counter.clone();
            merged_counter.merge(pncounter_of(&theirs));
            prop_assert_eq!(
                num_bigint::BigInt::from(merged.value()),
                merged_counter.read()
            );
            prop_assert_eq!(merged == totals, merged_counter == counter);

            for (totals, counter) in [(&totals, &counter), (&merged, &merged_counter)] {
                crate::test_encoding::assert_encodes_as_also_in_json(totals, counter);
            }
        }
    }
}
