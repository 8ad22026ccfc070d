//! QUIC endpoints that talk to one pinned peer, and the handshake both sides finish with: the client sends the
//! plan's nonce on a first uni stream, the server takes the connection that carries it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use vesper_proto::{Keypair, PeerId};

use super::tls::{tls_identity, PinnedPeer};
use crate::error::LeafError;

/// ALPN of Vesper's peer-to-peer QUIC connections.
pub const ALPN: &[u8] = b"vesper-p2p/1";

fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.max_idle_timeout(Some(
        Duration::from_secs(30)
            .try_into()
            .expect("30 s is a valid idle timeout"),
    ));
    // Punched paths lose the first Initial when it beats the other side's punch; retransmit soon.
    transport.initial_rtt(Duration::from_millis(100));
    Arc::new(transport)
}

/// The async runtime quinn runs on (tokio's).
pub(super) fn runtime() -> Result<Arc<dyn quinn::Runtime>, LeafError> {
    quinn::default_runtime()
        .ok_or_else(|| LeafError::PeerConnection("no async runtime for QUIC".into()))
}

/// A QUIC endpoint on `socket` that talks only to `peer`, as client and (when `serve`) as server.
pub(super) fn endpoint(
    socket: std::net::UdpSocket,
    keypair: &Keypair,
    peer: PeerId,
    serve: bool,
) -> Result<(quinn::Endpoint, quinn::ClientConfig), LeafError> {
    let socket = runtime()?
        .wrap_udp_socket(socket)
        .map_err(|error| LeafError::PeerConnection(format!("socket: {error}")))?;
    endpoint_on(socket, keypair, peer, serve)
}

/// [`endpoint`] on any socket quinn can use.
pub(super) fn endpoint_on(
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    keypair: &Keypair,
    peer: PeerId,
    serve: bool,
) -> Result<(quinn::Endpoint, quinn::ClientConfig), LeafError> {
    let tls_error = |error: rustls::Error| LeafError::PeerConnection(format!("tls: {error}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedPeer::new(peer, provider.clone()));
    let (cert, key) = tls_identity(keypair)?;
    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_auth_cert(vec![cert.clone()], key.clone_key())
        .map_err(tls_error)?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    let mut client_config = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client)
            .map_err(|error| LeafError::PeerConnection(format!("quic client: {error}")))?,
    ));
    client_config.transport_config(transport());
    let server_config = if serve {
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert], key)
            .map_err(tls_error)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server)
                .map_err(|error| LeafError::PeerConnection(format!("quic server: {error}")))?,
        ));
        config.transport_config(transport());
        Some(config)
    } else {
        None
    };
    let mut config = quinn::EndpointConfig::default();
    // Every QUIC packet then has the 0x40 bit set in its first byte, which keeps it apart from punch datagrams
    // and relay notices (first byte zero).
    config.grease_quic_bit(false);
    let endpoint =
        quinn::Endpoint::new_with_abstract_socket(config, server_config, socket, runtime()?)
            .map_err(|error| LeafError::PeerConnection(format!("quic endpoint: {error}")))?;
    Ok((endpoint, client_config))
}

/// Client side: the first of `targets` to complete a handshake, then the nonce on a uni stream. With
/// `again_after`, a second round of attempts starts after that long: the first Initials may reach the server's
/// NAT before its punch has opened it (on a short path), and QUIC would resend them only after ~300 ms.
pub(super) async fn dial_first(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    targets: &[SocketAddr],
    nonce: &[u8],
    again_after: Option<Duration>,
) -> Result<quinn::Connection, LeafError> {
    let mut attempts = FuturesUnordered::new();
    let start_round = |attempts: &mut FuturesUnordered<quinn::Connecting>| {
        for target in targets {
            match endpoint.connect_with(config.clone(), *target, "vesper-peer") {
                Ok(connecting) => attempts.push(connecting),
                Err(error) => tracing::debug!(%target, %error, "cannot start a QUIC attempt"),
            }
        }
    };
    start_round(&mut attempts);
    let again = tokio::time::sleep(again_after.unwrap_or_default());
    tokio::pin!(again);
    let mut again_pending = again_after.is_some();
    let mut last = String::from("no candidate to try");
    loop {
        tokio::select! {
            () = &mut again, if again_pending => {
                again_pending = false;
                start_round(&mut attempts);
            }
            Some(outcome) = attempts.next() => match outcome {
                Ok(connection) => return send_nonce(connection, nonce).await,
                Err(error) => last = error.to_string(),
            },
            else => break,
        }
    }
    Err(LeafError::PeerConnection(last))
}

/// Sends `nonce` on a first uni stream of the freshly handshaken `connection`, which tells the server it is
/// the connection of this plan.
async fn send_nonce(
    connection: quinn::Connection,
    nonce: &[u8],
) -> Result<quinn::Connection, LeafError> {
    let mut hello = connection
        .open_uni()
        .await
        .map_err(|error| LeafError::PeerConnection(error.to_string()))?;
    hello
        .write_all(nonce)
        .await
        .map_err(|error| LeafError::PeerConnection(error.to_string()))?;
    let _ = hello.finish();
    Ok(connection)
}

/// Server side: the first incoming connection (from the pinned peer) that carries the nonce.
pub(super) async fn accept_with_nonce(
    endpoint: &quinn::Endpoint,
    nonce: &[u8],
) -> Option<quinn::Connection> {
    while let Some(incoming) = endpoint.accept().await {
        let Ok(connection) = incoming.await else {
            continue;
        };
        let Ok(mut hello) = connection.accept_uni().await else {
            continue;
        };
        match hello.read_to_end(64).await {
            Ok(bytes) if bytes == nonce => return Some(connection),
            _ => connection.close(1u32.into(), b"wrong nonce"),
        }
    }
    None
}
