//! The leaf library's message handlers and tasks: a handler that blocks for longer than the session TTL does not
//! silence the session (keepalives go on, the stream and sends go on, nothing re-attaches, each message is
//! handled once), and a leaf that detached or closed leaves no task running.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vesper_leafpeer::{
    Consistency, Keypair, Leaf, LeafConfig, Message, PresenceStatus, SendOutcome, WatchSpec,
};
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::wait;

/// Keepalive interval and session TTL of the super peer in the slow-handler test.
const KEEPALIVE_MS: u64 = 500;
const SESSION_TTL_MS: u64 = 2000;
/// How long the slow handler blocks its thread: longer than the session TTL.
const SLOW_HANDLER: Duration = Duration::from_millis(3000);

async fn next_message(
    stream: &mut tokio::sync::mpsc::Receiver<Message>,
) -> anyhow::Result<Message> {
    wait::next("message", Duration::from_secs(10), stream).await
}

async fn is_online(observer: &Leaf, peer: &vesper_leafpeer::PeerId) -> anyhow::Result<bool> {
    Ok(observer
        .lookup(peer, Consistency::Linearizable)
        .await?
        .is_some_and(|presence| presence.status == PresenceStatus::Online as i32))
}

/// Calls of the slow handler that started and that returned.
#[derive(Default)]
struct Calls {
    started: AtomicUsize,
    finished: AtomicUsize,
}

impl Calls {
    fn running(&self) -> bool {
        self.started.load(Ordering::SeqCst) > self.finished.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t62_a_handler_blocking_past_the_session_ttl_does_not_stall_the_session(
) -> anyhow::Result<()> {
    // Set through the configuration file: the TOML layer, end to end.
    let files = tempfile::tempdir()?;
    let config = files.path().join("superpeer.toml");
    std::fs::write(
        &config,
        format!(
            "keepalive_interval = \"{KEEPALIVE_MS}ms\"\nsession_ttl = \"{SESSION_TTL_MS}ms\"\n"
        ),
    )?;
    let options = NodeOptions {
        extra_args: vec!["--config".into(), config.display().to_string()],
        ..NodeOptions::default()
    };
    let cluster = Cluster::start(1, options).await?;
    let receiver = cluster.leaf(0).await?;
    let sender = cluster.leaf(0).await?;
    let mut stream = receiver.messages().expect("first call gets the stream");
    let calls = Arc::new(Calls::default());
    let counted = calls.clone();
    receiver.on_message("slow", move |_| {
        counted.started.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(SLOW_HANDLER);
        counted.finished.fetch_add(1, Ordering::SeqCst);
    });
    let server = receiver.server();

    // Two slow messages: each send waits for its handler to return.
    let to = receiver.peer_id();
    let slow_sends: Vec<_> = (0..2)
        .map(|n| {
            let sender = sender.clone();
            tokio::spawn(async move { sender.send(&to, "slow", vec![n]).await })
        })
        .collect();
    wait::until(
        "the first slow handler call",
        Duration::from_secs(10),
        || async { Ok((calls.started.load(Ordering::SeqCst) >= 1).then_some(())) },
    )
    .await?;

    // While it blocks, messages for the stream are delivered and arrive.
    for n in 0..5u8 {
        let outcome = sender.send(&to, "fast", vec![n]).await?;
        assert_eq!(outcome, SendOutcome::Delivered, "fast message {n}");
        let message = next_message(&mut stream).await?;
        assert_eq!((message.kind.as_str(), message.payload), ("fast", vec![n]));
    }
    assert!(
        calls.running(),
        "the fast messages arrived while the slow handler ran"
    );

    // The second call starts when the first returned, past the session TTL: the session is still the first one.
    wait::until(
        "the second slow handler call",
        Duration::from_secs(10),
        || async { Ok((calls.started.load(Ordering::SeqCst) >= 2).then_some(())) },
    )
    .await?;
    assert!(is_online(&sender, &to).await?, "the receiver is online");
    let outcome = sender
        .send(&to, "fast", b"during the second".to_vec())
        .await?;
    assert_eq!(outcome, SendOutcome::Delivered);
    assert_eq!(
        next_message(&mut stream).await?.payload,
        b"during the second"
    );
    assert!(calls.running());

    for send in slow_sends {
        assert_eq!(send.await??, SendOutcome::Delivered, "a slow message");
    }
    assert_eq!(calls.finished.load(Ordering::SeqCst), 2);
    assert_eq!(
        calls.started.load(Ordering::SeqCst),
        2,
        "each slow message once"
    );
    assert!(receiver.reattach_times().is_empty(), "no re-attach");
    assert_eq!(receiver.server(), server);
    assert!(is_online(&sender, &to).await?, "the receiver is online");
    Ok(())
}

/// Waits until `leaf` runs no task.
async fn no_task_left(leaf: &Leaf, what: &str) -> anyhow::Result<()> {
    wait::until(what, Duration::from_secs(10), || async {
        let left = leaf.task_count();
        if left == 0 {
            Ok(Some(()))
        } else {
            Err(anyhow::anyhow!("{left} tasks still running"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t62_a_leaf_that_detached_or_closed_leaves_no_task() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, NodeOptions::default()).await?;
    // Tasks of this runtime before any leaf: what is left once the leaves are gone must be back to it.
    let runtime = tokio::runtime::Handle::current().metrics();
    let before = runtime.num_alive_tasks();
    // One leaf publishes its endpoints after attaching (a task of its own); the others do not.
    let mut config = LeafConfig::new(
        cluster.leaf_addrs(),
        cluster.pki.ca_pem(),
        Keypair::generate(),
    );
    config.publish_endpoints = true;
    let publishing = Leaf::connect(config).await?;
    let detaching = cluster.leaf(0).await?;
    let closing = cluster.leaf(0).await?;
    for leaf in [&detaching, &closing] {
        // Busy with a stream message, a handler's kind and a watch before it goes.
        let mut stream = leaf.messages().expect("first call gets the stream");
        let (handled_tx, mut handled_rx) = tokio::sync::mpsc::channel(1);
        leaf.on_message("handled", move |message| {
            let _ = handled_tx.try_send(message);
        });
        let mut watch = leaf
            .watch(WatchSpec {
                peers: vec![publishing.peer_id().to_string()],
                ..WatchSpec::default()
            })
            .await?;
        tokio::time::timeout(Duration::from_secs(10), watch.recv())
            .await?
            .expect("the watch starts");
        publishing
            .send(&leaf.peer_id(), "streamed", b"s".to_vec())
            .await?;
        publishing
            .send(&leaf.peer_id(), "handled", b"h".to_vec())
            .await?;
        assert_eq!(next_message(&mut stream).await?.payload, b"s");
        tokio::time::timeout(Duration::from_secs(10), handled_rx.recv())
            .await?
            .expect("handled");
        // The session, its keepalives, the dispatcher and the handler's lane at least.
        assert!(leaf.task_count() >= 4, "{} tasks", leaf.task_count());
    }

    detaching.detach().await;
    no_task_left(&detaching, "no task of the detached leaf").await?;
    closing.close();
    no_task_left(&closing, "no task of the closed leaf").await?;
    publishing.detach().await;
    no_task_left(&publishing, "no task of the publishing leaf").await?;

    // By the runtime's own count, which also sees tasks spawned outside the leaves' trackers: with the handles
    // dropped (and their gRPC channels with them), nothing of the leaves is left.
    drop((detaching, closing, publishing));
    wait::until(
        "the runtime's task count back to before the leaves",
        Duration::from_secs(10),
        || async {
            let alive = runtime.num_alive_tasks();
            if alive <= before {
                Ok(Some(()))
            } else {
                Err(anyhow::anyhow!(
                    "{alive} tasks alive, {before} before the leaves"
                ))
            }
        },
    )
    .await?;
    Ok(())
}
