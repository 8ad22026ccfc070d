//! A raw client of a super peer's UDP relay, for tests and the relay benchmark: a grant through
//! `Cluster.GrantRelay` (called with the test PKI's super peer certificate, as a broker would), and binds by
//! hand (`[00 'V' 'R' 'B' | token]`, answered by `[00 'V' 'R' 'A' | status]`).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vesper_proto::v1::{GrantRelayRequest, RelayGrant};

use crate::cluster::Cluster;

/// First bytes of a bind request and of its answer.
pub const BIND_TAG: [u8; 4] = [0x00, b'V', b'R', b'B'];
pub const ANSWER_TAG: [u8; 4] = [0x00, b'V', b'R', b'A'];
/// First bytes of the notice a relay sends when an allocation ends (then the reason: 1 bytes, 2 time).
pub const END_TAG: [u8; 4] = [0x00, b'V', b'R', b'E'];

/// Status bytes of a bind answer (superpeer/src/relay.rs `BindStatus`).
pub const BOUND: u8 = 0;
pub const UNKNOWN_TOKEN: u8 = 1;
pub const TAKEN: u8 = 2;
pub const ENDED: u8 = 3;

/// A relay grant from node `index`'s `Cluster.GrantRelay`.
pub async fn grant(cluster: &Cluster, index: usize) -> anyhow::Result<RelayGrant> {
    let grant = cluster
        .cluster_client(index)
        .await?
        .grant_relay(GrantRelayRequest {})
        .await
        .context("Cluster.GrantRelay")?
        .into_inner();
    Ok(grant)
}

/// The grant's token as the 16 bytes a bind carries.
pub fn token(grant: &RelayGrant) -> anyhow::Result<[u8; 16]> {
    grant
        .token
        .as_slice()
        .try_into()
        .context("the relay token is not 16 bytes")
}

/// Sends a bind for `token` from `socket` to `relay` (again every 200 ms, up to 5 s) and returns the answer's
/// status byte. Other datagrams arriving meanwhile are skipped. Leaves `socket`'s read timeout at 200 ms.
pub fn bind(socket: &UdpSocket, relay: SocketAddr, token: &[u8; 16]) -> anyhow::Result<u8> {
    let mut request = BIND_TAG.to_vec();
    request.extend_from_slice(token);
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buffer = [0u8; 2048];
    for _ in 0..25 {
        socket.send_to(&request, relay)?;
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline {
            match socket.recv_from(&mut buffer) {
                Ok((5, from)) if from == relay && buffer[..4] == ANSWER_TAG => return Ok(buffer[4]),
                Ok(_) => {}
                Err(error) if timed_out(&error) => break,
                Err(error) => return Err(error.into()),
            }
        }
    }
    bail!("no answer from the relay at {relay} to a bind request")
}

/// What a bind status means, in the relay's words.
pub fn describe(status: u8) -> &'static str {
    match status {
        BOUND => "bound",
        UNKNOWN_TOKEN => "unknown or expired relay token",
        TAKEN => "relay token already used by two other addresses",
        ENDED => "relay allocation ended (a cap was reached)",
        _ => "unknown status",
    }
}

/// Whether a receive error is the read timeout.
pub fn timed_out(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}
