//! The simulator on the shipped scenarios: a sweep of 320 seeds with faults that must all pass,
//! determinism (same seed, same trace), and checkers that bite when a bug is injected.

use std::path::PathBuf;

use braid_sim::{InjectedBug, RunOptions, Scenario};

fn scenario(name: &str) -> Scenario {
    let path = manifest_dir()
        .join("../docs/scenarios")
        .join(format!("{name}.toml"));
    Scenario::load(&path).unwrap()
}

const SHIPPED: [&str; 8] = [
    "mesh-steady",
    "partition-heal",
    "region-loss",
    "chain-flap",
    "long-outage",
    "leader-kill",
    "join-leave",
    "power-loss",
];

/// Seeds of each shipped scenario in the sweep: 320 in all.
const SEEDS_EACH: u64 = 40;

fn options(seed: u64) -> RunOptions {
    RunOptions {
        seed,
        bug: None,
        keep_trace: false,
    }
}

/// 40 seeds of each shipped scenario: 320 in all, with partitions, crashes, power failures (some
/// losing what their region had not synced),
/// clock skew, flapping and slow links, loss, duplication and reordering, a region away longer
/// than the change logs keep (resynchronised by snapshot), the control plane's leader killed,
/// and regions joining and leaving under load. Every run has the control plane's Raft group and
/// its checkers.
#[test]
fn sweep_of_320_seeds_over_the_shipped_scenarios_passes() {
    let mut failures = Vec::new();
    let mut runs = 0;
    for name in SHIPPED {
        let scenario = scenario(name);
        for seed in 0..SEEDS_EACH {
            let report = braid_sim::run(&scenario, options(seed)).unwrap();
            runs += 1;
            if !report.passed {
                let failed: Vec<String> = report
                    .checkers
                    .iter()
                    .filter(|c| !c.passed)
                    .map(|c| format!("{}: {}", c.checker, c.detail))
                    .collect();
                failures.push(format!("{name} seed {seed}: {}", failed.join("; ")));
            }
        }
    }
    assert_eq!(runs, 320);
    assert!(
        failures.is_empty(),
        "failing seeds:\n{}",
        failures.join("\n")
    );
}

/// The drills shipped for `braid drill` (docs/drills/) pass under the simulator too: 10 seeds each.
#[test]
fn the_shipped_drills_pass_under_the_simulator() {
    let dir = manifest_dir().join("../docs/drills");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 6, "{names:?}");
    let mut failures = Vec::new();
    for path in &names {
        let scenario = Scenario::load(path).unwrap();
        for seed in 0..10 {
            let report = braid_sim::run(&scenario, options(seed)).unwrap();
            if !report.passed {
                failures.push(format!(
                    "{} seed {seed}: {:?}",
                    path.display(),
                    report.checkers
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_same_seed_gives_the_same_trace_and_another_seed_another() {
    for name in SHIPPED {
        let scenario = scenario(name);
        let first = braid_sim::run(
            &scenario,
            RunOptions {
                keep_trace: true,
                ..options(7)
            },
        )
        .unwrap();
        let second = braid_sim::run(
            &scenario,
            RunOptions {
                keep_trace: true,
                ..options(7)
            },
        )
        .unwrap();
        assert_eq!(first.trace_hash, second.trace_hash, "{name}");
        assert_eq!(first.trace, second.trace, "{name}");
        assert!(!first.trace.is_empty());
        let other = braid_sim::run(&scenario, options(8)).unwrap();
        assert_ne!(
            first.trace_hash, other.trace_hash,
            "{name}: seeds 7 and 8 ran identically"
        );
    }
}

#[test]
fn an_apply_that_skips_the_vector_check_is_caught_by_the_exactly_once_checker() {
    let scenario = scenario("mesh-steady");
    let report = braid_sim::run(
        &scenario,
        RunOptions {
            bug: Some(InjectedBug::DoubleApply),
            ..options(3)
        },
    )
    .unwrap();
    assert!(!report.passed);
    let verdict = report
        .checkers
        .iter()
        .find(|c| c.checker == "exactly_once")
        .unwrap();
    assert!(!verdict.passed);
    assert!(verdict.detail.contains("twice"), "{}", verdict.detail);
    assert!(
        report.replay.contains("--seed 3 --inject-bug double-apply"),
        "{}",
        report.replay
    );
}

#[test]
fn a_storage_that_loses_writes_is_caught_by_the_oracle_with_the_divergent_key() {
    let scenario = scenario("mesh-steady");
    let report = braid_sim::run(
        &scenario,
        RunOptions {
            bug: Some(InjectedBug::LoseWrite),
            ..options(3)
        },
    )
    .unwrap();
    assert!(!report.passed);
    let verdict = report
        .checkers
        .iter()
        .find(|c| c.checker == "oracle")
        .unwrap();
    assert!(!verdict.passed);
    assert!(
        verdict.detail.contains("key") && verdict.detail.contains("oracle says"),
        "{}",
        verdict.detail
    );
}

/// The package's directory: cargo sets it when it runs the test (the path compiled in is only a
/// fallback, stale when a build is reused from another checkout).
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The long outage is past what the logs keep: every seed resynchronises the region by
/// snapshot (the sweep checks that it then converges to the oracle).
#[test]
fn a_region_away_longer_than_the_logs_keep_is_resynchronised_by_snapshot() {
    let scenario = scenario("long-outage");
    for seed in 0..5 {
        let report = braid_sim::run(&scenario, options(seed)).unwrap();
        assert!(report.passed, "seed {seed}: {:?}", report.checkers);
        assert!(report.snapshots_installed >= 1, "seed {seed}: no snapshot");
    }
    // Without the bound, the same outage is caught up from the logs alone.
    let mut kept = scenario.clone();
    kept.change_log_retention_events = None;
    let report = braid_sim::run(&kept, options(0)).unwrap();
    assert!(report.passed);
    assert_eq!(report.snapshots_installed, 0);
}

/// Killing the control plane's leader elects another, checkpoints commit again and the change
/// logs are still collected at the committed stable frontier.
#[test]
fn a_killed_raft_leader_is_replaced_and_garbage_collection_goes_on() {
    let scenario = scenario("leader-kill");
    let (mut kills, mut collected) = (0, 0);
    for seed in 0..4 {
        let report = braid_sim::run(&scenario, options(seed)).unwrap();
        assert!(report.passed, "seed {seed}: {:?}", report.checkers);
        // A kill finds no leader while an election is still on; most find one.
        assert!(report.leader_kills >= 1, "seed {seed}: {report:?}");
        // The first leader, and a new one in a later term after each kill.
        assert!(
            report.raft_elections > report.leader_kills,
            "seed {seed}: {report:?}"
        );
        assert!(report.control_commits >= 10, "seed {seed}: {report:?}");
        kills += report.leader_kills;
        collected += report.log_events_collected;
    }
    assert!(kills >= 4, "{kills} leaders killed in 4 seeds");
    assert!(collected > 0);
    // Without faults, every region's log is collected at the frontier all the same.
    let report = braid_sim::run(&self::scenario("mesh-steady"), options(0)).unwrap();
    assert!(report.passed);
    assert!(report.raft_elections >= 1);
    assert!(
        report.log_events_collected > report.writes,
        "{} collected of {} writes",
        report.log_events_collected,
        report.writes
    );
}

/// A control-plane network that grants every vote without asking the voter lets a candidate
/// win a term whose vote already went to a later node: the Raft checker names the term and its
/// leaders, in the order they led.
#[test]
fn votes_granted_without_asking_are_caught_by_the_leader_checker() {
    let scenario = scenario("mesh-steady");
    let mut caught = Vec::new();
    for seed in 0..5 {
        let report = braid_sim::run(
            &scenario,
            RunOptions {
                bug: Some(InjectedBug::GrantEveryVote),
                ..options(seed)
            },
        )
        .unwrap();
        let verdict = report
            .checkers
            .iter()
            .find(|c| c.checker == "raft_one_leader_per_term")
            .unwrap();
        if !verdict.passed {
            assert!(!report.passed);
            assert!(
                verdict.detail.starts_with("term ") && verdict.detail.contains("went backwards"),
                "{}",
                verdict.detail
            );
            caught.push(seed);
        }
    }
    assert!(caught.len() >= 3, "caught only in seeds {caught:?}");
}

/// A control state machine that skips a committed command while saying it applied it is caught
/// by the committed-entries checker, which names the region, the index and the command.
#[test]
fn a_control_apply_that_skips_a_command_is_caught_by_the_committed_checker() {
    let scenario = scenario("mesh-steady");
    let report = braid_sim::run(
        &scenario,
        RunOptions {
            bug: Some(InjectedBug::DropControlApply),
            ..options(2)
        },
    )
    .unwrap();
    assert!(!report.passed);
    let verdict = report
        .checkers
        .iter()
        .find(|c| c.checker == "raft_committed_kept")
        .unwrap();
    assert!(!verdict.passed);
    assert!(
        verdict.detail.starts_with("a applied through index")
            && verdict.detail.contains("never applied acknowledged index"),
        "{}",
        verdict.detail
    );
}

/// Two regions join a running mesh and one leaves it, under a partition, loss and a leader
/// kill: each joiner installs a snapshot and becomes active, the leaver is removed, and every
/// member ends equal to the oracle of every acknowledged write (the leaver's included).
#[test]
fn regions_join_and_leave_a_running_mesh_through_the_control_plane() {
    let scenario = scenario("join-leave");
    for seed in 0..4 {
        let report = braid_sim::run(&scenario, options(seed)).unwrap();
        assert!(report.passed, "seed {seed}: {:?}", report.checkers);
        let membership = report
            .checkers
            .iter()
            .find(|c| c.checker == "membership")
            .unwrap();
        assert!(
            membership.detail.starts_with("3 joins and leaves done"),
            "{}",
            membership.detail
        );
        assert!(report.snapshots_installed >= 2, "seed {seed}: {report:?}");
        assert!(report.log_events_collected > 0, "seed {seed}: {report:?}");
    }
    // A region that joined can leave again: its last change is what it ends in.
    let mut again = scenario.clone();
    let last = again.timeline.len() - 1;
    again.timeline[last].action = braid_sim::scenario::Action::Leave { region: "d".into() };
    again.validate().unwrap();
    let report = braid_sim::run(&again, options(0)).unwrap();
    assert!(report.passed, "{:?}", report.checkers);
}

/// Tombstones are collected at the committed stable HLC in every region, under faults, and the
/// states still converge exactly (the sweep's convergence checker compares whole key states,
/// tombstones included).
#[test]
fn tombstones_are_collected_at_the_stable_hlc_and_states_still_converge() {
    for name in ["mesh-steady", "partition-heal"] {
        let scenario = scenario(name);
        let mut collected = 0;
        for seed in 0..3 {
            let report = braid_sim::run(&scenario, options(seed)).unwrap();
            assert!(report.passed, "{name} seed {seed}: {:?}", report.checkers);
            collected += report.tombstones_collected;
        }
        assert!(collected > 0, "{name}: no tombstone collected in 3 seeds");
    }
}

/// A garbage collector that drops tombstones without waiting for the stable HLC lets an older
/// concurrent write, arriving later, bring a deleted value back in one region only: the
/// checkers catch it in most seeds, naming the key.
#[test]
fn tombstones_dropped_before_they_are_stable_are_caught() {
    let scenario = scenario("partition-heal");
    let mut caught = Vec::new();
    for seed in 0..5 {
        let report = braid_sim::run(
            &scenario,
            RunOptions {
                bug: Some(InjectedBug::CollectEarly),
                ..options(seed)
            },
        )
        .unwrap();
        if !report.passed {
            let failed = report.checkers.iter().find(|c| !c.passed).unwrap();
            assert!(failed.detail.contains("key"), "{}", failed.detail);
            caught.push(seed);
        }
    }
    assert!(caught.len() >= 3, "caught only in seeds {caught:?}");
}

/// With `process` durability a power failure takes what its region committed since it last
/// synced. Shipped writes come back to it before it writes again; the others are lost, counted,
/// and left out of the oracle. A region not told that it may have lost writes reuses the
/// sequence numbers of those the others hold, and the checkers catch it.
#[test]
fn a_power_failure_loses_only_unshipped_writes_and_a_region_not_told_is_caught() {
    let scenario = scenario("power-loss");
    let mut lost = 0;
    for seed in 0..5 {
        let report = braid_sim::run(&scenario, options(seed)).unwrap();
        assert!(report.passed, "seed {seed}: {:?}", report.checkers);
        assert!(
            report.snapshots_installed >= 1,
            "seed {seed}: nothing taken back"
        );
        lost += report.writes_lost;
    }
    assert!(
        lost > 0,
        "no write was ever lost: the power failures lost nothing"
    );
    let mut caught = Vec::new();
    for seed in 0..5 {
        let report = braid_sim::run(
            &scenario,
            RunOptions {
                bug: Some(InjectedBug::IgnorePossibleLoss),
                ..options(seed)
            },
        )
        .unwrap();
        if !report.passed {
            caught.push(seed);
        }
    }
    assert!(caught.len() >= 4, "caught only in seeds {caught:?}");
}

/// `heal` ends a flap that would run on: after it, the link is never cut again, and the trace
/// shows no more flaps.
/// A run of seed 0 of the scenario `text`, its trace kept, which must pass.
fn traced_run(text: &str) -> braid_sim::Report {
    let scenario = Scenario::parse(text).unwrap();
    let report = braid_sim::run(
        &scenario,
        RunOptions {
            keep_trace: true,
            ..options(0)
        },
    )
    .unwrap();
    assert!(report.passed, "{:?}", report.checkers);
    report
}

/// What a trace line records: the word after its time ("     700 flap a-b cut=false").
fn record(line: &str) -> Option<&str> {
    line.split_whitespace().nth(1)
}

#[test]
fn heal_ends_a_running_flap() {
    let report = traced_run(
        r#"
name = "flap-then-heal"
regions = ["a", "b", "c"]
duration-ms = 4000
[network]
latency-ms-min = 2
latency-ms-max = 10
[workload]
rate-per-region = 50
keys = 20
[[timeline]]
at-ms = 500
action = "flap"
from = "a"
to = "b"
period-ms = 200
until-ms = 3900
[[timeline]]
at-ms = 1100
action = "heal"
"#,
    );
    let healed = report
        .trace
        .iter()
        .position(|line| line.contains("fault Heal"))
        .expect("the heal is traced");
    let is_flap = |line: &&String| record(line) == Some("flap");
    let flaps = |lines: &[String]| lines.iter().filter(is_flap).count();
    assert!(
        flaps(&report.trace[..healed]) >= 3,
        "the flap ran before the heal"
    );
    assert_eq!(
        flaps(&report.trace[healed..]),
        0,
        "flaps after the heal: {:?}",
        report.trace[healed..]
            .iter()
            .filter(is_flap)
            .collect::<Vec<_>>()
    );
}

/// A flap over a link a partition holds down: its turns up must not lift the partition.
#[test]
fn a_flap_over_a_partitioned_link_leaves_the_partition_in_place() {
    let report = traced_run(
        r#"
name = "flap-over-partition"
regions = ["a", "b", "c"]
duration-ms = 6000
[network]
latency-ms-min = 2
latency-ms-max = 10
[workload]
rate-per-region = 50
keys = 20
[[timeline]]
at-ms = 1000
action = "partition"
groups = [["a"], ["b", "c"]]
[[timeline]]
at-ms = 2000
action = "flap"
from = "a"
to = "b"
period-ms = 300
until-ms = 3000
[[timeline]]
at-ms = 5000
action = "heal"
"#,
    );
    // A line is the time, then the record: "    2300 send batch a->b at 2305".
    let at = |line: &String| -> u64 { line.split_whitespace().next().unwrap().parse().unwrap() };
    let flaps = report
        .trace
        .iter()
        .filter(|line| record(line) == Some("flap"))
        .count();
    assert!(flaps >= 3, "the flap ran");
    // From a moment after the partition (frames already in flight land) to the heal, nothing
    // crosses between a and the others.
    let crossed: Vec<&String> = report
        .trace
        .iter()
        .filter(|line| (1100..5000).contains(&at(line)))
        .filter(|line| {
            record(line) == Some("send")
                && ["a->b", "b->a", "a->c", "c->a"]
                    .iter()
                    .any(|link| line.contains(link))
        })
        .collect();
    assert!(crossed.is_empty(), "sent across the partition: {crossed:?}");
}

/// A lag bound over a run with no remote apply (one region) is not met: a percentile of nothing
/// reads 0, which would pass any bound.
#[test]
fn a_lag_bound_with_no_lag_measured_is_not_met() {
    let scenario = Scenario::parse(
        r#"
name = "alone"
regions = ["a"]
duration-ms = 2000
[workload]
rate-per-region = 50
keys = 5
[expect]
lag-ms-p99-max = 100
"#,
    )
    .unwrap();
    let report = braid_sim::run(&scenario, options(0)).unwrap();
    let lag = report
        .checkers
        .iter()
        .find(|v| v.checker == "lag_p99")
        .expect("the bound is checked");
    assert!(!lag.passed, "{lag:?}");
    assert!(lag.detail.contains("no remote apply"), "{lag:?}");
    assert!(!report.passed);
}

/// Two regions, both killed before the workload starts.
const NOTHING_WRITTEN: &str = r#"
name = "nothing-written"
regions = ["a", "b"]
duration-ms = 2000
[workload]
rate-per-region = 50
keys = 5
[[timeline]]
at-ms = 0
action = "kill"
region = "a"
[[timeline]]
at-ms = 0
action = "kill"
region = "b"
"#;

#[test]
fn a_run_in_which_nothing_was_written_fails_instead_of_passing_vacuously() {
    let scenario = Scenario::parse(NOTHING_WRITTEN).unwrap();
    let report = braid_sim::run(&scenario, options(1)).unwrap();
    assert_eq!(report.writes, 0);
    assert!(!report.passed, "{:?}", report.checkers);
    let verdict = report
        .checkers
        .iter()
        .find(|c| c.checker == "workload")
        .expect("a workload verdict");
    assert!(!verdict.passed);
    assert!(
        verdict.detail.contains("no write was acknowledged"),
        "{}",
        verdict.detail
    );
}

#[test]
fn a_clock_skewed_past_the_bound_is_named_in_the_divergence_it_causes() {
    let text = r#"
name = "far-ahead"
regions = ["a", "b"]
duration-ms = 3000
[workload]
rate-per-region = 50
keys = 5
mix = { counter = 1 }
[[timeline]]
at-ms = 0
action = "clock-skew"
region = "a"
offset-ms = 3600000
[expect]
converged-within-ms = 2000
"#;
    let scenario = Scenario::parse(text).unwrap();
    let report = braid_sim::run(&scenario, options(1)).unwrap();
    assert!(!report.passed);
    let verdict = report
        .checkers
        .iter()
        .find(|c| c.checker == "convergence")
        .unwrap();
    assert!(!verdict.passed);
    assert!(
        verdict
            .detail
            .contains("events refused for an HLC too far ahead")
            && verdict.detail.contains("by receiving region: b "),
        "{}",
        verdict.detail
    );
}
