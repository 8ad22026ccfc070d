//! Presence and mailboxes as stored in RocksDB.
//!
//! ```text
//! presence:       peer key (32 bytes)                      -> postcard(PresenceEntry)
//! presence_attrs: name \0 value \0 peer key (32 bytes)     -> (empty)     profile search index
//! mailbox:        recipient key (32) | sequence (8, BE)    -> postcard(MailboxItem)
//! ```
//!
//! The mailbox sequence is the log index of the `MailboxPut` that stored the message, so it is deterministic,
//! unique and in arrival order: a recipient drains its mailbox in the order messages were accepted.

use std::collections::{BTreeMap, HashMap};

use rocksdb::{Direction, IteratorMode, WriteBatch, DB};
use serde::{Deserialize, Serialize};

use super::records::{Condition, Term};
use super::{cf, decode, encode, Page, StoreError, CF_MAILBOX, CF_PRESENCE, CF_PRESENCE_ATTRS};
use crate::command::{PeerKey, PresenceEntry, PresenceStatus, Rejection, Response, StoredMessage};

/// A stored mailbox message and when it stops being worth delivering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxItem {
    pub message: StoredMessage,
    pub expires_at_ms: u64,
}

fn attr_key(name: &str, value: &str, peer: &PeerKey) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + value.len() + 34);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key.extend_from_slice(value.as_bytes());
    key.push(0);
    key.extend_from_slice(peer);
    key
}

fn mailbox_key(to: &PeerKey, sequence: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(40);
    key.extend_from_slice(to);
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

/// Reads a peer's presence.
pub fn get(db: &DB, peer: &PeerKey) -> Result<Option<PresenceEntry>, StoreError> {
    db.get_pinned_cf(cf(db, CF_PRESENCE), peer)?
        .map(|bytes| decode("presence", &bytes))
        .transpose()
}

/// Every peer whose presence names `host` as its super peer (for host expiry).
fn hosted_by(db: &DB, host: u64) -> Result<Vec<(PeerKey, PresenceEntry)>, StoreError> {
    let mut out = Vec::new();
    for item in db.iterator_cf(cf(db, CF_PRESENCE), IteratorMode::Start) {
        let (key, bytes) = item?;
        let entry: PresenceEntry = decode("presence", &bytes)?;
        if entry.host == host && entry.status != PresenceStatus::Offline {
            let peer: PeerKey = key
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::Corrupt("presence key is not 32 bytes"))?;
            out.push((peer, entry));
        }
    }
    Ok(out)
}

/// Peers whose profile matches every term, in peer key order, at most `limit` and about `max_bytes` of them;
/// true with them when more matched.
pub fn search(
    db: &DB,
    terms: &[Term],
    online_only: bool,
    limit: usize,
    max_bytes: usize,
) -> Result<(Vec<(PeerKey, PresenceEntry)>, bool), StoreError> {
    let Some(driver) = terms
        .iter()
        .position(|term| matches!(term.condition, Condition::Equals(_)))
        .or(if terms.is_empty() { None } else { Some(0) })
    else {
        return Ok((Vec::new(), false));
    };
    let term = &terms[driver];
    let (value, exact) = match &term.condition {
        Condition::Equals(value) => (value.as_str(), true),
        Condition::Prefix(prefix) => (prefix.as_str(), false),
    };
    let mut scan = Vec::new();
    scan.extend_from_slice(term.attribute.as_bytes());
    scan.push(0);
    scan.extend_from_slice(value.as_bytes());
    if exact {
        scan.push(0);
    }
    let mut candidates = std::collections::BTreeSet::new();
    for item in db.iterator_cf(
        cf(db, CF_PRESENCE_ATTRS),
        IteratorMode::From(&scan, Direction::Forward),
    ) {
        let (key, _) = item?;
        if !key.starts_with(&scan) {
            break;
        }
        let peer: PeerKey = key[key.len() - 32..]
            .try_into()
            .map_err(|_| StoreError::Corrupt("profile index key too short"))?;
        candidates.insert(peer);
    }
    let mut page = Page::new(limit, max_bytes);
    for peer in candidates {
        let Some(entry) = get(db, &peer)? else {
            return Err(StoreError::Corrupt(
                "profile index points at a missing peer",
            ));
        };
        let matches = terms.iter().all(|term| term.matches(&entry.attributes));
        if matches && (!online_only || entry.status != PresenceStatus::Offline) {
            let size = entry_size(&entry);
            if !page.push((peer, entry), size) {
                return Ok((page.into_items(), true));
            }
        }
    }
    Ok((page.into_items(), false))
}

/// About what a presence entry takes in an answer (its variable-length parts), for the page byte budget.
fn entry_size(entry: &PresenceEntry) -> usize {
    let attributes: usize = entry
        .attributes
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    let candidates: usize = entry.candidates.iter().map(String::len).sum();
    attributes + candidates + entry.note.len() + entry.nat_class.len() + 64
}

/// Whether `message` may join a mailbox that holds `queued` (live messages only): `Ok(true)` when it is there
/// already (a retry, which is not stored twice), the rejection when the mailbox is at its quota. Shared by the
/// pre-proposal check and apply.
pub fn mailbox_admits<'a>(
    queued: impl IntoIterator<Item = &'a StoredMessage>,
    message: &StoredMessage,
    quota: u32,
) -> Result<bool, Rejection> {
    let mut live = 0u32;
    for item in queued {
        if item.from == message.from && item.id == message.id {
            return Ok(true);
        }
        live += 1;
    }
    if live >= quota {
        return Err(Rejection::MailboxFull { quota });
    }
    Ok(false)
}

/// A peer's mailbox in order: (sequence, item), expired items left out.
pub fn mailbox(db: &DB, to: &PeerKey, now_ms: u64) -> Result<Vec<(u64, MailboxItem)>, StoreError> {
    let mut out = Vec::new();
    for item in db.iterator_cf(
        cf(db, CF_MAILBOX),
        IteratorMode::From(to, Direction::Forward),
    ) {
        let (key, bytes) = item?;
        if !key.starts_with(to) {
            break;
        }
        let sequence = u64::from_be_bytes(
            key[32..]
                .try_into()
                .map_err(|_| StoreError::Corrupt("mailbox key is not 40 bytes"))?,
        );
        let item: MailboxItem = decode("mailbox item", &bytes)?;
        if item.expires_at_ms > now_ms {
            out.push((sequence, item));
        }
    }
    Ok(out)
}

/// Applies presence and mailbox commands into a write batch, seeing earlier commands of the same batch.
pub struct PresenceWriter<'a> {
    db: &'a DB,
    pending: HashMap<PeerKey, Option<PresenceEntry>>,
    /// Mailbox items added or removed earlier in this batch (None = removed).
    mailbox_pending: BTreeMap<Vec<u8>, Option<MailboxItem>>,
    /// Presence changes made by the current command, taken by `take_changes`.
    changes: Vec<(PeerKey, PresenceEntry)>,
}

impl<'a> PresenceWriter<'a> {
    pub fn new(db: &'a DB) -> Self {
        Self {
            db,
            pending: HashMap::new(),
            mailbox_pending: BTreeMap::new(),
            changes: Vec::new(),
        }
    }

    fn current(&self, peer: &PeerKey) -> Result<Option<PresenceEntry>, StoreError> {
        match self.pending.get(peer) {
            Some(entry) => Ok(entry.clone()),
            None => get(self.db, peer),
        }
    }

    fn store(
        &mut self,
        batch: &mut WriteBatch,
        peer: PeerKey,
        old: Option<&PresenceEntry>,
        entry: PresenceEntry,
    ) -> Result<Response, StoreError> {
        if let Some(old) = old {
            for (name, value) in &old.attributes {
                batch.delete_cf(cf(self.db, CF_PRESENCE_ATTRS), attr_key(name, value, &peer));
            }
        }
        for (name, value) in &entry.attributes {
            batch.put_cf(
                cf(self.db, CF_PRESENCE_ATTRS),
                attr_key(name, value, &peer),
                [],
            );
        }
        batch.put_cf(cf(self.db, CF_PRESENCE), peer, encode("presence", &entry)?);
        self.pending.insert(peer, Some(entry.clone()));
        self.changes.push((peer, entry.clone()));
        Ok(Response::Presence(entry))
    }

    /// The presence changes made since the last call.
    pub fn take_changes(&mut self) -> Vec<(PeerKey, PresenceEntry)> {
        std::mem::take(&mut self.changes)
    }

    pub fn attach(
        &mut self,
        batch: &mut WriteBatch,
        peer: PeerKey,
        host: u64,
        session: u64,
        at_ms: u64,
    ) -> Result<Response, StoreError> {
        let old = self.current(&peer)?;
        let mut entry = old.clone().unwrap_or(PresenceEntry {
            status: PresenceStatus::Online,
            note: String::new(),
            host: 0,
            session: 0,
            candidates: Vec::new(),
            nat_class: String::new(),
            changed_at_ms: at_ms,
            attributes: BTreeMap::new(),
        });
        // A peer that comes back keeps its away/busy status; one that was offline is online again.
        if entry.status == PresenceStatus::Offline {
            entry.status = PresenceStatus::Online;
        }
        entry.host = host;
        entry.session = session;
        entry.changed_at_ms = at_ms;
        self.store(batch, peer, old.as_ref(), entry)
    }

    pub fn detach(
        &mut self,
        batch: &mut WriteBatch,
        peer: PeerKey,
        session: u64,
        at_ms: u64,
    ) -> Result<Response, StoreError> {
        let old = self.current(&peer)?;
        match old {
            Some(entry) if entry.session == session && entry.status != PresenceStatus::Offline => {
                let offline = PresenceEntry {
                    status: PresenceStatus::Offline,
                    host: 0,
                    session: 0,
                    changed_at_ms: at_ms,
                    ..entry.clone()
                };
                self.store(batch, peer, Some(&entry), offline)
            }
            // The peer attached again since (another session) or is offline already: nothing to do.
            Some(entry) => Ok(Response::Presence(entry)),
            None => Ok(Response::Done),
        }
    }

    // The arguments are the command's fields plus the batch and the proposer's clock.
    #[allow(clippy::too_many_arguments)]
    pub fn set(
        &mut self,
        batch: &mut WriteBatch,
        peer: PeerKey,
        session: u64,
        status: PresenceStatus,
        note: String,
        attributes: BTreeMap<String, String>,
        at_ms: u64,
    ) -> Result<Response, StoreError> {
        self.update_attached(batch, peer, session, |entry| PresenceEntry {
            status,
            note,
            attributes,
            changed_at_ms: at_ms,
            ..entry.clone()
        })
    }

    /// Applies `change` to the entry of a peer attached on `session`; refused when that session is not the
    /// peer's current one (a stale or foreign session cannot change its presence).
    fn update_attached(
        &mut self,
        batch: &mut WriteBatch,
        peer: PeerKey,
        session: u64,
        change: impl FnOnce(&PresenceEntry) -> PresenceEntry,
    ) -> Result<Response, StoreError> {
        match self.current(&peer)? {
            Some(entry) if entry.session == session && entry.status != PresenceStatus::Offline => {
                let updated = change(&entry);
                self.store(batch, peer, Some(&entry), updated)
            }
            _ => Ok(Response::Rejected(Rejection::NotAttached)),
        }
    }

    /// Replaces the address candidates and NAT class of a peer attached on `session`.
    pub fn set_endpoints(
        &mut self,
        batch: &mut WriteBatch,
        peer: PeerKey,
        session: u64,
        candidates: Vec<String>,
        nat_class: String,
        at_ms: u64,
    ) -> Result<Response, StoreError> {
        self.update_attached(batch, peer, session, |entry| PresenceEntry {
            candidates,
            nat_class,
            changed_at_ms: at_ms,
            ..entry.clone()
        })
    }

    pub fn expire_host(
        &mut self,
        batch: &mut WriteBatch,
        host: u64,
        at_ms: u64,
    ) -> Result<Response, StoreError> {
        let mut expired = 0;
        for (peer, _) in hosted_by(self.db, host)? {
            // Re-read through the overlay: a later attach in this batch wins.
            if let Some(entry) = self.current(&peer)? {
                if entry.host == host && entry.status != PresenceStatus::Offline {
                    self.detach(batch, peer, entry.session, at_ms)?;
                    expired += 1;
                }
            }
        }
        Ok(Response::Expired(expired))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn mailbox_put(
        &mut self,
        batch: &mut WriteBatch,
        to: PeerKey,
        message: StoredMessage,
        expires_at_ms: u64,
        quota: u32,
        sequence: u64,
        at_ms: u64,
    ) -> Result<Response, StoreError> {
        let mut live = Vec::new();
        for (key, item) in self.mailbox_view(&to)? {
            if item.expires_at_ms <= at_ms {
                batch.delete_cf(cf(self.db, CF_MAILBOX), &key);
                self.mailbox_pending.insert(key, None);
            } else {
                live.push(item.message);
            }
        }
        match mailbox_admits(&live, &message, quota) {
            // A retry of a message already queued.
            Ok(true) => return Ok(Response::Done),
            Ok(false) => {}
            Err(rejection) => return Ok(Response::Rejected(rejection)),
        }
        let key = mailbox_key(&to, sequence);
        let item = MailboxItem {
            message,
            expires_at_ms,
        };
        batch.put_cf(
            cf(self.db, CF_MAILBOX),
            &key,
            encode("mailbox item", &item)?,
        );
        self.mailbox_pending.insert(key, Some(item));
        Ok(Response::Done)
    }

    pub fn mailbox_ack(
        &mut self,
        batch: &mut WriteBatch,
        to: PeerKey,
        sequences: &[u64],
    ) -> Result<Response, StoreError> {
        for sequence in sequences {
            let key = mailbox_key(&to, *sequence);
            batch.delete_cf(cf(self.db, CF_MAILBOX), &key);
            self.mailbox_pending.insert(key, None);
        }
        Ok(Response::Done)
    }

    /// The recipient's mailbox as stored plus this batch's changes: (storage key, item).
    fn mailbox_view(&self, to: &PeerKey) -> Result<Vec<(Vec<u8>, MailboxItem)>, StoreError> {
        let mut view: BTreeMap<Vec<u8>, MailboxItem> = BTreeMap::new();
        for item in self.db.iterator_cf(
            cf(self.db, CF_MAILBOX),
            IteratorMode::From(to, Direction::Forward),
        ) {
            let (key, bytes) = item?;
            if !key.starts_with(to) {
                break;
            }
            view.insert(key.to_vec(), decode("mailbox item", &bytes)?);
        }
        for (key, item) in self.mailbox_pending.range(to.to_vec()..) {
            if !key.starts_with(to) {
                break;
            }
            match item {
                Some(item) => view.insert(key.clone(), item.clone()),
                None => view.remove(key),
            };
        }
        Ok(view.into_iter().collect())
    }
}

/// Adds the profile index entries of every peer to `batch` (after a snapshot install).
pub fn rebuild_index(db: &DB, batch: &mut WriteBatch) -> Result<(), StoreError> {
    for item in db.iterator_cf(cf(db, CF_PRESENCE), IteratorMode::Start) {
        let (key, bytes) = item?;
        let peer: PeerKey = key
            .as_ref()
            .try_into()
            .map_err(|_| StoreError::Corrupt("presence key is not 32 bytes"))?;
        let entry: PresenceEntry = decode("presence", &bytes)?;
        for (name, value) in &entry.attributes {
            batch.put_cf(cf(db, CF_PRESENCE_ATTRS), attr_key(name, value, &peer), []);
        }
    }
    Ok(())
}
