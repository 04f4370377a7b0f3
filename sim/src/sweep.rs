//! Many seeds of one scenario, and their summary.

use serde::Serialize;

use crate::world::Report;

/// Percentiles over a sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The scenario.
    pub scenario: String,
    /// Seeds run.
    pub seeds: u64,
    /// Seeds that passed every checker.
    pub passed: u64,
    /// Seeds that failed, with their first failing checker.
    pub failed: Vec<(u64, String)>,
    /// Convergence time after heal, simulated ms: p50, p99, max.
    pub convergence_ms: [u64; 3],
    /// Replication lag p99 across seeds, simulated ms: p50, p99, max.
    pub lag_ms_p99: [u64; 3],
    /// Simulated seconds per wall second.
    pub speedup: f64,
    /// Remote applies per wall second.
    pub applied_per_wall_s: f64,
    /// Messages per change, worst seed.
    pub messages_per_change_max: f64,
}

fn percentiles(mut values: Vec<u64>) -> [u64; 3] {
    if values.is_empty() {
        return [0; 3];
    }
    values.sort_unstable();
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    [at(0.5), at(0.99), values[values.len() - 1]]
}

/// Summarises a sweep's reports.
pub fn summarise(scenario: &str, reports: &[Report]) -> Summary {
    let sim_ms: u64 = reports.iter().map(|r| r.sim_ms).sum();
    let wall_ms: u64 = reports.iter().map(|r| r.wall_ms).sum::<u64>().max(1);
    let applied: u64 = reports.iter().map(|r| r.events_applied).sum();
    Summary {
        scenario: scenario.to_owned(),
        seeds: reports.len() as u64,
        passed: reports.iter().filter(|r| r.passed).count() as u64,
        failed: reports
            .iter()
            .filter(|r| !r.passed)
            .map(|r| {
                let first = r
                    .checkers
                    .iter()
                    .find(|c| !c.passed)
                    .map(|c| c.checker.clone())
                    .unwrap_or_default();
                (r.seed, first)
            })
            .collect(),
        convergence_ms: percentiles(reports.iter().filter_map(|r| r.convergence_ms).collect()),
        lag_ms_p99: percentiles(reports.iter().map(|r| r.lag_ms_p99).collect()),
        speedup: sim_ms as f64 / wall_ms as f64,
        applied_per_wall_s: applied as f64 * 1000.0 / wall_ms as f64,
        messages_per_change_max: reports
            .iter()
            .map(|r| r.messages_per_change)
            .fold(0.0, f64::max),
    }
}
