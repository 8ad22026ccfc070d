//! The `Leaf` handle.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use vesper_proto::session::attach_message;
use vesper_proto::v1::leaf_client::LeafClient;
use vesper_proto::v1::{
    client_frame, search_term, server_frame, Attach, ClientFrame, DeleteRecordRequest, Detach,
    GetRecordRequest, ListRecordsRequest, LookupPeerRequest, Member, Message, MessageAck, Ping,
    Presence, PresenceStatus, PutRecordRequest, ReadConsistency, Record, SearchPeersRequest,
    SearchRecordsRequest, SendMessageRequest, SetPresenceRequest,
};
use vesper_proto::{validate, Keypair, PeerId, SESSION_METADATA_KEY};

use crate::error::LeafError;

/// Frames queued towards the super peer on the session stream (keepalives, acknowledgements, goodbye).
const SESSION_OUTBOUND_QUEUE: usize = 64;
/// Messages held for the app's stream before delivery waits for the app to read (and acknowledgements with it).
const INBOX_QUEUE: usize = 1024;
/// Message ids remembered to deliver retries to the app once.
const SEEN_MESSAGES: usize = 10_000;
/// Attempts of a send while the cluster has no leader or the super peer is unreachable (same message id).
const SEND_ATTEMPTS: u32 = 3;

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

/// A page of records.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub records: Vec<Record>,
    /// Token for the next page; `None` when there is none.
    pub next_page_token: Option<String>,
    /// Applied index of the replica that served the read.
    pub applied_index: u64,
}

struct Inner {
    client: LeafClient<Channel>,
    token: MetadataValue<tonic::metadata::Ascii>,
    peer_id: PeerId,
    server: String,
    members: Vec<Member>,
    request_timeout: Duration,
    /// Stops the keepalive task (and with it the session) when the Leaf is dropped or closed.
    stop: CancellationToken,
    /// Frames to the super peer (the goodbye).
    outbound: mpsc::Sender<ClientFrame>,
    /// Messages without a handler, until the app takes the stream.
    inbox: std::sync::Mutex<Option<mpsc::Receiver<Message>>>,
    handlers: Handlers,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An attached leaf peer. Cheap to clone; the session ends when the last clone is dropped or `close` is called.
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
        let mut failures = Vec::new();
        for seed in &config.seeds {
            match tokio::time::timeout(config.connect_timeout, attach(&config, seed)).await {
                Ok(Ok(leaf)) => return Ok(leaf),
                Ok(Err(error)) => failures.push(format!("{seed}: {error}")),
                Err(_) => failures.push(format!(
                    "{seed}: no answer within {:?}",
                    config.connect_timeout
                )),
            }
        }
        Err(LeafError::Unreachable(failures))
    }

    /// This leaf's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// Leaf address of the super peer this leaf is attached to.
    pub fn server(&self) -> &str {
        &self.inner.server
    }

    /// The super peers known when the session opened.
    pub fn members(&self) -> &[Member] {
        &self.inner.members
    }

    /// Ends the session abruptly (as a crash would, from the cluster's view: the peer stays online for the grace
    /// period). Use [`Leaf::detach`] to go offline at once.
    pub fn close(&self) {
        self.inner.stop.cancel();
    }

    /// Says goodbye: the peer goes offline at once, then the session ends.
    pub async fn detach(&self) {
        let goodbye = ClientFrame {
            frame: Some(client_frame::Frame::Detach(Detach {})),
        };
        let _ = self.inner.outbound.send(goodbye).await;
        // Give the frame a moment to leave before the stream closes (bounded: the session ends either way).
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.outbound.closed()).await;
        self.inner.stop.cancel();
    }

    /// The stream of incoming messages that have no handler, in arrival order. Returns `None` after the first
    /// call (there is one stream).
    pub fn messages(&self) -> Option<mpsc::Receiver<Message>> {
        self.inner.inbox.lock().expect("inbox lock poisoned").take()
    }

    /// Calls `handler` for every incoming message of `kind` (instead of putting it on the stream).
    pub fn on_message(&self, kind: &str, handler: impl Fn(Message) + Send + Sync + 'static) {
        self.inner
            .handlers
            .write()
            .expect("handlers lock poisoned")
            .insert(kind.to_string(), Arc::new(handler));
    }

    /// Sends a message of app-defined `kind` to `to`. Retries (with the same id, so the recipient gets it once)
    /// while the cluster is between leaders.
    pub async fn send(
        &self,
        to: &PeerId,
        kind: &str,
        payload: Vec<u8>,
    ) -> Result<SendOutcome, LeafError> {
        validate::kind(kind)?;
        let id = data_encoding::HEXLOWER.encode(&rand::random::<[u8; 12]>());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let request = self.request(SendMessageRequest {
                to: to.to_string(),
                id: id.clone(),
                kind: kind.to_string(),
                payload: payload.clone(),
            });
            match self.inner.client.clone().send_message(request).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    return Ok(if reply.delivered {
                        SendOutcome::Delivered
                    } else {
                        SendOutcome::Queued
                    });
                }
                Err(status)
                    if status.code() == tonic::Code::Unavailable && attempt < SEND_ATTEMPTS =>
                {
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
        validate::attributes(&attributes)?;
        let request = self.request(SetPresenceRequest {
            status: status as i32,
            note: note.to_string(),
            attributes,
        });
        let reply = self
            .inner
            .client
            .clone()
            .set_presence(request)
            .await?
            .into_inner();
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
        let request = self.request(LookupPeerRequest {
            peer_id: peer.to_string(),
            consistency: consistency.into(),
        });
        Ok(self
            .inner
            .client
            .clone()
            .lookup_peer(request)
            .await?
            .into_inner()
            .presence)
    }

    /// Finds peers by profile attributes.
    pub async fn search_peers(
        &self,
        terms: &[SearchTerm],
        online_only: bool,
        limit: u32,
    ) -> Result<Vec<Presence>, LeafError> {
        let request = self.request(SearchPeersRequest {
            terms: terms.iter().map(wire_term).collect(),
            online_only,
            limit,
            consistency: Consistency::Linearizable.into(),
        });
        Ok(self
            .inner
            .client
            .clone()
            .search_peers(request)
            .await?
            .into_inner()
            .peers)
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert(SESSION_METADATA_KEY, self.inner.token.clone());
        request.set_timeout(self.inner.request_timeout);
        request
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
        validate::record(namespace, key, &attributes, &value)?;
        let request = self.request(PutRecordRequest {
            namespace: namespace.into(),
            key: key.into(),
            attributes,
            value,
            expected_version,
        });
        let reply = self
            .inner
            .client
            .clone()
            .put_record(request)
            .await?
            .into_inner();
        reply
            .record
            .ok_or_else(|| LeafError::SessionClosed("put answered without a record".into()))
    }

    /// Reads the record `namespace/key`.
    pub async fn get(
        &self,
        namespace: &str,
        key: &str,
        consistency: Consistency,
    ) -> Result<Option<Record>, LeafError> {
        let request = self.request(GetRecordRequest {
            namespace: namespace.into(),
            key: key.into(),
            consistency: consistency.into(),
        });
        Ok(self
            .inner
            .client
            .clone()
            .get_record(request)
            .await?
            .into_inner()
            .record)
    }

    /// Deletes the record `namespace/key`; returns whether there was one.
    pub async fn delete(
        &self,
        namespace: &str,
        key: &str,
        expected_version: Option<u64>,
    ) -> Result<bool, LeafError> {
        let request = self.request(DeleteRecordRequest {
            namespace: namespace.into(),
            key: key.into(),
            expected_version,
        });
        Ok(self
            .inner
            .client
            .clone()
            .delete_record(request)
            .await?
            .into_inner()
            .deleted)
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
        let request = self.request(ListRecordsRequest {
            namespace: namespace.into(),
            key_prefix: key_prefix.into(),
            limit,
            page_token: page_token.unwrap_or_default(),
            consistency: consistency.into(),
        });
        let reply = self
            .inner
            .client
            .clone()
            .list_records(request)
            .await?
            .into_inner();
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
        let request = self.request(SearchRecordsRequest {
            namespace: namespace.into(),
            terms,
            limit,
            page_token: page_token.unwrap_or_default(),
            consistency: consistency.into(),
        });
        let reply = self
            .inner
            .client
            .clone()
            .search_records(request)
            .await?
            .into_inner();
        Ok(Page {
            records: reply.records,
            next_page_token: (!reply.next_page_token.is_empty()).then_some(reply.next_page_token),
            applied_index: reply.applied_index,
        })
    }
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

fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Connects to `seed`, runs the challenge/attach exchange and starts the keepalive task.
async fn attach(config: &LeafConfig, seed: &str) -> Result<Leaf, LeafError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&config.ca_cert_pem))
        .domain_name(host_of(seed));
    let channel = Endpoint::from_shared(format!("https://{seed}"))
        .map_err(|error| LeafError::Config(format!("bad seed address {seed:?}: {error}")))?
        .tcp_nodelay(true)
        .connect_timeout(config.connect_timeout)
        .tls_config(tls)
        .map_err(|error| LeafError::Config(format!("tls: {error}")))?
        .connect()
        .await
        .map_err(|error| LeafError::Unreachable(vec![format!("{seed}: {error}")]))?;
    let mut client = LeafClient::new(channel);
    let (tx, rx) = mpsc::channel(SESSION_OUTBOUND_QUEUE);
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    let challenge = match inbound.message().await? {
        Some(vesper_proto::v1::ServerFrame {
            frame: Some(server_frame::Frame::Challenge(challenge)),
        }) => challenge,
        other => {
            return Err(LeafError::SessionClosed(format!(
                "expected a challenge, got {other:?}"
            )))
        }
    };
    let signature = config
        .keypair
        .sign(&attach_message(&challenge.nonce, &challenge.server_peer_id));
    let attach = ClientFrame {
        frame: Some(client_frame::Frame::Attach(Attach {
            public_key: config.keypair.peer_id().as_bytes().to_vec(),
            signature: signature.to_vec(),
        })),
    };
    tx.send(attach)
        .await
        .map_err(|_| LeafError::SessionClosed("the super peer closed the session".into()))?;
    let welcome = match inbound.message().await? {
        Some(vesper_proto::v1::ServerFrame {
            frame: Some(server_frame::Frame::Welcome(welcome)),
        }) => welcome,
        other => {
            return Err(LeafError::SessionClosed(format!(
                "expected a welcome, got {other:?}"
            )))
        }
    };
    let token = welcome
        .session_token
        .parse()
        .map_err(|_| LeafError::SessionClosed("session token is not valid metadata".into()))?;
    let stop = CancellationToken::new();
    let interval = Duration::from_millis(u64::from(welcome.keepalive_interval_ms.max(100)));
    let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_QUEUE);
    let handlers = Handlers::default();
    let session = SessionTask {
        outbound: tx.clone(),
        inbound,
        interval,
        stop: stop.clone(),
        inbox: inbox_tx,
        handlers: handlers.clone(),
        seen: SeenMessages::default(),
    };
    tokio::spawn(session.run());
    Ok(Leaf {
        inner: Arc::new(Inner {
            client,
            token,
            peer_id: config.keypair.peer_id(),
            server: seed.to_string(),
            members: welcome.members,
            request_timeout: config.request_timeout,
            stop,
            outbound: tx,
            inbox: std::sync::Mutex::new(Some(inbox_rx)),
            handlers,
        }),
    })
}

/// Message ids already handed to the app, so a retried message reaches it once.
#[derive(Default)]
struct SeenMessages {
    order: std::collections::VecDeque<(String, String)>,
    set: std::collections::HashSet<(String, String)>,
}

impl SeenMessages {
    /// Records a message; false when it was seen before.
    fn first_time(&mut self, from: &str, id: &str) -> bool {
        let key = (from.to_string(), id.to_string());
        if self.set.contains(&key) {
            return false;
        }
        if self.order.len() == SEEN_MESSAGES {
            if let Some(oldest) = self.order.pop_front() {
                self.set.remove(&oldest);
            }
        }
        self.order.push_back(key.clone());
        self.set.insert(key);
        true
    }
}

/// The task that owns the session stream: pings every `interval`, hands incoming messages to their handler or
/// the inbox (each once), acknowledges them, and ends with the session or when the leaf stops.
struct SessionTask {
    outbound: mpsc::Sender<ClientFrame>,
    inbound: tonic::Streaming<vesper_proto::v1::ServerFrame>,
    interval: Duration,
    stop: CancellationToken,
    inbox: mpsc::Sender<Message>,
    handlers: Handlers,
    seen: SeenMessages,
}

impl SessionTask {
    async fn run(mut self) {
        let mut ticker = tokio::time::interval(self.interval);
        let mut nonce = 0u64;
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                _ = ticker.tick() => {
                    nonce += 1;
                    let ping = ClientFrame { frame: Some(client_frame::Frame::Ping(Ping { nonce })) };
                    if self.outbound.send(ping).await.is_err() {
                        break;
                    }
                }
                frame = self.inbound.message() => match frame {
                    Ok(Some(vesper_proto::v1::ServerFrame { frame: Some(server_frame::Frame::Message(message)) })) => {
                        if !self.receive(message).await {
                            break;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    /// Hands `message` to the app (unless it is a retry) and acknowledges it. False when the session is gone.
    async fn receive(&mut self, message: Message) -> bool {
        let id = message.id.clone();
        if self.seen.first_time(&message.from, &message.id) {
            let handler = self
                .handlers
                .read()
                .expect("handlers lock poisoned")
                .get(&message.kind)
                .cloned();
            match handler {
                Some(handler) => handler(message),
                // The app holds the stream; if it is gone, the message is acknowledged and dropped.
                None => {
                    let _ = self.inbox.send(message).await;
                }
            }
        }
        let ack = ClientFrame {
            frame: Some(client_frame::Frame::MessageAck(MessageAck {
                message_id: id,
            })),
        };
        self.outbound.send(ack).await.is_ok()
    }
}
