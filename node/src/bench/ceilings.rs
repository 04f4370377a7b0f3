//! The ceilings this machine puts on replication, measured in the same run as the cluster:
//! raw RocksDB write batches (the storage ceiling) and raw QUIC streams on loopback (the
//! transport ceiling). Each runs alone, after the cluster has stopped, so they do not compete.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use braid_protocol::NodeId;
use rocksdb::{WriteBatch, WriteOptions, DB};
use serde::Serialize;

use super::BenchError;
use crate::storage::Durability;
use crate::tls::{self, MeshTls};

/// Bytes of the largest transport-ceiling frame (the replication frame limit).
const FRAME_BYTES_MAX: usize = braid_protocol::limits::FRAME_BYTES_MAX;

/// The storage ceiling's result.
#[derive(Debug, Clone, Serialize)]
pub struct StorageCeiling {
    /// Events (one key put each) written per second.
    pub events_per_s: f64,
    /// Puts per write batch.
    pub batch: usize,
    /// Key bytes.
    pub key_bytes: usize,
    /// Value bytes.
    pub value_bytes: usize,
    /// `process` (WAL written, not synced) or `machine` (WAL synced per batch).
    pub durability: String,
}

/// Writes batches of `batch` puts of `key_bytes`/`value_bytes` into a fresh RocksDB in `dir`,
/// with the durability mode's sync setting, for `duration`.
pub fn storage(
    dir: &Path,
    durability: Durability,
    batch: usize,
    key_bytes: usize,
    value_bytes: usize,
    duration: Duration,
) -> Result<StorageCeiling, BenchError> {
    let batch = batch.max(1);
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    let db = DB::open(&options, dir).map_err(|e| BenchError::Ceiling(format!("RocksDB: {e}")))?;
    let mut write = WriteOptions::default();
    write.set_sync(durability == Durability::Machine);
    let value = vec![b'v'; value_bytes];
    let mut key = vec![b'k'; key_bytes.max(8)];
    let started = Instant::now();
    let mut written: u64 = 0;
    while started.elapsed() < duration {
        let mut writes = WriteBatch::default();
        for _ in 0..batch {
            let at = key.len() - 8;
            key[at..].copy_from_slice(&written.to_be_bytes());
            writes.put(&key, &value);
            written += 1;
        }
        db.write_opt(writes, &write)
            .map_err(|e| BenchError::Ceiling(format!("RocksDB: {e}")))?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(StorageCeiling {
        events_per_s: written as f64 / elapsed,
        batch,
        key_bytes: key.len(),
        value_bytes,
        durability: durability.to_string(),
    })
}

/// The transport ceiling's result.
#[derive(Debug, Clone, Serialize)]
pub struct TransportCeiling {
    /// Events per second, counting `events_per_frame` per frame received.
    pub events_per_s: f64,
    /// Bytes per frame.
    pub frame_bytes: usize,
    /// Events each frame stands for.
    pub events_per_frame: f64,
    /// Payload megabytes per second.
    pub mb_per_s: f64,
}

/// Moves frames of `frame_bytes` over one QUIC stream with mutual TLS on loopback for
/// `duration`, and counts what arrives.
pub async fn transport(
    frame_bytes: usize,
    events_per_frame: f64,
    duration: Duration,
) -> Result<TransportCeiling, BenchError> {
    let requested = frame_bytes.max(1);
    let frame_bytes = frame_bytes.clamp(8, FRAME_BYTES_MAX);
    // A clamped frame stands for proportionally more or fewer events.
    let events_per_frame = events_per_frame * frame_bytes as f64 / requested as f64;
    let fail = |what: &str, e: &dyn std::fmt::Display| BenchError::Ceiling(format!("{what}: {e}"));
    let ca = tls::generate_ca("braid-bench").map_err(|e| fail("certificates", &e))?;
    let server_tls = mesh_tls(&ca, NodeId(1))?;
    let client_tls = mesh_tls(&ca, NodeId(2))?;
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let server = quinn::Endpoint::server(server_tls.server, loopback)
        .map_err(|e| fail("QUIC server", &e))?;
    let server_addr = server.local_addr().map_err(|e| fail("QUIC server", &e))?;
    let mut client = quinn::Endpoint::client(loopback).map_err(|e| fail("QUIC client", &e))?;
    client.set_default_client_config(client_tls.client);

    let receiver = tokio::spawn(async move {
        let incoming = server.accept().await.ok_or("no connection")?;
        let connection = incoming.await.map_err(|e| e.to_string())?;
        // Bidirectional, as every stream of the mesh is (a peer may open no other kind); only
        // its receiving half is used.
        let (_send, mut stream) = connection.accept_bi().await.map_err(|e| e.to_string())?;
        let mut buffer = vec![0u8; 64 * 1024];
        let mut received: u64 = 0;
        let mut last_byte = Instant::now();
        while let Some(n) = stream.read(&mut buffer).await.map_err(|e| e.to_string())? {
            received += n as u64;
            last_byte = Instant::now();
        }
        connection.close(0u32.into(), b"done");
        server.wait_idle().await;
        Ok::<(u64, Instant), String>((received, last_byte))
    });

    let connection = client
        .connect(server_addr, &tls::node_dns_name(NodeId(1)))
        .map_err(|e| fail("QUIC connect", &e))?
        .await
        .map_err(|e| fail("QUIC connect", &e))?;
    let (mut stream, _recv) = connection
        .open_bi()
        .await
        .map_err(|e| fail("QUIC stream", &e))?;
    let frame = bytes::Bytes::from(vec![b'f'; frame_bytes]);
    let started = Instant::now();
    while started.elapsed() < duration {
        stream
            .write_chunk(frame.clone())
            .await
            .map_err(|e| fail("QUIC write", &e))?;
    }
    stream.finish().map_err(|e| fail("QUIC finish", &e))?;
    let (received, last_byte) = receiver
        .await
        .map_err(|e| fail("QUIC receiver", &e))?
        .map_err(|e| fail("QUIC receiver", &e))?;
    // Up to the last byte received: closing and draining the connection is not transfer time.
    let elapsed = last_byte.duration_since(started).as_secs_f64().max(1e-6);
    client.close(0u32.into(), b"done");
    let frames = received as f64 / frame_bytes as f64;
    Ok(TransportCeiling {
        events_per_s: frames * events_per_frame / elapsed,
        frame_bytes,
        events_per_frame,
        mb_per_s: received as f64 / elapsed / 1e6,
    })
}

fn mesh_tls(ca: &tls::CaPem, node: NodeId) -> Result<MeshTls, BenchError> {
    let pem = tls::generate_node_cert(ca, node)
        .map_err(|e| BenchError::Ceiling(format!("certificates: {e}")))?;
    // The mesh's own transport settings: the ceiling is what the node's transport could do.
    MeshTls::from_pem(&ca.cert_pem, &pem.cert_pem, &pem.key_pem)
        .map_err(|e| BenchError::Ceiling(format!("TLS: {e}")))
}
