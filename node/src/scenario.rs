//! Scenario files: regions, topology, network, workload, and a timeline of faults and
//! expectations, in TOML (kebab-case). The same format is meant for `braid drill` against real
//! processes; what only the simulator can do is marked so in `docs/scenarios.md`.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A whole scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Scenario {
    /// A short name for reports.
    pub name: String,
    /// What it rehearses.
    #[serde(default)]
    pub description: String,
    /// Region names; node ids are 1, 2, ... in this order.
    pub regions: Vec<String>,
    /// Links as pairs of region names; every pair when absent.
    #[serde(default)]
    pub links: Option<Vec<[String; 2]>>,
    /// How long the workload runs, in milliseconds of simulated time. Faults happen within it;
    /// after it the network heals and the checkers wait for quiescence.
    pub duration_ms: u64,
    /// The network between regions.
    #[serde(default)]
    pub network: Network,
    /// What clients do.
    pub workload: Workload,
    /// Faults, in time order.
    #[serde(default)]
    pub timeline: Vec<Fault>,
    /// What must hold.
    #[serde(default)]
    pub expect: Expect,
    /// Retention by size of every region's change log (events), as `change-log-retention-events`
    /// in a node's configuration: a region away longer than the logs keep is refused as behind
    /// and resynchronised by a data snapshot. Simulator-only: `braid drill` keeps whole change
    /// logs, since its checks read them, and refuses a scenario that sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_log_retention_events: Option<u64>,
    /// How durable each region's commits are, as `durability` in a node's configuration. The
    /// simulator's storage: `machine` (the default) syncs every commit, so a `power-fail` loses
    /// nothing; `process` syncs only before each checkpoint report (as a node syncs its
    /// write-ahead log then), so a `power-fail` loses what was committed since. A drill runs
    /// with its `--durability` and notes a difference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<DurabilityMode>,
}

/// A storage durability mode, as a scenario names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DurabilityMode {
    /// Commits reach the write-ahead log, synced only now and then: a power loss takes the
    /// tail.
    Process,
    /// Every commit is synced: a power loss takes nothing.
    Machine,
}

impl DurabilityMode {
    /// The mode's name, as configurations spell it.
    pub fn name(self) -> &'static str {
        match self {
            DurabilityMode::Process => "process",
            DurabilityMode::Machine => "machine",
        }
    }
}

/// Per-link behaviour. Loss, duplication and reordering model what the replication core must
/// survive; over real QUIC streams they do not happen (simulator-only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Network {
    /// One-way latency, uniformly drawn per message, in milliseconds.
    #[serde(default = "default_latency_min")]
    pub latency_ms_min: u64,
    /// Upper bound of the latency.
    #[serde(default = "default_latency_max")]
    pub latency_ms_max: u64,
    /// Probability that a message is lost (simulator-only).
    #[serde(default)]
    pub loss: f64,
    /// Probability that a message is delivered twice (simulator-only).
    #[serde(default)]
    pub duplicate: f64,
    /// Probability that a message is delayed past later ones (simulator-only).
    #[serde(default)]
    pub reorder: f64,
}

fn default_latency_min() -> u64 {
    5
}

fn default_latency_max() -> u64 {
    30
}

impl Default for Network {
    fn default() -> Network {
        Network {
            latency_ms_min: default_latency_min(),
            latency_ms_max: default_latency_max(),
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
        }
    }
}

/// The client load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Workload {
    /// Writes per simulated second into each region.
    pub rate_per_region: u64,
    /// Distinct keys.
    pub keys: u64,
    /// Skew of key choice: 0 uniform; towards 1, most writes hit the first keys.
    #[serde(default)]
    pub skew: f64,
    /// Relative weights of the value types.
    #[serde(default)]
    pub mix: Mix,
    /// Share of writes that go to a small set of keys written in every region at once.
    #[serde(default)]
    pub conflict_share: f64,
}

/// Relative weights of the four value types in the workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Mix {
    /// SET, DEL.
    #[serde(default)]
    pub string: u32,
    /// INCRBY.
    #[serde(default)]
    pub counter: u32,
    /// SADD, SREM.
    #[serde(default)]
    pub set: u32,
    /// HSET, HDEL.
    #[serde(default)]
    pub hash: u32,
}

impl Default for Mix {
    fn default() -> Mix {
        Mix {
            string: 1,
            counter: 1,
            set: 1,
            hash: 1,
        }
    }
}

/// One fault at a point in time. (Unknown keys are refused by [`Action`], which receives every
/// key but `at-ms`.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Fault {
    /// When, in milliseconds from the start.
    pub at_ms: u64,
    /// What.
    #[serde(flatten)]
    pub action: Action,
}

/// A fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    rename_all = "kebab-case",
    rename_all_fields = "kebab-case",
    tag = "action",
    deny_unknown_fields
)]
pub enum Action {
    /// The region's process dies (`kill -9`): what it committed survives.
    Kill {
        /// The region.
        region: String,
    },
    /// The region whose node leads the control plane's Raft group at that moment is killed, as
    /// with `kill`; it restarts `down-ms` later, or when the workload ends if absent. Nothing
    /// happens when no leader is known.
    KillLeader {
        /// How long it stays down.
        #[serde(default)]
        down_ms: Option<u64>,
    },
    /// The region, not part of the mesh until then, joins it: it is admitted through the
    /// control plane, installs a data snapshot from the member that admitted it, and then
    /// replicates and takes writes (a region named by a `join` is outside the mesh at the
    /// start). A drill runs the region's `braid join`.
    Join {
        /// The region.
        region: String,
    },
    /// The region leaves the mesh: it refuses writes, ships what it holds, and is removed once
    /// every other member holds its events. A drill sends the region `POST /leave`.
    Leave {
        /// The region.
        region: String,
    },
    /// The region's process starts again on its storage.
    Restart {
        /// The region.
        region: String,
    },
    /// The region's machine loses power: in `machine` durability nothing acknowledged is lost;
    /// in `process` durability what the region committed since its last sync is (the simulator
    /// counts those writes; a drill refuses it, as a process cannot lose its unsynced writes).
    PowerFail {
        /// The region.
        region: String,
    },
    /// No message crosses between the groups, in either direction (or, with `one-way`, only
    /// from the first group to the others).
    Partition {
        /// Groups of regions; links between groups are cut.
        groups: Vec<Vec<String>>,
        /// Cut only messages from the first group to the others.
        #[serde(default)]
        one_way: bool,
    },
    /// Every cut and slow link is restored, and every flap running ends with its link up. (A
    /// variant with no fields rather than a unit variant: an unknown key next to it, such as
    /// `region`, is then refused instead of ignored.)
    Heal {},
    /// A link goes down and up repeatedly (every `period-ms`) until `until-ms` (after the flap
    /// starts, and no later than `duration-ms`) or a `heal`.
    Flap {
        /// One end.
        from: String,
        /// The other end.
        to: String,
        /// Half-period of the flapping.
        period_ms: u64,
        /// When it stops (link up).
        until_ms: u64,
    },
    /// The region's clock is set `offset-ms` away from true time (positive: ahead).
    ClockSkew {
        /// The region.
        region: String,
        /// Offset in milliseconds.
        offset_ms: i64,
    },
    /// Messages on a link get `extra-ms` more latency, until healed.
    SlowLink {
        /// One end.
        from: String,
        /// The other end.
        to: String,
        /// Added latency in milliseconds.
        extra_ms: u64,
    },
}

/// Convergence budget after the workload when the scenario sets none, in milliseconds.
pub const CONVERGE_MS_DEFAULT: u64 = 60_000;

/// The most writes per second a scenario may ask of one region: far above what one node takes
/// from a drill's clients, and at least 10 microseconds apart in the simulator.
pub const RATE_PER_REGION_MAX: u64 = 100_000;

/// The longest time any field of a scenario may give (a day, in milliseconds): `duration-ms`,
/// latencies, downtimes, periods, clock offsets, delays and expected bounds. Longer ones are
/// no rehearsal, and times past it would overflow where they are added up.
pub const TIME_MS_MAX: u64 = 24 * 3600 * 1000;

/// The largest weight of one type in `workload.mix` (the weights are relative).
pub const MIX_WEIGHT_MAX: u32 = 1_000_000;

/// When the simulator's writes start, in simulated milliseconds: the control plane elects its
/// first leader before them.
pub const WORKLOAD_START_MS: u64 = 500;

/// The shortest `duration-ms`: a run shorter than this would write nothing in the simulator.
pub const DURATION_MS_MIN: u64 = 1_000;

/// One expectation's verdict, as both executors (the simulator and `braid drill`) report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The checker.
    pub checker: String,
    /// Whether it held.
    pub passed: bool,
    /// The evidence.
    pub detail: String,
}

/// What the run must show. Absent expectations are not checked, but for `no-lost-writes`, which
/// holds unless turned off, with or without an `[expect]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Expect {
    /// After the workload ends and every fault is healed, all regions converge within this.
    #[serde(default)]
    pub converged_within_ms: Option<u64>,
    /// Every acknowledged write is in every region's final state (checked against the oracle).
    #[serde(default = "default_true")]
    pub no_lost_writes: bool,
    /// Events sent over links, divided by events written, at most this.
    #[serde(default)]
    pub max_messages_per_change: Option<f64>,
    /// Replication lag's 99th percentile (origin commit to apply), at most this.
    #[serde(default)]
    pub lag_ms_p99_max: Option<u64>,
}

fn default_true() -> bool {
    true
}

// By hand: a derived default would turn the oracle off for a scenario without `[expect]`.
impl Default for Expect {
    fn default() -> Expect {
        Expect {
            converged_within_ms: None,
            no_lost_writes: true,
            max_messages_per_change: None,
            lag_ms_p99_max: None,
        }
    }
}

/// A scenario that cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file cannot be read.
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    /// Not valid TOML for the schema.
    #[error("{0}: {1}")]
    Parse(String, Box<toml::de::Error>),
    /// A rule across fields is broken.
    #[error("{0}")]
    Invalid(String),
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScenarioError::Read(path.display().to_string(), e))?;
        Scenario::parse(&text).map_err(|e| match e {
            ScenarioError::Parse(_, err) => ScenarioError::Parse(path.display().to_string(), err),
            other => other,
        })
    }

    /// Parses and validates scenario text.
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text)
            .map_err(|e| ScenarioError::Parse("scenario".into(), Box::new(e)))?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Checks the rules that span fields.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let invalid = |msg: String| Err(ScenarioError::Invalid(msg));
        let names: BTreeSet<&str> = self.regions.iter().map(String::as_str).collect();
        if names.len() != self.regions.len() || names.is_empty() {
            return invalid("regions must be a non-empty list of distinct names".into());
        }
        let known = |r: &str| names.contains(r);
        if let Some(links) = &self.links {
            for [a, b] in links {
                if !known(a) || !known(b) {
                    return invalid(format!("link {a}-{b} names an unknown region"));
                }
            }
        }
        let mut times: Vec<(String, u64)> = vec![
            ("duration-ms".into(), self.duration_ms),
            ("network.latency-ms-max".into(), self.network.latency_ms_max),
        ];
        let expect = &self.expect;
        for (what, ms) in [
            ("converged-within-ms", expect.converged_within_ms),
            ("lag-ms-p99-max", expect.lag_ms_p99_max),
        ] {
            times.extend(ms.map(|ms| (format!("expect.{what}"), ms)));
        }
        for fault in &self.timeline {
            let at = |what: &str| format!("timeline: {what} of the fault at {} ms", fault.at_ms);
            match &fault.action {
                Action::KillLeader { down_ms: Some(ms) } => times.push((at("down-ms"), *ms)),
                Action::Flap { period_ms, .. } => times.push((at("period-ms"), *period_ms)),
                Action::ClockSkew { offset_ms, .. } => {
                    times.push((at("offset-ms"), offset_ms.unsigned_abs()))
                }
                Action::SlowLink { extra_ms, .. } => times.push((at("extra-ms"), *extra_ms)),
                _ => {}
            }
        }
        if let Some((what, ms)) = times.iter().find(|(_, ms)| *ms > TIME_MS_MAX) {
            return invalid(format!(
                "{what} is {ms}: at most {TIME_MS_MAX} (a day) is taken"
            ));
        }
        if self.change_log_retention_events == Some(0) {
            return invalid("change-log-retention-events must be above 0".into());
        }
        if let Some(bound) = expect.max_messages_per_change {
            if !(bound.is_finite() && bound > 0.0) {
                return invalid(format!(
                    "expect.max-messages-per-change is {bound}: a finite number above 0 is taken"
                ));
            }
        }
        if expect.lag_ms_p99_max == Some(0) {
            // Every lag counts as at least 1 ms.
            return invalid("expect.lag-ms-p99-max must be at least 1".into());
        }
        let n = &self.network;
        if n.latency_ms_min > n.latency_ms_max {
            return invalid("network.latency-ms-min exceeds latency-ms-max".into());
        }
        for (what, p) in [
            ("loss", n.loss),
            ("duplicate", n.duplicate),
            ("reorder", n.reorder),
        ] {
            if !(0.0..=0.5).contains(&p) {
                return invalid(format!("network.{what} must be within 0..=0.5"));
            }
        }
        let w = &self.workload;
        if w.keys == 0 || !(0.0..1.0).contains(&w.skew) || !(0.0..=1.0).contains(&w.conflict_share)
        {
            return invalid(
                "workload: keys >= 1, skew within [0, 1), conflict-share within [0, 1]".into(),
            );
        }
        let weights = [w.mix.string, w.mix.counter, w.mix.set, w.mix.hash];
        if weights.iter().any(|&weight| weight > MIX_WEIGHT_MAX) {
            return invalid(format!(
                "workload.mix: each weight must be at most {MIX_WEIGHT_MAX} (weights are relative)"
            ));
        }
        if weights.iter().all(|&weight| weight == 0) {
            return invalid("workload.mix: at least one type needs a weight".into());
        }
        if !(1..=RATE_PER_REGION_MAX).contains(&w.rate_per_region) {
            return invalid(format!(
                "workload.rate-per-region must be from 1 to {RATE_PER_REGION_MAX} writes per \
                 second, not {}",
                w.rate_per_region
            ));
        }
        // The simulator's first write in a region comes within one write interval after
        // WORKLOAD_START_MS: a run must last that long to write anything at all.
        let shortest =
            DURATION_MS_MIN.max(WORKLOAD_START_MS + 1_000_u64.div_ceil(w.rate_per_region));
        if self.duration_ms < shortest {
            return invalid(format!(
                "duration-ms must be at least {shortest} at {} writes per second (the \
                 simulator's writes start {WORKLOAD_START_MS} ms in, one interval apart), not {}",
                w.rate_per_region, self.duration_ms
            ));
        }
        let mut last = 0;
        for fault in &self.timeline {
            if fault.at_ms < last {
                return invalid("timeline: faults must be in time order".into());
            }
            last = fault.at_ms;
            if fault.at_ms > self.duration_ms {
                return invalid(format!(
                    "timeline: a fault at {} ms is after duration-ms",
                    fault.at_ms
                ));
            }
            if let Action::Flap { from, to, .. } | Action::SlowLink { from, to, .. } = &fault.action
            {
                if from == to {
                    return invalid(format!(
                        "timeline: the fault at {} ms needs a link between two regions, not \
                         {from} and itself",
                        fault.at_ms
                    ));
                }
                // An unknown region is named as such below, not as a missing link.
                if known(from) && known(to) && !self.linked(from, to) {
                    return invalid(format!(
                        "timeline: the fault at {} ms names the link {from}-{to}, which `links` \
                         does not have",
                        fault.at_ms
                    ));
                }
            }
            if let Action::Partition { groups, .. } = &fault.action {
                let mut seen = BTreeSet::new();
                if let Some(twice) = groups.iter().flatten().find(|r| !seen.insert(r.as_str())) {
                    return invalid(format!(
                        "timeline: the partition at {} ms puts {twice} in more than one group",
                        fault.at_ms
                    ));
                }
                // The regions in no group are one more group. (An unknown region is named as
                // such below.)
                let sides = groups.iter().filter(|g| !g.is_empty()).count()
                    + usize::from(seen.len() < self.regions.len());
                if sides < 2 && seen.iter().all(|r| known(r)) {
                    return invalid(format!(
                        "timeline: the partition at {} ms separates no region from another: \
                         name two groups, or one that leaves some region out",
                        fault.at_ms
                    ));
                }
            }
            if let Action::Flap {
                period_ms,
                until_ms,
                ..
            } = &fault.action
            {
                if *period_ms == 0 {
                    return invalid(format!(
                        "timeline: the flap at {} ms needs period-ms of at least 1",
                        fault.at_ms
                    ));
                }
                if *until_ms <= fault.at_ms || *until_ms > self.duration_ms {
                    return invalid(format!(
                        "timeline: the flap at {} ms needs until-ms after it and no later than \
                         duration-ms ({}), not {until_ms}",
                        fault.at_ms, self.duration_ms
                    ));
                }
            }
            let regions: Vec<&str> = match &fault.action {
                Action::Kill { region }
                | Action::Restart { region }
                | Action::PowerFail { region }
                | Action::Join { region }
                | Action::Leave { region } => {
                    vec![region]
                }
                Action::ClockSkew { region, .. } => vec![region],
                Action::Partition { groups, .. } => {
                    groups.iter().flatten().map(String::as_str).collect()
                }
                Action::Flap { from, to, .. } | Action::SlowLink { from, to, .. } => vec![from, to],
                Action::Heal {} | Action::KillLeader { .. } => vec![],
            };
            if let Some(unknown) = regions.iter().find(|r| !known(r)) {
                return invalid(format!("timeline: unknown region {unknown}"));
            }
        }
        self.validate_membership()?;
        self.validate_links()
    }

    /// Whether `a` and `b` share a link: always in a full mesh (no `links`).
    fn linked(&self, a: &str, b: &str) -> bool {
        self.links.as_ref().is_none_or(|links| {
            links
                .iter()
                .any(|[x, y]| (x == a && y == b) || (x == b && y == a))
        })
    }

    /// Explicit links: the topology they make must hold (no region linked to itself, every
    /// region reachable from every other), as the simulator and a node check it, with the
    /// regions named instead of their node ids. Runs after every link is known to name a region.
    fn validate_links(&self) -> Result<(), ScenarioError> {
        use braid_protocol::{NodeId, Topology, TopologyError};
        let Some(links) = &self.links else {
            return Ok(());
        };
        // Node ids in region order, as the simulator and `braid cluster` number them.
        let id = |region: &str| {
            let at = self.regions.iter().position(|r| r == region).unwrap_or(0);
            NodeId(at as u64 + 1)
        };
        let name = |node: NodeId| &self.regions[(node.0 - 1) as usize];
        let ids = self.regions.iter().map(|r| id(r));
        let pairs = links.iter().map(|[a, b]| (id(a), id(b)));
        let why = match Topology::with_links(ids, pairs) {
            Ok(_) => return Ok(()),
            Err(TopologyError::SelfLink(node)) => format!("{} is linked to itself", name(node)),
            Err(TopologyError::Disconnected(from, to)) => format!(
                "{} cannot be reached from {} through the links",
                name(to),
                name(from)
            ),
            Err(other) => other.to_string(),
        };
        Err(ScenarioError::Invalid(format!("links: {why}")))
    }

    /// Regions that are members from the start: every region but those a `join` brings in.
    pub fn initial_regions(&self) -> Vec<&str> {
        let joined: BTreeSet<&str> = self
            .timeline
            .iter()
            .filter_map(|f| match &f.action {
                Action::Join { region } => Some(region.as_str()),
                _ => None,
            })
            .collect();
        self.regions
            .iter()
            .map(String::as_str)
            .filter(|r| !joined.contains(r))
            .collect()
    }

    /// Joins and leaves: each region joins at most once, is named by nothing before it joins,
    /// and leaves at most once, after which nothing names it; the mesh keeps a member.
    fn validate_membership(&self) -> Result<(), ScenarioError> {
        let invalid = |msg: String| Err(ScenarioError::Invalid(msg));
        let initial = self.initial_regions();
        let mut outside: BTreeSet<&str> = self
            .regions
            .iter()
            .map(String::as_str)
            .filter(|r| !initial.contains(r))
            .collect();
        let changes = self
            .timeline
            .iter()
            .any(|f| matches!(f.action, Action::Join { .. } | Action::Leave { .. }));
        if changes && self.links.is_some() {
            return invalid("timeline: join and leave need a full mesh (no links)".into());
        }
        let mut gone: BTreeSet<&str> = BTreeSet::new();
        let mut joined: BTreeSet<&str> = BTreeSet::new();
        for fault in &self.timeline {
            let named: Vec<&str> = match &fault.action {
                Action::Kill { region }
                | Action::Restart { region }
                | Action::PowerFail { region }
                | Action::ClockSkew { region, .. } => vec![region],
                Action::Partition { groups, .. } => {
                    groups.iter().flatten().map(String::as_str).collect()
                }
                Action::Flap { from, to, .. } | Action::SlowLink { from, to, .. } => {
                    vec![from, to]
                }
                Action::Join { region } => {
                    if !joined.insert(region) {
                        return invalid(format!("timeline: region {region} joins twice"));
                    }
                    outside.remove(region.as_str());
                    vec![]
                }
                Action::Leave { region } => vec![region],
                Action::Heal {} | Action::KillLeader { .. } => vec![],
            };
            if let Some(r) = named
                .iter()
                .find(|r| outside.contains(*r) || gone.contains(*r))
            {
                return invalid(format!(
                    "timeline: region {r} is named at {} ms, when it is not a member",
                    fault.at_ms
                ));
            }
            if let Action::Leave { region } = &fault.action {
                gone.insert(region);
                let members = self.regions.len() - outside.len() - gone.len();
                if members == 0 {
                    return invalid(format!(
                        "timeline: the leave of {region} at {} ms leaves the mesh without a member",
                        fault.at_ms
                    ));
                }
            }
        }
        if initial.is_empty() {
            return invalid("timeline: the mesh needs a member at the start".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
name = "sample"
regions = ["a", "b", "c"]
duration-ms = 10000
[network]
latency-ms-min = 2
latency-ms-max = 20
loss = 0.01
[workload]
rate-per-region = 100
keys = 50
skew = 0.5
conflict-share = 0.2
mix = { string = 2, counter = 1 }
[[timeline]]
at-ms = 2000
action = "partition"
groups = [["a"], ["b", "c"]]
[[timeline]]
at-ms = 4000
action = "heal"
[[timeline]]
at-ms = 5000
action = "kill"
region = "b"
[expect]
converged-within-ms = 5000
"#;

    #[test]
    fn parses_a_scenario() {
        let s = Scenario::parse(SAMPLE).unwrap();
        assert_eq!(s.timeline.len(), 3);
        assert_eq!(s.timeline[2].action, Action::Kill { region: "b".into() });
        assert!(s.expect.no_lost_writes);
        assert_eq!(s.workload.mix.set, 0);
    }

    #[test]
    fn refuses_flaps_that_never_end_or_never_flap_links_to_itself_and_a_rate_of_zero() {
        let flap = |period: u64, until: u64| {
            SAMPLE.replace(
                "action = \"heal\"",
                &format!(
                    "action = \"flap\"\nfrom = \"a\"\nto = \"b\"\nperiod-ms = {period}\n\
                     until-ms = {until}"
                ),
            )
        };
        Scenario::parse(&flap(200, 6000)).unwrap();
        Scenario::parse(&flap(200, 10000)).unwrap();
        for (period, until, says) in [
            (0, 6000, "period-ms of at least 1"),
            (200, 4000, "until-ms after it"),
            (200, 3000, "until-ms after it"),
            (200, 10001, "no later than duration-ms (10000), not 10001"),
        ] {
            let err = Scenario::parse(&flap(period, until)).unwrap_err();
            assert!(err.to_string().contains(says), "{period}/{until}: {err}");
        }
        let err =
            Scenario::parse(&flap(200, 6000).replace("to = \"b\"", "to = \"a\"")).unwrap_err();
        assert!(err.to_string().contains("not a and itself"), "{err}");
        let err = Scenario::parse(&SAMPLE.replace("rate-per-region = 100", "rate-per-region = 0"))
            .unwrap_err();
        assert!(err.to_string().contains("rate-per-region"), "{err}");
    }

    #[test]
    fn refuses_bounds_no_run_could_meet_and_faults_that_do_nothing() {
        let with = |line: &str| SAMPLE.replace("[expect]\n", &format!("[expect]\n{line}\n"));
        for bound in ["nan", "-1.0", "0.0", "inf"] {
            let err =
                Scenario::parse(&with(&format!("max-messages-per-change = {bound}"))).unwrap_err();
            assert!(err.to_string().contains("max-messages-per-change"), "{err}");
        }
        assert!(Scenario::parse(&with("max-messages-per-change = 3.5")).is_ok());
        let err = Scenario::parse(&with("lag-ms-p99-max = 0")).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
        let retention = SAMPLE.replace(
            "duration-ms = 10000",
            "duration-ms = 10000\nchange-log-retention-events = 0",
        );
        let err = Scenario::parse(&retention).unwrap_err();
        assert!(err.to_string().contains("above 0"), "{err}");
        for groups in [
            "[]",
            "[[\"a\", \"b\", \"c\"]]",
            "[[], [\"a\", \"b\", \"c\"]]",
        ] {
            let text = SAMPLE.replace("[[\"a\"], [\"b\", \"c\"]]", groups);
            let err = Scenario::parse(&text).unwrap_err();
            assert!(
                err.to_string().contains("separates no region"),
                "{groups}: {err}"
            );
        }
        // One group cuts its regions from the rest.
        assert!(Scenario::parse(&SAMPLE.replace("[[\"a\"], [\"b\", \"c\"]]", "[[\"a\"]]")).is_ok());
    }

    #[test]
    fn refuses_unknown_regions_and_disorder() {
        let err = Scenario::parse(&SAMPLE.replace("region = \"b\"", "region = \"z\"")).unwrap_err();
        assert!(err.to_string().contains("unknown region z"), "{err}");
        let grouped = SAMPLE.replace(
            "[[\"a\"], [\"b\", \"c\"]]",
            "[[\"a\", \"b\", \"c\", \"z\"]]",
        );
        let err = Scenario::parse(&grouped).unwrap_err();
        assert!(err.to_string().contains("unknown region z"), "{err}");
        let err = Scenario::parse(&SAMPLE.replace("at-ms = 5000", "at-ms = 1000")).unwrap_err();
        assert!(err.to_string().contains("time order"), "{err}");
        let err = Scenario::parse(&SAMPLE.replace("region = \"b\"", "region = \"b\"\nbogus = 1"))
            .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = Scenario::parse(&SAMPLE.replace("loss = 0.01", "loss = 2.0")).unwrap_err();
        assert!(err.to_string().contains("loss"), "{err}");
    }

    #[test]
    fn a_joined_region_starts_outside_and_membership_changes_are_checked() {
        let text = SAMPLE
            .replace(
                "regions = [\"a\", \"b\", \"c\"]",
                "regions = [\"a\", \"b\", \"c\", \"d\"]",
            )
            .replace(
                "action = \"kill\"\nregion = \"b\"",
                "action = \"join\"\nregion = \"d\"",
            );
        let s = Scenario::parse(&text).unwrap();
        assert_eq!(s.initial_regions(), ["a", "b", "c"]);
        // Named before it joins.
        let early = text.replace(
            "groups = [[\"a\"], [\"b\", \"c\"]]",
            "groups = [[\"d\"], [\"b\", \"c\"]]",
        );
        let err = Scenario::parse(&early).unwrap_err();
        assert!(
            err.to_string().contains("region d is named at 2000 ms"),
            "{err}"
        );
        // Named after it left.
        let left = SAMPLE.replace("action = \"heal\"", "action = \"leave\"\nregion = \"b\"");
        let err = Scenario::parse(&left).unwrap_err();
        assert!(
            err.to_string().contains("region b is named at 5000 ms"),
            "{err}"
        );
        // With explicit links.
        let linked = text.replace(
            "duration-ms = 10000",
            "duration-ms = 10000\nlinks = [[\"a\", \"b\"], [\"b\", \"c\"]]",
        );
        let err = Scenario::parse(&linked).unwrap_err();
        assert!(err.to_string().contains("full mesh"), "{err}");
        // Every member leaving, in timeline order, even if one joins later.
        let empty = SAMPLE
            .replace(
                "regions = [\"a\", \"b\", \"c\"]",
                "regions = [\"a\", \"b\"]",
            )
            .replace("groups = [[\"a\"], [\"b\", \"c\"]]", "groups = [[\"a\"]]")
            .replace("action = \"heal\"", "action = \"leave\"\nregion = \"a\"")
            .replace(
                "action = \"kill\"\nregion = \"b\"",
                "action = \"join\"\nregion = \"b\"",
            );
        let err = Scenario::parse(&empty).unwrap_err();
        assert!(err.to_string().contains("without a member"), "{err}");
    }

    #[test]
    fn parses_a_leader_kill_with_and_without_its_downtime() {
        let s = Scenario::parse(&SAMPLE.replace(
            "action = \"kill\"\nregion = \"b\"",
            "action = \"kill-leader\"\ndown-ms = 3000",
        ))
        .unwrap();
        assert_eq!(
            s.timeline[2].action,
            Action::KillLeader {
                down_ms: Some(3000)
            }
        );
        let s = Scenario::parse(&SAMPLE.replace(
            "action = \"kill\"\nregion = \"b\"",
            "action = \"kill-leader\"",
        ))
        .unwrap();
        assert_eq!(s.timeline[2].action, Action::KillLeader { down_ms: None });
        let err = Scenario::parse(&SAMPLE.replace(
            "action = \"kill\"\nregion = \"b\"",
            "action = \"kill-leader\"\nregion = \"b\"",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("region"), "{err}");
    }

    #[test]
    fn the_oracle_is_checked_without_an_expect_table() {
        let at = SAMPLE.find("[expect]").unwrap();
        let s = Scenario::parse(&SAMPLE[..at]).unwrap();
        assert!(
            s.expect.no_lost_writes,
            "no [expect]: the oracle still runs"
        );
        assert!(Scenario::parse(SAMPLE).unwrap().expect.no_lost_writes);
        let off = SAMPLE.replace("[expect]", "[expect]\nno-lost-writes = false");
        assert!(!Scenario::parse(&off).unwrap().expect.no_lost_writes);
    }

    #[test]
    fn refuses_rates_weights_and_durations_out_of_bounds() {
        let refused = |text: String, says: &str| {
            let err = Scenario::parse(&text).unwrap_err().to_string();
            assert!(err.contains(says), "{says}: {err}");
        };
        let rate =
            |n: u64| SAMPLE.replace("rate-per-region = 100", &format!("rate-per-region = {n}"));
        Scenario::parse(&rate(RATE_PER_REGION_MAX)).unwrap();
        refused(
            rate(RATE_PER_REGION_MAX + 1),
            "rate-per-region must be from 1 to 100000",
        );
        refused(rate(1_000_000_000), "not 1000000000");
        // Weights that would overflow a sum of u32 are refused, not wrapped.
        let mix = "mix = { string = 4294967295, counter = 2 }";
        refused(
            SAMPLE.replace("mix = { string = 2, counter = 1 }", mix),
            "at most 1000000",
        );
        let duration = |ms: u64| {
            SAMPLE
                .replace("duration-ms = 10000", &format!("duration-ms = {ms}"))
                .replace("at-ms = 2000", "at-ms = 0")
                .replace("at-ms = 4000", "at-ms = 0")
                .replace("at-ms = 5000", "at-ms = 0")
        };
        Scenario::parse(&duration(DURATION_MS_MIN)).unwrap();
        refused(duration(0), "duration-ms must be at least 1000");
        refused(duration(500), "not 500");
        // At one write per second the first may come 1.5 s in.
        let slow = duration(1_000).replace("rate-per-region = 100", "rate-per-region = 1");
        refused(slow.clone(), "at least 1500 at 1 writes per second");
        Scenario::parse(&slow.replace("duration-ms = 1000", "duration-ms = 1500")).unwrap();
    }

    #[test]
    fn refuses_times_past_a_day_where_they_would_overflow() {
        let refused = |text: String, says: &str| {
            let err = Scenario::parse(&text).unwrap_err().to_string();
            assert!(err.contains(says), "{says}: {err}");
        };
        let heal_as = |action: &str| SAMPLE.replace("action = \"heal\"", action);
        // TOML's largest integer.
        let huge = i64::MAX as u64;
        let fine = TIME_MS_MAX;
        let cases = [
            (
                "action = \"kill-leader\"\ndown-ms = {}",
                "down-ms of the fault at 4000 ms",
            ),
            (
                "action = \"flap\"\nfrom = \"a\"\nto = \"b\"\nperiod-ms = {}\nuntil-ms = 6000",
                "period-ms of the fault at 4000 ms",
            ),
            (
                "action = \"slow-link\"\nfrom = \"a\"\nto = \"b\"\nextra-ms = {}",
                "extra-ms of the fault at 4000 ms",
            ),
        ];
        for (action, says) in cases {
            Scenario::parse(&heal_as(&action.replace("{}", &fine.to_string()))).unwrap();
            refused(heal_as(&action.replace("{}", &huge.to_string())), says);
        }
        let skew = "action = \"clock-skew\"\nregion = \"a\"\noffset-ms = -9223372036854775808";
        refused(
            heal_as(skew),
            "offset-ms of the fault at 4000 ms is 9223372036854775808",
        );
        refused(
            SAMPLE.replace("duration-ms = 10000", &format!("duration-ms = {huge}")),
            "duration-ms is 9223372036854775807: at most 86400000",
        );
        refused(
            SAMPLE.replace("latency-ms-max = 20", &format!("latency-ms-max = {huge}")),
            "network.latency-ms-max",
        );
        refused(
            SAMPLE.replace(
                "converged-within-ms = 5000",
                &format!("converged-within-ms = {}", fine + 1),
            ),
            "expect.converged-within-ms",
        );
    }

    #[test]
    fn refuses_faults_on_links_that_do_not_exist_and_regions_in_two_groups() {
        let chain = SAMPLE.replace(
            "duration-ms = 10000",
            "duration-ms = 10000\nlinks = [[\"a\", \"b\"], [\"b\", \"c\"]]",
        );
        Scenario::parse(&chain).unwrap();
        for action in [
            "flap\"\nperiod-ms = 100\nuntil-ms = 6000",
            "slow-link\"\nextra-ms = 50",
        ] {
            let fault = |from: &str, to: &str| {
                chain.replace(
                    "action = \"heal\"",
                    &format!("action = \"{action}\nfrom = \"{from}\"\nto = \"{to}\""),
                )
            };
            Scenario::parse(&fault("c", "b")).unwrap();
            let err = Scenario::parse(&fault("a", "c")).unwrap_err().to_string();
            assert!(
                err.contains("names the link a-c, which `links` does not have"),
                "{err}"
            );
            let err = Scenario::parse(&fault("a", "z")).unwrap_err().to_string();
            assert!(err.contains("unknown region z"), "{err}");
        }
        let twice = SAMPLE.replace(
            "groups = [[\"a\"], [\"b\", \"c\"]]",
            "groups = [[\"a\", \"b\"], [\"b\", \"c\"]]",
        );
        let err = Scenario::parse(&twice).unwrap_err().to_string();
        assert!(err.contains("puts b in more than one group"), "{err}");
    }

    #[test]
    fn refuses_links_that_leave_a_region_unreachable_or_loop_on_one() {
        let links = |l: &str| {
            SAMPLE.replace(
                "duration-ms = 10000",
                &format!("duration-ms = 10000\nlinks = {l}"),
            )
        };
        let err = Scenario::parse(&links("[[\"a\", \"b\"]]"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c cannot be reached from a through the links"),
            "{err}"
        );
        let err = Scenario::parse(&links("[[\"a\", \"b\"], [\"c\", \"c\"]]"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("c is linked to itself"), "{err}");
        let err = Scenario::parse(&links("[]")).unwrap_err().to_string();
        assert!(err.contains("b cannot be reached"), "{err}");
    }

    #[test]
    fn a_heal_takes_no_other_key() {
        let err = Scenario::parse(
            &SAMPLE.replace("action = \"heal\"", "action = \"heal\"\nregion = \"a\""),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("unknown field") && err.contains("region"),
            "{err}"
        );
        let s = Scenario::parse(SAMPLE).unwrap();
        assert_eq!(s.timeline[1].action, Action::Heal {});
    }
}
