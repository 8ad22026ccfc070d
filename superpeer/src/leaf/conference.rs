//! Conferences for leaves: conversions and the checks before anything is proposed.

use vesper_proto::v1::{ConferenceChat, ConferenceContext, InvitationState, Invitee};
use vesper_proto::{validate, PeerId};

use crate::command::{ChatEntry, ConferenceEntry, Invitation};
use crate::error::ServiceError;

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
