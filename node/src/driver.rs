//! The tokio driver around the replica core: one task owns the [`Replica`], feeds it inputs from
//! a bounded channel, executes its transmits, and re-arms its one timer.
//!
//! ```text
//!   RESP connections ─┐                                   ┌─► per-stream outboxes (bounded)
//!   peer streams ─────┼─► inputs (bounded mpsc) ─► driver ┤
//!   HTTP /status ─────┘        │ group commit:           └─► replies (oneshot)
//!                              └─ consecutive writes ─► one Replica::handle_commands
//! ```

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use braid_conflict::{Command, CommandError, Hlc};
use braid_protocol::replica::Stats;
use braid_protocol::{
    ErrorCode, ErrorMessage, Message, NodeId, PeerError, Replica, SnapshotEntry, StreamKind,
    Topology, VersionVector,
};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::faults::Faults;
use crate::storage::{RocksStorage, StorageError};

/// Inputs waiting for the driver. Bounded so that clients and peers feel back-pressure rather
/// than growing a queue: 4,096 covers a burst of pipelined commands from many clients.
pub const INPUT_QUEUE_MAX: usize = 4096;

/// Client commands folded into one commit. One commit (and, in `machine` mode, one fsync) per
/// group; 1,024 keeps a commit's write batch around 100 KiB for 100-byte values.
pub const WRITE_GROUP_COMMANDS_MAX: usize = 1024;

/// Messages waiting to be written on one peer stream. The replica sends at most its window of
/// batches plus acks and heartbeats, well under this; a stream whose outbox is full is not
/// being read and is closed.
pub const STREAM_OUTBOX_MAX: usize = 256;

/// Longest wait for the replica's next tick: its heartbeat interval.
const TICK_WAIT_MS_MAX: u64 = 1_000;

/// Milliseconds since the Unix epoch: the physical time fed to the replica's HLC.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What happened on a peer stream.
#[derive(Debug)]
pub enum PeerInput {
    /// The stream is open and its handshake done; the driver writes to it through `outbox`.
    Opened {
        /// Messages for the peer on this stream.
        outbox: mpsc::Sender<Message>,
    },
    /// A message arrived.
    Message(Message),
    /// The stream ended.
    Closed,
}

/// The answer to a group of client commands.
pub type CommandReplies = Vec<Result<i64, CommandError>>;

/// An input to the driver.
#[derive(Debug)]
pub enum Input {
    /// Client write commands, run in one commit; the reply is sent once it is durable.
    Commands {
        /// The commands.
        commands: Vec<(Bytes, Command)>,
        /// Ranges of `commands`, in order, that are one client command over several keys
        /// (`MSET`, `DEL`): applied all or none (see [`Replica::handle_commands_atomic`]).
        all_or_none: Vec<Range<usize>>,
        /// Where the results go.
        reply: oneshot::Sender<CommandReplies>,
    },
    /// Something on a peer stream. `conn` tells streams of one peer apart across reconnects.
    Peer {
        /// The peer.
        peer: NodeId,
        /// Which of its streams.
        stream: StreamKind,
        /// Identifies this stream among the peer's successive ones.
        conn: u64,
        /// What happened.
        input: PeerInput,
    },
    /// The stable frontier the control plane committed: the change log is trimmed through it.
    StableFrontier(VersionVector),
    /// The stable HLC the control plane committed: tombstones at or below it are dropped.
    StableHlc(Hlc),
    /// The keyspace rules the control plane committed: client writes are checked against them.
    Keyspaces(braid_protocol::control::Keyspaces),
    /// The topology the control plane committed: subscriptions follow it.
    Topology(Topology),
    /// This region is leaving the mesh: from now on client writes are refused.
    Leaving,
    /// This region has been removed from the mesh: the driver stops.
    Removed,
    /// The vector to report as this node's checkpoint: made durable first (the WAL synced, in
    /// either durability mode), since others garbage-collect what every checkpoint holds.
    Checkpoint {
        /// Where it goes.
        reply: oneshot::Sender<(VersionVector, Hlc)>,
    },
    /// Keys of a data snapshot being fetched (a resynchronisation): merged, then acknowledged.
    SnapshotChunk {
        /// The keys.
        entries: Vec<SnapshotEntry>,
        /// The snapshot's HLC (its `SnapshotBegin`'s), adopted before they are merged.
        hlc: Hlc,
        /// Answered once they are merged.
        reply: oneshot::Sender<()>,
    },
    /// The data snapshot being fetched is complete: its vector and HLC.
    SnapshotEnd {
        /// What the snapshot reflects.
        vector: VersionVector,
        /// Its HLC high-water mark.
        hlc: Hlc,
        /// Answered with this node's vector afterwards.
        reply: oneshot::Sender<VersionVector>,
    },
    /// A resynchronisation failed: the next refusal starts another.
    ResyncFailed,
    /// A status snapshot, for HTTP and INFO.
    Status {
        /// Where it goes.
        reply: oneshot::Sender<Snapshot>,
    },
}

/// What the replica looks like right now.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The node.
    pub node: NodeId,
    /// Its vector.
    pub vector: VersionVector,
    /// Its HLC high-water mark.
    pub hlc: Hlc,
    /// Its statistics.
    pub stats: Stats,
    /// Events held ahead of a gap.
    pub held_events: usize,
    /// Events in the change log.
    pub log_events: u64,
    /// Per origin, what the change log was trimmed through.
    pub trimmed: VersionVector,
    /// The stable HLC garbage collection last worked to (`Hlc::ZERO`: none yet).
    pub stable_hlc: Hlc,
    /// Whether client writes wait for this region's own lost events to come back.
    pub recovering: bool,
    /// Per neighbor: whether our subscription and its feed are open, the origins we pull from
    /// it, and its vector as last known.
    pub peers: BTreeMap<NodeId, PeerSnapshot>,
}

/// One neighbor, as the replica sees it.
#[derive(Debug, Clone, Default)]
pub struct PeerSnapshot {
    /// Our subscription to it is open.
    pub subscribed: bool,
    /// Its subscription to us is open.
    pub feed: bool,
    /// Origins we pull from it.
    pub origins: Vec<NodeId>,
    /// Its vector, as last reported.
    pub vector: Option<VersionVector>,
}

/// How a driver's run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Asked to stop (shutdown).
    Stopped,
    /// The region was removed from the mesh (it left, or was removed by others).
    Removed,
}

/// The driver: owns the replica, runs until shutdown or a storage failure.
pub struct Driver {
    replica: Replica<RocksStorage>,
    inputs: mpsc::Receiver<Input>,
    /// The open stream of each peer and kind: its conn id and outbox.
    streams: BTreeMap<(NodeId, StreamKind), (u64, mpsc::Sender<Message>)>,
    /// Injected faults: the clock offset is added to physical time (0 unless enabled).
    faults: Arc<Faults>,
    /// The neighbors of the topology in force, for the transport's subscriber tasks.
    neighbors: watch::Sender<Vec<NodeId>>,
    /// The region is leaving: writes are refused.
    leaving: bool,
    /// The region was removed: the run ends.
    removed: bool,
    /// Where a resynchronisation by snapshot is asked for (the peer that refused us as behind,
    /// and our vector); none in tests that do not resynchronise.
    resync: Option<mpsc::Sender<(NodeId, VersionVector)>>,
    /// A resynchronisation is under way.
    resyncing: bool,
    /// The database marks this node as recovering its own events
    /// ([`RocksStorage::note_boot`]): the mark goes once the replica holds them again.
    recovery_marked: bool,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("node", &self.replica.node())
            .finish()
    }
}

impl Driver {
    /// A driver for `replica`, reading `inputs`; it tells `neighbors` whenever the topology
    /// changes.
    pub fn new(
        replica: Replica<RocksStorage>,
        inputs: mpsc::Receiver<Input>,
        faults: Arc<Faults>,
        neighbors: watch::Sender<Vec<NodeId>>,
    ) -> Driver {
        Driver {
            replica,
            inputs,
            streams: BTreeMap::new(),
            faults,
            neighbors,
            leaving: false,
            removed: false,
            resync: None,
            resyncing: false,
            recovery_marked: false,
        }
    }

    /// The database marks this node as recovering its own events: the driver clears the mark
    /// once the replica's recovery ends.
    pub fn with_recovery_mark(mut self, marked: bool) -> Driver {
        self.recovery_marked = marked;
        self
    }

    /// Asks `resync` for a data snapshot whenever a peer refuses this node as behind what its
    /// change log still holds.
    pub fn with_resync(mut self, resync: mpsc::Sender<(NodeId, VersionVector)>) -> Driver {
        self.resync = Some(resync);
        self
    }

    fn now(&self) -> u64 {
        now_ms().saturating_add_signed(self.faults.clock_offset_ms())
    }

    /// Runs until `shutdown` turns true or every input sender is gone. A storage error stops the
    /// driver: the node must not go on with unknown durable state.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<Ended, StorageError> {
        info!(node = %self.replica.node(), vector = ?self.replica.vector(), "replica started");
        loop {
            // Capped: the replica's deadline is in wall-clock time, which can step backwards;
            // waking at least once a tick interval keeps heartbeats and repairs going.
            let wait_ms = self
                .replica
                .poll_timeout()
                .saturating_sub(self.now())
                .min(TICK_WAIT_MS_MAX);
            let timer = tokio::time::sleep(Duration::from_millis(wait_ms));
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                input = self.inputs.recv() => match input {
                    Some(input) => self.handle(input)?,
                    None => break,
                },
                _ = timer => {
                    let now = self.now();
                    self.replica.handle_tick(now)?;
                }
            }
            self.flush();
            if self.recovery_marked && !self.replica.is_recovering() {
                self.replica.storage().recovery_done()?;
                self.recovery_marked = false;
                info!(node = %self.replica.node(), "own events recovered: the recovery mark is cleared");
            }
            if self.removed {
                info!(node = %self.replica.node(), "this region was removed from the mesh");
                return Ok(Ended::Removed);
            }
        }
        info!(node = %self.replica.node(), "replica stopped");
        Ok(Ended::Stopped)
    }

    fn handle(&mut self, first: Input) -> Result<(), StorageError> {
        // Group commit: take every write already queued behind the first (bounded), so they
        // share one commit; other inputs queued meanwhile are handled right after it, in
        // order. An input that changes whether or how writes are taken (leaving, removal,
        // keyspace rules) ends the group: a write queued behind it waits for it, so a write
        // queued behind `Leaving` is refused.
        let mut commands: Vec<(Bytes, Command)> = Vec::new();
        let mut all_or_none: Vec<Range<usize>> = Vec::new();
        let mut replies: Vec<(oneshot::Sender<CommandReplies>, usize)> = Vec::new();
        let mut others = Vec::new();
        let mut next = Some(first);
        while let Some(input) = next.take() {
            let ends_group = matches!(input, Input::Leaving | Input::Removed | Input::Keyspaces(_));
            match input {
                Input::Commands {
                    commands: batch,
                    all_or_none: ranges,
                    reply,
                } => {
                    let at = commands.len();
                    all_or_none.extend(ranges.into_iter().map(|r| r.start + at..r.end + at));
                    replies.push((reply, batch.len()));
                    commands.extend(batch);
                }
                other => others.push(other),
            }
            if !ends_group && commands.len() < WRITE_GROUP_COMMANDS_MAX {
                next = self.inputs.try_recv().ok();
            }
        }
        if !commands.is_empty() && self.leaving {
            for (reply, count) in replies {
                let _ = reply.send(vec![Err(CommandError::Leaving); count]);
            }
        } else if !commands.is_empty() {
            let now = self.now();
            let mut results = self
                .replica
                .handle_commands_atomic(commands, &all_or_none, now)?
                .into_iter();
            for (reply, count) in replies {
                // A client that went away does not care for its reply.
                let _ = reply.send(results.by_ref().take(count).collect());
            }
        }
        for input in others {
            self.handle_other(input)?;
        }
        Ok(())
    }

    fn handle_other(&mut self, input: Input) -> Result<(), StorageError> {
        let now = self.now();
        match input {
            Input::Commands { .. } => unreachable!("commands are grouped by handle"),
            Input::Status { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Input::Checkpoint { reply } => {
                self.replica.storage().sync()?;
                let _ = reply.send(self.replica.checkpoint());
            }
            Input::Topology(topology) => self.handle_topology(topology, now),
            Input::Leaving => {
                if !self.leaving {
                    info!("this region is leaving the mesh: refusing writes from now on");
                }
                self.leaving = true;
            }
            Input::Removed => self.removed = true,
            Input::SnapshotChunk {
                entries,
                hlc,
                reply,
            } => {
                self.replica.handle_snapshot_chunk(entries, hlc, now)?;
                let _ = reply.send(());
            }
            Input::SnapshotEnd { vector, hlc, reply } => {
                self.replica.handle_snapshot_end(&vector, hlc, now)?;
                self.resyncing = false;
                info!(vector = ?self.replica.vector(), "resynchronised by data snapshot");
                let _ = reply.send(self.replica.vector().clone());
            }
            Input::ResyncFailed => self.resyncing = false,
            Input::StableFrontier(frontier) => {
                let deleted = self.replica.handle_stable_frontier(&frontier)?;
                if deleted > 0 {
                    debug!(deleted, trimmed = ?self.replica.trimmed(), "change log trimmed");
                }
            }
            Input::Keyspaces(rules) => {
                if &rules != self.replica.keyspaces() {
                    info!(keyspaces = ?rules, "keyspace rules changed");
                }
                self.replica.handle_keyspaces(rules);
            }
            Input::StableHlc(stable) => {
                let keys = self.replica.handle_stable_hlc(stable)?;
                if keys > 0 {
                    debug!(keys, %stable, "tombstones collected");
                }
            }
            Input::Peer {
                peer,
                stream,
                conn,
                input,
            } => match input {
                PeerInput::Opened { outbox } => {
                    self.streams.insert((peer, stream), (conn, outbox));
                    let opened = match stream {
                        StreamKind::Subscription => {
                            self.replica.handle_subscription_open(peer, now)
                        }
                        StreamKind::Feed => self.replica.handle_feed_open(peer, now),
                    };
                    self.peer_result(peer, stream, opened)?;
                }
                PeerInput::Message(message) => {
                    if self
                        .streams
                        .get(&(peer, stream))
                        .is_some_and(|(c, _)| *c == conn)
                    {
                        let result = self.replica.handle_message(peer, stream, message, now);
                        self.peer_result(peer, stream, result)?;
                    }
                }
                PeerInput::Closed => {
                    if self
                        .streams
                        .get(&(peer, stream))
                        .is_some_and(|(c, _)| *c == conn)
                    {
                        self.close_stream(peer, stream, None);
                    }
                }
            },
        }
        Ok(())
    }

    /// Takes a committed topology: the replica re-routes, streams of peers no longer linked
    /// close, and the transport subscribes to new neighbors.
    fn handle_topology(&mut self, topology: Topology, now: u64) {
        if self.replica.topology() == &topology {
            return;
        }
        let me = self.replica.node();
        let before = self.replica.topology().neighbors(me);
        if let Err(err) = self.replica.handle_topology(topology, now) {
            warn!(error = %err, "committed topology not taken");
            return;
        }
        let after = self.replica.topology().neighbors(me);
        for gone in before.iter().filter(|p| !after.contains(p)) {
            for stream in [StreamKind::Subscription, StreamKind::Feed] {
                let error = ErrorMessage {
                    code: ErrorCode::UnknownPeer,
                    text: "the link was removed from the topology".into(),
                };
                self.close_stream(*gone, stream, Some(error));
            }
        }
        info!(neighbors = ?after, "topology changed");
        let _ = self.neighbors.send(after);
    }

    /// A peer error closes that stream (telling the peer why); a storage error is fatal.
    fn peer_result(
        &mut self,
        peer: NodeId,
        stream: StreamKind,
        result: Result<(), PeerError<StorageError>>,
    ) -> Result<(), StorageError> {
        match result {
            Ok(()) => Ok(()),
            Err(PeerError::Storage(err)) => Err(err),
            Err(PeerError::Closed {
                code: ErrorCode::Behind,
                text,
                ..
            }) => {
                self.close_stream(peer, stream, None);
                self.ask_resync(
                    peer,
                    &text,
                    "this region lacks events the peer no longer keeps",
                );
                Ok(())
            }
            Err(PeerError::Closed { code, text, .. }) => {
                warn!(%peer, ?stream, ?code, %text, "peer closed the stream with an error");
                self.close_stream(peer, stream, None);
                Ok(())
            }
            Err(err) => {
                warn!(%peer, ?stream, error = %err, "refusing peer stream");
                let text = err.to_string();
                self.close_stream(
                    peer,
                    stream,
                    Some(ErrorMessage {
                        code: err.code(),
                        text,
                    }),
                );
                Ok(())
            }
        }
    }

    fn close_stream(&mut self, peer: NodeId, stream: StreamKind, error: Option<ErrorMessage>) {
        if let Some((_, outbox)) = self.streams.remove(&(peer, stream)) {
            if let Some(error) = error {
                let _ = outbox.try_send(Message::Error(error));
            }
            // Dropping the outbox ends the stream's writer, which closes the stream.
        }
        let now = self.now();
        match stream {
            StreamKind::Subscription => self.replica.handle_subscription_closed(peer, now),
            StreamKind::Feed => self.replica.handle_feed_closed(peer, now),
        }
        debug!(%peer, ?stream, "stream closed");
    }

    /// Asks for a data snapshot from `peer`, unless one is being fetched already.
    fn ask_resync(&mut self, peer: NodeId, text: &str, why: &str) {
        if self.resyncing {
            debug!(%peer, %text, why, "resynchronisation under way");
            return;
        }
        let asked = self
            .resync
            .as_ref()
            .is_some_and(|r| r.try_send((peer, self.replica.vector().clone())).is_ok());
        if asked {
            self.resyncing = true;
            warn!(%peer, %text, why, "resynchronising from a data snapshot");
        } else {
            error!(%peer, %text, why, "cannot resynchronise");
        }
    }

    /// Hands every transmit to its stream's outbox, without waiting.
    fn flush(&mut self) {
        while let Some(peer) = self.replica.poll_resync() {
            self.ask_resync(
                peer,
                "the peer holds more of this region's own events than it does",
                "this region lost writes it had shipped (a power loss): taking them back before \
                 it writes again",
            );
        }
        while let Some(transmit) = self.replica.poll_transmit() {
            let key = (transmit.peer, transmit.stream);
            let Some((_, outbox)) = self.streams.get(&key) else {
                continue;
            };
            if let Err(err) = outbox.try_send(transmit.message) {
                let reason = match err {
                    mpsc::error::TrySendError::Full(_) => "outbox full: the peer is not reading",
                    mpsc::error::TrySendError::Closed(_) => "stream writer gone",
                };
                warn!(peer = %transmit.peer, stream = ?transmit.stream, reason, "closing peer stream");
                let error = ErrorMessage {
                    code: ErrorCode::Internal,
                    text: reason.into(),
                };
                self.close_stream(transmit.peer, transmit.stream, Some(error));
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut peers = BTreeMap::new();
        let me = self.replica.node();
        for peer in self.replica.topology().neighbors(me) {
            peers.insert(
                peer,
                PeerSnapshot {
                    subscribed: self.replica.is_subscribed(peer),
                    feed: self.replica.has_feed(peer),
                    origins: self.replica.origins_from(peer),
                    vector: self.replica.peer_vector(peer).cloned(),
                },
            );
        }
        Snapshot {
            node: me,
            vector: self.replica.vector().clone(),
            hlc: self.replica.hlc(),
            stats: self.replica.stats().clone(),
            held_events: self.replica.held_events(),
            log_events: self.replica.log_events(),
            trimmed: self.replica.trimmed().clone(),
            stable_hlc: self.replica.stable_hlc(),
            recovering: self.replica.is_recovering(),
            peers,
        }
    }
}

/// Logs a fatal driver error.
pub fn log_fatal(err: &StorageError) {
    error!(error = %err, "storage failed: stopping the node");
}

#[cfg(test)]
mod tests {
    use braid_protocol::{ReplicaConfig, Seq};

    use super::*;
    use crate::storage::Durability;

    fn write(key: &'static str, reply: oneshot::Sender<CommandReplies>) -> Input {
        let command = Command::Set(Bytes::from_static(b"v"));
        Input::Commands {
            commands: vec![(Bytes::from_static(key.as_bytes()), command)],
            all_or_none: Vec::new(),
            reply,
        }
    }

    /// `Leaving` ends a group of writes: the writes queued before it commit, one queued behind
    /// it is refused, and a checkpoint asked for before it holds what was committed.
    #[tokio::test]
    async fn a_write_queued_behind_leaving_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeId(1);
        let storage = RocksStorage::open(dir.path(), Durability::Machine).unwrap();
        let topology = Topology::full_mesh([node]).unwrap();
        let replica = Replica::open(ReplicaConfig::new(node), topology, storage, now_ms()).unwrap();
        let (inputs, input_rx) = mpsc::channel(16);
        let (neighbors, _) = watch::channel(Vec::new());
        let mut driver = Driver::new(replica, input_rx, Arc::new(Faults::new(false)), neighbors);
        let (first_reply, first) = oneshot::channel();
        let (before_reply, before) = oneshot::channel();
        let (after_reply, after) = oneshot::channel();
        let (checkpoint_reply, checkpoint) = oneshot::channel();
        for input in [
            write("before", before_reply),
            Input::Checkpoint {
                reply: checkpoint_reply,
            },
            Input::Leaving,
            write("after", after_reply),
        ] {
            inputs.send(input).await.unwrap();
        }
        // Handled as the driver's loop does, one received input at a time.
        driver.handle(write("first", first_reply)).unwrap();
        while let Ok(input) = driver.inputs.try_recv() {
            driver.handle(input).unwrap();
        }
        assert!(first.await.unwrap()[0].is_ok());
        assert!(before.await.unwrap()[0].is_ok());
        let (vector, _) = checkpoint.await.unwrap();
        assert_eq!(
            vector.get(node),
            Seq(2),
            "the checkpoint holds the two writes before it"
        );
        assert_eq!(
            after.await.unwrap(),
            vec![Err(CommandError::Leaving)],
            "a write queued behind Leaving"
        );
        assert_eq!(driver.replica.vector().get(node), Seq(2));
    }
}
