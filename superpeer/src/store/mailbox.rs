//! The mailboxes of offline peers as stored in RocksDB.
//!
//! ```text
//! mailbox:        recipient key (32) | sequence (8, BE)    -> postcard(MailboxItem)
//! ```
//!
//! An item keeps the trace context of a sampled message (format 4), so the message's trace goes on when it is
//! delivered, however long it waited.
//!
//! The mailbox sequence is the log index of the `MailboxPut` that stored the message, so it is deterministic,
//! unique and in arrival order: a recipient drains its mailbox in the order messages were accepted.

use std::collections::BTreeMap;

use rocksdb::{Direction, IteratorMode, WriteBatch, DB};
use serde::{Deserialize, Serialize};

use super::{cf, decode, encode, Applied, Apply, StoreError, CF_MAILBOX};
use crate::command::{
    MailboxAck, MailboxPut, PeerKey, Rejection, Response, StoredMessage, TraceContext,
};

/// A stored mailbox message, when it stops being worth delivering, and the trace it belongs to if sampled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxItem {
    pub message: StoredMessage,
    pub expires_at_ms: u64,
    pub trace: Option<TraceContext>,
}

/// A mailbox item as store format 3 (and snapshot version 4 and older) wrote it: without a trace context.
#[derive(Deserialize)]
struct MailboxItemV3 {
    message: StoredMessage,
    expires_at_ms: u64,
}

/// Re-encodes a format-3 mailbox value in the current layout (no trace context).
pub fn upgrade_v3_value(bytes: &[u8]) -> Result<Vec<u8>, StoreError> {
    let old: MailboxItemV3 = decode("format-3 mailbox item", bytes)?;
    encode(
        "mailbox item",
        &MailboxItem {
            message: old.message,
            expires_at_ms: old.expires_at_ms,
            trace: None,
        },
    )
}

/// Rewrites every mailbox item of a format-3 database into `batch`; returns how many.
pub fn upgrade_from_format_3(db: &DB, batch: &mut WriteBatch) -> Result<usize, StoreError> {
    let mut count = 0;
    for item in db.iterator_cf(cf(db, CF_MAILBOX), IteratorMode::Start) {
        let (key, bytes) = item?;
        batch.put_cf(cf(db, CF_MAILBOX), &key, upgrade_v3_value(&bytes)?);
        count += 1;
    }
    Ok(count)
}

fn mailbox_key(to: &PeerKey, sequence: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(40);
    key.extend_from_slice(to);
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

/// Whether `message` may join a mailbox that holds `queued` (live messages only): `Ok(true)` when it is there
/// already (a retry, which is not stored twice), the rejection when the mailbox is at its quota. Shared by the
/// pre-proposal check and apply.
pub fn admits<'a>(
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
pub fn items(db: &DB, to: &PeerKey, now_ms: u64) -> Result<Items, StoreError> {
    Ok(items_and_expired(db, to, now_ms)?.0)
}

/// A mailbox's items in order, each with its sequence.
pub type Items = Vec<(u64, MailboxItem)>;

/// A peer's mailbox in order, (sequence, item), and the sequences of its items past their time to live.
pub fn items_and_expired(
    db: &DB,
    to: &PeerKey,
    now_ms: u64,
) -> Result<(Items, Vec<u64>), StoreError> {
    let mut out = Vec::new();
    let mut expired = Vec::new();
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
        } else {
            expired.push(sequence);
        }
    }
    Ok((out, expired))
}

/// Applies mailbox commands into a write batch, seeing earlier commands of the same batch.
pub struct MailboxWriter<'a> {
    db: &'a DB,
    /// Mailbox items added or removed earlier in this batch (None = removed).
    pending: BTreeMap<Vec<u8>, Option<MailboxItem>>,
}

impl<'a> MailboxWriter<'a> {
    pub fn new(db: &'a DB) -> Self {
        Self {
            db,
            pending: BTreeMap::new(),
        }
    }

    /// The recipient's mailbox as stored plus this batch's changes: (storage key, item).
    fn view(&self, to: &PeerKey) -> Result<Vec<(Vec<u8>, MailboxItem)>, StoreError> {
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
        for (key, item) in self.pending.range(to.to_vec()..) {
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

/// Stores the message under the command's log index as its sequence, dropping the recipient's expired messages.
impl Apply<MailboxPut> for MailboxWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &MailboxPut,
        at: Applied,
    ) -> Result<Response, StoreError> {
        self.put(batch, op, at, None)
    }
}

impl MailboxWriter<'_> {
    /// Stores a message, keeping `trace` (its sampled trace context) with it.
    pub fn put(
        &mut self,
        batch: &mut WriteBatch,
        op: &MailboxPut,
        at: Applied,
        trace: Option<&TraceContext>,
    ) -> Result<Response, StoreError> {
        let mut live = Vec::new();
        let mut expired = 0;
        for (key, item) in self.view(&op.to)? {
            if item.expires_at_ms <= at.at_ms {
                batch.delete_cf(cf(self.db, CF_MAILBOX), &key);
                self.pending.insert(key, None);
                expired += 1;
            } else {
                live.push(item.message);
            }
        }
        match admits(&live, &op.message, op.quota) {
            // A retry of a message already queued.
            Ok(true) => return Ok(Response::Done),
            Ok(false) => {}
            Err(rejection) => return Ok(Response::Rejected(rejection)),
        }
        let key = mailbox_key(&op.to, at.index);
        let item = MailboxItem {
            message: op.message.clone(),
            expires_at_ms: op.expires_at_ms,
            trace: trace.cloned(),
        };
        batch.put_cf(
            cf(self.db, CF_MAILBOX),
            &key,
            encode("mailbox item", &item)?,
        );
        self.pending.insert(key, Some(item));
        Ok(if expired == 0 {
            Response::Done
        } else {
            Response::Expired(expired)
        })
    }
}

impl Apply<MailboxAck> for MailboxWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &MailboxAck,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        for sequence in &op.sequences {
            let key = mailbox_key(&op.to, *sequence);
            batch.delete_cf(cf(self.db, CF_MAILBOX), &key);
            self.pending.insert(key, None);
        }
        Ok(Response::Done)
    }
}
