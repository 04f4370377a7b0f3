//! [`SmallMap`]: the ordered map a state keeps its fields, members and pending removes in. A
//! sorted vector (`litemap`'s `LiteMap`) while it is small, a `BTreeMap` once it is not.
//!
//! Most hashes and sets hold a handful of entries. A B-tree gives even one entry a leaf of eleven
//! slots (about 900 bytes for a hash's fields), and every apply reads a state at random, so the
//! simulator and a node's cache hold fewer states and miss more. A sorted vector holds a few
//! entries in a line or two. But inserting into or removing from a vector shifts what follows:
//! a set of a million members would move megabytes on every `SADD`. So a map moves into a
//! B-tree when it passes [`SMALL_MAP_ENTRIES_MAX`] entries, and back into a vector when it
//! shrinks to half that (not at the bound itself, so that a map hovering there does not convert
//! at every write).
//!
//! Which of the two a map is depends on its history, not only on its entries: two replicas with
//! the same entries may differ. So nothing observes it. Equality compares entries, and both
//! encode exactly as a `BTreeMap` of the same entries does (a map, in key order), so stored and
//! sent states keep their bytes.
//!
//! Decoding never trusts a claimed length. `LiteMap`'s own decoder reserves room for as many
//! entries as its input claims before reading one, so a damaged or hostile length (a frame
//! mutated in flight, a corrupt stored state) would ask the allocator for terabytes and abort the
//! process. Here a claimed length reserves at most [`PREALLOCATED_ENTRIES_MAX`] entries; a longer
//! map grows as its entries are read, and a length the input cannot back ends in a decoding
//! error. Entries out of order are sorted once, in `O(n log n)`, the last of a repeated key kept,
//! as a `BTreeMap` takes them.

use std::borrow::Borrow;
use std::collections::{btree_map, BTreeMap};
use std::fmt;
use std::marker::PhantomData;

use litemap::store::{StoreIterable, StoreIterableMut};
use litemap::LiteMap;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Entries up to which a map is a sorted vector; one more makes it a B-tree.
pub(crate) const SMALL_MAP_ENTRIES_MAX: usize = 32;

/// Entries at or below which a B-tree becomes a sorted vector again.
pub(crate) const SMALL_MAP_ENTRIES_BACK: usize = SMALL_MAP_ENTRIES_MAX / 2;

/// Entries reserved before they are read, whatever length the input claims.
pub(crate) const PREALLOCATED_ENTRIES_MAX: usize = 16;

/// An ordered map: a sorted vector while small, a B-tree while large. See the module
/// documentation.
#[derive(Clone)]
pub(crate) enum SmallMap<K, V> {
    Small(LiteMap<K, V>),
    Large(BTreeMap<K, V>),
}

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap::Small(LiteMap::new())
    }
}

impl<K: Ord, V> SmallMap<K, V> {
    /// How many entries the map holds.
    pub(crate) fn len(&self) -> usize {
        match self {
            SmallMap::Small(map) => map.len(),
            SmallMap::Large(map) => map.len(),
        }
    }

    /// Whether the map holds no entry.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of `key`.
    pub(crate) fn get<Q: Ord + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        match self {
            SmallMap::Small(map) => map.get(key),
            SmallMap::Large(map) => map.get(key),
        }
    }

    /// The value of `key`, to change in place.
    pub(crate) fn get_mut<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        match self {
            SmallMap::Small(map) => map.get_mut(key),
            SmallMap::Large(map) => map.get_mut(key),
        }
    }

    /// Whether `key` has a value.
    pub(crate) fn contains_key<Q: Ord + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.get(key).is_some()
    }

    /// Sets `key` to `value`; returns the value it replaced.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        let replaced = match self {
            SmallMap::Small(map) => map.insert(key, value),
            SmallMap::Large(map) => return map.insert(key, value),
        };
        if self.len() > SMALL_MAP_ENTRIES_MAX {
            self.become_large();
        }
        replaced
    }

    /// The value of `key`, its type's default inserted first if it has none.
    pub(crate) fn get_or_insert_default(&mut self, key: K) -> &mut V
    where
        V: Default,
    {
        if self.len() >= SMALL_MAP_ENTRIES_MAX && !self.contains_key(&key) {
            self.become_large();
        }
        match self {
            SmallMap::Small(map) => map.entry(key).or_default(),
            SmallMap::Large(map) => map.entry(key).or_default(),
        }
    }

    /// Removes `key`; returns its value.
    pub(crate) fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let removed = match self {
            SmallMap::Small(map) => return map.remove(key),
            SmallMap::Large(map) => map.remove(key),
        };
        self.shrink_if_small();
        removed
    }

    /// Keeps the entries for which `keep` is true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        match self {
            SmallMap::Small(map) => return map.retain(keep),
            SmallMap::Large(map) => map.retain(|key, value| keep(key, value)),
        }
        self.shrink_if_small();
    }

    /// The entries, in key order.
    pub(crate) fn iter(&self) -> Iter<'_, K, V> {
        match self {
            SmallMap::Small(map) => Iter::Small(map.iter()),
            SmallMap::Large(map) => Iter::Large(map.iter()),
        }
    }

    /// The entries, in key order, their values to change in place.
    pub(crate) fn iter_mut(&mut self) -> IterMut<'_, K, V> {
        match self {
            SmallMap::Small(map) => IterMut::Small(map.iter_mut()),
            SmallMap::Large(map) => IterMut::Large(map.iter_mut()),
        }
    }

    /// The keys, in order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(key, _)| key)
    }

    /// The values, in key order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, value)| value)
    }

    fn become_large(&mut self) {
        if let SmallMap::Small(map) = self {
            let entries = std::mem::take(map);
            *self = SmallMap::Large(entries.into_iter().collect());
        }
    }

    fn shrink_if_small(&mut self) {
        if let SmallMap::Large(map) = self {
            if map.len() <= SMALL_MAP_ENTRIES_BACK {
                let entries = std::mem::take(map);
                *self = SmallMap::Small(entries.into_iter().collect());
            }
        }
    }
}

/// [`SmallMap::iter`]'s iterator.
pub(crate) enum Iter<'a, K: 'a, V: 'a> {
    Small(<Vec<(K, V)> as StoreIterable<'a, K, V>>::KeyValueIter),
    Large(btree_map::Iter<'a, K, V>),
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Small(entries) => entries.next(),
            Iter::Large(entries) => entries.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Iter::Small(entries) => entries.size_hint(),
            Iter::Large(entries) => entries.size_hint(),
        }
    }
}

/// [`SmallMap::iter_mut`]'s iterator.
pub(crate) enum IterMut<'a, K: 'a, V: 'a> {
    Small(<Vec<(K, V)> as StoreIterableMut<'a, K, V>>::KeyValueIterMut),
    Large(btree_map::IterMut<'a, K, V>),
}

impl<'a, K, V> Iterator for IterMut<'a, K, V> {
    type Item = (&'a K, &'a mut V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            IterMut::Small(entries) => entries.next(),
            IterMut::Large(entries) => entries.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            IterMut::Small(entries) => entries.size_hint(),
            IterMut::Large(entries) => entries.size_hint(),
        }
    }
}

/// [`SmallMap`]'s owning iterator, in key order.
pub(crate) enum IntoIter<K, V> {
    Small(std::vec::IntoIter<(K, V)>),
    Large(btree_map::IntoIter<K, V>),
}

impl<K, V> Iterator for IntoIter<K, V> {
    type Item = (K, V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            IntoIter::Small(entries) => entries.next(),
            IntoIter::Large(entries) => entries.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            IntoIter::Small(entries) => entries.size_hint(),
            IntoIter::Large(entries) => entries.size_hint(),
        }
    }
}

impl<K: Ord, V> IntoIterator for SmallMap<K, V> {
    type Item = (K, V);
    type IntoIter = IntoIter<K, V>;

    fn into_iter(self) -> IntoIter<K, V> {
        match self {
            SmallMap::Small(map) => IntoIter::Small(map.into_iter()),
            SmallMap::Large(map) => IntoIter::Large(map.into_iter()),
        }
    }
}

impl<'a, K: Ord, V> IntoIterator for &'a SmallMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;

    fn into_iter(self) -> Iter<'a, K, V> {
        self.iter()
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for SmallMap<K, V> {
    /// Entries in any order; the last of a repeated key is kept.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(entries: I) -> Self {
        let entries: Vec<(K, V)> = entries.into_iter().collect();
        match entries.len() > SMALL_MAP_ENTRIES_MAX {
            true => SmallMap::Large(entries.into_iter().collect()),
            // Sorted input is taken as it is; other input is sorted once, stably.
            false => SmallMap::Small(entries.into_iter().collect()),
        }
    }
}

/// Entries, not representations: two maps are equal when they hold the same entries.
impl<K: Ord + PartialEq, V: PartialEq> PartialEq for SmallMap<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<K: Ord + Eq, V: Eq> Eq for SmallMap<K, V> {}

impl<K: Ord + fmt::Debug, V: fmt::Debug> fmt::Debug for SmallMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Written as a `BTreeMap` of the same entries writes itself, in every format.
impl<K: Ord + Serialize, V: Serialize> Serialize for SmallMap<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (key, value) in self {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// Read as a `BTreeMap` reads itself: entries in any order, the last of a repeated key kept.
impl<'de, K, V> Deserialize<'de> for SmallMap<K, V>
where
    K: Ord + Deserialize<'de>,
    V: Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<K, V>(PhantomData<(K, V)>);

        impl<'de, K, V> Visitor<'de> for MapVisitor<K, V>
        where
            K: Ord + Deserialize<'de>,
            V: Deserialize<'de>,
        {
            type Value = SmallMap<K, V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let reserve = access.size_hint().unwrap_or(0);
                let mut entries = Vec::with_capacity(reserve.min(PREALLOCATED_ENTRIES_MAX));
                while let Some(entry) = access.next_entry()? {
                    entries.push(entry);
                }
                Ok(entries.into_iter().collect())
            }
        }

        deserializer.deserialize_map(MapVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Step {
        Insert(u16, u32),
        Remove(u16),
        /// Keeps the entries whose value is not divisible by the number.
        Retain(u32),
        Default(u16),
        Add(u16, u32),
    }

    /// Keys over a range wider than the bound, so that maps grow past it and shrink back.
    fn step() -> impl Strategy<Value = Step> {
        let key = 0..80u16;
        prop_oneof![
            6 => (key.clone(), any::<u32>()).prop_map(|(k, v)| Step::Insert(k, v)),
            3 => key.clone().prop_map(Step::Remove),
            1 => (2..6u32).prop_map(Step::Retain),
            1 => key.clone().prop_map(Step::Default),
            2 => (key, any::<u32>()).prop_map(|(k, v)| Step::Add(k, v)),
        ]
    }

    proptest! {
        /// A small map answers as a `BTreeMap` given the same steps, whichever form it is in,
        /// equals any other map of the same entries, and encodes as the tree does.
        #[test]
        fn a_small_map_behaves_and_encodes_as_a_btreemap(
            steps in prop::collection::vec(step(), 0..160)
        ) {
            let mut ours: SmallMap<u16, u32> = SmallMap::default();
            let mut tree: BTreeMap<u16, u32> = BTreeMap::new();
            for step in steps {
                match step {
                    Step::Insert(k, v) => prop_assert_eq!(ours.insert(k, v), tree.insert(k, v)),
                    Step::Remove(k) => prop_assert_eq!(ours.remove(&k), tree.remove(&k)),
                    Step::Retain(d) => {
                        ours.retain(|_, v| v % d != 0);
                        tree.retain(|_, v| *v % d != 0);
                    }
                    Step::Default(k) => {
                        prop_assert_eq!(*ours.get_or_insert_default(k), *tree.entry(k).or_default());
                    }
                    Step::Add(k, v) => {
                        if let (Some(a), Some(b)) = (ours.get_mut(&k), tree.get_mut(&k)) {
                            *a = a.wrapping_add(v);
                            *b = b.wrapping_add(v);
                        }
                        for ((_, a), (_, b)) in ours.iter_mut().zip(tree.iter_mut()) {
                            *a ^= 1;
                            *b ^= 1;
                        }
                    }
                }
                prop_assert_eq!(ours.len(), tree.len());
                prop_assert!(ours.iter().eq(tree.iter()));
                let large = matches!(ours, SmallMap::Large(_));
                prop_assert!(ours.len() <= SMALL_MAP_ENTRIES_MAX || large);
                prop_assert!(ours.len() > SMALL_MAP_ENTRIES_BACK || !large);
                for k in [0, 17, 40, 79] {
                    prop_assert_eq!(ours.get(&k), tree.get(&k));
                    prop_assert_eq!(ours.contains_key(&k), tree.contains_key(&k));
                }
            }
            // The same entries in either form, and rebuilt from scratch, are equal.
            let fresh: SmallMap<u16, u32> = tree.clone().into_iter().collect();
            prop_assert_eq!(&fresh, &ours);
            crate::test_encoding::assert_encodes_as(&ours, &tree);
            prop_assert!(ours.into_iter().eq(tree.into_iter()));
        }
    }

    /// Entries out of order or repeated are read as a `BTreeMap` reads them, on both sides of
    /// the bound.
    #[test]
    fn entries_out_of_order_decode_as_a_tree_decodes() {
        let config = bincode::config::standard();
        for n in [3u16, 50] {
            let mut entries: Vec<(u16, u32)> = (0..n).rev().map(|k| (k, u32::from(k))).collect();
            entries.push((1, 99));
            let bytes = bincode::serde::encode_to_vec(&entries, config).unwrap();
            let (ours, _): (SmallMap<u16, u32>, usize) =
                bincode::serde::decode_from_slice(&bytes, config).unwrap();
            let (tree, _): (BTreeMap<u16, u32>, usize) =
                bincode::serde::decode_from_slice(&bytes, config).unwrap();
            assert!(ours.iter().eq(tree.iter()), "{n}");
            assert_eq!(ours.get(&1), Some(&99));
        }
    }

    /// A count the input cannot back ends in an error, not in reserving room for it.
    #[test]
    fn a_claimed_count_past_the_input_is_an_error() {
        let config = bincode::config::standard();
        for claimed in [1u64 << 40, u64::MAX] {
            let bytes = bincode::serde::encode_to_vec(claimed, config).unwrap();
            let decoded =
                bincode::serde::decode_from_slice::<SmallMap<u64, u64>, _>(&bytes, config);
            assert!(decoded.is_err(), "{claimed}");
        }
    }
}
