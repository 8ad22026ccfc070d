//! SIGTERM drains a super peer before it stops: a leader given SIGTERM under write load hands leadership to
//! another voter before it exits, so the next write succeeds long before an election timeout would have let
//! one through; its leaves move to the other members without ever showing offline; no acknowledged write is
//! lost; and membership is unchanged (the stopped node is still a voter, and resumes as one).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use vesper_leafpeer::{Keypair, PresenceStatus, WatchItem, WatchSpec};
use vesper_proto::v1::watch_event;
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::load::{self, Load};
use vesper_tests::wait;

const LEAVES: usize = 6;
/// Room for a loaded 2-core machine.
const TIMEOUT: Duration = Duration::from_secs(60);
/// The drain each node is given: its leaves then move within half of it.
const DRAIN: &str = "6s";
/// Writes must resume before a leader lost without a handover could let them: followers wait at least the
/// election timeout's minimum (1 s by default) after the last heartbeat before they elect another (t20
/// measures about 3.5 s after a SIGKILL). A handover takes tens of milliseconds; the figure is printed.
const RESUME_BOUND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t21_a_leader_given_sigterm_hands_over_moves_its_leaves_and_loses_nothing(
) -> anyhow::Result<()> {
    let options = NodeOptions {
        extra_args: vec!["--drain-timeout".into(), DRAIN.into()],
        ..NodeOptions::default()
    };
    let mut cluster = Cluster::start(3, options).await?;
    let leader = cluster.wait_leader().await?;
    let leader_leaf = cluster.nodes[leader].endpoints().leaf.to_string();
    let followers: Vec<usize> = (0..3).filter(|&index| index != leader).collect();
    let leader_id = {
        let status = cluster.status_of(leader).await?;
        cluster
            .node_id_in(&status, leader)
            .context("the leader's node id")?
    };

    // Leaves on the leader, watched from a follower.
    let mut leaves = Vec::new();
    for _ in 0..LEAVES {
        leaves.push(cluster.leaf_with(leader, Keypair::generate()).await?);
    }
    let watcher = cluster.leaf(followers[0]).await?;
    let mut stream = watcher
        .watch(WatchSpec {
            peers: leaves
                .iter()
                .map(|leaf| leaf.peer_id().to_string())
                .collect(),
            ..WatchSpec::default()
        })
        .await?;
    // Writers on the followers: their writes go through whichever node leads.
    let mut writers = Vec::new();
    for &index in followers.iter().chain(followers.iter()) {
        writers.push(cluster.leaf(index).await?);
    }
    let load = Load::start(writers, "drain", "w");
    wait::until(
        "200 acknowledged writes before the stop",
        TIMEOUT,
        || async { Ok((load.acknowledged() >= 200).then_some(())) },
    )
    .await?;

    let signalled = Instant::now();
    let (stopped, first_write) = tokio::join!(cluster.stop(leader), async {
        wait::until("a write acknowledged after SIGTERM", TIMEOUT, || async {
            Ok(load.first_ack_after(signalled))
        })
        .await
    });
    stopped.context("the leader exits cleanly after SIGTERM")?;
    let exited = Instant::now();
    let first_write = first_write?;
    let acked_at_exit = load.acknowledged();
    wait::until("200 more acknowledged writes", TIMEOUT, || async {
        Ok((load.acknowledged() >= acked_at_exit + 200).then_some(()))
    })
    .await?;
    let report = load.stop().await;
    let resumed = first_write.saturating_duration_since(signalled);
    let longest_gap = report.longest_gap(signalled, exited);
    println!(
        "SIGTERM to the first acknowledged write: {} ms; longest stretch without one until the exit: {} ms; \
         the node took {} ms to exit; {} writes acknowledged, {} attempts failed",
        resumed.as_millis(),
        longest_gap.as_millis(),
        exited.duration_since(signalled).as_millis(),
        report.acknowledged.len(),
        report.failures.len()
    );
    for (at, error) in report.failures.iter().take(5) {
        println!(
            "  failed attempt {} ms after SIGTERM: {error}",
            at.saturating_duration_since(signalled).as_millis()
        );
    }
    ensure!(
        resumed < RESUME_BOUND,
        "writes resumed only {resumed:?} after SIGTERM (bound {RESUME_BOUND:?})"
    );

    // It handed over before it went, and every leaf had left it.
    let log = cluster.log_text(leader);
    ensure!(
        log.contains("handed leadership over"),
        "the stopped leader's log does not say it handed leadership over"
    );
    let drained = log
        .lines()
        .find(|line| line.contains(" drained"))
        .context("the stopped node's log has no \"drained\" line")?;
    ensure!(
        drained.contains("sessions_left=0"),
        "leaves were still attached when the drain ended: {drained}"
    );
    for leaf in &leaves {
        ensure!(
            leaf.server() != leader_leaf,
            "{} is still on the stopped node",
            leaf.peer_id()
        );
    }
    let mut presence_events = 0;
    while let Ok(item) = stream.try_recv() {
        if let WatchItem::Event(event) = item {
            if let Some(watch_event::Change::Presence(presence)) = event.change {
                presence_events += 1;
                ensure!(
                    presence.status != PresenceStatus::Offline as i32,
                    "{} showed offline while its super peer drained",
                    presence.peer_id
                );
            }
        }
    }
    for leaf in &leaves {
        let presence = watcher
            .lookup(&leaf.peer_id(), vesper_leafpeer::Consistency::Linearizable)
            .await?;
        ensure!(
            presence.is_some_and(|presence| presence.status == PresenceStatus::Online as i32),
            "{} is not online after the drain",
            leaf.peer_id()
        );
    }
    println!("{LEAVES} leaves moved off the stopped leader; the watcher saw {presence_events} presence events, none offline");

    // Nothing acknowledged is lost, and membership did not change: the node is still a voter.
    let new_leader = cluster.wait_leader().await?;
    ensure!(new_leader != leader, "the stopped node cannot lead");
    let reader = cluster.leaf(followers[0]).await?;
    load::verify(&reader, "drain", &report.acknowledged).await?;
    let status = cluster.status_of(new_leader).await?;
    let member = status
        .members
        .iter()
        .find(|member| member.node_id == leader_id)
        .context("the stopped node is no longer listed")?;
    ensure!(
        member.role == vesper_proto::v1::MemberRole::Voter as i32,
        "SIGTERM changed the stopped node's role: {member:?}"
    );

    // It comes back as the same voter and serves the same data.
    cluster.restart(leader).await?;
    cluster.wait_applied(leader, status.applied_index).await?;
    let returning = cluster.leaf(leader).await?;
    load::verify(&returning, "drain", &report.acknowledged).await?;
    Ok(())
}
