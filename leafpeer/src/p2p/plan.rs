//! Carrying out a broker's punch plan: the socket prepared before the plan arrives, the direct attempt (punch
//! and accept as server; dial every candidate, with port prediction alongside when asked, as client) within
//! the plan's deadline, and the relay when no direct path came up.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use vesper_proto::nat::parse_candidates;
use vesper_proto::v1::{PortPrediction, PunchPlan, PunchRole};
use vesper_proto::{Keypair, PeerId};

use super::connection::{Path, PeerConnection};
use super::prediction::{dial_predicted, MAX_PREDICTION_PROBES, MAX_PREDICTION_SOCKETS};
use super::punch::{punch, punch_datagram};
use super::quic::{accept_with_nonce, dial_first, endpoint};
use super::relay;
use crate::error::LeafError;

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
    let planned_at = Instant::now();
    let grant = plan.relay.clone();
    let mut connection = carry_out(prepared, plan, keypair).await?;
    connection.set_planned_at(planned_at);
    if let (Path::Direct(_), Some(grant)) = (connection.path(), grant) {
        // Off the critical path: the app gets its connection now.
        let stop = stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                biased;
                _ = stop.cancelled() => {}
                _ = relay::release(&grant.address, &grant.token) => {}
            }
        });
    }
    Ok(connection)
}

/// What a plan asks of this side, checked and bounded.
struct Steps {
    peer: PeerId,
    targets: Vec<SocketAddr>,
    nonce: Vec<u8>,
    role: PunchRole,
    prediction: PortPrediction,
    /// How long the direct attempt may take.
    deadline: Duration,
    /// How long a server waits before it starts.
    start_delay: Duration,
    /// A client's second round of dialing starts after this long (see `dial_first`).
    again: Option<Duration>,
}

impl Steps {
    /// The steps of `plan`, for a socket prepared for `prepared_for`.
    fn of(plan: &PunchPlan, prepared_for: PeerId) -> Result<Self, LeafError> {
        let peer: PeerId = plan.peer_id.parse().map_err(|error| {
            LeafError::PeerConnection(format!("plan names a bad peer: {error}"))
        })?;
        if peer != prepared_for {
            return Err(LeafError::PeerConnection(format!(
                "the plan names peer {peer}, but this socket was prepared for {prepared_for}"
            )));
        }
        let targets = parse_candidates(&plan.peer_candidates)
            .map_err(|error| LeafError::PeerConnection(format!("plan candidates: {error}")))?;
        let role = PunchRole::try_from(plan.role).unwrap_or(PunchRole::Client);
        let prediction = plan.prediction.unwrap_or_default();
        let start_delay = Duration::from_millis(u64::from(plan.start_delay_ms.min(5000)));
        Ok(Self {
            peer,
            targets,
            nonce: plan.nonce.clone(),
            role,
            prediction: PortPrediction {
                sockets: prediction.sockets.min(MAX_PREDICTION_SOCKETS),
                probes: prediction.probes.min(MAX_PREDICTION_PROBES),
            },
            deadline: Duration::from_millis(u64::from(plan.direct_deadline_ms.max(100))),
            start_delay,
            // The client starts at once and again after the start delay; a server waits it out.
            again: (role == PunchRole::Client && !start_delay.is_zero()).then_some(start_delay),
        })
    }
}

async fn carry_out(
    prepared: PreparedSocket,
    plan: PunchPlan,
    keypair: &Keypair,
) -> Result<PeerConnection, LeafError> {
    let steps = Steps::of(&plan, prepared.peer)?;
    if steps.role == PunchRole::Server {
        tokio::time::sleep(steps.start_delay).await;
    }
    let PreparedSocket {
        endpoint: direct,
        client_config,
        punch_socket,
        ..
    } = prepared;
    if steps.role != PunchRole::Server {
        direct.set_server_config(None);
    }

    let mut direct_failure = String::from("the broker planned a relayed connection");
    if !plan.relay_only {
        let attempt = attempt_direct(&steps, &direct, &client_config, punch_socket, keypair);
        match tokio::time::timeout(steps.deadline, attempt).await {
            Ok(Ok((connection, predicted))) => {
                return Ok(PeerConnection::direct(
                    connection,
                    predicted.unwrap_or(direct),
                    steps.peer,
                ));
            }
            Ok(Err(error)) => direct_failure = error.to_string(),
            Err(_) => direct_failure = format!("no direct path within {:?}", steps.deadline),
        }
    }

    let grant = plan.relay.ok_or_else(|| {
        LeafError::PeerConnection(format!("{direct_failure}, and the broker granted no relay"))
    })?;
    relay::connect(
        grant,
        steps.role,
        &steps.nonce,
        keypair,
        steps.peer,
        direct,
        &direct_failure,
    )
    .await
}

/// A direct connection, and the endpoint of the port prediction socket when that is the one that got through
/// (else the connection runs on `direct`).
type Direct = (quinn::Connection, Option<quinn::Endpoint>);

/// The direct attempt of `steps`' role, until it succeeds or fails (the caller bounds it by the deadline).
async fn attempt_direct(
    steps: &Steps,
    direct: &quinn::Endpoint,
    client_config: &quinn::ClientConfig,
    punch_socket: UdpSocket,
    keypair: &Keypair,
) -> Result<Direct, LeafError> {
    let Steps {
        targets,
        nonce,
        again,
        ..
    } = steps;
    match steps.role {
        PunchRole::Server => {
            // Aborted once a connection is accepted, or when the attempt is dropped at its deadline.
            let puncher = AbortOnDropHandle::new(tokio::spawn(punch(
                punch_socket,
                targets.clone(),
                nonce.clone(),
                steps.prediction.probes,
            )));
            let accepted = accept_with_nonce(direct, nonce).await;
            drop(puncher);
            accepted
                .map(|connection| (connection, None))
                .ok_or_else(|| LeafError::PeerConnection("endpoint closed".into()))
        }
        _ if steps.prediction.sockets > 0 => {
            // Plain dialing still wins where the other NAT does not filter by port.
            let plain = Box::pin(async {
                dial_first(direct, client_config, targets, nonce, *again)
                    .await
                    .map(|connection| (connection, None))
            });
            let datagram = punch_datagram(nonce);
            let predicted = Box::pin(async {
                let sockets = steps.prediction.sockets;
                dial_predicted(targets, &datagram, nonce, sockets, keypair, steps.peer)
                    .await
                    .map(|(connection, endpoint)| (connection, Some(endpoint)))
            });
            futures::future::select_ok([
                plain as Pin<Box<dyn std::future::Future<Output = _> + Send>>,
                predicted,
            ])
            .await
            .map(|(won, _)| won)
        }
        _ => dial_first(direct, client_config, targets, nonce, *again)
            .await
            .map(|connection| (connection, None)),
    }
}
