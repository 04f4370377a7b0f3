//! Local clusters: `braid init` writes configurations and certificates for N regions;
//! `braid cluster up` starts them as child processes and writes `cluster.json`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use braid_protocol::NodeId;
use serde::{Deserialize, Serialize};

use crate::config::{Listen, NodeConfig, PeerConfig, TlsFiles};
use crate::storage::Durability;
use crate::tls;

/// Each region takes this many consecutive ports from the base: RESP, HTTP, QUIC.
pub const PORTS_PER_REGION: u16 = 10;

/// How to lay out a new cluster.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Region names, in order; node ids are 1, 2, ... in this order.
    pub regions: Vec<String>,
    /// Where to write everything.
    pub dir: PathBuf,
    /// Host every node listens on.
    pub host: IpAddr,
    /// First port: region i uses base + 10 i (RESP), + 1 (HTTP), + 2 (QUIC).
    pub base_port: u16,
    /// Links as pairs of region names; full mesh when `None`.
    pub links: Option<Vec<[String; 2]>>,
    /// Durability mode of every node.
    pub durability: Durability,
    /// RESP password of every node, if any.
    pub password: Option<String>,
    /// Let the nodes accept `POST /faults` (for drills; loopback hosts only).
    pub fault_injection: bool,
    /// Let the nodes delete change-log events every region holds (`change-log-gc`).
    pub change_log_gc: bool,
}

/// A region's addresses, as `cluster.json` lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionEntry {
    /// Region name.
    pub name: String,
    /// Node id.
    pub id: u64,
    /// RESP address.
    pub resp: String,
    /// HTTP address.
    pub http: String,
    /// QUIC address.
    pub peer: String,
    /// Process id, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Its configuration file.
    pub config: PathBuf,
}

/// `cluster.json`: how to reach every region of a local cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterFile {
    /// The regions.
    pub regions: Vec<RegionEntry>,
}

impl ClusterFile {
    /// Reads `DIR/cluster.json`.
    pub fn load(dir: &Path) -> Result<ClusterFile, InitError> {
        let path = dir.join("cluster.json");
        let text = std::fs::read_to_string(&path).map_err(|e| InitError::Io(path.clone(), e))?;
        serde_json::from_str(&text)
            .map_err(|e| InitError::Invalid(format!("{}: {e}", path.display())))
    }

    /// Writes `DIR/cluster.json`: whole or not at all (a new file, synced, renamed over the
    /// old one), so that a crash or a full disk midway leaves the last good one.
    pub fn save(&self, dir: &Path) -> Result<(), InitError> {
        let path = dir.join("cluster.json");
        let text =
            serde_json::to_string_pretty(self).map_err(|e| InitError::Invalid(e.to_string()))?;
        // A name of this process's own: two commands saving at once do not write one file.
        let partial = dir.join(format!(".cluster.json.{}.new", std::process::id()));
        let io = |path: &Path| {
            let path = path.to_owned();
            move |e| InitError::Io(path, e)
        };
        let mut file = std::fs::File::create(&partial).map_err(io(&partial))?;
        std::io::Write::write_all(&mut file, (text + "\n").as_bytes()).map_err(io(&partial))?;
        file.sync_all().map_err(io(&partial))?;
        drop(file);
        std::fs::rename(&partial, &path).map_err(io(&path))?;
        // The rename itself is durable once the directory is synced.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))
    }
}

/// `init` could not lay out the cluster.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A file could not be written or read.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The options or files make no sense.
    #[error("{0}")]
    Invalid(String),
    /// Certificates.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A configuration that would not load.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// `dir` as an absolute path (not resolving links), from the working directory.
fn absolute(dir: &Path) -> Result<PathBuf, InitError> {
    std::path::absolute(dir).map_err(|e| InitError::Io(dir.to_owned(), e))
}

/// Writes a file, synced; a `secret` one (a key, a configuration with a password) is readable
/// by its owner only before anything is written to it.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), InitError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e| InitError::Io(path.to_owned(), e);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io)?;
    if secret {
        // A file that existed before keeps its mode through `open`: set it before writing.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    std::io::Write::write_all(&mut file, contents.as_bytes()).map_err(io)?;
    // Markers among these files decide how a node starts: on disk before anything that
    // follows them (cluster.json, whose save syncs the directory).
    file.sync_all().map_err(io)
}

/// Writes a CA, one certificate and one configuration per region, and `cluster.json`.
/// Refuses to overwrite an existing cluster in `dir`.
pub fn init(options: &InitOptions) -> Result<ClusterFile, InitError> {
    let n = options.regions.len();
    if n == 0 {
        return Err(InitError::Invalid("at least one region is needed".into()));
    }
    for (i, name) in options.regions.iter().enumerate() {
        crate::config::check_region_name(name).map_err(InitError::Invalid)?;
        if options.regions[..i].contains(name) {
            return Err(InitError::Invalid(format!("region {name} appears twice")));
        }
    }
    // Checked before anything is written (the node's configuration refuses it too).
    if options.password.as_deref() == Some("") {
        return Err(InitError::Invalid(
            "the password, when given, must not be empty".into(),
        ));
    }
    if options.fault_injection && !options.host.is_loopback() {
        return Err(InitError::Invalid(format!(
            "fault injection is only for drills on one machine, and {} is not a loopback address",
            options.host
        )));
    }
    let last_port = u32::from(options.base_port) + u32::from(PORTS_PER_REGION) * n as u32;
    if last_port > u32::from(u16::MAX) {
        return Err(InitError::Invalid(format!(
            "base port {} leaves no room for {n} regions",
            options.base_port
        )));
    }
    // cluster.json names every region's configuration by this path: absolute, so that it
    // serves from any working directory.
    let dir = &absolute(&options.dir)?;
    if dir.join("cluster.json").exists() {
        return Err(InitError::Invalid(format!(
            "{} already holds a cluster (cluster.json); choose another directory or remove it",
            options.dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| InitError::Io(dir.clone(), e))?;
    let mut cluster_id = [0u8; 16];
    getrandom::fill(&mut cluster_id)
        .map_err(|e| InitError::Invalid(format!("no randomness: {e}")))?;
    let cluster_hex: String = cluster_id.iter().map(|b| format!("{b:02x}")).collect();
    let ca = tls::generate_ca(&format!("braid cluster {cluster_hex}"))?;
    write_file(&dir.join("ca.pem"), &ca.cert_pem, false)?;
    write_file(&dir.join("ca.key"), &ca.key_pem, true)?;

    let addr = |i: usize, offset: u16| {
        SocketAddr::new(
            options.host,
            options.base_port + PORTS_PER_REGION * i as u16 + offset,
        )
    };
    let mut entries = Vec::new();
    for (i, name) in options.regions.iter().enumerate() {
        let node = NodeId(i as u64 + 1);
        let region_dir = dir.join(name);
        std::fs::create_dir_all(&region_dir).map_err(|e| InitError::Io(region_dir.clone(), e))?;
        let cert = tls::generate_node_cert(&ca, node)?;
        write_file(&region_dir.join("node.pem"), &cert.cert_pem, false)?;
        write_file(&region_dir.join("node.key"), &cert.key_pem, true)?;
        let config = NodeConfig {
            cluster_id: cluster_hex.clone(),
            node_id: node.0,
            region: name.clone(),
            data_dir: PathBuf::from("data"),
            durability: options.durability,
            password: options.password.clone(),
            clock_skew_ms_max: braid_conflict::CLOCK_SKEW_MS_MAX_DEFAULT,
            max_clients: crate::config::MAX_CLIENTS_DEFAULT,
            listen: Listen {
                resp: addr(i, 0),
                http: addr(i, 1),
                peer: addr(i, 2),
            },
            tls: TlsFiles {
                ca_cert: PathBuf::from("../ca.pem"),
                cert: PathBuf::from("node.pem"),
                key: PathBuf::from("node.key"),
            },
            peers: options
                .regions
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, other)| PeerConfig {
                    id: j as u64 + 1,
                    region: other.clone(),
                    address: addr(j, 2),
                    resp: Some(addr(j, 0)),
                    http: Some(addr(j, 1)),
                })
                .collect(),
            links: options.links.clone(),
            change_log_gc: options.change_log_gc,
            change_log_retention_events: Some(crate::config::RETENTION_EVENTS_DEFAULT),
            change_log_retention_secs: Some(crate::config::RETENTION_SECS_DEFAULT),
            fault_injection: options.fault_injection,
        };
        let text =
            toml::to_string_pretty(&config).map_err(|e| InitError::Invalid(e.to_string()))?;
        let path = region_dir.join("braid.toml");
        let header = format!(
            "# Braid node configuration for region {name} (written by `braid init`).\n\
             # Every key is described in docs/operations.md.\n\n"
        );
        write_file(&path, &(header + &text), config.password.is_some())?;
        // What was written must load.
        NodeConfig::load(&path)?;
        entries.push(RegionEntry {
            name: name.clone(),
            id: node.0,
            resp: addr(i, 0).to_string(),
            http: addr(i, 1).to_string(),
            peer: addr(i, 2).to_string(),
            pid: None,
            config: path,
        });
    }
    let file = ClusterFile { regions: entries };
    file.save(dir)?;
    Ok(file)
}

/// Lays out one more region for the cluster in `dir` (made by [`init`]): a node id and ports
/// after every region's so far, a certificate from the cluster's CA key, and a configuration
/// like the first region's (durability, password, garbage collection, fault injection) that
/// lists no peers: the running mesh tells it, when it joins. The region's data directory is
/// marked as not joined yet, so that `braid start` refuses it until `braid join` has admitted
/// it. Appends it to `cluster.json`.
pub fn add_region(dir: &Path, name: &str) -> Result<RegionEntry, InitError> {
    crate::config::check_region_name(name).map_err(InitError::Invalid)?;
    let dir = &absolute(dir)?;
    let mut file = ClusterFile::load(dir)?;
    if file.regions.iter().any(|r| r.name == name) {
        return Err(InitError::Invalid(format!(
            "{} already has a region {name}",
            dir.display()
        )));
    }
    let first = file
        .regions
        .first()
        .ok_or_else(|| InitError::Invalid("cluster.json lists no region".into()))?;
    let template = NodeConfig::load(&first.config)?;
    let parse = |addr: &str| {
        addr.parse::<SocketAddr>()
            .map_err(|e| InitError::Invalid(format!("cluster.json: address {addr}: {e}")))
    };
    let base = parse(&first.resp)?;
    let mut slot = 0u16;
    for region in &file.regions {
        let port = parse(&region.resp)?.port();
        let offset = port.checked_sub(base.port()).ok_or_else(|| {
            InitError::Invalid(format!(
                "cluster.json: region {} listens below the first region's ports",
                region.name
            ))
        })?;
        slot = slot.max(offset / PORTS_PER_REGION + 1);
    }
    let port = |offset: u16| -> Result<SocketAddr, InitError> {
        u32::from(base.port())
            .checked_add(u32::from(slot) * u32::from(PORTS_PER_REGION) + u32::from(offset))
            .and_then(|p| u16::try_from(p).ok())
            .map(|p| SocketAddr::new(base.ip(), p))
            .ok_or_else(|| InitError::Invalid("no ports left above the last region's".into()))
    };
    let node = NodeId(file.regions.iter().map(|r| r.id).max().unwrap_or(0) + 1);
    let read =
        |path: PathBuf| std::fs::read_to_string(&path).map_err(|e| InitError::Io(path.clone(), e));
    let ca = tls::CaPem {
        cert_pem: read(dir.join("ca.pem"))?,
        key_pem: read(dir.join("ca.key"))?,
    };
    let region_dir = dir.join(name);
    if region_dir.exists() {
        return Err(InitError::Invalid(format!(
            "{} exists already; choose another region name or remove it",
            region_dir.display()
        )));
    }
    std::fs::create_dir_all(&region_dir).map_err(|e| InitError::Io(region_dir.clone(), e))?;
    // What fails from here on takes the region's directory with it: the same command, run
    // again once the cause is fixed, lays the region out.
    let laid_out = (|| -> Result<RegionEntry, InitError> {
        let cert = tls::generate_node_cert(&ca, node)?;
        write_file(&region_dir.join("node.pem"), &cert.cert_pem, false)?;
        write_file(&region_dir.join("node.key"), &cert.key_pem, true)?;
        let listen = Listen {
            resp: port(0)?,
            http: port(1)?,
            peer: port(2)?,
        };
        let config = NodeConfig {
            node_id: node.0,
            region: name.to_owned(),
            data_dir: PathBuf::from("data"),
            listen: listen.clone(),
            tls: TlsFiles {
                ca_cert: PathBuf::from("../ca.pem"),
                cert: PathBuf::from("node.pem"),
                key: PathBuf::from("node.key"),
            },
            peers: Vec::new(),
            links: None,
            ..template
        };
        let text =
            toml::to_string_pretty(&config).map_err(|e| InitError::Invalid(e.to_string()))?;
        let path = region_dir.join("braid.toml");
        let header = format!(
            "# Braid node configuration for region {name} (written by `braid add-region`).\n\
             # It lists no peers: the running mesh tells it when it joins (`braid join`).\n\
             # Every key is described in docs/operations.md.\n\n"
        );
        write_file(&path, &(header + &text), config.password.is_some())?;
        let config = NodeConfig::load(&path)?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| InitError::Io(config.data_dir.clone(), e))?;
        for marker in [
            crate::node::JOINED_MARKER,
            crate::node::SNAPSHOT_PENDING_MARKER,
        ] {
            write_file(&config.data_dir.join(marker), "", false)?;
        }
        let entry = RegionEntry {
            name: name.to_owned(),
            id: node.0,
            resp: listen.resp.to_string(),
            http: listen.http.to_string(),
            peer: listen.peer.to_string(),
            pid: None,
            config: path,
        };
        file.regions.push(entry.clone());
        file.save(dir)?;
        Ok(entry)
    })();
    if laid_out.is_err() {
        let _ = std::fs::remove_dir_all(&region_dir);
    }
    laid_out
}

/// Region names for `cluster up --regions N`: a, b, c, ... (then r27, r28, ...).
pub fn default_region_names(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| match i {
            0..=25 => ((b'a' + i as u8) as char).to_string(),
            _ => format!("r{}", i + 1),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_loadable_configs_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let options = InitOptions {
            regions: vec!["us".into(), "eu".into(), "ap".into()],
            dir: dir.path().to_owned(),
            host: "127.0.0.1".parse().unwrap(),
            base_port: 17000,
            links: None,
            durability: Durability::Process,
            password: None,
            fault_injection: false,
            change_log_gc: true,
        };
        let file = init(&options).unwrap();
        assert_eq!(file.regions.len(), 3);
        assert_eq!(file.regions[1].resp, "127.0.0.1:17010");
        let config = NodeConfig::load(&file.regions[2].config).unwrap();
        assert_eq!(
            (config.node_id, config.region.as_str(), config.peers.len()),
            (3, "ap", 2)
        );
        crate::tls::MeshTls::load(&config.tls.ca_cert, &config.tls.cert, &config.tls.key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for key in [dir.path().join("ca.key"), config.tls.key.clone()] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
        // cluster.json is written whole, through a file renamed over it.
        let leftovers = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".new")
            })
            .count();
        assert_eq!(leftovers, 0);
        assert_eq!(ClusterFile::load(dir.path()).unwrap(), file);
        let err = init(&options).unwrap_err().to_string();
        assert!(err.contains("already holds a cluster"), "{err}");
    }

    #[test]
    fn init_refuses_bad_region_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = InitOptions {
            regions: vec!["a".into(), "a".into()],
            dir: dir.path().to_owned(),
            host: "127.0.0.1".parse().unwrap(),
            base_port: 17000,
            links: None,
            durability: Durability::Process,
            password: None,
            fault_injection: false,
            change_log_gc: true,
        };
        assert!(init(&options).unwrap_err().to_string().contains("twice"));
        options.regions = vec!["a b".into()];
        assert!(init(&options)
            .unwrap_err()
            .to_string()
            .contains("region name"));
        // An empty password is refused before a key is written.
        options.regions = vec!["a".into()];
        options.password = Some(String::new());
        let err = init(&options).unwrap_err().to_string();
        assert!(err.contains("must not be empty"), "{err}");
        assert!(
            !dir.path().join("ca.key").exists(),
            "keys written before the refusal"
        );
    }

    #[test]
    fn add_region_that_fails_half_way_can_be_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let options = InitOptions {
            regions: vec!["a".into()],
            dir: dir.path().to_owned(),
            host: "127.0.0.1".parse().unwrap(),
            base_port: 17000,
            links: None,
            durability: Durability::Process,
            password: None,
            fault_injection: false,
            change_log_gc: true,
        };
        init(&options).unwrap();
        // The certificate cannot be made (after the region's directory was): nothing stays.
        let key = dir.path().join("ca.key");
        let good = std::fs::read_to_string(&key).unwrap();
        std::fs::write(&key, "not a key").unwrap();
        assert!(add_region(dir.path(), "b").is_err());
        assert!(
            !dir.path().join("b").exists(),
            "the half-made region is gone"
        );
        std::fs::write(&key, good).unwrap();
        let entry = add_region(dir.path(), "b").unwrap();
        assert_eq!(entry.name, "b");
        assert_eq!(ClusterFile::load(dir.path()).unwrap().regions.len(), 2);
    }

    #[test]
    fn add_region_lays_out_the_next_region_marked_as_not_joined() {
        let dir = tempfile::tempdir().unwrap();
        let options = InitOptions {
            regions: vec!["a".into(), "b".into()],
            dir: dir.path().to_owned(),
            host: "127.0.0.1".parse().unwrap(),
            base_port: 17000,
            links: None,
            durability: Durability::Machine,
            password: None,
            fault_injection: false,
            change_log_gc: false,
        };
        init(&options).unwrap();
        let entry = add_region(dir.path(), "c").unwrap();
        assert_eq!((entry.id, entry.resp.as_str()), (3, "127.0.0.1:17020"));
        let config = NodeConfig::load(&entry.config).unwrap();
        assert!(config.peers.is_empty(), "the mesh tells it its peers");
        assert_eq!(
            config.durability,
            Durability::Machine,
            "like the first region's"
        );
        assert!(!config.change_log_gc, "like the first region's");
        crate::tls::MeshTls::load(&config.tls.ca_cert, &config.tls.cert, &config.tls.key).unwrap();
        for marker in [
            crate::node::JOINED_MARKER,
            crate::node::SNAPSHOT_PENDING_MARKER,
        ] {
            assert!(config.data_dir.join(marker).exists(), "{marker}");
        }
        assert_eq!(ClusterFile::load(dir.path()).unwrap().regions.len(), 3);
        let err = add_region(dir.path(), "c").unwrap_err().to_string();
        assert!(err.contains("already has a region c"), "{err}");
        assert_eq!(add_region(dir.path(), "d").unwrap().id, 4);
    }
}
