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

use super::{
    cf, decode, encode, Applied, Apply, Changes, StoreError, CF_CONFERENCES, CF_CONF_CHAT,
};
use crate::command::{
    ChatEntry, ConferenceAnswer, ConferenceChat, ConferenceCreate, ConferenceEntry,
    ConferenceInvite, ConferenceStart, Invitation, PeerKey, Rejection, Response,
};
use crate::events::Change;

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
pub struct ConferenceWriter<'a> {
    db: &'a DB,
    pending: HashMap<String, ConferenceEntry>,
    pending_chat: HashMap<Vec<u8>, ChatEntry>,
    /// Changes made since the last `take_changes`: conferences changed and new chat lines.
    changes: Vec<Change>,
}

impl<'a> ConferenceWriter<'a> {
    pub fn new(db: &'a DB) -> Self {
        Self {
            db,
            pending: HashMap::new(),
            pending_chat: HashMap::new(),
            changes: Vec::new(),
        }
    }

    fn current(&self, id: &str) -> Result<Option<ConferenceEntry>, StoreError> {
        match self.pending.get(id) {
            Some(entry) => Ok(Some(entry.clone())),
            None => get(self.db, id),
        }
    }

    fn write(
        &mut self,
        batch: &mut WriteBatch,
        id: &str,
        entry: &ConferenceEntry,
    ) -> Result<(), StoreError> {
        batch.put_cf(
            cf(self.db, CF_CONFERENCES),
            id.as_bytes(),
            encode("conference", entry)?,
        );
        self.pending.insert(id.to_string(), entry.clone());
        Ok(())
    }

    /// Stores a changed conference and answers with it (a change for watches).
    fn store(
        &mut self,
        batch: &mut WriteBatch,
        id: &str,
        entry: ConferenceEntry,
    ) -> Result<Response, StoreError> {
        self.write(batch, id, &entry)?;
        self.changes.push(Change::Conference {
            id: id.to_string(),
            entry: entry.clone(),
        });
        Ok(Response::Conference(entry))
    }
}

impl Changes for ConferenceWriter<'_> {
    fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }
}

impl Apply<ConferenceCreate> for ConferenceWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &ConferenceCreate,
        at: Applied,
    ) -> Result<Response, StoreError> {
        if self.current(&op.id)?.is_some() {
            return Ok(Response::Rejected(Rejection::ConferenceExists));
        }
        let entry = ConferenceEntry {
            owner: op.owner,
            title: op.title.clone(),
            description: op.description.clone(),
            start_at_ms: op.start_at_ms,
            invitees: Default::default(),
            created_at_ms: at.at_ms,
            started: false,
            next_sequence: 1,
        };
        self.store(batch, &op.id, entry)
    }
}

impl Apply<ConferenceInvite> for ConferenceWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &ConferenceInvite,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        let Some(mut entry) = self.current(&op.id)? else {
            return Ok(Response::Rejected(Rejection::UnknownConference));
        };
        if entry.owner != op.owner {
            return Ok(Response::Rejected(Rejection::NotConferenceOwner));
        }
        for invitee in &op.invitees {
            // Inviting again keeps an earlier answer.
            entry
                .invitees
                .entry(*invitee)
                .or_insert(Invitation::Invited);
        }
        self.store(batch, &op.id, entry)
    }
}

impl Apply<ConferenceAnswer> for ConferenceWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &ConferenceAnswer,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        let Some(mut entry) = self.current(&op.id)? else {
            return Ok(Response::Rejected(Rejection::UnknownConference));
        };
        let Some(answer) = entry.invitees.get_mut(&op.peer) else {
            return Ok(Response::Rejected(Rejection::NotInvited));
        };
        *answer = if op.accept {
            Invitation::Accepted
        } else {
            Invitation::Declined
        };
        self.store(batch, &op.id, entry)
    }
}

impl Apply<ConferenceStart> for ConferenceWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &ConferenceStart,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        let Some(mut entry) = self.current(&op.id)? else {
            return Ok(Response::Rejected(Rejection::UnknownConference));
        };
        if entry.started {
            return Ok(Response::Done);
        }
        entry.started = true;
        self.store(batch, &op.id, entry)
    }
}

/// Stores a new chat line under the conference's next sequence; a retried post (same author and message id)
/// answers with the line stored the first time and changes nothing.
impl Apply<ConferenceChat> for ConferenceWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &ConferenceChat,
        at: Applied,
    ) -> Result<Response, StoreError> {
        let ConferenceChat {
            from,
            id,
            message_id,
            text,
        } = op;
        let db = self.db;
        let Some(mut entry) = self.current(id)? else {
            return Ok(Response::Rejected(Rejection::UnknownConference));
        };
        let participant =
            entry.owner == *from || entry.invitees.get(from) == Some(&Invitation::Accepted);
        if !participant {
            return Ok(Response::Rejected(Rejection::NotParticipant));
        }
        let dedup = dedup_key(id, from, message_id);
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
            from: *from,
            message_id: message_id.clone(),
            text: text.clone(),
            sent_at_ms: at.at_ms,
        };
        entry.next_sequence += 1;
        batch.put_cf(
            cf(db, CF_CONF_CHAT),
            chat_key(id, chat.sequence),
            encode("chat line", &chat)?,
        );
        batch.put_cf(cf(db, CF_CONF_CHAT), &dedup, chat.sequence.to_be_bytes());
        self.pending_chat.insert(dedup, chat.clone());
        // The conference's next sequence moved on; only the new line is a change for watches.
        self.write(batch, id, &entry)?;
        self.changes.push(Change::Chat {
            conference: id.clone(),
            chat: chat.clone(),
        });
        Ok(Response::Chat(chat))
    }
}
