//! The replicated state machine in RocksDB (openraft `RaftStateMachine`).
//!
//! Apply is deterministic: it reads only the command and the current state. Each command goes to the writer of
//! its domain ([`super::Apply`]: records, presence, mailbox, conferences, nodes). A batch of committed entries
//! becomes one RocksDB write batch that also records the last applied log id and membership, so the state on disk is
//! always the state after some whole prefix of the log. That write is not synced on its own: the synced log
//! appends that follow share the write-ahead log and make it durable, and if a crash loses it openraft re-applies
//! the entries from the log.
//!
//! Snapshots carry records and the node table (not the attribute index, which is rebuilt on install), encoded
//! as a versioned [`SnapshotPayload`]. The current snapshot is kept in the `snapshot` column family so it
//! survives restarts and can be sent to members that fell behind the purged log.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use rocksdb::{IteratorMode, WriteBatch, DB};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::conference::ConferenceWriter;
use super::mailbox::MailboxWriter;
use super::nodes::{self, NodeEntry, NodeWriter, NEXT_NODE_ID_KEY};
use super::presence::PresenceWriter;
use super::records::RecordWriter;
use super::{
    blocking, cf, decode, encode, Applied, Apply, Changes, StoreError, CF_ATTRS, CF_CONFERENCES,
    CF_CONF_CHAT, CF_MAILBOX, CF_NODES, CF_PRESENCE, CF_PRESENCE_ATTRS, CF_RECORDS, CF_SM_META,
    CF_SNAPSHOT, CF_USAGE,
};
use crate::command::{Op, Response};
use crate::events::{Change, Event, EventLog};
use crate::raft_types::{LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};

const LAST_APPLIED_KEY: &[u8] = b"last_applied";
const MEMBERSHIP_KEY: &[u8] = b"membership";
const SNAPSHOT_KEY: &[u8] = b"current";
/// Version of [`SnapshotPayload`]'s encoding.
/// 4: presence entries list several sessions (3, one session per entry, is still installed).
/// 5: mailbox items keep a trace context (3 and 4 are still installed).
const SNAPSHOT_VERSION: u32 = 5;

/// Raw (key, value) pairs of one column family.
type RawPairs = Vec<(ByteBuf, ByteBuf)>;

/// What a snapshot holds.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotPayload {
    version: u32,
    next_node_id: u64,
    /// Raw (key, value) pairs of the records column family.
    records: RawPairs,
    /// Raw (key, value) pairs of the node table.
    nodes: RawPairs,
    /// Raw (key, value) pairs of presence (the profile index is rebuilt).
    presence: RawPairs,
    /// Raw (key, value) pairs of the mailboxes.
    mailbox: RawPairs,
    /// Raw (key, value) pairs of conferences and their chats.
    conferences: RawPairs,
    conf_chat: RawPairs,
}

/// The snapshot as stored in the `snapshot` column family.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The state machine. openraft owns it; readers use [`StateReader`], which shares the database.
pub struct StateMachine {
    db: Arc<DB>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    events: EventLog,
    /// Times and sizes of snapshot builds and installs, when the node counts them.
    snapshot_metrics: Option<crate::metrics::SnapshotMetrics>,
}

/// Read access to the applied state for the services (records, node table).
#[derive(Clone)]
pub struct StateReader {
    db: Arc<DB>,
}

impl StateReader {
    pub fn new(db: Arc<DB>) -> Self {
        Self { db }
    }

    /// The database, for the record queries in [`super::records`].
    pub fn db(&self) -> &DB {
        &self.db
    }

    /// Every node ever registered, by node id, including tombstones.
    pub fn nodes(&self) -> Result<BTreeMap<u64, NodeEntry>, StoreError> {
        nodes::read_nodes(&self.db)
    }

    /// Whether the certificate with this SHA-256 was revoked (as of the applied state).
    pub fn is_revoked(&self, fingerprint: &[u8; 32]) -> Result<bool, StoreError> {
        nodes::is_revoked(&self.db, fingerprint)
    }
}

/// The writers of one batch, one per domain of the state machine.
struct Writers<'a> {
    records: RecordWriter<'a>,
    presence: PresenceWriter<'a>,
    mailbox: MailboxWriter<'a>,
    conferences: ConferenceWriter<'a>,
    nodes: NodeWriter<'a>,
}

impl<'a> Writers<'a> {
    fn new(db: &'a DB) -> Result<Self, StoreError> {
        Ok(Self {
            records: RecordWriter::new(db),
            presence: PresenceWriter::new(db),
            mailbox: MailboxWriter::new(db),
            conferences: ConferenceWriter::new(db),
            nodes: NodeWriter::new(db)?,
        })
    }

    /// Hands `op` to the writer of its domain.
    fn apply(
        &mut self,
        batch: &mut WriteBatch,
        op: &Op,
        at: Applied,
    ) -> Result<Response, StoreError> {
        match op {
            Op::PutRecord(op) => self.records.apply(batch, op, at),
            Op::DeleteRecord(op) => self.records.apply(batch, op, at),
            Op::SetNamespaceAcl(op) => self.records.apply(batch, op, at),
            Op::PresenceAttach(op) => self.presence.apply(batch, op, at),
            Op::PresenceDetach(op) => self.presence.apply(batch, op, at),
            Op::PresenceSet(op) => self.presence.apply(batch, op, at),
            Op::PresenceEndpoints(op) => self.presence.apply(batch, op, at),
            Op::ExpireHost(op) => self.presence.apply(batch, op, at),
            Op::MailboxPut(op) => self.mailbox.apply(batch, op, at),
            Op::MailboxAck(op) => self.mailbox.apply(batch, op, at),
            Op::ConferenceCreate(op) => self.conferences.apply(batch, op, at),
            Op::ConferenceInvite(op) => self.conferences.apply(batch, op, at),
            Op::ConferenceAnswer(op) => self.conferences.apply(batch, op, at),
            Op::ConferenceStart(op) => self.conferences.apply(batch, op, at),
            Op::ConferenceChat(op) => self.conferences.apply(batch, op, at),
            Op::RegisterNode(op) => self.nodes.apply(batch, op, at),
            Op::TombstoneNode(op) => self.nodes.apply(batch, op, at),
            Op::RelayLoad(op) => self.nodes.apply(batch, op, at),
            Op::LeafLoad(op) => self.nodes.apply(batch, op, at),
            Op::NodeScore(op) => self.nodes.apply(batch, op, at),
            Op::CandidateRtt(op) => self.nodes.apply(batch, op, at),
            Op::RevokeCertificate(op) => self.nodes.apply(batch, op, at),
            Op::SetPlacement(op) => self.nodes.apply(batch, op, at),
            Op::PlacementJournal(op) => self.nodes.apply(batch, op, at),
            Op::Candidate(op) => self.nodes.apply(batch, op, at),
            Op::GrantEligibility(op) => self.nodes.apply(batch, op, at),
            Op::NodeZone(op) => self.nodes.apply(batch, op, at),
            Op::NodeCertificate(op) => self.nodes.apply(batch, op, at),
            Op::SetAdoption(op) => self.nodes.apply(batch, op, at),
            Op::IssueCertificate(op) => self.nodes.apply(batch, op, at),
            Op::NodeIssuer(op) => self.nodes.apply(batch, op, at),
            Op::RecordIssued(op) => self.nodes.apply(batch, op, at),
            Op::Traced(traced) => {
                // One span per sampled command on every member: the replication and apply part of its trace.
                let span = tracing::info_span!(
                    "vesper.apply",
                    otel.kind = "internal",
                    vesper.raft.index = at.index,
                    vesper.command = traced.op.kind(),
                );
                traced.context.adopt(&span);
                let _entered = span.enter();
                match traced.op.as_ref() {
                    Op::MailboxPut(op) => self.mailbox.put(batch, op, at, Some(&traced.context)),
                    op => self.apply(batch, op, at),
                }
            }
        }
    }

    /// What the writers changed since the last call, for watches (a command changes one domain only).
    fn take_changes(&mut self) -> Vec<Change> {
        let mut changes = self.records.take_changes();
        changes.extend(self.conferences.take_changes());
        changes.extend(self.presence.take_changes());
        changes
    }
}

impl StateMachine {
    /// Opens the state machine on the shared database, reading back the last applied state. Changes are
    /// published to `events` from here on.
    pub fn open_with_events(db: Arc<DB>, events: EventLog) -> Result<Self, StoreError> {
        let mut state_machine = Self::open(db)?;
        events.reset_floor(state_machine.last_applied.map_or(0, |log_id| log_id.index));
        state_machine.events = events;
        Ok(state_machine)
    }

    /// Opens the state machine on the shared database, reading back the last applied state.
    pub fn open(db: Arc<DB>) -> Result<Self, StoreError> {
        let meta = cf(&db, CF_SM_META);
        let last_applied = db
            .get_pinned_cf(meta, LAST_APPLIED_KEY)?
            .map(|bytes| decode("last applied log id", &bytes))
            .transpose()?;
        let membership = db
            .get_pinned_cf(meta, MEMBERSHIP_KEY)?
            .map(|bytes| decode("membership", &bytes))
            .transpose()?
            .unwrap_or_default();
        Ok(Self {
            db,
            last_applied,
            membership,
            events: EventLog::default(),
            snapshot_metrics: None,
        })
    }

    /// Counts snapshot builds and installs in `metrics`.
    pub fn with_snapshot_metrics(mut self, metrics: crate::metrics::SnapshotMetrics) -> Self {
        self.snapshot_metrics = Some(metrics);
        self
    }

    /// Applies a batch of entries in one write batch. Returns one response per entry, in order, and the events.
    fn apply_batch(
        db: &DB,
        entries: &[crate::raft_types::Entry],
        mut membership: StoredMembership,
    ) -> Result<(Vec<Response>, StoredMembership, Vec<Event>), StoreError> {
        let mut batch = WriteBatch::default();
        let mut writers = Writers::new(db)?;
        let mut responses = Vec::with_capacity(entries.len());
        let mut events = Vec::new();
        for entry in entries {
            let index = entry.log_id.index;
            let response = match &entry.payload {
                EntryPayload::Blank => Response::Done,
                EntryPayload::Membership(config) => {
                    membership = StoredMembership::new(Some(entry.log_id), config.clone());
                    writers.nodes.add_members(config.nodes())?;
                    Response::Done
                }
                EntryPayload::Normal(command) => {
                    let at = Applied {
                        index,
                        at_ms: command.at_ms,
                    };
                    writers.apply(&mut batch, &command.op, at)?
                }
            };
            let changes = writers.take_changes().into_iter();
            events.extend(changes.map(|change| Event { index, change }));
            responses.push(response);
        }
        writers.nodes.finish(&mut batch)?;
        let meta = cf(db, CF_SM_META);
        if let Some(last) = entries.last() {
            batch.put_cf(
                meta,
                LAST_APPLIED_KEY,
                encode("last applied log id", &last.log_id)?,
            );
        }
        batch.put_cf(meta, MEMBERSHIP_KEY, encode("membership", &membership)?);
        db.write(batch)?;
        Ok((responses, membership, events))
    }

    fn build_payload(view: &OwnedSnapshot) -> Result<Vec<u8>, StoreError> {
        let db = view.db();
        let snapshot = view.borrow_dependent();
        let collect = |name: &str| -> Result<RawPairs, StoreError> {
            snapshot
                .iterator_cf(cf(db, name), IteratorMode::Start)
                .map(|item| {
                    item.map(|(key, value)| {
                        (ByteBuf::from(key.to_vec()), ByteBuf::from(value.to_vec()))
                    })
                    .map_err(StoreError::from)
                })
                .collect()
        };
        let next_node_id = snapshot
            .get_cf(cf(db, CF_SM_META), NEXT_NODE_ID_KEY)?
            .map(|bytes| decode::<u64>("next node id", &bytes))
            .transpose()?
            .unwrap_or(1);
        let payload = SnapshotPayload {
            version: SNAPSHOT_VERSION,
            next_node_id,
            records: collect(CF_RECORDS)?,
            nodes: collect(CF_NODES)?,
            presence: collect(CF_PRESENCE)?,
            mailbox: collect(CF_MAILBOX)?,
            conferences: collect(CF_CONFERENCES)?,
            conf_chat: collect(CF_CONF_CHAT)?,
        };
        encode("snapshot", &payload)
    }

    fn install_payload(db: &DB, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StoreError> {
        let payload: SnapshotPayload = decode("snapshot", data)?;
        // Version 4 is version 5 without trace contexts in mailbox items, and version 3 is version 4 with one
        // session per presence entry: their entries are upgraded as they load.
        let (upgrade_presence, upgrade_mailbox) = match payload.version {
            SNAPSHOT_VERSION => (false, false),
            4 => (false, true),
            3 => (true, true),
            found => return Err(StoreError::Format { found }),
        };
        // Replace the whole state: clear, load records and nodes, then rebuild the attribute index from records.
        let mut batch = WriteBatch::default();
        for name in [
            CF_RECORDS,
            CF_ATTRS,
            CF_USAGE,
            CF_NODES,
            CF_PRESENCE,
            CF_PRESENCE_ATTRS,
            CF_MAILBOX,
            CF_CONFERENCES,
            CF_CONF_CHAT,
        ] {
            for item in db.iterator_cf(cf(db, name), IteratorMode::Start) {
                let (key, _) = item?;
                batch.delete_cf(cf(db, name), key);
            }
        }
        for (key, value) in &payload.records {
            batch.put_cf(cf(db, CF_RECORDS), key.as_slice(), value.as_slice());
        }
        for (name, pairs) in [
            (CF_NODES, &payload.nodes),
            (CF_PRESENCE, &payload.presence),
            (CF_MAILBOX, &payload.mailbox),
            (CF_CONFERENCES, &payload.conferences),
            (CF_CONF_CHAT, &payload.conf_chat),
        ] {
            for (key, value) in pairs {
                if name == CF_PRESENCE && upgrade_presence {
                    let value = super::presence::upgrade_v2_value(value)?;
                    batch.put_cf(cf(db, name), key.as_slice(), value);
                } else if name == CF_MAILBOX && upgrade_mailbox {
                    let value = super::mailbox::upgrade_v3_value(value)?;
                    batch.put_cf(cf(db, name), key.as_slice(), value);
                } else {
                    batch.put_cf(cf(db, name), key.as_slice(), value.as_slice());
                }
            }
        }
        db.write(batch)?;
        let mut batch = WriteBatch::default();
        super::records::rebuild_index(db, &mut batch)?;
        super::presence::rebuild_index(db, &mut batch)?;
        let sm_meta = cf(db, CF_SM_META);
        batch.put_cf(
            sm_meta,
            NEXT_NODE_ID_KEY,
            encode("next node id", &payload.next_node_id)?,
        );
        batch.put_cf(
            sm_meta,
            LAST_APPLIED_KEY,
            encode("last applied log id", &meta.last_log_id)?,
        );
        batch.put_cf(
            sm_meta,
            MEMBERSHIP_KEY,
            encode("membership", &meta.last_membership)?,
        );
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.to_vec(),
        };
        batch.put_cf(
            cf(db, CF_SNAPSHOT),
            SNAPSHOT_KEY,
            encode("snapshot", &stored)?,
        );
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        db.write_opt(batch, &options)?;
        Ok(())
    }
}

/// A RocksDB point-in-time view borrowing its database.
type DbSnapshot<'db> = rocksdb::SnapshotWithThreadMode<'db, DB>;

self_cell::self_cell!(
    /// A RocksDB point-in-time view that owns a handle on its database, so it can move to another thread. The
    /// view borrows the database; `self_cell` keeps the two together without `unsafe` here (the view is dropped
    /// before the handle, and the borrow never escapes).
    pub struct OwnedSnapshot {
        owner: Arc<DB>,
        #[covariant]
        dependent: DbSnapshot,
    }
);

impl OwnedSnapshot {
    fn take(db: Arc<DB>) -> Self {
        Self::new(db, |db| db.snapshot())
    }

    fn db(&self) -> &DB {
        self.borrow_owner()
    }
}

/// Builds a snapshot from the point-in-time view taken when openraft asked for the builder.
///
/// openraft asks for a builder between two apply batches and then builds in another task while apply goes on.
/// The data must match `meta.last_log_id` exactly (a follower replays the log after it), so the builder takes a
/// RocksDB snapshot (cheap, no copy) at that moment and reads from it later, off the async threads, without
/// pausing apply.
pub struct SnapshotBuilder {
    view: Arc<OwnedSnapshot>,
    meta: SnapshotMeta,
    metrics: Option<crate::metrics::SnapshotMetrics>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, std::io::Error> {
        let started = std::time::Instant::now();
        let view = self.view.clone();
        let meta = self.meta.clone();
        let data = blocking(move || {
            let data = StateMachine::build_payload(&view)?;
            let stored = StoredSnapshot {
                meta,
                data: data.clone(),
            };
            view.db().put_cf(
                cf(view.db(), CF_SNAPSHOT),
                SNAPSHOT_KEY,
                encode("snapshot", &stored)?,
            )?;
            Ok(data)
        })
        .await?;
        if let Some(metrics) = &self.metrics {
            metrics.built(started.elapsed().as_secs_f64(), data.len());
        }
        Ok(Snapshot {
            meta: self.meta.clone(),
            snapshot: data,
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), std::io::Error> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), std::io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, std::io::Error>>
            + Unpin
            + OptionalSend,
    {
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            batch.push(entry);
            responders.push(responder);
        }
        let Some(last) = batch.last() else {
            return Ok(());
        };
        let last_log_id = last.log_id;
        // Apply reads records (memtable or block cache) and writes one unsynced batch: short enough to run
        // inline, which saves two thread hand-offs per batch on the write path.
        let (responses, membership, events) =
            Self::apply_batch(&self.db, &batch, self.membership.clone())?;
        self.events.publish(events);
        self.last_applied = Some(last_log_id);
        self.membership = membership;
        for (responder, response) in responders.into_iter().zip(responses) {
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            view: Arc::new(OwnedSnapshot::take(self.db.clone())),
            meta: SnapshotMeta {
                last_log_id: self.last_applied,
                last_membership: self.membership.clone(),
            },
            metrics: self.snapshot_metrics.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Vec<u8>,
    ) -> Result<(), std::io::Error> {
        let db = self.db.clone();
        let owned_meta = meta.clone();
        let started = std::time::Instant::now();
        let bytes = snapshot.len();
        blocking(move || Self::install_payload(&db, &owned_meta, &snapshot)).await?;
        if let Some(metrics) = &self.snapshot_metrics {
            metrics.installed(started.elapsed().as_secs_f64(), bytes);
        }
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        // What the snapshot changed is not in the event history: watches resuming from before it reset.
        self.events
            .reset_floor(meta.last_log_id.map_or(0, |log_id| log_id.index));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, std::io::Error> {
        let stored = self
            .db
            .get_pinned_cf(cf(&self.db, CF_SNAPSHOT), SNAPSHOT_KEY)
            .map_err(StoreError::from)?
            .map(|bytes| decode::<StoredSnapshot>("snapshot", &bytes))
            .transpose()?;
        Ok(stored.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: stored.data,
        }))
    }
}
