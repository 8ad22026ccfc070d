//! A member that misses more than the log keeps catches up by snapshot: stop it, write until the leader has
//! snapshotted and purged past its position, restart it, and it serves the same data.

use std::collections::BTreeMap;
use std::time::Duration;

use vesper_leafpeer::Consistency;
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::{load, wait};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_stopped_member_catches_up_by_snapshot_after_log_purge() -> anyhow::Result<()> {
    let options = NodeOptions {
        snapshot_after_logs: Some(100),
        logs_kept_after_snapshot: Some(10),
        ..NodeOptions::default()
    };
    let mut cluster = Cluster::start(3, options).await?;
    let leader = cluster.wait_leader().await?;
    let lagging = (0..3).find(|&index| index != leader).expect("a follower");
    let writer_node = (0..3)
        .find(|&index| index != leader && index != lagging)
        .expect("another follower");
    let position = cluster.status_of(lagging).await?.applied_index;
    cluster.stop(lagging).await?;

    let writer = cluster.leaf(writer_node).await?;
    let mut written = BTreeMap::new();
    for n in 0..400 {
        let key = format!("k{n:04}");
        let value = format!("v{n}").into_bytes();
        writer
            .put("snap", &key, Default::default(), value.clone(), None)
            .await?;
        written.insert(key, value);
    }
    // The log the stopped member would need is gone from the leader.
    let purged = wait::until(
        "the leader to purge its log",
        Duration::from_secs(60),
        || async {
            let status = cluster.status_of(leader).await?;
            Ok((status.purged_index > position + 1).then_some(status))
        },
    )
    .await?;
    assert!(purged.snapshot_index > position);

    cluster.restart(lagging).await?;
    let caught_up = cluster.wait_applied(lagging, purged.applied_index).await?;
    assert!(
        caught_up.snapshot_index >= purged.purged_index,
        "the member should have installed a snapshot: {caught_up:?}"
    );
    let installed = std::fs::read_to_string(cluster.log_path(lagging))?;
    assert!(
        installed.contains("installing snapshot"),
        "no snapshot install in the member's log"
    );

    // Served from the member's own replica.
    let reader = cluster.leaf(lagging).await?;
    let mut token = None;
    let mut seen = BTreeMap::new();
    loop {
        let page = reader
            .list("snap", "", 1000, token, Consistency::Stale)
            .await?;
        for record in page.records {
            seen.insert(record.key, record.value);
        }
        match page.next_page_token {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, written);
    load::verify(&reader, "snap", &written).await?;
    Ok(())
}
