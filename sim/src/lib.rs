//! Braid's deterministic simulator: the real replica core and the real openraft on a simulated
//! network, clock and disk. For now it only fixes the crate's place in the dependency direction
//! (`conflict` <- `protocol` <- `node` <- `sim`).

#![warn(missing_docs)]
// Library code proves each unwrap cannot fail, or does not unwrap; tests may.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub use braid_node as node;
