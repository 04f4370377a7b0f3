//! One writer per region: the scenario's workload, one command at a time over RESP, at the
//! scenario's rate, recording every outcome. One command in flight per region keeps the
//! region's own events in the order the writer sent them, so that a failure's unknown outcomes
//! are the writes in flight when it happened.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use braid_conflict::Command;
use bytes::Bytes;
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::bench::load::command;
use crate::scenario::Workload;
use crate::workload::{next_command, resp_args, Names};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a reply may take before the write's outcome is unknown.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest reply line read (the workload's replies are a status, an integer or an error).
const REPLY_BYTES_MAX: usize = 4096;

/// What a region's writer saw, shared with the executor.
#[derive(Debug, Default)]
pub struct WriterCounters {
    /// Writes the region acknowledged.
    pub acked: AtomicU64,
    /// Writes the region refused (`WRONGTYPE` and the like): not applied anywhere.
    pub refused: AtomicU64,
    /// Writes whose reply never came (the connection broke or timed out): applied or not.
    pub unknown: AtomicU64,
    /// Writes not sent because the region was down or could not be reached.
    pub unavailable: AtomicU64,
}

impl WriterCounters {
    /// Acknowledged, refused, unknown, unavailable.
    pub fn read(&self) -> [u64; 4] {
        [
            self.acked.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.unknown.load(Ordering::Relaxed),
            self.unavailable.load(Ordering::Relaxed),
        ]
    }
}

/// The acknowledged writes that changed something, kept by the writer: each made exactly one
/// event at its region, so its region's change log must hold at least as many events per key.
#[derive(Debug, Clone, Default)]
pub struct WriterRecord {
    /// Acknowledged writes that made an event, per key.
    pub events_by_key: BTreeMap<Bytes, u64>,
    /// Their total.
    pub events: u64,
    /// Acknowledged writes that may or may not have made one (`INCRBY 0`: an event on a string
    /// key, none on a counter).
    pub maybe_events: u64,
    /// The text of the first write the region refused, if it refused one.
    pub first_refusal: Option<String>,
}

/// Whether an acknowledged command made an event: `SET`, `SADD`, `HSET` always; `INCRBY` when
/// the delta is not 0; `DEL`, `SREM`, `HDEL` when their reply counts something removed.
fn made_event(command: &Command, reply: Option<i64>) -> Option<bool> {
    match command {
        Command::Set(_) | Command::SetAdd(_) | Command::HashSet(_) => Some(true),
        Command::IncrBy(0) => None,
        Command::IncrBy(_) => Some(true),
        Command::Delete | Command::SetRemove(_) | Command::HashDelete(_) => {
            Some(reply.unwrap_or(0) > 0)
        }
    }
}

/// A writer's settings.
#[derive(Debug, Clone)]
pub struct WriterSpec {
    /// The region's RESP address.
    pub addr: SocketAddr,
    /// The scenario's workload.
    pub workload: Workload,
    /// Seed of this region's command sequence.
    pub seed: u64,
    /// The cluster's RESP password, sent with `AUTH` on every new connection.
    pub password: Option<String>,
}

/// Writes until `stop` turns true. While `member` is false the region is outside the mesh (it
/// has not joined yet, or it left): nothing is written and nothing counted. While `up` is false
/// the region is down: scheduled writes are counted as unavailable and the connection is
/// dropped. Returns the record of acknowledged writes that made events.
pub async fn run(
    spec: WriterSpec,
    member: watch::Receiver<bool>,
    up: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    counters: Arc<WriterCounters>,
) -> WriterRecord {
    let mut record = WriterRecord::default();
    let rate = spec.workload.rate_per_region.max(1);
    let mut tick = tokio::time::interval(Duration::from_micros((1_000_000 / rate).max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut conn: Option<TcpStream> = None;
    let mut out = Vec::new();
    let mut names = Names::default();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => {}
            _ = tick.tick() => {}
        }
        if *stop.borrow() {
            return record;
        }
        let (key, cmd) = next_command(&spec.workload, &mut rng, &mut names);
        if !*member.borrow() {
            conn = None;
            continue;
        }
        if !*up.borrow() {
            conn = None;
            counters.unavailable.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let stream = match conn.as_mut() {
            Some(stream) => stream,
            None => {
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(spec.addr)).await {
                    Ok(Ok(mut stream)) => {
                        let _ = stream.set_nodelay(true);
                        if let Some(password) = &spec.password {
                            out.clear();
                            command(&mut out, &[b"AUTH", password.as_bytes()]);
                            let auth =
                                tokio::time::timeout(REPLY_TIMEOUT, round_trip(&mut stream, &out));
                            match auth.await {
                                Ok(Ok(Reply::Done(_))) => {}
                                Ok(Ok(Reply::Refused(text))) => {
                                    record.first_refusal.get_or_insert(text);
                                    counters.refused.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                                _ => {
                                    counters.unavailable.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                            }
                        }
                        conn.insert(stream)
                    }
                    _ => {
                        counters.unavailable.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
            }
        };
        out.clear();
        let args = resp_args(&key, &cmd);
        let parts: Vec<&[u8]> = args.iter().map(|a| a.as_ref()).collect();
        command(&mut out, &parts);
        match tokio::time::timeout(REPLY_TIMEOUT, round_trip(stream, &out)).await {
            Ok(Ok(Reply::Done(reply))) => {
                match made_event(&cmd, reply) {
                    Some(true) => {
                        *record.events_by_key.entry(key).or_default() += 1;
                        record.events += 1;
                    }
                    Some(false) => {}
                    None => record.maybe_events += 1,
                }
                counters.acked.fetch_add(1, Ordering::Relaxed)
            }
            Ok(Ok(Reply::Refused(text))) => {
                record.first_refusal.get_or_insert(text);
                counters.refused.fetch_add(1, Ordering::Relaxed)
            }
            _ => {
                conn = None;
                counters.unknown.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// A reply: done (with its integer, if it was one) or refused (an error reply, its text).
enum Reply {
    Done(Option<i64>),
    Refused(String),
}

/// Sends one command and reads its one-line reply.
async fn round_trip(stream: &mut TcpStream, request: &[u8]) -> std::io::Result<Reply> {
    stream.write_all(request).await?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    // Replies are a few bytes: reading byte by byte keeps nothing of one reply for the next.
    loop {
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        line.push(byte[0]);
        if line.ends_with(b"\r\n") {
            break;
        }
        if line.len() > REPLY_BYTES_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "reply line too long",
            ));
        }
    }
    let body = || String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
    match line.first() {
        Some(b'+') => Ok(Reply::Done(None)),
        Some(b':') => Ok(Reply::Done(body().parse().ok())),
        Some(b'-') => Ok(Reply::Refused(body())),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected reply {:?}", String::from_utf8_lossy(&line)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_acknowledged_commands_made_an_event() {
        let b = || Bytes::from_static(b"x");
        assert_eq!(made_event(&Command::Set(b()), None), Some(true));
        assert_eq!(made_event(&Command::SetAdd(vec![b()]), Some(0)), Some(true));
        assert_eq!(
            made_event(&Command::HashSet(vec![(b(), b())]), Some(0)),
            Some(true)
        );
        assert_eq!(made_event(&Command::IncrBy(3), Some(3)), Some(true));
        assert_eq!(made_event(&Command::IncrBy(0), Some(3)), None);
        assert_eq!(made_event(&Command::Delete, Some(0)), Some(false));
        assert_eq!(made_event(&Command::Delete, Some(1)), Some(true));
        assert_eq!(
            made_event(&Command::SetRemove(vec![b()]), Some(0)),
            Some(false)
        );
        assert_eq!(
            made_event(&Command::HashDelete(vec![b()]), Some(1)),
            Some(true)
        );
    }
}
