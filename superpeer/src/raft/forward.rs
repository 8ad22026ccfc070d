//! Batching of writes forwarded to the leader.
//!
//! A member that is not the leader sends the commands it must forward through one task that packs everything
//! queued into one `Cluster.Propose` call (up to [`MAX_BATCH`] commands), with up to [`MAX_IN_FLIGHT`] calls
//! outstanding. Under load one RPC carries many writes, which is what keeps forwarding as cheap per write as
//! proposing on the leader; with a single writer it adds nothing, because a call goes out as soon as one is free.
//!
//! ```text
//!  propose() --(command, oneshot)--> queue --> forwarder task --batch--> leader Cluster.Propose
//!      ^                                                                         |
//!      +------------------------- outcome per command --------------------------+
//! ```

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use vesper_proto::v1::{ProposeOutcome, ProposeRequest};

use super::codec;
use super::network::ClusterClients;
use crate::command::{Command, NodeInfo, Response};
use crate::error::{ServiceError, LEADER_HINT_METADATA_KEY};

/// Most commands in one forwarded call.
pub const MAX_BATCH: usize = 256;
/// Forwarded calls outstanding at once; more queue up and join later batches.
pub const MAX_IN_FLIGHT: usize = 4;
/// Commands waiting to be forwarded before proposers wait for room (back-pressure).
const QUEUE: usize = 4096;
/// Deadline of one forwarded call.
const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

type Reply = oneshot::Sender<Result<(Response, u64), ServiceError>>;

struct Item {
    leader: NodeInfo,
    command: Command,
    reply: Reply,
}

/// Handle on the forwarder task; cheap to clone.
#[derive(Clone)]
pub struct Forwarder {
    queue: mpsc::Sender<Item>,
}

impl Forwarder {
    /// Starts the forwarder task; it ends when `shutdown` fires or every handle is gone.
    pub fn spawn(
        clients: ClusterClients,
        shutdown: CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE);
        tasks.spawn(run(clients, receiver, shutdown));
        Self { queue }
    }

    /// Forwards `command` to `leader` and waits for its outcome.
    pub async fn forward(
        &self,
        leader: NodeInfo,
        command: Command,
    ) -> Result<(Response, u64), ServiceError> {
        let (reply, outcome) = oneshot::channel();
        self.queue
            .send(Item {
                leader,
                command,
                reply,
            })
            .await
            .map_err(|_| ServiceError::Raft("the node is shutting down".into()))?;
        outcome
            .await
            .map_err(|_| ServiceError::Raft("the node is shutting down".into()))?
    }
}

async fn run(
    clients: ClusterClients,
    mut receiver: mpsc::Receiver<Item>,
    shutdown: CancellationToken,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // Calls in flight; bounded by the semaphore, aborted if the forwarder stops.
    let mut calls = JoinSet::new();
    // A command for another leader than the batch being packed starts the next batch.
    let mut carried: Option<Item> = None;
    loop {
        // Wait for room first, so commands keep queueing (and batching) while every call is busy.
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            permit = in_flight.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        while calls.try_join_next().is_some() {}
        let first = match carried.take() {
            Some(item) => item,
            None => tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                item = receiver.recv() => match item {
                    Some(item) => item,
                    None => return,
                },
            },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(item) if item.leader == batch[0].leader => batch.push(item),
                Ok(item) => {
                    carried = Some(item);
                    break;
                }
                Err(_) => break,
            }
        }
        calls.spawn(send(clients.clone(), batch, permit));
    }
}

/// Sends one batch and answers each of its commands.
async fn send(
    clients: ClusterClients,
    batch: Vec<Item>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let leader = batch[0].leader.cluster_addr.clone();
    let mut commands = Vec::with_capacity(batch.len());
    for item in &batch {
        match codec::encode("command", &item.command) {
            Ok(bytes) => commands.push(bytes),
            Err(status) => {
                answer_all(batch, |_| {
                    Err(ServiceError::Codec(status.message().to_string()))
                });
                return;
            }
        }
    }
    // A batch holding sampled commands gets one client span: a child of the first one's trace, linked to each.
    let traced: Vec<_> = batch
        .iter()
        .filter_map(|item| item.command.op.trace())
        .collect();
    let span = match traced.first() {
        Some(first) => {
            let span = tracing::info_span!(
                "vesper.forward",
                otel.kind = "client",
                otel.name = "vesper.v1.Cluster/Propose",
                rpc.system = "grpc",
                rpc.service = "vesper.v1.Cluster",
                rpc.method = "Propose",
                vesper.batch.size = batch.len(),
            );
            first.adopt(&span);
            for context in &traced {
                vesper_proto::trace::link(&span, &context.traceparent, &context.tracestate);
            }
            span
        }
        None => tracing::Span::none(),
    };
    let result = async {
        let mut client = clients.client(&leader)?;
        let mut request = tonic::Request::new(ProposeRequest {
            encoding: codec::ENCODING,
            commands,
        });
        request.set_timeout(FORWARD_TIMEOUT);
        client.propose(request).await
    }
    .instrument(span)
    .await;
    match result {
        Ok(reply) => {
            let reply = reply.into_inner();
            if reply.outcomes.len() != batch.len() {
                let message = format!(
                    "leader answered {} outcomes for {} commands",
                    reply.outcomes.len(),
                    batch.len()
                );
                answer_all(batch, |_| Err(ServiceError::Raft(message.as_str().into())));
                return;
            }
            for (item, outcome) in batch.into_iter().zip(reply.outcomes) {
                let _ = item
                    .reply
                    .send(outcome_result(&leader, reply.encoding, outcome));
            }
        }
        // The connection broke after the commands were sent: they may have been committed, so a retry could
        // apply them twice. Say so instead of guessing.
        Err(status) if matches!(status.code(), tonic::Code::Unknown | tonic::Code::Cancelled) => {
            answer_all(batch, |_| {
                Err(ServiceError::OutcomeUnknown {
                    leader: leader.clone(),
                    reason: status.message().to_string(),
                })
            });
        }
        Err(status) => answer_all(batch, |_| {
            Err(ServiceError::Peer {
                peer: leader.clone(),
                status: status.clone(),
            })
        }),
    }
}

fn answer_all(batch: Vec<Item>, outcome: impl Fn(&Item) -> Result<(Response, u64), ServiceError>) {
    for item in batch {
        let result = outcome(&item);
        let _ = item.reply.send(result);
    }
}

fn outcome_result(
    leader: &str,
    encoding: u32,
    outcome: ProposeOutcome,
) -> Result<(Response, u64), ServiceError> {
    if outcome.error_code == 0 {
        let response =
            codec::decode("response", encoding, &outcome.response).map_err(|status| {
                ServiceError::Peer {
                    peer: leader.to_string(),
                    status,
                }
            })?;
        return Ok((response, outcome.applied_index));
    }
    let mut status = crate::error::status_from_wire(outcome.error_code, outcome.error_message);
    if let Ok(hint) = outcome.leader_hint.parse() {
        if !outcome.leader_hint.is_empty() {
            status.metadata_mut().insert(LEADER_HINT_METADATA_KEY, hint);
        }
    }
    Err(ServiceError::Peer {
        peer: leader.to_string(),
        status,
    })
}

/// The outcome message for one command, from what proposing it locally gave.
pub fn outcome_of(
    result: Result<(Response, u64), ServiceError>,
) -> Result<ProposeOutcome, tonic::Status> {
    Ok(match result {
        Ok((response, applied_index)) => ProposeOutcome {
            response: codec::encode("response", &response)?,
            applied_index,
            ..Default::default()
        },
        Err(error) => {
            let leader_hint = match &error {
                ServiceError::NotLeader { leader_addr, .. } => leader_addr.clone(),
                _ => String::new(),
            };
            let status = error.into_status();
            ProposeOutcome {
                error_code: status.code() as i32,
                error_message: status.message().to_string(),
                leader_hint,
                ..Default::default()
            }
        }
    })
}
