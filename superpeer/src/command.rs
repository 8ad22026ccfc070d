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
        /// The index quota of the record's owner, from the proposer's configuration (apply must not read it).
        quota: RecordQuota,
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
    /// A peer attached to super peer `host` with session `session`: it is online there.
    PresenceAttach {
        peer: PeerKey,
        host: u64,
        session: u64,
    },
    /// Session `session` of a peer ended: offline, unless the peer has attached again since (other session).
    PresenceDetach { peer: PeerKey, session: u64 },
    /// A peer on session `session` changes its status, note and profile attributes.
    PresenceSet {
        peer: PeerKey,
        session: u64,
        status: PresenceStatus,
        note: String,
        attributes: BTreeMap<String, String>,
    },
    /// Super peer `host` is gone: every peer still attached to it goes offline.
    ExpireHost { host: u64 },
    /// Store a message for an offline peer. Refused beyond the quota; a message already stored (same sender
    /// and id) is not stored twice. Expired messages of the recipient are dropped on the way.
    MailboxPut {
        to: PeerKey,
        message: StoredMessage,
        expires_at_ms: u64,
        quota: u32,
    },
    /// Remove delivered messages (by their mailbox sequence numbers) from a peer's mailbox.
    MailboxAck { to: PeerKey, sequences: Vec<u64> },
    /// Create conference `id` owned by `owner`.
    ConferenceCreate {
        owner: PeerKey,
        id: String,
        title: String,
        description: String,
        start_at_ms: u64,
    },
    /// The owner invites peers.
    ConferenceInvite {
        owner: PeerKey,
        id: String,
        invitees: Vec<PeerKey>,
    },
    /// An invitee answers for itself.
    ConferenceAnswer {
        peer: PeerKey,
        id: String,
        accept: bool,
    },
    /// The scheduled start has passed (proposed by the leader).
    ConferenceStart { id: String },
    /// A chat line; the state machine gives it the conference's next sequence number.
    ConferenceChat {
        from: PeerKey,
        id: String,
        message_id: String,
        text: String,
    },
    /// A peer on session `session` publishes its address candidates and NAT class.
    PresenceEndpoints {
        peer: PeerKey,
        session: u64,
        candidates: Vec<String>,
        nat_class: String,
    },
    /// Super peer `node_id` reports its relay load (brokers pick the least loaded relay).
    RelayLoad {
        node_id: u64,
        active: u32,
        capacity: u32,
    },
    /// An operator revokes the certificate whose DER has this SHA-256 (see `roles`).
    RevokeCertificate { fingerprint: [u8; 32] },
    /// An operator sets (Some) or clears (None) the access rules of a record namespace.
    SetNamespaceAcl {
        namespace: String,
        acl: Option<NamespaceAcl>,
    },
}

/// How much of the metadata index one peer's records may take: a put that would take the owner past either
/// bound is refused. A put that shrinks the owner's usage always goes through, so a lowered quota never blocks
/// a peer from cleaning up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordQuota {
    /// Most records one peer owns.
    pub records: u64,
    /// Most bytes (namespace, key, attribute names and values, value) one peer's records hold together.
    pub bytes: u64,
}

/// Which bound of a [`RecordQuota`] a put would cross.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuotaKind {
    Records,
    Bytes,
}

impl fmt::Display for QuotaKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuotaKind::Records => "records owned",
            QuotaKind::Bytes => "bytes owned",
        })
    }
}

pub use vesper_proto::acl::{Access, NamespaceAcl};

/// Whether `peer` may read `namespace` under `acl` (None: no rules, open).
pub fn may_read(acl: Option<&NamespaceAcl>, peer: &PeerKey) -> bool {
    acl.is_none_or(|acl| acl.may_read(peer))
}

/// An invitee's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Invitation {
    Invited,
    Accepted,
    Declined,
}

/// A conference as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConferenceEntry {
    pub owner: PeerKey,
    pub title: String,
    pub description: String,
    pub start_at_ms: u64,
    pub invitees: BTreeMap<PeerKey, Invitation>,
    pub created_at_ms: u64,
    pub started: bool,
    /// Sequence number the next chat line gets.
    pub next_sequence: u64,
}

/// A conference chat line as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatEntry {
    pub sequence: u64,
    pub from: PeerKey,
    pub message_id: String,
    pub text: String,
    pub sent_at_ms: u64,
}

/// Presence status as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PresenceStatus {
    Offline,
    Online,
    Away,
    Busy,
}

/// A peer's presence as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    pub status: PresenceStatus,
    pub note: String,
    /// Node id of the hosting super peer, 0 when offline.
    pub host: u64,
    /// Session id on the host, 0 when offline.
    pub session: u64,
    pub candidates: Vec<String>,
    pub nat_class: String,
    pub changed_at_ms: u64,
    pub attributes: BTreeMap<String, String>,
}

/// A message waiting in a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub id: String,
    pub from: PeerKey,
    pub kind: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub sent_at_ms: u64,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            Op::PutRecord { namespace, key, .. } => write!(f, "put {namespace}/{key}"),
            Op::DeleteRecord { namespace, key, .. } => write!(f, "delete {namespace}/{key}"),
            Op::RegisterNode { node } => write!(f, "register node {}", node.peer_id),
            Op::TombstoneNode { node_id } => write!(f, "tombstone node {node_id}"),
            Op::PresenceAttach { host, session, .. } => {
                write!(f, "attach session {session} on node {host}")
            }
            Op::PresenceDetach { session, .. } => write!(f, "detach session {session}"),
            Op::PresenceSet { status, .. } => write!(f, "set presence {status:?}"),
            Op::ExpireHost { host } => write!(f, "expire sessions of node {host}"),
            Op::MailboxPut { message, .. } => write!(f, "mailbox put {}", message.id),
            Op::MailboxAck { sequences, .. } => {
                write!(f, "mailbox ack {} messages", sequences.len())
            }
            Op::ConferenceCreate { id, .. } => write!(f, "create conference {id}"),
            Op::ConferenceInvite { id, invitees, .. } => {
                write!(f, "invite {} to {id}", invitees.len())
            }
            Op::ConferenceAnswer { id, accept, .. } => write!(f, "answer {id}: {accept}"),
            Op::ConferenceStart { id } => write!(f, "start conference {id}"),
            Op::ConferenceChat { id, .. } => write!(f, "chat in {id}"),
            Op::PresenceEndpoints { nat_class, .. } => write!(f, "publish endpoints ({nat_class})"),
            Op::SetNamespaceAcl { namespace, acl } => match acl {
                Some(acl) => write!(
                    f,
                    "set acl of {namespace} (write {:?}, read {:?}, {} members)",
                    acl.write,
                    acl.read,
                    acl.members.len()
                ),
                None => write!(f, "clear acl of {namespace}"),
            },
            Op::RelayLoad {
                node_id,
                active,
                capacity,
            } => write!(f, "relay load of node {node_id}: {active}/{capacity}"),
            Op::RevokeCertificate { fingerprint } => write!(
                f,
                "revoke certificate {}",
                data_encoding::HEXLOWER.encode(fingerprint)
            ),
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
    /// A peer's presence after a presence command.
    Presence(PresenceEntry),
    /// Number of peers a host expiry took offline.
    Expired(u64),
    /// A conference after a conference command.
    Conference(ConferenceEntry),
    /// A chat line as stored (also for a retried post).
    Chat(ChatEntry),
}

/// Why apply refused a command. The proposer checks the same conditions before proposing, so these only show up
/// when a concurrent write slipped in between the check and the apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("record is owned by another peer")]
    NotOwner,
    #[error("namespace {0} may be written only by the members of its ACL")]
    NamespaceWrite(String),
    #[error("namespace {0} may be read only by the members of its ACL")]
    NamespaceRead(String),
    #[error("version mismatch: expected {expected}, current {current}")]
    VersionMismatch { expected: u64, current: u64 },
    #[error("node {0} is unknown")]
    UnknownNode(u64),
    #[error("the session is not the peer's current session (attach first)")]
    NotAttached,
    #[error("the recipient's mailbox is full ({quota} messages)")]
    MailboxFull { quota: u32 },
    #[error("the record's owner is at its index quota: {what} would be {would_be}, the quota is {quota}; delete records first")]
    IndexQuota {
        what: QuotaKind,
        would_be: u64,
        quota: u64,
    },
    #[error("a conference with this id exists already")]
    ConferenceExists,
    #[error("no such conference")]
    UnknownConference,
    #[error("only the conference's owner may do this")]
    NotConferenceOwner,
    #[error("you are not invited to this conference")]
    NotInvited,
    #[error("only the owner and participants who accepted may chat")]
    NotParticipant,
}
