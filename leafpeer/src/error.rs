//! Errors of the leaf library.

use tonic::Code;

/// Why a leaf call failed.
#[derive(Debug, thiserror::Error)]
pub enum LeafError {
    /// The configuration cannot work (no seeds, unreadable CA certificate, ...).
    #[error("invalid leaf configuration: {0}")]
    Config(String),
    /// No seed super peer could be reached or attached to.
    #[error("cannot attach to any super peer: {}", .0.join("; "))]
    Unreachable(Vec<String>),
    /// The request was checked locally and cannot succeed (too large, malformed). (Not marked as the error's
    /// source, like `Status`: the message already holds it, and error chains would print it twice.)
    #[error("invalid request: {0}")]
    Invalid(vesper_proto::validate::InvalidInput),
    /// The super peer answered with an error status. (Not marked as the error's source: the message already
    /// says all the status says, and error chains would print it twice.)
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    /// One super peer could not be reached.
    #[error("{0}")]
    Connect(String),
    /// The session ended.
    #[error("session closed: {0}")]
    SessionClosed(String),
    /// A peer-to-peer connection could not be made or broke.
    #[error("peer connection: {0}")]
    PeerConnection(String),
    /// The relay refused or failed.
    #[error("relay: {0}")]
    Relay(String),
    /// A super peer ended the session for good: the peer attached more sessions at once than the cluster allows
    /// (`validate::MAX_SESSIONS_PER_PEER`) and this was its oldest.
    #[error("session superseded: {0}")]
    Superseded(String),
    /// The super peer and this library speak no protocol version in common.
    #[error("incompatible protocol: {0}")]
    Incompatible(String),
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "invalid argument",
        Code::PermissionDenied => "permission denied",
        Code::FailedPrecondition => "failed precondition",
        Code::Unauthenticated => "unauthenticated",
        Code::ResourceExhausted => "limit exceeded",
        Code::Unavailable => "unavailable",
        Code::NotFound => "not found",
        Code::DeadlineExceeded => "deadline exceeded",
        _ => "error",
    }
}

impl From<vesper_proto::validate::InvalidInput> for LeafError {
    fn from(input: vesper_proto::validate::InvalidInput) -> Self {
        LeafError::Invalid(input)
    }
}

impl From<tonic::Status> for LeafError {
    fn from(status: tonic::Status) -> Self {
        LeafError::Status(status)
    }
}

impl LeafError {
    /// The gRPC code, when the super peer answered with one.
    pub fn code(&self) -> Option<Code> {
        match self {
            LeafError::Status(status) => Some(status.code()),
            _ => None,
        }
    }
}
