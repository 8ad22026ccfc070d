//! Dial-back proof of reachability: before a node is trusted with the super peer role, a super peer dials it
//! back at the TCP and UDP ports it claims it would serve on, from another host, and checks that the answer
//! comes from the node's key (after libp2p AutoNAT v2, and LimeWire's "has ever accepted an incoming
//! connection").
//!
//! ```text
//!  node: ReachClaim { peer_id, tcp: [ip:port, ..], udp: [ip:port, ..] }  (ip must be where its session comes from)
//!  super peer, TCP, for each claimed address, from a fresh ephemeral port:
//!    connect ── TLS 1.3, ALPN "vesper-reach/1", server must present peer_id's Ed25519 key ── nonce (16 bytes) ──>
//!            <── the same 16 bytes ── both close
//!  super peer, UDP, for each claimed address, from a fresh socket (unspecified address, port 0):
//!    [00 'V' 'R' 'Q' | nonce]  (20 bytes, sent up to 3 times) ──>
//!            <── [00 'V' 'R' 'A' | nonce]  (20 bytes, from exactly the claimed address)
//! ```
//!
//! - The prober never binds its own listening port to dial (AutoNAT v2's rule): a reply must reach a fresh
//!   port, so a NAT mapping the prober's own traffic opened cannot fake the result.
//! - TLS server name: the fixed "vesper-peer"; it is not checked, only the key is ([`PinnedPeer`]). The
//!   responder's certificate is [`tls_identity`]; it asks for no client certificate.
//! - UDP: the prober ignores datagrams from any other source and any other contents (a right-looking answer with
//!   another nonce is remembered and reported as [`ProbeError::NonceMismatch`] if nothing better comes). The
//!   responder answers a 20-byte query with a 20-byte answer to its source and ignores everything else, so it
//!   never sends more than it was sent. The query tag `VRQ` is none of the relay's tags (`VRB`, `VRA`, `VRE`,
//!   `VRX`); the answer shares `VRA` with the relay's bind answer but is 20 bytes where that is 5.
//! - The whole probe takes at most [`PROBE_TIMEOUT`]; all addresses are checked at once, and every one must pass.
//! - Addresses whose IP is not the observed one are refused before anything is sent, so a node cannot aim the
//!   super peer at a third party; at most [`MAX_CLAIMED_PORTS`] addresses per protocol are dialled.
//!
//! What a passed probe proves: right now, another host can reach the node at those ports, and the node holds
//! the key. It does not prove a NAT or firewall will keep letting strangers in later (a mapping may expire, a
//! rule may change), which is why the caller lets proofs expire and renews them.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::pinned_tls::{tls_identity, PinnedPeer};
use crate::{Keypair, PeerId};

/// How long one probe may take in all.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of a nonce.
pub const NONCE_BYTES: usize = 16;

/// Most addresses probed per protocol; a claim with more is refused, so one claim cannot make a super peer
/// dial many ports.
pub const MAX_CLAIMED_PORTS: usize = 4;

/// ALPN of the TCP probe.
pub const ALPN: &[u8] = b"vesper-reach/1";

/// First bytes of a UDP probe query; the nonce follows.
pub const UDP_QUERY_TAG: [u8; 4] = [0x00, b'V', b'R', b'Q'];

/// First bytes of a UDP probe answer; the nonce follows.
pub const UDP_ANSWER_TAG: [u8; 4] = [0x00, b'V', b'R', b'A'];

/// Length of a UDP probe query and of its answer.
pub const UDP_PROBE_LEN: usize = 4 + NONCE_BYTES;

/// Times the prober sends its UDP query (UDP loses packets).
const UDP_SENDS: u32 = 3;

/// TCP probes a responder serves at once; more are closed at once rather than queued.
const MAX_CONCURRENT_PROBES: usize = 8;

/// How long a responder gives one TCP probe: no honest prober waits longer.
const RESPOND_DEADLINE: Duration = PROBE_TIMEOUT;

/// The TLS server name the prober sends (not checked: the key is).
const SERVER_NAME: &str = "vesper-peer";

/// Pause of a responder loop after a socket error, so a broken socket does not spin a core.
const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// What a node claims: the TCP and UDP ports it would serve the super peer role on, at its IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReachClaim {
    /// The key the node must present on every TCP address.
    pub peer_id: PeerId,
    /// TCP addresses to dial; each IP must be the one the node's session comes from.
    pub tcp: Vec<SocketAddr>,
    /// UDP addresses to send a query to; each IP must be the one the node's session comes from.
    pub udp: Vec<SocketAddr>,
}

/// Which protocol a claimed address is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A TCP address (TLS probe).
    Tcp,
    /// A UDP address (query and answer datagrams).
    Udp,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// Why a probe failed (each variant's Display names the address and what went wrong, for `placement explain`).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The claim names no address at all: there is nothing to prove.
    #[error("the claim names no TCP or UDP address to probe")]
    NothingClaimed,
    /// More than [`MAX_CLAIMED_PORTS`] addresses for one protocol; nothing was sent.
    #[error("{transport}: {claimed} addresses claimed, at most {MAX_CLAIMED_PORTS} are probed; nothing was sent")]
    TooManyPorts {
        transport: Transport,
        claimed: usize,
    },
    /// A claimed address is not at the IP the node's session comes from; nothing was sent.
    #[error("{transport} {addr}: not at {observed}, the address the node's session comes from; nothing was sent")]
    NotObservedIp {
        transport: Transport,
        addr: SocketAddr,
        observed: IpAddr,
    },
    /// The TCP connection could not be made (refused, unreachable, ...).
    #[error("TCP {addr}: cannot connect: {error}")]
    Connect { addr: SocketAddr, error: io::Error },
    /// The TLS handshake failed for another reason than the key, or the server did not agree to the ALPN.
    #[error("TCP {addr}: TLS handshake failed: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    /// The server presented a certificate that is not the claimed key (an impostor, or another node there).
    #[error("TCP {addr}: the server's certificate is not the key of {expected}")]
    WrongKey { addr: SocketAddr, expected: PeerId },
    /// The answer carried another nonce than the one sent.
    #[error("{transport} {addr}: answered with another nonce than the one sent")]
    NonceMismatch {
        transport: Transport,
        addr: SocketAddr,
    },
    /// No UDP answer from the claimed address in time.
    #[error("UDP {addr}: no answer to {sends} probe datagrams within {waited:?}")]
    NoUdpEcho {
        addr: SocketAddr,
        sends: u32,
        waited: Duration,
    },
    /// A TCP probe did not finish in time; `stage` says where it stood.
    #[error("TCP {addr}: timed out {stage} (a probe may take {limit:?} in all)")]
    Timeout {
        addr: SocketAddr,
        stage: &'static str,
        limit: Duration,
    },
    /// A socket error after connecting, or on the prober's own UDP socket.
    #[error("{transport} {addr}: {action}: {error}")]
    Io {
        transport: Transport,
        addr: SocketAddr,
        action: &'static str,
        error: io::Error,
    },
}

/// The UDP query that carries `nonce`.
fn udp_query(nonce: &[u8; NONCE_BYTES]) -> [u8; UDP_PROBE_LEN] {
    let mut query = [0u8; UDP_PROBE_LEN];
    query[..4].copy_from_slice(&UDP_QUERY_TAG);
    query[4..].copy_from_slice(nonce);
    query
}

/// The answer to a UDP probe datagram, or None when `datagram` is not exactly a well-formed query. For a
/// socket that also carries other traffic (STUN, the relay), so it can answer probes in its own receive loop;
/// check it before STUN, since a query's random nonce may look like STUN's magic cookie.
pub fn udp_answer(datagram: &[u8]) -> Option<[u8; UDP_PROBE_LEN]> {
    if datagram.len() != UDP_PROBE_LEN || datagram[..4] != UDP_QUERY_TAG {
        return None;
    }
    let mut answer = [0u8; UDP_PROBE_LEN];
    answer[..4].copy_from_slice(&UDP_ANSWER_TAG);
    answer[4..].copy_from_slice(&datagram[4..]);
    Some(answer)
}

/// Dials every claimed address of `claim` and checks the answers. Refuses (without sending anything) any
/// address whose IP is not `observed_ip` (the source IP the super peer sees the node's session come from),
/// so a probe never reaches a third party; refuses more than MAX_CLAIMED_PORTS (4) addresses per protocol.
///
/// Every address is checked at once, all within [`PROBE_TIMEOUT`]; the first failure is returned (and the
/// other checks are dropped). A claim with no address at all fails with [`ProbeError::NothingClaimed`].
///
/// On success, returns the round-trip time to the node: the fastest TCP connect (one SYN / SYN-ACK exchange)
/// among the claimed TCP addresses, or None when no TCP address was claimed.
pub async fn probe(
    claim: &ReachClaim,
    observed_ip: IpAddr,
    nonce: [u8; NONCE_BYTES],
) -> Result<Option<Duration>, ProbeError> {
    probe_timed_within(claim, observed_ip, nonce, PROBE_TIMEOUT).await
}

/// [`probe`] with the time limit as a parameter, without the round trip (tests use a short limit).
#[cfg(test)]
async fn probe_within(
    claim: &ReachClaim,
    observed_ip: IpAddr,
    nonce: [u8; NONCE_BYTES],
    limit: Duration,
) -> Result<(), ProbeError> {
    probe_timed_within(claim, observed_ip, nonce, limit)
        .await
        .map(|_| ())
}

async fn probe_timed_within(
    claim: &ReachClaim,
    observed_ip: IpAddr,
    nonce: [u8; NONCE_BYTES],
    limit: Duration,
) -> Result<Option<Duration>, ProbeError> {
    check_claim(claim, observed_ip)?;
    let deadline = Instant::now() + limit;
    // The fastest TCP connect, in microseconds (u64::MAX: none yet).
    let fastest = AtomicU64::new(u64::MAX);
    let mut checks: Vec<Work<'_, ProbeError>> = Vec::new();
    for addr in &claim.tcp {
        checks.push(Box::pin(check_tcp(
            *addr,
            claim.peer_id,
            nonce,
            deadline,
            limit,
            &fastest,
        )));
    }
    for addr in &claim.udp {
        checks.push(Box::pin(check_udp(*addr, nonce, deadline, limit)));
    }
    all_ok(checks).await?;
    let micros = fastest.load(Ordering::Relaxed);
    Ok((micros != u64::MAX).then(|| Duration::from_micros(micros)))
}

/// Refuses claims the probe must not act on, before anything is sent.
fn check_claim(claim: &ReachClaim, observed_ip: IpAddr) -> Result<(), ProbeError> {
    if claim.tcp.is_empty() && claim.udp.is_empty() {
        return Err(ProbeError::NothingClaimed);
    }
    let both = [(Transport::Tcp, &claim.tcp), (Transport::Udp, &claim.udp)];
    for (transport, addrs) in both {
        if addrs.len() > MAX_CLAIMED_PORTS {
            return Err(ProbeError::TooManyPorts {
                transport,
                claimed: addrs.len(),
            });
        }
    }
    // Canonical forms, so an IPv4 session seen on a dual-stack socket (::ffff:a.b.c.d) matches a.b.c.d.
    let observed = observed_ip.to_canonical();
    for (transport, addrs) in both {
        if let Some(addr) = addrs.iter().find(|a| a.ip().to_canonical() != observed) {
            return Err(ProbeError::NotObservedIp {
                transport,
                addr: *addr,
                observed: observed_ip,
            });
        }
    }
    Ok(())
}

/// The prober's TLS client: TLS 1.3 only, the claimed key pinned, no client certificate, no resumption (a
/// resumed session would skip the certificate, and so the proof).
fn client_config(expected: PeerId) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedPeer::new(expected, provider.clone()));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The responder's TLS server: `keypair`'s certificate, TLS 1.3 only, no client auth, no session tickets
/// (a probe never comes back for another session).
fn server_config(keypair: &Keypair) -> Result<rustls::ServerConfig, String> {
    let (cert, key) = tls_identity(keypair).map_err(|error| error.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| error.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|error| error.to_string())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// `work`, or a timeout error naming `stage` once `deadline` passes.
async fn within<T>(
    deadline: Instant,
    limit: Duration,
    addr: SocketAddr,
    stage: &'static str,
    work: impl Future<Output = T>,
) -> Result<T, ProbeError> {
    tokio::time::timeout_at(deadline, work)
        .await
        .map_err(|_| ProbeError::Timeout { addr, stage, limit })
}

/// The TCP check of one address: connect, TLS with the pinned key, nonce there and back.
async fn check_tcp(
    addr: SocketAddr,
    expected: PeerId,
    nonce: [u8; NONCE_BYTES],
    deadline: Instant,
    limit: Duration,
    fastest: &AtomicU64,
) -> Result<(), ProbeError> {
    let tls_failed = |reason: String| ProbeError::Tls { addr, reason };
    let config = client_config(expected).map_err(|error| tls_failed(error.to_string()))?;
    let name = ServerName::try_from(SERVER_NAME).map_err(|error| tls_failed(error.to_string()))?;
    let io_failed = |action, error| ProbeError::Io {
        transport: Transport::Tcp,
        addr,
        action,
        error,
    };
    // A plain connect: the kernel picks a fresh ephemeral port, never the prober's own listening port. Its
    // duration is one round trip (SYN, SYN-ACK).
    let connecting = Instant::now();
    let stream = within(
        deadline,
        limit,
        addr,
        "while connecting",
        TcpStream::connect(addr),
    )
    .await?
    .map_err(|error| ProbeError::Connect { addr, error })?;
    let micros = u64::try_from(connecting.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
    fastest.fetch_min(micros, Ordering::Relaxed);
    let connector = TlsConnector::from(Arc::new(config));
    let mut tls = within(
        deadline,
        limit,
        addr,
        "in the TLS handshake",
        connector.connect(name, stream),
    )
    .await?
    .map_err(|error| handshake_error(addr, expected, error))?;
    // A rustls client accepts a server that picks no ALPN; the probe does not: it must be this protocol.
    if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
        return Err(tls_failed(format!(
            "the server did not agree to ALPN {}",
            String::from_utf8_lossy(ALPN)
        )));
    }
    within(deadline, limit, addr, "while sending the nonce", async {
        tls.write_all(&nonce).await?;
        tls.flush().await
    })
    .await?
    .map_err(|error| io_failed("sending the nonce", error))?;
    let mut echo = [0u8; NONCE_BYTES];
    within(
        deadline,
        limit,
        addr,
        "while waiting for the nonce echo",
        tls.read_exact(&mut echo),
    )
    .await?
    .map_err(|error| io_failed("reading the nonce echo", error))?;
    if echo != nonce {
        return Err(ProbeError::NonceMismatch {
            transport: Transport::Tcp,
            addr,
        });
    }
    // The proof is complete; closing politely is a courtesy, so its outcome does not matter.
    let _ = tokio::time::timeout_at(deadline, tls.shutdown()).await;
    Ok(())
}

/// The handshake error in the probe's terms: the pinned verifier's refusal means another key was presented.
fn handshake_error(addr: SocketAddr, expected: PeerId, error: io::Error) -> ProbeError {
    // tokio-rustls hands rustls errors over inside an io::Error.
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        )) => ProbeError::WrongKey { addr, expected },
        Some(tls) => ProbeError::Tls {
            addr,
            reason: tls.to_string(),
        },
        None => ProbeError::Tls {
            addr,
            reason: error.to_string(),
        },
    }
}

/// The UDP check of one address: the query sent up to [`UDP_SENDS`] times in the first half of the time
/// limit, and the answer awaited from exactly `addr` until the deadline.
async fn check_udp(
    addr: SocketAddr,
    nonce: [u8; NONCE_BYTES],
    deadline: Instant,
    limit: Duration,
) -> Result<(), ProbeError> {
    let io_failed = |action, error| ProbeError::Io {
        transport: Transport::Udp,
        addr,
        action,
        error,
    };
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|error| io_failed("cannot open a socket", error))?;
    let query = udp_query(&nonce);
    let start = deadline.checked_sub(limit).unwrap_or(deadline);
    let mut sent = 0;
    let mut next_send = start;
    let mut wrong_nonce = false;
    // Larger than an answer, so a longer datagram reads as too long rather than as an answer.
    let mut buffer = [0u8; UDP_PROBE_LEN + 1];
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if sent < UDP_SENDS && now >= next_send {
            socket
                .send_to(&query, addr)
                .await
                .map_err(|error| io_failed("sending the probe datagram", error))?;
            sent += 1;
            // Sends at 0, 1/4 and 1/2 of the limit: the last one still has half the limit to be answered.
            next_send = start + limit * sent / 4;
            continue;
        }
        let wake = if sent < UDP_SENDS {
            next_send.min(deadline)
        } else {
            deadline
        };
        let (length, from) =
            match tokio::time::timeout_at(wake, socket.recv_from(&mut buffer)).await {
                Err(_elapsed) => continue,
                Ok(Ok(received)) => received,
                // ICMP "port unreachable" surfaces here on some systems: no answer yet, maybe a later send.
                Ok(Err(error))
                    if matches!(
                        error.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    continue
                }
                Ok(Err(error)) => return Err(io_failed("receiving the answer", error)),
            };
        let from_claimed =
            from.ip().to_canonical() == addr.ip().to_canonical() && from.port() == addr.port();
        if !from_claimed || length != UDP_PROBE_LEN || buffer[..4] != UDP_ANSWER_TAG {
            continue;
        }
        if buffer[4..UDP_PROBE_LEN] == nonce {
            return Ok(());
        }
        // Perhaps a stray answer to an older probe: keep waiting for the right one, report it if none comes.
        wrong_nonce = true;
    }
    if wrong_nonce {
        Err(ProbeError::NonceMismatch {
            transport: Transport::Udp,
            addr,
        })
    } else {
        Err(ProbeError::NoUdpEcho {
            addr,
            sends: sent,
            waited: limit,
        })
    }
}

/// A piece of work polled by [`all_ok`].
type Work<'a, E> = Pin<Box<dyn Future<Output = Result<(), E>> + Send + 'a>>;

/// Runs every piece of `work` at once on this task until one fails (its error) or all succeed. Dropping the
/// returned future drops all the work (a probe cancelled by its caller leaves nothing running).
async fn all_ok<E>(mut work: Vec<Work<'_, E>>) -> Result<(), E> {
    std::future::poll_fn(move |cx| {
        let mut index = 0;
        while index < work.len() {
            match work[index].as_mut().poll(cx) {
                Poll::Ready(Ok(())) => drop(work.swap_remove(index)),
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => index += 1,
            }
        }
        if work.is_empty() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Answers probes on the given sockets until `shutdown` resolves: presents `keypair` in TLS on every TCP
/// listener and echoes the nonce; echoes UDP probe datagrams. Bounded: at most a few concurrent TCP probes
/// (say 8; more are closed at once), each with a short deadline; UDP answers only well-formed probe
/// datagrams, never larger than the request (no amplification).
///
/// The 8 TCP slots are shared by all listeners; a probe gets [`PROBE_TIMEOUT`]. When `shutdown` resolves, the
/// sockets are closed and probes under way are dropped. If no TLS certificate can be made for `keypair` (which
/// does not happen for a valid key), the TCP listeners are closed at once, so probes fail at connecting.
pub async fn respond(
    keypair: Keypair,
    tcp: Vec<TcpListener>,
    udp: Vec<Arc<UdpSocket>>,
    shutdown: impl Future<Output = ()>,
) {
    respond_within(keypair, tcp, udp, shutdown, RESPOND_DEADLINE).await;
}

/// [`respond`] with the per-probe deadline as a parameter (tests use a short one).
async fn respond_within(
    keypair: Keypair,
    tcp: Vec<TcpListener>,
    udp: Vec<Arc<UdpSocket>>,
    shutdown: impl Future<Output = ()>,
    deadline: Duration,
) {
    let mut loops: Vec<Work<'static, Infallible>> = Vec::new();
    match server_config(&keypair) {
        Ok(config) => {
            let acceptor = TlsAcceptor::from(Arc::new(config));
            let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_PROBES));
            for listener in tcp {
                loops.push(Box::pin(serve_tcp(
                    listener,
                    acceptor.clone(),
                    slots.clone(),
                    deadline,
                )));
            }
        }
        Err(_) => drop(tcp),
    }
    for socket in udp {
        loops.push(Box::pin(serve_udp(socket)));
    }
    // The loops never end; with no sockets at all there is nothing to do but wait for `shutdown`.
    let serve = async {
        let _ = all_ok(loops).await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        () = shutdown => {}
        () = serve => {}
    }
}

/// Accepts TCP probes on `listener` and answers each in a task of its own while a slot is free.
async fn serve_tcp(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    slots: Arc<Semaphore>,
    deadline: Duration,
) -> Result<(), Infallible> {
    // Owned here, so the probes under way end when this loop is dropped (at shutdown).
    let mut probes = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors and the like: wait a little instead of failing at once again.
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        while probes.try_join_next().is_some() {}
        // All slots busy: close this one now rather than queue it, so a flood costs no more than the slots.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let acceptor = acceptor.clone();
        probes.spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(deadline, answer_tcp(stream, &acceptor)).await;
        });
    }
}

/// One TCP probe, responder side: TLS with this node's certificate, then the nonce echoed.
async fn answer_tcp(stream: TcpStream, acceptor: &TlsAcceptor) -> io::Result<()> {
    let mut tls = acceptor.accept(stream).await?;
    // Only a client that asked for this protocol gets an echo.
    if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
        return Ok(());
    }
    let mut nonce = [0u8; NONCE_BYTES];
    tls.read_exact(&mut nonce).await?;
    tls.write_all(&nonce).await?;
    tls.shutdown().await
}

/// Answers UDP probe queries on `socket`, one datagram at a time.
async fn serve_udp(socket: Arc<UdpSocket>) -> Result<(), Infallible> {
    // One byte more than a query, so a longer datagram reads as too long rather than as a query.
    let mut buffer = [0u8; UDP_PROBE_LEN + 1];
    loop {
        match socket.recv_from(&mut buffer).await {
            Ok((length, from)) => {
                if let Some(answer) = udp_answer(&buffer[..length]) {
                    // A lost answer is what the prober's retries are for.
                    let _ = socket.send_to(&answer, from).await;
                }
            }
            Err(_) => tokio::time::sleep(ERROR_PAUSE).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    /// Short enough to keep failing probes quick, long enough for a loaded machine's loopback.
    const SHORT: Duration = Duration::from_millis(300);
    /// A guard on waits that should end by themselves (not a pause: the test goes on as soon as they end).
    const GUARD: Duration = Duration::from_secs(3);

    fn loopback() -> IpAddr {
        Ipv4Addr::LOCALHOST.into()
    }

    async fn tcp_listener() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    async fn udp_socket() -> (Arc<UdpSocket>, SocketAddr) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        (Arc::new(socket), addr)
    }

    /// A running responder; dropping the sender shuts it down.
    fn start(
        keypair: Keypair,
        tcp: Vec<TcpListener>,
        udp: Vec<Arc<UdpSocket>>,
        deadline: Duration,
    ) -> (oneshot::Sender<()>, JoinHandle<()>) {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(respond_within(
            keypair,
            tcp,
            udp,
            async {
                let _ = stopped.await;
            },
            deadline,
        ));
        (stop, task)
    }

    fn claim(keypair: &Keypair, tcp: Vec<SocketAddr>, udp: Vec<SocketAddr>) -> ReachClaim {
        ReachClaim {
            peer_id: keypair.peer_id(),
            tcp,
            udp,
        }
    }

    /// A hand-made TLS server for one probe: `keypair`'s certificate, the given ALPN, and `echo` applied to the
    /// nonce it reads.
    async fn fake_tls_server(
        keypair: &Keypair,
        alpn: Vec<Vec<u8>>,
        echo: fn([u8; NONCE_BYTES]) -> [u8; NONCE_BYTES],
    ) -> SocketAddr {
        let mut config = server_config(keypair).unwrap();
        config.alpn_protocols = alpn;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (listener, addr) = tcp_listener().await;
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let Ok(mut tls) = acceptor.accept(stream).await else {
                return;
            };
            let mut nonce = [0u8; NONCE_BYTES];
            if tls.read_exact(&mut nonce).await.is_ok() {
                let _ = tls.write_all(&echo(nonce)).await;
                let _ = tls.shutdown().await;
            }
        });
        addr
    }

    /// Nothing reached a std socket: no connection queued, no datagram waiting.
    fn nothing_arrived(listener: &std::net::TcpListener, socket: &std::net::UdpSocket) {
        listener.set_nonblocking(true).unwrap();
        socket.set_nonblocking(true).unwrap();
        let accepted = listener.accept();
        assert!(
            matches!(&accepted, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "a connection arrived: {accepted:?}"
        );
        let mut buffer = [0u8; 64];
        let received = socket.recv_from(&mut buffer);
        assert!(
            matches!(&received, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "a datagram arrived: {received:?}"
        );
    }

    #[tokio::test]
    async fn probe_passes_against_a_responder_with_the_claimed_key() {
        let key = Keypair::generate();
        let (listener, tcp) = tcp_listener().await;
        let (socket, udp) = udp_socket().await;
        let (stop, task) = start(key.clone(), vec![listener], vec![socket], RESPOND_DEADLINE);
        probe(
            &claim(&key, vec![tcp], vec![udp]),
            loopback(),
            rand::random(),
        )
        .await
        .unwrap();
        // Shutdown ends the responder and closes its sockets.
        stop.send(()).unwrap();
        tokio::time::timeout(GUARD, task).await.unwrap().unwrap();
        assert!(TcpStream::connect(tcp).await.is_err());
    }

    #[tokio::test]
    async fn four_addresses_per_protocol_are_all_probed() {
        let key = Keypair::generate();
        let (mut listeners, mut tcp, mut sockets, mut udp) = (vec![], vec![], vec![], vec![]);
        for _ in 0..MAX_CLAIMED_PORTS {
            let (listener, addr) = tcp_listener().await;
            listeners.push(listener);
            tcp.push(addr);
            let (socket, addr) = udp_socket().await;
            sockets.push(socket);
            udp.push(addr);
        }
        let (_stop, _task) = start(key.clone(), listeners, sockets, RESPOND_DEADLINE);
        let rtt = probe(&claim(&key, tcp, udp.clone()), loopback(), rand::random())
            .await
            .unwrap()
            .expect("TCP addresses were claimed: a round trip was measured");
        assert!(rtt < PROBE_TIMEOUT, "{rtt:?}");
        // UDP alone measures no round trip (its datagrams are resent, so which one was answered is unknown).
        let udp_only = probe(&claim(&key, vec![], udp), loopback(), rand::random()).await;
        assert_eq!(udp_only.unwrap(), None);
    }

    #[tokio::test]
    async fn an_impostor_key_fails_with_wrong_key() {
        let claimed = Keypair::generate();
        let impostor = Keypair::generate();
        let (listener, tcp) = tcp_listener().await;
        let (_stop, _task) = start(impostor, vec![listener], vec![], RESPOND_DEADLINE);
        let result = probe_within(
            &claim(&claimed, vec![tcp], vec![]),
            loopback(),
            rand::random(),
            SHORT,
        )
        .await;
        match result {
            Err(ProbeError::WrongKey { addr, expected }) => {
                assert_eq!(addr, tcp);
                assert_eq!(expected, claimed.peer_id());
            }
            other => panic!("expected WrongKey, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_claim_at_another_ip_is_refused_before_anything_is_sent() {
        let key = Keypair::generate();
        // Valid addresses beside the bad one: they must not be dialled either.
        let local_tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local_udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Linux answers on all of 127/8; elsewhere claim 127.0.0.2 with ports nobody listens on there.
        let other_tcp = std::net::TcpListener::bind("127.0.0.2:0").ok();
        let other_udp = std::net::UdpSocket::bind("127.0.0.2:0").ok();
        let elsewhere = |port| SocketAddr::from(([127, 0, 0, 2], port));
        let other_tcp_addr = other_tcp.as_ref().map_or_else(
            || elsewhere(local_tcp.local_addr().unwrap().port()),
            |l| l.local_addr().unwrap(),
        );
        let other_udp_addr = other_udp.as_ref().map_or_else(
            || elsewhere(local_udp.local_addr().unwrap().port()),
            |s| s.local_addr().unwrap(),
        );
        let cases = [
            (
                Transport::Tcp,
                other_tcp_addr,
                claim(
                    &key,
                    vec![local_tcp.local_addr().unwrap(), other_tcp_addr],
                    vec![local_udp.local_addr().unwrap()],
                ),
            ),
            (
                Transport::Udp,
                other_udp_addr,
                claim(
                    &key,
                    vec![local_tcp.local_addr().unwrap()],
                    vec![local_udp.local_addr().unwrap(), other_udp_addr],
                ),
            ),
        ];
        for (transport, bad, claim) in cases {
            match probe_within(&claim, loopback(), rand::random(), SHORT).await {
                Err(ProbeError::NotObservedIp {
                    transport: t,
                    addr,
                    observed,
                }) => {
                    assert_eq!((t, addr, observed), (transport, bad, loopback()));
                }
                other => panic!("expected NotObservedIp, got {other:?}"),
            }
        }
        nothing_arrived(&local_tcp, &local_udp);
        if let (Some(tcp), Some(udp)) = (&other_tcp, &other_udp) {
            nothing_arrived(tcp, udp);
        }
    }

    #[tokio::test]
    async fn an_ipv4_mapped_observed_ip_matches_its_ipv4_claim() {
        let key = Keypair::generate();
        let (listener, tcp) = tcp_listener().await;
        let (_stop, _task) = start(key.clone(), vec![listener], vec![], RESPOND_DEADLINE);
        let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
        probe_within(
            &claim(&key, vec![tcp], vec![]),
            mapped,
            rand::random(),
            GUARD,
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_closed_tcp_port_fails_to_connect() {
        let key = Keypair::generate();
        let (listener, tcp) = tcp_listener().await;
        drop(listener);
        match probe_within(
            &claim(&key, vec![tcp], vec![]),
            loopback(),
            rand::random(),
            SHORT,
        )
        .await
        {
            Err(ProbeError::Connect { addr, .. }) => assert_eq!(addr, tcp),
            other => panic!("expected Connect, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_silent_udp_port_gets_no_echo_after_three_sends() {
        let key = Keypair::generate();
        // Bound (so no ICMP comes back) but never answering.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp = silent.local_addr().unwrap();
        let nonce = rand::random();
        match probe_within(&claim(&key, vec![], vec![udp]), loopback(), nonce, SHORT).await {
            Err(ProbeError::NoUdpEcho {
                addr,
                sends,
                waited,
            }) => {
                assert_eq!((addr, sends, waited), (udp, UDP_SENDS, SHORT));
            }
            other => panic!("expected NoUdpEcho, got {other:?}"),
        }
        // The query went out three times, exactly as specified.
        silent.set_nonblocking(true).unwrap();
        let mut buffer = [0u8; 64];
        let mut received = 0;
        while let Ok((length, _)) = silent.recv_from(&mut buffer) {
            assert_eq!(&buffer[..length], &udp_query(&nonce));
            received += 1;
        }
        assert_eq!(received, UDP_SENDS);
    }

    #[tokio::test]
    async fn a_udp_answer_from_another_source_is_ignored() {
        let key = Keypair::generate();
        let (claimed, udp) = udp_socket().await;
        let (other, _) = udp_socket().await;
        // The right answer, but sent from another port than the claimed one.
        tokio::spawn(async move {
            let mut buffer = [0u8; 64];
            while let Ok((length, from)) = claimed.recv_from(&mut buffer).await {
                if let Some(answer) = udp_answer(&buffer[..length]) {
                    let _ = other.send_to(&answer, from).await;
                }
            }
        });
        match probe_within(
            &claim(&key, vec![], vec![udp]),
            loopback(),
            rand::random(),
            SHORT,
        )
        .await
        {
            Err(ProbeError::NoUdpEcho { addr, .. }) => assert_eq!(addr, udp),
            other => panic!("expected NoUdpEcho, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_tcp_echo_of_another_nonce_is_a_mismatch() {
        let key = Keypair::generate();
        let flip = |mut nonce: [u8; NONCE_BYTES]| {
            nonce[0] ^= 1;
            nonce
        };
        let tcp = fake_tls_server(&key, vec![ALPN.to_vec()], flip).await;
        match probe_within(
            &claim(&key, vec![tcp], vec![]),
            loopback(),
            rand::random(),
            GUARD,
        )
        .await
        {
            Err(ProbeError::NonceMismatch { transport, addr }) => {
                assert_eq!((transport, addr), (Transport::Tcp, tcp));
            }
            other => panic!("expected NonceMismatch, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_tls_server_without_the_reach_alpn_is_refused() {
        let key = Keypair::generate();
        let tcp = fake_tls_server(&key, vec![], |nonce| nonce).await;
        match probe_within(
            &claim(&key, vec![tcp], vec![]),
            loopback(),
            rand::random(),
            GUARD,
        )
        .await
        {
            Err(ProbeError::Tls { addr, reason }) => {
                assert_eq!(addr, tcp);
                assert!(reason.contains("ALPN"), "{reason}");
            }
            other => panic!("expected Tls, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_udp_answer_with_another_nonce_is_a_mismatch() {
        let key = Keypair::generate();
        let (socket, udp) = udp_socket().await;
        tokio::spawn(async move {
            let mut buffer = [0u8; 64];
            while let Ok((length, from)) = socket.recv_from(&mut buffer).await {
                if let Some(mut answer) = udp_answer(&buffer[..length]) {
                    answer[4] ^= 1;
                    let _ = socket.send_to(&answer, from).await;
                }
            }
        });
        match probe_within(
            &claim(&key, vec![], vec![udp]),
            loopback(),
            rand::random(),
            SHORT,
        )
        .await
        {
            Err(ProbeError::NonceMismatch { transport, addr }) => {
                assert_eq!((transport, addr), (Transport::Udp, udp));
            }
            other => panic!("expected NonceMismatch, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn too_many_ports_are_refused_before_anything_is_sent() {
        let key = Keypair::generate();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = listener.local_addr().unwrap();
        let udp = socket.local_addr().unwrap();
        let over = MAX_CLAIMED_PORTS + 1;
        let cases = [
            (Transport::Tcp, claim(&key, vec![tcp; over], vec![udp])),
            (Transport::Udp, claim(&key, vec![tcp], vec![udp; over])),
        ];
        for (transport, claim) in cases {
            match probe_within(&claim, loopback(), rand::random(), SHORT).await {
                Err(ProbeError::TooManyPorts {
                    transport: t,
                    claimed,
                }) => {
                    assert_eq!((t, claimed), (transport, over));
                }
                other => panic!("expected TooManyPorts, got {other:?}"),
            }
        }
        nothing_arrived(&listener, &socket);
    }

    #[tokio::test]
    async fn an_empty_claim_proves_nothing() {
        let key = Keypair::generate();
        let result = probe_within(
            &claim(&key, vec![], vec![]),
            loopback(),
            rand::random(),
            SHORT,
        )
        .await;
        assert!(
            matches!(result, Err(ProbeError::NothingClaimed)),
            "{result:?}"
        );
    }

    #[test]
    fn only_a_well_formed_query_has_an_answer() {
        let nonce = [7u8; NONCE_BYTES];
        let answer = udp_answer(&udp_query(&nonce)).unwrap();
        assert_eq!(answer[..4], UDP_ANSWER_TAG);
        assert_eq!(answer[4..], nonce);
        let query = udp_query(&nonce);
        assert_eq!(udp_answer(&query[..UDP_PROBE_LEN - 1]), None);
        assert_eq!(udp_answer(&[&query[..], &[0]].concat()), None);
        for position in 0..4 {
            let mut wrong = query;
            wrong[position] ^= 0x20;
            assert_eq!(udp_answer(&wrong), None, "tag byte {position} changed");
        }
        assert_eq!(udp_answer(&answer), None, "an answer is not a query");
    }

    #[tokio::test]
    async fn the_responder_answers_only_well_formed_udp_queries() {
        let key = Keypair::generate();
        let (socket, udp) = udp_socket().await;
        let (_stop, _task) = start(key, vec![], vec![socket], RESPOND_DEADLINE);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let query = udp_query(&[1; NONCE_BYTES]);
        let mut relay_bind = query;
        relay_bind[3] = b'B';
        let bad: Vec<Vec<u8>> = vec![
            query[..UDP_PROBE_LEN - 1].to_vec(),
            [&query[..], &[0]].concat(),
            [&query[..], &[0; 1000]].concat(),
            relay_bind.to_vec(),
            udp_answer(&query).unwrap().to_vec(),
        ];
        for datagram in &bad {
            client.send_to(datagram, udp).await.unwrap();
        }
        // Sent last and answered in order: the first datagram back must answer it, not any of the bad ones.
        let good = udp_query(&[2; NONCE_BYTES]);
        client.send_to(&good, udp).await.unwrap();
        let mut buffer = [0u8; 2048];
        let (length, from) = tokio::time::timeout(GUARD, client.recv_from(&mut buffer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from, udp);
        assert_eq!(&buffer[..length], &udp_answer(&good).unwrap());
    }

    #[tokio::test]
    async fn the_responder_closes_tcp_probes_beyond_its_slots_at_once() {
        let key = Keypair::generate();
        let (listener, tcp) = tcp_listener().await;
        let (_stop, _task) = start(key.clone(), vec![listener], vec![], RESPOND_DEADLINE);
        // Idle connections hold every slot (each waits for a ClientHello until its deadline).
        let mut idle = Vec::new();
        for _ in 0..MAX_CONCURRENT_PROBES {
            idle.push(TcpStream::connect(tcp).await.unwrap());
        }
        // Accepted after those (the listener takes them in order), so it finds no slot and is closed.
        let mut extra = TcpStream::connect(tcp).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(GUARD, extra.read(&mut byte))
            .await
            .expect("the extra connection should be closed at once, not held");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let result = probe_within(
            &claim(&key, vec![tcp], vec![]),
            loopback(),
            rand::random(),
            SHORT,
        )
        .await;
        assert!(result.is_err(), "no slot was free, yet {result:?}");
    }

    #[tokio::test]
    async fn the_responder_frees_its_slots_after_each_probe() {
        let key = Keypair::generate();
        let (listener, tcp) = tcp_listener().await;
        let (_stop, _task) = start(key.clone(), vec![listener], vec![], RESPOND_DEADLINE);
        for round in 0..MAX_CONCURRENT_PROBES + 4 {
            probe_within(
                &claim(&key, vec![tcp], vec![]),
                loopback(),
                rand::random(),
                GUARD,
            )
            .await
            .unwrap_or_else(|error| panic!("probe {round}: {error}"));
        }
    }

    #[tokio::test]
    async fn the_responder_drops_a_stalled_probe_at_its_deadline() {
        let key = Keypair::generate();
        let (listener, tcp) = tcp_listener().await;
        let (_stop, _task) = start(key, vec![listener], vec![], Duration::from_millis(200));
        let mut stalled = TcpStream::connect(tcp).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(GUARD, stalled.read(&mut byte))
            .await
            .expect("the stalled probe should be closed at the responder's deadline");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    /// Both sides can run in spawned tasks and tonic handlers (which need Send futures).
    #[test]
    fn probe_and_respond_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let key = Keypair::generate();
        let claim = claim(&key, vec![], vec![]);
        assert_send(&probe(&claim, loopback(), [0; NONCE_BYTES]));
        assert_send(&respond(key, vec![], vec![], async {}));
    }

    #[test]
    fn errors_name_the_address_and_the_failure() {
        let addr: SocketAddr = "192.0.2.7:4100".parse().unwrap();
        let expected = Keypair::from_secret_bytes([3; 32]).peer_id();
        let texts = [
            ProbeError::NotObservedIp {
                transport: Transport::Udp,
                addr,
                observed: "198.51.100.1".parse().unwrap(),
            }
            .to_string(),
            ProbeError::WrongKey { addr, expected }.to_string(),
            ProbeError::NoUdpEcho {
                addr,
                sends: 3,
                waited: PROBE_TIMEOUT,
            }
            .to_string(),
            ProbeError::Timeout {
                addr,
                stage: "in the TLS handshake",
                limit: PROBE_TIMEOUT,
            }
            .to_string(),
        ];
        for text in &texts {
            assert!(text.contains("192.0.2.7:4100"), "{text}");
        }
        assert!(texts[1].contains(&expected.to_string()), "{}", texts[1]);
    }
}
