//! A minimal in-memory mesh of replicas for the conflict tests: each replica issues commands
//! against its own state and applies the others' operations in origin order, as the protocol
//! delivers them.

#![allow(dead_code)] // each test file uses a different part of this harness

use std::collections::BTreeMap;

use braid_conflict::{oracle, Command, CommandError, Hlc, HlcClock, KeyState, NodeId, Op, Value};
use bytes::Bytes;

/// One issued operation.
#[derive(Clone, Debug)]
pub struct Event {
    pub origin: NodeId,
    pub hlc: Hlc,
    pub key: Bytes,
    pub op: Op,
}

/// One replica: its clock, its keys, and how many events of each origin it has applied.
#[derive(Clone, Debug)]
pub struct Replica {
    pub node: NodeId,
    pub clock: HlcClock,
    pub keys: BTreeMap<Bytes, KeyState>,
    pub applied: BTreeMap<NodeId, usize>,
}

impl Replica {
    pub fn new(node: NodeId) -> Replica {
        Replica {
            node,
            clock: HlcClock::new(node, u64::MAX / 4),
            keys: BTreeMap::new(),
            applied: BTreeMap::new(),
        }
    }

    pub fn state(&self, key: &str) -> KeyState {
        self.keys.get(key.as_bytes()).cloned().unwrap_or_default()
    }

    pub fn value(&self, key: &str) -> Option<Value> {
        self.keys.get(key.as_bytes()).and_then(KeyState::value)
    }

    pub fn values(&self) -> BTreeMap<Bytes, Value> {
        self.keys
            .iter()
            .filter_map(|(k, s)| s.value().map(|v| (k.clone(), v)))
            .collect()
    }

    /// Runs a command at physical time `now_ms`; returns the event it issued, if any.
    pub fn command(
        &mut self,
        key: &str,
        command: Command,
        now_ms: u64,
    ) -> Result<(Option<Event>, i64), CommandError> {
        let key = Bytes::copy_from_slice(key.as_bytes());
        let prepared = self
            .keys
            .get(&key)
            .cloned()
            .unwrap_or_default()
            .prepare(self.node, command)?;
        let Some(op) = prepared.op else {
            return Ok((None, prepared.reply));
        };
        op.validate().expect("prepare produces valid ops");
        let hlc = self.clock.now(now_ms);
        self.keys.entry(key.clone()).or_default().apply(&op, hlc);
        *self.applied.entry(self.node).or_default() += 1;
        Ok((
            Some(Event {
                origin: self.node,
                hlc,
                key,
                op,
            }),
            prepared.reply,
        ))
    }

    /// Shorthand for a command that must succeed and issue an event.
    pub fn write(&mut self, key: &str, command: Command, now_ms: u64) -> Event {
        self.command(key, command, now_ms)
            .expect("command accepted")
            .0
            .expect("an event")
    }

    /// Applies an event from another origin (or a duplicate) at physical time `now_ms`.
    pub fn receive(&mut self, event: &Event, now_ms: u64) {
        self.clock
            .update_from_remote(event.hlc, now_ms)
            .expect("within skew");
        self.keys
            .entry(event.key.clone())
            .or_default()
            .apply(&event.op, event.hlc);
    }

    /// Merges another replica's whole state into this one (state-based).
    pub fn merge_from(&mut self, other: &Replica) {
        for (key, state) in &other.keys {
            self.keys.entry(key.clone()).or_default().merge(state);
        }
        for (origin, count) in &other.applied {
            let ours = self.applied.entry(*origin).or_default();
            *ours = (*ours).max(*count);
        }
    }
}

pub fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

pub fn set_value(members: &[&str]) -> Value {
    Value::Set(members.iter().map(|m| b(m)).collect())
}

pub fn hash_value(fields: &[(&str, &str)]) -> Value {
    Value::Hash(fields.iter().map(|(f, v)| (b(f), b(v))).collect())
}

/// The oracle's view of a list of events.
pub fn oracle_of(events: &[Event]) -> BTreeMap<Bytes, Value> {
    oracle::converged(events.iter().map(|e| (&e.key, e.hlc, &e.op)))
}
