//! A cluster of real `superpeer` processes, or of super peers run inside the test process.
//!
//! In-process nodes ([`Cluster::start_in_process`]) are the same code on the same sockets, TLS and RocksDB,
//! started through a [`Launch`] that the caller provides (this crate does not link the super peer, so its many
//! test binaries do not link RocksDB). They take the same flags as the binary (`NodeOptions` applies to both)
//! and can be stopped and restarted, not SIGKILLed: tests of kills, crashes and logs stay on processes.
//!
//! Every node starts on port 0; the harness reads the bound ports from the node's `endpoints.json` and reuses
//! them on restart, so the addresses in the Raft membership stay valid. Readiness is observed through the Admin
//! service (status, leader, members), never assumed after a sleep. Dropping the cluster kills every process.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use anyhow::{bail, Context};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use vesper_leafpeer::{Keypair, Leaf, LeafConfig};
use vesper_proto::v1::admin_client::AdminClient;
use vesper_proto::v1::cluster_client::ClusterClient;
use vesper_proto::v1::{MemberRole, PromoteRequest, StatusRequest, StatusResponse};

use crate::pki::Pki;
use crate::wait;

/// Time a cluster gets to elect a leader or converge in tests; generous for a loaded 2-core machine.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

/// The bound addresses of a node, from its `endpoints.json`.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct Endpoints {
    pub leaf: std::net::SocketAddr,
    pub cluster: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    /// The STUN port (UDP), when the node serves one.
    #[serde(default)]
    pub stun: Option<std::net::SocketAddr>,
    /// The ops HTTP port (`/livez`, `/readyz`, `/metrics`).
    #[serde(default)]
    pub ops: Option<std::net::SocketAddr>,
}

/// How a node is started the first time.
#[derive(Debug, Clone)]
pub enum Start {
    Bootstrap,
    Join(String),
    Idle,
}

/// Tuning passed to every node.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// `--snapshot-after-logs`.
    pub snapshot_after_logs: Option<u64>,
    /// `--logs-kept-after-snapshot`.
    pub logs_kept_after_snapshot: Option<u64>,
    /// More flags for every node, e.g. `["--session-grace", "500ms"]`.
    pub extra_args: Vec<String>,
    /// IPs the nodes listen on, node i on `listen_ips[i % len]`; empty means 127.0.0.1. The super peer
    /// certificate names them all.
    pub listen_ips: Vec<std::net::IpAddr>,
    /// More flags for node i only (`node_args[i]`), after `extra_args`.
    pub node_args: Vec<Vec<String>>,
    /// Environment variables of every node process (`OTEL_*`, say); nodes inside the test process ignore them.
    pub env: Vec<(String, String)>,
    /// Give each node a certificate of its own (`certs/<name>.pem`), instead of one shared by all.
    pub per_node_certs: bool,
    /// Give every node the certificate issuer of adopted nodes (`vesperctl ca issuer`, `--issuer-cert`).
    pub issuer: bool,
}

/// Starts super peers inside the test process: implemented where the super peer library is linked.
pub trait Launch: Send + Sync {
    /// Starts a node from the command line the binary would get (`argv[0]` first); returns it once it listens.
    fn launch(
        &self,
        argv: Vec<OsString>,
    ) -> BoxFuture<'static, anyhow::Result<Box<dyn InProcessNode>>>;
}

/// A super peer running inside the test process.
pub trait InProcessNode: Send + Sync {
    /// Its bound addresses.
    fn endpoints(&self) -> Endpoints;
    /// Shuts it down gracefully (servers drain, Raft stops, storage closes).
    fn stop(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// One super peer: a child process or a node inside the test process.
pub struct NodeProcess {
    pub name: String,
    pub data_dir: PathBuf,
    pub endpoints: Option<Endpoints>,
    start: Start,
    child: Option<Child>,
    inner: Option<Box<dyn InProcessNode>>,
}

impl NodeProcess {
    pub fn is_running(&mut self) -> bool {
        if self.inner.is_some() {
            return true;
        }
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn endpoints(&self) -> Endpoints {
        self.endpoints.expect("node has started once")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// A cluster of super peer processes sharing one PKI.
pub struct Cluster {
    pub root: tempfile::TempDir,
    pub pki: Pki,
    pub nodes: Vec<NodeProcess>,
    options: NodeOptions,
    /// Set for a cluster of in-process nodes.
    launcher: Option<Arc<dyn Launch>>,
}

/// A node process that ended before it listened: its exit status and the end of its log.
#[derive(Debug)]
pub struct NodeExited {
    pub status: std::process::ExitStatus,
    pub log_tail: String,
}

impl std::fmt::Display for NodeExited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the node exited with {} before it listened:\n{}",
            self.status, self.log_tail
        )
    }
}

impl std::error::Error for NodeExited {}

/// Lines of each node's log a failed test prints.
const LOG_TAIL_LINES: usize = 25;

/// `line` without its ANSI colour sequences (ESC `[` ... a letter).
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let failed = std::thread::panicking() || crate::wait::timed_out();
        if failed {
            // What CI shows of a failure is the test's output: the end of each node's log goes there too.
            for node in &self.nodes {
                let log = node.data_dir.with_extension("log");
                if let Ok(text) = std::fs::read_to_string(&log) {
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
                    eprintln!("--- last {} lines of {}:", tail.len(), log.display());
                    for line in tail {
                        eprintln!("{}", without_colours(line));
                    }
                }
            }
        }
        if failed || std::env::var_os("VESPER_KEEP_TEST_FILES").is_some() {
            // Keep the logs of a failed test where a person can read them.
            let kept = self.root.path().to_path_buf();
            eprintln!("cluster files (logs) kept in {}", kept.display());
            let root =
                std::mem::replace(&mut self.root, tempfile::TempDir::new().expect("temp dir"));
            let _ = root.keep();
        }
    }
}

impl Cluster {
    /// Creates an empty cluster (no process yet) with a fresh PKI.
    pub fn new(options: NodeOptions) -> anyhow::Result<Cluster> {
        let root = tempfile::Builder::new()
            .prefix("vesper-cluster-")
            .tempdir()?;
        let sans: Vec<String> = options.listen_ips.iter().map(ToString::to_string).collect();
        let pki = Pki::create_with_sans(&root.path().join("pki"), &sans)?;
        Ok(Cluster {
            root,
            pki,
            nodes: Vec::new(),
            options,
            launcher: None,
        })
    }

    /// [`Cluster::start`] with every node inside the test process, started by `launcher`.
    pub async fn start_in_process(
        launcher: Arc<dyn Launch>,
        voters: usize,
        options: NodeOptions,
    ) -> anyhow::Result<Cluster> {
        let mut cluster = Cluster::new(options)?;
        cluster.launcher = Some(launcher);
        cluster.form(voters).await?;
        Ok(cluster)
    }

    /// Starts a cluster of `voters` voters and waits until every one is a voter and a leader is known.
    pub async fn start(voters: usize, options: NodeOptions) -> anyhow::Result<Cluster> {
        let mut cluster = Cluster::new(options)?;
        cluster.form(voters).await?;
        Ok(cluster)
    }

    /// Bootstraps the first node, joins the others and promotes them.
    async fn form(&mut self, voters: usize) -> anyhow::Result<()> {
        self.add_node(Start::Bootstrap).await?;
        let seed = self.nodes[0].endpoints().cluster.to_string();
        for _ in 1..voters {
            self.add_node(Start::Join(seed.clone())).await?;
        }
        self.wait_members(voters, 1).await?;
        // Promote every standby that joined.
        let status = self.status_of(0).await?;
        for member in status.members {
            if member.role == MemberRole::Standby as i32 {
                let promoted = self
                    .admin(0)
                    .await?
                    .promote(PromoteRequest {
                        node_id: member.node_id,
                    })
                    .await;
                // With short placement timers the controller may have promoted it first.
                if let Err(status) = promoted {
                    if !status.message().contains("already a voter") {
                        return Err(anyhow::Error::new(status).context("promote"));
                    }
                }
            }
        }
        self.wait_members(voters, voters).await?;
        Ok(())
    }

    /// Starts one more node and waits for its endpoints. Returns its index.
    pub async fn add_node(&mut self, start: Start) -> anyhow::Result<usize> {
        let index = self.nodes.len();
        let name = format!("sp{}", index + 1);
        let data_dir = self.root.path().join(&name);
        self.nodes.push(NodeProcess {
            name,
            data_dir,
            endpoints: None,
            start,
            child: None,
            inner: None,
        });
        self.launch(index).await?;
        Ok(index)
    }

    /// The certificate node `index` presents (its own with `per_node_certs`, issued on first use).
    pub fn node_cert(&self, index: usize) -> anyhow::Result<(PathBuf, PathBuf)> {
        if !self.options.per_node_certs {
            return Ok(self.pki.superpeer_cert());
        }
        let name = &self.nodes[index].name;
        let cert = self.pki.dir.join(format!("certs/{name}.pem"));
        if cert.exists() {
            return Ok((cert, self.pki.dir.join(format!("certs/{name}.key"))));
        }
        let sans: Vec<String> = self
            .options
            .listen_ips
            .iter()
            .flat_map(|ip| ["--san".to_string(), ip.to_string()])
            .collect();
        let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
        self.pki.issue("superpeer", name, &sans)
    }

    async fn launch(&mut self, index: usize) -> anyhow::Result<()> {
        let (cert, key) = self.node_cert(index)?;
        let ca = self.pki.ca_cert();
        let node = &mut self.nodes[index];
        let endpoints_file = node.data_dir.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints_file);
        std::fs::create_dir_all(&node.data_dir)?;
        let log_path = node.data_dir.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let (leaf, cluster, admin, ops) = match node.endpoints {
            Some(endpoints) => (
                endpoints.leaf,
                endpoints.cluster,
                endpoints.admin,
                endpoints
                    .ops
                    .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            ),
            None => {
                let ip = match self.options.listen_ips.as_slice() {
                    [] => std::net::IpAddr::from([127, 0, 0, 1]),
                    ips => ips[index % ips.len()],
                };
                let any = std::net::SocketAddr::new(ip, 0);
                (any, any, any, any)
            }
        };
        let mut argv: Vec<OsString> = vec!["superpeer".into()];
        let mut flag = |name: &str, value: OsString| {
            argv.push(name.into());
            argv.push(value);
        };
        flag("--data-dir", node.data_dir.clone().into());
        flag("--leaf-listen", leaf.to_string().into());
        flag("--cluster-listen", cluster.to_string().into());
        flag("--admin-listen", admin.to_string().into());
        flag("--ops-listen", ops.to_string().into());
        flag("--tls-ca", ca.into());
        flag("--tls-cert", cert.into());
        flag("--tls-key", key.into());
        match &node.start {
            Start::Bootstrap => argv.push("--bootstrap".into()),
            Start::Join(seed) => {
                argv.push("--join".into());
                argv.push(seed.into());
            }
            Start::Idle => {}
        }
        if let Some(logs) = self.options.snapshot_after_logs {
            argv.push("--snapshot-after-logs".into());
            argv.push(logs.to_string().into());
        }
        if let Some(logs) = self.options.logs_kept_after_snapshot {
            argv.push("--logs-kept-after-snapshot".into());
            argv.push(logs.to_string().into());
        }
        if self.options.issuer {
            let (cert, key) = self.pki.issuer()?;
            argv.extend([
                "--issuer-cert".into(),
                cert.into(),
                "--issuer-key".into(),
                key.into(),
            ]);
        }
        argv.extend(self.options.extra_args.iter().map(OsString::from));
        if let Some(args) = self.options.node_args.get(index) {
            argv.extend(args.iter().map(OsString::from));
        }
        if let Some(launcher) = &self.launcher {
            let started = launcher
                .launch(argv)
                .await
                .with_context(|| format!("start {} in process", node.name))?;
            node.endpoints = Some(started.endpoints());
            node.inner = Some(started);
            return Ok(());
        }
        let mut command = Command::new(crate::binary("superpeer"));
        command
            .args(&argv[1..])
            .env("RUST_LOG", "info,openraft=warn")
            // Spans name the node they come from, as an operator would set it (the Helm chart does).
            .env(
                "OTEL_RESOURCE_ATTRIBUTES",
                format!("service.instance.id={}", node.name),
            )
            .envs(self.options.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        node.child = Some(command.spawn().context("start superpeer")?);
        let name = node.name.clone();
        let child = node.child.as_mut().expect("just spawned");
        let endpoints: Result<Endpoints, NodeExited> = wait::until(
            &format!("{name} to write endpoints.json"),
            CONVERGE_TIMEOUT,
            || {
                let path = endpoints_file.clone();
                // A node that exits before it listens fails the start at once, with its log's end.
                let exited = child.try_wait();
                let log_path = log_path.clone();
                async move {
                    if let Ok(Some(status)) = exited {
                        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(5).collect();
                        let tail: Vec<String> = tail
                            .iter()
                            .rev()
                            .map(|line| without_colours(line))
                            .collect();
                        return Ok(Some(Err(NodeExited {
                            status,
                            log_tail: tail.join("\n"),
                        })));
                    }
                    match std::fs::read(&path) {
                        Ok(bytes) => Ok(Some(Ok(serde_json::from_slice(&bytes)?))),
                        Err(_) => Ok(None),
                    }
                }
            },
        )
        .await?;
        let endpoints = endpoints?;
        self.nodes[index].endpoints = Some(endpoints);
        Ok(())
    }

    /// SIGKILLs node `index`. In-process nodes cannot be killed: a test of kills starts processes.
    pub fn kill(&mut self, index: usize) {
        assert!(
            self.nodes[index].inner.is_none(),
            "an in-process node cannot be SIGKILLed: start the cluster with Cluster::start"
        );
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOPs node `index`: it keeps its sockets but does nothing until [`Cluster::resume`] (a process
    /// pause, as a long GC stall or a frozen VM would be).
    pub fn pause(&self, index: usize) {
        self.signal(index, rustix::process::Signal::STOP);
    }

    /// SIGCONTs node `index` after [`Cluster::pause`].
    pub fn resume(&self, index: usize) {
        self.signal(index, rustix::process::Signal::CONT);
    }

    fn signal(&self, index: usize, signal: rustix::process::Signal) {
        let child = self.nodes[index]
            .child
            .as_ref()
            .expect("only a node process can be signalled: start the cluster with Cluster::start");
        let pid =
            rustix::process::Pid::from_raw(child.id() as i32).expect("a child's pid is positive");
        rustix::process::kill_process(pid, signal).expect("signal a child process");
    }

    /// SIGTERMs node `index` and waits for it to exit.
    pub async fn stop(&mut self, index: usize) -> anyhow::Result<()> {
        if let Some(node) = self.nodes[index].inner.take() {
            node.stop().await;
            return Ok(());
        }
        if let Some(mut child) = self.nodes[index].child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let name = self.nodes[index].name.clone();
            let status = tokio::task::spawn_blocking(move || child.wait()).await??;
            if !status.success() {
                bail!("{name} exited with {status} after SIGTERM");
            }
        }
        Ok(())
    }

    /// Starts node `index` again on its previous ports.
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        self.launch(index).await
    }

    /// Indexes of the nodes whose process runs.
    pub fn running(&mut self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&index| self.nodes[index].is_running())
            .collect()
    }

    /// Runs `vesperctl ARGS --json` against node `index` and returns what it printed; fails with its error
    /// output when it fails.
    pub fn vesperctl_json(&self, index: usize, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let output = self.vesperctl(index, &[args, &["--json"]].concat())?;
        anyhow::ensure!(
            output.status.success(),
            "vesperctl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "vesperctl {args:?} printed no JSON: {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// Waits up to `timeout` until a running node that knows a leader reports a status for which `accept`
    /// holds; returns that status.
    pub async fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        accept: impl Fn(&StatusResponse) -> bool,
    ) -> anyhow::Result<StatusResponse> {
        let running = self.running();
        let this = &*self;
        let accept = &accept;
        wait::until(what, timeout, || async {
            for &index in &running {
                if let Ok(status) = this.status_of(index).await {
                    if status.leader_id != 0 && accept(&status) {
                        return Ok(Some(status));
                    }
                }
            }
            Ok(None)
        })
        .await
    }

    /// Runs `vesperctl ARGS` as the cluster's operator against node `index`'s Admin port.
    pub fn vesperctl(&self, index: usize, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let (cert, key) = self.pki.operator_cert();
        Command::new(crate::binary("vesperctl"))
            .arg("--server")
            .arg(self.nodes[index].endpoints().admin.to_string())
            .arg("--ca")
            .arg(self.pki.ca_cert())
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(args)
            .output()
            .context("run vesperctl")
    }

    /// An Admin client for node `index`, with the operator certificate.
    pub async fn admin(&self, index: usize) -> anyhow::Result<AdminClient<Channel>> {
        Ok(AdminClient::new(self.admin_channel(index).await?))
    }

    /// A channel to node `index`'s Admin port with the operator certificate.
    pub async fn admin_channel(&self, index: usize) -> anyhow::Result<Channel> {
        let (cert, key) = self.pki.operator_cert();
        let address = self.nodes[index].endpoints().admin;
        self.mtls_channel(address, &cert, &key, Duration::from_secs(30))
            .await
    }

    /// A Cluster client for node `index`, with the super peer certificate: calls as another member makes them.
    pub async fn cluster_client(
        &self,
        index: usize,
    ) -> anyhow::Result<ClusterClient<vesper_proto::version::StampedChannel>> {
        Ok(ClusterClient::with_interceptor(
            self.cluster_channel(index).await?,
            vesper_proto::version::ClusterStamp,
        ))
    }

    /// A channel to node `index`'s Cluster port presenting `cert` and `key` (another node's, say).
    pub async fn cluster_channel_as(
        &self,
        index: usize,
        cert: &Path,
        key: &Path,
    ) -> anyhow::Result<Channel> {
        let address = self.nodes[index].endpoints().cluster;
        self.mtls_channel(address, cert, key, Duration::from_secs(10))
            .await
            .context("connect to the Cluster port")
    }

    /// Waits up to `timeout` until node `index`'s Cluster port refuses a call made with `cert`/`key` as revoked
    /// (PERMISSION_DENIED naming the revocation); returns that status.
    pub async fn wait_revoked_on(
        &self,
        index: usize,
        cert: &Path,
        key: &Path,
        timeout: Duration,
    ) -> anyhow::Result<tonic::Status> {
        let client = ClusterClient::with_interceptor(
            self.cluster_channel_as(index, cert, key).await?,
            vesper_proto::version::ClusterStamp,
        );
        let refused = wait::until(
            &format!(
                "{} to refuse the revoked certificate",
                self.nodes[index].name
            ),
            timeout,
            || {
                let mut client = client.clone();
                async move {
                    Ok(client
                        .read_index(vesper_proto::v1::ReadIndexRequest {})
                        .await
                        .err()
                        .filter(|status| status.code() == tonic::Code::PermissionDenied))
                }
            },
        )
        .await?;
        anyhow::ensure!(refused.message().contains("revoked"), "{refused:?}");
        Ok(refused)
    }

    /// A channel to node `index`'s Cluster port with the super peer certificate, for clients that stamp their
    /// calls themselves (or, to test refusals, do not).
    pub async fn cluster_channel(&self, index: usize) -> anyhow::Result<Channel> {
        let (cert, key) = self.pki.superpeer_cert();
        let address = self.nodes[index].endpoints().cluster;
        self.mtls_channel(address, &cert, &key, Duration::from_secs(10))
            .await
            .context("connect to the Cluster port")
    }

    /// A channel to `address` presenting `cert`/`key`, with `timeout` for each call's answer.
    async fn mtls_channel(
        &self,
        address: std::net::SocketAddr,
        cert: &Path,
        key: &Path,
        timeout: Duration,
    ) -> anyhow::Result<Channel> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.pki.ca_pem()))
            .identity(Identity::from_pem(
                std::fs::read(cert)?,
                std::fs::read(key)?,
            ))
            .domain_name(address.ip().to_string());
        Ok(Endpoint::from_shared(format!("https://{address}"))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(timeout)
            .tls_config(tls)?
            .connect()
            .await?)
    }

    /// Status of node `index`.
    pub async fn status_of(&self, index: usize) -> anyhow::Result<StatusResponse> {
        Ok(self
            .admin(index)
            .await?
            .status(StatusRequest {})
            .await?
            .into_inner())
    }

    /// Waits until some running node reports `voters` voters and `members` live members and a leader; returns
    /// that status.
    pub async fn wait_members(
        &mut self,
        members: usize,
        voters: usize,
    ) -> anyhow::Result<StatusResponse> {
        let running = self.running();
        let this = &*self;
        wait::until("cluster membership", CONVERGE_TIMEOUT, || async {
            for &index in &running {
                let Ok(status) = this.status_of(index).await else {
                    continue;
                };
                let live = status
                    .members
                    .iter()
                    .filter(|member| member.role != MemberRole::Removed as i32)
                    .count();
                let voting = status
                    .members
                    .iter()
                    .filter(|member| member.role == MemberRole::Voter as i32)
                    .count();
                if status.leader_id != 0 && live == members && voting == voters {
                    return Ok(Some(status));
                }
            }
            Ok(None)
        })
        .await
    }

    /// Waits until a running node is the leader; returns the index of its process.
    pub async fn wait_leader(&mut self) -> anyhow::Result<usize> {
        self.wait_leader_index().await
    }

    /// Waits until some node reports itself leader; returns its index (stopped nodes simply do not answer).
    pub async fn wait_leader_index(&self) -> anyhow::Result<usize> {
        let this = self;
        wait::until("a leader", CONVERGE_TIMEOUT, || async {
            for index in 0..this.nodes.len() {
                let Ok(status) = this.status_of(index).await else {
                    continue;
                };
                if status.raft_state == "leader" {
                    return Ok(Some(index));
                }
            }
            Ok(None)
        })
        .await
    }

    /// Waits until node `index` has applied at least `applied_index`.
    pub async fn wait_applied(
        &self,
        index: usize,
        applied_index: u64,
    ) -> anyhow::Result<StatusResponse> {
        wait::until(
            &format!("{} to apply index {applied_index}", self.nodes[index].name),
            CONVERGE_TIMEOUT,
            || async {
                let status = self.status_of(index).await?;
                Ok((status.applied_index >= applied_index).then_some(status))
            },
        )
        .await
    }

    /// Waits until the relay load report and the certificate fingerprint of every node are replicated to node
    /// `index`: those are the only writes an idle cluster makes by itself (nodes without a zone label report
    /// none), so from then on its log index moves only when someone writes (tests of "refused, and the log did
    /// not move" need that). Returns the applied index.
    ///
    /// A status answer reads the applied index and the member table at two moments, so one answer can show a
    /// report whose entry its applied index does not count yet; the index is taken from two answers in a row that
    /// both show every report and agree on it.
    pub async fn wait_quiet(&self, index: usize) -> anyhow::Result<u64> {
        let expected = self.nodes.len();
        let previous = std::cell::Cell::new(None);
        let previous = &previous;
        wait::until(
            &format!(
                "every relay load and certificate replicated to {}",
                self.nodes[index].name
            ),
            CONVERGE_TIMEOUT,
            || async move {
                let status = self.status_of(index).await?;
                let reported = status
                    .members
                    .iter()
                    .filter(|member| member.relay_capacity > 0 && !member.certificate.is_empty())
                    .count();
                let now = (reported == expected).then_some(status.applied_index);
                let earlier = previous.replace(now);
                Ok(now.filter(|_| now == earlier))
            },
        )
        .await
    }

    /// Leaf addresses of every node.
    pub fn leaf_addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter_map(|node| node.endpoints.map(|endpoints| endpoints.leaf.to_string()))
            .collect()
    }

    /// A leaf attached to node `index` with a new key.
    pub async fn leaf(&self, index: usize) -> anyhow::Result<Leaf> {
        self.leaf_with(index, Keypair::generate()).await
    }

    /// A leaf attached to node `index` with the given key. It does not publish its endpoints by itself after
    /// attaching (that presence change would interleave with what presence tests watch); the NAT lab tests
    /// cover publishing.
    pub async fn leaf_with(&self, index: usize, keypair: Keypair) -> anyhow::Result<Leaf> {
        Ok(Leaf::connect(self.leaf_config(index, keypair)).await?)
    }

    /// The configuration [`Cluster::leaf_with`] attaches with, to change before connecting.
    pub fn leaf_config(&self, index: usize, keypair: Keypair) -> LeafConfig {
        let seed = self.nodes[index].endpoints().leaf.to_string();
        let mut config = LeafConfig::new(vec![seed], self.pki.ca_pem(), keypair);
        config.publish_endpoints = false;
        config
    }

    /// The node id of node `index`, from the member list of `status` (matched by Cluster address).
    pub fn node_id_in(&self, status: &StatusResponse, index: usize) -> Option<u64> {
        let address = self.nodes[index].endpoints?.cluster.to_string();
        status
            .members
            .iter()
            .find(|member| member.cluster_addr == address)
            .map(|member| member.node_id)
    }

    /// Node `index`'s log, without colours.
    pub fn log_text(&self, index: usize) -> String {
        std::fs::read_to_string(self.log_path(index))
            .map(|text| without_colours(&text))
            .unwrap_or_default()
    }

    /// Flags for node `index` only, from its next start on (after [`NodeOptions::extra_args`]).
    pub fn set_node_args(&mut self, index: usize, args: Vec<String>) {
        if self.options.node_args.len() <= index {
            self.options.node_args.resize(index + 1, Vec::new());
        }
        self.options.node_args[index] = args;
    }

    /// Path of node `index`'s log file.
    pub fn log_path(&self, index: usize) -> PathBuf {
        self.nodes[index].data_dir.with_extension("log")
    }

    /// The root folder of the cluster's files.
    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

#[cfg(test)]
mod colour_tests {
    #[test]
    fn colour_sequences_are_dropped_and_text_kept() {
        assert_eq!(
            super::without_colours("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m leaf attached"),
            "2026  INFO leaf attached"
        );
        assert_eq!(super::without_colours("plain"), "plain");
    }
}
