//! Simulated storage: the in-memory storage of the core, with a watch on exactly-once apply and
//! a switch to inject bugs that the checkers must catch.

use std::collections::BTreeMap;

use braid_conflict::{Hlc, KeyState, Value};
use braid_protocol::storage::{Commit, Infallible, Recovered, Storage};
use braid_protocol::{ChangeEvent, ChangeLog, MemoryStorage, NodeId, Seq, VersionVector};
use bytes::Bytes;

/// Bugs the simulator can inject on purpose, to prove that its checkers bite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedBug {
    /// Every 50th commit is made twice, as an apply that skipped the vector check would.
    DoubleApply,
    /// Every 50th commit drops its key updates while still advancing the vector, as a storage
    /// layer that loses a write would.
    LoseWrite,
    /// The control plane's network answers every Raft vote request with a granted vote, without
    /// asking the voter.
    GrantEveryVote,
    /// The first region's control state machine skips every 3rd command it is given while
    /// reporting it applied, as an apply that loses a committed command would.
    DropControlApply,
    /// A region restarted after a power failure is not told that it may have lost writes, as
    /// a node that did not check the machine's boot would not be.
    IgnorePossibleLoss,
    /// Every region drops tombstones at its own clock's high-water mark instead of the
    /// committed stable HLC, as a garbage collector that did not wait for stability would.
    CollectEarly,
}

impl InjectedBug {
    /// The name `--inject-bug` takes.
    pub fn name(self) -> &'static str {
        match self {
            InjectedBug::DoubleApply => "double-apply",
            InjectedBug::LoseWrite => "lose-write",
            InjectedBug::GrantEveryVote => "grant-every-vote",
            InjectedBug::DropControlApply => "drop-control-apply",
            InjectedBug::CollectEarly => "collect-early",
            InjectedBug::IgnorePossibleLoss => "ignore-possible-loss",
        }
    }
}

impl std::str::FromStr for InjectedBug {
    type Err = String;

    fn from_str(s: &str) -> Result<InjectedBug, String> {
        match s {
            "double-apply" => Ok(InjectedBug::DoubleApply),
            "lose-write" => Ok(InjectedBug::LoseWrite),
            "grant-every-vote" => Ok(InjectedBug::GrantEveryVote),
            "drop-control-apply" => Ok(InjectedBug::DropControlApply),
            "collect-early" => Ok(InjectedBug::CollectEarly),
            "ignore-possible-loss" => Ok(InjectedBug::IgnorePossibleLoss),
            other => Err(format!(
                "unknown bug {other:?}: double-apply, lose-write, grant-every-vote, \
                 drop-control-apply, collect-early or ignore-possible-loss"
            )),
        }
    }
}

/// What a storage in `process` durability last synced: what a power failure leaves.
#[derive(Debug, Clone, Default)]
struct Synced {
    inner: MemoryStorage,
    seen: std::collections::BTreeMap<NodeId, Vec<u64>>,
    held: std::collections::BTreeSet<(NodeId, Seq, Hlc)>,
}

/// One region's storage in the simulator. In `machine` durability (the default) every commit
/// is durable at once, so a simulated crash or power failure loses nothing acknowledged. In
/// `process` durability ([`SimStorage::with_process_durability`]) a crash loses nothing either
/// (the operating system has the bytes), but a power failure ([`SimStorage::power_fail`]) goes
/// back to the last [`SimStorage::sync`].
#[derive(Debug, Clone, Default)]
pub struct SimStorage {
    inner: MemoryStorage,
    /// `process` durability: what the last sync made durable.
    synced: Option<Box<Synced>>,
    /// `process` durability: every event this storage holds, by identity (origin, seq and
    /// HLC), to tell at the end which acknowledged writes a power failure took for good.
    held: std::collections::BTreeSet<(NodeId, Seq, Hlc)>,
    /// Events committed twice for the same (origin, seq): exactly-once violations.
    pub duplicate_applies: Vec<(NodeId, Seq)>,
    /// Events committed, in order, for lag measurement by the simulator: (origin, seq).
    pub recent: Vec<(NodeId, Seq)>,
    /// Per origin, a bit per sequence number ever committed here (the change log forgets what
    /// garbage collection deletes; this does not).
    seen: std::collections::BTreeMap<NodeId, Vec<u64>>,
    bug: Option<InjectedBug>,
    commits: u64,
}

impl SimStorage {
    /// Empty storage, with an optional injected bug.
    pub fn new(bug: Option<InjectedBug>) -> SimStorage {
        SimStorage {
            bug,
            ..SimStorage::default()
        }
    }

    /// The same, in `process` durability: only [`SimStorage::sync`] makes commits survive a
    /// power failure.
    pub fn with_process_durability(mut self) -> SimStorage {
        self.synced = Some(Box::default());
        self
    }

    /// Whether this storage is in `process` durability.
    pub fn is_process_durability(&self) -> bool {
        self.synced.is_some()
    }

    /// Makes every commit so far survive a power failure (`process` durability; nothing to do
    /// in `machine`).
    pub fn sync(&mut self) {
        if let Some(synced) = self.synced.as_mut() {
            synced.inner = self.inner.clone();
            synced.seen = self.seen.clone();
            synced.held = self.held.clone();
        }
    }

    /// A power failure: everything committed since the last sync is gone (`process`
    /// durability; nothing is lost in `machine`). Returns whether anything was lost.
    pub fn power_fail(&mut self) -> bool {
        let Some(synced) = self.synced.as_ref() else {
            return false;
        };
        let lost = synced.inner.recovered != self.inner.recovered;
        self.inner = synced.inner.clone();
        self.seen = synced.seen.clone();
        self.held = synced.held.clone();
        lost
    }

    /// Every event this storage holds by identity (`process` durability only; empty in
    /// `machine`).
    pub fn held(&self) -> &std::collections::BTreeSet<(NodeId, Seq, Hlc)> {
        &self.held
    }

    /// Every key and its state, in key order.
    pub fn keys(&self) -> Vec<(&[u8], &KeyState)> {
        self.inner.keys_in_order()
    }

    /// Whether this storage holds exactly `expected`: each expected key looked up, and no other
    /// key with a value a client would read. The keys need no sorting.
    pub fn holds(&self, expected: &BTreeMap<Bytes, Value>) -> bool {
        self.inner.visible_keys() == expected.len()
            && expected.iter().all(|(key, value)| {
                self.inner
                    .key(key)
                    .is_some_and(|state| state.reads_as(value))
            })
    }

    /// Whether `other` holds exactly the same keys in exactly the same states.
    pub fn same_keys(&self, other: &SimStorage) -> bool {
        self.inner.same_keys(&other.inner)
    }

    /// The change log.
    pub fn log(&self) -> &ChangeLog {
        self.inner.log()
    }
}

impl SimStorage {
    /// Notes every event of a commit, and any that was committed before. A data snapshot's
    /// commit (the one that moves the vector past what the log holds: `trim_through`) brings
    /// its events inside the key states: they count as applied, so that one applied again
    /// after is seen.
    fn watch(&mut self, commit: &Commit) {
        if !commit.trim_through.is_empty() {
            self.mark_through(&commit.trim_through);
        }
        // A commit's events come in runs of one origin: its bits are found once a run.
        for run in commit.events.chunk_by(|a, b| a.origin == b.origin) {
            let bits = self.seen.entry(run[0].origin).or_default();
            for event in run {
                let (word, bit) = ((event.seq.0 / 64) as usize, event.seq.0 % 64);
                if bits.len() <= word {
                    bits.resize(word + 1, 0);
                }
                if bits[word] & (1 << bit) != 0 {
                    self.duplicate_applies.push((event.origin, event.seq));
                }
                bits[word] |= 1 << bit;
                self.recent.push((event.origin, event.seq));
                if self.synced.is_some() {
                    self.held.insert((event.origin, event.seq, event.hlc));
                }
            }
        }
    }
}

impl SimStorage {
    /// Marks every sequence number up to `through[origin]` as committed, a word at a time.
    #[cold]
    fn mark_through(&mut self, through: &VersionVector) {
        for (origin, seq) in through.iter() {
            let bits = self.seen.entry(origin).or_default();
            let words = (seq.0 / 64) as usize + 1;
            if bits.len() < words {
                bits.resize(words, 0);
            }
            bits[..words - 1].fill(u64::MAX);
            bits[words - 1] |= u64::MAX >> (63 - seq.0 % 64);
        }
    }
}

impl Storage for SimStorage {
    type Error = Infallible;

    fn recover(&mut self) -> Result<Recovered, Infallible> {
        self.inner.recover()
    }

    fn key_state(&mut self, key: &[u8]) -> Result<Option<KeyState>, Infallible> {
        self.inner.key_state(key)
    }

    fn prefetch_key(&self, key: &[u8]) {
        self.inner.prefetch_key(key);
    }

    fn take_key_state(&mut self, key: &[u8]) -> Result<Option<KeyState>, Infallible> {
        match self.bug {
            // A commit that loses its key updates must leave the stored states as they were,
            // not the empty places of states handed over.
            Some(InjectedBug::LoseWrite) => self.inner.key_state(key),
            _ => self.inner.take_key_state(key),
        }
    }

    fn put_back(&mut self, key: bytes::Bytes, state: KeyState) {
        self.inner.put_back(key, state);
    }

    fn commit(&mut self, mut commit: Commit) -> Result<(), Infallible> {
        self.commits += 1;
        let faulty = self.commits.is_multiple_of(50);
        match self.bug {
            Some(InjectedBug::LoseWrite) if faulty && !commit.keys.is_empty() => {
                self.watch(&commit);
                commit.keys.clear();
                self.inner.commit(commit)
            }
            Some(InjectedBug::DoubleApply) if faulty && !commit.events.is_empty() => {
                self.watch(&commit);
                self.inner.commit(commit.clone())?;
                self.watch(&commit);
                self.inner.commit(commit)
            }
            _ => {
                self.watch(&commit);
                self.inner.commit(commit)
            }
        }
    }

    fn trim_log(&mut self, through: &VersionVector) -> Result<(), Infallible> {
        self.inner.trim_log(through)
    }

    fn tombstones_through(
        &mut self,
        stable: braid_conflict::Hlc,
        keys_max: usize,
    ) -> Result<Vec<(braid_conflict::Hlc, bytes::Bytes)>, Infallible> {
        self.inner.tombstones_through(stable, keys_max)
    }

    fn log_after(
        &mut self,
        origin: NodeId,
        after: Seq,
        events_max: usize,
        bytes_max: usize,
    ) -> Result<Vec<ChangeEvent>, Infallible> {
        self.inner.log_after(origin, after, events_max, bytes_max)
    }

    fn log_after_each(
        &mut self,
        origin: NodeId,
        after: Seq,
        events_max: usize,
        bytes_max: usize,
        each: &mut dyn FnMut(&ChangeEvent),
    ) -> Result<usize, Infallible> {
        self.inner
            .log_after_each(origin, after, events_max, bytes_max, each)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_conflict::{Observed, Op, Write};

    /// A storage holding `("a", "1")`, `("b", "2")` and a key `"gone"` holding only a tombstone.
    fn storage() -> SimStorage {
        let hlc = |n| Hlc::new(n, 0, NodeId(1));
        let set = |v: &'static str| Op::Write {
            replaces: None,
            write: Write::Set(Bytes::from_static(v.as_bytes())),
        };
        let mut keys = Vec::new();
        for (key, op) in [("a", set("1")), ("b", set("2"))] {
            let mut state = KeyState::default();
            state.apply(&op, hlc(1));
            keys.push((Bytes::from_static(key.as_bytes()), state));
        }
        let mut gone = KeyState::default();
        let delete = Observed {
            string: true,
            ..Observed::default()
        };
        gone.apply(&Op::Delete(Box::new(delete)), hlc(2));
        keys.push((Bytes::from_static(b"gone"), gone));
        let mut storage = SimStorage::new(None);
        let commit = Commit {
            keys,
            ..Commit::default()
        };
        storage.commit(commit).unwrap();
        storage
    }

    fn values(pairs: &[(&'static str, &'static str)]) -> BTreeMap<Bytes, Value> {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    Bytes::from_static(k.as_bytes()),
                    Value::String(Bytes::from_static(v.as_bytes())),
                )
            })
            .collect()
    }

    #[test]
    fn an_event_applied_again_after_a_snapshot_brought_it_is_a_duplicate() {
        let origin = NodeId(2);
        let mut storage = SimStorage::new(None);
        // A snapshot through 5 of `origin`: no events, a vector that moved.
        let snapshot = Commit {
            vector: [(origin, Seq(5))].into_iter().collect(),
            trim_through: [(origin, Seq(5))].into_iter().collect(),
            ..Commit::default()
        };
        storage.commit(snapshot).unwrap();
        let event = |seq: u64| ChangeEvent {
            origin,
            seq: Seq(seq),
            hlc: Hlc::new(seq, 0, origin),
            key: Bytes::from_static(b"k"),
            op: Op::Write {
                replaces: None,
                write: Write::Set(Bytes::from_static(b"v")),
            },
        };
        let after = Commit {
            events: vec![event(6)],
            vector: [(origin, Seq(6))].into_iter().collect(),
            ..Commit::default()
        };
        storage.commit(after).unwrap();
        assert!(storage.duplicate_applies.is_empty());
        let again = Commit {
            events: vec![event(3)],
            vector: [(origin, Seq(6))].into_iter().collect(),
            ..Commit::default()
        };
        storage.commit(again).unwrap();
        assert_eq!(storage.duplicate_applies, [(origin, Seq(3))]);
    }

    #[test]
    fn holds_exactly_the_expected_values_and_nothing_more() {
        let storage = storage();
        assert!(storage.holds(&values(&[("a", "1"), ("b", "2")])));
        assert!(!storage.holds(&values(&[("a", "1")])), "an extra key");
        assert!(
            !storage.holds(&values(&[("a", "1"), ("b", "3")])),
            "a wrong value"
        );
        assert!(
            !storage.holds(&values(&[("a", "1"), ("c", "2")])),
            "a missing key"
        );
        assert!(
            !storage.holds(&values(&[("a", "1"), ("b", "2"), ("gone", "x")])),
            "a deleted key"
        );
    }
}
