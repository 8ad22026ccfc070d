//! The replicated state machine in RocksDB (openraft `RaftStateMachine`).
//!
//! Apply is deterministic: it reads only the command and the current state. A batch of committed entries becomes
//! one RocksDB write batch that also records the last applied log id and membership, so the state on disk is
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
use super::presence::PresenceWriter;
use super::records::RecordWriter;
use super::{
    blocking, cf, decode, encode, StoreError, CF_ATTRS, CF_CONFERENCES, CF_CONF_CHAT, CF_MAILBOX,
    CF_NODES, CF_PRESENCE, CF_PRESENCE_ATTRS, CF_RECORDS, CF_SM_META, CF_SNAPSHOT, CF_USAGE,
};
use crate::command::{NodeInfo, Op, Rejection, Response};
use crate::events::{Change, Event, EventLog};
use crate::raft_types::{LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};

const LAST_APPLIED_KEY: &[u8] = b"last_applied";
const MEMBERSHIP_KEY: &[u8] = b"membership";
const NEXT_NODE_ID_KEY: &[u8] = b"next_node_id";
const SNAPSHOT_KEY: &[u8] = b"current";
/// Version of [`SnapshotPayload`]'s encoding.
const SNAPSHOT_VERSION: u32 = 3;

/// A super peer as the node table keeps it. Removed nodes stay as tombstones so their ids are never reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub info: NodeInfo,
    pub removed: bool,
}

/// A node's last relay load report. Kept in the node table under the node's key plus [`RELAY_LOAD_SUFFIX`],
/// so snapshots carry it with the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayLoad {
    pub active: u32,
    pub capacity: u32,
    pub at_ms: u64,
}

impl RelayLoad {
    /// Share of the capacity in use; a node that does not relay is full.
    pub fn fill(&self) -> f64 {
        if self.capacity == 0 {
            f64::INFINITY
        } else {
            f64::from(self.active) / f64::from(self.capacity)
        }
    }
}

/// Suffix of a relay load key in the node table (node keys are the 8-byte big-endian id alone).
const RELAY_LOAD_SUFFIX: u8 = b'L';

fn relay_load_key(node_id: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[..8].copy_from_slice(&node_id.to_be_bytes());
    key[8] = RELAY_LOAD_SUFFIX;
    key
}

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
}

/// Read access to the applied state for the services (records, node table).
#[derive(Clone)]
pub struct StateReader {
    db: Arc<DB>,
}

fn read_next_node_id(db: &DB) -> Result<u64, StoreError> {
    Ok(db
        .get_pinned_cf(cf(db, CF_SM_META), NEXT_NODE_ID_KEY)?
        .map(|bytes| decode::<u64>("next node id", &bytes))
        .transpose()?
        .unwrap_or(1))
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
        read_nodes(&self.db)
    }
}

/// Revocations live in the node table (so snapshots carry them) under this prefix and the certificate's
/// SHA-256; node entries have 8-byte keys and relay loads 9-byte ones.
const REVOKED_PREFIX: &[u8; 8] = b"revoked/";

fn revoked_key(fingerprint: &[u8; 32]) -> Vec<u8> {
    [REVOKED_PREFIX.as_slice(), fingerprint].concat()
}

impl StateReader {
    /// Whether the certificate with this SHA-256 was revoked (as of the applied state).
    pub fn is_revoked(&self, fingerprint: &[u8; 32]) -> Result<bool, StoreError> {
        Ok(self
            .db
            .get_pinned_cf(cf(&self.db, CF_NODES), revoked_key(fingerprint))?
            .is_some())
    }
}

/// The last relay load report of every node that made one.
pub fn read_relay_loads(db: &DB) -> Result<BTreeMap<u64, RelayLoad>, StoreError> {
    let mut loads = BTreeMap::new();
    for item in db.iterator_cf(cf(db, CF_NODES), IteratorMode::Start) {
        let (key, bytes) = item?;
        if key.len() == 9 && key[8] == RELAY_LOAD_SUFFIX {
            let id = u64::from_be_bytes(key[..8].try_into().expect("8 bytes"));
            loads.insert(id, decode("relay load", &bytes)?);
        }
    }
    Ok(loads)
}

fn read_nodes(db: &DB) -> Result<BTreeMap<u64, NodeEntry>, StoreError> {
    let mut nodes = BTreeMap::new();
    for item in db.iterator_cf(cf(db, CF_NODES), IteratorMode::Start) {
        let (key, bytes) = item?;
        let relay_load = key.len() == 9 && key[8] == RELAY_LOAD_SUFFIX;
        let revocation = key.len() == 40 && key.starts_with(REVOKED_PREFIX);
        let acl = key.starts_with(super::records::ACL_PREFIX);
        if relay_load || revocation || acl {
            continue;
        }
        let id = u64::from_be_bytes(
            key.as_ref()
                .try_into()
                .map_err(|_| StoreError::Corrupt("node key is not 8 bytes"))?,
        );
        nodes.insert(id, decode("node entry", &bytes)?);
    }
    Ok(nodes)
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
        })
    }

    /// Applies a batch of entries in one write batch. Returns one response per entry, in order.
    fn apply_batch(
        db: &DB,
        entries: &[crate::raft_types::Entry],
        mut membership: StoredMembership,
    ) -> Result<(Vec<Response>, StoredMembership, Vec<Event>), StoreError> {
        let mut batch = WriteBatch::default();
        let mut next_node_id = read_next_node_id(db)?;
        let mut nodes_touched: BTreeMap<u64, NodeEntry> = BTreeMap::new();
        let mut responses = Vec::with_capacity(entries.len());
        let mut events = Vec::new();
        {
            let mut records = RecordWriter::new(db);
            let mut presence = PresenceWriter::new(db);
            let mut conferences = ConferenceWriter::default();
            let batch = &mut batch;
            for entry in entries {
                let response = match &entry.payload {
                    EntryPayload::Blank => Response::Done,
                    EntryPayload::Membership(config) => {
                        membership = StoredMembership::new(Some(entry.log_id), config.clone());
                        // Every node that appears in a membership is in the node table, and its id is taken.
                        for (id, info) in config.nodes() {
                            next_node_id = next_node_id.max(id + 1);
                            let known = nodes_touched.contains_key(id)
                                || db
                                    .get_pinned_cf(cf(db, CF_NODES), id.to_be_bytes())?
                                    .is_some();
                            if !known {
                                nodes_touched.insert(
                                    *id,
                                    NodeEntry {
                                        info: info.clone(),
                                        removed: false,
                                    },
                                );
                            }
                        }
                        Response::Done
                    }
                    EntryPayload::Normal(command) => match &command.op {
                        Op::PutRecord {
                            owner,
                            namespace,
                            key,
                            attributes,
                            value,
                            expected_version,
                            quota,
                        } => records.put(
                            batch,
                            *owner,
                            namespace,
                            key,
                            attributes.clone(),
                            value.clone(),
                            *expected_version,
                            *quota,
                            command.at_ms,
                        )?,
                        Op::DeleteRecord {
                            owner,
                            namespace,
                            key,
                            expected_version,
                        } => records.delete(batch, *owner, namespace, key, *expected_version)?,
                        Op::RegisterNode { node } => {
                            // Idempotent for a retried join: a live node with the same peer id keeps its id.
                            let mut existing = None;
                            for (id, entry) in Self::all_nodes(db, &nodes_touched)? {
                                if entry.info.peer_id == node.peer_id && !entry.removed {
                                    existing = Some(id);
                                }
                            }
                            let id = match existing {
                                Some(id) => id,
                                None => {
                                    let id = next_node_id;
                                    next_node_id += 1;
                                    id
                                }
                            };
                            nodes_touched.insert(
                                id,
                                NodeEntry {
                                    info: node.clone(),
                                    removed: false,
                                },
                            );
                            Response::NodeId(id)
                        }
                        Op::TombstoneNode { node_id } => {
                            let current = match nodes_touched.get(node_id) {
                                Some(entry) => Some(entry.clone()),
                                None => db
                                    .get_pinned_cf(cf(db, CF_NODES), node_id.to_be_bytes())?
                                    .map(|bytes| decode::<NodeEntry>("node entry", &bytes))
                                    .transpose()?,
                            };
                            match current {
                                Some(mut entry) => {
                                    entry.removed = true;
                                    nodes_touched.insert(*node_id, entry);
                                    Response::Done
                                }
                                None => Response::Rejected(Rejection::UnknownNode(*node_id)),
                            }
                        }
                        Op::PresenceAttach {
                            peer,
                            host,
                            session,
                        } => presence.attach(batch, *peer, *host, *session, command.at_ms)?,
                        Op::PresenceDetach { peer, session } => {
                            presence.detach(batch, *peer, *session, command.at_ms)?
                        }
                        Op::PresenceSet {
                            peer,
                            session,
                            status,
                            note,
                            attributes,
                        } => presence.set(
                            batch,
                            *peer,
                            *session,
                            *status,
                            note.clone(),
                            attributes.clone(),
                            command.at_ms,
                        )?,
                        Op::RelayLoad {
                            node_id,
                            active,
                            capacity,
                        } => {
                            let load = RelayLoad {
                                active: *active,
                                capacity: *capacity,
                                at_ms: command.at_ms,
                            };
                            batch.put_cf(
                                cf(db, CF_NODES),
                                relay_load_key(*node_id),
                                encode("relay load", &load)?,
                            );
                            Response::Done
                        }
                        Op::RevokeCertificate { fingerprint } => {
                            batch.put_cf(
                                cf(db, CF_NODES),
                                revoked_key(fingerprint),
                                encode("revocation time", &command.at_ms)?,
                            );
                            Response::Done
                        }
                        Op::SetNamespaceAcl { namespace, acl } => {
                            records.set_acl(batch, namespace, acl.clone())?
                        }
                        Op::PresenceEndpoints {
                            peer,
                            session,
                            candidates,
                            nat_class,
                        } => presence.set_endpoints(
                            batch,
                            *peer,
                            *session,
                            candidates.clone(),
                            nat_class.clone(),
                            command.at_ms,
                        )?,
                        Op::ExpireHost { host } => {
                            presence.expire_host(batch, *host, command.at_ms)?
                        }
                        Op::MailboxPut {
                            to,
                            message,
                            expires_at_ms,
                            quota,
                        } => presence.mailbox_put(
                            batch,
                            *to,
                            message.clone(),
                            *expires_at_ms,
                            *quota,
                            entry.log_id.index,
                            command.at_ms,
                        )?,
                        Op::ConferenceCreate {
                            owner,
                            id,
                            title,
                            description,
                            start_at_ms,
                        } => conferences.create(
                            db,
                            batch,
                            *owner,
                            id,
                            title,
                            description,
                            *start_at_ms,
                            command.at_ms,
                        )?,
                        Op::ConferenceInvite {
                            owner,
                            id,
                            invitees,
                        } => conferences.invite(db, batch, *owner, id, invitees)?,
                        Op::ConferenceAnswer { peer, id, accept } => {
                            conferences.answer(db, batch, *peer, id, *accept)?
                        }
                        Op::ConferenceStart { id } => conferences.start(db, batch, id)?,
                        Op::ConferenceChat {
                            from,
                            id,
                            message_id,
                            text,
                        } => conferences.chat(
                            db,
                            batch,
                            *from,
                            id,
                            message_id,
                            text,
                            command.at_ms,
                        )?,
                        Op::MailboxAck { to, sequences } => {
                            presence.mailbox_ack(batch, *to, sequences)?
                        }
                    },
                };
                let index = entry.log_id.index;
                if let EntryPayload::Normal(command) = &entry.payload {
                    match (&command.op, &response) {
                        (Op::PutRecord { namespace, key, .. }, Response::Record(record)) => events
                            .push(Event {
                                index,
                                change: Change::Record {
                                    namespace: namespace.clone(),
                                    key: key.clone(),
                                    record: Some(record.clone()),
                                },
                            }),
                        (
                            Op::ConferenceCreate { id, .. }
                            | Op::ConferenceInvite { id, .. }
                            | Op::ConferenceAnswer { id, .. }
                            | Op::ConferenceStart { id },
                            Response::Conference(entry),
                        ) => events.push(Event {
                            index,
                            change: Change::Conference {
                                id: id.clone(),
                                entry: entry.clone(),
                            },
                        }),
                        (Op::SetNamespaceAcl { namespace, acl }, Response::Done) => {
                            events.push(Event {
                                index,
                                change: Change::Acl {
                                    namespace: namespace.clone(),
                                    acl: acl.clone(),
                                },
                            })
                        }
                        (Op::DeleteRecord { namespace, key, .. }, Response::Deleted(true)) => {
                            events.push(Event {
                                index,
                                change: Change::Record {
                                    namespace: namespace.clone(),
                                    key: key.clone(),
                                    record: None,
                                },
                            })
                        }
                        _ => {}
                    }
                }
                // Only new chat lines make events: a retried post answers with the stored line.
                for (conference, chat) in conferences.take_new_chats() {
                    events.push(Event {
                        index,
                        change: Change::Chat { conference, chat },
                    });
                }
                for (peer, entry) in presence.take_changes() {
                    events.push(Event {
                        index,
                        change: Change::Presence { peer, entry },
                    });
                }
                responses.push(response);
            }
        }
        for (id, entry) in &nodes_touched {
            batch.put_cf(
                cf(db, CF_NODES),
                id.to_be_bytes(),
                encode("node entry", entry)?,
            );
        }
        let meta = cf(db, CF_SM_META);
        batch.put_cf(
            meta,
            NEXT_NODE_ID_KEY,
            encode("next node id", &next_node_id)?,
        );
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

    /// The node table with this batch's pending changes laid over it.
    fn all_nodes(
        db: &DB,
        pending: &BTreeMap<u64, NodeEntry>,
    ) -> Result<BTreeMap<u64, NodeEntry>, StoreError> {
        let mut nodes = read_nodes(db)?;
        nodes.extend(pending.iter().map(|(id, entry)| (*id, entry.clone())));
        Ok(nodes)
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
        if payload.version != SNAPSHOT_VERSION {
            return Err(StoreError::Format {
                found: payload.version,
            });
        }
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
                batch.put_cf(cf(db, name), key.as_slice(), value.as_slice());
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
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, std::io::Error> {
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
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Vec<u8>,
    ) -> Result<(), std::io::Error> {
        let db = self.db.clone();
        let owned_meta = meta.clone();
        blocking(move || Self::install_payload(&db, &owned_meta, &snapshot)).await?;
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
