//! Super peer configuration: a plain struct with defaults and `validate()`. The command line layers it as
//! defaults -> TOML file -> flags and their `VESPER_*` variables (see `cli.rs`); tests build it directly or
//! through `cli::config_from_args`.
//!
//! Durations are written with their unit (`"150ms"`, `"10s"`, `"7days"`; humantime syntax) in the TOML and on
//! flags. docs/CONFIG.md lists every key; a test in `cli.rs` checks that list, its defaults and its flags against
//! this struct and the flag definitions, so the page cannot drift from the code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tls::TlsPaths;

/// How a node enters a cluster the first time it starts with an empty data directory. A node whose data
/// directory already holds a node id resumes, whatever this says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartMode {
    /// Wait to be added by an operator (`vesperctl add-standby`).
    #[default]
    Idle,
    /// Create a new cluster with this node as its first voter.
    Bootstrap,
    /// Join the cluster of the members at these Cluster addresses (comma-separated, tried in turn until one
    /// answers), as a standby. The node's own address may be in the list (every pod of a StatefulSet gets the
    /// same list); it is skipped. Until it has joined, `vesperctl init` can make it bootstrap instead.
    Join(String),
}

impl StartMode {
    /// The join list, without blanks.
    pub fn seeds(&self) -> Vec<String> {
        match self {
            StartMode::Join(list) => split_seeds(list),
            _ => Vec::new(),
        }
    }
}

/// The addresses of a comma-separated join list.
pub fn split_seeds(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|seed| !seed.is_empty())
        .map(str::to_string)
        .collect()
}

/// Longest cluster name.
pub const MAX_CLUSTER_NAME: usize = 128;

/// Whether `name` can be a cluster name: 1 to [`MAX_CLUSTER_NAME`] ASCII letters, digits, `-`, `_` and `.`.
pub fn valid_cluster_name(name: &str) -> bool {
    (1..=MAX_CLUSTER_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

/// Raft timing and log compaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    /// Leader heartbeat interval. Default 150 ms.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Lower bound of the election timeout. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub election_timeout_min: Duration,
    /// Upper bound of the election timeout. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many log entries since the last one. Default 100000 (as etcd).
    pub snapshot_after_logs: u64,
    /// Log entries kept behind a snapshot, so slightly lagging members catch up from the log. Default 5000.
    pub logs_kept_after_snapshot: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(150),
            election_timeout_min: Duration::from_secs(1),
            election_timeout_max: Duration::from_secs(2),
            snapshot_after_logs: 100_000,
            logs_kept_after_snapshot: 5000,
        }
    }
}

/// Everything a super peer needs to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Data directory: RocksDB, the node key and the node id. Default `./vesper-data`.
    pub data_dir: PathBuf,
    /// Where the Leaf service listens. Default `127.0.0.1:7400`. Port 0 picks a free port.
    pub leaf_listen: SocketAddr,
    /// Where the Cluster service listens. Default `127.0.0.1:7401`.
    pub cluster_listen: SocketAddr,
    /// Where the Admin service listens. Default `127.0.0.1:7402`.
    pub admin_listen: SocketAddr,
    /// Where the ops HTTP port listens (plaintext: `/livez`, `/readyz`, `/metrics`). Default `127.0.0.1:7403`:
    /// loopback, since it asks for no certificate.
    pub ops_listen: SocketAddr,
    /// `/readyz` answers ready only when this node has applied the log to within this many entries of the
    /// cluster's commit index. Default 1000.
    pub ready_max_lag: u64,
    /// Host name or IP other nodes and leaves use to reach this node. Default: the listen IP (required when that
    /// is unspecified, such as 0.0.0.0).
    pub advertise_host: Option<String>,
    /// TLS files (required).
    pub tls: Option<TlsPaths>,
    /// How to enter a cluster on first start.
    pub start: StartMode,
    /// The name of the cluster this node belongs to, when set: kept in the data directory at bootstrap or join,
    /// a data directory of another name is refused at start, and a member of another name refuses the join.
    pub cluster_name: Option<String>,
    /// Raft timing and compaction.
    pub raft: RaftConfig,
    /// Interval at which leaves should send keepalives. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A session that sends nothing for this long is closed. Default 15 s (3 keepalives).
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// After a session ends without a goodbye, the peer stays online this long so it can re-attach (to any super
    /// peer) without an offline flap. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub session_grace: Duration,
    /// The leader takes the peers of a super peer it has not heard from for this long offline. Default 15 s.
    #[serde(with = "humantime_serde")]
    pub host_expiry: Duration,
    /// Most messages waiting in one peer's mailbox. Default 1000.
    pub mailbox_quota: u32,
    /// Most records one peer may own in the metadata index. Default 10000.
    pub max_records_per_peer: u64,
    /// Most bytes (namespaces, keys, attributes and values) one peer's records may hold together. Default
    /// 64 MiB.
    pub max_record_bytes_per_peer: u64,
    /// Sizes of record values, attributes and message payloads (the `[limits]` table), each up to its protocol
    /// ceiling. The Leaf port's largest accepted gRPC message follows from them.
    pub limits: vesper_proto::validate::SizeLimits,
    /// How long a message waits in a mailbox before it is dropped. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub mailbox_ttl: Duration,
    /// Messages one session may send per second, sustained. Default 200.
    pub send_rate_per_second: u32,
    /// Messages one session may send in a burst above the sustained rate. Default 400.
    pub send_burst: u32,
    /// Calls (other than sends) one session may make per second, sustained. Default 2000.
    pub request_rate_per_second: u32,
    /// Calls one session may make in a burst above the sustained rate. Default 4000.
    pub request_burst: u32,
    /// Open session streams from one IP address at most (NAT gateways share addresses, so this is generous).
    /// Default 1024.
    pub max_sessions_per_ip: u32,
    /// Time a client gets to finish its TLS handshake, on every port. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// TLS handshakes in progress at once, per port; connections beyond it are closed at once. Default 1024.
    pub max_pending_handshakes: u32,
    /// TLS handshakes in progress at once from one IP address, per port. Default 64.
    pub max_pending_handshakes_per_ip: u32,
    /// Concurrent gRPC streams (calls) one connection to the Leaf port may have open; HTTP/2 refuses streams
    /// beyond it. Default 256.
    pub max_streams_per_connection: u32,
    /// Bytes of request metadata (header names and values, 32 bytes more each, as HTTP/2 counts them) a call to
    /// the Leaf port may carry; a call over it is refused with RESOURCE_EXHAUSTED, and the connection and its
    /// session go on. Default 8 KiB (gRPC implementations commonly allow 8 to 16 KiB).
    pub max_metadata_bytes: u32,
    /// The HTTP/2 limit on one request's header block on the Leaf port (SETTINGS_MAX_HEADER_LIST_SIZE). A block
    /// up to it is read and then judged by `max_metadata_bytes`; a block over it cannot be skipped (the HPACK
    /// state would be lost), so the connection is closed. Default 128 KiB.
    pub max_header_list_bytes: u32,
    /// How often the TLS files are checked for a new certificate (0s: only on SIGHUP). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub tls_reload_interval: Duration,
    /// On SIGTERM: how long the node may spend draining (not ready, refusing new sessions, handing over
    /// leadership, waiting for its leaves to move) before it stops; 0s skips the drain. The stop after it takes
    /// up to `node::SHUTDOWN_GRACE` more (docs/OPERATIONS.md). Default 20 s.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// The STUN port (UDP, same IP and port number as the Leaf service) and its limits.
    pub stun: crate::udp::stun::StunConfig,
    /// The relay on the STUN port and its caps.
    pub relay: crate::udp::RelayConfig,
    /// The placement controller's timers (the `[placement]` table).
    pub placement: crate::placement::settings::PlacementConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("vesper-data"),
            leaf_listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            cluster_listen: SocketAddr::from(([127, 0, 0, 1], 7401)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7402)),
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 7403)),
            ready_max_lag: 1000,
            advertise_host: None,
            tls: None,
            start: StartMode::Idle,
            cluster_name: None,
            raft: RaftConfig::default(),
            keepalive_interval: Duration::from_secs(5),
            session_ttl: Duration::from_secs(15),
            session_grace: Duration::from_secs(10),
            host_expiry: Duration::from_secs(15),
            mailbox_quota: 1000,
            max_records_per_peer: 10_000,
            max_record_bytes_per_peer: 64 << 20,
            limits: vesper_proto::validate::SizeLimits::DEFAULT,
            mailbox_ttl: Duration::from_secs(7 * 24 * 3600),
            send_rate_per_second: 200,
            send_burst: 400,
            max_sessions_per_ip: 1024,
            request_rate_per_second: 2000,
            request_burst: 4000,
            tls_handshake_timeout: Duration::from_secs(10),
            max_pending_handshakes: 1024,
            max_pending_handshakes_per_ip: 64,
            max_streams_per_connection: 256,
            max_metadata_bytes: 8 << 10,
            max_header_list_bytes: 128 << 10,
            tls_reload_interval: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(20),
            stun: crate::udp::stun::StunConfig::default(),
            relay: crate::udp::RelayConfig::default(),
            placement: crate::placement::settings::PlacementConfig::default(),
        }
    }
}

/// The longest drain a node may be given: an orchestrator waiting longer for one pod stalls a rolling restart.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

impl Config {
    /// Checks the whole configuration and reports every problem at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.tls.is_none() {
            problems.push(
                "tls is not configured: set --tls-ca, --tls-cert and --tls-key (make them with `vesperctl ca init` and `vesperctl cert issue`, or run scripts/up.sh for a dev cluster)"
                    .to_string(),
            );
        }
        if self.advertise_host.is_none()
            && [self.leaf_listen, self.cluster_listen, self.admin_listen]
                .iter()
                .any(|addr| addr.ip().is_unspecified())
        {
            problems.push(
                "a listen address is unspecified (0.0.0.0 or ::): set --advertise-host".to_string(),
            );
        }
        if self.drain_timeout > MAX_DRAIN_TIMEOUT {
            problems.push(format!(
                "drain_timeout must be at most {}",
                humantime::format_duration(MAX_DRAIN_TIMEOUT)
            ));
        }
        if self.tls_handshake_timeout.is_zero() {
            problems.push("tls_handshake_timeout must be above 0".into());
        }
        for (name, value) in [
            (
                "max_pending_handshakes",
                u64::from(self.max_pending_handshakes),
            ),
            (
                "max_pending_handshakes_per_ip",
                u64::from(self.max_pending_handshakes_per_ip),
            ),
            (
                "max_streams_per_connection",
                u64::from(self.max_streams_per_connection),
            ),
            ("max_metadata_bytes", u64::from(self.max_metadata_bytes)),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be above 0"));
            }
        }
        if self.max_header_list_bytes < self.max_metadata_bytes {
            problems.push(format!(
                "max_header_list_bytes ({}) must be at least max_metadata_bytes ({}): a header block the connection cannot read closes it",
                self.max_header_list_bytes, self.max_metadata_bytes
            ));
        }
        let raft = &self.raft;
        if raft.heartbeat_interval < Duration::from_millis(1) {
            problems.push("raft.heartbeat_interval must be at least 1ms".into());
        }
        if raft.election_timeout_min <= raft.heartbeat_interval {
            problems.push("raft.election_timeout_min must be above raft.heartbeat_interval".into());
        }
        if raft.election_timeout_max <= raft.election_timeout_min {
            problems
                .push("raft.election_timeout_max must be above raft.election_timeout_min".into());
        }
        if raft.snapshot_after_logs == 0 {
            problems.push("raft.snapshot_after_logs must be above 0".into());
        }
        if self.keepalive_interval < Duration::from_millis(100) {
            // The welcome carries it in whole milliseconds and the library pings at most every 100 ms.
            problems.push("keepalive_interval must be at least 100ms".into());
        }
        if self.keepalive_interval > Duration::from_secs(3600) {
            problems.push("keepalive_interval must be at most 1h".into());
        }
        if self.session_ttl <= self.keepalive_interval {
            problems.push("session_ttl must be above keepalive_interval".into());
        }
        if self.mailbox_ttl.is_zero() {
            problems.push("mailbox_ttl must be above 0".into());
        }
        if self.send_rate_per_second == 0 || self.send_burst == 0 {
            problems.push("send_rate_per_second and send_burst must be above 0".into());
        }
        if self.request_rate_per_second == 0 || self.request_burst == 0 {
            problems.push("request_rate_per_second and request_burst must be above 0".into());
        }
        if self.max_sessions_per_ip == 0 {
            problems.push("max_sessions_per_ip must be above 0".into());
        }
        problems.extend(self.limits.problems());
        problems.extend(self.stun.problems());
        problems.extend(self.relay.problems());
        problems.extend(self.placement.problems(self.raft.heartbeat_interval));
        if self.mailbox_quota == 0 {
            problems.push("mailbox_quota must be above 0".into());
        }
        if self.max_records_per_peer == 0 {
            problems.push("max_records_per_peer must be above 0".into());
        }
        if self.max_record_bytes_per_peer == 0 {
            problems.push("max_record_bytes_per_peer must be above 0".into());
        }
        if let StartMode::Join(list) = &self.start {
            let seeds = split_seeds(list);
            if seeds.is_empty() {
                problems
                    .push("the join list is empty: give host:port of at least one member".into());
            }
            for addr in seeds {
                if !addr.contains(':') {
                    problems.push(format!("join address {addr:?} must be host:port"));
                }
            }
        }
        if let Some(name) = &self.cluster_name {
            if !valid_cluster_name(name) {
                problems.push(format!(
                    "cluster_name {name:?} must be 1 to {MAX_CLUSTER_NAME} letters, digits, '-', '_' or '.'"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_lists_and_cluster_names_are_checked() {
        let with = |start: StartMode, name: Option<&str>| Config {
            start,
            cluster_name: name.map(str::to_string),
            tls: Some(TlsPaths {
                ca_cert: "a".into(),
                cert: "b".into(),
                key: "c".into(),
            }),
            ..Config::default()
        };
        assert_eq!(
            StartMode::Join(" sp-0:7401, ,sp-1:7401,".into()).seeds(),
            vec!["sp-0:7401".to_string(), "sp-1:7401".to_string()]
        );
        assert!(with(
            StartMode::Join("sp-0:7401,sp-1:7401".into()),
            Some("vesper.prod_1")
        )
        .validate()
        .is_ok());
        let problems = with(StartMode::Join("sp-0:7401,sp-1".into()), None)
            .validate()
            .unwrap_err();
        assert_eq!(
            problems,
            vec!["join address \"sp-1\" must be host:port".to_string()]
        );
        let problems = with(StartMode::Join(" , ".into()), None)
            .validate()
            .unwrap_err();
        assert!(problems[0].contains("join list is empty"), "{problems:?}");
        for bad in ["", "a b", "ä", &"x".repeat(MAX_CLUSTER_NAME + 1), "a/b"] {
            let problems = with(StartMode::Idle, Some(bad)).validate().unwrap_err();
            assert!(
                problems[0].starts_with("cluster_name"),
                "{bad:?}: {problems:?}"
            );
        }
        assert!(with(StartMode::Idle, Some(&"x".repeat(MAX_CLUSTER_NAME)))
            .validate()
            .is_ok());
    }

    #[test]
    fn default_config_only_lacks_tls() {
        let problems = Config::default().validate().unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("tls"));
    }

    #[test]
    fn all_problems_are_reported_together() {
        let config = Config {
            leaf_listen: "0.0.0.0:1".parse().unwrap(),
            raft: RaftConfig {
                election_timeout_max: Duration::from_millis(10),
                ..RaftConfig::default()
            },
            ..Config::default()
        };
        assert_eq!(config.validate().unwrap_err().len(), 3);
    }

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_keys() {
        let config: Config = toml::from_str(
            "data_dir = \"/var/lib/vesper\"\nstart = \"bootstrap\"\nsession_ttl = \"1m 30s\"\n[raft]\nsnapshot_after_logs = 50\nheartbeat_interval = \"50ms\"\n",
        )
        .unwrap();
        assert_eq!(config.session_ttl, Duration::from_secs(90));
        assert_eq!(config.raft.heartbeat_interval, Duration::from_millis(50));
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/vesper"));
        assert_eq!(config.start, StartMode::Bootstrap);
        assert_eq!(config.raft.snapshot_after_logs, 50);
        assert_eq!(config.raft.election_timeout_min, Duration::from_secs(1));
        let unitless = toml::from_str::<Config>("session_ttl = 15000").unwrap_err();
        assert!(unitless.to_string().contains("session_ttl"), "{unitless}");
        assert!(toml::from_str::<Config>("data_dri = \"x\"").is_err());
    }

    #[test]
    fn a_misspelt_key_is_refused_in_every_table() {
        // Each table of the file, valid as written, then with one key no table has.
        for table in [
            "[tls]\nca_cert = \"a\"\ncert = \"b\"\nkey = \"c\"",
            "[raft]",
            "[limits]",
            "[stun]",
            "[relay]",
            "[placement]",
            "[placement.candidates]",
        ] {
            toml::from_str::<Config>(table).unwrap_or_else(|error| panic!("{table}: {error}"));
            let misspelt = format!("{table}\nheartbeat_intervall = \"1s\"");
            let error = toml::from_str::<Config>(&misspelt).expect_err(&misspelt);
            assert!(
                error.to_string().contains("heartbeat_intervall"),
                "{table}: {error}"
            );
        }
    }

    #[test]
    fn join_mode_reads_from_toml() {
        let config: Config = toml::from_str("start = { join = \"sp-1:7401\" }").unwrap();
        assert_eq!(config.start, StartMode::Join("sp-1:7401".into()));
        let bad = Config {
            start: StartMode::Join("no-port".into()),
            ..Config::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .iter()
            .any(|p| p.contains("host:port")));
    }
}
