//! Durable storage of a super peer: one RocksDB database holding both the Raft log and the state machine.
//!
//! ```text
//!             openraft core
//!           /               \
//!   LogStore (log_store.rs)   StateMachine (state_machine.rs): one write batch per batch of entries, each
//!     cf log:   index -> entry   command handed to the writer of its domain (`Apply`):
//!     cf raft:  vote, committed,   cf records / attrs / usage        records.rs    (and namespace ACLs)
//!               last purged        cf presence / presence_attrs      presence.rs
//!                                  cf mailbox                        mailbox.rs
//!                                  cf conferences / conf_chat        conference.rs
//!                                  cf nodes: node id -> NodeEntry    nodes.rs      (tombstones, relay loads,
//!                                                                                   revocations)
//!                                  cf sm_meta: last applied, membership, next node id
//!                                  cf snapshot: the current snapshot
//! ```
//!
//! Both halves share one database and therefore one write-ahead log: a synced write (every log append) also
//! makes every earlier state machine write durable, which is why state machine batches need no fsync of their own.
//! Everything is encoded with postcard behind a format version (`FORMAT_VERSION`), checked at open.

pub mod conference;
pub mod log_store;
pub mod mailbox;
pub mod nodes;
pub mod presence;
pub mod records;
pub mod state_machine;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, DB};

use crate::command::Response;
use crate::events::Change;

pub use log_store::LogStore;
pub use state_machine::StateMachine;

pub const CF_LOG: &str = "log";
pub const CF_RAFT: &str = "raft";
pub const CF_RECORDS: &str = "records";
pub const CF_ATTRS: &str = "attrs";
pub const CF_NODES: &str = "nodes";
pub const CF_SM_META: &str = "sm_meta";
pub const CF_SNAPSHOT: &str = "snapshot";
pub const CF_PRESENCE: &str = "presence";
pub const CF_PRESENCE_ATTRS: &str = "presence_attrs";
pub const CF_MAILBOX: &str = "mailbox";
pub const CF_CONFERENCES: &str = "conferences";
pub const CF_CONF_CHAT: &str = "conf_chat";
pub const CF_USAGE: &str = "usage";

pub(crate) const ALL_CFS: &[&str] = &[
    CF_LOG,
    CF_RAFT,
    CF_RECORDS,
    CF_ATTRS,
    CF_NODES,
    CF_SM_META,
    CF_SNAPSHOT,
    CF_PRESENCE,
    CF_PRESENCE_ATTRS,
    CF_MAILBOX,
    CF_CONFERENCES,
    CF_CONF_CHAT,
    CF_USAGE,
];

/// Version of the on-disk encoding. openraft does not promise a stable serde layout across versions, so a
/// database written by another format is refused rather than misread.
/// Format 2: record puts carry their owner's index quota, and the `usage` column family counts what each
/// owner's records take.
/// Format 3: a presence entry lists every attached session of its peer (several sessions per peer).
/// Format 4: a mailbox item keeps the trace context of a sampled message.
/// A database of format 2 or 3 is upgraded in place when it opens (its presence entries and mailbox items are
/// rewritten, in one synced write); older ones are refused.
pub const FORMAT_VERSION: u32 = 4;
const FORMAT_KEY: &[u8] = b"format_version";

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("cannot decode {what}: {source}")]
    Decode {
        what: &'static str,
        source: postcard::Error,
    },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: postcard::Error,
    },
    #[error("stored data is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("database format {found} is not the supported format {FORMAT_VERSION}")]
    Format { found: u32 },
    #[error("blocking storage task failed: {0}")]
    Join(String),
}

impl From<StoreError> for std::io::Error {
    fn from(error: StoreError) -> Self {
        std::io::Error::other(error)
    }
}

/// Where in the log a command is applied: all that apply may use besides the command and the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Log index of the command's entry.
    pub index: u64,
    /// The proposer's clock, from the command.
    pub at_ms: u64,
}

/// A writer of one domain of the state machine (records, presence, mailbox, conferences, nodes) applies its
/// commands of type `T` into the batch of the entries being applied. It sees the effect of the batch's earlier
/// commands, and it keeps the changes it made for watches until [`Apply::take_changes`].
pub trait Apply<T> {
    /// Applies `op`: its response, and its writes added to `batch`. A refusal is a [`Response::Rejected`] that
    /// changes nothing; an error is a storage failure.
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &T,
        at: Applied,
    ) -> Result<Response, StoreError>;
}

/// Changes a writer made since the last call, in the order it made them (the feed for watches).
pub trait Changes {
    fn take_changes(&mut self) -> Vec<Change>;
}

/// Opens (or creates) the database under `path` with every column family, checking the format version.
pub fn open(path: &Path) -> Result<Arc<DB>, StoreError> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    // Two background jobs suit the 2-core machines this runs on; RocksDB's default is the same but explicit.
    options.set_max_background_jobs(2);
    let descriptors = ALL_CFS
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
    let db = DB::open_cf_descriptors(&options, path, descriptors)?;
    let meta = db
        .cf_handle(CF_RAFT)
        .expect("column family created just above");
    match db.get_cf(meta, FORMAT_KEY)? {
        Some(bytes) => {
            let found = u32::from_be_bytes(
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("format version"))?,
            );
            if found == 2 || found == 3 {
                let mut batch = WriteBatch::default();
                let presence_entries = if found == 2 {
                    presence::upgrade_from_format_2(&db, &mut batch)?
                } else {
                    0
                };
                let mailbox_items = mailbox::upgrade_from_format_3(&db, &mut batch)?;
                batch.put_cf(meta, FORMAT_KEY, FORMAT_VERSION.to_be_bytes());
                let mut options = rocksdb::WriteOptions::default();
                options.set_sync(true);
                db.write_opt(batch, &options)?;
                tracing::info!(
                    presence_entries,
                    mailbox_items,
                    "upgraded the database from format {found} to {FORMAT_VERSION}"
                );
            } else if found != FORMAT_VERSION {
                return Err(StoreError::Format { found });
            }
        }
        None => db.put_cf(meta, FORMAT_KEY, FORMAT_VERSION.to_be_bytes())?,
    }
    Ok(Arc::new(db))
}

/// A column family handle; every one is created when the store opens.
pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name)
        .expect("every column family is created when the store opens")
}

/// Decodes a stored value, naming what it was in the error.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Decode { what, source })
}

/// Encodes a value for storage, naming what it was in the error.
pub(crate) fn encode<T: serde::Serialize>(
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(|source| StoreError::Encode { what, source })
}

/// Gathers one page of a list or search: at most `count` items and, once it holds one, nothing that would take it
/// past `bytes` (so an answer stays bounded whatever the record size limits are).
pub struct Page<T> {
    items: Vec<T>,
    count: usize,
    bytes: usize,
    used: usize,
}

impl<T> Page<T> {
    pub fn new(count: usize, bytes: usize) -> Self {
        Self {
            items: Vec::new(),
            count,
            bytes,
            used: 0,
        }
    }

    /// Adds `item`, which takes `size` bytes; false, and the item is not added, when the page is full (the
    /// caller stops there and reports that there is more).
    pub fn push(&mut self, item: T, size: usize) -> bool {
        let over_bytes = !self.items.is_empty() && self.used.saturating_add(size) > self.bytes;
        if self.items.len() >= self.count || over_bytes {
            return false;
        }
        self.used += size;
        self.items.push(item);
        true
    }

    pub fn into_items(self) -> Vec<T> {
        self.items
    }
}

/// Runs a blocking RocksDB job off the async threads.
pub async fn blocking<T, F>(job: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|error| StoreError::Join(error.to_string()))?
}

#[cfg(test)]
mod tests;
