//! The command line's definition (clap): global flags, the commands and their flags, and turning flag values
//! into the library's types.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use vesper_leafpeer::SearchTerm;

/// A Vesper leaf peer on the command line.
#[derive(Debug, Parser)]
#[command(name = "leafpeer", version)]
pub struct Cli {
    /// Leaf addresses (host:port) of super peers, comma-separated. Default: the config file's, else the three
    /// leaf ports of the local dev cluster (127.0.0.1:7400, :7410, :7420), so one stopped node is no obstacle.
    #[arg(long, global = true, env = "VESPER_SEEDS", value_delimiter = ',')]
    pub seeds: Option<Vec<String>>,
    /// Config file (TOML: seeds = [..], ca = "..", key = ".."). Default: ~/.config/vesper/leafpeer.toml when it
    /// exists. Flags and environment variables win over it.
    #[arg(long, global = true, env = "VESPER_LEAF_CONFIG")]
    pub config: Option<PathBuf>,
    /// Cluster CA certificate. Default: .vesper/dev/ca/ca.pem when it exists.
    #[arg(long, global = true, env = "VESPER_LEAF_CA")]
    pub ca: Option<PathBuf>,
    /// This leaf's key file (created on first use). Default: ~/.config/vesper/leaf.key.
    #[arg(long, global = true, env = "VESPER_LEAF_KEY")]
    pub key: Option<PathBuf>,
    /// Print JSON for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log more to stderr: -v shows what the library does (re-attaches, moves, accepted connections), -vv
    /// debug detail. Without it only warnings are shown. RUST_LOG (e.g. RUST_LOG=vesper_leafpeer=debug) wins.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Format of the log on stderr: text, or json (one object per line, for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How the log on stderr is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create this leaf's key (refuses to overwrite one).
    Keygen,
    /// Print this leaf's PeerId.
    Id,
    /// Set this leaf's presence: status, note and profile attributes.
    Status {
        /// online, away or busy.
        #[arg(default_value = "online")]
        status: String,
        /// Free-text note.
        #[arg(long, default_value = "")]
        note: String,
        /// Profile attribute name=value (repeat).
        #[arg(long = "attr", value_parser = parse_pair)]
        attributes: Vec<(String, String)>,
    },
    /// Show a peer's presence.
    Lookup { peer: String },
    /// Measure this leaf's NAT (STUN to two super peers at different IPs) and publish the result in its presence:
    /// NAT class (public, endpoint-independent, endpoint-dependent, unknown, udp-blocked), local and reflexive
    /// addresses.
    Nat,
    /// Find peers by profile attributes (AND of all terms).
    SearchPeers {
        /// name=value that must be equal (repeat).
        #[arg(long = "eq", value_parser = parse_pair)]
        equals: Vec<(String, String)>,
        /// name=prefix that the value must start with (repeat).
        #[arg(long = "prefix", value_parser = parse_pair)]
        prefixes: Vec<(String, String)>,
        /// Only peers attached now.
        #[arg(long)]
        online: bool,
    },
    /// Create or replace a record you own.
    Put {
        namespace: String,
        /// Record key.
        #[arg(value_name = "KEY")]
        record_key: String,
        /// Value as text.
        #[arg(long, conflicts_with = "value_file")]
        value: Option<String>,
        /// Value read from a file.
        #[arg(long)]
        value_file: Option<PathBuf>,
        /// Attribute name=value (repeat).
        #[arg(long = "attr", value_parser = parse_pair)]
        attributes: Vec<(String, String)>,
        /// Only if the record's version is this (0: only if it does not exist).
        #[arg(long)]
        expect_version: Option<u64>,
    },
    /// Read a record.
    Get {
        namespace: String,
        /// Record key.
        #[arg(value_name = "KEY")]
        record_key: String,
        /// Read from the attached super peer's replica without waiting (may lag).
        #[arg(long)]
        stale: bool,
    },
    /// List records of a namespace by key prefix.
    List {
        namespace: String,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Delete a record you own.
    Delete {
        namespace: String,
        /// Record key.
        #[arg(value_name = "KEY")]
        record_key: String,
        #[arg(long)]
        expect_version: Option<u64>,
    },
    /// Search records of a namespace by attributes (AND of all terms).
    Search {
        namespace: String,
        #[arg(long = "eq", value_parser = parse_pair)]
        equals: Vec<(String, String)>,
        #[arg(long = "prefix", value_parser = parse_pair)]
        prefixes: Vec<(String, String)>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Send a message to a peer (waits until it is delivered or queued in its mailbox).
    Send {
        /// The recipient's PeerId (vp1...; `leafpeer id` prints yours).
        peer: String,
        /// The message text (at most 64 KiB, or the super peer's --max-message-bytes).
        text: String,
        /// Message kind: 1-64 characters of [a-z0-9._-]; the recipient's handler for it takes the message.
        #[arg(long, default_value = "chat")]
        kind: String,
    },
    /// Create a conference you own.
    Create {
        /// Conference id: [a-z0-9._-], 1-64 characters.
        id: String,
        #[arg(long)]
        title: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Start in this many seconds from now.
        #[arg(long, default_value_t = 0)]
        starts_in: u64,
    },
    /// Invite peers to a conference you own (they get its context as a message).
    Invite {
        id: String,
        /// PeerIds to invite.
        #[arg(required = true)]
        peers: Vec<String>,
    },
    /// Decline an invitation.
    Decline { id: String },
    /// Show a conference's context and roster.
    Roster { id: String },
    /// Post one line to a conference's chat.
    Say { id: String, text: String },
    /// Chat with a peer: type a line and press Enter to send it; their messages and presence changes appear
    /// as they happen. End with Ctrl-D.
    Chat { peer: String },
    /// Join a conference's chat: type lines to post them; the roster, the start and everyone's lines appear in
    /// the conference's one order. End with Ctrl-D.
    Join { id: String },
    /// Stay online as a long-running leaf until interrupted (Ctrl-C or SIGTERM). With --offer-superpeer, also
    /// offer this node as a super peer: it answers the cluster's dial-back proofs on the role's ports, reports
    /// its capabilities, and prints the cluster's verdict (its eligibility gates) whenever it changes. When the
    /// cluster adopts it, it gets a super peer certificate for its own key and runs `superpeer` on the role's
    /// ports (output in ROLE_DIR/superpeer.log) for as long as `serve` runs.
    Serve {
        /// The explicit opt-in to serve as a super peer when the cluster elects this node.
        #[arg(long)]
        offer_superpeer: bool,
        /// The `superpeer` binary the role would run. Default: `superpeer` next to this binary.
        #[arg(long, requires = "offer_superpeer")]
        superpeer_bin: Option<PathBuf>,
        /// The role's state directory (its data, and this node's uptime history).
        #[arg(
            long,
            requires = "offer_superpeer",
            required_if_eq("offer_superpeer", "true")
        )]
        role_dir: Option<PathBuf>,
        /// IP the role would listen on.
        #[arg(long, default_value = "0.0.0.0", requires = "offer_superpeer")]
        role_ip: std::net::IpAddr,
        /// The role's Cluster, Leaf (TCP and UDP) and Admin ports, comma-separated; they must be free.
        #[arg(long, value_delimiter = ',', default_values_t = [7401, 7400, 7402], requires = "offer_superpeer")]
        role_ports: Vec<u16>,
        /// This node's zone label (placement spreads voters over zones).
        #[arg(long, requires = "offer_superpeer")]
        zone: Option<String>,
        /// This node is on a metered link (it is then never eligible).
        #[arg(long, requires = "offer_superpeer")]
        metered: bool,
        /// This node runs on battery (it is then never eligible).
        #[arg(long, requires = "offer_superpeer")]
        on_battery: bool,
        /// One more flag for the role's `superpeer` once the cluster adopts this node (repeat it; for example
        /// `--role-arg=--config --role-arg=/etc/vesper/role.toml`).
        #[arg(
            long = "role-arg",
            requires = "offer_superpeer",
            allow_hyphen_values = true
        )]
        role_args: Vec<String>,
    },
    /// Print messages as they arrive (also those that waited in the mailbox).
    Listen {
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Open an encrypted connection to a peer (direct through NATs, else relayed) and pipe stdin/stdout through
    /// it, like netcat. The path taken is reported on stderr.
    Connect {
        /// PeerId of the peer; it must run `leafpeer accept` allowing you.
        peer: String,
    },
    /// Accept a conference invitation (`accept ID`), or, without an ID, wait for one peer to connect and pipe
    /// stdin/stdout through the connection, like netcat (`accept --allow PEER`).
    Accept {
        /// Conference id of the invitation to accept.
        id: Option<String>,
        /// PeerId allowed to connect (repeat). Others are refused.
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// Accept any peer.
        #[arg(long, conflicts_with_all = ["allow", "id"])]
        allow_any: bool,
        /// Give up after this many seconds without a connection.
        #[arg(long)]
        timeout: Option<u64>,
    },
}

/// A `name=value` flag value.
fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .ok_or_else(|| format!("{text:?} is not name=value"))
}

/// The search terms of `--eq` and `--prefix` pairs (equalities first).
pub fn terms(equals: &[(String, String)], prefixes: &[(String, String)]) -> Vec<SearchTerm> {
    equals
        .iter()
        .cloned()
        .map(|(name, value)| SearchTerm::Equals(name, value))
        .chain(
            prefixes
                .iter()
                .cloned()
                .map(|(name, value)| SearchTerm::Prefix(name, value)),
        )
        .collect()
}
