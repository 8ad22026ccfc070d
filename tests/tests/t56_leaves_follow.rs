//! Leaves follow the cluster's members: a standby added to a one-voter cluster draws about half of the leaves
//! (each leaf moves with probability added / serving, at a random time within the spread), and when that
//! standby is removed every leaf on it moves back. A watcher of every leaf sees none of them go offline: a
//! moving leaf attaches its new session before it says goodbye on the old one.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Context};
use vesper_leafpeer::{Keypair, Leaf, PresenceStatus, WatchItem, WatchSpec};
use vesper_proto::v1::watch_event;
use vesper_tests::cluster::{Cluster, NodeOptions, Start};
use vesper_tests::wait;

const LEAVES: usize = 24;
/// The super peers spread moves over 10 s; this leaves room for a loaded 2-core machine.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Drains the watch stream and fails on any leaf shown offline.
fn no_offline(
    stream: &mut tokio::sync::mpsc::Receiver<WatchItem>,
    seen: &mut usize,
) -> anyhow::Result<()> {
    while let Ok(item) = stream.try_recv() {
        if let WatchItem::Event(event) = item {
            if let Some(watch_event::Change::Presence(presence)) = event.change {
                *seen += 1;
                ensure!(
                    presence.status != PresenceStatus::Offline as i32,
                    "{} showed offline while moving",
                    presence.peer_id
                );
            }
        }
    }
    Ok(())
}

fn on(leaves: &[Leaf], address: &str) -> usize {
    leaves
        .iter()
        .filter(|leaf| leaf.server() == address)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t56_leaves_spread_onto_an_added_member_and_leave_a_removed_one_without_going_offline(
) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(1, NodeOptions::default()).await?;
    let first = cluster.nodes[0].endpoints().leaf.to_string();
    let mut leaves = Vec::new();
    for _ in 0..LEAVES {
        leaves.push(cluster.leaf_with(0, Keypair::generate()).await?);
    }
    let watcher = cluster.leaf(0).await?;
    let mut stream = watcher
        .watch(WatchSpec {
            peers: leaves
                .iter()
                .map(|leaf| leaf.peer_id().to_string())
                .collect(),
            ..WatchSpec::default()
        })
        .await?;
    let mut events = 0;

    // A standby joins: about half of the leaves move to it.
    let newcomer = cluster.add_node(Start::Idle).await?;
    let newcomer_leaf = cluster.nodes[newcomer].endpoints().leaf.to_string();
    let added = cluster.vesperctl_json(
        0,
        &[
            "add-standby",
            &cluster.nodes[newcomer].endpoints().cluster.to_string(),
        ],
    )?;
    let new_id = added["members"][0]["node_id"]
        .as_u64()
        .context("node id of the newcomer")?;
    // Wait until the moves have settled: some leaves there, and no change for three seconds.
    let mut last = (usize::MAX, tokio::time::Instant::now());
    let moved = wait::until("the leaves spread onto the new member", TIMEOUT, || {
        let count = on(&leaves, &newcomer_leaf);
        if count != last.0 {
            last = (count, tokio::time::Instant::now());
        }
        let settled = count > 0 && last.1.elapsed() >= Duration::from_secs(3);
        async move { Ok(settled.then_some(count)) }
    })
    .await?;
    no_offline(&mut stream, &mut events)?;
    // Half of 24 is expected; fewer than 3 or more than 21 is a one-in-ten-thousand draw, or a bug.
    ensure!(
        (3..=21).contains(&moved),
        "{moved} of {LEAVES} moved to the added member"
    );
    ensure!(
        on(&leaves, &first) + moved == LEAVES,
        "every leaf is attached somewhere"
    );
    // A moved leaf learnt both members and works there.
    let mover = leaves
        .iter()
        .find(|leaf| leaf.server() == newcomer_leaf)
        .context("a moved leaf")?;
    ensure!(
        mover.known_super_peers().contains(&first),
        "{:?}",
        mover.known_super_peers()
    );
    mover
        .set_presence(PresenceStatus::Away, "moved", Default::default())
        .await?;

    // The standby is removed: every leaf on it moves back, still without going offline.
    cluster.vesperctl_json(0, &["remove", &new_id.to_string()])?;
    wait::until("every leaf back on the remaining member", TIMEOUT, || {
        let back = on(&leaves, &first);
        async move { Ok((back == LEAVES).then_some(())) }
    })
    .await
    .with_context(|| {
        format!(
            "{} still on the removed member",
            on(&leaves, &newcomer_leaf)
        )
    })?;
    // The moves' goodbyes and attaches are applied; give the watcher what it has, then check.
    let online = wait::until("every leaf shown online", TIMEOUT, || async {
        let mut online = HashSet::new();
        for leaf in &leaves {
            let presence = watcher
                .lookup(&leaf.peer_id(), vesper_leafpeer::Consistency::Linearizable)
                .await?;
            if presence.is_some_and(|presence| presence.status != PresenceStatus::Offline as i32) {
                online.insert(leaf.peer_id().to_string());
            }
        }
        Ok((online.len() == LEAVES).then_some(online.len()))
    })
    .await?;
    no_offline(&mut stream, &mut events)?;
    ensure!(
        events > 0,
        "the watcher saw the moved leaf's presence change"
    );
    eprintln!(
        "{moved} of {LEAVES} leaves moved onto the added member; {online} online after its removal"
    );
    Ok(())
}
