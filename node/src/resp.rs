//! The RESP (Redis protocol) server: bytes -> frame -> command -> reply.
//!
//! ```text
//!   TCP ─► read buffer ─► parse (arrays of bulk strings, or inline) ─► commands
//!          every command of a pipelined burst, in order:
//!            writes ─► collected into one Input::Commands ─► one commit ─► replies
//!            reads  ─► straight from RocksDB, after the writes before them committed
//!   replies ─► write buffer ─► TCP
//! ```
//!
//! Errors follow Redis's texts so that clients react as they would with Redis: `WRONGTYPE`,
//! `ERR wrong number of arguments for '...' command`, `ERR unknown command`, `NOAUTH`. A
//! protocol error (malformed framing, an oversized bulk) gets an error reply and the connection
//! is closed, as Redis does; nothing else is affected.

use std::ops::Range;
use std::sync::Arc;

use braid_conflict::{value::parse_i64, Command, CommandError, KeyState, Value, ValueType};
use braid_protocol::limits::{KEY_BYTES_MAX, VALUE_BYTES_MAX};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::{debug, error, warn};

use crate::driver::{Input, Snapshot, WRITE_GROUP_COMMANDS_MAX};
use crate::storage::{RocksStorage, StorageError};

/// Most arguments in one command (Redis allows more; a million-member SADD is a mistake).
pub const RESP_ARGS_MAX: usize = 1024 * 1024;
/// Largest bulk string: the largest value, plus nothing.
pub const RESP_BULK_BYTES_MAX: usize = VALUE_BYTES_MAX;
/// Longest inline command line.
pub const RESP_INLINE_BYTES_MAX: usize = 64 * 1024;
/// Most bytes one command may have (two of the largest values, and 64 KiB for keys and
/// headers), and so a connection may have buffered and not yet parsed.
pub const RESP_BUFFER_BYTES_MAX: usize = RESP_BULK_BYTES_MAX * 2 + 64 * 1024;
/// Replies are written out as soon as this many bytes are waiting, so a long pipeline does not
/// buffer all its replies.
pub const RESP_OUTPUT_FLUSH_BYTES: usize = 64 * 1024;
/// The buffer space a connection keeps between bursts, each way: what grew past it for a large
/// request or reply is given back once that is done.
const RESP_KEPT_BYTES: usize = 16 * 1024;
/// The most commands parsed from a connection's buffer before they run: a buffer of tiny
/// pipelined commands (a few bytes each on the wire, a few hundred bytes each parsed) is run
/// a burst at a time, not parsed whole first.
pub const RESP_BURST_COMMANDS_MAX: usize = 1024;
/// The longest multi-bulk count line (`*` and an `i64` need 21 bytes): longer is refused
/// before it is searched for its end again on every read.
const RESP_COUNT_LINE_BYTES_MAX: usize = 32;
/// Idle time of a RESP client's connection before the kernel probes it (Redis's
/// `tcp-keepalive` default), and the time between probes: a client whose machine died, or whose
/// connection a NAT forgot, gives its `max-clients` place back after about nine and a half
/// minutes (nine unanswered probes) instead of never.
pub const RESP_KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(300);
/// See [`RESP_KEEPALIVE_IDLE`].
pub const RESP_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// See [`RESP_KEEPALIVE_IDLE`].
pub const RESP_KEEPALIVE_PROBES: u32 = 9;
/// What a client past `max-clients` is told before its connection is closed (Redis's text).
const MAX_CLIENTS_REPLY: &[u8] = b"-ERR max number of clients reached\r\n";
/// The largest single reply (an MGET of many large values): past it, an error instead.
pub const RESP_REPLY_BYTES_MAX: usize = 64 * 1024 * 1024;

/// A client's bytes that are not RESP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    /// Something other than what the protocol allows at this point.
    #[error("Protocol error: {0}")]
    Protocol(String),
}

fn protocol<T>(msg: impl Into<String>) -> Result<T, RespError> {
    Err(RespError::Protocol(msg.into()))
}

/// Finds `\r\n` at or after `from`.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

fn parse_len(bytes: &[u8], what: &str) -> Result<i64, RespError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .map_or_else(|| protocol(format!("invalid {what} length")), Ok)
}

/// How far [`check_command`] got through an incomplete command, so that the next read resumes
/// there instead of scanning the command again (a client trickling a large command in small
/// pieces would otherwise cost time quadratic in its size).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The multi-bulk count, once read.
    count: Option<i64>,
    /// Where the next unchecked argument starts.
    at: usize,
    /// Arguments checked so far.
    args: i64,
}

/// Checks whether a whole command is at the front of `buf`, resuming from `progress` (which
/// must have been used only with this same buffer front). `Ok(Some(n))`: the command is the
/// first `n` bytes; `Ok(None)`: more bytes are needed.
pub fn check_command(buf: &[u8], progress: &mut Progress) -> Result<Option<usize>, RespError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != b'*' {
        // An inline command: its line, up to the limit, searched from where the last look
        // stopped (a line sent a byte at a time is not searched again from its start).
        let limit = buf.len().min(RESP_INLINE_BYTES_MAX + 1);
        let from = progress.at.min(limit);
        return match buf[from..limit].iter().position(|b| *b == b'\n') {
            Some(at) => Ok(Some(from + at + 1)),
            None if buf.len() > RESP_INLINE_BYTES_MAX => protocol("too big inline request"),
            None => {
                progress.at = limit;
                Ok(None)
            }
        };
    }
    let count = match progress.count {
        Some(count) => count,
        None => {
            let Some(end) = line_end(buf, 1) else {
                return if buf.len() > RESP_COUNT_LINE_BYTES_MAX {
                    protocol("invalid multibulk length")
                } else {
                    Ok(None)
                };
            };
            let count = parse_len(&buf[1..end], "multibulk")?;
            if count > RESP_ARGS_MAX as i64 {
                return protocol("invalid multibulk length");
            }
            progress.count = Some(count);
            progress.at = end + 2;
            count
        }
    };
    while progress.args < count {
        let at = progress.at;
        match buf.get(at) {
            None => return Ok(None),
            Some(b'$') => {}
            Some(other) => return protocol(format!("expected '$', got '{}'", *other as char)),
        }
        let Some(end) = line_end(buf, at + 1) else {
            return if buf.len() - at > 64 {
                protocol("invalid bulk length")
            } else {
                Ok(None)
            };
        };
        let len = parse_len(&buf[at + 1..end], "bulk")?;
        if len < 0 || len as usize > RESP_BULK_BYTES_MAX {
            return protocol("invalid bulk length");
        }
        let stop = end + 2 + len as usize;
        // However the bytes arrive (one read may complete what another would have left
        // waiting), a command is whole within the bound or refused.
        if stop + 2 > RESP_BUFFER_BYTES_MAX {
            return protocol("request too large");
        }
        if buf.len() < stop + 2 {
            return Ok(None);
        }
        if &buf[stop..stop + 2] != b"\r\n" {
            return protocol("bulk string not terminated by CRLF");
        }
        progress.at = stop + 2;
        progress.args += 1;
    }
    Ok(Some(progress.at.max(1)))
}

/// Parses one command from the front of `buf`: `Ok(Some((args, used)))`, `Ok(None)` when more
/// bytes are needed. Checks every length before buffering anything for it.
pub fn parse_command(buf: &[u8]) -> Result<Option<(Vec<Bytes>, usize)>, RespError> {
    let Some(used) = check_command(buf, &mut Progress::default())? else {
        return Ok(None);
    };
    let frame = &buf[..used];
    if frame.first() != Some(&b'*') {
        return parse_inline(frame);
    }
    // `check_command` validated every line and length: this pass only cuts the arguments out.
    let mut args = Vec::new();
    let mut at = line_end(frame, 1).map_or(used, |end| end + 2);
    while at < used {
        let Some(end) = line_end(frame, at + 1) else {
            break;
        };
        let len = parse_len(&frame[at + 1..end], "bulk")?.max(0) as usize;
        let start = end + 2;
        let Some(arg) = frame.get(start..start + len) else {
            break;
        };
        args.push(Bytes::copy_from_slice(arg));
        at = start + len + 2;
    }
    Ok(Some((args, used)))
}

fn parse_inline(buf: &[u8]) -> Result<Option<(Vec<Bytes>, usize)>, RespError> {
    let Some(end) = buf.iter().position(|b| *b == b'\n') else {
        return if buf.len() > RESP_INLINE_BYTES_MAX {
            protocol("too big inline request")
        } else {
            Ok(None)
        };
    };
    let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let args = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|part| !part.is_empty())
        .map(Bytes::copy_from_slice)
        .collect();
    Ok(Some((args, end + 1)))
}

/// A reply, as RESP2 encodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(&'static str),
    /// `-ERR ...` (the text includes its prefix, `ERR`, `WRONGTYPE`, ...).
    Error(String),
    /// `:n`
    Integer(i64),
    /// `$n\r\n...`
    Bulk(Bytes),
    /// `$-1`
    Nil,
    /// `*n ...`
    Array(Vec<Reply>),
}

impl Reply {
    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Simple(text) => {
                out.push(b'+');
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Reply::Error(text) => {
                out.push(b'-');
                // An error text must stay on one line.
                out.extend(
                    text.bytes()
                        .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
                );
                out.extend_from_slice(b"\r\n");
            }
            Reply::Integer(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
            Reply::Bulk(bytes) => {
                out.extend_from_slice(format!("${}\r\n", bytes.len()).as_bytes());
                out.extend_from_slice(bytes);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Nil => out.extend_from_slice(b"$-1\r\n"),
            Reply::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    item.encode(out);
                }
            }
        }
    }

    fn err(text: impl Into<String>) -> Reply {
        Reply::Error(text.into())
    }
}

fn wrong_args(name: &str) -> Reply {
    Reply::err(format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

fn wrong_type() -> Reply {
    Reply::err(
        CommandError::WrongType {
            held: ValueType::String,
        }
        .to_string(),
    )
}

/// Shared by every connection.
#[derive(Clone)]
pub struct RespContext {
    /// The driver's inputs.
    pub inputs: mpsc::Sender<Input>,
    /// Direct reads of committed state.
    pub storage: RocksStorage,
    /// The password, if AUTH is required.
    pub password: Option<Arc<str>>,
    /// Most clients connected at once.
    pub max_clients: usize,
    /// Renders INFO's text from a status snapshot.
    pub info: Arc<dyn Fn(&Snapshot) -> String + Send + Sync>,
}

impl std::fmt::Debug for RespContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RespContext")
            .field("auth", &self.password.is_some())
            .finish()
    }
}

/// File descriptors a node keeps for other than RESP clients: the two databases' files (at
/// most [`crate::storage::DATA_OPEN_FILES_MAX`] and
/// [`crate::control::rocks_log::CONTROL_OPEN_FILES_MAX`], and their logs and locks), then the
/// QUIC socket, HTTP clients and the log.
pub const FILE_DESCRIPTORS_RESERVED: u64 = 512;

const _: () = assert!(
    (crate::storage::DATA_OPEN_FILES_MAX + crate::control::rocks_log::CONTROL_OPEN_FILES_MAX)
        as u64
        + 128
        <= FILE_DESCRIPTORS_RESERVED
);

/// Raises the process's soft open-file limit, up to its hard limit, to hold `max_clients`
/// clients and [`FILE_DESCRIPTORS_RESERVED`]; returns how many clients fit (at least one),
/// with a warning when that is fewer than asked. Without it, a client past the limit would
/// wait unanswered in the listen backlog instead of hearing `max number of clients reached`.
pub fn fit_open_files(max_clients: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes the limit into the struct it is given, which lives here.
    #[allow(unsafe_code)]
    let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if read != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
        return max_clients;
    }
    let wanted = (max_clients as u64).saturating_add(FILE_DESCRIPTORS_RESERVED);
    if limit.rlim_cur < wanted {
        // As far as the hard limit allows: every client takes a descriptor, beside the
        // reserve.
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit(2) reads the struct it is given, which lives here.
        #[allow(unsafe_code)]
        let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
        if set == 0 {
            limit.rlim_cur = raised.rlim_cur;
        }
    }
    let fit = limit
        .rlim_cur
        .saturating_sub(FILE_DESCRIPTORS_RESERVED)
        .max(1);
    let fit = usize::try_from(fit).unwrap_or(usize::MAX).min(max_clients);
    if fit < max_clients {
        warn!(
            max_clients,
            fit,
            open_files = limit.rlim_cur,
            "the open-file limit holds fewer RESP clients than max-clients: raise it (ulimit -n) \
             to take more"
        );
    }
    fit
}

/// Accepts RESP clients until shutdown.
pub async fn serve(
    listener: TcpListener,
    context: RespContext,
    mut shutdown: watch::Receiver<bool>,
) {
    let clients = Arc::new(Semaphore::new(context.max_clients));
    loop {
        let (mut socket, remote) = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "accepting a RESP client failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(client) = clients.clone().try_acquire_owned() else {
            warn!(%remote, max_clients = context.max_clients, "refusing a RESP client: max-clients reached");
            // Told why and closed, without holding up the next accept.
            tokio::spawn(async move {
                let _ = socket.write_all(MAX_CLIENTS_REPLY).await;
                let _ = socket.shutdown().await;
            });
            continue;
        };
        let context = context.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(err) = Connection::new(context).run(socket, shutdown).await {
                debug!(%remote, error = %err, "RESP connection ended");
            }
            drop(client);
        });
    }
}

/// What ends a connection.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("the node is stopping")]
    Stopping,
}

/// A parsed command waiting to run.
enum Pending {
    /// A write for the replica, and how to turn its integer result into a reply.
    Write {
        key: Bytes,
        command: Command,
        reply: WriteReply,
    },
    /// Already answered (a read, an error, a PING...).
    Done(Reply),
    /// Several writes answered as one: DEL sums their counts, MSET answers OK.
    Sum(Vec<Pending>),
    /// QUIT: reply OK and close.
    Quit,
}

#[derive(Clone, Copy)]
enum WriteReply {
    Ok,
    Integer,
}

struct Connection {
    context: RespContext,
    authenticated: bool,
}

/// Replies are sent as they are written (no Nagle delay); dead peers are found by keep-alive.
fn configure(socket: socket2::SockRef<'_>) -> std::io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(RESP_KEEPALIVE_IDLE)
        .with_interval(RESP_KEEPALIVE_INTERVAL)
        .with_retries(RESP_KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)
}

impl Connection {
    fn new(context: RespContext) -> Connection {
        let authenticated = context.password.is_none();
        Connection {
            context,
            authenticated,
        }
    }

    async fn run(
        mut self,
        mut socket: TcpStream,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ConnectionError> {
        configure(socket2::SockRef::from(&socket))?;
        let mut input = BytesMut::with_capacity(RESP_KEPT_BYTES);
        let mut output = Vec::with_capacity(RESP_KEPT_BYTES);
        let mut progress = Progress::default();
        // Whether the buffer may hold whole commands the last burst left for the next.
        let mut buffered = false;
        loop {
            if buffered {
                // Between bursts of one buffer, other tasks run, and a stopping node stops.
                tokio::task::yield_now().await;
                if *shutdown.borrow() {
                    return Ok(());
                }
            } else {
                let read = tokio::select! {
                    biased;
                    _ = shutdown.changed() => return Ok(()),
                    read = socket.read_buf(&mut input) => read?,
                };
                if read == 0 {
                    return Ok(());
                }
            }
            // The whole commands in the buffer, up to a bound, are one pipelined burst.
            let mut burst = Vec::new();
            let mut fatal = None;
            buffered = false;
            loop {
                if burst.len() == RESP_BURST_COMMANDS_MAX {
                    buffered = true;
                    break;
                }
                // Check first (resuming where the last read left off), parse once complete.
                let complete = match check_command(&input, &mut progress) {
                    // Complete: the second check is from the start, once per command.
                    Ok(Some(len)) => parse_command(&input[..len]),
                    Ok(None) => break,
                    Err(err) => Err(err),
                };
                match complete {
                    Ok(Some((args, used))) => {
                        input.advance(used);
                        progress = Progress::default();
                        if !args.is_empty() {
                            burst.push(args);
                        }
                    }
                    Ok(None) => {
                        fatal = Some(RespError::Protocol("incomplete command".into()));
                        break;
                    }
                    Err(err) => {
                        fatal = Some(err);
                        break;
                    }
                }
            }
            // Too large only when what is left is one incomplete command.
            if fatal.is_none() && !buffered && input.len() > RESP_BUFFER_BYTES_MAX {
                fatal = Some(RespError::Protocol("request too large".into()));
            }
            let quit = match self.execute(burst, &mut output, &mut socket).await {
                Ok(quit) => quit,
                Err(err @ (ConnectionError::Stopping | ConnectionError::Storage(_))) => {
                    // Told, not just cut off: the replies so far, then why nothing follows.
                    if let ConnectionError::Storage(cause) = &err {
                        error!(error = %cause, "a read from storage failed");
                    }
                    Reply::err(match &err {
                        ConnectionError::Storage(cause) => format!("ERR storage: {cause}"),
                        // The driver may have committed them before it stopped.
                        _ => "ERR the node is stopping (see its log): the outcome of writes \
                              not yet answered is unknown"
                            .into(),
                    })
                    .encode(&mut output);
                    let _ = socket.write_all(&output).await;
                    // Closed for writing first, so unread input does not reset the connection
                    // before the client has read these replies.
                    let _ = socket.shutdown().await;
                    return Err(err);
                }
                Err(err) => return Err(err),
            };
            if let Some(err) = &fatal {
                Reply::err(format!("ERR {err}")).encode(&mut output);
            }
            socket.write_all(&output).await?;
            output.clear();
            // A large reply or request once is not kept for the connection's life: an idle
            // connection holds what a small one needs.
            output.shrink_to(RESP_KEPT_BYTES);
            if input.is_empty() && input.capacity() > RESP_KEPT_BYTES {
                input = BytesMut::with_capacity(RESP_KEPT_BYTES);
            }
            if quit || fatal.is_some() {
                socket.shutdown().await?;
                return Ok(());
            }
        }
    }

    /// Runs a burst in order; writes are committed in groups, each group before any later read.
    async fn execute(
        &mut self,
        burst: Vec<Vec<Bytes>>,
        output: &mut Vec<u8>,
        socket: &mut TcpStream,
    ) -> Result<bool, ConnectionError> {
        let mut queue: Vec<Pending> = Vec::new();
        // The writes `queue` holds, key by key: only writes wait, to be committed as a group.
        let mut writes_queued = 0;
        for args in burst {
            // A read must see the writes before it: commit them first.
            if writes_queued > 0 && !is_write(&args[0]) {
                self.flush(&mut queue, output).await?;
                writes_queued = 0;
            }
            if output.len() >= RESP_OUTPUT_FLUSH_BYTES {
                socket.write_all(output).await?;
                output.clear();
            }
            let pending = self.plan(args).await?;
            let quit = matches!(pending, Pending::Quit);
            // A group is at most as large as the driver's own (a burst of tiny writes would
            // otherwise be one commit of hundreds of thousands, and hold every other client's
            // writes meanwhile); one command over many keys is one group, whole.
            let writes = write_count(&pending);
            if writes_queued > 0 && writes_queued + writes > WRITE_GROUP_COMMANDS_MAX {
                self.flush(&mut queue, output).await?;
                writes_queued = 0;
            }
            writes_queued += writes;
            queue.push(pending);
            if quit {
                self.flush(&mut queue, output).await?;
                return Ok(true);
            }
            if writes_queued == 0 {
                // Nothing waits for a commit: the reply is encoded now, so a pipeline of reads
                // holds at most `RESP_OUTPUT_FLUSH_BYTES` and one reply, not every reply.
                self.flush(&mut queue, output).await?;
            }
        }
        self.flush(&mut queue, output).await?;
        Ok(false)
    }

    /// Commits the queued writes as one group and encodes every queued reply in order.
    async fn flush(
        &mut self,
        queue: &mut Vec<Pending>,
        output: &mut Vec<u8>,
    ) -> Result<(), ConnectionError> {
        let mut commands = Vec::new();
        let mut all_or_none = Vec::new();
        for pending in queue.iter() {
            collect_writes(pending, &mut commands, &mut all_or_none);
        }
        let mut results = if commands.is_empty() {
            Vec::new().into_iter()
        } else {
            let (reply, rx) = oneshot::channel();
            self.context
                .inputs
                .send(Input::Commands {
                    commands,
                    all_or_none,
                    reply,
                })
                .await
                .map_err(|_| ConnectionError::Stopping)?;
            rx.await.map_err(|_| ConnectionError::Stopping)?.into_iter()
        };
        for pending in queue.drain(..) {
            render(pending, &mut results).encode(output);
        }
        Ok(())
    }

    /// Turns one command into a pending reply: reads are answered now, writes wait for commit.
    async fn plan(&mut self, args: Vec<Bytes>) -> Result<Pending, ConnectionError> {
        let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
        let argc = args.len();
        let done = |reply| Ok(Pending::Done(reply));
        if !self.authenticated && !matches!(name.as_str(), "auth" | "quit" | "hello") {
            return done(Reply::err("NOAUTH Authentication required."));
        }
        if keys_of(&name, &args).any(|key| key.len() > KEY_BYTES_MAX) {
            return done(Reply::err(format!(
                "ERR key longer than {KEY_BYTES_MAX} bytes"
            )));
        }
        let write = |key: &Bytes, command, reply| Pending::Write {
            key: key.clone(),
            command,
            reply,
        };
        match name.as_str() {
            "ping" => match argc {
                1 => done(Reply::Simple("PONG")),
                2 => done(Reply::Bulk(args[1].clone())),
                _ => done(wrong_args("ping")),
            },
            "echo" if argc == 2 => done(Reply::Bulk(args[1].clone())),
            "quit" => Ok(Pending::Quit),
            "auth" => done(self.auth(&args)),
            "select" if argc == 2 => done(match &args[1][..] {
                b"0" => Reply::Simple("OK"),
                _ => Reply::err("ERR DB index is out of range"),
            }),
            "config" | "command" => done(Reply::Array(Vec::new())),
            "client" => done(Reply::Simple("OK")),
            "info" => done(self.info().await?),
            "get" if argc == 2 => done(read_string(self.read(&args[1])?)),
            "mget" if argc >= 2 => {
                let mut values = Vec::with_capacity(argc - 1);
                let mut bytes = 0;
                // One view for every key: an MSET committed meanwhile is seen whole or not.
                let view = self.context.storage.view();
                for key in &args[1..] {
                    values.push(match read_string(view.get(key)?) {
                        Reply::Bulk(b) => {
                            bytes += b.len();
                            Reply::Bulk(b)
                        }
                        _ => Reply::Nil,
                    });
                    if bytes > RESP_REPLY_BYTES_MAX {
                        let text = format!("ERR reply larger than {RESP_REPLY_BYTES_MAX} bytes");
                        return done(Reply::err(text));
                    }
                }
                done(Reply::Array(values))
            }
            "exists" if argc >= 2 => {
                let mut count = 0;
                let view = self.context.storage.view();
                for key in &args[1..] {
                    count += i64::from(view.get(key)?.and_then(|s| s.visible_type()).is_some());
                }
                done(Reply::Integer(count))
            }
            "set" if argc == 3 => Ok(write(
                &args[1],
                Command::Set(args[2].clone()),
                WriteReply::Ok,
            )),
            "set" if argc > 3 => done(Reply::err("ERR syntax error")),
            "mset" if argc >= 3 && argc % 2 == 1 => Ok(Pending::Sum(
                args[1..]
                    .chunks(2)
                    .map(|kv| write(&kv[0], Command::Set(kv[1].clone()), WriteReply::Ok))
                    .collect(),
            )),
            "del" if argc >= 2 => Ok(Pending::Sum(
                args[1..]
                    .iter()
                    .map(|k| write(k, Command::Delete, WriteReply::Integer))
                    .collect(),
            )),
            "incr" | "decr" if argc == 2 => {
                let delta = if name == "incr" { 1 } else { -1 };
                Ok(write(&args[1], Command::IncrBy(delta), WriteReply::Integer))
            }
            "incrby" | "decrby" if argc == 3 => match parse_i64(&args[2]) {
                Some(delta) if name == "incrby" => {
                    Ok(write(&args[1], Command::IncrBy(delta), WriteReply::Integer))
                }
                Some(delta) => match delta.checked_neg() {
                    Some(neg) => Ok(write(&args[1], Command::IncrBy(neg), WriteReply::Integer)),
                    None => done(Reply::err("ERR decrement would overflow")),
                },
                None => done(Reply::err("ERR value is not an integer or out of range")),
            },
            "sadd" if argc >= 3 => Ok(write(
                &args[1],
                Command::SetAdd(args[2..].to_vec()),
                WriteReply::Integer,
            )),
            "srem" if argc >= 3 => Ok(write(
                &args[1],
                Command::SetRemove(args[2..].to_vec()),
                WriteReply::Integer,
            )),
            "smembers" if argc == 2 => done(match self.read_typed(&args[1], ValueType::Set)? {
                Err(reply) => reply,
                Ok(Some(Value::Set(members))) => {
                    Reply::Array(members.into_iter().map(Reply::Bulk).collect())
                }
                Ok(_) => Reply::Array(Vec::new()),
            }),
            "sismember" if argc == 3 => done(match self.read_typed(&args[1], ValueType::Set)? {
                Err(reply) => reply,
                Ok(Some(Value::Set(members))) => {
                    Reply::Integer(i64::from(members.contains(&args[2])))
                }
                Ok(_) => Reply::Integer(0),
            }),
            "scard" if argc == 2 => done(match self.read_typed(&args[1], ValueType::Set)? {
                Err(reply) => reply,
                Ok(Some(Value::Set(members))) => Reply::Integer(members.len() as i64),
                Ok(_) => Reply::Integer(0),
            }),
            "hset" if argc >= 4 && argc.is_multiple_of(2) => {
                let pairs = args[2..]
                    .chunks(2)
                    .map(|fv| (fv[0].clone(), fv[1].clone()))
                    .collect();
                Ok(write(
                    &args[1],
                    Command::HashSet(pairs),
                    WriteReply::Integer,
                ))
            }
            "hmset" if argc >= 4 && argc.is_multiple_of(2) => {
                let pairs = args[2..]
                    .chunks(2)
                    .map(|fv| (fv[0].clone(), fv[1].clone()))
                    .collect();
                Ok(write(&args[1], Command::HashSet(pairs), WriteReply::Ok))
            }
            "hdel" if argc >= 3 => Ok(write(
                &args[1],
                Command::HashDelete(args[2..].to_vec()),
                WriteReply::Integer,
            )),
            "hget" if argc == 3 => done(match self.read_typed(&args[1], ValueType::Hash)? {
                Err(reply) => reply,
                Ok(Some(Value::Hash(fields))) => fields
                    .into_iter()
                    .find(|(f, _)| *f == args[2])
                    .map_or(Reply::Nil, |(_, v)| Reply::Bulk(v)),
                Ok(_) => Reply::Nil,
            }),
            "hgetall" if argc == 2 => done(match self.read_typed(&args[1], ValueType::Hash)? {
                Err(reply) => reply,
                Ok(Some(Value::Hash(fields))) => Reply::Array(
                    fields
                        .into_iter()
                        .flat_map(|(f, v)| [Reply::Bulk(f), Reply::Bulk(v)])
                        .collect(),
                ),
                Ok(_) => Reply::Array(Vec::new()),
            }),
            "echo" | "select" | "get" | "mget" | "exists" | "set" | "mset" | "del" | "incr"
            | "decr" | "incrby" | "decrby" | "sadd" | "srem" | "smembers" | "sismember"
            | "scard" | "hset" | "hmset" | "hdel" | "hget" | "hgetall" => done(wrong_args(&name)),
            _ => {
                let preview: Vec<String> = args[1..]
                    .iter()
                    .take(4)
                    .map(|a| format!("'{}'", String::from_utf8_lossy(&a[..a.len().min(64)])))
                    .collect();
                done(Reply::err(format!(
                    "ERR unknown command '{}', with args beginning with: {}",
                    String::from_utf8_lossy(&args[0]),
                    preview.join(" ")
                )))
            }
        }
    }

    fn auth(&mut self, args: &[Bytes]) -> Reply {
        let Some(password) = &self.context.password else {
            return Reply::err(
                "ERR AUTH <password> called without any password configured for the default user. \
                 Are you sure your configuration is correct?",
            );
        };
        // AUTH username password: the only user is "default", as in Redis without ACLs.
        let (user_known, given) = match args.len() {
            2 => (true, &args[1]),
            3 => (&args[1][..] == b"default", &args[2]),
            _ => return wrong_args("auth"),
        };
        if same_secret(given, password.as_bytes()) && user_known {
            self.authenticated = true;
            Reply::Simple("OK")
        } else {
            Reply::err("WRONGPASS invalid username-password pair or user is disabled.")
        }
    }

    fn read(&self, key: &[u8]) -> Result<Option<KeyState>, ConnectionError> {
        Ok(self.context.storage.get(key)?)
    }

    /// The key's value if it is of `ty` (or missing); a WRONGTYPE reply otherwise.
    fn read_typed(
        &self,
        key: &[u8],
        ty: ValueType,
    ) -> Result<Result<Option<Value>, Reply>, ConnectionError> {
        let value = self.read(key)?.and_then(KeyState::into_value);
        Ok(match value {
            Some(v) if v.value_type() != ty => Err(wrong_type()),
            other => Ok(other),
        })
    }

    async fn info(&self) -> Result<Reply, ConnectionError> {
        let (reply, rx) = oneshot::channel();
        self.context
            .inputs
            .send(Input::Status { reply })
            .await
            .map_err(|_| ConnectionError::Stopping)?;
        let snapshot = rx.await.map_err(|_| ConnectionError::Stopping)?;
        Ok(Reply::Bulk(Bytes::from((self.context.info)(&snapshot))))
    }
}

/// GET's view of a key: strings as they are, counters in decimal, other types refused.
fn read_string(state: Option<KeyState>) -> Reply {
    match state.and_then(KeyState::into_value) {
        None => Reply::Nil,
        Some(Value::String(bytes)) => Reply::Bulk(bytes),
        Some(Value::Counter(n)) => Reply::Bulk(Bytes::from(n.to_string())),
        Some(_) => wrong_type(),
    }
}

/// Whether a command (by name) is a write, which may be grouped with the writes before it.
fn is_write(name: &[u8]) -> bool {
    const WRITES: [&str; 12] = [
        "set", "mset", "del", "incr", "decr", "incrby", "decrby", "sadd", "srem", "hset", "hmset",
        "hdel",
    ];
    WRITES
        .iter()
        .any(|w| w.as_bytes().eq_ignore_ascii_case(name))
}

/// The writes `pending` makes, one per key.
fn write_count(pending: &Pending) -> usize {
    match pending {
        Pending::Write { .. } => 1,
        Pending::Sum(parts) => parts.iter().map(write_count).sum(),
        _ => 0,
    }
}

/// Whether `given` is the password, in a time that does not depend on where they first differ
/// (a client timing wrong guesses learns nothing of the password but its length).
fn same_secret(given: &[u8], password: &[u8]) -> bool {
    given.len() == password.len()
        && given
            .iter()
            .zip(password)
            .fold(0u8, |differ, (g, p)| differ | (g ^ p))
            == 0
}

/// The keys command `name` names in `args`: every argument after the name for the commands
/// over several keys, every other one for `MSET`, the first for the rest, none for commands
/// without a key.
fn keys_of<'a>(name: &str, args: &'a [Bytes]) -> impl Iterator<Item = &'a Bytes> {
    let rest = args.get(1..).unwrap_or_default();
    let (keys, step) = match name {
        "auth" | "echo" | "ping" | "info" | "config" | "client" | "select" | "command"
        | "hello" | "quit" => (&rest[..0], 1),
        "mget" | "exists" | "del" => (rest, 1),
        "mset" => (rest, 2),
        _ => (&rest[..rest.len().min(1)], 1),
    };
    keys.iter().step_by(step)
}

/// Adds the writes of `pending` to `out`; the writes of one command over several keys are
/// also a range of `all_or_none`, as Redis applies such a command whole or not at all.
fn collect_writes(
    pending: &Pending,
    out: &mut Vec<(Bytes, Command)>,
    all_or_none: &mut Vec<Range<usize>>,
) {
    match pending {
        Pending::Write { key, command, .. } => out.push((key.clone(), command.clone())),
        Pending::Sum(parts) => {
            let start = out.len();
            parts
                .iter()
                .for_each(|p| collect_writes(p, out, all_or_none));
            all_or_none.push(start..out.len());
        }
        _ => {}
    }
}

fn render(
    pending: Pending,
    results: &mut impl Iterator<Item = Result<i64, CommandError>>,
) -> Reply {
    match pending {
        Pending::Done(reply) => reply,
        Pending::Quit => Reply::Simple("OK"),
        Pending::Write { reply, .. } => match results.next() {
            Some(Ok(n)) => match reply {
                WriteReply::Ok => Reply::Simple("OK"),
                WriteReply::Integer => Reply::Integer(n),
            },
            Some(Err(err)) => Reply::err(err.to_string()),
            None => Reply::err("ERR internal error: missing result"),
        },
        Pending::Sum(parts) => {
            let mut total = 0;
            let mut last = Reply::Integer(0);
            let mut error = None;
            // Every part takes its result, even after an error: the results that follow
            // belong to the commands after this one.
            for part in parts {
                match render(part, results) {
                    Reply::Integer(n) => total += n,
                    Reply::Error(e) => {
                        error.get_or_insert(e);
                    }
                    other => last = other,
                }
            }
            match (error, last) {
                (Some(e), _) => Reply::Error(e),
                (None, Reply::Simple(text)) => Reply::Simple(text),
                (None, _) => Reply::Integer(total),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(items: &[&str]) -> Vec<Bytes> {
        items
            .iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    #[tokio::test]
    async fn a_burst_of_writes_is_committed_in_groups_no_larger_than_the_drivers() {
        let dir = tempfile::tempdir().unwrap();
        let storage = RocksStorage::open(dir.path(), crate::storage::Durability::Machine).unwrap();
        let (inputs, mut received) = mpsc::channel(16);
        let context = RespContext {
            inputs,
            storage,
            password: None,
            max_clients: 1,
            info: Arc::new(|_| String::new()),
        };
        // A driver that answers every write and notes each group's size.
        let driver = tokio::spawn(async move {
            let mut groups = Vec::new();
            while let Some(input) = received.recv().await {
                if let Input::Commands {
                    commands, reply, ..
                } = input
                {
                    groups.push(commands.len());
                    let _ = reply.send(commands.iter().map(|_| Ok(0)).collect());
                }
            }
            groups
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut socket, _) = listener.accept().await.unwrap();
        let writes = 3 * WRITE_GROUP_COMMANDS_MAX + 5;
        let mut burst: Vec<Vec<Bytes>> = (0..writes)
            .map(|i| args(&["SET", &format!("k{i}"), "v"]))
            .collect();
        // Then commands over several keys: counted key by key, each whole in one group.
        let msets = WRITE_GROUP_COMMANDS_MAX / 2;
        burst.extend((0..msets).map(|i| {
            args(&[
                "MSET",
                &format!("a{i}"),
                "1",
                &format!("b{i}"),
                "2",
                &format!("c{i}"),
                "3",
            ])
        }));
        let mut output = Vec::new();
        let mut connection = Connection::new(context);
        let quit = connection
            .execute(burst, &mut output, &mut socket)
            .await
            .unwrap();
        drop(connection);
        let groups = driver.await.unwrap();
        assert!(!quit);
        assert_eq!(groups.iter().sum::<usize>(), writes + 3 * msets);
        assert!(
            groups.iter().all(|&n| n <= WRITE_GROUP_COMMANDS_MAX),
            "{groups:?}"
        );
        // 3,077 single writes and 1,536 more in threes: five groups at the least, and no group
        // left short but to keep an MSET whole.
        assert!(groups.len() <= 6, "{groups:?}");
        assert_eq!(output, b"+OK\r\n".repeat(writes + msets));
    }

    #[test]
    fn an_inline_line_is_searched_once_and_bounded_even_when_it_ends_in_the_buffer() {
        let mut line = b"SET k ".to_vec();
        line.extend(std::iter::repeat_n(b'v', 1000));
        line.extend_from_slice(b"\r\n");
        let mut progress = Progress::default();
        for cut in 1..line.len() {
            assert_eq!(
                check_command(&line[..cut], &mut progress),
                Ok(None),
                "cut at {cut}"
            );
            assert_eq!(progress.at, cut, "searched through {cut}");
        }
        assert_eq!(check_command(&line, &mut progress), Ok(Some(line.len())));
        let (args, used) = parse_command(&line).unwrap().unwrap();
        assert_eq!((args.len(), used), (3, line.len()));
        // Longer than the limit, though its end is in the buffer: refused all the same.
        let mut long = vec![b'a'; RESP_INLINE_BYTES_MAX + 1];
        long.extend_from_slice(b"\r\n");
        assert!(parse_command(&long).is_err());
        let mut longest = vec![b'a'; RESP_INLINE_BYTES_MAX];
        longest.push(b'\n');
        assert_eq!(
            parse_command(&longest).unwrap().map(|(_, used)| used),
            Some(longest.len())
        );
    }
    #[test]
    fn parses_arrays_of_bulk_strings_and_waits_for_more() {
        let frame = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        assert_eq!(
            parse_command(frame),
            Ok(Some((args(&["GET", "k"]), frame.len())))
        );
        for cut in 0..frame.len() {
            assert_eq!(parse_command(&frame[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn check_resumes_where_it_left_off_and_agrees_with_parse() {
        let frame = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
        let mut progress = Progress::default();
        for cut in 0..frame.len() {
            assert_eq!(
                check_command(&frame[..cut], &mut progress),
                Ok(None),
                "cut at {cut}"
            );
        }
        assert_eq!(check_command(frame, &mut progress), Ok(Some(frame.len())));
        assert_eq!(
            check_command(frame, &mut Progress::default()),
            Ok(Some(frame.len()))
        );
        assert_eq!(
            check_command(b"PING\r\n", &mut Progress::default()),
            Ok(Some(6))
        );
        assert!(check_command(b"*1\r\n$-5\r\n", &mut Progress::default()).is_err());
        // A command past the bound is refused from its lengths, before its bytes arrive.
        let mset = |count: usize| {
            let mut command = format!("*{count}\r\n$4\r\nMSET\r\n").into_bytes();
            for key in [b"x", b"y"] {
                command.extend_from_slice(b"$1\r\n");
                command.extend_from_slice(key);
                command.extend_from_slice(format!("\r\n${RESP_BULK_BYTES_MAX}\r\n").as_bytes());
                command.extend(std::iter::repeat_n(b'v', RESP_BULK_BYTES_MAX));
                command.extend_from_slice(b"\r\n");
            }
            command
        };
        let two = mset(5);
        assert_eq!(
            check_command(&two, &mut Progress::default()),
            Ok(Some(two.len())),
            "two of the largest values fit"
        );
        let mut three = mset(7);
        three.extend_from_slice(format!("$1\r\nz\r\n${RESP_BULK_BYTES_MAX}\r\n").as_bytes());
        assert_eq!(
            check_command(&three, &mut Progress::default()),
            Err(RespError::Protocol("request too large".into()))
        );
        // A count line with no end in sight is refused, not searched again on every read.
        let mut count = b"*".to_vec();
        count.extend(b"1".repeat(RESP_COUNT_LINE_BYTES_MAX));
        assert!(check_command(&count, &mut Progress::default()).is_err());
        assert_eq!(
            check_command(
                &count[..RESP_COUNT_LINE_BYTES_MAX],
                &mut Progress::default()
            ),
            Ok(None)
        );
    }

    #[test]
    fn client_connections_are_probed_when_idle() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let socket = socket2::SockRef::from(&server);
        assert!(!socket.keepalive().unwrap());
        configure(socket2::SockRef::from(&server)).unwrap();
        assert!(socket.keepalive().unwrap());
        assert!(socket.tcp_nodelay().unwrap());
        // As the kernel reports them.
        assert_eq!(socket.tcp_keepalive_time().unwrap(), RESP_KEEPALIVE_IDLE);
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            RESP_KEEPALIVE_INTERVAL
        );
        assert_eq!(
            socket.tcp_keepalive_retries().unwrap(),
            RESP_KEEPALIVE_PROBES
        );
    }

    #[test]
    fn parses_inline_commands() {
        assert_eq!(parse_command(b"PING\r\n"), Ok(Some((args(&["PING"]), 6))));
        assert_eq!(
            parse_command(b"set  k v\n"),
            Ok(Some((args(&["set", "k", "v"]), 9)))
        );
    }

    #[test]
    fn refuses_malformed_and_oversized_input() {
        assert!(parse_command(b"*1\r\n+GET\r\n").is_err());
        assert!(parse_command(b"*x\r\n").is_err());
        assert!(parse_command(b"*1\r\n$-5\r\n").is_err());
        assert!(
            parse_command(format!("*1\r\n${}\r\n", RESP_BULK_BYTES_MAX + 1).as_bytes()).is_err()
        );
        assert!(parse_command(format!("*{}\r\n", RESP_ARGS_MAX + 1).as_bytes()).is_err());
        assert!(parse_command(b"*1\r\n$1\r\nab\r\n").is_err());
        assert!(parse_command(&vec![b'a'; RESP_INLINE_BYTES_MAX + 1]).is_err());
    }

    #[test]
    fn encodes_replies() {
        let mut out = Vec::new();
        Reply::Array(vec![
            Reply::Bulk(Bytes::from_static(b"x")),
            Reply::Nil,
            Reply::Integer(-3),
        ])
        .encode(&mut out);
        Reply::Error("ERR a\r\nb".into()).encode(&mut out);
        assert_eq!(out, b"*3\r\n$1\r\nx\r\n$-1\r\n:-3\r\n-ERR a  b\r\n");
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse_command(&bytes);
        }
    }

    #[test]
    fn the_password_compares_whole() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        for wrong in [&b"s3creT"[..], b"S3cret", b"s3cre", b"s3crets", b""] {
            assert!(!same_secret(wrong, b"s3cret"), "{wrong:?}");
        }
    }

    #[test]
    fn the_open_file_limit_is_raised_to_fit_the_clients_or_they_are_fewer() {
        let fit = fit_open_files(100);
        assert_eq!(
            fit, 100,
            "a hundred clients fit any usual limit, raised if need be"
        );
        let fit = fit_open_files(usize::MAX >> 4);
        assert!((1..usize::MAX >> 4).contains(&fit));
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit(2) writes the struct it is given, which lives here.
        #[allow(unsafe_code)]
        let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(read, 0);
        assert!(
            fit as u64 + FILE_DESCRIPTORS_RESERVED
                <= limit.rlim_cur.max(FILE_DESCRIPTORS_RESERVED + 1),
            "{fit} clients and the reserve fit the limit {}",
            limit.rlim_cur
        );
    }

    /// A write the node can no longer commit (its driver stopped: a storage failure, or a
    /// shutdown) is answered with why, not with a silently closed connection.
    #[tokio::test]
    async fn a_write_to_a_stopped_node_is_answered_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let storage = RocksStorage::open(dir.path(), crate::storage::Durability::Machine).unwrap();
        let (inputs, input_rx) = mpsc::channel(16);
        drop(input_rx);
        let context = RespContext {
            inputs,
            storage,
            password: None,
            max_clients: 4,
            info: Arc::new(|_: &Snapshot| String::new()),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve(listener, context, shutdown));
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET k\r\nSET k v\r\nGET k\r\n")
            .await
            .unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        let reply = String::from_utf8_lossy(&reply);
        assert!(
            reply.starts_with("$-1\r\n-ERR the node is stopping"),
            "{reply:?}"
        );
        assert!(reply.contains("outcome of writes"), "{reply:?}");
        stop.send(true).unwrap();
        server.await.unwrap();
    }

    /// A client past `max-clients` is told why and closed; once a client leaves, its place is
    /// taken again.
    #[tokio::test]
    async fn a_client_past_max_clients_is_refused_until_a_place_frees() {
        let dir = tempfile::tempdir().unwrap();
        let storage = RocksStorage::open(dir.path(), crate::storage::Durability::Machine).unwrap();
        let (inputs, _input_rx) = mpsc::channel(16);
        let context = RespContext {
            inputs,
            storage,
            password: None,
            max_clients: 1,
            info: Arc::new(|_: &Snapshot| String::new()),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve(listener, context, shutdown));
        async fn ping(stream: &mut TcpStream) -> String {
            stream.write_all(b"PING\r\n").await.unwrap();
            let mut reply = vec![0u8; 64];
            let read = stream.read(&mut reply).await.unwrap_or(0);
            String::from_utf8_lossy(&reply[..read]).into_owned()
        }
        let mut first = TcpStream::connect(addr).await.unwrap();
        assert_eq!(ping(&mut first).await, "+PONG\r\n");
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut refused = Vec::new();
        second.read_to_end(&mut refused).await.unwrap();
        assert_eq!(refused, MAX_CLIENTS_REPLY);
        drop(first);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let mut third = TcpStream::connect(addr).await.unwrap();
            if ping(&mut third).await == "+PONG\r\n" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the place never freed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        stop.send(true).unwrap();
        server.await.unwrap();
    }
}
