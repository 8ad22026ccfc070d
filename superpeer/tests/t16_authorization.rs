//! Authorisation beyond record ownership (t10 covers foreign puts and deletes, t90 foreign conference answers):
//! replayed presence updates, namespace ACLs, and index and mailbox quotas. Every refusal is checked for its gRPC code AND for the Raft log
//! not moving, on a two-node cluster where the rules are set through one node and enforced by the other.
//!
//! The nodes run inside the test process (`common::launcher`: `vesper_superpeer::spawn` on real sockets, TLS and
//! RocksDB); the tests that kill processes stay in `tests/tests/`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use tonic::Code;
use vesper_leafpeer::{Consistency, WatchItem, WatchSpec};
use vesper_proto::v1::search_term;
use vesper_proto::v1::{
    DeleteRecordRequest, GetRecordRequest, ListRecordsRequest, PresenceStatus,
    PublishEndpointsRequest, PutRecordRequest, SearchRecordsRequest, SearchTerm,
    SendMessageRequest, SetPresenceRequest,
};
use vesper_proto::Keypair;
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::raw::{self, RawSession, Signing};

async fn session(cluster: &Cluster, node: usize, keypair: &Keypair) -> anyhow::Result<RawSession> {
    let address = cluster.nodes[node].endpoints().leaf.to_string();
    let channel = raw::channel(&address, &cluster.pki.ca_pem()).await?;
    Ok(raw::open(channel, keypair, Signing::Valid).await?)
}

fn presence(sequence: u64, note: &str) -> SetPresenceRequest {
    SetPresenceRequest {
        status: PresenceStatus::Away as i32,
        note: note.into(),
        attributes: HashMap::new(),
        sequence,
    }
}

fn put(
    namespace: &str,
    key: &str,
    value: &[u8],
    expected_version: Option<u64>,
) -> PutRecordRequest {
    PutRecordRequest {
        namespace: namespace.into(),
        key: key.into(),
        attributes: HashMap::from([("kind".to_string(), "doc".to_string())]),
        value: value.to_vec(),
        expected_version,
    }
}

/// Runs `vesperctl` through node `node` and returns its stdout; fails with its output unless it exits 0.
fn vesperctl(cluster: &Cluster, node: usize, args: &[&str]) -> anyhow::Result<String> {
    let output = cluster.vesperctl(node, args)?;
    anyhow::ensure!(output.status.success(), "vesperctl {args:?}: {output:?}");
    Ok(String::from_utf8(output.stdout)?)
}

/// Sets the ACL of namespace "team" through node 1 with `vesperctl namespace set` and waits until node 0 (where
/// the leaves are) has applied it. Returns the log index it was committed at.
async fn set_team_acl(
    cluster: &Cluster,
    write: &str,
    read: &str,
    members: &[&str],
) -> anyhow::Result<u64> {
    let mut args = vec![
        "namespace",
        "set",
        "team",
        "--write",
        write,
        "--read",
        read,
        "--json",
    ];
    for member in members {
        args.extend(["--member", member]);
    }
    let set: serde_json::Value = serde_json::from_str(&vesperctl(cluster, 1, &args)?)?;
    let log_index = set["log_index"].as_u64().expect("log_index");
    cluster.wait_applied(0, log_index).await?;
    Ok(log_index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t16_replayed_presence_updates_are_refused_and_commit_nothing() -> anyhow::Result<()> {
    let cluster = Cluster::start_in_process(common::launcher(), 2, NodeOptions::default()).await?;
    let alice = session(&cluster, 0, &Keypair::generate()).await?;
    let mut client = alice.client.clone();
    let accepted = client
        .set_presence(alice.request(presence(5, "first")))
        .await?
        .into_inner();
    assert_eq!(accepted.presence.expect("presence").note, "first");
    let quiet = cluster.wait_quiet(0).await?;

    let cases = [
        (
            "the same update again",
            presence(5, "first"),
            Code::FailedPrecondition,
            "not above 5",
        ),
        (
            "an older update",
            presence(4, "older"),
            Code::FailedPrecondition,
            "replayed",
        ),
        (
            "no sequence",
            presence(0, "unsequenced"),
            Code::InvalidArgument,
            "sequence is missing",
        ),
    ];
    for (what, request, code, message) in cases {
        let status = client
            .set_presence(alice.request(request))
            .await
            .expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().contains(message), "{what}: {status:?}");
    }
    assert_eq!(
        cluster.status_of(0).await?.applied_index,
        quiet,
        "a refused presence update moved the log"
    );

    // Endpoints have their own sequence: 1 is fresh there, and a replay of it is refused in turn.
    let endpoints = PublishEndpointsRequest {
        candidates: vec!["192.0.2.7:4000".into()],
        nat_class: "public".into(),
        sequence: 1,
    };
    client
        .publish_endpoints(alice.request(endpoints.clone()))
        .await?;
    let status = client
        .publish_endpoints(alice.request(endpoints))
        .await
        .expect_err("replayed endpoints");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // The next number goes through, and the stored presence is the one it set, not a replayed one.
    let accepted = client
        .set_presence(alice.request(presence(6, "second")))
        .await?
        .into_inner()
        .presence
        .expect("presence");
    assert_eq!(accepted.note, "second");
    assert_eq!(accepted.candidates, ["192.0.2.7:4000"]);

    // A new session starts a new count, and the library numbers its updates by itself.
    let leaf = cluster.leaf(1).await?;
    for note in ["one", "two", "three"] {
        let stored = leaf
            .set_presence(vesper_leafpeer::PresenceStatus::Busy, note, HashMap::new())
            .await?;
        assert_eq!(stored.note, note);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t16_namespace_acls_are_enforced_before_raft_on_every_node() -> anyhow::Result<()> {
    let cluster = Cluster::start_in_process(common::launcher(), 2, NodeOptions::default()).await?;
    let (owner_key, member_key, outsider_key) = (
        Keypair::generate(),
        Keypair::generate(),
        Keypair::generate(),
    );
    let (owner_id, member_id) = (
        owner_key.peer_id().to_string(),
        member_key.peer_id().to_string(),
    );
    let owner = session(&cluster, 0, &owner_key).await?;
    let outsider = session(&cluster, 0, &outsider_key).await?;
    let member = cluster.leaf_with(0, member_key).await?;

    // Usage errors name the problem and commit nothing.
    for (args, message) in [
        (
            vec![
                "namespace",
                "set",
                "team",
                "--write",
                "members",
                "--read",
                "anyone",
            ],
            "needs at least one --member",
        ),
        (
            vec![
                "namespace",
                "set",
                "team",
                "--write",
                "members",
                "--read",
                "members",
                "--member",
                "bob",
            ],
            "--member \"bob\"",
        ),
        (
            vec![
                "namespace",
                "set",
                "Team!",
                "--write",
                "anyone",
                "--read",
                "anyone",
            ],
            "namespace \"Team!\"",
        ),
    ] {
        let output = cluster.vesperctl(1, &args)?;
        assert_eq!(output.status.code(), Some(64), "{args:?}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }

    // Group write, members-only read, set through node 1; the leaves are on node 0.
    set_team_acl(&cluster, "members", "members", &[&owner_id, &member_id]).await?;
    let listed: serde_json::Value =
        serde_json::from_str(&vesperctl(&cluster, 0, &["namespace", "list", "--json"])?)?;
    assert_eq!(listed["acls"][0]["namespace"], "team", "{listed}");
    assert_eq!(listed["acls"][0]["write"], "members", "{listed}");
    assert_eq!(
        listed["acls"][0]["members"].as_array().map(Vec::len),
        Some(2)
    );

    // Members write; a member changes the owner's record (group write), which keeps its owner.
    let mut owner_client = owner.client.clone();
    owner_client
        .put_record(owner.request(put("team", "plan", b"v1", Some(0))))
        .await?;
    let changed = member
        .put("team", "plan", HashMap::new(), b"v2".to_vec(), Some(1))
        .await?;
    assert_eq!(
        (changed.version, changed.owner.as_str()),
        (2, owner_id.as_str())
    );
    let quiet = cluster.wait_quiet(0).await?;

    // The outsider can neither write nor read, in any form; nothing reaches the log.
    let mut outsider_client = outsider.client.clone();
    let refusals: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "put a new key",
            outsider_client
                .put_record(outsider.request(put("team", "mine", b"x", None)))
                .await
                .map(drop),
        ),
        (
            "overwrite",
            outsider_client
                .put_record(outsider.request(put("team", "plan", b"x", None)))
                .await
                .map(drop),
        ),
        (
            "delete",
            outsider_client
                .delete_record(outsider.request(DeleteRecordRequest {
                    namespace: "team".into(),
                    key: "plan".into(),
                    expected_version: None,
                }))
                .await
                .map(drop),
        ),
        (
            "get",
            outsider_client
                .get_record(outsider.request(GetRecordRequest {
                    namespace: "team".into(),
                    key: "plan".into(),
                    consistency: 0,
                }))
                .await
                .map(drop),
        ),
        (
            "list",
            outsider_client
                .list_records(outsider.request(ListRecordsRequest {
                    namespace: "team".into(),
                    ..Default::default()
                }))
                .await
                .map(drop),
        ),
        (
            "search",
            outsider_client
                .search_records(outsider.request(SearchRecordsRequest {
                    namespace: "team".into(),
                    terms: vec![SearchTerm {
                        attribute: "kind".into(),
                        condition: Some(search_term::Condition::Equals("doc".into())),
                    }],
                    ..Default::default()
                }))
                .await
                .map(drop),
        ),
    ];
    for (what, result) in refusals {
        let status = result.expect_err(what);
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
        assert!(
            status.message().contains("namespace team"),
            "{what}: {status:?}"
        );
    }
    assert_eq!(
        cluster.status_of(0).await?.applied_index,
        quiet,
        "a refused write moved the log"
    );
    let stored = member
        .get("team", "plan", Consistency::Linearizable)
        .await?;
    assert_eq!(stored.map(|record| record.value), Some(b"v2".to_vec()));

    // A member's watch runs until the member is dropped from the ACL, then ends with the reason.
    let mut watch = member
        .watch(WatchSpec {
            namespace: "team".into(),
            ..Default::default()
        })
        .await?;
    let first = tokio::time::timeout(Duration::from_secs(10), watch.recv())
        .await?
        .expect("watch open");
    assert!(matches!(first, WatchItem::Reset { .. }), "{first:?}");
    // Owner-write / public-read: the former member still reads (its watch goes on), but no longer writes.
    let log_index = set_team_acl(&cluster, "members", "anyone", &[&owner_id]).await?;
    let status = member
        .put("team", "plan", HashMap::new(), b"v3".to_vec(), None)
        .await
        .expect_err("a former member wrote");
    assert_eq!(status.code(), Some(Code::PermissionDenied), "{status}");
    owner_client
        .put_record(owner.request(put("team", "plan", b"v3", Some(2))))
        .await?;
    let seen = loop {
        match tokio::time::timeout(Duration::from_secs(10), watch.recv())
            .await?
            .expect("watch open")
        {
            // The current state the watch began with comes first, at the index it started from.
            WatchItem::Event(event) if event.applied_index <= log_index => continue,
            WatchItem::Event(event) => break event,
            other => panic!("expected the owner's change, got {other:?}"),
        }
    };
    let value = match &seen.change {
        Some(vesper_proto::v1::watch_event::Change::Record(change)) => {
            change.record.as_ref().map(|record| record.value.clone())
        }
        _ => None,
    };
    assert_eq!(value, Some(b"v3".to_vec()), "{seen:?}");

    // Members-only read without the member: its watch ends, with the reason, and nothing after it arrives.
    set_team_acl(&cluster, "members", "members", &[&owner_id]).await?;
    let refused = tokio::time::timeout(Duration::from_secs(10), watch.recv())
        .await?
        .expect("watch open");
    let WatchItem::Refused(reason) = refused else {
        panic!("expected the watch to be refused, got {refused:?}");
    };
    assert!(reason.contains("namespace team"), "{reason}");
    let status = member
        .get("team", "plan", Consistency::Linearizable)
        .await
        .expect_err("a former member read");
    assert_eq!(status.code(), Some(Code::PermissionDenied), "{status}");

    // Cleared: open again, the outsider writes.
    vesperctl(&cluster, 1, &["namespace", "clear", "team"])?;
    leafpeer_eventually_writes(&cluster, &outsider).await?;
    Ok(())
}

/// The outsider's put succeeds once node 0 has applied the clearing (vesperctl returns once it is committed).
async fn leafpeer_eventually_writes(
    cluster: &Cluster,
    outsider: &RawSession,
) -> anyhow::Result<()> {
    let leader_index = cluster.status_of(1).await?.applied_index;
    cluster.wait_applied(0, leader_index).await?;
    outsider
        .client
        .clone()
        .put_record(outsider.request(put("team", "mine", b"x", None)))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t16_index_and_mailbox_quotas_refuse_before_raft() -> anyhow::Result<()> {
    let options = NodeOptions {
        extra_args: [
            "--max-records-per-peer",
            "3",
            "--max-record-bytes-per-peer",
            "2048",
        ]
        .into_iter()
        .chain(["--mailbox-quota", "2"])
        .map(String::from)
        .collect(),
        ..Default::default()
    };
    let cluster = Cluster::start_in_process(common::launcher(), 2, options).await?;
    let alice = session(&cluster, 0, &Keypair::generate()).await?;
    let mut client = alice.client.clone();
    for key in ["a", "b", "c"] {
        client
            .put_record(alice.request(put("quota", key, b"small", None)))
            .await?;
    }
    let quiet = cluster.wait_quiet(0).await?;

    // A fourth record, and a record grown past 2048 bytes: refused, and the log does not move.
    let cases = [
        (
            "a fourth record",
            put("quota", "d", b"small", None),
            "records owned would be 4, the quota is 3",
        ),
        (
            "a record grown past the byte quota",
            put("quota", "a", &[b'x'; 2100], None),
            "bytes owned would be",
        ),
    ];
    for (what, request, message) in cases {
        let status = client
            .put_record(alice.request(request))
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::ResourceExhausted, "{what}: {status:?}");
        assert!(status.message().contains(message), "{what}: {status:?}");
    }
    assert_eq!(
        cluster.status_of(0).await?.applied_index,
        quiet,
        "a refused put moved the log"
    );
    let a = alice.record("quota", "a").await?.expect("a");
    assert_eq!((a.version, a.value.as_slice()), (1, b"small".as_slice()));

    // Others are not held back by alice's quota; alice may still replace, and a delete makes room.
    let bob = cluster.leaf(1).await?;
    bob.put("quota", "d", HashMap::new(), b"bob's".to_vec(), None)
        .await?;
    client
        .put_record(alice.request(put("quota", "a", b"replaced", None)))
        .await?;
    client
        .delete_record(alice.request(DeleteRecordRequest {
            namespace: "quota".into(),
            key: "b".into(),
            expected_version: None,
        }))
        .await?;
    client
        .put_record(alice.request(put("quota", "e", b"small", None)))
        .await?;

    // The mailbox of an offline peer takes two messages; the third is refused before Raft, a retry of one
    // already queued is answered as queued, and the refusal keeps what was queued.
    let offline = Keypair::generate();
    let message = |id: &str| SendMessageRequest {
        to: offline.peer_id().to_string(),
        id: id.into(),
        kind: "note".into(),
        payload: id.as_bytes().to_vec(),
        ..Default::default()
    };
    for id in ["m1", "m2"] {
        let sent = client
            .send_message(alice.request(message(id)))
            .await?
            .into_inner();
        assert!(sent.queued, "{id}: {sent:?}");
    }
    let quiet = cluster.wait_quiet(0).await?;
    let status = client
        .send_message(alice.request(message("m3")))
        .await
        .expect_err("a third message");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("mailbox is full (2 messages)"),
        "{status:?}"
    );
    let retry = client
        .send_message(alice.request(message("m1")))
        .await?
        .into_inner();
    assert!(retry.queued, "{retry:?}");
    assert_eq!(
        cluster.status_of(0).await?.applied_index,
        quiet,
        "a refused or retried message moved the log"
    );
    let recipient = cluster.leaf_with(1, offline).await?;
    let mut inbox = recipient.messages().expect("first call");
    for id in ["m1", "m2"] {
        let received = tokio::time::timeout(Duration::from_secs(20), inbox.recv())
            .await?
            .expect("inbox open");
        assert_eq!(received.id, id);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t16_size_limits_follow_the_configuration_and_answers_stay_bounded() -> anyhow::Result<()> {
    // Out-of-range sizes stop the super peer at start, naming the setting and its range.
    let refused = std::process::Command::new(vesper_tests::binary("superpeer"))
        .args(["--max-value-bytes", "2000000", "--max-attributes", "0"])
        .output()?;
    assert_eq!(refused.status.code(), Some(64), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    for problem in [
        "limits.value_bytes is 2000000; it must be 1 to 1048576",
        "limits.attributes is 0; it must be 1 to 256",
    ] {
        assert!(stderr.contains(problem), "{stderr}");
    }

    let options = NodeOptions {
        extra_args: [
            "--max-value-bytes",
            "1000",
            "--max-attributes",
            "2",
            "--max-attribute-value-bytes",
            "10",
            "--max-message-bytes",
            "500",
        ]
        .into_iter()
        .map(String::from)
        .collect(),
        ..Default::default()
    };
    let cluster = Cluster::start_in_process(common::launcher(), 1, options).await?;
    let alice = session(&cluster, 0, &Keypair::generate()).await?;
    let mut client = alice.client.clone();
    let with = |value: usize, attributes: &[(&str, usize)]| PutRecordRequest {
        namespace: "sizes".into(),
        key: "k".into(),
        attributes: attributes
            .iter()
            .map(|(name, len)| (name.to_string(), "v".repeat(*len)))
            .collect(),
        value: vec![1; value],
        expected_version: None,
    };
    // Exactly at every limit: accepted.
    client
        .put_record(alice.request(with(1000, &[("a", 10), ("b", 10)])))
        .await?;
    let quiet = cluster.wait_quiet(0).await?;

    let cases = [
        (
            "a value one byte over",
            with(1001, &[]),
            Code::ResourceExhausted,
            "value is 1001 bytes, the limit is 1000",
        ),
        (
            "a third attribute",
            with(1, &[("a", 1), ("b", 1), ("c", 1)]),
            Code::ResourceExhausted,
            "3 attributes, the limit is 2",
        ),
        (
            "an attribute value one byte over",
            with(1, &[("a", 11)]),
            Code::ResourceExhausted,
            "attribute value is 11 bytes, the limit is 10",
        ),
        // Larger than any request these limits allow: refused from its length prefix, before it is read.
        (
            "a request past the Leaf port's message limit",
            with(400 << 10, &[]),
            Code::OutOfRange,
            "message length too large",
        ),
    ];
    for (what, request, code, message) in cases {
        let status = client
            .put_record(alice.request(request))
            .await
            .expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().contains(message), "{what}: {status:?}");
    }
    let mut profile = presence(1, "busy");
    profile.attributes = (0..3).map(|i| (format!("p{i}"), "v".into())).collect();
    let status = client
        .set_presence(alice.request(profile))
        .await
        .expect_err("a profile with a third attribute");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let send = |payload: usize| SendMessageRequest {
        to: Keypair::generate().peer_id().to_string(),
        id: format!("m{payload}"),
        kind: "note".into(),
        payload: vec![2; payload],
        ..Default::default()
    };
    let status = client
        .send_message(alice.request(send(501)))
        .await
        .expect_err("a payload one byte over");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("payload is 501 bytes, the limit is 500"),
        "{status:?}"
    );
    assert_eq!(
        cluster.status_of(0).await?.applied_index,
        quiet,
        "a refused request moved the log"
    );
    let stored = alice
        .record("sizes", "k")
        .await?
        .expect("the record at the limits");
    assert_eq!((stored.version, stored.value.len()), (1, 1000));
    // The limits leave the rest working: a payload at the limit is queued for the offline recipient.
    let queued = client
        .send_message(alice.request(send(500)))
        .await?
        .into_inner();
    assert!(queued.queued, "{queued:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t16_pages_of_large_records_stay_within_the_answer_limit() -> anyhow::Result<()> {
    // 100 records at the default value limit (64 KiB) are 6.4 MiB: more than one answer may carry. Pages stop
    // at 4 MiB of records and the library pages through all of them.
    let cluster = Cluster::start_in_process(common::launcher(), 1, NodeOptions::default()).await?;
    let leaf = cluster.leaf(0).await?;
    let value = vec![9u8; 64 << 10];
    for index in 0..100 {
        leaf.put(
            "big",
            &format!("r{index:03}"),
            HashMap::from([("kind".to_string(), "big".to_string())]),
            value.clone(),
            None,
        )
        .await?;
    }
    let mut keys = Vec::new();
    let mut pages = 0;
    let mut token = None;
    loop {
        let page = leaf
            .list("big", "", 1000, token, Consistency::Linearizable)
            .await?;
        pages += 1;
        assert!(
            page.records.len() * value.len() <= vesper_proto::validate::MAX_PAGE_BYTES,
            "page {pages} holds {} records",
            page.records.len()
        );
        keys.extend(page.records.into_iter().map(|record| record.key));
        match page.next_page_token {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    let expected: Vec<String> = (0..100).map(|index| format!("r{index:03}")).collect();
    assert_eq!(keys, expected);
    assert_eq!(pages, 2, "6.4 MiB of records in 4 MiB pages");
    Ok(())
}
