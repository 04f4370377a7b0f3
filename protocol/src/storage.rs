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

use std::collections::{BTreeMap, BTreeSet};

use braid_conflict::{Hlc, KeyState};
use bytes::Bytes;

use crate::ids::{NodeId, Seq, VersionVector};
use crate::message::ChangeEvent;

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
    /// caller (every key taken is in that commit). An in-memory storage may hand over its own copy
    /// instead of cloning it: it gets the key back with the commit. Defaults to
    /// [`Storage::key_state`].
    fn take_key_state(&mut self, key: &[u8]) -> Result<Option<KeyState>, Self::Error> {
        self.key_state(key)
    }

    /// Applies `commit` atomically. The commit is handed over: an implementation that keeps its
    /// states and events in memory moves them in instead of copying them.
    fn commit(&mut self, commit: Commit) -> Result<(), Self::Error>;

    /// Deletes, atomically, every change-log event of each origin up to and including
    /// `through[origin]`, and records `through` as what [`Recovered::trimmed`] reports from now
    /// on. The replica calls it only with what every region holds (the stable frontier), and
    /// only forward.
    fn trim_log(&mut self, through: &VersionVector) -> Result<(), Self::Error>;

    /// Entries of the tombstone index at or below `stable`, oldest first, at most `keys_max`.
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
}

/// Storage in memory, for tests and the simulator. Each commit is atomic; nothing survives the
/// value being dropped (the simulator models crashes on top of it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryStorage {
    /// Key states.
    pub keys: BTreeMap<Bytes, KeyState>,
    /// The change log, by origin and sequence number.
    pub log: BTreeMap<(NodeId, Seq), ChangeEvent>,
    /// The tombstone index: keys by the HLC of their oldest tombstone.
    pub tombstones: BTreeSet<(Hlc, Bytes)>,
    /// The last committed vector and HLC.
    pub recovered: Recovered,
    /// Commits applied so far.
    pub commits: u64,
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
        Ok(self.keys.get(key).cloned())
    }

    fn take_key_state(&mut self, key: &[u8]) -> Result<Option<KeyState>, Infallible> {
        // Left in place as an empty state until the commit overwrites it: no tree rebalancing
        // on the way out and back in.
        Ok(self.keys.get_mut(key).map(std::mem::take))
    }

    fn commit(&mut self, commit: Commit) -> Result<(), Infallible> {
        for entry in &commit.collected {
            self.tombstones.remove(entry);
        }
        for (key, state) in commit.keys {
            if state.is_empty() {
                self.keys.remove(&key);
                continue;
            }
            if let Some(hlc) = state.oldest_tombstone() {
                self.tombstones.insert((hlc, key.clone()));
            }
            self.keys.insert(key, state);
        }
        for event in commit.events {
            self.log.insert((event.origin, event.seq), event);
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
            let doomed: Vec<(NodeId, Seq)> = self
                .log
                .range((origin, Seq(1))..=(origin, seq))
                .map(|(key, _)| *key)
                .collect();
            for key in doomed {
                self.log.remove(&key);
            }
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
        let mut events = Vec::new();
        let mut bytes = 0;
        for (_, event) in self
            .log
            .range((origin, after.next())..=(origin, Seq(u64::MAX)))
        {
            if events.len() >= events_max || (bytes >= bytes_max && !events.is_empty()) {
                break;
            }
            bytes += event_size_bytes(event);
            events.push(event.clone());
        }
        Ok(events)
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
