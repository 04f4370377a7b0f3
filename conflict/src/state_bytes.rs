//! [`StateBytes`]: the bytes a key's state keeps: set members, hash fields, string and hash
//! values.
//!
//! Applying an operation searches a state's B-trees for each member or field it names, and
//! replaces the values it overwrites. Kept as [`Bytes`], these were, on a replica that received
//! the operation, slices of the frame it arrived in: every comparison of a search read memory
//! long out of the cache, every overwrite and every copy touched the frame's shared reference
//! count (as far away), and the frame stayed alive as long as any of its bytes were kept.
//! `StateBytes` keeps short bytes inside the tree node or register, where the work has already
//! loaded them, and costs no reference count to copy or drop. Longer bytes get an allocation of
//! their own: one copy when applied, and no frame kept alive for them.
//!
//! It orders, compares and encodes exactly as the same bytes in a [`Bytes`] do: states keep
//! their order, and their stored and sent encodings are the same bytes.

use std::borrow::Borrow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// Bytes kept inline: more than the member and field names and most values the workloads and
/// examples use, and a `StateBytes` is then smaller than a [`Bytes`] handle (24 bytes against 32).
const INLINE_BYTES: usize = 16;

/// Bytes a key's state keeps, inline when short. See the module documentation.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StateBytes(SmallVec<[u8; INLINE_BYTES]>);

const _: () = assert!(
    std::mem::size_of::<StateBytes>() == 3 * std::mem::size_of::<usize>(),
    "inline bytes and a length: smaller than a Bytes handle"
);

impl StateBytes {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes as a [`Bytes`], for a value a client reads (a copy).
    pub fn to_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(&self.0)
    }

    /// The bytes as a [`Bytes`], handing over their allocation if they have one (a copy only
    /// of bytes kept inline).
    pub fn into_bytes(self) -> Bytes {
        match self.0.spilled() {
            true => Bytes::from(self.0.into_vec()),
            false => Bytes::copy_from_slice(&self.0),
        }
    }
}

impl From<&[u8]> for StateBytes {
    fn from(bytes: &[u8]) -> StateBytes {
        StateBytes(SmallVec::from_slice(bytes))
    }
}

impl Borrow<[u8]> for StateBytes {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::Deref for StateBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for StateBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // As a `Bytes` shows itself: `b"..."`.
        std::fmt::Debug::fmt(&Bytes::copy_from_slice(&self.0), f)
    }
}

/// Written as a byte string, as a [`Bytes`] is.
impl Serialize for StateBytes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

/// Read from whatever a [`Bytes`] reads from (a byte string, or a sequence of bytes), copied
/// once, straight from the decoder's input.
impl<'de> Deserialize<'de> for StateBytes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<StateBytes, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = StateBytes;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }

            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<StateBytes, E> {
                Ok(StateBytes::from(bytes))
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<StateBytes, E> {
                Ok(StateBytes::from(text.as_bytes()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<StateBytes, A::Error> {
                // The length a peer announces is not trusted with an allocation: the bytes
                // are pushed as they come.
                let mut bytes = SmallVec::new();
                while let Some(byte) = seq.next_element::<u8>()? {
                    bytes.push(byte);
                }
                Ok(StateBytes(bytes))
            }
        }

        deserializer.deserialize_bytes(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn some_bytes() -> impl Strategy<Value = Vec<u8>> {
        // Both sides of the inline bound.
        proptest::collection::vec(any::<u8>(), 0..INLINE_BYTES * 2)
    }

    proptest! {
        #[test]
        fn state_bytes_order_and_encode_as_bytes_do(a in some_bytes(), b in some_bytes()) {
            let (na, nb) = (StateBytes::from(&a[..]), StateBytes::from(&b[..]));
            let (ba, bb) = (Bytes::from(a.clone()), Bytes::from(b.clone()));
            prop_assert_eq!(na.cmp(&nb), ba.cmp(&bb));
            prop_assert_eq!(na == nb, a == b);
            prop_assert_eq!(na.as_bytes(), &a[..]);
            prop_assert_eq!(na.to_bytes(), ba.clone());
            prop_assert_eq!(na.clone().into_bytes(), ba.clone());
            crate::test_encoding::assert_encodes_as_also_in_json(&na, &ba);
        }
    }

    #[test]
    fn a_tree_keyed_by_state_bytes_is_searched_by_byte_slices() {
        let tree: std::collections::BTreeMap<StateBytes, u32> = [(&b"b"[..], 2), (&b"a"[..], 1)]
            .into_iter()
            .map(|(k, v)| (StateBytes::from(k), v))
            .collect();
        assert_eq!(tree.get(&b"a"[..]), Some(&1));
        assert_eq!(tree.get(&b"c"[..]), None);
        let long = [b'x'; INLINE_BYTES + 1];
        assert_eq!(StateBytes::from(&long[..]).as_bytes(), &long[..]);
    }
}
