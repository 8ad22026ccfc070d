//! The Vesper wire protocol and the identity types both sides of it share.
//!
//! - [`v1`]: generated protobuf messages and tonic clients/servers of package `vesper.v1` (Leaf, Cluster, Admin).
//! - [`acl`]: namespace access rules and their conversion from the Admin service's messages.
//! - [`identity`]: Ed25519 keys and [`PeerId`], the stable name of every peer, leaf or super peer.
//! - [`nat`]: NAT classes and address candidates a leaf publishes.
//! - [`pinned_tls`]: TLS pinned to a peer's key (the certificate presenting an Ed25519 key, the verifier accepting
//!   exactly one [`PeerId`]).
//! - [`rate`]: the token bucket behind every rate limit.
//! - [`reach`]: the dial-back proof that a node offering the super peer role can be reached at the ports it
//!   claims.
//! - [`relay`]: the relay's datagram format (binds, answers, end notices, releases) and allocation table.
//! - [`search`]: search terms, checked and converted from a request, and how they match attributes.
//! - [`session`]: the message a leaf signs to prove key possession when it attaches.
//! - [`stun`]: STUN Binding (RFC 8489) as super peers answer it and leaves ask it.
//! - [`validate`]: the limits on namespaces, keys, attributes and values, checked on both sides of the wire.
//! - [`version`]: which protocol versions a build speaks and how two sides agree on one.
//!
//! Generated prost types stay at the edge: code on either side converts them into its own domain types.

pub mod acl;
pub mod codec;
pub mod identity;
pub mod json;
pub mod nat;
pub mod pinned_tls;
pub mod rate;
pub mod reach;
pub mod relay;
pub mod search;
pub mod session;
pub mod stun;
pub mod trace;
pub mod validate;
pub mod version;

pub use identity::{Keypair, PeerId, PeerIdError};

/// Generated code of package `vesper.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("vesper.v1");

    /// Encoded `FileDescriptorSet` of every Vesper proto file (for gRPC reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("vesper_descriptor");
}

/// Request metadata key that carries a leaf's session token on unary Leaf calls.
pub const SESSION_METADATA_KEY: &str = "x-vesper-session";
