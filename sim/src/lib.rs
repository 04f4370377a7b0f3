//! Braid's deterministic simulator: many regions in one process on one thread, running the real
//! replica core from `braid-protocol` over a simulated network, clock and disk, with a seeded
//! random source and virtual time. The same scenario and seed give a byte-identical trace.
//!
//! # Layout
//!
//! - [`scenario`]: the scenario file format (regions, topology, network, workload, timeline,
//!   expectations), shared with `braid drill` and so defined in `braid-node`.
//! - [`world`]: the simulation itself and its checkers (convergence, the oracle, exactly-once,
//!   messages per change, lag).
//! - [`control`]: the control plane's real openraft group, on the simulated network.
//! - [`storage`]: simulated storage, with bugs that can be injected to prove the checkers bite.
//! - [`sweep`]: running many seeds and summarising them.
//! - [`alloc`]: the binary's allocator.
//!
//! See `docs/simulation.md`.

#![warn(missing_docs)]
// Library code proves each unwrap cannot fail, or does not unwrap; tests may.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod alloc;
pub mod control;
pub mod storage;
pub mod sweep;
pub mod world;

pub use braid_node::scenario;
pub use scenario::Scenario;
pub use storage::InjectedBug;
pub use world::{Report, RunOptions, World};

/// Runs one scenario with one seed.
pub fn run(scenario: &Scenario, options: RunOptions) -> Result<Report, String> {
    let seed = options.seed;
    let bug = options.bug;
    let world = World::new(scenario, options)?;
    let mut report = world.run()?;
    report.replay = match bug {
        Some(bug) => format!(
            "braid-sim run SCENARIO --seed {seed} --inject-bug {}",
            bug.name()
        ),
        None => format!("braid-sim run SCENARIO --seed {seed}"),
    };
    Ok(report)
}
