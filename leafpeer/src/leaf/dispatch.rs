//! Handing received messages to the app, off the session's read loop.
//!
//! ```text
//!  read loop ── dedup ──> split the frame by lane ─┬─ kind with a handler ──> that kind's lane (LANE_QUEUE runs):
//!                                                  │     one thread of the blocking pool, handlers one at a time
//!                                                  │     in arrival order ──> ack (the runs it took at once)
//!                                                  └─ no handler ──> the stream lane (LANE_QUEUE runs): a task
//!                                                        that puts them on messages() (waits while it is full)
//!                                                        ──> ack
//! ```
//!
//! A message is acknowledged, on the session that delivered it, once the app has it: its handler returned, or it
//! is on the stream. A slow handler holds up later messages of its kind only until its lane's queue is full; then
//! the read loop waits for it (keepalives, which have a task of their own, go on). A retry of a message the app
//! already has is acknowledged after the first copy, in the same lane, without reaching the app again.
//!
//! The read loop hands runs to the lanes itself. An earlier version put a dispatcher task between the two, and
//! that one more hand-off per frame cost about a tenth of the pipelined throughput to a handler.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use vesper_proto::v1::{client_frame, ClientFrame, Message, MessageAck, MessageAcks};

use super::shared::{Connection, Shared};

/// Runs (the messages of one frame for one lane, at most a batch: 64) waiting for a lane; past it the session's
/// read loop waits for that lane.
pub const LANE_QUEUE: usize = 64;

/// Received messages, each with false when the app already has it (a retry to acknowledge only).
type Received = Vec<(Message, bool)>;

/// Messages of one frame for one lane.
pub struct Run {
    /// The session that delivered them, which their acknowledgements go back on.
    connection: Arc<Connection>,
    messages: Received,
}

/// Where received messages go: a lane per kind with a handler, and the stream lane for the rest.
pub struct Lanes {
    by_kind: Mutex<HashMap<String, mpsc::Sender<Run>>>,
    stream: mpsc::Sender<Run>,
}

impl Lanes {
    /// Lanes whose stream lane is fed by `stream` (the receiver goes to [`run_stream_lane`]).
    pub fn new(stream: mpsc::Sender<Run>) -> Self {
        Self {
            by_kind: Default::default(),
            stream,
        }
    }
}

/// Hands the messages of one frame to their lanes, in order within each lane, waiting while a lane is full.
/// False when the leaf stopped.
pub async fn hand_over(
    shared: &Arc<Shared>,
    lanes: &Lanes,
    connection: &Arc<Connection>,
    messages: Received,
) -> bool {
    // Usually one lane per frame: a run per lane, in the order the lanes first appear.
    let mut runs: Vec<(mpsc::Sender<Run>, Received)> = Vec::new();
    shared
        .metrics
        .received(messages.iter().filter(|(_, first)| *first).count());
    {
        let mut by_kind = lanes.by_kind.lock().expect("lanes lock");
        for (mut message, first) in messages {
            if !message.traceparent.is_empty() {
                // The last hop of the message's trace: it reached this library. The app's handler may continue
                // the trace from the message's (rewritten) fields.
                let span = tracing::info_span!(
                    "vesper.receive",
                    otel.kind = "consumer",
                    messaging.system = "vesper",
                    messaging.operation.type = "receive",
                    messaging.message.id = %message.id,
                    vesper.from_mailbox = message.from_mailbox,
                    vesper.retry = !first,
                );
                vesper_proto::trace::hop(&span, &mut message.traceparent, &mut message.tracestate);
            }
            // A retry goes to the lane of its kind if it has one, so that its ack follows the first copy's.
            let lane = match by_kind.get(&message.kind) {
                Some(lane) => lane,
                None if has_handler(shared, &message.kind) => {
                    let (sender, receiver) = mpsc::channel(LANE_QUEUE);
                    let lane_shared = shared.clone();
                    let kind = message.kind.clone();
                    // One thread per kind for as long as the leaf runs (a handler may block); it ends at the
                    // leaf's stop.
                    shared
                        .tasks
                        .spawn_blocking(move || run_lane(lane_shared, kind, receiver));
                    by_kind.entry(message.kind.clone()).or_insert(sender)
                }
                None => &lanes.stream,
            };
            match runs
                .iter_mut()
                .find(|(sender, _)| sender.same_channel(lane))
            {
                Some((_, run)) => run.push((message, first)),
                None => runs.push((lane.clone(), vec![(message, first)])),
            }
        }
    }
    for (lane, messages) in runs {
        let run = Run {
            connection: connection.clone(),
            messages,
        };
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return false,
            sent = lane.send(run) => if sent.is_err() { return false },
        }
    }
    true
}

fn has_handler(shared: &Shared, kind: &str) -> bool {
    shared
        .messaging
        .handlers
        .read()
        .expect("handlers lock poisoned")
        .contains_key(kind)
}

/// Puts the messages without a handler on the app's stream, in order, and acknowledges each run once it is on
/// the stream. Runs until the leaf stops.
pub async fn run_stream_lane(shared: Arc<Shared>, mut runs: mpsc::Receiver<Run>) {
    loop {
        let run = tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return,
            run = runs.recv() => match run {
                Some(run) => run,
                None => return,
            },
        };
        let mut delivery_ids = Vec::with_capacity(run.messages.len());
        for (message, first) in run.messages {
            delivery_ids.push(message.delivery_id);
            if first {
                // If the app dropped the stream, the message is acknowledged and dropped.
                tokio::select! {
                    biased;
                    _ = shared.stop.cancelled() => return,
                    _ = shared.messaging.inbox.send(message) => {}
                }
            }
        }
        let count = delivery_ids.len();
        acknowledge(&run.connection, delivery_ids).await;
        acknowledged(&shared, count);
    }
}

/// Runs `kind`'s handler on each message in turn, on its own thread of the blocking pool (a handler may block),
/// and acknowledges the messages it handled a few runs at a time: the runs that were waiting when it started, up
/// to a batch. A thread per kind rather than a blocking task per message: handing each message to another thread
/// cost more than most handlers (about a tenth of the throughput in `vesper-bench-messaging`).
fn run_lane(shared: Arc<Shared>, kind: String, mut runs: mpsc::Receiver<Run>) {
    let runtime = tokio::runtime::Handle::current();
    loop {
        // This thread is not a runtime worker: it may wait here, and it wakes at the leaf's stop.
        let first = runtime.block_on(async {
            tokio::select! {
                biased;
                _ = shared.stop.cancelled() => None,
                run = runs.recv() => run,
            }
        });
        let Some(first) = first else { return };
        let mut taken = first.messages.len();
        let mut batch = vec![first];
        while taken < vesper_proto::validate::MAX_BATCH_MESSAGES {
            match runs.try_recv() {
                Ok(more) => {
                    taken += more.messages.len();
                    batch.push(more);
                }
                Err(_) => break,
            }
        }
        // Looked up per batch: `on_message` may have replaced it (a lane exists only for a kind with a handler).
        let handler = shared
            .messaging
            .handlers
            .read()
            .expect("handlers lock poisoned")
            .get(&kind)
            .cloned();
        // Acknowledgements of the batch, by the session that delivered them (in order; usually one session).
        let mut acks: Vec<(Arc<Connection>, Vec<u64>)> = Vec::new();
        for run in batch {
            let ids = match acks.last_mut() {
                Some((connection, ids)) if Arc::ptr_eq(connection, &run.connection) => ids,
                _ => {
                    acks.push((run.connection, Vec::with_capacity(run.messages.len())));
                    &mut acks.last_mut().expect("just pushed").1
                }
            };
            for (message, first) in run.messages {
                if shared.stop.is_cancelled() {
                    return;
                }
                ids.push(message.delivery_id);
                if let (true, Some(handler)) = (first, &handler) {
                    if std::panic::catch_unwind(AssertUnwindSafe(|| handler(message))).is_err() {
                        // The app had the message; a panicking handler does not make the sender retry it forever.
                        tracing::warn!(%kind, "a message handler panicked");
                    }
                }
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
