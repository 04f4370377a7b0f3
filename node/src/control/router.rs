//! An in-process network for the control plane's Raft group, for the tests and the simulator.
//! Every call travels as a node's calls do: encoded ([`super::calls`]), framed by the protocol
//! (`Message::RaftRequest` and `Message::RaftResponse`), decoded at the target and answered by
//! the node's own serving code ([`calls::answer`]).
//!
//! Nodes can be isolated (every call to or from them fails as unreachable) and removed (as if
//! their process died). A [`LinkPolicy`] (the simulator's network) decides each message's fate:
//! it arrives after a delay, or it is lost and its caller waits out the call's deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use braid_protocol::control::ControlCommand;
use braid_protocol::{frame, Message, RaftCall, RaftRequest};
use bytes::Bytes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AsyncRuntime, BasicNode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::calls::{self, propose_here, Proposal, ProposeResult};
use super::runtime::BraidRuntime;
use super::{lock, ControlConfig, ControlRaft, ControlReply};

type NodeId = u64;

/// What the network does to one message from one node to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It arrives after this long.
    Arrives(Duration),
    /// It is lost.
    Lost,
}

/// Decides the fate of each message `(from, to)`. Without one, every message arrives at once.
pub type LinkPolicy = Arc<dyn Fn(NodeId, NodeId) -> Fate + Send + Sync>;

/// Longest a lost call keeps its caller waiting when the caller names no deadline.
const LOST_CALL_MS: u64 = 1_000;

#[derive(Default)]
struct Nodes {
    rafts: BTreeMap<NodeId, ControlRaft>,
    isolated: BTreeSet<NodeId>,
    policy: Option<LinkPolicy>,
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
            .field("policy", &nodes.policy.is_some())
            .finish()
    }
}

/// Why a call did not get an answer.
#[derive(Debug)]
enum CallFailed {
    /// The target is down or cut off.
    Unreachable(String),
    /// A message was lost or could not be carried.
    Network(String),
}

impl Router {
    /// An empty group.
    pub fn new() -> Router {
        Router::default()
    }

    /// An empty group on a network that `policy` governs.
    pub fn with_policy(policy: LinkPolicy) -> Router {
        let router = Router::default();
        lock(&router.nodes).policy = Some(policy);
        router
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

    /// The `Raft` of `id`, while it is up.
    pub fn raft(&self, id: NodeId) -> Option<ControlRaft> {
        lock(&self.nodes).rafts.get(&id).cloned()
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
    fn reach(&self, from: NodeId, to: NodeId) -> Result<ControlRaft, CallFailed> {
        let nodes = lock(&self.nodes);
        if nodes.isolated.contains(&from) || nodes.isolated.contains(&to) {
            return Err(CallFailed::Unreachable(format!(
                "{from} and {to} are cut off"
            )));
        }
        if !nodes.rafts.contains_key(&from) {
            // A node that died sends nothing more, whatever its tasks still try.
            return Err(CallFailed::Unreachable(format!("{from} is down")));
        }
        nodes
            .rafts
            .get(&to)
            .cloned()
            .ok_or_else(|| CallFailed::Unreachable(format!("{to} is down")))
    }

    /// Carries `message` from `from` to `to` as a frame; waits `deadline` if it is lost.
    async fn carry(
        &self,
        from: NodeId,
        to: NodeId,
        message: Message,
        deadline: Duration,
    ) -> Result<Message, CallFailed> {
        let policy = lock(&self.nodes).policy.clone();
        let fate = policy.map_or(Fate::Arrives(Duration::ZERO), |p| p(from, to));
        let bytes = frame::encode_to_vec(&message)
            .map_err(|e| CallFailed::Network(format!("cannot frame a call: {e}")))?;
        match fate {
            Fate::Lost => {
                BraidRuntime::sleep(deadline).await;
                Err(CallFailed::Network(format!(
                    "a message {from}->{to} was lost"
                )))
            }
            Fate::Arrives(delay) => {
                if !delay.is_zero() {
                    BraidRuntime::sleep(delay).await;
                }
                match frame::decode(&bytes) {
                    Ok(Some((message, _))) => Ok(message),
                    other => Err(CallFailed::Network(format!("undecodable frame: {other:?}"))),
                }
            }
        }
    }

    /// One call from `from` to `to` and its answer, both through the network, answered by
    /// the target's own serving code.
    async fn call(
        &self,
        from: NodeId,
        to: NodeId,
        call: RaftCall,
        body: Bytes,
        deadline: Duration,
    ) -> Result<Bytes, CallFailed> {
        self.reach(from, to)?;
        let request = Message::RaftRequest(RaftRequest { call, body });
        let Message::RaftRequest(request) = self.carry(from, to, request, deadline).await? else {
            return Err(CallFailed::Network(
                "a request arrived as another message".into(),
            ));
        };
        // The target may have gone down or been cut off while the request travelled.
        let raft = self.reach(from, to)?;
        let answer = calls::answer(&raft, &request)
            .await
            .map_err(CallFailed::Network)?;
        self.reach(from, to)?;
        match self
            .carry(to, from, Message::RaftResponse(answer), deadline)
            .await?
        {
            Message::RaftResponse(answer) => Ok(answer),
            other => Err(CallFailed::Network(format!(
                "a call was answered with {}",
                other.kind()
            ))),
        }
    }

    /// Commits `command` as a node does, in one attempt: through `from`'s Raft when it leads,
    /// else forwarded to the leader it knows (a `Propose` call). Err says why not.
    pub async fn propose(
        &self,
        from: NodeId,
        command: ControlCommand,
    ) -> Result<ControlReply, String> {
        let raft = self.raft(from).ok_or_else(|| format!("{from} is down"))?;
        match propose_here(&raft, command.clone()).await {
            Ok(reply) => Ok(reply),
            Err(Proposal::Failed(why)) => Err(why),
            Err(Proposal::Forward(None)) => Err("no leader known".into()),
            Err(Proposal::Forward(Some(leader))) => {
                let body = calls::encode(&command)?;
                let deadline = Duration::from_millis(LOST_CALL_MS);
                let answer = self
                    .call(from, leader.0, RaftCall::Propose, body, deadline)
                    .await
                    .map_err(|e| format!("leader {leader}: {e:?}"))?;
                let result: ProposeResult = calls::decode(&answer)?;
                result.map_err(|why| format!("leader {leader}: {why}"))
            }
        }
    }

    /// A Raft RPC: the request's bytes there, the answer's bytes back, typed again.
    async fn rpc<Req, Resp, E>(
        &self,
        from: NodeId,
        to: NodeId,
        call: RaftCall,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let network =
            |why: String| RPCError::Network(NetworkError::new(&std::io::Error::other(why)));
        let body = calls::encode(request).map_err(network)?;
        let deadline = option.hard_ttl().min(Duration::from_millis(LOST_CALL_MS));
        let answer = match self.call(from, to, call, body, deadline).await {
            Ok(answer) => answer,
            Err(CallFailed::Unreachable(why)) => return Err(unreachable(why)),
            Err(CallFailed::Network(why)) => return Err(network(why)),
        };
        let answer: Result<Resp, RaftError<NodeId, E>> = calls::decode(&answer).map_err(network)?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(to, e)))
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
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let (from, to) = (self.from, self.to);
        self.router
            .rpc(from, to, RaftCall::AppendEntries, &rpc, &option)
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<ControlConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let (from, to) = (self.from, self.to);
        self.router
            .rpc(from, to, RaftCall::InstallSnapshot, &rpc, &option)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let (from, to) = (self.from, self.to);
        self.router
            .rpc(from, to, RaftCall::Vote, &rpc, &option)
            .await
    }
}
