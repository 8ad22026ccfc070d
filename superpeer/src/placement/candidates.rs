//! Candidates: leaves that offer to serve as super peers, judged by the super peer they are attached to.
//!
//! A leaf that opted in sends its capability report (`Leaf.OfferSuperPeer`). Its host checks the report's
//! bounds ([`validate`]), has two other members prove the node reachable (the dial-back of
//! `vesper_proto::reach`), and evaluates the eligibility gates ([`evaluate`]). The gates use what the cluster
//! itself observed (session starts from presence, proofs by other members, the operator's grant in Raft),
//! never the node's own account of its uptime, which is shown but not trusted. The result is a replicated
//! candidate entry, proposed only when something an operator or the controller reads changed
//! ([`needs_write`]), so every leader, also a new one after a failover, sees the same candidates.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vesper_proto::v1::OfferSuperPeerRequest;

use crate::command::{CandidateEntry, MemberScore};
use crate::error::ServiceError;

/// Most sessions of its own history a report may carry.
pub const MAX_HISTORY: usize = 32;
/// Session starts a candidate entry keeps (what the flapping gate counts).
pub const MAX_OBSERVED_SESSIONS: usize = 8;
/// Longest zone label.
pub const MAX_ZONE_BYTES: usize = 63;
/// Longest software version text.
pub const MAX_VERSION_BYTES: usize = 64;
/// Highest score bucket.
pub const MAX_SCORE: u32 = 20;
/// Longest proof failure text an entry keeps.
pub const MAX_PROOF_ERROR: usize = 512;

/// The gates' bounds and the candidates' timers (the `[placement]` table's candidate keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CandidateRules {
    /// The current session must have lasted this long. Default 1 h.
    #[serde(with = "humantime_serde")]
    pub min_uptime: Duration,
    /// The mean session length the cluster observed must be at least this. Default 3 h.
    #[serde(with = "humantime_serde")]
    pub min_mean_session: Duration,
    /// More sessions than this within 24 h is flapping. Default 3.
    pub max_sessions_per_day: u32,
    /// A failed proof within this time after a successful one is flapping reachability. Default 1 h.
    #[serde(with = "humantime_serde")]
    pub reach_flap_window: Duration,
    /// A proof of reachability counts this long. Default 30 min.
    #[serde(with = "humantime_serde")]
    pub proof_ttl: Duration,
    /// A proof is renewed once it is this old (and retried no sooner after a failure). Default 10 min.
    #[serde(with = "humantime_serde")]
    pub proof_interval: Duration,
    /// Resources a candidate needs. Defaults: 2 cores, 1 GiB free memory, 2 GiB free disk.
    pub min_cores: u32,
    pub min_free_memory_bytes: u64,
    pub min_free_disk_bytes: u64,
    /// After a demotion or removal, a node is not eligible for this long. Default 1 h.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// How often a candidate reports. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
    /// An unchanged entry is written again this often, so a stale one can be told from a live one. Default
    /// 5 min.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
}

impl Default for CandidateRules {
    fn default() -> Self {
        Self {
            min_uptime: Duration::from_secs(3600),
            min_mean_session: Duration::from_secs(3 * 3600),
            max_sessions_per_day: 3,
            reach_flap_window: Duration::from_secs(3600),
            proof_ttl: Duration::from_secs(30 * 60),
            proof_interval: Duration::from_secs(10 * 60),
            min_cores: 2,
            min_free_memory_bytes: 1 << 30,
            min_free_disk_bytes: 2 << 30,
            cooldown: Duration::from_secs(3600),
            report_interval: Duration::from_secs(60),
            refresh: Duration::from_secs(300),
        }
    }
}

impl CandidateRules {
    /// Problems with these settings, for `Config::validate`.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.report_interval < Duration::from_millis(100) {
            problems.push("placement.candidates.report_interval must be at least 100ms".into());
        }
        if self.proof_interval.is_zero() || self.proof_ttl <= self.proof_interval {
            problems.push(
                "placement.candidates.proof_ttl must be above placement.candidates.proof_interval (above 0), or proofs lapse before they are renewed"
                    .into(),
            );
        }
        if self.refresh < self.report_interval {
            problems.push(
                "placement.candidates.refresh must be at least placement.candidates.report_interval"
                    .into(),
            );
        }
        problems
    }
}

/// Checks a zone label: 1-63 bytes of a-z, 0-9, '-', '_' and '.'.
pub fn check_zone(zone: &str) -> Result<(), String> {
    if zone.is_empty()
        || zone.len() > MAX_ZONE_BYTES
        || !zone.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"-_.".contains(&byte)
        })
    {
        return Err(format!(
            "zone {zone:?} must be 1-{MAX_ZONE_BYTES} bytes of a-z, 0-9, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// A capability report whose bounds hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub offer: bool,
    /// The node runs the role it was adopted for (its report asks only whether it still may).
    pub role_running: bool,
    pub software_version: String,
    pub store_format: u32,
    pub protocol_version: u32,
    pub cores: u32,
    pub free_memory_bytes: u64,
    pub free_disk_bytes: u64,
    pub metered: bool,
    pub on_battery: bool,
    pub zone: Option<String>,
    pub cluster_port: u16,
    pub leaf_port: u16,
    pub admin_port: u16,
}

/// Checks a report's bounds; the error names the field.
pub fn validate(request: &OfferSuperPeerRequest) -> Result<Report, ServiceError> {
    let bad = |text: String| Err(ServiceError::BadField(text));
    if request.software_version.len() > MAX_VERSION_BYTES {
        return bad(format!(
            "software_version is {} bytes; at most {MAX_VERSION_BYTES}",
            request.software_version.len()
        ));
    }
    if !(1..=4096).contains(&request.cores) && request.offer {
        return bad(format!("cores {} is not between 1 and 4096", request.cores));
    }
    // 1 PiB of memory or 1 EiB of disk is not a machine, it is a made-up number.
    if request.free_memory_bytes > 1 << 50 {
        return bad(format!(
            "free_memory_bytes {} is more than 1 PiB",
            request.free_memory_bytes
        ));
    }
    if request.free_disk_bytes > 1 << 60 {
        return bad(format!(
            "free_disk_bytes {} is more than 1 EiB",
            request.free_disk_bytes
        ));
    }
    if request.history.len() > MAX_HISTORY {
        return bad(format!(
            "history has {} sessions; at most {MAX_HISTORY}",
            request.history.len()
        ));
    }
    let zone = if request.zone.is_empty() {
        None
    } else {
        check_zone(&request.zone).map_err(ServiceError::BadField)?;
        Some(request.zone.clone())
    };
    let port = |name: &str, value: u32| -> Result<u16, ServiceError> {
        match u16::try_from(value) {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(ServiceError::BadField(format!(
                "{name} {value} is not a port (1-65535)"
            ))),
        }
    };
    let (cluster_port, leaf_port, admin_port) = if request.offer {
        let ports = (
            port("cluster_port", request.cluster_port)?,
            port("leaf_port", request.leaf_port)?,
            port("admin_port", request.admin_port)?,
        );
        if ports.0 == ports.1 || ports.0 == ports.2 || ports.1 == ports.2 {
            return bad(format!(
                "cluster_port, leaf_port and admin_port must differ ({}, {}, {})",
                ports.0, ports.1, ports.2
            ));
        }
        ports
    } else {
        (0, 0, 0)
    };
    Ok(Report {
        offer: request.offer,
        role_running: request.role_running,
        software_version: request.software_version.clone(),
        store_format: request.store_format,
        protocol_version: request.protocol_version,
        cores: request.cores,
        free_memory_bytes: request.free_memory_bytes,
        free_disk_bytes: request.free_disk_bytes,
        metered: request.metered,
        on_battery: request.on_battery,
        zone,
        cluster_port,
        leaf_port,
        admin_port,
    })
}

/// What this build is: what a candidate's report must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    pub software_version: String,
    pub store_format: u32,
    pub protocol_version: u32,
}

impl Build {
    /// This super peer's build.
    pub fn this() -> Self {
        Self {
            software_version: env!("CARGO_PKG_VERSION").to_string(),
            store_format: crate::store::FORMAT_VERSION,
            protocol_version: vesper_proto::version::NEWEST,
        }
    }
}

/// What the host observed, besides the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub now_ms: u64,
    pub host: u64,
    /// The IP the candidate's call came from: the only IP ever dialed, and the IP of its role addresses.
    pub ip: IpAddr,
    /// When its current session attached (from presence).
    pub session_started_ms: u64,
    /// Its NAT class as it published it ("public", "endpoint-independent", ..., "unknown").
    pub nat_class: String,
    /// The operator granted it eligibility.
    pub granted: bool,
    /// Round trip from the members that proved it (voters first) to it, in microseconds: the slowest of the
    /// provers' fastest TCP connects, from this round's proof or the last one stored. None before a proof.
    pub rtt_us: Option<u32>,
}

/// How the last proof went, if one ran in this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProofOutcome {
    /// No proof ran now (one is not due, or cannot run); the entry keeps its last proof.
    NotRun,
    Passed,
    Failed(String),
    /// Too few members could dial back (down, or too few in the cluster) and none that did failed: the entry
    /// keeps its last proof until that expires, and this is not a reachability flip.
    Inconclusive(String),
}

/// Whether a proof is due: none yet, the last success is `proof_interval` old, and no failure within it.
pub fn proof_due(previous: Option<&CandidateEntry>, now_ms: u64, rules: &CandidateRules) -> bool {
    let interval = millis(rules.proof_interval);
    let Some(previous) = previous else {
        return true;
    };
    let recent = |at: Option<u64>| at.is_some_and(|at| now_ms.saturating_sub(at) < interval);
    !recent(previous.proof_at_ms) && !recent(previous.proof_failed_at_ms)
}

/// Cuts a proof error to [`MAX_PROOF_ERROR`] bytes.
fn bound(why: &mut String) {
    if why.len() > MAX_PROOF_ERROR {
        let mut end = MAX_PROOF_ERROR;
        while !why.is_char_boundary(end) {
            end -= 1;
        }
        why.truncate(end);
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn show(duration_ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(duration_ms / 1000)).to_string()
}

/// The candidate's new entry: its observed sessions brought up to date, the proof outcome recorded, and every
/// gate evaluated. `previous` is its entry in Raft, if it has one.
pub fn evaluate(
    report: &Report,
    observed: &Observed,
    proof: &ProofOutcome,
    previous: Option<&CandidateEntry>,
    build: &Build,
    rules: &CandidateRules,
) -> CandidateEntry {
    let now = observed.now_ms;
    let addr = |port: u16| SocketAddr::new(observed.ip, port).to_string();
    let mut entry = previous.cloned().unwrap_or(CandidateEntry {
        host: observed.host,
        eligible: false,
        zone: None,
        cluster_addr: String::new(),
        leaf_addr: String::new(),
        admin_addr: String::new(),
        score: 0,
        proof_at_ms: None,
        proof_failed_at_ms: None,
        proof_error: None,
        session_starts_ms: Vec::new(),
        sessions_seen: 0,
        first_seen_ms: observed.session_started_ms.min(now),
        cooldown_until_ms: 0,
        gates: Vec::new(),
        updated_at_ms: now,
    });
    entry.host = observed.host;
    entry.zone = report.zone.clone();
    let addresses = (
        addr(report.cluster_port),
        addr(report.leaf_port),
        addr(report.admin_port),
    );
    if (&entry.cluster_addr, &entry.leaf_addr, &entry.admin_addr)
        != (&addresses.0, &addresses.1, &addresses.2)
    {
        // A proof holds for the addresses it dialed only.
        entry.proof_at_ms = None;
    }
    (entry.cluster_addr, entry.leaf_addr, entry.admin_addr) = addresses;
    if entry.session_starts_ms.last() != Some(&observed.session_started_ms) {
        entry.session_starts_ms.push(observed.session_started_ms);
        entry.sessions_seen = entry.sessions_seen.saturating_add(1);
        let excess = entry
            .session_starts_ms
            .len()
            .saturating_sub(MAX_OBSERVED_SESSIONS);
        entry.session_starts_ms.drain(..excess);
    }
    match proof {
        ProofOutcome::NotRun => {}
        ProofOutcome::Passed => entry.proof_at_ms = Some(now),
        ProofOutcome::Inconclusive(why) => {
            let mut why = format!("no proof this time: {why}");
            bound(&mut why);
            entry.proof_error = Some(why);
        }
        ProofOutcome::Failed(why) => {
            entry.proof_failed_at_ms = Some(now);
            let mut why = why.clone();
            bound(&mut why);
            entry.proof_error = Some(why);
        }
    }

    let mut gates: Vec<(String, bool, String)> = Vec::new();
    let mut gate = |name: &str, passed: bool, detail: String| {
        gates.push((name.to_string(), passed, detail));
    };
    gate(
        "granted",
        observed.granted,
        if observed.granted {
            "an operator granted eligibility".into()
        } else {
            "no operator grant (vesperctl placement grant PEER, or --all)".into()
        },
    );
    let proof_age = entry.proof_at_ms.map(|at| now.saturating_sub(at));
    let public = observed.nat_class == "public";
    // The latest attempt decides: a failure after the last success fails the gate, however fresh that was.
    let failed_last = entry
        .proof_failed_at_ms
        .is_some_and(|failed| entry.proof_at_ms.is_none_or(|ok| failed > ok));
    let proven = !failed_last && proof_age.is_some_and(|age| age <= millis(rules.proof_ttl));
    let proof_detail = match (failed_last, proof_age) {
        (true, _) => format!(
            "the last dial-back ({} ago) failed: {}",
            show(now.saturating_sub(entry.proof_failed_at_ms.unwrap_or(now))),
            entry.proof_error.as_deref().unwrap_or("no reason kept")
        ),
        (false, Some(age)) if age <= millis(rules.proof_ttl) => {
            format!("proven reachable {} ago", show(age))
        }
        (false, Some(age)) => format!(
            "the last proof is {} old (valid {})",
            show(age),
            show(millis(rules.proof_ttl))
        ),
        (false, None) => "not proven reachable yet".into(),
    };
    gate(
        "proof",
        proven && public,
        if public || !proven {
            proof_detail
        } else {
            format!(
                "{proof_detail}, but its NAT class is {:?}, not public",
                observed.nat_class
            )
        },
    );
    let version_ok = report.software_version == build.software_version
        && report.store_format == build.store_format
        && (vesper_proto::version::OLDEST..=build.protocol_version)
            .contains(&report.protocol_version);
    gate(
        "version",
        version_ok,
        format!(
            "{} store {} protocol {} (cluster: {} store {} protocol {})",
            report.software_version,
            report.store_format,
            report.protocol_version,
            build.software_version,
            build.store_format,
            build.protocol_version
        ),
    );
    let uptime = now.saturating_sub(observed.session_started_ms);
    gate(
        "uptime",
        uptime >= millis(rules.min_uptime),
        format!(
            "current session {} (at least {})",
            show(uptime),
            show(millis(rules.min_uptime))
        ),
    );
    let mean = now.saturating_sub(entry.first_seen_ms) / u64::from(entry.sessions_seen.max(1));
    gate(
        "mean_session",
        mean >= millis(rules.min_mean_session),
        format!(
            "{} sessions seen in {}, {} each on average (at least {})",
            entry.sessions_seen,
            show(now.saturating_sub(entry.first_seen_ms)),
            show(mean),
            show(millis(rules.min_mean_session))
        ),
    );
    let day = 24 * 3600 * 1000;
    let today = entry
        .session_starts_ms
        .iter()
        .filter(|start| now.saturating_sub(**start) < day)
        .count();
    let reach_flip = entry.proof_failed_at_ms.is_some_and(|failed| {
        now.saturating_sub(failed) < millis(rules.reach_flap_window)
            && entry.proof_at_ms.is_some_and(|ok| ok < failed)
    });
    gate(
        "flapping",
        today <= rules.max_sessions_per_day as usize && !reach_flip,
        if reach_flip {
            format!(
                "its reachability flipped (a proof failed after one passed) within {}",
                show(millis(rules.reach_flap_window))
            )
        } else {
            format!(
                "{today} sessions in 24 h (at most {})",
                rules.max_sessions_per_day
            )
        },
    );
    let mut short = Vec::new();
    if report.cores < rules.min_cores {
        short.push(format!("{} cores < {}", report.cores, rules.min_cores));
    }
    if report.free_memory_bytes < rules.min_free_memory_bytes {
        short.push(format!(
            "{} MiB free memory < {} MiB",
            report.free_memory_bytes >> 20,
            rules.min_free_memory_bytes >> 20
        ));
    }
    if report.free_disk_bytes < rules.min_free_disk_bytes {
        short.push(format!(
            "{} MiB free disk < {} MiB",
            report.free_disk_bytes >> 20,
            rules.min_free_disk_bytes >> 20
        ));
    }
    if report.metered {
        short.push("metered link".into());
    }
    if report.on_battery {
        short.push("on battery".into());
    }
    gate(
        "resources",
        short.is_empty(),
        if short.is_empty() {
            format!(
                "{} cores, {} MiB memory and {} MiB disk free",
                report.cores,
                report.free_memory_bytes >> 20,
                report.free_disk_bytes >> 20
            )
        } else {
            short.join(", ")
        },
    );
    gate(
        "cooldown",
        now >= entry.cooldown_until_ms,
        if now >= entry.cooldown_until_ms {
            "not in a cooldown".into()
        } else {
            format!(
                "demoted or removed recently: eligible again in {}",
                show(entry.cooldown_until_ms - now)
            )
        },
    );
    entry.eligible = report.offer && gates.iter().all(|(_, passed, _)| *passed);
    entry.score = if entry.eligible {
        score(report, mean, observed.rtt_us)
    } else {
        0
    };
    entry.gates = gates;
    entry.updated_at_ms = now;
    entry
}

/// Round trips this short or shorter get every RTT point.
const RTT_FULL_US: u32 = 5_000;
/// Round trips this long or longer get none.
const RTT_NONE_US: u32 = 200_000;

/// The share (0-1) of the RTT points a round trip to the voters earns: all up to 5 ms (one data centre or one
/// city), none from 200 ms on, linear between. Unknown (no proof yet) earns none.
pub fn rtt_share(rtt_us: Option<u32>) -> f64 {
    match rtt_us {
        None => 0.0,
        Some(rtt) => {
            let over = rtt.saturating_sub(RTT_FULL_US);
            1.0 - (f64::from(over) / f64::from(RTT_NONE_US - RTT_FULL_US)).min(1.0)
        }
    }
}

/// The score bucket (0-20): stability weighs most (long sessions: the Skype measurements showed multi-session
/// supernodes lasting ~40 times longer), then the round trip to the voters (a slow voter slows every commit),
/// memory and cores to spare, then a zone label (so zone spread is possible at all). Compared in whole
/// buckets so tiny differences never reorder candidates. Bandwidth is not scored: measuring it would cost the
/// node's uplink at every proof; a standby that cannot keep up with the log is retired as stuck instead.
pub fn score(report: &Report, mean_session_ms: u64, rtt_us: Option<u32>) -> u32 {
    let hours = mean_session_ms as f64 / 3_600_000.0;
    let stability = 1.0 - (-hours / 12.0).exp();
    let memory = (report.free_memory_bytes as f64 / (4u64 << 30) as f64).min(1.0);
    let cores = (f64::from(report.cores) / 4.0).min(1.0);
    let zone = if report.zone.is_some() { 1.0 } else { 0.0 };
    let points =
        50.0 * stability + 15.0 * rtt_share(rtt_us) + 12.5 * memory + 12.5 * cores + 10.0 * zone;
    ((points / 5.0).floor() as u32).min(MAX_SCORE)
}

/// The score an adopted candidate starts its membership with: its candidate entry's, with its observed history
/// and its last proved round trip to the voters.
pub fn adopted_score(entry: &CandidateEntry, rtt_us: Option<u32>) -> MemberScore {
    MemberScore {
        score: entry.score,
        first_seen_ms: entry.first_seen_ms,
        sessions_seen: entry.sessions_seen.max(1),
        session_started_ms: entry.session_starts_ms.last().copied().unwrap_or(0),
        rtt_us,
    }
}

/// A serving member's score after a report on a leaf session that started at `session_started_ms`: its
/// history goes on as a candidate's would (a new session counts once), and the bucket is computed as for
/// candidates, so members and candidates compare on one scale.
pub fn member_score(
    previous: &MemberScore,
    report: &Report,
    session_started_ms: u64,
    now_ms: u64,
) -> MemberScore {
    let mut next = previous.clone();
    if session_started_ms != previous.session_started_ms {
        next.sessions_seen = next.sessions_seen.saturating_add(1);
        next.session_started_ms = session_started_ms;
    }
    let mean = now_ms.saturating_sub(next.first_seen_ms) / u64::from(next.sessions_seen.max(1));
    next.score = score(report, mean, next.rtt_us);
    next
}

/// Whether `new` must be written over `previous`: anything an operator or the controller reads changed, or the
/// stored entry is `refresh` old.
pub fn needs_write(
    previous: Option<&CandidateEntry>,
    new: &CandidateEntry,
    refresh: Duration,
) -> bool {
    let Some(previous) = previous else {
        return true;
    };
    let read = |entry: &CandidateEntry| {
        (
            entry.host,
            entry.eligible,
            entry.zone.clone(),
            entry.cluster_addr.clone(),
            entry.leaf_addr.clone(),
            entry.admin_addr.clone(),
            entry.score,
            entry.proof_at_ms,
            entry.proof_failed_at_ms,
            entry.session_starts_ms.clone(),
            entry.cooldown_until_ms,
            entry
                .gates
                .iter()
                .map(|(name, passed, _)| (name.clone(), *passed))
                .collect::<Vec<_>>(),
        )
    };
    read(previous) != read(new)
        || new.updated_at_ms.saturating_sub(previous.updated_at_ms) >= millis(refresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    fn request() -> OfferSuperPeerRequest {
        let build = Build::this();
        OfferSuperPeerRequest {
            offer: true,
            software_version: build.software_version,
            store_format: build.store_format,
            protocol_version: build.protocol_version,
            cores: 4,
            free_memory_bytes: 8 << 30,
            free_disk_bytes: 100 << 30,
            metered: false,
            on_battery: false,
            zone: "eu-1".into(),
            cluster_port: 7401,
            leaf_port: 7400,
            admin_port: 7402,
            history: Vec::new(),
            role_running: false,
        }
    }

    fn observed(now_ms: u64, session_started_ms: u64) -> Observed {
        Observed {
            now_ms,
            host: 1,
            ip: "192.0.2.7".parse().unwrap(),
            session_started_ms,
            nat_class: "public".into(),
            granted: true,
            rtt_us: Some(1_000),
        }
    }

    fn failed(entry: &CandidateEntry) -> Vec<&str> {
        entry
            .gates
            .iter()
            .filter(|(_, passed, _)| !passed)
            .map(|(name, _, _)| name.as_str())
            .collect()
    }

    #[test]
    fn absurd_reports_are_refused_naming_the_field() {
        type Spoil = fn(&mut OfferSuperPeerRequest);
        let cases: Vec<(Spoil, &str)> = vec![
            (|r| r.cores = 0, "cores 0"),
            (|r| r.cores = 100_000, "cores 100000"),
            (|r| r.free_memory_bytes = u64::MAX, "free_memory_bytes"),
            (|r| r.free_disk_bytes = u64::MAX, "free_disk_bytes"),
            (|r| r.zone = "EU west".into(), "zone"),
            (|r| r.zone = "z".repeat(64), "zone"),
            (|r| r.cluster_port = 70_000, "cluster_port 70000"),
            (|r| r.leaf_port = 0, "leaf_port 0"),
            (|r| r.admin_port = 7401, "must differ"),
            (|r| r.software_version = "v".repeat(65), "software_version"),
            (
                |r| {
                    r.history = vec![
                        vesper_proto::v1::SessionSpan {
                            started_at_ms: 0,
                            length_ms: 0
                        };
                        33
                    ]
                },
                "history",
            ),
        ];
        for (spoil, field) in cases {
            let mut bad = request();
            spoil(&mut bad);
            let error = validate(&bad).unwrap_err().to_string();
            assert!(error.contains(field), "{field}: {error}");
        }
        assert!(validate(&request()).is_ok());
        // A withdrawal needs no ports or resources.
        let withdraw = OfferSuperPeerRequest {
            offer: false,
            ..Default::default()
        };
        assert!(validate(&withdraw).is_ok());
    }

    #[test]
    fn a_steady_granted_public_proven_node_is_eligible_and_each_gate_can_fail_alone() {
        let rules = CandidateRules::default();
        let build = Build::this();
        let report = validate(&request()).unwrap();
        let now = 100 * HOUR;
        let seen = observed(now, now - 5 * HOUR);
        let entry = evaluate(&report, &seen, &ProofOutcome::Passed, None, &build, &rules);
        assert!(entry.eligible, "{:?}", entry.gates);
        assert!(entry.score > 0);
        assert_eq!(entry.cluster_addr, "192.0.2.7:7401");

        let not_granted = Observed {
            granted: false,
            ..seen.clone()
        };
        let e = evaluate(
            &report,
            &not_granted,
            &ProofOutcome::Passed,
            None,
            &build,
            &rules,
        );
        assert_eq!(failed(&e), ["granted"]);

        let behind_nat = Observed {
            nat_class: "endpoint-dependent".into(),
            ..seen.clone()
        };
        let e = evaluate(
            &report,
            &behind_nat,
            &ProofOutcome::Passed,
            None,
            &build,
            &rules,
        );
        assert_eq!(failed(&e), ["proof"]);
        let e = evaluate(
            &report,
            &seen,
            &ProofOutcome::Failed("connection refused".into()),
            None,
            &build,
            &rules,
        );
        assert_eq!(failed(&e), ["proof"]);
        assert!(
            e.gates[1].2.contains("connection refused"),
            "{:?}",
            e.gates[1]
        );
        // The reason stays with the entry while the failure is the latest attempt.
        let later = evaluate(
            &report,
            &observed(now + 1000, now - 5 * HOUR),
            &ProofOutcome::NotRun,
            Some(&e),
            &build,
            &rules,
        );
        assert_eq!(failed(&later), ["proof"]);
        assert!(
            later.gates[1].2.contains("connection refused"),
            "{:?}",
            later.gates[1]
        );

        let mut old = report.clone();
        old.store_format += 1;
        let e = evaluate(&old, &seen, &ProofOutcome::Passed, None, &build, &rules);
        assert_eq!(failed(&e), ["version"]);

        let fresh = observed(now, now - HOUR / 2);
        let e = evaluate(&report, &fresh, &ProofOutcome::Passed, None, &build, &rules);
        assert_eq!(failed(&e), ["uptime", "mean_session"]);

        let mut small = report.clone();
        small.on_battery = true;
        small.cores = 1;
        let e = evaluate(&small, &seen, &ProofOutcome::Passed, None, &build, &rules);
        assert_eq!(failed(&e), ["resources"]);
        assert!(e.gates[6].2.contains("on battery"), "{:?}", e.gates[6]);

        let mut cooling = entry.clone();
        cooling.cooldown_until_ms = now + HOUR;
        let e = evaluate(
            &report,
            &seen,
            &ProofOutcome::NotRun,
            Some(&cooling),
            &build,
            &rules,
        );
        assert_eq!(failed(&e), ["cooldown"]);
    }

    #[test]
    fn a_flapping_node_is_not_eligible_and_its_own_history_is_not_trusted() {
        let rules = CandidateRules::default();
        let build = Build::this();
        let mut request = request();
        // It claims a week of uptime; the cluster saw otherwise.
        request.history = vec![vesper_proto::v1::SessionSpan {
            started_at_ms: 0,
            length_ms: 7 * 24 * HOUR,
        }];
        let report = validate(&request).unwrap();
        let mut entry: Option<CandidateEntry> = None;
        let mut now = 10 * HOUR;
        for _ in 0..5 {
            // A new session every 2 hours, each observed by the host.
            let seen = observed(now, now - HOUR - 1);
            entry = Some(evaluate(
                &report,
                &seen,
                &ProofOutcome::Passed,
                entry.as_ref(),
                &build,
                &rules,
            ));
            now += 2 * HOUR;
        }
        let entry = entry.unwrap();
        assert_eq!(entry.sessions_seen, 5);
        assert!(!entry.eligible);
        assert!(failed(&entry).contains(&"flapping"), "{:?}", entry.gates);

        // A proof failing after one passed is a reachability flip.
        let steady = observed(100 * HOUR, 90 * HOUR);
        let passed = evaluate(
            &report,
            &steady,
            &ProofOutcome::Passed,
            None,
            &build,
            &rules,
        );
        let later = observed(100 * HOUR + 1000, 90 * HOUR);
        let flipped = evaluate(
            &report,
            &later,
            &ProofOutcome::Failed("timed out".into()),
            Some(&passed),
            &build,
            &rules,
        );
        assert!(failed(&flipped).contains(&"flapping"));
    }

    #[test]
    fn proofs_are_renewed_on_their_interval_and_moved_addresses_need_a_new_one() {
        let rules = CandidateRules::default();
        let build = Build::this();
        let report = validate(&request()).unwrap();
        let now = 100 * HOUR;
        assert!(proof_due(None, now, &rules));
        let entry = evaluate(
            &report,
            &observed(now, 0),
            &ProofOutcome::Passed,
            None,
            &build,
            &rules,
        );
        assert!(!proof_due(Some(&entry), now + 1000, &rules));
        assert!(proof_due(Some(&entry), now + 10 * 60 * 1000, &rules));
        let mut moved = report.clone();
        moved.cluster_port = 9401;
        let e = evaluate(
            &moved,
            &observed(now + 1000, 0),
            &ProofOutcome::NotRun,
            Some(&entry),
            &build,
            &rules,
        );
        assert_eq!(e.proof_at_ms, None);
        assert!(!e.eligible);
        // A failure is not retried before the interval either.
        let e = evaluate(
            &report,
            &observed(now, 0),
            &ProofOutcome::Failed("x".into()),
            None,
            &build,
            &rules,
        );
        assert!(!proof_due(Some(&e), now + 1000, &rules));
    }

    #[test]
    fn entries_are_written_only_on_change_or_refresh() {
        let rules = CandidateRules::default();
        let build = Build::this();
        let report = validate(&request()).unwrap();
        let now = 100 * HOUR;
        let first = evaluate(
            &report,
            &observed(now, 0),
            &ProofOutcome::Passed,
            None,
            &build,
            &rules,
        );
        assert!(needs_write(None, &first, rules.refresh));
        let again = evaluate(
            &report,
            &observed(now + 60_000, 0),
            &ProofOutcome::NotRun,
            Some(&first),
            &build,
            &rules,
        );
        assert!(!needs_write(Some(&first), &again, rules.refresh));
        let later = evaluate(
            &report,
            &observed(now + 300_000, 0),
            &ProofOutcome::NotRun,
            Some(&first),
            &build,
            &rules,
        );
        assert!(needs_write(Some(&first), &later, rules.refresh));
        let mut zoned = report.clone();
        zoned.zone = Some("eu-2".into());
        let moved = evaluate(
            &zoned,
            &observed(now + 60_000, 0),
            &ProofOutcome::NotRun,
            Some(&first),
            &build,
            &rules,
        );
        assert!(needs_write(Some(&first), &moved, rules.refresh));
    }

    #[test]
    fn a_member_score_goes_on_from_the_candidate_history() {
        let report = validate(&request()).unwrap();
        let mut entry = evaluate(
            &report,
            &observed(0, 0),
            &ProofOutcome::NotRun,
            None,
            &Build::this(),
            &CandidateRules::default(),
        );
        entry.first_seen_ms = 0;
        entry.sessions_seen = 2;
        entry.session_starts_ms = vec![0, 5 * HOUR];
        entry.score = 7;
        let adopted = adopted_score(&entry, Some(1_000));
        assert_eq!(
            (
                adopted.score,
                adopted.sessions_seen,
                adopted.session_started_ms
            ),
            (7, 2, 5 * HOUR)
        );
        // Reports on the same session: the mean grows with time, and so does the score (never past the top).
        let day = member_score(&adopted, &report, 5 * HOUR, 24 * HOUR);
        assert_eq!(day.sessions_seen, 2);
        assert_eq!(day.score, score(&report, 12 * HOUR, Some(1_000)));
        let later = member_score(&day, &report, 5 * HOUR, 240 * HOUR);
        assert!(later.score >= day.score && later.score <= MAX_SCORE);
        // A new leaf session counts once, however many reports it makes.
        let restarted = member_score(&later, &report, 241 * HOUR, 242 * HOUR);
        let again = member_score(&restarted, &report, 241 * HOUR, 243 * HOUR);
        assert_eq!((restarted.sessions_seen, again.sessions_seen), (3, 3));
        assert_eq!(again.score, score(&report, 81 * HOUR, Some(1_000)));
    }

    #[test]
    fn scores_grow_with_stability_and_stay_in_buckets() {
        let report = validate(&request()).unwrap();
        let near = Some(1_000);
        let short = score(&report, HOUR, near);
        let long = score(&report, 48 * HOUR, near);
        assert!(long > short, "{long} vs {short}");
        assert!(long <= MAX_SCORE);
        assert_eq!(
            score(&report, 48 * HOUR, near),
            score(&report, 48 * HOUR + 1, near)
        );
        // The same node far from the voters scores lower: 15 of 100 points go by the round trip.
        let far = score(&report, 48 * HOUR, Some(250_000));
        assert!(far + 3 <= long, "{far} vs {long}");
        assert_eq!(
            score(&report, 48 * HOUR, None),
            far,
            "unknown counts as far"
        );
    }

    #[test]
    fn the_round_trip_share_falls_from_5_to_200_ms() {
        let table: &[(Option<u32>, f64)] = &[
            (None, 0.0),
            (Some(0), 1.0),
            (Some(5_000), 1.0),
            (Some(102_500), 0.5),
            (Some(200_000), 0.0),
            (Some(u32::MAX), 0.0),
        ];
        for (rtt, share) in table {
            assert!(
                (rtt_share(*rtt) - share).abs() < 1e-9,
                "{rtt:?}: {}",
                rtt_share(*rtt)
            );
        }
    }
}
