//! Errors of the super peer's services and their one mapping to gRPC status codes.
//!
//! Every variant names what failed; `into_status` is the only place that chooses a code:
//! bad input -> INVALID_ARGUMENT, a size or count limit -> RESOURCE_EXHAUSTED, ownership -> PERMISSION_DENIED,
//! stale compare-and-set or no common protocol version -> FAILED_PRECONDITION, no or bad session -> UNAUTHENTICATED, no leader or not yet part
//! of a cluster -> UNAVAILABLE (retry), storage failure -> INTERNAL.
//!
//! A failed openraft call keeps openraft's own error ([`RaftFailure`]) up to here, where its kind picks the code
//! (see [`raft_status`]): every kind is UNAVAILABLE, since each one passes (a leader change, a membership change
//! in progress, a lost quorum) or means Raft stopped on this member while another may serve; when openraft names
//! the leader, its Cluster address rides along as the leader hint.

use openraft::errors::{ClientWriteError, Fatal, LinearizableReadError, RaftError};
use tonic::{Code, Status};
use vesper_proto::validate::InvalidInput;

use crate::command::Rejection;
use crate::raft_types::TypeConfig;
use crate::store::StoreError;

/// What an openraft write (a command, adding a learner, a membership change) fails with.
pub type WriteError = RaftError<TypeConfig, ClientWriteError<TypeConfig>>;
/// What asking openraft for the leader's read index fails with.
pub type ReadIndexError = RaftError<TypeConfig, LinearizableReadError<TypeConfig>>;

/// A failure of the Raft layer, with openraft's error kept whole: `into_status` picks the code from its kind.
/// (openraft's errors are boxed: they are large, and every `ServiceError` would carry their size.)
#[derive(Debug, thiserror::Error)]
pub enum RaftFailure {
    /// A write: a command, adding a learner, a membership change.
    #[error(transparent)]
    Write(Box<WriteError>),
    /// Asking for the leader's read index.
    #[error(transparent)]
    ReadIndex(Box<ReadIndexError>),
    /// Raft stopped (what a call fails with that can fail in no other way, such as a leadership transfer).
    #[error(transparent)]
    Fatal(Box<Fatal<TypeConfig>>),
    /// The Raft layer failed outside an openraft call: the node is shutting down or could not start Raft, or an
    /// answer had the wrong shape.
    #[error("{0}")]
    Other(String),
}

impl From<WriteError> for RaftFailure {
    fn from(error: WriteError) -> Self {
        RaftFailure::Write(Box::new(error))
    }
}

impl From<ReadIndexError> for RaftFailure {
    fn from(error: ReadIndexError) -> Self {
        RaftFailure::ReadIndex(Box::new(error))
    }
}

impl From<Fatal<TypeConfig>> for RaftFailure {
    fn from(error: Fatal<TypeConfig>) -> Self {
        RaftFailure::Fatal(Box::new(error))
    }
}

impl From<String> for RaftFailure {
    fn from(message: String) -> Self {
        RaftFailure::Other(message)
    }
}

impl From<&str> for RaftFailure {
    fn from(message: &str) -> Self {
        RaftFailure::Other(message.to_string())
    }
}

/// An error of a super peer service call.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid request: {0}")]
    Invalid(#[from] InvalidInput),
    #[error("invalid request: {0}")]
    BadField(String),
    #[error("{0}")]
    Rejected(#[from] Rejection),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("this super peer has not joined a cluster yet")]
    NotInCluster,
    #[error("no leader is known right now; retry shortly")]
    NoLeader,
    #[error("{0}")]
    Unavailable(String),
    #[error("not the leader; the leader is node {leader_id} at {leader_addr}")]
    NotLeader { leader_id: u64, leader_addr: String },
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Precondition(String),
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
    #[error("raft failed: {0}")]
    Raft(#[from] RaftFailure),
    #[error("call to {peer} failed: {status}")]
    Peer { peer: String, status: Status },
    #[error("encoding failed: {0}")]
    Codec(String),
    #[error("{0}")]
    RateLimited(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// A limit of this super peer (in-flight sends, sessions per address, relay allocations) is reached.
    #[error("{0}")]
    LimitReached(String),
    /// A frame or wire value that breaks the protocol (not a field of a request).
    #[error("{0}")]
    Malformed(String),
    /// Something that should not happen did (a response of the wrong kind); a bug, reported as INTERNAL.
    #[error("{0}")]
    Internal(String),
    /// The other side speaks no protocol version this super peer speaks (or names none).
    #[error("{0}")]
    Incompatible(#[from] vesper_proto::version::VersionError),
    #[error("the leader at {leader} went away before answering ({reason}); the write may or may not have been applied")]
    OutcomeUnknown { leader: String, reason: String },
}

/// Metadata key carrying the leader's Cluster address with NotLeader errors (and with a Raft failure that names
/// the leader).
pub const LEADER_HINT_METADATA_KEY: &str = "x-vesper-leader";

impl From<WriteError> for ServiceError {
    fn from(error: WriteError) -> Self {
        ServiceError::Raft(error.into())
    }
}

impl From<ReadIndexError> for ServiceError {
    fn from(error: ReadIndexError) -> Self {
        ServiceError::Raft(error.into())
    }
}

impl From<Fatal<TypeConfig>> for ServiceError {
    fn from(error: Fatal<TypeConfig>) -> Self {
        ServiceError::Raft(error.into())
    }
}

/// The status of a Raft failure, by its kind. Every kind is UNAVAILABLE (the call may succeed later or on another
/// member); the match names them all so that a new kind, or a kind that deserves another code, is decided here.
fn raft_status(failure: &RaftFailure, message: String) -> Status {
    use openraft::errors::ChangeMembershipError as Membership;
    let forward = match failure {
        RaftFailure::Write(error) => match error.as_ref() {
            // Not (or no longer) the leader, or the entry was discarded by a new leader (outcome unknown).
            RaftError::APIError(
                ClientWriteError::ForwardToLeader(forward)
                | ClientWriteError::LogEntryDiscarded(forward),
            ) => Some(forward),
            // Another membership change is in progress, or this one cannot be made now.
            RaftError::APIError(ClientWriteError::ChangeMembershipError(
                Membership::InProgress(_)
                | Membership::EmptyMembership(_)
                | Membership::LearnerNotFound(_)
                | Membership::UnsupportedMembershipTransition(_)
                | Membership::UncommittedLeaderLog(_)
                | Membership::NodeMetadataChanged(_),
            )) => None,
            // Vesper attaches no preconditions to its writes.
            RaftError::APIError(ClientWriteError::PreconditionFailed(_)) => None,
            // Raft stopped on this member (shutting down, or its storage failed): another member may serve.
            RaftError::Fatal(_) => None,
        },
        RaftFailure::ReadIndex(error) => match error.as_ref() {
            RaftError::APIError(LinearizableReadError::ForwardToLeader(forward)) => Some(forward),
            // The leader could not reach a quorum to confirm it still leads.
            RaftError::APIError(LinearizableReadError::QuorumNotEnough(_)) => None,
            RaftError::Fatal(_) => None,
        },
        RaftFailure::Fatal(_) | RaftFailure::Other(_) => None,
    };
    let mut status = Status::unavailable(message);
    let hint = forward
        .and_then(|forward| forward.leader_node.as_ref())
        .and_then(|leader| leader.cluster_addr.parse().ok());
    if let Some(hint) = hint {
        status.metadata_mut().insert(LEADER_HINT_METADATA_KEY, hint);
    }
    status
}

impl ServiceError {
    /// The gRPC status for this error.
    pub fn into_status(self) -> Status {
        let message = self.to_string();
        match self {
            ServiceError::Invalid(input) if input.is_limit() => Status::resource_exhausted(message),
            ServiceError::Invalid(_) | ServiceError::BadField(_) => {
                Status::invalid_argument(message)
            }
            ServiceError::Rejected(
                Rejection::NotOwner | Rejection::NamespaceWrite(_) | Rejection::NamespaceRead(_),
            ) => Status::permission_denied(message),
            ServiceError::Rejected(Rejection::VersionMismatch { .. })
            | ServiceError::Rejected(Rejection::NotAttached | Rejection::NoSuchAdoption) => {
                Status::failed_precondition(message)
            }
            ServiceError::Rejected(
                Rejection::MailboxFull { .. } | Rejection::IndexQuota { .. },
            ) => Status::resource_exhausted(message),
            ServiceError::Rejected(Rejection::ConferenceExists) => Status::already_exists(message),
            ServiceError::Rejected(Rejection::UnknownConference) => Status::not_found(message),
            ServiceError::Rejected(
                Rejection::NotConferenceOwner | Rejection::NotInvited | Rejection::NotParticipant,
            ) => Status::permission_denied(message),
            ServiceError::Rejected(Rejection::UnknownNode(_)) | ServiceError::NotFound(_) => {
                Status::not_found(message)
            }
            ServiceError::Unauthenticated(_) => Status::unauthenticated(message),
            ServiceError::NotInCluster
            | ServiceError::NoLeader
            | ServiceError::Unavailable(_)
            | ServiceError::OutcomeUnknown { .. } => Status::unavailable(message),
            ServiceError::Raft(failure) => raft_status(&failure, message),
            ServiceError::NotLeader { leader_addr, .. } => {
                let mut status = Status::failed_precondition(message);
                if let Ok(value) = leader_addr.parse() {
                    status
                        .metadata_mut()
                        .insert(LEADER_HINT_METADATA_KEY, value);
                }
                status
            }
            ServiceError::Timeout(_) => Status::deadline_exceeded(message),
            ServiceError::RateLimited(_) | ServiceError::LimitReached(_) => {
                Status::resource_exhausted(message)
            }
            ServiceError::Malformed(_) => Status::invalid_argument(message),
            ServiceError::Internal(_) => Status::internal(message),
            ServiceError::PermissionDenied(_) => Status::permission_denied(message),
            ServiceError::Precondition(_) | ServiceError::Incompatible(_) => {
                Status::failed_precondition(message)
            }
            ServiceError::Store(_) | ServiceError::Codec(_) => Status::internal(message),
            ServiceError::Peer { status, .. } => Status::new(status.code(), message),
        }
    }

    /// Whether the call may succeed if retried, perhaps against a new leader: no leader yet, a stale leader
    /// hint, or a peer that could not be reached.
    pub fn is_retriable(&self) -> bool {
        match self {
            ServiceError::NoLeader | ServiceError::NotLeader { .. } => true,
            ServiceError::Peer { status, .. } => match status.code() {
                Code::Unavailable => true,
                Code::FailedPrecondition => {
                    status.metadata().get(LEADER_HINT_METADATA_KEY).is_some()
                }
                _ => false,
            },
            _ => false,
        }
    }
}

/// A status another member sent as a code and a message (a forwarded outcome): not a code this node picks.
pub fn status_from_wire(code: i32, message: String) -> Status {
    Status::new(Code::from(code), message)
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        error.into_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_table() {
        let too_long = InvalidInput::TooLong {
            field: "value",
            len: 2,
            max: 1,
        };
        assert_eq!(
            ServiceError::from(too_long).into_status().code(),
            Code::ResourceExhausted
        );
        let bad = InvalidInput::Empty { field: "key" };
        assert_eq!(
            ServiceError::from(bad).into_status().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            ServiceError::from(Rejection::NotOwner).into_status().code(),
            Code::PermissionDenied
        );
        let stale = Rejection::VersionMismatch {
            expected: 1,
            current: 2,
        };
        let status = ServiceError::from(stale).into_status();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("expected 1, current 2"));
        let not_leader = ServiceError::NotLeader {
            leader_id: 2,
            leader_addr: "127.0.0.1:9".into(),
        }
        .into_status();
        assert_eq!(
            not_leader.metadata().get(LEADER_HINT_METADATA_KEY).unwrap(),
            "127.0.0.1:9"
        );
    }

    #[test]
    fn limits_protocol_breaks_and_bugs_keep_their_message_and_get_their_code() {
        for (error, code) in [
            (
                ServiceError::LimitReached("at most 8".into()),
                Code::ResourceExhausted,
            ),
            (
                ServiceError::RateLimited("slow down".into()),
                Code::ResourceExhausted,
            ),
            (
                ServiceError::Malformed("bad frame".into()),
                Code::InvalidArgument,
            ),
            (ServiceError::Internal("odd answer".into()), Code::Internal),
            (ServiceError::Unavailable("later".into()), Code::Unavailable),
            (
                ServiceError::PermissionDenied("no".into()),
                Code::PermissionDenied,
            ),
            (
                ServiceError::Incompatible(
                    vesper_proto::version::Range::from_wire(0, 0, "Attach.protocol_newest")
                        .unwrap_err(),
                ),
                Code::FailedPrecondition,
            ),
        ] {
            let message = error.to_string();
            let status = error.into_status();
            assert_eq!((status.code(), status.message()), (code, message.as_str()));
        }
        let forwarded = status_from_wire(Code::NotFound as i32, "gone".into());
        assert_eq!(
            (forwarded.code(), forwarded.message()),
            (Code::NotFound, "gone")
        );
    }

    #[test]
    fn raft_failures_keep_openraft_messages_get_unavailable_and_name_a_known_leader() {
        use openraft::errors::{
            ChangeMembershipError, EmptyMembership, ForwardToLeader, LearnerNotFound,
            QuorumNotEnough,
        };

        use crate::command::NodeInfo;

        let leader = || {
            ForwardToLeader::<TypeConfig>::new(
                2,
                NodeInfo {
                    cluster_addr: "127.0.0.1:9".into(),
                    ..NodeInfo::default()
                },
            )
        };
        let write =
            |error: ClientWriteError<TypeConfig>| RaftFailure::from(WriteError::APIError(error));
        let read = |error: LinearizableReadError<TypeConfig>| {
            RaftFailure::from(ReadIndexError::APIError(error))
        };
        let membership = |error: ChangeMembershipError<_, u64>| {
            write(ClientWriteError::ChangeMembershipError(error))
        };
        let table: Vec<(RaftFailure, Option<&str>)> = vec![
            (
                write(ClientWriteError::ForwardToLeader(leader())),
                Some("127.0.0.1:9"),
            ),
            (
                write(ClientWriteError::ForwardToLeader(ForwardToLeader::empty())),
                None,
            ),
            (
                write(ClientWriteError::LogEntryDiscarded(leader())),
                Some("127.0.0.1:9"),
            ),
            (membership(EmptyMembership {}.into()), None),
            (membership(LearnerNotFound { node_id: 4 }.into()), None),
            (
                read(LinearizableReadError::ForwardToLeader(leader())),
                Some("127.0.0.1:9"),
            ),
            (
                read(LinearizableReadError::QuorumNotEnough(QuorumNotEnough {
                    cluster: "{1, 2, 3}".into(),
                    got: [1].into(),
                })),
                None,
            ),
            (WriteError::Fatal(Fatal::Stopped).into(), None),
            (ReadIndexError::Fatal(Fatal::Panicked).into(), None),
            (Fatal::<TypeConfig>::Stopped.into(), None),
            ("the node is shutting down".into(), None),
        ];
        for (failure, hint) in table {
            let openraft_says = failure.to_string();
            let error = ServiceError::from(failure);
            let message = error.to_string();
            assert_eq!(message, format!("raft failed: {openraft_says}"));
            let status = error.into_status();
            assert_eq!(
                (status.code(), status.message()),
                (Code::Unavailable, message.as_str())
            );
            let sent = status
                .metadata()
                .get(LEADER_HINT_METADATA_KEY)
                .map(|value| value.to_str().unwrap());
            assert_eq!(sent, hint, "{message}");
        }
    }

    #[test]
    fn raft_failures_read_as_before() {
        let stopped = ServiceError::from(Fatal::<TypeConfig>::Stopped);
        assert_eq!(stopped.to_string(), "raft failed: raft stopped");
        assert!(!stopped.is_retriable());
        let learner = ServiceError::from(WriteError::APIError(
            ClientWriteError::ChangeMembershipError(
                openraft::errors::LearnerNotFound { node_id: 4 }.into(),
            ),
        ));
        assert_eq!(
            learner.to_string(),
            "raft failed: Learner 4 not found: add it as learner before adding it as a voter"
        );
    }
}
