//! `braid-sim`: run a scenario deterministically, for one seed or a sweep of seeds.

// The binary talks to people on stdout and stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use braid_sim::world::Verdict;
use braid_sim::{sweep, InjectedBug, Report, RunOptions, Scenario};
use clap::{Parser, Subcommand};

/// mimalloc: a run allocates and frees several small objects per simulated event.
#[global_allocator]
static ALLOCATOR: braid_sim::alloc::SimAllocator = braid_sim::alloc::SimAllocator;

/// Braid's deterministic simulator: rehearse a topology and a workload under faults, seed by
/// seed, on the real replication core, far faster than real time.
#[derive(Debug, Parser)]
#[command(name = "braid-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run a scenario file with one seed (--seed) or a range of seeds (--seeds A..B).
    Run {
        /// The scenario (TOML; see docs/scenarios.md).
        scenario: PathBuf,
        /// Run this one seed (seed 0 when neither --seed nor --seeds is given).
        #[arg(long, conflicts_with = "seeds")]
        seed: Option<u64>,
        /// Run every seed from A up to, not including, B; print a summary table.
        #[arg(long, value_name = "A..B")]
        seeds: Option<String>,
        /// Write the event trace of the run to this file (one seed only).
        #[arg(long, value_name = "FILE", conflicts_with = "seeds")]
        trace: Option<PathBuf>,
        /// Write the report (one run) or every report and the summary (sweep) as JSON.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Run the seed twice and check that both traces are identical (one seed only).
        #[arg(long, conflicts_with = "seeds")]
        check_determinism: bool,
        /// Test only: inject a bug (double-apply, lose-write, grant-every-vote,
        /// drop-control-apply, ignore-possible-loss, collect-early) to see the checkers catch it.
        #[arg(long, value_name = "BUG", hide = true)]
        inject_bug: Option<InjectedBug>,
    },
}

fn parse_range(text: &str) -> Result<(u64, u64)> {
    let (a, b) = text
        .split_once("..")
        .context("--seeds takes A..B, e.g. 0..200")?;
    let number = |n: &str| {
        n.trim().parse::<u64>().with_context(|| {
            format!("--seeds {text}: {n:?} is not a seed number (A..B, e.g. 0..200)")
        })
    };
    let (a, b) = (number(a)?, number(b)?);
    if a >= b {
        bail!("--seeds {text}: the range is empty");
    }
    Ok((a, b))
}

/// The command that replays a run, naming the scenario file it ran, quoted for a shell where
/// it needs to be.
fn replay_of(report: &Report, scenario_path: &Path) -> String {
    report.replay.replacen(
        "SCENARIO",
        &shell_word(&scenario_path.display().to_string()),
        1,
    )
}

/// `text` as one word of a POSIX shell command: as it is when it holds only characters no
/// shell treats specially, else in single quotes (each quote inside written as `'\''`).
fn shell_word(text: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./,:=+@%".contains(c);
    match !text.is_empty() && text.chars().all(plain) {
        true => text.to_string(),
        false => format!("'{}'", text.replace('\'', "'\\''")),
    }
}

/// Creates an output file before any seed runs, so that a path that cannot be written is
/// refused at once rather than after the run, with its report lost.
fn create_output(path: &Path, what: &str) -> Result<std::fs::File> {
    std::fs::File::create(path)
        .with_context(|| format!("cannot write the {what} to {}", path.display()))
}

/// Writes `text` to an output file made by [`create_output`].
fn write_output(file: Option<(std::fs::File, PathBuf)>, text: &str) -> Result<()> {
    if let Some((mut file, path)) = file {
        file.write_all(text.as_bytes())
            .and_then(|()| file.flush())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn print_report(report: &Report) {
    println!(
        "scenario {}  seed {}  trace {}",
        report.scenario, report.seed, report.trace_hash
    );
    for verdict in &report.checkers {
        println!(
            "  {:<24} {}  {}",
            verdict.checker,
            if verdict.passed { "PASS" } else { "FAIL" },
            verdict.detail
        );
    }
    println!(
        "  writes {}  applied {}  messages/change {:.3}  convergence {}  lag p50/p99/max {}/{}/{} ms",
        report.writes,
        report.events_applied,
        report.messages_per_change,
        report.convergence_ms.map_or("-".into(), |c| format!("{c} ms")),
        report.lag_ms_p50,
        report.lag_ms_p99,
        report.lag_ms_max
    );
    println!(
        "  control plane: {} elections, {} commands committed, {} leaders killed; {} change-log \
         events collected at the stable frontier, tombstones of {} keys at the stable HLC, {} \
         snapshots installed",
        report.raft_elections,
        report.control_commits,
        report.leader_kills,
        report.log_events_collected,
        report.tombstones_collected,
        report.snapshots_installed
    );
    if report.writes_lost > 0 {
        println!(
            "  {} acknowledged writes lost with power failures before their region synced or \
             shipped them (process durability)",
            report.writes_lost
        );
    }
    println!(
        "  simulated {:.1} s in {:.3} s of wall time ({:.0}x)",
        report.sim_ms as f64 / 1000.0,
        report.wall_ms as f64 / 1000.0,
        report.sim_ms as f64 / report.wall_ms.max(1) as f64
    );
    println!(
        "  {}",
        if report.passed {
            "PASSED".to_string()
        } else {
            format!("FAILED: replay with {}", report.replay)
        }
    );
}

/// mimalloc's `mi_option_purge_delay` (`include/mimalloc.h` of mimalloc 2; the binding names no
/// constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to purge freed memory back to the kernel. A run frees and allocates
/// memory at a high rate; purged memory comes back as fresh pages, which the kernel zeroes (as
/// transparent huge pages, 2 MiB at a time). That zeroing took a quarter of a run's time, and a
/// run's peak memory stays the same without it.
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: `mi_option_set` stores an integer in mimalloc's option table; any thread may call
    // it at any time, and -1 is the documented value for "never purge".
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Lets the process end quietly when its standard output closes (`braid-sim run ... | head`), as
/// Unix tools do, where `println!` would panic on the broken pipe. Rust ignores SIGPIPE in every
/// program; the simulator writes to no socket, so the default (end the process) is safe here.
#[allow(unsafe_code)]
fn quiet_on_closed_stdout() {
    // SAFETY: sets a signal's disposition to its default at start-up, before any other thread
    // exists; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    keep_freed_memory();
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("braid-sim: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let Cli {
        command:
            Commands::Run {
                scenario: path,
                seed,
                seeds,
                trace,
                json,
                check_determinism,
                inject_bug,
            },
    } = Cli::parse();
    let scenario = Scenario::load(&path)?;
    // Every argument checked before an output file is created (and so emptied).
    let range = seeds.as_deref().map(parse_range).transpose()?;
    let json = match json {
        Some(p) => Some((create_output(&p, "report")?, p)),
        None => None,
    };
    let trace = match trace {
        Some(p) => Some((create_output(&p, "trace")?, p)),
        None => None,
    };
    let options = |seed: u64, keep_trace: bool| RunOptions {
        seed,
        bug: inject_bug,
        keep_trace,
    };
    if let Some((from, to)) = range {
        let mut reports = Vec::new();
        let total = to - from;
        for (done, seed) in (from..to).enumerate() {
            let mut report = braid_sim::run(&scenario, options(seed, false))
                .map_err(|e| anyhow::anyhow!("seed {seed} could not run: {e}"))?;
            report.replay = replay_of(&report, &path);
            if !report.passed {
                eprintln!();
                print_report(&report);
            }
            reports.push(report);
            let failed = reports.iter().filter(|r| !r.passed).count();
            eprint!(
                "\r{} [{:>4}/{total}] seeds, {failed} failed",
                scenario.name,
                done + 1
            );
            let _ = std::io::stderr().flush();
        }
        eprintln!();
        let summary = sweep::summarise(&scenario.name, &reports);
        // The file first: it is kept if standard output closes while the table prints.
        if json.is_some() {
            let doc = serde_json::json!({ "summary": summary, "runs": reports });
            write_output(json, &(serde_json::to_string_pretty(&doc)? + "\n"))?;
        }
        println!(
            "{:<24} {:>6} {:>6} {:>6}  {:>22}  {:>22}  {:>9}  {:>12}  {:>8}",
            "SCENARIO",
            "SEEDS",
            "PASSED",
            "FAILED",
            "CONVERGE ms p50/p99/max",
            "LAG p99 ms p50/p99/max",
            "SIM/WALL",
            "APPLIED/s",
            "MSG/CHG"
        );
        let c = summary.convergence_ms;
        let l = summary.lag_ms_p99;
        println!(
            "{:<24} {:>6} {:>6} {:>6}  {:>22}  {:>22}  {:>8.0}x  {:>12.0}  {:>8.3}",
            summary.scenario,
            summary.seeds,
            summary.passed,
            summary.failed.len(),
            format!("{}/{}/{}", c[0], c[1], c[2]),
            format!("{}/{}/{}", l[0], l[1], l[2]),
            summary.speedup,
            summary.applied_per_wall_s,
            summary.messages_per_change_max
        );
        // The summary lists the failed runs in the order of the reports.
        let failed = reports.iter().filter(|r| !r.passed);
        for ((seed, checker), report) in summary.failed.iter().zip(failed) {
            assert_eq!(
                *seed, report.seed,
                "the summary's failures follow the reports"
            );
            println!("failed: seed {seed} ({checker}): {}", report.replay);
        }
        return Ok(summary.failed.is_empty());
    }
    let seed = seed.unwrap_or(0);
    let mut report =
        braid_sim::run(&scenario, options(seed, trace.is_some())).map_err(anyhow::Error::msg)?;
    report.replay = replay_of(&report, &path);
    if check_determinism {
        // A verdict like the others, in the report and its JSON.
        let again = braid_sim::run(&scenario, options(seed, false)).map_err(anyhow::Error::msg)?;
        let same = again.trace_hash == report.trace_hash;
        report.checkers.push(Verdict {
            checker: "determinism".into(),
            passed: same,
            detail: match same {
                true => "a second run of the seed hashed the same".into(),
                false => format!("a second run of the seed hashed {}", again.trace_hash),
            },
        });
        report.passed &= same;
    }
    // The files first: they are kept if standard output closes while the report prints.
    write_output(trace, &(report.trace.join("\n") + "\n"))?;
    write_output(json, &(serde_json::to_string_pretty(&report)? + "\n"))?;
    print_report(&report);
    Ok(report.passed)
}
