//! HTTP admin: `GET /health`, `GET /status` (JSON), `GET /lag` (histograms), `GET /metrics`
//! (Prometheus text), `POST /topology` (new links, committed by the control plane), `POST
//! /keyspace` (a keyspace's writer regions, committed by the control plane), `POST /leave` (this
//! region drains and leaves the mesh), and
//! `GET`/`POST /faults` (fault injection for drills; refused unless the configuration enables
//! it).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use braid_protocol::NodeId;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::driver::{now_ms, Input, Snapshot};
use crate::transport::Directory;

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The driver's inputs.
    pub inputs: mpsc::Sender<Input>,
    /// This node.
    pub node: NodeId,
    /// This node's region name.
    pub region: String,
    /// The peers this node knows (names and traffic counters).
    pub peers: Arc<Directory>,
    /// Durability mode, for display.
    pub durability: &'static str,
    /// Injected faults.
    pub faults: Arc<crate::faults::Faults>,
    /// The control plane.
    pub control: Option<crate::control::plane::ControlPlane>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("region", &self.region)
            .finish()
    }
}

/// `GET /status`, and what `braid status` prints.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    /// This node's id.
    pub node: u64,
    /// This node's region.
    pub region: String,
    /// Durability mode.
    pub durability: String,
    /// HLC high-water mark, as `wall_ms.logical`.
    pub hlc: String,
    /// Per origin region: highest seq applied contiguously.
    pub vector: BTreeMap<String, u64>,
    /// Local writes since start.
    pub writes: u64,
    /// Last-writer-wins conflicts resolved here since start.
    pub conflicts_resolved: u64,
    /// Events held ahead of a gap.
    pub held_events: usize,
    /// Events dropped since start because the hold buffer was full (fetched again once the
    /// gap before them is filled: a count that keeps growing means a region far behind).
    #[serde(default)]
    pub held_dropped: u64,
    /// Events in the change log (every applied event not yet garbage-collected).
    pub change_log_events: u64,
    /// Per origin region, what the change log was garbage-collected through.
    #[serde(default)]
    pub change_log_trimmed: BTreeMap<String, u64>,
    /// Change-log events garbage-collected since start.
    #[serde(default)]
    pub change_log_events_trimmed: u64,
    /// Subscriptions refused since start because they asked for garbage-collected events (the
    /// subscriber needs a snapshot).
    #[serde(default)]
    pub subscriptions_refused_behind: u64,
    /// Of the change-log events garbage-collected, those the retention bounds deleted beyond
    /// the stable frontier (some region may lack them and need a snapshot).
    #[serde(default)]
    pub change_log_events_retention_trimmed: u64,
    /// Data snapshots installed since start (a join, or a resynchronisation after falling
    /// behind the others' logs).
    #[serde(default)]
    pub snapshots_installed: u64,
    /// Whether client writes are refused (`TRYAGAIN`) until this region's own writes it may
    /// have lost in a restart came back from its peers.
    #[serde(default)]
    pub recovering: bool,
    /// The stable HLC this node's garbage collection last worked to, as `wall_ms.logical`
    /// (null: none yet).
    #[serde(default)]
    pub gc_stable_hlc: Option<String>,
    /// Keys whose tombstones were dropped at the stable HLC since start.
    #[serde(default)]
    pub tombstones_collected: u64,
    /// Keys forgotten since start: nothing but tombstones was left of them.
    #[serde(default)]
    pub keys_forgotten: u64,
    /// Each neighbor.
    pub peers: Vec<PeerStatus>,
    /// The control plane: `leader`, `term`, `raft_role`, `members`, `stable_frontier` (at the
    /// top level of the document).
    #[serde(flatten)]
    pub control: crate::control::plane::ControlStatus,
}

/// One neighbor in `/status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PeerStatus {
    /// Its node id.
    pub id: u64,
    /// Its region.
    pub region: String,
    /// `connected` when both streams are open, `partial` with one, `disconnected` with none.
    pub state: String,
    /// Regions whose events are pulled from this peer.
    pub pulling: Vec<String>,
    /// Its vector, as it last reported.
    pub vector: BTreeMap<String, u64>,
    /// Its own events not yet applied here.
    pub lag_events: u64,
    /// Delay of the latest of its events applied here, origin commit to local apply.
    pub lag_ms: Option<u64>,
    /// Median and 99th percentile of that delay since start.
    pub lag_ms_p50: Option<u64>,
    /// 99th percentile.
    pub lag_ms_p99: Option<u64>,
    /// Events sent to it.
    pub events_sent: u64,
    /// Events received from it.
    pub events_received: u64,
    /// Events received from it and applied.
    pub events_applied: u64,
    /// Events received from it and dropped as duplicates (or echoes).
    pub events_duplicate: u64,
    /// Events received from it with an HLC further ahead of this node's clock than
    /// `clock-skew-ms-max`: refused, and fetched again once the clock has caught up. Their
    /// origin's replication waits meanwhile.
    #[serde(default)]
    pub events_clock_refused: u64,
    /// Bytes sent to it.
    pub bytes_sent: u64,
    /// Bytes received from it.
    pub bytes_received: u64,
    /// Batches sent to it.
    #[serde(default)]
    pub batches_sent: u64,
    /// Frames to the peer dropped by an injected fault (drills only).
    #[serde(default)]
    pub frames_dropped: u64,
    /// Streams from or to it refused since start (a bad handshake or frame, another cluster):
    /// a peer that keeps being refused replicates nothing.
    #[serde(default)]
    pub streams_refused: u64,
}

/// `GET /lag`: every replication-lag histogram of a node, so tools can merge and subtract them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LagHistograms {
    /// The node's region.
    pub region: String,
    /// Per origin region: the recorded values in milliseconds and how often each was recorded
    /// (equivalent values grouped as the histogram stores them), ascending.
    pub origins: BTreeMap<String, Vec<(u64, u64)>>,
}

impl AdminState {
    /// This node's peers by id (every region but this node's own).
    fn peers(&self) -> BTreeMap<NodeId, String> {
        self.peers
            .entries()
            .into_iter()
            .map(|(id, entry)| (id, entry.region))
            .collect()
    }

    /// The regions a fault may name: the peers, and members removed since they were peers.
    fn fault_peers(&self) -> BTreeMap<NodeId, String> {
        let mut peers = self.peers();
        if let Some(state) = self.control.as_ref().and_then(|c| c.state()) {
            with_removed(&mut peers, state.members(), self.node);
        }
        peers
    }

    fn region(&self, node: NodeId) -> String {
        if node == self.node {
            return self.region.clone();
        }
        self.peers
            .region(node)
            .or_else(|| {
                let state = self.control.as_ref()?.state()?;
                state.member(node).map(|m| m.region.clone())
            })
            .unwrap_or_else(|| node.to_string())
    }

    async fn snapshot(&self) -> Option<Snapshot> {
        let (reply, rx) = oneshot::channel();
        self.inputs.send(Input::Status { reply }).await.ok()?;
        rx.await.ok()
    }

    /// Builds the status document from a snapshot.
    pub fn status(&self, snapshot: &Snapshot) -> Status {
        let named = |v: &braid_protocol::VersionVector| -> BTreeMap<String, u64> {
            v.iter().map(|(n, s)| (self.region(n), s.0)).collect()
        };
        let control = self
            .control
            .as_ref()
            .map(|c| c.status())
            .unwrap_or_default();
        let mut peers = Vec::new();
        for (peer, state) in &snapshot.peers {
            let counters = snapshot.stats.peers.get(peer).cloned().unwrap_or_default();
            let traffic = self.peers.traffic(*peer);
            let traffic = traffic.as_deref();
            let theirs = state.vector.as_ref().map(|v| v.get(*peer).0).unwrap_or(0);
            let origin = snapshot.stats.origins.get(peer);
            let histogram = origin.map(|o| &o.lag_ms);
            peers.push(PeerStatus {
                id: peer.0,
                region: self.region(*peer),
                state: match (state.subscribed, state.feed) {
                    (true, true) => "connected",
                    (false, false) => "disconnected",
                    _ => "partial",
                }
                .into(),
                pulling: state.origins.iter().map(|o| self.region(*o)).collect(),
                vector: state.vector.as_ref().map(named).unwrap_or_default(),
                lag_events: theirs.saturating_sub(snapshot.vector.get(*peer).0),
                lag_ms: origin.map(|o| o.lag_ms_last),
                lag_ms_p50: histogram.map(|h| h.value_at_quantile(0.5)),
                lag_ms_p99: histogram.map(|h| h.value_at_quantile(0.99)),
                events_sent: counters.events_sent,
                events_received: counters.events_received,
                events_applied: counters.events_applied,
                events_duplicate: counters.events_duplicate,
                events_clock_refused: counters.events_clock_refused,
                bytes_sent: traffic.map_or(0, |t| t.bytes_sent.load(Ordering::Relaxed)),
                bytes_received: traffic.map_or(0, |t| t.bytes_received.load(Ordering::Relaxed)),
                batches_sent: counters.batches_sent,
                frames_dropped: traffic.map_or(0, |t| t.frames_dropped.load(Ordering::Relaxed)),
                streams_refused: traffic.map_or(0, |t| t.streams_refused.load(Ordering::Relaxed)),
            });
        }
        Status {
            node: snapshot.node.0,
            region: self.region(snapshot.node),
            durability: self.durability.into(),
            hlc: format!("{}.{}", snapshot.hlc.wall_ms, snapshot.hlc.logical),
            vector: named(&snapshot.vector),
            writes: snapshot.stats.writes,
            conflicts_resolved: snapshot.stats.conflicts_lww,
            held_events: snapshot.held_events,
            held_dropped: snapshot.stats.held_dropped,
            change_log_events: snapshot.log_events,
            change_log_trimmed: named(&snapshot.trimmed),
            change_log_events_trimmed: snapshot.stats.log_events_trimmed,
            subscriptions_refused_behind: snapshot.stats.subscriptions_behind,
            change_log_events_retention_trimmed: snapshot.stats.log_events_retention_trimmed,
            snapshots_installed: snapshot.stats.snapshots_installed,
            recovering: snapshot.recovering,
            gc_stable_hlc: (snapshot.stable_hlc > braid_conflict::Hlc::ZERO)
                .then(|| crate::control::plane::hlc_text(snapshot.stable_hlc)),
            tombstones_collected: snapshot.stats.tombstones_collected,
            keys_forgotten: snapshot.stats.keys_forgotten,
            peers,
            control,
        }
    }

    /// The lag histograms of a snapshot.
    pub fn lag(&self, snapshot: &Snapshot) -> LagHistograms {
        LagHistograms {
            region: self.region(snapshot.node),
            origins: snapshot
                .stats
                .origins
                .iter()
                .map(|(origin, stats)| {
                    let values = stats
                        .lag_ms
                        .iter_recorded()
                        .map(|v| (v.value_iterated_to(), v.count_at_value()))
                        .collect();
                    (self.region(*origin), values)
                })
                .collect(),
        }
    }

    /// The Prometheus text exposition of a snapshot.
    pub fn metrics(&self, snapshot: &Snapshot) -> String {
        let status = self.status(snapshot);
        let mut out = String::new();
        let region = &label(&status.region);
        let _ = writeln!(
            out,
            "# HELP braid_writes_total Local writes committed.\n# TYPE braid_writes_total counter"
        );
        let _ = writeln!(
            out,
            "braid_writes_total{{region=\"{region}\"}} {}",
            status.writes
        );
        type Counter = (&'static str, &'static str, fn(&PeerStatus) -> u64);
        let peer_counters: [Counter; 8] = [
            ("braid_events_sent_total", "Events sent to a peer.", |p| {
                p.events_sent
            }),
            (
                "braid_events_received_total",
                "Events received from a peer.",
                |p| p.events_received,
            ),
            (
                "braid_events_applied_total",
                "Events received from a peer and applied.",
                |p| p.events_applied,
            ),
            (
                "braid_events_duplicate_total",
                "Events received from a peer and dropped as duplicates or echoes.",
                |p| p.events_duplicate,
            ),
            (
                "braid_events_clock_refused_total",
                "Events received from a peer with an HLC too far ahead of this node's clock, refused until it catches up.",
                |p| p.events_clock_refused,
            ),
            ("braid_bytes_sent_total", "Bytes sent to a peer.", |p| {
                p.bytes_sent
            }),
            (
                "braid_bytes_received_total",
                "Bytes received from a peer.",
                |p| p.bytes_received,
            ),
            (
                "braid_streams_refused_total",
                "Streams from or to a peer refused: a bad handshake or frame, another cluster.",
                |p| p.streams_refused,
            ),
        ];
        for (name, help, value) in peer_counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for peer in &status.peers {
                let _ = writeln!(
                    out,
                    "{name}{{region=\"{region}\",peer=\"{}\"}} {}",
                    label(&peer.region),
                    value(peer)
                );
            }
        }
        let _ = writeln!(out, "# HELP braid_events_applied_by_origin_total Events applied here, by origin region.\n# TYPE braid_events_applied_by_origin_total counter");
        for (origin, stats) in &snapshot.stats.origins {
            let _ = writeln!(
                out,
                "braid_events_applied_by_origin_total{{region=\"{region}\",origin=\"{}\"}} {}",
                label(&self.region(*origin)),
                stats.applied
            );
        }
        let _ = writeln!(out, "# HELP braid_conflicts_resolved_total Last-writer-wins conflicts resolved here.\n# TYPE braid_conflicts_resolved_total counter\nbraid_conflicts_resolved_total{{region=\"{region}\"}} {}", status.conflicts_resolved);
        let _ = writeln!(out, "# HELP braid_lag_events Events of a peer not yet applied here.\n# TYPE braid_lag_events gauge");
        for peer in &status.peers {
            let _ = writeln!(
                out,
                "braid_lag_events{{region=\"{region}\",peer=\"{}\"}} {}",
                label(&peer.region),
                peer.lag_events
            );
        }
        let _ = writeln!(out, "# HELP braid_replication_lag_ms Milliseconds from an event's commit at its origin to its apply here.\n# TYPE braid_replication_lag_ms summary");
        for (origin, stats) in &snapshot.stats.origins {
            let origin = label(&self.region(*origin)).into_owned();
            let histogram = &stats.lag_ms;
            for q in [0.5, 0.9, 0.99, 0.999] {
                let _ = writeln!(out, "braid_replication_lag_ms{{region=\"{region}\",origin=\"{origin}\",quantile=\"{q}\"}} {}", histogram.value_at_quantile(q));
            }
            let sum = histogram.mean() * histogram.len() as f64;
            let _ = writeln!(
                out,
                "braid_replication_lag_ms_sum{{region=\"{region}\",origin=\"{origin}\"}} {sum:.0}"
            );
            let _ = writeln!(
                out,
                "braid_replication_lag_ms_count{{region=\"{region}\",origin=\"{origin}\"}} {}",
                histogram.len()
            );
        }
        let _ = writeln!(out, "# HELP braid_change_log_events Events in the change log.\n# TYPE braid_change_log_events gauge\nbraid_change_log_events{{region=\"{region}\"}} {}", status.change_log_events);
        let _ = writeln!(out, "# HELP braid_change_log_events_trimmed_total Change-log events deleted: below the stable frontier, or by the retention bounds.\n# TYPE braid_change_log_events_trimmed_total counter\nbraid_change_log_events_trimmed_total{{region=\"{region}\"}} {}", status.change_log_events_trimmed);
        let _ = writeln!(out, "# HELP braid_events_held_dropped_total Events dropped because the hold buffer for events ahead of a gap was full.\n# TYPE braid_events_held_dropped_total counter\nbraid_events_held_dropped_total{{region=\"{region}\"}} {}", status.held_dropped);
        let _ = writeln!(out, "# HELP braid_tombstones_collected_total Keys whose tombstones were dropped at the stable HLC.\n# TYPE braid_tombstones_collected_total counter\nbraid_tombstones_collected_total{{region=\"{region}\"}} {}", status.tombstones_collected);
        let _ = writeln!(out, "# HELP braid_up 1: the node answers.\n# TYPE braid_up gauge\nbraid_up{{region=\"{region}\"}} 1");
        let _ = writeln!(out, "# HELP braid_scrape_time_seconds Seconds since the Unix epoch at scrape time, by the node's clock.\n# TYPE braid_scrape_time_seconds gauge\nbraid_scrape_time_seconds{{region=\"{region}\"}} {:.3}", now_ms() as f64 / 1000.0);
        out
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped, as the text format
/// asks. Region names are checked where they are made (`braid init`, `add-region`, `POST
/// /join`), but a configuration written by hand may still hold any name.
fn label(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return value.into();
    }
    let mut escaped = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped.into()
}

/// `ok`, or 503 with the reason when the control plane has stopped for good; with the node's
/// pid, which a tool that started the node checks (an answer from another process on the same
/// port is not its node's). Answered without the driver, however busy it is.
async fn health(State(state): State<AdminState>) -> Response {
    let pid = std::process::id();
    match state.control.as_ref().and_then(|control| control.fatal()) {
        None => Json(serde_json::json!({ "status": "ok", "pid": pid })).into_response(),
        Some(fatal) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                serde_json::json!({ "status": "control plane stopped", "error": fatal, "pid": pid }),
            ),
        )
            .into_response(),
    }
}

async fn status(State(state): State<AdminState>) -> Response {
    match state.snapshot().await {
        Some(snapshot) => Json(state.status(&snapshot)).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "the node is stopping").into_response(),
    }
}

async fn lag(State(state): State<AdminState>) -> Response {
    match state.snapshot().await {
        Some(snapshot) => Json(state.lag(&snapshot)).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "the node is stopping").into_response(),
    }
}

/// Adds the removed members among `members` to `peers` (but `me`, and any whose region name a
/// peer holds now): a drill's faults name a region that is leaving until it sees it gone, a
/// little after every node dropped it. A fault on a removed member changes nothing.
fn with_removed<'a>(
    peers: &mut BTreeMap<NodeId, String>,
    members: impl Iterator<Item = &'a braid_protocol::control::Member>,
    me: NodeId,
) {
    for member in members {
        let removed = member.state == braid_protocol::control::MemberState::Removed;
        if removed && member.id != me && !peers.values().any(|name| *name == member.region) {
            peers.insert(member.id, member.region.clone());
        }
    }
}

async fn get_faults(State(state): State<AdminState>) -> Response {
    if !state.faults.enabled() {
        let err = crate::faults::FaultError::Disabled;
        return (StatusCode::FORBIDDEN, err.to_string()).into_response();
    }
    Json(state.faults.get(&state.fault_peers())).into_response()
}

async fn set_faults(
    State(state): State<AdminState>,
    request: JsonBody<crate::faults::FaultSet>,
) -> Result<Response, Refusal> {
    use crate::faults::FaultError;
    if !state.faults.enabled() {
        let err = FaultError::Disabled;
        return Err(Refusal(StatusCode::FORBIDDEN, err.to_string()));
    }
    let request = body(request)?;
    let peers = state.fault_peers();
    Ok(match state.faults.set(&request, &peers) {
        Ok(()) => {
            tracing::warn!(faults = ?request, "injected faults set");
            Json(state.faults.get(&peers)).into_response()
        }
        Err(err @ FaultError::Disabled) => (StatusCode::FORBIDDEN, err.to_string()).into_response(),
        Err(err) => (StatusCode::BAD_REQUEST, err.to_string()).into_response(),
    })
}

/// `POST /topology`: `{"links": [["a", "b"], ...]}` for these links only, or `{"links": null}`
/// for a full mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyRequest {
    /// Links by region name; none for a full mesh.
    pub links: Option<Vec<[String; 2]>>,
}

/// `POST /keyspace`: `{"prefix": "orders:", "writers": ["a", "b"]}` makes regions a and b the
/// only ones that take client writes to keys beginning with `orders:` (`[]` freezes the
/// keyspace); `{"prefix": "orders:", "writers": null}` drops its options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyspaceRequest {
    /// The keyspace's key prefix.
    pub prefix: String,
    /// Its writer regions by name; none to drop its options.
    pub writers: Option<Vec<String>>,
}

/// Links named in one request, at most: a mesh of the 64 members the control plane admits.
const TOPOLOGY_LINKS_MAX: usize = 64 * 63 / 2;

/// A JSON request body, or why it is not one.
type JsonBody<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

/// A request refused before it reached the control plane: a status and why.
#[derive(Debug)]
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

/// The request's body, or a 400 answer (415 without a JSON content type: what a web page's
/// plain form cannot send, so that no page a browser opens can post to the admin API).
fn body<T>(request: JsonBody<T>) -> Result<T, Refusal> {
    use axum::extract::rejection::JsonRejection;
    match request {
        Ok(Json(request)) => Ok(request),
        Err(rejection @ JsonRejection::MissingJsonContentType(_)) => Err(Refusal(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            rejection.body_text(),
        )),
        // Too large (413), or cut short: the body's own status.
        Err(rejection @ JsonRejection::BytesRejection(_)) => {
            Err(Refusal(rejection.status(), rejection.body_text()))
        }
        Err(rejection) => Err(Refusal(StatusCode::BAD_REQUEST, rejection.body_text())),
    }
}

/// The node's control plane, or a 503 answer.
fn control_of(state: &AdminState) -> Result<&crate::control::plane::ControlPlane, Refusal> {
    state.control.as_ref().ok_or_else(|| {
        let text = "this node runs no control plane".to_string();
        Refusal(StatusCode::SERVICE_UNAVAILABLE, text)
    })
}

/// The answer to a control-plane change: `applied()` once committed, 409 with the reason when
/// the state refused it, 400 for a request naming what is not there, 503 when no leader
/// committed it.
fn answer(
    result: Result<crate::control::ControlReply, crate::control::plane::ControlPlaneError>,
    applied: impl FnOnce() -> Response,
) -> Response {
    use crate::control::plane::ControlPlaneError;
    use crate::control::ControlReply;
    match result {
        Ok(ControlReply::Refused(why)) => (StatusCode::CONFLICT, why).into_response(),
        Ok(_) => applied(),
        Err(err @ ControlPlaneError::Invalid(_)) => {
            (StatusCode::BAD_REQUEST, err.to_string()).into_response()
        }
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err.to_string()).into_response(),
    }
}

fn result(text: &'static str) -> impl FnOnce() -> Response {
    move || Json(serde_json::json!({ "result": text })).into_response()
}

async fn set_topology(
    State(state): State<AdminState>,
    request: JsonBody<TopologyRequest>,
) -> Result<Response, Refusal> {
    let request = body(request)?;
    if request
        .links
        .as_ref()
        .is_some_and(|l| l.len() > TOPOLOGY_LINKS_MAX)
    {
        let text = format!("at most {TOPOLOGY_LINKS_MAX} links");
        return Err(Refusal(StatusCode::BAD_REQUEST, text));
    }
    let control = control_of(&state)?;
    Ok(answer(
        control.set_topology(request.links).await,
        result("committed"),
    ))
}

async fn set_keyspace(
    State(state): State<AdminState>,
    request: JsonBody<KeyspaceRequest>,
) -> Result<Response, Refusal> {
    let request = body(request)?;
    // Checked here as the control plane checks it, so that a bad prefix is a bad request (and
    // never reaches the Raft log).
    let prefix_max = braid_protocol::control::KEYSPACE_PREFIX_BYTES_MAX;
    if request.prefix.is_empty() || request.prefix.len() > prefix_max {
        let text = format!("a keyspace prefix must be 1 to {prefix_max} bytes long");
        return Err(Refusal(StatusCode::BAD_REQUEST, text));
    }
    let named = request.writers.as_ref().map_or(0, Vec::len);
    if named > braid_protocol::control::MEMBERS_MAX {
        let text = format!("at most {} writers", braid_protocol::control::MEMBERS_MAX);
        return Err(Refusal(StatusCode::BAD_REQUEST, text));
    }
    let control = control_of(&state)?;
    Ok(answer(
        control.set_keyspace(request.prefix, request.writers).await,
        result("committed"),
    ))
}

/// `POST /leave`: `{}` (a JSON body, empty: a web page cannot post one without the browser
/// asking the node first, which it refuses).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaveRequest {}

async fn leave(
    State(state): State<AdminState>,
    request: JsonBody<LeaveRequest>,
) -> Result<Response, Refusal> {
    body(request)?;
    let control = control_of(&state)?;
    let reply = control.leave().await;
    if matches!(reply, Ok(crate::control::ControlReply::Applied)) {
        // Writes are refused from the moment the drain is committed, before the answer says
        // so: the control plane's upkeep would tell the driver only at its next round, and
        // the region would take writes after `braid leave` told its user it takes none.
        let _ = state.inputs.send(Input::Leaving).await;
    }
    Ok(answer(reply, result("draining")))
}

/// `POST /join`: admits a new region (`braid join` sends it to any member).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The cluster the new region's configuration names (32 hex digits): a region of another
    /// cluster is refused before anything is committed.
    pub cluster_id: String,
    /// Its node id (the one its certificate names).
    pub id: u64,
    /// Its region name.
    pub region: String,
    /// Its QUIC address, for the other nodes.
    pub peer_address: String,
    /// Its RESP address.
    pub resp_address: String,
    /// Its HTTP admin address.
    pub http_address: String,
}

/// The answer to `POST /join`: who admitted the region, and every member it should know of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinReply {
    /// The member that answered (it serves the region's snapshot).
    pub node: u64,
    /// Its region name.
    pub region: String,
    /// Every member, the new one included, as `/status` lists them.
    pub members: Vec<crate::control::plane::MemberStatus>,
}

async fn join(
    State(state): State<AdminState>,
    request: JsonBody<JoinRequest>,
) -> Result<Response, Refusal> {
    let request = body(request)?;
    let control = control_of(&state)?;
    Ok(answer(control.join(&request).await, || {
        Json(JoinReply {
            node: state.node.0,
            region: state.region.clone(),
            members: control.status().members,
        })
        .into_response()
    }))
}

/// `POST /remove`: `{"region": "d"}` removes a member that is gone for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveRequest {
    /// The region to remove.
    pub region: String,
}

async fn remove(
    State(state): State<AdminState>,
    request: JsonBody<RemoveRequest>,
) -> Result<Response, Refusal> {
    let request = body(request)?;
    let control = control_of(&state)?;
    Ok(answer(
        control.remove(&request.region).await,
        result("removed"),
    ))
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match state.snapshot().await {
        Some(snapshot) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            state.metrics(&snapshot),
        )
            .into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "the node is stopping").into_response(),
    }
}

/// Refuses a request that changes something (any method but GET and HEAD) unless its `Host`
/// is an IP address or `localhost`: a web page whose own name an attacker points at the node
/// (DNS rebinding) is same-origin to the browser, and could post JSON; its `Host` is that
/// name. Reads answer whatever the name (scrapers use names).
async fn refuse_foreign_hosts(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::Method;
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host_is_address(host) {
        let text = format!(
            "the admin API takes changes only through an IP address or localhost, not {host:?}"
        );
        return (StatusCode::FORBIDDEN, text).into_response();
    }
    next.run(request).await
}

/// Whether a `Host` header names an IP address or `localhost`, with or without a port.
fn host_is_address(host: &str) -> bool {
    // [v6]:port, [v6], v4:port, v4, name:port, name.
    let name = match host.strip_prefix('[') {
        Some(rest) => {
            return rest
                .split_once(']')
                .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// HTTP connections served at once; more wait in the listen backlog until one ends. Each
/// `/status` or `/metrics` request also waits on the driver's input queue: a bound here keeps
/// scrapers from filling it.
pub const HTTP_CONNECTIONS_MAX: usize = 64;

/// How long a client has to send a request's headers once it connected, or once its last
/// request was answered: an idle or slow connection is closed, and frees its place.
pub const HTTP_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection is kept at most; then it is closed once its request in flight, if
/// any, is answered (a client connects again).
pub const HTTP_CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// How long a connection being closed has to finish its request in flight (a body sent, or an
/// answer read, too slowly): then it is dropped.
pub const HTTP_CLOSE_GRACE: Duration = Duration::from_secs(30);

/// Serves the admin API until shutdown.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/lag", get(lag))
        .route("/faults", get(get_faults).post(set_faults))
        .route("/topology", axum::routing::post(set_topology))
        .route("/keyspace", axum::routing::post(set_keyspace))
        .route("/leave", axum::routing::post(leave))
        .route("/join", axum::routing::post(join))
        .route("/remove", axum::routing::post(remove))
        .layer(axum::middleware::from_fn(refuse_foreign_hosts))
        .with_state(state);
    let places = Arc::new(tokio::sync::Semaphore::new(HTTP_CONNECTIONS_MAX));
    loop {
        let place = tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            place = places.clone().acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => return Ok(()),
            },
        };
        let (stream, remote) = tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors, most likely: try again shortly.
                    tracing::warn!(error = %err, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _place = place;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HTTP_HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            // First the lifetime, then the grace a closing connection has: past it, dropped.
            let deadline = tokio::time::sleep(HTTP_CONNECTION_LIFETIME);
            tokio::pin!(deadline);
            let mut closing = false;
            loop {
                tokio::select! {
                    outcome = connection.as_mut() => {
                        if let Err(err) = outcome {
                            tracing::debug!(%remote, error = %err, "HTTP connection ended");
                        }
                        return;
                    }
                    _ = &mut deadline => {
                        if closing {
                            tracing::debug!(%remote, "HTTP connection dropped: too slow to close");
                            return;
                        }
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                        deadline.as_mut().reset(tokio::time::Instant::now() + HTTP_CLOSE_GRACE);
                    }
                    _ = shutdown.changed(), if !closing => {
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                        deadline.as_mut().reset(tokio::time::Instant::now() + HTTP_CLOSE_GRACE);
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_taken_only_through_an_address_or_localhost() {
        for host in [
            "127.0.0.1:7001",
            "10.0.0.5",
            "[::1]:7001",
            "[fe80::1]",
            "localhost:7001",
            "LOCALHOST",
        ] {
            assert!(host_is_address(host), "{host}");
        }
        for host in [
            "evil.example:7001",
            "evil.example",
            "",
            "[evil]:1",
            "127.0.0.1.evil:1",
        ] {
            assert!(!host_is_address(host), "{host}");
        }
    }

    #[test]
    fn faults_may_name_removed_members_but_not_over_a_peer() {
        use braid_protocol::control::{Member, MemberState};
        let member = |id: u64, region: &str, state: MemberState| Member {
            id: NodeId(id),
            region: region.into(),
            peer_address: String::new(),
            resp_address: String::new(),
            http_address: String::new(),
            state,
        };
        let members = [
            member(1, "a", MemberState::Active),
            member(2, "b", MemberState::Removed),
            member(3, "c", MemberState::Removed),
            member(4, "c", MemberState::Active),
            member(5, "d", MemberState::Draining),
            member(6, "e", MemberState::Removed),
        ];
        let mut peers = BTreeMap::from([(NodeId(4), "c".to_string())]);
        with_removed(&mut peers, members.iter(), NodeId(6));
        // b, removed, is named; c is the peer, not the removed member of that name; neither
        // this node (e) nor a member that is not removed is added.
        assert_eq!(
            peers,
            BTreeMap::from([(NodeId(2), "b".to_string()), (NodeId(4), "c".to_string())])
        );
    }

    #[test]
    fn label_values_are_escaped_as_the_text_format_asks() {
        assert_eq!(label("us-east"), "us-east");
        assert_eq!(label("a\"} 1\nb\\c"), "a\\\"} 1\\nb\\\\c");
    }
}
