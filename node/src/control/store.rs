//! Raft storage for the control plane: an in-memory log and the state machine store, which
//! applies committed commands to a [`ControlState`] and snapshots it. The node keeps its log in
//! RocksDB ([`super::rocks_log`]) and its latest snapshot beside it, through a
//! [`SnapshotVault`].

// openraft's trait methods return its `StorageError` (over 200 bytes); the vault and helpers
// here return it too rather than map every call site.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};

use braid_protocol::control::{apply_to, ControlState};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};

use super::{lock, ControlConfig, ControlReply};

type NodeId = u64;

#[derive(Debug, Default)]
struct LogInner {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
    entries: BTreeMap<u64, Entry<ControlConfig>>,
}

/// The Raft log and vote in memory. Cheap to clone: clones share the log (one is the reader).
#[derive(Debug, Clone, Default)]
pub struct MemLogStore {
    inner: Arc<Mutex<LogInner>>,
}

impl RaftLogReader<ControlConfig> for MemLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<ControlConfig>>, StorageError<NodeId>> {
        let inner = lock(&self.inner);
        Ok(inner
            .entries
            .range(range)
            .map(|(_, entry)| entry.clone())
            .collect())
    }
}

impl RaftLogStorage<ControlConfig> for MemLogStore {
    type LogReader = MemLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<ControlConfig>, StorageError<NodeId>> {
        let inner = lock(&self.inner);
        let last = inner
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        lock(&self.inner).vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.inner).vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        lock(&self.inner).committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.inner).committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<ControlConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<ControlConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut inner = lock(&self.inner);
            for entry in entries {
                inner.entries.insert(entry.log_id.index, entry);
            }
        }
        // In memory, written is flushed.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = lock(&self.inner);
        let _ = inner.entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = lock(&self.inner);
        assert!(
            inner.last_purged.is_none_or(|p| p <= log_id),
            "purge moves forward only"
        );
        inner.last_purged = Some(log_id);
        let kept = inner.entries.split_off(&(log_id.index + 1));
        inner.entries = kept;
        Ok(())
    }
}

/// What a snapshot holds (its metadata carries the last applied entry and the membership).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SnapshotData {
    state: Option<ControlState>,
}

/// A snapshot's metadata, as openraft describes it.
pub type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// Where a state machine keeps its latest snapshot across restarts: without it, a node whose
/// log was purged up to a snapshot would come back with nothing to rebuild its state from.
pub trait SnapshotVault: Send + Sync + 'static {
    /// Keeps `bytes` as the latest snapshot, durably, before it returns.
    fn save(&self, meta: &Meta, bytes: &[u8]) -> Result<(), StorageError<NodeId>>;
    /// The latest snapshot kept, if any.
    fn load(&self) -> Result<Option<(Meta, Vec<u8>)>, StorageError<NodeId>>;
}

struct MachineInner {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, openraft::BasicNode>,
    /// None until the log's bootstrap command is applied.
    state: Option<ControlState>,
    snapshot: Option<(Meta, Vec<u8>)>,
    snapshots_built: u64,
    vault: Option<Arc<dyn SnapshotVault>>,
}

impl Debug for MachineInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineInner")
            .field("last_applied", &self.last_applied)
            .field("state", &self.state)
            .field("persistent", &self.vault.is_some())
            .finish()
    }
}

/// The control state machine behind Raft. Cheap to clone: clones share it (one is the snapshot
/// builder, others read the state).
#[derive(Debug, Clone)]
pub struct StateMachineStore {
    inner: Arc<Mutex<MachineInner>>,
}

fn io_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(&e).into()
}

fn encode(data: &SnapshotData) -> Result<Vec<u8>, bincode::error::EncodeError> {
    bincode::serde::encode_to_vec(data, bincode::config::standard())
}

/// The most bytes a control-plane snapshot may decode to: members, links, keyspaces and
/// checkpoints are small; a length prefix past this is corruption (or a hostile peer's).
pub(crate) const CONTROL_SNAPSHOT_BYTES_MAX: usize = 64 * 1024 * 1024;

fn decode(bytes: &[u8]) -> Result<SnapshotData, StorageError<NodeId>> {
    let config = bincode::config::standard().with_limit::<CONTROL_SNAPSHOT_BYTES_MAX>();
    bincode::serde::decode_from_slice(bytes, config)
        .map(|(data, _)| data)
        .map_err(io_error)
}

impl StateMachineStore {
    /// A state machine, in memory, that starts from `initial` (the cluster's first members and
    /// links, the same on every node), as the tests and the simulator set a group up.
    pub fn new(initial: ControlState) -> StateMachineStore {
        StateMachineStore::with(Some(initial), None)
    }

    /// The same, keeping every snapshot it builds or installs in `vault`, as a node's does (the
    /// on-disk log waits for them before it purges).
    pub fn new_keeping(initial: ControlState, vault: Arc<dyn SnapshotVault>) -> StateMachineStore {
        StateMachineStore::with(Some(initial), Some(vault))
    }

    fn with(state: Option<ControlState>, vault: Option<Arc<dyn SnapshotVault>>) -> Self {
        StateMachineStore {
            inner: Arc::new(Mutex::new(MachineInner {
                last_applied: None,
                membership: StoredMembership::default(),
                state,
                snapshot: None,
                snapshots_built: 0,
                vault,
            })),
        }
    }

    /// A node's state machine: it starts from the latest snapshot in `vault` (or from nothing:
    /// the log then begins with a bootstrap command), and keeps every later snapshot there.
    pub fn open(vault: Arc<dyn SnapshotVault>) -> Result<StateMachineStore, StorageError<NodeId>> {
        let kept = vault.load()?;
        let store = StateMachineStore::with(None, Some(vault));
        if let Some((meta, bytes)) = kept {
            let data = decode(&bytes)?;
            let mut inner = lock(&store.inner);
            inner.last_applied = meta.last_log_id;
            inner.membership = meta.last_membership.clone();
            inner.state = data.state;
            inner.snapshot = Some((meta, bytes));
        }
        Ok(store)
    }

    /// The state as of the last applied entry; none before the bootstrap is applied.
    pub fn state(&self) -> Option<ControlState> {
        lock(&self.inner).state.clone()
    }

    /// Reads the applied state in place, without copying it (`None` before the bootstrap).
    pub fn read_state<T>(&self, read: impl FnOnce(&ControlState) -> T) -> Option<T> {
        lock(&self.inner).state.as_ref().map(read)
    }

    /// The index of the last applied entry.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        lock(&self.inner).last_applied
    }
}

impl RaftSnapshotBuilder<ControlConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<ControlConfig>, StorageError<NodeId>> {
        let mut inner = lock(&self.inner);
        let data = SnapshotData {
            state: inner.state.clone(),
        };
        let bytes = encode(&data).map_err(io_error)?;
        inner.snapshots_built += 1;
        let snapshot_id = match inner.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, inner.snapshots_built),
            None => format!("none-{}", inner.snapshots_built),
        };
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
            snapshot_id,
        };
        if let Some(vault) = &inner.vault {
            vault.save(&meta, &bytes)?;
        }
        inner.snapshot = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<ControlConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<NodeId>>,
            StoredMembership<NodeId, openraft::BasicNode>,
        ),
        StorageError<NodeId>,
    > {
        let inner = lock(&self.inner);
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ControlReply>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<ControlConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = lock(&self.inner);
        let mut replies = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => ControlReply::Nothing,
                EntryPayload::Normal(command) => match apply_to(&mut inner.state, &command) {
                    Ok(()) => ControlReply::Applied,
                    // A refusal changed nothing: the state names the members it names.
                    Err(err) => ControlReply::Refused(match &inner.state {
                        Some(state) => state.explain(&err),
                        None => err.to_string(),
                    }),
                },
                EntryPayload::Membership(membership) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), membership);
                    ControlReply::Nothing
                }
            };
            replies.push(reply);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let data = decode(&bytes)?;
        let mut inner = lock(&self.inner);
        if let Some(vault) = &inner.vault {
            vault.save(meta, &bytes)?;
        }
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.state = data.state;
        inner.snapshot = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<ControlConfig>>, StorageError<NodeId>> {
        let inner = lock(&self.inner);
        Ok(inner.snapshot.as_ref().map(|(meta, bytes)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(bytes.clone())),
        }))
    }
}
