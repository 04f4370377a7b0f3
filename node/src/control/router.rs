//! An in-process network for the control plane's Raft group: every node's RPCs call the target
//! node's `Raft` directly. Nodes can be isolated (every RPC to or from them fails as
//! unreachable) and removed (as if their process died).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;

use super::{lock, ControlConfig, ControlRaft};

type NodeId = u64;

#[derive(Default)]
struct Nodes {
    rafts: BTreeMap<NodeId, ControlRaft>,
    isolated: BTreeSet<NodeId>,
}

/// The nodes of one in-process group.
#[derive(Clone, Default)]
pub struct Router {
    nodes: Arc<Mutex<Nodes>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes = lock(&self.nodes);
        f.debug_struct("Router")
            .field("nodes", &nodes.rafts.keys().collect::<Vec<_>>())
            .field("isolated", &nodes.isolated)
            .finish()
    }
}

impl Router {
    /// An empty group.
    pub fn new() -> Router {
        Router::default()
    }

    /// The network a node uses to reach the others.
    pub fn network(&self, from: NodeId) -> RouterNetwork {
        RouterNetwork {
            router: self.clone(),
            from,
        }
    }

    /// Makes `raft` reachable as `id`.
    pub fn add(&self, id: NodeId, raft: ControlRaft) {
        lock(&self.nodes).rafts.insert(id, raft);
    }

    /// Takes `id` out (its RPCs fail from now on); returns its `Raft` to shut it down.
    pub fn remove(&self, id: NodeId) -> Option<ControlRaft> {
        lock(&self.nodes).rafts.remove(&id)
    }

    /// Cuts `id` off from every other node, or reconnects it.
    pub fn isolate(&self, id: NodeId, isolated: bool) {
        let mut nodes = lock(&self.nodes);
        if isolated {
            nodes.isolated.insert(id);
        } else {
            nodes.isolated.remove(&id);
        }
    }

    /// The `Raft` of `to`, if it is reachable from `from`; else why not.
    fn reach(&self, from: NodeId, to: NodeId) -> Result<ControlRaft, String> {
        let nodes = lock(&self.nodes);
        if nodes.isolated.contains(&from) || nodes.isolated.contains(&to) {
            return Err(format!("{from} and {to} are cut off"));
        }
        nodes
            .rafts
            .get(&to)
            .cloned()
            .ok_or_else(|| format!("{to} is down"))
    }
}

fn unreachable<E: std::error::Error>(why: String) -> RPCError<NodeId, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        why,
    )))
}

/// One node's view of the group (openraft's network factory).
#[derive(Debug, Clone)]
pub struct RouterNetwork {
    router: Router,
    from: NodeId,
}

/// A connection from one node to another.
#[derive(Debug, Clone)]
pub struct RouterConnection {
    router: Router,
    from: NodeId,
    to: NodeId,
}

impl RaftNetworkFactory<ControlConfig> for RouterNetwork {
    type Network = RouterConnection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> RouterConnection {
        RouterConnection {
            router: self.router.clone(),
            from: self.from,
            to: target,
        }
    }
}

impl RaftNetwork<ControlConfig> for RouterConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<ControlConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let raft = self.router.reach(self.from, self.to).map_err(unreachable)?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<ControlConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let raft = self.router.reach(self.from, self.to).map_err(unreachable)?;
        raft.install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let raft = self.router.reach(self.from, self.to).map_err(unreachable)?;
        raft.vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }
}
