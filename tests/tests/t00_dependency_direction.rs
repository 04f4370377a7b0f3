//! The dependency direction of design.md, enforced: `conflict` <- `protocol` <- `node` <- `sim`,
//! nothing pointing back up, and the pure crates free of async runtimes, transports, storage
//! engines and Raft.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Workspace crates from the bottom up: a crate may depend only on crates before it.
const LAYERS: [&str; 5] = [
    "braid-conflict",
    "braid-protocol",
    "braid-node",
    "braid-sim",
    "braid-tests",
];

/// Crates the pure layers must not reach, directly or through anything they depend on.
const FORBIDDEN_IN_PURE: [&str; 4] = ["tokio", "quinn", "rocksdb", "openraft"];
const PURE: [&str; 2] = ["braid-conflict", "braid-protocol"];

/// Returns every violation found in `cargo metadata` output.
fn violations(metadata: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let packages = metadata["packages"].as_array().cloned().unwrap_or_default();
    let name_of: BTreeMap<String, String> = packages
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap_or_default().to_owned(),
                p["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let rank = |name: &str| LAYERS.iter().position(|l| *l == name);

    // Direct edges between workspace crates, of every kind (normal, dev, build).
    for package in &packages {
        let name = package["name"].as_str().unwrap_or_default();
        let Some(own) = rank(name) else { continue };
        for dep in package["dependencies"].as_array().into_iter().flatten() {
            let dep_name = dep["name"].as_str().unwrap_or_default();
            if let Some(theirs) = rank(dep_name) {
                if theirs >= own {
                    problems.push(format!(
                        "{name} depends on {dep_name}, against the direction"
                    ));
                }
            }
        }
    }

    // Transitive normal dependencies of the pure crates.
    let nodes = metadata["resolve"]["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let edges: BTreeMap<String, Vec<String>> = nodes
        .iter()
        .map(|node| {
            let id = node["id"].as_str().unwrap_or_default().to_owned();
            let deps = node["deps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|k| k["kind"].is_null())
                })
                .filter_map(|d| d["pkg"].as_str().map(str::to_owned))
                .collect();
            (id, deps)
        })
        .collect();
    for (id, name) in &name_of {
        if !PURE.contains(&name.as_str()) {
            continue;
        }
        let mut seen = BTreeSet::new();
        let mut stack = vec![id.clone()];
        while let Some(next) = stack.pop() {
            for dep in edges.get(&next).into_iter().flatten() {
                if seen.insert(dep.clone()) {
                    stack.push(dep.clone());
                }
            }
        }
        for dep in seen {
            let dep_name = name_of.get(&dep).cloned().unwrap_or_default();
            if FORBIDDEN_IN_PURE.contains(&dep_name.as_str()) {
                problems.push(format!(
                    "{name} depends on {dep_name} (directly or not); it must stay pure"
                ));
            }
        }
    }
    problems
}

#[test]
fn crates_depend_only_downwards_and_pure_crates_stay_pure() {
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(
            std::env::var("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned())
                + "/../Cargo.toml",
        )
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    let names: Vec<&str> = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for layer in LAYERS {
        assert!(names.contains(&layer), "workspace crate {layer} is missing");
    }
    assert_eq!(violations(&metadata), Vec::<String>::new());
}

/// The checker itself bites: a fabricated graph with an upward edge and a forbidden crate.
#[test]
fn the_checker_reports_upward_edges_and_impure_dependencies() {
    let metadata = serde_json::json!({
        "packages": [
            {"id": "c", "name": "braid-conflict", "dependencies": [{"name": "braid-protocol"}]},
            {"id": "p", "name": "braid-protocol", "dependencies": [{"name": "braid-conflict"}, {"name": "helper"}]},
            {"id": "h", "name": "helper", "dependencies": [{"name": "tokio"}]},
            {"id": "t", "name": "tokio", "dependencies": []}
        ],
        "resolve": {"nodes": [
            {"id": "c", "deps": [{"pkg": "p", "dep_kinds": [{"kind": null}]}]},
            {"id": "p", "deps": [{"pkg": "c", "dep_kinds": [{"kind": null}]}, {"pkg": "h", "dep_kinds": [{"kind": null}]}]},
            {"id": "h", "deps": [{"pkg": "t", "dep_kinds": [{"kind": null}]}]},
            {"id": "t", "deps": []}
        ]}
    });
    let problems = violations(&metadata);
    assert!(
        problems
            .iter()
            .any(|p| p == "braid-conflict depends on braid-protocol, against the direction"),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("braid-protocol depends on tokio")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("braid-conflict depends on tokio")),
        "{problems:?}"
    );
}
