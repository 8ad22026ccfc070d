//! Raft glue: the openraft type configuration, the wire codec, the network to other super peers, and the
//! proposer that gets a command committed from any member.
//!
//! ```text
//!  leaf call -> Proposer::propose --(leader?)--> raft.client_write -> log (fsync) -> apply -> response
//!                            \--(follower)--> Cluster.Propose on the leader ------------------^
//! ```

pub mod codec;
pub mod command;
pub mod forward;
pub mod network;
pub mod propose;

use crate::store::StateMachine;
use command::{Command, NodeInfo, Response};

openraft::declare_raft_types!(
    /// openraft types of Vesper: node ids are u64 allocated by the cluster, nodes carry their addresses.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = NodeInfo,
);

/// The Raft handle of a super peer.
pub type VesperRaft = openraft::Raft<TypeConfig, StateMachine>;

pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, Vec<u8>>;
