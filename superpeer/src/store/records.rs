//! The index (records and their secondary attribute indexes) as stored in RocksDB.
//!
//! Layout, in three column families (plus the namespace ACLs, kept in the node table so that snapshots carry
//! them without a new snapshot format):
//!
//! ```text
//! records: namespace \0 key                     -> postcard(StoredRecord)
//! attrs:   namespace \0 name \0 value \0 key    -> (empty)
//! usage:   owner (32 bytes)                     -> postcard(Usage)   what the owner's records take (quotas)
//! nodes:   "acl/" namespace                     -> postcard(NamespaceAcl)
//! ```
//!
//! `attrs` and `usage` are derived from `records`: snapshots leave them out and they are rebuilt on install.
//!
//! Validation guarantees that namespaces and attribute names are `[a-z0-9._-]` and that keys and values hold no
//! control characters, so `\0` separates the parts unambiguously and a scan of `namespace \0 name \0 value`
//! finds exactly the records whose attribute equals `value`, in key order. A prefix term scans
//! `namespace \0 name \0 prefix`. Search is thus served from the `attrs` index, never by scanning records.

use std::collections::{BTreeSet, HashMap};

use rocksdb::{Direction, IteratorMode, WriteBatch, DB};

use serde::{Deserialize, Serialize};

use super::{
    cf, decode, encode, Applied, Apply, Changes, Page, StoreError, CF_ATTRS, CF_NODES, CF_RECORDS,
    CF_USAGE,
};
use crate::command::{
    Access, DeleteRecord, NamespaceAcl, PeerKey, PutRecord, QuotaKind, RecordQuota, Rejection,
    Response, SetNamespaceAcl, StoredRecord,
};
use crate::events::Change;

/// What one peer's records take of the index: how many it owns and their bytes ([`record_size`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub records: u64,
    pub bytes: u64,
}

/// Bytes a record counts against its owner's quota: namespace, key, attribute names and values, value.
pub fn record_size<'a>(
    namespace: &str,
    key: &str,
    attributes: impl IntoIterator<Item = (&'a String, &'a String)>,
    value_len: usize,
) -> u64 {
    let attributes: usize = attributes
        .into_iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    (namespace.len() + key.len() + attributes + value_len) as u64
}

fn stored_size(namespace: &str, key: &str, record: &StoredRecord) -> u64 {
    record_size(namespace, key, &record.attributes, record.value.len())
}

/// What `owner`'s records take now.
pub fn usage(db: &DB, owner: &PeerKey) -> Result<Usage, StoreError> {
    Ok(db
        .get_pinned_cf(cf(db, CF_USAGE), owner)?
        .map(|bytes| decode("index usage", &bytes))
        .transpose()?
        .unwrap_or_default())
}

/// The owner's usage after a put that replaces a record of `old_size` bytes (None: creates one) with one of
/// `new_size`, or the rejection when the put would take the owner past its quota. Only growth is refused, so a
/// peer over a lowered quota can still shrink and delete. Shared by the pre-proposal check and apply.
pub fn charge(
    usage: Usage,
    old_size: Option<u64>,
    new_size: u64,
    quota: RecordQuota,
) -> Result<Usage, Rejection> {
    let after = Usage {
        records: usage.records + u64::from(old_size.is_none()),
        bytes: (usage.bytes.saturating_sub(old_size.unwrap_or(0))).saturating_add(new_size),
    };
    if old_size.is_none() && after.records > quota.records {
        return Err(Rejection::IndexQuota {
            what: QuotaKind::Records,
            would_be: after.records,
            quota: quota.records,
        });
    }
    if new_size > old_size.unwrap_or(0) && after.bytes > quota.bytes {
        return Err(Rejection::IndexQuota {
            what: QuotaKind::Bytes,
            would_be: after.bytes,
            quota: quota.bytes,
        });
    }
    Ok(after)
}

/// Prefix of namespace ACL keys in the node table.
pub(crate) const ACL_PREFIX: &[u8; 4] = b"acl/";

fn acl_key(namespace: &str) -> Vec<u8> {
    [ACL_PREFIX.as_slice(), namespace.as_bytes()].concat()
}

/// The ACL of `namespace`, None when it has none (open).
pub fn acl(db: &DB, namespace: &str) -> Result<Option<NamespaceAcl>, StoreError> {
    db.get_pinned_cf(cf(db, CF_NODES), acl_key(namespace))?
        .map(|bytes| decode("namespace acl", &bytes))
        .transpose()
}

/// Every namespace that has an ACL, in namespace order.
pub fn acls(db: &DB) -> Result<Vec<(String, NamespaceAcl)>, StoreError> {
    let mut out = Vec::new();
    for item in db.iterator_cf(
        cf(db, CF_NODES),
        IteratorMode::From(ACL_PREFIX, Direction::Forward),
    ) {
        let (key, bytes) = item?;
        let Some(namespace) = key.strip_prefix(ACL_PREFIX.as_slice()) else {
            break;
        };
        out.push((
            String::from_utf8_lossy(namespace).into_owned(),
            decode("namespace acl", &bytes)?,
        ));
    }
    Ok(out)
}

pub use vesper_proto::search::{Condition, Term};

/// Storage key of a record.
pub fn record_key(namespace: &str, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(namespace.len() + 1 + key.len());
    out.extend_from_slice(namespace.as_bytes());
    out.push(0);
    out.extend_from_slice(key.as_bytes());
    out
}

fn attr_prefix(namespace: &str, name: &str, value_prefix: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(namespace.len() + name.len() + value_prefix.len() + 2);
    out.extend_from_slice(namespace.as_bytes());
    out.push(0);
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.extend_from_slice(value_prefix.as_bytes());
    out
}

fn attr_key(namespace: &str, name: &str, value: &str, key: &str) -> Vec<u8> {
    let mut out = attr_prefix(namespace, name, value);
    out.push(0);
    out.extend_from_slice(key.as_bytes());
    out
}

pub(crate) fn decode_record(bytes: &[u8]) -> Result<StoredRecord, StoreError> {
    decode("record", bytes)
}

/// Reads one record.
pub fn get(db: &DB, namespace: &str, key: &str) -> Result<Option<StoredRecord>, StoreError> {
    db.get_pinned_cf(cf(db, CF_RECORDS), record_key(namespace, key))?
        .map(|bytes| decode_record(&bytes))
        .transpose()
}

/// Lists up to `limit` records of `namespace` whose key starts with `key_prefix` and is after `after`.
/// Returns the records and whether more follow.
pub fn list(
    db: &DB,
    namespace: &str,
    key_prefix: &str,
    after: Option<&str>,
    limit: usize,
    max_bytes: usize,
) -> Result<(Vec<(String, StoredRecord)>, bool), StoreError> {
    let scan_prefix = record_key(namespace, key_prefix);
    let start = match after {
        // Seek to the successor of `after`: the key with a 0 byte appended sorts right after it.
        Some(after) if after.as_bytes() >= key_prefix.as_bytes() => {
            let mut start = record_key(namespace, after);
            start.push(0);
            start
        }
        _ => scan_prefix.clone(),
    };
    let key_offset = namespace.len() + 1;
    let mut page = Page::new(limit, max_bytes);
    for item in db.iterator_cf(
        cf(db, CF_RECORDS),
        IteratorMode::From(&start, Direction::Forward),
    ) {
        let (raw_key, bytes) = item?;
        if !raw_key.starts_with(&scan_prefix) {
            break;
        }
        let key = String::from_utf8_lossy(&raw_key[key_offset..]).into_owned();
        let record = decode_record(&bytes)?;
        let size = stored_size(namespace, &key, &record) as usize;
        if !page.push((key, record), size) {
            return Ok((page.into_items(), true));
        }
    }
    Ok((page.into_items(), false))
}

/// Keys of `namespace` whose attribute matches `term`, from the attribute index, in key order.
fn keys_for_term(db: &DB, namespace: &str, term: &Term) -> Result<BTreeSet<String>, StoreError> {
    let (value, exact) = match &term.condition {
        Condition::Equals(value) => (value.as_str(), true),
        Condition::Prefix(prefix) => (prefix.as_str(), false),
    };
    let mut scan_prefix = attr_prefix(namespace, &term.attribute, value);
    if exact {
        scan_prefix.push(0);
    }
    let value_offset = namespace.len() + term.attribute.len() + 2;
    let mut keys = BTreeSet::new();
    for item in db.iterator_cf(
        cf(db, CF_ATTRS),
        IteratorMode::From(&scan_prefix, Direction::Forward),
    ) {
        let (raw_key, _) = item?;
        if !raw_key.starts_with(&scan_prefix) {
            break;
        }
        // The record key follows the NUL that ends the attribute value.
        let rest = &raw_key[value_offset..];
        let Some(split) = rest.iter().position(|&b| b == 0) else {
            return Err(StoreError::Corrupt("attribute index entry without a key"));
        };
        keys.insert(String::from_utf8_lossy(&rest[split + 1..]).into_owned());
    }
    Ok(keys)
}

/// Searches `namespace` for records matching every term (AND), in key order, after `after`, up to `limit`.
/// Returns the records and whether more follow.
///
/// The first term's index scan yields the candidates; an equality term is preferred because its scan is exact.
/// The remaining terms are checked on the candidate records.
pub fn search(
    db: &DB,
    namespace: &str,
    terms: &[Term],
    after: Option<&str>,
    limit: usize,
    max_bytes: usize,
) -> Result<(Vec<(String, StoredRecord)>, bool), StoreError> {
    let Some(driver) = terms
        .iter()
        .position(|term| matches!(term.condition, Condition::Equals(_)))
        .or(if terms.is_empty() { None } else { Some(0) })
    else {
        return Ok((Vec::new(), false));
    };
    let candidates = keys_for_term(db, namespace, &terms[driver])?;
    let mut page = Page::new(limit, max_bytes);
    for key in candidates {
        if after.is_some_and(|after| key.as_str() <= after) {
            continue;
        }
        let Some(record) = get(db, namespace, &key)? else {
            return Err(StoreError::Corrupt(
                "attribute index points at a missing record",
            ));
        };
        if terms.iter().all(|term| term.matches(&record.attributes)) {
            let size = stored_size(namespace, &key, &record) as usize;
            if !page.push((key, record), size) {
                return Ok((page.into_items(), true));
            }
        }
    }
    Ok((page.into_items(), false))
}

/// Applies record and namespace ACL commands into one write batch, seeing the effect of earlier commands of the
/// same batch.
pub struct RecordWriter<'a> {
    db: &'a DB,
    /// Records written earlier in this batch (None = deleted), so later commands read their own writes.
    pending: HashMap<Vec<u8>, Option<StoredRecord>>,
    /// ACLs changed earlier in this batch (None = cleared).
    acls: HashMap<String, Option<NamespaceAcl>>,
    /// Owners' usage changed earlier in this batch.
    usage: HashMap<PeerKey, Usage>,
    /// Changes made since the last `take_changes`.
    changes: Vec<Change>,
}

impl<'a> RecordWriter<'a> {
    pub fn new(db: &'a DB) -> Self {
        Self {
            db,
            pending: HashMap::new(),
            acls: HashMap::new(),
            usage: HashMap::new(),
            changes: Vec::new(),
        }
    }

    /// `owner`'s usage as of this point of the batch.
    fn usage_of(&self, owner: &PeerKey) -> Result<Usage, StoreError> {
        match self.usage.get(owner) {
            Some(pending) => Ok(*pending),
            None => usage(self.db, owner),
        }
    }

    fn set_usage(
        &mut self,
        batch: &mut WriteBatch,
        owner: PeerKey,
        usage: Usage,
    ) -> Result<(), StoreError> {
        if usage.records == 0 {
            batch.delete_cf(cf(self.db, CF_USAGE), owner);
        } else {
            batch.put_cf(cf(self.db, CF_USAGE), owner, encode("index usage", &usage)?);
        }
        self.usage.insert(owner, usage);
        Ok(())
    }

    /// The ACL of `namespace` as of this point of the batch.
    fn acl_of(&self, namespace: &str) -> Result<Option<NamespaceAcl>, StoreError> {
        match self.acls.get(namespace) {
            Some(pending) => Ok(pending.clone()),
            None => acl(self.db, namespace),
        }
    }

    fn current(&self, storage_key: &[u8]) -> Result<Option<StoredRecord>, StoreError> {
        if let Some(pending) = self.pending.get(storage_key) {
            return Ok(pending.clone());
        }
        self.db
            .get_pinned_cf(cf(self.db, CF_RECORDS), storage_key)?
            .map(|bytes| decode_record(&bytes))
            .transpose()
    }

    fn unindex(&self, batch: &mut WriteBatch, namespace: &str, key: &str, record: &StoredRecord) {
        for (name, value) in &record.attributes {
            batch.delete_cf(cf(self.db, CF_ATTRS), attr_key(namespace, name, value, key));
        }
    }
}

impl Changes for RecordWriter<'_> {
    fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }
}

impl Apply<PutRecord> for RecordWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &PutRecord,
        at: Applied,
    ) -> Result<Response, StoreError> {
        let PutRecord {
            owner,
            namespace,
            key,
            attributes,
            value,
            expected_version,
            quota,
        } = op;
        let storage_key = record_key(namespace, key);
        let current = self.current(&storage_key)?;
        let acl = self.acl_of(namespace)?;
        if let Err(rejection) = check_write(
            current.as_ref(),
            owner,
            *expected_version,
            namespace,
            acl.as_ref(),
        ) {
            return Ok(Response::Rejected(rejection));
        }
        // The creator stays the owner when a group-write member changes the record, and is charged for it.
        let owner = current.as_ref().map_or(*owner, |record| record.owner);
        let old_size = current
            .as_ref()
            .map(|record| stored_size(namespace, key, record));
        let new_size = record_size(namespace, key, attributes, value.len());
        let usage = match charge(self.usage_of(&owner)?, old_size, new_size, *quota) {
            Ok(usage) => usage,
            Err(rejection) => return Ok(Response::Rejected(rejection)),
        };
        self.set_usage(batch, owner, usage)?;
        let record = StoredRecord {
            owner,
            attributes: attributes.clone(),
            value: value.clone(),
            version: current.as_ref().map_or(1, |record| record.version + 1),
            created_at_ms: current
                .as_ref()
                .map_or(at.at_ms, |record| record.created_at_ms),
            updated_at_ms: at.at_ms,
        };
        if let Some(old) = &current {
            self.unindex(batch, namespace, key, old);
        }
        for (name, attribute) in &record.attributes {
            batch.put_cf(
                cf(self.db, CF_ATTRS),
                attr_key(namespace, name, attribute, key),
                [],
            );
        }
        batch.put_cf(
            cf(self.db, CF_RECORDS),
            &storage_key,
            encode("record", &record)?,
        );
        self.pending.insert(storage_key, Some(record.clone()));
        self.changes.push(Change::Record {
            namespace: namespace.clone(),
            key: key.clone(),
            record: Some(record.clone()),
        });
        Ok(Response::Record(record))
    }
}

impl Apply<DeleteRecord> for RecordWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &DeleteRecord,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        let DeleteRecord {
            owner,
            namespace,
            key,
            expected_version,
        } = op;
        let storage_key = record_key(namespace, key);
        let Some(current) = self.current(&storage_key)? else {
            return Ok(match *expected_version {
                Some(expected) if expected != 0 => Response::Rejected(Rejection::VersionMismatch {
                    expected,
                    current: 0,
                }),
                _ => Response::Deleted(false),
            });
        };
        let acl = self.acl_of(namespace)?;
        if let Err(rejection) = check_write(
            Some(&current),
            owner,
            *expected_version,
            namespace,
            acl.as_ref(),
        ) {
            return Ok(Response::Rejected(rejection));
        }
        self.unindex(batch, namespace, key, &current);
        let usage = self.usage_of(&current.owner)?;
        let usage = Usage {
            records: usage.records.saturating_sub(1),
            bytes: usage
                .bytes
                .saturating_sub(stored_size(namespace, key, &current)),
        };
        self.set_usage(batch, current.owner, usage)?;
        batch.delete_cf(cf(self.db, CF_RECORDS), &storage_key);
        self.pending.insert(storage_key, None);
        self.changes.push(Change::Record {
            namespace: namespace.clone(),
            key: key.clone(),
            record: None,
        });
        Ok(Response::Deleted(true))
    }
}

/// An ACL change (None clears the namespace's rules).
impl Apply<SetNamespaceAcl> for RecordWriter<'_> {
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &SetNamespaceAcl,
        _at: Applied,
    ) -> Result<Response, StoreError> {
        let SetNamespaceAcl { namespace, acl } = op;
        match acl {
            Some(acl) => batch.put_cf(
                cf(self.db, CF_NODES),
                acl_key(namespace),
                encode("namespace acl", acl)?,
            ),
            None => batch.delete_cf(cf(self.db, CF_NODES), acl_key(namespace)),
        }
        self.acls.insert(namespace.clone(), acl.clone());
        self.changes.push(Change::Acl {
            namespace: namespace.clone(),
            acl: acl.clone(),
        });
        Ok(Response::Done)
    }
}

/// The namespace ACL, ownership and compare-and-set rules, shared by the pre-proposal check and apply.
pub fn check_write(
    current: Option<&StoredRecord>,
    writer: &PeerKey,
    expected_version: Option<u64>,
    namespace: &str,
    acl: Option<&NamespaceAcl>,
) -> Result<(), Rejection> {
    if let Some(acl) = acl {
        if !acl.may_write(writer) {
            return Err(Rejection::NamespaceWrite(namespace.to_string()));
        }
    }
    // In a group-write namespace every member may change every record; elsewhere only the record's creator.
    let group_write = acl.is_some_and(|acl| acl.write == Access::Members);
    if let Some(record) = current {
        if &record.owner != writer && !group_write {
            return Err(Rejection::NotOwner);
        }
    }
    let current_version = current.map_or(0, |record| record.version);
    match expected_version {
        Some(expected) if expected != current_version => Err(Rejection::VersionMismatch {
            expected,
            current: current_version,
        }),
        _ => Ok(()),
    }
}

/// Adds the index entries and the owners' usage of every record to `batch` (used after installing a snapshot,
/// which carries only records).
pub fn rebuild_index(db: &DB, batch: &mut WriteBatch) -> Result<(), StoreError> {
    let mut usage: HashMap<PeerKey, Usage> = HashMap::new();
    for item in db.iterator_cf(cf(db, CF_RECORDS), IteratorMode::Start) {
        let (raw_key, bytes) = item?;
        let Some(split) = raw_key.iter().position(|&b| b == 0) else {
            return Err(StoreError::Corrupt("record key without a namespace"));
        };
        let namespace = String::from_utf8_lossy(&raw_key[..split]);
        let key = String::from_utf8_lossy(&raw_key[split + 1..]);
        let record = decode_record(&bytes)?;
        for (name, value) in &record.attributes {
            batch.put_cf(
                cf(db, CF_ATTRS),
                attr_key(&namespace, name, value, &key),
                [],
            );
        }
        let owner = usage.entry(record.owner).or_default();
        owner.records += 1;
        owner.bytes += stored_size(&namespace, &key, &record);
    }
    for (owner, usage) in usage {
        batch.put_cf(cf(db, CF_USAGE), owner, encode("index usage", &usage)?);
    }
    Ok(())
}
