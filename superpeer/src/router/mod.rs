//! The one place that reaches a leaf's session wherever it is attached: on this node through the
//! [`SessionRegistry`], on another member through the Cluster service. Messages, mailbox drains, connection
//! offers, punch plans and relay grants all go through a [`Router`], with the timeouts that belong to each.
//!
//! ```text
//!  messaging / broker ── Router::deliver(host, to, ..) ──┬─ host is this node ─> sessions (push, wait for acks)
//!                        Router::offer / push_plan / ..  └─ another member ───> links (DeliverStream) or a
//!                                                                              unary Cluster call on that member
//!  Cluster service (the other member's side) ── Router::deliver_here / offer_here / push_plan_here / grant_here
//! ```
//!
//! Where a peer is attached is the caller's business (it reads the peer's presence from its replica, which it
//! needs anyway to tell "offline" from "attached"); the router only knows how to reach a host.

pub mod links;

use std::time::Duration;

use tokio::sync::mpsc;
use vesper_proto::v1::{
    ConnectAnswer, ConnectOffer, DrainMailboxRequest, GrantRelayRequest, Message, OfferRequest,
    PunchPlan, PushPlanRequest, RelayGrant,
};
use vesper_proto::PeerId;

use crate::error::ServiceError;
use crate::raft::network::ClusterClients;
use crate::replica::Replica;
use crate::sessions::SessionRegistry;
use crate::udp::Relay;

/// How long a delivery waits for the recipient's acknowledgement before the message goes to the mailbox.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// What a member delivering to another waits on top of [`DELIVERY_TIMEOUT`] (the hop between them).
pub const REMOTE_DELIVERY_SLACK: Duration = Duration::from_secs(2);
/// How long the target's library has to answer a connection offer.
pub const OFFER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a broker waits for another member's relay grant.
pub const GRANT_TIMEOUT: Duration = Duration::from_secs(1);
/// Mailbox drains asked for and not yet started, on this node. Past it a request is dropped (logged): the
/// message it was for stays queued and arrives at the recipient's next attach.
pub const DRAIN_QUEUE: usize = 1024;

/// A request to push a peer's mailbox into its session on this node.
pub type DrainRequests = mpsc::Receiver<PeerId>;

/// Reaches the sessions of leaves on this node and on every other member; cheap to clone.
#[derive(Clone)]
pub struct Router {
    replica: Replica,
    sessions: SessionRegistry,
    clients: ClusterClients,
    links: links::Links,
    relay: Relay,
    drains: mpsc::Sender<PeerId>,
}

impl Router {
    /// A router, and the queue of mailbox drains asked of this node (the mailbox's drainer takes it).
    pub fn new(
        replica: Replica,
        sessions: SessionRegistry,
        clients: ClusterClients,
        relay: Relay,
        links: links::Links,
    ) -> (Self, DrainRequests) {
        let (drains, requests) = mpsc::channel(DRAIN_QUEUE);
        let router = Self {
            replica,
            sessions,
            clients,
            links,
            relay,
            drains,
        };
        (router, requests)
    }

    fn is_here(&self, host: u64) -> bool {
        Some(host) == self.replica.node_id()
    }

    /// The Cluster address of member `host`, if it is one.
    fn cluster_addr(&self, host: u64) -> Option<String> {
        self.replica.member_info(host).map(|node| node.cluster_addr)
    }

    /// Delivers `messages` to every session of `to` on the members `hosts` at once, pushed together and in
    /// order; one entry per message, true when a session of the leaf acknowledged it (false: not attached on
    /// any of them, no ack in time, hosts down).
    pub async fn deliver_any(
        &self,
        hosts: &[u64],
        to: &PeerId,
        messages: Vec<Message>,
    ) -> Vec<bool> {
        match hosts {
            [] => vec![false; messages.len()],
            [host] => self.deliver(*host, to, messages).await,
            _ => {
                let mut outcomes: futures::stream::FuturesUnordered<_> = hosts
                    .iter()
                    .map(|host| self.deliver(*host, to, messages.clone()))
                    .collect();
                let mut delivered = vec![false; messages.len()];
                // Done once every message was acknowledged somewhere: a host whose sessions are slow or gone
                // does not hold up the answer.
                while let Some(outcome) = futures::StreamExt::next(&mut outcomes).await {
                    for (any, one) in delivered.iter_mut().zip(outcome) {
                        *any |= one;
                    }
                    if delivered.iter().all(|done| *done) {
                        break;
                    }
                }
                delivered
            }
        }
    }

    /// Delivers `messages` to `to`'s sessions on member `host`, pushed together and in order; one entry per
    /// message, true when the leaf acknowledged it (false: not attached there, no ack in time, host down).
    pub async fn deliver(&self, host: u64, to: &PeerId, messages: Vec<Message>) -> Vec<bool> {
        if self.is_here(host) {
            return self.deliver_here(to, messages).await;
        }
        let count = messages.len();
        let Some(address) = self.cluster_addr(host) else {
            return vec![false; count];
        };
        let delivered = self
            .links
            .deliver(
                &self.clients,
                &address,
                to.to_string(),
                messages,
                DELIVERY_TIMEOUT + REMOTE_DELIVERY_SLACK,
            )
            .await;
        if delivered.contains(&false) {
            tracing::debug!(host, "remote delivery not acknowledged; queueing");
        }
        delivered
    }

    /// Delivers to every session of `to` on this node; one entry per message, false when it has none here or
    /// none acknowledged in time.
    pub async fn deliver_here(&self, to: &PeerId, messages: Vec<Message>) -> Vec<bool> {
        let count = messages.len();
        self.sessions
            .deliver_all(to, messages, DELIVERY_TIMEOUT)
            .await
            .unwrap_or_else(|_| vec![false; count])
    }

    /// Asks member `host` (maybe this one) to push `to`'s mailbox into its session now. Best effort: a drain
    /// that does not happen leaves the mailbox for the next attach.
    pub async fn drain(&self, host: u64, to: &PeerId) {
        if self.is_here(host) {
            self.drain_here(*to);
            return;
        }
        let Some(address) = self.cluster_addr(host) else {
            return;
        };
        if let Ok(mut client) = self.clients.client(&address) {
            let request = DrainMailboxRequest { to: to.to_string() };
            if let Err(status) = client.drain_mailbox(request).await {
                tracing::debug!(host, %status, "mailbox drain request not taken");
            }
        }
    }

    /// Queues a drain of `to`'s mailbox on this node, without waiting for it.
    pub fn drain_here(&self, to: PeerId) {
        if let Err(error) = self.drains.try_send(to) {
            tracing::warn!(%error, "mailbox drain queue is full; the mailbox waits for the next attach");
        }
    }

    /// Offers a connection to every session of `to` on the members `hosts` at once, and waits for the first
    /// that accepts (or for all to refuse or time out: then the first refusal, or the last error). Returns the
    /// answer and the member whose session gave it, where the punch plan must go.
    pub async fn offer_any(
        &self,
        hosts: &[u64],
        to: &PeerId,
        offer: ConnectOffer,
    ) -> Result<(ConnectAnswer, u64), ServiceError> {
        let mut pending: futures::stream::FuturesUnordered<_> = hosts
            .iter()
            .map(|host| {
                let offer = offer.clone();
                async move { (*host, self.offer(*host, to, offer).await) }
            })
            .collect();
        let mut refusal = None;
        let mut failure = None;
        while let Some((host, outcome)) = futures::StreamExt::next(&mut pending).await {
            match outcome {
                Ok(answer) if answer.accept => return Ok((answer, host)),
                Ok(answer) => refusal = refusal.or(Some((answer, host))),
                Err(error) => failure = Some(error),
            }
        }
        match (refusal, failure) {
            (Some(refused), _) => Ok(refused),
            (None, Some(error)) => Err(error),
            (None, None) => Err(ServiceError::NotFound(format!("peer {to} is not online"))),
        }
    }

    /// Offers a connection to `to`'s sessions on member `host`, and waits for the first answer that accepts.
    pub async fn offer(
        &self,
        host: u64,
        to: &PeerId,
        offer: ConnectOffer,
    ) -> Result<ConnectAnswer, ServiceError> {
        if self.is_here(host) {
            return self.offer_here(to, offer).await;
        }
        let address = self.cluster_addr(host).ok_or_else(|| {
            ServiceError::NotFound(format!("peer {to} is hosted by an unknown node"))
        })?;
        let mut client = self.clients.peer(&address)?;
        let mut request = tonic::Request::new(OfferRequest {
            to: to.to_string(),
            offer: Some(offer),
        });
        request.set_timeout(OFFER_TIMEOUT + REMOTE_DELIVERY_SLACK);
        client
            .offer(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| match status.code() {
                tonic::Code::DeadlineExceeded => no_answer(),
                _ => ServiceError::Peer {
                    peer: address.clone(),
                    status,
                },
            })
    }

    /// Offers a connection to every session of `to` on this node and waits for the first that accepts.
    pub async fn offer_here(
        &self,
        to: &PeerId,
        offer: ConnectOffer,
    ) -> Result<ConnectAnswer, ServiceError> {
        self.sessions
            .offer(to, offer, OFFER_TIMEOUT)
            .await
            .map_err(|_| no_answer())
    }

    /// Pushes a punch plan to `to` on member `host`, into the session that accepted the plan's offer; false when it
    /// did not get there.
    pub async fn push_plan(&self, host: u64, to: &PeerId, plan: PunchPlan) -> bool {
        if self.is_here(host) {
            return self.push_plan_here(to, plan).await;
        }
        let Some(address) = self.cluster_addr(host) else {
            return false;
        };
        let Ok(mut client) = self.clients.client(&address) else {
            return false;
        };
        client
            .push_plan(PushPlanRequest {
                to: to.to_string(),
                plan: Some(plan),
            })
            .await
            .map(|reply| reply.into_inner().pushed)
            .unwrap_or(false)
    }

    /// Pushes a punch plan into the session of `to` on this node that accepted the plan's offer; false when it is
    /// gone.
    pub async fn push_plan_here(&self, to: &PeerId, plan: PunchPlan) -> bool {
        self.sessions.push_plan(to, plan).await
    }

    /// A relay allocation on member `node_id` (maybe this one); None when it refused or did not answer.
    pub async fn grant_relay(&self, node_id: u64) -> Option<RelayGrant> {
        if self.is_here(node_id) || self.replica.node_id().is_none() {
            return self.grant_here();
        }
        let address = self.cluster_addr(node_id)?;
        let mut client = self.clients.client(&address).ok()?;
        let mut request = tonic::Request::new(GrantRelayRequest {});
        request.set_timeout(GRANT_TIMEOUT);
        match client.grant_relay(request).await {
            Ok(grant) => Some(grant.into_inner()),
            Err(status) => {
                tracing::debug!(node_id, %status, "relay grant refused");
                None
            }
        }
    }

    /// A relay allocation on this node, if it relays and has room.
    pub fn grant_here(&self) -> Option<RelayGrant> {
        self.relay.grant()
    }
}

fn no_answer() -> ServiceError {
    ServiceError::Timeout("the peer's answer to the connection offer")
}
