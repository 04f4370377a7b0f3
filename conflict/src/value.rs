//! Typed values of one key and the operations on them.
//!
//! A key holds one of four types: **string** (last-writer-wins register), **counter**
//! (PN-counter with observed reset), **set** (add-wins observed-remove set) and **hash** (field ->
//! LWW register). [`KeyState`] keeps one sub-state per type; each is a join-semilattice, so their
//! product is one too, and every replica that has seen the same operations holds the same state.
//!
//! ```text
//!   Command ──► KeyState::prepare (at the origin: reads local state, checks types)
//!                  └─► Prepared { op, reply }
//!   Op + Hlc ─► KeyState::apply   (everywhere, in origin order per origin)
//!   KeyState ─► KeyState::merge   (state-based: snapshots and repair; any order)
//!   KeyState ─► KeyState::value   (what a client reads)
//! ```
//!
//! **Which type is visible.** Normally a key has one present sub-state. When two regions create
//! one key with two types concurrently, both sub-states exist after they meet; the visible one is
//! the present type whose latest write carries the greatest HLC, the same everywhere. The others
//! are kept, hidden, until a `DEL` (which removes what it observed of every type) clears them.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use crdts::{CvRDT, Dot, LWWReg, VClock};
use serde::{Deserialize, Serialize};

use crate::awset::AwSet;
use crate::counter::CounterTotals;
use crate::small_map::SmallMap;
use crate::{Hlc, NodeId, StateBytes};

/// The four value types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ValueType {
    /// A byte string; last writer wins.
    String,
    /// A signed 64-bit counter; increments from every region add up.
    Counter,
    /// A set of byte strings; add wins over a concurrent remove.
    Set,
    /// A map from field to byte string; each field is last-writer-wins.
    Hash,
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ValueType::String => "string",
            ValueType::Counter => "counter",
            ValueType::Set => "set",
            ValueType::Hash => "hash",
        })
    }
}

/// Direction of a counter change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// An increment.
    Up,
    /// A decrement.
    Down,
}

/// What a removal observed at its origin, per type. A removal removes exactly this, so that
/// concurrent writes elsewhere (which it did not observe) survive where the type's semantics say so.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// Tombstone the string at the operation's HLC (last writer wins).
    pub string: bool,
    /// The counter's per-origin totals the remover had seen; they stop counting.
    pub counter: Option<CounterTotals>,
    /// The set's add dots the remover had seen; they are removed.
    pub set: Option<VClock<NodeId>>,
    /// Remove every hash field written before the operation's HLC (fields are LWW registers).
    pub hash: bool,
}

impl Observed {
    /// Whether this observes nothing at all.
    pub fn is_empty(&self) -> bool {
        !self.string && self.counter.is_none() && self.set.is_none() && !self.hash
    }
}

/// A write of one type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Write {
    /// `SET`: the string becomes `value` unless a write with a greater HLC exists.
    Set(Bytes),
    /// `INCRBY`/`DECRBY`: the origin's running total in one direction is now `total`.
    /// Totals, not deltas, so that a duplicate is harmless.
    Counter {
        /// Which of the origin's two totals this advances.
        direction: Direction,
        /// The origin's new running total in that direction.
        total: u64,
    },
    /// `SADD`: the members, witnessed by the origin's add dot `counter`.
    SetAdd {
        /// The origin's per-key add counter (the dot is `(origin, counter)`).
        counter: u64,
        /// Members added; sorted, no duplicates.
        members: Vec<Bytes>,
    },
    /// `SREM`: the members, removing the add dots the origin had observed of them.
    SetRemove {
        /// The add dots of `members` the origin had seen.
        observed: VClock<NodeId>,
        /// Members removed; sorted, no duplicates.
        members: Vec<Bytes>,
    },
    /// `HSET`: each field becomes its value unless a write with a greater HLC exists.
    HashSet(Vec<(Bytes, Bytes)>),
    /// `HDEL`: each field is tombstoned at the operation's HLC.
    HashDelete(Vec<Bytes>),
}

impl Write {
    /// The type this write belongs to.
    pub fn value_type(&self) -> ValueType {
        match self {
            Write::Set(_) => ValueType::String,
            Write::Counter { .. } => ValueType::Counter,
            Write::SetAdd { .. } | Write::SetRemove { .. } => ValueType::Set,
            Write::HashSet(_) | Write::HashDelete(_) => ValueType::Hash,
        }
    }
}

/// The operation a change event carries. The origin and the HLC travel beside it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `DEL`: removes what the origin observed of every type. (Boxed, as `replaces` is: an
    /// event is moved several times on its way, and most carry nothing observed.)
    Delete(Box<Observed>),
    /// A write, which may first remove what the origin observed of other types (`SET` over a
    /// set, say, or `INCR` over a string holding an integer).
    Write {
        /// What is removed before the write applies.
        replaces: Option<Box<Observed>>,
        /// The write itself.
        write: Write,
    },
}

/// An operation that can never have been produced by [`KeyState::prepare`]: refused before it
/// touches any state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOp {
    /// A list of members or fields is not sorted and free of duplicates.
    #[error("members or fields are not sorted and unique")]
    NotCanonical,
    /// A write with nothing in it.
    #[error("empty write")]
    Empty,
    /// A string write that also tombstones the string at the same HLC.
    #[error("a SET cannot also tombstone the string it writes")]
    SetReplacesString,
    /// An add dot counter or a counter total of zero.
    #[error("zero dot counter")]
    ZeroCounter,
}

impl Op {
    /// Checks the shape rules [`KeyState::prepare`] guarantees, for an op that came off the wire.
    pub fn validate(&self) -> Result<(), InvalidOp> {
        let write = match self {
            Op::Delete(observed) if observed.is_empty() => return Err(InvalidOp::Empty),
            Op::Delete(_) => return Ok(()),
            Op::Write { replaces, write } => {
                if matches!(write, Write::Set(_)) && replaces.as_ref().is_some_and(|r| r.string) {
                    return Err(InvalidOp::SetReplacesString);
                }
                write
            }
        };
        match write {
            Write::Set(_) => Ok(()),
            Write::Counter { total, .. } if *total == 0 => Err(InvalidOp::ZeroCounter),
            Write::Counter { .. } => Ok(()),
            Write::SetAdd { counter: 0, .. } => Err(InvalidOp::ZeroCounter),
            Write::SetAdd { members, .. } | Write::SetRemove { members, .. } => canonical(members),
            Write::HashSet(fields) => {
                if fields.is_empty() {
                    return Err(InvalidOp::Empty);
                }
                match fields.windows(2).all(|w| w[0].0 < w[1].0) {
                    true => Ok(()),
                    false => Err(InvalidOp::NotCanonical),
                }
            }
            Write::HashDelete(fields) => canonical(fields),
        }
    }
}

fn canonical(items: &[Bytes]) -> Result<(), InvalidOp> {
    if items.is_empty() {
        return Err(InvalidOp::Empty);
    }
    match items.windows(2).all(|w| w[0] < w[1]) {
        true => Ok(()),
        false => Err(InvalidOp::NotCanonical),
    }
}

/// A command from a client, before it becomes an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `SET key value`.
    Set(Bytes),
    /// `INCRBY key delta` (and `INCR`, `DECR`, `DECRBY`).
    IncrBy(i64),
    /// `SADD key member...`.
    SetAdd(Vec<Bytes>),
    /// `SREM key member...`.
    SetRemove(Vec<Bytes>),
    /// `HSET key field value...`.
    HashSet(Vec<(Bytes, Bytes)>),
    /// `HDEL key field...`.
    HashDelete(Vec<Bytes>),
    /// `DEL key`.
    Delete,
}

/// A command the key's current state refuses, as Redis would.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The key holds another type.
    #[error("WRONGTYPE Operation against a key holding the wrong kind of value")]
    WrongType {
        /// The type the key holds.
        held: ValueType,
    },
    /// `INCR` on a string that is not a decimal 64-bit integer.
    #[error("ERR value is not an integer or out of range")]
    NotAnInteger,
    /// The counter would leave the signed 64-bit range.
    #[error("ERR increment or decrement would overflow")]
    Overflow,
    /// The region is leaving the mesh: it ships what it holds and takes no new writes.
    #[error("READONLY this region is leaving the mesh; write to another region")]
    Leaving,
    /// This region may have lost the tail of its own writes (a restart after a power loss in
    /// `process` durability, or a peer that holds more of them than it does): it takes writes
    /// again once every neighbor has said what it holds of them and any it lost came back.
    #[error(
        "TRYAGAIN this region is recovering writes it may have lost in a restart; retry shortly"
    )]
    Recovering,
    /// The key is longer than the wire protocol carries: an event of it would be refused by
    /// every peer.
    #[error("ERR key longer than {max} bytes")]
    KeyTooLong {
        /// The longest key, in bytes.
        max: usize,
    },
    /// A value (a string, a set member, a hash field or its value) larger than the wire
    /// protocol carries: an event of it would be refused by every peer.
    #[error("ERR value larger than {max} bytes")]
    ValueTooLarge {
        /// The largest value, in bytes.
        max: usize,
    },
    /// The key's state would grow past [`KEY_STATE_BYTES_MAX`]: more than a data snapshot
    /// carries for one key, so that no region could join or resynchronise.
    #[error("ERR the key would hold more than {max} bytes; split it into several keys")]
    KeyTooLarge {
        /// The most bytes a key's state may hold.
        max: usize,
    },
    /// The key's keyspace takes writes only in other regions (or in none: it is frozen).
    #[error("READONLY keyspace '{keyspace}' takes no writes in this region; write in one of its writer regions")]
    NotWriter {
        /// The keyspace's prefix.
        keyspace: String,
    },
}

/// What [`KeyState::prepare`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// The operation to replicate, or `None` when the command changes nothing (`DEL` of a missing
    /// key, `SREM` of absent members).
    pub op: Option<Op>,
    /// The integer Redis replies with: new members or fields for `SADD`/`HSET`, removed ones for
    /// `SREM`/`HDEL`/`DEL`, the new value for `INCRBY`; 0 for `SET`.
    pub reply: i64,
}

/// What a client reads from a key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Value {
    /// A string.
    String(Bytes),
    /// A counter's value. Each origin's increments stay within `i64`; their sum is kept wide.
    Counter(i128),
    /// A set's members, in byte order.
    Set(Vec<Bytes>),
    /// A hash's fields and values, in field order.
    Hash(Vec<(Bytes, Bytes)>),
}

impl Value {
    /// The type of this value.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::String(_) => ValueType::String,
            Value::Counter(_) => ValueType::Counter,
            Value::Set(_) => ValueType::Set,
            Value::Hash(_) => ValueType::Hash,
        }
    }
}

/// A counter: per-origin totals, and the part of them removed by observed resets (`DEL`).
/// Invariant: `removed <= total` pointwise.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct CounterState {
    total: CounterTotals,
    removed: CounterTotals,
    latest: Hlc,
}

impl CounterState {
    fn present(&self) -> bool {
        self.total != self.removed
    }

    fn value(&self) -> i128 {
        // Each origin's totals are u64 and there are at most a few hundred origins: far inside
        // i128. Saturate rather than panic should a corrupt state say otherwise.
        self.total.value().saturating_sub(self.removed.value())
    }

    /// The origin's own running totals `(up, down)`.
    fn own_totals(&self, origin: NodeId) -> (u64, u64) {
        (self.total.up(origin), self.total.down(origin))
    }
}

/// A set and the HLC of its latest write.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SetState {
    members: AwSet,
    latest: Hlc,
}

/// A hash: LWW registers per field, and an LWW tombstone for the whole hash.
/// Invariant: no field's marker is `<= cleared`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct HashState {
    /// In field order, in a `SmallMap`: one short sorted vector for the handful of fields most
    /// hashes hold, read in a cache line or two where a B-tree allocates a node for eleven; a
    /// B-tree for many. It encodes as the `BTreeMap` it stands for.
    fields: SmallMap<StateBytes, LWWReg<Option<StateBytes>, Hlc>>,
    cleared: Hlc,
    latest: Hlc,
}

impl HashState {
    fn present(&self) -> bool {
        self.fields.values().any(|reg| reg.val.is_some())
    }

    fn live(&self) -> impl Iterator<Item = (&StateBytes, &StateBytes)> {
        self.fields
            .iter()
            .filter_map(|(field, reg)| reg.val.as_ref().map(|v| (field, v)))
    }

    /// Writes `field` at `hlc` unless the hash was cleared at or after it. Returns whether a
    /// write with a greater HLC had reached the field already (this one lost), found in the
    /// same lookup as the write.
    fn write_field(&mut self, field: &[u8], val: Option<StateBytes>, hlc: Hlc) -> bool {
        let cleared = hlc <= self.cleared;
        match self.fields.get_mut(field) {
            Some(reg) => {
                let lost = reg.marker > hlc;
                if !cleared {
                    reg.update(val, hlc);
                }
                lost
            }
            None => {
                if !cleared {
                    self.fields
                        .insert(StateBytes::from(field), LWWReg { val, marker: hlc });
                }
                false
            }
        }
    }

    fn clear(&mut self, hlc: Hlc) {
        self.cleared = self.cleared.max(hlc);
        let cleared = self.cleared;
        self.fields.retain(|_, reg| reg.marker > cleared);
    }
}

/// The most bytes a client's write may grow one key's state to (as [`KeyState::size_bytes`]
/// counts them): half what a data snapshot carries for one key, which leaves room for a second
/// region's writes made at the same time, each under the bound where it was made (three or
/// more regions cut off from each other could still grow a key past a snapshot's bound).
pub const KEY_STATE_BYTES_MAX: usize = 32 * 1024 * 1024;

/// What an entry a client adds to a set or hash takes beside its bytes (its dots or HLC, and
/// its framing), at most: how [`KeyState::prepare`] counts an add against
/// [`KEY_STATE_BYTES_MAX`].
const ADDED_ENTRY_BYTES: usize = 64;

/// The replicated state of one key. See the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    // Every type boxed: a key state is moved several times per apply (out of storage, into a
    // batch, back into storage) and sits in storage's hash map beside its key, and most keys
    // hold one type; boxes keep the moved part, and a map slot, small.
    string: Option<Box<LWWReg<Option<StateBytes>, Hlc>>>,
    counter: Option<Box<CounterState>>,
    set: Option<Box<SetState>>,
    hash: Option<Box<HashState>>,
}

const _: () = assert!(
    std::mem::size_of::<KeyState>() == 4 * std::mem::size_of::<usize>(),
    "a key state is four pointers: every type's state is boxed"
);

/// What applying an operation resolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Last-writer-wins conflicts seen: registers (a string or hash fields) this write reached
    /// after a write with a greater HLC had, so this write lost. A conflict between two writes is
    /// seen this way in at least one region: wherever the older arrives second.
    pub lww_lost: u32,
}

impl KeyState {
    /// The type a client sees, if any value is present.
    pub fn visible_type(&self) -> Option<ValueType> {
        let mut best: Option<(Hlc, ValueType)> = None;
        let mut consider = |latest: Hlc, ty: ValueType| {
            if best.is_none_or(|(hlc, _)| latest > hlc) {
                best = Some((latest, ty));
            }
        };
        if let Some(reg) = &self.string {
            if reg.val.is_some() {
                consider(reg.marker, ValueType::String);
            }
        }
        if let Some(counter) = self.counter.as_ref().filter(|c| c.present()) {
            consider(counter.latest, ValueType::Counter);
        }
        if let Some(set) = self.set.as_ref().filter(|s| !s.members.is_empty()) {
            consider(set.latest, ValueType::Set);
        }
        if let Some(hash) = self.hash.as_ref().filter(|h| h.present()) {
            consider(hash.latest, ValueType::Hash);
        }
        best.map(|(_, ty)| ty)
    }

    /// What a client reads, or `None` for a missing key.
    pub fn value(&self) -> Option<Value> {
        Some(match self.visible_type()? {
            ValueType::String => Value::String(Bytes::copy_from_slice(self.string_value()?)),
            ValueType::Counter => Value::Counter(self.counter.as_ref()?.value()),
            ValueType::Set => Value::Set(
                self.set
                    .as_ref()?
                    .members
                    .members()
                    .map(Bytes::copy_from_slice)
                    .collect(),
            ),
            ValueType::Hash => Value::Hash(
                self.hash
                    .as_ref()?
                    .live()
                    .map(|(f, v)| (f.to_bytes(), v.to_bytes()))
                    .collect(),
            ),
        })
    }

    /// Whether a client would read `expected` here: `value() == Some(expected)`, compared in
    /// place, without copying the state's bytes out first.
    pub fn reads_as(&self, expected: &Value) -> bool {
        match (self.visible_type(), expected) {
            (Some(ValueType::String), Value::String(value)) => {
                self.string_value() == Some(&value[..])
            }
            (Some(ValueType::Counter), Value::Counter(n)) => {
                self.counter.as_ref().is_some_and(|c| c.value() == *n)
            }
            (Some(ValueType::Set), Value::Set(members)) => self
                .set
                .as_ref()
                .is_some_and(|s| s.members.members().eq(members.iter().map(|m| &m[..]))),
            (Some(ValueType::Hash), Value::Hash(fields)) => self.hash.as_ref().is_some_and(|h| {
                h.live()
                    .map(|(f, v)| (f.as_bytes(), v.as_bytes()))
                    .eq(fields.iter().map(|(f, v)| (&f[..], &v[..])))
            }),
            _ => false,
        }
    }

    /// What a client reads, or `None` for a missing key, taking the state apart: bytes kept
    /// in allocations of their own are handed over, not copied (see [`KeyState::value`]).
    pub fn into_value(self) -> Option<Value> {
        Some(match self.visible_type()? {
            ValueType::String => Value::String(self.string?.val?.into_bytes()),
            ValueType::Counter => Value::Counter(self.counter.as_ref()?.value()),
            ValueType::Set => Value::Set(
                self.set?
                    .members
                    .into_members()
                    .map(StateBytes::into_bytes)
                    .collect(),
            ),
            ValueType::Hash => Value::Hash(
                self.hash?
                    .fields
                    .into_iter()
                    .filter_map(|(f, reg)| reg.val.map(|v| (f.into_bytes(), v.into_bytes())))
                    .collect(),
            ),
        })
    }

    /// Reads a word of each of the state's parts and discards it: a caller about to work on
    /// several states touches them all first, so that their memory loads overlap.
    pub fn touch(&self) {
        std::hint::black_box(self.string.as_ref().map(|s| s.marker.wall_ms));
        std::hint::black_box(self.counter.as_ref().map(|c| c.latest.wall_ms));
        std::hint::black_box(self.set.as_ref().map(|s| s.latest.wall_ms));
        std::hint::black_box(self.hash.as_ref().map(|h| h.latest.wall_ms));
    }

    /// Refuses a client's write that would grow the state past [`KEY_STATE_BYTES_MAX`] by
    /// `added` bytes (counted generously). Only adds grow a key without bound: a string holds
    /// one value, a counter a total per origin, and removes are never refused.
    fn check_growth(&self, added: usize) -> Result<(), CommandError> {
        match self.size_bytes().saturating_add(added) > KEY_STATE_BYTES_MAX {
            true => Err(CommandError::KeyTooLarge {
                max: KEY_STATE_BYTES_MAX,
            }),
            false => Ok(()),
        }
    }

    /// At least the bytes the state takes encoded, counted in one walk of its members and
    /// fields: every byte of them, and for every entry and dot the most its encoding adds.
    pub fn size_bytes(&self) -> usize {
        use crate::awset::{DOT_BYTES_MAX, ENTRY_BYTES_MAX};
        // A type's fixed part (a register's tags and HLC, a set's or hash's HLCs and counts).
        const HEAD_BYTES: usize = 64;
        // A hash field's register beside its field and value: a tag, a length and an HLC.
        const FIELD_BYTES: usize = 32;
        let string = self.string.as_ref().map_or(0, |reg| {
            HEAD_BYTES + reg.val.as_ref().map_or(0, |value| value.len())
        });
        let counter = self.counter.as_ref().map_or(0, |counter| {
            HEAD_BYTES + (counter.total.origins() + counter.removed.origins()) * DOT_BYTES_MAX
        });
        let set = self
            .set
            .as_ref()
            .map_or(0, |set| HEAD_BYTES + set.members.size_bytes());
        let hash = self.hash.as_ref().map_or(0, |hash| {
            let fields: usize = hash
                .fields
                .iter()
                .map(|(field, reg)| {
                    field.len()
                        + reg.val.as_ref().map_or(0, |value| value.len())
                        + ENTRY_BYTES_MAX
                        + FIELD_BYTES
                })
                .sum();
            HEAD_BYTES + fields
        });
        // Each type's presence tag.
        const TAGS_BYTES: usize = 4;
        TAGS_BYTES + string + counter + set + hash
    }

    /// Whether nothing at all is stored (not even a tombstone): the key can be forgotten.
    pub fn is_empty(&self) -> bool {
        self.string.is_none() && self.counter.is_none() && self.set.is_none() && self.hash.is_none()
    }

    fn string_value(&self) -> Option<&[u8]> {
        self.string.as_ref()?.val.as_deref()
    }

    /// Whether `member` is in the key's set (false when the key is not a visible set).
    pub fn set_contains(&self, member: &[u8]) -> bool {
        self.visible_type() == Some(ValueType::Set)
            && self
                .set
                .as_ref()
                .is_some_and(|s| s.members.contains(member))
    }

    /// The number of members of the key's set (0 when the key is not a visible set).
    pub fn set_len(&self) -> usize {
        match (self.visible_type(), &self.set) {
            (Some(ValueType::Set), Some(set)) => set.members.len(),
            _ => 0,
        }
    }

    /// The value of one hash field (`None` when the key is not a visible hash).
    pub fn hash_field(&self, field: &[u8]) -> Option<&[u8]> {
        if self.visible_type() != Some(ValueType::Hash) {
            return None;
        }
        self.hash.as_ref()?.fields.get(field)?.val.as_deref()
    }

    /// Everything of every type this replica holds, as a removal would observe it.
    fn observe_all(&self, string: bool) -> Observed {
        Observed {
            string: string && self.string_value().is_some(),
            counter: self
                .counter
                .as_ref()
                .filter(|c| c.present())
                .map(|c| c.total.clone()),
            set: self
                .set
                .as_ref()
                .filter(|s| !s.members.is_empty())
                .map(|s| s.members.clock()),
            hash: self.hash.as_ref().is_some_and(|h| h.present()),
        }
    }

    /// What other types a write of `ty` replaces, if any is present.
    fn replaces_others(&self, ty: ValueType) -> Option<Observed> {
        let mut observed = self.observe_all(ty != ValueType::String);
        match ty {
            ValueType::String => observed.string = false,
            ValueType::Counter => observed.counter = None,
            ValueType::Set => observed.set = None,
            ValueType::Hash => observed.hash = false,
        }
        (!observed.is_empty()).then_some(observed)
    }

    /// Turns a client command into the operation to replicate, at the origin `origin`, checking
    /// it against this replica's state as Redis would.
    pub fn prepare(&self, origin: NodeId, command: Command) -> Result<Prepared, CommandError> {
        let visible = self.visible_type();
        let expect = |ty: ValueType| match visible {
            Some(held) if held != ty => Err(CommandError::WrongType { held }),
            _ => Ok(()),
        };
        let write = |write: Write| {
            Some(Op::Write {
                replaces: None,
                write,
            })
        };
        match command {
            Command::Set(value) => Ok(Prepared {
                op: Some(Op::Write {
                    replaces: self.replaces_others(ValueType::String).map(Box::new),
                    write: Write::Set(value),
                }),
                reply: 0,
            }),
            Command::IncrBy(delta) => match visible {
                Some(ValueType::String) => {
                    // A string holding an integer stays a string: the increment is a
                    // read-modify-write of it, last writer wins (see docs/conflicts.md).
                    let current = parse_i64(self.string_value().unwrap_or(b""))
                        .ok_or(CommandError::NotAnInteger)?;
                    let new = current.checked_add(delta).ok_or(CommandError::Overflow)?;
                    let value = Bytes::from(new.to_string());
                    Ok(Prepared {
                        op: write(Write::Set(value)),
                        reply: new,
                    })
                }
                _ => {
                    expect(ValueType::Counter)?;
                    // Read in place, not copied.
                    let none = CounterState::default();
                    let counter = self.counter.as_deref().unwrap_or(&none);
                    let current = counter.value();
                    let new = i64::try_from(current + i128::from(delta))
                        .map_err(|_| CommandError::Overflow)?;
                    if delta == 0 {
                        return Ok(Prepared {
                            op: None,
                            reply: new,
                        });
                    }
                    let write_op = counter_delta(counter, origin, delta)?;
                    Ok(Prepared {
                        op: write(write_op),
                        reply: new,
                    })
                }
            },
            Command::SetAdd(members) => {
                expect(ValueType::Set)?;
                if members.is_empty() {
                    // Nothing to add: no event (peers refuse an empty SetAdd).
                    return Ok(Prepared { op: None, reply: 0 });
                }
                let members = sorted_unique(members);
                let set = self.set.as_ref().map(|s| &s.members);
                // A member already there adds a dot; a new one, itself too.
                let (mut new, mut added) = (0, 0);
                for member in &members {
                    added += ADDED_ENTRY_BYTES;
                    if !set.is_some_and(|s| s.contains(member)) {
                        new += 1;
                        added += member.len();
                    }
                }
                self.check_growth(added)?;
                let counter = set.map_or(1, |s| s.next_counter(origin));
                Ok(Prepared {
                    op: write(Write::SetAdd { counter, members }),
                    reply: new as i64,
                })
            }
            Command::SetRemove(members) => {
                expect(ValueType::Set)?;
                let Some(set) = self.set.as_ref().map(|s| &s.members) else {
                    return Ok(Prepared { op: None, reply: 0 });
                };
                let present: Vec<Bytes> = sorted_unique(members)
                    .into_iter()
                    .filter(|m| set.contains(m))
                    .collect();
                if present.is_empty() {
                    return Ok(Prepared { op: None, reply: 0 });
                }
                let reply = present.len() as i64;
                let observed = set.observed(&present);
                Ok(Prepared {
                    op: write(Write::SetRemove {
                        observed,
                        members: present,
                    }),
                    reply,
                })
            }
            Command::HashSet(pairs) => {
                expect(ValueType::Hash)?;
                // Within one command the last value given for a field wins, as in Redis.
                let fields: BTreeMap<Bytes, Bytes> = pairs.into_iter().collect();
                // A value replacing another adds what it is longer by; a new field, itself.
                let (mut new, mut added) = (0, 0);
                for (field, value) in &fields {
                    match self.hash_field(field) {
                        Some(old) => added += value.len().saturating_sub(old.len()),
                        None => {
                            new += 1;
                            added += field.len() + value.len() + ADDED_ENTRY_BYTES;
                        }
                    }
                }
                self.check_growth(added)?;
                Ok(Prepared {
                    op: (!fields.is_empty()).then(|| Op::Write {
                        replaces: None,
                        write: Write::HashSet(fields.into_iter().collect()),
                    }),
                    reply: new as i64,
                })
            }
            Command::HashDelete(fields) => {
                expect(ValueType::Hash)?;
                let present: Vec<Bytes> = sorted_unique(fields)
                    .into_iter()
                    .filter(|f| self.hash_field(f).is_some())
                    .collect();
                let reply = present.len() as i64;
                let op = (!present.is_empty()).then(|| Op::Write {
                    replaces: None,
                    write: Write::HashDelete(present),
                });
                Ok(Prepared { op, reply })
            }
            Command::Delete => {
                if visible.is_none() {
                    return Ok(Prepared { op: None, reply: 0 });
                }
                Ok(Prepared {
                    op: Some(Op::Delete(Box::new(self.observe_all(true)))),
                    reply: 1,
                })
            }
        }
    }

    /// Applies an operation issued at `hlc` by `hlc.node` (op-based replication).
    ///
    /// Operations of one origin must be applied in the order it issued them; duplicates and any
    /// interleaving of origins converge. The op must have passed [`Op::validate`].
    pub fn apply(&mut self, op: &Op, hlc: Hlc) -> Applied {
        let mut applied = Applied::default();
        match op {
            Op::Delete(observed) => self.remove_observed(observed, hlc),
            Op::Write { replaces, write } => {
                if let Some(observed) = replaces {
                    self.remove_observed(observed, hlc);
                }
                applied.lww_lost = self.apply_write(write, hlc);
            }
        }
        applied
    }

    fn remove_observed(&mut self, observed: &Observed, hlc: Hlc) {
        if observed.string {
            let reg = self.string.get_or_insert_with(|| {
                Box::new(LWWReg {
                    val: None,
                    marker: Hlc::ZERO,
                })
            });
            reg.update(None, hlc);
        }
        if let Some(seen) = &observed.counter {
            let counter = self.counter.get_or_insert_with(Box::default);
            // The totals it saw are real and will arrive; taking them now keeps removed <= total.
            counter.total.merge(seen);
            counter.removed.merge(seen);
        }
        if let Some(seen) = &observed.set {
            self.set
                .get_or_insert_with(Box::default)
                .members
                .remove_all(seen);
        }
        if observed.hash {
            self.hash.get_or_insert_with(Box::default).clear(hlc);
        }
    }

    fn apply_write(&mut self, write: &Write, hlc: Hlc) -> u32 {
        let origin = hlc.node;
        match write {
            Write::Set(value) => {
                let reg = self.string.get_or_insert_with(|| {
                    Box::new(LWWReg {
                        val: None,
                        marker: Hlc::ZERO,
                    })
                });
                let lost = u32::from(reg.marker > hlc);
                reg.update(Some(StateBytes::from(&value[..])), hlc);
                lost
            }
            Write::Counter { direction, total } => {
                let counter = self.counter.get_or_insert_with(Box::default);
                counter.total.advance(origin, *direction, *total);
                counter.latest = counter.latest.max(hlc);
                0
            }
            Write::SetAdd { counter, members } => {
                let set = self.set.get_or_insert_with(Box::default);
                set.members.add(Dot::new(origin, *counter), members);
                set.latest = set.latest.max(hlc);
                0
            }
            Write::SetRemove { observed, members } => {
                let set = self.set.get_or_insert_with(Box::default);
                set.members.remove(observed, members);
                set.latest = set.latest.max(hlc);
                0
            }
            Write::HashSet(fields) => {
                let hash = self.hash.get_or_insert_with(Box::default);
                let mut lost = 0;
                for (field, value) in fields {
                    let value = Some(StateBytes::from(&value[..]));
                    lost += u32::from(hash.write_field(field, value, hlc));
                }
                hash.latest = hash.latest.max(hlc);
                lost
            }
            Write::HashDelete(fields) => {
                let hash = self.hash.get_or_insert_with(Box::default);
                for field in fields {
                    let _ = hash.write_field(field, None, hlc);
                }
                hash.latest = hash.latest.max(hlc);
                0
            }
        }
    }

    /// The oldest tombstone this state holds, if any: a string deleted at an HLC, a hash field
    /// deleted at an HLC, or a hash cleared at an HLC. Storage indexes keys by it, so that
    /// [`KeyState::collect_tombstones`] visits only keys that have something to collect.
    pub fn oldest_tombstone(&self) -> Option<Hlc> {
        let string = self
            .string
            .as_ref()
            .filter(|reg| reg.val.is_none())
            .map(|reg| reg.marker);
        let hash = self.hash.as_ref().and_then(|hash| {
            let cleared = (hash.cleared > Hlc::ZERO).then_some(hash.cleared);
            let fields = hash
                .fields
                .values()
                .filter(|reg| reg.val.is_none())
                .map(|reg| reg.marker)
                .min();
            cleared.into_iter().chain(fields).min()
        });
        string.into_iter().chain(hash).min()
    }

    /// Drops every tombstone at or below `stable`, and returns whether anything was dropped.
    ///
    /// `stable` must be a **stable HLC**: every event that some region has not applied yet
    /// carries a greater HLC. A tombstone exists only to beat a write older than itself that
    /// arrives later; once no such write can arrive anywhere, applying any future event gives
    /// the same result with or without it, so every region may drop it on its own schedule.
    /// Counter totals and set dots are not tombstones and stay: future writes are computed
    /// against them (a counter write carries its origin's running total, an add its next dot).
    pub fn collect_tombstones(&mut self, stable: Hlc) -> bool {
        let mut dropped = false;
        if self
            .string
            .as_ref()
            .is_some_and(|reg| reg.val.is_none() && reg.marker <= stable)
        {
            self.string = None;
            dropped = true;
        }
        if let Some(hash) = self.hash.as_mut() {
            let before = hash.fields.len();
            hash.fields
                .retain(|_, reg| reg.val.is_some() || reg.marker > stable);
            dropped |= hash.fields.len() != before;
            if hash.cleared > Hlc::ZERO && hash.cleared <= stable {
                // Every field written at or below `cleared` is gone (the invariant), and no
                // write at or below `stable` can still arrive: the marker guards nothing.
                hash.cleared = Hlc::ZERO;
                dropped = true;
            }
            if hash.fields.is_empty() && hash.cleared == Hlc::ZERO {
                self.hash = None;
            }
        }
        debug_assert!(self.oldest_tombstone().is_none_or(|hlc| hlc > stable));
        dropped
    }

    /// State-based merge: the least upper bound of two replicas of this key. Commutative,
    /// associative and idempotent; needs no delivery order.
    pub fn merge(&mut self, other: &KeyState) {
        if let Some(theirs) = &other.string {
            match &mut self.string {
                Some(ours) => ours.merge(LWWReg::clone(theirs)),
                None => self.string = Some(theirs.clone()),
            }
        }
        if let Some(theirs) = &other.counter {
            let ours = self.counter.get_or_insert_with(Box::default);
            ours.total.merge(&theirs.total);
            ours.removed.merge(&theirs.removed);
            ours.latest = ours.latest.max(theirs.latest);
        }
        if let Some(theirs) = &other.set {
            let ours = self.set.get_or_insert_with(Box::default);
            ours.members.merge(&theirs.members);
            ours.latest = ours.latest.max(theirs.latest);
        }
        if let Some(theirs) = &other.hash {
            let ours = self.hash.get_or_insert_with(Box::default);
            for (field, reg) in &theirs.fields {
                let _ = ours.write_field(field, reg.val.clone(), reg.marker);
            }
            ours.clear(theirs.cleared);
            ours.latest = ours.latest.max(theirs.latest);
        }
    }
}

/// The counter write that makes `origin`'s contribution move by `delta`.
fn counter_delta(
    counter: &CounterState,
    origin: NodeId,
    delta: i64,
) -> Result<Write, CommandError> {
    let (up, down) = counter.own_totals(origin);
    let (direction, total) = if delta > 0 {
        (Direction::Up, up.checked_add(delta.unsigned_abs()))
    } else {
        (Direction::Down, down.checked_add(delta.unsigned_abs()))
    };
    Ok(Write::Counter {
        direction,
        total: total.ok_or(CommandError::Overflow)?,
    })
}

/// Sorts and de-duplicates, the canonical order of members and fields in an operation.
fn sorted_unique(mut items: Vec<Bytes>) -> Vec<Bytes> {
    items.sort();
    items.dedup();
    items
}

/// Parses a string as Redis parses an integer for `INCR`: optional `-`, decimal digits, no
/// leading zeros or `+`, no spaces, within `i64`.
pub fn parse_i64(bytes: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(bytes).ok()?;
    let digits = text.strip_prefix('-').unwrap_or(text);
    let valid = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && text != "-0";
    if !valid {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hset(field: &'static str, value: &'static str) -> Op {
        Op::Write {
            replaces: None,
            write: Write::HashSet(vec![(
                Bytes::from_static(field.as_bytes()),
                Bytes::from_static(value.as_bytes()),
            )]),
        }
    }

    fn at(ms: u64) -> Hlc {
        Hlc::new(ms, 0, NodeId(1))
    }

    /// The hash as a `BTreeMap` of fields held it: the encoding stored and sent states kept
    /// before `SmallMap`, which must not change.
    #[derive(Debug, Serialize, Deserialize)]
    struct HashStateInTree {
        fields: BTreeMap<StateBytes, LWWReg<Option<StateBytes>, Hlc>>,
        cleared: Hlc,
        latest: Hlc,
    }

    #[test]
    fn a_hash_encodes_and_decodes_as_its_fields_in_a_tree() {
        let mut hash = HashState::default();
        let long = StateBytes::from(&[b'v'; 40][..]);
        for (field, val, ms) in [
            (&b"zz"[..], Some(long), 4),
            (b"a", Some(StateBytes::from(&b"1"[..])), 5),
            (b"m", None, 6),
            (
                b"a-field-longer-than-16",
                Some(StateBytes::from(&b"2"[..])),
                7,
            ),
            (b"old", Some(StateBytes::from(&b"3"[..])), 2),
        ] {
            hash.write_field(field, val, at(ms));
        }
        hash.clear(at(3));
        hash.latest = at(7);
        assert_eq!(
            hash.fields.len(),
            4,
            "the field older than the clear is gone"
        );
        let tree = HashStateInTree {
            fields: hash
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            cleared: hash.cleared,
            latest: hash.latest,
        };
        crate::test_encoding::assert_encodes_as(&hash, &tree);
        let fields: Vec<&[u8]> = hash.fields.keys().map(StateBytes::as_bytes).collect();
        assert_eq!(fields, [&b"a"[..], b"a-field-longer-than-16", b"m", b"zz"]);
    }

    /// A field count the input cannot back ends in an error, not in reserving room for it.
    #[test]
    fn a_claimed_field_count_past_the_input_is_an_error() {
        let config = bincode::config::standard();
        for claimed in [1u64 << 40, u64::MAX] {
            let bytes = bincode::serde::encode_to_vec(claimed, config).unwrap();
            let decoded = bincode::serde::decode_from_slice::<HashState, _>(&bytes, config);
            assert!(decoded.is_err(), "{claimed}");
        }
    }

    /// A state keeps copies of what it applies, not slices of the frame an operation came in:
    /// once the operation is gone, nothing of the frame is kept alive.
    #[test]
    fn a_state_keeps_no_slice_of_the_frame_an_operation_came_in() {
        let frame = Bytes::from(b"v1m1m2f1x1".to_vec());
        let long = Bytes::from(vec![b'l'; 100]);
        let part = |at: usize| frame.slice(at..at + 2);
        let ops = [
            Write::Set(long.slice(..)),
            Write::Set(part(0)),
            Write::SetAdd {
                counter: 1,
                members: vec![part(2), part(4)],
            },
            Write::HashSet(vec![(part(6), part(8))]),
        ];
        let mut state = KeyState::default();
        for (n, write) in ops.into_iter().enumerate() {
            let op = Op::Write {
                replaces: None,
                write,
            };
            state.apply(&op, at(n as u64 + 1));
        }
        assert!(frame.is_unique(), "a state keeps a slice of the frame");
        assert!(long.is_unique(), "a state keeps a slice of a long value");
        assert_eq!(state.string_value(), Some(&b"v1"[..]));
        assert!(state
            .set
            .as_ref()
            .is_some_and(|s| s.members.contains(b"m2")));
        assert_eq!(state.hash_field(b"f1"), Some(&b"x1"[..]));
    }

    /// Taking a state apart reads what reading it does, and a state reads as exactly the value
    /// it reads, for every type, with bytes both inline and in allocations of their own.
    #[test]
    fn into_value_reads_what_value_reads() {
        let long = Bytes::from(vec![b'l'; 40]);
        let short = Bytes::from_static(b"s");
        let write = |write| Op::Write {
            replaces: None,
            write,
        };
        let writes = [
            vec![write(Write::Set(long.clone()))],
            vec![write(Write::Set(short.clone()))],
            vec![write(Write::Counter {
                direction: Direction::Up,
                total: 7,
            })],
            vec![write(Write::SetAdd {
                counter: 1,
                members: vec![long.clone(), short.clone()],
            })],
            vec![write(Write::HashSet(vec![
                (long.clone(), short.clone()),
                (short.clone(), long.clone()),
            ]))],
            vec![
                write(Write::HashSet(vec![(short.clone(), long.clone())])),
                write(Write::HashDelete(vec![short.clone()])),
            ],
        ];
        for ops in writes {
            let mut state = KeyState::default();
            for (n, op) in ops.iter().enumerate() {
                state.apply(op, at(n as u64 + 1));
            }
            assert_eq!(state.clone().into_value(), state.value(), "{ops:?}");
            let value = state.value();
            if let Some(value) = &value {
                assert!(state.reads_as(value), "{ops:?}");
            }
            for other in [
                Value::String(long.clone()),
                Value::String(short.clone()),
                Value::Counter(7),
                Value::Counter(8),
                Value::Set(vec![short.clone()]),
                Value::Set(vec![long.clone(), short.clone()]),
                Value::Hash(vec![(short.clone(), long.clone())]),
                Value::Hash(vec![(long.clone(), short.clone())]),
            ] {
                let expected = value.as_ref() == Some(&other);
                assert_eq!(state.reads_as(&other), expected, "{ops:?} as {other:?}");
            }
        }
        assert_eq!(KeyState::default().into_value(), None);
    }

    /// `size_bytes` counts at least what the state takes encoded, whatever its types, origins,
    /// members and tombstones: the bound on a key's state is checked with it.
    #[test]
    fn size_bytes_is_at_least_the_encoded_size() {
        let config = bincode::config::standard();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let check = |state: &KeyState, what: &str| {
            let encoded = bincode::serde::encode_to_vec(state, config).unwrap().len();
            assert!(
                state.size_bytes() >= encoded,
                "{what}: {} < {encoded}: {state:?}",
                state.size_bytes()
            );
        };
        for round in 0..50 {
            let mut state = KeyState::default();
            // Every op made, with its origin and HLC (wall-clock sized: the longest varints).
            let mut ops: Vec<(NodeId, Op, Hlc)> = Vec::new();
            for step in 0..200 {
                // Node ids of every size a varint takes.
                let origin = NodeId([1, 300, 70_000, u64::MAX / 3, u64::MAX][next(5) as usize]);
                let bytes = |n: u64| Bytes::from(vec![b'a' + (n % 26) as u8; 1 + n as usize % 70]);
                let member = bytes(next(40));
                let command = match next(9) {
                    0 => Command::Set(member),
                    1 => Command::IncrBy(next(100) as i64 - 50),
                    2..=4 => Command::SetAdd(vec![member, bytes(next(40))]),
                    5 => Command::SetRemove(vec![member]),
                    6 => Command::HashSet(vec![(member, bytes(next(300)))]),
                    7 => Command::HashDelete(vec![member]),
                    _ => Command::Delete,
                };
                let Ok(prepared) = state.prepare(origin, command) else {
                    continue;
                };
                if let Some(op) = prepared.op {
                    let hlc = Hlc::new(1_765_000_000_000 + step, next(3) as u32, origin);
                    state.apply(&op, hlc);
                    ops.push((origin, op, hlc));
                }
                check(&state, &format!("round {round} step {step}"));
            }
            // The same ops in another region: each origin's in order, the origins interleaved
            // otherwise, so that removes arrive before the adds they observed (pending).
            let mut queues: BTreeMap<NodeId, std::collections::VecDeque<(Op, Hlc)>> =
                BTreeMap::new();
            for (origin, op, hlc) in ops {
                queues.entry(origin).or_default().push_back((op, hlc));
            }
            let mut other = KeyState::default();
            while !queues.is_empty() {
                let at = next(queues.len() as u64) as usize;
                let origin = *queues.keys().nth(at).unwrap();
                let queue = queues.get_mut(&origin).unwrap();
                let (op, hlc) = queue.pop_front().unwrap();
                if queue.is_empty() {
                    queues.remove(&origin);
                }
                other.apply(&op, hlc);
                check(&other, &format!("round {round}, reordered"));
            }
        }
    }

    /// A hash field write that arrives after a newer one to the same field loses, and is
    /// counted as lost; one to another field, or past a clear, is not.
    #[test]
    fn a_hash_field_write_older_than_the_fields_loses_and_is_counted() {
        let mut state = KeyState::default();
        assert_eq!(state.apply(&hset("f", "new"), at(5)).lww_lost, 0);
        assert_eq!(state.apply(&hset("f", "old"), at(3)).lww_lost, 1);
        assert_eq!(state.hash_field(b"f"), Some(&b"new"[..]));
        assert_eq!(state.apply(&hset("g", "old"), at(3)).lww_lost, 0);
        assert_eq!(state.hash_field(b"g"), Some(&b"old"[..]));
        assert_eq!(state.apply(&hset("f", "newer"), at(7)).lww_lost, 0);
        assert_eq!(state.hash_field(b"f"), Some(&b"newer"[..]));
        // Cleared at 10: a write from before is dropped, and nothing is there for it to lose to.
        let clear = Op::Delete(Box::new(Observed {
            hash: true,
            ..Observed::default()
        }));
        state.apply(&clear, at(10));
        assert_eq!(state.apply(&hset("f", "late"), at(8)).lww_lost, 0);
        assert_eq!(state.hash_field(b"f"), None);
    }
}
