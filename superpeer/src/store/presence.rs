//! Presence as stored in RocksDB (the mailboxes of offline peers are in [`super::mailbox`]).
//!
//! ```text
//! presence:       peer key (32 bytes)                      -> postcard(PresenceEntry)
//! presence_attrs: name \0 value \0 peer key (32 bytes)     -> (empty)     profile search index
//! ```

use std::collections::{BTreeMap, HashMap};

use rocksdb::{Direction, IteratorMode, WriteBatch, DB};

use super::records::{Condition, Term};
use super::{
    cf, decode, encode, Applied, Apply, Changes, Page, StoreError, CF_PRESENCE, CF_PRESENCE_ATTRS,
};
use crate::command::{
    AttachedSession, ExpireHost, PeerKey, PresenceAttach, PresenceDetach, PresenceEndpoints,
    PresenceEntry, PresenceSet, PresenceStatus, Rejection, Response,
};
use crate::events::Change;
use vesper_proto::validate::MAX_SESSIONS_PER_PEER;

fn attr_key(name: &str, value: &str, peer: &PeerKey) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + value.len() + 34);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key.extend_from_slice(value.as_bytes());
    key.push(0);
    key.extend_from_slice(peer);
    key
}

/// Reads a peer's presence.
pub fn get(db: &DB, peer: &PeerKey) -> Result<Option<PresenceEntry>, StoreError> {
    db.get_pinned_cf(cf(db, CF_PRESENCE), peer)?
        .map(|bytes| decode("presence", &bytes))
        .transpose()
}

/// Calls `visit` with every stored presence entry, in peer key order (the ops port's census).
pub fn for_each(db: &DB, mut visit: impl FnMut(&PresenceEntry)) -> Result<(), StoreError> {
    for item in db.iterator_cf(cf(db, CF_PRESENCE), IteratorMode::Start) {
        let (_, bytes) = item?;
        visit(&decode("presence", &bytes)?);
    }
    Ok(())
}

/// Every peer with a session on `host` (for host expiry).
fn hosted_by(db: &DB, host: u64) -> Result<Vec<(PeerKey, PresenceEntry)>, StoreError> {
    let mut out = Vec::new();
    for item in db.iterator_cf(cf(db, CF_PRESENCE), IteratorMode::Start) {
        let (key, bytes) = item?;
        let entry: PresenceEntry = decode("presence", &bytes)?;
        if entry.sessions.iter().any(|attached| attached.host == host) {
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

/// Applies presence commands into a write batch, seeing earlier commands of the same batch.
pub struct PresenceWriter<'a> {
    db: &'a DB,
    pending: HashMap<PeerKey, Option<PresenceEntry>>,
    /// Presence changes made since the last `take_changes`.
    changes: Vec<Change>,
}

impl<'a> PresenceWriter<'a> {
    pub fn new(db: &'a DB) -> Self {
        Self {
            db,
            pending: HashMap::new(),
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
        self.changes.push(Change::Presence {
            peer,
            entry: entry.clone(),
        });
        Ok(Response::Presence(entry))
    }

    /// Removes the sessions `gone` picks from the peer's entry; the peer is offline once none is left.
    fn remove_sessions(
        &mut self,
        batch: &mut WriteBatch,
        peer: PeerKey,
        at_ms: u64,
        gone: impl Fn(&AttachedSession) -> bool,
    ) -> Result<Response, StoreError> {
        match self.current(&peer)? {
            Some(entry) if entry.sessions.iter().any(&gone) => {
                let mut updated = entry.clone();
                updated.sessions.retain(|attached| !gone(attached));
                if updated.sessions.is_empty() {
                    updated.status = PresenceStatus::Offline;
                }
                updated.changed_at_ms = at_ms;
                self.store(batch, peer, Some(&entry), updated)
            }
            // That session is not listed (detached, expired or pushed out before): nothing to do.
            Some(entry) => Ok(Response::Presence(entry)),
            None => Ok(Response::Done),
        }
    }

    /// Applies `change` to the entry of a peer attached on `session`; refused when that session is not one of
    /// the peer's listed sessions (a stale or foreign session cannot change its presence).
    fn update_attached(
        &mut self,
        batch: &mut WriteBatch,
        peer: PeerKey,
        session: u64,
        change: impl FnOnce(&PresenceEntry) -> PresenceEntry,
    ) -> Result<Response, StoreError> {
        match self.current(&peer)? {
            Some(entry) if entry.lists(session) => {
                let updated = change(&entry);
                self.store(batch, peer, Some(&entry), updated)
            }
            _ => Ok(Response::Rejected(Rejection::NotAttached)),
        }
    }
}

impl Changes for PresenceWriter<'_> {
    fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }
}

/// Adds a session to the peer's list (the peer is online once it has one). Past `MAX_SESSIONS_PER_PEER` the
/// oldest is pushed out and remembered as superseded, so that its host ends it with that reason.
impl Apply<PresenceAttach> for PresenceWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &PresenceAttach,
        at: Applied,
    ) -> Result<Response, StoreError> {
        let old = self.current(&op.peer)?;
        let mut entry = old.clone().unwrap_or(PresenceEntry {
            status: PresenceStatus::Online,
            note: String::new(),
            sessions: Vec::new(),
            superseded: Vec::new(),
            candidates: Vec::new(),
            nat_class: String::new(),
            changed_at_ms: at.at_ms,
            attributes: BTreeMap::new(),
        });
        // A peer that comes back keeps its away/busy status; one that was offline is online again.
        if entry.status == PresenceStatus::Offline {
            entry.status = PresenceStatus::Online;
        }
        if !entry.lists(op.session) {
            entry.sessions.push(AttachedSession {
                host: op.host,
                session: op.session,
                attached_at_ms: at.at_ms,
            });
        }
        while entry.sessions.len() > MAX_SESSIONS_PER_PEER {
            let oldest = entry.sessions.remove(0);
            entry.superseded.push(oldest.session);
        }
        if entry.superseded.len() > MAX_SESSIONS_PER_PEER {
            let excess = entry.superseded.len() - MAX_SESSIONS_PER_PEER;
            entry.superseded.drain(..excess);
        }
        entry.changed_at_ms = at.at_ms;
        self.store(batch, op.peer, old.as_ref(), entry)
    }
}

impl Apply<PresenceDetach> for PresenceWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &PresenceDetach,
        at: Applied,
    ) -> Result<Response, StoreError> {
        self.remove_sessions(batch, op.peer, at.at_ms, |attached| {
            attached.session == op.session
        })
    }
}

impl Apply<PresenceSet> for PresenceWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &PresenceSet,
        at: Applied,
    ) -> Result<Response, StoreError> {
        self.update_attached(batch, op.peer, op.session, |entry| PresenceEntry {
            status: op.status,
            note: op.note.clone(),
            attributes: op.attributes.clone(),
            changed_at_ms: at.at_ms,
            ..entry.clone()
        })
    }
}

/// Replaces the address candidates and NAT class of a peer attached on the command's session.
impl Apply<PresenceEndpoints> for PresenceWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &PresenceEndpoints,
        at: Applied,
    ) -> Result<Response, StoreError> {
        self.update_attached(batch, op.peer, op.session, |entry| PresenceEntry {
            candidates: op.candidates.clone(),
            nat_class: op.nat_class.clone(),
            changed_at_ms: at.at_ms,
            ..entry.clone()
        })
    }
}

/// Removes every session on a host the leader found dead.
impl Apply<ExpireHost> for PresenceWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &ExpireHost,
        at: Applied,
    ) -> Result<Response, StoreError> {
        let host = op.host;
        let mut expired = 0;
        for (peer, _) in hosted_by(self.db, host)? {
            // Re-read through the overlay: an attach earlier in this batch counts.
            let listed = self.current(&peer)?.map_or(0, |entry| {
                entry.sessions.iter().filter(|a| a.host == host).count()
            });
            if listed > 0 {
                self.remove_sessions(batch, peer, at.at_ms, |attached| attached.host == host)?;
                expired += listed;
            }
        }
        Ok(Response::Expired(expired as u64))
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

/// A presence entry as store format 2 (and snapshot version 3) encoded it: one session per peer. (Serialize is
/// for the upgrade test, which writes a format-2 database.)
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct EntryV2 {
    pub status: PresenceStatus,
    pub note: String,
    pub host: u64,
    pub session: u64,
    pub candidates: Vec<String>,
    pub nat_class: String,
    pub changed_at_ms: u64,
    pub attributes: BTreeMap<String, String>,
}

/// Re-encodes a presence value of store format 2 in today's layout: its one session (if online) becomes the
/// first of its list.
pub fn upgrade_v2_value(bytes: &[u8]) -> Result<Vec<u8>, StoreError> {
    let old: EntryV2 = decode("presence (format 2)", bytes)?;
    let sessions = if old.status == PresenceStatus::Offline || old.host == 0 {
        Vec::new()
    } else {
        vec![AttachedSession {
            host: old.host,
            session: old.session,
            attached_at_ms: old.changed_at_ms,
        }]
    };
    let entry = PresenceEntry {
        status: if sessions.is_empty() {
            PresenceStatus::Offline
        } else {
            old.status
        },
        note: old.note,
        sessions,
        superseded: Vec::new(),
        candidates: old.candidates,
        nat_class: old.nat_class,
        changed_at_ms: old.changed_at_ms,
        attributes: old.attributes,
    };
    encode("presence", &entry)
}

/// Rewrites every presence entry of a format-2 database into `batch` (the profile index is unchanged).
pub fn upgrade_from_format_2(db: &DB, batch: &mut WriteBatch) -> Result<usize, StoreError> {
    let mut count = 0;
    for item in db.iterator_cf(cf(db, CF_PRESENCE), IteratorMode::Start) {
        let (key, bytes) = item?;
        batch.put_cf(cf(db, CF_PRESENCE), &key, upgrade_v2_value(&bytes)?);
        count += 1;
    }
    Ok(count)
}
