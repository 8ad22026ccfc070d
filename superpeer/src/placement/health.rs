//! Member health over time, as the leader sees it: openraft's per-member heartbeat and replication metrics,
//! sampled every update interval, turned into the classes [`decide`](super::decide) reads.
//!
//! Contact and progress are kept apart. A member is *healthy* while it acknowledges the leader within
//! `last_contact_threshold`; *stable* once it has been healthy without a break for `stabilization` (a flap
//! starts the clock again, as raft-autopilot's `StableSince`); *suspect* while it has been silent for less
//! than the dead time; *dead* after that (one time for voters, a longer one for standbys). Separately, it is
//! *caught up* while its matched log index trails the leader's last index by at most `max_trailing_logs`. A
//! learner that is still copying the log answers heartbeats, so it is healthy but not caught up, and is never
//! mistaken for a dead one.
//!
//! A fresh leader has heard from nobody yet: every member starts as silent since the moment this node began
//! to lead, so nobody is declared dead (or stable) before the leader has watched it for the full time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::decide::Health;

/// The timers and bounds of health, from the `[placement]` config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthRules {
    pub last_contact_threshold: Duration,
    pub max_trailing_logs: u64,
    pub stabilization: Duration,
    pub dead_voter_after: Duration,
    pub dead_standby_after: Duration,
    /// A standby that answers but has not caught up for this long is stuck: it counts as dead (and is
    /// retired), so it cannot hold up the next adoption for ever (k3s's stuck learners).
    pub stuck_standby_after: Duration,
}

/// One member in one sample of the leader's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberSample {
    pub voter: bool,
    /// Time since the member last acknowledged the leader; `None` if it never did while this node led.
    pub ack_age: Option<Duration>,
    /// The member's matched log index, if replication to it has matched anything.
    pub matched: Option<u64>,
}

/// What the tracker knows of one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Track {
    /// Healthy without a break since then (`None` while unhealthy).
    healthy_since: Option<Instant>,
    /// Unhealthy without a break since then (`None` while healthy).
    unhealthy_since: Option<Instant>,
    voter: bool,
    /// A voter without a break since then, as far as this leader has seen (`None` while a standby).
    voter_since: Option<Instant>,
    caught_up: bool,
    /// Not caught up without a break since then (`None` while caught up).
    behind_since: Option<Instant>,
    ack_age: Option<Duration>,
    lag: Option<u64>,
}

/// A member's state as reported to operators and to `decide`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberHealth {
    pub health: Health,
    pub caught_up: bool,
    /// How long it has been in its current health (healthy or not).
    pub for_duration: Duration,
    pub ack_age: Option<Duration>,
    /// Entries it trails the leader's last index by (`None` when nothing has matched yet).
    pub lag: Option<u64>,
    /// A standby that answers but has not caught up for `stuck_standby_after` (it then counts as dead).
    pub stuck: bool,
}

/// Health of every member, updated from samples while this node leads.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    rules: HealthRules,
    leader: u64,
    tracks: BTreeMap<u64, Track>,
    /// The first sample: since then this node has led (what the leader's own "for" shows).
    first_sample: Option<Instant>,
}

impl HealthTracker {
    /// A tracker for leader `leader`, which began to lead (and to watch) at `now`.
    pub fn new(rules: HealthRules, leader: u64) -> Self {
        Self {
            rules,
            leader,
            tracks: BTreeMap::new(),
            first_sample: None,
        }
    }

    /// The leader this tracker watches for.
    pub fn leader(&self) -> u64 {
        self.leader
    }

    /// Takes one sample: `members` are every member but the leader, `last_index` is the leader's last log
    /// index. Members that left the membership are forgotten.
    pub fn observe(
        &mut self,
        now: Instant,
        last_index: u64,
        members: &BTreeMap<u64, MemberSample>,
    ) {
        self.first_sample.get_or_insert(now);
        self.tracks.retain(|id, _| members.contains_key(id));
        for (id, sample) in members {
            if *id == self.leader {
                continue;
            }
            let healthy = sample
                .ack_age
                .is_some_and(|age| age <= self.rules.last_contact_threshold);
            let lag = sample
                .matched
                .map(|matched| last_index.saturating_sub(matched));
            let caught_up = lag.is_some_and(|lag| lag <= self.rules.max_trailing_logs);
            let track = self.tracks.entry(*id).or_insert(Track {
                healthy_since: None,
                // Silent since the leader began to watch: the first healthy sample starts the clock.
                unhealthy_since: Some(now),
                voter: sample.voter,
                voter_since: None,
                caught_up,
                behind_since: None,
                ack_age: sample.ack_age,
                lag,
            });
            if healthy {
                track.healthy_since.get_or_insert(now);
                track.unhealthy_since = None;
            } else {
                track.unhealthy_since.get_or_insert(now);
                track.healthy_since = None;
            }
            track.voter = sample.voter;
            if sample.voter {
                track.voter_since.get_or_insert(now);
            } else {
                track.voter_since = None;
            }
            track.caught_up = caught_up;
            if caught_up {
                track.behind_since = None;
            } else {
                track.behind_since.get_or_insert(now);
            }
            track.ack_age = sample.ack_age;
            track.lag = lag;
        }
    }

    /// How long this leader has seen member `node_id` as a voter without a break (zero for a standby, the
    /// leader itself, or a member not sampled yet). A new leader starts from zero: a seat's tenure is never
    /// overstated.
    pub fn voter_for(&self, node_id: u64, now: Instant) -> Duration {
        self.tracks
            .get(&node_id)
            .and_then(|track| track.voter_since)
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }

    /// The health of member `node_id` at `now`; the leader is always stable and caught up, a member never
    /// sampled is suspect.
    pub fn health(&self, node_id: u64, now: Instant) -> MemberHealth {
        if node_id == self.leader {
            return MemberHealth {
                health: Health::Stable,
                caught_up: true,
                for_duration: self
                    .first_sample
                    .map_or(Duration::ZERO, |first| now.saturating_duration_since(first)),
                ack_age: Some(Duration::ZERO),
                lag: Some(0),
                stuck: false,
            };
        }
        let Some(track) = self.tracks.get(&node_id) else {
            return MemberHealth {
                health: Health::Suspect,
                caught_up: false,
                for_duration: Duration::ZERO,
                ack_age: None,
                lag: None,
                stuck: false,
            };
        };
        let stuck = !track.voter
            && track.behind_since.is_some_and(|since| {
                now.saturating_duration_since(since) >= self.rules.stuck_standby_after
            });
        let (health, since) = match (track.healthy_since, track.unhealthy_since) {
            // Answering but never catching up: as good as dead for placement.
            (Some(since), _) if stuck => (Health::Dead, since),
            (Some(since), _) => {
                let stable = now.saturating_duration_since(since) >= self.rules.stabilization;
                (
                    if stable {
                        Health::Stable
                    } else {
                        Health::Healthy
                    },
                    since,
                )
            }
            (None, Some(since)) => {
                let dead_after = if track.voter {
                    self.rules.dead_voter_after
                } else {
                    self.rules.dead_standby_after
                };
                let dead = now.saturating_duration_since(since) >= dead_after;
                (if dead { Health::Dead } else { Health::Suspect }, since)
            }
            (None, None) => (Health::Suspect, now),
        };
        MemberHealth {
            health,
            caught_up: track.caught_up,
            for_duration: now.saturating_duration_since(since),
            ack_age: track.ack_age,
            lag: track.lag,
            stuck,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: HealthRules = HealthRules {
        last_contact_threshold: Duration::from_millis(1000),
        max_trailing_logs: 250,
        stabilization: Duration::from_secs(10),
        dead_voter_after: Duration::from_secs(30),
        dead_standby_after: Duration::from_secs(60),
        stuck_standby_after: Duration::from_secs(120),
    };

    fn sample(voter: bool, ack_ms: Option<u64>, matched: Option<u64>) -> MemberSample {
        MemberSample {
            voter,
            ack_age: ack_ms.map(Duration::from_millis),
            matched,
        }
    }

    fn one(id: u64, s: MemberSample) -> BTreeMap<u64, MemberSample> {
        BTreeMap::from([(id, s)])
    }

    #[test]
    fn a_member_becomes_stable_only_after_the_stabilization_time_without_a_break() {
        let start = Instant::now();
        let mut tracker = HealthTracker::new(RULES, 1);
        let at = |s: u64| start + Duration::from_secs(s);
        for s in 0..=9 {
            tracker.observe(at(s), 1000, &one(2, sample(true, Some(100), Some(1000))));
        }
        assert_eq!(tracker.health(2, at(9)).health, Health::Healthy);
        tracker.observe(at(10), 1000, &one(2, sample(true, Some(100), Some(1000))));
        assert_eq!(tracker.health(2, at(10)).health, Health::Stable);
        // One missed contact starts the clock again.
        tracker.observe(at(11), 1000, &one(2, sample(true, Some(1500), Some(1000))));
        assert_eq!(tracker.health(2, at(11)).health, Health::Suspect);
        tracker.observe(at(12), 1000, &one(2, sample(true, Some(100), Some(1000))));
        assert_eq!(tracker.health(2, at(12)).health, Health::Healthy);
        assert_eq!(tracker.health(2, at(21)).health, Health::Healthy);
        assert_eq!(tracker.health(2, at(22)).health, Health::Stable);
    }

    #[test]
    fn a_voter_seat_is_counted_from_when_this_leader_first_saw_it_and_a_demotion_resets_it() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut tracker = HealthTracker::new(RULES, 1);
        assert_eq!(tracker.voter_for(2, at(0)), Duration::ZERO, "never sampled");
        tracker.observe(at(0), 10, &one(2, sample(false, Some(10), Some(10))));
        assert_eq!(tracker.voter_for(2, at(5)), Duration::ZERO, "a standby");
        tracker.observe(at(5), 10, &one(2, sample(true, Some(10), Some(10))));
        tracker.observe(at(6), 10, &one(2, sample(true, None, None)));
        assert_eq!(
            tracker.voter_for(2, at(65)),
            Duration::from_secs(60),
            "silence does not reset it"
        );
        tracker.observe(at(70), 10, &one(2, sample(false, Some(10), Some(10))));
        tracker.observe(at(71), 10, &one(2, sample(true, Some(10), Some(10))));
        assert_eq!(
            tracker.voter_for(2, at(75)),
            Duration::from_secs(4),
            "demoted and promoted again"
        );
        assert_eq!(
            tracker.voter_for(1, at(75)),
            Duration::ZERO,
            "the leader is never swapped out"
        );
    }

    #[test]
    fn silence_is_suspect_then_dead_after_the_voter_or_the_standby_time() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut tracker = HealthTracker::new(RULES, 1);
        let members = BTreeMap::from([
            (2, sample(true, None, None)),
            (3, sample(false, None, None)),
        ]);
        tracker.observe(at(0), 10, &members);
        assert_eq!(tracker.health(2, at(29)).health, Health::Suspect);
        assert_eq!(tracker.health(2, at(30)).health, Health::Dead);
        assert_eq!(tracker.health(3, at(30)).health, Health::Suspect);
        assert_eq!(tracker.health(3, at(60)).health, Health::Dead);
        // A fresh leader watches for the full time before anyone is dead.
        let fresh = HealthTracker::new(RULES, 1);
        assert_eq!(fresh.health(2, at(1000)).health, Health::Suspect);
    }

    #[test]
    fn a_learner_copying_the_log_is_healthy_but_not_caught_up() {
        let start = Instant::now();
        let mut tracker = HealthTracker::new(RULES, 1);
        tracker.observe(start, 10_000, &one(4, sample(false, Some(50), Some(2_000))));
        let health = tracker.health(4, start);
        assert_eq!(health.health, Health::Healthy);
        assert!(!health.caught_up);
        assert_eq!(health.lag, Some(8_000));
        tracker.observe(start, 10_000, &one(4, sample(false, Some(50), Some(9_750))));
        assert!(tracker.health(4, start).caught_up);
        tracker.observe(start, 10_000, &one(4, sample(false, Some(50), None)));
        assert!(!tracker.health(4, start).caught_up);
    }

    #[test]
    fn the_leader_is_stable_and_members_that_left_are_forgotten() {
        let start = Instant::now();
        let mut tracker = HealthTracker::new(RULES, 1);
        assert_eq!(tracker.health(1, start).health, Health::Stable);
        tracker.observe(start, 5, &one(2, sample(true, Some(10), Some(5))));
        assert_eq!(tracker.health(2, start).health, Health::Healthy);
        tracker.observe(start, 5, &BTreeMap::new());
        assert_eq!(tracker.health(2, start).health, Health::Suspect);
        assert_eq!(tracker.health(2, start).ack_age, None);
    }

    #[test]
    fn a_standby_that_answers_but_never_catches_up_is_stuck_and_counts_as_dead() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut tracker = HealthTracker::new(RULES, 1);
        for s in 0..=120 {
            tracker.observe(
                at(s),
                10_000 + s,
                &one(4, sample(false, Some(50), Some(100))),
            );
        }
        let health = tracker.health(4, at(119));
        assert!(!health.stuck);
        let health = tracker.health(4, at(120));
        assert!(health.stuck);
        assert_eq!(health.health, Health::Dead);
        // Catching up clears it; a lagging voter is never "stuck" (it is not retired).
        tracker.observe(
            at(121),
            10_000,
            &one(4, sample(false, Some(50), Some(10_000))),
        );
        assert!(!tracker.health(4, at(121)).stuck);
        let mut voters = HealthTracker::new(RULES, 1);
        for s in 0..=200 {
            voters.observe(at(s), 10_000, &one(2, sample(true, Some(50), Some(1))));
        }
        assert!(!voters.health(2, at(200)).stuck);
    }
}
