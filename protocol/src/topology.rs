//! Which regions exist and which pairs of them are linked. Static in this version (from
//! configuration); the control plane will hand the replica new topologies at run time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::ids::NodeId;

/// A topology that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// A link names a node that is not in the topology.
    #[error("link {0}-{1} names a node outside the topology")]
    UnknownNode(NodeId, NodeId),
    /// A link from a node to itself.
    #[error("link from {0} to itself")]
    SelfLink(NodeId),
    /// Some node cannot reach another through the links: its writes would never arrive there.
    #[error("{0} cannot reach {1} through the links")]
    Disconnected(NodeId, NodeId),
    /// No nodes at all.
    #[error("a topology needs at least one node")]
    Empty,
}

/// Nodes and the undirected links between them, with every pairwise distance precomputed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    nodes: BTreeSet<NodeId>,
    /// Undirected links, each stored once as `(smaller, larger)`.
    links: BTreeSet<(NodeId, NodeId)>,
    /// Hops between every ordered pair of nodes.
    distance: BTreeMap<(NodeId, NodeId), u32>,
}

impl Topology {
    /// Every node linked to every other.
    pub fn full_mesh(nodes: impl IntoIterator<Item = NodeId>) -> Result<Topology, TopologyError> {
        let nodes: BTreeSet<NodeId> = nodes.into_iter().collect();
        let mut links = Vec::new();
        for a in &nodes {
            for b in nodes.range(*a..).skip(1) {
                links.push((*a, *b));
            }
        }
        Topology::with_links(nodes, links)
    }

    /// The given nodes and links. Refuses links to unknown nodes, self-links, and topologies in
    /// which some node cannot reach another.
    pub fn with_links(
        nodes: impl IntoIterator<Item = NodeId>,
        links: impl IntoIterator<Item = (NodeId, NodeId)>,
    ) -> Result<Topology, TopologyError> {
        let nodes: BTreeSet<NodeId> = nodes.into_iter().collect();
        if nodes.is_empty() {
            return Err(TopologyError::Empty);
        }
        let mut set = BTreeSet::new();
        for (a, b) in links {
            if a == b {
                return Err(TopologyError::SelfLink(a));
            }
            if !nodes.contains(&a) || !nodes.contains(&b) {
                return Err(TopologyError::UnknownNode(a, b));
            }
            set.insert((a.min(b), a.max(b)));
        }
        let mut topology = Topology {
            nodes,
            links: set,
            distance: BTreeMap::new(),
        };
        topology.compute_distances()?;
        Ok(topology)
    }

    fn compute_distances(&mut self) -> Result<(), TopologyError> {
        for &from in &self.nodes {
            let mut queue = VecDeque::from([(from, 0u32)]);
            let mut seen = BTreeSet::from([from]);
            while let Some((node, hops)) = queue.pop_front() {
                self.distance.insert((from, node), hops);
                for next in self.neighbors(node) {
                    if seen.insert(next) {
                        queue.push_back((next, hops + 1));
                    }
                }
            }
            if let Some(unreached) = self.nodes.iter().find(|n| !seen.contains(n)) {
                return Err(TopologyError::Disconnected(from, *unreached));
            }
        }
        Ok(())
    }

    /// Every node, in id order.
    pub fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.iter().copied()
    }

    /// Whether `node` is in the topology.
    pub fn contains(&self, node: NodeId) -> bool {
        self.nodes.contains(&node)
    }

    /// Every link, each once as `(smaller, larger)`.
    pub fn links(&self) -> impl Iterator<Item = (NodeId, NodeId)> + '_ {
        self.links.iter().copied()
    }

    /// Whether `a` and `b` are linked.
    pub fn linked(&self, a: NodeId, b: NodeId) -> bool {
        self.links.contains(&(a.min(b), a.max(b)))
    }

    /// The nodes linked to `node`, in id order.
    pub fn neighbors(&self, node: NodeId) -> Vec<NodeId> {
        self.links
            .iter()
            .filter_map(|&(a, b)| match (a == node, b == node) {
                (true, _) => Some(b),
                (_, true) => Some(a),
                _ => None,
            })
            .collect()
    }

    /// Hops from `from` to `to` (0 for the node itself); `None` if either is unknown.
    pub fn distance(&self, from: NodeId, to: NodeId) -> Option<u32> {
        self.distance.get(&(from, to)).copied()
    }

    /// Whether every node is linked to every other.
    pub fn is_full_mesh(&self) -> bool {
        let n = self.nodes.len();
        self.links.len() == n * (n - 1) / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u64) -> NodeId {
        NodeId(i)
    }

    #[test]
    fn chain_distances_and_neighbors() {
        let t = Topology::with_links([n(1), n(2), n(3)], [(n(1), n(2)), (n(3), n(2))]).unwrap();
        assert_eq!(t.neighbors(n(2)), vec![n(1), n(3)]);
        assert_eq!(t.distance(n(1), n(3)), Some(2));
        assert!(!t.is_full_mesh());
        assert!(Topology::full_mesh([n(1), n(2), n(3)])
            .unwrap()
            .is_full_mesh());
    }

    #[test]
    fn refuses_disconnected_and_bad_links() {
        assert_eq!(
            Topology::with_links([n(1), n(2), n(3)], [(n(1), n(2))]),
            Err(TopologyError::Disconnected(n(1), n(3)))
        );
        assert_eq!(
            Topology::with_links([n(1)], [(n(1), n(1))]),
            Err(TopologyError::SelfLink(n(1)))
        );
        assert_eq!(
            Topology::with_links([n(1)], [(n(1), n(9))]),
            Err(TopologyError::UnknownNode(n(1), n(9)))
        );
    }
}
