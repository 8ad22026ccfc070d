//! The `[placement]` table: this node's timers for the controller it runs while it leads. The targets the
//! controller works towards (voters, standbys, paused) are not here: they are stored in Raft, so every leader
//! uses the same ones (`vesperctl placement set`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::health::HealthRules;

/// Least `balance_interval`: leaves spread a move over this long (`leaf::members::MOVE_SPREAD` is at most it).
pub const MIN_BALANCE_INTERVAL: Duration = Duration::from_secs(10);

/// Timers and bounds of the placement controller; see docs/CONFIG.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementConfig {
    /// This node's zone label (for example the Kubernetes node's `topology.kubernetes.io/zone`): the controller
    /// keeps at most ceil(voters / zones) voters in one zone. Default none.
    pub zone: Option<String>,
    /// Run the controller while this node leads. Default true.
    pub enabled: bool,
    /// How often the leader samples member health. Default 2 s (raft-autopilot's update interval).
    #[serde(with = "humantime_serde")]
    pub update_interval: Duration,
    /// How often it decides (at most one membership action per round). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// A member that has not acknowledged the leader for longer is unhealthy. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub last_contact_threshold: Duration,
    /// A member trailing the leader's last log index by more entries is not caught up. Default 250.
    pub max_trailing_logs: u64,
    /// A member must be healthy this long without a break to be stable (only stable standbys are promoted).
    /// Default 30 s.
    #[serde(with = "humantime_serde")]
    pub stabilization: Duration,
    /// A voter unhealthy this long is dead and is replaced by a ready standby. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub dead_voter_after: Duration,
    /// A standby unhealthy this long is dead and is retired (removed, its id tombstoned). Default 30 min.
    #[serde(with = "humantime_serde")]
    pub dead_standby_after: Duration,
    /// A standby that answers but has not caught up for this long is stuck and retired. Default 10 min.
    #[serde(with = "humantime_serde")]
    pub stuck_standby_after: Duration,
    /// The eligibility gates of candidates and their timers (the `[placement.candidates]` table).
    pub candidates: super::candidates::CandidateRules,
    /// An intermediate issuer (`vesperctl ca issuer`) this node signs adopted nodes' certificates with: its
    /// certificate and key (PEM). Only "core" super peers an operator runs get one; without any in the
    /// cluster, automation stops at "eligible". Default none.
    pub issuer_cert: Option<PathBuf>,
    pub issuer_key: Option<PathBuf>,
    /// How long a certificate signed for an adopted node is valid; the node renews it when a third is left.
    /// Default 7 days.
    #[serde(with = "humantime_serde")]
    pub issued_validity: Duration,
    /// An adoption not finished (certificate signed and the node joined as a standby) within this is given up:
    /// its certificate is revoked and the candidate cools down. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub adoption_timeout: Duration,
    /// A super peer that holds more leaves than the mean of the serving members by this many percent (and by
    /// `balance_min_excess` leaves) asks the excess to move to members below the mean. Default 25.
    pub balance_tolerance_percent: u32,
    /// The least excess over the mean, in leaves, that makes a super peer shed. Default 16.
    pub balance_min_excess: u32,
    /// Shortest time between two shed requests of one super peer, and after the serving members changed (at
    /// least the 10 s over which leaves spread a move). Default 60 s.
    #[serde(with = "humantime_serde")]
    pub balance_interval: Duration,
    /// Leaves one member should hold. When the members that are not dead report more leaves than this many per
    /// planned member (target voters plus the standby target), the controller wants one more standby per
    /// further share, up to `max_load_standbys`, and adopts candidates to take the load. 0: never. Default
    /// 10000.
    pub leaves_per_member: u32,
    /// The most standbys the leaf load adds to the standby target. Default 4.
    pub max_load_standbys: u32,
    /// Score buckets (of 20) a ready standby must beat a voter by to take its seat. 0: never. Default 3.
    pub upgrade_margin: u32,
    /// A voter keeps its seat against better standbys at least this long, counted by the leader (a new leader
    /// counts again). Default 24 h.
    #[serde(with = "humantime_serde")]
    pub min_tenure: Duration,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            zone: None,
            enabled: true,
            update_interval: Duration::from_secs(2),
            reconcile_interval: Duration::from_secs(10),
            last_contact_threshold: Duration::from_secs(1),
            max_trailing_logs: 250,
            stabilization: Duration::from_secs(30),
            dead_voter_after: Duration::from_secs(300),
            dead_standby_after: Duration::from_secs(1800),
            stuck_standby_after: Duration::from_secs(600),
            candidates: super::candidates::CandidateRules::default(),
            issuer_cert: None,
            issuer_key: None,
            issued_validity: Duration::from_secs(7 * 24 * 3600),
            adoption_timeout: Duration::from_secs(300),
            balance_tolerance_percent: 25,
            balance_min_excess: 16,
            balance_interval: Duration::from_secs(60),
            leaves_per_member: 10_000,
            max_load_standbys: 4,
            upgrade_margin: 3,
            min_tenure: Duration::from_secs(24 * 3600),
        }
    }
}

impl PlacementConfig {
    /// The health rules these settings make.
    pub fn health_rules(&self) -> HealthRules {
        HealthRules {
            last_contact_threshold: self.last_contact_threshold,
            max_trailing_logs: self.max_trailing_logs,
            stabilization: self.stabilization,
            dead_voter_after: self.dead_voter_after,
            dead_standby_after: self.dead_standby_after,
            stuck_standby_after: self.stuck_standby_after,
        }
    }

    /// Problems with these settings, for `Config::validate`; `heartbeat` is the Raft heartbeat interval.
    pub fn problems(&self, heartbeat: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        if self.update_interval < Duration::from_millis(10) {
            problems.push("placement.update_interval must be at least 10ms".into());
        }
        if self.reconcile_interval < self.update_interval {
            problems.push(
                "placement.reconcile_interval must be at least placement.update_interval".into(),
            );
        }
        if self.last_contact_threshold <= heartbeat {
            problems.push(format!(
                "placement.last_contact_threshold ({:?}) must be above raft.heartbeat_interval ({heartbeat:?}), or every member looks unhealthy",
                self.last_contact_threshold
            ));
        }
        if self.dead_voter_after <= self.last_contact_threshold
            || self.dead_standby_after <= self.last_contact_threshold
        {
            problems.push(
                "placement.dead_voter_after and placement.dead_standby_after must be above placement.last_contact_threshold"
                    .into(),
            );
        }
        if let Some(zone) = &self.zone {
            if let Err(problem) = super::candidates::check_zone(zone) {
                problems.push(format!("placement.zone: {problem}"));
            }
        }
        if self.issuer_cert.is_some() != self.issuer_key.is_some() {
            problems.push("placement.issuer_cert and placement.issuer_key go together".into());
        }
        if self.issued_validity < Duration::from_secs(10) {
            problems.push("placement.issued_validity must be at least 10s".into());
        }
        if self.adoption_timeout < self.reconcile_interval {
            problems.push(
                "placement.adoption_timeout must be at least placement.reconcile_interval".into(),
            );
        }
        if self.balance_tolerance_percent > 1000 {
            problems.push("placement.balance_tolerance_percent must be at most 1000".into());
        }
        if self.balance_interval < MIN_BALANCE_INTERVAL {
            problems.push(format!(
                "placement.balance_interval must be at least {MIN_BALANCE_INTERVAL:?}, the time leaves take to spread a move"
            ));
        }
        if self.max_load_standbys > 16 {
            problems.push("placement.max_load_standbys must be at most 16".into());
        }
        if self.upgrade_margin > super::candidates::MAX_SCORE {
            problems.push(format!(
                "placement.upgrade_margin must be at most {} (the top score bucket)",
                super::candidates::MAX_SCORE
            ));
        }
        problems.extend(self.candidates.problems());
        problems
    }
}
