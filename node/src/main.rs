//! `braid`: the command-line interface of a Braid node and of local clusters.

// The binary talks to people on stdout and stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use braid_node::cluster::{self, ClusterFile, InitOptions};
use braid_node::config::NodeConfig;
use braid_node::http::Status;
use braid_node::launch;
use braid_node::storage::Durability;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

/// Braid: a multi-active, bidirectional replication mesh.
///
/// One node runs in each region; clients write to their own region over the Redis protocol
/// (RESP); nodes replicate every change to each other over QUIC with mutual TLS and converge
/// deterministically.
#[derive(Debug, Parser)]
#[command(name = "braid", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Write a cluster CA, node certificates and one configuration per region.
    Init(InitArgs),
    /// Run one node from its configuration file, until SIGINT or SIGTERM.
    Start {
        /// The node's configuration file (written by `braid init`).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Start or stop a local cluster of several regions on this machine.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Measure replication throughput and lag of a local cluster, against the storage and
    /// transport ceilings of this machine and against Redis, in one run.
    Bench(BenchArgs),
    /// Run a failover drill: a scenario file (the simulator's format) against real processes,
    /// with RPO, recovery, convergence and lag measured and a PASS/FAIL verdict per expectation.
    /// Exits non-zero when an expectation fails.
    Drill(DrillArgs),
    /// Change the links between regions: committed by the control plane, followed by every
    /// node without a restart. Fails when no leader commits it (a minority cannot).
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Give a keyspace (the keys beginning with a prefix) home regions: only they take client
    /// writes to it, the others refuse them with READONLY and still replicate what the home
    /// regions write. Committed by the control plane, followed by every node without a restart.
    #[command(subcommand)]
    Keyspace(KeyspaceCommand),
    /// Make a region leave the mesh: it stops taking writes, waits until every other region
    /// holds all of its events, removes itself from the mesh and stops.
    Leave {
        /// The leaving node's HTTP admin address.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7001")]
        http: SocketAddr,
    },
    /// Remove a region that is gone for good (dead, or a join that never finished): committed
    /// through any member; its node id is never used again, and what only it held is lost. A
    /// running region leaves with `braid leave` instead, which ships what it holds first.
    Remove {
        /// Any other member's HTTP admin address.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7001")]
        http: SocketAddr,
        /// The region to remove.
        #[arg(long, value_name = "NAME")]
        region: String,
    },
    /// Lay out one more region for a cluster made by `braid init`: its certificate (from the
    /// cluster's CA key), ports after the others' and a configuration. Admit it with
    /// `braid join`.
    AddRegion {
        /// The cluster's directory (with cluster.json, ca.pem and ca.key).
        #[arg(long, value_name = "DIR", default_value = "braid-cluster")]
        dir: PathBuf,
        /// The new region's name.
        #[arg(long, value_name = "NAME")]
        region: String,
    },
    /// Start a new region and admit it to a running mesh: a member commits it, it fetches a
    /// data snapshot from that member (with progress), then replicates like every region and
    /// turns active. Writers elsewhere go on throughout. Runs until SIGINT or SIGTERM, like
    /// `braid start`, which later starts use.
    Join {
        /// The new region's configuration file (from `braid add-region`, or written by hand:
        /// a certificate from the cluster's CA, and an empty data directory).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The HTTP admin address of any member of the mesh.
        #[arg(long, value_name = "ADDR")]
        via: SocketAddr,
    },
    /// Print a node's status: peers, their state, lag and counters.
    Status {
        /// The node's HTTP admin address.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7001")]
        http: SocketAddr,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TopologyCommand {
    /// Set the links: `--mesh` for every pair, or `--links a-b,b-c` for these only.
    Set {
        /// Any node's HTTP admin address.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7001")]
        http: SocketAddr,
        /// Link every region to every other.
        #[arg(long, conflicts_with = "links", required_unless_present = "links")]
        mesh: bool,
        /// Only these links, as region pairs `a-b` (or `a:b`, for names that hold '-'),
        /// comma-separated; every region must be in one and every region must reach every
        /// other.
        #[arg(long, value_delimiter = ',', value_name = "A-B,B-C")]
        links: Option<Vec<String>>,
    },
}

#[derive(Debug, Subcommand)]
enum KeyspaceCommand {
    /// Set the regions that take client writes to keys beginning with PREFIX (the longest
    /// prefix with options decides): `--writers a,b`, or `--frozen` for none.
    Set {
        /// Any node's HTTP admin address.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7001")]
        http: SocketAddr,
        /// The keyspace's key prefix, for example `orders:`.
        prefix: String,
        /// The writer regions, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            value_name = "A,B",
            conflicts_with = "frozen",
            required_unless_present = "frozen"
        )]
        writers: Option<Vec<String>>,
        /// No region takes writes to it (for a migration, say).
        #[arg(long)]
        frozen: bool,
    },
    /// Drop PREFIX's options: every region takes writes to it again.
    Clear {
        /// Any node's HTTP admin address.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7001")]
        http: SocketAddr,
        /// The keyspace's key prefix.
        prefix: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TopologyArg {
    /// Every region linked to every other.
    Mesh,
    /// Regions in a line, each linked to the next (events are relayed along it).
    Chain,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DurabilityArg {
    /// Survive a process crash (the write-ahead log is written, not synced).
    Process,
    /// Survive power loss (the write-ahead log is synced, with group commit).
    Machine,
}

impl From<DurabilityArg> for Durability {
    fn from(arg: DurabilityArg) -> Durability {
        match arg {
            DurabilityArg::Process => Durability::Process,
            DurabilityArg::Machine => Durability::Machine,
        }
    }
}

#[derive(Debug, Args)]
struct InitArgs {
    /// Region names, comma-separated (node ids 1, 2, ... in this order).
    #[arg(long, value_delimiter = ',', required = true, value_name = "A,B,C")]
    regions: Vec<String>,
    /// Directory to write into (created if missing; must not hold a cluster yet).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    #[command(flatten)]
    layout: Layout,
}

#[derive(Debug, Args)]
struct Layout {
    /// First port: region i listens on base+10i (RESP), base+10i+1 (HTTP), base+10i+2 (QUIC).
    #[arg(long, value_name = "PORT", default_value_t = 7000)]
    base_port: u16,
    /// Address every node listens on.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    host: IpAddr,
    /// How regions are linked.
    #[arg(long, value_enum, default_value_t = TopologyArg::Mesh)]
    topology: TopologyArg,
    /// Durability of acknowledged writes.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Process)]
    durability: DurabilityArg,
    /// Require RESP clients to AUTH with this password.
    #[arg(long, value_name = "PASSWORD")]
    password: Option<String>,
    /// Let `braid drill` cut and slow links and skew clocks through `POST /faults` (loopback
    /// hosts only; never in production).
    #[arg(long)]
    fault_injection: bool,
    /// Keep every change-log event instead of deleting those every region holds, as
    /// `braid drill --attach` needs (its checks read whole change logs).
    #[arg(long)]
    keep_change_log: bool,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Regions to start (a, b, c, ...).
    #[arg(long, default_value_t = 3)]
    regions: usize,
    /// How long to write, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    duration: f64,
    /// Client connections per region.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Commands each client keeps in flight.
    #[arg(long, default_value_t = 16)]
    pipeline: usize,
    /// Bytes per SET/HSET value.
    #[arg(long, value_name = "BYTES", default_value_t = 100)]
    value_size: usize,
    /// Command types, drawn uniformly.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "set",
        value_name = "set,incr,sadd,hset"
    )]
    mix: Vec<braid_node::bench::MixOp>,
    /// Share of writes to keys that every region writes (concurrent conflicting writes).
    #[arg(long, value_name = "SHARE", default_value_t = 0.0)]
    conflict_ratio: f64,
    /// Keys per key space (each region's own, and the shared one).
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Writes per second into each region (default: as fast as the clients go).
    #[arg(long, value_name = "WRITES_PER_S")]
    rate: Option<u64>,
    /// Durability mode of the started cluster and of the storage ceiling.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Process)]
    durability: DurabilityArg,
    /// Attach to the running cluster in DIR (its cluster.json) instead of starting one.
    #[arg(long, value_name = "DIR")]
    attach: Option<PathBuf>,
    /// Working directory for the started cluster, the ceilings and Redis (default: a
    /// temporary directory, removed afterwards).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// First port of the started cluster (region i uses base+10i .. base+10i+2).
    #[arg(long, value_name = "PORT", default_value_t = 17000)]
    base_port: u16,
    /// Skip the Redis comparison even if redis-server is installed.
    #[arg(long)]
    no_redis: bool,
    /// Seconds each ceiling is measured.
    #[arg(long, value_name = "SECONDS", default_value_t = 3.0)]
    ceiling_duration: f64,
    /// After the load, kill the last region, keep writing into the others until it lacks this
    /// many events, restart it and measure how fast it catches up (0: skip).
    #[arg(long, value_name = "EVENTS", default_value_t = 0)]
    outage_events: u64,
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct DrillArgs {
    /// The scenario (TOML; see docs/scenarios.md and the drills in docs/drills/).
    #[arg(value_name = "SCENARIO")]
    scenario: PathBuf,
    /// Working directory for the started cluster (kept afterwards; default: a temporary
    /// directory, removed, or kept and named when the drill fails).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Attach to the running cluster in DIR (its cluster.json) instead of starting one; its
    /// regions and links must be the scenario's, it must keep its change logs (started with
    /// --keep-change-log), and partitions, flaps, slow links and clock skew need it started
    /// with --fault-injection.
    #[arg(long, value_name = "DIR", conflicts_with = "dir")]
    attach: Option<PathBuf>,
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write a self-contained HTML page (lag timeline with the faults marked) to FILE.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Seed of the workload's commands.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Durability of the started cluster (power-fail needs machine).
    #[arg(long, value_enum, default_value_t = DurabilityArg::Process, conflicts_with = "attach")]
    durability: DurabilityArg,
    /// First port of the started cluster (region i uses base+10i .. base+10i+2).
    #[arg(
        long,
        value_name = "PORT",
        default_value_t = braid_node::drill::BASE_PORT_DEFAULT,
        conflicts_with = "attach"
    )]
    base_port: u16,
    /// Multiply the scenario's duration and every time of its timeline by this (0.25: a
    /// quarter of the time); expectations are not scaled.
    #[arg(long, value_name = "FACTOR", default_value_t = 1.0)]
    time_scale: f64,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Start a local N-region cluster as child processes; stops them all on Ctrl-C unless
    /// --detach is given. Re-uses the cluster already in DIR, if there is one.
    Up {
        /// Number of regions (named a, b, c, ...).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=26))]
        regions: u16,
        /// Directory for configurations, data, logs and cluster.json.
        #[arg(long, value_name = "DIR", default_value = "braid-cluster")]
        dir: PathBuf,
        /// Return once the cluster is up, leaving it running (stop it with `braid cluster down`).
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        layout: Layout,
    },
    /// Stop the regions of the cluster in DIR that run: started with --detach, or by hand (as
    /// `braid join` runs one).
    Down {
        /// The cluster's directory.
        #[arg(long, value_name = "DIR", default_value = "braid-cluster")]
        dir: PathBuf,
    },
}

/// The options of `cluster up` that lay a new cluster out, as clap names them and as a user
/// types them.
const LAYOUT_OPTIONS: [(&str, &str); 8] = [
    ("regions", "--regions"),
    ("base_port", "--base-port"),
    ("host", "--host"),
    ("topology", "--topology"),
    ("durability", "--durability"),
    ("password", "--password"),
    ("fault_injection", "--fault-injection"),
    ("keep_change_log", "--keep-change-log"),
];

/// The layout options given on the command line of a `cluster up`.
fn layout_options_given(matches: &clap::ArgMatches) -> Vec<&'static str> {
    let Some(up) = matches
        .subcommand_matches("cluster")
        .and_then(|m| m.subcommand_matches("up"))
    else {
        return Vec::new();
    };
    LAYOUT_OPTIONS
        .iter()
        .filter(|(id, _)| up.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
        .map(|(_, flag)| *flag)
        .collect()
}

fn main() -> Result<()> {
    let matches = Cli::command().get_matches();
    let layout_given = layout_options_given(&matches);
    let cli = Cli::from_arg_matches(&matches)?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Commands::Init(args) => init(args),
            Commands::Start { config } => start(&config).await,
            Commands::Cluster(ClusterCommand::Up {
                regions,
                dir,
                detach,
                layout,
            }) => cluster_up(regions as usize, &dir, detach, &layout, &layout_given).await,
            Commands::Cluster(ClusterCommand::Down { dir }) => cluster_down(&dir).await,
            Commands::Status { http, json } => status(http, json).await,
            Commands::Leave { http } => leave(http).await,
            Commands::AddRegion { dir, region } => add_region(&dir, &region),
            Commands::Remove { http, region } => remove(http, &region).await,
            Commands::Join { config, via } => join(&config, via).await,
            Commands::Topology(TopologyCommand::Set { http, mesh, links }) => {
                topology_set(http, mesh, links).await
            }
            Commands::Keyspace(KeyspaceCommand::Set {
                http,
                prefix,
                writers,
                frozen,
            }) => {
                keyspace_set(
                    http,
                    prefix,
                    if frozen { Some(Vec::new()) } else { writers },
                )
                .await
            }
            Commands::Keyspace(KeyspaceCommand::Clear { http, prefix }) => {
                keyspace_set(http, prefix, None).await
            }
            Commands::Bench(args) => bench(args).await,
            Commands::Drill(args) => drill(args).await,
        }
    })
}

fn init_options(regions: Vec<String>, dir: &Path, layout: &Layout) -> InitOptions {
    let links = match layout.topology {
        TopologyArg::Mesh => None,
        TopologyArg::Chain => Some(
            regions
                .windows(2)
                .map(|w| [w[0].clone(), w[1].clone()])
                .collect(),
        ),
    };
    InitOptions {
        regions,
        dir: dir.to_owned(),
        host: layout.host,
        base_port: layout.base_port,
        links,
        durability: layout.durability.into(),
        password: layout.password.clone(),
        fault_injection: layout.fault_injection,
        change_log_gc: !layout.keep_change_log,
    }
}

fn init(args: InitArgs) -> Result<()> {
    let file = cluster::init(&init_options(args.regions, &args.dir, &args.layout))?;
    println!(
        "Wrote a cluster of {} regions to {}:",
        file.regions.len(),
        args.dir.display()
    );
    print_regions(&file);
    println!(
        "\nStart each node with: braid start --config {}/<region>/braid.toml",
        args.dir.display()
    );
    Ok(())
}

async fn start(config_path: &Path) -> Result<()> {
    let mut signals = Signals::new()?;
    let config = NodeConfig::load(config_path)?;
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        signals.recv().await;
        tracing::info!("signal received: stopping");
        let _ = stop.send(true);
    });
    braid_node::node::run(config, shutdown)
        .await
        .context("node failed")?;
    Ok(())
}

async fn remove(http: SocketAddr, region: &str) -> Result<()> {
    let body = serde_json::to_string(&braid_node::http::RemoveRequest {
        region: region.to_owned(),
    })?;
    braid_node::admin_client::post_json(http, "/remove", &body, TOPOLOGY_SET_TIMEOUT)
        .await
        .with_context(|| format!("region {region} was not removed"))?;
    println!("Region {region} is removed from the mesh; its node id is never used again.");
    Ok(())
}

fn add_region(dir: &Path, region: &str) -> Result<()> {
    let entry = cluster::add_region(dir, region)?;
    println!(
        "Laid out region {} (node {}) in {}: RESP {}, HTTP {}, QUIC {}.",
        entry.name,
        entry.id,
        dir.display(),
        entry.resp,
        entry.http,
        entry.peer
    );
    let file = ClusterFile::load(dir)?;
    let via = file
        .regions
        .first()
        .map_or("127.0.0.1:7001".to_string(), |r| r.http.clone());
    println!(
        "\nAdmit it to the running mesh with: braid join --config {} --via {via}",
        entry.config.display()
    );
    Ok(())
}

/// How long a member may take to admit a region: up to 10 s for a mesh that has just started
/// to bootstrap its control plane, then up to 10 s to commit the join, and 3 s to apply it.
const JOIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn join(config_path: &Path, via: SocketAddr) -> Result<()> {
    use braid_node::http::{JoinReply, JoinRequest};
    use braid_node::node::{JoinPlan, JOINED_MARKER, SNAPSHOT_PENDING_MARKER};
    use std::io::IsTerminal;
    let mut signals = Signals::new()?;
    let config = NodeConfig::load(config_path)?;
    let data = &config.data_dir;
    let joined = data.join(JOINED_MARKER).exists();
    if joined && !data.join(SNAPSHOT_PENDING_MARKER).exists() {
        bail!(
            "region {} has joined already: start it with `braid start --config {}`",
            config.region,
            config_path.display()
        );
    }
    if !joined && data.join("CURRENT").exists() {
        bail!(
            "{} holds the data of a region that did not join: a region joins with an empty data \
             directory",
            data.display()
        );
    }
    let request = JoinRequest {
        cluster_id: config.cluster_id.clone(),
        id: config.node_id,
        region: config.region.clone(),
        peer_address: config.listen.peer.to_string(),
        resp_address: config.listen.resp.to_string(),
        http_address: config.listen.http.to_string(),
    };
    eprintln!(
        "Asking the member at {via} to admit region {} (node {})...",
        config.region, config.node_id
    );
    let body = serde_json::to_string(&request)?;
    let asked = braid_node::admin_client::post_json(via, "/join", &body, JOIN_REQUEST_TIMEOUT);
    // Waiting to be admitted can take a while; Ctrl-C stops the wait, and nothing started yet.
    let reply = tokio::select! {
        reply = asked => reply,
        _ = signals.recv() => bail!(
            "interrupted while waiting for the member at {via} to admit region {}: if it admits \
             it anyway, run this command again to finish the join",
            config.region
        ),
    };
    let reply = reply.with_context(|| {
        format!(
            "the member at http://{via} did not admit region {}",
            config.region
        )
    })?;
    let reply: JoinReply = serde_json::from_str(&reply).context("unexpected /join answer")?;
    let sources = reply
        .members
        .iter()
        .filter(|m| m.state == "active")
        .map(|m| braid_node::protocol::NodeId(m.id))
        .collect();
    let mut members = Vec::new();
    for member in reply.members.iter().filter(|m| m.state != "removed") {
        let address = member.peer_address.parse().with_context(|| {
            format!(
                "member {} has an unusable address {:?}",
                member.name, member.peer_address
            )
        })?;
        members.push((
            braid_node::protocol::NodeId(member.id),
            member.name.clone(),
            address,
        ));
    }
    eprintln!(
        "Admitted by region {}; fetching a data snapshot from it.",
        reply.region
    );
    let terminal = std::io::stderr().is_terminal();
    let mut last = std::time::Instant::now() - Duration::from_secs(1);
    let progress = move |p: &braid_node::snapshot::FetchProgress| {
        if !p.done && last.elapsed() < Duration::from_millis(250) {
            return;
        }
        last = std::time::Instant::now();
        let share = match p.keys_estimate {
            0 => String::new(),
            n => format!(" (~{}%)", (p.keys * 100 / n).min(100)),
        };
        let line = match p.done {
            true => format!(
                "snapshot: {} keys, {:.1} MB, installed",
                p.keys,
                p.bytes as f64 / 1e6
            ),
            false => format!(
                "snapshot: {} of ~{} keys{share}, {:.1} MB",
                p.keys,
                p.keys_estimate.max(p.keys),
                p.bytes as f64 / 1e6
            ),
        };
        let mut err = std::io::stderr();
        if progress_line(&mut err, &line, terminal) && p.done {
            eprintln!();
        }
    };
    let plan = JoinPlan {
        via: braid_node::protocol::NodeId(reply.node),
        members,
        sources,
        progress: Box::new(progress),
    };
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        signals.recv().await;
        tracing::info!("signal received: stopping");
        let _ = stop.send(true);
    });
    braid_node::node::join(config, plan, shutdown)
        .await
        .context("the region failed to join")?;
    Ok(())
}

/// SIGINT and SIGTERM, listened for from the moment this is created (a signal that arrives
/// before then would kill the process with its default action, leaving children behind).
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

fn print_regions(file: &ClusterFile) {
    println!(
        "{:<8} {:>3}  {:<21} {:<21} {:<21} {:>8}",
        "REGION", "ID", "RESP", "HTTP", "PEER (QUIC)", "PID"
    );
    for r in &file.regions {
        let pid = r.pid.map_or("-".to_string(), |p| p.to_string());
        println!(
            "{:<8} {:>3}  {:<21} {:<21} {:<21} {:>8}",
            r.name, r.id, r.resp, r.http, r.peer, pid
        );
    }
}

async fn cluster_up(
    count: usize,
    dir: &Path,
    detach: bool,
    layout: &Layout,
    layout_given: &[&'static str],
) -> Result<()> {
    let mut signals = Signals::new()?;
    let mut file = if dir.join("cluster.json").exists() {
        let file = ClusterFile::load(dir)?;
        let differing = layout_differences(&file, count, layout, layout_given);
        if !differing.is_empty() {
            bail!(
                "{} holds a cluster already, laid out otherwise when it was made: {} would be \
                 ignored. Restart it with `braid cluster up --dir {}` alone, or lay out a new \
                 cluster in another --dir",
                dir.display(),
                differing.join(", "),
                dir.display()
            );
        }
        let mut file = file;
        let adopted = adopt_unrecorded(&mut file).await;
        if !adopted.is_empty() {
            // Recorded, so that `cluster down` stops them.
            file.save(dir)?;
        }
        if let Some(r) = file
            .regions
            .iter()
            .find(|r| launch::running_pid(r).is_some())
        {
            bail!("the cluster in {} is already running (region {} is pid {:?}); stop it with `braid cluster down --dir {}`",
                dir.display(), r.name, r.pid, dir.display());
        }
        println!("Restarting the cluster in {}", dir.display());
        file
    } else {
        cluster::init(&init_options(
            cluster::default_region_names(count),
            dir,
            layout,
        ))?
    };
    // A region laid out by add-region starts with `braid join`, not with the others; one that
    // left the mesh (or was removed) does not start again.
    let all = file.clone();
    let (gone, staying): (Vec<_>, Vec<_>) = std::mem::take(&mut file.regions)
        .into_iter()
        .partition(|region| has_marker(region, braid_node::node::REMOVED_MARKER));
    let (joining, ready): (Vec<_>, Vec<_>) = staying
        .into_iter()
        .partition(|region| has_marker(region, braid_node::node::SNAPSHOT_PENDING_MARKER));
    file.regions = ready;
    for region in &gone {
        eprintln!(
            "region {} left the mesh (or was removed): not started; its id is never used again",
            region.name
        );
    }
    let via = file.regions.first().map(|r| r.http.clone());
    for region in &joining {
        eprintln!(
            "region {} has not joined yet: not started; admit it with `braid join --config {} \
             --via {}`",
            region.name,
            region.config.display(),
            via.as_deref().unwrap_or("<a member's HTTP address>")
        );
    }
    if file.regions.is_empty() {
        bail!(
            "no region of {} is a member of the mesh (each left it, was removed or has not \
             joined): nothing to start",
            dir.display()
        );
    }
    let exe = std::env::current_exe().context("cannot find the braid executable")?;
    let mut children = launch::spawn(&mut file, &exe, detach)?;
    // cluster.json keeps every region, in its order, with the pids of those started.
    let mut recorded = all;
    for region in &mut recorded.regions {
        if let Some(started) = file.regions.iter().find(|s| s.name == region.name) {
            region.pid = started.pid;
        }
    }
    recorded.save(dir)?;
    let started = async {
        println!(
            "Started {} regions; waiting for each to answer (up to 30 s)...",
            file.regions.len()
        );
        launch::wait_healthy(&file, &mut children, Duration::from_secs(30)).await?;
        println!("Every region answers; waiting for them to connect to each other (up to 10 s)...");
        for region in launch::wait_meshed(&file, Duration::from_secs(10)).await {
            eprintln!("warning: region {region} is not connected to all its peers yet");
        }
        Ok::<(), anyhow::Error>(())
    };
    let outcome = tokio::select! {
        outcome = started => Some(outcome),
        _ = signals.recv() => None,
    };
    match outcome {
        Some(Ok(())) => {}
        Some(Err(err)) => {
            launch::stop(&file).await;
            save_stopped(dir, &file)?;
            return Err(err);
        }
        None => {
            println!("Interrupted during start-up: stopping the regions.");
            launch::stop(&file).await;
            save_stopped(dir, &file)?;
            // In the foreground, Ctrl-C is how the cluster stops, at any time. Detached, the
            // command's job was to leave a cluster running: `cluster up --detach && ...` must
            // not go on without one.
            if detach {
                bail!("interrupted during start-up: the cluster is not running");
            }
            return Ok(());
        }
    }
    println!(
        "Braid cluster of {} regions is up ({}):",
        file.regions.len(),
        dir.display()
    );
    print_regions(&file);
    println!(
        "\nTry: redis-cli -p {} SET greeting hello; redis-cli -p {} GET greeting",
        port_of(&file.regions[0].resp),
        port_of(&file.regions[file.regions.len() - 1].resp)
    );
    println!("Status: braid status --http {}", file.regions[0].http);
    if detach {
        println!(
            "Running in the background; stop it with: braid cluster down --dir {}",
            dir.display()
        );
        return Ok(());
    }
    println!("Press Ctrl-C to stop every region.");
    // A region that ends cleanly (it left the mesh, or was stopped from elsewhere) is no
    // failure, and the others keep running; one that fails stops them all.
    let mut running = vec![true; children.len()];
    let failed = loop {
        if !running.contains(&true) {
            println!("Every region has stopped.");
            break None;
        }
        let exited = {
            let (regions, exits): (Vec<usize>, Vec<_>) = children
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| running[*i])
                .map(|(i, child)| (i, Box::pin(child.wait())))
                .unzip();
            tokio::select! {
                _ = signals.recv() => None,
                n = futures_first(exits) => Some(regions[n]),
            }
        };
        let Some(region) = exited else {
            println!("\nStopping the cluster...");
            break None;
        };
        running[region] = false;
        let name = &file.regions[region].name;
        match children[region].try_wait().ok().flatten() {
            Some(status) if status.success() => println!(
                "Region {name} stopped (it left the mesh, or was stopped from elsewhere); the \
                 others keep running."
            ),
            status => {
                println!("Region {name} exited; stopping the cluster...");
                break Some((region, status));
            }
        }
    };
    launch::stop(&file).await;
    save_stopped(dir, &file)?;
    match failed {
        None => Ok(()),
        Some((region, status)) => {
            let status = status.map_or("an unknown status".to_string(), |s| s.to_string());
            bail!(
                "region {} exited with {status}; see {}",
                file.regions[region].name,
                launch::log_path(&file.regions[region].config).display()
            )
        }
    }
}

/// The layout options of `given` whose value differs from how the cluster of `file` was laid
/// out (running the same `cluster up` again is a restart, not a conflict).
fn layout_differences(
    file: &ClusterFile,
    count: usize,
    layout: &Layout,
    given: &[&'static str],
) -> Vec<&'static str> {
    let Some(first) = file.regions.first() else {
        return given.to_vec();
    };
    let config = NodeConfig::load(&first.config).ok();
    let resp: Option<SocketAddr> = first.resp.parse().ok();
    given
        .iter()
        .copied()
        .filter(|flag| {
            let Some(config) = &config else {
                return true;
            };
            match *flag {
                "--regions" => count != file.regions.len(),
                "--base-port" => resp.map(|a| a.port()) != Some(layout.base_port),
                "--host" => resp.map(|a| a.ip()) != Some(layout.host),
                "--topology" => {
                    config.links.is_some() != matches!(layout.topology, TopologyArg::Chain)
                }
                "--durability" => config.durability != Durability::from(layout.durability),
                "--password" => config.password != layout.password,
                "--fault-injection" => config.fault_injection != layout.fault_injection,
                "--keep-change-log" => config.change_log_gc == layout.keep_change_log,
                _ => true,
            }
        })
        .collect()
}

/// Whether the data directory of `region` holds `marker`: the snapshot-pending one of a region
/// laid out by `braid add-region` that has not finished joining, or the one of a region that
/// was removed from the mesh.
fn has_marker(region: &braid_node::cluster::RegionEntry, marker: &str) -> bool {
    NodeConfig::load(&region.config).is_ok_and(|config| config.data_dir.join(marker).exists())
}

/// Records in `DIR/cluster.json` that the regions of `started` are stopped. The file is read
/// again first: `braid add-region` may have added a region to it while the cluster ran, and
/// that region stays.
fn save_stopped(dir: &Path, started: &ClusterFile) -> Result<()> {
    let mut file = match ClusterFile::load(dir) {
        Ok(file) => file,
        Err(err) => {
            eprintln!("warning: {err}; writing cluster.json again as this command started it");
            started.clone()
        }
    };
    for region in &mut file.regions {
        if started.regions.iter().any(|s| s.name == region.name) {
            region.pid = None;
        }
    }
    file.save(dir)?;
    Ok(())
}

/// Waits for the first of several child exits; returns its index.
async fn futures_first<F: std::future::Future + Unpin>(mut futures: Vec<F>) -> usize {
    std::future::poll_fn(|cx| {
        for (i, f) in futures.iter_mut().enumerate() {
            if std::pin::Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(i);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

fn port_of(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap_or(addr)
}

/// Regions of `file` running though cluster.json records no pid for them (started by hand, as
/// `braid join` is, or by a `cluster up` whose record was lost): their nodes' pids, from each
/// one's `/health`, are recorded when the process is that region's node (see
/// [`launch::running_pid`]). Returns their names.
async fn adopt_unrecorded(file: &mut ClusterFile) -> Vec<String> {
    let mut adopted = Vec::new();
    for region in &mut file.regions {
        if launch::running_pid(region).is_some() {
            continue;
        }
        let Ok(http) = region.http.parse::<SocketAddr>() else {
            continue;
        };
        let Ok(body) = braid_node::admin_client::get(http, "/health", Duration::from_secs(1)).await
        else {
            continue;
        };
        let pid = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|health| health["pid"].as_u64())
            .and_then(|pid| u32::try_from(pid).ok());
        let candidate = cluster::RegionEntry {
            pid,
            ..region.clone()
        };
        if launch::running_pid(&candidate).is_some() {
            region.pid = pid;
            adopted.push(region.name.clone());
        }
    }
    adopted
}

async fn cluster_down(dir: &Path) -> Result<()> {
    let mut file =
        ClusterFile::load(dir).with_context(|| format!("no cluster in {}", dir.display()))?;
    adopt_unrecorded(&mut file).await;
    let running: Vec<&str> = file
        .regions
        .iter()
        .filter(|r| launch::running_pid(r).is_some())
        .map(|r| r.name.as_str())
        .collect();
    if running.is_empty() {
        println!("No region of the cluster in {} is running.", dir.display());
    } else {
        println!("Stopping regions {}...", running.join(", "));
        launch::stop(&file).await;
    }
    for region in &mut file.regions {
        region.pid = None;
    }
    file.save(dir)?;
    println!("Stopped.");
    Ok(())
}

/// Writes a progress line: rewritten in place on a terminal, one per line otherwise. Returns
/// whether the cursor was left on it.
fn progress_line(err: &mut impl std::io::Write, line: &str, terminal: bool) -> bool {
    if terminal {
        let _ = write!(err, "\r{line}");
    } else {
        let _ = writeln!(err, "{line}");
    }
    terminal
}

/// Refuses, before a long run, an output path its report could not be written to: a missing
/// directory, or a directory where the file should be.
fn check_output(path: Option<&Path>, flag: &str) -> Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    if path.is_dir() {
        bail!("{flag} {}: a directory, not a file", path.display());
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent.filter(|p| !p.is_dir()) {
        bail!(
            "{flag} {}: the directory {} does not exist",
            path.display(),
            parent.display()
        );
    }
    Ok(())
}

/// Writes a report as pretty JSON and says where.
fn write_json(path: &Path, report: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("Report written to {}", path.display());
    Ok(())
}

fn seconds(value: f64, flag: &str) -> Result<Duration> {
    if !value.is_finite() || value <= 0.0 || value > 86_400.0 {
        bail!("{flag} {value}: use a number of seconds above 0 and at most a day");
    }
    Ok(Duration::from_secs_f64(value))
}

async fn bench(args: BenchArgs) -> Result<()> {
    use braid_node::bench::{self, BenchOptions, Progress, RedisChoice};
    use std::io::{IsTerminal, Write};
    let options = BenchOptions {
        regions: args.regions,
        duration: seconds(args.duration, "--duration")?,
        clients: args.clients,
        pipeline: args.pipeline,
        value_size: args.value_size,
        keys: args.keys,
        mix: args.mix,
        conflict_ratio: args.conflict_ratio,
        durability: args.durability.into(),
        rate_per_region: args.rate,
        attach: args.attach,
        dir: args.dir,
        base_port: args.base_port,
        redis: if args.no_redis {
            RedisChoice::Off
        } else {
            RedisChoice::Auto
        },
        ceiling_duration: seconds(args.ceiling_duration, "--ceiling-duration")?,
        outage_events: args.outage_events,
        exe: std::env::current_exe().context("cannot find the braid executable")?,
        command_line: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let terminal = std::io::stderr().is_terminal();
    let mut on_line = false;
    let mut progress = |p: Progress| {
        let mut err = std::io::stderr().lock();
        match p {
            Progress::Phase(text) => {
                if on_line {
                    let _ = writeln!(err);
                    on_line = false;
                }
                let _ = writeln!(err, "== {text}");
            }
            Progress::Outage {
                events,
                target,
                acked_per_s,
            } => {
                let line = format!(
                    "   {events:>9}/{target} events missed by the stopped region  {acked_per_s:>9.0} writes/s",
                );
                on_line = progress_line(&mut err, &line, terminal);
            }
            Progress::Load {
                elapsed_s,
                duration_s,
                acked_per_s,
                applied_per_s,
                acked,
            } => {
                let replicated = applied_per_s
                    .map(|a| format!("  {a:>9.0} replicated/s"))
                    .unwrap_or_default();
                let line = format!(
                    "   {elapsed_s:>5.1}/{duration_s:.0} s  {acked_per_s:>9.0} writes/s{replicated}  {acked} writes",
                );
                on_line = progress_line(&mut err, &line, terminal);
            }
        }
    };
    check_output(args.json.as_deref(), "--json")?;
    let mut signals = Signals::new()?;
    let report = tokio::select! {
        report = bench::run(&options, &mut progress) => report?,
        _ = signals.recv() => bail!("interrupted; every process the bench started has been stopped"),
    };
    println!("\n{}", report.table());
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}

async fn drill(args: DrillArgs) -> Result<()> {
    use braid_node::drill::{self, DrillOptions, Progress};
    use std::io::{IsTerminal, Write};
    let scenario = braid_node::scenario::Scenario::load(&args.scenario)?;
    let options = DrillOptions {
        scenario,
        dir: args.dir,
        attach: args.attach,
        durability: args.durability.into(),
        base_port: args.base_port,
        seed: args.seed,
        time_scale: args.time_scale,
        exe: std::env::current_exe().context("cannot find the braid executable")?,
        command_line: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let terminal = std::io::stderr().is_terminal();
    let mut on_line = false;
    let mut progress = |p: Progress| {
        let mut err = std::io::stderr().lock();
        let mut end_line = |err: &mut std::io::StderrLock<'_>| {
            if on_line {
                let _ = writeln!(err);
                on_line = false;
            }
        };
        match p {
            Progress::Phase(text) => {
                end_line(&mut err);
                let _ = writeln!(err, "== {text}");
            }
            Progress::Fault(text) => {
                end_line(&mut err);
                let _ = writeln!(err, "!! {text}");
            }
            Progress::Running {
                elapsed_ms,
                total_ms,
                acked,
                down,
                faults,
            } => {
                let down = if down.is_empty() {
                    String::new()
                } else {
                    format!("  down: {}", down.join(","))
                };
                let line = format!(
                    "   {:>6.1}/{:.1} s  {acked:>8} writes acknowledged  {faults} faults{down}   ",
                    elapsed_ms as f64 / 1000.0,
                    total_ms as f64 / 1000.0,
                );
                on_line = progress_line(&mut err, &line, terminal);
            }
        }
    };
    check_output(args.json.as_deref(), "--json")?;
    check_output(args.html.as_deref(), "--html")?;
    let mut signals = Signals::new()?;
    let interrupted = match &options.attach {
        Some(dir) => format!(
            "interrupted: the attached cluster may still have faults set and regions down (POST \
             {{}} to each node's /faults, or `braid cluster down --dir {0}` and `braid cluster up \
             --dir {0}`)",
            dir.display()
        ),
        None => "interrupted; every process the drill started has been stopped".into(),
    };
    let report = tokio::select! {
        report = drill::run(&options, &mut progress) => report?,
        _ = signals.recv() => bail!("{interrupted}"),
    };
    println!("{}", report.table());
    // Each report is written even if the other cannot be; the verdict comes first.
    let mut unwritten = Vec::new();
    if let Some(path) = &args.json {
        if let Err(err) = write_json(path, &report) {
            unwritten.push(format!("{err:#}"));
        }
    }
    if let Some(path) = &args.html {
        match std::fs::write(path, report.html()) {
            Ok(()) => println!("Page written to {}", path.display()),
            Err(err) => unwritten.push(format!("cannot write {}: {err}", path.display())),
        }
    }
    let unwritten = match unwritten.is_empty() {
        true => String::new(),
        false => format!("; and {}", unwritten.join("; ")),
    };
    if !report.passed {
        let failed: Vec<&str> = report
            .checkers
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.checker.as_str())
            .collect();
        bail!(
            "drill {} FAILED: {}{unwritten}",
            report.scenario,
            failed.join(", ")
        );
    }
    if !unwritten.is_empty() {
        bail!("drill {} passed{unwritten}", report.scenario);
    }
    Ok(())
}

/// How long `braid leave` waits for the region to be gone.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(120);

/// The node's `/status`.
async fn fetch_status(http: SocketAddr) -> Result<Status> {
    let body = braid_node::admin_client::get(http, "/status", Duration::from_secs(5))
        .await
        .with_context(|| format!("cannot reach the node at http://{http}/status"))?;
    serde_json::from_str(&body).context("unexpected /status document")
}

async fn leave(http: SocketAddr) -> Result<()> {
    let status = fetch_status(http).await?;
    let region = status.region.clone();
    braid_node::admin_client::post_json(http, "/leave", "{}", TOPOLOGY_SET_TIMEOUT)
        .await
        .with_context(|| format!("region {region} could not start leaving"))?;
    println!("Region {region} is draining: it takes no new writes and ships what it holds.");
    let deadline = tokio::time::Instant::now() + LEAVE_TIMEOUT;
    let mut last_line = String::new();
    // The others, to confirm the removal once the node has stopped answering.
    let mut others: Vec<String> = status
        .control
        .members
        .iter()
        .filter(|m| m.id != status.node)
        .map(|m| m.http_address.clone())
        .collect();
    loop {
        let Ok(body) = braid_node::admin_client::get(http, "/status", Duration::from_secs(5)).await
        else {
            // The node stops once it is removed: another member confirms it.
            if removed_elsewhere(&others, status.node).await {
                println!("Region {region} has left the mesh and stopped.");
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "region {region} stopped answering, and no other region confirms its \
                     removal: see `braid status` on another region"
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        if let Ok(status) = serde_json::from_str::<Status>(&body) {
            others = status
                .control
                .members
                .iter()
                .filter(|m| m.id != status.node && m.state != "removed")
                .map(|m| m.http_address.clone())
                .collect();
            let mine = status.vector.get(&region).copied().unwrap_or(0);
            let waiting: Vec<String> = status
                .control
                .members
                .iter()
                .filter(|m| m.name != region && matches!(m.state.as_str(), "active" | "draining"))
                .filter(|m| {
                    m.checkpoint
                        .as_ref()
                        .and_then(|c| c.vector.get(&region))
                        .is_none_or(|s| *s < mine)
                })
                .map(|m| m.name.clone())
                .collect();
            let line = if waiting.is_empty() {
                format!("every region holds {region}'s {mine} events; removing it")
            } else {
                format!(
                    "waiting for {} to report holding {region}'s {mine} events",
                    waiting.join(", ")
                )
            };
            if line != last_line {
                println!("  {line}");
                last_line = line;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "region {region} has not left within {} s; `braid status --http {http}` shows \
                 what it waits for",
                LEAVE_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether one of the regions at `others` (HTTP addresses) shows the member `node` removed.
async fn removed_elsewhere(others: &[String], node: u64) -> bool {
    for other in others {
        let Ok(addr) = other.parse::<SocketAddr>() else {
            continue;
        };
        let Ok(body) = braid_node::admin_client::get(addr, "/status", Duration::from_secs(5)).await
        else {
            continue;
        };
        if let Ok(status) = serde_json::from_str::<Status>(&body) {
            if status
                .control
                .members
                .iter()
                // By id: a region name may be taken again once its member is removed.
                .any(|m| m.id == node && m.state == "removed")
            {
                return true;
            }
        }
    }
    false
}

/// How long `braid topology set` waits: the control plane's own limit for a commit, and more.
const TOPOLOGY_SET_TIMEOUT: Duration = Duration::from_secs(15);

async fn keyspace_set(
    http: SocketAddr,
    prefix: String,
    writers: Option<Vec<String>>,
) -> Result<()> {
    let body = serde_json::to_string(&braid_node::http::KeyspaceRequest {
        prefix: prefix.clone(),
        writers: writers.clone(),
    })?;
    braid_node::admin_client::post_json(http, "/keyspace", &body, TOPOLOGY_SET_TIMEOUT)
        .await
        .with_context(|| format!("keyspace {prefix:?} was not changed (through http://{http})"))?;
    match writers {
        None => println!("Committed: every region takes writes to {prefix:?}."),
        Some(writers) if writers.is_empty() => {
            println!("Committed: {prefix:?} is frozen, no region takes writes to it.")
        }
        Some(writers) => println!(
            "Committed: writes to {prefix:?} are taken only in {}.",
            writers.join(", ")
        ),
    }
    Ok(())
}

async fn topology_set(http: SocketAddr, mesh: bool, links: Option<Vec<String>>) -> Result<()> {
    let links = match (mesh, links) {
        (true, _) | (false, None) => None,
        (false, Some(links)) => {
            // Region names may hold '-': a pair with more than one is read against the
            // cluster's regions, asked of the node only then.
            let mut known = None;
            let mut pairs = Vec::with_capacity(links.len());
            for link in links {
                let pair = match split_link(&link, None) {
                    Err(LinkError::Ambiguous) => {
                        if known.is_none() {
                            known = Some(region_names(http).await?);
                        }
                        split_link(&link, known.as_ref())
                    }
                    other => other,
                };
                pairs.push(pair.map_err(|err| anyhow::anyhow!("--links: {link:?} {err}"))?);
            }
            Some(pairs)
        }
    };
    let body = serde_json::to_string(&braid_node::http::TopologyRequest {
        links: links.clone(),
    })?;
    braid_node::admin_client::post_json(http, "/topology", &body, TOPOLOGY_SET_TIMEOUT)
        .await
        .with_context(|| format!("the topology was not changed (through http://{http})"))?;
    match links {
        None => println!("Committed: every region linked to every other."),
        Some(links) => {
            let named: Vec<String> = links.iter().map(|[a, b]| format!("{a}-{b}")).collect();
            println!("Committed: links {}.", named.join(" "));
        }
    }
    Ok(())
}

/// Why a `--links` pair could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum LinkError {
    #[error("is not a pair of regions like a-b (or a:b)")]
    NotAPair,
    #[error("could be split at more than one '-': write it as a:b")]
    Ambiguous,
    #[error("names no two regions of the cluster at any '-': write it as a:b")]
    Unknown,
}

/// Reads a `--links` pair: `a:b`, or `a-b` where names may hold '-' themselves. A pair that
/// splits at more than one '-' is read against `known` (the cluster's regions): the one split
/// that names two of them. Without `known`, or with more than one such split, it is ambiguous.
fn split_link(link: &str, known: Option<&BTreeSet<String>>) -> Result<[String; 2], LinkError> {
    let pair = |a: &str, b: &str| [a.to_string(), b.to_string()];
    if let Some((a, b)) = link.split_once(':') {
        return match a.is_empty() || b.is_empty() || b.contains(':') {
            true => Err(LinkError::NotAPair),
            false => Ok(pair(a, b)),
        };
    }
    let splits: Vec<(&str, &str)> = link
        .match_indices('-')
        .map(|(at, _)| (&link[..at], &link[at + 1..]))
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .collect();
    match (splits.as_slice(), known) {
        ([], _) => Err(LinkError::NotAPair),
        ([(a, b)], _) => Ok(pair(a, b)),
        (_, None) => Err(LinkError::Ambiguous),
        (_, Some(known)) => {
            let named: Vec<&(&str, &str)> = splits
                .iter()
                .filter(|(a, b)| known.contains(*a) && known.contains(*b))
                .collect();
            match named.as_slice() {
                [] => Err(LinkError::Unknown),
                [(a, b)] => Ok(pair(a, b)),
                _ => Err(LinkError::Ambiguous),
            }
        }
    }
}

/// The regions of the cluster, as the node's control plane has committed them.
async fn region_names(http: SocketAddr) -> Result<BTreeSet<String>> {
    let status = fetch_status(http).await?;
    Ok(status.control.members.into_iter().map(|m| m.name).collect())
}

async fn status(http: SocketAddr, json: bool) -> Result<()> {
    let body = braid_node::admin_client::get(http, "/status", Duration::from_secs(5))
        .await
        .with_context(|| format!("cannot reach the node at http://{http}/status"))?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let status: Status = serde_json::from_str(&body).context("unexpected /status document")?;
    println!(
        "node {} (region {}), durability {}, hlc {}",
        status.node, status.region, status.durability, status.hlc
    );
    println!(
        "vector: {}   writes: {}   conflicts resolved: {}   change log: {} events (trimmed through {})",
        named_vector(&status.vector),
        status.writes,
        status.conflicts_resolved,
        status.change_log_events,
        named_vector_or(&status.change_log_trimmed, "nothing")
    );
    if status.tombstones_collected > 0 || status.gc_stable_hlc.is_some() {
        println!(
            "tombstones: collected from {} keys ({} forgotten) at stable hlc {}",
            status.tombstones_collected,
            status.keys_forgotten,
            status.gc_stable_hlc.as_deref().unwrap_or("none yet")
        );
    }
    if status.change_log_events_retention_trimmed > 0 || status.snapshots_installed > 0 {
        println!(
            "retention deleted {} events others may lack; data snapshots installed: {}",
            status.change_log_events_retention_trimmed, status.snapshots_installed
        );
    }
    println!();
    println!(
        "{:<8} {:<13} {:<10} {:>10} {:>8} {:>8} {:>10} {:>10} {:>10}",
        "PEER", "STATE", "PULLING", "LAG(ev)", "LAG(ms)", "P99(ms)", "SENT", "APPLIED", "DUPLICATE"
    );
    for p in &status.peers {
        let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        println!(
            "{:<8} {:<13} {:<10} {:>10} {:>8} {:>8} {:>10} {:>10} {:>10}",
            p.region,
            p.state,
            p.pulling.join(","),
            p.lag_events,
            ms(p.lag_ms),
            ms(p.lag_ms_p99),
            p.events_sent,
            p.events_applied,
            p.events_duplicate
        );
    }
    for p in status.peers.iter().filter(|p| p.events_clock_refused > 0) {
        println!(
            "warning: {} refusals of events from {} for an HLC too far ahead of this node's clock \
             (clock-skew-ms-max); that origin's replication waits until the clock catches up",
            p.events_clock_refused, p.region
        );
    }
    let control = &status.control;
    println!();
    println!(
        "control plane: leader {}, term {}, this node {}; stable frontier: {}",
        control.leader.as_deref().unwrap_or("unknown"),
        control.term,
        control.raft_role,
        named_vector_or(&control.stable_frontier, "none yet")
    );
    if control.members.is_empty() {
        println!("members: not known yet (the group has not committed its bootstrap)");
        return Ok(());
    }
    let links: Vec<String> = control
        .links
        .iter()
        .map(|[a, b]| format!("{a}-{b}"))
        .collect();
    for (prefix, keyspace) in &control.keyspaces {
        match keyspace.writers.is_empty() {
            true => println!("keyspace {prefix:?}: frozen"),
            false => println!(
                "keyspace {prefix:?}: written in {}",
                keyspace.writers.join(", ")
            ),
        }
    }
    println!(
        "links: {}{}",
        links.join(" "),
        if control.full_mesh {
            " (full mesh)"
        } else {
            ""
        }
    );
    println!(
        "{:<8} {:>4} {:<9} {:<6} {:<22} {:>12}  CHECKPOINT",
        "MEMBER", "ID", "STATE", "VOTES", "PEER ADDRESS", "REPORTED"
    );
    let now_ms = braid_node::driver::now_ms();
    for m in &control.members {
        let (reported, vector) = match &m.checkpoint {
            Some(c) => (
                format!(
                    "{:.1} s ago",
                    now_ms.saturating_sub(c.reported_ms) as f64 / 1e3
                ),
                named_vector(&c.vector),
            ),
            None => ("never".to_string(), "-".to_string()),
        };
        println!(
            "{:<8} {:>4} {:<9} {:<6} {:<22} {:>12}  {}",
            m.name,
            m.id,
            m.state,
            if m.voter { "yes" } else { "no" },
            m.peer_address,
            reported,
            vector
        );
    }
    Ok(())
}

/// [`named_vector`], or `empty` for an empty vector.
fn named_vector_or(vector: &std::collections::BTreeMap<String, u64>, empty: &str) -> String {
    match vector.is_empty() {
        true => empty.to_string(),
        false => named_vector(vector),
    }
}

/// `a=3 b=7`: a vector by region name.
fn named_vector(vector: &std::collections::BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = vector.iter().map(|(r, s)| format!("{r}={s}")).collect();
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(a: &str, b: &str) -> [String; 2] {
        [a.to_string(), b.to_string()]
    }

    #[test]
    fn a_link_splits_at_its_one_dash_or_its_colon() {
        assert_eq!(split_link("a-b", None), Ok(pair("a", "b")));
        assert_eq!(
            split_link("us-east:eu-west", None),
            Ok(pair("us-east", "eu-west"))
        );
        assert_eq!(split_link("ab", None), Err(LinkError::NotAPair));
        assert_eq!(split_link("a-", None), Err(LinkError::NotAPair));
        assert_eq!(split_link(":b", None), Err(LinkError::NotAPair));
        assert_eq!(split_link("a:b:c", None), Err(LinkError::NotAPair));
    }

    #[test]
    fn a_link_with_dashed_names_is_read_against_the_cluster_regions() {
        assert_eq!(
            split_link("us-east-eu-west", None),
            Err(LinkError::Ambiguous)
        );
        let known: BTreeSet<String> = ["us-east", "eu-west", "ap-south"].map(String::from).into();
        assert_eq!(
            split_link("us-east-eu-west", Some(&known)),
            Ok(pair("us-east", "eu-west"))
        );
        assert_eq!(
            split_link("us-east-ap-north", Some(&known)),
            Err(LinkError::Unknown)
        );
        let both: BTreeSet<String> = ["a", "a-b", "b-c", "c"].map(String::from).into();
        assert_eq!(split_link("a-b-c", Some(&both)), Err(LinkError::Ambiguous));
    }
}
