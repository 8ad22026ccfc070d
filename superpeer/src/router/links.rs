//! The sending side of deliveries between super peers on long-lived streams (`Cluster.DeliverStream`); the
//! receiving side is `cluster::deliver`.
//!
//! Each member keeps one stream per member it delivers to (not a unary call per message, with a new HTTP/2
//! stream, its headers and a server task each) and sends every delivery on it with an id; the receiver answers each as soon as the recipient acknowledged it
//! (or could not take it), so many deliveries are in flight on one stream and a slow recipient holds up no other.
//!
//! ```text
//!  Router::deliver --(to, messages, reply)--> link task --DeliverCall{id}--> receiver: one task per delivery
//!       ^                                         |                              | Router::deliver_here (acks)
//!       +---------- delivered? each --------------+<---- DeliverOutcome{id} -----+
//! ```
//!
//! A delivery carries the messages one session sent to one recipient together (up to
//! `validate::MAX_BATCH_MESSAGES`), pushed to the leaf in one frame; the outcome says, for each, whether the
//! leaf acknowledged it.
//!
//! A broken stream fails every delivery in flight on it (their senders queue the messages in the recipients'
//! mailboxes; a leaf drops a message id it already has), and the next delivery opens a new stream. Both sides
//! bound the deliveries in flight per stream; past the bound a delivery fails at once instead of waiting. The
//! sender always reads outcomes while it sends, so the receiver's bounded answer queue never stalls it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vesper_proto::v1::{DeliverCall, DeliverOutcome, Message};

use crate::raft::network::ClusterClients;

/// Messages in flight on one stream, on each side; past it a delivery fails at once (and is queued).
pub const MAX_IN_FLIGHT_PER_STREAM: usize = 8192;
/// Deliveries waiting for a link's task to take them. A caller past it waits (its send is held back).
pub const LINK_QUEUE: usize = 1024;

/// The recipient, its messages (sent together, in order), and where their outcomes go.
type Call = (String, Vec<Message>, oneshot::Sender<Vec<bool>>);

/// The sending side: one link (a stream and the task that owns it) per member delivered to; cheap to clone.
/// The link tasks belong to the node's tracker and end at its shutdown.
#[derive(Clone)]
pub struct Links {
    links: Arc<Mutex<HashMap<String, mpsc::Sender<Call>>>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Links {
    /// No links yet; their tasks go on `tasks` and stop when `shutdown` is cancelled.
    pub fn new(tasks: TaskTracker, shutdown: CancellationToken) -> Self {
        Self {
            links: Arc::default(),
            tasks,
            shutdown,
        }
    }

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
        // One deadline for waiting on a full link queue and for the outcome, as when the queue was unbounded.
        let deadline = tokio::time::Instant::now() + timeout;
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
                        let (link, calls) = mpsc::channel(LINK_QUEUE);
                        self.tasks.spawn(run_link(
                            client,
                            calls,
                            address.to_string(),
                            self.shutdown.clone(),
                        ));
                        links.insert(address.to_string(), link.clone());
                        link
                    }
                }
            };
            match tokio::time::timeout_at(deadline, link.send(call)).await {
                Ok(Ok(())) => {
                    sent = true;
                    break;
                }
                Ok(Err(mpsc::error::SendError(returned))) => call = returned,
                // The link stayed full until the deadline.
                Err(_) => return vec![false; count],
            }
        }
        // Not sent twice over: fail now rather than wait out the timeout.
        if !sent {
            return vec![false; count];
        }
        match tokio::time::timeout_at(deadline, outcome).await {
            Ok(Ok(delivered)) => delivered,
            _ => vec![false; count],
        }
    }
}

/// Owns one stream to one member: numbers the calls, sends them, and routes each outcome to its caller.
async fn run_link(
    mut client: crate::raft::network::ClusterClient,
    mut calls: mpsc::Receiver<Call>,
    address: String,
    shutdown: CancellationToken,
) {
    // Room for every call that may be in flight (each carries at least one message), so `try_send` below
    // never finds it full.
    let (out, out_stream) = mpsc::channel::<DeliverCall>(MAX_IN_FLIGHT_PER_STREAM);
    let opened = tokio::select! {
        _ = shutdown.cancelled() => return,
        opened = client.deliver_stream(ReceiverStream::new(out_stream)) => opened,
    };
    let mut outcomes = match opened {
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
            _ = shutdown.cancelled() => break,
            call = calls.recv() => {
                let Some((to, messages, reply)) = call else { break };
                if in_flight + messages.len() > MAX_IN_FLIGHT_PER_STREAM {
                    let _ = reply.send(vec![false; messages.len()]);
                    continue;
                }
                next_id += 1;
                in_flight += messages.len();
                pending.insert(next_id, (reply, messages.len()));
                let call = DeliverCall { id: next_id, to, messages };
                if out.try_send(call).is_err() {
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

/// What an outcome says for each of the `count` messages of its call: an entry missing (a malformed answer)
/// counts as not delivered, an extra one is ignored.
fn outcome_of(outcome: DeliverOutcome, count: usize) -> Vec<bool> {
    let mut each = outcome.each;
    each.resize(count, false);
    each
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_has_its_own_outcome_and_a_missing_one_is_not_delivered() {
        let outcome = |each: Vec<bool>| DeliverOutcome { id: 1, each };
        assert_eq!(
            outcome_of(outcome(vec![true, false, true]), 3),
            [true, false, true]
        );
        assert_eq!(outcome_of(outcome(vec![true]), 2), [true, false]);
        assert_eq!(outcome_of(outcome(vec![true, true]), 1), [true]);
        assert_eq!(outcome_of(outcome(Vec::new()), 1), [false]);
    }
}
