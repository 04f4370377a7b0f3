//! The load generator: clients that write through RESP with pipelining, to Braid regions or to a
//! Redis primary alike.
//!
//! Every client owns one connection, sends `pipeline` commands, then reads their replies (all
//! single-line: `+OK`, `:n` or `-ERR ...`), and repeats until told to stop. Keys are drawn from a
//! private key space per region, or, with probability `conflict_ratio`, from a space every region
//! writes (the conflicting writes). Each command type has its own key prefix, so the mix never
//! produces type errors.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::BenchError;

/// Largest pipeline a client may use: a batch of replies is read into one buffer.
pub const PIPELINE_MAX: usize = 1024;
/// A reply line longer than this is not one of the replies these commands get.
const REPLY_LINE_BYTES_MAX: usize = 64 * 1024;
/// A server that answers nothing for this long is taken as stalled, and the bench fails.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Members per set and fields per hash the workload cycles through (bounds their size).
const MEMBERS: u64 = 64;
/// Batch round-trip histogram: 1 µs to 60 s.
const ROUND_TRIP_US_MAX: u64 = 60_000_000;

/// A command type of the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MixOp {
    /// `SET key value` (a last-writer-wins string).
    Set,
    /// `INCR key` (a counter).
    Incr,
    /// `SADD key member` (an add-wins set).
    Sadd,
    /// `HSET key field value` (a hash).
    Hset,
}

impl std::str::FromStr for MixOp {
    type Err = String;

    fn from_str(s: &str) -> Result<MixOp, String> {
        match s.to_ascii_lowercase().as_str() {
            "set" => Ok(MixOp::Set),
            "incr" => Ok(MixOp::Incr),
            "sadd" => Ok(MixOp::Sadd),
            "hset" => Ok(MixOp::Hset),
            other => Err(format!(
                "unknown command {other:?} in the mix: use set, incr, sadd, hset"
            )),
        }
    }
}

impl MixOp {
    fn prefix(self) -> &'static str {
        match self {
            MixOp::Set => "s",
            MixOp::Incr => "c",
            MixOp::Sadd => "t",
            MixOp::Hset => "h",
        }
    }
}

/// What every client does.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Connections per target.
    pub clients: usize,
    /// Commands in flight per connection.
    pub pipeline: usize,
    /// Bytes per SET/HSET value.
    pub value_size: usize,
    /// Keys per key space.
    pub keys: u64,
    /// Command types, drawn uniformly.
    pub mix: Vec<MixOp>,
    /// Share of writes to the key space every region writes.
    pub conflict_ratio: f64,
    /// Writes per second per target, or unlimited.
    pub rate_per_target: Option<u64>,
    /// RESP password, if the servers want one.
    pub password: Option<String>,
    /// Seed of the key choice.
    pub seed: u64,
}

/// A server to write to: its name (used as its private key space) and RESP address.
#[derive(Debug, Clone)]
pub struct Target {
    /// Region name (the private key space).
    pub name: String,
    /// RESP address.
    pub addr: SocketAddr,
}

/// Counters the clients update as they go (read for the progress line).
#[derive(Debug, Default)]
pub struct LoadCounters {
    /// Writes acknowledged without error.
    pub acked: AtomicU64,
    /// Writes answered with an error.
    pub errors: AtomicU64,
}

/// What the clients of one target did.
#[derive(Debug, Clone)]
pub struct TargetResult {
    /// The target's name.
    pub name: String,
    /// Writes acknowledged without error.
    pub acked: u64,
    /// Writes answered with an error.
    pub errors: u64,
    /// Round trips of whole pipelines, microseconds.
    pub round_trip_us: Histogram<u64>,
    /// The first error reply, if any.
    pub first_error: Option<String>,
}

fn round_trip_histogram() -> Histogram<u64> {
    // Valid bounds (1 <= low, high >= 2 * low, sigfig <= 5): construction cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, ROUND_TRIP_US_MAX, 3).expect("valid histogram bounds")
}

/// Runs `spec.clients` clients against every target until `stop` turns true; returns per target
/// what they did. Fails if a client cannot connect or a connection breaks.
pub async fn drive(
    targets: &[Target],
    spec: &LoadSpec,
    counters: Arc<LoadCounters>,
    stop: watch::Receiver<bool>,
) -> Result<Vec<TargetResult>, BenchError> {
    if spec.mix.is_empty() || spec.clients == 0 || spec.pipeline == 0 {
        return Err(BenchError::Load(
            "a load needs clients, a pipeline and a command mix".into(),
        ));
    }
    let mut tasks = Vec::new();
    for (t, target) in targets.iter().enumerate() {
        for c in 0..spec.clients {
            let client = Client {
                target: target.clone(),
                spec: spec.clone(),
                counters: counters.clone(),
                rng: ChaCha8Rng::seed_from_u64(
                    spec.seed ^ ((t as u64) << 32) ^ (c as u64).wrapping_mul(0x9E37_79B9),
                ),
            };
            tasks.push((t, tokio::spawn(client.run(stop.clone()))));
        }
    }
    let mut results: Vec<TargetResult> = targets
        .iter()
        .map(|t| TargetResult {
            name: t.name.clone(),
            acked: 0,
            errors: 0,
            round_trip_us: round_trip_histogram(),
            first_error: None,
        })
        .collect();
    let handles: Vec<_> = tasks.iter().map(|(_, task)| task.abort_handle()).collect();
    // One client failing fails the load: the others are stopped, not left writing.
    let abort_all = |err: BenchError| {
        handles.iter().for_each(|h| h.abort());
        err
    };
    for (t, task) in tasks {
        let done = task
            .await
            .map_err(|e| abort_all(BenchError::Load(format!("a client task failed: {e}"))))?
            .map_err(abort_all)?;
        let result = &mut results[t];
        result.acked += done.acked;
        result.errors += done.errors;
        result.first_error = result.first_error.take().or(done.first_error);
        result
            .round_trip_us
            .add(&done.round_trip_us)
            .map_err(|e| BenchError::Load(format!("histogram: {e}")))?;
    }
    Ok(results)
}

struct Client {
    target: Target,
    spec: LoadSpec,
    counters: Arc<LoadCounters>,
    rng: ChaCha8Rng,
}

impl Client {
    async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<TargetResult, BenchError> {
        let name = self.target.name.clone();
        let addr = self.target.addr;
        let broken =
            |e: std::io::Error| BenchError::Load(format!("connection to {name} ({addr}): {e}"));
        let mut stream = TcpStream::connect(addr).await.map_err(broken)?;
        stream.set_nodelay(true).map_err(broken)?;
        let mut replies = Replies::default();
        if let Some(password) = &self.spec.password {
            let mut auth = Vec::new();
            command(&mut auth, &[b"AUTH", password.as_bytes()]);
            stream.write_all(&auth).await.map_err(broken)?;
            let (_, error) = replies.read(&mut stream, 1).await.map_err(broken)?;
            if let Some(error) = error {
                return Err(BenchError::Load(format!("AUTH refused by {name}: {error}")));
            }
        }
        let mut result = TargetResult {
            name: name.clone(),
            acked: 0,
            errors: 0,
            round_trip_us: round_trip_histogram(),
            first_error: None,
        };
        let value = vec![b'v'; self.spec.value_size];
        let mut buffer = Vec::with_capacity(self.spec.pipeline * (64 + value.len()));
        // Rate limit: each client sends its pipelines evenly spaced.
        let mut pace = self.spec.rate_per_target.map(|rate| {
            let per_client = (rate as f64 / self.spec.clients as f64).max(1.0);
            let period = Duration::from_secs_f64(self.spec.pipeline as f64 / per_client);
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        while !*stop.borrow() {
            if let Some(interval) = pace.as_mut() {
                tokio::select! {
                    _ = interval.tick() => {}
                    _ = stop.changed() => break,
                }
            }
            buffer.clear();
            for _ in 0..self.spec.pipeline {
                self.next_command(&mut buffer, &value);
            }
            let started = Instant::now();
            stream.write_all(&buffer).await.map_err(broken)?;
            let (errors, first) = replies
                .read(&mut stream, self.spec.pipeline)
                .await
                .map_err(broken)?;
            result
                .round_trip_us
                .saturating_record(started.elapsed().as_micros().max(1) as u64);
            let acked = (self.spec.pipeline - errors) as u64;
            result.acked += acked;
            result.errors += errors as u64;
            if result.first_error.is_none() {
                result.first_error = first;
            }
            self.counters.acked.fetch_add(acked, Ordering::Relaxed);
            self.counters
                .errors
                .fetch_add(errors as u64, Ordering::Relaxed);
        }
        Ok(result)
    }

    fn next_command(&mut self, out: &mut Vec<u8>, value: &[u8]) {
        let op = self.spec.mix[(self.rng.next_u64() % self.spec.mix.len() as u64) as usize];
        let shared = (self.rng.next_u64() as f64 / u64::MAX as f64) < self.spec.conflict_ratio;
        let space = if shared { "x" } else { &self.target.name };
        let index = self.rng.next_u64() % self.spec.keys.max(1);
        let key = format!("b:{}:{space}:{index}", op.prefix());
        let pick = self.rng.next_u64() % MEMBERS;
        match op {
            MixOp::Set => command(out, &[b"SET", key.as_bytes(), value]),
            MixOp::Incr => command(out, &[b"INCR", key.as_bytes()]),
            MixOp::Sadd => command(
                out,
                &[b"SADD", key.as_bytes(), format!("m{pick}").as_bytes()],
            ),
            MixOp::Hset => command(
                out,
                &[
                    b"HSET",
                    key.as_bytes(),
                    format!("f{pick}").as_bytes(),
                    value,
                ],
            ),
        }
    }
}

/// Appends one RESP command (an array of bulk strings) to `out`.
pub fn command(out: &mut Vec<u8>, parts: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
    for part in parts {
        out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads single-line replies, keeping what arrives past the last one for the next call.
#[derive(Debug, Default)]
struct Replies {
    buffer: Vec<u8>,
}

impl Replies {
    /// Reads `count` single-line replies; returns how many were errors and the first error's
    /// text.
    async fn read(
        &mut self,
        stream: &mut TcpStream,
        count: usize,
    ) -> std::io::Result<(usize, Option<String>)> {
        let mut seen = 0;
        let mut errors = 0;
        let mut first = None;
        let mut start = 0;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            while seen < count {
                let Some(end) = self.buffer[start..].iter().position(|b| *b == b'\n') else {
                    break;
                };
                let line = &self.buffer[start..start + end];
                match line.first() {
                    Some(b'+') | Some(b':') => {}
                    Some(b'-') => {
                        errors += 1;
                        if first.is_none() {
                            first = Some(String::from_utf8_lossy(&line[1..]).trim().to_owned());
                        }
                    }
                    _ => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "unexpected reply {:?}",
                                String::from_utf8_lossy(&line[..line.len().min(40)])
                            ),
                        ))
                    }
                }
                seen += 1;
                start += end + 1;
            }
            if seen == count {
                self.buffer.drain(..start);
                return Ok((errors, first));
            }
            if self.buffer.len() - start > REPLY_LINE_BYTES_MAX {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a reply line longer than any expected reply",
                ));
            }
            let n = tokio::time::timeout(REPLY_TIMEOUT, stream.read(&mut chunk))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no reply within {REPLY_TIMEOUT:?}"),
                    )
                })??;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_resp_arrays() {
        let mut out = Vec::new();
        command(&mut out, &[b"SET", b"k", b"vv"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nvv\r\n");
    }

    #[test]
    fn mix_names_parse_and_unknown_ones_are_refused() {
        assert_eq!("SADD".parse::<MixOp>(), Ok(MixOp::Sadd));
        assert!("get".parse::<MixOp>().unwrap_err().contains("set, incr"));
    }
}
