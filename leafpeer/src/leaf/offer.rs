//! Offering this node as a super peer: an explicit opt-in ([`SuperPeerOffer`] in `LeafConfig`).
//!
//! An app's own process never hosts RocksDB or Raft: the role runs as a separate `superpeer` process, so the
//! offer names that binary, and the build it reports (software version, store format, protocol) is the
//! binary's own (`superpeer --build-info`). While the node is a candidate, the library answers the dial-back
//! proofs of reachability on the role's ports (`vesper_proto::reach`): the ports must be free, and they are
//! the ports the role would serve on. It reports its capabilities on every session it attaches, and again on
//! the interval the super peer's answer names: cores, free memory and disk (at the role's state directory),
//! metered and battery flags, a zone label, and its uptime history, kept in the state directory. The super
//! peer's verdict (state and gates) is what [`Leaf::offer_status`](super::Leaf::offer_status) returns.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use vesper_proto::v1::{OfferSuperPeerRequest, OfferSuperPeerResponse, SessionSpan};

use super::shared::Shared;
use crate::error::LeafError;

/// Sessions the uptime history file keeps.
pub const HISTORY_KEPT: usize = 32;
/// The history file in the state directory.
const HISTORY_FILE: &str = "uptime-history";
/// Reports are sent at least this often whatever the super peer asks (a lost answer must not stop them).
const MAX_REPORT_INTERVAL: Duration = Duration::from_secs(300);
/// And at most this often.
const MIN_REPORT_INTERVAL: Duration = Duration::from_millis(250);

/// What a node offers when it opts in to serve as a super peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperPeerOffer {
    /// The `superpeer` binary the role would run.
    pub superpeer_binary: PathBuf,
    /// The role's state directory: its data would live here, free disk is measured here, and the uptime
    /// history is kept here.
    pub state_dir: PathBuf,
    /// The IP the role would listen on (unspecified for every interface).
    pub listen_ip: IpAddr,
    /// The role's ports: Cluster, Leaf (also UDP) and Admin. They must be free now; 0 lets the system pick
    /// (what was picked is in the reports and in [`OfferStatus::ports`]).
    pub cluster_port: u16,
    /// The Leaf port (TCP, and UDP for STUN and the relay).
    pub leaf_port: u16,
    /// The Admin port.
    pub admin_port: u16,
    /// A zone label (placement spreads voters over zones).
    pub zone: Option<String>,
    /// This node is on a metered link: it is then never eligible, but its offer is visible.
    pub metered: bool,
    /// This node runs on battery: likewise never eligible.
    pub on_battery: bool,
    /// More flags for the role's `superpeer` once adopted (for example `--config FILE` with its timers).
    pub role_args: Vec<String>,
}

/// One eligibility gate as the super peer judged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    /// "granted", "proof", "version", "uptime", "mean_session", "flapping", "resources" or "cooldown".
    pub name: String,
    /// Whether it holds.
    pub passed: bool,
    /// Why, with the measured value and the bound.
    pub detail: String,
}

/// The super peer's verdict on this node's last report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferStatus {
    /// "candidate" (some gate fails), "eligible", "adopted" (its certificate arrived; the role is starting),
    /// "serving" (the role's `superpeer` runs), "restarting" (it exited and starts again shortly) or
    /// "released" (the cluster retired the node or gave its adoption up: the role is stopped and its files
    /// deleted, and the node offers again; the next verdict shows its cooldown).
    pub state: String,
    /// Every gate, in a fixed order.
    pub gates: Vec<Gate>,
    /// When its reachability was last proven (ms since the epoch), if ever.
    pub proof_at_ms: Option<u64>,
    /// The role's ports this node offered (Cluster, Leaf, Admin).
    pub ports: [u16; 3],
}

impl SuperPeerOffer {
    fn role_spec(&self) -> super::role::RoleSpec {
        super::role::RoleSpec {
            superpeer_binary: self.superpeer_binary.clone(),
            state_dir: self.state_dir.clone(),
            listen_ip: self.listen_ip,
            cluster_port: self.cluster_port,
            leaf_port: self.leaf_port,
            admin_port: self.admin_port,
            zone: self.zone.clone(),
            role_args: self.role_args.clone(),
        }
    }
}

/// The role's `superpeer` while it runs: stop it, then wait until it has exited.
struct RoleRun {
    stop: CancellationToken,
    done: oneshot::Receiver<()>,
}

/// Starts supervising the adopted role, its state shown in `status`.
fn start_role(
    shared: &Arc<Shared>,
    offer: &SuperPeerOffer,
    adopted: super::role::Adopted,
    status: watch::Sender<Option<OfferStatus>>,
) -> RoleRun {
    let ports = [offer.cluster_port, offer.leaf_port, offer.admin_port];
    let stop = shared.stop.child_token();
    let (done_tx, done) = oneshot::channel();
    let spec = offer.role_spec();
    let role_stop = stop.clone();
    shared.spawn(async move {
        super::role::supervise(role_stop, spec, adopted, move |state| {
            status.send_replace(Some(OfferStatus::role(state, ports)));
        })
        .await;
        let _ = done_tx.send(());
    });
    RoleRun { stop, done }
}

impl OfferStatus {
    /// The status of a node whose role runs (or restarts).
    fn role(state: &str, ports: [u16; 3]) -> Self {
        Self {
            state: state.into(),
            gates: Vec::new(),
            proof_at_ms: None,
            ports,
        }
    }

    fn new(answer: OfferSuperPeerResponse, ports: [u16; 3]) -> Self {
        Self {
            ports,
            state: answer.state,
            gates: answer
                .gates
                .into_iter()
                .map(|gate| Gate {
                    name: gate.name,
                    passed: gate.passed,
                    detail: gate.detail,
                })
                .collect(),
            proof_at_ms: (answer.proof_at_ms != 0).then_some(answer.proof_at_ms),
        }
    }
}

/// What `superpeer --build-info` says about the binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildInfo {
    pub version: String,
    pub store_format: u32,
    pub protocol: u32,
}

/// Parses `version=X store_format=N protocol=N`.
pub fn parse_build_info(text: &str) -> Option<BuildInfo> {
    let mut version = None;
    let mut store_format = None;
    let mut protocol = None;
    for field in text.split_whitespace() {
        match field.split_once('=') {
            Some(("version", value)) => version = Some(value.to_string()),
            Some(("store_format", value)) => store_format = value.parse().ok(),
            Some(("protocol", value)) => protocol = value.parse().ok(),
            _ => {}
        }
    }
    Some(BuildInfo {
        version: version?,
        store_format: store_format?,
        protocol: protocol?,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// The uptime history: earlier runs of this node, newest first, and the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    path: PathBuf,
    spans: Vec<(u64, u64)>,
}

impl History {
    /// Reads the history in `dir` (a missing or damaged file starts an empty one) and starts a new span.
    pub fn open(dir: &Path, now_ms: u64) -> Self {
        let path = dir.join(HISTORY_FILE);
        let mut spans: Vec<(u64, u64)> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let (start, length) = line.split_once(' ')?;
                Some((start.parse().ok()?, length.parse().ok()?))
            })
            .collect();
        spans.insert(0, (now_ms, 0));
        spans.truncate(HISTORY_KEPT);
        Self { path, spans }
    }

    /// Extends the current span to `now_ms` and writes the file (atomically: a new file renamed over).
    pub fn touch(&mut self, now_ms: u64) -> std::io::Result<()> {
        if let Some(current) = self.spans.first_mut() {
            current.1 = now_ms.saturating_sub(current.0);
        }
        let text: String = self
            .spans
            .iter()
            .map(|(start, length)| format!("{start} {length}\n"))
            .collect();
        let temporary = self.path.with_extension("new");
        std::fs::write(&temporary, text)?;
        std::fs::rename(&temporary, &self.path)
    }

    /// The spans, newest first, as the report carries them.
    pub fn spans(&self) -> Vec<SessionSpan> {
        self.spans
            .iter()
            .map(|(started_at_ms, length_ms)| SessionSpan {
                started_at_ms: *started_at_ms,
                length_ms: *length_ms,
            })
            .collect()
    }
}

/// Free memory in bytes (Linux: MemAvailable; elsewhere unknown, 0).
fn free_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemAvailable:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kib| kib.saturating_mul(1024))
}

/// Free disk in bytes at `dir` for an unprivileged writer (0 when unknown).
fn free_disk_bytes(dir: &Path) -> u64 {
    rustix::fs::statvfs(dir).map_or(0, |stats| stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// What the node reports now.
fn report(offer: &SuperPeerOffer, build: &BuildInfo, history: &History) -> OfferSuperPeerRequest {
    OfferSuperPeerRequest {
        offer: true,
        software_version: build.version.clone(),
        store_format: build.store_format,
        protocol_version: build.protocol,
        cores: std::thread::available_parallelism().map_or(1, |cores| cores.get() as u32),
        free_memory_bytes: free_memory_bytes(),
        free_disk_bytes: free_disk_bytes(&offer.state_dir),
        metered: offer.metered,
        on_battery: offer.on_battery,
        zone: offer.zone.clone().unwrap_or_default(),
        cluster_port: u32::from(offer.cluster_port),
        leaf_port: u32::from(offer.leaf_port),
        admin_port: u32::from(offer.admin_port),
        history: history.spans(),
        role_running: false,
    }
}

/// Asks the binary what it is.
async fn build_info(binary: &Path) -> Result<BuildInfo, LeafError> {
    let shown = binary.display().to_string();
    let output = tokio::process::Command::new(binary)
        .arg("--build-info")
        .output()
        .await
        .map_err(|error| {
            LeafError::Config(format!("cannot run the super peer binary {shown}: {error}"))
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_build_info(&text)
        .filter(|_| output.status.success())
        .ok_or_else(|| {
            LeafError::Config(format!(
                "{shown} --build-info did not describe a super peer build (got {:?})",
                text.trim()
            ))
        })
}

/// Tries for a Leaf port whose TCP and UDP numbers are both free, when the OS picks it.
const PICK_ATTEMPTS: usize = 16;

/// The role's sockets while the node is a candidate: they hold the ports for the role.
struct RoleSockets {
    tcp: Vec<tokio::net::TcpListener>,
    udp: Arc<tokio::net::UdpSocket>,
}

/// Binds the role's ports for the proofs (a 0 lets the OS pick; the offer is updated with the ports bound);
/// the error names the port that is taken.
async fn bind(offer: &mut SuperPeerOffer) -> Result<RoleSockets, LeafError> {
    let ports = [offer.cluster_port, offer.leaf_port, offer.admin_port];
    let given: Vec<u16> = ports.iter().copied().filter(|port| *port != 0).collect();
    let mut unique = given.clone();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() != given.len() {
        return Err(LeafError::Config(format!(
            "the super peer role needs three different ports (cluster {}, leaf {}, admin {})",
            ports[0], ports[1], ports[2]
        )));
    }
    let ip = offer.listen_ip;
    let taken = |what: &str, port: u16, error: std::io::Error| {
        LeafError::Config(format!(
            "cannot bind {what} {} for the super peer role: {error}",
            SocketAddr::new(ip, port)
        ))
    };
    // The Leaf port needs its TCP and UDP numbers both.
    let mut leaf = None;
    for _ in 0..PICK_ATTEMPTS {
        let tcp = tokio::net::TcpListener::bind(SocketAddr::new(ip, offer.leaf_port))
            .await
            .map_err(|error| taken("TCP", offer.leaf_port, error))?;
        let port = tcp
            .local_addr()
            .map_err(|error| taken("TCP", 0, error))?
            .port();
        match tokio::net::UdpSocket::bind(SocketAddr::new(ip, port)).await {
            Ok(udp) => {
                leaf = Some((tcp, udp, port));
                break;
            }
            Err(error) if offer.leaf_port != 0 => return Err(taken("UDP", port, error)),
            Err(_) => continue,
        }
    }
    let (leaf_tcp, udp, leaf_port) = leaf.ok_or_else(|| {
        LeafError::Config(format!(
            "found no port free on both TCP and UDP for the role's Leaf port in {PICK_ATTEMPTS} tries"
        ))
    })?;
    let mut listeners = Vec::new();
    let mut bound = Vec::new();
    for port in [offer.cluster_port, offer.admin_port] {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, port))
            .await
            .map_err(|error| taken("TCP", port, error))?;
        bound.push(
            listener
                .local_addr()
                .map_err(|error| taken("TCP", port, error))?
                .port(),
        );
        listeners.push(listener);
    }
    offer.leaf_port = leaf_port;
    offer.cluster_port = bound[0];
    offer.admin_port = bound[1];
    listeners.push(leaf_tcp);
    Ok(RoleSockets {
        tcp: listeners,
        udp: Arc::new(udp),
    })
}

/// Binds the role's ports and answers proofs on them until the responder is stopped.
async fn start_responder(
    shared: &Arc<Shared>,
    offer: &mut SuperPeerOffer,
) -> Result<Responder, LeafError> {
    let sockets = bind(offer).await?;
    let stop = shared.stop.child_token();
    let (done_tx, done) = oneshot::channel::<()>();
    let responder_stop = stop.clone();
    let keypair = shared.config.keypair.clone();
    shared.spawn(async move {
        vesper_proto::reach::respond(keypair, sockets.tcp, vec![sockets.udp], async move {
            responder_stop.cancelled().await
        })
        .await;
        let _ = done_tx.send(());
    });
    Ok(Responder { stop, done })
}

/// Checks the offer and starts answering proofs and reporting (or, adopted before, serving); the receiver
/// shows the latest verdict.
pub async fn start(
    shared: &Arc<Shared>,
    offer: SuperPeerOffer,
) -> Result<watch::Receiver<Option<OfferStatus>>, LeafError> {
    let build = build_info(&offer.superpeer_binary).await?;
    std::fs::create_dir_all(&offer.state_dir).map_err(|error| {
        LeafError::Config(format!(
            "cannot create the role's state directory {}: {error}",
            offer.state_dir.display()
        ))
    })?;
    let (status_tx, status_rx) = watch::channel(None);
    let configured = offer.clone();
    let mut offer = offer;
    let phase = match super::role::adopted_before(&offer.role_spec()) {
        // Adopted before: serve again, where it was adopted (its certificate and the members know those
        // ports), and ask the cluster whether it still wants the role.
        Some(adopted) => {
            [offer.cluster_port, offer.leaf_port, offer.admin_port] = adopted.ports;
            Phase::Serving(start_role(shared, &offer, adopted, status_tx.clone()))
        }
        // The proofs are answered until the node is adopted; then the ports go to the role's own process.
        None => Phase::Offering(start_responder(shared, &mut offer).await?),
    };
    shared.spawn(run(
        shared.clone(),
        Offering {
            configured,
            offer,
            build,
            status: status_tx,
        },
        phase,
    ));
    Ok(status_rx)
}

/// The proof responder's handle: stop it, then wait until its sockets are closed.
struct Responder {
    stop: CancellationToken,
    done: oneshot::Receiver<()>,
}

/// Where the node stands.
enum Phase {
    /// A candidate: it answers proofs on the role's ports.
    Offering(Responder),
    /// Released, and its ports could not be bound again yet (tried again at the next report).
    Unbound,
    /// Adopted: the role's `superpeer` runs.
    Serving(RoleRun),
}

/// What the report loop works with.
struct Offering {
    /// The offer as the app made it (ports 0 still 0), for offering again after a release.
    configured: SuperPeerOffer,
    /// The offer with the ports in use.
    offer: SuperPeerOffer,
    build: BuildInfo,
    status: watch::Sender<Option<OfferStatus>>,
}

impl Offering {
    fn ports(&self) -> [u16; 3] {
        [
            self.offer.cluster_port,
            self.offer.leaf_port,
            self.offer.admin_port,
        ]
    }

    /// Takes the super peer's answer in `phase`; returns the next phase.
    async fn step(
        &mut self,
        shared: &Arc<Shared>,
        phase: Phase,
        answer: OfferSuperPeerResponse,
    ) -> Phase {
        match phase {
            Phase::Offering(responder)
                if answer.state == "adopted" && !answer.certificate_chain.is_empty() =>
            {
                let adopted = super::role::Adopted {
                    advertise_host: answer.advertise_host.clone(),
                    join: answer.join.clone(),
                    ports: self.ports(),
                };
                if let Err(error) = super::role::install(
                    shared,
                    &self.offer.role_spec(),
                    &answer.certificate_chain,
                    &adopted,
                ) {
                    tracing::warn!(%error, "cannot install the super peer role");
                    return Phase::Offering(responder);
                }
                tracing::info!("adopted as a super peer; starting the role");
                self.status
                    .send_replace(Some(OfferStatus::role("adopted", self.ports())));
                responder.stop.cancel();
                let _ = responder.done.await;
                Phase::Serving(start_role(
                    shared,
                    &self.offer,
                    adopted,
                    self.status.clone(),
                ))
            }
            Phase::Serving(role) if answer.state == "released" => {
                tracing::warn!(
                    "the cluster no longer wants this node's super peer role (retired, or its adoption \
                     was given up); stopping it and offering again"
                );
                role.stop.cancel();
                let _ = role.done.await;
                if let Err(error) = super::role::release(&self.offer.role_spec()) {
                    tracing::warn!(%error, "cannot delete the released role's files");
                }
                self.status
                    .send_replace(Some(OfferStatus::role("released", self.ports())));
                self.rebind(shared).await
            }
            Phase::Serving(role) => Phase::Serving(role),
            Phase::Unbound => self.rebind(shared).await,
            Phase::Offering(responder) => {
                let verdict = OfferStatus::new(answer, self.ports());
                tracing::debug!(state = %verdict.state, "super peer offer judged");
                self.status.send_replace(Some(verdict));
                Phase::Offering(responder)
            }
        }
    }

    /// Binds the configured ports again to offer anew.
    async fn rebind(&mut self, shared: &Arc<Shared>) -> Phase {
        self.offer = self.configured.clone();
        match start_responder(shared, &mut self.offer).await {
            Ok(responder) => Phase::Offering(responder),
            Err(error) => {
                tracing::warn!(%error, "cannot offer again yet");
                Phase::Unbound
            }
        }
    }
}

/// Reports on every attach and on the interval the answers ask for.
async fn run(shared: Arc<Shared>, mut offering: Offering, mut phase: Phase) {
    let mut history = History::open(&offering.offer.state_dir, now_ms());
    let mut connections = shared.attachment.connection.subscribe();
    let mut interval = Duration::from_secs(5);
    loop {
        let connection = connections.borrow_and_update().clone();
        if let Some(connection) = connection {
            if let Err(error) = history.touch(now_ms()) {
                tracing::warn!(%error, "cannot write the uptime history");
            }
            let mut body = report(&offering.offer, &offering.build, &history);
            body.role_running = matches!(phase, Phase::Serving(_));
            let mut request = connection.request(body);
            request.set_timeout(shared.config.request_timeout);
            match connection.client.clone().offer_super_peer(request).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    interval = Duration::from_millis(answer.report_interval_ms)
                        .clamp(MIN_REPORT_INTERVAL, MAX_REPORT_INTERVAL);
                    phase = offering.step(&shared, phase, answer).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "the super peer did not take the offer report")
                }
            }
        } else if matches!(phase, Phase::Unbound) {
            phase = offering.rebind(&shared).await;
        }
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return,
            // A new session reports at once.
            changed = connections.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_is_three_fields() {
        assert_eq!(
            parse_build_info("version=0.1.0 store_format=3 protocol=2\n"),
            Some(BuildInfo {
                version: "0.1.0".into(),
                store_format: 3,
                protocol: 2
            })
        );
        assert_eq!(parse_build_info("version=0.1.0"), None);
        assert_eq!(parse_build_info(""), None);
    }

    #[test]
    fn the_history_keeps_the_newest_runs_and_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("vesper-history-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut history = History::open(&dir, 1_000);
        history.touch(5_000).unwrap();
        let mut again = History::open(&dir, 10_000);
        again.touch(10_500).unwrap();
        let spans = again.spans();
        assert_eq!(spans.len(), 2);
        assert_eq!((spans[0].started_at_ms, spans[0].length_ms), (10_000, 500));
        assert_eq!((spans[1].started_at_ms, spans[1].length_ms), (1_000, 4_000));
        for run in 0..40 {
            History::open(&dir, 20_000 + run)
                .touch(20_001 + run)
                .unwrap();
        }
        assert_eq!(History::open(&dir, 99_999).spans().len(), HISTORY_KEPT);
        // A damaged file starts over instead of failing.
        std::fs::write(dir.join(HISTORY_FILE), "garbage\n").unwrap();
        assert_eq!(History::open(&dir, 1).spans().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
