//! The connection broker: a leaf asks to connect to a peer, the peer's library accepts or refuses, and both get
//! a punch plan.
//!
//! ```text
//!  A ─ConnectPeer(B, A's candidates)─> S_A (broker) ─ B's presence (local replica)
//!        S_A ─ Router::offer ─> B's session (here, or through Cluster.Offer on B's super peer) ─> B's policy
//!        S_A <─ answer (accept + B's candidates | refuse + reason)
//!        S_A: nonce, roles, relay grant on this node
//!        S_A ─ Router::push_plan ─> B (PunchPlan frame, or Cluster.PushPlan)   S_A ─ plan ─> A (the answer)
//! ```
//!
//! Roles: the QUIC client sends Initial packets, which open its own NAT; the server sends punch datagrams to
//! open its NAT's filter towards the client. When exactly one side maps endpoint-dependently, that side is the
//! client: its new mapping is then the source the server answers, which the easy side's NAT lets in. Both sides
//! endpoint-dependent, or either side without UDP, is hopeless for punching: the plan says relay at once.
//!
//! Port prediction: an endpoint-dependent NAT gives the client's packets towards the server a port nobody can
//! know in advance, and a port-restricted server NAT lets in only packets from ports it has sent to. So when
//! one side is endpoint-dependent and the other endpoint-independent, the plan asks for a birthday search
//! ([`PREDICTION_SOCKETS`] mappings on the hard side, [`PREDICTION_PROBES`] probes to random ports from the easy
//! side): the chance that no probe lands on a mapping is about (1 - 256/64512)^2048, under 0.1 %.

use vesper_proto::nat::{parse_candidates, NatClass};
use vesper_proto::v1::{
    ConnectOffer, ConnectRequest, MemberRole, PortPrediction, PunchPlan, PunchRole, RelayGrant,
};
use vesper_proto::PeerId;

use crate::command::PresenceStatus;
use crate::error::ServiceError;
use crate::leaf::state::LeafState;
use crate::metrics::BrokerPlan;

use tonic::{Request, Response, Status};
use vesper_proto::v1::ConnectResponse;

use super::LeafService;
use crate::store::nodes::{read_relay_loads, RelayLoad};
use crate::store::presence;

/// How long both sides try a direct path before the relay.
pub const DIRECT_DEADLINE_MS: u32 = 3000;
/// The QUIC client dials as soon as its plan arrives and again this long after: on a short path its first
/// Initial can reach the server's NAT before the server's first punch has opened it (the server's plan is sent
/// first, but both arrive at about the same time), and QUIC would resend it only about 300 ms later. On a
/// longer path the first round gets through, which keeps set-up at about one round trip after the plan.
pub const CLIENT_START_DELAY_MS: u32 = 25;

/// Extra sockets (so NAT mappings) the endpoint-dependent side opens for port prediction.
pub const PREDICTION_SOCKETS: u32 = 256;
/// Probes the endpoint-independent side sends to random ports of the other's public address.
pub const PREDICTION_PROBES: u32 = 2048;

fn start_delay(role: PunchRole) -> u32 {
    if role == PunchRole::Client {
        CLIENT_START_DELAY_MS
    } else {
        0
    }
}

fn nat_class(text: &str) -> Result<NatClass, ServiceError> {
    text.parse()
        .map_err(|error: vesper_proto::nat::UnknownNatClass| {
            ServiceError::BadField(error.to_string())
        })
}

/// Roles of (caller, target), and whether only the relay can work.
pub fn roles(caller: NatClass, target: NatClass) -> (PunchRole, PunchRole, bool) {
    use NatClass::*;
    let hopeless = matches!((caller, target), (EndpointDependent, EndpointDependent))
        || caller == UdpBlocked
        || target == UdpBlocked;
    if target == EndpointDependent && caller != EndpointDependent {
        (PunchRole::Server, PunchRole::Client, hopeless)
    } else {
        (PunchRole::Client, PunchRole::Server, hopeless)
    }
}

/// Whether the pair needs port prediction: one side endpoint-dependent, the other endpoint-independent (a
/// public host or a full-cone NAT needs none, but an endpoint-independent NAT may filter by port).
pub fn needs_prediction(caller: NatClass, target: NatClass) -> bool {
    use NatClass::*;
    matches!(
        (caller, target),
        (EndpointDependent, EndpointIndependent) | (EndpointIndependent, EndpointDependent)
    )
}

/// Brokers a connection from `from` to the peer named in `request`; returns the caller's plan.
pub async fn connect(
    context: &LeafState,
    from: PeerId,
    request: ConnectRequest,
) -> Result<PunchPlan, ServiceError> {
    let to: PeerId = request
        .peer_id
        .parse()
        .map_err(|error| ServiceError::BadField(format!("peer_id: {error}")))?;
    if to == from {
        return Err(ServiceError::BadField(
            "a peer cannot connect to itself".into(),
        ));
    }
    parse_candidates(&request.candidates)
        .map_err(|error| ServiceError::BadField(error.to_string()))?;
    let caller_class = nat_class(&request.nat_class)?;
    let entry = presence::get(context.replica.reader().db(), to.as_bytes())?
        .filter(|entry| entry.status != PresenceStatus::Offline)
        .ok_or_else(|| ServiceError::NotFound(format!("peer {to} is not online")))?;

    let offer_id = data_encoding::HEXLOWER.encode(&rand::random::<[u8; 12]>());
    let offer = ConnectOffer {
        offer_id: offer_id.clone(),
        from_peer_id: from.to_string(),
        candidates: request.candidates.clone(),
        nat_class: caller_class.as_str().to_string(),
    };
    let (answer, host) = context.router.offer_any(&entry.hosts(), &to, offer).await?;
    if !answer.accept {
        let reason = if answer.reason.is_empty() {
            "no reason given".to_string()
        } else {
            answer.reason.chars().take(200).collect()
        };
        return Err(ServiceError::PermissionDenied(format!(
            "peer {to} refused the connection: {reason}"
        )));
    }
    parse_candidates(&answer.candidates).map_err(|error| {
        ServiceError::BadField(format!("the peer answered with bad candidates: {error}"))
    })?;
    let target_class = nat_class(&answer.nat_class)?;

    let (caller_role, target_role, relay_only) = roles(caller_class, target_class);
    let prediction = needs_prediction(caller_class, target_class).then_some(PortPrediction {
        sockets: PREDICTION_SOCKETS,
        probes: PREDICTION_PROBES,
    });
    let nonce: [u8; 16] = rand::random();
    let relay = pick_relay(context).await;
    let target_plan = PunchPlan {
        offer_id: offer_id.clone(),
        peer_id: from.to_string(),
        nonce: nonce.to_vec(),
        peer_candidates: request.candidates,
        peer_nat_class: caller_class.as_str().to_string(),
        role: target_role as i32,
        start_delay_ms: start_delay(target_role),
        direct_deadline_ms: DIRECT_DEADLINE_MS,
        relay_only,
        relay: relay.clone(),
        prediction,
    };
    let caller_plan = PunchPlan {
        offer_id,
        peer_id: to.to_string(),
        nonce: nonce.to_vec(),
        peer_candidates: answer.candidates,
        peer_nat_class: target_class.as_str().to_string(),
        role: caller_role as i32,
        start_delay_ms: start_delay(caller_role),
        direct_deadline_ms: DIRECT_DEADLINE_MS,
        relay_only,
        relay,
        prediction,
    };
    if !context.router.push_plan(host, &to, target_plan).await {
        return Err(ServiceError::NotFound(format!(
            "peer {to} went away before its plan reached it"
        )));
    }
    context.connection_metrics.brokered(
        caller_class.as_str(),
        target_class.as_str(),
        if relay_only {
            BrokerPlan::RelayOnly
        } else if prediction.is_some() {
            BrokerPlan::Predict
        } else {
            BrokerPlan::Punch
        },
    );
    Ok(caller_plan)
}

/// How many relays a broker asks before it gives up on a grant.
const RELAY_TRIES: usize = 3;

/// Members in the order a broker should ask them for a relay: least full first (by the replicated load
/// reports; a node that has not reported counts as empty), this node first among equals (no extra hop), then
/// by id. Nodes that do not relay come last.
pub fn relay_order(me: Option<u64>, members: &[(u64, Option<RelayLoad>)]) -> Vec<u64> {
    let mut ranked: Vec<(f64, bool, u64)> = members
        .iter()
        .map(|(id, load)| {
            let fill = load.map(|load| load.fill()).unwrap_or(0.0);
            (fill, Some(*id) != me, *id)
        })
        .collect();
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked.into_iter().map(|(_, _, id)| id).collect()
}

/// Picks the relay by replicated load and gets a grant from it (here, or from another member).
async fn pick_relay(context: &LeafState) -> Option<RelayGrant> {
    let me = context.replica.node_id();
    let loads = read_relay_loads(context.replica.reader().db()).unwrap_or_default();
    let members: Vec<(u64, Option<RelayLoad>)> = context
        .replica
        .members()
        .unwrap_or_default()
        .into_iter()
        .filter(|member| member.role != MemberRole::Removed as i32)
        .map(|member| (member.node_id, loads.get(&member.node_id).copied()))
        .collect();
    let mut order = relay_order(me, &members);
    if order.is_empty() {
        order.extend(me);
    }
    if me.is_none() {
        return context.router.grant_here();
    }
    for node_id in order.into_iter().take(RELAY_TRIES) {
        if let Some(grant) = context.router.grant_relay(node_id).await {
            return Some(grant);
        }
    }
    None
}

/// `Leaf.ConnectPeer`.
pub(super) async fn connect_peer(
    service: &LeafService,
    request: Request<ConnectRequest>,
) -> Result<Response<ConnectResponse>, Status> {
    let (peer, _session) = service.session_of(&request)?;
    let plan = connect(&service.context, peer, request.into_inner()).await?;
    Ok(Response::new(ConnectResponse { plan: Some(plan) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_dependent_side_is_the_client_and_hopeless_pairs_relay() {
        use NatClass::*;
        assert_eq!(
            roles(EndpointIndependent, EndpointDependent),
            (PunchRole::Server, PunchRole::Client, false)
        );
        assert_eq!(
            roles(EndpointDependent, Public),
            (PunchRole::Client, PunchRole::Server, false)
        );
        assert_eq!(
            roles(EndpointIndependent, EndpointIndependent),
            (PunchRole::Client, PunchRole::Server, false)
        );
        assert!(roles(EndpointDependent, EndpointDependent).2);
        assert!(roles(UdpBlocked, Public).2);
        assert!(needs_prediction(EndpointDependent, EndpointIndependent));
        assert!(needs_prediction(EndpointIndependent, EndpointDependent));
        assert!(!needs_prediction(EndpointDependent, Public));
        assert!(!needs_prediction(EndpointIndependent, EndpointIndependent));
        assert!(!needs_prediction(EndpointDependent, EndpointDependent));
    }

    #[test]
    fn the_least_full_relay_comes_first_and_this_node_wins_ties() {
        let load = |active, capacity| {
            Some(RelayLoad {
                active,
                capacity,
                at_ms: 0,
            })
        };
        // All empty: this node first, then by id.
        assert_eq!(
            relay_order(Some(2), &[(1, load(0, 10)), (2, load(0, 10)), (3, None)]),
            vec![2, 1, 3]
        );
        // This node is fuller than the others: the emptiest goes first; a non-relaying node comes last.
        assert_eq!(
            relay_order(
                Some(1),
                &[
                    (1, load(9, 10)),
                    (2, load(1, 10)),
                    (3, load(0, 0)),
                    (4, load(5, 100))
                ]
            ),
            vec![4, 2, 1, 3]
        );
    }
}
