//! The Cluster service: Raft RPCs, forwarded writes and reads, and joining. Reached only over mutual TLS by
//! holders of a cluster certificate.

pub mod deliver;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tonic::{Request, Response, Status};
use tracing::Instrument;
use vesper_proto::v1::cluster_server::Cluster;
use vesper_proto::v1::{
    AdoptRequest, AdoptResponse, ConnectAnswer, DeliverCall, DescribeRequest, DescribeResponse,
    DrainMailboxRequest, DrainMailboxResponse, GrantRelayRequest, JoinRequest, JoinResponse,
    MembershipCall, MembershipReply, NodeDescriptor, OfferRequest, ProposeRequest, ProposeResponse,
    PushPlanRequest, PushPlanResponse, RaftPayload, ReadIndexRequest, ReadIndexResponse,
};

use crate::command::{Command, NodeInfo};
use crate::error::ServiceError;
use crate::membership::{node_info, Adoption, Membership};
use crate::raft::codec;
use crate::raft::{forward, propose};
use crate::raft_types::{Snapshot, SnapshotMeta, TypeConfig, Vote};
use crate::replica::Replica;
use crate::router::Router;

/// The Cluster service of one node, holding the handles its calls use.
pub struct ClusterService {
    pub replica: Replica,
    pub router: Router,
    pub membership: Membership,
    pub adoption: Adoption,
    /// Dial-back proofs other members ask this one to run.
    pub offers: crate::placement::offers::Offers,
    /// The certificate issuer this node holds, if any, and the validity it signs for (`RenewCertificate`).
    pub issuer: Option<std::sync::Arc<crate::placement::issuer::IssuerMaterial>>,
    pub issued_validity: std::time::Duration,
    /// This node's identity and addresses, for `Describe` and `Adopt`.
    pub me: NodeInfo,
    /// The cluster name this node is configured for (`Describe`; `Join` refuses another).
    pub cluster_name: Option<String>,
    /// Tasks of delivery streams from other members, ended at shutdown.
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

impl ClusterService {
    fn raft(&self) -> Result<&crate::raft::VesperRaft, ServiceError> {
        self.replica.raft()
    }

    /// The Raft handle for a Raft RPC, once the call is known to be meant for this node.
    fn raft_for<T>(&self, request: &Request<T>) -> Result<&crate::raft::VesperRaft, Status> {
        let raft = self.raft()?;
        crate::raft::network::check_target(request.metadata(), *raft.node_id())?;
        Ok(raft)
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let raft = self.raft_for(&request)?;
        let rpc = codec::from_payload("append entries", request.get_ref())?;
        let result = raft.append_entries(rpc).await;
        Ok(Response::new(codec::payload(
            "append entries result",
            &result,
        )?))
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let raft = self.raft_for(&request)?;
        let rpc = codec::from_payload("vote", request.get_ref())?;
        let result = raft.vote(rpc).await;
        Ok(Response::new(codec::payload("vote result", &result)?))
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let raft = self.raft_for(&request)?;
        let (vote, meta, data): (Vote, SnapshotMeta, Vec<u8>) =
            codec::from_payload("snapshot", request.get_ref())?;
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = data.len(), "installing snapshot from the leader");
        let result = raft
            .install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: data,
                },
            )
            .await;
        Ok(Response::new(codec::payload("snapshot result", &result)?))
    }

    async fn transfer_leader(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let raft = self.raft_for(&request)?;
        let rpc: openraft::raft::TransferLeaderRequest<TypeConfig> =
            codec::from_payload("transfer leader", request.get_ref())?;
        let result = raft.handle_transfer_leader(rpc).await;
        Ok(Response::new(codec::payload(
            "transfer leader result",
            &result,
        )?))
    }

    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<Response<ProposeResponse>, Status> {
        let raft = self.raft()?;
        let request = request.into_inner();
        let mut commands = Vec::with_capacity(request.commands.len());
        for bytes in &request.commands {
            let command: Command = codec::decode("command", request.encoding, bytes)?;
            commands.push(command);
        }
        // Proposed concurrently: openraft packs them into as few log appends as it can. A traced command gets a
        // span for its commit on the leader (append, replication to a quorum, apply here).
        let results = futures::future::join_all(commands.into_iter().map(|command| {
            let span = match command.op.trace() {
                Some(context) => {
                    let span = tracing::info_span!(
                        "vesper.commit",
                        otel.kind = "server",
                        otel.name = "vesper.v1.Cluster/Propose",
                        rpc.system = "grpc",
                        rpc.service = "vesper.v1.Cluster",
                        rpc.method = "Propose",
                        vesper.command = command.op.kind(),
                    );
                    context.adopt(&span);
                    span
                }
                None => tracing::Span::none(),
            };
            propose::propose_local(raft, command).instrument(span)
        }))
        .await;
        let outcomes = results
            .into_iter()
            .map(forward::outcome_of)
            .collect::<Result<Vec<_>, Status>>()?;
        Ok(Response::new(ProposeResponse {
            encoding: codec::ENCODING,
            outcomes,
        }))
    }

    async fn read_index(
        &self,
        _request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        let raft = self.raft()?;
        let read_index = propose::local_read_index(raft).await?;
        Ok(Response::new(ReadIndexResponse { read_index }))
    }

    type DeliverStreamStream = deliver::OutcomeStream;

    async fn deliver_stream(
        &self,
        request: Request<tonic::Streaming<DeliverCall>>,
    ) -> Result<Response<Self::DeliverStreamStream>, Status> {
        let caller = crate::roles::caller_fingerprint(&request)?;
        let serving = deliver::Serving {
            router: self.router.clone(),
            reader: self.replica.reader().clone(),
            tasks: self.tasks.clone(),
            shutdown: self.shutdown.clone(),
        };
        Ok(Response::new(deliver::serve(
            serving,
            request.into_inner(),
            caller,
        )))
    }

    async fn prove_reach(
        &self,
        request: Request<vesper_proto::v1::ProveReachRequest>,
    ) -> Result<Response<vesper_proto::v1::ProveReachResponse>, Status> {
        Ok(Response::new(self.offers.prove(request.get_ref()).await?))
    }

    async fn renew_certificate(
        &self,
        request: Request<vesper_proto::v1::RenewCertificateRequest>,
    ) -> Result<Response<vesper_proto::v1::RenewCertificateResponse>, Status> {
        let material = self.issuer.as_ref().ok_or_else(|| {
            ServiceError::Precondition("this node holds no certificate issuer".into())
        })?;
        let der = request
            .peer_certs()
            .and_then(|chain| chain.first().cloned())
            .ok_or_else(|| {
                ServiceError::Unauthenticated("a client certificate is required".into())
            })?;
        let issued = crate::placement::issuer::renew(
            &self.replica,
            material,
            self.issued_validity,
            der.as_ref(),
        )
        .await?;
        Ok(Response::new(vesper_proto::v1::RenewCertificateResponse {
            certificate_chain: issued.chain_pem,
            not_after_ms: issued.not_after_ms,
        }))
    }

    async fn membership(
        &self,
        request: Request<MembershipCall>,
    ) -> Result<Response<MembershipReply>, Status> {
        let call = request
            .into_inner()
            .call
            .ok_or_else(|| ServiceError::BadField("membership call is empty".into()))?;
        let reply = crate::membership::run_forwarded(&self.membership, call).await?;
        Ok(Response::new(MembershipReply { reply: Some(reply) }))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let request = request.into_inner();
        if let Some(mine) = &self.cluster_name {
            if !request.cluster_name.is_empty() && request.cluster_name != *mine {
                return Err(ServiceError::Precondition(format!(
                    "this member belongs to cluster {mine:?}; the joining node is configured for {:?}",
                    request.cluster_name
                ))
                .into());
            }
        }
        let node = node_info(request.node)?;
        let node_id = crate::membership::register_standby(&self.membership, node).await?;
        Ok(Response::new(JoinResponse {
            node_id,
            members: self.membership.members().unwrap_or_default(),
        }))
    }

    async fn describe(
        &self,
        _request: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        let me = &self.me;
        Ok(Response::new(DescribeResponse {
            node: Some(NodeDescriptor {
                peer_id: me.peer_id.clone(),
                cluster_addr: me.cluster_addr.clone(),
                leaf_addr: me.leaf_addr.clone(),
                admin_addr: me.admin_addr.clone(),
            }),
            node_id: self.replica.node_id().unwrap_or(0),
            cluster_name: self.cluster_name.clone().unwrap_or_default(),
        }))
    }

    async fn adopt(
        &self,
        request: Request<AdoptRequest>,
    ) -> Result<Response<AdoptResponse>, Status> {
        let request = request.into_inner();
        if request.peer_id != self.me.peer_id {
            return Err(ServiceError::Precondition(format!(
                "adoption is for {}, but this node is {}",
                request.peer_id, self.me.peer_id
            ))
            .into());
        }
        if request.node_id == 0 {
            return Err(ServiceError::BadField("node id 0 is reserved".into()).into());
        }
        if let Some(current) = self.replica.node_id() {
            return Err(ServiceError::Precondition(format!(
                "this node is already cluster member {current}"
            ))
            .into());
        }
        self.adoption.adopt(request.node_id).await?;
        Ok(Response::new(AdoptResponse {}))
    }

    async fn offer(
        &self,
        request: Request<OfferRequest>,
    ) -> Result<Response<ConnectAnswer>, Status> {
        let request = request.into_inner();
        let to: vesper_proto::PeerId = request
            .to
            .parse()
            .map_err(|error| ServiceError::BadField(format!("to: {error}")))?;
        let offer = request
            .offer
            .ok_or_else(|| ServiceError::BadField("offer is missing".into()))?;
        Ok(Response::new(self.router.offer_here(&to, offer).await?))
    }

    async fn grant_relay(
        &self,
        _request: Request<GrantRelayRequest>,
    ) -> Result<Response<vesper_proto::v1::RelayGrant>, Status> {
        self.router.grant_here().map(Response::new).ok_or_else(|| {
            ServiceError::LimitReached("this super peer has no relay allocation to give".into())
                .into_status()
        })
    }

    async fn push_plan(
        &self,
        request: Request<PushPlanRequest>,
    ) -> Result<Response<PushPlanResponse>, Status> {
        let request = request.into_inner();
        let to: vesper_proto::PeerId = request
            .to
            .parse()
            .map_err(|error| ServiceError::BadField(format!("to: {error}")))?;
        let plan = request
            .plan
            .ok_or_else(|| ServiceError::BadField("plan is missing".into()))?;
        let pushed = self.router.push_plan_here(&to, plan).await;
        Ok(Response::new(PushPlanResponse { pushed }))
    }

    async fn drain_mailbox(
        &self,
        request: Request<DrainMailboxRequest>,
    ) -> Result<Response<DrainMailboxResponse>, Status> {
        let to: vesper_proto::PeerId = request
            .into_inner()
            .to
            .parse()
            .map_err(|error| ServiceError::BadField(format!("to: {error}")))?;
        // Queued for this node's drainer: the caller (the sender's super peer) must not wait for the whole
        // mailbox.
        self.router.drain_here(to);
        Ok(Response::new(DrainMailboxResponse {}))
    }
}
