//! The whole cluster restarts (SIGKILL, no goodbye) and every acknowledged record is still there.

use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::load::{self, Load};
use vesper_tests::wait;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_full_cluster_restart_keeps_every_acknowledged_record() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, NodeOptions::default()).await?;
    let mut leaves = Vec::new();
    for index in 0..3 {
        leaves.push(cluster.leaf(index).await?);
    }
    let load = Load::start(leaves, "restart", "r");
    wait::until(
        "300 acknowledged writes",
        std::time::Duration::from_secs(60),
        || async { Ok((load.acknowledged() >= 300).then_some(())) },
    )
    .await?;
    // Kill every node while writes are in flight: only fsynced, acknowledged writes must survive.
    for index in 0..3 {
        cluster.kill(index);
    }
    let report = load.stop().await;
    for index in 0..3 {
        cluster.restart(index).await?;
    }
    cluster.wait_leader().await?;
    for index in 0..3 {
        let reader = cluster.leaf(index).await?;
        load::verify(&reader, "restart", &report.acknowledged).await?;
    }
    println!(
        "{} acknowledged records survived a full-cluster SIGKILL",
        report.acknowledged.len()
    );
    Ok(())
}
