//! `braid bench` as a user runs it, in a few seconds: it starts a cluster (or attaches to one),
//! drives load, measures the ceilings (and Redis when installed), writes a complete report and
//! leaves no process behind. No assertion on speed: only that every figure is there and real.

use std::path::Path;
use std::process::{Command, Output};

use braid_node::cluster::ClusterFile;
use braid_tests::{braid_bin, free_base_port};
use serde_json::Value;

fn bench(args: &[&str]) -> Output {
    Command::new(braid_bin())
        .arg("bench")
        .args(args)
        .output()
        .expect("run braid bench")
}

fn number(report: &Value, path: &str) -> f64 {
    let mut at = report;
    for part in path.split('.') {
        at = &at[part];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number in the report: {at}"))
}

fn processes_gone(dir: &Path) {
    let file = ClusterFile::load(dir).expect("cluster.json");
    for region in &file.regions {
        let pid = region.pid.expect("pid recorded");
        assert!(
            !braid_tests::running(pid),
            "region {} (pid {pid}) still runs",
            region.name
        );
    }
}

fn redis_installed() -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("redis-server").is_file())
    })
}

#[test]
fn t50_bench_smoke_run_reports_every_figure() {
    let work = tempfile::tempdir().unwrap();
    let json = work.path().join("report.json");
    let base = free_base_port(2).to_string();
    let out = bench(&[
        "--regions",
        "2",
        "--duration",
        "2",
        "--clients",
        "2",
        "--pipeline",
        "4",
        "--mix",
        "set,incr,sadd,hset",
        "--conflict-ratio",
        "0.2",
        "--ceiling-duration",
        "0.5",
        "--outage-events",
        "3000",
        "--base-port",
        &base,
        "--dir",
        work.path().to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    // Progress phases and the final table.
    assert!(stderr.contains("== writing into 2 regions"), "{stderr}");
    assert!(stderr.contains("replicated/s"), "{stderr}");
    assert!(stdout.contains("storage ceiling events/s"), "{stdout}");
    assert!(stdout.contains("replicated / lower ceiling"), "{stdout}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(report["command"].as_str().unwrap().contains("bench"));
    assert_eq!(report["regions"].as_array().unwrap().len(), 2);
    for positive in [
        "ceilings.storage_events_per_s",
        "ceilings.transport_events_per_s",
        "replicated_events_per_s",
        "acked_writes_per_s",
        "bytes_per_event",
        "events_per_batch",
        "ratios.replicated_vs_storage_ceiling",
        "ratios.replicated_vs_transport_ceiling",
        "lag_ms.count",
    ] {
        assert!(
            number(&report, positive) > 0.0,
            "{positive} is not positive"
        );
    }
    for present in ["lag_ms.p50", "lag_ms.p99", "lag_ms.p999", "lag_ms.max"] {
        assert!(number(&report, present) >= 0.0);
    }
    assert!(number(&report, "lag_ms.max") >= number(&report, "lag_ms.p50"));
    assert!(report["drain_ms"].is_number(), "the backlog drained");
    assert_eq!(report["write_errors"], 0, "{}", report["first_write_error"]);
    for region in report["regions"].as_array().unwrap() {
        assert!(region["acked_writes"].as_u64().unwrap() > 0);
        assert!(region["replicated_events"].as_u64().unwrap() > 0);
        assert!(region["cpu_s"].as_f64().unwrap() > 0.0);
        assert!(region["peak_rss_mb"].as_f64().unwrap() > 0.0);
    }
    // Every event was applied once everywhere: each region applied what the other originated.
    let regions = report["regions"].as_array().unwrap();
    let field =
        |name: &str| -> Vec<u64> { regions.iter().map(|r| r[name].as_u64().unwrap()).collect() };
    let (acked, originated, applied) = (
        field("acked_writes"),
        field("events_originated"),
        field("replicated_events"),
    );
    assert_eq!(applied, vec![originated[1], originated[0]]);
    assert!(originated[0] <= acked[0] && originated[0] > acked[0] / 2);
    if redis_installed() {
        assert!(number(&report, "redis.writes_per_s") > 0.0);
        assert!(number(&report, "ratios.writes_vs_redis") > 0.0);
        assert!(number(&report, "redis.replica_lag_ms.count") > 0.0);
    } else {
        assert!(report["redis"].is_null());
        assert!(stdout.contains("install redis-server"));
    }
    // The outage phase: the last region was killed, missed at least the asked events, came
    // back and caught up with all of them.
    let outage = &report["outage"];
    assert_eq!(outage["region"], "b");
    assert!(outage["events_during_outage"].as_u64().unwrap() >= 3000);
    assert!(outage["backlog_events"].as_u64().unwrap() >= 3000);
    assert!(number(&report, "outage.catch_up_s") > 0.0, "caught up");
    assert!(number(&report, "outage.catch_up_events_per_s") > 0.0);
    assert!(outage["rss_mb"][0]["max"].as_f64().unwrap() > 0.0);
    assert!(stdout.contains("catch-up after the outage"), "{stdout}");
    processes_gone(&work.path().join("cluster"));
}

#[test]
fn t50_bench_attaches_to_a_running_cluster() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("cluster");
    let base = free_base_port(2).to_string();
    let up = Command::new(braid_bin())
        .args([
            "cluster",
            "up",
            "--regions",
            "2",
            "--detach",
            "--base-port",
            &base,
        ])
        .arg("--dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let json = work.path().join("report.json");
    let out = bench(&[
        "--attach",
        dir.to_str().unwrap(),
        "--duration",
        "1",
        "--clients",
        "1",
        "--ceiling-duration",
        "0.3",
        "--no-redis",
        "--json",
        json.to_str().unwrap(),
    ]);
    let still_running = ClusterFile::load(&dir).unwrap().regions.iter().all(|r| {
        r.pid
            .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists())
    });
    let down = Command::new(braid_bin())
        .args(["cluster", "down", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(down.status.success());
    assert!(
        still_running,
        "an attached bench must leave the cluster running"
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["settings"]["attached"], true);
    assert!(number(&report, "replicated_events_per_s") > 0.0);
    assert!(report["redis"].is_null());
}

#[test]
fn t50_bench_refuses_bad_options_clearly() {
    for (args, expected) in [
        (&["--mix", "set,get"][..], "unknown command \"get\""),
        (&["--regions", "1"][..], "--regions 1"),
        (&["--conflict-ratio", "2"][..], "--conflict-ratio"),
        (&["--duration", "0"][..], "--duration"),
        (&["--attach", "/nonexistent/braid"][..], "cluster.json"),
        // Refused before the run, not after it.
        (
            &["--json", "/nonexistent/report.json"][..],
            "the directory /nonexistent does not exist",
        ),
        (
            &["--attach", "/tmp", "--outage-events", "10"][..],
            "--outage-events needs the bench's own cluster",
        ),
    ] {
        let out = bench(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
