//! The relay fallback: binding a fresh socket to the allocation a super peer granted, the QUIC handshake
//! through it (the relay passes the encrypted datagrams across and sees nothing else), and releasing an
//! allocation a direct path made useless.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use vesper_proto::relay as relay_wire;
use vesper_proto::v1::{PunchRole, RelayGrant};
use vesper_proto::{Keypair, PeerId};

use super::connection::{Path, PeerConnection, RelayCaps};
use super::quic::{accept_with_nonce, dial_first, endpoint_on, runtime};
use crate::error::LeafError;
use crate::relay_socket::{RelayEnd, RelaySocket};

/// How long a relayed connection may take to come up once both sides are bound.
const RELAY_DEADLINE: Duration = Duration::from_secs(10);

/// Connects to `peer` through the relay of `grant`, in `role`. `direct` is the plan's direct endpoint: a server
/// still accepts on it, since a direct handshake that completes late counts too. `direct_failure` says why
/// the direct path did not come up, for the error when the relay fails as well.
pub(super) async fn connect(
    grant: RelayGrant,
    role: PunchRole,
    nonce: &[u8],
    keypair: &Keypair,
    peer: PeerId,
    direct: quinn::Endpoint,
    direct_failure: &str,
) -> Result<PeerConnection, LeafError> {
    let relay = resolve(&grant.address).await?;
    let serve = role == PunchRole::Server;
    let (relayed, relay_client, relay_end) =
        bound_endpoint(relay, &grant.token, keypair, peer, serve).await?;
    let caps = RelayCaps {
        max_bytes: grant.max_bytes,
        max_seconds: grant.max_seconds,
        max_bytes_per_second: grant.max_bytes_per_second,
    };
    let connection = if serve {
        match accept_either(&relayed, &direct, nonce).await {
            Some((connection, true)) => connection,
            Some((connection, false)) => {
                return Ok(PeerConnection::direct(connection, direct, peer));
            }
            None => {
                return Err(LeafError::PeerConnection(format!(
                    "{direct_failure}; the peer did not come through the relay either"
                )))
            }
        }
    } else {
        dial_relayed(&relayed, &relay_client, relay, nonce, direct_failure).await?
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

/// The relay's UDP address from the grant's `address` (host:port).
async fn resolve(address: &str) -> Result<SocketAddr, LeafError> {
    tokio::net::lookup_host(address)
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| LeafError::Relay(format!("relay address {address:?} does not resolve")))
}

/// A fresh socket bound to the relay allocation of `token`, under a QUIC endpoint for `peer`; with the watch
/// that says when (and why) the relay ends the allocation.
async fn bound_endpoint(
    relay: SocketAddr,
    token: &[u8],
    keypair: &Keypair,
    peer: PeerId,
    serve: bool,
) -> Result<
    (
        quinn::Endpoint,
        quinn::ClientConfig,
        tokio::sync::watch::Receiver<Option<RelayEnd>>,
    ),
    LeafError,
> {
    let socket_error =
        |error: std::io::Error| LeafError::PeerConnection(format!("socket: {error}"));
    let relay_socket = UdpSocket::bind(("0.0.0.0", 0))
        .await
        .map_err(socket_error)?;
    bind_relay(&relay_socket, relay, token).await?;
    let relay_std = relay_socket.into_std().map_err(socket_error)?;
    let (relay_socket, relay_end) = RelaySocket::new(
        runtime()?
            .wrap_udp_socket(relay_std)
            .map_err(socket_error)?,
        relay,
    );
    let (endpoint, client) = endpoint_on(relay_socket, keypair, peer, serve)?;
    Ok((endpoint, client, relay_end))
}

/// Server side: the first connection carrying the nonce, on the relayed endpoint (true) or the direct one
/// (false); None when neither has one within the relay deadline.
async fn accept_either(
    relayed: &quinn::Endpoint,
    direct: &quinn::Endpoint,
    nonce: &[u8],
) -> Option<(quinn::Connection, bool)> {
    let outcome = tokio::time::timeout(RELAY_DEADLINE, async {
        tokio::select! {
            Some(connection) = accept_with_nonce(relayed, nonce) => Some((connection, true)),
            Some(connection) = accept_with_nonce(direct, nonce) => Some((connection, false)),
            else => None,
        }
    })
    .await;
    outcome.ok().flatten()
}

/// Client side: the handshake through the relay, retried until the deadline (the other side may bind a moment
/// later).
async fn dial_relayed(
    relayed: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    relay: SocketAddr,
    nonce: &[u8],
    direct_failure: &str,
) -> Result<quinn::Connection, LeafError> {
    let started = tokio::time::Instant::now();
    loop {
        match tokio::time::timeout(
            RELAY_DEADLINE,
            dial_first(relayed, config, &[relay], nonce, None),
        )
        .await
        {
            Ok(Ok(connection)) => return Ok(connection),
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

/// Tells the relay its allocation will not be used (best effort: an unused one also expires by itself).
pub(super) async fn release(address: &str, token: &[u8]) {
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
