//! The openraft type configuration of Vesper and its aliases. A module of its own, below both the storage that
//! implements openraft's traits and the Raft glue that drives it, so neither depends on the other for them.

use crate::command::{Command, NodeInfo, Response};

openraft::declare_raft_types!(
    /// openraft types of Vesper: node ids are u64 allocated by the cluster, nodes carry their addresses.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = NodeInfo,
);

pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, Vec<u8>>;
