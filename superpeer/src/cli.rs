//! The `superpeer` command line: its flags, and how they are layered over the defaults and the TOML file.
//!
//! Layers, later ones winning: built-in defaults, the TOML file given with `--config`, then flags and their
//! `VESPER_*` environment variables (a flag wins over its variable; each flag names its variable in `--help`).
//! `figment` merges the layers, so a wrong value is reported with its key and the layer it came from; every
//! problem is reported at once. docs/CONFIG.md lists every key; the tests below hold it to this file.
//!
//! In the library (not only the binary) so that a super peer run inside another program, or a test, takes the
//! same flags: [`config_from_args`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use figment::providers::Serialized;
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Serialize;

use crate::config::{Config, StartMode};
use crate::tls::TlsPaths;

/// Run a Vesper super peer.
///
/// A new cluster starts with one node run with --bootstrap; more nodes join it with --join ADDR (any member's
/// cluster address) and become standbys, which an operator promotes with `vesperctl promote`. A node started
/// with neither waits until `vesperctl add-standby` adds it. A node whose data directory already belongs to a
/// cluster resumes, whatever these flags say.
///
/// Durations take a unit: 150ms, 10s, 5m, 7days.
#[derive(Debug, Parser)]
#[command(name = "superpeer", version)]
pub struct Args {
    /// TOML configuration file (keys as in docs/CONFIG.md).
    #[arg(long, env = "VESPER_CONFIG")]
    pub config: Option<PathBuf>,
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
    /// Ops HTTP port (plaintext, read-only: status page at /, /livez, /readyz, /metrics). Default: 127.0.0.1:7403. Expose it
    /// beyond loopback only to a trusted network (a Kubernetes pod IP behind a NetworkPolicy).
    #[arg(long, env = "VESPER_OPS_LISTEN")]
    ops_listen: Option<SocketAddr>,
    /// /readyz is ready only within this many log entries of the cluster's commit index. Default: 1000.
    #[arg(long, env = "VESPER_READY_MAX_LAG")]
    ready_max_lag: Option<u64>,
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
    /// Join the cluster of the members at these cluster addresses (comma-separated, tried in turn; this node's
    /// own address is skipped), as a standby (only on first start). Until it has joined, `vesperctl init` can
    /// make it bootstrap a new cluster instead.
    #[arg(long, env = "VESPER_JOIN", value_name = "HOST:PORT[,HOST:PORT...]")]
    join: Option<String>,
    /// The cluster's name: kept in the data directory; a data directory of another cluster is refused at start,
    /// and members of another name refuse this node's join.
    #[arg(long, env = "VESPER_CLUSTER_NAME")]
    cluster_name: Option<String>,
    /// Build a Raft snapshot after this many log entries. Default: 100000.
    #[arg(long, env = "VESPER_SNAPSHOT_AFTER_LOGS")]
    snapshot_after_logs: Option<u64>,
    /// Log entries kept behind a snapshot. Default: 5000.
    #[arg(long, env = "VESPER_LOGS_KEPT_AFTER_SNAPSHOT")]
    logs_kept_after_snapshot: Option<u64>,
    /// Interval leaves are told to ping at. Default: 5s.
    #[arg(long, env = "VESPER_KEEPALIVE_INTERVAL", value_parser = humantime::parse_duration)]
    keepalive_interval: Option<Duration>,
    /// How long a peer stays online after its session broke without a goodbye. Default: 10s.
    #[arg(long, env = "VESPER_SESSION_GRACE", value_parser = humantime::parse_duration)]
    session_grace: Option<Duration>,
    /// Silence after which a session is closed. Default: 15s.
    #[arg(long, env = "VESPER_SESSION_TTL", value_parser = humantime::parse_duration)]
    session_ttl: Option<Duration>,
    /// Silence after which the leader takes a super peer's leaves offline. Default: 15s.
    #[arg(long, env = "VESPER_HOST_EXPIRY", value_parser = humantime::parse_duration)]
    host_expiry: Option<Duration>,
    /// Most messages waiting in one peer's mailbox. Default: 1000.
    #[arg(long, env = "VESPER_MAILBOX_QUOTA")]
    mailbox_quota: Option<u32>,
    /// How long a message waits in a mailbox before it is dropped. Default: 7days.
    #[arg(long, env = "VESPER_MAILBOX_TTL", value_parser = humantime::parse_duration)]
    mailbox_ttl: Option<Duration>,
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
    /// Time a client gets to finish its TLS handshake. Default: 10s.
    #[arg(long, env = "VESPER_TLS_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration)]
    tls_handshake_timeout: Option<Duration>,
    /// TLS handshakes in progress at once per port (more connections are closed at once). Default: 1024.
    #[arg(long, env = "VESPER_MAX_PENDING_HANDSHAKES")]
    max_pending_handshakes: Option<u32>,
    /// TLS handshakes in progress at once from one IP address, per port. Default: 64.
    #[arg(long, env = "VESPER_MAX_PENDING_HANDSHAKES_PER_IP")]
    max_pending_handshakes_per_ip: Option<u32>,
    /// Concurrent calls one connection to the Leaf port may have open. Default: 256.
    #[arg(long, env = "VESPER_MAX_STREAMS_PER_CONNECTION")]
    max_streams_per_connection: Option<u32>,
    /// Bytes of request metadata one call to the Leaf port may carry; more is refused with RESOURCE_EXHAUSTED.
    /// Default: 8192.
    #[arg(long, env = "VESPER_MAX_METADATA_BYTES")]
    max_metadata_bytes: Option<u32>,
    /// HTTP/2 limit on one request's header block on the Leaf port; a larger block closes the connection.
    /// Default: 131072.
    #[arg(long, env = "VESPER_MAX_HEADER_LIST_BYTES")]
    max_header_list_bytes: Option<u32>,
    /// How often the TLS files are checked for a rotated certificate (0s: only on SIGHUP). Default: 10s.
    #[arg(long, env = "VESPER_TLS_RELOAD_INTERVAL", value_parser = humantime::parse_duration)]
    tls_reload_interval: Option<Duration>,
    /// On SIGTERM, the longest time spent draining (not ready, no new sessions, leadership handed over, leaves
    /// moved) before the node stops; 0s skips it. At most 10m. Default: 20s.
    #[arg(long, env = "VESPER_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
    /// Do not serve STUN (leaves then cannot learn their public address from this node).
    #[arg(long, env = "VESPER_NO_STUN")]
    no_stun: bool,
    /// STUN answers per second to one source IP (the burst becomes twice this). Default: 20.
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
    /// How long one relay allocation lives (whole seconds). Default: 10m.
    #[arg(long, env = "VESPER_RELAY_MAX_LIFETIME", value_parser = humantime::parse_duration)]
    relay_max_lifetime: Option<Duration>,
    /// Bytes per second one relay allocation may carry in each direction (more is dropped). Default: 8388608.
    #[arg(long, env = "VESPER_RELAY_MAX_BYTES_PER_SECOND")]
    relay_max_bytes_per_second: Option<u64>,
    /// Relay allocations at once on this node. Default: 1000.
    #[arg(long, env = "VESPER_RELAY_MAX_ALLOCATIONS")]
    relay_max_allocations: Option<usize>,
    /// This node's zone label (placement keeps at most ceil(voters / zones) voters in one zone).
    #[arg(long, env = "VESPER_ZONE")]
    zone: Option<String>,
    /// Do not run the placement controller when this node leads (membership then changes only by hand).
    #[arg(long, env = "VESPER_NO_PLACEMENT")]
    no_placement: bool,
    /// How often the leader samples member health for placement. Default: 2s.
    #[arg(long, env = "VESPER_PLACEMENT_UPDATE_INTERVAL", value_parser = humantime::parse_duration)]
    placement_update_interval: Option<Duration>,
    /// How often the placement controller decides (one action at most per round). Default: 10s.
    #[arg(long, env = "VESPER_PLACEMENT_RECONCILE_INTERVAL", value_parser = humantime::parse_duration)]
    placement_reconcile_interval: Option<Duration>,
    /// How long a member must be healthy without a break to be stable (promotable). Default: 30s.
    #[arg(long, env = "VESPER_PLACEMENT_STABILIZATION", value_parser = humantime::parse_duration)]
    placement_stabilization: Option<Duration>,
    /// A voter unhealthy this long is dead and replaced by a ready standby. Default: 5m.
    #[arg(long, env = "VESPER_PLACEMENT_DEAD_VOTER_AFTER", value_parser = humantime::parse_duration)]
    placement_dead_voter_after: Option<Duration>,
    /// A standby unhealthy this long is dead and retired (removed, its id tombstoned). Default: 30m.
    #[arg(long, env = "VESPER_PLACEMENT_DEAD_STANDBY_AFTER", value_parser = humantime::parse_duration)]
    placement_dead_standby_after: Option<Duration>,
    /// An intermediate issuer certificate (`vesperctl ca issuer`) this node signs adopted nodes' certificates
    /// with; needs --issuer-key. Only for super peers the operator runs ("core" nodes).
    #[arg(long, env = "VESPER_ISSUER_CERT")]
    issuer_cert: Option<PathBuf>,
    /// The private key of --issuer-cert.
    #[arg(long, env = "VESPER_ISSUER_KEY")]
    issuer_key: Option<PathBuf>,
    /// An adoption not finished within this is given up (its certificate revoked). Default: 5m.
    #[arg(long, env = "VESPER_PLACEMENT_ADOPTION_TIMEOUT", value_parser = humantime::parse_duration)]
    placement_adoption_timeout: Option<Duration>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "VESPER_LOG_JSON")]
    pub log_json: bool,
    /// Print this build's software version, store format and protocol version on one line and exit (what a
    /// node that offers to serve as a super peer reports).
    #[arg(long)]
    pub build_info: bool,
    /// Check the configuration (file, variables and flags, layered as at start) and exit: 0 and the effective
    /// configuration as TOML on stdout when it is valid, 64 and every problem when not. Starts nothing, opens no
    /// port and reads no TLS file (their paths are checked for presence in the configuration only).
    #[arg(long)]
    pub check_config: bool,
    /// Shut down when standard input closes: a process that starts this node as its child (the leaf
    /// library, once its node is adopted) keeps a pipe open, so the node ends with it even when it is killed.
    #[arg(long)]
    pub exit_with_stdin: bool,
}

/// A provider under the name errors give its values ("config file x.toml", "flags").
struct Named<P> {
    name: String,
    inner: P,
}

impl<P: Provider> Provider for Named<P> {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.inner.data()
    }
}

/// One layer of configuration values, each at its key path (`raft.snapshot_after_logs`).
struct Layer(Figment);

impl Layer {
    /// Sets `key` when a value was given.
    fn set<T: Serialize>(self, key: &str, value: Option<T>) -> Self {
        match value {
            Some(value) => Layer(self.0.merge(Named {
                name: "flags and their variables".into(),
                inner: Serialized::default(key, value),
            })),
            None => self,
        }
    }

    /// Sets `key` to a duration, in the unit syntax the TOML uses.
    fn duration(self, key: &str, value: Option<Duration>) -> Self {
        self.set(
            key,
            value.map(|value| humantime::format_duration(value).to_string()),
        )
    }
}

/// The flags that were given (or their variables), as values at their configuration keys: the top layer.
fn flag_layer(args: &Args, base: Figment) -> Result<Figment, String> {
    let tls = match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (Some(ca_cert), Some(cert), Some(key)) => Some(TlsPaths {
            ca_cert: ca_cert.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, None, None) => None,
        _ => return Err("--tls-ca, --tls-cert and --tls-key must be given together".into()),
    };
    let start = match (&args.join, args.bootstrap) {
        (Some(seed), _) => Some(StartMode::Join(seed.clone())),
        (None, true) => Some(StartMode::Bootstrap),
        (None, false) => None,
    };
    let layer = Layer(base)
        .set("data_dir", args.data_dir.as_ref())
        .set("leaf_listen", args.leaf_listen)
        .set("cluster_listen", args.cluster_listen)
        .set("admin_listen", args.admin_listen)
        .set("ops_listen", args.ops_listen)
        .set("ready_max_lag", args.ready_max_lag)
        .set("advertise_host", args.advertise_host.as_ref())
        .set("tls", tls)
        .set("start", start)
        .set("cluster_name", args.cluster_name.as_ref())
        .set("raft.snapshot_after_logs", args.snapshot_after_logs)
        .set(
            "raft.logs_kept_after_snapshot",
            args.logs_kept_after_snapshot,
        )
        .duration("keepalive_interval", args.keepalive_interval)
        .duration("session_grace", args.session_grace)
        .duration("session_ttl", args.session_ttl)
        .duration("host_expiry", args.host_expiry)
        .set("mailbox_quota", args.mailbox_quota)
        .duration("mailbox_ttl", args.mailbox_ttl)
        .set("max_records_per_peer", args.max_records_per_peer)
        .set("max_record_bytes_per_peer", args.max_record_bytes_per_peer)
        .set("limits.value_bytes", args.max_value_bytes)
        .set("limits.attributes", args.max_attributes)
        .set(
            "limits.attribute_value_bytes",
            args.max_attribute_value_bytes,
        )
        .set("limits.message_bytes", args.max_message_bytes)
        .set("send_rate_per_second", args.send_rate)
        .set("send_burst", args.send_burst)
        .set("request_rate_per_second", args.request_rate)
        .set("request_burst", args.request_burst)
        .set("max_sessions_per_ip", args.max_sessions_per_ip)
        .duration("tls_handshake_timeout", args.tls_handshake_timeout)
        .set("max_pending_handshakes", args.max_pending_handshakes)
        .set(
            "max_pending_handshakes_per_ip",
            args.max_pending_handshakes_per_ip,
        )
        .set(
            "max_streams_per_connection",
            args.max_streams_per_connection,
        )
        .set("max_metadata_bytes", args.max_metadata_bytes)
        .set("max_header_list_bytes", args.max_header_list_bytes)
        .duration("tls_reload_interval", args.tls_reload_interval)
        .duration("drain_timeout", args.drain_timeout)
        .set("stun.enabled", args.no_stun.then_some(false))
        .set("stun.rate_per_source", args.stun_rate_per_source)
        .set(
            "stun.burst_per_source",
            args.stun_rate_per_source.map(|rate| rate.saturating_mul(2)),
        )
        .set("stun.max_answers_per_second", args.stun_max_answers)
        .set("relay.enabled", args.no_relay.then_some(false))
        .set("relay.max_bytes", args.relay_max_bytes)
        .duration("relay.max_lifetime", args.relay_max_lifetime)
        .set(
            "relay.max_bytes_per_second",
            args.relay_max_bytes_per_second,
        )
        .set("relay.max_allocations", args.relay_max_allocations)
        .set(
            "placement.zone",
            args.zone.as_ref().filter(|zone| !zone.is_empty()),
        )
        .set("placement.enabled", args.no_placement.then_some(false))
        .duration("placement.update_interval", args.placement_update_interval)
        .duration(
            "placement.reconcile_interval",
            args.placement_reconcile_interval,
        )
        .duration("placement.stabilization", args.placement_stabilization)
        .duration(
            "placement.dead_voter_after",
            args.placement_dead_voter_after,
        )
        .duration(
            "placement.dead_standby_after",
            args.placement_dead_standby_after,
        )
        .set("placement.issuer_cert", args.issuer_cert.as_ref())
        .set("placement.issuer_key", args.issuer_key.as_ref())
        .duration(
            "placement.adoption_timeout",
            args.placement_adoption_timeout,
        );
    Ok(layer.0)
}

/// The TOML file's table, or what is wrong with it.
fn file_layer(path: &std::path::Path) -> Result<toml::Table, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read config file {}: {error}", path.display()))?;
    toml::from_str::<toml::Table>(&text)
        .map_err(|error| format!("config file {}: {error}", path.display()))
}

/// Defaults, then the file, then the flags; every problem found, at once.
pub fn build_config(args: &Args) -> Result<Config, Vec<String>> {
    let config = layered(args)?;
    config.validate()?;
    Ok(config)
}

/// The layers merged into a configuration, not yet validated.
fn layered(args: &Args) -> Result<Config, Vec<String>> {
    let mut problems = Vec::new();
    let mut layers = Figment::from(Named {
        name: "the built-in defaults".into(),
        inner: Serialized::defaults(Config::default()),
    });
    if let Some(path) = &args.config {
        match file_layer(path) {
            Ok(table) => {
                layers = layers.merge(Named {
                    name: format!("config file {}", path.display()),
                    inner: Serialized::defaults(table),
                })
            }
            Err(problem) => problems.push(problem),
        }
    }
    let layers = match flag_layer(args, layers) {
        Ok(layers) => layers,
        Err(problem) => {
            problems.push(problem);
            return Err(problems);
        }
    };
    match layers.extract::<Config>() {
        Ok(config) if problems.is_empty() => return Ok(config),
        Ok(_) => {}
        Err(errors) => problems.extend(errors.into_iter().map(describe)),
    }
    Err(problems)
}

/// A layering error as a line naming the key and where its value came from.
fn describe(error: figment::Error) -> String {
    let key = error.path.join(".");
    let hint = if error.kind.to_string().contains("expected a duration") {
        " with a unit, such as \"10s\" or \"150ms\""
    } else {
        ""
    };
    let source = error
        .metadata
        .as_ref()
        .map(|metadata| metadata.name.to_string());
    match (key.is_empty(), source) {
        (false, Some(source)) => format!("{source}: {key}: {}{hint}", error.kind),
        (false, None) => format!("{key}: {}{hint}", error.kind),
        (true, Some(source)) => format!("{source}: {}{hint}", error.kind),
        (true, None) => format!("{}{hint}", error.kind),
    }
}

/// A configuration from a super peer command line (`argv[0]` first), as the binary builds it.
pub fn config_from_args<I, T>(argv: I) -> Result<Config, Vec<String>>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = Args::try_parse_from(argv).map_err(|error| vec![error.to_string()])?;
    build_config(&args)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use clap::CommandFactory;

    use super::*;

    const CONFIG_MD: &str = include_str!("../../docs/CONFIG.md");

    /// One row of a table in docs/CONFIG.md.
    #[derive(Debug)]
    struct Row {
        keys: Vec<String>,
        flags: Vec<String>,
        variables: Vec<String>,
        defaults: Vec<String>,
    }

    /// The text between each pair of backticks.
    fn backticked(cell: &str) -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    fn rows() -> Vec<Row> {
        CONFIG_MD
            .lines()
            .filter(|line| line.starts_with("| `"))
            .map(|line| {
                let cells: Vec<&str> = line.split('|').skip(1).collect();
                assert!(cells.len() >= 4, "a row of four columns: {line}");
                let named = backticked(cells[1]);
                Row {
                    keys: backticked(cells[0]),
                    flags: named
                        .iter()
                        .filter(|text| text.starts_with("--"))
                        .map(|text| text.split(' ').next().unwrap().to_string())
                        .collect(),
                    variables: named
                        .iter()
                        .filter(|text| text.starts_with("VESPER_"))
                        .cloned()
                        .collect(),
                    defaults: backticked(cells[2]),
                }
            })
            .collect()
    }

    /// Every leaf key of `config` (`raft.heartbeat_interval`) with its TOML text.
    fn leaves(config: &Config) -> BTreeMap<String, String> {
        fn walk(table: &toml::Table, prefix: &str, out: &mut BTreeMap<String, String>) {
            for (key, value) in table {
                let path = format!("{prefix}{key}");
                match value {
                    toml::Value::Table(inner) => walk(inner, &format!("{path}."), out),
                    other => {
                        out.insert(path, other.to_string());
                    }
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&toml::Table::try_from(config).unwrap(), "", &mut out);
        out
    }

    /// A configuration with the keys that have no default set too.
    fn complete() -> Config {
        Config {
            tls: Some(TlsPaths {
                ca_cert: "a".into(),
                cert: "b".into(),
                key: "c".into(),
            }),
            advertise_host: Some("sp-0".into()),
            cluster_name: Some("vesper-a".into()),
            placement: crate::placement::settings::PlacementConfig {
                zone: Some("zone-a".into()),
                issuer_cert: Some("issuer.pem".into()),
                issuer_key: Some("issuer.key".into()),
                ..Default::default()
            },
            ..Config::default()
        }
    }

    /// The flags that set configuration keys, with their variables.
    fn flags() -> BTreeMap<String, (Option<String>, bool)> {
        Args::command()
            .get_arguments()
            .filter_map(|arg| Some((arg.get_long()?, arg)))
            .filter(|(long, _)| {
                ![
                    "config",
                    "log-json",
                    "build-info",
                    "check-config",
                    "exit-with-stdin",
                    "help",
                    "version",
                ]
                .contains(long)
            })
            .map(|(long, arg)| {
                let variable = arg.get_env().map(|env| env.to_string_lossy().into_owned());
                (
                    format!("--{long}"),
                    (variable, arg.get_action().takes_values()),
                )
            })
            .collect()
    }

    #[test]
    fn config_md_matches_the_code() {
        let rows = rows();
        let documented: BTreeSet<String> = rows.iter().flat_map(|row| row.keys.clone()).collect();
        let in_code: BTreeSet<String> = leaves(&complete()).into_keys().collect();
        assert_eq!(
            documented.difference(&in_code).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "docs/CONFIG.md lists keys the code does not have"
        );
        assert_eq!(
            in_code.difference(&documented).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "keys missing from docs/CONFIG.md"
        );
        let defaults = leaves(&Config::default());
        for row in &rows {
            let expected: Vec<String> = row
                .keys
                .iter()
                .filter_map(|key| defaults.get(key).cloned())
                .collect();
            assert_eq!(row.defaults, expected, "defaults of {:?}", row.keys);
        }
        let flags = flags();
        let documented: BTreeSet<&String> = rows.iter().flat_map(|row| &row.flags).collect();
        assert_eq!(
            documented,
            flags.keys().collect::<BTreeSet<_>>(),
            "flags in docs/CONFIG.md vs the superpeer's flags"
        );
        for row in &rows {
            let expected: Vec<String> = row
                .flags
                .iter()
                .map(|flag| flags[flag].0.clone().expect("every flag has a variable"))
                .collect();
            assert_eq!(row.variables, expected, "variables of {:?}", row.flags);
        }
    }

    /// A value for `flag` that differs from the key's current `value` (its TOML text, if it has one).
    fn other_value(flag: &str, value: Option<&String>) -> String {
        match value.map(String::as_str) {
            _ if flag == "--join" => "sp-9:7401".into(),
            Some(text) if text.parse::<u64>().is_ok() => {
                (text.parse::<u64>().unwrap() + 1).to_string()
            }
            Some(text) if text.trim_matches('"').parse::<SocketAddr>().is_ok() => {
                "127.0.0.1:9".into()
            }
            Some(text) if humantime::parse_duration(text.trim_matches('"')).is_ok() => "7s".into(),
            _ => "elsewhere".into(),
        }
    }

    #[test]
    fn each_flag_sets_the_key_of_its_row() {
        let flags = flags();
        let base = [("--tls-ca", "a"), ("--tls-cert", "b"), ("--tls-key", "c")];
        let parse = |given: &BTreeMap<String, Option<String>>| {
            let mut argv = vec!["superpeer".to_string()];
            for (flag, value) in given {
                argv.push(flag.clone());
                argv.extend(value.clone());
            }
            let args =
                Args::try_parse_from(&argv).unwrap_or_else(|error| panic!("{argv:?}: {error}"));
            leaves(&layered(&args).unwrap_or_else(|problems| panic!("{argv:?}: {problems:?}")))
        };
        let given: BTreeMap<String, Option<String>> = base
            .iter()
            .map(|(flag, value)| (flag.to_string(), Some(value.to_string())))
            .collect();
        let reference = parse(&given);
        for row in rows().iter().filter(|row| !row.flags.is_empty()) {
            for (index, flag) in row.flags.iter().enumerate() {
                // Flags pair with keys by position when there are as many of each; else any flag sets any key.
                let keys = if row.flags.len() == row.keys.len() {
                    &row.keys[index..=index]
                } else {
                    &row.keys[..]
                };
                let mut given = given.clone();
                let value = flags[flag]
                    .1
                    .then(|| other_value(flag, reference.get(&keys[0])));
                given.insert(flag.clone(), value);
                let got = parse(&given);
                assert!(
                    keys.iter().any(|key| got.get(key) != reference.get(key)),
                    "{flag} did not change {keys:?}"
                );
                let changed: BTreeSet<&String> = got
                    .keys()
                    .chain(reference.keys())
                    .filter(|key| got.get(*key) != reference.get(*key))
                    // A key whose value becomes a table (`start = { join = .. }`) is still that key.
                    .filter(|key| {
                        !keys
                            .iter()
                            .any(|own| *key == own || key.starts_with(&format!("{own}.")))
                    })
                    .filter(|key| {
                        !(flag == "--stun-rate-per-source" && *key == "stun.burst_per_source")
                    })
                    .collect();
                assert!(changed.is_empty(), "{flag} also changed {changed:?}");
            }
        }
    }

    #[test]
    fn the_examples_in_config_md_load() {
        let dir = tempfile::tempdir().unwrap();
        let examples: Vec<&str> = CONFIG_MD
            .split("```toml\n")
            .skip(1)
            .map(|rest| rest.split("```").next().unwrap())
            .collect();
        assert!(!examples.is_empty());
        for (index, example) in examples.iter().enumerate() {
            let path = dir.path().join(format!("example-{index}.toml"));
            std::fs::write(&path, example).unwrap();
            let args =
                Args::try_parse_from(["superpeer", "--config", path.to_str().unwrap()]).unwrap();
            let config =
                build_config(&args).unwrap_or_else(|problems| panic!("{example}\n{problems:?}"));
            assert_ne!(config, Config::default());
        }
    }

    #[test]
    fn layering_errors_name_the_key_and_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "session_ttl = 15000\n[raft]\nheartbeat_interval = \"soon\"\n",
        )
        .unwrap();
        let args = Args::try_parse_from(["superpeer", "--config", path.to_str().unwrap()]).unwrap();
        let problems = build_config(&args).unwrap_err();
        let file = format!("config file {}", path.display());
        assert!(
            problems.iter().any(|problem| problem.starts_with(&file)
                && problem.contains("expected a duration with a unit")),
            "{problems:?}"
        );
        // A flag wins over the file, and a later problem (no TLS) is still reported with the others.
        std::fs::write(&path, "session_ttl = \"1s\"\nmailbox_quota = 5\n").unwrap();
        let args = Args::try_parse_from([
            "superpeer",
            "--config",
            path.to_str().unwrap(),
            "--mailbox-quota",
            "9",
            "--keepalive-interval",
            "2s",
        ])
        .unwrap();
        let config = layered(&args).unwrap();
        assert_eq!(
            (config.mailbox_quota, config.session_ttl),
            (9, Duration::from_secs(1))
        );
        let problems = build_config(&args).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("tls is not configured") && problems[1].contains("session_ttl")
        );
        let partial = Args::try_parse_from(["superpeer", "--tls-ca", "a"]).unwrap();
        assert!(build_config(&partial).unwrap_err()[0].contains("must be given together"));
    }
}
