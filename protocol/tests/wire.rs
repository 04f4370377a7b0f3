//! The wire format: golden byte vectors for every message, round trips, and decoding of random
//! and mutated bytes (typed errors, never a panic, never an allocation past the frame limit).

use std::path::PathBuf;

use braid_conflict::{
    Command, CounterTotals, Direction, Hlc, KeyState, NodeId, Observed, Op, VClock, Write,
};
use braid_protocol::frame::{self, DecodeError};
use braid_protocol::limits::{BATCH_EVENTS_MAX, FRAME_BYTES_MAX, SEQ_MAX};
use braid_protocol::{
    ChangeEvent, ClusterId, ErrorCode, ErrorMessage, Handshake, Message, ProtocolViolation,
    RaftCall, RaftRequest, Seq, SnapshotBegin, SnapshotEnd, SnapshotEntry, SnapshotKeyPart,
    SnapshotRequest, Subscribe, VersionVector,
};
use bytes::Bytes;
use proptest::prelude::*;

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn event(seq: u64, key: &str, op: Op) -> ChangeEvent {
    ChangeEvent {
        origin: A,
        seq: Seq(seq),
        hlc: Hlc::new(1_700_000_000_000 + seq, 0, A),
        key: b(key),
        op,
    }
}

fn vector() -> VersionVector {
    [(A, Seq(42)), (B, Seq(7))].into_iter().collect()
}

fn observed_clock() -> VClock<NodeId> {
    let mut state = KeyState::default();
    let op = state
        .prepare(B, Command::SetAdd(vec![b("m")]))
        .unwrap()
        .op
        .unwrap();
    state.apply(&op, Hlc::new(1, 0, B));
    match state.prepare(B, Command::Delete).unwrap().op {
        Some(Op::Delete(observed)) if observed.set.is_some() => observed.set.unwrap(),
        other => panic!("unexpected {other:?}"),
    }
}

fn observed_counter() -> CounterTotals {
    let mut counter = CounterTotals::new();
    counter.advance(B, Direction::Up, 5);
    counter
}

/// A key's state after a set add: a clock and dots to encode.
fn key_state() -> KeyState {
    let mut state = KeyState::default();
    let op = state
        .prepare(A, Command::SetAdd(vec![b("m"), b("n")]))
        .unwrap()
        .op
        .unwrap();
    state.apply(&op, Hlc::new(1_700_000_000_000, 0, A));
    state
}

/// Every message kind, with every kind of operation, under a stable name.
fn golden_messages() -> Vec<(&'static str, Message)> {
    let write = |write: Write| Op::Write {
        replaces: None,
        write,
    };
    vec![
        (
            "handshake",
            Message::Handshake(Handshake {
                protocol_version: 1,
                cluster_id: ClusterId([7; 16]),
                node_id: A,
            }),
        ),
        (
            "subscribe",
            Message::Subscribe(Subscribe {
                vector: vector(),
                origins: vec![B],
                rewind: false,
            }),
        ),
        ("ack", Message::Ack(vector())),
        (
            "raft_request",
            Message::RaftRequest(RaftRequest {
                call: RaftCall::Vote,
                body: Bytes::from_static(b"vote"),
            }),
        ),
        (
            "raft_response",
            Message::RaftResponse(Bytes::from_static(b"granted")),
        ),
        ("heartbeat", Message::Heartbeat(vector())),
        (
            "snapshot_request",
            Message::SnapshotRequest(SnapshotRequest { vector: vector() }),
        ),
        (
            "snapshot_begin",
            Message::SnapshotBegin(SnapshotBegin {
                vector: vector(),
                hlc: Hlc::new(1_700_000_000_042, 3, B),
                keys_estimate: 1000,
            }),
        ),
        (
            "snapshot_chunk",
            Message::SnapshotChunk(vec![
                SnapshotEntry {
                    key: b("a"),
                    state: KeyState::default(),
                },
                SnapshotEntry {
                    key: b("k"),
                    state: key_state(),
                },
            ]),
        ),
        (
            "snapshot_end",
            Message::SnapshotEnd(SnapshotEnd { keys: 2 }),
        ),
        (
            "snapshot_key_part",
            Message::SnapshotKeyPart(SnapshotKeyPart {
                entry_bytes: 5,
                bytes: b("abc"),
            }),
        ),
        (
            "error",
            Message::Error(ErrorMessage {
                code: ErrorCode::WrongCluster,
                text: "cluster mismatch".into(),
            }),
        ),
        (
            "event_set",
            Message::EventBatch(vec![event(1, "k", write(Write::Set(b("v"))))]),
        ),
        (
            "event_counter",
            Message::EventBatch(vec![event(
                2,
                "n",
                write(Write::Counter {
                    direction: Direction::Down,
                    total: 3,
                }),
            )]),
        ),
        (
            "event_set_add",
            Message::EventBatch(vec![event(
                3,
                "s",
                write(Write::SetAdd {
                    counter: 1,
                    members: vec![b("x"), b("y")],
                }),
            )]),
        ),
        (
            "event_set_remove",
            Message::EventBatch(vec![event(
                4,
                "s",
                write(Write::SetRemove {
                    observed: observed_clock(),
                    members: vec![b("m")],
                }),
            )]),
        ),
        (
            "event_hash_set",
            Message::EventBatch(vec![event(
                5,
                "h",
                write(Write::HashSet(vec![(b("f"), b("v"))])),
            )]),
        ),
        (
            "event_hash_delete",
            Message::EventBatch(vec![event(6, "h", write(Write::HashDelete(vec![b("f")])))]),
        ),
        (
            "event_delete",
            Message::EventBatch(vec![event(
                7,
                "k",
                Op::Delete(Box::new(Observed {
                    string: true,
                    counter: Some(observed_counter()),
                    set: Some(observed_clock()),
                    hash: true,
                })),
            )]),
        ),
        (
            "event_set_replacing",
            Message::EventBatch(vec![event(
                8,
                "k",
                Op::Write {
                    replaces: Some(Box::new(Observed {
                        string: false,
                        counter: Some(observed_counter()),
                        set: None,
                        hash: false,
                    })),
                    write: Write::Set(b("v")),
                },
            )]),
        ),
    ]
}

fn golden_dir() -> PathBuf {
    manifest_dir().join("tests/golden")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    let text = text.trim();
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

/// An accidental change of the wire format fails here. After a deliberate one (which needs a new
/// protocol version), regenerate with `BRAID_BLESS=1 cargo test -p braid-protocol --test wire`.
#[test]
fn golden_byte_vectors_are_stable() {
    let bless = std::env::var_os("BRAID_BLESS").is_some();
    for (name, message) in golden_messages() {
        let path = golden_dir().join(format!("{name}.hex"));
        let bytes = frame::encode_to_vec(&message).unwrap();
        if bless {
            std::fs::write(&path, hex(&bytes) + "\n").unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|_| panic!("missing golden vector {}", path.display()));
        assert_eq!(hex(&bytes), expected.trim(), "encoding of {name} changed");
        let (decoded, used) = frame::decode(&unhex(&expected)).unwrap().unwrap();
        assert_eq!(decoded, message, "golden {name} decodes to another message");
        assert_eq!(used, bytes.len());
    }
}

#[test]
fn unknown_version_is_a_typed_error() {
    let mut bytes = frame::encode_to_vec(&Message::Ack(vector())).unwrap();
    for version in [0u8, 2, 200, 255] {
        bytes[4] = version;
        assert_eq!(
            frame::decode(&bytes),
            Err(DecodeError::UnknownVersion { version })
        );
    }
}

#[test]
fn oversized_length_prefix_is_refused_before_reading_the_body() {
    let announced = FRAME_BYTES_MAX + 1;
    let mut bytes = (announced as u32).to_be_bytes().to_vec();
    bytes.push(1);
    assert_eq!(
        frame::check(&bytes),
        Err(DecodeError::FrameTooLarge {
            body_bytes: announced
        })
    );
    assert_eq!(
        frame::decode(&[0xff, 0xff, 0xff, 0xff]),
        Err(DecodeError::FrameTooLarge {
            body_bytes: u32::MAX as usize
        })
    );
}

#[test]
fn huge_claimed_length_inside_a_small_frame_does_not_allocate() {
    // EventBatch (variant 2), then a varint u64 length marker (0xfd) claiming 2^40 events: more
    // than a batch may hold, refused before anything is read or reserved.
    let mut body = vec![1u8, 2, 0xfd];
    body.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&body);
    assert_eq!(
        frame::decode(&bytes),
        Err(DecodeError::Invalid(ProtocolViolation::BatchTooLarge {
            events: 1 << 40
        }))
    );
    // A claim within the limit: the decoder grows the vector only as events actually arrive.
    let mut body = vec![1u8, 2];
    body.extend(
        bincode::encode_to_vec(BATCH_EVENTS_MAX as u64, bincode::config::standard()).unwrap(),
    );
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&body);
    assert!(matches!(
        frame::decode(&bytes),
        Err(DecodeError::Malformed { .. })
    ));
    // A byte string claiming 2^40 bytes is refused before anything is allocated for it.
    let mut body = vec![1u8, 2, 1, 1, 1, 0, 0, 0, 0xfd];
    body.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&body);
    assert!(matches!(
        frame::decode(&bytes),
        Err(DecodeError::Malformed { .. })
    ));
}

#[test]
fn incomplete_frames_ask_for_more() {
    let bytes = frame::encode_to_vec(&Message::Ack(vector())).unwrap();
    for cut in 0..bytes.len() {
        assert_eq!(frame::decode(&bytes[..cut]), Ok(None), "cut at {cut}");
    }
    assert!(frame::decode(&bytes).unwrap().is_some());
}

#[test]
fn too_large_message_is_refused_when_encoding() {
    let big = Bytes::from(vec![b'x'; FRAME_BYTES_MAX]);
    let message = Message::EventBatch(vec![event(
        1,
        "k",
        Op::Write {
            replaces: None,
            write: Write::Set(big),
        },
    )]);
    let mut out = vec![9u8];
    assert!(matches!(
        frame::encode(&message, &mut out),
        Err(frame::EncodeError::TooLarge { .. })
    ));
    assert_eq!(
        out,
        vec![9u8],
        "a failed encode leaves the buffer as it was"
    );
}

#[test]
fn protocol_rules_are_enforced_after_decoding() {
    let set = |seq: u64| {
        event(
            seq,
            "k",
            Op::Write {
                replaces: None,
                write: Write::Set(b("v")),
            },
        )
    };
    let cases: Vec<(Message, ProtocolViolation)> = vec![
        (
            Message::EventBatch(vec![set(2), set(1)]),
            ProtocolViolation::OutOfOrder,
        ),
        (
            Message::EventBatch(vec![set(0)]),
            ProtocolViolation::ZeroSeq,
        ),
        (
            Message::EventBatch(vec![set(SEQ_MAX + 1)]),
            ProtocolViolation::SeqTooLarge { seq: SEQ_MAX + 1 },
        ),
        (
            Message::Ack([(A, Seq(3)), (B, Seq(u64::MAX))].into_iter().collect()),
            ProtocolViolation::SeqTooLarge { seq: u64::MAX },
        ),
        (
            Message::SnapshotBegin(SnapshotBegin {
                vector: [(A, Seq(SEQ_MAX + 1))].into_iter().collect(),
                hlc: Hlc::new(1_700_000_000_000, 0, A),
                keys_estimate: 0,
            }),
            ProtocolViolation::SeqTooLarge { seq: SEQ_MAX + 1 },
        ),
        (
            Message::EventBatch(vec![ChangeEvent {
                origin: B,
                ..set(1)
            }]),
            ProtocolViolation::OriginMismatch {
                origin: B,
                hlc_node: A,
            },
        ),
        (
            Message::EventBatch((1..=BATCH_EVENTS_MAX as u64 + 1).map(set).collect()),
            ProtocolViolation::BatchTooLarge {
                events: BATCH_EVENTS_MAX + 1,
            },
        ),
        (
            Message::EventBatch(vec![event(
                1,
                "s",
                Op::Write {
                    replaces: None,
                    write: Write::SetAdd {
                        counter: 1,
                        members: vec![b("y"), b("x")],
                    },
                },
            )]),
            ProtocolViolation::Op(braid_conflict::InvalidOp::NotCanonical),
        ),
        (
            Message::Error(ErrorMessage {
                code: ErrorCode::Internal,
                text: "x".repeat(5000),
            }),
            ProtocolViolation::ErrorTextTooLong { text_bytes: 5000 },
        ),
        (
            Message::SnapshotChunk(
                (0..=braid_protocol::limits::SNAPSHOT_CHUNK_KEYS_MAX)
                    .map(|i| SnapshotEntry {
                        key: b(&format!("{i:05}")),
                        state: KeyState::default(),
                    })
                    .collect(),
            ),
            ProtocolViolation::ChunkTooLarge {
                keys: braid_protocol::limits::SNAPSHOT_CHUNK_KEYS_MAX + 1,
            },
        ),
        (
            Message::SnapshotChunk(vec![
                SnapshotEntry {
                    key: b("b"),
                    state: KeyState::default(),
                },
                SnapshotEntry {
                    key: b("a"),
                    state: KeyState::default(),
                },
            ]),
            ProtocolViolation::ChunkOutOfOrder,
        ),
        (
            Message::SnapshotChunk(vec![SnapshotEntry {
                key: Bytes::from(vec![b'k'; braid_protocol::limits::KEY_BYTES_MAX + 1]),
                state: KeyState::default(),
            }]),
            ProtocolViolation::KeyTooLong {
                key_bytes: braid_protocol::limits::KEY_BYTES_MAX + 1,
            },
        ),
    ];
    for (message, violation) in cases {
        let bytes = frame::encode_to_vec(&message).unwrap();
        assert_eq!(frame::decode(&bytes), Err(DecodeError::Invalid(violation)));
    }
}

/// Each origin's events must rise within a batch, however the origins interleave; more origins
/// than are tracked without allocating change nothing.
#[test]
fn a_batch_is_in_order_per_origin() {
    let at = |origin: u64, seq: u64| ChangeEvent {
        origin: NodeId(origin),
        seq: Seq(seq),
        hlc: Hlc::new(1_700_000_000_000 + seq, 0, NodeId(origin)),
        key: b("k"),
        op: Op::Write {
            replaces: None,
            write: Write::Set(b("v")),
        },
    };
    let decode = |events: Vec<ChangeEvent>| {
        let bytes = frame::encode_to_vec(&Message::EventBatch(events)).unwrap();
        frame::decode(&bytes).map(|decoded| decoded.map(|(message, _)| message))
    };
    let interleaved = vec![at(2, 5), at(1, 1), at(2, 6), at(1, 2), at(3, 9)];
    assert_eq!(
        decode(interleaved.clone()),
        Ok(Some(Message::EventBatch(interleaved)))
    );
    let refused = Err(DecodeError::Invalid(ProtocolViolation::OutOfOrder));
    assert_eq!(decode(vec![at(2, 5), at(1, 1), at(2, 5)]), refused);
    assert_eq!(decode(vec![at(1, 3), at(2, 1), at(1, 2)]), refused);
    assert_eq!(
        decode(vec![at(1, 1), at(1, 3), at(2, 1), at(1, 2)]),
        refused
    );
    // Twenty origins, one event each and then a second from each in reverse order.
    let mut many: Vec<ChangeEvent> = (1..=20).map(|origin| at(origin, 1)).collect();
    many.extend((1..=20).rev().map(|origin| at(origin, 2)));
    assert_eq!(decode(many.clone()), Ok(Some(Message::EventBatch(many))));
    let mut late: Vec<ChangeEvent> = (1..=20).map(|origin| at(origin, 3)).collect();
    late.push(at(17, 3));
    assert_eq!(decode(late), refused);
}

#[test]
fn trailing_bytes_in_a_frame_are_refused() {
    let mut bytes = frame::encode_to_vec(&Message::Ack(vector())).unwrap();
    bytes.push(0);
    let body = (bytes.len() - 4) as u32;
    bytes[..4].copy_from_slice(&body.to_be_bytes());
    assert_eq!(
        frame::decode(&bytes),
        Err(DecodeError::TrailingBytes { extra_bytes: 1 })
    );
}

fn arb_message() -> impl Strategy<Value = Message> {
    let events = prop::collection::vec((0u8..4, ".{0,8}", 1u64..10), 0..6).prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (kind, text, n))| {
                let write = match kind {
                    0 => Write::Set(b(&text)),
                    1 => Write::Counter {
                        direction: Direction::Up,
                        total: n,
                    },
                    2 => Write::SetAdd {
                        counter: n,
                        members: vec![b(&text)],
                    },
                    _ => Write::HashSet(vec![(b(&text), b("v"))]),
                };
                event(
                    i as u64 + 1,
                    &text,
                    Op::Write {
                        replaces: None,
                        write,
                    },
                )
            })
            .collect::<Vec<_>>()
    });
    let vector = prop::collection::vec((0u64..50, 0u64..1_000_000), 0..8).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(n, s)| (NodeId(n), Seq(s)))
            .collect::<VersionVector>()
    });
    prop_oneof![
        (any::<[u8; 16]>(), any::<u64>()).prop_map(|(c, n)| Message::Handshake(Handshake {
            protocol_version: 1,
            cluster_id: ClusterId(c),
            node_id: NodeId(n)
        })),
        (
            vector.clone(),
            prop::collection::vec(any::<u64>().prop_map(NodeId), 0..4)
        )
            .prop_map(|(vector, origins)| Message::Subscribe(Subscribe {
                vector,
                origins,
                rewind: false
            })),
        events.prop_map(Message::EventBatch),
        vector.clone().prop_map(Message::Ack),
        ".{0,64}".prop_map(|text| Message::Error(ErrorMessage {
            code: ErrorCode::Behind,
            text
        })),
        (0u8..4, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(call, body)| {
            let call = [
                RaftCall::AppendEntries,
                RaftCall::Vote,
                RaftCall::InstallSnapshot,
                RaftCall::Propose,
            ][call as usize];
            Message::RaftRequest(RaftRequest {
                call,
                body: body.into(),
            })
        }),
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|body| Message::RaftResponse(body.into())),
        vector
            .clone()
            .prop_map(|vector| Message::SnapshotRequest(SnapshotRequest { vector })),
        (vector.clone(), any::<u64>(), any::<u64>()).prop_map(|(vector, wall, keys)| {
            Message::SnapshotBegin(SnapshotBegin {
                vector,
                hlc: Hlc::new(wall >> 16, 0, A),
                keys_estimate: keys,
            })
        }),
        prop::collection::btree_set(".{0,8}", 0..6).prop_map(|keys| {
            Message::SnapshotChunk(
                keys.into_iter()
                    .map(|key| SnapshotEntry {
                        key: b(&key),
                        state: key_state(),
                    })
                    .collect(),
            )
        }),
        any::<u64>().prop_map(|keys| Message::SnapshotEnd(SnapshotEnd { keys })),
        (1..16u64, prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(extra, bytes)| {
            Message::SnapshotKeyPart(SnapshotKeyPart {
                entry_bytes: bytes.len() as u64 + extra,
                bytes: Bytes::from(bytes),
            })
        }),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Truncate { at: usize },
    Insert { at: usize, byte: u8 },
    Remove { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Remove { at }),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutation: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match *mutation {
        Mutation::Flip { at, mask } => {
            let i = at % bytes.len();
            bytes[i] ^= mask;
        }
        Mutation::Truncate { at } => bytes.truncate(at % bytes.len()),
        Mutation::Insert { at, byte } => bytes.insert(at % (bytes.len() + 1), byte),
        Mutation::Remove { at } => {
            bytes.remove(at % bytes.len());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(message in arb_message()) {
        let bytes = frame::encode_to_vec(&message).unwrap();
        let (decoded, used) = frame::decode(&bytes).unwrap().unwrap();
        prop_assert_eq!(decoded, message);
        prop_assert_eq!(used, bytes.len());
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = frame::decode(&bytes);
        let _ = frame::decode_body(&bytes);
    }

    #[test]
    fn random_bodies_behind_a_valid_prefix_give_typed_errors(body in prop::collection::vec(any::<u8>(), 1..512)) {
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        match frame::decode(&bytes) {
            Ok(Some((message, _))) => prop_assert!(frame::validate(&message).is_ok()),
            Ok(None) => prop_assert!(false, "a whole frame was there"),
            Err(_) => {}
        }
    }

    #[test]
    fn mutated_frames_give_typed_errors_or_valid_messages(
        message in arb_message(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = frame::encode_to_vec(&message).unwrap();
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        if let Ok(Some((decoded, used))) = frame::decode(&bytes) {
            prop_assert!(used <= bytes.len());
            prop_assert!(frame::validate(&decoded).is_ok());
        }
    }
}

/// The package's directory: cargo sets it when it runs the test (the path compiled in is only a
/// fallback, stale when a build is reused from another checkout).
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A batch already encoded, and an ack, come out of `encode_to_vec` in a buffer sized to the
/// frame: a received frame lives as long as the keys and values sliced from it, and a buffer
/// of twice its size would keep the rest alive with it.
#[test]
fn encoded_batches_and_acks_fill_their_buffers() {
    let mut batch = braid_protocol::EncodedEvents::default();
    for seq in 1..=3 {
        batch
            .push(&event(
                seq,
                "key",
                Op::Write {
                    replaces: None,
                    write: Write::Set(b("value")),
                },
            ))
            .unwrap();
    }
    for message in [Message::EncodedEvents(batch), Message::Ack(vector())] {
        let frame = frame::encode_to_vec(&message).unwrap();
        assert!(
            frame.capacity() <= frame.len() + 64,
            "{} frame of {} bytes in {}",
            message.kind(),
            frame.len(),
            frame.capacity()
        );
    }
}
