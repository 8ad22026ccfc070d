//! The Leaf service: authenticated sessions and the index calls of leaf peers.
//!
//! ```text
//!  Session stream task (one per leaf)            unary calls (PutRecord, GetRecord, ...)
//!    challenge -> attach (verify signature)        x-vesper-session token -> SessionRegistry -> PeerId
//!    -> token in SessionRegistry -> welcome        validate -> pre-check -> propose / read barrier -> RocksDB
//!    -> ping/pong until the stream ends
//!       (token removed when the task ends)
//! ```
//!
//! Checks happen in this order, so bad input never reaches Raft: session, then input validation (limits), then
//! ownership and compare-and-set against the local replica. Apply repeats the last two checks deterministically
//! for writes that raced.

pub mod broker;
pub mod conference;
pub(crate) mod convert;

pub mod messaging;

pub mod state;
pub mod watch;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;
use vesper_proto::search;
use vesper_proto::session::{self, NONCE_LEN};
use vesper_proto::v1::leaf_server::{Leaf, LeafServer};
use vesper_proto::v1::{
    client_frame, server_frame, AnswerInvitationRequest, Challenge, ClientFrame,
    ConferenceResponse, ConnectRequest, ConnectResponse, CreateConferenceRequest,
    DeleteRecordRequest, DeleteRecordResponse, GetConferenceRequest, GetRecordRequest,
    GetRecordResponse, InviteRequest, ListRecordsRequest, ListRecordsResponse, LookupPeerRequest,
    LookupPeerResponse, Pong, PostChatRequest, PostChatResponse, PresenceStatus,
    PublishEndpointsRequest, PutRecordRequest, PutRecordResponse, ReadConsistency,
    SearchPeersRequest, SearchPeersResponse, SearchRecordsRequest, SearchRecordsResponse,
    SendFrame, SendMessageRequest, SendMessageResponse, SendResult, SendResults, ServerFrame,
    SetPresenceRequest, SetPresenceResponse, WatchRefused, Welcome,
};
use vesper_proto::{validate, PeerId, SESSION_METADATA_KEY};

use crate::sessions;
use crate::sessions::UpdateKind;

use crate::command::StoredRecord;
use crate::command::{
    may_read, Op, PresenceStatus as StoredStatus, RecordQuota, Rejection,
    Response as CommandResponse,
};
use crate::error::ServiceError;
use crate::leaf::state::LeafState;
use crate::store::conference as store_conference;
use crate::store::presence;
use crate::store::records;
use crate::store::{blocking, StoreError};

/// Time a leaf has to answer the challenge after opening a session.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued towards one leaf before the session task waits for the leaf to read.
const SESSION_OUTBOUND_QUEUE: usize = 64;
/// Pipelined sends (and bytes of their payloads) one session may have in flight; more are refused with
/// RESOURCE_EXHAUSTED.
pub use validate::{MAX_SENDS_IN_FLIGHT, MAX_SEND_BYTES_IN_FLIGHT};

/// What a session's sends hold at this super peer until they are answered, counted against
/// [`MAX_SENDS_IN_FLIGHT`] and [`MAX_SEND_BYTES_IN_FLIGHT`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct InFlight {
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

    fn remove(&mut self, done: InFlight) {
        self.sends -= done.sends;
        self.payload_bytes -= done.payload_bytes;
    }
}

/// Builds the Leaf gRPC service.
pub fn service(
    context: Arc<LeafState>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) -> LeafServer<LeafService> {
    // Requests longer than the size limits allow are refused from their 5-byte length prefix, before the body is
    // read; answers are bounded by the page byte budget (`validate::MAX_PAGE_BYTES`).
    let largest_request = context.config.limits.largest_request();
    LeafServer::new(LeafService {
        context,
        shutdown,
        tasks,
    })
    .max_decoding_message_size(largest_request)
    .max_encoding_message_size(validate::MAX_ANSWER_BYTES)
}

/// The Leaf service of one super peer.
pub struct LeafService {
    context: Arc<LeafState>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl LeafService {
    fn authenticate<T>(&self, request: &Request<T>) -> Result<PeerId, ServiceError> {
        self.session_of(request).map(|(peer, _)| peer)
    }

    /// The peer and session id behind a call's session token.
    fn session_of<T>(&self, request: &Request<T>) -> Result<(PeerId, u64), ServiceError> {
        let token = request
            .metadata()
            .get(SESSION_METADATA_KEY)
            .ok_or_else(|| {
                ServiceError::Unauthenticated(format!(
                    "no session: open a Session stream and send its token in {SESSION_METADATA_KEY}"
                ))
            })?
            .to_str()
            .map_err(|_| ServiceError::Unauthenticated("session token is not text".into()))?;
        let (peer, session) = self.context.sessions.peer_of(token).ok_or_else(|| {
            ServiceError::Unauthenticated("session token is unknown or expired".into())
        })?;
        let config = &self.context.config;
        if !self.context.sessions.take_request(
            session,
            config.request_rate_per_second,
            config.request_burst,
        ) {
            return Err(ServiceError::RateLimited(format!(
                "request rate limit: {} calls per second per session (bursts of {}); slow down and retry",
                config.request_rate_per_second, config.request_burst
            )));
        }
        Ok((peer, session))
    }
}

fn consistency(value: i32) -> Result<ReadConsistency, ServiceError> {
    ReadConsistency::try_from(value)
        .map_err(|_| ServiceError::BadField(format!("consistency {value} is not a known value")))
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<ServerFrame, Status>> + Send>>;

impl LeafService {
    /// Refuses a presence update whose sequence is missing or not above the session's last one of its kind;
    /// called after every other check, right before the proposal, so a refused update moves nothing.
    fn check_sequence(
        &self,
        session: u64,
        kind: UpdateKind,
        sequence: u64,
    ) -> Result<(), ServiceError> {
        if sequence == 0 {
            return Err(ServiceError::BadField(
                "sequence is missing: presence updates carry a sequence number of at least 1, above the \
                 session's previous one"
                    .into(),
            ));
        }
        self.context
            .sessions
            .advance_sequence(session, kind, sequence)
            .map_err(|stale| {
                ServiceError::Precondition(format!(
                    "presence update sequence {} is not above {}, the last accepted on this session: a replayed \
                     or overtaken update, refused",
                    stale.sequence, stale.last
                ))
            })
    }

    /// Proposes a change of `peer`'s own presence and answers with the stored result.
    async fn propose_presence(
        &self,
        peer: PeerId,
        op: Op,
    ) -> Result<Response<SetPresenceResponse>, Status> {
        match self.context.replica.propose_accepted(op).await? {
            (CommandResponse::Presence(entry), _) => Ok(Response::new(SetPresenceResponse {
                presence: Some(messaging::presence_of(
                    &self.context,
                    peer.as_bytes(),
                    entry,
                )),
            })),
            (other, _) => Err(unexpected(other)),
        }
    }
}

#[tonic::async_trait]
impl Leaf for LeafService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<ClientFrame>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let ip = request
            .remote_addr()
            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |addr| addr.ip());
        let max = self.context.config.max_sessions_per_ip;
        let slot = self.context.sessions.open_stream(ip, max).ok_or_else(|| {
            ServiceError::LimitReached(format!(
                "too many sessions from {ip} (at most {max} at once); close some or retry later"
            ))
        })?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(SESSION_OUTBOUND_QUEUE);
        let context = self.context.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            run_session(context, inbound, tx, shutdown).await;
            // The address's count drops when the session ends, however it ends.
            drop(slot);
        });
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|item| item.map(|frame| *frame)),
        )))
    }

    async fn put_record(
        &self,
        request: Request<PutRecordRequest>,
    ) -> Result<Response<PutRecordResponse>, Status> {
        let peer = self.authenticate(&request)?;
        let request = request.into_inner();
        validate::record(
            &self.context.config.limits,
            &request.namespace,
            &request.key,
            &request.attributes,
            &request.value,
        )
        .map_err(ServiceError::from)?;
        let size = records::record_size(
            &request.namespace,
            &request.key,
            &request.attributes,
            request.value.len(),
        );
        let quota = RecordQuota {
            records: self.context.config.max_records_per_peer,
            bytes: self.context.config.max_record_bytes_per_peer,
        };
        self.precheck(
            &peer,
            &request.namespace,
            &request.key,
            request.expected_version,
            Some((size, quota)),
        )
        .await?;
        let op = Op::PutRecord {
            owner: *peer.as_bytes(),
            namespace: request.namespace.clone(),
            key: request.key.clone(),
            attributes: request.attributes.into_iter().collect(),
            value: request.value,
            expected_version: request.expected_version,
            quota,
        };
        match self.context.replica.propose_accepted(op).await? {
            (CommandResponse::Record(record), applied_index) => {
                Ok(Response::new(PutRecordResponse {
                    record: Some(convert::record(&request.namespace, &request.key, record)),
                    applied_index,
                }))
            }
            (other, _) => Err(unexpected(other)),
        }
    }

    async fn get_record(
        &self,
        request: Request<GetRecordRequest>,
    ) -> Result<Response<GetRecordResponse>, Status> {
        let peer = self.authenticate(&request)?;
        let request = request.into_inner();
        validate::namespace(&request.namespace).map_err(ServiceError::from)?;
        validate::key(&request.key).map_err(ServiceError::from)?;
        let applied_index = self
            .context
            .replica
            .read_barrier(consistency(request.consistency)?)
            .await?;
        let reader = self.context.replica.reader().clone();
        let (namespace, key) = (request.namespace.clone(), request.key.clone());
        let record = blocking(move || {
            let db = reader.db();
            if !may_read(records::acl(db, &namespace)?.as_ref(), peer.as_bytes()) {
                return Ok(Err(Rejection::NamespaceRead(namespace)));
            }
            records::get(db, &namespace, &key).map(Ok)
        })
        .await
        .map_err(ServiceError::from)?
        .map_err(ServiceError::from)?;
        Ok(Response::new(GetRecordResponse {
            record: record.map(|record| convert::record(&request.namespace, &request.key, record)),
            applied_index,
        }))
    }

    async fn delete_record(
        &self,
        request: Request<DeleteRecordRequest>,
    ) -> Result<Response<DeleteRecordResponse>, Status> {
        let peer = self.authenticate(&request)?;
        let request = request.into_inner();
        validate::namespace(&request.namespace).map_err(ServiceError::from)?;
        validate::key(&request.key).map_err(ServiceError::from)?;
        let exists = self
            .precheck(
                &peer,
                &request.namespace,
                &request.key,
                request.expected_version,
                None,
            )
            .await?;
        if !exists && request.expected_version.is_none() {
            // Nothing to delete: answer without a Raft round.
            return Ok(Response::new(DeleteRecordResponse {
                deleted: false,
                applied_index: 0,
            }));
        }
        let op = Op::DeleteRecord {
            owner: *peer.as_bytes(),
            namespace: request.namespace,
            key: request.key,
            expected_version: request.expected_version,
        };
        match self.context.replica.propose_accepted(op).await? {
            (CommandResponse::Deleted(deleted), applied_index) => {
                Ok(Response::new(DeleteRecordResponse {
                    deleted,
                    applied_index,
                }))
            }
            (other, _) => Err(unexpected(other)),
        }
    }

    async fn list_records(
        &self,
        request: Request<ListRecordsRequest>,
    ) -> Result<Response<ListRecordsResponse>, Status> {
        let peer = self.authenticate(&request)?;
        let request = request.into_inner();
        validate::key_prefix(&request.key_prefix).map_err(ServiceError::from)?;
        let prefix = request.key_prefix;
        let page = PageRequest {
            reader: *peer.as_bytes(),
            namespace: request.namespace,
            limit: request.limit,
            page_token: request.page_token,
            consistency: request.consistency,
        };
        let (records, next_page_token, applied_index) = self
            .read_page(page, move |db, namespace, after, limit| {
                records::list(
                    db,
                    namespace,
                    &prefix,
                    after,
                    limit,
                    validate::MAX_PAGE_BYTES,
                )
            })
            .await?;
        Ok(Response::new(ListRecordsResponse {
            records,
            next_page_token,
            applied_index,
        }))
    }

    async fn search_records(
        &self,
        request: Request<SearchRecordsRequest>,
    ) -> Result<Response<SearchRecordsResponse>, Status> {
        let peer = self.authenticate(&request)?;
        let request = request.into_inner();
        let terms = search::terms(&request.terms).map_err(ServiceError::from)?;
        let page = PageRequest {
            reader: *peer.as_bytes(),
            namespace: request.namespace,
            limit: request.limit,
            page_token: request.page_token,
            consistency: request.consistency,
        };
        let (records, next_page_token, applied_index) = self
            .read_page(page, move |db, namespace, after, limit| {
                records::search(
                    db,
                    namespace,
                    &terms,
                    after,
                    limit,
                    validate::MAX_PAGE_BYTES,
                )
            })
            .await?;
        Ok(Response::new(SearchRecordsResponse {
            records,
            next_page_token,
            applied_index,
        }))
    }

    async fn set_presence(
        &self,
        request: Request<SetPresenceRequest>,
    ) -> Result<Response<SetPresenceResponse>, Status> {
        let (peer, session) = self.session_of(&request)?;
        let request = request.into_inner();
        let status = match PresenceStatus::try_from(request.status) {
            Ok(PresenceStatus::Online) => StoredStatus::Online,
            Ok(PresenceStatus::Away) => StoredStatus::Away,
            Ok(PresenceStatus::Busy) => StoredStatus::Busy,
            Ok(PresenceStatus::Offline) => {
                return Err(ServiceError::BadField(
                    "status OFFLINE cannot be set; detach from the session instead".into(),
                )
                .into())
            }
            Err(_) => {
                return Err(ServiceError::BadField(format!(
                    "status {} is not a known value",
                    request.status
                ))
                .into())
            }
        };
        if request.note.len() > messaging::MAX_NOTE_LEN {
            return Err(ServiceError::from(validate::InvalidInput::TooLong {
                field: "note",
                len: request.note.len(),
                max: messaging::MAX_NOTE_LEN,
            })
            .into());
        }
        validate::attributes(&self.context.config.limits, &request.attributes)
            .map_err(ServiceError::from)?;
        self.check_sequence(session, UpdateKind::Status, request.sequence)?;
        let op = Op::PresenceSet {
            peer: *peer.as_bytes(),
            session,
            status,
            note: request.note,
            attributes: request.attributes.into_iter().collect(),
        };
        self.propose_presence(peer, op).await
    }

    async fn publish_endpoints(
        &self,
        request: Request<PublishEndpointsRequest>,
    ) -> Result<Response<SetPresenceResponse>, Status> {
        let (peer, session) = self.session_of(&request)?;
        let request = request.into_inner();
        vesper_proto::nat::parse_candidates(&request.candidates)
            .map_err(|error| ServiceError::BadField(error.to_string()))?;
        let nat_class: vesper_proto::nat::NatClass =
            request
                .nat_class
                .parse()
                .map_err(|error: vesper_proto::nat::UnknownNatClass| {
                    ServiceError::BadField(error.to_string())
                })?;
        self.check_sequence(session, UpdateKind::Endpoints, request.sequence)?;
        let op = Op::PresenceEndpoints {
            peer: *peer.as_bytes(),
            session,
            candidates: request.candidates,
            nat_class: nat_class.as_str().to_string(),
        };
        self.propose_presence(peer, op).await
    }

    async fn connect_peer(
        &self,
        request: Request<ConnectRequest>,
    ) -> Result<Response<ConnectResponse>, Status> {
        let (peer, _session) = self.session_of(&request)?;
        let plan = broker::connect(&self.context, peer, request.into_inner()).await?;
        Ok(Response::new(ConnectResponse { plan: Some(plan) }))
    }

    async fn lookup_peer(
        &self,
        request: Request<LookupPeerRequest>,
    ) -> Result<Response<LookupPeerResponse>, Status> {
        self.authenticate(&request)?;
        let request = request.into_inner();
        let peer: PeerId = request
            .peer_id
            .parse()
            .map_err(|error| ServiceError::BadField(format!("peer_id: {error}")))?;
        let applied_index = self
            .context
            .replica
            .read_barrier(consistency(request.consistency)?)
            .await?;
        let entry = presence::get(self.context.replica.reader().db(), peer.as_bytes())
            .map_err(ServiceError::from)?;
        Ok(Response::new(LookupPeerResponse {
            presence: entry
                .map(|entry| messaging::presence_of(&self.context, peer.as_bytes(), entry)),
            applied_index,
        }))
    }

    async fn search_peers(
        &self,
        request: Request<SearchPeersRequest>,
    ) -> Result<Response<SearchPeersResponse>, Status> {
        self.authenticate(&request)?;
        let request = request.into_inner();
        let terms = search::terms(&request.terms).map_err(ServiceError::from)?;
        let limit = validate::page_limit(request.limit).map_err(ServiceError::from)? as usize;
        let applied_index = self
            .context
            .replica
            .read_barrier(consistency(request.consistency)?)
            .await?;
        let reader = self.context.replica.reader().clone();
        let online_only = request.online_only;
        let (found, more) = blocking(move || {
            presence::search(
                reader.db(),
                &terms,
                online_only,
                limit,
                validate::MAX_PAGE_BYTES,
            )
        })
        .await
        .map_err(ServiceError::from)?;
        Ok(Response::new(SearchPeersResponse {
            peers: found
                .into_iter()
                .map(|(peer, entry)| messaging::presence_of(&self.context, &peer, entry))
                .collect(),
            applied_index,
            more,
        }))
    }

    async fn send_message(
        &self,
        request: Request<SendMessageRequest>,
    ) -> Result<Response<SendMessageResponse>, Status> {
        let (from, session) = self.session_of(&request)?;
        let fate =
            messaging::send_checked(&self.context, from, session, request.into_inner()).await?;
        Ok(Response::new(SendMessageResponse {
            delivered: matches!(fate, messaging::Fate::Delivered),
            queued: matches!(fate, messaging::Fate::Queued),
        }))
    }

    async fn create_conference(
        &self,
        request: Request<CreateConferenceRequest>,
    ) -> Result<Response<ConferenceResponse>, Status> {
        let owner = self.authenticate(&request)?;
        let request = request.into_inner();
        conference::check_id(&request.id)?;
        conference::check_text("title", &request.title, conference::MAX_TITLE_LEN)?;
        conference::check_text(
            "description",
            &request.description,
            conference::MAX_TEXT_LEN,
        )?;
        let op = Op::ConferenceCreate {
            owner: *owner.as_bytes(),
            id: request.id.clone(),
            title: request.title,
            description: request.description,
            start_at_ms: request.start_at_ms,
        };
        self.conference_op(&request.id, op).await
    }

    async fn invite(
        &self,
        request: Request<InviteRequest>,
    ) -> Result<Response<ConferenceResponse>, Status> {
        let owner = self.authenticate(&request)?;
        let request = request.into_inner();
        conference::check_id(&request.conference_id)?;
        if request.peers.is_empty() || request.peers.len() > conference::MAX_INVITES_PER_CALL {
            return Err(ServiceError::BadField(format!(
                "invite 1-{} peers per call, got {}",
                conference::MAX_INVITES_PER_CALL,
                request.peers.len()
            ))
            .into());
        }
        let mut invitees = Vec::with_capacity(request.peers.len());
        for text in &request.peers {
            let peer: PeerId = text
                .parse()
                .map_err(|error| ServiceError::BadField(format!("invitee {text:?}: {error}")))?;
            invitees.push(peer);
        }
        let op = Op::ConferenceInvite {
            owner: *owner.as_bytes(),
            id: request.conference_id.clone(),
            invitees: invitees.iter().map(|peer| *peer.as_bytes()).collect(),
        };
        let response = self.conference_op(&request.conference_id, op).await?;
        // The invitation carries the context: each invitee gets it as a message (or in its mailbox).
        if let Some(context) = &response.get_ref().conference {
            let payload = prost::Message::encode_to_vec(context);
            for invitee in &invitees {
                let message = vesper_proto::v1::Message {
                    id: format!("invite-{}", request.conference_id),
                    from: owner.to_string(),
                    kind: conference::INVITE_KIND.into(),
                    payload: payload.clone(),
                    sent_at_ms: crate::raft::propose::now_ms(),
                    from_mailbox: false,
                    delivery_id: 0,
                };
                for fate in messaging::send_all(&self.context, &owner, invitee, vec![message]).await
                {
                    if let Err(error) = fate {
                        tracing::warn!(%error, invitee = %invitee, "cannot deliver an invitation");
                    }
                }
            }
        }
        Ok(response)
    }

    async fn answer_invitation(
        &self,
        request: Request<AnswerInvitationRequest>,
    ) -> Result<Response<ConferenceResponse>, Status> {
        let peer = self.authenticate(&request)?;
        let request = request.into_inner();
        conference::check_id(&request.conference_id)?;
        let op = Op::ConferenceAnswer {
            peer: *peer.as_bytes(),
            id: request.conference_id.clone(),
            accept: request.accept,
        };
        self.conference_op(&request.conference_id, op).await
    }

    async fn get_conference(
        &self,
        request: Request<GetConferenceRequest>,
    ) -> Result<Response<ConferenceResponse>, Status> {
        self.authenticate(&request)?;
        let request = request.into_inner();
        conference::check_id(&request.conference_id)?;
        self.context
            .replica
            .read_barrier(ReadConsistency::Linearizable)
            .await?;
        match store_conference::get(self.context.replica.reader().db(), &request.conference_id)
            .map_err(ServiceError::from)?
        {
            Some(entry) => Ok(Response::new(ConferenceResponse {
                conference: Some(conference::context(&request.conference_id, &entry)),
            })),
            None => Err(ServiceError::from(crate::command::Rejection::UnknownConference).into()),
        }
    }

    async fn post_chat(
        &self,
        request: Request<PostChatRequest>,
    ) -> Result<Response<PostChatResponse>, Status> {
        let from = self.authenticate(&request)?;
        let request = request.into_inner();
        conference::check_id(&request.conference_id)?;
        conference::check_text("text", &request.text, conference::MAX_TEXT_LEN)?;
        if request.id.is_empty() || request.id.len() > messaging::MAX_MESSAGE_ID_LEN {
            return Err(ServiceError::BadField(format!(
                "chat id must be 1-{} bytes",
                messaging::MAX_MESSAGE_ID_LEN
            ))
            .into());
        }
        let op = Op::ConferenceChat {
            from: *from.as_bytes(),
            id: request.conference_id,
            message_id: request.id,
            text: request.text,
        };
        match self.context.replica.propose_accepted(op).await? {
            (CommandResponse::Chat(chat), _) => Ok(Response::new(PostChatResponse {
                sequence: chat.sequence,
            })),
            (other, _) => Err(unexpected(other)),
        }
    }
}

/// What list and search share: where, how many, from where, how consistent.
struct PageRequest {
    /// The peer reading, for the namespace's ACL.
    reader: crate::command::PeerKey,
    namespace: String,
    limit: u32,
    page_token: String,
    consistency: i32,
}

impl LeafService {
    /// Validates a page request, waits for the read's consistency, runs `query` off the async threads and
    /// converts the page. Returns (records, next page token, applied index).
    async fn read_page(
        &self,
        page: PageRequest,
        query: impl FnOnce(
                &rocksdb::DB,
                &str,
                Option<&str>,
                usize,
            ) -> Result<(Vec<(String, StoredRecord)>, bool), StoreError>
            + Send
            + 'static,
    ) -> Result<(Vec<vesper_proto::v1::Record>, String, u64), ServiceError> {
        validate::namespace(&page.namespace)?;
        let limit = validate::page_limit(page.limit)? as usize;
        let applied_index = self
            .context
            .replica
            .read_barrier(consistency(page.consistency)?)
            .await?;
        let reader = self.context.replica.reader().clone();
        let namespace = page.namespace.clone();
        let after = (!page.page_token.is_empty()).then_some(page.page_token);
        let peer = page.reader;
        let (found, more) = blocking(move || {
            let db = reader.db();
            if !may_read(records::acl(db, &namespace)?.as_ref(), &peer) {
                return Ok(Err(Rejection::NamespaceRead(namespace)));
            }
            query(db, &namespace, after.as_deref(), limit).map(Ok)
        })
        .await??;
        let (records, next_page_token) = convert::page(&page.namespace, found, more);
        Ok((records, next_page_token, applied_index))
    }

    /// Proposes a conference command and answers with the conference it produced.
    async fn conference_op(
        &self,
        id: &str,
        op: Op,
    ) -> Result<Response<ConferenceResponse>, Status> {
        match self.context.replica.propose_accepted(op).await? {
            (CommandResponse::Conference(entry), _) => Ok(Response::new(ConferenceResponse {
                conference: Some(conference::context(id, &entry)),
            })),
            (other, _) => Err(unexpected(other)),
        }
    }

    /// Checks the namespace ACL, ownership, compare-and-set and, for a put of `put_size` bytes, the owner's
    /// index quota against the local replica before anything is proposed. Returns whether the record exists.
    async fn precheck(
        &self,
        peer: &PeerId,
        namespace: &str,
        key: &str,
        expected_version: Option<u64>,
        put_size: Option<(u64, RecordQuota)>,
    ) -> Result<bool, ServiceError> {
        let reader = self.context.replica.reader().clone();
        let (owned_namespace, owned_key) = (namespace.to_string(), key.to_string());
        let writer = *peer.as_bytes();
        let (current, acl, usage) = blocking(move || {
            let db = reader.db();
            let current = records::get(db, &owned_namespace, &owned_key)?;
            // The creator is charged for its record, also when a group member writes it.
            let owner = current.as_ref().map_or(writer, |record| record.owner);
            Ok((
                current,
                records::acl(db, &owned_namespace)?,
                records::usage(db, &owner)?,
            ))
        })
        .await?;
        records::check_write(
            current.as_ref(),
            peer.as_bytes(),
            expected_version,
            namespace,
            acl.as_ref(),
        )?;
        if let Some((size, quota)) = put_size {
            let old_size = current.as_ref().map(|record| {
                records::record_size(namespace, key, &record.attributes, record.value.len())
            });
            records::charge(usage, old_size, size, quota)?;
        }
        Ok(current.is_some())
    }
}

fn unexpected(response: CommandResponse) -> Status {
    ServiceError::Internal(format!(
        "state machine answered with an unexpected response: {response:?}"
    ))
    .into()
}

/// Runs one session: challenge, attach (presence goes online through Raft), mailbox drain, then keepalives and
/// acknowledgements until the leaf goes away or the node stops. A session that ends without a goodbye leaves
/// the peer online for the grace period, so it can re-attach anywhere without an offline flap.
async fn run_session(
    context: Arc<LeafState>,
    mut inbound: Streaming<ClientFrame>,
    tx: sessions::Outbound,
    shutdown: CancellationToken,
) {
    let nonce: [u8; NONCE_LEN] = rand::random();
    let challenge = ServerFrame {
        frame: Some(server_frame::Frame::Challenge(Challenge {
            nonce: nonce.to_vec(),
            server_peer_id: context.me.peer_id.clone(),
        })),
    };
    if tx.send(Ok(Box::new(challenge))).await.is_err() {
        return;
    }
    let (peer, message_batches) =
        match tokio::time::timeout(ATTACH_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(ClientFrame {
                frame: Some(client_frame::Frame::Attach(attach)),
            }))) => match session::verify_attach(&attach, &nonce, &context.me.peer_id) {
                Ok(peer) => (peer, attach.message_batches),
                Err(error) => {
                    let _ = tx
                        .send(Err(ServiceError::Unauthenticated(error.to_string()).into()))
                        .await;
                    return;
                }
            },
            Ok(Ok(Some(_))) => {
                let _ = tx
                    .send(Err(ServiceError::Unauthenticated(
                        "the first frame of a session must be attach".into(),
                    )
                    .into()))
                    .await;
                return;
            }
            Ok(Ok(None)) | Ok(Err(_)) => return,
            Err(_) => {
                let _ = tx
                    .send(Err(ServiceError::Unauthenticated(format!(
                        "no attach within {ATTACH_TIMEOUT:?}"
                    ))
                    .into()))
                    .await;
                return;
            }
        };
    let Some(host) = context.replica.node_id() else {
        let _ = tx.send(Err(ServiceError::NotInCluster.into_status())).await;
        return;
    };
    let session = context.sessions.open(peer, tx.clone(), message_batches);
    // The event feed is subscribed when the first watch arrives, before its catch-up is computed, so no event
    // between the catch-up and the live feed is missed. Sessions without watches never wake up for events.
    let mut events: Option<tokio::sync::broadcast::Receiver<Arc<crate::events::Event>>> = None;
    let mut watches = watch::Watches::new(*peer.as_bytes());
    let span = tracing::info_span!("session", peer_id = %peer, session = session.id());
    // Instrumented, not entered: an entered span guard held across awaits leaks into other tasks' logs.
    async move {
    let attach = Op::PresenceAttach {
        peer: *peer.as_bytes(),
        host,
        session: session.id(),
    };
    // Boxed, here and below: the session task lives as long as the leaf is attached, and its size is that of
    // its largest state; a proposal inlined there would be carried by every idle session.
    if let Err(error) = Box::pin(context.replica.propose(attach)).await {
        tracing::warn!(%error, "cannot record the attach");
        let _ = tx.send(Err(error.into_status())).await;
        return;
    }
    tracing::info!("leaf attached");
    let welcome = ServerFrame {
        frame: Some(server_frame::Frame::Welcome(Welcome {
            session_token: session.token().to_string(),
            peer_id: peer.to_string(),
            members: context.replica.members().unwrap_or_default(),
            keepalive_interval_ms: context.config.keepalive_interval_ms as u32,
            send_batches: true,
        })),
    };
    if tx.send(Ok(Box::new(welcome))).await.is_err() {
        return;
    }
    // The mailbox drains while this loop reads the acknowledgements it waits for.
    let drain = {
        let context = context.clone();
        async move {
            match messaging::drain_mailbox(&context, peer).await {
                Ok(0) => {}
                Ok(count) => tracing::info!(count, "delivered mailbox"),
                Err(error) => tracing::warn!(%error, "mailbox drain stopped"),
            }
        }
    };
    // Boxed and dropped once done: an idle session should not carry the drain's state for its whole life.
    let mut drain = Some(Box::pin(drain));
    let ttl = context.config.session_ttl();
    // Sends run as one task per frame (a SendFrame, or a SendBatch); each task returns what it held in flight.
    let mut sends = tokio::task::JoinSet::<InFlight>::new();
    let mut sends_in_flight = InFlight::default();
    let mut goodbye = false;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            () = async { drain.as_mut().expect("guarded by is_some").await }, if drain.is_some() => drain = None,
            Some(done) = sends.join_next(), if !sends.is_empty() => {
                // A send task catches its own panic, so it always gives its share back.
                sends_in_flight.remove(done.unwrap_or_default());
            }
            event = next_event(&mut events) => {
                let frames = match event {
                    Ok(event) => watches.on_event(&context, &event),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "session fell behind the event feed; resetting its watches");
                        let current = context.replica.raft().map(crate::raft::propose::applied_index).unwrap_or(0);
                        watches.reset_all(&context, current).unwrap_or_default()
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                for frame in frames {
                    if tx.send(Ok(Box::new(frame))).await.is_err() {
                        break;
                    }
                }
            }
            frame = tokio::time::timeout(ttl, inbound.message()) => match frame {
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::Ping(ping)) }))) => {
                    let pong = ServerFrame { frame: Some(server_frame::Frame::Pong(Pong { nonce: ping.nonce })) };
                    if tx.send(Ok(Box::new(pong))).await.is_err() {
                        break;
                    }
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::MessageAck(ack)) }))) => {
                    session.acknowledge(ack.delivery_id);
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::MessageAcks(acks)) }))) => {
                    for id in acks.delivery_ids {
                        session.acknowledge(id);
                    }
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::Watch(request)) }))) => {
                    let watch_id = request.watch_id;
                    if events.is_none() {
                        events = Some(context.events.subscribe());
                    }
                    let frames = match Box::pin(watches.add(&context, request)).await {
                        Ok(frames) => frames,
                        Err(error) => vec![ServerFrame {
                            frame: Some(server_frame::Frame::WatchRefused(WatchRefused {
                                watch_id,
                                reason: error.to_string(),
                            })),
                        }],
                    };
                    for frame in frames {
                        if tx.send(Ok(Box::new(frame))).await.is_err() {
                            break;
                        }
                    }
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::Send(frame)) }))) => {
                    if !start_sends(&context, peer, session.id(), vec![frame], &tx, &mut sends, &mut sends_in_flight).await {
                        break;
                    }
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::SendBatch(batch)) }))) => {
                    if !start_sends(&context, peer, session.id(), batch.sends, &tx, &mut sends, &mut sends_in_flight).await {
                        break;
                    }
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::ConnectAnswer(answer)) }))) => {
                    session.answer(answer);
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::Unwatch(request)) }))) => {
                    watches.remove(request.watch_id);
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::Detach(_)) }))) => {
                    goodbye = true;
                    break;
                }
                Ok(Ok(Some(_))) => {
                    let _ = tx.send(Err(ServiceError::Malformed("unexpected frame on an attached session".into()).into())).await;
                    break;
                }
                Ok(Ok(None)) | Ok(Err(_)) => break,
                Err(_) => {
                    tracing::info!(?ttl, "no keepalive within the session TTL; closing");
                    break;
                }
            }
        }
    }
    let session_id = session.id();
    // Stop taking deliveries and calls for this session at once.
    drop(session);
    let detach = Op::PresenceDetach {
        peer: *peer.as_bytes(),
        session: session_id,
    };
    if goodbye {
        tracing::info!("leaf detached");
    } else {
        // No goodbye: give the leaf the grace period to come back (here or elsewhere) before it shows offline.
        // A re-attach changes the session in presence, which turns this detach into a no-op.
        tracing::info!(grace = ?context.config.session_grace(), "session lost");
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(context.config.session_grace()) => {}
        }
    }
    if let Err(error) = Box::pin(context.replica.propose(detach)).await {
        tracing::warn!(%error, "cannot record the detach; the host expiry will");
    }
    }
    .instrument(span)
    .await
}

/// The next event of the feed, or never when the session has not subscribed (it has no watch).
async fn next_event(
    events: &mut Option<tokio::sync::broadcast::Receiver<Arc<crate::events::Event>>>,
) -> Result<Arc<crate::events::Event>, tokio::sync::broadcast::error::RecvError> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

/// Starts the sends of one SendFrame or SendBatch as one task, within the session's limit of sends in flight;
/// a send over that limit, past the batch size or without a message is answered at once with its error. False
/// when the session's stream is gone.
async fn start_sends(
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
