//! The worked examples of docs/conflicts.md, one test each, under the same names as there.
//! Three regions a, b, c; each example issues concurrent operations, delivers everything, and
//! checks every region holds the stated value, which is also what the oracle computes.

mod common;

use braid_conflict::{Command, CommandError, NodeId, Value, ValueType};
use common::{b, hash_value, oracle_of, set_value, Event, Replica};

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const C: NodeId = NodeId(3);

struct Regions {
    a: Replica,
    b: Replica,
    c: Replica,
    events: Vec<Event>,
}

impl Regions {
    fn new() -> Regions {
        Regions {
            a: Replica::new(A),
            b: Replica::new(B),
            c: Replica::new(C),
            events: Vec::new(),
        }
    }

    fn region(&mut self, node: NodeId) -> &mut Replica {
        match node {
            A => &mut self.a,
            B => &mut self.b,
            _ => &mut self.c,
        }
    }

    /// A write in one region at time `ms`, not yet delivered anywhere else.
    fn write(&mut self, node: NodeId, key: &str, command: Command, ms: u64) {
        let event = self.region(node).write(key, command, ms);
        self.events.push(event);
    }

    /// Delivers every event to every region that lacks it, in issue order per origin.
    fn sync(&mut self, ms: u64) {
        for node in [A, B, C] {
            let events = self.events.clone();
            let replica = self.region(node);
            for event in events.iter().filter(|e| e.origin != node) {
                let done = replica.applied.get(&event.origin).copied().unwrap_or(0);
                let index = events
                    .iter()
                    .filter(|e| e.origin == event.origin)
                    .position(|e| e.hlc == event.hlc);
                if index.is_some_and(|i| i >= done) {
                    replica.receive(event, ms);
                    *replica.applied.entry(event.origin).or_default() += 1;
                }
            }
        }
    }

    /// Checks every region and the oracle agree on `key`, and returns the value.
    fn converged(&mut self, key: &str) -> Option<Value> {
        self.sync(1_000_000);
        let value = self.a.value(key);
        assert_eq!(self.b.value(key), value, "b differs from a");
        assert_eq!(self.c.value(key), value, "c differs from a");
        assert_eq!(self.a.state(key), self.b.state(key));
        assert_eq!(self.a.state(key), self.c.state(key));
        assert_eq!(
            oracle_of(&self.events).get(key.as_bytes()).cloned(),
            value,
            "oracle differs"
        );
        value
    }
}

#[test]
fn string_concurrent_sets_greatest_hlc_wins() {
    let mut r = Regions::new();
    r.write(A, "k", Command::Set(b("from-a")), 100);
    r.write(B, "k", Command::Set(b("from-b")), 105);
    r.write(C, "k", Command::Set(b("from-c")), 103);
    assert_eq!(r.converged("k"), Some(Value::String(b("from-b"))));
}

#[test]
fn string_equal_times_node_id_breaks_the_tie() {
    let mut r = Regions::new();
    r.write(A, "k", Command::Set(b("from-a")), 100);
    r.write(C, "k", Command::Set(b("from-c")), 100);
    assert_eq!(r.converged("k"), Some(Value::String(b("from-c"))));
}

#[test]
fn string_delete_beats_an_older_concurrent_set() {
    let mut r = Regions::new();
    r.write(A, "k", Command::Set(b("v1")), 100);
    r.sync(101);
    r.write(B, "k", Command::Set(b("v2")), 110);
    r.write(A, "k", Command::Delete, 120);
    assert_eq!(r.converged("k"), None);
}

#[test]
fn string_set_newer_than_a_concurrent_delete_survives() {
    let mut r = Regions::new();
    r.write(A, "k", Command::Set(b("v1")), 100);
    r.sync(101);
    r.write(A, "k", Command::Delete, 120);
    r.write(B, "k", Command::Set(b("v2")), 130);
    assert_eq!(r.converged("k"), Some(Value::String(b("v2"))));
}

#[test]
fn counter_concurrent_increments_add_up() {
    let mut r = Regions::new();
    r.write(A, "n", Command::IncrBy(5), 100);
    r.write(B, "n", Command::IncrBy(-2), 100);
    r.write(C, "n", Command::IncrBy(10), 100);
    r.write(C, "n", Command::IncrBy(1), 101);
    assert_eq!(r.converged("n"), Some(Value::Counter(14)));
}

#[test]
fn counter_delete_removes_what_it_saw_and_a_concurrent_increment_survives() {
    let mut r = Regions::new();
    r.write(A, "n", Command::IncrBy(5), 100);
    r.sync(101);
    r.write(B, "n", Command::IncrBy(3), 110);
    r.write(A, "n", Command::Delete, 120);
    assert_eq!(r.converged("n"), Some(Value::Counter(3)));
}

#[test]
fn set_add_wins_over_a_concurrent_remove() {
    let mut r = Regions::new();
    r.write(A, "s", Command::SetAdd(vec![b("x"), b("y")]), 100);
    r.sync(101);
    r.write(A, "s", Command::SetRemove(vec![b("x")]), 110);
    r.write(B, "s", Command::SetAdd(vec![b("x")]), 105);
    assert_eq!(r.converged("s"), Some(set_value(&["x", "y"])));
}

#[test]
fn set_remove_of_an_observed_member_removes_it_everywhere() {
    let mut r = Regions::new();
    r.write(A, "s", Command::SetAdd(vec![b("x"), b("y")]), 100);
    r.sync(101);
    r.write(B, "s", Command::SetRemove(vec![b("x")]), 110);
    assert_eq!(r.converged("s"), Some(set_value(&["y"])));
}

#[test]
fn set_delete_spares_a_concurrent_add() {
    let mut r = Regions::new();
    r.write(A, "s", Command::SetAdd(vec![b("x")]), 100);
    r.sync(101);
    r.write(A, "s", Command::Delete, 120);
    r.write(C, "s", Command::SetAdd(vec![b("z")]), 110);
    assert_eq!(r.converged("s"), Some(set_value(&["z"])));
}

#[test]
fn hash_fields_converge_independently() {
    let mut r = Regions::new();
    r.write(
        A,
        "h",
        Command::HashSet(vec![(b("f1"), b("a1")), (b("f2"), b("a2"))]),
        100,
    );
    r.write(
        B,
        "h",
        Command::HashSet(vec![(b("f2"), b("b2")), (b("f3"), b("b3"))]),
        105,
    );
    r.write(C, "h", Command::HashSet(vec![(b("f1"), b("c1"))]), 103);
    assert_eq!(
        r.converged("h"),
        Some(hash_value(&[("f1", "c1"), ("f2", "b2"), ("f3", "b3")]))
    );
}

#[test]
fn hash_field_delete_is_last_writer_wins() {
    let mut r = Regions::new();
    r.write(
        A,
        "h",
        Command::HashSet(vec![(b("f1"), b("v")), (b("f2"), b("v"))]),
        100,
    );
    r.sync(101);
    r.write(A, "h", Command::HashDelete(vec![b("f1"), b("f2")]), 110);
    r.write(B, "h", Command::HashSet(vec![(b("f2"), b("w"))]), 115);
    assert_eq!(r.converged("h"), Some(hash_value(&[("f2", "w")])));
}

#[test]
fn hash_delete_removes_fields_written_before_it() {
    let mut r = Regions::new();
    r.write(A, "h", Command::HashSet(vec![(b("f1"), b("v"))]), 100);
    r.sync(101);
    r.write(B, "h", Command::HashSet(vec![(b("f2"), b("early"))]), 105);
    r.write(A, "h", Command::Delete, 110);
    r.write(C, "h", Command::HashSet(vec![(b("f3"), b("late"))]), 120);
    assert_eq!(r.converged("h"), Some(hash_value(&[("f3", "late")])));
}

#[test]
fn type_conflict_the_type_written_last_is_visible() {
    let mut r = Regions::new();
    r.write(A, "k", Command::Set(b("text")), 100);
    r.write(B, "k", Command::SetAdd(vec![b("m")]), 90);
    r.write(B, "k", Command::SetAdd(vec![b("n")]), 110);
    assert_eq!(r.converged("k"), Some(set_value(&["m", "n"])));
    assert_eq!(
        r.a.command("k", Command::Set(b("again")), 200)
            .map(|(e, _)| e.is_some()),
        Ok(true),
        "SET replaces any type, as in Redis"
    );
}

#[test]
fn type_conflict_hidden_type_is_cleared_by_delete() {
    let mut r = Regions::new();
    r.write(A, "k", Command::IncrBy(4), 120);
    r.write(B, "k", Command::HashSet(vec![(b("f"), b("v"))]), 100);
    assert_eq!(r.converged("k"), Some(Value::Counter(4)));
    r.write(C, "k", Command::Delete, 130);
    assert_eq!(r.converged("k"), None);
}

#[test]
fn wrong_type_is_refused_as_redis_does() {
    let mut r = Regions::new();
    r.write(A, "s", Command::SetAdd(vec![b("x")]), 100);
    for command in [Command::IncrBy(1), Command::HashSet(vec![(b("f"), b("v"))])] {
        assert_eq!(
            r.a.command("s", command, 101).map(|(e, _)| e.is_some()),
            Err(CommandError::WrongType {
                held: ValueType::Set
            })
        );
    }
}

#[test]
fn set_over_a_counter_replaces_it() {
    let mut r = Regions::new();
    r.write(A, "k", Command::IncrBy(7), 100);
    r.sync(101);
    r.write(B, "k", Command::Set(b("seven")), 110);
    assert_eq!(r.converged("k"), Some(Value::String(b("seven"))));
}

#[test]
fn incr_on_a_string_holding_an_integer_stays_a_string() {
    let mut r = Regions::new();
    r.write(A, "k", Command::Set(b("41")), 100);
    r.sync(101);
    let (event, reply) = r.b.command("k", Command::IncrBy(1), 110).unwrap();
    r.events.push(event.unwrap());
    assert_eq!(reply, 42);
    assert_eq!(r.converged("k"), Some(Value::String(b("42"))));
    r.write(A, "t", Command::Set(b("4x")), 120);
    assert_eq!(
        r.a.command("t", Command::IncrBy(1), 121)
            .map(|(e, _)| e.is_some()),
        Err(CommandError::NotAnInteger)
    );
}

#[test]
fn incr_past_i64_is_refused() {
    let mut r = Regions::new();
    r.write(A, "n", Command::IncrBy(i64::MAX), 100);
    assert_eq!(
        r.a.command("n", Command::IncrBy(1), 101)
            .map(|(e, _)| e.is_some()),
        Err(CommandError::Overflow)
    );
}

#[test]
fn replies_count_what_changed() {
    let mut r = Regions::new();
    let mut reply = |key: &str, command: Command| r.a.command(key, command, 100).unwrap().1;
    assert_eq!(reply("s", Command::SetAdd(vec![b("x"), b("y"), b("x")])), 2);
    assert_eq!(reply("s", Command::SetAdd(vec![b("x"), b("z")])), 1);
    assert_eq!(reply("s", Command::SetRemove(vec![b("x"), b("q")])), 1);
    assert_eq!(
        reply(
            "h",
            Command::HashSet(vec![(b("f"), b("1")), (b("g"), b("2"))])
        ),
        2
    );
    assert_eq!(reply("h", Command::HashSet(vec![(b("f"), b("3"))])), 0);
    assert_eq!(reply("h", Command::HashDelete(vec![b("f"), b("nope")])), 1);
    assert_eq!(reply("s", Command::Delete), 1);
    assert_eq!(reply("s", Command::Delete), 0);
    assert_eq!(reply("n", Command::IncrBy(5)), 5);
    assert_eq!(reply("n", Command::IncrBy(-7)), -2);
}
