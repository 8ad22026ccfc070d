//! Losing the leader loses nothing: SIGKILL the leader under a steady write load; a new leader is elected, writes
//! resume, and every acknowledged write is still there.

use std::time::{Duration, Instant};

use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::load::{self, Load};
use vesper_tests::wait;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_leader_kill_under_load_loses_no_acknowledged_write() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, NodeOptions::default()).await?;
    let leader = cluster.wait_leader().await?;
    let followers: Vec<usize> = (0..3).filter(|&index| index != leader).collect();
    // Writers attach to the followers (a leaf of the killed node would lose its session; leaf failover is a
    // later feature), two per follower.
    let mut leaves = Vec::new();
    for &index in followers.iter().chain(followers.iter()) {
        leaves.push(cluster.leaf(index).await?);
    }
    let load = Load::start(leaves, "failover", "w");
    wait::until(
        "200 acknowledged writes before the kill",
        Duration::from_secs(60),
        || async { Ok((load.acknowledged() >= 200).then_some(())) },
    )
    .await?;

    let killed_at = Instant::now();
    cluster.kill(leader);
    let first_write = wait::until(
        "a write acknowledged after the kill",
        Duration::from_secs(60),
        || async { Ok(load.first_ack_after(killed_at)) },
    )
    .await?;
    let recovery = first_write - killed_at;
    let acked_at_kill = load.acknowledged();
    wait::until(
        "200 more acknowledged writes",
        Duration::from_secs(60),
        || async { Ok((load.acknowledged() >= acked_at_kill + 200).then_some(())) },
    )
    .await?;
    let report = load.stop().await;
    println!(
        "kill-to-first-successful-write: {} ms ({} writes acknowledged, {} attempts failed during the failover)",
        recovery.as_millis(),
        report.acknowledged.len(),
        report.failures.len()
    );
    for (at, error) in report.failures.iter().take(5) {
        println!(
            "  failed attempt {} ms after the kill: {error}",
            at.saturating_duration_since(killed_at).as_millis()
        );
    }
    let new_leader = cluster.wait_leader().await?;
    assert_ne!(new_leader, leader);
    let reader = cluster.leaf(followers[0]).await?;
    load::verify(&reader, "failover", &report.acknowledged).await?;

    // The killed node comes back, catches up and serves the same data.
    cluster.restart(leader).await?;
    let status = cluster.status_of(new_leader).await?;
    cluster.wait_applied(leader, status.applied_index).await?;
    let returning = cluster.leaf(leader).await?;
    load::verify(&returning, "failover", &report.acknowledged).await?;
    Ok(())
}
