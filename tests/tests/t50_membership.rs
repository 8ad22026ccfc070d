//! Membership changes with `vesperctl` under write load: add a standby, promote it, demote and then remove
//! another voter. No write fails, nothing acknowledged is lost, and node ids are never reused.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use serde_json::Value;
use vesper_tests::cluster::{Cluster, NodeOptions, Start};
use vesper_tests::load::{self, Load};
use vesper_tests::wait;

fn vesperctl(cluster: &Cluster, admin_node: usize, args: &[&str]) -> anyhow::Result<Value> {
    let output = cluster.vesperctl(admin_node, &[args, &["--json"]].concat())?;
    ensure!(
        output.status.success(),
        "vesperctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "vesperctl {args:?} printed no JSON: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn role_of(members: &Value, node_id: u64) -> Option<String> {
    members["members"]
        .as_array()?
        .iter()
        .find(|member| member["node_id"] == node_id)
        .map(|member| member["role"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_add_promote_demote_remove_under_load() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, NodeOptions::default()).await?;
    let leader = cluster.wait_leader().await?;
    let status = cluster.status_of(leader).await?;
    // The voter to retire: a follower. Writers attach to the other two nodes.
    let victim = (0..3).find(|&index| index != leader).expect("a follower");
    let victim_id = status
        .members
        .iter()
        .find(|member| member.cluster_addr == cluster.nodes[victim].endpoints().cluster.to_string())
        .expect("victim is a member")
        .node_id;
    let mut leaves = Vec::new();
    for index in (0..3).filter(|&index| index != victim) {
        leaves.push(cluster.leaf(index).await?);
    }
    let load = Load::start(leaves, "membership", "m");

    // A fourth node, started idle, is added by the operator.
    let newcomer = cluster.add_node(Start::Idle).await?;
    let newcomer_addr = cluster.nodes[newcomer].endpoints().cluster.to_string();
    let added = vesperctl(&cluster, victim, &["add-standby", &newcomer_addr])?;
    let new_id = added["members"][0]["node_id"]
        .as_u64()
        .context("node id of the newcomer")?;
    assert_eq!(new_id, 4, "ids are allocated in order: {added}");
    let applied = cluster.status_of(leader).await?.applied_index;
    cluster.wait_applied(newcomer, applied).await?;

    let promoted = vesperctl(&cluster, newcomer, &["promote", &new_id.to_string()])?;
    assert_eq!(
        role_of(&promoted, new_id).as_deref(),
        Some("voter"),
        "{promoted}"
    );
    let demoted = vesperctl(&cluster, leader, &["demote", &victim_id.to_string()])?;
    assert_eq!(
        role_of(&demoted, victim_id).as_deref(),
        Some("standby"),
        "{demoted}"
    );
    // A voter cannot be removed without demotion; the victim now can.
    let removed = vesperctl(&cluster, leader, &["remove", &victim_id.to_string()])?;
    assert_eq!(
        role_of(&removed, victim_id).as_deref(),
        Some("removed"),
        "{removed}"
    );

    // Leadership moves to the newcomer on request, and writes go on through the change.
    let transferred = vesperctl(&cluster, victim, &["transfer-leader", &new_id.to_string()])?;
    assert_eq!(
        transferred["leader_id"].as_u64(),
        Some(new_id),
        "{transferred}"
    );
    let status = cluster.status_of(newcomer).await?;
    assert_eq!(status.raft_state, "leader", "{status:?}");

    let members = vesperctl(&cluster, newcomer, &["members"])?;
    let voters = members["members"]
        .as_array()
        .context("members")?
        .iter()
        .filter(|member| member["role"] == "voter")
        .count();
    assert_eq!(voters, 3, "{members}");
    let before = load.acknowledged();
    wait::until(
        "writes to go on after the changes",
        Duration::from_secs(60),
        || async { Ok((load.acknowledged() >= before + 50).then_some(())) },
    )
    .await?;
    let report = load.stop().await;
    assert!(
        report.failures.is_empty(),
        "writes failed during membership changes: {:?}",
        report
            .failures
            .iter()
            .map(|(_, error)| error)
            .collect::<Vec<_>>()
    );
    let reader = cluster.leaf(newcomer).await?;
    load::verify(&reader, "membership", &report.acknowledged).await?;

    // A removed node's id is never handed out again.
    let fifth = cluster.add_node(Start::Idle).await?;
    let fifth_addr = cluster.nodes[fifth].endpoints().cluster.to_string();
    let added = vesperctl(&cluster, leader, &["add-standby", &fifth_addr])?;
    assert_eq!(added["members"][0]["node_id"].as_u64(), Some(5), "{added}");

    // Wrong requests get clear errors.
    let (cert, key) = cluster.pki.operator_cert();
    let output = Command::new(vesper_tests::binary("vesperctl"))
        .args([
            "--server",
            &cluster.nodes[leader].endpoints().admin.to_string(),
        ])
        .arg("--ca")
        .arg(cluster.pki.ca_cert())
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["remove", &new_id.to_string()])
        .output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is a voter; demote it first"), "{stderr}");
    println!(
        "{} writes acknowledged across add/promote/demote/remove",
        report.acknowledged.len()
    );
    Ok(())
}
