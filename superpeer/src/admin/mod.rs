//! The Admin service: what `vesperctl` calls. Read calls answer from the local replica; membership changes run on
//! the leader (a follower forwards the call to the leader's Admin service).

pub mod membership;

use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;
use tonic::{Request, Response, Status};
use vesper_proto::v1::admin_server::Admin;
use vesper_proto::v1::{
    AddStandbyRequest, AddStandbyResponse, DemoteRequest, DemoteResponse, Member, MemberRole,
    MembersRequest, MembersResponse, PromoteRequest, PromoteResponse, RemoveNodeRequest,
    RemoveNodeResponse, RevokeCertificateRequest, RevokeCertificateResponse, StatusRequest,
    StatusResponse, TransferLeaderRequest, TransferLeaderResponse,
};
use vesper_proto::v1::{
    ListNamespaceAclsRequest, ListNamespaceAclsResponse, SetNamespaceAclRequest,
    SetNamespaceAclResponse,
};

use vesper_proto::acl::NamespaceAcl;

use crate::error::ServiceError;
use crate::node::Context;
use membership::Leader;

pub struct AdminService {
    context: Arc<Context>,
}

impl AdminService {
    pub fn new(context: Arc<Context>) -> Self {
        Self { context }
    }
}

fn forwarded(status: Status) -> Status {
    // Keep the leader's code and message: the operator sees the real reason.
    status
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let context = &self.context;
        let Ok(raft) = context.raft() else {
            // An idle node still answers, so operators can see it is waiting to be added.
            return Ok(Response::new(StatusResponse {
                peer_id: context.me.peer_id.clone(),
                raft_state: "idle".into(),
                ..Default::default()
            }));
        };
        let metrics = raft.metrics().borrow_watched().clone();
        let index = |log_id: &Option<crate::raft::LogId>| log_id.as_ref().map_or(0, |id| id.index);
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
            members: context.members()?,
        }))
    }

    async fn members(
        &self,
        _request: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        let raft = self.context.raft()?;
        let metrics = raft.metrics().borrow_watched().clone();
        Ok(Response::new(MembersResponse {
            members: self.context.members()?,
            leader_id: metrics.current_leader.unwrap_or(0),
            term: metrics.current_term,
            applied_index: metrics.last_applied.as_ref().map_or(0, |id| id.index),
        }))
    }

    async fn add_standby(
        &self,
        request: Request<AddStandbyRequest>,
    ) -> Result<Response<AddStandbyResponse>, Status> {
        let cluster_addr = request.get_ref().cluster_addr.clone();
        if !cluster_addr.contains(':') {
            return Err(ServiceError::BadField(format!(
                "cluster_addr {cluster_addr:?} must be host:port"
            ))
            .into());
        }
        match membership::leader(&self.context).await? {
            Leader::Remote(mut client) => client
                .add_standby(request.into_inner())
                .await
                .map_err(forwarded),
            Leader::Local => {
                let (node_id, node) = membership::add_standby(&self.context, &cluster_addr).await?;
                Ok(Response::new(AddStandbyResponse {
                    member: Some(Member {
                        node_id,
                        peer_id: node.peer_id,
                        cluster_addr: node.cluster_addr,
                        leaf_addr: node.leaf_addr,
                        admin_addr: node.admin_addr,
                        role: MemberRole::Standby as i32,
                        is_leader: false,
                        ..Member::default()
                    }),
                }))
            }
        }
    }

    async fn promote(
        &self,
        request: Request<PromoteRequest>,
    ) -> Result<Response<PromoteResponse>, Status> {
        match membership::leader(&self.context).await? {
            Leader::Remote(mut client) => client
                .promote(request.into_inner())
                .await
                .map_err(forwarded),
            Leader::Local => {
                membership::promote(&self.context, request.get_ref().node_id).await?;
                Ok(Response::new(PromoteResponse {
                    members: self.context.members()?,
                }))
            }
        }
    }

    async fn demote(
        &self,
        request: Request<DemoteRequest>,
    ) -> Result<Response<DemoteResponse>, Status> {
        match membership::leader(&self.context).await? {
            Leader::Remote(mut client) => {
                client.demote(request.into_inner()).await.map_err(forwarded)
            }
            Leader::Local => {
                membership::demote(&self.context, request.get_ref().node_id).await?;
                Ok(Response::new(DemoteResponse {
                    members: self.context.members()?,
                }))
            }
        }
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        match membership::leader(&self.context).await? {
            Leader::Remote(mut client) => client
                .remove_node(request.into_inner())
                .await
                .map_err(forwarded),
            Leader::Local => {
                membership::remove(&self.context, request.get_ref().node_id).await?;
                Ok(Response::new(RemoveNodeResponse {
                    members: self.context.members()?,
                }))
            }
        }
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        match membership::leader(&self.context).await? {
            Leader::Remote(mut client) => client
                .transfer_leader(request.into_inner())
                .await
                .map_err(forwarded),
            Leader::Local => {
                let leader_id =
                    membership::transfer_leader(&self.context, request.get_ref().node_id).await?;
                Ok(Response::new(TransferLeaderResponse { leader_id }))
            }
        }
    }

    async fn revoke_certificate(
        &self,
        request: Request<RevokeCertificateRequest>,
    ) -> Result<Response<RevokeCertificateResponse>, Status> {
        // Operators only: super peers reach the Admin port to forward membership calls, not to revoke.
        crate::roles::require(&request, &[crate::roles::Role::Operator])?;
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
            .context
            .propose_accepted(crate::raft::command::Op::RevokeCertificate { fingerprint })
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
        crate::roles::require(&request, &[crate::roles::Role::Operator])?;
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
        let op = crate::raft::command::Op::SetNamespaceAcl {
            namespace: proto.namespace.clone(),
            acl,
        };
        tracing::info!(op = ?op, "namespace acl");
        let (_, log_index) = self.context.propose_accepted(op).await?;
        Ok(Response::new(SetNamespaceAclResponse { log_index }))
    }

    async fn list_namespace_acls(
        &self,
        _request: Request<ListNamespaceAclsRequest>,
    ) -> Result<Response<ListNamespaceAclsResponse>, Status> {
        let applied_index = self
            .context
            .read_barrier(vesper_proto::v1::ReadConsistency::Linearizable)
            .await?;
        let reader = self.context.reader.clone();
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
