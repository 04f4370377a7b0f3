//! The control plane inside the simulator: every region runs the node's own Raft group (openraft
//! 0.9 with `braid-node`'s type configuration, log and state machine stores, and call-serving
//! code) over an in-process router whose network is the simulated one.
//!
//! ```text
//!   World (virtual ms) ──advance_to(t)──► tokio's paused clock ─► Raft timers, RPC tasks
//!   RPC ─► Router ─► LinkPolicy (down, cut, loss, latency) ─► framed bytes ─► calls::answer
//!   every CHECKPOINT_INTERVAL_MS: ReportCheckpoint(vector) ─► Router::propose (forwarded)
//!   every tick: committed stable frontier ─► Replica::handle_stable_frontier (GC)
//!               committed stable HLC      ─► Replica::handle_stable_hlc (tombstones)
//!   metrics watch ─► leaders per term; state machine applies ─► entries per index
//! ```
//!
//! Determinism: one `current_thread` runtime with a paused clock and a seeded scheduler, the
//! Raft random source seeded per run ([`SeededRaftRng`]), and the network's draws from a
//! sub-stream of the run's seed. The checkers: at most one leader per term, and every
//! acknowledged command applied at one index with the same entry by every node that got there.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use braid_conflict::Hlc;
use braid_node::control::router::{Fate, LinkPolicy, Router, RouterConnection, RouterNetwork};
use braid_node::control::runtime::SeededRaftRng;
use braid_node::control::store::{MemLogStore, Meta, SnapshotVault, StateMachineStore};
use braid_node::control::{
    raft_config, ControlConfig, ControlRaft, ControlReply, CHECKPOINT_INTERVAL_MS, PROPOSE_MS_MAX,
    PROPOSE_RETRY_MS, UPKEEP_MS,
};
use braid_node::scenario::Verdict;
use braid_protocol::control::{
    ControlCommand, ControlState, Member, MemberState, TopologySpec, VOTERS_MAX,
};
use braid_protocol::{NodeId, Topology, VersionVector};
use openraft::error::{InstallSnapshotError, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, ServerState, StorageError,
    StoredMembership,
};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

use braid_node::workload::{below, unit};

type RaftId = u64;

/// Nodes start up to this long after the one before them, in virtual ms.
const START_JITTER_MS: u64 = 400;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The network the Raft calls cross: the world's cuts and slow links, its latency and loss.
#[derive(Debug)]
struct RaftNet {
    rng: ChaCha8Rng,
    latency_ms_min: u64,
    latency_ms_max: u64,
    loss: f64,
    /// Directed pairs of node ids whose messages are dropped.
    cut: BTreeSet<(RaftId, RaftId)>,
    /// Extra latency per pair (lower id first).
    slow: BTreeMap<(RaftId, RaftId), u64>,
}

impl RaftNet {
    fn fate(&mut self, from: RaftId, to: RaftId) -> Fate {
        if self.cut.contains(&(from, to)) || unit(&mut self.rng) < self.loss {
            return Fate::Lost;
        }
        let spread = self.latency_ms_max - self.latency_ms_min + 1;
        let extra = self
            .slow
            .get(&(from.min(to), from.max(to)))
            .copied()
            .unwrap_or(0);
        Fate::Arrives(Duration::from_millis(
            self.latency_ms_min + below(&mut self.rng, spread) + extra,
        ))
    }
}

/// A node's latest Raft snapshot, kept across its restarts (the node keeps it in RocksDB).
#[derive(Debug, Default)]
struct MemVault {
    kept: Mutex<Option<(Meta, Vec<u8>)>>,
}

impl SnapshotVault for MemVault {
    fn save(&self, meta: &Meta, bytes: &[u8]) -> Result<(), StorageError<RaftId>> {
        *lock(&self.kept) = Some((meta.clone(), bytes.to_vec()));
        Ok(())
    }

    fn load(&self) -> Result<Option<(Meta, Vec<u8>)>, StorageError<RaftId>> {
        Ok(lock(&self.kept).clone())
    }
}

/// What the checkers look at, gathered while the group runs.
#[derive(Debug, Default)]
struct Observed {
    /// Per term, every node seen leading it, in the order they were first seen leading.
    leaders: BTreeMap<u64, Vec<RaftId>>,
    /// (node, term, leader) each time a node's view changes, for the trace.
    changes: Vec<(RaftId, u64, Option<RaftId>)>,
    /// Per node, every entry it applied: index -> (log id, digest of the payload).
    applied: BTreeMap<RaftId, BTreeMap<u64, (LogId<RaftId>, u64)>>,
    /// Per node, the last index of the latest Raft snapshot it installed: it never applies the
    /// entries that snapshot covers one by one.
    covered: BTreeMap<RaftId, u64>,
    /// Digests of the commands whose proposal was acknowledged (committed).
    acked: Vec<(u64, String)>,
}

/// A 64-bit digest of an entry's payload: equal payloads, equal digests.
fn digest(payload: &EntryPayload<ControlConfig>) -> u64 {
    let bytes = match payload {
        EntryPayload::Blank => b"blank".to_vec(),
        EntryPayload::Normal(command) => command_bytes(command),
        EntryPayload::Membership(m) => format!("{m:?}").into_bytes(),
    };
    let hash = blake3::hash(&bytes);
    let mut word = [0u8; 8];
    word.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(word)
}

fn command_bytes(command: &ControlCommand) -> Vec<u8> {
    bincode::serde::encode_to_vec(command, bincode::config::standard()).unwrap_or_default()
}

fn command_digest(command: &ControlCommand) -> u64 {
    digest(&EntryPayload::Normal(command.clone()))
}

/// The node's state machine store, with every applied entry noted for the checkers.
struct ObservedMachine {
    inner: StateMachineStore,
    node: RaftId,
    observed: Arc<Mutex<Observed>>,
    /// The injected bug [`crate::InjectedBug::DropControlApply`], on this node.
    drop_every: Option<u64>,
    commands: u64,
}

impl RaftStateMachine<ControlConfig> for ObservedMachine {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<RaftId>>, StoredMembership<RaftId, BasicNode>), StorageError<RaftId>>
    {
        self.inner.applied_state().await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ControlReply>, StorageError<RaftId>>
    where
        I: IntoIterator<Item = Entry<ControlConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut entries: Vec<Entry<ControlConfig>> = entries.into_iter().collect();
        {
            let mut observed = lock(&self.observed);
            let applied = observed.applied.entry(self.node).or_default();
            for entry in &mut entries {
                if let (EntryPayload::Normal(_), Some(every)) = (&entry.payload, self.drop_every) {
                    self.commands += 1;
                    if self.commands.is_multiple_of(every) {
                        // The injected bug: acknowledged as applied, but it never was.
                        entry.payload = EntryPayload::Blank;
                        continue;
                    }
                }
                applied.insert(entry.log_id.index, (entry.log_id, digest(&entry.payload)));
            }
        }
        self.inner.apply(entries).await
    }

    async fn get_snapshot_builder(&mut self) -> StateMachineStore {
        self.inner.get_snapshot_builder().await
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<RaftId>> {
        self.inner.begin_receiving_snapshot().await
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<RaftId>> {
        if let Some(last) = meta.last_log_id {
            lock(&self.observed).covered.insert(self.node, last.index);
        }
        self.inner.install_snapshot(meta, snapshot).await
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<ControlConfig>>, StorageError<RaftId>> {
        self.inner.get_current_snapshot().await
    }
}

/// The router's network as openraft sees it, with the injected vote bug when asked for.
#[derive(Debug, Clone)]
struct SimNetwork {
    inner: RouterNetwork,
    grant_every_vote: bool,
}

/// A connection of [`SimNetwork`].
#[derive(Debug, Clone)]
struct SimConnection {
    inner: RouterConnection,
    grant_every_vote: bool,
}

impl RaftNetworkFactory<ControlConfig> for SimNetwork {
    type Network = SimConnection;

    async fn new_client(&mut self, target: RaftId, node: &BasicNode) -> SimConnection {
        SimConnection {
            inner: self.inner.new_client(target, node).await,
            grant_every_vote: self.grant_every_vote,
        }
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<RaftId, BasicNode, RaftError<RaftId, E>>>;

impl RaftNetwork<ControlConfig> for SimConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<ControlConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<RaftId>> {
        self.inner.append_entries(rpc, option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<ControlConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<RaftId>, InstallSnapshotError> {
        self.inner.install_snapshot(rpc, option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<RaftId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<RaftId>> {
        if self.grant_every_vote {
            // The injected bug: the voter is never asked.
            return Ok(VoteResponse::new(rpc.vote, rpc.last_log_id, true));
        }
        self.inner.vote(rpc, option).await
    }
}

/// One region's control-plane node: what survives its crashes (the synced log and the kept
/// snapshot) and, while it runs, its Raft.
struct ControlNode {
    id: RaftId,
    log: MemLogStore,
    vault: Arc<MemVault>,
    running: Option<(ControlRaft, StateMachineStore)>,
    /// The frontier last handed to the replica.
    frontier_sent: VersionVector,
    /// The stable HLC last handed to the replica.
    stable_hlc_sent: Option<Hlc>,
    /// The state machine's last applied entry when the frontier and the stable HLC were last
    /// read: they change only when it does, and the world asks every tick.
    read_at: Option<Applied>,
    /// The committed topology, and the last applied entry it was read at.
    topology_read: Option<(Applied, Option<Topology>)>,
    next_checkpoint_ms: u64,
}

/// A state machine's last applied entry: `None` before the first.
type Applied = Option<openraft::LogId<RaftId>>;

/// The control plane of every simulated region.
pub struct ControlSim {
    router: Router,
    net: Arc<Mutex<RaftNet>>,
    config: Arc<openraft::Config>,
    nodes: Vec<ControlNode>,
    observed: Arc<Mutex<Observed>>,
    bootstrap: ControlCommand,
    /// Every region's member record (the founders' are in the bootstrap).
    members: Vec<Member>,
    /// Which regions are members from the start.
    initial: Vec<bool>,
    voters: BTreeMap<RaftId, BasicNode>,
    base: tokio::time::Instant,
    next_upkeep_ms: u64,
    bugs: ControlBugs,
    _seed: SeededRaftRng,
}

/// Bugs the control plane can be given on purpose, to prove that its checkers bite.
#[derive(Debug, Clone, Copy, Default)]
pub struct ControlBugs {
    /// Every vote request is granted without asking the voter.
    pub grant_every_vote: bool,
    /// The first region's state machine skips every this-many-th command it is given.
    pub drop_apply_every: Option<u64>,
}

impl std::fmt::Debug for ControlSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlSim")
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

/// The network settings the Raft calls see.
#[derive(Debug, Clone, Copy)]
pub struct NetSettings {
    /// Latency bounds, ms.
    pub latency_ms: (u64, u64),
    /// Loss probability.
    pub loss: f64,
    /// Injected bugs.
    pub bugs: ControlBugs,
}

impl ControlSim {
    /// The group of `regions` (node ids 1, 2, ... in order; those `initial` marks are members
    /// from the start, the others join later) linked by `topology`, on the network `net`, its
    /// random draws seeded from `raft_seed` and `net_seed`. Must be called inside the run's
    /// runtime.
    pub fn new(
        regions: &[String],
        initial: &[bool],
        topology: TopologySpec,
        net: NetSettings,
        raft_seed: u64,
        net_seed: u64,
    ) -> Result<ControlSim, String> {
        let seed = SeededRaftRng::install(raft_seed);
        let bugs = net.bugs;
        let net = Arc::new(Mutex::new(RaftNet {
            rng: ChaCha8Rng::seed_from_u64(net_seed),
            latency_ms_min: net.latency_ms.0,
            latency_ms_max: net.latency_ms.1,
            loss: net.loss,
            cut: BTreeSet::new(),
            slow: BTreeMap::new(),
        }));
        let shared = net.clone();
        let policy: LinkPolicy = Arc::new(move |from, to| lock(&shared).fate(from, to));
        let members: Vec<Member> = regions
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let id = i as u64 + 1;
                Member {
                    id: NodeId(id),
                    region: name.clone(),
                    peer_address: format!("127.0.0.1:{}", 7002 + 10 * id),
                    resp_address: format!("127.0.0.1:{}", 7000 + 10 * id),
                    http_address: format!("127.0.0.1:{}", 7001 + 10 * id),
                    state: MemberState::Active,
                }
            })
            .collect();
        let founders: Vec<Member> = members
            .iter()
            .zip(initial)
            .filter(|(_, founder)| **founder)
            .map(|(m, _)| m.clone())
            .collect();
        let voters = founders
            .iter()
            .take(VOTERS_MAX)
            .map(|m| (m.id.0, BasicNode::new(&m.peer_address)))
            .collect();
        let config = raft_config()
            .validate()
            .map_err(|e| format!("raft configuration: {e}"))?;
        let nodes = members
            .iter()
            .enumerate()
            .map(|(i, m)| ControlNode {
                id: m.id.0,
                log: MemLogStore::default(),
                vault: Arc::new(MemVault::default()),
                running: None,
                frontier_sent: VersionVector::new(),
                stable_hlc_sent: None,
                read_at: None,
                topology_read: None,
                // Staggered, as nodes that started at different moments report.
                next_checkpoint_ms: CHECKPOINT_INTERVAL_MS / 2 + 250 * i as u64,
            })
            .collect();
        Ok(ControlSim {
            router: Router::with_policy(policy),
            net,
            config: Arc::new(config),
            nodes,
            observed: Arc::new(Mutex::new(Observed::default())),
            bootstrap: ControlCommand::Bootstrap {
                members: founders,
                topology,
            },
            members,
            initial: initial.to_vec(),
            voters,
            base: tokio::time::Instant::now(),
            next_upkeep_ms: 0,
            bugs,
            _seed: seed,
        })
    }

    /// Starts every node, each a little after another as processes start, and each
    /// initializes the group with the first voters as every node of a new cluster does (all but
    /// the first initialization are refused harmlessly). Started all at once, the nodes'
    /// election checks (openraft's tick, every 375 ms) would fall on the same instants, and
    /// their candidacies would split the vote round after round.
    pub async fn start_all(&mut self) -> Result<(), String> {
        // In an order of the seed's choosing, as processes come up in any order.
        let mut order: Vec<usize> = (0..self.nodes.len()).filter(|i| self.initial[*i]).collect();
        for k in (1..order.len()).rev() {
            let j = below(&mut lock(&self.net).rng, k as u64 + 1) as usize;
            order.swap(k, j);
        }
        for (n, i) in order.into_iter().enumerate() {
            if n > 0 {
                let jitter = below(&mut lock(&self.net).rng, START_JITTER_MS);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            self.start(i).await?;
            if let Some((raft, _)) = &self.nodes[i].running {
                let _ = raft.initialize(self.voters.clone()).await;
            }
        }
        Ok(())
    }

    /// Lets the group run until virtual time `at_ms`.
    pub async fn advance_to(&self, at_ms: u64) {
        tokio::time::sleep_until(self.base + Duration::from_millis(at_ms)).await;
    }

    /// Starts (or restarts) region `i`'s node on what it kept.
    pub async fn start(&mut self, i: usize) -> Result<(), String> {
        let node = &mut self.nodes[i];
        if node.running.is_some() {
            return Ok(());
        }
        let machine = StateMachineStore::open(node.vault.clone())
            .map_err(|e| format!("node {}: state machine: {e}", node.id))?;
        let observed = ObservedMachine {
            inner: machine.clone(),
            node: node.id,
            observed: self.observed.clone(),
            drop_every: self.bugs.drop_apply_every.filter(|_| i == 0),
            commands: 0,
        };
        let raft = ControlRaft::new(
            node.id,
            self.config.clone(),
            SimNetwork {
                inner: self.router.network(node.id),
                grant_every_vote: self.bugs.grant_every_vote,
            },
            node.log.clone(),
            observed,
        )
        .await
        .map_err(|e| format!("node {}: raft: {e}", node.id))?;
        self.router.add(node.id, raft.clone());
        tokio::spawn(watch_leaders(raft.clone(), self.observed.clone()));
        node.running = Some((raft, machine));
        Ok(())
    }

    /// Region `i`'s process dies: its Raft stops; its log and kept snapshot remain.
    pub async fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        self.router.remove(node.id);
        if let Some((raft, _)) = node.running.take() {
            let _ = raft.shutdown().await;
        }
        node.frontier_sent = VersionVector::new();
        node.stable_hlc_sent = None;
        node.read_at = None;
        node.topology_read = None;
    }

    /// The network's cut pairs and slow links, by region index, as the world has them now.
    pub fn set_network(
        &self,
        cut: &BTreeSet<(usize, usize)>,
        slow: &BTreeMap<(usize, usize), u64>,
    ) {
        let id = |r: usize| r as u64 + 1;
        let mut net = lock(&self.net);
        net.cut = cut.iter().map(|(a, b)| (id(*a), id(*b))).collect();
        net.slow = slow
            .iter()
            .map(|((a, b), ms)| ((id(*a), id(*b)), *ms))
            .collect();
    }

    /// The region whose node leads, as the running nodes see it (the highest term wins).
    pub fn leader(&self) -> Option<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.running.as_ref().map(|(raft, _)| (i, raft.metrics())))
            .filter_map(|(i, metrics)| {
                let m = metrics.borrow();
                (m.state == ServerState::Leader).then_some((m.current_term, i))
            })
            .max()
            .map(|(_, i)| i)
    }

    /// What changed in the nodes' views of the leadership since the last call, for the trace.
    pub fn take_changes(&self) -> Vec<(RaftId, u64, Option<RaftId>)> {
        std::mem::take(&mut lock(&self.observed).changes)
    }

    /// The leader's chores, every [`UPKEEP_MS`]: bootstrap the state, make every member a
    /// learner at least, keep the voters equal to the state's, and drop removed members that
    /// stopped from the group.
    pub fn upkeep(&mut self, now_ms: u64) {
        if now_ms < self.next_upkeep_ms {
            return;
        }
        self.next_upkeep_ms = now_ms + UPKEEP_MS;
        let Some(leader) = self.leader() else {
            return;
        };
        let Some((raft, machine)) = self.nodes[leader].running.clone() else {
            return;
        };
        if machine.read_state(|_| ()).is_none() {
            self.propose(leader, self.bootstrap.clone());
            return;
        }
        let known: BTreeSet<RaftId> = raft
            .metrics()
            .borrow()
            .membership_config
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        let Some(state) = machine.state() else {
            return;
        };
        for member in state.members() {
            if member.state != MemberState::Removed && !known.contains(&member.id.0) {
                let raft = raft.clone();
                let id = member.id.0;
                tokio::spawn(async move {
                    let _ = raft.add_learner(id, BasicNode::default(), false).await;
                });
            }
        }
        // The voters follow the members (the first five active ones), once each is in the
        // group; one that stops voting stays a learner, as on a node.
        let voters: BTreeSet<RaftId> = raft
            .metrics()
            .borrow()
            .membership_config
            .voter_ids()
            .collect();
        let wanted: BTreeSet<RaftId> = state.voters().iter().map(|n| n.0).collect();
        if !wanted.is_empty() && wanted != voters && wanted.is_subset(&known) {
            tokio::spawn(async move {
                let _ = raft.change_membership(wanted, true).await;
            });
            return;
        }
        // A removed member whose node stopped (it stops once it has applied its removal) leaves
        // the Raft group, as on a node.
        let gone: BTreeSet<RaftId> = state
            .members()
            .filter(|m| m.state == MemberState::Removed)
            .map(|m| m.id.0)
            .filter(|id| known.contains(id) && !voters.contains(id))
            .filter(|id| {
                self.nodes
                    .iter()
                    .any(|n| n.id == *id && n.running.is_none())
            })
            .collect();
        if !gone.is_empty() {
            tokio::spawn(async move {
                let change = openraft::ChangeMembers::RemoveNodes(gone);
                let _ = raft.change_membership(change, false).await;
            });
        }
    }

    /// Whether region `i`'s node may commit its own removal, by the Raft membership it knows
    /// (as a node decides: [`braid_node::control::may_remove_itself`]).
    pub fn may_remove_itself(&self, i: usize) -> bool {
        let node = &self.nodes[i];
        node.running.as_ref().is_some_and(|(raft, _)| {
            let membership = raft.metrics().borrow().membership_config.clone();
            braid_node::control::may_remove_itself(&membership, node.id)
        })
    }

    /// Region `i`'s view of the committed control state, while its node runs.
    pub fn state(&self, i: usize) -> Option<ControlState> {
        self.nodes[i].running.as_ref()?.1.state()
    }

    /// The command that admits region `i`.
    pub fn join_command(&self, i: usize) -> ControlCommand {
        ControlCommand::Join(self.members[i].clone())
    }

    /// Whether region `i` is due to report its checkpoint at `now_ms` (and it then counts as
    /// reported): every [`CHECKPOINT_INTERVAL_MS`], once the state is bootstrapped.
    pub fn checkpoint_due(&mut self, i: usize, now_ms: u64) -> bool {
        let node = &mut self.nodes[i];
        let bootstrapped = node
            .running
            .as_ref()
            .is_some_and(|(_, machine)| machine.read_state(|_| ()).is_some());
        if !bootstrapped || now_ms < node.next_checkpoint_ms {
            return false;
        }
        node.next_checkpoint_ms = now_ms + CHECKPOINT_INTERVAL_MS;
        true
    }

    /// Commits `command` from region `i` as a node does: through its Raft or forwarded to the
    /// leader, retried until [`PROPOSE_MS_MAX`]. Runs on its own; the outcome is noted.
    pub fn propose(&self, i: usize, command: ControlCommand) {
        let router = self.router.clone();
        let observed = self.observed.clone();
        let from = self.nodes[i].id;
        tokio::spawn(async move {
            let attempts = async {
                loop {
                    match router.propose(from, command.clone()).await {
                        Ok(reply) => return reply,
                        Err(_) => tokio::time::sleep(Duration::from_millis(PROPOSE_RETRY_MS)).await,
                    }
                }
            };
            let outcome =
                tokio::time::timeout(Duration::from_millis(PROPOSE_MS_MAX), attempts).await;
            // One that timed out has an unknown outcome: it may still commit, and the checkers
            // ask nothing of it.
            if outcome.is_ok() {
                let what = format!("{command:?}");
                lock(&observed).acked.push((command_digest(&command), what));
            }
        });
    }

    /// Region `i`'s committed replication topology, while its node runs and its state has
    /// one. Computed again only once the state machine applied something new.
    pub fn topology(&mut self, i: usize) -> Option<Topology> {
        let node = &mut self.nodes[i];
        let machine = &node.running.as_ref()?.1;
        let applied = machine.last_applied();
        match &node.topology_read {
            Some((at, topology)) if *at == applied => topology.clone(),
            _ => {
                let topology = machine.read_state(|s| s.topology().ok()).flatten();
                node.topology_read = Some((applied, topology.clone()));
                topology
            }
        }
    }

    /// Whether region `i`'s state machine applied something since the stable frontier and HLC
    /// were last read (they cannot have moved otherwise); notes that they are read now.
    fn state_moved(&mut self, i: usize) -> bool {
        let node = &mut self.nodes[i];
        let Some((_, machine)) = node.running.as_ref() else {
            return false;
        };
        let applied = machine.last_applied();
        if node.read_at == Some(applied) {
            return false;
        }
        node.read_at = Some(applied);
        true
    }

    /// The committed stable frontier and stable HLC region `i` has not yet been given, those
    /// that moved.
    pub fn new_frontier_and_hlc(&mut self, i: usize) -> (Option<VersionVector>, Option<Hlc>) {
        if !self.state_moved(i) {
            return (None, None);
        }
        let node = &mut self.nodes[i];
        let Some((frontier, stable)) = node
            .running
            .as_ref()
            .and_then(|(_, machine)| machine.read_state(|s| (s.stable_frontier(), s.stable_hlc())))
        else {
            return (None, None);
        };
        let frontier = (!frontier.is_empty() && frontier != node.frontier_sent).then(|| {
            node.frontier_sent = frontier.clone();
            frontier
        });
        let stable = stable.filter(|s| node.stable_hlc_sent != Some(*s));
        if stable.is_some() {
            node.stable_hlc_sent = stable;
        }
        (frontier, stable)
    }

    /// Runs the group alone (no world events) until every running node has applied what the
    /// leader has, or `budget_ms` of virtual time passed.
    pub async fn settle(&self, from_ms: u64, budget_ms: u64) {
        let mut at = from_ms;
        while at < from_ms + budget_ms {
            at += 100;
            self.advance_to(at).await;
            let applied: BTreeSet<Option<u64>> = self
                .nodes
                .iter()
                .filter_map(|n| n.running.as_ref())
                .map(|(_, machine)| machine.last_applied().map(|l| l.index))
                .collect();
            if applied.len() == 1 && self.leader().is_some() {
                return;
            }
        }
    }

    /// Elections seen (terms that had a leader) and commands committed.
    pub fn counts(&self) -> (u64, u64) {
        let observed = lock(&self.observed);
        (observed.leaders.len() as u64, observed.acked.len() as u64)
    }

    /// The control plane's safety checkers.
    pub fn verdicts(&self, regions: &[String]) -> Vec<Verdict> {
        let observed = lock(&self.observed);
        let name = |id: &RaftId| {
            regions
                .get(*id as usize - 1)
                .cloned()
                .unwrap_or_else(|| id.to_string())
        };
        // openraft 0.9 (without `single-term-leader`) names a leadership by (term, node id):
        // a voter grants (t, y) over (t, x) only when y > x, so the leaders of one term must
        // follow one another in increasing node id. A later leader with a lower id means a
        // vote went backwards.
        let backwards = observed
            .leaders
            .iter()
            .find(|(_, l)| l.windows(2).any(|w| w[1] < w[0]));
        let shared = observed.leaders.values().filter(|l| l.len() > 1).count();
        let leaders = Verdict {
            checker: "raft_one_leader_per_term".into(),
            passed: backwards.is_none(),
            detail: match backwards {
                None => format!(
                    "{} terms had a leader; {shared} had more than one, each superseding the \
                     last by node id as openraft's votes order them",
                    observed.leaders.len()
                ),
                Some((term, l)) => format!(
                    "term {term} had leaders {} in that order: a vote went backwards",
                    l.iter().map(name).collect::<Vec<_>>().join(", ")
                ),
            },
        };
        let committed = Verdict {
            checker: "raft_committed_kept".into(),
            passed: false,
            detail: String::new(),
        };
        let committed = match self.committed_problem(&observed, &name) {
            None => Verdict {
                passed: true,
                detail: format!(
                    "{} acknowledged commands, each applied at one index by every node",
                    observed.acked.len()
                ),
                ..committed
            },
            Some(problem) => Verdict {
                detail: problem,
                ..committed
            },
        };
        vec![leaders, committed]
    }

    fn committed_problem(
        &self,
        observed: &Observed,
        name: &impl Fn(&RaftId) -> String,
    ) -> Option<String> {
        // Every index holds one entry, whoever applied it.
        let mut at: BTreeMap<u64, (RaftId, (LogId<RaftId>, u64))> = BTreeMap::new();
        for (node, applied) in &observed.applied {
            for (index, entry) in applied {
                match at.get(index) {
                    Some((other, seen)) if seen != entry => {
                        return Some(format!(
                            "index {index}: {} applied {:?}, {} applied {:?}",
                            name(other),
                            seen.0,
                            name(node),
                            entry.0
                        ))
                    }
                    Some(_) => {}
                    None => {
                        at.insert(*index, (*node, *entry));
                    }
                }
            }
        }
        // Every acknowledged command was applied somewhere, and every running node of the group
        // (the leader's membership: a region whose join never committed is not one) got to it.
        let index_of: BTreeMap<u64, u64> = at.iter().map(|(i, (_, (_, d)))| (*d, *i)).collect();
        let group: Option<BTreeSet<RaftId>> = self
            .leader()
            .and_then(|l| self.nodes[l].running.as_ref())
            .map(|(raft, _)| {
                raft.metrics()
                    .borrow()
                    .membership_config
                    .nodes()
                    .map(|(id, _)| *id)
                    .collect()
            });
        let running = || {
            self.nodes
                .iter()
                .filter(|n| group.as_ref().is_none_or(|g| g.contains(&n.id)))
                .filter_map(|n| n.running.as_ref().map(|(_, machine)| (n.id, machine)))
        };
        for (digest, what) in &observed.acked {
            let Some(index) = index_of.get(digest) else {
                return Some(format!("acknowledged but applied nowhere: {what}"));
            };
            for (id, machine) in running() {
                let applied = machine.last_applied().map_or(0, |l| l.index);
                if applied < *index {
                    return Some(format!(
                        "{} applied only through index {applied}, short of acknowledged \
                         index {index} ({what})",
                        name(&id)
                    ));
                }
                let own = observed
                    .applied
                    .get(&id)
                    .is_some_and(|a| a.contains_key(index));
                let snapshot = observed.covered.get(&id).is_some_and(|c| c >= index);
                if !own && !snapshot {
                    return Some(format!(
                        "{} applied through index {applied} but never applied acknowledged \
                         index {index} ({what})",
                        name(&id)
                    ));
                }
            }
        }
        // Nodes that applied through the same index hold the same state.
        let mut states: BTreeMap<u64, (RaftId, ControlState)> = BTreeMap::new();
        for (id, machine) in running() {
            let (Some(applied), Some(state)) = (machine.last_applied(), machine.state()) else {
                continue;
            };
            match states.get(&applied.index) {
                Some((other, seen)) if *seen != state => {
                    return Some(format!(
                        "{} and {} applied through index {} but hold different states",
                        name(other),
                        name(&id),
                        applied.index
                    ))
                }
                Some(_) => {}
                None => {
                    states.insert(applied.index, (id, state));
                }
            }
        }
        None
    }
}

/// Notes every leader a node sees, per term, until the node stops.
async fn watch_leaders(raft: ControlRaft, observed: Arc<Mutex<Observed>>) {
    let mut metrics = raft.metrics();
    let mut last = None;
    loop {
        {
            let m = metrics.borrow_and_update();
            let mut observed = lock(&observed);
            if m.state == ServerState::Leader {
                let leaders = observed.leaders.entry(m.current_term).or_default();
                if !leaders.contains(&m.id) {
                    leaders.push(m.id);
                }
            }
            let view = (m.current_term, m.current_leader);
            if last != Some(view) {
                last = Some(view);
                observed.changes.push((m.id, view.0, view.1));
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
