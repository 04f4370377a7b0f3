//! The control plane's calls as bytes: how a Raft request, a forwarded proposal and their
//! answers are encoded (bincode 2, bounded by the frame limit), and how a node answers a call
//! with its Raft. The node carries these bytes over QUIC ([`super::quic`]); the in-process
//! [`super::router`] carries the same bytes in the simulator and the tests, so both run the
//! same serving code.

use std::time::Duration;

use braid_protocol::control::ControlCommand;
use braid_protocol::limits::FRAME_BYTES_MAX;
use braid_protocol::{NodeId, RaftCall, RaftRequest};
use bytes::Bytes;
use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::AsyncRuntime;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::runtime::BraidRuntime;
use super::store::CONTROL_SNAPSHOT_BYTES_MAX;
use super::{ControlConfig, ControlRaft, ControlReply};

type RaftNodeId = u64;

/// Longest a leader works on a forwarded proposal: the forwarding node waits 5 s for it.
const PROPOSE_SERVE_MS_MAX: u64 = 5_000;

/// What a `Propose` call answers: the leader's reply, or why it could not commit.
pub type ProposeResult = Result<ControlReply, String>;

fn wire() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<FRAME_BYTES_MAX>,
> {
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>()
}

/// Encodes a call's body or answer.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Bytes, String> {
    bincode::serde::encode_to_vec(value, wire())
        .map(Bytes::from)
        .map_err(|e| format!("cannot encode: {e}"))
}

/// Decodes a call's body or answer; bytes from a peer, so a typed error, never a panic.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bincode::serde::decode_from_slice(bytes, wire()) {
        Ok((value, used)) if used == bytes.len() => Ok(value),
        Ok((_, used)) => Err(format!(
            "{} unexpected bytes after the body",
            bytes.len() - used
        )),
        Err(e) => Err(format!("malformed body: {e}")),
    }
}

/// Commits `command` through this node's Raft if it is the leader; says who is otherwise.
pub(crate) async fn propose_here(
    raft: &ControlRaft,
    command: ControlCommand,
) -> Result<ControlReply, Proposal> {
    match raft.client_write(command).await {
        Ok(response) => Ok(response.data),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
            Err(Proposal::Forward(forward.leader_id.map(NodeId)))
        }
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
            Err(Proposal::Failed(e.to_string()))
        }
        Err(RaftError::Fatal(fatal)) => Err(Proposal::Failed(fatal.to_string())),
    }
}

/// Why this node did not commit a proposal itself.
#[derive(Debug)]
pub(crate) enum Proposal {
    /// It is not the leader; the leader, when known.
    Forward(Option<NodeId>),
    /// It failed.
    Failed(String),
}

/// Answers one call with this node's Raft: the answer encoded, or why the call is malformed.
pub async fn answer(raft: &ControlRaft, request: &RaftRequest) -> Result<Bytes, String> {
    match request.call {
        RaftCall::AppendEntries => {
            let rpc: AppendEntriesRequest<ControlConfig> = decode(&request.body)?;
            encode(&raft.append_entries(rpc).await)
        }
        RaftCall::Vote => {
            let rpc: VoteRequest<RaftNodeId> = decode(&request.body)?;
            encode(&raft.vote(rpc).await)
        }
        RaftCall::InstallSnapshot => {
            let rpc: InstallSnapshotRequest<ControlConfig> = decode(&request.body)?;
            check_snapshot_chunk(&rpc)?;
            encode(&raft.install_snapshot(rpc).await)
        }
        RaftCall::Propose => {
            let command: ControlCommand = decode(&request.body)?;
            // Bounded like the caller's wait: a leader cut off from the others would wait for
            // its commit forever.
            let bound = Duration::from_millis(PROPOSE_SERVE_MS_MAX);
            let result: ProposeResult =
                match BraidRuntime::timeout(bound, propose_here(raft, command)).await {
                    Ok(Ok(reply)) => Ok(reply),
                    Ok(Err(Proposal::Forward(leader))) => Err(match leader {
                        Some(leader) => format!("not the leader ({leader} is)"),
                        None => "not the leader, and no leader is known".into(),
                    }),
                    Ok(Err(Proposal::Failed(why))) => Err(why),
                    Err(_) => Err(format!(
                        "not committed within {PROPOSE_SERVE_MS_MAX} ms (it may still commit)"
                    )),
                };
            encode(&result)
        }
    }
}

/// Refuses a snapshot chunk that reaches past the largest snapshot: openraft writes each chunk
/// at its offset into a buffer in memory, which a chunk at a huge offset would grow to its
/// offset, zeroes included.
fn check_snapshot_chunk(rpc: &InstallSnapshotRequest<ControlConfig>) -> Result<(), String> {
    let end = rpc.offset.saturating_add(rpc.data.len() as u64);
    match end > CONTROL_SNAPSHOT_BYTES_MAX as u64 {
        true => Err(format!(
            "a snapshot chunk reaching byte {end}, past the largest snapshot \
             ({CONTROL_SNAPSHOT_BYTES_MAX} bytes)"
        )),
        false => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::error::{Fatal, InstallSnapshotError};
    use openraft::raft::{InstallSnapshotResponse, VoteResponse};
    use openraft::{StorageError, StorageIOError, Vote};

    #[test]
    fn raft_calls_and_their_errors_survive_the_wire() {
        let vote = VoteRequest::new(Vote::new(3, 2), None);
        let back: VoteRequest<RaftNodeId> = decode(&encode(&vote).unwrap()).unwrap();
        assert_eq!(back, vote);

        let io = std::io::Error::other("disk gone");
        let fatal: RaftError<RaftNodeId> = RaftError::Fatal(Fatal::StorageError(
            StorageError::from(StorageIOError::write_logs(&io)),
        ));
        let answer: Result<VoteResponse<RaftNodeId>, _> = Err(fatal);
        let bytes = encode(&answer).unwrap();
        let back: Result<VoteResponse<RaftNodeId>, RaftError<RaftNodeId>> = decode(&bytes).unwrap();
        assert!(back.unwrap_err().to_string().contains("disk gone"));

        let snapshot_error: Result<InstallSnapshotResponse<RaftNodeId>, _> =
            Err(RaftError::<RaftNodeId, _>::APIError(
                InstallSnapshotError::SnapshotMismatch(openraft::error::SnapshotMismatch {
                    expect: openraft::SnapshotSegmentId {
                        id: "a".into(),
                        offset: 0,
                    },
                    got: openraft::SnapshotSegmentId {
                        id: "b".into(),
                        offset: 7,
                    },
                }),
            ));
        let back: Result<
            InstallSnapshotResponse<RaftNodeId>,
            RaftError<RaftNodeId, InstallSnapshotError>,
        > = decode(&encode(&snapshot_error).unwrap()).unwrap();
        assert!(matches!(
            back,
            Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(
                _
            )))
        ));
    }

    #[test]
    fn a_snapshot_chunk_past_the_largest_snapshot_is_refused() {
        let chunk = |offset: u64, len: usize| InstallSnapshotRequest::<ControlConfig> {
            vote: Vote::new(1, 1),
            meta: Default::default(),
            offset,
            data: vec![0; len],
            done: false,
        };
        let max = CONTROL_SNAPSHOT_BYTES_MAX as u64;
        assert!(check_snapshot_chunk(&chunk(0, 1024)).is_ok());
        assert!(check_snapshot_chunk(&chunk(max - 10, 10)).is_ok());
        let err = check_snapshot_chunk(&chunk(max - 10, 11)).unwrap_err();
        assert!(err.contains("past the largest snapshot"), "{err}");
        assert!(check_snapshot_chunk(&chunk(1 << 40, 1)).is_err());
        assert!(check_snapshot_chunk(&chunk(u64::MAX, 1)).is_err());
    }

    #[test]
    fn a_malformed_body_is_an_error_not_a_panic() {
        let bytes = encode(&ControlCommand::Activate(NodeId(1))).unwrap();
        for cut in 0..bytes.len() {
            let _ = decode::<ControlCommand>(&bytes[..cut]);
        }
        assert!(decode::<ControlCommand>(&[0xff; 9]).is_err());
        let mut long = bytes.to_vec();
        long.push(0);
        let err = decode::<ControlCommand>(&long).unwrap_err();
        assert!(err.contains("unexpected bytes"), "{err}");
    }
}
