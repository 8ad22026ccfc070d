//! Presence and messaging for leaves.
//!
//! ```text
//!  sends to one recipient (one, or a batch) on S ─ look up recipient presence (local replica): its sessions
//!     ├─ attached here ───────────────> push into its sessions, wait for an ack ─────┐  (every host at once;
//!     ├─ attached on S2 ─ DeliverCall on S2's stream ─> push, wait for an ack ───────┤─> delivered  one ack
//!     │                                                                              │   of each message will do)
//!     └─ offline, or not acknowledged ─ MailboxPut (Raft), per message ──────────────┴─> queued
//!  attach ─ PresenceAttach (Raft) ─> welcome ─> drain mailbox in order ─> MailboxAck (Raft)
//!  stream ends without goodbye ─ wait the grace period ─> PresenceDetach (removes that session only)
//! ```
//!
//! Payloads never go through Raft except while they wait in a mailbox.

use std::sync::Arc;

use vesper_proto::v1::{
    Message, Presence, PresenceSession, PresenceStatus as WireStatus, SendMessageRequest,
};
use vesper_proto::{validate, PeerId};

use crate::command::{
    MailboxAck, MailboxPut, Op, PeerKey, PresenceEntry, PresenceStatus, Rejection, Response,
    StoredMessage, TraceContext,
};
use crate::error::ServiceError;
use crate::leaf::state::LeafState;
use crate::metrics::MessagePath;
use crate::raft::propose::now_ms;
use crate::store::{mailbox, presence};

/// Longest message id, in bytes.
pub const MAX_MESSAGE_ID_LEN: usize = 64;
/// Longest presence note, in bytes.
pub const MAX_NOTE_LEN: usize = 256;

/// Whether a message reached the recipient's library or waits in its mailbox.
pub enum Fate {
    Delivered,
    Queued,
}

pub fn wire_status(status: PresenceStatus) -> WireStatus {
    match status {
        PresenceStatus::Offline => WireStatus::Offline,
        PresenceStatus::Online => WireStatus::Online,
        PresenceStatus::Away => WireStatus::Away,
        PresenceStatus::Busy => WireStatus::Busy,
    }
}

/// Converts a stored presence to its wire form.
pub fn presence_of(context: &LeafState, peer: &PeerKey, entry: PresenceEntry) -> Presence {
    let leaf_addr = |host: u64| {
        context
            .replica
            .member_info(host)
            .map(|node| node.leaf_addr)
            .unwrap_or_default()
    };
    let sessions: Vec<PresenceSession> = entry
        .sessions
        .iter()
        .map(|attached| PresenceSession {
            host_node_id: attached.host,
            host_leaf_addr: leaf_addr(attached.host),
            attached_at_ms: attached.attached_at_ms,
        })
        .collect();
    let newest = sessions.last();
    Presence {
        peer_id: PeerId::from_public_key_bytes(peer)
            .map(|peer| peer.to_string())
            .unwrap_or_default(),
        status: wire_status(entry.status) as i32,
        note: entry.note,
        host_node_id: newest.map_or(0, |session| session.host_node_id),
        host_leaf_addr: newest
            .map(|session| session.host_leaf_addr.clone())
            .unwrap_or_default(),
        candidates: entry.candidates,
        nat_class: entry.nat_class,
        changed_at_ms: entry.changed_at_ms,
        attributes: entry.attributes.into_iter().collect(),
        sessions,
    }
}

fn stored(message: &Message, from: &PeerId) -> StoredMessage {
    StoredMessage {
        id: message.id.clone(),
        from: *from.as_bytes(),
        kind: message.kind.clone(),
        payload: message.payload.clone(),
        sent_at_ms: message.sent_at_ms,
    }
}

/// Checks a send from session `session` of `from` (rate, recipient, id, kind, payload) and carries it out.
/// The unary `SendMessage` call; sends on the session stream go through [`check`] and [`send_all`] in batches.
pub async fn send_checked(
    context: &LeafState,
    from: PeerId,
    session: u64,
    request: SendMessageRequest,
) -> Result<Fate, tonic::Status> {
    let origin = Origin::now(from, session);
    let (to, message) = check(context, &origin, request)?;
    let fate = send_all(context, &origin.peer, &to, vec![message])
        .await
        .pop();
    Ok(fate.expect("one fate per message")?)
}

/// Where the sends of one frame come from, worked out once for all of them.
pub struct Origin {
    pub peer: PeerId,
    /// `peer` as text, as each message carries it.
    text: String,
    session: u64,
    /// When the super peer took the frame, stamped on each message.
    at_ms: u64,
}

impl Origin {
    /// Sends of session `session` of `peer`, taken now.
    pub fn now(peer: PeerId, session: u64) -> Self {
        Self {
            text: peer.to_string(),
            peer,
            session,
            at_ms: now_ms(),
        }
    }
}

/// Checks one send from `origin` (rate, recipient, id, kind, payload): the recipient and the message as it will
/// be delivered.
pub fn check(
    context: &LeafState,
    origin: &Origin,
    request: SendMessageRequest,
) -> Result<(PeerId, Message), tonic::Status> {
    let checked = check_send(context, origin, request);
    if checked.is_err() {
        context.message_metrics.routed(MessagePath::Refused);
    }
    checked
}

fn check_send(
    context: &LeafState,
    origin: &Origin,
    request: SendMessageRequest,
) -> Result<(PeerId, Message), tonic::Status> {
    let config = &context.config;
    if !context.sessions.take_send(
        origin.session,
        config.send_rate_per_second,
        config.send_burst,
    ) {
        return Err(ServiceError::RateLimited(format!(
            "send rate limit: {} messages per second per session (bursts of {}); slow down and retry",
            config.send_rate_per_second, config.send_burst
        ))
        .into());
    }
    let to: PeerId = request
        .to
        .parse()
        .map_err(|error| ServiceError::BadField(format!("to: {error}")))?;
    if request.id.is_empty() || request.id.len() > MAX_MESSAGE_ID_LEN {
        return Err(ServiceError::BadField(format!(
            "message id must be 1-{MAX_MESSAGE_ID_LEN} bytes, got {}",
            request.id.len()
        ))
        .into());
    }
    validate::kind(&request.kind).map_err(ServiceError::from)?;
    validate::message_payload(&config.limits, &request.payload).map_err(ServiceError::from)?;
    let mut message = Message {
        id: request.id,
        from: origin.text.clone(),
        kind: request.kind,
        payload: request.payload,
        sent_at_ms: origin.at_ms,
        from_mailbox: false,
        delivery_id: 0,
        traceparent: String::new(),
        tracestate: String::new(),
    };
    if !request.traceparent.is_empty() {
        // The sender's super peer took the message: the next hops are children of this span.
        let span = tracing::info_span!(
            "vesper.route",
            otel.kind = "consumer",
            messaging.system = "vesper",
            messaging.operation.type = "process",
            messaging.message.id = %message.id,
        );
        vesper_proto::trace::adopt(&span, &request.traceparent, &request.tracestate);
        vesper_proto::trace::write(&span, &mut message.traceparent, &mut message.tracestate);
    }
    Ok((to, message))
}

/// Delivers `messages` from `from` to `to`, in order: directly, pushed together, when `to` is attached
/// somewhere; each one that was not acknowledged goes into its mailbox. One fate per message.
pub async fn send_all(
    context: &LeafState,
    from: &PeerId,
    to: &PeerId,
    messages: Vec<Message>,
) -> Vec<Result<Fate, ServiceError>> {
    let count = messages.len();
    let started = std::time::Instant::now();
    let entry = match presence::get(context.replica.reader().db(), to.as_bytes()) {
        Ok(entry) => entry,
        Err(error) => {
            // The mailbox path reads presence again and reports its error for each message.
            tracing::warn!(%error, "cannot read the recipient's presence");
            None
        }
    };
    let mut path = MessagePath::Remote;
    let delivered = match entry.filter(|entry| entry.status != PresenceStatus::Offline) {
        Some(entry) => {
            let hosts = entry.hosts();
            if hosts.first() == context.replica.node_id().as_ref() {
                path = MessagePath::Local;
            }
            context
                .router
                .deliver_any(&hosts, to, messages.clone())
                .await
        }
        None => Vec::new(),
    };
    let delivered_after = started.elapsed().as_secs_f64();
    let metrics = &context.message_metrics;
    let mut fates = Vec::with_capacity(count);
    for (index, message) in messages.into_iter().enumerate() {
        fates.push(if delivered.get(index).copied().unwrap_or(false) {
            metrics.routed(path);
            metrics.delivered(delivered_after);
            Ok(Fate::Delivered)
        } else {
            let queued = queue(context, from, to, &message).await;
            metrics.routed(if queued.is_ok() {
                MessagePath::Mailbox
            } else {
                MessagePath::Refused
            });
            if matches!(
                queued,
                Err(ServiceError::Rejected(Rejection::MailboxFull { .. }))
            ) {
                metrics.mailbox_full();
            }
            queued
        });
    }
    fates
}

/// Puts `message` into `to`'s mailbox (a retry of a message already there is not queued twice).
async fn queue(
    context: &LeafState,
    from: &PeerId,
    to: &PeerId,
    message: &Message,
) -> Result<Fate, ServiceError> {
    // The quota (and a retry of a message already queued) is checked on this replica first, so a full mailbox
    // refuses without a Raft round; apply checks again in log order.
    let message_trace = (message.traceparent.clone(), message.tracestate.clone());
    let message = stored(message, from);
    let quota = context.config.mailbox_quota;
    let queued = mailbox::items(context.replica.reader().db(), to.as_bytes(), now_ms())?;
    if mailbox::admits(
        queued.iter().map(|(_, item)| &item.message),
        &message,
        quota,
    )? {
        return Ok(Fate::Queued);
    }
    let op = MailboxPut {
        to: *to.as_bytes(),
        message,
        expires_at_ms: now_ms().saturating_add(
            u64::try_from(context.config.mailbox_ttl.as_millis()).unwrap_or(u64::MAX),
        ),
        quota,
    };
    // A sampled message keeps its trace in the mailbox: the put carries the context the route hop gave it.
    let trace = TraceContext::from_fields(&message_trace.0, &message_trace.1);
    if let (Response::Expired(count), _) = context
        .replica
        .propose_accepted(Op::from(op).traced(trace))
        .await?
    {
        context.message_metrics.mailbox_expired(count);
    }
    // The recipient may have attached (and drained its mailbox) while this message was being queued:
    // if it is online now, have its super peer drain again, so the message does not wait for the next
    // attach. A double drain is harmless: the library delivers each message id once.
    let now = presence::get(context.replica.reader().db(), to.as_bytes())?;
    if let Some(entry) = now.filter(|entry| entry.status != PresenceStatus::Offline) {
        // One drain, on the newest session's host: draining on every host would push each message twice.
        context.router.drain(entry.newest_host(), to).await;
    }
    Ok(Fate::Queued)
}

/// Pushes `peer`'s mailbox into its new session, in order, and removes what was acknowledged. Messages go out
/// in batches (up to `MAX_BATCH_MESSAGES` and about `MAX_BATCH_BYTES` each, at least one message); the next
/// batch goes once every message of this one was acknowledged, and the drain stops at the first one that was not
/// (the messages after it stay queued, and the library drops any it already has when they come again).
pub async fn drain_mailbox(context: &LeafState, peer: PeerId) -> Result<usize, ServiceError> {
    // The attach that started this session is applied on the leader; read at least that far here.
    context
        .replica
        .read_barrier(vesper_proto::v1::ReadConsistency::Linearizable)
        .await?;
    let (items, expired) =
        mailbox::items_and_expired(context.replica.reader().db(), peer.as_bytes(), now_ms())?;
    // Messages whose time to live passed while the peer was away are removed, not delivered.
    let count = expired.len() as u64;
    if remove_from_mailbox(context, &peer, expired).await? {
        context.message_metrics.mailbox_expired(count);
    }
    let mut items = items.into_iter().peekable();
    let mut delivered_count = 0;
    while items.peek().is_some() {
        let mut sequences = Vec::new();
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some((_, item)) = items.peek() {
            let size =
                item.message.payload.len() + item.message.id.len() + item.message.kind.len() + 128;
            if !batch.is_empty()
                && (batch.len() == validate::MAX_BATCH_MESSAGES
                    || bytes + size > validate::MAX_BATCH_BYTES)
            {
                break;
            }
            let (sequence, item) = items.next().expect("peeked");
            bytes += size;
            sequences.push(sequence);
            // A sampled message's trace goes on from where it was queued: the session's push is its next hop.
            let (traceparent, tracestate) = item
                .trace
                .map(|trace| (trace.traceparent, trace.tracestate))
                .unwrap_or_default();
            batch.push(Message {
                id: item.message.id,
                from: PeerId::from_public_key_bytes(&item.message.from)
                    .map(|peer| peer.to_string())
                    .unwrap_or_default(),
                kind: item.message.kind,
                payload: item.message.payload,
                sent_at_ms: item.message.sent_at_ms,
                from_mailbox: true,
                delivery_id: 0,
                traceparent,
                tracestate,
            });
        }
        let count = batch.len();
        let delivered = context.router.deliver_here(&peer, batch).await;
        let in_order = delivered.iter().take_while(|delivered| **delivered).count();
        let acked: Vec<u64> = sequences.into_iter().take(in_order).collect();
        // Removed batch by batch, as soon as the leaf acknowledged them: a leaf that leaves in the middle of a
        // long drain gets only what it did not acknowledge again. The session waits for this before it ends.
        remove_from_mailbox(context, &peer, acked).await?;
        delivered_count += in_order;
        if in_order < count {
            break;
        }
    }
    Ok(delivered_count)
}

/// Removes the items `sequences` from `peer`'s mailbox (one Raft write); false when there was none to remove.
async fn remove_from_mailbox(
    context: &LeafState,
    peer: &PeerId,
    sequences: Vec<u64>,
) -> Result<bool, ServiceError> {
    if sequences.is_empty() {
        return Ok(false);
    }
    let ack = MailboxAck {
        to: *peer.as_bytes(),
        sequences,
    };
    context.replica.propose(ack.into()).await?;
    Ok(true)
}

/// Mailbox drains running at once on this node, at most; more requests wait in the router's queue.
pub const MAX_CONCURRENT_DRAINS: usize = 64;

/// Runs the mailbox drains asked of this node (a message was queued while its recipient re-attached here), a
/// peer at a time: a request for a peer whose drain is running starts one more after it, no more. Ends at
/// shutdown, after the drains it started (each bounded by the delivery timeout per batch).
pub async fn run_drains(
    context: Arc<LeafState>,
    mut requests: crate::router::DrainRequests,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use std::collections::HashMap;
    let mut running = tokio::task::JoinSet::new();
    // Peers being drained, and whether another drain was asked for meanwhile.
    let mut draining: HashMap<PeerId, bool> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            request = requests.recv(), if running.len() < MAX_CONCURRENT_DRAINS => {
                let Some(peer) = request else { break };
                if let Some(again) = draining.get_mut(&peer) {
                    *again = true;
                    continue;
                }
                draining.insert(peer, false);
                running.spawn(drain_logged(context.clone(), peer));
            }
            Some(done) = running.join_next(), if !running.is_empty() => {
                let Ok(peer) = done else { continue };
                if draining.remove(&peer) == Some(true) {
                    draining.insert(peer, false);
                    running.spawn(drain_logged(context.clone(), peer));
                }
            }
        }
    }
    while running.join_next().await.is_some() {}
}

async fn drain_logged(context: Arc<LeafState>, peer: PeerId) -> PeerId {
    if let Err(error) = drain_mailbox(&context, peer).await {
        tracing::debug!(%error, "mailbox drain on request failed");
    }
    peer
}
