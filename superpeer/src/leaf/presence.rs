//! The presence calls of the Leaf service: a peer's own status and endpoints (sequence-numbered, so replays
//! change nothing), lookup and search of peers.

use super::messaging;
use super::{consistency, unexpected, LeafService};
use crate::command::{
    Op, PresenceEndpoints, PresenceSet, PresenceStatus as StoredStatus, Response as CommandResponse,
};
use crate::error::ServiceError;
use crate::sessions::UpdateKind;
use crate::store::blocking;
use crate::store::presence;
use tonic::{Request, Response, Status};
use vesper_proto::search;
use vesper_proto::v1::{
    LookupPeerRequest, LookupPeerResponse, PresenceStatus, PublishEndpointsRequest,
    SearchPeersRequest, SearchPeersResponse, SetPresenceRequest, SetPresenceResponse,
};
use vesper_proto::{validate, PeerId};

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

/// `Leaf.SetPresence`.
pub(super) async fn set_presence(
    service: &LeafService,
    request: Request<SetPresenceRequest>,
) -> Result<Response<SetPresenceResponse>, Status> {
    let (peer, session) = service.session_of(&request)?;
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
    validate::attributes(&service.context.config.limits, &request.attributes)
        .map_err(ServiceError::from)?;
    service.check_sequence(session, UpdateKind::Status, request.sequence)?;
    let op: Op = PresenceSet {
        peer: *peer.as_bytes(),
        session,
        status,
        note: request.note,
        attributes: request.attributes.into_iter().collect(),
    }
    .into();
    service.propose_presence(peer, op).await
}

/// `Leaf.PublishEndpoints`.
pub(super) async fn publish_endpoints(
    service: &LeafService,
    request: Request<PublishEndpointsRequest>,
) -> Result<Response<SetPresenceResponse>, Status> {
    let (peer, session) = service.session_of(&request)?;
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
    service.check_sequence(session, UpdateKind::Endpoints, request.sequence)?;
    let op: Op = PresenceEndpoints {
        peer: *peer.as_bytes(),
        session,
        candidates: request.candidates,
        nat_class: nat_class.as_str().to_string(),
    }
    .into();
    service.propose_presence(peer, op).await
}

/// `Leaf.LookupPeer`.
pub(super) async fn lookup_peer(
    service: &LeafService,
    request: Request<LookupPeerRequest>,
) -> Result<Response<LookupPeerResponse>, Status> {
    service.authenticate(&request)?;
    let request = request.into_inner();
    let peer: PeerId = request
        .peer_id
        .parse()
        .map_err(|error| ServiceError::BadField(format!("peer_id: {error}")))?;
    let applied_index = service
        .context
        .replica
        .read_barrier(consistency(request.consistency)?)
        .await?;
    let entry = presence::get(service.context.replica.reader().db(), peer.as_bytes())
        .map_err(ServiceError::from)?;
    Ok(Response::new(LookupPeerResponse {
        presence: entry
            .map(|entry| messaging::presence_of(&service.context, peer.as_bytes(), entry)),
        applied_index,
    }))
}

/// `Leaf.SearchPeers`.
pub(super) async fn search_peers(
    service: &LeafService,
    request: Request<SearchPeersRequest>,
) -> Result<Response<SearchPeersResponse>, Status> {
    service.authenticate(&request)?;
    let request = request.into_inner();
    let terms = search::terms(&request.terms).map_err(ServiceError::from)?;
    let limit = validate::page_limit(request.limit).map_err(ServiceError::from)? as usize;
    let applied_index = service
        .context
        .replica
        .read_barrier(consistency(request.consistency)?)
        .await?;
    let reader = service.context.replica.reader().clone();
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
            .map(|(peer, entry)| messaging::presence_of(&service.context, &peer, entry))
            .collect(),
        applied_index,
        more,
    }))
}
