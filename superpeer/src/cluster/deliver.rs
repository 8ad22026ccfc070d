//! The receiving side of deliveries between super peers (`Cluster.DeliverStream`): each delivery pushed into
//! the recipient's session here and answered when the leaf acknowledged it (or could not take it). The
//! sending side, and how the two meet, is `router::links`.

use std::pin::Pin;

use futures::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Status, Streaming};
use vesper_proto::v1::{DeliverCall, DeliverOutcome, Message};
use vesper_proto::validate;

use crate::router::links::MAX_IN_FLIGHT_PER_STREAM;
use crate::router::Router;
use crate::store::state_machine::StateReader;

/// The answer stream of `Cluster.DeliverStream`.
pub type OutcomeStream = Pin<Box<dyn Stream<Item = Result<DeliverOutcome, Status>> + Send>>;

/// What serving a delivery stream needs.
pub struct Serving {
    pub router: Router,
    /// For the revocation check of every call.
    pub reader: StateReader,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

/// The receiving side of one stream: runs each delivery as its own task and answers it when it ends. Every call
/// is checked against the revocations first, since the Cluster gate only saw the call that opened the stream.
/// A call with no message or more than [`validate::MAX_BATCH_MESSAGES`] is answered "not delivered" for each.
/// The stream's task belongs to the node's tracker; at shutdown it stops taking calls and lets the deliveries
/// already started finish (each is bounded by the delivery timeout).
pub fn serve(
    serving: Serving,
    mut calls: Streaming<DeliverCall>,
    caller: [u8; 32],
) -> OutcomeStream {
    let Serving {
        router,
        reader,
        tasks,
        shutdown,
    } = serving;
    // Bounded: a member that stops reading its outcomes stalls its own stream (the tasks wait to answer, then
    // this loop stops reading calls), and holds no more than this much memory here.
    let (outcomes, stream) = mpsc::channel(MAX_IN_FLIGHT_PER_STREAM);
    tasks.spawn(async move {
        // Each task returns how many messages it carried.
        let mut running = JoinSet::<usize>::new();
        let mut in_flight = 0usize;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                call = calls.message() => {
                    let call = match call {
                        Ok(Some(call)) => call,
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%status, "delivery stream from a member ended");
                            break;
                        }
                    };
                    if let Err(status) = crate::roles::require_unrevoked(&reader, &caller) {
                        let _ = outcomes.send(Err(status)).await;
                        break;
                    }
                    let messages: Vec<Message> = call.messages;
                    let count = messages.len();
                    if count == 0
                        || count > validate::MAX_BATCH_MESSAGES
                        || in_flight + count > MAX_IN_FLIGHT_PER_STREAM
                    {
                        let refused = DeliverOutcome { id: call.id, each: vec![false; count] };
                        if outcomes.send(Ok(refused)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    in_flight += count;
                    let (router, outcomes) = (router.clone(), outcomes.clone());
                    running.spawn(async move {
                        let each = match call.to.parse::<vesper_proto::PeerId>() {
                            Ok(to) => router.deliver_here(&to, messages).await,
                            Err(_) => vec![false; count],
                        };
                        let _ = outcomes.send(Ok(DeliverOutcome { id: call.id, each })).await;
                        count
                    });
                }
                Some(done) = running.join_next(), if !running.is_empty() => {
                    in_flight -= done.unwrap_or(0);
                }
            }
        }
        while running.join_next().await.is_some() {}
    });
    Box::pin(ReceiverStream::new(stream))
}
