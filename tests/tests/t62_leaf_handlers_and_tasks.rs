//! The leaf library's message handlers and tasks: a handler that blocks for longer than the session TTL does not
//! silence the session (keepalives go on, the stream and sends go on, nothing re-attaches, each message is
//! handled once), and a leaf that detached or closed leaves no task running.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vesper_leafpeer::{Consistency, Leaf, Message, PresenceStatus, SendOutcome};
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
    tokio::time::timeout(Duration::from_secs(10), stream.recv())
        .await
        .map_err(|_| anyhow::anyhow!("no message within 10 s"))?
        .ok_or_else(|| anyhow::anyhow!("message stream ended"))
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
    // The keepalive interval has no flag; the configuration file sets it.
    let files = tempfile::tempdir()?;
    let config = files.path().join("superpeer.toml");
    std::fs::write(
        &config,
        format!("keepalive_interval_ms = {KEEPALIVE_MS}\nsession_ttl_ms = {SESSION_TTL_MS}\n"),
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
