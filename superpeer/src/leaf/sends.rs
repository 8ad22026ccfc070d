//! The send pipeline of a session: sends that arrive together (a SendFrame, a SendBatch, the unary
//! SendMessage) are checked, held to the session's in-flight budget, grouped per recipient and answered per
//! recipient as soon as its sends are done.

use super::messaging;
use super::{LeafService, MAX_SENDS_IN_FLIGHT, MAX_SEND_BYTES_IN_FLIGHT};
use crate::error::ServiceError;
use crate::leaf::state::LeafState;
use crate::sessions;
use futures::StreamExt;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use vesper_proto::v1::{
    server_frame, SendFrame, SendMessageRequest, SendMessageResponse, SendResult, SendResults,
    ServerFrame,
};
use vesper_proto::{validate, PeerId};

/// What a session's sends hold at this super peer until they are answered, counted against
/// [`MAX_SENDS_IN_FLIGHT`] and [`MAX_SEND_BYTES_IN_FLIGHT`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct InFlight {
    sends: usize,
    payload_bytes: usize,
}

impl InFlight {
    /// Why one more send with `payload_bytes` of payload does not fit, if it does not.
    fn refusal(&self, payload_bytes: usize) -> Option<ServiceError> {
        if self.sends >= MAX_SENDS_IN_FLIGHT {
            Some(ServiceError::LimitReached(format!(
                "{MAX_SENDS_IN_FLIGHT} sends already in flight on this session"
            )))
        } else if self.payload_bytes + payload_bytes > MAX_SEND_BYTES_IN_FLIGHT {
            Some(ServiceError::LimitReached(format!(
                "a {payload_bytes}-byte payload would put more than {MAX_SEND_BYTES_IN_FLIGHT} bytes of payload \
                 in flight on this session ({} already are)",
                self.payload_bytes
            )))
        } else {
            None
        }
    }

    fn add(&mut self, payload_bytes: usize) {
        self.sends += 1;
        self.payload_bytes += payload_bytes;
    }

    pub(super) fn remove(&mut self, done: InFlight) {
        self.sends -= done.sends;
        self.payload_bytes -= done.payload_bytes;
    }
}

/// Starts the sends of one SendFrame or SendBatch as one task, within the session's limit of sends in flight;
/// a send over that limit, past the batch size or without a message is answered at once with its error. False
/// when the session's stream is gone.
pub(super) async fn start_sends(
    context: &Arc<LeafState>,
    peer: PeerId,
    session: u64,
    frames: Vec<SendFrame>,
    tx: &sessions::Outbound,
    sends: &mut tokio::task::JoinSet<InFlight>,
    in_flight: &mut InFlight,
) -> bool {
    let mut refused = Vec::new();
    let mut accepted = Vec::new();
    let mut taken = InFlight::default();
    for (index, frame) in frames.into_iter().enumerate() {
        let payload_bytes = frame.message.as_ref().map_or(0, |m| m.payload.len());
        let refusal = if index >= validate::MAX_BATCH_MESSAGES {
            Some(ServiceError::Malformed(format!(
                "a SendBatch holds at most {} sends",
                validate::MAX_BATCH_MESSAGES
            )))
        } else {
            in_flight.refusal(payload_bytes)
        };
        match (refusal, frame.message) {
            (None, Some(request)) => {
                in_flight.add(payload_bytes);
                taken.add(payload_bytes);
                accepted.push((frame.request_id, request));
            }
            (refusal, _) => {
                let status = refusal
                    .unwrap_or_else(|| {
                        ServiceError::Malformed("send frame without a message".into())
                    })
                    .into_status();
                refused.push(send_result(frame.request_id, Err(status)));
            }
        }
    }
    if !refused.is_empty() && tx.send(Ok(Box::new(results_frame(refused)))).await.is_err() {
        return false;
    }
    if accepted.is_empty() {
        return true;
    }
    let (context, tx) = (context.clone(), tx.clone());
    sends.spawn(async move {
        let run = std::panic::AssertUnwindSafe(run_sends(&context, peer, session, accepted, &tx));
        if futures::FutureExt::catch_unwind(run).await.is_err() {
            tracing::error!("a send task panicked; its sends are not answered");
        }
        taken
    });
    true
}

/// Checks and carries out sends that arrived together. Sends to the same recipient travel together, in order
/// (one push into its session, or one delivery to its super peer); the results for each recipient go back as
/// soon as its sends are done, so a slow recipient holds up no other.
async fn run_sends(
    context: &Arc<LeafState>,
    peer: PeerId,
    session: u64,
    requests: Vec<(u64, SendMessageRequest)>,
    tx: &sessions::Outbound,
) {
    let mut refused = Vec::new();
    let mut groups: Vec<(PeerId, Vec<u64>, Vec<vesper_proto::v1::Message>)> = Vec::new();
    let origin = messaging::Origin::now(peer, session);
    for (request_id, request) in requests {
        match messaging::check(context, &origin, request) {
            Err(status) => refused.push(send_result(request_id, Err(status))),
            Ok((to, message)) => match groups.iter_mut().find(|group| group.0 == to) {
                Some(group) => {
                    group.1.push(request_id);
                    group.2.push(message);
                }
                None => groups.push((to, vec![request_id], vec![message])),
            },
        }
    }
    if !refused.is_empty() && tx.send(Ok(Box::new(results_frame(refused)))).await.is_err() {
        return;
    }
    let mut running: futures::stream::FuturesUnordered<_> = groups
        .into_iter()
        .map(|(to, request_ids, messages)| async move {
            let fates = messaging::send_all(context, &peer, &to, messages).await;
            request_ids
                .into_iter()
                .zip(fates)
                .map(|(request_id, fate)| {
                    send_result(request_id, fate.map_err(ServiceError::into_status))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    while let Some(results) = running.next().await {
        if tx.send(Ok(Box::new(results_frame(results)))).await.is_err() {
            return;
        }
    }
}

/// One SendResult frame, or a SendResults frame for several.
fn results_frame(mut results: Vec<SendResult>) -> ServerFrame {
    let frame = if results.len() == 1 {
        server_frame::Frame::SendResult(results.pop().expect("one result"))
    } else {
        server_frame::Frame::SendResults(SendResults { results })
    };
    ServerFrame { frame: Some(frame) }
}

/// The SendResult for a pipelined send.
fn send_result(request_id: u64, outcome: Result<messaging::Fate, Status>) -> SendResult {
    match outcome {
        Ok(fate) => SendResult {
            request_id,
            delivered: matches!(fate, messaging::Fate::Delivered),
            queued: matches!(fate, messaging::Fate::Queued),
            ..Default::default()
        },
        Err(status) => SendResult {
            request_id,
            error_code: status.code() as i32,
            error_message: status.message().to_string(),
            ..Default::default()
        },
    }
}

/// `Leaf.SendMessage`.
pub(super) async fn send_message(
    service: &LeafService,
    request: Request<SendMessageRequest>,
) -> Result<Response<SendMessageResponse>, Status> {
    let (from, session) = service.session_of(&request)?;
    let fate =
        messaging::send_checked(&service.context, from, session, request.into_inner()).await?;
    Ok(Response::new(SendMessageResponse {
        delivered: matches!(fate, messaging::Fate::Delivered),
        queued: matches!(fate, messaging::Fate::Queued),
    }))
}
