//! Node configuration: a TOML file (kebab-case keys), one per node, written by `braid init`.
//! Relative paths are relative to the file's directory. See `docs/operations.md` for every key.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use braid_protocol::{ClusterId, NodeId, Topology, TopologyError};
use serde::{Deserialize, Serialize};

use crate::storage::Durability;

/// One node's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NodeConfig {
    /// The cluster's id: 32 hex digits, the same in every node's file.
    pub cluster_id: String,
    /// This node's id, unique in the cluster.
    pub node_id: u64,
    /// This node's region name, unique in the cluster.
    pub region: String,
    /// Where the database lives.
    pub data_dir: PathBuf,
    /// `process` (default: survives a process crash) or `machine` (syncs: survives power loss).
    #[serde(default)]
    pub durability: Durability,
    /// When set, RESP clients must `AUTH` with it first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// How far ahead of local time a remote HLC may be, in milliseconds (default 60,000).
    #[serde(default = "default_clock_skew_ms_max")]
    pub clock_skew_ms_max: u64,
    /// Most RESP clients connected at once (default 10,000, as Redis's `maxclients`); one more
    /// is told `ERR max number of clients reached` and closed.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// Addresses this node listens on.
    pub listen: Listen,
    /// Certificates for the mesh's mutual TLS.
    pub tls: TlsFiles,
    /// The other nodes.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// The links between regions; every pair when absent (full mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub links: Option<Vec<[String; 2]>>,
    /// Deletes change-log events every region holds (at or below the stable frontier the
    /// control plane derives from everyone's checkpoints). On by default; `braid drill
    /// --attach` needs it off, since its checks read whole change logs.
    #[serde(default = "default_change_log_gc")]
    pub change_log_gc: bool,
    /// Retention by size: the change log keeps at most this many events, even ones a region
    /// that is down still lacks (it is resynchronised by a data snapshot when it is back).
    /// Default 10,000,000. Only with `change-log-gc`.
    #[serde(default = "default_retention_events")]
    pub change_log_retention_events: Option<u64>,
    /// Retention by age, in seconds: events older than this are deleted likewise. Default
    /// 604,800 (7 days). Only with `change-log-gc`.
    #[serde(default = "default_retention_secs")]
    pub change_log_retention_secs: Option<u64>,
    /// Lets `POST /faults` cut and slow links and skew the clock, for `braid drill`. Off by
    /// default; refused unless every address in the file is a loopback address, so that a
    /// production node never carries it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fault_injection: bool,
}

fn default_change_log_gc() -> bool {
    true
}

/// Events a change log keeps at most, by default: at 100-byte values, about 2 GB.
pub const RETENTION_EVENTS_DEFAULT: u64 = 10_000_000;

/// How long a change log keeps events at most, by default: a week.
pub const RETENTION_SECS_DEFAULT: u64 = 7 * 24 * 3600;

fn default_retention_events() -> Option<u64> {
    Some(RETENTION_EVENTS_DEFAULT)
}

fn default_retention_secs() -> Option<u64> {
    Some(RETENTION_SECS_DEFAULT)
}

/// The least `clock-skew-ms-max` may be.
const CLOCK_SKEW_MS_MAX_MIN: u64 = 100;

fn default_clock_skew_ms_max() -> u64 {
    braid_conflict::CLOCK_SKEW_MS_MAX_DEFAULT
}

/// The default of `max-clients`.
pub const MAX_CLIENTS_DEFAULT: usize = 10_000;

/// The most `max-clients` may be.
pub const MAX_CLIENTS_MAX: usize = 1_000_000;

fn default_max_clients() -> usize {
    MAX_CLIENTS_DEFAULT
}

/// Listening addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Listen {
    /// QUIC, for the other nodes (UDP).
    pub peer: SocketAddr,
    /// RESP, for clients (TCP).
    pub resp: SocketAddr,
    /// HTTP admin and metrics (TCP).
    pub http: SocketAddr,
}

/// PEM files for mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA's certificate: peers must present a certificate it signed.
    pub ca_cert: PathBuf,
    /// This node's certificate (its DNS name is `node-<id>`).
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// Another node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PeerConfig {
    /// Its node id.
    pub id: u64,
    /// Its region name.
    pub region: String,
    /// Its QUIC address.
    pub address: SocketAddr,
    /// Its RESP address, for the control plane's list of members (`braid init` writes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resp: Option<SocketAddr>,
    /// Its HTTP admin address, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (with line and column).
        source: Box<toml::de::Error>,
    },
    /// A rule across fields is broken.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The links do not form a usable topology.
    #[error("invalid topology: {0}")]
    Topology(#[from] TopologyError),
}

impl NodeConfig {
    /// Reads, resolves relative paths against the file's directory, and validates.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: NodeConfig =
            toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source: Box::new(source),
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for file in [
            &mut config.data_dir,
            &mut config.tls.ca_cert,
            &mut config.tls.cert,
            &mut config.tls.key,
        ] {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules that span fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        self.cluster_id()?;
        let mut ids = BTreeSet::from([self.node_id]);
        let mut regions = BTreeSet::from([self.region.as_str()]);
        if self.region.is_empty() || self.peers.iter().any(|p| p.region.is_empty()) {
            return invalid("region names must not be empty".into());
        }
        // One address per node: a peer given another's address (or this node's) would be
        // dialled for ever, its certificate naming a different node each time.
        let mut addresses = BTreeSet::from([self.listen.peer]);
        for peer in &self.peers {
            if !ids.insert(peer.id) {
                return invalid(format!("node id {} appears twice", peer.id));
            }
            if !regions.insert(peer.region.as_str()) {
                return invalid(format!("region {} appears twice", peer.region));
            }
            if !addresses.insert(peer.address) {
                return invalid(format!(
                    "peer address {} appears twice (the peers' and listen.peer)",
                    peer.address
                ));
            }
        }
        if self.clock_skew_ms_max < CLOCK_SKEW_MS_MAX_MIN {
            return invalid(format!(
                "clock-skew-ms-max must be at least {CLOCK_SKEW_MS_MAX_MIN}: below it, clocks \
                 that agree as well as NTP keeps them refuse each other's events"
            ));
        }
        if self.change_log_retention_events == Some(0) || self.change_log_retention_secs == Some(0)
        {
            return invalid("change-log-retention-events and -secs must be above 0".into());
        }
        if self.max_clients == 0 || self.max_clients > MAX_CLIENTS_MAX {
            return invalid(format!("max-clients must be 1 to {MAX_CLIENTS_MAX}"));
        }
        if self.password.as_deref() == Some("") {
            return invalid("password, when set, must not be empty".into());
        }
        let listen = [self.listen.peer, self.listen.resp, self.listen.http];
        if listen[1] == listen[2] {
            return invalid("listen.resp and listen.http must differ".into());
        }
        if self.fault_injection {
            let addresses = listen
                .iter()
                .map(|a| ("listen", a))
                .chain(self.peers.iter().map(|p| ("peer", &p.address)));
            for (what, addr) in addresses {
                if !addr.ip().is_loopback() {
                    return invalid(format!(
                        "fault-injection is only for drills on one machine: {what} address \
                         {addr} is not a loopback address"
                    ));
                }
            }
        }
        self.topology()?;
        Ok(())
    }

    /// The cluster id, parsed.
    pub fn cluster_id(&self) -> Result<ClusterId, ConfigError> {
        parse_cluster_id(&self.cluster_id).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "cluster-id {:?} is not 32 hex digits",
                self.cluster_id
            ))
        })
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        NodeId(self.node_id)
    }

    /// The node id of a region name, this node included.
    pub fn node_of_region(&self, region: &str) -> Option<NodeId> {
        if region == self.region {
            return Some(self.node());
        }
        self.peers
            .iter()
            .find(|p| p.region == region)
            .map(|p| NodeId(p.id))
    }

    /// Every node's region name by id, this node included.
    pub fn regions(&self) -> std::collections::BTreeMap<NodeId, String> {
        std::iter::once((self.node(), self.region.clone()))
            .chain(self.peers.iter().map(|p| (NodeId(p.id), p.region.clone())))
            .collect()
    }

    /// The region name of a node id, this node included.
    pub fn region_of(&self, node: NodeId) -> Option<&str> {
        if node == self.node() {
            return Some(&self.region);
        }
        self.peers
            .iter()
            .find(|p| p.id == node.0)
            .map(|p| p.region.as_str())
    }

    /// The topology: the configured links, or a full mesh.
    pub fn topology(&self) -> Result<Topology, ConfigError> {
        let nodes: Vec<NodeId> = std::iter::once(self.node())
            .chain(self.peers.iter().map(|p| NodeId(p.id)))
            .collect();
        match &self.links {
            None => Ok(Topology::full_mesh(nodes)?),
            Some(links) => {
                let mut pairs = Vec::new();
                for [a, b] in links {
                    let (Some(x), Some(y)) = (self.node_of_region(a), self.node_of_region(b))
                    else {
                        return Err(ConfigError::Invalid(format!(
                            "link {a}-{b} names an unknown region"
                        )));
                    };
                    pairs.push((x, y));
                }
                Ok(Topology::with_links(nodes, pairs)?)
            }
        }
    }
}

/// Parses 32 hex digits.
pub fn parse_cluster_id(text: &str) -> Option<ClusterId> {
    if text.len() != 32 || !text.is_ascii() {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(ClusterId(id))
}

/// The longest region name, in bytes.
pub const REGION_NAME_BYTES_MAX: usize = 32;

/// Whether `name` may name a new region: 1 to [`REGION_NAME_BYTES_MAX`] ASCII letters, digits,
/// `-` or `_`. Checked where regions are made (`braid init`, `add-region`, `POST /join`); a
/// node's configuration is not refused for an older name.
pub fn check_region_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= REGION_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    match valid {
        true => Ok(()),
        false => Err(format!(
            "region name {name:?}: use 1-{REGION_NAME_BYTES_MAX} letters, digits, '-' or '_'"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> String {
        r#"
cluster-id = "000102030405060708090a0b0c0d0e0f"
node-id = 1
region = "a"
data-dir = "data"
[listen]
peer = "127.0.0.1:7002"
resp = "127.0.0.1:7000"
http = "127.0.0.1:7001"
[tls]
ca-cert = "../ca.pem"
cert = "node.pem"
key = "node.key"
[[peers]]
id = 2
region = "b"
address = "127.0.0.1:7012"
"#
        .to_owned()
    }

    fn load(text: &str) -> Result<NodeConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("braid.toml");
        std::fs::write(&path, text).unwrap();
        NodeConfig::load(&path)
    }

    #[test]
    fn loads_with_defaults_and_resolves_paths() {
        let config = load(&sample()).unwrap();
        assert_eq!(config.durability, Durability::Process);
        assert_eq!(config.clock_skew_ms_max, 60_000);
        assert!(config.change_log_gc, "garbage collection is on by default");
        assert!(config.data_dir.is_absolute());
        assert!(config.topology().unwrap().is_full_mesh());
    }

    #[test]
    fn refuses_unknown_keys_bad_ids_and_bad_links() {
        let err = load(&(sample() + "\nbogus = 1\n")).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        let err = load(&sample().replace("000102", "zz0102"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cluster-id"), "{err}");
        let err = load(&sample().replace("id = 2", "id = 1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("appears twice"), "{err}");
        let err = load(&sample().replace("node-id = 1", "node-id = 1\nmax-clients = 0"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max-clients must be 1 to 1000000"), "{err}");
        for name in ["", "us east", "a\\\"b", "a\nb", &"x".repeat(33)] {
            let err = check_region_name(name).unwrap_err();
            assert!(err.contains("use 1-32 letters"), "{name:?}: {err}");
        }
        for name in ["a", "us-east-1", "eu_west", &"x".repeat(32)] {
            assert_eq!(check_region_name(name), Ok(()));
        }
        let text = sample().replace("node-id = 1", "node-id = 1\nlinks = [[\"a\", \"z\"]]");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("unknown region"), "{err}");
    }

    #[test]
    fn refuses_a_peer_address_twice_and_a_clock_bound_no_clock_keeps() {
        // b given this node's own peer address.
        let err = load(&sample().replace("127.0.0.1:7012", "127.0.0.1:7002"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("peer address 127.0.0.1:7002 appears twice"),
            "{err}"
        );
        // Two peers at one address.
        let third = sample() + "[[peers]]\nid = 3\nregion = \"c\"\naddress = \"127.0.0.1:7012\"\n";
        let err = load(&third).unwrap_err().to_string();
        assert!(
            err.contains("peer address 127.0.0.1:7012 appears twice"),
            "{err}"
        );
        let skew = |ms: u64| {
            sample().replace(
                "node-id = 1",
                &format!("node-id = 1\nclock-skew-ms-max = {ms}"),
            )
        };
        let err = load(&skew(0)).unwrap_err().to_string();
        assert!(
            err.contains("clock-skew-ms-max must be at least 100"),
            "{err}"
        );
        assert_eq!(load(&skew(100)).unwrap().clock_skew_ms_max, 100);
    }

    #[test]
    fn fault_injection_is_off_by_default_and_refused_off_loopback() {
        assert!(!load(&sample()).unwrap().fault_injection);
        let on = sample().replace("node-id = 1", "node-id = 1\nfault-injection = true");
        assert!(load(&on).unwrap().fault_injection);
        let err = load(&on.replace("127.0.0.1:7012", "10.1.2.3:7012"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("10.1.2.3:7012 is not a loopback address"),
            "{err}"
        );
        let err = load(&on.replace("resp = \"127.0.0.1:7000\"", "resp = \"0.0.0.0:7000\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("0.0.0.0:7000"), "{err}");
    }
}
