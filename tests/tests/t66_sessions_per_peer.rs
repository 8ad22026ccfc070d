//! One peer, several sessions: a listener is not disturbed by other commands with its key, a message reaches
//! every session of its recipient and one acknowledgement settles it, and past the per-peer limit the oldest
//! session is ended with a reason its app learns.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use vesper_leafpeer::{Consistency, Keypair, LeafError, PeerId, PresenceStatus, SendOutcome};
use vesper_tests::cli::{json_of, leafpeer_command};
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::wait;

/// Runs a `leafpeer` command to the end and returns the JSON it printed.
fn leafpeer(cluster: &Cluster, key: &Path, args: &[&str]) -> Value {
    json_of(&vesper_tests::cli::leafpeer(cluster, key, args))
}

/// The bug this guards against: any short command with the listener's key replaced the listener's session, and
/// once that command ended the peer showed offline and every later message went to its mailbox, unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t66_a_listener_keeps_receiving_while_its_key_runs_other_commands() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, NodeOptions::default()).await?;
    let listener_key = cluster.root().join("l.key");
    let sender_key = cluster.root().join("a.key");
    let listener_id = leafpeer(&cluster, &listener_key, &["id"])["peer_id"]
        .as_str()
        .expect("peer id")
        .to_string();
    let sender_id = leafpeer(&cluster, &sender_key, &["id"])["peer_id"]
        .as_str()
        .expect("peer id")
        .to_string();
    let listener = leafpeer_command(
        &cluster,
        &listener_key,
        &["listen", "--count", "3", "--timeout", "120"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    let listener_peer: PeerId = listener_id.parse()?;
    let probe = cluster.leaf(2).await?;
    wait::until(
        "the listener to show online",
        Duration::from_secs(30),
        || async {
            Ok(probe
                .lookup(&listener_peer, Consistency::Linearizable)
                .await?
                .filter(|presence| presence.status == PresenceStatus::Online as i32))
        },
    )
    .await?;

    let sent = leafpeer(&cluster, &sender_key, &["send", &listener_id, "one"]);
    assert_eq!(sent["outcome"], "delivered");
    // Short commands with the listener's key: a send, a write and a lookup.
    let reply = leafpeer(&cluster, &listener_key, &["send", &sender_id, "hi"]);
    assert_eq!(reply["outcome"], "queued", "the sender is offline");
    leafpeer(
        &cluster,
        &listener_key,
        &["put", "notes", "n1", "--value", "v"],
    );
    let looked_up = leafpeer(&cluster, &listener_key, &["lookup", &listener_id]);
    assert_eq!(looked_up["status"], "online");
    // After they ended, the listener is still online and still gets its messages directly.
    let sent = leafpeer(&cluster, &sender_key, &["send", &listener_id, "two"]);
    assert_eq!(
        sent["outcome"], "delivered",
        "not queued: the listener is attached"
    );
    let looked_up = leafpeer(&cluster, &sender_key, &["lookup", &listener_id]);
    assert_eq!(looked_up["status"], "online");
    assert_eq!(
        looked_up["sessions"].as_array().map(Vec::len),
        Some(1),
        "short commands attach without presence: only the listener is listed ({looked_up})"
    );
    let sent = leafpeer(&cluster, &sender_key, &["send", &listener_id, "three"]);
    assert_eq!(sent["outcome"], "delivered");

    let output = listener.wait_with_output()?;
    assert!(
        output.status.success(),
        "listener failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let texts: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let message: Value = serde_json::from_str(line).expect("one JSON document per line");
            message["text"].as_str().expect("text").to_string()
        })
        .collect();
    assert_eq!(texts, ["one", "two", "three"]);
    Ok(())
}

/// A phone and a laptop with one key, on two super peers: both get a message; the first acknowledgement makes
/// it delivered, though the other session's app is still busy with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t66_two_sessions_on_two_super_peers_both_get_a_message_and_one_ack_settles_it(
) -> anyhow::Result<()> {
    let cluster = Cluster::start(3, NodeOptions::default()).await?;
    let key = Keypair::generate();
    let peer = key.peer_id();
    let busy = cluster.leaf_with(0, key.clone()).await?;
    let quick = cluster.leaf_with(1, key.clone()).await?;
    let sender = cluster.leaf(2).await?;

    // The busy session's handler holds the message until the test lets it go.
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Mutex::new(released);
    let busy_got_it = Arc::new(AtomicBool::new(false));
    let flag = busy_got_it.clone();
    busy.on_message("note", move |_| {
        flag.store(true, Ordering::SeqCst);
        let _ = released
            .lock()
            .expect("release lock")
            .recv_timeout(Duration::from_secs(60));
    });
    let mut quick_messages = quick.messages().expect("stream");

    let presence = sender
        .lookup(&peer, Consistency::Linearizable)
        .await?
        .expect("attached");
    let mut hosts: Vec<u64> = presence.sessions.iter().map(|s| s.host_node_id).collect();
    hosts.sort_unstable();
    hosts.dedup();
    assert_eq!(
        hosts.len(),
        2,
        "two sessions on two super peers: {presence:?}"
    );

    let started = Instant::now();
    let outcome = sender.send(&peer, "note", b"for both".to_vec()).await?;
    let took = started.elapsed();
    assert!(matches!(outcome, SendOutcome::Delivered), "not queued");
    // The busy session never acknowledges before the delivery timeout (10 s); the quick one's ack settled it.
    assert!(
        took < Duration::from_secs(10),
        "settled by the first acknowledgement, not by the timeout (took {took:?})"
    );
    let message = tokio::time::timeout(Duration::from_secs(30), quick_messages.recv())
        .await?
        .expect("a message");
    assert_eq!(message.payload, b"for both");
    wait::until(
        "the busy session's handler to have it",
        Duration::from_secs(30),
        || {
            let got = busy_got_it.load(Ordering::SeqCst);
            async move { Ok(got.then_some(())) }
        },
    )
    .await?;
    drop(release);

    // One session leaves with a goodbye: the peer stays online on the other, which still gets messages.
    quick.detach().await;
    let presence = wait::until("one session left", Duration::from_secs(30), || async {
        Ok(sender
            .lookup(&peer, Consistency::Linearizable)
            .await?
            .filter(|presence| presence.sessions.len() == 1))
    })
    .await?;
    assert_eq!(presence.status, PresenceStatus::Online as i32);
    busy.close();
    Ok(())
}

/// Past the per-peer limit the oldest session is ended with a reason the app gets from `Leaf::closed`, and the
/// library does not attach again (which would push out another). A session without presence is not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t66_past_the_session_limit_the_oldest_is_ended_with_a_reason() -> anyhow::Result<()> {
    use vesper_proto::validate::MAX_SESSIONS_PER_PEER;
    let cluster = Cluster::start(3, NodeOptions::default()).await?;
    let key = Keypair::generate();
    let peer = key.peer_id();
    let oldest = cluster.leaf_with(0, key.clone()).await?;
    let mut config = cluster.leaf_config(1, key.clone());
    config.claim_presence = false;
    let unlisted = vesper_leafpeer::Leaf::connect(config).await?;
    let mut others = Vec::new();
    for index in 0..MAX_SESSIONS_PER_PEER - 1 {
        others.push(cluster.leaf_with(index % 3, key.clone()).await?);
    }
    let probe = cluster.leaf(2).await?;
    let presence = probe
        .lookup(&peer, Consistency::Linearizable)
        .await?
        .expect("attached");
    assert_eq!(
        presence.sessions.len(),
        MAX_SESSIONS_PER_PEER,
        "the session without presence is not listed"
    );

    others.push(cluster.leaf_with(1, key.clone()).await?);
    let ended = tokio::time::timeout(Duration::from_secs(30), oldest.closed())
        .await
        .map_err(|_| anyhow::anyhow!("the oldest session was not ended"))?;
    match ended {
        Some(LeafError::Superseded(reason)) => {
            assert!(
                reason.contains("oldest"),
                "a reason that says why: {reason}"
            )
        }
        other => panic!("expected a superseded session, got {other:?}"),
    }
    let presence = probe
        .lookup(&peer, Consistency::Linearizable)
        .await?
        .expect("attached");
    assert_eq!(presence.sessions.len(), MAX_SESSIONS_PER_PEER);
    // The others, and the unlisted session, go on.
    assert!(unlisted.lookup(&peer, Consistency::Stale).await?.is_some());
    let sent = probe.send(&peer, "note", b"still here".to_vec()).await?;
    assert!(matches!(sent, SendOutcome::Delivered));
    Ok(())
}

/// A sender's retry of a message id the recipient's session already acknowledged is delivered without being
/// pushed again (a client that does not deduplicate never sees it twice from one session); the raw recipient
/// here acknowledges only what the test tells it to, so a second push would leave the retry unacknowledged and
/// queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t66_a_retried_message_id_is_not_pushed_to_the_recipient_again() -> anyhow::Result<()> {
    use vesper_proto::v1::{
        client_frame, server_frame, ClientFrame, MessageAck, SendMessageRequest,
    };
    use vesper_tests::raw::{self, Signing};
    let cluster = Cluster::start(2, NodeOptions::default()).await?;
    let ca = cluster.pki.ca_pem();
    let recipient_key = Keypair::generate();
    let address = |index: usize| cluster.nodes[index].endpoints().leaf.to_string();
    let mut recipient = raw::open(
        raw::channel(&address(1), &ca).await?,
        &recipient_key,
        Signing::Valid,
    )
    .await?;
    let sender = raw::open(
        raw::channel(&address(0), &ca).await?,
        &Keypair::generate(),
        Signing::Valid,
    )
    .await?;
    let send = |id: &str| {
        let request = SendMessageRequest {
            to: recipient_key.peer_id().to_string(),
            id: id.into(),
            kind: "note".into(),
            payload: id.as_bytes().to_vec(),
            ..Default::default()
        };
        let mut client = sender.client.clone();
        let request = sender.request(request);
        async move {
            client
                .send_message(request)
                .await
                .map(|reply| reply.into_inner())
        }
    };
    async fn next_message(
        session: &mut raw::RawSession,
    ) -> anyhow::Result<vesper_proto::v1::Message> {
        match session.next_frame(Duration::from_secs(20)).await? {
            server_frame::Frame::Message(message) => Ok(message),
            other => anyhow::bail!("unexpected frame {other:?}"),
        }
    }
    async fn acknowledge(session: &raw::RawSession, delivery_id: u64) -> anyhow::Result<()> {
        let ack = client_frame::Frame::MessageAck(MessageAck { delivery_id });
        Ok(session
            .outbound
            .send(ClientFrame { frame: Some(ack) })
            .await?)
    }
    let first = tokio::spawn(send("r1"));
    let pushed = next_message(&mut recipient).await?;
    assert_eq!(pushed.id, "r1");
    acknowledge(&recipient, pushed.delivery_id).await?;
    assert!(first.await??.delivered);
    // The retry: delivered at once, not pushed (nothing would acknowledge a second push).
    let retry = send("r1").await?;
    assert!(retry.delivered && !retry.queued, "{retry:?}");
    // The next message the recipient sees is the next one sent.
    let next = tokio::spawn(send("r2"));
    let pushed = next_message(&mut recipient).await?;
    assert_eq!(pushed.id, "r2", "the retry of r1 was pushed again");
    acknowledge(&recipient, pushed.delivery_id).await?;
    assert!(next.await??.delivered);
    Ok(())
}
