//! Handing received messages to the app, off the session's read loop.
//!
//! ```text
//!  read loop ── dedup ──> dispatch queue (DISPATCH_QUEUE frames) ──> dispatcher (one task per Leaf)
//!                                      ├─ kind with a handler ──> that kind's lane: one thread of the blocking
//!                                      │                          pool, handlers one at a time in arrival order
//!                                      │                          ──> ack (a run of handled messages at once)
//!                                      └─ no handler ──> the messages() stream (waits while it is full) ──> ack
//! ```
//!
//! A message is acknowledged, on the session that delivered it, once the app has it: its handler returned, or it
//! is on the stream. A slow handler holds up later messages of its kind only; the stream, other kinds, keepalives
//! and send results go on. A retry of a message the app already has is acknowledged after the first copy, in the
//! same lane, without reaching the app again.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tokio::sync::mpsc;
use vesper_proto::v1::{client_frame, ClientFrame, Message, MessageAck, MessageAcks};

use super::shared::{Arrival, Connection, Shared};
use super::Handler;

/// Frames of received messages waiting for the dispatcher; past it the read loop waits (keepalives do not).
pub const DISPATCH_QUEUE: usize = 64;
/// Runs of messages (each from one frame, at most a batch: 64) waiting for one kind's handler; past it the
/// dispatcher waits for that handler.
const LANE_QUEUE: usize = 64;

/// One message for a kind's lane.
struct LaneJob {
    /// None for a retry: acknowledged once the messages ahead of it were handled.
    handler: Option<Handler>,
    message: Message,
    connection: Arc<Connection>,
}

/// Runs until the leaf stops: takes arrivals in order and hands each message to its handler's lane or the stream.
pub async fn run(shared: Arc<Shared>, mut arrivals: mpsc::Receiver<Arrival>) {
    let mut lanes: HashMap<String, mpsc::Sender<Vec<LaneJob>>> = HashMap::new();
    loop {
        let arrival = tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return,
            arrival = arrivals.recv() => match arrival {
                Some(arrival) => arrival,
                None => return,
            },
        };
        // Acknowledged together once they are all on the stream.
        let mut streamed = Vec::new();
        // A frame's messages for one lane go to it as one run, handled and acknowledged together.
        let mut runs: Vec<(mpsc::Sender<Vec<LaneJob>>, Vec<LaneJob>)> = Vec::new();
        for (message, first) in arrival.messages {
            let handler = shared
                .messaging
                .handlers
                .read()
                .expect("handlers lock poisoned")
                .get(&message.kind)
                .cloned();
            // A retry goes to the lane of its kind if it has one, so that its ack follows the first copy's.
            let lane = match (&handler, lanes.get(&message.kind)) {
                (_, Some(lane)) => Some(lane.clone()),
                (Some(_), None) => {
                    let (sender, receiver) = mpsc::channel(LANE_QUEUE);
                    let lane_shared = shared.clone();
                    // One thread per kind for as long as the leaf runs (a handler may block); it ends when the
                    // dispatcher drops its sender, at the leaf's stop.
                    shared
                        .tasks
                        .spawn_blocking(move || run_lane(lane_shared, receiver));
                    lanes.insert(message.kind.clone(), sender.clone());
                    Some(sender)
                }
                (None, None) => None,
            };
            match lane {
                Some(lane) => {
                    let job = LaneJob {
                        handler: handler.filter(|_| first),
                        message,
                        connection: arrival.connection.clone(),
                    };
                    match runs
                        .iter_mut()
                        .find(|(sender, _)| sender.same_channel(&lane))
                    {
                        Some((_, run)) => run.push(job),
                        None => runs.push((lane, vec![job])),
                    }
                }
                None => {
                    streamed.push(message.delivery_id);
                    if first {
                        // If the app dropped the stream, the message is acknowledged and dropped.
                        tokio::select! {
                            biased;
                            _ = shared.stop.cancelled() => return,
                            _ = shared.messaging.inbox.send(message) => {}
                        }
                    }
                }
            }
        }
        for (lane, run) in runs {
            tokio::select! {
                biased;
                _ = shared.stop.cancelled() => return,
                sent = lane.send(run) => if sent.is_err() { return },
            }
        }
        if !streamed.is_empty() {
            let count = streamed.len();
            acknowledge(&arrival.connection, streamed).await;
            acknowledged(&shared, count);
        }
    }
}

/// Runs one kind's handler on each message in turn, on its own thread of the blocking pool (a handler may block),
/// and acknowledges the messages it handled a run at a time: the messages that were waiting when it started,
/// up to a batch. A thread per kind rather than a blocking task per message: handing each message to another
/// thread cost more than most handlers (about a tenth of the throughput in `vesper-bench-messaging`).
fn run_lane(shared: Arc<Shared>, mut runs: mpsc::Receiver<Vec<LaneJob>>) {
    while let Some(mut run) = runs.blocking_recv() {
        while run.len() < vesper_proto::validate::MAX_BATCH_MESSAGES {
            match runs.try_recv() {
                Ok(more) => run.extend(more),
                Err(_) => break,
            }
        }
        // Acknowledgements of the run, by the session that delivered them (in order; usually one session).
        let mut acks: Vec<(Arc<Connection>, Vec<u64>)> = Vec::new();
        for job in run {
            if shared.stop.is_cancelled() {
                return;
            }
            let delivery_id = job.message.delivery_id;
            if let Some(handler) = job.handler {
                let kind = job.message.kind.clone();
                let message = job.message;
                if std::panic::catch_unwind(AssertUnwindSafe(|| handler(message))).is_err() {
                    // The app had the message; a panicking handler does not make the sender retry it forever.
                    tracing::warn!(%kind, "a message handler panicked");
                }
            }
            match acks.last_mut() {
                Some((connection, ids)) if Arc::ptr_eq(connection, &job.connection) => {
                    ids.push(delivery_id)
                }
                _ => acks.push((job.connection, vec![delivery_id])),
            }
        }
        for (connection, delivery_ids) in acks {
            let count = delivery_ids.len();
            // This thread is not in the runtime: it may wait for room in the session's queue.
            let _ = connection.outbound.blocking_send(ClientFrame {
                frame: Some(ack_frame(delivery_ids)),
            });
            acknowledged(&shared, count);
        }
    }
}

/// The frame acknowledging `delivery_ids`.
fn ack_frame(delivery_ids: Vec<u64>) -> client_frame::Frame {
    match <[u64; 1]>::try_from(delivery_ids) {
        Ok([delivery_id]) => client_frame::Frame::MessageAck(MessageAck { delivery_id }),
        Err(delivery_ids) => client_frame::Frame::MessageAcks(MessageAcks { delivery_ids }),
    }
}

/// Sends the acknowledgement of `delivery_ids` on `connection`; nothing when that session is gone (the senders
/// retry, and the retries are acknowledged without reaching the app again).
pub async fn acknowledge(connection: &Connection, delivery_ids: Vec<u64>) {
    let _ = connection
        .outbound
        .send(ClientFrame {
            frame: Some(ack_frame(delivery_ids)),
        })
        .await;
}

/// Counts `count` messages as acknowledged (their frames are queued on the session, ahead of any goodbye).
fn acknowledged(shared: &Shared, count: usize) {
    shared
        .messaging
        .unacknowledged
        .send_modify(|unacknowledged| *unacknowledged = unacknowledged.saturating_sub(count));
}
