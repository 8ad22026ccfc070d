//! Learning how this leaf is reachable: STUN Binding queries to super peers, and the NAT class they reveal.
//!
//! Every super peer answers STUN on the UDP port with the number of its Leaf service (TCP). A leaf asks two
//! super peers at different IP addresses from one socket: the same reflexive address from both means the NAT
//! maps endpoint-independently (hole punching works); different ones mean endpoint-dependent mapping. The
//! [`NatReport`] is what the library publishes in the leaf's presence.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;
use vesper_proto::nat::NatClass;
use vesper_proto::stun;

/// Waits between retransmissions of a Binding request (RFC 8489 suggests 500 ms doubling; super peers are
/// usually close, so Vesper starts lower and gives up sooner).
const RETRANSMITS: [Duration; 4] = [
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
    Duration::from_millis(1200),
];

/// What a leaf learned about its reachability from one socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatReport {
    /// The mapping class.
    pub class: NatClass,
    /// The socket's address on this host's network (its interface IP and port).
    pub local: SocketAddr,
    /// Each super peer's STUN address that answered, with the reflexive address it saw.
    pub reflexive: Vec<(SocketAddr, SocketAddr)>,
    /// STUN servers that did not answer.
    pub unanswered: Vec<SocketAddr>,
}

impl NatReport {
    /// Address candidates to publish: the local address, then each distinct reflexive address.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        let mut candidates = vec![self.local];
        for (_, mapped) in &self.reflexive {
            if !candidates.contains(mapped) {
                candidates.push(*mapped);
            }
        }
        candidates.truncate(vesper_proto::nat::MAX_CANDIDATES);
        candidates
    }
}

/// Why a STUN query gave no address.
#[derive(Debug, thiserror::Error)]
pub enum StunError {
    /// The server stayed silent through every retransmission.
    #[error("no STUN answer from {server} after {attempts} attempts")]
    Timeout {
        /// The STUN server asked.
        server: SocketAddr,
        /// Requests sent.
        attempts: usize,
    },
    /// The server answered with something other than a good Binding success.
    #[error("STUN server {server}: {error}")]
    Refused {
        /// The STUN server asked.
        server: SocketAddr,
        /// What was wrong with its answer.
        error: stun::ResponseError,
    },
    /// Sending or receiving on the socket failed.
    #[error("STUN query to {server}: {error}")]
    Io {
        /// The STUN server asked.
        server: SocketAddr,
        /// The socket's error.
        error: std::io::Error,
    },
}

/// Asks `server` for this socket's reflexive address, retransmitting on silence. Datagrams from other
/// addresses or for other transactions are skipped (the socket may be shared with other traffic).
pub async fn query(socket: &UdpSocket, server: SocketAddr) -> Result<SocketAddr, StunError> {
    let (transaction, request) = stun::binding_request();
    let mut buffer = [0u8; 1024];
    for wait in RETRANSMITS {
        socket
            .send_to(&request, server)
            .await
            .map_err(|error| StunError::Io { server, error })?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let received = tokio::time::timeout_at(deadline, socket.recv_from(&mut buffer)).await;
            let (len, from) = match received {
                Err(_) => break,
                // ICMP port unreachable from an earlier send surfaces as an error on Linux; keep waiting.
                Ok(Err(_)) => continue,
                Ok(Ok(received)) => received,
            };
            if from != server {
                continue;
            }
            match stun::parse_binding_response(&buffer[..len], transaction) {
                Ok(mapped) => return Ok(mapped),
                Err(stun::ResponseError::OtherTransaction)
                | Err(stun::ResponseError::Malformed) => continue,
                Err(error) => return Err(StunError::Refused { server, error }),
            }
        }
    }
    Err(StunError::Timeout {
        server,
        attempts: RETRANSMITS.len(),
    })
}

/// The IP this host uses to reach `target` (no packet is sent: a connected UDP socket only picks a route).
pub fn route_ip(target: SocketAddr) -> std::io::Result<IpAddr> {
    let bind: SocketAddr = match target {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let probe = std::net::UdpSocket::bind(bind)?;
    probe.connect(target)?;
    Ok(probe.local_addr()?.ip())
}

/// STUN servers worth asking: the first address of each distinct IP among `servers`, at most `max`.
pub fn distinct_ips(servers: &[SocketAddr], max: usize) -> Vec<SocketAddr> {
    let mut chosen: Vec<SocketAddr> = Vec::new();
    for server in servers {
        if !chosen.iter().any(|known| known.ip() == server.ip()) {
            chosen.push(*server);
        }
    }
    chosen.truncate(max);
    chosen
}

/// Queries `servers` (all at once) from `socket` and classifies the answers.
pub async fn discover(socket: &UdpSocket, servers: &[SocketAddr]) -> std::io::Result<NatReport> {
    let port = socket.local_addr()?.port();
    let local_ip = match socket.local_addr()?.ip() {
        ip if ip.is_unspecified() => match servers.first() {
            Some(server) => route_ip(*server)?,
            None => ip,
        },
        ip => ip,
    };
    let local = SocketAddr::new(local_ip, port);
    // One socket, several servers: queries run one after another on the socket would each wait out their
    // own timeouts, so they share it through a single receive loop instead.
    let answers = query_all(socket, servers).await;
    let mut reflexive = Vec::new();
    let mut unanswered = Vec::new();
    for (server, answer) in servers.iter().zip(answers) {
        match answer {
            Some(mapped) => reflexive.push((*server, mapped)),
            None => unanswered.push(*server),
        }
    }
    let mapped: Vec<SocketAddr> = reflexive.iter().map(|(_, mapped)| *mapped).collect();
    Ok(NatReport {
        class: NatClass::classify(local, &mapped),
        local,
        reflexive,
        unanswered,
    })
}

/// Sends a Binding request to every server and collects the answers, retransmitting to the silent ones.
async fn query_all(socket: &UdpSocket, servers: &[SocketAddr]) -> Vec<Option<SocketAddr>> {
    let requests: Vec<(u128, Vec<u8>)> = servers.iter().map(|_| stun::binding_request()).collect();
    let mut answers: Vec<Option<SocketAddr>> = vec![None; servers.len()];
    let mut buffer = [0u8; 1024];
    for wait in RETRANSMITS {
        for (index, server) in servers.iter().enumerate() {
            if answers[index].is_none() {
                let _ = socket.send_to(&requests[index].1, server).await;
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        while answers.iter().any(Option::is_none) {
            let (len, from) =
                match tokio::time::timeout_at(deadline, socket.recv_from(&mut buffer)).await {
                    Err(_) => break,
                    Ok(Err(_)) => continue,
                    Ok(Ok(received)) => received,
                };
            for (index, server) in servers.iter().enumerate() {
                if *server == from && answers[index].is_none() {
                    if let Ok(mapped) =
                        stun::parse_binding_response(&buffer[..len], requests[index].0)
                    {
                        answers[index] = Some(mapped);
                    }
                }
            }
        }
        if answers.iter().all(Option::is_some) {
            break;
        }
    }
    answers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_ips_keeps_one_server_per_address() {
        let servers: Vec<SocketAddr> = [
            "10.0.0.1:7400",
            "10.0.0.1:7410",
            "10.0.0.2:7400",
            "10.0.0.3:7400",
        ]
        .iter()
        .map(|text| text.parse().unwrap())
        .collect();
        assert_eq!(
            distinct_ips(&servers, 2),
            vec![servers[0], servers[2]],
            "the first of each IP, at most two"
        );
    }

    #[tokio::test]
    async fn a_query_to_a_silent_port_times_out_with_the_server_named() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = silent.local_addr().unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        tokio::time::pause();
        let error = query(&socket, server).await.unwrap_err();
        assert!(error.to_string().contains(&server.to_string()), "{error}");
    }
}
