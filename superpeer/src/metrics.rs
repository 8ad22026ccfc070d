//! The super peer's Prometheus metrics (prefix `vesper_`), built on `prometheus-client` with one explicit
//! registry per node (no global state, so several nodes in one test process keep their own counts).
//!
//! Two kinds live here:
//! - **counters and histograms** that the data path bumps: each component gets only its own small handle
//!   ([`SessionMetrics`], [`MessageMetrics`], [`RecordMetrics`], [`RaftCounters`]), never the registry;
//! - **gauges read at scrape time** ([`Metrics::sample`]) from the Raft metrics, the session registry and the
//!   relay, so they cost nothing between scrapes and can never drift from the state they describe.
//!
//! Names follow the Prometheus conventions: base units (`_seconds`, `_bytes`), `_total` on counters (the
//! library appends it), labels with a small fixed set of values. docs/OPERATIONS.md lists every metric.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Label values in snake case, as Prometheus users expect them.
macro_rules! label_values {
    ($name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                let text = match self {
                    $(Self::$variant => $text),+
                };
                EncodeLabelValue::encode(&text, encoder)
            }
        }
    };
}

label_values!(ProposalResult { Applied => "applied", Rejected => "rejected", Failed => "failed" });
label_values!(SessionRefusal {
    Unauthenticated => "unauthenticated",
    Incompatible => "incompatible",
    NotInCluster => "not_in_cluster",
    Unrecorded => "unrecorded",
    PerIpLimit => "per_ip_limit",
    Leaving => "leaving",
    Draining => "draining",
});
label_values!(MessagePath { Local => "local", Remote => "remote", Mailbox => "mailbox", Refused => "refused" });
label_values!(RecordOp { Put => "put", Delete => "delete" });
label_values!(RecordResult { Ok => "ok", Conflict => "conflict", Refused => "refused", Failed => "failed" });
label_values!(MemberRoleLabel { Voter => "voter", Standby => "standby" });
label_values!(SessionEnd { Goodbye => "goodbye", Lost => "lost", Shutdown => "shutdown" });
label_values!(StunDrop {
    Malformed => "malformed",
    Amplification => "amplification",
    SourceRate => "source_rate",
    NodeRate => "node_rate",
    SendFailed => "send_failed",
});
label_values!(ActionResult { Done => "done", Failed => "failed" });
label_values!(BrokerPlan { Punch => "punch", Predict => "predict", RelayOnly => "relay_only" });

/// A gauge holding whole numbers (indexes, counts).
type IntGauge = Gauge<i64, std::sync::atomic::AtomicI64>;
/// A gauge holding seconds.
type SecondsGauge = Gauge<f64, AtomicU64>;

/// How a proposal ended, as seen by the node that made it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ProposalResult {
    /// Committed and applied; the state machine accepted it.
    Applied,
    /// Committed, and the state machine refused it (a rule such as ownership or a quota).
    Rejected,
    /// Not known to be committed: no leader, a timeout, a lost forward.
    Failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: ProposalResult,
}

/// Counters of the Raft layer that events drive (the rest of the Raft metrics are sampled).
#[derive(Clone)]
pub struct RaftCounters {
    leader_changes: Counter,
    proposals: Family<ResultLabel, Counter>,
    fsync: Histogram,
}

impl RaftCounters {
    /// One more leader change seen by this node (a new leader became known).
    pub fn leader_changed(&self) {
        self.leader_changes.inc();
    }

    /// A proposal made through this node ended so.
    pub fn proposal(&self, result: ProposalResult) {
        self.proposals.get_or_create(&ResultLabel { result }).inc();
    }

    /// The histogram of Raft log fsync durations, for the log store's flusher thread.
    pub fn fsync_histogram(&self) -> Histogram {
        self.fsync.clone()
    }
}

/// Why a session was refused or ended by the super peer.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum SessionRefusal {
    /// The attach frame was missing, late or badly signed.
    Unauthenticated,
    /// No protocol version in common.
    Incompatible,
    /// This node does not belong to a cluster yet.
    NotInCluster,
    /// Its presence could not be recorded (no quorum, a timeout).
    Unrecorded,
    /// Too many open session streams from one IP address.
    PerIpLimit,
    /// This node is leaving the cluster (removed, or tombstoned by a removal under way).
    Leaving,
    /// This node is shutting down (SIGTERM) and drains its sessions.
    Draining,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabel {
    reason: SessionRefusal,
}

/// Counters of leaf sessions.
#[derive(Clone)]
pub struct SessionMetrics {
    attached: Counter,
    refused: Family<RefusalLabel, Counter>,
    ended: Family<EndLabel, Counter>,
    attach_seconds: Histogram,
    watches: IntGauge,
}

impl SessionMetrics {
    /// A session attached, `seconds` after its stream opened.
    pub fn attached(&self, seconds: f64) {
        self.attached.inc();
        self.attach_seconds.observe(seconds);
    }

    /// A session was refused.
    pub fn refused(&self, reason: SessionRefusal) {
        self.refused.get_or_create(&RefusalLabel { reason }).inc();
    }

    /// An attached session ended.
    pub fn ended(&self, how: SessionEnd) {
        self.ended.get_or_create(&EndLabel { how }).inc();
    }

    /// Watches open on this node's sessions went up (or down, with a negative `change`).
    pub fn watches_changed(&self, change: i64) {
        self.watches.inc_by(change);
    }
}

/// Counters of the UDP port (STUN answers and the relay), bumped by its own thread.
#[derive(Clone)]
pub struct UdpMetrics {
    stun_answers: Counter,
    stun_dropped: Family<DropLabel, Counter>,
    relayed_datagrams: Counter,
    relayed_bytes: Counter,
    relay_dropped: Counter,
    relay_caps_hit: Counter,
}

/// Why the UDP port did not answer a STUN datagram.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum StunDrop {
    /// Not a Binding request it answers.
    Malformed,
    /// The answer would be larger than the amplification limit allows.
    Amplification,
    /// The source's token bucket was empty.
    SourceRate,
    /// The node-wide answer rate was reached.
    NodeRate,
    /// The send failed (a full socket buffer).
    SendFailed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabel {
    reason: StunDrop,
}

impl UdpMetrics {
    pub fn stun_answered(&self) {
        self.stun_answers.inc();
    }

    pub fn stun_dropped(&self, reason: StunDrop) {
        self.stun_dropped.get_or_create(&DropLabel { reason }).inc();
    }

    /// One datagram of `bytes` forwarded between the two sides of an allocation.
    pub fn relayed(&self, bytes: usize) {
        self.relayed_datagrams.inc();
        self.relayed_bytes.inc_by(bytes as u64);
    }

    /// A relay datagram dropped: over its rate, or its peer side not bound yet.
    pub fn relay_dropped(&self) {
        self.relay_dropped.inc();
    }

    /// An allocation reached its byte or time cap and was ended.
    pub fn relay_cap_hit(&self) {
        self.relay_caps_hit.inc();
    }
}

/// Snapshot builds and installs.
#[derive(Clone)]
pub struct SnapshotMetrics {
    build_seconds: Histogram,
    install_seconds: Histogram,
    bytes: IntGauge,
}

impl SnapshotMetrics {
    /// A snapshot of `bytes` was built in `seconds`.
    pub fn built(&self, seconds: f64, bytes: usize) {
        self.build_seconds.observe(seconds);
        self.bytes.set(gauge(bytes as u64));
    }

    /// A snapshot of `bytes` from the leader was installed in `seconds`.
    pub fn installed(&self, seconds: f64, bytes: usize) {
        self.install_seconds.observe(seconds);
        self.bytes.set(gauge(bytes as u64));
    }
}

/// The placement controller's actions.
#[derive(Clone)]
pub struct PlacementMetrics {
    actions: Family<ActionLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
    result: ActionResult,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
enum ActionResult {
    Done,
    Failed,
}

impl PlacementMetrics {
    /// The leader's controller carried out an action of `kind` (one of a fixed set of words).
    pub fn acted(&self, kind: &'static str, done: bool) {
        self.actions
            .get_or_create(&ActionLabels {
                action: kind.to_string(),
                result: if done {
                    ActionResult::Done
                } else {
                    ActionResult::Failed
                },
            })
            .inc();
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum SessionEnd {
    /// The leaf said goodbye (detach).
    Goodbye,
    /// The stream ended or went silent past the session TTL: the peer gets the grace period.
    Lost,
    /// The node is shutting down.
    Shutdown,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabel {
    how: SessionEnd,
}

/// Where a message went from the sender's super peer.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum MessagePath {
    /// The recipient has a session on this super peer.
    Local,
    /// The recipient's session is on another super peer.
    Remote,
    /// The recipient was offline: the message waits in its mailbox.
    Mailbox,
    /// Refused before routing (a limit, a bad message, an unknown recipient).
    Refused,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabel {
    path: MessagePath,
}

/// Counters of messages routed by this super peer.
#[derive(Clone)]
pub struct MessageMetrics {
    sent: Family<PathLabel, Counter>,
    delivery_seconds: Histogram,
    mailbox_full: Counter,
    mailbox_expired: Counter,
}

impl MessageMetrics {
    /// A message from a leaf of this node took `path`.
    pub fn routed(&self, path: MessagePath) {
        self.sent.get_or_create(&PathLabel { path }).inc();
    }

    /// A message routed here was acknowledged by the recipient's library (`Local` or `Remote`), `seconds` after
    /// its sender's super peer got it.
    pub fn delivered(&self, seconds: f64) {
        self.delivery_seconds.observe(seconds);
    }

    /// A message for an offline peer was refused because its mailbox was at its quota.
    pub fn mailbox_full(&self) {
        self.mailbox_full.inc();
    }

    /// `count` messages were removed from a mailbox unread: their time to live had passed.
    pub fn mailbox_expired(&self, count: u64) {
        self.mailbox_expired.inc_by(count);
    }
}

/// The plan a broker gave a pair of peers.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum BrokerPlan {
    /// Punch directly, the relay as fallback.
    Punch,
    /// Punch with port prediction (one side maps endpoint-dependently).
    Predict,
    /// No direct path can work: straight to the relay.
    RelayOnly,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BrokerLabels {
    caller_nat: &'static str,
    target_nat: &'static str,
    plan: BrokerPlan,
}

/// Connections this node brokered, by the NAT classes of the pair (a fixed set of words) and the plan.
#[derive(Clone)]
pub struct ConnectionMetrics {
    brokered: Family<BrokerLabels, Counter>,
}

impl ConnectionMetrics {
    pub fn brokered(&self, caller_nat: &'static str, target_nat: &'static str, plan: BrokerPlan) {
        self.brokered
            .get_or_create(&BrokerLabels {
                caller_nat,
                target_nat,
                plan,
            })
            .inc();
    }
}

/// What a record write was.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum RecordOp {
    Put,
    Delete,
}

/// How a record write ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum RecordResult {
    Ok,
    /// The expected version did not match (compare-and-set lost).
    Conflict,
    /// Refused: not the owner, a quota, an access rule, a bad record.
    Refused,
    /// Not known to be applied (no leader, a timeout).
    Failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RecordLabels {
    op: RecordOp,
    result: RecordResult,
}

/// Counters of record writes made through this node's Leaf service.
#[derive(Clone)]
pub struct RecordMetrics {
    writes: Family<RecordLabels, Counter>,
}

impl RecordMetrics {
    pub fn write(&self, op: RecordOp, result: RecordResult) {
        self.writes
            .get_or_create(&RecordLabels { op, result })
            .inc();
    }
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
enum MemberRoleLabel {
    Voter,
    Standby,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    role: MemberRoleLabel,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: u64,
}

/// Gauges set from the state at each scrape.
#[derive(Clone, Default)]
struct Sampled {
    in_cluster: IntGauge,
    has_leader: IntGauge,
    is_leader: IntGauge,
    is_voter: IntGauge,
    term: IntGauge,
    last_log_index: IntGauge,
    commit_index: IntGauge,
    applied_index: IntGauge,
    snapshot_index: IntGauge,
    members: Family<RoleLabel, IntGauge>,
    replication_lag: Family<PeerLabel, IntGauge>,
    quorum_ack_age: SecondsGauge,
    sessions: IntGauge,
    relay_allocations: IntGauge,
    relay_capacity: IntGauge,
    mailbox_messages: IntGauge,
}

/// What a scrape reads the sampled gauges from: a plain snapshot, so sampling is testable without a node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Raft runs on this node (it belongs to a cluster).
    pub in_cluster: bool,
    pub leader: Option<u64>,
    pub node_id: Option<u64>,
    /// This node is a voter (not a standby).
    pub is_voter: bool,
    pub term: u64,
    pub last_log_index: u64,
    pub commit_index: u64,
    /// The cluster's commit index as the leader last told this node (`None` until it has).
    pub cluster_committed: Option<u64>,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub voters: u64,
    pub standbys: u64,
    /// On the leader: each other member's matched log index.
    pub replication: Vec<(u64, u64)>,
    /// On the leader: time since a quorum last acknowledged it.
    pub quorum_ack_age: Option<std::time::Duration>,
    pub sessions: u64,
    pub relay_allocations: u64,
    pub relay_capacity: u64,
    /// Messages in mailboxes on this replica (an estimate).
    pub mailbox_messages: u64,
}

/// The node's metrics: the registry and the handles handed out to components.
pub struct Metrics {
    registry: Registry,
    sampled: Sampled,
    pub raft: RaftCounters,
    pub sessions: SessionMetrics,
    pub messages: MessageMetrics,
    pub records: RecordMetrics,
    pub udp: UdpMetrics,
    pub snapshots: SnapshotMetrics,
    pub placement: PlacementMetrics,
    pub connections: ConnectionMetrics,
    ops_refused: Counter,
}

fn gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("vesper");
        let sampled = Sampled::default();
        let raft = RaftCounters {
            leader_changes: Counter::default(),
            proposals: Family::default(),
            // 100 µs .. ~3.3 s, doubling.
            fsync: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        };
        let sessions = SessionMetrics {
            attached: Counter::default(),
            refused: Family::default(),
            ended: Family::default(),
            attach_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            watches: IntGauge::default(),
        };
        let udp = UdpMetrics {
            stun_answers: Counter::default(),
            stun_dropped: Family::default(),
            relayed_datagrams: Counter::default(),
            relayed_bytes: Counter::default(),
            relay_dropped: Counter::default(),
            relay_caps_hit: Counter::default(),
        };
        let snapshots = SnapshotMetrics {
            // 1 ms .. ~65 s.
            build_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            install_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            bytes: IntGauge::default(),
        };
        let placement = PlacementMetrics {
            actions: Family::default(),
        };
        let messages = MessageMetrics {
            sent: Family::default(),
            delivery_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            mailbox_full: Counter::default(),
            mailbox_expired: Counter::default(),
        };
        let records = RecordMetrics {
            writes: Family::default(),
        };
        let connections = ConnectionMetrics {
            brokered: Family::default(),
        };

        let ops_refused = Counter::default();
        registry.register(
            "ops_connections_refused",
            "Connections to the ops port closed at once because it had its most open connections",
            ops_refused.clone(),
        );

        let raft_registry = registry.sub_registry_with_prefix("raft");
        raft_registry.register(
            "in_cluster",
            "1 when this node belongs to a cluster and runs Raft",
            sampled.in_cluster.clone(),
        );
        raft_registry.register(
            "has_leader",
            "1 when this node knows a current leader",
            sampled.has_leader.clone(),
        );
        raft_registry.register(
            "is_leader",
            "1 when this node is the leader",
            sampled.is_leader.clone(),
        );
        raft_registry.register(
            "is_voter",
            "1 when this node is a voter (0: a standby, or not in a cluster)",
            sampled.is_voter.clone(),
        );
        raft_registry.register("term", "Current Raft term", sampled.term.clone());
        raft_registry.register(
            "last_log_index",
            "Index of the last entry in this node's log",
            sampled.last_log_index.clone(),
        );
        raft_registry.register(
            "commit_index",
            "Highest log index known to be committed by a quorum",
            sampled.commit_index.clone(),
        );
        raft_registry.register(
            "applied_index",
            "Highest log index applied to this node's state machine",
            sampled.applied_index.clone(),
        );
        raft_registry.register(
            "snapshot_index",
            "Last log index covered by this node's snapshot",
            sampled.snapshot_index.clone(),
        );
        raft_registry.register(
            "members",
            "Members of the cluster by role, as this node sees the membership",
            sampled.members.clone(),
        );
        raft_registry.register(
            "replication_lag_entries",
            "On the leader: log entries each member is behind the leader's last log index",
            sampled.replication_lag.clone(),
        );
        raft_registry.register_with_unit(
            "quorum_ack_age",
            "On the leader: time since a quorum last acknowledged it",
            Unit::Seconds,
            sampled.quorum_ack_age.clone(),
        );
        raft_registry.register(
            "leader_changes",
            "Leader changes this node has seen",
            raft.leader_changes.clone(),
        );
        raft_registry.register(
            "proposals",
            "Proposals made through this node, by result",
            raft.proposals.clone(),
        );
        raft_registry.register_with_unit(
            "log_fsync",
            "Duration of one fsync of the Raft log (one group commit)",
            Unit::Seconds,
            raft.fsync.clone(),
        );

        let leaf_registry = registry.sub_registry_with_prefix("sessions");
        leaf_registry.register(
            "active",
            "Leaf sessions open on this node",
            sampled.sessions.clone(),
        );
        leaf_registry.register(
            "attached",
            "Leaf sessions attached on this node",
            sessions.attached.clone(),
        );
        leaf_registry.register(
            "refused",
            "Leaf sessions refused by this node, by reason",
            sessions.refused.clone(),
        );
        leaf_registry.register(
            "ended",
            "Attached leaf sessions that ended, by how",
            sessions.ended.clone(),
        );
        leaf_registry.register(
            "watches",
            "Watches open on this node's sessions",
            sessions.watches.clone(),
        );
        leaf_registry.register_with_unit(
            "attach",
            "Time from a session stream opening to its welcome",
            Unit::Seconds,
            sessions.attach_seconds.clone(),
        );

        let message_registry = registry.sub_registry_with_prefix("messages");
        message_registry.register(
            "routed",
            "Messages from leaves of this node, by the path they took",
            messages.sent.clone(),
        );
        message_registry.register_with_unit(
            "delivery",
            "Time from a message reaching its sender's super peer to the recipient library's acknowledgement",
            Unit::Seconds,
            messages.delivery_seconds.clone(),
        );

        let mailbox_registry = registry.sub_registry_with_prefix("mailbox");
        mailbox_registry.register(
            "full",
            "Messages for offline peers refused because the recipient's mailbox was at its quota",
            messages.mailbox_full.clone(),
        );
        mailbox_registry.register(
            "expired",
            "Messages removed from mailboxes unread because their time to live passed, by the puts and drains of this node",
            messages.mailbox_expired.clone(),
        );
        mailbox_registry.register(
            "messages",
            "Messages waiting in mailboxes, cluster-wide, as this node's replica holds them (RocksDB's estimate)",
            sampled.mailbox_messages.clone(),
        );

        registry.register(
            "record_writes",
            "Record puts and deletes made through this node, by result",
            records.writes.clone(),
        );

        let relay_registry = registry.sub_registry_with_prefix("relay");
        relay_registry.register(
            "allocations",
            "Relay allocations open on this node",
            sampled.relay_allocations.clone(),
        );
        relay_registry.register(
            "capacity",
            "Relay allocations this node accepts at most",
            sampled.relay_capacity.clone(),
        );
        relay_registry.register(
            "datagrams",
            "Datagrams forwarded by this node's relay",
            udp.relayed_datagrams.clone(),
        );
        relay_registry.register_with_unit(
            "forwarded",
            "Bytes forwarded by this node's relay",
            Unit::Bytes,
            udp.relayed_bytes.clone(),
        );
        relay_registry.register(
            "dropped",
            "Relay datagrams dropped (over an allocation's rate, or its other side not bound yet)",
            udp.relay_dropped.clone(),
        );
        relay_registry.register(
            "caps_hit",
            "Relay allocations ended by their byte or time cap",
            udp.relay_caps_hit.clone(),
        );
        let stun_registry = registry.sub_registry_with_prefix("stun");
        stun_registry.register(
            "answers",
            "STUN Binding requests answered",
            udp.stun_answers.clone(),
        );
        stun_registry.register(
            "dropped",
            "STUN datagrams not answered, by reason",
            udp.stun_dropped.clone(),
        );
        let snapshot_registry = registry.sub_registry_with_prefix("raft_snapshot");
        snapshot_registry.register_with_unit(
            "build",
            "Time to build a snapshot of the state machine",
            Unit::Seconds,
            snapshots.build_seconds.clone(),
        );
        snapshot_registry.register_with_unit(
            "install",
            "Time to install a snapshot received from the leader",
            Unit::Seconds,
            snapshots.install_seconds.clone(),
        );
        snapshot_registry.register_with_unit(
            "size",
            "Size of the last snapshot built or installed",
            Unit::Bytes,
            snapshots.bytes.clone(),
        );
        registry.register(
            "connections_brokered",
            "Peer connections this node brokered, by the NAT classes of caller and target and the plan given",
            connections.brokered.clone(),
        );
        registry.register(
            "placement_actions",
            "Membership actions the placement controller took while this node led, by kind and result",
            placement.actions.clone(),
        );

        Arc::new(Self {
            registry,
            sampled,
            raft,
            sessions,
            messages,
            records,
            udp,
            snapshots,
            placement,
            connections,
            ops_refused,
        })
    }

    /// The counter of ops port connections refused for the cap (`ops::listener`).
    pub fn ops_refused(&self) -> Counter {
        self.ops_refused.clone()
    }

    /// Sets the sampled gauges from `sample`.
    pub fn sample(&self, sample: &Sample) {
        let s = &self.sampled;
        let flag = |on: bool| i64::from(on);
        s.in_cluster.set(flag(sample.in_cluster));
        s.has_leader.set(flag(sample.leader.is_some()));
        s.is_leader.set(flag(
            sample.leader.is_some() && sample.leader == sample.node_id,
        ));
        s.is_voter.set(flag(sample.is_voter));
        s.term.set(gauge(sample.term));
        s.last_log_index.set(gauge(sample.last_log_index));
        s.commit_index.set(gauge(sample.commit_index));
        s.applied_index.set(gauge(sample.applied_index));
        s.snapshot_index.set(gauge(sample.snapshot_index));
        s.mailbox_messages.set(gauge(sample.mailbox_messages));
        s.members
            .get_or_create(&RoleLabel {
                role: MemberRoleLabel::Voter,
            })
            .set(gauge(sample.voters));
        s.members
            .get_or_create(&RoleLabel {
                role: MemberRoleLabel::Standby,
            })
            .set(gauge(sample.standbys));
        // Members come and go, and a follower has no lag to report: the family is rebuilt each time.
        s.replication_lag.clear();
        for &(peer, matched) in &sample.replication {
            s.replication_lag
                .get_or_create(&PeerLabel { peer })
                .set(gauge(sample.last_log_index.saturating_sub(matched)));
        }
        s.quorum_ack_age
            .set(sample.quorum_ack_age.map_or(0.0, |age| age.as_secs_f64()));
        s.sessions.set(gauge(sample.sessions));
        s.relay_allocations.set(gauge(sample.relay_allocations));
        s.relay_capacity.set(gauge(sample.relay_capacity));
    }

    /// The exposition in the OpenMetrics text format (what Prometheus asks for when it scrapes).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// The exposition in the classic Prometheus text format 0.0.4, for clients that do not ask for OpenMetrics
    /// (`curl`, `promtool check metrics`, older scrapers). See [`to_prometheus_text`].
    pub fn encode_prometheus_text(&self) -> String {
        to_prometheus_text(&self.encode())
    }
}

/// Rewrites an OpenMetrics text exposition into the Prometheus text format 0.0.4. The two differ, for what this
/// registry emits, in three places: OpenMetrics names a counter family without `_total` (its samples carry it)
/// while 0.0.4 names the family as its samples; `# UNIT` lines do not exist in 0.0.4; and OpenMetrics ends with
/// `# EOF`. Samples are the same in both.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut pending_help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            if let Some(help) = pending_help.replace(line) {
                out.push_str(help);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let renamed =
                (kind == "counter" && !name.ends_with("_total")).then(|| format!("{name}_total"));
            if let Some(help) = pending_help.take() {
                match (
                    &renamed,
                    help.strip_prefix("# HELP ").and_then(|h| h.split_once(' ')),
                ) {
                    (Some(renamed), Some((_, text))) => {
                        out.push_str(&format!("# HELP {renamed} {text}\n"));
                    }
                    _ => {
                        out.push_str(help);
                        out.push('\n');
                    }
                }
            }
            match renamed {
                Some(renamed) => out.push_str(&format!("# TYPE {renamed} counter\n")),
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            continue;
        }
        if let Some(help) = pending_help.take() {
            out.push_str(help);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some(help) = pending_help {
        out.push_str(help);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        text.lines().find(|line| {
            line.starts_with(name)
                && line[name.len()..].starts_with([' ', '{'])
                && !line.starts_with('#')
        })
    }

    #[test]
    fn a_sample_sets_the_gauges_it_describes() {
        let metrics = Metrics::new();
        metrics.sample(&Sample {
            in_cluster: true,
            leader: Some(2),
            node_id: Some(2),
            term: 7,
            last_log_index: 120,
            commit_index: 118,
            applied_index: 117,
            voters: 3,
            standbys: 1,
            replication: vec![(1, 120), (3, 100)],
            sessions: 5,
            ..Sample::default()
        });
        let text = metrics.encode();
        assert_eq!(
            line(&text, "vesper_raft_is_leader"),
            Some("vesper_raft_is_leader 1")
        );
        assert_eq!(line(&text, "vesper_raft_term"), Some("vesper_raft_term 7"));
        assert!(
            text.contains("vesper_raft_members{role=\"voter\"} 3"),
            "{text}"
        );
        assert!(text.contains("vesper_raft_replication_lag_entries{peer=\"3\"} 20"));
        assert_eq!(
            line(&text, "vesper_sessions_active"),
            Some("vesper_sessions_active 5")
        );
        // A follower reports no lag, and is not the leader.
        metrics.sample(&Sample {
            in_cluster: true,
            leader: Some(2),
            node_id: Some(1),
            ..Sample::default()
        });
        let text = metrics.encode();
        assert_eq!(
            line(&text, "vesper_raft_is_leader"),
            Some("vesper_raft_is_leader 0")
        );
        assert_eq!(
            line(&text, "vesper_raft_has_leader"),
            Some("vesper_raft_has_leader 1")
        );
        assert!(!text.contains("replication_lag_entries{"), "{text}");
    }

    #[test]
    fn the_classic_text_format_names_counter_families_as_their_samples() {
        let openmetrics = "# HELP vesper_x Things seen.\n# TYPE vesper_x counter\nvesper_x_total 3\n\
                           # HELP vesper_d Durations.\n# TYPE vesper_d histogram\n# UNIT vesper_d seconds\n\
                           vesper_d_sum 0.5\nvesper_d_count 1\nvesper_d_bucket{le=\"+Inf\"} 1\n\
                           # HELP vesper_g A level.\n# TYPE vesper_g gauge\nvesper_g 2\n# EOF\n";
        let classic = to_prometheus_text(openmetrics);
        assert_eq!(
            classic,
            "# HELP vesper_x_total Things seen.\n# TYPE vesper_x_total counter\nvesper_x_total 3\n\
             # HELP vesper_d Durations.\n# TYPE vesper_d histogram\n\
             vesper_d_sum 0.5\nvesper_d_count 1\nvesper_d_bucket{le=\"+Inf\"} 1\n\
             # HELP vesper_g A level.\n# TYPE vesper_g gauge\nvesper_g 2\n"
        );
        // Every counter of the real registry comes out under its sample name.
        let metrics = Metrics::new();
        metrics.raft.leader_changed();
        let classic = metrics.encode_prometheus_text();
        assert!(classic.contains("# TYPE vesper_raft_leader_changes_total counter\n"));
        assert!(classic.contains("# HELP vesper_raft_leader_changes_total "));
        assert!(!classic.contains("# EOF") && !classic.contains("# UNIT"));
    }

    /// The sample names an exposition carries: each family's name, and for histograms its `_bucket`, `_sum` and
    /// `_count` series.
    fn exposed_names(exposition: &str) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        for line in exposition.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            names.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
        names
    }

    /// The `vesper_*` metric names a query or a rules file mentions.
    fn metric_names(text: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("vesper_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.push(name);
        }
        names
    }

    #[test]
    fn the_dashboard_and_the_alert_rules_name_only_exposed_metrics() {
        let metrics = Metrics::new();
        // Families appear in the exposition once they have a series: give each one.
        metrics.raft.proposal(ProposalResult::Failed);
        metrics.sessions.refused(SessionRefusal::Unauthenticated);
        metrics.sessions.ended(SessionEnd::Lost);
        metrics.messages.routed(MessagePath::Local);
        metrics.records.write(RecordOp::Put, RecordResult::Ok);
        metrics.udp.stun_dropped(StunDrop::Malformed);
        metrics.placement.acted("promote", true);
        metrics
            .connections
            .brokered("public", "endpoint-dependent", BrokerPlan::Punch);
        metrics.sample(&Sample {
            replication: vec![(2, 1)],
            ..Sample::default()
        });
        let exposed = exposed_names(&metrics.encode_prometheus_text());
        let monitoring = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring");
        let mut mentioned = 0;
        for file in [
            "grafana/vesper-dashboard.json",
            "prometheus/vesper-rules.yml",
            "prometheus/vesper-rules.test.yml",
        ] {
            let text = std::fs::read_to_string(monitoring.join(file)).expect("read the file");
            for name in metric_names(&text) {
                assert!(
                    exposed.contains(&name),
                    "{file} names {name}; exposed: {exposed:?}"
                );
                mentioned += 1;
            }
        }
        assert!(mentioned > 30, "only {mentioned} metric names found");
        // And docs/OPERATIONS.md documents every family the node exposes.
        let operations = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/OPERATIONS.md"),
        )
        .expect("read docs/OPERATIONS.md");
        let documented: std::collections::BTreeSet<String> =
            metric_names(&operations).into_iter().collect();
        for line in metrics.encode_prometheus_text().lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap_or(rest);
                assert!(
                    documented.contains(name),
                    "{name} is not in docs/OPERATIONS.md"
                );
            }
        }
    }

    #[test]
    fn counters_carry_the_total_suffix_and_their_labels() {
        let metrics = Metrics::new();
        metrics.raft.leader_changed();
        metrics.raft.proposal(ProposalResult::Applied);
        metrics.messages.routed(MessagePath::Mailbox);
        metrics.records.write(RecordOp::Put, RecordResult::Conflict);
        metrics.sessions.refused(SessionRefusal::PerIpLimit);
        let text = metrics.encode();
        for expected in [
            "vesper_raft_leader_changes_total 1",
            "vesper_raft_proposals_total{result=\"applied\"} 1",
            "vesper_messages_routed_total{path=\"mailbox\"} 1",
            "vesper_record_writes_total{op=\"put\",result=\"conflict\"} 1",
            "vesper_sessions_refused_total{reason=\"per_ip_limit\"} 1",
            "# TYPE vesper_raft_log_fsync_seconds histogram",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
    }
}
