//! The `braid` binary's command line: help for every command, and `init` as a user runs it.
//! (Being an integration test of this package, this also makes `cargo test` build the binary
//! that the end-to-end tests in `tests/` start.)

use std::process::Command;

fn braid() -> Command {
    Command::new(env!("CARGO_BIN_EXE_braid"))
}

#[test]
fn help_explains_every_command() {
    let out = braid().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for command in ["init", "start", "cluster", "status"] {
        assert!(
            text.contains(command),
            "--help does not mention {command}:\n{text}"
        );
    }
    let out = braid().args(["cluster", "up", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--regions", "--dir", "--base-port", "--detach"] {
        assert!(
            text.contains(flag),
            "cluster up --help lacks {flag}:\n{text}"
        );
    }
}

#[test]
fn init_writes_a_cluster_and_refuses_to_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let out = braid()
        .args(["init", "--regions", "us,eu", "--dir"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in [
        "ca.pem",
        "ca.key",
        "cluster.json",
        "us/braid.toml",
        "us/node.pem",
        "eu/node.key",
    ] {
        assert!(path.join(file).exists(), "{file} missing");
    }
    let out = braid()
        .args(["init", "--regions", "us,eu", "--dir"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a cluster"));
}

#[test]
fn start_with_a_broken_config_fails_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("braid.toml");
    std::fs::write(&path, "node-id = \"one\"\n").unwrap();
    let out = braid()
        .args(["start", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("braid.toml"), "{err}");
}
