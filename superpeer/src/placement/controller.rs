//! The placement controller: a task on every node that acts only while its node leads.
//!
//! Every `update_interval` it samples openraft's leader metrics into the [`HealthTracker`]; every
//! `reconcile_interval` it builds a [`ClusterView`], asks [`decide`] for at most one action, and carries it
//! out. Membership changes are proposed with openraft's preconditions: the effective membership must still be
//! the one the decision saw (`LastMembershipLogId`, so a concurrent manual change or a second controller cannot
//! interleave) and this node's leadership must still be the committed one (`CommittedLeaderId`, so a deposed
//! leader cannot act). openraft itself refuses a change while the previous one is uncommitted. The round's
//! decision is kept for `vesperctl placement status` / `explain`, and every action taken is written to the
//! replicated placement journal with its reason and outcome, so it can be read after the fact on any node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::vote::RaftLeaderId;
use openraft::{ChangeMembers, Instant as _, Precondition};
use tokio_util::sync::CancellationToken;

use super::decide::{self, Action, ClusterView, Decision, MemberView, Targets};
use super::health::{HealthTracker, MemberHealth, MemberSample};
use super::settings::PlacementConfig;
use crate::command::{
    Adoption, Candidate, CandidateEntry, NodeScore, PeerKey, PlacementJournal, PlacementTargets,
    RevokeCertificate, SetAdoption, TombstoneNode,
};
use crate::error::ServiceError;
use crate::raft::propose::now_ms;
use crate::raft_types::TypeConfig;
use crate::replica::Replica;
use crate::store::nodes::{
    read_adoption, read_candidate, read_candidate_rtt, read_candidates, read_issuers,
    read_leaf_loads, read_node_certificates, read_node_scores, read_placement_targets, read_zones,
};

/// Longest reason or outcome text written to the journal (they are ours, but a storage error can be long).
const MAX_JOURNAL_TEXT: usize = 512;
/// How long a leadership transfer may take before the round reports it failed.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);

/// One member as the last round saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberReport {
    pub node_id: u64,
    pub voter: bool,
    pub health: MemberHealth,
    pub zone: Option<String>,
    /// Its score bucket, if it was adopted.
    pub score: Option<u32>,
    /// How long this leader has seen it as a voter.
    pub voter_for: Duration,
}

/// What the controller saw and concluded in its last round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// When the round ran (wall clock, ms since the epoch).
    pub at_ms: u64,
    /// The leader that ran it, and its term.
    pub leader: u64,
    pub term: u64,
    pub members: Vec<MemberReport>,
    pub targets: PlacementTargets,
    /// The voter target and minimum quorum in effect.
    pub target_voters: u32,
    pub min_quorum: u32,
    pub decision: Decision,
    /// How the round's action went: `None` when it took none.
    pub outcome: Option<Result<(), String>>,
}

/// The controller's last report, for the Admin service (a narrow handle: read-only to everyone but the task).
#[derive(Clone, Default)]
pub struct PlacementReports {
    last: Arc<Mutex<Option<Report>>>,
}

impl PlacementReports {
    /// The last round's report, if this node has led and decided at least once.
    pub fn last(&self) -> Option<Report> {
        self.last.lock().expect("placement report lock").clone()
    }

    fn set(&self, report: Report) {
        *self.last.lock().expect("placement report lock") = Some(report);
    }

    /// Refreshes the members' health in the last report of `term` (between rounds, so `placement status` and
    /// the status page show a member going silent within `update_interval`; the decision stays the round's).
    fn refresh_health(&self, term: u64, health: impl Fn(u64) -> MemberHealth) {
        let mut last = self.last.lock().expect("placement report lock");
        if let Some(report) = last.as_mut().filter(|report| report.term == term) {
            for member in &mut report.members {
                member.health = health(member.node_id);
            }
        }
    }
}

/// Runs the controller on `replica` until shutdown (doing nothing while this node does not lead, or when the
/// config disables it).
pub async fn run(
    replica: Replica,
    config: PlacementConfig,
    reports: PlacementReports,
    counters: crate::metrics::PlacementMetrics,
    shutdown: CancellationToken,
) {
    if !config.enabled {
        tracing::info!("placement controller disabled by placement.enabled = false");
        return;
    }
    let mut ticker = tokio::time::interval(config.update_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The tracker of the current leadership (leader id and term), reset whenever that changes.
    let mut tracker: Option<(u64, HealthTracker, Instant)> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Ok(raft) = replica.raft() else { continue };
        let metrics = raft.metrics().borrow_watched().clone();
        let me = *raft.node_id();
        let leading = metrics.current_leader == Some(me) && metrics.heartbeat.is_some();
        if !leading {
            tracker = None;
            continue;
        }
        let term = metrics.current_term;
        let now = Instant::now();
        if tracker.as_ref().is_none_or(|(t, _, _)| *t != term) {
            tracker = Some((term, HealthTracker::new(config.health_rules(), me), now));
        }
        let (_, health, last_round) = tracker.as_mut().expect("tracker set above");
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let heartbeat = metrics.heartbeat.as_ref();
        let replication = metrics.replication.as_ref();
        let samples: BTreeMap<u64, MemberSample> = membership
            .nodes()
            .filter(|(id, _)| **id != me)
            .map(|(id, _)| {
                let ack_age = heartbeat
                    .and_then(|beats| beats.get(id).cloned().flatten())
                    .map(|instant| instant.elapsed());
                let matched = replication
                    .and_then(|matched| matched.get(id).cloned().flatten())
                    .map(|log_id| log_id.index);
                (
                    *id,
                    MemberSample {
                        voter: voters.contains(id),
                        ack_age,
                        matched,
                    },
                )
            })
            .collect();
        health.observe(now, metrics.last_log_index.unwrap_or(0), &samples);
        if now.duration_since(*last_round) < config.reconcile_interval {
            reports.refresh_health(term, |id| health.health(id, now));
            continue;
        }
        *last_round = now;

        let stored = match read_placement_targets(replica.reader().db()) {
            Ok(targets) => targets,
            Err(error) => {
                tracing::warn!(%error, "cannot read the placement targets; skipping this round");
                continue;
            }
        };
        let targets = Targets {
            paused: stored.paused,
            voters: stored.voters,
            standbys: stored.standbys,
            min_quorum: stored.min_quorum,
            leaves_per_member: config.leaves_per_member,
            max_load_standbys: config.max_load_standbys,
            upgrade_margin: config.upgrade_margin,
            min_tenure: config.min_tenure,
        };
        let zones = read_zones(replica.reader().db()).unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot read the zone labels; deciding without them");
            Default::default()
        });
        let scores = read_node_scores(replica.reader().db()).unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot read the members' scores; deciding without them");
            Default::default()
        });
        let members: Vec<MemberReport> = membership
            .nodes()
            .map(|(id, _)| MemberReport {
                node_id: *id,
                voter: voters.contains(id),
                health: health.health(*id, now),
                zone: zones.get(id).cloned(),
                score: scores.get(id).map(|score| score.score),
                voter_for: health.voter_for(*id, now),
            })
            .collect();
        let loads = read_leaf_loads(replica.reader().db()).unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot read the leaf loads; deciding without them");
            Default::default()
        });
        // Leaves of a dead member have moved on and are counted where they are now.
        let leaves: u64 = members
            .iter()
            .filter(|member| member.health.health != decide::Health::Dead)
            .filter_map(|member| loads.get(&member.node_id))
            .map(|load| u64::from(load.sessions))
            .sum();
        let adopting = tend_adoption(&replica, &config, me, term).await;
        let (candidates, keys) = eligible_candidates(&replica);
        let joint = membership.get_joint_config().len() > 1;
        let uncommitted =
            metrics.membership_config.log_id() != metrics.committed_membership_config.log_id();
        let view = ClusterView {
            leader: me,
            members: members
                .iter()
                .map(|member| MemberView {
                    node_id: member.node_id,
                    voter: member.voter,
                    health: member.health.health,
                    caught_up: member.health.caught_up,
                    zone: member.zone.clone(),
                    score: member.score,
                    voter_for: member.voter_for,
                })
                .collect(),
            change_in_flight: joint || uncommitted,
            candidates,
            adopting,
            leaves,
        };
        let decision = decide::decide(&view, &targets);
        let mut report = Report {
            at_ms: now_ms(),
            leader: me,
            term,
            members,
            targets: stored,
            target_voters: decide::target_voters(&view, &targets),
            min_quorum: decide::min_quorum(&view, &targets),
            decision: decision.clone(),
            outcome: None,
        };
        let Decision::Act { action, why } = decision else {
            reports.set(report);
            continue;
        };
        tracing::info!(%action, %why, "placement: acting");
        // The preconditions are taken from the same metrics the decision was made on.
        let preconditions = preconditions(&metrics);
        let adopting = Adopting {
            keys: &keys,
            config: &config,
            leader: me,
            term,
        };
        let outcome = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            outcome = execute(&replica, &action, preconditions, &adopting) => outcome,
        };
        counters.acted(action.kind(), outcome.is_ok());
        match &outcome {
            Ok(done) => tracing::info!(%action, done, "placement: done"),
            Err(error) => tracing::warn!(%action, %error, "placement: the action failed"),
        }
        let journal = PlacementJournal {
            leader: me,
            term,
            action: action.to_string(),
            why: bounded(why),
            outcome: bounded(match &outcome {
                Ok(done) => done.clone(),
                Err(error) => error.to_string(),
            }),
        };
        report.outcome = Some(outcome.map(|_| ()).map_err(|error| error.to_string()));
        reports.set(report);
        if let Err(error) = replica.propose(journal.into()).await {
            tracing::warn!(%error, "cannot write the placement journal");
        }
    }
}

/// Writes one entry to the replicated placement journal (a failure is logged: the journal explains, it does
/// not decide).
async fn journal(
    replica: &Replica,
    leader: u64,
    term: u64,
    action: String,
    why: String,
    outcome: String,
) {
    let entry = PlacementJournal {
        leader,
        term,
        action,
        why: bounded(why),
        outcome: bounded(outcome),
    };
    if let Err(error) = replica.propose(entry.into()).await {
        tracing::warn!(%error, "cannot write the placement journal");
    }
}

fn short(fingerprint: &[u8; 32]) -> String {
    format!("{}...", data_encoding::HEXLOWER.encode(&fingerprint[..8]))
}

/// Looks after the adoption that runs: ends it when its node has joined (a member presents the certificate it
/// was signed), gives it up past its deadline (revoking the certificate it got, and putting the candidate in
/// its cooldown). Returns the candidate still being adopted, if one is.
async fn tend_adoption(
    replica: &Replica,
    config: &PlacementConfig,
    leader: u64,
    term: u64,
) -> Option<String> {
    let db = replica.reader().db();
    let adoption = match read_adoption(db) {
        Ok(adoption) => adoption?,
        Err(error) => {
            tracing::warn!(%error, "cannot read the adoption; treating it as running");
            return Some("(unreadable)".into());
        }
    };
    let peer = peer_text(&adoption.peer);
    let members = member_ids(replica).ok()?;
    let joined = adoption.issued.as_ref().and_then(|issued| {
        read_node_certificates(db)
            .ok()?
            .into_iter()
            .find(|(id, print)| members.contains(id) && *print == issued.fingerprint)
            .map(|(id, _)| id)
    });
    let now = now_ms();
    if let Some(node) = joined {
        // The member keeps the candidate's score and history, so it can be compared with later candidates.
        let rtt = read_candidate_rtt(db, &adoption.peer).ok().flatten();
        let score = read_candidate(db, &adoption.peer)
            .ok()
            .flatten()
            .map(|entry| super::candidates::adopted_score(&entry, rtt));
        let ended = async {
            if let Some(score) = score {
                replica
                    .propose_accepted(
                        NodeScore {
                            node_id: node,
                            score: Some(score),
                        }
                        .into(),
                    )
                    .await?;
            }
            replica
                .propose_accepted(SetAdoption { adoption: None }.into())
                .await?;
            replica
                .propose_accepted(
                    Candidate {
                        peer: adoption.peer,
                        entry: None,
                    }
                    .into(),
                )
                .await
        }
        .await;
        journal(
            replica,
            leader,
            term,
            format!("finish the adoption of candidate {peer}"),
            format!("it joined as standby node {node}, presenting the certificate it was signed"),
            match ended {
                Ok(_) => "done".into(),
                Err(error) => error.to_string(),
            },
        )
        .await;
        return None;
    }
    if now < adoption.deadline_ms {
        return Some(peer);
    }
    let why = match &adoption.issued {
        None => "no issuer signed its certificate in time".to_string(),
        Some(issued) => format!(
            "its node did not join with certificate {} in time",
            short(&issued.fingerprint)
        ),
    };
    let outcome = give_up(replica, &adoption, config, now).await;
    journal(
        replica,
        leader,
        term,
        format!("give up the adoption of candidate {peer}"),
        why,
        match outcome {
            Ok(done) => done,
            Err(error) => error.to_string(),
        },
    )
    .await;
    None
}

async fn give_up(
    replica: &Replica,
    adoption: &Adoption,
    config: &PlacementConfig,
    now: u64,
) -> Result<String, ServiceError> {
    replica
        .propose_accepted(SetAdoption { adoption: None }.into())
        .await?;
    let mut done = "done".to_string();
    if let Some(issued) = &adoption.issued {
        replica
            .propose_accepted(
                RevokeCertificate {
                    fingerprint: issued.fingerprint,
                }
                .into(),
            )
            .await?;
        done.push_str(&format!(
            "; its certificate {} is revoked",
            short(&issued.fingerprint)
        ));
    }
    let db = replica.reader().db();
    if let Some(mut entry) = crate::store::nodes::read_candidate(db, &adoption.peer)? {
        entry.eligible = false;
        entry.cooldown_until_ms = now.saturating_add(millis(config.candidates.cooldown));
        entry.updated_at_ms = now;
        let detail = format!(
            "its adoption was given up; not eligible for {}",
            humantime::format_duration(config.candidates.cooldown)
        );
        match entry
            .gates
            .iter_mut()
            .find(|(name, _, _)| name == "cooldown")
        {
            Some(gate) => *gate = ("cooldown".into(), false, detail),
            None => entry.gates.push(("cooldown".into(), false, detail)),
        }
        replica
            .propose_accepted(
                Candidate {
                    peer: adoption.peer,
                    entry: Some(entry),
                }
                .into(),
            )
            .await?;
        done.push_str(&format!(
            "; it cools down for {}",
            humantime::format_duration(config.candidates.cooldown)
        ));
    }
    Ok(done)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn peer_text(peer: &PeerKey) -> String {
    vesper_proto::PeerId::from_public_key_bytes(peer)
        .map(|peer| peer.to_string())
        .unwrap_or_default()
}

/// The candidates the controller may adopt: eligible (every gate holds, the operator's grant included), and
/// only when some member holds a live certificate issuer (without one, automation stops at "eligible").
/// Also their entries by PeerId text, for carrying an adoption out.
fn eligible_candidates(
    replica: &Replica,
) -> (
    Vec<decide::CandidateView>,
    BTreeMap<String, (PeerKey, CandidateEntry)>,
) {
    let db = replica.reader().db();
    let now = now_ms();
    let issuing = read_issuers(db)
        .map(|issuers| issuers.values().any(|until| *until > now))
        .unwrap_or(false);
    if !issuing {
        return Default::default();
    }
    let Ok(entries) = read_candidates(db) else {
        return Default::default();
    };
    let mut views = Vec::new();
    let mut keys = BTreeMap::new();
    for (peer, entry) in entries {
        if !entry.eligible || entry.cooldown_until_ms > now {
            continue;
        }
        let text = peer_text(&peer);
        views.push(decide::CandidateView {
            peer_id: text.clone(),
            score: entry.score,
            zone: entry.zone.clone(),
        });
        keys.insert(text, (peer, entry));
    }
    (views, keys)
}

/// What carrying out an adoption needs besides the action.
struct Adopting<'a> {
    keys: &'a BTreeMap<String, (PeerKey, CandidateEntry)>,
    config: &'a PlacementConfig,
    leader: u64,
    term: u64,
}

/// The guards of a membership change decided on `metrics`: the effective membership is still the one seen, and
/// this node's leadership is still the committed one.
fn preconditions(metrics: &openraft::RaftMetrics<TypeConfig>) -> Vec<Precondition<TypeConfig>> {
    let mut preconditions = vec![Precondition::LastMembershipLogId {
        last_membership_log_id: *metrics.membership_config.log_id(),
    }];
    if metrics.vote.is_committed() {
        preconditions.push(Precondition::CommittedLeaderId {
            committed_leader_id: metrics.vote.leader_id().to_committed(),
        });
    }
    preconditions
}

/// Carries out one action; says how it went ("done", with what else happened). A vote that is not committed
/// (no established leadership) leaves only the membership precondition, which openraft's own leader check
/// backs: such a node cannot propose at all.
async fn execute(
    replica: &Replica,
    action: &Action,
    preconditions: Vec<Precondition<TypeConfig>>,
    adopting: &Adopting<'_>,
) -> Result<String, ServiceError> {
    let done = || "done".to_string();
    let raft = replica.raft()?;
    let change = |members: ChangeMembers<u64, crate::command::NodeInfo>, retain: bool| {
        let preconditions = preconditions.clone();
        async move {
            raft.change_membership_if(members, retain, preconditions)
                .await
                .map(|_| ())
                .map_err(ServiceError::from)
        }
    };
    match action {
        Action::Replace { out, into } => {
            let metrics = raft.metrics().borrow_watched().clone();
            let mut voters: BTreeSet<u64> =
                metrics.membership_config.membership().voter_ids().collect();
            voters.remove(out);
            voters.insert(*into);
            // One joint change; `out` stays a learner, to be retired once it is dead as a standby.
            change(ChangeMembers::ReplaceAllVoters(voters), true)
                .await
                .map(|()| done())
        }
        Action::Promote { node } => {
            change(ChangeMembers::AddVoterIds(BTreeSet::from([*node])), true)
                .await
                .map(|()| done())
        }
        Action::Demote { node } => {
            change(ChangeMembers::RemoveVoters(BTreeSet::from([*node])), true)
                .await
                .map(|()| done())
        }
        Action::TransferLeader { to } => {
            raft.trigger()
                .transfer_leader(*to)
                .await
                .map_err(ServiceError::from)?;
            raft.wait(Some(TRANSFER_TIMEOUT))
                .current_leader(*to, "leadership transfer")
                .await
                .map(|_| done())
                .map_err(|_| ServiceError::Timeout("the new leader to take over"))
        }
        Action::Retire { node } => {
            change(ChangeMembers::RemoveNodes(BTreeSet::from([*node])), false).await?;
            // Its id is never handed out again.
            replica
                .propose_accepted(TombstoneNode { node_id: *node }.into())
                .await?;
            let mut done = revoke_retired(replica, *node).await?;
            done.push_str(&revoke_issued(replica, *node).await?);
            Ok(done)
        }
        Action::Adopt { peer_id } => {
            let (peer, entry) = adopting.keys.get(peer_id).ok_or_else(|| {
                ServiceError::Precondition(format!("candidate {peer_id} is not listed any more"))
            })?;
            let now = now_ms();
            let adoption = Adoption {
                peer: *peer,
                started_ms: now,
                deadline_ms: now.saturating_add(millis(adopting.config.adoption_timeout)),
                leader: adopting.leader,
                term: adopting.term,
                cluster_addr: entry.cluster_addr.clone(),
                leaf_addr: entry.leaf_addr.clone(),
                admin_addr: entry.admin_addr.clone(),
                issued: None,
            };
            replica
                .propose_accepted(
                    SetAdoption {
                        adoption: Some(adoption),
                    }
                    .into(),
                )
                .await?;
            Ok(format!(
                "started; an issuer signs its certificate, then it joins as a standby at {} (or the adoption ends after {})",
                entry.cluster_addr,
                humantime::format_duration(adopting.config.adoption_timeout)
            ))
        }
    }
}

/// Revokes the certificate a retired node presented, unless a member still presents the same one (a cluster
/// whose super peers share one certificate would otherwise lock itself out). Says which it was.
async fn revoke_retired(replica: &Replica, node: u64) -> Result<String, ServiceError> {
    let certificates = read_node_certificates(replica.reader().db())?;
    let Some(fingerprint) = certificates.get(&node).copied() else {
        return Ok("done; it never reported its certificate, so none was revoked".into());
    };
    let members = member_ids(replica)?;
    let sharing: Vec<u64> = certificates
        .iter()
        .filter(|(id, print)| **id != node && members.contains(id) && **print == fingerprint)
        .map(|(id, _)| *id)
        .collect();
    let short = data_encoding::HEXLOWER.encode(&fingerprint[..8]);
    if !sharing.is_empty() {
        return Ok(format!(
            "done; its certificate {short}... is also presented by nodes {sharing:?}, so it was not revoked (give each super peer its own certificate)"
        ));
    }
    replica
        .propose_accepted(RevokeCertificate { fingerprint }.into())
        .await?;
    Ok(format!("done; its certificate {short}... is revoked"))
}

/// Revokes every certificate an issuer signed for a retired node's key (at its adoption and each renewal) that
/// is not revoked yet; says how many, when there were any.
async fn revoke_issued(replica: &Replica, node: u64) -> Result<String, ServiceError> {
    let reader = replica.reader();
    let Some(entry) = reader.nodes()?.remove(&node) else {
        return Ok(String::new());
    };
    let Ok(peer) = entry.info.peer_id.parse::<vesper_proto::PeerId>() else {
        return Ok(String::new());
    };
    let mut revoked = 0;
    for (fingerprint, _) in crate::store::nodes::read_issued(reader.db(), peer.as_bytes())? {
        if reader.is_revoked(&fingerprint)? {
            continue;
        }
        replica
            .propose_accepted(RevokeCertificate { fingerprint }.into())
            .await?;
        revoked += 1;
    }
    Ok(match revoked {
        0 => String::new(),
        n => format!("; {n} more certificates issued to it are revoked"),
    })
}

/// The ids in the effective membership (voters and standbys).
fn member_ids(replica: &Replica) -> Result<BTreeSet<u64>, ServiceError> {
    Ok(replica
        .raft()?
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .nodes()
        .map(|(id, _)| *id)
        .collect())
}

fn bounded(mut text: String) -> String {
    if text.len() > MAX_JOURNAL_TEXT {
        let mut end = MAX_JOURNAL_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}
