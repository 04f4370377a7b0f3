//! Identifiers and version vectors.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use braid_conflict::NodeId;

/// A position in one origin's sequence of change events. Dense: an origin's first event is 1,
/// its next 2, and so on; 0 means "none yet".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Seq(pub u64);

impl Seq {
    /// No event yet.
    pub const ZERO: Seq = Seq(0);

    /// The sequence number after this one.
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Identifies a cluster: 16 random bytes chosen at `braid init`. Nodes of different clusters
/// refuse each other at the handshake, even with certificates from one CA.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ClusterId(pub [u8; 16]);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Per origin, the highest sequence number applied contiguously (every event up to it is applied).
/// Origins absent from the map are at [`Seq::ZERO`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector(BTreeMap<NodeId, Seq>);

impl VersionVector {
    /// An empty vector: nothing applied.
    pub fn new() -> VersionVector {
        VersionVector::default()
    }

    /// The highest contiguous sequence number applied from `origin`.
    pub fn get(&self, origin: NodeId) -> Seq {
        self.0.get(&origin).copied().unwrap_or(Seq::ZERO)
    }

    /// Records that everything from `origin` up to `seq` is applied. Never moves backwards.
    pub fn advance(&mut self, origin: NodeId, seq: Seq) {
        let slot = self.0.entry(origin).or_insert(Seq::ZERO);
        *slot = (*slot).max(seq);
    }

    /// Pointwise maximum.
    pub fn merge(&mut self, other: &VersionVector) {
        for (origin, seq) in &other.0 {
            self.advance(*origin, *seq);
        }
    }

    /// Whether this vector has applied everything `other` has.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other
            .0
            .iter()
            .all(|(origin, seq)| self.get(*origin) >= *seq)
    }

    /// The origins and their sequence numbers, in origin order.
    pub fn iter(&self) -> impl Iterator<Item = (NodeId, Seq)> + '_ {
        self.0.iter().map(|(origin, seq)| (*origin, *seq))
    }

    /// How many origins the vector names.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the vector names no origin.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(NodeId, Seq)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (NodeId, Seq)>>(iter: I) -> VersionVector {
        let mut vector = VersionVector::new();
        for (origin, seq) in iter {
            vector.advance(origin, seq);
        }
        vector
    }
}
