//! Following the cluster's members: what a leaf does with a `MemberUpdate`.
//!
//! The super peer says which super peers serve and whether it is leaving; the leaf decides, on its own and at
//! random, whether to move, so that no coordinator is needed and the leaves spread evenly:
//!
//! - its super peer is leaving: move to any other serving member;
//! - members were added: move to one of them with probability added / serving (if every member carried the
//!   same load before, each then carries 1 / serving of it);
//! - its super peer asks to shed (it holds clearly more leaves than the mean): move with the probability it
//!   names to one of the members it names, picked in proportion to their weights (how many leaves each lacks);
//! - otherwise stay.
//!
//! The move happens at a random time within the spread the super peer names, so a thousand leaves do not
//! attach in the same millisecond; the new session is attached before the old one says goodbye.

use std::collections::BTreeSet;
use std::time::Duration;

use vesper_proto::v1::{Member, MemberRole, MemberUpdate, Shed};

/// Longest spread a super peer may ask for (a larger one is cut to this).
pub const MAX_SPREAD: Duration = Duration::from_secs(300);

/// Most shed targets a leaf looks at (a super peer names at most this many; more are ignored).
pub const MAX_SHED_TARGETS: usize = 64;

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
    if !added.is_empty() {
        let share = added.len() as f64 / now.len() as f64;
        return (roll < share).then(|| added[pick % added.len()].clone());
    }
    shed_target(&now, update.shed.as_ref()?, current, roll, pick)
}

/// Where to go when the super peer asks to shed: with probability `permille` / 1000, one of its targets that
/// serves and is not `current`, picked in proportion to its weight.
fn shed_target(
    serving: &[String],
    shed: &Shed,
    current: &str,
    roll: f64,
    pick: usize,
) -> Option<String> {
    if roll >= f64::from(shed.permille.min(1000)) / 1000.0 {
        return None;
    }
    let targets: Vec<(&String, u64)> = shed
        .targets
        .iter()
        .take(MAX_SHED_TARGETS)
        .filter(|target| target.weight > 0 && target.leaf_addr != current)
        .filter_map(|target| {
            let address = serving
                .iter()
                .find(|address| **address == target.leaf_addr)?;
            Some((address, u64::from(target.weight)))
        })
        .collect();
    let total: u64 = targets.iter().map(|(_, weight)| weight).sum();
    if total == 0 {
        return None;
    }
    let mut point = pick as u64 % total;
    for (address, weight) in targets {
        if point < weight {
            return Some(address.clone());
        }
        point -= weight;
    }
    None
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
            shed: None,
        }
    }

    fn shed(permille: u32, targets: &[(&str, u32)]) -> Option<Shed> {
        Some(Shed {
            permille,
            targets: targets
                .iter()
                .map(|(address, weight)| vesper_proto::v1::ShedTarget {
                    leaf_addr: address.to_string(),
                    weight: *weight,
                })
                .collect(),
            round: 1,
        })
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
    fn a_shed_request_moves_its_share_to_serving_targets_only() {
        use MemberRole::*;
        let before = known(&["a", "b", "c"]);
        let mut asked = update(&[("a", Voter), ("b", Voter), ("c", Removed)], false);
        asked.shed = shed(250, &[("b", 3), ("c", 5), ("zz", 9), ("a", 4)]);
        // A quarter moves: only to b, since c is removed, zz unknown and a is where the leaf already is.
        for pick in 0..20 {
            assert_eq!(plan(&before, &asked, "a", 0.24, pick), Some("b".into()));
            assert_eq!(plan(&before, &asked, "a", 0.25, pick), None);
        }
        // Nothing left to move to, or nothing to move: stay.
        asked.shed = shed(1000, &[("c", 5), ("b", 0)]);
        assert_eq!(plan(&before, &asked, "a", 0.0, 0), None);
        asked.shed = shed(0, &[("b", 5)]);
        assert_eq!(plan(&before, &asked, "a", 0.0, 0), None);
        // A permille past 1000 is read as 1000.
        asked.shed = shed(u32::MAX, &[("b", 1)]);
        assert_eq!(plan(&before, &asked, "a", 0.999, 0), Some("b".into()));
    }

    #[test]
    fn a_shed_request_splits_by_weight_and_added_members_take_precedence() {
        use MemberRole::*;
        let before = known(&["a", "b", "c"]);
        let mut asked = update(&[("a", Voter), ("b", Voter), ("c", Voter)], false);
        asked.shed = shed(500, &[("b", 3), ("c", 1)]);
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for leaf in 0..4000u64 {
            let roll = (leaf as f64 * 0.618_033_988_75).fract();
            if let Some(target) = plan(&before, &asked, "a", roll, (leaf * 7919) as usize) {
                *counts.entry(target).or_default() += 1;
            }
        }
        assert!(
            (1950..=2050).contains(&counts.values().sum::<usize>()),
            "{counts:?}"
        );
        assert!((1400..=1600).contains(&counts["b"]), "{counts:?}");
        assert!((400..=600).contains(&counts["c"]), "{counts:?}");
        // Targets past the cap are not looked at.
        let many: Vec<(String, u32)> = (0..100).map(|i| (format!("m{i:03}"), 1)).collect();
        let mut members: Vec<(&str, MemberRole)> =
            many.iter().map(|(a, _)| (a.as_str(), Voter)).collect();
        members.push(("a", Voter));
        let mut wide = update(&members, false);
        let named: Vec<(&str, u32)> = many.iter().map(|(a, w)| (a.as_str(), *w)).collect();
        wide.shed = shed(1000, &named);
        let all = serving(&wide.members);
        for pick in 0..500 {
            let target = plan(&all, &wide, "a", 0.0, pick).unwrap();
            assert!(target.as_str() < "m064", "{target}");
        }
        // A member added in the same update is served first; the shed draw is not made on top.
        let mut grown = update(
            &[("a", Voter), ("b", Voter), ("c", Voter), ("d", Voter)],
            false,
        );
        grown.shed = shed(1000, &[("b", 1)]);
        assert_eq!(plan(&before, &grown, "a", 0.2, 0), Some("d".into()));
        assert_eq!(plan(&before, &grown, "a", 0.3, 0), None);
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
