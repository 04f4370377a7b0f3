//! The control plane's Raft group: openraft 0.9 around the control state machine of
//! [`braid_protocol::control`]. Built without the `server` feature too, so that the simulator can
//! run the real openraft, deterministically: its runtime ([`runtime::BraidRuntime`]) draws its
//! election timeouts from a generator the simulator seeds.
//!
//! ```text
//!   client_write(ControlCommand) ─► leader's log ─► followers' logs (RaftNetwork)
//!        committed entries ─► StateMachineStore::apply ─► ControlState::apply ─► ControlReply
//! ```
//!
//! - [`ControlConfig`]: the type configuration (commands in, replies out, `u64` node ids).
//! - [`store`]: an in-memory log and the state machine store with its snapshots.
//! - [`rocks_log`]: the log and vote in RocksDB, synced, for the node (`server` feature).
//! - [`runtime`]: openraft's tokio runtime with a random source the simulator can seed.
//! - [`calls`]: Raft calls and forwarded proposals as bytes, and how a node answers them.
//! - [`router`]: an in-process network that carries those bytes (the tests and the simulator).
//! - [`quic`]: the same calls over the mesh's QUIC connections, for the node (`server`).
//! - [`plane`]: the control plane as a node runs it: start, bootstrap, checkpoints, status
//!   (`server`).

pub mod calls;
#[cfg(feature = "server")]
pub mod plane;
#[cfg(feature = "server")]
pub mod quic;
#[cfg(feature = "server")]
pub mod rocks_log;
pub mod router;
pub mod runtime;
pub mod store;

use std::io::Cursor;

use braid_protocol::control::ControlCommand;
use serde::{Deserialize, Serialize};

/// What applying a committed command gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlReply {
    /// It changed the state.
    Applied,
    /// The state machine refused it (it changed nothing), and why.
    Refused(String),
    /// A Raft entry that carries no command (a leader's blank entry, a membership change).
    Nothing,
}

openraft::declare_raft_types!(
    /// The control plane's Raft types: [`ControlCommand`]s in, [`ControlReply`]s out.
    pub ControlConfig:
        D = ControlCommand,
        R = ControlReply,
        AsyncRuntime = runtime::BraidRuntime,
);

/// Locks a mutex of the glue. A poisoned lock means a panic in another task already failed
/// this node; the data is still the last consistent state (every mutation under these locks is
/// a single assignment, insert or split).
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The Raft node of the control plane.
pub type ControlRaft = openraft::Raft<ControlConfig>;

/// Largest snapshot chunk sent in one call: a quarter of the frame limit.
pub const SNAPSHOT_CHUNK_BYTES_MAX: u64 = (braid_protocol::limits::FRAME_BYTES_MAX / 4) as u64;

/// How often a node's upkeep looks at the group: bootstrap, learners, checkpoints.
pub const UPKEEP_MS: u64 = 500;

/// How often a node reports its vector ("every few seconds"): what the stable frontier, and so
/// garbage collection, lags behind by.
pub const CHECKPOINT_INTERVAL_MS: u64 = 3_000;

/// Longest a proposal may take, forwarding and retries included.
pub const PROPOSE_MS_MAX: u64 = 10_000;

/// Pause before a proposal is tried again when it found no leader or failed.
pub const PROPOSE_RETRY_MS: u64 = 200;

/// Longest one snapshot chunk's call may take, in milliseconds.
pub const INSTALL_SNAPSHOT_MS_MAX: u64 = 10_000;

/// Raft timings for a mesh of regions: heartbeats every 500 ms, elections after 1.5-3 s of
/// silence. openraft also gives every AppendEntries call one heartbeat interval to be answered:
/// a round trip between regions (up to about 300 ms between the farthest) plus the follower's
/// synced write must fit in it, or that follower never receives the log.
pub fn raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "braid-control".into(),
        heartbeat_interval: 500,
        election_timeout_min: 1_500,
        election_timeout_max: 3_000,
        // Each snapshot chunk (up to 1 MiB) must be sent and answered within this (openraft's
        // default, 200 ms, is less than a round trip between regions far apart).
        install_snapshot_timeout: INSTALL_SNAPSHOT_MS_MAX,
        // A snapshot chunk must fit in one frame with room to spare.
        snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES_MAX,
        // Checkpoints arrive every few seconds from every node: a snapshot every 1,000 entries
        // keeps the log (and a restart's replay) short.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1_000),
        max_in_snapshot_log_to_keep: 100,
        ..openraft::Config::default()
    }
}

/// Whether a draining `node` may commit its own removal, by the Raft membership it knows: no
/// change of voters under way, and `node` not a voter. A voter that removed itself would stop
/// before the leader had changed the voters without it, and the change, needing its vote, would
/// never commit, nor would anything after it.
pub fn may_remove_itself(
    membership: &openraft::StoredMembership<u64, openraft::BasicNode>,
    node: u64,
) -> bool {
    membership.membership().get_joint_config().len() == 1
        && !membership.voter_ids().any(|v| v == node)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;
    use std::time::Duration;

    use braid_protocol::control::{
        ControlCommand, ControlState, Member, MemberState, TopologySpec,
    };
    use braid_protocol::{NodeId, Seq, VersionVector};
    use openraft::BasicNode;

    use super::rocks_log;
    use super::router::Router;
    use super::store::{MemLogStore, StateMachineStore};
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

    const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];

    /// A Raft log a test group runs on, and where its state machines keep snapshots: a node
    /// keeps them in its on-disk log, whose purge waits for them.
    trait TestLog: openraft::storage::RaftLogStorage<ControlConfig> {
        fn vault(&self) -> Option<Arc<dyn super::store::SnapshotVault>>;
    }

    impl TestLog for MemLogStore {
        fn vault(&self) -> Option<Arc<dyn super::store::SnapshotVault>> {
            None
        }
    }

    impl TestLog for super::rocks_log::RocksRaftLog {
        fn vault(&self) -> Option<Arc<dyn super::store::SnapshotVault>> {
            Some(Arc::new(self.clone()))
        }
    }

    struct Group {
        router: Router,
        nodes: BTreeMap<u64, (ControlRaft, StateMachineStore)>,
    }

    impl Group {
        async fn start(n: u64) -> Group {
            Group::start_with(n, raft_config()).await
        }

        async fn start_with(n: u64, config: openraft::Config) -> Group {
            Group::start_on(n, config, true, |_| MemLogStore::default()).await
        }

        /// Starts `n` nodes on the logs `logs` gives; `initialize` a new group, or not (the
        /// nodes restart on logs that already hold one).
        async fn start_on<L: TestLog>(
            n: u64,
            config: openraft::Config,
            initialize: bool,
            mut logs: impl FnMut(u64) -> L,
        ) -> Group {
            let members = (1..=n).map(|i| member(i, NAMES[i as usize - 1])).collect();
            let initial = ControlState::bootstrap(members, TopologySpec::FullMesh).unwrap();
            let config = Arc::new(config.validate().unwrap());
            let router = Router::new();
            let mut nodes = BTreeMap::new();
            for id in 1..=n {
                let log = logs(id);
                let machine = match log.vault() {
                    Some(vault) => StateMachineStore::new_keeping(initial.clone(), vault),
                    None => StateMachineStore::new(initial.clone()),
                };
                let raft =
                    ControlRaft::new(id, config.clone(), router.network(id), log, machine.clone())
                        .await
                        .unwrap();
                router.add(id, raft.clone());
                nodes.insert(id, (raft, machine));
            }
            if initialize {
                let voters: BTreeMap<u64, BasicNode> = (1..=n)
                    .map(|id| (id, BasicNode::new(format!("127.0.0.1:{}", 7002 + 10 * id))))
                    .collect();
                nodes[&1].0.initialize(voters).await.unwrap();
            }
            Group { router, nodes }
        }

        async fn shutdown(self) {
            for (raft, _) in self.nodes.values() {
                raft.shutdown().await.unwrap();
            }
        }

        /// Waits until the nodes still in the group agree on a leader, and returns it.
        async fn leader(&self) -> u64 {
            for _ in 0..200 {
                let seen: Vec<Option<u64>> = self
                    .nodes
                    .values()
                    .map(|(raft, _)| raft.metrics().borrow().current_leader)
                    .collect();
                if let Some(Some(leader)) = seen.first() {
                    if seen.iter().all(|l| *l == Some(*leader)) && self.nodes.contains_key(leader) {
                        return *leader;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("no leader agreed on");
        }

        async fn write(&self, command: ControlCommand) -> ControlReply {
            let leader = self.leader().await;
            let response = self.nodes[&leader].0.client_write(command).await.unwrap();
            // Every node applies it.
            for (raft, _) in self.nodes.values() {
                raft.wait(Some(Duration::from_secs(10)))
                    .applied_index_at_least(Some(response.log_id.index), "applied")
                    .await
                    .unwrap();
            }
            response.data
        }

        fn states(&self) -> Vec<ControlState> {
            self.nodes
                .values()
                .map(|(_, m)| m.state().expect("bootstrapped"))
                .collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_group_commits_commands_in_order_and_outlives_its_leader() {
        let mut group = Group::start(3).await;
        let vector: VersionVector = [(NodeId(1), Seq(7))].into_iter().collect();
        let report = ControlCommand::ReportCheckpoint {
            node: NodeId(2),
            vector: vector.clone(),
            hlc: braid_conflict::Hlc::ZERO,
            reported_ms: 1,
        };
        assert_eq!(group.write(report).await, ControlReply::Applied);
        // A command the state machine refuses is committed, refused the same way everywhere,
        // and changes nothing.
        let taken = group.write(ControlCommand::Join(member(9, "a"))).await;
        assert_eq!(taken, ControlReply::Refused("region a is taken".into()));
        let states = group.states();
        assert!(states.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(states[0].checkpoints()[&NodeId(2)].vector, vector);

        // The leader dies: another is elected and commits.
        let old = group.leader().await;
        let (raft, _) = group.nodes.remove(&old).unwrap();
        group.router.remove(old);
        raft.shutdown().await.unwrap();
        assert_eq!(
            group.write(ControlCommand::Join(member(4, "d"))).await,
            ControlReply::Applied
        );
        assert_ne!(group.leader().await, old);
        let states = group.states();
        assert!(states.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(
            states[0].member(NodeId(4)).unwrap().state,
            MemberState::Joining
        );
    }

    /// The log and vote on disk: a whole group stops and starts again on them, re-applies what
    /// was committed, and goes on committing.
    #[tokio::test(start_paused = true)]
    async fn a_group_on_rocksdb_logs_restarts_with_what_it_committed() {
        use super::rocks_log::RocksRaftLog;
        let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let open = |id: u64| RocksRaftLog::open(dirs[id as usize - 1].path()).unwrap();
        let group = Group::start_on(3, raft_config(), true, open).await;
        assert_eq!(
            group.write(ControlCommand::Join(member(4, "d"))).await,
            ControlReply::Applied
        );
        let before = group.states();
        group.shutdown().await;

        let group = Group::start_on(3, raft_config(), false, open).await;
        let report = ControlCommand::ReportCheckpoint {
            node: NodeId(4),
            vector: VersionVector::new(),
            hlc: braid_conflict::Hlc::ZERO,
            reported_ms: 1,
        };
        assert_eq!(group.write(report).await, ControlReply::Applied);
        assert_eq!(
            group.write(ControlCommand::Activate(NodeId(4))).await,
            ControlReply::Applied
        );
        let states = group.states();
        assert!(states.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(
            before[0].member(NodeId(4)).unwrap().state,
            MemberState::Joining
        );
        assert_eq!(
            states[0].member(NodeId(4)).unwrap().state,
            MemberState::Active,
            "the join was re-applied from the log before the activation"
        );
        group.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_isolated_leader_cannot_commit_and_the_majority_goes_on() {
        isolated_leader(Group::start(3).await).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_isolated_leader_on_rocksdb_logs_has_its_uncommitted_entry_truncated() {
        let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let open = |id: u64| rocks_log::RocksRaftLog::open(dirs[id as usize - 1].path()).unwrap();
        isolated_leader(Group::start_on(3, raft_config(), true, open).await).await;
    }

    async fn isolated_leader(group: Group) {
        let old = group.leader().await;
        group.router.isolate(old, true);
        // Cut off from both followers, the old leader cannot commit anything.
        let lost = ControlCommand::ReportCheckpoint {
            node: NodeId(old),
            vector: [(NodeId(old), Seq(99))].into_iter().collect(),
            hlc: braid_conflict::Hlc::ZERO,
            reported_ms: 1,
        };
        let attempt = tokio::time::timeout(
            Duration::from_secs(10),
            group.nodes[&old].0.client_write(lost),
        )
        .await;
        assert!(attempt.is_err(), "a minority committed: {attempt:?}");
        // The other two elect a leader among them and commit.
        assert_eq!(
            group
                .write_majority(old, ControlCommand::Drain(NodeId(old)))
                .await,
            ControlReply::Applied
        );
        group.router.isolate(old, false);
        for _ in 0..100 {
            if group.states().windows(2).all(|w| w[0] == w[1]) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let states = group.states();
        assert!(
            states.windows(2).all(|w| w[0] == w[1]),
            "caught up after heal"
        );
        assert_eq!(
            states[0].member(NodeId(old)).unwrap().state,
            MemberState::Draining
        );
        assert!(
            !states[0].checkpoints().contains_key(&NodeId(old)),
            "the old leader's uncommitted command was never applied"
        );
    }

    /// Builds a snapshot of everything applied and purges the log up to it.
    async fn snapshot_and_purge(raft: &ControlRaft) -> openraft::LogId<u64> {
        raft.trigger().snapshot().await.unwrap();
        let last = raft.metrics().borrow().last_applied.unwrap();
        raft.wait(Some(Duration::from_secs(10)))
            .snapshot(last, "snapshot built")
            .await
            .unwrap();
        raft.trigger().purge_log(last.index).await.unwrap();
        raft.wait(Some(Duration::from_secs(10)))
            .purged(Some(last), "log purged")
            .await
            .unwrap();
        last
    }

    fn purging_config() -> openraft::Config {
        openraft::Config {
            max_in_snapshot_log_to_keep: 0,
            ..raft_config()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_joins_after_the_log_was_purged_gets_the_state_by_snapshot() {
        snapshot_after_purge(Group::start_with(3, purging_config()).await).await;
    }

    #[tokio::test(start_paused = true)]
    async fn rocksdb_logs_purge_and_a_newcomer_gets_the_state_by_snapshot() {
        let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let open = |id: u64| rocks_log::RocksRaftLog::open(dirs[id as usize - 1].path()).unwrap();
        snapshot_after_purge(Group::start_on(3, purging_config(), true, open).await).await;
    }

    async fn snapshot_after_purge(mut group: Group) {
        let config = purging_config();
        for at in 1..=5 {
            let report = ControlCommand::ReportCheckpoint {
                node: NodeId(1),
                vector: [(NodeId(1), Seq(at))].into_iter().collect(),
                hlc: braid_conflict::Hlc::ZERO,
                reported_ms: at,
            };
            assert_eq!(group.write(report).await, ControlReply::Applied);
        }
        let leader = group.leader().await;
        let raft = &group.nodes[&leader].0;
        let last = snapshot_and_purge(raft).await;

        // A new node starts from the initial state; the log it would need is gone.
        let initial = ControlState::bootstrap(
            (1..=3).map(|i| member(i, NAMES[i as usize - 1])).collect(),
            TopologySpec::FullMesh,
        )
        .unwrap();
        let machine = StateMachineStore::new(initial);
        let newcomer = ControlRaft::new(
            4,
            Arc::new(config.validate().unwrap()),
            group.router.network(4),
            MemLogStore::default(),
            machine.clone(),
        )
        .await
        .unwrap();
        group.router.add(4, newcomer.clone());
        group.nodes[&leader]
            .0
            .add_learner(4, BasicNode::new("127.0.0.1:7042"), true)
            .await
            .unwrap();
        newcomer
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(last.index), "snapshot installed")
            .await
            .unwrap();
        group.nodes.insert(4, (newcomer, machine));
        let states = group.states();
        assert!(
            states.windows(2).all(|w| w[0] == w[1]),
            "the learner has the state"
        );
        assert_eq!(
            states[0].checkpoints()[&NodeId(1)].vector.get(NodeId(1)),
            Seq(5)
        );
    }

    /// A node's state machine keeps its snapshot beside its log: after the log is purged up to
    /// it, a restart rebuilds the state from it (and from the entries after it).
    #[tokio::test(start_paused = true)]
    async fn a_node_restarts_from_its_kept_snapshot_after_a_purge() {
        use super::rocks_log::RocksRaftLog;
        use braid_protocol::control::apply_to;
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(purging_config().validate().unwrap());
        let start = || async {
            let log = RocksRaftLog::open(dir.path()).unwrap();
            let machine = StateMachineStore::open(Arc::new(log.clone())).unwrap();
            let raft = ControlRaft::new(
                1,
                config.clone(),
                Router::new().network(1),
                log,
                machine.clone(),
            )
            .await
            .unwrap();
            (raft, machine)
        };
        let (raft, machine) = start().await;
        raft.initialize(std::collections::BTreeSet::from([1]))
            .await
            .unwrap();
        raft.wait(Some(Duration::from_secs(10)))
            .current_leader(1, "leads itself")
            .await
            .unwrap();
        let mut expected = None;
        let mut commands = vec![ControlCommand::Bootstrap {
            members: vec![member(1, "a")],
            topology: TopologySpec::FullMesh,
        }];
        commands.extend((1..=3).map(|at| ControlCommand::ReportCheckpoint {
            node: NodeId(1),
            vector: [(NodeId(1), Seq(at))].into_iter().collect(),
            hlc: braid_conflict::Hlc::ZERO,
            reported_ms: at,
        }));
        for command in &commands[..3] {
            assert_eq!(
                raft.client_write(command.clone()).await.unwrap().data,
                ControlReply::Applied
            );
            apply_to(&mut expected, command).unwrap();
        }
        let last = snapshot_and_purge(&raft).await;
        // One more entry after the snapshot: the restart needs both.
        assert_eq!(
            raft.client_write(commands[3].clone()).await.unwrap().data,
            ControlReply::Applied
        );
        apply_to(&mut expected, &commands[3]).unwrap();
        assert_eq!(machine.state(), expected);
        raft.shutdown().await.unwrap();
        drop((raft, machine));

        let (raft, machine) = start().await;
        assert!(
            machine.state().is_some(),
            "the kept snapshot is loaded at open"
        );
        raft.wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(last.index + 1), "re-applied after the snapshot")
            .await
            .unwrap();
        assert_eq!(machine.state(), expected);
        raft.shutdown().await.unwrap();
    }

    impl Group {
        /// Writes through the leader of the nodes other than `outside`, waiting for them only.
        async fn write_majority(&self, outside: u64, command: ControlCommand) -> ControlReply {
            let mut leader = None;
            for _ in 0..200 {
                let seen: Vec<Option<u64>> = self
                    .nodes
                    .iter()
                    .filter(|(id, _)| **id != outside)
                    .map(|(_, (raft, _))| raft.metrics().borrow().current_leader)
                    .collect();
                if let Some(Some(l)) = seen.first() {
                    if *l != outside && seen.iter().all(|x| *x == Some(*l)) {
                        leader = Some(*l);
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let leader = leader.expect("the majority has a leader");
            let response = self.nodes[&leader].0.client_write(command).await.unwrap();
            for (id, (raft, _)) in &self.nodes {
                if *id != outside {
                    raft.wait(Some(Duration::from_secs(10)))
                        .applied_index_at_least(Some(response.log_id.index), "applied")
                        .await
                        .unwrap();
                }
            }
            response.data
        }
    }

    #[test]
    fn a_draining_voter_may_not_remove_itself_until_the_voters_changed_without_it() {
        use openraft::{Membership, StoredMembership};
        let nodes = |ids: &[u64]| -> BTreeMap<u64, BasicNode> {
            ids.iter().map(|id| (*id, BasicNode::default())).collect()
        };
        let config = |voters: Vec<BTreeSet<u64>>| {
            StoredMembership::new(None, Membership::new(voters, nodes(&[1, 2, 3])))
        };
        let set = |ids: &[u64]| ids.iter().copied().collect::<BTreeSet<u64>>();
        // Still a voter: no.
        assert!(!super::may_remove_itself(&config(vec![set(&[1, 2])]), 2));
        // The leader's change under way ({1, 2} to {1}, joint): no.
        assert!(!super::may_remove_itself(
            &config(vec![set(&[1, 2]), set(&[1])]),
            2
        ));
        // The change done, 2 a learner: yes.
        assert!(super::may_remove_itself(&config(vec![set(&[1])]), 2));
        // A learner while another change is under way: no.
        assert!(!super::may_remove_itself(
            &config(vec![set(&[1, 3]), set(&[1])]),
            2
        ));
    }
}
