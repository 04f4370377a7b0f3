//! Test helpers: a type that stands for another (a compact layout in place of the one a state
//! or an operation was encoded in before) must encode exactly as that other does.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Asserts that `ours` encodes (bincode, as stored and sent) to the bytes `theirs` encodes to,
/// and decodes from them back to itself.
pub(crate) fn assert_encodes_as<T, O>(ours: &T, theirs: &O)
where
    T: Serialize + DeserializeOwned + PartialEq + fmt::Debug,
    O: Serialize,
{
    let config = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(theirs, config).unwrap();
    assert_eq!(bincode::serde::encode_to_vec(ours, config).unwrap(), bytes);
    let (decoded, _): (T, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
    assert_eq!(&decoded, ours);
}

/// [`assert_encodes_as`], and the same in JSON: field and type names too, for formats that
/// write them.
pub(crate) fn assert_encodes_as_also_in_json<T, O>(ours: &T, theirs: &O)
where
    T: Serialize + DeserializeOwned + PartialEq + fmt::Debug,
    O: Serialize,
{
    assert_encodes_as(ours, theirs);
    let json = serde_json::to_string(theirs).unwrap();
    assert_eq!(serde_json::to_string(ours).unwrap(), json);
    assert_eq!(&serde_json::from_str::<T>(&json).unwrap(), ours);
}
