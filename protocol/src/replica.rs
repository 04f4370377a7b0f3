//! The replica core: one region's replication logic as a sans-IO state machine.
//!
//! ```text
//!            client commands          messages from peers          time
//!                  │                          │                      │
//!   handle_commands│      handle_message(peer, stream, msg)   handle_tick(now_ms)
//!   (group commit) │      handle_{subscription,feed}_{open,closed}   │
//!                  ▼                          ▼                      ▼
//!          ┌────────────────────────── Replica ──────────────────────────┐
//!          │ vector: per origin, highest seq applied contiguously         │
//!          │ clock: HLC                  held: out-of-order events (bound)│
//!          │ subscriptions (we pull)     feeds (peers pull from us)       │
//!          └─────┬───────────────────────────────┬────────────────────────┘
//!                │ Storage::commit (one atomic    │ poll_transmit: messages to send
//!                ▼ batch: keys + log + vector)    ▼ poll_timeout: next tick
//! ```
//!
//! # Contract
//!
//! The replica never awaits, spawns, locks, reads a clock or draws randomness. Methods are of
//! four kinds: getters; `handle_*` for inputs (each takes the current time in milliseconds);
//! [`Replica::handle_commands`] for writes from clients; `poll_*` for outputs, which the driver
//! drains after every input. Storage is the one synchronous seam: every change is a single atomic
//! [`Commit`], made before the call returns, so a reply sent after `handle_commands` returns is
//! sent after the write is durable.
//!
//! # Replication
//!
//! Subscriptions are pull-based. For each link, the replica subscribes to the peer with its own
//! vector and the origins it wants from that peer; the peer streams, from its change log, the
//! events of those origins the vector lacks, never the subscriber's own. Each origin is pulled
//! from one peer at a time: the linked neighbor nearest to the origin (the origin itself in a full
//! mesh), or, when none of those is reachable, the reachable neighbor known to hold the most of
//! its events. An event is applied only after every earlier event of its origin, and its apply and
//! the vector's advance are one commit; an event at or below the vector (a duplicate, or an echo)
//! is dropped after that comparison alone.
//!
//! # Garbage collection
//!
//! [`Replica::handle_stable_frontier`] takes the frontier the control plane derived from every
//! region's checkpoint and deletes the change-log events at or below it. A subscription asking
//! for deleted events is refused with [`PeerError::Behind`].
//! # Own events lost
//!
//! A replica that may have lost the tail of its own writes (the driver says so with
//! [`Replica::handle_possible_loss`] after a restart that followed a power loss), or that hears
//! a peer hold more of its own events than it does, refuses client writes
//! ([`CommandError::Recovering`]): a new write would reuse a sequence number the others already
//! hold for another event, and they would drop it as a duplicate. It asks for a data snapshot
//! from a peer that holds them ([`Replica::poll_resync`]), and takes writes again once every
//! neighbor has told its vector and its own sequence number is back to the highest any of them
//! holds.
//!
//! [`Replica::handle_stable_hlc`] takes the stable HLC the control plane derived (every event
//! some region lacks carries a greater one) and drops the tombstones at or below it, key by key
//! from the storage's tombstone index, [`GC_KEYS_PER_STEP`] index entries per step.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

use crate::encoded_tail::EncodedTails;
use crate::short_bytes::short_bytes_eq;
use braid_conflict::{ClockError, Command, CommandError, Hlc, HlcClock, KeyState};
use bytes::Bytes;
use hdrhistogram::Histogram;

use crate::control::Keyspaces;
use crate::ids::{NodeId, Seq, VersionVector};
use crate::limits::{BATCH_EVENTS_MAX, FRAME_BYTES_MAX, KEY_BYTES_MAX, VALUE_BYTES_MAX};
use crate::message::{ChangeEvent, EncodedEvents, ErrorCode, Message, SnapshotEntry, Subscribe};
use crate::storage::{event_size_bytes, Commit, Storage};
use crate::topology::Topology;

/// Tunables of the replica, with their defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// This replica's node id.
    pub node: NodeId,
    /// How far ahead of local physical time a remote HLC may be.
    pub clock_skew_ms_max: u64,
    /// Event batches sent on one feed and not yet acknowledged. With QUIC's own flow control
    /// below it, this bounds what a slow subscriber can make the publisher hold.
    pub peer_inflight_batches_max: usize,
    /// Events in one batch.
    pub batch_events_max: usize,
    /// Approximate key and value bytes in one batch; far below the frame limit.
    pub batch_bytes_max: usize,
    /// Events received ahead of a gap and held until it fills. Past this they are dropped and
    /// fetched again by the next re-subscription.
    pub held_events_max: usize,
    /// The same bound in bytes of keys and values ([`event_size_bytes`]): events of up to a few
    /// MiB each would otherwise let the count alone hold gigabytes.
    pub held_bytes_max: usize,
    /// How often each feed carries a heartbeat, and how often the replica ticks.
    pub heartbeat_ms: u64,
    /// How long a gap may stay open before the replica re-subscribes to fill it.
    pub resubscribe_ms: u64,
    /// How long a neighbor may be unreachable before its origin's events are pulled through
    /// another neighbor. The grace keeps a starting or reconnecting region from pulling
    /// everything through whichever peer answered first, and then again from the others.
    pub route_fallback_ms: u64,
    /// Retention by size: the change log is cut to at most this many events, oldest first,
    /// even events some region still lacks (that region is then resynchronised by snapshot).
    /// `None`: no bound but the stable frontier.
    pub retention_events_max: Option<u64>,
    /// Retention by age: events whose HLC is older than this many milliseconds are deleted,
    /// whoever still lacks them. `None`: no bound.
    pub retention_age_ms: Option<u64>,
}

impl ReplicaConfig {
    /// The defaults for `node`.
    pub fn new(node: NodeId) -> ReplicaConfig {
        ReplicaConfig {
            node,
            clock_skew_ms_max: braid_conflict::CLOCK_SKEW_MS_MAX_DEFAULT,
            peer_inflight_batches_max: 8,
            batch_events_max: BATCH_EVENTS_MAX,
            batch_bytes_max: 1024 * 1024,
            held_events_max: 4096,
            held_bytes_max: 64 * 1024 * 1024,
            heartbeat_ms: 1_000,
            resubscribe_ms: 2_000,
            route_fallback_ms: 2_000,
            retention_events_max: None,
            retention_age_ms: None,
        }
    }
}

const _: () = assert!(
    1024 * 1024 * 2 <= FRAME_BYTES_MAX,
    "a full batch must fit a frame"
);

/// Which of a peer's two streams a message travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StreamKind {
    /// The stream on which this replica subscribes to the peer (it sends `Subscribe` and `Ack`,
    /// it receives `EventBatch` and `Heartbeat`).
    Subscription,
    /// The stream on which the peer subscribes to this replica (the other way round).
    Feed,
}

/// A message for the driver to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The peer to send it to.
    pub peer: NodeId,
    /// The stream to send it on.
    pub stream: StreamKind,
    /// The message.
    pub message: Message,
}

/// A message from a peer that the replica refuses. The driver closes that stream (sending the
/// error code) and keeps serving everyone else; a storage error is fatal instead.
#[derive(Debug, thiserror::Error)]
pub enum PeerError<E: std::error::Error> {
    /// A message that does not belong on that stream.
    #[error("unexpected {kind} message on the {stream:?} stream of {peer}")]
    Unexpected {
        /// The peer.
        peer: NodeId,
        /// The stream.
        stream: StreamKind,
        /// The message kind.
        kind: &'static str,
    },
    /// A peer outside the topology.
    #[error("{0} is not in the topology")]
    UnknownPeer(NodeId),
    /// A peer in the topology but not linked to this node.
    #[error("{0} is not linked to this node")]
    NotLinked(NodeId),
    /// The peer closed the stream with an error.
    #[error("{peer} closed the stream: {code:?}: {text}")]
    Closed {
        /// The peer.
        peer: NodeId,
        /// Its reason.
        code: ErrorCode,
        /// Its explanation.
        text: String,
    },
    /// The peer subscribed from before what this node's change log still holds: the events it
    /// lacks were deleted (collected at the stable frontier, or by the retention bounds before
    /// every region held them), so it must be resynchronised from a snapshot.
    #[error("{peer} asks for events of {origin} after seq {from}, and the log holds them only after {trimmed}")]
    Behind {
        /// The peer.
        peer: NodeId,
        /// The origin it is behind in.
        origin: NodeId,
        /// Where it asked to start.
        from: Seq,
        /// What the log was trimmed through.
        trimmed: Seq,
    },
    /// Events of an origin past the most a mesh ever has: every id a mesh hands out, removed
    /// members' too, is one of [`MEMBERS_MAX`](crate::control::MEMBERS_MAX), so the peer made
    /// them up (each new origin would cost an entry in every vector and its own statistics).
    #[error(
        "{peer} sent events of origin {origin}, past the {} origins a mesh ever has",
        crate::control::MEMBERS_MAX
    )]
    TooManyOrigins {
        /// The peer.
        peer: NodeId,
        /// The first origin past the bound.
        origin: NodeId,
    },
    /// Storage failed: fatal.
    #[error("storage failed: {0}")]
    Storage(E),
}

impl<E: std::error::Error> PeerError<E> {
    /// The code to close the stream with.
    pub fn code(&self) -> ErrorCode {
        match self {
            PeerError::Unexpected { .. } | PeerError::TooManyOrigins { .. } => ErrorCode::Malformed,
            PeerError::UnknownPeer(_) | PeerError::NotLinked(_) => ErrorCode::UnknownPeer,
            PeerError::Closed { code, .. } => *code,
            PeerError::Behind { .. } => ErrorCode::Behind,
            PeerError::Storage(_) => ErrorCode::Internal,
        }
    }
}

/// A topology the replica cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyChange {
    /// The topology does not include this node.
    #[error("the topology does not include this node ({0})")]
    NotAMember(NodeId),
}

/// Counters of one peer's traffic, as seen by this replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Events this replica sent to the peer.
    pub events_sent: u64,
    /// Batches this replica sent to the peer.
    pub batches_sent: u64,
    /// Events received from the peer.
    pub events_received: u64,
    /// Events received from the peer and applied here.
    pub events_applied: u64,
    /// Events received from the peer and dropped after the vector comparison (duplicates and
    /// echoes).
    pub events_duplicate: u64,
    /// Events received from the peer with an HLC too far ahead (refused, fetched again later).
    pub events_clock_refused: u64,
}

/// Replication statistics, for status pages and metrics.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Local writes committed (events this replica originated).
    pub writes: u64,
    /// Per peer traffic.
    pub peers: BTreeMap<NodeId, PeerCounters>,
    /// Per origin: what was applied here of its events.
    pub origins: BTreeMap<NodeId, OriginStats>,
    /// Last-writer-wins conflicts seen (a write arriving after a newer one to the same register).
    pub conflicts_lww: u64,
    /// Out-of-order events dropped because the hold buffer was full.
    pub held_dropped: u64,
    /// Change-log events deleted, at the stable frontier and by the retention bounds alike
    /// (those also count in `log_events_retention_trimmed`).
    pub log_events_trimmed: u64,
    /// Subscriptions refused because they asked for deleted events ([`PeerError::Behind`]).
    pub subscriptions_behind: u64,
    /// Data snapshots installed (a join, or a resynchronisation).
    pub snapshots_installed: u64,
    /// Change-log events deleted by the retention bounds, beyond the stable frontier.
    pub log_events_retention_trimmed: u64,
    /// Keys whose tombstones were dropped at the stable HLC.
    pub tombstones_collected: u64,
    /// Keys forgotten altogether: nothing but tombstones was left of them.
    pub keys_forgotten: u64,
}

/// What a replica applied of one origin's events (one record, found once per apply).
#[derive(Debug, Clone)]
pub struct OriginStats {
    /// Events applied here.
    pub applied: u64,
    /// Milliseconds from the origin's HLC to the apply here.
    pub lag_ms: Histogram<u64>,
    /// The lag of the latest event applied, in milliseconds.
    pub lag_ms_last: u64,
    /// The HLC of the latest event applied (a freshness watermark).
    pub latest_hlc: Hlc,
}

/// What a replica that may lack some of its own events waits for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct OwnRecovery {
    /// Neighbors that told their vector since the recovery began.
    heard: std::collections::BTreeSet<NodeId>,
    /// Peers that hold more of this replica's own events than it does: the highest of its
    /// sequence numbers each last told (replaced at every report, dropped at one that is not
    /// ahead).
    holders: BTreeMap<NodeId, Seq>,
    /// The holder last asked for a data snapshot: a holder that cannot serve one (it went down,
    /// or away) is not asked for ever, the next holder of as many is asked in turn.
    asked: Option<NodeId>,
}

impl OwnRecovery {
    /// The most of this replica's own events any member holds, and the members holding that
    /// many. A holder the topology no longer has was removed from the mesh: what it alone
    /// held is gone with it.
    fn most(&self, topology: &Topology) -> Option<(Seq, Vec<NodeId>)> {
        let members = || {
            self.holders
                .iter()
                .filter(|(peer, _)| topology.contains(**peer))
        };
        let most = members().map(|(_, seq)| *seq).max()?;
        let peers = members()
            .filter(|(_, seq)| **seq == most)
            .map(|(peer, _)| *peer)
            .collect();
        Some((most, peers))
    }

    /// The holder of the most to ask next, while that is more than `mine`: the first after the
    /// one asked last, in id order, round again.
    fn next_source(&mut self, topology: &Topology, mine: Seq) -> Option<NodeId> {
        let (_, peers) = self.most(topology).filter(|(most, _)| *most > mine)?;
        let next = match self.asked {
            Some(asked) => peers.iter().find(|p| **p > asked).or(peers.first()),
            None => peers.first(),
        };
        self.asked = next.copied();
        self.asked
    }
}

/// Tombstone-index entries one garbage-collection step visits; the rest waits for the next
/// tick. Bounds the reads and the size of the step's one commit (a thousand small key states).
pub const GC_KEYS_PER_STEP: usize = 1024;

/// Events read at a time while applying the retention bounds.
const RETENTION_READ_EVENTS: usize = 1024;

/// Log reads one application of the retention bounds may make (the rest waits for the next
/// tick): a million events at most, however far behind the bounds the log is.
const RETENTION_READS_MAX: usize = 1024;

/// Bytes of keys and values one retention read returns at most (past its first event): events
/// are read whole, and a thousand near the value limit would be a gigabyte at once.
const RETENTION_READ_BYTES: usize = 1024 * 1024;

/// Bytes of keys and values one application of the retention bounds reads at most, over all
/// its reads (the rest waits for the next tick): it runs on the driver's thread.
const RETENTION_BYTES_PER_TICK: usize = 64 * 1024 * 1024;

/// Histograms track 1 ms .. 1 hour with 3 significant digits: lag past an hour is an outage,
/// reported as an hour.
const LAG_MS_TRACKED_MAX: u64 = 3_600_000;

fn lag_histogram() -> Histogram<u64> {
    // Valid bounds (1 <= low, high >= 2 * low, sigfig <= 5): construction cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, LAG_MS_TRACKED_MAX, 3).expect("valid histogram bounds")
}

impl Stats {
    fn new() -> Stats {
        Stats {
            writes: 0,
            peers: BTreeMap::new(),
            origins: BTreeMap::new(),
            conflicts_lww: 0,
            held_dropped: 0,
            log_events_trimmed: 0,
            subscriptions_behind: 0,
            snapshots_installed: 0,
            log_events_retention_trimmed: 0,
            tombstones_collected: 0,
            keys_forgotten: 0,
        }
    }

    fn peer(&mut self, peer: NodeId) -> &mut PeerCounters {
        self.peers.entry(peer).or_default()
    }

    fn record_apply(&mut self, event: &ChangeEvent, now_ms: u64) {
        let lag = now_ms.saturating_sub(event.hlc.wall_ms);
        let origin = self
            .origins
            .entry(event.origin)
            .or_insert_with(|| OriginStats {
                applied: 0,
                lag_ms: lag_histogram(),
                lag_ms_last: 0,
                latest_hlc: Hlc::ZERO,
            });
        origin
            .lag_ms
            .saturating_record(lag.clamp(1, LAG_MS_TRACKED_MAX));
        origin.lag_ms_last = lag;
        origin.latest_hlc = event.hlc;
        origin.applied += 1;
    }
}

/// Key states taken from storage for one commit, in the order they were first touched. A batch
/// touches a handful of keys, found by a scan; past [`OVERLAY_SCAN_MAX`] keys an index finds
/// them, so that a full batch of distinct keys is not quadratic.
struct Overlay {
    entries: Vec<OverlayEntry>,
    /// Each key's place in `entries`, once there are more than [`OVERLAY_SCAN_MAX`].
    index: Option<OverlayIndex>,
}

/// An [`Overlay`]'s index. A hash map, which the workspace otherwise forbids because its
/// iteration order could leak into behaviour: it is never iterated, and its hasher has no seed.
#[allow(clippy::disallowed_types)]
type OverlayIndex = std::collections::HashMap<Bytes, usize, rustc_hash::FxBuildHasher>;

/// Peers to pump, listed first because pumping needs the replica whole: on the stack for a
/// mesh of up to eight neighbours (this runs after every commit and every ack).
type Peers = smallvec::SmallVec<[NodeId; 8]>;

/// One key of an [`Overlay`].
struct OverlayEntry {
    key: Bytes,
    state: KeyState,
    /// Whether a command changed it (a refused or no-op command leaves it as stored).
    changed: bool,
}

/// Keys an [`Overlay`] finds by scanning.
const OVERLAY_SCAN_MAX: usize = 16;

impl Overlay {
    /// An overlay for a batch of `len` operations.
    fn for_batch(len: usize) -> Overlay {
        Overlay {
            entries: Vec::with_capacity(len.min(OVERLAY_SCAN_MAX)),
            index: None,
        }
    }

    /// Every key and its state, for a commit.
    fn into_keys(self) -> Vec<(Bytes, KeyState)> {
        self.entries.into_iter().map(|e| (e.key, e.state)).collect()
    }

    /// `key`'s entry, taken from `storage` (empty if absent) the first time.
    fn entry<S: Storage>(
        &mut self,
        key: &Bytes,
        storage: &mut S,
    ) -> Result<&mut OverlayEntry, S::Error> {
        let found = match &self.index {
            Some(index) => index.get(key).copied(),
            None => self
                .entries
                .iter()
                .position(|e| short_bytes_eq(&e.key, key)),
        };
        let at = match found {
            Some(at) => at,
            None => {
                let state = storage.take_key_state(key)?.unwrap_or_default();
                let at = self.entries.len();
                self.entries.push(OverlayEntry {
                    key: key.clone(),
                    state,
                    changed: false,
                });
                match &mut self.index {
                    Some(index) => {
                        index.insert(key.clone(), at);
                    }
                    None if self.entries.len() > OVERLAY_SCAN_MAX => {
                        let mut index = OverlayIndex::with_capacity_and_hasher(
                            2 * self.entries.len(),
                            rustc_hash::FxBuildHasher,
                        );
                        for (i, e) in self.entries.iter().enumerate() {
                            index.insert(e.key.clone(), i);
                        }
                        self.index = Some(index);
                    }
                    None => {}
                }
                at
            }
        };
        Ok(&mut self.entries[at])
    }
}

/// Our subscription to one peer.
#[derive(Debug, Clone)]
struct Subscription {
    /// The origins last requested from this peer; `None` before the first `Subscribe`.
    origins: Option<Vec<NodeId>>,
}

/// One peer's subscription to us.
#[derive(Debug, Clone)]
struct Feed {
    /// The origins the peer asked for, minus the peer itself.
    origins: Vec<NodeId>,
    /// Per origin, the last seq sent (or known to be held by the peer).
    cursor: VersionVector,
    /// Batches sent and not yet acknowledged.
    inflight: usize,
    /// Whether a `Subscribe` has arrived; nothing is sent before.
    subscribed: bool,
    /// Where the next batch starts among the origins: one further for every batch sent, so
    /// that no origin starves another.
    rotation: usize,
}

impl Feed {
    /// Whether the feed may send a batch now: subscribed, with room in its window of `window`
    /// batches.
    fn has_room(&self, window: usize) -> bool {
        self.subscribed && self.inflight < window
    }
}

/// One region's replication state machine. See the module documentation.
#[derive(Debug)]
pub struct Replica<S: Storage> {
    config: ReplicaConfig,
    storage: S,
    clock: HlcClock,
    /// Per origin, the highest seq applied contiguously; our own entry is our last seq.
    vector: VersionVector,
    topology: Topology,
    subscriptions: BTreeMap<NodeId, Subscription>,
    feeds: BTreeMap<NodeId, Feed>,
    /// Events that arrived ahead of a gap in their origin's sequence.
    held: BTreeMap<(NodeId, Seq), ChangeEvent>,
    /// The bytes of `held`'s events, as [`event_size_bytes`] counts them.
    held_bytes: usize,
    /// When the oldest still-open gap (or refused event) was noticed.
    gap_since_ms: Option<u64>,
    /// What each peer is known to have applied (from its heartbeats, subscriptions and acks).
    peer_vectors: BTreeMap<NodeId, VersionVector>,
    /// Per origin, the highest seq deleted from the change log (at the stable frontier, by the
    /// retention bounds, or below a data snapshot installed).
    trimmed: VersionVector,
    /// The HLC high-water mark of the last commit: what storage would give back after a crash.
    durable_hlc: Hlc,
    /// The greatest stable HLC the control plane gave (`Hlc::ZERO`: none yet).
    stable_hlc: Hlc,
    /// Whether the last garbage-collection step was full: the next tick takes another.
    gc_more: bool,
    /// The keyspace rules client writes are checked against.
    keyspaces: Keyspaces,
    /// Set while this replica may lack some of its own events (see the module documentation).
    own_recovery: Option<OwnRecovery>,
    /// Neighbors that told their vector since this replica opened: until all have, it does not
    /// know its own highest issued sequence number for sure (see [`Replica::checkpoint`]).
    heard: std::collections::BTreeSet<NodeId>,
    /// Peers to fetch a data snapshot from, for [`Replica::poll_resync`].
    resyncs: VecDeque<NodeId>,
    /// Since when each neighbor without an open subscription has been unreachable.
    down_since_ms: BTreeMap<NodeId, u64>,
    /// Per origin pulled from a peer that is ahead of us: our seq and since when it has not
    /// moved. A stall past `resubscribe_ms` means something was lost: re-subscribe.
    stalled: BTreeMap<NodeId, (Seq, u64)>,
    transmits: VecDeque<Transmit>,
    /// The encodings of each origin's newest events, for the feeds that send them after the
    /// first.
    tails: EncodedTails,
    next_tick_ms: u64,
    stats: Stats,
}

impl<S: Storage> Replica<S> {
    /// Opens the replica on `storage`, resuming from its last commit.
    pub fn open(
        config: ReplicaConfig,
        topology: Topology,
        mut storage: S,
        now_ms: u64,
    ) -> Result<Replica<S>, S::Error> {
        assert!(
            topology.contains(config.node),
            "the replica's own node must be in the topology"
        );
        assert!(config.peer_inflight_batches_max > 0 && config.batch_events_max > 0);
        assert!(config.batch_events_max <= BATCH_EVENTS_MAX);
        let recovered = storage.recover()?;
        let clock = HlcClock::resume(config.node, config.clock_skew_ms_max, recovered.hlc);
        let down_since_ms = topology
            .neighbors(config.node)
            .into_iter()
            .map(|n| (n, now_ms))
            .collect();
        Ok(Replica {
            down_since_ms,
            stalled: BTreeMap::new(),
            clock,
            trimmed: recovered.trimmed,
            durable_hlc: recovered.hlc,
            stable_hlc: Hlc::ZERO,
            gc_more: false,
            keyspaces: Keyspaces::default(),
            own_recovery: None,
            heard: std::collections::BTreeSet::new(),
            resyncs: VecDeque::new(),
            vector: recovered.vector,
            topology,
            storage,
            subscriptions: BTreeMap::new(),
            feeds: BTreeMap::new(),
            held: BTreeMap::new(),
            held_bytes: 0,
            gap_since_ms: None,
            peer_vectors: BTreeMap::new(),
            transmits: VecDeque::new(),
            tails: EncodedTails::default(),
            next_tick_ms: now_ms,
            stats: Stats::new(),
            config,
        })
    }

    // ---- getters ----

    /// This replica's node id.
    pub fn node(&self) -> NodeId {
        self.config.node
    }

    /// The configuration.
    pub fn config(&self) -> &ReplicaConfig {
        &self.config
    }

    /// Per origin, the highest seq applied contiguously.
    pub fn vector(&self) -> &VersionVector {
        &self.vector
    }

    /// The topology in force.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Replication statistics.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// What `peer` is known to have applied.
    pub fn peer_vector(&self, peer: NodeId) -> Option<&VersionVector> {
        self.peer_vectors.get(&peer)
    }

    /// Whether our subscription to `peer` is open.
    pub fn is_subscribed(&self, peer: NodeId) -> bool {
        self.subscriptions.contains_key(&peer)
    }

    /// Whether `peer`'s subscription to us is open.
    pub fn has_feed(&self, peer: NodeId) -> bool {
        self.feeds.contains_key(&peer)
    }

    /// The origins currently pulled from `peer`.
    pub fn origins_from(&self, peer: NodeId) -> Vec<NodeId> {
        self.subscriptions
            .get(&peer)
            .and_then(|s| s.origins.clone())
            .unwrap_or_default()
    }

    /// Events held ahead of a gap.
    pub fn held_events(&self) -> usize {
        self.held.len()
    }

    /// The greatest HLC issued or adopted.
    pub fn hlc(&self) -> Hlc {
        self.clock.last()
    }

    /// What a checkpoint reports: the vector, and the HLC high-water mark of the last commit
    /// as a claim that every event this replica issued has a sequence number within the vector
    /// and every event it issues from now on a greater HLC, even after a crash. The claim
    /// ([`Hlc::ZERO`]: none) is made only once every neighbor has told its vector since this
    /// replica opened and none holds more of its own events: a replica that lost the tail of its
    /// writes (and the others hold some) would otherwise claim too little, and tombstones could
    /// be collected that a write still on its way must meet.
    pub fn checkpoint(&self) -> (VersionVector, Hlc) {
        let me = self.config.node;
        let sure = self.own_recovery.is_none()
            && self
                .topology
                .neighbors(me)
                .iter()
                .all(|n| self.heard.contains(n));
        let claim = if sure { self.durable_hlc } else { Hlc::ZERO };
        (self.vector.clone(), claim)
    }

    /// The greatest stable HLC given to [`Replica::handle_stable_hlc`] (`Hlc::ZERO`: none).
    pub fn stable_hlc(&self) -> Hlc {
        self.stable_hlc
    }

    /// The stored state of `key`.
    pub fn read(&mut self, key: &[u8]) -> Result<Option<KeyState>, S::Error> {
        self.storage.key_state(key)
    }

    /// The storage, read-only.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The storage, for reads the replica does not wrap.
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    /// Gives the storage back, dropping the replica (a clean stop, or a simulated crash).
    pub fn into_storage(self) -> S {
        self.storage
    }

    // ---- writes from clients ----

    /// Runs a group of client commands as one commit (group commit: one durable write for all of
    /// them). Each gets its own result: the integer reply of [`braid_conflict::Prepared`], or the
    /// reason it was refused. Returns only once the commit is durable.
    pub fn handle_commands(
        &mut self,
        commands: Vec<(Bytes, Command)>,
        now_ms: u64,
    ) -> Result<Vec<Result<i64, CommandError>>, S::Error> {
        self.handle_commands_atomic(commands, &[], now_ms)
    }

    /// [`Replica::handle_commands`], where each range of `all_or_none` (positions in `commands`,
    /// in order, not overlapping) is one client command over several keys (`MSET`, `DEL`): if
    /// any of its keys is refused before it is looked at (its keyspace takes no writes here, or
    /// it is too long), every command of the range gets that refusal and none is applied.
    pub fn handle_commands_atomic(
        &mut self,
        commands: Vec<(Bytes, Command)>,
        all_or_none: &[Range<usize>],
        now_ms: u64,
    ) -> Result<Vec<Result<i64, CommandError>>, S::Error> {
        let mut overlay = Overlay::for_batch(commands.len());
        let mut events = Vec::with_capacity(commands.len());
        let mut results = Vec::with_capacity(commands.len());
        let node = self.config.node;
        if self.own_recovery.is_some() {
            return Ok(vec![Err(CommandError::Recovering); commands.len()]);
        }
        debug_assert!(all_or_none.windows(2).all(|w| w[0].end <= w[1].start));
        // The first refusal of each all-or-none range, if any.
        let refused: Vec<(Range<usize>, CommandError)> = all_or_none
            .iter()
            .filter_map(|range| {
                let keys = commands.get(range.clone())?;
                let refusal = keys
                    .iter()
                    .find_map(|(key, command)| self.refusal(key, command))?;
                Some((range.clone(), refusal))
            })
            .collect();
        let mut refused = refused.iter().peekable();
        for (at, (key, command)) in commands.into_iter().enumerate() {
            while refused.next_if(|(range, _)| range.end <= at).is_some() {}
            if let Some((_, refusal)) = refused.peek().filter(|(range, _)| range.contains(&at)) {
                results.push(Err(refusal.clone()));
                continue;
            }
            if let Some(refusal) = self.refusal(&key, &command) {
                results.push(Err(refusal));
                continue;
            }
            // Taken, not copied: every key of the overlay is committed or put back below.
            let entry = overlay.entry(&key, &mut self.storage)?;
            let prepared = match entry.state.prepare(node, command) {
                Ok(prepared) => prepared,
                Err(err) => {
                    results.push(Err(err));
                    continue;
                }
            };
            if let Some(op) = prepared.op {
                let seq = self.vector.get(node).next();
                let hlc = self.clock.now(now_ms);
                let applied = entry.state.apply(&op, hlc);
                entry.changed = true;
                self.stats.conflicts_lww += u64::from(applied.lww_lost);
                self.vector.advance(node, seq);
                events.push(ChangeEvent {
                    origin: node,
                    seq,
                    hlc,
                    key,
                    op,
                });
            }
            results.push(Ok(prepared.reply));
        }
        // Only keys a command changed are committed: a refused or no-op command writes
        // nothing, and the states it read go back to storage as they were.
        let mut keys = Vec::with_capacity(overlay.entries.len());
        for entry in overlay.entries {
            match entry.changed {
                true => keys.push((entry.key, entry.state)),
                false => self.storage.put_back(entry.key, entry.state),
            }
        }
        if !events.is_empty() {
            self.stats.writes += events.len() as u64;
            self.commit(keys, events)?;
            self.pump_feeds_of(&[self.config.node])?;
        }
        Ok(results)
    }

    /// Why a client write to `key` is refused before its state is looked at, if it is: a key
    /// longer than the wire protocol carries (every peer would refuse its event, and with it
    /// the stream), or a keyspace that takes no writes in this region.
    fn refusal(&self, key: &[u8], command: &Command) -> Option<CommandError> {
        if key.len() > KEY_BYTES_MAX {
            return Some(CommandError::KeyTooLong { max: KEY_BYTES_MAX });
        }
        let long = |value: &Bytes| value.len() > VALUE_BYTES_MAX;
        let too_large = match command {
            Command::Set(value) => long(value),
            Command::SetAdd(values) | Command::SetRemove(values) | Command::HashDelete(values) => {
                values.iter().any(long)
            }
            Command::HashSet(fields) => fields.iter().any(|(f, v)| long(f) || long(v)),
            Command::IncrBy(_) | Command::Delete => false,
        };
        if too_large {
            return Some(CommandError::ValueTooLarge {
                max: VALUE_BYTES_MAX,
            });
        }
        let keyspace = self.keyspaces.refusing(key, self.config.node)?;
        Some(CommandError::NotWriter {
            keyspace: keyspace.to_string(),
        })
    }

    fn commit(
        &mut self,
        keys: Vec<(Bytes, KeyState)>,
        events: Vec<ChangeEvent>,
    ) -> Result<(), S::Error> {
        let commit = Commit {
            keys,
            events,
            vector: self.vector.clone(),
            hlc: self.clock.last(),
            trim_through: VersionVector::new(),
            collected: Vec::new(),
        };
        self.commit_whole(commit)
    }

    /// Every commit goes through here: the HLC it makes durable is what checkpoints report.
    fn commit_whole(&mut self, commit: Commit) -> Result<(), S::Error> {
        let hlc = commit.hlc;
        debug_assert!(hlc >= self.durable_hlc, "the durable HLC never goes back");
        self.storage.commit(commit)?;
        self.durable_hlc = hlc;
        Ok(())
    }

    // ---- connection lifecycle ----

    /// Our subscription stream to `peer` is open (handshake done): the replica subscribes.
    pub fn handle_subscription_open(
        &mut self,
        peer: NodeId,
        now_ms: u64,
    ) -> Result<(), PeerError<S::Error>> {
        self.check_linked(peer)?;
        self.subscriptions
            .insert(peer, Subscription { origins: None });
        self.refresh_routes(now_ms);
        Ok(())
    }

    /// Our subscription stream to `peer` closed or failed: its origins are pulled elsewhere.
    pub fn handle_subscription_closed(&mut self, peer: NodeId, now_ms: u64) {
        if self.subscriptions.remove(&peer).is_some() {
            self.down_since_ms.insert(peer, now_ms);
            self.refresh_routes(now_ms);
        }
    }

    /// `peer` opened a stream to subscribe to us (handshake done); it sends `Subscribe` next.
    pub fn handle_feed_open(
        &mut self,
        peer: NodeId,
        _now_ms: u64,
    ) -> Result<(), PeerError<S::Error>> {
        self.check_linked(peer)?;
        self.feeds.insert(
            peer,
            Feed {
                origins: Vec::new(),
                cursor: VersionVector::new(),
                inflight: 0,
                subscribed: false,
                rotation: 0,
            },
        );
        Ok(())
    }

    /// `peer`'s subscription stream closed.
    pub fn handle_feed_closed(&mut self, peer: NodeId, _now_ms: u64) {
        self.feeds.remove(&peer);
    }

    /// Streams open only between linked nodes.
    fn check_linked(&self, peer: NodeId) -> Result<(), PeerError<S::Error>> {
        self.check_peer(peer)?;
        if !self.topology.linked(self.config.node, peer) {
            return Err(PeerError::NotLinked(peer));
        }
        Ok(())
    }

    fn check_peer(&self, peer: NodeId) -> Result<(), PeerError<S::Error>> {
        if peer == self.config.node || !self.topology.contains(peer) {
            return Err(PeerError::UnknownPeer(peer));
        }
        Ok(())
    }

    // ---- messages ----

    /// A message from `peer` on one of its streams. On error the driver closes that stream
    /// with [`PeerError::code`]; a [`PeerError::Storage`] is fatal.
    pub fn handle_message(
        &mut self,
        peer: NodeId,
        stream: StreamKind,
        message: Message,
        now_ms: u64,
    ) -> Result<(), PeerError<S::Error>> {
        self.check_peer(peer)?;
        let unexpected = |kind| PeerError::Unexpected { peer, stream, kind };
        match (stream, message) {
            (_, Message::Error(error)) => Err(PeerError::Closed {
                peer,
                code: error.code,
                text: error.text,
            }),
            (StreamKind::Subscription, Message::EventBatch(events)) => {
                if !self.subscriptions.contains_key(&peer) {
                    return Err(unexpected("event_batch"));
                }
                if let Some(origin) = self.origin_past_bound(&events) {
                    return Err(PeerError::TooManyOrigins { peer, origin });
                }
                self.handle_events(peer, events, now_ms)
                    .map_err(PeerError::Storage)
            }
            (StreamKind::Subscription, Message::Heartbeat(vector)) => {
                self.peer_vectors.insert(peer, vector);
                self.check_own_events(peer);
                Ok(())
            }
            (StreamKind::Feed, Message::Subscribe(subscribe)) => {
                self.handle_subscribe(peer, subscribe)
            }
            (StreamKind::Feed, Message::Ack(vector)) => {
                self.handle_ack(peer, vector).map_err(PeerError::Storage)
            }
            (_, message) => Err(unexpected(message.kind())),
        }
    }

    /// The first origin of `events` that would take the vector past
    /// [`MEMBERS_MAX`](crate::control::MEMBERS_MAX) origins, if any.
    fn origin_past_bound(&self, events: &[ChangeEvent]) -> Option<NodeId> {
        let mut new: Vec<NodeId> = Vec::new();
        let mut last = None;
        for event in events {
            // A batch's events come in runs of one origin: each run is looked at once.
            if last == Some(event.origin) {
                continue;
            }
            last = Some(event.origin);
            if self.vector.contains(event.origin) || new.contains(&event.origin) {
                continue;
            }
            new.push(event.origin);
            if self.vector.len() + new.len() > crate::control::MEMBERS_MAX {
                return Some(event.origin);
            }
        }
        None
    }

    fn handle_subscribe(
        &mut self,
        peer: NodeId,
        subscribe: Subscribe,
    ) -> Result<(), PeerError<S::Error>> {
        let Some(feed) = self.feeds.get_mut(&peer) else {
            return Ok(());
        };
        // Never send a subscriber its own events: that would be an echo.
        let mut origins: Vec<NodeId> = subscribe
            .origins
            .into_iter()
            .filter(|o| *o != peer)
            .collect();
        origins.sort();
        origins.dedup();
        // What the log no longer holds cannot be streamed: the subscriber needs a snapshot.
        for origin in &origins {
            let (from, trimmed) = (subscribe.vector.get(*origin), self.trimmed.get(*origin));
            if from < trimmed {
                self.stats.subscriptions_behind += 1;
                return Err(PeerError::Behind {
                    peer,
                    origin: *origin,
                    from,
                    trimmed,
                });
            }
        }
        let mut cursor = VersionVector::new();
        for origin in &origins {
            let mut from = subscribe.vector.get(*origin);
            if !subscribe.rewind && feed.subscribed && feed.origins.contains(origin) {
                // Already sent on this ordered stream: on its way, not worth sending twice.
                from = from.max(feed.cursor.get(*origin));
            }
            cursor.advance(*origin, from);
        }
        feed.origins = origins;
        feed.cursor = cursor;
        if subscribe.rewind || !feed.subscribed {
            // Acks of batches sent before a rewind may still arrive and free the window early;
            // rewinds are rare (gap repair), and each is bounded by the window again.
            feed.inflight = 0;
        }
        feed.subscribed = true;
        // The peer's own account of what it holds: replaced, not merged, so a peer that lost
        // data (a rebuilt disk) is not believed to hold what it no longer has.
        self.peer_vectors.insert(peer, subscribe.vector.clone());
        self.check_own_events(peer);
        self.pump(peer).map_err(PeerError::Storage)
    }

    fn handle_ack(&mut self, peer: NodeId, vector: VersionVector) -> Result<(), S::Error> {
        if let Some(feed) = self.feeds.get_mut(&peer) {
            feed.inflight = feed.inflight.saturating_sub(1);
            // What the peer already has (from us or elsewhere) need not be sent again.
            for origin in &feed.origins {
                feed.cursor.advance(*origin, vector.get(*origin));
            }
        }
        self.peer_vectors.entry(peer).or_default().merge(&vector);
        self.check_own_events(peer);
        self.pump(peer)
    }

    // ---- own events lost ----

    /// This replica may have lost the tail of its own writes (it restarted after a power loss
    /// with `process` durability): client writes are refused until every neighbor has told its
    /// vector and any of its own events they hold beyond its vector came back.
    pub fn handle_possible_loss(&mut self) {
        self.own_recovery.get_or_insert_with(OwnRecovery::default);
        self.end_recovery_if_done();
    }

    /// Whether client writes wait for this replica's own events to come back.
    pub fn is_recovering(&self) -> bool {
        self.own_recovery.is_some()
    }

    /// The next peer to fetch a data snapshot from, because it holds own events this replica
    /// lost. Drain after every input, as [`Replica::poll_transmit`].
    pub fn poll_resync(&mut self) -> Option<NodeId> {
        self.resyncs.pop_front()
    }

    /// Notes what `peer` told of this replica's own events.
    fn check_own_events(&mut self, peer: NodeId) {
        let me = self.config.node;
        let theirs = self
            .peer_vectors
            .get(&peer)
            .map_or(Seq::ZERO, |v| v.get(me));
        if theirs > self.vector.get(me) {
            let recovery = self.own_recovery.get_or_insert_with(OwnRecovery::default);
            let most = recovery.most(&self.topology).map(|(seq, _)| seq);
            recovery.holders.insert(peer, theirs);
            // The first to hold more than any other is asked at once; the others at ticks.
            if most.is_none_or(|most| theirs > most) {
                recovery.asked = Some(peer);
                if !self.resyncs.contains(&peer) {
                    self.resyncs.push_back(peer);
                }
            }
        }
        if let Some(recovery) = self.own_recovery.as_mut() {
            if theirs <= self.vector.get(me) {
                recovery.holders.remove(&peer);
            }
            recovery.heard.insert(peer);
        }
        self.heard.insert(peer);
        self.end_recovery_if_done();
    }

    fn end_recovery_if_done(&mut self) {
        let me = self.config.node;
        let Some(recovery) = &self.own_recovery else {
            return;
        };
        let all_heard = self
            .topology
            .neighbors(me)
            .iter()
            .all(|n| recovery.heard.contains(n));
        let caught_up = recovery
            .most(&self.topology)
            .is_none_or(|(seq, _)| self.vector.get(me) >= seq);
        if all_heard && caught_up {
            self.own_recovery = None;
        }
    }

    fn handle_events(
        &mut self,
        peer: NodeId,
        events: Vec<ChangeEvent>,
        now_ms: u64,
    ) -> Result<(), S::Error> {
        let mut overlay = Overlay::for_batch(events.len());
        let mut applied: Vec<ChangeEvent> = Vec::with_capacity(events.len());
        self.stats.peer(peer).events_received += events.len() as u64;
        for event in &events {
            self.storage.prefetch_key(&event.key);
        }
        for event in events {
            let next = self.vector.get(event.origin).next();
            if event.origin == self.config.node || event.seq < next {
                self.stats.peer(peer).events_duplicate += 1;
                continue;
            }
            if event.seq > next {
                self.hold(event, now_ms);
                continue;
            }
            if !self.apply_event(peer, event, &mut overlay, &mut applied, now_ms)? {
                continue;
            }
            // The event may have closed a gap: apply what was held behind it.
            while let Some((origin, _)) = applied.last().map(|e| (e.origin, e.seq)) {
                let key = (origin, self.vector.get(origin).next());
                let Some(held) = self.unhold(&key) else {
                    break;
                };
                if !self.apply_event(peer, held, &mut overlay, &mut applied, now_ms)? {
                    break;
                }
            }
        }
        if self.held.is_empty() {
            // Every gap filled. (A refused event leaves no gap: its peer's heartbeats show it
            // ahead, and stall detection fetches it again.)
            self.gap_since_ms = None;
        }
        self.stats.peer(peer).events_applied += applied.len() as u64;
        // Keys were taken from storage for the overlay: all of them go back in this commit.
        assert!(overlay.entries.is_empty() || !applied.is_empty());
        // The origins of what was applied, each once: the feeds to pump below.
        let mut origins: smallvec::SmallVec<[NodeId; 4]> = smallvec::SmallVec::new();
        for event in &applied {
            if !origins.contains(&event.origin) {
                origins.push(event.origin);
            }
        }
        if !applied.is_empty() {
            self.commit(overlay.into_keys(), applied)?;
        }
        self.transmits.push_back(Transmit {
            peer,
            stream: StreamKind::Subscription,
            message: Message::Ack(self.vector.clone()),
        });
        // Relay: peers subscribed to these origins through us get them now.
        self.pump_feeds_of(&origins)
    }

    /// Applies one in-order event into the overlay. Returns false if its HLC is refused.
    fn apply_event(
        &mut self,
        peer: NodeId,
        event: ChangeEvent,
        overlay: &mut Overlay,
        applied: &mut Vec<ChangeEvent>,
        now_ms: u64,
    ) -> Result<bool, S::Error> {
        debug_assert_eq!(event.seq, self.vector.get(event.origin).next());
        match self.clock.update_from_remote(event.hlc, now_ms) {
            Ok(_) => {}
            Err(ClockError::TooFarAhead { .. }) => {
                // Refused and counted; the origin's sequence stops here until a re-subscription
                // brings the event again and the local clock has caught up.
                self.stats.peer(peer).events_clock_refused += 1;
                return Ok(false);
            }
        }
        // Every key in the overlay is committed below: taken, not copied.
        let state = &mut overlay.entry(&event.key, &mut self.storage)?.state;
        let outcome = state.apply(&event.op, event.hlc);
        self.stats.conflicts_lww += u64::from(outcome.lww_lost);
        self.vector.advance(event.origin, event.seq);
        self.stats.record_apply(&event, now_ms);
        applied.push(event);
        Ok(true)
    }

    fn hold(&mut self, event: ChangeEvent, now_ms: u64) {
        self.gap_since_ms.get_or_insert(now_ms);
        if self.held.contains_key(&(event.origin, event.seq)) {
            return; // held already (an event is the same wherever it comes from)
        }
        let bytes = event_size_bytes(&event);
        if self.held.len() >= self.config.held_events_max
            || self.held_bytes + bytes > self.config.held_bytes_max
        {
            self.stats.held_dropped += 1;
            return;
        }
        self.held.insert((event.origin, event.seq), event);
        self.held_bytes += bytes;
    }

    /// Takes a held event out.
    fn unhold(&mut self, key: &(NodeId, Seq)) -> Option<ChangeEvent> {
        let event = self.held.remove(key)?;
        self.held_bytes -= event_size_bytes(&event);
        Some(event)
    }

    // ---- publishing ----

    /// Pumps every feed, in peer order.
    fn pump_all(&mut self) -> Result<(), S::Error> {
        let peers: Peers = self.feeds.keys().copied().collect();
        for peer in peers {
            self.pump(peer)?;
        }
        Ok(())
    }

    /// Pumps the feeds that asked for any of `origins`, in peer order. After a commit of
    /// events of `origins` only those feeds can have anything new to send (a feed's window
    /// opens on its own ack, which pumps it), and this runs after every commit: the others are
    /// not looked at.
    fn pump_feeds_of(&mut self, origins: &[NodeId]) -> Result<(), S::Error> {
        let window = self.config.peer_inflight_batches_max;
        // A feed with a full window sends nothing until an ack, which pumps it: under load that
        // is most feeds after most commits, so they are passed over here.
        let peers: Peers = self
            .feeds
            .iter()
            .filter(|(_, feed)| {
                feed.has_room(window) && feed.origins.iter().any(|o| origins.contains(o))
            })
            .map(|(peer, _)| *peer)
            .collect();
        for peer in peers {
            self.pump(peer)?;
        }
        Ok(())
    }

    /// Sends `peer` what it lacks of the origins it asked for, while its window has room,
    /// reading the change log on demand.
    fn pump(&mut self, peer: NodeId) -> Result<(), S::Error> {
        let Some(feed) = self.feeds.get_mut(&peer) else {
            return Ok(());
        };
        if feed.origins.is_empty() {
            return Ok(());
        }
        while feed.has_room(self.config.peer_inflight_batches_max) {
            // Events are encoded into the batch straight from the log, as it lends them (or
            // copied from their encodings an earlier feed made): never copied out of the log as
            // events, and sent as the bytes a socket carries.
            let mut batch = EncodedEvents::default();
            let mut bytes = 0usize;
            let mut unencodable = false;
            let count = feed.origins.len();
            for i in 0..count {
                let origin = feed.origins[(feed.rotation + i) % count];
                let sent = feed.cursor.get(origin);
                if self.vector.get(origin) <= sent {
                    continue;
                }
                let room = self.config.batch_events_max - batch.events;
                let bytes_max = self.config.batch_bytes_max.saturating_sub(bytes);
                // What an earlier feed encoded is copied; the log lends the rest, which is
                // encoded and kept for the feeds after this one. Together they lend what the
                // log alone would, within the same limits.
                let lent = self.tails.lend(origin, sent, room, bytes_max, &mut batch);
                debug_assert!(
                    lent.events == 0 || origin != peer,
                    "never echo to the origin"
                );
                let mut last = (lent.events > 0).then_some(lent.last);
                bytes += lent.bytes;
                if lent.events < room
                    && (lent.events == 0 || lent.bytes < bytes_max)
                    && self.vector.get(origin) > lent.last
                {
                    let tails = &mut self.tails;
                    // The storage counts the events' bytes as it checks its limit. (Past an
                    // event that could not be encoded the count runs on, and the batch ends
                    // anyway.)
                    bytes += self.storage.log_after_each(
                        origin,
                        lent.last,
                        room - lent.events,
                        bytes_max - lent.bytes,
                        &mut |event| {
                            debug_assert_ne!(event.origin, peer, "never echo to the origin");
                            // Encoding to memory cannot fail; if it did, the feed would stop
                            // at this event, as it stops at a frame that cannot be sent.
                            let at = batch.bytes.len();
                            if unencodable || batch.push(event).is_err() {
                                unencodable = true;
                                return;
                            }
                            let size = crate::storage::event_size_bytes(event);
                            tails.keep(origin, event.seq, &batch.bytes[at..], size);
                            last = Some(event.seq);
                        },
                    )?;
                }
                if let Some(last) = last {
                    feed.cursor.advance(origin, last);
                }
                if batch.events >= self.config.batch_events_max
                    || bytes >= self.config.batch_bytes_max
                    || unencodable
                {
                    break;
                }
            }
            if batch.events == 0 {
                break;
            }
            feed.rotation = feed.rotation.wrapping_add(1);
            let counters = self.stats.peers.entry(peer).or_default();
            counters.events_sent += batch.events as u64;
            counters.batches_sent += 1;
            feed.inflight += 1;
            self.transmits.push_back(Transmit {
                peer,
                stream: StreamKind::Feed,
                message: Message::EncodedEvents(batch),
            });
            if unencodable {
                break;
            }
        }
        Ok(())
    }

    // ---- routing ----

    /// The reachable neighbor to pull `origin` from: the one nearest to it in the topology; among
    /// equals, the one already used (routes do not flap; a used peer that stalls is caught by
    /// stall detection); then the one known to hold most of its events; then the lowest id. While a nearer neighbor has been unreachable for less than the fallback grace,
    /// nobody: it is probably about to come (back).
    fn route(&self, origin: NodeId, now_ms: u64) -> Option<NodeId> {
        let distance = |peer: NodeId| self.topology.distance(peer, origin).unwrap_or(u32::MAX);
        let current = self
            .subscriptions
            .iter()
            .find(|(_, s)| s.origins.as_ref().is_some_and(|o| o.contains(&origin)))
            .map(|(peer, _)| *peer);
        let best = self.subscriptions.keys().copied().min_by_key(|peer| {
            let held = self
                .peer_vectors
                .get(peer)
                .map_or(Seq::ZERO, |v| v.get(origin));
            (
                distance(*peer),
                Some(*peer) != current,
                std::cmp::Reverse(held),
                *peer,
            )
        })?;
        let waiting = self.down_since_ms.iter().any(|(peer, since)| {
            distance(*peer) < distance(best)
                && now_ms.saturating_sub(*since) < self.config.route_fallback_ms
        });
        (!waiting).then_some(best)
    }

    /// Recomputes which origins each subscription pulls, and re-subscribes where that changed.
    fn refresh_routes(&mut self, now_ms: u64) {
        let me = self.config.node;
        let mut wanted: BTreeMap<NodeId, Vec<NodeId>> = self
            .subscriptions
            .keys()
            .map(|peer| (*peer, Vec::new()))
            .collect();
        // Every origin of the topology, and every other origin a peer holds more of than this
        // replica: a region that was removed (dead, without a drain) may have left its events
        // with some members only, and they must still pass from one member to another. Such an
        // origin is at no distance from anyone: it is pulled from the peer that holds the most
        // of it. Bounded by what one subscription may name.
        let mut origins: std::collections::BTreeSet<NodeId> = self.topology.nodes().collect();
        for vector in self.peer_vectors.values() {
            for (origin, seq) in vector.iter() {
                if origins.len() >= crate::limits::SUBSCRIBE_ORIGINS_MAX {
                    break;
                }
                if seq > self.vector.get(origin) {
                    origins.insert(origin);
                }
            }
        }
        origins.remove(&me);
        for origin in origins {
            if let Some(peer) = self.route(origin, now_ms) {
                wanted.entry(peer).or_default().push(origin);
            }
        }
        for (peer, origins) in wanted {
            let Some(subscription) = self.subscriptions.get_mut(&peer) else {
                continue;
            };
            if subscription.origins.as_ref() != Some(&origins) {
                subscription.origins = Some(origins.clone());
                self.transmits.push_back(Transmit {
                    peer,
                    stream: StreamKind::Subscription,
                    message: Message::Subscribe(Subscribe {
                        vector: self.vector.clone(),
                        origins,
                        rewind: false,
                    }),
                });
            }
        }
    }

    /// Re-sends every subscription with the current vector: publishers restart from it, which
    /// fills any gap.
    fn resubscribe_all(&mut self) {
        for (peer, subscription) in &self.subscriptions {
            let origins = subscription.origins.clone().unwrap_or_default();
            self.transmits.push_back(Transmit {
                peer: *peer,
                stream: StreamKind::Subscription,
                message: Message::Subscribe(Subscribe {
                    vector: self.vector.clone(),
                    origins,
                    rewind: true,
                }),
            });
        }
        self.held.clear();
        self.held_bytes = 0;
    }

    // ---- topology ----

    /// A new topology, committed by the control plane: the links change without a restart.
    /// Subscriptions and feeds of peers no longer linked to this node are forgotten (the driver
    /// closes their streams: see [`Replica::topology`] for who is linked now); newly linked
    /// peers count as unreachable until their streams open; every origin is routed again. A
    /// topology without this node is refused (a removed node stops instead).
    pub fn handle_topology(
        &mut self,
        topology: Topology,
        now_ms: u64,
    ) -> Result<(), TopologyChange> {
        let me = self.config.node;
        if !topology.contains(me) {
            return Err(TopologyChange::NotAMember(me));
        }
        let before: Vec<NodeId> = self.topology.neighbors(me);
        let after: Vec<NodeId> = topology.neighbors(me);
        for gone in before.iter().filter(|n| !after.contains(n)) {
            self.subscriptions.remove(gone);
            self.feeds.remove(gone);
            self.down_since_ms.remove(gone);
            self.peer_vectors.remove(gone);
        }
        for new in after.iter().filter(|n| !before.contains(n)) {
            self.down_since_ms.insert(*new, now_ms);
        }
        // A holder of our own events removed from the mesh no longer counts, but what the
        // others told before may be stale: frames from the removed one may have reached them
        // since. Every neighbor must tell its vector again before the recovery may end.
        if let Some(recovery) = self.own_recovery.as_mut() {
            if recovery
                .holders
                .keys()
                .any(|holder| !topology.contains(*holder))
            {
                recovery.heard.clear();
            }
        }
        self.topology = topology;
        self.refresh_routes(now_ms);
        self.end_recovery_if_done();
        Ok(())
    }

    // ---- data snapshots ----

    /// Keys of a data snapshot (a joining region's, or one resynchronising after it fell behind
    /// what the others' logs hold): each is merged into the stored state with the state's own
    /// merge, in one commit that leaves the vector alone. Idempotent: a chunk merged twice, or
    /// over a state that already reflects some of its events, gives the same state.
    ///
    /// `hlc` is the donor's HLC at its snapshot's view (its `SnapshotBegin`), at least every HLC
    /// in the states: the clock adopts it first (as [`Replica::handle_snapshot_end`] bounds it),
    /// so that a write made here after a client read a merged value is stamped above that value
    /// and wins over it, whether or not the snapshot is ever finished.
    pub fn handle_snapshot_chunk(
        &mut self,
        entries: Vec<SnapshotEntry>,
        hlc: Hlc,
        now_ms: u64,
    ) -> Result<(), S::Error> {
        self.adopt_snapshot_hlc(hlc, now_ms);
        let mut overlay = Overlay::for_batch(entries.len());
        for entry in entries {
            // Every key taken is in the commit below.
            overlay
                .entry(&entry.key, &mut self.storage)?
                .state
                .merge(&entry.state);
        }
        if overlay.entries.is_empty() {
            return Ok(());
        }
        self.commit(overlay.into_keys(), Vec::new())
    }

    /// The last chunk of a data snapshot is merged: the vector becomes the greater of ours and
    /// the snapshot's, and the HLC high-water mark at least the snapshot's. For every origin
    /// the snapshot took further (this node's own too, if it lost writes the others hold), the
    /// events in between are in the states, not the log: the log counts as trimmed through
    /// the snapshot's seq, in the same commit. The HLC is adopted no further ahead of `now_ms`
    /// than [`ReplicaConfig::clock_skew_ms_max`]. Then every subscription starts again from
    /// the new vector (events held ahead of a gap are dropped and fetched again).
    pub fn handle_snapshot_end(
        &mut self,
        snapshot: &VersionVector,
        hlc: Hlc,
        now_ms: u64,
    ) -> Result<(), S::Error> {
        let through: VersionVector = snapshot
            .iter()
            .filter(|(origin, seq)| *seq > self.vector.get(*origin))
            .collect();
        self.vector.merge(snapshot);
        self.adopt_snapshot_hlc(hlc, now_ms);
        self.trimmed.merge(&through);
        self.tails.trim(&through);
        let commit = Commit {
            keys: Vec::new(),
            events: Vec::new(),
            vector: self.vector.clone(),
            hlc: self.clock.last(),
            trim_through: through,
            collected: Vec::new(),
        };
        self.commit_whole(commit)?;
        self.stats.snapshots_installed += 1;
        assert!(self.vector.dominates(&self.trimmed));
        self.gap_since_ms = None;
        self.stalled.clear();
        // The states merged may hold tombstones at or below the stable HLC (a donor that had
        // not collected them yet): collected from the next tick, not only once the stable HLC
        // moves again, which in a quiet mesh could be never.
        self.gc_more = self.stable_hlc > Hlc::ZERO;
        self.end_recovery_if_done();
        self.resubscribe_all();
        self.refresh_routes(now_ms);
        self.pump_all()
    }

    /// Moves the clock up to a snapshot's HLC, but no further ahead of local time than a remote
    /// HLC may be: a donor with a bad clock must not drag this one along.
    fn adopt_snapshot_hlc(&mut self, hlc: Hlc, now_ms: u64) {
        let bound = now_ms.saturating_add(self.config.clock_skew_ms_max);
        let hlc = match hlc.wall_ms > bound {
            true => Hlc::new(bound, 0, hlc.node),
            false => hlc,
        };
        if hlc > self.clock.last() {
            self.clock = HlcClock::resume(self.config.node, self.config.clock_skew_ms_max, hlc);
        }
    }

    // ---- garbage collection ----

    /// The stable frontier the control plane committed: per origin, what every region has
    /// applied. Deletes the change-log events at or below it (never beyond what this replica
    /// holds itself, nor backwards), and returns how many were deleted. A subscriber asking for
    /// deleted events from then on is told it is [`PeerError::Behind`].
    pub fn handle_stable_frontier(&mut self, frontier: &VersionVector) -> Result<u64, S::Error> {
        self.trim_through(frontier)
    }

    /// The keyspace rules the control plane committed: from now on a client write to a key
    /// whose keyspace does not name this region as a writer is refused with
    /// [`CommandError::NotWriter`]. Events from other regions are applied whatever the rules
    /// (a rule only says where clients may write).
    pub fn handle_keyspaces(&mut self, keyspaces: Keyspaces) {
        self.keyspaces = keyspaces;
    }

    /// The keyspace rules in force.
    pub fn keyspaces(&self) -> &Keyspaces {
        &self.keyspaces
    }

    /// The stable HLC the control plane committed: every event some region has not applied
    /// yet carries a greater HLC. Adopts it as the clock's floor (a region that just joined
    /// must never issue a timestamp at or below a tombstone the others dropped), then takes a
    /// garbage-collection step: tombstones at or below it are dropped, and keys left with
    /// nothing are forgotten. Returns how many keys lost tombstones. Only forward: an older
    /// stable HLC changes nothing.
    pub fn handle_stable_hlc(&mut self, stable: Hlc) -> Result<u64, S::Error> {
        if stable <= self.stable_hlc {
            return Ok(0);
        }
        self.stable_hlc = stable;
        if stable > self.clock.last() {
            self.clock = HlcClock::resume(self.config.node, self.config.clock_skew_ms_max, stable);
            // Durable before any timestamp above it is issued.
            self.commit(Vec::new(), Vec::new())?;
        }
        self.collect_tombstones()
    }

    /// One garbage-collection step over the tombstone index (at most [`GC_KEYS_PER_STEP`]
    /// entries), in one commit.
    fn collect_tombstones(&mut self) -> Result<u64, S::Error> {
        self.gc_more = false;
        if self.stable_hlc == Hlc::ZERO {
            return Ok(0);
        }
        let entries = self
            .storage
            .tombstones_through(self.stable_hlc, GC_KEYS_PER_STEP)?;
        if entries.is_empty() {
            return Ok(0);
        }
        assert!(entries.len() <= GC_KEYS_PER_STEP);
        self.gc_more = entries.len() == GC_KEYS_PER_STEP;
        let mut keys: BTreeMap<Bytes, KeyState> = BTreeMap::new();
        let mut collected = 0;
        for (_, key) in &entries {
            if keys.contains_key(key) {
                continue; // an older entry of the same key
            }
            // Every key taken is in the commit below.
            let Some(mut state) = self.storage.take_key_state(key)? else {
                continue; // the entry outlived its key
            };
            if state.collect_tombstones(self.stable_hlc) {
                collected += 1;
                self.stats.keys_forgotten += u64::from(state.is_empty());
            }
            keys.insert(key.clone(), state);
        }
        let commit = Commit {
            keys: keys.into_iter().collect(),
            events: Vec::new(),
            vector: self.vector.clone(),
            hlc: self.clock.last(),
            trim_through: VersionVector::new(),
            collected: entries,
        };
        self.commit_whole(commit)?;
        self.stats.tombstones_collected += collected;
        Ok(collected)
    }

    /// Deletes each origin's change-log events through `through[origin]`, never beyond what
    /// this replica holds nor backwards; returns how many were deleted.
    fn trim_through(&mut self, through: &VersionVector) -> Result<u64, S::Error> {
        let cut: VersionVector = through
            .iter()
            .map(|(origin, seq)| (origin, seq.min(self.vector.get(origin))))
            .filter(|(origin, seq)| *seq > self.trimmed.get(*origin))
            .collect();
        if cut.is_empty() {
            return Ok(0);
        }
        let deleted: u64 = cut
            .iter()
            .map(|(origin, seq)| seq.0 - self.trimmed.get(origin).0)
            .sum();
        self.storage.trim_log(&cut)?;
        self.trimmed.merge(&cut);
        self.tails.trim(&cut);
        self.stats.log_events_trimmed += deleted;
        assert!(
            self.vector.dominates(&self.trimmed),
            "trimmed only what is held"
        );
        Ok(deleted)
    }

    /// Applies the retention bounds ([`ReplicaConfig::retention_events_max`] and
    /// [`ReplicaConfig::retention_age_ms`]): deletes the change-log events older than the age
    /// bound, then the oldest events (by HLC, origin by origin) until the log is within the size
    /// bound. The work of one call is bounded; what is left is done at the next tick. Returns
    /// how many events were deleted.
    pub fn enforce_retention(&mut self, now_ms: u64) -> Result<u64, S::Error> {
        let (age, size) = (
            self.config.retention_age_ms,
            self.config.retention_events_max,
        );
        if age.is_none() && size.is_none() {
            return Ok(0);
        }
        let mut through = self.trimmed.clone();
        let origins: Vec<NodeId> = self.vector.iter().map(|(o, _)| o).collect();
        let mut reads = 0usize;
        let mut bytes_read = 0usize;
        if let Some(age) = age {
            let cutoff = now_ms.saturating_sub(age);
            for origin in &origins {
                // Most of the time the oldest event kept is young enough: one read says so.
                reads += 1;
                let head = self
                    .storage
                    .log_after(*origin, through.get(*origin), 1, usize::MAX)?;
                if head.first().is_none_or(|e| e.hlc.wall_ms >= cutoff) {
                    continue;
                }
                while reads < RETENTION_READS_MAX && bytes_read < RETENTION_BYTES_PER_TICK {
                    reads += 1;
                    let events = self.storage.log_after(
                        *origin,
                        through.get(*origin),
                        RETENTION_READ_EVENTS,
                        RETENTION_READ_BYTES,
                    )?;
                    bytes_read += events.iter().map(event_size_bytes).sum::<usize>();
                    let old = events
                        .iter()
                        .take_while(|e| e.hlc.wall_ms < cutoff)
                        .last()
                        .map(|e| e.seq);
                    if let Some(seq) = old {
                        through.advance(*origin, seq);
                    }
                    // Every event read was old: more may follow (a read ends at its count or
                    // its bytes, or at the log's end, which the next read finds empty).
                    let more = !events.is_empty() && old == events.last().map(|e| e.seq);
                    if !more {
                        break;
                    }
                }
            }
        }
        if let Some(max) = size {
            let held = |through: &VersionVector| -> u64 {
                self.vector
                    .iter()
                    .map(|(o, seq)| seq.0.saturating_sub(through.get(o).0))
                    .sum()
            };
            let mut excess = held(&through).saturating_sub(max);
            while excess > 0 && reads < RETENTION_READS_MAX {
                // The origin whose oldest kept event is the oldest goes first.
                let mut oldest: Option<(Hlc, NodeId)> = None;
                for origin in &origins {
                    reads += 1;
                    let head =
                        self.storage
                            .log_after(*origin, through.get(*origin), 1, usize::MAX)?;
                    if let Some(event) = head.first() {
                        if oldest.is_none_or(|(hlc, _)| event.hlc < hlc) {
                            oldest = Some((event.hlc, *origin));
                        }
                    }
                }
                let Some((_, origin)) = oldest else { break };
                let kept = self.vector.get(origin).0 - through.get(origin).0;
                let step = excess.min(kept).min(RETENTION_READ_EVENTS as u64);
                through.advance(origin, Seq(through.get(origin).0 + step));
                excess -= step;
            }
        }
        let deleted = self.trim_through(&through)?;
        self.stats.log_events_retention_trimmed += deleted;
        Ok(deleted)
    }

    /// Per origin, the highest seq deleted from the change log.
    pub fn trimmed(&self) -> &VersionVector {
        &self.trimmed
    }

    /// Events in the change log: every applied event of every origin, less what was trimmed.
    pub fn log_events(&self) -> u64 {
        self.vector
            .iter()
            .map(|(origin, seq)| seq.0.saturating_sub(self.trimmed.get(origin).0))
            .sum()
    }

    // ---- time ----

    /// Time passed: heartbeats, route refresh, gap repair. Call at or after [`Replica::poll_timeout`].
    pub fn handle_tick(&mut self, now_ms: u64) -> Result<(), S::Error> {
        if now_ms < self.next_tick_ms {
            return Ok(());
        }
        self.next_tick_ms = now_ms + self.config.heartbeat_ms;
        for (peer, feed) in &self.feeds {
            if feed.subscribed {
                self.transmits.push_back(Transmit {
                    peer: *peer,
                    stream: StreamKind::Feed,
                    message: Message::Heartbeat(self.vector.clone()),
                });
            }
        }
        self.enforce_retention(now_ms)?;
        // A snapshot asked for and not installed (the fetch failed, or the peer went away):
        // ask again, from the next peer known to hold the most of our own events.
        let topology = &self.topology;
        let me = self.config.node;
        let mine = self.vector.get(me);
        if let Some(recovery) = self.own_recovery.as_mut() {
            if let Some(peer) = recovery.next_source(topology, mine) {
                if !self.resyncs.contains(&peer) {
                    self.resyncs.push_back(peer);
                }
            }
        }
        self.end_recovery_if_done();
        if self.gc_more {
            self.collect_tombstones()?;
        }
        self.refresh_routes(now_ms);
        self.detect_stalls(now_ms);
        if let Some(since) = self.gap_since_ms {
            if now_ms.saturating_sub(since) >= self.config.resubscribe_ms {
                self.gap_since_ms = None;
                self.stalled.clear();
                self.resubscribe_all();
            }
        }
        self.pump_all()
    }

    /// Notes origins whose events a peer holds but that have not advanced here: a lost message
    /// (or a refused one) leaves no gap to see, only a peer that stays ahead.
    fn detect_stalls(&mut self, now_ms: u64) {
        let mut behind: BTreeMap<NodeId, Seq> = BTreeMap::new();
        for (peer, subscription) in &self.subscriptions {
            let Some(theirs) = self.peer_vectors.get(peer) else {
                continue;
            };
            for origin in subscription.origins.iter().flatten() {
                let ours = self.vector.get(*origin);
                if theirs.get(*origin) > ours {
                    behind.insert(*origin, ours);
                }
            }
        }
        self.stalled.retain(|origin, _| behind.contains_key(origin));
        for (origin, ours) in behind {
            let entry = self.stalled.entry(origin).or_insert((ours, now_ms));
            if ours > entry.0 {
                *entry = (ours, now_ms);
            } else if now_ms.saturating_sub(entry.1) >= self.config.resubscribe_ms {
                self.gap_since_ms.get_or_insert(entry.1);
            }
        }
    }

    /// When the replica next wants [`Replica::handle_tick`], in milliseconds.
    pub fn poll_timeout(&self) -> u64 {
        self.next_tick_ms
    }

    /// The next message to send, if any. Drain after every input.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Checks the replica's invariants: the constant-time ones always, those that walk the
    /// vectors, feeds or held events in debug builds. (A simulator checks after every input:
    /// the walks were a fiftieth of a release run.) In release builds the trimmed vector is
    /// still asserted where the log is trimmed; a feed's origins leave out its peer, and its
    /// window stays within the bound, by how `handle_subscribe` and `pump` set them. What
    /// storage hands back at [`Replica::open`] is checked here only.
    pub fn check_invariants(&self) {
        assert!(self.durable_hlc <= self.clock.last());
        assert!(self.held.len() <= self.config.held_events_max);
        assert!(self.held_bytes <= self.config.held_bytes_max);
        debug_assert_eq!(
            self.held_bytes,
            self.held.values().map(event_size_bytes).sum::<usize>(),
            "held bytes counted"
        );
        debug_assert!(
            self.vector.dominates(&self.trimmed),
            "the log is trimmed only below what is held"
        );
        debug_assert!(self.feeds.iter().all(|(peer, feed)| {
            feed.inflight <= self.config.peer_inflight_batches_max && !feed.origins.contains(peer)
        }));
        debug_assert!(self
            .held
            .keys()
            .all(|(origin, seq)| *seq > self.vector.get(*origin).next()));
    }
}
