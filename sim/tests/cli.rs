//! The `braid-sim` command as a user runs it: its flags, its errors and its JSON reports.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scenario small enough to run in well under a second in a test build.
const SMALL: &str = r#"
name = "cli-small"
regions = ["a", "b"]
duration-ms = 1500
[network]
latency-ms-min = 2
latency-ms-max = 10
[workload]
rate-per-region = 40
keys = 10
"#;

/// A directory of this test's own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("braid-sim-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn scenario(&self) -> PathBuf {
        let path = self.0.join("small.toml");
        std::fs::write(&path, SMALL).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn braid_sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_braid-sim"))
        .args(args)
        .output()
        .unwrap()
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn one_seed_options_are_refused_with_a_sweep() {
    let scratch = Scratch::new("conflicts");
    let scenario = scratch.scenario();
    let trace = scratch.0.join("trace.txt");
    for extra in [
        vec!["--trace", text(&trace)],
        vec!["--check-determinism"],
        vec!["--seed", "3"],
    ] {
        let mut args = vec!["run", text(&scenario), "--seeds", "0..2"];
        args.extend(extra.iter().copied());
        let out = braid_sim(&args);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("cannot be used with"),
            "{extra:?}: {}",
            stderr(&out)
        );
    }
    assert!(!trace.exists(), "a refused run wrote its trace");
}

#[test]
fn a_seed_range_that_is_not_numbers_says_what_it_takes() {
    let scratch = Scratch::new("range");
    let scenario = scratch.scenario();
    for (range, says) in [
        ("a..5", "\"a\" is not a seed number"),
        ("0..x", "\"x\" is not a seed number"),
        ("5", "--seeds takes A..B"),
        ("5..5", "the range is empty"),
    ] {
        let out = braid_sim(&["run", text(&scenario), "--seeds", range]);
        assert_eq!(out.status.code(), Some(2), "{range}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{range}: {}", stderr(&out));
    }
}

#[test]
fn json_reports_name_the_scenario_in_their_replay_command() {
    let scratch = Scratch::new("json");
    let scenario = scratch.scenario();
    let one = scratch.0.join("one.json");
    let out = braid_sim(&["run", text(&scenario), "--seed", "4", "--json", text(&one)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&one).unwrap()).unwrap();
    assert_eq!(report["seed"], 4);
    assert_eq!(report["passed"], true);
    assert_eq!(
        report["replay"],
        format!("braid-sim run {} --seed 4", scenario.display())
    );

    let sweep = scratch.0.join("sweep.json");
    let out = braid_sim(&[
        "run",
        text(&scenario),
        "--seeds",
        "1..3",
        "--json",
        text(&sweep),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sweep).unwrap()).unwrap();
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (run, seed) in runs.iter().zip(1..) {
        assert_eq!(
            run["replay"],
            format!("braid-sim run {} --seed {seed}", scenario.display())
        );
    }
    assert_eq!(doc["summary"]["seeds"], 2);
}

#[test]
fn the_determinism_check_is_a_verdict_of_the_json_report() {
    let scratch = Scratch::new("determinism");
    let scenario = scratch.scenario();
    let json = scratch.0.join("report.json");
    let out = braid_sim(&[
        "run",
        text(&scenario),
        "--seed",
        "2",
        "--check-determinism",
        "--json",
        text(&json),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let checkers = report["checkers"].as_array().unwrap();
    let determinism = checkers
        .iter()
        .find(|v| v["checker"] == "determinism")
        .expect("the check is in the report");
    assert_eq!(determinism["passed"], true, "{determinism}");
    assert_eq!(report["passed"], true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("determinism"), "{stdout}");
}

/// The writing end of a pipe whose reading end is closed already.
#[allow(unsafe_code)]
fn closed_pipe() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `pipe2` writes two new descriptors into the array it is given, of two.
    let made = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(made, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just made, and each is owned once, here.
    let (reader, writer) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    drop(reader);
    writer
}

/// Output piped into a reader that has gone (`braid-sim run ... | head`) ends the process as
/// SIGPIPE does other tools, without a panic.
#[test]
fn a_closed_output_ends_the_run_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let scratch = Scratch::new("pipe");
    let scenario = scratch.scenario();
    let json = scratch.0.join("report.json");
    let writer = closed_pipe();
    let out = Command::new(env!("CARGO_BIN_EXE_braid-sim"))
        .args(["run", text(&scenario), "--seed", "0", "--json", text(&json)])
        .stdout(writer)
        .output()
        .unwrap();
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
    // The report's file is written before the report is printed.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["passed"], true);
}

#[test]
fn an_output_path_that_cannot_be_written_is_refused_before_any_seed_runs() {
    let scratch = Scratch::new("unwritable");
    let scenario = scratch.scenario();
    let nowhere = scratch.0.join("no-such-dir").join("out");
    for (flag, what) in [("--json", "report"), ("--trace", "trace")] {
        for seeds in [["--seed", "1"], ["--seeds", "0..3"]] {
            if flag == "--trace" && seeds[0] == "--seeds" {
                continue; // refused as a one-seed option (above)
            }
            let out = braid_sim(&[
                "run",
                text(&scenario),
                seeds[0],
                seeds[1],
                flag,
                text(&nowhere),
            ]);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{flag} {seeds:?}: {err}");
            assert!(
                err.contains(&format!("cannot write the {what} to {}", nowhere.display())),
                "{flag} {seeds:?}: {err}"
            );
            assert!(!err.contains("seeds,"), "a seed ran first: {err}");
            assert!(
                out.stdout.is_empty(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}

#[test]
fn the_replay_command_quotes_a_scenario_path_a_shell_would_split() {
    let scratch = Scratch::new("quoted");
    let scenario = scratch.0.join("my scenario's copy.toml");
    std::fs::write(&scenario, SMALL).unwrap();
    let report_path = scratch.0.join("report.json");
    let out = braid_sim(&[
        "run",
        text(&scenario),
        "--seed",
        "2",
        "--json",
        text(&report_path),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let quoted = format!("'{}'", text(&scenario).replace('\'', "'\\''"));
    assert_eq!(report["replay"], format!("braid-sim run {quoted} --seed 2"));
    // The command as printed runs the same seed again in a shell.
    let replay = report["replay"].as_str().unwrap().replacen(
        "braid-sim",
        env!("CARGO_BIN_EXE_braid-sim"),
        1,
    );
    let again = Command::new("sh").arg("-c").arg(&replay).output().unwrap();
    assert!(again.status.success(), "{replay}: {}", stderr(&again));
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        stdout.contains(report["trace_hash"].as_str().unwrap()),
        "{stdout}"
    );
}
