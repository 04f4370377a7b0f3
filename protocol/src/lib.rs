//! Braid's mesh protocol: the versioned, bounded wire format that regions speak to each other.
//! Pure: no tokio, no sockets, no clock.
//!
//! # Layout
//!
//! - [`control`]: the control plane's state machine (members, topology, checkpoints, the stable
//!   frontier) that the Raft group replicates.
//! - [`ids`]: [`NodeId`], [`Seq`], [`ClusterId`], [`VersionVector`].
//! - [`message`]: the messages of protocol version 1 and the [`ChangeEvent`].
//! - [`frame`]: length-prefixed framing, two-step decoding of untrusted bytes, validation.
//! - [`limits`]: every bound, with the reason for its value.
//! - [`replica`]: the sans-IO replica core: version vectors, exactly-once apply, subscriptions,
//!   relay and echo suppression.
//! - [`storage`]: the synchronous storage seam the core commits through, and an in-memory
//!   implementation.
//! - [`topology`]: nodes, links and the distances routing uses.
//!
//! The specification, field by field, is `docs/protocol.md`; golden byte vectors of every message
//! are in `protocol/tests/golden/`.

#![warn(missing_docs)]
// Library code proves each unwrap cannot fail, or does not unwrap; tests may.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod batch;
pub mod control;
mod encoded_tail;
pub mod frame;
pub mod ids;
pub mod limits;
pub mod message;
pub mod replica;
mod short_bytes;
pub mod snapshot_parts;
pub mod storage;
pub mod topology;

pub use frame::{DecodeError, EncodeError, ProtocolViolation};
pub use ids::{ClusterId, NodeId, Seq, VersionVector};
pub use message::{
    ChangeEvent, EncodedEvents, ErrorCode, ErrorMessage, Handshake, Message, RaftCall, RaftRequest,
    SnapshotBegin, SnapshotEnd, SnapshotEntry, SnapshotKeyPart, SnapshotRequest, Subscribe,
    PROTOCOL_VERSION,
};
pub use replica::{
    OriginStats, PeerError, Replica, ReplicaConfig, StreamKind, TopologyChange, Transmit,
};
pub use storage::{ChangeLog, Commit, MemoryStorage, Recovered, Storage};
pub use topology::{Topology, TopologyError};
