//! The control plane's Raft RPCs over the mesh's QUIC endpoint: the same mutual TLS, the same
//! handshake, streams of their own (see `docs/protocol.md`, control-plane streams).
//!
//! ```text
//!   openraft ─► QuicRaftNetwork::new_client(target) ─► QuicRaftClient
//!       call(AppendEntries | Vote | InstallSnapshot | Propose, body)
//!         ─► (connection to target, cached) ─► stream (cached): Handshake, RaftRequest ─►
//!   peer's accept loop ─► serve(): decode, ask its Raft, RaftResponse ◄─
//! ```
//!
//! A client keeps one stream to its target and makes one call at a time on it (openraft makes a
//! client per target and awaits each call). The stream rides on this node's subscription
//! connection to the target when there is one, else on a connection of the client's own; any
//! failure drops the stream (and an own connection), and the next call opens another. Injected faults (drills) act as on replication streams: a cut
//! link refuses calls both ways, a dropped direction loses requests or answers, a delay holds
//! them back.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use braid_protocol::{Message, NodeId, RaftCall, RaftRequest};
use bytes::Bytes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::debug;

use super::calls::{answer, decode, encode};
use super::{ControlConfig, ControlRaft};
use crate::tls::node_dns_name;
use crate::transport::{self, Mesh, StreamError};

type RaftNodeId = u64;

/// Longest wait for a QUIC connection to a peer to be set up for a call.
const CONNECT_MS_MAX: u64 = 2_000;

/// How long a stream set up for a call that gave up waits for the next call: past it, set up
/// another (the peer waits 5 s for a stream's first call).
const OPENED_KEPT_MS: u64 = 2_000;

/// The network openraft uses to reach the other nodes' control planes.
#[derive(Debug, Clone)]
pub struct QuicRaftNetwork {
    mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
}

impl QuicRaftNetwork {
    /// Calls go out through `endpoint`, to the peers `mesh` knows.
    pub fn new(mesh: Arc<Mesh>, endpoint: quinn::Endpoint) -> QuicRaftNetwork {
        QuicRaftNetwork { mesh, endpoint }
    }

    /// A client for calls to `target`.
    pub fn client(&self, target: NodeId) -> QuicRaftClient {
        QuicRaftClient {
            mesh: self.mesh.clone(),
            endpoint: self.endpoint.clone(),
            target,
            connection: None,
            stream: None,
            opening: None,
        }
    }
}

impl RaftNetworkFactory<ControlConfig> for QuicRaftNetwork {
    type Network = QuicRaftClient;

    async fn new_client(&mut self, target: RaftNodeId, _node: &BasicNode) -> QuicRaftClient {
        self.client(NodeId(target))
    }
}

/// Why a call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The target cannot be reached now (down, cut off, not a known peer): try later.
    #[error("{0}")]
    Unreachable(String),
    /// The call went out but failed on the way or at the target.
    #[error("{0}")]
    Failed(String),
}

impl CallError {
    fn into_rpc<E: std::error::Error>(self) -> RPCError<RaftNodeId, BasicNode, E> {
        let io = |text: String| std::io::Error::new(std::io::ErrorKind::NotConnected, text);
        match self {
            CallError::Unreachable(why) => RPCError::Unreachable(Unreachable::new(&io(why))),
            CallError::Failed(why) => RPCError::Network(NetworkError::new(&io(why))),
        }
    }
}

/// Calls to one node's control plane.
#[derive(Debug)]
pub struct QuicRaftClient {
    mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
    target: NodeId,
    connection: Option<quinn::Connection>,
    stream: Option<(quinn::SendStream, quinn::RecvStream)>,
    /// A stream being set up, in a task of its own: a call that times out while it connects
    /// and shakes hands leaves it to the next call instead of dropping it half-made. openraft
    /// gives each call as long as a heartbeat interval; across regions a new stream's setup
    /// (a connection, then the handshakes) can take longer than that on its own, and every call
    /// would otherwise start it again from nothing.
    opening: Option<tokio::task::JoinHandle<(tokio::time::Instant, Result<Opened, CallError>)>>,
}

/// A stream set up for calls, and the connection of the client's own it rides on, if it made
/// one.
type Opened = (
    Option<quinn::Connection>,
    quinn::SendStream,
    quinn::RecvStream,
);

impl QuicRaftClient {
    /// Makes one call and waits at most `ttl` for its answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        call: RaftCall,
        request: &Req,
        ttl: Duration,
    ) -> Result<Resp, CallError> {
        let target = self.target;
        if self.mesh.faults.cut(target) {
            self.stream = None;
            self.connection = None;
            if let Some(opening) = self.opening.take() {
                opening.abort();
            }
            return Err(CallError::Unreachable(format!(
                "the link to {target} is cut by an injected fault"
            )));
        }
        let body = encode(request).map_err(CallError::Failed)?;
        let (drop, delay) = self.mesh.faults.outgoing(target);
        if drop {
            return Err(CallError::Unreachable(format!(
                "calls to {target} are dropped by an injected fault"
            )));
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let result = tokio::time::timeout(ttl, self.exchange(call, body)).await;
        let answer = match result {
            Ok(Ok(answer)) => answer,
            Ok(Err(err)) => {
                self.stream = None;
                self.connection = None;
                return Err(err);
            }
            Err(_) => {
                // The stream is somewhere in the middle of a call: start afresh next time.
                self.stream = None;
                return Err(CallError::Failed(format!(
                    "{target} did not answer within {} ms",
                    ttl.as_millis()
                )));
            }
        };
        decode(&answer).map_err(|e| CallError::Failed(format!("answer from {target}: {e}")))
    }

    async fn exchange(&mut self, call: RaftCall, body: Bytes) -> Result<Bytes, CallError> {
        let target = self.target;
        // Taken out for the call and put back only after its answer: a call abandoned half-way
        // (a timeout, a dropped future) leaves no stream whose next frame answers another call.
        let (mut send, mut recv) = match self.stream.take() {
            Some(stream) => stream,
            None => self.open().await?,
        };
        let failed = |e: StreamError| CallError::Failed(format!("call to {target}: {e}"));
        let request = Message::RaftRequest(RaftRequest { call, body });
        let sent = transport::write_message(&mut send, &request, &mut Vec::new())
            .await
            .map_err(failed)?;
        if let Some(t) = self.mesh.traffic(target) {
            t.bytes_sent.fetch_add(sent as u64, Ordering::Relaxed);
        }
        match transport::read_frame(&mut recv, &mut Vec::new())
            .await
            .map_err(failed)?
        {
            Some((Message::RaftResponse(answer), bytes)) => {
                if let Some(t) = self.mesh.traffic(target) {
                    t.bytes_received.fetch_add(bytes as u64, Ordering::Relaxed);
                }
                self.stream = Some((send, recv));
                Ok(answer)
            }
            Some((Message::Error(error), _)) => Err(CallError::Failed(format!(
                "{target} refused the call: {}",
                error.text
            ))),
            Some((other, _)) => Err(CallError::Failed(format!(
                "{target} answered a call with {}",
                other.kind()
            ))),
            None => Err(CallError::Failed(format!("{target} ended the call stream"))),
        }
    }

    async fn open(&mut self) -> Result<(quinn::SendStream, quinn::RecvStream), CallError> {
        let target = self.target;
        loop {
            let opening = self.opening.get_or_insert_with(|| {
                let own = self
                    .connection
                    .clone()
                    .filter(|own| own.close_reason().is_none());
                let (mesh, endpoint) = (self.mesh.clone(), self.endpoint.clone());
                tokio::spawn(async move {
                    let opened = open_stream(mesh, endpoint, target, own).await;
                    (tokio::time::Instant::now(), opened)
                })
            });
            // Cancelled here (the call timed out), the task goes on and the next call takes
            // its stream.
            let finished = opening.is_finished();
            let (done_at, opened) = opening
                .await
                .map_err(|e| CallError::Failed(format!("{target}: setting up a stream: {e}")))?;
            self.opening = None;
            // A setup that finished long before this call (its caller gave up, and no call came
            // for a while): its error is old news, and its stream may have been given up by the
            // peer, which waits only so long for the first call. Set up another.
            if finished && done_at.elapsed() > Duration::from_millis(OPENED_KEPT_MS) {
                continue;
            }
            let (own, send, recv) = opened?;
            if own.is_some() {
                self.connection = own;
            }
            return Ok((send, recv));
        }
    }
}

impl Drop for QuicRaftClient {
    fn drop(&mut self) {
        // Nobody will take the stream it sets up.
        if let Some(opening) = self.opening.take() {
            opening.abort();
        }
    }
}

/// Sets up a stream for calls to `target`: on this node's subscription connection to it when
/// there is one (the same connection carries both), else on `own` (a connection of the
/// client's own) or a new one, which it returns to be kept.
async fn open_stream(
    mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
    target: NodeId,
    own: Option<quinn::Connection>,
) -> Result<Opened, CallError> {
    let unreachable = |e: String| CallError::Unreachable(format!("{target}: {e}"));
    let (connection, made) = match (mesh.connection(target), own) {
        (Some(shared), _) => (shared, None),
        (None, Some(own)) => (own, None),
        (None, None) => {
            let addr: SocketAddr = mesh
                .peers
                .address(target)
                .ok_or_else(|| unreachable("not a known peer".into()))?;
            let connecting = endpoint
                .connect(addr, &node_dns_name(target))
                .map_err(|e| unreachable(e.to_string()))?;
            let connection =
                tokio::time::timeout(Duration::from_millis(CONNECT_MS_MAX), connecting)
                    .await
                    .map_err(|_| unreachable(format!("no connection within {CONNECT_MS_MAX} ms")))?
                    .map_err(|e| unreachable(e.to_string()))?;
            (connection.clone(), Some(connection))
        }
    };
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    transport::handshake(&mesh, target, &mut send, &mut recv)
        .await
        .map_err(|e| CallError::Failed(format!("{target}: {e}")))?;
    Ok((made, send, recv))
}

impl QuicRaftClient {
    /// One Raft call: the callee's answer, or its Raft error as a remote error, or why the
    /// call got no answer.
    async fn rpc<Req: Serialize, Resp: DeserializeOwned, E>(
        &mut self,
        call: RaftCall,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId, E>>>
    where
        E: std::error::Error + DeserializeOwned,
    {
        let answer: Result<Resp, RaftError<RaftNodeId, E>> = self
            .call(call, request, option.hard_ttl())
            .await
            .map_err(CallError::into_rpc)?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target.0, e)))
    }
}

impl RaftNetwork<ControlConfig> for QuicRaftClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<ControlConfig>,
        option: RPCOption,
    ) -> Result<
        AppendEntriesResponse<RaftNodeId>,
        RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId>>,
    > {
        self.rpc(RaftCall::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<ControlConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<RaftNodeId>,
        RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId, InstallSnapshotError>>,
    > {
        self.rpc(RaftCall::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<RaftNodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<RaftNodeId>, RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId>>>
    {
        self.rpc(RaftCall::Vote, &rpc, &option).await
    }
}

/// Serves the control-plane calls a peer makes on one stream, starting with `first`, until the
/// peer ends it or a call cannot be understood.
pub(crate) async fn serve(
    mesh: &Mesh,
    raft: &ControlRaft,
    peer: NodeId,
    first: RaftRequest,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), StreamError> {
    let mut request = first;
    let mut buf = Vec::new();
    loop {
        if mesh.faults.cut(peer) {
            return Err(StreamError::Cut);
        }
        let answer = match answer(raft, &request).await {
            Ok(answer) => answer,
            Err(why) => {
                let err = StreamError::Control(format!("bad {:?} call: {why}", request.call));
                transport::refuse(mesh, peer, &mut send, &err, &mut buf).await;
                return Err(err);
            }
        };
        let (drop, delay) = mesh.faults.outgoing(peer);
        if drop {
            // The answer is lost, as a lossy network would lose it: the caller times out.
            return Err(StreamError::Cut);
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let bytes =
            transport::write_message(&mut send, &Message::RaftResponse(answer), &mut buf).await?;
        if let Some(t) = mesh.traffic(peer) {
            t.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        }
        // The caller holds the stream open between calls; a call that is never made is the
        // caller's business, and the stream ends with its connection.
        let mut body = Vec::new();
        let next = match transport::read_frame(&mut recv, &mut body).await {
            Ok(next) => next,
            // A bad frame is answered, counted and logged as on any other stream.
            Err(err @ StreamError::Decode(_)) => {
                transport::refuse(mesh, peer, &mut send, &err, &mut buf).await;
                return Err(err);
            }
            Err(err) => return Err(err),
        };
        request = match next {
            Some((Message::RaftRequest(next), bytes)) => {
                if let Some(t) = mesh.traffic(peer) {
                    t.bytes_received.fetch_add(bytes as u64, Ordering::Relaxed);
                }
                next
            }
            Some((other, _)) => {
                let err = StreamError::Control(format!(
                    "expected a raft_request on a control stream, got {}",
                    other.kind()
                ));
                transport::refuse(mesh, peer, &mut send, &err, &mut buf).await;
                return Err(err);
            }
            None => {
                debug!(%peer, "control stream ended");
                return Ok(());
            }
        };
    }
}
