//! The Admin service: what `vesperctl` calls, with an operator certificate (the gate in `roles` refuses any
//! other). Read calls answer from the local replica; membership changes run on the leader (a follower forwards
//! the call to the leader's Cluster service, see `membership::on_leader`).

use openraft::async_runtime::WatchReceiver;
use tonic::{Request, Response, Status};
use vesper_proto::v1::admin_server::Admin;
use vesper_proto::v1::membership_call::Call;
use vesper_proto::v1::membership_reply::Reply;
use vesper_proto::v1::{
    AddStandbyRequest, AddStandbyResponse, DemoteRequest, DemoteResponse, MembersRequest,
    MembersResponse, PromoteRequest, PromoteResponse, RemoveNodeRequest, RemoveNodeResponse,
    RevokeCertificateRequest, RevokeCertificateResponse, StatusRequest, StatusResponse,
    TransferLeaderRequest, TransferLeaderResponse,
};
use vesper_proto::v1::{
    ListNamespaceAclsRequest, ListNamespaceAclsResponse, PlacementStatusRequest,
    PlacementStatusResponse, SetNamespaceAclRequest, SetNamespaceAclResponse, SetPlacementRequest,
    SetPlacementResponse,
};

use vesper_proto::acl::NamespaceAcl;

use crate::command::{NodeInfo, RevokeCertificate, SetNamespaceAcl};
use crate::error::ServiceError;
use crate::membership::{self, Initialization, Membership};
use crate::replica::Replica;

pub struct AdminService {
    replica: Replica,
    membership: Membership,
    /// This node's identity and addresses, for `Status`.
    me: NodeInfo,
    /// The start-up task, for `Initialize`.
    initialization: Initialization,
}

impl AdminService {
    pub fn new(
        replica: Replica,
        membership: Membership,
        me: NodeInfo,
        initialization: Initialization,
    ) -> Self {
        Self {
            replica,
            membership,
            me,
            initialization,
        }
    }

    /// The answer to `Initialize` on a node that is a member already.
    fn already_member(&self, node_id: u64) -> vesper_proto::v1::InitializeResponse {
        let members = self.replica.members().unwrap_or_default();
        let serving = members
            .iter()
            .filter(|member| member.role != vesper_proto::v1::MemberRole::Removed as i32)
            .count();
        vesper_proto::v1::InitializeResponse {
            outcome: vesper_proto::v1::initialize_response::Outcome::AlreadyMember as i32,
            node_id,
            detail: format!(
                "already initialised: this node is node {node_id} of a cluster of {serving} members; nothing was done"
            ),
        }
    }
}

/// Runs the Admin membership call `$request` on the leader and unwraps the reply of the same kind.
macro_rules! on_leader {
    ($self:ident, $request:ident, $kind:ident) => {
        match membership::on_leader(&$self.membership, Call::$kind($request.into_inner())).await? {
            Reply::$kind(reply) => Ok(Response::new(reply)),
            other => Err(ServiceError::Internal(format!(
                "the leader answered a {} call with {other:?}",
                stringify!($kind)
            ))
            .into()),
        }
    };
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn initialize(
        &self,
        _request: Request<vesper_proto::v1::InitializeRequest>,
    ) -> Result<Response<vesper_proto::v1::InitializeResponse>, Status> {
        if let Some(node_id) = self.replica.node_id() {
            return Ok(Response::new(self.already_member(node_id)));
        }
        let answer = self.initialization.initialize().await;
        match (answer, self.replica.node_id()) {
            (Some(answer), _) => {
                tracing::info!(outcome = answer.outcome, detail = %answer.detail, "initialise asked by an operator");
                if answer.outcome == vesper_proto::v1::initialize_response::Outcome::Unspecified as i32 {
                    return Err(ServiceError::Internal(answer.detail).into());
                }
                Ok(Response::new(answer))
            }
            (None, Some(node_id)) => Ok(Response::new(self.already_member(node_id))),
            (None, None) => Err(ServiceError::Unavailable(
                "this node is entering a cluster (started with --bootstrap, or another init is under way); ask again"
                    .into(),
            )
            .into()),
        }
    }

    async fn placement_status(
        &self,
        request: Request<PlacementStatusRequest>,
    ) -> Result<Response<PlacementStatusResponse>, Status> {
        on_leader!(self, request, PlacementStatus)
    }

    async fn grant_eligibility(
        &self,
        request: Request<vesper_proto::v1::GrantEligibilityRequest>,
    ) -> Result<Response<vesper_proto::v1::GrantEligibilityResponse>, Status> {
        let reply = crate::placement::admin::grant(&self.replica, request.get_ref()).await?;
        tracing::info!(
            peers = request.get_ref().peers.len(),
            all = request.get_ref().all,
            revoke = request.get_ref().revoke,
            "eligibility grant changed by an operator"
        );
        Ok(Response::new(reply))
    }

    async fn set_placement(
        &self,
        request: Request<SetPlacementRequest>,
    ) -> Result<Response<SetPlacementResponse>, Status> {
        let targets = crate::placement::admin::set(&self.replica, request.get_ref()).await?;
        tracing::info!(?targets, "placement targets set by an operator");
        Ok(Response::new(SetPlacementResponse {
            targets: Some(crate::placement::admin::targets_to_wire(&targets)),
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let context = self;
        let Ok(raft) = context.replica.raft() else {
            // An idle node still answers, so operators can see it is waiting to be added.
            return Ok(Response::new(StatusResponse {
                peer_id: context.me.peer_id.clone(),
                raft_state: "idle".into(),
                ..Default::default()
            }));
        };
        let metrics = raft.metrics().borrow_watched().clone();
        let index =
            |log_id: &Option<crate::raft_types::LogId>| log_id.as_ref().map_or(0, |id| id.index);
        Ok(Response::new(StatusResponse {
            node_id: *raft.node_id(),
            peer_id: context.me.peer_id.clone(),
            leader_id: metrics.current_leader.unwrap_or(0),
            term: metrics.current_term,
            applied_index: index(&metrics.last_applied),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            raft_state: format!("{:?}", metrics.state).to_lowercase(),
            purged_index: index(&metrics.purged),
            snapshot_index: index(&metrics.snapshot),
            members: context.replica.members()?,
        }))
    }

    async fn members(
        &self,
        _request: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        let raft = self.replica.raft()?;
        let metrics = raft.metrics().borrow_watched().clone();
        Ok(Response::new(MembersResponse {
            members: self.replica.members()?,
            leader_id: metrics.current_leader.unwrap_or(0),
            term: metrics.current_term,
            applied_index: metrics.last_applied.as_ref().map_or(0, |id| id.index),
        }))
    }

    async fn add_standby(
        &self,
        request: Request<AddStandbyRequest>,
    ) -> Result<Response<AddStandbyResponse>, Status> {
        on_leader!(self, request, AddStandby)
    }

    async fn promote(
        &self,
        request: Request<PromoteRequest>,
    ) -> Result<Response<PromoteResponse>, Status> {
        on_leader!(self, request, Promote)
    }

    async fn demote(
        &self,
        request: Request<DemoteRequest>,
    ) -> Result<Response<DemoteResponse>, Status> {
        on_leader!(self, request, Demote)
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        on_leader!(self, request, RemoveNode)
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        on_leader!(self, request, TransferLeader)
    }

    async fn revoke_certificate(
        &self,
        request: Request<RevokeCertificateRequest>,
    ) -> Result<Response<RevokeCertificateResponse>, Status> {
        let fingerprint: [u8; 32] = request
            .get_ref()
            .fingerprint
            .as_slice()
            .try_into()
            .map_err(|_| {
                ServiceError::BadField(format!(
                    "fingerprint: expected the 32-byte SHA-256 of a certificate, got {} bytes",
                    request.get_ref().fingerprint.len()
                ))
            })?;
        let (_, log_index) = self
            .replica
            .propose_accepted(RevokeCertificate { fingerprint }.into())
            .await?;
        tracing::info!(
            fingerprint = %data_encoding::HEXLOWER.encode(&fingerprint),
            log_index,
            "certificate revoked"
        );
        Ok(Response::new(RevokeCertificateResponse { log_index }))
    }

    async fn set_namespace_acl(
        &self,
        request: Request<SetNamespaceAclRequest>,
    ) -> Result<Response<SetNamespaceAclResponse>, Status> {
        let request = request.into_inner();
        let proto = request.acl.ok_or_else(|| {
            ServiceError::BadField("acl is missing (it names the namespace)".into())
        })?;
        vesper_proto::validate::namespace(&proto.namespace).map_err(ServiceError::from)?;
        let acl = if request.clear {
            None
        } else {
            Some(NamespaceAcl::from_proto(&proto).map_err(ServiceError::from)?)
        };
        let op: crate::command::Op = SetNamespaceAcl {
            namespace: proto.namespace.clone(),
            acl,
        }
        .into();
        tracing::info!(op = ?op, "namespace acl");
        let (_, log_index) = self.replica.propose_accepted(op).await?;
        Ok(Response::new(SetNamespaceAclResponse { log_index }))
    }

    async fn list_namespace_acls(
        &self,
        _request: Request<ListNamespaceAclsRequest>,
    ) -> Result<Response<ListNamespaceAclsResponse>, Status> {
        let applied_index = self
            .replica
            .read_barrier(vesper_proto::v1::ReadConsistency::Linearizable)
            .await?;
        let reader = self.replica.reader().clone();
        let acls = crate::store::blocking(move || crate::store::records::acls(reader.db()))
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(ListNamespaceAclsResponse {
            acls: acls
                .into_iter()
                .map(|(namespace, acl)| acl.to_proto(namespace))
                .collect(),
            applied_index,
        }))
    }
}
