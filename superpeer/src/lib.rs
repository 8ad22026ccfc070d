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
//! Modules: [`config`] (settings and validation), [`node`] (start-up, listeners, membership task),
//! [`leaf`] (sessions and index calls), [`cluster`] (Raft RPCs, forwarding, joining), [`admin`] (operator calls
//! and membership changes), [`raft`] (openraft types, codec, network, proposer), [`store`] (RocksDB log and state
//! machine), [`tls`] (certificates), [`error`] (errors and their gRPC codes).

pub mod admin;
pub mod cluster;
pub mod command;
pub mod config;
pub mod error;
pub mod events;
pub mod leader;
pub mod leaf;
pub mod limits;
pub mod membership;
pub mod node;
pub mod raft;
pub mod raft_types;
pub mod replica;
pub mod roles;
pub mod router;
pub mod sessions;
pub mod store;
pub mod tls;
pub mod udp;

pub use config::Config;
pub use node::{spawn, RunningNode};
