//! Connections to other leaves, as seen from the session: asking for one, answering offers, running plans.

use std::sync::Arc;

use tokio::net::UdpSocket;
use vesper_proto::v1::{
    client_frame, ClientFrame, ConnectAnswer, ConnectOffer, ConnectRequest, PunchPlan,
};
use vesper_proto::PeerId;

use super::endpoints;
use super::shared::{Connection, Shared};
use crate::error::LeafError;
use crate::nat;
use crate::p2p::{self, PeerConnection, PreparedSocket};

/// How long a connect call waits for the broker (which waits up to 15 s for the peer's answer).
const CONNECT_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// How long an accepted offer's socket waits for its punch plan.
const PLAN_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A fresh UDP socket and what STUN says about it.
async fn measured_socket(
    shared: &Shared,
    connection: &Connection,
) -> Result<(UdpSocket, nat::NatReport), LeafError> {
    let socket = UdpSocket::bind(("0.0.0.0", 0))
        .await
        .map_err(|error| LeafError::PeerConnection(format!("cannot bind a UDP socket: {error}")))?;
    let servers = endpoints::stun_servers(&shared.attachment, &connection.server).await;
    let report = nat::discover(&socket, &servers)
        .await
        .map_err(|error| LeafError::PeerConnection(format!("STUN discovery failed: {error}")))?;
    Ok((socket, report))
}

/// Asks the broker for a connection to `peer` and carries out the plan.
pub async fn dial(
    shared: &Shared,
    connection: &Connection,
    peer: &PeerId,
) -> Result<PeerConnection, LeafError> {
    let (socket, report) = measured_socket(shared, connection).await?;
    let mut request = connection.request(ConnectRequest {
        peer_id: peer.to_string(),
        candidates: report
            .candidates()
            .iter()
            .map(ToString::to_string)
            .collect(),
        nat_class: report.class.as_str().to_string(),
    });
    request.set_timeout(CONNECT_CALL_TIMEOUT);
    let prepared = PreparedSocket::new(socket, &shared.config.keypair, *peer)?;
    let plan = connection
        .client
        .clone()
        .connect_peer(request)
        .await?
        .into_inner()
        .plan
        .ok_or_else(|| LeafError::PeerConnection("the broker answered without a plan".into()))?;
    p2p::run_plan(
        prepared,
        plan,
        &shared.config.keypair,
        &shared.tasks,
        &shared.stop,
    )
    .await
}

/// Answers an offer: asks the app's policy; on accept, measures a socket and keeps it for the plan.
pub async fn answer_offer(shared: Arc<Shared>, connection: Arc<Connection>, offer: ConnectOffer) {
    let policy = shared.peers.policy.read().expect("policy lock").clone();
    let from = offer.from_peer_id.parse::<PeerId>().ok();
    let accepted = match (from, policy) {
        (Some(from), Some(policy)) => policy(&from),
        _ => false,
    };
    let mut answer = ConnectAnswer {
        offer_id: offer.offer_id.clone(),
        accept: false,
        reason: String::from("the peer does not accept connections from you"),
        candidates: Vec::new(),
        nat_class: String::new(),
    };
    let prepared = match from {
        Some(from) if accepted => Some(measured_socket(&shared, &connection).await.and_then(
            |(socket, report)| {
                PreparedSocket::new(socket, &shared.config.keypair, from)
                    .map(|prepared| (prepared, report))
            },
        )),
        _ => None,
    };
    if let Some(prepared) = prepared {
        match prepared {
            Ok((socket, report)) => {
                answer.accept = true;
                answer.reason.clear();
                answer.candidates = report
                    .candidates()
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                answer.nat_class = report.class.as_str().to_string();
                shared
                    .peers
                    .pending_accepts
                    .lock()
                    .expect("pending accepts lock")
                    .insert(offer.offer_id.clone(), socket);
                // A plan that never comes (the caller gave up) must not keep the socket forever.
                let (owner, offer_id) = (shared.clone(), offer.offer_id.clone());
                shared.spawn(async move {
                    tokio::time::sleep(PLAN_WAIT).await;
                    owner
                        .peers
                        .pending_accepts
                        .lock()
                        .expect("pending accepts lock")
                        .remove(&offer_id);
                });
            }
            Err(error) => answer.reason = format!("the peer could not prepare a socket: {error}"),
        }
    }
    let frame = ClientFrame {
        frame: Some(client_frame::Frame::ConnectAnswer(answer)),
    };
    let _ = connection.outbound.send(frame).await;
}

/// Runs the plan of an accepted offer and hands the connection to the app.
pub async fn carry_out_plan(shared: Arc<Shared>, plan: PunchPlan) {
    let socket = shared
        .peers
        .pending_accepts
        .lock()
        .expect("pending accepts lock")
        .remove(&plan.offer_id);
    let Some(socket) = socket else {
        tracing::warn!(offer = %plan.offer_id, "punch plan for an offer this leaf did not accept");
        return;
    };
    let peer = plan.peer_id.clone();
    match p2p::run_plan(
        socket,
        plan,
        &shared.config.keypair,
        &shared.tasks,
        &shared.stop,
    )
    .await
    {
        Ok(connection) => {
            tracing::info!(%peer, path = %connection.path(), "accepted a peer connection");
            let path = match connection.path() {
                crate::p2p::Path::Direct(_) => super::metrics::ConnectionPath::Direct,
                _ => super::metrics::ConnectionPath::Relayed,
            };
            shared
                .metrics
                .connection(path, super::metrics::Side::Accept, None);
            let _ = shared.peers.incoming.send(connection).await;
        }
        Err(error) => {
            tracing::warn!(%peer, %error, "an accepted peer connection failed");
            shared.metrics.connection(
                super::metrics::ConnectionPath::Failed,
                super::metrics::Side::Accept,
                None,
            );
        }
    }
}
