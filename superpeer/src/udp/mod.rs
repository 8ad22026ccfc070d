//! The UDP port, which shares its number with the Leaf port: the STUN responder that leaves use to learn their
//! reflexive address and NAT class, the relay that carries peer connections no punch could open, the grants
//! of relay allocations, and the report of this node's relay load through Raft.
//!
//! ```text
//!  leaf ─UDP─> stun::spawn (its own thread) ─┬─ STUN binding request ─> answer with the source address
//!                                            └─ relay datagram ─> Relay (allocation table) ─> forward / drop
//!  broker ─> Relay::grant (here, or Cluster.GrantRelay from another member)
//!  load::report ─> Op::RelayLoad (Raft) when the load changes, so every broker ranks relays the same way
//! ```

pub mod load;
pub mod stun;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use vesper_proto::v1::RelayGrant;

pub use vesper_proto::relay::{Action, RelayConfig, RelayTable};

/// The relay allocation table of this node and the address leaves reach it on; cheap to clone.
#[derive(Clone)]
pub struct Relay {
    table: Arc<Mutex<RelayTable>>,
    /// This node's advertised Leaf address: the relay listens on the same port, over UDP.
    address: String,
}

impl Relay {
    /// A relay with `config`, served on the UDP twin of the advertised Leaf address `address`.
    pub fn new(config: RelayConfig, address: String) -> Self {
        Self {
            table: Arc::new(Mutex::new(RelayTable::new(config))),
            address,
        }
    }

    /// The allocation table, for the STUN port's thread.
    pub fn table(&self) -> Arc<Mutex<RelayTable>> {
        self.table.clone()
    }

    /// A relay allocation on this node, if it relays and has room.
    pub fn grant(&self) -> Option<RelayGrant> {
        let grant = self.lock().grant(Instant::now())?;
        Some(RelayGrant {
            address: self.address.clone(),
            token: grant.token.to_vec(),
            max_bytes: grant.max_bytes,
            max_seconds: grant.max_seconds,
            max_bytes_per_second: grant.max_bytes_per_second,
        })
    }

    /// Allocations in use now and the most this node serves.
    pub fn load(&self) -> (usize, usize) {
        let table = self.lock();
        (table.active(Instant::now()), table.capacity())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RelayTable> {
        self.table.lock().expect("relay lock poisoned")
    }
}
