//! This node's replica of the virtual super peer, as the services use it: propose a command (forwarded to the
//! leader when needed), make a read safe to serve here, and see the member view.
//!
//! A [`Replica`] is a narrow, cheap-to-clone handle. Raft starts after the node's listeners (once the node has
//! joined or been adopted), so until then every call that needs it answers [`ServiceError::NotInCluster`].

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use openraft::async_runtime::WatchReceiver;
use vesper_proto::v1::{Member, MemberRole, ReadConsistency};

use crate::command::{NodeInfo, Op, Response};
use crate::error::ServiceError;
use crate::metrics::{ProposalResult, RaftCounters};
use crate::raft::forward::Forwarder;
use crate::raft::network::ClusterClients;
use crate::raft::propose;
use crate::raft::VesperRaft;
use crate::store::nodes::{read_leaf_loads, read_node_certificates, read_relay_loads, read_zones};
use crate::store::state_machine::StateReader;

/// Handle on this node's replica; cheap to clone.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<Inner>,
}

struct Inner {
    raft: OnceLock<VesperRaft>,
    forwarder: Forwarder,
    clients: ClusterClients,
    reader: StateReader,
    counters: RaftCounters,
}

impl Replica {
    /// A replica whose Raft instance is set later ([`Replica::set_raft`]).
    pub fn new(
        reader: StateReader,
        clients: ClusterClients,
        forwarder: Forwarder,
        counters: RaftCounters,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                raft: OnceLock::new(),
                forwarder,
                clients,
                reader,
                counters,
            }),
        }
    }

    /// Sets the Raft instance once the node belongs to a cluster; gives it back if one was set already.
    pub fn set_raft(&self, raft: VesperRaft) -> Result<(), VesperRaft> {
        self.inner.raft.set(raft)
    }

    /// The Raft handle, once the node belongs to a cluster.
    pub fn raft(&self) -> Result<&VesperRaft, ServiceError> {
        self.inner.raft.get().ok_or(ServiceError::NotInCluster)
    }

    /// This node's id, once it belongs to a cluster.
    pub fn node_id(&self) -> Option<u64> {
        self.inner.raft.get().map(|raft| *raft.node_id())
    }

    /// Reads of the local state machine (any consistency the caller has already made safe).
    pub fn reader(&self) -> &StateReader {
        &self.inner.reader
    }

    /// Proposes `op` from this node (forwarded to the leader when needed).
    pub async fn propose(&self, op: Op) -> Result<(Response, u64), ServiceError> {
        let outcome = propose::propose(self.raft()?, &self.inner.forwarder, op).await;
        self.inner.counters.proposal(match &outcome {
            Ok((Response::Rejected(_), _)) => ProposalResult::Rejected,
            Ok(_) => ProposalResult::Applied,
            Err(_) => ProposalResult::Failed,
        });
        outcome
    }

    /// Like [`Replica::propose`], with a command the state machine refused turned into its error, so callers
    /// handle only the responses they expect.
    pub async fn propose_accepted(&self, op: Op) -> Result<(Response, u64), ServiceError> {
        match self.propose(op).await? {
            (Response::Rejected(rejection), _) => Err(rejection.into()),
            accepted => Ok(accepted),
        }
    }

    /// Makes a read of the given consistency safe to serve locally; returns the applied index to report.
    pub async fn read_barrier(&self, consistency: ReadConsistency) -> Result<u64, ServiceError> {
        let raft = self.raft()?;
        match consistency {
            ReadConsistency::Stale => Ok(propose::applied_index(raft)),
            ReadConsistency::Linearizable => {
                propose::linearizable_barrier(raft, &self.inner.clients).await
            }
        }
    }

    /// Addresses of member `node_id`, from the Raft membership.
    pub fn member_info(&self, node_id: u64) -> Option<NodeInfo> {
        let raft = self.inner.raft.get()?;
        let metrics = raft.metrics().borrow_watched().clone();
        metrics
            .membership_config
            .membership()
            .get_node(&node_id)
            .cloned()
    }

    /// The member list: voters and standbys from the Raft membership, plus tombstones of removed nodes.
    pub fn members(&self) -> Result<Vec<Member>, ServiceError> {
        let raft = self.raft()?;
        let metrics = raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let reader = &self.inner.reader;
        let mut members = Vec::new();
        let loads = read_relay_loads(reader.db())?;
        let leaves = read_leaf_loads(reader.db())?;
        let zones = read_zones(reader.db())?;
        let certificates = read_node_certificates(reader.db())?;
        for (id, node) in membership.nodes() {
            let role = if voters.contains(id) {
                MemberRole::Voter
            } else {
                MemberRole::Standby
            };
            let mut entry = member(*id, node, role, metrics.current_leader == Some(*id));
            if let Some(load) = loads.get(id) {
                entry.relay_active = load.active;
                entry.relay_capacity = load.capacity;
            }
            entry.leaves = leaves.get(id).map_or(0, |load| load.sessions);
            entry.zone = zones.get(id).cloned().unwrap_or_default();
            entry.certificate = certificates
                .get(id)
                .map(|print| data_encoding::HEXLOWER.encode(print))
                .unwrap_or_default();
            members.push(entry);
        }
        for (id, entry) in reader.nodes()? {
            if entry.removed && membership.get_node(&id).is_none() {
                members.push(member(id, &entry.info, MemberRole::Removed, false));
            }
        }
        members.sort_by_key(|member| member.node_id);
        Ok(members)
    }
}

fn member(node_id: u64, node: &NodeInfo, role: MemberRole, is_leader: bool) -> Member {
    Member {
        node_id,
        peer_id: node.peer_id.clone(),
        cluster_addr: node.cluster_addr.clone(),
        leaf_addr: node.leaf_addr.clone(),
        admin_addr: node.admin_addr.clone(),
        role: role as i32,
        is_leader,
        relay_active: 0,
        relay_capacity: 0,
        zone: String::new(),
        certificate: String::new(),
        leaves: 0,
    }
}
