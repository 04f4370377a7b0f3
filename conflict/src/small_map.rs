//! Serde for the `LiteMap`s kept in states (a hash's fields, a set's members and pending
//! removes): written and read exactly as a `BTreeMap` of the same entries.
//!
//! `LiteMap`'s own `Deserialize` reserves room for as many entries as the input claims before
//! reading one, so a damaged or hostile length (a frame mutated in flight, a corrupt stored
//! state) would ask the allocator for terabytes and abort the process. Here a claimed length
//! reserves at most [`PREALLOCATED_ENTRIES_MAX`] entries; a longer map grows as its entries are
//! read, and a length the input cannot back ends in a decoding error. Entries out of order are
//! sorted once, in `O(n log n)`, as a `BTreeMap` would take them.

use std::fmt;
use std::marker::PhantomData;

use litemap::LiteMap;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Entries reserved before they are read, whatever length the input claims. A state's maps
/// hold a handful.
pub(crate) const PREALLOCATED_ENTRIES_MAX: usize = 16;

/// Writes `map` as a map, in key order, as a `BTreeMap` writes itself in every format.
pub(crate) fn serialize<S, K, V>(map: &LiteMap<K, V>, serializer: S) -> Result<S::Ok, S::Error>
where
    S: Serializer,
    K: Serialize,
    V: Serialize,
{
    serializer.collect_map(map.iter())
}

/// Reads a map as a `BTreeMap` reads it: entries in any order, the last of a repeated key kept.
pub(crate) fn deserialize<'de, D, K, V>(deserializer: D) -> Result<LiteMap<K, V>, D::Error>
where
    D: Deserializer<'de>,
    K: Ord + Deserialize<'de>,
    V: Deserialize<'de>,
{
    struct MapVisitor<K, V>(PhantomData<(K, V)>);

    impl<'de, K, V> Visitor<'de> for MapVisitor<K, V>
    where
        K: Ord + Deserialize<'de>,
        V: Deserialize<'de>,
    {
        type Value = LiteMap<K, V>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
            let reserve = access.size_hint().unwrap_or(0);
            let mut entries = Vec::with_capacity(reserve.min(PREALLOCATED_ENTRIES_MAX));
            while let Some(entry) = access.next_entry()? {
                entries.push(entry);
            }
            // Sorted input, the only kind a state writes, is taken as it is. Other input is
            // sorted once (stably, keeping the last of a repeated key), not inserted entry by
            // entry, which would shift the vector for each and take quadratic time.
            Ok(entries.into_iter().collect())
        }
    }

    deserializer.deserialize_map(MapVisitor(PhantomData))
}

/// Asserts that `ours` encodes to the bytes `old` (the same state in the layout it replaced)
/// encodes to, and decodes from them back to itself.
#[cfg(test)]
pub(crate) fn assert_encodes_as<T, O>(ours: &T, old: &O)
where
    T: Serialize + serde::de::DeserializeOwned + PartialEq + fmt::Debug,
    O: Serialize,
{
    let config = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(old, config).unwrap();
    assert_eq!(bincode::serde::encode_to_vec(ours, config).unwrap(), bytes);
    let (decoded, _): (T, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
    assert_eq!(&decoded, ours);
}
