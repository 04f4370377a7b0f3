//! Failures with real processes: `kill -9` under write load, and a dead region's writes
//! reaching a region that was down through a third one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use braid_tests::{Cluster, Layout};
use redis::Commands;

const CONVERGE: Duration = Duration::from_secs(30);

#[test]
fn t20_kill_9_under_load_loses_no_acknowledged_write_and_applies_none_twice() {
    let mut cluster = Cluster::start(Layout::mesh(3));
    let stop = Arc::new(AtomicBool::new(false));
    let addrs: Vec<(String, std::net::SocketAddr)> = cluster
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.resp))
        .collect();
    // One writer per region; each counts the increments its region acknowledged, and those whose
    // reply never came (the kill cut them off: applied or not, the client cannot know).
    let writers: Vec<_> = addrs
        .into_iter()
        .map(|(name, addr)| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut acked = 0i64;
                let mut unknown = 0i64;
                let mut conn: Option<redis::Connection> = None;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if conn.is_none() {
                        conn = redis::Client::open(format!("redis://{addr}/"))
                            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                            .ok();
                        if conn.is_none() {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    }
                    let c = conn.as_mut().expect("connected above");
                    let result: redis::RedisResult<i64> = c.incr("total", 1);
                    match result {
                        Ok(_) => acked += 1,
                        Err(_) => {
                            unknown += 1;
                            conn = None;
                        }
                    }
                    let _: redis::RedisResult<()> = c_set(&mut conn, &format!("{name}-{i}"));
                    i += 1;
                }
                (acked, unknown)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    cluster.node("b").kill9();
    std::thread::sleep(Duration::from_millis(500));
    cluster.node("b").start();
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let (acked, unknown) = writers
        .into_iter()
        .map(|w| w.join().unwrap())
        .fold((0, 0), |(a, u), (x, y)| (a + x, u + y));
    assert!(acked > 100, "the load made progress ({acked} increments)");
    cluster.wait_connected(&[0, 1, 2]);
    cluster.wait_converged(CONVERGE);
    for name in ["a", "b", "c"] {
        let total: i64 = cluster.node(name).redis().get("total").unwrap();
        assert!(
            (acked..=acked + unknown).contains(&total),
            "{name}: every acknowledged increment exactly once ({total} applied, {acked} \
             acknowledged, {unknown} unanswered)"
        );
    }
    // b resumed from its vectors: since its restart it received what it missed, not the
    // other regions' whole logs again.
    let others: u64 = ["a", "c"]
        .iter()
        .map(|n| cluster.node(n).status().writes)
        .sum();
    let received: u64 = cluster
        .node("b")
        .status()
        .peers
        .iter()
        .map(|p| p.events_received)
        .sum();
    assert!(
        received < others,
        "b received {received} events after restart; a full resync is {others}"
    );
    cluster.stop_all();
    let (_, oracle) = cluster.oracle_from_logs();
    for (name, stored) in cluster.stored_values() {
        assert_eq!(stored, oracle, "{name} differs from the oracle");
    }
}

fn c_set(conn: &mut Option<redis::Connection>, key: &str) -> redis::RedisResult<()> {
    match conn {
        Some(c) => {
            let result = c.set(key, "v");
            if result.is_err() {
                *conn = None;
            }
            result
        }
        None => Ok(()),
    }
}

#[test]
fn t21_a_dead_regions_writes_reach_a_returning_region_through_a_third() {
    let mut cluster = Cluster::start(Layout::mesh(3));
    cluster.node("c").stop();
    let mut a = cluster.node("a").redis();
    for i in 0..100 {
        let _: () = a.set(format!("from-a-{i}"), i).unwrap();
    }
    drop(a);
    cluster.wait_converged(CONVERGE);
    let b_vector = cluster.node("b").status().vector;
    assert_eq!(b_vector.get("a"), Some(&100));
    // a is lost for good.
    cluster.node("a").kill9();
    cluster.node("c").start();
    cluster.wait_connected(&[1, 2]);
    cluster.wait_converged(CONVERGE);
    let mut c = cluster.node("c").redis();
    for i in [0, 57, 99] {
        let value: i64 = c.get(format!("from-a-{i}")).unwrap();
        assert_eq!(value, i);
    }
    let status = cluster.node("c").status();
    let b = status.peers.iter().find(|p| p.region == "b").unwrap();
    assert!(
        b.pulling.contains(&"a".to_string()),
        "c pulls a's events from b: {b:?}"
    );
}

/// Copies every entry of `from` into `to` but the control plane's directory (its Raft log and
/// vote are synced at every write: a power loss never takes them).
fn copy_data(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() == "control" || entry.file_type().unwrap().is_dir() {
            continue;
        }
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// `region` writes 5 keys, stops cleanly (its disk holds them: the copy taken then is what a
/// power loss leaves), runs again and writes 20 more events (10 increments of `n`, 10 keys)
/// that every region receives, and is killed; its data files are then put back as the copy.
fn lose_last_writes_in_a_power_loss(cluster: &mut Cluster, region: &str) {
    for i in 0..5 {
        let _: () = cluster
            .node(region)
            .redis()
            .set(format!("early{i}"), "v")
            .unwrap();
    }
    cluster.wait_converged(CONVERGE);
    cluster.node(region).stop();
    let data = cluster.node(region).data_dir();
    let synced = tempfile::tempdir().unwrap();
    copy_data(&data, synced.path());
    cluster.node(region).start();
    cluster.node(region).wait_healthy();
    // The region's last writes: acknowledged, shipped to the others, then lost with its page
    // cache.
    for i in 0..10 {
        let _: () = cluster
            .node(region)
            .redis()
            .set(format!("late{i}"), "v")
            .unwrap();
        let _: i64 = cluster.node(region).redis().incr("n", 1).unwrap();
    }
    cluster.wait_converged(CONVERGE);
    let other = if region == "a" { "b" } else { "a" };
    assert_eq!(cluster.node(other).status().vector[region], 25);
    cluster.node(region).kill9();
    for entry in std::fs::read_dir(&data).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    copy_data(synced.path(), &data);
}

/// Writes `INCR n 100` into `region` until it is taken, every refusal a "recovering" one.
fn incr_when_recovered(cluster: &mut Cluster, region: &str) -> usize {
    let deadline = std::time::Instant::now() + CONVERGE;
    let mut refused = 0;
    loop {
        let result: redis::RedisResult<i64> = cluster.node(region).redis().incr("n", 100);
        match result {
            Ok(_) => return refused,
            Err(err) => {
                assert!(err.to_string().contains("recovering"), "{err}");
                refused += 1;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{region} never took writes again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn t20_a_region_that_lost_its_last_writes_in_a_power_loss_takes_them_back_before_writing() {
    let mut cluster = Cluster::start(Layout::mesh(3));
    lose_last_writes_in_a_power_loss(&mut cluster, "a");

    // The machine came back: a knows its last writes may be gone, and takes writes only once
    // its peers gave them back (numbered after them, so that none is dropped as a duplicate).
    cluster.node("a").start_after_reboot();
    cluster.node("a").wait_healthy();
    let refused = incr_when_recovered(&mut cluster, "a");
    let a = cluster.node("a").status();
    assert!(!a.recovering);
    assert_eq!(
        a.vector["a"], 26,
        "the new write follows the 25 a lost and took back"
    );
    assert!(
        cluster
            .node("a")
            .log()
            .contains("resynchronising from a data snapshot"),
        "refused {refused} writes"
    );
    cluster.wait_converged(CONVERGE);
    for region in ["a", "b", "c"] {
        let n: i64 = cluster.node(region).redis().get("n").unwrap();
        assert_eq!(n, 110, "{region}: every increment once, the new one too");
        let late: Option<String> = cluster.node(region).redis().get("late9").unwrap();
        assert_eq!(late.as_deref(), Some("v"), "{region}");
    }
}

#[test]
fn t20_a_joined_region_that_lost_its_last_writes_waits_for_the_members_it_joined() {
    // A region that joined lists no peers in its configuration: after a power loss it must
    // still wait for the members the control plane committed, not start writing at once.
    let mut cluster = Cluster::start(Layout::mesh(3));
    let via = cluster.node("a").http;
    cluster.add_region("d");
    cluster.node("d").start_join(via);
    cluster.node("d").wait_healthy();
    cluster.wait_converged(CONVERGE);
    lose_last_writes_in_a_power_loss(&mut cluster, "d");

    cluster.node("d").start_after_reboot();
    cluster.node("d").wait_healthy();
    incr_when_recovered(&mut cluster, "d");
    assert_eq!(
        cluster.node("d").status().vector["d"],
        26,
        "the new write follows the 25 d lost and took back"
    );
    assert!(
        cluster
            .node("d")
            .log()
            .contains("resynchronising from a data snapshot"),
        "d took its own events back from a member"
    );
    cluster.wait_converged(CONVERGE);
    for region in ["a", "b", "c", "d"] {
        let n: i64 = cluster.node(region).redis().get("n").unwrap();
        assert_eq!(n, 110, "{region}: every increment once, the new one too");
    }
}

#[test]
fn t20_a_restart_before_recovery_ended_recovers_again() {
    // The reboot is seen once, at the first start after it; a second start in the same boot
    // must still know that the region has not taken its last writes back.
    let mut cluster = Cluster::start(Layout::mesh(3));
    lose_last_writes_in_a_power_loss(&mut cluster, "a");
    cluster.node("b").stop();
    cluster.node("c").stop();
    for start in ["after the reboot", "again in the same boot"] {
        cluster.node("a").start_after_reboot();
        cluster.node("a").wait_healthy();
        assert!(cluster.node("a").status().recovering, "{start}");
        let refused: redis::RedisResult<i64> = cluster.node("a").redis().incr("n", 100);
        let err = refused.expect_err("no write before the peers gave a's events back");
        assert!(err.to_string().contains("recovering"), "{start}: {err}");
        cluster.node("a").stop();
    }
    cluster.node("a").start_after_reboot();
    cluster.node("b").start();
    cluster.node("c").start();
    cluster.node("a").wait_healthy();
    incr_when_recovered(&mut cluster, "a");
    assert_eq!(
        cluster.node("a").status().vector["a"],
        26,
        "the new write follows the 25 a lost and took back"
    );
    // Recovered: a later start in the same boot takes writes at once.
    cluster.node("a").stop();
    cluster.node("a").start_after_reboot();
    cluster.node("a").wait_healthy();
    assert!(!cluster.node("a").status().recovering);
    cluster.wait_converged(CONVERGE);
    for region in ["a", "b", "c"] {
        let n: i64 = cluster.node(region).redis().get("n").unwrap();
        assert_eq!(n, 110, "{region}: every increment once, the new one too");
    }
}
