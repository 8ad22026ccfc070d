//! The operator's side of placement: the status the leader reports (`vesperctl placement status` /
//! `explain`) and the targets an operator sets (`vesperctl placement set|pause|resume`), checked here.

use openraft::async_runtime::WatchReceiver;
use vesper_proto::v1::{
    GrantEligibilityRequest, GrantEligibilityResponse, MemberRole, PlacementAction,
    PlacementCandidate, PlacementMember, PlacementStatusResponse, SetPlacementRequest,
};

use super::controller::PlacementReports;
use super::decide::{Decision, Health, MAX_VOTERS};
use crate::command::{GrantEligibility, PeerKey, PlacementTargets, SetPlacement};
use crate::error::ServiceError;
use crate::replica::Replica;
use crate::store::nodes::{
    read_candidates, read_grants, read_placement_journal, read_placement_targets,
};

/// Most standbys an operator may ask the controller to keep.
pub const MAX_TARGET_STANDBYS: u32 = 16;
/// Most peers one grant names.
pub const MAX_GRANT_PEERS: usize = 64;
/// Why eligible candidates are not adopted in this build.
pub const NO_ISSUER: &str = "eligible candidates are not adopted: no super peer holds a certificate issuer (give the super peers you run yourself one: vesperctl ca issuer, then placement.issuer_cert and placement.issuer_key); an operator can still add a node by hand (vesperctl add-standby)";

/// What the adoption stands at, in words, for `placement status`: the one running, or why eligible candidates
/// wait.
fn adoption_words(
    adoption: Option<&crate::command::Adoption>,
    any_eligible: bool,
    issuing: bool,
    now: u64,
) -> String {
    let left = |deadline: u64| {
        humantime::format_duration(std::time::Duration::from_secs(
            deadline.saturating_sub(now) / 1000,
        ))
        .to_string()
    };
    match adoption {
        Some(adoption) => match &adoption.issued {
            None => format!(
                "adopting candidate {}: waiting for an issuer to sign its certificate (gives up in {})",
                peer_text(&adoption.peer),
                left(adoption.deadline_ms)
            ),
            Some(issued) => format!(
                "adopting candidate {}: node {} signed its certificate {}...; waiting for it to join as a standby from {} (gives up in {})",
                peer_text(&adoption.peer),
                issued.by_node,
                data_encoding::HEXLOWER.encode(&issued.fingerprint[..8]),
                adoption.cluster_addr,
                left(adoption.deadline_ms)
            ),
        },
        None if any_eligible && !issuing => NO_ISSUER.to_string(),
        None => String::new(),
    }
}

fn peer_text(peer: &PeerKey) -> String {
    vesper_proto::PeerId::from_public_key_bytes(peer)
        .map(|peer| peer.to_string())
        .unwrap_or_default()
}

/// Grants or revokes eligibility (a Raft write from this node).
pub async fn grant(
    replica: &Replica,
    request: &GrantEligibilityRequest,
) -> Result<GrantEligibilityResponse, ServiceError> {
    if request.peers.len() > MAX_GRANT_PEERS {
        return Err(ServiceError::BadField(format!(
            "peers: {} given, at most {MAX_GRANT_PEERS} at once",
            request.peers.len()
        )));
    }
    if request.peers.is_empty() && !request.all {
        return Err(ServiceError::BadField(
            "name peers, or set all to grant (or revoke) every candidate".into(),
        ));
    }
    let peers = request
        .peers
        .iter()
        .map(|text| {
            text.parse::<vesper_proto::PeerId>()
                .map(|peer| *peer.as_bytes())
                .map_err(|error| ServiceError::BadField(format!("peer {text:?}: {error}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    replica
        .propose_accepted(
            GrantEligibility {
                peers,
                all: request.all,
                revoke: request.revoke,
            }
            .into(),
        )
        .await?;
    let (granted_all, granted) = read_grants(replica.reader().db())?;
    Ok(GrantEligibilityResponse {
        granted_all,
        granted: granted.iter().map(peer_text).collect(),
    })
}

/// The wire form of stored targets.
pub fn targets_to_wire(targets: &PlacementTargets) -> vesper_proto::v1::PlacementTargets {
    vesper_proto::v1::PlacementTargets {
        paused: targets.paused,
        target_voters: targets.voters.unwrap_or(0),
        target_standbys: targets.standbys,
        min_quorum: targets.min_quorum.unwrap_or(0),
    }
}

fn health_name(health: Health) -> &'static str {
    match health {
        Health::Stable => "stable",
        Health::Healthy => "healthy",
        Health::Suspect => "suspect",
        Health::Dead => "dead",
    }
}

/// The status, on the leader: its controller's last round, the stored targets and the journal.
pub fn status(
    replica: &Replica,
    reports: &PlacementReports,
    enabled: bool,
) -> Result<PlacementStatusResponse, ServiceError> {
    let raft = replica.raft()?;
    let metrics = raft.metrics().borrow_watched().clone();
    let db = replica.reader().db();
    let targets = read_placement_targets(db)?;
    let journal = read_placement_journal(db)?
        .into_iter()
        .map(|entry| PlacementAction {
            seq: entry.seq,
            at_ms: entry.at_ms,
            leader_id: entry.entry.leader,
            term: entry.entry.term,
            action: entry.entry.action,
            why: entry.entry.why,
            outcome: entry.entry.outcome,
        })
        .collect();
    let (granted_all, granted) = read_grants(db)?;
    let certificates = crate::store::nodes::read_node_certificates(db)?;
    let candidates = read_candidates(db)?
        .into_iter()
        .map(|(peer, entry)| PlacementCandidate {
            peer_id: peer_text(&peer),
            state: if entry.eligible {
                "eligible"
            } else {
                "candidate"
            }
            .into(),
            host_node_id: entry.host,
            zone: entry.zone.clone().unwrap_or_default(),
            cluster_addr: entry.cluster_addr.clone(),
            leaf_addr: entry.leaf_addr.clone(),
            admin_addr: entry.admin_addr.clone(),
            score: entry.score,
            proof_at_ms: entry.proof_at_ms.unwrap_or(0),
            online_since_ms: entry.session_starts_ms.last().copied().unwrap_or(0),
            gates: super::offers::gates_to_wire(&entry),
            updated_at_ms: entry.updated_at_ms,
            rtt_us: crate::store::nodes::read_candidate_rtt(db, &peer)
                .ok()
                .flatten()
                .unwrap_or(0),
        })
        .collect::<Vec<_>>();
    let now = crate::raft::propose::now_ms();
    let issuing = crate::store::nodes::read_issuers(db)?
        .values()
        .any(|until| *until > now);
    let adoption = adoption_words(
        crate::store::nodes::read_adoption(db)?.as_ref(),
        candidates
            .iter()
            .any(|candidate| candidate.state == "eligible"),
        issuing,
        now,
    );
    let mut response = PlacementStatusResponse {
        candidates,
        granted_all,
        granted: granted.iter().map(peer_text).collect(),
        adoption,
        leader_id: *raft.node_id(),
        term: metrics.current_term,
        enabled,
        targets: Some(targets_to_wire(&targets)),
        journal,
        ..Default::default()
    };
    // A report from an earlier leadership of this node is stale: say nothing rather than something old.
    let Some(report) = reports
        .last()
        .filter(|report| report.term == metrics.current_term)
    else {
        response.why = if enabled {
            "the leader's controller has not run a round yet in this term".into()
        } else {
            "the leader runs no controller (placement.enabled = false)".into()
        };
        return Ok(response);
    };
    response.effective_target_voters = report.target_voters;
    response.effective_min_quorum = report.min_quorum;
    response.decided_at_ms = report.at_ms;
    response.members = report
        .members
        .iter()
        .map(|member| PlacementMember {
            node_id: member.node_id,
            role: if member.voter {
                MemberRole::Voter
            } else {
                MemberRole::Standby
            } as i32,
            health: if member.health.stuck {
                "stuck".into()
            } else {
                health_name(member.health.health).into()
            },
            health_for_ms: millis(member.health.for_duration),
            caught_up: member.health.caught_up,
            lag: member
                .health
                .lag
                .map_or(-1, |lag| i64::try_from(lag).unwrap_or(i64::MAX)),
            last_ack_ms: member
                .health
                .ack_age
                .map_or(-1, |age| i64::try_from(millis(age)).unwrap_or(i64::MAX)),
            zone: member.zone.clone().unwrap_or_default(),
            score: member.score.map_or(-1, |score| score as i32),
            voter_for_ms: millis(member.voter_for),
            is_leader: member.node_id == report.leader,
            certificate: certificates
                .get(&member.node_id)
                .map(|print| data_encoding::HEXLOWER.encode(print))
                .unwrap_or_default(),
        })
        .collect();
    match &report.decision {
        Decision::Act { action, why } => {
            response.action = action.to_string();
            response.why = why.clone();
        }
        Decision::Wait { blocked, why } => {
            response.blocked = blocked.label().into();
            response.why = why.clone();
        }
    }
    response.outcome = match &report.outcome {
        None => String::new(),
        Some(Ok(())) => "done".into(),
        Some(Err(error)) => error.clone(),
    };
    Ok(response)
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `current` with the request's fields laid over it, or what is wrong with them.
pub fn merge(
    current: &PlacementTargets,
    request: &SetPlacementRequest,
) -> Result<PlacementTargets, ServiceError> {
    let mut targets = current.clone();
    if let Some(paused) = request.paused {
        targets.paused = paused;
    }
    if let Some(voters) = request.target_voters {
        if voters != 0 && (voters % 2 == 0 || voters > MAX_VOTERS) {
            return Err(ServiceError::BadField(format!(
                "target_voters {voters}: use 1, 3, 5 or 7 (an even group survives no more failures than the odd one below it), or 0 for automatic"
            )));
        }
        targets.voters = (voters != 0).then_some(voters);
    }
    if let Some(standbys) = request.target_standbys {
        if standbys > MAX_TARGET_STANDBYS {
            return Err(ServiceError::BadField(format!(
                "target_standbys {standbys}: at most {MAX_TARGET_STANDBYS}"
            )));
        }
        targets.standbys = standbys;
    }
    if let Some(min_quorum) = request.min_quorum {
        targets.min_quorum = (min_quorum != 0).then_some(min_quorum);
    }
    if let (Some(min_quorum), Some(voters)) = (targets.min_quorum, targets.voters) {
        if min_quorum > voters {
            return Err(ServiceError::BadField(format!(
                "min_quorum {min_quorum} is above the voter target {voters}"
            )));
        }
    }
    if targets.min_quorum.is_some_and(|quorum| quorum > MAX_VOTERS) {
        return Err(ServiceError::BadField(format!(
            "min_quorum: at most {MAX_VOTERS}"
        )));
    }
    Ok(targets)
}

/// Sets the targets (a Raft write from this node) and answers them as committed.
pub async fn set(
    replica: &Replica,
    request: &SetPlacementRequest,
) -> Result<PlacementTargets, ServiceError> {
    let current = read_placement_targets(replica.reader().db())?;
    let targets = merge(&current, request)?;
    replica
        .propose_accepted(
            SetPlacement {
                targets: targets.clone(),
            }
            .into(),
        )
        .await?;
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> SetPlacementRequest {
        SetPlacementRequest::default()
    }

    #[test]
    fn unset_fields_keep_their_values_and_zero_means_automatic() {
        let current = PlacementTargets {
            paused: true,
            voters: Some(5),
            standbys: 3,
            min_quorum: Some(3),
        };
        assert_eq!(merge(&current, &request()).unwrap(), current);
        let resumed = merge(
            &current,
            &SetPlacementRequest {
                paused: Some(false),
                target_voters: Some(0),
                min_quorum: Some(0),
                ..request()
            },
        )
        .unwrap();
        assert_eq!(
            resumed,
            PlacementTargets {
                paused: false,
                voters: None,
                standbys: 3,
                min_quorum: None,
            }
        );
    }

    #[test]
    fn nonsense_targets_are_refused_naming_the_field() {
        let current = PlacementTargets::default();
        for (bad, field) in [
            (
                SetPlacementRequest {
                    target_voters: Some(4),
                    ..request()
                },
                "target_voters 4",
            ),
            (
                SetPlacementRequest {
                    target_voters: Some(9),
                    ..request()
                },
                "target_voters 9",
            ),
            (
                SetPlacementRequest {
                    target_standbys: Some(17),
                    ..request()
                },
                "target_standbys 17",
            ),
            (
                SetPlacementRequest {
                    target_voters: Some(3),
                    min_quorum: Some(4),
                    ..request()
                },
                "min_quorum 4",
            ),
            (
                SetPlacementRequest {
                    min_quorum: Some(8),
                    ..request()
                },
                "min_quorum",
            ),
        ] {
            let error = merge(&current, &bad).unwrap_err().to_string();
            assert!(error.contains(field), "{error}");
        }
    }
}
