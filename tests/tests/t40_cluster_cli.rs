//! The README's quickstart as a user runs it: `braid cluster up` starts a local mesh, prints its
//! regions and writes cluster.json; writes replicate; `cluster down` (or Ctrl-C without
//! `--detach`) stops every region.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use braid_node::cluster::ClusterFile;
use braid_node::launch;
use braid_tests::{braid_bin, free_base_port};
use redis::Commands;

use braid_tests::running as alive;

fn wait_gone(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "processes still running: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn replicates(file: &ClusterFile) {
    let url = |i: usize| format!("redis://{}/", file.regions[i].resp);
    let mut first = redis::Client::open(url(0))
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = first.set("greeting", "hello").unwrap();
    let mut last = redis::Client::open(url(file.regions.len() - 1))
        .unwrap()
        .get_connection()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value: Option<String> = last.get("greeting").unwrap();
        if value.as_deref() == Some("hello") {
            return;
        }
        assert!(Instant::now() < deadline, "the write did not replicate");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn t40_cluster_up_detached_then_down() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(3).to_string();
    let out = Command::new(braid_bin())
        .args([
            "cluster",
            "up",
            "--regions",
            "3",
            "--detach",
            "--base-port",
            &base,
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for region in ["a", "b", "c"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(region)),
            "table lacks {region}:\n{stdout}"
        );
    }
    let file = ClusterFile::load(dir.path()).unwrap();
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("cluster.json")).unwrap())
            .unwrap();
    for key in ["name", "id", "resp", "http", "peer", "pid"] {
        assert!(
            raw["regions"][0].get(key).is_some(),
            "cluster.json lacks {key}: {raw}"
        );
    }
    let pids: Vec<u32> = file.regions.iter().map(|r| r.pid.unwrap()).collect();
    // A second cluster on the same ports: its regions cannot bind, and it says so instead of
    // taking the running cluster's answers for its own.
    let other = tempfile::tempdir().unwrap();
    let clash = Command::new(braid_bin())
        .args([
            "cluster",
            "up",
            "--regions",
            "3",
            "--detach",
            "--base-port",
            &base,
            "--dir",
        ])
        .arg(other.path())
        .output()
        .unwrap();
    let clash_err = String::from_utf8_lossy(&clash.stderr);
    let result = std::panic::catch_unwind(|| {
        assert!(
            !clash.status.success() && clash_err.contains("exited during start-up"),
            "a cluster on taken ports: {clash:?}"
        );
        // The error quotes the region's log: why it exited, even once its directory is gone.
        assert!(clash_err.contains("in use"), "{clash_err}");
        replicates(&file)
    });
    let down = Command::new(braid_bin())
        .args(["cluster", "down", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    wait_gone(&pids);
    result.unwrap();
}

/// A two-region `braid cluster up` in the foreground, once every region answers: its
/// directory, base port, process (stderr to `stderr`) and cluster.json.
fn foreground_cluster(stderr: Stdio) -> (tempfile::TempDir, String, Child, ClusterFile) {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(2).to_string();
    let child = Command::new(braid_bin())
        .args([
            "cluster",
            "up",
            "--regions",
            "2",
            "--base-port",
            &base,
            "--dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let file = loop {
        if let Ok(file) = ClusterFile::load(dir.path()) {
            let healthy = file.regions.iter().all(|r| {
                r.pid.is_some() && braid_tests::http_get(r.http.parse().unwrap(), "/health").is_ok()
            });
            if healthy {
                break file;
            }
        }
        assert!(Instant::now() < deadline, "cluster up did not come up");
        std::thread::sleep(Duration::from_millis(100));
    };
    (dir, base, child, file)
}

#[test]
fn t41_cluster_up_in_the_foreground_stops_every_region_on_interrupt() {
    let (dir, base, mut child, file) = foreground_cluster(Stdio::null());
    replicates(&file);
    let pids: Vec<u32> = file.regions.iter().map(|r| r.pid.unwrap()).collect();
    // A region laid out while the cluster runs stays in cluster.json after it stops.
    let added = Command::new(braid_bin())
        .args(["add-region", "--region", "c", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    launch::signal(child.id(), libc::SIGINT);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "cluster up exits cleanly on Ctrl-C: {status}"
    );
    wait_gone(&pids);
    let after = ClusterFile::load(dir.path()).unwrap();
    let names: Vec<&str> = after.regions.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"], "the added region is kept");
    assert!(after.regions.iter().all(|r| r.pid.is_none()));
    // Layout options do not apply to an existing cluster: refused, not ignored.
    let relaid = Command::new(braid_bin())
        .args(["cluster", "up", "--detach", "--fault-injection", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!relaid.status.success());
    assert!(
        String::from_utf8_lossy(&relaid.stderr).contains("--fault-injection would be ignored"),
        "{relaid:?}"
    );
    // Started again (the same command again is a restart: an option with the value the
    // cluster was laid out with is no conflict), the regions that joined run; c, which has
    // not, is left to `braid join`.
    let again = Command::new(braid_bin())
        .args(["cluster", "up", "--detach", "--base-port", &base, "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let restarted = ClusterFile::load(dir.path()).unwrap();
    let pids: Vec<Option<u32>> = restarted.regions.iter().map(|r| r.pid).collect();
    let down = Command::new(braid_bin())
        .args(["cluster", "down", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{again:?}");
    assert!(
        stderr.contains("region c has not joined yet") && stderr.contains("braid join"),
        "{stderr}"
    );
    assert!(
        pids[0].is_some() && pids[1].is_some() && pids[2].is_none(),
        "{pids:?}"
    );
    assert!(down.status.success(), "{down:?}");
    wait_gone(&pids.into_iter().flatten().collect::<Vec<_>>());
}

/// A directory with two regions, a and b, laid out by `braid init` (not started).
fn init_two_regions() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(2).to_string();
    let init = Command::new(braid_bin())
        .args(["init", "--regions", "a,b", "--base-port", &base, "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    dir
}

#[test]
fn t42_cluster_down_never_signals_a_process_that_is_not_the_region() {
    let dir = init_two_regions();
    // A pid left in cluster.json, since taken by another program.
    let mut stranger = Command::new("sleep").arg("60").spawn().unwrap();
    let mut file = ClusterFile::load(dir.path()).unwrap();
    file.regions[0].pid = Some(stranger.id());
    file.save(dir.path()).unwrap();
    let down = Command::new(braid_bin())
        .args(["cluster", "down", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&down.stdout);
    std::thread::sleep(Duration::from_millis(200));
    let spared = stranger.try_wait().unwrap().is_none();
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert!(down.status.success(), "{down:?}");
    assert!(stdout.contains("is running"), "{stdout}");
    assert!(
        spared,
        "cluster down signalled a process that is not a region"
    );
    assert_eq!(ClusterFile::load(dir.path()).unwrap().regions[0].pid, None);
}

#[test]
fn t43_cluster_up_in_the_foreground_fails_when_a_region_dies() {
    let (_dir, _, child, file) = foreground_cluster(Stdio::piped());
    let pids: Vec<u32> = file.regions.iter().map(|r| r.pid.unwrap()).collect();
    launch::signal(pids[1], libc::SIGKILL);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a dead region is a failure: {stderr}"
    );
    assert!(
        stderr.contains("region b exited") && stderr.contains("braid.log"),
        "{stderr}"
    );
    wait_gone(&pids);
}

#[test]
fn t44_join_stops_on_interrupt_while_it_waits_to_be_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(3).to_string();
    let run = |args: &[&str]| {
        let out = Command::new(braid_bin())
            .args(args)
            .arg("--dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    run(&["init", "--regions", "a,b", "--base-port", &base]);
    run(&["add-region", "--region", "c"]);
    // A member that takes the request and never answers (its backlog holds the connection).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let via = silent.local_addr().unwrap().to_string();
    let config = dir.path().join("c").join("braid.toml");
    let child = Command::new(braid_bin())
        .args(["join", "--via", &via, "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupted once it asks (its signal handlers are set before it does).
    silent.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let _asking = loop {
        match silent.accept() {
            Ok((connection, _)) => break connection,
            Err(_) => {
                assert!(Instant::now() < deadline, "braid join never asked");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let asked = Instant::now();
    launch::signal(child.id(), libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("interrupted while waiting"), "{stderr}");
    // Not after the request's own 30 s timeout.
    assert!(asked.elapsed() < Duration::from_secs(10), "{stderr}");
}

#[test]
fn t45_a_region_that_leaves_is_not_started_again_and_the_cluster_is_found_from_anywhere() {
    // Laid out through a relative --dir: cluster.json must still serve from elsewhere.
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("cluster");
    let base = free_base_port(3).to_string();
    let mut child = Command::new(braid_bin())
        .args(["cluster", "up", "--regions", "3", "--base-port", &base])
        .args(["--dir", "cluster"])
        .current_dir(work.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let file = loop {
        if let Ok(file) = ClusterFile::load(&dir) {
            let healthy = file.regions.iter().all(|r| {
                r.pid.is_some() && braid_tests::http_get(r.http.parse().unwrap(), "/health").is_ok()
            });
            if healthy {
                break file;
            }
        }
        assert!(Instant::now() < deadline, "cluster up did not come up");
        std::thread::sleep(Duration::from_millis(100));
    };
    let pids: Vec<u32> = file.regions.iter().map(|r| r.pid.unwrap()).collect();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(
            file.regions.iter().all(|r| r.config.is_absolute()),
            "{:?}",
            file.regions
        );
        // Once the control plane has formed (a leave is refused before).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let leave = Command::new(braid_bin())
                .args(["leave", "--http", &file.regions[2].http])
                .output()
                .unwrap();
            if leave.status.success() {
                break;
            }
            let stderr = String::from_utf8_lossy(&leave.stderr);
            // Before the group formed, or while it elects its first leader.
            let forming = stderr.contains("not bootstrapped") || stderr.contains("leader");
            assert!(forming && Instant::now() < deadline, "{stderr}");
            std::thread::sleep(Duration::from_millis(200));
        }
        wait_gone(&pids[2..]);
        // The others keep running, and so does the command.
        std::thread::sleep(Duration::from_millis(500));
        assert!(child.try_wait().unwrap().is_none(), "cluster up ended");
        replicates(&ClusterFile {
            regions: file.regions[..2].to_vec(),
        });
    }));
    launch::signal(child.id(), libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    wait_gone(&pids);
    outcome.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("Region c stopped"), "{stdout}");
    // Started again from another directory: the region that left is not started.
    let again = Command::new(braid_bin())
        .args(["cluster", "up", "--detach", "--dir"])
        .arg(&dir)
        .current_dir("/")
        .output()
        .unwrap();
    let restarted = ClusterFile::load(&dir).unwrap();
    let pids: Vec<Option<u32>> = restarted.regions.iter().map(|r| r.pid).collect();
    let down = Command::new(braid_bin())
        .args(["cluster", "down", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    wait_gone(&pids.iter().flatten().copied().collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{again:?}");
    assert!(stderr.contains("region c left the mesh"), "{stderr}");
    assert!(
        pids[0].is_some() && pids[1].is_some() && pids[2].is_none(),
        "{pids:?}"
    );
    assert!(down.status.success(), "{down:?}");
}

#[test]
fn t46_a_region_that_cannot_be_started_leaves_none_running_behind() {
    let dir = init_two_regions();
    // b's log cannot be opened: b cannot be started, after a was.
    std::fs::create_dir(dir.path().join("b").join("braid.log")).unwrap();
    let up = Command::new(braid_bin())
        .args(["cluster", "up", "--detach", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!up.status.success(), "{up:?}");
    assert!(
        String::from_utf8_lossy(&up.stderr).contains("braid.log"),
        "{up:?}"
    );
    let file = ClusterFile::load(dir.path()).unwrap();
    assert!(file.regions.iter().all(|r| r.pid.is_none()), "{file:?}");
    // a was stopped: no process runs with its configuration.
    let config = file.regions[0].config.to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while runs_with(&config) {
        assert!(Instant::now() < deadline, "region a was left running");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether a process runs whose command line holds `text` (a zombie's is empty).
fn runs_with(text: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .is_ok_and(|line| line.windows(text.len()).any(|w| w == text.as_bytes()))
    })
}

/// A region's node started by hand (as `braid join` runs one) is known by its `/health`:
/// `cluster up` refuses to start a second one beside it, and `cluster down` stops it.
#[test]
fn t47_a_region_started_by_hand_is_found_by_cluster_up_and_stopped_by_cluster_down() {
    let dir = init_two_regions();
    let file = ClusterFile::load(dir.path()).unwrap();
    let mut by_hand = Command::new(braid_bin())
        .args(["start", "--config"])
        .arg(&file.regions[0].config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = by_hand.id();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while braid_tests::http_get(file.regions[0].http.parse().unwrap(), "/health").is_err() {
            assert!(Instant::now() < deadline, "the node did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(ClusterFile::load(dir.path()).unwrap().regions[0].pid, None);
        let up = Command::new(braid_bin())
            .args(["cluster", "up", "--detach", "--dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&up.stderr);
        assert!(!up.status.success(), "{up:?}");
        assert!(
            stderr.contains(&format!("already running (region a is pid Some({pid}))")),
            "{stderr}"
        );
        let down = Command::new(braid_bin())
            .args(["cluster", "down", "--dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(down.status.success(), "{down:?}");
        let stdout = String::from_utf8_lossy(&down.stdout);
        assert!(stdout.contains("Stopping regions a"), "{stdout}");
        let deadline = Instant::now() + Duration::from_secs(15);
        while by_hand.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "cluster down left it running");
            std::thread::sleep(Duration::from_millis(50));
        }
    }));
    let _ = by_hand.kill();
    let _ = by_hand.wait();
    outcome.unwrap();
}

/// A region's node given another region's data directory refuses it and leaves it as it was.
#[test]
fn t48_a_data_directory_of_another_region_is_refused() {
    let dir = init_two_regions();
    let file = ClusterFile::load(dir.path()).unwrap();
    // Only b's errors are read: a, which logs as it runs, writes them nowhere.
    let run = |config: &std::path::Path, errors: Stdio| -> std::process::Child {
        Command::new(braid_bin())
            .args(["start", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(errors)
            .spawn()
            .unwrap()
    };
    let mut a = run(&file.regions[0].config, Stdio::null());
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while braid_tests::http_get(file.regions[0].http.parse().unwrap(), "/health").is_err() {
            assert!(Instant::now() < deadline, "region a did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        launch::signal(a.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        let stopped = loop {
            if let Some(status) = a.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "region a did not stop");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(stopped.success(), "{stopped}");
        // b's configuration pointed at a's data.
        let b_config = &file.regions[1].config;
        let text = std::fs::read_to_string(b_config).unwrap();
        assert!(text.contains("data-dir = \"data\""), "{text}");
        let a_data = dir.path().join("a").join("data");
        let text = text.replace(
            "data-dir = \"data\"",
            &format!("data-dir = {:?}", a_data.display().to_string()),
        );
        std::fs::write(b_config, text).unwrap();
        let mut b = run(b_config, Stdio::piped());
        let deadline = Instant::now() + Duration::from_secs(30);
        while b.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = b.kill();
                let _ = b.wait();
                panic!("b ran on a's data directory");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = b.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("belongs to node 1 of cluster") && stderr.contains("data-dir"),
            "{stderr}"
        );
        // a's data is a's still: a starts on it again.
        a = run(&file.regions[0].config, Stdio::null());
        let deadline = Instant::now() + Duration::from_secs(30);
        while braid_tests::http_get(file.regions[0].http.parse().unwrap(), "/health").is_err() {
            assert!(
                a.try_wait().unwrap().is_none(),
                "region a did not start again"
            );
            assert!(Instant::now() < deadline, "region a did not come up again");
            std::thread::sleep(Duration::from_millis(100));
        }
    }));
    let _ = a.kill();
    let _ = a.wait();
    outcome.unwrap();
}
