//! Leaf load: each super peer reports how many leaf sessions it holds through Raft, and one that holds clearly
//! more than the mean asks part of its leaves to move to the members below it.
//!
//! The report is coarse (a change of at least 1/16 of the last count, or any change once [`SETTLE`] has
//! passed), so 100 000 attaching leaves cost a few commands per second, not one per session. The decision to
//! shed is [`shed`], a pure function of the serving members' counts; `leaf::members` calls it and pushes the
//! result as `MemberUpdate.shed`. Each leaf then moves on its own with the probability it names (see the
//! library's `follow` module), so no coordinator is needed and the expected number of leaves that move is the
//! excess over the mean.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vesper_proto::v1::{Member, MemberRole, Shed, ShedTarget};

use crate::replica::Replica;
use crate::sessions::SessionRegistry;

/// How often a node looks at its session count.
const CHECK: Duration = Duration::from_secs(1);
/// Any change is reported once the last report is this old (smaller changes wait for it).
pub const SETTLE: Duration = Duration::from_secs(5);
/// A node reports its count at least this often, changed or not.
const REFRESH: Duration = Duration::from_secs(300);
/// Most targets one shed request names (the largest deficits first).
pub const MAX_SHED_TARGETS: usize = 64;

/// Whether a count must be reported: the first one, a change of at least 1/16 of the last count (at least
/// one session), any change once `SETTLE` passed, or anything once `REFRESH` passed.
pub fn report_due(last: Option<(u32, Instant)>, count: u32, now: Instant) -> bool {
    let Some((reported, at)) = last else {
        return true;
    };
    let age = now.saturating_duration_since(at);
    let step = (reported / 16).max(1);
    age >= REFRESH || (count != reported && (count.abs_diff(reported) >= step || age >= SETTLE))
}

/// Reports this node's leaf session count through Raft whenever [`report_due`] says so, until shutdown.
pub async fn report(replica: Replica, sessions: SessionRegistry, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(CHECK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported: Option<(u32, Instant)> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Some(node_id) = replica.node_id() else {
            continue;
        };
        let count = u32::try_from(sessions.len()).unwrap_or(u32::MAX);
        let now = Instant::now();
        if !report_due(reported, count, now) {
            continue;
        }
        let op: crate::command::Op = crate::command::LeafLoad {
            node_id,
            sessions: count,
        }
        .into();
        match replica.propose(op).await {
            Ok(_) => reported = Some((count, now)),
            Err(error) => tracing::debug!(%error, "leaf load report not committed; trying again"),
        }
    }
}

/// When a super peer counts as overloaded (the `placement.balance_*` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceRules {
    /// It holds more than the mean by this many percent of the mean...
    pub tolerance_percent: u32,
    /// ...and by at least this many leaves.
    pub min_excess: u32,
}

/// What an overloaded super peer asks of its leaves, or None when it is not overloaded. `me` is this node,
/// `mine` its own session count now (fresher than its replicated report), `members` the member list with the
/// other members' last reports. Only serving members count (not removed, with a Leaf address).
pub fn shed(me: u64, mine: u32, members: &[Member], rules: BalanceRules) -> Option<Shed> {
    let serving: Vec<(&Member, u32)> = members
        .iter()
        .filter(|m| m.role != MemberRole::Removed as i32 && !m.leaf_addr.is_empty())
        .map(|m| (m, if m.node_id == me { mine } else { m.leaves }))
        .collect();
    if serving.len() < 2 || !serving.iter().any(|(m, _)| m.node_id == me) {
        return None;
    }
    let total: u64 = serving.iter().map(|(_, count)| u64::from(*count)).sum();
    let mean = total as f64 / serving.len() as f64;
    let excess = f64::from(mine) - mean;
    let over_share = f64::from(mine) > mean * (1.0 + f64::from(rules.tolerance_percent) / 100.0);
    if !over_share || excess < f64::from(rules.min_excess.max(1)) {
        return None;
    }
    let mut targets: Vec<ShedTarget> = serving
        .iter()
        .filter(|(m, count)| m.node_id != me && f64::from(*count) < mean)
        .map(|(m, count)| ShedTarget {
            leaf_addr: m.leaf_addr.clone(),
            weight: (mean - f64::from(*count)).ceil() as u32,
        })
        .collect();
    if targets.is_empty() {
        return None;
    }
    targets.sort_by(|a, b| b.weight.cmp(&a.weight).then(a.leaf_addr.cmp(&b.leaf_addr)));
    targets.truncate(MAX_SHED_TARGETS);
    let permille = ((excess / f64::from(mine)) * 1000.0).floor() as u32;
    Some(Shed {
        permille: permille.min(1000),
        targets,
        round: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RULES: BalanceRules = BalanceRules {
        tolerance_percent: 25,
        min_excess: 4,
    };

    fn members(counts: &[(u64, u32)]) -> Vec<Member> {
        counts
            .iter()
            .map(|(id, leaves)| Member {
                node_id: *id,
                leaf_addr: format!("n{id}:1"),
                role: MemberRole::Voter as i32,
                leaves: *leaves,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn reports_are_coarse_but_every_change_lands_within_the_settle_time() {
        let t = Instant::now();
        assert!(report_due(None, 0, t), "the first count is reported");
        let last = Some((160, t));
        assert!(!report_due(last, 160, t + REFRESH / 2), "no change");
        assert!(
            !report_due(last, 165, t + Duration::from_secs(1)),
            "below 1/16"
        );
        assert!(
            report_due(last, 170, t + Duration::from_secs(1)),
            "1/16 or more"
        );
        assert!(
            report_due(last, 165, t + SETTLE),
            "a small change after the settle time"
        );
        assert!(report_due(last, 160, t + REFRESH), "a refresh");
        // Small counts: every change of one session is a step.
        assert!(report_due(Some((3, t)), 4, t));
        assert!(report_due(Some((0, t)), 1, t));
    }

    #[test]
    fn only_a_clear_excess_over_the_mean_sheds_and_only_towards_members_below_it() {
        // 20 and 0: mean 10, half of this node's leaves should go to node 2.
        let shed20 = shed(1, 20, &members(&[(1, 0), (2, 0)]), RULES).unwrap();
        assert_eq!(shed20.permille, 500);
        assert_eq!(shed20.targets.len(), 1);
        assert_eq!(shed20.targets[0].leaf_addr, "n2:1");
        assert_eq!(shed20.targets[0].weight, 10);
        // Its own report is ignored for its fresher count: with 20 reported but 5 now, it has no excess to shed.
        assert_eq!(shed(1, 5, &members(&[(1, 20), (2, 0)]), RULES), None);
        // 12 against 8: 20 % over the mean of 10, under the tolerance.
        assert_eq!(shed(1, 12, &members(&[(1, 0), (2, 8)]), RULES), None);
        // 3 against 0: over the share, but 1.5 leaves of excess is below min_excess.
        assert_eq!(shed(1, 3, &members(&[(1, 0), (2, 0)]), RULES), None);
        // Alone, or listed as removed: nobody to shed to.
        assert_eq!(shed(1, 50, &members(&[(1, 0)]), RULES), None);
        let mut gone = members(&[(1, 0), (2, 0)]);
        gone[1].role = MemberRole::Removed as i32;
        assert_eq!(shed(1, 50, &gone, RULES), None);
        // Three members: only the one below the mean gets leaves, by its deficit.
        let three = shed(1, 30, &members(&[(1, 0), (2, 15), (3, 0)]), RULES).unwrap();
        let names: Vec<(&str, u32)> = three
            .targets
            .iter()
            .map(|t| (t.leaf_addr.as_str(), t.weight))
            .collect();
        assert_eq!(names, [("n3:1", 15)]);
        assert_eq!(three.permille, 500, "(30 - 15) / 30");
    }

    proptest! {
        /// Whatever the counts: a shed comes only from a node above the mean, asks for at most its excess
        /// (so it never ends below the mean in expectation), and names only members below the mean.
        #[test]
        fn a_shed_never_asks_for_more_than_the_excess(
            mine in 0u32..100_000,
            others in proptest::collection::vec(0u32..100_000, 1..10),
        ) {
            let mut counts = vec![(1u64, 0u32)];
            counts.extend(others.iter().enumerate().map(|(i, c)| (i as u64 + 2, *c)));
            let list = members(&counts);
            if let Some(plan) = shed(1, mine, &list, RULES) {
                let total: u64 = u64::from(mine) + others.iter().map(|c| u64::from(*c)).sum::<u64>();
                let mean = total as f64 / counts.len() as f64;
                prop_assert!(f64::from(mine) > mean);
                prop_assert!(plan.permille <= 1000);
                let asked = f64::from(plan.permille) / 1000.0 * f64::from(mine);
                prop_assert!(asked <= f64::from(mine) - mean + 1e-6);
                for target in &plan.targets {
                    let count = list.iter().find(|m| m.leaf_addr == target.leaf_addr).unwrap().leaves;
                    prop_assert!(f64::from(count) < mean && target.weight > 0);
                }
            }
        }
    }
}
