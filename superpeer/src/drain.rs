//! The graceful stop a super peer makes on SIGTERM, before [`crate::node::RunningNode::shutdown`]:
//!
//! ```text
//!  drain starts ─┬─ /readyz: 503 "shutting down"; new sessions refused (UNAVAILABLE, reason "draining")
//!                ├─ every session tells its leaf to move (leaf::members, spread = min(10 s, timeout / 2))
//!                ├─ leader? hand leadership to the voter with the most of the log, wait until it leads
//!                └─ wait until no session is left (if another member serves), or `drain_timeout`
//! ```
//!
//! Membership never changes here: a restart and a scale-down look the same from inside a pod, so removing a
//! member is always an explicit act (`vesperctl remove`, or the placement controller's rules). A node that is
//! the only member serving keeps its sessions; they end at shutdown, and their leaves retry.

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vesper_proto::v1::MemberRole;

use crate::replica::Replica;
use crate::sessions::SessionRegistry;

/// How often the drain looks at the sessions left.
const POLL: Duration = Duration::from_millis(100);
/// The longest wait for a new leader after a transfer was asked for; a transfer normally takes one round trip
/// and an election (milliseconds).
const TRANSFER_WAIT: Duration = Duration::from_secs(5);

/// What a drain did, for the log line an operator reads after the fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drained {
    /// The node that leads now, when this node led and handed over.
    pub handed_to: Option<u64>,
    /// Sessions still attached when the drain ended (their leaves retry after shutdown).
    pub sessions_left: usize,
    /// How long the drain took.
    pub took: Duration,
}

/// The voter to hand leadership to: the one whose replicated log reaches furthest (it can win the election at
/// once), the lowest id among equals. `None` when no other voter is known.
pub fn successor(me: u64, voters: &[u64], matched: &BTreeMap<u64, u64>) -> Option<u64> {
    voters
        .iter()
        .copied()
        .filter(|voter| *voter != me)
        .max_by_key(|voter| {
            (
                matched.get(voter).copied().unwrap_or(0),
                std::cmp::Reverse(*voter),
            )
        })
}

/// The narrow handles a drain works with.
#[derive(Clone)]
pub struct Drainer {
    pub replica: Replica,
    pub sessions: SessionRegistry,
    /// Cancelled when the drain starts: readiness, session refusal and the member view follow it.
    pub started: CancellationToken,
    pub timeout: Duration,
}

impl Drainer {
    /// Runs the drain; returns when it is done or `timeout` has passed. Calling it again does nothing new.
    pub async fn run(&self) -> Drained {
        let began = Instant::now();
        let deadline = began + self.timeout;
        self.started.cancel();
        tracing::info!(timeout = ?self.timeout, sessions = self.sessions.len(), "draining before stopping");
        let handed_to = self.hand_over_leadership(deadline).await;
        if self.another_member_serves() {
            while !self.sessions.is_empty() && Instant::now() < deadline {
                tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
            }
        }
        let drained = Drained {
            handed_to,
            sessions_left: self.sessions.len(),
            took: began.elapsed(),
        };
        tracing::info!(
            handed_to = ?drained.handed_to,
            sessions_left = drained.sessions_left,
            took = ?drained.took,
            "drained"
        );
        drained
    }

    /// Whether another member serves leaves (the ones here have somewhere to go).
    fn another_member_serves(&self) -> bool {
        let me = self.replica.node_id();
        self.replica.members().is_ok_and(|members| {
            members.iter().any(|member| {
                Some(member.node_id) != me && member.role != MemberRole::Removed as i32
            })
        })
    }

    /// When this node leads, asks the best placed voter to take over and waits (until `deadline`) until some
    /// other node leads. Returns the new leader, or `None` when this node did not lead or nobody took over.
    async fn hand_over_leadership(&self, deadline: Instant) -> Option<u64> {
        let raft = self.replica.raft().ok()?;
        let metrics = raft.metrics().borrow_watched().clone();
        let me = metrics.id;
        if metrics.current_leader != Some(me) {
            return None;
        }
        let voters: Vec<u64> = metrics.membership_config.membership().voter_ids().collect();
        let matched: BTreeMap<u64, u64> = metrics
            .replication
            .iter()
            .flatten()
            .map(|(node, log_id)| (*node, log_id.as_ref().map_or(0, |id| id.index)))
            .collect();
        let Some(to) = successor(me, &voters, &matched) else {
            tracing::info!("the only voter; nobody to hand leadership to");
            return None;
        };
        if let Err(error) = raft.trigger().transfer_leader(to).await {
            tracing::warn!(%error, to, "cannot ask for a leadership transfer");
            return None;
        }
        let wait = TRANSFER_WAIT.min(deadline.saturating_duration_since(Instant::now()));
        match raft
            .wait(Some(wait))
            .metrics(
                |metrics| metrics.current_leader.is_some_and(|leader| leader != me),
                "another node leads",
            )
            .await
        {
            Ok(metrics) => {
                let leader = metrics.current_leader;
                tracing::info!(to, leader = ?leader, "handed leadership over");
                leader
            }
            Err(error) => {
                tracing::warn!(%error, to, "no other node took over the leadership in time; stopping as leader");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// me, voters, matched index per node, the expected successor.
    type Case<'a> = (u64, &'a [u64], &'a [(u64, u64)], Option<u64>);

    #[test]
    fn the_successor_is_the_voter_with_the_most_of_the_log() {
        let matched = |pairs: &[(u64, u64)]| pairs.iter().copied().collect::<BTreeMap<_, _>>();
        // (me, voters, matched index per node) -> successor
        let table: &[Case] = &[
            (1, &[1, 2, 3], &[(2, 10), (3, 12)], Some(3)),
            (1, &[1, 2, 3], &[(2, 12), (3, 12)], Some(2)),
            // A standby far ahead is no successor: only voters lead.
            (1, &[1, 2], &[(2, 3), (4, 99)], Some(2)),
            // A voter not replicated to yet still counts (at index 0).
            (1, &[1, 2, 3], &[(2, 5)], Some(2)),
            (1, &[1, 2, 3], &[], Some(2)),
            (1, &[1], &[(2, 9)], None),
            (5, &[5], &[], None),
        ];
        for (me, voters, pairs, expected) in table {
            assert_eq!(
                successor(*me, voters, &matched(pairs)),
                *expected,
                "me {me}, voters {voters:?}, matched {pairs:?}"
            );
        }
    }

    #[test]
    fn the_successor_is_never_the_node_itself() {
        for me in 1..6u64 {
            let voters: Vec<u64> = (1..6).collect();
            let matched: BTreeMap<u64, u64> = voters.iter().map(|v| (*v, 100 - *v)).collect();
            let next = successor(me, &voters, &matched).expect("four other voters");
            assert_ne!(next, me);
            assert!(voters.contains(&next));
        }
    }
}
