//! Identifiers and version vectors.

use std::fmt;

use serde::{Deserialize, Serialize};

pub use braid_conflict::NodeId;

/// A position in one origin's sequence of change events. Dense: an origin's first event is 1,
/// its next 2, and so on; 0 means "none yet".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Seq(pub u64);

impl Seq {
    /// No event yet.
    pub const ZERO: Seq = Seq(0);

    /// The sequence number after this one. Every number a node accepts is at most
    /// [`SEQ_MAX`](crate::limits::SEQ_MAX) (checked where events and vectors are received), so
    /// there always is one.
    pub fn next(self) -> Seq {
        assert!(self.0 < u64::MAX, "sequence number {} has no next", self.0);
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Identifies a cluster: 16 random bytes chosen at `braid init`. Nodes of different clusters
/// refuse each other at the handshake, even with certificates from one CA.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ClusterId(pub [u8; 16]);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Per origin, the highest sequence number applied contiguously (every event up to it is applied).
/// Origins absent from the map are at [`Seq::ZERO`].
///
/// Kept as a vector of entries sorted by origin: a mesh has a handful of origins (at most
/// [`crate::limits::VECTOR_ENTRIES_MAX`] on the wire), read on every apply and copied into
/// every commit and acknowledgement, where a small sorted array is several times cheaper than
/// a tree. It is encoded as a map, as before: the wire and stored formats are unchanged.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct VersionVector(Vec<(NodeId, Seq)>);

/// Origins up to which [`VersionVector`] finds an origin by scanning rather than by halves.
const POSITION_SCAN_MAX: usize = 16;

impl VersionVector {
    /// An empty vector: nothing applied.
    pub fn new() -> VersionVector {
        VersionVector::default()
    }

    /// Where `origin` is, or would be inserted. A vector names a region or a few: a scan from
    /// the front finds them sooner than halving does; a long one is searched by halves.
    fn position(&self, origin: NodeId) -> Result<usize, usize> {
        // Node ids are handed out from 1 up, and a vector usually names every node: node `n`
        // is then the `n`th entry. One look there, before any search.
        let guess = usize::try_from(origin.0.wrapping_sub(1)).unwrap_or(usize::MAX);
        if self.0.get(guess).is_some_and(|(o, _)| *o == origin) {
            return Ok(guess);
        }
        if self.0.len() > POSITION_SCAN_MAX {
            return self.0.binary_search_by_key(&origin, |(o, _)| *o);
        }
        match self.0.iter().position(|(o, _)| *o >= origin) {
            Some(at) if self.0[at].0 == origin => Ok(at),
            Some(at) => Err(at),
            None => Err(self.0.len()),
        }
    }

    /// The vector of `entries` as a map would hold them: a repeated origin takes its last value.
    pub(crate) fn from_entries(mut entries: Vec<(NodeId, Seq)>) -> VersionVector {
        // What a vector encodes to: taken as it is, without sorting or copying.
        if entries.windows(2).all(|w| w[0].0 < w[1].0) {
            return VersionVector(entries);
        }
        // Stable: the entries of one origin stay in their order, and the last is kept.
        entries.sort_by_key(|(origin, _)| *origin);
        let mut kept: Vec<(NodeId, Seq)> = Vec::with_capacity(entries.len());
        for entry in entries {
            match kept.last_mut() {
                Some(last) if last.0 == entry.0 => *last = entry,
                _ => kept.push(entry),
            }
        }
        VersionVector(kept)
    }

    /// Whether the vector names `origin`.
    pub fn contains(&self, origin: NodeId) -> bool {
        self.position(origin).is_ok()
    }

    /// The highest contiguous sequence number applied from `origin`.
    pub fn get(&self, origin: NodeId) -> Seq {
        self.position(origin).map_or(Seq::ZERO, |at| self.0[at].1)
    }

    /// Records that everything from `origin` up to `seq` is applied. Never moves backwards.
    pub fn advance(&mut self, origin: NodeId, seq: Seq) {
        match self.position(origin) {
            Ok(at) => self.0[at].1 = self.0[at].1.max(seq),
            Err(at) => self.0.insert(at, (origin, seq)),
        }
    }

    /// Pointwise maximum: one pass over both sorted vectors, however many origins either names.
    pub fn merge(&mut self, other: &VersionVector) {
        // The usual case: every origin of `other` is already here, and nothing moves. One walk
        // over both, raising in place; on the first origin missing here, the full merge below
        // (the entries raised so far are raised again to the same values).
        let mut ours = self.0.iter_mut().peekable();
        let all_here = other.0.iter().all(|&(origin, seq)| {
            while ours.next_if(|(o, _)| *o < origin).is_some() {}
            match ours.peek_mut() {
                Some((o, held)) if *o == origin => {
                    *held = (*held).max(seq);
                    true
                }
                _ => false,
            }
        });
        if all_here {
            return;
        }
        let mut merged = Vec::with_capacity(self.0.len() + other.0.len());
        let (ours, theirs) = (&self.0, &other.0);
        let (mut i, mut j) = (0, 0);
        while i < ours.len() && j < theirs.len() {
            let (a, b) = (ours[i], theirs[j]);
            if a.0 == b.0 {
                merged.push((a.0, a.1.max(b.1)));
                i += 1;
                j += 1;
            } else if a.0 < b.0 {
                merged.push(a);
                i += 1;
            } else {
                merged.push(b);
                j += 1;
            }
        }
        merged.extend_from_slice(&ours[i..]);
        merged.extend_from_slice(&theirs[j..]);
        self.0 = merged;
    }

    /// Whether this vector has applied everything `other` has. One pass over both, in origin
    /// order (a replica checks it after every input).
    pub fn dominates(&self, other: &VersionVector) -> bool {
        let mut mine = self.0.iter().peekable();
        other.0.iter().all(|&(origin, seq)| {
            while mine.next_if(|(o, _)| *o < origin).is_some() {}
            match mine.peek() {
                Some(&&(o, held)) if o == origin => held >= seq,
                _ => seq == Seq::ZERO,
            }
        })
    }

    /// The origins and their sequence numbers, in origin order.
    pub fn iter(&self) -> impl Iterator<Item = (NodeId, Seq)> + '_ {
        self.0.iter().copied()
    }

    /// How many origins the vector names.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the vector names no origin.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(NodeId, Seq)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (NodeId, Seq)>>(iter: I) -> VersionVector {
        let mut vector = VersionVector::new();
        for (origin, seq) in iter {
            vector.advance(origin, seq);
        }
        vector
    }
}

impl fmt::Debug for VersionVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(o, s)| (o, s)))
            .finish()
    }
}

impl Serialize for VersionVector {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(o, s)| (o, s)))
    }
}

impl<'de> Deserialize<'de> for VersionVector {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;

        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = VersionVector;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map from origin to sequence number")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<VersionVector, A::Error> {
                // Bounded by what the caller's decoder allows (a frame checks the entry limit
                // after decoding); sorted once at the end, so that no order of entries makes
                // decoding quadratic.
                let hint = map.size_hint().unwrap_or(0);
                let mut entries = Vec::with_capacity(hint.min(crate::limits::VECTOR_ENTRIES_MAX));
                while let Some(entry) = map.next_entry::<NodeId, Seq>()? {
                    entries.push(entry);
                }
                Ok(VersionVector::from_entries(entries))
            }
        }

        deserializer.deserialize_map(Entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn config() -> bincode::config::Configuration {
        bincode::config::standard()
    }

    #[test]
    fn a_vector_encodes_as_the_map_it_stands_for() {
        let vector: VersionVector = [
            (NodeId(3), Seq(9)),
            (NodeId(1), Seq(4)),
            (NodeId(2), Seq(0)),
        ]
        .into_iter()
        .collect();
        let map: BTreeMap<NodeId, Seq> = vector.iter().collect();
        let bytes = bincode::serde::encode_to_vec(&vector, config()).unwrap();
        assert_eq!(
            bytes,
            bincode::serde::encode_to_vec(&map, config()).unwrap()
        );
        let (back, _): (VersionVector, usize) =
            bincode::serde::decode_from_slice(&bytes, config()).unwrap();
        assert_eq!(back, vector);
        assert_eq!(format!("{vector:?}"), format!("{map:?}"));
    }

    #[test]
    fn a_decoded_vector_is_sorted_and_a_repeated_origin_takes_its_last_value() {
        // Entries as a peer could send them: out of order, one origin twice.
        let entries = [(5u64, 1u64), (2, 7), (5, 3), (1, 2)];
        let mut bytes = bincode::serde::encode_to_vec(entries.len() as u64, config()).unwrap();
        for (origin, seq) in entries {
            bytes.extend(bincode::serde::encode_to_vec((origin, seq), config()).unwrap());
        }
        let (vector, _): (VersionVector, usize) =
            bincode::serde::decode_from_slice(&bytes, config()).unwrap();
        let got: Vec<(NodeId, Seq)> = vector.iter().collect();
        assert_eq!(
            got,
            [
                (NodeId(1), Seq(2)),
                (NodeId(2), Seq(7)),
                (NodeId(5), Seq(3))
            ]
        );
    }

    #[test]
    fn entries_in_order_are_kept_and_a_repeat_in_order_takes_its_last_value() {
        let vector = |entries: &[(u64, u64)]| {
            VersionVector::from_entries(entries.iter().map(|&(o, s)| (NodeId(o), Seq(s))).collect())
        };
        let kept = |v: VersionVector| v.iter().map(|(o, s)| (o.0, s.0)).collect::<Vec<_>>();
        assert_eq!(
            kept(vector(&[(1, 2), (4, 7), (9, 1)])),
            [(1, 2), (4, 7), (9, 1)]
        );
        assert_eq!(kept(vector(&[(1, 2), (4, 7), (4, 3)])), [(1, 2), (4, 3)]);
        assert_eq!(kept(vector(&[])), []);
    }

    fn model(entries: &[(u64, u64)]) -> BTreeMap<u64, u64> {
        let mut map: BTreeMap<u64, u64> = BTreeMap::new();
        for &(origin, seq) in entries {
            let slot = map.entry(origin).or_default();
            *slot = (*slot).max(seq);
        }
        map
    }

    fn vector_of(entries: &[(u64, u64)]) -> VersionVector {
        let mut vector = VersionVector::new();
        for &(origin, seq) in entries {
            vector.advance(NodeId(origin), Seq(seq));
        }
        vector
    }

    proptest::proptest! {
        /// Lookups, advances and domination agree with a map, for vectors short enough to be
        /// scanned and long enough to be searched by halves, zeros included.
        #[test]
        fn a_vector_answers_as_a_map_of_its_origins(
            a in proptest::collection::vec((0u64..48, 0u64..4), 0..40),
            b in proptest::collection::vec((0u64..48, 0u64..4), 0..40),
        ) {
            let (va, vb) = (vector_of(&a), vector_of(&b));
            let (ma, mb) = (model(&a), model(&b));
            for origin in 0..50 {
                let want = ma.get(&origin).copied().unwrap_or(0);
                proptest::prop_assert_eq!(va.get(NodeId(origin)), Seq(want));
            }
            let dominates = mb
                .iter()
                .all(|(origin, seq)| ma.get(origin).copied().unwrap_or(0) >= *seq);
            proptest::prop_assert_eq!(va.dominates(&vb), dominates);
            proptest::prop_assert!(va.dominates(&va));
            proptest::prop_assert!(va.dominates(&VersionVector::new()));
        }
    }

    #[test]
    fn merging_interleaved_origins_is_the_pointwise_maximum() {
        let a: VersionVector = (0..40u64).step_by(3).map(|n| (NodeId(n), Seq(n))).collect();
        let b: VersionVector = (0..40u64)
            .step_by(2)
            .map(|n| (NodeId(n), Seq(40 - n)))
            .collect();
        let mut expected: BTreeMap<NodeId, Seq> = a.iter().collect();
        for (origin, seq) in b.iter() {
            let slot = expected.entry(origin).or_default();
            *slot = (*slot).max(seq);
        }
        let mut merged = a.clone();
        merged.merge(&b);
        assert_eq!(merged.iter().collect::<BTreeMap<_, _>>(), expected);
        assert!(merged
            .iter()
            .zip(merged.iter().skip(1))
            .all(|(x, y)| x.0 < y.0));
        assert!(merged.dominates(&a) && merged.dominates(&b));
    }

    proptest::proptest! {
        /// Any two vectors, often one naming only origins the other names (the fast path) and
        /// often not: the merge is the pointwise maximum, in origin order.
        #[test]
        fn merge_is_the_pointwise_maximum(
            a in proptest::collection::btree_map(0u64..8, 0u64..20, 0..6),
            b in proptest::collection::btree_map(0u64..8, 0u64..20, 0..6),
        ) {
            let vector = |m: &BTreeMap<u64, u64>| -> VersionVector {
                m.iter().map(|(&o, &s)| (NodeId(o), Seq(s))).collect()
            };
            let mut expected = a.clone();
            for (&origin, &seq) in &b {
                let slot = expected.entry(origin).or_default();
                *slot = (*slot).max(seq);
            }
            let mut merged = vector(&a);
            merged.merge(&vector(&b));
            proptest::prop_assert_eq!(merged, vector(&expected));
        }
    }

    #[test]
    fn advance_merge_and_dominates_are_pointwise() {
        let mut a = VersionVector::new();
        a.advance(NodeId(2), Seq(5));
        a.advance(NodeId(1), Seq(3));
        a.advance(NodeId(2), Seq(4));
        assert_eq!(
            (a.get(NodeId(1)), a.get(NodeId(2)), a.get(NodeId(9))),
            (Seq(3), Seq(5), Seq(0))
        );
        let b: VersionVector = [(NodeId(3), Seq(1)), (NodeId(1), Seq(6))]
            .into_iter()
            .collect();
        assert!(!a.dominates(&b) && !b.dominates(&a));
        a.merge(&b);
        assert!(a.dominates(&b));
        let got: Vec<(NodeId, Seq)> = a.iter().collect();
        assert_eq!(
            got,
            [
                (NodeId(1), Seq(6)),
                (NodeId(2), Seq(5)),
                (NodeId(3), Seq(1))
            ]
        );
    }
}
