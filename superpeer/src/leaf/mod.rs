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
//! The gRPC impl here only authenticates and delegates: [`records`], [`presence`], [`conference`] and
//! [`broker`] hold the calls of their kind, [`sends`] the send pipeline, [`actor`] the session task (one per
//! stream), [`messaging`] delivery and the mailbox, [`watch`] the watches.
//!
//! Checks happen in this order, so bad input never reaches Raft: session, then input validation (limits), then
//! ownership and compare-and-set against the local replica. Apply repeats the last two checks deterministically
//! for writes that raced.

mod actor;
pub mod broker;
pub mod conference;
pub(crate) mod convert;
pub mod listing;
pub mod load;
pub mod members;
mod presence;
mod records;
mod sends;

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
use vesper_proto::v1::leaf_server::{Leaf, LeafServer};
use vesper_proto::v1::{
    AnswerInvitationRequest, ClientFrame, ConferenceResponse, ConnectRequest, ConnectResponse,
    CreateConferenceRequest, DeleteRecordRequest, DeleteRecordResponse, GetConferenceRequest,
    GetRecordRequest, GetRecordResponse, InviteRequest, ListRecordsRequest, ListRecordsResponse,
    LookupPeerRequest, LookupPeerResponse, PostChatRequest, PostChatResponse,
    PublishEndpointsRequest, PutRecordRequest, PutRecordResponse, ReadConsistency,
    SearchPeersRequest, SearchPeersResponse, SearchRecordsRequest, SearchRecordsResponse,
    SendMessageRequest, SendMessageResponse, ServerFrame, SetPresenceRequest, SetPresenceResponse,
};
use vesper_proto::{validate, PeerId, SESSION_METADATA_KEY};

use crate::command::Response as CommandResponse;
use crate::error::ServiceError;
use crate::leaf::state::LeafState;
use crate::metrics::{RecordOp, RecordResult};

/// Time a leaf has to answer the challenge after opening a session.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued towards one leaf before the session task waits for the leaf to read.
const SESSION_OUTBOUND_QUEUE: usize = 64;
/// Pipelined sends (and bytes of their payloads) one session may have in flight; more are refused with
/// RESOURCE_EXHAUSTED.
pub use validate::{MAX_SENDS_IN_FLIGHT, MAX_SEND_BYTES_IN_FLIGHT};

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
    /// Counts a record write by how it ended, judged from the status code the caller sees.
    fn count_write<T>(&self, op: RecordOp, outcome: &Result<T, Status>) {
        let result = match outcome {
            Ok(_) => RecordResult::Ok,
            Err(status) => match status.code() {
                tonic::Code::FailedPrecondition => RecordResult::Conflict,
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Internal
                | tonic::Code::Unknown => RecordResult::Failed,
                _ => RecordResult::Refused,
            },
        };
        self.context.record_metrics.write(op, result);
    }
}

/// The server span of a unary Leaf call that arrived with a sampled trace context in its metadata; no span (and
/// no cost) otherwise, since a super peer only follows the sampling its callers decided.
fn unary_span<T>(method: &'static str, request: &Request<T>) -> tracing::Span {
    let Some((traceparent, tracestate)) = vesper_proto::trace::metadata_fields(request.metadata())
    else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(
        "rpc.server",
        otel.kind = "server",
        otel.name = %format_args!("vesper.v1.Leaf/{method}"),
        rpc.system = "grpc",
        rpc.service = "vesper.v1.Leaf",
        rpc.method = method,
    );
    vesper_proto::trace::adopt(&span, traceparent, tracestate);
    span
}

#[tonic::async_trait]
impl Leaf for LeafService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<ClientFrame>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let remote = request.remote_addr().map(|addr| addr.ip());
        let ip = remote.unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
        let max = self.context.config.max_sessions_per_ip;
        let slot = self.context.sessions.open_stream(ip, max).ok_or_else(|| {
            self.context
                .session_metrics
                .refused(crate::metrics::SessionRefusal::PerIpLimit);
            ServiceError::LimitReached(format!(
                "too many sessions from {ip} (at most {max} at once); close some or retry later"
            ))
        })?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(SESSION_OUTBOUND_QUEUE);
        let context = self.context.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            actor::run_session(context, inbound, tx, remote, shutdown).await;
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
        let span = unary_span("PutRecord", &request);
        let outcome = records::put_record(self, request).instrument(span).await;
        self.count_write(RecordOp::Put, &outcome);
        outcome
    }

    async fn get_record(
        &self,
        request: Request<GetRecordRequest>,
    ) -> Result<Response<GetRecordResponse>, Status> {
        records::get_record(self, request).await
    }

    async fn delete_record(
        &self,
        request: Request<DeleteRecordRequest>,
    ) -> Result<Response<DeleteRecordResponse>, Status> {
        let span = unary_span("DeleteRecord", &request);
        let outcome = records::delete_record(self, request).instrument(span).await;
        self.count_write(RecordOp::Delete, &outcome);
        outcome
    }

    async fn list_records(
        &self,
        request: Request<ListRecordsRequest>,
    ) -> Result<Response<ListRecordsResponse>, Status> {
        records::list_records(self, request).await
    }

    async fn search_records(
        &self,
        request: Request<SearchRecordsRequest>,
    ) -> Result<Response<SearchRecordsResponse>, Status> {
        records::search_records(self, request).await
    }

    async fn set_presence(
        &self,
        request: Request<SetPresenceRequest>,
    ) -> Result<Response<SetPresenceResponse>, Status> {
        presence::set_presence(self, request).await
    }

    async fn publish_endpoints(
        &self,
        request: Request<PublishEndpointsRequest>,
    ) -> Result<Response<SetPresenceResponse>, Status> {
        presence::publish_endpoints(self, request).await
    }

    async fn connect_peer(
        &self,
        request: Request<ConnectRequest>,
    ) -> Result<Response<ConnectResponse>, Status> {
        broker::connect_peer(self, request).await
    }

    async fn offer_super_peer(
        &self,
        request: Request<vesper_proto::v1::OfferSuperPeerRequest>,
    ) -> Result<Response<vesper_proto::v1::OfferSuperPeerResponse>, Status> {
        let (peer, session) = self.session_of(&request)?;
        let ip = request
            .remote_addr()
            .map(|addr| addr.ip())
            .ok_or_else(|| ServiceError::Internal("the call's source address is unknown".into()))?;
        // An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d; dial it back as IPv4.
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        };
        let answer = self
            .context
            .offers
            .handle(peer, session, ip, request.get_ref())
            .await?;
        Ok(Response::new(answer))
    }

    async fn lookup_peer(
        &self,
        request: Request<LookupPeerRequest>,
    ) -> Result<Response<LookupPeerResponse>, Status> {
        presence::lookup_peer(self, request).await
    }

    async fn search_peers(
        &self,
        request: Request<SearchPeersRequest>,
    ) -> Result<Response<SearchPeersResponse>, Status> {
        presence::search_peers(self, request).await
    }

    async fn send_message(
        &self,
        request: Request<SendMessageRequest>,
    ) -> Result<Response<SendMessageResponse>, Status> {
        sends::send_message(self, request).await
    }

    async fn create_conference(
        &self,
        request: Request<CreateConferenceRequest>,
    ) -> Result<Response<ConferenceResponse>, Status> {
        conference::create_conference(self, request).await
    }

    async fn invite(
        &self,
        request: Request<InviteRequest>,
    ) -> Result<Response<ConferenceResponse>, Status> {
        conference::invite(self, request).await
    }

    async fn answer_invitation(
        &self,
        request: Request<AnswerInvitationRequest>,
    ) -> Result<Response<ConferenceResponse>, Status> {
        conference::answer_invitation(self, request).await
    }

    async fn get_conference(
        &self,
        request: Request<GetConferenceRequest>,
    ) -> Result<Response<ConferenceResponse>, Status> {
        conference::get_conference(self, request).await
    }

    async fn post_chat(
        &self,
        request: Request<PostChatRequest>,
    ) -> Result<Response<PostChatResponse>, Status> {
        conference::post_chat(self, request).await
    }
}

fn unexpected(response: CommandResponse) -> Status {
    ServiceError::Internal(format!(
        "state machine answered with an unexpected response: {response:?}"
    ))
    .into()
}
