//! TLS pinned to a peer's key, as leaves use it for QUIC: the certificate and verifier live in
//! [`vesper_proto::pinned_tls`] (super peers use the same code for their reachability probe); this module only
//! turns its error into the leaf's.

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use vesper_proto::Keypair;

pub(super) use vesper_proto::pinned_tls::PinnedPeer;

use crate::error::LeafError;

/// The self-signed certificate and key that present `keypair` in TLS.
pub(super) fn tls_identity(
    keypair: &Keypair,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), LeafError> {
    vesper_proto::pinned_tls::tls_identity(keypair)
        .map_err(|error| LeafError::PeerConnection(error.to_string()))
}
