//! TLS pinned to a peer's key: the self-signed certificate that presents this leaf's Ed25519 key, and the
//! verifier that accepts exactly the certificate of the PeerId a plan names (as client and as server).
//!
//! There is no CA between leaves: the broker's plan says which PeerId is at the other end, and the handshake
//! proves the other end holds that key. Only TLS 1.3 with Ed25519 is offered or accepted.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use vesper_proto::{Keypair, PeerId};

use crate::error::LeafError;

/// The self-signed certificate and key that present `keypair` in TLS.
pub(super) fn tls_identity(
    keypair: &Keypair,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), LeafError> {
    // RFC 8410 PKCS#8 for Ed25519: a fixed prefix, then the 32-byte seed.
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(&keypair.secret_bytes());
    let der = PrivatePkcs8KeyDer::from(pkcs8);
    let key = rcgen::KeyPair::try_from(&der)
        .map_err(|error| LeafError::PeerConnection(format!("peer key for TLS: {error}")))?;
    let params = rcgen::CertificateParams::new(vec!["vesper-peer".to_string()])
        .map_err(|error| LeafError::PeerConnection(format!("peer certificate: {error}")))?;
    let cert = params
        .self_signed(&key)
        .map_err(|error| LeafError::PeerConnection(format!("peer certificate: {error}")))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(der)))
}

/// Accepts exactly the certificate whose Ed25519 key is `expected` (either end of the handshake).
#[derive(Debug)]
pub(super) struct PinnedPeer {
    expected: PeerId,
    provider: Arc<CryptoProvider>,
}

impl PinnedPeer {
    /// A verifier for `expected`, checking signatures with `provider`'s algorithms.
    pub(super) fn new(expected: PeerId, provider: Arc<CryptoProvider>) -> Self {
        Self { expected, provider }
    }

    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        let key = parsed.public_key();
        let ed25519 = x509_parser::oid_registry::OID_SIG_ED25519;
        if key.algorithm.algorithm != ed25519
            || key.subject_public_key.data.as_ref() != self.expected.as_bytes()
        {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(())
    }

    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for PinnedPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PinnedPeer {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}
