//! [`Name`]: a set member or a hash field as a key's state keeps it.
//!
//! States keep their members and fields in B-trees, and applying an operation searches one
//! for each member or field it names. A [`Bytes`] key points elsewhere (on a replica that
//! received the operation, into the frame it came in, long gone from the cache): every
//! comparison of the search would be a memory read of its own. A `Name` keeps a short name
//! inside the tree node, where the search has already loaded it, and costs no reference count
//! to copy or drop. A long name gets an allocation of its own, as before.
//!
//! It orders, compares and encodes exactly as the same bytes in a [`Bytes`] do: states keep
//! their order, and their stored and sent encodings are the same bytes.

use std::borrow::Borrow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// Bytes of a name kept inline: more than any member or field name the workloads and examples
/// use, and a `Name` is then no larger than a [`Bytes`] handle (24 bytes against 32).
const NAME_INLINE_BYTES: usize = 16;

/// A set member or hash field, inline when short. See the module documentation.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(SmallVec<[u8; NAME_INLINE_BYTES]>);

const _: () = assert!(
    std::mem::size_of::<Name>() == 3 * std::mem::size_of::<usize>(),
    "a name is its inline bytes and a length: no larger than a Bytes handle"
);

impl Name {
    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The name as a [`Bytes`], for a value a client reads (a copy).
    pub fn to_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(&self.0)
    }
}

impl From<&[u8]> for Name {
    fn from(bytes: &[u8]) -> Name {
        Name(SmallVec::from_slice(bytes))
    }
}

impl Borrow<[u8]> for Name {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::Deref for Name {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // As a `Bytes` shows itself: `b"..."`.
        std::fmt::Debug::fmt(&Bytes::copy_from_slice(&self.0), f)
    }
}

/// Written as a byte string, as a [`Bytes`] is.
impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

/// Read from whatever a [`Bytes`] reads from.
impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Name, D::Error> {
        let bytes = Bytes::deserialize(deserializer)?;
        Ok(Name::from(&bytes[..]))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn name_bytes() -> impl Strategy<Value = Vec<u8>> {
        // Both sides of the inline bound.
        proptest::collection::vec(any::<u8>(), 0..NAME_INLINE_BYTES * 2)
    }

    proptest! {
        #[test]
        fn names_order_and_encode_as_their_bytes_do(a in name_bytes(), b in name_bytes()) {
            let (na, nb) = (Name::from(&a[..]), Name::from(&b[..]));
            let (ba, bb) = (Bytes::from(a.clone()), Bytes::from(b.clone()));
            prop_assert_eq!(na.cmp(&nb), ba.cmp(&bb));
            prop_assert_eq!(na == nb, a == b);
            prop_assert_eq!(na.as_bytes(), &a[..]);
            prop_assert_eq!(na.to_bytes(), ba.clone());
            let config = bincode::config::standard();
            let encoded = bincode::serde::encode_to_vec(&na, config).unwrap();
            prop_assert_eq!(&encoded, &bincode::serde::encode_to_vec(&ba, config).unwrap());
            let (back, _): (Name, usize) =
                bincode::serde::decode_from_slice(&encoded, config).unwrap();
            prop_assert_eq!(&back, &na);
            let json = serde_json::to_string(&na).unwrap();
            prop_assert_eq!(&json, &serde_json::to_string(&ba).unwrap());
            prop_assert_eq!(serde_json::from_str::<Name>(&json).unwrap(), na);
        }
    }

    #[test]
    fn a_tree_of_names_is_searched_by_byte_slices() {
        let tree: std::collections::BTreeMap<Name, u32> = [(&b"b"[..], 2), (&b"a"[..], 1)]
            .into_iter()
            .map(|(k, v)| (Name::from(k), v))
            .collect();
        assert_eq!(tree.get(&b"a"[..]), Some(&1));
        assert_eq!(tree.get(&b"c"[..]), None);
        let long = [b'x'; NAME_INLINE_BYTES + 1];
        assert_eq!(Name::from(&long[..]).as_bytes(), &long[..]);
    }
}
