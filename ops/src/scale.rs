//! `vesperctl scale-down`: takes the highest-numbered pods of a StatefulSet out of the cluster, one membership
//! change at a time, before their pods go (the Helm chart's pre-upgrade hook runs it).
//!
//! Each round reads the member list again and takes one step ([`next_step`], pure and tested on tables): a
//! leaving standby is removed; a leaving voter is demoted first, after leadership moved off it and after a kept
//! standby was promoted in its place whenever the kept voters would otherwise fall below the voter target. So
//! the voting set shrinks by at most one member per change and never below the target while a kept standby
//! can fill it. The placement controller is paused meanwhile (it would otherwise refill or shrink the voters
//! between two steps); afterwards the targets given are set, and the controller is resumed unless it was
//! paused before.

use std::time::Duration;

use serde_json::json;
use vesper_proto::v1::{
    DemoteRequest, Member, MemberRole, MembersRequest, PlacementStatusRequest, PromoteRequest,
    RemoveNodeRequest, SetPlacementRequest, TransferLeaderRequest,
};

use crate::admin::{status_error, Connection, UsageError};

/// Where the ordinal goes in a host template.
pub const ORDINAL: &str = "{ordinal}";

/// The parsed `--host-template`: `PREFIX{ordinal}SUFFIX`, matched against the host part of a member's cluster
/// address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTemplate {
    prefix: String,
    suffix: String,
}

impl HostTemplate {
    pub fn parse(text: &str) -> Result<Self, UsageError> {
        let mut parts = text.split(ORDINAL);
        let (Some(prefix), Some(suffix), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(UsageError(format!(
                "--host-template {text:?} must contain {ORDINAL} exactly once (for example \
                 vesper-{ORDINAL}.vesper-headless.default.svc.cluster.local)"
            )));
        };
        if prefix.is_empty() {
            return Err(UsageError(format!(
                "--host-template {text:?} must have a name before {ORDINAL} (the StatefulSet's)"
            )));
        }
        Ok(Self {
            prefix: prefix.into(),
            suffix: suffix.into(),
        })
    }

    /// The ordinal of the pod whose stable name is this member's cluster address, if it is one.
    pub fn ordinal(&self, cluster_addr: &str) -> Option<u32> {
        let host = match cluster_addr.rsplit_once(':') {
            Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
            _ => cluster_addr,
        };
        let digits = host
            .strip_prefix(&self.prefix)?
            .strip_suffix(&self.suffix)?;
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        if digits.len() > 1 && digits.starts_with('0') {
            return None;
        }
        digits.parse().ok()
    }
}

/// One member as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seat {
    pub node_id: u64,
    /// Its pod's ordinal; `None` for members that are not pods of this StatefulSet (never touched).
    pub ordinal: Option<u32>,
    pub voter: bool,
    pub leader: bool,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// No member at or above the kept count is left.
    Done,
    /// Promote this kept standby first, so the voters stay at the target when a leaving voter is demoted.
    Promote {
        node_id: u64,
        instead_of: u64,
    },
    /// Move leadership to this kept voter before its current holder is demoted.
    Transfer {
        to: u64,
        from: u64,
    },
    Demote(u64),
    Remove(u64),
    /// Nothing safe can be done: the reason says why.
    Blocked(String),
}

/// The next step to take `seats` down to the pods below ordinal `keep`, keeping `target_voters` voters when it
/// can. Leaving pods go highest ordinal first.
pub fn next_step(seats: &[Seat], keep: u32, target_voters: usize) -> Step {
    let leaving = |seat: &&Seat| seat.ordinal.is_some_and(|ordinal| ordinal >= keep);
    let Some(next) = seats.iter().filter(leaving).max_by_key(|seat| seat.ordinal) else {
        return Step::Done;
    };
    if !next.voter {
        return Step::Remove(next.node_id);
    }
    let kept: Vec<&Seat> = seats.iter().filter(|seat| !leaving(seat)).collect();
    if kept.is_empty() {
        return Step::Blocked(format!(
            "no member would be left below ordinal {keep}: scaling down to {keep} pods would remove the \
             whole cluster"
        ));
    }
    let kept_voters: Vec<&&Seat> = kept.iter().filter(|seat| seat.voter).collect();
    // The lowest-numbered kept standby fills the seat (pods first, in ordinal order, then other members).
    let standby = kept
        .iter()
        .filter(|seat| !seat.voter)
        .min_by_key(|seat| (seat.ordinal.is_none(), seat.ordinal, seat.node_id));
    if kept_voters.len() < target_voters.max(1) {
        if let Some(standby) = standby {
            return Step::Promote {
                node_id: standby.node_id,
                instead_of: next.node_id,
            };
        }
        if kept_voters.is_empty() {
            return Step::Blocked(format!(
                "node {} is the last voter and no kept member can take its place",
                next.node_id
            ));
        }
    }
    if next.leader {
        let to = kept_voters
            .iter()
            .min_by_key(|seat| (seat.ordinal.is_none(), seat.ordinal, seat.node_id))
            .expect("kept voters are not empty here");
        return Step::Transfer {
            to: to.node_id,
            from: next.node_id,
        };
    }
    Step::Demote(next.node_id)
}

/// Whether the member list `seats` shows `step` done, so that the next round plans from the new state (a
/// leadership transfer and a membership change take a moment to show in every member's list).
pub fn settled(step: &Step, seats: &[Seat]) -> bool {
    let seat = |id: u64| seats.iter().find(|seat| seat.node_id == id);
    match step {
        Step::Done | Step::Blocked(_) => true,
        Step::Promote { node_id, .. } => seat(*node_id).is_some_and(|seat| seat.voter),
        Step::Transfer { from, .. } => {
            seat(*from).is_some_and(|seat| !seat.leader) && seats.iter().any(|seat| seat.leader)
        }
        Step::Demote(node_id) => seat(*node_id).is_some_and(|seat| !seat.voter),
        Step::Remove(node_id) => seat(*node_id).is_none(),
    }
}

/// How long one step may take to show before the next round plans anyway.
const SETTLE: Duration = Duration::from_secs(30);

fn seats(members: &[Member], template: &HostTemplate) -> Vec<Seat> {
    members
        .iter()
        .filter(|member| member.role() != MemberRole::Removed)
        .map(|member| Seat {
            node_id: member.node_id,
            ordinal: template.ordinal(&member.cluster_addr),
            voter: member.role() == MemberRole::Voter,
            leader: member.is_leader,
        })
        .collect()
}

/// Runs the scale-down: pause, steps until done, targets, resume. Progress goes to stderr, one line a step.
pub async fn scale_down(
    connection: &Connection,
    keep: u32,
    template: &HostTemplate,
    voters: u32,
    standbys: Option<u32>,
    wait: Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    let before = connection
        .client()
        .await?
        .placement_status(PlacementStatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let was_paused = before
        .targets
        .as_ref()
        .is_some_and(|targets| targets.paused);
    let mut taken = Vec::new();
    let result = async {
        loop {
            let members = connection
                .client()
                .await?
                .members(MembersRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .members;
            let step = next_step(&seats(&members, template), keep, voters as usize);
            if step == Step::Done {
                return Ok::<(), anyhow::Error>(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("scale-down not finished within {wait:?}; next step was {step:?}");
            }
            if taken.is_empty() && !was_paused {
                pause(connection, Some(true)).await?;
                eprintln!("paused the placement controller for the scale-down");
            }
            let mut client = connection.client().await?;
            let line = match &step {
                Step::Done => unreachable!(),
                Step::Blocked(reason) => anyhow::bail!("scale-down blocked: {reason}"),
                Step::Promote {
                    node_id,
                    instead_of,
                } => {
                    client
                        .promote(PromoteRequest { node_id: *node_id })
                        .await
                        .map_err(status_error)?;
                    format!(
                        "promoted node {node_id} to take the seat of leaving voter {instead_of}"
                    )
                }
                Step::Transfer { to, from } => {
                    client
                        .transfer_leader(TransferLeaderRequest { node_id: *to })
                        .await
                        .map_err(status_error)?;
                    format!("moved leadership from leaving node {from} to node {to}")
                }
                Step::Demote(node_id) => {
                    client
                        .demote(DemoteRequest { node_id: *node_id })
                        .await
                        .map_err(status_error)?;
                    format!("demoted leaving node {node_id} to standby")
                }
                Step::Remove(node_id) => {
                    client
                        .remove_node(RemoveNodeRequest { node_id: *node_id })
                        .await
                        .map_err(status_error)?;
                    format!("removed leaving node {node_id}")
                }
            };
            eprintln!("{line}");
            taken.push(line);
            let settle_by = tokio::time::Instant::now() + SETTLE;
            while tokio::time::Instant::now() < settle_by {
                let members = connection
                    .client()
                    .await?
                    .members(MembersRequest {})
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .members;
                if settled(&step, &seats(&members, template)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    .await;
    // The targets the release asks for, and the controller as it was, also after a failed step.
    let restore = connection
        .client()
        .await?
        .set_placement(SetPlacementRequest {
            paused: (!taken.is_empty() && !was_paused).then_some(false),
            target_voters: Some(voters),
            target_standbys: standbys,
            min_quorum: None,
        })
        .await
        .map_err(status_error);
    result?;
    restore?;
    if as_json {
        println!("{}", json!({ "kept": keep, "steps": taken }));
    } else if taken.is_empty() {
        println!("nothing to do: no member at ordinal {keep} or above");
    } else {
        println!("scale-down to {keep} done in {} steps", taken.len());
    }
    Ok(())
}

async fn pause(connection: &Connection, paused: Option<bool>) -> anyhow::Result<()> {
    connection
        .client()
        .await?
        .set_placement(SetPlacementRequest {
            paused,
            ..Default::default()
        })
        .await
        .map_err(status_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seat(node_id: u64, ordinal: Option<u32>, voter: bool, leader: bool) -> Seat {
        Seat {
            node_id,
            ordinal,
            voter,
            leader,
        }
    }

    #[test]
    fn a_step_is_settled_once_the_member_list_shows_it() {
        let before = [
            seat(1, Some(0), true, false),
            seat(2, Some(1), true, false),
            seat(3, Some(2), true, true),
            seat(4, Some(3), false, false),
        ];
        let transferred = [
            seat(1, Some(0), true, true),
            seat(2, Some(1), true, false),
            seat(3, Some(2), true, false),
            seat(4, Some(3), false, false),
        ];
        let leaderless = [
            seat(1, Some(0), true, false),
            seat(2, Some(1), true, false),
            seat(3, Some(2), true, false),
        ];
        let promoted = [seat(4, Some(3), true, false)];
        let demoted = [seat(3, Some(2), false, false)];
        let cases: &[(Step, &[Seat], bool)] = &[
            (Step::Transfer { to: 1, from: 3 }, &before, false),
            (Step::Transfer { to: 1, from: 3 }, &transferred, true),
            (Step::Transfer { to: 1, from: 3 }, &leaderless, false),
            (
                Step::Promote {
                    node_id: 4,
                    instead_of: 3,
                },
                &before,
                false,
            ),
            (
                Step::Promote {
                    node_id: 4,
                    instead_of: 3,
                },
                &promoted,
                true,
            ),
            (Step::Demote(3), &before, false),
            (Step::Demote(3), &demoted, true),
            (Step::Remove(4), &before, false),
            (Step::Remove(4), &leaderless, true),
            (Step::Done, &before, true),
        ];
        for (step, seats, expected) in cases {
            assert_eq!(settled(step, seats), *expected, "{step:?} on {seats:?}");
        }
    }

    #[test]
    fn templates_match_pod_names_only() {
        let template =
            HostTemplate::parse("vesper-{ordinal}.vesper-headless.ns.svc.cluster.local").unwrap();
        assert_eq!(
            template.ordinal("vesper-4.vesper-headless.ns.svc.cluster.local:7401"),
            Some(4)
        );
        assert_eq!(
            template.ordinal("vesper-12.vesper-headless.ns.svc.cluster.local"),
            Some(12)
        );
        for other in [
            "vesper-.vesper-headless.ns.svc.cluster.local:7401",
            "vesper-x.vesper-headless.ns.svc.cluster.local:7401",
            "vesper-01.vesper-headless.ns.svc.cluster.local:7401",
            "vesper-1.other.ns.svc.cluster.local:7401",
            "10.0.0.5:7401",
        ] {
            assert_eq!(template.ordinal(other), None, "{other}");
        }
        for bad in ["vesper", "{ordinal}.x", "a-{ordinal}-{ordinal}"] {
            assert!(HostTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn steps_on_tables() {
        let cases: Vec<(&str, Vec<Seat>, u32, usize, Step)> = vec![
            (
                "nothing above the kept count",
                vec![seat(1, Some(0), true, true), seat(2, Some(1), true, false)],
                2,
                3,
                Step::Done,
            ),
            (
                "a leaving standby is removed, highest ordinal first",
                vec![
                    seat(1, Some(0), true, true),
                    seat(2, Some(1), true, false),
                    seat(3, Some(2), true, false),
                    seat(4, Some(3), false, false),
                    seat(5, Some(4), false, false),
                ],
                3,
                3,
                Step::Remove(5),
            ),
            (
                "a leaving voter beyond the target is demoted",
                vec![
                    seat(1, Some(0), true, true),
                    seat(2, Some(1), true, false),
                    seat(3, Some(2), true, false),
                    seat(4, Some(3), true, false),
                    seat(5, Some(4), true, false),
                ],
                3,
                3,
                Step::Demote(5),
            ),
            (
                "a kept standby takes a leaving voter's seat first",
                vec![
                    seat(1, Some(0), true, true),
                    seat(2, Some(1), false, false),
                    seat(3, Some(2), false, false),
                    seat(4, Some(3), true, false),
                    seat(5, Some(4), true, false),
                ],
                3,
                3,
                Step::Promote {
                    node_id: 2,
                    instead_of: 5,
                },
            ),
            (
                "leadership moves off a leaving leader",
                vec![
                    seat(1, Some(0), true, false),
                    seat(2, Some(1), true, false),
                    seat(3, Some(2), true, false),
                    seat(5, Some(3), true, true),
                ],
                3,
                3,
                Step::Transfer { to: 1, from: 5 },
            ),
            (
                "members that are not pods are kept and can fill a seat",
                vec![
                    seat(1, Some(0), true, false),
                    seat(7, None, false, false),
                    seat(5, Some(1), true, true),
                ],
                1,
                2,
                Step::Promote {
                    node_id: 7,
                    instead_of: 5,
                },
            ),
            (
                "with no kept standby a leaving voter is still demoted, above zero voters",
                vec![seat(1, Some(0), true, true), seat(2, Some(1), true, false)],
                1,
                3,
                Step::Demote(2),
            ),
            (
                "scaling to nothing is refused",
                vec![seat(1, Some(0), true, true)],
                0,
                1,
                Step::Blocked(
                    "no member would be left below ordinal 0: scaling down to 0 pods would remove the whole \
                     cluster"
                        .into(),
                ),
            ),
        ];
        for (name, seats, keep, target, expected) in cases {
            assert_eq!(next_step(&seats, keep, target), expected, "{name}");
        }
    }

    /// Played to the end on many starting sets, the steps never leave the cluster without a voter, never remove
    /// a voter directly, never demote a leader, and end with only kept members.
    #[test]
    fn playing_the_steps_keeps_a_voter_and_ends_with_the_kept_pods() {
        for pods in 1..=7u32 {
            for keep in 1..=pods {
                for voter_mask in 1u32..(1 << pods) {
                    for leader in 0..pods {
                        if voter_mask & (1 << leader) == 0 {
                            continue;
                        }
                        let mut seats: Vec<Seat> = (0..pods)
                            .map(|i| {
                                seat(
                                    u64::from(i) + 1,
                                    Some(i),
                                    voter_mask & (1 << i) != 0,
                                    i == leader,
                                )
                            })
                            .collect();
                        let target = 3usize.min(keep as usize);
                        for _ in 0..64 {
                            match next_step(&seats, keep, target) {
                                Step::Done => break,
                                Step::Blocked(reason) => panic!("blocked: {reason}"),
                                Step::Promote { node_id, .. } => {
                                    let seat =
                                        seats.iter_mut().find(|s| s.node_id == node_id).unwrap();
                                    assert!(!seat.voter);
                                    seat.voter = true;
                                }
                                Step::Transfer { to, from } => {
                                    for seat in &mut seats {
                                        seat.leader = seat.node_id == to;
                                    }
                                    assert_ne!(to, from);
                                }
                                Step::Demote(node_id) => {
                                    let seat =
                                        seats.iter_mut().find(|s| s.node_id == node_id).unwrap();
                                    assert!(
                                        seat.voter && !seat.leader,
                                        "demoted a leader or a standby"
                                    );
                                    seat.voter = false;
                                }
                                Step::Remove(node_id) => {
                                    let index =
                                        seats.iter().position(|s| s.node_id == node_id).unwrap();
                                    assert!(!seats[index].voter, "removed a voter");
                                    seats.remove(index);
                                }
                            }
                            assert!(seats.iter().any(|s| s.voter), "no voter left");
                        }
                        assert!(seats.iter().all(|s| s.ordinal.unwrap() < keep));
                        // Kept voters below the target are only ever topped up, from kept standbys.
                        let voters = seats.iter().filter(|s| s.voter).count();
                        let floor = target
                            .min(voter_mask.count_ones() as usize)
                            .min(keep as usize);
                        assert!(voters >= floor, "voters fell to {voters}, below {floor}");
                    }
                }
            }
        }
    }
}
