//! How the replica core sees storage: a synchronous trait, implemented on RocksDB by the node and
//! in memory here (for tests and the simulator).
//!
//! Every change the core makes is one [`Commit`], applied atomically: the new states of the keys
//! it touched, the events it appended to the change log, and the version vector and HLC
//! high-water mark after it. A crash leaves either all of a commit or none of it, which is what
//! makes "apply an event and advance the vector" exactly-once.
//!
//! **Tombstone index.** A storage keeps, beside the key states, an index of the keys that hold
//! tombstones, by the HLC of each key's oldest one ([`KeyState::oldest_tombstone`]): every key
//! state a commit writes that holds a tombstone is indexed, and garbage collection reads the
//! index ([`Storage::tombstones_through`]) instead of scanning every key. An entry may outlive
//! its tombstone (a later write replaced it): garbage collection finds nothing to drop there and
//! removes the entry. A commit that writes an empty key state deletes the key.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use braid_conflict::{Hlc, KeyState};
use bytes::Bytes;

use crate::ids::{NodeId, Seq, VersionVector};
use crate::message::ChangeEvent;
use crate::short_bytes::short_bytes_eq;

/// One atomic change of a replica's durable state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commit {
    /// Keys and their new states.
    pub keys: Vec<(Bytes, KeyState)>,
    /// Events appended to the change log (own and relayed), in origin order per origin.
    pub events: Vec<ChangeEvent>,
    /// The version vector after the commit.
    pub vector: VersionVector,
    /// The HLC high-water mark after the commit.
    pub hlc: Hlc,
    /// Change-log events deleted in the same commit, through these sequence numbers per
    /// origin, recorded as [`Recovered::trimmed`] (empty: none). A data snapshot's install sets
    /// it: the events it brings are in the key states, not the log.
    pub trim_through: VersionVector,
    /// Tombstone-index entries garbage collection has visited, removed in the same commit
    /// (before the index entries of `keys` are added).
    pub collected: Vec<(Hlc, Bytes)>,
}

/// What a replica finds in storage when it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The version vector of the last commit.
    pub vector: VersionVector,
    /// The HLC high-water mark of the last commit.
    pub hlc: Hlc,
    /// Per origin, the highest sequence number deleted from the change log (see
    /// [`Storage::trim_log`]); absent means nothing was deleted.
    pub trimmed: VersionVector,
}

/// Durable state of one replica. Implementations apply each [`Commit`] atomically, and return
/// from [`Storage::commit`] only once it is as durable as their durability mode promises.
///
/// An error from any method is fatal to the replica: it cannot know what is durable any more.
pub trait Storage {
    /// The implementation's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Reads the vector and HLC high-water mark of the last commit.
    fn recover(&mut self) -> Result<Recovered, Self::Error>;

    /// The stored state of `key`, if any.
    fn key_state(&mut self, key: &[u8]) -> Result<Option<KeyState>, Self::Error>;

    /// The state of `key`, read for a change that the replica commits before it returns to its
    /// caller: every key taken is in that commit, or given back with [`Storage::put_back`]. An
    /// in-memory storage may hand over its own copy instead of cloning it; a storage that does
    /// so and can fail must expect a replica to be given up after an error (every error here
    /// is fatal to it), taken states and all. Defaults to [`Storage::key_state`].
    fn take_key_state(&mut self, key: &[u8]) -> Result<Option<KeyState>, Self::Error> {
        self.key_state(key)
    }

    /// A hint that the replica is about to take `key`'s state ([`Storage::take_key_state`]).
    /// A storage that keeps its states in memory may load it now: the replica gives the hint
    /// for every key of a batch before it applies the first, so the keys' memory loads overlap
    /// instead of waiting one after another. Changes nothing; does nothing by default.
    fn prefetch_key(&self, key: &[u8]) {
        let _ = key;
    }

    /// Gives back, unchanged, a key state [`Storage::take_key_state`] handed over and the
    /// replica will not commit (a command refused it). A storage that handed over a copy has
    /// nothing to do, which is the default.
    fn put_back(&mut self, key: Bytes, state: KeyState) {
        let _ = (key, state);
    }

    /// Applies `commit` atomically. The commit is handed over: an implementation that keeps its
    /// states and events in memory moves them in instead of copying them.
    fn commit(&mut self, commit: Commit) -> Result<(), Self::Error>;

    /// Deletes, atomically, every change-log event of each origin up to and including
    /// `through[origin]`, and records `through` as what [`Recovered::trimmed`] reports from now
    /// on. The replica calls it only forward, and only within its own vector: at the stable
    /// frontier (what every region holds), and past it for the retention bounds (a data
    /// snapshot's trim comes in its commit, [`Commit::trim_through`]), so a storage must not
    /// assume every region holds what it deletes.
    fn trim_log(&mut self, through: &VersionVector) -> Result<(), Self::Error>;

    /// Entries of the tombstone index at or below `stable`, oldest first, at most `keys_max`.
    /// After an answer of `keys_max` entries (which the caller collects: its next commit
    /// deletes them), a storage may begin the next answer after them instead of from the
    /// oldest; after an answer of fewer, it begins from the oldest again. So an entry is found
    /// at the latest once a backlog has been collected.
    fn tombstones_through(
        &mut self,
        stable: Hlc,
        keys_max: usize,
    ) -> Result<Vec<(Hlc, Bytes)>, Self::Error>;

    /// Events of `origin` with sequence numbers above `after`, in order: at most `events_max`
    /// of them, and no more than `bytes_max` bytes of keys and values (at least one event is
    /// returned if any exists).
    fn log_after(
        &mut self,
        origin: NodeId,
        after: Seq,
        events_max: usize,
        bytes_max: usize,
    ) -> Result<Vec<ChangeEvent>, Self::Error>;

    /// The events [`Storage::log_after`] returns, each lent to `each` in order instead: the
    /// replica encodes them into a batch as they come, and a storage that holds its events in
    /// memory need not copy them. Returns their bytes of keys and values as
    /// [`event_size_bytes`] counts them (the count the limit was checked with). Defaults to
    /// lending what `log_after` returns.
    fn log_after_each(
        &mut self,
        origin: NodeId,
        after: Seq,
        events_max: usize,
        bytes_max: usize,
        each: &mut dyn FnMut(&ChangeEvent),
    ) -> Result<usize, Self::Error> {
        let mut bytes = 0;
        for event in &self.log_after(origin, after, events_max, bytes_max)? {
            bytes += event_size_bytes(event);
            each(event);
        }
        Ok(bytes)
    }
}

/// [`MemoryStorage`]'s key states. A hash map, which the workspace otherwise forbids because its
/// iteration order could leak into behaviour: here the hasher has no seed (a run is the same
/// every time), and the map is only iterated in key order, through
/// [`MemoryStorage::keys_in_order`], or to count ([`MemoryStorage::visible_keys`]). hashbrown's
/// rather than the standard library's (the same table), for [`Lookup`].
#[allow(clippy::disallowed_types)]
type KeyMap = hashbrown::HashMap<StoredKey, KeyState, rustc_hash::FxBuildHasher>;

/// A key to look up in a [`KeyMap`]: hashed as the stored key is (as a byte slice), and compared
/// with [`short_bytes_eq`] instead of `memcmp`. Every event applied looks its key up twice.
#[derive(Debug, Hash)]
struct Lookup<'a>(&'a [u8]);

impl hashbrown::Equivalent<StoredKey> for Lookup<'_> {
    fn equivalent(&self, key: &StoredKey) -> bool {
        short_bytes_eq(self.0, key)
    }
}

/// Key bytes [`MemoryStorage`] keeps inside its map's slot; a longer key is kept in its own
/// allocation.
const KEY_INLINE_BYTES: usize = 24;

/// A key as [`MemoryStorage`] keeps it: a copy, inline when short. A lookup compares the key
/// in the slot it has already loaded, where a shared buffer would be one more memory read
/// (often a cache miss: a key received from a peer is a slice of the frame it came in), and a
/// stored key does not keep that frame alive.
type StoredKey = smallvec::SmallVec<[u8; KEY_INLINE_BYTES]>;

/// Events [`MemoryStorage::log_after`] makes room for before it reads: most reads are small.
const LOG_READ_CAPACITY: usize = 16;

/// Storage in memory, for tests and the simulator. Each commit is atomic; nothing survives the
/// value being dropped (the simulator models crashes on top of it).
///
/// Laid out for the apply path, which the simulator runs hundreds of thousands of times a
/// second: key states in a hash map (one lookup per read and per write, where an ordered map
/// compares keys a dozen times), and the change log as one queue per origin (appended at the
/// back, deleted from the front).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryStorage {
    keys: KeyMap,
    log: ChangeLog,
    /// The tombstone index: keys by the HLC of their oldest tombstone.
    tombstones: BTreeSet<(Hlc, Bytes)>,
    /// The last committed vector and HLC.
    pub recovered: Recovered,
    /// Commits applied so far.
    pub commits: u64,
}

impl MemoryStorage {
    /// The stored state of `key`, without copying it.
    pub fn key(&self, key: &[u8]) -> Option<&KeyState> {
        self.keys.get(&Lookup(key))
    }

    /// Every key and its state, in key order.
    pub fn keys_in_order(&self) -> Vec<(&[u8], &KeyState)> {
        let mut keys: Vec<(&[u8], &KeyState)> = self
            .keys
            .iter()
            .map(|(key, state)| (&key[..], state))
            .collect();
        keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
        keys
    }

    /// Whether `other` holds exactly the same keys in exactly the same states. Equal states
    /// encode to the same bytes, so this is what comparing digests of both would say, without
    /// encoding every state first.
    pub fn same_keys(&self, other: &MemoryStorage) -> bool {
        // The map's own equality: each key looked up in the other map, whatever the order.
        self.keys == other.keys
    }

    /// How many keys are stored.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// How many keys hold a value a client would read (a key may hold only tombstones).
    pub fn visible_keys(&self) -> usize {
        self.keys
            .values()
            .filter(|state| state.visible_type().is_some())
            .count()
    }

    /// The change log.
    pub fn log(&self) -> &ChangeLog {
        &self.log
    }

    /// Entries in the tombstone index.
    pub fn tombstone_entries(&self) -> usize {
        self.tombstones.len()
    }
}

/// A change log in memory: each origin's events, in sequence order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeLog {
    origins: BTreeMap<NodeId, VecDeque<ChangeEvent>>,
    len: usize,
}

impl ChangeLog {
    /// The event `seq` of `origin`, if the log holds it.
    pub fn get(&self, origin: NodeId, seq: Seq) -> Option<&ChangeEvent> {
        let events = self.origins.get(&origin)?;
        let at = Self::position(events, seq);
        events.get(at).filter(|event| event.seq == seq)
    }

    /// Every event, by origin, then sequence number.
    pub fn iter(&self) -> impl Iterator<Item = &ChangeEvent> {
        self.origins.values().flatten()
    }

    /// How many events the log holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the log holds no event.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where `seq` is or would go in `events`: the first position whose event is not below it.
    fn position(events: &VecDeque<ChangeEvent>, seq: Seq) -> usize {
        let (Some(first), Some(last)) = (events.front(), events.back()) else {
            return 0;
        };
        // The common cases without a search: an append, and a read from a run of consecutive
        // sequence numbers (an origin's sequence is dense, and its events are applied in
        // order), where the event sits as far from the front as its number is from the first.
        if last.seq < seq {
            return events.len();
        }
        let at = usize::try_from(seq.0.saturating_sub(first.seq.0)).unwrap_or(usize::MAX);
        match events.get(at) {
            Some(event) if event.seq == seq => at,
            _ => events.partition_point(|event| event.seq < seq),
        }
    }

    /// Adds `event`, replacing an event with the same origin and sequence number.
    fn insert(&mut self, event: ChangeEvent) {
        let events = self.origins.entry(event.origin).or_default();
        let at = Self::position(events, event.seq);
        match events.get_mut(at) {
            Some(present) if present.seq == event.seq => *present = event,
            None => {
                events.push_back(event);
                self.len += 1;
            }
            Some(_) => {
                events.insert(at, event);
                self.len += 1;
            }
        }
        debug_assert!(events
            .iter()
            .zip(events.iter().skip(1))
            .all(|(a, b)| a.seq < b.seq));
    }

    /// Events of `origin` above `after`, in order.
    fn after(&self, origin: NodeId, after: Seq) -> impl Iterator<Item = &ChangeEvent> {
        let events = self.origins.get(&origin);
        let from = events.map_or(0, |events| Self::position(events, after.next()));
        events
            .into_iter()
            .flat_map(move |events| events.range(from..))
    }

    /// Deletes the events of `origin` up to and including `through`.
    fn trim(&mut self, origin: NodeId, through: Seq) {
        let Some(events) = self.origins.get_mut(&origin) else {
            return;
        };
        while events.front().is_some_and(|event| event.seq <= through) {
            events.pop_front();
            self.len -= 1;
        }
    }
}

/// Memory storage never fails: this error has no values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Infallible {}

impl std::fmt::Display for Infallible {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {}
    }
}

impl std::error::Error for Infallible {}

impl Storage for MemoryStorage {
    type Error = Infallible;

    fn recover(&mut self) -> Result<Recovered, Infallible> {
        Ok(self.recovered.clone())
    }

    fn key_state(&mut self, key: &[u8]) -> Result<Option<KeyState>, Infallible> {
        Ok(self.keys.get(&Lookup(key)).cloned())
    }

    fn prefetch_key(&self, key: &[u8]) {
        if let Some(state) = self.keys.get(&Lookup(key)) {
            state.touch();
        }
    }

    fn take_key_state(&mut self, key: &[u8]) -> Result<Option<KeyState>, Infallible> {
        // Left in place as an empty state until the commit overwrites it or it is put back.
        Ok(self.keys.get_mut(&Lookup(key)).map(std::mem::take))
    }

    fn put_back(&mut self, key: Bytes, state: KeyState) {
        // A key that was absent has no slot, and its state is empty: nothing to restore.
        if let Some(slot) = self.keys.get_mut(&Lookup(&key)) {
            *slot = state;
        }
    }

    fn commit(&mut self, commit: Commit) -> Result<(), Infallible> {
        for entry in &commit.collected {
            self.tombstones.remove(entry);
        }
        for (key, state) in commit.keys {
            if state.is_empty() {
                self.keys.remove(&Lookup(&key));
                continue;
            }
            let tombstone = state.oldest_tombstone();
            match self.keys.get_mut(&Lookup(&key)) {
                // A key taken for this commit: its slot is still there, and its key too.
                Some(slot) => *slot = state,
                None => {
                    self.keys.insert(StoredKey::from_slice(&key), state);
                }
            }
            if let Some(hlc) = tombstone {
                self.tombstones.insert((hlc, key));
            }
        }
        for event in commit.events {
            self.log.insert(event);
        }
        self.recovered.vector = commit.vector;
        self.recovered.hlc = commit.hlc;
        self.commits += 1;
        if !commit.trim_through.is_empty() {
            self.trim_log(&commit.trim_through)?;
        }
        Ok(())
    }

    fn trim_log(&mut self, through: &VersionVector) -> Result<(), Infallible> {
        for (origin, seq) in through.iter() {
            self.log.trim(origin, seq);
        }
        self.recovered.trimmed.merge(through);
        Ok(())
    }

    fn tombstones_through(
        &mut self,
        stable: Hlc,
        keys_max: usize,
    ) -> Result<Vec<(Hlc, Bytes)>, Infallible> {
        Ok(self
            .tombstones
            .iter()
            .take_while(|(hlc, _)| *hlc <= stable)
            .take(keys_max)
            .cloned()
            .collect())
    }

    fn log_after(
        &mut self,
        origin: NodeId,
        after: Seq,
        events_max: usize,
        bytes_max: usize,
    ) -> Result<Vec<ChangeEvent>, Infallible> {
        let mut events = Vec::with_capacity(events_max.min(LOG_READ_CAPACITY));
        self.log_after_each(origin, after, events_max, bytes_max, &mut |event| {
            events.push(event.clone())
        })?;
        Ok(events)
    }

    fn log_after_each(
        &mut self,
        origin: NodeId,
        after: Seq,
        events_max: usize,
        bytes_max: usize,
        each: &mut dyn FnMut(&ChangeEvent),
    ) -> Result<usize, Infallible> {
        let (mut events, mut bytes) = (0, 0);
        for event in self.log.after(origin, after) {
            if events >= events_max || (bytes >= bytes_max && events > 0) {
                break;
            }
            bytes += event_size_bytes(event);
            events += 1;
            each(event);
        }
        Ok(bytes)
    }
}

/// A cheap estimate of an event's size on the wire: its key and the values it carries.
pub fn event_size_bytes(event: &ChangeEvent) -> usize {
    use braid_conflict::{Op, Write};
    let op = match &event.op {
        Op::Delete(_) => 64,
        Op::Write { write, .. } => match write {
            Write::Set(value) => value.len(),
            Write::Counter { .. } => 16,
            Write::SetAdd { members, .. } | Write::SetRemove { members, .. } => {
                members.iter().map(|m| m.len() + 1).sum()
            }
            Write::HashSet(fields) => fields.iter().map(|(f, v)| f.len() + v.len() + 2).sum(),
            Write::HashDelete(fields) => fields.iter().map(|f| f.len() + 1).sum(),
        },
    };
    event.key.len() + op + 32
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_conflict::{Op, Write};

    fn event(origin: u64, seq: u64, value: &'static str) -> ChangeEvent {
        ChangeEvent {
            origin: NodeId(origin),
            seq: Seq(seq),
            hlc: Hlc::new(seq, 0, NodeId(origin)),
            key: Bytes::from_static(b"k"),
            op: Op::Write {
                replaces: None,
                write: Write::Set(Bytes::from_static(value.as_bytes())),
            },
        }
    }

    fn seqs(log: &ChangeLog) -> Vec<(u64, u64)> {
        log.iter().map(|e| (e.origin.0, e.seq.0)).collect()
    }

    #[test]
    fn the_change_log_keeps_each_origin_in_order_and_replaces_a_repeated_event() {
        let mut log = ChangeLog::default();
        for (origin, seq) in [(2, 1), (1, 2), (1, 4), (1, 3), (2, 2), (1, 1)] {
            log.insert(event(origin, seq, "a"));
        }
        assert_eq!(seqs(&log), [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2)]);
        log.insert(event(1, 3, "b"));
        assert_eq!(log.len(), 6, "the same origin and seq is one event");
        let replaced = log.get(NodeId(1), Seq(3)).unwrap();
        assert_eq!(replaced.op, event(1, 3, "b").op);
        assert!(log.get(NodeId(1), Seq(5)).is_none());
        assert!(log.get(NodeId(3), Seq(1)).is_none());
        let after: Vec<u64> = log.after(NodeId(1), Seq(2)).map(|e| e.seq.0).collect();
        assert_eq!(after, [3, 4]);
        assert_eq!(log.after(NodeId(1), Seq(4)).count(), 0);
        assert_eq!(log.after(NodeId(3), Seq(0)).count(), 0);
    }

    #[test]
    fn positions_are_found_in_a_dense_run_and_around_gaps() {
        // Dense after a trim (the direct guess hits), and with gaps, where a guess lands on
        // another event and the search must still find the place.
        for present in [vec![4, 5, 6, 7, 8], vec![2, 3, 7, 8, 11, 12, 13]] {
            let mut log = ChangeLog::default();
            for &seq in &present {
                log.insert(event(1, seq, "a"));
            }
            let events = &log.origins[&NodeId(1)];
            for seq in 0..16 {
                let expected = present.iter().filter(|&&p| p < seq).count();
                assert_eq!(ChangeLog::position(events, Seq(seq)), expected, "seq {seq}");
                assert_eq!(
                    log.get(NodeId(1), Seq(seq)).map(|e| e.seq.0),
                    present.contains(&seq).then_some(seq)
                );
                let after: Vec<u64> = log.after(NodeId(1), Seq(seq)).map(|e| e.seq.0).collect();
                let expected: Vec<u64> = present.iter().copied().filter(|&p| p > seq).collect();
                assert_eq!(after, expected, "after {seq}");
            }
        }
    }

    #[test]
    fn trimming_deletes_an_origins_oldest_events_only() {
        let mut log = ChangeLog::default();
        for seq in 1..=5 {
            log.insert(event(1, seq, "a"));
            log.insert(event(2, seq, "a"));
        }
        log.trim(NodeId(1), Seq(3));
        log.trim(NodeId(3), Seq(3));
        assert_eq!(log.len(), 7);
        assert_eq!(seqs(&log)[..2], [(1, 4), (1, 5)]);
        log.trim(NodeId(2), Seq(9));
        assert_eq!(seqs(&log), [(1, 4), (1, 5)]);
        assert!(!log.is_empty());
    }

    #[test]
    fn memory_storage_keeps_short_and_long_keys_alike() {
        let long = vec![b'x'; KEY_INLINE_BYTES * 2];
        let keys: [&[u8]; 4] = [b"", b"k", &long[..KEY_INLINE_BYTES], &long];
        let mut storage = MemoryStorage::default();
        let mut commit = Commit::default();
        for (i, key) in keys.iter().enumerate() {
            let mut state = KeyState::default();
            let hlc = Hlc::new(i as u64 + 1, 0, NodeId(1));
            state.apply(&event(1, 1, "v").op, hlc);
            commit.keys.push((Bytes::copy_from_slice(key), state));
        }
        storage.commit(commit).unwrap();
        assert_eq!(storage.key_count(), keys.len());
        for key in keys {
            let state = storage.take_key_state(key).unwrap().expect("stored");
            assert!(!state.is_empty());
            assert!(storage.key(key).is_some_and(KeyState::is_empty), "taken");
            storage.put_back(Bytes::copy_from_slice(key), state);
            assert!(storage.key(key).is_some_and(|s| !s.is_empty()), "put back");
        }
        let listed: Vec<&[u8]> = storage
            .keys_in_order()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(listed, keys);
        assert!(storage.key(&long[..KEY_INLINE_BYTES + 1]).is_none());
    }

    #[test]
    fn same_keys_means_every_key_in_the_same_state_tombstones_included() {
        let commit = |ops: &[(&'static str, u64)]| {
            let mut storage = MemoryStorage::default();
            let mut commit = Commit::default();
            for &(key, wall) in ops {
                let mut state = KeyState::default();
                state.apply(&event(1, 1, "v").op, Hlc::new(wall, 0, NodeId(1)));
                commit
                    .keys
                    .push((Bytes::from_static(key.as_bytes()), state));
            }
            storage.commit(commit).unwrap();
            storage
        };
        let a = commit(&[("a", 1), ("b", 2)]);
        assert!(a.same_keys(&commit(&[("b", 2), ("a", 1)])), "in any order");
        assert!(!a.same_keys(&commit(&[("a", 1)])), "a key missing");
        assert!(
            !a.same_keys(&commit(&[("a", 1), ("b", 2), ("c", 3)])),
            "a key more"
        );
        assert!(
            !a.same_keys(&commit(&[("a", 1), ("b", 3)])),
            "the same value, another HLC"
        );
        let mut deleted = commit(&[("a", 1), ("b", 2)]);
        let mut gone = deleted.take_key_state(b"b").unwrap().unwrap();
        let delete = braid_conflict::Observed {
            string: true,
            ..braid_conflict::Observed::default()
        };
        gone.apply(&Op::Delete(Box::new(delete)), Hlc::new(3, 0, NodeId(1)));
        let commit = Commit {
            keys: vec![(Bytes::from_static(b"b"), gone)],
            ..Commit::default()
        };
        deleted.commit(commit).unwrap();
        assert!(!a.same_keys(&deleted), "a tombstone");
    }

    #[test]
    fn a_key_holding_only_a_tombstone_is_stored_but_not_visible() {
        let mut storage = MemoryStorage::default();
        let mut written = KeyState::default();
        written.apply(&event(1, 1, "v").op, Hlc::new(1, 0, NodeId(1)));
        let mut deleted = KeyState::default();
        let delete = braid_conflict::Observed {
            string: true,
            ..braid_conflict::Observed::default()
        };
        deleted.apply(&Op::Delete(Box::new(delete)), Hlc::new(2, 0, NodeId(1)));
        assert!(!deleted.is_empty() && deleted.value().is_none());
        let commit = Commit {
            keys: vec![(Bytes::from("w"), written), (Bytes::from("d"), deleted)],
            ..Commit::default()
        };
        storage.commit(commit).unwrap();
        assert_eq!(storage.key_count(), 2);
        assert_eq!(storage.visible_keys(), 1);
    }

    #[test]
    fn memory_storage_lists_keys_in_order_and_deletes_an_emptied_key() {
        let mut storage = MemoryStorage::default();
        let mut commit = Commit::default();
        for key in ["b", "c", "a"] {
            let mut state = KeyState::default();
            state.apply(&event(1, 1, "v").op, Hlc::new(1, 0, NodeId(1)));
            commit.keys.push((Bytes::from(key), state));
        }
        storage.commit(commit).unwrap();
        let keys: Vec<&[u8]> = storage
            .keys_in_order()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, [b"a", b"b", b"c"]);
        let taken = storage.take_key_state(b"b").unwrap();
        assert!(taken.is_some_and(|s| !s.is_empty()));
        let commit = Commit {
            keys: vec![(Bytes::from("b"), KeyState::default())],
            ..Commit::default()
        };
        storage.commit(commit).unwrap();
        assert_eq!(storage.key_count(), 2);
        assert!(storage.key(b"b").is_none());
    }
}
