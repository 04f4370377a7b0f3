//! Local clusters as processes: start every region of a `cluster.json` as a child process, wait
//! until they serve and are meshed, and stop them. Used by `braid cluster up` and `braid bench`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::cluster::{ClusterFile, RegionEntry};
use crate::http::Status;

/// How long a stopping region gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Starting or watching regions failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A file or process could not be opened or started.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// A region exited while starting.
    #[error("region {region} exited during start-up ({status}); see {log}{tail}")]
    Exited {
        /// The region.
        region: String,
        /// How it exited.
        status: std::process::ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// Its log's last lines (see [`log_tail`]): a temporary cluster's log is gone by the
        /// time someone reads the error.
        tail: String,
    },
    /// A region did not answer its health check in time.
    #[error("region {region} did not become healthy within {timeout:?}")]
    Unhealthy {
        /// The region.
        region: String,
        /// How long it was given.
        timeout: Duration,
    },
    /// `cluster.json` holds an address that does not parse.
    #[error("region {region}: bad address {addr:?}")]
    Address {
        /// The region.
        region: String,
        /// The address.
        addr: String,
    },
}

/// The log file of a region: `braid.log` beside its configuration.
pub fn log_path(config: &Path) -> PathBuf {
    config.parent().unwrap_or(Path::new(".")).join("braid.log")
}

/// Starts `exe start --config ...` for every region, logging to its `braid.log`, and records the
/// pids in `file`. Detached children get their own process group (a later Ctrl-C in this
/// terminal does not reach them); attached ones are killed when their handle is dropped.
pub fn spawn(
    file: &mut ClusterFile,
    exe: &Path,
    detach: bool,
) -> Result<Vec<tokio::process::Child>, LaunchError> {
    let mut children = Vec::with_capacity(file.regions.len());
    for i in 0..file.regions.len() {
        match spawn_region(&mut file.regions[i], exe, detach) {
            Ok(child) => children.push(child),
            Err(err) => {
                // The regions started so far are stopped: detached, nothing else would, and
                // cluster.json (not written yet) would not know them.
                for (child, region) in children.iter_mut().zip(&mut file.regions) {
                    let _ = child.start_kill();
                    region.pid = None;
                }
                return Err(err);
            }
        }
    }
    Ok(children)
}

/// Starts one region (see [`spawn`]) and records its pid.
pub fn spawn_region(
    region: &mut RegionEntry,
    exe: &Path,
    detach: bool,
) -> Result<tokio::process::Child, LaunchError> {
    spawn_region_with_env(region, exe, detach, &[])
}

/// [`spawn_region`], with extra environment variables for the process.
pub fn spawn_region_with_env(
    region: &mut RegionEntry,
    exe: &Path,
    detach: bool,
    env: &[(&str, &str)],
) -> Result<tokio::process::Child, LaunchError> {
    spawn_node(region, exe, detach, env, None)
}

/// Starts a region laid out by `braid add-region` with `braid join --via VIA` (the HTTP admin
/// address of a member), which admits it and runs its node; records its pid. Its output goes to
/// its `braid.log`, as a started region's does.
pub fn spawn_join_with_env(
    region: &mut RegionEntry,
    exe: &Path,
    via: SocketAddr,
    env: &[(&str, &str)],
) -> Result<tokio::process::Child, LaunchError> {
    spawn_node(region, exe, false, env, Some(via))
}

fn spawn_node(
    region: &mut RegionEntry,
    exe: &Path,
    detach: bool,
    env: &[(&str, &str)],
    join_via: Option<SocketAddr>,
) -> Result<tokio::process::Child, LaunchError> {
    let log_file = log_path(&region.config);
    let io = |e| LaunchError::Io(log_file.display().to_string(), e);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_file)
        .map_err(io)?;
    // Where this run's lines begin: what an error quotes of the log comes after it.
    std::io::Write::write_all(
        &mut log,
        format!("{LOG_RUN_MARK}{}\n", region.name).as_bytes(),
    )
    .map_err(io)?;
    let mut command = tokio::process::Command::new(exe);
    match join_via {
        None => command.arg("start"),
        Some(via) => command.arg("join").arg("--via").arg(via.to_string()),
    };
    command
        .arg("--config")
        .arg(&region.config)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io)?)
        .stderr(log);
    if detach {
        command.process_group(0);
    } else {
        command.kill_on_drop(true);
        stop_with_parent(&mut command);
    }
    let child = command
        .spawn()
        .map_err(|e| LaunchError::Io(format!("cannot start region {}", region.name), e))?;
    region.pid = child.id();
    Ok(child)
}

/// Has the child told SIGTERM when this process dies without stopping it (SIGKILL, the OOM
/// killer), which dropping it cannot do: a node it started then stops cleanly instead of holding
/// its ports after it. (The signal follows the thread that started the child: here a runtime's
/// worker, which lives as long as the process.)
fn stop_with_parent(command: &mut tokio::process::Command) {
    let parent = std::process::id();
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the child between fork and exec, and calls only prctl(2) and
    // getppid(2) and makes errors from OS codes: nothing that allocates or takes a lock.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Died before the call: nobody would send the signal.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

fn http_addr(region: &RegionEntry) -> Result<SocketAddr, LaunchError> {
    region.http.parse().map_err(|_| LaunchError::Address {
        region: region.name.clone(),
        addr: region.http.clone(),
    })
}

/// Waits until every region's process answers `/health` with its own pid; fails if one exits
/// or takes longer than `timeout`.
pub async fn wait_healthy(
    file: &ClusterFile,
    children: &mut [tokio::process::Child],
    timeout: Duration,
) -> Result<(), LaunchError> {
    let deadline = Instant::now() + timeout;
    for (region, child) in file.regions.iter().zip(children.iter_mut()) {
        let addr = http_addr(region)?;
        loop {
            let exited = child
                .try_wait()
                .map_err(|e| LaunchError::Io(format!("region {}", region.name), e))?;
            if let Some(status) = exited {
                let log = log_path(&region.config);
                return Err(LaunchError::Exited {
                    region: region.name.clone(),
                    status,
                    tail: log_tail(&log),
                    log,
                });
            }
            // Healthy once the node this started answers: another process on the same port
            // (a cluster already running there) is not it, and this one will fail to bind.
            if let Ok(body) =
                crate::admin_client::get(addr, "/health", Duration::from_millis(500)).await
            {
                let pid = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|status| status["pid"].as_u64());
                if pid.is_some() && pid == child.id().map(u64::from) {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(LaunchError::Unhealthy {
                    region: region.name.clone(),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Waits until every region reports every neighbor connected, so the first write replicates at
/// once. Returns the regions that were still not connected to all their peers at `timeout`.
pub async fn wait_meshed(file: &ClusterFile, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut late = Vec::new();
    for region in &file.regions {
        let Ok(addr) = http_addr(region) else {
            late.push(region.name.clone());
            continue;
        };
        loop {
            let meshed =
                match crate::admin_client::get(addr, "/status", Duration::from_secs(1)).await {
                    Ok(body) => serde_json::from_str::<Status>(&body)
                        .is_ok_and(|s| s.peers.iter().all(|p| p.state == "connected")),
                    Err(_) => false,
                };
            if meshed {
                break;
            }
            if Instant::now() > deadline {
                late.push(region.name.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    late
}

/// Lines of a log an error quotes.
const LOG_TAIL_LINES: usize = 5;

/// The end of a log an error reads: the last run's lines, or that much of them.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// The line a started region's log gets before each run's own lines.
const LOG_RUN_MARK: &str = "--- braid started region ";

/// What an error about a region that exited quotes of its log at `path`, as a few indented
/// lines after a newline (nothing if it cannot be read): the node's last `Error:` and the
/// causes under it (not a backtrace after them), or else the log's last lines.
pub fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let length = file.metadata().map_or(0, |m| m.len());
    let mut bytes = Vec::new();
    let read = file
        .seek(SeekFrom::Start(length.saturating_sub(LOG_TAIL_BYTES)))
        .and_then(|_| file.read_to_end(&mut bytes));
    if read.is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    // This run's lines only: an earlier run's error is not this one's.
    let run = text.rsplit(LOG_RUN_MARK).next().unwrap_or(&text);
    let lines: Vec<&str> = run
        .lines()
        .skip(usize::from(run.len() < text.len()))
        .filter(|l| !l.trim().is_empty())
        .collect();
    let quoted = match lines.iter().rposition(|l| l.starts_with("Error: ")) {
        Some(at) => lines[at..]
            .iter()
            .take_while(|l| !l.starts_with("Stack backtrace:"))
            .take(LOG_TAIL_LINES)
            .copied()
            .collect::<Vec<_>>(),
        None => lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].to_vec(),
    };
    quoted
        .iter()
        .map(|line| format!("\n    {line}"))
        .collect::<String>()
}

/// Whether process `pid` exists (signal 0 touches nothing).
pub fn alive(pid: u32) -> bool {
    signal(pid, 0)
}

/// Sends `signal` to `pid`; false if there is no such process (or no permission).
pub fn signal(pid: u32, signal: i32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    #[allow(unsafe_code)]
    // SAFETY: kill(2) takes two integers and touches no memory of this process.
    let result = unsafe { libc::kill(pid, signal) };
    result == 0
}

/// The fields of `/proc/PID/stat` from the third (the state) on: what follows the command
/// name's closing parenthesis (a name may hold spaces and parentheses). Field `n` of proc(5)
/// is at `n - 3`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit(')').next()?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// A child that exited but was not reaped yet still answers signal 0.
pub fn zombie(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|fields| fields.first().is_some_and(|state| state == "Z"))
}

/// The pid `cluster.json` records for `region`, if that process is still the region's node:
/// alive, and started with `--config` and the region's configuration (its
/// `/proc/PID/cmdline`). A pid left from before a reboot, or taken since by another program
/// (an editor open on the configuration, say), is none of the cluster's business and is never
/// signalled.
pub fn running_pid(region: &RegionEntry) -> Option<u32> {
    use std::os::unix::ffi::OsStrExt;
    let pid = region.pid.filter(|&pid| pid > 0)?;
    if !alive(pid) || zombie(pid) {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let config = region.config.as_os_str().as_bytes();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"--config" && w[1] == config)
        .then_some(pid)
}

/// When process `pid` started (clock ticks since boot, `/proc/PID/stat` field 22): with the
/// pid, it names one process, where a pid alone may be reused.
fn started_ticks(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

/// SIGTERM every region of `file` still running (see [`running_pid`]), wait up to
/// [`STOP_GRACE`], then SIGKILL what is left. Each process is known by its pid and start time:
/// a pid another process took meanwhile is not waited for or killed.
pub async fn stop(file: &ClusterFile) {
    let nodes: Vec<(u32, Option<u64>)> = file
        .regions
        .iter()
        .filter_map(running_pid)
        .map(|pid| (pid, started_ticks(pid)))
        .collect();
    for (pid, _) in &nodes {
        signal(*pid, libc::SIGTERM);
    }
    let running = |&(pid, started): &(u32, Option<u64>)| {
        alive(pid) && !zombie(pid) && started_ticks(pid) == started
    };
    let deadline = Instant::now() + STOP_GRACE;
    while nodes.iter().any(running) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (pid, _) in nodes.iter().filter(|node| running(node)) {
        signal(*pid, libc::SIGKILL);
    }
}

/// CPU time and peak resident memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessUsage {
    /// User plus system CPU seconds.
    pub cpu_s: f64,
    /// Peak resident set size, bytes (`VmHWM`).
    pub peak_rss_bytes: u64,
    /// Resident set size now, bytes (`VmRSS`).
    pub rss_bytes: u64,
}

/// Reads [`ProcessUsage`] of `pid`, or `None` if it is gone or `/proc` is unreadable.
pub fn usage(pid: u32) -> Option<ProcessUsage> {
    // utime is field 14, stime 15.
    let fields = stat_fields(pid)?;
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    #[allow(unsafe_code)]
    // SAFETY: sysconf(3) reads a configuration value and touches no memory of this process.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |field: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some(ProcessUsage {
        cpu_s: (utime + stime) as f64 / ticks,
        peak_rss_bytes: kib("VmHWM:")? * 1024,
        rss_bytes: kib("VmRSS:")? * 1024,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_of_this_process_is_read() {
        let usage = usage(std::process::id()).expect("own /proc entry");
        assert!(usage.peak_rss_bytes > 0);
        assert!(usage.rss_bytes > 0 && usage.rss_bytes <= usage.peak_rss_bytes);
        assert!(usage.cpu_s >= 0.0);
    }

    #[test]
    fn a_pid_is_a_regions_node_only_if_it_runs_with_its_configuration() {
        let config = std::path::PathBuf::from("/abs/braid-cluster/a/braid.toml");
        // `sh -c CMD NAME ARG`: NAME and ARG land in the command line as given.
        let spawn = |name: &str| {
            std::process::Command::new("sh")
                .args(["-c", "sleep 30", name])
                .arg(&config)
                .spawn()
                .unwrap()
        };
        let entry = |pid: u32| RegionEntry {
            name: "a".into(),
            id: 1,
            resp: String::new(),
            http: String::new(),
            peer: String::new(),
            pid: Some(pid),
            config: config.clone(),
        };
        let mut node = spawn("--config");
        let mut other = spawn("less");
        assert_eq!(running_pid(&entry(node.id())), Some(node.id()));
        assert_eq!(
            running_pid(&entry(other.id())),
            None,
            "the path alone is not enough"
        );
        let started = started_ticks(node.id()).expect("a start time");
        assert_eq!(started_ticks(node.id()), Some(started), "it does not move");
        for child in [&mut node, &mut other] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        assert_eq!(running_pid(&entry(node.id())), None, "gone");
        assert_eq!(started_ticks(u32::MAX), None);
    }

    #[test]
    fn no_usage_for_a_missing_process() {
        assert!(usage(u32::MAX).is_none());
        assert!(!alive(u32::MAX));
    }

    #[test]
    fn a_log_tail_quotes_the_last_run_only_and_its_error_without_the_backtrace() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("braid.log");
        let text =
            format!("{LOG_RUN_MARK}a\nError: an old failure\n{LOG_RUN_MARK}a\nstarting\nkilled\n");
        std::fs::write(&log, &text).unwrap();
        let tail = log_tail(&log);
        assert_eq!(tail, "\n    starting\n    killed");
        let text = format!(
            "{text}{LOG_RUN_MARK}a\nError: node failed\n\nCaused by:\n    0: cannot listen\n\
             Stack backtrace:\n   0: frame\n"
        );
        std::fs::write(&log, text).unwrap();
        assert_eq!(
            log_tail(&log),
            "\n    Error: node failed\n    Caused by:\n        0: cannot listen"
        );
        assert_eq!(log_tail(&dir.path().join("missing.log")), "");
    }
}
