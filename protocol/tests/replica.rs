//! The replica core driven by hand: exact outputs for given inputs, and small meshes whose
//! messages go through the real encoding, checking convergence against the oracle, exactly-once
//! apply, echo freedom, relay and bounds.

use std::collections::{BTreeMap, VecDeque};

use braid_conflict::{oracle, Command, Hlc, Value};
use braid_protocol::frame;
use braid_protocol::{
    ChangeEvent, MemoryStorage, Message, NodeId, PeerError, Replica, ReplicaConfig, Seq,
    SnapshotEntry, StreamKind, Subscribe, Topology, Transmit, VersionVector,
};
use bytes::Bytes;

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const C: NodeId = NodeId(3);

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn replica(node: NodeId, topology: &Topology) -> Replica<MemoryStorage> {
    Replica::open(
        ReplicaConfig::new(node),
        topology.clone(),
        MemoryStorage::default(),
        0,
    )
    .unwrap()
}

/// Replicas joined by ordered, lossless streams; every message is encoded and decoded.
struct Net {
    replicas: BTreeMap<NodeId, Replica<MemoryStorage>>,
    /// Messages in flight, per (from, to, stream kind at the receiver).
    wires: BTreeMap<(NodeId, NodeId, StreamKind), VecDeque<Message>>,
    now_ms: u64,
    /// Every event issued, for the oracle.
    issued: Vec<ChangeEvent>,
}

impl Net {
    fn new(topology: &Topology) -> Net {
        let replicas = topology
            .nodes()
            .map(|n| (n, replica(n, topology)))
            .collect();
        Net {
            replicas,
            wires: BTreeMap::new(),
            now_ms: 1_000,
            issued: Vec::new(),
        }
    }

    /// `subscriber` subscribes to `publisher`.
    fn connect(&mut self, subscriber: NodeId, publisher: NodeId) {
        let now = self.now_ms;
        self.replicas
            .get_mut(&publisher)
            .unwrap()
            .handle_feed_open(subscriber, now)
            .unwrap();
        self.replicas
            .get_mut(&subscriber)
            .unwrap()
            .handle_subscription_open(publisher, now)
            .unwrap();
        self.collect();
    }

    /// Connects every linked pair both ways.
    fn connect_links(&mut self, topology: &Topology) {
        for (x, y) in topology.links() {
            self.connect(x, y);
            self.connect(y, x);
        }
        self.run();
    }

    fn disconnect(&mut self, subscriber: NodeId, publisher: NodeId) {
        let now = self.now_ms;
        if let Some(r) = self.replicas.get_mut(&publisher) {
            r.handle_feed_closed(subscriber, now);
        }
        if let Some(r) = self.replicas.get_mut(&subscriber) {
            r.handle_subscription_closed(publisher, now);
        }
        self.wires
            .remove(&(subscriber, publisher, StreamKind::Feed));
        self.wires
            .remove(&(publisher, subscriber, StreamKind::Subscription));
        self.collect();
    }

    /// Moves every pending transmit onto its wire, through the real encoding.
    fn collect(&mut self) {
        for (node, replica) in self.replicas.iter_mut() {
            while let Some(Transmit {
                peer,
                stream,
                message,
            }) = replica.poll_transmit()
            {
                let bytes = frame::encode_to_vec(&message).unwrap();
                let (decoded, _) = frame::decode(&bytes).unwrap().unwrap();
                let at_receiver = match stream {
                    StreamKind::Subscription => StreamKind::Feed,
                    StreamKind::Feed => StreamKind::Subscription,
                };
                self.wires
                    .entry((*node, peer, at_receiver))
                    .or_default()
                    .push_back(decoded);
            }
        }
    }

    /// Lets `ms` pass and ticks every replica.
    fn tick_all(&mut self, ms: u64) {
        self.now_ms += ms;
        let now = self.now_ms;
        for replica in self.replicas.values_mut() {
            replica.handle_tick(now).unwrap();
        }
        self.collect();
    }

    fn write(&mut self, node: NodeId, key: &str, command: Command) -> i64 {
        self.now_ms += 1;
        let replica = self.replicas.get_mut(&node).unwrap();
        let before = replica.vector().get(node);
        let result = replica
            .handle_commands(vec![(b(key), command)], self.now_ms)
            .unwrap();
        let after = replica.vector().get(node);
        if after > before {
            let storage = replica.storage_mut();
            let event = storage.log().get(node, after).unwrap().clone();
            self.issued.push(event);
        }
        self.collect();
        result[0].clone().unwrap()
    }

    /// Delivers messages until nothing is in flight. Returns how many were delivered.
    fn run(&mut self) -> usize {
        let mut delivered = 0;
        while let Some(link) = self
            .wires
            .iter()
            .find(|(_, q)| !q.is_empty())
            .map(|(k, _)| *k)
        {
            let message = self.wires.get_mut(&link).unwrap().pop_front().unwrap();
            let (from, to, stream) = link;
            self.now_ms += 1;
            let now = self.now_ms;
            if let Some(replica) = self.replicas.get_mut(&to) {
                replica.handle_message(from, stream, message, now).unwrap();
                replica.check_invariants();
            }
            self.collect();
            delivered += 1;
            assert!(delivered < 100_000, "the mesh does not quiesce");
        }
        delivered
    }

    fn values(&mut self, node: NodeId) -> BTreeMap<Bytes, Value> {
        let storage = self.replicas.get_mut(&node).unwrap().storage_mut();
        storage
            .keys_in_order()
            .into_iter()
            .filter_map(|(k, s)| s.value().map(|v| (Bytes::copy_from_slice(k), v)))
            .collect()
    }

    fn oracle(&self) -> BTreeMap<Bytes, Value> {
        oracle::converged(self.issued.iter().map(|e| (&e.key, e.hlc, &e.op)))
    }

    fn total_sent(&self) -> u64 {
        self.replicas
            .values()
            .flat_map(|r| r.stats().peers.values())
            .map(|p| p.events_sent)
            .sum()
    }

    fn total_duplicates(&self) -> u64 {
        self.replicas
            .values()
            .flat_map(|r| r.stats().peers.values())
            .map(|p| p.events_duplicate)
            .sum()
    }

    fn assert_converged(&mut self) {
        let expected = self.oracle();
        let nodes: Vec<NodeId> = self.replicas.keys().copied().collect();
        for node in nodes {
            assert_eq!(
                self.values(node),
                expected,
                "{node} differs from the oracle"
            );
        }
    }
}

fn mixed_writes(net: &mut Net, nodes: &[NodeId], rounds: usize) {
    for round in 0..rounds {
        for (i, node) in nodes.iter().enumerate() {
            let key = format!("k{}", round % 3);
            net.write(*node, &key, Command::Set(b(&format!("{node}-{round}"))));
            net.write(*node, "counter", Command::IncrBy(i as i64 + 1));
            net.write(*node, "set", Command::SetAdd(vec![b(&format!("m{round}"))]));
            if round % 2 == 1 {
                net.write(
                    *node,
                    "set",
                    Command::SetRemove(vec![b(&format!("m{}", round - 1))]),
                );
            }
            net.write(
                *node,
                "hash",
                Command::HashSet(vec![(b(&format!("f{i}")), b(&format!("{round}")))]),
            );
        }
    }
}

#[test]
fn opening_a_subscription_sends_the_vector_and_the_origins_wanted() {
    let topology = Topology::full_mesh([A, B, C]).unwrap();
    let mut a = replica(A, &topology);
    a.handle_commands(vec![(b("k"), Command::Set(b("v")))], 10)
        .unwrap();
    a.handle_subscription_open(B, 20).unwrap();
    let mut vector = VersionVector::new();
    vector.advance(A, Seq(1));
    let subscribe = |origins: Vec<NodeId>| {
        Message::Subscribe(Subscribe {
            vector: vector.clone(),
            origins,
            rewind: false,
        })
    };
    // Only B: C may be about to connect, so its events are not pulled through B yet.
    assert_eq!(
        a.poll_transmit(),
        Some(Transmit {
            peer: B,
            stream: StreamKind::Subscription,
            message: subscribe(vec![B])
        })
    );
    assert_eq!(a.poll_transmit(), None);
    // C stays unreachable past the grace: B relays C's events.
    let grace = a.config().route_fallback_ms;
    a.handle_tick(grace).unwrap();
    let sent: Vec<Transmit> = std::iter::from_fn(|| a.poll_transmit()).collect();
    assert!(
        sent.contains(&Transmit {
            peer: B,
            stream: StreamKind::Subscription,
            message: subscribe(vec![B, C])
        }),
        "{sent:?}"
    );
    // C connects: each origin comes from itself again.
    a.handle_subscription_open(C, grace + 10).unwrap();
    let sent: Vec<Transmit> = std::iter::from_fn(|| a.poll_transmit()).collect();
    assert_eq!(
        sent,
        vec![
            Transmit {
                peer: B,
                stream: StreamKind::Subscription,
                message: subscribe(vec![B])
            },
            Transmit {
                peer: C,
                stream: StreamKind::Subscription,
                message: subscribe(vec![C])
            },
        ]
    );
}

#[test]
fn a_feed_streams_what_the_subscriber_lacks_and_never_its_own_events() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut a = replica(A, &topology);
    a.handle_commands(
        vec![
            (b("x"), Command::Set(b("1"))),
            (b("y"), Command::Set(b("2"))),
        ],
        10,
    )
    .unwrap();
    a.handle_feed_open(B, 11).unwrap();
    assert_eq!(
        a.poll_transmit(),
        None,
        "nothing before the peer subscribes"
    );
    let mut has_one = VersionVector::new();
    has_one.advance(A, Seq(1));
    a.handle_message(
        B,
        StreamKind::Feed,
        Message::Subscribe(Subscribe {
            vector: has_one,
            origins: vec![A, B],
            rewind: false,
        }),
        12,
    )
    .unwrap();
    match a.poll_transmit() {
        Some(Transmit {
            peer: B,
            stream: StreamKind::Feed,
            message: Message::EncodedEvents(batch),
        }) => {
            let events = batch.decode().unwrap();
            assert_eq!((batch.events(), events.len()), (1, 1));
            assert_eq!(
                (events[0].origin, events[0].seq, &events[0].key[..]),
                (A, Seq(2), &b"y"[..])
            );
        }
        other => panic!("expected one batch, got {other:?}"),
    }
    assert_eq!(a.poll_transmit(), None);
}

#[test]
fn duplicates_and_echoes_are_dropped_after_the_vector_comparison() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut a = replica(A, &topology);
    let mut b_replica = replica(B, &topology);
    b_replica
        .handle_commands(vec![(b("k"), Command::IncrBy(5))], 10)
        .unwrap();
    let event = b_replica.storage_mut().log().iter().next().unwrap().clone();
    a.handle_subscription_open(B, 11).unwrap();
    while a.poll_transmit().is_some() {}
    for _ in 0..3 {
        a.handle_message(
            B,
            StreamKind::Subscription,
            Message::EventBatch(vec![event.clone()]),
            12,
        )
        .unwrap();
    }
    // An echo: A's own event coming back.
    a.handle_commands(vec![(b("mine"), Command::Set(b("v")))], 13)
        .unwrap();
    let own = a.storage_mut().log().get(A, Seq(1)).unwrap().clone();
    a.handle_message(
        B,
        StreamKind::Subscription,
        Message::EventBatch(vec![own]),
        14,
    )
    .unwrap();
    let counters = &a.stats().peers[&B];
    assert_eq!(
        (
            counters.events_received,
            counters.events_applied,
            counters.events_duplicate
        ),
        (4, 1, 3)
    );
    assert_eq!(
        a.read(b"k").unwrap().unwrap().value(),
        Some(Value::Counter(5))
    );
    assert_eq!(
        a.storage_mut().commits,
        2,
        "duplicates and echoes write nothing"
    );
}

#[test]
fn out_of_order_events_are_held_until_the_gap_fills() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut b_replica = replica(B, &topology);
    for i in 0..3 {
        b_replica
            .handle_commands(vec![(b("n"), Command::IncrBy(1 << i))], 10 + i)
            .unwrap();
    }
    let events: Vec<ChangeEvent> = b_replica.storage_mut().log().iter().cloned().collect();
    let mut a = replica(A, &topology);
    a.handle_subscription_open(B, 20).unwrap();
    a.handle_message(
        B,
        StreamKind::Subscription,
        Message::EventBatch(vec![events[2].clone()]),
        21,
    )
    .unwrap();
    a.handle_message(
        B,
        StreamKind::Subscription,
        Message::EventBatch(vec![events[1].clone()]),
        22,
    )
    .unwrap();
    assert_eq!(a.vector().get(B), Seq(0));
    assert_eq!(a.held_events(), 2);
    a.handle_message(
        B,
        StreamKind::Subscription,
        Message::EventBatch(vec![events[0].clone()]),
        23,
    )
    .unwrap();
    assert_eq!(a.vector().get(B), Seq(3));
    assert_eq!(a.held_events(), 0);
    assert_eq!(
        a.read(b"n").unwrap().unwrap().value(),
        Some(Value::Counter(7))
    );
}

#[test]
fn a_gap_that_stays_open_triggers_a_resubscription() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut b_replica = replica(B, &topology);
    b_replica
        .handle_commands(vec![(b("n"), Command::IncrBy(1))], 10)
        .unwrap();
    b_replica
        .handle_commands(vec![(b("n"), Command::IncrBy(1))], 11)
        .unwrap();
    let second = b_replica
        .storage_mut()
        .log()
        .get(B, Seq(2))
        .unwrap()
        .clone();
    let mut a = replica(A, &topology);
    a.handle_subscription_open(B, 0).unwrap();
    a.handle_tick(0).unwrap();
    while a.poll_transmit().is_some() {}
    a.handle_message(
        B,
        StreamKind::Subscription,
        Message::EventBatch(vec![second]),
        100,
    )
    .unwrap();
    while a.poll_transmit().is_some() {}
    let config = a.config().clone();
    a.handle_tick(100 + config.heartbeat_ms).unwrap();
    assert!(std::iter::from_fn(|| a.poll_transmit())
        .all(|t| !matches!(t.message, Message::Subscribe(_))));
    a.handle_tick(100 + config.resubscribe_ms + config.heartbeat_ms)
        .unwrap();
    let resent: Vec<Transmit> = std::iter::from_fn(|| a.poll_transmit()).collect();
    assert!(resent.iter().any(|t| t.peer == B && matches!(&t.message, Message::Subscribe(s) if s.vector.get(B) == Seq(0) && s.rewind)), "{resent:?}");
}

#[test]
fn a_remote_clock_too_far_ahead_is_refused_and_counted() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut a = replica(A, &topology);
    a.handle_subscription_open(B, 0).unwrap();
    let event = ChangeEvent {
        origin: B,
        seq: Seq(1),
        hlc: Hlc::new(1_000_000, 0, B),
        key: b("k"),
        op: braid_conflict::Op::Write {
            replaces: None,
            write: braid_conflict::Write::Set(b("future")),
        },
    };
    a.handle_message(
        B,
        StreamKind::Subscription,
        Message::EventBatch(vec![event.clone()]),
        1_000,
    )
    .unwrap();
    assert_eq!(a.vector().get(B), Seq(0));
    assert_eq!(a.stats().peers[&B].events_clock_refused, 1);
    // Once local time is within the bound, the same event applies.
    a.handle_message(
        B,
        StreamKind::Subscription,
        Message::EventBatch(vec![event]),
        1_000_000,
    )
    .unwrap();
    assert_eq!(a.vector().get(B), Seq(1));
}

#[test]
fn events_of_more_origins_than_a_mesh_ever_has_are_refused() {
    use braid_protocol::control::MEMBERS_MAX;
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut a = replica(A, &topology);
    a.handle_subscription_open(B, 0).unwrap();
    let event = |origin: u64| ChangeEvent {
        origin: NodeId(origin),
        seq: Seq(1),
        hlc: Hlc::new(1_000, 0, NodeId(origin)),
        key: b("k"),
        op: braid_conflict::Op::Write {
            replaces: None,
            write: braid_conflict::Write::Set(b("v")),
        },
    };
    // As many origins as a mesh ever has pass (a removed member's events are still relayed).
    let fill: Vec<ChangeEvent> = (100..100 + MEMBERS_MAX as u64).map(event).collect();
    a.handle_message(
        B,
        StreamKind::Subscription,
        Message::EventBatch(fill),
        1_000,
    )
    .unwrap();
    assert_eq!(a.vector().len(), MEMBERS_MAX);
    // One more is made up: refused whole, and nothing of it applied.
    let past = vec![event(2), event(5_000)];
    let err = a
        .handle_message(
            B,
            StreamKind::Subscription,
            Message::EventBatch(past),
            1_000,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            PeerError::TooManyOrigins {
                peer: B,
                origin: NodeId(2)
            }
        ),
        "{err}"
    );
    assert_eq!(err.code(), braid_protocol::ErrorCode::Malformed);
    assert_eq!(a.vector().len(), MEMBERS_MAX);
    // Known origins still pass.
    let more = ChangeEvent {
        seq: Seq(2),
        ..event(100)
    };
    a.handle_message(
        B,
        StreamKind::Subscription,
        Message::EventBatch(vec![more]),
        1_000,
    )
    .unwrap();
    assert_eq!(a.vector().get(NodeId(100)), Seq(2));
}

#[test]
fn unknown_peers_and_misplaced_messages_are_refused() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut a = replica(A, &topology);
    assert!(matches!(
        a.handle_feed_open(NodeId(9), 0),
        Err(PeerError::UnknownPeer(NodeId(9)))
    ));
    assert!(matches!(
        a.handle_subscription_open(A, 0),
        Err(PeerError::UnknownPeer(_))
    ));
    a.handle_feed_open(B, 0).unwrap();
    let err = a
        .handle_message(B, StreamKind::Feed, Message::EventBatch(vec![]), 0)
        .unwrap_err();
    assert!(
        matches!(
            err,
            PeerError::Unexpected {
                kind: "event_batch",
                ..
            }
        ),
        "{err}"
    );
    let err = a
        .handle_message(B, StreamKind::Subscription, Message::EventBatch(vec![]), 0)
        .unwrap_err();
    assert!(
        matches!(err, PeerError::Unexpected { .. }),
        "events on a subscription never opened: {err}"
    );
}

#[test]
fn a_slow_subscriber_holds_the_publisher_to_its_window() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut config = ReplicaConfig::new(A);
    config.batch_events_max = 2;
    let mut a = Replica::open(config.clone(), topology, MemoryStorage::default(), 0).unwrap();
    for i in 0..100 {
        a.handle_commands(vec![(b(&format!("k{i}")), Command::Set(b("v")))], i)
            .unwrap();
    }
    a.handle_feed_open(B, 200).unwrap();
    a.handle_message(
        B,
        StreamKind::Feed,
        Message::Subscribe(Subscribe {
            vector: VersionVector::new(),
            origins: vec![A],
            rewind: false,
        }),
        200,
    )
    .unwrap();
    let batches = std::iter::from_fn(|| a.poll_transmit()).count();
    assert_eq!(batches, config.peer_inflight_batches_max);
    a.handle_message(B, StreamKind::Feed, Message::Ack(VersionVector::new()), 201)
        .unwrap();
    assert_eq!(
        std::iter::from_fn(|| a.poll_transmit()).count(),
        1,
        "one ack frees one batch"
    );
}

/// `peer` subscribes to `replica`'s events of `A`, holding them through `from`.
fn subscribe_to_a(
    replica: &mut Replica<MemoryStorage>,
    peer: NodeId,
    from: u64,
    rewind: bool,
) -> Result<(), PeerError<braid_protocol::storage::Infallible>> {
    let subscribe = Subscribe {
        vector: VersionVector::from_iter([(A, Seq(from))]),
        origins: vec![A],
        rewind,
    };
    replica.handle_message(peer, StreamKind::Feed, Message::Subscribe(subscribe), 20)
}

/// `peer` acknowledges `replica`'s events of `A` through `held`.
fn ack_a(replica: &mut Replica<MemoryStorage>, peer: NodeId, held: u64) {
    let ack = Message::Ack(VersionVector::from_iter([(A, Seq(held))]));
    replica
        .handle_message(peer, StreamKind::Feed, ack, 30)
        .unwrap();
}

/// A client sets `key` to a value of `value_bytes` bytes at `replica`.
fn set_sized(replica: &mut Replica<MemoryStorage>, key: &str, value_bytes: usize, now_ms: u64) {
    let value = b(&"v".repeat(value_bytes));
    replica
        .handle_commands(vec![(b(key), Command::Set(value))], now_ms)
        .unwrap();
}

/// The batches `replica` has to send, drained, each with its peer.
fn batches_to(
    replica: &mut Replica<MemoryStorage>,
) -> Vec<(NodeId, braid_protocol::EncodedEvents)> {
    std::iter::from_fn(|| replica.poll_transmit())
        .filter_map(|t| match t.message {
            Message::EncodedEvents(batch) => Some((t.peer, batch)),
            _ => None,
        })
        .collect()
}

/// Checks that each peer's batches carry `origin`'s events from `from[peer]` on, in order,
/// each batch byte for byte what encoding the logged events gives, and cut where the log's
/// limits cut it: at `limits.0` events, or at the first event that takes the sizes the storage
/// counts to `limits.1` bytes, or at the last event the replica holds. Advances `from` past
/// them.
fn check_batches(
    replica: &Replica<MemoryStorage>,
    origin: NodeId,
    batches: &[(NodeId, braid_protocol::EncodedEvents)],
    from: &mut BTreeMap<NodeId, u64>,
    (events_max, bytes_max): (usize, usize),
) {
    for (peer, batch) in batches {
        let events = batch.decode().unwrap();
        assert!(!events.is_empty() && events.len() <= events_max);
        let mut expected = braid_protocol::EncodedEvents::default();
        let mut bytes = 0;
        for (i, event) in events.iter().enumerate() {
            assert!(
                i == 0 || bytes < bytes_max,
                "batch to {peer:?} past its byte limit"
            );
            bytes += braid_protocol::storage::event_size_bytes(event);
            let next = from.get_mut(peer).unwrap();
            *next += 1;
            assert_eq!((event.origin, event.seq), (origin, Seq(*next)));
            expected
                .push(replica.storage().log().get(origin, event.seq).unwrap())
                .unwrap();
        }
        let last = events.last().unwrap().seq;
        assert!(
            events.len() == events_max
                || bytes >= bytes_max
                || last == replica.vector().get(origin),
            "batch to {peer:?} cut short"
        );
        assert_eq!(batch.bytes(), expected.bytes(), "batch to {peer:?}");
    }
}

#[test]
fn every_feed_sends_its_events_as_the_log_gives_them_whichever_feed_encoded_them_first() {
    // Three feeds at different points of one origin's log: the first to send an event encodes
    // it, the others copy its encoding; the bytes must be the same either way, before and
    // after the log is trimmed.
    const D: NodeId = NodeId(4);
    let topology = Topology::full_mesh([A, B, C, D]).unwrap();
    let mut config = ReplicaConfig::new(A);
    // Events of 35 to 42 bytes as the storage counts them: batches end at three events or at
    // 70 bytes, whichever comes first: the byte limit cuts most at two, the count some at three.
    const LIMITS: (usize, usize) = (3, 70);
    (config.batch_events_max, config.batch_bytes_max) = LIMITS;
    config.peer_inflight_batches_max = 2;
    let mut a = Replica::open(config, topology, MemoryStorage::default(), 0).unwrap();
    let write = |a: &mut Replica<MemoryStorage>, i: u64| {
        set_sized(a, &format!("k{i}"), i as usize % 7 + 1, i)
    };
    for i in 0..10 {
        write(&mut a, i);
    }
    let mut from = BTreeMap::from([(B, 0), (C, 4), (D, 9)]);
    for (peer, seq) in from.clone() {
        a.handle_feed_open(peer, 20).unwrap();
        subscribe_to_a(&mut a, peer, seq, false).unwrap();
    }
    let batches = batches_to(&mut a);
    check_batches(&a, A, &batches, &mut from, LIMITS);
    // A window of two batches of two events each: B has four of its ten, C four of its six.
    assert_eq!(from, BTreeMap::from([(B, 4), (C, 8), (D, 10)]));
    // New writes go to whichever feed has room; acks free the rest. C stops acking early and
    // stays where its window filled: inside the run of encodings the other feeds keep.
    for i in 10..40 {
        if i < 30 {
            write(&mut a, i);
        }
        let batches = batches_to(&mut a);
        check_batches(&a, A, &batches, &mut from, LIMITS);
        // B acks more often than D, which then finds part of what it lacks encoded by B and
        // the rest only in the log: one batch from both.
        for (peer, every, until) in [(B, 3, 40), (C, 4, 18), (D, 5, 40)] {
            if i < until && (i % every == 0 || i >= 30) {
                ack_a(&mut a, peer, from[&peer]);
                let batches = batches_to(&mut a);
                check_batches(&a, A, &batches, &mut from, LIMITS);
            }
        }
    }
    assert_eq!((from[&B], from[&D]), (30, 30));
    let stalled = from[&C];
    assert!(stalled < 25);
    // The log is trimmed past where C stopped: a rewind from before the trim is refused, and
    // the window C's acks open gets what the log still holds, from after the trim, and never
    // an encoding of an event the log no longer has.
    a.handle_stable_frontier(&VersionVector::from_iter([(A, Seq(25))]))
        .unwrap();
    let refused = subscribe_to_a(&mut a, C, 20, true);
    assert!(matches!(refused, Err(PeerError::Behind { .. })));
    from.insert(C, 25);
    while from[&C] < 30 {
        ack_a(&mut a, C, stalled);
        let batches = batches_to(&mut a);
        assert!(!batches.is_empty() && batches.iter().all(|(peer, _)| *peer == C));
        check_batches(&a, A, &batches, &mut from, LIMITS);
    }
}

#[test]
fn a_batch_begun_from_encodings_and_ended_from_the_log_keeps_the_logs_limits() {
    // B's batch starts with an event C's feed encoded and goes on with events only the log
    // has: together they must stop where the log alone would (four events, or the first to
    // reach 100 bytes as the storage counts them: three of these).
    const LIMITS: (usize, usize) = (4, 100);
    let topology = Topology::full_mesh([A, B, C]).unwrap();
    let mut config = ReplicaConfig::new(A);
    (config.batch_events_max, config.batch_bytes_max) = LIMITS;
    config.peer_inflight_batches_max = 1;
    let mut a = Replica::open(config, topology, MemoryStorage::default(), 0).unwrap();
    let write = |a: &mut Replica<MemoryStorage>, i: u64| {
        set_sized(a, &format!("key{i}"), i as usize % 3 + 1, i)
    };
    let subscribe = |a: &mut Replica<MemoryStorage>, peer: NodeId, from: u64| {
        a.handle_feed_open(peer, 10).unwrap();
        subscribe_to_a(a, peer, from, false).unwrap();
    };
    let mut from = BTreeMap::from([(B, 0), (C, 3)]);
    for i in 1..=3 {
        write(&mut a, i);
    }
    subscribe(&mut a, B, 0);
    subscribe(&mut a, C, 3);
    // B got the first three; C, which had them, gets the fourth: encoded by C's feed.
    write(&mut a, 4);
    let batches = batches_to(&mut a);
    assert_eq!(batches.len(), 2);
    check_batches(&a, A, &batches, &mut from, LIMITS);
    assert_eq!(from, BTreeMap::from([(B, 3), (C, 4)]));
    for i in 5..=9 {
        write(&mut a, i);
    }
    assert!(batches_to(&mut a).is_empty(), "both windows are full");
    ack_a(&mut a, B, 3);
    let batches = batches_to(&mut a);
    assert_eq!(batches.len(), 1);
    check_batches(&a, A, &batches, &mut from, LIMITS);
    assert_eq!(
        from[&B], 6,
        "the fourth from C's encoding, the fifth and sixth from the log"
    );
}

#[test]
fn full_mesh_converges_to_the_oracle_with_each_event_crossing_each_link_once() {
    let topology = Topology::full_mesh([A, B, C]).unwrap();
    let mut net = Net::new(&topology);
    net.connect_links(&topology);
    mixed_writes(&mut net, &[A, B, C], 6);
    net.run();
    net.assert_converged();
    let writes = net.issued.len() as u64;
    assert_eq!(
        net.total_sent(),
        writes * 2,
        "each event crosses N-1 = 2 links, once"
    );
    assert_eq!(net.total_duplicates(), 0);
    for replica in net.replicas.values() {
        assert_eq!(
            replica
                .stats()
                .origins
                .values()
                .map(|o| o.applied)
                .sum::<u64>()
                + replica.stats().writes,
            writes
        );
    }
}

#[test]
fn chain_relays_through_the_middle_without_echo() {
    let topology = Topology::with_links([A, B, C], [(A, B), (B, C)]).unwrap();
    let mut net = Net::new(&topology);
    net.connect_links(&topology);
    assert_eq!(net.replicas[&A].origins_from(B), vec![B, C]);
    mixed_writes(&mut net, &[A, B, C], 5);
    net.run();
    net.assert_converged();
    let writes = net.issued.len() as u64;
    // A chain of 3 has 2 links: every event crosses each once.
    assert_eq!(net.total_sent(), writes * 2);
    assert_eq!(net.total_duplicates(), 0);
}

#[test]
fn a_dead_regions_events_are_fetched_from_a_region_that_holds_them() {
    let topology = Topology::full_mesh([A, B, C]).unwrap();
    let mut net = Net::new(&topology);
    // C is down. A and B are connected.
    net.connect(A, B);
    net.connect(B, A);
    for i in 0..20 {
        net.write(A, &format!("k{i}"), Command::Set(b("from-a")));
    }
    net.run();
    // A dies for good.
    net.disconnect(A, B);
    net.disconnect(B, A);
    net.replicas.remove(&A);
    // C comes up and can reach only B.
    net.connect(C, B);
    net.connect(B, C);
    assert_eq!(
        net.replicas[&C].origins_from(B),
        vec![B],
        "A might still come back"
    );
    net.tick_all(ReplicaConfig::new(C).route_fallback_ms);
    assert_eq!(
        net.replicas[&C].origins_from(B),
        vec![A, B],
        "A is gone: B relays its events"
    );
    net.run();
    assert_eq!(net.replicas[&C].vector().get(A), Seq(20));
    let expected = net.oracle();
    assert_eq!(net.values(C), expected);
}

#[test]
fn when_the_origin_returns_its_events_come_from_it_again() {
    let topology = Topology::full_mesh([A, B, C]).unwrap();
    let mut net = Net::new(&topology);
    net.connect_links(&topology);
    net.disconnect(C, A);
    net.tick_all(ReplicaConfig::new(C).route_fallback_ms);
    assert_eq!(net.replicas[&C].origins_from(B), vec![A, B]);
    net.write(A, "k", Command::Set(b("1")));
    net.run();
    net.connect(C, A);
    assert_eq!(net.replicas[&C].origins_from(A), vec![A]);
    assert_eq!(net.replicas[&C].origins_from(B), vec![B]);
    net.write(A, "k", Command::Set(b("2")));
    net.run();
    net.assert_converged();
}

#[test]
fn a_restarted_replica_resumes_from_its_vector() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut net = Net::new(&topology);
    net.connect_links(&topology);
    for i in 0..10 {
        net.write(B, "n", Command::IncrBy(i + 1));
    }
    net.run();
    // A restarts on the same storage.
    net.disconnect(A, B);
    net.disconnect(B, A);
    let storage = net.replicas.remove(&A).unwrap().into_storage();
    let restarted =
        Replica::open(ReplicaConfig::new(A), topology.clone(), storage, net.now_ms).unwrap();
    assert_eq!(restarted.vector().get(B), Seq(10));
    assert!(
        restarted.hlc() >= net.issued.last().unwrap().hlc,
        "the HLC resumes above what it saw"
    );
    net.replicas.insert(A, restarted);
    for i in 0..5 {
        net.write(B, "n", Command::IncrBy(i + 1));
    }
    net.connect_links(&topology);
    net.run();
    net.assert_converged();
    assert_eq!(
        net.replicas[&B].stats().peers[&A].events_sent,
        15,
        "no full resync: only the 5 new events were sent after restart"
    );
}

#[test]
fn a_lost_batch_is_noticed_from_heartbeats_and_fetched_again() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut a = replica(A, &topology);
    a.handle_subscription_open(B, 0).unwrap();
    while a.poll_transmit().is_some() {}
    // B wrote 3 events; their batch was lost. Only B's heartbeat arrives.
    let mut theirs = VersionVector::new();
    theirs.advance(B, Seq(3));
    a.handle_message(B, StreamKind::Subscription, Message::Heartbeat(theirs), 10)
        .unwrap();
    let config = a.config().clone();
    let mut now = 10;
    let mut rewound = false;
    for _ in 0..10 {
        now += config.heartbeat_ms;
        a.handle_tick(now).unwrap();
        rewound |= std::iter::from_fn(|| a.poll_transmit()).any(
            |t| matches!(t.message, Message::Subscribe(s) if s.rewind && s.vector.get(B) == Seq(0)),
        );
    }
    assert!(rewound, "a stalled origin must be fetched again");
}

#[test]
fn refused_and_no_op_commands_write_nothing() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut a = replica(A, &topology);
    a.handle_commands(vec![(b("s"), Command::SetAdd(vec![b("x")]))], 1)
        .unwrap();
    let results = a
        .handle_commands(
            vec![
                (b("missing"), Command::Delete),
                (b("s"), Command::IncrBy(1)),
                (b("absent"), Command::SetRemove(vec![b("y")])),
                (b("k"), Command::Set(b("v"))),
            ],
            2,
        )
        .unwrap();
    assert_eq!(results.len(), 4);
    assert!(results[1].is_err(), "INCR on a set is refused");
    let keys: Vec<Bytes> = a
        .storage_mut()
        .keys_in_order()
        .into_iter()
        .map(|(k, _)| Bytes::copy_from_slice(k))
        .collect();
    assert_eq!(
        keys,
        vec![b("k"), b("s")],
        "only keys a command changed are stored"
    );
    // A refused command read the set's state (the in-memory storage hands its own copy over):
    // it was given back whole.
    assert_eq!(
        a.read(b"s").unwrap().unwrap().value(),
        Some(Value::Set(vec![b("x")]))
    );
    let refused = a
        .handle_commands(vec![(b("s"), Command::Set(b("no")))], 3)
        .unwrap();
    assert!(refused[0].is_ok(), "SET replaces any type");
    let refused = a
        .handle_commands(vec![(b("k"), Command::SetAdd(vec![b("y")]))], 4)
        .unwrap();
    assert!(refused[0].is_err(), "SADD on a string is refused");
    assert_eq!(
        a.read(b"k").unwrap().unwrap().value(),
        Some(Value::String(b("v"))),
        "a batch with no change still gives back what it read"
    );
}

#[test]
fn a_gap_that_fills_in_time_causes_no_rewind() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut b_replica = replica(B, &topology);
    b_replica
        .handle_commands(vec![(b("n"), Command::IncrBy(1))], 10)
        .unwrap();
    b_replica
        .handle_commands(vec![(b("n"), Command::IncrBy(1))], 11)
        .unwrap();
    let events: Vec<ChangeEvent> = b_replica.storage_mut().log().iter().cloned().collect();
    let mut a = replica(A, &topology);
    a.handle_subscription_open(B, 0).unwrap();
    a.handle_message(
        B,
        StreamKind::Subscription,
        Message::EventBatch(vec![events[1].clone()]),
        100,
    )
    .unwrap();
    a.handle_message(
        B,
        StreamKind::Subscription,
        Message::EventBatch(vec![events[0].clone()]),
        105,
    )
    .unwrap();
    while a.poll_transmit().is_some() {}
    let config = a.config().clone();
    for tick in 1..5 {
        a.handle_tick(100 + tick * config.resubscribe_ms).unwrap();
        let rewinds = std::iter::from_fn(|| a.poll_transmit())
            .filter(|t| matches!(&t.message, Message::Subscribe(s) if s.rewind))
            .count();
        assert_eq!(rewinds, 0, "the gap filled: nothing to repair");
    }
}

#[test]
fn the_log_is_trimmed_through_the_stable_frontier_and_a_subscriber_behind_it_is_told() {
    let topology = Topology::full_mesh([A, B, C]).unwrap();
    let mut net = Net::new(&topology);
    net.connect_links(&topology);
    mixed_writes(&mut net, &[A, B], 3);
    net.run();
    net.assert_converged();
    let vector = net.replicas[&A].vector().clone();
    let events_before = net.replicas[&A].log_events();
    assert_eq!(
        events_before,
        vector.iter().map(|(_, s)| s.0).sum::<u64>(),
        "every applied event is in the log"
    );

    // The frontier is everyone's vector, except that it names more of B than A holds: the
    // replica trims only what it has.
    let mut frontier = vector.clone();
    frontier.advance(B, Seq(vector.get(B).0 + 100));
    let a_seq = vector.get(A);
    let trimmed_to = Seq(a_seq.0 - 2);
    frontier = frontier
        .iter()
        .map(|(o, s)| if o == A { (o, trimmed_to) } else { (o, s) })
        .collect();
    let deleted = net
        .replicas
        .get_mut(&A)
        .unwrap()
        .handle_stable_frontier(&frontier)
        .unwrap();
    let a = &net.replicas[&A];
    assert_eq!(deleted, trimmed_to.0 + vector.get(B).0);
    assert_eq!(a.log_events(), events_before - deleted);
    assert_eq!(a.trimmed().get(B), vector.get(B), "clamped to what A holds");
    assert_eq!(a.stats().log_events_trimmed, deleted);
    a.check_invariants();
    let storage = net.replicas.get_mut(&A).unwrap().storage_mut();
    let left: Vec<(NodeId, Seq)> = storage.log().iter().map(|e| (e.origin, e.seq)).collect();
    assert_eq!(
        left,
        vec![(A, Seq(a_seq.0 - 1)), (A, a_seq)],
        "only A's two newest events are left"
    );
    // Trimming again at the same frontier, or behind it, deletes nothing.
    let replica = net.replicas.get_mut(&A).unwrap();
    assert_eq!(replica.handle_stable_frontier(&frontier).unwrap(), 0);
    assert_eq!(
        replica
            .handle_stable_frontier(&VersionVector::new())
            .unwrap(),
        0
    );

    // Everyone still converges and goes on replicating.
    mixed_writes(&mut net, &[A, B, C], 2);
    net.run();
    net.assert_converged();

    // A subscriber that asks A for A's events from before the trim is told it is behind.
    net.disconnect(C, A);
    let a = net.replicas.get_mut(&A).unwrap();
    a.handle_feed_open(C, 0).unwrap();
    let stale = Message::Subscribe(Subscribe {
        vector: VersionVector::new(),
        origins: vec![A],
        rewind: false,
    });
    let err = a.handle_message(C, StreamKind::Feed, stale, 0).unwrap_err();
    assert!(
        matches!(err, PeerError::Behind { peer: C, origin: A, trimmed, .. } if trimmed == trimmed_to),
        "{err}"
    );
    assert_eq!(err.code(), braid_protocol::ErrorCode::Behind);
    assert_eq!(a.stats().subscriptions_behind, 1);
    // From the trimmed point on, it is served.
    let fresh = Message::Subscribe(Subscribe {
        vector: [(A, trimmed_to)].into_iter().collect(),
        origins: vec![A],
        rewind: false,
    });
    a.handle_message(C, StreamKind::Feed, fresh, 0).unwrap();
}

#[test]
fn a_restarted_replica_remembers_how_far_its_log_was_trimmed() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut net = Net::new(&topology);
    net.connect_links(&topology);
    for i in 0..6 {
        net.write(B, "n", Command::IncrBy(i + 1));
    }
    net.run();
    let frontier: VersionVector = [(B, Seq(4))].into_iter().collect();
    let a = net.replicas.get_mut(&A).unwrap();
    assert_eq!(a.handle_stable_frontier(&frontier).unwrap(), 4);
    net.disconnect(A, B);
    net.disconnect(B, A);
    let storage = net.replicas.remove(&A).unwrap().into_storage();
    let restarted =
        Replica::open(ReplicaConfig::new(A), topology.clone(), storage, net.now_ms).unwrap();
    assert_eq!(restarted.trimmed(), &frontier);
    assert_eq!(restarted.log_events(), 2);
}

#[test]
fn a_new_topology_takes_effect_without_a_restart() {
    let mesh = Topology::full_mesh([A, B, C]).unwrap();
    let chain = Topology::with_links([A, B, C], [(A, B), (B, C)]).unwrap();
    let mut net = Net::new(&mesh);
    net.connect_links(&mesh);
    mixed_writes(&mut net, &[A, C], 1);
    net.run();
    net.assert_converged();

    // Every replica takes the chain; the driver closes the streams of the cut link.
    let now = net.now_ms;
    for replica in net.replicas.values_mut() {
        replica.handle_topology(chain.clone(), now).unwrap();
    }
    net.disconnect(A, C);
    net.disconnect(C, A);
    net.tick_all(5_000);
    net.run();
    let c = &net.replicas[&C];
    assert_eq!(c.topology(), &chain);
    assert!(!c.is_subscribed(A) && !c.has_feed(A));
    assert_eq!(
        c.origins_from(B),
        vec![A, B],
        "A's events now come through B"
    );
    // A and C may not open streams to each other any more.
    let a = net.replicas.get_mut(&A).unwrap();
    assert!(matches!(
        a.handle_feed_open(C, now),
        Err(PeerError::NotLinked(peer)) if peer == C
    ));
    // Writes still reach everyone, relayed, each applied once.
    mixed_writes(&mut net, &[A, B, C], 2);
    net.run();
    net.assert_converged();
    assert_eq!(net.total_duplicates(), 0, "no echo through the relay");

    // Back to the mesh: the link comes back and A's events come from A again.
    let now = net.now_ms;
    for replica in net.replicas.values_mut() {
        replica.handle_topology(mesh.clone(), now).unwrap();
    }
    net.connect(A, C);
    net.connect(C, A);
    net.run();
    net.tick_all(5_000);
    net.run();
    assert_eq!(net.replicas[&C].origins_from(A), vec![A]);
    mixed_writes(&mut net, &[A, C], 1);
    net.run();
    net.assert_converged();

    // A topology without the replica itself is refused, and changes nothing.
    let without_c = Topology::full_mesh([A, B]).unwrap();
    let c = net.replicas.get_mut(&C).unwrap();
    assert!(c.handle_topology(without_c, now).is_err());
    assert_eq!(c.topology(), &mesh);
}

/// Every key of `node`'s storage as snapshot entries, in key order, with its vector and HLC.
fn snapshot_of(net: &mut Net, node: NodeId) -> (Vec<SnapshotEntry>, VersionVector, Hlc) {
    let replica = net.replicas.get_mut(&node).unwrap();
    let (vector, hlc) = (replica.vector().clone(), replica.hlc());
    let entries = replica
        .storage_mut()
        .keys_in_order()
        .into_iter()
        .map(|(key, state)| SnapshotEntry {
            key: Bytes::copy_from_slice(key),
            state: state.clone(),
        })
        .collect();
    (entries, vector, hlc)
}

#[test]
fn a_region_past_the_others_logs_is_resynchronised_by_snapshot_and_converges() {
    let topology = Topology::full_mesh([A, B, C]).unwrap();
    let mut net = Net::new(&topology);
    net.connect_links(&topology);
    mixed_writes(&mut net, &[A, B, C], 2);
    net.run();
    // C goes away; A and B write on and trim their logs through what they both hold: C can no
    // longer be fed from them.
    net.disconnect(C, A);
    net.disconnect(C, B);
    net.disconnect(A, C);
    net.disconnect(B, C);
    mixed_writes(&mut net, &[A, B], 4);
    net.run();
    let frontier = net.replicas[&A].vector().clone();
    for node in [A, B] {
        let replica = net.replicas.get_mut(&node).unwrap();
        assert!(replica.handle_stable_frontier(&frontier).unwrap() > 0);
    }
    // C wrote meanwhile too: its own writes must survive the resynchronisation.
    net.write(C, "c-alone", Command::Set(b("kept")));
    net.write(C, "counter", Command::IncrBy(100));

    // C asks A for what it lacks, and is told it is behind.
    let c_vector = net.replicas[&C].vector().clone();
    let a = net.replicas.get_mut(&A).unwrap();
    a.handle_feed_open(C, 0).unwrap();
    let asked = Message::Subscribe(Subscribe {
        vector: c_vector,
        origins: vec![A],
        rewind: false,
    });
    let err = a.handle_message(C, StreamKind::Feed, asked, 0).unwrap_err();
    assert!(matches!(err, PeerError::Behind { .. }), "{err}");
    a.handle_feed_closed(C, 0);

    // A snapshot of A, in two chunks (one merged twice: harmless), brings C up to A's vector.
    let (entries, vector, hlc) = snapshot_of(&mut net, A);
    let (first, second) = entries.split_at(entries.len() / 2);
    let now = net.now_ms;
    let c = net.replicas.get_mut(&C).unwrap();
    c.handle_snapshot_chunk(first.to_vec(), hlc, now).unwrap();
    c.handle_snapshot_chunk(first.to_vec(), hlc, now).unwrap();
    c.handle_snapshot_chunk(second.to_vec(), hlc, now).unwrap();
    c.handle_snapshot_end(&vector, hlc, now).unwrap();
    c.check_invariants();
    assert!(c.vector().dominates(&vector));
    assert!(c.hlc() >= hlc);
    assert_eq!(c.stats().snapshots_installed, 1);
    for origin in [A, B] {
        assert_eq!(
            c.trimmed().get(origin),
            vector.get(origin),
            "in the states, not the log"
        );
    }
    // It subscribes again from there and everyone converges, C's own writes included.
    net.connect_links(&topology);
    net.run();
    mixed_writes(&mut net, &[A, B, C], 1);
    net.run();
    net.assert_converged();
    let values = net.values(A);
    assert_eq!(values.get(&b("c-alone")), Some(&Value::String(b("kept"))));
}

#[test]
fn retention_cuts_the_log_by_size_and_by_age_whoever_lacks_the_events() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut config = ReplicaConfig::new(A);
    config.retention_events_max = Some(10);
    let mut a = Replica::open(config, topology.clone(), MemoryStorage::default(), 0).unwrap();
    for i in 0..50u64 {
        a.handle_commands(vec![(b(&format!("k{i}")), Command::Set(b("v")))], 1_000 + i)
            .unwrap();
    }
    assert_eq!(a.log_events(), 50, "no bound applies before a tick");
    a.handle_tick(2_000).unwrap();
    assert_eq!(a.log_events(), 10);
    assert_eq!(a.trimmed().get(A), Seq(40));
    assert_eq!(a.stats().log_events_retention_trimmed, 40);
    a.check_invariants();
    // B never had any of them: it is told it is behind, and needs a snapshot.
    a.handle_feed_open(B, 2_000).unwrap();
    let asked = Message::Subscribe(Subscribe {
        vector: VersionVector::new(),
        origins: vec![A],
        rewind: false,
    });
    let err = a
        .handle_message(B, StreamKind::Feed, asked, 2_000)
        .unwrap_err();
    assert!(
        matches!(err, PeerError::Behind { trimmed, .. } if trimmed == Seq(40)),
        "{err}"
    );

    // By age: events older than 500 ms go; the rest stay.
    let mut config = ReplicaConfig::new(A);
    config.retention_age_ms = Some(500);
    let mut a = Replica::open(config, topology, MemoryStorage::default(), 0).unwrap();
    for i in 0..20u64 {
        // Written at 1,000 .. 1,950 ms.
        a.handle_commands(
            vec![(b(&format!("k{i}")), Command::Set(b("v")))],
            1_000 + 50 * i,
        )
        .unwrap();
    }
    a.handle_tick(2_000).unwrap();
    // Older than 1,500 ms: the first ten.
    assert_eq!(a.trimmed().get(A), Seq(10));
    assert_eq!(a.log_events(), 10);
    a.handle_tick(10_000).unwrap();
    assert_eq!(a.log_events(), 0);
    a.check_invariants();
}

#[test]
fn the_age_bound_reads_a_bounded_number_of_bytes_per_tick() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut config = ReplicaConfig::new(A);
    config.retention_age_ms = Some(500);
    let mut a = Replica::open(config, topology, MemoryStorage::default(), 0).unwrap();
    // 160 MiB of old events, in 320 of half a MiB.
    for i in 0..320u64 {
        set_sized(&mut a, &format!("k{i}"), 512 * 1024, 1_000 + i);
    }
    // Each tick takes at most 64 MiB of them (and a read more): the rest waits.
    let mut per_tick = Vec::new();
    for tick in 0..4 {
        let before = a.log_events();
        a.enforce_retention(10_000 + tick).unwrap();
        per_tick.push(before - a.log_events());
    }
    assert_eq!(per_tick.iter().sum::<u64>(), 320, "{per_tick:?}");
    assert!(per_tick.iter().all(|&n| n <= 130), "{per_tick:?}");
    assert!(per_tick[0] >= 120, "{per_tick:?}");
    a.check_invariants();
}

#[test]
fn a_snapshot_from_a_clock_far_ahead_does_not_drag_the_clock_along() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut a = replica(A, &topology);
    let now = 1_000_000;
    let far = Hlc::new(now + 10 * braid_conflict::CLOCK_SKEW_MS_MAX_DEFAULT, 0, B);
    a.handle_snapshot_end(&[(B, Seq(3))].into_iter().collect(), far, now)
        .unwrap();
    assert_eq!(a.vector().get(B), Seq(3));
    assert!(a.hlc().wall_ms <= now + braid_conflict::CLOCK_SKEW_MS_MAX_DEFAULT);
    assert!(a.hlc().wall_ms >= now, "adopted up to the bound");
    a.check_invariants();
}

#[test]
fn tombstones_at_or_below_the_stable_hlc_are_dropped_and_empty_keys_forgotten() {
    let topology = Topology::full_mesh([A, B, C]).unwrap();
    let mut net = Net::new(&topology);
    net.connect_links(&topology);
    net.write(A, "gone", Command::Set(b("x")));
    net.write(
        B,
        "hash",
        Command::HashSet(vec![(b("f1"), b("1")), (b("f2"), b("2"))]),
    );
    net.run();
    net.write(A, "gone", Command::Delete);
    net.write(B, "hash", Command::HashDelete(vec![b("f1")]));
    net.run();
    net.assert_converged();
    let hlc_of = |net: &mut Net, key: &str| {
        net.replicas
            .get_mut(&C)
            .unwrap()
            .read(key.as_bytes())
            .unwrap()
            .and_then(|s| s.oldest_tombstone())
            .unwrap()
    };
    let (gone_at, field_at) = (hlc_of(&mut net, "gone"), hlc_of(&mut net, "hash"));
    assert!(gone_at < field_at, "the string was deleted first");
    assert_eq!(
        net.replicas[&C].storage().tombstone_entries(),
        2,
        "both keys are indexed"
    );

    // Below both tombstones: nothing to drop.
    let c = net.replicas.get_mut(&C).unwrap();
    let below = Hlc::new(gone_at.wall_ms - 1, 0, gone_at.node);
    assert_eq!(c.handle_stable_hlc(below).unwrap(), 0);
    // Between them: the string's tombstone goes, and with it the whole key.
    assert_eq!(c.handle_stable_hlc(gone_at).unwrap(), 1);
    assert_eq!(c.read(b"gone").unwrap(), None, "nothing was left of it");
    assert!(c
        .read(b"hash")
        .unwrap()
        .unwrap()
        .oldest_tombstone()
        .is_some());
    // An older stable HLC changes nothing; a newer one takes the field's tombstone.
    assert_eq!(c.handle_stable_hlc(below).unwrap(), 0);
    assert_eq!(c.handle_stable_hlc(field_at).unwrap(), 1);
    let hash = c.read(b"hash").unwrap().unwrap();
    assert_eq!(hash.oldest_tombstone(), None);
    assert_eq!(hash.value(), Some(Value::Hash(vec![(b("f2"), b("2"))])));
    assert_eq!(c.stats().tombstones_collected, 2);
    assert_eq!(c.stats().keys_forgotten, 1);
    assert!(c.storage().tombstone_entries() == 0, "the index is emptied");
    assert_eq!(c.stable_hlc(), field_at);

    // C's state now differs from A's and B's only in what no future event can tell apart:
    // writes keep converging to the oracle everywhere.
    net.write(B, "gone", Command::SetAdd(vec![b("m")]));
    net.write(A, "hash", Command::HashSet(vec![(b("f1"), b("again"))]));
    net.run();
    net.assert_converged();
    // Once A and B collect at the same stable HLC, every state is identical. They drop the
    // string's tombstone under the set; the field's was overwritten by a newer value (its
    // index entry is stale, visited and removed).
    for node in [A, B] {
        let replica = net.replicas.get_mut(&node).unwrap();
        assert_eq!(replica.handle_stable_hlc(field_at).unwrap(), 1);
        assert!(replica.storage().tombstone_entries() == 0);
    }
    let states: Vec<_> = [A, B, C]
        .iter()
        .map(|n| {
            let storage = net.replicas[n].storage();
            let keys = storage.keys_in_order().into_iter();
            keys.map(|(k, s)| (Bytes::copy_from_slice(k), s.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(states[0], states[1]);
    assert_eq!(states[1], states[2]);
}

#[test]
fn a_stable_hlc_ahead_of_the_clock_becomes_its_floor_durably() {
    let topology = Topology::full_mesh([A]).unwrap();
    let mut a = replica(A, &topology);
    let ahead = Hlc::new(50_000, 3, braid_conflict::NodeId(9));
    a.handle_stable_hlc(ahead).unwrap();
    assert!(a.checkpoint().1 >= Hlc::new(50_000, 3, braid_conflict::NodeId(0)));
    // Whatever the physical clock says, every timestamp issued from now on is above it.
    a.handle_commands(vec![(b("k"), Command::Set(b("v")))], 10)
        .unwrap();
    let state = a.read(b"k").unwrap().unwrap();
    let mut probe = state.clone();
    // A write at the stable HLC loses against the one just made: it was issued above it.
    let lost = probe.apply(
        &braid_conflict::Op::Write {
            replaces: None,
            write: braid_conflict::Write::Set(b("older")),
        },
        ahead,
    );
    assert_eq!(lost.lww_lost, 1);
    // And it survives a restart.
    let storage = a.into_storage();
    let reopened = Replica::open(ReplicaConfig::new(A), topology, storage, 10).unwrap();
    assert!(reopened.hlc() >= Hlc::new(50_000, 3, braid_conflict::NodeId(0)));
}

/// Keyspace rules under which keys beginning with `orders:` are written in region A only.
fn orders_written_only_in_a() -> braid_protocol::control::Keyspaces {
    use braid_protocol::control::{KeyspaceOptions, Keyspaces};
    Keyspaces::new(
        [(
            "orders:".to_string(),
            KeyspaceOptions {
                writers: [A].into_iter().collect(),
            },
        )]
        .into_iter()
        .collect(),
    )
}

#[test]
fn a_keyspace_takes_client_writes_only_in_its_writer_regions() {
    use braid_conflict::CommandError;
    use braid_protocol::control::Keyspaces;
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut net = Net::new(&topology);
    net.connect_links(&topology);
    let rules = orders_written_only_in_a();
    for node in [A, B] {
        net.replicas
            .get_mut(&node)
            .unwrap()
            .handle_keyspaces(rules.clone());
    }
    // B refuses a write to the keyspace (and writes the rest of the group); A takes it.
    let region_b = net.replicas.get_mut(&B).unwrap();
    let results = region_b
        .handle_commands(
            vec![
                (b("orders:1"), Command::Set(b("from b"))),
                (b("other"), Command::Set(b("from b"))),
            ],
            2_000,
        )
        .unwrap();
    assert_eq!(
        results[0],
        Err(CommandError::NotWriter {
            keyspace: "orders:".into()
        })
    );
    assert_eq!(results[1], Ok(0));
    assert_eq!(
        region_b.vector().get(B),
        Seq(1),
        "only the other key was written"
    );
    net.collect();
    net.write(A, "orders:1", Command::Set(b("from a")));
    net.run();
    // What A writes reaches B all the same.
    assert_eq!(
        net.values(B).get(&b("orders:1")),
        Some(&Value::String(b("from a")))
    );
    // Without the rules, B takes the write again.
    let region_b = net.replicas.get_mut(&B).unwrap();
    region_b.handle_keyspaces(Keyspaces::default());
    let results = region_b
        .handle_commands(vec![(b("orders:1"), Command::Set(b("b again")))], 3_000)
        .unwrap();
    assert_eq!(results[0], Ok(0));
}

#[test]
fn a_command_over_several_keys_is_refused_whole_or_applied_whole() {
    use braid_conflict::CommandError;
    use braid_protocol::limits::KEY_BYTES_MAX;
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut net = Net::new(&topology);
    net.connect_links(&topology);
    let rules = orders_written_only_in_a();
    let region_b = net.replicas.get_mut(&B).unwrap();
    region_b.handle_keyspaces(rules);
    let long = Bytes::from(vec![b'k'; KEY_BYTES_MAX + 1]);
    let set = |key: Bytes| (key, Command::Set(b("v")));
    let results = region_b
        .handle_commands_atomic(
            vec![
                // An MSET whose second key B may not write: none of it.
                set(b("x")),
                set(b("orders:1")),
                // A key alone, then an MSET whose first key is too long: none of it.
                set(b("alone")),
                set(long.clone()),
                set(b("y")),
                // An MSET B may write whole.
                set(b("z1")),
                set(b("z2")),
                // A too-long key on its own is refused, and nothing else with it.
                set(long),
            ],
            &[0..2, 3..5, 5..7],
            2_000,
        )
        .unwrap();
    let not_writer = Err(CommandError::NotWriter {
        keyspace: "orders:".into(),
    });
    let too_long = Err(CommandError::KeyTooLong { max: KEY_BYTES_MAX });
    assert_eq!(
        results,
        vec![
            not_writer.clone(),
            not_writer,
            Ok(0),
            too_long.clone(),
            too_long.clone(),
            Ok(0),
            Ok(0),
            too_long,
        ]
    );
    assert_eq!(region_b.vector().get(B), Seq(3), "alone, z1 and z2 only");
    net.collect();
    net.run();
    let values = net.values(A);
    let keys: Vec<&[u8]> = values.keys().map(|k| &k[..]).collect();
    assert_eq!(keys, vec![&b"alone"[..], b"z1", b"z2"]);
}

#[test]
fn a_replica_that_lost_its_own_tail_refuses_writes_until_a_snapshot_brings_it_back() {
    use braid_conflict::CommandError;
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut net = Net::new(&topology);
    net.connect_links(&topology);
    net.write(A, "k", Command::Set(b("1")));
    net.write(A, "n", Command::IncrBy(1));
    net.run();
    // What A's disk holds after the power loss: its first two writes.
    let synced = net.replicas[&A].storage().clone();
    for i in 0..3 {
        net.write(A, "n", Command::IncrBy(10));
        net.write(A, &format!("late{i}"), Command::Set(b("x")));
    }
    net.run();
    assert_eq!(
        net.replicas[&B].vector().get(A),
        Seq(8),
        "B holds all of A's events"
    );

    // A comes back from its disk: its vector says 2, B holds 8 of its events.
    net.disconnect(A, B);
    net.disconnect(B, A);
    let now = net.now_ms;
    let mut a = Replica::open(ReplicaConfig::new(A), topology.clone(), synced, now).unwrap();
    assert_eq!(a.vector().get(A), Seq(2));
    a.handle_possible_loss();
    assert!(a.is_recovering());
    let refused = a
        .handle_commands(vec![(b("k"), Command::Set(b("reused seq 3")))], now)
        .unwrap();
    assert_eq!(refused, vec![Err(CommandError::Recovering)]);
    assert_eq!(a.vector().get(A), Seq(2), "no sequence number was reused");
    net.replicas.insert(A, a);

    // Once connected, B's vector tells A what it lost, and whom to fetch it from.
    net.connect_links(&topology);
    let a = net.replicas.get_mut(&A).unwrap();
    assert!(a.is_recovering(), "B holds A's events 3..8");
    assert_eq!(a.poll_resync(), Some(B));
    assert_eq!(a.poll_resync(), None);
    // The snapshot brings them back; then A takes writes, numbered after them.
    let (entries, vector, hlc) = snapshot_of(&mut net, B);
    let now = net.now_ms;
    let a = net.replicas.get_mut(&A).unwrap();
    a.handle_snapshot_chunk(entries, hlc, now).unwrap();
    a.handle_snapshot_end(&vector, hlc, now).unwrap();
    assert!(!a.is_recovering());
    assert_eq!(a.vector().get(A), Seq(8));
    net.write(A, "n", Command::IncrBy(100));
    assert_eq!(net.replicas[&A].vector().get(A), Seq(9));
    net.run();
    net.assert_converged();
    assert_eq!(
        net.values(B).get(&b("n")),
        Some(&Value::Counter(131)),
        "every increment once, the new one too"
    );
}

#[test]
fn a_replica_recovering_its_own_tail_asks_every_holder_in_turn_not_only_the_first() {
    let topology = Topology::full_mesh([A, B, C]).unwrap();
    let mut net = Net::new(&topology);
    net.connect_links(&topology);
    net.write(A, "k", Command::Set(b("1")));
    net.run();
    let synced = net.replicas[&A].storage().clone();
    for i in 0..3 {
        net.write(A, &format!("late{i}"), Command::Set(b("x")));
    }
    net.run();
    for peer in [B, C] {
        assert_eq!(net.replicas[&peer].vector().get(A), Seq(4));
        net.disconnect(A, peer);
        net.disconnect(peer, A);
    }
    let now = net.now_ms;
    let mut a = Replica::open(ReplicaConfig::new(A), topology.clone(), synced, now).unwrap();
    a.handle_possible_loss();
    net.replicas.insert(A, a);
    net.connect_links(&topology);
    let a = net.replicas.get_mut(&A).unwrap();
    assert!(a.is_recovering());
    let first = a.poll_resync().expect("a holder is asked");
    assert_eq!(a.poll_resync(), None);
    let other = if first == B { C } else { B };
    // The first holder goes down (its snapshot never comes): the next tick asks the other,
    // which holds as many of A's events.
    net.disconnect(A, first);
    net.disconnect(first, A);
    net.tick_all(1_000);
    let a = net.replicas.get_mut(&A).unwrap();
    assert_eq!(a.poll_resync(), Some(other));
    // Removed from the mesh, the first is not asked again: the other is, tick after tick.
    net.disconnect(other, first);
    net.disconnect(first, other);
    net.replicas.remove(&first);
    let rest = Topology::full_mesh([A, other]).unwrap();
    let now = net.now_ms;
    for replica in net.replicas.values_mut() {
        let _ = replica.handle_topology(rest.clone(), now);
    }
    for _ in 0..3 {
        net.tick_all(1_000);
        let a = net.replicas.get_mut(&A).unwrap();
        assert_eq!(a.poll_resync(), Some(other));
        assert!(a.is_recovering(), "the other still holds A's events 2..4");
    }
    // Its snapshot, and its word after the removal, end the recovery.
    let (entries, vector, hlc) = snapshot_of(&mut net, other);
    let now = net.now_ms;
    let a = net.replicas.get_mut(&A).unwrap();
    a.handle_snapshot_chunk(entries, hlc, now).unwrap();
    a.handle_snapshot_end(&vector, hlc, now).unwrap();
    assert_eq!(a.vector().get(A), Seq(4));
    net.tick_all(1_000);
    net.run();
    assert!(!net.replicas[&A].is_recovering());
}

#[test]
fn a_removed_holder_of_a_replicas_own_events_needs_fresh_word_from_every_neighbor() {
    let topology = Topology::full_mesh([A, B, C]).unwrap();
    let mut a = replica(A, &topology);
    a.handle_commands(vec![(b("k"), Command::Set(b("1")))], 0)
        .unwrap();
    a.handle_possible_loss();
    for peer in [B, C] {
        a.handle_subscription_open(peer, 0).unwrap();
    }
    let heartbeat = |seq: u64| Message::Heartbeat([(A, Seq(seq))].into_iter().collect());
    // B holds as much of A as A does; C holds more, and is asked for it.
    a.handle_message(B, StreamKind::Subscription, heartbeat(1), 0)
        .unwrap();
    a.handle_message(C, StreamKind::Subscription, heartbeat(4), 0)
        .unwrap();
    assert_eq!(a.poll_resync(), Some(C));
    // C is removed. What B told is older than the removal: frames from C may have brought it
    // A's events since, so A waits for B to tell again.
    a.handle_topology(Topology::full_mesh([A, B]).unwrap(), 0)
        .unwrap();
    assert!(
        a.is_recovering(),
        "ended on B's word from before the removal"
    );
    a.handle_message(B, StreamKind::Subscription, heartbeat(4), 0)
        .unwrap();
    assert!(a.is_recovering());
    assert_eq!(a.poll_resync(), Some(B), "B holds them now");
}

#[test]
fn a_peer_holding_more_of_a_replicas_own_events_stops_its_writes_even_unannounced() {
    use braid_conflict::CommandError;
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut net = Net::new(&topology);
    net.connect_links(&topology);
    net.write(A, "k", Command::Set(b("1")));
    net.run();
    let synced = net.replicas[&A].storage().clone();
    net.write(A, "k", Command::Set(b("2")));
    net.run();
    net.disconnect(A, B);
    net.disconnect(B, A);
    let now = net.now_ms;
    // Nobody told A it may have lost writes (a data directory restored from a backup, say).
    let a = Replica::open(ReplicaConfig::new(A), topology.clone(), synced, now).unwrap();
    assert!(!a.is_recovering());
    net.replicas.insert(A, a);
    net.connect_links(&topology);
    let a = net.replicas.get_mut(&A).unwrap();
    assert!(a.is_recovering(), "B's vector gave it away");
    let refused = a
        .handle_commands(vec![(b("k"), Command::Set(b("3")))], now)
        .unwrap();
    assert_eq!(refused, vec![Err(CommandError::Recovering)]);
    assert_eq!(a.poll_resync(), Some(B));
}

#[test]
fn events_of_a_removed_region_still_pass_between_the_members() {
    // b dies having shipped its last events to c only, and is removed without a drain: a and
    // d must still get them, from c, though b is in no topology any more.
    const D: NodeId = NodeId(4);
    let all = Topology::full_mesh([A, B, C, D]).unwrap();
    let mut net = Net::new(&all);
    net.connect_links(&all);
    net.disconnect(A, B);
    net.disconnect(D, B);
    for i in 0..3 {
        net.write(B, &format!("b{i}"), Command::Set(b("v")));
    }
    net.run();
    assert_eq!(net.replicas[&C].vector().get(B), Seq(3));
    assert_eq!(net.replicas[&A].vector().get(B), Seq(0), "a waits for b");
    net.disconnect(C, B);
    for peer in [A, C, D] {
        net.disconnect(B, peer);
    }
    net.replicas.remove(&B);
    let rest = Topology::full_mesh([A, C, D]).unwrap();
    let now = net.now_ms;
    for replica in net.replicas.values_mut() {
        replica.handle_topology(rest.clone(), now).unwrap();
    }
    net.collect();
    net.run();
    for _ in 0..3 {
        net.tick_all(1_000);
        net.run();
    }
    for node in [A, D] {
        assert_eq!(
            net.replicas[&node].vector().get(B),
            Seq(3),
            "{node} got b's events from c"
        );
    }
    let c = net.values(C);
    assert_eq!(net.values(A), c);
    assert_eq!(net.values(D), c);
}

#[test]
fn a_batch_over_more_keys_than_a_scan_covers_applies_every_write_once() {
    // Twenty-five keys, each written two or three times, in one batch of commands at the
    // origin and one batch of events at the peer: past the overlay's scan, its index finds them.
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut net = Net::new(&topology);
    net.connect_links(&topology);
    let commands: Vec<(Bytes, Command)> = (0..60)
        .map(|i| {
            let key = b(&format!("k{}", i % 25));
            let command = match (i % 25) % 3 {
                0 => Command::Set(b(&format!("v{i}"))),
                1 => Command::IncrBy(i),
                _ => Command::SetAdd(vec![b(&format!("m{i}"))]),
            };
            (key, command)
        })
        .collect();
    let a = net.replicas.get_mut(&A).unwrap();
    let results = a.handle_commands(commands, 2_000).unwrap();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let issued: Vec<ChangeEvent> = (1..=60)
        .map(|seq| a.storage_mut().log().get(A, Seq(seq)).unwrap().clone())
        .collect();
    net.issued.extend(issued);
    net.collect();
    net.run();
    net.assert_converged();
    assert_eq!(net.values(B).len(), 25);
    assert_eq!(
        net.values(B).get(&b("k1")),
        Some(&Value::Counter(1 + 26 + 51)),
        "every increment of a key counted once"
    );
    assert_eq!(
        net.replicas[&A].stats().peers[&B].batches_sent,
        1,
        "the peer received the whole batch at once"
    );
}

#[test]
fn a_write_after_a_merged_snapshot_chunk_is_stamped_above_it() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    // The donor's clock runs 30 s ahead (within the bound): its state of `k` is stamped there.
    let mut donor = replica(B, &topology);
    donor
        .handle_commands(vec![(b("k"), Command::Set(b("old")))], 31_000)
        .unwrap();
    let entries = vec![SnapshotEntry {
        key: b("k"),
        state: donor.read(b"k").unwrap().unwrap(),
    }];
    let mut a = replica(A, &topology);
    a.handle_snapshot_chunk(entries, donor.hlc(), 1_000)
        .unwrap();
    let value = |a: &mut Replica<MemoryStorage>| a.read(b"k").unwrap().unwrap().value();
    assert_eq!(value(&mut a), Some(Value::String(b("old"))));
    // The snapshot is not finished (a fetch may fail half-way), and a client read "old": its
    // next write must win over it, here and everywhere.
    let results = a
        .handle_commands(vec![(b("k"), Command::Set(b("new")))], 1_000)
        .unwrap();
    assert!(results[0].is_ok());
    assert_eq!(value(&mut a), Some(Value::String(b("new"))));
    assert_eq!(a.stats().conflicts_lww, 0, "the write lost to nothing");
    // The clock's new floor is durable with the chunk: a restart issues above it too.
    let storage = a.storage().clone();
    let mut again = Replica::open(ReplicaConfig::new(A), topology.clone(), storage, 1_000).unwrap();
    again
        .handle_commands(vec![(b("k"), Command::Set(b("newer")))], 1_000)
        .unwrap();
    assert_eq!(value(&mut again), Some(Value::String(b("newer"))));
}

#[test]
fn tombstones_a_snapshot_brings_at_or_below_the_stable_hlc_are_collected_at_the_next_tick() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut donor = replica(B, &topology);
    donor
        .handle_commands(vec![(b("k"), Command::Set(b("x")))], 100)
        .unwrap();
    donor
        .handle_commands(vec![(b("k"), Command::Delete)], 200)
        .unwrap();
    let state = donor.read(b"k").unwrap().unwrap();
    let tombstone = state
        .oldest_tombstone()
        .expect("a deleted string's tombstone");
    let (vector, hlc) = (donor.vector().clone(), donor.hlc());
    let mut a = replica(A, &topology);
    // The stable HLC already covers the tombstone when the snapshot arrives, and stays put.
    a.handle_stable_hlc(tombstone).unwrap();
    a.handle_snapshot_chunk(vec![SnapshotEntry { key: b("k"), state }], hlc, 1_000)
        .unwrap();
    a.handle_snapshot_end(&vector, hlc, 1_000).unwrap();
    a.handle_tick(2_000).unwrap();
    assert_eq!(
        a.read(b"k").unwrap(),
        None,
        "collected without a new stable HLC"
    );
    assert_eq!(a.storage().tombstone_entries(), 0);
    a.check_invariants();
}

#[test]
fn an_empty_sadd_and_a_value_past_the_limit_write_no_event_peers_would_refuse() {
    use braid_protocol::limits::VALUE_BYTES_MAX;
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut a = replica(A, &topology);
    let big = Bytes::from(vec![b'v'; VALUE_BYTES_MAX + 1]);
    let results = a
        .handle_commands(
            vec![
                (b("s"), Command::SetAdd(vec![])),
                (b("k"), Command::Set(big.clone())),
                (b("s"), Command::SetAdd(vec![b("m"), big.clone()])),
                (b("h"), Command::HashSet(vec![(big.clone(), b("v"))])),
                (b("h"), Command::HashSet(vec![(b("f"), big)])),
            ],
            1,
        )
        .unwrap();
    assert_eq!(results[0], Ok(0), "nothing to add");
    for refused in &results[1..] {
        assert_eq!(
            *refused,
            Err(braid_conflict::CommandError::ValueTooLarge {
                max: VALUE_BYTES_MAX
            })
        );
    }
    assert_eq!(a.vector().get(A), Seq(0), "no event was logged");
    // A value at the limit is taken, and its event passes a peer's checks.
    let at_limit = Bytes::from(vec![b'v'; VALUE_BYTES_MAX]);
    a.handle_commands(vec![(b("k"), Command::Set(at_limit))], 2)
        .unwrap();
    let events: Vec<ChangeEvent> = a.storage_mut().log().iter().cloned().collect();
    assert_eq!(events.len(), 1);
    frame::validate(&Message::EventBatch(events)).unwrap();
}

#[test]
fn a_peers_value_past_the_limit_is_refused_on_receipt() {
    use braid_protocol::limits::VALUE_BYTES_MAX;
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut b_replica = replica(B, &topology);
    b_replica
        .handle_commands(vec![(b("k"), Command::Set(b("v")))], 10)
        .unwrap();
    let mut event = b_replica.storage_mut().log().iter().next().unwrap().clone();
    event.op = braid_conflict::Op::Write {
        replaces: None,
        write: braid_conflict::Write::Set(Bytes::from(vec![0; VALUE_BYTES_MAX + 1])),
    };
    let err = frame::validate(&Message::EventBatch(vec![event])).unwrap_err();
    assert!(err.to_string().contains("exceeds 1048576"), "{err}");
}

#[test]
fn events_held_ahead_of_a_gap_are_bounded_in_bytes_as_well_as_in_number() {
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut b_replica = replica(B, &topology);
    for i in 0..4 {
        b_replica
            .handle_commands(
                vec![(b("k"), Command::Set(Bytes::from(vec![b'x'; 1000])))],
                10 + i,
            )
            .unwrap();
    }
    let events: Vec<ChangeEvent> = b_replica.storage_mut().log().iter().cloned().collect();
    let mut config = ReplicaConfig::new(A);
    config.held_bytes_max = 2_500;
    let mut a = Replica::open(config, topology.clone(), MemoryStorage::default(), 0).unwrap();
    a.handle_subscription_open(B, 20).unwrap();
    // Events 2, 3 and 4 arrive before 1: two fit the bound, the third is dropped.
    for event in &events[1..] {
        a.handle_message(
            B,
            StreamKind::Subscription,
            Message::EventBatch(vec![event.clone()]),
            21,
        )
        .unwrap();
    }
    assert_eq!(a.held_events(), 2);
    assert_eq!(a.stats().held_dropped, 1);
    // One held already, sent again (a rewind): kept once, and not counted as dropped.
    a.handle_message(
        B,
        StreamKind::Subscription,
        Message::EventBatch(vec![events[1].clone()]),
        21,
    )
    .unwrap();
    assert_eq!(a.held_events(), 2);
    assert_eq!(a.stats().held_dropped, 1);
    a.check_invariants();
    a.handle_message(
        B,
        StreamKind::Subscription,
        Message::EventBatch(vec![events[0].clone()]),
        22,
    )
    .unwrap();
    assert_eq!(
        a.vector().get(B),
        Seq(3),
        "the held ones applied; the dropped one is fetched again"
    );
    assert_eq!(a.held_events(), 0);
    a.check_invariants();
}

#[test]
fn a_key_is_not_grown_past_what_a_snapshot_carries_and_can_always_shrink() {
    use braid_conflict::{CommandError, KEY_STATE_BYTES_MAX};
    use braid_protocol::limits::VALUE_BYTES_MAX;
    let topology = Topology::full_mesh([A, B]).unwrap();
    let mut a = replica(A, &topology);
    let member = |i: usize| {
        let mut bytes = vec![b'm'; VALUE_BYTES_MAX];
        bytes[..8].copy_from_slice(&(i as u64).to_be_bytes());
        Bytes::from(bytes)
    };
    let refused = Err(CommandError::KeyTooLarge {
        max: KEY_STATE_BYTES_MAX,
    });
    let mut added = 0;
    let mut first_refused = None;
    let mut fields_refused = None;
    for i in 0..KEY_STATE_BYTES_MAX / VALUE_BYTES_MAX + 2 {
        let results = a
            .handle_commands(
                vec![
                    (b("s"), Command::SetAdd(vec![member(i)])),
                    (
                        b("h"),
                        Command::HashSet(vec![(b(&format!("f{i}")), member(i))]),
                    ),
                ],
                1 + i as u64,
            )
            .unwrap();
        match results[0] {
            Ok(1) => added += 1,
            ref other => {
                assert_eq!(*other, refused, "member {i}");
                first_refused.get_or_insert(i);
            }
        }
        match results[1] {
            Ok(1) => assert!(fields_refused.is_none(), "field {i} after a refused one"),
            ref other => {
                assert_eq!(*other, refused, "field {i}");
                fields_refused.get_or_insert(i);
            }
        }
    }
    let first_refused = first_refused.expect("the set grew without bound");
    let fields_refused = fields_refused.expect("the hash grew without bound");
    assert!(fields_refused >= KEY_STATE_BYTES_MAX / VALUE_BYTES_MAX - 1);
    // At the bound, a value that replaces one no smaller is taken: it does not grow the key.
    let results = a
        .handle_commands(
            vec![(b("h"), Command::HashSet(vec![(b("f0"), member(99))]))],
            90,
        )
        .unwrap();
    assert_eq!(results, vec![Ok(0)], "an overwrite near the bound");
    assert_eq!(
        added, first_refused,
        "refused from the first one past the bound"
    );
    assert!(
        added >= KEY_STATE_BYTES_MAX / VALUE_BYTES_MAX - 1,
        "{added}"
    );
    // A refused write wrote nothing; the key's state still fits a snapshot, and removes are
    // taken, after which adds are again.
    let Some(Value::Set(members)) = a.read(b"s").unwrap().and_then(|s| s.value()) else {
        panic!("no set")
    };
    assert_eq!(members.len(), added);
    let results = a
        .handle_commands(
            vec![
                (b("s"), Command::SetRemove(vec![member(0), member(1)])),
                (b("s"), Command::SetAdd(vec![member(first_refused)])),
            ],
            100,
        )
        .unwrap();
    assert_eq!(results, vec![Ok(2), Ok(1)]);
    a.check_invariants();
}
