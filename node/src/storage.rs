//! RocksDB storage: one database per node, column families for data, the change log and
//! replication metadata; every commit of the replica core is one `WriteBatch`.
//!
//! ```text
//!   cf "data"  key bytes                       -> KeyState   (bincode 2, serde)
//!   cf "log"   origin u64 BE ++ seq u64 BE     -> ChangeEvent (bincode 2, serde)
//!   cf "meta"  "vector"                        -> VersionVector
//!              "hlc"                           -> Hlc (high-water mark)
//!              "trimmed"                       -> VersionVector (log deleted through it)
//!              "format"                        -> u32 (the on-disk format version)
//!              "identity"                      -> cluster id ++ node id u64 BE (whose it is)
//!              "boot-id", "process-run",
//!              "recovering"                    -> what a power loss may have taken
//!                                                 (see `RocksStorage::note_boot`)
//!   cf "tombstones"  hlc (wall u64 BE ++ logical u32 BE ++ node u64 BE) ++ key bytes -> ()
//!                                              (the tombstone index: keys by their oldest
//!                                               tombstone, for garbage collection)
//! ```
//!
//! Garbage collection deletes each origin's events through the stable frontier with one range
//! deletion per origin, in one batch with the new `trimmed` vector; RocksDB reclaims the space
//! as it compacts.
//!
//! Durability: `process` writes the WAL without syncing (survives a process crash: the OS has
//! the bytes); `machine` syncs the WAL on every commit (survives power loss). The driver groups
//! concurrent client writes into one commit, so one sync covers many writes (group commit).

use std::path::Path;
use std::sync::Arc;

use braid_conflict::{Hlc, KeyState};
use braid_protocol::storage::{event_size_bytes, Commit, Recovered, Storage};
use braid_protocol::{ChangeEvent, ClusterId, NodeId, Seq, VersionVector};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions, WriteBatch,
    WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

const CF_DATA: &str = "data";
const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const CF_TOMBSTONES: &str = "tombstones";
const META_VECTOR: &[u8] = b"vector";
const META_HLC: &[u8] = b"hlc";
const META_FORMAT: &[u8] = b"format";
const META_TRIMMED: &[u8] = b"trimmed";
const META_BOOT: &[u8] = b"boot-id";
/// Present while this node may lack some of its own last writes (a power loss in `process`
/// durability) and has not taken them back yet: every start until then recovers first.
const META_RECOVERING: &[u8] = b"recovering";
/// `[1]` when a run in `process` durability used this database during the recorded boot
/// (`[0]` otherwise): its last writes were not synced, and a reboot may have taken them,
/// whatever durability the node starts with next.
const META_PROCESS_RUN: &[u8] = b"process-run";
/// The cluster id (16 bytes) and node id (u64 BE) the database belongs to, written at the first
/// start: a data directory of another cluster or region is refused instead of adopted.
const META_IDENTITY: &[u8] = b"identity";
/// Bumped whenever the on-disk layout changes; a database of another format is refused.
/// Format 2 added the tombstone index (and the checkpoints' HLC in the Raft log beside it).
const FORMAT_VERSION: u32 = 2;
/// Events read per step by [`RocksStorage::log_of`].
const LOG_READ_EVENTS: usize = 1024;

/// How durable a commit is when it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// The write-ahead log is written but not synced: survives a process crash, not power loss.
    #[default]
    Process,
    /// The write-ahead log is synced on every commit (group commit): survives power loss.
    Machine,
}

impl Durability {
    /// The mode's name, as configurations spell it.
    pub fn name(self) -> &'static str {
        match self {
            Durability::Process => "process",
            Durability::Machine => "machine",
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A storage failure. Fatal to the node: it no longer knows what is durable.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// RocksDB reported an error (including a full disk or a corrupt file).
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A stored value does not decode: corruption, or a database written by something else.
    #[error("corrupt {what}: {reason}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
    /// The database was written by another on-disk format version.
    #[error(
        "database format {found} is not the supported format {FORMAT_VERSION}: run the braid \
         version that wrote this data directory, or start this region afresh with an empty one \
         (braid join, or a new cluster)"
    )]
    Format {
        /// The format found.
        found: u32,
    },
    /// The directory holds a RocksDB database that no braid format describes.
    #[error(
        "the data directory holds a database that is not a braid data directory (column \
         families: {families}; no format version): check `data-dir` in the configuration"
    )]
    Foreign {
        /// Its column families.
        families: String,
    },
    /// The data directory belongs to another cluster or region.
    #[error(
        "this data directory belongs to {found}, not to this node ({expected}): check \
         `data-dir` in the configuration (each region needs its own)"
    )]
    Identity {
        /// Whose it is.
        found: Identity,
        /// Whose the configuration says it should be.
        expected: Identity,
    },
    /// A column family is missing (cannot happen for a database this module opened).
    #[error("column family {0} missing")]
    MissingColumnFamily(&'static str),
    /// Encoding failed (cannot happen for these types).
    #[error("encoding {0} failed")]
    Encode(&'static str),
}

/// Whose a data directory is: a cluster and one of its nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The cluster.
    pub cluster: ClusterId,
    /// The node.
    pub node: NodeId,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {} of cluster {}", self.node.0, self.cluster)
    }
}

impl Identity {
    const BYTES: usize = 16 + 8;

    fn to_bytes(self) -> [u8; Self::BYTES] {
        let mut bytes = [0; Self::BYTES];
        bytes[..16].copy_from_slice(&self.cluster.0);
        bytes[16..].copy_from_slice(&self.node.0.to_be_bytes());
        bytes
    }

    fn from_bytes(bytes: &[u8]) -> Result<Identity, StorageError> {
        let corrupt = || StorageError::Corrupt {
            what: "identity",
            reason: format!("{} bytes, not {}", bytes.len(), Self::BYTES),
        };
        let (cluster, node) = bytes.split_at_checked(16).ok_or_else(corrupt)?;
        Ok(Identity {
            cluster: ClusterId(cluster.try_into().map_err(|_| corrupt())?),
            node: NodeId(u64::from_be_bytes(node.try_into().map_err(|_| corrupt())?)),
        })
    }
}

/// The most bytes one stored value may decode to. A corrupt length prefix is refused by it
/// before anything is allocated, instead of asking for an impossible allocation (a panic, or
/// an abort) or for gigabytes.
const STORED_VALUE_BYTES_MAX: usize = 1 << 30;

type StoredConfig = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<STORED_VALUE_BYTES_MAX>,
>;

fn config() -> StoredConfig {
    bincode::config::standard().with_limit::<STORED_VALUE_BYTES_MAX>()
}

fn encode<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, StorageError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|_| StorageError::Encode(what))
}

fn decode<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, StorageError> {
    match bincode::serde::decode_from_slice(bytes, config()) {
        Ok((value, used)) if used == bytes.len() => Ok(value),
        Ok(_) => Err(StorageError::Corrupt {
            what,
            reason: "trailing bytes".into(),
        }),
        Err(err) => Err(StorageError::Corrupt {
            what,
            reason: err.to_string(),
        }),
    }
}

/// Bytes of the HLC prefix of a tombstone-index key.
const TOMBSTONE_HLC_BYTES: usize = 20;

/// A tombstone-index key: the HLC in an order-preserving encoding, then the key.
fn tombstone_key(hlc: Hlc, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(TOMBSTONE_HLC_BYTES + key.len());
    out.extend_from_slice(&hlc.wall_ms.to_be_bytes());
    out.extend_from_slice(&hlc.logical.to_be_bytes());
    out.extend_from_slice(&hlc.node.0.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// The HLC and key of a tombstone-index key, or `None` for a key too short to be one.
fn parse_tombstone_key(raw: &[u8]) -> Option<(Hlc, bytes::Bytes)> {
    let wall = raw.get(..8)?.try_into().ok()?;
    let logical = raw.get(8..12)?.try_into().ok()?;
    let node = raw.get(12..TOMBSTONE_HLC_BYTES)?.try_into().ok()?;
    let hlc = Hlc::new(
        u64::from_be_bytes(wall),
        u32::from_be_bytes(logical),
        braid_conflict::NodeId(u64::from_be_bytes(node)),
    );
    Some((
        hlc,
        bytes::Bytes::copy_from_slice(&raw[TOMBSTONE_HLC_BYTES..]),
    ))
}

fn log_key(origin: NodeId, seq: Seq) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&origin.0.to_be_bytes());
    key[8..].copy_from_slice(&seq.0.to_be_bytes());
    key
}

/// Block cache of the key states, bytes.
const DATA_BLOCK_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Bloom filter bits per key of the key states, in table files and in the memtable.
const DATA_BLOOM_BITS_PER_KEY: f64 = 10.0;
/// Memtable size of the key states: inserts of random keys cost a walk of the memtable's skip
/// list, cheaper in a smaller one; flushes cost the same per byte.
const DATA_WRITE_BUFFER_BYTES: usize = 16 * 1024 * 1024;
/// Share of the memtable given to its whole-key bloom filter.
const DATA_MEMTABLE_BLOOM_RATIO: f64 = 0.05;

/// Files the data database keeps open at most (RocksDB opens every table file otherwise, and
/// a large data directory would take the descriptors clients need; past it, tables are opened
/// as read, through a cache). Counted in [`crate::resp::FILE_DESCRIPTORS_RESERVED`].
pub const DATA_OPEN_FILES_MAX: i32 = 256;

/// Options of the key-state column family. Every write reads its key's state first, and most
/// keys were last written before the current memtable: bloom filters in the memtable and in the
/// table files let such a read skip the structures that do not hold the key.
fn data_options() -> Options {
    let mut options = Options::default();
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(DATA_BLOOM_BITS_PER_KEY, false);
    table.set_block_cache(&rocksdb::Cache::new_lru_cache(DATA_BLOCK_CACHE_BYTES));
    table.set_cache_index_and_filter_blocks(true);
    options.set_block_based_table_factory(&table);
    options.set_write_buffer_size(DATA_WRITE_BUFFER_BYTES);
    options.set_memtable_whole_key_filtering(true);
    options.set_memtable_prefix_bloom_ratio(DATA_MEMTABLE_BLOOM_RATIO);
    options
}

/// The replica's storage on RocksDB. Cheap to clone: clones share the database, so readers
/// (the RESP server) can read committed state without going through the replica.
#[derive(Clone)]
pub struct RocksStorage {
    db: Arc<DB>,
    durability: Durability,
    /// Where the next [`Storage::tombstones_through`] begins: past the entries of the last
    /// answer, while answers come full (a backlog being collected). Collected entries are
    /// deleted, and an iterator from the start would step over every deletion not yet
    /// compacted away, at each step again. Reset by an answer that is not full, so that an
    /// entry added behind it is found by the next.
    gc_from: Option<Vec<u8>>,
}

impl std::fmt::Debug for RocksStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStorage")
            .field("path", &self.db.path())
            .field("durability", &self.durability)
            .finish()
    }
}

/// See [`RocksStorage::view`].
pub struct View<'a> {
    storage: &'a RocksStorage,
    snapshot: rocksdb::Snapshot<'a>,
}

impl std::fmt::Debug for View<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("storage", self.storage)
            .finish_non_exhaustive()
    }
}

impl View<'_> {
    /// The key's state in this view.
    pub fn get(&self, key: &[u8]) -> Result<Option<KeyState>, StorageError> {
        let mut options = ReadOptions::default();
        options.set_snapshot(&self.snapshot);
        self.storage.get_with(key, &options)
    }
}

/// Refuses a stored format version other than this build's.
fn check_format_bytes(bytes: &[u8]) -> Result<(), StorageError> {
    let found: u32 = decode(bytes, "format version")?;
    match found == FORMAT_VERSION {
        true => Ok(()),
        false => Err(StorageError::Format { found }),
    }
}

/// Refuses a database of another format, or one that is not a braid data directory, before the
/// read-write open, which would create the column families this format has and that one lacks:
/// the program that wrote it could then not open it again (a read-write open must name every
/// column family), though the refusal tells the operator to run that version.
fn check_format_before_open(dir: &Path) -> Result<(), StorageError> {
    // No database yet (or none RocksDB can list: the open says why).
    let Ok(existing) = DB::list_cf(&Options::default(), dir) else {
        return Ok(());
    };
    let ours = [CF_DATA, CF_LOG, CF_META, CF_TOMBSTONES];
    let known = |name: &String| name == "default" || ours.contains(&name.as_str());
    let laid_out = |name: &&str| existing.iter().any(|e| e == name);
    if existing.iter().all(known) && (ours.iter().all(laid_out) || !laid_out(&CF_META)) {
        // This format's layout (the open checks the version), or a database with none of it
        // yet (created, and stopped before its families were).
        return Ok(());
    }
    let foreign = || StorageError::Foreign {
        families: existing.join(", "),
    };
    let families = existing
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
    let db = DB::open_cf_descriptors_read_only(&Options::default(), dir, families, false)?;
    let meta = db.cf_handle(CF_META).ok_or_else(foreign)?;
    match db.get_cf(meta, META_FORMAT)? {
        Some(bytes) => check_format_bytes(&bytes),
        None => Err(foreign()),
    }
}

impl RocksStorage {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path, durability: Durability) -> Result<RocksStorage, StorageError> {
        check_format_before_open(dir)?;
        let mut options = Options::default();
        options.create_if_missing(true);
        options.set_max_open_files(DATA_OPEN_FILES_MAX);
        options.create_missing_column_families(true);
        // Write-ahead log on; each commit is a single WriteBatch.
        options.set_manual_wal_flush(false);
        let families = [
            ColumnFamilyDescriptor::new(CF_DATA, data_options()),
            ColumnFamilyDescriptor::new(CF_LOG, Options::default()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
            ColumnFamilyDescriptor::new(CF_TOMBSTONES, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&options, dir, families)?;
        let storage = RocksStorage {
            db: Arc::new(db),
            durability,
            gc_from: None,
        };
        storage.check_format()?;
        Ok(storage)
    }

    /// Opens the database in `dir` read-only, beside a node that may be running on it (for
    /// checks such as `braid drill`'s): a consistent view as of the moment it opens.
    pub fn open_read_only(dir: &Path) -> Result<RocksStorage, StorageError> {
        check_format_before_open(dir)?;
        let families = [
            ColumnFamilyDescriptor::new(CF_DATA, data_options()),
            ColumnFamilyDescriptor::new(CF_LOG, Options::default()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
            ColumnFamilyDescriptor::new(CF_TOMBSTONES, Options::default()),
        ];
        let db = DB::open_cf_descriptors_read_only(&Options::default(), dir, families, false)?;
        let storage = RocksStorage {
            db: Arc::new(db),
            durability: Durability::Process,
            gc_from: None,
        };
        let meta = storage.cf(CF_META)?;
        if let Some(bytes) = storage.db.get_cf(meta, META_FORMAT)? {
            check_format_bytes(&bytes)?;
        }
        Ok(storage)
    }

    /// Every event of `origin` in the change log, in sequence order (for checks and tools).
    pub fn log_of(&mut self, origin: NodeId) -> Result<Vec<ChangeEvent>, StorageError> {
        let mut events = Vec::new();
        let mut after = Seq::ZERO;
        loop {
            let batch = self.log_after(origin, after, LOG_READ_EVENTS, usize::MAX)?;
            let Some(last) = batch.last() else {
                return Ok(events);
            };
            after = last.seq;
            events.extend(batch);
        }
    }

    fn check_format(&self) -> Result<(), StorageError> {
        let meta = self.cf(CF_META)?;
        match self.db.get_cf(meta, META_FORMAT)? {
            Some(bytes) => check_format_bytes(&bytes)?,
            None => self
                .db
                .put_cf(meta, META_FORMAT, encode(&FORMAT_VERSION, "format")?)?,
        }
        Ok(())
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, StorageError> {
        self.db
            .cf_handle(name)
            .ok_or(StorageError::MissingColumnFamily(name))
    }

    /// The durability mode.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// The stored state of `key` (a read that does not go through the replica).
    pub fn get(&self, key: &[u8]) -> Result<Option<KeyState>, StorageError> {
        self.get_with(key, &ReadOptions::default())
    }

    /// [`RocksStorage::get`] with these read options (a view's snapshot).
    fn get_with(
        &self,
        key: &[u8],
        options: &ReadOptions,
    ) -> Result<Option<KeyState>, StorageError> {
        match self.db.get_pinned_cf_opt(self.cf(CF_DATA)?, key, options)? {
            Some(bytes) => Ok(Some(decode(&bytes, "key state")?)),
            None => Ok(None),
        }
    }

    /// A consistent view of every key's state as of now: reads through it see every commit
    /// made before it was taken, whole, and none after (a multi-key read such as `MGET` sees
    /// an `MSET` whole or not at all).
    pub fn view(&self) -> View<'_> {
        View {
            storage: self,
            snapshot: self.db.snapshot(),
        }
    }

    /// Every key's visible value, in key order (for checks and tools; reads the whole data
    /// column family).
    pub fn values(
        &self,
    ) -> Result<std::collections::BTreeMap<bytes::Bytes, braid_conflict::Value>, StorageError> {
        let mut values = std::collections::BTreeMap::new();
        for item in self.db.iterator_cf(self.cf(CF_DATA)?, IteratorMode::Start) {
            let (key, bytes) = item?;
            let state: KeyState = decode(&bytes, "key state")?;
            if let Some(value) = state.into_value() {
                values.insert(bytes::Bytes::copy_from_slice(&key), value);
            }
        }
        Ok(values)
    }
}

/// What a data snapshot hands its consumer, in order: the head, then chunks of keys.
#[derive(Debug)]
pub enum SnapshotPiece {
    /// What the keys reflect, and about how many there are.
    Begin(braid_protocol::SnapshotBegin),
    /// Keys in order, with their states.
    Chunk(Vec<braid_protocol::SnapshotEntry>),
}

impl RocksStorage {
    /// Reads a data snapshot at one consistent view (a RocksDB snapshot: every commit is one
    /// batch, so the vector read there is exactly what the key states reflect), handing each
    /// piece to `emit` as it goes; stops early, with `Ok(false)`, when `emit` returns false.
    /// Chunks hold at most `chunk_keys_max` keys and `chunk_bytes_max` bytes of keys and
    /// stored states (or a single key, however large). Blocking: run it off the async runtime.
    pub fn read_snapshot(
        &self,
        chunk_keys_max: usize,
        chunk_bytes_max: usize,
        mut emit: impl FnMut(SnapshotPiece) -> bool,
    ) -> Result<bool, StorageError> {
        assert!(chunk_keys_max > 0);
        let (data, meta) = (self.cf(CF_DATA)?, self.cf(CF_META)?);
        let view = self.db.snapshot();
        let vector: VersionVector = match view.get_cf(meta, META_VECTOR)? {
            Some(bytes) => decode(&bytes, "version vector")?,
            None => VersionVector::new(),
        };
        let hlc: Hlc = match view.get_cf(meta, META_HLC)? {
            Some(bytes) => decode(&bytes, "hlc")?,
            None => Hlc::ZERO,
        };
        let keys_estimate = self
            .db
            .property_int_value_cf(data, "rocksdb.estimate-num-keys")?
            .unwrap_or(0);
        let begin = braid_protocol::SnapshotBegin {
            vector,
            hlc,
            keys_estimate,
        };
        if !emit(SnapshotPiece::Begin(begin)) {
            return Ok(false);
        }
        let mut chunk = Vec::new();
        let mut bytes = 0usize;
        // A whole scan, read once: kept out of the block cache, which serves the clients'
        // reads and writes.
        let mut scan = ReadOptions::default();
        scan.fill_cache(false);
        for item in view.iterator_cf_opt(data, scan, IteratorMode::Start) {
            let (key, value) = item?;
            let size = key.len() + value.len();
            // Sent before it would pass the budget: a chunk is at most the budget, or one key.
            let full = chunk.len() >= chunk_keys_max || bytes + size > chunk_bytes_max;
            if !chunk.is_empty() && full {
                bytes = 0;
                if !emit(SnapshotPiece::Chunk(std::mem::take(&mut chunk))) {
                    return Ok(false);
                }
            }
            bytes += size;
            chunk.push(braid_protocol::SnapshotEntry {
                key: bytes::Bytes::copy_from_slice(&key),
                state: decode(&value, "key state")?,
            });
        }
        if !chunk.is_empty() && !emit(SnapshotPiece::Chunk(chunk)) {
            return Ok(false);
        }
        Ok(true)
    }
}

impl RocksStorage {
    /// Adds to `batch` the deletion of every change-log event of each origin through
    /// `through[origin]`, and the new `trimmed` vector: one range deletion per origin.
    fn add_trim(
        &self,
        batch: &mut WriteBatch,
        through: &VersionVector,
    ) -> Result<(), StorageError> {
        let (log, meta) = (self.cf(CF_LOG)?, self.cf(CF_META)?);
        let mut trimmed: VersionVector = match self.db.get_cf(meta, META_TRIMMED)? {
            Some(bytes) => decode(&bytes, "trimmed vector")?,
            None => VersionVector::new(),
        };
        for (origin, seq) in through.iter() {
            batch.delete_range_cf(log, log_key(origin, Seq(1)), log_key(origin, seq.next()));
        }
        trimmed.merge(through);
        batch.put_cf(meta, META_TRIMMED, encode(&trimmed, "trimmed vector")?);
        Ok(())
    }

    /// Records `boot_id` (the operating system's id of its current boot) as the one this
    /// database is used under, synced, and returns whether this node may lack some of its own
    /// last writes: the machine restarted since another boot id was recorded, and some run
    /// during that boot was in `process` durability, so the tail of its write-ahead log may
    /// have gone with the page cache (whatever durability this run has: switching to `machine`
    /// after a power loss does not bring those writes back); or an earlier start found so and
    /// did not finish taking them back ([`RocksStorage::recovery_done`] was not called since).
    /// `runs_in_process_durability` is this run's. The new boot id and that mark are written
    /// together, so a crash in between cannot lose the mark.
    pub fn note_boot(
        &self,
        boot_id: &str,
        runs_in_process_durability: bool,
    ) -> Result<bool, StorageError> {
        let meta = self.cf(CF_META)?;
        let before = self.db.get_cf(meta, META_BOOT)?;
        let rebooted = before.as_deref().is_some_and(|b| b != boot_id.as_bytes());
        // A database from before the record was kept may have been used so: assumed it was.
        let process_run_before = match self.db.get_cf(meta, META_PROCESS_RUN)? {
            Some(flag) => flag.first() == Some(&1),
            None => before.is_some(),
        };
        let marked = self.recovery_marked()?;
        let mut batch = WriteBatch::default();
        batch.put_cf(meta, META_BOOT, boot_id.as_bytes());
        let process_run_now = runs_in_process_durability || (!rebooted && process_run_before);
        batch.put_cf(meta, META_PROCESS_RUN, [u8::from(process_run_now)]);
        let possible_loss = marked || (rebooted && process_run_before);
        if possible_loss {
            batch.put_cf(meta, META_RECOVERING, b"");
        }
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(batch, &options)?;
        Ok(possible_loss)
    }

    /// Refuses a database that belongs to another cluster or node, and records `identity` in
    /// one that belongs to none yet (a new one, or one from before identities were recorded).
    pub fn claim(&self, identity: Identity) -> Result<(), StorageError> {
        let meta = self.cf(CF_META)?;
        if let Some(bytes) = self.db.get_cf(meta, META_IDENTITY)? {
            let found = Identity::from_bytes(&bytes)?;
            return match found == identity {
                true => Ok(()),
                false => Err(StorageError::Identity {
                    found,
                    expected: identity,
                }),
            };
        }
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .put_cf_opt(meta, META_IDENTITY, identity.to_bytes(), &options)?;
        Ok(())
    }

    /// Whether an earlier start marked this node as recovering its own events and the mark is
    /// still there (see [`RocksStorage::note_boot`]), for a machine that tells no boot id.
    pub fn recovery_marked(&self) -> Result<bool, StorageError> {
        let meta = self.cf(CF_META)?;
        Ok(self.db.get_cf(meta, META_RECOVERING)?.is_some())
    }

    /// This node holds its own events again (its recovery after a possible loss ended): later
    /// starts in the same boot need not recover. Synced.
    pub fn recovery_done(&self) -> Result<(), StorageError> {
        let meta = self.cf(CF_META)?;
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db.delete_cf_opt(meta, META_RECOVERING, &options)?;
        Ok(())
    }

    /// Syncs the write-ahead log: every commit so far survives power loss from here on (in
    /// `process` mode too).
    pub fn sync(&self) -> Result<(), StorageError> {
        self.db.flush_wal(true)?;
        Ok(())
    }
}

impl Storage for RocksStorage {
    type Error = StorageError;

    fn recover(&mut self) -> Result<Recovered, StorageError> {
        let meta = self.cf(CF_META)?;
        let vector: VersionVector = match self.db.get_cf(meta, META_VECTOR)? {
            Some(bytes) => decode(&bytes, "version vector")?,
            None => VersionVector::new(),
        };
        let hlc: Hlc = match self.db.get_cf(meta, META_HLC)? {
            Some(bytes) => decode(&bytes, "hlc")?,
            None => Hlc::ZERO,
        };
        let trimmed: VersionVector = match self.db.get_cf(meta, META_TRIMMED)? {
            Some(bytes) => decode(&bytes, "trimmed vector")?,
            None => VersionVector::new(),
        };
        Ok(Recovered {
            vector,
            hlc,
            trimmed,
        })
    }

    fn trim_log(&mut self, through: &VersionVector) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        self.add_trim(&mut batch, through)?;
        let mut options = WriteOptions::default();
        options.set_sync(self.durability == Durability::Machine);
        self.db.write_opt(batch, &options)?;
        Ok(())
    }

    fn key_state(&mut self, key: &[u8]) -> Result<Option<KeyState>, StorageError> {
        self.get(key)
    }

    fn commit(&mut self, commit: Commit) -> Result<(), StorageError> {
        let (data, log, meta) = (self.cf(CF_DATA)?, self.cf(CF_LOG)?, self.cf(CF_META)?);
        let tombstones = self.cf(CF_TOMBSTONES)?;
        let mut batch = WriteBatch::default();
        for (hlc, key) in &commit.collected {
            batch.delete_cf(tombstones, tombstone_key(*hlc, key));
        }
        for (key, state) in &commit.keys {
            if state.is_empty() {
                batch.delete_cf(data, key);
                continue;
            }
            if let Some(hlc) = state.oldest_tombstone() {
                batch.put_cf(tombstones, tombstone_key(hlc, key), []);
            }
            batch.put_cf(data, key, encode(state, "key state")?);
        }
        for event in &commit.events {
            batch.put_cf(
                log,
                log_key(event.origin, event.seq),
                encode(event, "event")?,
            );
        }
        batch.put_cf(meta, META_VECTOR, encode(&commit.vector, "vector")?);
        batch.put_cf(meta, META_HLC, encode(&commit.hlc, "hlc")?);
        if !commit.trim_through.is_empty() {
            self.add_trim(&mut batch, &commit.trim_through)?;
        }
        let mut options = WriteOptions::default();
        options.set_sync(self.durability == Durability::Machine);
        self.db.write_opt(batch, &options)?;
        Ok(())
    }

    fn tombstones_through(
        &mut self,
        stable: Hlc,
        keys_max: usize,
    ) -> Result<Vec<(Hlc, bytes::Bytes)>, StorageError> {
        let mut entries = Vec::new();
        let mode = match &self.gc_from {
            Some(from) => IteratorMode::From(from, Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut last = None;
        for item in self.db.iterator_cf(self.cf(CF_TOMBSTONES)?, mode) {
            if entries.len() >= keys_max {
                break;
            }
            let (raw, _) = item?;
            let (hlc, key) = parse_tombstone_key(&raw).ok_or(StorageError::Corrupt {
                what: "tombstone index",
                reason: format!("a key of {} bytes", raw.len()),
            })?;
            if hlc > stable {
                break;
            }
            entries.push((hlc, key));
            last = Some(raw);
        }
        // The smallest key after the last one returned.
        self.gc_from = match (last, entries.len() == keys_max) {
            (Some(raw), true) => Some([&raw[..], &[0]].concat()),
            _ => None,
        };
        Ok(entries)
    }

    fn log_after(
        &mut self,
        origin: NodeId,
        after: Seq,
        events_max: usize,
        bytes_max: usize,
    ) -> Result<Vec<ChangeEvent>, StorageError> {
        let log = self.cf(CF_LOG)?;
        let start = log_key(origin, after.next());
        let mut events = Vec::new();
        let mut bytes = 0;
        for item in self
            .db
            .iterator_cf(log, IteratorMode::From(&start, Direction::Forward))
        {
            let (key, value) = item?;
            if !key.starts_with(&origin.0.to_be_bytes()) {
                break;
            }
            if key.len() != 16 {
                // Every key of the log is an origin and a sequence number, 8 bytes each.
                return Err(StorageError::Corrupt {
                    what: "change-log key",
                    reason: format!("{} bytes, not 16", key.len()),
                });
            }
            if events.len() >= events_max || (bytes >= bytes_max && !events.is_empty()) {
                break;
            }
            let event: ChangeEvent = decode(&value, "log event")?;
            bytes += event_size_bytes(&event);
            events.push(event);
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_belongs_to_the_node_that_first_claimed_it() {
        let dir = tempfile::tempdir().unwrap();
        let identity = |cluster: u8, node: u64| Identity {
            cluster: ClusterId([cluster; 16]),
            node: NodeId(node),
        };
        {
            let storage = RocksStorage::open(dir.path(), Durability::Process).unwrap();
            storage.claim(identity(1, 1)).unwrap();
            storage.claim(identity(1, 1)).unwrap();
        }
        let storage = RocksStorage::open(dir.path(), Durability::Process).unwrap();
        storage.claim(identity(1, 1)).unwrap();
        for other in [identity(2, 1), identity(1, 2)] {
            let err = storage.claim(other).unwrap_err();
            assert!(
                matches!(err, StorageError::Identity { found, expected }
                    if found == identity(1, 1) && expected == other),
                "{err}"
            );
            assert!(err.to_string().contains("data-dir"), "{err}");
        }
        // Refused, not taken over: the first owner still opens it.
        storage.claim(identity(1, 1)).unwrap();
        let meta = storage.cf(CF_META).unwrap();
        storage.db.put_cf(meta, META_IDENTITY, b"short").unwrap();
        let err = storage.claim(identity(1, 1)).unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::Corrupt {
                    what: "identity",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_database_of_another_format_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        // Laid out as an older format: without the tombstone index.
        {
            let mut options = Options::default();
            options.create_if_missing(true);
            options.create_missing_column_families(true);
            let db = DB::open_cf(&options, dir.path(), [CF_DATA, CF_LOG, CF_META]).unwrap();
            let meta = db.cf_handle(CF_META).unwrap();
            db.put_cf(meta, META_FORMAT, encode(&1u32, "format").unwrap())
                .unwrap();
        }
        let err = RocksStorage::open(dir.path(), Durability::Machine).unwrap_err();
        assert!(matches!(err, StorageError::Format { found: 1 }), "{err}");
        let mut families = DB::list_cf(&Options::default(), dir.path()).unwrap();
        families.sort();
        assert_eq!(
            families,
            ["data", "default", "log", "meta"],
            "nothing created"
        );
    }
    #[test]
    fn a_database_no_format_describes_is_refused_and_left_as_it_was() {
        let lay_out = |dir: &Path, families: &[&str], format: Option<u32>| {
            let mut options = Options::default();
            options.create_if_missing(true);
            options.create_missing_column_families(true);
            let db = DB::open_cf(&options, dir, families).unwrap();
            let meta = db.cf_handle(CF_META).unwrap();
            db.put_cf(meta, b"vote", b"1").unwrap();
            if let Some(format) = format {
                db.put_cf(meta, META_FORMAT, encode(&format, "format").unwrap())
                    .unwrap();
            }
        };
        let families = |dir: &Path| {
            let mut families = DB::list_cf(&Options::default(), dir).unwrap();
            families.sort();
            families
        };
        // The control plane's database (a log and a meta family, no format): data-dir pointed
        // at <data-dir>/control.
        let control = tempfile::tempdir().unwrap();
        lay_out(control.path(), &[CF_LOG, CF_META], None);
        for open in [
            RocksStorage::open(control.path(), Durability::Process).map(drop),
            RocksStorage::open_read_only(control.path()).map(drop),
        ] {
            let err = open.unwrap_err();
            assert!(matches!(err, StorageError::Foreign { .. }), "{err}");
            assert!(err.to_string().contains("data-dir"), "{err}");
        }
        assert_eq!(families(control.path()), ["default", "log", "meta"]);
        // A later format, with a family this one does not know: its version is what is told.
        let later = tempfile::tempdir().unwrap();
        let mut all = vec![CF_DATA, CF_LOG, CF_META, CF_TOMBSTONES, "extra"];
        lay_out(later.path(), &all, Some(3));
        let err = RocksStorage::open(later.path(), Durability::Process).unwrap_err();
        assert!(matches!(err, StorageError::Format { found: 3 }), "{err}");
        all.push("default");
        all.sort();
        assert_eq!(families(later.path()), all);
        // An older format, read only: its version too.
        let older = tempfile::tempdir().unwrap();
        lay_out(older.path(), &[CF_DATA, CF_LOG, CF_META], Some(1));
        let err = RocksStorage::open_read_only(older.path()).unwrap_err();
        assert!(matches!(err, StorageError::Format { found: 1 }), "{err}");
    }

    #[test]
    fn a_view_sees_the_commits_before_it_and_none_after() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = RocksStorage::open(dir.path(), Durability::Machine).unwrap();
        let node = NodeId(1);
        let state = |value: &'static str, ms: u64| {
            let mut state = KeyState::default();
            let op = state
                .prepare(node, Command::Set(Bytes::from_static(value.as_bytes())))
                .unwrap()
                .op
                .unwrap();
            state.apply(&op, Hlc::new(ms, 0, node));
            state
        };
        let mset = |value: &'static str, ms: u64| Commit {
            keys: vec![
                (Bytes::from_static(b"a"), state(value, ms)),
                (Bytes::from_static(b"b"), state(value, ms)),
            ],
            events: vec![],
            vector: VersionVector::new(),
            hlc: Hlc::new(ms, 0, node),
            trim_through: VersionVector::new(),
            collected: vec![],
        };
        storage.commit(mset("old", 1)).unwrap();
        let view = storage.view();
        let a = view.get(b"a").unwrap();
        storage.clone().commit(mset("new", 2)).unwrap();
        assert_eq!(storage.get(b"b").unwrap(), Some(state("new", 2)));
        assert_eq!(a, Some(state("old", 1)));
        assert_eq!(view.get(b"b").unwrap(), Some(state("old", 1)), "b as a was");
    }

    #[test]
    fn a_corrupt_length_in_a_stored_value_is_an_error_not_a_panic() {
        // A byte string announcing 2^60 bytes, as a flipped bit in a length prefix could.
        let mut bytes = vec![253];
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let err = decode::<bytes::Bytes>(&bytes, "log event").unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::Corrupt {
                    what: "log event",
                    ..
                }
            ),
            "{err}"
        );
        let err = decode::<ChangeEvent>(
            &[1, 1, 1, 0, 1, 253, 255, 255, 255, 255, 255, 255, 255, 15],
            "log event",
        );
        assert!(err.is_err());
    }
    use braid_conflict::Command;
    use braid_protocol::MemoryStorage;
    use bytes::Bytes;

    /// The conformance suite every `Storage` passes: atomic commits, recovery, ordered log reads
    /// with both limits.
    fn conformance<S: Storage>(mut storage: S, reopen: impl FnOnce(S) -> S) {
        assert_eq!(storage.recover().unwrap(), Recovered::default());
        let node = NodeId(3);
        let mut events = Vec::new();
        let mut vector = VersionVector::new();
        let mut keys = Vec::new();
        for i in 1..=5u64 {
            let key = Bytes::from(format!("k{i}"));
            let mut state = KeyState::default();
            let op = state
                .prepare(node, Command::Set(Bytes::from(vec![b'x'; 100])))
                .unwrap()
                .op
                .unwrap();
            let hlc = Hlc::new(i, 0, node);
            state.apply(&op, hlc);
            events.push(ChangeEvent {
                origin: node,
                seq: Seq(i),
                hlc,
                key: key.clone(),
                op,
            });
            vector.advance(node, Seq(i));
            keys.push((key, state));
        }
        let commit = Commit {
            keys: keys.clone(),
            events: events.clone(),
            vector: vector.clone(),
            hlc: Hlc::new(5, 0, node),
            trim_through: VersionVector::new(),
            collected: Vec::new(),
        };
        storage.commit(commit.clone()).unwrap();
        // Another origin's events must not leak into this origin's range.
        let other = ChangeEvent {
            origin: NodeId(4),
            seq: Seq(1),
            ..events[0].clone()
        };
        let other = ChangeEvent {
            hlc: Hlc::new(9, 0, NodeId(4)),
            ..other
        };
        storage
            .commit(Commit {
                keys: vec![],
                events: vec![other],
                vector: vector.clone(),
                hlc: Hlc::new(9, 0, node),
                trim_through: VersionVector::new(),
                collected: Vec::new(),
            })
            .unwrap();

        let mut storage = reopen(storage);
        let recovered = storage.recover().unwrap();
        assert_eq!(recovered.vector, vector);
        assert_eq!(recovered.hlc, Hlc::new(9, 0, node));
        assert_eq!(storage.key_state(b"k2").unwrap(), Some(keys[1].1.clone()));
        assert_eq!(storage.key_state(b"missing").unwrap(), None);
        assert_eq!(
            storage.log_after(node, Seq(0), 100, usize::MAX).unwrap(),
            events
        );
        assert_eq!(
            storage.log_after(node, Seq(3), 100, usize::MAX).unwrap(),
            events[3..].to_vec()
        );
        assert_eq!(
            storage.log_after(node, Seq(0), 2, usize::MAX).unwrap(),
            events[..2].to_vec()
        );
        assert_eq!(
            storage.log_after(node, Seq(0), 100, 1).unwrap().len(),
            1,
            "at least one event"
        );
        assert_eq!(
            storage.log_after(node, Seq(5), 100, usize::MAX).unwrap(),
            vec![]
        );
        assert_eq!(
            storage
                .log_after(NodeId(4), Seq(0), 100, usize::MAX)
                .unwrap()
                .len(),
            1
        );
        // Lent one at a time, the same events as read, within the same limits.
        let first_bytes = braid_protocol::storage::event_size_bytes(&events[0]);
        for (origin, after, events_max, bytes_max) in [
            (node, 0, 100, usize::MAX),
            (node, 3, 100, usize::MAX),
            (node, 0, 2, usize::MAX),
            (node, 0, 100, 1),
            (node, 0, 100, first_bytes + 1),
            (node, 5, 100, usize::MAX),
            (NodeId(4), 0, 100, usize::MAX),
        ] {
            let mut lent = Vec::new();
            let counted = storage
                .log_after_each(origin, Seq(after), events_max, bytes_max, &mut |event| {
                    lent.push(event.clone())
                })
                .unwrap();
            let read = storage
                .log_after(origin, Seq(after), events_max, bytes_max)
                .unwrap();
            assert_eq!(
                lent, read,
                "{origin:?} after {after}, {events_max}, {bytes_max}"
            );
            let bytes: usize = read
                .iter()
                .map(braid_protocol::storage::event_size_bytes)
                .sum();
            assert_eq!(counted, bytes, "the bytes counted");
        }
        assert_eq!(
            storage
                .log_after(node, Seq(0), 100, first_bytes + 1)
                .unwrap(),
            events[..2].to_vec(),
            "the byte limit is reached with the second event"
        );

        // Trimming deletes one origin's events through a seq, and nothing of another origin;
        // what was trimmed is recovered, and outlives later commits.
        let through: VersionVector = [(node, Seq(3))].into_iter().collect();
        storage.trim_log(&through).unwrap();
        assert_eq!(
            storage.log_after(node, Seq(0), 100, usize::MAX).unwrap(),
            events[3..].to_vec()
        );
        assert_eq!(
            storage
                .log_after(NodeId(4), Seq(0), 100, usize::MAX)
                .unwrap()
                .len(),
            1
        );
        storage
            .commit(Commit {
                keys: vec![],
                events: vec![],
                vector: vector.clone(),
                hlc: Hlc::new(10, 0, node),
                // A commit may trim too, in the same atomic write.
                trim_through: [(node, Seq(4))].into_iter().collect(),
                collected: Vec::new(),
            })
            .unwrap();
        let recovered = storage.recover().unwrap();
        assert_eq!(recovered.trimmed, [(node, Seq(4))].into_iter().collect());
        assert_eq!(recovered.hlc, Hlc::new(10, 0, node));
        assert_eq!(
            storage.log_after(node, Seq(0), 100, usize::MAX).unwrap(),
            events[4..].to_vec()
        );
        let more: VersionVector = [(node, Seq(5)), (NodeId(4), Seq(1))].into_iter().collect();
        storage.trim_log(&more).unwrap();
        assert_eq!(storage.recover().unwrap().trimmed, more);
        for origin in [node, NodeId(4)] {
            assert_eq!(
                storage.log_after(origin, Seq(0), 100, usize::MAX).unwrap(),
                vec![]
            );
        }

        // The tombstone index: a deleted string is indexed by its tombstone's HLC, found up to
        // a stable HLC at or above it, and a commit that collects it (writing the state left,
        // here empty) deletes both the entry and the key.
        let mut tombstoned = keys[1].1.clone();
        let delete = tombstoned
            .prepare(node, Command::Delete)
            .unwrap()
            .op
            .unwrap();
        let at = Hlc::new(20, 0, node);
        tombstoned.apply(&delete, at);
        assert_eq!(tombstoned.oldest_tombstone(), Some(at));
        let plain = |keys: Vec<(Bytes, KeyState)>, collected: Vec<(Hlc, Bytes)>| Commit {
            keys,
            events: vec![],
            vector: vector.clone(),
            hlc: Hlc::new(30, 0, node),
            trim_through: VersionVector::new(),
            collected,
        };
        storage
            .commit(plain(vec![(keys[1].0.clone(), tombstoned.clone())], vec![]))
            .unwrap();
        assert_eq!(
            storage
                .tombstones_through(Hlc::new(19, 0, node), 10)
                .unwrap(),
            vec![]
        );
        let entries = storage.tombstones_through(at, 10).unwrap();
        assert_eq!(entries, vec![(at, keys[1].0.clone())]);
        assert_eq!(storage.tombstones_through(at, 0).unwrap(), vec![]);
        assert!(tombstoned.collect_tombstones(at));
        assert!(tombstoned.is_empty());
        storage
            .commit(plain(vec![(keys[1].0.clone(), tombstoned)], entries))
            .unwrap();
        assert_eq!(storage.key_state(&keys[1].0).unwrap(), None);
        assert_eq!(storage.tombstones_through(at, 10).unwrap(), vec![]);

        // A backlog collected in full steps, and an entry added behind the entries a step took
        // meanwhile: every entry is found, each once, and the steps end.
        let deleted_at = |key: &str, ms: u64| {
            let mut state = keys[2].1.clone();
            let op = state.prepare(node, Command::Delete).unwrap().op.unwrap();
            state.apply(&op, Hlc::new(ms, 0, node));
            (Bytes::from(key.to_string()), state)
        };
        let backlog: Vec<(Bytes, KeyState)> = (0..5)
            .map(|i| deleted_at(&format!("gc{i}"), 40 + i))
            .collect();
        storage.commit(plain(backlog, vec![])).unwrap();
        let stable = Hlc::new(100, 0, node);
        let mut found = Vec::new();
        for step in 0.. {
            assert!(step < 10, "the steps never ended: {found:?}");
            let entries = storage.tombstones_through(stable, 2).unwrap();
            if entries.is_empty() {
                break;
            }
            found.extend(entries.iter().map(|(_, key)| key.clone()));
            // As the replica collects: the entries go, in the commit that writes their keys.
            let collected: Vec<(Bytes, KeyState)> = entries
                .iter()
                .map(|(_, key)| (key.clone(), KeyState::default()))
                .collect();
            let behind = (step == 0).then(|| deleted_at("behind", 35));
            storage
                .commit(plain(
                    collected.into_iter().chain(behind).collect(),
                    entries,
                ))
                .unwrap();
        }
        found.sort();
        let expected: Vec<Bytes> = ["behind", "gc0", "gc1", "gc2", "gc3", "gc4"]
            .map(|k| Bytes::from(k.to_string()))
            .to_vec();
        assert_eq!(found, expected);
        assert_eq!(
            storage.key_state(&keys[2].0).unwrap(),
            Some(keys[2].1.clone())
        );
    }

    #[test]
    fn memory_storage_passes_the_conformance_suite() {
        conformance(MemoryStorage::default(), |s| s);
    }

    #[test]
    fn a_possible_loss_stays_marked_across_restarts_until_recovery_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let open = || RocksStorage::open(dir.path(), Durability::Process).unwrap();
        let storage = open();
        assert!(!storage.note_boot("boot-1", true).unwrap(), "first start");
        assert!(!storage.note_boot("boot-1", true).unwrap(), "same boot");
        assert!(
            storage.note_boot("boot-2", false).unwrap(),
            "a reboot after a run in process durability may have lost writes, even if the node \
             now starts in machine durability"
        );
        storage.recovery_done().unwrap();
        assert!(
            !storage.note_boot("boot-3", false).unwrap(),
            "a reboot after runs in machine durability only loses nothing"
        );
        assert!(!storage.note_boot("boot-3", true).unwrap(), "same boot");
        assert!(
            !storage.note_boot("boot-3", false).unwrap(),
            "same boot, back to machine"
        );
        assert!(
            storage.note_boot("boot-4", false).unwrap(),
            "a reboot after a boot that had a run in process durability, whichever was last"
        );
        storage.recovery_done().unwrap();
        assert!(!storage.note_boot("boot-5", true).unwrap());
        assert!(storage.note_boot("boot-6", true).unwrap(), "a reboot");
        drop(storage);
        let storage = open();
        assert!(
            storage.note_boot("boot-3", true).unwrap(),
            "a restart in the same boot before recovery ended recovers too"
        );
        assert!(
            storage.recovery_marked().unwrap(),
            "seen without a boot id too"
        );
        storage.recovery_done().unwrap();
        assert!(!storage.recovery_marked().unwrap());
        drop(storage);
        let storage = open();
        assert!(!storage.note_boot("boot-3", true).unwrap(), "recovered");
    }

    #[test]
    fn rocks_storage_passes_the_conformance_suite_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let storage = RocksStorage::open(dir.path(), Durability::Machine).unwrap();
        conformance(storage, |s| {
            drop(s);
            RocksStorage::open(dir.path(), Durability::Machine).unwrap()
        });
    }

    #[test]
    fn a_corrupt_value_is_a_typed_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let storage = RocksStorage::open(dir.path(), Durability::Process).unwrap();
        storage
            .db
            .put_cf(storage.cf(CF_DATA).unwrap(), b"k", b"\xff\xff\xff garbage")
            .unwrap();
        assert!(matches!(
            storage.get(b"k"),
            Err(StorageError::Corrupt { .. })
        ));
    }

    #[test]
    fn another_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = RocksStorage::open(dir.path(), Durability::Process).unwrap();
            storage
                .db
                .put_cf(
                    storage.cf(CF_META).unwrap(),
                    META_FORMAT,
                    encode(&99u32, "f").unwrap(),
                )
                .unwrap();
        }
        assert!(matches!(
            RocksStorage::open(dir.path(), Durability::Process),
            Err(StorageError::Format { found: 99 })
        ));
    }

    /// A commit of one write of `origin` at `seq`: key `key` set to `value`.
    fn write(storage: &mut RocksStorage, origin: NodeId, seq: u64, key: &str, value: &str) {
        let key = Bytes::from(key.to_owned());
        let mut state = storage.get(&key).unwrap().unwrap_or_default();
        let op = state
            .prepare(origin, Command::Set(Bytes::from(value.to_owned())))
            .unwrap()
            .op
            .unwrap();
        let hlc = Hlc::new(1_000 + seq, 0, origin);
        state.apply(&op, hlc);
        let mut vector = storage.recover().unwrap().vector;
        vector.advance(origin, Seq(seq));
        let event = ChangeEvent {
            origin,
            seq: Seq(seq),
            hlc,
            key: key.clone(),
            op,
        };
        storage
            .commit(Commit {
                keys: vec![(key, state)],
                events: vec![event],
                vector,
                hlc,
                trim_through: VersionVector::new(),
                collected: Vec::new(),
            })
            .unwrap();
    }

    fn snapshot_of(storage: &RocksStorage, keys_max: usize) -> Vec<SnapshotPiece> {
        let mut pieces = Vec::new();
        assert!(storage
            .read_snapshot(keys_max, usize::MAX, |p| {
                pieces.push(p);
                true
            })
            .unwrap());
        pieces
    }

    #[test]
    fn a_snapshot_installs_into_another_storage_and_a_second_install_changes_nothing() {
        let (a, b) = (NodeId(1), NodeId(2));
        let source_dir = tempfile::tempdir().unwrap();
        let mut source = RocksStorage::open(source_dir.path(), Durability::Process).unwrap();
        for i in 1..=5u64 {
            write(&mut source, a, i, &format!("k{i}"), "a");
        }
        write(&mut source, b, 1, "k1", "b");
        let pieces = snapshot_of(&source, 2);
        let SnapshotPiece::Begin(begin) = &pieces[0] else {
            panic!("the head comes first")
        };
        assert_eq!(
            begin.vector,
            [(a, Seq(5)), (b, Seq(1))].into_iter().collect()
        );
        let chunks: Vec<&Vec<braid_protocol::SnapshotEntry>> = pieces[1..]
            .iter()
            .map(|p| match p {
                SnapshotPiece::Chunk(c) => c,
                SnapshotPiece::Begin(_) => panic!("one head only"),
            })
            .collect();
        assert_eq!(
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            [2, 2, 1]
        );

        // The joining side holds one write of its own (origin 3) before it installs; its
        // replica installs the snapshot, twice (harmless), on RocksDB.
        let target_dir = tempfile::tempdir().unwrap();
        let target = RocksStorage::open(target_dir.path(), Durability::Process).unwrap();
        let topology = braid_protocol::Topology::full_mesh([a, b, NodeId(3)]).unwrap();
        let mut replica = braid_protocol::Replica::open(
            braid_protocol::ReplicaConfig::new(NodeId(3)),
            topology,
            target,
            0,
        )
        .unwrap();
        replica
            .handle_commands(
                vec![(Bytes::from("own"), Command::Set(Bytes::from("c")))],
                1,
            )
            .unwrap();
        for _ in 0..2 {
            for chunk in &chunks {
                replica
                    .handle_snapshot_chunk(chunk.to_vec(), begin.hlc, 2)
                    .unwrap();
            }
            replica
                .handle_snapshot_end(&begin.vector, begin.hlc, 2)
                .unwrap();
            assert_eq!(
                replica.vector(),
                &[(a, Seq(5)), (b, Seq(1)), (NodeId(3), Seq(1))]
                    .into_iter()
                    .collect::<VersionVector>()
            );
        }
        let mut target = replica.into_storage();
        let mut values = source.values().unwrap();
        values.extend(
            target
                .values()
                .unwrap()
                .into_iter()
                .filter(|(k, _)| k == "own"),
        );
        assert_eq!(target.values().unwrap(), values);
        let recovered = target.recover().unwrap();
        assert!(recovered.hlc >= begin.hlc);
        // The snapshot's events are in the states, not the log: counted as trimmed.
        assert_eq!(
            recovered.trimmed,
            [(a, Seq(5)), (b, Seq(1))].into_iter().collect()
        );
        assert!(target.log_of(a).unwrap().is_empty());
        assert_eq!(target.log_of(NodeId(3)).unwrap().len(), 1);
    }

    #[test]
    fn a_snapshot_is_one_view_whatever_is_written_while_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = RocksStorage::open(dir.path(), Durability::Process).unwrap();
        let a = NodeId(1);
        for i in 1..=4u64 {
            write(&mut storage, a, i, &format!("k{i}"), "before");
        }
        let mut writer = storage.clone();
        let mut pieces = Vec::new();
        let mut seq = 4;
        storage
            .read_snapshot(1, usize::MAX, |p| {
                pieces.push(p);
                // Writes land between the chunks: none may show in this snapshot.
                seq += 1;
                write(&mut writer, a, seq, &format!("k{}", seq % 4 + 1), "after");
                true
            })
            .unwrap();
        let SnapshotPiece::Begin(begin) = &pieces[0] else {
            panic!("the head comes first")
        };
        assert_eq!(begin.vector.get(a), Seq(4));
        for piece in &pieces[1..] {
            let SnapshotPiece::Chunk(chunk) = piece else {
                panic!("chunks after the head")
            };
            for entry in chunk {
                let value = entry.state.value();
                assert_eq!(
                    value,
                    Some(braid_conflict::Value::String(Bytes::from("before"))),
                    "{:?}",
                    entry.key
                );
            }
        }
        assert_eq!(pieces.len(), 5);
    }
}
