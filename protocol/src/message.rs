//! The messages of protocol version 1.
//!
//! ```text
//!   subscriber                              publisher
//!      │── Handshake ──────────────────────────►│   (both ways, first frame on a stream)
//!      │◄────────────────────────── Handshake ──│
//!      │── Subscribe { vector, origins } ──────►│
//!      │◄──────────── EventBatch { events } ────│   (events the vector lacks, in origin order)
//!      │── Ack { vector } ─────────────────────►│
//!      │◄──────────── EventBatch { events } ────│   ...
//!      │◄──────────────── Heartbeat { vector } ─│   (on an idle feed)
//!      │◄──────────────────── Error { code } ───│   (then the stream closes)
//! ```
//!
//! The control plane's Raft group uses streams of its own on the same connections: after the
//! handshakes, the caller sends a [`RaftRequest`] and the callee answers each with a
//! `RaftResponse`, one at a time, until the caller ends the stream.
//!
//! ```text
//!   caller                                  callee
//!      │── Handshake ──────────────────────────►│
//!      │◄────────────────────────── Handshake ──│
//!      │── RaftRequest { call, body } ─────────►│
//!      │◄──────────────────── RaftResponse(..) ─│   ...
//! ```
//!
//! A region that joins (or one resynchronised after it fell behind what the others' change logs
//! still hold) fetches a data snapshot on a stream of its own: one consistent view of every key's
//! state and the version vector it reflects. QUIC's flow control paces the chunks.
//!
//! ```text
//!   fetcher                                 server
//!      │── Handshake ──────────────────────────►│
//!      │◄────────────────────────── Handshake ──│
//!      │── SnapshotRequest ────────────────────►│
//!      │◄──────── SnapshotBegin { vector, .. } ─│   (the view the keys below are read at)
//!      │◄────────── SnapshotChunk { entries } ──│   ... (keys in order)
//!      │◄────────────── SnapshotEnd { keys } ───│   (then the server ends the stream)
//! ```

use braid_conflict::{Hlc, KeyState, Op};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ids::{ClusterId, NodeId, Seq, VersionVector};

/// The protocol version this build speaks; the first byte of every frame body.
pub const PROTOCOL_VERSION: u8 = 1;

/// One local write, as every region applies it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// The region that accepted the write.
    pub origin: NodeId,
    /// Its position in the origin's dense sequence.
    pub seq: Seq,
    /// The origin's HLC when it accepted the write (its `node` is `origin`).
    pub hlc: Hlc,
    /// The key written.
    pub key: Bytes,
    /// What the write does.
    pub op: Op,
}

/// The first message on every stream, sent by both sides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshake {
    /// The protocol version the sender speaks (also in every frame header).
    pub protocol_version: u8,
    /// The sender's cluster; a mismatch ends the stream.
    pub cluster_id: ClusterId,
    /// The sender's node id.
    pub node_id: NodeId,
}

/// A subscription: "send me, from your change log, every event of these origins my vector lacks".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribe {
    /// What the subscriber has applied.
    pub vector: VersionVector,
    /// The origins the subscriber wants from this peer (in a full mesh, normally the peer
    /// itself; more when an origin is unreachable and this peer relays for it). Never the
    /// subscriber itself: the publisher skips those events whatever this says.
    pub origins: Vec<NodeId>,
    /// Restart every origin from `vector`, even what was already sent on this stream (to fill a
    /// gap). Otherwise, for an origin the stream already carried, the publisher goes on from
    /// what it already sent where that is further: those events are on their way.
    pub rewind: bool,
}

/// Why a stream is being closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The peer sent something that does not decode or breaks a protocol rule.
    Malformed,
    /// The peer speaks a protocol version this node does not.
    UnsupportedVersion,
    /// The peer belongs to another cluster.
    WrongCluster,
    /// The peer is not a member of this cluster's topology.
    UnknownPeer,
    /// A frame was larger than the limit.
    FrameTooLarge,
    /// The events a subscription needs were garbage-collected; resynchronise from a snapshot.
    Behind,
    /// The node is shutting down.
    ShuttingDown,
    /// Anything else.
    Internal,
}

/// Closes a stream with a reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// The reason, for machines.
    pub code: ErrorCode,
    /// The reason, for people (at most `ERROR_TEXT_BYTES_MAX` bytes).
    pub text: String,
}

/// Which control-plane call a [`RaftRequest`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftCall {
    /// Raft's log replication and heartbeat.
    AppendEntries,
    /// Raft's request for a vote.
    Vote,
    /// One chunk of a Raft snapshot.
    InstallSnapshot,
    /// A command for the leader to commit, from a node that is not the leader.
    Propose,
}

/// A control-plane call. The body is the Raft library's own request, encoded by the node
/// (bincode 2); the protocol carries it whole and bounds it by the frame limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftRequest {
    /// Which call.
    pub call: RaftCall,
    /// The request, encoded.
    pub body: Bytes,
}

/// Asks for a data snapshot: the first message on a stream of its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// What the fetcher holds already (for the server's log and for a later delta; the server
    /// sends every key regardless).
    pub vector: VersionVector,
}

/// The head of a snapshot: what the keys that follow reflect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotBegin {
    /// The server's version vector at the view the keys are read at: every event at or below
    /// it is reflected in the keys, none above.
    pub vector: VersionVector,
    /// The server's HLC high-water mark at that view.
    pub hlc: Hlc,
    /// About how many keys follow (for progress; not a promise).
    pub keys_estimate: u64,
}

/// One key of a snapshot: its whole replicated state (tombstones and CRDT metadata included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// The key.
    pub key: Bytes,
    /// Its state.
    pub state: KeyState,
}

/// Part of the one key of a snapshot whose state does not fit a frame. The parts of a key come
/// one after another, between chunks; their bytes together are the key's [`SnapshotEntry`] as
/// [`crate::snapshot_parts::encode_entry`] writes it, `entry_bytes` long, and the key counts
/// in [`SnapshotEnd::keys`] as one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotKeyPart {
    /// The length of the whole entry; every part of one key says the same.
    pub entry_bytes: u64,
    /// The next bytes of it: at least one, at most `SNAPSHOT_PART_BYTES_MAX`.
    pub bytes: Bytes,
}

/// The tail of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEnd {
    /// How many keys the chunks carried, for the fetcher to check.
    pub keys: u64,
}

/// Every message of protocol version 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Opens a stream.
    Handshake(Handshake),
    /// Starts (or restarts) a subscription.
    Subscribe(Subscribe),
    /// Events for a subscriber, in origin order per origin.
    EventBatch(Vec<ChangeEvent>),
    /// The subscriber's vector after applying what it received.
    Ack(VersionVector),
    /// The sender closes the stream, and says why.
    Error(ErrorMessage),
    /// The publisher's own vector, sent on an idle feed so the subscriber knows how far behind it
    /// is (and that the peer is alive).
    Heartbeat(VersionVector),
    /// A control-plane call, on a stream of its own.
    RaftRequest(RaftRequest),
    /// The answer to the last `RaftRequest` on the stream, encoded by the node.
    RaftResponse(Bytes),
    /// Asks for a data snapshot, on a stream of its own.
    SnapshotRequest(SnapshotRequest),
    /// A snapshot's head.
    SnapshotBegin(SnapshotBegin),
    /// Keys of a snapshot, in key order.
    SnapshotChunk(Vec<SnapshotEntry>),
    /// A snapshot's tail.
    SnapshotEnd(SnapshotEnd),
    /// Part of a snapshot key too large for a frame.
    SnapshotKeyPart(SnapshotKeyPart),
    /// An [`Message::EventBatch`] as the replica core hands one out: its events already in
    /// their wire encoding, written straight from the change log. It is sent as, and arrives
    /// as, an `EventBatch` (the same bytes); it is never received as itself.
    #[serde(skip)]
    EncodedEvents(EncodedEvents),
}

/// The events of an [`Message::EventBatch`] in their wire encoding, one after another: built
/// with [`EncodedEvents::push`], read back with [`EncodedEvents::decode`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedEvents {
    /// How many events `bytes` holds.
    pub(crate) events: usize,
    /// The events, each as an `EventBatch` carries it.
    pub(crate) bytes: Vec<u8>,
}

impl EncodedEvents {
    /// How many events the batch holds.
    pub fn events(&self) -> usize {
        self.events
    }

    /// The events' wire encoding, one after another.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl Message {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Handshake(_) => "handshake",
            Message::Subscribe(_) => "subscribe",
            Message::EventBatch(_) | Message::EncodedEvents(_) => "event_batch",
            Message::Ack(_) => "ack",
            Message::Error(_) => "error",
            Message::Heartbeat(_) => "heartbeat",
            Message::RaftRequest(_) => "raft_request",
            Message::RaftResponse(_) => "raft_response",
            Message::SnapshotRequest(_) => "snapshot_request",
            Message::SnapshotBegin(_) => "snapshot_begin",
            Message::SnapshotChunk(_) => "snapshot_chunk",
            Message::SnapshotEnd(_) => "snapshot_end",
            Message::SnapshotKeyPart(_) => "snapshot_key_part",
        }
    }
}
