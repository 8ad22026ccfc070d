//! A mailbox message the recipient acknowledged does not come again, however quickly it leaves and attaches
//! somewhere else, even as a new process (a new library instance that remembers nothing).
//!
//! The nodes run inside the test process (`common::launcher`).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use vesper_leafpeer::{Keypair, SendOutcome};
use vesper_tests::cluster::{Cluster, NodeOptions};

/// Rounds of: a message queued while the recipient is away; the recipient attaches (alternating super peers),
/// takes it, says goodbye at once.
const ROUNDS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t64_acknowledged_mailbox_messages_never_come_again_on_a_quick_reattach(
) -> anyhow::Result<()> {
    let cluster = Cluster::start_in_process(common::launcher(), 2, NodeOptions::default()).await?;
    let alice = cluster.leaf(0).await?;
    let bob_key = Keypair::generate();
    let bob = bob_key.peer_id();
    let mut seen = BTreeSet::new();
    for round in 0..ROUNDS {
        let payload = format!("round {round}").into_bytes();
        let outcome = alice.send(&bob, "note", payload.clone()).await?;
        assert_eq!(outcome, SendOutcome::Queued, "round {round}: bob is away");
        // A new library instance each round, as a restarted app: only the super peers can keep it from
        // seeing a message twice.
        let leaf = cluster
            .leaf_with(
                round % 2,
                Keypair::from_secret_bytes(bob_key.secret_bytes()),
            )
            .await?;
        let mut inbox = leaf.messages().expect("the message stream");
        let mut got = Vec::new();
        // The new message comes; anything acknowledged in an earlier round would come before it (the mailbox
        // drains in order).
        loop {
            let message = tokio::time::timeout(Duration::from_secs(20), inbox.recv())
                .await
                .map_err(|_| anyhow::anyhow!("round {round}: no message within 20 s"))?
                .ok_or_else(|| anyhow::anyhow!("round {round}: the message stream ended"))?;
            got.push(String::from_utf8_lossy(&message.payload).into_owned());
            if message.payload == payload {
                break;
            }
        }
        assert_eq!(
            got,
            [format!("round {round}")],
            "round {round}: messages acknowledged in earlier rounds came again"
        );
        assert!(seen.insert(got.remove(0)));
        leaf.detach().await;
    }
    assert_eq!(seen.len(), ROUNDS);
    Ok(())
}
