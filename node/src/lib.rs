//! Braid's node: the real world around the replica core.
//!
//! # Layout
//!
//! - [`storage`]: RocksDB storage behind the core's `Storage` trait (feature `server`).
//!
//! IO adapters sit behind the `server` feature, so the simulator can depend on this crate
//! without RocksDB, quinn or tokio.

#![warn(missing_docs)]
// Library code proves each unwrap cannot fail, or does not unwrap; tests may.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub use braid_protocol as protocol;

#[cfg(feature = "server")]
pub mod storage;
