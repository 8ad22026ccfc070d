//! How a node gets into a cluster and starts Raft, and what its data directory says about it.
//!
//! ```text
//!  data dir has node_id ── yes ──> resume (the cluster_name file must match the configured name)
//!        │ no
//!        ├─ start = bootstrap ──────> node 1 of a new cluster
//!        ├─ start = join(list) ─────> Cluster.Join to each member of the list in turn, until one answers
//!        │                            └─ or Admin.Initialize: bootstrap, unless a member of the list already
//!        │                               belongs to a cluster (then keep joining it)
//!        └─ start = idle ───────────> wait for Cluster.Adopt (vesperctl add-standby) or Admin.Initialize
//! ```
//!
//! Bootstrapping happens once per cluster: `--bootstrap` on one node's first start, or `vesperctl init` once
//! (idempotent: a node that is a member, or sees one, answers so and starts nothing). Every other start joins
//! or resumes, so nothing in a deployment differs between its first install and later upgrades.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rocksdb::DB;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::server::HealthReporter;
use vesper_proto::v1::initialize_response::Outcome;
use vesper_proto::v1::{DescribeRequest, InitializeResponse, JoinRequest, NodeDescriptor};

use crate::command::NodeInfo;
use crate::config::{Config, StartMode};
use crate::error::ServiceError;
use crate::events::EventLog;
use crate::membership::{AdoptRequests, InitRequests};
use crate::raft::network::{ClusterClients, Network};
use crate::raft::propose::Backoff;
use crate::raft::VesperRaft;
use crate::replica::Replica;
use crate::store::{LogStore, StateMachine, StoreError};

/// File in the data directory holding the node id once the node belongs to a cluster.
pub const NODE_ID_FILE: &str = "node_id";
/// File in the data directory holding the cluster's name, when one is configured.
pub const CLUSTER_NAME_FILE: &str = "cluster_name";
/// How long a member of the join list may take to say whether it belongs to a cluster, before `init`.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a node could not get into a cluster.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the data directory {path} belongs to cluster {found:?}, but this node is configured for cluster \
         {configured:?}: give it an empty data directory to join {configured:?} as a new node, or correct \
         cluster_name"
    )]
    OtherCluster {
        path: PathBuf,
        found: String,
        configured: String,
    },
    #[error("invalid raft configuration: {0}")]
    RaftConfig(String),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("raft: {0}")]
    Raft(String),
}

/// Writes `contents` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

/// The contents of a small file of the data directory, `None` when it does not exist.
fn read_file(path: &Path, what: &'static str) -> Result<Option<String>, StartError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StartError::Io {
            what,
            path: path.to_owned(),
            source,
        }),
    }
}

/// The node id kept in `data_dir`, if the node belongs to a cluster.
pub fn read_node_id(data_dir: &Path) -> Result<Option<u64>, StartError> {
    let path = data_dir.join(NODE_ID_FILE);
    let Some(text) = read_file(&path, "cannot read node id")? else {
        return Ok(None);
    };
    text.parse().map(Some).map_err(|_| StartError::Io {
        what: "node id file is not a number",
        path,
        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
    })
}

/// Checks that the data directory belongs to the configured cluster, before anything else opens it. A data
/// directory of a member that has no name on file yet (written before names were kept) takes the configured
/// name; one of another name is refused.
pub fn check_cluster_name(data_dir: &Path, configured: Option<&str>) -> Result<(), StartError> {
    let Some(configured) = configured else {
        return Ok(());
    };
    let path = data_dir.join(CLUSTER_NAME_FILE);
    match read_file(&path, "cannot read the cluster name")? {
        Some(found) if found != configured => Err(StartError::OtherCluster {
            path: data_dir.to_owned(),
            found,
            configured: configured.to_string(),
        }),
        Some(_) => Ok(()),
        None if read_node_id(data_dir)?.is_some() => write_cluster_name(data_dir, configured),
        None => Ok(()),
    }
}

fn write_cluster_name(data_dir: &Path, name: &str) -> Result<(), StartError> {
    let path = data_dir.join(CLUSTER_NAME_FILE);
    write_atomically(&path, format!("{name}\n").as_bytes()).map_err(|source| StartError::Io {
        what: "cannot write the cluster name",
        path,
        source,
    })
}

/// Whole milliseconds, as openraft takes its timings.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// openraft's configuration from ours.
pub fn raft_config(config: &Config) -> Result<Arc<openraft::Config>, StartError> {
    let raft = &config.raft;
    let built = openraft::Config {
        cluster_name: "vesper".into(),
        heartbeat_interval: millis(raft.heartbeat_interval),
        election_timeout_min: millis(raft.election_timeout_min),
        election_timeout_max: millis(raft.election_timeout_max),
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(raft.snapshot_after_logs),
        max_in_snapshot_log_to_keep: raft.logs_kept_after_snapshot,
        // Purge in large steps: every purge is one delete_range, cheap whatever its size.
        purge_batch_size: 256,
        ..Default::default()
    };
    built
        .validate()
        .map(Arc::new)
        .map_err(|error| StartError::RaftConfig(error.to_string()))
}

/// The join list without this node's own address (each pod of a StatefulSet is given the same list).
pub fn others(seeds: &[String], me: &NodeInfo) -> Vec<String> {
    seeds
        .iter()
        .filter(|seed| **seed != me.cluster_addr)
        .cloned()
        .collect()
}

/// The task that gets the node into a cluster and starts Raft.
pub struct StartUp {
    pub config: Config,
    pub me: NodeInfo,
    pub replica: Replica,
    pub clients: ClusterClients,
    pub events: EventLog,
    pub db: Arc<DB>,
    pub health: HealthReporter,
    pub data_dir: PathBuf,
    pub raft_counters: crate::metrics::RaftCounters,
    pub snapshot_metrics: crate::metrics::SnapshotMetrics,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

impl StartUp {
    pub async fn run(self, mut adopt_rx: AdoptRequests, mut init_rx: InitRequests) {
        let result = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return,
            result = self.enter(&mut adopt_rx, &mut init_rx) => result,
        };
        // Later adoption and init requests are answered with "already a member" by closing the queues.
        drop(adopt_rx);
        drop(init_rx);
        if let Err(error) = result {
            tracing::error!(%error, "cannot start raft; stopping the node");
            self.shutdown.cancel();
        }
    }

    async fn enter(
        &self,
        adopt_rx: &mut AdoptRequests,
        init_rx: &mut InitRequests,
    ) -> Result<(), StartError> {
        if let Some(node_id) = read_node_id(&self.data_dir)? {
            tracing::info!(node_id, "resuming as a cluster member");
            return self.start_raft(node_id).await;
        }
        match self.config.start.clone() {
            StartMode::Bootstrap => self.bootstrap().await,
            start @ StartMode::Join(_) => {
                let seeds = others(&start.seeds(), &self.me);
                loop {
                    tokio::select! {
                        joined = self.join(&seeds) => {
                            let node_id = joined?;
                            return self.start_raft(node_id).await;
                        }
                        Some(reply) = init_rx.recv() => {
                            if let Some(found) = self.member_among(&seeds).await {
                                tracing::info!(%found, "asked to initialise, but a cluster exists; joining it");
                                let _ = reply.send(InitializeResponse {
                                    outcome: Outcome::ClusterExists as i32,
                                    node_id: 0,
                                    detail: format!("{found}; this node joins that cluster"),
                                });
                                continue;
                            }
                            return self.initialize(reply).await;
                        }
                    }
                }
            }
            StartMode::Idle => {
                tracing::info!(
                    cluster_addr = %self.me.cluster_addr,
                    "waiting to be added to a cluster: vesperctl add-standby {} (or vesperctl init to start one)",
                    self.me.cluster_addr
                );
                tokio::select! {
                    adopted = adopt_rx.recv() => {
                        let Some((node_id, reply)) = adopted else {
                            return Ok(());
                        };
                        let started = self.persist_membership(node_id);
                        let started = match started {
                            Ok(()) => self.start_raft(node_id).await,
                            Err(error) => Err(error),
                        };
                        let answer = started
                            .as_ref()
                            .map(|_| ())
                            .map_err(|error| ServiceError::Raft(error.to_string().into()));
                        let _ = reply.send(answer);
                        started
                    }
                    Some(reply) = init_rx.recv() => self.initialize(reply).await,
                }
            }
        }
    }

    /// Bootstraps on an operator's `init`, and answers it.
    async fn initialize(
        &self,
        reply: tokio::sync::oneshot::Sender<InitializeResponse>,
    ) -> Result<(), StartError> {
        let result = self.bootstrap().await;
        let _ = reply.send(match &result {
            Ok(()) => InitializeResponse {
                outcome: Outcome::Bootstrapped as i32,
                node_id: 1,
                detail: "bootstrapped a new cluster; this node is its first voter (node 1)".into(),
            },
            Err(error) => InitializeResponse {
                outcome: Outcome::Unspecified as i32,
                node_id: 0,
                detail: format!("bootstrap failed: {error}"),
            },
        });
        result
    }

    /// Starts a new cluster with this node as node 1, its only voter.
    async fn bootstrap(&self) -> Result<(), StartError> {
        let node_id = 1;
        self.persist_membership(node_id)?;
        self.start_raft(node_id).await?;
        let raft = self.replica.raft().expect("raft was just started");
        let members = std::collections::BTreeMap::from([(node_id, self.me.clone())]);
        raft.initialize(members)
            .await
            .map_err(|error| StartError::Raft(error.to_string()))?;
        tracing::info!(node_id, name = ?self.config.cluster_name, "bootstrapped a new cluster");
        Ok(())
    }

    /// A member of the join list that belongs to a cluster, described for the operator, if one answers.
    async fn member_among(&self, seeds: &[String]) -> Option<String> {
        for seed in seeds {
            let Ok(mut client) = self.clients.client(seed) else {
                continue;
            };
            let described =
                tokio::time::timeout(DESCRIBE_TIMEOUT, client.describe(DescribeRequest {})).await;
            if let Ok(Ok(described)) = described {
                let described = described.into_inner();
                if described.node_id != 0 {
                    return Some(format!(
                        "{seed} is node {} of a cluster{}",
                        described.node_id,
                        if described.cluster_name.is_empty() {
                            String::new()
                        } else {
                            format!(" named {:?}", described.cluster_name)
                        }
                    ));
                }
            }
        }
        None
    }

    /// Asks the members of `seeds` in turn to register this node, until one does; retries with backoff after
    /// each round in which none answered.
    async fn join(&self, seeds: &[String]) -> Result<u64, StartError> {
        let me = &self.me;
        if seeds.is_empty() {
            tracing::warn!(
                "the join list names only this node: waiting for `vesperctl init` to start a cluster"
            );
            std::future::pending::<()>().await;
        }
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut round = 0u64;
        loop {
            round += 1;
            let mut refusals = Vec::new();
            for seed in seeds {
                let attempt = async {
                    let mut client = self.clients.client(seed)?;
                    let request = JoinRequest {
                        node: Some(NodeDescriptor {
                            peer_id: me.peer_id.clone(),
                            cluster_addr: me.cluster_addr.clone(),
                            leaf_addr: me.leaf_addr.clone(),
                            admin_addr: me.admin_addr.clone(),
                        }),
                        cluster_name: self.config.cluster_name.clone().unwrap_or_default(),
                    };
                    client.join(request).await
                }
                .await;
                match attempt {
                    Ok(reply) => {
                        let node_id = reply.into_inner().node_id;
                        self.persist_membership(node_id)?;
                        tracing::info!(node_id, %seed, "joined the cluster as a standby");
                        return Ok(node_id);
                    }
                    Err(status) => refusals.push(format!("{seed}: {}", status.message())),
                }
            }
            // The first rounds say it once each; later ones every tenth round, so a node waiting for `init`
            // does not flood its log.
            if round <= 3 || round.is_multiple_of(10) {
                tracing::warn!(
                    round,
                    tried = %refusals.join("; "),
                    "no member of the join list took this node yet; retrying"
                );
            }
            backoff.wait().await;
        }
    }

    /// Keeps the node id, and the cluster name when one is configured, in the data directory.
    fn persist_membership(&self, node_id: u64) -> Result<(), StartError> {
        if let Some(name) = &self.config.cluster_name {
            write_cluster_name(&self.data_dir, name)?;
        }
        let path = self.data_dir.join(NODE_ID_FILE);
        write_atomically(&path, format!("{node_id}\n").as_bytes()).map_err(|source| {
            StartError::Io {
                what: "cannot write node id",
                path,
                source,
            }
        })
    }

    async fn start_raft(&self, node_id: u64) -> Result<(), StartError> {
        let raft_config = raft_config(&self.config)?;
        let state_machine = StateMachine::open_with_events(self.db.clone(), self.events.clone())?
            .with_snapshot_metrics(self.snapshot_metrics.clone());
        let raft = VesperRaft::new(
            node_id,
            raft_config,
            Network::new(self.clients.clone()),
            LogStore::with_fsync_histogram(self.db.clone(), self.raft_counters.fsync_histogram()),
            state_machine,
        )
        .await
        .map_err(|error| StartError::Raft(error.to_string()))?;
        let metrics = raft.metrics();
        if self.replica.set_raft(raft).is_err() {
            return Err(StartError::Raft("raft was started twice".into()));
        }
        self.tasks.spawn(crate::ops::count_leader_changes(
            metrics,
            self.raft_counters.clone(),
            self.shutdown.clone(),
        ));
        self.health
            .set_serving::<vesper_proto::v1::leaf_server::LeafServer<crate::leaf::LeafService>>()
            .await;
        tracing::info!(node_id, "raft started");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(addr: &str) -> NodeInfo {
        NodeInfo {
            peer_id: "p".into(),
            cluster_addr: addr.into(),
            leaf_addr: String::new(),
            admin_addr: String::new(),
        }
    }

    #[test]
    fn the_join_list_skips_the_node_itself() {
        let seeds: Vec<String> = ["sp-0:7401", "sp-1:7401", "sp-2:7401"]
            .map(String::from)
            .to_vec();
        assert_eq!(others(&seeds, &me("sp-1:7401")), ["sp-0:7401", "sp-2:7401"]);
        assert_eq!(others(&seeds, &me("elsewhere:7401")), seeds);
        assert!(others(&seeds[..1], &me("sp-0:7401")).is_empty());
    }

    #[test]
    fn a_data_directory_of_another_cluster_is_refused_and_an_unnamed_member_takes_the_name() {
        let dir = tempfile::tempdir().unwrap();
        // Empty: anything goes, nothing is written before the node joins.
        check_cluster_name(dir.path(), Some("a")).unwrap();
        assert!(!dir.path().join(CLUSTER_NAME_FILE).exists());
        // A member from before names were kept: it takes the configured one.
        write_atomically(&dir.path().join(NODE_ID_FILE), b"3\n").unwrap();
        check_cluster_name(dir.path(), Some("a")).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CLUSTER_NAME_FILE)).unwrap(),
            "a\n"
        );
        check_cluster_name(dir.path(), Some("a")).unwrap();
        check_cluster_name(dir.path(), None).unwrap();
        let error = check_cluster_name(dir.path(), Some("b")).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("belongs to cluster \"a\"")
                && text.contains("configured for cluster \"b\""),
            "{text}"
        );
        // The refusal changed nothing on disk.
        assert_eq!(read_node_id(dir.path()).unwrap(), Some(3));
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CLUSTER_NAME_FILE)).unwrap(),
            "a\n"
        );
    }
}
