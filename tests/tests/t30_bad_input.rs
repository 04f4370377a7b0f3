//! Bad input from the network: a peer with another CA's certificate, oversized and garbage
//! frames from a real peer, garbage datagrams on the QUIC port, malformed RESP. Each gets a
//! clear refusal, and the node keeps serving everyone else.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

use braid_node::config::NodeConfig;
use braid_node::tls::{self, MeshTls};
use braid_protocol::frame;
use braid_protocol::limits::FRAME_BYTES_MAX;
use braid_protocol::{
    ErrorCode, Handshake, Message, NodeId, RaftCall, RaftRequest, PROTOCOL_VERSION,
};
use braid_tests::{Cluster, Layout};
use redis::Commands;

fn still_serving(cluster: &mut Cluster, key: &str) {
    let mut a = cluster.node("a").redis();
    let _: () = a.set(key, "ok").unwrap();
    drop(a);
    cluster.wait_converged(Duration::from_secs(20));
    let value: String = cluster.node("b").redis().get(key).unwrap();
    assert_eq!(value, "ok");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A QUIC client presenting the given certificate files.
fn client(ca: &Path, cert: &Path, key: &Path) -> quinn::Endpoint {
    let tls = MeshTls::load(ca, cert, key).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(tls.client);
    endpoint
}

#[test]
fn t30_a_peer_with_a_certificate_from_another_ca_is_refused_and_logged() {
    let mut cluster = Cluster::start(Layout::mesh(2));
    let rogue_dir = tempfile::tempdir().unwrap();
    let rogue_ca = tls::generate_ca("rogue").unwrap();
    let rogue = tls::generate_node_cert(&rogue_ca, NodeId(2)).unwrap();
    std::fs::write(rogue_dir.path().join("node.pem"), &rogue.cert_pem).unwrap();
    std::fs::write(rogue_dir.path().join("node.key"), &rogue.key_pem).unwrap();
    let real_ca = cluster.dir.path().join("ca.pem");
    let a_peer = cluster.node("a").peer;
    let refused = runtime().block_on(async {
        let endpoint = client(
            &real_ca,
            &rogue_dir.path().join("node.pem"),
            &rogue_dir.path().join("node.key"),
        );
        let outcome = async {
            let connection = endpoint.connect(a_peer, "node-1").unwrap().await?;
            let (mut send, mut recv) = connection.open_bi().await?;
            // In TLS 1.3 the client finishes first; the refusal shows on the first stream use.
            let _ = send.write_all(b"hello").await;
            let _ = recv.read_to_end(1024).await;
            Ok::<_, quinn::ConnectionError>(connection.close_reason())
        }
        .await;
        match outcome {
            Err(err) => Some(err.to_string()),
            Ok(reason) => reason.map(|r| r.to_string()),
        }
    });
    let refused = refused.expect("the connection must be refused");
    assert!(
        refused.contains("UnknownIssuer") || refused.contains("certificate"),
        "{refused}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        cluster
            .node("a")
            .log()
            .contains("refused incoming peer connection"),
        "a logs the refusal"
    );
    still_serving(&mut cluster, "after-rogue");
}

/// Connects to `a` as region c (a real member, its process not running) and runs `script` on
/// a subscription stream after a valid handshake. Returns what `a` answered.
fn as_peer_c(cluster: &Cluster, script: impl FnOnce(&mut Vec<u8>)) -> Vec<Message> {
    as_peer_c_saying(cluster, |_| {}, script)
}

/// [`as_peer_c`], with the handshake changed by `edit` first.
fn as_peer_c_saying(
    cluster: &Cluster,
    edit: impl FnOnce(&mut Handshake),
    script: impl FnOnce(&mut Vec<u8>),
) -> Vec<Message> {
    let c = cluster.nodes.iter().find(|n| n.name == "c").unwrap();
    let config = NodeConfig::load(&c.config).unwrap();
    let a = cluster.nodes.iter().find(|n| n.name == "a").unwrap();
    let mut payload = Vec::new();
    let mut handshake = Handshake {
        protocol_version: PROTOCOL_VERSION,
        cluster_id: config.cluster_id().unwrap(),
        node_id: NodeId(3),
    };
    edit(&mut handshake);
    frame::encode(&Message::Handshake(handshake), &mut payload).unwrap();
    script(&mut payload);
    runtime().block_on(async {
        let endpoint = client(&config.tls.ca_cert, &config.tls.cert, &config.tls.key);
        let connection = endpoint.connect(a.peer, "node-1").unwrap().await.unwrap();
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        send.write_all(&payload).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20)).await;
        let bytes = reply
            .expect("a answers and ends the stream")
            .unwrap_or_default();
        let mut messages = Vec::new();
        let mut rest = &bytes[..];
        while let Ok(Some((message, used))) = frame::decode(rest) {
            messages.push(message);
            rest = &rest[used..];
        }
        messages
    })
}

#[test]
fn t31_oversized_and_garbage_frames_from_a_real_peer_get_errors() {
    let mut cluster = Cluster::start(Layout::mesh(3).without_running("c"));
    let oversized = as_peer_c(&cluster, |out| {
        out.extend_from_slice(&((FRAME_BYTES_MAX + 1) as u32).to_be_bytes())
    });
    assert!(
        matches!(oversized.first(), Some(Message::Handshake(_))),
        "{oversized:?}"
    );
    assert!(
        oversized
            .iter()
            .any(|m| matches!(m, Message::Error(e) if e.code == ErrorCode::FrameTooLarge)),
        "an oversized frame is answered with FrameTooLarge: {oversized:?}"
    );
    let garbage = as_peer_c(&cluster, |out| {
        out.extend_from_slice(&8u32.to_be_bytes());
        out.extend_from_slice(&[1, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa, 0xf9]);
    });
    assert!(
        garbage
            .iter()
            .any(|m| matches!(m, Message::Error(e) if e.code == ErrorCode::Malformed)),
        "a garbage frame is answered with Malformed: {garbage:?}"
    );
    let version = as_peer_c(&cluster, |out| {
        out.extend_from_slice(&2u32.to_be_bytes());
        out.extend_from_slice(&[9, 0]);
    });
    assert!(
        version
            .iter()
            .any(|m| matches!(m, Message::Error(e) if e.code == ErrorCode::UnsupportedVersion)),
        "an unknown version is answered with UnsupportedVersion: {version:?}"
    );
    // On a control stream, a bad frame after a good call is answered as the first would be.
    let vote = openraft::raft::VoteRequest::<u64>::new(openraft::Vote::new(0, 3), None);
    let body = bincode::serde::encode_to_vec(&vote, bincode::config::standard()).unwrap();
    let control = as_peer_c(&cluster, |out| {
        let call = Message::RaftRequest(RaftRequest {
            call: RaftCall::Vote,
            body: body.into(),
        });
        frame::encode(&call, out).unwrap();
        out.extend_from_slice(&((FRAME_BYTES_MAX + 1) as u32).to_be_bytes());
    });
    assert!(
        control
            .iter()
            .any(|m| matches!(m, Message::RaftResponse(_))),
        "the vote is answered: {control:?}"
    );
    assert!(
        control
            .iter()
            .any(|m| matches!(m, Message::Error(e) if e.code == ErrorCode::FrameTooLarge)),
        "the oversized frame after it is answered with FrameTooLarge: {control:?}"
    );
    // A handshake that does not fit is refused with the code that says why.
    let refused = |edit: fn(&mut Handshake), code: ErrorCode| {
        let answer = as_peer_c_saying(&cluster, edit, |_| {});
        assert!(
            answer
                .iter()
                .any(|m| matches!(m, Message::Error(e) if e.code == code)),
            "{code:?} expected: {answer:?}"
        );
    };
    refused(|h| h.protocol_version += 1, ErrorCode::UnsupportedVersion);
    refused(|h| h.cluster_id.0[0] ^= 1, ErrorCode::WrongCluster);
    refused(|h| h.node_id = NodeId(2), ErrorCode::UnknownPeer);
    // Each refusal is counted against the peer, in /status and /metrics.
    let status = cluster.node("a").status();
    let c = status.peers.iter().find(|p| p.region == "c").unwrap();
    assert!(c.streams_refused >= 5, "{c:?}");
    let metrics = braid_tests::http_get(cluster.node("a").http, "/metrics").unwrap();
    assert!(
        metrics.contains(&format!(
            "braid_streams_refused_total{{region=\"a\",peer=\"c\"}} {}",
            c.streams_refused
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("braid_events_held_dropped_total{region=\"a\"} 0"),
        "{metrics}"
    );
    still_serving(&mut cluster, "after-bad-frames");
}

#[test]
fn t32_garbage_datagrams_on_the_quic_port_change_nothing() {
    let mut cluster = Cluster::start(Layout::mesh(2));
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target: SocketAddr = cluster.node("a").peer;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for size in [1usize, 7, 100, 1200, 1500] {
        for _ in 0..20 {
            let bytes: Vec<u8> = (0..size)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            socket.send_to(&bytes, target).unwrap();
        }
    }
    still_serving(&mut cluster, "after-garbage");
}

fn raw_resp(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn t33_malformed_resp_gets_an_error_and_a_closed_connection_only() {
    let mut cluster = Cluster::start(Layout::mesh(2));
    let resp = cluster.node("a").resp;
    let mut bystander = cluster.node("a").redis();
    let reply = raw_resp(resp, b"*1\r\n$-5\r\n");
    assert!(reply.starts_with("-ERR Protocol error"), "{reply:?}");
    let reply = raw_resp(
        resp,
        format!("*2\r\n$3\r\nGET\r\n${}\r\n", 64 * 1024 * 1024).as_bytes(),
    );
    assert!(reply.starts_with("-ERR Protocol error"), "{reply:?}");
    let reply = raw_resp(
        resp,
        b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nNOPE\r\n*1\r\n$3\r\nGET\r\nQUIT\r\n",
    );
    assert!(
        reply.starts_with("$-1\r\n-ERR unknown command 'NOPE'"),
        "{reply:?}"
    );
    assert!(
        reply.contains("-ERR wrong number of arguments for 'get' command"),
        "{reply:?}"
    );
    assert!(
        reply.ends_with("+OK\r\n"),
        "QUIT answers OK and closes: {reply:?}"
    );
    let _: () = bystander.set("s", "text").unwrap();
    let err = bystander.sadd::<_, _, i64>("s", "x").unwrap_err();
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    still_serving(&mut cluster, "after-bad-resp");
}

#[test]
fn t34_auth_is_required_when_a_password_is_set() {
    let mut layout = Layout::mesh(1);
    layout.password = Some("s3cret".into());
    let mut cluster = Cluster::start(layout);
    let resp = cluster.node("a").resp;
    let reply = raw_resp(
        resp,
        b"GET k\r\nAUTH wrong\r\nAUTH anyone s3cret\r\nAUTH s3cret\r\nSET k v\r\nGET k\r\n\
          AUTH default s3cret\r\nQUIT\r\n",
    );
    let wrongpass = "-WRONGPASS invalid username-password pair or user is disabled.\r\n";
    assert_eq!(
        reply,
        format!(
            "-NOAUTH Authentication required.\r\n{wrongpass}{wrongpass}+OK\r\n+OK\r\n\
             $1\r\nv\r\n+OK\r\n+OK\r\n"
        )
    );
}

#[test]
fn t35_a_pipeline_of_reads_is_answered_as_it_goes_not_held() {
    const VALUE_BYTES: usize = 1024 * 1024;
    const READS: usize = 600;
    let mut cluster = Cluster::start(Layout::mesh(1));
    let node = cluster.node("a");
    let _: () = node.redis().set("big", vec![b'x'; VALUE_BYTES]).unwrap();
    let before = node.peak_resident_bytes();
    // One burst of reads, every reply 1 MiB: 600 MiB in all, read back as it comes.
    let mut stream = TcpStream::connect(node.resp).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(&b"GET big\r\n".repeat(READS)).unwrap();
    let reply_bytes = format!("${VALUE_BYTES}\r\n").len() + VALUE_BYTES + 2;
    let mut left = READS * reply_bytes;
    let mut buffer = vec![0u8; 1 << 20];
    while left > 0 {
        let read = stream.read(&mut buffer).unwrap();
        assert!(
            read > 0,
            "the connection closed with {left} bytes of replies unread"
        );
        left = left
            .checked_sub(read)
            .expect("no more bytes than the replies");
    }
    let grown = node.peak_resident_bytes().saturating_sub(before);
    assert!(
        grown < 200 * 1024 * 1024,
        "the node's peak memory grew by {} MiB answering {READS} reads of 1 MiB",
        grown >> 20
    );
}

/// Megabytes of commands of two bytes each, behind a command that grew the connection's buffer:
/// run a burst at a time, not each parsed (hundreds of bytes apiece) before any runs.
#[test]
fn t35_a_buffer_of_tiny_commands_is_run_a_burst_at_a_time() {
    const VALUE_BYTES: usize = 1024 * 1024;
    const COMMANDS: usize = 2 * 1024 * 1024;
    let mut cluster = Cluster::start(Layout::mesh(1));
    let node = cluster.node("a");
    let before = node.peak_resident_bytes();
    let mut request = Vec::with_capacity(2 * VALUE_BYTES + 2 * COMMANDS + 64);
    request.extend_from_slice(b"*5\r\n$4\r\nMSET\r\n");
    for key in ["x", "y"] {
        request.extend_from_slice(format!("$1\r\n{key}\r\n${VALUE_BYTES}\r\n").as_bytes());
        request.extend(std::iter::repeat_n(b'v', VALUE_BYTES));
        request.extend_from_slice(b"\r\n");
    }
    request.extend(b"a\n".repeat(COMMANDS));
    // Ends inside a command: the buffer is never empty, so it keeps the room it grew to.
    request.push(b'a');
    let mut stream = TcpStream::connect(node.resp).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let writing = std::thread::spawn(move || writer.write_all(&request));
    // One line per reply: +OK, then an error for each unknown command `a`.
    let mut lines = 0;
    let mut buffer = vec![0u8; 1 << 20];
    while lines < COMMANDS + 1 {
        let read = stream.read(&mut buffer).unwrap();
        assert!(read > 0, "the connection closed after {lines} replies");
        lines += buffer[..read].iter().filter(|b| **b == b'\n').count();
    }
    writing.join().unwrap().unwrap();
    let grown = node.peak_resident_bytes().saturating_sub(before);
    assert!(
        grown < 64 * 1024 * 1024,
        "the node's peak memory grew by {} MiB for {COMMANDS} commands of 2 bytes",
        grown >> 20
    );
    drop(stream);
    let value: Vec<u8> = node.redis().get("y").unwrap();
    assert_eq!(value.len(), VALUE_BYTES);
}

/// The request and reply limits a client meets: a request past the buffer's bound is refused
/// and the connection closed, having written nothing; a reply past its bound is an error.
#[test]
fn t35_a_request_or_a_reply_past_its_limit_is_refused() {
    const MIB: usize = 1024 * 1024;
    let mut cluster = Cluster::start(Layout::mesh(1));
    let node = cluster.node("a");
    // MSET of three 1 MiB values: 3 MiB, past the 2 MiB and 64 KiB a request may have.
    let mut request = b"PING\r\n*7\r\n$4\r\nMSET\r\n".to_vec();
    for key in ["x", "y", "z"] {
        request.extend_from_slice(format!("$1\r\n{key}\r\n${MIB}\r\n").as_bytes());
        request.extend(std::iter::repeat_n(b'v', MIB));
        request.extend_from_slice(b"\r\n");
    }
    let mut stream = TcpStream::connect(node.resp).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // The node refuses before it has read it all, and closes.
    let mut writer = stream.try_clone().unwrap();
    let writing = std::thread::spawn(move || {
        let _ = writer.write_all(&request);
    });
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    writing.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reply),
        "+PONG\r\n-ERR Protocol error: request too large\r\n"
    );
    let mut redis = node.redis();
    let x: Option<Vec<u8>> = redis.get("x").unwrap();
    assert_eq!(x, None, "a refused request writes nothing");
    // 65 values of 1 MiB: one MGET of them all is past the 64 MiB a reply may have.
    let keys: Vec<String> = (0..65).map(|i| format!("big{i}")).collect();
    for key in &keys {
        let _: () = redis.set(key, vec![b'v'; MIB]).unwrap();
    }
    let err = redis.mget::<_, Vec<Vec<u8>>>(&keys).unwrap_err();
    assert!(
        err.to_string().contains("reply larger than 67108864 bytes"),
        "{err}"
    );
    let some: Vec<Vec<u8>> = redis.mget(&keys[..64]).unwrap();
    assert_eq!(some.len(), 64);
}

#[test]
fn t36_every_key_of_a_command_is_checked_and_a_refused_mset_writes_nothing() {
    let mut cluster = Cluster::start(Layout::mesh(2));
    let resp = cluster.node("a").resp;
    // Before, only the first key was checked: a long second key was committed, every peer
    // refused the batch carrying it, and replication from `a` stopped.
    let long = "k".repeat(64 * 1024 + 1);
    let mut request = Vec::new();
    for args in [
        vec!["MSET", "short", "1", long.as_str(), "v"],
        vec!["DEL", "short", long.as_str()],
        vec!["EXISTS", "short", long.as_str()],
        vec!["GET", "short"],
        vec!["HMSET", "h", "f"],
        vec!["QUIT"],
    ] {
        request.extend(format!("*{}\r\n", args.len()).bytes());
        for arg in args {
            request.extend(format!("${}\r\n{arg}\r\n", arg.len()).bytes());
        }
    }
    let too_long = "-ERR key longer than 65536 bytes\r\n";
    assert_eq!(
        raw_resp(resp, &request),
        format!(
            "{too_long}{too_long}{too_long}$-1\r\n-ERR wrong number of arguments for 'hmset' \
             command\r\n+OK\r\n"
        )
    );
    still_serving(&mut cluster, "after-long-keys");
}

/// Opens a subscription stream to `a` as region c: handshake, then `Subscribe` to a's own
/// events. Returns the stream once a answered the handshake.
async fn subscribe_as_c(
    connection: &quinn::Connection,
    handshake: &[u8],
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let mut payload = handshake.to_vec();
    let subscribe = Message::Subscribe(braid_protocol::Subscribe {
        vector: braid_protocol::VersionVector::new(),
        origins: vec![NodeId(1)],
        rewind: false,
    });
    frame::encode(&subscribe, &mut payload).unwrap();
    send.write_all(&payload).await.unwrap();
    read_message(&mut recv).await.expect("a's handshake");
    (send, recv)
}

#[test]
fn t37_a_replaced_stream_is_ended_and_a_peer_may_open_no_unidirectional_stream() {
    let mut cluster = Cluster::start(Layout::mesh(3).without_running("c"));
    let c = cluster.nodes.iter().find(|n| n.name == "c").unwrap();
    let config = NodeConfig::load(&c.config).unwrap();
    let a = cluster.nodes.iter().find(|n| n.name == "a").unwrap();
    let mut handshake = Vec::new();
    let hello = Message::Handshake(Handshake {
        protocol_version: PROTOCOL_VERSION,
        cluster_id: config.cluster_id().unwrap(),
        node_id: NodeId(3),
    });
    frame::encode(&hello, &mut handshake).unwrap();
    let (first_ended, uni_opened) = runtime().block_on(async {
        let endpoint = client(&config.tls.ca_cert, &config.tls.cert, &config.tls.key);
        let connection = endpoint.connect(a.peer, "node-1").unwrap().await.unwrap();
        // The first stream stays open on this side; a second subscription replaces it at a.
        let (_first_send, mut first) = subscribe_as_c(&connection, &handshake).await;
        let (_second_send, _second) = subscribe_as_c(&connection, &handshake).await;
        // a forgot the first stream: it must end it, not leave it open and silent (the peer
        // would wait on it for ever, its re-subscriptions unanswered).
        let first_ended =
            tokio::time::timeout(Duration::from_secs(5), first.read_to_end(1 << 20)).await;
        let uni = tokio::time::timeout(Duration::from_secs(1), connection.open_uni()).await;
        (first_ended.is_ok(), uni.is_ok_and(|opened| opened.is_ok()))
    });
    assert!(first_ended, "the replaced stream was left open");
    assert!(!uni_opened, "a peer could open a unidirectional stream");
    still_serving(&mut cluster, "after-replaced-stream");
}

/// Reads one frame's message from `recv`, or `None` at its end.
async fn read_message(recv: &mut quinn::RecvStream) -> Option<Message> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await.ok()?;
    let mut frame = prefix.to_vec();
    frame.resize(4 + u32::from_be_bytes(prefix) as usize, 0);
    recv.read_exact(&mut frame[4..]).await.ok()?;
    frame::decode(&frame).ok()?.map(|(message, _)| message)
}

#[test]
fn t38_a_peer_that_refuses_every_subscription_is_retried_with_backoff() {
    let mut cluster = Cluster::start(Layout::mesh(3).without_running("c"));
    let c = cluster.nodes.iter().find(|n| n.name == "c").unwrap();
    let config = NodeConfig::load(&c.config).unwrap();
    let tls = MeshTls::load(&config.tls.ca_cert, &config.tls.cert, &config.tls.key).unwrap();
    let hello = Message::Handshake(Handshake {
        protocol_version: PROTOCOL_VERSION,
        cluster_id: config.cluster_id().unwrap(),
        node_id: NodeId(3),
    });
    let refusal = Message::Error(braid_protocol::ErrorMessage {
        code: ErrorCode::Internal,
        text: "not now".into(),
    });
    // Region c's address answers as c would if it refused every subscription at once (it is
    // behind, or does not link them yet): handshake, then an error and the end of the stream.
    let refused = runtime().block_on(async {
        let server = quinn::Endpoint::server(tls.server, c.peer).unwrap();
        let started = tokio::time::Instant::now();
        let times = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let serving = {
            let times = times.clone();
            async move {
                while let Some(incoming) = server.accept().await {
                    let (times, hello, refusal) = (times.clone(), hello.clone(), refusal.clone());
                    tokio::spawn(async move {
                        let Ok(connection) = incoming.await else {
                            return;
                        };
                        while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                            let mut out = Vec::new();
                            frame::encode(&hello, &mut out).unwrap();
                            let _ = send.write_all(&out).await;
                            let _ = read_message(&mut recv).await;
                            if let Some(Message::Subscribe(_)) = read_message(&mut recv).await {
                                times.lock().unwrap().push(started.elapsed());
                            }
                            out.clear();
                            frame::encode(&refusal, &mut out).unwrap();
                            let _ = send.write_all(&out).await;
                            let _ = send.finish();
                        }
                    });
                }
            }
        };
        // Attempts a and b began while nothing listened at c's address end first (a QUIC
        // connection attempt gives up after the idle timeout, 10 s).
        let _ = tokio::time::timeout(Duration::from_secs(16), serving).await;
        let times = times.lock().unwrap().clone();
        let first = *times.first().expect("nobody subscribed to c");
        times
            .iter()
            .filter(|t| **t < first + Duration::from_secs(4))
            .count()
    });
    // a and b each back off 100, 200, 400 ms... up to 2 s between refusals: at most about six
    // subscriptions each in 4 s. Before, a clean refusal reset the backoff: one every 100 ms.
    assert!(refused <= 12, "{refused} subscriptions refused in 4 s");
    still_serving(&mut cluster, "after-refusals");
}

/// An HTTP/1.1 request as given, answered: the status code and the body's text.
fn raw_http(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn t39_admin_posts_a_web_page_could_send_or_that_are_malformed_are_refused_first() {
    let mut cluster = Cluster::start(Layout::mesh(3));
    let http = cluster.node("a").http;
    // What a web page's form may post: refused before anything happens, whatever the state
    // of the control plane.
    let form = "application/x-www-form-urlencoded";
    let reply = raw_http(http, "POST", "/leave", form, "");
    assert!(reply.starts_with("HTTP/1.1 415"), "{reply}");
    let reply = raw_http(http, "POST", "/remove", form, "region=b");
    assert!(reply.starts_with("HTTP/1.1 415"), "{reply}");
    // A keyspace prefix the control plane would refuse is a bad request, not a conflict, and
    // is refused before it reaches the Raft log.
    let json = "application/json";
    let body = r#"{"prefix": "", "writers": []}"#;
    let reply = raw_http(http, "POST", "/keyspace", json, body);
    assert!(
        reply.starts_with("HTTP/1.1 400") && reply.contains("1 to 128 bytes"),
        "{reply}"
    );
    let long = format!(r#"{{"prefix": "{}", "writers": []}}"#, "p".repeat(129));
    let reply = raw_http(http, "POST", "/keyspace", json, &long);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    // A page whose name was pointed at the node (DNS rebinding) sends its own name as Host.
    let mut stream = TcpStream::connect(http).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
        .write_all(
            b"POST /leave HTTP/1.1\r\nHost: evil.example:7001\r\nContent-Type: \
              application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        )
        .unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    assert!(
        reply.starts_with("HTTP/1.1 403") && reply.contains("IP address or localhost"),
        "{reply}"
    );
    // Fault injection is off: 403, whatever the body.
    let reply = raw_http(http, "POST", "/faults", json, "not json");
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    // A body past the 2 MiB an admin request may have: too large, not malformed.
    let mut stream = TcpStream::connect(http).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let body = format!(r#"{{"links": [["{}", "b"]]}}"#, "a".repeat(3 << 20));
    let request = format!(
        "POST /topology HTTP/1.1\r\nHost: {http}\r\nContent-Type: {json}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // The node may answer and close before it has read the rest.
    let mut writer = stream.try_clone().unwrap();
    let writing = std::thread::spawn(move || {
        let _ = writer.write_all(request.as_bytes());
    });
    let mut reply = [0u8; 12];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(
        &reply,
        b"HTTP/1.1 413",
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
    drop(stream);
    writing.join().unwrap();
    // The region never began to leave: it takes writes.
    still_serving(&mut cluster, "after-admin-refusals");
}

#[test]
fn t30_idle_and_slow_http_connections_are_closed_and_free_their_place() {
    let mut cluster = Cluster::start(Layout::mesh(2));
    let http = cluster.node("a").http;
    // More connections than the server serves at once, none sending a byte.
    let idle: Vec<TcpStream> = (0..braid_node::http::HTTP_CONNECTIONS_MAX + 8)
        .map(|_| TcpStream::connect(http).unwrap())
        .collect();
    // A request waits for a place, and gets one once the idle ones are closed.
    let started = std::time::Instant::now();
    let reply = raw_http(http, "GET", "/health", "text/plain", "");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        started.elapsed() >= braid_node::http::HTTP_HEADER_READ_TIMEOUT / 2,
        "answered while every place was taken"
    );
    // Each idle connection was closed by the server: reading finds its end.
    for mut stream in idle {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 64];
        match stream.read(&mut buf) {
            Ok(0) => {}
            Err(e)
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!("an idle connection was kept: {other:?}"),
        }
    }
    still_serving(&mut cluster, "after-idle-http");
}

#[test]
fn t30_idle_connections_give_back_what_a_large_reply_took() {
    const KEYS: usize = 8;
    const CONNECTIONS: usize = 24;
    let mut cluster = Cluster::start(Layout::mesh(1));
    let node = cluster.node("a");
    let mut writer = node.redis();
    for i in 0..KEYS {
        let _: () = writer
            .set(format!("big{i}"), vec![b'x'; 1024 * 1024])
            .unwrap();
    }
    let mget = format!(
        "MGET {}\r\n",
        (0..KEYS)
            .map(|i| format!("big{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let reply_bytes = 4 + KEYS * (format!("${}\r\n", 1024 * 1024).len() + 1024 * 1024 + 2);
    let before = node.resident_bytes();
    // Each connection reads an 8 MiB reply, then stays open, idle.
    let mut idle = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut stream = TcpStream::connect(node.resp).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.write_all(mget.as_bytes()).unwrap();
        let mut left = reply_bytes;
        let mut buffer = vec![0u8; 1 << 20];
        while left > 0 {
            let read = stream.read(&mut buffer).unwrap();
            assert!(read > 0, "closed with {left} bytes unread");
            left = left.checked_sub(read).expect("no more than the reply");
        }
        idle.push(stream);
    }
    std::thread::sleep(Duration::from_millis(200));
    let held = node.resident_bytes().saturating_sub(before);
    assert!(
        held < 96 * 1024 * 1024,
        "{CONNECTIONS} idle connections hold {} MiB after 8 MiB replies",
        held >> 20
    );
    drop(idle);
}
