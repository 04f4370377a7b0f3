//! The scenario workload's commands, drawn from a seeded generator: the simulator feeds them to
//! its regions' replicas, `braid drill` sends them to real processes over RESP. One generator, so
//! that a drill rehearses the same mix of keys, types and conflicts as the simulator.

use std::sync::Mutex;

use braid_conflict::Command;
use bytes::Bytes;
use rand_chacha::ChaCha8Rng;
use rand_core::RngCore;

use crate::scenario::Workload;

/// Keys written by every region in the conflict share of the workload.
pub const HOT_KEYS: u64 = 5;

/// Derives an independent sub-seed (splitmix64 of the root and a stream number), so that one
/// component drawing more does not reshuffle the others.
pub fn sub_seed(root: u64, stream: u64) -> u64 {
    let mut z = root ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A number in `0..n` (0 when `n` is 0).
pub fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        rng.next_u64() % n
    }
}

/// A number in `[0, 1)`.
pub fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The next write of the workload: a key (from the hot keys with probability `conflict-share`,
/// else skewed over all keys) and a command of the key's type (each key has one, chosen by the
/// mix; 2% of writes draw a type from the mix again, often another, to exercise type conflicts
/// and `WRONGTYPE`).
pub fn next_command(w: &Workload, rng: &mut ChaCha8Rng, names: &mut Names) -> (Bytes, Command) {
    let index = if unit(rng) < w.conflict_share {
        below(rng, HOT_KEYS.min(w.keys))
    } else {
        // Skewed choice: u^(1/(1-skew)) leans towards 0 as skew grows.
        let u = unit(rng).powf(1.0 / (1.0 - w.skew));
        ((u * w.keys as f64) as u64).min(w.keys.saturating_sub(1))
    };
    let m = &w.mix;
    let (string, counter, set, hash) = (
        u64::from(m.string),
        u64::from(m.counter),
        u64::from(m.set),
        u64::from(m.hash),
    );
    let total = (string + counter + set + hash).max(1);
    let pick = if below(rng, 50) == 0 {
        below(rng, total)
    } else {
        sub_seed(index, 7) % total
    };
    let key = names.key(index);
    let choice = below(rng, 20);
    let member = |rng: &mut ChaCha8Rng| named(&MEMBERS, rng);
    let command = if pick < string {
        match choice {
            0 => Command::Delete,
            _ => Command::Set(names.value(rng.next_u64() % 1000)),
        }
    } else if pick < string + counter {
        match choice {
            0 => Command::Delete,
            _ => Command::IncrBy(below(rng, 15) as i64 - 5),
        }
    } else if pick < string + counter + set {
        match choice {
            0 => Command::Delete,
            1..=6 => Command::SetRemove(vec![member(rng)]),
            _ => Command::SetAdd(vec![member(rng), member(rng)]),
        }
    } else {
        let field = |rng: &mut ChaCha8Rng| named(&FIELDS, rng);
        match choice {
            0 => Command::Delete,
            1..=5 => Command::HashDelete(vec![field(rng)]),
            _ => Command::HashSet(vec![(field(rng), names.field_value(rng.next_u64() % 100))]),
        }
    };
    (key, command)
}

/// Names a workload caches, per kind: its keys, and values, below this number. Beyond it each
/// is made afresh (a scenario may name millions of keys).
const NAMES_CACHED_MAX: u64 = 65_536;

/// The kinds of names, each numbered: keys `k0`, `k1`, ...; string values `v0`, ...; hash field
/// values `0`, ...
const KINDS: [&str; 3] = ["k", "v", ""];

/// Every name made so far below [`NAMES_CACHED_MAX`], per kind, for the life of the process:
/// static bytes that every run and thread shares, and that cost no reference count to copy or
/// drop (a run copies a key or value for every write, and stores the copies in its regions'
/// change logs). Bounded: at most `NAMES_CACHED_MAX` per kind, each a few bytes, about 6 MB
/// with every slot filled.
static INTERNED: Mutex<[Vec<Option<&'static [u8]>>; 3]> =
    Mutex::new([Vec::new(), Vec::new(), Vec::new()]);

/// The keys and values a workload writes, each made once and shared after: a run draws a key
/// and most often a value for every write, from few distinct ones (its keys, a thousand string
/// values, a hundred hash values). Names are interned for the process ([`INTERNED`]); a
/// `Names` keeps those its run has used, so that drawing one takes no lock.
#[derive(Debug, Default)]
pub struct Names {
    kinds: [Vec<Option<&'static [u8]>>; 3],
}

impl Names {
    /// Key number `n`: `k` and `n` in decimal.
    pub fn key(&mut self, n: u64) -> Bytes {
        self.cached(0, n)
    }

    /// String value number `n`: `v` and `n` in decimal.
    pub fn value(&mut self, n: u64) -> Bytes {
        self.cached(1, n)
    }

    /// Hash field value number `n`: `n` in decimal.
    pub fn field_value(&mut self, n: u64) -> Bytes {
        self.cached(2, n)
    }

    fn cached(&mut self, kind: usize, n: u64) -> Bytes {
        if n >= NAMES_CACHED_MAX {
            return numbered(KINDS[kind], n);
        }
        let at = n as usize;
        let name = *slot(&mut self.kinds[kind], at).get_or_insert_with(|| interned(kind, at));
        Bytes::from_static(name)
    }
}

/// Name `at` of `kind`, made and interned by the first run that asks for it.
fn interned(kind: usize, at: usize) -> &'static [u8] {
    // A thread that panicked while holding the lock left every slot it filled whole.
    let mut all = INTERNED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    slot(&mut all[kind], at).get_or_insert_with(|| {
        let name = numbered(KINDS[kind], at as u64);
        Box::leak(name.to_vec().into_boxed_slice())
    })
}

/// Slot `at` of a table of names, the table grown to hold it.
fn slot<'t>(names: &'t mut Vec<Option<&'static [u8]>>, at: usize) -> &'t mut Option<&'static [u8]> {
    if names.len() <= at {
        names.resize(at + 1, None);
    }
    &mut names[at]
}

/// The set members a workload writes: static, so that they cost no allocation to make, copy or
/// store.
const MEMBERS: [&str; 8] = ["m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7"];

/// The hash fields a workload writes.
const FIELDS: [&str; 5] = ["f0", "f1", "f2", "f3", "f4"];

/// One of `names`, drawn as `numbered` would draw its number.
fn named(names: &[&'static str], rng: &mut ChaCha8Rng) -> Bytes {
    let at = below(rng, names.len() as u64) as usize;
    Bytes::from_static(names[at].as_bytes())
}

/// `prefix` followed by `n` in decimal, as `format!("{prefix}{n}")` writes it, without the
/// formatting machinery: the simulator draws several of these per write.
fn numbered(prefix: &str, n: u64) -> Bytes {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(n);
    let mut bytes = Vec::with_capacity(prefix.len() + digits.len());
    bytes.extend_from_slice(prefix.as_bytes());
    bytes.extend_from_slice(digits.as_bytes());
    Bytes::from(bytes)
}

/// The RESP command (argument list) that performs `command` on `key`.
pub fn resp_args(key: &Bytes, command: &Command) -> Vec<Bytes> {
    let verb = |v: &'static str| Bytes::from_static(v.as_bytes());
    let mut args = Vec::new();
    match command {
        Command::Set(value) => args.extend([verb("SET"), key.clone(), value.clone()]),
        Command::Delete => args.extend([verb("DEL"), key.clone()]),
        Command::IncrBy(n) => {
            args.extend([verb("INCRBY"), key.clone(), Bytes::from(n.to_string())])
        }
        Command::SetAdd(members) => {
            args.extend([verb("SADD"), key.clone()]);
            args.extend(members.iter().cloned());
        }
        Command::SetRemove(members) => {
            args.extend([verb("SREM"), key.clone()]);
            args.extend(members.iter().cloned());
        }
        Command::HashSet(pairs) => {
            args.extend([verb("HSET"), key.clone()]);
            for (field, value) in pairs {
                args.extend([field.clone(), value.clone()]);
            }
        }
        Command::HashDelete(fields) => {
            args.extend([verb("HDEL"), key.clone()]);
            args.extend(fields.iter().cloned());
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Mix;
    use rand_core::SeedableRng;

    #[test]
    fn named_members_and_fields_are_the_numbered_ones() {
        for (names, prefix) in [(&MEMBERS[..], "m"), (&FIELDS[..], "f")] {
            for (n, name) in names.iter().enumerate() {
                assert_eq!(
                    Bytes::from_static(name.as_bytes()),
                    numbered(prefix, n as u64)
                );
            }
        }
    }

    #[test]
    fn cached_names_are_the_numbered_ones_below_the_bound_and_above_it() {
        let mut names = Names::default();
        for n in [0, 1, 999, NAMES_CACHED_MAX - 1, NAMES_CACHED_MAX, u64::MAX] {
            for _ in 0..2 {
                assert_eq!(names.key(n), numbered("k", n));
                assert_eq!(names.value(n), numbered("v", n));
                assert_eq!(names.field_value(n), numbered("", n));
            }
        }
        assert_eq!(names.kinds[0].len(), NAMES_CACHED_MAX as usize, "bounded");
        // Interned: two runs share the same bytes; beyond the bound each name is its own.
        let mut other = Names::default();
        assert_eq!(names.key(7).as_ptr(), other.key(7).as_ptr());
        assert_eq!(names.value(7).as_ptr(), other.value(7).as_ptr());
        let beyond = NAMES_CACHED_MAX + 1;
        assert_ne!(names.key(beyond).as_ptr(), other.key(beyond).as_ptr());
    }

    #[test]
    fn numbered_writes_what_format_writes() {
        for n in [0, 7, 10, 99, 1000, 12_345, u64::MAX] {
            assert_eq!(numbered("k", n), Bytes::from(format!("k{n}")));
            assert_eq!(numbered("", n), Bytes::from(n.to_string()));
        }
    }

    fn workload() -> Workload {
        Workload {
            rate_per_region: 100,
            keys: 40,
            skew: 0.5,
            mix: Mix::default(),
            conflict_share: 0.2,
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_commands() {
        let w = workload();
        let mut a = ChaCha8Rng::seed_from_u64(9);
        let mut b = ChaCha8Rng::seed_from_u64(9);
        let mut names = Names::default();
        for _ in 0..1000 {
            // Names made once and kept, or made afresh every time: the same commands.
            assert_eq!(
                next_command(&w, &mut a, &mut names),
                next_command(&w, &mut b, &mut Names::default())
            );
        }
    }

    #[test]
    fn every_type_and_delete_appear_and_map_to_resp() {
        let w = workload();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut verbs = std::collections::BTreeSet::new();
        let mut names = Names::default();
        for _ in 0..5000 {
            let (key, command) = next_command(&w, &mut rng, &mut names);
            let args = resp_args(&key, &command);
            assert_eq!(args[1], key);
            verbs.insert(String::from_utf8(args[0].to_vec()).unwrap());
        }
        let all = ["DEL", "HDEL", "HSET", "INCRBY", "SADD", "SET", "SREM"];
        assert_eq!(verbs.into_iter().collect::<Vec<_>>(), all);
    }
}
