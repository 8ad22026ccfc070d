//! TLS pinned to a peer's key: the self-signed certificate that presents a peer's Ed25519 key, and the verifier
//! that accepts exactly the certificate of one expected [`PeerId`] (as client and as server).
//!
//! There is no CA between peers: whoever starts the connection already knows which PeerId should be at the
//! other end (a broker's plan, a reachability claim), and the handshake proves the other end holds that key.
//! Only TLS 1.3 with Ed25519 is offered or accepted. Leaves use this for their QUIC connections; super peers use
//! it for the dial-back probe of [`crate::reach`].

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::{Keypair, PeerId};

/// Why the certificate for a key could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PinnedTlsError {
    /// rcgen did not take the Ed25519 key.
    #[error("peer key for TLS: {0}")]
    Key(#[source] rcgen::Error),
    /// rcgen could not build or sign the certificate.
    #[error("peer certificate: {0}")]
    Certificate(#[source] rcgen::Error),
}

fn pkcs8(keypair: &Keypair) -> PrivatePkcs8KeyDer<'static> {
    // RFC 8410 PKCS#8 for Ed25519: a fixed prefix, then the 32-byte seed.
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(&keypair.secret_bytes());
    PrivatePkcs8KeyDer::from(pkcs8)
}

/// `keypair` as a PKCS#8 PEM private key (for a TLS server that loads its key from a file, such as a super
/// peer whose certificate names the same key).
pub fn private_key_pem(keypair: &Keypair) -> Result<String, PinnedTlsError> {
    let der = pkcs8(keypair);
    Ok(rcgen::KeyPair::try_from(&der)
        .map_err(PinnedTlsError::Key)?
        .serialize_pem())
}

/// The self-signed certificate and key that present `keypair` in TLS.
pub fn tls_identity(
    keypair: &Keypair,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), PinnedTlsError> {
    let der = pkcs8(keypair);
    let key = rcgen::KeyPair::try_from(&der).map_err(PinnedTlsError::Key)?;
    let params = rcgen::CertificateParams::new(vec!["vesper-peer".to_string()])
        .map_err(PinnedTlsError::Certificate)?;
    let cert = params
        .self_signed(&key)
        .map_err(PinnedTlsError::Certificate)?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(der)))
}

/// Accepts exactly the certificate whose Ed25519 key is `expected` (either end of the handshake).
///
/// A certificate with any other key, or a key that is not Ed25519, fails with
/// `rustls::CertificateError::ApplicationVerificationFailure`; one that does not parse with `BadEncoding`.
#[derive(Debug)]
pub struct PinnedPeer {
    expected: PeerId,
    provider: Arc<CryptoProvider>,
}

impl PinnedPeer {
    /// A verifier for `expected`, checking signatures with `provider`'s algorithms.
    pub fn new(expected: PeerId, provider: Arc<CryptoProvider>) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Both ends pinned, as leaves use it (each presents its key, each accepts only the other's): the handshake
    /// succeeds with the right keys, and the server refuses a client that presents another key.
    #[tokio::test]
    async fn both_ends_accept_only_the_pinned_key() {
        let server_key = Keypair::generate();
        let client_key = Keypair::generate();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (server_cert, server_private) = tls_identity(&server_key).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(Arc::new(PinnedPeer::new(
                client_key.peer_id(),
                provider.clone(),
            )))
            .with_single_cert(vec![server_cert], server_private)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..2 {
                let (stream, _) = listener.accept().await.unwrap();
                let outcome = match acceptor.accept(stream).await {
                    Ok(mut tls) => {
                        let mut byte = [0u8; 1];
                        tls.read_exact(&mut byte).await.unwrap();
                        tls.write_all(&byte).await.unwrap();
                        tls.shutdown().await.unwrap();
                        Ok(())
                    }
                    Err(error) => Err(error.to_string()),
                };
                outcomes.push(outcome);
            }
            outcomes
        });
        for presented in [&client_key, &Keypair::generate()] {
            let (cert, private) = tls_identity(presented).unwrap();
            let client = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedPeer::new(
                    server_key.peer_id(),
                    provider.clone(),
                )))
                .with_client_auth_cert(vec![cert], private)
                .unwrap();
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("vesper-peer").unwrap();
            // TLS 1.3: the client finishes before the server has judged its certificate, so a refusal shows
            // on the first read.
            if let Ok(mut tls) = tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(name, stream)
                .await
            {
                let _ = tls.write_all(&[7]).await;
                let mut byte = [0u8; 1];
                let _ = tls.read_exact(&mut byte).await;
            }
        }
        let outcomes = served.await.unwrap();
        assert!(outcomes[0].is_ok(), "{outcomes:?}");
        assert!(outcomes[1].is_err(), "{outcomes:?}");
    }
}
