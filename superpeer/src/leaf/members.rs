//! The member list attached leaves follow: one task watches the cluster's serving super peers and publishes
//! a view; every session pushes it to its leaf (`MemberUpdate`) when it changes.
//!
//! Only what a leaf acts on counts as a change: which nodes serve and at which Leaf address, and whether this
//! node itself has left the cluster. Leader changes and voter/standby swaps push nothing, so 100 000 idle
//! sessions are not woken by an election.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use vesper_proto::v1::{Member, MemberRole, MemberUpdate};

use crate::replica::Replica;

/// How often the member list is read for a change.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Leaves that move spread their moves over this long.
pub const MOVE_SPREAD: Duration = Duration::from_secs(10);

/// What sessions push: the member list and whether this node has left.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemberView {
    pub members: Vec<Member>,
    pub leaving: bool,
}

impl MemberView {
    /// The frame a session sends.
    pub fn frame(&self) -> MemberUpdate {
        MemberUpdate {
            members: self.members.clone(),
            leaving: self.leaving,
            spread_ms: MOVE_SPREAD.as_millis() as u32,
        }
    }
}

/// The part of a view a leaf acts on: serving nodes with their Leaf addresses, and `leaving`.
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

/// The view now, once this node belongs to a cluster.
fn read(replica: &Replica) -> Option<MemberView> {
    let me = replica.node_id()?;
    let members = replica.members().ok()?;
    // Removed, or tombstoned by a removal that is about to take it out of the group.
    let tombstoned = replica
        .reader()
        .nodes()
        .ok()?
        .get(&me)
        .is_some_and(|entry| entry.removed);
    let leaving = tombstoned
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
    Some(MemberView { members, leaving })
}

/// Publishes the view into `view` whenever its signature changes, until `shutdown`.
pub async fn run(
    replica: Replica,
    view: watch::Sender<Arc<MemberView>>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Some(now) = read(&replica) else { continue };
        let shape = signature(&now);
        // The first view is what Welcomes already carried (a session started before it hears it once).
        match &last {
            Some(previous) if *previous == shape => continue,
            None => {
                view.send_replace(Arc::new(now));
            }
            Some(_) => {
                tracing::info!(
                    serving = shape.0.len(),
                    leaving = shape.1,
                    "the member list changed; telling the leaves"
                );
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
            leaving: false,
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
}
