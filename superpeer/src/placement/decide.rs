//! The placement decision: a pure function from a view of the cluster to at most one membership action.
//!
//! Types only for now; `decide` and its tests follow.

use std::fmt;

/// How a member looks to the leader, from its heartbeats and replication (see `placement::health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Health {
    /// Acknowledging the leader and caught up, continuously for at least the stabilization time.
    Stable,
    /// Acknowledging and caught up now, but not yet for the stabilization time (new, or recently recovered).
    Healthy,
    /// Not acknowledging or lagging, for less than the time after which it counts as dead.
    Suspect,
    /// Not acknowledging or lagging for at least that time.
    Dead,
}

impl Health {
    /// Whether the member counts towards a healthy majority (it answers the leader now).
    pub fn is_live(self) -> bool {
        matches!(self, Health::Stable | Health::Healthy)
    }
}

/// One member of the Raft group as the decision sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub node_id: u64,
    /// A voter (otherwise a standby: a Raft learner).
    pub voter: bool,
    pub health: Health,
    /// Its matched log index is within the allowed lag of the leader's last index.
    pub caught_up: bool,
    /// Its zone label, if it has one.
    pub zone: Option<String>,
}

/// A node that may be adopted as a standby (an eligible candidate; see the candidate table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateView {
    /// Text form of the candidate's PeerId.
    pub peer_id: String,
    /// Its score bucket (higher is better).
    pub score: u32,
    pub zone: Option<String>,
}

/// The cluster as the leader sees it in one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    /// This node: the leader that decides.
    pub leader: u64,
    /// Every member of the effective membership (voters and standbys), the leader included.
    pub members: Vec<MemberView>,
    /// The effective membership is not committed yet, or is a joint configuration: a change is in flight.
    pub change_in_flight: bool,
    /// Candidates eligible for adoption, best first.
    pub candidates: Vec<CandidateView>,
}

/// The targets the controller works towards, as stored in Raft (and defaults from the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// The operator paused the controller: nothing is changed.
    pub paused: bool,
    /// Voters to keep; `None` means automatic (3, or 5 when at least 5 live members span at least 3 zones).
    pub voters: Option<u32>,
    /// Standbys to keep besides the voters.
    pub standbys: u32,
    /// Automation never takes the voter count below this. `None` means `target / 2 + 1`.
    pub min_quorum: Option<u32>,
}

/// One membership action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Swap dead (or misplaced) voter `out` for caught-up stable standby `into`, in one joint change; `out`
    /// stays a standby.
    Replace { out: u64, into: u64 },
    /// Promote caught-up stable standby `node` to voter.
    Promote { node: u64 },
    /// Demote voter `node` to standby (never the leader).
    Demote { node: u64 },
    /// Hand leadership to voter `to`, so that this node can be demoted in a later round.
    TransferLeader { to: u64 },
    /// Remove dead standby `node` from the group and tombstone its id.
    Retire { node: u64 },
    /// Invite candidate `peer_id` to serve and add it as a standby.
    Adopt { peer_id: String },
}

/// Why no action was taken (also a metric label, so a small fixed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Blocked {
    /// Nothing to do: the cluster is at its targets.
    Balanced,
    /// The operator paused the controller.
    Paused,
    /// A membership change is still in flight.
    ChangeInFlight,
    /// An action is needed but would leave the old or the new configuration without a live majority.
    NoLiveMajority,
    /// An action is needed but no standby is caught up and stable.
    NoReadyStandby,
    /// Demoting would take the voters below the minimum quorum.
    MinQuorum,
    /// A standby is still catching up; the next adoption waits for it.
    LearnerCatchingUp,
}

impl Blocked {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Blocked::Balanced => "balanced",
            Blocked::Paused => "paused",
            Blocked::ChangeInFlight => "change_in_flight",
            Blocked::NoLiveMajority => "no_live_majority",
            Blocked::NoReadyStandby => "no_ready_standby",
            Blocked::MinQuorum => "min_quorum",
            Blocked::LearnerCatchingUp => "learner_catching_up",
        }
    }
}

/// What `decide` concluded, with the reason in words for `placement explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Act { action: Action, why: String },
    Wait { blocked: Blocked, why: String },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Replace { out, into } => write!(f, "replace voter {out} by standby {into}"),
            Action::Promote { node } => write!(f, "promote standby {node}"),
            Action::Demote { node } => write!(f, "demote voter {node}"),
            Action::TransferLeader { to } => write!(f, "transfer leadership to {to}"),
            Action::Retire { node } => write!(f, "retire standby {node}"),
            Action::Adopt { peer_id } => write!(f, "adopt candidate {peer_id}"),
        }
    }
}

// Provisional stand-ins until the rules land (replaced by the full file).
pub fn target_voters(_view: &ClusterView, targets: &Targets) -> u32 {
    targets.voters.unwrap_or(3)
}
pub fn min_quorum(view: &ClusterView, targets: &Targets) -> u32 {
    targets
        .min_quorum
        .unwrap_or(target_voters(view, targets) / 2 + 1)
}
pub fn decide(_view: &ClusterView, _targets: &Targets) -> Decision {
    Decision::Wait {
        blocked: Blocked::Balanced,
        why: String::new(),
    }
}
pub const MAX_VOTERS: u32 = 7;
