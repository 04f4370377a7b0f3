//! The control plane's Raft log and vote in RocksDB, in a database of their own beside the
//! node's data. Every write is synced before it is acknowledged, whatever the data's durability
//! mode: Raft's safety rests on a vote or an entry, once promised, never being forgotten.
//!
//! ```text
//!   cf "log"   index u64 BE          -> Entry (bincode 2, serde)
//!   cf "meta"  "vote" | "committed" | "purged"  -> Vote | LogId
//!              "snapshot"                       -> (SnapshotMeta, bytes): the state machine's
//! ```
//!
//! The latest snapshot is kept here too (as the state machine's [`SnapshotVault`]), so a node
//! whose log was purged up to it rebuilds its state from it at restart.

// openraft's trait methods return its `StorageError` (over 200 bytes); the helpers here return
// it too rather than map every call site.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::error;

use super::store::{Meta, SnapshotVault};
use super::ControlConfig;

type NodeId = u64;

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const META_VOTE: &[u8] = b"vote";
const META_COMMITTED: &[u8] = b"committed";
const META_PURGED: &[u8] = b"purged";
const META_SNAPSHOT: &[u8] = b"snapshot";

/// Longest a purge waits for the snapshot covering it to be saved.
const PURGE_WAIT_MS_MAX: u64 = 10_000;
/// How often a waiting purge looks for it.
const PURGE_POLL_MS: u64 = 5;

/// The Raft log and vote on disk. Cheap to clone: clones share the database (one is the
/// reader openraft asks for).
#[derive(Clone)]
pub struct RocksRaftLog {
    db: Arc<DB>,
}

impl Debug for RocksRaftLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksRaftLog")
            .field("path", &self.db.path())
            .finish()
    }
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError<NodeId>> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(write_err)
}

/// A stored log entry or vote. Entries arrive in frames, or are this node's own small
/// commands: a length prefix past a frame is corruption, refused before any allocation, as are
/// bytes left over.
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageError<NodeId>> {
    let config =
        bincode::config::standard().with_limit::<{ braid_protocol::limits::FRAME_BYTES_MAX }>();
    match bincode::serde::decode_from_slice(bytes, config) {
        Ok((value, used)) if used == bytes.len() => Ok(value),
        Ok((_, used)) => Err(read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} bytes after a stored value", bytes.len() - used),
        ))),
        Err(err) => Err(read_err(err)),
    }
}

fn synced() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(true);
    options
}

#[derive(Debug, thiserror::Error)]
#[error("column family {0} is missing")]
struct MissingFamily(&'static str);

/// A key of the log family that is no entry index: corruption, or a database of something else.
#[derive(Debug, thiserror::Error)]
#[error("corrupt Raft log: a key of {0} bytes, not an 8-byte entry index")]
struct CorruptKey(usize);

/// Files the control database keeps open at most (it is small: its log is purged behind
/// snapshots). Counted in [`crate::resp::FILE_DESCRIPTORS_RESERVED`].
pub const CONTROL_OPEN_FILES_MAX: i32 = 64;

impl RocksRaftLog {
    /// Opens (or creates) the log in `dir`.
    pub fn open(dir: &Path) -> Result<RocksRaftLog, rocksdb::Error> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_max_open_files(CONTROL_OPEN_FILES_MAX);
        let families = [
            ColumnFamilyDescriptor::new(CF_LOG, Options::default()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&options, dir, families)?;
        Ok(RocksRaftLog { db: Arc::new(db) })
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, StorageError<NodeId>> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| read_err(MissingFamily(name)))
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError<NodeId>> {
        match self.db.get_cf(self.cf(CF_META)?, key).map_err(read_err)? {
            Some(bytes) => Ok(Some(decode(&bytes)?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError<NodeId>> {
        self.db
            .put_cf_opt(self.cf(CF_META)?, key, encode(value)?, &synced())
            .map_err(write_err)
    }

    /// Deletes every entry in `from..to` (by index) in `batch`.
    fn delete_range(
        &self,
        batch: &mut WriteBatch,
        from: u64,
        to: Option<u64>,
    ) -> Result<(), StorageError<NodeId>> {
        let log = self.cf(CF_LOG)?;
        let start = from.to_be_bytes();
        for item in self
            .db
            .iterator_cf(log, IteratorMode::From(&start, Direction::Forward))
        {
            let (key, _) = item.map_err(read_err)?;
            let index = index_of(&key)?;
            if to.is_some_and(|to| index >= to) {
                break;
            }
            batch.delete_cf(log, key);
        }
        Ok(())
    }
}

impl SnapshotVault for RocksRaftLog {
    fn save(&self, meta: &Meta, bytes: &[u8]) -> Result<(), StorageError<NodeId>> {
        self.put_meta(META_SNAPSHOT, &(meta, bytes))
    }

    fn load(&self) -> Result<Option<(Meta, Vec<u8>)>, StorageError<NodeId>> {
        self.get_meta(META_SNAPSHOT)
    }
}

fn index_of(key: &[u8]) -> Result<u64, StorageError<NodeId>> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| read_err(CorruptKey(key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

impl RaftLogReader<ControlConfig> for RocksRaftLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<ControlConfig>>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let log = self.cf(CF_LOG)?;
        let mut entries = Vec::new();
        for item in self.db.iterator_cf(
            log,
            IteratorMode::From(&start.to_be_bytes(), Direction::Forward),
        ) {
            let (key, value) = item.map_err(read_err)?;
            if !range.contains(&index_of(&key)?) {
                break;
            }
            entries.push(decode(&value)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<ControlConfig> for RocksRaftLog {
    type LogReader = RocksRaftLog;

    async fn get_log_state(&mut self) -> Result<LogState<ControlConfig>, StorageError<NodeId>> {
        let purged: Option<LogId<NodeId>> = self.get_meta(META_PURGED)?;
        let last = match self
            .db
            .iterator_cf(self.cf(CF_LOG)?, IteratorMode::End)
            .next()
        {
            Some(item) => {
                let (_, value) = item.map_err(read_err)?;
                let entry: Entry<ControlConfig> = decode(&value)?;
                Some(entry.log_id)
            }
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta(META_VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get_meta(META_VOTE)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.put_meta(META_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>(META_COMMITTED)?
            .flatten())
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
        let log = self.cf(CF_LOG)?;
        let mut batch = WriteBatch::default();
        for entry in entries {
            batch.put_cf(log, entry.log_id.index.to_be_bytes(), encode(&entry)?);
        }
        // Synced: flushed when it returns.
        let result = self.db.write_opt(batch, &synced());
        callback.log_io_completed(
            result
                .as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        result.map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut batch = WriteBatch::default();
        self.delete_range(&mut batch, log_id.index, None)?;
        self.db.write_opt(batch, &synced()).map_err(write_err)
    }

    /// Deletes the entries up to `log_id`, once the snapshot this database holds covers them.
    /// openraft purges as soon as it hands a received snapshot to the state machine, without
    /// waiting for the snapshot to be saved (another task saves it): a crash in between would
    /// leave neither the entries nor a snapshot covering them, and a node that cannot start. So
    /// the purge waits for the save, which takes milliseconds. Past [`PURGE_WAIT_MS_MAX`] (a
    /// snapshot that failed to install, and will not be saved) it deletes only what the saved
    /// snapshot covers: the rest stays for a restart to replay, and a later purge takes it.
    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(PURGE_WAIT_MS_MAX);
        let through = loop {
            let saved = self.load()?.and_then(|(meta, _)| meta.last_log_id);
            if saved.is_some_and(|saved| saved.index >= log_id.index) {
                break log_id;
            }
            if tokio::time::Instant::now() >= deadline {
                error!(
                    upto = log_id.index,
                    saved = ?saved.map(|saved| saved.index),
                    "keeping Raft log entries openraft purged: no snapshot covering them was \
                     saved within {PURGE_WAIT_MS_MAX} ms (see the state machine's errors)"
                );
                match saved {
                    Some(saved) => break saved,
                    None => return Ok(()),
                }
            }
            tokio::time::sleep(Duration::from_millis(PURGE_POLL_MS)).await;
        };
        let purged: Option<LogId<NodeId>> = self.get_meta(META_PURGED)?;
        if purged.is_some_and(|purged| purged.index >= through.index) {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        self.delete_range(&mut batch, 0, Some(through.index.saturating_add(1)))?;
        batch.put_cf(self.cf(CF_META)?, META_PURGED, encode(&through)?);
        self.db.write_opt(batch, &synced()).map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload, SnapshotMeta, StoredMembership};

    fn log_id(index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    fn snapshot_through(index: u64) -> Meta {
        SnapshotMeta {
            last_log_id: Some(log_id(index)),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("through-{index}"),
        }
    }

    /// A log in `dir` holding entries 1 to 6.
    fn log_of_six_entries(dir: &Path) -> RocksRaftLog {
        let log = RocksRaftLog::open(dir).unwrap();
        let mut batch = WriteBatch::default();
        for index in 1..=6 {
            let entry = Entry::<ControlConfig> {
                log_id: log_id(index),
                payload: EntryPayload::Blank,
            };
            batch.put_cf(
                log.cf(CF_LOG).unwrap(),
                index.to_be_bytes(),
                encode(&entry).unwrap(),
            );
        }
        log.db.write(batch).unwrap();
        log
    }

    #[test]
    fn a_purge_waits_for_the_snapshot_that_covers_it_to_be_saved() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_of_six_entries(dir.path());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let indexes = |log: &RocksRaftLog| {
                let mut log = log.clone();
                async move {
                    let entries = log.try_get_log_entries(0..100).await.unwrap();
                    entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>()
                }
            };
            // openraft purges to 4 while the snapshot saved covers 2 (a received snapshot the
            // state machine has not saved yet): nothing goes until the snapshot through 4 is.
            log.save(&snapshot_through(2), b"state").unwrap();
            let mut purging = log.clone();
            let purge = tokio::spawn(async move { purging.purge(log_id(4)).await });
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!purge.is_finished(), "purged before the snapshot was saved");
            assert_eq!(indexes(&log).await, [1, 2, 3, 4, 5, 6]);
            log.save(&snapshot_through(4), b"state").unwrap();
            purge.await.unwrap().unwrap();
            assert_eq!(indexes(&log).await, [5, 6]);
            let state = log.clone().get_log_state().await.unwrap();
            assert_eq!(state.last_purged_log_id, Some(log_id(4)));
        });
    }

    #[test]
    fn a_purge_no_saved_snapshot_covers_keeps_the_entries_past_the_saved_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_of_six_entries(dir.path());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            // The snapshot through 4 failed to install: only the one through 2 is ever saved.
            log.save(&snapshot_through(2), b"state").unwrap();
            let mut purging = log.clone();
            purging.purge(log_id(4)).await.unwrap();
            let entries = log.clone().try_get_log_entries(0..100).await.unwrap();
            let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
            assert_eq!(indexes, [3, 4, 5, 6], "what no saved snapshot covers stays");
            let state = log.clone().get_log_state().await.unwrap();
            assert_eq!(state.last_purged_log_id, Some(log_id(2)));
        });
    }

    #[test]
    fn a_corrupt_log_key_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_of_six_entries(dir.path());
        log.db
            .put_cf(log.cf(CF_LOG).unwrap(), b"abc", b"x")
            .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = runtime
            .block_on(log.clone().try_get_log_entries(0..100))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a key of 3 bytes") && !err.contains("missing"),
            "{err}"
        );
    }
}
