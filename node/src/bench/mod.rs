//! `braid bench`: replication throughput and lag of a local cluster, against the ceilings this
//! machine allows and against Redis, all measured in one run.
//!
//! The run: start a local cluster (or attach to one through its `cluster.json`), drive a
//! multi-master load through RESP into every region at once, let the backlog drain, read every
//! node's counters and lag histograms over HTTP, stop the cluster, then measure the storage and
//! transport ceilings alone, then Redis under the same load when `redis-server` is installed.
//! Nothing here asserts a speed: the figures go into the report.

pub mod ceilings;
pub mod load;
pub mod redis;
mod report;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;

pub use load::MixOp;
pub use report::{RegionFigures, Report};

use crate::cluster::{self, ClusterFile, InitOptions};
use crate::http::{LagHistograms, Status};
use crate::launch;
use crate::storage::Durability;

/// How long the backlog may take to drain before the run gives up waiting.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// The outage phase fails if the survivors commit no new event for this long.
const OUTAGE_STALL_MAX: Duration = Duration::from_secs(30);
/// Longest ceiling measurement (a blocking RocksDB loop that an interrupt waits for).
pub const CEILING_DURATION_MAX: Duration = Duration::from_secs(60);
/// How often the progress line is refreshed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How often drain is checked.
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// Timeout of one admin request.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Seed of the clients' key choice: every run writes the same keys.
const LOAD_SEED: u64 = 0x0062_7261_6964;
/// Largest number of regions a bench starts (names a..z).
pub const REGIONS_MAX: usize = 26;

/// A bench that could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The options make no sense.
    #[error("{0}")]
    Options(String),
    /// The cluster could not be started or reached.
    #[error("cluster: {0}")]
    Cluster(String),
    /// The load could not be driven.
    #[error("load: {0}")]
    Load(String),
    /// A ceiling could not be measured.
    #[error("ceiling: {0}")]
    Ceiling(String),
    /// Redis could not be run.
    #[error("redis: {0}")]
    Redis(String),
    /// A file could not be written.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// Whether to run the Redis comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisChoice {
    /// When `redis-server` is on the PATH.
    Auto,
    /// Never.
    Off,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Regions to start (ignored when attaching).
    pub regions: usize,
    /// Load duration.
    pub duration: Duration,
    /// Clients per region.
    pub clients: usize,
    /// Commands in flight per client.
    pub pipeline: usize,
    /// Bytes per value.
    pub value_size: usize,
    /// Keys per key space.
    pub keys: u64,
    /// Command types.
    pub mix: Vec<MixOp>,
    /// Share of writes to keys every region writes.
    pub conflict_ratio: f64,
    /// Durability of a started cluster, and of the storage ceiling.
    pub durability: Durability,
    /// Writes per second per region, or as fast as the clients go.
    pub rate_per_region: Option<u64>,
    /// Attach to the running cluster in this directory instead of starting one.
    pub attach: Option<PathBuf>,
    /// Working directory (the started cluster, the ceilings' databases, Redis); a fresh
    /// temporary one, removed afterwards, when `None`.
    pub dir: Option<PathBuf>,
    /// First port of a started cluster.
    pub base_port: u16,
    /// The Redis comparison.
    pub redis: RedisChoice,
    /// How long each ceiling is measured.
    pub ceiling_duration: Duration,
    /// After the main load: kill the last region, keep writing into the others until it lacks
    /// this many events, restart it and measure its catch-up (0: no outage phase).
    pub outage_events: u64,
    /// The `braid` executable that runs the nodes.
    pub exe: PathBuf,
    /// The command line, for the report.
    pub command_line: String,
}

impl BenchOptions {
    fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: String| Err(BenchError::Options(m));
        if self.attach.is_none() && !(2..=REGIONS_MAX).contains(&self.regions) {
            return bad(format!(
                "--regions {}: use 2 to {REGIONS_MAX} (replication needs two)",
                self.regions
            ));
        }
        if self.clients == 0 || self.clients > 1024 {
            return bad(format!("--clients {}: use 1 to 1024", self.clients));
        }
        if self.pipeline == 0 || self.pipeline > load::PIPELINE_MAX {
            return bad(format!(
                "--pipeline {}: use 1 to {}",
                self.pipeline,
                load::PIPELINE_MAX
            ));
        }
        if self.value_size > braid_protocol::limits::VALUE_BYTES_MAX {
            return bad(format!(
                "--value-size {}: at most {} bytes",
                self.value_size,
                braid_protocol::limits::VALUE_BYTES_MAX
            ));
        }
        if !(0.0..=1.0).contains(&self.conflict_ratio) {
            return bad(format!(
                "--conflict-ratio {}: use a share from 0 to 1",
                self.conflict_ratio
            ));
        }
        if self.mix.is_empty() {
            return bad("--mix: name at least one of set, incr, sadd, hset".into());
        }
        if self.keys == 0 {
            return bad("--keys: at least one key".into());
        }
        if self.ceiling_duration.is_zero() || self.ceiling_duration > CEILING_DURATION_MAX {
            return bad(format!(
                "--ceiling-duration: above 0 and at most {} s",
                CEILING_DURATION_MAX.as_secs()
            ));
        }
        if self.duration.is_zero() {
            return bad("--duration: longer than zero".into());
        }
        if self.outage_events > 0 && self.attach.is_some() {
            return bad(
                "--outage-events needs the bench's own cluster: it kills and restarts a region (leave out --attach)"
                    .into(),
            );
        }
        if let Some(rate) = self.rate_per_region {
            if rate < self.clients as u64 {
                return bad(format!(
                    "--rate {rate}: at least one write per second per client (--clients {})",
                    self.clients
                ));
            }
        }
        Ok(())
    }
}

/// What the run is doing, for a progress line.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A new phase begins.
    Phase(String),
    /// Load is running.
    Load {
        /// Seconds into the load.
        elapsed_s: f64,
        /// Of this many.
        duration_s: f64,
        /// Writes acknowledged in the last interval, per second.
        acked_per_s: f64,
        /// Replicated events applied in the last interval, per second, summed over regions
        /// (none for Redis, whose replicas are measured by offset).
        applied_per_s: Option<f64>,
        /// Writes acknowledged so far.
        acked: u64,
    },
    /// A region is down and the others are being written.
    Outage {
        /// Events the others committed since it went down.
        events: u64,
        /// Of this many.
        target: u64,
        /// Writes acknowledged in the last interval, per second.
        acked_per_s: f64,
    },
}

/// Lag percentiles, milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LagSummary {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Samples.
    pub count: u64,
}

impl LagSummary {
    /// Percentiles of `histogram`, whose values are in units of `1 / per_ms` milliseconds.
    pub fn of(histogram: &Histogram<u64>, per_ms: f64) -> LagSummary {
        let at = |q: f64| histogram.value_at_quantile(q) as f64 / per_ms;
        LagSummary {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: histogram.max() as f64 / per_ms,
            count: histogram.len(),
        }
    }
}

/// Lag histogram: 1 unit to an hour in microseconds, 3 significant digits.
pub(crate) fn lag_histogram() -> Histogram<u64> {
    // Valid bounds (1 <= low, high >= 2 * low, sigfig <= 5): construction cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// One region of the cluster under test.
#[derive(Debug, Clone)]
struct Region {
    name: String,
    resp: SocketAddr,
    http: SocketAddr,
    pid: Option<u32>,
}

/// Every region's admin documents at one moment.
#[derive(Debug, Clone, Default)]
struct Reading {
    statuses: Vec<Status>,
    lags: Vec<LagHistograms>,
    usage: Vec<Option<launch::ProcessUsage>>,
}

impl Reading {
    async fn take(regions: &[Region]) -> Result<Reading, BenchError> {
        let mut reading = Reading::default();
        for region in regions {
            reading.statuses.push(get_json(region, "/status").await?);
            reading.lags.push(get_json(region, "/lag").await?);
            reading.usage.push(region.pid.and_then(launch::usage));
        }
        Ok(reading)
    }

    fn applied(&self, region: usize) -> u64 {
        self.statuses[region]
            .peers
            .iter()
            .map(|p| p.events_applied)
            .sum()
    }

    fn applied_total(&self) -> u64 {
        (0..self.statuses.len()).map(|r| self.applied(r)).sum()
    }

    /// Summed over every region and peer: (events sent, batches sent, bytes sent).
    fn traffic(&self) -> (u64, u64, u64) {
        self.statuses
            .iter()
            .flat_map(|s| &s.peers)
            .fold((0, 0, 0), |(e, b, y), p| {
                (e + p.events_sent, b + p.batches_sent, y + p.bytes_sent)
            })
    }
}

async fn statuses(regions: &[Region]) -> Result<Vec<Status>, BenchError> {
    let mut statuses = Vec::with_capacity(regions.len());
    for region in regions {
        statuses.push(get_json(region, "/status").await?);
    }
    Ok(statuses)
}

/// Load being driven in the background. Dropped without [`RunningLoad::finish`] (an early
/// return), it aborts the clients.
struct RunningLoad {
    counters: Arc<load::LoadCounters>,
    stop: watch::Sender<bool>,
    driver: tokio::task::JoinHandle<Result<Vec<load::TargetResult>, BenchError>>,
}

impl RunningLoad {
    fn start(targets: Vec<load::Target>, spec: load::LoadSpec) -> RunningLoad {
        let counters = Arc::new(load::LoadCounters::default());
        let (stop, stopped) = watch::channel(false);
        let driver = {
            let counters = counters.clone();
            tokio::spawn(async move { load::drive(&targets, &spec, counters, stopped).await })
        };
        RunningLoad {
            counters,
            stop,
            driver,
        }
    }

    fn to(regions: &[Region], spec: load::LoadSpec) -> RunningLoad {
        let targets = regions
            .iter()
            .map(|r| load::Target {
                name: r.name.clone(),
                addr: r.resp,
            })
            .collect();
        RunningLoad::start(targets, spec)
    }

    fn acked(&self) -> u64 {
        self.counters.acked.load(Ordering::Relaxed)
    }

    /// Whether the clients stopped on their own (an error).
    fn failed(&self) -> bool {
        self.driver.is_finished()
    }

    /// Stops the clients and collects what they did.
    async fn finish(mut self) -> Result<Vec<load::TargetResult>, BenchError> {
        let _ = self.stop.send(true);
        (&mut self.driver)
            .await
            .map_err(|e| BenchError::Load(e.to_string()))?
    }
}

impl Drop for RunningLoad {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(
    region: &Region,
    path: &str,
) -> Result<T, BenchError> {
    let body = crate::admin_client::get(region.http, path, ADMIN_TIMEOUT)
        .await
        .map_err(|e| {
            BenchError::Cluster(format!(
                "region {} at http://{}{path}: {e}",
                region.name, region.http
            ))
        })?;
    serde_json::from_str(&body).map_err(|e| {
        BenchError::Cluster(format!(
            "region {} answered {path} with an unexpected document: {e}",
            region.name
        ))
    })
}

/// A histogram from a node's `(value, count)` pairs, with values scaled by `scale`.
pub(crate) fn histogram_of(values: &[(u64, u64)], scale: u64) -> Histogram<u64> {
    let mut histogram = lag_histogram();
    for (value, count) in values {
        histogram.saturating_record_n(value.saturating_mul(scale).max(1), *count);
    }
    histogram
}

/// Lag recorded between two readings of one region, in microseconds (node values are whole
/// milliseconds).
fn lag_between(before: &LagHistograms, after: &LagHistograms) -> Histogram<u64> {
    let mut total = lag_histogram();
    for (origin, values) in &after.origins {
        let earlier = before.origins.get(origin).map(Vec::as_slice);
        let _ = total.add(lag_delta(earlier, values, 1000));
    }
    total
}

/// The lag one origin's histogram gained between two readings of a node, values scaled by
/// `scale`. A count that went down means the node restarted between them: all of `after` is
/// new.
pub(crate) fn lag_delta(
    before: Option<&[(u64, u64)]>,
    after: &[(u64, u64)],
    scale: u64,
) -> Histogram<u64> {
    let mut delta = histogram_of(after, scale);
    if let Some(before) = before {
        if delta.subtract(histogram_of(before, scale)).is_err() {
            delta = histogram_of(after, scale);
        }
    }
    delta
}

/// A working directory: given, or temporary and removed on drop.
pub(crate) struct WorkDir {
    pub(crate) path: PathBuf,
    remove: bool,
}

impl WorkDir {
    /// `given`, or a new temporary directory named after `prefix`.
    pub(crate) fn new(given: Option<&Path>, prefix: &str) -> Result<WorkDir, BenchError> {
        let (path, remove) = match given {
            Some(path) => (path.to_owned(), false),
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                let name = format!("{prefix}-{}-{nanos}", std::process::id());
                (std::env::temp_dir().join(name), true)
            }
        };
        std::fs::create_dir_all(&path)
            .map_err(|e| BenchError::Io(path.display().to_string(), e))?;
        Ok(WorkDir { path, remove })
    }

    /// Whether the directory is removed when this is dropped (a temporary one).
    pub(crate) fn removed(&self) -> bool {
        self.remove
    }

    /// Keeps a temporary directory after all.
    pub(crate) fn keep(&mut self) {
        self.remove = false;
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A cluster under test: started here (stopped at the end) or attached to.
struct UnderTest {
    file: ClusterFile,
    regions: Vec<Region>,
    started: Option<Vec<tokio::process::Child>>,
    durability: String,
    /// Where a started cluster's cluster.json lives.
    dir: Option<PathBuf>,
}

impl UnderTest {
    /// The RESP password the cluster's configurations hold (an attached cluster may have one).
    fn password(&self) -> Option<String> {
        let first = self.file.regions.first()?;
        crate::config::NodeConfig::load(&first.config)
            .ok()?
            .password
    }

    /// The load's settings for this cluster.
    fn load_spec(&self, options: &BenchOptions) -> load::LoadSpec {
        load::LoadSpec {
            password: self.password(),
            ..load_spec(options, options.clients)
        }
    }

    async fn start(options: &BenchOptions, work: &Path) -> Result<UnderTest, BenchError> {
        let fail = |e: &dyn std::fmt::Display| BenchError::Cluster(e.to_string());
        let (mut file, started) = match &options.attach {
            Some(dir) => {
                let file = ClusterFile::load(dir).map_err(|e| fail(&e))?;
                (file, None)
            }
            None => {
                let dir = work.join("cluster");
                let mut file = cluster::init(&InitOptions {
                    regions: cluster::default_region_names(options.regions),
                    dir: dir.clone(),
                    host: [127, 0, 0, 1].into(),
                    base_port: options.base_port,
                    links: None,
                    durability: options.durability,
                    password: None,
                    fault_injection: false,
                    change_log_gc: true,
                })
                .map_err(|e| fail(&e))?;
                let mut children =
                    launch::spawn(&mut file, &options.exe, false).map_err(|e| fail(&e))?;
                file.save(&dir).map_err(|e| fail(&e))?;
                launch::wait_healthy(&file, &mut children, Duration::from_secs(30))
                    .await
                    .map_err(|e| fail(&e))?;
                let late = launch::wait_meshed(&file, Duration::from_secs(15)).await;
                if !late.is_empty() {
                    return Err(BenchError::Cluster(format!(
                        "regions {} did not connect to all their peers",
                        late.join(", ")
                    )));
                }
                (file, Some((children, dir)))
            }
        };
        let (started, dir) = match started {
            Some((children, dir)) => (Some(children), Some(dir)),
            None => (None, None),
        };
        let mut regions = Vec::new();
        for entry in &mut file.regions {
            let parse = |addr: &str| {
                addr.parse::<SocketAddr>().map_err(|_| {
                    BenchError::Cluster(format!("region {}: bad address {addr:?}", entry.name))
                })
            };
            regions.push(Region {
                name: entry.name.clone(),
                resp: parse(&entry.resp)?,
                http: parse(&entry.http)?,
                pid: entry.pid,
            });
        }
        if regions.len() < 2 {
            return Err(BenchError::Cluster(
                "the cluster has fewer than two regions: nothing replicates".into(),
            ));
        }
        let first: Status = get_json(&regions[0], "/status").await?;
        Ok(UnderTest {
            file,
            regions,
            started,
            durability: first.durability,
            dir,
        })
    }

    async fn stop(self) {
        if self.started.is_some() {
            launch::stop(&self.file).await;
        }
    }
}

/// Runs the whole bench.
pub async fn run(
    options: &BenchOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report, BenchError> {
    options.validate()?;
    let work = WorkDir::new(options.dir.as_deref(), "braid-bench")?;
    progress(Progress::Phase(match &options.attach {
        Some(dir) => format!("attaching to the cluster in {}", dir.display()),
        None => format!(
            "starting {} regions ({} durability)",
            options.regions, options.durability
        ),
    }));
    let mut cluster = UnderTest::start(options, &work.path).await?;
    let measured = measure_cluster(options, &cluster, progress).await;
    let outage = match &measured {
        Ok(measured) if options.outage_events > 0 => {
            Some(measure_outage(options, &mut cluster, measured, progress).await)
        }
        _ => None,
    };
    cluster_stop(cluster, progress).await;
    let measured = measured?;
    let outage = outage.transpose()?;

    // Keys as the clients write them: b:<type>:<region>:<index>.
    let name_bytes = measured
        .regions
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(1);
    let key_bytes = "b:s::".len() + name_bytes + options.keys.saturating_sub(1).to_string().len();
    // The cluster's own mode (an attached cluster may differ from --durability).
    let durability = match measured.durability.as_str() {
        "machine" => Durability::Machine,
        _ => Durability::Process,
    };
    progress(Progress::Phase("measuring the storage ceiling".into()));
    let storage_dir = work.path.join("ceiling-rocksdb");
    let _ = std::fs::remove_dir_all(&storage_dir);
    let storage = {
        let dir = storage_dir.clone();
        let batch = measured.events_per_batch.round().max(1.0) as usize;
        let value = options.value_size;
        let duration = options.ceiling_duration;
        tokio::task::spawn_blocking(move || {
            ceilings::storage(&dir, durability, batch, key_bytes, value, duration)
        })
        .await
        .map_err(|e| BenchError::Ceiling(e.to_string()))??
    };
    let _ = std::fs::remove_dir_all(&storage_dir);
    progress(Progress::Phase("measuring the transport ceiling".into()));
    let frame_bytes =
        (measured.bytes_per_event * measured.events_per_batch.max(1.0)).round() as usize;
    let transport = ceilings::transport(
        frame_bytes,
        measured.events_per_batch.max(1.0),
        options.ceiling_duration,
    )
    .await?;

    let redis = match (options.redis, redis::find_server()) {
        (RedisChoice::Auto, Some(server)) => {
            progress(Progress::Phase(format!(
                "running the same load against Redis (1 primary, {} replicas)",
                measured.regions.len() - 1
            )));
            let names: Vec<String> = measured.regions.iter().map(|r| r.name.clone()).collect();
            Some(run_redis(options, &server, &work.path, &names, progress).await?)
        }
        _ => None,
    };
    Ok(Report::new(
        options, measured, outage, storage, transport, redis,
    ))
}

async fn cluster_stop(cluster: UnderTest, progress: &mut dyn FnMut(Progress)) {
    if cluster.started.is_some() {
        progress(Progress::Phase("stopping the cluster".into()));
    }
    cluster.stop().await;
}

/// What the cluster run measured.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Per region.
    pub regions: Vec<RegionFigures>,
    /// Load time.
    pub load_s: f64,
    /// Time from the end of the load until every region had applied everything, if it did.
    pub drain_ms: Option<f64>,
    /// Lag over every region.
    pub lag: LagSummary,
    /// Frame bytes sent per event sent (acks and heartbeats included).
    pub bytes_per_event: f64,
    /// Events per replication batch.
    pub events_per_batch: f64,
    /// Client round trip of a whole pipeline, ms.
    pub round_trip_ms: LagSummary,
    /// The cluster's durability mode.
    pub durability: String,
    /// Writes answered with an error, and the first error.
    pub errors: (u64, Option<String>),
}

async fn measure_cluster(
    options: &BenchOptions,
    cluster: &UnderTest,
    progress: &mut dyn FnMut(Progress),
) -> Result<Measured, BenchError> {
    let regions = &cluster.regions;
    let before = Reading::take(regions).await?;
    progress(Progress::Phase(format!(
        "writing into {} regions for {:.0} s ({} clients x pipeline {} each)",
        regions.len(),
        options.duration.as_secs_f64(),
        options.clients,
        options.pipeline
    )));
    let load = RunningLoad::to(regions, cluster.load_spec(options));
    let started = Instant::now();
    let mut last = (Instant::now(), 0u64, before.applied_total());
    while started.elapsed() < options.duration && !load.failed() {
        let left = options.duration.saturating_sub(started.elapsed());
        tokio::time::sleep(left.min(PROGRESS_EVERY)).await;
        let acked = load.acked();
        let applied = Reading::take(regions).await?.applied_total();
        let dt = last.0.elapsed().as_secs_f64().max(1e-3);
        progress(Progress::Load {
            elapsed_s: started.elapsed().as_secs_f64(),
            duration_s: options.duration.as_secs_f64(),
            acked_per_s: (acked - last.1) as f64 / dt,
            applied_per_s: Some(applied.saturating_sub(last.2) as f64 / dt),
            acked,
        });
        last = (Instant::now(), acked, applied);
    }
    let results = load.finish().await?;
    let load_s = started.elapsed().as_secs_f64();
    let stopped_at = Instant::now();

    progress(Progress::Phase("waiting for the backlog to drain".into()));
    let drain_ms = loop {
        let statuses = statuses(regions).await?;
        let first = &statuses[0].vector;
        if statuses.iter().all(|s| &s.vector == first) {
            break Some(stopped_at.elapsed().as_secs_f64() * 1000.0);
        }
        if stopped_at.elapsed() > DRAIN_TIMEOUT {
            break None;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    };
    let after = Reading::take(regions).await?;
    // Applies are counted up to this reading: the rate's window ends here too.
    let replicated_s = load_s + stopped_at.elapsed().as_secs_f64();

    let mut all_lag = lag_histogram();
    let mut round_trips = lag_histogram();
    let mut figures = Vec::new();
    let mut errors = (0, None);
    for (i, region) in regions.iter().enumerate() {
        let result = results.iter().find(|r| r.name == region.name);
        let lag = lag_between(&before.lags[i], &after.lags[i]);
        let _ = all_lag.add(&lag);
        if let Some(result) = result {
            let _ = round_trips.add(&result.round_trip_us);
            errors.0 += result.errors;
            errors.1 = errors.1.take().or(result.first_error.clone());
        }
        let applied = after.applied(i).saturating_sub(before.applied(i));
        let (cpu_s, peak_rss_bytes) = match (before.usage[i], after.usage[i]) {
            (Some(b), Some(a)) => (Some(a.cpu_s - b.cpu_s), Some(a.peak_rss_bytes)),
            _ => (None, None),
        };
        let acked = result.map_or(0, |r| r.acked);
        figures.push(RegionFigures {
            name: region.name.clone(),
            acked_writes: acked,
            events_originated: after.statuses[i]
                .writes
                .saturating_sub(before.statuses[i].writes),
            acked_writes_per_s: acked as f64 / load_s,
            replicated_events: applied,
            replicated_events_per_s: applied as f64 / replicated_s,
            lag_ms: LagSummary::of(&lag, 1000.0),
            cpu_s,
            peak_rss_mb: peak_rss_bytes.map(|b| b as f64 / 1e6),
        });
    }
    let (events_before, batches_before, bytes_before) = before.traffic();
    let (events_after, batches_after, bytes_after) = after.traffic();
    let events = events_after.saturating_sub(events_before).max(1);
    let batches = batches_after.saturating_sub(batches_before).max(1);
    let bytes = bytes_after.saturating_sub(bytes_before);
    Ok(Measured {
        regions: figures,
        load_s,
        drain_ms,
        lag: LagSummary::of(&all_lag, 1000.0),
        bytes_per_event: bytes as f64 / events as f64,
        events_per_batch: events as f64 / batches as f64,
        round_trip_ms: LagSummary::of(&round_trips, 1000.0),
        durability: cluster.durability.clone(),
        errors,
    })
}

/// The outage phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct OutageFigures {
    /// The region that was killed and restarted.
    pub region: String,
    /// Events the others committed while it was down.
    pub events_during_outage: u64,
    /// Events it lacked when it came back: what the survivors held beyond its vector when it
    /// was killed.
    pub backlog_events: u64,
    /// Seconds it was down.
    pub outage_s: f64,
    /// Seconds from its restart until it served again.
    pub restart_s: f64,
    /// Seconds from its restart until it had applied the whole backlog (null if it did not
    /// within the drain timeout).
    pub catch_up_s: Option<f64>,
    /// Backlog events applied per second of catch-up.
    pub catch_up_events_per_s: f64,
    /// The steady replicated rate of the main load (slowest region), for comparison.
    pub steady_replicated_events_per_s: f64,
    /// Per surviving region: resident megabytes when the outage began and at its end, and the
    /// most seen in between.
    pub rss_mb: Vec<RssFigures>,
}

/// One surviving region's memory over the outage.
#[derive(Debug, Clone, Serialize)]
pub struct RssFigures {
    /// Region.
    pub name: String,
    /// Resident megabytes when the outage began.
    pub start: f64,
    /// At its end.
    pub end: f64,
    /// Most seen in between (sampled every second).
    pub max: f64,
}

async fn measure_outage(
    options: &BenchOptions,
    cluster: &mut UnderTest,
    measured: &Measured,
    progress: &mut dyn FnMut(Progress),
) -> Result<OutageFigures, BenchError> {
    let victim = cluster.regions.len() - 1;
    let name = cluster.regions[victim].name.clone();
    let survivors: Vec<Region> = cluster.regions[..victim].to_vec();
    let Some(children) = cluster.started.as_mut() else {
        return Err(BenchError::Options(
            "--outage-events needs the bench's own cluster".into(),
        ));
    };
    progress(Progress::Phase(format!(
        "outage: killing region {name} (kill -9), writing {} events into the others",
        options.outage_events
    )));
    // Everything drained after the main load: what the victim holds now is what it had.
    let held_before = get_json::<Status>(&cluster.regions[victim], "/status")
        .await?
        .vector;
    let _ = children[victim].start_kill();
    let _ = children[victim].wait().await;
    cluster.file.regions[victim].pid = None;
    cluster.regions[victim].pid = None;
    let down_at = Instant::now();
    let rss = |r: &Region| {
        r.pid
            .and_then(launch::usage)
            .map_or(0.0, |u| u.rss_bytes as f64 / 1e6)
    };
    let mut rss_mb: Vec<RssFigures> = survivors
        .iter()
        .map(|r| RssFigures {
            name: r.name.clone(),
            start: rss(r),
            end: 0.0,
            max: rss(r),
        })
        .collect();
    let originated = |statuses: &[Status]| -> u64 { statuses.iter().map(|s| s.writes).sum() };
    let before = originated(&Reading::take(&survivors).await?.statuses);
    // Only a cluster the bench started, which has no password.
    let load = RunningLoad::to(&survivors, load_spec(options, options.clients));
    let mut written = 0;
    let mut last = (Instant::now(), 0u64);
    let mut progressed_at = Instant::now();
    while written < options.outage_events && !load.failed() {
        tokio::time::sleep(PROGRESS_EVERY).await;
        let now_written = originated(&statuses(&survivors).await?).saturating_sub(before);
        if now_written > written {
            progressed_at = Instant::now();
        } else if progressed_at.elapsed() > OUTAGE_STALL_MAX {
            return Err(BenchError::Load(format!(
                "the outage phase made no new events for {OUTAGE_STALL_MAX:?} (at {written} of {}): with this mix and key count every write may change nothing",
                options.outage_events
            )));
        }
        written = now_written;
        for (figures, region) in rss_mb.iter_mut().zip(&survivors) {
            figures.max = figures.max.max(rss(region));
        }
        let acked = load.acked();
        let dt = last.0.elapsed().as_secs_f64().max(1e-3);
        progress(Progress::Outage {
            events: written,
            target: options.outage_events,
            acked_per_s: (acked - last.1) as f64 / dt,
        });
        last = (Instant::now(), acked);
    }
    load.finish().await?;
    for (figures, region) in rss_mb.iter_mut().zip(&survivors) {
        figures.end = rss(region);
        figures.max = figures.max.max(figures.end);
    }
    // The survivors converge first: the backlog is everything any of them holds.
    let drain_started = Instant::now();
    let target = loop {
        let statuses = statuses(&survivors).await?;
        if statuses.iter().all(|s| s.vector == statuses[0].vector) {
            break statuses[0].vector.clone();
        }
        if drain_started.elapsed() > DRAIN_TIMEOUT {
            return Err(BenchError::Cluster(
                "the surviving regions did not converge after the outage".into(),
            ));
        }
        tokio::time::sleep(DRAIN_POLL).await;
    };
    let written = originated(&statuses(&survivors).await?).saturating_sub(before);
    let backlog: u64 = target
        .iter()
        .map(|(origin, seq)| seq.saturating_sub(held_before.get(origin).copied().unwrap_or(0)))
        .sum();
    let outage_s = down_at.elapsed().as_secs_f64();

    progress(Progress::Phase(format!("restarting region {name}")));
    let restarted_at = Instant::now();
    let fail = |e: &dyn std::fmt::Display| BenchError::Cluster(e.to_string());
    let entry = &mut cluster.file.regions[victim];
    children[victim] = launch::spawn_region(entry, &options.exe, false).map_err(|e| fail(&e))?;
    cluster.regions[victim].pid = entry.pid;
    if let Some(dir) = &cluster.dir {
        cluster.file.save(dir).map_err(|e| fail(&e))?;
    }
    let entry = &cluster.file.regions[victim];
    let single = ClusterFile {
        regions: vec![entry.clone()],
    };
    launch::wait_healthy(
        &single,
        &mut children[victim..=victim],
        Duration::from_secs(60),
    )
    .await
    .map_err(|e| fail(&e))?;
    let serving_at = Instant::now();
    let region = cluster.regions[victim].clone();
    progress(Progress::Phase(format!(
        "region {name} serves again; catching up {backlog} events"
    )));
    // Catch-up is timed from the restart: replication starts before the HTTP server answers.
    let catch_up_s = loop {
        let status: Status = get_json(&region, "/status").await?;
        let caught_up = target
            .iter()
            .all(|(origin, seq)| status.vector.get(origin).copied().unwrap_or(0) >= *seq);
        if caught_up {
            break Some(restarted_at.elapsed().as_secs_f64());
        }
        if serving_at.elapsed() > DRAIN_TIMEOUT {
            break None;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    };
    Ok(OutageFigures {
        region: name,
        events_during_outage: written,
        backlog_events: backlog,
        outage_s,
        restart_s: serving_at.duration_since(restarted_at).as_secs_f64(),
        catch_up_s,
        catch_up_events_per_s: catch_up_s.map_or(0.0, |s| backlog as f64 / s.max(1e-3)),
        steady_replicated_events_per_s: measured
            .regions
            .iter()
            .map(|r| r.replicated_events_per_s)
            .fold(f64::INFINITY, f64::min),
        rss_mb,
    })
}

fn load_spec(options: &BenchOptions, clients: usize) -> load::LoadSpec {
    load::LoadSpec {
        clients,
        pipeline: options.pipeline,
        value_size: options.value_size,
        keys: options.keys,
        mix: options.mix.clone(),
        conflict_ratio: options.conflict_ratio,
        rate_per_target: options.rate_per_region,
        password: None,
        seed: LOAD_SEED,
    }
}

async fn run_redis(
    options: &BenchOptions,
    server: &Path,
    work: &Path,
    regions: &[String],
    progress: &mut dyn FnMut(Progress),
) -> Result<redis::RedisResult, BenchError> {
    let set = redis::start(server, &work.join("redis"), regions.len().saturating_sub(1)).await?;
    // The same clients as each region's, with the same names (so the same keys, from the same
    // seeds), all on the primary: replicas take no writes.
    let spec = load_spec(options, options.clients);
    let targets = regions
        .iter()
        .map(|name| load::Target {
            name: name.clone(),
            addr: set.primary,
        })
        .collect();
    let load = RunningLoad::start(targets, spec);
    let started = Instant::now();
    let sampler = {
        let stopped = load.stop.subscribe();
        async { redis::sample_lag(&set, stopped).await }
    };
    let clock = async {
        let mut last = (Instant::now(), 0u64);
        while started.elapsed() < options.duration {
            let left = options.duration.saturating_sub(started.elapsed());
            tokio::time::sleep(left.min(PROGRESS_EVERY)).await;
            let acked = load.acked();
            let dt = last.0.elapsed().as_secs_f64().max(1e-3);
            progress(Progress::Load {
                elapsed_s: started.elapsed().as_secs_f64(),
                duration_s: options.duration.as_secs_f64(),
                acked_per_s: (acked - last.1) as f64 / dt,
                applied_per_s: None,
                acked,
            });
            last = (Instant::now(), acked);
        }
        // The writers stop; the sampler goes on until the replicas reached the last offsets.
        let _ = load.stop.send(true);
        started.elapsed().as_secs_f64()
    };
    let (lag, elapsed) = tokio::join!(sampler, clock);
    let results = load.finish().await?;
    let acked: u64 = results.iter().map(|r| r.acked).sum();
    Ok(redis::RedisResult {
        version: set.version.clone(),
        replicas: set.replicas.len(),
        writes_per_s: acked as f64 / elapsed,
        replica_lag_ms: LagSummary::of(&lag?, 1000.0),
        config: redis::CONFIG.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> BenchOptions {
        BenchOptions {
            regions: 3,
            duration: Duration::from_secs(1),
            clients: 1,
            pipeline: 1,
            value_size: 100,
            keys: 10,
            mix: vec![MixOp::Set],
            conflict_ratio: 0.0,
            durability: Durability::Process,
            rate_per_region: None,
            attach: None,
            dir: None,
            base_port: 17000,
            redis: RedisChoice::Off,
            ceiling_duration: Duration::from_secs(1),
            outage_events: 0,
            exe: PathBuf::from("braid"),
            command_line: String::new(),
        }
    }

    #[test]
    fn options_out_of_range_are_refused_with_the_flag_named() {
        type Case = (fn(&mut BenchOptions), &'static str);
        let cases: Vec<Case> = vec![
            (|o| o.regions = 1, "--regions"),
            (|o| o.pipeline = 0, "--pipeline"),
            (|o| o.conflict_ratio = 1.5, "--conflict-ratio"),
            (|o| o.mix.clear(), "--mix"),
            (|o| o.value_size = 2 << 20, "--value-size"),
            (|o| o.rate_per_region = Some(0), "--rate"),
            (
                |o| {
                    o.outage_events = 10;
                    o.attach = Some(PathBuf::from("x"));
                },
                "--outage-events",
            ),
        ];
        for (change, flag) in cases {
            let mut o = options();
            change(&mut o);
            let err = o.validate().unwrap_err().to_string();
            assert!(err.contains(flag), "{err}");
        }
        assert!(options().validate().is_ok());
    }

    #[test]
    fn lag_between_readings_counts_only_new_samples_in_microseconds() {
        let before = LagHistograms {
            region: "a".into(),
            origins: [("b".to_string(), vec![(1, 10)])].into(),
        };
        let after = LagHistograms {
            region: "a".into(),
            origins: [
                ("b".to_string(), vec![(1, 10), (3, 5)]),
                ("c".to_string(), vec![(2, 1)]),
            ]
            .into(),
        };
        let lag = lag_between(&before, &after);
        assert_eq!(lag.len(), 6);
        assert!(lag.min() >= 1990 && lag.max() <= 3010, "{lag:?}");
    }
}
