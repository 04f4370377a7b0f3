//! Braid's node: the real world around the replica core. It will hold the tokio driver, the quinn
//! transport, RocksDB storage, the openraft glue, the RESP and HTTP servers, configuration and the
//! `braid` binary. For now it only fixes the crate's place in the dependency direction
//! (`conflict` <- `protocol` <- `node` <- `sim`).

#![warn(missing_docs)]
// Library code proves each unwrap cannot fail, or does not unwrap; tests may.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub use braid_protocol as protocol;
