//! Errors of the super peer's services and their one mapping to gRPC status codes.
//!
//! Every variant names what failed; `into_status` is the only place that chooses a code:
//! bad input -> INVALID_ARGUMENT, a size or count limit -> RESOURCE_EXHAUSTED, ownership -> PERMISSION_DENIED,
//! stale compare-and-set or no common protocol version -> FAILED_PRECONDITION, no or bad session -> UNAUTHENTICATED, no leader or not yet part
//! of a cluster -> UNAVAILABLE (retry), storage failure -> INTERNAL.

use tonic::{Code, Status};
use vesper_proto::validate::InvalidInput;

use crate::command::Rejection;
use crate::store::StoreError;

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
    Raft(String),
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

/// Metadata key carrying the leader's Cluster address with NotLeader errors.
pub const LEADER_HINT_METADATA_KEY: &str = "x-vesper-leader";

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
            | ServiceError::Rejected(Rejection::NotAttached) => {
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
            | ServiceError::Raft(_)
            | ServiceError::OutcomeUnknown { .. } => Status::unavailable(message),
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
}
