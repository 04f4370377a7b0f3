//! The control plane with real processes: the Raft group forms over the mesh's QUIC
//! connections, bootstraps its members, commits every node's checkpoints and derives the stable
//! frontier; it outlives its leader; a partitioned region keeps serving but commits nothing;
//! a whole cluster restarts with its control state.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use braid_node::http::Status;
use braid_tests::{http_post, Cluster, Layout};
use redis::Commands;

const SETTLE: Duration = Duration::from_secs(30);

/// Waits until `check` holds for the statuses of the running nodes, and returns them.
fn wait_for(cluster: &Cluster, what: &str, check: impl Fn(&[Status]) -> bool) -> Vec<Status> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let statuses: Vec<Status> = cluster
            .nodes
            .iter()
            .filter(|n| n.running())
            .map(|n| n.status())
            .collect();
        if check(&statuses) {
            return statuses;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {SETTLE:?}; last statuses: {:#?}",
            statuses
                .iter()
                .map(|s| (&s.region, &s.control))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every running node names the same leader, and that leader is one of them.
fn agreed_leader(statuses: &[Status]) -> Option<String> {
    let leader = statuses.first()?.control.leader.clone()?;
    let agreed = statuses
        .iter()
        .all(|s| s.control.leader.as_deref() == Some(leader.as_str()));
    let running = statuses.iter().any(|s| s.region == leader);
    (agreed && running).then_some(leader)
}

/// The checkpoint `member` last committed, as `status` shows it.
fn checkpoint_of(status: &Status, member: &str) -> Option<BTreeMap<String, u64>> {
    status
        .control
        .members
        .iter()
        .find(|m| m.name == member)?
        .checkpoint
        .as_ref()
        .map(|c| c.vector.clone())
}

#[test]
fn t70_the_group_bootstraps_commits_checkpoints_and_derives_the_frontier() {
    let mut cluster = Cluster::start(Layout::mesh(3));
    for (i, region) in ["a", "b", "c"].into_iter().enumerate() {
        for k in 0..=i {
            let _: () = cluster
                .node(region)
                .redis()
                .set(format!("{region}{k}"), "v")
                .unwrap();
        }
    }
    cluster.wait_converged(SETTLE);
    let want: BTreeMap<String, u64> = [("a", 1), ("b", 2), ("c", 3)]
        .into_iter()
        .map(|(r, s)| (r.to_string(), s))
        .collect();
    // Every node: one leader, three active voting members, each member's checkpoint at the
    // converged vector, and the frontier there too.
    let statuses = wait_for(&cluster, "checkpoints committed", |statuses| {
        agreed_leader(statuses).is_some()
            && statuses.iter().all(|s| {
                s.control.members.len() == 3
                    && s.control.stable_frontier == want
                    && ["a", "b", "c"]
                        .iter()
                        .all(|m| checkpoint_of(s, m).as_ref() == Some(&want))
            })
    });
    for status in &statuses {
        assert!(status.control.term >= 1, "{status:?}");
        let names: Vec<&str> = status
            .control
            .members
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        for member in &status.control.members {
            assert_eq!(member.state, "active");
            assert!(member.voter, "{member:?}");
            let node = cluster
                .nodes
                .iter()
                .find(|n| n.name == member.name)
                .unwrap();
            assert_eq!(member.resp_address, node.resp.to_string());
            assert_eq!(member.http_address, node.http.to_string());
            assert_eq!(member.peer_address, node.peer.to_string());
        }
        let leaders = statuses
            .iter()
            .filter(|s| s.control.raft_role == "leader")
            .count();
        assert_eq!(leaders, 1, "exactly one node is the leader");
    }
    // The JSON carries the fields at the top level, as documented.
    let http = cluster.node("b").http;
    let body = braid_tests::http_get(http, "/status").unwrap();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(json["leader"].is_string(), "{body}");
    assert!(json["term"].as_u64().unwrap() >= 1, "{body}");
    let members = json["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for m in members {
        for field in ["name", "id", "state", "checkpoint"] {
            assert!(!m[field].is_null(), "member without {field}: {m}");
        }
    }
    // `braid status` prints it.
    let out = std::process::Command::new(braid_tests::braid_bin())
        .args(["status", "--http", &http.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("control plane: leader "), "{text}");
    assert!(text.contains("stable frontier: a=1 b=2 c=3"), "{text}");
    for name in ["a", "b", "c"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l.contains("active") && l.contains("a=1 b=2 c=3")),
            "no member line for {name}: {text}"
        );
    }
}

#[test]
fn t70_the_group_outlives_its_leader_and_a_restarted_cluster_keeps_its_state() {
    let mut cluster = Cluster::start(Layout::mesh(3));
    let first = wait_for(&cluster, "a leader", |s| {
        agreed_leader(s).is_some() && s.iter().all(|s| s.control.members.len() == 3)
    });
    let old_leader = agreed_leader(&first).unwrap();
    let old_term = first[0].control.term;
    cluster.node(&old_leader).kill9();

    // The other two elect one of them in a later term, and go on committing: a write in a
    // survivor shows up in its checkpoint, as the other survivor sees it.
    let survivors: Vec<String> = ["a", "b", "c"]
        .into_iter()
        .filter(|r| *r != old_leader)
        .map(String::from)
        .collect();
    wait_for(&cluster, "a new leader", |s| {
        agreed_leader(s).is_some_and(|l| l != old_leader)
            && s.iter().all(|s| s.control.term > old_term)
    });
    let _: () = cluster
        .node(&survivors[0])
        .redis()
        .set("after", "failover")
        .unwrap();
    let writer = survivors[0].clone();
    wait_for(&cluster, "a checkpoint after the failover", |s| {
        s.iter()
            .all(|s| checkpoint_of(s, &writer).is_some_and(|v| v.get(&writer).copied() == Some(1)))
    });
    // Topology changes commit too: a chain with the dead region at its end.
    let chain = format!(
        "{}-{},{}-{old_leader}",
        survivors[0], survivors[1], survivors[1]
    );
    let http = cluster.node(&survivors[0]).http.to_string();
    let out = braid(&["topology", "set", "--http", &http, "--links", &chain]);
    assert!(out.status.success(), "{out:?}");
    wait_for(&cluster, "the chain committed after the failover", |s| {
        s.iter()
            .all(|s| !s.control.full_mesh && s.control.links.len() == 2)
    });

    // The old leader comes back as a follower of the new one and catches up on what was
    // committed without it.
    cluster.node(&old_leader).start();
    cluster.node(&old_leader).wait_healthy();
    wait_for(&cluster, "the old leader caught up", |s| {
        s.len() == 3
            && agreed_leader(s).is_some()
            && s.iter().all(|s| {
                checkpoint_of(s, &writer).is_some_and(|v| v.get(&writer).copied() == Some(1))
            })
    });

    // The whole cluster stops and starts again: the members and checkpoints are still there,
    // and the term does not go back.
    let before = wait_for(&cluster, "settled", |s| agreed_leader(s).is_some());
    let term_before = before.iter().map(|s| s.control.term).max().unwrap();
    cluster.stop_all();
    for node in &mut cluster.nodes {
        node.start();
    }
    cluster.wait_connected(&[0, 1, 2]);
    let after = wait_for(&cluster, "the restarted group", |s| {
        agreed_leader(s).is_some()
            && s.iter().all(|s| {
                s.control.members.len() == 3
                    && checkpoint_of(s, &writer).is_some_and(|v| v.get(&writer).copied() == Some(1))
            })
    });
    assert!(after.iter().all(|s| s.control.term >= term_before));
}

#[test]
fn t70_a_partitioned_region_serves_writes_commits_nothing_and_converges_after_heal() {
    let mut cluster = Cluster::start(Layout::mesh(3).with_fault_injection());
    wait_for(&cluster, "a leader", |s| {
        agreed_leader(s).is_some() && s.iter().all(|s| s.control.members.len() == 3)
    });
    // Cut c off from a and b, both ways.
    for (region, body) in [
        ("a", r#"{"cut": ["c"]}"#),
        ("b", r#"{"cut": ["c"]}"#),
        ("c", r#"{"cut": ["a", "b"]}"#),
    ] {
        let http = cluster.node(region).http;
        http_post(http, "/faults", body).unwrap();
    }
    // The majority (a, b) has a leader among them; c does not lead anything that commits.
    wait_for(&cluster, "a majority leader", |s| {
        let ab: Vec<&Status> = s.iter().filter(|s| s.region != "c").collect();
        let leader = ab[0].control.leader.clone();
        leader.as_deref().is_some_and(|l| l != "c") && ab.iter().all(|s| s.control.leader == leader)
    });
    // c serves its own writes.
    for i in 0..5 {
        let _: () = cluster
            .node("c")
            .redis()
            .set(format!("c{i}"), "during")
            .unwrap();
    }
    let got: String = cluster.node("c").redis().get("c4").unwrap();
    assert_eq!(got, "during");
    // ... but cannot commit its checkpoint: for several report intervals, no node's committed
    // state shows c's new writes.
    std::thread::sleep(Duration::from_secs(8));
    for status in cluster.nodes.iter().map(|n| n.status()) {
        let c = checkpoint_of(&status, "c").unwrap_or_default();
        assert!(
            c.get("c").copied().unwrap_or(0) < 5,
            "{}: c's checkpoint committed during the partition: {c:?}",
            status.region
        );
    }
    // ... nor change the topology.
    let c_http = cluster.node("c").http.to_string();
    let out = braid(&["topology", "set", "--http", &c_http, "--links", "a-c,b-c"]);
    assert!(!out.status.success(), "a minority changed the topology");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no leader committed"), "{stderr}");
    // Heal: c's writes reach everyone, and c's checkpoint commits under the majority's leader
    // (or whoever leads now).
    for region in ["a", "b", "c"] {
        let http = cluster.node(region).http;
        http_post(http, "/faults", r#"{"cut": []}"#).unwrap();
    }
    cluster.wait_converged(SETTLE);
    wait_for(&cluster, "c's checkpoint after the heal", |s| {
        agreed_leader(s).is_some()
            && s.iter()
                .all(|s| checkpoint_of(s, "c").is_some_and(|v| v.get("c").copied() == Some(5)))
    });
    for region in ["a", "b"] {
        let got: String = cluster.node(region).redis().get("c4").unwrap();
        assert_eq!(got, "during", "{region}");
    }
}

/// Sum of a status's vector: every event this node has applied.
fn applied(status: &Status) -> u64 {
    status.vector.values().sum()
}

#[test]
fn t70_the_change_log_is_trimmed_below_the_frontier_and_a_down_region_holds_it_back() {
    let mut cluster = Cluster::start(Layout::mesh(3).with_change_log_gc());
    wait_for(&cluster, "the group bootstrapped", |s| {
        agreed_leader(s).is_some() && s.iter().all(|s| s.control.members.len() == 3)
    });
    // A steady load in every region for a while: the logs are trimmed as it runs.
    let mut connections: Vec<redis::Connection> = cluster.nodes.iter().map(|n| n.redis()).collect();
    let load_until = Instant::now() + Duration::from_secs(10);
    let mut written = 0u64;
    while Instant::now() < load_until {
        for (i, connection) in connections.iter_mut().enumerate() {
            let _: () = connection
                .set(format!("k{}", written % 50), format!("{i}-{written}"))
                .unwrap();
            let _: i64 = connection.incr("n", 1).unwrap();
            written += 2;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let during: Vec<Status> = cluster.nodes.iter().map(|n| n.status()).collect();
    for status in &during {
        assert!(
            status.change_log_events_trimmed > 0,
            "{}: nothing trimmed during the load",
            status.region
        );
        assert!(
            status.change_log_events < applied(status),
            "{}: the log holds all {} events",
            status.region,
            applied(status)
        );
    }
    // Once the load stops, the frontier reaches everyone's vector and the logs empty.
    cluster.wait_converged(SETTLE);
    let settled = wait_for(&cluster, "empty change logs", |s| {
        s.iter()
            .all(|s| s.change_log_events == 0 && s.change_log_trimmed == s.vector)
    });
    let total: i64 = cluster.node("a").redis().get("n").unwrap();
    assert_eq!(total as u64, written / 2, "every increment once");
    for status in &settled {
        assert_eq!(applied(status), written);
    }

    // A region that is down holds the frontier back: what it lacks is kept for it.
    cluster.node("c").kill9();
    let c_had = settled
        .iter()
        .find(|s| s.region == "c")
        .unwrap()
        .vector
        .clone();
    for i in 0..200 {
        let _: () = cluster
            .node("a")
            .redis()
            .set(format!("down{i}"), "x")
            .unwrap();
    }
    // Several checkpoint intervals pass.
    std::thread::sleep(Duration::from_secs(8));
    for region in ["a", "b"] {
        let status = cluster.node(region).status();
        assert_eq!(
            status.change_log_trimmed.get("a"),
            c_had.get("a"),
            "{region} trimmed what c lacks"
        );
        assert!(status.change_log_events >= 200, "{region}: {status:?}");
    }
    // c comes back, catches up from the others' logs, and then the logs empty again.
    cluster.node("c").start();
    cluster.wait_connected(&[0, 1, 2]);
    cluster.wait_converged(SETTLE);
    wait_for(&cluster, "empty change logs after c's return", |s| {
        s.len() == 3
            && s.iter()
                .all(|s| s.change_log_events == 0 && s.change_log_trimmed == s.vector)
    });
    let got: String = cluster.node("c").redis().get("down199").unwrap();
    assert_eq!(got, "x");
}

fn braid(args: &[&str]) -> std::process::Output {
    std::process::Command::new(braid_tests::braid_bin())
        .args(args)
        .output()
        .unwrap()
}

fn neighbors(status: &Status) -> Vec<String> {
    status.peers.iter().map(|p| p.region.clone()).collect()
}

#[test]
fn t70_topology_changes_commit_and_every_node_follows_without_a_restart() {
    let mut cluster = Cluster::start(Layout::mesh(3));
    wait_for(&cluster, "a leader", |s| {
        agreed_leader(s).is_some() && s.iter().all(|s| s.control.full_mesh)
    });
    let http = cluster.node("b").http.to_string();

    // A chain a-b-c: a and c drop their link, and a's writes reach c through b.
    let out = braid(&["topology", "set", "--http", &http, "--links", "a-b,b-c"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Committed: links a-b b-c"));
    let chain = vec![
        ["a".to_string(), "b".to_string()],
        ["b".to_string(), "c".to_string()],
    ];
    wait_for(&cluster, "every node on the chain", |s| {
        s.iter().all(|s| {
            s.control.links == chain
                && !s.control.full_mesh
                && match s.region.as_str() {
                    "b" => neighbors(s) == ["a", "c"],
                    _ => neighbors(s) == ["b"] && s.peers[0].state == "connected",
                }
        })
    });
    let _: () = cluster.node("a").redis().set("via", "b").unwrap();
    let deadline = Instant::now() + SETTLE;
    loop {
        let got: Option<String> = cluster.node("c").redis().get("via").unwrap();
        if got.as_deref() == Some("b") {
            break;
        }
        assert!(Instant::now() < deadline, "a's write never reached c");
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = cluster.node("c").status();
    assert_eq!(c.peers[0].pulling, ["a", "b"], "c pulls a's events from b");

    // Links that would cut a region off are refused, and change nothing.
    let out = braid(&["topology", "set", "--http", &http, "--links", "a-b"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("409") && stderr.contains("c"), "{stderr}");
    let out = braid(&["topology", "set", "--http", &http, "--links", "a-z"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no member z"), "{stderr}");
    let out = braid(&["topology", "set", "--http", &http, "--links", "ab"]);
    assert!(!out.status.success());
    assert!(cluster
        .nodes
        .iter()
        .all(|n| n.status().control.links == chain));

    // Back to the mesh.
    let out = braid(&["topology", "set", "--http", &http, "--mesh"]);
    assert!(out.status.success(), "{out:?}");
    wait_for(&cluster, "every node on the mesh again", |s| {
        s.iter().all(|s| {
            s.control.full_mesh
                && s.peers.len() == 2
                && s.peers.iter().all(|p| p.state == "connected")
        })
    });
    let _: () = cluster.node("a").redis().set("direct", "yes").unwrap();
    cluster.wait_converged(SETTLE);
    let c = cluster.node("c").status();
    let from_a = c.peers.iter().find(|p| p.region == "a").unwrap();
    assert_eq!(from_a.pulling, ["a"], "c pulls a's events from a again");
    // Nobody restarted: each node started once.
    for node in &cluster.nodes {
        assert_eq!(
            node.log().matches("node listening").count(),
            1,
            "{} restarted",
            node.name
        );
    }
}

#[test]
fn t70_a_region_leaves_under_load_and_the_others_keep_converging() {
    let mut cluster = Cluster::start(Layout::mesh(3));
    wait_for(&cluster, "a leader", |s| {
        agreed_leader(s).is_some() && s.iter().all(|s| s.control.members.len() == 3)
    });
    // Writes in every region, c included, right up to its departure.
    for i in 0..50 {
        for region in ["a", "b", "c"] {
            let _: () = cluster
                .node(region)
                .redis()
                .set(format!("{region}{i}"), i)
                .unwrap();
        }
    }
    let http = cluster.node("c").http.to_string();
    let leaving = std::thread::spawn(move || braid(&["leave", "--http", &http]));
    // a and b keep taking writes while c leaves; c takes them until it drains, then refuses.
    let mut written = 0;
    let mut c = cluster.node("c").redis();
    let (mut c_acked, mut c_refused, mut c_gone) = (0u64, false, None);
    while !leaving.is_finished() {
        for region in ["a", "b"] {
            let _: () = cluster
                .node(region)
                .redis()
                .set(format!("during{written}"), region)
                .unwrap();
        }
        if !c_refused {
            let result: redis::RedisResult<()> = c.set(format!("c-during{written}"), "c");
            match result {
                Ok(()) => c_acked += 1,
                // Refused as it drains; or, once it stopped, no answer at all.
                Err(err) => {
                    c_refused = err.to_string().to_uppercase().contains("READONLY");
                    assert!(c_refused || err.is_io_error(), "{err}");
                    if !c_refused {
                        c_gone = Some(err.to_string());
                        break;
                    }
                }
            }
        }
        written += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = leaving.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !c_refused {
        let log = cluster.node("c").log();
        let tail: Vec<&str> = log.lines().rev().take(80).collect();
        panic!(
            "c took {c_acked} writes and refused none while draining (its last answer: \
             {c_gone:?}); braid leave: {stdout}\n{}\nc's log, last lines:\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Region c has left the mesh"), "{stdout}");
    assert!(written > 0);

    // c's process stopped by itself.
    let deadline = Instant::now() + SETTLE;
    while braid_tests::http_get(cluster.node("c").http, "/health").is_ok() {
        assert!(Instant::now() < deadline, "c is still running");
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.node("c").kill9();
    // a and b: c removed, no link to it, every one of c's writes held, and they converge.
    // The Raft group's voters follow: a and b only.
    wait_for(&cluster, "c removed everywhere", |s| {
        s.iter().all(|s| {
            s.control
                .members
                .iter()
                .any(|m| m.name == "c" && m.state == "removed")
                && neighbors(s).iter().all(|n| n != "c")
                && s.vector.get("c").copied() == Some(50 + c_acked)
                && s.control.members.iter().all(|m| m.voter == (m.name != "c"))
        })
    });
    let _: () = cluster.node("a").redis().set("after", "c").unwrap();
    cluster.wait_converged(SETTLE);
    for region in ["a", "b"] {
        let got: i64 = cluster.node(region).redis().get("c49").unwrap();
        assert_eq!(got, 49, "{region}");
    }
    // The two that are left still commit control changes.
    let http = cluster.node("a").http.to_string();
    let out = braid(&["topology", "set", "--http", &http, "--links", "a-b"]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn t70_tombstones_are_dropped_at_the_stable_hlc_and_a_down_region_holds_it_back() {
    let mut cluster = Cluster::start(Layout::mesh(3).with_change_log_gc());
    wait_for(&cluster, "the group bootstrapped", |s| {
        agreed_leader(s).is_some() && s.iter().all(|s| s.control.members.len() == 3)
    });
    let mut a = cluster.node("a").redis();
    let mut b = cluster.node("b").redis();
    for i in 0..50 {
        let _: () = a.set(format!("d{i}"), "v").unwrap();
    }
    let _: () = b.hset_multiple("h", &[("f1", "1"), ("f2", "2")]).unwrap();
    cluster.wait_converged(SETTLE);
    let mut c = cluster.node("c").redis();
    for i in 0..50 {
        let _: i64 = c.del(format!("d{i}")).unwrap();
    }
    let _: i64 = a.hdel("h", "f1").unwrap();
    cluster.wait_converged(SETTLE);
    // Every region drops the 51 tombstones, and forgets the 50 keys left with nothing.
    let settled = wait_for(&cluster, "tombstones collected everywhere", |s| {
        s.iter()
            .all(|s| s.tombstones_collected >= 51 && s.keys_forgotten >= 50)
    });
    for status in &settled {
        assert!(status.control.stable_hlc.is_some(), "{status:?}");
        assert!(status.gc_stable_hlc.is_some(), "{status:?}");
        assert_eq!(status.keys_forgotten, 50, "{}", status.region);
    }
    for region in ["a", "b", "c"] {
        let mut redis = cluster.node(region).redis();
        let gone: Option<String> = redis.get("d7").unwrap();
        assert_eq!(gone, None, "{region}");
        let hash: BTreeMap<String, String> = redis.hgetall("h").unwrap();
        assert_eq!(
            hash,
            [("f2".to_string(), "2".to_string())].into(),
            "{region}"
        );
    }

    // A region that is down holds the stable HLC back: a tombstone made meanwhile stays, so
    // that an older write c may still ship cannot come back to life.
    cluster.node("c").kill9();
    let _: () = a.set("late", "v").unwrap();
    let deleted: i64 = a.del("late").unwrap();
    assert_eq!(deleted, 1);
    // Several checkpoint intervals pass.
    std::thread::sleep(Duration::from_secs(8));
    for region in ["a", "b"] {
        let status = cluster.node(region).status();
        assert_eq!(
            status.keys_forgotten, 50,
            "{region} dropped a tombstone c may need"
        );
    }
    cluster.node("c").start();
    cluster.wait_connected(&[0, 1, 2]);
    cluster.wait_converged(SETTLE);
    wait_for(
        &cluster,
        "the late tombstone collected after c's return",
        |s| {
            // c's counters restarted with it: it forgets the one key it got back.
            let wanted = |s: &Status| if s.region == "c" { 1 } else { 51 };
            s.len() == 3 && s.iter().all(|s| s.keys_forgotten >= wanted(s))
        },
    );
}

/// Sets `key` in `region` until the write is refused (the rules reach each node's driver at
/// its next upkeep after they commit); returns the refusal's text.
fn refused_write(cluster: &mut Cluster, region: &str, key: &str) -> String {
    let deadline = Instant::now() + SETTLE;
    let mut redis = cluster.node(region).redis();
    for attempt in 0.. {
        let result: redis::RedisResult<()> = redis.set(format!("{key}{attempt}"), "v");
        if let Err(err) = result {
            return err.to_string();
        }
        assert!(Instant::now() < deadline, "{region} still takes {key}");
        std::thread::sleep(Duration::from_millis(100));
    }
    unreachable!()
}

#[test]
fn t70_a_keyspace_takes_writes_only_in_its_home_regions() {
    let mut cluster = Cluster::start(Layout::mesh(3));
    wait_for(&cluster, "a leader", |s| {
        agreed_leader(s).is_some() && s.iter().all(|s| s.control.members.len() == 3)
    });
    let http = cluster.node("c").http.to_string();
    let out = braid(&[
        "keyspace",
        "set",
        "orders:",
        "--writers",
        "a",
        "--http",
        &http,
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("are taken only in a."), "{stdout}");
    wait_for(&cluster, "every node has the keyspace", |s| {
        s.iter().all(|s| {
            s.control
                .keyspaces
                .get("orders:")
                .is_some_and(|k| k.writers == ["a"])
        })
    });
    let refusal = refused_write(&mut cluster, "b", "orders:b");
    // redis-rs names the READONLY error kind `ReadOnly`.
    assert!(
        refusal.contains("ReadOnly") && refusal.contains("keyspace 'orders:' takes no writes"),
        "{refusal}"
    );
    // A command over several keys is refused whole when one of them is refused, as Redis
    // applies it whole or not at all; the pipeline's later replies stay in step.
    let mut stream = std::net::TcpStream::connect(cluster.node("b").resp).unwrap();
    stream.write_all(
        b"MSET free1 x orders:m y\r\nDEL orders:1 free2\r\nSET free3 v\r\nGET free1\r\nQUIT\r\n",
    )
    .unwrap();
    let mut replies = String::new();
    stream.read_to_string(&mut replies).unwrap();
    let readonly = "-READONLY keyspace 'orders:' takes no writes in this region; write in one of \
                    its writer regions\r\n";
    assert_eq!(
        replies,
        format!("{readonly}{readonly}+OK\r\n$-1\r\n+OK\r\n"),
        "MSET and DEL refused whole, SET answered OK, free1 never written"
    );
    // Keys outside it are written anywhere; the home region writes it, and every region
    // replicates that.
    let _: () = cluster.node("b").redis().set("other", "b").unwrap();
    let _: () = cluster.node("a").redis().set("orders:1", "a").unwrap();
    cluster.wait_converged(SETTLE);
    let got: String = cluster.node("c").redis().get("orders:1").unwrap();
    assert_eq!(got, "a");

    // Unknown regions are refused and change nothing.
    let out = braid(&[
        "keyspace",
        "set",
        "orders:",
        "--writers",
        "zz",
        "--http",
        &http,
    ]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no member zz"),
        "{out:?}"
    );

    // Frozen: the home region refuses too. Cleared: everyone writes again.
    let out = braid(&["keyspace", "set", "orders:", "--frozen", "--http", &http]);
    assert!(out.status.success(), "{out:?}");
    let refusal = refused_write(&mut cluster, "a", "orders:a");
    assert!(refusal.contains("ReadOnly"), "{refusal}");
    let _ = refused_write(&mut cluster, "b", "orders:b");
    // The rules hold from a restarted node's first write on, not from when the control plane
    // next hands them over.
    cluster.node("b").stop();
    cluster.node("b").start();
    cluster.node("b").wait_healthy();
    let first: redis::RedisResult<()> = cluster.node("b").redis().set("orders:restarted", "v");
    let err = first.expect_err("a restarted node keeps the committed keyspace rules");
    assert!(err.to_string().contains("ReadOnly"), "{err}");
    let out = braid(&["keyspace", "clear", "orders:", "--http", &http]);
    assert!(out.status.success(), "{out:?}");
    wait_for(&cluster, "no keyspace left", |s| {
        s.iter().all(|s| s.control.keyspaces.is_empty())
    });
    let deadline = Instant::now() + SETTLE;
    let mut b = cluster.node("b").redis();
    while b.set::<_, _, ()>("orders:b", "again").is_err() {
        assert!(Instant::now() < deadline, "b still refuses orders:");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// openraft gives each append-entries call one heartbeat interval to be answered. With every
/// message between regions 150 ms late each way (a call's round trip past 300 ms, as between
/// regions far apart), the group must still commit: before, with 250 ms heartbeats, every call
/// to a follower ran out of time and no checkpoint after the delay began ever committed.
#[test]
fn t70_checkpoints_commit_with_round_trips_longer_than_a_quarter_second() {
    let mut cluster = Cluster::start(Layout::mesh(3).with_fault_injection());
    for (region, others) in [("a", ["b", "c"]), ("b", ["a", "c"]), ("c", ["a", "b"])] {
        let body = format!(
            r#"{{"delay-ms": {{"{}": 150, "{}": 150}}}}"#,
            others[0], others[1]
        );
        cluster.faults(region, &body);
    }
    for region in ["a", "b", "c"] {
        let _: () = cluster
            .node(region)
            .redis()
            .set(format!("slow-{region}"), "v")
            .unwrap();
    }
    cluster.wait_converged(SETTLE);
    let covers = |status: &Status, member: &str| {
        checkpoint_of(status, member).is_some_and(|vector| {
            ["a", "b", "c"]
                .iter()
                .all(|origin| vector.get(*origin).copied().unwrap_or(0) >= 1)
        })
    };
    wait_for(&cluster, "checkpoints through delayed calls", |statuses| {
        statuses.len() == 3
            && statuses
                .iter()
                .all(|s| ["a", "b", "c"].iter().all(|m| covers(s, m)))
    });
}
