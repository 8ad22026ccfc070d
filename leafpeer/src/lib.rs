//! The Vesper leaf peer library: what an app embeds to join the overlay.
//!
//! A [`Leaf`] attaches to one super peer of the virtual super peer over TLS, proves it owns its Ed25519 key by
//! signing the super peer's challenge, and then uses the session for presence (set, lookup, search), messages
//! (send; receive on a stream or per-kind handlers, each once), watches (presence of contacts, records of a
//! namespace, resumable by log index) and the index (put, get, delete, list, search). Which super peer it
//! reaches does not matter: every one serves the same replicated state, and when its super peer goes away the
//! leaf re-attaches to another one (backoff with jitter) and resumes its watches where they stopped.
//!
//! ```text
//!  Leaf::connect ──> try seeds in order ──> Session stream: challenge -> attach(sig) -> welcome(token)
//!                                            ├─ keepalive task: ping every interval while the session lives
//!                                            └─ read loop: messages to a lane per kind (a blocking-pool thread
//!                                               running its handler) or the stream lane
//!  leaf.put/get/...  ──> unary call with x-vesper-session: token ──> super peer
//! ```

#![warn(missing_docs)]

mod error;
mod leaf;
pub mod nat;
pub mod p2p;
mod relay_socket;

pub use error::LeafError;
pub use leaf::{
    Consistency, Gate, Handler, Leaf, LeafConfig, OfferStatus, Page, PeerMatches, SearchTerm,
    SendOutcome, SuperPeerOffer, WatchItem, WatchSpec,
};
pub use p2p::{Path, PeerConnection, RelayCaps};
pub use vesper_proto::v1::{
    ConferenceChat, ConferenceContext, InvitationState, Member, Message, Presence, PresenceSession,
    PresenceStatus, Record,
};
pub use vesper_proto::{Keypair, PeerId};
