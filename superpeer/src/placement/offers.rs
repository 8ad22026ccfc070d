//! Offers to serve as a super peer, on both sides of a proof:
//!
//! - as the **host** of the candidate's session ([`Offers::handle`]): check the report, have two other
//!   members dial the candidate back when a proof is due, evaluate the gates and write the candidate entry
//!   when it changed;
//! - as a **prover** asked by another member ([`Offers::prove`]): dial the candidate's claimed ports at its
//!   observed IP, at most [`MAX_CONCURRENT_PROBES`] at a time.
//!
//! Every input a leaf controls is bounded: reports faster than a quarter of the report interval are refused,
//! one proof per candidate runs at a time and is not repeated within the proof interval (also after a
//! failure), and the book of recent reports holds at most [`MAX_TRACKED`] peers.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vesper_proto::reach::{self, ReachClaim};
use vesper_proto::v1::{
    GateState, MemberRole, OfferSuperPeerRequest, OfferSuperPeerResponse, ProveReachRequest,
    ProveReachResponse,
};
use vesper_proto::PeerId;

use super::candidates::{self, Build, CandidateRules, Observed, ProofOutcome};
use crate::command::{Candidate, CandidateEntry, CandidateRtt, NodeScore, PeerKey};
use crate::error::ServiceError;
use crate::raft::network::ClusterClients;
use crate::raft::propose::now_ms;
use crate::replica::Replica;
use crate::store::nodes::{
    is_granted, read_adoption, read_candidate, read_candidate_rtt, read_node_scores,
};

/// Dial-backs one member runs at once for others; more are refused (the host retries at its next interval).
pub const MAX_CONCURRENT_PROBES: usize = 4;
/// Peers whose last report time is remembered (oldest forgotten first).
pub const MAX_TRACKED: usize = 10_000;
/// Members asked to dial a candidate back (two must succeed).
const MAX_PROVERS_ASKED: usize = 4;
/// How long a host waits for a prover's answer.
const PROVE_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The offers desk of one super peer; cheap to clone.
#[derive(Clone)]
pub struct Offers {
    inner: Arc<Inner>,
}

struct Inner {
    replica: Replica,
    clients: ClusterClients,
    rules: CandidateRules,
    probes: tokio::sync::Semaphore,
    book: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    last_report: HashMap<PeerKey, Instant>,
    proving: HashSet<PeerKey>,
}

impl Offers {
    pub fn new(replica: Replica, clients: ClusterClients, rules: CandidateRules) -> Self {
        Self {
            inner: Arc::new(Inner {
                replica,
                clients,
                rules,
                probes: tokio::sync::Semaphore::new(MAX_CONCURRENT_PROBES),
                book: Mutex::new(Book::default()),
            }),
        }
    }

    /// The candidate rules in force here.
    pub fn rules(&self) -> &CandidateRules {
        &self.inner.rules
    }

    /// Handles a leaf's report as its host: `peer` on `session`, calling from `ip`.
    pub async fn handle(
        &self,
        peer: PeerId,
        session: u64,
        ip: IpAddr,
        request: &OfferSuperPeerRequest,
    ) -> Result<OfferSuperPeerResponse, ServiceError> {
        let report = candidates::validate(request)?;
        let key: PeerKey = *peer.as_bytes();
        self.admit(key)?;
        let outcome = self.judge(key, &peer, session, ip, report).await;
        // The interval counts from the end of a report: a slow proof does not open the door to a flood.
        self.inner
            .book
            .lock()
            .expect("offers book lock")
            .last_report
            .insert(key, Instant::now());
        outcome
    }

    async fn judge(
        &self,
        key: PeerKey,
        peer: &PeerId,
        session: u64,
        ip: IpAddr,
        report: candidates::Report,
    ) -> Result<OfferSuperPeerResponse, ServiceError> {
        let replica = &self.inner.replica;
        let host = replica.node_id().ok_or(ServiceError::NotInCluster)?;
        let db = replica.reader().db();
        let previous = read_candidate(db, &key)?;
        let interval_ms = millis(self.inner.rules.report_interval);
        if !report.offer {
            if previous.is_some() {
                replica
                    .propose_accepted(
                        Candidate {
                            peer: key,
                            entry: None,
                        }
                        .into(),
                    )
                    .await?;
            }
            return Ok(OfferSuperPeerResponse {
                state: "withdrawn".into(),
                gates: Vec::new(),
                proof_at_ms: 0,
                report_interval_ms: interval_ms,
                ..Default::default()
            });
        }
        if report.role_running {
            return self
                .still_wanted(key, peer, session, &report, interval_ms)
                .await;
        }
        let unlisted = || {
            ServiceError::Precondition(
                "an offer needs a session that claims presence (LeafConfig::claim_presence)".into(),
            )
        };
        // A node that already serves (its super peer runs with this key) is no candidate any more.
        if is_member(replica, peer)? {
            return Ok(OfferSuperPeerResponse {
                state: "serving".into(),
                gates: Vec::new(),
                proof_at_ms: 0,
                report_interval_ms: interval_ms,
                ..Default::default()
            });
        }
        let presence = crate::store::presence::get(db, &key)?.ok_or_else(unlisted)?;
        let attached = presence
            .sessions
            .iter()
            .find(|listed| listed.session == session)
            .ok_or_else(unlisted)?;
        let now = now_ms();
        let (proof, measured) = if candidates::proof_due(previous.as_ref(), now, &self.inner.rules)
        {
            self.prove_with_others(key, peer, ip, &report).await
        } else {
            (ProofOutcome::NotRun, None)
        };
        let stored_rtt = read_candidate_rtt(db, &key)?;
        if let Some(rtt_us) = measured.filter(|rtt| rtt_changed(stored_rtt, *rtt)) {
            replica
                .propose_accepted(CandidateRtt { peer: key, rtt_us }.into())
                .await?;
        }
        let observed = Observed {
            now_ms: now,
            host,
            ip,
            session_started_ms: attached.attached_at_ms,
            nat_class: presence.nat_class.clone(),
            granted: is_granted(db, &key)?,
            rtt_us: measured.or(stored_rtt),
        };
        let build = Build::this();
        let entry = candidates::evaluate(
            &report,
            &observed,
            &proof,
            previous.as_ref(),
            &build,
            &self.inner.rules,
        );
        if candidates::needs_write(previous.as_ref(), &entry, self.inner.rules.refresh) {
            replica
                .propose_accepted(
                    Candidate {
                        peer: key,
                        entry: Some(entry.clone()),
                    }
                    .into(),
                )
                .await?;
        }
        let mut reply = answer(&entry, interval_ms);
        if let Some(adoption) = read_adoption(db)?.filter(|adoption| adoption.peer == key) {
            if let Some(issued) = adoption.issued {
                reply.state = "adopted".into();
                reply.certificate_chain = issued.chain_pem;
                reply.advertise_host = adoption
                    .cluster_addr
                    .parse::<std::net::SocketAddr>()
                    .map(|address| address.ip().to_string())
                    .unwrap_or_default();
                // Voters first: they are the members most likely up.
                let mut members = replica.members()?;
                members.retain(|member| member.role != MemberRole::Removed as i32);
                members.sort_by_key(|member| member.role != MemberRole::Voter as i32);
                reply.join = members
                    .into_iter()
                    .map(|member| member.cluster_addr)
                    .collect();
            }
        }
        Ok(reply)
    }

    /// Answers a node that runs its adopted role: "serving" while it is a member, "adopted" while its adoption
    /// is open, else "released". Read linearizably: a lagging replica must never release a node the cluster
    /// has just adopted.
    async fn still_wanted(
        &self,
        key: PeerKey,
        peer: &PeerId,
        session: u64,
        report: &candidates::Report,
        interval_ms: u64,
    ) -> Result<OfferSuperPeerResponse, ServiceError> {
        let replica = &self.inner.replica;
        replica
            .read_barrier(vesper_proto::v1::ReadConsistency::Linearizable)
            .await?;
        let member = is_member(replica, peer)?;
        if member {
            self.rescore(&key, peer, session, report).await?;
        }
        let adopting =
            read_adoption(replica.reader().db())?.is_some_and(|adoption| adoption.peer == key);
        let state = if member {
            "serving"
        } else if adopting {
            "adopted"
        } else {
            tracing::info!(%peer, "a node runs a super peer role the cluster neither lists nor adopts: released");
            "released"
        };
        Ok(OfferSuperPeerResponse {
            state: state.into(),
            report_interval_ms: interval_ms,
            ..Default::default()
        })
    }

    /// Keeps a serving member's score up to date from its report (written only when the bucket or its session
    /// changed). A member without a score (added by an operator) gets none.
    async fn rescore(
        &self,
        key: &PeerKey,
        peer: &PeerId,
        session: u64,
        report: &candidates::Report,
    ) -> Result<(), ServiceError> {
        let replica = &self.inner.replica;
        let db = replica.reader().db();
        let text = peer.to_string();
        let Some(node_id) = replica
            .members()?
            .into_iter()
            .find(|member| member.peer_id == text)
            .map(|member| member.node_id)
        else {
            return Ok(());
        };
        let Some(previous) = read_node_scores(db)?.remove(&node_id) else {
            return Ok(());
        };
        let Some(started) = crate::store::presence::get(db, key)?.and_then(|presence| {
            presence
                .sessions
                .iter()
                .find(|listed| listed.session == session)
                .map(|listed| listed.attached_at_ms)
        }) else {
            return Ok(());
        };
        let next = candidates::member_score(&previous, report, started, now_ms());
        if next.score != previous.score || next.session_started_ms != previous.session_started_ms {
            tracing::info!(
                node_id,
                score = next.score,
                "a serving member's score changed"
            );
            replica
                .propose_accepted(
                    NodeScore {
                        node_id,
                        score: Some(next),
                    }
                    .into(),
                )
                .await?;
        }
        Ok(())
    }

    /// Refuses reports that come faster than a quarter of the report interval.
    fn admit(&self, key: PeerKey) -> Result<(), ServiceError> {
        let floor = self.inner.rules.report_interval / 4;
        let mut book = self.inner.book.lock().expect("offers book lock");
        let now = Instant::now();
        if let Some(last) = book.last_report.get(&key) {
            if now.duration_since(*last) < floor {
                return Err(ServiceError::RateLimited(format!(
                    "capability reports at most every {floor:?}; the answer says when to report again"
                )));
            }
        }
        if book.last_report.len() >= MAX_TRACKED {
            let stale = floor * 16;
            book.last_report
                .retain(|_, at| now.duration_since(*at) < stale);
            if book.last_report.len() >= MAX_TRACKED {
                return Err(ServiceError::LimitReached(format!(
                    "this super peer tracks {MAX_TRACKED} candidates at most; offer through another one"
                )));
            }
        }
        book.last_report.insert(key, now);
        Ok(())
    }

    /// Has two other members dial the candidate back; both must succeed. Also returns the round trip the
    /// provers measured, if the proof passed.
    async fn prove_with_others(
        &self,
        key: PeerKey,
        peer: &PeerId,
        ip: IpAddr,
        report: &candidates::Report,
    ) -> (ProofOutcome, Option<u32>) {
        {
            let mut book = self.inner.book.lock().expect("offers book lock");
            if !book.proving.insert(key) {
                return (ProofOutcome::NotRun, None);
            }
        }
        let outcome = self.prove_now(peer, ip, report).await;
        self.inner
            .book
            .lock()
            .expect("offers book lock")
            .proving
            .remove(&key);
        outcome
    }

    async fn prove_now(
        &self,
        peer: &PeerId,
        ip: IpAddr,
        report: &candidates::Report,
    ) -> (ProofOutcome, Option<u32>) {
        let replica = &self.inner.replica;
        let me = replica.node_id();
        let members = match replica.members() {
            Ok(members) => members,
            Err(error) => {
                let why = format!("cannot list members: {error}");
                return (ProofOutcome::Inconclusive(why), None);
            }
        };
        // Voters first (they are the most stable), then standbys; never this node.
        let mut others: Vec<_> = members
            .into_iter()
            .filter(|member| {
                Some(member.node_id) != me
                    && member.role != vesper_proto::v1::MemberRole::Removed as i32
            })
            .collect();
        others.sort_by_key(|member| {
            (
                member.role != vesper_proto::v1::MemberRole::Voter as i32,
                member.node_id,
            )
        });
        if others.len() < 2 {
            let why = format!(
                "a proof needs two super peers besides the candidate's host; the cluster has {}",
                others.len()
            );
            return (ProofOutcome::Inconclusive(why), None);
        }
        let request = ProveReachRequest {
            peer_id: peer.to_string(),
            observed_ip: ip.to_string(),
            tcp_ports: vec![
                u32::from(report.cluster_port),
                u32::from(report.leaf_port),
                u32::from(report.admin_port),
            ],
            udp_ports: vec![u32::from(report.leaf_port)],
        };
        // Ask a few, so that one member that is down (the dead voter a candidate may be needed for) does not
        // make every proof fail; two must say yes, and any that dialed and failed decides.
        let calls = others.iter().take(MAX_PROVERS_ASKED).map(|member| {
            let request = request.clone();
            let clients = self.inner.clients.clone();
            let (node_id, address) = (member.node_id, member.cluster_addr.clone());
            async move {
                let answer = async {
                    let mut client = clients.peer(&address)?;
                    let reply =
                        tokio::time::timeout(PROVE_CALL_TIMEOUT, client.prove_reach(request))
                            .await
                            .map_err(|_| ServiceError::Timeout("a prover's answer"))?
                            .map_err(|status| ServiceError::Peer {
                                peer: address.clone(),
                                status,
                            })?;
                    Ok::<_, ServiceError>(reply.into_inner())
                }
                .await;
                match answer {
                    Ok(reply) if reply.ok => {
                        Prover::Passed((reply.rtt_us > 0).then_some(reply.rtt_us))
                    }
                    Ok(reply) => Prover::Failed(format!("node {node_id}: {}", reply.error)),
                    Err(error) => Prover::Unavailable(format!("node {node_id}: {error}")),
                }
            }
        });
        let results = futures::future::join_all(calls).await;
        (verdict(&results), proved_rtt(&results))
    }

    /// Runs a dial-back another member asked for.
    pub async fn prove(
        &self,
        request: &ProveReachRequest,
    ) -> Result<ProveReachResponse, ServiceError> {
        let node_id = self.inner.replica.node_id().unwrap_or(0);
        let peer: PeerId = request
            .peer_id
            .parse()
            .map_err(|error| ServiceError::BadField(format!("peer_id: {error}")))?;
        let ip: IpAddr = request
            .observed_ip
            .parse()
            .map_err(|error| ServiceError::BadField(format!("observed_ip: {error}")))?;
        let port = |value: &u32| {
            u16::try_from(*value)
                .ok()
                .filter(|port| *port != 0)
                .map(|port| SocketAddr::new(ip, port))
                .ok_or_else(|| ServiceError::BadField(format!("port {value} is not 1-65535")))
        };
        let claim = ReachClaim {
            peer_id: peer,
            tcp: request
                .tcp_ports
                .iter()
                .map(port)
                .collect::<Result<_, _>>()?,
            udp: request
                .udp_ports
                .iter()
                .map(port)
                .collect::<Result<_, _>>()?,
        };
        let Ok(_permit) = self.inner.probes.try_acquire() else {
            return Err(ServiceError::LimitReached(format!(
                "this super peer runs {MAX_CONCURRENT_PROBES} dial-backs at once; retry later"
            )));
        };
        let nonce: [u8; reach::NONCE_BYTES] = rand::random();
        Ok(match reach::probe(&claim, ip, nonce).await {
            Ok(rtt) => ProveReachResponse {
                ok: true,
                error: String::new(),
                node_id,
                rtt_us: rtt.map_or(0, |rtt| {
                    u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX).max(1)
                }),
            },
            Err(error) => ProveReachResponse {
                ok: false,
                error: error.to_string(),
                node_id,
                rtt_us: 0,
            },
        })
    }
}

/// The proof's outcome from what the provers said: any that dialed and failed decides; otherwise two passes are
/// needed.
fn verdict(results: &[Prover]) -> ProofOutcome {
    let passed = results
        .iter()
        .filter(|result| matches!(result, Prover::Passed(_)))
        .count();
    let failed: Vec<&str> = results
        .iter()
        .filter_map(|result| match result {
            Prover::Failed(why) => Some(why.as_str()),
            _ => None,
        })
        .collect();
    let unavailable: Vec<&str> = results
        .iter()
        .filter_map(|result| match result {
            Prover::Unavailable(why) => Some(why.as_str()),
            _ => None,
        })
        .collect();
    if !failed.is_empty() {
        ProofOutcome::Failed(failed.join("; "))
    } else if passed >= 2 {
        ProofOutcome::Passed
    } else {
        ProofOutcome::Inconclusive(format!(
            "only {passed} super peers could dial back, two are needed ({})",
            unavailable.join("; ")
        ))
    }
}

/// Whether a newly measured round trip is worth a Raft write: none stored yet, or a change of a quarter or more
/// (and at least 1 ms), so jitter on a stable path writes nothing.
fn rtt_changed(stored: Option<u32>, measured: u32) -> bool {
    stored.is_none_or(|stored| {
        let change = stored.abs_diff(measured);
        change >= 1_000 && change >= stored / 4
    })
}

/// The round trip to the voters a proof measured: the slowest of the provers that passed (each reports its
/// fastest TCP connect), so one nearby prover cannot hide a far-away node; None when none measured one.
fn proved_rtt(results: &[Prover]) -> Option<u32> {
    results
        .iter()
        .filter_map(|result| match result {
            Prover::Passed(rtt) => *rtt,
            _ => None,
        })
        .max()
}

/// What one prover said.
enum Prover {
    /// It dialed back and everything matched; with the round trip it measured, in microseconds.
    Passed(Option<u32>),
    /// It dialed, and the proof failed.
    Failed(String),
    /// It could not be asked, or could not run it.
    Unavailable(String),
}

/// Whether a super peer with `peer`'s key is a member now (voter or standby).
fn is_member(replica: &Replica, peer: &PeerId) -> Result<bool, ServiceError> {
    let text = peer.to_string();
    Ok(replica
        .members()?
        .into_iter()
        .any(|member| member.peer_id == text && member.role != MemberRole::Removed as i32))
}

/// The verdict a leaf gets for its entry.
pub fn answer(entry: &CandidateEntry, report_interval_ms: u64) -> OfferSuperPeerResponse {
    OfferSuperPeerResponse {
        state: if entry.eligible {
            "eligible"
        } else {
            "candidate"
        }
        .into(),
        gates: gates_to_wire(entry),
        proof_at_ms: entry.proof_at_ms.unwrap_or(0),
        report_interval_ms,
        ..Default::default()
    }
}

/// The gates of an entry on the wire.
pub fn gates_to_wire(entry: &CandidateEntry) -> Vec<GateState> {
    entry
        .gates
        .iter()
        .map(|(name, passed, detail)| GateState {
            name: name.clone(),
            passed: *passed,
            detail: detail.clone(),
        })
        .collect()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_passes_prove_one_failure_refutes_and_unreachable_provers_do_not_count() {
        use Prover::*;
        let pass = || Passed(Some(900));
        let down = || Unavailable("node 3: connection refused".into());
        assert_eq!(verdict(&[pass(), pass()]), ProofOutcome::Passed);
        assert_eq!(verdict(&[down(), pass(), pass()]), ProofOutcome::Passed);
        // One pass is no proof, but nothing failed either: too few could dial (a member is down).
        let ProofOutcome::Inconclusive(why) = verdict(&[pass(), down()]) else {
            panic!("one pass is not a proof");
        };
        assert!(
            why.contains("only 1") && why.contains("connection refused"),
            "{why}"
        );
        let ProofOutcome::Failed(why) =
            verdict(&[pass(), pass(), Failed("node 4: TCP x: timed out".into())])
        else {
            panic!("a failed dial-back refutes");
        };
        assert!(why.contains("timed out"), "{why}");
        assert!(matches!(verdict(&[]), ProofOutcome::Inconclusive(_)));
    }

    #[test]
    fn the_proved_round_trip_is_the_slowest_measured_one() {
        use Prover::*;
        let down = || Unavailable("node 3: connection refused".into());
        assert_eq!(
            proved_rtt(&[Passed(Some(900)), down(), Passed(Some(40_000))]),
            Some(40_000)
        );
        assert_eq!(proved_rtt(&[Passed(None), Passed(Some(700))]), Some(700));
        assert_eq!(proved_rtt(&[Passed(None), down()]), None);
        assert_eq!(proved_rtt(&[Failed("x".into())]), None);
        // Written when first known, and again only on a clear change.
        assert!(rtt_changed(None, 500));
        assert!(!rtt_changed(Some(500), 1_400), "under 1 ms");
        assert!(!rtt_changed(Some(40_000), 49_000), "under a quarter");
        assert!(rtt_changed(Some(40_000), 50_000));
        assert!(rtt_changed(Some(40_000), 29_000));
    }
}
