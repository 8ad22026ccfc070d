//! Deliveries between super peers on long-lived streams (`Cluster.DeliverStream`).
//!
//! A message for a leaf attached to another super peer used to be one unary `Cluster.Deliver` call: a new HTTP/2
//! stream, its headers and a server task per message. Now each member keeps one stream per member it delivers to
//! and sends every delivery on it with an id; the receiver answers each as soon as the recipient acknowledged it
//! (or could not take it), so many deliveries are in flight on one stream and a slow recipient holds up no other.
//!
//! ```text
//!  send_checked --(to, message, reply)--> link task --DeliverCall{id}--> receiver: one task per delivery
//!       ^                                     |                                 | sessions.deliver (waits for the ack)
//!       +------------- delivered? ------------+<------- DeliverOutcome{id} -----+
//! ```
//!
//! A broken stream fails every delivery in flight on it (their senders queue the messages in the recipients'
//! mailboxes; a leaf drops a message id it already has), and the next delivery opens a new stream. Both sides
//! bound the deliveries in flight per stream; past the bound a delivery fails at once instead of waiting. The
//! sender always reads outcomes while it sends, so the receiver's bounded answer queue never stalls it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Status, Streaming};
use vesper_proto::v1::{DeliverCall, DeliverOutcome, Message};

use crate::node::Context;
use crate::raft::network::ClusterClients;

/// Deliveries in flight on one stream, on each side; past it a delivery fails at once (and is queued).
pub const MAX_IN_FLIGHT_PER_STREAM: usize = 8192;

/// The answer stream of `Cluster.DeliverStream`.
pub type OutcomeStream = Pin<Box<dyn Stream<Item = Result<DeliverOutcome, Status>> + Send>>;

type Call = (String, Message, oneshot::Sender<bool>);

/// The sending side: one link (a stream and the task that owns it) per member delivered to.
#[derive(Clone, Default)]
pub struct Links {
    links: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Call>>>>,
}

impl Links {
    /// Delivers `message` to leaf `to` on the member at `address` and waits up to `timeout` for the outcome:
    /// true when the leaf acknowledged it.
    pub async fn deliver(
        &self,
        clients: &ClusterClients,
        address: &str,
        to: String,
        message: Message,
        timeout: Duration,
    ) -> bool {
        let (reply, outcome) = oneshot::channel();
        let mut call = (to, message, reply);
        // A link whose stream broke has dropped its receiver: replace it once and try again.
        let mut sent = false;
        for _ in 0..2 {
            let link = {
                let mut links = self.links.lock().expect("delivery links lock poisoned");
                match links.get(address) {
                    Some(link) if !link.is_closed() => link.clone(),
                    _ => {
                        let Ok(client) = clients.client(address) else {
                            return false;
                        };
                        let (link, calls) = mpsc::unbounded_channel();
                        tokio::spawn(run_link(client, calls, address.to_string()));
                        links.insert(address.to_string(), link.clone());
                        link
                    }
                }
            };
            match link.send(call) {
                Ok(()) => {
                    sent = true;
                    break;
                }
                Err(mpsc::error::SendError(returned)) => call = returned,
            }
        }
        // Not sent twice over: fail now rather than wait out the timeout.
        sent && matches!(tokio::time::timeout(timeout, outcome).await, Ok(Ok(true)))
    }
}

/// Owns one stream to one member: numbers the calls, sends them, and routes each outcome to its caller.
async fn run_link(
    mut client: vesper_proto::v1::cluster_client::ClusterClient<tonic::transport::Channel>,
    mut calls: mpsc::UnboundedReceiver<Call>,
    address: String,
) {
    let (out, out_stream) = mpsc::unbounded_channel::<DeliverCall>();
    let mut outcomes = match client
        .deliver_stream(UnboundedReceiverStream::new(out_stream))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => {
            tracing::debug!(%address, %status, "cannot open a delivery stream");
            return;
        }
    };
    let mut pending: HashMap<u64, oneshot::Sender<bool>> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            call = calls.recv() => {
                let Some((to, message, reply)) = call else { break };
                if pending.len() >= MAX_IN_FLIGHT_PER_STREAM {
                    let _ = reply.send(false);
                    continue;
                }
                next_id += 1;
                pending.insert(next_id, reply);
                let call = DeliverCall { id: next_id, to, message: Some(message) };
                if out.send(call).is_err() {
                    break;
                }
            }
            outcome = outcomes.message() => match outcome {
                Ok(Some(outcome)) => {
                    if let Some(reply) = pending.remove(&outcome.id) {
                        let _ = reply.send(outcome.delivered);
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(%address, %status, in_flight = pending.len(), "delivery stream broke");
                    break;
                }
            }
        }
    }
    // Dropping `pending` fails every delivery still in flight; dropping `calls` makes the next one open a new
    // stream.
}

/// The receiving side of one stream: runs each delivery as its own task and answers it when it ends. Every call
/// is checked against the revocations first, since the Cluster gate only saw the call that opened the stream.
pub fn serve(
    context: Arc<Context>,
    mut calls: Streaming<DeliverCall>,
    caller: [u8; 32],
) -> OutcomeStream {
    // Bounded: a member that stops reading its outcomes stalls its own stream (the tasks wait to answer, then
    // this loop stops reading calls), and holds no more than this much memory here.
    let (outcomes, stream) = mpsc::channel(MAX_IN_FLIGHT_PER_STREAM);
    tokio::spawn(async move {
        let mut running = JoinSet::new();
        loop {
            tokio::select! {
                call = calls.message() => {
                    let call = match call {
                        Ok(Some(call)) => call,
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%status, "delivery stream from a member ended");
                            break;
                        }
                    };
                    if let Err(status) = crate::roles::require_unrevoked(&context.reader, &caller) {
                        let _ = outcomes.send(Err(status)).await;
                        break;
                    }
                    if running.len() >= MAX_IN_FLIGHT_PER_STREAM {
                        let refused = DeliverOutcome { id: call.id, delivered: false };
                        if outcomes.send(Ok(refused)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    let (context, outcomes) = (context.clone(), outcomes.clone());
                    running.spawn(async move {
                        let delivered = deliver_here(&context, &call.to, call.message).await;
                        let _ = outcomes.send(Ok(DeliverOutcome { id: call.id, delivered })).await;
                    });
                }
                Some(_) = running.join_next(), if !running.is_empty() => {}
            }
        }
        // Let the deliveries already started finish (each is bounded by the delivery timeout).
        while running.join_next().await.is_some() {}
    });
    Box::pin(ReceiverStream::new(stream))
}

/// Delivers to a leaf attached here; false when it is not attached, the call is malformed, or it did not
/// acknowledge in time.
async fn deliver_here(context: &Context, to: &str, message: Option<Message>) -> bool {
    let (Ok(to), Some(message)) = (to.parse::<vesper_proto::PeerId>(), message) else {
        return false;
    };
    context
        .sessions
        .deliver(&to, message, crate::leaf::messaging::DELIVERY_TIMEOUT)
        .await
        .is_ok()
}
