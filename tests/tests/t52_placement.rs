//! The placement controller with real `superpeer` processes and shortened timers (set by flags, never by
//! sleeping): a SIGKILLed voter is replaced by a ready standby and later retired, under a steady write load that
//! loses nothing; two voters of five lost one after the other; a leader whose other members all froze
//! (SIGSTOP) changes nothing and says why; an automatic five keeps its voters through one lost member; `pause` stops every change until `resume`; a manual demote is
//! respected, and targets are set and refused through `vesperctl placement`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use serde_json::Value;
use vesper_proto::v1::{MemberRole, StatusResponse};
use vesper_tests::cluster::{Cluster, NodeOptions, Start};
use vesper_tests::load::{self, Load};
use vesper_tests::wait;

/// How long the controller gets to restore the voters after a kill: dead after 3 s, a round every 300 ms, a
/// joint change to commit; generous for a loaded 2-core machine.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

fn options() -> NodeOptions {
    NodeOptions {
        extra_args: [
            "--placement-update-interval",
            "100ms",
            "--placement-reconcile-interval",
            "300ms",
            "--placement-stabilization",
            "1500ms",
            "--placement-dead-voter-after",
            "3s",
            "--placement-dead-standby-after",
            "6s",
        ]
        .map(String::from)
        .to_vec(),
        ..NodeOptions::default()
    }
}

fn vesperctl(cluster: &Cluster, node: usize, args: &[&str]) -> anyhow::Result<Value> {
    cluster.vesperctl_json(node, args)
}

fn voters(status: &StatusResponse) -> BTreeSet<u64> {
    status
        .members
        .iter()
        .filter(|member| member.role == MemberRole::Voter as i32)
        .map(|member| member.node_id)
        .collect()
}

fn role(status: &StatusResponse, node_id: u64) -> Option<MemberRole> {
    status
        .members
        .iter()
        .find(|member| member.node_id == node_id)
        .and_then(|member| MemberRole::try_from(member.role).ok())
}

/// Waits until a running node that knows a leader reports a status for which `accept` holds.
async fn wait_status(
    cluster: &mut Cluster,
    what: &str,
    accept: impl Fn(&StatusResponse) -> bool,
) -> anyhow::Result<StatusResponse> {
    cluster.wait_status(what, RESTORE_TIMEOUT, accept).await
}

/// A cluster of `voters` voters and `standbys` standbys that joined.
async fn cluster_of(
    voters: usize,
    standbys: usize,
    options: NodeOptions,
) -> anyhow::Result<Cluster> {
    let mut cluster = Cluster::start(voters, options).await?;
    let seed = cluster.nodes[0].endpoints().cluster.to_string();
    for _ in 0..standbys {
        cluster.add_node(Start::Join(seed.clone())).await?;
    }
    cluster.wait_members(voters + standbys, voters).await?;
    // Every node has told the controller which certificate it presents (what a retirement revokes).
    wait::until("every certificate reported", RESTORE_TIMEOUT, || async {
        let placement = vesperctl(&cluster, 0, &["placement", "status"])?;
        let members = members_of(&placement);
        let reported = members.len() == voters + standbys
            && members
                .iter()
                .all(|member| member["certificate"].is_string());
        Ok(reported.then_some(()))
    })
    .await?;
    Ok(cluster)
}

/// A cluster of `voters` voters and `standbys` standbys that joined, sharing one certificate.
async fn cluster_with(voters: usize, standbys: usize) -> anyhow::Result<Cluster> {
    cluster_of(voters, standbys, options()).await
}

/// The members `placement status` lists.
fn members_of(placement: &Value) -> Vec<Value> {
    placement["members"].as_array().cloned().unwrap_or_default()
}

/// Whether the controller counts `member` (a row of `placement status`) as live.
fn is_live(member: &Value) -> bool {
    member["health"] == "stable" || member["health"] == "healthy"
}

/// The journal's outcome of `action`, once it is there.
async fn outcome_of(cluster: &Cluster, node: usize, action: &str) -> anyhow::Result<String> {
    wait::until(
        &format!("{action:?} in the journal"),
        RESTORE_TIMEOUT,
        || async {
            Ok(journal(cluster, node)?
                .into_iter()
                .find(|(logged, _)| logged == action)
                .map(|(_, outcome)| outcome))
        },
    )
    .await
}

/// The journal entries (action, outcome) as `placement explain --all` prints them from node `node`.
fn journal(cluster: &Cluster, node: usize) -> anyhow::Result<Vec<(String, String)>> {
    let explain = vesperctl(cluster, node, &["placement", "explain", "--all"])?;
    Ok(explain["journal"]
        .as_array()
        .context("journal")?
        .iter()
        .map(|entry| {
            (
                entry["action"].as_str().unwrap_or_default().to_string(),
                entry["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// The replacement of `victim` recorded in the journal: the standby that took its place.
fn replacement_of(journal: &[(String, String)], victim: u64) -> Option<u64> {
    let prefix = format!("replace voter {victim} by standby ");
    journal.iter().find_map(|(action, outcome)| {
        action
            .strip_prefix(&prefix)
            .filter(|_| outcome == "done")
            .and_then(|id| id.parse().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t52_a_killed_leader_is_replaced_then_retired_and_no_write_is_lost() -> anyhow::Result<()> {
    // Each node has a certificate of its own, so the retired one's can be revoked.
    let mut cluster = cluster_of(
        3,
        2,
        NodeOptions {
            per_node_certs: true,
            ..options()
        },
    )
    .await?;
    let leader = cluster.wait_leader().await?;
    let status = cluster.status_of(leader).await?;
    let victim = cluster.node_id_in(&status, leader).context("leader's id")?;
    let mut leaves = Vec::new();
    for index in (0..3).filter(|&index| index != leader) {
        leaves.push(cluster.leaf(index).await?);
    }
    let reader = cluster.leaf((leader + 1) % 3).await?;
    let load = Load::start(leaves, "placement", "p");
    wait::until("writes before the kill", RESTORE_TIMEOUT, || async {
        Ok((load.acknowledged() >= 20).then_some(()))
    })
    .await?;

    let killed_at = Instant::now();
    cluster.kill(leader);
    let restored = wait_status(
        &mut cluster,
        "3 voters without the killed leader",
        |status| {
            let voters = voters(status);
            voters.len() == 3 && !voters.contains(&victim)
        },
    )
    .await?;
    let restored_after = killed_at.elapsed();
    let first_write = load
        .first_ack_after(killed_at)
        .map(|at| at.duration_since(killed_at));

    // The new leader's journal tells why (it is written once the change has committed, so it may trail the
    // membership by a moment), and the replacement is a former standby.
    let survivor = cluster.running()[0];
    let replacement = wait::until(
        "the replacement in the journal",
        RESTORE_TIMEOUT,
        || async { Ok(replacement_of(&journal(&cluster, survivor)?, victim)) },
    )
    .await?;
    ensure!(voters(&restored).contains(&replacement));

    // Once dead as a standby too, the old voter is retired: removed, its id tombstoned.
    let retired = wait_status(&mut cluster, "the killed leader retired", |status| {
        role(status, victim) == Some(MemberRole::Removed)
    })
    .await?;
    let retired_after = killed_at.elapsed();
    ensure!(voters(&retired).len() == 3, "{retired:?}");
    let outcome = outcome_of(&cluster, survivor, &format!("retire standby {victim}")).await?;
    ensure!(outcome.ends_with("is revoked"), "{outcome}");
    // The dead leader's certificate is refused on the Cluster port of every survivor from now on.
    let (cert, key) = cluster.node_cert(leader)?;
    for index in cluster.running() {
        cluster
            .wait_revoked_on(index, &cert, &key, RESTORE_TIMEOUT)
            .await?;
    }

    // Every voter is healthy in the controller's eyes, and it has nothing left to do but keep the pool (it has
    // no candidates to adopt, so it is short of one standby and says so, or balanced).
    let placement = wait::until("the controller to settle", RESTORE_TIMEOUT, || async {
        let placement = vesperctl(&cluster, survivor, &["placement", "status"])?;
        let members = members_of(&placement);
        let settled =
            members.len() == 4 && members.iter().all(is_live) && placement["action"].is_null();
        Ok(settled.then_some(placement))
    })
    .await?;
    ensure!(placement["effective_target_voters"] == 3, "{placement}");

    let report = load.stop().await;
    load::verify(&reader, "placement", &report.acknowledged).await?;
    println!(
        "placement: leader killed -> 3 voters again after {:.1} s, dead leader retired after {:.1} s; first write acknowledged {:.2} s after the kill; {} writes acknowledged, none lost",
        restored_after.as_secs_f64(),
        retired_after.as_secs_f64(),
        first_write.map_or(f64::NAN, |d| d.as_secs_f64()),
        report.acknowledged.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t52_two_of_five_voters_lost_one_after_the_other_are_both_replaced() -> anyhow::Result<()> {
    let mut cluster = cluster_with(5, 2).await?;
    let leader = cluster.wait_leader().await?;
    let followers: Vec<usize> = (0..5).filter(|&index| index != leader).collect();
    let status = cluster.status_of(leader).await?;
    let first = cluster.node_id_in(&status, followers[0]).context("id")?;
    let second = cluster.node_id_in(&status, followers[1]).context("id")?;
    let mut leaves = Vec::new();
    for &index in &followers[2..] {
        leaves.push(cluster.leaf(index).await?);
    }
    let reader = cluster.leaf(leader).await?;
    let load = Load::start(leaves, "placement", "five");

    cluster.kill(followers[0]);
    wait_status(
        &mut cluster,
        "5 voters without the first victim",
        |status| {
            let voters = voters(status);
            voters.len() == 5 && !voters.contains(&first)
        },
    )
    .await?;
    // Its nodes share one certificate: retiring the first victim must not revoke what every member presents.
    let outcome = outcome_of(&cluster, leader, &format!("retire standby {first}")).await?;
    ensure!(outcome.contains("not revoked"), "{outcome}");
    cluster.kill(followers[1]);
    let after = wait_status(&mut cluster, "5 voters without either victim", |status| {
        let voters = voters(status);
        voters.len() == 5 && !voters.contains(&first) && !voters.contains(&second)
    })
    .await?;
    ensure!(
        voters(&after).len() == 5,
        "the voters went back to the target: {after:?}"
    );
    let report = load.stop().await;
    load::verify(&reader, "placement", &report.acknowledged).await?;
    ensure!(!report.acknowledged.is_empty());
    Ok(())
}

/// The members and their roles as node `index` sees them.
async fn roles_on(cluster: &Cluster, index: usize) -> anyhow::Result<Vec<(u64, i32)>> {
    let status = cluster.status_of(index).await?;
    let mut roles: Vec<(u64, i32)> = status
        .members
        .iter()
        .map(|member| (member.node_id, member.role))
        .collect();
    roles.sort();
    Ok(roles)
}

/// A leader whose every other member froze (SIGSTOP: to the leader they are silent, as behind a partition)
/// still believes it leads. Its controller sees a dead standby and dead voters, and changes nothing: it says
/// the voters have no live majority, the membership stays as it was through the whole standby dead time, and
/// when the others come back nothing it decided alone is in the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t52_a_leader_cut_off_from_every_other_member_changes_nothing() -> anyhow::Result<()> {
    let mut cluster = cluster_with(3, 1).await?;
    let leader = cluster.wait_leader().await?;
    let before = roles_on(&cluster, leader).await?;
    let journal_before = journal(&cluster, leader)?.len();
    let others: Vec<usize> = cluster
        .running()
        .into_iter()
        .filter(|&index| index != leader)
        .collect();
    for &index in &others {
        cluster.pause(index);
    }
    // The controller explains why it waits.
    let blocked = wait::until(
        "the lone leader's controller to say why it waits",
        RESTORE_TIMEOUT,
        || async {
            let status = vesperctl(&cluster, leader, &["placement", "status"])?;
            Ok((status["blocked"] == "no_live_majority").then_some(status))
        },
    )
    .await;
    // Through the standby dead time (6 s) and past it, nothing changes in its membership (checked throughout).
    let hold = Instant::now() + Duration::from_secs(8);
    let mut held = Ok(());
    while Instant::now() < hold && held.is_ok() {
        let now = roles_on(&cluster, leader).await?;
        if now != before {
            held = Err(anyhow::anyhow!(
                "the lone leader changed the membership: {before:?} -> {now:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The others are resumed whatever happened, so the cluster's files are left in a state worth reading.
    for &index in &others {
        cluster.resume(index);
    }
    let blocked = blocked?;
    held?;
    ensure!(
        blocked["why"].as_str().is_some_and(|why| !why.is_empty()),
        "{blocked}"
    );
    // Back together: the same members in the same roles, and no change decided by the lone leader.
    let after = wait::until("the members together again", RESTORE_TIMEOUT, || async {
        let placement = vesperctl(&cluster, others[0], &["placement", "status"])?;
        let members = members_of(&placement);
        let live = members.len() == 4 && members.iter().all(is_live);
        Ok(live.then_some(()))
    })
    .await;
    after?;
    for index in cluster.running() {
        ensure!(
            roles_on(&cluster, index).await? == before,
            "node {index} sees other members or roles than before the pause"
        );
    }
    let journal_after = journal(&cluster, others[0])?;
    let done_since: Vec<&(String, String)> = journal_after[journal_before..]
        .iter()
        .filter(|(_, outcome)| outcome == "done")
        .collect();
    ensure!(
        done_since.is_empty(),
        "membership changes were made around the pause: {done_since:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t52_pause_stops_every_change_until_resume() -> anyhow::Result<()> {
    let mut cluster = cluster_with(3, 1).await?;
    let leader = cluster.wait_leader().await?;
    let victim_index = (0..3).find(|&index| index != leader).expect("a follower");
    let status = cluster.status_of(leader).await?;
    let victim = cluster.node_id_in(&status, victim_index).context("id")?;
    let paused = vesperctl(&cluster, leader, &["placement", "pause"])?;
    ensure!(paused["paused"] == true, "{paused}");

    cluster.kill(victim_index);
    // The controller sees the voter dead and says it is paused, in a round after it saw it dead.
    let seen = wait::until(
        "the controller to see the dead voter while paused",
        RESTORE_TIMEOUT,
        || async {
            let placement = vesperctl(&cluster, leader, &["placement", "status"])?;
            let dead = placement["members"].as_array().is_some_and(|members| {
                members
                    .iter()
                    .any(|member| member["node_id"] == victim && member["health"] == "dead")
            });
            Ok((dead && placement["blocked"] == "paused").then_some(placement))
        },
    )
    .await?;
    let decided = seen["decided_at_ms"].as_u64().context("decided_at_ms")?;
    wait::until("two more paused rounds", RESTORE_TIMEOUT, || async {
        let placement = vesperctl(&cluster, leader, &["placement", "status"])?;
        let later = placement["decided_at_ms"].as_u64().unwrap_or(0) > decided + 600;
        Ok((later && placement["blocked"] == "paused").then_some(()))
    })
    .await?;
    let status = cluster.status_of(leader).await?;
    ensure!(
        voters(&status).contains(&victim) && voters(&status).len() == 3,
        "nothing changed while paused: {status:?}"
    );
    ensure!(journal(&cluster, leader)?.is_empty());

    let resumed = vesperctl(&cluster, leader, &["placement", "resume"])?;
    ensure!(resumed["paused"] == false, "{resumed}");
    wait_status(
        &mut cluster,
        "the dead voter replaced after resume",
        |status| {
            let voters = voters(status);
            voters.len() == 3 && !voters.contains(&victim)
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t52_a_manual_demote_is_kept_and_targets_are_checked() -> anyhow::Result<()> {
    let mut cluster = cluster_with(3, 1).await?;
    let leader = cluster.wait_leader().await?;
    let follower = (0..3).find(|&index| index != leader).expect("a follower");
    let status = cluster.status_of(leader).await?;
    let demoted = cluster.node_id_in(&status, follower).context("id")?;

    vesperctl(&cluster, leader, &["demote", &demoted.to_string()])?;
    let placement = vesperctl(&cluster, leader, &["placement", "status"])?;
    ensure!(placement["targets"]["target_voters"] == "2", "{placement}");
    // Rounds go by (with two ready standbys) and the controller keeps the operator's two voters.
    let after_demote = placement["decided_at_ms"].as_u64().unwrap_or(0);
    let settled = wait::until("rounds after the demote", RESTORE_TIMEOUT, || async {
        let placement = vesperctl(&cluster, leader, &["placement", "status"])?;
        let later = placement["decided_at_ms"].as_u64().unwrap_or(0) > after_demote + 2000;
        let stable = placement["members"].as_array().is_some_and(|members| {
            members.len() == 4 && members.iter().all(|member| member["health"] == "stable")
        });
        Ok((later && stable).then_some(placement))
    })
    .await?;
    ensure!(settled["action"].is_null(), "{settled}");
    ensure!(voters(&cluster.status_of(leader).await?).len() == 2);

    // A manual change that is refused pins nothing.
    let output = cluster.vesperctl(leader, &["promote", "99"])?;
    ensure!(!output.status.success(), "{output:?}");
    let placement = vesperctl(&cluster, leader, &["placement", "status"])?;
    ensure!(placement["targets"]["target_voters"] == "2", "{placement}");

    // Nonsense targets are refused with the reason; the stored targets do not change.
    let output = cluster.vesperctl(leader, &["placement", "set", "--voters", "4"])?;
    ensure!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(stderr.contains("target_voters 4"), "{stderr}");
    let output = cluster.vesperctl(leader, &["placement", "set"])?;
    ensure!(output.status.code() == Some(64), "{output:?}");

    // Handing the count back to automation brings a third voter back.
    let set = vesperctl(&cluster, leader, &["placement", "set", "--voters", "auto"])?;
    ensure!(set["target_voters"] == "auto", "{set}");
    wait_status(&mut cluster, "3 voters again", |status| {
        voters(status).len() == 3
    })
    .await?;
    Ok(())
}

/// Three voters and two standbys that joined, node i in zone `zones[i]`.
async fn zoned(zones: [&str; 5]) -> anyhow::Result<Cluster> {
    let mut options = options();
    options.node_args = zones
        .iter()
        .map(|zone| vec!["--zone".to_string(), zone.to_string()])
        .collect();
    let mut cluster = Cluster::start(3, options).await?;
    let seed = cluster.nodes[0].endpoints().cluster.to_string();
    for _ in 0..2 {
        cluster.add_node(Start::Join(seed.clone())).await?;
    }
    Ok(cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t52_voters_in_one_zone_are_spread_over_three() -> anyhow::Result<()> {
    // Three voters in zone a, standbys in zones b and c: at most ceil(3 / 3) = 1 voter per zone.
    let cluster = zoned(["a", "a", "a", "b", "c"]).await?;
    let spread = wait::until("one voter per zone", RESTORE_TIMEOUT, || async {
        let placement = vesperctl(&cluster, 0, &["placement", "status"])?;
        let members = members_of(&placement);
        let zones: BTreeSet<String> = members
            .iter()
            .filter(|member| member["role"] == "voter")
            .filter_map(|member| member["zone"].as_str().map(String::from))
            .collect();
        let voters = members
            .iter()
            .filter(|member| member["role"] == "voter")
            .count();
        Ok((voters == 3 && zones.len() == 3 && placement["action"].is_null()).then_some(placement))
    })
    .await?;
    // Two swaps moved two voters out of zone a (the journal entry of the last may trail the membership).
    let swaps = |journal: &[(String, String)]| {
        journal
            .iter()
            .filter(|(action, outcome)| action.starts_with("replace voter") && outcome == "done")
            .count()
    };
    let journal = wait::until("both swaps in the journal", RESTORE_TIMEOUT, || async {
        let journal = journal(&cluster, 0)?;
        Ok((swaps(&journal) >= 2).then_some(journal))
    })
    .await?;
    ensure!(swaps(&journal) == 2, "{journal:?} {spread}");
    Ok(())
}

/// Five members in three zones grow to five voters on their own; one of them frozen until it counts as dead
/// (no standby to replace it with) does not shrink the voting set, and when it comes back it is a voter still.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t52_an_automatic_five_keeps_its_voters_through_one_lost_member() -> anyhow::Result<()> {
    let mut cluster = zoned(["a", "b", "c", "a", "b"]).await?;
    // The harness promoted the first three by hand, which pins the target; hand it back to automation.
    vesperctl(&cluster, 0, &["placement", "set", "--voters", "auto"])?;
    let status = wait_status(&mut cluster, "five voters", |status| {
        voters(status).len() == 5
    })
    .await?;
    let leader = cluster.wait_leader().await?;
    let frozen = (0..5).find(|&index| index != leader).expect("a follower");
    let frozen_id = cluster.node_id_in(&status, frozen).context("its node id")?;
    // The controller's own view has caught up with the membership (its report lags the round before).
    wait::until(
        "the controller to see five voters",
        RESTORE_TIMEOUT,
        || async {
            let placement = vesperctl(&cluster, leader, &["placement", "status"])?;
            let members = members_of(&placement);
            let five = members
                .iter()
                .filter(|member| member["role"] == "voter")
                .count()
                == 5;
            Ok((five && placement["action"].is_null()).then_some(()))
        },
    )
    .await?;
    cluster.pause(frozen);
    // Until the controller counts it dead, and a while after (checked throughout), the voters stay five.
    let mut dead_since: Option<Instant> = None;
    let mut held = Ok(());
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    while dead_since.is_none_or(|at| at.elapsed() < Duration::from_secs(3))
        && Instant::now() < deadline
    {
        let placement = vesperctl(&cluster, leader, &["placement", "status"])?;
        let members = members_of(&placement);
        let voters_now = members
            .iter()
            .filter(|member| member["role"] == "voter")
            .count();
        if voters_now != 5 {
            held = Err(anyhow::anyhow!(
                "one lost member shrank the voters: {placement}"
            ));
            break;
        }
        let dead = members
            .iter()
            .any(|member| member["node_id"] == frozen_id && member["health"] == "dead");
        if dead && dead_since.is_none() {
            ensure!(placement["effective_target_voters"] == 5, "{placement}");
            dead_since = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.resume(frozen);
    held?;
    ensure!(
        dead_since.is_some(),
        "the frozen member never counted as dead"
    );
    // Back: every member live, five voters, and no demotion in the journal.
    wait::until(
        "the frozen member back and live",
        RESTORE_TIMEOUT,
        || async {
            let placement = vesperctl(&cluster, leader, &["placement", "status"])?;
            let members = members_of(&placement);
            let live = members.len() == 5
                && members
                    .iter()
                    .all(|member| member["role"] == "voter" && is_live(member));
            Ok(live.then_some(()))
        },
    )
    .await?;
    let journal = journal(&cluster, leader)?;
    ensure!(
        !journal
            .iter()
            .any(|(action, _)| action.starts_with("demote")),
        "{journal:?}"
    );
    Ok(())
}
