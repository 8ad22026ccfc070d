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

/// The operations of the state machine, one named command type each (below). Each converts into an `Op`
/// (`PutRecord { .. }.into()`).
///
/// The encoding of a newtype variant over a struct (postcard: the variant index, then the fields in order) is the
/// encoding of the struct variant it replaced, so the order of variants and of fields is the wire and log format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    PutRecord(PutRecord),
    DeleteRecord(DeleteRecord),
    RegisterNode(RegisterNode),
    TombstoneNode(TombstoneNode),
    PresenceAttach(PresenceAttach),
    PresenceDetach(PresenceDetach),
    PresenceSet(PresenceSet),
    ExpireHost(ExpireHost),
    MailboxPut(MailboxPut),
    MailboxAck(MailboxAck),
    ConferenceCreate(ConferenceCreate),
    ConferenceInvite(ConferenceInvite),
    ConferenceAnswer(ConferenceAnswer),
    ConferenceStart(ConferenceStart),
    ConferenceChat(ConferenceChat),
    PresenceEndpoints(PresenceEndpoints),
    RelayLoad(RelayLoad),
    RevokeCertificate(RevokeCertificate),
    SetNamespaceAcl(SetNamespaceAcl),
    SetPlacement(SetPlacement),
    PlacementJournal(PlacementJournal),
    Candidate(Candidate),
    GrantEligibility(GrantEligibility),
    NodeZone(NodeZone),
    NodeCertificate(NodeCertificate),
    SetAdoption(SetAdoption),
    IssueCertificate(IssueCertificate),
    NodeIssuer(NodeIssuer),
    RecordIssued(RecordIssued),
    /// A sampled operation and its trace context (appended last, so entries written before it existed still
    /// decode). Never nested: [`Op::traced`] wraps an operation once.
    Traced(Traced),
    /// A super peer's count of attached leaf sessions (appended after `Traced`, for the same reason).
    LeafLoad(LeafLoad),
    /// The placement score of an adopted super peer (appended last).
    NodeScore(NodeScore),
    /// A candidate's proved round trip to the voters (appended last).
    CandidateRtt(CandidateRtt),
}

/// W3C trace context of a sampled operation, as its proposer's span wrote it. Bounded like the message fields
/// (`vesper_proto::trace::MAX_TRACEPARENT_LEN`, `MAX_TRACESTATE_LEN`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: String,
}

impl TraceContext {
    /// The context of `span` when it is sampled; None otherwise (with no OpenTelemetry layer, always None).
    pub fn of(span: &tracing::Span) -> Option<Self> {
        let mut context = Self {
            traceparent: String::new(),
            tracestate: String::new(),
        };
        vesper_proto::trace::write(span, &mut context.traceparent, &mut context.tracestate);
        (!context.traceparent.is_empty()).then_some(context)
    }

    /// From the two fields of a message; None when they are empty.
    pub fn from_fields(traceparent: &str, tracestate: &str) -> Option<Self> {
        (!traceparent.is_empty()
            && traceparent.len() <= vesper_proto::trace::MAX_TRACEPARENT_LEN
            && tracestate.len() <= vesper_proto::trace::MAX_TRACESTATE_LEN)
            .then(|| Self {
                traceparent: traceparent.to_string(),
                tracestate: tracestate.to_string(),
            })
    }

    /// Makes this context the parent of `span` (not entered yet).
    pub fn adopt(&self, span: &tracing::Span) {
        vesper_proto::trace::adopt(span, &self.traceparent, &self.tracestate);
    }
}

/// An operation proposed inside a sampled trace: apply opens a span in that trace on every member, and a mailbox
/// keeps the context with the message until it is delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traced {
    pub context: TraceContext,
    pub op: Box<Op>,
}

impl Op {
    /// `self` carried with `context` when there is one; an operation already traced keeps its own context.
    pub fn traced(self, context: Option<TraceContext>) -> Op {
        match (self, context) {
            (Op::Traced(traced), _) => Op::Traced(traced),
            (op, Some(context)) => Op::Traced(Traced {
                context,
                op: Box::new(op),
            }),
            (op, None) => op,
        }
    }

    /// The operation itself, without its trace context.
    pub fn untraced(&self) -> &Op {
        match self {
            Op::Traced(traced) => traced.op.untraced(),
            op => op,
        }
    }

    /// A short name of the operation for traces, which never show keys or values.
    pub fn kind(&self) -> &'static str {
        match self.untraced() {
            Op::PutRecord(_) => "put_record",
            Op::DeleteRecord(_) => "delete_record",
            Op::MailboxPut(_) => "mailbox_put",
            Op::MailboxAck(_) => "mailbox_ack",
            _ => "command",
        }
    }

    /// The trace context the operation carries.
    pub fn trace(&self) -> Option<&TraceContext> {
        match self {
            Op::Traced(traced) => Some(&traced.context),
            _ => None,
        }
    }
}

/// `From<T> for Op` for each command type.
macro_rules! into_op {
    ($($variant:ident),* $(,)?) => {
        $(impl From<$variant> for Op {
            fn from(op: $variant) -> Self {
                Op::$variant(op)
            }
        })*
    };
}

into_op!(
    PutRecord,
    DeleteRecord,
    RegisterNode,
    TombstoneNode,
    PresenceAttach,
    PresenceDetach,
    PresenceSet,
    ExpireHost,
    MailboxPut,
    MailboxAck,
    ConferenceCreate,
    ConferenceInvite,
    ConferenceAnswer,
    ConferenceStart,
    ConferenceChat,
    PresenceEndpoints,
    RelayLoad,
    RevokeCertificate,
    SetNamespaceAcl,
    SetPlacement,
    PlacementJournal,
    Candidate,
    GrantEligibility,
    NodeZone,
    NodeCertificate,
    SetAdoption,
    IssueCertificate,
    NodeIssuer,
    RecordIssued,
    LeafLoad,
    NodeScore,
    CandidateRtt,
);

/// Create or replace a record owned by `owner`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRecord {
    pub owner: PeerKey,
    pub namespace: String,
    pub key: String,
    pub attributes: BTreeMap<String, String>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Compare-and-set: `Some(0)` means "must not exist", `Some(v)` "current version is v".
    pub expected_version: Option<u64>,
    /// The index quota of the record's owner, from the proposer's configuration (apply must not read it).
    pub quota: RecordQuota,
}

/// Delete a record owned by `owner`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRecord {
    pub owner: PeerKey,
    pub namespace: String,
    pub key: String,
    pub expected_version: Option<u64>,
}

/// Allocate a node id for a new super peer and remember its addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterNode {
    pub node: NodeInfo,
}

/// Mark a node as removed; its id stays reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TombstoneNode {
    pub node_id: u64,
}

/// A peer attached to super peer `host` with session `session`: it is online there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceAttach {
    pub peer: PeerKey,
    pub host: u64,
    pub session: u64,
}

/// Session `session` of a peer ended: offline, unless the peer has attached again since (other session).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceDetach {
    pub peer: PeerKey,
    pub session: u64,
}

/// A peer on session `session` changes its status, note and profile attributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceSet {
    pub peer: PeerKey,
    pub session: u64,
    pub status: PresenceStatus,
    pub note: String,
    pub attributes: BTreeMap<String, String>,
}

/// Super peer `host` is gone: every peer still attached to it goes offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpireHost {
    pub host: u64,
}

/// Store a message for an offline peer. Refused beyond the quota; a message already stored (same sender and id)
/// is not stored twice. Expired messages of the recipient are dropped on the way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxPut {
    pub to: PeerKey,
    pub message: StoredMessage,
    pub expires_at_ms: u64,
    pub quota: u32,
}

/// Remove delivered messages (by their mailbox sequence numbers) from a peer's mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxAck {
    pub to: PeerKey,
    pub sequences: Vec<u64>,
}

/// Create conference `id` owned by `owner`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConferenceCreate {
    pub owner: PeerKey,
    pub id: String,
    pub title: String,
    pub description: String,
    pub start_at_ms: u64,
}

/// The owner invites peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConferenceInvite {
    pub owner: PeerKey,
    pub id: String,
    pub invitees: Vec<PeerKey>,
}

/// An invitee answers for itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConferenceAnswer {
    pub peer: PeerKey,
    pub id: String,
    pub accept: bool,
}

/// The scheduled start has passed (proposed by the leader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConferenceStart {
    pub id: String,
}

/// A chat line; the state machine gives it the conference's next sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConferenceChat {
    pub from: PeerKey,
    pub id: String,
    pub message_id: String,
    pub text: String,
}

/// A peer on session `session` publishes its address candidates and NAT class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEndpoints {
    pub peer: PeerKey,
    pub session: u64,
    pub candidates: Vec<String>,
    pub nat_class: String,
}

/// Super peer `node_id` reports its relay load (brokers pick the least loaded relay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayLoad {
    pub node_id: u64,
    pub active: u32,
    pub capacity: u32,
}

/// Super peer `node_id` reports how many leaf sessions it holds (leaves even out their load by it, and the
/// placement controller grows the standby pool by it; see `leaf::load`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeafLoad {
    pub node_id: u64,
    pub sessions: u32,
}

/// The placement score of super peer `node_id`, which it was adopted with and which its host keeps up to date
/// from its reports while it serves (see `placement::candidates::member_score`); `None` deletes it. Nodes the
/// operator added have none, and are never replaced for their score.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeScore {
    pub node_id: u64,
    pub score: Option<MemberScore>,
}

/// A member's score bucket and the observed history it is computed from (as in [`CandidateEntry`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberScore {
    /// Score bucket, 0-20, on the candidates' scale.
    pub score: u32,
    pub first_seen_ms: u64,
    pub sessions_seen: u32,
    /// Start of the leaf session it reported on last.
    pub session_started_ms: u64,
    /// Its last proved round trip to the voters as a candidate, in microseconds.
    pub rtt_us: Option<u32>,
}

/// An operator revokes the certificate whose DER has this SHA-256 (see `roles`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeCertificate {
    pub fingerprint: [u8; 32],
}

/// The placement controller's targets, as an operator set them (`vesperctl placement`); every leader, also a
/// new one after a failover, works towards the same targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPlacement {
    pub targets: PlacementTargets,
}

/// See [`crate::placement::decide::Targets`], whose stored form this is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementTargets {
    pub paused: bool,
    /// `None`: automatic.
    pub voters: Option<u32>,
    pub standbys: u32,
    /// `None`: a majority of the voter target.
    pub min_quorum: Option<u32>,
}

impl Default for PlacementTargets {
    fn default() -> Self {
        Self {
            paused: false,
            voters: None,
            standbys: 2,
            min_quorum: None,
        }
    }
}

/// The placement controller records an action it took (or tried), so an operator can read after the fact, on
/// any node and after a failover, what changed the membership and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementJournal {
    /// The leader that acted, and its term.
    pub leader: u64,
    pub term: u64,
    pub action: String,
    pub why: String,
    /// "done", or what went wrong.
    pub outcome: String,
}

/// The super peer a candidate is attached to writes (Some) or drops (None) its candidate entry; it does so only
/// when the entry's state, score bucket, addresses, gates or observed sessions change, or to refresh it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub peer: PeerKey,
    pub entry: Option<CandidateEntry>,
}

/// The round trip from the members that proved candidate `peer` to it, in microseconds (the slowest of the
/// provers' fastest TCP connects). Kept beside its entry (whose stored shape it would otherwise change) and
/// dropped with it; written only when it changes by a quarter or more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateRtt {
    pub peer: PeerKey,
    pub rtt_us: u32,
}

/// A node that offered to serve as a super peer, as its host judged it (see `placement::candidates`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateEntry {
    pub host: u64,
    pub eligible: bool,
    pub zone: Option<String>,
    /// Role addresses at the observed IP: Cluster, Leaf (TCP and UDP), Admin.
    pub cluster_addr: String,
    pub leaf_addr: String,
    pub admin_addr: String,
    /// Score bucket, 0-20 (eligible candidates only).
    pub score: u32,
    /// The last successful proof of reachability, and the last failed one.
    pub proof_at_ms: Option<u64>,
    pub proof_failed_at_ms: Option<u64>,
    /// Why the last failed proof failed (at most `placement::candidates::MAX_PROOF_ERROR` bytes).
    pub proof_error: Option<String>,
    /// Session starts the cluster observed, newest last, at most `MAX_OBSERVED_SESSIONS`; and how many
    /// sessions it observed since `first_seen_ms`.
    pub session_starts_ms: Vec<u64>,
    pub sessions_seen: u32,
    pub first_seen_ms: u64,
    /// Not eligible before this (after a demotion or removal).
    pub cooldown_until_ms: u64,
    /// The gates: name, passed, detail.
    pub gates: Vec<(String, bool, String)>,
    pub updated_at_ms: u64,
}

/// An operator grants (or revokes) eligibility for the super peer role to peers, or to all candidates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantEligibility {
    pub peers: Vec<PeerKey>,
    pub all: bool,
    pub revoke: bool,
}

/// Super peer `node_id` reports its zone label (`placement.zone`), so the placement controller can spread the
/// voters over zones; `None` clears it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeZone {
    pub node_id: u64,
    pub zone: Option<String>,
}

/// Super peer `node_id` reports the SHA-256 of the certificate it presents on the Cluster port, so that the
/// controller can revoke it when it retires the node (unless another member presents the same one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCertificate {
    pub node_id: u64,
    pub fingerprint: [u8; 32],
}

/// The placement controller starts (Some) or ends (None) the adoption of a candidate; at most one runs at a
/// time, so this replaces whatever ran before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAdoption {
    pub adoption: Option<Adoption>,
}

/// A candidate being adopted: waiting for its certificate, then for its node to join as a standby.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adoption {
    pub peer: PeerKey,
    /// When the controller started it, and when it gives up (ms since the epoch).
    pub started_ms: u64,
    pub deadline_ms: u64,
    /// The leader (and its term) that started it.
    pub leader: u64,
    pub term: u64,
    /// The addresses it was proven on and will serve on.
    pub cluster_addr: String,
    pub leaf_addr: String,
    pub admin_addr: String,
    /// Its certificate, once an issuer signed one.
    pub issued: Option<IssuedCertificate>,
}

/// A super peer certificate an issuer signed for an adopted node's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    /// The node whose issuer signed it.
    pub by_node: u64,
    /// The certificate, then the issuer's certificate (PEM).
    pub chain_pem: String,
    /// SHA-256 of the certificate's DER: how a revocation names it.
    pub fingerprint: [u8; 32],
    pub not_after_ms: u64,
}

/// An issuer hands in the certificate for the adoption of `peer` that started at `started_ms`. Applied only
/// while that adoption runs and has no certificate yet (with several issuers, the first one's stays).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueCertificate {
    pub peer: PeerKey,
    pub started_ms: u64,
    pub issued: IssuedCertificate,
}

/// An issuer signed certificate `fingerprint` for the key `peer` (at adoption, or renewing it), valid until
/// `not_after_ms`: kept so that every certificate of a retired node can be revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordIssued {
    pub peer: PeerKey,
    pub fingerprint: [u8; 32],
    pub not_after_ms: u64,
}

/// Super peer `node_id` holds a certificate issuer valid until `not_after_ms` (`None`: it holds none any more).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIssuer {
    pub node_id: u64,
    pub not_after_ms: Option<u64>,
}

/// An operator sets (Some) or clears (None) the access rules of a record namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetNamespaceAcl {
    pub namespace: String,
    pub acl: Option<NamespaceAcl>,
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

/// A peer's presence as stored (store format 3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    pub status: PresenceStatus,
    pub note: String,
    /// The peer's attached sessions, oldest first, at most `validate::MAX_SESSIONS_PER_PEER`; empty exactly when
    /// the status is offline.
    pub sessions: Vec<AttachedSession>,
    /// Sessions the per-peer limit pushed out, newest last, at most `validate::MAX_SESSIONS_PER_PEER`: their
    /// hosts end them as superseded (any other session missing from `sessions` ended as "presence lost").
    pub superseded: Vec<u64>,
    pub candidates: Vec<String>,
    pub nat_class: String,
    pub changed_at_ms: u64,
    pub attributes: BTreeMap<String, String>,
}

/// One attached session of a peer, as its presence lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedSession {
    /// Node id of the super peer it is attached to.
    pub host: u64,
    /// Session id on that super peer (random, never reused).
    pub session: u64,
    /// When it attached (the proposer's clock).
    pub attached_at_ms: u64,
}

impl PresenceEntry {
    /// Whether `session` is one of the peer's listed sessions.
    pub fn lists(&self, session: u64) -> bool {
        self.sessions
            .iter()
            .any(|attached| attached.session == session)
    }

    /// The super peers the peer's sessions are attached to, each once, newest session's first.
    pub fn hosts(&self) -> Vec<u64> {
        let mut hosts = Vec::with_capacity(self.sessions.len());
        for attached in self.sessions.iter().rev() {
            if !hosts.contains(&attached.host) {
                hosts.push(attached.host);
            }
        }
        hosts
    }

    /// The host of the newest session, 0 when offline.
    pub fn newest_host(&self) -> u64 {
        self.sessions.last().map_or(0, |attached| attached.host)
    }
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
        self.op.fmt(f)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Traced(traced) => write!(f, "{} (traced)", traced.op),
            Op::PutRecord(op) => write!(f, "put {}/{}", op.namespace, op.key),
            Op::DeleteRecord(op) => write!(f, "delete {}/{}", op.namespace, op.key),
            Op::RegisterNode(op) => write!(f, "register node {}", op.node.peer_id),
            Op::TombstoneNode(op) => write!(f, "tombstone node {}", op.node_id),
            Op::PresenceAttach(op) => {
                write!(f, "attach session {} on node {}", op.session, op.host)
            }
            Op::PresenceDetach(op) => write!(f, "detach session {}", op.session),
            Op::PresenceSet(op) => write!(f, "set presence {:?}", op.status),
            Op::ExpireHost(op) => write!(f, "expire sessions of node {}", op.host),
            Op::MailboxPut(op) => write!(f, "mailbox put {}", op.message.id),
            Op::MailboxAck(op) => write!(f, "mailbox ack {} messages", op.sequences.len()),
            Op::ConferenceCreate(op) => write!(f, "create conference {}", op.id),
            Op::ConferenceInvite(op) => {
                write!(f, "invite {} to {}", op.invitees.len(), op.id)
            }
            Op::ConferenceAnswer(op) => write!(f, "answer {}: {}", op.id, op.accept),
            Op::ConferenceStart(op) => write!(f, "start conference {}", op.id),
            Op::ConferenceChat(op) => write!(f, "chat in {}", op.id),
            Op::PresenceEndpoints(op) => write!(f, "publish endpoints ({})", op.nat_class),
            Op::SetNamespaceAcl(op) => match &op.acl {
                Some(acl) => write!(
                    f,
                    "set acl of {} (write {:?}, read {:?}, {} members)",
                    op.namespace,
                    acl.write,
                    acl.read,
                    acl.members.len()
                ),
                None => write!(f, "clear acl of {}", op.namespace),
            },
            Op::RelayLoad(op) => write!(
                f,
                "relay load of node {}: {}/{}",
                op.node_id, op.active, op.capacity
            ),
            Op::LeafLoad(op) => write!(
                f,
                "leaf load of node {}: {} sessions",
                op.node_id, op.sessions
            ),
            Op::CandidateRtt(op) => write!(
                f,
                "round trip to candidate {}: {} us",
                data_encoding::HEXLOWER.encode(&op.peer[..4]),
                op.rtt_us
            ),
            Op::NodeScore(op) => match &op.score {
                Some(score) => write!(f, "score of node {}: {}", op.node_id, score.score),
                None => write!(f, "clear score of node {}", op.node_id),
            },
            Op::RevokeCertificate(op) => write!(
                f,
                "revoke certificate {}",
                data_encoding::HEXLOWER.encode(&op.fingerprint)
            ),
            Op::SetPlacement(op) => write!(f, "set placement targets {:?}", op.targets),
            Op::Candidate(op) => write!(
                f,
                "candidate {}: {}",
                data_encoding::HEXLOWER.encode(&op.peer[..4]),
                match &op.entry {
                    None => "dropped",
                    Some(entry) if entry.eligible => "eligible",
                    Some(_) => "not eligible",
                }
            ),
            Op::NodeZone(op) => write!(
                f,
                "zone of node {}: {}",
                op.node_id,
                op.zone.as_deref().unwrap_or("none")
            ),
            Op::NodeCertificate(op) => write!(
                f,
                "certificate of node {}: {}",
                op.node_id,
                data_encoding::HEXLOWER.encode(&op.fingerprint[..8])
            ),
            Op::SetAdoption(op) => match &op.adoption {
                Some(adoption) => write!(
                    f,
                    "adopt candidate {}",
                    data_encoding::HEXLOWER.encode(&adoption.peer[..4])
                ),
                None => f.write_str("end the adoption"),
            },
            Op::IssueCertificate(op) => write!(
                f,
                "certificate {} for candidate {}",
                data_encoding::HEXLOWER.encode(&op.issued.fingerprint[..8]),
                data_encoding::HEXLOWER.encode(&op.peer[..4])
            ),
            Op::RecordIssued(op) => write!(
                f,
                "issued certificate {} to {}",
                data_encoding::HEXLOWER.encode(&op.fingerprint[..8]),
                data_encoding::HEXLOWER.encode(&op.peer[..4])
            ),
            Op::NodeIssuer(op) => write!(
                f,
                "issuer of node {}: {}",
                op.node_id,
                if op.not_after_ms.is_some() {
                    "held"
                } else {
                    "none"
                }
            ),
            Op::GrantEligibility(op) => write!(
                f,
                "{} eligibility ({} peers{})",
                if op.revoke { "revoke" } else { "grant" },
                op.peers.len(),
                if op.all { ", all" } else { "" }
            ),
            Op::PlacementJournal(op) => {
                write!(f, "placement journal: {} ({})", op.action, op.outcome)
            }
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
    /// How many things expired: peers a host expiry took offline, or messages past their time to live that a
    /// mailbox put removed (a put that removed none answers `Done`).
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
    #[error("no adoption of that candidate waits for a certificate")]
    NoSuchAdoption,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log and the wire carry postcard's encoding of `Command`: it must not move under the types.
    #[test]
    fn commands_encode_as_their_variant_index_then_their_fields_in_order() {
        let delete = Command {
            at_ms: 42,
            op: DeleteRecord {
                owner: [1; 32],
                namespace: "ns".into(),
                key: "k".into(),
                expected_version: Some(3),
            }
            .into(),
        };
        let mut expected = vec![42, 1];
        expected.extend([1; 32]);
        expected.extend([2, b'n', b's', 1, b'k', 1, 3]);
        assert_eq!(postcard::to_stdvec(&delete).unwrap(), expected);

        let put = Command {
            at_ms: 1,
            op: PutRecord {
                owner: [2; 32],
                namespace: "a".into(),
                key: "b".into(),
                attributes: BTreeMap::from([("c".into(), "d".into())]),
                value: vec![9, 9],
                expected_version: None,
                quota: RecordQuota {
                    records: 300,
                    bytes: 1,
                },
            }
            .into(),
        };
        let mut expected = vec![1, 0];
        expected.extend([2; 32]);
        // namespace, key, one attribute, the value as one byte string, no expected version, the quota (varints).
        expected.extend([
            1, b'a', 1, b'b', 1, 1, b'c', 1, b'd', 2, 9, 9, 0, 0xac, 0x02, 1,
        ]);
        assert_eq!(postcard::to_stdvec(&put).unwrap(), expected);

        let acl = Command {
            at_ms: 0,
            op: SetNamespaceAcl {
                namespace: "x".into(),
                acl: None,
            }
            .into(),
        };
        assert_eq!(postcard::to_stdvec(&acl).unwrap(), [0, 18, 1, b'x', 0]);
        for command in [delete, put, acl] {
            let bytes = postcard::to_stdvec(&command).unwrap();
            assert_eq!(postcard::from_bytes::<Command>(&bytes).unwrap(), command);
        }
    }

    #[test]
    fn a_command_type_converts_into_its_op_and_displays_as_before() {
        let op: Op = TombstoneNode { node_id: 4 }.into();
        assert_eq!(op, Op::TombstoneNode(TombstoneNode { node_id: 4 }));
        let shown = |op: Op| Command { at_ms: 0, op }.to_string();
        assert_eq!(shown(op), "tombstone node 4");
        assert_eq!(
            shown(
                RelayLoad {
                    node_id: 2,
                    active: 3,
                    capacity: 8
                }
                .into()
            ),
            "relay load of node 2: 3/8"
        );
        assert_eq!(
            shown(
                ConferenceInvite {
                    owner: [0; 32],
                    id: "c".into(),
                    invitees: vec![[1; 32], [2; 32]],
                }
                .into()
            ),
            "invite 2 to c"
        );
    }
}
