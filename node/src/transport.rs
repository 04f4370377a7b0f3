//! QUIC transport between nodes (quinn, mutual TLS against the cluster CA, ALPN `braid/1`).
//!
//! ```text
//!   for each neighbor: subscriber task ── connect (backoff) ── open_bi ──┐
//!   accept loop ── incoming connection ── check cert ── accept_bi ───────┤
//!                                                                        ▼
//!            stream task: Handshake both ways ─► Input::Peer(Opened{outbox})
//!                          reader: frames ─► Input::Peer(Message)   (bounded: back-pressure)
//!                          writer: outbox ─► frames
//!                          end ─► Input::Peer(Closed)
//! ```
//!
//! Each node connects to each neighbor to subscribe (our `Subscription` stream) and accepts the
//! neighbor's connection carrying its subscription to us (our `Feed` stream). The control
//! plane's Raft calls travel on streams of their own ([`crate::control::quic`]): an accepted
//! stream whose first message after the handshakes is a `RaftRequest` is handed to the node's
//! Raft; one whose first message is anything else is a feed.
//!
//! Injected faults ([`crate::faults`], drills only) act here: a cut peer's streams end and its
//! connections are refused; frames to a peer can be dropped at the sender or held back.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use braid_protocol::frame::{self, DecodeError};
use braid_protocol::limits::{FRAME_BYTES_MAX, FRAME_LENGTH_BYTES};
use braid_protocol::{
    ClusterId, ErrorCode, ErrorMessage, Handshake, Message, NodeId, StreamKind, PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::control::ControlRaft;
use crate::driver::{Input, PeerInput, STREAM_OUTBOX_MAX};
use crate::faults::Faults;
use crate::tls::{node_dns_name, peer_node};

/// Reconnect backoff: first retry after 100 ms, doubling up to 2 s, so a restarted peer is
/// found again within about two seconds.
const RECONNECT_MS_MIN: u64 = 100;
const RECONNECT_MS_MAX: u64 = 2_000;
/// The largest frame buffer a stream keeps between frames (most frames are far smaller).
const BODY_KEPT_BYTES_MAX: usize = 64 * 1024;
/// The QUIC close code that tells a peer it was removed from the mesh.
const CLOSE_REMOVED: u32 = 3;
/// How long a subscription stream must have run for its end to reset the backoff.
const STREAM_SETTLED_MS: u64 = 5_000;

/// How long a refused stream's error message may take to be written before the stream ends.
const ERROR_FLUSH_MS_MAX: u64 = 1_000;

/// Longest a stream's writer waits for one frame to go out: a peer whose QUIC stack answers
/// but which reads nothing holds the frame back with flow control for ever, and with it the
/// writer, its queued messages and the stream (the driver's closing of the outbox cannot reach
/// a writer blocked in a write). Past this the stream ends; the peer subscribes again later.
pub(crate) const FRAME_WRITE_MS_MAX: u64 = 30_000;

/// How long a stream may take to complete its handshake (and an accepted stream to send its
/// first message after it).
pub(crate) const HANDSHAKE_MS_MAX: u64 = 5_000;

/// Bytes moved per peer, for metrics.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Bytes sent to the peer (frames, both streams).
    pub bytes_sent: AtomicU64,
    /// Bytes received from the peer (frames, both streams).
    pub bytes_received: AtomicU64,
    /// Streams refused (bad handshake, bad frames, wrong cluster).
    pub streams_refused: AtomicU64,
    /// Frames to the peer dropped by an injected fault.
    pub frames_dropped: AtomicU64,
}

/// One peer a node knows of.
#[derive(Debug, Clone)]
pub struct PeerEntry {
    /// Its region name.
    pub region: String,
    /// Its QUIC address.
    pub address: SocketAddr,
    /// Bytes moved to and from it.
    pub traffic: Arc<Traffic>,
}

/// The peers a node knows: those of its configuration when it starts, then the committed
/// members of the control plane (a region that joins is added, a removed one dropped). Only
/// peers listed here may connect, and only they are subscribed to.
#[derive(Debug, Default)]
pub struct Directory {
    peers: std::sync::RwLock<BTreeMap<NodeId, PeerEntry>>,
    /// Members the control plane removed: refused like any unknown peer, but told why, so that
    /// one removed while it was cut off learns it and stops instead of taking writes no other
    /// region will ever receive.
    removed: std::sync::RwLock<std::collections::BTreeSet<NodeId>>,
}

impl Directory {
    /// A directory of these peers: id, region name and QUIC address.
    pub fn new(peers: impl IntoIterator<Item = (NodeId, String, SocketAddr)>) -> Directory {
        let directory = Directory::default();
        directory.update(peers);
        directory
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<NodeId, PeerEntry>> {
        self.peers.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the directory these peers exactly: new ones are added, addresses updated, and
    /// peers not listed dropped. Counters of a peer that stays are kept.
    pub fn update(&self, peers: impl IntoIterator<Item = (NodeId, String, SocketAddr)>) {
        let mut map = self.peers.write().unwrap_or_else(|e| e.into_inner());
        let mut next = BTreeMap::new();
        for (id, region, address) in peers {
            let traffic = map.get(&id).map(|e| e.traffic.clone()).unwrap_or_default();
            if map.get(&id).is_none_or(|e| e.address != address) {
                info!(peer = %id, %region, %address, "peer address known");
            }
            next.insert(
                id,
                PeerEntry {
                    region,
                    address,
                    traffic,
                },
            );
        }
        *map = next;
    }

    /// Records the members the control plane removed (every one, each time).
    pub fn set_removed(&self, removed: impl IntoIterator<Item = NodeId>) {
        *self.removed.write().unwrap_or_else(|e| e.into_inner()) = removed.into_iter().collect();
    }

    /// Whether `peer` was removed from the mesh.
    pub fn is_removed(&self, peer: NodeId) -> bool {
        self.removed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&peer)
    }

    /// Whether `peer` is known.
    pub fn contains(&self, peer: NodeId) -> bool {
        self.read().contains_key(&peer)
    }

    /// `peer`'s QUIC address.
    pub fn address(&self, peer: NodeId) -> Option<SocketAddr> {
        self.read().get(&peer).map(|e| e.address)
    }

    /// `peer`'s region name.
    pub fn region(&self, peer: NodeId) -> Option<String> {
        self.read().get(&peer).map(|e| e.region.clone())
    }

    /// `peer`'s traffic counters.
    pub fn traffic(&self, peer: NodeId) -> Option<Arc<Traffic>> {
        self.read().get(&peer).map(|e| e.traffic.clone())
    }

    /// Every known peer.
    pub fn entries(&self) -> BTreeMap<NodeId, PeerEntry> {
        self.read().clone()
    }
}

/// What every stream needs to know.
#[derive(Clone)]
pub struct Mesh {
    /// This node.
    pub node: NodeId,
    /// The cluster.
    pub cluster: ClusterId,
    /// The peers this node knows, with their addresses and traffic counters.
    pub peers: Arc<Directory>,
    /// Where stream events go.
    pub inputs: mpsc::Sender<Input>,
    /// This node's storage, read (never written) to serve data snapshots.
    pub storage: crate::storage::RocksStorage,
    /// Permits for serving data snapshots (see [`crate::snapshot`]).
    pub snapshot_serves: Arc<tokio::sync::Semaphore>,
    /// Stream ids, unique per process.
    pub conn_ids: Arc<AtomicU64>,
    /// Injected faults (none unless the configuration enables them).
    pub faults: Arc<Faults>,
    /// The node's Raft, which serves control-plane streams; set once it is created (it needs
    /// this mesh for its own calls). Until then control streams are refused.
    pub control: OnceLock<ControlRaft>,
    /// The connection of each open subscription, for the control plane's calls to share.
    pub connections: Arc<std::sync::Mutex<BTreeMap<NodeId, quinn::Connection>>>,
    /// A peer told this node it was removed from the mesh (its control plane had not learned
    /// it: it was cut off when the removal committed).
    pub told_removed: Arc<std::sync::atomic::AtomicBool>,
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    #[error("read: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("bad frame: {0}")]
    Decode(#[from] DecodeError),
    /// The peer's handshake was refused; `code` tells it why.
    #[error("handshake: {why}")]
    Handshake { code: ErrorCode, why: String },
    /// A message of ours did not encode (it would not fit a frame).
    #[error("cannot send {kind}: {why}")]
    Encode { kind: &'static str, why: String },
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("the node is stopping")]
    Stopping,
    #[error("the link is cut by an injected fault")]
    Cut,
    #[error("{0}")]
    Control(String),
}

impl StreamError {
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            StreamError::Decode(DecodeError::FrameTooLarge { .. }) => ErrorCode::FrameTooLarge,
            StreamError::Decode(DecodeError::UnknownVersion { .. }) => {
                ErrorCode::UnsupportedVersion
            }
            StreamError::Handshake { code, .. } => *code,
            StreamError::Encode { .. } => ErrorCode::Internal,
            _ => ErrorCode::Malformed,
        }
    }
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("node", &self.node)
            .field("cluster", &self.cluster)
            .field("peers", &self.peers)
            .field("control", &self.control.get().is_some())
            .finish()
    }
}

impl Mesh {
    /// The open connection of our subscription to `peer`, if there is one.
    pub(crate) fn connection(&self, peer: NodeId) -> Option<quinn::Connection> {
        let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections
            .get(&peer)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    fn share_connection(&self, peer: NodeId, connection: &quinn::Connection) {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.insert(peer, connection.clone());
    }

    /// Stops sharing the subscription connection to `peer` whose id is `id` (its subscriber
    /// stopped): it closes once the calls still using it end, instead of staying open on
    /// keep-alives. A newer subscriber's connection, shared since, stays.
    fn forget_connection(&self, peer: NodeId, id: usize) {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        if connections.get(&peer).is_some_and(|c| c.stable_id() == id) {
            connections.remove(&peer);
        }
    }

    pub(crate) fn traffic(&self, peer: NodeId) -> Option<Arc<Traffic>> {
        self.peers.traffic(peer)
    }

    /// Spawns the accept loop, and keeps one subscriber task per neighbor: `neighbors` says
    /// who they are, now and whenever the topology changes (a task is stopped when its peer is
    /// no longer a neighbor, and started for a new one).
    pub fn start(
        self: &Arc<Self>,
        endpoint: quinn::Endpoint,
        neighbors: watch::Receiver<Vec<NodeId>>,
        shutdown: watch::Receiver<bool>,
    ) {
        let mesh = self.clone();
        tokio::spawn(accept_loop(
            mesh.clone(),
            endpoint.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(subscribers(mesh, endpoint, neighbors, shutdown));
    }

    async fn send_input(&self, input: Input) -> Result<(), StreamError> {
        self.inputs
            .send(input)
            .await
            .map_err(|_| StreamError::Stopping)
    }
}

async fn accept_loop(
    mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        let mesh = mesh.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(err) => {
                    // A certificate from another CA, garbage, a scan: refused and logged.
                    warn!(%remote, error = %err, "refused incoming peer connection");
                    return;
                }
            };
            let Some(peer) = peer_node(&connection) else {
                warn!(%remote, "refused peer: its certificate names no node of this cluster");
                connection.close(quinn::VarInt::from_u32(1), b"unknown peer");
                return;
            };
            if refused_member(&mesh, peer, &connection) {
                return;
            }
            if mesh.faults.cut(peer) {
                debug!(%peer, %remote, "refused peer: the link is cut by an injected fault");
                connection.close(quinn::VarInt::from_u32(2), b"link cut");
                return;
            }
            debug!(%peer, %remote, "peer connected");
            serve_feeds(mesh, connection, peer, shutdown).await;
        });
    }
}

/// Closes `connection` if `peer` is no longer a member, saying why (a removed one is told so,
/// and stops): checked when it connects and again for every stream it opens, since a removed
/// peer's connection may outlive its removal (heartbeats keep it open), and must take no
/// snapshot or feed from then on.
fn refused_member(mesh: &Mesh, peer: NodeId, connection: &quinn::Connection) -> bool {
    let remote = connection.remote_address();
    if mesh.peers.is_removed(peer) {
        warn!(%peer, %remote, "refused peer: it was removed from the mesh (told so)");
        connection.close(
            quinn::VarInt::from_u32(CLOSE_REMOVED),
            b"removed from the mesh",
        );
        return true;
    }
    if !mesh.peers.contains(peer) {
        warn!(%peer, %remote, "refused peer: not a member of this cluster");
        connection.close(quinn::VarInt::from_u32(1), b"unknown peer");
        return true;
    }
    false
}

/// Serves every subscription stream the peer opens on its connection.
async fn serve_feeds(
    mesh: Arc<Mesh>,
    connection: quinn::Connection,
    peer: NodeId,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (send, recv) = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            stream = connection.accept_bi() => match stream {
                Ok(stream) => stream,
                Err(err) => {
                    debug!(%peer, error = %err, "peer connection ended");
                    return;
                }
            },
        };
        if refused_member(&mesh, peer, &connection) {
            return;
        }
        let mesh = mesh.clone();
        tokio::spawn(async move {
            if let Err(err) = serve_stream(&mesh, peer, send, recv).await {
                debug!(%peer, error = %err, "accepted stream ended");
            }
        });
    }
}

/// One stream a peer opened: a subscription to us (our feed), control-plane calls, or a data
/// snapshot request, told apart by the first message after the handshakes.
async fn serve_stream(
    mesh: &Mesh,
    peer: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), StreamError> {
    handshake(mesh, peer, &mut send, &mut recv).await?;
    let mut body = Vec::new();
    let first = tokio::time::timeout(
        Duration::from_millis(HANDSHAKE_MS_MAX),
        read_frame(&mut recv, &mut body),
    )
    .await
    .unwrap_or(Err(StreamError::HandshakeTimeout));
    match first {
        Ok(Some((Message::RaftRequest(request), _))) => match mesh.control.get() {
            Some(raft) => crate::control::quic::serve(mesh, raft, peer, request, send, recv).await,
            None => {
                let err = StreamError::Control("the control plane is not running yet".into());
                refuse(mesh, peer, &mut send, &err, &mut Vec::new()).await;
                Err(err)
            }
        },
        Ok(Some((Message::SnapshotRequest(request), _))) => {
            crate::snapshot::serve(mesh, peer, request, send).await
        }
        Ok(Some((first, bytes))) => {
            if let Some(t) = mesh.traffic(peer) {
                t.bytes_received.fetch_add(bytes as u64, Ordering::Relaxed);
            }
            run_stream(mesh, peer, StreamKind::Feed, send, recv, Some(first)).await
        }
        Ok(None) => Ok(()),
        Err(err) => {
            refuse(mesh, peer, &mut send, &err, &mut Vec::new()).await;
            Err(err)
        }
    }
}

/// Runs one [`subscriber`] per neighbor, following the neighbors as they change, until shutdown.
async fn subscribers(
    mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
    mut neighbors: watch::Receiver<Vec<NodeId>>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Each task's stop signal: set when its peer stops being a neighbor, or at shutdown.
    let mut running: BTreeMap<NodeId, watch::Sender<bool>> = BTreeMap::new();
    loop {
        let wanted = neighbors.borrow_and_update().clone();
        running.retain(|peer, stop| {
            let keep = wanted.contains(peer);
            if !keep {
                info!(%peer, "no longer a neighbor: unsubscribing");
                let _ = stop.send(true);
            }
            keep
        });
        for peer in wanted {
            if running.contains_key(&peer) {
                continue;
            }
            let (stop, stopped) = watch::channel(false);
            running.insert(peer, stop);
            tokio::spawn(subscriber(mesh.clone(), endpoint.clone(), peer, stopped));
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            changed = neighbors.changed() => if changed.is_err() { break },
        }
    }
    for stop in running.values() {
        let _ = stop.send(true);
    }
}

/// Keeps a subscription to `peer` open: connect, open a stream, run it; on failure, back off
/// and try again, until `shutdown` (the node's, or this peer's) turns true. The address is
/// looked up at each attempt: a peer that joined may be linked before its address is known here.
async fn subscriber(
    mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
    peer: NodeId,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff_ms = RECONNECT_MS_MIN;
    let mut faults = mesh.faults.watch();
    // The last failure logged as a warning: a repeat of it goes to debug.
    let mut warned: Option<String> = None;
    // The id of the connection this subscriber shared last (read after an attempt is dropped).
    let shared = AtomicUsize::new(usize::MAX);
    loop {
        while faults.borrow_and_update().cut.contains(&peer) {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                changed = faults.changed() => if changed.is_err() { return },
            }
        }
        let addr = mesh.peers.address(peer);
        let attempt = async {
            let addr = addr.ok_or_else(|| "no known address yet".to_string())?;
            let connecting = endpoint
                .connect(addr, &node_dns_name(peer))
                .map_err(|e| e.to_string())?;
            let connection = connecting.await.map_err(|e| told(&e))?;
            mesh.share_connection(peer, &connection);
            shared.store(connection.stable_id(), Ordering::Relaxed);
            let (send, recv) = connection.open_bi().await.map_err(|e| told(&e))?;
            info!(%peer, %addr, "subscribing");
            let (mut send, mut recv) = (send, recv);
            let result = match handshake(&mesh, peer, &mut send, &mut recv).await {
                Ok(()) => run_stream(&mesh, peer, StreamKind::Subscription, send, recv, None).await,
                Err(err) => Err(err),
            };
            let removed = connection.close_reason().as_ref().map(told);
            connection.close(quinn::VarInt::from_u32(0), b"subscription ended");
            match removed {
                Some(told) if told == REMOVED => Err(told),
                _ => result.map_err(|e| e.to_string()),
            }
        };
        let started = Instant::now();
        let outcome = tokio::select! {
            biased;
            _ = shutdown.changed() => {
                mesh.forget_connection(peer, shared.load(Ordering::Relaxed));
                return;
            }
            outcome = attempt => outcome,
        };
        // Only a stream that ran a while counts as having worked. A peer that refuses the
        // subscription (it is behind us, or does not link us yet) ends it cleanly at once: that
        // must back off like any failure, not reconnect ten times a second.
        let lasted = started.elapsed() >= Duration::from_millis(STREAM_SETTLED_MS);
        if outcome.as_ref().is_err_and(|err| err == REMOVED) {
            error!(%peer, "the peer says this region was removed from the mesh: stopping");
            mesh.told_removed.store(true, Ordering::SeqCst);
            let _ = mesh.send_input(Input::Removed).await;
            return;
        }
        if lasted {
            // It worked for a while: whatever ended it, the next attempt starts afresh.
            backoff_ms = RECONNECT_MS_MIN;
        }
        match outcome {
            Ok(()) if lasted => warned = None,
            Ok(()) => debug!(%peer, retry_ms = backoff_ms, "subscription ended at once"),
            Err(err) if warned.as_ref() != Some(&err) => {
                warn!(%peer, ?addr, error = %err, retry_ms = backoff_ms, "subscription failed");
                warned = Some(err);
            }
            Err(err) => {
                debug!(%peer, ?addr, error = %err, retry_ms = backoff_ms, "subscription failed");
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
        }
        backoff_ms = (backoff_ms * 2).min(RECONNECT_MS_MAX);
    }
}

/// What a subscription attempt says when the peer closed the connection because this node
/// was removed from the mesh.
const REMOVED: &str = "removed from the mesh";

/// A connection error as text: [`REMOVED`] when the peer closed it with [`CLOSE_REMOVED`].
fn told(err: &quinn::ConnectionError) -> String {
    match err {
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == quinn::VarInt::from_u32(CLOSE_REMOVED) =>
        {
            REMOVED.to_string()
        }
        other => other.to_string(),
    }
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub(crate) async fn read_frame(
    recv: &mut quinn::RecvStream,
    body: &mut Vec<u8>,
) -> Result<Option<(Message, usize)>, StreamError> {
    let mut prefix = [0u8; FRAME_LENGTH_BYTES];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(err) => return Err(err.into()),
    }
    // Two-step decoding: the length is checked before anything is allocated for the body.
    let body_bytes = u32::from_be_bytes(prefix) as usize;
    if body_bytes > FRAME_BYTES_MAX {
        return Err(DecodeError::FrameTooLarge { body_bytes }.into());
    }
    if body_bytes == 0 {
        return Err(DecodeError::Empty.into());
    }
    // The body grows with the bytes that arrive, not with what the prefix announces: a peer
    // that announces 4 MiB and sends nothing more holds no 4 MiB here.
    body.clear();
    while body.len() < body_bytes {
        match recv.read_chunk(body_bytes - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(quinn::ReadExactError::FinishedEarly(body.len()).into()),
            Err(err) => return Err(quinn::ReadExactError::ReadError(err).into()),
        }
    }
    let message = frame::decode_body(body)?;
    // A stream keeps its buffer between frames; not one a rare large frame grew.
    if body.capacity() > BODY_KEPT_BYTES_MAX {
        *body = Vec::new();
    }
    Ok(Some((message, FRAME_LENGTH_BYTES + body_bytes)))
}

pub(crate) async fn write_message(
    send: &mut quinn::SendStream,
    message: &Message,
    buf: &mut Vec<u8>,
) -> Result<usize, StreamError> {
    buf.clear();
    frame::encode(message, buf).map_err(|e| StreamError::Encode {
        kind: message.kind(),
        why: e.to_string(),
    })?;
    send.write_all(buf).await?;
    Ok(buf.len())
}

/// Exchanges handshakes on a new stream (either side); if theirs does not fit, tells the peer
/// why before the stream ends.
pub(crate) async fn handshake(
    mesh: &Mesh,
    peer: NodeId,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<(), StreamError> {
    let mut buf = Vec::new();
    let handshake = Message::Handshake(Handshake {
        protocol_version: PROTOCOL_VERSION,
        cluster_id: mesh.cluster,
        node_id: mesh.node,
    });
    let checked = tokio::time::timeout(Duration::from_millis(HANDSHAKE_MS_MAX), async {
        write_message(send, &handshake, &mut buf).await?;
        let mut body = Vec::new();
        match read_frame(recv, &mut body).await? {
            Some((Message::Handshake(theirs), _)) => check_handshake(mesh, peer, &theirs),
            Some((other, _)) => Err(StreamError::Handshake {
                code: ErrorCode::Malformed,
                why: format!("expected a handshake, got {}", other.kind()),
            }),
            None => Err(StreamError::Handshake {
                code: ErrorCode::Malformed,
                why: "stream ended before the handshake".into(),
            }),
        }
    })
    .await
    .unwrap_or(Err(StreamError::HandshakeTimeout));
    if let Err(err) = checked {
        refuse(mesh, peer, send, &err, &mut buf).await;
        return Err(err);
    }
    Ok(())
}

/// Runs one replication stream after its handshakes: frames both ways until either side ends
/// it. `first` is a message already read from it (an accepted stream's first).
async fn run_stream(
    mesh: &Mesh,
    peer: NodeId,
    kind: StreamKind,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    first: Option<Message>,
) -> Result<(), StreamError> {
    let conn = mesh.conn_ids.fetch_add(1, Ordering::Relaxed);
    // Looked up once: the hot path counts bytes without taking the directory's lock.
    let traffic = mesh.traffic(peer);
    let (outbox, mut outgoing) = mpsc::channel::<Message>(STREAM_OUTBOX_MAX);
    let input = |input| Input::Peer {
        peer,
        stream: kind,
        conn,
        input,
    };
    // The reader's way to tell the peer about a bad frame: through the writer, after whatever
    // frame it is writing, so the peer only ever sees whole frames. A weak sender: the driver's
    // outbox must stay the only one that keeps the writer going, so that the driver closes the
    // stream by dropping it (a stream it replaced, or one whose peer stopped reading).
    let errors = outbox.downgrade();
    mesh.send_input(input(PeerInput::Opened { outbox })).await?;
    if let Some(first) = first {
        mesh.send_input(input(PeerInput::Message(first))).await?;
    }

    let reader = async {
        let mut body = Vec::new();
        let result = loop {
            match read_frame(&mut recv, &mut body).await {
                Ok(Some((message, bytes))) => {
                    if let Some(t) = &traffic {
                        t.bytes_received.fetch_add(bytes as u64, Ordering::Relaxed);
                    }
                    // Awaiting here is the back-pressure: a busy driver slows the peer down
                    // through QUIC flow control instead of queueing without bound.
                    if let Err(err) = mesh.send_input(input(PeerInput::Message(message))).await {
                        break Err(err);
                    }
                }
                Ok(None) => break Ok::<(), StreamError>(()),
                Err(err) => break Err(err),
            }
        };
        if let Err(err @ StreamError::Decode(_)) = &result {
            warn!(%peer, ?kind, error = %err, "refusing peer stream: bad frame");
            if let Some(t) = &traffic {
                t.streams_refused.fetch_add(1, Ordering::Relaxed);
            }
            let text = err.to_string();
            if let Some(errors) = errors.upgrade() {
                let _ = errors.try_send(Message::Error(ErrorMessage {
                    code: err.code(),
                    text,
                }));
            }
        }
        result
    };
    let writer = async {
        let mut buf = Vec::new();
        // Frames held back by an injected delay, in order, with when each is due. Bounded like
        // the outbox: when it is full the writer stops reading the outbox. Without fault
        // injection nothing is held and the loop is a plain read-and-write.
        let faulty = mesh.faults.enabled();
        let mut held: VecDeque<(Instant, Message)> = VecDeque::new();
        let mut open = true;
        let mut sent_error = false;
        while open || !held.is_empty() {
            let message = if !faulty {
                match outgoing.recv().await {
                    Some(message) => message,
                    None => break,
                }
            } else {
                let due = held.front().map(|(due, _)| *due);
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                        match held.pop_front() {
                            Some((_, message)) => message,
                            None => continue,
                        }
                    }
                    next = outgoing.recv(), if open && held.len() < STREAM_OUTBOX_MAX => match next {
                        Some(message) => {
                            // Dropped when sent, as a lossy network would: a frame already on
                            // its way when a partition begins still arrives.
                            let (drop, delay) = mesh.faults.outgoing(peer);
                            if drop {
                                if let Some(t) = &traffic {
                                    t.frames_dropped.fetch_add(1, Ordering::Relaxed);
                                }
                                continue;
                            }
                            if !delay.is_zero() || !held.is_empty() {
                                held.push_back((Instant::now() + delay, message));
                                continue;
                            }
                            message
                        }
                        None => {
                            open = false;
                            continue;
                        }
                    },
                }
            };
            let is_error = matches!(message, Message::Error(_));
            let bound = Duration::from_millis(FRAME_WRITE_MS_MAX);
            let bytes = tokio::time::timeout(bound, write_message(&mut send, &message, &mut buf))
                .await
                .map_err(|_| {
                    warn!(%peer, wait_ms = FRAME_WRITE_MS_MAX, "the peer reads nothing: closing the stream");
                    StreamError::Control(format!(
                        "the peer read nothing for {FRAME_WRITE_MS_MAX} ms: stream closed"
                    ))
                })??;
            if let Some(t) = &traffic {
                t.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
            }
            if is_error {
                sent_error = true;
                break;
            }
        }
        // The driver dropped the outbox (or sent an error): end the stream.
        let _ = send.finish();
        if sent_error {
            // The error is received (acknowledged by the peer's QUIC stack) before the
            // connection may close: a subscriber closes its connection when its stream ends,
            // which would discard frames not yet delivered.
            let flush = Duration::from_millis(ERROR_FLUSH_MS_MAX);
            let _ = tokio::time::timeout(flush, send.stopped()).await;
        }
        Ok::<(), StreamError>(())
    };
    // Ends the stream when an injected fault cuts the link.
    let cut = async {
        if !mesh.faults.enabled() {
            return std::future::pending().await;
        }
        let mut faults = mesh.faults.watch();
        loop {
            if faults.borrow_and_update().cut.contains(&peer) {
                return Err::<(), StreamError>(StreamError::Cut);
            }
            if faults.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::pin!(reader, writer, cut);
    let result = tokio::select! {
        result = &mut reader => {
            if matches!(result, Err(StreamError::Decode(_))) {
                // Let the writer finish its frame and send the error (it stops after it).
                let flush = Duration::from_millis(ERROR_FLUSH_MS_MAX);
                let _ = tokio::time::timeout(flush, &mut writer).await;
            }
            result
        }
        result = &mut writer => result,
        result = &mut cut => result,
    };
    let _ = mesh.inputs.send(input(PeerInput::Closed)).await;
    result
}

fn check_handshake(mesh: &Mesh, peer: NodeId, theirs: &Handshake) -> Result<(), StreamError> {
    if theirs.protocol_version != PROTOCOL_VERSION {
        return Err(StreamError::Handshake {
            code: ErrorCode::UnsupportedVersion,
            why: format!(
                "protocol version {}, and this node speaks {PROTOCOL_VERSION}",
                theirs.protocol_version
            ),
        });
    }
    if theirs.cluster_id != mesh.cluster {
        return Err(StreamError::Handshake {
            code: ErrorCode::WrongCluster,
            why: format!("cluster {} is not {}", theirs.cluster_id, mesh.cluster),
        });
    }
    if theirs.node_id != peer {
        return Err(StreamError::Handshake {
            code: ErrorCode::UnknownPeer,
            why: format!(
                "says it is {} but its certificate is {peer}",
                theirs.node_id
            ),
        });
    }
    Ok(())
}

pub(crate) async fn refuse(
    mesh: &Mesh,
    peer: NodeId,
    send: &mut quinn::SendStream,
    err: &StreamError,
    buf: &mut Vec<u8>,
) {
    warn!(%peer, error = %err, "refusing peer stream");
    if let Some(t) = mesh.traffic(peer) {
        t.streams_refused.fetch_add(1, Ordering::Relaxed);
    }
    let message = Message::Error(ErrorMessage {
        code: err.code(),
        text: err.to_string(),
    });
    let _ = write_message(send, &message, buf).await;
    let _ = send.finish();
}
