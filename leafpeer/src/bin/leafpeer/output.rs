//! How results are printed: a line of text for people, or one JSON document per result for scripts; the JSON
//! and text forms of presences, records and conferences.

use serde_json::{json, Value};
use vesper_leafpeer::{ConferenceContext, InvitationState, Leaf, Presence, PresenceStatus, Record};

/// The attached leaf a command works on, and how it prints.
pub struct Attached<'a> {
    /// The leaf, attached for this command (detached after it).
    pub leaf: &'a Leaf,
    /// How results are printed.
    pub out: Output,
}

/// Text or JSON (`--json`).
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// One JSON document per result.
    pub json: bool,
}

impl Output {
    /// Prints `value` in JSON mode, else the text `text` makes (only made when needed).
    pub fn print(self, value: Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{value}");
        } else {
            println!("{}", text());
        }
    }
}

/// The word for a presence status.
pub fn status_name(status: i32) -> &'static str {
    match PresenceStatus::try_from(status) {
        Ok(PresenceStatus::Online) => "online",
        Ok(PresenceStatus::Away) => "away",
        Ok(PresenceStatus::Busy) => "busy",
        _ => "offline",
    }
}

/// A presence for scripts.
pub fn presence_json(presence: &Presence) -> Value {
    json!({
        "peer_id": presence.peer_id,
        "status": status_name(presence.status),
        "note": presence.note,
        "host_node_id": presence.host_node_id,
        "host": presence.host_leaf_addr,
        "changed_at_ms": presence.changed_at_ms,
        "attributes": presence.attributes,
        "nat_class": presence.nat_class,
        "candidates": presence.candidates,
        "sessions": presence
            .sessions
            .iter()
            .map(|session| json!({
                "host_node_id": session.host_node_id,
                "host": session.host_leaf_addr,
                "attached_at_ms": session.attached_at_ms,
            }))
            .collect::<Vec<_>>(),
    })
}

/// A record for scripts (the value as text).
pub fn record_json(record: &Record) -> Value {
    json!({
        "namespace": record.namespace,
        "key": record.key,
        "owner": record.owner,
        "version": record.version,
        "attributes": record.attributes,
        "value": String::from_utf8_lossy(&record.value),
        "updated_at_ms": record.updated_at_ms,
    })
}

/// The word for an invitee's answer.
fn answer_name(state: i32) -> &'static str {
    match InvitationState::try_from(state) {
        Ok(InvitationState::Accepted) => "accepted",
        Ok(InvitationState::Declined) => "declined",
        _ => "invited",
    }
}

/// A conference's context and roster for scripts.
pub fn conference_json(context: &ConferenceContext) -> Value {
    json!({
        "id": context.id,
        "owner": context.owner,
        "title": context.title,
        "description": context.description,
        "start_at_ms": context.start_at_ms,
        "started": context.started,
        "invitees": context
            .invitees
            .iter()
            .map(|invitee| json!({ "peer_id": invitee.peer_id, "state": answer_name(invitee.state) }))
            .collect::<Vec<_>>(),
    })
}

/// A conference's context and roster for people: a title line, then one line per invitee.
pub fn roster_text(context: &ConferenceContext) -> String {
    let mut text = format!(
        "{} \"{}\" by {}{}",
        context.id,
        context.title,
        context.owner,
        if context.started { " (started)" } else { "" }
    );
    for invitee in &context.invitees {
        text.push_str(&format!(
            "\n  {} {}",
            invitee.peer_id,
            answer_name(invitee.state)
        ));
    }
    text
}

/// Short form of a PeerId for chat lines.
pub fn short(peer: &str) -> &str {
    &peer[..peer.len().min(12)]
}
