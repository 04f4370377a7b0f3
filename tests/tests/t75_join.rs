//! Online join with real processes: a fourth region is laid out with `braid add-region`,
//! admitted with `braid join` while writers keep writing in every region, fetches a data
//! snapshot from a member, subscribes from its vector and converges: every region ends with
//! the state the oracle computes from every acknowledged write, none lost, none doubled.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use braid_node::http::Status;
use braid_tests::{Cluster, Layout};
use redis::Commands;

const SETTLE: Duration = Duration::from_secs(60);

/// Keys written before the join: enough for the snapshot to take several chunks.
const KEYS_BEFORE: usize = 3_000;

/// Longest a writer may go without an acknowledged write while the region joins: the join
/// must not pause the others (generous, for a loaded two-core machine).
const WRITE_GAP_MAX: Duration = Duration::from_secs(5);

/// What one writer did.
#[derive(Debug, Default)]
struct Written {
    acked: u64,
    longest_gap: Duration,
}

/// Writes into `resp` until `stop`: strings, a counter every region adds to, set members.
fn writer(
    region: String,
    resp: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Written> {
    std::thread::spawn(move || {
        let client = redis::Client::open(format!("redis://{resp}/")).unwrap();
        let mut conn = client.get_connection().unwrap();
        let mut written = Written::default();
        let mut last = Instant::now();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let _: () = conn.set(format!("{region}:{}", i % 500), i).unwrap();
            let _: i64 = conn.incr("shared-counter", 1).unwrap();
            let _: i64 = conn.sadd("shared-set", format!("{region}{i}")).unwrap();
            written.acked += 3;
            written.longest_gap = written.longest_gap.max(last.elapsed());
            last = Instant::now();
            i += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        written
    })
}

/// Waits until `check` holds for the statuses of `regions` (each with its `/status`), and
/// returns them; fails with `what` and a summary of the last ones.
fn wait_for(
    cluster: &mut Cluster,
    regions: &[&str],
    what: &str,
    check: impl Fn(&[Status]) -> bool,
) -> Vec<Status> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let statuses: Vec<Status> = regions.iter().map(|r| cluster.node(r).status()).collect();
        if check(&statuses) {
            return statuses;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {SETTLE:?}: {:?}",
            statuses
                .iter()
                .map(|s| (&s.region, s.change_log_events, &s.control.members))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the `braid` binary to its end.
fn braid(args: &[&str]) -> std::process::Output {
    std::process::Command::new(braid_tests::braid_bin())
        .args(args)
        .output()
        .expect("run braid")
}

fn member_state(status: &Status, name: &str) -> Option<String> {
    status
        .control
        .members
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.state.clone())
}

#[test]
fn t75_a_fourth_region_joins_under_load_and_converges_to_the_oracle() {
    let mut cluster = Cluster::start(Layout::mesh(3));
    {
        let mut a = cluster.node("a").redis();
        for i in 0..KEYS_BEFORE {
            let _: () = a.set(format!("before{i}"), i).unwrap();
        }
    }
    let _: () = cluster.node("b").redis().hset("h", "f", "b").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<JoinHandle<Written>> = ["a", "b", "c"]
        .iter()
        .map(|r| writer(r.to_string(), cluster.node(r).resp, stop.clone()))
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    let via = cluster.node("b").http;
    let d = cluster.add_region("d");
    d.start_join(via);
    // d turns active everywhere, and is connected to every region.
    let deadline = Instant::now() + SETTLE;
    loop {
        let running: Vec<Status> = cluster
            .nodes
            .iter()
            .filter(|n| n.running() && braid_tests::http_get(n.http, "/health").is_ok())
            .map(|n| n.status())
            .collect();
        let joined = running.len() == 4
            && running
                .iter()
                .all(|s| member_state(s, "d").as_deref() == Some("active"))
            && running.iter().find(|s| s.region == "d").is_some_and(|s| {
                s.peers.len() == 3 && s.peers.iter().all(|p| p.state == "connected")
            });
        if joined {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "d did not join within {SETTLE:?}; its log:\n{}",
            cluster.node("d").log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // d takes writes too, and they reach everyone.
    let mut d_conn = cluster.node("d").redis();
    for i in 0..100 {
        let _: () = d_conn.set(format!("d:{i}"), i).unwrap();
    }
    let _: i64 = d_conn.incr("shared-counter", 1000).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let written: Vec<Written> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    for (region, w) in ["a", "b", "c"].iter().zip(&written) {
        assert!(w.acked > 0, "{region} wrote nothing");
        assert!(
            w.longest_gap < WRITE_GAP_MAX,
            "writes into {region} paused for {:?} during the join",
            w.longest_gap
        );
    }
    cluster.wait_converged(SETTLE);

    // d was given a snapshot: it holds the others' early events in its state, not its log.
    let status = cluster.node("d").status();
    assert!(
        status.change_log_trimmed.get("a").copied().unwrap_or(0) >= KEYS_BEFORE as u64,
        "d replayed a's log instead of installing a snapshot: {:?}",
        status.change_log_trimmed
    );
    assert!(cluster.node("d").log().contains("data snapshot installed"));

    // Every region, d included, holds exactly what the oracle computes from every write.
    cluster.stop_all();
    let (events, expected) = cluster.oracle_from_logs();
    let acked: u64 =
        written.iter().map(|w| w.acked).sum::<u64>() + 1 + 100 + 1 + KEYS_BEFORE as u64;
    assert_eq!(
        events.len() as u64,
        acked,
        "every acknowledged write is in some change log, once"
    );
    for (region, values) in cluster.stored_values() {
        let differing: BTreeMap<_, _> = expected
            .iter()
            .filter(|(k, v)| values.get(*k) != Some(*v))
            .take(5)
            .collect();
        assert!(
            differing.is_empty() && values.len() == expected.len(),
            "{region} differs from the oracle ({} keys, expected {}): {differing:?}",
            values.len(),
            expected.len()
        );
    }
}

#[test]
fn t75_a_region_joins_a_mesh_whose_logs_were_collected() {
    let mut cluster = Cluster::start(Layout::mesh(3).with_change_log_gc());
    for i in 0..500 {
        let _: () = cluster
            .node(["a", "b", "c"][i % 3])
            .redis()
            .set(format!("k{i}"), i)
            .unwrap();
    }
    // Wait until the logs were collected: d could not be fed from them.
    let deadline = Instant::now() + SETTLE;
    while cluster.node("a").status().change_log_events > 0 {
        assert!(Instant::now() < deadline, "the logs were never collected");
        std::thread::sleep(Duration::from_millis(200));
    }
    let via = cluster.node("a").http;
    let config = cluster.add_region("d").config.clone();
    // Laid out but not joined: `braid start` refuses it.
    let out = braid(&["start", "--config", &config.display().to_string()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has not finished joining"),
        "{out:?}"
    );
    cluster.node("d").start_join(via);
    cluster.node("d").wait_healthy();
    let got: i64 = cluster.node("d").redis().get("k499").unwrap();
    assert_eq!(got, 499, "d has the snapshot's data as soon as it serves");
    let _: () = cluster.node("d").redis().set("from-d", 1).unwrap();
    cluster.wait_converged(SETTLE);
    let got: i64 = cluster.node("a").redis().get("from-d").unwrap();
    assert_eq!(got, 1);
    // Collection resumes once d has reported its snapshot's vector: the logs empty again.
    wait_for(
        &mut cluster,
        &["a", "b", "c", "d"],
        "collection resumes after the join",
        |s| {
            s.iter().all(|s| {
                member_state(s, "d").as_deref() == Some("active") && s.change_log_events == 0
            })
        },
    );
    // A restart of the joined region is a plain `braid start`; `braid join` refuses it.
    cluster.node("d").stop();
    let out = braid(&[
        "join",
        "--config",
        &config.display().to_string(),
        "--via",
        &via.to_string(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has joined already"),
        "{out:?}"
    );
    cluster.node("d").start();
    cluster.node("d").wait_healthy();
    let got: i64 = cluster.node("d").redis().get("k10").unwrap();
    assert_eq!(got, 10);
    cluster.wait_converged(SETTLE);
    cluster.stop_all();
    let values = cluster.stored_values();
    assert!(
        values.windows(2).all(|w| w[0].1 == w[1].1),
        "the regions differ after the join"
    );
}

#[test]
fn t75_a_dead_region_is_removed_and_collection_resumes_without_it() {
    let mut cluster = Cluster::start(Layout::mesh(3).with_change_log_gc());
    wait_for(
        &mut cluster,
        &["a", "b", "c"],
        "the group bootstrapped",
        |s| s.iter().all(|s| s.control.members.len() == 3),
    );
    // c writes and deletes before it dies: its tombstones are everywhere.
    for i in 0..10 {
        let _: () = cluster.node("c").redis().set(format!("c{i}"), i).unwrap();
        let _: i64 = cluster.node("c").redis().del(format!("c{i}")).unwrap();
    }
    cluster.wait_converged(SETTLE);
    cluster.node("c").kill9();
    for i in 0..100 {
        let _: () = cluster.node("a").redis().set(format!("k{i}"), i).unwrap();
    }
    for i in 0..10 {
        let _: i64 = cluster.node("a").redis().del(format!("k{i}")).unwrap();
    }
    // c holds the frontier back while it is a member.
    std::thread::sleep(Duration::from_secs(4));
    assert!(cluster.node("a").status().change_log_events >= 100);
    let http = cluster.node("b").http.to_string();
    let out = braid(&["remove", "--http", &http, "--region", "c"]);
    assert!(out.status.success(), "{out:?}");
    // Asked again (as after an answer that was lost): removed is what was asked for.
    let again = braid(&["remove", "--http", &http, "--region", "c"]);
    assert!(again.status.success(), "{again:?}");
    let out = braid(&["remove", "--http", &http, "--region", "nowhere"]);
    assert!(!out.status.success(), "{out:?}");
    // Refused, and nothing changes: the node asked to remove itself.
    let out = braid(&["remove", "--http", &http, "--region", "b"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("braid leave"));

    // Joins that cannot be are refused, with the reason, and change nothing.
    let config = braid_node::config::NodeConfig::load(&cluster.node("a").config).unwrap();
    let b_http = cluster.node("b").http;
    let join = |cluster_id: &str, id: u64, region: &str, peer: &str| {
        let body = serde_json::json!({
            "cluster_id": cluster_id, "id": id, "region": region, "peer_address": peer,
            "resp_address": "127.0.0.1:1", "http_address": "127.0.0.1:2",
        });
        braid_tests::http_post(b_http, "/join", &body.to_string()).unwrap_err()
    };
    let ours = config.cluster_id.as_str();
    let other = "00000000000000000000000000000000";
    for (err, expected) in [
        (join(other, 9, "x", "127.0.0.1:3"), "HTTP 400"),
        (join(ours, 9, "x", "nowhere"), "HTTP 400"),
        (join(ours, 1, "x", "127.0.0.1:3"), "node id n1 is taken"),
        (join(ours, 3, "x", "127.0.0.1:3"), "node id n3 is taken"),
        (join(ours, 9, "a", "127.0.0.1:3"), "region a is taken"),
        // Region names go into metric labels unquoted.
        (
            join(ours, 9, "x\"} 1\nfake", "127.0.0.1:3"),
            "use 1-32 letters, digits",
        ),
    ] {
        assert!(err.contains(expected), "{err}");
    }
    let err = braid_tests::http_post(b_http, "/join", "{\"id\": 9}").unwrap_err();
    assert!(err.contains("HTTP 4"), "{err}");
    wait_for(
        &mut cluster,
        &["a", "b"],
        "c removed, and collection resumed without it",
        |s| {
            s.iter().all(|s| {
                member_state(s, "c").as_deref() == Some("removed")
                    && member_state(s, "b").as_deref() == Some("active")
                    && s.change_log_events == 0
            })
        },
    );
    // The stable HLC passes the dead region too: the tombstones of c's deletes and of a's
    // deletes after c died are collected, and their keys forgotten.
    wait_for(
        &mut cluster,
        &["a", "b"],
        "tombstones collected without c",
        |s| s.iter().all(|s| s.keys_forgotten >= 20),
    );
}

#[test]
fn t75_a_region_down_past_the_retention_bound_is_resynchronised_by_snapshot() {
    const RETENTION: u64 = 200;
    let mut cluster = Cluster::start(Layout::mesh(3).with_retention_events(RETENTION));
    for i in 0..100 {
        let _: () = cluster
            .node("a")
            .redis()
            .set(format!("early{i}"), i)
            .unwrap();
    }
    cluster.wait_converged(SETTLE);
    cluster.node("c").stop();
    // a and b write on. c holds the stable frontier back, but the logs keep to the bound:
    // the events c lacks are deleted.
    let mut written = 0i64;
    for region in ["a", "b"] {
        let mut conn = cluster.node(region).redis();
        for i in 0..750 {
            let _: () = conn.set(format!("{region}{i}"), i).unwrap();
            let _: i64 = conn.incr("counter", 1).unwrap();
            written += 1;
        }
    }
    wait_for(
        &mut cluster,
        &["a", "b"],
        "logs within the retention bound",
        |s| {
            s.iter().all(|s| {
                s.change_log_events <= RETENTION && s.change_log_events_retention_trimmed > 0
            })
        },
    );
    // c comes back behind what any log holds: it is resynchronised by snapshot and converges.
    cluster.node("c").start();
    cluster.node("c").wait_healthy();
    cluster.wait_converged(SETTLE);
    let status = cluster.node("c").status();
    assert!(
        status.snapshots_installed >= 1,
        "c was not resynchronised by snapshot"
    );
    let mut c = cluster.node("c").redis();
    let counter: i64 = c.get("counter").unwrap();
    assert_eq!(counter, written);
    let _: () = c.set("after", "c").unwrap();
    cluster.wait_converged(SETTLE);
    cluster.stop_all();
    let values = cluster.stored_values();
    assert!(
        values.windows(2).all(|w| w[0].1 == w[1].1),
        "the regions differ after the resynchronisation"
    );
    assert_eq!(values[0].1.len(), 100 + 1500 + 1 + 1);
}

#[test]
fn t75_a_key_larger_than_a_frame_reaches_a_joining_region_in_parts() {
    const FIELDS: usize = 60_000;
    const PER_COMMAND: usize = 10_000;
    let mut cluster = Cluster::start(Layout::mesh(2));
    let mut a = cluster.node("a").redis();
    // Keys on both sides of the large one, in its chunk and after it.
    for key in ["a", "before", "c", "zz"] {
        let _: () = a.set(key, key).unwrap();
    }
    // A hash of about 7 MB: its state alone does not fit a 4 MiB frame.
    let value = "v".repeat(100);
    for start in (0..FIELDS).step_by(PER_COMMAND) {
        let mut hset = redis::cmd("HSET");
        hset.arg("big");
        for i in start..start + PER_COMMAND {
            hset.arg(format!("field-{i:06}")).arg(&value);
        }
        let added: i64 = hset.query(&mut a).unwrap();
        assert_eq!(added, PER_COMMAND as i64);
    }
    drop(a);
    let via = cluster.node("a").http;
    cluster.add_region("c");
    cluster.node("c").start_join(via);
    cluster.node("c").wait_healthy();
    let mut c = cluster.node("c").redis();
    let fields: BTreeMap<String, String> = c.hgetall("big").unwrap();
    assert_eq!(fields.len(), FIELDS, "every field of the large key arrived");
    assert_eq!(fields.get("field-059999"), Some(&value));
    for key in ["a", "before", "c", "zz"] {
        let got: String = c.get(key).unwrap();
        assert_eq!(got, key, "the keys around it too");
    }
    let log = cluster.node("a").log();
    assert!(
        log.contains("a key too large for a frame goes in parts"),
        "the server says it sent a key in parts"
    );
    cluster.wait_converged(SETTLE);
}

#[test]
fn t75_a_region_removed_while_cut_off_is_told_when_the_link_heals_and_stops() {
    let mut cluster = Cluster::start(Layout::mesh(3).with_fault_injection());
    wait_for(
        &mut cluster,
        &["a", "b", "c"],
        "the group bootstrapped",
        |s| s.iter().all(|s| s.control.members.len() == 3),
    );
    cluster.faults("c", r#"{"cut": ["a", "b"]}"#);
    cluster.faults("a", r#"{"cut": ["c"]}"#);
    cluster.faults("b", r#"{"cut": ["c"]}"#);
    let http = cluster.node("b").http.to_string();
    let out = braid(&["remove", "--http", &http, "--region", "c"]);
    assert!(out.status.success(), "{out:?}");
    wait_for(&mut cluster, &["a", "b"], "c removed", |s| {
        s.iter()
            .all(|s| member_state(s, "c").as_deref() == Some("removed"))
    });
    // Cut off, c never learned: it still takes writes, which no other region will receive.
    let _: () = cluster.node("c").redis().set("lost", "1").unwrap();
    // c's links to the follower heal; to the leader, which would replicate the removal to it
    // while it is still in the Raft group, they stay cut: as once the leader has dropped it.
    let leader = cluster.node("a").status().control.leader.expect("a leader");
    let follower = if leader == "a" { "b" } else { "a" };
    cluster.faults(follower, "{}");
    cluster.faults("c", &format!(r#"{{"cut": ["{leader}"]}}"#));
    // Its next connection to the follower is refused with the reason: it stops.
    let exit = cluster.node("c").wait_exit(SETTLE);
    assert!(
        exit.is_some(),
        "c still runs, taking writes, after the heal"
    );
    assert!(
        cluster
            .node(follower)
            .log()
            .contains("it was removed from the mesh (told so)"),
        "{}",
        cluster.node(follower).log()
    );
    assert!(
        cluster
            .node("c")
            .log()
            .contains("the peer says this region was removed from the mesh"),
        "{}",
        cluster.node("c").log()
    );
    // And it does not start again to take writes.
    cluster.node("c").start();
    let exit = cluster
        .node("c")
        .wait_exit(SETTLE)
        .expect("c refuses to start");
    assert!(!exit.success());
    let log = cluster.node("c").log();
    assert!(
        log.rsplit("node listening")
            .next()
            .unwrap_or(&log)
            .contains("was removed from the mesh"),
        "{log}"
    );
}

#[test]
fn t75_a_leave_that_would_need_a_dead_voters_vote_is_refused_with_the_way_out() {
    let mut cluster = Cluster::start(Layout::mesh(4));
    wait_for(
        &mut cluster,
        &["a", "b", "c", "d"],
        "every member reported a checkpoint",
        |s| {
            s.iter().all(|s| {
                s.control.members.len() == 4
                    && s.control.members.iter().all(|m| m.checkpoint.is_some())
            })
        },
    );
    cluster.node("b").kill9();
    // Its last checkpoint ages past 30 s.
    std::thread::sleep(Duration::from_secs(33));
    // c leaving changes the voters {a, b, c, d} to {a, b, d}: a and d are a majority of it.
    let out = braid(&["leave", "--http", &cluster.node("c").http.to_string()]);
    assert!(out.status.success(), "{out:?}");
    wait_for(&mut cluster, &["a", "d"], "c removed", |s| {
        s.iter()
            .all(|s| member_state(s, "c").as_deref() == Some("removed"))
    });
    // c's removal made the state forget every checkpoint, b's too: b is still known dead. d
    // leaving would change the voters to {a, b}, which needs b's vote; so would removing d.
    let out = braid(&["leave", "--http", &cluster.node("d").http.to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the leave was accepted: {stderr}");
    assert!(
        stderr.contains("needs the votes of b") && stderr.contains("braid remove"),
        "{stderr}"
    );
    let http = cluster.node("a").http.to_string();
    let out = braid(&["remove", "--http", &http, "--region", "d"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the removal was accepted: {stderr}");
    assert!(
        stderr.contains("removing d now needs the votes of b"),
        "{stderr}"
    );
    // Nothing changed: d is still active and takes writes.
    let statuses = wait_for(&mut cluster, &["a", "d"], "d still active", |s| {
        s.iter()
            .all(|s| member_state(s, "d").as_deref() == Some("active"))
    });
    assert_eq!(statuses.len(), 2);
    let _: () = cluster.node("d").redis().set("still", "1").unwrap();
    // The way out: remove the dead voter first; then d may leave.
    let out = braid(&["remove", "--http", &http, "--region", "b"]);
    assert!(out.status.success(), "{out:?}");
}
