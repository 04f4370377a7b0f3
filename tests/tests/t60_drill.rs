//! `braid drill` as a user runs it: the shipped region-loss drill in a short form against real
//! processes (RPO, recovery, convergence, the oracle, the HTML timeline), a drill made to fail,
//! what a drill refuses, and attaching to a running cluster.

use std::path::Path;
use std::process::{Command, Output};

use braid_node::cluster::ClusterFile;
use braid_tests::{braid_bin, free_base_port, manifest_dir};
use serde_json::Value;

fn braid(args: &[&str]) -> Output {
    Command::new(braid_bin())
        .args(args)
        .output()
        .expect("run braid")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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

/// Runs the shipped drill `name` (of `regions` regions) at full time in `dir`; returns the
/// process's output and where its JSON report is.
fn shipped_drill(name: &str, regions: usize, dir: &Path) -> (Output, std::path::PathBuf) {
    let json = dir.join("r.json");
    let scenario = manifest_dir().join(format!("../docs/drills/{name}.toml"));
    let base = free_base_port(regions).to_string();
    let out = braid(&[
        "drill",
        scenario.to_str().unwrap(),
        "--base-port",
        &base,
        "--dir",
        dir.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    (out, json)
}

fn checker<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checkers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["checker"] == name)
        .unwrap_or_else(|| panic!("no {name} checker in {}", report["checkers"]))
}

#[test]
fn t60_region_loss_drill_passes_against_real_processes_and_reports_rpo_and_recovery() {
    let work = tempfile::tempdir().unwrap();
    let (json, html) = (work.path().join("r.json"), work.path().join("r.html"));
    let scenario = manifest_dir().join("../docs/drills/region-loss.toml");
    let base = free_base_port(3).to_string();
    let out = braid(&[
        "drill",
        scenario.to_str().unwrap(),
        "--time-scale",
        "0.4",
        "--base-port",
        &base,
        "--dir",
        work.path().to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "drill failed:\n{stdout}\n{stderr}");
    assert!(
        stderr.contains("!! kill b") && stderr.contains("!! restart b"),
        "{stderr}"
    );
    assert!(stdout.contains("verdict: PASS"), "{stdout}");
    processes_gone(&work.path().join("cluster"));

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["passed"], true);
    for name in [
        "convergence",
        "oracle",
        "exactly_once",
        "messages_per_change",
    ] {
        assert_eq!(checker(&report, name)["passed"], true, "{name}");
    }
    let keys = checker(&report, "oracle")["detail"].as_str().unwrap();
    assert!(keys.contains("equal the oracle"), "{keys}");
    // The failure: when, what was at risk, how long until it served and caught up.
    let failures = report["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}");
    let f = &failures[0];
    assert_eq!(
        (f["region"].as_str(), f["kind"].as_str()),
        (Some("b"), Some("kill"))
    );
    assert!(f["last_seq"].as_u64().unwrap() > 0, "{f}");
    assert!(f["replicated_seq"].as_u64().unwrap() <= f["last_seq"].as_u64().unwrap());
    let unreplicated = f["last_seq"].as_u64().unwrap() - f["replicated_seq"].as_u64().unwrap();
    assert_eq!(f["unreplicated_events"].as_u64(), Some(unreplicated), "{f}");
    assert_eq!(f["rpo_writes_max"].as_u64(), Some(unreplicated), "{f}");
    let in_flight = f["in_flight_writes"].as_u64().unwrap();
    assert_eq!(
        f["rpo_writes_min"].as_u64(),
        Some(unreplicated.saturating_sub(in_flight)),
        "{f}"
    );
    assert!(
        f["serving_ms"].as_u64().is_some() && f["recovery_ms"].as_u64().is_some(),
        "{f}"
    );
    assert_eq!(f["reappeared"], true, "{f}");
    // Writes to b while it was down were not acknowledged, and the others went on.
    let writes = &report["writes"];
    assert!(writes["b"]["unavailable"].as_u64().unwrap() > 0, "{writes}");
    assert!(
        writes["a"]["acknowledged"].as_u64().unwrap() > 100,
        "{writes}"
    );
    let after: Vec<&str> = report["convergence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["after"].as_str().unwrap())
        .collect();
    assert_eq!(after, ["restart b", "end of workload"]);
    assert!(report["final_convergence_ms"].as_u64().is_some());
    let timeline = report["timeline"].as_array().unwrap();
    assert!(
        timeline.iter().any(|p| p["link"] == "b->a"),
        "lag of b's link over time"
    );
    assert_eq!(report["faults"].as_array().unwrap().len(), 2);
    assert!(
        report["conflicts_resolved"].as_u64().unwrap() > 0,
        "hot keys conflict"
    );

    // The page is self-contained, and its timeline is well-formed SVG with a line per link and
    // a marker per fault.
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>") && page.contains("PASS"));
    assert!(
        !page.contains("src=") && !page.contains("href="),
        "no external assets"
    );
    let svg = &page[page.find("<svg").unwrap()..page.find("</svg>").unwrap() + 6];
    let doc = roxmltree::Document::parse(svg).expect("well-formed SVG");
    let count = |class: &str| {
        doc.descendants()
            .filter(|n| n.attribute("class") == Some(class))
            .count()
    };
    assert_eq!(count("fault"), 2);
    assert_eq!(count("lag"), 6, "one line per link of 3 regions");
    assert!(doc.descendants().any(|n| n.text() == Some("kill b")));
}

const FAILING: &str = r#"
name = "too-tight"
regions = ["a", "b"]
duration-ms = 3000
[network]
latency-ms-min = 20
latency-ms-max = 40
[workload]
rate-per-region = 50
keys = 20
[[timeline]]
at-ms = 1000
action = "partition"
groups = [["a"], ["b"]]
[[timeline]]
at-ms = 2000
action = "heal"
[expect]
lag-ms-p99-max = 1
"#;

/// The shipped leader-loss drill: whichever region leads the control plane is killed under
/// load and restarted 7 s later; the drill measures it like any kill and the mesh converges.
#[test]
fn t60_a_leader_loss_drill_kills_whichever_region_leads_and_passes() {
    let work = tempfile::tempdir().unwrap();
    let (out, json) = shipped_drill("leader-loss", 3, work.path());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "drill failed:\n{stdout}\n{stderr}");
    let leader = stderr
        .split("!! the leader is ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("no leader named:\n{stderr}"))
        .to_string();
    assert!(["a", "b", "c"].contains(&leader.as_str()), "{leader}");
    assert!(
        stderr.contains("!! kill-leader") && stderr.contains(&format!("!! restart {leader}")),
        "{stderr}"
    );
    assert!(stdout.contains("verdict: PASS"), "{stdout}");
    processes_gone(&work.path().join("cluster"));

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["passed"], true);
    let failures = report["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(
        (failures[0]["region"].as_str(), failures[0]["kind"].as_str()),
        (Some(leader.as_str()), Some("kill"))
    );
    assert_eq!(failures[0]["reappeared"], true, "{}", failures[0]);
}

#[test]
fn t60_a_drill_tighter_than_reality_fails_with_the_evidence_and_a_nonzero_exit() {
    let work = tempfile::tempdir().unwrap();
    let scenario = work.path().join("tight.toml");
    std::fs::write(&scenario, FAILING).unwrap();
    let json = work.path().join("r.json");
    let base = free_base_port(2).to_string();
    let out = braid(&[
        "drill",
        scenario.to_str().unwrap(),
        "--base-port",
        &base,
        "--json",
        json.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(
        !out.status.success(),
        "a failed drill exits non-zero:\n{stdout}"
    );
    assert!(stderr.contains("FAILED: lag_p99"), "{stderr}");
    assert!(stdout.contains("verdict: FAIL"), "{stdout}");
    // The temporary directory of a failed drill is kept, with each region's log.
    let kept = stderr
        .split("its cluster's directory is kept in ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap_or_else(|| panic!("no kept directory said: {stderr}"));
    let kept = std::path::PathBuf::from(kept.trim());
    let log = kept.join("cluster").join("a").join("braid.log");
    let logged = log.exists();
    let _ = std::fs::remove_dir_all(&kept);
    assert!(logged, "{} kept", log.display());
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["passed"], false);
    let lag = checker(&report, "lag_p99");
    assert_eq!(lag["passed"], false);
    assert!(
        lag["detail"].as_str().unwrap().contains("(bound 1 ms)"),
        "{lag}"
    );
    assert!(
        report["lag_ms"]["count"].as_u64().unwrap() > 0,
        "lag was measured"
    );
    assert!(
        report["lag_ms"]["p99"].as_u64().unwrap() > 1,
        "and exceeded the bound"
    );
    // The partition itself did not lose anything.
    assert_eq!(checker(&report, "oracle")["passed"], true);
}

#[test]
fn t60_a_drill_refuses_what_it_cannot_do_honestly() {
    let work = tempfile::tempdir().unwrap();
    let scenario = work.path().join("power.toml");
    std::fs::write(
        &scenario,
        FAILING.replace(
            "action = \"partition\"\ngroups = [[\"a\"], [\"b\"]]",
            "action = \"power-fail\"\nregion = \"a\"",
        ),
    )
    .unwrap();
    let dir = work.path().join("cluster-dir");
    let out = braid(&[
        "drill",
        scenario.to_str().unwrap(),
        "--dir",
        dir.to_str().unwrap(),
    ]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("--durability machine"), "{stderr}");
    assert!(!dir.join("cluster").exists(), "nothing was started");
    // Report paths are checked before anything starts, not after the whole drill.
    let shipped = braid_tests::manifest_dir().join("../docs/drills/region-loss.toml");
    let nowhere = braid(&[
        "drill",
        shipped.to_str().unwrap(),
        "--html",
        "/nonexistent/page.html",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert!(!nowhere.status.success());
    assert!(
        text(&nowhere)
            .1
            .contains("the directory /nonexistent does not exist"),
        "{:?}",
        text(&nowhere)
    );
    assert!(!dir.join("cluster").exists(), "nothing was started");
    let bad = braid(&["drill", "/nonexistent/drill.toml"]);
    assert!(!bad.status.success());
    assert!(text(&bad).1.contains("cannot read /nonexistent/drill.toml"));
    let scale = braid(&["drill", scenario.to_str().unwrap(), "--time-scale", "0"]);
    assert!(
        text(&scale).1.contains("--time-scale"),
        "{}",
        text(&scale).1
    );
}

#[test]
fn t60_a_drill_attaches_to_a_running_cluster_and_refuses_faults_it_lacks() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("c");
    let base = free_base_port(2).to_string();
    let up = braid(&[
        "cluster",
        "up",
        "--regions",
        "2",
        "--dir",
        dir.to_str().unwrap(),
        "--detach",
        "--base-port",
        &base,
        "--keep-change-log",
        // The drill's writers authenticate with the password the cluster's configurations hold.
        "--password",
        "s3cret",
    ]);
    assert!(up.status.success(), "{:?}", text(&up));
    let pid_of = |name: &str| {
        let file = ClusterFile::load(&dir).unwrap();
        file.regions
            .iter()
            .find(|r| r.name == name)
            .unwrap()
            .pid
            .unwrap()
    };
    let first_b = pid_of("b");
    // Partitions need fault injection, which this cluster was not started with.
    let partition = work.path().join("p.toml");
    std::fs::write(&partition, FAILING).unwrap();
    let out = braid(&[
        "drill",
        partition.to_str().unwrap(),
        "--attach",
        dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("--fault-injection"),
        "{:?}",
        text(&out)
    );
    // A kill and restart it can do: the restarted region keeps running afterwards.
    let kill = work.path().join("k.toml");
    std::fs::write(
        &kill,
        FAILING
            .replace(
                "action = \"partition\"\ngroups = [[\"a\"], [\"b\"]]",
                // The second kill finds b down: skipped, and said so.
                "action = \"kill\"\nregion = \"b\"\n[[timeline]]\nat-ms = 1500\n\
                 action = \"kill\"\nregion = \"b\"",
            )
            .replace("action = \"heal\"", "action = \"restart\"\nregion = \"b\"")
            .replace("lag-ms-p99-max = 1", "converged-within-ms = 20000"),
    )
    .unwrap();
    // A cluster that garbage-collects its change logs (the default) cannot be checked from them.
    let collected = work.path().join("gc");
    let init = braid(&[
        "init",
        "--regions",
        "a,b",
        "--dir",
        collected.to_str().unwrap(),
    ]);
    assert!(init.status.success(), "{:?}", text(&init));
    let refused = braid(&[
        "drill",
        kill.to_str().unwrap(),
        "--attach",
        collected.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).1.contains("--keep-change-log"),
        "{:?}",
        text(&refused)
    );
    // A region whose process cluster.json does not record (started by hand) cannot be
    // killed: refused before the workload, not midway.
    let recorded = ClusterFile::load(&dir).unwrap();
    let mut unrecorded = recorded.clone();
    unrecorded.regions[1].pid = None;
    unrecorded.save(&dir).unwrap();
    let refused = braid(&[
        "drill",
        kill.to_str().unwrap(),
        "--attach",
        dir.to_str().unwrap(),
    ]);
    recorded.save(&dir).unwrap();
    assert!(!refused.status.success());
    assert!(
        text(&refused)
            .1
            .contains("cluster.json records no running process for region b"),
        "{:?}",
        text(&refused)
    );
    // The attached cluster has its own durability and ports: asking for others is refused,
    // not ignored.
    for flag in [["--durability", "machine"], ["--base-port", "18000"]] {
        let mut args = vec!["drill", kill.to_str().unwrap(), "--attach"];
        args.extend([dir.to_str().unwrap(), flag[0], flag[1]]);
        let refused = braid(&args);
        assert!(!refused.status.success());
        assert!(text(&refused).1.contains("cannot be used with"), "{flag:?}");
    }
    let out = braid(&[
        "drill",
        kill.to_str().unwrap(),
        "--attach",
        dir.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    // The restarted b is recorded in cluster.json, so `cluster down` stops it.
    let pids = [pid_of("a"), pid_of("b")];
    let down = braid(&["cluster", "down", "--dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("failure: kill b"), "{stdout}");
    assert!(
        stdout.contains("kill b at 1500 ms: skipped, region b is down already"),
        "{stdout}"
    );
    for region in ["a", "b"] {
        // region, acknowledged, refused, unknown, unavailable
        let counts: Vec<u64> = stdout
            .lines()
            .map(str::split_whitespace)
            .find_map(|mut words| {
                (words.next() == Some(region))
                    .then(|| words.filter_map(|w| w.parse().ok()).collect())
            })
            .unwrap_or_else(|| panic!("no write counts for {region}: {stdout}"));
        // Refusals are the workload's WRONGTYPEs; without AUTH every write was one (NOAUTH).
        assert!(
            counts.len() == 4 && counts[0] > counts[1],
            "{region}: {counts:?}\n{stdout}"
        );
    }
    assert_ne!(pids[1], first_b, "b was restarted");
    assert!(down.status.success(), "{:?}", text(&down));
    for pid in pids {
        assert!(!braid_tests::running(pid), "pid {pid} still runs");
    }
}

#[test]
fn t60_a_join_leave_drill_admits_a_region_and_lets_one_go_against_real_processes() {
    let work = tempfile::tempdir().unwrap();
    let (out, json) = shipped_drill("join-leave", 4, work.path());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "drill failed:\n{stdout}\n{stderr}");
    assert!(
        stderr.contains("!! join d") && stderr.contains("!! leave b"),
        "{stderr}"
    );
    assert!(stdout.contains("verdict: PASS"), "{stdout}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["passed"], true);
    let membership = checker(&report, "membership");
    assert_eq!(membership["passed"], true, "{membership}");
    let detail = membership["detail"].as_str().unwrap();
    assert!(
        detail.contains("d join at") && detail.contains("b leave at"),
        "{detail}"
    );
    // The oracle holds every region's change log, the leaver's too, and every member equals it.
    assert_eq!(checker(&report, "oracle")["passed"], true);
    // d wrote once it joined; b's client was refused once b began to leave.
    let writes = &report["writes"];
    assert!(
        writes["d"]["acknowledged"].as_u64().unwrap() > 0,
        "{writes}"
    );
    // (Every region's client is refused now and then: the workload mixes types on its keys.)
    let refused = |r: &str| writes[r]["refused"].as_u64().unwrap();
    assert!(refused("b") > 2 * refused("a"), "{writes}");

    // Every process the drill started is gone; the leaver's was reaped when it left.
    let file = ClusterFile::load(&work.path().join("cluster")).expect("cluster.json");
    assert_eq!(file.regions.len(), 4);
    for region in &file.regions {
        if let Some(pid) = region.pid {
            assert!(
                !braid_tests::running(pid),
                "region {} still runs",
                region.name
            );
        }
    }
    assert_eq!(
        file.regions.iter().find(|r| r.name == "b").unwrap().pid,
        None
    );
}

/// A region that does not come back from its restart: the drill cannot go on, and says so in
/// a report (JSON included) that fails, with what it saw until then.
#[test]
fn t60_a_drill_that_cannot_go_on_still_reports_and_fails() {
    use std::io::BufRead;
    let work = tempfile::tempdir().unwrap();
    let scenario = work.path().join("broken.toml");
    let broken = FAILING
        .replace(
            "action = \"partition\"\ngroups = [[\"a\"], [\"b\"]]",
            "action = \"kill\"\nregion = \"b\"",
        )
        .replace("action = \"heal\"", "action = \"restart\"\nregion = \"b\"")
        .replace("at-ms = 2000", "at-ms = 2500")
        .replace("lag-ms-p99-max = 1", "converged-within-ms = 20000");
    std::fs::write(&scenario, broken).unwrap();
    let json = work.path().join("r.json");
    let dir = work.path().join("d");
    let base = free_base_port(2).to_string();
    let mut child = std::process::Command::new(braid_tests::braid_bin())
        .args(["drill", scenario.to_str().unwrap(), "--base-port", &base])
        .args([
            "--json",
            json.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once b is killed, its configuration is spoiled: its restart fails.
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("!! kill b") {
            break;
        }
    }
    assert!(seen.contains("!! kill b"), "{seen}");
    std::fs::write(dir.join("cluster").join("b").join("braid.toml"), "not toml").unwrap();
    for line in lines {
        seen.push_str(&line.unwrap());
        seen.push('\n');
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}\n{seen}");
    assert!(seen.contains("FAILED: drill"), "{seen}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["passed"], false);
    let drill = checker(&report, "drill");
    assert!(
        drill["detail"]
            .as_str()
            .unwrap()
            .contains("region b exited at restart"),
        "{drill}"
    );
    assert!(
        report["writes"]["a"]["acknowledged"].as_u64().unwrap() > 0,
        "what it saw until then: {report}"
    );
}

/// The scenario of three regions a, b, c under a light load, with `timeline` (TOML), run as a
/// drill in `work`: its output, its JSON report and its cluster's directory.
fn drill_of_three(work: &Path, timeline: &str) -> (Output, Value, std::path::PathBuf) {
    let scenario = work.join("scenario.toml");
    let body = format!(
        r#"
name = "three"
regions = ["a", "b", "c"]
duration-ms = 9000
[network]
latency-ms-min = 5
latency-ms-max = 20
[workload]
rate-per-region = 50
keys = 50
[expect]
converged-within-ms = 30000
no-lost-writes = true
{timeline}"#
    );
    std::fs::write(&scenario, body).unwrap();
    let json = work.join("r.json");
    let base = free_base_port(3).to_string();
    let dir = work.join("d");
    let out = braid(&[
        "drill",
        scenario.to_str().unwrap(),
        "--base-port",
        &base,
        "--dir",
        dir.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "drill failed:\n{stdout}\n{stderr}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (out, report, dir.join("cluster"))
}

/// A leave that finds its region down waits for it to run again, as in the simulator: the
/// drill restarts it at the end of the workload, and it leaves then.
#[test]
fn t60_a_leave_of_a_region_that_is_down_waits_for_it_to_run() {
    let work = tempfile::tempdir().unwrap();
    let (_, report, cluster) = drill_of_three(
        work.path(),
        r#"
[[timeline]]
at-ms = 1000
action = "kill"
region = "b"
[[timeline]]
at-ms = 2000
action = "leave"
region = "b"
"#,
    );
    let membership = checker(&report, "membership");
    assert_eq!(membership["passed"], true, "{membership}");
    assert!(
        membership["detail"]
            .as_str()
            .unwrap()
            .contains("b leave at"),
        "{membership}"
    );
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains("leave b at") && warnings.contains("it leaves once it runs again"),
        "{warnings}"
    );
    let file = ClusterFile::load(&cluster).expect("cluster.json");
    assert_eq!(
        file.regions.iter().find(|r| r.name == "b").unwrap().pid,
        None
    );
    for region in &file.regions {
        if let Some(pid) = region.pid {
            assert!(
                !braid_tests::running(pid),
                "region {} still runs",
                region.name
            );
        }
    }
}

/// A region that joined lists no peers in its configuration: restarted with the faults in
/// force (the scenario's link latency names every peer), it sets them once its members are
/// known instead of refusing them and exiting.
#[test]
fn t60_a_region_that_joined_restarts_with_the_faults_in_force() {
    let work = tempfile::tempdir().unwrap();
    let (out, report, cluster) = drill_of_three(
        work.path(),
        r#"
[[timeline]]
at-ms = 1000
action = "join"
region = "c"
[[timeline]]
at-ms = 6000
action = "kill"
region = "c"
[[timeline]]
at-ms = 7000
action = "restart"
region = "c"
"#,
    );
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("failure: kill c") && !stdout.contains("(skipped)"),
        "{stdout}"
    );
    assert_eq!(checker(&report, "membership")["passed"], true);
    let log = std::fs::read_to_string(cluster.join("c").join("braid.log")).unwrap();
    assert!(
        log.contains("once the members were known"),
        "the restarted c set its faults late: {log}"
    );
    processes_gone(&cluster);
}

/// A drill killed outright (SIGKILL, the OOM killer) cannot stop its cluster: its nodes are
/// told by the kernel and stop, instead of holding their ports for the next drill.
#[test]
fn t60_the_nodes_of_a_drill_killed_outright_stop() {
    let work = tempfile::tempdir().unwrap();
    let scenario = work.path().join("long.toml");
    std::fs::write(
        &scenario,
        "name = \"long\"\nregions = [\"a\", \"b\"]\nduration-ms = 60000\n\
         [workload]\nrate-per-region = 10\nkeys = 10\n",
    )
    .unwrap();
    let dir = work.path().join("d");
    let base = free_base_port(2).to_string();
    let mut drill = Command::new(braid_bin())
        .args([
            "drill",
            scenario.to_str().unwrap(),
            "--base-port",
            &base,
            "--dir",
        ])
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Its regions run once cluster.json records both.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let pids = loop {
        let pids: Vec<u32> = ClusterFile::load(&dir.join("cluster"))
            .map(|f| f.regions.iter().filter_map(|r| r.pid).collect())
            .unwrap_or_default();
        if pids.len() == 2 && pids.iter().all(|p| braid_tests::running(*p)) {
            break pids;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the drill's regions did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    drill.kill().unwrap();
    drill.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while pids.iter().any(|p| braid_tests::running(*p)) {
        if std::time::Instant::now() > deadline {
            for pid in &pids {
                braid_node::launch::signal(*pid, libc::SIGKILL);
            }
            panic!("the nodes outlived the drill: {pids:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
