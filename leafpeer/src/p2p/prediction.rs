//! Port prediction, for a client behind a NAT that maps each destination to a new port: the client opens many
//! sockets and punches from each, the server sprays probes at random ports of the client's public address, and
//! the client dials from the first socket a probe reaches, to where the probe came from.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;
use vesper_proto::{Keypair, PeerId};

use super::quic::{dial_first, endpoint};
use crate::error::LeafError;

/// Upper bounds on what a plan may ask of port prediction (a plan comes from a super peer, but a leaf still
/// bounds the sockets it opens and the packets it sends).
pub(super) const MAX_PREDICTION_SOCKETS: u32 = 512;
pub(super) const MAX_PREDICTION_PROBES: u32 = 8192;
/// Probes per punch interval (so 2048 probes take about 320 ms).
const PROBES_PER_TICK: usize = 128;
/// The spray starts after this many punch intervals, once the client's sockets have punched.
const SPRAY_AFTER_TICKS: u32 = 2;
/// The client's sockets punch again this often.
const PREDICTION_REPUNCH: Duration = Duration::from_millis(250);

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

/// The server side: probes to random ports (1024 and up) of the peer's public addresses, a batch per punch
/// interval, sent along with the punches.
pub(super) struct Spray {
    ips: Vec<IpAddr>,
    /// Probes still to send (0 when there is no public address to spray).
    left: usize,
    /// Punch intervals so far.
    ticks: u32,
}

impl Spray {
    /// A spray of `probes` probes over the public addresses among `targets`.
    pub(super) fn new(targets: &[SocketAddr], probes: u32) -> Self {
        let mut ips: Vec<IpAddr> = targets
            .iter()
            .map(SocketAddr::ip)
            .filter(|ip| sprayable(*ip))
            .collect();
        ips.dedup();
        let left = if ips.is_empty() { 0 } else { probes as usize };
        Self {
            ips,
            left,
            ticks: 0,
        }
    }

    /// Called once per punch interval: past the first few, sends the next batch of probes from `socket`.
    pub(super) async fn tick(&mut self, socket: &UdpSocket, datagram: &[u8]) {
        self.ticks += 1;
        if self.ticks <= SPRAY_AFTER_TICKS || self.left == 0 {
            return;
        }
        let batch = self.left.min(PROBES_PER_TICK);
        self.left -= batch;
        for index in 0..batch {
            let port = rand::random_range(1024..=u16::MAX);
            let ip = self.ips[index % self.ips.len()];
            let _ = socket.send_to(datagram, SocketAddr::new(ip, port)).await;
        }
    }
}

/// The client side: `count` fresh sockets punch `datagram` (the plan's punch datagram, which the server's
/// probes carry too) towards `targets`, each opening its own mapping on an endpoint-dependent NAT; returns the
/// first socket that hears the server's probe, and the address the probe came from.
async fn predicted_socket(
    targets: &[SocketAddr],
    datagram: &[u8],
    count: u32,
) -> Result<(std::net::UdpSocket, SocketAddr), LeafError> {
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
        let found = found_tx.clone();
        searchers.spawn(search(socket, targets.to_vec(), datagram.to_vec(), found));
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

/// One of the client's sockets: punches `targets` every `PREDICTION_REPUNCH` until a probe arrives, then hands
/// itself and the probe's source to `found`.
async fn search(
    socket: UdpSocket,
    targets: Vec<SocketAddr>,
    datagram: Vec<u8>,
    found: tokio::sync::mpsc::Sender<(UdpSocket, SocketAddr)>,
) {
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
}

/// Client side with port prediction: dial from the socket a probe reached; returns its endpoint too.
pub(super) async fn dial_predicted(
    targets: &[SocketAddr],
    datagram: &[u8],
    nonce: &[u8],
    count: u32,
    keypair: &Keypair,
    peer: PeerId,
) -> Result<(quinn::Connection, quinn::Endpoint), LeafError> {
    let (socket, from) = predicted_socket(targets, datagram, count).await?;
    tracing::debug!(%from, "a port prediction probe got through");
    let (endpoint, config) = endpoint(socket, keypair, peer, false)?;
    let connection = dial_first(&endpoint, &config, &[from], nonce, None).await?;
    Ok((connection, endpoint))
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
