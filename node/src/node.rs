//! One node, assembled: storage, replica, driver, QUIC transport, the control plane's Raft, RESP
//! and HTTP servers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use braid_protocol::{NodeId, Replica, ReplicaConfig, VersionVector};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::config::NodeConfig;
use crate::control::plane::{bootstrap_command, ControlPlane, ControlPlaneError};
use crate::driver::{now_ms, Driver, Snapshot, INPUT_QUEUE_MAX};
use crate::faults::Faults;
use crate::http::{self, AdminState};
use crate::resp::{self, RespContext};
use crate::snapshot::{self, FetchProgress};
use crate::storage::{Durability, Identity, RocksStorage};
use crate::tls::MeshTls;
use crate::transport::{Directory, Mesh};
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
    /// The data directory could not be created.
    #[error("cannot create the data directory {}: {source}", path.display())]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
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

/// Marks a data directory whose region entered a running mesh through `braid join`: it never
/// initializes a Raft group of its own, whatever its configuration lists.
pub const JOINED_MARKER: &str = "JOINED";

/// Marks a data directory whose data snapshot is not completely installed yet: the region
/// cannot start until `braid join` has fetched one again.
pub const SNAPSHOT_PENDING_MARKER: &str = "SNAPSHOT_PENDING";

/// Snapshot fetches tried before a join gives up, each from the next member in turn.
const SNAPSHOT_ATTEMPTS_MAX: usize = 10;

/// Pause between snapshot fetches.
const SNAPSHOT_RETRY_MS: u64 = 1_000;

/// How a new region enters a running mesh (`braid join`): the member that admitted it, and
/// every member it was told of.
pub struct JoinPlan {
    /// The member that admitted it: the snapshot is fetched from it first.
    pub via: NodeId,
    /// The members when it was admitted (the new one too): id, region name, QUIC address.
    pub members: Vec<(NodeId, String, SocketAddr)>,
    /// The active members, which may serve the snapshot after `via` (a member still joining
    /// may not hold everything yet).
    pub sources: Vec<NodeId>,
    /// Told how the snapshot is coming along.
    pub progress: Box<dyn FnMut(&FetchProgress) + Send>,
}

impl std::fmt::Debug for JoinPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinPlan")
            .field("via", &self.via)
            .field("members", &self.members)
            .finish()
    }
}

/// Runs a node until `shutdown` turns true. Returns an error if it cannot start, or if storage
/// fails while it runs.
pub async fn run(config: NodeConfig, shutdown: watch::Receiver<bool>) -> Result<(), NodeError> {
    run_node(config, None, shutdown).await
}

/// Runs a new region that was just admitted to a running mesh (`POST /join` on a member): it
/// joins the Raft group as a learner, fetches and installs a data snapshot, then runs as any
/// node does, and becomes active once its first checkpoint is committed. Later starts are
/// plain [`run`]s.
pub async fn join(
    config: NodeConfig,
    plan: JoinPlan,
    shutdown: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    run_node(config, Some(plan), shutdown).await
}

/// Written when this node was removed from the mesh: it left, its control plane learned it was
/// removed, or a peer told it so (see `Mesh::told_removed`).
pub const REMOVED_MARKER: &str = "REMOVED";

/// Why a removed region does not start.
fn removed_error(config: &NodeConfig) -> NodeError {
    NodeError::Task(format!(
        "region {} (node {}) was removed from the mesh, and a removed node's id is never used \
         again: to bring a region back, give it a new id and an empty data directory and join it \
         (with a local cluster: `braid add-region --dir DIR --region NEW_NAME`, then `braid \
         join`)",
        config.region,
        config.node()
    ))
}

fn marker_error(path: &std::path::Path, source: std::io::Error) -> NodeError {
    NodeError::Task(format!("cannot write {}: {source}", path.display()))
}

/// Creates (`present`) or removes a marker file, durably: the file and its directory synced,
/// so that a power loss right after cannot undo it.
fn set_marker(path: &std::path::Path, present: bool) -> Result<(), NodeError> {
    let done = if present {
        std::fs::File::create(path).and_then(|file| file.sync_all())
    } else {
        std::fs::remove_file(path)
    };
    done.and_then(|()| match path.parent() {
        Some(dir) => std::fs::File::open(dir).and_then(|dir| dir.sync_all()),
        None => Ok(()),
    })
    .map_err(|e| marker_error(path, e))
}

async fn run_node(
    config: NodeConfig,
    mut plan: Option<JoinPlan>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let node = config.node();
    let cluster = config.cluster_id()?;
    let topology = config.topology()?;
    let tls = MeshTls::load(&config.tls.ca_cert, &config.tls.cert, &config.tls.key)?;
    crate::tls::check_own_certificate(&config.tls.cert, node)?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| NodeError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    if config.data_dir.join(REMOVED_MARKER).exists() {
        return Err(removed_error(&config));
    }
    let joined = config.data_dir.join(JOINED_MARKER);
    let pending = config.data_dir.join(SNAPSHOT_PENDING_MARKER);
    if plan.is_none() && pending.exists() {
        return Err(NodeError::Task(format!(
            "region {} has not finished joining (its data snapshot is incomplete): run `braid \
             join` for it again",
            config.region
        )));
    }
    if plan.is_some() {
        // Before anything else: from here on this node never starts a group of its own. (`braid
        // join` checked the directory is empty or this region's own.)
        set_marker(&joined, true)?;
        set_marker(&pending, true)?;
    }
    let initialize = !joined.exists();
    let storage = RocksStorage::open(&config.data_dir, config.durability)?;
    // A directory of another cluster or region is refused before anything is written to it.
    storage.claim(Identity { cluster, node })?;
    // After a run in `process` durability (any run in the last boot, whatever this one's), a
    // machine restart (a power loss) may have taken the tail of the write-ahead log, this
    // node's own last writes with it, which the peers may hold.
    // Marked in the database until the node took them back, so that a restart before then
    // (in the same boot) recovers too.
    let process = config.durability == Durability::Process;
    let possible_loss = match boot_id() {
        Some(id) => storage.note_boot(&id, process)?,
        None => {
            if process {
                // Nothing tells a machine restart from a process restart here: a power loss
                // would go unnoticed, and the peers would drop this region's next writes as
                // ones they hold already.
                warn!(
                    env = BOOT_ID_ENV,
                    "no boot id (neither {BOOT_ID_ENV} nor /proc/sys/kernel/random/boot_id): a \
                     power loss cannot be detected, and `process` durability may lose writes \
                     for good after one; use `machine` durability, or set {BOOT_ID_ENV}"
                );
            }
            storage.recovery_marked()?
        }
    };
    let reader = storage.clone();

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
    let invalid =
        |reason: String| NodeError::Task(format!("{}: {reason}", crate::faults::FAULTS_ENV));
    let mut peer_names: BTreeMap<NodeId, String> = config
        .peers
        .iter()
        .map(|p| (NodeId(p.id), p.region.clone()))
        .collect();
    // Set before the first frame when the configuration names every region it names; a
    // region that joined lists no peers, and its set waits for the committed members.
    let mut faults_unset = None;
    if let Some(text) = std::env::var_os(crate::faults::FAULTS_ENV) {
        let set: crate::faults::FaultSet =
            serde_json::from_str(&text.to_string_lossy()).map_err(|e| invalid(e.to_string()))?;
        match faults.set(&set, &peer_names) {
            Ok(()) => warn!(%node, faults = ?set, "injected faults set at start"),
            Err(crate::faults::FaultError::UnknownRegion(_)) => faults_unset = Some(set),
            Err(err) => return Err(invalid(err.to_string())),
        }
    }
    // The configuration's peers to begin with (a joining region: those it was told of); the
    // control plane keeps the directory equal to the committed members from then on.
    let known: Vec<(NodeId, String, SocketAddr)> = match &plan {
        Some(plan) => plan
            .members
            .iter()
            .filter(|(id, _, _)| *id != node)
            .cloned()
            .collect(),
        None => config
            .peers
            .iter()
            .map(|p| (NodeId(p.id), p.region.clone(), p.address))
            .collect(),
    };
    let mesh = Arc::new(Mesh {
        node,
        cluster,
        peers: Arc::new(Directory::new(known)),
        inputs: inputs.clone(),
        storage: storage.clone(),
        snapshot_serves: Arc::new(tokio::sync::Semaphore::new(snapshot::SERVES_MAX)),
        conn_ids: Arc::new(AtomicU64::new(0)),
        faults: faults.clone(),
        control: OnceLock::new(),
        connections: Arc::default(),
        told_removed: Arc::default(),
    });
    let control = ControlPlane::start(
        &control_dir(&config.data_dir),
        &config,
        mesh.clone(),
        endpoint.clone(),
        initialize,
    )
    .await?;
    match control.own_state() {
        Some(MemberState::Removed) => return Err(removed_error(&config)),
        // It was leaving when it stopped: it takes no writes (queued before any client's).
        Some(MemberState::Draining) => {
            let _ = inputs.send(crate::driver::Input::Leaving).await;
        }
        _ => {}
    }
    // Set once, here, before the accept loop starts: nothing else sets it.
    let _ = mesh.control.set(control.raft().clone());
    if let Some(set) = faults_unset {
        for member in control.state().iter().flat_map(|s| s.members()) {
            if member.id != node && member.state != MemberState::Removed {
                peer_names.insert(member.id, member.region.clone());
            }
        }
        faults
            .set(&set, &peer_names)
            .map_err(|e| invalid(e.to_string()))?;
        warn!(%node, faults = ?set, "injected faults set at start, once the members were known");
    }
    // The replica opens on the committed topology when the control plane holds one that names
    // this node: the configuration's links are only the cluster's first, and a region that
    // joined lists no peers at all. (A node that may have lost its own last writes must wait
    // for every neighbor it really has; with none, it would take writes at once.)
    let committed_topology = || {
        control
            .state()
            .and_then(|s| s.topology().ok())
            .filter(|t| t.contains(node))
    };
    let committed = committed_topology();
    if possible_loss && committed.is_none() && !initialize && topology.neighbors(node).is_empty() {
        // A region that joined: its configuration names no peer, so recovering on it would
        // end at once, and the region would write again with sequence numbers its peers hold.
        return Err(NodeError::Task(format!(
            "region {} may have lost its last writes in a machine restart and must wait for \
             its peers, but its control plane's committed state, which names them, did not \
             load: start it again",
            config.region
        )));
    }
    let opening = committed.unwrap_or_else(|| topology.clone());
    let (neighbors, neighbors_rx) = watch::channel(opening.neighbors(node));
    mesh.start(endpoint.clone(), neighbors_rx, shutdown.clone());
    let mut replica_config = ReplicaConfig::new(node);
    replica_config.clock_skew_ms_max = config.clock_skew_ms_max;
    if config.change_log_gc {
        replica_config.retention_events_max = config.change_log_retention_events;
        replica_config.retention_age_ms = config
            .change_log_retention_secs
            .map(|s| s.saturating_mul(1_000));
    }
    let mut replica = Replica::open(replica_config, opening, storage, now_ms())?;
    if possible_loss {
        warn!(
            vector = ?replica.vector(),
            "the machine restarted since this node ran in process durability, and its last \
             writes may be lost: client writes wait until every peer has said what it holds of \
             this region's events"
        );
        replica.handle_possible_loss();
    }
    if let Some(plan) = plan.as_mut() {
        // The Raft group reaches this node from now on (it is a learner); its data comes
        // first, before its driver runs, so that it subscribes from the snapshot's vector.
        let vector =
            install_snapshot(&mesh, &endpoint, plan, &mut replica, shutdown.clone()).await?;
        // The snapshot is on disk before the mark that it is incomplete goes.
        replica.storage().sync()?;
        set_marker(&pending, false)?;
        info!(%node, ?vector, "data snapshot installed: joining the mesh");
    }
    // A region that joined is admitted while it installs its snapshot: the committed topology
    // names it only by now.
    if let Some(topology) = committed_topology() {
        if let Err(err) = replica.handle_topology(topology, now_ms()) {
            warn!(error = %err, "committed topology not taken");
        }
    }
    // The committed keyspace rules, before any client is served (the control plane's upkeep
    // hands over later changes).
    if let Some(state) = control.state() {
        replica.handle_keyspaces(braid_protocol::control::Keyspaces::new(
            state.keyspaces().clone(),
        ));
    }
    let _ = neighbors.send(replica.topology().neighbors(node));
    let resync = spawn_resync(mesh.clone(), endpoint.clone(), inputs.clone());
    control.spawn_upkeep(
        bootstrap_command(&config),
        config.change_log_gc,
        inputs.clone(),
        shutdown.clone(),
    );

    let admin = AdminState {
        inputs: inputs.clone(),
        node,
        region: config.region.clone(),
        peers: mesh.peers.clone(),
        durability: config.durability.name(),
        faults: faults.clone(),
        control: Some(control),
    };
    let info_admin = admin.clone();
    let context = RespContext {
        inputs: inputs.clone(),
        storage: reader,
        password: config.password.as_deref().map(Arc::from),
        max_clients: resp::fit_open_files(config.max_clients),
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
        .with_resync(resync)
        .with_recovery_mark(possible_loss)
        .run(shutdown)
        .await;
    endpoint.close(quinn::VarInt::from_u32(0), b"node stopping");
    if let Err(err) = &result {
        crate::driver::log_fatal(err);
    }
    let removed = matches!(result, Ok(crate::driver::Ended::Removed));
    let marked = if removed || mesh.told_removed.load(std::sync::atomic::Ordering::SeqCst) {
        // A peer's word: its own control log may never say so (it was cut off when the removal
        // committed). The marker keeps it from starting again and taking writes no region
        // would receive, and tells `braid cluster up` (which reads no control log) to leave it.
        set_marker(&config.data_dir.join(REMOVED_MARKER), true)
    } else {
        Ok(())
    };
    // The run's own failure first: it is the cause.
    result?;
    marked?;
    Ok(())
}

async fn fetch_into_replica(
    mesh: &Mesh,
    endpoint: &quinn::Endpoint,
    from: NodeId,
    replica: &mut Replica<RocksStorage>,
    progress: impl FnMut(&FetchProgress),
) -> Result<VersionVector, snapshot::SnapshotError> {
    let ours = replica.vector().clone();
    let mut sink = snapshot::ReplicaSink(replica);
    snapshot::fetch(mesh, endpoint, from, ours, &mut sink, progress).await
}

/// Overrides the operating system's boot id (tests make a node believe the machine restarted).
pub const BOOT_ID_ENV: &str = "BRAID_BOOT_ID";

/// The id of the machine's current boot: `BRAID_BOOT_ID` if set, else Linux's
/// `/proc/sys/kernel/random/boot_id`; none where neither exists (no restart is then detected).
fn boot_id() -> Option<String> {
    if let Ok(id) = std::env::var(BOOT_ID_ENV) {
        return Some(id);
    }
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_string()).filter(|id| !id.is_empty())
}

/// Pause after a failed resynchronisation before another may start: doubling from 1 s to
/// 1 min.
const RESYNC_RETRY_MS_MIN: u64 = 1_000;
const RESYNC_RETRY_MS_MAX: u64 = 60_000;

/// Chunks of a resynchronisation between progress lines in the log.
const RESYNC_LOG_CHUNKS: u64 = 100;

/// Runs the resynchronisations the driver asks for (a peer refused this node as behind what
/// its log still holds): each fetches a data snapshot from that peer into the driver, one at a
/// time. A failed one is reported to the driver, which asks again at the next refusal.
fn spawn_resync(
    mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
    inputs: mpsc::Sender<crate::driver::Input>,
) -> mpsc::Sender<(NodeId, VersionVector)> {
    let (requests, mut asked) = mpsc::channel::<(NodeId, VersionVector)>(1);
    tokio::spawn(async move {
        let mut backoff_ms = RESYNC_RETRY_MS_MIN;
        while let Some((peer, ours)) = asked.recv().await {
            let mut sink = snapshot::DriverSink(inputs.clone());
            let mut chunks = 0u64;
            let progress = |p: &FetchProgress| {
                chunks += 1;
                if chunks.is_multiple_of(RESYNC_LOG_CHUNKS) {
                    info!(%peer, keys = p.keys, keys_estimate = p.keys_estimate, "resynchronising");
                }
            };
            match snapshot::fetch(&mesh, &endpoint, peer, ours, &mut sink, progress).await {
                Ok(vector) => {
                    backoff_ms = RESYNC_RETRY_MS_MIN;
                    info!(%peer, ?vector, "data snapshot installed");
                }
                Err(err) => {
                    warn!(%peer, error = %err, retry_ms = backoff_ms, "resynchronisation failed; it is tried again");
                    // Each attempt reads a whole database somewhere: back off before the driver
                    // may ask again.
                    tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                    backoff_ms = (backoff_ms * 2).min(RESYNC_RETRY_MS_MAX);
                    if inputs
                        .send(crate::driver::Input::ResyncFailed)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    requests
}

/// Fetches and installs a data snapshot for a joining region: from the member that admitted
/// it first, then from the others in turn, until one completes or the attempts run out.
async fn install_snapshot(
    mesh: &Mesh,
    endpoint: &quinn::Endpoint,
    plan: &mut JoinPlan,
    replica: &mut Replica<RocksStorage>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<VersionVector, NodeError> {
    let mut sources: Vec<NodeId> = vec![plan.via];
    sources.extend(
        plan.sources
            .iter()
            .copied()
            .filter(|id| *id != plan.via && *id != mesh.node),
    );
    let mut last = String::new();
    for attempt in 0..SNAPSHOT_ATTEMPTS_MAX {
        let from = sources[attempt % sources.len()];
        let fetched = tokio::select! {
            biased;
            _ = shutdown.changed() => {
                return Err(NodeError::Task("stopped before the data snapshot was installed".into()));
            }
            fetched = fetch_into_replica(mesh, endpoint, from, replica, &mut plan.progress) => fetched,
        };
        match fetched {
            Ok(vector) => return Ok(vector),
            Err(snapshot::SnapshotError::Storage(err)) => return Err(err.into()),
            Err(err) => {
                warn!(%from, attempt = attempt + 1, error = %err, "data snapshot failed; trying again");
                last = err.to_string();
            }
        }
        tokio::time::sleep(Duration::from_millis(SNAPSHOT_RETRY_MS)).await;
    }
    Err(NodeError::Task(format!(
        "no data snapshot after {SNAPSHOT_ATTEMPTS_MAX} attempts; the last: {last}"
    )))
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
