//! The drill's report: the JSON document, the terminal table and the self-contained HTML page
//! with the lag timeline (SVG) and the faults marked on it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

pub use crate::scenario::Verdict;

/// Everything a drill measured, and its verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillReport {
    /// The scenario's name.
    pub scenario: String,
    /// The command line that ran the drill.
    pub command: String,
    /// braid's version.
    pub version: String,
    /// Durability of the cluster.
    pub durability: String,
    /// Seed of the workload's commands.
    pub seed: u64,
    /// Factor applied to the scenario's times.
    pub time_scale: f64,
    /// Regions, in the cluster's order (its `cluster.json`): those of a started cluster in
    /// scenario order, then any the scenario joins.
    pub regions: Vec<String>,
    /// How long the workload ran, ms.
    pub duration_ms: u64,
    /// Whether every expectation held.
    pub passed: bool,
    /// Each expectation's verdict.
    pub checkers: Vec<Verdict>,
    /// Writes per region, as the clients saw them.
    pub writes: BTreeMap<String, WriteCounts>,
    /// Events the regions committed (their own writes), from the nodes' counters.
    pub events_written: u64,
    /// Concurrent writes resolved by last-writer-wins, summed over regions (the nodes' counters).
    pub conflicts_resolved: u64,
    /// Events sent over links, divided by events written.
    pub messages_per_change: f64,
    /// Replication lag over the whole drill, ms (origin commit to remote apply).
    pub lag_ms: LagFigures,
    /// The same per link (`origin->region`).
    pub lag_ms_by_link: BTreeMap<String, LagFigures>,
    /// Every fault, when it happened (ms from the start of the workload).
    pub faults: Vec<FaultMark>,
    /// Every region failure: RPO and recovery.
    pub failures: Vec<FailureReport>,
    /// Convergence after each heal and restart.
    pub convergence: Vec<ConvergenceReport>,
    /// From the end of the workload (everything healed, every region up) to identical vectors
    /// everywhere, ms; absent if it did not happen in time.
    pub final_convergence_ms: Option<u64>,
    /// Lag per link over time: one point per link and second.
    pub timeline: Vec<LagPoint>,
    /// What the drill could not do as the scenario says, and why.
    pub warnings: Vec<String>,
}

/// A region's writes as its client saw them.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct WriteCounts {
    /// Acknowledged.
    pub acknowledged: u64,
    /// Refused by the region (`WRONGTYPE`...), applied nowhere.
    pub refused: u64,
    /// No reply (a failure cut it off): applied or not.
    pub unknown: u64,
    /// Not sent: the region was down.
    pub unavailable: u64,
}

/// Lag percentiles, ms.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct LagFigures {
    /// Events measured.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
}

/// A fault, as performed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultMark {
    /// When, ms from the start of the workload.
    pub at_ms: u64,
    /// What.
    pub action: String,
}

/// One region failure (kill or power failure).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FailureReport {
    /// The region.
    pub region: String,
    /// `kill` or `power-fail`.
    pub kind: String,
    /// When it failed, ms from the start.
    pub at_ms: u64,
    /// The region's own last sequence number when it failed (read when it came back).
    pub last_seq: u64,
    /// The highest of its sequence numbers any other region held just after the failure.
    pub replicated_seq: u64,
    /// Its events no other region held: `last_seq - replicated_seq`.
    pub unreplicated_events: u64,
    /// Its client's writes in flight when it failed (outcome unknown to the client).
    pub in_flight_writes: u64,
    /// RPO: acknowledged writes not held elsewhere at the failure, at least this...
    pub rpo_writes_min: u64,
    /// ...and at most this (the difference is the writes in flight).
    pub rpo_writes_max: u64,
    /// When it was restarted, ms from the start.
    pub restarted_at_ms: Option<u64>,
    /// From restart until it answered health checks, ms.
    pub serving_ms: Option<u64>,
    /// From restart until it held everything the others held at its restart, ms.
    pub recovery_ms: Option<u64>,
    /// Whether its unreplicated events reached every other region after it came back.
    pub reappeared: bool,
    /// When they had, ms after the restart.
    pub reappeared_ms: Option<u64>,
}

/// Convergence after a heal or a restart: every region up holds everything any region held at
/// that moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConvergenceReport {
    /// What happened (`heal`, `restart b`, `end of workload`).
    pub after: String,
    /// When, ms from the start.
    pub at_ms: u64,
    /// How long until convergence, ms; absent if not within the drill.
    pub converged_ms: Option<u64>,
}

/// Lag on one link during one second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LagPoint {
    /// End of the second, ms from the start.
    pub t_ms: u64,
    /// `origin->region`.
    pub link: String,
    /// Events applied in it.
    pub count: u64,
    /// Median lag, ms.
    pub p50: u64,
    /// 99th percentile, ms.
    pub p99: u64,
}

fn ms(value: Option<u64>) -> String {
    value.map_or("-".into(), |v| format!("{v} ms"))
}

impl DrillReport {
    /// The final summary for the terminal.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nDrill {} ({} regions, {} durability, {:.1} s of workload, seed {})",
            self.scenario,
            self.regions.len(),
            self.durability,
            self.duration_ms as f64 / 1000.0,
            self.seed
        );
        let _ = writeln!(
            out,
            "\n  {:<10} {:>12} {:>9} {:>9} {:>12}",
            "region", "acknowledged", "refused", "unknown", "unavailable"
        );
        for (region, w) in &self.writes {
            let _ = writeln!(
                out,
                "  {:<10} {:>12} {:>9} {:>9} {:>12}",
                region, w.acknowledged, w.refused, w.unknown, w.unavailable
            );
        }
        let _ = writeln!(
            out,
            "\n  replication lag: p50 {} ms, p99 {} ms, max {} ms over {} events; {:.2} messages per change; {} conflicts resolved",
            self.lag_ms.p50, self.lag_ms.p99, self.lag_ms.max, self.lag_ms.count, self.messages_per_change, self.conflicts_resolved
        );
        if !self.faults.is_empty() {
            let _ = writeln!(out, "\n  faults:");
            for f in &self.faults {
                let _ = writeln!(out, "    {:>8} ms  {}", f.at_ms, f.action);
            }
        }
        for f in &self.failures {
            let _ = writeln!(
                out,
                "\n  failure: {} {} at {} ms: RPO {}..{} acknowledged writes ({} events not \
                 replicated, {} in flight); serving {} and caught up {} after restart; \
                 unreplicated events {}",
                f.kind,
                f.region,
                f.at_ms,
                f.rpo_writes_min,
                f.rpo_writes_max,
                f.unreplicated_events,
                f.in_flight_writes,
                ms(f.serving_ms),
                ms(f.recovery_ms),
                if f.reappeared {
                    format!(
                        "reappeared everywhere ({} after restart)",
                        ms(f.reappeared_ms)
                    )
                } else {
                    "did NOT reappear".into()
                }
            );
        }
        if !self.convergence.is_empty() {
            let _ = writeln!(out, "\n  convergence:");
            for c in &self.convergence {
                let _ = writeln!(
                    out,
                    "    after {} (at {} ms): {}",
                    c.after,
                    c.at_ms,
                    c.converged_ms
                        .map_or("not converged".into(), |v| format!("{v} ms"))
                );
            }
        }
        for w in &self.warnings {
            let _ = writeln!(out, "\n  note: {w}");
        }
        let _ = writeln!(out, "\n  {:<22} {:<6} evidence", "expectation", "");
        for v in &self.checkers {
            let _ = writeln!(
                out,
                "  {:<22} {:<6} {}",
                v.checker,
                if v.passed { "PASS" } else { "FAIL" },
                v.detail
            );
        }
        let _ = writeln!(
            out,
            "\n  verdict: {}",
            if self.passed { "PASS" } else { "FAIL" }
        );
        out
    }

    /// A self-contained HTML page: the summary, and the lag timeline per link as SVG with the
    /// faults marked.
    pub fn html(&self) -> String {
        let mut out = String::new();
        let verdict = if self.passed { "PASS" } else { "FAIL" };
        let _ = write!(
            out,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>braid drill {name}: {verdict}</title>\
             <style>body{{font-family:sans-serif;margin:2em;color:#222}}\
             table{{border-collapse:collapse}}td,th{{padding:2px 10px;text-align:left;\
             border-bottom:1px solid #ddd}}.PASS{{color:#186a18}}.FAIL{{color:#b00020}}\
             pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>\n\
             <h1>braid drill {name}: <span class=\"{verdict}\">{verdict}</span></h1>\n\
             <p>{regions} regions, {durability} durability, {secs:.1} s of workload, seed {seed}. \
             <code>{command}</code></p>\n",
            name = escape(&self.scenario),
            regions = self.regions.len(),
            durability = escape(&self.durability),
            secs = self.duration_ms as f64 / 1000.0,
            seed = self.seed,
            command = escape(&self.command),
        );
        out.push_str("<h2>Replication lag per link (p99 per second, ms)</h2>\n");
        out.push_str(&self.svg());
        out.push_str("\n<h2>Expectations</h2>\n<table><tr><th>expectation</th><th>verdict</th><th>evidence</th></tr>\n");
        for v in &self.checkers {
            let verdict = if v.passed { "PASS" } else { "FAIL" };
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td class=\"{verdict}\">{verdict}</td><td>{}</td></tr>",
                escape(&v.checker),
                escape(&v.detail)
            );
        }
        out.push_str("</table>\n<h2>Summary</h2>\n<pre>");
        out.push_str(&escape(&self.table()));
        out.push_str("</pre>\n</body></html>\n");
        out
    }

    /// The lag timeline: one polyline per link, a dashed vertical line per fault.
    pub fn svg(&self) -> String {
        const WIDTH: f64 = 900.0;
        const HEIGHT: f64 = 320.0;
        const LEFT: f64 = 60.0;
        const RIGHT: f64 = 150.0;
        const TOP: f64 = 20.0;
        const BOTTOM: f64 = 40.0;
        // Points of one link further apart than this are not joined.
        const GAP_MS: u64 = 1_600;
        const COLORS: [&str; 8] = [
            "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        ];
        let end_ms = self
            .timeline
            .iter()
            .map(|p| p.t_ms)
            .chain(self.faults.iter().map(|f| f.at_ms))
            .max()
            .unwrap_or(0)
            .max(self.duration_ms)
            .max(1);
        let top_lag = self
            .timeline
            .iter()
            .map(|p| p.p99)
            .max()
            .unwrap_or(0)
            .max(10);
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let x = |t: u64| LEFT + plot_w * t as f64 / end_ms as f64;
        let y = |v: u64| TOP + plot_h * (1.0 - v.min(top_lag) as f64 / top_lag as f64);
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
             viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"11\">"
        );
        let _ = writeln!(
            svg,
            "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#999\"/>"
        );
        for i in 0..=4u64 {
            let v = top_lag * i / 4;
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v}</text>",
                LEFT - 6.0,
                y(v) + 4.0
            );
        }
        for i in 0..=5u64 {
            let t = end_ms * i / 5;
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.1} s</text>",
                x(t),
                HEIGHT - BOTTOM + 16.0,
                t as f64 / 1000.0
            );
        }
        let mut links: BTreeMap<&str, Vec<&LagPoint>> = BTreeMap::new();
        for p in &self.timeline {
            links.entry(p.link.as_str()).or_default().push(p);
        }
        for (i, (link, points)) in links.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            // A second without events on the link (its origin down, the link cut) breaks the
            // line rather than drawing a slope through the outage.
            let mut path = String::new();
            let mut last_t: Option<u64> = None;
            for p in points {
                let step = match last_t {
                    Some(t) if p.t_ms.saturating_sub(t) <= GAP_MS => 'L',
                    _ => 'M',
                };
                let _ = write!(path, "{step}{:.1},{:.1} ", x(p.t_ms), y(p.p99));
                last_t = Some(p.t_ms);
            }
            let _ = writeln!(
                svg,
                "<path class=\"lag\" data-link=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" d=\"{}\"/>",
                escape(link),
                path.trim_end()
            );
            // Lone points (a second between gaps) would not show as a line.
            for p in points {
                let _ = writeln!(
                    svg,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"1.5\" fill=\"{color}\"/>",
                    x(p.t_ms),
                    y(p.p99)
                );
            }
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{}</text>",
                WIDTH - RIGHT + 10.0,
                TOP + 14.0 * (i as f64 + 1.0),
                escape(link)
            );
        }
        for (i, f) in self.faults.iter().enumerate() {
            let fx = x(f.at_ms);
            let _ = writeln!(
                svg,
                "<line class=\"fault\" x1=\"{fx:.1}\" y1=\"{TOP}\" x2=\"{fx:.1}\" y2=\"{:.1}\" stroke=\"#b00020\" stroke-dasharray=\"4 3\"/>",
                HEIGHT - BOTTOM
            );
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#b00020\">{}</text>",
                fx + 3.0,
                TOP + 12.0 + 12.0 * (i % 4) as f64,
                escape(&f.action)
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">time since the workload started</text>",
            LEFT + plot_w / 2.0,
            HEIGHT - 6.0
        );
        svg.push_str("</svg>");
        svg
    }
}

/// Escapes text for HTML and SVG.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
