//! Framing: how messages travel on a byte stream.
//!
//! ```text
//!   ┌──────────────┬─────────┬──────────────────────────────┐
//!   │ length: u32  │ version │ message (bincode 2, standard │
//!   │ big-endian   │ u8 (=1) │ config: little-endian varint)│
//!   └──────────────┴─────────┴──────────────────────────────┘
//!     4 bytes        └──────── length bytes, 1..=FRAME_BYTES_MAX ┘
//! ```
//!
//! Decoding is two-step, as for any untrusted input: [`check`] looks at the length prefix only
//! (is a whole frame here, and is it within the limit?); [`decode`] then decodes that one frame's
//! body with bincode's allocation limit set to [`FRAME_BYTES_MAX`] (an event batch, read field
//! by field, checks its announced length instead: see `decode_message`), and validates every
//! rule a well-behaved peer keeps. Neither panics, whatever the bytes.

use bincode::config::{self, Configuration, Limit};
use bytes::Bytes;
use smallvec::SmallVec;

use crate::batch::{DecodeBatch, DecodeVector, EncodeBatch, EncodeEvent, EncodeVector, Source};

use crate::ids::{NodeId, Seq, VersionVector};
use crate::limits::{
    BATCH_EVENTS_MAX, ERROR_TEXT_BYTES_MAX, FRAME_BYTES_MAX, FRAME_LENGTH_BYTES, KEY_BYTES_MAX,
    SEQ_MAX, SNAPSHOT_CHUNK_KEYS_MAX, SNAPSHOT_KEY_BYTES_MAX, SNAPSHOT_PART_BYTES_MAX,
    SUBSCRIBE_ORIGINS_MAX, VALUE_BYTES_MAX, VECTOR_ENTRIES_MAX,
};
use crate::message::{ChangeEvent, EncodedEvents, Message, PROTOCOL_VERSION};
use braid_conflict::InvalidOp;

/// The bincode configuration of every frame body.
type WireConfig = Configuration<config::LittleEndian, config::Varint, Limit<FRAME_BYTES_MAX>>;

fn wire_config() -> WireConfig {
    config::standard().with_limit::<FRAME_BYTES_MAX>()
}

/// A message that cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The encoded message is larger than the frame limit.
    #[error("message of {body_bytes} bytes exceeds the frame limit of {FRAME_BYTES_MAX} bytes")]
    TooLarge {
        /// The size it would have had.
        body_bytes: usize,
    },
    /// A snapshot key whose state is larger than a snapshot carries, even in parts.
    #[error("a key state of {entry_bytes} bytes exceeds the {SNAPSHOT_KEY_BYTES_MAX} bytes a snapshot carries per key")]
    KeyStateTooLarge {
        /// The encoded entry's length.
        entry_bytes: usize,
    },
    /// bincode refused the value (cannot happen for well-formed messages).
    #[error("encoding failed: {0}")]
    Bincode(#[from] bincode::error::EncodeError),
}

/// A frame that was refused. The stream it came on should be closed with an error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix announces a body over the limit (nothing more was read or allocated).
    #[error("frame of {body_bytes} bytes exceeds the limit of {FRAME_BYTES_MAX} bytes")]
    FrameTooLarge {
        /// The announced body length.
        body_bytes: usize,
    },
    /// A body of length zero: not even a version byte.
    #[error("empty frame")]
    Empty,
    /// The version byte names a protocol version this build does not speak.
    #[error("unknown protocol version {version} (this node speaks {PROTOCOL_VERSION})")]
    UnknownVersion {
        /// The version received.
        version: u8,
    },
    /// The body does not decode as a message.
    #[error("malformed message: {reason}")]
    Malformed {
        /// What bincode reported.
        reason: String,
    },
    /// The body decoded but left bytes unread.
    #[error("{extra_bytes} unexpected bytes after the message")]
    TrailingBytes {
        /// How many.
        extra_bytes: usize,
    },
    /// The message decoded but breaks a protocol rule.
    #[error("invalid message: {0}")]
    Invalid(#[from] ProtocolViolation),
}

/// A rule of the protocol that a decoded message breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolViolation {
    /// More events than a batch may hold.
    #[error("batch of {events} events exceeds {BATCH_EVENTS_MAX}")]
    BatchTooLarge {
        /// Events in the batch.
        events: usize,
    },
    /// More entries than a vector may hold.
    #[error("vector of {entries} entries exceeds {VECTOR_ENTRIES_MAX}")]
    VectorTooLarge {
        /// Entries in the vector.
        entries: usize,
    },
    /// More origins than a subscription may name.
    #[error("subscription names {origins} origins, more than {SUBSCRIBE_ORIGINS_MAX}")]
    TooManyOrigins {
        /// Origins named.
        origins: usize,
    },
    /// A key over the length limit.
    #[error("key of {key_bytes} bytes exceeds {KEY_BYTES_MAX}")]
    KeyTooLong {
        /// The key's length.
        key_bytes: usize,
    },
    /// A value over the size limit.
    #[error("value of {value_bytes} bytes exceeds {VALUE_BYTES_MAX}")]
    ValueTooLarge {
        /// The value's length.
        value_bytes: usize,
    },
    /// An event whose HLC was issued by another node than its origin.
    #[error("event of origin {origin} carries an HLC of node {hlc_node}")]
    OriginMismatch {
        /// The event's origin.
        origin: braid_conflict::NodeId,
        /// The node in its HLC.
        hlc_node: braid_conflict::NodeId,
    },
    /// Sequence number zero, which no event has.
    #[error("event with sequence number 0")]
    ZeroSeq,
    /// A sequence number (of an event or in a vector) past the largest any region reaches.
    #[error("sequence number {seq} exceeds {SEQ_MAX}")]
    SeqTooLarge {
        /// The sequence number.
        seq: u64,
    },
    /// Events of one origin out of order within a batch.
    #[error("events of one origin out of order in a batch")]
    OutOfOrder,
    /// An operation no node could have produced.
    #[error("invalid operation: {0}")]
    Op(#[from] InvalidOp),
    /// More keys than a snapshot chunk may hold.
    #[error("snapshot chunk of {keys} keys exceeds {SNAPSHOT_CHUNK_KEYS_MAX}")]
    ChunkTooLarge {
        /// Keys in the chunk.
        keys: usize,
    },
    /// Keys of a snapshot chunk not in strictly increasing order.
    #[error("snapshot chunk keys out of order")]
    ChunkOutOfOrder,
    /// A snapshot key part that is empty or over `SNAPSHOT_PART_BYTES_MAX`.
    #[error("snapshot key part of {part_bytes} bytes (1 to {SNAPSHOT_PART_BYTES_MAX})")]
    KeyPartSize {
        /// The part's length.
        part_bytes: usize,
    },
    /// A snapshot key announced larger than `SNAPSHOT_KEY_BYTES_MAX`.
    #[error("snapshot key of {entry_bytes} bytes exceeds {SNAPSHOT_KEY_BYTES_MAX}")]
    KeyStateTooLarge {
        /// The announced length.
        entry_bytes: u64,
    },
    /// Parts of one snapshot key that disagree on its length or run past it.
    #[error("snapshot key parts disagree on the key's length or run past it")]
    KeyPartsMismatch,
    /// An error text over the length limit.
    #[error("error text of {text_bytes} bytes exceeds {ERROR_TEXT_BYTES_MAX}")]
    ErrorTextTooLong {
        /// The text's length.
        text_bytes: usize,
    },
}

/// Appends one frame holding `message` to `out`. On error `out` is left as it was.
pub fn encode(message: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_LENGTH_BYTES]);
    out.push(PROTOCOL_VERSION);
    if let Err(err) = encode_message(message, out) {
        out.truncate(start);
        return Err(err.into());
    }
    let body_bytes = out.len() - start - FRAME_LENGTH_BYTES;
    if body_bytes > FRAME_BYTES_MAX {
        out.truncate(start);
        return Err(EncodeError::TooLarge { body_bytes });
    }
    // Fits: FRAME_BYTES_MAX <= u32::MAX is asserted in `limits`.
    let length = (body_bytes as u32).to_be_bytes();
    out[start..start + FRAME_LENGTH_BYTES].copy_from_slice(&length);
    Ok(())
}

/// The variant index bincode gives [`Message::EventBatch`]: the first byte of its payload.
const EVENT_BATCH_TAG: u8 = 2;
/// The variant index of [`Message::Ack`].
const ACK_TAG: u8 = 3;
/// The variant index of [`Message::Heartbeat`].
const HEARTBEAT_TAG: u8 = 5;

/// A message's payload: event batches, acks and heartbeats field by field ([`crate::batch`]),
/// every other message through serde. The same bytes either way.
pub(crate) fn encode_message(
    message: &Message,
    out: &mut Vec<u8>,
) -> Result<(), bincode::error::EncodeError> {
    match message {
        Message::EventBatch(events) => {
            out.push(EVENT_BATCH_TAG);
            bincode::encode_into_writer(EncodeBatch(events), VecWriter(out), wire_config())
        }
        Message::EncodedEvents(batch) => encode_encoded_events(batch, out),
        Message::Ack(vector) | Message::Heartbeat(vector) => {
            out.push(match message {
                Message::Ack(_) => ACK_TAG,
                _ => HEARTBEAT_TAG,
            });
            bincode::encode_into_writer(EncodeVector(vector), VecWriter(out), wire_config())
        }
        _ => bincode::serde::encode_into_writer(message, VecWriter(out), wire_config()),
    }
}

/// An encoded batch's payload: an `EventBatch`'s tag, its event count, then its events as they
/// are.
fn encode_encoded_events(
    batch: &EncodedEvents,
    out: &mut Vec<u8>,
) -> Result<(), bincode::error::EncodeError> {
    out.push(EVENT_BATCH_TAG);
    bincode::encode_into_writer(batch.events as u64, VecWriter(out), wire_config())?;
    out.extend_from_slice(&batch.bytes);
    Ok(())
}

/// bincode's writer for a growing buffer, a frame's or any other: appends to it. (bincode keeps
/// its own one to itself.)
#[derive(Debug)]
pub struct VecWriter<'a>(pub &'a mut Vec<u8>);

impl bincode::enc::write::Writer for VecWriter<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// A message from its payload, and the bytes it used: event batches, acks and heartbeats field
/// by field (a batch's byte strings taken from `source`), every other message through serde.
///
/// Those three are read without bincode's allocation limit, whose accounting (eight bytes
/// claimed for every integer, however short its varint) was a fifth of the cost of reading a
/// batch. The limit guards allocations sized by a peer's length prefixes, and these readers
/// make none: a batch announcing more than [`BATCH_EVENTS_MAX`] events, or a vector more than
/// [`VECTOR_ENTRIES_MAX`] entries, is refused before any is read; at most that many are
/// reserved; every other list grows only by what the frame (itself within
/// [`FRAME_BYTES_MAX`]) holds. (Through serde, a vector naming one origin several times counts
/// it once against the entry limit; announced entries count here. A peer's encoder never
/// repeats an origin.)
pub(crate) fn decode_message(
    payload: &[u8],
    source: Source<'_>,
) -> Result<(Message, usize), DecodeError> {
    match payload.split_first() {
        Some((&EVENT_BATCH_TAG, batch)) => {
            check_announced(batch, BATCH_EVENTS_MAX, |events| {
                ProtocolViolation::BatchTooLarge { events }
            })?;
            let (DecodeBatch(events), used) =
                bincode::borrow_decode_from_slice_with_context(batch, config::standard(), source)
                    .map_err(malformed)?;
            Ok((Message::EventBatch(events), used + 1))
        }
        Some((&tag @ (ACK_TAG | HEARTBEAT_TAG), vector)) => {
            check_announced(vector, VECTOR_ENTRIES_MAX, |entries| {
                ProtocolViolation::VectorTooLarge { entries }
            })?;
            let (DecodeVector(vector), used) =
                bincode::decode_from_slice(vector, config::standard()).map_err(malformed)?;
            let message = match tag {
                ACK_TAG => Message::Ack(vector),
                _ => Message::Heartbeat(vector),
            };
            Ok((message, used + 1))
        }
        _ => bincode::serde::decode_from_slice(payload, wire_config()).map_err(malformed),
    }
}

/// What bincode refused, as a frame's error.
fn malformed(err: bincode::error::DecodeError) -> DecodeError {
    DecodeError::Malformed {
        reason: err.to_string(),
    }
}

/// Refuses a list whose announced length (the varint at the start of `payload`) is over `max`,
/// before any of it is read.
fn check_announced(
    payload: &[u8],
    max: usize,
    too_many: impl FnOnce(usize) -> ProtocolViolation,
) -> Result<(), DecodeError> {
    let (announced, _): (u64, usize) =
        bincode::decode_from_slice(payload, config::standard()).map_err(malformed)?;
    match announced > max as u64 {
        true => Err(too_many(usize::try_from(announced).unwrap_or(usize::MAX)).into()),
        false => Ok(()),
    }
}

/// The room a new buffer starts with: a small batch, without growing it byte by byte.
const ENCODE_CAPACITY_BYTES: usize = 512;

/// Bytes a varint takes at most: bincode writes a `u64` in 1, 3, 5 or 9.
const VARINT_BYTES_MAX: usize = 9;

/// Encodes one frame into a new buffer. A batch already encoded, an ack and a heartbeat get
/// room for their whole frame and little more (the frame is often kept as long as what is
/// sliced from it); any other message starts with room for a small batch.
pub fn encode_to_vec(message: &Message) -> Result<Vec<u8>, EncodeError> {
    // The length prefix, the version byte and the variant tag, then a count.
    const HEAD: usize = FRAME_LENGTH_BYTES + 2 + VARINT_BYTES_MAX;
    let capacity = match message {
        Message::EncodedEvents(batch) => HEAD + batch.bytes.len(),
        Message::Ack(vector) | Message::Heartbeat(vector) => {
            HEAD + 2 * VARINT_BYTES_MAX * vector.len()
        }
        _ => ENCODE_CAPACITY_BYTES,
    };
    let mut out = Vec::with_capacity(capacity);
    encode(message, &mut out)?;
    Ok(out)
}

impl EncodedEvents {
    /// Appends `event` in its wire encoding. Writing to memory with no size limit cannot fail;
    /// should it, nothing is appended and the error is returned. (The frame limit applies when
    /// the batch is sent: [`encode`] refuses a batch over it.)
    pub fn push(&mut self, event: &ChangeEvent) -> Result<(), EncodeError> {
        if self.bytes.capacity() == 0 {
            // Room for a small batch at once, not grown a few bytes at a time; made only when
            // an event comes (a replica often finds nothing to send).
            self.bytes.reserve(ENCODE_CAPACITY_BYTES);
        }
        let at = self.bytes.len();
        let written = bincode::encode_into_writer(
            EncodeEvent(event),
            VecWriter(&mut self.bytes),
            config::standard(),
        );
        if let Err(err) = written {
            self.bytes.truncate(at);
            return Err(err.into());
        }
        self.events += 1;
        Ok(())
    }

    /// Appends `events` events already in their wire encoding, one after another, as
    /// [`EncodedEvents::push`] wrote them.
    pub(crate) fn append_encoded(&mut self, encoded: &[u8], events: usize) {
        if self.bytes.capacity() == 0 {
            self.bytes.reserve(ENCODE_CAPACITY_BYTES.max(encoded.len()));
        }
        self.bytes.extend_from_slice(encoded);
        self.events += events;
    }

    /// The events, decoded (and validated) as a subscriber reads them.
    pub fn decode(&self) -> Result<Vec<ChangeEvent>, DecodeError> {
        let mut body = vec![PROTOCOL_VERSION];
        encode_encoded_events(self, &mut body).map_err(|err| DecodeError::Malformed {
            reason: err.to_string(),
        })?;
        match decode_body(&body)? {
            Message::EventBatch(events) => Ok(events),
            other => Err(DecodeError::Malformed {
                reason: format!("an encoded batch read as {}", other.kind()),
            }),
        }
    }
}

/// Looks at the start of `buf`: `Ok(Some(n))` when a whole frame of `n` bytes (prefix included)
/// is there, `Ok(None)` when more bytes are needed, an error when the prefix announces a body
/// over the limit. Reads only the prefix.
pub fn check(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    let Some(prefix) = buf.get(..FRAME_LENGTH_BYTES) else {
        return Ok(None);
    };
    let mut length = [0u8; FRAME_LENGTH_BYTES];
    length.copy_from_slice(prefix);
    let body_bytes = u32::from_be_bytes(length) as usize;
    if body_bytes > FRAME_BYTES_MAX {
        return Err(DecodeError::FrameTooLarge { body_bytes });
    }
    if body_bytes == 0 {
        return Err(DecodeError::Empty);
    }
    let frame_bytes = FRAME_LENGTH_BYTES + body_bytes;
    Ok((buf.len() >= frame_bytes).then_some(frame_bytes))
}

/// Decodes the frame at the start of `buf`: `Ok(Some((message, n)))` having used `n` bytes,
/// `Ok(None)` when the frame is not all there yet.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    let Some(frame_bytes) = check(buf)? else {
        return Ok(None);
    };
    let message = decode_body(&buf[FRAME_LENGTH_BYTES..frame_bytes])?;
    Ok(Some((message, frame_bytes)))
}

/// [`decode`] for a frame held as [`Bytes`]: the keys and values of an event batch are then
/// slices of `buf` rather than copies (so they keep its memory alive while they live).
pub fn decode_shared(buf: &Bytes) -> Result<Option<(Message, usize)>, DecodeError> {
    let Some(frame_bytes) = check(buf)? else {
        return Ok(None);
    };
    let message = decode_from(&buf[FRAME_LENGTH_BYTES..frame_bytes], Source(Some(buf)))?;
    Ok(Some((message, frame_bytes)))
}

/// Decodes and validates one frame body (the bytes after the length prefix).
pub fn decode_body(body: &[u8]) -> Result<Message, DecodeError> {
    decode_from(body, Source(None))
}

fn decode_from(body: &[u8], source: Source<'_>) -> Result<Message, DecodeError> {
    if body.len() > FRAME_BYTES_MAX {
        return Err(DecodeError::FrameTooLarge {
            body_bytes: body.len(),
        });
    }
    let (&version, payload) = body.split_first().ok_or(DecodeError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnknownVersion { version });
    }
    let (message, used) = decode_message(payload, source)?;
    if used != payload.len() {
        return Err(DecodeError::TrailingBytes {
            extra_bytes: payload.len() - used,
        });
    }
    validate(&message)?;
    Ok(message)
}

/// Checks the rules a decoded message must keep beyond its shape.
pub fn validate(message: &Message) -> Result<(), ProtocolViolation> {
    match message {
        // Raft bodies are opaque here and bounded by the frame; the node decodes them.
        Message::Handshake(_) | Message::RaftRequest(_) | Message::RaftResponse(_) => Ok(()),
        Message::Subscribe(subscribe) => {
            validate_vector(&subscribe.vector)?;
            if subscribe.origins.len() > SUBSCRIBE_ORIGINS_MAX {
                return Err(ProtocolViolation::TooManyOrigins {
                    origins: subscribe.origins.len(),
                });
            }
            Ok(())
        }
        Message::EventBatch(events) => validate_batch(events),
        // Never received as itself: it arrives as an `EventBatch`, and is checked as one.
        Message::EncodedEvents(_) => Ok(()),
        Message::Ack(vector) | Message::Heartbeat(vector) => validate_vector(vector),
        Message::SnapshotRequest(request) => validate_vector(&request.vector),
        Message::SnapshotBegin(begin) => validate_vector(&begin.vector),
        Message::SnapshotEnd(_) => Ok(()),
        Message::SnapshotKeyPart(part) => crate::snapshot_parts::validate_part(part),
        Message::SnapshotChunk(entries) => {
            if entries.len() > SNAPSHOT_CHUNK_KEYS_MAX {
                return Err(ProtocolViolation::ChunkTooLarge {
                    keys: entries.len(),
                });
            }
            for entry in entries {
                if entry.key.len() > KEY_BYTES_MAX {
                    return Err(ProtocolViolation::KeyTooLong {
                        key_bytes: entry.key.len(),
                    });
                }
            }
            if entries.windows(2).any(|w| w[0].key >= w[1].key) {
                return Err(ProtocolViolation::ChunkOutOfOrder);
            }
            Ok(())
        }
        Message::Error(error) => match error.text.len() > ERROR_TEXT_BYTES_MAX {
            true => Err(ProtocolViolation::ErrorTextTooLong {
                text_bytes: error.text.len(),
            }),
            false => Ok(()),
        },
    }
}

fn validate_vector(vector: &VersionVector) -> Result<(), ProtocolViolation> {
    if vector.len() > VECTOR_ENTRIES_MAX {
        return Err(ProtocolViolation::VectorTooLarge {
            entries: vector.len(),
        });
    }
    match vector.iter().find(|(_, seq)| seq.0 > SEQ_MAX) {
        Some((_, seq)) => Err(ProtocolViolation::SeqTooLarge { seq: seq.0 }),
        None => Ok(()),
    }
}

/// Validates one event on its own.
pub fn validate_event(event: &ChangeEvent) -> Result<(), ProtocolViolation> {
    if event.hlc.node != event.origin {
        return Err(ProtocolViolation::OriginMismatch {
            origin: event.origin,
            hlc_node: event.hlc.node,
        });
    }
    if event.seq.0 == 0 {
        return Err(ProtocolViolation::ZeroSeq);
    }
    if event.seq.0 > SEQ_MAX {
        return Err(ProtocolViolation::SeqTooLarge { seq: event.seq.0 });
    }
    if event.key.len() > KEY_BYTES_MAX {
        return Err(ProtocolViolation::KeyTooLong {
            key_bytes: event.key.len(),
        });
    }
    if let Some(value_bytes) = largest_value(&event.op).filter(|&n| n > VALUE_BYTES_MAX) {
        return Err(ProtocolViolation::ValueTooLarge { value_bytes });
    }
    event.op.validate()?;
    Ok(())
}

/// The longest value an operation writes (a string, a set member, a hash field or its value):
/// no node's client may write one past [`VALUE_BYTES_MAX`], so no honest peer sends one.
fn largest_value(op: &braid_conflict::Op) -> Option<usize> {
    use braid_conflict::{Op, Write};
    match op {
        Op::Delete(_) => None,
        Op::Write { write, .. } => match write {
            Write::Set(value) => Some(value.len()),
            Write::Counter { .. } => None,
            Write::SetAdd { members, .. } | Write::SetRemove { members, .. } => {
                members.iter().map(Bytes::len).max()
            }
            Write::HashSet(fields) => fields.iter().map(|(f, v)| f.len().max(v.len())).max(),
            Write::HashDelete(fields) => fields.iter().map(Bytes::len).max(),
        },
    }
}

/// Origins of one batch [`validate_batch`] keeps track of without allocating.
const BATCH_ORIGINS_INLINE: usize = 8;

fn validate_batch(events: &[ChangeEvent]) -> Result<(), ProtocolViolation> {
    if events.len() > BATCH_EVENTS_MAX {
        return Err(ProtocolViolation::BatchTooLarge {
            events: events.len(),
        });
    }
    // Each origin's last sequence number so far, by origin. A batch carries a few origins:
    // they fit inline, without an allocation per batch.
    let mut last_seq: SmallVec<[(NodeId, Seq); BATCH_ORIGINS_INLINE]> = SmallVec::new();
    for event in events {
        validate_event(event)?;
        match last_seq.binary_search_by_key(&event.origin, |&(origin, _)| origin) {
            Ok(at) if last_seq[at].1 >= event.seq => return Err(ProtocolViolation::OutOfOrder),
            Ok(at) => last_seq[at].1 = event.seq,
            Err(at) => last_seq.insert(at, (event.origin, event.seq)),
        }
    }
    Ok(())
}
