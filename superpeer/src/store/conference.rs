//! Conferences (the seed scenario) as stored in RocksDB.
//!
//! ```text
//! conferences: id                                   -> postcard(ConferenceEntry)   context + roster
//! conf_chat:   id \0 'S' sequence (8, BE)           -> postcard(ChatEntry)         the chat, in order
//! conf_chat:   id \0 'I' author key (32) message id -> sequence (8, BE)            dedup of retried posts
//! ```
//!
//! Chat lines go through the Raft log, which gives them one order for every participant (their sequence is
//! assigned at apply) and lets a participant that re-attaches elsewhere resume the chat by index.

use std::collections::HashMap;

use rocksdb::{IteratorMode, WriteBatch, DB};

use super::{cf, decode, encode, StoreError, CF_CONFERENCES, CF_CONF_CHAT};
use crate::command::{ChatEntry, ConferenceEntry, Invitation, PeerKey, Rejection, Response};

/// Reads a conference.
pub fn get(db: &DB, id: &str) -> Result<Option<ConferenceEntry>, StoreError> {
    db.get_pinned_cf(cf(db, CF_CONFERENCES), id.as_bytes())?
        .map(|bytes| decode("conference", &bytes))
        .transpose()
}

/// Conferences whose scheduled start has passed but that are not marked started.
pub fn due(db: &DB, now_ms: u64) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for item in db.iterator_cf(cf(db, CF_CONFERENCES), IteratorMode::Start) {
        let (key, bytes) = item?;
        let entry: ConferenceEntry = decode("conference", &bytes)?;
        if !entry.started && entry.start_at_ms <= now_ms {
            out.push(String::from_utf8_lossy(&key).into_owned());
        }
    }
    Ok(out)
}

fn chat_key(id: &str, sequence: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 10);
    key.extend_from_slice(id.as_bytes());
    key.extend_from_slice(b"\0S");
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

fn dedup_key(id: &str, from: &PeerKey, message_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 34 + message_id.len());
    key.extend_from_slice(id.as_bytes());
    key.extend_from_slice(b"\0I");
    key.extend_from_slice(from);
    key.extend_from_slice(message_id.as_bytes());
    key
}

/// Applies conference commands into a write batch, seeing earlier commands of the same batch.
#[derive(Default)]
pub struct ConferenceWriter {
    pending: HashMap<String, ConferenceEntry>,
    pending_chat: HashMap<Vec<u8>, ChatEntry>,
    /// Chat lines stored by the current command, taken by `take_new_chats`.
    new_chats: Vec<(String, ChatEntry)>,
}

impl ConferenceWriter {
    /// The chat lines stored since the last call.
    pub fn take_new_chats(&mut self) -> Vec<(String, ChatEntry)> {
        std::mem::take(&mut self.new_chats)
    }

    fn current(&self, db: &DB, id: &str) -> Result<Option<ConferenceEntry>, StoreError> {
        match self.pending.get(id) {
            Some(entry) => Ok(Some(entry.clone())),
            None => get(db, id),
        }
    }

    fn store(
        &mut self,
        db: &DB,
        batch: &mut WriteBatch,
        id: &str,
        entry: ConferenceEntry,
    ) -> Result<Response, StoreError> {
        batch.put_cf(
            cf(db, CF_CONFERENCES),
            id.as_bytes(),
            encode("conference", &entry)?,
        );
        self.pending.insert(id.to_string(), entry.clone());
        Ok(Response::Conference(entry))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &mut self,
        db: &DB,
        batch: &mut WriteBatch,
        owner: PeerKey,
        id: &str,
        title: &str,
        description: &str,
        start_at_ms: u64,
        at_ms: u64,
    ) -> Result<Response, StoreError> {
        if self.current(db, id)?.is_some() {
            return Ok(Response::Rejected(Rejection::ConferenceExists));
        }
        let entry = ConferenceEntry {
            owner,
            title: title.to_string(),
            description: description.to_string(),
            start_at_ms,
            invitees: Default::default(),
            created_at_ms: at_ms,
            started: false,
            next_sequence: 1,
        };
        self.store(db, batch, id, entry)
    }

    pub fn invite(
        &mut self,
        db: &DB,
        batch: &mut WriteBatch,
        owner: PeerKey,
        id: &str,
        invitees: &[PeerKey],
    ) -> Result<Response, StoreError> {
        let Some(mut entry) = self.current(db, id)? else {
            return Ok(Response::Rejected(Rejection::UnknownConference));
        };
        if entry.owner != owner {
            return Ok(Response::Rejected(Rejection::NotConferenceOwner));
        }
        for invitee in invitees {
            // Inviting again keeps an earlier answer.
            entry
                .invitees
                .entry(*invitee)
                .or_insert(Invitation::Invited);
        }
        self.store(db, batch, id, entry)
    }

    pub fn answer(
        &mut self,
        db: &DB,
        batch: &mut WriteBatch,
        peer: PeerKey,
        id: &str,
        accept: bool,
    ) -> Result<Response, StoreError> {
        let Some(mut entry) = self.current(db, id)? else {
            return Ok(Response::Rejected(Rejection::UnknownConference));
        };
        let Some(answer) = entry.invitees.get_mut(&peer) else {
            return Ok(Response::Rejected(Rejection::NotInvited));
        };
        *answer = if accept {
            Invitation::Accepted
        } else {
            Invitation::Declined
        };
        self.store(db, batch, id, entry)
    }

    pub fn start(
        &mut self,
        db: &DB,
        batch: &mut WriteBatch,
        id: &str,
    ) -> Result<Response, StoreError> {
        let Some(mut entry) = self.current(db, id)? else {
            return Ok(Response::Rejected(Rejection::UnknownConference));
        };
        if entry.started {
            return Ok(Response::Done);
        }
        entry.started = true;
        self.store(db, batch, id, entry)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn chat(
        &mut self,
        db: &DB,
        batch: &mut WriteBatch,
        from: PeerKey,
        id: &str,
        message_id: &str,
        text: &str,
        at_ms: u64,
    ) -> Result<Response, StoreError> {
        let Some(mut entry) = self.current(db, id)? else {
            return Ok(Response::Rejected(Rejection::UnknownConference));
        };
        let participant =
            entry.owner == from || entry.invitees.get(&from) == Some(&Invitation::Accepted);
        if !participant {
            return Ok(Response::Rejected(Rejection::NotParticipant));
        }
        let dedup = dedup_key(id, &from, message_id);
        if let Some(existing) = self.pending_chat.get(&dedup) {
            return Ok(Response::Chat(existing.clone()));
        }
        if let Some(bytes) = db.get_pinned_cf(cf(db, CF_CONF_CHAT), &dedup)? {
            let sequence = u64::from_be_bytes(
                bytes
                    .as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("chat dedup entry is not 8 bytes"))?,
            );
            let stored = db
                .get_pinned_cf(cf(db, CF_CONF_CHAT), chat_key(id, sequence))?
                .ok_or(StoreError::Corrupt(
                    "chat dedup entry points at a missing line",
                ))?;
            return Ok(Response::Chat(decode("chat line", &stored)?));
        }
        let chat = ChatEntry {
            sequence: entry.next_sequence,
            from,
            message_id: message_id.to_string(),
            text: text.to_string(),
            sent_at_ms: at_ms,
        };
        entry.next_sequence += 1;
        batch.put_cf(
            cf(db, CF_CONF_CHAT),
            chat_key(id, chat.sequence),
            encode("chat line", &chat)?,
        );
        batch.put_cf(cf(db, CF_CONF_CHAT), &dedup, chat.sequence.to_be_bytes());
        self.pending_chat.insert(dedup, chat.clone());
        self.new_chats.push((id.to_string(), chat.clone()));
        self.store(db, batch, id, entry)?;
        Ok(Response::Chat(chat))
    }
}
