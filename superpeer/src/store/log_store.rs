//! The Raft log in RocksDB (openraft `RaftLogStorage`).
//!
//! Entries live in the `log` column family under their big-endian index, so iteration order is log order. The
//! vote, the committed log id and the last purged log id live in the `raft` column family.
//!
//! Durability: `append` writes the entries (visible at once, as openraft requires) and hands the flush callback
//! to the flusher thread, which syncs the write-ahead log and only then reports the entries flushed. openraft
//! counts an entry only after that report, so it is on disk before it counts; meanwhile the leader already
//! replicates it, so its own fsync overlaps the followers'. The flusher drains every callback queued while it
//! was syncing and covers them with one fsync (group commit), reporting them in order.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use prometheus_client::metrics::histogram::Histogram;

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};

use super::{blocking, decode, encode, StoreError, CF_LOG, CF_RAFT};
use crate::raft_types::{Entry, LogId, TypeConfig, Vote};

const VOTE_KEY: &[u8] = b"vote";
const COMMITTED_KEY: &[u8] = b"committed";
const LAST_PURGED_KEY: &[u8] = b"last_purged";

/// The Raft log; cheap to clone (it is a handle on the shared database and the flusher).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    flusher: Arc<Flusher>,
}

/// The flusher thread's queue and handle. Dropping the last one closes the queue and joins the thread, so the
/// database handle the thread holds is released before the store is gone (an in-process reopen then works).
struct Flusher {
    queue: Option<std::sync::mpsc::Sender<IOFlushed<TypeConfig>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Syncs the write-ahead log for queued appends, many per fsync, and reports them flushed in order. Ends when
/// every `LogStore` handle is gone.
fn run_flusher(
    db: Arc<DB>,
    queue: std::sync::mpsc::Receiver<IOFlushed<TypeConfig>>,
    fsync: Histogram,
) {
    while let Ok(first) = queue.recv() {
        let mut waiting = vec![first];
        waiting.extend(queue.try_iter());
        let started = std::time::Instant::now();
        let flushed = db.flush_wal(true);
        fsync.observe(started.elapsed().as_secs_f64());
        match flushed {
            Ok(()) => {
                for callback in waiting {
                    callback.io_completed(Ok(()));
                }
            }
            Err(error) => {
                tracing::error!(%error, "cannot sync the raft log");
                for callback in waiting {
                    callback.io_completed(Err(std::io::Error::other(error.to_string())));
                }
            }
        }
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn synced() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(true);
    options
}

impl LogStore {
    pub fn new(db: Arc<DB>) -> Self {
        Self::with_fsync_histogram(db, Histogram::new([]))
    }

    /// A log store that records the duration of each fsync (one group commit) in `fsync`.
    pub fn with_fsync_histogram(db: Arc<DB>, fsync: Histogram) -> Self {
        let (sender, queue) = std::sync::mpsc::channel();
        let flusher_db = db.clone();
        let thread = std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || run_flusher(flusher_db, queue, fsync))
            .expect("the OS can start the log flusher thread");
        let flusher = Arc::new(Flusher {
            queue: Some(sender),
            thread: Some(thread),
        });
        Self { db, flusher }
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family is created when the store opens")
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        self.db
            .get_pinned_cf(self.cf(CF_RAFT), key)?
            .map(|bytes| decode(what, &bytes))
            .transpose()
    }

    fn put_meta_synced<T: serde::Serialize>(
        &self,
        key: &[u8],
        what: &'static str,
        value: &T,
    ) -> Result<(), StoreError> {
        self.db
            .put_cf_opt(self.cf(CF_RAFT), key, encode(what, value)?, &synced())?;
        Ok(())
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StoreError> {
        let mut iter = self.db.iterator_cf(self.cf(CF_LOG), IteratorMode::End);
        match iter.next() {
            Some(item) => {
                let (_, bytes) = item?;
                let entry: Entry = decode("log entry", &bytes)?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        }
    }

    fn read_range(&self, start: u64, end: Option<u64>) -> Result<Vec<Entry>, StoreError> {
        let mut entries = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_LOG),
            IteratorMode::From(&index_key(start), Direction::Forward),
        ) {
            let (key, bytes) = item?;
            let index = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("log key is not 8 bytes"))?,
            );
            if end.is_some_and(|end| index >= end) {
                break;
            }
            entries.push(decode("log entry", &bytes)?);
        }
        Ok(entries)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, std::io::Error> {
        let start = match range.start_bound() {
            Bound::Included(&start) => start,
            Bound::Excluded(&start) => start + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&end) => Some(end + 1),
            Bound::Excluded(&end) => Some(end),
            Bound::Unbounded => None,
        };
        let store = self.clone();
        Ok(blocking(move || store.read_range(start, end)).await?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, std::io::Error> {
        Ok(self.get_meta(VOTE_KEY, "vote")?)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, std::io::Error> {
        let last_purged: Option<LogId> = self.get_meta(LAST_PURGED_KEY, "last purged log id")?;
        let last = self.last_entry_log_id()?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), std::io::Error> {
        let (store, vote) = (self.clone(), *vote);
        Ok(blocking(move || store.put_meta_synced(VOTE_KEY, "vote", &vote)).await?)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), std::io::Error> {
        // Not synced: losing it only means re-applying a few entries after a crash, which apply tolerates.
        let bytes = encode("committed log id", &committed)?;
        self.db
            .put_cf(self.cf(CF_RAFT), COMMITTED_KEY, bytes)
            .map_err(StoreError::from)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, std::io::Error> {
        Ok(self
            .get_meta::<Option<LogId>>(COMMITTED_KEY, "committed log id")?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), std::io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        for entry in entries {
            batch.put_cf(
                self.cf(CF_LOG),
                index_key(entry.log_id.index),
                encode("log entry", &entry)?,
            );
        }
        // An unsynced write only touches the write-ahead log buffer and the memtable (microseconds), so it runs
        // inline; the fsync, which waits on the disk, is the flusher's.
        self.db.write(batch).map_err(StoreError::from)?;
        let queue = self
            .flusher
            .queue
            .as_ref()
            .expect("the queue is only taken when the flusher drops");
        if let Err(unsent) = queue.send(callback) {
            // The flusher only stops when every handle is gone, which cannot be while we run.
            unsent
                .0
                .io_completed(Err(std::io::Error::other("the log flusher stopped")));
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), std::io::Error> {
        let from = last_log_id.map_or(0, |log_id| log_id.index + 1);
        let store = self.clone();
        Ok(blocking(move || {
            store.db.delete_range_cf_opt(
                store.cf(CF_LOG),
                index_key(from),
                index_key(u64::MAX),
                &synced(),
            )?;
            // delete_range excludes the end key; u64::MAX is never a real index.
            Ok(())
        })
        .await?)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), std::io::Error> {
        let store = self.clone();
        Ok(blocking(move || {
            // Record the purge point first, so a crash in between never leaves a hole openraft does not know of.
            store.put_meta_synced(LAST_PURGED_KEY, "last purged log id", &log_id)?;
            store.db.delete_range_cf(
                store.cf(CF_LOG),
                index_key(0),
                index_key(log_id.index + 1),
            )?;
            Ok(())
        })
        .await?)
    }
}
