//! One node, assembled: storage, replica, driver, QUIC transport, the control plane's Raft, RESP
//! and HTTP servers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use braid_protocol::{NodeId, Replica, ReplicaConfig};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::config::NodeConfig;
use crate::control::plane::{bootstrap_command, ControlPlane, ControlPlaneError};
use crate::driver::{now_ms, Driver, Snapshot, INPUT_QUEUE_MAX};
use crate::faults::Faults;
use crate::http::{self, AdminState};
use crate::resp::{self, RespContext};
use crate::storage::RocksStorage;
use crate::tls::MeshTls;
use crate::transport::{Mesh, Traffic};
use braid_protocol::control::MemberState;

/// A node failed to start or failed while running.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Certificates.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Storage: at start, or fatal while running.
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    /// A listening address could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The control plane could not start.
    #[error(transparent)]
    Control(#[from] ControlPlaneError),
    /// A task of the node failed.
    #[error("{0}")]
    Task(String),
}

/// Where a node keeps its control plane's Raft log, vote and snapshot: a database of its own
/// inside the data directory.
pub fn control_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("control")
}

/// Runs a node until `shutdown` turns true. Returns an error if it cannot start, or if storage
/// fails while it runs.
pub async fn run(config: NodeConfig, shutdown: watch::Receiver<bool>) -> Result<(), NodeError> {
    let node = config.node();
    let cluster = config.cluster_id()?;
    let topology = config.topology()?;
    let tls = MeshTls::load(&config.tls.ca_cert, &config.tls.cert, &config.tls.key)?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| NodeError::Bind {
        what: "data directory",
        addr: config.listen.resp,
        source,
    })?;
    let storage = RocksStorage::open(&config.data_dir, config.durability)?;
    let reader = storage.clone();
    let mut replica_config = ReplicaConfig::new(node);
    replica_config.clock_skew_ms_max = config.clock_skew_ms_max;
    let replica = Replica::open(replica_config, topology.clone(), storage, now_ms())?;

    let bind = |what, addr| move |source| NodeError::Bind { what, addr, source };
    let socket = std::net::UdpSocket::bind(config.listen.peer)
        .map_err(bind("peer (QUIC)", config.listen.peer))?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| NodeError::Task("no async runtime for the QUIC endpoint".into()))?;
    let mut endpoint = quinn::Endpoint::new(tls.endpoint, Some(tls.server), socket, runtime)
        .map_err(bind("peer (QUIC)", config.listen.peer))?;
    endpoint.set_default_client_config(tls.client);
    let resp_listener = TcpListener::bind(config.listen.resp)
        .await
        .map_err(bind("RESP", config.listen.resp))?;
    let http_listener = TcpListener::bind(config.listen.http)
        .await
        .map_err(bind("HTTP", config.listen.http))?;

    let (inputs, input_rx) = mpsc::channel(INPUT_QUEUE_MAX);
    let faults = Arc::new(Faults::new(config.fault_injection));
    if config.fault_injection {
        warn!(%node, "fault injection is enabled: POST /faults can cut links and skew the clock");
    }
    if let Some(text) = std::env::var_os(crate::faults::FAULTS_ENV) {
        let peer_names: BTreeMap<NodeId, String> = config
            .peers
            .iter()
            .map(|p| (NodeId(p.id), p.region.clone()))
            .collect();
        let invalid =
            |reason: String| NodeError::Task(format!("{}: {reason}", crate::faults::FAULTS_ENV));
        let set: crate::faults::FaultSet =
            serde_json::from_str(&text.to_string_lossy()).map_err(|e| invalid(e.to_string()))?;
        faults
            .set(&set, &peer_names)
            .map_err(|e| invalid(e.to_string()))?;
        warn!(%node, faults = ?set, "injected faults set at start");
    }
    let peers: BTreeMap<NodeId, SocketAddr> = config
        .peers
        .iter()
        .map(|p| (NodeId(p.id), p.address))
        .collect();
    let traffic = Arc::new(
        peers
            .keys()
            .map(|p| (*p, Traffic::default()))
            .collect::<BTreeMap<_, _>>(),
    );
    let regions = Arc::new(config.regions());

    let mesh = Arc::new(Mesh {
        node,
        cluster,
        peers,
        inputs: inputs.clone(),
        traffic: traffic.clone(),
        conn_ids: Arc::new(AtomicU64::new(0)),
        faults: faults.clone(),
        control: OnceLock::new(),
        connections: Arc::default(),
    });
    let control = ControlPlane::start(
        &control_dir(&config.data_dir),
        &config,
        mesh.clone(),
        endpoint.clone(),
    )
    .await?;
    match control.own_state() {
        Some(MemberState::Removed) => {
            return Err(NodeError::Task(format!(
                "region {} (node {node}) was removed from the mesh, and a removed node's id is \
                 never used again: set this region up anew to bring it back",
                config.region
            )));
        }
        // It was leaving when it stopped: it takes no writes (queued before any client's).
        Some(MemberState::Draining) => {
            let _ = inputs.send(crate::driver::Input::Leaving).await;
        }
        _ => {}
    }
    // Set once, here, before the accept loop starts: nothing else sets it.
    let _ = mesh.control.set(control.raft().clone());
    let (neighbors, neighbors_rx) = watch::channel(topology.neighbors(node));
    mesh.start(endpoint.clone(), neighbors_rx, shutdown.clone());
    control.spawn_upkeep(
        bootstrap_command(&config),
        config.change_log_gc,
        inputs.clone(),
        shutdown.clone(),
    );

    let admin = AdminState {
        inputs: inputs.clone(),
        regions: regions.clone(),
        traffic,
        durability: config.durability.name(),
        faults: faults.clone(),
        control: Some(control),
    };
    let info_admin = admin.clone();
    let context = RespContext {
        inputs: inputs.clone(),
        storage: reader,
        password: config.password.as_deref().map(Arc::from),
        info: Arc::new(move |snapshot: &Snapshot| info_text(&info_admin, snapshot)),
    };
    tokio::spawn(resp::serve(resp_listener, context, shutdown.clone()));
    let http_shutdown = shutdown.clone();
    tokio::spawn(async move {
        if let Err(err) = http::serve(http_listener, admin, http_shutdown).await {
            error!(error = %err, "HTTP server failed");
        }
    });
    drop(inputs);

    info!(
        %node, region = %config.region, resp = %config.listen.resp, http = %config.listen.http,
        peer = %config.listen.peer, durability = ?config.durability, "node listening"
    );
    let result = Driver::new(replica, input_rx, faults, neighbors)
        .run(shutdown)
        .await;
    endpoint.close(quinn::VarInt::from_u32(0), b"node stopping");
    if let Err(err) = &result {
        crate::driver::log_fatal(err);
    }
    Ok(result?)
}

/// The text of RESP `INFO`: server, replication (peers and lag), stats.
fn info_text(admin: &AdminState, snapshot: &Snapshot) -> String {
    let status = admin.status(snapshot);
    let mut out = String::new();
    let _ = write!(
        out,
        "# Server\r\nbraid_version:{}\r\nregion:{}\r\nnode_id:{}\r\ndurability:{}\r\n\r\n",
        env!("CARGO_PKG_VERSION"),
        status.region,
        status.node,
        status.durability
    );
    let _ = write!(
        out,
        "# Replication\r\nrole:active\r\nconnected_peers:{}\r\n",
        status
            .peers
            .iter()
            .filter(|p| p.state == "connected")
            .count()
    );
    for (i, peer) in status.peers.iter().enumerate() {
        let _ = write!(
            out,
            "peer{i}:region={},id={},state={},lag_events={},lag_ms={}\r\n",
            peer.region,
            peer.id,
            peer.state,
            peer.lag_events,
            peer.lag_ms.map_or("-".to_string(), |l| l.to_string())
        );
    }
    let vector: Vec<String> = status
        .vector
        .iter()
        .map(|(r, s)| format!("{r}={s}"))
        .collect();
    let _ = write!(out, "vector:{}\r\n\r\n", vector.join(","));
    let _ = write!(
        out,
        "# Stats\r\nwrites:{}\r\nconflicts_resolved:{}\r\nheld_events:{}\r\n",
        status.writes, status.conflicts_resolved, status.held_events
    );
    out
}
