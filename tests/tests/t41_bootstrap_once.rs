//! A cluster is bootstrapped exactly once, and never twice: every node starts the same way (a join list and a
//! cluster name), `vesperctl init` makes one of them the first voter and is idempotent afterwards, a node that
//! sees a member of a cluster refuses to start a second one, a node configured for another cluster is refused
//! by the members and refuses another cluster's data directory without touching it, a node restarted with its
//! data resumes under its id, and one whose data was lost joins again under a new id.

use std::time::Duration;

use anyhow::{ensure, Context};
use vesper_proto::v1::MemberRole;
use vesper_tests::cluster::{Cluster, NodeOptions, Start};
use vesper_tests::wait;

/// Room for a loaded 2-core machine.
const TIMEOUT: Duration = Duration::from_secs(60);
const NAME: &str = "t41-cluster";

fn named(name: &str) -> Vec<String> {
    vec!["--cluster-name".into(), name.into()]
}

/// The node ids of the members the node at `index` lists as not removed.
async fn live_ids(cluster: &Cluster, index: usize) -> anyhow::Result<Vec<u64>> {
    let status = cluster.status_of(index).await?;
    Ok(status
        .members
        .iter()
        .filter(|member| member.role != MemberRole::Removed as i32)
        .map(|member| member.node_id)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t41_init_bootstraps_once_and_every_other_start_joins_or_resumes() -> anyhow::Result<()> {
    let mut cluster = Cluster::new(NodeOptions::default())?;
    // Pod 0's join list names nobody reachable yet (the other pods do not run): it waits to be initialised.
    cluster.set_node_args(0, named(NAME));
    cluster.add_node(Start::Join("127.0.0.1:1".into())).await?;
    let first = cluster.nodes[0].endpoints().cluster.to_string();
    wait::until("node 0 to try its join list", TIMEOUT, || async {
        Ok(cluster
            .log_text(0)
            .contains("no member of the join list took this node yet")
            .then_some(()))
    })
    .await?;

    let init = cluster.vesperctl_json(0, &["init", "--wait", "30s"])?;
    ensure!(init["outcome"] == "bootstrapped", "first init: {init}");
    ensure!(init["node_id"] == 1, "the first voter is node 1: {init}");

    // The others start the same way and join it; their lists include nodes that are not up yet.
    cluster.set_node_args(1, named(NAME));
    cluster.add_node(Start::Join(first.clone())).await?;
    let second = cluster.nodes[1].endpoints().cluster.to_string();
    cluster.set_node_args(2, named(NAME));
    cluster
        .add_node(Start::Join(format!("127.0.0.1:1,{first},{second}")))
        .await?;
    wait::until("three members", TIMEOUT, || async {
        Ok((live_ids(&cluster, 0).await.unwrap_or_default().len() == 3).then_some(()))
    })
    .await?;

    // Init again, on the first node and on a joined one: nothing happens, and it says so.
    for index in [0, 2] {
        let again = cluster.vesperctl_json(index, &["init"])?;
        ensure!(
            again["outcome"] == "already_member",
            "init on a member: {again}"
        );
        ensure!(
            again["detail"]
                .as_str()
                .is_some_and(|detail| detail.contains("nothing was done")),
            "{again}"
        );
    }
    ensure!(live_ids(&cluster, 0).await?.len() == 3);

    // A node configured for another cluster: the members refuse its join, and init will not start a second
    // cluster beside the one its list names.
    cluster.set_node_args(3, named("another-cluster"));
    cluster.add_node(Start::Join(first.clone())).await?;
    wait::until("the members to refuse the stranger", TIMEOUT, || async {
        Ok(cluster
            .log_text(3)
            .contains(&format!("this member belongs to cluster {NAME:?}"))
            .then_some(()))
    })
    .await?;
    let refused = cluster.vesperctl_json(3, &["init"])?;
    ensure!(
        refused["outcome"] == "cluster_exists",
        "init beside an existing cluster: {refused}"
    );
    ensure!(
        refused["detail"]
            .as_str()
            .is_some_and(|detail| detail.contains("is node 1 of a cluster")),
        "{refused}"
    );
    ensure!(
        !cluster.root().join("sp4/node_id").exists(),
        "the stranger got a node id"
    );
    cluster.kill(3);
    ensure!(live_ids(&cluster, 0).await?.len() == 3);

    // Node 1 restarted with another cluster's name: it refuses its own data directory, which stays as it was.
    let id_file = cluster.root().join("sp2/node_id");
    let id_before = std::fs::read_to_string(&id_file)?;
    cluster.stop(1).await?;
    cluster.set_node_args(1, named("another-cluster"));
    let error = cluster
        .restart(1)
        .await
        .err()
        .context("node 1 started with another cluster's name")?;
    let text = format!("{error:#}");
    ensure!(
        text.contains(&format!("belongs to cluster {NAME:?}"))
            && text.contains("configured for cluster \"another-cluster\""),
        "the refusal does not say why: {text}"
    );
    ensure!(std::fs::read_to_string(&id_file)? == id_before);
    // With its own name it resumes under the same id.
    cluster.set_node_args(1, named(NAME));
    cluster.restart(1).await?;
    let id: u64 = id_before.trim().parse()?;
    wait::until("node 1 back under its id", TIMEOUT, || async {
        Ok(cluster
            .status_of(1)
            .await
            .is_ok_and(|status| status.node_id == id && status.leader_id != 0)
            .then_some(()))
    })
    .await?;
    ensure!(cluster.log_text(1).contains("resuming as a cluster member"));

    // Node 2 loses its volume: it joins again as a new node with a fresh id, in the same cluster.
    let old_id = cluster.status_of(2).await?.node_id;
    cluster.stop(2).await?;
    std::fs::remove_dir_all(cluster.root().join("sp3"))?;
    cluster.restart(2).await?;
    let new_id = wait::until("node 2 in again under a new id", TIMEOUT, || async {
        let Ok(status) = cluster.status_of(2).await else {
            return Ok(None);
        };
        Ok((status.node_id != 0 && status.leader_id != 0).then_some(status.node_id))
    })
    .await?;
    ensure!(
        new_id != old_id && new_id > 3,
        "a node that lost its data got id {new_id} (was {old_id}); ids are never reused"
    );
    let seen_by_first = live_ids(&cluster, 0).await?;
    ensure!(
        seen_by_first.contains(&new_id),
        "the first node does not list {new_id}: {seen_by_first:?}"
    );
    let leader_of = |status: vesper_proto::v1::StatusResponse| status.leader_id;
    ensure!(
        leader_of(cluster.status_of(2).await?) == leader_of(cluster.status_of(0).await?),
        "node 2 follows another leader: a second cluster"
    );
    println!(
        "bootstrapped once; init answered already_member twice and cluster_exists once; node {old_id} came back as node {new_id}"
    );
    Ok(())
}
