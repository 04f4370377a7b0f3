//! Data snapshots: how a region that joins gets the mesh's state.
//!
//! ```text
//!   fetcher (joining)                          server (any member)
//!     connect, Handshake ◄──────────────────►  Handshake
//!     SnapshotRequest ───────────────────────► RocksDB snapshot (one consistent view)
//!                       ◄──── SnapshotBegin ── vector + HLC at that view, key estimate
//!     merge into states ◄──── SnapshotChunk ── keys in order (a blocking reader, bounded
//!     (idempotent)      ◄──── SnapshotChunk ── pipeline; QUIC flow control paces it)
//!     join the parts    ◄── SnapshotKeyPart* ── a key too large for a frame, in parts
//!     finish: vector,   ◄──── SnapshotEnd ──── key count, checked
//!     HLC, trimmed
//! ```
//!
//! A joining node syncs the finish (and only then clears its pending-snapshot marker); a running
//! node's resync commits it at the node's durability, like any other commit.
//!
//! The fetcher then subscribes from the snapshot's vector like any region that restarts.
//! Merging (each key state's own join) rather than overwriting makes a retried or repeated
//! install harmless. The replica core does the merge ([`Replica::handle_snapshot_chunk`],
//! [`Replica::handle_snapshot_end`]): a joining node's replica before its driver runs, or a
//! running node's driver when a peer told it that it is behind what the logs still hold.

use std::sync::atomic::Ordering;
use std::time::Duration;

use braid_conflict::Hlc;
use braid_protocol::limits::{FRAME_BYTES_MAX, SNAPSHOT_CHUNK_BYTES_MAX, SNAPSHOT_CHUNK_KEYS_MAX};
use braid_protocol::snapshot_parts::{self, Assembly};
use braid_protocol::{
    frame, EncodeError, ErrorMessage, Message, NodeId, Replica, SnapshotEnd, SnapshotEntry,
    SnapshotRequest, VersionVector,
};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::driver::Input;
use crate::storage::{RocksStorage, SnapshotPiece, StorageError};
use crate::tls::node_dns_name;
use crate::transport::{self, Mesh, StreamError};

/// Snapshots one node serves at once; a fetcher refused for this tries another member.
pub(crate) const SERVES_MAX: usize = 2;

/// Chunks read ahead of the stream by the server's reader.
const PIPELINE_CHUNKS_MAX: usize = 4;

/// Longest wait for the next frame of a snapshot being fetched (the server reads and sends
/// continuously; a silence this long is a dead stream).
const FRAME_WAIT_MS_MAX: u64 = 30_000;

/// Longest wait for a connection to the server.
const CONNECT_MS_MAX: u64 = 10_000;

/// Why a snapshot could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The server cannot be reached.
    #[error("cannot reach {0}")]
    Unreachable(String),
    /// The stream failed or the server refused.
    #[error("snapshot stream from {peer}: {reason}")]
    Stream {
        /// The server.
        peer: NodeId,
        /// What happened.
        reason: String,
    },
    /// The server sent what a snapshot does not hold.
    #[error("snapshot from {peer} broke the protocol: {reason}")]
    Protocol {
        /// The server.
        peer: NodeId,
        /// What was wrong.
        reason: String,
    },
    /// Local storage failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The node stopped before the snapshot was installed.
    #[error("the node is stopping")]
    Stopped,
}

/// How far a snapshot being fetched has come.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchProgress {
    /// Keys merged so far.
    pub keys: u64,
    /// About how many keys the server holds.
    pub keys_estimate: u64,
    /// Bytes of frames received.
    pub bytes: u64,
    /// Whether the last key is in.
    pub done: bool,
}

/// Serves a snapshot on an accepted stream whose first message was `request`.
pub(crate) async fn serve(
    mesh: &Mesh,
    peer: NodeId,
    request: SnapshotRequest,
    mut send: quinn::SendStream,
) -> Result<(), StreamError> {
    let mut buf = Vec::new();
    // Each snapshot served holds a blocking thread and a RocksDB snapshot: only a few at once.
    let Ok(_permit) = mesh.snapshot_serves.clone().try_acquire_owned() else {
        let busy = StreamError::Control(format!(
            "this node is serving {SERVES_MAX} snapshots already: ask another member"
        ));
        transport::refuse(mesh, peer, &mut send, &busy, &mut buf).await;
        return Err(busy);
    };
    info!(%peer, their_vector = ?request.vector, "serving a data snapshot");
    let traffic = mesh.traffic(peer);
    let (pieces, mut rx) =
        mpsc::channel::<Result<SnapshotPiece, StorageError>>(PIPELINE_CHUNKS_MAX);
    let storage = mesh.storage.clone();
    // RocksDB reads block: the reader runs on a thread of its own, as far ahead of the stream
    // as the pipeline allows, and stops when the stream's end of the channel is gone.
    let reader = tokio::task::spawn_blocking(move || {
        let read = storage.read_snapshot(SNAPSHOT_CHUNK_KEYS_MAX, SNAPSHOT_CHUNK_BYTES_MAX, |p| {
            pieces.blocking_send(Ok(p)).is_ok()
        });
        if let Err(err) = read {
            let _ = pieces.blocking_send(Err(err));
        }
    });
    let mut keys = 0u64;
    while let Some(piece) = rx.recv().await {
        let written = match piece {
            Ok(SnapshotPiece::Begin(begin)) => {
                let message = Message::SnapshotBegin(begin);
                buf.clear();
                frame::encode(&message, &mut buf).map_err(|e| encode_failed(&message, e))?;
                write_frame(&mut send, &buf).await
            }
            Ok(SnapshotPiece::Chunk(chunk)) => {
                keys += chunk.len() as u64;
                write_chunk(&mut send, chunk, &mut buf).await
            }
            Err(err) => {
                warn!(%peer, error = %err, "cannot read a data snapshot");
                let failed = StreamError::Control(format!("the snapshot cannot be read: {err}"));
                transport::refuse(mesh, peer, &mut send, &failed, &mut buf).await;
                return Err(failed);
            }
        };
        let bytes = match written {
            Ok(bytes) => bytes,
            Err(err @ StreamError::Encode { .. }) => {
                warn!(%peer, error = %err, "cannot send a data snapshot");
                transport::refuse(mesh, peer, &mut send, &err, &mut buf).await;
                return Err(err);
            }
            Err(err) => return Err(err),
        };
        if let Some(t) = &traffic {
            t.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }
    // The channel closed: the reader is done, or it died, and then the snapshot is incomplete.
    if reader.await.is_err() {
        let failed = StreamError::Control("the snapshot reader failed".into());
        transport::refuse(mesh, peer, &mut send, &failed, &mut buf).await;
        return Err(failed);
    }
    transport::write_message(
        &mut send,
        &Message::SnapshotEnd(SnapshotEnd { keys }),
        &mut buf,
    )
    .await?;
    let _ = send.finish();
    // Wait for the fetcher to have read it all (it closes the stream), or give up.
    let _ = tokio::time::timeout(Duration::from_millis(FRAME_WAIT_MS_MAX), send.stopped()).await;
    info!(%peer, keys, "data snapshot served");
    Ok(())
}

/// Writes one encoded frame. A fetcher that stops reading must not hold the snapshot (and its
/// thread) for ever: each frame has [`transport::FRAME_WRITE_MS_MAX`] to go, as on any stream.
async fn write_frame(send: &mut quinn::SendStream, frame: &[u8]) -> Result<usize, StreamError> {
    tokio::time::timeout(
        Duration::from_millis(transport::FRAME_WRITE_MS_MAX),
        send.write_all(frame),
    )
    .await
    .map_err(|_| StreamError::Control("the fetcher stopped reading".into()))??;
    Ok(frame.len())
}

fn encode_failed(message: &Message, err: EncodeError) -> StreamError {
    StreamError::Encode {
        kind: message.kind(),
        why: err.to_string(),
    }
}

/// Writes a chunk of keys: as one frame when it fits; else key by key, each in a chunk of its
/// own or, when even that is larger than a frame, in parts ([`snapshot_parts`]). Returns the
/// bytes written.
async fn write_chunk(
    send: &mut quinn::SendStream,
    chunk: Vec<SnapshotEntry>,
    buf: &mut Vec<u8>,
) -> Result<usize, StreamError> {
    let Some(entries) = encode_chunk(chunk, buf)? else {
        return write_frame(send, buf).await;
    };
    // A chunk of one key that does not fit is that key, in parts; of several, each key alone.
    let alone = entries.len() == 1;
    let mut bytes = 0;
    for entry in entries {
        let entry = match alone {
            true => entry,
            false => match encode_chunk(vec![entry], buf)?.and_then(|mut back| back.pop()) {
                None => {
                    bytes += write_frame(send, buf).await?;
                    continue;
                }
                Some(entry) => entry,
            },
        };
        let key = String::from_utf8_lossy(&entry.key[..entry.key.len().min(64)]).into_owned();
        let parts = snapshot_parts::parts(&entry).map_err(|e| StreamError::Encode {
            kind: "snapshot_key_part",
            why: format!("key {key:?}: {e}"),
        })?;
        info!(
            key,
            parts = parts.len(),
            "a key too large for a frame goes in parts"
        );
        for part in &parts {
            buf.clear();
            frame::encode(part, buf).map_err(|e| encode_failed(part, e))?;
            bytes += write_frame(send, buf).await?;
        }
    }
    // The failed encodings grew the buffer past a frame: give that memory back.
    if buf.capacity() > 2 * FRAME_BYTES_MAX {
        *buf = Vec::new();
    }
    Ok(bytes)
}

/// Encodes `entries` as one chunk into `buf`; gives them back, unencoded, when they do not
/// fit a frame.
fn encode_chunk(
    entries: Vec<SnapshotEntry>,
    buf: &mut Vec<u8>,
) -> Result<Option<Vec<SnapshotEntry>>, StreamError> {
    let message = Message::SnapshotChunk(entries);
    buf.clear();
    match frame::encode(&message, buf) {
        Ok(()) => Ok(None),
        Err(EncodeError::TooLarge { .. }) => match message {
            Message::SnapshotChunk(entries) => Ok(Some(entries)),
            _ => Ok(Some(Vec::new())),
        },
        Err(err) => Err(encode_failed(&message, err)),
    }
}

/// Where a fetched snapshot goes: the replica of a joining node before its driver runs, or a
/// running node's driver (a resynchronisation).
pub(crate) trait SnapshotSink {
    /// Merges a chunk of keys, of a snapshot whose `SnapshotBegin` carried `hlc`.
    async fn chunk(&mut self, entries: Vec<SnapshotEntry>, hlc: Hlc) -> Result<(), SnapshotError>;
    /// The last chunk is in: takes the snapshot's vector and HLC; returns the node's vector.
    async fn end(
        &mut self,
        vector: VersionVector,
        hlc: Hlc,
    ) -> Result<VersionVector, SnapshotError>;
}

/// A replica no driver runs yet (a joining node's) takes the snapshot directly.
pub(crate) struct ReplicaSink<'a>(pub &'a mut Replica<RocksStorage>);

impl SnapshotSink for ReplicaSink<'_> {
    async fn chunk(&mut self, entries: Vec<SnapshotEntry>, hlc: Hlc) -> Result<(), SnapshotError> {
        Ok(self
            .0
            .handle_snapshot_chunk(entries, hlc, crate::driver::now_ms())?)
    }

    async fn end(
        &mut self,
        vector: VersionVector,
        hlc: Hlc,
    ) -> Result<VersionVector, SnapshotError> {
        self.0
            .handle_snapshot_end(&vector, hlc, crate::driver::now_ms())?;
        Ok(self.0.vector().clone())
    }
}

/// A running node's driver takes the snapshot through its inputs, between its other work.
pub(crate) struct DriverSink(pub mpsc::Sender<Input>);

impl SnapshotSink for DriverSink {
    async fn chunk(&mut self, entries: Vec<SnapshotEntry>, hlc: Hlc) -> Result<(), SnapshotError> {
        let (reply, done) = oneshot::channel();
        let stopped = || SnapshotError::Stopped;
        self.0
            .send(Input::SnapshotChunk {
                entries,
                hlc,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())
    }

    async fn end(
        &mut self,
        vector: VersionVector,
        hlc: Hlc,
    ) -> Result<VersionVector, SnapshotError> {
        let (reply, done) = oneshot::channel();
        let stopped = || SnapshotError::Stopped;
        self.0
            .send(Input::SnapshotEnd { vector, hlc, reply })
            .await
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())
    }
}

/// Fetches a snapshot from `from` (a member `mesh` knows the address of) into `sink`, telling
/// the server this node holds `ours`. Returns the vector the node holds afterwards.
pub(crate) async fn fetch(
    mesh: &Mesh,
    endpoint: &quinn::Endpoint,
    from: NodeId,
    ours: VersionVector,
    sink: &mut impl SnapshotSink,
    mut progress: impl FnMut(&FetchProgress),
) -> Result<VersionVector, SnapshotError> {
    let addr = mesh
        .peers
        .address(from)
        .ok_or_else(|| SnapshotError::Unreachable(format!("{from}: no known address")))?;
    let unreachable = |e: String| SnapshotError::Unreachable(format!("{from} at {addr}: {e}"));
    let stream_err = |e: StreamError| SnapshotError::Stream {
        peer: from,
        reason: e.to_string(),
    };
    let protocol = |reason: String| SnapshotError::Protocol { peer: from, reason };
    let connecting = endpoint
        .connect(addr, &node_dns_name(from))
        .map_err(|e| unreachable(e.to_string()))?;
    let connection = tokio::time::timeout(Duration::from_millis(CONNECT_MS_MAX), connecting)
        .await
        .map_err(|_| unreachable(format!("no connection within {CONNECT_MS_MAX} ms")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let result = async {
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        transport::handshake(mesh, from, &mut send, &mut recv)
            .await
            .map_err(stream_err)?;
        let mut buf = Vec::new();
        let request = Message::SnapshotRequest(SnapshotRequest { vector: ours });
        transport::write_message(&mut send, &request, &mut buf)
            .await
            .map_err(stream_err)?;
        let mut state = FetchProgress::default();
        let mut begin = None;
        let mut last_key: Option<Bytes> = None;
        // The parts of a key too large for a frame, joined as they come.
        let mut assembly = Assembly::default();
        let mut body = Vec::new();
        loop {
            let next = tokio::time::timeout(
                Duration::from_millis(FRAME_WAIT_MS_MAX),
                transport::read_frame(&mut recv, &mut body),
            )
            .await
            .map_err(|_| SnapshotError::Stream {
                peer: from,
                reason: format!("nothing received for {FRAME_WAIT_MS_MAX} ms"),
            })?
            .map_err(stream_err)?;
            let Some((message, bytes)) = next else {
                return Err(protocol("the stream ended before the snapshot did".into()));
            };
            state.bytes += bytes as u64;
            if assembly.in_progress() && !matches!(message, Message::SnapshotKeyPart(_)) {
                return Err(protocol(format!(
                    "a {} message came between the parts of a key",
                    message.kind()
                )));
            }
            let message = match message {
                Message::SnapshotKeyPart(part) if begin.is_some() => {
                    match assembly.push(&part).map_err(|e| protocol(e.to_string()))? {
                        Some(entry) => Message::SnapshotChunk(vec![entry]),
                        None => {
                            progress(&state);
                            continue;
                        }
                    }
                }
                other => other,
            };
            match (message, &begin) {
                (Message::SnapshotBegin(head), None) => {
                    // As for events: no member's vector names more origins than a mesh has ids.
                    let origins_max = braid_protocol::control::MEMBERS_MAX;
                    if head.vector.len() > origins_max {
                        return Err(protocol(format!(
                            "its vector names {} origins, more than the {origins_max} a mesh \
                             ever has",
                            head.vector.len()
                        )));
                    }
                    state.keys_estimate = head.keys_estimate;
                    info!(%from, vector = ?head.vector, keys_estimate = head.keys_estimate, "fetching a data snapshot");
                    begin = Some(head);
                }
                (Message::SnapshotChunk(entries), Some(head)) => {
                    if let (Some(last), Some(first)) = (&last_key, entries.first()) {
                        if first.key <= *last {
                            return Err(protocol("keys out of order across chunks".into()));
                        }
                    }
                    last_key = entries.last().map(|e| e.key.clone()).or(last_key);
                    state.keys += entries.len() as u64;
                    sink.chunk(entries, head.hlc).await?;
                }
                (Message::SnapshotEnd(end), Some(head)) => {
                    if end.keys != state.keys {
                        return Err(protocol(format!(
                            "it announced {} keys and sent {}",
                            end.keys, state.keys
                        )));
                    }
                    let vector = sink.end(head.vector.clone(), head.hlc).await?;
                    state.done = true;
                    progress(&state);
                    return Ok(vector);
                }
                (Message::Error(ErrorMessage { code, text }), _) => {
                    return Err(SnapshotError::Stream {
                        peer: from,
                        reason: format!("refused ({code:?}): {text}"),
                    });
                }
                (other, _) => {
                    return Err(protocol(format!("unexpected {} message", other.kind())));
                }
            }
            progress(&state);
        }
    }
    .await;
    let code = match &result {
        Ok(_) => 0u32,
        Err(_) => 1,
    };
    connection.close(quinn::VarInt::from_u32(code), b"snapshot done");
    result
}
