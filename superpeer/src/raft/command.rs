//! State machine commands and their responses: the only things that go through the Raft log.
//!
//! Apply must be deterministic, so everything that varies (the time, the caller's identity) travels inside the
//! command, filled in by the super peer that proposes it, never read from the clock during apply.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Raw Ed25519 public key of a peer (its `PeerId`), as stored.
pub type PeerKey = [u8; 32];

/// A command proposed to the Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Proposer's wall clock in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What to do.
    pub op: Op,
}

/// The operations of the state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create or replace a record owned by `owner`.
    PutRecord {
        owner: PeerKey,
        namespace: String,
        key: String,
        attributes: BTreeMap<String, String>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// Compare-and-set: `Some(0)` means "must not exist", `Some(v)` "current version is v".
        expected_version: Option<u64>,
    },
    /// Delete a record owned by `owner`.
    DeleteRecord {
        owner: PeerKey,
        namespace: String,
        key: String,
        expected_version: Option<u64>,
    },
    /// Allocate a node id for a new super peer and remember its addresses.
    RegisterNode { node: NodeInfo },
    /// Mark a node as removed; its id stays reserved.
    TombstoneNode { node_id: u64 },
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            Op::PutRecord { namespace, key, .. } => write!(f, "put {namespace}/{key}"),
            Op::DeleteRecord { namespace, key, .. } => write!(f, "delete {namespace}/{key}"),
            Op::RegisterNode { node } => write!(f, "register node {}", node.peer_id),
            Op::TombstoneNode { node_id } => write!(f, "tombstone node {node_id}"),
        }
    }
}

/// A record as stored in the state machine (the namespace and key are its storage key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    pub owner: PeerKey,
    pub attributes: BTreeMap<String, String>,
    /// Encoded as one byte string, not a sequence of numbers.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub version: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// Addresses and identity of a super peer; also openraft's `Node` type.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Text form of the node's PeerId.
    pub peer_id: String,
    /// Cluster service address.
    pub cluster_addr: String,
    /// Leaf service address.
    pub leaf_addr: String,
    /// Admin service address.
    pub admin_addr: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.peer_id, self.cluster_addr)
    }
}

/// The result of applying a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The record as stored after a put.
    Record(StoredRecord),
    /// A delete; false when there was no record.
    Deleted(bool),
    /// The node id allocated by `RegisterNode`.
    NodeId(u64),
    /// A command without a result (membership entries, tombstones).
    Done,
    /// The command was refused during apply; nothing changed.
    Rejected(Rejection),
}

/// Why apply refused a command. The proposer checks the same conditions before proposing, so these only show up
/// when a concurrent write slipped in between the check and the apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("record is owned by another peer")]
    NotOwner,
    #[error("version mismatch: expected {expected}, current {current}")]
    VersionMismatch { expected: u64, current: u64 },
    #[error("node {0} is unknown")]
    UnknownNode(u64),
}
