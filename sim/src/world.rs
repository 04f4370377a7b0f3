//! The simulated world: regions running the real replica core, a network that delays, loses,
//! duplicates and reorders encoded messages, a workload, a timeline of faults, and the checkers.
//!
//! ```text
//!   seed ─► sub-seeds (network, workload, connections)
//!   event queue (virtual time, insertion order) ─► Write | Deliver | Tick | Fault | Connect | End
//!      Write   ─► Replica::handle_commands ─► acknowledged events (for the oracle)
//!      Deliver ─► frame::decode ─► Replica::handle_message
//!      every output ─► frame::encode ─► network ─► Deliver later (or never)
//!   Tick    ─► the control plane (crate::control): Raft runs up to now on tokio's paused
//!              clock; checkpoints proposed, the committed stable frontier trims the logs
//!   after the workload: heal, restart, run to quiescence ─► checkers ─► Report
//! ```
//!
//! Everything is a function of the scenario and the seed: one thread, seeded generators, virtual
//! time, ordered maps. The trace hash proves it run by run.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::hash::Hasher;
use std::time::Instant;

use braid_conflict::oracle::Oracle;
use braid_conflict::{Command, Value};
use braid_protocol::control::{ControlCommand, MemberState, TopologySpec};
use braid_protocol::frame;
use braid_protocol::limits::SNAPSHOT_CHUNK_KEYS_MAX;
use braid_protocol::{
    ChangeEvent, Message, NodeId, PeerError, Replica, ReplicaConfig, Seq, SnapshotEntry,
    StreamKind, Topology, Transmit, VersionVector,
};
use bytes::Bytes;
use hdrhistogram::Histogram;
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use serde::Serialize;

use crate::control::{ControlBugs, ControlSim, NetSettings};
use crate::storage::{InjectedBug, SimStorage};
pub use braid_node::scenario::Verdict;
// Clients start writing at `WORKLOAD_START_MS`, once the mesh has had time to connect
// (connections come up 100-300 ms after start), as `braid cluster up` waits for the mesh.
use braid_node::scenario::{
    Action, DurabilityMode, Scenario, CONVERGE_MS_DEFAULT, WORKLOAD_START_MS,
};
use braid_node::workload::{below, next_command, sub_seed, unit, Names};

/// Physical time of the simulation's start, as the nodes' clocks see it (ms since the epoch).
const EPOCH_MS: u64 = 1_700_000_000_000;
/// How often every node ticks, in simulated milliseconds.
const TICK_MS: u64 = 50;

/// How often a joining or leaving region asks the control plane again.
const JOIN_ASK_MS: u64 = 1_000;
/// How long a data snapshot takes to reach a region that was refused as behind.
const SNAPSHOT_MS: u64 = 200;
/// How long a broken connection takes to be re-established: 100 ms plus up to 200 ms.
const RECONNECT_MS_MIN: u64 = 100;
const RECONNECT_MS_JITTER: u64 = 200;
/// Wall-clock watchdog for one run: a run that takes longer is reported as failed.
const WALL_MS_MAX: u128 = 120_000;
/// The watchdog looks at the wall clock once every this many simulated events.
const WATCHDOG_STEPS: u64 = 1024;
/// After convergence, how long the control plane may run alone to apply what it committed
/// before its checkers look.
const RAFT_SETTLE_MS: u64 = 10_000;
/// Trace records are hashed in buffers of this many bytes.
const TRACE_BUFFER_BYTES: usize = 16 * 1024;
/// Numbers in a trace record at most, its time first.
const TRACE_RECORD_NUMBERS_MAX: usize = 6;
/// A trace record's bytes at most: bincode's varints of up to nine bytes each.
const TRACE_RECORD_BYTES_MAX: usize = TRACE_RECORD_NUMBERS_MAX * 9;

/// How to run a scenario.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The root seed.
    pub seed: u64,
    /// A bug to inject, proving the checkers bite.
    pub bug: Option<InjectedBug>,
    /// Keep the trace's text (for `--trace`), not only its hash.
    pub keep_trace: bool,
}

/// The outcome of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario.
    pub scenario: String,
    /// The seed.
    pub seed: u64,
    /// BLAKE3 of the trace: equal for equal scenario and seed.
    pub trace_hash: String,
    /// Whether every checker passed.
    pub passed: bool,
    /// Each checker.
    pub checkers: Vec<Verdict>,
    /// Acknowledged writes.
    pub writes: u64,
    /// Events applied in all regions (remote applies).
    pub events_applied: u64,
    /// Events sent over all links, divided by writes.
    pub messages_per_change: f64,
    /// From the end of the workload (everything healed) to convergence, simulated ms.
    pub convergence_ms: Option<u64>,
    /// Replication lag (origin commit to remote apply), simulated ms: p50, p99, max.
    pub lag_ms_p50: u64,
    /// 99th percentile.
    pub lag_ms_p99: u64,
    /// Maximum.
    pub lag_ms_max: u64,
    /// Data snapshots installed (regions that came back after the others' logs let go of what
    /// they lacked).
    pub snapshots_installed: u64,
    /// Terms in which the control plane had a leader.
    pub raft_elections: u64,
    /// Control-plane commands committed (checkpoints, the bootstrap).
    pub control_commits: u64,
    /// Change-log events deleted at the committed stable frontier, in all regions.
    pub log_events_collected: u64,
    /// Keys whose tombstones were dropped at the committed stable HLC, in all regions.
    pub tombstones_collected: u64,
    /// Acknowledged writes lost with power failures before their region synced or shipped
    /// them (`process` durability only): the RPO of those failures.
    pub writes_lost: u64,
    /// Leaders killed by `kill-leader`.
    pub leader_kills: u64,
    /// Simulated milliseconds run.
    pub sim_ms: u64,
    /// Wall-clock milliseconds taken.
    pub wall_ms: u64,
    /// The command that replays this run.
    pub replay: String,
    /// The trace, when asked for.
    #[serde(skip)]
    pub trace: Vec<String>,
}

/// Events by virtual time, then by the order they were scheduled in. The heap holds only those
/// two and a slot; the events wait in the slots, so that keeping the heap in order moves 24
/// bytes at a time rather than whole events.
#[derive(Debug, Default)]
struct Queue {
    heap: BinaryHeap<Reverse<(u64, u64, u32)>>,
    slots: Vec<Option<Event>>,
    /// Slots emptied by `pop`, reused by `push`.
    free: Vec<u32>,
}

impl Queue {
    fn push(&mut self, at_ms: u64, order: u64, event: Event) {
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(event);
                slot
            }
            None => {
                // Events in flight at once are bounded by the scenario's rates and windows,
                // far below this.
                assert!(
                    self.slots.len() < u32::MAX as usize,
                    "too many events in flight"
                );
                self.slots.push(Some(event));
                (self.slots.len() - 1) as u32
            }
        };
        self.heap.push(Reverse((at_ms, order, slot)));
    }

    /// The earliest event and its time.
    fn pop(&mut self) -> Option<(u64, Event)> {
        let Reverse((at_ms, _, slot)) = self.heap.pop()?;
        let event = self.slots[slot as usize].take();
        assert!(event.is_some(), "a queued slot holds its event");
        self.free.push(slot);
        event.map(|event| (at_ms, event))
    }
}

#[derive(Debug)]
enum Event {
    Write(usize),
    Tick,
    Deliver {
        from: usize,
        to: usize,
        kind: StreamKind,
        gen: u64,
        bytes: Bytes,
    },
    Fault(usize),
    /// The link `a`-`b` of a running `flap` goes down or up: only while `epoch` is the world's
    /// [`World::flap_epoch`], which `heal` and the end of the workload advance to stop every
    /// flap.
    Flap {
        a: usize,
        b: usize,
        period_ms: u64,
        until_ms: u64,
        epoch: u64,
    },
    Connect {
        sub: usize,
        publ: usize,
    },
    /// A data snapshot of `publ` reaches `sub`, which `publ` refused as behind its log.
    Snapshot {
        sub: usize,
        publ: usize,
    },
    /// A region that `kill-leader` took down starts again, unless it was killed again since (its
    /// `kills` moved on from this count): a later kill is another fault's, to end as it says.
    Restart {
        region: usize,
        kills: u64,
    },
    EndWorkload,
}

#[derive(Debug, Default)]
struct Stream {
    gen: u64,
    open: bool,
    connecting: bool,
    /// Latest scheduled delivery per direction (0: subscriber to publisher), for FIFO order.
    last_delivery: [u64; 2],
}

/// The streams between regions, by (subscriber, publisher): a table of every pair, looked up
/// for every message sent and delivered, where a B-tree took a search each time. Its keys come
/// out in the order a `BTreeMap` of the pairs gives them.
#[derive(Debug)]
struct Streams {
    regions: usize,
    table: Vec<Option<Stream>>,
}

impl Streams {
    fn new(regions: usize) -> Streams {
        Streams {
            regions,
            table: std::iter::repeat_with(|| None)
                .take(regions * regions)
                .collect(),
        }
    }

    fn index(&self, (sub, publ): (usize, usize)) -> Option<usize> {
        (sub < self.regions && publ < self.regions).then(|| sub * self.regions + publ)
    }

    fn insert(&mut self, key: (usize, usize), stream: Stream) {
        let Some(at) = self.index(key) else {
            panic!("a stream between two of the run's regions, not {key:?}");
        };
        self.table[at] = Some(stream);
    }

    fn get(&self, key: &(usize, usize)) -> Option<&Stream> {
        self.table[self.index(*key)?].as_ref()
    }

    fn get_mut(&mut self, key: &(usize, usize)) -> Option<&mut Stream> {
        let at = self.index(*key)?;
        self.table[at].as_mut()
    }

    /// Every pair with a stream, in (subscriber, publisher) order.
    fn keys(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.table.iter().enumerate().filter_map(|(at, stream)| {
            stream
                .as_ref()
                .map(|_| (at / self.regions, at % self.regions))
        })
    }
}

/// Where a region is in its membership of the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not part of the mesh yet (a `join` brings it in).
    Outside,
    /// Asked to join: admitted through the control plane, then its data snapshot.
    Joining,
    /// Replicating (it may be leaving).
    Member,
    /// Left: removed from the mesh, stopped for good.
    Gone,
}

struct Region {
    name: String,
    id: NodeId,
    replica: Option<Replica<SimStorage>>,
    parked: Option<SimStorage>,
    clock_offset_ms: i64,
    phase: Phase,
    /// It asked to leave (a `leave`); writes are refused once the control plane says it drains.
    leaving: bool,
    /// What it held when it began to drain: everyone staying must hold it before it goes.
    drain_vector: Option<VersionVector>,
    /// When it next asks the control plane again (to join, drain, activate or be removed).
    next_ask_ms: u64,
    /// Its process is down (killed, not yet restarted).
    down: bool,
    /// How many times it was killed.
    kills: u64,
    /// Its last stop was a power failure that lost commits (`process` durability): when it
    /// restarts, its replica is told it may have lost writes, as a node finds from the
    /// machine's new boot id.
    lost_on_power_fail: bool,
}

impl std::fmt::Debug for World<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("scenario", &self.scenario.name)
            .field("now_ms", &self.now_ms)
            .finish()
    }
}

/// A simulation run in progress.
pub struct World<'a> {
    scenario: &'a Scenario,
    options: RunOptions,
    topology: Topology,
    regions: Vec<Region>,
    queue: Queue,
    order: u64,
    now_ms: u64,
    net_rng: ChaCha8Rng,
    load_rng: ChaCha8Rng,
    /// The workload's keys and values, made once each.
    names: Names,
    conn_rng: ChaCha8Rng,
    streams: Streams,
    /// Links down, one way each: those `partitioned` and those `flapped` (kept apart so that
    /// a flap's turn up does not lift a partition running over the same link, as in a drill).
    cut: BTreeSet<(usize, usize)>,
    partitioned: BTreeSet<(usize, usize)>,
    flapped: BTreeSet<(usize, usize)>,
    slow: BTreeMap<(usize, usize), u64>,
    /// Acknowledged writes kept whole: in `process` durability only, where the oracle must
    /// leave out those a power failure took, which is known only at the end.
    acked: Vec<ChangeEvent>,
    /// The oracle, fed every acknowledged write as it is made (in `process` durability, from
    /// `acked` at the end).
    oracle: Oracle,
    /// How many writes were acknowledged.
    writes_acked: u64,
    /// A region's outputs while `drain` sends them (kept to be filled again).
    outputs: Vec<Transmit>,
    /// When each acknowledged write was made, by origin (at its node id, which is small: a
    /// region's place in the scenario, from 1), at its sequence number (`u64::MAX` where
    /// unknown). Looked up for every event applied.
    created_ms: Vec<Vec<u64>>,
    lag: Histogram<u64>,
    events_sent: u64,
    events_applied: u64,
    workload_over: bool,
    /// Per region, when its next write is due, in simulated microseconds (writes can be more
    /// frequent than one per millisecond).
    next_write_us: Vec<u64>,
    end_ms: u64,
    converged_at: Option<u64>,
    hasher: blake3::Hasher,
    /// Trace records not hashed yet: hashed a buffer at a time, which BLAKE3 does several times
    /// faster than record by record (and to the same hash).
    unhashed: Vec<u8>,
    trace: Vec<String>,
    /// Regions with a data snapshot on its way (one at a time each).
    resyncing: BTreeSet<usize>,
    /// Data snapshots installed.
    snapshots: u64,
    /// The control plane, while the run's runtime runs.
    control: Option<ControlSim>,
    /// What the control plane must do at the next chance: (region, start or kill).
    control_ops: Vec<(usize, bool)>,
    /// The world's cuts or slow links changed since the control plane's network last saw them.
    net_changed: bool,
    /// Flaps scheduled under an older epoch are over: `heal` and the end of the workload
    /// advance it.
    flap_epoch: u64,
    log_events_collected: u64,
    tombstones_collected: u64,
    leader_kills: u64,
    /// The latest committed topology seen (a restarted region opens with it).
    latest_topology: Topology,
    /// The storage of every region that left, by name.
    retired: Vec<(String, SimStorage)>,
}

/// The replica configuration of region `node` under `scenario` (its retention bound).
fn replica_config(node: NodeId, scenario: &Scenario) -> ReplicaConfig {
    let mut config = ReplicaConfig::new(node);
    config.retention_events_max = scenario.change_log_retention_events;
    config
}

/// A region's physical clock at virtual time `now_ms`, skewed by `offset_ms`.
fn clock_ms(now_ms: u64, offset_ms: i64) -> u64 {
    (EPOCH_MS + now_ms).saturating_add_signed(offset_ms)
}

fn lag_histogram() -> Histogram<u64> {
    // Valid bounds: construction cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid histogram bounds")
}

impl<'a> World<'a> {
    /// Builds the world for a validated scenario.
    pub fn new(scenario: &'a Scenario, options: RunOptions) -> Result<World<'a>, String> {
        let ids: Vec<NodeId> = (1..=scenario.regions.len() as u64).map(NodeId).collect();
        let index_of = |name: &str| scenario.regions.iter().position(|r| r == name);
        let initial = scenario.initial_regions();
        let founders: Vec<NodeId> = ids
            .iter()
            .zip(&scenario.regions)
            .filter(|(_, name)| initial.contains(&name.as_str()))
            .map(|(id, _)| *id)
            .collect();
        let topology = match &scenario.links {
            None => Topology::full_mesh(founders.clone()),
            Some(links) => {
                let mut pairs = Vec::new();
                for [a, b] in links {
                    let (Some(x), Some(y)) = (index_of(a), index_of(b)) else {
                        return Err(format!("link {a}-{b} names an unknown region"));
                    };
                    pairs.push((ids[x], ids[y]));
                }
                Topology::with_links(ids.clone(), pairs)
            }
        }
        .map_err(|e| e.to_string())?;
        let seed = options.seed;
        let latest = topology.clone();
        let mut world = World {
            scenario,
            topology,
            regions: Vec::new(),
            queue: Queue::default(),
            order: 0,
            now_ms: 0,
            net_rng: ChaCha8Rng::seed_from_u64(sub_seed(seed, 1)),
            load_rng: ChaCha8Rng::seed_from_u64(sub_seed(seed, 2)),
            names: Names::default(),
            conn_rng: ChaCha8Rng::seed_from_u64(sub_seed(seed, 3)),
            streams: Streams::new(scenario.regions.len()),
            cut: BTreeSet::new(),
            partitioned: BTreeSet::new(),
            flapped: BTreeSet::new(),
            slow: BTreeMap::new(),
            acked: Vec::new(),
            oracle: Oracle::with_keys(scenario.workload.keys),
            writes_acked: 0,
            outputs: Vec::new(),
            created_ms: Vec::new(),
            lag: lag_histogram(),
            events_sent: 0,
            events_applied: 0,
            workload_over: false,
            next_write_us: vec![0; scenario.regions.len()],
            end_ms: scenario.duration_ms,
            converged_at: None,
            hasher: blake3::Hasher::new(),
            unhashed: Vec::with_capacity(TRACE_BUFFER_BYTES),
            trace: Vec::new(),
            resyncing: BTreeSet::new(),
            snapshots: 0,
            control: None,
            control_ops: Vec::new(),
            net_changed: false,
            flap_epoch: 0,
            log_events_collected: 0,
            tombstones_collected: 0,
            leader_kills: 0,
            latest_topology: latest,
            retired: Vec::new(),
            options,
        };
        for (i, name) in scenario.regions.iter().enumerate() {
            let founder = founders.contains(&ids[i]);
            let replica = match founder {
                true => Some(
                    Replica::open(
                        replica_config(ids[i], world.scenario),
                        world.topology.clone(),
                        world.new_storage(),
                        EPOCH_MS,
                    )
                    .map_err(|e| e.to_string())?,
                ),
                false => None,
            };
            world.regions.push(Region {
                name: name.clone(),
                id: ids[i],
                replica,
                parked: None,
                clock_offset_ms: 0,
                phase: if founder {
                    Phase::Member
                } else {
                    Phase::Outside
                },
                leaving: false,
                drain_vector: None,
                next_ask_ms: 0,
                down: false,
                kills: 0,
                lost_on_power_fail: false,
            });
        }
        // Streams for every pair that may ever be linked: the links given, or (with joins and
        // leaves, which need a full mesh) every pair; a stream opens only while both ends are
        // members that the topology links.
        let pairs: Vec<(usize, usize)> = match &scenario.links {
            Some(_) => world
                .topology
                .links()
                .map(|(a, b)| (a.0 as usize - 1, b.0 as usize - 1))
                .collect(),
            None => (0..ids.len())
                .flat_map(|a| (a + 1..ids.len()).map(move |b| (a, b)))
                .collect(),
        };
        for (a, b) in pairs {
            world.streams.insert((a, b), Stream::default());
            world.streams.insert((b, a), Stream::default());
        }
        Ok(world)
    }

    /// A region's storage, in the scenario's durability.
    fn new_storage(&self) -> SimStorage {
        let storage = SimStorage::new(self.options.bug);
        match self.scenario.durability {
            Some(DurabilityMode::Process) => storage.with_process_durability(),
            _ => storage,
        }
    }

    fn schedule(&mut self, at_ms: u64, event: Event) {
        self.order += 1;
        self.queue.push(at_ms, self.order, event);
    }

    /// Adds a record to the trace hash: the virtual time and the record's four words, each as
    /// one of bincode's varints (as the wire writes integers). A record is always five of them
    /// and a varint's first byte gives its length, so the bytes decode back to exactly one
    /// sequence of records; the words are mostly small, and this hashes about a fifth of the
    /// bytes that five whole `u64`s took. A trace kept as text (`--trace`) takes `text` too,
    /// given the regions' names by position.
    fn trace<const N: usize>(&mut self, record: [u64; N], text: impl FnOnce(&[String]) -> String) {
        const { assert!(N < TRACE_RECORD_NUMBERS_MAX) };
        let mut bytes = [0u8; TRACE_RECORD_BYTES_MAX];
        // An array is its elements, one varint each, as a tuple of them would be.
        let Ok(len) = bincode::encode_into_slice(
            (self.now_ms, record),
            &mut bytes,
            bincode::config::standard(),
        ) else {
            unreachable!("a record's varints fit its buffer")
        };
        self.unhashed.extend_from_slice(&bytes[..len]);
        if self.unhashed.len() >= TRACE_BUFFER_BYTES {
            self.hasher.update(&self.unhashed);
            self.unhashed.clear();
        }
        if self.options.keep_trace {
            self.keep_trace_line(text);
        }
    }

    /// Keeps a trace record's text (`--trace`). Out of line and marked cold: most runs keep no
    /// text, and the formatting code of every record would otherwise sit in the middle of the
    /// hot paths that trace, filling the instruction cache.
    #[cold]
    #[inline(never)]
    fn keep_trace_line(&mut self, text: impl FnOnce(&[String]) -> String) {
        let scenario = self.scenario;
        let line = format!("{:>8} {}", self.now_ms, text(&scenario.regions));
        self.trace.push(line);
    }

    fn local_ms(&self, region: usize) -> u64 {
        clock_ms(self.now_ms, self.regions[region].clock_offset_ms)
    }

    /// Runs to the end and checks, on a runtime of its own: one thread, tokio's clock paused
    /// and its scheduler seeded, so that the control plane's openraft runs deterministically.
    pub fn run(self) -> Result<Report, String> {
        let seed = self.options.seed;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .rng_seed(tokio::runtime::RngSeed::from_bytes(
                &sub_seed(seed, 4).to_le_bytes(),
            ))
            .build()
            .map_err(|e| format!("cannot build the simulator's runtime: {e}"))?;
        runtime.block_on(self.run_async())
    }

    async fn run_async(mut self) -> Result<Report, String> {
        let started = Instant::now();
        let topology = match &self.scenario.links {
            None => TopologySpec::FullMesh,
            Some(_) => TopologySpec::Links(self.topology.links().collect()),
        };
        let net = &self.scenario.network;
        let settings = NetSettings {
            latency_ms: (net.latency_ms_min, net.latency_ms_max),
            loss: net.loss,
            bugs: ControlBugs {
                grant_every_vote: self.options.bug == Some(InjectedBug::GrantEveryVote),
                drop_apply_every: (self.options.bug == Some(InjectedBug::DropControlApply))
                    .then_some(3),
            },
        };
        let seed = self.options.seed;
        let initial: Vec<bool> = self
            .regions
            .iter()
            .map(|r| r.phase == Phase::Member)
            .collect();
        let mut control = ControlSim::new(
            &self.scenario.regions,
            &initial,
            topology,
            settings,
            sub_seed(seed, 5),
            sub_seed(seed, 6),
        )?;
        control.start_all().await?;
        self.control = Some(control);
        let interval_us = self.write_interval_us();
        for i in 0..self.regions.len() {
            let first_us = WORKLOAD_START_MS * 1_000 + below(&mut self.load_rng, interval_us);
            self.next_write_us[i] = first_us;
            self.schedule(first_us / 1_000, Event::Write(i));
        }
        for (i, _) in self.scenario.timeline.iter().enumerate() {
            let at = self.scenario.timeline[i].at_ms;
            self.schedule(at, Event::Fault(i));
        }
        self.schedule(self.scenario.duration_ms, Event::EndWorkload);
        self.schedule(0, Event::Tick);
        self.reconcile();
        let budget_ms = self
            .scenario
            .expect
            .converged_within_ms
            .unwrap_or(CONVERGE_MS_DEFAULT);
        let mut timed_out = false;
        let mut steps: u64 = 0;
        while let Some((at, event)) = self.queue.pop() {
            if self.converged_at.is_some() || at > self.end_ms + budget_ms {
                break;
            }
            steps += 1;
            if steps.is_multiple_of(WATCHDOG_STEPS) && started.elapsed().as_millis() > WALL_MS_MAX {
                timed_out = true;
                break;
            }
            if matches!(event, Event::Tick) {
                // The control plane runs up to this tick; between ticks the world moves alone,
                // but for its regions' Raft nodes starting and stopping (run_control_ops).
                if let Some(control) = &self.control {
                    control.advance_to(at).await;
                }
            }
            self.now_ms = at;
            self.step(event);
            self.run_control_ops().await;
        }
        if let Some(control) = &self.control {
            control.settle(self.now_ms, RAFT_SETTLE_MS).await;
        }
        Ok(self.check(started, timed_out))
    }

    /// Starts and kills control-plane nodes as the world's regions started and died.
    async fn run_control_ops(&mut self) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        if self.net_changed {
            self.net_changed = false;
            control.set_network(&self.cut, &self.slow);
        }
        let mut failed = Vec::new();
        for (region, start) in std::mem::take(&mut self.control_ops) {
            if start {
                if let Err(err) = control.start(region).await {
                    failed.push((region, err));
                }
            } else {
                control.kill(region).await;
            }
        }
        for (region, err) in failed {
            self.trace([22, region as u64, 0, 0], |n| {
                format!("control plane of {} did not start: {err}", n[region])
            });
        }
    }

    /// The control plane's part of a tick: its leader's chores, checkpoints due, and the
    /// committed stable frontier handed to each replica (garbage collection).
    fn control_tick(&mut self) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        let changes = control.take_changes();
        control.upkeep(self.now_ms);
        let mut collected = Vec::new();
        let mut tombstones = Vec::new();
        for region in 0..self.regions.len() {
            let now = clock_ms(self.now_ms, self.regions[region].clock_offset_ms);
            if self.regions[region].phase != Phase::Member {
                // A joiner reports only once its snapshot is in: it subscribes from there.
                continue;
            }
            let Some(replica) = self.regions[region].replica.as_mut() else {
                continue;
            };
            if control.checkpoint_due(region, self.now_ms) {
                // Made durable first, as a node syncs its write-ahead log before it reports:
                // the others delete what every checkpoint holds.
                replica.storage_mut().sync();
                let (vector, hlc) = replica.checkpoint();
                let command = ControlCommand::ReportCheckpoint {
                    node: replica.node(),
                    vector,
                    hlc,
                    reported_ms: now,
                };
                control.propose(region, command);
            }
            let (frontier, stable) = control.new_frontier_and_hlc(region);
            if let Some(frontier) = frontier {
                let Ok(deleted) = replica.handle_stable_frontier(&frontier);
                collected.push((region, deleted));
            }
            let stable = match self.options.bug {
                Some(InjectedBug::CollectEarly) => Some(replica.hlc()),
                _ => stable,
            };
            if let Some(stable) = stable {
                let Ok(keys) = replica.handle_stable_hlc(stable);
                if keys > 0 {
                    tombstones.push((region, keys, stable));
                }
            }
        }
        for (node, term, leader) in changes {
            self.trace([20, node, term, leader.unwrap_or(0)], |n| {
                // Raft's node ids are the regions' positions from 1.
                let name = |id: u64| {
                    let at = (id as usize).checked_sub(1);
                    at.and_then(|at| n.get(at)).map_or("?", String::as_str)
                };
                let leader = leader.map_or("none", name);
                format!("raft: {} in term {term} sees leader {leader}", name(node))
            });
        }
        for (region, deleted) in collected {
            self.log_events_collected += deleted;
            self.trace([21, region as u64, deleted, 0], |n| {
                format!(
                    "gc {}: {deleted} change-log events at the stable frontier",
                    n[region]
                )
            });
        }
        for (region, keys, stable) in tombstones {
            self.tombstones_collected += keys;
            self.trace([27, region as u64, keys, stable.wall_ms], |n| {
                format!(
                    "gc {}: tombstones of {keys} keys at stable hlc {stable}",
                    n[region]
                )
            });
        }
        self.follow_topology();
        self.membership_tick();
    }

    /// Every member replicates along the topology it sees committed, as a node's driver does.
    fn follow_topology(&mut self) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        let mut changed = Vec::new();
        for region in 0..self.regions.len() {
            let id = self.regions[region].id;
            let Some(topology) = control.topology(region).filter(|t| t.contains(id)) else {
                continue;
            };
            let now = clock_ms(self.now_ms, self.regions[region].clock_offset_ms);
            let Some(replica) = self.regions[region].replica.as_mut() else {
                continue;
            };
            if replica.topology() != &topology
                && replica.handle_topology(topology.clone(), now).is_ok()
            {
                changed.push(region);
                self.latest_topology = topology;
            }
        }
        for region in changed {
            self.trace([23, region as u64, 0, 0], |n| {
                format!("topology {}: follows the committed links", n[region])
            });
            // Streams to peers no longer linked close; new links open.
            let keys: Vec<(usize, usize)> = self
                .streams
                .keys()
                .filter(|(a, b)| *a == region || *b == region)
                .collect();
            for (sub, publ) in keys {
                if !self.linked(sub, publ) {
                    self.close((sub, publ));
                }
            }
            self.drain(region);
            self.reconcile();
        }
    }

    /// Joins and leaves in progress: asking the control plane, the joiner's snapshot, the
    /// leaver's last hand-over and its stop.
    fn membership_tick(&mut self) {
        for region in 0..self.regions.len() {
            match self.regions[region].phase {
                Phase::Joining => self.join_step(region),
                Phase::Member if self.regions[region].leaving => self.leave_step(region),
                Phase::Member => self.activate_step(region),
                Phase::Outside | Phase::Gone => {}
            }
        }
    }

    /// The first member that is up: the one a joiner asks, and fetches its snapshot from.
    fn admitter(&self) -> Option<usize> {
        (0..self.regions.len()).find(|r| self.up(*r) && !self.regions[*r].leaving)
    }

    /// Proposes `command` from region `from` for region `region`'s join or leave, at most
    /// every [`JOIN_ASK_MS`]; says whether it did.
    fn ask(&mut self, from: usize, region: usize, command: ControlCommand) -> bool {
        if self.now_ms < self.regions[region].next_ask_ms {
            return false;
        }
        self.regions[region].next_ask_ms = self.now_ms + JOIN_ASK_MS;
        if let Some(control) = self.control.as_ref() {
            control.propose(from, command);
        }
        true
    }

    fn join_step(&mut self, region: usize) {
        if self.regions[region].down {
            return;
        }
        let Some(admitter) = self.admitter() else {
            return;
        };
        let Some(control) = self.control.as_ref() else {
            return;
        };
        let id = self.regions[region].id;
        let admitted = control.state(admitter).filter(|s| {
            s.member(id)
                .is_some_and(|m| m.state == MemberState::Joining)
        });
        let Some(state) = admitted else {
            let join = control.join_command(region);
            if self.ask(admitter, region, join) {
                self.trace([24, region as u64, admitter as u64, 0], |n| {
                    format!("join {}: asks {}", n[region], n[admitter])
                });
            }
            return;
        };
        if self.regions[region].replica.is_none() && self.regions[region].parked.is_none() {
            let Ok(topology) = state.topology() else {
                return;
            };
            let now = self.local_ms(region);
            let config = replica_config(id, self.scenario);
            let storage = self.new_storage();
            match Replica::open(config, topology, storage, now) {
                Ok(replica) => self.regions[region].replica = Some(replica),
                Err(never) => match never {},
            }
        }
        if self.regions[region].replica.is_some() && self.snapshot(region, admitter) {
            self.regions[region].phase = Phase::Member;
            self.trace([25, region as u64, admitter as u64, 0], |n| {
                format!(
                    "join {}: snapshot from {} installed, replicating",
                    n[region], n[admitter]
                )
            });
            self.reconcile();
        }
    }

    /// A joined member whose checkpoint is committed becomes active.
    fn activate_step(&mut self, region: usize) {
        let Some(control) = self.control.as_ref() else {
            return;
        };
        let id = self.regions[region].id;
        let joined = control.state(region).is_some_and(|s| {
            s.member(id)
                .is_some_and(|m| m.state == MemberState::Joining)
                && s.checkpoints().contains_key(&id)
        });
        if joined {
            self.ask(region, region, ControlCommand::Activate(id));
        }
    }

    /// A leaving member: it asks to drain; once draining it takes no writes, and once every
    /// member staying holds what it held it asks to be removed; removed, it stops for good.
    fn leave_step(&mut self, region: usize) {
        let Some(control) = self.control.as_ref() else {
            return;
        };
        let id = self.regions[region].id;
        let Some(state) = control.state(region) else {
            return;
        };
        let Some(own) = state.member(id).map(|m| m.state) else {
            return;
        };
        match own {
            // A member still joining is activated first: only an active one can drain.
            MemberState::Joining => self.activate_step(region),
            MemberState::Active => {
                self.ask(region, region, ControlCommand::Drain(id));
            }
            MemberState::Draining => {
                let Some(vector) = self.regions[region]
                    .replica
                    .as_ref()
                    .map(|r| r.vector().clone())
                else {
                    return;
                };
                let held = self.regions[region]
                    .drain_vector
                    .get_or_insert(vector)
                    .clone();
                let behind = state
                    .members()
                    .filter(|m| m.id != id)
                    .filter(|m| matches!(m.state, MemberState::Active | MemberState::Draining))
                    .any(|m| {
                        state
                            .checkpoints()
                            .get(&m.id)
                            .is_none_or(|c| !c.vector.dominates(&held))
                    });
                if !behind && control.may_remove_itself(region) {
                    self.ask(region, region, ControlCommand::Remove(id));
                }
            }
            MemberState::Removed => {
                let r = &mut self.regions[region];
                r.phase = Phase::Gone;
                let storage = r
                    .replica
                    .take()
                    .map(Replica::into_storage)
                    .or(r.parked.take());
                if let Some(storage) = storage {
                    // Kept for the exactly-once checker.
                    self.retired.push((r.name.clone(), storage));
                }
                self.control_ops.push((region, false));
                self.trace([26, region as u64, 0, 0], |n| {
                    format!("leave {}: removed, stopped", n[region])
                });
                self.reconcile();
            }
        }
    }

    fn step(&mut self, event: Event) {
        match event {
            Event::Write(region) => self.write(region),
            Event::Deliver {
                from,
                to,
                kind,
                gen,
                bytes,
            } => self.deliver(from, to, kind, gen, &bytes),
            other => self.step_rare(other),
        }
    }

    /// Every event but writes and deliveries, which are nearly all of a run's: out of line, so
    /// that the code of ticks, faults and connections does not sit among theirs in the
    /// instruction cache.
    #[inline(never)]
    fn step_rare(&mut self, event: Event) {
        match event {
            Event::Write(_) | Event::Deliver { .. } => {
                unreachable!("step handles writes and deliveries itself")
            }
            Event::Tick => {
                for region in 0..self.regions.len() {
                    let now = self.local_ms(region);
                    if let Some(replica) = self.regions[region].replica.as_mut() {
                        let _ = replica.handle_tick(now);
                    }
                    self.drain(region);
                }
                self.control_tick();
                if self.workload_over && self.converged() && self.unfinished_changes().is_empty() {
                    self.converged_at = Some(self.now_ms);
                    self.trace([7, 0, 0, 0], |_| "converged".into());
                }
                self.schedule(self.now_ms + TICK_MS, Event::Tick);
            }
            Event::Fault(i) => {
                let action = self.scenario.timeline[i].action.clone();
                self.fault(&action);
            }
            Event::Flap {
                a,
                b,
                period_ms,
                until_ms,
                epoch,
            } => {
                if epoch != self.flap_epoch {
                    return; // healed since: the link stays as `heal` left it
                }
                // Down and up in turn; up for good from `until_ms`.
                let cut = !self.flapped.contains(&(a, b)) && self.now_ms < until_ms;
                if cut {
                    self.flapped.insert((a, b));
                    self.flapped.insert((b, a));
                } else {
                    self.flapped.remove(&(a, b));
                    self.flapped.remove(&(b, a));
                }
                self.recut();
                self.trace([8, a as u64, b as u64, u64::from(cut)], |n| {
                    format!("flap {}-{} cut={cut}", n[a], n[b])
                });
                if self.now_ms < until_ms {
                    // The last turn comes at `until_ms`, not a period past it (as in a drill).
                    self.schedule(
                        (self.now_ms + period_ms).min(until_ms),
                        Event::Flap {
                            a,
                            b,
                            period_ms,
                            until_ms,
                            epoch,
                        },
                    );
                }
                self.reconcile();
            }
            Event::Connect { sub, publ } => self.connect(sub, publ),
            Event::Snapshot { sub, publ } => {
                self.snapshot(sub, publ);
            }
            Event::Restart { region, kills } => {
                if self.regions[region].kills == kills {
                    self.restart(region);
                    self.reconcile();
                }
            }
            Event::EndWorkload => {
                self.workload_over = true;
                self.end_ms = self.now_ms;
                self.flap_epoch += 1;
                self.partitioned.clear();
                self.flapped.clear();
                self.recut();
                self.slow.clear();
                for region in 0..self.regions.len() {
                    self.restart(region);
                }
                self.trace([9, 0, 0, 0], |_| {
                    "workload over: healed, every region up".into()
                });
                self.reconcile();
            }
        }
    }

    // ---- workload ----

    fn write(&mut self, region: usize) {
        if self.workload_over {
            return;
        }
        // Writes arrive every interval on average: half of it, plus up to a whole one at random.
        let interval_us = self.write_interval_us();
        // At least a microsecond on: simulated time must move between writes.
        let next_us = self.next_write_us[region]
            + (interval_us / 2 + below(&mut self.load_rng, interval_us)).max(1);
        self.next_write_us[region] = next_us;
        self.schedule(next_us / 1_000, Event::Write(region));
        let (key, command) = self.command();
        let now = self.local_ms(region);
        let r = &mut self.regions[region];
        if r.phase != Phase::Member || r.drain_vector.is_some() {
            // Not in the mesh, or draining: the write is refused, not acknowledged.
            return;
        }
        let Some(replica) = r.replica.as_mut() else {
            return;
        };
        let node = replica.node();
        let before = replica.vector().get(node);
        let Ok(results) = replica.handle_commands(vec![(key.clone(), command)], now);
        let after = replica.vector().get(node);
        if after > before {
            let keep_whole = self.scenario.durability == Some(DurabilityMode::Process);
            for seq in before.0 + 1..=after.0 {
                if let Some(event) = replica.storage_mut().log().get(node, Seq(seq)) {
                    let at = node.0 as usize;
                    if self.created_ms.len() <= at {
                        self.created_ms.resize_with(at + 1, Vec::new);
                    }
                    let created = &mut self.created_ms[at];
                    let at = seq as usize;
                    if created.len() <= at {
                        created.resize(at + 1, u64::MAX);
                    }
                    created[at] = self.now_ms;
                    self.writes_acked += 1;
                    if keep_whole {
                        self.acked.push(event.clone());
                    } else {
                        self.oracle.add(&event.key, event.hlc, &event.op);
                    }
                }
            }
        }
        let ok = matches!(results.first(), Some(Ok(_)));
        let mut fingerprint = rustc_hash::FxHasher::default();
        fingerprint.write(&key);
        self.trace(
            [
                1,
                region as u64,
                after.0,
                u64::from(ok),
                fingerprint.finish(),
            ],
            |n| {
                format!(
                    "write {} {} -> seq {}",
                    n[region],
                    String::from_utf8_lossy(&key),
                    after.0
                )
            },
        );
        self.drain(region);
    }

    fn write_interval_us(&self) -> u64 {
        (1_000_000 / self.scenario.workload.rate_per_region.max(1)).max(1)
    }

    fn command(&mut self) -> (Bytes, Command) {
        next_command(&self.scenario.workload, &mut self.load_rng, &mut self.names)
    }

    // ---- network ----

    /// Sends every output of `region`, and notes what it committed.
    fn drain(&mut self, region: usize) {
        let Some(replica) = self.regions[region].replica.as_mut() else {
            return;
        };
        replica.check_invariants();
        let mut committed: Vec<(NodeId, Seq)> = std::mem::take(&mut replica.storage_mut().recent);
        let mut outputs = std::mem::take(&mut self.outputs);
        while let Some(transmit) = replica.poll_transmit() {
            outputs.push(transmit);
        }
        let mut resync_from = None;
        while let Some(peer) = replica.poll_resync() {
            resync_from.get_or_insert(peer);
        }
        // A peer holds own events this region lost: a data snapshot from it, as a node's
        // driver fetches one, one at a time.
        if let Some(peer) = resync_from {
            let publ = peer.0 as usize - 1;
            if self.resyncing.insert(region) {
                self.schedule(
                    self.now_ms + SNAPSHOT_MS,
                    Event::Snapshot { sub: region, publ },
                );
            }
        }
        let me = self.regions[region].id;
        for &(origin, seq) in &committed {
            if origin != me {
                self.events_applied += 1;
                let created = usize::try_from(origin.0)
                    .ok()
                    .and_then(|at| self.created_ms.get(at))
                    .and_then(|c| c.get(seq.0 as usize));
                if let Some(&created) = created.filter(|&&c| c != u64::MAX) {
                    let lag = self.now_ms.saturating_sub(created);
                    self.lag.saturating_record(lag.max(1));
                }
            }
        }
        // The buffer goes back, to be filled again without growing from nothing.
        committed.clear();
        if let Some(replica) = self.regions[region].replica.as_mut() {
            replica.storage_mut().recent = committed;
        }
        for transmit in outputs.drain(..) {
            let peer = transmit.peer.0 as usize - 1;
            let (key, direction, kind_at_receiver) = match transmit.stream {
                StreamKind::Subscription => ((region, peer), 0, StreamKind::Feed),
                StreamKind::Feed => ((peer, region), 1, StreamKind::Subscription),
            };
            let Some(stream) = self.streams.get(&key) else {
                continue;
            };
            if !stream.open {
                continue;
            }
            let gen = stream.gen;
            match &transmit.message {
                Message::EncodedEvents(batch) => self.events_sent += batch.events() as u64,
                Message::EventBatch(events) => self.events_sent += events.len() as u64,
                _ => {}
            }
            let kind = transmit.message.kind();
            // The real encoding, every time: what the peer decodes is what a socket would carry.
            let Ok(bytes) = frame::encode_to_vec(&transmit.message) else {
                continue;
            };
            self.send(
                region,
                peer,
                key,
                direction,
                kind_at_receiver,
                gen,
                Bytes::from(bytes),
                kind,
            );
        }
        // The buffer goes back, as the committed one does.
        self.outputs = outputs;
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        from: usize,
        to: usize,
        key: (usize, usize),
        direction: usize,
        kind: StreamKind,
        gen: u64,
        bytes: Bytes,
        what: &'static str,
    ) {
        let net = &self.scenario.network;
        if self.cut.contains(&(from, to)) || unit(&mut self.net_rng) < net.loss {
            self.trace([2, from as u64, to as u64, bytes.len() as u64], |n| {
                format!("lost {what} {}->{}", n[from], n[to])
            });
            return;
        }
        let mut latency = net.latency_ms_min
            + below(
                &mut self.net_rng,
                net.latency_ms_max - net.latency_ms_min + 1,
            );
        latency += self
            .slow
            .get(&(from.min(to), from.max(to)))
            .copied()
            .unwrap_or(0);
        let mut at = self.now_ms + latency;
        let reordered = unit(&mut self.net_rng) < net.reorder;
        if let Some(stream) = self.streams.get_mut(&key) {
            if !reordered {
                at = at.max(stream.last_delivery[direction]);
                stream.last_delivery[direction] = at;
            }
        }
        let duplicated = unit(&mut self.net_rng) < net.duplicate;
        self.trace([3, from as u64, to as u64, at, bytes.len() as u64], |n| {
            format!("send {what} {}->{} at {at}", n[from], n[to])
        });
        if duplicated {
            self.schedule(
                at + 1,
                Event::Deliver {
                    from,
                    to,
                    kind,
                    gen,
                    bytes: bytes.clone(),
                },
            );
        }
        self.schedule(
            at,
            Event::Deliver {
                from,
                to,
                kind,
                gen,
                bytes,
            },
        );
    }

    fn deliver(&mut self, from: usize, to: usize, kind: StreamKind, gen: u64, bytes: &Bytes) {
        let key = match kind {
            StreamKind::Feed => (from, to),
            StreamKind::Subscription => (to, from),
        };
        if !self
            .streams
            .get(&key)
            .is_some_and(|s| s.open && s.gen == gen)
        {
            return; // the stream it was sent on is gone
        }
        // The keys and values of a batch stay slices of the frame (a node copies them out of
        // the read buffer it reuses; the bytes decoded are the same).
        let message = match frame::decode_shared(bytes) {
            Ok(Some((message, _))) => message,
            other => {
                self.trace([4, from as u64, to as u64, 0], |n| {
                    format!("undecodable frame {}->{}: {other:?}", n[from], n[to])
                });
                return;
            }
        };
        let now = self.local_ms(to);
        let from_id = self.regions[from].id;
        let Some(replica) = self.regions[to].replica.as_mut() else {
            return;
        };
        let result = replica.handle_message(from_id, kind, message, now);
        self.trace(
            [5, from as u64, to as u64, u64::from(result.is_ok())],
            |n| format!("deliver {}->{} {kind:?}", n[from], n[to]),
        );
        if let Err(err) = &result {
            self.refused(from, to, key, matches!(err, PeerError::Behind { .. }));
        }
        self.drain(to);
    }

    /// `to` refused what `from` sent on stream `key`, which closes; a subscriber told it is
    /// `behind` fetches a data snapshot from this publisher: as a node's driver does, one at a
    /// time, arriving a snapshot's transfer time later.
    #[cold]
    #[inline(never)]
    fn refused(&mut self, from: usize, to: usize, key: (usize, usize), behind: bool) {
        if behind && self.resyncing.insert(from) {
            self.schedule(
                self.now_ms + SNAPSHOT_MS,
                Event::Snapshot {
                    sub: from,
                    publ: to,
                },
            );
        }
        self.close(key);
    }

    /// `publ`'s keys, vector and HLC, through the real encoding in chunks as a node sends
    /// them, installed into `sub` by its replica core. Nothing happens if either is down by
    /// then (a later refusal asks again).
    fn snapshot(&mut self, sub: usize, publ: usize) -> bool {
        self.resyncing.remove(&sub);
        let cut = self.cut.contains(&(publ, sub)) || self.cut.contains(&(sub, publ));
        let Some(server) = self.regions[publ].replica.as_ref().filter(|_| !cut) else {
            return false;
        };
        let (vector, hlc) = (server.vector().clone(), server.hlc());
        let entries: Vec<SnapshotEntry> = server
            .storage()
            .keys()
            .into_iter()
            .map(|(key, state)| SnapshotEntry {
                key: Bytes::copy_from_slice(key),
                state: state.clone(),
            })
            .collect();
        let now = self.local_ms(sub);
        let Some(replica) = self.regions[sub].replica.as_mut() else {
            return false;
        };
        let mut keys = 0;
        for chunk in entries.chunks(SNAPSHOT_CHUNK_KEYS_MAX) {
            let message = Message::SnapshotChunk(chunk.to_vec());
            let decoded = match frame::encode_to_vec(&message).map(|b| frame::decode(&b)) {
                Ok(Ok(Some((Message::SnapshotChunk(decoded), _)))) => decoded,
                other => {
                    // Left half-installed: the convergence and oracle checkers report it.
                    self.trace([14, sub as u64, publ as u64, 0], |n| {
                        format!("snapshot {}->{} failed: {other:?}", n[publ], n[sub])
                    });
                    return false;
                }
            };
            keys += decoded.len();
            match replica.handle_snapshot_chunk(decoded, hlc, now) {
                Ok(()) => {}
                Err(never) => match never {},
            }
        }
        match replica.handle_snapshot_end(&vector, hlc, now) {
            Ok(()) => {}
            Err(never) => match never {},
        }
        self.snapshots += 1;
        self.trace([13, sub as u64, publ as u64, keys as u64], |n| {
            format!("snapshot {}->{}: {keys} keys", n[publ], n[sub])
        });
        self.drain(sub);
        true
    }

    // ---- connections ----

    fn up(&self, region: usize) -> bool {
        self.regions[region].phase == Phase::Member && self.regions[region].replica.is_some()
    }

    /// Whether both ends' topologies link `a` and `b`.
    fn linked(&self, a: usize, b: usize) -> bool {
        let (ia, ib) = (self.regions[a].id, self.regions[b].id);
        let sees = |x: usize, me: NodeId, other: NodeId| {
            self.regions[x]
                .replica
                .as_ref()
                .is_some_and(|r| r.topology().neighbors(me).contains(&other))
        };
        sees(a, ia, ib) && sees(b, ib, ia)
    }

    /// The links down: every one a partition or a flap holds down.
    fn recut(&mut self) {
        self.cut = self.partitioned.union(&self.flapped).copied().collect();
        self.net_changed = true;
    }

    /// Opens or closes streams to match who is up and which links are cut both ways.
    fn reconcile(&mut self) {
        let keys: Vec<(usize, usize)> = self.streams.keys().collect();
        for (sub, publ) in keys {
            let wanted = self.up(sub)
                && self.up(publ)
                && self.linked(sub, publ)
                && !(self.cut.contains(&(sub, publ)) && self.cut.contains(&(publ, sub)));
            let Some(stream) = self.streams.get_mut(&(sub, publ)) else {
                continue;
            };
            if wanted && !stream.open && !stream.connecting {
                stream.connecting = true;
                let delay = RECONNECT_MS_MIN + below(&mut self.conn_rng, RECONNECT_MS_JITTER);
                self.schedule(self.now_ms + delay, Event::Connect { sub, publ });
            } else if !wanted && stream.open {
                self.close((sub, publ));
            }
        }
    }

    fn connect(&mut self, sub: usize, publ: usize) {
        let wanted = self.up(sub)
            && self.up(publ)
            && self.linked(sub, publ)
            && !(self.cut.contains(&(sub, publ)) && self.cut.contains(&(publ, sub)));
        let Some(stream) = self.streams.get_mut(&(sub, publ)) else {
            return;
        };
        stream.connecting = false;
        if !wanted || stream.open {
            return;
        }
        stream.open = true;
        stream.gen += 1;
        stream.last_delivery = [0, 0];
        let (sub_id, publ_id) = (self.regions[sub].id, self.regions[publ].id);
        let (sub_now, publ_now) = (self.local_ms(sub), self.local_ms(publ));
        if let Some(replica) = self.regions[publ].replica.as_mut() {
            let _ = replica.handle_feed_open(sub_id, publ_now);
        }
        if let Some(replica) = self.regions[sub].replica.as_mut() {
            let _ = replica.handle_subscription_open(publ_id, sub_now);
        }
        self.trace([6, sub as u64, publ as u64, 1], |n| {
            format!("connect {}->{}", n[sub], n[publ])
        });
        self.drain(publ);
        self.drain(sub);
    }

    fn close(&mut self, (sub, publ): (usize, usize)) {
        let Some(stream) = self.streams.get_mut(&(sub, publ)) else {
            return;
        };
        if !stream.open {
            return;
        }
        stream.open = false;
        stream.gen += 1;
        let (sub_id, publ_id) = (self.regions[sub].id, self.regions[publ].id);
        let (sub_now, publ_now) = (self.local_ms(sub), self.local_ms(publ));
        if let Some(replica) = self.regions[publ].replica.as_mut() {
            replica.handle_feed_closed(sub_id, publ_now);
        }
        if let Some(replica) = self.regions[sub].replica.as_mut() {
            replica.handle_subscription_closed(publ_id, sub_now);
        }
        self.trace([6, sub as u64, publ as u64, 0], |n| {
            format!("close {}->{}", n[sub], n[publ])
        });
        self.drain(sub);
        self.drain(publ);
        self.reconcile();
    }

    // ---- faults ----

    fn region_index(&self, name: &str) -> usize {
        // The scenario was validated: every name is a region.
        self.scenario
            .regions
            .iter()
            .position(|r| r == name)
            .unwrap_or(0)
    }

    fn fault(&mut self, action: &Action) {
        self.trace([10, 0, 0, 0], |_| format!("fault {action:?}"));
        self.net_changed = true;
        match action {
            Action::Kill { region } => {
                let r = self.region_index(region);
                self.kill(r);
            }
            Action::PowerFail { region } => {
                let r = self.region_index(region);
                self.kill(r);
                let lost = self.regions[r]
                    .parked
                    .as_mut()
                    .is_some_and(SimStorage::power_fail);
                if lost {
                    self.regions[r].lost_on_power_fail = true;
                }
                self.trace([28, r as u64, u64::from(lost), 0], |n| {
                    format!(
                        "power failure of {}: commits since its last sync lost: {lost}",
                        n[r]
                    )
                });
            }
            Action::KillLeader { down_ms } => {
                match self.control.as_ref().and_then(ControlSim::leader) {
                    Some(r) => {
                        self.leader_kills += 1;
                        self.trace([12, r as u64, 0, 0], |n| {
                            format!("the leader is {}: kill it", n[r])
                        });
                        self.kill(r);
                        if let Some(ms) = down_ms {
                            let kills = self.regions[r].kills;
                            self.schedule(self.now_ms + ms, Event::Restart { region: r, kills });
                        }
                    }
                    None => self.trace([12, u64::MAX, 0, 0], |_| "no leader to kill".into()),
                }
            }
            Action::Restart { region } => {
                let r = self.region_index(region);
                self.restart(r);
            }
            Action::Join { region } => {
                let r = self.region_index(region);
                if self.regions[r].phase == Phase::Outside {
                    self.regions[r].phase = Phase::Joining;
                    self.regions[r].next_ask_ms = self.now_ms;
                    self.control_ops.push((r, true));
                }
            }
            Action::Leave { region } => {
                let r = self.region_index(region);
                self.regions[r].leaving = true;
                self.regions[r].next_ask_ms = self.now_ms;
            }
            Action::Partition { groups, one_way } => {
                let group_of = |r: usize| {
                    groups
                        .iter()
                        .position(|g| g.contains(&self.scenario.regions[r]))
                };
                let n = self.regions.len();
                for a in 0..n {
                    for b in 0..n {
                        let (ga, gb) = (group_of(a), group_of(b));
                        if a != b && ga != gb && (!one_way || ga == Some(0)) {
                            self.partitioned.insert((a, b));
                        }
                    }
                }
                self.recut();
            }
            Action::Heal {} => {
                // Every flap running ends too, with its link up.
                self.flap_epoch += 1;
                self.partitioned.clear();
                self.flapped.clear();
                self.recut();
                self.slow.clear();
            }
            Action::Flap {
                from,
                to,
                period_ms,
                until_ms,
            } => {
                let (a, b) = (self.region_index(from), self.region_index(to));
                // The scenario's validation holds `period-ms` to at least 1.
                let (period_ms, until_ms) = (*period_ms.max(&1), *until_ms);
                self.schedule(
                    self.now_ms,
                    Event::Flap {
                        a,
                        b,
                        period_ms,
                        until_ms,
                        epoch: self.flap_epoch,
                    },
                );
            }
            Action::ClockSkew { region, offset_ms } => {
                let r = self.region_index(region);
                self.regions[r].clock_offset_ms = *offset_ms;
            }
            Action::SlowLink { from, to, extra_ms } => {
                let (a, b) = (self.region_index(from), self.region_index(to));
                self.slow.insert((a.min(b), a.max(b)), *extra_ms);
            }
        }
        self.reconcile();
    }

    fn kill(&mut self, region: usize) {
        let r = &mut self.regions[region];
        if r.down || matches!(r.phase, Phase::Outside | Phase::Gone) {
            return;
        }
        r.down = true;
        r.kills += 1;
        if let Some(replica) = r.replica.take() {
            r.parked = Some(replica.into_storage());
        }
        self.control_ops.push((region, false));
    }

    fn restart(&mut self, region: usize) {
        if !self.regions[region].down {
            return;
        }
        self.regions[region].down = false;
        self.control_ops.push((region, true));
        if let Some(storage) = self.regions[region].parked.take() {
            let now = self.local_ms(region);
            let id = self.regions[region].id;
            let config = replica_config(id, self.scenario);
            let topology = match self.latest_topology.contains(id) {
                true => self.latest_topology.clone(),
                false => self.topology.clone(),
            };
            match Replica::open(config, topology, storage, now) {
                Ok(mut replica) => {
                    let told = self.options.bug != Some(InjectedBug::IgnorePossibleLoss);
                    if std::mem::take(&mut self.regions[region].lost_on_power_fail) && told {
                        replica.handle_possible_loss();
                    }
                    self.regions[region].replica = Some(replica);
                }
                Err(never) => match never {},
            }
        }
        self.trace([11, region as u64, 0, 0], |n| {
            format!("restart {}", n[region])
        });
    }

    // ---- checks ----

    /// The scenario's joins (true) and leaves (false), by region.
    fn membership_changes(&self) -> Vec<(usize, bool)> {
        self.scenario
            .timeline
            .iter()
            .filter_map(|f| match &f.action {
                Action::Join { region } => Some((self.region_index(region), true)),
                Action::Leave { region } => Some((self.region_index(region), false)),
                _ => None,
            })
            .collect()
    }

    /// The joins and leaves not finished: a joined region must replicate and be active in the
    /// committed state, a leaver must be removed and stopped.
    fn unfinished_changes(&self) -> Vec<String> {
        let control = self.control.as_ref();
        let leader_state = control.and_then(|c| c.leader().and_then(|l| c.state(l)));
        // Each region's last change is what it must end in.
        let last: BTreeMap<usize, bool> = self.membership_changes().into_iter().collect();
        last.into_iter()
            .filter(|(r, join)| {
                let region = &self.regions[*r];
                let committed = leader_state
                    .as_ref()
                    .and_then(|s| s.member(region.id))
                    .map(|m| m.state);
                match join {
                    true => region.phase != Phase::Member || committed != Some(MemberState::Active),
                    false => region.phase != Phase::Gone,
                }
            })
            .map(|(r, join)| {
                let what = if join { "join" } else { "leave" };
                format!("{what} {}", self.regions[r].name)
            })
            .collect()
    }

    /// The regions in the mesh (not outside it yet, not joining, not gone).
    fn members(&self) -> impl Iterator<Item = &Region> {
        self.regions.iter().filter(|r| r.phase == Phase::Member)
    }

    fn vectors(&self) -> Vec<VersionVector> {
        self.members()
            .filter_map(|r| r.replica.as_ref().map(|x| x.vector().clone()))
            .collect()
    }

    fn converged(&self) -> bool {
        let vectors = self.vectors();
        if vectors.len() != self.members().count() || vectors.windows(2).any(|w| w[0] != w[1]) {
            return false;
        }
        // Every member holds every key in the same state: compared state by state, which is
        // what comparing digests of their encodings would say (equal states encode alike), at
        // a fraction of the cost of encoding every state of every region. Every member has a
        // replica here (each gave a vector above).
        let storages: Vec<&SimStorage> = self
            .members()
            .filter_map(|r| r.replica.as_ref().map(|x| x.storage()))
            .collect();
        storages.windows(2).all(|w| w[0].same_keys(w[1]))
    }

    fn storage(region: &Region) -> Option<&SimStorage> {
        region
            .replica
            .as_ref()
            .map(|r| r.storage())
            .or(region.parked.as_ref())
    }

    /// Whether `region` holds exactly `expected` (see [`SimStorage::holds`]).
    fn holds(region: &Region, expected: &BTreeMap<Bytes, Value>) -> bool {
        Self::storage(region).map_or(expected.is_empty(), |storage| storage.holds(expected))
    }

    fn values(region: &Region) -> BTreeMap<Bytes, Value> {
        Self::storage(region)
            .map(|s| {
                s.keys()
                    .into_iter()
                    .filter_map(|(k, v)| v.value().map(|v| (Bytes::copy_from_slice(k), v)))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn check(mut self, started: Instant, timed_out: bool) -> Report {
        let expect = &self.scenario.expect;
        let mut verdicts = Vec::new();
        let convergence_ms = self.converged_at.map(|at| at - self.end_ms);
        let budget = expect.converged_within_ms.unwrap_or(CONVERGE_MS_DEFAULT);
        verdicts.push(match convergence_ms {
            Some(ms) => Verdict {
                checker: "convergence".into(),
                passed: true,
                detail: format!("identical states {ms} ms after heal"),
            },
            None => Verdict {
                checker: "convergence".into(),
                passed: false,
                detail: self.not_converged(timed_out, budget),
            },
        });
        // With `process` durability a power failure takes what its region committed since its
        // last sync; of those writes, the ones no other region had received are gone for good
        // (the region's RPO). Every other acknowledged write must be everywhere.
        let lost = self.writes_lost();
        for e in &self.acked {
            if !lost.contains(&(e.origin, e.seq, e.hlc)) {
                self.oracle.add(&e.key, e.hlc, &e.op);
            }
        }
        let oracle = self.oracle.values();
        let mut oracle_detail = format!("{} keys match the oracle in every region", oracle.len());
        if !lost.is_empty() {
            oracle_detail.push_str(&format!(
                " ({} acknowledged writes lost with power failures before their region synced \
                 or shipped them: process durability's RPO)",
                lost.len()
            ));
        }
        let mut oracle_ok = true;
        for region in self.members() {
            if !Self::holds(region, &oracle) {
                oracle_ok = false;
                oracle_detail = diff_detail(&region.name, &Self::values(region), &oracle);
                break;
            }
        }
        if expect.no_lost_writes {
            verdicts.push(Verdict {
                checker: "oracle".into(),
                passed: oracle_ok,
                detail: oracle_detail,
            });
        }
        let duplicates: Vec<String> = self
            .regions
            .iter()
            .filter_map(|r| Self::storage(r).map(|s| (r.name.as_str(), s)))
            .chain(self.retired.iter().map(|(name, s)| (name.as_str(), s)))
            .flat_map(|(name, s)| {
                s.duplicate_applies
                    .iter()
                    .map(move |(o, q)| format!("{name} applied ({o}, {q}) twice"))
            })
            .collect();
        verdicts.push(Verdict {
            checker: "exactly_once".into(),
            passed: duplicates.is_empty(),
            detail: if duplicates.is_empty() {
                "no event applied twice".into()
            } else {
                duplicates[..duplicates.len().min(3)].join("; ")
            },
        });
        let writes = self.writes_acked;
        if writes == 0 {
            // Nothing written shows nothing: every other checker would pass vacuously.
            verdicts.push(Verdict {
                checker: "workload".into(),
                passed: false,
                detail: "no write was acknowledged: the run shows nothing (is every region down \
                         or outside the mesh while the workload runs?)"
                    .into(),
            });
        }
        let per_change = if writes == 0 {
            0.0
        } else {
            self.events_sent as f64 / writes as f64
        };
        if let Some(max) = expect.max_messages_per_change {
            verdicts.push(Verdict {
                checker: "messages_per_change".into(),
                passed: per_change <= max,
                detail: format!("{per_change:.3} events sent per write (bound {max})"),
            });
        }
        let p99 = self.lag.value_at_quantile(0.99);
        if let Some(max) = expect.lag_ms_p99_max {
            // No remote apply measured (one region, or every event came by snapshot): a bound
            // with nothing under it is not met, as a percentile of nothing would read 0.
            let measured = !self.lag.is_empty();
            verdicts.push(Verdict {
                checker: "lag_p99".into(),
                passed: measured && p99 <= max,
                detail: match measured {
                    true => format!("p99 {p99} ms (bound {max} ms)"),
                    false => format!("no remote apply to measure (bound {max} ms)"),
                },
            });
        }
        let changes = self.membership_changes();
        if !changes.is_empty() {
            let unfinished = self.unfinished_changes();
            verdicts.push(Verdict {
                checker: "membership".into(),
                passed: unfinished.is_empty(),
                detail: match unfinished.is_empty() {
                    true => format!(
                        "{} joins and leaves done: joined regions active, leavers removed",
                        changes.len()
                    ),
                    false => format!("not finished: {}", unfinished.join(", ")),
                },
            });
        }
        let (raft_elections, control_commits) = match &self.control {
            Some(control) => {
                verdicts.extend(control.verdicts(&self.scenario.regions));
                let (elections, commits) = control.counts();
                (elections, commits)
            }
            None => (0, 0),
        };
        let passed = verdicts.iter().all(|v| v.passed);
        self.hash_final_states();
        self.hasher.update(&self.unhashed);
        self.unhashed.clear();
        let trace_hash = self.hasher.finalize().to_hex().to_string();
        Report {
            scenario: self.scenario.name.clone(),
            seed: self.options.seed,
            trace_hash,
            passed,
            checkers: verdicts,
            writes,
            events_applied: self.events_applied,
            messages_per_change: per_change,
            convergence_ms,
            lag_ms_p50: self.lag.value_at_quantile(0.5),
            lag_ms_p99: p99,
            lag_ms_max: self.lag.max(),
            snapshots_installed: self.snapshots,
            raft_elections,
            control_commits,
            log_events_collected: self.log_events_collected,
            tombstones_collected: self.tombstones_collected,
            writes_lost: lost.len() as u64,
            leader_kills: self.leader_kills,
            sim_ms: self.now_ms,
            wall_ms: started.elapsed().as_millis() as u64,
            replay: String::new(),
            trace: std::mem::take(&mut self.trace),
        }
    }

    /// Every region's final vector and key states, in region and key order, into the trace
    /// hash: two runs of a seed that end with different data hash differently even where every
    /// step's record matched. Once the members converged, their states are one (compared key by
    /// key): the first member's stand for them all.
    fn hash_final_states(&mut self) {
        let config = bincode::config::standard();
        let mut buf = std::mem::take(&mut self.unhashed);
        let first_member = self.regions.iter().position(|r| r.phase == Phase::Member);
        for (i, region) in self.regions.iter().enumerate() {
            let vector = region.replica.as_ref().map(|r| r.vector());
            let encoded = bincode::serde::encode_into_std_write(vector, &mut buf, config);
            assert!(encoded.is_ok(), "a vector always encodes");
            let same_as_first = self.converged_at.is_some()
                && region.phase == Phase::Member
                && first_member != Some(i);
            let storage = Self::storage(region).filter(|_| !same_as_first);
            for (key, state) in storage.map(SimStorage::keys).unwrap_or_default() {
                let encoded = bincode::serde::encode_into_std_write((key, state), &mut buf, config);
                assert!(encoded.is_ok(), "a key state always encodes");
                if buf.len() >= TRACE_BUFFER_BYTES {
                    self.hasher.update(&buf);
                    buf.clear();
                }
            }
        }
        self.unhashed = buf;
    }

    /// Acknowledged writes that no region holds any more: lost with a power failure before
    /// their region synced or shipped them (`process` durability only).
    fn writes_lost(&self) -> BTreeSet<(NodeId, Seq, braid_conflict::Hlc)> {
        if self.scenario.durability != Some(DurabilityMode::Process) {
            return BTreeSet::new();
        }
        let mut held: BTreeSet<(NodeId, Seq, braid_conflict::Hlc)> = BTreeSet::new();
        let storages = self
            .regions
            .iter()
            .filter_map(Self::storage)
            .chain(self.retired.iter().map(|(_, s)| s));
        for storage in storages {
            held.extend(storage.held().iter().copied());
        }
        self.acked
            .iter()
            .map(|e| (e.origin, e.seq, e.hlc))
            .filter(|id| !held.contains(id))
            .collect()
    }

    /// Why a run did not converge: the watchdog, joins or leaves not finished, or regions whose
    /// states differ (the first divergent key).
    fn not_converged(&self, timed_out: bool, budget_ms: u64) -> String {
        if timed_out {
            return format!(
                "the wall-clock watchdog stopped the run after {} s, at simulated {} ms; {}",
                WALL_MS_MAX / 1000,
                self.now_ms,
                self.first_divergence()
            );
        }
        let unfinished = self.unfinished_changes();
        if self.workload_over && !unfinished.is_empty() && self.converged() {
            return format!(
                "states agree, but not every membership change finished within {budget_ms} ms \
                 after heal: {}",
                unfinished.join(", ")
            );
        }
        let unfinished = match unfinished.is_empty() {
            true => String::new(),
            false => format!(
                " (membership changes not finished: {})",
                unfinished.join(", ")
            ),
        };
        format!(
            "regions differ {budget_ms} ms after heal{unfinished}; {}{}",
            self.first_divergence(),
            self.clock_refusals()
        )
    }

    /// Events refused for a clock too far ahead, by region, when there were any: a region whose
    /// clock runs past the peers' bound has its writes refused until true time catches up, which
    /// shows as divergence (`clock-skew` beyond the bound).
    fn clock_refusals(&self) -> String {
        let refused: Vec<String> = self
            .regions
            .iter()
            .filter_map(|r| {
                let replica = r.replica.as_ref()?;
                let n: u64 = replica
                    .stats()
                    .peers
                    .values()
                    .map(|p| p.events_clock_refused)
                    .sum();
                (n > 0).then(|| format!("{} {n}", r.name))
            })
            .collect();
        match refused.is_empty() {
            true => String::new(),
            false => format!(
                "; events refused for an HLC too far ahead of the receiver's clock (a clock \
                 skewed past the bound of {} ms), by receiving region: {}",
                braid_conflict::CLOCK_SKEW_MS_MAX_DEFAULT,
                refused.join(", ")
            ),
        }
    }

    fn first_divergence(&self) -> String {
        let all: Vec<(String, BTreeMap<Bytes, Value>)> = self
            .members()
            .map(|r| (r.name.clone(), Self::values(r)))
            .collect();
        let keys: BTreeSet<&Bytes> = all.iter().flat_map(|(_, v)| v.keys()).collect();
        for key in keys {
            let seen: Vec<Option<&Value>> = all.iter().map(|(_, v)| v.get(key)).collect();
            if seen.windows(2).any(|w| w[0] != w[1]) {
                let each: Vec<String> = all
                    .iter()
                    .zip(&seen)
                    .map(|((name, _), v)| format!("{name}={v:?}"))
                    .collect();
                return format!(
                    "first divergent key {:?}: {}",
                    String::from_utf8_lossy(key),
                    each.join(", ")
                );
            }
        }
        let vectors: Vec<String> = self.vectors().iter().map(|v| format!("{v:?}")).collect();
        format!(
            "values agree but vectors or metadata differ: {}",
            vectors.join(" / ")
        )
    }
}

fn diff_detail(
    region: &str,
    values: &BTreeMap<Bytes, Value>,
    oracle: &BTreeMap<Bytes, Value>,
) -> String {
    let keys: BTreeSet<&Bytes> = values.keys().chain(oracle.keys()).collect();
    for key in keys {
        if values.get(key) != oracle.get(key) {
            return format!(
                "region {region}, key {:?}: region has {:?}, oracle says {:?}",
                String::from_utf8_lossy(key),
                values.get(key),
                oracle.get(key)
            );
        }
    }
    format!("region {region} differs from the oracle")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three regions, the third joining at 1 s.
    const JOINING: &str = r#"
name = "joining"
regions = ["a", "b", "c"]
duration-ms = 3000
[workload]
rate-per-region = 10
keys = 5
[[timeline]]
at-ms = 1000
action = "join"
region = "c"
"#;

    fn world(scenario: &Scenario) -> World<'_> {
        let options = RunOptions {
            seed: 0,
            bug: None,
            keep_trace: false,
        };
        World::new(scenario, options).unwrap()
    }

    #[test]
    fn the_trace_hash_covers_the_states_a_run_ends_with() {
        let scenario = Scenario::parse(JOINING).unwrap();
        // Two worlds with the same records, whose region a holds another value of one key.
        let hash = |value: &'static [u8]| {
            let mut world = world(&scenario);
            let replica = world.regions[0].replica.as_mut().unwrap();
            let command = Command::Set(Bytes::from_static(value));
            let results = replica.handle_commands(vec![(Bytes::from_static(b"k"), command)], 0);
            assert!(matches!(results.as_deref(), Ok([Ok(_)])), "{results:?}");
            world.hash_final_states();
            world.hasher.update(&world.unhashed);
            world.hasher.finalize()
        };
        assert_eq!(hash(b"x"), hash(b"x"));
        assert_ne!(hash(b"x"), hash(b"y"));
    }

    #[test]
    fn a_leader_kill_restarts_its_region_only_if_nothing_killed_it_again_since() {
        let scenario = Scenario::parse(JOINING).unwrap();
        let mut world = world(&scenario);
        world.kill(1);
        let restart = Event::Restart {
            region: 1,
            kills: world.regions[1].kills,
        };
        // Restarted by another fault, then killed again for good before the leader kill's
        // downtime ends: its restart is stale.
        world.restart(1);
        world.kill(1);
        world.step(restart);
        assert!(world.regions[1].down, "a stale restart revived the region");
        // A restart of the outage it belongs to does revive.
        let current = Event::Restart {
            region: 1,
            kills: world.regions[1].kills,
        };
        world.step(current);
        assert!(!world.regions[1].down);
    }

    #[test]
    fn a_run_the_watchdog_stopped_says_so_with_the_simulated_time_reached() {
        let scenario = Scenario::parse(JOINING).unwrap();
        let mut world = world(&scenario);
        world.now_ms = 1234;
        let text = world.not_converged(true, 5000);
        assert!(
            text.starts_with(
                "the wall-clock watchdog stopped the run after 120 s, at simulated 1234 ms"
            ),
            "{text}"
        );
    }

    #[test]
    fn states_that_agree_with_a_join_unfinished_name_the_join() {
        let scenario = Scenario::parse(JOINING).unwrap();
        let mut world = world(&scenario);
        // Nothing written yet: the members agree; the join has not happened.
        world.workload_over = true;
        assert!(world.converged());
        let text = world.not_converged(false, 5000);
        assert_eq!(
            text,
            "states agree, but not every membership change finished within 5000 ms after heal: \
             join c"
        );
    }

    #[test]
    fn states_that_differ_with_a_join_unfinished_name_both() {
        let scenario = Scenario::parse(JOINING).unwrap();
        let mut world = world(&scenario);
        world.write(0); // a write in a that b has not received
        world.workload_over = true;
        assert!(!world.converged());
        let text = world.not_converged(false, 5000);
        assert!(
            text.starts_with(
                "regions differ 5000 ms after heal (membership changes not finished: join c); \
                 first divergent key"
            ),
            "{text}"
        );
    }
}
