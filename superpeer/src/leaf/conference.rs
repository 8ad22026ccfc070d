//! Conferences for leaves: the Leaf service's conference calls (create, invite, answer, get, chat),
//! conversions, and the checks before anything is proposed.

use vesper_proto::v1::{ConferenceChat, ConferenceContext, InvitationState, Invitee};
use vesper_proto::{validate, PeerId};

use super::messaging;
use super::{unexpected, LeafService};
use crate::command::{
    self, ConferenceAnswer, ConferenceCreate, ConferenceInvite, Op, Response as CommandResponse,
};
use crate::command::{ChatEntry, ConferenceEntry, Invitation};
use crate::error::ServiceError;
use crate::store::conference as store_conference;
use tonic::{Request, Response, Status};
use vesper_proto::v1::{
    AnswerInvitationRequest, ConferenceResponse, CreateConferenceRequest, GetConferenceRequest,
    InviteRequest, PostChatRequest, PostChatResponse, ReadConsistency,
};

/// Longest conference title, in bytes.
pub const MAX_TITLE_LEN: usize = 256;
/// Longest description or chat line, in bytes.
pub const MAX_TEXT_LEN: usize = 4096;
/// Most peers invited in one call.
pub const MAX_INVITES_PER_CALL: usize = 256;
/// Message kind of the invitation each invitee receives (payload: the encoded ConferenceContext).
pub const INVITE_KIND: &str = "vesper.invite";

fn peer_text(key: &[u8; 32]) -> String {
    PeerId::from_public_key_bytes(key)
        .map(|peer| peer.to_string())
        .unwrap_or_default()
}

/// Checks a conference id (same rules as names).
pub fn check_id(id: &str) -> Result<(), ServiceError> {
    validate::kind(id).map_err(|_| {
        ServiceError::BadField(format!(
            "conference id {id:?} must be 1-64 characters of [a-z0-9._-], starting with a letter or digit"
        ))
    })
}

/// Checks a text field against its limit.
pub fn check_text(field: &'static str, text: &str, max: usize) -> Result<(), ServiceError> {
    if text.len() > max {
        return Err(validate::InvalidInput::TooLong {
            field,
            len: text.len(),
            max,
        }
        .into());
    }
    Ok(())
}

pub fn context(id: &str, entry: &ConferenceEntry) -> ConferenceContext {
    ConferenceContext {
        id: id.to_string(),
        owner: peer_text(&entry.owner),
        title: entry.title.clone(),
        description: entry.description.clone(),
        start_at_ms: entry.start_at_ms,
        invitees: entry
            .invitees
            .iter()
            .map(|(peer, answer)| Invitee {
                peer_id: peer_text(peer),
                state: match answer {
                    Invitation::Invited => InvitationState::Invited,
                    Invitation::Accepted => InvitationState::Accepted,
                    Invitation::Declined => InvitationState::Declined,
                } as i32,
            })
            .collect(),
        created_at_ms: entry.created_at_ms,
        started: entry.started,
    }
}

pub fn chat(conference: &str, entry: &ChatEntry) -> ConferenceChat {
    ConferenceChat {
        conference_id: conference.to_string(),
        sequence: entry.sequence,
        from: peer_text(&entry.from),
        id: entry.message_id.clone(),
        text: entry.text.clone(),
        sent_at_ms: entry.sent_at_ms,
    }
}

// The conference calls of the Leaf service.

impl LeafService {
    /// Proposes a conference command and answers with the conference it produced.
    async fn conference_op(
        &self,
        id: &str,
        op: Op,
    ) -> Result<Response<ConferenceResponse>, Status> {
        match self.context.replica.propose_accepted(op).await? {
            (CommandResponse::Conference(entry), _) => Ok(Response::new(ConferenceResponse {
                conference: Some(context(id, &entry)),
            })),
            (other, _) => Err(unexpected(other)),
        }
    }
}

/// `Leaf.CreateConference`.
pub(super) async fn create_conference(
    service: &LeafService,
    request: Request<CreateConferenceRequest>,
) -> Result<Response<ConferenceResponse>, Status> {
    let owner = service.authenticate(&request)?;
    let request = request.into_inner();
    check_id(&request.id)?;
    check_text("title", &request.title, MAX_TITLE_LEN)?;
    check_text("description", &request.description, MAX_TEXT_LEN)?;
    let op: Op = ConferenceCreate {
        owner: *owner.as_bytes(),
        id: request.id.clone(),
        title: request.title,
        description: request.description,
        start_at_ms: request.start_at_ms,
    }
    .into();
    service.conference_op(&request.id, op).await
}

/// `Leaf.Invite`.
pub(super) async fn invite(
    service: &LeafService,
    request: Request<InviteRequest>,
) -> Result<Response<ConferenceResponse>, Status> {
    let owner = service.authenticate(&request)?;
    let request = request.into_inner();
    check_id(&request.conference_id)?;
    if request.peers.is_empty() || request.peers.len() > MAX_INVITES_PER_CALL {
        return Err(ServiceError::BadField(format!(
            "invite 1-{} peers per call, got {}",
            MAX_INVITES_PER_CALL,
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
    let op: Op = ConferenceInvite {
        owner: *owner.as_bytes(),
        id: request.conference_id.clone(),
        invitees: invitees.iter().map(|peer| *peer.as_bytes()).collect(),
    }
    .into();
    let response = service.conference_op(&request.conference_id, op).await?;
    // The invitation carries the context: each invitee gets it as a message (or in its mailbox).
    if let Some(context) = &response.get_ref().conference {
        let payload = prost::Message::encode_to_vec(context);
        for invitee in &invitees {
            let message = vesper_proto::v1::Message {
                id: format!("invite-{}", request.conference_id),
                from: owner.to_string(),
                kind: INVITE_KIND.into(),
                payload: payload.clone(),
                sent_at_ms: crate::raft::propose::now_ms(),
                from_mailbox: false,
                delivery_id: 0,
                traceparent: String::new(),
                tracestate: String::new(),
            };
            for fate in messaging::send_all(&service.context, &owner, invitee, vec![message]).await
            {
                if let Err(error) = fate {
                    tracing::warn!(%error, invitee = %invitee, "cannot deliver an invitation");
                }
            }
        }
    }
    Ok(response)
}

/// `Leaf.AnswerInvitation`.
pub(super) async fn answer_invitation(
    service: &LeafService,
    request: Request<AnswerInvitationRequest>,
) -> Result<Response<ConferenceResponse>, Status> {
    let peer = service.authenticate(&request)?;
    let request = request.into_inner();
    check_id(&request.conference_id)?;
    let op: Op = ConferenceAnswer {
        peer: *peer.as_bytes(),
        id: request.conference_id.clone(),
        accept: request.accept,
    }
    .into();
    service.conference_op(&request.conference_id, op).await
}

/// `Leaf.GetConference`.
pub(super) async fn get_conference(
    service: &LeafService,
    request: Request<GetConferenceRequest>,
) -> Result<Response<ConferenceResponse>, Status> {
    service.authenticate(&request)?;
    let request = request.into_inner();
    check_id(&request.conference_id)?;
    service
        .context
        .replica
        .read_barrier(ReadConsistency::Linearizable)
        .await?;
    match store_conference::get(
        service.context.replica.reader().db(),
        &request.conference_id,
    )
    .map_err(ServiceError::from)?
    {
        Some(entry) => Ok(Response::new(ConferenceResponse {
            conference: Some(context(&request.conference_id, &entry)),
        })),
        None => Err(ServiceError::from(crate::command::Rejection::UnknownConference).into()),
    }
}

/// `Leaf.PostChat`.
pub(super) async fn post_chat(
    service: &LeafService,
    request: Request<PostChatRequest>,
) -> Result<Response<PostChatResponse>, Status> {
    let from = service.authenticate(&request)?;
    let request = request.into_inner();
    check_id(&request.conference_id)?;
    check_text("text", &request.text, MAX_TEXT_LEN)?;
    if request.id.is_empty() || request.id.len() > messaging::MAX_MESSAGE_ID_LEN {
        return Err(ServiceError::BadField(format!(
            "chat id must be 1-{} bytes",
            messaging::MAX_MESSAGE_ID_LEN
        ))
        .into());
    }
    let op: Op = command::ConferenceChat {
        from: *from.as_bytes(),
        id: request.conference_id,
        message_id: request.id,
        text: request.text,
    }
    .into();
    match service.context.replica.propose_accepted(op).await? {
        (CommandResponse::Chat(chat), _) => Ok(Response::new(PostChatResponse {
            sequence: chat.sequence,
        })),
        (other, _) => Err(unexpected(other)),
    }
}
