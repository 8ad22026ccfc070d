//! Hole punching: the punch datagram of a plan, and the server side's loop that sends it to every candidate of
//! the peer (so the peer's QUIC Initials find this side's NAT open), with port prediction's spray on top when
//! the plan asks for it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;

use super::prediction::Spray;

/// First bytes of a punch datagram (a zero first byte: neither QUIC nor STUN-with-cookie).
const PUNCH_TAG: [u8; 4] = [0x00, b'V', b'P', b'P'];
/// Interval between punch datagrams.
const PUNCH_INTERVAL: Duration = Duration::from_millis(20);

/// The punch datagram of a plan: the tag, then the nonce's first 8 bytes.
pub(super) fn punch_datagram(nonce: &[u8]) -> Vec<u8> {
    let mut datagram = PUNCH_TAG.to_vec();
    datagram.extend_from_slice(&nonce[..8.min(nonce.len())]);
    datagram
}

/// Sends punch datagrams to every target until dropped; with `spray`, also that many probes to random ports
/// (1024 and up) of the targets' public addresses.
pub(super) async fn punch(socket: UdpSocket, targets: Vec<SocketAddr>, nonce: Vec<u8>, spray: u32) {
    let datagram = punch_datagram(&nonce);
    let mut spray = Spray::new(&targets, spray);
    let mut ticker = tokio::time::interval(PUNCH_INTERVAL);
    loop {
        ticker.tick().await;
        for target in &targets {
            let _ = socket.send_to(&datagram, target).await;
        }
        spray.tick(&socket, &datagram).await;
    }
}
