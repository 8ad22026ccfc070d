//! The index (records and their secondary attribute indexes) as stored in RocksDB.
//!
//! Layout, in two column families (plus the namespace ACLs, kept in the node table so that snapshots carry
//! them without a new snapshot format):
//!
//! ```text
//! records: namespace \0 key                     -> postcard(StoredRecord)
//! attrs:   namespace \0 name \0 value \0 key    -> (empty)
//! nodes:   "acl/" namespace                     -> postcard(NamespaceAcl)
//! ```
//!
//! Validation guarantees that namespaces and attribute names are `[a-z0-9._-]` and that keys and values hold no
//! control characters, so `\0` separates the parts unambiguously and a scan of `namespace \0 name \0 value`
//! finds exactly the records whose attribute equals `value`, in key order. A prefix term scans
//! `namespace \0 name \0 prefix`. Search is thus served from the `attrs` index, never by scanning records.

use std::collections::{BTreeSet, HashMap};

use rocksdb::{Direction, IteratorMode, WriteBatch, DB};

use super::{cf, decode, encode, StoreError, CF_ATTRS, CF_NODES, CF_RECORDS};
use crate::raft::command::{Access, NamespaceAcl, PeerKey, Rejection, Response, StoredRecord};

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

/// A search condition, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Equals(String),
    Prefix(String),
}

/// One attribute condition of a search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    pub attribute: String,
    pub condition: Condition,
}

impl Term {
    fn matches(&self, record: &StoredRecord) -> bool {
        match (record.attributes.get(&self.attribute), &self.condition) {
            (Some(value), Condition::Equals(wanted)) => value == wanted,
            (Some(value), Condition::Prefix(prefix)) => value.starts_with(prefix.as_str()),
            (None, _) => false,
        }
    }
}

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
    let mut out = Vec::new();
    for item in db.iterator_cf(
        cf(db, CF_RECORDS),
        IteratorMode::From(&start, Direction::Forward),
    ) {
        let (raw_key, bytes) = item?;
        if !raw_key.starts_with(&scan_prefix) {
            break;
        }
        if out.len() == limit {
            return Ok((out, true));
        }
        let key = String::from_utf8_lossy(&raw_key[key_offset..]).into_owned();
        out.push((key, decode_record(&bytes)?));
    }
    Ok((out, false))
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
) -> Result<(Vec<(String, StoredRecord)>, bool), StoreError> {
    let Some(driver) = terms
        .iter()
        .position(|term| matches!(term.condition, Condition::Equals(_)))
        .or(if terms.is_empty() { None } else { Some(0) })
    else {
        return Ok((Vec::new(), false));
    };
    let candidates = keys_for_term(db, namespace, &terms[driver])?;
    let mut out = Vec::new();
    for key in candidates {
        if after.is_some_and(|after| key.as_str() <= after) {
            continue;
        }
        let Some(record) = get(db, namespace, &key)? else {
            return Err(StoreError::Corrupt(
                "attribute index points at a missing record",
            ));
        };
        if terms.iter().all(|term| term.matches(&record)) {
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push((key, record));
        }
    }
    Ok((out, false))
}

/// Applies record commands into one write batch, seeing the effect of earlier commands of the same batch.
pub struct RecordWriter<'a> {
    db: &'a DB,
    /// Records written earlier in this batch (None = deleted), so later commands read their own writes.
    pending: HashMap<Vec<u8>, Option<StoredRecord>>,
    /// ACLs changed earlier in this batch (None = cleared).
    acls: HashMap<String, Option<NamespaceAcl>>,
}

impl<'a> RecordWriter<'a> {
    pub fn new(db: &'a DB) -> Self {
        Self {
            db,
            pending: HashMap::new(),
            acls: HashMap::new(),
        }
    }

    /// The ACL of `namespace` as of this point of the batch.
    fn acl_of(&self, namespace: &str) -> Result<Option<NamespaceAcl>, StoreError> {
        match self.acls.get(namespace) {
            Some(pending) => Ok(pending.clone()),
            None => acl(self.db, namespace),
        }
    }

    /// Applies an ACL change (None clears the namespace's rules).
    pub fn set_acl(
        &mut self,
        batch: &mut WriteBatch,
        namespace: &str,
        acl: Option<NamespaceAcl>,
    ) -> Result<Response, StoreError> {
        match &acl {
            Some(acl) => batch.put_cf(
                cf(self.db, CF_NODES),
                acl_key(namespace),
                encode("namespace acl", acl)?,
            ),
            None => batch.delete_cf(cf(self.db, CF_NODES), acl_key(namespace)),
        }
        self.acls.insert(namespace.to_string(), acl);
        Ok(Response::Done)
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

    /// Applies a put. `at_ms` is the proposer's clock.
    #[allow(clippy::too_many_arguments)]
    pub fn put(
        &mut self,
        batch: &mut WriteBatch,
        owner: PeerKey,
        namespace: &str,
        key: &str,
        attributes: std::collections::BTreeMap<String, String>,
        value: Vec<u8>,
        expected_version: Option<u64>,
        at_ms: u64,
    ) -> Result<Response, StoreError> {
        let storage_key = record_key(namespace, key);
        let current = self.current(&storage_key)?;
        let acl = self.acl_of(namespace)?;
        if let Err(rejection) = check_write(
            current.as_ref(),
            &owner,
            expected_version,
            namespace,
            acl.as_ref(),
        ) {
            return Ok(Response::Rejected(rejection));
        }
        let record = StoredRecord {
            // The creator stays the owner when a group-write member changes the record.
            owner: current.as_ref().map_or(owner, |record| record.owner),
            attributes,
            value,
            version: current.as_ref().map_or(1, |record| record.version + 1),
            created_at_ms: current
                .as_ref()
                .map_or(at_ms, |record| record.created_at_ms),
            updated_at_ms: at_ms,
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
        Ok(Response::Record(record))
    }

    /// Applies a delete.
    pub fn delete(
        &mut self,
        batch: &mut WriteBatch,
        owner: PeerKey,
        namespace: &str,
        key: &str,
        expected_version: Option<u64>,
    ) -> Result<Response, StoreError> {
        let storage_key = record_key(namespace, key);
        let Some(current) = self.current(&storage_key)? else {
            return Ok(match expected_version {
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
            &owner,
            expected_version,
            namespace,
            acl.as_ref(),
        ) {
            return Ok(Response::Rejected(rejection));
        }
        self.unindex(batch, namespace, key, &current);
        batch.delete_cf(cf(self.db, CF_RECORDS), &storage_key);
        self.pending.insert(storage_key, None);
        Ok(Response::Deleted(true))
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

/// Adds the index entries of every record to `batch` (used after installing a snapshot, which carries only
/// records).
pub fn rebuild_index(db: &DB, batch: &mut WriteBatch) -> Result<(), StoreError> {
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
    }
    Ok(())
}
