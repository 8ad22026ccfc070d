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
use super::{open, LogStore, StateMachine};
use crate::command::{Command, NodeInfo, Op, QuotaKind, RecordQuota, Rejection, Response};
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
    Op::PutRecord {
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
                Op::DeleteRecord {
                    owner: [2; 32],
                    namespace: "ns".into(),
                    key: "c".into(),
                    expected_version: None,
                },
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
            if let Op::PutRecord { value, .. } = &mut op {
                *value = vec![7; 1000];
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
    let first = writer
        .put(
            &mut batch,
            [1; 32],
            "ns",
            "k",
            BTreeMap::new(),
            vec![],
            Some(0),
            AMPLE,
            5,
        )
        .unwrap();
    assert!(matches!(first, Response::Record(ref record) if record.version == 1));
    let again = writer
        .put(
            &mut batch,
            [1; 32],
            "ns",
            "k",
            BTreeMap::new(),
            vec![],
            Some(0),
            AMPLE,
            6,
        )
        .unwrap();
    assert_eq!(
        again,
        Response::Rejected(Rejection::VersionMismatch {
            expected: 0,
            current: 1
        })
    );
    let foreign = writer.delete(&mut batch, [9; 32], "ns", "k", None).unwrap();
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
                Op::RegisterNode {
                    node: node("second"),
                },
            ),
            entry(3, Op::TombstoneNode { node_id: 2 }),
            entry(
                4,
                Op::RegisterNode {
                    node: node("second"),
                },
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
    Op::SetNamespaceAcl {
        namespace: namespace.into(),
        acl: Some(crate::command::NamespaceAcl {
            write,
            read,
            members: members.iter().map(|byte| [*byte; 32]).collect(),
        }),
    }
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
                    Op::SetNamespaceAcl {
                        namespace: "ns".into(),
                        acl: None,
                    },
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
                    Op::DeleteRecord {
                        owner: [1; 32],
                        namespace: "ns".into(),
                        key: "b".into(),
                        expected_version: None,
                    },
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
