//! `vesperctl placement`: the placement controller as the leader sees it, its journal, and its targets.

use clap::Subcommand;
use serde_json::json;
use vesper_proto::v1::{
    PlacementStatusRequest, PlacementStatusResponse, PlacementTargets, SetPlacementRequest,
};

use crate::admin::{role_name, status_error, Connection, UsageError};

/// Journal entries `explain` prints without --all.
const EXPLAIN_RECENT: usize = 10;

#[derive(Debug, Subcommand)]
pub enum PlacementCommand {
    /// Every member's health as the leader sees it, the targets, and the last decision.
    Status {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// The last decision and its reason (or what blocks one), and the recent actions from the journal.
    Explain {
        /// Print the whole journal (the last 100 actions), not only the last 10.
        #[arg(long)]
        all: bool,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Stop all automatic membership changes (manual ones keep working). Committed through Raft.
    Pause {
        #[arg(long)]
        json: bool,
    },
    /// Let the controller act again.
    Resume {
        #[arg(long)]
        json: bool,
    },
    /// Grant eligibility for the super peer role to candidates (a promoted node sees all replicated state and
    /// votes: a security decision). Committed through Raft.
    #[command(group(clap::ArgGroup::new("who").required(true).args(["peers", "all"])))]
    Grant {
        /// PeerIds of the candidates (at most 64).
        peers: Vec<String>,
        /// Grant to every candidate, present and future.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Take a grant back (from the listed peers, or the grant to all).
    #[command(group(clap::ArgGroup::new("whom").required(true).args(["peers", "all"])))]
    Revoke {
        peers: Vec<String>,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Set the controller's targets. Committed through Raft; unset options keep their value.
    Set {
        /// Voters to keep: 1, 3, 5 or 7, or `auto` (3, or 5 when at least 5 members not dead span 3 zones;
        /// at 5, one lost member does not bring it down to 3).
        #[arg(long, value_parser = parse_count)]
        voters: Option<u32>,
        /// Standbys to keep besides the voters (0 to 16).
        #[arg(long)]
        standbys: Option<u32>,
        /// Automation never takes the voters below this; `auto` is a majority of the voter target.
        #[arg(long, value_parser = parse_count)]
        min_quorum: Option<u32>,
        #[arg(long)]
        json: bool,
    },
}

/// A count, or `auto` (0 on the wire).
fn parse_count(text: &str) -> Result<u32, String> {
    if text == "auto" {
        return Ok(0);
    }
    match text.parse::<u32>() {
        Ok(0) => Err("use `auto` rather than 0".into()),
        Ok(count) => Ok(count),
        Err(_) => Err(format!("{text:?} is neither a number nor `auto`")),
    }
}

pub async fn run(connection: &Connection, command: PlacementCommand) -> anyhow::Result<()> {
    match command {
        PlacementCommand::Status { json } => {
            let status = fetch(connection).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status_json(&status))?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        PlacementCommand::Explain { all, json } => {
            let status = fetch(connection).await?;
            let skip = if all {
                0
            } else {
                status.journal.len().saturating_sub(EXPLAIN_RECENT)
            };
            if json {
                let mut value = decision_json(&status);
                value["journal"] = status.journal[skip..]
                    .iter()
                    .map(vesper_proto::json::placement_action)
                    .collect::<Vec<_>>()
                    .into();
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print_decision(&status);
                if !status.adoption.is_empty() {
                    println!("{}", status.adoption);
                }
                if status.journal.is_empty() {
                    println!("\nno action taken yet (journal empty)");
                } else {
                    println!("\nactions (oldest first):");
                    for action in &status.journal[skip..] {
                        println!(
                            "  #{} {} leader {} term {}: {} ({})\n      because {}",
                            action.seq,
                            when(action.at_ms),
                            action.leader_id,
                            action.term,
                            action.action,
                            action.outcome,
                            action.why
                        );
                    }
                }
            }
            Ok(())
        }
        PlacementCommand::Pause { json } => {
            set(
                connection,
                SetPlacementRequest {
                    paused: Some(true),
                    ..Default::default()
                },
                json,
            )
            .await
        }
        PlacementCommand::Resume { json } => {
            set(
                connection,
                SetPlacementRequest {
                    paused: Some(false),
                    ..Default::default()
                },
                json,
            )
            .await
        }
        PlacementCommand::Grant { peers, all, json } => {
            grant(connection, peers, all, false, json).await
        }
        PlacementCommand::Revoke { peers, all, json } => {
            grant(connection, peers, all, true, json).await
        }
        PlacementCommand::Set {
            voters,
            standbys,
            min_quorum,
            json,
        } => {
            if voters.is_none() && standbys.is_none() && min_quorum.is_none() {
                return Err(UsageError(
                    "nothing to set: give --voters, --standbys or --min-quorum".into(),
                )
                .into());
            }
            set(
                connection,
                SetPlacementRequest {
                    paused: None,
                    target_voters: voters,
                    target_standbys: standbys,
                    min_quorum,
                },
                json,
            )
            .await
        }
    }
}

async fn grant(
    connection: &Connection,
    peers: Vec<String>,
    all: bool,
    revoke: bool,
    as_json: bool,
) -> anyhow::Result<()> {
    let reply = connection
        .client()
        .await?
        .grant_eligibility(vesper_proto::v1::GrantEligibilityRequest { peers, all, revoke })
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        println!(
            "{}",
            json!({ "granted_all": reply.granted_all, "granted": reply.granted })
        );
    } else if reply.granted_all {
        println!("eligibility granted to every candidate");
    } else if reply.granted.is_empty() {
        println!("eligibility granted to nobody");
    } else {
        println!("eligibility granted to:");
        for peer in &reply.granted {
            println!("  {peer}");
        }
    }
    Ok(())
}

async fn fetch(connection: &Connection) -> anyhow::Result<PlacementStatusResponse> {
    Ok(connection
        .client()
        .await?
        .placement_status(PlacementStatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner())
}

async fn set(
    connection: &Connection,
    request: SetPlacementRequest,
    as_json: bool,
) -> anyhow::Result<()> {
    let reply = connection
        .client()
        .await?
        .set_placement(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let targets = reply.targets.unwrap_or_default();
    if as_json {
        println!("{}", targets_json(&targets));
    } else {
        println!("placement targets: {}", targets_text(&targets));
    }
    Ok(())
}

fn auto(count: u32) -> String {
    if count == 0 {
        "auto".into()
    } else {
        count.to_string()
    }
}

fn targets_text(targets: &PlacementTargets) -> String {
    format!(
        "{}voters {}, standbys {}, min quorum {}",
        if targets.paused { "PAUSED; " } else { "" },
        auto(targets.target_voters),
        targets.target_standbys,
        auto(targets.min_quorum)
    )
}

fn targets_json(targets: &PlacementTargets) -> serde_json::Value {
    json!({
        "paused": targets.paused,
        "target_voters": auto(targets.target_voters),
        "target_standbys": targets.target_standbys,
        "min_quorum": auto(targets.min_quorum),
    })
}

/// Milliseconds since the epoch as UTC text.
fn when(at_ms: u64) -> String {
    let seconds = i64::try_from(at_ms / 1000).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .map(|at| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
                at.year(),
                u8::from(at.month()),
                at.day(),
                at.hour(),
                at.minute(),
                at.second()
            )
        })
        .unwrap_or_else(|_| format!("{at_ms} ms"))
}

fn decision_json(status: &PlacementStatusResponse) -> serde_json::Value {
    json!({
        "leader_id": status.leader_id,
        "term": status.term,
        "enabled": status.enabled,
        "decided_at_ms": status.decided_at_ms,
        "action": (!status.action.is_empty()).then_some(&status.action),
        "blocked": (!status.blocked.is_empty()).then_some(&status.blocked),
        "why": status.why,
        "outcome": (!status.outcome.is_empty()).then_some(&status.outcome),
        "adoption": (!status.adoption.is_empty()).then_some(&status.adoption),
    })
}

fn status_json(status: &PlacementStatusResponse) -> serde_json::Value {
    let mut value = decision_json(status);
    value["targets"] = targets_json(&status.targets.unwrap_or_default());
    value["effective_target_voters"] = status.effective_target_voters.into();
    value["effective_min_quorum"] = status.effective_min_quorum.into();
    value["members"] = status
        .members
        .iter()
        .map(|member| {
            json!({
                "node_id": member.node_id,
                "role": role_name(member.role),
                "leader": member.is_leader,
                "health": member.health,
                "health_for_ms": member.health_for_ms,
                "caught_up": member.caught_up,
                "lag": (member.lag >= 0).then_some(member.lag),
                "last_ack_ms": (member.last_ack_ms >= 0).then_some(member.last_ack_ms),
                "zone": (!member.zone.is_empty()).then_some(&member.zone),
                "certificate": (!member.certificate.is_empty()).then_some(&member.certificate),
                "score": (member.score >= 0).then_some(member.score),
                "voter_for_ms": member.voter_for_ms,
            })
        })
        .collect::<Vec<_>>()
        .into();
    value["journal"] = status
        .journal
        .iter()
        .map(vesper_proto::json::placement_action)
        .collect::<Vec<_>>()
        .into();
    value["granted_all"] = status.granted_all.into();
    value["granted"] = status.granted.clone().into();
    value["candidates"] = status
        .candidates
        .iter()
        .map(|candidate| {
            json!({
                "peer_id": candidate.peer_id,
                "state": candidate.state,
                "host_node_id": candidate.host_node_id,
                "zone": (!candidate.zone.is_empty()).then_some(&candidate.zone),
                "cluster_addr": candidate.cluster_addr,
                "leaf_addr": candidate.leaf_addr,
                "admin_addr": candidate.admin_addr,
                "score": candidate.score,
                "rtt_us": (candidate.rtt_us != 0).then_some(candidate.rtt_us),
                "proof_at_ms": (candidate.proof_at_ms != 0).then_some(candidate.proof_at_ms),
                "online_since_ms": candidate.online_since_ms,
                "updated_at_ms": candidate.updated_at_ms,
                "gates": candidate.gates.iter().map(|gate| json!({
                    "name": gate.name, "passed": gate.passed, "detail": gate.detail,
                })).collect::<Vec<_>>(),
            })
        })
        .collect::<Vec<_>>()
        .into();
    value
}

fn print_decision(status: &PlacementStatusResponse) {
    println!(
        "leader {} (term {}), controller {}",
        status.leader_id,
        status.term,
        if status.enabled {
            "enabled"
        } else {
            "disabled (placement.enabled = false)"
        }
    );
    if status.decided_at_ms == 0 {
        println!("no decision yet: {}", status.why);
    } else if status.action.is_empty() {
        println!(
            "last round {}: no action ({}): {}",
            when(status.decided_at_ms),
            status.blocked,
            status.why
        );
    } else {
        println!(
            "last round {}: {} ({}): {}",
            when(status.decided_at_ms),
            status.action,
            if status.outcome.is_empty() {
                "in progress"
            } else {
                &status.outcome
            },
            status.why
        );
    }
}

fn print_status(status: &PlacementStatusResponse) {
    print_decision(status);
    let targets = status.targets.unwrap_or_default();
    println!(
        "targets: {} (in effect: {} voters, min quorum {})",
        targets_text(&targets),
        status.effective_target_voters,
        status.effective_min_quorum
    );
    println!(
        "\n{:<5} {:<8} {:<7} {:<8} {:>10} {:<9} {:>8} {:>9} {:>5} ZONE",
        "NODE", "ROLE", "LEADER", "HEALTH", "FOR", "CAUGHT UP", "LAG", "LAST ACK", "SCORE"
    );
    for member in &status.members {
        println!(
            "{:<5} {:<8} {:<7} {:<8} {:>10} {:<9} {:>8} {:>9} {:>5} {}",
            member.node_id,
            role_name(member.role),
            if member.is_leader { "*" } else { "" },
            member.health,
            format!("{:.1}s", member.health_for_ms as f64 / 1000.0),
            if member.caught_up { "yes" } else { "no" },
            if member.lag < 0 {
                "-".to_string()
            } else {
                member.lag.to_string()
            },
            if member.last_ack_ms < 0 {
                "never".to_string()
            } else {
                format!("{}ms", member.last_ack_ms)
            },
            if member.score < 0 {
                "-".to_string()
            } else {
                member.score.to_string()
            },
            member.zone
        );
    }
    print_candidates(status);
}

fn print_candidates(status: &PlacementStatusResponse) {
    println!(
        "\ncandidates (eligibility granted to {}):",
        if status.granted_all {
            "all".to_string()
        } else {
            format!("{} peers", status.granted.len())
        }
    );
    if status.candidates.is_empty() {
        println!("  none: no node offers to serve (leafpeer serve --offer-superpeer)");
    }
    for candidate in &status.candidates {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        println!(
            "  {} {} score {} rtt {} host {} zone {} at {} (judged {:.0} s ago; entries are rewritten when a gate changes)",
            candidate.peer_id,
            candidate.state,
            candidate.score,
            if candidate.rtt_us == 0 {
                "-".to_string()
            } else {
                format!("{:.1} ms", f64::from(candidate.rtt_us) / 1000.0)
            },
            candidate.host_node_id,
            if candidate.zone.is_empty() {
                "-"
            } else {
                &candidate.zone
            },
            candidate.cluster_addr,
            now_ms.saturating_sub(candidate.updated_at_ms) as f64 / 1000.0
        );
        for gate in &candidate.gates {
            println!(
                "      {} {:<12} {}",
                if gate.passed { "ok  " } else { "FAIL" },
                gate.name,
                gate.detail
            );
        }
    }
    if !status.adoption.is_empty() {
        println!("  {}", status.adoption);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_numbers_or_auto() {
        assert_eq!(parse_count("auto"), Ok(0));
        assert_eq!(parse_count("5"), Ok(5));
        assert!(parse_count("0").unwrap_err().contains("auto"));
        assert!(parse_count("five").unwrap_err().contains("five"));
    }
}
