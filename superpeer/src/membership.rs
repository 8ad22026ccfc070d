//! Membership changes, carried out on the leader.
//!
//! Adding a node is two steps: a Raft write allocates its node id (ids are never reused: the node table keeps
//! tombstones), then openraft adds it as a learner. Promotion, demotion and removal are openraft membership
//! changes (joint consensus). Every function here refuses with a clear error instead of guessing: promote only
//! standbys, demote only voters (never the last one), remove only standbys.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::ChangeMembers;
use vesper_proto::v1::membership_call::Call;
use vesper_proto::v1::membership_reply::Reply;
use vesper_proto::v1::{
    AddStandbyResponse, AdoptRequest, DemoteResponse, DescribeRequest, Member, MemberRole,
    MembershipCall, PromoteResponse, RemoveNodeResponse, TransferLeaderResponse,
};

use crate::command::{
    NodeInfo, PlacementTargets, RegisterNode, Response, SetPlacement, TombstoneNode,
};
use crate::error::ServiceError;
use crate::placement::controller::PlacementReports;
use crate::raft::network::ClusterClients;
use crate::raft::propose::{Backoff, PROPOSE_TIMEOUT};
use crate::replica::Replica;

/// What membership changes need: this node's replica and clients for the other members. The Admin service
/// (operator calls) and the Cluster service (calls forwarded to the leader, joins) both go through it.
#[derive(Clone)]
pub struct Membership {
    replica: Replica,
    clients: ClusterClients,
    /// The placement controller's last report, for `PlacementStatus` on the leader.
    placement: PlacementReports,
    /// Whether this node runs the controller when it leads.
    placement_enabled: bool,
}

impl Membership {
    pub fn new(
        replica: Replica,
        clients: ClusterClients,
        placement: PlacementReports,
        placement_enabled: bool,
    ) -> Self {
        Self {
            replica,
            clients,
            placement,
            placement_enabled,
        }
    }

    /// The member list (see [`Replica::members`]).
    pub fn members(&self) -> Result<Vec<Member>, ServiceError> {
        self.replica.members()
    }
}

/// Converts a node descriptor from the wire, checking that its peer id and addresses are well formed.
pub fn node_info(
    descriptor: Option<vesper_proto::v1::NodeDescriptor>,
) -> Result<NodeInfo, ServiceError> {
    let descriptor =
        descriptor.ok_or_else(|| ServiceError::BadField("node descriptor is missing".into()))?;
    descriptor
        .peer_id
        .parse::<vesper_proto::PeerId>()
        .map_err(|error| ServiceError::BadField(format!("peer id: {error}")))?;
    for (field, address) in [
        ("cluster_addr", &descriptor.cluster_addr),
        ("leaf_addr", &descriptor.leaf_addr),
        ("admin_addr", &descriptor.admin_addr),
    ] {
        if !address.contains(':') {
            return Err(ServiceError::BadField(format!(
                "{field} {address:?} must be host:port"
            )));
        }
    }
    Ok(NodeInfo {
        peer_id: descriptor.peer_id,
        cluster_addr: descriptor.cluster_addr,
        leaf_addr: descriptor.leaf_addr,
        admin_addr: descriptor.admin_addr,
    })
}

/// An idle node's answer to `Cluster.Adopt`, once it has started Raft under its new id (or failed to).
pub type AdoptReply = tokio::sync::oneshot::Sender<Result<(), ServiceError>>;
/// Adoption requests, taken by the node's start-up task while it waits to be added to a cluster.
pub type AdoptRequests = tokio::sync::mpsc::Receiver<(u64, AdoptReply)>;
/// Pending adoption requests; one is plenty, a second waits.
const ADOPT_QUEUE: usize = 1;

/// How the Cluster service hands an adoption (`vesperctl add-standby` on another member) to the start-up task of
/// this idle node.
#[derive(Clone)]
pub struct Adoption {
    requests: tokio::sync::mpsc::Sender<(u64, AdoptReply)>,
}

impl Adoption {
    /// The handle and the queue the start-up task reads; the task closes the queue once the node is a member.
    pub fn new() -> (Self, AdoptRequests) {
        let (requests, queue) = tokio::sync::mpsc::channel(ADOPT_QUEUE);
        (Self { requests }, queue)
    }

    /// Asks the start-up task to adopt `node_id` and waits until Raft runs under it.
    pub async fn adopt(&self, node_id: u64) -> Result<(), ServiceError> {
        let already = || ServiceError::Precondition("this node is already a cluster member".into());
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        self.requests
            .send((node_id, reply_tx))
            .await
            .map_err(|_| already())?;
        reply_rx.await.map_err(|_| already())?
    }
}

/// An operator's request to initialise (bootstrap) a node that belongs to no cluster yet.
pub type InitReply = tokio::sync::oneshot::Sender<vesper_proto::v1::InitializeResponse>;
/// Init requests, taken by the node's start-up task while it joins or waits to be added.
pub type InitRequests = tokio::sync::mpsc::Receiver<InitReply>;
/// Init requests waiting for the start-up task: a few operators at once at most.
const INIT_QUEUE: usize = 4;

/// The Admin service's handle on the start-up task, for `Admin.Initialize`.
#[derive(Clone)]
pub struct Initialization {
    requests: tokio::sync::mpsc::Sender<InitReply>,
}

impl Initialization {
    /// The handle and the queue the start-up task reads; the task closes the queue once the node is a member.
    pub fn new() -> (Self, InitRequests) {
        let (requests, queue) = tokio::sync::mpsc::channel(INIT_QUEUE);
        (Self { requests }, queue)
    }

    /// Asks the start-up task to bootstrap; `None` when the node no longer takes such requests (it belongs to
    /// a cluster already, or was started with --bootstrap).
    pub async fn initialize(&self) -> Option<vesper_proto::v1::InitializeResponse> {
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        self.requests.try_send(reply_tx).ok()?;
        reply_rx.await.ok()
    }
}

/// How long a leadership transfer may take before the call reports failure.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a removal waits for the node to get its tombstone (so its leaves hear to move) before it goes on.
const LEAVE_NOTICE_WAIT: Duration = Duration::from_secs(2);

/// Runs an operator's membership call on the leader: here when this node leads, otherwise forwarded to the
/// leader's Cluster service (`Cluster.Membership`), so operator calls never need the Admin port of another node
/// and that port can take operator certificates only. Waits (with backoff) while there is no leader.
pub async fn on_leader(context: &Membership, call: Call) -> Result<Reply, tonic::Status> {
    let raft = context.replica.raft()?;
    let deadline = Instant::now() + PROPOSE_TIMEOUT;
    let mut backoff = Backoff::default();
    loop {
        let metrics = raft.metrics().borrow_watched().clone();
        match metrics.current_leader {
            Some(id) if id == *raft.node_id() => return Ok(run_here(context, call).await?),
            Some(id) => {
                if let Some(node) = metrics.membership_config.membership().get_node(&id) {
                    let mut client = context.clients.peer(&node.cluster_addr)?;
                    // The leader's status reaches the operator unchanged: it carries the real reason.
                    let reply = client
                        .membership(MembershipCall { call: Some(call) })
                        .await?
                        .into_inner();
                    return reply.reply.ok_or_else(|| {
                        ServiceError::Internal(format!(
                            "the leader (node {id}) sent an empty membership reply"
                        ))
                        .into()
                    });
                }
            }
            None => {}
        }
        if Instant::now() >= deadline {
            return Err(ServiceError::NoLeader.into());
        }
        backoff.wait().await;
    }
}

/// Runs a membership call forwarded by another member, if this node leads. It does not forward again: a
/// leadership change while the call travelled is reported, and the operator retries.
pub async fn run_forwarded(context: &Membership, call: Call) -> Result<Reply, ServiceError> {
    let raft = context.replica.raft()?;
    let metrics = raft.metrics().borrow_watched().clone();
    if metrics.current_leader != Some(*raft.node_id()) {
        return Err(ServiceError::Unavailable(format!(
            "node {} does not lead any more (leader: {}); retry",
            raft.node_id(),
            metrics
                .current_leader
                .map_or_else(|| "none yet".to_string(), |id| format!("node {id}"))
        )));
    }
    run_here(context, call).await
}

/// Runs a membership call on this node, which leads.
async fn run_here(context: &Membership, call: Call) -> Result<Reply, ServiceError> {
    Ok(match call {
        Call::AddStandby(request) => {
            let cluster_addr = request.cluster_addr;
            if !cluster_addr.contains(':') {
                return Err(ServiceError::BadField(format!(
                    "cluster_addr {cluster_addr:?} must be host:port"
                )));
            }
            let (node_id, node) = add_standby(context, &cluster_addr).await?;
            Reply::AddStandby(AddStandbyResponse {
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
            })
        }
        Call::Promote(request) => {
            check_promote(context, request.node_id)?;
            let (voters, _) = current_sets(context)?;
            let earlier = pin_voter_target(context, voters.len() + 1).await?;
            if let Err(error) = promote(context, request.node_id).await {
                restore_targets(context, earlier).await;
                return Err(error);
            }
            Reply::Promote(PromoteResponse {
                members: context.replica.members()?,
            })
        }
        Call::Demote(request) => {
            check_demote(context, request.node_id)?;
            let (voters, _) = current_sets(context)?;
            let earlier = pin_voter_target(context, voters.len() - 1).await?;
            if let Err(error) = demote(context, request.node_id).await {
                restore_targets(context, earlier).await;
                return Err(error);
            }
            Reply::Demote(DemoteResponse {
                members: context.replica.members()?,
            })
        }
        Call::RemoveNode(request) => {
            remove(context, request.node_id).await?;
            Reply::RemoveNode(RemoveNodeResponse {
                members: context.replica.members()?,
            })
        }
        Call::TransferLeader(request) => Reply::TransferLeader(TransferLeaderResponse {
            leader_id: transfer_leader(context, request.node_id).await?,
        }),
        Call::PlacementStatus(_) => Reply::PlacementStatus(crate::placement::admin::status(
            &context.replica,
            &context.placement,
            context.placement_enabled,
        )?),
    })
}

/// A manual promote or demote tells the placement controller the voter count the operator wants, before the
/// change, so the controller keeps it instead of undoing it (`vesperctl placement set --voters auto` hands the
/// count back to automation). Returns the targets from before, for [`restore_targets`] if the change fails.
async fn pin_voter_target(
    context: &Membership,
    voters: usize,
) -> Result<PlacementTargets, ServiceError> {
    let earlier = crate::store::nodes::read_placement_targets(context.replica.reader().db())?;
    let voters = u32::try_from(voters).unwrap_or(u32::MAX);
    if earlier.voters != Some(voters) {
        let targets = PlacementTargets {
            voters: Some(voters),
            ..earlier.clone()
        };
        context
            .replica
            .propose_accepted(SetPlacement { targets }.into())
            .await?;
    }
    Ok(earlier)
}

/// Puts back the targets a failed manual change had pinned (logged if that fails too: the operator then sees
/// the pinned count in `placement status`).
async fn restore_targets(context: &Membership, earlier: PlacementTargets) {
    if let Err(error) = context
        .replica
        .propose_accepted(SetPlacement { targets: earlier }.into())
        .await
    {
        tracing::warn!(%error, "cannot restore the placement targets after a failed manual change");
    }
}

/// Registers `node` (allocating its node id) and adds it as a learner. Runs on the leader; from another member
/// the registration is forwarded by the proposer and `add_learner` reports the leader to retry on.
pub async fn register_standby(context: &Membership, node: NodeInfo) -> Result<u64, ServiceError> {
    let raft = context.replica.raft()?;
    let node_id = match context
        .replica
        .propose(RegisterNode { node: node.clone() }.into())
        .await?
    {
        (Response::NodeId(id), _) => id,
        (other, _) => {
            return Err(ServiceError::Raft(
                format!("register node answered {other:?}").into(),
            ))
        }
    };
    let deadline = Instant::now() + PROPOSE_TIMEOUT;
    let mut backoff = Backoff::default();
    loop {
        match raft.add_learner(node_id, node.clone(), false).await {
            Ok(_) => break,
            Err(error) => {
                if let Some(forward) = error.forward_to_leader() {
                    // Not the leader: ask the leader to do it (the join reached a follower).
                    if let (Some(_), Some(leader)) =
                        (forward.leader_id, forward.leader_node.as_ref())
                    {
                        let mut client = context.clients.peer(&leader.cluster_addr)?;
                        let request = vesper_proto::v1::JoinRequest {
                            node: Some(vesper_proto::v1::NodeDescriptor {
                                peer_id: node.peer_id.clone(),
                                cluster_addr: node.cluster_addr.clone(),
                                leaf_addr: node.leaf_addr.clone(),
                                admin_addr: node.admin_addr.clone(),
                            }),
                            // The member it reached checked the name.
                            cluster_name: String::new(),
                        };
                        let reply =
                            client
                                .join(request)
                                .await
                                .map_err(|status| ServiceError::Peer {
                                    peer: leader.cluster_addr.clone(),
                                    status,
                                })?;
                        return Ok(reply.into_inner().node_id);
                    }
                }
                if Instant::now() >= deadline {
                    return Err(error.into());
                }
                backoff.wait().await;
            }
        }
    }
    tracing::info!(node_id, peer_id = %node.peer_id, "added standby");
    Ok(node_id)
}

/// Adds the idle node at `cluster_addr` as a standby: describe it, register it, tell it its id, add it as a
/// learner.
pub async fn add_standby(
    context: &Membership,
    cluster_addr: &str,
) -> Result<(u64, NodeInfo), ServiceError> {
    let peer_error = |status| ServiceError::Peer {
        peer: cluster_addr.to_string(),
        status,
    };
    let mut client = context.clients.peer(cluster_addr)?;
    let described = client
        .describe(DescribeRequest {})
        .await
        .map_err(peer_error)?
        .into_inner();
    if described.node_id != 0 {
        return Err(ServiceError::Precondition(format!(
            "the node at {cluster_addr} already belongs to a cluster as node {}",
            described.node_id
        )));
    }
    let node = node_info(described.node)?;
    let node_id = match context
        .replica
        .propose(RegisterNode { node: node.clone() }.into())
        .await?
    {
        (Response::NodeId(id), _) => id,
        (other, _) => {
            return Err(ServiceError::Raft(
                format!("register node answered {other:?}").into(),
            ))
        }
    };
    client
        .adopt(AdoptRequest {
            node_id,
            peer_id: node.peer_id.clone(),
        })
        .await
        .map_err(peer_error)?;
    context
        .replica
        .raft()?
        .add_learner(node_id, node.clone(), false)
        .await
        .map_err(ServiceError::from)?;
    tracing::info!(node_id, peer_id = %node.peer_id, "adopted standby");
    Ok((node_id, node))
}

fn current_sets(
    context: &Membership,
) -> Result<(BTreeSet<u64>, BTreeMap<u64, NodeInfo>), ServiceError> {
    let raft = context.replica.raft()?;
    let metrics = raft.metrics().borrow_watched().clone();
    let membership = metrics.membership_config.membership();
    let voters = membership.voter_ids().collect();
    let nodes = membership
        .nodes()
        .map(|(id, node)| (*id, node.clone()))
        .collect();
    Ok((voters, nodes))
}

/// Refuses a promotion of anything but a standby.
fn check_promote(context: &Membership, node_id: u64) -> Result<(), ServiceError> {
    let (voters, nodes) = current_sets(context)?;
    if voters.contains(&node_id) {
        return Err(ServiceError::Precondition(format!(
            "node {node_id} is already a voter"
        )));
    }
    if !nodes.contains_key(&node_id) {
        return Err(ServiceError::NotFound(format!(
            "node {node_id} is not a standby of this cluster"
        )));
    }
    Ok(())
}

/// Refuses a demotion of anything but a voter, and of the last voter.
fn check_demote(context: &Membership, node_id: u64) -> Result<(), ServiceError> {
    let (voters, _) = current_sets(context)?;
    if !voters.contains(&node_id) {
        return Err(ServiceError::Precondition(format!(
            "node {node_id} is not a voter"
        )));
    }
    if voters.len() == 1 {
        return Err(ServiceError::Precondition(format!(
            "node {node_id} is the last voter; promote another node first"
        )));
    }
    Ok(())
}

/// Promotes standby `node_id` to voter.
pub async fn promote(context: &Membership, node_id: u64) -> Result<(), ServiceError> {
    check_promote(context, node_id)?;
    context
        .replica
        .raft()?
        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node_id])), true)
        .await
        .map_err(ServiceError::from)?;
    tracing::info!(node_id, "promoted to voter");
    Ok(())
}

/// Demotes voter `node_id` to standby.
pub async fn demote(context: &Membership, node_id: u64) -> Result<(), ServiceError> {
    check_demote(context, node_id)?;
    context
        .replica
        .raft()?
        .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([node_id])), true)
        .await
        .map_err(ServiceError::from)?;
    tracing::info!(node_id, "demoted to standby");
    Ok(())
}

/// Removes standby `node_id` from the group and tombstones its id.
pub async fn remove(context: &Membership, node_id: u64) -> Result<(), ServiceError> {
    let (voters, nodes) = current_sets(context)?;
    if voters.contains(&node_id) {
        return Err(ServiceError::Precondition(format!(
            "node {node_id} is a voter; demote it first (vesperctl demote {node_id})"
        )));
    }
    // The tombstone first, while the node still gets the log: applying its own tombstone, a live node tells
    // its leaves to move (`leaf::members`) before it is cut off. A removed node is never sent the entries
    // after its removal, so it could not learn it otherwise.
    context
        .replica
        .propose_accepted(TombstoneNode { node_id }.into())
        .await?;
    if nodes.contains_key(&node_id) {
        // Holding the tombstone is not enough: the node applies it only once it hears that it is committed,
        // and the append that carried it may have left before the commit. A second (idempotent) tombstone,
        // proposed after the first committed, is a fence: any append carrying it also carries a commit index
        // at or past the first, so once the node holds the fence it will apply its tombstone.
        let (_, index) = context
            .replica
            .propose_accepted(TombstoneNode { node_id }.into())
            .await?;
        let raft = context.replica.raft()?;
        let heard = raft
            .wait(Some(LEAVE_NOTICE_WAIT))
            .metrics(
                |metrics| {
                    metrics
                        .replication
                        .as_ref()
                        .and_then(|replication| replication.get(&node_id).cloned().flatten())
                        .is_some_and(|matched| matched.index >= index)
                },
                "the removed node to get its tombstone",
            )
            .await
            .is_ok();
        if !heard {
            tracing::info!(
                node_id,
                "the node did not get its tombstone in time (down?); removing it anyway"
            );
        }
        raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([node_id])), false)
            .await
            .map_err(ServiceError::from)?;
    }
    tracing::info!(node_id, "removed node");
    Ok(())
}

/// Transfers leadership to voter `node_id` and waits until it leads.
pub async fn transfer_leader(context: &Membership, node_id: u64) -> Result<u64, ServiceError> {
    let raft = context.replica.raft()?;
    let (voters, _) = current_sets(context)?;
    if !voters.contains(&node_id) {
        return Err(ServiceError::Precondition(format!(
            "node {node_id} is not a voter; only voters can lead"
        )));
    }
    if *raft.node_id() == node_id {
        return Ok(node_id);
    }
    raft.trigger()
        .transfer_leader(node_id)
        .await
        .map_err(ServiceError::from)?;
    raft.wait(Some(TRANSFER_TIMEOUT))
        .current_leader(node_id, "leadership transfer")
        .await
        .map_err(|_| ServiceError::Timeout("the new leader to take over"))?;
    tracing::info!(node_id, "leadership transferred");
    Ok(node_id)
}
