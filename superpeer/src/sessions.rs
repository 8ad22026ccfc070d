//! The sessions attached to this super peer: by token (to authorise unary calls) and by peer (to deliver
//! messages into the session stream).
//!
//! A token is 32 random bytes in hex, handed out in the Welcome frame and valid while the session stream lives:
//! the [`SessionGuard`] that the stream task holds removes it when the task ends, however it ends. A peer has at
//! most one session per super peer; a newer one replaces the older.

use crate::limits::TokenBucket;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use vesper_proto::v1::{
    server_frame, ConnectAnswer, ConnectOffer, Message, MessageBatch, PunchPlan, ServerFrame,
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
    waiting: HashMap<u64, oneshot::Sender<()>>,
}

type PendingAcks = Arc<Mutex<Pending>>;

/// Connection offers pushed into a session and not yet answered, by offer id.
type PendingOffers = Arc<Mutex<HashMap<String, oneshot::Sender<ConnectAnswer>>>>;

/// What delivery needs of a live session.
#[derive(Clone)]
struct Live {
    session: u64,
    outbound: Outbound,
    pending: PendingAcks,
    offers: PendingOffers,
}

#[derive(Default)]
struct Inner {
    by_token: HashMap<String, (PeerId, u64)>,
    by_peer: HashMap<PeerId, Live>,
    /// Send-rate buckets by session id.
    send_buckets: HashMap<u64, TokenBucket>,
    /// Request-rate buckets (calls other than sends) by session id.
    request_buckets: HashMap<u64, TokenBucket>,
    /// Open session streams by source address.
    streams_by_ip: HashMap<std::net::IpAddr, u32>,
    /// Highest presence update sequence accepted, by session and kind of update.
    sequences: HashMap<(u64, UpdateKind), u64>,
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

    /// Registers a new session of `peer`, replacing any older one of the same peer here.
    pub fn open(&self, peer: PeerId, outbound: Outbound) -> SessionGuard {
        let token = data_encoding::HEXLOWER.encode(&rand::random::<[u8; 32]>());
        // Session ids are random so that a session of a restarted super peer never matches an old one.
        let session = rand::random::<u64>() | 1;
        let pending = PendingAcks::default();
        let offers = PendingOffers::default();
        let mut inner = self.lock();
        inner.by_token.insert(token.clone(), (peer, session));
        inner.by_peer.insert(
            peer,
            Live {
                session,
                outbound,
                pending: pending.clone(),
                offers: offers.clone(),
            },
        );
        SessionGuard {
            registry: self.clone(),
            token,
            peer,
            session,
            pending,
            offers,
        }
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

    /// Number of attached sessions.
    pub fn len(&self) -> usize {
        self.lock().by_token.len()
    }

    /// Whether no session is attached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pushes `messages` into `peer`'s session in order (in one frame when the leaf takes batches) and waits up to
    /// `timeout` for the leaf's acknowledgements: one entry per message, true when the leaf acknowledged it.
    pub async fn deliver_all(
        &self,
        peer: &PeerId,
        messages: Vec<Message>,
        timeout: Duration,
    ) -> Result<Vec<bool>, DeliveryError> {
        let live = self
            .lock()
            .by_peer
            .get(peer)
            .cloned()
            .ok_or(DeliveryError::NotHere)?;
        let mut messages = messages;
        let mut ids = Vec::with_capacity(messages.len());
        let mut acks = Vec::with_capacity(messages.len());
        {
            let mut pending = live.pending.lock().expect("pending acks lock poisoned");
            for message in &mut messages {
                pending.next += 1;
                let id = pending.next;
                let (acked_tx, acked_rx) = oneshot::channel();
                pending.waiting.insert(id, acked_tx);
                message.delivery_id = id;
                ids.push(id);
                acks.push(acked_rx);
            }
        }
        let frames = if messages.len() > 1 {
            vec![server_frame::Frame::MessageBatch(MessageBatch { messages })]
        } else {
            messages
                .into_iter()
                .map(server_frame::Frame::Message)
                .collect()
        };
        let outcome = async {
            for frame in frames {
                live.outbound
                    .send(Ok(Box::new(ServerFrame { frame: Some(frame) })))
                    .await
                    .map_err(|_| DeliveryError::NoAck)?;
            }
            let deadline = tokio::time::Instant::now() + timeout;
            let mut acked = Vec::with_capacity(acks.len());
            for ack in acks {
                acked.push(matches!(
                    tokio::time::timeout_at(deadline, ack).await,
                    Ok(Ok(()))
                ));
            }
            Ok(acked)
        }
        .await;
        let mut pending = live.pending.lock().expect("pending acks lock poisoned");
        for id in &ids {
            pending.waiting.remove(id);
        }
        outcome
    }
}

impl SessionRegistry {
    /// Pushes a connection offer into `peer`'s session and waits up to `timeout` for its answer.
    pub async fn offer(
        &self,
        peer: &PeerId,
        offer: ConnectOffer,
        timeout: Duration,
    ) -> Result<ConnectAnswer, DeliveryError> {
        let live = self
            .lock()
            .by_peer
            .get(peer)
            .cloned()
            .ok_or(DeliveryError::NotHere)?;
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

    /// Pushes a punch plan into `peer`'s session; false when it has no session here.
    pub async fn push_plan(&self, peer: &PeerId, plan: PunchPlan) -> bool {
        let live = self.lock().by_peer.get(peer).cloned();
        let Some(live) = live else {
            return false;
        };
        let frame = ServerFrame {
            frame: Some(server_frame::Frame::PunchPlan(plan)),
        };
        live.outbound.send(Ok(Box::new(frame))).await.is_ok()
    }
}

/// A live session; dropping it ends the session's authority.
pub struct SessionGuard {
    registry: SessionRegistry,
    token: String,
    peer: PeerId,
    session: u64,
    pending: PendingAcks,
    offers: PendingOffers,
}

impl SessionGuard {
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The session id recorded in the peer's presence.
    pub fn id(&self) -> u64 {
        self.session
    }

    /// Completes a connection offer with the leaf's answer.
    pub fn answer(&self, answer: ConnectAnswer) {
        if let Some(waiting) = self
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
        if let Some(waiting) = self
            .pending
            .lock()
            .expect("pending acks lock poisoned")
            .waiting
            .remove(&delivery_id)
        {
            let _ = waiting.send(());
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        inner.by_token.remove(&self.token);
        inner.send_buckets.remove(&self.session);
        inner.request_buckets.remove(&self.session);
        inner.sequences.remove(&(self.session, UpdateKind::Status));
        inner
            .sequences
            .remove(&(self.session, UpdateKind::Endpoints));
        if inner
            .by_peer
            .get(&self.peer)
            .is_some_and(|live| live.session == self.session)
        {
            inner.by_peer.remove(&self.peer);
        }
        drop(inner);
        // Pushes and offers waiting on this session learn at once that it is gone (not at their timeouts).
        self.pending
            .lock()
            .expect("pending acks lock poisoned")
            .waiting
            .clear();
        self.offers
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
        let guard = registry.open(peer, tx);
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
        let guard = registry.open(peer, tx);
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
        let guard = registry.open(peer, tx);
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
            guard.pending.lock().unwrap().waiting.is_empty(),
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
        let guard = registry.open(peer, tx);
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
}
