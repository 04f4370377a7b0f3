//! Braid's node: the real world around the replica core.
//!
//! # Layout
//!
//! - [`config`]: the node's TOML configuration.
//! - [`control`]: the control plane's Raft group (openraft) around its state machine.
//! - [`storage`]: RocksDB storage behind the core's `Storage` trait.
//! - [`driver`]: the tokio task that owns the replica core and executes its outputs.
//! - [`transport`]: QUIC streams between nodes, and the directory of known peers.
//! - [`snapshot`]: data snapshots streamed to a region that joins.
//! - [`tls`]: the cluster CA, node certificates, mutual TLS.
//! - [`resp`]: the Redis-protocol server.
//! - [`faults`]: fault injection for drills (off unless configured, loopback only).
//! - [`http`]: health, status and metrics.
//! - [`node`]: all of it assembled.
//! - [`cluster`]: `braid init` and local clusters.
//! - [`launch`]: local clusters as child processes.
//! - [`admin_client`]: a small HTTP GET client for the admin API.
//! - [`drill`]: `braid drill`, a scenario against real processes: RPO, recovery, convergence.
//! - [`bench`]: `braid bench`, throughput and lag against the ceilings and Redis.
//! - [`scenario`]: the scenario language, run by the simulator and by `braid drill`.
//! - [`workload`]: a scenario's writes, drawn from a seeded generator.
//!
//! IO adapters sit behind the `server` feature, so the simulator can depend on this crate
//! without RocksDB or quinn (tokio comes only with openraft, for the control plane's glue).

#![warn(missing_docs)]
// Library code proves each unwrap cannot fail, or does not unwrap; tests may.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub use braid_protocol as protocol;

#[cfg(feature = "server")]
pub mod admin_client;
#[cfg(feature = "server")]
pub mod bench;
#[cfg(feature = "server")]
pub mod cluster;
#[cfg(feature = "server")]
pub mod config;
pub mod control;
#[cfg(feature = "server")]
pub mod drill;
#[cfg(feature = "server")]
pub mod driver;
#[cfg(feature = "server")]
pub mod faults;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod launch;
#[cfg(feature = "server")]
pub mod node;
#[cfg(feature = "server")]
pub mod resp;
pub mod scenario;
#[cfg(feature = "server")]
pub mod snapshot;
#[cfg(feature = "server")]
pub mod storage;
#[cfg(feature = "server")]
pub mod tls;
#[cfg(feature = "server")]
pub mod transport;
pub mod workload;
