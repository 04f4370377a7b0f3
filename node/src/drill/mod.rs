//! `braid drill`: a scenario (the simulator's format) run against real `braid` processes on this
//! machine, in real time, with RPO, recovery, convergence and lag measured and every
//! expectation given a verdict.
//!
//! ```text
//!   scenario ─► cluster (started with fault injection, or attached via cluster.json)
//!      writers: one per region, the scenario's workload over RESP, every outcome counted
//!      observer: /status every 200 ms (vectors, counters), /lag every second (lag per link)
//!      timeline: kill -9 / restart / power-fail (machine durability) ─► processes
//!                partition / heal / flap / slow-link / clock-skew   ─► POST /faults
//!   end of workload ─► heal, restart, wait for identical vectors
//!      ─► read every region's storage (read-only): values vs the oracle of all change logs
//!      ─► report: terminal table, JSON, HTML with the lag timeline and the faults marked
//! ```
//!
//! Failures: when a region fails, the drill notes how many of its client's writes were in
//! flight, and half a second later the highest of its sequence numbers any other region holds.
//! When it is restarted, before its client writes again, its own last sequence number tells how
//! many of its events no other region held: the RPO, in acknowledged writes, lies between that
//! number less the writes in flight and that number. Recovery is the time until it answers and
//! holds everything the others held at its restart.

pub mod report;
pub mod writer;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use braid_conflict::{oracle, Value};
use braid_protocol::{ChangeEvent, NodeId, Seq};
use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::sync::watch;

use crate::bench::{lag_delta, WorkDir};
use crate::cluster::{self, ClusterFile, InitOptions, RegionEntry};
use crate::config::NodeConfig;
use crate::faults::{FaultSet, CLOCK_OFFSET_MS_MAX, DELAY_MS_MAX};
use crate::http::{LagHistograms, Status};
use crate::launch;
use crate::scenario::{Action, Scenario, CONVERGE_MS_DEFAULT};
use crate::storage::{Durability, RocksStorage};
use crate::workload::sub_seed;
use report::{
    ConvergenceReport, DrillReport, FailureReport, FaultMark, LagFigures, LagPoint, Verdict,
    WriteCounts,
};
use writer::{WriterCounters, WriterRecord, WriterSpec};

/// First port of a cluster the drill starts (region i uses base+10i .. base+10i+2).
pub const BASE_PORT_DEFAULT: u16 = 17500;
/// Longest a `kill-leader` waits for an election in progress to name a leader.
const LEADER_WAIT: Duration = Duration::from_secs(5);
/// How often it asks meanwhile.
const LEADER_POLL: Duration = Duration::from_millis(200);

/// How often the observer reads every region's `/status`.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// Every how many status polls the observer reads `/lag` (once a second).
const LAG_EVERY_POLLS: u64 = 5;
/// After a failure, how long in-flight frames get to land before the survivors are asked what
/// they hold of the failed region.
const SETTLE: Duration = Duration::from_millis(500);
/// How long a killed process of an attached cluster may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Timeout of one admin request.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a (re)started region may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a region may take to join (admitted through the control plane, its data snapshot
/// fetched and installed): the admission alone may wait 30 s for a leader.
const JOIN_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a region may take to leave (its drain, then every other member's checkpoint
/// holding its events, then its removal); past it the drill fails.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often a join or a leave in progress is looked at.
const MEMBERSHIP_POLL: Duration = Duration::from_millis(200);
/// How long `POST /faults` naming a region that just joined is retried: the other nodes add it
/// to their peers at their next upkeep.
const FAULTS_RETRY: Duration = Duration::from_secs(5);
/// Points kept in the lag timeline (one per link and second): hours of a large mesh.
const TIMELINE_POINTS_MAX: usize = 200_000;
/// How often the progress line is refreshed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Largest time scale (a drill stretched a hundredfold is a week of a long scenario).
pub const TIME_SCALE_MAX: f64 = 100.0;

/// How to run a drill.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// The scenario, validated.
    pub scenario: Scenario,
    /// Working directory for a started cluster (default: temporary, removed afterwards).
    pub dir: Option<PathBuf>,
    /// Attach to the running cluster in this directory (its `cluster.json`).
    pub attach: Option<PathBuf>,
    /// Durability of a started cluster.
    pub durability: Durability,
    /// First port of a started cluster.
    pub base_port: u16,
    /// Seed of the workload's commands.
    pub seed: u64,
    /// Factor applied to every time of the scenario's timeline and duration (not to its
    /// expectations): 0.25 rehearses a scenario in a quarter of the time.
    pub time_scale: f64,
    /// The `braid` executable, for starting regions.
    pub exe: PathBuf,
    /// The command line, for the report.
    pub command_line: String,
}

/// A drill that could not run (a drill that ran and failed is a report with `passed: false`).
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// The scenario asks for something real processes cannot do honestly.
    #[error("{0}")]
    Unsupported(String),
    /// The options make no sense.
    #[error("{0}")]
    Options(String),
    /// The cluster could not be started, reached or read.
    #[error("cluster: {0}")]
    Cluster(String),
}

/// What the drill is doing, for a progress line.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A new phase.
    Phase(String),
    /// Once a second while the workload runs.
    Running {
        /// Milliseconds since the workload started.
        elapsed_ms: u64,
        /// The workload's length.
        total_ms: u64,
        /// Writes acknowledged so far, all regions.
        acked: u64,
        /// Regions down now.
        down: Vec<String>,
        /// Faults performed so far.
        faults: usize,
    },
    /// A fault was just performed.
    Fault(String),
}

/// Where a region is in the mesh, as the drill drives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Laid out, not started: a `join` later in the timeline admits it.
    Outside,
    /// Its `braid join` runs; not serving yet.
    Joining,
    /// In the mesh.
    Member,
    /// Draining after `POST /leave`; its node exits once it is removed.
    Leaving,
    /// Left: its node exited. Its change log still counts for the oracle.
    Left,
}

/// One region as the drill runs it.
struct Region {
    name: String,
    id: NodeId,
    http: SocketAddr,
    child: Option<tokio::process::Child>,
    up: watch::Sender<bool>,
    /// Whether it is in the mesh (joined and not left): its writer writes only then.
    member: watch::Sender<bool>,
    phase: Phase,
    /// When its join or leave began (the drill's clock, and the report's milliseconds).
    change_since: Option<(Instant, u64)>,
    counters: Arc<WriterCounters>,
    /// How many times the drill killed it.
    kills: u64,
    /// A leave came while it was down: it leaves once it runs again, as in the simulator.
    leave_deferred: bool,
}

/// The network faults in force, from which each node's `POST /faults` body is derived.
#[derive(Debug, Clone, Default)]
struct NetState {
    /// Directed pairs whose messages are dropped.
    cut: BTreeSet<(usize, usize)>,
    /// Unordered pairs a flap has down right now.
    flapped: BTreeSet<(usize, usize)>,
    /// Extra delay per unordered pair.
    slow: BTreeMap<(usize, usize), u64>,
    /// Clock offset per region.
    clock: BTreeMap<usize, i64>,
    /// The scenario's link latency (mean of its range), on every link.
    base_delay_ms: u64,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl NetState {
    /// Region `i`'s share of the faults, naming only the regions `present` (a node refuses
    /// faults naming a region it does not know).
    fn fault_set(&self, i: usize, names: &[String], present: &[bool]) -> FaultSet {
        let mut set = FaultSet {
            clock_offset_ms: self.clock.get(&i).copied().unwrap_or(0),
            ..FaultSet::default()
        };
        for (j, name) in names.iter().enumerate() {
            if j == i || !present.get(j).copied().unwrap_or(false) {
                continue;
            }
            let (out, back) = (self.cut.contains(&(i, j)), self.cut.contains(&(j, i)));
            if (out && back) || self.flapped.contains(&pair(i, j)) {
                set.cut.insert(name.clone());
            } else if out {
                set.drop_to.insert(name.clone());
            }
            let delay = self.base_delay_ms + self.slow.get(&pair(i, j)).copied().unwrap_or(0);
            if delay > 0 {
                set.delay_ms.insert(name.clone(), delay);
            }
        }
        set
    }

    fn heal(&mut self) {
        self.cut.clear();
        self.flapped.clear();
        self.slow.clear();
    }
}

/// A convergence question the observer answers: when does every region up (or just `only`)
/// hold at least `target`?
#[derive(Debug)]
struct Watch {
    label: String,
    at: Instant,
    at_ms: u64,
    target: BTreeMap<String, u64>,
    only: Option<usize>,
    done_ms: Option<u64>,
}

/// A region's counters as last read. Events sent are kept per peer: a node's status lists only
/// its current neighbours, and a peer that leaves the list (a region left, the links changed)
/// takes its count with it, which a sum over the list would read as a restart.
#[derive(Clone, Default)]
struct Counters {
    writes: u64,
    conflicts_resolved: u64,
    /// By peer region: events sent to it, including peers no longer listed.
    events_sent: BTreeMap<String, u64>,
}

/// What the observer has seen.
struct Observed {
    /// Each region's latest status, and when it was read.
    statuses: Vec<Option<(Status, Instant)>>,
    /// Highest sequence number of each origin ever seen anywhere.
    max_seen: BTreeMap<String, u64>,
    /// Per region: its last counters read, to accumulate across restarts.
    last_counters: Vec<Option<Counters>>,
    writes_total: u64,
    events_sent_total: u64,
    conflicts_total: u64,
    lag_last: Vec<Option<LagHistograms>>,
    lag_total: Histogram<u64>,
    lag_by_link: BTreeMap<String, Histogram<u64>>,
    timeline: Vec<LagPoint>,
    watches: Vec<Watch>,
}

fn lag_histogram() -> Histogram<u64> {
    // Valid bounds: construction cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid histogram bounds")
}

fn figures(h: &Histogram<u64>) -> LagFigures {
    LagFigures {
        count: h.len(),
        p50: h.value_at_quantile(0.5),
        p99: h.value_at_quantile(0.99),
        max: h.max(),
    }
}

fn dominates(vector: &BTreeMap<String, u64>, target: &BTreeMap<String, u64>) -> bool {
    target
        .iter()
        .all(|(origin, seq)| vector.get(origin).copied().unwrap_or(0) >= *seq)
}

impl Observed {
    fn new(n: usize) -> Observed {
        Observed {
            statuses: vec![None; n],
            max_seen: BTreeMap::new(),
            last_counters: vec![None; n],
            writes_total: 0,
            events_sent_total: 0,
            conflicts_total: 0,
            lag_last: vec![None; n],
            lag_total: lag_histogram(),
            lag_by_link: BTreeMap::new(),
            timeline: Vec::new(),
            watches: Vec::new(),
        }
    }

    fn record_status(&mut self, i: usize, status: Status) {
        for (origin, seq) in &status.vector {
            let seen = self.max_seen.entry(origin.clone()).or_default();
            *seen = (*seen).max(*seq);
        }
        let before = self.last_counters[i].take().unwrap_or_default();
        // A restarted node counts from zero again.
        let delta = |now: u64, before: u64| now.checked_sub(before).unwrap_or(now);
        self.writes_total += delta(status.writes, before.writes);
        self.conflicts_total += delta(status.conflicts_resolved, before.conflicts_resolved);
        let mut sent = before.events_sent;
        for peer in &status.peers {
            let before = sent.get(&peer.region).copied().unwrap_or(0);
            self.events_sent_total += delta(peer.events_sent, before);
            sent.insert(peer.region.clone(), peer.events_sent);
        }
        self.last_counters[i] = Some(Counters {
            writes: status.writes,
            conflicts_resolved: status.conflicts_resolved,
            events_sent: sent,
        });
        self.statuses[i] = Some((status, Instant::now()));
    }

    /// Readings taken before the workload: later ones count from them.
    fn baseline(&mut self, i: usize, status: &Status, lag: LagHistograms) {
        self.last_counters[i] = Some(Counters {
            writes: status.writes,
            conflicts_resolved: status.conflicts_resolved,
            events_sent: status
                .peers
                .iter()
                .map(|p| (p.region.clone(), p.events_sent))
                .collect(),
        });
        self.lag_last[i] = Some(lag);
    }

    /// A region is down: its next process counts from zero.
    fn forget(&mut self, i: usize) {
        self.statuses[i] = None;
        self.last_counters[i] = None;
        self.lag_last[i] = None;
    }

    fn record_lag(&mut self, i: usize, lag: LagHistograms, t_ms: u64) {
        for (origin, values) in &lag.origins {
            let earlier = self.lag_last[i]
                .as_ref()
                .and_then(|l| l.origins.get(origin))
                .map(Vec::as_slice);
            let h = lag_delta(earlier, values, 1);
            if h.is_empty() {
                continue;
            }
            let link = format!("{origin}->{}", lag.region);
            let _ = self.lag_total.add(&h);
            let _ = self
                .lag_by_link
                .entry(link.clone())
                .or_insert_with(lag_histogram)
                .add(&h);
            if self.timeline.len() < TIMELINE_POINTS_MAX {
                self.timeline.push(LagPoint {
                    t_ms,
                    link,
                    count: h.len(),
                    p50: h.value_at_quantile(0.5),
                    p99: h.value_at_quantile(0.99),
                });
            }
        }
        self.lag_last[i] = Some(lag);
    }

    /// A watch is done when every region it covers that is up was read after the watch began
    /// and holds its target, and there was at least one such region.
    fn check_watches(&mut self, up: &[bool], now: Instant) {
        for watch in self.watches.iter_mut().filter(|w| w.done_ms.is_none()) {
            let mut ready = true;
            let mut checked = 0;
            for (i, status) in self.statuses.iter().enumerate() {
                if !up[i] || watch.only.is_some_and(|only| only != i) {
                    continue;
                }
                checked += 1;
                ready &= status.as_ref().is_some_and(|(s, read)| {
                    *read > watch.at && dominates(&s.vector, &watch.target)
                });
            }
            if ready && checked > 0 {
                watch.done_ms = Some(now.duration_since(watch.at).as_millis() as u64);
            }
        }
    }

    /// The component-wise maximum of the vectors of the regions up.
    fn frontier(&self, up: &[bool]) -> BTreeMap<String, u64> {
        let mut target = BTreeMap::new();
        for (i, status) in self.statuses.iter().enumerate() {
            if let (true, Some((status, _))) = (up[i], status) {
                for (origin, seq) in &status.vector {
                    let t: &mut u64 = target.entry(origin.clone()).or_default();
                    *t = (*t).max(*seq);
                }
            }
        }
        target
    }
}

type Shared = Arc<Mutex<Observed>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Observed> {
    // A poisoned lock means a panic elsewhere already failed the drill; the data is still
    // what was observed.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

async fn get_json<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    path: &str,
) -> Result<T, String> {
    let body = crate::admin_client::get(addr, path, ADMIN_TIMEOUT)
        .await
        .map_err(|e| format!("http://{addr}{path}: {e}"))?;
    serde_json::from_str(&body).map_err(|e| format!("http://{addr}{path}: {e}"))
}

/// Polls every region that is up, until `stop`.
async fn observe(
    https: Vec<SocketAddr>,
    ups: Vec<watch::Receiver<bool>>,
    shared: Shared,
    start: Instant,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut polls = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        polls += 1;
        let up: Vec<bool> = ups.iter().map(|u| *u.borrow()).collect();
        for (i, addr) in https.iter().enumerate() {
            if !up[i] {
                continue;
            }
            if let Ok(status) = get_json::<Status>(*addr, "/status").await {
                lock(&shared).record_status(i, status);
            }
            if polls.is_multiple_of(LAG_EVERY_POLLS) {
                if let Ok(lag) = get_json::<LagHistograms>(*addr, "/lag").await {
                    let t_ms = start.elapsed().as_millis() as u64;
                    lock(&shared).record_lag(i, lag, t_ms);
                }
            }
        }
        // Readings of regions that are down are stale: forget them.
        let mut observed = lock(&shared);
        for (i, up) in up.iter().enumerate() {
            if !up {
                observed.forget(i);
            }
        }
        observed.check_watches(&up, Instant::now());
    }
}

/// Checks what the scenario asks for against what real processes can do; returns the notes
/// for the report.
fn check_supported(
    scenario: &Scenario,
    durability: Durability,
    faults_available: bool,
    attached: bool,
) -> Result<Vec<String>, DrillError> {
    let mut notes = Vec::new();
    if let Some(mode) = scenario.durability {
        if mode.name() != durability.name() {
            notes.push(format!(
                "the scenario's durability is {}; this drill runs with {} (--durability)",
                mode.name(),
                durability.name()
            ));
        }
    }
    let net = &scenario.network;
    for (what, p) in [
        ("loss", net.loss),
        ("duplicate", net.duplicate),
        ("reorder", net.reorder),
    ] {
        if p > 0.0 {
            notes.push(format!(
                "network.{what} = {p} is simulated only: QUIC streams neither lose, duplicate \
                 nor reorder what they deliver, so the drill ignores it"
            ));
        }
    }
    if let Some(events) = scenario.change_log_retention_events {
        return Err(DrillError::Unsupported(format!(
            "change-log-retention-events = {events} is simulator-only: a drill keeps every \
             change log whole, since its checks read them"
        )));
    }
    let base_delay = (net.latency_ms_min + net.latency_ms_max) / 2;
    for fault in &scenario.timeline {
        match &fault.action {
            Action::ClockSkew { offset_ms, .. }
                if offset_ms.unsigned_abs() > CLOCK_OFFSET_MS_MAX.unsigned_abs() =>
            {
                return Err(DrillError::Unsupported(format!(
                    "clock-skew of {offset_ms} ms at {} ms: a node accepts at most \
                     ±{CLOCK_OFFSET_MS_MAX} ms",
                    fault.at_ms
                )));
            }
            Action::SlowLink { extra_ms, .. }
                if base_delay.saturating_add(*extra_ms) > DELAY_MS_MAX =>
            {
                return Err(DrillError::Unsupported(format!(
                    "slow-link of {extra_ms} ms at {} ms: with the {base_delay} ms link latency \
                     that exceeds the {DELAY_MS_MAX} ms a node holds frames for",
                    fault.at_ms
                )));
            }
            _ => {}
        }
        match &fault.action {
            Action::Join { region } | Action::Leave { region } if attached => {
                return Err(DrillError::Unsupported(format!(
                    "{} at {} ms needs a cluster the drill starts: a region that joined or left \
                     an attached cluster could not be given back as it was (ids of removed \
                     regions are never reused). Against your own cluster, `braid add-region` \
                     and `braid join` admit region {region}, and `braid leave` takes it out",
                    action_name(&fault.action),
                    fault.at_ms
                )));
            }
            Action::PowerFail { region } if durability != Durability::Machine => {
                return Err(DrillError::Unsupported(format!(
                    "power-fail of region {region} at {} ms: the cluster runs with {} \
                     durability, which does not promise to survive power loss, and a drill \
                     cannot drop one process's unsynced writes from the page cache. {} \
                     (every acknowledged write synced; the drill then kills the process, which \
                     loses what a power failure could: nothing acknowledged), or use kill",
                    fault.at_ms,
                    durability.name(),
                    match attached {
                        true =>
                            "Start a cluster in machine durability (`braid cluster up --dir \
                                 NEW_DIR --durability machine`: a cluster's layout is fixed when \
                                 it is made)",
                        false => "Run with --durability machine",
                    }
                )));
            }
            Action::Kill { .. }
            | Action::KillLeader { .. }
            | Action::Restart { .. }
            | Action::PowerFail { .. }
            | Action::Join { .. }
            | Action::Leave { .. } => {}
            other if !faults_available => {
                return Err(DrillError::Unsupported(format!(
                    "{} at {} ms needs fault injection, which the attached cluster's nodes do \
                     not have: start a cluster with it (`braid cluster up --dir NEW_DIR \
                     --fault-injection --keep-change-log`: a cluster's layout is fixed when it is \
                     made)",
                    action_name(other),
                    fault.at_ms
                )));
            }
            _ => {}
        }
    }
    if base_delay > DELAY_MS_MAX {
        return Err(DrillError::Unsupported(format!(
            "network latency of {base_delay} ms exceeds the {DELAY_MS_MAX} ms a node holds \
             frames for"
        )));
    }
    if !faults_available {
        notes.push(
            "the attached cluster has no fault injection: links run at loopback latency, not \
             the scenario's"
                .into(),
        );
    } else {
        notes.push(format!(
            "network latency: every frame is held {} ms (the middle of the scenario's \
             {}..{} ms); the simulator draws it per message",
            (net.latency_ms_min + net.latency_ms_max) / 2,
            net.latency_ms_min,
            net.latency_ms_max
        ));
    }
    Ok(notes)
}

fn action_name(action: &Action) -> String {
    match action {
        Action::Kill { region } => format!("kill {region}"),
        Action::KillLeader { .. } => "kill-leader".into(),
        Action::Join { region } => format!("join {region}"),
        Action::Leave { region } => format!("leave {region}"),
        Action::Restart { region } => format!("restart {region}"),
        Action::PowerFail { region } => format!("power-fail {region}"),
        Action::Partition { groups, one_way } => {
            let groups: Vec<String> = groups.iter().map(|g| g.join(",")).collect();
            format!(
                "partition {}{}",
                groups.join(" | "),
                if *one_way { " (one way)" } else { "" }
            )
        }
        Action::Heal {} => "heal".into(),
        Action::Flap { from, to, .. } => format!("flap {from}-{to}"),
        Action::ClockSkew { region, offset_ms } => format!("clock-skew {region} {offset_ms:+} ms"),
        Action::SlowLink { from, to, extra_ms } => format!("slow-link {from}-{to} +{extra_ms} ms"),
    }
}

/// A step of the timeline, in order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Fault(usize),
    /// A region a `kill-leader` took down starts again, unless it was killed again since (its
    /// kill count moved on from `kills`): a later kill is another fault's, to end as it says.
    Restart {
        region: usize,
        kills: u64,
    },
    Flap {
        a: usize,
        b: usize,
        period_ms: u64,
        until_ms: u64,
        down: bool,
    },
    /// A look at a join or a leave in progress.
    Membership(usize),
    End,
}

/// Where region `name` is in `names`. The scenario was validated: every name is a region.
fn region_index(names: &[String], name: &str) -> usize {
    names.iter().position(|n| n == name).unwrap_or(0)
}

/// The drill's steps in time order, and what each step schedules by itself: a `flap` fault its
/// first turn, a turn the next one until `until-ms`, and a `heal` the end of every flap running.
/// What depends on the cluster (a restart after a leader kill, the next look at a membership
/// change) the drill schedules with [`Timeline::push`].
#[derive(Debug)]
struct Timeline {
    steps: BTreeMap<(u64, u64), Step>,
    /// Steps due at the same time run in the order they were scheduled.
    order: u64,
}

impl Timeline {
    /// Every fault of `scenario` at its time scaled by `scale`, and the end at `total_ms`.
    fn new(scenario: &Scenario, scale: f64, total_ms: u64) -> Timeline {
        let mut timeline = Timeline {
            steps: BTreeMap::new(),
            order: 0,
        };
        for (i, fault) in scenario.timeline.iter().enumerate() {
            timeline.push(scaled(fault.at_ms, scale), Step::Fault(i));
        }
        timeline.steps.insert((total_ms, u64::MAX), Step::End);
        timeline
    }

    fn push(&mut self, at_ms: u64, step: Step) {
        self.order += 1;
        self.steps.insert((at_ms, self.order), step);
    }

    /// The next step and its due time, and what it schedules by itself.
    fn pop(&mut self, scenario: &Scenario, names: &[String], scale: f64) -> Option<(u64, Step)> {
        let ((due_ms, _), step) = self.steps.pop_first()?;
        match &step {
            Step::Fault(i) => match &scenario.timeline[*i].action {
                Action::Flap {
                    from,
                    to,
                    period_ms,
                    until_ms,
                } => {
                    let until_ms = scaled(*until_ms, scale);
                    self.push(
                        due_ms,
                        Step::Flap {
                            a: region_index(names, from),
                            b: region_index(names, to),
                            period_ms: scaled(*period_ms, scale).max(1),
                            until_ms,
                            // Down first, unless scaling rounded its start onto its end.
                            down: due_ms < until_ms,
                        },
                    );
                }
                // `heal` ends every flap running, with its link up (the drill restores it).
                Action::Heal {} => self
                    .steps
                    .retain(|_, step| !matches!(step, Step::Flap { .. })),
                _ => {}
            },
            Step::Flap {
                a,
                b,
                period_ms,
                until_ms,
                down,
            } if due_ms < *until_ms => {
                // The last turn comes at `until_ms`, and leaves the link up.
                let next = (due_ms + period_ms).min(*until_ms);
                self.push(
                    next,
                    Step::Flap {
                        a: *a,
                        b: *b,
                        period_ms: *period_ms,
                        until_ms: *until_ms,
                        down: !down && next < *until_ms,
                    },
                );
            }
            _ => {}
        }
        Some((due_ms, step))
    }
}

/// A region failure being measured.
struct Failure {
    report: FailureReport,
    /// Half a second after the failure: the highest of its sequence numbers another region held.
    held: Option<tokio::task::JoinHandle<u64>>,
    /// Its client's unknown outcomes before the failure.
    unknown_before: u64,
    /// The observer's watches for its recovery and for its events reappearing.
    watches: Option<(usize, usize)>,
}

/// The drill in progress.
struct Drill<'a> {
    options: &'a DrillOptions,
    names: Vec<String>,
    file: ClusterFile,
    /// The cluster's directory (cluster.json).
    cluster_dir: PathBuf,
    attached: bool,
    regions: Vec<Region>,
    net: NetState,
    faults_available: bool,
    durability: Durability,
    warnings: Vec<String>,
    shared: Shared,
    start: Instant,
    failures: Vec<Failure>,
    marks: Vec<FaultMark>,
    convergence_watches: Vec<usize>,
    /// Joins and leaves finished: (region, "join" or "leave", begun at ms, taken ms).
    memberships: Vec<(String, &'static str, u64, u64)>,
}

impl Drill<'_> {
    fn elapsed_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn up(&self) -> Vec<bool> {
        self.regions.iter().map(|r| *r.up.borrow()).collect()
    }

    /// The regions the mesh's nodes know as members: the ones faults may name.
    fn present(&self) -> Vec<bool> {
        self.regions
            .iter()
            .map(|r| matches!(r.phase, Phase::Member | Phase::Leaving))
            .collect()
    }

    fn index(&self, name: &str) -> usize {
        region_index(&self.names, name)
    }

    /// Sends every region that is up and in the mesh its share of the network faults.
    async fn push_faults(&self) -> Result<(), DrillError> {
        if !self.faults_available {
            return Ok(());
        }
        let present = self.present();
        for (i, region) in self.regions.iter().enumerate() {
            if *region.up.borrow() && present[i] {
                self.push_faults_to(i, &present).await?;
            }
        }
        Ok(())
    }

    async fn push_faults_to(&self, i: usize, present: &[bool]) -> Result<(), DrillError> {
        if !self.faults_available {
            return Ok(());
        }
        let set = self.net.fault_set(i, &self.names, present);
        let body = serde_json::to_string(&set)
            .map_err(|e| DrillError::Cluster(format!("encoding faults: {e}")))?;
        let region = &self.regions[i];
        let deadline = Instant::now() + FAULTS_RETRY;
        loop {
            // A region that just joined is unknown to a node until its next upkeep: such a
            // refusal passes within a second.
            match crate::admin_client::post_json(region.http, "/faults", &body, ADMIN_TIMEOUT).await
            {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(DrillError::Cluster(format!(
                        "region {}: POST /faults: {e}",
                        region.name
                    )))
                }
                Err(_) => tokio::time::sleep(MEMBERSHIP_POLL).await,
            }
        }
    }

    /// Starts region `i`'s `braid join` through a member that is up.
    async fn begin_join(&mut self, i: usize) -> Result<(), DrillError> {
        if self.regions[i].phase != Phase::Outside {
            return Ok(());
        }
        let via = self
            .regions
            .iter()
            .find(|r| r.phase == Phase::Member && *r.up.borrow())
            .map(|r| r.http)
            .ok_or_else(|| {
                DrillError::Cluster(format!("no member is up to admit region {}", self.names[i]))
            })?;
        // A joiner knows no peer until it is admitted, so it starts without faults: they are
        // pushed to it (and the others learn to name it) once it serves.
        let child =
            launch::spawn_join_with_env(&mut self.file.regions[i], &self.options.exe, via, &[])
                .map_err(|e| DrillError::Cluster(e.to_string()))?;
        self.save_cluster_file()?;
        let at_ms = self.elapsed_ms();
        let region = &mut self.regions[i];
        region.child = Some(child);
        region.phase = Phase::Joining;
        region.change_since = Some((Instant::now(), at_ms));
        Ok(())
    }

    /// Asks region `i` to leave the mesh (`POST /leave`): it drains, is removed and exits.
    async fn begin_leave(&mut self, i: usize) -> Result<(), DrillError> {
        if self.leave_skipped(i).is_some() {
            return Ok(());
        }
        let region = &self.regions[i];
        if !*region.up.borrow() {
            // Leaving is the region's own work (it drains, then removes itself).
            self.warnings.push(format!(
                "leave {} at {} ms: the region is down; it leaves once it runs again",
                region.name,
                self.elapsed_ms()
            ));
            self.regions[i].leave_deferred = true;
            return Ok(());
        }
        // A node just restarted serves before its control plane has read its state, and
        // refuses a leave until then.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let status = get_json::<Status>(region.http, "/status").await;
            if status.is_ok_and(|s| !s.control.members.is_empty()) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(DrillError::Cluster(format!(
                    "region {}: its control plane showed no members within {START_TIMEOUT:?}",
                    region.name
                )));
            }
            tokio::time::sleep(MEMBERSHIP_POLL).await;
        }
        crate::admin_client::post_json(region.http, "/leave", "{}", Duration::from_secs(15))
            .await
            .map_err(|e| {
                DrillError::Cluster(format!("region {}: POST /leave: {e}", region.name))
            })?;
        let at_ms = self.elapsed_ms();
        let region = &mut self.regions[i];
        region.phase = Phase::Leaving;
        region.change_since = Some((Instant::now(), at_ms));
        Ok(())
    }

    /// Writes cluster.json with the processes as they are now (a region that joined has one,
    /// one that left has none), for whoever looks at the drill's directory.
    fn save_cluster_file(&self) -> Result<(), DrillError> {
        self.file
            .save(&self.cluster_dir)
            .map_err(|e| DrillError::Cluster(e.to_string()))
    }

    /// Looks at region `i`'s join or leave in progress; true once it is over (or there is none).
    async fn poll_membership(&mut self, i: usize) -> Result<bool, DrillError> {
        let Some((since, at_ms)) = self.regions[i].change_since else {
            return Ok(true);
        };
        let name = self.names[i].clone();
        let exited = match self.regions[i].child.as_mut() {
            Some(child) => child.try_wait().ok().flatten(),
            None => None,
        };
        match self.regions[i].phase {
            Phase::Joining => {
                if let Some(exit) = exited {
                    let log = launch::log_path(&self.file.regions[i].config);
                    return Err(DrillError::Cluster(format!(
                        "region {name} exited during its join ({exit}); see {}{}",
                        log.display(),
                        launch::log_tail(&log)
                    )));
                }
                // Its admin server starts once its data snapshot is installed.
                if get_json::<Status>(self.regions[i].http, "/status")
                    .await
                    .is_err()
                {
                    if since.elapsed() > JOIN_TIMEOUT {
                        return Err(DrillError::Cluster(format!(
                            "region {name} did not join within {JOIN_TIMEOUT:?}"
                        )));
                    }
                    return Ok(false);
                }
                let took_ms = since.elapsed().as_millis() as u64;
                let region = &mut self.regions[i];
                region.phase = Phase::Member;
                region.change_since = None;
                region.up.send_replace(true);
                region.member.send_replace(true);
                self.push_faults().await?;
                let target = lock(&self.shared).frontier(&self.up());
                let watch = self.watch(format!("join {name}"), target, None, since);
                self.convergence_watches.push(watch);
                self.memberships.push((name, "join", at_ms, took_ms));
                Ok(true)
            }
            Phase::Leaving => {
                if exited.is_none() {
                    if since.elapsed() > LEAVE_TIMEOUT {
                        return Err(DrillError::Cluster(format!(
                            "region {name} did not leave within {LEAVE_TIMEOUT:?}"
                        )));
                    }
                    return Ok(false);
                }
                let took_ms = since.elapsed().as_millis() as u64;
                let region = &mut self.regions[i];
                region.phase = Phase::Left;
                region.change_since = None;
                region.child = None;
                region.up.send_replace(false);
                region.member.send_replace(false);
                // Reaped: its pid may be reused by anything now.
                self.file.regions[i].pid = None;
                self.save_cluster_file()?;
                lock(&self.shared).forget(i);
                self.push_faults().await?;
                self.memberships.push((name, "leave", at_ms, took_ms));
                Ok(true)
            }
            _ => Ok(true),
        }
    }

    /// Asks the observer when every region up (or `only`) holds `target`, counting from `since`.
    fn watch(
        &self,
        label: String,
        target: BTreeMap<String, u64>,
        only: Option<usize>,
        since: Instant,
    ) -> usize {
        let mut observed = lock(&self.shared);
        observed.watches.push(Watch {
            label,
            at: since,
            at_ms: since.duration_since(self.start).as_millis() as u64,
            target,
            only,
            done_ms: None,
        });
        observed.watches.len() - 1
    }

    async fn fail(&mut self, i: usize, kind: &str) -> Result<(), DrillError> {
        if self.kill_skipped(i).is_some() {
            return Ok(());
        }
        // An attached region's process is found through cluster.json: make sure it is a node.
        let attached_pid = match self.regions[i].child {
            Some(_) => None,
            None => {
                let name = &self.names[i];
                let region = &self.file.regions[i];
                let pid = launch::running_pid(region).ok_or_else(|| {
                    DrillError::Cluster(format!(
                        "the process cluster.json records for region {name} ({:?}) is not its \
                         running node: cannot kill it",
                        region.pid
                    ))
                })?;
                Some(pid)
            }
        };
        let at_ms = self.elapsed_ms();
        let unknown_before = self.regions[i].counters.read()[2];
        self.regions[i].kills += 1;
        self.regions[i].up.send_replace(false);
        if let Some(mut child) = self.regions[i].child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
            // Reaped: its pid may be reused by anything now.
            self.file.regions[i].pid = None;
        }
        if let Some(pid) = attached_pid {
            launch::signal(pid, libc::SIGKILL);
            let deadline = Instant::now() + KILL_WAIT;
            while launch::alive(pid) && !launch::zombie(pid) {
                if Instant::now() > deadline {
                    return Err(DrillError::Cluster(format!(
                        "region {} (pid {pid}) survived kill -9 for {KILL_WAIT:?}",
                        self.names[i]
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // Half a second on, ask the others what they hold of it.
        let others: Vec<SocketAddr> = self
            .regions
            .iter()
            .enumerate()
            .filter(|(j, r)| *j != i && *r.up.borrow())
            .map(|(_, r)| r.http)
            .collect();
        let name = self.names[i].clone();
        let held = tokio::spawn(async move {
            tokio::time::sleep(SETTLE).await;
            let mut best = 0;
            for addr in others {
                if let Ok(status) = get_json::<Status>(addr, "/status").await {
                    best = best.max(status.vector.get(&name).copied().unwrap_or(0));
                }
            }
            best
        });
        let report = FailureReport {
            region: self.names[i].clone(),
            kind: kind.into(),
            at_ms,
            ..FailureReport::default()
        };
        self.failures.push(Failure {
            report,
            held: Some(held),
            unknown_before,
            watches: None,
        });
        Ok(())
    }

    async fn restart(&mut self, i: usize) -> Result<(), DrillError> {
        if self.restart_skipped(i).is_some() {
            return Ok(());
        }
        let restarted = Instant::now();
        let restarted_ms = self.elapsed_ms();
        // Its faults (cuts, delays, its clock) hold from its first frame, as in the simulator.
        let faults = if self.faults_available {
            serde_json::to_string(&self.net.fault_set(i, &self.names, &self.present()))
                .map_err(|e| DrillError::Cluster(format!("encoding faults: {e}")))?
        } else {
            String::new()
        };
        let env: Vec<(&str, &str)> = if faults.is_empty() {
            Vec::new()
        } else {
            vec![(crate::faults::FAULTS_ENV, faults.as_str())]
        };
        let entry: &mut RegionEntry = &mut self.file.regions[i];
        let mut child =
            launch::spawn_region_with_env(entry, &self.options.exe, self.attached, &env)
                .map_err(|e| DrillError::Cluster(e.to_string()))?;
        if self.attached {
            self.file
                .save(&self.cluster_dir)
                .map_err(|e| DrillError::Cluster(e.to_string()))?;
        }
        let http = self.regions[i].http;
        let status = loop {
            if let Ok(Some(exit)) = child.try_wait() {
                let log = launch::log_path(&self.file.regions[i].config);
                return Err(DrillError::Cluster(format!(
                    "region {} exited at restart ({exit}); see {}{}",
                    self.names[i],
                    log.display(),
                    launch::log_tail(&log)
                )));
            }
            if let Ok(status) = get_json::<Status>(http, "/status").await {
                break status;
            }
            if restarted.elapsed() > START_TIMEOUT {
                return Err(DrillError::Cluster(format!(
                    "region {} did not answer within {START_TIMEOUT:?} of its restart",
                    self.names[i]
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let serving_ms = restarted.elapsed().as_millis() as u64;
        if !self.attached {
            self.regions[i].child = Some(child);
        }

        let own = status.vector.get(&self.names[i]).copied().unwrap_or(0);
        let up = self.up();
        let target = lock(&self.shared).frontier(&up);
        let name = self.names[i].clone();
        if let Some(pos) = self
            .failures
            .iter()
            .rposition(|f| f.report.region == name && f.report.restarted_at_ms.is_none())
        {
            let held = match self.failures[pos].held.take() {
                Some(task) => task.await.unwrap_or(0),
                None => 0,
            };
            let unknown_before = self.failures[pos].unknown_before;
            let unknown_now = self.regions[i].counters.read()[2];
            let f = &mut self.failures[pos].report;
            f.last_seq = own;
            f.replicated_seq = held;
            f.unreplicated_events = own.saturating_sub(held);
            f.in_flight_writes = unknown_now.saturating_sub(unknown_before);
            f.rpo_writes_max = f.unreplicated_events;
            f.rpo_writes_min = f.unreplicated_events.saturating_sub(f.in_flight_writes);
            f.restarted_at_ms = Some(restarted_ms);
            f.serving_ms = Some(serving_ms);
            let recover = self.watch(format!("recovery {name}"), target, Some(i), restarted);
            let back = self.watch(
                format!("reappeared {name}"),
                BTreeMap::from([(name.clone(), own)]),
                None,
                restarted,
            );
            self.failures[pos].watches = Some((recover, back));
        }
        self.regions[i].up.send_replace(true);
        let label = format!("restart {name}");
        let target = lock(&self.shared).frontier(&self.up());
        let watch = self.watch(label, target, None, restarted);
        self.convergence_watches.push(watch);
        if std::mem::take(&mut self.regions[i].leave_deferred) {
            self.begin_leave(i).await?;
        }
        Ok(())
    }

    /// Why `action` would do nothing now, if it would: [`Drill::perform`] leaves a region
    /// alone that is already as the action would make it, or not (or no longer) a member.
    fn skipped(&self, action: &Action) -> Option<String> {
        match action {
            Action::Kill { region } | Action::PowerFail { region } => {
                self.kill_skipped(self.index(region))
            }
            Action::Restart { region } => self.restart_skipped(self.index(region)),
            Action::Leave { region } => self.leave_skipped(self.index(region)),
            _ => None,
        }
    }

    /// Why a kill of region `i` does nothing, if it does: it is down.
    fn kill_skipped(&self, i: usize) -> Option<String> {
        let name = &self.names[i];
        match self.regions[i].phase {
            Phase::Outside | Phase::Left => {
                Some(format!("region {name} is not a member of the mesh"))
            }
            Phase::Joining => Some(format!(
                "region {name} is still joining (its data snapshot would be cut short)"
            )),
            Phase::Member | Phase::Leaving => {
                (!*self.regions[i].up.borrow()).then(|| format!("region {name} is down already"))
            }
        }
    }

    /// Why a restart of region `i` does nothing, if it does: it runs, or is no member.
    fn restart_skipped(&self, i: usize) -> Option<String> {
        let name = &self.names[i];
        if *self.regions[i].up.borrow() {
            return Some(format!("region {name} is running"));
        }
        let member = matches!(self.regions[i].phase, Phase::Member | Phase::Leaving);
        (!member).then(|| format!("region {name} is not a member of the mesh"))
    }

    /// Why a leave of region `i` does nothing, if it does: it is no member, or leaving.
    fn leave_skipped(&self, i: usize) -> Option<String> {
        let name = &self.names[i];
        if self.regions[i].phase != Phase::Member {
            return Some(format!(
                "region {name} is not a member of the mesh (or leaving already)"
            ));
        }
        self.regions[i]
            .leave_deferred
            .then(|| format!("region {name} leaves already once it runs again"))
    }

    async fn perform(&mut self, action: &Action) -> Result<(), DrillError> {
        match action {
            Action::Kill { region } => self.fail(self.index(region), "kill").await?,
            Action::PowerFail { region } => self.fail(self.index(region), "power-fail").await?,
            Action::Restart { region } => self.restart(self.index(region)).await?,
            Action::Partition { groups, one_way } => {
                let group_of = |r: usize| groups.iter().position(|g| g.contains(&self.names[r]));
                let n = self.names.len();
                for a in 0..n {
                    for b in 0..n {
                        let (ga, gb) = (group_of(a), group_of(b));
                        if a != b && ga != gb && (!one_way || ga == Some(0)) {
                            self.net.cut.insert((a, b));
                        }
                    }
                }
                self.push_faults().await?;
            }
            Action::Heal {} => {
                self.net.heal();
                self.push_faults().await?;
                let target = lock(&self.shared).frontier(&self.up());
                let watch = self.watch("heal".into(), target, None, Instant::now());
                self.convergence_watches.push(watch);
            }
            Action::ClockSkew { region, offset_ms } => {
                self.net.clock.insert(self.index(region), *offset_ms);
                self.push_faults().await?;
            }
            Action::SlowLink { from, to, extra_ms } => {
                let key = pair(self.index(from), self.index(to));
                self.net.slow.insert(key, *extra_ms);
                self.push_faults().await?;
            }
            Action::Join { region } => self.begin_join(self.index(region)).await?,
            Action::Leave { region } => self.begin_leave(self.index(region)).await?,
            // Scheduled as steps by the caller.
            Action::Flap { .. } | Action::KillLeader { .. } => {}
        }
        Ok(())
    }

    /// The region whose node leads the control plane, as the regions that are up report it
    /// (the report of the highest term wins). While an election is on, it waits up to
    /// [`LEADER_WAIT`] for one; none when no region knows a leader by then.
    async fn leader(&self) -> Option<usize> {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            if let Some(leader) = self.leader_now().await {
                return Some(leader);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(LEADER_POLL).await;
        }
    }

    async fn leader_now(&self) -> Option<usize> {
        let mut best: Option<(u64, String)> = None;
        for region in self.regions.iter().filter(|r| *r.up.borrow()) {
            let Ok(status) = get_json::<Status>(region.http, "/status").await else {
                continue;
            };
            let control = status.control;
            if let Some(leader) = control.leader {
                if best.as_ref().is_none_or(|(term, _)| control.term > *term) {
                    best = Some((control.term, leader));
                }
            }
        }
        // A leader just killed may still be named by followers that have not noticed yet:
        // not one to kill, wait for the next.
        let (_, name) = best?;
        let leader = self.names.iter().position(|n| *n == name)?;
        (*self.regions[leader].up.borrow()).then_some(leader)
    }
}

/// Refuses an attached cluster whose committed links are not the scenario's: a drill of a chain
/// run on a full mesh would measure another topology's lag, messages and partitions.
fn check_attached_links(scenario: &Scenario, links: &[[String; 2]]) -> Result<(), DrillError> {
    let pairs = |links: &mut dyn Iterator<Item = (&str, &str)>| -> BTreeSet<(String, String)> {
        links
            .map(|(a, b)| (a.min(b).to_string(), a.max(b).to_string()))
            .collect()
    };
    let wanted = match &scenario.links {
        Some(links) => pairs(&mut links.iter().map(|[a, b]| (a.as_str(), b.as_str()))),
        None => {
            let regions = &scenario.regions;
            pairs(&mut regions.iter().enumerate().flat_map(|(i, a)| {
                regions[i + 1..]
                    .iter()
                    .map(move |b| (a.as_str(), b.as_str()))
            }))
        }
    };
    let found = pairs(&mut links.iter().map(|[a, b]| (a.as_str(), b.as_str())));
    if found == wanted {
        return Ok(());
    }
    let text = |set: &BTreeSet<(String, String)>| {
        set.iter()
            .map(|(a, b)| format!("{a}-{b}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    Err(DrillError::Options(format!(
        "the attached cluster's links ({}) are not the scenario's ({}): set them with `braid \
         topology set --links {}` (or `--mesh`)",
        text(&found),
        text(&wanted),
        wanted
            .iter()
            .map(|(a, b)| format!("{a}-{b}"))
            .collect::<Vec<_>>()
            .join(",")
    )))
}

/// Starts the scenario's cluster, or attaches to one; returns it with its directory and, for a
/// started one, its processes.
async fn cluster_for(
    options: &DrillOptions,
    work: Option<&WorkDir>,
) -> Result<(ClusterFile, PathBuf, Option<Vec<tokio::process::Child>>), DrillError> {
    let fail = |e: &dyn std::fmt::Display| DrillError::Cluster(e.to_string());
    let scenario = &options.scenario;
    if let Some(dir) = &options.attach {
        let file = ClusterFile::load(dir).map_err(|e| fail(&e))?;
        let names: Vec<&str> = file.regions.iter().map(|r| r.name.as_str()).collect();
        if names
            != scenario
                .regions
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        {
            return Err(DrillError::Options(format!(
                "the attached cluster's regions ({}) are not the scenario's ({}), in order",
                names.join(", "),
                scenario.regions.join(", ")
            )));
        }
        // The checks read every region's whole change log: a cluster that deletes what every
        // region holds would show gaps and an oracle short of those events.
        for entry in &file.regions {
            let config = NodeConfig::load(&entry.config)
                .map_err(|e| DrillError::Cluster(format!("region {}: {e}", entry.name)))?;
            if config.change_log_gc {
                return Err(DrillError::Unsupported(format!(
                    "region {} garbage-collects its change log, and the drill's checks read \
                     whole change logs: set change-log-gc = false in every braid.toml and \
                     restart the regions, or start a cluster with `braid cluster up --dir NEW_DIR \
                     --keep-change-log`",
                    entry.name
                )));
            }
        }
        return Ok((file, dir.clone(), None));
    }
    let Some(work) = work else {
        return Err(DrillError::Options("no working directory".into()));
    };
    let dir = work.path.join("cluster");
    // Regions that join later are laid out once the others run, outside the mesh.
    let initial: Vec<String> = scenario
        .initial_regions()
        .into_iter()
        .map(String::from)
        .collect();
    let mut file = cluster::init(&InitOptions {
        regions: initial.clone(),
        dir: dir.clone(),
        host: [127, 0, 0, 1].into(),
        base_port: options.base_port,
        links: scenario.links.clone(),
        durability: options.durability,
        password: None,
        fault_injection: true,
        // The checks read every region's whole change log.
        change_log_gc: false,
    })
    .map_err(|e| fail(&e))?;
    let mut children = launch::spawn(&mut file, &options.exe, false).map_err(|e| fail(&e))?;
    file.save(&dir).map_err(|e| fail(&e))?;
    launch::wait_healthy(&file, &mut children, START_TIMEOUT)
        .await
        .map_err(|e| fail(&e))?;
    let late = launch::wait_meshed(&file, Duration::from_secs(15)).await;
    if !late.is_empty() {
        return Err(DrillError::Cluster(format!(
            "regions {} did not connect to all their peers",
            late.join(", ")
        )));
    }
    let joiners: Vec<&String> = scenario
        .regions
        .iter()
        .filter(|r| !initial.contains(r))
        .collect();
    if !joiners.is_empty() {
        for name in joiners {
            cluster::add_region(&dir, name).map_err(|e| fail(&e))?;
        }
        file = ClusterFile::load(&dir).map_err(|e| fail(&e))?;
    }
    Ok((file, dir, Some(children)))
}

fn scaled(ms: u64, scale: f64) -> u64 {
    (ms as f64 * scale).round() as u64
}

/// Runs the drill. Returns its report (which may say FAIL), or an error if it could not run.
pub async fn run(
    options: &DrillOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<DrillReport, DrillError> {
    let scenario = &options.scenario;
    if !(options.time_scale > 0.0 && options.time_scale <= TIME_SCALE_MAX) {
        return Err(DrillError::Options(format!(
            "--time-scale must be above 0 and at most {TIME_SCALE_MAX}"
        )));
    }
    if options.attach.is_some() && options.dir.is_some() {
        return Err(DrillError::Options(
            "--attach and --dir exclude each other".into(),
        ));
    }
    // Refuse early what cannot be done, before anything starts (an attached cluster is checked
    // once its durability and fault injection are known).
    if options.attach.is_none() {
        check_supported(scenario, options.durability, true, false)?;
    }
    let mut work = match options.attach {
        None => Some(
            WorkDir::new(options.dir.as_deref(), "braid-drill")
                .map_err(|e| DrillError::Cluster(e.to_string()))?,
        ),
        Some(_) => None,
    };
    let outcome = run_in(options, progress, work.as_ref()).await;
    // A temporary directory goes with a drill that passed; one that failed leaves its
    // evidence (each region's configuration, data and braid.log, which its errors name).
    let failed = outcome.as_ref().map_or(true, |report| !report.passed);
    if let Some(work) = work.as_mut().filter(|w| failed && w.removed()) {
        work.keep();
        progress(Progress::Phase(format!(
            "the drill failed: its cluster's directory is kept in {}",
            work.path.display()
        )));
    }
    outcome
}

/// [`run`], in `work` (none for an attached cluster).
async fn run_in(
    options: &DrillOptions,
    progress: &mut dyn FnMut(Progress),
    work: Option<&WorkDir>,
) -> Result<DrillReport, DrillError> {
    let scenario = &options.scenario;
    progress(Progress::Phase(match &options.attach {
        Some(dir) => format!("attaching to the cluster in {}", dir.display()),
        None => format!(
            "starting {} regions ({}) with fault injection, {} durability",
            scenario.regions.len(),
            scenario.regions.join(", "),
            options.durability.name()
        ),
    }));
    let (file, cluster_dir, children) = cluster_for(options, work).await?;
    let attached = children.is_none();
    let mut https = Vec::new();
    let mut resps = Vec::new();
    for entry in &file.regions {
        let parse = |addr: &str| {
            addr.parse::<SocketAddr>().map_err(|_| {
                DrillError::Cluster(format!("region {}: bad address {addr:?}", entry.name))
            })
        };
        https.push(parse(&entry.http)?);
        resps.push(parse(&entry.resp)?);
    }
    let first: Status = get_json(https[0], "/status")
        .await
        .map_err(DrillError::Cluster)?;
    // An attached cluster's regions each have their own configuration: a power loss is
    // emulated only where every region syncs (one that does not answer counts as one that
    // does not).
    let mut machine = first.durability == "machine";
    if attached {
        for addr in &https[1..] {
            let status = get_json::<Status>(*addr, "/status").await;
            machine &= status.is_ok_and(|s| s.durability == "machine");
        }
    }
    let durability = if machine {
        Durability::Machine
    } else {
        Durability::Process
    };
    let faults_available = crate::admin_client::get(https[0], "/faults", ADMIN_TIMEOUT)
        .await
        .is_ok();
    let warnings = check_supported(scenario, durability, faults_available, attached)?;
    if attached {
        // A cluster just started shows its links once its control plane has its state.
        let deadline = Instant::now() + START_TIMEOUT;
        let mut control = first.control.clone();
        while control.members.is_empty() {
            if Instant::now() >= deadline {
                return Err(DrillError::Cluster(format!(
                    "region {}: its control plane showed no members within {START_TIMEOUT:?}",
                    file.regions[0].name
                )));
            }
            tokio::time::sleep(MEMBERSHIP_POLL).await;
            let status: Status = get_json(https[0], "/status")
                .await
                .map_err(DrillError::Cluster)?;
            control = status.control;
        }
        check_attached_links(scenario, &control.links)?;
        // A kill finds the region's process through cluster.json: a cluster started with
        // `braid start` by hand records none, and the kill would end the drill midway.
        let kills = scenario.timeline.iter().find(|f| {
            matches!(
                f.action,
                Action::Kill { .. } | Action::PowerFail { .. } | Action::KillLeader { .. }
            )
        });
        let unknown = file
            .regions
            .iter()
            .find(|r| launch::running_pid(r).is_none());
        if let (Some(fault), Some(region)) = (kills, unknown) {
            return Err(DrillError::Unsupported(format!(
                "{} at {} ms: cluster.json records no running process for region {} (a \
                 cluster started by `braid cluster up` records every region's), so the drill \
                 could not kill it",
                action_name(&fault.action),
                fault.at_ms,
                region.name
            )));
        }
    }

    let n = file.regions.len();
    let initial = scenario.initial_regions();
    let mut children = children.map(|c| c.into_iter().map(Some).collect::<Vec<_>>());
    let mut regions = Vec::new();
    for (i, entry) in file.regions.iter().enumerate() {
        let member = initial.contains(&entry.name.as_str());
        regions.push(Region {
            name: entry.name.clone(),
            id: NodeId(entry.id),
            http: https[i],
            child: children
                .as_mut()
                .and_then(|c| c.get_mut(i).and_then(Option::take)),
            up: watch::Sender::new(member),
            member: watch::Sender::new(member),
            phase: if member {
                Phase::Member
            } else {
                Phase::Outside
            },
            change_since: None,
            counters: Arc::new(WriterCounters::default()),
            kills: 0,
            leave_deferred: false,
        });
    }
    let shared: Shared = Arc::new(Mutex::new(Observed::new(n)));
    let start = Instant::now();
    let mut drill = Drill {
        options,
        // In cluster.json's order (the regions that join later come last), as `https`.
        names: file.regions.iter().map(|r| r.name.clone()).collect(),
        file,
        cluster_dir,
        attached,
        regions,
        net: NetState {
            base_delay_ms: (scenario.network.latency_ms_min + scenario.network.latency_ms_max) / 2,
            ..NetState::default()
        },
        faults_available,
        durability,
        warnings,
        shared: shared.clone(),
        start,
        failures: Vec::new(),
        marks: Vec::new(),
        convergence_watches: Vec::new(),
        memberships: Vec::new(),
    };

    // Each region's own last sequence number before the drill writes: its client's events
    // follow it. Read before any fault is set: a read that fails leaves an attached cluster
    // as it was.
    // Counters and lag count from these readings (an attached cluster has a history).
    let mut bases = Vec::new();
    for (i, addr) in https.iter().enumerate() {
        if drill.regions[i].phase != Phase::Member {
            bases.push(0); // not started yet: it joins with nothing of its own
            continue;
        }
        let status: Status = get_json(*addr, "/status")
            .await
            .map_err(DrillError::Cluster)?;
        let lag: LagHistograms = get_json(*addr, "/lag").await.map_err(DrillError::Cluster)?;
        bases.push(status.vector.get(&drill.names[i]).copied().unwrap_or(0));
        lock(&shared).baseline(i, &status, lag);
    }
    drill.push_faults().await?;
    // Observer and writers.
    let (stop_tx, stop_rx) = watch::channel(false);
    let observer = tokio::spawn(observe(
        https.clone(),
        drill.regions.iter().map(|r| r.up.subscribe()).collect(),
        shared.clone(),
        start,
        stop_rx.clone(),
    ));
    let (stop_writers, writers_rx) = watch::channel(false);
    let mut writers = Vec::new();
    for (i, region) in drill.regions.iter().enumerate() {
        // An attached cluster may want a password: every region's configuration has it.
        let password = NodeConfig::load(&drill.file.regions[i].config)
            .ok()
            .and_then(|config| config.password);
        let spec = WriterSpec {
            addr: resps[i],
            workload: scenario.workload.clone(),
            seed: sub_seed(options.seed, 100 + i as u64),
            password,
        };
        writers.push(tokio::spawn(writer::run(
            spec,
            region.member.subscribe(),
            region.up.subscribe(),
            writers_rx.clone(),
            region.counters.clone(),
        )));
    }

    // The timeline.
    let scale = options.time_scale;
    let total_ms = scaled(scenario.duration_ms, scale);
    progress(Progress::Phase(format!(
        "running {} for {:.1} s: {} writes/s per region, {} faults",
        scenario.name,
        total_ms as f64 / 1000.0,
        scenario.workload.rate_per_region,
        scenario.timeline.len()
    )));
    let mut timeline = Timeline::new(scenario, scale, total_ms);
    let mut next_progress = Duration::ZERO;
    let result: Result<(), DrillError> = async {
        while let Some((due_ms, step)) = timeline.pop(scenario, &drill.names, scale) {
            loop {
                let now = start.elapsed();
                let due = Duration::from_millis(due_ms);
                if now >= next_progress {
                    let acked = drill.regions.iter().map(|r| r.counters.read()[0]).sum();
                    let down = drill
                        .regions
                        .iter()
                        .filter(|r| {
                            matches!(r.phase, Phase::Member | Phase::Leaving) && !*r.up.borrow()
                        })
                        .map(|r| r.name.clone())
                        .collect();
                    progress(Progress::Running {
                        elapsed_ms: now.as_millis() as u64,
                        total_ms,
                        acked,
                        down,
                        faults: drill.marks.len(),
                    });
                    next_progress = now + PROGRESS_EVERY;
                }
                if now >= due {
                    break;
                }
                tokio::time::sleep((due - now).min(next_progress.saturating_sub(now))).await;
            }
            match step {
                Step::End => break,
                Step::Membership(i) => {
                    if !drill.poll_membership(i).await? {
                        let next = drill.elapsed_ms() + MEMBERSHIP_POLL.as_millis() as u64;
                        timeline.push(next, Step::Membership(i));
                    }
                }
                Step::Restart { region: i, kills } => {
                    let mut label = format!("restart {}", drill.names[i]);
                    let stale = (drill.regions[i].kills != kills).then(|| {
                        format!(
                            "region {} was killed again since the leader kill: it stays down",
                            drill.names[i]
                        )
                    });
                    let skipped = stale.clone().or_else(|| drill.restart_skipped(i));
                    if let Some(why) = skipped {
                        drill.warnings.push(format!(
                            "{label} at {} ms: skipped, {why}",
                            drill.elapsed_ms()
                        ));
                        label += " (skipped)";
                    }
                    drill.marks.push(FaultMark {
                        at_ms: drill.elapsed_ms(),
                        action: label.clone(),
                    });
                    progress(Progress::Fault(label));
                    if stale.is_none() {
                        drill.restart(i).await?;
                        // A leave deferred while it was down has begun.
                        if drill.regions[i].phase == Phase::Leaving {
                            let next = drill.elapsed_ms() + MEMBERSHIP_POLL.as_millis() as u64;
                            timeline.push(next, Step::Membership(i));
                        }
                    }
                }
                Step::Fault(i) => {
                    let action = &scenario.timeline[i].action;
                    let mut label = action_name(action);
                    // A fault that finds nothing to do says so, in the warnings and its mark.
                    if let Some(why) = drill.skipped(action) {
                        // At the scenario's time: the fault as its file names it.
                        drill.warnings.push(format!(
                            "{label} at {} ms: skipped, {why}",
                            scenario.timeline[i].at_ms
                        ));
                        label += " (skipped)";
                    }
                    drill.marks.push(FaultMark {
                        at_ms: drill.elapsed_ms(),
                        action: label.clone(),
                    });
                    progress(Progress::Fault(label));
                    // A flap's turns are steps of their own, which the timeline scheduled.
                    if let Action::KillLeader { down_ms } = action {
                        match drill.leader().await {
                            Some(i) => {
                                progress(Progress::Fault(format!(
                                    "the leader is {}: kill it",
                                    drill.names[i]
                                )));
                                drill.fail(i, "kill").await?;
                                // The mark is when the kill happened, not when the step came
                                // due (the leader may have taken seconds to be known).
                                let killed_ms = drill.elapsed_ms();
                                if let Some(mark) = drill.marks.last_mut() {
                                    mark.at_ms = killed_ms;
                                }
                                // Down for `down-ms` from the kill, which waiting for a
                                // leader may have put well past the step's own time.
                                if let Some(down_ms) = down_ms {
                                    let back_ms = killed_ms + scaled(*down_ms, scale);
                                    let kills = drill.regions[i].kills;
                                    timeline.push(back_ms, Step::Restart { region: i, kills });
                                }
                            }
                            None => drill.warnings.push(format!(
                                "kill-leader at {} ms: no region knew a leader; nothing killed",
                                due_ms
                            )),
                        }
                    } else {
                        drill.perform(action).await?;
                        let polled = match action {
                            Action::Join { region } | Action::Leave { region } => Some(region),
                            // A restart begins a leave deferred while the region was down.
                            Action::Restart { region }
                                if drill.regions[drill.index(region)].phase == Phase::Leaving =>
                            {
                                Some(region)
                            }
                            _ => None,
                        };
                        if let Some(region) = polled {
                            let i = drill.index(region);
                            let next = drill.elapsed_ms() + MEMBERSHIP_POLL.as_millis() as u64;
                            timeline.push(next, Step::Membership(i));
                        }
                    }
                }
                Step::Flap { a, b, down, .. } => {
                    // Down and up in turn, up for good from `until_ms`: the timeline scheduled
                    // each turn.
                    if down {
                        drill.net.flapped.insert(pair(a, b));
                    } else {
                        drill.net.flapped.remove(&pair(a, b));
                    }
                    drill.push_faults().await?;
                }
            }
        }
        Ok(())
    }
    .await;
    stop_writers.send_replace(true);
    let mut clients = Vec::new();
    let mut all_refused = None;
    for (i, w) in writers.into_iter().enumerate() {
        let record = match w.await {
            Ok(record) => record,
            Err(err) => {
                return Err(DrillError::Cluster(format!(
                    "the writer of region {} failed: {err}",
                    drill.names[i]
                )))
            }
        };
        // A region that refused every write the drill sent it (a password, a frozen keyspace)
        // leaves nothing to check: the drill cannot pass on it.
        let [acknowledged, refused, ..] = drill.regions[i].counters.read();
        if acknowledged == 0 && refused > 0 && all_refused.is_none() {
            let first = record.first_refusal.clone().unwrap_or_default();
            all_refused = Some(DrillError::Cluster(format!(
                "region {} refused all {refused} writes the drill sent it, the first with \
                 {first:?}: nothing the drill wrote there can be checked",
                drill.names[i]
            )));
        }
        clients.push(ClientCheck {
            record,
            base: bases[i],
            unknown: drill.regions[i].counters.read()[2],
            exclusive: !attached,
        });
    }
    let outcome = match (result, all_refused) {
        (Ok(()), None) => finish(&mut drill, options, progress, clients).await,
        (Ok(()), Some(err)) => Err(err),
        (Err(err), _) => Err(err),
    };
    // A drill that ran and could not go on (a region that did not come back, a cluster that
    // stopped answering) is a failed drill, with what it saw until then: a report.
    let outcome = match outcome {
        Err(DrillError::Cluster(why)) => Ok(cut_short(&drill, options, why)),
        other => other,
    };
    stop_tx.send_replace(true);
    let _ = observer.await;
    if attached {
        // Leave the cluster as it was found: no faults, every region running.
        progress(Progress::Phase(
            "clearing faults and restarting regions the drill stopped".into(),
        ));
        drill.net = NetState::default();
        let _ = drill.push_faults().await;
        for i in 0..drill.regions.len() {
            if !*drill.regions[i].up.borrow() {
                if let Err(err) = drill.restart(i).await {
                    progress(Progress::Phase(format!(
                        "could not restart region {}: {err}",
                        drill.names[i]
                    )));
                }
            }
        }
    } else {
        progress(Progress::Phase("stopping the cluster".into()));
        launch::stop(&drill.file).await;
        for region in &mut drill.regions {
            if let Some(child) = region.child.as_mut() {
                let _ = child.wait().await;
            }
        }
    }
    outcome
}

/// After the workload: heal, restart, wait for convergence, verify, report.
async fn finish(
    drill: &mut Drill<'_>,
    options: &DrillOptions,
    progress: &mut dyn FnMut(Progress),
    clients: Vec<ClientCheck>,
) -> Result<DrillReport, DrillError> {
    let scenario = &options.scenario;
    let end_ms = drill.elapsed_ms();
    // Convergence is timed from here, as the simulator times it: the restarts and the joins
    // and leaves still under way are part of what it takes.
    let ended = Instant::now();
    progress(Progress::Phase(
        "workload over: healing every fault, restarting regions that are down".into(),
    ));
    drill.net.heal();
    drill.push_faults().await?;
    for i in 0..drill.regions.len() {
        if !*drill.regions[i].up.borrow() {
            drill.restart(i).await?;
        }
    }
    // Joins and leaves still on finish first (each within its own time bound).
    for i in 0..drill.regions.len() {
        if matches!(drill.regions[i].phase, Phase::Joining | Phase::Leaving) {
            progress(Progress::Phase(format!(
                "waiting for region {} to finish its {}",
                drill.names[i],
                if drill.regions[i].phase == Phase::Joining {
                    "join"
                } else {
                    "leave"
                }
            )));
            while !drill.poll_membership(i).await? {
                tokio::time::sleep(MEMBERSHIP_POLL).await;
            }
        }
    }
    let members: Vec<usize> = (0..drill.regions.len())
        .filter(|i| drill.regions[*i].phase == Phase::Member)
        .collect();
    let budget_ms = scenario
        .expect
        .converged_within_ms
        .unwrap_or(CONVERGE_MS_DEFAULT);
    progress(Progress::Phase(format!(
        "waiting for every region to hold the same events (up to {:.0} s)",
        budget_ms as f64 / 1000.0
    )));
    let mut final_convergence_ms = None;
    let mut last_vectors = Vec::new();
    // Looked at once at least, however long the restarts took.
    let mut first = true;
    while std::mem::take(&mut first) || ended.elapsed() < Duration::from_millis(budget_ms) {
        let mut vectors = Vec::new();
        for i in &members {
            match get_json::<Status>(drill.regions[*i].http, "/status").await {
                Ok(status) => vectors.push(status.vector),
                Err(_) => break,
            }
        }
        if vectors.len() == members.len() && vectors.windows(2).all(|w| w[0] == w[1]) {
            final_convergence_ms = Some(ended.elapsed().as_millis() as u64);
            last_vectors = vectors;
            break;
        }
        last_vectors = vectors;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One more observation, so that the last second's lag and the watches are in.
    tokio::time::sleep(POLL_EVERY * LAG_EVERY_POLLS as u32 + POLL_EVERY).await;

    progress(Progress::Phase(
        "reading every region's state and change log".into(),
    ));
    let verification = verify(drill, clients).await?;
    let membership = membership_verdict(drill, &members).await;
    let observed = lock(&drill.shared);
    let watches = &observed.watches;
    let mut failures = Vec::new();
    for failure in &drill.failures {
        let mut f = failure.report.clone();
        if let Some((recover, back)) = failure.watches {
            f.recovery_ms = watches.get(recover).and_then(|w| w.done_ms);
            f.reappeared_ms = watches.get(back).and_then(|w| w.done_ms);
            // Converged at the end (checked below), every event of it is everywhere.
            f.reappeared = f.reappeared_ms.is_some()
                || (final_convergence_ms.is_some()
                    && last_vectors
                        .iter()
                        .all(|v| v.get(&f.region).copied().unwrap_or(0) >= f.last_seq));
        }
        failures.push(f);
    }
    let convergence: Vec<ConvergenceReport> = drill
        .convergence_watches
        .iter()
        .filter_map(|i| watches.get(*i))
        .map(|w| ConvergenceReport {
            after: w.label.clone(),
            at_ms: w.at_ms,
            converged_ms: w.done_ms,
        })
        .chain(std::iter::once(ConvergenceReport {
            after: "end of workload".into(),
            at_ms: end_ms,
            converged_ms: final_convergence_ms,
        }))
        .collect();

    let mut checkers = Vec::new();
    checkers.push(Verdict {
        checker: "convergence".into(),
        passed: final_convergence_ms.is_some_and(|ms| ms <= budget_ms),
        detail: match final_convergence_ms {
            Some(ms) => format!(
                "identical vectors in every region {ms} ms after the end (bound {budget_ms} ms{})",
                if ms > budget_ms { ": too late" } else { "" }
            ),
            None => format!(
                "vectors still differ {budget_ms} ms after the end: {}",
                last_vectors
                    .iter()
                    .zip(members.iter().map(|i| &drill.names[*i]))
                    .map(|(v, n)| format!("{n}={v:?}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        },
    });
    let acknowledged: u64 = drill.regions.iter().map(|r| r.counters.read()[0]).sum();
    if acknowledged == 0 {
        // Nothing written shows nothing: every other checker would pass vacuously (the
        // simulator's checker of the same name).
        checkers.push(Verdict {
            checker: "workload".into(),
            passed: false,
            detail: "no write was acknowledged: the drill shows nothing (was every region down, \
                     outside the mesh or unreachable while the workload ran?)"
                .into(),
        });
    }
    if scenario.expect.no_lost_writes {
        let mut problems = verification.problems.clone();
        for f in failures.iter().filter(|f| !f.reappeared) {
            problems.push(format!(
                "{} events of {} (up to seq {}) did not reach every region after its restart",
                f.unreplicated_events, f.region, f.last_seq
            ));
        }
        for (origin, seen) in &observed.max_seen {
            let kept = verification.last_seq.get(origin).copied().unwrap_or(0);
            if kept < *seen {
                problems.push(format!(
                    "{origin}'s events up to seq {seen} were seen during the drill, but only {kept} remain"
                ));
            }
        }
        checkers.push(Verdict {
            checker: "oracle".into(),
            passed: problems.is_empty(),
            detail: if problems.is_empty() {
                format!(
                    "{} keys equal the oracle of {} events in every region; the {} acknowledged \
                     writes that changed something are all in their regions' change logs; every \
                     change log complete; every failed region's events came back",
                    verification.keys, verification.events, verification.acknowledged_events
                )
            } else {
                problems[..problems.len().min(3)].join("; ")
            },
        });
    }
    checkers.push(Verdict {
        checker: "exactly_once".into(),
        passed: verification.counter_problem.is_none(),
        detail: verification.counter_problem.clone().unwrap_or_else(|| {
            format!(
                "{} counters equal the oracle's sums in every region: no increment applied twice or lost",
                verification.counters
            )
        }),
    });
    checkers.extend(membership);
    let events_written = observed.writes_total;
    let per_change = if events_written == 0 {
        0.0
    } else {
        observed.events_sent_total as f64 / events_written as f64
    };
    if let Some(max) = scenario.expect.max_messages_per_change {
        checkers.push(Verdict {
            checker: "messages_per_change".into(),
            passed: per_change <= max,
            detail: format!(
                "{per_change:.3} events sent per event written ({} / {events_written}; bound {max})",
                observed.events_sent_total
            ),
        });
    }
    let lag = figures(&observed.lag_total);
    if let Some(max) = scenario.expect.lag_ms_p99_max {
        let worst = observed
            .lag_by_link
            .iter()
            .max_by_key(|(_, h)| h.value_at_quantile(0.99))
            .map(|(l, h)| format!("; worst link {l} p99 {} ms", h.value_at_quantile(0.99)))
            .unwrap_or_default();
        checkers.push(Verdict {
            checker: "lag_p99".into(),
            passed: lag.p99 <= max && lag.count > 0,
            detail: format!(
                "p99 {} ms over {} events (bound {max} ms){worst}",
                lag.p99, lag.count
            ),
        });
    }
    Ok(DrillReport {
        passed: checkers.iter().all(|c| c.passed),
        checkers,
        events_written,
        messages_per_change: per_change,
        lag_ms: lag,
        failures,
        convergence,
        final_convergence_ms,
        ..measured(drill, options, &observed, end_ms)
    })
}

/// The report of what the drill measured, through `duration_ms` of workload, without verdicts
/// (and so not passed), nor what only its end computes: events written, messages per change,
/// recoveries and convergence.
fn measured(
    drill: &Drill<'_>,
    options: &DrillOptions,
    observed: &Observed,
    duration_ms: u64,
) -> DrillReport {
    let writes = drill
        .regions
        .iter()
        .map(|r| {
            let [acknowledged, refused, unknown, unavailable] = r.counters.read();
            let counts = WriteCounts {
                acknowledged,
                refused,
                unknown,
                unavailable,
            };
            (r.name.clone(), counts)
        })
        .collect();
    DrillReport {
        scenario: options.scenario.name.clone(),
        command: options.command_line.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        durability: drill.durability.name().into(),
        seed: options.seed,
        time_scale: options.time_scale,
        regions: drill.names.clone(),
        duration_ms,
        passed: false,
        checkers: Vec::new(),
        writes,
        events_written: 0,
        conflicts_resolved: observed.conflicts_total,
        messages_per_change: 0.0,
        lag_ms: figures(&observed.lag_total),
        lag_ms_by_link: observed
            .lag_by_link
            .iter()
            .map(|(l, h)| (l.clone(), figures(h)))
            .collect(),
        faults: drill.marks.clone(),
        failures: drill.failures.iter().map(|f| f.report.clone()).collect(),
        convergence: Vec::new(),
        final_convergence_ms: None,
        timeline: observed.timeline.clone(),
        warnings: drill.warnings.clone(),
    }
}

/// The report of a drill that could not go on: what it measured until then, and a failed
/// `drill` verdict that says why.
fn cut_short(drill: &Drill<'_>, options: &DrillOptions, why: String) -> DrillReport {
    let observed = lock(&drill.shared);
    DrillReport {
        checkers: vec![Verdict {
            checker: "drill".into(),
            passed: false,
            detail: format!("the drill could not go on, and checked nothing: {why}"),
        }],
        ..measured(drill, options, &observed, drill.elapsed_ms())
    }
}

/// How long the end of a drill waits for the control plane to show each join and leave done
/// (a joiner turns active once its first checkpoint commits, every 3 s).
const MEMBERSHIP_SETTLE: Duration = Duration::from_secs(20);

/// The `membership` verdict, for scenarios that join or leave: each region ends in its last
/// change, as the drill saw its process and as the control plane committed it (a joiner
/// serves and is active, a leaver exited and is removed).
async fn membership_verdict(drill: &Drill<'_>, members: &[usize]) -> Option<Verdict> {
    let mut last: BTreeMap<&str, &'static str> = BTreeMap::new();
    for fault in &drill.options.scenario.timeline {
        match &fault.action {
            Action::Join { region } => last.insert(region, "join"),
            Action::Leave { region } => last.insert(region, "leave"),
            _ => None,
        };
    }
    if last.is_empty() {
        return None;
    }
    let want = |change: &str| {
        if change == "join" {
            "active"
        } else {
            "removed"
        }
    };
    let deadline = Instant::now() + MEMBERSHIP_SETTLE;
    let mut states: BTreeMap<String, String> = BTreeMap::new();
    loop {
        if let Some(i) = members.first() {
            if let Ok(status) = get_json::<Status>(drill.regions[*i].http, "/status").await {
                states = status
                    .control
                    .members
                    .into_iter()
                    .map(|m| (m.name, m.state))
                    .collect();
            }
        }
        let settled = last
            .iter()
            .all(|(r, c)| states.get(*r).map(String::as_str) == Some(want(c)));
        if settled || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(MEMBERSHIP_POLL).await;
    }
    let mut problems = Vec::new();
    for (region, change) in &last {
        let phase = drill.regions[drill.index(region)].phase;
        let state = states.get(*region).map_or("unknown", String::as_str);
        let process_ok = match *change {
            "join" => phase == Phase::Member,
            _ => phase == Phase::Left,
        };
        if !process_ok || state != want(change) {
            problems.push(format!(
                "{region} ({change}) ended {phase:?}, {state} in the control plane"
            ));
        }
    }
    let done: Vec<String> = drill
        .memberships
        .iter()
        .map(|(region, change, at_ms, took_ms)| {
            format!("{region} {change} at {at_ms} ms took {took_ms} ms")
        })
        .collect();
    Some(Verdict {
        checker: "membership".into(),
        passed: problems.is_empty(),
        detail: if problems.is_empty() {
            format!("{}; each region ends in its last change", done.join(", "))
        } else {
            problems.join("; ")
        },
    })
}

/// What a region's client saw, to hold against its change log.
#[derive(Debug)]
struct ClientCheck {
    record: WriterRecord,
    /// The region's own last sequence number before the drill.
    base: u64,
    /// Writes whose outcome the client never learnt.
    unknown: u64,
    /// Whether the drill's client was the region's only writer (a cluster it started).
    exclusive: bool,
}

/// What the storages say.
#[derive(Debug, Default)]
struct Verification {
    keys: usize,
    events: usize,
    acknowledged_events: u64,
    counters: usize,
    last_seq: BTreeMap<String, u64>,
    problems: Vec<String>,
    counter_problem: Option<String>,
}

/// Reads every region's storage (read-only, beside the running node): the union of the change
/// logs gives the oracle (a region that left counts there too); each member's values must equal
/// it. A region that never joined has no storage.
async fn verify(drill: &Drill<'_>, clients: Vec<ClientCheck>) -> Result<Verification, DrillError> {
    let mut dirs = Vec::new();
    for (entry, region) in drill.file.regions.iter().zip(&drill.regions) {
        if region.phase == Phase::Outside {
            continue;
        }
        let config = NodeConfig::load(&entry.config)
            .map_err(|e| DrillError::Cluster(format!("region {}: {e}", entry.name)))?;
        let compare = region.phase == Phase::Member;
        dirs.push((entry.name.clone(), config.data_dir, compare));
    }
    let ids: Vec<(String, NodeId)> = drill
        .regions
        .iter()
        .map(|r| (r.name.clone(), r.id))
        .collect();
    tokio::task::spawn_blocking(move || verify_storages(&dirs, &ids, &clients))
        .await
        .map_err(|e| DrillError::Cluster(format!("verification task: {e}")))?
}

fn verify_storages(
    dirs: &[(String, PathBuf, bool)],
    ids: &[(String, NodeId)],
    clients: &[ClientCheck],
) -> Result<Verification, DrillError> {
    let mut events: BTreeMap<(NodeId, Seq), ChangeEvent> = BTreeMap::new();
    let mut values: Vec<(String, BTreeMap<Bytes, Value>)> = Vec::new();
    for (name, dir, compare) in dirs {
        let fail = |e: &dyn std::fmt::Display| {
            DrillError::Cluster(format!("region {name}: storage {}: {e}", dir.display()))
        };
        let mut storage = RocksStorage::open_read_only(dir).map_err(|e| fail(&e))?;
        for (_, origin) in ids {
            for event in storage.log_of(*origin).map_err(|e| fail(&e))? {
                events.insert((event.origin, event.seq), event);
            }
        }
        if *compare {
            values.push((name.clone(), storage.values().map_err(|e| fail(&e))?));
        }
    }
    let mut v = Verification {
        events: events.len(),
        ..Verification::default()
    };
    for (name, id) in ids {
        let seqs: Vec<u64> = events
            .range((*id, Seq::ZERO)..=(*id, Seq(u64::MAX)))
            .map(|((_, s), _)| s.0)
            .collect();
        let last = seqs.last().copied().unwrap_or(0);
        if seqs.len() as u64 != last {
            v.problems.push(format!(
                "{name}'s change log has gaps: {} events up to seq {last}",
                seqs.len()
            ));
        }
        v.last_seq.insert(name.clone(), last);
    }
    check_clients(&events, ids, clients, &mut v);
    let oracle = oracle::converged(events.values().map(|e| (&e.key, e.hlc, &e.op)));
    v.keys = oracle.len();
    v.counters = oracle
        .values()
        .filter(|x| matches!(x, Value::Counter(_)))
        .count();
    for (name, got) in &values {
        let keys: BTreeSet<&Bytes> = got.keys().chain(oracle.keys()).collect();
        // The first difference is reported; the scan goes on to find a counter that differs.
        let mut reported = false;
        for key in keys {
            let (mine, want) = (got.get(key), oracle.get(key));
            if mine == want {
                continue;
            }
            let text = format!(
                "region {name}, key {:?}: region has {mine:?}, the oracle says {want:?}",
                String::from_utf8_lossy(key)
            );
            let counter =
                matches!(mine, Some(Value::Counter(_))) || matches!(want, Some(Value::Counter(_)));
            if counter && v.counter_problem.is_none() {
                v.counter_problem = Some(text.clone());
            }
            if !reported {
                v.problems.push(text);
                reported = true;
            }
            if v.counter_problem.is_some() {
                break;
            }
        }
    }
    Ok(v)
}

/// Every acknowledged write that changed something made one event at its region: the region's
/// own events since the drill began hold at least that many per key, and (when the drill's
/// client was the only writer) no more than its client's writes could have made.
fn check_clients(
    events: &BTreeMap<(NodeId, Seq), ChangeEvent>,
    ids: &[(String, NodeId)],
    clients: &[ClientCheck],
    v: &mut Verification,
) {
    for ((name, id), client) in ids.iter().zip(clients) {
        let mut own: BTreeMap<&Bytes, u64> = BTreeMap::new();
        let mut total = 0u64;
        for (_, event) in events.range((*id, Seq(client.base + 1))..=(*id, Seq(u64::MAX))) {
            *own.entry(&event.key).or_default() += 1;
            total += 1;
        }
        v.acknowledged_events += client.record.events;
        for (key, acked) in &client.record.events_by_key {
            let held = own.get(key).copied().unwrap_or(0);
            if held < *acked {
                v.problems.push(format!(
                    "region {name}: {acked} acknowledged writes changed key {:?}, but its change \
                     log holds only {held} of its own events on it",
                    String::from_utf8_lossy(key)
                ));
            }
        }
        let most = client.record.events + client.record.maybe_events + client.unknown;
        if client.exclusive && total > most {
            v.problems.push(format!(
                "region {name}: its change log holds {total} of its own events from the drill, \
                 more than its client's writes could have made ({most})"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["a".into(), "b".into(), "c".into()]
    }

    const ALL: [bool; 3] = [true; 3];

    /// A flap of a-b from 1 s, every `period_ms` until 3 s, and `extra` faults after it.
    fn flapping(period_ms: u64, extra: &str) -> Scenario {
        Scenario::parse(&format!(
            r#"
name = "flapping"
regions = ["a", "b", "c"]
duration-ms = 4000
[workload]
rate-per-region = 10
keys = 5
[[timeline]]
at-ms = 1000
action = "flap"
from = "a"
to = "b"
period-ms = {period_ms}
until-ms = 3000
{extra}
"#
        ))
        .unwrap()
    }

    /// Every step the timeline gives, in order, with its due time.
    fn steps_of(scenario: &Scenario, scale: f64) -> Vec<(u64, Step)> {
        let total_ms = scaled(scenario.duration_ms, scale);
        let mut timeline = Timeline::new(scenario, scale, total_ms);
        std::iter::from_fn(|| timeline.pop(scenario, &names(), scale)).collect()
    }

    fn turn(down: bool, period_ms: u64, until_ms: u64) -> Step {
        Step::Flap {
            a: 0,
            b: 1,
            period_ms,
            until_ms,
            down,
        }
    }

    #[test]
    fn a_flap_turns_every_period_until_it_ends_up() {
        let steps = steps_of(&flapping(200, ""), 1.0);
        let mut expected = vec![(1000, Step::Fault(0))];
        for (k, at) in (1000..=3000).step_by(200).enumerate() {
            expected.push((at, turn(k % 2 == 0 && at < 3000, 200, 3000)));
        }
        expected.push((4000, Step::End));
        assert_eq!(steps, expected);
        // Scaled, the same turns at half the times.
        let half = steps_of(&flapping(200, ""), 0.5);
        assert_eq!(half.len(), expected.len());
        assert_eq!(half[1], (500, turn(true, 100, 1500)));
        assert_eq!(half[half.len() - 2], (1500, turn(false, 100, 1500)));
        // A period that does not divide the flap's time: the last turn at until-ms, not past it.
        let steps = steps_of(&flapping(300, ""), 1.0);
        let turns: Vec<&(u64, Step)> = steps
            .iter()
            .filter(|(_, s)| matches!(s, Step::Flap { .. }))
            .collect();
        assert_eq!(turns.len(), 8, "{turns:?}");
        assert_eq!(*turns[6], (2800, turn(true, 300, 3000)));
        assert_eq!(*turns[7], (3000, turn(false, 300, 3000)));
    }

    #[test]
    fn a_heal_ends_every_flap_running() {
        let steps = steps_of(
            &flapping(200, "[[timeline]]\nat-ms = 1500\naction = \"heal\""),
            1.0,
        );
        assert_eq!(
            steps,
            vec![
                (1000, Step::Fault(0)),
                (1000, turn(true, 200, 3000)),
                (1200, turn(false, 200, 3000)),
                (1400, turn(true, 200, 3000)),
                (1500, Step::Fault(1)),
                (4000, Step::End),
            ]
        );
    }

    #[test]
    fn partitions_become_cuts_one_way_drops_and_delays() {
        let mut net = NetState {
            base_delay_ms: 10,
            ..NetState::default()
        };
        // a | b,c both ways; c -> a only one way as well.
        net.cut.extend([(0, 1), (1, 0), (0, 2)]);
        net.slow.insert(pair(2, 1), 50);
        net.clock.insert(1, -300);
        let a = net.fault_set(0, &names(), &ALL);
        assert_eq!(a.cut, BTreeSet::from(["b".to_owned()]));
        assert_eq!(a.drop_to, BTreeSet::from(["c".to_owned()]));
        assert_eq!(a.delay_ms.get("b"), Some(&10));
        let b = net.fault_set(1, &names(), &ALL);
        assert_eq!(b.cut, BTreeSet::from(["a".to_owned()]));
        assert_eq!(b.delay_ms.get("c"), Some(&60));
        assert_eq!(b.clock_offset_ms, -300);
        let c = net.fault_set(2, &names(), &ALL);
        assert!(c.cut.is_empty() && c.drop_to.is_empty(), "{c:?}");
        net.heal();
        net.flapped.insert(pair(2, 0));
        let c = net.fault_set(2, &names(), &ALL);
        assert_eq!(c.cut, BTreeSet::from(["a".to_owned()]));
        assert_eq!(c.clock_offset_ms, 0);
        assert_eq!(
            net.fault_set(1, &names(), &ALL).clock_offset_ms,
            -300,
            "heal keeps skew"
        );
        // A region outside the mesh (not joined yet, or gone) is never named.
        net.slow.insert(pair(0, 1), 5);
        let a = net.fault_set(0, &names(), &[true, false, true]);
        assert!(
            !a.delay_ms.contains_key("b") && a.delay_ms.contains_key("c"),
            "{a:?}"
        );
    }

    #[test]
    fn power_fail_needs_machine_durability_and_sim_only_knobs_are_noted() {
        let text = r#"
name = "p"
regions = ["a", "b"]
duration-ms = 1000
[network]
loss = 0.1
[workload]
rate-per-region = 10
keys = 10
[[timeline]]
at-ms = 100
action = "power-fail"
region = "a"
"#;
        let scenario = Scenario::parse(text).unwrap();
        let err = check_supported(&scenario, Durability::Process, true, false).unwrap_err();
        assert!(err.to_string().contains("--durability machine"), "{err}");
        let notes = check_supported(&scenario, Durability::Machine, true, false).unwrap();
        assert!(
            notes.iter().any(|n| n.contains("network.loss")),
            "{notes:?}"
        );
        let partition = text.replace(
            "action = \"power-fail\"\nregion = \"a\"",
            "action = \"partition\"\ngroups = [[\"a\"], [\"b\"]]",
        );
        let scenario = Scenario::parse(&partition).unwrap();
        let err = check_supported(&scenario, Durability::Process, false, false).unwrap_err();
        assert!(err.to_string().contains("--fault-injection"), "{err}");
        // Joins and leaves need a cluster the drill starts.
        let leave = text.replace("action = \"power-fail\"", "action = \"leave\"");
        let scenario = Scenario::parse(&leave).unwrap();
        assert!(check_supported(&scenario, Durability::Process, true, false).is_ok());
        let err = check_supported(&scenario, Durability::Process, true, true).unwrap_err();
        assert!(
            err.to_string().contains("needs a cluster the drill starts"),
            "{err}"
        );
    }

    #[test]
    fn watches_finish_when_every_region_up_holds_the_target() {
        let mut observed = Observed::new(2);
        let status = |a: u64, b: u64| -> Status {
            serde_json::from_value(serde_json::json!({
                "node": 1, "region": "a", "durability": "process", "hlc": "0",
                "vector": {"a": a, "b": b}, "writes": 0, "conflicts_resolved": 0,
                "held_events": 0, "change_log_events": 0, "peers": []
            }))
            .unwrap()
        };
        observed.record_status(0, status(5, 3));
        observed.record_status(1, status(4, 3));
        let target = observed.frontier(&[true, true]);
        assert_eq!(target, BTreeMap::from([("a".into(), 5), ("b".into(), 3)]));
        let now = Instant::now();
        let before = now.checked_sub(Duration::from_secs(1)).unwrap();
        let watch = |at: Instant, only: Option<usize>| Watch {
            label: "w".into(),
            at,
            at_ms: 0,
            target: target.clone(),
            only,
            done_ms: None,
        };
        observed.watches = vec![
            watch(before, None),
            watch(before, Some(1)),
            watch(now + Duration::from_secs(1), None),
        ];
        observed.check_watches(&[true, true], now);
        assert!(
            observed.watches.iter().all(|w| w.done_ms.is_none()),
            "b lacks a:5"
        );
        // A region that is down does not hold a convergence back...
        observed.check_watches(&[true, false], now);
        assert!(observed.watches[0].done_ms.is_some());
        // ...but a watch with no region left to check is not done,
        assert!(observed.watches[1].done_ms.is_none());
        // and neither is one whose regions were last read before it began.
        assert!(observed.watches[2].done_ms.is_none());
        assert_eq!(observed.max_seen.get("a"), Some(&5));
    }

    #[test]
    fn an_attached_cluster_must_have_the_scenarios_links() {
        let text = r#"
name = "m"
regions = ["a", "b", "c"]
duration-ms = 1000
[workload]
rate-per-region = 10
keys = 10
"#;
        let mesh = Scenario::parse(text).unwrap();
        let chain = text.replace(
            "duration-ms = 1000",
            "duration-ms = 1000\nlinks = [[\"b\", \"a\"], [\"b\", \"c\"]]",
        );
        let chain = Scenario::parse(&chain).unwrap();
        let link = |a: &str, b: &str| [a.to_string(), b.to_string()];
        let full = [link("a", "b"), link("a", "c"), link("b", "c")];
        let line = [link("a", "b"), link("b", "c")];
        assert!(check_attached_links(&mesh, &full).is_ok());
        assert!(check_attached_links(&chain, &line).is_ok());
        let err = check_attached_links(&chain, &full).unwrap_err().to_string();
        assert!(
            err.contains("links (a-b a-c b-c) are not the scenario's (a-b b-c)"),
            "{err}"
        );
        assert!(check_attached_links(&mesh, &line).is_err());
    }

    #[test]
    fn events_sent_count_only_what_each_peer_gained() {
        let mut observed = Observed::new(1);
        let status = |writes: u64, peers: &[(&str, u64)]| -> Status {
            let peers: Vec<_> = peers
                .iter()
                .map(|(region, sent)| {
                    serde_json::json!({
                        "id": 0, "region": region, "state": "connected", "pulling": [],
                        "vector": {}, "lag_events": 0, "events_sent": sent,
                        "events_received": 0, "events_applied": 0, "events_duplicate": 0,
                        "events_clock_refused": 0, "bytes_sent": 0, "bytes_received": 0,
                        "batches_sent": 0, "frames_dropped": 0
                    })
                })
                .collect();
            serde_json::from_value(serde_json::json!({
                "node": 1, "region": "a", "durability": "process", "hlc": "0",
                "vector": {}, "writes": writes, "conflicts_resolved": 0,
                "held_events": 0, "change_log_events": 0, "peers": peers
            }))
            .unwrap()
        };
        observed.baseline(
            0,
            &status(10, &[("b", 40), ("c", 40)]),
            LagHistograms::default(),
        );
        observed.record_status(0, status(20, &[("b", 100), ("c", 100)]));
        assert_eq!(observed.events_sent_total, 120);
        // b left: its count is gone from the list, which is no restart.
        observed.record_status(0, status(25, &[("c", 110)]));
        assert_eq!(observed.events_sent_total, 130);
        assert_eq!(observed.writes_total, 15);
        // b listed again (the links changed back): only what it gained since counts.
        observed.record_status(0, status(26, &[("b", 105), ("c", 110)]));
        assert_eq!(observed.events_sent_total, 135);
        // A restarted node counts from zero.
        observed.record_status(0, status(3, &[("b", 7), ("c", 2)]));
        assert_eq!(observed.events_sent_total, 144);
        assert_eq!(observed.writes_total, 19);
    }

    #[test]
    fn acknowledged_writes_are_held_against_the_change_logs() {
        use braid_conflict::{Hlc, Op};
        let event = |origin: u64, seq: u64, key: &'static str| ChangeEvent {
            origin: NodeId(origin),
            seq: Seq(seq),
            hlc: Hlc::ZERO,
            key: Bytes::from_static(key.as_bytes()),
            op: Op::Delete(Box::default()),
        };
        // Region a wrote k1 twice and k2 once after its base seq 1 (seq 1 predates the drill).
        let events: BTreeMap<(NodeId, Seq), ChangeEvent> = [
            event(1, 1, "k2"),
            event(1, 2, "k1"),
            event(1, 3, "k1"),
            event(1, 4, "k2"),
        ]
        .into_iter()
        .map(|e| ((e.origin, e.seq), e))
        .collect();
        let ids = vec![("a".to_owned(), NodeId(1))];
        let client = |k1: u64, k2: u64, unknown: u64| {
            let mut record = WriterRecord::default();
            record.events_by_key.insert(Bytes::from_static(b"k1"), k1);
            record.events_by_key.insert(Bytes::from_static(b"k2"), k2);
            record.events = k1 + k2;
            ClientCheck {
                record,
                base: 1,
                unknown,
                exclusive: true,
            }
        };
        let mut v = Verification::default();
        check_clients(&events, &ids, &[client(2, 1, 0)], &mut v);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        // An acknowledged write missing from the log.
        let mut v = Verification::default();
        check_clients(&events, &ids, &[client(2, 2, 0)], &mut v);
        assert!(v.problems[0].contains("key \"k2\""), "{:?}", v.problems);
        // More events than the client's writes could have made (a write committed twice).
        let mut v = Verification::default();
        check_clients(&events, &ids, &[client(1, 1, 0)], &mut v);
        assert!(
            v.problems[0].contains("more than its client's writes"),
            "{:?}",
            v.problems
        );
        // ... unless a write's outcome was unknown.
        let mut v = Verification::default();
        check_clients(&events, &ids, &[client(1, 1, 1)], &mut v);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
    }
}
