//! Direct connections between leaves: QUIC (quinn) over a punched UDP path, or over a super peer's relay.
//!
//! ```text
//!  plan (from the broker): role, peer candidates, nonce, deadline, relay grant
//!   client: QUIC Initial to every candidate at once ─┐  the first handshake that completes wins; the client
//!   server: punch datagrams to every candidate, accept┘  sends the nonce on a first uni stream, the server
//!                                                       takes the connection that carries it
//!   no path by the deadline (or relay_only): both bind a fresh socket to the relay with the grant's token, and
//!   the client connects to the relay's address; the relay passes the (encrypted) QUIC datagrams across
//! ```
//!
//! Port prediction (when the plan asks for it, see the broker): the client opens many sockets and punches
//! from each, the server sprays probes at random ports of the client's public address, and the client dials
//! from the first socket a probe reaches, to where the probe came from.
//!
//! TLS 1.3 inside QUIC authenticates both ends by their peer keys: each side presents a self-signed
//! certificate for its Ed25519 key, and each side accepts only the certificate whose key is the PeerId the plan
//! names. The relay sees only QUIC ciphertext.
//!
//! The modules, each using only those before it: `tls` (the pinned certificates), `quic` (endpoints, the nonce
//! handshake), `connection` (what the app gets), `prediction` (port prediction, both sides), `punch` (punching,
//! with the spray), `relay` (the fallback), `plan` (carrying out the broker's plan).

mod connection;
mod plan;
mod prediction;
mod punch;
mod quic;
mod relay;
mod tls;

pub use connection::{Path, PeerConnection, RelayCaps};
pub use plan::{run_plan, PreparedSocket};
pub use quic::ALPN;
