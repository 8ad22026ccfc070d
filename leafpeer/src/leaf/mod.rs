//! The `Leaf` handle.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

mod connect;
mod dispatch;
mod endpoints;
mod follow;
pub mod metrics;
mod offer;
mod outgoing;
mod role;
mod seen;
mod session;
mod shared;
mod watches;

pub use offer::{Gate, OfferStatus, SuperPeerOffer};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vesper_proto::v1::{
    client_frame, search_term, AnswerInvitationRequest, ClientFrame, ConferenceContext,
    ConferenceResponse, CreateConferenceRequest, DeleteRecordRequest, Detach, GetConferenceRequest,
    GetRecordRequest, InviteRequest, ListRecordsRequest, LookupPeerRequest, Message,
    PostChatRequest, Presence, PresenceStatus, PutRecordRequest, ReadConsistency, Record,
    SearchPeersRequest, SearchRecordsRequest, SendFrame, SendMessageRequest, SendResult,
    SetPresenceRequest,
};
use vesper_proto::{validate, Keypair, PeerId};

use crate::error::LeafError;
use shared::{Attachment, Connection, Messaging, PeerLinks, PresenceState, Shared};
pub use watches::{WatchItem, WatchSpec};

/// Messages held for the app's stream before delivery waits for the app to read (and acknowledgements with it).
const INBOX_QUEUE: usize = 1024;
/// Attempts of a send or chat post while the cluster has no leader or this leaf is re-attaching (same id).
const SEND_ATTEMPTS: u32 = 5;
/// How long [`Leaf::detach`] waits for messages already received to be acknowledged (handlers to return).
pub const DETACH_ACK_WAIT: Duration = Duration::from_secs(2);

/// Decides whether a peer may connect to this leaf (`true` accepts).
pub type ConnectPolicy = Arc<dyn Fn(&PeerId) -> bool + Send + Sync>;

/// Accepted peer connections held for the app.
const INCOMING_QUEUE: usize = 64;

/// A function the app registers for one message kind.
pub type Handler = Arc<dyn Fn(Message) + Send + Sync>;

/// Handlers by message kind.
type Handlers = Arc<std::sync::RwLock<HashMap<String, Handler>>>;

/// What happened to a sent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// The recipient's library acknowledged it.
    Delivered,
    /// The recipient is offline; the message waits in its mailbox and arrives when it attaches.
    Queued,
}

/// How a leaf is set up.
#[derive(Clone)]
pub struct LeafConfig {
    /// Leaf service addresses (host:port) of super peers to try, in order.
    pub seeds: Vec<String>,
    /// PEM of the cluster CA that issued the super peers' certificates.
    pub ca_cert_pem: Vec<u8>,
    /// The leaf's identity.
    pub keypair: Keypair,
    /// Deadline for connecting and attaching to one super peer. Default 5 s.
    pub connect_timeout: Duration,
    /// Deadline of each call. Default 15 s (a write waits for a leader after a failover).
    pub request_timeout: Duration,
    /// After each attach, learn the NAT class and reflexive address with STUN (two super peers) and publish
    /// them in this leaf's presence. Default true.
    pub publish_endpoints: bool,
    /// Claim presence with the session: the peer shows online while it lasts, and messages and connection
    /// offers are pushed into it (into each of the peer's sessions, on any super peer). Set it to false for a
    /// one-off tool that only calls, sends or watches with the same key as a running app: such a session is not
    /// listed, so it never disturbs the app's sessions and receives nothing. Default true.
    pub claim_presence: bool,
    /// Offer this node as a super peer (an explicit opt-in; see [`SuperPeerOffer`]). Needs `claim_presence`.
    /// Default none.
    pub offer_super_peer: Option<SuperPeerOffer>,
}

impl LeafConfig {
    /// A configuration with default timeouts.
    pub fn new(seeds: Vec<String>, ca_cert_pem: Vec<u8>, keypair: Keypair) -> Self {
        Self {
            seeds,
            ca_cert_pem,
            keypair,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            publish_endpoints: true,
            claim_presence: true,
            offer_super_peer: None,
        }
    }
}

/// Read consistency of a get, list or search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Reflects every write acknowledged before the read started.
    #[default]
    Linearizable,
    /// Served at once by the attached super peer's replica; may lag.
    Stale,
}

impl From<Consistency> for i32 {
    fn from(consistency: Consistency) -> Self {
        match consistency {
            Consistency::Linearizable => ReadConsistency::Linearizable as i32,
            Consistency::Stale => ReadConsistency::Stale as i32,
        }
    }
}

/// One attribute condition of a search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SearchTerm {
    /// The attribute equals the value.
    Equals(String, String),
    /// The attribute starts with the value.
    Prefix(String, String),
}

/// Peers found by [`Leaf::search_peers`].
#[derive(Debug, Clone, Default)]
pub struct PeerMatches {
    /// Matching peers, in PeerId order.
    pub peers: Vec<Presence>,
    /// More peers matched than were returned (the limit, or 4 MiB of profiles); narrow the terms to see them.
    pub more: bool,
}

/// A page of records.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// The records of this page, in key order.
    pub records: Vec<Record>,
    /// Token for the next page; `None` when there is none.
    pub next_page_token: Option<String>,
    /// Applied index of the replica that served the read.
    pub applied_index: u64,
}

struct Inner {
    shared: Arc<Shared>,
    peer_id: PeerId,
    request_timeout: Duration,
    /// Messages without a handler, until the app takes the stream.
    inbox: std::sync::Mutex<Option<mpsc::Receiver<Message>>>,
    /// Accepted peer connections, until the app takes the stream.
    incoming: std::sync::Mutex<Option<mpsc::Receiver<crate::p2p::PeerConnection>>>,
    /// The verdicts on this node's offer to serve as a super peer, when it made one.
    offer: Option<tokio::sync::watch::Receiver<Option<OfferStatus>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

/// An attached leaf peer. Cheap to clone; the session ends when the last clone is dropped, `close` or `detach`
/// is called. If its super peer goes away, the leaf re-attaches to another one by itself.
#[derive(Clone)]
pub struct Leaf {
    inner: Arc<Inner>,
}

impl Leaf {
    /// Attaches to the first seed that accepts the session.
    pub async fn connect(config: LeafConfig) -> Result<Leaf, LeafError> {
        if config.seeds.is_empty() {
            return Err(LeafError::Config("no seed super peers given".into()));
        }
        if config.offer_super_peer.is_some() && !config.claim_presence {
            return Err(LeafError::Config(
                "offering to serve as a super peer needs claim_presence (the offer rides the peer's presence)"
                    .into(),
            ));
        }
        let attached = session::attach_any(&config, &config.seeds).await?;
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_QUEUE);
        let (stream_lane_tx, stream_lane_rx) = mpsc::channel(dispatch::LANE_QUEUE);
        let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_QUEUE);
        let shared = Arc::new(Shared {
            config: config.clone(),
            attachment: Attachment::new(config.seeds.clone()),
            messaging: Messaging::new(inbox_tx),
            presence: PresenceState::default(),
            peers: PeerLinks::new(incoming_tx),
            watches: watches::WatchRegistry::default(),
            stop: CancellationToken::new(),
            ended: Default::default(),
            tasks: tokio_util::task::TaskTracker::new(),
            metrics: metrics::LeafMetrics::default(),
        });
        // Published before returning, so calls work at once.
        shared
            .attachment
            .connection
            .send_replace(Some(attached.connection.clone()));
        shared.spawn(dispatch::run_stream_lane(shared.clone(), stream_lane_rx));
        let lanes = Arc::new(dispatch::Lanes::new(stream_lane_tx));
        shared.spawn(session::supervise(shared.clone(), attached, lanes));
        let offer = match config.offer_super_peer.clone() {
            Some(offer) => match offer::start(&shared, offer).await {
                Ok(status) => Some(status),
                Err(error) => {
                    shared.stop.cancel();
                    return Err(error);
                }
            },
            None => None,
        };
        Ok(Leaf {
            inner: Arc::new(Inner {
                shared,
                peer_id: config.keypair.peer_id(),
                request_timeout: config.request_timeout,
                inbox: std::sync::Mutex::new(Some(inbox_rx)),
                incoming: std::sync::Mutex::new(Some(incoming_rx)),
                offer,
            }),
        })
    }

    /// The super peer's verdict on this node's offer to serve as a super peer: `None` without an offer, or
    /// before the first answer.
    pub fn offer_status(&self) -> Option<OfferStatus> {
        self.inner
            .offer
            .as_ref()
            .and_then(|status| status.borrow().clone())
    }

    /// Waits until the offer's verdict changes (or, without an offer, returns at once).
    pub async fn offer_changed(&self) -> Option<OfferStatus> {
        let mut status = self.inner.offer.as_ref()?.clone();
        status.changed().await.ok()?;
        let verdict = status.borrow().clone();
        verdict
    }

    /// This leaf's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// Leaf address of the super peer this leaf is attached to now (empty while re-attaching).
    pub fn server(&self) -> String {
        self.inner
            .shared
            .attachment
            .current()
            .map(|connection| connection.server.clone())
            .unwrap_or_default()
    }

    /// Leaf addresses of the super peers this leaf knows (seeds and members learned from sessions).
    pub fn known_super_peers(&self) -> Vec<String> {
        self.inner
            .shared
            .attachment
            .known
            .read()
            .expect("known lock")
            .clone()
    }

    /// Measures this leaf's NAT class and reflexive address now (STUN to two super peers at different IPs)
    /// and publishes them in its presence. The library also does this by itself after every attach.
    pub async fn discover_endpoints(&self) -> Result<crate::nat::NatReport, LeafError> {
        let connection = self.connection().await?;
        let report = endpoints::measure(&self.inner.shared, &connection).await?;
        endpoints::publish(&self.inner.shared, &connection, &report).await?;
        *self.inner.shared.presence.nat.lock().expect("nat lock") = Some(report.clone());
        Ok(report)
    }

    /// Opens an encrypted QUIC connection to `peer`, directly through NATs when a path can be punched, else
    /// through a super peer's relay. The peer's app must accept (see [`Leaf::set_connect_policy`]).
    pub async fn connect_to(&self, peer: &PeerId) -> Result<crate::p2p::PeerConnection, LeafError> {
        let connection = self.connection().await?;
        let started = std::time::Instant::now();
        let dialled = connect::dial(&self.inner.shared, &connection, peer).await;
        let path = match &dialled {
            Ok(connection) if matches!(connection.path(), crate::p2p::Path::Direct(_)) => {
                metrics::ConnectionPath::Direct
            }
            Ok(_) => metrics::ConnectionPath::Relayed,
            Err(_) => metrics::ConnectionPath::Failed,
        };
        let took = dialled.is_ok().then(|| started.elapsed().as_secs_f64());
        self.inner
            .shared
            .metrics
            .connection(path, metrics::Side::Dial, took);
        dialled
    }

    /// Sets who may connect to this leaf; without a policy every offer is refused.
    pub fn set_connect_policy(&self, policy: impl Fn(&PeerId) -> bool + Send + Sync + 'static) {
        *self.inner.shared.peers.policy.write().expect("policy lock") = Some(Arc::new(policy));
    }

    /// The stream of connections other peers opened to this leaf (once; later calls get `None`).
    pub fn incoming_connections(&self) -> Option<mpsc::Receiver<crate::p2p::PeerConnection>> {
        self.inner.incoming.lock().expect("incoming lock").take()
    }

    /// What the last endpoint discovery found (`None` before the first one finished).
    pub fn nat_report(&self) -> Option<crate::nat::NatReport> {
        self.inner
            .shared
            .presence
            .nat
            .lock()
            .expect("nat lock")
            .clone()
    }

    /// Tasks of this leaf still running (the session, keepalives, message dispatch, handler calls, connection
    /// set-up); 0 soon after `close` or `detach`, except for handler calls, which run to their end.
    #[doc(hidden)]
    pub fn task_count(&self) -> usize {
        self.inner.shared.tasks.len()
    }

    /// How long each re-attach after losing a super peer took.
    pub fn reattach_times(&self) -> Vec<Duration> {
        self.inner
            .shared
            .attachment
            .reattach_times
            .lock()
            .expect("reattach lock")
            .clone()
    }

    /// Starts a watch of peers' presence and/or a namespace's records. The stream starts with a `Reset` and the
    /// current state, then gets every change in log index order; it goes on across failovers without gap or
    /// duplicate.
    pub async fn watch(&self, spec: WatchSpec) -> Result<mpsc::Receiver<WatchItem>, LeafError> {
        let (_, receiver, frame) = self.inner.shared.watches.add(spec);
        // If no session is up, the supervisor sends the watch when it re-attaches.
        if let Some(connection) = self.inner.shared.attachment.current() {
            let _ = connection.outbound.send(frame).await;
        }
        Ok(receiver)
    }

    /// Waits until the leaf stops: `close`, `detach`, the last handle dropped, or its super peer ending the
    /// session for good. In that last case the error says why ([`LeafError::Superseded`]: this peer attached more
    /// sessions at once, elsewhere, than the cluster allows, and this was its oldest); then the library does not
    /// attach again, since that would push out another of the peer's sessions.
    pub async fn closed(&self) -> Option<LeafError> {
        self.inner.shared.stop.cancelled().await;
        self.inner
            .shared
            .ended
            .get()
            .map(|reason| LeafError::Superseded(reason.clone()))
    }

    /// Ends the session abruptly (as a crash would, from the cluster's view: the peer stays online for the grace
    /// period). Use [`Leaf::detach`] to go offline at once.
    pub fn close(&self) {
        self.inner.shared.stop.cancel();
    }

    /// Says goodbye: the peer goes offline at once, then the session ends. Messages already received are
    /// acknowledged first (those still with a handler get up to [`DETACH_ACK_WAIT`]), so the goodbye does not
    /// overtake their acknowledgements and they do not come again on the next attach.
    pub async fn detach(&self) {
        let goodbye = ClientFrame {
            frame: Some(client_frame::Frame::Detach(Detach {})),
        };
        let mut unacknowledged = self.inner.shared.messaging.unacknowledged.subscribe();
        let _ = tokio::time::timeout(
            DETACH_ACK_WAIT,
            unacknowledged.wait_for(|count| *count == 0),
        )
        .await;
        if let Some(connection) = self.inner.shared.attachment.current() {
            let _ = connection.outbound.send(goodbye).await;
            // Give the frame a moment to leave before the stream closes (bounded: it ends either way).
            let _ =
                tokio::time::timeout(Duration::from_secs(2), connection.outbound.closed()).await;
        }
        self.inner.shared.stop.cancel();
    }

    /// The stream of incoming messages that have no handler, in arrival order, each once. A message is
    /// acknowledged to its sender once it is on the stream; while the stream is full (`INBOX_QUEUE`, 1024
    /// messages) the next one waits, and so does its sender. Returns `None` after the first call (there is one
    /// stream).
    pub fn messages(&self) -> Option<mpsc::Receiver<Message>> {
        self.inner.inbox.lock().expect("inbox lock poisoned").take()
    }

    /// Calls `handler` for every incoming message of `kind` (instead of putting it on the stream), each once.
    ///
    /// Calls for one kind run one at a time in arrival order, on tokio's blocking pool, so a handler may block
    /// (or sleep) without stalling the session: keepalives, other kinds and the stream go on meanwhile. A message
    /// is acknowledged to its sender when its handler returns, so a slow handler slows its senders (whose sends
    /// wait up to the super peer's delivery timeout) and holds back later messages of its kind only.
    pub fn on_message(&self, kind: &str, handler: impl Fn(Message) + Send + Sync + 'static) {
        self.inner
            .shared
            .messaging
            .handlers
            .write()
            .expect("handlers lock poisoned")
            .insert(kind.to_string(), Arc::new(handler));
    }

    /// Sends a message of app-defined `kind` to `to` and waits until the recipient's library acknowledged it
    /// or it is queued in the recipient's mailbox. Sends are pipelined on the session stream, so many may be in
    /// flight at once, up to the super peer's limits per session (`validate::MAX_SENDS_IN_FLIGHT`, 1024 sends,
    /// and `validate::MAX_SEND_BYTES_IN_FLIGHT`, 4 MiB of payload); past them a send waits for others to finish.
    /// Sends queued together travel together. Retries (with the same id, so the recipient gets it once) while
    /// the cluster is between leaders or this leaf is re-attaching.
    pub async fn send(
        &self,
        to: &PeerId,
        kind: &str,
        payload: Vec<u8>,
    ) -> Result<SendOutcome, LeafError> {
        validate::kind(kind)?;
        validate::message_payload(&validate::SizeLimits::CEILING, &payload)?;
        // Every attempt carries the same message, id included, so the recipient's app gets it once.
        let mut message = SendMessageRequest {
            to: to.to_string(),
            id: data_encoding::HEXLOWER.encode(&rand::random::<[u8; 12]>()),
            kind: kind.to_string(),
            payload,
            traceparent: String::new(),
            tracestate: String::new(),
        };
        // One message, one trace: this span (a child of the app's current span) starts it, and its context
        // travels in the message to every hop. With no OpenTelemetry layer installed it is inert.
        // The attributes that need formatting are recorded only once the span is known to be sampled, and an
        // unsampled span is closed at once instead of being entered on every poll of the send.
        let span = tracing::info_span!(
            "vesper.send",
            otel.kind = "producer",
            messaging.system = "vesper",
            messaging.operation.type = "send",
            messaging.message.id = tracing::field::Empty,
            messaging.destination.name = tracing::field::Empty,
        );
        vesper_proto::trace::write(&span, &mut message.traceparent, &mut message.tracestate);
        let span = if message.traceparent.is_empty() {
            tracing::Span::none()
        } else {
            span.record("messaging.message.id", message.id.as_str());
            span.record("messaging.destination.name", message.to.as_str());
            span
        };
        let started = std::time::Instant::now();
        let outcome = self.send_traced(message).instrument(span).await;
        self.inner.shared.metrics.sent(
            match &outcome {
                Ok(SendOutcome::Delivered) => metrics::SendEnd::Delivered,
                Ok(SendOutcome::Queued) => metrics::SendEnd::Queued,
                Err(_) => metrics::SendEnd::Failed,
            },
            started.elapsed().as_secs_f64(),
        );
        outcome
    }

    /// What this leaf counts about itself (messages sent and received, re-attaches, peer connections by path),
    /// to register in the app's own Prometheus registry ([`metrics::LeafMetrics::register`]).
    pub fn metrics(&self) -> metrics::LeafMetrics {
        self.inner.shared.metrics.clone()
    }

    /// The attempts of one send.
    async fn send_traced(&self, message: SendMessageRequest) -> Result<SendOutcome, LeafError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let messaging = &self.inner.shared.messaging;
            // Payload bytes first, then a slot, both in arrival order; a payload is at most the message ceiling,
            // which the byte budget holds (checked where it is defined).
            let bytes = messaging
                .send_bytes
                .acquire_many(message.payload.len() as u32)
                .await
                .expect("the send semaphores are never closed");
            let permit = messaging
                .send_permits
                .acquire()
                .await
                .expect("the send semaphores are never closed");
            let outcome = self.send_once(&message).await?;
            let retriable = match outcome {
                Some(result) if result.error_code == 0 => {
                    return Ok(if result.delivered {
                        SendOutcome::Delivered
                    } else {
                        SendOutcome::Queued
                    })
                }
                Some(result) => {
                    let status = tonic::Status::new(
                        tonic::Code::from(result.error_code),
                        result.error_message,
                    );
                    if status.code() != tonic::Code::Unavailable || attempt >= SEND_ATTEMPTS {
                        return Err(status.into());
                    }
                    status
                }
                // The session ended or did not answer in time: try again on the (next) session.
                None => {
                    tonic::Status::unavailable("the session ended before the send was answered")
                }
            };
            if attempt >= SEND_ATTEMPTS {
                return Err(retriable.into());
            }
            drop((permit, bytes));
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
        }
    }

    /// One attempt of a send, pipelined on the current session: its result, or None when the session ended or
    /// did not answer within the request timeout.
    async fn send_once(
        &self,
        message: &SendMessageRequest,
    ) -> Result<Option<SendResult>, LeafError> {
        let messaging = &self.inner.shared.messaging;
        let connection = self.connection().await?;
        let request_id = messaging
            .next_request
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (result_tx, result_rx) = tokio::sync::oneshot::channel();
        messaging
            .pending_sends
            .lock()
            .expect("pending sends lock")
            .insert(request_id, result_tx);
        let frame = ClientFrame {
            frame: Some(client_frame::Frame::Send(SendFrame {
                request_id,
                message: Some(message.clone()),
            })),
        };
        let sent = connection.outbound.send(frame).await.is_ok();
        Ok(
            match tokio::time::timeout(self.inner.request_timeout, result_rx).await {
                Ok(Ok(result)) if sent => Some(result),
                _ => {
                    messaging
                        .pending_sends
                        .lock()
                        .expect("pending sends lock")
                        .remove(&request_id);
                    None
                }
            },
        )
    }

    /// Creates conference `id`, owned by this leaf, starting at `start_at_ms` (milliseconds since the epoch).
    pub async fn create_conference(
        &self,
        id: &str,
        title: &str,
        description: &str,
        start_at_ms: u64,
    ) -> Result<ConferenceContext, LeafError> {
        let (mut client, request) = self
            .request(CreateConferenceRequest {
                id: id.into(),
                title: title.into(),
                description: description.into(),
                start_at_ms,
            })
            .await?;
        conference_of(client.create_conference(request).await?.into_inner())
    }

    /// Invites peers to a conference this leaf owns; each gets the context as a `vesper.invite` message.
    pub async fn invite(
        &self,
        conference_id: &str,
        peers: &[PeerId],
    ) -> Result<ConferenceContext, LeafError> {
        let (mut client, request) = self
            .request(InviteRequest {
                conference_id: conference_id.into(),
                peers: peers.iter().map(PeerId::to_string).collect(),
            })
            .await?;
        conference_of(client.invite(request).await?.into_inner())
    }

    /// Accepts or declines an invitation.
    pub async fn answer_invitation(
        &self,
        conference_id: &str,
        accept: bool,
    ) -> Result<ConferenceContext, LeafError> {
        let (mut client, request) = self
            .request(AnswerInvitationRequest {
                conference_id: conference_id.into(),
                accept,
            })
            .await?;
        conference_of(client.answer_invitation(request).await?.into_inner())
    }

    /// Reads a conference's context and roster.
    pub async fn conference(&self, conference_id: &str) -> Result<ConferenceContext, LeafError> {
        let (mut client, request) = self
            .request(GetConferenceRequest {
                conference_id: conference_id.into(),
            })
            .await?;
        conference_of(client.get_conference(request).await?.into_inner())
    }

    /// Posts a chat line to a conference; returns its place in the conference's one order. Retried with the
    /// same id while the cluster is between leaders.
    pub async fn post_chat(&self, conference_id: &str, text: &str) -> Result<u64, LeafError> {
        let id = data_encoding::HEXLOWER.encode(&rand::random::<[u8; 12]>());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (mut client, request) = self
                .request(PostChatRequest {
                    conference_id: conference_id.into(),
                    id: id.clone(),
                    text: text.into(),
                })
                .await?;
            match client.post_chat(request).await {
                Ok(reply) => return Ok(reply.into_inner().sequence),
                // A post is idempotent (the cluster keeps one line per author and id), so it is safe to retry
                // even when the connection broke after it was sent.
                Err(status) if connection_trouble(&status) && attempt < SEND_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
                Err(status) => return Err(status.into()),
            }
        }
    }

    /// Sets this peer's status, note and searchable profile attributes.
    pub async fn set_presence(
        &self,
        status: PresenceStatus,
        note: &str,
        attributes: HashMap<String, String>,
    ) -> Result<Presence, LeafError> {
        validate::attributes(&validate::SizeLimits::CEILING, &attributes)?;
        let _ordered = self.inner.shared.presence.order.lock().await;
        let (mut client, request) = self
            .request(SetPresenceRequest {
                status: status as i32,
                note: note.to_string(),
                attributes,
                sequence: self.inner.shared.presence.next_sequence(),
            })
            .await?;
        let reply = client.set_presence(request).await?.into_inner();
        reply.presence.ok_or_else(|| {
            LeafError::SessionClosed("set_presence answered without a presence".into())
        })
    }

    /// Looks up a peer's presence; `None` when it never attached.
    pub async fn lookup(
        &self,
        peer: &PeerId,
        consistency: Consistency,
    ) -> Result<Option<Presence>, LeafError> {
        let (mut client, request) = self
            .request(LookupPeerRequest {
                peer_id: peer.to_string(),
                consistency: consistency.into(),
            })
            .await?;
        Ok(client.lookup_peer(request).await?.into_inner().presence)
    }

    /// Finds peers by profile attributes: at most `limit` (1-1000, 100 when 0), in PeerId order, and no more
    /// than fit in 4 MiB of profiles (`validate::MAX_PAGE_BYTES`); `more` says when others matched too.
    pub async fn search_peers(
        &self,
        terms: &[SearchTerm],
        online_only: bool,
        limit: u32,
    ) -> Result<PeerMatches, LeafError> {
        let (mut client, request) = self
            .request(SearchPeersRequest {
                terms: terms.iter().map(wire_term).collect(),
                online_only,
                limit,
                consistency: Consistency::Linearizable.into(),
            })
            .await?;
        let found = client.search_peers(request).await?.into_inner();
        Ok(PeerMatches {
            peers: found.peers,
            more: found.more,
        })
    }

    /// The current connection, waiting (up to the request timeout) while the leaf re-attaches.
    async fn connection(&self) -> Result<Arc<Connection>, LeafError> {
        // Attached (the usual case): no subscription and no timer.
        if let Some(connection) = self.inner.shared.attachment.current() {
            return Ok(connection);
        }
        let mut updates = self.inner.shared.attachment.connection.subscribe();
        let waited = tokio::time::timeout(self.inner.request_timeout, async {
            updates
                .wait_for(|connection| connection.is_some())
                .await
                .map(|connection| connection.clone())
        })
        .await;
        match waited {
            Ok(Ok(Some(connection))) => Ok(connection),
            _ => Err(LeafError::Status(tonic::Status::unavailable(
                "no super peer session (re-attaching)",
            ))),
        }
    }

    /// A request with the session token, and the client to send it with.
    async fn request<T>(
        &self,
        message: T,
    ) -> Result<
        (
            vesper_proto::v1::leaf_client::LeafClient<tonic::transport::Channel>,
            tonic::Request<T>,
        ),
        LeafError,
    > {
        let connection = self.connection().await?;
        let mut request = connection.request(message);
        request.set_timeout(self.inner.request_timeout);
        // A unary call inside a sampled span carries its context in metadata (nothing otherwise).
        vesper_proto::trace::inject_metadata(&tracing::Span::current(), request.metadata_mut());
        Ok((connection.client.clone(), request))
    }

    /// Creates or replaces the record `namespace/key`, owned by this leaf. With `expected_version`, the put
    /// succeeds only if the record's current version is that (0: the record must not exist).
    pub async fn put(
        &self,
        namespace: &str,
        key: &str,
        attributes: HashMap<String, String>,
        value: Vec<u8>,
        expected_version: Option<u64>,
    ) -> Result<Record, LeafError> {
        validate::record(
            &validate::SizeLimits::CEILING,
            namespace,
            key,
            &attributes,
            &value,
        )?;
        // One put, one trace: this span starts it (a child of the app's span), and the call's metadata carries
        // it to the super peer, the leader and every member's apply.
        let span = client_span("PutRecord");
        async {
            let (mut client, request) = self
                .request(PutRecordRequest {
                    namespace: namespace.into(),
                    key: key.into(),
                    attributes,
                    value,
                    expected_version,
                })
                .await?;
            let reply = client.put_record(request).await?.into_inner();
            reply
                .record
                .ok_or_else(|| LeafError::SessionClosed("put answered without a record".into()))
        }
        .instrument(span)
        .await
    }

    /// Reads the record `namespace/key`.
    pub async fn get(
        &self,
        namespace: &str,
        key: &str,
        consistency: Consistency,
    ) -> Result<Option<Record>, LeafError> {
        let (mut client, request) = self
            .request(GetRecordRequest {
                namespace: namespace.into(),
                key: key.into(),
                consistency: consistency.into(),
            })
            .await?;
        Ok(client.get_record(request).await?.into_inner().record)
    }

    /// Deletes the record `namespace/key`; returns whether there was one.
    pub async fn delete(
        &self,
        namespace: &str,
        key: &str,
        expected_version: Option<u64>,
    ) -> Result<bool, LeafError> {
        async {
            let (mut client, request) = self
                .request(DeleteRecordRequest {
                    namespace: namespace.into(),
                    key: key.into(),
                    expected_version,
                })
                .await?;
            Ok(client.delete_record(request).await?.into_inner().deleted)
        }
        .instrument(client_span("DeleteRecord"))
        .await
    }

    /// Lists records of `namespace` whose key starts with `key_prefix`, one page at a time.
    pub async fn list(
        &self,
        namespace: &str,
        key_prefix: &str,
        limit: u32,
        page_token: Option<String>,
        consistency: Consistency,
    ) -> Result<Page, LeafError> {
        let (mut client, request) = self
            .request(ListRecordsRequest {
                namespace: namespace.into(),
                key_prefix: key_prefix.into(),
                limit,
                page_token: page_token.unwrap_or_default(),
                consistency: consistency.into(),
            })
            .await?;
        let reply = client.list_records(request).await?.into_inner();
        Ok(Page {
            records: reply.records,
            next_page_token: (!reply.next_page_token.is_empty()).then_some(reply.next_page_token),
            applied_index: reply.applied_index,
        })
    }

    /// Searches `namespace` for records matching every term, one page at a time.
    pub async fn search(
        &self,
        namespace: &str,
        terms: &[SearchTerm],
        limit: u32,
        page_token: Option<String>,
        consistency: Consistency,
    ) -> Result<Page, LeafError> {
        let terms = terms.iter().map(wire_term).collect();
        let (mut client, request) = self
            .request(SearchRecordsRequest {
                namespace: namespace.into(),
                terms,
                limit,
                page_token: page_token.unwrap_or_default(),
                consistency: consistency.into(),
            })
            .await?;
        let reply = client.search_records(request).await?.into_inner();
        Ok(Page {
            records: reply.records,
            next_page_token: (!reply.next_page_token.is_empty()).then_some(reply.next_page_token),
            applied_index: reply.applied_index,
        })
    }
}

/// Whether a call failed because the super peer or the connection went away (worth retrying, on the next
/// session if need be) rather than because of what was asked.
/// The client span of a unary Leaf call (OpenTelemetry rpc conventions); inert with no OpenTelemetry layer.
fn client_span(method: &'static str) -> tracing::Span {
    tracing::info_span!(
        "rpc.client",
        otel.kind = "client",
        otel.name = %format_args!("vesper.v1.Leaf/{method}"),
        rpc.system = "grpc",
        rpc.service = "vesper.v1.Leaf",
        rpc.method = method,
    )
}

fn connection_trouble(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

fn conference_of(response: ConferenceResponse) -> Result<ConferenceContext, LeafError> {
    response.conference.ok_or_else(|| {
        LeafError::SessionClosed("conference call answered without a conference".into())
    })
}

fn wire_term(term: &SearchTerm) -> vesper_proto::v1::SearchTerm {
    match term {
        SearchTerm::Equals(attribute, value) => vesper_proto::v1::SearchTerm {
            attribute: attribute.clone(),
            condition: Some(search_term::Condition::Equals(value.clone())),
        },
        SearchTerm::Prefix(attribute, prefix) => vesper_proto::v1::SearchTerm {
            attribute: attribute.clone(),
            condition: Some(search_term::Condition::Prefix(prefix.clone())),
        },
    }
}
