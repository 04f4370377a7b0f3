//! Fault injection for drills, with real processes: refused unless configured; a cut link stops
//! replication both ways and heals; a one-way drop lets the other direction through; a delay
//! holds frames back; a skewed clock decides last-writer-wins.

use std::time::{Duration, Instant};

use braid_tests::{http_get, http_post, Cluster, Layout};
use redis::Commands;

const CONVERGE: Duration = Duration::from_secs(30);

fn value(cluster: &mut Cluster, region: &str, key: &str) -> Option<String> {
    cluster.node(region).redis().get(key).unwrap()
}

/// Waits until `region` holds `want` for `key`.
fn wait_value(cluster: &mut Cluster, region: &str, key: &str, want: &str) {
    let deadline = Instant::now() + CONVERGE;
    while value(cluster, region, key).as_deref() != Some(want) {
        assert!(Instant::now() < deadline, "{region} never got {key}={want}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn t25_fault_injection_is_refused_unless_the_configuration_enables_it() {
    let mut cluster = Cluster::start(Layout::mesh(2));
    let http = cluster.node("a").http;
    let err = http_post(http, "/faults", r#"{"cut": ["b"]}"#).unwrap_err();
    assert!(
        err.contains("403") && err.contains("fault-injection = true"),
        "{err}"
    );
    let err = http_get(http, "/faults").unwrap_err();
    assert!(err.contains("403"), "{err}");
    // And the node carried on replicating.
    let _: () = cluster.node("a").redis().set("k", "1").unwrap();
    wait_value(&mut cluster, "b", "k", "1");
    // Faults given at start are refused by such a node too: it does not start.
    let config = cluster.node("b").config.clone();
    cluster.node("b").stop();
    let out = std::process::Command::new(braid_tests::braid_bin())
        .args(["start", "--config", config.to_str().unwrap()])
        .env("BRAID_FAULTS", r#"{"cut": ["a"]}"#)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("BRAID_FAULTS") && stderr.contains("fault injection is off"),
        "{stderr}"
    );
}

#[test]
fn t25_a_cut_link_stops_replication_both_ways_until_healed() {
    let mut cluster = Cluster::start(Layout::mesh(2).with_fault_injection());
    let http = cluster.node("a").http;
    for bad in [r#"{"cut": ["z"]}"#, r#"{"bogus": 1}"#, "not json"] {
        let err = http_post(http, "/faults", bad).unwrap_err();
        assert!(err.contains("400"), "{bad}: {err}");
    }
    cluster.faults("a", r#"{"cut": ["b"]}"#);
    cluster.faults("b", r#"{"cut": ["a"]}"#);
    let answer = http_get(http, "/faults").unwrap();
    assert!(answer.contains(r#""cut":["b"]"#), "{answer}");
    // Both sides see the peer go away.
    let deadline = Instant::now() + CONVERGE;
    while cluster.node("a").status().peers[0].state == "connected"
        || cluster.node("b").status().peers[0].state == "connected"
    {
        assert!(
            Instant::now() < deadline,
            "the cut never closed the streams"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _: () = cluster.node("a").redis().set("from-a", "1").unwrap();
    let _: () = cluster.node("b").redis().set("from-b", "1").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        value(&mut cluster, "b", "from-a"),
        None,
        "crossed a cut link"
    );
    assert_eq!(
        value(&mut cluster, "a", "from-b"),
        None,
        "crossed a cut link"
    );
    cluster.faults("a", "{}");
    cluster.faults("b", "{}");
    wait_value(&mut cluster, "b", "from-a", "1");
    wait_value(&mut cluster, "a", "from-b", "1");
}

#[test]
fn t25_one_way_drops_delays_and_clock_skew_act_as_documented() {
    let mut cluster = Cluster::start(Layout::mesh(2).with_fault_injection());
    // Faults given at start hold from the first frame: b restarted with its link to a cut.
    let config = cluster.node("b").config.clone();
    cluster.node("b").stop();
    let mut b = std::process::Command::new(braid_tests::braid_bin())
        .args(["start", "--config", config.to_str().unwrap()])
        .env("BRAID_FAULTS", r#"{"cut": ["a"]}"#)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let b_http = cluster.node("b").http;
    let deadline = Instant::now() + CONVERGE;
    let answer = loop {
        if let Ok(answer) = http_get(b_http, "/faults") {
            break answer;
        }
        assert!(Instant::now() < deadline, "b did not come back");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(answer.contains(r#""cut":["a"]"#), "{answer}");
    let _: () = cluster.node("a").redis().set("before-b", "1").unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let seen: Option<String> = redis::Client::open(format!("redis://{}/", cluster.node("b").resp))
        .unwrap()
        .get_connection()
        .unwrap()
        .get("before-b")
        .unwrap();
    assert_eq!(seen, None, "b was cut from its start");
    http_post(b_http, "/faults", "{}").unwrap();
    let _ = b.kill();
    let _ = b.wait();
    cluster.node("b").start();
    cluster.node("b").wait_healthy();
    wait_value(&mut cluster, "b", "before-b", "1");
    // Both subscriptions up again before the next fault (a one-way drop would also drop a's
    // subscription request to b).
    cluster.wait_connected(&[0, 1]);

    // One way: a's frames to b are dropped; b's still reach a.
    cluster.faults("a", r#"{"drop-to": ["b"]}"#);
    let _: () = cluster.node("b").redis().set("from-b", "1").unwrap();
    wait_value(&mut cluster, "a", "from-b", "1");
    let _: () = cluster.node("a").redis().set("from-a", "1").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        value(&mut cluster, "b", "from-a"),
        None,
        "a dropped frame arrived"
    );
    let dropped = cluster.node("a").status().peers[0].frames_dropped;
    assert!(dropped > 0, "dropped frames are counted");
    cluster.faults("a", "{}");
    wait_value(&mut cluster, "b", "from-a", "1");

    // Delay: frames to b are held for 2 s.
    cluster.faults("a", r#"{"delay-ms": {"b": 2000}}"#);
    let sent = Instant::now();
    let _: () = cluster.node("a").redis().set("slow", "1").unwrap();
    wait_value(&mut cluster, "b", "slow", "1");
    assert!(
        sent.elapsed() >= Duration::from_millis(2000),
        "arrived before the delay was over"
    );
    cluster.faults("a", "{}");

    // A clock 30 s ahead decides between concurrent writes: with the link cut, a writes first
    // and b later, yet a's write wins (its HLC is ahead). Causally later writes still win: the
    // HLC absorbs the skew once b has seen a's events.
    cluster.faults("a", r#"{"clock-offset-ms": 30000, "cut": ["b"]}"#);
    cluster.faults("b", r#"{"cut": ["a"]}"#);
    let _: () = cluster.node("a").redis().set("race", "from-a").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let _: () = cluster.node("b").redis().set("race", "from-b").unwrap();
    cluster.faults("a", r#"{"clock-offset-ms": 30000}"#);
    cluster.faults("b", "{}");
    wait_value(&mut cluster, "b", "race", "from-a");
    cluster.wait_converged(CONVERGE);
    assert_eq!(value(&mut cluster, "a", "race").as_deref(), Some("from-a"));
    let _: () = cluster.node("b").redis().set("race", "after").unwrap();
    wait_value(&mut cluster, "a", "race", "after");

    // A clock further ahead than b's bound (60 s): b refuses a's events, counts them per peer
    // in /status and /metrics, and `braid status` warns.
    cluster.faults("a", r#"{"clock-offset-ms": 120000}"#);
    let _: () = cluster.node("a").redis().set("far-ahead", "1").unwrap();
    let deadline = Instant::now() + CONVERGE;
    while cluster.node("b").status().peers[0].events_clock_refused == 0 {
        assert!(Instant::now() < deadline, "b never counted a refused event");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(value(&mut cluster, "b", "far-ahead"), None);
    let metrics = http_get(cluster.node("b").http, "/metrics").unwrap();
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("braid_events_clock_refused_total{region=\"b\",peer=\"a\"} "))
        .unwrap_or_else(|| panic!("no clock-refused counter for a: {metrics}"));
    assert!(refused.parse::<u64>().unwrap() > 0, "{metrics}");
    let out = std::process::Command::new(braid_tests::braid_bin())
        .args(["status", "--http", &cluster.node("b").http.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("refusals of events from a for an HLC too far ahead"),
        "{stdout}"
    );
}
