//! Hybrid logical clock.
//!
//! A timestamp is `(wall_ms, logical, node)`, totally ordered in that field order, so two
//! timestamps from different nodes are never equal and the node id breaks ties. The clock never
//! reads time itself: every call takes the current physical time in milliseconds as an argument.
//!
//! ```text
//!   local write ──► now(physical_ms) ──────────────┐
//!                                                   ├──► last (monotonic, persisted as the
//!   remote event ─► update_from_remote(ts, phys) ──┘     high-water mark)
//!                    └─ ts.wall_ms > phys + skew_max ─► ClockError::TooFarAhead
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifies one node (one region) of the mesh. Unique within a cluster; assigned at `init`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// A hybrid logical timestamp. Ordering is lexicographic over `(wall_ms, logical, node)`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    /// Physical component: milliseconds since the Unix epoch (as reported by the caller).
    pub wall_ms: u64,
    /// Logical component: orders events within one `wall_ms`.
    pub logical: u32,
    /// The node that issued the timestamp; breaks ties between nodes.
    pub node: NodeId,
}

impl Hlc {
    /// The smallest timestamp: before every real one.
    pub const ZERO: Hlc = Hlc {
        wall_ms: 0,
        logical: 0,
        node: NodeId(0),
    };

    /// Builds a timestamp from its parts.
    pub const fn new(wall_ms: u64, logical: u32, node: NodeId) -> Hlc {
        Hlc {
            wall_ms,
            logical,
            node,
        }
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}@{}", self.wall_ms, self.logical, self.node)
    }
}

/// Default bound on how far a remote timestamp may run ahead of the local physical clock.
/// One minute: far beyond NTP-disciplined skew, small enough to catch a clock set wrong.
pub const CLOCK_SKEW_MS_MAX_DEFAULT: u64 = 60_000;

/// A remote timestamp the clock refuses to adopt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    /// The remote timestamp is further ahead of the local physical clock than the bound.
    #[error(
        "remote timestamp {remote} is {ahead_ms} ms ahead of local physical time {local_ms} ms \
         (bound {skew_ms_max} ms)"
    )]
    TooFarAhead {
        /// The refused timestamp.
        remote: Hlc,
        /// The local physical time it was compared with.
        local_ms: u64,
        /// How far ahead it was.
        ahead_ms: u64,
        /// The configured bound.
        skew_ms_max: u64,
    },
}

/// One node's hybrid logical clock.
///
/// Monotonic: every timestamp it issues is greater than every timestamp it issued or adopted
/// before, whatever the physical time passed in (a physical clock that steps back only slows the
/// wall component, it never reorders).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HlcClock {
    /// The greatest timestamp issued or adopted so far (the high-water mark to persist).
    last: Hlc,
    /// Bound on how far a remote timestamp may be ahead of local physical time.
    skew_ms_max: u64,
}

impl HlcClock {
    /// A clock for `node` that has issued nothing yet.
    pub fn new(node: NodeId, skew_ms_max: u64) -> HlcClock {
        HlcClock {
            last: Hlc::new(0, 0, node),
            skew_ms_max,
        }
    }

    /// A clock resumed from a persisted high-water mark: everything it issues is above `high_water`.
    pub fn resume(node: NodeId, skew_ms_max: u64, high_water: Hlc) -> HlcClock {
        HlcClock {
            last: Hlc::new(high_water.wall_ms, high_water.logical, node),
            skew_ms_max,
        }
    }

    /// The node this clock issues timestamps for.
    pub fn node(&self) -> NodeId {
        self.last.node
    }

    /// The greatest timestamp issued or adopted so far.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// The configured skew bound in milliseconds.
    pub fn skew_ms_max(&self) -> u64 {
        self.skew_ms_max
    }

    /// Issues a timestamp for a local event at physical time `physical_ms`.
    pub fn now(&mut self, physical_ms: u64) -> Hlc {
        if physical_ms > self.last.wall_ms {
            self.last.wall_ms = physical_ms;
            self.last.logical = 0;
        } else {
            self.bump_logical();
        }
        self.last
    }

    /// Adopts a timestamp received from another node at local physical time `physical_ms`, and
    /// returns the local timestamp of the receive event (greater than both).
    ///
    /// A timestamp more than the skew bound ahead of `physical_ms` is refused and the clock is
    /// left unchanged, so one node with a wrong clock cannot drag every other clock forward.
    pub fn update_from_remote(&mut self, remote: Hlc, physical_ms: u64) -> Result<Hlc, ClockError> {
        let ahead_ms = remote.wall_ms.saturating_sub(physical_ms);
        if ahead_ms > self.skew_ms_max {
            return Err(ClockError::TooFarAhead {
                remote,
                local_ms: physical_ms,
                ahead_ms,
                skew_ms_max: self.skew_ms_max,
            });
        }
        let wall_ms = physical_ms.max(self.last.wall_ms).max(remote.wall_ms);
        let logical = if wall_ms == self.last.wall_ms && wall_ms == remote.wall_ms {
            self.last.logical.max(remote.logical)
        } else if wall_ms == self.last.wall_ms {
            self.last.logical
        } else if wall_ms == remote.wall_ms {
            remote.logical
        } else {
            // Physical time is ahead of both: the logical counter starts over.
            self.last.wall_ms = wall_ms;
            self.last.logical = 0;
            return Ok(self.last);
        };
        self.last.wall_ms = wall_ms;
        self.last.logical = logical;
        self.bump_logical();
        Ok(self.last)
    }

    /// Advances the logical counter; on overflow (2^32 events in one millisecond, which a node
    /// cannot produce in practice) the wall component moves one millisecond ahead instead.
    fn bump_logical(&mut self) {
        match self.last.logical.checked_add(1) {
            Some(logical) => self.last.logical = logical,
            None => {
                self.last.wall_ms += 1;
                self.last.logical = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);

    #[test]
    fn now_is_monotonic_even_when_physical_time_steps_back() {
        let mut clock = HlcClock::new(A, CLOCK_SKEW_MS_MAX_DEFAULT);
        let t1 = clock.now(1_000);
        let t2 = clock.now(1_000);
        let t3 = clock.now(500);
        let t4 = clock.now(2_000);
        assert_eq!(t1, Hlc::new(1_000, 0, A));
        assert_eq!(t2, Hlc::new(1_000, 1, A));
        assert_eq!(t3, Hlc::new(1_000, 2, A));
        assert_eq!(t4, Hlc::new(2_000, 0, A));
    }

    #[test]
    fn remote_ahead_within_bound_moves_the_clock_past_it() {
        let mut clock = HlcClock::new(A, 100);
        clock.now(1_000);
        let received = clock
            .update_from_remote(Hlc::new(1_050, 7, B), 1_000)
            .unwrap();
        assert_eq!(received, Hlc::new(1_050, 8, A));
        assert!(clock.now(1_000) > Hlc::new(1_050, 7, B));
    }

    #[test]
    fn remote_too_far_ahead_is_refused_and_changes_nothing() {
        let mut clock = HlcClock::new(A, 100);
        let before = clock.now(1_000);
        let err = clock
            .update_from_remote(Hlc::new(1_101, 0, B), 1_000)
            .unwrap_err();
        assert_eq!(
            err,
            ClockError::TooFarAhead {
                remote: Hlc::new(1_101, 0, B),
                local_ms: 1_000,
                ahead_ms: 101,
                skew_ms_max: 100
            }
        );
        assert_eq!(clock.last(), before);
    }

    #[test]
    fn remote_behind_keeps_local_order() {
        let mut clock = HlcClock::new(A, 100);
        clock.now(2_000);
        let received = clock
            .update_from_remote(Hlc::new(1_000, 3, B), 2_000)
            .unwrap();
        assert_eq!(received, Hlc::new(2_000, 1, A));
        let received = clock
            .update_from_remote(Hlc::new(1_000, 3, B), 3_000)
            .unwrap();
        assert_eq!(received, Hlc::new(3_000, 0, A));
    }

    #[test]
    fn node_id_breaks_ties() {
        assert!(Hlc::new(5, 0, A) < Hlc::new(5, 0, B));
        assert!(Hlc::new(5, 1, A) > Hlc::new(5, 0, B));
    }

    #[test]
    fn resume_issues_above_the_high_water_mark() {
        let mut clock = HlcClock::resume(A, 100, Hlc::new(9_000, 4, A));
        assert_eq!(clock.now(1_000), Hlc::new(9_000, 5, A));
    }

    #[test]
    fn logical_overflow_moves_wall_forward() {
        let mut clock = HlcClock::resume(A, 100, Hlc::new(10, u32::MAX, A));
        assert_eq!(clock.now(10), Hlc::new(11, 0, A));
    }
}
