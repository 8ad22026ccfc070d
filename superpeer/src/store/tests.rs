//! Storage tests: openraft's own suite against the RocksDB store, plus apply, search and snapshot tests with
//! Vesper's commands (which the suite never sends).

use std::collections::BTreeMap;

use futures::stream;
use openraft::storage::{RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::{EntryPayload, StorageError};
use tempfile::TempDir;

use super::records::{self, Condition, Term};
use super::state_machine::StateReader;
use super::{open, LogStore, StateMachine, StoreError};
use super::{Applied, Apply};
use crate::command::{
    Command, DeleteRecord, NodeInfo, Op, PutRecord, QuotaKind, RecordQuota, RegisterNode,
    Rejection, Response, SetNamespaceAcl, TombstoneNode,
};
use crate::raft_types::{Entry, LogId, TypeConfig};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = TempDir::new().expect("temporary directory");
        let db = open(dir.path()).expect("open store");
        let state_machine = StateMachine::open(db.clone()).expect("open state machine");
        Ok((dir, LogStore::new(db), state_machine))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(Builder).await
}

fn log_id(index: u64) -> LogId {
    openraft::testing::log_id::<TypeConfig>(1, 1, index)
}

/// Where a command at `index` is applied (the clock as `entry` sets it).
fn at(index: u64) -> Applied {
    Applied {
        index,
        at_ms: 1_000 + index,
    }
}

fn entry(index: u64, op: Op) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command {
            at_ms: 1_000 + index,
            op,
        }),
    }
}

/// A quota no test of other rules reaches.
const AMPLE: RecordQuota = RecordQuota {
    records: 1_000_000,
    bytes: 1 << 40,
};

fn put(owner: u8, key: &str, attributes: &[(&str, &str)], expected: Option<u64>) -> Op {
    put_within(owner, key, attributes, expected, AMPLE)
}

fn put_within(
    owner: u8,
    key: &str,
    attributes: &[(&str, &str)],
    expected: Option<u64>,
    quota: RecordQuota,
) -> Op {
    PutRecord {
        owner: [owner; 32],
        namespace: "ns".into(),
        key: key.into(),
        attributes: attributes
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect::<BTreeMap<_, _>>(),
        value: key.as_bytes().to_vec(),
        expected_version: expected,
        quota,
    }
    .into()
}

/// Applies entries without responders (as a follower does) and returns the state machine.
async fn apply_all(state_machine: &mut StateMachine, entries: Vec<Entry>) {
    let items: Vec<Result<_, std::io::Error>> =
        entries.into_iter().map(|entry| Ok((entry, None))).collect();
    state_machine
        .apply(stream::iter(items))
        .await
        .expect("apply");
}

fn keys(found: &[(String, crate::command::StoredRecord)]) -> Vec<&str> {
    found.iter().map(|(key, _)| key.as_str()).collect()
}

#[tokio::test]
async fn apply_enforces_ownership_and_versions_and_keeps_the_index_exact() {
    let dir = TempDir::new().unwrap();
    let db = open(dir.path()).unwrap();
    let mut state_machine = StateMachine::open(db.clone()).unwrap();
    apply_all(
        &mut state_machine,
        vec![
            entry(1, put(1, "a", &[("color", "red"), ("size", "large")], None)),
            entry(2, put(1, "b", &[("color", "green")], Some(0))),
            entry(3, put(2, "c", &[("color", "red"), ("size", "small")], None)),
            // Same batch: rewrite a's attributes; the old index entries must go.
            entry(4, put(1, "a", &[("color", "blue")], Some(1))),
            // Stale compare-and-set and a foreign owner: both rejected, nothing changes.
            entry(5, put(1, "b", &[("color", "black")], Some(7))),
            entry(6, put(2, "b", &[("color", "black")], None)),
            entry(
                7,
                DeleteRecord {
                    owner: [2; 32],
                    namespace: "ns".into(),
                    key: "c".into(),
                    expected_version: None,
                }
                .into(),
            ),
        ],
    )
    .await;
    let db = StateReader::new(db);
    let a = records::get(db.db(), "ns", "a").unwrap().unwrap();
    assert_eq!(a.version, 2);
    assert_eq!(a.created_at_ms, 1_001);
    assert_eq!(a.updated_at_ms, 1_004);
    assert_eq!(
        records::get(db.db(), "ns", "b")
            .unwrap()
            .unwrap()
            .attributes["color"],
        "green"
    );
    assert!(records::get(db.db(), "ns", "c").unwrap().is_none());

    let equals = |name: &str, value: &str| Term {
        attribute: name.into(),
        condition: Condition::Equals(value.into()),
    };
    let (found, _) = records::search(
        db.db(),
        "ns",
        &[equals("color", "red")],
        None,
        10,
        usize::MAX,
    )
    .unwrap();
    assert!(
        found.is_empty(),
        "a was recoloured and c deleted: {:?}",
        keys(&found)
    );
    let (found, _) = records::search(
        db.db(),
        "ns",
        &[equals("color", "blue")],
        None,
        10,
        usize::MAX,
    )
    .unwrap();
    assert_eq!(keys(&found), ["a"]);
    let prefix = Term {
        attribute: "color".into(),
        condition: Condition::Prefix("g".into()),
    };
    let (found, _) = records::search(db.db(), "ns", &[prefix], None, 10, usize::MAX).unwrap();
    assert_eq!(keys(&found), ["b"]);
    let (found, more) = records::list(db.db(), "ns", "", None, 1, usize::MAX).unwrap();
    assert_eq!((keys(&found), more), (vec!["a"], true));
    let (found, more) = records::list(db.db(), "ns", "", Some("a"), 1, usize::MAX).unwrap();
    assert_eq!((keys(&found), more), (vec!["b"], false));
}

#[tokio::test]
async fn pages_stop_at_their_byte_budget_but_hold_at_least_one_record() {
    let dir = TempDir::new().unwrap();
    let db = open(dir.path()).unwrap();
    let mut state_machine = StateMachine::open(db.clone()).unwrap();
    let entries = ["a", "b", "c"]
        .into_iter()
        .enumerate()
        .map(|(index, key)| {
            let mut op = put(1, key, &[], None);
            if let Op::PutRecord(put) = &mut op {
                put.value = vec![7; 1000];
            }
            entry(index as u64 + 1, op)
        })
        .collect();
    apply_all(&mut state_machine, entries).await;
    let db = StateReader::new(db);
    // Each record takes 2 (namespace) + 1 (key) + 1000 (value) bytes.
    let (found, more) = records::list(db.db(), "ns", "", None, 10, 2 * 1003).unwrap();
    assert_eq!((keys(&found), more), (vec!["a", "b"], true));
    let (found, more) = records::list(db.db(), "ns", "", Some("b"), 10, 2 * 1003).unwrap();
    assert_eq!((keys(&found), more), (vec!["c"], false));
    // A budget smaller than one record still makes progress, one record per page.
    let (found, more) = records::list(db.db(), "ns", "", None, 10, 1).unwrap();
    assert_eq!((keys(&found), more), (vec!["a"], true));
}

#[tokio::test]
async fn responses_report_rejections() {
    let dir = TempDir::new().unwrap();
    let db = open(dir.path()).unwrap();
    let mut batch = rocksdb::WriteBatch::default();
    let mut writer = records::RecordWriter::new(&db);
    let create = PutRecord {
        owner: [1; 32],
        namespace: "ns".into(),
        key: "k".into(),
        attributes: BTreeMap::new(),
        value: vec![],
        expected_version: Some(0),
        quota: AMPLE,
    };
    let first = writer.apply(&mut batch, &create, at(5)).unwrap();
    assert!(matches!(first, Response::Record(ref record) if record.version == 1));
    let again = writer.apply(&mut batch, &create, at(6)).unwrap();
    assert_eq!(
        again,
        Response::Rejected(Rejection::VersionMismatch {
            expected: 0,
            current: 1
        })
    );
    let foreign = DeleteRecord {
        owner: [9; 32],
        namespace: "ns".into(),
        key: "k".into(),
        expected_version: None,
    };
    let foreign = writer.apply(&mut batch, &foreign, at(7)).unwrap();
    assert_eq!(foreign, Response::Rejected(Rejection::NotOwner));
}

#[tokio::test]
async fn node_ids_are_never_reused() {
    let dir = TempDir::new().unwrap();
    let db = open(dir.path()).unwrap();
    let mut state_machine = StateMachine::open(db.clone()).unwrap();
    let node = |name: &str| NodeInfo {
        peer_id: name.into(),
        cluster_addr: format!("{name}:1"),
        ..NodeInfo::default()
    };
    let membership = openraft::Membership::new(
        vec![std::collections::BTreeSet::from([1])],
        BTreeMap::from([(1, node("first"))]),
    )
    .unwrap();
    apply_all(
        &mut state_machine,
        vec![
            Entry {
                log_id: log_id(1),
                payload: EntryPayload::Membership(membership),
            },
            entry(
                2,
                RegisterNode {
                    node: node("second"),
                }
                .into(),
            ),
            entry(3, TombstoneNode { node_id: 2 }.into()),
            entry(
                4,
                RegisterNode {
                    node: node("second"),
                }
                .into(),
            ),
        ],
    )
    .await;
    let nodes = StateReader::new(db).nodes().unwrap();
    assert_eq!(nodes.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
    assert!(nodes[&2].removed);
    assert_eq!(nodes[&3].info.peer_id, "second");
}

#[tokio::test]
async fn snapshot_moves_records_and_rebuilds_the_index() {
    let source_dir = TempDir::new().unwrap();
    let source_db = open(source_dir.path()).unwrap();
    let mut source = StateMachine::open(source_db.clone()).unwrap();
    apply_all(
        &mut source,
        (1..=50)
            .map(|i| {
                entry(
                    i,
                    put(
                        1,
                        &format!("k{i:02}"),
                        &[("parity", if i % 2 == 0 { "even" } else { "odd" })],
                        None,
                    ),
                )
            })
            .collect(),
    )
    .await;
    let mut builder = source.get_snapshot_builder().await;
    let snapshot = builder.build_snapshot().await.unwrap();
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(50)));

    let target_dir = TempDir::new().unwrap();
    let target_db = open(target_dir.path()).unwrap();
    let mut target = StateMachine::open(target_db.clone()).unwrap();
    // Something stale on the target that the snapshot must replace.
    apply_all(
        &mut target,
        vec![entry(1, put(7, "stale", &[("parity", "even")], None))],
    )
    .await;
    target
        .install_snapshot(&snapshot.meta, snapshot.snapshot.clone())
        .await
        .unwrap();
    let reader = StateReader::new(target_db);
    let even = Term {
        attribute: "parity".into(),
        condition: Condition::Equals("even".into()),
    };
    let (found, _) = records::search(reader.db(), "ns", &[even], None, 100, usize::MAX).unwrap();
    assert_eq!(found.len(), 25);
    assert!(records::get(reader.db(), "ns", "stale").unwrap().is_none());
    // Usage is rebuilt from the records: the snapshot's owner, and nothing left of the stale one.
    let usage = records::usage(reader.db(), &[1; 32]).unwrap();
    assert_eq!(usage.records, 50);
    assert_eq!(
        records::usage(reader.db(), &[7; 32]).unwrap(),
        records::Usage::default()
    );
    let (applied, _) = target.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(50)));
    let current = target.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snapshot.meta);
}

#[tokio::test]
async fn log_survives_reopen() {
    let dir = TempDir::new().unwrap();
    {
        let db = open(dir.path()).unwrap();
        let mut log = LogStore::new(db);
        let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
        log.append(
            vec![
                entry(1, put(1, "a", &[], None)),
                entry(2, put(1, "b", &[], None)),
            ],
            openraft::storage::IOFlushed::signal(tx),
        )
        .await
        .unwrap();
        rx.await.unwrap().unwrap();
    }
    let db = open(dir.path()).unwrap();
    let mut log = LogStore::new(db);
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(2)));
}

fn acl(
    namespace: &str,
    write: crate::command::Access,
    read: crate::command::Access,
    members: &[u8],
) -> Op {
    SetNamespaceAcl {
        namespace: namespace.into(),
        acl: Some(crate::command::NamespaceAcl {
            write,
            read,
            members: members.iter().map(|byte| [*byte; 32]).collect(),
        }),
    }
    .into()
}

#[tokio::test]
async fn apply_enforces_namespace_acls_in_log_order() {
    use crate::command::Access::{Anyone, Members};
    let dir = TempDir::new().unwrap();
    let db = open(dir.path()).unwrap();
    let mut state_machine = StateMachine::open(db.clone()).unwrap();
    let responses = state_machine
        .apply(stream::iter(
            vec![
                // Open namespace: peer 3 creates "x".
                entry(1, put(3, "x", &[], None)),
                // Group write for peers 1 and 2: peer 3 (not a member) is refused even on its own record.
                entry(2, acl("ns", Members, Anyone, &[1, 2])),
                entry(3, put(3, "x", &[], None)),
                entry(4, put(1, "a", &[], None)),
                // Group write: member 2 may change member 1's record, which keeps 1 as its owner.
                entry(5, put(2, "a", &[("by", "two")], Some(1))),
                // Cleared in the same batch: peer 3 writes again, but 2 no longer changes 1's record.
                entry(
                    6,
                    SetNamespaceAcl {
                        namespace: "ns".into(),
                        acl: None,
                    }
                    .into(),
                ),
                entry(7, put(3, "x", &[], None)),
                entry(8, put(2, "a", &[], None)),
            ]
            .into_iter()
            .map(|entry| Ok::<_, std::io::Error>((entry, None))),
        ))
        .await;
    responses.expect("apply");
    let reader = StateReader::new(db.clone());
    let x = records::get(reader.db(), "ns", "x").unwrap().unwrap();
    assert_eq!(x.version, 2, "put 3 refused, put 7 accepted");
    let a = records::get(reader.db(), "ns", "a").unwrap().unwrap();
    assert_eq!(
        (a.owner, a.version),
        ([1; 32], 2),
        "put 5 accepted, put 8 refused"
    );
    assert_eq!(a.attributes["by"], "two");
    assert!(records::acls(reader.db()).unwrap().is_empty());
    // ACLs share the node table: the node list must not try to read them as nodes.
    let mut state_machine = StateMachine::open(db.clone()).unwrap();
    apply_all(
        &mut state_machine,
        vec![entry(9, acl("team", Members, Members, &[1]))],
    )
    .await;
    let acls = records::acls(reader.db()).unwrap();
    assert_eq!(acls.len(), 1);
    assert_eq!(acls[0].0, "team");
    assert!(acls[0].1.may_read(&[1; 32]) && !acls[0].1.may_read(&[2; 32]));
    reader.nodes().expect("node table still reads");
}

#[tokio::test]
async fn apply_enforces_index_quotas_in_log_order() {
    use crate::command::Access::{Anyone, Members};
    let dir = TempDir::new().unwrap();
    let db = open(dir.path()).unwrap();
    let mut state_machine = StateMachine::open(db.clone()).unwrap();
    // "ns" + a one-byte key + the same one-byte value: 4 bytes a record.
    let two = RecordQuota {
        records: 2,
        bytes: 1_000,
    };
    let responses = state_machine
        .apply(stream::iter(
            vec![
                entry(1, put_within(1, "a", &[], None, two)),
                entry(2, put_within(1, "b", &[], None, two)),
                // A third record: refused. Peer 2 is not affected by peer 1's usage.
                entry(3, put_within(1, "c", &[], None, two)),
                entry(4, put_within(2, "c", &[], None, two)),
                // Replacing an owned record does not add one; deleting frees a place in the same batch.
                entry(5, put_within(1, "a", &[("x", "y")], None, two)),
                entry(
                    6,
                    DeleteRecord {
                        owner: [1; 32],
                        namespace: "ns".into(),
                        key: "b".into(),
                        expected_version: None,
                    }
                    .into(),
                ),
                entry(7, put_within(1, "d", &[], None, two)),
                // Bytes: a put that grows peer 1 past 8 bytes is refused, one that shrinks it goes through.
                entry(
                    8,
                    put_within(
                        1,
                        "a",
                        &[("long", "attribute value")],
                        None,
                        RecordQuota {
                            records: 2,
                            bytes: 8,
                        },
                    ),
                ),
                entry(
                    9,
                    put_within(
                        1,
                        "a",
                        &[],
                        None,
                        RecordQuota {
                            records: 2,
                            bytes: 1,
                        },
                    ),
                ),
                // Group write: peer 2 changing peer 1's record is charged to peer 1, the owner.
                entry(10, acl("ns", Members, Anyone, &[1, 2])),
                entry(
                    11,
                    put_within(
                        2,
                        "d",
                        &[("grown", "by peer two")],
                        None,
                        RecordQuota {
                            records: 2,
                            bytes: 8,
                        },
                    ),
                ),
            ]
            .into_iter()
            .map(|entry| Ok::<_, std::io::Error>((entry, None))),
        ))
        .await;
    responses.expect("apply");
    let reader = StateReader::new(db.clone());
    let db = reader.db();
    let present = |key: &str| records::get(db, "ns", key).unwrap();
    assert!(present("b").is_none(), "deleted at 6");
    assert_eq!(
        present("c").unwrap().owner,
        [2; 32],
        "peer 1's put 3 refused"
    );
    assert_eq!(present("d").unwrap().owner, [1; 32], "put 7 accepted");
    assert!(
        present("d").unwrap().attributes.is_empty(),
        "put 11 refused"
    );
    let a = present("a").unwrap();
    assert_eq!(
        (a.version, a.attributes.len()),
        (3, 0),
        "puts 5 and 9 accepted, 8 refused"
    );
    assert_eq!(
        records::usage(db, &[1; 32]).unwrap(),
        records::Usage {
            records: 2,
            bytes: 8
        }
    );
    assert_eq!(
        records::usage(db, &[2; 32]).unwrap(),
        records::Usage {
            records: 1,
            bytes: 4
        }
    );
    // The rejection names the bound.
    let rejection = records::charge(
        records::Usage {
            records: 2,
            bytes: 8,
        },
        None,
        4,
        RecordQuota {
            records: 2,
            bytes: 100,
        },
    )
    .unwrap_err();
    assert!(matches!(
        rejection,
        Rejection::IndexQuota {
            what: QuotaKind::Records,
            would_be: 3,
            quota: 2
        }
    ));
}

/// Writes what a writer added to `batch` (as the end of an apply batch does).
fn commit(db: &rocksdb::DB, batch: rocksdb::WriteBatch) {
    db.write(batch).expect("write batch");
}

#[tokio::test]
async fn presence_lists_each_session_and_host_expiry_removes_only_its_own() {
    use super::presence::{self, PresenceWriter};
    use super::Changes;
    use crate::command::{
        ExpireHost, PresenceAttach, PresenceDetach, PresenceEndpoints, PresenceSet, PresenceStatus,
    };
    let dir = TempDir::new().unwrap();
    let db = open(dir.path()).unwrap();
    let mut batch = rocksdb::WriteBatch::default();
    let mut writer = PresenceWriter::new(&db);
    let peer = [1; 32];
    let attach = |host, session| PresenceAttach {
        peer,
        host,
        session,
    };
    let set = |session| PresenceSet {
        peer,
        session,
        status: PresenceStatus::Busy,
        note: "in a call".into(),
        attributes: BTreeMap::from([("team".into(), "blue".into())]),
    };
    let presence = |response| match response {
        Response::Presence(entry) => entry,
        other => panic!("expected a presence, got {other:?}"),
    };
    let sessions = |entry: &crate::command::PresenceEntry| -> Vec<(u64, u64)> {
        entry.sessions.iter().map(|a| (a.host, a.session)).collect()
    };
    let attached = presence(writer.apply(&mut batch, &attach(7, 10), at(1)).unwrap());
    assert_eq!(attached.status, PresenceStatus::Online);
    assert_eq!(sessions(&attached), [(7, 10)]);
    assert_eq!(attached.sessions[0].attached_at_ms, 1_001);
    // A session that is not listed cannot change the presence; a listed one can.
    assert_eq!(
        writer.apply(&mut batch, &set(11), at(2)).unwrap(),
        Response::Rejected(Rejection::NotAttached)
    );
    let busy = presence(writer.apply(&mut batch, &set(10), at(3)).unwrap());
    assert_eq!(
        (busy.status, busy.note.as_str()),
        (PresenceStatus::Busy, "in a call")
    );
    let endpoints = PresenceEndpoints {
        peer,
        session: 10,
        candidates: vec!["host 10.0.0.1:5000".into()],
        nat_class: "open".into(),
    };
    let published = presence(writer.apply(&mut batch, &endpoints, at(4)).unwrap());
    assert_eq!(published.candidates, endpoints.candidates);
    assert_eq!(
        published.attributes["team"], "blue",
        "endpoints keep the profile"
    );
    // A second session (on host 8) is listed beside the first and keeps the busy status; the same attach
    // applied twice lists it once.
    let two = presence(writer.apply(&mut batch, &attach(8, 12), at(5)).unwrap());
    let two_again = presence(writer.apply(&mut batch, &attach(8, 12), at(5)).unwrap());
    assert_eq!(two.status, PresenceStatus::Busy);
    assert_eq!(sessions(&two), [(7, 10), (8, 12)]);
    assert_eq!(sessions(&two_again), [(7, 10), (8, 12)]);
    assert_eq!(two.hosts(), [8, 7], "the newest session's host first");
    // Either listed session may update it.
    presence(writer.apply(&mut batch, &set(12), at(6)).unwrap());
    // The first session's detach removes it alone: the peer stays online.
    let one = presence(
        writer
            .apply(&mut batch, &PresenceDetach { peer, session: 10 }, at(7))
            .unwrap(),
    );
    assert_eq!(
        (one.status, sessions(&one)),
        (PresenceStatus::Busy, vec![(8, 12)])
    );
    // Detaching it again changes nothing.
    let unchanged = presence(
        writer
            .apply(&mut batch, &PresenceDetach { peer, session: 10 }, at(8))
            .unwrap(),
    );
    assert_eq!(unchanged.changed_at_ms, one.changed_at_ms);
    let back = presence(writer.apply(&mut batch, &attach(7, 14), at(9)).unwrap());
    assert_eq!(sessions(&back), [(8, 12), (7, 14)]);
    assert_eq!(
        writer.take_changes().len(),
        8,
        "attach, set, endpoints, attach, attach (again), set, detach, attach"
    );
    commit(&db, batch);

    // A later batch: host 7 expires, which removes its session only (read back from the database); then host 8.
    let mut batch = rocksdb::WriteBatch::default();
    let mut writer = PresenceWriter::new(&db);
    assert_eq!(
        writer
            .apply(&mut batch, &ExpireHost { host: 7 }, at(10))
            .unwrap(),
        Response::Expired(1)
    );
    assert_eq!(
        writer
            .apply(&mut batch, &ExpireHost { host: 9 }, at(11))
            .unwrap(),
        Response::Expired(0)
    );
    assert_eq!(
        writer
            .apply(&mut batch, &ExpireHost { host: 8 }, at(12))
            .unwrap(),
        Response::Expired(1)
    );
    assert!(matches!(
        writer.take_changes().as_slice(),
        [
            crate::events::Change::Presence { entry: first, .. },
            crate::events::Change::Presence { entry: last, .. },
        ] if first.status == PresenceStatus::Busy && last.status == PresenceStatus::Offline
    ));
    commit(&db, batch);
    let stored = presence::get(&db, &peer).unwrap().unwrap();
    assert_eq!(
        (stored.status, stored.sessions.len(), stored.changed_at_ms),
        (PresenceStatus::Offline, 0, 1_012)
    );
    let team = Term {
        attribute: "team".into(),
        condition: Condition::Equals("blue".into()),
    };
    let (found, _) =
        presence::search(&db, std::slice::from_ref(&team), false, 10, usize::MAX).unwrap();
    assert_eq!(found.len(), 1, "the profile index follows the entry");
    let (online, _) = presence::search(&db, &[team], true, 10, usize::MAX).unwrap();
    assert!(online.is_empty());
}

/// Past the per-peer limit, the oldest session is pushed out and remembered as superseded (a bounded list), so
/// that its host ends it with that reason.
#[tokio::test]
async fn presence_past_the_session_limit_pushes_out_the_oldest() {
    use super::presence::PresenceWriter;
    use crate::command::PresenceAttach;
    use vesper_proto::validate::MAX_SESSIONS_PER_PEER;
    let dir = TempDir::new().unwrap();
    let db = open(dir.path()).unwrap();
    let mut batch = rocksdb::WriteBatch::default();
    let mut writer = PresenceWriter::new(&db);
    let peer = [2; 32];
    let mut last = None;
    let total = 3 * MAX_SESSIONS_PER_PEER as u64;
    for session in 1..=total {
        let op = PresenceAttach {
            peer,
            host: 1 + session % 3,
            session,
        };
        last = Some(writer.apply(&mut batch, &op, at(session)).unwrap());
        let Some(Response::Presence(entry)) = &last else {
            panic!("expected a presence, got {last:?}");
        };
        assert!(entry.sessions.len() <= MAX_SESSIONS_PER_PEER);
        assert!(entry.superseded.len() <= MAX_SESSIONS_PER_PEER);
    }
    let Some(Response::Presence(entry)) = last else {
        unreachable!()
    };
    let listed: Vec<u64> = entry.sessions.iter().map(|a| a.session).collect();
    let newest_first = total - MAX_SESSIONS_PER_PEER as u64 + 1;
    assert_eq!(listed, (newest_first..=total).collect::<Vec<_>>());
    // The most recently pushed out, oldest first.
    let expected: Vec<u64> = (newest_first - MAX_SESSIONS_PER_PEER as u64..newest_first).collect();
    assert_eq!(entry.superseded, expected);
}

/// A database of format 2 (one session per presence entry) opens as format 3 with each online entry's session
/// as the first of its list, and nothing else changed.
#[tokio::test]
async fn a_format_2_database_is_upgraded_when_it_opens() {
    use super::presence::EntryV2;
    use crate::command::PresenceStatus;
    let dir = TempDir::new().unwrap();
    {
        let db = open(dir.path()).unwrap();
        let meta = db.cf_handle(super::CF_RAFT).unwrap();
        db.put_cf(meta, b"format_version", 2u32.to_be_bytes())
            .unwrap();
        let presence = db.cf_handle(super::CF_PRESENCE).unwrap();
        for (key, status, host, session) in [
            ([3u8; 32], PresenceStatus::Away, 4, 99),
            ([4u8; 32], PresenceStatus::Offline, 0, 0),
        ] {
            let old = EntryV2 {
                status,
                note: "note".into(),
                host,
                session,
                candidates: vec!["host 10.0.0.2:1".into()],
                nat_class: "public".into(),
                changed_at_ms: 5,
                attributes: BTreeMap::from([("team".into(), "red".into())]),
            };
            db.put_cf(presence, key, postcard::to_stdvec(&old).unwrap())
                .unwrap();
        }
    }
    let db = open(dir.path()).unwrap();
    let meta = db.cf_handle(super::CF_RAFT).unwrap();
    assert_eq!(
        db.get_cf(meta, b"format_version").unwrap().unwrap(),
        super::FORMAT_VERSION.to_be_bytes()
    );
    let online = super::presence::get(&db, &[3; 32]).unwrap().unwrap();
    assert_eq!(online.status, PresenceStatus::Away);
    assert_eq!(
        online
            .sessions
            .iter()
            .map(|a| (a.host, a.session, a.attached_at_ms))
            .collect::<Vec<_>>(),
        [(4, 99, 5)]
    );
    assert_eq!(
        (
            online.note.as_str(),
            online.nat_class.as_str(),
            online.attributes["team"].as_str()
        ),
        ("note", "public", "red")
    );
    let offline = super::presence::get(&db, &[4; 32]).unwrap().unwrap();
    assert_eq!(offline.status, PresenceStatus::Offline);
    assert!(offline.sessions.is_empty());
    drop(db);
    // A format it does not know is refused, and left as it was.
    {
        let db =
            rocksdb::DB::open_cf(&rocksdb::Options::default(), dir.path(), super::ALL_CFS).unwrap();
        let meta = db.cf_handle(super::CF_RAFT).unwrap();
        db.put_cf(meta, b"format_version", 1u32.to_be_bytes())
            .unwrap();
    }
    assert!(matches!(
        open(dir.path()),
        Err(StoreError::Format { found: 1 })
    ));
}

/// A database of format 3 (mailbox items without a trace context) opens as format 4 with every item kept, and
/// a traced put keeps its context.
#[tokio::test]
async fn a_format_3_mailbox_is_upgraded_when_it_opens_and_traced_puts_keep_their_context() {
    use super::mailbox::{self, MailboxWriter};
    use crate::command::{MailboxPut, StoredMessage, TraceContext};
    #[derive(serde::Serialize)]
    struct ItemV3 {
        message: StoredMessage,
        expires_at_ms: u64,
    }
    let message = |id: &str| StoredMessage {
        id: id.into(),
        from: [6; 32],
        kind: "text".into(),
        payload: vec![1, 2, 3],
        sent_at_ms: 1,
    };
    let dir = TempDir::new().unwrap();
    let to = [5u8; 32];
    {
        let db = open(dir.path()).unwrap();
        let meta = db.cf_handle(super::CF_RAFT).unwrap();
        db.put_cf(meta, b"format_version", 3u32.to_be_bytes())
            .unwrap();
        let cf = db.cf_handle(super::CF_MAILBOX).unwrap();
        for (sequence, id) in [(7u64, "m1"), (9, "m2")] {
            let mut key = to.to_vec();
            key.extend_from_slice(&sequence.to_be_bytes());
            let old = ItemV3 {
                message: message(id),
                expires_at_ms: u64::MAX,
            };
            db.put_cf(cf, key, postcard::to_stdvec(&old).unwrap())
                .unwrap();
        }
    }
    let db = open(dir.path()).unwrap();
    let meta = db.cf_handle(super::CF_RAFT).unwrap();
    assert_eq!(
        db.get_cf(meta, b"format_version").unwrap().unwrap(),
        4u32.to_be_bytes()
    );
    let items = mailbox::items(&db, &to, 0).unwrap();
    assert_eq!(
        items
            .iter()
            .map(|(sequence, item)| (*sequence, item.message.id.as_str(), item.trace.is_none()))
            .collect::<Vec<_>>(),
        [(7, "m1", true), (9, "m2", true)]
    );
    assert_eq!(items[0].1.message, message("m1"));

    let context = TraceContext {
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        tracestate: String::new(),
    };
    let put = MailboxPut {
        to,
        message: message("m3"),
        expires_at_ms: u64::MAX,
        quota: 10,
    };
    let mut batch = rocksdb::WriteBatch::default();
    MailboxWriter::new(&db)
        .put(&mut batch, &put, at(12), Some(&context))
        .unwrap();
    commit(&db, batch);
    let items = mailbox::items(&db, &to, 0).unwrap();
    assert_eq!(items[2].0, 12);
    assert_eq!(items[2].1.trace.as_ref(), Some(&context));
}

#[tokio::test]
async fn mailbox_apply_keeps_the_quota_drops_retries_and_expired_messages_and_acks() {
    use super::mailbox::{self, MailboxWriter};
    use crate::command::{MailboxAck, MailboxPut, StoredMessage};
    let dir = TempDir::new().unwrap();
    let db = open(dir.path()).unwrap();
    let to = [5; 32];
    let put = |id: &str, expires_at_ms| MailboxPut {
        to,
        message: StoredMessage {
            id: id.into(),
            from: [6; 32],
            kind: "text".into(),
            payload: id.as_bytes().to_vec(),
            sent_at_ms: 1,
        },
        expires_at_ms,
        quota: 2,
    };
    let mut batch = rocksdb::WriteBatch::default();
    let mut writer = MailboxWriter::new(&db);
    assert_eq!(
        writer.apply(&mut batch, &put("m1", 5_000), at(5)).unwrap(),
        Response::Done
    );
    // A retry is not stored twice, and does not count against the quota.
    assert_eq!(
        writer.apply(&mut batch, &put("m1", 5_000), at(6)).unwrap(),
        Response::Done
    );
    assert_eq!(
        writer.apply(&mut batch, &put("m2", 1_500), at(7)).unwrap(),
        Response::Done
    );
    assert_eq!(
        writer.apply(&mut batch, &put("m3", 5_000), at(8)).unwrap(),
        Response::Rejected(Rejection::MailboxFull { quota: 2 })
    );
    commit(&db, batch);
    let sequences = |now_ms| -> Vec<u64> {
        mailbox::items(&db, &to, now_ms)
            .unwrap()
            .into_iter()
            .map(|(sequence, _)| sequence)
            .collect()
    };
    assert_eq!(sequences(0), [5, 7], "the sequence is the log index");

    // Same batch: m1 acknowledged, then a put after m2 expired finds room and drops m2.
    let mut batch = rocksdb::WriteBatch::default();
    let mut writer = MailboxWriter::new(&db);
    let ack = MailboxAck {
        to,
        sequences: vec![5],
    };
    assert_eq!(
        writer.apply(&mut batch, &ack, at(9)).unwrap(),
        Response::Done
    );
    let late = Applied {
        index: 10,
        at_ms: 1_600,
    };
    assert_eq!(
        writer.apply(&mut batch, &put("m3", 5_000), late).unwrap(),
        Response::Expired(1),
        "the put says it removed m2, past its time to live"
    );
    commit(&db, batch);
    assert_eq!(
        sequences(0),
        [10],
        "m1 acknowledged, m2 expired and dropped"
    );
}

#[tokio::test]
async fn conference_apply_checks_roles_and_numbers_chat_lines_once() {
    use super::conference::{self, ConferenceWriter};
    use super::Changes;
    use crate::command::{
        ConferenceAnswer, ConferenceChat, ConferenceCreate, ConferenceInvite, ConferenceStart,
        Invitation,
    };
    use crate::events::Change;
    let dir = TempDir::new().unwrap();
    let db = open(dir.path()).unwrap();
    let (owner, guest, decliner, stranger) = ([1; 32], [2; 32], [3; 32], [4; 32]);
    let create = ConferenceCreate {
        owner,
        id: "c".into(),
        title: "Title".into(),
        description: "About".into(),
        start_at_ms: 9_000,
    };
    let invite = |by| ConferenceInvite {
        owner: by,
        id: "c".into(),
        invitees: vec![guest, decliner],
    };
    let answer = |peer, accept| ConferenceAnswer {
        peer,
        id: "c".into(),
        accept,
    };
    let chat = |from, message_id: &str| ConferenceChat {
        from,
        id: "c".into(),
        message_id: message_id.into(),
        text: format!("line {message_id}"),
    };
    let sequence = |response| match response {
        Response::Chat(chat) => chat.sequence,
        other => panic!("expected a chat line, got {other:?}"),
    };
    let mut batch = rocksdb::WriteBatch::default();
    let mut writer = ConferenceWriter::new(&db);
    let mut apply_at = 0;
    let mut next = || {
        apply_at += 1;
        at(apply_at)
    };
    assert!(matches!(
        writer.apply(&mut batch, &create, next()).unwrap(),
        Response::Conference(entry) if entry.created_at_ms == 1_001 && !entry.started
    ));
    let rejected = |response: Response| match response {
        Response::Rejected(rejection) => rejection,
        other => panic!("expected a rejection, got {other:?}"),
    };
    assert_eq!(
        rejected(writer.apply(&mut batch, &create, next()).unwrap()),
        Rejection::ConferenceExists
    );
    assert_eq!(
        rejected(writer.apply(&mut batch, &invite(guest), next()).unwrap()),
        Rejection::NotConferenceOwner
    );
    writer.apply(&mut batch, &invite(owner), next()).unwrap();
    assert_eq!(
        rejected(
            writer
                .apply(&mut batch, &answer(stranger, true), next())
                .unwrap()
        ),
        Rejection::NotInvited
    );
    writer
        .apply(&mut batch, &answer(guest, true), next())
        .unwrap();
    writer
        .apply(&mut batch, &answer(decliner, false), next())
        .unwrap();
    assert_eq!(
        rejected(
            writer
                .apply(&mut batch, &chat(decliner, "x"), next())
                .unwrap()
        ),
        Rejection::NotParticipant
    );
    assert_eq!(
        sequence(
            writer
                .apply(&mut batch, &chat(guest, "m1"), next())
                .unwrap()
        ),
        1
    );
    // A retried post in the same batch answers with the line already numbered.
    assert_eq!(
        sequence(
            writer
                .apply(&mut batch, &chat(guest, "m1"), next())
                .unwrap()
        ),
        1
    );
    assert_eq!(
        sequence(
            writer
                .apply(&mut batch, &chat(owner, "m2"), next())
                .unwrap()
        ),
        2
    );
    let start = ConferenceStart { id: "c".into() };
    assert!(matches!(
        writer.apply(&mut batch, &start, next()).unwrap(),
        Response::Conference(entry) if entry.started
    ));
    assert_eq!(
        writer.apply(&mut batch, &start, next()).unwrap(),
        Response::Done
    );
    let unknown = ConferenceStart { id: "nope".into() };
    assert_eq!(
        rejected(writer.apply(&mut batch, &unknown, next()).unwrap()),
        Rejection::UnknownConference
    );
    let kinds: Vec<&str> = writer
        .take_changes()
        .iter()
        .map(|change| match change {
            Change::Conference { .. } => "conference",
            Change::Chat { .. } => "chat",
            other => panic!("unexpected change {other:?}"),
        })
        .collect();
    // Create, invite, two answers, two new lines (not the retry), the start.
    assert_eq!(
        kinds,
        [
            "conference",
            "conference",
            "conference",
            "conference",
            "chat",
            "chat",
            "conference"
        ]
    );
    commit(&db, batch);

    let stored = conference::get(&db, "c").unwrap().unwrap();
    assert_eq!(stored.next_sequence, 3);
    assert_eq!(stored.invitees[&guest], Invitation::Accepted);
    assert_eq!(stored.invitees[&decliner], Invitation::Declined);
    // A retry in a later batch finds the stored line.
    let mut batch = rocksdb::WriteBatch::default();
    let mut writer = ConferenceWriter::new(&db);
    assert_eq!(
        sequence(
            writer
                .apply(&mut batch, &chat(guest, "m1"), at(20))
                .unwrap()
        ),
        1
    );
    assert!(writer.take_changes().is_empty());
}

#[tokio::test]
async fn node_apply_allocates_ids_and_keeps_loads_and_revocations_beside_the_nodes() {
    use super::nodes::{self, NodeWriter};
    use crate::command::{RelayLoad, RevokeCertificate};
    let dir = TempDir::new().unwrap();
    let db = open(dir.path()).unwrap();
    let node = |name: &str| NodeInfo {
        peer_id: name.into(),
        cluster_addr: format!("{name}:1"),
        ..NodeInfo::default()
    };
    let mut batch = rocksdb::WriteBatch::default();
    let mut writer = NodeWriter::new(&db).unwrap();
    // A membership names node 4: it is in the table and ids up to 4 are taken.
    writer.add_members([(&4, &node("first"))]).unwrap();
    let register = RegisterNode {
        node: node("second"),
    };
    assert_eq!(
        writer.apply(&mut batch, &register, at(2)).unwrap(),
        Response::NodeId(5)
    );
    assert_eq!(
        writer.apply(&mut batch, &register, at(3)).unwrap(),
        Response::NodeId(5),
        "a retried join keeps its id"
    );
    assert_eq!(
        writer
            .apply(&mut batch, &TombstoneNode { node_id: 9 }, at(4))
            .unwrap(),
        Response::Rejected(Rejection::UnknownNode(9))
    );
    let load = RelayLoad {
        node_id: 5,
        active: 3,
        capacity: 10,
    };
    assert_eq!(
        writer.apply(&mut batch, &load, at(5)).unwrap(),
        Response::Done
    );
    let revoke = RevokeCertificate {
        fingerprint: [8; 32],
    };
    assert_eq!(
        writer.apply(&mut batch, &revoke, at(6)).unwrap(),
        Response::Done
    );
    writer.finish(&mut batch).unwrap();
    commit(&db, batch);

    let table = nodes::read_nodes(&db).unwrap();
    assert_eq!(table.keys().copied().collect::<Vec<_>>(), [4, 5]);
    assert_eq!(table[&5].info.peer_id, "second");
    let loads = nodes::read_relay_loads(&db).unwrap();
    assert_eq!(
        loads.get(&5),
        Some(&nodes::RelayLoad {
            active: 3,
            capacity: 10,
            at_ms: 1_005
        })
    );
    assert!(nodes::is_revoked(&db, &[8; 32]).unwrap());
    assert!(!nodes::is_revoked(&db, &[9; 32]).unwrap());
    // The next batch allocates after what this one took.
    let mut batch = rocksdb::WriteBatch::default();
    let mut writer = NodeWriter::new(&db).unwrap();
    let third = RegisterNode {
        node: node("third"),
    };
    assert_eq!(
        writer.apply(&mut batch, &third, at(7)).unwrap(),
        Response::NodeId(6)
    );
}

#[tokio::test]
async fn apply_publishes_one_event_per_change_in_log_order() {
    use crate::command::{ConferenceChat, ConferenceCreate, PresenceAttach};
    use crate::events::{Change, EventLog};
    let dir = TempDir::new().unwrap();
    let db = open(dir.path()).unwrap();
    let events = EventLog::default();
    let mut state_machine = StateMachine::open_with_events(db, events.clone()).unwrap();
    let owner = [1; 32];
    apply_all(
        &mut state_machine,
        vec![
            entry(1, put(1, "a", &[], None)),
            // Refused (another owner): no event.
            entry(2, put(2, "a", &[], None)),
            entry(
                3,
                DeleteRecord {
                    owner: [1; 32],
                    namespace: "ns".into(),
                    key: "a".into(),
                    expected_version: None,
                }
                .into(),
            ),
            // Deleting what is not there: no event.
            entry(
                4,
                DeleteRecord {
                    owner: [1; 32],
                    namespace: "ns".into(),
                    key: "a".into(),
                    expected_version: None,
                }
                .into(),
            ),
            entry(
                5,
                SetNamespaceAcl {
                    namespace: "ns".into(),
                    acl: None,
                }
                .into(),
            ),
            entry(
                6,
                ConferenceCreate {
                    owner,
                    id: "c".into(),
                    title: String::new(),
                    description: String::new(),
                    start_at_ms: 0,
                }
                .into(),
            ),
            entry(
                7,
                ConferenceChat {
                    from: owner,
                    id: "c".into(),
                    message_id: "m".into(),
                    text: "hi".into(),
                }
                .into(),
            ),
            entry(
                8,
                PresenceAttach {
                    peer: owner,
                    host: 1,
                    session: 3,
                }
                .into(),
            ),
            entry(
                9,
                RegisterNode {
                    node: NodeInfo::default(),
                }
                .into(),
            ),
        ],
    )
    .await;
    let published: Vec<(u64, &str)> = events
        .since(0)
        .unwrap()
        .iter()
        .map(|event| {
            let kind = match &event.change {
                Change::Record {
                    record: Some(_), ..
                } => "put",
                Change::Record { record: None, .. } => "delete",
                Change::Acl { .. } => "acl",
                Change::Conference { .. } => "conference",
                Change::Chat { .. } => "chat",
                Change::Presence { .. } => "presence",
            };
            (event.index, kind)
        })
        .collect();
    assert_eq!(
        published,
        [
            (1, "put"),
            (3, "delete"),
            (5, "acl"),
            (6, "conference"),
            (7, "chat"),
            (8, "presence")
        ]
    );
}

#[tokio::test]
async fn load_reports_are_read_back_and_acls_shaped_like_them_are_not_taken_for_them() {
    use super::nodes;
    use crate::command::Access::Anyone;
    use crate::command::{LeafLoad, RelayLoad};
    let dir = TempDir::new().unwrap();
    let db = open(dir.path()).unwrap();
    let mut state_machine = StateMachine::open(db.clone()).unwrap();
    state_machine
        .apply(stream::iter(
            vec![
                // "acl/abcdL" and "acl/abcdS" are 9 bytes ending in a load key's suffix.
                entry(1, acl("abcdL", Anyone, Anyone, &[])),
                entry(2, acl("abcdS", Anyone, Anyone, &[])),
                entry(
                    3,
                    RelayLoad {
                        node_id: 2,
                        active: 1,
                        capacity: 9,
                    }
                    .into(),
                ),
                entry(
                    4,
                    LeafLoad {
                        node_id: 2,
                        sessions: 40,
                    }
                    .into(),
                ),
                entry(
                    5,
                    LeafLoad {
                        node_id: 3,
                        sessions: 7,
                    }
                    .into(),
                ),
                entry(
                    6,
                    LeafLoad {
                        node_id: 2,
                        sessions: 41,
                    }
                    .into(),
                ),
            ]
            .into_iter()
            .map(|entry| Ok::<_, std::io::Error>((entry, None))),
        ))
        .await
        .expect("apply");
    let leaves = nodes::read_leaf_loads(&db).unwrap();
    let sessions: Vec<(u64, u32)> = leaves.iter().map(|(id, l)| (*id, l.sessions)).collect();
    assert_eq!(sessions, [(2, 41), (3, 7)], "the last report of each node");
    let relays = nodes::read_relay_loads(&db).unwrap();
    assert_eq!(relays.keys().copied().collect::<Vec<_>>(), [2]);
    assert!(
        nodes::read_nodes(&db).unwrap().is_empty(),
        "loads and ACLs are not nodes"
    );
}
