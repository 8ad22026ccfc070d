//! Following the cluster's members: what a leaf does with a `MemberUpdate`.
//!
//! The super peer says which super peers serve and whether it is leaving; the leaf decides, on its own and at
//! random, whether to move, so that no coordinator is needed and the leaves spread evenly:
//!
//! - its super peer is leaving: move to any other serving member;
//! - members were added: move to one of them with probability added / serving (if every member carried the
//!   same load before, each then carries 1 / serving of it);
//! - otherwise stay.
//!
//! The move happens at a random time within the spread the super peer names, so a thousand leaves do not
//! attach in the same millisecond; the new session is attached before the old one says goodbye.

use std::collections::BTreeSet;
use std::time::Duration;

use vesper_proto::v1::{Member, MemberRole, MemberUpdate};

/// Longest spread a super peer may ask for (a larger one is cut to this).
pub const MAX_SPREAD: Duration = Duration::from_secs(300);

/// Leaf addresses of the serving members.
pub fn serving(members: &[Member]) -> Vec<String> {
    let mut addresses: Vec<String> = members
        .iter()
        .filter(|member| member.role != MemberRole::Removed as i32 && !member.leaf_addr.is_empty())
        .map(|member| member.leaf_addr.clone())
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// Where to move after `update`, given the members the leaf knew before and the address of its own super
/// peer; `roll` in [0, 1) and `pick` are the random draws (which move, and which target).
pub fn plan(
    before: &[String],
    update: &MemberUpdate,
    current: &str,
    roll: f64,
    pick: usize,
) -> Option<String> {
    let now = serving(&update.members);
    if update.leaving {
        let others: Vec<&String> = now.iter().filter(|address| *address != current).collect();
        return (!others.is_empty()).then(|| others[pick % others.len()].clone());
    }
    let known: BTreeSet<&String> = before.iter().collect();
    let added: Vec<&String> = now
        .iter()
        .filter(|address| !known.contains(address) && *address != current)
        .collect();
    if added.is_empty() || now.is_empty() {
        return None;
    }
    let share = added.len() as f64 / now.len() as f64;
    (roll < share).then(|| added[pick % added.len()].clone())
}

/// When to move: a random point within the spread the super peer asked for (at most [`MAX_SPREAD`]).
pub fn delay(update: &MemberUpdate, roll: f64) -> Duration {
    let spread = Duration::from_millis(u64::from(update.spread_ms)).min(MAX_SPREAD);
    spread.mul_f64(roll.clamp(0.0, 1.0))
}

/// Shortest and longest wait before a leaf on a leaving super peer tries to move again after a failed move.
pub const RETRY_MIN: Duration = Duration::from_millis(500);
pub const RETRY_MAX: Duration = Duration::from_secs(2);

/// When to try again after a failed move away from a leaving super peer (`roll` in [0, 1)).
pub fn retry_delay(roll: f64) -> Duration {
    RETRY_MIN + (RETRY_MAX - RETRY_MIN).mul_f64(roll.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(address: &str, role: MemberRole) -> Member {
        Member {
            leaf_addr: address.into(),
            role: role as i32,
            ..Default::default()
        }
    }

    fn update(addresses: &[(&str, MemberRole)], leaving: bool) -> MemberUpdate {
        MemberUpdate {
            members: addresses
                .iter()
                .map(|(address, role)| member(address, *role))
                .collect(),
            leaving,
            spread_ms: 10_000,
        }
    }

    fn known(addresses: &[&str]) -> Vec<String> {
        addresses
            .iter()
            .map(|address| address.to_string())
            .collect()
    }

    #[test]
    fn a_failed_move_away_is_tried_again_within_the_retry_bounds() {
        for roll in [0.0, 0.25, 0.999, -1.0, 7.0] {
            let wait = retry_delay(roll);
            assert!((RETRY_MIN..=RETRY_MAX).contains(&wait), "{roll}: {wait:?}");
        }
        assert_eq!(retry_delay(0.0), RETRY_MIN);
        assert_eq!(retry_delay(1.0), RETRY_MAX);
    }

    #[test]
    fn a_leaving_super_peer_sends_every_leaf_to_another() {
        use MemberRole::*;
        let leaving = update(&[("a", Voter), ("b", Voter), ("c", Removed)], true);
        for pick in 0..4 {
            let target = plan(&known(&["a", "b"]), &leaving, "a", 0.99, pick).unwrap();
            assert_eq!(target, "b", "never itself, never a removed member");
        }
        // Nobody else to go to: stay.
        let alone = update(&[("a", Voter)], true);
        assert_eq!(plan(&known(&["a"]), &alone, "a", 0.0, 0), None);
    }

    #[test]
    fn added_members_draw_their_share_and_nothing_else_moves_anyone() {
        use MemberRole::*;
        let before = known(&["a", "b"]);
        let grown = update(&[("a", Voter), ("b", Voter), ("c", Standby)], false);
        // One of three serving is new: a third of the leaves move (roll below 1/3), all to the new one.
        assert_eq!(plan(&before, &grown, "a", 0.30, 7), Some("c".into()));
        assert_eq!(plan(&before, &grown, "a", 0.34, 7), None);
        // A change that adds nobody (a member retired, a role changed): stay.
        let shrunk = update(&[("a", Voter), ("b", Removed)], false);
        assert_eq!(plan(&before, &shrunk, "a", 0.0, 0), None);
        let same = update(&[("a", Standby), ("b", Voter)], false);
        assert_eq!(plan(&before, &same, "a", 0.0, 0), None);
        // The leaf's own super peer is never "added".
        let own = update(&[("a", Voter), ("b", Voter)], false);
        assert_eq!(plan(&known(&["b"]), &own, "a", 0.0, 0), None);
    }

    #[test]
    fn moves_spread_evenly_over_many_leaves() {
        use MemberRole::*;
        // 3000 leaves on two members; two are added: about 1500 should move, 750 to each new one.
        let before = known(&["a", "b"]);
        let grown = update(
            &[("a", Voter), ("b", Voter), ("c", Voter), ("d", Standby)],
            false,
        );
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for leaf in 0..3000u64 {
            // A fixed low-discrepancy sequence stands in for the random draws.
            let roll = (leaf as f64 * 0.618_033_988_75).fract();
            if let Some(target) = plan(&before, &grown, "a", roll, leaf as usize) {
                *counts.entry(target).or_default() += 1;
            }
        }
        let moved: usize = counts.values().sum();
        assert!((1450..=1550).contains(&moved), "{counts:?}");
        assert!(
            counts.values().all(|count| (700..=800).contains(count)),
            "{counts:?}"
        );
    }

    #[test]
    fn the_delay_stays_within_the_spread_and_its_cap() {
        let mut asked = update(&[], false);
        assert_eq!(delay(&asked, 0.5), Duration::from_secs(5));
        assert_eq!(delay(&asked, 1.5), Duration::from_secs(10));
        asked.spread_ms = u32::MAX;
        assert_eq!(delay(&asked, 1.0), MAX_SPREAD);
    }
}
