//! The seed scenario: alice creates a conference and invites bob and carol with its context; bob accepts, carol
//! declines; only invitees answer, only for themselves; the conference starts at its scheduled time; the chat
//! reaches every participant in one order.
//!
//! The nodes run inside the test process (`common::launcher`: `vesper_superpeer::spawn` on real sockets, TLS and
//! RocksDB); the tests that kill processes stay in `tests/tests/`.

mod common;

use std::time::Duration;

use prost::Message as _;
use tonic::Code;
use vesper_leafpeer::{ConferenceContext, InvitationState, WatchItem, WatchSpec};
use vesper_proto::v1::watch_event;
use vesper_tests::cluster::{Cluster, NodeOptions};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

fn state_of(context: &ConferenceContext, peer: &str) -> Option<i32> {
    context
        .invitees
        .iter()
        .find(|invitee| invitee.peer_id == peer)
        .map(|invitee| invitee.state)
}

/// Collects chat lines from a conference watch until `count` arrived; also reports whether "started" was seen.
async fn chat_lines(
    stream: &mut tokio::sync::mpsc::Receiver<WatchItem>,
    count: usize,
    started: &mut bool,
) -> anyhow::Result<Vec<(u64, String)>> {
    let mut lines = Vec::new();
    while lines.len() < count {
        let item = tokio::time::timeout(Duration::from_secs(20), stream.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("watch ended"))?;
        if let WatchItem::Event(event) = item {
            match event.change {
                Some(watch_event::Change::Chat(chat)) => lines.push((chat.sequence, chat.text)),
                Some(watch_event::Change::Conference(context)) => *started |= context.started,
                _ => {}
            }
        }
    }
    Ok(lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t90_conference_invite_answer_start_and_ordered_chat() -> anyhow::Result<()> {
    let cluster = Cluster::start_in_process(common::launcher(), 3, NodeOptions::default()).await?;
    let alice = cluster.leaf(0).await?;
    let bob = cluster.leaf(1).await?;
    let carol = cluster.leaf(2).await?;
    let mallory = cluster.leaf(2).await?;
    let mut bob_inbox = bob.messages().expect("stream");

    let start_at = now_ms() + 3_000;
    let created = alice
        .create_conference(
            "standup",
            "Daily standup",
            "what we did, what we will do",
            start_at,
        )
        .await?;
    assert_eq!(created.owner, alice.peer_id().to_string());
    let error = alice
        .create_conference("standup", "again", "", start_at)
        .await
        .expect_err("ids are unique");
    assert_eq!(error.code(), Some(Code::AlreadyExists));

    let error = bob
        .invite("standup", &[carol.peer_id()])
        .await
        .expect_err("only the owner invites");
    assert_eq!(error.code(), Some(Code::PermissionDenied), "{error}");
    let invited = alice
        .invite("standup", &[bob.peer_id(), carol.peer_id()])
        .await?;
    assert_eq!(invited.invitees.len(), 2);

    // The invitation carries the context.
    let invitation = tokio::time::timeout(Duration::from_secs(20), bob_inbox.recv())
        .await?
        .expect("invitation");
    assert_eq!(invitation.kind, "vesper.invite");
    let context = ConferenceContext::decode(invitation.payload.as_slice())?;
    assert_eq!(context.title, "Daily standup");
    assert_eq!(context.start_at_ms, start_at);

    let error = mallory
        .answer_invitation("standup", true)
        .await
        .expect_err("not invited");
    assert_eq!(error.code(), Some(Code::PermissionDenied), "{error}");
    bob.answer_invitation("standup", true).await?;
    let roster = carol.answer_invitation("standup", false).await?;
    assert_eq!(
        state_of(&roster, &bob.peer_id().to_string()),
        Some(InvitationState::Accepted as i32)
    );
    assert_eq!(
        state_of(&roster, &carol.peer_id().to_string()),
        Some(InvitationState::Declined as i32)
    );
    let seen_by_mallory = mallory.conference("standup").await?;
    assert_eq!(
        seen_by_mallory.invitees, roster.invitees,
        "every super peer agrees on the roster"
    );

    // Both participants watch the conference; the chat comes in one order to both.
    let spec = WatchSpec {
        conference_id: "standup".into(),
        ..WatchSpec::default()
    };
    let mut alice_watch = alice.watch(spec.clone()).await?;
    let mut bob_watch = bob.watch(spec.clone()).await?;
    // Someone not invited cannot watch the conference.
    let mut mallory_watch = mallory.watch(spec).await?;
    match tokio::time::timeout(Duration::from_secs(20), mallory_watch.recv()).await? {
        Some(WatchItem::Refused(reason)) => assert!(reason.contains("not invited"), "{reason}"),
        other => panic!("a stranger's watch must be refused, got {other:?}"),
    }
    let error = carol
        .post_chat("standup", "may I?")
        .await
        .expect_err("declined");
    assert_eq!(error.code(), Some(Code::PermissionDenied), "{error}");
    let (alice_posts, bob_posts) = tokio::join!(
        async {
            let mut sequences = Vec::new();
            for n in 0..10 {
                sequences.push(alice.post_chat("standup", &format!("alice {n}")).await?);
            }
            anyhow::Ok(sequences)
        },
        async {
            let mut sequences = Vec::new();
            for n in 0..10 {
                sequences.push(bob.post_chat("standup", &format!("bob {n}")).await?);
            }
            anyhow::Ok(sequences)
        }
    );
    let (alice_posts, bob_posts) = (alice_posts?, bob_posts?);
    assert!(alice_posts.windows(2).all(|pair| pair[0] < pair[1]));
    assert!(bob_posts.windows(2).all(|pair| pair[0] < pair[1]));
    let (mut alice_started, mut bob_started) = (false, false);
    let seen_by_alice = chat_lines(&mut alice_watch, 20, &mut alice_started).await?;
    let seen_by_bob = chat_lines(&mut bob_watch, 20, &mut bob_started).await?;
    assert_eq!(
        seen_by_alice, seen_by_bob,
        "one order for every participant"
    );
    let sequences: Vec<u64> = seen_by_alice
        .iter()
        .map(|(sequence, _)| *sequence)
        .collect();
    assert_eq!(sequences, (1..=20).collect::<Vec<_>>());

    // The conference starts at its scheduled time, for everyone.
    vesper_tests::wait::until(
        "the conference to start",
        Duration::from_secs(30),
        || async { Ok(alice.conference("standup").await?.started.then_some(())) },
    )
    .await?;
    assert!(now_ms() >= start_at);
    Ok(())
}
