//! The status page of the ops port and the JSON behind it.
//!
//! `/api/v1/cluster` joins what this node knows locally (its Raft position, the member table with addresses and
//! relay loads) with what only the leader knows (each member's health, lag and last acknowledgement, the
//! placement controller's last decision and its replicated journal). The leader's part is fetched through the
//! membership call path (`Admin.PlacementStatus` on the leader) at most once per [`LEADER_VIEW_TTL`], whatever
//! the number of viewers: the ops port needs no certificate, so a viewer must not be able to load the leader.
//!
//! The answer holds no message payloads, record keys or values. Candidates are counted, not listed; only the
//! journal and the adoption in progress name the candidates they concern.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vesper_proto::v1::membership_call::Call;
use vesper_proto::v1::membership_reply::Reply;
use vesper_proto::v1::{MemberRole, PlacementStatusRequest, PlacementStatusResponse};

use crate::membership::Membership;

/// How long the leader's view is reused before it is fetched again.
pub const LEADER_VIEW_TTL: Duration = Duration::from_secs(1);
/// How long one fetch of the leader's view may take (an election in progress answers with an error).
const LEADER_VIEW_TIMEOUT: Duration = Duration::from_secs(2);
/// Journal entries the page shows, newest last.
const JOURNAL_SHOWN: usize = 20;

/// The leader's placement status, or why it could not be had.
pub type Fetched = Arc<Result<PlacementStatusResponse, String>>;

/// The leader's view, fetched at most once per [`LEADER_VIEW_TTL`] (one fetch at a time; others wait for it).
pub struct LeaderView {
    membership: Membership,
    last: tokio::sync::Mutex<Option<(Instant, Fetched)>>,
}

impl LeaderView {
    pub fn new(membership: Membership) -> Self {
        Self {
            membership,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The leader's placement status, or why it could not be had.
    pub async fn get(&self) -> Fetched {
        let mut last = self.last.lock().await;
        if let Some((at, view)) = last.as_ref() {
            if at.elapsed() < LEADER_VIEW_TTL {
                return view.clone();
            }
        }
        let call = Call::PlacementStatus(PlacementStatusRequest {});
        let fetched = match tokio::time::timeout(
            LEADER_VIEW_TIMEOUT,
            crate::membership::on_leader(&self.membership, call),
        )
        .await
        {
            Ok(Ok(Reply::PlacementStatus(status))) => Ok(status),
            Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
            Ok(Err(status)) => Err(status.message().to_string()),
            Err(_) => Err(format!(
                "the leader did not answer within {LEADER_VIEW_TIMEOUT:?}"
            )),
        };
        let view = Arc::new(fetched);
        *last = Some((Instant::now(), view.clone()));
        view
    }
}

fn role_name(role: i32) -> &'static str {
    match MemberRole::try_from(role) {
        Ok(MemberRole::Voter) => "voter",
        Ok(MemberRole::Standby) => "standby",
        Ok(MemberRole::Removed) => "removed",
        _ => "unknown",
    }
}

/// The members as the page shows them: the local member table, with the leader's health figures where it has
/// them.
pub fn members(
    local: &[vesper_proto::v1::Member],
    leader: Option<&PlacementStatusResponse>,
) -> Value {
    let rows: Vec<Value> = local
        .iter()
        .map(|member| {
            let health = leader.and_then(|status| {
                status
                    .members
                    .iter()
                    .find(|seen| seen.node_id == member.node_id)
            });
            json!({
                "node_id": member.node_id,
                "role": role_name(member.role),
                "is_leader": member.is_leader,
                "leaf_addr": member.leaf_addr,
                "cluster_addr": member.cluster_addr,
                "zone": member.zone,
                "relay_active": member.relay_active,
                "relay_capacity": member.relay_capacity,
                "leaves": member.leaves,
                "health": health.map(|seen| seen.health.as_str()),
                "health_for_ms": health.map(|seen| seen.health_for_ms),
                "caught_up": health.map(|seen| seen.caught_up),
                "lag": health.map(|seen| seen.lag),
                "last_ack_ms": health.map(|seen| seen.last_ack_ms),
            })
        })
        .collect();
    Value::Array(rows)
}

/// The placement part of the page: the last decision and the newest journal entries.
pub fn placement(status: &PlacementStatusResponse) -> Value {
    let start = status.journal.len().saturating_sub(JOURNAL_SHOWN);
    let journal: Vec<Value> = status.journal[start..]
        .iter()
        .map(vesper_proto::json::placement_action)
        .collect();
    json!({
        "leader_id": status.leader_id,
        "term": status.term,
        "enabled": status.enabled,
        "target_voters": status.effective_target_voters,
        "min_quorum": status.effective_min_quorum,
        "decided_at_ms": status.decided_at_ms,
        "action": status.action,
        "blocked": status.blocked,
        "why": status.why,
        "outcome": status.outcome,
        "candidates": status.candidates.len(),
        "adoption": status.adoption,
        "journal": journal,
    })
}

/// The status page: one self-contained HTML file (no external assets) that polls `/api/v1/cluster`.
pub const PAGE: &str = include_str!("status.html");

#[cfg(test)]
mod tests {
    use super::*;
    use vesper_proto::v1::{Member, PlacementAction, PlacementMember};

    fn member(node_id: u64, role: MemberRole) -> Member {
        Member {
            node_id,
            role: role as i32,
            leaf_addr: format!("10.0.0.{node_id}:7400"),
            ..Member::default()
        }
    }

    #[test]
    fn members_carry_the_leaders_health_where_it_has_them() {
        let local = [
            member(1, MemberRole::Voter),
            member(2, MemberRole::Standby),
            member(3, MemberRole::Removed),
        ];
        let leader = PlacementStatusResponse {
            members: vec![PlacementMember {
                node_id: 2,
                health: "suspect".into(),
                lag: 7,
                last_ack_ms: 4000,
                ..PlacementMember::default()
            }],
            ..PlacementStatusResponse::default()
        };
        let rows = members(&local, Some(&leader));
        assert_eq!(rows[0]["role"], "voter");
        assert!(rows[0]["health"].is_null());
        assert_eq!(rows[1]["health"], "suspect");
        assert_eq!(rows[1]["lag"], 7);
        assert_eq!(rows[2]["role"], "removed");
        // Without the leader's view the table still lists every member.
        let rows = members(&local, None);
        assert_eq!(rows.as_array().map(Vec::len), Some(3));
    }

    #[test]
    fn the_journal_shown_is_the_newest_part() {
        let status = PlacementStatusResponse {
            journal: (1..=30)
                .map(|seq| PlacementAction {
                    seq,
                    ..PlacementAction::default()
                })
                .collect(),
            ..PlacementStatusResponse::default()
        };
        let shown = placement(&status);
        let journal = shown["journal"].as_array().expect("journal");
        assert_eq!(journal.len(), JOURNAL_SHOWN);
        assert_eq!(journal.last().expect("newest")["seq"], 30);
    }

    #[test]
    fn the_page_needs_nothing_from_elsewhere() {
        for outside in ["http://", "https://", "//cdn", "src=\"//"] {
            assert!(!PAGE.contains(outside), "the page refers to {outside}");
        }
        assert!(PAGE.contains("/api/v1/cluster"));
    }
}
