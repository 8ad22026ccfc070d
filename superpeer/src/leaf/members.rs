//! The member list attached leaves follow: one task watches the cluster's serving super peers and publishes
//! a view; every session pushes it to its leaf (`MemberUpdate`) when it changes.
//!
//! Only what a leaf acts on counts as a change: which nodes serve and at which Leaf address, whether this
//! node itself has left the cluster, and a new request to shed leaves (`leaf::load::shed`: this node holds
//! clearly more than the mean). Leader changes, voter/standby swaps and load reports push nothing, so 100 000
//! idle sessions are not woken by an election. A shed request is made at most once per
//! `placement.balance_interval`, and not within that time of a change of the serving members (leaves are
//! then still spreading onto an added member).
//!
//! A node that drains (SIGTERM, [`crate::node::RunningNode::drain`]) is `leaving` from then on too: its
//! sessions tell their leaves to move, over a spread that fits in the drain, and new sessions are refused.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vesper_proto::v1::{Member, MemberRole, MemberUpdate, Shed};

use super::load::BalanceRules;
use crate::replica::Replica;
use crate::sessions::SessionRegistry;

/// How often the member list is read for a change.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Leaves that move spread their moves over this long.
pub const MOVE_SPREAD: Duration = Duration::from_secs(10);
// A shed request must not come while the leaves of the last one may still be moving.
const _: () = assert!(
    MOVE_SPREAD.as_millis() <= crate::placement::settings::MIN_BALANCE_INTERVAL.as_millis()
);

/// What sessions push: the member list, whether this node has left, and a request to shed leaves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemberView {
    pub members: Vec<Member>,
    /// Leaves must move away: this node was removed, or it drains.
    pub leaving: bool,
    /// This node drains before it stops (it is leaving, but stays a member).
    pub draining: bool,
    /// The spread leaves move over, when not [`MOVE_SPREAD`] (a drain has less time).
    pub spread: Option<Duration>,
    pub shed: Option<Shed>,
}

impl MemberView {
    /// The frame a session sends.
    pub fn frame(&self) -> MemberUpdate {
        let spread = self.spread.unwrap_or(MOVE_SPREAD);
        MemberUpdate {
            members: self.members.clone(),
            leaving: self.leaving,
            spread_ms: u32::try_from(spread.as_millis()).unwrap_or(u32::MAX),
            shed: self.shed.clone(),
        }
    }
}

/// The serving nodes with their Leaf addresses, and `leaving`: what a leaf acts on besides a shed request.
fn signature(view: &MemberView) -> (Vec<(u64, String)>, bool) {
    let mut serving: Vec<(u64, String)> = view
        .members
        .iter()
        .filter(|member| member.role != MemberRole::Removed as i32)
        .map(|member| (member.node_id, member.leaf_addr.clone()))
        .collect();
    serving.sort();
    (serving, view.leaving)
}

/// When this node last asked leaves to move, and whether it may ask now.
#[derive(Debug)]
struct Balancer {
    rules: BalanceRules,
    interval: Duration,
    /// The serving members last changed then (a shed waits `interval` after it).
    changed_at: Instant,
    /// The last shed request, if any.
    shed_at: Option<Instant>,
    round: u64,
}

impl Balancer {
    /// A new request to shed, when one is due and this node is overloaded.
    fn due(&mut self, me: u64, mine: u32, view: &MemberView, now: Instant) -> Option<Shed> {
        let quiet = |since: Instant| now.saturating_duration_since(since) >= self.interval;
        if view.leaving || !quiet(self.changed_at) || !self.shed_at.is_none_or(quiet) {
            return None;
        }
        let mut shed = super::load::shed(me, mine, &view.members, self.rules)?;
        self.round += 1;
        self.shed_at = Some(now);
        shed.round = self.round;
        Some(shed)
    }
}

/// The view now, once this node belongs to a cluster; `drain` is the drain's spread once the node drains.
fn read(replica: &Replica, drain: Option<Duration>) -> Option<MemberView> {
    let me = replica.node_id()?;
    let members = replica.members().ok()?;
    // Removed, or tombstoned by a removal that is about to take it out of the group.
    let tombstoned = replica
        .reader()
        .nodes()
        .ok()?
        .get(&me)
        .is_some_and(|entry| entry.removed);
    let leaving = drain.is_some()
        || tombstoned
        || !members
            .iter()
            .any(|member| member.node_id == me && member.role != MemberRole::Removed as i32);
    let mut members = members;
    if leaving {
        // Listed as removed: a leaf that reached this node through another name (a DNS seed) must not pick it.
        for member in members.iter_mut().filter(|member| member.node_id == me) {
            member.role = MemberRole::Removed as i32;
        }
    }
    Some(MemberView {
        members,
        leaving,
        draining: drain.is_some(),
        spread: drain,
        shed: None,
    })
}

/// The drain of this node: cancelled when it starts, and the spread its leaves then move over.
#[derive(Debug, Clone)]
pub struct Drain {
    pub started: CancellationToken,
    pub spread: Duration,
}

/// How this node evens out its leaf load (from the `[placement]` settings).
#[derive(Debug, Clone, Copy)]
pub struct Balance {
    pub rules: BalanceRules,
    /// Shortest time between two shed requests, and after the serving members changed.
    pub interval: Duration,
}

impl Balance {
    pub fn from_config(config: &crate::placement::settings::PlacementConfig) -> Self {
        Balance {
            rules: BalanceRules {
                tolerance_percent: config.balance_tolerance_percent,
                min_excess: config.balance_min_excess,
            },
            interval: config.balance_interval,
        }
    }
}

/// Publishes the view into `view` whenever its signature changes or leaves should be shed, until `shutdown`.
pub async fn run(
    replica: Replica,
    sessions: SessionRegistry,
    balance: Balance,
    drain: Drain,
    view: watch::Sender<Arc<MemberView>>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    let mut balancer = Balancer {
        rules: balance.rules,
        interval: balance.interval,
        changed_at: Instant::now(),
        shed_at: None,
        round: 0,
    };
    loop {
        // A drain is told at once, not at the next tick.
        let draining = drain.started.is_cancelled();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = drain.started.cancelled(), if !draining => {}
            _ = ticker.tick() => {}
        }
        let spread = drain.started.is_cancelled().then_some(drain.spread);
        let (Some(me), Some(mut now)) = (replica.node_id(), read(&replica, spread)) else {
            continue;
        };
        let shape = signature(&now);
        // The first view is what Welcomes already carried (a session started before it hears it once).
        match &last {
            Some(previous) if *previous == shape => {
                let mine = u32::try_from(sessions.len()).unwrap_or(u32::MAX);
                let Some(shed) = balancer.due(me, mine, &now, Instant::now()) else {
                    continue;
                };
                tracing::info!(
                    sessions = mine,
                    share = f64::from(shed.permille) / 1000.0,
                    targets = shed.targets.len(),
                    round = shed.round,
                    "holding clearly more leaves than the mean; asking a share of them to move"
                );
                now.shed = Some(shed);
                view.send_replace(Arc::new(now));
            }
            None => {
                view.send_replace(Arc::new(now));
            }
            Some(_) => {
                tracing::info!(
                    serving = shape.0.len(),
                    leaving = shape.1,
                    "the member list changed; telling the leaves"
                );
                balancer.changed_at = Instant::now();
                view.send_replace(Arc::new(now));
            }
        }
        last = Some(shape);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, addr: &str, role: MemberRole, leader: bool) -> Member {
        Member {
            node_id: id,
            leaf_addr: addr.into(),
            role: role as i32,
            is_leader: leader,
            ..Default::default()
        }
    }

    fn view(members: &[(u64, &str, MemberRole, bool)]) -> MemberView {
        MemberView {
            members: members
                .iter()
                .map(|(id, addr, role, leader)| member(*id, addr, *role, *leader))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_serving_nodes_and_leaving_change_the_signature() {
        use MemberRole::*;
        let base = view(&[(1, "a:1", Voter, true), (2, "b:1", Voter, false)]);
        // A new leader, or a voter turned standby: nothing for a leaf to do.
        let swapped = view(&[(1, "a:1", Standby, false), (2, "b:1", Voter, true)]);
        assert_eq!(signature(&base), signature(&swapped));
        let added = view(&[
            (1, "a:1", Voter, true),
            (2, "b:1", Voter, false),
            (3, "c:1", Standby, false),
        ]);
        assert_ne!(signature(&base), signature(&added));
        let retired = view(&[(1, "a:1", Voter, true), (2, "b:1", Removed, false)]);
        assert_ne!(signature(&base), signature(&retired));
        let moved = view(&[(1, "a:1", Voter, true), (2, "b:2", Voter, false)]);
        assert_ne!(signature(&base), signature(&moved));
        let leaving = MemberView {
            leaving: true,
            ..base.clone()
        };
        assert_ne!(signature(&base), signature(&leaving));
    }

    #[test]
    fn a_drain_asks_for_its_own_spread_and_other_views_for_the_usual_one() {
        let usual = view(&[(1, "a:1", MemberRole::Voter, true)]);
        assert_eq!(usual.frame().spread_ms, MOVE_SPREAD.as_millis() as u32);
        assert!(!usual.frame().leaving);
        let draining = MemberView {
            leaving: true,
            draining: true,
            spread: Some(Duration::from_secs(4)),
            ..usual
        };
        let frame = draining.frame();
        assert_eq!(frame.spread_ms, 4000);
        assert!(frame.leaving);
    }
}
