//! Vesper super peer: one member of the virtual super peer.
//!
//! All super peers together form one Raft group (openraft) whose state machine, in RocksDB, holds the member
//! table and the searchable record index. Each super peer serves leaves on its Leaf port, other super peers on
//! its Cluster port and operators on its Admin port, all over TLS.
//!
//! ```text
//!   leaf ──TLS──> leaf::LeafService ──┐                       ┌──> store::LogStore     (cf log, raft)
//!                                     ├─> raft::propose ─> openraft ─┤
//!   operator ─mTLS─> admin ───────────┘        │                   └──> store::StateMachine (records, attrs, nodes)
//!                                              └─(follower)─> cluster::ClusterService on the leader
//!   other super peers ─mTLS─> cluster::ClusterService ─> openraft (append, vote, snapshot, transfer)
//! ```
//!
//! Services hold narrow handles ([`replica::Replica`], [`router::Router`], [`sessions::SessionRegistry`],
//! [`membership::Membership`], ...); [`node`] alone builds and wires them. docs/ARCHITECTURE.md has the module
//! map and the layers; no two sibling modules import each other (checked by `tests/tests/t00_structure.rs`).

pub mod admin;
pub mod cli;
pub mod cluster;
pub mod command;
pub mod config;
pub mod drain;
pub mod error;
pub mod events;
pub mod leader;
pub mod leaf;
pub mod limits;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod placement;
pub mod raft;
pub mod raft_types;
pub mod replica;
pub mod roles;
pub mod router;
pub mod sessions;
pub mod startup;
pub mod store;
pub mod tls;
pub mod udp;

pub use config::Config;
pub use node::{spawn, RunningNode};
