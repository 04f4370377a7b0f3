//! Property tests of the merge semantics: convergence under any delivery order with duplicates,
//! the merge laws, agreement of op-based and state-based replication, and the oracle.
//! Each runs at least 1,000 cases (`PROPTEST_CASES` raises it).

mod common;

use std::collections::BTreeMap;

use braid_conflict::{Command, Hlc, NodeId};
use bytes::Bytes;
use common::{b, oracle_of, Event, Replica};
use proptest::prelude::*;

const REPLICAS: usize = 3;
const KEYS: [&str; 3] = ["k0", "k1", "k2"];
const MEMBERS: [&str; 4] = ["a", "b", "c", "d"];

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
        .max(1_000)
}

fn members() -> impl Strategy<Value = Vec<Bytes>> {
    prop::collection::vec(prop::sample::select(&MEMBERS[..]).prop_map(b), 1..3)
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        3 => prop::sample::select(&["x", "y", "7", "-2"][..]).prop_map(|v| Command::Set(b(v))),
        3 => (-3i64..=5).prop_map(Command::IncrBy),
        3 => members().prop_map(Command::SetAdd),
        2 => members().prop_map(Command::SetRemove),
        2 => prop::collection::vec(
            (prop::sample::select(&MEMBERS[..]).prop_map(b), prop::sample::select(&["1", "2"][..]).prop_map(b)),
            1..3,
        )
        .prop_map(Command::HashSet),
        1 => members().prop_map(Command::HashDelete),
        2 => Just(Command::Delete),
    ]
}

#[derive(Clone, Debug)]
enum Step {
    /// A replica runs a command on a key.
    Command {
        replica: usize,
        key: usize,
        command: Command,
    },
    /// A replica applies the next event of an origin it has not applied yet.
    Deliver { to: usize, from: usize },
    /// A replica applies again an event of an origin it already applied.
    Duplicate { to: usize, from: usize, back: usize },
    /// Physical time moves on.
    Tick(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..REPLICAS, 0..KEYS.len(), command())
            .prop_map(|(replica, key, command)| Step::Command { replica, key, command }),
        4 => (0..REPLICAS, 0..REPLICAS).prop_map(|(to, from)| Step::Deliver { to, from }),
        1 => (0..REPLICAS, 0..REPLICAS, 0..8usize)
            .prop_map(|(to, from, back)| Step::Duplicate { to, from, back }),
        1 => (0..20u64).prop_map(Step::Tick),
    ]
}

/// A mesh of replicas mid-run, with every origin's events in the order it issued them.
struct Mesh {
    replicas: Vec<Replica>,
    log: Vec<Vec<Event>>,
    now_ms: u64,
    skew_ms: Vec<u64>,
    /// Per replica, the greatest stable HLC it collected tombstones at.
    collected: Vec<Hlc>,
}

impl Mesh {
    fn new(skew_ms: Vec<u64>) -> Mesh {
        Mesh {
            replicas: (0..REPLICAS)
                .map(|i| Replica::new(NodeId(i as u64 + 1)))
                .collect(),
            log: vec![Vec::new(); REPLICAS],
            now_ms: 1_000,
            skew_ms,
            collected: vec![Hlc::ZERO; REPLICAS],
        }
    }

    fn local_ms(&self, replica: usize) -> u64 {
        self.now_ms + self.skew_ms[replica]
    }

    fn applied(&self, to: usize, from: usize) -> usize {
        self.replicas[to]
            .applied
            .get(&NodeId(from as u64 + 1))
            .copied()
            .unwrap_or(0)
    }

    fn deliver(&mut self, to: usize, from: usize) -> bool {
        let next = self.applied(to, from);
        let Some(event) = self.log[from].get(next).cloned() else {
            return false;
        };
        let now = self.local_ms(to);
        let replica = &mut self.replicas[to];
        replica.receive(&event, now);
        replica.applied.insert(event.origin, next + 1);
        true
    }

    fn run(&mut self, step: &Step) {
        match step {
            Step::Command {
                replica,
                key,
                command,
            } => {
                let now = self.local_ms(*replica);
                if let Ok((Some(event), _)) =
                    self.replicas[*replica].command(KEYS[*key], command.clone(), now)
                {
                    self.log[*replica].push(event);
                }
            }
            Step::Deliver { to, from } if to != from => {
                self.deliver(*to, *from);
            }
            Step::Duplicate { to, from, back } => {
                let applied = self.applied(*to, *from);
                if applied > 0 {
                    let event = self.log[*from][applied - 1 - back % applied].clone();
                    let now = self.local_ms(*to);
                    self.replicas[*to].receive(&event, now);
                }
            }
            Step::Tick(ms) => self.now_ms += ms,
            Step::Deliver { .. } => {}
        }
    }

    /// Delivers everything left, interleaving origins in the order `order` suggests.
    fn deliver_all(&mut self, order: &[usize]) {
        let mut choices = order.iter().cycle();
        for to in 0..REPLICAS {
            loop {
                let pending: Vec<usize> = (0..REPLICAS)
                    .filter(|&from| from != to && self.applied(to, from) < self.log[from].len())
                    .collect();
                if pending.is_empty() {
                    break;
                }
                let pick = pending[choices.next().copied().unwrap_or(0) % pending.len()];
                self.deliver(to, pick);
            }
        }
    }

    fn all_events(&self) -> Vec<Event> {
        self.log.iter().flatten().cloned().collect()
    }
}

impl Mesh {
    /// Whether `step` re-delivers, to a replica that collected tombstones, an event at or
    /// below the stable HLC it collected at. The protocol never applies such an event again
    /// (the replica's vector drops every duplicate), and collection relies on it; above that
    /// HLC a duplicate must stay harmless.
    fn duplicates_a_collected_event(&self, step: &Step) -> bool {
        let Step::Duplicate { to, from, back } = step else {
            return false;
        };
        let applied = self.applied(*to, *from);
        applied > 0 && self.log[*from][applied - 1 - back % applied].hlc <= self.collected[*to]
    }

    /// The greatest HLC below every event some replica has not applied yet, and below every
    /// event an origin will issue: what the control plane's stable HLC approximates from below.
    fn stable_hlc(&self) -> Hlc {
        (0..REPLICAS)
            .map(|origin| {
                let least = (0..REPLICAS)
                    .map(|to| match to == origin {
                        true => self.log[origin].len(),
                        false => self.applied(to, origin),
                    })
                    .min()
                    .unwrap_or(0);
                match least == self.log[origin].len() {
                    true => self.replicas[origin].clock.last(),
                    false if least == 0 => Hlc::ZERO,
                    false => self.log[origin][least - 1].hlc,
                }
            })
            .min()
            .unwrap_or(Hlc::ZERO)
    }

    /// One replica drops the tombstones at or below the stable HLC, and forgets keys left
    /// empty, as a replica's garbage collection does.
    fn collect(&mut self, replica: usize) {
        let stable = self.stable_hlc();
        self.collected[replica] = self.collected[replica].max(stable);
        let keys = &mut self.replicas[replica].keys;
        for state in keys.values_mut() {
            state.collect_tombstones(stable);
        }
        keys.retain(|_, state| !state.is_empty());
    }
}

/// Steps with, now and then, one replica collecting its stable tombstones.
fn steps_with_collection() -> impl Strategy<Value = Vec<(Step, Option<usize>)>> {
    prop::collection::vec((step(), prop::option::weighted(0.15, 0..REPLICAS)), 1..80)
}

fn scenario() -> impl Strategy<Value = (Vec<u64>, Vec<Step>, Vec<usize>)> {
    (
        prop::collection::vec(0..50u64, REPLICAS),
        prop::collection::vec(step(), 1..80),
        prop::collection::vec(0..REPLICAS, 1..16),
    )
}

/// Builds a replica from scratch by applying, per origin, the first `prefix[origin]` events, with
/// origins interleaved round-robin.
fn replay(node: NodeId, log: &[Vec<Event>], prefix: &BTreeMap<NodeId, usize>) -> Replica {
    let mut replica = Replica::new(node);
    let mut cursor = vec![0usize; log.len()];
    loop {
        let mut progressed = false;
        for (origin, events) in log.iter().enumerate() {
            let limit = prefix.get(&NodeId(origin as u64 + 1)).copied().unwrap_or(0);
            if cursor[origin] < limit {
                let event = &events[cursor[origin]];
                replica
                    .keys
                    .entry(event.key.clone())
                    .or_default()
                    .apply(&event.op, event.hlc);
                cursor[origin] += 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    replica
}

fn merged(a: &Replica, b: &Replica) -> Replica {
    let mut out = a.clone();
    out.merge_from(b);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Any interleaving of origins, with duplicates anywhere, ends in identical states that equal
    /// the oracle.
    #[test]
    fn any_delivery_order_with_duplicates_converges_to_the_oracle((skew, steps, order) in scenario()) {
        let mut mesh = Mesh::new(skew);
        for step in &steps {
            mesh.run(step);
        }
        mesh.deliver_all(&order);
        let first = &mesh.replicas[0];
        for other in &mesh.replicas[1..] {
            prop_assert_eq!(&first.keys, &other.keys);
        }
        prop_assert_eq!(first.values(), oracle_of(&mesh.all_events()));
    }

    /// The oracle gathers operations in any order, duplicates included, to the same values:
    /// what lets the simulator feed it each write as it is made.
    #[test]
    fn the_oracle_gathers_operations_in_any_order((skew, steps, _order) in scenario()) {
        let mut mesh = Mesh::new(skew);
        for step in &steps {
            mesh.run(step);
        }
        let events = mesh.all_events();
        let mut gathered = braid_conflict::oracle::Oracle::default();
        for e in events.iter().rev().chain(events.iter().step_by(2)) {
            gathered.add(&e.key, e.hlc, &e.op);
        }
        prop_assert_eq!(gathered.values(), oracle_of(&events));
    }

    /// Tombstones collected at the stable HLC, by any replica at any time, change nothing a
    /// client sees: every replica still ends with the oracle's values, and once every replica
    /// has collected at the end, all hold identical states, equal to those of a mesh that ran
    /// the same steps and collected only at the end.
    #[test]
    fn collecting_stable_tombstones_changes_no_outcome(
        skew in prop::collection::vec(0..50u64, REPLICAS),
        steps in steps_with_collection(),
        order in prop::collection::vec(0..REPLICAS, 1..16),
    ) {
        let mut collecting = Mesh::new(skew.clone());
        let mut plain = Mesh::new(skew);
        for (step, collect) in &steps {
            if collecting.duplicates_a_collected_event(step) {
                continue; // skipped by both meshes, which run the same events
            }
            collecting.run(step);
            plain.run(step);
            if let Some(replica) = collect {
                collecting.collect(*replica);
            }
        }
        collecting.deliver_all(&order);
        plain.deliver_all(&order);
        let oracle = oracle_of(&collecting.all_events());
        for replica in &collecting.replicas {
            prop_assert_eq!(replica.values(), oracle.clone());
        }
        for replica in 0..REPLICAS {
            collecting.collect(replica);
            plain.collect(replica);
        }
        for (ours, theirs) in collecting.replicas.iter().zip(&plain.replicas) {
            prop_assert_eq!(&ours.keys, &collecting.replicas[0].keys);
            prop_assert_eq!(&ours.keys, &theirs.keys);
            prop_assert!(ours.keys.values().all(|s| s.oldest_tombstone().is_none()));
        }
    }

    /// Merge is commutative, associative and idempotent on replica states taken mid-run.
    #[test]
    fn merge_is_commutative_associative_idempotent((skew, steps, _order) in scenario()) {
        let mut mesh = Mesh::new(skew);
        for step in &steps {
            mesh.run(step);
        }
        let [a, b, c] = [&mesh.replicas[0], &mesh.replicas[1], &mesh.replicas[2]];
        prop_assert_eq!(&merged(a, b).keys, &merged(b, a).keys);
        prop_assert_eq!(&merged(&merged(a, b), c).keys, &merged(a, &merged(b, c)).keys);
        prop_assert_eq!(&merged(a, a).keys, &a.keys);
    }

    /// Op-based and state-based replication agree: merging two replicas gives the state of a
    /// replica that applied the union of their operations.
    #[test]
    fn merge_equals_applying_the_union_of_operations((skew, steps, _order) in scenario()) {
        let mut mesh = Mesh::new(skew);
        for step in &steps {
            mesh.run(step);
        }
        for (i, j) in [(0, 1), (1, 2), (0, 2)] {
            let state = merged(&mesh.replicas[i], &mesh.replicas[j]);
            let ops = replay(NodeId(99), &mesh.log, &state.applied);
            prop_assert_eq!(&state.keys, &ops.keys);
        }
    }

    /// Applying an operation, then merging, equals merging, then applying it.
    #[test]
    fn apply_then_merge_equals_merge_then_apply((skew, steps, _order) in scenario(), origin in 0..REPLICAS) {
        let mut mesh = Mesh::new(skew);
        for step in &steps {
            mesh.run(step);
        }
        let (a, b) = (&mesh.replicas[(origin + 1) % REPLICAS], &mesh.replicas[(origin + 2) % REPLICAS]);
        let next = a.applied.get(&NodeId(origin as u64 + 1)).copied().unwrap_or(0);
        if let Some(event) = mesh.log[origin].get(next) {
            let mut applied_first = a.clone();
            applied_first.keys.entry(event.key.clone()).or_default().apply(&event.op, event.hlc);
            applied_first.merge_from(b);
            let mut merged_first = merged(a, b);
            merged_first.keys.entry(event.key.clone()).or_default().apply(&event.op, event.hlc);
            prop_assert_eq!(&applied_first.keys, &merged_first.keys);
        }
    }

    /// Every operation `prepare` issues passes validation, and its wire shape is canonical.
    #[test]
    fn prepared_operations_are_valid((skew, steps, _order) in scenario()) {
        let mut mesh = Mesh::new(skew);
        for step in &steps {
            mesh.run(step);
        }
        for event in mesh.all_events() {
            prop_assert!(event.op.validate().is_ok(), "{:?}", event.op);
        }
    }
}
