//! Presence and messaging across the virtual super peer: leaves on different super peers see each other and
//! exchange acknowledged messages; messages to an offline peer wait in its replicated mailbox and arrive in
//! order when it attaches anywhere (also after a leader kill); a leaf that vanishes shows offline after the
//! grace period; limits give clear errors and lose nothing else; sends queued together travel as batches (from
//! the leaf, between super peers and into the recipient's session), each message still answered on its own.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tonic::Code;
use vesper_leafpeer::{
    Consistency, Keypair, Leaf, Message, PresenceStatus, SearchTerm, SendOutcome,
};
use vesper_proto::v1::{
    client_frame, server_frame, ClientFrame, DeliverCall, MessageAck, MessageAcks, SendBatch,
    SendFrame, SendMessageRequest,
};
use vesper_proto::validate::MAX_SENDS_IN_FLIGHT;
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::wait;

fn options(extra: &[&str]) -> NodeOptions {
    NodeOptions {
        extra_args: extra.iter().map(|arg| arg.to_string()).collect(),
        ..NodeOptions::default()
    }
}

async fn next_message(
    stream: &mut tokio::sync::mpsc::Receiver<Message>,
) -> anyhow::Result<Message> {
    wait::next("message", Duration::from_secs(20), stream).await
}

async fn status_of(observer: &Leaf, peer: &vesper_leafpeer::PeerId) -> anyhow::Result<i32> {
    Ok(observer
        .lookup(peer, Consistency::Linearizable)
        .await?
        .map_or(PresenceStatus::Offline as i32, |presence| presence.status))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_leaves_on_different_super_peers_see_and_message_each_other() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, NodeOptions::default()).await?;
    let alice = cluster.leaf(0).await?;
    let bob = cluster.leaf(1).await?;
    let mut bob_inbox = bob.messages().expect("first call gets the stream");

    // Presence: bob is online, hosted by the super peer he attached to.
    let seen = alice
        .lookup(&bob.peer_id(), Consistency::Linearizable)
        .await?
        .expect("bob is known");
    assert_eq!(seen.status, PresenceStatus::Online as i32);
    assert_eq!(seen.host_leaf_addr, bob.server());

    bob.set_presence(
        PresenceStatus::Busy,
        "in a meeting",
        HashMap::from([
            ("city".to_string(), "lisbon".to_string()),
            ("role".to_string(), "dev".to_string()),
        ]),
    )
    .await?;
    let seen = alice
        .lookup(&bob.peer_id(), Consistency::Linearizable)
        .await?
        .expect("bob is known");
    assert_eq!(seen.status, PresenceStatus::Busy as i32);
    assert_eq!(seen.note, "in a meeting");
    let found = alice
        .search_peers(
            &[SearchTerm::Equals("city".into(), "lisbon".into())],
            true,
            10,
        )
        .await?;
    assert!(!found.more);
    assert_eq!(found.peers.len(), 1);
    assert_eq!(found.peers[0].peer_id, bob.peer_id().to_string());
    assert!(alice
        .search_peers(
            &[SearchTerm::Prefix("city".into(), "par".into())],
            false,
            10
        )
        .await?
        .peers
        .is_empty());
    // A search that finds more than its limit says so.
    alice
        .set_presence(
            PresenceStatus::Online,
            "",
            HashMap::from([("city".to_string(), "lisbon".to_string())]),
        )
        .await?;
    let first = alice
        .search_peers(
            &[SearchTerm::Equals("city".into(), "lisbon".into())],
            false,
            1,
        )
        .await?;
    assert_eq!((first.peers.len(), first.more), (1, true));

    // Messages across super peers are delivered and acknowledged, in order.
    for n in 0..20 {
        let outcome = alice
            .send(&bob.peer_id(), "chat", format!("hello {n}").into_bytes())
            .await?;
        assert_eq!(outcome, SendOutcome::Delivered);
    }
    for n in 0..20 {
        let message = next_message(&mut bob_inbox).await?;
        assert_eq!(message.from, alice.peer_id().to_string());
        assert_eq!(message.kind, "chat");
        assert_eq!(message.payload, format!("hello {n}").into_bytes());
        assert!(!message.from_mailbox);
    }

    // A handler per kind takes its kind off the stream.
    let (handled_tx, mut handled_rx) = tokio::sync::mpsc::unbounded_channel();
    bob.on_message("ping", move |message| {
        let _ = handled_tx.send(message);
    });
    alice.send(&bob.peer_id(), "ping", b"p".to_vec()).await?;
    alice
        .send(&bob.peer_id(), "chat", b"after".to_vec())
        .await?;
    let handled = tokio::time::timeout(Duration::from_secs(10), handled_rx.recv())
        .await?
        .expect("handled");
    assert_eq!(handled.kind, "ping");
    assert_eq!(next_message(&mut bob_inbox).await?.payload, b"after");

    // Same super peer works too.
    let carol = cluster.leaf(1).await?;
    assert_eq!(
        carol
            .send(&bob.peer_id(), "chat", b"local".to_vec())
            .await?,
        SendOutcome::Delivered
    );
    assert_eq!(next_message(&mut bob_inbox).await?.payload, b"local");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_more_sends_at_once_than_a_session_may_have_in_flight_wait_and_all_arrive_once(
) -> anyhow::Result<()> {
    // The send rate is lifted: this is about the in-flight limits (1024 sends and 4 MiB of payload per session),
    // not the rate. Messages up to the 1 MiB ceiling are allowed, so a few of them fill the payload budget.
    let cluster = Cluster::start(
        2,
        options(&[
            "--send-rate",
            "100000",
            "--send-burst",
            "100000",
            "--max-message-bytes",
            "1048576",
        ]),
    )
    .await?;
    let alice = cluster.leaf(0).await?;
    let bob = cluster.leaf(1).await?;
    let mut bob_inbox = bob.messages().expect("first call gets the stream");
    let bob_id = bob.peer_id();
    // More than twice the limit of sends at once, across two super peers: the library holds the excess back
    // (none is refused) and batches what queues up together. Bob's app reads as they come (its stream holds
    // 1024; a full stream holds back acknowledgements).
    let sends_at_once = 2 * MAX_SENDS_IN_FLIGHT as u32 + 100;
    let sends = (0..sends_at_once).map(|n| alice.send(&bob_id, "chat", n.to_be_bytes().to_vec()));
    let receive = async {
        let mut got = Vec::new();
        for _ in 0..sends_at_once {
            let payload = next_message(&mut bob_inbox).await?.payload;
            got.push(u32::from_be_bytes(payload.try_into().expect("4 bytes")));
        }
        anyhow::Ok(got)
    };
    let (outcomes, got) = tokio::join!(futures::future::join_all(sends), receive);
    for outcome in outcomes {
        assert_eq!(outcome?, SendOutcome::Delivered);
    }
    let mut got = got?;
    got.sort_unstable();
    assert_eq!(got, (0..sends_at_once).collect::<Vec<_>>());
    // Ten 1 MiB messages at once are 10 MiB of payload, more than the 4 MiB a session may have in flight: the
    // library holds them back by size too.
    const BIG: usize = 1 << 20;
    let sends = (0..10u8).map(|n| alice.send(&bob_id, "chat", vec![n; BIG]));
    for outcome in futures::future::join_all(sends).await {
        assert_eq!(outcome?, SendOutcome::Delivered);
    }
    let mut got = Vec::new();
    for _ in 0..10 {
        let payload = next_message(&mut bob_inbox).await?.payload;
        assert_eq!(payload.len(), BIG);
        assert!(payload.iter().all(|&byte| byte == payload[0]));
        got.push(payload[0]);
    }
    got.sort_unstable();
    assert_eq!(got, (0..10u8).collect::<Vec<_>>());
    assert!(
        bob_inbox.try_recv().is_err(),
        "a message reached the app twice"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_a_super_peer_refuses_sends_past_1024_or_4_mib_of_payload_in_flight(
) -> anyhow::Result<()> {
    let cluster = Cluster::start(
        1,
        options(&["--send-rate", "100000", "--send-burst", "100000"]),
    )
    .await?;
    let address = cluster.nodes[0].endpoints().leaf.to_string();
    let open = |keypair: Keypair| {
        let (address, ca) = (address.clone(), cluster.pki.ca_pem());
        async move {
            let channel = vesper_tests::raw::channel(&address, &ca).await?;
            anyhow::Ok(
                vesper_tests::raw::open(channel, &keypair, vesper_tests::raw::Signing::Valid)
                    .await?,
            )
        }
    };
    // A recipient that never reads nor acknowledges: every send to it stays in flight until the delivery
    // timeout (10 s), which is far longer than this test needs.
    let silent_key = Keypair::generate();
    let silent = open(silent_key.clone()).await?;
    let to = silent_key.peer_id().to_string();
    let send = |request_id: u64, payload: Vec<u8>| SendFrame {
        request_id,
        message: Some(SendMessageRequest {
            to: to.clone(),
            id: format!("m{request_id}"),
            kind: "chat".into(),
            payload,
            ..Default::default()
        }),
    };

    // Alice: 1024 one-byte sends in batches of 64 are taken; send 1025 is refused at once, by count (a lone
    // refusal comes back as one SendResult).
    let alice_key = Keypair::generate();
    let mut alice = open(alice_key.clone()).await?;
    let mut request_id = 0u64;
    for _ in 0..MAX_SENDS_IN_FLIGHT / 64 {
        let sends = (0..64).map(|_| {
            request_id += 1;
            send(request_id, vec![1])
        });
        let frame = client_frame::Frame::SendBatch(SendBatch {
            sends: sends.collect(),
        });
        alice
            .outbound
            .send(ClientFrame { frame: Some(frame) })
            .await?;
    }
    let frame = client_frame::Frame::Send(send(request_id + 1, vec![1]));
    alice
        .outbound
        .send(ClientFrame { frame: Some(frame) })
        .await?;
    let server_frame::Frame::SendResult(refusal) = next_frame(&mut alice).await? else {
        anyhow::bail!("expected the refusal");
    };
    assert_eq!(refusal.request_id, request_id + 1);
    assert_eq!(refusal.error_code, Code::ResourceExhausted as i32);
    assert!(
        refusal
            .error_message
            .contains("1024 sends already in flight"),
        "{refusal:?}"
    );

    // Carol: 64 sends of 64 KiB are 4 MiB of payload and are taken; one more byte is refused at once, by size,
    // while a send with an empty payload still fits: it goes to alice, who acknowledges it.
    let mut carol = open(Keypair::generate()).await?;
    let mut frames: Vec<SendFrame> = (1..=64u64)
        .map(|request_id| send(request_id, vec![7; 64 << 10]))
        .collect();
    frames.push(send(65, vec![7]));
    let mut empty = send(66, vec![]);
    empty.message.as_mut().expect("built with one").to = alice_key.peer_id().to_string();
    frames.push(empty);
    for frame in frames {
        let frame = client_frame::Frame::Send(frame);
        carol
            .outbound
            .send(ClientFrame { frame: Some(frame) })
            .await?;
    }
    let server_frame::Frame::SendResult(refusal) = next_frame(&mut carol).await? else {
        anyhow::bail!("expected the refusal");
    };
    assert_eq!(refusal.request_id, 65);
    assert_eq!(refusal.error_code, Code::ResourceExhausted as i32);
    assert!(
        refusal
            .error_message
            .contains("would put more than 4194304 bytes of payload in flight"),
        "{refusal:?}"
    );
    let server_frame::Frame::Message(message) = next_frame(&mut alice).await? else {
        anyhow::bail!("expected carol's empty message");
    };
    assert_eq!(message.id, "m66");
    let ack = client_frame::Frame::MessageAck(MessageAck {
        delivery_id: message.delivery_id,
    });
    alice
        .outbound
        .send(ClientFrame { frame: Some(ack) })
        .await?;
    let server_frame::Frame::SendResult(result) = next_frame(&mut carol).await? else {
        anyhow::bail!("expected the empty message's result");
    };
    assert_eq!(
        (result.request_id, result.delivered),
        (66, true),
        "{result:?}"
    );
    drop(silent);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_offline_messages_wait_in_the_mailbox_and_arrive_in_order_after_a_leader_kill(
) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, NodeOptions::default()).await?;
    let leader = cluster.wait_leader().await?;
    let followers: Vec<usize> = (0..3).filter(|&index| index != leader).collect();
    let bob_key = Keypair::generate();
    let bob = cluster.leaf_with(followers[0], bob_key.clone()).await?;
    let bob_id = bob.peer_id();
    let alice = cluster.leaf(followers[1]).await?;
    bob.detach().await;
    // A goodbye takes bob offline at once.
    wait::until("bob to be offline", Duration::from_secs(10), || async {
        Ok((status_of(&alice, &bob_id).await? == PresenceStatus::Offline as i32).then_some(()))
    })
    .await?;
    // More than one drain batch (64 messages), so the drain's batches follow each other in order.
    const QUEUED: usize = 100;
    for n in 0..QUEUED {
        let outcome = alice
            .send(&bob_id, "chat", format!("queued {n}").into_bytes())
            .await?;
        assert_eq!(outcome, SendOutcome::Queued);
    }
    // The mailbox is replicated: it survives losing the leader.
    cluster.kill(leader);
    cluster.wait_leader().await?;
    let bob = cluster.leaf_with(followers[1], bob_key).await?;
    let mut inbox = bob.messages().expect("stream");
    for n in 0..QUEUED {
        let message = next_message(&mut inbox).await?;
        assert!(message.from_mailbox);
        assert_eq!(
            message.payload,
            format!("queued {n}").into_bytes(),
            "mailbox order"
        );
    }
    // Drained: the next message goes straight to the session, and nothing is delivered twice.
    assert_eq!(
        alice.send(&bob_id, "chat", b"live".to_vec()).await?,
        SendOutcome::Delivered
    );
    let message = next_message(&mut inbox).await?;
    assert_eq!(message.payload, b"live");
    assert!(!message.from_mailbox);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_a_leaf_that_vanishes_is_offline_after_the_grace_period() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, options(&["--session-grace", "1s"])).await?;
    let observer = cluster.leaf(0).await?;
    let ghost = cluster.leaf(1).await?;
    let ghost_id = ghost.peer_id();
    assert_eq!(
        status_of(&observer, &ghost_id).await?,
        PresenceStatus::Online as i32
    );
    let vanished = Instant::now();
    // No goodbye: the stream just ends, as when the process dies.
    ghost.close();
    drop(ghost);
    wait::until(
        "the vanished leaf to be offline",
        Duration::from_secs(30),
        || async {
            Ok(
                (status_of(&observer, &ghost_id).await? == PresenceStatus::Offline as i32)
                    .then_some(()),
            )
        },
    )
    .await?;
    let took = vanished.elapsed();
    println!(
        "vanished leaf shown offline after {} ms (grace 1000 ms)",
        took.as_millis()
    );
    assert!(
        took >= Duration::from_millis(900),
        "offline before the grace period ended: {took:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_leaves_of_a_killed_super_peer_go_offline_after_host_expiry() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, options(&["--host-expiry", "2s"])).await?;
    let leader = cluster.wait_leader().await?;
    let doomed = (0..3).find(|&index| index != leader).expect("a follower");
    let survivor = (0..3)
        .find(|&index| index != leader && index != doomed)
        .expect("another follower");
    let observer = cluster.leaf(survivor).await?;
    let mut hosted = Vec::new();
    for _ in 0..5 {
        hosted.push(cluster.leaf(doomed).await?.peer_id());
    }
    cluster.kill(doomed);
    for peer in &hosted {
        wait::until(
            "leaves of the killed super peer to be offline",
            Duration::from_secs(30),
            || async {
                Ok(
                    (status_of(&observer, peer).await? == PresenceStatus::Offline as i32)
                        .then_some(()),
                )
            },
        )
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_messages_past_their_mailbox_ttl_are_removed_unread_and_counted() -> anyhow::Result<()>
{
    let ttl = Duration::from_secs(1);
    let cluster = Cluster::start(1, options(&["--mailbox-ttl", "1s"])).await?;
    let ops = cluster.nodes[0].endpoints().ops.expect("ops port");
    let expired = || async move {
        let (_, text) = vesper_tests::ops::get(ops, "/metrics").await?;
        anyhow::Ok(vesper_tests::ops::sample(&text, "vesper_mailbox_expired_total").unwrap_or(0.0))
    };
    let alice = cluster.leaf(0).await?;
    let (bob_key, carol_key) = (Keypair::generate(), Keypair::generate());
    let (bob_id, carol_id) = (bob_key.peer_id(), carol_key.peer_id());
    assert_eq!(
        alice.send(&bob_id, "chat", b"stale".to_vec()).await?,
        SendOutcome::Queued
    );
    assert_eq!(
        alice.send(&carol_id, "chat", b"old".to_vec()).await?,
        SendOutcome::Queued
    );
    // The time to live has to pass; nothing to observe before it does.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert_eq!(
        expired().await?,
        0.0,
        "nothing is removed before someone looks"
    );

    // Bob attaches: his drain removes the expired message instead of delivering it.
    let bob = cluster.leaf_with(0, bob_key).await?;
    let mut inbox = bob.messages().expect("stream");
    wait::until(
        "the drain to count the expired message",
        Duration::from_secs(20),
        || async { Ok((expired().await? == 1.0).then_some(())) },
    )
    .await?;
    assert_eq!(
        alice.send(&bob_id, "chat", b"fresh".to_vec()).await?,
        SendOutcome::Delivered
    );
    assert_eq!(
        next_message(&mut inbox).await?.payload,
        b"fresh",
        "the expired one never arrives"
    );

    // Carol stays away; a new message for her removes the expired one on the way in (its put says so).
    assert_eq!(
        alice.send(&carol_id, "chat", b"new".to_vec()).await?,
        SendOutcome::Queued
    );
    assert_eq!(expired().await?, 2.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_a_super_peer_alone_never_expires_its_own_leaves() -> anyhow::Result<()> {
    // openraft's heartbeat time for a leader without followers never moves; the leader must not read that as
    // itself being silent. Watched for three times the expiry, checked throughout.
    let expiry = Duration::from_secs(2);
    let cluster = Cluster::start(1, options(&["--host-expiry", "2s"])).await?;
    let leaf = cluster.leaf(0).await?;
    let observer = cluster.leaf(0).await?;
    let id = leaf.peer_id();
    let end = Instant::now() + expiry * 3;
    while Instant::now() < end {
        assert_eq!(
            status_of(&observer, &id).await?,
            PresenceStatus::Online as i32,
            "the only super peer took itself for silent"
        );
        assert!(
            leaf.reattach_times().is_empty(),
            "the leaf's session was ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_limits_give_clear_errors_and_lose_nothing_else() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, options(&["--mailbox-quota", "3"])).await?;
    let alice = cluster.leaf(0).await?;
    let bob_key = Keypair::generate();
    let bob = cluster.leaf_with(0, bob_key.clone()).await?;
    let bob_id = bob.peer_id();
    bob.detach().await;
    wait::until("bob offline", Duration::from_secs(10), || async {
        Ok((status_of(&alice, &bob_id).await? == PresenceStatus::Offline as i32).then_some(()))
    })
    .await?;
    for n in 0..3 {
        assert_eq!(
            alice.send(&bob_id, "chat", vec![n]).await?,
            SendOutcome::Queued
        );
    }
    let error = alice
        .send(&bob_id, "chat", vec![9])
        .await
        .expect_err("quota");
    assert_eq!(error.code(), Some(Code::ResourceExhausted), "{error}");
    assert!(
        error.to_string().contains("mailbox is full (3 messages)"),
        "{error}"
    );

    let error = alice
        .send(&bob_id, "chat", vec![0; 64 * 1024 + 1])
        .await
        .expect_err("payload limit");
    assert_eq!(error.code(), Some(Code::ResourceExhausted), "{error}");
    assert!(
        error.to_string().contains("payload is 65537 bytes"),
        "{error}"
    );
    let error = alice
        .send(&bob_id, "Bad Kind", vec![])
        .await
        .expect_err("kind");
    assert!(error.to_string().contains("kind"), "{error}");
    let error = alice
        .set_presence(PresenceStatus::Online, &"n".repeat(257), HashMap::new())
        .await
        .expect_err("note limit");
    assert_eq!(error.code(), Some(Code::ResourceExhausted), "{error}");

    // The send rate per session: a burst beyond it is refused, what was accepted arrives.
    let limited = Cluster::start(1, options(&["--send-rate", "2", "--send-burst", "5"])).await?;
    let sender = limited.leaf(0).await?;
    let receiver = limited.leaf(0).await?;
    let mut receiver_inbox = receiver.messages().expect("stream");
    let mut accepted = Vec::new();
    let mut refused = 0;
    for n in 0..20u8 {
        match sender.send(&receiver.peer_id(), "chat", vec![n]).await {
            Ok(_) => accepted.push(vec![n]),
            Err(error) => {
                assert_eq!(error.code(), Some(Code::ResourceExhausted), "{error}");
                assert!(error.to_string().contains("send rate limit"), "{error}");
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0 && accepted.len() >= 5,
        "accepted {}, refused {refused}",
        accepted.len()
    );
    for payload in &accepted {
        assert_eq!(&next_message(&mut receiver_inbox).await?.payload, payload);
    }

    // Calls per session: a burst beyond the rate is refused with a clear error.
    let metered =
        Cluster::start(1, options(&["--request-rate", "2", "--request-burst", "5"])).await?;
    let caller = metered.leaf(0).await?;
    let mut refused_calls = 0;
    for n in 0..20 {
        if let Err(error) = caller
            .put("ns", &format!("k{n}"), HashMap::new(), vec![], None)
            .await
        {
            assert_eq!(error.code(), Some(Code::ResourceExhausted), "{error}");
            assert!(error.to_string().contains("request rate limit"), "{error}");
            refused_calls += 1;
        }
    }
    assert!(refused_calls > 0, "20 calls at once passed a limit of 5");

    // Sessions per source address: beyond the limit a session is refused, the others keep working.
    let crowded = Cluster::start(1, options(&["--max-sessions-per-ip", "3"])).await?;
    let mut crowd = Vec::new();
    for _ in 0..3 {
        crowd.push(crowded.leaf(0).await?);
    }
    let error = crowded
        .leaf(0)
        .await
        .err()
        .expect("a fourth session from one address");
    assert!(
        error
            .to_string()
            .contains("too many sessions from 127.0.0.1"),
        "{error}"
    );
    crowd[0]
        .put("ns", "still-works", HashMap::new(), vec![], None)
        .await?;
    crowd.pop().expect("a session").detach().await;
    wait::until("a slot to free up", Duration::from_secs(10), || async {
        Ok(crowded.leaf(0).await.ok().map(|_| ()))
    })
    .await?;

    // The three queued messages are intact.
    let bob = cluster.leaf_with(0, bob_key).await?;
    let mut inbox = bob.messages().expect("stream");
    for n in 0..3u8 {
        assert_eq!(next_message(&mut inbox).await?.payload, vec![n]);
    }
    Ok(())
}

/// A delivery stream to node `index`, opened as another member would: calls go in, outcomes come out.
async fn delivery_stream(
    cluster: &Cluster,
    index: usize,
) -> anyhow::Result<(
    tokio::sync::mpsc::UnboundedSender<DeliverCall>,
    tonic::Streaming<vesper_proto::v1::DeliverOutcome>,
)> {
    let (calls, call_stream) = tokio::sync::mpsc::unbounded_channel();
    let outcomes = cluster
        .cluster_client(index)
        .await?
        .deliver_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(
            call_stream,
        ))
        .await?
        .into_inner();
    Ok((calls, outcomes))
}

/// Delivery call `id` of `messages` for leaf `to`.
fn deliver_call(id: u64, to: &str, messages: Vec<vesper_proto::v1::Message>) -> DeliverCall {
    DeliverCall {
        id,
        to: to.to_string(),
        messages,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_a_delivery_between_super_peers_carries_1_to_64_messages() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, options(&[])).await?;
    let bob = cluster.leaf(0).await?;
    let mut inbox = bob.messages().expect("first call gets the stream");
    // As another member would deliver to bob's super peer.
    let (calls, mut outcomes) = delivery_stream(&cluster, 0).await?;
    let from = Keypair::generate().peer_id().to_string();
    let message = |n: u8| vesper_proto::v1::Message {
        id: format!("d{n}"),
        from: from.clone(),
        kind: "chat".into(),
        payload: vec![n],
        ..Default::default()
    };
    let to = bob.peer_id().to_string();
    let call = |id: u64, messages: Vec<vesper_proto::v1::Message>| deliver_call(id, &to, messages);
    // One over the limit, an empty one, then exactly the limit.
    calls.send(call(1, (0..65).map(message).collect()))?;
    calls.send(call(2, Vec::new()))?;
    calls.send(call(3, (100..164).map(message).collect()))?;
    let mut delivered = HashMap::new();
    while delivered.len() < 3 {
        let outcome = tokio::time::timeout(Duration::from_secs(20), outcomes.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("the delivery stream ended"))?;
        delivered.insert(outcome.id, outcome.each);
    }
    assert_eq!(
        delivered[&1],
        vec![false; 65],
        "65 messages are one too many"
    );
    assert_eq!(delivered[&2], Vec::<bool>::new());
    assert_eq!(delivered[&3], vec![true; 64]);
    // Bob got the 64, in order, and nothing of the refused call.
    for n in 100..164u8 {
        assert_eq!(next_message(&mut inbox).await?.payload, vec![n]);
    }
    assert!(inbox.try_recv().is_err(), "a refused message arrived");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_a_delivery_stream_holds_at_most_8192_messages_in_flight() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, options(&[])).await?;
    // A leaf that attaches and then never reads nor acknowledges: every delivery to it stays in flight until the
    // delivery timeout (10 s).
    let silent_key = Keypair::generate();
    let address = cluster.nodes[0].endpoints().leaf.to_string();
    let channel = vesper_tests::raw::channel(&address, &cluster.pki.ca_pem()).await?;
    let silent =
        vesper_tests::raw::open(channel, &silent_key, vesper_tests::raw::Signing::Valid).await?;
    let (calls, mut outcomes) = delivery_stream(&cluster, 0).await?;
    let from = Keypair::generate().peer_id().to_string();
    // 128 calls of 64 messages fill the stream's 8192 (docs/LIMITS.md); call 129 is one call too many.
    let to = silent_key.peer_id().to_string();
    for id in 1..=129u64 {
        let messages = (0..64).map(|n| vesper_proto::v1::Message {
            id: format!("c{id}-{n}"),
            from: from.clone(),
            kind: "chat".into(),
            payload: vec![1],
            ..Default::default()
        });
        calls.send(deliver_call(id, &to, messages.collect()))?;
    }
    // Only the refusal can come back before the delivery timeout, and it comes at once.
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(8), outcomes.message())
        .await
        .map_err(|_| anyhow::anyhow!("call 129 was not refused at once"))??
        .ok_or_else(|| anyhow::anyhow!("the delivery stream ended"))?;
    assert_eq!(outcome.id, 129, "{outcome:?}");
    assert_eq!(outcome.each, vec![false; 64]);
    println!("refused after {:?}", started.elapsed());
    drop(silent);
    Ok(())
}

/// The next frame a raw session gets that is not a pong or a member update.
async fn next_frame(
    session: &mut vesper_tests::raw::RawSession,
) -> anyhow::Result<server_frame::Frame> {
    session.next_frame(Duration::from_secs(20)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_sends_queued_together_travel_as_one_batch_across_super_peers() -> anyhow::Result<()> {
    let cluster = Cluster::start(2, options(&[])).await?;
    let observer = cluster.leaf(0).await?;
    let raw = |node: usize, keypair: Keypair| {
        let address = cluster.nodes[node].endpoints().leaf.to_string();
        let ca = cluster.pki.ca_pem();
        async move {
            let channel = vesper_tests::raw::channel(&address, &ca).await?;
            let signing = vesper_tests::raw::Signing::Valid;
            anyhow::Ok(vesper_tests::raw::open(channel, &keypair, signing).await?)
        }
    };
    let (alice_key, bob_key) = (Keypair::generate(), Keypair::generate());
    let (alice_id, bob_id) = (alice_key.peer_id().to_string(), bob_key.peer_id());
    let mut alice = raw(0, alice_key).await?;
    let mut bob = raw(1, bob_key).await?;
    assert_eq!(
        status_of(&observer, &bob_id).await?,
        PresenceStatus::Online as i32
    );

    // One SendBatch: 63 messages for bob (hosted by the other super peer), one send without a message, and one
    // past the batch limit of 64.
    let mut sends: Vec<SendFrame> = (0..63u8)
        .map(|n| SendFrame {
            request_id: u64::from(n),
            message: Some(SendMessageRequest {
                to: bob_id.to_string(),
                id: format!("batch-{n}"),
                kind: "note".into(),
                payload: vec![n],
                ..Default::default()
            }),
        })
        .collect();
    sends.push(SendFrame {
        request_id: 63,
        message: None,
    });
    let mut past_limit = sends[0].clone();
    past_limit.request_id = 64;
    sends.push(past_limit);
    alice
        .outbound
        .send(ClientFrame {
            frame: Some(client_frame::Frame::SendBatch(SendBatch { sends })),
        })
        .await?;

    // The two refusals come back at once, each naming its problem.
    let server_frame::Frame::SendResults(refused) = next_frame(&mut alice).await? else {
        anyhow::bail!("expected the refusals first");
    };
    let refused: HashMap<u64, (i32, String)> = refused
        .results
        .into_iter()
        .map(|result| (result.request_id, (result.error_code, result.error_message)))
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert_eq!(refused[&63].0, Code::InvalidArgument as i32);
    assert!(refused[&63].1.contains("without a message"), "{refused:?}");
    assert_eq!(refused[&64].0, Code::InvalidArgument as i32);
    assert!(refused[&64].1.contains("at most 64 sends"), "{refused:?}");

    // Bob gets the 63 messages in one frame, in order, and acknowledges them in one frame.
    let server_frame::Frame::MessageBatch(batch) = next_frame(&mut bob).await? else {
        anyhow::bail!("expected one MessageBatch");
    };
    let payloads: Vec<u8> = batch.messages.iter().map(|m| m.payload[0]).collect();
    assert_eq!(payloads, (0..63u8).collect::<Vec<_>>());
    assert!(batch.messages.iter().all(|m| m.from == alice_id));
    let acks = MessageAcks {
        delivery_ids: batch.messages.iter().map(|m| m.delivery_id).collect(),
    };
    bob.outbound
        .send(ClientFrame {
            frame: Some(client_frame::Frame::MessageAcks(acks)),
        })
        .await?;

    // Alice learns that each was delivered (none queued), in one SendResults frame.
    let server_frame::Frame::SendResults(results) = next_frame(&mut alice).await? else {
        anyhow::bail!("expected the results");
    };
    let mut delivered: Vec<u64> = results
        .results
        .iter()
        .filter(|result| result.delivered && result.error_code == 0)
        .map(|result| result.request_id)
        .collect();
    delivered.sort_unstable();
    assert_eq!(delivered, (0..63u64).collect::<Vec<_>>(), "{results:?}");

    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_a_session_without_keepalives_expires_after_ttl_plus_grace() -> anyhow::Result<()> {
    let cluster = Cluster::start(
        1,
        options(&["--session-ttl", "5500ms", "--session-grace", "500ms"]),
    )
    .await?;
    let observer = cluster.leaf(0).await?;
    // A hand-driven session that attaches and then stays silent with its stream open.
    let silent_key = Keypair::generate();
    let address = cluster.nodes[0].endpoints().leaf.to_string();
    let channel = vesper_tests::raw::channel(&address, &cluster.pki.ca_pem()).await?;
    let silent =
        vesper_tests::raw::open(channel, &silent_key, vesper_tests::raw::Signing::Valid).await?;
    let silent_id = silent_key.peer_id();
    assert_eq!(
        status_of(&observer, &silent_id).await?,
        PresenceStatus::Online as i32
    );
    let attached = Instant::now();
    wait::until(
        "the silent session to expire",
        Duration::from_secs(30),
        || async {
            Ok(
                (status_of(&observer, &silent_id).await? == PresenceStatus::Offline as i32)
                    .then_some(()),
            )
        },
    )
    .await?;
    let took = attached.elapsed();
    println!(
        "silent session offline after {} ms (TTL 5500 + grace 500)",
        took.as_millis()
    );
    assert!(
        took >= Duration::from_millis(5500),
        "expired before the TTL: {took:?}"
    );
    drop(silent);
    Ok(())
}

/// The TTL counts from the last frame the leaf sent: a session that never pings expires though its watch keeps
/// getting events (each event woke the session's loop, which used to start the TTL over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_a_silent_session_expires_though_its_watch_keeps_getting_events() -> anyhow::Result<()>
{
    let cluster = Cluster::start(
        1,
        options(&["--session-ttl", "5500ms", "--session-grace", "500ms"]),
    )
    .await?;
    let writer = cluster.leaf(0).await?;
    let silent_key = Keypair::generate();
    let address = cluster.nodes[0].endpoints().leaf.to_string();
    let channel = vesper_tests::raw::channel(&address, &cluster.pki.ca_pem()).await?;
    let silent =
        vesper_tests::raw::open(channel, &silent_key, vesper_tests::raw::Signing::Valid).await?;
    silent
        .outbound
        .send(ClientFrame {
            frame: Some(client_frame::Frame::Watch(vesper_proto::v1::Watch {
                watch_id: 1,
                namespace: "busy".into(),
                ..Default::default()
            })),
        })
        .await?;
    let silent_id = silent_key.peer_id();
    // The session reads what it is sent (so that nothing on the super peer waits for it), and sends nothing.
    let vesper_tests::raw::RawSession {
        mut inbound,
        outbound,
        ..
    } = silent;
    let events = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = events.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(frame)) = inbound.message().await {
            if matches!(frame.frame, Some(server_frame::Frame::WatchEvent(_))) {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    // Events for the watch, more often than the TTL, until the session is gone: within TTL + grace and a wide
    // margin for a loaded machine (12 s). Before, the TTL started over at each event, and this session lived
    // until something else ended it (about 16 s here).
    let attached = Instant::now();
    let mut written = 0u64;
    wait::until(
        "the silent session to expire while its watch gets events",
        Duration::from_secs(12),
        || {
            written += 1;
            let (writer, key) = (writer.clone(), format!("k{written}"));
            async move {
                writer
                    .put("busy", &key, Default::default(), b"v".to_vec(), None)
                    .await?;
                Ok(
                    (status_of(&writer, &silent_id).await? == PresenceStatus::Offline as i32)
                        .then_some(()),
                )
            }
        },
    )
    .await?;
    let got = events.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "offline after {:?}, {written} writes, {got} events",
        attached.elapsed()
    );
    assert!(
        got > 3,
        "events kept coming ({got} events for {written} writes)"
    );
    drop(outbound);
    reader.abort();
    Ok(())
}

/// One send from a raw session, with a message id of the test's choosing.
fn send_frame(request_id: u64, to: &str, id: &str, payload: &[u8]) -> ClientFrame {
    ClientFrame {
        frame: Some(client_frame::Frame::Send(SendFrame {
            request_id,
            message: Some(SendMessageRequest {
                to: to.to_string(),
                id: id.to_string(),
                kind: "note".into(),
                payload: payload.to_vec(),
                ..Default::default()
            }),
        })),
    }
}

/// The next message pushed into a raw session (a lone message or the first of a batch is all these sends make).
async fn next_pushed(
    session: &mut vesper_tests::raw::RawSession,
) -> anyhow::Result<vesper_proto::v1::Message> {
    match next_frame(session).await? {
        server_frame::Frame::Message(message) => Ok(message),
        server_frame::Frame::MessageBatch(mut batch) if batch.messages.len() == 1 => {
            Ok(batch.messages.remove(0))
        }
        other => anyhow::bail!("expected a message, got {other:?}"),
    }
}

/// Two senders (on different super peers) pick the same message id toward one recipient, and both messages are
/// in flight at once: the recipient's super peer keys its wait for each acknowledgement by the delivery id it
/// gave the push, so both are delivered once, both senders hear "delivered", and nothing reaches the mailbox.
/// (Keyed by message id, the second push took the first one's slot: that sender heard "queued" and the message
/// came again from the mailbox at the next attach.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_two_senders_using_one_message_id_toward_one_recipient_are_both_delivered_once(
) -> anyhow::Result<()> {
    let cluster = Cluster::start(2, options(&[])).await?;
    let observer = cluster.leaf(0).await?;
    let raw = |node: usize, keypair: Keypair| {
        let address = cluster.nodes[node].endpoints().leaf.to_string();
        let ca = cluster.pki.ca_pem();
        async move {
            let channel = vesper_tests::raw::channel(&address, &ca).await?;
            let signing = vesper_tests::raw::Signing::Valid;
            anyhow::Ok(vesper_tests::raw::open(channel, &keypair, signing).await?)
        }
    };
    let (alice_key, bob_key, carol_key) = (
        Keypair::generate(),
        Keypair::generate(),
        Keypair::generate(),
    );
    let (alice_id, bob_id, carol_id) = (
        alice_key.peer_id().to_string(),
        bob_key.peer_id().to_string(),
        carol_key.peer_id(),
    );
    let mut alice = raw(0, alice_key).await?;
    let mut bob = raw(1, bob_key).await?;
    let mut carol = raw(0, carol_key.clone()).await?;
    assert_eq!(
        status_of(&observer, &carol_id).await?,
        PresenceStatus::Online as i32
    );

    // Alice (same super peer as carol) and bob (the other one) both send id "same"; carol holds her
    // acknowledgements until both pushes arrived, so both wait for an acknowledgement at the same time.
    let to = carol_id.to_string();
    alice
        .outbound
        .send(send_frame(1, &to, "same", b"from alice"))
        .await?;
    bob.outbound
        .send(send_frame(1, &to, "same", b"from bob"))
        .await?;
    let first = next_pushed(&mut carol).await?;
    let second = next_pushed(&mut carol).await?;
    let mut senders = [first.from.clone(), second.from.clone()];
    senders.sort();
    let mut expected = [alice_id.clone(), bob_id.clone()];
    expected.sort();
    assert_eq!(senders, expected, "one push from each sender");
    assert!(first.id == "same" && second.id == "same");
    assert!(!first.from_mailbox && !second.from_mailbox);
    assert_ne!(first.delivery_id, second.delivery_id);
    carol
        .outbound
        .send(ClientFrame {
            frame: Some(client_frame::Frame::MessageAcks(MessageAcks {
                delivery_ids: vec![first.delivery_id, second.delivery_id],
            })),
        })
        .await?;

    // Both senders hear "delivered".
    for (name, sender) in [("alice", &mut alice), ("bob", &mut bob)] {
        let server_frame::Frame::SendResult(result) = next_frame(sender).await? else {
            anyhow::bail!("expected {name}'s send result");
        };
        assert_eq!(
            (result.request_id, result.error_code, result.delivered),
            (1, 0, true),
            "{name}: {result:?}"
        );
    }

    // Nothing waits in carol's mailbox: a new session of hers gets the next message first, not a drained copy.
    drop(carol);
    let mut carol = raw(0, carol_key).await?;
    alice
        .outbound
        .send(send_frame(2, &to, "after", b"after"))
        .await?;
    let next = next_pushed(&mut carol).await?;
    assert_eq!(
        (next.id.as_str(), next.from_mailbox),
        ("after", false),
        "{next:?}"
    );
    Ok(())
}
