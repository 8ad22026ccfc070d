//! The message a leaf signs to attach: a domain-separation tag, the server's fresh nonce and the server's own
//! PeerId. The nonce makes every signature single-use; the server id stops a signature made for one super peer
//! from being replayed to another.

use crate::v1::Attach;
use crate::{PeerId, PeerIdError};

/// Domain-separation tag, so a session signature can never be mistaken for a signature of anything else.
pub const SESSION_SIGNATURE_CONTEXT: &[u8] = b"vesper-session-v1";

/// Length of the server nonce in bytes.
pub const NONCE_LEN: usize = 32;

/// Why an attach was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("attach public key: {0}")]
    PublicKey(PeerIdError),
    #[error("attach signature: {0}")]
    Signature(PeerIdError),
}

/// Checks a leaf's answer to the challenge `nonce` from `server_peer_id`: the public key is a valid Ed25519
/// key and the signature over [`attach_message`] is its. Returns the peer the session belongs to.
pub fn verify_attach(
    attach: &Attach,
    nonce: &[u8],
    server_peer_id: &str,
) -> Result<PeerId, AttachError> {
    let peer = PeerId::from_public_key_bytes(&attach.public_key).map_err(AttachError::PublicKey)?;
    peer.verify(&attach_message(nonce, server_peer_id), &attach.signature)
        .map_err(AttachError::Signature)?;
    Ok(peer)
}

/// Bytes a leaf signs to answer the challenge `nonce` from the super peer `server_peer_id`.
pub fn attach_message(nonce: &[u8], server_peer_id: &str) -> Vec<u8> {
    let mut message =
        Vec::with_capacity(SESSION_SIGNATURE_CONTEXT.len() + nonce.len() + server_peer_id.len());
    message.extend_from_slice(SESSION_SIGNATURE_CONTEXT);
    message.extend_from_slice(nonce);
    message.extend_from_slice(server_peer_id.as_bytes());
    message
}
