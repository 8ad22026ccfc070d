//! `superpeer`: runs one Vesper super peer.
//!
//! Configuration is layered: built-in defaults, then the TOML file given with `--config`, then `VESPER_*`
//! environment variables, then flags (each flag names its variable in `--help`). All problems are reported
//! together, with exit code 64.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vesper_superpeer::config::{Config, StartMode};
use vesper_superpeer::tls::TlsPaths;

/// Exit code for bad usage or configuration (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Run a Vesper super peer.
///
/// A new cluster starts with one node run with --bootstrap; more nodes join it with --join ADDR (any member's
/// cluster address) and become standbys, which an operator promotes with `vesperctl promote`. A node started
/// with neither waits until `vesperctl add-standby` adds it. A node whose data directory already belongs to a
/// cluster resumes, whatever these flags say.
#[derive(Debug, Parser)]
#[command(name = "superpeer", version)]
struct Args {
    /// TOML configuration file (keys as in docs/CONFIG.md).
    #[arg(long, env = "VESPER_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (RocksDB, node key, node id). Default: ./vesper-data.
    #[arg(long, env = "VESPER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Leaf service listen address. Default: 127.0.0.1:7400. Port 0 picks a free port.
    #[arg(long, env = "VESPER_LEAF_LISTEN")]
    leaf_listen: Option<SocketAddr>,
    /// Cluster service listen address. Default: 127.0.0.1:7401.
    #[arg(long, env = "VESPER_CLUSTER_LISTEN")]
    cluster_listen: Option<SocketAddr>,
    /// Admin service listen address. Default: 127.0.0.1:7402.
    #[arg(long, env = "VESPER_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Host name or IP that others use to reach this node. Default: the listen IP.
    #[arg(long, env = "VESPER_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// CA certificate (PEM) of the cluster.
    #[arg(long, env = "VESPER_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM), issued by the cluster CA for role superpeer.
    #[arg(long, env = "VESPER_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the certificate.
    #[arg(long, env = "VESPER_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Start a new cluster with this node as its first voter (only on first start).
    #[arg(long, env = "VESPER_BOOTSTRAP", conflicts_with = "join")]
    bootstrap: bool,
    /// Join the cluster of the member at this cluster address, as a standby (only on first start).
    #[arg(long, env = "VESPER_JOIN", value_name = "HOST:PORT")]
    join: Option<String>,
    /// Build a Raft snapshot after this many log entries. Default: 100000.
    #[arg(long, env = "VESPER_SNAPSHOT_AFTER_LOGS")]
    snapshot_after_logs: Option<u64>,
    /// Log entries kept behind a snapshot. Default: 5000.
    #[arg(long, env = "VESPER_LOGS_KEPT_AFTER_SNAPSHOT")]
    logs_kept_after_snapshot: Option<u64>,
    /// Milliseconds a peer stays online after its session broke without a goodbye. Default: 10000.
    #[arg(long, env = "VESPER_SESSION_GRACE_MS")]
    session_grace_ms: Option<u64>,
    /// Milliseconds of silence after which a session is closed. Default: 15000.
    #[arg(long, env = "VESPER_SESSION_TTL_MS")]
    session_ttl_ms: Option<u64>,
    /// Milliseconds of silence after which the leader takes a super peer's leaves offline. Default: 15000.
    #[arg(long, env = "VESPER_HOST_EXPIRY_MS")]
    host_expiry_ms: Option<u64>,
    /// Most messages waiting in one peer's mailbox. Default: 1000.
    #[arg(long, env = "VESPER_MAILBOX_QUOTA")]
    mailbox_quota: Option<u32>,
    /// Most records one peer may own in the metadata index; a put beyond it gets RESOURCE_EXHAUSTED.
    /// Default: 10000.
    #[arg(long, env = "VESPER_MAX_RECORDS_PER_PEER")]
    max_records_per_peer: Option<u64>,
    /// Most bytes one peer's records may hold together (namespaces, keys, attributes, values). Default:
    /// 67108864 (64 MiB).
    #[arg(long, env = "VESPER_MAX_RECORD_BYTES_PER_PEER")]
    max_record_bytes_per_peer: Option<u64>,
    /// Largest record value, in bytes (at most 1048576). Default: 65536.
    #[arg(long, env = "VESPER_MAX_VALUE_BYTES")]
    max_value_bytes: Option<usize>,
    /// Most attributes on one record or presence profile (at most 256). Default: 32.
    #[arg(long, env = "VESPER_MAX_ATTRIBUTES")]
    max_attributes: Option<usize>,
    /// Longest attribute value, in bytes (at most 4096). Default: 256.
    #[arg(long, env = "VESPER_MAX_ATTRIBUTE_VALUE_BYTES")]
    max_attribute_value_bytes: Option<usize>,
    /// Largest message payload, in bytes (at most 1048576). Default: 65536.
    #[arg(long, env = "VESPER_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<usize>,
    /// Messages one session may send per second, sustained. Default: 200.
    #[arg(long, env = "VESPER_SEND_RATE")]
    send_rate: Option<u32>,
    /// Messages one session may send in a burst. Default: 400.
    #[arg(long, env = "VESPER_SEND_BURST")]
    send_burst: Option<u32>,
    /// Calls (other than sends) one session may make per second. Default: 2000.
    #[arg(long, env = "VESPER_REQUEST_RATE")]
    request_rate: Option<u32>,
    /// Calls one session may make in a burst. Default: 4000.
    #[arg(long, env = "VESPER_REQUEST_BURST")]
    request_burst: Option<u32>,
    /// Open sessions from one IP address at most. Default: 1024.
    #[arg(long, env = "VESPER_MAX_SESSIONS_PER_IP")]
    max_sessions_per_ip: Option<u32>,
    /// Milliseconds a client gets to finish its TLS handshake. Default: 10000.
    #[arg(long, env = "VESPER_TLS_HANDSHAKE_TIMEOUT_MS")]
    tls_handshake_timeout_ms: Option<u64>,
    /// TLS handshakes in progress at once per port (more connections are closed at once). Default: 1024.
    #[arg(long, env = "VESPER_MAX_PENDING_HANDSHAKES")]
    max_pending_handshakes: Option<u32>,
    /// TLS handshakes in progress at once from one IP address, per port. Default: 64.
    #[arg(long, env = "VESPER_MAX_PENDING_HANDSHAKES_PER_IP")]
    max_pending_handshakes_per_ip: Option<u32>,
    /// Concurrent calls one connection to the Leaf port may have open. Default: 256.
    #[arg(long, env = "VESPER_MAX_STREAMS_PER_CONNECTION")]
    max_streams_per_connection: Option<u32>,
    /// Milliseconds between checks of the TLS files for a rotated certificate (0: only on SIGHUP).
    /// Default: 10000.
    #[arg(long, env = "VESPER_TLS_RELOAD_MS")]
    tls_reload_ms: Option<u64>,
    /// Do not serve STUN (leaves then cannot learn their public address from this node).
    #[arg(long, env = "VESPER_NO_STUN")]
    no_stun: bool,
    /// STUN answers per second to one source IP. Default: 20 (bursts of twice that).
    #[arg(long, env = "VESPER_STUN_RATE_PER_SOURCE")]
    stun_rate_per_source: Option<u32>,
    /// STUN answers per second from this node in all. Default: 20000.
    #[arg(long, env = "VESPER_STUN_MAX_ANSWERS")]
    stun_max_answers: Option<u32>,
    /// Do not relay for leaves (brokers then pick other super peers as relays).
    #[arg(long, env = "VESPER_NO_RELAY")]
    no_relay: bool,
    /// Bytes one relay allocation may carry, both directions together. Default: 268435456 (256 MiB).
    #[arg(long, env = "VESPER_RELAY_MAX_BYTES")]
    relay_max_bytes: Option<u64>,
    /// Seconds one relay allocation lives. Default: 600.
    #[arg(long, env = "VESPER_RELAY_MAX_SECONDS")]
    relay_max_seconds: Option<u32>,
    /// Bytes per second one relay allocation may carry in each direction (more is dropped). Default: 8388608.
    #[arg(long, env = "VESPER_RELAY_MAX_BYTES_PER_SECOND")]
    relay_max_bytes_per_second: Option<u64>,
    /// Relay allocations at once on this node. Default: 1000.
    #[arg(long, env = "VESPER_RELAY_MAX_ALLOCATIONS")]
    relay_max_allocations: Option<usize>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "VESPER_LOG_JSON")]
    log_json: bool,
}

fn build_config(args: &Args) -> Result<Config, Vec<String>> {
    let mut problems = Vec::new();
    let mut config = match &args.config {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str::<Config>(&text).unwrap_or_else(|error| {
                problems.push(format!("config file {}: {error}", path.display()));
                Config::default()
            }),
            Err(error) => {
                problems.push(format!(
                    "cannot read config file {}: {error}",
                    path.display()
                ));
                Config::default()
            }
        },
        None => Config::default(),
    };
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(addr) = args.leaf_listen {
        config.leaf_listen = addr;
    }
    if let Some(addr) = args.cluster_listen {
        config.cluster_listen = addr;
    }
    if let Some(addr) = args.admin_listen {
        config.admin_listen = addr;
    }
    if let Some(host) = &args.advertise_host {
        config.advertise_host = Some(host.clone());
    }
    match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (Some(ca_cert), Some(cert), Some(key)) => {
            config.tls = Some(TlsPaths {
                ca_cert: ca_cert.clone(),
                cert: cert.clone(),
                key: key.clone(),
            })
        }
        (None, None, None) => {}
        _ => problems.push("--tls-ca, --tls-cert and --tls-key must be given together".into()),
    }
    if args.bootstrap {
        config.start = StartMode::Bootstrap;
    }
    if let Some(seed) = &args.join {
        config.start = StartMode::Join(seed.clone());
    }
    if let Some(logs) = args.snapshot_after_logs {
        config.raft.snapshot_after_logs = logs;
    }
    if let Some(logs) = args.logs_kept_after_snapshot {
        config.raft.logs_kept_after_snapshot = logs;
    }
    if let Some(value) = args.session_grace_ms {
        config.session_grace_ms = value;
    }
    if let Some(value) = args.session_ttl_ms {
        config.session_ttl_ms = value;
    }
    if let Some(value) = args.host_expiry_ms {
        config.host_expiry_ms = value;
    }
    if let Some(value) = args.mailbox_quota {
        config.mailbox_quota = value;
    }
    for (flag, field) in [
        (args.max_value_bytes, &mut config.limits.value_bytes),
        (args.max_attributes, &mut config.limits.attributes),
        (
            args.max_attribute_value_bytes,
            &mut config.limits.attribute_value_bytes,
        ),
        (args.max_message_bytes, &mut config.limits.message_bytes),
    ] {
        if let Some(value) = flag {
            *field = value;
        }
    }
    if let Some(value) = args.max_records_per_peer {
        config.max_records_per_peer = value;
    }
    if let Some(value) = args.max_record_bytes_per_peer {
        config.max_record_bytes_per_peer = value;
    }
    if let Some(value) = args.send_rate {
        config.send_rate_per_second = value;
    }
    if let Some(value) = args.send_burst {
        config.send_burst = value;
    }
    if let Some(value) = args.request_rate {
        config.request_rate_per_second = value;
    }
    if let Some(value) = args.request_burst {
        config.request_burst = value;
    }
    if let Some(value) = args.max_sessions_per_ip {
        config.max_sessions_per_ip = value;
    }
    if let Some(value) = args.tls_handshake_timeout_ms {
        config.tls_handshake_timeout_ms = value;
    }
    if let Some(value) = args.max_pending_handshakes {
        config.max_pending_handshakes = value;
    }
    if let Some(value) = args.max_pending_handshakes_per_ip {
        config.max_pending_handshakes_per_ip = value;
    }
    if let Some(value) = args.max_streams_per_connection {
        config.max_streams_per_connection = value;
    }
    if let Some(value) = args.tls_reload_ms {
        config.tls_reload_interval_ms = value;
    }
    if args.no_stun {
        config.stun.enabled = false;
    }
    if let Some(value) = args.stun_rate_per_source {
        config.stun.rate_per_source = value;
        config.stun.burst_per_source = value.saturating_mul(2);
    }
    if let Some(value) = args.stun_max_answers {
        config.stun.max_answers_per_second = value;
    }
    if args.no_relay {
        config.relay.enabled = false;
    }
    if let Some(value) = args.relay_max_bytes {
        config.relay.max_bytes = value;
    }
    if let Some(value) = args.relay_max_seconds {
        config.relay.max_seconds = value;
    }
    if let Some(value) = args.relay_max_bytes_per_second {
        config.relay.max_bytes_per_second = value;
    }
    if let Some(value) = args.relay_max_allocations {
        config.relay.max_allocations = value;
    }
    if let Err(mut more) = config.validate() {
        problems.append(&mut more);
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=warn,stun_types=error")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the node");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.log_json);
    let config = match build_config(&args) {
        Ok(config) => config,
        Err(problems) => {
            eprintln!("superpeer: invalid configuration:");
            for problem in problems {
                eprintln!("  - {problem}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let node = match vesper_superpeer::spawn(config).await {
        Ok(node) => node,
        Err(error) => {
            eprintln!("superpeer: {error}");
            return ExitCode::FAILURE;
        }
    };
    let stopped = node.shutdown_token();
    tokio::select! {
        _ = wait_for_signal() => {}
        _ = stopped.cancelled() => tracing::error!("node stopped on its own"),
    }
    node.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
