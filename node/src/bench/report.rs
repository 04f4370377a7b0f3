//! The bench's report: JSON for tools, a table for people.

use std::fmt::Write as _;

use serde::Serialize;

use super::ceilings::{StorageCeiling, TransportCeiling};
use super::redis::RedisResult;
use super::{BenchOptions, LagSummary, Measured, MixOp, OutageFigures, RedisChoice};

/// One region's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RegionFigures {
    /// Region name.
    pub name: String,
    /// Writes its clients had acknowledged.
    pub acked_writes: u64,
    /// Per second of load.
    pub acked_writes_per_s: f64,
    /// Events it originated (its committed local writes; a write that changes nothing, such as
    /// SADD of a present member, makes none).
    pub events_originated: u64,
    /// Events of other regions it applied.
    pub replicated_events: u64,
    /// Per second, from the start of the load until the backlog had drained.
    pub replicated_events_per_s: f64,
    /// Lag of the events it applied, from their commit at the origin (HLC milliseconds: 1 ms
    /// resolution).
    pub lag_ms: LagSummary,
    /// CPU seconds its process used during the run (unknown when attached without pids).
    pub cpu_s: Option<f64>,
    /// Its peak resident memory, megabytes.
    pub peak_rss_mb: Option<f64>,
}

/// The run's settings, as the report records them.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Regions.
    pub regions: usize,
    /// Load seconds.
    pub duration_s: f64,
    /// Clients per region.
    pub clients: usize,
    /// Pipeline depth.
    pub pipeline: usize,
    /// Value bytes.
    pub value_size: usize,
    /// Keys per key space.
    pub keys: u64,
    /// Command mix.
    pub mix: Vec<MixOp>,
    /// Share of conflicting writes.
    pub conflict_ratio: f64,
    /// Durability mode of the cluster.
    pub durability: String,
    /// Writes per second per region, when limited.
    pub rate_per_region: Option<u64>,
    /// Attached to an existing cluster.
    pub attached: bool,
    /// Whether Redis was left out (`--no-redis`), as opposed to not found.
    pub no_redis: bool,
}

/// The ceilings.
#[derive(Debug, Clone, Serialize)]
pub struct Ceilings {
    /// Raw RocksDB write batches: events per second.
    pub storage_events_per_s: f64,
    /// Raw QUIC stream on loopback: events per second.
    pub transport_events_per_s: f64,
    /// How the storage ceiling was measured.
    pub storage: StorageCeiling,
    /// How the transport ceiling was measured.
    pub transport: TransportCeiling,
}

/// Braid's figures as ratios of the baselines.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// Slowest region's replicated rate / storage ceiling.
    pub replicated_vs_storage_ceiling: f64,
    /// Slowest region's replicated rate / transport ceiling.
    pub replicated_vs_transport_ceiling: f64,
    /// Slowest region's replicated rate / the lower ceiling.
    pub replicated_vs_lower_ceiling: f64,
    /// Braid's acknowledged writes / Redis's, when Redis ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writes_vs_redis: Option<f64>,
    /// Braid's lag p50 / Redis replicas' lag p50, when Redis ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_p50_vs_redis: Option<f64>,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The command line that produced it.
    pub command: String,
    /// Braid's version.
    pub braid_version: String,
    /// Seconds since the Unix epoch when the report was made.
    pub finished_at_unix_s: u64,
    /// Settings.
    pub settings: Settings,
    /// Writes acknowledged per second, all regions together (client side).
    pub acked_writes_per_s: f64,
    /// Replicated events applied per second at the slowest region.
    pub replicated_events_per_s: f64,
    /// Replication lag over every region, ms (1 ms resolution).
    pub lag_ms: LagSummary,
    /// Client round trip of a whole pipeline, ms.
    pub client_round_trip_ms: LagSummary,
    /// From the end of the load until every region had applied everything, ms (null if it did
    /// not within the drain timeout).
    pub drain_ms: Option<f64>,
    /// Frame bytes sent per replicated event (acks and heartbeats included).
    pub bytes_per_event: f64,
    /// Events per replication batch.
    pub events_per_batch: f64,
    /// Writes answered with an error.
    pub write_errors: u64,
    /// The first error answer, if any.
    pub first_write_error: Option<String>,
    /// Per region.
    pub regions: Vec<RegionFigures>,
    /// The outage phase (`--outage-events`), when it ran.
    pub outage: Option<OutageFigures>,
    /// The ceilings measured in the same run.
    pub ceilings: Ceilings,
    /// Redis under the same load, when it ran.
    pub redis: Option<RedisResult>,
    /// Ratios.
    pub ratios: Ratios,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

impl Report {
    /// Assembles the report.
    pub fn new(
        options: &BenchOptions,
        measured: Measured,
        outage: Option<OutageFigures>,
        storage: StorageCeiling,
        transport: TransportCeiling,
        redis: Option<RedisResult>,
    ) -> Report {
        let acked: f64 = measured.regions.iter().map(|r| r.acked_writes_per_s).sum();
        let replicated = measured
            .regions
            .iter()
            .map(|r| r.replicated_events_per_s)
            .fold(f64::INFINITY, f64::min);
        let replicated = if replicated.is_finite() {
            replicated
        } else {
            0.0
        };
        let lower = storage.events_per_s.min(transport.events_per_s);
        let ratios = Ratios {
            replicated_vs_storage_ceiling: ratio(replicated, storage.events_per_s),
            replicated_vs_transport_ceiling: ratio(replicated, transport.events_per_s),
            replicated_vs_lower_ceiling: ratio(replicated, lower),
            writes_vs_redis: redis.as_ref().map(|r| ratio(acked, r.writes_per_s)),
            lag_p50_vs_redis: redis
                .as_ref()
                .map(|r| ratio(measured.lag.p50, r.replica_lag_ms.p50)),
        };
        Report {
            command: options.command_line.clone(),
            braid_version: env!("CARGO_PKG_VERSION").into(),
            finished_at_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            settings: Settings {
                regions: measured.regions.len(),
                duration_s: options.duration.as_secs_f64(),
                clients: options.clients,
                pipeline: options.pipeline,
                value_size: options.value_size,
                keys: options.keys,
                mix: options.mix.clone(),
                conflict_ratio: options.conflict_ratio,
                durability: measured.durability.clone(),
                rate_per_region: options.rate_per_region,
                attached: options.attach.is_some(),
                no_redis: options.redis == RedisChoice::Off,
            },
            acked_writes_per_s: acked,
            replicated_events_per_s: replicated,
            lag_ms: measured.lag,
            client_round_trip_ms: measured.round_trip_ms,
            drain_ms: measured.drain_ms,
            bytes_per_event: measured.bytes_per_event,
            events_per_batch: measured.events_per_batch,
            write_errors: measured.errors.0,
            first_write_error: measured.errors.1,
            regions: measured.regions,
            outage,
            ceilings: Ceilings {
                storage_events_per_s: storage.events_per_s,
                transport_events_per_s: transport.events_per_s,
                storage,
                transport,
            },
            redis,
            ratios,
        }
    }

    /// The final table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let s = &self.settings;
        let _ = writeln!(
            out,
            "braid bench: {} regions, {:.0} s, {} clients x pipeline {} per region, {} B values, mix {}, conflicts {:.0}%, durability {}",
            s.regions,
            s.duration_s,
            s.clients,
            s.pipeline,
            s.value_size,
            s.mix.iter().map(|m| format!("{m:?}").to_lowercase()).collect::<Vec<_>>().join(","),
            s.conflict_ratio * 100.0,
            s.durability
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<8} {:>12} {:>14} {:>10} {:>10} {:>10} {:>10} {:>8} {:>9}",
            "REGION",
            "ACKED/s",
            "REPLICATED/s",
            "LAG p50",
            "LAG p99",
            "LAG p99.9",
            "LAG max",
            "CPU s",
            "RSS MB"
        );
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        for r in &self.regions {
            // No sample, no lag: "-" rather than a 0 ms that was never measured.
            let ms = |v: f64| {
                if r.lag_ms.count == 0 {
                    "-".to_string()
                } else {
                    format!("{v:.0}ms")
                }
            };
            let _ = writeln!(
                out,
                "{:<8} {:>12.0} {:>14.0} {:>10} {:>10} {:>10} {:>10} {:>8} {:>9}",
                r.name,
                r.acked_writes_per_s,
                r.replicated_events_per_s,
                ms(r.lag_ms.p50),
                ms(r.lag_ms.p99),
                ms(r.lag_ms.p999),
                ms(r.lag_ms.max),
                opt(r.cpu_s),
                opt(r.peak_rss_mb)
            );
        }
        let _ = writeln!(out);
        let rows: Vec<(String, String)> = vec![
            (
                "acknowledged writes/s (all regions)".into(),
                format!("{:.0}", self.acked_writes_per_s),
            ),
            (
                "replicated events/s (slowest region)".into(),
                format!("{:.0}", self.replicated_events_per_s),
            ),
            (
                "replication lag ms p50/p90/p99/p99.9/max".into(),
                format!(
                    "{:.0} / {:.0} / {:.0} / {:.0} / {:.0}  (1 ms resolution)",
                    self.lag_ms.p50,
                    self.lag_ms.p90,
                    self.lag_ms.p99,
                    self.lag_ms.p999,
                    self.lag_ms.max
                ),
            ),
            (
                "client pipeline round trip ms p50/p99".into(),
                format!(
                    "{:.2} / {:.2}",
                    self.client_round_trip_ms.p50, self.client_round_trip_ms.p99
                ),
            ),
            (
                "backlog drained after load".into(),
                self.drain_ms
                    .map_or("not within the timeout".into(), |d| format!("{d:.0} ms")),
            ),
            (
                "wire bytes per event (frames)".into(),
                format!(
                    "{:.1}  ({:.1} events per batch)",
                    self.bytes_per_event, self.events_per_batch
                ),
            ),
            (
                "storage ceiling events/s".into(),
                format!(
                    "{:.0}  (RocksDB batches of {}, {} durability)",
                    self.ceilings.storage_events_per_s,
                    self.ceilings.storage.batch,
                    self.ceilings.storage.durability
                ),
            ),
            (
                "transport ceiling events/s".into(),
                format!(
                    "{:.0}  (QUIC frames of {} B, {:.0} MB/s)",
                    self.ceilings.transport_events_per_s,
                    self.ceilings.transport.frame_bytes,
                    self.ceilings.transport.mb_per_s
                ),
            ),
            (
                "replicated / lower ceiling".into(),
                format!("{:.2}x", self.ratios.replicated_vs_lower_ceiling),
            ),
        ];
        for (name, value) in rows {
            let _ = writeln!(out, "{name:<42} {value}");
        }
        if let Some(o) = &self.outage {
            let _ = writeln!(
                out,
                "{:<42} region {} down {:.1} s while the others wrote {} events; restarted in {:.1} s",
                "outage", o.region, o.outage_s, o.events_during_outage, o.restart_s
            );
            let _ = writeln!(
                out,
                "{:<42} {}",
                "catch-up after the outage",
                match o.catch_up_s {
                    Some(s) => format!(
                        "{} events in {s:.1} s: {:.0} events/s ({:.2}x the steady replicated rate)",
                        o.backlog_events,
                        o.catch_up_events_per_s,
                        ratio(o.catch_up_events_per_s, o.steady_replicated_events_per_s)
                    ),
                    None => format!(
                        "{} events, not caught up within the timeout",
                        o.backlog_events
                    ),
                }
            );
            for r in &o.rss_mb {
                let _ = writeln!(
                    out,
                    "{:<42} {:.0} MB at the start, {:.0} MB at the end, {:.0} MB at most",
                    format!("RSS of {} during the outage", r.name),
                    r.start,
                    r.end,
                    r.max
                );
            }
        }
        match &self.redis {
            Some(redis) => {
                let _ = writeln!(
                    out,
                    "{:<42} {:.0}  ({}, {} replicas, {})",
                    "Redis writes/s (same load)",
                    redis.writes_per_s,
                    redis.version,
                    redis.replicas,
                    redis.config
                );
                let _ = writeln!(
                    out,
                    "{:<42} {:.2} / {:.2} / {:.2}",
                    "Redis replica lag ms p50/p99/max",
                    redis.replica_lag_ms.p50,
                    redis.replica_lag_ms.p99,
                    redis.replica_lag_ms.max
                );
                if let Some(r) = self.ratios.writes_vs_redis {
                    let _ = writeln!(out, "{:<42} {r:.2}x", "Braid writes / Redis writes");
                }
            }
            None => {
                let why = match self.settings.no_redis {
                    true => "not run (--no-redis)",
                    false => "not run (install redis-server to compare)",
                };
                let _ = writeln!(out, "{:<42} {why}", "Redis");
            }
        }
        if self.write_errors > 0 {
            let _ = writeln!(
                out,
                "\nwarning: {} writes were answered with an error (first: {})",
                self.write_errors,
                self.first_write_error.as_deref().unwrap_or("?")
            );
        }
        out
    }
}
