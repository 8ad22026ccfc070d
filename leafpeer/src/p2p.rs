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

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use vesper_proto::nat::parse_candidates;
use vesper_proto::relay as relay_wire;
use vesper_proto::v1::{PortPrediction, PunchPlan, PunchRole};
use vesper_proto::{Keypair, PeerId};

use crate::error::LeafError;
use crate::relay_socket::{RelayEnd, RelaySocket};

/// ALPN of Vesper's peer-to-peer QUIC connections.
pub const ALPN: &[u8] = b"vesper-p2p/1";
/// First bytes of a punch datagram (a zero first byte: neither QUIC nor STUN-with-cookie).
const PUNCH_TAG: [u8; 4] = [0x00, b'V', b'P', b'P'];
/// Interval between punch datagrams.
const PUNCH_INTERVAL: Duration = Duration::from_millis(20);
/// Upper bounds on what a plan may ask of port prediction (a plan comes from a super peer, but a leaf still
/// bounds the sockets it opens and the packets it sends).
const MAX_PREDICTION_SOCKETS: u32 = 512;
const MAX_PREDICTION_PROBES: u32 = 8192;
/// Port prediction: probes per punch interval (so 2048 probes take about 320 ms).
const PROBES_PER_TICK: usize = 128;
/// Port prediction: the spray starts after this many punch intervals, once the client's sockets have punched.
const SPRAY_AFTER_TICKS: u32 = 2;
/// Port prediction: the client's sockets punch again this often.
const PREDICTION_REPUNCH: Duration = Duration::from_millis(250);
/// How long a relayed connection may take to come up once both sides are bound.
const RELAY_DEADLINE: Duration = Duration::from_secs(10);

/// The path a connection runs over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// Straight to the peer at this address.
    Direct(SocketAddr),
    /// Through a super peer's relay, with the caps it enforces.
    Relayed {
        /// The relay's UDP address.
        relay: SocketAddr,
        /// What the relay allows this connection.
        caps: RelayCaps,
    },
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Direct(addr) => write!(f, "direct to {addr}"),
            Path::Relayed { relay, caps } => write!(
                f,
                "relayed by {relay} (caps: {} bytes, {} s, {} bytes/s)",
                caps.max_bytes, caps.max_seconds, caps.max_bytes_per_second
            ),
        }
    }
}

/// What a relay allows one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayCaps {
    /// The relay ends the connection after this many bytes (both directions together).
    pub max_bytes: u64,
    /// ... or this many seconds after it granted the allocation.
    pub max_seconds: u32,
    /// Traffic above this many bytes per second (each direction) is dropped.
    pub max_bytes_per_second: u64,
}

/// An authenticated, encrypted connection to another leaf.
pub struct PeerConnection {
    connection: quinn::Connection,
    /// On a relayed path: the task that closes the connection when the relay ends it (ends with it).
    _relay_watch: Option<AbortOnDropHandle<()>>,
    _endpoint: quinn::Endpoint,
    path: Path,
    peer: PeerId,
    /// On a relayed path: whether (and why) the relay ended the allocation.
    relay_end: Option<watch::Receiver<Option<RelayEnd>>>,
    /// When this side got the broker's plan, and when the connection was up.
    planned_at: std::time::Instant,
    connected_at: std::time::Instant,
}

/// Application close code of a connection whose relay ended it.
const RELAY_ENDED: u32 = 2;

impl PeerConnection {
    fn direct(connection: quinn::Connection, endpoint: quinn::Endpoint, peer: PeerId) -> Self {
        let remote = connection.remote_address();
        Self {
            connection,
            _relay_watch: None,
            _endpoint: endpoint,
            path: Path::Direct(remote),
            peer,
            relay_end: None,
            planned_at: std::time::Instant::now(),
            connected_at: std::time::Instant::now(),
        }
    }

    fn relayed(
        connection: quinn::Connection,
        endpoint: quinn::Endpoint,
        peer: PeerId,
        path: Path,
        mut relay_end: watch::Receiver<Option<RelayEnd>>,
    ) -> Self {
        // When the relay says it is over, close at once rather than wait for the idle timeout.
        let closing = connection.clone();
        let mut ended = relay_end.clone();
        let watch = tokio::spawn(async move {
            tokio::select! {
                Ok(_) = ended.wait_for(Option::is_some) => {
                    closing.close(RELAY_ENDED.into(), b"the relay ended the allocation");
                }
                _ = closing.closed() => {}
            }
        });
        relay_end.mark_unchanged();
        Self {
            connection,
            _relay_watch: Some(AbortOnDropHandle::new(watch)),
            _endpoint: endpoint,
            path,
            peer,
            relay_end: Some(relay_end),
            planned_at: std::time::Instant::now(),
            connected_at: std::time::Instant::now(),
        }
    }

    /// The peer at the other end (its key was checked in the handshake).
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Which path the connection runs over.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// When this side received the broker's punch plan (for measuring how long set-up takes after it).
    pub fn planned_at(&self) -> std::time::Instant {
        self.planned_at
    }

    /// When the connection was up (handshake done, peer key checked).
    pub fn connected_at(&self) -> std::time::Instant {
        self.connected_at
    }

    /// Why the connection ended, once it has: a relay cap (named, with its value), or what QUIC reports.
    pub fn close_reason(&self) -> Option<LeafError> {
        let relay_end = self.relay_end.as_ref().and_then(|ended| *ended.borrow());
        if let (Some(end), Path::Relayed { relay, caps }) = (relay_end, &self.path) {
            return Some(LeafError::Relay(match end {
                RelayEnd::ByteCap => format!(
                    "{relay} ended the connection: its byte cap ({} bytes) was reached",
                    caps.max_bytes
                ),
                RelayEnd::TimeCap => format!(
                    "{relay} ended the connection: its time cap ({} s) was reached",
                    caps.max_seconds
                ),
                RelayEnd::Other(code) => {
                    format!("{relay} ended the connection (reason {code})")
                }
            }));
        }
        self.connection
            .close_reason()
            .map(|error| LeafError::PeerConnection(error.to_string()))
    }

    fn failed(&self, error: impl std::fmt::Display) -> LeafError {
        self.close_reason()
            .unwrap_or_else(|| LeafError::PeerConnection(error.to_string()))
    }

    /// Opens a bidirectional stream.
    pub async fn open_bi(&self) -> Result<(quinn::SendStream, quinn::RecvStream), LeafError> {
        self.connection
            .open_bi()
            .await
            .map_err(|error| self.failed(error))
    }

    /// Waits for the peer to open a bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(quinn::SendStream, quinn::RecvStream), LeafError> {
        self.connection
            .accept_bi()
            .await
            .map_err(|error| self.failed(error))
    }

    /// The QUIC connection, for everything else (datagrams, stats, more streams). When a stream fails,
    /// [`PeerConnection::close_reason`] says why.
    pub fn quic(&self) -> &quinn::Connection {
        &self.connection
    }

    /// Closes the connection and waits until the peer knows.
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"done");
        self._endpoint.wait_idle().await;
    }
}

/// The self-signed certificate and key that present `keypair` in TLS.
fn tls_identity(
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
struct PinnedPeer {
    expected: PeerId,
    provider: Arc<CryptoProvider>,
}

impl PinnedPeer {
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
fn runtime() -> Result<Arc<dyn quinn::Runtime>, LeafError> {
    quinn::default_runtime()
        .ok_or_else(|| LeafError::PeerConnection("no async runtime for QUIC".into()))
}

/// A QUIC endpoint on `socket` that talks only to `peer`, as client and (when `serve`) as server.
fn endpoint(
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
fn endpoint_on(
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    keypair: &Keypair,
    peer: PeerId,
    serve: bool,
) -> Result<(quinn::Endpoint, quinn::ClientConfig), LeafError> {
    let tls_error = |error: rustls::Error| LeafError::PeerConnection(format!("tls: {error}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedPeer {
        expected: peer,
        provider: provider.clone(),
    });
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
async fn dial_first(
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
                Ok(connection) => {
                    let mut hello = connection
                        .open_uni()
                        .await
                        .map_err(|error| LeafError::PeerConnection(error.to_string()))?;
                    hello
                        .write_all(nonce)
                        .await
                        .map_err(|error| LeafError::PeerConnection(error.to_string()))?;
                    let _ = hello.finish();
                    return Ok(connection);
                }
                Err(error) => last = error.to_string(),
            },
            else => break,
        }
    }
    Err(LeafError::PeerConnection(last))
}

/// Server side: the first incoming connection (from the pinned peer) that carries the nonce.
async fn accept_with_nonce(endpoint: &quinn::Endpoint, nonce: &[u8]) -> Option<quinn::Connection> {
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

/// The punch datagram of a plan: the tag, then the nonce's first 8 bytes.
fn punch_datagram(nonce: &[u8]) -> Vec<u8> {
    let mut datagram = PUNCH_TAG.to_vec();
    datagram.extend_from_slice(&nonce[..8.min(nonce.len())]);
    datagram
}

/// Whether `ip` can be a NAT's public address worth spraying (not a private, shared, loopback or link-local
/// one, which would put the probes on someone's LAN).
fn sprayable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            let shared = a == 100 && (64..128).contains(&b);
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || shared)
        }
        IpAddr::V6(v6) => {
            let unique_local = (v6.segments()[0] & 0xfe00) == 0xfc00;
            let link_local = (v6.segments()[0] & 0xffc0) == 0xfe80;
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || unique_local
                || link_local)
        }
    }
}

/// Sends punch datagrams to every target until dropped; with `spray`, also that many probes to random ports
/// (1024 and up) of the targets' public addresses.
async fn punch(socket: UdpSocket, targets: Vec<SocketAddr>, nonce: Vec<u8>, spray: u32) {
    let datagram = punch_datagram(&nonce);
    let mut spray_ips: Vec<IpAddr> = targets
        .iter()
        .map(SocketAddr::ip)
        .filter(|ip| sprayable(*ip))
        .collect();
    spray_ips.dedup();
    let mut left = if spray_ips.is_empty() {
        0
    } else {
        spray as usize
    };
    let mut ticker = tokio::time::interval(PUNCH_INTERVAL);
    let mut ticks = 0u32;
    loop {
        ticker.tick().await;
        ticks += 1;
        for target in &targets {
            let _ = socket.send_to(&datagram, target).await;
        }
        if ticks > SPRAY_AFTER_TICKS && left > 0 {
            let batch = left.min(PROBES_PER_TICK);
            left -= batch;
            for index in 0..batch {
                let port = rand::random_range(1024..=u16::MAX);
                let ip = spray_ips[index % spray_ips.len()];
                let _ = socket.send_to(&datagram, SocketAddr::new(ip, port)).await;
            }
        }
    }
}

/// Client side of port prediction: `count` fresh sockets punch towards `targets` (each opens its own mapping
/// on an endpoint-dependent NAT); returns the first socket that hears the server's probe, and the address the
/// probe came from.
async fn predicted_socket(
    targets: &[SocketAddr],
    nonce: &[u8],
    count: u32,
) -> Result<(std::net::UdpSocket, SocketAddr), LeafError> {
    let datagram = punch_datagram(nonce);
    let (found_tx, mut found_rx) = tokio::sync::mpsc::channel(1);
    let mut searchers = tokio::task::JoinSet::new();
    for _ in 0..count {
        let socket = match UdpSocket::bind(("0.0.0.0", 0)).await {
            Ok(socket) => socket,
            Err(error) if searchers.is_empty() => {
                return Err(LeafError::PeerConnection(format!(
                    "socket for port prediction: {error}"
                )))
            }
            Err(error) => {
                tracing::debug!(%error, opened = searchers.len(), "port prediction with fewer sockets");
                break;
            }
        };
        let targets = targets.to_vec();
        let datagram = datagram.clone();
        let found = found_tx.clone();
        searchers.spawn(async move {
            let mut buffer = [0u8; 64];
            let mut repunch = tokio::time::interval(PREDICTION_REPUNCH);
            let from = loop {
                tokio::select! {
                    _ = repunch.tick() => {
                        for target in &targets {
                            let _ = socket.send_to(&datagram, target).await;
                        }
                    }
                    received = socket.recv_from(&mut buffer) => {
                        if let Ok((len, from)) = received {
                            if buffer[..len] == datagram[..] {
                                break from;
                            }
                        }
                    }
                }
            };
            let _ = found.send((socket, from)).await;
        });
    }
    drop(found_tx);
    let found = found_rx.recv().await;
    searchers.abort_all();
    let (socket, from) =
        found.ok_or_else(|| LeafError::PeerConnection("port prediction found no path".into()))?;
    let socket = socket
        .into_std()
        .map_err(|error| LeafError::PeerConnection(format!("socket: {error}")))?;
    Ok((socket, from))
}

/// Client side with port prediction: dial from the socket a probe reached; returns its endpoint too.
async fn dial_predicted(
    targets: &[SocketAddr],
    nonce: &[u8],
    count: u32,
    keypair: &Keypair,
    peer: PeerId,
) -> Result<(quinn::Connection, quinn::Endpoint), LeafError> {
    let (socket, from) = predicted_socket(targets, nonce, count).await?;
    tracing::debug!(%from, "a port prediction probe got through");
    let (endpoint, config) = endpoint(socket, keypair, peer, false)?;
    let connection = dial_first(&endpoint, &config, &[from], nonce, None).await?;
    Ok((connection, endpoint))
}

/// Binds `socket` to the relay allocation of `token`; errors name what the relay said.
async fn bind_relay(socket: &UdpSocket, relay: SocketAddr, token: &[u8]) -> Result<(), LeafError> {
    let token: &[u8; 16] = token
        .try_into()
        .map_err(|_| LeafError::Relay(format!("relay token of {} bytes, not 16", token.len())))?;
    let request = relay_wire::bind_request(token);
    let mut buffer = [0u8; 64];
    for wait in [200u64, 400, 800, 1600] {
        socket
            .send_to(&request, relay)
            .await
            .map_err(|error| LeafError::PeerConnection(format!("relay {relay}: {error}")))?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait);
        while let Ok(Ok((len, from))) =
            tokio::time::timeout_at(deadline, socket.recv_from(&mut buffer)).await
        {
            let Some(status) =
                relay_wire::parse_bind_answer(&buffer[..len]).filter(|_| from == relay)
            else {
                continue;
            };
            return match relay_wire::BindStatus::from_byte(status) {
                Some(relay_wire::BindStatus::Bound) => Ok(()),
                Some(refused) => Err(LeafError::Relay(refused.describe().into())),
                None => Err(LeafError::Relay(format!("relay answered status {status}"))),
            };
        }
    }
    Err(LeafError::Relay(format!(
        "relay {relay} did not answer the bind"
    )))
}

/// A socket whose candidates went to the broker, with its QUIC endpoint built before the plan arrives, so the
/// plan's critical path starts with the first packet (building TLS configs and the endpoint takes about half a
/// millisecond in a release build).
pub struct PreparedSocket {
    peer: PeerId,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    /// A second handle on the same socket, for punch datagrams (quinn owns the first).
    punch_socket: UdpSocket,
}

impl PreparedSocket {
    /// Builds the endpoint for a connection with `peer` on `socket` (after STUN has measured it: from now on
    /// quinn reads the socket).
    pub fn new(socket: UdpSocket, keypair: &Keypair, peer: PeerId) -> Result<Self, LeafError> {
        let std_socket = socket
            .into_std()
            .map_err(|error| LeafError::PeerConnection(format!("socket: {error}")))?;
        let punch_socket = std_socket
            .try_clone()
            .and_then(UdpSocket::from_std)
            .map_err(|error| LeafError::PeerConnection(format!("socket: {error}")))?;
        // Built able to serve; a client-role plan takes the server side away again.
        let (endpoint, client_config) = endpoint(std_socket, keypair, peer, true)?;
        Ok(Self {
            peer,
            endpoint,
            client_config,
            punch_socket,
        })
    }
}

/// Carries out a punch plan on a prepared socket (the socket whose candidates were sent to the broker). A relay
/// allocation a direct path made useless is released afterwards, on `tasks`, unless `stop` comes first.
pub async fn run_plan(
    prepared: PreparedSocket,
    plan: PunchPlan,
    keypair: &Keypair,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<PeerConnection, LeafError> {
    let planned_at = std::time::Instant::now();
    let grant = plan.relay.clone();
    let mut connection = carry_out(prepared, plan, keypair).await?;
    connection.planned_at = planned_at;
    if let (Path::Direct(_), Some(grant)) = (&connection.path, grant) {
        // Off the critical path: the app gets its connection now.
        let stop = stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                biased;
                _ = stop.cancelled() => {}
                _ = release_relay(&grant.address, &grant.token) => {}
            }
        });
    }
    Ok(connection)
}

/// Tells the relay its allocation will not be used (best effort: an unused one also expires by itself).
async fn release_relay(address: &str, token: &[u8]) {
    let Ok(Some(relay)) = tokio::net::lookup_host(address)
        .await
        .map(|mut addrs| addrs.next())
    else {
        return;
    };
    let Ok(token) = <&[u8; 16]>::try_from(token) else {
        return;
    };
    let datagram = relay_wire::release_request(token);
    let unspecified: SocketAddr = if relay.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    if let Ok(socket) = UdpSocket::bind(unspecified).await {
        let _ = socket.send_to(&datagram, relay).await;
    }
}

async fn carry_out(
    prepared: PreparedSocket,
    plan: PunchPlan,
    keypair: &Keypair,
) -> Result<PeerConnection, LeafError> {
    let peer: PeerId = plan
        .peer_id
        .parse()
        .map_err(|error| LeafError::PeerConnection(format!("plan names a bad peer: {error}")))?;
    if peer != prepared.peer {
        return Err(LeafError::PeerConnection(format!(
            "the plan names peer {peer}, but this socket was prepared for {}",
            prepared.peer
        )));
    }
    let targets = parse_candidates(&plan.peer_candidates)
        .map_err(|error| LeafError::PeerConnection(format!("plan candidates: {error}")))?;
    let nonce = plan.nonce.clone();
    let role = PunchRole::try_from(plan.role).unwrap_or(PunchRole::Client);
    let prediction = plan.prediction.unwrap_or_default();
    let prediction = PortPrediction {
        sockets: prediction.sockets.min(MAX_PREDICTION_SOCKETS),
        probes: prediction.probes.min(MAX_PREDICTION_PROBES),
    };
    let deadline = Duration::from_millis(u64::from(plan.direct_deadline_ms.max(100)));
    let start_delay = Duration::from_millis(u64::from(plan.start_delay_ms.min(5000)));
    // The client starts at once and again after the start delay (see `dial_first`); a server waits it out.
    let again = (role == PunchRole::Client && !start_delay.is_zero()).then_some(start_delay);
    if role == PunchRole::Server {
        tokio::time::sleep(start_delay).await;
    }

    let PreparedSocket {
        endpoint: direct,
        client_config,
        punch_socket,
        ..
    } = prepared;
    if role != PunchRole::Server {
        direct.set_server_config(None);
    }

    let mut direct_failure = String::from("the broker planned a relayed connection");
    if !plan.relay_only {
        let attempt = async {
            match role {
                PunchRole::Server => {
                    // Aborted once a connection is accepted, or when the attempt is dropped at its deadline.
                    let puncher = AbortOnDropHandle::new(tokio::spawn(punch(
                        punch_socket,
                        targets.clone(),
                        nonce.clone(),
                        prediction.probes,
                    )));
                    let accepted = accept_with_nonce(&direct, &nonce).await;
                    drop(puncher);
                    accepted
                        .map(|connection| (connection, None))
                        .ok_or_else(|| LeafError::PeerConnection("endpoint closed".into()))
                }
                _ if prediction.sockets > 0 => {
                    // Plain dialing still wins where the other NAT does not filter by port.
                    let plain = Box::pin(async {
                        dial_first(&direct, &client_config, &targets, &nonce, again)
                            .await
                            .map(|connection| (connection, None))
                    });
                    let predicted = Box::pin(async {
                        dial_predicted(&targets, &nonce, prediction.sockets, keypair, peer)
                            .await
                            .map(|(connection, endpoint)| (connection, Some(endpoint)))
                    });
                    futures::future::select_ok([
                        plain as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>,
                        predicted,
                    ])
                    .await
                    .map(|(won, _)| won)
                }
                _ => dial_first(&direct, &client_config, &targets, &nonce, again)
                    .await
                    .map(|connection| (connection, None)),
            }
        };
        match tokio::time::timeout(deadline, attempt).await {
            Ok(Ok((connection, predicted))) => {
                return Ok(PeerConnection::direct(
                    connection,
                    predicted.unwrap_or(direct),
                    peer,
                ));
            }
            Ok(Err(error)) => direct_failure = error.to_string(),
            Err(_) => direct_failure = format!("no direct path within {deadline:?}"),
        }
    }

    let grant = plan.relay.ok_or_else(|| {
        LeafError::PeerConnection(format!("{direct_failure}, and the broker granted no relay"))
    })?;
    let relay: SocketAddr = tokio::net::lookup_host(grant.address.as_str())
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| {
            LeafError::Relay(format!(
                "relay address {:?} does not resolve",
                grant.address
            ))
        })?;
    let relay_socket = UdpSocket::bind(("0.0.0.0", 0))
        .await
        .map_err(|error| LeafError::PeerConnection(format!("socket: {error}")))?;
    bind_relay(&relay_socket, relay, &grant.token).await?;
    let relay_std = relay_socket
        .into_std()
        .map_err(|error| LeafError::PeerConnection(format!("socket: {error}")))?;
    let (relay_socket, relay_end) = RelaySocket::new(
        runtime()?
            .wrap_udp_socket(relay_std)
            .map_err(|error| LeafError::PeerConnection(format!("socket: {error}")))?,
        relay,
    );
    let (relayed, relay_client) =
        endpoint_on(relay_socket, keypair, peer, role == PunchRole::Server)?;
    let caps = RelayCaps {
        max_bytes: grant.max_bytes,
        max_seconds: grant.max_seconds,
        max_bytes_per_second: grant.max_bytes_per_second,
    };
    let connection = match role {
        PunchRole::Server => {
            // A direct handshake that completes late still counts: accept on both endpoints.
            let outcome = tokio::time::timeout(RELAY_DEADLINE, async {
                tokio::select! {
                    Some(connection) = accept_with_nonce(&relayed, &nonce) => Some((connection, true)),
                    Some(connection) = accept_with_nonce(&direct, &nonce) => Some((connection, false)),
                    else => None,
                }
            })
            .await;
            match outcome {
                Ok(Some((connection, true))) => connection,
                Ok(Some((connection, false))) => {
                    return Ok(PeerConnection::direct(connection, direct, peer));
                }
                _ => {
                    return Err(LeafError::PeerConnection(format!(
                        "{direct_failure}; the peer did not come through the relay either"
                    )))
                }
            }
        }
        _ => {
            // The other side may bind a moment later: retry the relayed handshake until the deadline.
            let started = tokio::time::Instant::now();
            loop {
                match tokio::time::timeout(
                    RELAY_DEADLINE,
                    dial_first(&relayed, &relay_client, &[relay], &nonce, None),
                )
                .await
                {
                    Ok(Ok(connection)) => break connection,
                    Ok(Err(error)) if started.elapsed() < RELAY_DEADLINE => {
                        tracing::debug!(%error, "relayed handshake failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok(Err(error)) => return Err(error),
                    Err(_) => {
                        return Err(LeafError::PeerConnection(format!(
                            "{direct_failure}; no connection through the relay within {RELAY_DEADLINE:?}"
                        )))
                    }
                }
            }
        }
    };
    drop(direct);
    Ok(PeerConnection::relayed(
        connection,
        relayed,
        peer,
        Path::Relayed { relay, caps },
        relay_end,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_sprayed() {
        for public in ["203.0.113.7", "8.8.8.8", "2001:db8::1"] {
            assert!(sprayable(public.parse().unwrap()), "{public}");
        }
        for local in [
            "10.1.0.2",
            "192.168.1.1",
            "172.16.0.1",
            "100.64.3.2",
            "127.0.0.1",
            "169.254.1.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
        ] {
            assert!(!sprayable(local.parse().unwrap()), "{local}");
        }
    }
}
