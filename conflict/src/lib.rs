//! Braid's merge semantics: the hybrid logical clock, the four value types and their operations,
//! state-based merge, and the oracle that computes converged values from the set of all
//! operations. Pure: no IO, no async, no clock, no randomness.
//!
//! # Layout
//!
//! - [`hlc`]: hybrid logical clock, [`NodeId`], [`Hlc`], the skew bound.
//! - [`value`]: [`KeyState`] (one key's replicated state), [`Op`] (what a change event carries),
//!   [`Command`] (what a client asks), [`Value`] (what a client reads).
//! - [`awset`]: the add-wins observed-remove set the `set` type is built on.
//! - [`counter`]: [`CounterTotals`], the per-origin totals the `counter` type is built on.
//! - [`state_bytes`]: [`StateBytes`], the bytes a state keeps (members, fields, values): inline
//!   when short, never a slice of the frame an operation came in.
//! - [`oracle`]: converged values from the set of all operations, independent of [`KeyState`].
//!
//! The semantics, with worked examples, are in `docs/conflicts.md`; each example there is a test
//! in `tests/semantics.rs`.

#![warn(missing_docs)]
// Library code proves each unwrap cannot fail, or does not unwrap; tests may.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod awset;
pub mod counter;
mod dots;
pub mod hlc;
pub mod oracle;
mod small_map;
pub mod state_bytes;
#[cfg(test)]
mod test_encoding;
pub mod value;

pub use counter::CounterTotals;
pub use hlc::{ClockError, Hlc, HlcClock, NodeId, CLOCK_SKEW_MS_MAX_DEFAULT};
pub use state_bytes::StateBytes;
pub use value::{
    Applied, Command, CommandError, Direction, InvalidOp, KeyState, Observed, Op, Prepared, Value,
    ValueType, Write, KEY_STATE_BYTES_MAX,
};

/// Re-exported so that users of [`Observed`] and [`Write`] name the same types.
pub use crdts::{Dot, VClock};
