//! Deliveries between super peers on long-lived streams (`Cluster.DeliverStream`).
//!
//! A message for a leaf attached to another super peer used to be one unary `Cluster.Deliver` call: a new HTTP/2
//! stream, its headers and a server task per message. Now each member keeps one stream per member it delivers to
//! and sends every delivery on it with an id; the receiver answers each as soon as the recipient acknowledged it
//! (or could not take it), so many deliveries are in flight on one stream and a slow recipient holds up no other.
//!
//! ```text
//!  send_all --(to, messages, reply)--> link task --DeliverCall{id}--> receiver: one task per delivery
//!       ^                                  |                                 | sessions.deliver_all (waits for acks)
//!       +---------- delivered? each -------+<------- DeliverOutcome{id} -----+
//! ```
//!
//! A delivery carries the messages one session sent to one recipient together (up to
//! `validate::MAX_BATCH_MESSAGES`: the first in `message`, the rest in `more`), pushed to the leaf in one frame;
//! the outcome says, for each, whether the leaf acknowledged it. A member from before batches reads only
//! `message` and answers only `delivered`, so during a rolling upgrade the rest of a batch goes to the mailbox
//! instead of being lost or merged.
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
use vesper_proto::validate;

use crate::node::Context;
use crate::raft::network::ClusterClients;

/// Messages in flight on one stream, on each side; past it a delivery fails at once (and is queued).
pub const MAX_IN_FLIGHT_PER_STREAM: usize = 8192;

/// The answer stream of `Cluster.DeliverStream`.
pub type OutcomeStream = Pin<Box<dyn Stream<Item = Result<DeliverOutcome, Status>> + Send>>;

/// The recipient, its messages (sent together, in order), and where their outcomes go.
type Call = (String, Vec<Message>, oneshot::Sender<Vec<bool>>);

/// The sending side: one link (a stream and the task that owns it) per member delivered to.
#[derive(Clone, Default)]
pub struct Links {
    links: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Call>>>>,
}

impl Links {
    /// Delivers `messages` to leaf `to` on the member at `address`, together and in order, and waits up to
    /// `timeout` for the outcomes: one entry per message, true when the leaf acknowledged it.
    pub async fn deliver(
        &self,
        clients: &ClusterClients,
        address: &str,
        to: String,
        messages: Vec<Message>,
        timeout: Duration,
    ) -> Vec<bool> {
        let count = messages.len();
        let (reply, outcome) = oneshot::channel();
        let mut call = (to, messages, reply);
        // A link whose stream broke has dropped its receiver: replace it once and try again.
        let mut sent = false;
        for _ in 0..2 {
            let link = {
                let mut links = self.links.lock().expect("delivery links lock poisoned");
                match links.get(address) {
                    Some(link) if !link.is_closed() => link.clone(),
                    _ => {
                        let Ok(client) = clients.client(address) else {
                            return vec![false; count];
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
        if !sent {
            return vec![false; count];
        }
        match tokio::time::timeout(timeout, outcome).await {
            Ok(Ok(delivered)) => delivered,
            _ => vec![false; count],
        }
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
    // Calls waiting for their outcome, with how many messages each carries.
    let mut pending: HashMap<u64, (oneshot::Sender<Vec<bool>>, usize)> = HashMap::new();
    let mut in_flight = 0usize;
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            call = calls.recv() => {
                let Some((to, messages, reply)) = call else { break };
                if in_flight + messages.len() > MAX_IN_FLIGHT_PER_STREAM {
                    let _ = reply.send(vec![false; messages.len()]);
                    continue;
                }
                next_id += 1;
                in_flight += messages.len();
                pending.insert(next_id, (reply, messages.len()));
                let mut messages = messages.into_iter();
                let call = DeliverCall { id: next_id, to, message: messages.next(), more: messages.collect() };
                if out.send(call).is_err() {
                    break;
                }
            }
            outcome = outcomes.message() => match outcome {
                Ok(Some(outcome)) => {
                    if let Some((reply, count)) = pending.remove(&outcome.id) {
                        in_flight -= count;
                        let _ = reply.send(outcome_of(outcome, count));
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
/// A call with no message or more than [`validate::MAX_BATCH_MESSAGES`] is answered "not delivered" for each.
pub fn serve(
    context: Arc<Context>,
    mut calls: Streaming<DeliverCall>,
    caller: [u8; 32],
) -> OutcomeStream {
    // Bounded: a member that stops reading its outcomes stalls its own stream (the tasks wait to answer, then
    // this loop stops reading calls), and holds no more than this much memory here.
    let (outcomes, stream) = mpsc::channel(MAX_IN_FLIGHT_PER_STREAM);
    tokio::spawn(async move {
        // Each task returns how many messages it carried.
        let mut running = JoinSet::<usize>::new();
        let mut in_flight = 0usize;
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
                    let messages: Vec<Message> = call.message.into_iter().chain(call.more).collect();
                    let count = messages.len();
                    if count == 0
                        || count > validate::MAX_BATCH_MESSAGES
                        || in_flight + count > MAX_IN_FLIGHT_PER_STREAM
                    {
                        let refused = DeliverOutcome { id: call.id, delivered: false, each: vec![false; count] };
                        if outcomes.send(Ok(refused)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    in_flight += count;
                    let (context, outcomes) = (context.clone(), outcomes.clone());
                    running.spawn(async move {
                        let each = deliver_here(&context, &call.to, messages).await;
                        let delivered = each.iter().all(|delivered| *delivered);
                        let _ = outcomes.send(Ok(DeliverOutcome { id: call.id, delivered, each })).await;
                        count
                    });
                }
                Some(done) = running.join_next(), if !running.is_empty() => {
                    in_flight -= done.unwrap_or(0);
                }
            }
        }
        // Let the deliveries already started finish (each is bounded by the delivery timeout).
        while running.join_next().await.is_some() {}
    });
    Box::pin(ReceiverStream::new(stream))
}

/// What an outcome says for each of the `count` messages of its call. A member from before batches answers
/// `delivered` for the first message alone (it never saw the others).
fn outcome_of(outcome: DeliverOutcome, count: usize) -> Vec<bool> {
    let mut each = if outcome.each.is_empty() {
        vec![outcome.delivered]
    } else {
        outcome.each
    };
    // Anything missing counts as not delivered.
    each.resize(count, false);
    each
}

/// Delivers to a leaf attached here, one entry per message: false when it is not attached, the recipient is
/// malformed, or it did not acknowledge in time.
async fn deliver_here(context: &Context, to: &str, messages: Vec<Message>) -> Vec<bool> {
    let count = messages.len();
    let Ok(to) = to.parse::<vesper_proto::PeerId>() else {
        return vec![false; count];
    };
    context
        .sessions
        .deliver_all(&to, messages, crate::leaf::messaging::DELIVERY_TIMEOUT)
        .await
        .unwrap_or_else(|_| vec![false; count])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_from_a_member_before_batches_speaks_for_the_first_message_alone() {
        let old = |delivered| DeliverOutcome {
            id: 1,
            delivered,
            each: Vec::new(),
        };
        assert_eq!(outcome_of(old(true), 3), [true, false, false]);
        assert_eq!(outcome_of(old(false), 1), [false]);
        let new = DeliverOutcome {
            id: 1,
            delivered: false,
            each: vec![true, false, true],
        };
        assert_eq!(outcome_of(new, 3), [true, false, true]);
        let short = DeliverOutcome {
            id: 1,
            delivered: true,
            each: vec![true],
        };
        assert_eq!(
            outcome_of(short, 2),
            [true, false],
            "missing entries count as not delivered"
        );
    }
}
