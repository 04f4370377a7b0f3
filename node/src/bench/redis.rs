//! The user's alternative, measured in the same run: a Redis primary with replicas (`replicaof`)
//! on loopback, under the same load, with replica lag measured from replication offsets.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::load::command;
use super::{BenchError, LagSummary};

/// How often the lag sampler reads the offsets.
const SAMPLE_EVERY: Duration = Duration::from_millis(1);
/// Offsets waiting for the replicas, at most (older ones are dropped: a replica that far behind
/// shows up in the maximum anyway).
const SAMPLES_PENDING_MAX: usize = 100_000;
/// Largest INFO reply read.
const INFO_BYTES_MAX: usize = 1024 * 1024;
/// After the writers stop, how long the sampler waits for the replicas to reach the last offsets.
const LAG_DRAIN_MAX: Duration = Duration::from_secs(5);
/// Timeout of one request to a Redis server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long Redis gets to start and to attach its replicas.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// What the Redis run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RedisResult {
    /// `redis-server --version`.
    pub version: String,
    /// Replicas of the primary.
    pub replicas: usize,
    /// Writes acknowledged per second by the primary.
    pub writes_per_s: f64,
    /// Time from a write's offset at the primary to the replica reaching it, polled every
    /// millisecond: percentiles over every replica.
    pub replica_lag_ms: LagSummary,
    /// The configuration used.
    pub config: String,
}

/// The redis-server binary, if one is installed.
pub fn find_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
}

/// Persistence off, as a cache or a primary relying on its replicas would run: the most
/// favourable setting for Redis's throughput.
pub const CONFIG: &str = "save \"\", appendonly no";

/// A running primary and its replicas; killed when dropped.
#[derive(Debug)]
pub struct RedisSet {
    /// The primary's address.
    pub primary: SocketAddr,
    /// The replicas' addresses.
    pub replicas: Vec<SocketAddr>,
    /// `redis-server --version`.
    pub version: String,
    _children: Vec<Child>,
}

fn free_port() -> Result<u16, BenchError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError::Redis(format!("no free port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| BenchError::Redis(format!("no free port: {e}")))
}

/// Starts a primary and `replicas` replicas in `dir`, and waits until every replica is attached.
pub async fn start(server: &Path, dir: &Path, replicas: usize) -> Result<RedisSet, BenchError> {
    let version = std::process::Command::new(server)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .map_err(|e| BenchError::Redis(format!("{}: {e}", server.display())))?;
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..=replicas {
        let port = free_port()?;
        let node_dir = dir.join(format!("redis-{i}"));
        std::fs::create_dir_all(&node_dir)
            .map_err(|e| BenchError::Redis(format!("{}: {e}", node_dir.display())))?;
        let mut cmd = Command::new(server);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&node_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if i > 0 {
            let primary: &SocketAddr = &addrs[0];
            cmd.args(["--replicaof", "127.0.0.1", &primary.port().to_string()]);
        }
        children.push(
            cmd.spawn()
                .map_err(|e| BenchError::Redis(format!("cannot start redis-server: {e}")))?,
        );
        addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
        wait_ping(addrs[i]).await?;
    }
    let set = RedisSet {
        primary: addrs[0],
        replicas: addrs[1..].to_vec(),
        version,
        _children: children,
    };
    let deadline = Instant::now() + START_TIMEOUT;
    for replica in &set.replicas {
        let mut conn = connect(*replica).await?;
        while !info(&mut conn).await?.contains("master_link_status:up") {
            if Instant::now() > deadline {
                return Err(BenchError::Redis(format!(
                    "replica {replica} did not attach to its primary"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(set)
}

async fn wait_ping(addr: SocketAddr) -> Result<(), BenchError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let ping = async {
            let mut conn = TcpStream::connect(addr).await.ok()?;
            conn.write_all(b"PING\r\n").await.ok()?;
            let mut reply = [0u8; 7];
            conn.read_exact(&mut reply).await.ok()?;
            (&reply == b"+PONG\r\n").then_some(())
        };
        if let Ok(Some(())) = tokio::time::timeout(Duration::from_secs(1), ping).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Redis(format!(
                "redis-server on {addr} did not start"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, BenchError> {
    let conn = TcpStream::connect(addr)
        .await
        .map_err(|e| BenchError::Redis(format!("{addr}: {e}")))?;
    let _ = conn.set_nodelay(true);
    Ok(conn)
}

/// `INFO replication`, as text.
async fn info(conn: &mut TcpStream) -> Result<String, BenchError> {
    tokio::time::timeout(REQUEST_TIMEOUT, info_inner(conn))
        .await
        .map_err(|_| BenchError::Redis(format!("INFO: no answer within {REQUEST_TIMEOUT:?}")))?
}

async fn info_inner(conn: &mut TcpStream) -> Result<String, BenchError> {
    let io = |e: std::io::Error| BenchError::Redis(format!("INFO: {e}"));
    let mut request = Vec::new();
    command(&mut request, &[b"INFO", b"replication"]);
    conn.write_all(&request).await.map_err(io)?;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(BenchError::Redis("INFO: connection closed".into()));
        }
        buffer.extend_from_slice(&chunk[..n]);
        if buffer.len() > INFO_BYTES_MAX + 64 {
            return Err(BenchError::Redis("INFO: reply too large".into()));
        }
        if let Some(header_end) = buffer.iter().position(|b| *b == b'\n') {
            let header = String::from_utf8_lossy(&buffer[..header_end]);
            let len: usize = header
                .trim()
                .strip_prefix('$')
                .and_then(|l| l.parse().ok())
                .filter(|l| *l <= INFO_BYTES_MAX)
                .ok_or_else(|| BenchError::Redis(format!("INFO: unexpected reply {header:?}")))?;
            let end = header_end + 1 + len + 2;
            if buffer.len() >= end {
                return Ok(String::from_utf8_lossy(&buffer[header_end + 1..end - 2]).into_owned());
            }
        }
    }
}

fn offset(info: &str, field: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// Samples replica lag until `stop`, then until the replicas reached the last sampled offsets
/// (at most [`LAG_DRAIN_MAX`]): about every millisecond (each sample is one INFO round trip per
/// server) it notes the primary's offset, and for each earlier sample records how long the
/// replicas took to reach it.
pub async fn sample_lag(
    set: &RedisSet,
    mut stop: watch::Receiver<bool>,
) -> Result<Histogram<u64>, BenchError> {
    let mut primary = connect(set.primary).await?;
    let mut replicas = Vec::new();
    for addr in &set.replicas {
        replicas.push((connect(*addr).await?, VecDeque::<(Instant, u64)>::new()));
    }
    let mut histogram = super::lag_histogram();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last = 0;
    let mut stopping: Option<Instant> = None;
    loop {
        match stopping {
            None => tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => stopping = Some(Instant::now()),
            },
            Some(since) => {
                let drained = replicas.iter().all(|(_, pending)| pending.is_empty());
                if drained || since.elapsed() > LAG_DRAIN_MAX {
                    return Ok(histogram);
                }
                tick.tick().await;
            }
        }
        let now = Instant::now();
        let at = offset(&info(&mut primary).await?, "master_repl_offset").unwrap_or(0);
        for (conn, pending) in &mut replicas {
            if at > last && stopping.is_none() {
                if pending.len() >= SAMPLES_PENDING_MAX {
                    pending.pop_front();
                }
                pending.push_back((now, at));
            }
            let reached = offset(&info(conn).await?, "slave_repl_offset").unwrap_or(0);
            let seen = Instant::now();
            while let Some((sent, wanted)) = pending.front().copied() {
                if wanted > reached {
                    break;
                }
                pending.pop_front();
                let lag_us = seen.duration_since(sent).as_micros() as u64;
                histogram.saturating_record(lag_us.max(1));
            }
        }
        last = last.max(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_read_from_info_text() {
        let info =
            "# Replication\r\nrole:slave\r\nslave_repl_offset:4242\r\nmaster_repl_offset:4300\r\n";
        assert_eq!(offset(info, "slave_repl_offset"), Some(4242));
        assert_eq!(offset(info, "master_repl_offset"), Some(4300));
        assert_eq!(offset(info, "missing"), None);
    }
}
