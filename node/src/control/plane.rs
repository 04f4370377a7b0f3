//! The control plane as a node runs it: its Raft (log, vote and snapshots in RocksDB beside the
//! data, calls over the mesh's QUIC), the group's bootstrap, checkpoints reported every few
//! seconds, and what `/status` shows of it.
//!
//! ```text
//!   start: open the log ─► state machine from its snapshot ─► Raft ─► initialize (idempotent)
//!   upkeep, every UPKEEP_MS:
//!     leader, no state yet      ─► propose Bootstrap (members and links from its config)
//!     leader, members not in Raft ─► add them as learners
//!     every CHECKPOINT_INTERVAL_MS ─► propose ReportCheckpoint(this node's vector and HLC)
//!     a new stable frontier      ─► the driver trims the change log through it (GC on)
//!     a new stable HLC           ─► the driver drops the tombstones at or below it (GC on)
//!     a new committed topology   ─► the driver re-routes, the transport follows the links
//!     new committed keyspaces    ─► the driver checks client writes against them
//!     leader, voters ≠ the first five active members ─► change the Raft membership
//!     this node draining         ─► refuse writes; once every other member's checkpoint holds
//!                                   all of this node's events ─► Remove(this node) ─► stop
//!   propose(command): this node's Raft if it leads, else a Propose call to the leader
//! ```
//!
//! Every node of a new cluster initializes the group with the same voters (the first
//! [`VOTERS_MAX`] node ids of its configuration, which every node's file lists alike), so
//! whichever starts first gets the group going and the others' calls are refused harmlessly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use braid_conflict::Hlc;
use braid_protocol::control::{
    ControlCommand, ControlState, KeyspaceOptions, Keyspaces, Member, MemberState, TopologySpec,
    VOTERS_MAX,
};
use braid_protocol::{NodeId, RaftCall, Topology, VersionVector};
use openraft::{BasicNode, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::calls::{propose_here, Proposal, ProposeResult};
use super::quic::{CallError, QuicRaftClient, QuicRaftNetwork};
use super::rocks_log::RocksRaftLog;
use super::store::StateMachineStore;
use super::{
    lock, raft_config, ControlRaft, ControlReply, CHECKPOINT_INTERVAL_MS, PROPOSE_MS_MAX,
    PROPOSE_RETRY_MS, UPKEEP_MS,
};
use crate::config::NodeConfig;
use crate::driver::{now_ms, Input};
use crate::transport::Mesh;

/// Longest wait for the leader's answer to one forwarded proposal.
/// How long a voter may go without reporting a checkpoint (every 3 s) before a leave counts it
/// as dead ([`ControlPlane::leave`]). Reports carry their reporter's clock: the margin covers
/// clocks some seconds apart.
const VOTER_SILENT_MS: u64 = 30_000;

const FORWARD_MS_MAX: u64 = 5_000;

/// Longest wait at start for the committed control log to be applied.
const REPLAY_MS_MAX: u64 = 5_000;

/// Longest wait for one membership change or learner addition by the leader.
const RAFT_CALL_MS_MAX: u64 = 10_000;

/// Longest wait, when a region asks to join, for the group's bootstrap to be committed.
const BOOTSTRAP_WAIT_MS_MAX: u64 = 10_000;

/// Longest wait for a member that committed a join to apply it itself.
const JOIN_APPLY_MS_MAX: u64 = 3_000;

/// How long a removed member that never caught up on its removal stays in the Raft group
/// before the leader drops it anyway (it is down for good).
const REMOVED_GRACE_MS: u64 = 60_000;
/// Longest a refused change waits for this node's state machine to show that an earlier try
/// committed it (see [`ControlPlane::propose_once`]).
const APPLIED_WAIT_MS_MAX: u64 = 1_000;
/// How often a wait for this node's state machine looks at it again.
const APPLIED_POLL_MS: u64 = 20;

/// The control plane could not start or do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// Its log could not be opened.
    #[error("control-plane log: {0}")]
    Log(#[from] rocksdb::Error),
    /// Its storage failed.
    #[error("control-plane storage: {0}")]
    Storage(Box<openraft::StorageError<u64>>),
    /// Raft could not start.
    #[error("control plane: {0}")]
    Raft(String),
    /// A request that names what is not there.
    #[error("{0}")]
    Invalid(String),
    /// A proposal did not commit in time (no leader reachable: a minority cannot change
    /// anything).
    #[error("no leader committed the change within {PROPOSE_MS_MAX} ms: {0}")]
    NoLeader(String),
}

/// A node's control plane.
#[derive(Clone)]
pub struct ControlPlane {
    node: NodeId,
    mesh: Arc<Mesh>,
    raft: ControlRaft,
    machine: StateMachineStore,
    network: QuicRaftNetwork,
    /// Region names from the configuration, for nodes the state does not name (yet).
    regions: Arc<BTreeMap<NodeId, String>>,
    /// Clients for forwarded proposals, one per leader, kept with their connections.
    forwards: Arc<tokio::sync::Mutex<BTreeMap<NodeId, QuicRaftClient>>>,
    /// When each member last reported a checkpoint, as far as this node has seen: the state
    /// forgets every checkpoint at a removal, and a voter dead since must not count as alive.
    heard: Arc<std::sync::Mutex<BTreeMap<NodeId, u64>>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("node", &self.node)
            .field("state", &self.machine.state())
            .finish()
    }
}

/// The control plane in `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ControlStatus {
    /// The leader's region name, when one is known.
    pub leader: Option<String>,
    /// The Raft term this node is in.
    pub term: u64,
    /// This node's Raft role: `leader`, `follower`, `candidate` or `learner`.
    pub raft_role: String,
    /// Every member (removed ones included), by id; empty until the group is bootstrapped.
    pub members: Vec<MemberStatus>,
    /// The committed links between the members, by region name (each once).
    pub links: Vec<[String; 2]>,
    /// Whether the committed topology links every member to every other.
    pub full_mesh: bool,
    /// Per origin region, the highest sequence number every member not removed (joining,
    /// active or draining) has applied (what may be garbage-collected); empty while one of them
    /// has not reported.
    pub stable_frontier: BTreeMap<String, u64>,
    /// The stable HLC, as `wall_ms.logical`: every event some member lacks carries a greater
    /// one, so tombstones at or below it are dropped. Null until every member's reports are
    /// confirmed.
    #[serde(default)]
    pub stable_hlc: Option<String>,
    /// Options of keyspaces, by key prefix.
    #[serde(default)]
    pub keyspaces: BTreeMap<String, KeyspaceStatus>,
    /// The index of the last control command applied here.
    pub control_applied_index: Option<u64>,
}

/// One member in `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Its region name.
    pub name: String,
    /// Its node id.
    pub id: u64,
    /// `joining`, `active`, `draining` or `removed`.
    pub state: String,
    /// Whether it votes in the Raft group, as this node's view of the group's membership has
    /// it (else it learns, or has left the group).
    pub voter: bool,
    /// Its QUIC, RESP and HTTP addresses.
    pub peer_address: String,
    /// RESP.
    pub resp_address: String,
    /// HTTP.
    pub http_address: String,
    /// Its latest committed checkpoint, if it has reported.
    pub checkpoint: Option<CheckpointStatus>,
}

/// A keyspace's options in `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyspaceStatus {
    /// The regions that take client writes to it (none: it is frozen).
    pub writers: Vec<String>,
}

/// A checkpoint in `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointStatus {
    /// Per origin region, the highest sequence number applied.
    pub vector: BTreeMap<String, u64>,
    /// When it was reported, milliseconds since the Unix epoch (the member's clock).
    pub reported_ms: u64,
    /// Its durable HLC high-water mark then, as `wall_ms.logical`.
    #[serde(default)]
    pub hlc: String,
}

/// The bootstrap command a node proposes when it leads a group that has no state yet: every
/// node of its configuration, active, linked as configured.
pub fn bootstrap_command(config: &NodeConfig) -> ControlCommand {
    let unknown = || "unknown".to_string();
    let mut members = vec![Member {
        id: config.node(),
        region: config.region.clone(),
        peer_address: config.listen.peer.to_string(),
        resp_address: config.listen.resp.to_string(),
        http_address: config.listen.http.to_string(),
        state: MemberState::Active,
    }];
    members.extend(config.peers.iter().map(|p| Member {
        id: NodeId(p.id),
        region: p.region.clone(),
        peer_address: p.address.to_string(),
        resp_address: p.resp.map_or_else(unknown, |a| a.to_string()),
        http_address: p.http.map_or_else(unknown, |a| a.to_string()),
        state: MemberState::Active,
    }));
    members.sort_by_key(|m| m.id);
    // A loaded configuration's links form a usable topology (`NodeConfig::validate`).
    // (A single region's links name none: that is a full mesh of one, not links naming no one.)
    let topology = match (&config.links, config.topology()) {
        (Some(_), Ok(links)) if links.links().next().is_some() => {
            TopologySpec::Links(links.links().collect())
        }
        _ => TopologySpec::FullMesh,
    };
    ControlCommand::Bootstrap { members, topology }
}

impl ControlPlane {
    /// Opens the log in `dir` and starts this node's Raft, calling peers through `mesh` and
    /// `endpoint`. With `initialize`, a new group is initialized with the first voters of
    /// `config`; a region that joined a running mesh never does (it was admitted to the group
    /// that exists).
    pub async fn start(
        dir: &Path,
        config: &NodeConfig,
        mesh: Arc<Mesh>,
        endpoint: quinn::Endpoint,
        initialize: bool,
    ) -> Result<ControlPlane, ControlPlaneError> {
        std::fs::create_dir_all(dir).map_err(|e| ControlPlaneError::Raft(e.to_string()))?;
        let mut log = RocksRaftLog::open(dir)?;
        let committed = openraft::storage::RaftLogStorage::read_committed(&mut log)
            .await
            .map_err(|e| ControlPlaneError::Storage(Box::new(e)))?;
        let machine = StateMachineStore::open(Arc::new(log.clone()))
            .map_err(|e| ControlPlaneError::Storage(Box::new(e)))?;
        let network = QuicRaftNetwork::new(mesh.clone(), endpoint);
        let raft_config = raft_config()
            .validate()
            .map_err(|e| ControlPlaneError::Raft(e.to_string()))?;
        let node = config.node();
        let raft = ControlRaft::new(
            node.0,
            Arc::new(raft_config),
            network.clone(),
            log,
            machine.clone(),
        )
        .await
        .map_err(|e| ControlPlaneError::Raft(e.to_string()))?;

        // What this node committed before it stopped is applied before it serves: whether it
        // is still a member decides whether it may take writes. Bounded: a log that cannot be
        // replayed in time is replayed while the node runs.
        if let Some(committed) = committed {
            let replayed = raft
                .wait(Some(Duration::from_millis(REPLAY_MS_MAX)))
                .applied_index_at_least(Some(committed.index), "replay the committed log")
                .await;
            if let Err(err) = replayed {
                warn!(error = %err, "control plane: committed log not replayed before start");
            }
        }
        let voters: BTreeSet<u64> = config
            .regions()
            .keys()
            .take(VOTERS_MAX)
            .map(|n| n.0)
            .collect();
        if initialize && voters.contains(&node.0) {
            // Identical on every node of the cluster, so safe to call on each; refused once this
            // node's log holds anything (it restarted, or a peer got there first).
            match raft.initialize(voters).await {
                Ok(()) => info!(%node, "control plane: new group initialized"),
                Err(err) => debug!(%node, error = %err, "control plane: group already initialized"),
            }
        }
        let plane = ControlPlane {
            node,
            mesh,
            raft,
            machine,
            network,
            regions: Arc::new(config.regions()),
            forwards: Arc::default(),
            heard: Arc::default(),
        };
        // The directory follows the committed members from the start, before the mesh serves
        // anyone: a member removed while this node was down is refused (and told why) at once,
        // not served until the first upkeep round.
        if let Some(state) = plane.state() {
            plane.follow_members(&state);
        }
        Ok(plane)
    }

    /// The node's Raft (its transport serves peers' calls with it).
    pub fn raft(&self) -> &ControlRaft {
        &self.raft
    }

    /// The committed state, once the group is bootstrapped.
    pub fn state(&self) -> Option<ControlState> {
        self.machine.state()
    }

    /// Commits `command`: through this node's Raft when it leads, else through the leader.
    /// Fails when no leader commits it within [`PROPOSE_MS_MAX`] (a minority cannot).
    pub async fn propose(
        &self,
        command: ControlCommand,
    ) -> Result<ControlReply, ControlPlaneError> {
        let mut last = String::from("no leader known");
        let attempts = async {
            loop {
                match propose_here(&self.raft, command.clone()).await {
                    Ok(reply) => return Ok(reply),
                    Err(Proposal::Failed(why)) => last = why,
                    Err(Proposal::Forward(None)) => last = "no leader known".into(),
                    Err(Proposal::Forward(Some(leader))) => {
                        let mut forwards = self.forwards.lock().await;
                        let client = forwards
                            .entry(leader)
                            .or_insert_with(|| self.network.client(leader));
                        let forwarded: Result<ProposeResult, CallError> = client
                            .call(
                                RaftCall::Propose,
                                &command,
                                Duration::from_millis(FORWARD_MS_MAX),
                            )
                            .await;
                        match forwarded {
                            Ok(Ok(reply)) => return Ok(reply),
                            Ok(Err(why)) => last = format!("leader {leader}: {why}"),
                            Err(err) => last = format!("leader {leader}: {err}"),
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(PROPOSE_RETRY_MS)).await;
            }
        };
        // Bounded as a whole: a node that still believes it leads, cut off from the others,
        // would wait for its commit forever.
        match tokio::time::timeout(Duration::from_millis(PROPOSE_MS_MAX), attempts).await {
            Ok(result) => result,
            Err(_) => Err(ControlPlaneError::NoLeader(format!(
                "{last} (a change already sent to a leader may still commit)"
            ))),
        }
    }

    /// [`ControlPlane::propose`] for a change the state machine refuses to make twice (a join,
    /// a drain, a removal): `propose` tries again after an answer it did not get (a forward
    /// that timed out, a commit slower than the leader's bound), and that second try is refused
    /// when the first committed. So a refusal is checked against the committed state, which
    /// this node's state machine is given [`APPLIED_WAIT_MS_MAX`] to catch up with: when `done`
    /// says the change is there, it was applied.
    async fn propose_once(
        &self,
        command: ControlCommand,
        done: impl Fn(&ControlState) -> bool,
    ) -> Result<ControlReply, ControlPlaneError> {
        let reply = self.propose(command).await?;
        if !matches!(reply, ControlReply::Refused(_)) {
            return Ok(reply);
        }
        let deadline = Instant::now() + Duration::from_millis(APPLIED_WAIT_MS_MAX);
        loop {
            if self.state().as_ref().is_some_and(&done) {
                debug!(refused = ?reply, "a retried change was refused: the first try committed it");
                return Ok(ControlReply::Applied);
            }
            if Instant::now() >= deadline {
                return Ok(reply);
            }
            tokio::time::sleep(Duration::from_millis(APPLIED_POLL_MS)).await;
        }
    }

    /// Admits a new region as a joining member. Asking again for a member already admitted
    /// with the same region and addresses succeeds (a `braid join` that is retried); anything
    /// else the state refuses is [`ControlReply::Refused`].
    pub async fn join(
        &self,
        request: &crate::http::JoinRequest,
    ) -> Result<ControlReply, ControlPlaneError> {
        let invalid = |why: String| Err(ControlPlaneError::Invalid(why));
        let ours = self.mesh.cluster.to_string();
        if !request.cluster_id.eq_ignore_ascii_case(&ours) {
            return invalid(format!(
                "the new region's configuration names cluster {}, and this is cluster {ours}",
                request.cluster_id
            ));
        }
        if let Err(why) = crate::config::check_region_name(&request.region) {
            return invalid(why);
        }
        for (what, address) in [
            ("peer-address", &request.peer_address),
            ("resp-address", &request.resp_address),
            ("http-address", &request.http_address),
        ] {
            if address.parse::<std::net::SocketAddr>().is_err() {
                return invalid(format!("{what} {address:?} is not an IP address and port"));
            }
        }
        let member = Member {
            id: NodeId(request.id),
            region: request.region.clone(),
            peer_address: request.peer_address.clone(),
            resp_address: request.resp_address.clone(),
            http_address: request.http_address.clone(),
            state: MemberState::Joining,
        };
        // A mesh that has just started may not have committed its bootstrap yet.
        let deadline = Instant::now() + Duration::from_millis(BOOTSTRAP_WAIT_MS_MAX);
        while self.state().is_none() {
            if Instant::now() >= deadline {
                return Err(ControlPlaneError::NoLeader(
                    "the mesh's control plane has not bootstrapped yet".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let admitted = |state: &ControlState| {
            state.member(member.id).is_some_and(|m| {
                m.region == member.region
                    && m.peer_address == member.peer_address
                    && matches!(m.state, MemberState::Joining | MemberState::Active)
            })
        };
        if self.state().as_ref().is_some_and(admitted) {
            return Ok(ControlReply::Applied);
        }
        let reply = self
            .propose_once(ControlCommand::Join(member.clone()), admitted)
            .await?;
        // This node serves the new region's snapshot next: it must know it at once, not at
        // its next upkeep, so it waits (bounded) for its own state machine to apply the join.
        let deadline = Instant::now() + Duration::from_millis(JOIN_APPLY_MS_MAX);
        while reply == ControlReply::Applied && Instant::now() < deadline {
            if let Some(state) = self.state().filter(|s| admitted(s)) {
                self.follow_members(&state);
                break;
            }
            tokio::time::sleep(Duration::from_millis(APPLIED_POLL_MS)).await;
        }
        Ok(reply)
    }

    /// Makes the mesh's directory of peers the committed members that are not removed (their
    /// QUIC addresses): a region that joined can connect and be subscribed to, a removed one
    /// no longer can.
    fn follow_members(&self, state: &ControlState) {
        let peers = state
            .members()
            .filter(|m| m.id != self.node && m.state != MemberState::Removed)
            .filter_map(|m| match m.peer_address.parse() {
                Ok(address) => Some((m.id, m.region.clone(), address)),
                Err(_) => {
                    warn!(node = %m.id, address = %m.peer_address, "a member's address does not parse: not connecting to it");
                    None
                }
            });
        // Removed ones first: a peer dropped from the directory is then always told it was
        // removed, never taken for a stranger.
        self.mesh.peers.set_removed(
            state
                .members()
                .filter(|m| m.state == MemberState::Removed)
                .map(|m| m.id),
        );
        self.mesh.peers.update(peers);
    }

    /// Removes the member named `region` from the mesh for good: one that is dead, or a join
    /// that never finished. Its id is never used again; whatever it held that no other region
    /// does is lost (a live region leaves with [`ControlPlane::leave`] instead, which ships it).
    pub async fn remove(&self, region: &str) -> Result<ControlReply, ControlPlaneError> {
        let state = self.state().ok_or_else(|| {
            ControlPlaneError::Invalid("the group is not bootstrapped yet".into())
        })?;
        let Some(member) = state
            .members()
            .find(|m| m.region == region && m.state != MemberState::Removed)
        else {
            // Asked again after a try whose answer was lost (it committed): removed is what
            // was asked for.
            if state.members().any(|m| m.region == region) {
                debug!(
                    region,
                    "a removal asked for again: the region is removed already"
                );
                return Ok(ControlReply::Applied);
            }
            return Err(ControlPlaneError::Invalid(format!("no member {region}")));
        };
        if member.id == self.node {
            return Err(ControlPlaneError::Invalid(format!(
                "{region} is this node: a running region leaves with `braid leave`"
            )));
        }
        let id = member.id;
        // The voters once it is removed (a learner may take its place).
        let mut removed_state = state.clone();
        if removed_state.apply(&ControlCommand::Remove(id)).is_ok() {
            let after = removed_state.voters();
            if after != state.voters() {
                self.refuse_silent_voters(&state, &after, &format!("removing {region} now"))?;
            }
        }
        let removed = |state: &ControlState| {
            state
                .member(id)
                .is_some_and(|m| m.state == MemberState::Removed)
        };
        self.propose_once(ControlCommand::Remove(id), removed).await
    }

    /// Commits new links between the members, named by region (`None`: a full mesh).
    pub async fn set_topology(
        &self,
        links: Option<Vec<[String; 2]>>,
    ) -> Result<ControlReply, ControlPlaneError> {
        let spec = match links {
            None => TopologySpec::FullMesh,
            Some(links) => {
                let state = self.state().ok_or_else(|| {
                    ControlPlaneError::Invalid("the group is not bootstrapped yet".into())
                })?;
                let id = |name: &str| {
                    state
                        .members()
                        .find(|m| m.region == name && m.state != MemberState::Removed)
                        .map(|m| m.id)
                        .ok_or_else(|| ControlPlaneError::Invalid(format!("no member {name}")))
                };
                let mut pairs = Vec::with_capacity(links.len());
                for [a, b] in &links {
                    pairs.push((id(a)?, id(b)?));
                }
                TopologySpec::Links(pairs)
            }
        };
        self.propose(ControlCommand::SetTopology(spec)).await
    }

    /// Sets the writers of the keyspace of keys beginning with `prefix` (by region name; none
    /// freezes it), or (`None`) drops its options.
    pub async fn set_keyspace(
        &self,
        prefix: String,
        writers: Option<Vec<String>>,
    ) -> Result<ControlReply, ControlPlaneError> {
        let options = match writers {
            None => None,
            Some(names) => {
                let state = self.state().ok_or_else(|| {
                    ControlPlaneError::Invalid("the group is not bootstrapped yet".into())
                })?;
                let mut writers = BTreeSet::new();
                for name in &names {
                    let member = state
                        .members()
                        .find(|m| m.region == *name && m.state != MemberState::Removed)
                        .ok_or_else(|| ControlPlaneError::Invalid(format!("no member {name}")))?;
                    writers.insert(member.id);
                }
                Some(KeyspaceOptions { writers })
            }
        };
        self.propose(ControlCommand::SetKeyspace { prefix, options })
            .await
    }

    fn region(&self, state: Option<&ControlState>, node: NodeId) -> String {
        state
            .and_then(|s| s.member(node))
            .map(|m| m.region.clone())
            .or_else(|| self.regions.get(&node).cloned())
            .unwrap_or_else(|| node.to_string())
    }

    /// Why the control plane's Raft stopped for good (its log or state machine storage failed),
    /// if it did: the node can no longer report checkpoints or follow changes of the mesh.
    pub fn fatal(&self) -> Option<String> {
        match &self.raft.metrics().borrow().running_state {
            Ok(()) => None,
            Err(fatal) => Some(fatal.to_string()),
        }
    }

    /// What `/status` shows of the control plane.
    pub fn status(&self) -> ControlStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let state = self.machine.state();
        let named = |v: &VersionVector| -> BTreeMap<String, u64> {
            v.iter()
                .map(|(n, s)| (self.region(state.as_ref(), n), s.0))
                .collect()
        };
        let mut members = Vec::new();
        let mut frontier = BTreeMap::new();
        let mut stable_hlc = None;
        let mut keyspaces = BTreeMap::new();
        let mut links = Vec::new();
        let mut full_mesh = false;
        if let Some(state) = &state {
            // As the Raft group has it (which the leader keeps equal to the state's voters).
            let voters: BTreeSet<u64> = metrics.membership_config.voter_ids().collect();
            for member in state.members() {
                members.push(MemberStatus {
                    name: member.region.clone(),
                    id: member.id.0,
                    state: member.state.name().into(),
                    voter: voters.contains(&member.id.0),
                    peer_address: member.peer_address.clone(),
                    resp_address: member.resp_address.clone(),
                    http_address: member.http_address.clone(),
                    checkpoint: state
                        .checkpoints()
                        .get(&member.id)
                        .map(|c| CheckpointStatus {
                            vector: named(&c.vector),
                            reported_ms: c.reported_ms,
                            hlc: hlc_text(c.hlc),
                        }),
                });
            }
            frontier = named(&state.stable_frontier());
            stable_hlc = state.stable_hlc().map(hlc_text);
            keyspaces = state
                .keyspaces()
                .iter()
                .map(|(prefix, options)| {
                    let writers = options
                        .writers
                        .iter()
                        .map(|n| self.region(Some(state), *n))
                        .collect();
                    (prefix.clone(), KeyspaceStatus { writers })
                })
                .collect();
            if let Ok(topology) = state.topology() {
                full_mesh = topology.is_full_mesh();
                links = topology
                    .links()
                    .map(|(a, b)| [self.region(Some(state), a), self.region(Some(state), b)])
                    .collect();
            }
        }
        ControlStatus {
            leader: metrics
                .current_leader
                .map(|l| self.region(state.as_ref(), NodeId(l))),
            term: metrics.current_term,
            raft_role: match metrics.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .into(),
            members,
            links,
            full_mesh,
            stable_frontier: frontier,
            stable_hlc,
            keyspaces,
            control_applied_index: metrics.last_applied.map(|l| l.index),
        }
    }

    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.node.0)
    }

    /// Runs the upkeep until shutdown: the bootstrap, learners, checkpoints, and (with `gc`)
    /// the change log's garbage collection at the stable frontier.
    pub fn spawn_upkeep(
        &self,
        bootstrap: ControlCommand,
        gc: bool,
        inputs: mpsc::Sender<Input>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let plane = self.clone();
        tokio::spawn(async move {
            let mut next_checkpoint_ms = 0u64;
            let mut frontier_sent = VersionVector::new();
            let mut stable_hlc_sent = None;
            let mut keyspaces_sent = None;
            let mut topology_sent: Option<Topology> = None;
            let mut removals = BTreeMap::new();
            let mut leaving_vector = None;
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(UPKEEP_MS)) => {}
                }
                if let Some(state) = plane.state() {
                    plane.follow_members(&state);
                }
                plane.upkeep(&bootstrap, &mut removals).await;
                match plane.own_state() {
                    Some(MemberState::Draining) => {
                        // It keeps reporting and following the links below while it drains.
                        let _ = inputs.send(Input::Leaving).await;
                        if plane.finish_leaving(&inputs, &mut leaving_vector).await {
                            let _ = inputs.send(Input::Removed).await;
                            break;
                        }
                    }
                    Some(MemberState::Removed) => {
                        let _ = inputs.send(Input::Removed).await;
                        break;
                    }
                    _ => {}
                }
                let now = now_ms();
                if now >= next_checkpoint_ms && plane.state().is_some() {
                    next_checkpoint_ms = now + CHECKPOINT_INTERVAL_MS;
                    plane.report_checkpoint(&inputs).await;
                }
                plane.activate_if_joined().await;
                let state = plane.state();
                let topology = state
                    .as_ref()
                    .and_then(|s| s.topology().ok())
                    .filter(|t| t.contains(plane.node));
                if let Some(topology) = topology.filter(|t| topology_sent.as_ref() != Some(t)) {
                    if inputs
                        .send(Input::Topology(topology.clone()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    topology_sent = Some(topology);
                }
                let keyspaces = state.as_ref().map(|s| s.keyspaces().clone());
                if keyspaces.is_some() && keyspaces != keyspaces_sent {
                    if let Some(rules) = keyspaces.clone() {
                        if inputs
                            .send(Input::Keyspaces(Keyspaces::new(rules)))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    keyspaces_sent = keyspaces;
                }
                let stable_hlc = state.as_ref().and_then(|s| s.stable_hlc());
                if gc && stable_hlc.is_some() && stable_hlc != stable_hlc_sent {
                    if let Some(stable) = stable_hlc {
                        if inputs.send(Input::StableHlc(stable)).await.is_err() {
                            break;
                        }
                    }
                    stable_hlc_sent = stable_hlc;
                }
                let frontier = state.map(|s| s.stable_frontier()).unwrap_or_default();
                if gc && frontier != frontier_sent && !frontier.is_empty() {
                    if inputs
                        .send(Input::StableFrontier(frontier.clone()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    frontier_sent = frontier;
                }
            }
            if let Err(err) = plane.raft.shutdown().await {
                warn!(error = %err, "control plane did not shut down cleanly");
            }
        });
    }

    /// The leader's chores: bootstrap a new group; make every member a Raft learner at least;
    /// keep the voters equal to the state's; drop removed members from the group once they
    /// have their removal (`removals`: when the leader first saw each removed, and at which
    /// applied index). Each call into Raft is bounded: a leader cut off from the others must
    /// not stall the upkeep.
    async fn upkeep(
        &self,
        bootstrap: &ControlCommand,
        removals: &mut BTreeMap<u64, (u64, Instant)>,
    ) {
        if !self.is_leader() {
            return;
        }
        let Some(state) = self.state() else {
            match self.propose(bootstrap.clone()).await {
                Ok(ControlReply::Refused(why)) => {
                    error!(why, "control plane: bootstrap refused by the state machine")
                }
                Ok(reply) => info!(?reply, "control plane: bootstrap committed"),
                Err(err) => warn!(error = %err, "control plane: bootstrap not committed"),
            }
            return;
        };
        let bound = Duration::from_millis(RAFT_CALL_MS_MAX);
        let (known, voters, matched, applied) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let membership = &metrics.membership_config;
            let matched: BTreeMap<u64, u64> = metrics
                .replication
                .iter()
                .flatten()
                .filter_map(|(id, log)| log.map(|l| (*id, l.index)))
                .collect();
            (
                membership
                    .nodes()
                    .map(|(id, _)| *id)
                    .collect::<BTreeSet<u64>>(),
                membership.voter_ids().collect::<BTreeSet<u64>>(),
                matched,
                metrics.last_applied.map_or(0, |l| l.index),
            )
        };
        for member in state.members() {
            if member.state == MemberState::Removed || known.contains(&member.id.0) {
                continue;
            }
            // Not blocking: a learner that is down catches up when it is back.
            let added = self
                .raft
                .add_learner(member.id.0, BasicNode::default(), false);
            match tokio::time::timeout(bound, added).await {
                Ok(Ok(_)) => info!(node = %member.id, "control plane: added a learner"),
                Ok(Err(err)) => {
                    warn!(node = %member.id, error = %err, "control plane: cannot add a learner")
                }
                Err(_) => warn!(node = %member.id, "control plane: adding a learner timed out"),
            }
        }
        // The voters follow the members: the first five active ones, once each is in the group.
        // A member leaving or gone stops voting; it stays a learner so that it learns of its
        // removal.
        let wanted: BTreeSet<u64> = state.voters().iter().map(|n| n.0).collect();
        if !wanted.is_empty() && wanted != voters && wanted.is_subset(&known) {
            let change = self.raft.change_membership(wanted.clone(), true);
            match tokio::time::timeout(bound, change).await {
                Ok(Ok(_)) => info!(voters = ?wanted, "control plane: voters changed"),
                Ok(Err(err)) => warn!(error = %err, "control plane: voters not changed"),
                Err(_) => warn!("control plane: changing the voters timed out"),
            }
            return;
        }
        // A removed member leaves the group once it has replicated past the point where the
        // leader saw it removed (so it has its removal, and stops), or after a grace period
        // (it is down for good).
        let mut gone = BTreeSet::new();
        for member in state.members() {
            let id = member.id.0;
            if member.state != MemberState::Removed || !known.contains(&id) {
                removals.remove(&id);
                continue;
            }
            let (at, since) = *removals.entry(id).or_insert((applied, Instant::now()));
            let caught_up = matched.get(&id).is_some_and(|m| *m >= at);
            if caught_up || since.elapsed() >= Duration::from_millis(REMOVED_GRACE_MS) {
                gone.insert(id);
            }
        }
        if !gone.is_empty() {
            let change = self
                .raft
                .change_membership(openraft::ChangeMembers::RemoveNodes(gone.clone()), false);
            match tokio::time::timeout(bound, change).await {
                Ok(Ok(_)) => info!(nodes = ?gone, "control plane: removed members leave the group"),
                Ok(Err(err)) => warn!(error = %err, "control plane: removed members not dropped"),
                Err(_) => warn!("control plane: dropping removed members timed out"),
            }
        }
    }

    /// This node's state as a member, once the group is bootstrapped.
    pub fn own_state(&self) -> Option<MemberState> {
        self.state()?.member(self.node).map(|m| m.state)
    }

    /// Starts this region's departure: it drains (ships what it holds, takes no new writes),
    /// then removes itself once every other member holds all of its events, and stops.
    ///
    /// Refused while the voters it would leave behind have no live majority (those whose last
    /// checkpoint is older than [`VOTER_SILENT_MS`] count as dead): the change of voters
    /// a leave makes needs their votes, and would hold the control plane still until they came
    /// back.
    pub async fn leave(&self) -> Result<ControlReply, ControlPlaneError> {
        if self.own_state() == Some(MemberState::Draining) {
            return Ok(ControlReply::Applied);
        }
        if let Some(state) = self.state() {
            self.refuse_silent_voters(&state, &state.voters_without(self.node), "leaving now")?;
        }
        let node = self.node;
        let draining = |state: &ControlState| {
            state
                .member(node)
                .is_some_and(|m| m.state == MemberState::Draining)
        };
        self.propose_once(ControlCommand::Drain(node), draining)
            .await
    }

    /// A draining node's last step: once every other active or draining member's committed
    /// checkpoint holds everything this node holds, commit its removal. True once removed.
    async fn finish_leaving(
        &self,
        inputs: &mpsc::Sender<Input>,
        held: &mut Option<VersionVector>,
    ) -> bool {
        // What it held when it began to leave (writes are refused from `Input::Leaving` on,
        // which the driver took before this): what arrives later from active origins reaches
        // everyone from them anyway, and waiting for it would chase writers that never stop.
        if held.is_none() {
            *held = durable_checkpoint(inputs).await.map(|(vector, _)| vector);
        }
        let Some(vector) = held.as_ref() else {
            return false;
        };
        let mine = vector.get(self.node);
        let Some(state) = self.state() else {
            return false;
        };
        // Everything it holds, its own events and any it relays (a dead origin's events may be
        // held by it alone), must be held by everyone staying.
        let behind: Vec<&str> = state
            .members()
            .filter(|m| m.id != self.node)
            .filter(|m| matches!(m.state, MemberState::Active | MemberState::Draining))
            .filter(|m| {
                state
                    .checkpoints()
                    .get(&m.id)
                    .is_none_or(|c| !c.vector.dominates(vector))
            })
            .map(|m| m.region.as_str())
            .collect();
        if !behind.is_empty() {
            debug!(?behind, seq = %mine, "leaving: waiting for the others to hold this region's events");
            return false;
        }
        let membership = self.raft.metrics().borrow().membership_config.clone();
        if !super::may_remove_itself(&membership, self.node.0) {
            debug!("leaving: waiting for the voters to change without this region");
            return false;
        }
        match self.propose(ControlCommand::Remove(self.node)).await {
            Ok(ControlReply::Applied) => {
                info!(seq = %mine, "left the mesh: every other region holds this region's events");
                true
            }
            // Refused because an earlier attempt, whose answer was lost, already removed it:
            // the removal reaches this node's state machine and the next round stops it.
            Ok(other) => {
                debug!(reply = ?other, "leaving: removal refused");
                false
            }
            Err(err) => {
                debug!(error = %err, "leaving: removal not committed yet");
                false
            }
        }
    }

    /// A joining region runs its replica only once its snapshot is installed, so once its
    /// first checkpoint (that snapshot's vector, or later) is committed it has joined: it
    /// commits its activation.
    async fn activate_if_joined(&self) {
        let Some(state) = self.state() else {
            return;
        };
        let joined = state
            .member(self.node)
            .is_some_and(|m| m.state == MemberState::Joining)
            && state.checkpoints().contains_key(&self.node);
        if !joined {
            return;
        }
        match self.propose(ControlCommand::Activate(self.node)).await {
            Ok(ControlReply::Applied) => info!("joined the mesh: this region is active"),
            Ok(other) => debug!(reply = ?other, "activation refused"),
            Err(err) => debug!(error = %err, "activation not committed yet"),
        }
    }

    /// Refuses a change of the voters to `after` that needs the votes of voters silent for
    /// over [`VOTER_SILENT_MS`] (counted dead): it would hold the control plane still, the
    /// change itself too, until they came back. One never heard from yet (a group just started)
    /// is given the benefit of the doubt.
    fn refuse_silent_voters(
        &self,
        state: &ControlState,
        after: &BTreeSet<NodeId>,
        what: &str,
    ) -> Result<(), ControlPlaneError> {
        self.note_reports(state);
        let heard = lock(&self.heard);
        let now = now_ms();
        let silent: Vec<&str> = after
            .iter()
            .filter(|id| {
                heard
                    .get(id)
                    .is_some_and(|at| now.saturating_sub(*at) > VOTER_SILENT_MS)
            })
            .filter_map(|id| state.member(*id).map(|m| m.region.as_str()))
            .collect();
        if !after.is_empty() && (after.len() - silent.len()) * 2 <= after.len() {
            return Err(ControlPlaneError::Invalid(format!(
                "{what} needs the votes of {}, which reported no checkpoint for over {} s: bring \
                 them back, or remove them first (`braid remove --region NAME`)",
                silent.join(", "),
                VOTER_SILENT_MS / 1000
            )));
        }
        Ok(())
    }

    /// Notes the latest report of each member the state holds.
    fn note_reports(&self, state: &ControlState) {
        let mut heard = lock(&self.heard);
        for (node, checkpoint) in state.checkpoints() {
            let at = heard.entry(*node).or_default();
            *at = (*at).max(checkpoint.reported_ms);
        }
    }

    /// Reports this node's vector, made durable first: the others delete what every
    /// checkpoint holds, so a checkpoint must never name what a power loss could take away.
    async fn report_checkpoint(&self, inputs: &mpsc::Sender<Input>) {
        let Some((vector, hlc)) = durable_checkpoint(inputs).await else {
            return;
        };
        if let Some(state) = self.state() {
            self.note_reports(&state);
        }
        let command = ControlCommand::ReportCheckpoint {
            node: self.node,
            vector,
            hlc,
            reported_ms: now_ms(),
        };
        match self.propose(command).await {
            Ok(ControlReply::Refused(why)) => debug!(%why, "checkpoint refused"),
            Ok(_) => {}
            Err(err) => match self.fatal() {
                // Every later checkpoint fails too, and collection stalls mesh-wide.
                Some(fatal) => error!(
                    %fatal,
                    "the control plane stopped: this node reports no checkpoints; restart it \
                     (/health says unhealthy until then)"
                ),
                // A minority region cannot report; it keeps serving and tries again later.
                None => debug!(error = %err, "checkpoint not committed"),
            },
        }
    }
}

/// The driver's vector and HLC high-water mark, once its write-ahead log is synced; none
/// when the driver is gone.
async fn durable_checkpoint(inputs: &mpsc::Sender<Input>) -> Option<(VersionVector, Hlc)> {
    let (reply, answer) = oneshot::channel();
    inputs.send(Input::Checkpoint { reply }).await.ok()?;
    answer.await.ok()
}

/// An HLC as status documents show it: `wall_ms.logical`.
pub fn hlc_text(hlc: Hlc) -> String {
    format!("{}.{}", hlc.wall_ms, hlc.logical)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `braid cluster up --regions 1 --topology chain` lays out one region whose links name
    /// none: its group must bootstrap all the same.
    #[test]
    fn a_single_region_without_links_bootstraps_as_a_mesh_of_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("braid.toml");
        let text = r#"
cluster-id = "000102030405060708090a0b0c0d0e0f"
node-id = 1
region = "a"
data-dir = "data"
links = []
[listen]
peer = "127.0.0.1:7002"
resp = "127.0.0.1:7000"
http = "127.0.0.1:7001"
[tls]
ca-cert = "../ca.pem"
cert = "node.pem"
key = "node.key"
"#;
        std::fs::write(&path, text).unwrap();
        let config = NodeConfig::load(&path).unwrap();
        let ControlCommand::Bootstrap { members, topology } = bootstrap_command(&config) else {
            panic!("not a bootstrap");
        };
        assert_eq!(topology, TopologySpec::FullMesh);
        let state = ControlState::bootstrap(members, topology).unwrap();
        assert!(state.topology().unwrap().contains(NodeId(1)));
    }
}
