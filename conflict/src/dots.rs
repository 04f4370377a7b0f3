//! `Dots`: a `crdts::VClock`'s dots in a sorted small vector, for the clocks a state keeps
//! many of. A set member's add dots (usually one), a set's clock and a counter's totals (one
//! per origin that wrote, a handful) are `Dots`; a `VClock` would keep even one dot in a
//! B-tree node of its own (about 200 bytes). `Dots` keep a `VClock`'s meaning and encode as
//! one, so stored and sent states read the same either way.

use crdts::{CmRDT, Dot, VClock};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::NodeId;

/// Dots, at most one per origin, sorted by origin, each the origin's greatest: the add dots of
/// one member, a set's clock, or a counter's totals in one direction. See the module
/// documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "VClock<NodeId>")]
pub(crate) struct Dots(SmallVec<[(NodeId, u64); 1]>);

/// Written as `VClock` derives it (a struct whose one field, `dots`, is a map), straight from
/// the dots: a state is encoded for every digest, and a `VClock` made first would cost a tree.
impl Serialize for Dots {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct DotMap<'a>(&'a [(NodeId, u64)]);
        impl Serialize for DotMap<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_map(self.0.iter().map(|(actor, counter)| (actor, counter)))
            }
        }
        let mut clock = serializer.serialize_struct("VClock", 1)?;
        clock.serialize_field("dots", &DotMap(&self.0))?;
        clock.end()
    }
}

impl Dots {
    /// The counter of `actor`'s dot, 0 if it has none.
    pub(crate) fn get(&self, actor: NodeId) -> u64 {
        self.0
            .iter()
            .find(|(a, _)| *a == actor)
            .map_or(0, |&(_, counter)| counter)
    }

    /// Notes `dot`: its origin's counter becomes the greater of the two (as `VClock::apply`).
    pub(crate) fn apply(&mut self, dot: Dot<NodeId>) {
        match self.0.binary_search_by_key(&dot.actor, |&(actor, _)| actor) {
            Ok(at) => self.0[at].1 = self.0[at].1.max(dot.counter),
            Err(at) if dot.counter > 0 => self.0.insert(at, (dot.actor, dot.counter)),
            Err(_) => {}
        }
    }

    /// Drops the dots `observed` covers: those of its actors at or below its counter (as
    /// `VClock::reset_remove`).
    pub(crate) fn reset_remove(&mut self, observed: &VClock<NodeId>) {
        self.0
            .retain(|(actor, counter)| observed.dots.get(actor).is_none_or(|seen| seen < counter));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &(NodeId, u64)> {
        self.0.iter()
    }

    /// Whether every dot of `observed` is here, at or below its origin's counter: `observed <=
    /// self` in a `VClock`'s partial order.
    pub(crate) fn covers(&self, observed: &VClock<NodeId>) -> bool {
        observed
            .dots
            .iter()
            .all(|(&actor, &counter)| self.get(actor) >= counter)
    }

    /// Notes every dot of `other` (as `VClock::merge`).
    pub(crate) fn merge(&mut self, other: &Dots) {
        for &(actor, counter) in other.iter() {
            self.apply(Dot::new(actor, counter));
        }
    }

    /// Notes every dot of `observed` (as `VClock::merge`).
    pub(crate) fn merge_clock(&mut self, observed: &VClock<NodeId>) {
        for (&actor, &counter) in &observed.dots {
            self.apply(Dot::new(actor, counter));
        }
    }

    /// The same dots as a `VClock`.
    pub(crate) fn to_vclock(&self) -> VClock<NodeId> {
        let mut clock = VClock::new();
        for &(actor, counter) in self.iter() {
            clock.apply(Dot::new(actor, counter));
        }
        clock
    }
}

impl From<VClock<NodeId>> for Dots {
    fn from(clock: VClock<NodeId>) -> Dots {
        // A clock's dots come in actor order, one per actor: the invariant holds as they are.
        Dots(clock.dots.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use crdts::CvRDT;
    use proptest::prelude::*;

    use super::*;

    /// One step on a member's dots: a dot applied, or a remove observing a clock.
    #[derive(Debug, Clone)]
    enum DotsStep {
        Apply(u64, u64),
        Remove(Vec<(u64, u64)>),
    }

    fn dots_step() -> impl Strategy<Value = DotsStep> {
        prop_oneof![
            (1..5u64, 0..6u64).prop_map(|(actor, counter)| DotsStep::Apply(actor, counter)),
            prop::collection::vec((1..5u64, 0..6u64), 0..4).prop_map(DotsStep::Remove),
        ]
    }

    fn vclock_of(dots: &[(u64, u64)]) -> VClock<NodeId> {
        VClock {
            dots: dots.iter().map(|&(a, c)| (NodeId(a), c)).collect(),
        }
    }

    proptest! {
        /// Dots answer as the `VClock` they stand for, step by step, compare and merge with
        /// another as it does, and encode as it.
        #[test]
        fn dots_behave_and_encode_as_a_vclock(
            steps in prop::collection::vec(dots_step(), 0..24),
            other in prop::collection::vec((1..5u64, 1..6u64), 0..4),
        ) {
            let mut dots = Dots::default();
            let mut clock = VClock::<NodeId>::new();
            for step in steps {
                match step {
                    DotsStep::Apply(actor, counter) => {
                        dots.apply(Dot::new(NodeId(actor), counter));
                        clock.apply(Dot::new(NodeId(actor), counter));
                    }
                    DotsStep::Remove(observed) => {
                        let observed = vclock_of(&observed);
                        dots.reset_remove(&observed);
                        crdts::ResetRemove::reset_remove(&mut clock, &observed);
                    }
                }
                let held: Vec<(NodeId, u64)> = dots.iter().copied().collect();
                let want: Vec<(NodeId, u64)> = clock.dots.iter().map(|(a, c)| (*a, *c)).collect();
                prop_assert_eq!(&held, &want);
                prop_assert_eq!(dots.is_empty(), clock.is_empty());
                for actor in 0..6 {
                    prop_assert_eq!(dots.get(NodeId(actor)), clock.get(&NodeId(actor)));
                }
            }
            prop_assert_eq!(&dots.to_vclock(), &clock);
            let other = vclock_of(&other);
            prop_assert_eq!(
                dots.covers(&other),
                matches!(
                    other.partial_cmp(&clock),
                    Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
                )
            );
            let mut merged = dots.clone();
            merged.merge_clock(&other);
            let mut want = clock.clone();
            want.merge(other.clone());
            prop_assert_eq!(&merged.to_vclock(), &want);
            let mut merged_dots = dots.clone();
            merged_dots.merge(&Dots::from(other));
            prop_assert_eq!(&merged_dots, &merged);
            crate::test_encoding::assert_encodes_as_also_in_json(&dots, &clock);
        }
    }

    /// Dots out of order or repeated, as a damaged or hostile state may carry them, are read
    /// as a `VClock` reads them: sorted, one per actor.
    #[test]
    fn dots_decode_as_a_vclock_decodes() {
        let config = bincode::config::standard();
        let unsorted: Vec<(u64, u64)> = vec![(2, 1), (1, 4), (2, 3)];
        let bytes = bincode::serde::encode_to_vec(&unsorted, config).unwrap();
        let (dots, _): (Dots, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
        let (clock, _): (VClock<NodeId>, usize) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        let want: Vec<(NodeId, u64)> = clock.dots.into_iter().collect();
        assert_eq!(want, vec![(NodeId(1), 4), (NodeId(2), 3)]);
        assert_eq!(dots.iter().copied().collect::<Vec<_>>(), want);
    }
}
