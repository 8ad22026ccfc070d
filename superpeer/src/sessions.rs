//! The sessions attached to this super peer: by token (to authorise unary calls) and by peer (to deliver
//! messages into the session stream).
//!
//! A token is 32 random bytes in hex, handed out in the Welcome frame and valid while the session stream lives:
//! the [`SessionGuard`] that the stream task holds removes it when the task ends, however it ends. A peer may
//! have several sessions here (and on other super peers): a message is pushed into each one that claims
//! presence and counts as delivered when one acknowledges it. A session whose presence the cluster no longer
//! lists is ended with a reason ([`SessionRegistry::end_unlisted`]), never left silently orphaned.

use crate::limits::TokenBucket;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use vesper_proto::v1::{
    server_frame, ConnectAnswer, ConnectOffer, Message, MessageBatch, PunchPlan, ServerFrame,
    SessionEndReason, SessionEnded,
};
use vesper_proto::PeerId;

/// Outbound frames of one session.
/// Frames for one session's stream. Boxed, so the channel's slots (allocated a block of 32 at a time) hold a
/// pointer and not a whole frame: that is 7 KiB less per idle session.
pub type Outbound = mpsc::Sender<Result<Box<ServerFrame>, Status>>;

/// Messages pushed into a session and not yet acknowledged, by the delivery id this super peer gave each one.
/// Not by message id: senders choose those, and two senders may pick the same one (by chance or on purpose).
#[derive(Default)]
struct Pending {
    /// The delivery id the next pushed message gets (starts at 1; 0 means "none" on the wire).
    next: u64,
    /// Each push waiting for its acknowledgement, with the (sender, message id) it carries.
    waiting: HashMap<u64, (oneshot::Sender<()>, MessageKey)>,
    /// Messages this session acknowledged lately, so that a sender's retry of one is not pushed again.
    recent: RecentAcks,
    /// Pushes this session acknowledged in all.
    acked: u64,
}

/// A message as its sender names it, (sender PeerId text, message id), as a 128-bit digest: two keyed
/// SipHash-1-3 values under keys drawn per process, so that a remembered message costs 16 bytes and no
/// allocation. A collision (two different messages with one digest within one session's last
/// [`RECENT_ACKS`]) has odds of about 2^-120 per lookup, and no sender can aim for one without the keys.
type MessageKey = u128;

/// The hashers of [`message_key`], keyed once per process.
fn key_hashers() -> &'static (std::hash::RandomState, std::hash::RandomState) {
    static HASHERS: std::sync::OnceLock<(std::hash::RandomState, std::hash::RandomState)> =
        std::sync::OnceLock::new();
    HASHERS.get_or_init(|| (std::hash::RandomState::new(), std::hash::RandomState::new()))
}

/// The digest of the message `id` from `from`.
fn message_key(from: &str, id: &str) -> MessageKey {
    use std::hash::BuildHasher;
    let (high, low) = key_hashers();
    let pair = (from, id);
    (u128::from(high.hash_one(pair)) << 64) | u128::from(low.hash_one(pair))
}

/// Acknowledged messages a session remembers, per session, so that a retry (the sender did not learn of the
/// first delivery, say its session broke) counts as delivered without being pushed again.
pub const RECENT_ACKS: usize = 256;

/// The last [`RECENT_ACKS`] messages one session acknowledged.
#[derive(Default)]
struct RecentAcks {
    order: std::collections::VecDeque<MessageKey>,
    keys: std::collections::HashSet<MessageKey>,
}

impl RecentAcks {
    fn remember(&mut self, key: MessageKey) {
        if !self.keys.insert(key) {
            return;
        }
        if self.order.len() == RECENT_ACKS {
            if let Some(oldest) = self.order.pop_front() {
                self.keys.remove(&oldest);
            }
        }
        self.order.push_back(key);
    }

    fn contains(&self, key: MessageKey) -> bool {
        self.keys.contains(&key)
    }
}

type PendingAcks = Arc<Mutex<Pending>>;

/// Connection offers pushed into a session and not yet answered, by offer id.
type PendingOffers = Arc<Mutex<HashMap<String, oneshot::Sender<ConnectAnswer>>>>;

/// Offers a session accepted, whose punch plans must go to it; the oldest are forgotten past this many.
const ACCEPTED_OFFERS: usize = 16;

/// How a session ends when this super peer ends it: set once, and the session's task is woken.
#[derive(Default)]
struct EndSignal {
    reason: std::sync::OnceLock<SessionEnded>,
    notify: tokio::sync::Notify,
}

/// What delivery needs of a live session.
#[derive(Clone)]
struct Live {
    session: u64,
    outbound: Outbound,
    pending: PendingAcks,
    offers: PendingOffers,
    /// Offer ids this session accepted, newest last (at most [`ACCEPTED_OFFERS`]).
    accepted: Arc<Mutex<std::collections::VecDeque<String>>>,
    end: Arc<EndSignal>,
    /// The log index of the attach that listed this session in its peer's presence, once applied.
    listed_at: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Default)]
struct Inner {
    by_token: HashMap<String, (PeerId, u64)>,
    /// Sessions that claim presence (attached without `without_presence`), by peer, oldest first.
    by_peer: HashMap<PeerId, Vec<Live>>,
    /// Send-rate buckets by session id.
    send_buckets: HashMap<u64, TokenBucket>,
    /// Request-rate buckets (calls other than sends) by session id.
    request_buckets: HashMap<u64, TokenBucket>,
    /// Open session streams by source address.
    streams_by_ip: HashMap<std::net::IpAddr, u32>,
    /// Highest presence update sequence accepted, by session and kind of update.
    sequences: HashMap<(u64, UpdateKind), u64>,
    /// Every session by id, for the ops port's listing.
    by_session: HashMap<u64, Listed>,
}

/// What the ops port lists of a session besides its delivery state.
struct Listed {
    peer: PeerId,
    listed: bool,
    attached_at_ms: u64,
    remote: Option<std::net::IpAddr>,
    pending: PendingAcks,
}

/// One session's figures as read from the registry: numbers only, so that sorting and paging a hundred
/// thousand of them formats nothing but the page shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEntry {
    pub id: u64,
    pub peer: PeerId,
    pub listed: bool,
    pub attached_at_ms: u64,
    pub remote: Option<std::net::IpAddr>,
    pub pushed: u64,
    pub acked: u64,
    pub pending: u64,
}

impl SessionEntry {
    /// The row the ops port shows.
    pub fn view(&self) -> SessionView {
        SessionView {
            session: format!("{:016x}", self.id),
            peer_id: self.peer.to_string(),
            listed: self.listed,
            attached_at_ms: self.attached_at_ms,
            remote_ip: self.remote.map(|ip| ip.to_string()),
            pushed: self.pushed,
            acked: self.acked,
            pending: self.pending,
        }
    }
}

/// One session as the ops port shows it (`/api/v1/sessions`): no tokens, no payloads.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SessionView {
    /// The session id, as presence lists it (hex).
    pub session: String,
    pub peer_id: String,
    /// Whether it claims presence (takes pushes); one-off tools attach without.
    pub listed: bool,
    /// When it attached, milliseconds since the Unix epoch (this node's clock).
    pub attached_at_ms: u64,
    /// The source address of its stream.
    pub remote_ip: Option<String>,
    /// Messages pushed into it, acknowledged, and waiting for an acknowledgement now.
    pub pushed: u64,
    pub acked: u64,
    pub pending: u64,
}

/// The kinds of presence update, each with its own sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpdateKind {
    /// SetPresence: status, note, profile.
    Status,
    /// PublishEndpoints: candidates and NAT class.
    Endpoints,
}

/// A presence update whose sequence number is not above the last one accepted on its session.
#[derive(Debug, PartialEq, Eq)]
pub struct StaleSequence {
    pub sequence: u64,
    pub last: u64,
}

/// One open session stream counted against its source address; the count drops with it.
pub struct StreamSlot {
    registry: SessionRegistry,
    ip: std::net::IpAddr,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        if let Some(count) = inner.streams_by_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                inner.streams_by_ip.remove(&self.ip);
            }
        }
    }
}

/// The sessions of this super peer; cheap to clone.
#[derive(Clone, Default)]
pub struct SessionRegistry {
    inner: Arc<Mutex<Inner>>,
}

/// Why a delivery did not happen.
#[derive(Debug, PartialEq, Eq)]
pub enum DeliveryError {
    /// The peer has no session here.
    NotHere,
    /// The session did not acknowledge in time or went away.
    NoAck,
}

impl SessionRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("session registry lock poisoned")
    }

    /// Registers a new session of `peer`. One that claims presence (`listed`) takes pushes (messages, offers,
    /// plans) alongside the peer's other sessions; one that does not only authorises calls.
    /// `remote` is the source address of its stream, shown on the ops port.
    pub fn open(
        &self,
        peer: PeerId,
        outbound: Outbound,
        listed: bool,
        remote: Option<std::net::IpAddr>,
    ) -> SessionGuard {
        let token = data_encoding::HEXLOWER.encode(&rand::random::<[u8; 32]>());
        // Session ids are random so that a session of a restarted super peer never matches an old one.
        let session = rand::random::<u64>() | 1;
        let live = Live {
            session,
            outbound,
            pending: PendingAcks::default(),
            offers: PendingOffers::default(),
            accepted: Default::default(),
            end: Default::default(),
            listed_at: Default::default(),
        };
        let attached_at_ms = crate::raft::propose::now_ms();
        let mut inner = self.lock();
        inner.by_token.insert(token.clone(), (peer, session));
        inner.by_session.insert(
            session,
            Listed {
                peer,
                listed,
                attached_at_ms,
                remote,
                pending: live.pending.clone(),
            },
        );
        if listed {
            inner.by_peer.entry(peer).or_default().push(live.clone());
        }
        SessionGuard {
            registry: self.clone(),
            token,
            peer,
            live,
        }
    }

    /// The presence-claiming sessions of `peer` here, oldest first.
    fn lives(&self, peer: &PeerId) -> Vec<Live> {
        self.lock().by_peer.get(peer).cloned().unwrap_or_default()
    }

    /// Ends every session of `peer` here that the attach at log index `listed_at` or earlier listed and that
    /// `entry` (the peer's presence as of log index `index`) no longer lists: as superseded when the per-peer
    /// limit pushed it out, otherwise as "presence lost". Returns how many it ended.
    pub fn end_unlisted(
        &self,
        peer: &PeerId,
        entry: &crate::command::PresenceEntry,
        index: u64,
    ) -> usize {
        let mut ended = 0;
        for live in self.lives(peer) {
            let listed_at = live.listed_at.load(std::sync::atomic::Ordering::Acquire);
            if listed_at == 0 || index < listed_at || entry.lists(live.session) {
                continue;
            }
            let ending = if entry.superseded.contains(&live.session) {
                SessionEnded {
                    reason: SessionEndReason::Superseded as i32,
                    detail: format!(
                        "this peer attached more than {} sessions at once; this was its oldest",
                        vesper_proto::validate::MAX_SESSIONS_PER_PEER
                    ),
                }
            } else {
                SessionEnded {
                    reason: SessionEndReason::PresenceLost as i32,
                    detail: "the cluster no longer lists this session in the peer's presence (its super peer \
                             was out of touch with the others); attach again"
                        .into(),
                }
            };
            if live.end.reason.set(ending).is_ok() {
                live.end.notify.notify_one();
                ended += 1;
            }
        }
        ended
    }

    /// Every peer with a listed session here (for a full check after the event feed lagged).
    pub fn listed_peers(&self) -> Vec<PeerId> {
        self.lock().by_peer.keys().copied().collect()
    }

    /// The peer and session id of a live session token.
    pub fn peer_of(&self, token: &str) -> Option<(PeerId, u64)> {
        self.lock().by_token.get(token).copied()
    }

    /// Counts a new session stream from `ip`; None when `ip` already has `max` open.
    pub fn open_stream(&self, ip: std::net::IpAddr, max: u32) -> Option<StreamSlot> {
        let mut inner = self.lock();
        let count = inner.streams_by_ip.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(StreamSlot {
            registry: self.clone(),
            ip,
        })
    }

    /// Takes one call from `session`'s allowance of `rate` per second with bursts of `burst`.
    pub fn take_request(&self, session: u64, rate: u32, burst: u32) -> bool {
        let now = std::time::Instant::now();
        let mut inner = self.lock();
        inner
            .request_buckets
            .entry(session)
            .or_insert_with(|| TokenBucket::new(burst, now))
            .take(rate, burst, now)
    }

    /// Accepts `sequence` for an update of `kind` on `session` if it is above every one accepted before, and
    /// remembers it. The check is here, on the session's host, because a session token is valid only on the
    /// super peer that issued it: no other node can be handed an update of this session.
    pub fn advance_sequence(
        &self,
        session: u64,
        kind: UpdateKind,
        sequence: u64,
    ) -> Result<(), StaleSequence> {
        let mut inner = self.lock();
        let last = inner.sequences.entry((session, kind)).or_insert(0);
        if sequence <= *last {
            return Err(StaleSequence {
                sequence,
                last: *last,
            });
        }
        *last = sequence;
        Ok(())
    }

    /// Takes one send from `session`'s allowance of `rate` per second with bursts of `burst`; false when the
    /// session is over its rate.
    pub fn take_send(&self, session: u64, rate: u32, burst: u32) -> bool {
        let now = std::time::Instant::now();
        let mut inner = self.lock();
        inner
            .send_buckets
            .entry(session)
            .or_insert_with(|| TokenBucket::new(burst, now))
            .take(rate, burst, now)
    }

    /// Every session here, unordered (the ops port sorts and pages).
    pub fn entries(&self) -> Vec<SessionEntry> {
        let listed: Vec<(
            u64,
            PeerId,
            bool,
            u64,
            Option<std::net::IpAddr>,
            PendingAcks,
        )> = self
            .lock()
            .by_session
            .iter()
            .map(|(id, listed)| {
                (
                    *id,
                    listed.peer,
                    listed.listed,
                    listed.attached_at_ms,
                    listed.remote,
                    listed.pending.clone(),
                )
            })
            .collect();
        // Each session's own lock is taken after the registry's is released.
        listed
            .into_iter()
            .map(|(id, peer, listed, attached_at_ms, remote, pending)| {
                let pending = pending.lock().expect("pending acks lock poisoned");
                SessionEntry {
                    id,
                    peer,
                    listed,
                    attached_at_ms,
                    remote,
                    pushed: pending.next,
                    acked: pending.acked,
                    pending: pending.waiting.len() as u64,
                }
            })
            .collect()
    }

    /// Number of attached sessions.
    pub fn len(&self) -> usize {
        self.lock().by_token.len()
    }

    /// Whether no session is attached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pushes `messages` into every session of `peer` here, in order (in one frame when there are several), and
    /// waits up to `timeout` for the leaf's acknowledgements: one entry per message, true when one of its
    /// sessions acknowledged it.
    pub async fn deliver_all(
        &self,
        peer: &PeerId,
        messages: Vec<Message>,
        timeout: Duration,
    ) -> Result<Vec<bool>, DeliveryError> {
        let lives = self.lives(peer);
        if lives.is_empty() {
            return Err(DeliveryError::NotHere);
        }
        let mut messages = messages;
        // A traced message gets a span for its push to the leaf, open until this delivery is done.
        let _pushes: Vec<tracing::Span> = messages
            .iter_mut()
            .filter(|message| !message.traceparent.is_empty())
            .map(|message| {
                let span = tracing::info_span!(
                    "vesper.deliver",
                    otel.kind = "producer",
                    messaging.system = "vesper",
                    messaging.operation.type = "send",
                    messaging.message.id = %message.id,
                    vesper.from_mailbox = message.from_mailbox,
                );
                vesper_proto::trace::hop(&span, &mut message.traceparent, &mut message.tracestate);
                span
            })
            .collect();
        let count = messages.len();
        let deadline = tokio::time::Instant::now() + timeout;
        if let [live] = lives.as_slice() {
            // The common case: one session, and the messages are not copied.
            return deliver_to(live, messages, deadline).await;
        }
        let mut outcomes: futures::stream::FuturesUnordered<_> = lives
            .iter()
            .map(|live| deliver_to(live, messages.clone(), deadline))
            .collect();
        let mut delivered = vec![false; count];
        let mut any_session = false;
        // Done as soon as every message has an acknowledgement from some session: a slow or silent one does not
        // hold up the answer (its own wait is dropped, and its pending acknowledgements with it).
        while let Some(outcome) = futures::StreamExt::next(&mut outcomes).await {
            let Ok(outcome) = outcome else { continue };
            any_session = true;
            for (any, one) in delivered.iter_mut().zip(outcome) {
                *any |= one;
            }
            if delivered.iter().all(|done| *done) {
                break;
            }
        }
        if any_session {
            Ok(delivered)
        } else {
            Err(DeliveryError::NoAck)
        }
    }
}

/// Removes the pushes of one delivery from its session's pending acknowledgements when the delivery is done or
/// dropped.
struct PendingIds<'a> {
    pending: &'a PendingAcks,
    ids: Vec<u64>,
}

impl Drop for PendingIds<'_> {
    fn drop(&mut self) {
        let mut pending = self.pending.lock().expect("pending acks lock poisoned");
        for id in &self.ids {
            pending.waiting.remove(id);
        }
    }
}

/// Pushes `messages` into one session and waits until `deadline` for its acknowledgements; each message has its
/// own outcome (a message this session acknowledged before counts as delivered and is not pushed again).
async fn deliver_to(
    live: &Live,
    mut messages: Vec<Message>,
    deadline: tokio::time::Instant,
) -> Result<Vec<bool>, DeliveryError> {
    let mut ids = PendingIds {
        pending: &live.pending,
        ids: Vec::with_capacity(messages.len()),
    };
    // One entry per message: its acknowledgement to wait for, or None when this session acknowledged it before
    // (a retry: delivered, and not pushed again).
    let mut acks = Vec::with_capacity(messages.len());
    {
        let mut pending = live.pending.lock().expect("pending acks lock poisoned");
        messages.retain_mut(|message| {
            let key = message_key(&message.from, &message.id);
            if pending.recent.contains(key) {
                acks.push(None);
                return false;
            }
            pending.next += 1;
            let id = pending.next;
            let (acked_tx, acked_rx) = oneshot::channel();
            pending.waiting.insert(id, (acked_tx, key));
            message.delivery_id = id;
            ids.ids.push(id);
            acks.push(Some(acked_rx));
            true
        });
    }
    let frames = if messages.len() > 1 {
        vec![server_frame::Frame::MessageBatch(MessageBatch { messages })]
    } else {
        messages
            .into_iter()
            .map(server_frame::Frame::Message)
            .collect()
    };
    for frame in frames {
        let sent = tokio::time::timeout_at(
            deadline,
            live.outbound
                .send(Ok(Box::new(ServerFrame { frame: Some(frame) }))),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            return Err(DeliveryError::NoAck);
        }
    }
    let mut acked = Vec::with_capacity(acks.len());
    for ack in acks {
        acked.push(match ack {
            Some(ack) => matches!(tokio::time::timeout_at(deadline, ack).await, Ok(Ok(()))),
            None => true,
        });
    }
    drop(ids);
    Ok(acked)
}

impl SessionRegistry {
    /// Pushes a connection offer into every session of `peer` here and waits up to `timeout` for the first that
    /// accepts (or, when none does, for the first refusal). The accepting session gets the punch plan.
    pub async fn offer(
        &self,
        peer: &PeerId,
        offer: ConnectOffer,
        timeout: Duration,
    ) -> Result<ConnectAnswer, DeliveryError> {
        let lives = self.lives(peer);
        if lives.is_empty() {
            return Err(DeliveryError::NotHere);
        }
        let offer = &offer;
        let mut asked: futures::stream::FuturesUnordered<_> = lives
            .iter()
            .map(|live| async move { (live, offer_to(live, offer.clone(), timeout).await) })
            .collect();
        let mut refusal = None;
        while let Some((live, outcome)) = futures::StreamExt::next(&mut asked).await {
            match outcome {
                Ok(answer) if answer.accept => {
                    let mut accepted = live.accepted.lock().expect("accepted offers lock poisoned");
                    if accepted.len() == ACCEPTED_OFFERS {
                        accepted.pop_front();
                    }
                    accepted.push_back(answer.offer_id.clone());
                    return Ok(answer);
                }
                Ok(answer) => refusal = refusal.or(Some(answer)),
                Err(_) => {}
            }
        }
        refusal.ok_or(DeliveryError::NoAck)
    }

    /// Pushes a punch plan into the session of `peer` here that accepted its offer; false when that session is
    /// gone.
    pub async fn push_plan(&self, peer: &PeerId, plan: PunchPlan) -> bool {
        let live = self.lives(peer).into_iter().find(|live| {
            live.accepted
                .lock()
                .expect("accepted offers lock poisoned")
                .contains(&plan.offer_id)
        });
        let Some(live) = live else {
            return false;
        };
        let frame = ServerFrame {
            frame: Some(server_frame::Frame::PunchPlan(plan)),
        };
        live.outbound.send(Ok(Box::new(frame))).await.is_ok()
    }
}

/// Pushes a connection offer into one session and waits up to `timeout` for its answer.
async fn offer_to(
    live: &Live,
    offer: ConnectOffer,
    timeout: Duration,
) -> Result<ConnectAnswer, DeliveryError> {
    let (answer_tx, answer_rx) = oneshot::channel();
    let id = offer.offer_id.clone();
    live.offers
        .lock()
        .expect("pending offers lock poisoned")
        .insert(id.clone(), answer_tx);
    let frame = ServerFrame {
        frame: Some(server_frame::Frame::ConnectOffer(offer)),
    };
    let outcome = async {
        live.outbound
            .send(Ok(Box::new(frame)))
            .await
            .map_err(|_| DeliveryError::NoAck)?;
        match tokio::time::timeout(timeout, answer_rx).await {
            Ok(Ok(answer)) => Ok(answer),
            _ => Err(DeliveryError::NoAck),
        }
    }
    .await;
    live.offers
        .lock()
        .expect("pending offers lock poisoned")
        .remove(&id);
    outcome
}

/// A live session; dropping it ends the session's authority.
pub struct SessionGuard {
    registry: SessionRegistry,
    token: String,
    peer: PeerId,
    live: Live,
}

impl SessionGuard {
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The session id recorded in the peer's presence.
    pub fn id(&self) -> u64 {
        self.live.session
    }

    /// Records that the attach at log index `index` listed this session in its peer's presence: from then on, a
    /// presence that no longer lists it ends it.
    pub fn listed_at(&self, index: u64) {
        self.live
            .listed_at
            .store(index.max(1), std::sync::atomic::Ordering::Release);
    }

    /// Waits until this super peer ends the session ([`SessionRegistry::end_unlisted`]); the reason to send.
    pub async fn ended(&self) -> SessionEnded {
        loop {
            let notified = self.live.end.notify.notified();
            if let Some(ending) = self.live.end.reason.get() {
                return ending.clone();
            }
            notified.await;
        }
    }

    /// Completes a connection offer with the leaf's answer.
    pub fn answer(&self, answer: ConnectAnswer) {
        if let Some(waiting) = self
            .live
            .offers
            .lock()
            .expect("pending offers lock poisoned")
            .remove(&answer.offer_id)
        {
            let _ = waiting.send(answer);
        }
    }

    /// Completes the delivery with id `delivery_id` (the leaf acknowledged it). An id this session is not
    /// waiting for (acknowledged before, timed out, or never given) is ignored.
    pub fn acknowledge(&self, delivery_id: u64) {
        let mut pending = self
            .live
            .pending
            .lock()
            .expect("pending acks lock poisoned");
        if let Some((waiting, key)) = pending.waiting.remove(&delivery_id) {
            pending.recent.remember(key);
            pending.acked += 1;
            let _ = waiting.send(());
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let session = self.live.session;
        let mut inner = self.registry.lock();
        inner.by_token.remove(&self.token);
        inner.by_session.remove(&session);
        inner.send_buckets.remove(&session);
        inner.request_buckets.remove(&session);
        inner.sequences.remove(&(session, UpdateKind::Status));
        inner.sequences.remove(&(session, UpdateKind::Endpoints));
        if let Some(lives) = inner.by_peer.get_mut(&self.peer) {
            lives.retain(|live| live.session != session);
            if lives.is_empty() {
                inner.by_peer.remove(&self.peer);
            }
        }
        drop(inner);
        // Pushes and offers waiting on this session learn at once that it is gone (not at their timeouts).
        self.live
            .pending
            .lock()
            .expect("pending acks lock poisoned")
            .waiting
            .clear();
        self.live
            .offers
            .lock()
            .expect("pending offers lock poisoned")
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vesper_proto::Keypair;

    #[test]
    fn tokens_live_as_long_as_their_guard() {
        let registry = SessionRegistry::default();
        let peer = Keypair::generate().peer_id();
        let (tx, _rx) = mpsc::channel(1);
        let guard = registry.open(peer, tx, true, None);
        assert_eq!(registry.peer_of(guard.token()), Some((peer, guard.id())));
        assert_eq!(registry.peer_of("nope"), None);
        let token = guard.token().to_string();
        drop(guard);
        assert_eq!(registry.peer_of(&token), None);
        assert!(registry.is_empty());
    }

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let start = std::time::Instant::now();
        let mut bucket = TokenBucket::new(3, start);
        assert!((0..3).all(|_| bucket.take(10, 3, start)));
        assert!(!bucket.take(10, 3, start), "burst spent");
        assert!(
            bucket.take(10, 3, start + Duration::from_millis(100)),
            "one token after 1/rate"
        );
        assert!(!bucket.take(10, 3, start + Duration::from_millis(100)));
        let later = start + Duration::from_secs(60);
        assert!(
            (0..3).all(|_| bucket.take(10, 3, later)),
            "refill stops at the burst"
        );
        assert!(!bucket.take(10, 3, later));
    }

    #[tokio::test]
    async fn delivery_waits_for_the_ack() {
        let registry = SessionRegistry::default();
        let peer = Keypair::generate().peer_id();
        let (tx, mut rx) = mpsc::channel(4);
        let guard = registry.open(peer, tx, true, None);
        let message = Message {
            id: "m1".into(),
            ..Default::default()
        };
        let delivery = registry.deliver_all(&peer, vec![message], Duration::from_secs(5));
        let leaf = async {
            let frame = rx.recv().await.unwrap().unwrap();
            let Some(server_frame::Frame::Message(message)) = frame.frame else {
                panic!("expected a Message frame, got {frame:?}");
            };
            assert_eq!(message.id, "m1");
            assert_ne!(
                message.delivery_id, 0,
                "a pushed message carries its delivery id"
            );
            guard.acknowledge(message.delivery_id);
        };
        let (delivered, ()) = tokio::join!(delivery, leaf);
        assert_eq!(delivered, Ok(vec![true]));
        let other = Keypair::generate().peer_id();
        assert_eq!(
            registry
                .deliver_all(&other, vec![Message::default()], Duration::from_millis(10))
                .await,
            Err(DeliveryError::NotHere)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_goes_out_in_one_frame_and_each_message_has_its_own_outcome() {
        let registry = SessionRegistry::default();
        let peer = Keypair::generate().peer_id();
        let (tx, mut rx) = mpsc::channel(4);
        let guard = registry.open(peer, tx, true, None);
        let messages = ["a", "b", "c"].map(|id| Message {
            id: id.into(),
            ..Default::default()
        });
        let delivery = registry.deliver_all(&peer, messages.to_vec(), Duration::from_secs(10));
        let leaf = async {
            let frame = rx.recv().await.unwrap().unwrap();
            let Some(server_frame::Frame::MessageBatch(batch)) = frame.frame else {
                panic!("expected one MessageBatch frame, got {frame:?}");
            };
            let ids: Vec<&str> = batch.messages.iter().map(|m| m.id.as_str()).collect();
            assert_eq!(ids, ["a", "b", "c"]);
            // "b" is never acknowledged: it alone is reported undelivered once the timeout passes.
            guard.acknowledge(batch.messages[2].delivery_id);
            guard.acknowledge(batch.messages[0].delivery_id);
        };
        let (delivered, ()) = tokio::join!(delivery, leaf);
        assert_eq!(delivered, Ok(vec![true, false, true]));
        assert!(
            guard.live.pending.lock().unwrap().waiting.is_empty(),
            "nothing is left waiting"
        );
    }

    /// Two senders that pick the same message id toward one recipient, in flight at once: each delivery waits
    /// for its own acknowledgement (keyed by message id, the second push took the first one's slot and the
    /// first was reported unacknowledged).
    #[tokio::test(start_paused = true)]
    async fn the_same_message_id_from_two_senders_is_two_deliveries() {
        let registry = SessionRegistry::default();
        let peer = Keypair::generate().peer_id();
        let (tx, mut rx) = mpsc::channel(4);
        let guard = registry.open(peer, tx, true, None);
        let from_alice = Message {
            id: "same".into(),
            from: "vp1alice".into(),
            ..Default::default()
        };
        let from_bob = Message {
            id: "same".into(),
            from: "vp1bob".into(),
            ..Default::default()
        };
        let alice = registry.deliver_all(&peer, vec![from_alice], Duration::from_secs(10));
        let bob = registry.deliver_all(&peer, vec![from_bob], Duration::from_secs(10));
        let leaf = async {
            let mut pushed = Vec::new();
            for _ in 0..2 {
                let frame = rx.recv().await.unwrap().unwrap();
                let Some(server_frame::Frame::Message(message)) = frame.frame else {
                    panic!("expected a Message frame, got {frame:?}");
                };
                pushed.push(message);
            }
            assert_ne!(pushed[0].delivery_id, pushed[1].delivery_id);
            for message in &pushed {
                guard.acknowledge(message.delivery_id);
            }
        };
        let (alice, bob, ()) = tokio::join!(alice, bob, leaf);
        assert_eq!((alice, bob), (Ok(vec![true]), Ok(vec![true])));
    }

    /// A peer with two sessions here: a message goes into both, and the first acknowledgement settles it at
    /// once, though the other session never answers.
    #[tokio::test(start_paused = true)]
    async fn one_acknowledgement_of_two_sessions_settles_a_delivery() {
        let registry = SessionRegistry::default();
        let peer = Keypair::generate().peer_id();
        let (silent_tx, mut silent_rx) = mpsc::channel(4);
        let (answering_tx, mut answering_rx) = mpsc::channel(4);
        let _silent = registry.open(peer, silent_tx, true, None);
        let answering = registry.open(peer, answering_tx, true, None);
        // A session without presence takes no pushes.
        let (quiet_tx, mut quiet_rx) = mpsc::channel(4);
        let _quiet = registry.open(peer, quiet_tx, false, None);
        let message = Message {
            id: "m1".into(),
            ..Default::default()
        };
        let started = tokio::time::Instant::now();
        let delivery = registry.deliver_all(&peer, vec![message], Duration::from_secs(60));
        let leaf = async {
            let frame = answering_rx.recv().await.unwrap().unwrap();
            let Some(server_frame::Frame::Message(message)) = frame.frame else {
                panic!("expected a Message frame, got {frame:?}");
            };
            answering.acknowledge(message.delivery_id);
        };
        let (delivered, ()) = tokio::join!(delivery, leaf);
        assert_eq!(delivered, Ok(vec![true]));
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "settled by the first acknowledgement, not at the timeout"
        );
        let pushed = silent_rx.try_recv().unwrap().unwrap();
        assert!(matches!(
            pushed.frame,
            Some(server_frame::Frame::Message(_))
        ));
        assert!(
            quiet_rx.try_recv().is_err(),
            "nothing pushed without presence"
        );
        for live in registry.lives(&peer) {
            assert!(
                live.pending.lock().unwrap().waiting.is_empty(),
                "nothing left waiting"
            );
        }
    }

    /// A listed session that its peer's presence no longer lists is ended, with the reason the entry gives;
    /// one not yet listed (its attach not applied) or still listed is left alone.
    #[tokio::test]
    async fn sessions_the_presence_no_longer_lists_are_ended_with_a_reason() {
        use crate::command::{AttachedSession, PresenceEntry, PresenceStatus};
        let registry = SessionRegistry::default();
        let peer = Keypair::generate().peer_id();
        let open = || registry.open(peer, mpsc::channel(4).0, true, None);
        let (superseded, lost, kept, unlisted) = (open(), open(), open(), open());
        superseded.listed_at(5);
        lost.listed_at(6);
        kept.listed_at(7);
        let entry = PresenceEntry {
            status: PresenceStatus::Online,
            note: String::new(),
            sessions: vec![AttachedSession {
                host: 1,
                session: kept.id(),
                attached_at_ms: 0,
            }],
            superseded: vec![superseded.id()],
            candidates: Vec::new(),
            nat_class: String::new(),
            changed_at_ms: 0,
            attributes: Default::default(),
        };
        // An entry from before the attaches were applied judges nothing.
        assert_eq!(registry.end_unlisted(&peer, &entry, 4), 0);
        assert_eq!(registry.end_unlisted(&peer, &entry, 9), 2);
        assert_eq!(
            superseded.ended().await.reason,
            SessionEndReason::Superseded as i32
        );
        assert_eq!(
            lost.ended().await.reason,
            SessionEndReason::PresenceLost as i32
        );
        for untouched in [&kept, &unlisted] {
            assert!(untouched.live.end.reason.get().is_none());
        }
        // Ended once.
        assert_eq!(registry.end_unlisted(&peer, &entry, 10), 0);
    }

    /// A sender's retry of a message this session already acknowledged counts as delivered and is not pushed
    /// again; the same id from another sender is another message.
    #[tokio::test(start_paused = true)]
    async fn a_retry_of_an_acknowledged_message_is_not_pushed_again() {
        let registry = SessionRegistry::default();
        let peer = Keypair::generate().peer_id();
        let (tx, mut rx) = mpsc::channel(4);
        let guard = registry.open(peer, tx, true, None);
        let message = |from: &str| Message {
            id: "m1".into(),
            from: from.into(),
            ..Default::default()
        };
        let first = registry.deliver_all(&peer, vec![message("vp1alice")], Duration::from_secs(10));
        let leaf = async {
            let frame = rx.recv().await.unwrap().unwrap();
            let Some(server_frame::Frame::Message(pushed)) = frame.frame else {
                panic!("expected a Message frame, got {frame:?}");
            };
            guard.acknowledge(pushed.delivery_id);
        };
        let (first, ()) = tokio::join!(first, leaf);
        assert_eq!(first, Ok(vec![true]));
        let retry = registry
            .deliver_all(&peer, vec![message("vp1alice")], Duration::from_secs(10))
            .await;
        assert_eq!(retry, Ok(vec![true]));
        assert!(rx.try_recv().is_err(), "the retry was not pushed");
        // Another sender's message with the same id is pushed.
        let other = registry.deliver_all(&peer, vec![message("vp1bob")], Duration::from_millis(10));
        assert_eq!(
            other.await,
            Ok(vec![false]),
            "pushed, and not acknowledged here"
        );
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn recent_acknowledgements_are_bounded() {
        let mut recent = RecentAcks::default();
        for n in 0..RECENT_ACKS + 10 {
            recent.remember(message_key("vp1a", &n.to_string()));
        }
        assert_eq!(recent.order.len(), RECENT_ACKS);
        assert_eq!(recent.keys.len(), RECENT_ACKS);
        assert!(
            !recent.contains(message_key("vp1a", "0")),
            "the oldest are forgotten"
        );
        assert!(recent.contains(message_key("vp1a", &(RECENT_ACKS + 9).to_string())));
        // The pair is hashed as a pair: the same text split differently is another message.
        assert_ne!(message_key("ab", "c"), message_key("a", "bc"));
    }
}
