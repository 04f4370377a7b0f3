//! Fault injection for drills: cut links (both ways or only outgoing), delay outgoing frames and
//! skew the clock fed to the HLC, on command from `POST /faults`. Only a node whose configuration
//! says `fault-injection = true` accepts it, and the configuration refuses that key unless every
//! address is a loopback address: a production node cannot carry it.
//!
//! ```text
//!   POST /faults {cut, drop-to, delay-ms, clock-offset-ms}  (region names)
//!        └─► Faults (watch) ─┬─► transport: refuse / end streams of cut peers,
//!                            │              drop or hold frames to a peer
//!                            └─► driver: physical time + offset
//! ```
//!
//! Faults live in memory only: a restarted node starts without any.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use braid_protocol::NodeId;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Environment variable with faults (a [`FaultSet`] as JSON) in force from the moment a node
/// starts, so that a drill's restarted node is partitioned, delayed or skewed before its first
/// frame. Refused by a node without `fault-injection = true`.
pub const FAULTS_ENV: &str = "BRAID_FAULTS";

/// Largest delay a link may be given: a minute.
pub const DELAY_MS_MAX: u64 = 60_000;

/// Largest clock offset, either way: a day.
pub const CLOCK_OFFSET_MS_MAX: i64 = 86_400_000;

/// The faults asked for, by region name (the body of `POST /faults` and of its answer). Each
/// request replaces the whole set: `{}` heals everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FaultSet {
    /// Peers this node neither talks to nor accepts: their streams end, connections are refused.
    #[serde(default)]
    pub cut: BTreeSet<String>,
    /// Peers whose frames from this node are dropped at the sender (a one-way partition: theirs
    /// still arrive).
    #[serde(default)]
    pub drop_to: BTreeSet<String>,
    /// Extra delay of every frame this node sends to a peer, in milliseconds.
    #[serde(default)]
    pub delay_ms: BTreeMap<String, u64>,
    /// Added to the physical time this node's HLC reads, in milliseconds.
    #[serde(default)]
    pub clock_offset_ms: i64,
}

/// The same faults, resolved to node ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Active {
    /// See [`FaultSet::cut`].
    pub cut: BTreeSet<NodeId>,
    /// See [`FaultSet::drop_to`].
    pub drop_to: BTreeSet<NodeId>,
    /// See [`FaultSet::delay_ms`].
    pub delay_ms: BTreeMap<NodeId, u64>,
    /// See [`FaultSet::clock_offset_ms`].
    pub clock_offset_ms: i64,
}

/// A request that cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FaultError {
    /// The node's configuration does not allow fault injection.
    #[error(
        "fault injection is off on this node: it needs `fault-injection = true` in its \
         configuration (loopback clusters only; `braid cluster up --fault-injection` makes a \
         cluster with it)"
    )]
    Disabled,
    /// A region name that is not a peer of this node.
    #[error("{0} is not a peer of this node")]
    UnknownRegion(String),
    /// A value out of range.
    #[error("{0}")]
    OutOfRange(String),
}

/// The node's current faults, shared by the transport, the driver and the admin API.
#[derive(Debug)]
pub struct Faults {
    enabled: bool,
    active: watch::Sender<Active>,
}

impl Faults {
    /// No faults; `enabled` says whether any may be set.
    pub fn new(enabled: bool) -> Faults {
        Faults {
            enabled,
            active: watch::Sender::new(Active::default()),
        }
    }

    /// Whether faults may be set.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Replaces the faults. `regions` maps this node's peers to their names.
    pub fn set(
        &self,
        request: &FaultSet,
        peers: &BTreeMap<NodeId, String>,
    ) -> Result<(), FaultError> {
        if !self.enabled {
            return Err(FaultError::Disabled);
        }
        let id_of = |name: &String| {
            peers
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(id, _)| *id)
                .ok_or_else(|| FaultError::UnknownRegion(name.clone()))
        };
        let mut active = Active {
            clock_offset_ms: request.clock_offset_ms,
            ..Active::default()
        };
        if request.clock_offset_ms.unsigned_abs() > CLOCK_OFFSET_MS_MAX.unsigned_abs() {
            return Err(FaultError::OutOfRange(format!(
                "clock-offset-ms must be within ±{CLOCK_OFFSET_MS_MAX}"
            )));
        }
        for name in &request.cut {
            active.cut.insert(id_of(name)?);
        }
        for name in &request.drop_to {
            active.drop_to.insert(id_of(name)?);
        }
        for (name, ms) in &request.delay_ms {
            if *ms > DELAY_MS_MAX {
                return Err(FaultError::OutOfRange(format!(
                    "delay-ms must be at most {DELAY_MS_MAX}"
                )));
            }
            if *ms > 0 {
                active.delay_ms.insert(id_of(name)?, *ms);
            }
        }
        self.active.send_replace(active);
        Ok(())
    }

    /// The faults in force, by region name.
    pub fn get(&self, peers: &BTreeMap<NodeId, String>) -> FaultSet {
        let active = self.active.borrow();
        let name = |id: &NodeId| peers.get(id).cloned().unwrap_or_else(|| id.to_string());
        FaultSet {
            cut: active.cut.iter().map(name).collect(),
            drop_to: active.drop_to.iter().map(name).collect(),
            delay_ms: active
                .delay_ms
                .iter()
                .map(|(id, ms)| (name(id), *ms))
                .collect(),
            clock_offset_ms: active.clock_offset_ms,
        }
    }

    /// Whether the link to `peer` is cut.
    pub fn cut(&self, peer: NodeId) -> bool {
        self.enabled && self.active.borrow().cut.contains(&peer)
    }

    /// Whether frames to `peer` are dropped (or the link is cut), and how long the others are
    /// held: read together, once per frame.
    pub fn outgoing(&self, peer: NodeId) -> (bool, Duration) {
        if !self.enabled {
            return (false, Duration::ZERO);
        }
        let active = self.active.borrow();
        let drop = active.drop_to.contains(&peer) || active.cut.contains(&peer);
        let delay = active.delay_ms.get(&peer).copied().unwrap_or(0);
        (drop, Duration::from_millis(delay))
    }

    /// The clock offset (0, without a lock, when fault injection is off).
    pub fn clock_offset_ms(&self) -> i64 {
        if !self.enabled {
            return 0;
        }
        self.active.borrow().clock_offset_ms
    }

    /// A receiver that sees every change.
    pub fn watch(&self) -> watch::Receiver<Active> {
        self.active.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> BTreeMap<NodeId, String> {
        BTreeMap::from([(NodeId(2), "b".into()), (NodeId(3), "c".into())])
    }

    #[test]
    fn refused_when_disabled_and_for_unknown_regions_or_wild_values() {
        let off = Faults::new(false);
        assert_eq!(
            off.set(&FaultSet::default(), &peers()),
            Err(FaultError::Disabled)
        );
        let on = Faults::new(true);
        let mut request = FaultSet::default();
        request.cut.insert("z".into());
        assert_eq!(
            on.set(&request, &peers()),
            Err(FaultError::UnknownRegion("z".into()))
        );
        for offset in [CLOCK_OFFSET_MS_MAX + 1, i64::MIN] {
            let request = FaultSet {
                clock_offset_ms: offset,
                ..FaultSet::default()
            };
            assert!(matches!(
                on.set(&request, &peers()),
                Err(FaultError::OutOfRange(_))
            ));
        }
        assert_eq!(on.get(&peers()), FaultSet::default());
    }

    #[test]
    fn a_set_replaces_the_whole_state_and_reads_back_by_name() {
        let faults = Faults::new(true);
        let watch = faults.watch();
        let request = FaultSet {
            cut: BTreeSet::from(["b".into()]),
            drop_to: BTreeSet::from(["c".into()]),
            delay_ms: BTreeMap::from([("c".into(), 40)]),
            clock_offset_ms: -500,
        };
        faults.set(&request, &peers()).unwrap();
        assert!(watch.has_changed().unwrap());
        assert!(faults.cut(NodeId(2)) && faults.outgoing(NodeId(2)).0);
        assert!(!faults.cut(NodeId(3)) && faults.outgoing(NodeId(3)).0);
        assert_eq!(faults.outgoing(NodeId(3)).1, Duration::from_millis(40));
        assert_eq!(faults.clock_offset_ms(), -500);
        assert_eq!(faults.get(&peers()), request);
        faults.set(&FaultSet::default(), &peers()).unwrap();
        assert!(!faults.outgoing(NodeId(2)).0 && faults.clock_offset_ms() == 0);
    }
}
