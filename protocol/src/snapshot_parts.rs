//! Snapshot keys too large for one frame, sent in parts.
//!
//! A [`Message::SnapshotChunk`] carries whole key states, and a frame at most
//! [`FRAME_BYTES_MAX`](crate::limits::FRAME_BYTES_MAX) bytes. A key whose state is larger (a hash of a hundred thousand fields)
//! goes on its own: the encoding of its [`SnapshotEntry`] cut into [`SnapshotKeyPart`]s of at
//! most [`SNAPSHOT_PART_BYTES_MAX`] bytes ([`parts`]), which the fetcher joins and decodes with
//! an [`Assembly`]. A key state past [`SNAPSHOT_KEY_BYTES_MAX`] is refused on both sides.
//!
//! ```text
//!   entry    = key:bytes state:KeyState          (serde's layout, as in a chunk)
//!   parts    = SnapshotKeyPart { entry_bytes, bytes }*   bytes of all, in order = entry
//! ```

use bincode::config::{self, Configuration, Limit};
use bytes::Bytes;

use crate::frame::{DecodeError, EncodeError, ProtocolViolation};
use crate::limits::{KEY_BYTES_MAX, SNAPSHOT_KEY_BYTES_MAX, SNAPSHOT_PART_BYTES_MAX};
use crate::message::{Message, SnapshotEntry, SnapshotKeyPart};

type EntryConfig =
    Configuration<config::LittleEndian, config::Varint, Limit<SNAPSHOT_KEY_BYTES_MAX>>;

fn entry_config() -> EntryConfig {
    config::standard().with_limit::<SNAPSHOT_KEY_BYTES_MAX>()
}

/// The encoding of one snapshot entry on its own, as its parts carry it.
pub fn encode_entry(entry: &SnapshotEntry) -> Result<Bytes, EncodeError> {
    let bytes = bincode::serde::encode_to_vec(entry, entry_config())?;
    if bytes.len() > SNAPSHOT_KEY_BYTES_MAX {
        return Err(EncodeError::KeyStateTooLarge {
            entry_bytes: bytes.len(),
        });
    }
    Ok(Bytes::from(bytes))
}

/// The parts that carry `entry`, in order.
pub fn parts(entry: &SnapshotEntry) -> Result<Vec<Message>, EncodeError> {
    let bytes = encode_entry(entry)?;
    let entry_bytes = bytes.len() as u64;
    Ok((0..bytes.len())
        .step_by(SNAPSHOT_PART_BYTES_MAX)
        .map(|start| {
            let end = (start + SNAPSHOT_PART_BYTES_MAX).min(bytes.len());
            Message::SnapshotKeyPart(SnapshotKeyPart {
                entry_bytes,
                bytes: bytes.slice(start..end),
            })
        })
        .collect())
}

/// A snapshot entry from its joined parts' bytes.
pub fn decode_entry(bytes: &[u8]) -> Result<SnapshotEntry, DecodeError> {
    let (entry, used): (SnapshotEntry, usize) =
        bincode::serde::decode_from_slice(bytes, entry_config()).map_err(|err| {
            DecodeError::Malformed {
                reason: err.to_string(),
            }
        })?;
    if used != bytes.len() {
        return Err(DecodeError::TrailingBytes {
            extra_bytes: bytes.len() - used,
        });
    }
    if entry.key.len() > KEY_BYTES_MAX {
        return Err(ProtocolViolation::KeyTooLong {
            key_bytes: entry.key.len(),
        }
        .into());
    }
    Ok(entry)
}

/// The rules one part keeps on its own.
pub(crate) fn validate_part(part: &SnapshotKeyPart) -> Result<(), ProtocolViolation> {
    if part.bytes.is_empty() || part.bytes.len() > SNAPSHOT_PART_BYTES_MAX {
        return Err(ProtocolViolation::KeyPartSize {
            part_bytes: part.bytes.len(),
        });
    }
    if part.entry_bytes > SNAPSHOT_KEY_BYTES_MAX as u64 {
        return Err(ProtocolViolation::KeyStateTooLarge {
            entry_bytes: part.entry_bytes,
        });
    }
    if part.bytes.len() as u64 > part.entry_bytes {
        return Err(ProtocolViolation::KeyPartsMismatch);
    }
    Ok(())
}

/// The parts of one key received so far.
#[derive(Debug, Default)]
pub struct Assembly {
    /// The whole entry's length, from the first part.
    entry_bytes: usize,
    /// The bytes so far: empty between keys. Grown by what arrives, never by what a part
    /// announces.
    bytes: Vec<u8>,
}

impl Assembly {
    /// Whether a key's parts have begun and not ended.
    pub fn in_progress(&self) -> bool {
        !self.bytes.is_empty()
    }

    /// Takes the next part; returns the entry once its last part is in.
    pub fn push(&mut self, part: &SnapshotKeyPart) -> Result<Option<SnapshotEntry>, DecodeError> {
        validate_part(part)?;
        // Checked against the limit, which is below `usize::MAX` on every target.
        let entry_bytes = part.entry_bytes as usize;
        if !self.in_progress() {
            self.entry_bytes = entry_bytes;
        }
        if entry_bytes != self.entry_bytes || self.bytes.len() + part.bytes.len() > entry_bytes {
            return Err(ProtocolViolation::KeyPartsMismatch.into());
        }
        self.bytes.extend_from_slice(&part.bytes);
        if self.bytes.len() < self.entry_bytes {
            return Ok(None);
        }
        let entry = decode_entry(&self.bytes);
        self.bytes = Vec::new();
        entry.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;
    use braid_conflict::{Command, Hlc, KeyState, NodeId};

    /// A hash of `fields` fields of `value_bytes` bytes each.
    fn big_hash(fields: usize, value_bytes: usize) -> SnapshotEntry {
        let mut state = KeyState::default();
        let pairs: Vec<(Bytes, Bytes)> = (0..fields)
            .map(|i| {
                (
                    Bytes::from(format!("field-{i:08}")),
                    Bytes::from(vec![b'v'; value_bytes]),
                )
            })
            .collect();
        let prepared = state.prepare(NodeId(1), Command::HashSet(pairs)).unwrap();
        state.apply(&prepared.op.unwrap(), Hlc::new(1, 0, NodeId(1)));
        SnapshotEntry {
            key: Bytes::from_static(b"big"),
            state,
        }
    }

    fn part(message: &Message) -> &SnapshotKeyPart {
        match message {
            Message::SnapshotKeyPart(part) => part,
            other => panic!("not a part: {other:?}"),
        }
    }

    #[test]
    fn a_key_larger_than_a_frame_goes_in_parts_that_join_to_it() {
        let entry = big_hash(50_000, 100);
        let chunk = Message::SnapshotChunk(vec![entry.clone()]);
        assert!(
            frame::encode_to_vec(&chunk).is_err(),
            "the entry does not fit a frame"
        );
        let messages = parts(&entry).unwrap();
        assert!(messages.len() > 4, "{} parts", messages.len());
        let mut assembly = Assembly::default();
        let mut joined = None;
        for (i, message) in messages.iter().enumerate() {
            // Each part is a frame of its own, through the real encoding.
            let bytes = frame::encode_to_vec(message).unwrap();
            let (decoded, _) = frame::decode(&bytes).unwrap().unwrap();
            let out = assembly.push(part(&decoded)).unwrap();
            assert_eq!(out.is_some(), i == messages.len() - 1);
            joined = out.or(joined);
        }
        assert_eq!(joined, Some(entry));
        assert!(!assembly.in_progress());
    }

    #[test]
    fn parts_that_disagree_or_run_past_their_key_are_refused() {
        let entry = big_hash(2_000, 1_000);
        let messages = parts(&entry).unwrap();
        let first = part(&messages[0]).clone();
        let mut assembly = Assembly::default();
        assembly.push(&first).unwrap();
        let mut other_length = part(&messages[1]).clone();
        other_length.entry_bytes += 1;
        assert!(matches!(
            assembly.push(&other_length),
            Err(DecodeError::Invalid(ProtocolViolation::KeyPartsMismatch))
        ));
        // More bytes than the entry holds.
        let mut assembly = Assembly::default();
        let short = SnapshotKeyPart {
            entry_bytes: 3,
            bytes: Bytes::from_static(b"ab"),
        };
        assembly.push(&short).unwrap();
        assert!(assembly.push(&short).is_err());
        // Parts announcing past the limit, empty or oversized parts: refused as frames too.
        for bad in [
            SnapshotKeyPart {
                entry_bytes: SNAPSHOT_KEY_BYTES_MAX as u64 + 1,
                bytes: Bytes::from_static(b"a"),
            },
            SnapshotKeyPart {
                entry_bytes: 10,
                bytes: Bytes::new(),
            },
            SnapshotKeyPart {
                entry_bytes: SNAPSHOT_KEY_BYTES_MAX as u64,
                bytes: Bytes::from(vec![0; SNAPSHOT_PART_BYTES_MAX + 1]),
            },
        ] {
            assert!(Assembly::default().push(&bad).is_err(), "{bad:?}");
            let message = Message::SnapshotKeyPart(bad);
            assert!(frame::validate(&message).is_err());
        }
        // Bytes that are no entry: a typed error, not a panic.
        let mut assembly = Assembly::default();
        let garbage = SnapshotKeyPart {
            entry_bytes: 4,
            bytes: Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]),
        };
        assert!(assembly.push(&garbage).is_err());
        assert!(
            !assembly.in_progress(),
            "a failed key leaves nothing behind"
        );
    }
}
