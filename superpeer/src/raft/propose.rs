//! Getting commands committed and reads made linearizable from any member.
//!
//! A member that is not the leader forwards a command to the leader's Cluster service (`Propose`), and asks the
//! leader for its read index (`ReadIndex`) before serving a linearizable read from its own replica. Retries go
//! through [`Backoff`] until [`PROPOSE_TIMEOUT`] while there is no leader or the leader hint is stale.

use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::raft::ReadPolicy;
use tracing::Instrument;
use vesper_proto::v1::ReadIndexRequest;

use super::forward::Forwarder;
use super::network::ClusterClients;
use super::VesperRaft;
use crate::command::{Command, NodeInfo, Op, Response, TraceContext};
use crate::error::ServiceError;

/// How long a write or a linearizable read may wait for a leader before failing with UNAVAILABLE.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one forwarded call to the leader.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Exponential backoff with jitter: 25 ms doubling to 800 ms, each wait drawn from [d/2, d].
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { next: first, max }
    }

    pub async fn wait(&mut self) {
        let millis = self.next.as_millis() as u64;
        let jittered = Duration::from_millis(millis / 2 + rand::random_range(0..=millis / 2));
        tokio::time::sleep(jittered).await;
        self.next = (self.next * 2).min(self.max);
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(25), Duration::from_millis(800))
    }
}

/// Milliseconds since the Unix epoch on this machine; stamped into commands by their proposer.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Index of the last entry applied to this replica.
pub fn applied_index(raft: &VesperRaft) -> u64 {
    raft.metrics()
        .borrow_watched()
        .last_applied
        .as_ref()
        .map_or(0, |log_id| log_id.index)
}

/// What a forward hint says about where the leader is.
fn leader_of(
    raft: &VesperRaft,
    leader_id: Option<u64>,
    leader_node: Option<&NodeInfo>,
) -> Result<NodeInfo, ServiceError> {
    match (leader_id, leader_node) {
        (Some(id), Some(node)) if id != *raft.node_id() => Ok(node.clone()),
        _ => Err(ServiceError::NoLeader),
    }
}

/// Proposes `op` and returns the state machine's response and the log index it was applied at. A traced `op`
/// gets a `vesper.propose` span, and the command carries that span's context, so the leader's commit and every
/// member's apply are its children.
pub async fn propose(
    raft: &VesperRaft,
    forwarder: &Forwarder,
    op: Op,
) -> Result<(Response, u64), ServiceError> {
    let (op, span) = match op {
        Op::Traced(mut traced) => {
            let span = tracing::info_span!(
                "vesper.propose",
                otel.kind = "internal",
                vesper.command = traced.op.kind(),
            );
            traced.context.adopt(&span);
            if let Some(context) = TraceContext::of(&span) {
                traced.context = context;
            }
            (Op::Traced(traced), span)
        }
        op => (op, tracing::Span::none()),
    };
    propose_command(
        raft,
        forwarder,
        Command {
            at_ms: now_ms(),
            op,
        },
    )
    .instrument(span)
    .await
}

async fn propose_command(
    raft: &VesperRaft,
    forwarder: &Forwarder,
    command: Command,
) -> Result<(Response, u64), ServiceError> {
    let deadline = Instant::now() + PROPOSE_TIMEOUT;
    let mut backoff = Backoff::default();
    loop {
        let attempt = match raft.client_write(command.clone()).await {
            Ok(written) => return Ok((written.data, written.log_id.index)),
            Err(error) => match error.forward_to_leader() {
                Some(forward) => {
                    match leader_of(raft, forward.leader_id, forward.leader_node.as_ref()) {
                        Ok(leader) => forwarder.forward(leader, command.clone()).await,
                        Err(no_leader) => Err(no_leader),
                    }
                }
                None => return Err(error.into()),
            },
        };
        match attempt {
            Ok(done) => return Ok(done),
            Err(error) if error.is_retriable() && Instant::now() < deadline => {
                tracing::debug!(%error, "propose: retrying");
                backoff.wait().await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// The error for a call that must run on the leader and reached another node: where the leader is, or that
/// there is none. None when the call failed otherwise (the caller reports openraft's error itself).
fn not_here(
    raft: &VesperRaft,
    forward: Option<&openraft::errors::ForwardToLeader<crate::raft_types::TypeConfig>>,
) -> Option<ServiceError> {
    let forward = forward?;
    Some(
        match leader_of(raft, forward.leader_id, forward.leader_node.as_ref()) {
            Ok(leader) => ServiceError::NotLeader {
                leader_id: forward.leader_id.unwrap_or_default(),
                leader_addr: leader.cluster_addr,
            },
            Err(no_leader) => no_leader,
        },
    )
}

/// Proposes on this node only (the Cluster service's `Propose`): never forwards again, so a stale hint cannot
/// make requests bounce between followers.
pub async fn propose_local(
    raft: &VesperRaft,
    command: Command,
) -> Result<(Response, u64), ServiceError> {
    match raft.client_write(command).await {
        Ok(written) => Ok((written.data, written.log_id.index)),
        Err(error) => {
            Err(not_here(raft, error.forward_to_leader()).unwrap_or_else(|| error.into()))
        }
    }
}

/// The leader's read index, if this node is the leader.
pub async fn local_read_index(raft: &VesperRaft) -> Result<u64, ServiceError> {
    match raft.get_read_log_id(ReadPolicy::ReadIndex).await {
        Ok((read_log_id, _applied)) => Ok(read_log_id.index()),
        Err(error) => {
            Err(not_here(raft, error.forward_to_leader()).unwrap_or_else(|| error.into()))
        }
    }
}

/// Waits until this replica can serve a linearizable read; returns the applied index to report.
pub async fn linearizable_barrier(
    raft: &VesperRaft,
    clients: &ClusterClients,
) -> Result<u64, ServiceError> {
    let deadline = Instant::now() + PROPOSE_TIMEOUT;
    let mut backoff = Backoff::default();
    let read_index = loop {
        let attempt = match local_read_index(raft).await {
            Ok(index) => Ok(index),
            Err(ServiceError::NotLeader { leader_addr, .. }) => {
                remote_read_index(clients, &leader_addr).await
            }
            Err(error) => Err(error),
        };
        match attempt {
            Ok(index) => break index,
            Err(error) if error.is_retriable() && Instant::now() < deadline => backoff.wait().await,
            Err(error) => return Err(error),
        }
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    raft.wait(Some(remaining.max(Duration::from_millis(100))))
        .applied_index_at_least(Some(read_index), "linearizable read")
        .await
        .map_err(|_| {
            ServiceError::Timeout("this replica to apply up to the leader's read index")
        })?;
    Ok(applied_index(raft))
}

async fn remote_read_index(
    clients: &ClusterClients,
    leader_addr: &str,
) -> Result<u64, ServiceError> {
    let peer_error = |status| ServiceError::Peer {
        peer: leader_addr.to_string(),
        status,
    };
    let mut client = clients.client(leader_addr).map_err(peer_error)?;
    let mut request = tonic::Request::new(ReadIndexRequest {});
    request.set_timeout(FORWARD_TIMEOUT);
    Ok(client
        .read_index(request)
        .await
        .map_err(peer_error)?
        .into_inner()
        .read_index)
}
