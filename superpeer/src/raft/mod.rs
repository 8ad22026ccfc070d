//! Raft glue: the openraft type configuration, the wire codec, the network to other super peers, and the
//! proposer that gets a command committed from any member.
//!
//! ```text
//!  leaf call -> Proposer::propose --(leader?)--> raft.client_write -> log (fsync) -> apply -> response
//!                            \--(follower)--> Cluster.Propose on the leader ------------------^
//! ```

pub mod codec;

pub mod forward;
pub mod network;
pub mod propose;

use crate::raft_types::TypeConfig;
use crate::store::StateMachine;

/// The Raft handle of a super peer.
pub type VesperRaft = openraft::Raft<TypeConfig, StateMachine>;
