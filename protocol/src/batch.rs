//! Event batches and acknowledgements on the wire, field by field.
//!
//! Every message is laid out by bincode's serde support (see [`crate::frame`]). The messages a
//! mesh sends most, [`Message::EventBatch`](crate::Message::EventBatch) and the vectors of
//! `Ack` and `Heartbeat`, are written and read here instead with bincode's own [`Encode`],
//! [`Decode`] and [`BorrowDecode`] traits, field by field, in exactly the layout serde gives
//! them:
//!
//! ```text
//!   batch    = len:u64 event*
//!   event    = origin:u64 seq:u64 hlc key:bytes op
//!   hlc      = wall_ms:u64 logical:u32 node:u64
//!   op       = 0:u32 observed                      Delete
//!            | 1:u32 option<observed> write        Write { replaces, write }
//!   observed = string:bool option<pncounter> option<vclock> hash:bool
//!   write    = 0:u32 bytes                         Set
//!            | 1:u32 direction:u32 total:u64       Counter
//!            | 2:u32 counter:u64 len:u64 bytes*    SetAdd
//!            | 3:u32 vclock len:u64 bytes*         SetRemove
//!            | 4:u32 len:u64 (bytes bytes)*        HashSet
//!            | 5:u32 len:u64 bytes*               HashDelete
//!   bytes    = len:u64 u8*          option<x> = 0:u8 | 1:u8 x        (integers: varints)
//!   vector   = len:u64 (origin:u64 seq:u64)*     (a map, in origin order)
//! ```
//!
//! The CRDT clocks inside an `observed` (rare: only removals carry them) still go through serde,
//! as do all other messages. Reading this way skips serde's visitors and, given the frame as
//! [`Bytes`], takes every key, value and member as a slice of the frame instead of a copy: a
//! batch of events costs one allocation for the batch, not several per event. The tests below
//! hold both ways of reading and writing to the same bytes and the same refusals.

use bincode::de::{BorrowDecode, BorrowDecoder, Decode};
use bincode::enc::{Encode, Encoder};
use bincode::error::{AllowedEnumVariants, DecodeError, EncodeError};
use braid_conflict::{CounterTotals, Direction, Hlc, NodeId, Observed, Op, VClock, Write};
use bytes::Bytes;

use crate::ids::{Seq, VersionVector};
use crate::limits::{BATCH_EVENTS_MAX, VECTOR_ENTRIES_MAX};
use crate::message::ChangeEvent;

/// Where decoded byte strings come from: slices of the frame when the caller has it as
/// [`Bytes`], copies otherwise.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Source<'f>(pub(crate) Option<&'f Bytes>);

/// Elements a decoded list makes room for before it reads them: a peer's length prefix is not
/// trusted with an allocation.
const LIST_CAPACITY_MAX: usize = 64;

/// An event batch to encode.
pub(crate) struct EncodeBatch<'a>(pub(crate) &'a [ChangeEvent]);

impl Encode for EncodeBatch<'_> {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        (self.0.len() as u64).encode(e)?;
        for event in self.0 {
            encode_event(event, e)?;
        }
        Ok(())
    }
}

/// One event of a batch to encode, on its own: a batch's bytes are its event count, then its
/// events, each as this writes it.
pub(crate) struct EncodeEvent<'a>(pub(crate) &'a ChangeEvent);

impl Encode for EncodeEvent<'_> {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        encode_event(self.0, e)
    }
}

fn encode_event<E: Encoder>(event: &ChangeEvent, e: &mut E) -> Result<(), EncodeError> {
    event.origin.0.encode(e)?;
    event.seq.0.encode(e)?;
    encode_hlc(&event.hlc, e)?;
    event.key[..].encode(e)?;
    encode_op(&event.op, e)
}

fn encode_hlc<E: Encoder>(hlc: &Hlc, e: &mut E) -> Result<(), EncodeError> {
    hlc.wall_ms.encode(e)?;
    hlc.logical.encode(e)?;
    hlc.node.0.encode(e)
}

fn encode_op<E: Encoder>(op: &Op, e: &mut E) -> Result<(), EncodeError> {
    match op {
        Op::Delete(observed) => {
            0u32.encode(e)?;
            encode_observed(observed, e)
        }
        Op::Write { replaces, write } => {
            1u32.encode(e)?;
            match replaces {
                None => 0u8.encode(e)?,
                Some(observed) => {
                    1u8.encode(e)?;
                    encode_observed(observed, e)?;
                }
            }
            encode_write(write, e)
        }
    }
}

fn encode_observed<E: Encoder>(observed: &Observed, e: &mut E) -> Result<(), EncodeError> {
    observed.string.encode(e)?;
    encode_option_serde(observed.counter.as_ref(), e)?;
    encode_option_serde(observed.set.as_ref(), e)?;
    observed.hash.encode(e)
}

fn encode_option_serde<T: serde::Serialize, E: Encoder>(
    value: Option<&T>,
    e: &mut E,
) -> Result<(), EncodeError> {
    match value {
        None => 0u8.encode(e),
        Some(value) => {
            1u8.encode(e)?;
            bincode::serde::Compat(value).encode(e)
        }
    }
}

fn encode_list<E: Encoder>(items: &[Bytes], e: &mut E) -> Result<(), EncodeError> {
    (items.len() as u64).encode(e)?;
    for item in items {
        item[..].encode(e)?;
    }
    Ok(())
}

fn encode_write<E: Encoder>(write: &Write, e: &mut E) -> Result<(), EncodeError> {
    match write {
        Write::Set(value) => {
            0u32.encode(e)?;
            value[..].encode(e)
        }
        Write::Counter { direction, total } => {
            1u32.encode(e)?;
            let direction: u32 = match direction {
                Direction::Up => 0,
                Direction::Down => 1,
            };
            direction.encode(e)?;
            total.encode(e)
        }
        Write::SetAdd { counter, members } => {
            2u32.encode(e)?;
            counter.encode(e)?;
            encode_list(members, e)
        }
        Write::SetRemove { observed, members } => {
            3u32.encode(e)?;
            bincode::serde::Compat(observed).encode(e)?;
            encode_list(members, e)
        }
        Write::HashSet(fields) => {
            4u32.encode(e)?;
            (fields.len() as u64).encode(e)?;
            for (field, value) in fields {
                field[..].encode(e)?;
                value[..].encode(e)?;
            }
            Ok(())
        }
        Write::HashDelete(fields) => {
            5u32.encode(e)?;
            encode_list(fields, e)
        }
    }
}

/// A version vector to encode (an `Ack` or a `Heartbeat`): a map from origin to sequence
/// number, in origin order.
pub(crate) struct EncodeVector<'a>(pub(crate) &'a VersionVector);

impl Encode for EncodeVector<'_> {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        (self.0.len() as u64).encode(e)?;
        for (origin, seq) in self.0.iter() {
            origin.0.encode(e)?;
            seq.0.encode(e)?;
        }
        Ok(())
    }
}

/// A decoded version vector: as through serde, a repeated origin takes its last value.
pub(crate) struct DecodeVector(pub(crate) VersionVector);

impl<Context> Decode<Context> for DecodeVector {
    fn decode<D: bincode::de::Decoder<Context = Context>>(d: &mut D) -> Result<Self, DecodeError> {
        let len = u64::decode(d)?;
        // The frame refuses a longer vector before it decodes one; checked here too, as this
        // reader runs without bincode's allocation limit.
        if len > VECTOR_ENTRIES_MAX as u64 {
            return Err(DecodeError::Other("vector over the entry limit"));
        }
        let mut entries = Vec::with_capacity(bounded(len, VECTOR_ENTRIES_MAX));
        for _ in 0..len {
            entries.push((NodeId(u64::decode(d)?), Seq(u64::decode(d)?)));
        }
        Ok(DecodeVector(VersionVector::from_entries(entries)))
    }
}

/// A decoded event batch.
pub(crate) struct DecodeBatch(pub(crate) Vec<ChangeEvent>);

impl<'de, 'f> BorrowDecode<'de, Source<'f>> for DecodeBatch {
    fn borrow_decode<D: BorrowDecoder<'de, Context = Source<'f>>>(
        d: &mut D,
    ) -> Result<Self, DecodeError> {
        let len = u64::decode(d)?;
        // The frame refuses a longer batch before it decodes one; checked here too, as this
        // reader runs without bincode's allocation limit.
        if len > BATCH_EVENTS_MAX as u64 {
            return Err(DecodeError::Other("batch over the event limit"));
        }
        let mut events = Vec::with_capacity(bounded(len, BATCH_EVENTS_MAX));
        for _ in 0..len {
            events.push(decode_event(d)?);
        }
        Ok(DecodeBatch(events))
    }
}

fn bounded(len: u64, max: usize) -> usize {
    usize::try_from(len).map_or(max, |len| len.min(max))
}

fn decode_event<'de, 'f, D: BorrowDecoder<'de, Context = Source<'f>>>(
    d: &mut D,
) -> Result<ChangeEvent, DecodeError> {
    Ok(ChangeEvent {
        origin: NodeId(u64::decode(d)?),
        seq: Seq(u64::decode(d)?),
        hlc: Hlc {
            wall_ms: u64::decode(d)?,
            logical: u32::decode(d)?,
            node: NodeId(u64::decode(d)?),
        },
        key: decode_bytes(d)?,
        op: decode_op(d)?,
    })
}

/// A byte string: a slice of the frame if the decoder has it, else a copy.
fn decode_bytes<'de, 'f, D: BorrowDecoder<'de, Context = Source<'f>>>(
    d: &mut D,
) -> Result<Bytes, DecodeError> {
    let slice = <&'de [u8]>::borrow_decode(d)?;
    Ok(match d.context().0 {
        Some(frame) if within(frame, slice) => frame.slice_ref(slice),
        _ => Bytes::copy_from_slice(slice),
    })
}

/// Whether `slice` lies inside `frame` (it always does when decoding from the frame; checked,
/// so that a wrong caller gets a copy rather than a panic).
fn within(frame: &Bytes, slice: &[u8]) -> bool {
    let start = frame.as_ptr() as usize;
    let at = slice.as_ptr() as usize;
    at >= start && at + slice.len() <= start + frame.len()
}

fn decode_list<'de, 'f, D: BorrowDecoder<'de, Context = Source<'f>>>(
    d: &mut D,
) -> Result<Vec<Bytes>, DecodeError> {
    let len = u64::decode(d)?;
    let mut items = Vec::with_capacity(bounded(len, LIST_CAPACITY_MAX));
    for _ in 0..len {
        items.push(decode_bytes(d)?);
    }
    Ok(items)
}

/// The variants of a two-variant enum (`Op`, `Direction`).
const TWO_VARIANTS: &AllowedEnumVariants = &AllowedEnumVariants::Range { min: 0, max: 1 };
/// The variants of `Write`.
const WRITE_VARIANTS: &AllowedEnumVariants = &AllowedEnumVariants::Range { min: 0, max: 5 };

fn unknown_variant(
    type_name: &'static str,
    allowed: &'static AllowedEnumVariants,
    found: u32,
) -> DecodeError {
    DecodeError::UnexpectedVariant {
        type_name,
        allowed,
        found,
    }
}

fn decode_option_tag<'de, D: BorrowDecoder<'de>>(d: &mut D) -> Result<bool, DecodeError> {
    match u8::decode(d)? {
        0 => Ok(false),
        1 => Ok(true),
        found => Err(unknown_variant("Option<T>", TWO_VARIANTS, u32::from(found))),
    }
}

fn decode_op<'de, 'f, D: BorrowDecoder<'de, Context = Source<'f>>>(
    d: &mut D,
) -> Result<Op, DecodeError> {
    match u32::decode(d)? {
        0 => Ok(Op::Delete(Box::new(decode_observed(d)?))),
        1 => {
            let replaces = match decode_option_tag(d)? {
                false => None,
                true => Some(Box::new(decode_observed(d)?)),
            };
            Ok(Op::Write {
                replaces,
                write: decode_write(d)?,
            })
        }
        found => Err(unknown_variant("Op", TWO_VARIANTS, found)),
    }
}

fn decode_observed<'de, D: BorrowDecoder<'de>>(d: &mut D) -> Result<Observed, DecodeError> {
    let string = bool::decode(d)?;
    let counter = match decode_option_tag(d)? {
        false => None,
        true => Some(bincode::serde::Compat::<CounterTotals>::decode(d)?.0),
    };
    let set = match decode_option_tag(d)? {
        false => None,
        true => Some(bincode::serde::Compat::<VClock<NodeId>>::decode(d)?.0),
    };
    Ok(Observed {
        string,
        counter,
        set,
        hash: bool::decode(d)?,
    })
}

fn decode_write<'de, 'f, D: BorrowDecoder<'de, Context = Source<'f>>>(
    d: &mut D,
) -> Result<Write, DecodeError> {
    match u32::decode(d)? {
        0 => Ok(Write::Set(decode_bytes(d)?)),
        1 => {
            let direction = match u32::decode(d)? {
                0 => Direction::Up,
                1 => Direction::Down,
                found => return Err(unknown_variant("Direction", TWO_VARIANTS, found)),
            };
            Ok(Write::Counter {
                direction,
                total: u64::decode(d)?,
            })
        }
        2 => Ok(Write::SetAdd {
            counter: u64::decode(d)?,
            members: decode_list(d)?,
        }),
        3 => Ok(Write::SetRemove {
            observed: bincode::serde::Compat::<VClock<NodeId>>::decode(d)?.0,
            members: decode_list(d)?,
        }),
        4 => {
            let len = u64::decode(d)?;
            let mut fields = Vec::with_capacity(bounded(len, LIST_CAPACITY_MAX));
            for _ in 0..len {
                fields.push((decode_bytes(d)?, decode_bytes(d)?));
            }
            Ok(Write::HashSet(fields))
        }
        5 => Ok(Write::HashDelete(decode_list(d)?)),
        found => Err(unknown_variant("Write", WRITE_VARIANTS, found)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;
    use bincode::config::{self, Configuration, Limit};
    use braid_conflict::Dot;
    use crdts::CmRDT;
    use proptest::prelude::*;

    type Config = Configuration<
        config::LittleEndian,
        config::Varint,
        Limit<{ crate::limits::FRAME_BYTES_MAX }>,
    >;

    fn wire() -> Config {
        config::standard().with_limit::<{ crate::limits::FRAME_BYTES_MAX }>()
    }

    /// The payload of an event batch through serde: the reference layout.
    fn serde_encode(events: &[ChangeEvent]) -> Vec<u8> {
        bincode::serde::encode_to_vec(Message::EventBatch(events.to_vec()), wire()).unwrap()
    }

    fn native_encode(events: &[ChangeEvent]) -> Vec<u8> {
        let mut out = vec![2u8];
        out.extend(bincode::encode_to_vec(EncodeBatch(events), wire()).unwrap());
        out
    }

    /// How serde reads a payload, and how the frame does (from a copy and from the frame).
    type Decoded = Option<(Message, usize)>;

    fn serde_decode(payload: &[u8]) -> Decoded {
        bincode::serde::decode_from_slice(payload, wire()).ok()
    }

    fn native_decode(payload: &[u8], source: Source<'_>) -> Decoded {
        crate::frame::decode_message(payload, source).ok()
    }

    /// Both ways of reading `payload` agree, from a copy and from shared bytes.
    fn assert_read_alike(payload: &[u8]) {
        let frame = Bytes::from(payload.to_vec());
        let reference = serde_decode(payload);
        assert_eq!(
            native_decode(payload, Source(None)),
            reference,
            "{payload:?}"
        );
        assert_eq!(
            native_decode(&frame, Source(Some(&frame))),
            reference,
            "{payload:?}"
        );
    }

    fn bytes() -> impl Strategy<Value = Bytes> {
        prop::collection::vec(any::<u8>(), 0..6).prop_map(Bytes::from)
    }

    fn clock() -> impl Strategy<Value = VClock<NodeId>> {
        prop::collection::vec((1u64..5, 1u64..300), 0..3).prop_map(|dots| {
            let mut clock = VClock::new();
            for (actor, counter) in dots {
                clock.apply(Dot::new(NodeId(actor), counter));
            }
            clock
        })
    }

    fn counter() -> impl Strategy<Value = CounterTotals> {
        prop::collection::vec((1u64..5, 1u64..300, any::<bool>()), 0..3).prop_map(|steps| {
            let mut counter = CounterTotals::new();
            for (actor, n, up) in steps {
                let origin = NodeId(actor);
                match up {
                    true => counter.advance(origin, Direction::Up, counter.up(origin) + n),
                    false => counter.advance(origin, Direction::Down, counter.down(origin) + n),
                }
            }
            counter
        })
    }

    fn observed() -> impl Strategy<Value = Observed> {
        (
            any::<bool>(),
            prop::option::of(counter()),
            prop::option::of(clock()),
            any::<bool>(),
        )
            .prop_map(|(string, counter, set, hash)| Observed {
                string,
                counter,
                set,
                hash,
            })
    }

    fn write() -> impl Strategy<Value = Write> {
        let list = || prop::collection::vec(bytes(), 0..3);
        prop_oneof![
            bytes().prop_map(Write::Set),
            (any::<bool>(), any::<u64>()).prop_map(|(up, total)| Write::Counter {
                direction: if up { Direction::Up } else { Direction::Down },
                total,
            }),
            (any::<u64>(), list())
                .prop_map(|(counter, members)| Write::SetAdd { counter, members }),
            (clock(), list())
                .prop_map(|(observed, members)| Write::SetRemove { observed, members }),
            prop::collection::vec((bytes(), bytes()), 0..3).prop_map(Write::HashSet),
            list().prop_map(Write::HashDelete),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            observed().prop_map(|o| Op::Delete(Box::new(o))),
            (prop::option::of(observed()), write()).prop_map(|(replaces, write)| Op::Write {
                replaces: replaces.map(Box::new),
                write,
            }),
        ]
    }

    fn batch() -> impl Strategy<Value = Vec<ChangeEvent>> {
        let event = (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            bytes(),
            op(),
        )
            .prop_map(|(origin, seq, wall_ms, logical, key, op)| ChangeEvent {
                origin: NodeId(origin),
                seq: Seq(seq),
                hlc: Hlc::new(wall_ms, logical, NodeId(origin)),
                key,
                op,
            });
        prop::collection::vec(event, 0..5)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 5_000, ..ProptestConfig::default() })]

        /// A batch built event by event, as the replica builds one from its log, is the same
        /// frame as the batch encoded whole, and reads back as that frame reads.
        #[test]
        fn encoded_events_are_an_event_batch(events in batch()) {
            let mut encoded = crate::message::EncodedEvents::default();
            for event in &events {
                encoded.push(event).unwrap();
            }
            prop_assert_eq!(encoded.events, events.len());
            let whole = crate::frame::encode_to_vec(&Message::EventBatch(events)).unwrap();
            let frame =
                crate::frame::encode_to_vec(&Message::EncodedEvents(encoded.clone())).unwrap();
            prop_assert_eq!(&frame, &whole);
            let read = match crate::frame::decode(&whole) {
                Ok(Some((Message::EventBatch(events), _))) => Ok(events),
                Ok(other) => panic!("a batch frame read as {other:?}"),
                Err(err) => Err(err),
            };
            prop_assert_eq!(encoded.decode(), read);
        }

        /// Field by field writes exactly what serde writes, and reads it back, from a copy and
        /// from the frame alike.
        #[test]
        fn batches_have_the_serde_layout(events in batch()) {
            let reference = serde_encode(&events);
            prop_assert_eq!(&native_encode(&events), &reference);
            let frame = Bytes::from(reference.clone());
            let expected = Some((Message::EventBatch(events), reference.len()));
            prop_assert_eq!(&native_decode(&reference, Source(None)), &expected);
            prop_assert_eq!(&native_decode(&frame, Source(Some(&frame))), &expected);
        }

        /// Acks and heartbeats too: serde's bytes, read back alike.
        #[test]
        fn vectors_have_the_serde_layout(
            pairs in prop::collection::vec((0u64..300, any::<u64>()), 0..6),
            ack in any::<bool>(),
        ) {
            let vector: VersionVector =
                pairs.into_iter().map(|(o, s)| (NodeId(o), Seq(s))).collect();
            let message = match ack {
                true => Message::Ack(vector),
                false => Message::Heartbeat(vector),
            };
            let reference = bincode::serde::encode_to_vec(&message, wire()).unwrap();
            let mut native = Vec::new();
            crate::frame::encode_message(&message, &mut native).unwrap();
            prop_assert_eq!(&native, &reference);
            let expected = Some((message, reference.len()));
            prop_assert_eq!(&native_decode(&reference, Source(None)), &expected);
        }

        /// Whatever the bytes after the batch tag, both ways of reading agree: the same batch
        /// and length, or both refuse.
        #[test]
        fn damaged_batches_are_read_as_serde_reads_them(
            events in batch(),
            // Small values half the time: tags, lengths and flags are small numbers.
            damage in prop::collection::vec(
                (any::<prop::sample::Index>(), prop_oneof![0u8..8, any::<u8>()], 0u8..3),
                1..4,
            ),
        ) {
            let mut payload = serde_encode(&events);
            for (at, byte, how) in damage {
                let at = 1 + at.index(payload.len());
                match how {
                    0 if at < payload.len() => payload[at] = byte,
                    1 => payload.insert(at.min(payload.len()), byte),
                    _ => payload.truncate(at.max(1)),
                }
            }
            assert_read_alike(&payload);
        }
    }

    /// One event of every kind of operation, with every optional part present.
    fn every_kind() -> Vec<ChangeEvent> {
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        let mut clock = VClock::new();
        clock.apply(Dot::new(NodeId(2), 3));
        let mut counter = CounterTotals::new();
        counter.advance(NodeId(2), Direction::Down, 4);
        let observed = Observed {
            string: true,
            counter: Some(counter),
            set: Some(clock.clone()),
            hash: true,
        };
        let writes = vec![
            Write::Set(b("v")),
            Write::Counter {
                direction: Direction::Down,
                total: 300,
            },
            Write::SetAdd {
                counter: 2,
                members: vec![b("m"), b("n")],
            },
            Write::SetRemove {
                observed: clock,
                members: vec![b("m")],
            },
            Write::HashSet(vec![(b("f"), b("v"))]),
            Write::HashDelete(vec![b("f")]),
        ];
        let mut ops = vec![Op::Delete(Box::new(observed.clone()))];
        ops.extend(writes.into_iter().map(|write| Op::Write {
            replaces: Some(Box::new(observed.clone())),
            write,
        }));
        ops.into_iter()
            .map(|op| ChangeEvent {
                origin: NodeId(1),
                seq: Seq(1),
                hlc: Hlc::new(70_000, 1, NodeId(1)),
                key: b("k"),
                op,
            })
            .collect()
    }

    /// Every byte after the tag, replaced by every value, inserted, or cut there: both ways of
    /// reading agree on every result (an accepted variant or flag serde refuses would show).
    #[test]
    fn every_single_byte_change_is_read_as_serde_reads_it() {
        // A change of the second origin to the first repeats an origin: the last value wins.
        let vector: VersionVector = [(NodeId(1), Seq(70_000)), (NodeId(2), Seq(7))]
            .into_iter()
            .collect();
        let vectors = [Message::Ack(vector.clone()), Message::Heartbeat(vector)]
            .map(|m| bincode::serde::encode_to_vec(&m, wire()).unwrap());
        let batches = every_kind()
            .into_iter()
            .map(|event| serde_encode(std::slice::from_ref(&event)));
        for payload in batches.chain(vectors) {
            for at in 1..payload.len() {
                let mut damaged = vec![payload[..at].to_vec()];
                for byte in 0..=u8::MAX {
                    let mut changed = payload.clone();
                    changed[at] = byte;
                    damaged.push(changed);
                    let mut grown = payload.clone();
                    grown.insert(at, byte);
                    damaged.push(grown);
                }
                for bytes in damaged {
                    assert_read_alike(&bytes);
                }
            }
        }
    }

    #[test]
    fn keys_and_values_are_slices_of_the_frame() {
        let events = vec![ChangeEvent {
            origin: NodeId(1),
            seq: Seq(1),
            hlc: Hlc::new(5, 0, NodeId(1)),
            key: Bytes::from_static(b"key"),
            op: Op::Write {
                replaces: None,
                write: Write::Set(Bytes::from_static(b"value")),
            },
        }];
        let frame = Bytes::from(serde_encode(&events));
        let Some((Message::EventBatch(decoded), _)) = native_decode(&frame, Source(Some(&frame)))
        else {
            panic!("the batch decodes");
        };
        let inside = |b: &Bytes| within(&frame, b) && !b.is_empty();
        assert!(inside(&decoded[0].key));
        let Op::Write {
            write: Write::Set(value),
            ..
        } = &decoded[0].op
        else {
            panic!("a set");
        };
        assert!(inside(value));
        // Without the frame as shared bytes: copies.
        let Some((Message::EventBatch(copied), _)) = native_decode(&frame, Source(None)) else {
            panic!("the batch decodes");
        };
        assert!(!within(&frame, &copied[0].key));
    }
}
