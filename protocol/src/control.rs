//! The control plane's state machine: what the Raft group agrees on (the members and their
//! states, the replication topology, every node's latest checkpoint) and how a committed command
//! changes it. Pure and deterministic: the Raft glue (openraft, in `braid-node` and in the
//! simulator) applies each committed command through [`ControlState::apply`], and every node
//! derives its subscriptions ([`ControlState::topology`]) and what it may garbage-collect
//! ([`ControlState::stable_frontier`] for change logs, [`ControlState::stable_hlc`] for
//! tombstones) from the result.
//!
//! ```text
//!   join ──► Joining ──activate──► Active ──drain──► Draining ──remove──► Removed
//!               └───────────────remove─────────────────────────────────────┘
//! ```
//!
//! A command either applies whole or is refused with a [`ControlError`] and changes nothing, so
//! every replica of the state machine stays identical whatever the log holds.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use braid_conflict::Hlc;

use crate::ids::{NodeId, Seq, VersionVector};
use crate::topology::{Topology, TopologyError};

/// Members ever admitted, removed ones included (their ids are never reused). A mesh of
/// regions is small; 64 leaves room for learners and years of replacements.
pub const MEMBERS_MAX: usize = 64;

/// Voters of the Raft group; further members are learners (design: up to 5).
pub const VOTERS_MAX: usize = 5;

/// Longest region name, as `braid init` allows.
pub const REGION_NAME_BYTES_MAX: usize = 32;

/// Longest address text (`host:port`).
pub const ADDRESS_BYTES_MAX: usize = 256;

/// Keyspaces with options of their own. Each is checked against every client write's key, so
/// the list stays short.
pub const KEYSPACES_MAX: usize = 64;

/// Longest keyspace prefix.
pub const KEYSPACE_PREFIX_BYTES_MAX: usize = 128;

/// Options of one keyspace: the keys that begin with its prefix (the longest prefix that
/// matches a key decides).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyspaceOptions {
    /// The only regions that take client writes to the keyspace (its home regions); the others
    /// refuse them and still replicate what the writers write. Empty: the keyspace is frozen,
    /// every region refuses writes to it.
    pub writers: BTreeSet<NodeId>,
}

/// The keyspace rules in force, as the replica core checks client writes against them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keyspaces {
    rules: BTreeMap<String, KeyspaceOptions>,
}

impl Keyspaces {
    /// Rules from the committed options.
    pub fn new(rules: BTreeMap<String, KeyspaceOptions>) -> Keyspaces {
        assert!(rules.len() <= KEYSPACES_MAX);
        Keyspaces { rules }
    }

    /// The keyspace of `key` (the longest prefix of it that has options), with its options.
    pub fn of(&self, key: &[u8]) -> Option<(&str, &KeyspaceOptions)> {
        self.rules
            .iter()
            .filter(|(prefix, _)| key.starts_with(prefix.as_bytes()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(prefix, options)| (prefix.as_str(), options))
    }

    /// The keyspace that refuses a client write of `key` at `node`, if one does.
    pub fn refusing(&self, key: &[u8], node: NodeId) -> Option<&str> {
        if self.rules.is_empty() {
            return None;
        }
        self.of(key)
            .filter(|(_, options)| !options.writers.contains(&node))
            .map(|(prefix, _)| prefix)
    }

    /// Whether there is no rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// Where a member is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum MemberState {
    /// Admitted; receiving its snapshot. Garbage collection waits for its first checkpoint
    /// (the vector of its snapshot); it becomes active after that.
    Joining,
    /// Serving and replicating.
    Active,
    /// Shipping what it holds before it leaves; still replicating.
    Draining,
    /// Gone. Kept so that its id is never reused.
    Removed,
}

impl MemberState {
    /// Lower-case name, for status documents.
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Active => "active",
            MemberState::Draining => "draining",
            MemberState::Removed => "removed",
        }
    }
}

/// One member of the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its node id.
    pub id: NodeId,
    /// Its region name, unique among members that are not removed.
    pub region: String,
    /// Its QUIC address (`host:port`), for the other nodes.
    pub peer_address: String,
    /// Its RESP address, for clients.
    pub resp_address: String,
    /// Its HTTP admin address.
    pub http_address: String,
    /// Where it is in its life.
    pub state: MemberState,
}

/// How the members are linked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TopologySpec {
    /// Every member linked to every other.
    FullMesh,
    /// Only these links (each once, either order). Links of removed members are ignored.
    Links(Vec<(NodeId, NodeId)>),
}

/// A node's latest reported position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Its version vector when it reported.
    pub vector: VersionVector,
    /// When it reported, milliseconds since the Unix epoch (its own clock).
    pub reported_ms: u64,
    /// Its durable HLC high-water mark when it reported: every event it issued before has a
    /// sequence number within `vector`, every event it issues later a greater HLC.
    pub hlc: Hlc,
}

/// What the committed checkpoints prove about one origin's HLCs, for [`ControlState::stable_hlc`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HlcFloor {
    /// Every event of the origin that some member has not applied yet carries a greater HLC.
    /// [`Hlc::ZERO`] until a report of the origin's is confirmed.
    pub floor: Hlc,
    /// The origin's oldest unconfirmed report: its own sequence number and HLC then. Once every
    /// member has applied the origin's events through that number, every event still on its
    /// way was issued after the report, so `floor` rises to that HLC. Kept until confirmed (a
    /// newer report does not replace it), so that reports arriving in any rhythm confirm.
    pub pending: Option<(Seq, Hlc)>,
}

/// A change the Raft group commits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlCommand {
    /// A new cluster's first members (all active) and links: the first command of a group's
    /// log (see [`apply_to`]); refused once there is a state.
    Bootstrap {
        /// The members.
        members: Vec<Member>,
        /// Their links.
        topology: TopologySpec,
    },
    /// Admits a new member (as [`MemberState::Joining`], whatever state it names).
    Join(Member),
    /// A joining member has its snapshot and serves: it becomes active.
    Activate(NodeId),
    /// An active member starts to leave.
    Drain(NodeId),
    /// A draining (or joining, or dead active) member is gone.
    Remove(NodeId),
    /// New links between the members.
    SetTopology(TopologySpec),
    /// A node reports its vector.
    ReportCheckpoint {
        /// The node.
        node: NodeId,
        /// Its vector.
        vector: VersionVector,
        /// Its durable HLC high-water mark (see [`Checkpoint::hlc`]).
        hlc: Hlc,
        /// When, on its clock.
        reported_ms: u64,
    },
    /// Sets the options of the keyspace of keys beginning with `prefix`, or (`None`) drops
    /// them: every region takes writes to it again.
    SetKeyspace {
        /// The keyspace's key prefix.
        prefix: String,
        /// Its options.
        options: Option<KeyspaceOptions>,
    },
}

/// A command the state machine refuses (and which changes nothing).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// No such member (or it was removed).
    #[error("{0} is not a member")]
    UnknownMember(NodeId),
    /// The id is taken (ids of removed members are never reused).
    #[error("node id {0} is taken")]
    IdTaken(NodeId),
    /// Another member has the region name.
    #[error("region {0} is taken")]
    RegionTaken(String),
    /// A name or address that is empty or too long.
    #[error("{0}")]
    Invalid(String),
    /// No room for another member.
    #[error("the mesh has its {MEMBERS_MAX} members")]
    Full,
    /// The member's state does not allow the change.
    #[error("{node} is {from}, so it cannot become {to}", from = from.name(), to = to.name())]
    Transition {
        /// The member.
        node: NodeId,
        /// Its state.
        from: MemberState,
        /// The state asked for.
        to: MemberState,
    },
    /// The change would leave no active member.
    #[error("the change would leave no active member")]
    LastActive,
    /// The change would leave an unusable topology.
    #[error("topology: {0}")]
    Topology(#[from] TopologyError),
    /// A bootstrap when the cluster already has its state.
    #[error("the cluster is already bootstrapped")]
    Bootstrapped,
    /// A command before the cluster's bootstrap.
    #[error("the cluster is not bootstrapped yet")]
    NotBootstrapped,
}

/// Applies a committed command to a state that may not exist yet: a group's log begins with a
/// [`ControlCommand::Bootstrap`], which creates the state; anything before it is refused, as is
/// a second bootstrap. Every replica applies the same log the same way.
pub fn apply_to(
    state: &mut Option<ControlState>,
    command: &ControlCommand,
) -> Result<(), ControlError> {
    match (state.as_mut(), command) {
        (None, ControlCommand::Bootstrap { members, topology }) => {
            *state = Some(ControlState::bootstrap(members.clone(), topology.clone())?);
            Ok(())
        }
        (None, _) => Err(ControlError::NotBootstrapped),
        (Some(current), command) => current.apply(command),
    }
}

/// The replicated control state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    members: BTreeMap<NodeId, Member>,
    topology: TopologySpec,
    checkpoints: BTreeMap<NodeId, Checkpoint>,
    /// Per origin (removed members' too), what its reports prove about its HLCs.
    floors: BTreeMap<NodeId, HlcFloor>,
    /// Options of keyspaces, by key prefix.
    keyspaces: BTreeMap<String, KeyspaceOptions>,
}

fn check_text(what: &str, text: &str, max: usize) -> Result<(), ControlError> {
    if text.is_empty() || text.len() > max {
        return Err(ControlError::Invalid(format!(
            "{what} must be 1 to {max} bytes long"
        )));
    }
    Ok(())
}

impl ControlState {
    /// The state a new cluster starts with: these members, all active, linked as given.
    pub fn bootstrap(
        members: Vec<Member>,
        topology: TopologySpec,
    ) -> Result<ControlState, ControlError> {
        let mut state = ControlState {
            members: BTreeMap::new(),
            topology: TopologySpec::FullMesh,
            checkpoints: BTreeMap::new(),
            floors: BTreeMap::new(),
            keyspaces: BTreeMap::new(),
        };
        for member in members {
            let id = member.id;
            state.apply_in_place(&ControlCommand::Join(member))?;
            if let Some(m) = state.members.get_mut(&id) {
                m.state = MemberState::Active;
            }
        }
        if state.active().next().is_none() {
            return Err(ControlError::LastActive);
        }
        state.apply(&ControlCommand::SetTopology(topology))?;
        Ok(state)
    }

    /// Applies a committed command, or refuses it and changes nothing.
    pub fn apply(&mut self, command: &ControlCommand) -> Result<(), ControlError> {
        let mut next = self.clone();
        next.apply_in_place(command)?;
        // Whatever changed the members or links must leave a usable topology (checkpoints,
        // the most frequent command, cannot change it).
        if !matches!(
            command,
            ControlCommand::ReportCheckpoint { .. } | ControlCommand::SetKeyspace { .. }
        ) {
            next.topology()?;
        }
        if matches!(
            command,
            ControlCommand::Drain(_) | ControlCommand::Remove(_) | ControlCommand::SetTopology(_)
        ) {
            next.check_drains_can_end()?;
        }
        debug_assert!(next.invariants_hold());
        *self = next;
        Ok(())
    }

    fn apply_in_place(&mut self, command: &ControlCommand) -> Result<(), ControlError> {
        match command {
            ControlCommand::Bootstrap { .. } => return Err(ControlError::Bootstrapped),
            ControlCommand::Join(member) => {
                check_text("a region name", &member.region, REGION_NAME_BYTES_MAX)?;
                for (what, address) in [
                    ("a peer address", &member.peer_address),
                    ("a RESP address", &member.resp_address),
                    ("an HTTP address", &member.http_address),
                ] {
                    check_text(what, address, ADDRESS_BYTES_MAX)?;
                }
                if self.members.contains_key(&member.id) {
                    return Err(ControlError::IdTaken(member.id));
                }
                if self.current().any(|m| m.region == member.region) {
                    return Err(ControlError::RegionTaken(member.region.clone()));
                }
                if self.members.len() >= MEMBERS_MAX {
                    return Err(ControlError::Full);
                }
                let mut member = member.clone();
                member.state = MemberState::Joining;
                self.members.insert(member.id, member);
            }
            ControlCommand::Activate(node) => {
                // It has installed its snapshot only once it has reported that snapshot's
                // vector.
                if self.current().any(|m| m.id == *node) && !self.checkpoints.contains_key(node) {
                    return Err(ControlError::Invalid(format!(
                        "{node} has not reported the vector of its snapshot yet"
                    )));
                }
                self.transition(*node, &[MemberState::Joining], MemberState::Active)?
            }
            ControlCommand::Drain(node) => {
                self.transition(*node, &[MemberState::Active], MemberState::Draining)?;
                if self.active().next().is_none() {
                    return Err(ControlError::LastActive);
                }
                // A drain ends in a removal: refuse one that could not (the links without the
                // node would cut some member off; link around it first).
                let mut removed = self.clone();
                if let Some(m) = removed.members.get_mut(node) {
                    m.state = MemberState::Removed;
                }
                removed.topology()?;
            }
            ControlCommand::Remove(node) => {
                let from = [
                    MemberState::Joining,
                    MemberState::Active,
                    MemberState::Draining,
                ];
                self.transition(*node, &from, MemberState::Removed)?;
                if self.active().next().is_none() {
                    return Err(ControlError::LastActive);
                }
                // The members' reports so far may lag what they hold of its events (one may hold
                // events of it the others lack and have not reported yet): its events count as
                // settled only on reports made after the removal, when no new one of its events
                // can reach a member but from another member. Until every member has reported
                // again, nothing is known. (Not its own last report: events it reported and
                // never shipped before it died are nowhere, and waiting for them would hold the
                // stable HLC back for good.)
                self.checkpoints.clear();
            }
            ControlCommand::SetTopology(spec) => {
                if let TopologySpec::Links(links) = spec {
                    for (a, b) in links {
                        for node in [a, b] {
                            if !self.current().any(|m| m.id == *node) {
                                return Err(ControlError::UnknownMember(*node));
                            }
                        }
                    }
                    let named: BTreeSet<NodeId> =
                        links.iter().flat_map(|(a, b)| [*a, *b]).collect();
                    if let Some(missing) = self.current().find(|m| !named.contains(&m.id)) {
                        return Err(ControlError::Invalid(format!(
                            "the links name no link of {} (region {})",
                            missing.id, missing.region
                        )));
                    }
                }
                self.topology = spec.clone();
            }
            ControlCommand::ReportCheckpoint {
                node,
                vector,
                hlc,
                reported_ms,
            } => {
                if !self.current().any(|m| m.id == *node) {
                    return Err(ControlError::UnknownMember(*node));
                }
                if vector.len() > MEMBERS_MAX {
                    return Err(ControlError::Invalid(format!(
                        "a checkpoint names at most {MEMBERS_MAX} origins"
                    )));
                }
                // The latest committed report stands, even if it is behind the one before (a
                // node that lost writes must hold the frontier back) or its clock stepped back:
                // Raft already orders a node's reports.
                self.checkpoints.insert(
                    *node,
                    Checkpoint {
                        vector: vector.clone(),
                        reported_ms: *reported_ms,
                        hlc: *hlc,
                    },
                );
                let floor = self.floors.entry(*node).or_default();
                if floor.pending.is_none() && *hlc > floor.floor {
                    floor.pending = Some((vector.get(*node), *hlc));
                }
                self.confirm_floors();
            }
            ControlCommand::SetKeyspace { prefix, options } => {
                self.set_keyspace(prefix, options.as_ref())?;
            }
        }
        Ok(())
    }

    fn set_keyspace(
        &mut self,
        prefix: &str,
        options: Option<&KeyspaceOptions>,
    ) -> Result<(), ControlError> {
        check_text("a keyspace prefix", prefix, KEYSPACE_PREFIX_BYTES_MAX)?;
        let Some(options) = options else {
            return match self.keyspaces.remove(prefix) {
                Some(_) => Ok(()),
                None => Err(ControlError::Invalid(format!(
                    "keyspace {prefix:?} has no options"
                ))),
            };
        };
        if let Some(node) = options
            .writers
            .iter()
            .find(|n| !self.current().any(|m| m.id == **n))
        {
            return Err(ControlError::UnknownMember(*node));
        }
        if !self.keyspaces.contains_key(prefix) && self.keyspaces.len() >= KEYSPACES_MAX {
            return Err(ControlError::Invalid(format!(
                "at most {KEYSPACES_MAX} keyspaces have options"
            )));
        }
        self.keyspaces.insert(prefix.to_string(), options.clone());
        Ok(())
    }

    fn transition(
        &mut self,
        node: NodeId,
        from: &[MemberState],
        to: MemberState,
    ) -> Result<(), ControlError> {
        let member = self
            .members
            .get_mut(&node)
            .filter(|m| m.state != MemberState::Removed)
            .ok_or(ControlError::UnknownMember(node))?;
        if !from.contains(&member.state) {
            return Err(ControlError::Transition {
                node,
                from: member.state,
                to,
            });
        }
        member.state = to;
        Ok(())
    }

    /// Every member ever admitted, removed ones included, by id.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// The member with this id, if any.
    pub fn member(&self, node: NodeId) -> Option<&Member> {
        self.members.get(&node)
    }

    /// Members that are not removed.
    fn current(&self) -> impl Iterator<Item = &Member> {
        self.members
            .values()
            .filter(|m| m.state != MemberState::Removed)
    }

    fn active(&self) -> impl Iterator<Item = &Member> {
        self.members
            .values()
            .filter(|m| m.state == MemberState::Active)
    }

    /// The links as configured.
    pub fn topology_spec(&self) -> &TopologySpec {
        &self.topology
    }

    /// The replication topology over the members that are not removed: what every node derives
    /// its subscriptions from.
    pub fn topology(&self) -> Result<Topology, TopologyError> {
        let nodes: BTreeSet<NodeId> = self.current().map(|m| m.id).collect();
        match &self.topology {
            TopologySpec::FullMesh => Topology::full_mesh(nodes),
            TopologySpec::Links(links) => {
                let kept: Vec<(NodeId, NodeId)> = links
                    .iter()
                    .copied()
                    .filter(|(a, b)| nodes.contains(a) && nodes.contains(b))
                    .collect();
                // A member that joined after the links were set is linked to every other until
                // links name it: it must reach everyone to receive and ship anything. A member
                // the links name keeps only its links, even those left after a removal.
                let named: BTreeSet<NodeId> = links.iter().flat_map(|(a, b)| [*a, *b]).collect();
                let mut all = kept.clone();
                for new in nodes.iter().filter(|n| !named.contains(n)) {
                    all.extend(nodes.iter().filter(|n| *n != new).map(|n| (*new, *n)));
                }
                Topology::with_links(nodes, all)
            }
        }
    }

    /// The reason `err` gives, with members named by region, as operators name them (the
    /// error's own text names node ids, which no command takes).
    pub fn explain(&self, err: &ControlError) -> String {
        let name = |node: &NodeId| {
            self.member(*node)
                .map_or_else(|| node.to_string(), |m| m.region.clone())
        };
        match err {
            ControlError::UnknownMember(node) => format!("{} is not a member", name(node)),
            ControlError::Transition { node, from, to } => format!(
                "{} is {}, so it cannot become {}",
                name(node),
                from.name(),
                to.name()
            ),
            ControlError::Topology(err) => format!("topology: {}", self.explain_topology(err)),
            other => other.to_string(),
        }
    }

    /// [`ControlState::explain`] for a topology's refusal.
    fn explain_topology(&self, err: &TopologyError) -> String {
        let name = |node: &NodeId| {
            self.member(*node)
                .map_or_else(|| node.to_string(), |m| m.region.clone())
        };
        match err {
            TopologyError::UnknownNode(a, b) => {
                format!(
                    "link {}-{} names a region outside the mesh",
                    name(a),
                    name(b)
                )
            }
            TopologyError::SelfLink(node) => format!("link from {} to itself", name(node)),
            TopologyError::Disconnected(from, to) => format!(
                "{} cannot reach {} through the links (set links that join them with `braid \
                 topology set`)",
                name(from),
                name(to)
            ),
            TopologyError::Empty => err.to_string(),
        }
    }

    /// Refuses a state in which the draining members' removals could not all commit: each
    /// drain ends in a removal, and the links without every draining member must still join the
    /// others (two drains each fine alone, or links changed during a drain, could cut a member
    /// off, and leave a region refusing writes for good).
    fn check_drains_can_end(&self) -> Result<(), ControlError> {
        let draining: Vec<&Member> = self
            .members
            .values()
            .filter(|m| m.state == MemberState::Draining)
            .collect();
        if draining.is_empty() {
            return Ok(());
        }
        let mut after = self.clone();
        for member in after.members.values_mut() {
            if member.state == MemberState::Draining {
                member.state = MemberState::Removed;
            }
        }
        after.topology().map(drop).map_err(|err| {
            let regions: Vec<&str> = draining.iter().map(|m| m.region.as_str()).collect();
            ControlError::Invalid(format!(
                "once the regions leaving ({}) are removed, {}",
                regions.join(", "),
                self.explain_topology(&err)
            ))
        })
    }

    /// The Raft voters: the first [`VOTERS_MAX`] active members by id; the others learn.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.active().take(VOTERS_MAX).map(|m| m.id).collect()
    }

    /// The voters once `node` stops being active (drains): the Raft voters a leave changes to.
    pub fn voters_without(&self, node: NodeId) -> BTreeSet<NodeId> {
        self.active()
            .filter(|m| m.id != node)
            .take(VOTERS_MAX)
            .map(|m| m.id)
            .collect()
    }

    /// Options of keyspaces, by key prefix.
    pub fn keyspaces(&self) -> &BTreeMap<String, KeyspaceOptions> {
        &self.keyspaces
    }

    /// Every node's latest checkpoint.
    pub fn checkpoints(&self) -> &BTreeMap<NodeId, Checkpoint> {
        &self.checkpoints
    }

    /// Per origin, the highest sequence number every member that is not removed has applied,
    /// as their checkpoints say: change-log entries and tombstones at or below it may be
    /// deleted. Empty while one of them has not reported (nothing is known to be everywhere).
    /// A joining member holds it back too, until it reports the vector of the snapshot it
    /// installed: it subscribes from that vector, so the others' logs must still hold what
    /// comes after it. Garbage collection pauses for as long as a join takes.
    pub fn stable_frontier(&self) -> VersionVector {
        let holders: Vec<NodeId> = self.current().map(|m| m.id).collect();
        let mut vectors = Vec::with_capacity(holders.len());
        for node in &holders {
            match self.checkpoints.get(node) {
                Some(checkpoint) => vectors.push(&checkpoint.vector),
                None => return VersionVector::new(),
            }
        }
        let origins: BTreeSet<NodeId> = vectors
            .iter()
            .flat_map(|v| v.iter().map(|(o, _)| o))
            .collect();
        origins
            .into_iter()
            .map(|origin| {
                let least = vectors
                    .iter()
                    .map(|v| v.get(origin))
                    .min()
                    .unwrap_or(Seq::ZERO);
                (origin, least)
            })
            .filter(|(_, seq)| *seq > Seq::ZERO)
            .collect()
    }

    /// Per origin, the frontier if every member that is not removed has reported (`None`
    /// otherwise: nothing is known to be everywhere).
    fn known_frontier(&self) -> Option<VersionVector> {
        let all_reported = self.current().all(|m| self.checkpoints.contains_key(&m.id));
        all_reported.then(|| self.stable_frontier())
    }

    /// Raises each origin's floor to its pending report's HLC once every member has applied
    /// the origin's events through that report.
    fn confirm_floors(&mut self) {
        let Some(frontier) = self.known_frontier() else {
            return;
        };
        for (origin, floor) in &mut self.floors {
            if let Some((seq, hlc)) = floor.pending {
                if frontier.get(*origin) >= seq {
                    floor.floor = floor.floor.max(hlc);
                    floor.pending = None;
                }
            }
        }
    }

    /// What each origin's reports prove about its HLCs.
    pub fn floors(&self) -> &BTreeMap<NodeId, HlcFloor> {
        &self.floors
    }

    /// The **stable HLC**: every event that some member has not applied yet carries a greater
    /// HLC, so tombstones at or below it guard against nothing and may be dropped
    /// ([`braid_conflict::KeyState::collect_tombstones`]). `None` while nothing is known:
    /// before every member has reported and each origin's report has been confirmed.
    ///
    /// It is the least floor over the origins that may still have events on their way: every
    /// member that is not removed, and each removed one whose events the members do not all
    /// hold alike (they may still pass one to another). Each origin's future events carry HLCs
    /// above its reported high-water mark, so a member that writes nothing holds it back only
    /// as far as its clock. A new member must adopt it before it issues a timestamp (it does so
    /// with the HLC of its data snapshot, which is at least its donor's floor).
    pub fn stable_hlc(&self) -> Option<Hlc> {
        self.known_frontier()?;
        let vectors: Vec<&VersionVector> = self
            .current()
            .filter_map(|m| self.checkpoints.get(&m.id).map(|c| &c.vector))
            .collect();
        let settled = |origin: NodeId| {
            let mut seqs = vectors.iter().map(|v| v.get(origin));
            let first = seqs.next().unwrap_or(Seq::ZERO);
            seqs.all(|s| s == first)
        };
        let mut origins: BTreeSet<NodeId> = self.current().map(|m| m.id).collect();
        origins.extend(self.floors.keys().copied());
        origins.extend(vectors.iter().flat_map(|v| v.iter().map(|(o, _)| o)));
        let mut least: Option<Hlc> = None;
        for origin in origins {
            let current = self
                .members
                .get(&origin)
                .is_some_and(|m| m.state != MemberState::Removed);
            // A removed origin stops holding the stable HLC back once the members' reports
            // since its removal hold its events alike.
            if !current && settled(origin) {
                continue;
            }
            let floor = self.floors.get(&origin).map_or(Hlc::ZERO, |f| f.floor);
            least = Some(least.map_or(floor, |l| l.min(floor)));
        }
        least.filter(|hlc| *hlc > Hlc::ZERO)
    }

    /// The rules every state keeps (checked after each apply in debug builds).
    fn invariants_hold(&self) -> bool {
        let current: Vec<&Member> = self.current().collect();
        let regions: BTreeSet<&str> = current.iter().map(|m| m.region.as_str()).collect();
        regions.len() == current.len()
            && self.members.len() <= MEMBERS_MAX
            && self.active().next().is_some()
            && self
                .checkpoints
                .keys()
                .all(|n| current.iter().any(|m| m.id == *n))
            && self.members.iter().all(|(id, m)| *id == m.id)
            && self.floors.keys().all(|n| self.members.contains_key(n))
            && self.keyspaces.len() <= KEYSPACES_MAX
            && self
                .keyspaces
                .values()
                .flat_map(|k| &k.writers)
                .all(|n| self.members.contains_key(n))
            && self
                .floors
                .values()
                .all(|f| f.pending.is_none_or(|(_, hlc)| hlc > f.floor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, region: &str) -> Member {
        Member {
            id: NodeId(id),
            region: region.into(),
            peer_address: format!("127.0.0.1:{}", 7002 + 10 * id),
            resp_address: format!("127.0.0.1:{}", 7000 + 10 * id),
            http_address: format!("127.0.0.1:{}", 7001 + 10 * id),
            state: MemberState::Active,
        }
    }

    fn three() -> ControlState {
        ControlState::bootstrap(
            vec![member(1, "a"), member(2, "b"), member(3, "c")],
            TopologySpec::FullMesh,
        )
        .unwrap()
    }

    #[test]
    fn drains_and_link_changes_must_leave_every_leaver_removable() {
        let n = NodeId;
        // A square: a-b, a-c, b-d, c-d. Draining b alone is fine (a-c-d), c alone too; both
        // together would leave a and d apart once both are removed.
        let square =
            TopologySpec::Links(vec![(n(1), n(2)), (n(1), n(3)), (n(2), n(4)), (n(3), n(4))]);
        let mut s = ControlState::bootstrap(
            vec![
                member(1, "a"),
                member(2, "b"),
                member(3, "c"),
                member(4, "d"),
            ],
            square,
        )
        .unwrap();
        s.apply(&ControlCommand::Drain(n(2))).unwrap();
        let err = s.apply(&ControlCommand::Drain(n(3))).unwrap_err();
        assert!(
            err.to_string()
                .contains("once the regions leaving (b, c) are removed"),
            "{err}"
        );
        assert_eq!(s.member(n(3)).unwrap().state, MemberState::Active);
        // Links changed during b's drain must still join the others without b.
        let through_b = TopologySpec::Links(vec![(n(1), n(2)), (n(2), n(3)), (n(3), n(4))]);
        let err = s
            .apply(&ControlCommand::SetTopology(through_b))
            .unwrap_err();
        assert!(err.to_string().contains("(b)"), "{err}");
        let around_b = TopologySpec::Links(vec![(n(1), n(2)), (n(1), n(3)), (n(3), n(4))]);
        s.apply(&ControlCommand::SetTopology(around_b)).unwrap();
        s.apply(&ControlCommand::Remove(n(2))).unwrap();
        // A mesh: a drain and a removal of a dead member beside it are fine.
        let mut mesh = three();
        mesh.apply(&ControlCommand::Drain(n(3))).unwrap();
        let chain = TopologySpec::Links(vec![(n(1), n(3)), (n(3), n(2))]);
        assert!(mesh.apply(&ControlCommand::SetTopology(chain)).is_err());
        mesh.apply(&ControlCommand::Remove(n(3))).unwrap();
    }

    #[test]
    fn refusals_are_explained_by_region_name() {
        let n = NodeId;
        let mut s = three();
        let cut = TopologySpec::Links(vec![(n(1), n(2)), (n(2), n(1))]);
        let err = s.apply(&ControlCommand::SetTopology(cut)).unwrap_err();
        let text = s.explain(&err);
        assert!(
            text.contains("the links name no link of n3 (region c)"),
            "{text}"
        );
        let chain = TopologySpec::Links(vec![(n(1), n(2)), (n(2), n(3))]);
        s.apply(&ControlCommand::SetTopology(chain)).unwrap();
        let err = s.apply(&ControlCommand::Drain(n(2))).unwrap_err();
        let text = s.explain(&err);
        assert!(
            text.contains("a cannot reach c through the links")
                && text.contains("braid topology set"),
            "{text}"
        );
        s.apply(&ControlCommand::Drain(n(1))).unwrap();
        let err = s.apply(&ControlCommand::Drain(n(1))).unwrap_err();
        assert_eq!(
            s.explain(&err),
            "a is draining, so it cannot become draining"
        );
        let err = s.apply(&ControlCommand::Drain(n(9))).unwrap_err();
        assert_eq!(s.explain(&err), "n9 is not a member");
    }

    fn vector(seqs: &[(u64, u64)]) -> VersionVector {
        seqs.iter().map(|(o, s)| (NodeId(*o), Seq(*s))).collect()
    }

    fn report(state: &mut ControlState, node: u64, seqs: &[(u64, u64)], at: u64) {
        report_hlc(state, node, seqs, at, at);
    }

    fn report_hlc(state: &mut ControlState, node: u64, seqs: &[(u64, u64)], at: u64, hlc: u64) {
        state
            .apply(&ControlCommand::ReportCheckpoint {
                node: NodeId(node),
                vector: vector(seqs),
                hlc: Hlc::new(hlc, 0, braid_conflict::NodeId(node)),
                reported_ms: at,
            })
            .unwrap();
    }

    fn hlc(wall_ms: u64, node: u64) -> Hlc {
        Hlc::new(wall_ms, 0, braid_conflict::NodeId(node))
    }

    #[test]
    fn a_member_joins_becomes_active_drains_and_leaves() {
        let mut s = three();
        s.apply(&ControlCommand::Join(member(4, "d"))).unwrap();
        assert_eq!(s.member(NodeId(4)).unwrap().state, MemberState::Joining);
        assert!(s.topology().unwrap().contains(NodeId(4)));
        // Not before it reports its snapshot's vector.
        assert!(matches!(
            s.apply(&ControlCommand::Activate(NodeId(4))),
            Err(ControlError::Invalid(_))
        ));
        report(&mut s, 4, &[(1, 3)], 100);
        s.apply(&ControlCommand::Activate(NodeId(4))).unwrap();
        s.apply(&ControlCommand::Drain(NodeId(4))).unwrap();
        s.apply(&ControlCommand::Remove(NodeId(4))).unwrap();
        assert!(!s.topology().unwrap().contains(NodeId(4)));
        // Its id is never reused; its region name is free again.
        let again = s.apply(&ControlCommand::Join(member(4, "d")));
        assert_eq!(again, Err(ControlError::IdTaken(NodeId(4))));
        s.apply(&ControlCommand::Join(member(5, "d"))).unwrap();
    }

    #[test]
    fn refused_commands_change_nothing() {
        let mut s = three();
        let before = s.clone();
        let refused = [
            ControlCommand::Join(member(2, "z")),
            ControlCommand::Join(member(9, "b")),
            ControlCommand::Join(member(9, "")),
            ControlCommand::Join(member(9, &"x".repeat(REGION_NAME_BYTES_MAX + 1))),
            ControlCommand::Activate(NodeId(1)),
            ControlCommand::Drain(NodeId(9)),
            ControlCommand::SetTopology(TopologySpec::Links(vec![(NodeId(1), NodeId(9))])),
            // a-b only: c would be cut off.
            ControlCommand::SetTopology(TopologySpec::Links(vec![(NodeId(1), NodeId(2))])),
        ];
        for command in &refused {
            assert!(s.apply(command).is_err(), "{command:?}");
            assert_eq!(s, before, "{command:?} changed the state");
        }
    }

    #[test]
    fn a_log_begins_with_one_bootstrap() {
        let mut state = None;
        let report = ControlCommand::ReportCheckpoint {
            node: NodeId(1),
            vector: vector(&[(1, 1)]),
            hlc: Hlc::ZERO,
            reported_ms: 1,
        };
        assert_eq!(
            apply_to(&mut state, &report),
            Err(ControlError::NotBootstrapped)
        );
        assert_eq!(state, None);
        let bootstrap = ControlCommand::Bootstrap {
            members: vec![member(1, "a"), member(2, "b")],
            topology: TopologySpec::FullMesh,
        };
        apply_to(&mut state, &bootstrap).unwrap();
        let first = state.clone().unwrap();
        assert_eq!(first.voters(), [NodeId(1), NodeId(2)].into_iter().collect());
        // A second bootstrap (another node's view of the members, say) changes nothing.
        let other = ControlCommand::Bootstrap {
            members: vec![member(1, "x")],
            topology: TopologySpec::FullMesh,
        };
        assert_eq!(
            apply_to(&mut state, &other),
            Err(ControlError::Bootstrapped)
        );
        assert_eq!(state.as_ref(), Some(&first));
        apply_to(&mut state, &report).unwrap();
        assert_eq!(state.unwrap().checkpoints().len(), 1);
        // A bootstrap that cannot stand is refused and leaves no state.
        let mut empty = None;
        let duplicate = ControlCommand::Bootstrap {
            members: vec![member(1, "a"), member(2, "a")],
            topology: TopologySpec::FullMesh,
        };
        assert!(apply_to(&mut empty, &duplicate).is_err());
        assert_eq!(empty, None);
    }

    #[test]
    fn the_last_active_member_cannot_leave() {
        let mut s = ControlState::bootstrap(vec![member(1, "a")], TopologySpec::FullMesh).unwrap();
        assert_eq!(
            s.apply(&ControlCommand::Drain(NodeId(1))),
            Err(ControlError::LastActive)
        );
        assert_eq!(
            s.apply(&ControlCommand::Remove(NodeId(1))),
            Err(ControlError::LastActive)
        );
    }

    #[test]
    fn removing_the_middle_of_a_chain_needs_new_links_first() {
        let mut s = ControlState::bootstrap(
            vec![member(1, "a"), member(2, "b"), member(3, "c")],
            TopologySpec::Links(vec![(NodeId(1), NodeId(2)), (NodeId(2), NodeId(3))]),
        )
        .unwrap();
        // Neither a drain (which ends in a removal) nor a removal may cut a and c apart.
        let err = s.apply(&ControlCommand::Drain(NodeId(2))).unwrap_err();
        assert!(matches!(err, ControlError::Topology(_)), "{err}");
        let err = s.apply(&ControlCommand::Remove(NodeId(2))).unwrap_err();
        assert!(matches!(err, ControlError::Topology(_)), "{err}");
        s.apply(&ControlCommand::SetTopology(TopologySpec::Links(vec![
            (NodeId(1), NodeId(2)),
            (NodeId(2), NodeId(3)),
            (NodeId(1), NodeId(3)),
        ])))
        .unwrap();
        s.apply(&ControlCommand::Remove(NodeId(2))).unwrap();
        assert_eq!(s.topology().unwrap().neighbors(NodeId(1)), vec![NodeId(3)]);
    }

    #[test]
    fn a_new_member_is_linked_to_everyone_until_the_links_name_it() {
        let mut s = ControlState::bootstrap(
            vec![member(1, "a"), member(2, "b")],
            TopologySpec::Links(vec![(NodeId(1), NodeId(2))]),
        )
        .unwrap();
        s.apply(&ControlCommand::Join(member(3, "c"))).unwrap();
        let t = s.topology().unwrap();
        assert_eq!(t.neighbors(NodeId(3)), vec![NodeId(1), NodeId(2)]);
    }

    #[test]
    fn the_stable_frontier_is_what_every_holder_has_applied() {
        let mut s = three();
        assert!(s.stable_frontier().is_empty(), "nobody reported yet");
        report(&mut s, 1, &[(1, 10), (2, 5)], 100);
        report(&mut s, 2, &[(1, 8), (2, 7), (3, 1)], 100);
        assert!(s.stable_frontier().is_empty(), "c has not reported");
        report(&mut s, 3, &[(1, 9), (2, 6), (3, 4)], 100);
        assert_eq!(s.stable_frontier(), vector(&[(1, 8), (2, 5)]));
        // A report behind the previous one (a node that lost writes) holds the frontier back.
        report(&mut s, 2, &[(1, 3), (2, 7), (3, 1)], 50);
        assert_eq!(s.stable_frontier(), vector(&[(1, 3), (2, 5)]));
        report(&mut s, 2, &[(1, 8), (2, 7), (3, 1)], 150);
        // A joining member holds it back until it reports its snapshot's vector.
        s.apply(&ControlCommand::Join(member(4, "d"))).unwrap();
        assert!(s.stable_frontier().is_empty());
        report(&mut s, 4, &[(1, 8), (2, 2), (3, 4)], 200);
        assert_eq!(s.stable_frontier(), vector(&[(1, 8), (2, 2)]));
        s.apply(&ControlCommand::Activate(NodeId(4))).unwrap();
        assert_eq!(s.stable_frontier(), vector(&[(1, 8), (2, 2)]));
        // A removed member no longer holds it back, once the others reported again (their
        // reports before the removal may lag what they hold of its events).
        s.apply(&ControlCommand::Remove(NodeId(4))).unwrap();
        assert!(s.stable_frontier().is_empty());
        report(&mut s, 1, &[(1, 10), (2, 5)], 300);
        report(&mut s, 2, &[(1, 8), (2, 7), (3, 1)], 300);
        report(&mut s, 3, &[(1, 9), (2, 6), (3, 4)], 300);
        assert_eq!(s.stable_frontier(), vector(&[(1, 8), (2, 5)]));
    }

    #[test]
    fn the_stable_hlc_waits_for_each_origin_to_be_confirmed() {
        let mut s = three();
        // a reports at HLC 100 having issued 5 events; b and c have not reported yet.
        report_hlc(&mut s, 1, &[(1, 5)], 10, 100);
        assert_eq!(s.stable_hlc(), None, "b and c have not reported");
        report_hlc(&mut s, 2, &[(1, 3), (2, 4)], 10, 200);
        report_hlc(&mut s, 3, &[(1, 5), (2, 4), (3, 2)], 10, 300);
        // b lacks a's events 4 and 5: a's report is not confirmed, nothing is known of a.
        assert_eq!(s.stable_hlc(), None);
        assert_eq!(
            s.floors()[&NodeId(2)].floor,
            Hlc::ZERO,
            "a lacks b's events"
        );
        // b catches up: a's report is confirmed; b's and c's wait for a to have their events.
        report_hlc(&mut s, 2, &[(1, 5), (2, 4), (3, 2)], 20, 400);
        assert_eq!(s.floors()[&NodeId(1)].floor, hlc(100, 1));
        assert_eq!(s.floors()[&NodeId(3)].floor, Hlc::ZERO);
        assert_eq!(
            s.stable_hlc(),
            None,
            "b's and c's reports are not confirmed"
        );
        // a reports again, with b's and c's events: their first reports are confirmed, and so
        // is a's new one at once (everyone has a's 5 events).
        report_hlc(&mut s, 1, &[(1, 5), (2, 4), (3, 2)], 20, 500);
        assert_eq!(s.floors()[&NodeId(2)].floor, hlc(200, 2));
        assert_eq!(s.floors()[&NodeId(3)].floor, hlc(300, 3));
        assert_eq!(s.floors()[&NodeId(1)].floor, hlc(500, 1));
        assert_eq!(s.stable_hlc(), Some(hlc(200, 2)));
        // A pending report is not replaced by later ones: b writes on, its reports keep coming,
        // and the first unconfirmed one is confirmed as soon as everyone has its events.
        report_hlc(&mut s, 2, &[(1, 5), (2, 9), (3, 2)], 30, 600);
        report_hlc(&mut s, 2, &[(1, 5), (2, 12), (3, 2)], 40, 700);
        assert_eq!(s.floors()[&NodeId(2)].pending, Some((Seq(9), hlc(600, 2))));
        report_hlc(&mut s, 3, &[(1, 5), (2, 10), (3, 2)], 40, 710);
        report_hlc(&mut s, 1, &[(1, 5), (2, 10), (3, 2)], 40, 720);
        assert_eq!(s.floors()[&NodeId(2)].floor, hlc(600, 2));
        assert_eq!(s.stable_hlc(), Some(hlc(600, 2)));
        // A joining member holds it back until it has reported and been confirmed.
        s.apply(&ControlCommand::Join(member(4, "d"))).unwrap();
        assert_eq!(s.stable_hlc(), None);
        report_hlc(&mut s, 4, &[(1, 5), (2, 10), (3, 2)], 50, 800);
        assert_eq!(s.stable_hlc(), Some(hlc(600, 2)));
        // A removed member whose events everyone holds alike no longer counts; one whose events
        // the members hold unevenly still does.
        // b is removed (without a drain) having reported 12 events; a, c and d reported 10,
        // but their reports may lag: c already holds b's 11 and 12.
        s.apply(&ControlCommand::Activate(NodeId(4))).unwrap();
        s.apply(&ControlCommand::Remove(NodeId(2))).unwrap();
        assert_eq!(s.stable_hlc(), None, "every member reports again first");
        report_hlc(&mut s, 1, &[(1, 5), (2, 10), (3, 2)], 60, 900);
        report_hlc(&mut s, 3, &[(1, 5), (2, 12), (3, 2)], 60, 910);
        report_hlc(&mut s, 4, &[(1, 5), (2, 10), (3, 2)], 60, 920);
        assert_eq!(
            s.stable_hlc(),
            Some(hlc(600, 2)),
            "a and d lack b's 11 and 12: b still holds it back"
        );
        // c relays them; once every report since the removal holds them alike, b no longer
        // counts (the least floor is now c's), and the stable HLC never went back on the way.
        report_hlc(&mut s, 1, &[(1, 5), (2, 12), (3, 2)], 70, 930);
        report_hlc(&mut s, 4, &[(1, 5), (2, 12), (3, 2)], 70, 940);
        assert_eq!(s.stable_hlc(), Some(hlc(910, 3)));
        // Events a dead region reported but never shipped are nowhere: they hold nothing back.
        s.apply(&ControlCommand::Join(member(5, "e"))).unwrap();
        report_hlc(&mut s, 5, &[(1, 5), (2, 12), (3, 2)], 80, 950);
        s.apply(&ControlCommand::Activate(NodeId(5))).unwrap();
        report_hlc(&mut s, 5, &[(1, 5), (2, 12), (3, 2), (5, 30)], 90, 960);
        s.apply(&ControlCommand::Remove(NodeId(5))).unwrap();
        for (node, at) in [(1, 1000), (3, 1010), (4, 1020)] {
            report_hlc(&mut s, node, &[(1, 5), (2, 12), (3, 2), (5, 3)], 100, at);
        }
        assert_eq!(
            s.stable_hlc(),
            Some(hlc(1000, 1)),
            "e reported 30 events and shipped 3 before it died: the members' reports decide"
        );
    }

    #[test]
    fn keyspace_options_are_set_checked_and_dropped() {
        let mut s = three();
        let writers = |ids: &[u64]| KeyspaceOptions {
            writers: ids.iter().map(|i| NodeId(*i)).collect(),
        };
        let set = |prefix: &str, options: Option<KeyspaceOptions>| ControlCommand::SetKeyspace {
            prefix: prefix.into(),
            options,
        };
        s.apply(&set("orders:", Some(writers(&[1, 2])))).unwrap();
        s.apply(&set("orders:eu:", Some(writers(&[3])))).unwrap();
        s.apply(&set("frozen:", Some(writers(&[])))).unwrap();
        let before = s.clone();
        for refused in [
            set("x:", Some(writers(&[9]))),
            set("", Some(writers(&[1]))),
            set(
                &"p".repeat(KEYSPACE_PREFIX_BYTES_MAX + 1),
                Some(writers(&[1])),
            ),
            set("never-set:", None),
        ] {
            assert!(s.apply(&refused).is_err(), "{refused:?}");
            assert_eq!(s, before);
        }
        let rules = Keyspaces::new(s.keyspaces().clone());
        // The longest matching prefix decides.
        assert_eq!(rules.refusing(b"orders:1", NodeId(1)), None);
        assert_eq!(rules.refusing(b"orders:1", NodeId(3)), Some("orders:"));
        assert_eq!(
            rules.refusing(b"orders:eu:1", NodeId(1)),
            Some("orders:eu:")
        );
        assert_eq!(rules.refusing(b"orders:eu:1", NodeId(3)), None);
        assert_eq!(rules.refusing(b"frozen:k", NodeId(1)), Some("frozen:"));
        assert_eq!(rules.refusing(b"other", NodeId(3)), None);
        assert_eq!(rules.refusing(b"order", NodeId(3)), None);
        s.apply(&set("orders:", None)).unwrap();
        assert_eq!(s.keyspaces().len(), 2);
        // At most KEYSPACES_MAX of them.
        for i in 0..KEYSPACES_MAX - 2 {
            s.apply(&set(&format!("k{i}:"), Some(writers(&[1]))))
                .unwrap();
        }
        assert!(s.apply(&set("one-more:", Some(writers(&[1])))).is_err());
        // An existing one can still be changed.
        s.apply(&set("k0:", Some(writers(&[2])))).unwrap();
    }

    #[test]
    fn voters_are_the_first_five_active_members() {
        let members = (1..=7).map(|i| member(i, &format!("r{i}"))).collect();
        let mut s = ControlState::bootstrap(members, TopologySpec::FullMesh).unwrap();
        assert_eq!(s.voters(), (1..=5).map(NodeId).collect());
        s.apply(&ControlCommand::Drain(NodeId(2))).unwrap();
        assert_eq!(
            s.voters(),
            [1, 3, 4, 5, 6].map(NodeId).into_iter().collect()
        );
    }

    #[test]
    fn state_and_commands_survive_encoding() {
        let mut s = three();
        report(&mut s, 2, &[(1, 3)], 7);
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&s, config).unwrap();
        let (back, _): (ControlState, usize) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(back, s);
        let command = ControlCommand::Join(member(9, "z"));
        let bytes = bincode::serde::encode_to_vec(&command, config).unwrap();
        let (back, _): (ControlCommand, usize) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(back, command);
    }

    fn command_strategy() -> impl proptest::strategy::Strategy<Value = ControlCommand> {
        use proptest::prelude::*;
        let node = || (1u64..8).prop_map(NodeId);
        prop_oneof![
            (1u64..8, 0u8..4)
                .prop_map(|(id, r)| ControlCommand::Join(member(id, &format!("r{r}")))),
            node().prop_map(ControlCommand::Activate),
            (
                0u8..3,
                proptest::option::of(proptest::collection::btree_set(node(), 0..3))
            )
                .prop_map(|(p, writers)| ControlCommand::SetKeyspace {
                    prefix: format!("p{p}:"),
                    options: writers.map(|writers| KeyspaceOptions { writers }),
                }),
            node().prop_map(ControlCommand::Drain),
            node().prop_map(ControlCommand::Remove),
            Just(ControlCommand::SetTopology(TopologySpec::FullMesh)),
            proptest::collection::vec((node(), node()), 0..6)
                .prop_map(|links| ControlCommand::SetTopology(TopologySpec::Links(links))),
            (
                node(),
                proptest::collection::vec((1u64..8, 0u64..20), 0..4),
                0u64..50
            )
                .prop_map(|(node, seqs, at)| ControlCommand::ReportCheckpoint {
                    node,
                    vector: vector(&seqs),
                    hlc: Hlc::new(at, 0, braid_conflict::NodeId(node.0)),
                    reported_ms: at,
                }),
        ]
    }

    proptest::proptest! {
        /// Whatever the log holds: a refused command changes nothing, an applied one leaves a
        /// state that keeps every rule, whose topology is usable and whose frontier no holder
        /// is behind.
        #[test]
        fn any_log_keeps_the_rules(commands in proptest::collection::vec(command_strategy(), 0..40)) {
            let mut s = three();
            for command in &commands {
                let before = s.clone();
                match s.apply(command) {
                    Ok(()) => {
                        proptest::prop_assert!(s.invariants_hold());
                        proptest::prop_assert!(s.topology().is_ok());
                        let frontier = s.stable_frontier();
                        for m in s.members().filter(|m| {
                            matches!(m.state, MemberState::Active | MemberState::Draining)
                        }) {
                            match s.checkpoints().get(&m.id) {
                                Some(c) => proptest::prop_assert!(c.vector.dominates(&frontier)),
                                None => proptest::prop_assert!(frontier.is_empty()),
                            }
                        }
                    }
                    Err(_) => proptest::prop_assert_eq!(&s, &before),
                }
            }
        }
    }
}
