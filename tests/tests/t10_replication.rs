//! Replication between real `braid` processes on loopback: reads everywhere, conflicts that
//! converge to what the oracle computes from every node's change log, exact counters, add-wins
//! sets, per-field hashes, relay along a chain, and no echo.

use std::collections::BTreeMap;
use std::time::Duration;

use braid_conflict::Value;
use braid_tests::{Cluster, Layout};
use bytes::Bytes;
use redis::Commands;

const CONVERGE: Duration = Duration::from_secs(20);

#[test]
fn t10_a_write_in_any_region_is_readable_in_every_other() {
    let mut cluster = Cluster::start(Layout::mesh(3));
    for (i, writer) in ["a", "b", "c"].iter().enumerate() {
        let mut conn = cluster.node(writer).redis();
        let _: () = conn
            .set(format!("key-{writer}"), format!("value-{i}"))
            .unwrap();
    }
    cluster.wait_converged(CONVERGE);
    for reader in ["a", "b", "c"] {
        let mut conn = cluster.node(reader).redis();
        for (i, writer) in ["a", "b", "c"].iter().enumerate() {
            let value: Option<String> = conn.get(format!("key-{writer}")).unwrap();
            assert_eq!(
                value.as_deref(),
                Some(format!("value-{i}").as_str()),
                "{reader} reading {writer}'s key"
            );
        }
    }
    // Lag is reported per peer.
    let status = cluster.node("b").status();
    let a = status.peers.iter().find(|p| p.region == "a").unwrap();
    assert_eq!(a.state, "connected");
    assert_eq!(a.lag_events, 0);
    assert!(a.lag_ms.is_some(), "{a:?}");
}

#[test]
fn t11_concurrent_sets_converge_to_the_oracles_value() {
    let mut cluster = Cluster::start(Layout::mesh(3));
    let writers: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            let mut conn = cluster.node(name).redis();
            let name = name.to_string();
            std::thread::spawn(move || {
                for round in 0..200 {
                    let key = format!("k{}", round % 10);
                    let _: () = conn.set(&key, format!("{name}-{round}")).unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    cluster.wait_converged(CONVERGE);
    let mut seen: Vec<BTreeMap<String, String>> = Vec::new();
    for name in ["a", "b", "c"] {
        let mut conn = cluster.node(name).redis();
        let values = (0..10)
            .map(|i| {
                let key = format!("k{i}");
                let value: String = conn.get(&key).unwrap();
                (key, value)
            })
            .collect();
        seen.push(values);
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0], seen[2]);
    cluster.stop_all();
    let (events, oracle) = cluster.oracle_from_logs();
    assert_eq!(events.len(), 600);
    for (key, value) in &seen[0] {
        assert_eq!(
            oracle.get(key.as_bytes()),
            Some(&Value::String(Bytes::from(value.clone()))),
            "{key}"
        );
    }
    for (name, stored) in cluster.stored_values() {
        assert_eq!(
            stored, oracle,
            "{name}'s stored state differs from the oracle"
        );
    }
}

#[test]
fn t12_increments_from_every_region_sum_exactly() {
    let mut cluster = Cluster::start(Layout::mesh(3));
    let writers: Vec<_> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut conn = cluster.node(name).redis();
            std::thread::spawn(move || {
                let mut sum = 0i64;
                for round in 0..300i64 {
                    let delta = (round % 7) - 2 + i as i64;
                    let _: i64 = conn.incr("counter", delta).unwrap();
                    sum += delta;
                }
                sum
            })
        })
        .collect();
    let expected: i64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    cluster.wait_converged(CONVERGE);
    for name in ["a", "b", "c"] {
        let value: i64 = cluster.node(name).redis().get("counter").unwrap();
        assert_eq!(value, expected, "{name}");
    }
}

#[test]
fn t13_set_races_are_add_wins_and_hash_races_converge_per_field() {
    let mut cluster = Cluster::start(Layout::mesh(2));
    let mut a = cluster.node("a").redis();
    let _: i64 = a.sadd("s", &["x", "y"]).unwrap();
    let _: i64 = a
        .hset_multiple::<_, _, _, ()>("h", &[("f1", "a1"), ("f2", "a2")])
        .map(|_| 0)
        .unwrap();
    drop(a);
    cluster.wait_converged(CONVERGE);
    // Make the next writes concurrent for sure: each region writes while the other is down.
    cluster.node("b").stop();
    let mut a = cluster.node("a").redis();
    let _: i64 = a.srem("s", "x").unwrap();
    let _: () = a.hset("h", "f1", "from-a").unwrap();
    drop(a);
    cluster.node("a").stop();
    cluster.node("b").start();
    let mut b = cluster.node("b").redis();
    let _: i64 = b.sadd("s", "x").unwrap();
    let _: i64 = b.srem("s", "y").unwrap();
    let _: () = b.hset("h", "f2", "from-b").unwrap();
    drop(b);
    cluster.node("a").start();
    cluster.wait_connected(&[0, 1]);
    cluster.wait_converged(CONVERGE);
    for name in ["a", "b"] {
        let mut conn = cluster.node(name).redis();
        let members: Vec<String> = conn.smembers("s").unwrap();
        assert_eq!(
            members,
            vec!["x".to_string()],
            "{name}: add wins over the concurrent remove"
        );
        let fields: BTreeMap<String, String> = conn.hgetall("h").unwrap();
        let expected: BTreeMap<String, String> = [
            ("f1".into(), "from-a".into()),
            ("f2".into(), "from-b".into()),
        ]
        .into_iter()
        .collect();
        assert_eq!(fields, expected, "{name}");
    }
}

/// Sums a counter over every node's `/status` peers.
fn totals(cluster: &Cluster) -> (u64, u64, u64) {
    let mut sent = 0;
    let mut applied = 0;
    let mut duplicate = 0;
    for node in &cluster.nodes {
        for peer in node.status().peers {
            sent += peer.events_sent;
            applied += peer.events_applied;
            duplicate += peer.events_duplicate;
        }
    }
    (sent, applied, duplicate)
}

fn write_everywhere(cluster: &mut Cluster, per_region: usize) -> u64 {
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    for name in &names {
        let mut conn = cluster.node(name).redis();
        for i in 0..per_region {
            let _: () = conn.set(format!("{name}-{i}"), i).unwrap();
        }
    }
    (names.len() * per_region) as u64
}

#[test]
fn t14_full_mesh_each_event_crosses_each_link_once_and_never_echoes() {
    let mut cluster = Cluster::start(Layout::mesh(3));
    let writes = write_everywhere(&mut cluster, 50);
    cluster.wait_converged(CONVERGE);
    let (sent, applied, duplicate) = totals(&cluster);
    assert_eq!(sent, writes * 2, "each event crosses N-1 = 2 links");
    assert_eq!(
        applied,
        writes * 2,
        "each event is applied once in each other region"
    );
    assert_eq!(duplicate, 0, "no echo, no duplicate");
    let metrics = braid_tests::http_get(cluster.nodes[0].http, "/metrics").unwrap();
    assert!(
        metrics.contains("braid_events_applied_total{region=\"a\",peer=\"b\"} 50"),
        "{metrics}"
    );
    assert!(
        metrics.contains("braid_replication_lag_ms{region=\"a\",origin=\"b\",quantile=\"0.99\"}")
    );
    // The node's clock to the millisecond, for comparing regions' clocks.
    let scraped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("braid_scrape_time_seconds{region=\"a\"} "))
        .unwrap_or_else(|| panic!("no scrape time: {metrics}"));
    assert!(
        scraped.split_once('.').is_some_and(|(_, ms)| ms.len() == 3),
        "{scraped}"
    );
}

#[test]
fn t15_chain_relays_through_the_middle_once_per_link() {
    let mut cluster = Cluster::start(Layout::chain(3));
    let writes = write_everywhere(&mut cluster, 40);
    cluster.wait_converged(CONVERGE);
    let mut conn = cluster.node("c").redis();
    let value: String = conn.get("a-7").unwrap();
    assert_eq!(value, "7", "a's write reached c through b");
    let (sent, applied, duplicate) = totals(&cluster);
    // A chain of 3 has 2 links; every event crosses each once.
    assert_eq!(sent, writes * 2);
    assert_eq!(applied, writes * 2);
    assert_eq!(duplicate, 0);
    let status = cluster.node("a").status();
    assert_eq!(status.peers.len(), 1, "a is linked to b only");
    assert_eq!(
        status.peers[0].pulling,
        vec!["b".to_string(), "c".to_string()]
    );
}
