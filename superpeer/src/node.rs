//! A running super peer: its listeners, its services and its Raft instance.
//!
//! ```text
//!  Node::spawn(config)
//!    ├─ open RocksDB, load node key and TLS, bind the three listeners (port 0 allowed)
//!    ├─ serve Leaf (TLS), Cluster (mTLS), Admin (mTLS), each with gRPC health
//!    └─ start-up task: resume (node id on disk) | bootstrap | join via a member | wait for adoption
//!         └─ start Raft -> Replica::set_raft -> health of vesper.v1.Leaf becomes SERVING
//! ```
//!
//! On SIGTERM the `superpeer` binary first drains (`RunningNode::drain`, [`crate::drain`]): not ready, no new
//! sessions, leadership handed over, leaves moved. Shutdown (`RunningNode::shutdown` or a dropped handle's
//! token): servers stop accepting and drain, sessions end, then Raft shuts down and RocksDB closes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;
use vesper_proto::Keypair;

use crate::command::NodeInfo;
use crate::config::Config;
use crate::events::EventLog;
use crate::leaf::state::LeafState;
use crate::membership::{Adoption, Initialization, Membership};
use crate::raft::forward::Forwarder;
use crate::raft::network::{ClusterClients, MAX_CLUSTER_MESSAGE_BYTES};
use crate::replica::Replica;
use crate::router::links::Links;
use crate::router::Router;
use crate::sessions::SessionRegistry;
use crate::store::state_machine::StateReader;
use crate::store::{self, StoreError};
use crate::tls::{HandshakeLimits, Port, ServerTls, TlsError};
use crate::udp::Relay;

/// File in the data directory holding the node's Ed25519 key.
const NODE_KEY_FILE: &str = "node.key";
/// File in the data directory where the bound addresses are written (for scripts and tests).
pub const ENDPOINTS_FILE: &str = "endpoints.json";

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Config(Vec<String>),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Start(#[from] crate::startup::StartError),
    #[error("{0}")]
    Issuer(#[from] crate::placement::issuer::IssuerError),
}

/// The bound addresses of a running node.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Endpoints {
    pub leaf: SocketAddr,
    pub cluster: SocketAddr,
    pub admin: SocketAddr,
    /// The STUN port (UDP), when enabled: the leaf IP and port.
    #[serde(default)]
    pub stun: Option<SocketAddr>,
    /// The ops HTTP port (`/livez`, `/readyz`, `/metrics`).
    #[serde(default)]
    pub ops: Option<SocketAddr>,
}

/// How long [`RunningNode::shutdown`] waits for the node's tasks (servers draining, sessions, deliveries)
/// before it stops Raft anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Handle on a running node.
pub struct RunningNode {
    pub endpoints: Endpoints,
    /// This node's replica (proposals, reads, the member view), for embedding programs and tests.
    pub replica: Replica,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    drainer: crate::drain::Drainer,
    /// The ops HTTP server: outside `tasks`, so it answers `/livez` (and `/readyz` with "shutting down") until
    /// everything else has stopped.
    ops: OpsServer,
}

/// The ops HTTP server task and its own stop token; a node dropped without `shutdown` stops it too.
struct OpsServer {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RunningNode {
    /// Drains the node before a stop: it stops being ready and taking sessions, hands over leadership if it
    /// leads, and waits (up to `drain_timeout`) for its leaves to move to other members. Membership is not
    /// changed. [`RunningNode::shutdown`] comes after it.
    pub async fn drain(&self) -> crate::drain::Drained {
        self.drainer.run().await
    }

    /// Stops the node: servers drain, sessions end, Raft stops, storage closes. Waits up to [`SHUTDOWN_GRACE`]
    /// for the node's tasks, then stops Raft regardless (a task still running is logged with the count).
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                still_running = self.tasks.len(),
                grace = ?SHUTDOWN_GRACE,
                "tasks did not end within the shutdown grace; stopping raft anyway"
            );
        }
        if let Ok(raft) = self.replica.raft() {
            if let Err(error) = raft.shutdown().await {
                tracing::warn!(%error, "raft shutdown failed");
            }
        }
        self.ops.stop.cancel();
        if let Some(task) = self.ops.task.take() {
            let _ = task.await;
        }
    }

    /// Tasks of the node still running (servers, sessions, deliveries, timed jobs); 0 once `shutdown` returned
    /// within its grace. For tests that check nothing outlives the node.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// A handle on the node's task tracker, to see that every task ended after `shutdown`.
    pub fn task_tracker(&self) -> TaskTracker {
        self.tasks.clone()
    }

    /// A token that stops the node when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

fn io_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> NodeError + 'a {
    move |source| NodeError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Accepted connections with Nagle's algorithm off: requests and responses are small and latency-bound, and
/// without it a reply can wait for the peer's delayed ACK (about 40 ms).
/// Concurrent calls on one connection to the Cluster port: high, since a super peer multiplexes all its
/// forwarding and Raft traffic to another on one connection, but bounded.
const MAX_CLUSTER_STREAMS_PER_CONNECTION: u32 = 4096;
/// Concurrent calls on one connection to the Admin port.
const MAX_ADMIN_STREAMS_PER_CONNECTION: u32 = 64;

/// Re-reads the TLS files every `interval` (if not zero) and on SIGHUP; installs a changed, usable set for new
/// handshakes and for dialling other super peers.
async fn reload_tls(
    tls: Arc<ServerTls>,
    clients: ClusterClients,
    interval: Duration,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).ok();
    let mut ticker = (!interval.is_zero()).then(|| {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    });
    loop {
        let reason = tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            } => "SIGHUP",
            _ = async {
                match ticker.as_mut() {
                    Some(ticker) => ticker.tick().await,
                    None => std::future::pending().await,
                }
            } => "interval",
        };
        let tls = tls.clone();
        let outcome = tokio::task::spawn_blocking(move || tls.reload()).await;
        match outcome {
            Ok(Ok(Some(material))) => {
                let fingerprint = material
                    .fingerprint()
                    .map(|bytes| data_encoding::HEXLOWER.encode(&bytes))
                    .unwrap_or_default();
                tracing::info!(reason, %fingerprint, "TLS certificate reloaded");
                clients.replace_tls(material);
            }
            Ok(Ok(None)) => {}
            Ok(Err(error)) => {
                tracing::warn!(reason, %error, "new TLS files not usable; keeping the current certificate")
            }
            Err(error) => tracing::warn!(%error, "TLS reload task failed"),
        }
    }
}

/// The names gRPC reflection lists on a port: its own service, health, and reflection itself.
fn reflected(service: &'static str) -> [&'static str; 4] {
    [
        service,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
}

/// A reflection builder describing `service` (and health and reflection) from the compiled descriptor sets.
fn reflection(service: &'static str) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vesper_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for name in reflected(service) {
        builder = builder.with_service_name(name);
    }
    builder
}

/// gRPC server reflection (v1) of `service`.
fn reflection_v1(
    service: &'static str,
) -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    reflection(service)
        .build_v1()
        .expect("the compiled descriptor sets decode")
}

/// The same in the older v1alpha protocol, which many tools still ask first.
fn reflection_v1alpha(
    service: &'static str,
) -> tonic_reflection::server::v1alpha::ServerReflectionServer<
    impl tonic_reflection::server::v1alpha::ServerReflection,
> {
    reflection(service)
        .build_v1alpha()
        .expect("the compiled descriptor sets decode")
}

/// Tries for a leaf port whose UDP twin is free too, when the port is left to the system.
const LEAF_PORT_ATTEMPTS: usize = 32;

/// Binds the Leaf service (TCP) and, when STUN is on, the UDP port with the same number. With port 0 the system
/// picks a free TCP port, but the UDP port of that number may be in use (by any program's UDP socket); then
/// another port is tried. A port given explicitly is used as given, or start-up fails naming it.
async fn bind_leaf(
    config: &Config,
) -> Result<(TcpListener, Option<std::net::UdpSocket>), NodeError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let listener = bind("leaf service", config.leaf_listen).await?;
        if !config.stun.enabled {
            return Ok((listener, None));
        }
        let addr = listener.local_addr().map_err(|source| NodeError::Bind {
            what: "leaf service",
            addr: config.leaf_listen,
            source,
        })?;
        match crate::udp::stun::bind(addr) {
            Ok(socket) => return Ok((listener, Some(socket))),
            Err(source)
                if source.kind() == std::io::ErrorKind::AddrInUse
                    && config.leaf_listen.port() == 0
                    && attempt < LEAF_PORT_ATTEMPTS =>
            {
                tracing::debug!(%addr, "udp twin of the picked leaf port is taken; picking another");
            }
            Err(source) => {
                return Err(NodeError::Bind {
                    what: "stun port (udp, same address as the leaf service)",
                    addr,
                    source,
                })
            }
        }
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind { what, addr, source })
}

fn advertised(host: &Option<String>, bound: SocketAddr) -> String {
    match host {
        Some(host) => format!("{host}:{}", bound.port()),
        None => bound.to_string(),
    }
}

/// Starts a node. Returns once its listeners are bound and its services serve; joining a cluster goes on in
/// the background (watch `Admin.Status` or the health of `vesper.v1.Leaf`).
pub async fn spawn(config: Config) -> Result<RunningNode, NodeError> {
    config.validate().map_err(NodeError::Config)?;
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .map_err(io_error("cannot create data directory", &data_dir))?;
    // Before anything opens the data: another cluster's data directory is refused untouched.
    crate::startup::check_cluster_name(&data_dir, config.cluster_name.as_deref())?;
    let key_path = data_dir.join(NODE_KEY_FILE);
    let keypair = Keypair::load_or_generate(&key_path).map_err(io_error("node key", &key_path))?;
    let tls = Arc::new(ServerTls::load(
        config.tls.as_ref().expect("validate() checked tls is set"),
    )?);
    let issuer =
        match (&config.placement.issuer_cert, &config.placement.issuer_key) {
            (Some(cert), Some(key)) => Some(Arc::new(
                crate::placement::issuer::IssuerMaterial::load(cert, key, tls.material().ca_pem())?,
            )),
            _ => None,
        };
    let db = store::open(&data_dir.join("db"))?;

    let (leaf_listener, stun_socket) = bind_leaf(&config).await?;
    let cluster_listener = bind("cluster service", config.cluster_listen).await?;
    let admin_listener = bind("admin service", config.admin_listen).await?;
    let ops_listener = bind("ops port", config.ops_listen).await?;
    let local = |listener: &TcpListener, what| {
        listener.local_addr().map_err(|source| NodeError::Bind {
            what,
            addr: config.leaf_listen,
            source,
        })
    };
    let mut endpoints = Endpoints {
        leaf: local(&leaf_listener, "leaf service")?,
        cluster: local(&cluster_listener, "cluster service")?,
        admin: local(&admin_listener, "admin service")?,
        stun: None,
        ops: Some(local(&ops_listener, "ops port")?),
    };
    if stun_socket.is_some() {
        endpoints.stun = Some(endpoints.leaf);
    }
    let me = NodeInfo {
        peer_id: keypair.peer_id().to_string(),
        cluster_addr: advertised(&config.advertise_host, endpoints.cluster),
        leaf_addr: advertised(&config.advertise_host, endpoints.leaf),
        admin_addr: advertised(&config.advertise_host, endpoints.admin),
    };

    let (adoption, adopt_rx) = Adoption::new();
    let (initialization, init_rx) = Initialization::new();
    let clients = ClusterClients::new(tls.material());
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let forwarder = Forwarder::spawn(clients.clone(), shutdown.clone(), &tasks);
    let events = EventLog::default();
    let reader = StateReader::new(db.clone());
    let metrics = crate::metrics::Metrics::new();
    let replica = Replica::new(
        reader.clone(),
        clients.clone(),
        forwarder,
        metrics.raft.clone(),
    );
    let sessions = SessionRegistry::default();
    let relay = Relay::new(
        crate::udp::RelayConfig {
            enabled: config.relay.enabled && stun_socket.is_some(),
            ..config.relay
        },
        me.leaf_addr.clone(),
    );
    let (router, drain_requests) = Router::new(
        replica.clone(),
        sessions.clone(),
        clients.clone(),
        relay.clone(),
        Links::new(tasks.clone(), shutdown.clone()),
    );
    let placement_reports = crate::placement::controller::PlacementReports::default();
    let membership_ops = Membership::new(
        replica.clone(),
        clients.clone(),
        placement_reports.clone(),
        config.placement.enabled,
    );
    let offers = crate::placement::offers::Offers::new(
        replica.clone(),
        clients.clone(),
        config.placement.candidates,
    );
    let (member_view, members) = tokio::sync::watch::channel(Arc::default());
    let leaf_state = Arc::new(LeafState {
        config: config.clone(),
        me: me.clone(),
        replica: replica.clone(),
        router: router.clone(),
        sessions,
        events: events.clone(),
        tasks: tasks.clone(),
        offers: offers.clone(),
        members,
        session_metrics: metrics.sessions.clone(),
        message_metrics: metrics.messages.clone(),
        record_metrics: metrics.records.clone(),
        connection_metrics: metrics.connections.clone(),
    });

    let (health, health_service) = tonic_health::server::health_reporter();

    let limits = HandshakeLimits {
        timeout: config.tls_handshake_timeout,
        max_pending: config.max_pending_handshakes as usize,
        max_pending_per_ip: config.max_pending_handshakes_per_ip as usize,
    };
    let incoming = |listener, port| {
        crate::tls::accept(
            listener,
            tls.clone(),
            port,
            limits,
            shutdown.clone(),
            &tasks,
        )
    };
    let leaf_server = Server::builder()
        .max_concurrent_streams(Some(config.max_streams_per_connection))
        .http2_max_header_list_size(config.max_header_list_bytes)
        .layer(tonic::service::InterceptorLayer::new(
            crate::limits::MetadataLimit {
                max_bytes: config.max_metadata_bytes as usize,
            },
        ))
        .add_service(health_service.clone())
        .add_service(reflection_v1("vesper.v1.Leaf"))
        .add_service(reflection_v1alpha("vesper.v1.Leaf"))
        .add_service(crate::leaf::service(
            leaf_state.clone(),
            shutdown.clone(),
            tasks.clone(),
        ))
        .serve_with_incoming_shutdown(
            incoming(leaf_listener, Port::Leaf),
            shutdown.clone().cancelled_owned(),
        );
    let cluster_server = Server::builder()
        .max_concurrent_streams(Some(MAX_CLUSTER_STREAMS_PER_CONNECTION))
        .add_service(health_service.clone())
        .add_service(tonic::service::interceptor::InterceptedService::new(
            vesper_proto::v1::cluster_server::ClusterServer::new(crate::cluster::ClusterService {
                replica: replica.clone(),
                router: router.clone(),
                membership: membership_ops.clone(),
                adoption,
                offers,
                issuer: issuer.clone(),
                issued_validity: config.placement.issued_validity,
                me: me.clone(),
                cluster_name: config.cluster_name.clone(),
                tasks: tasks.clone(),
                shutdown: shutdown.clone(),
            })
            .max_decoding_message_size(MAX_CLUSTER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_CLUSTER_MESSAGE_BYTES),
            crate::roles::Gate::cluster(reader.clone()),
        ))
        .serve_with_incoming_shutdown(
            incoming(cluster_listener, Port::Mutual),
            shutdown.clone().cancelled_owned(),
        );
    let admin_server = Server::builder()
        .max_concurrent_streams(Some(MAX_ADMIN_STREAMS_PER_CONNECTION))
        .add_service(health_service)
        .add_service(reflection_v1("vesper.v1.Admin"))
        .add_service(reflection_v1alpha("vesper.v1.Admin"))
        .add_service(
            vesper_proto::v1::admin_server::AdminServer::with_interceptor(
                crate::admin::AdminService::new(
                    replica.clone(),
                    membership_ops.clone(),
                    me.clone(),
                    initialization,
                ),
                crate::roles::Gate::admin(reader.clone()),
            ),
        )
        .serve_with_incoming_shutdown(
            incoming(admin_listener, Port::Mutual),
            shutdown.clone().cancelled_owned(),
        );
    for (name, server) in [
        (
            "leaf",
            Box::pin(leaf_server) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>,
        ),
        ("cluster", Box::pin(cluster_server)),
        ("admin", Box::pin(admin_server)),
    ] {
        let stop = shutdown.clone();
        tasks.spawn(async move {
            if let Err(error) = server.await {
                tracing::error!(server = name, %error, "server failed; stopping the node");
                stop.cancel();
            }
        });
    }
    tracing::info!(
        peer_id = %me.peer_id,
        leaf = %endpoints.leaf,
        cluster = %endpoints.cluster,
        admin = %endpoints.admin,
        ops = %endpoints.ops.expect("set above"),
        "listening"
    );
    let endpoints_path = data_dir.join(ENDPOINTS_FILE);
    crate::startup::write_atomically(
        &endpoints_path,
        &serde_json::to_vec(&endpoints).expect("endpoints serialize"),
    )
    .map_err(io_error("cannot write endpoints", &endpoints_path))?;

    if let Some(socket) = stun_socket {
        let port = crate::udp::stun::spawn(
            socket,
            config.stun,
            relay.table(),
            metrics.udp.clone(),
            shutdown.clone(),
        )
        .map_err(|source| NodeError::Bind {
            what: "stun port (its thread did not start)",
            addr: endpoints.leaf,
            source,
        })?;
        tasks.spawn(port);
    }
    tasks.spawn(reload_tls(
        tls.clone(),
        clients.clone(),
        config.tls_reload_interval,
        shutdown.clone(),
    ));
    tasks.spawn(crate::leader::expiry::run(
        replica.clone(),
        config.host_expiry,
        shutdown.clone(),
    ));
    tasks.spawn(crate::placement::self_report::report(
        replica.clone(),
        config.placement.zone.clone(),
        tls.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(crate::placement::renewal::run(
        replica.clone(),
        tls.clone(),
        clients.clone(),
        shutdown.clone(),
    ));
    if let Some(issuer) = issuer {
        tracing::info!(
            until_ms = issuer.not_after_ms(),
            "this node signs the certificates of adopted nodes"
        );
        tasks.spawn(crate::placement::issuer::run(
            replica.clone(),
            issuer,
            config.placement.issued_validity,
            shutdown.clone(),
        ));
    }
    tasks.spawn(crate::placement::controller::run(
        replica.clone(),
        config.placement.clone(),
        placement_reports,
        metrics.placement.clone(),
        shutdown.clone(),
    ));
    let draining = CancellationToken::new();
    let drainer = crate::drain::Drainer {
        replica: replica.clone(),
        sessions: leaf_state.sessions.clone(),
        started: draining.clone(),
        timeout: config.drain_timeout,
    };
    let ops_state = crate::ops::OpsState {
        replica: replica.clone(),
        sessions: leaf_state.sessions.clone(),
        relay: relay.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        draining: draining.clone(),
        ready_max_lag: config.ready_max_lag,
        leader_view: Arc::new(crate::ops::status::LeaderView::new(membership_ops.clone())),
        census: Arc::default(),
    };
    tasks.spawn(crate::udp::load::report(
        replica.clone(),
        relay,
        shutdown.clone(),
    ));
    tasks.spawn(crate::leaf::load::report(
        replica.clone(),
        leaf_state.sessions.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(crate::leaf::members::run(
        replica.clone(),
        leaf_state.sessions.clone(),
        crate::leaf::members::Balance::from_config(&config.placement),
        crate::leaf::members::Drain {
            started: draining.clone(),
            spread: crate::leaf::members::MOVE_SPREAD.min(config.drain_timeout / 2),
        },
        member_view,
        shutdown.clone(),
    ));
    tasks.spawn(crate::leaf::listing::run(
        leaf_state.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(crate::leaf::messaging::run_drains(
        leaf_state,
        drain_requests,
        shutdown.clone(),
    ));
    let start_up = crate::startup::StartUp {
        config: config.clone(),
        me,
        replica: replica.clone(),
        clients,
        events,
        db,
        health,
        data_dir,
        raft_counters: metrics.raft.clone(),
        snapshot_metrics: metrics.snapshots.clone(),
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
    };
    tasks.spawn(start_up.run(adopt_rx, init_rx));
    let ops_stop = CancellationToken::new();
    let ops_task = tokio::spawn(crate::ops::serve(ops_listener, ops_state, ops_stop.clone()));

    Ok(RunningNode {
        endpoints,
        replica,
        shutdown,
        tasks,
        drainer,
        ops: OpsServer {
            stop: ops_stop,
            task: Some(ops_task),
        },
    })
}
