//! Add-wins observed-remove set of byte strings, on `crdts`' `VClock` and `Dot`.
//!
//! The algorithm is the ORSWOT's (an observed-remove set without tombstones): every add is
//! witnessed by a dot `(origin, n)`, each member keeps the dots of its live adds, and a remove
//! carries the clock of what the remover had seen, so it removes exactly those dots and no
//! concurrent add. `crdts::Orswot` implements the same algorithm but keeps its state in
//! `HashMap`s (iteration order and encoded bytes differ from process to process, which would leak
//! into replies, digests and simulator traces) and cannot remove "everything observed" by a clock
//! alone, which `DEL` needs to stay bounded in size. This type keeps the state in sorted maps and
//! adds [`AwSet::remove_all`].
//!
//! ```text
//!  add(dot, members) ── dot <= clock? ──yes──► already seen (or removed): nothing
//!                          │no
//!                          ▼
//!             members[m] += dot unless pending[m] covers it; clock += dot
//!
//!  remove(observed, members) ──► drop the members' dots <= observed
//!                                observed not <= clock? ──► pending[m] |= observed
//!                                (an add it saw has not arrived yet: suppress it when it does)
//!
//!  remove_all(observed) ───────► drop every dot <= observed; clock |= observed
//! ```
//!
//! Op-based application assumes each origin's operations arrive in the order that origin issued
//! them (the replication protocol guarantees it); duplicates and any interleaving of origins are
//! harmless. State-based [`AwSet::merge`] needs no ordering at all.
//!
//! A member's dots, and the set's clock, are `Dots`, not `VClock`s: a member holds one dot per
//! origin that added it concurrently, usually one, and a clock one per origin that ever added,
//! a handful; a `VClock` would keep even one in a B-tree node of its own (about 200 bytes). They
//! encode as the `VClock` they stand for.
//!
//! Members and pending removes are kept in `SmallMap`s: sorted vectors while a set has a handful
//! of members, which a search of one short array finds, where a B-tree allocates a node for
//! eleven (about 550 bytes for a set of two); B-trees once it has many. They encode as the
//! `BTreeMap`s they stand for.

use crate::dots::Dots;
use crate::small_map::SmallMap;
use crate::{NodeId, StateBytes};
use bytes::Bytes;
use crdts::{CmRDT, CvRDT, Dot, VClock};
use serde::{Deserialize, Serialize};

/// The most bytes one dot (an origin and a counter, two varints) takes encoded.
pub(crate) const DOT_BYTES_MAX: usize = 18;

/// The most bytes an entry's framing takes encoded, beside its member's bytes and its dots:
/// its member's length (at most 5 bytes as a varint: members are far below 4 GiB) and its dots'
/// count (at most 3).
pub(crate) const ENTRY_BYTES_MAX: usize = 8;

/// An add-wins observed-remove set. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwSet {
    /// Every add dot this replica has seen (applied, or known to be removed).
    clock: Dots,
    /// Live members, each with the dots of its adds that no remove has covered.
    /// Invariant: no entry is empty.
    entries: SmallMap<StateBytes, Dots>,
    /// Removes whose observed clock is ahead of `clock`: the adds they cover have not all
    /// arrived yet, and must be suppressed when they do. Invariant: no entry is `<= clock`.
    pending: SmallMap<StateBytes, VClock<NodeId>>,
}

impl AwSet {
    /// Whether `member` is in the set.
    pub fn contains(&self, member: &[u8]) -> bool {
        self.entries.contains_key(member)
    }

    /// The members, in byte order.
    pub fn members(&self) -> impl Iterator<Item = &[u8]> {
        self.entries.keys().map(StateBytes::as_bytes)
    }

    /// The members, in byte order, handed over.
    pub fn into_members(self) -> impl Iterator<Item = StateBytes> {
        self.entries.into_iter().map(|(member, _)| member)
    }

    /// How many members the set holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the set holds no member.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// At least the bytes the set takes encoded (see [`KeyState::size_bytes`]).
    ///
    /// [`KeyState::size_bytes`]: crate::value::KeyState::size_bytes
    pub fn size_bytes(&self) -> usize {
        let entry = |bytes: usize, dots: usize| bytes + ENTRY_BYTES_MAX + dots * DOT_BYTES_MAX;
        let members: usize = self
            .entries
            .iter()
            .map(|(member, dots)| entry(member.len(), dots.len()))
            .sum();
        let pending: usize = self
            .pending
            .iter()
            .map(|(member, clock)| entry(member.len(), clock.dots.len()))
            .sum();
        self.clock.len() * DOT_BYTES_MAX + members + pending
    }

    /// Every add dot seen: what a remove of everything would observe.
    pub fn clock(&self) -> VClock<NodeId> {
        self.clock.to_vclock()
    }

    /// The dots that make `members` present: what removing them observes.
    pub fn observed(&self, members: &[Bytes]) -> VClock<NodeId> {
        let mut observed = VClock::new();
        for member in members {
            if let Some(dots) = self.entries.get(&member[..]) {
                for &(actor, counter) in dots.iter() {
                    observed.apply(Dot::new(actor, counter));
                }
            }
        }
        observed
    }

    /// The counter of the next add dot `origin` would issue on this set.
    pub fn next_counter(&self, origin: NodeId) -> u64 {
        self.clock.get(origin) + 1
    }

    /// Applies an add of `members` witnessed by `dot`.
    pub fn add(&mut self, dot: Dot<NodeId>, members: &[Bytes]) {
        if self.clock.get(dot.actor) >= dot.counter {
            return; // seen before: a duplicate, or covered by a remove of everything
        }
        for member in members {
            let covered = self
                .pending
                .get(&member[..])
                .is_some_and(|p| p.get(&dot.actor) >= dot.counter);
            if !covered {
                match self.entries.get_mut(&member[..]) {
                    Some(dots) => dots.apply(dot),
                    // Looked up by its bytes first: the member is copied only when it is new.
                    None => {
                        let mut dots = Dots::default();
                        dots.apply(dot);
                        self.entries.insert(StateBytes::from(&member[..]), dots);
                    }
                }
            }
        }
        self.clock.apply(dot);
        self.prune_pending();
    }

    /// Applies a remove of `members` that observed the dots in `observed`.
    pub fn remove(&mut self, observed: &VClock<NodeId>, members: &[Bytes]) {
        // Not `<=` (partial order): some dot it observed has not arrived here yet.
        let ahead = !self.clock.covers(observed);
        for member in members {
            if let Some(dots) = self.entries.get_mut(&member[..]) {
                dots.reset_remove(observed);
                if dots.is_empty() {
                    self.entries.remove(&member[..]);
                }
            }
            if ahead {
                self.pending
                    .get_or_insert_default(StateBytes::from(&member[..]))
                    .merge(observed.clone());
            }
        }
        self.prune_pending();
    }

    /// Applies a remove of every member, observing the dots in `observed`.
    pub fn remove_all(&mut self, observed: &VClock<NodeId>) {
        for (_, dots) in self.entries.iter_mut() {
            dots.reset_remove(observed);
        }
        self.entries.retain(|_, dots| !dots.is_empty());
        // An add covered by `observed` that has not arrived yet was seen, and removed, by the
        // remover: marking it seen makes `add` ignore it when it comes.
        self.clock.merge_clock(observed);
        self.prune_pending();
    }

    /// State-based merge: the least upper bound of two replicas of the set.
    pub fn merge(&mut self, other: &AwSet) {
        let ours = std::mem::take(&mut self.entries);
        let mut merged: SmallMap<StateBytes, Dots> = SmallMap::default();
        for (member, dots) in &ours {
            let theirs = other.entries.get(member);
            let kept = merge_dots(dots, &self.clock, theirs, &other.clock);
            if !kept.is_empty() {
                merged.insert(member.clone(), kept);
            }
        }
        for (member, dots) in &other.entries {
            if ours.contains_key(member) {
                continue;
            }
            let kept = merge_dots(dots, &other.clock, None, &self.clock);
            if !kept.is_empty() {
                merged.insert(member.clone(), kept);
            }
        }
        self.entries = merged;
        self.clock.merge(&other.clock);
        for (member, observed) in &other.pending {
            self.pending
                .get_or_insert_default(member.clone())
                .merge(observed.clone());
        }
        for (member, observed) in &self.pending {
            if let Some(dots) = self.entries.get_mut(member) {
                dots.reset_remove(observed);
                if dots.is_empty() {
                    self.entries.remove(member);
                }
            }
        }
        self.prune_pending();
    }

    /// Drops pending removes whose every covered add has arrived.
    fn prune_pending(&mut self) {
        let clock = &self.clock;
        self.pending.retain(|_, observed| !clock.covers(observed));
    }
}

/// The dots of one member that survive a merge: a dot survives if both sides hold it, or if one
/// side holds it and the other has never seen it (had the other seen it and not kept it, the
/// other removed it).
fn merge_dots(ours: &Dots, our_clock: &Dots, theirs: Option<&Dots>, their_clock: &Dots) -> Dots {
    let mut kept = Dots::default();
    for &(actor, counter) in ours.iter() {
        let in_both = theirs.is_some_and(|t| t.get(actor) == counter);
        if in_both || their_clock.get(actor) < counter {
            kept.apply(Dot::new(actor, counter));
        }
    }
    if let Some(theirs) = theirs {
        for &(actor, counter) in theirs.iter() {
            if our_clock.get(actor) < counter {
                kept.apply(Dot::new(actor, counter));
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);

    fn m(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn clock(dots: &[(NodeId, u64)]) -> VClock<NodeId> {
        let mut c = VClock::new();
        for (actor, counter) in dots {
            c.apply(Dot::new(*actor, *counter));
        }
        c
    }

    #[test]
    fn remove_before_its_add_arrives_suppresses_the_add() {
        let mut set = AwSet::default();
        set.remove(&clock(&[(A, 1)]), &[m("x")]);
        set.add(Dot::new(A, 1), &[m("x")]);
        assert!(!set.contains(b"x"));
        assert!(
            set.pending.is_empty(),
            "pending remove must be pruned once its add arrived"
        );
        set.add(Dot::new(A, 2), &[m("x")]);
        assert!(set.contains(b"x"));
    }

    #[test]
    fn remove_all_before_the_adds_arrive_suppresses_them_and_spares_later_ones() {
        let mut set = AwSet::default();
        set.remove_all(&clock(&[(A, 2)]));
        set.add(Dot::new(A, 1), &[m("x")]);
        set.add(Dot::new(A, 2), &[m("y")]);
        set.add(Dot::new(A, 3), &[m("z")]);
        assert_eq!(set.members().collect::<Vec<_>>(), vec![&b"z"[..]]);
    }

    #[test]
    fn concurrent_add_survives_remove() {
        let mut a = AwSet::default();
        a.add(Dot::new(A, 1), &[m("x")]);
        let mut b = a.clone();
        b.remove(&b.observed(&[m("x")]), &[m("x")]);
        a.add(Dot::new(A, 2), &[m("x")]);
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert!(ab.contains(b"x"));
        assert_eq!(ab, ba);
    }

    #[test]
    fn merge_drops_what_the_other_side_removed() {
        let mut a = AwSet::default();
        a.add(Dot::new(A, 1), &[m("x")]);
        a.add(Dot::new(B, 1), &[m("y")]);
        let mut b = a.clone();
        b.remove(&b.observed(&[m("x")]), &[m("x")]);
        a.merge(&b);
        assert!(!a.contains(b"x"));
        assert!(a.contains(b"y"));
    }

    /// The set as `BTreeMap`s and a `VClock` held it: the encoding stored and sent states kept
    /// before `SmallMap` and `Dots`, which must not change.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct AwSetInTrees {
        clock: VClock<NodeId>,
        entries: std::collections::BTreeMap<StateBytes, Dots>,
        pending: std::collections::BTreeMap<StateBytes, VClock<NodeId>>,
    }

    /// A set with members added out of order, one removed, and a remove pending for adds that
    /// have not arrived.
    fn set_with_pending() -> AwSet {
        let mut set = AwSet::default();
        set.add(
            Dot::new(A, 1),
            &[m("zz"), m("b"), m("a-member-longer-than-16")],
        );
        set.add(Dot::new(B, 1), &[m("b"), m("c")]);
        set.remove(&set.observed(&[m("c")]), &[m("c")]);
        set.remove(&clock(&[(A, 5)]), &[m("q"), m("b")]);
        assert!(!set.pending.is_empty() && set.len() == 3);
        set
    }

    #[test]
    fn a_set_encodes_and_decodes_as_its_maps_in_trees() {
        let set = set_with_pending();
        let trees = AwSetInTrees {
            clock: set.clock(),
            entries: set
                .entries
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            pending: set
                .pending
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        crate::test_encoding::assert_encodes_as(&set, &trees);
    }

    /// A member count the input cannot back, as a mutated frame or a corrupt stored state may
    /// claim, ends in an error, not in reserving room for it (which would abort the process).
    #[test]
    fn a_claimed_member_count_past_the_input_is_an_error() {
        let config = bincode::config::standard();
        for claimed in [1u64 << 40, u64::MAX] {
            // An empty clock, then the members' count with nothing after it.
            let bytes = bincode::serde::encode_to_vec((0u64, claimed), config).unwrap();
            let decoded = bincode::serde::decode_from_slice::<AwSet, _>(&bytes, config);
            assert!(decoded.is_err(), "{claimed}");
        }
    }

    /// Members out of order or repeated, as a damaged or hostile state may carry them, are read
    /// as a `BTreeMap` reads them: sorted, the last of a repeated member kept.
    #[test]
    fn members_out_of_order_decode_as_a_tree_decodes() {
        let config = bincode::config::standard();
        let dots = |n: u64| Dots::from(clock(&[(A, n)]));
        let entries = vec![
            (StateBytes::from(&b"y"[..]), dots(1)),
            (StateBytes::from(&b"x"[..]), dots(2)),
            (StateBytes::from(&b"y"[..]), dots(3)),
        ];
        let no_pending: Vec<(StateBytes, VClock<NodeId>)> = Vec::new();
        let bytes =
            bincode::serde::encode_to_vec((clock(&[(A, 3)]), entries, no_pending), config).unwrap();
        let (set, _): (AwSet, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
        let (trees, _): (AwSetInTrees, usize) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        let held: Vec<_> = set
            .entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let want: Vec<_> = trees.entries.into_iter().collect();
        assert_eq!(held, want);
        assert_eq!(
            held,
            vec![
                (StateBytes::from(&b"x"[..]), dots(2)),
                (StateBytes::from(&b"y"[..]), dots(3))
            ]
        );
    }
}
