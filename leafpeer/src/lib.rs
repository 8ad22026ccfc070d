//! The Vesper leaf peer library: what an app embeds to join the overlay.
//!
//! A [`Leaf`] attaches to one super peer of the virtual super peer over TLS, proves it owns its Ed25519 key by
//! signing the super peer's challenge, and then uses the session for index calls (put, get, delete, list,
//! search). Which super peer it reaches does not matter: every one serves the same replicated state.
//!
//! ```text
//!  Leaf::connect ──> try seeds in order ──> Session stream: challenge -> attach(sig) -> welcome(token)
//!                                            └─ keepalive task: ping every interval while the Leaf lives
//!  leaf.put/get/...  ──> unary call with x-vesper-session: token ──> super peer
//! ```

mod error;
mod leaf;

pub use error::LeafError;
pub use leaf::{Consistency, Handler, Leaf, LeafConfig, Page, SearchTerm, SendOutcome};
pub use vesper_proto::v1::{Member, Message, Presence, PresenceStatus, Record};
pub use vesper_proto::{Keypair, PeerId};
