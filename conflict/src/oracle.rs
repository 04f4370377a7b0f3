//! The oracle: the converged value of every key, computed straight from the set of operations
//! ever issued, by the documented semantics (docs/conflicts.md), without replaying them through
//! [`KeyState`](crate::KeyState).
//!
//! It shares no merge code with the replicas on purpose: a replica that applies, merges or
//! garbage-collects wrongly disagrees with it, even if every replica is wrong the same way.
//!
//! ```text
//!   (key, hlc, op) for every acknowledged write ──► per key, per type:
//!       string  the write or tombstone with the greatest HLC
//!       counter per origin: greatest total minus greatest observed-and-removed total
//!       set     a member is in iff one of its add dots is covered by no remove
//!       hash    per field as string, minus fields at or below the greatest whole-hash tombstone
//!   ──► the visible type: the present type whose latest write has the greatest HLC
//! ```

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use crdts::VClock;

use crate::value::{Direction, Observed, Op, Value, ValueType, Write};
use crate::{CounterTotals, Hlc, NodeId};

/// Everything the oracle gathers about one key.
#[derive(Debug, Default)]
struct KeyFacts {
    /// String writes and tombstones: (hlc, value or None).
    string: Option<(Hlc, Option<Bytes>)>,
    counter_up: BTreeMap<NodeId, u64>,
    counter_down: BTreeMap<NodeId, u64>,
    counter_removed: Vec<CounterTotals>,
    counter_latest: Option<Hlc>,
    set_adds: Vec<(NodeId, u64, Bytes)>,
    set_removes: Vec<(VClock<NodeId>, Bytes)>,
    set_removes_all: Vec<VClock<NodeId>>,
    set_latest: Option<Hlc>,
    hash_fields: BTreeMap<Bytes, (Hlc, Option<Bytes>)>,
    hash_cleared: Option<Hlc>,
    hash_latest: Option<Hlc>,
}

fn lww(slot: &mut Option<(Hlc, Option<Bytes>)>, hlc: Hlc, value: Option<Bytes>) {
    if slot.as_ref().is_none_or(|(at, _)| hlc > *at) {
        *slot = Some((hlc, value));
    }
}

fn latest(slot: &mut Option<Hlc>, hlc: Hlc) {
    *slot = Some(slot.map_or(hlc, |at| at.max(hlc)));
}

impl KeyFacts {
    fn removal(&mut self, observed: &Observed, hlc: Hlc) {
        if observed.string {
            lww(&mut self.string, hlc, None);
        }
        if let Some(counter) = &observed.counter {
            self.counter_removed.push(counter.clone());
        }
        if let Some(clock) = &observed.set {
            self.set_removes_all.push(clock.clone());
        }
        if observed.hash {
            latest(&mut self.hash_cleared, hlc);
        }
    }

    fn write(&mut self, write: &Write, hlc: Hlc) {
        let origin = hlc.node;
        match write {
            Write::Set(value) => lww(&mut self.string, hlc, Some(value.clone())),
            Write::Counter { direction, total } => {
                let totals = match direction {
                    Direction::Up => &mut self.counter_up,
                    Direction::Down => &mut self.counter_down,
                };
                let slot = totals.entry(origin).or_default();
                *slot = (*slot).max(*total);
                latest(&mut self.counter_latest, hlc);
            }
            Write::SetAdd { counter, members } => {
                for member in members {
                    self.set_adds.push((origin, *counter, member.clone()));
                }
                latest(&mut self.set_latest, hlc);
            }
            Write::SetRemove { observed, members } => {
                for member in members {
                    self.set_removes.push((observed.clone(), member.clone()));
                }
                latest(&mut self.set_latest, hlc);
            }
            Write::HashSet(fields) => {
                for (field, value) in fields {
                    let mut slot = self.hash_fields.remove(field);
                    lww(&mut slot, hlc, Some(value.clone()));
                    self.hash_fields
                        .insert(field.clone(), slot.unwrap_or((hlc, None)));
                }
                latest(&mut self.hash_latest, hlc);
            }
            Write::HashDelete(fields) => {
                for field in fields {
                    let mut slot = self.hash_fields.remove(field);
                    lww(&mut slot, hlc, None);
                    self.hash_fields
                        .insert(field.clone(), slot.unwrap_or((hlc, None)));
                }
                latest(&mut self.hash_latest, hlc);
            }
        }
    }

    /// Per origin, the greatest removed totals `(up, down)` over every observed counter.
    fn counter_value(&self) -> Option<i128> {
        let origins: BTreeSet<NodeId> = self
            .counter_up
            .keys()
            .chain(self.counter_down.keys())
            .copied()
            .collect();
        let mut present = false;
        let mut value: i128 = 0;
        for origin in origins {
            let (removed_up, removed_down) = self
                .counter_removed
                .iter()
                .map(|seen| (seen.up(origin), seen.down(origin)))
                .fold((0, 0), |(u, d), (su, sd)| (u.max(su), d.max(sd)));
            let up = self.counter_up.get(&origin).copied().unwrap_or(0);
            let down = self.counter_down.get(&origin).copied().unwrap_or(0);
            let up_live = up.saturating_sub(removed_up);
            let down_live = down.saturating_sub(removed_down);
            present |= up_live > 0 || down_live > 0;
            value += i128::from(up_live) - i128::from(down_live);
        }
        present.then_some(value)
    }

    fn set_members(&self) -> Vec<Bytes> {
        // An add is removed when some removal's clock covers its dot: when the greatest counter
        // any such clock holds for the add's origin reaches the add's counter. The greatest
        // counters are gathered once, so that a hot key's thousands of adds and removes stay
        // linear.
        let mut all: BTreeMap<NodeId, u64> = BTreeMap::new();
        for clock in &self.set_removes_all {
            for dot in clock.iter() {
                let slot = all.entry(*dot.actor).or_default();
                *slot = (*slot).max(dot.counter);
            }
        }
        let mut by_member: BTreeMap<(&Bytes, NodeId), u64> = BTreeMap::new();
        for (clock, member) in &self.set_removes {
            for dot in clock.iter() {
                let slot = by_member.entry((member, *dot.actor)).or_default();
                *slot = (*slot).max(dot.counter);
            }
        }
        let mut members: BTreeSet<Bytes> = BTreeSet::new();
        for (origin, counter, member) in &self.set_adds {
            let covered = |max: Option<&u64>| max.is_some_and(|max| *max >= *counter);
            let removed = covered(all.get(origin)) || covered(by_member.get(&(member, *origin)));
            if !removed {
                members.insert(member.clone());
            }
        }
        members.into_iter().collect()
    }

    fn hash_value(&self) -> Vec<(Bytes, Bytes)> {
        self.hash_fields
            .iter()
            .filter(|(_, (hlc, _))| self.hash_cleared.is_none_or(|cleared| *hlc > cleared))
            .filter_map(|(field, (_, value))| value.as_ref().map(|v| (field.clone(), v.clone())))
            .collect()
    }

    fn value(&self) -> Option<Value> {
        let mut candidates: Vec<(Hlc, ValueType)> = Vec::new();
        if let Some((hlc, Some(_))) = &self.string {
            candidates.push((*hlc, ValueType::String));
        }
        let counter = self.counter_value();
        if let (Some(_), Some(hlc)) = (counter, self.counter_latest) {
            candidates.push((hlc, ValueType::Counter));
        }
        let members = self.set_members();
        if let (false, Some(hlc)) = (members.is_empty(), self.set_latest) {
            candidates.push((hlc, ValueType::Set));
        }
        let fields = self.hash_value();
        if let (false, Some(hlc)) = (fields.is_empty(), self.hash_latest) {
            candidates.push((hlc, ValueType::Hash));
        }
        let (_, visible) = candidates.into_iter().max()?;
        Some(match visible {
            ValueType::String => Value::String(self.string.clone()?.1?),
            ValueType::Counter => Value::Counter(counter?),
            ValueType::Set => Value::Set(members),
            ValueType::Hash => Value::Hash(fields),
        })
    }
}

/// The oracle, gathering operations one at a time: what [`converged`] computes from a list of
/// operations, for a caller that sees them one by one and would otherwise keep them all.
#[derive(Debug, Default)]
pub struct Oracle {
    facts: FactMap,
}

/// The oracle's facts by key. A hash map, which the crate otherwise forbids because its
/// iteration order could leak into behaviour: here the hasher has no seed, and the map is only
/// read by key, or iterated into an ordered map ([`Oracle::values`]), whose order is the keys'
/// own. An ordered map compared a dozen keys per operation gathered, each behind a pointer.
#[allow(clippy::disallowed_types)]
type FactMap = std::collections::HashMap<Bytes, KeyFacts, rustc_hash::FxBuildHasher>;

/// Keys [`Oracle::with_keys`] makes room for at most: a scenario may name millions.
const KEYS_RESERVED_MAX: usize = 1 << 20;

impl Oracle {
    /// An oracle with room for facts about `keys` keys (up to a bound), so that it does not
    /// move its facts to a larger table again and again as they come.
    pub fn with_keys(keys: u64) -> Oracle {
        let keys = usize::try_from(keys).unwrap_or(usize::MAX);
        let mut facts = FactMap::default();
        facts.reserve(keys.min(KEYS_RESERVED_MAX));
        Oracle { facts }
    }

    /// Gathers one operation: `op` on `key` at `hlc`. Operations may come in any order, and
    /// more than once.
    pub fn add(&mut self, key: &Bytes, hlc: Hlc, op: &Op) {
        let key_facts = match self.facts.get_mut(key) {
            Some(facts) => facts,
            None => self.facts.entry(key.clone()).or_default(),
        };
        match op {
            Op::Delete(observed) => key_facts.removal(observed, hlc),
            Op::Write { replaces, write } => {
                if let Some(observed) = replaces {
                    key_facts.removal(observed, hlc);
                }
                key_facts.write(write, hlc);
            }
        }
    }

    /// The converged value of every key that has one, from the operations gathered so far.
    pub fn values(&self) -> BTreeMap<Bytes, Value> {
        self.facts
            .iter()
            .filter_map(|(key, f)| f.value().map(|v| (key.clone(), v)))
            .collect()
    }
}

/// The converged value of every key that has one, from every operation ever issued: `(key, hlc
/// of the operation, operation)`, in any order, duplicates allowed.
pub fn converged<'a, I>(ops: I) -> BTreeMap<Bytes, Value>
where
    I: IntoIterator<Item = (&'a Bytes, Hlc, &'a Op)>,
{
    let mut oracle = Oracle::default();
    for (key, hlc, op) in ops {
        oracle.add(key, hlc, op);
    }
    oracle.values()
}
