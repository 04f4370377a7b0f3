//! Harness for the end-to-end tests: real `braid` processes on loopback, a Redis client, the
//! admin API, and the oracle over every node's change log.
//!
//! Each test lays out its own cluster in a temporary directory, on ports it checks are free,
//! and every process it starts is killed when the test's [`Cluster`] is dropped.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use braid_conflict::{oracle, Value};
use braid_node::cluster::{self, ClusterFile, InitOptions};
use braid_node::config::NodeConfig;
use braid_node::http::Status;
use braid_node::storage::{Durability, RocksStorage};
use braid_protocol::{ChangeEvent, NodeId, Seq, Storage};
use bytes::Bytes;

/// Whether process `pid` runs (exists and is not a zombie waiting to be reaped).
pub fn running(pid: u32) -> bool {
    braid_node::launch::alive(pid) && !braid_node::launch::zombie(pid)
}

/// This crate's directory, read at run time (a build reused from another checkout would carry
/// a stale compile-time path).
pub fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The `braid` binary built by this workspace.
pub fn braid_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/braid
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("braid"));
    match bin {
        Some(bin) if bin.exists() => bin,
        _ => panic!("the braid binary is not built: run `cargo test --workspace` (or `cargo build -p braid-node`)"),
    }
}

static NEXT_SLOT: AtomicU16 = AtomicU16::new(0);

/// Blocks of 100 ports a test cluster may take, from port 20,000: all of them below 32,768,
/// where the OS's ephemeral ports begin, so that no outgoing socket of any test takes a port a
/// region (or a region added later, up to 10 in a block) is about to listen on.
const PORT_BLOCKS: u16 = 127;

/// A base port whose `regions` x 10 ports are free now, in 20000..32700, different for every
/// cluster of this process (a block of 100 ports each, room for 10 regions).
pub fn free_base_port(regions: usize) -> u16 {
    let span = (regions as u16) * cluster::PORTS_PER_REGION;
    assert!(span <= 100, "a test cluster has at most 10 regions");
    for _ in 0..200 {
        let slot = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
        let seed = (std::process::id() as u16)
            .wrapping_mul(131)
            .wrapping_add(slot.wrapping_mul(97));
        let base = 20_000 + (seed % PORT_BLOCKS) * 100;
        let free = (0..regions as u16).all(|i| {
            let at = base + i * cluster::PORTS_PER_REGION;
            TcpListener::bind(("127.0.0.1", at)).is_ok()
                && TcpListener::bind(("127.0.0.1", at + 1)).is_ok()
                && UdpSocket::bind(("127.0.0.1", at + 2)).is_ok()
        });
        if free && span > 0 {
            return base;
        }
    }
    panic!("no free ports found for {regions} regions");
}

/// One region's process.
#[derive(Debug)]
pub struct Node {
    /// Region name.
    pub name: String,
    /// Node id.
    pub id: NodeId,
    /// Its configuration file.
    pub config: PathBuf,
    /// RESP address.
    pub resp: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// QUIC address.
    pub peer: SocketAddr,
    child: Option<Child>,
}

impl Node {
    /// A region as `cluster.json` lists it, not started.
    fn laid_out(r: braid_node::cluster::RegionEntry) -> Node {
        Node {
            name: r.name,
            id: NodeId(r.id),
            config: r.config,
            resp: r.resp.parse().unwrap(),
            http: r.http.parse().unwrap(),
            peer: r.peer.parse().unwrap(),
            child: None,
        }
    }

    /// Starts the process (it must not be running).
    pub fn start(&mut self) {
        self.spawn(&[
            "start".into(),
            "--config".into(),
            self.config.display().to_string(),
        ]);
    }

    /// Starts the process as if the machine had restarted since it last ran (another boot id),
    /// as after a power loss.
    pub fn start_after_reboot(&mut self) {
        let args = [
            "start".into(),
            "--config".into(),
            self.config.display().to_string(),
        ];
        self.spawn_with_env(
            &args,
            &[(braid_node::node::BOOT_ID_ENV, "rebooted-in-a-test")],
        );
    }

    /// Starts the process as `braid join --via VIA` (a region admitted to a running mesh).
    pub fn start_join(&mut self, via: SocketAddr) {
        let args = [
            "join".into(),
            "--config".into(),
            self.config.display().to_string(),
            "--via".into(),
            via.to_string(),
        ];
        self.spawn(&args);
    }

    fn spawn(&mut self, args: &[String]) {
        self.spawn_with_env(args, &[]);
    }

    fn spawn_with_env(&mut self, args: &[String], env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = self.config.parent().unwrap().join("braid.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(braid_bin())
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start braid");
        self.child = Some(child);
    }

    /// Whether the process is running.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Waits up to `within` for the process to end on its own; its exit status if it did.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().expect("wait for braid") {
                self.child = None;
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The most memory the running process has had resident so far (`VmHWM`), in bytes.
    pub fn peak_resident_bytes(&self) -> u64 {
        self.memory_bytes("VmHWM:")
    }

    /// The memory the running process has resident now (`VmRSS`), in bytes.
    pub fn resident_bytes(&self) -> u64 {
        self.memory_bytes("VmRSS:")
    }

    fn memory_bytes(&self, field: &str) -> u64 {
        let child = self.child.as_ref().expect("the node is running");
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let line = status
            .lines()
            .find(|line| line.starts_with(field))
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"));
        let kib: u64 = line
            .trim_start_matches(field)
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap();
        kib * 1024
    }

    /// `kill -9`: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) sends a signal; no memory of this process is involved.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A Redis connection, retried until the node answers.
    pub fn redis(&self) -> redis::Connection {
        let url = format!("redis://{}/", self.resp);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let attempt = redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)));
            match attempt {
                Ok(connection) => return connection,
                Err(err) if Instant::now() > deadline => {
                    panic!("{} does not answer RESP: {err}", self.name)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// `GET /status`.
    pub fn status(&self) -> Status {
        let body =
            http_get(self.http, "/status").unwrap_or_else(|e| panic!("{} /status: {e}", self.name));
        serde_json::from_str(&body).unwrap()
    }

    /// Waits until `/health` answers.
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(self.http, "/health").is_err() {
            assert!(
                Instant::now() < deadline,
                "{} never became healthy; log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config.parent().unwrap().join("braid.log")).unwrap_or_default()
    }

    /// Its data directory.
    pub fn data_dir(&self) -> PathBuf {
        NodeConfig::load(&self.config).unwrap().data_dir
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// GET from the admin API, blocking.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(braid_node::admin_client::get(
            addr,
            path,
            Duration::from_secs(5),
        ))
        .map_err(|e| e.to_string())
}

/// POST JSON to the admin API, blocking.
pub fn http_post(addr: SocketAddr, path: &str, body: &str) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(braid_node::admin_client::post_json(
            addr,
            path,
            body,
            Duration::from_secs(5),
        ))
        .map_err(|e| e.to_string())
}

/// A local cluster of real processes.
#[derive(Debug)]
pub struct Cluster {
    /// Its directory (configurations, data, logs).
    pub dir: tempfile::TempDir,
    /// The regions, in order.
    pub nodes: Vec<Node>,
}

/// How to build a test cluster.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Region names.
    pub regions: Vec<String>,
    /// Regions laid out but not started by [`Cluster::start`].
    pub not_running: Vec<String>,
    /// Links, or a full mesh.
    pub links: Option<Vec<[String; 2]>>,
    /// RESP password.
    pub password: Option<String>,
    /// Whether the nodes accept `POST /faults`.
    pub fault_injection: bool,
    /// Whether the nodes garbage-collect their change logs. Off unless a test asks for it:
    /// [`Cluster::oracle_from_logs`] needs whole logs.
    pub change_log_gc: bool,
    /// A retention bound by size (events) for every node's change log, instead of the default.
    pub retention_events: Option<u64>,
}

impl Layout {
    /// A full mesh of regions a, b, c, ...
    pub fn mesh(count: usize) -> Layout {
        Layout {
            regions: cluster::default_region_names(count),
            links: None,
            password: None,
            not_running: Vec::new(),
            fault_injection: false,
            change_log_gc: false,
            retention_events: None,
        }
    }

    /// The same layout, with `region` laid out but not started.
    pub fn without_running(mut self, region: &str) -> Layout {
        self.not_running.push(region.to_owned());
        self
    }

    /// The same, with fault injection enabled in every node.
    pub fn with_fault_injection(mut self) -> Layout {
        self.fault_injection = true;
        self
    }

    /// The same, with change-log garbage collection on in every node.
    pub fn with_change_log_gc(mut self) -> Layout {
        self.change_log_gc = true;
        self
    }

    /// The same, with change-log garbage collection on and every change log kept within
    /// `events` events, whoever lacks them.
    pub fn with_retention_events(mut self, events: u64) -> Layout {
        self.change_log_gc = true;
        self.retention_events = Some(events);
        self
    }

    /// A chain a-b-c-...
    pub fn chain(count: usize) -> Layout {
        let regions = cluster::default_region_names(count);
        let links = regions
            .windows(2)
            .map(|w| [w[0].clone(), w[1].clone()])
            .collect();
        Layout {
            regions,
            links: Some(links),
            password: None,
            not_running: Vec::new(),
            fault_injection: false,
            change_log_gc: false,
            retention_events: None,
        }
    }
}

impl Cluster {
    /// Lays out the cluster (nothing is started).
    pub fn new(layout: Layout) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let options = InitOptions {
            regions: layout.regions.clone(),
            dir: dir.path().to_owned(),
            host: "127.0.0.1".parse().unwrap(),
            // Room for one region more, which a test may add (`Cluster::add_region`).
            base_port: free_base_port(layout.regions.len() + 1),
            links: layout.links,
            durability: Durability::Process,
            password: layout.password,
            fault_injection: layout.fault_injection,
            change_log_gc: layout.change_log_gc,
        };
        let file: ClusterFile = cluster::init(&options).unwrap();
        if let Some(events) = layout.retention_events {
            for region in &file.regions {
                let text = std::fs::read_to_string(&region.config).unwrap();
                let mut config: NodeConfig = toml::from_str(&text).unwrap();
                config.change_log_retention_events = Some(events);
                std::fs::write(&region.config, toml::to_string_pretty(&config).unwrap()).unwrap();
            }
        }
        let nodes = file.regions.into_iter().map(Node::laid_out).collect();
        Cluster { dir, nodes }
    }

    /// Lays out and starts every region, and waits until each is connected to its neighbors.
    pub fn start(layout: Layout) -> Cluster {
        let skip = layout.not_running.clone();
        let mut cluster = Cluster::new(layout);
        let mut started = Vec::new();
        for (i, node) in cluster.nodes.iter_mut().enumerate() {
            if !skip.contains(&node.name) {
                node.start();
                started.push(i);
            }
        }
        cluster.wait_connected(&started);
        cluster
    }

    /// Lays out one more region with `braid add-region` (nothing is started; admit it with
    /// [`Node::start_join`]).
    pub fn add_region(&mut self, name: &str) -> &mut Node {
        let out = Command::new(braid_bin())
            .args(["add-region", "--dir"])
            .arg(self.dir.path())
            .args(["--region", name])
            .output()
            .expect("run braid add-region");
        assert!(
            out.status.success(),
            "braid add-region: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file = ClusterFile::load(self.dir.path()).unwrap();
        let entry = file.regions.into_iter().find(|r| r.name == name).unwrap();
        self.nodes.push(Node::laid_out(entry));
        self.nodes.last_mut().unwrap()
    }

    /// The node of a region.
    pub fn node(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no region {name}"))
    }

    /// Sets `region`'s injected faults (`POST /faults`; the layout must enable fault
    /// injection).
    pub fn faults(&mut self, region: &str, body: &str) {
        let http = self.node(region).http;
        http_post(http, "/faults", body)
            .unwrap_or_else(|e| panic!("POST /faults to {region}: {e}"));
    }

    /// Waits until each listed node reports every neighbor that is also listed as connected.
    pub fn wait_connected(&self, indexes: &[usize]) {
        let names: Vec<&str> = indexes
            .iter()
            .map(|i| self.nodes[*i].name.as_str())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        for i in indexes {
            let node = &self.nodes[*i];
            node.wait_healthy();
            loop {
                let status = node.status();
                let ok = status
                    .peers
                    .iter()
                    .filter(|p| names.contains(&p.region.as_str()))
                    .all(|p| p.state == "connected");
                if ok {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} is not connected: {:?}",
                    node.name,
                    status.peers
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Waits until every running node has the same vector, with every origin at least at
    /// `floor` (what the running nodes wrote, as far as the test knows).
    pub fn wait_converged(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let vectors: Vec<BTreeMap<String, u64>> = self
                .nodes
                .iter()
                .filter(|n| n.running())
                .map(|n| n.status().vector)
                .collect();
            let mut merged: BTreeMap<String, u64> = BTreeMap::new();
            for vector in &vectors {
                for (origin, seq) in vector {
                    let slot = merged.entry(origin.clone()).or_default();
                    *slot = (*slot).max(*seq);
                }
            }
            if vectors.iter().all(|v| *v == merged) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no convergence within {timeout:?}: {vectors:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops every running node (SIGTERM).
    pub fn stop_all(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
    }

    /// With every node stopped: the union of all change logs, and the oracle's values from it.
    pub fn oracle_from_logs(&self) -> (Vec<ChangeEvent>, BTreeMap<Bytes, Value>) {
        assert!(
            self.nodes.iter().all(|n| !n.running()),
            "stop the nodes first"
        );
        let mut events: BTreeMap<(NodeId, Seq), ChangeEvent> = BTreeMap::new();
        for node in &self.nodes {
            let mut storage = RocksStorage::open(&node.data_dir(), Durability::Process).unwrap();
            for origin in &self.nodes {
                let mut after = Seq::ZERO;
                loop {
                    let batch = storage
                        .log_after(origin.id, after, 1024, usize::MAX)
                        .unwrap();
                    let Some(last) = batch.last() else { break };
                    after = last.seq;
                    for event in batch {
                        events.insert((event.origin, event.seq), event);
                    }
                }
            }
        }
        let events: Vec<ChangeEvent> = events.into_values().collect();
        let values = oracle::converged(events.iter().map(|e| (&e.key, e.hlc, &e.op)));
        (events, values)
    }

    /// With every node stopped: each node's stored values.
    pub fn stored_values(&self) -> Vec<(String, BTreeMap<Bytes, Value>)> {
        self.nodes
            .iter()
            .map(|node| {
                let storage = RocksStorage::open(&node.data_dir(), Durability::Process).unwrap();
                (node.name.clone(), storage.values().unwrap())
            })
            .collect()
    }
}
