//! `leafpeer`: a leaf peer on the command line: identity, presence, records, messages.
//!
//! Every command attaches to a super peer (seeds from `--seeds` / `VESPER_SEEDS`, default the local dev cluster),
//! does its work and detaches. `--json` prints one JSON document per result (one line per message for
//! `listen`), for scripts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use vesper_leafpeer::{
    ConferenceContext, Consistency, InvitationState, Keypair, Leaf, LeafConfig, LeafError,
    Presence, PresenceStatus, Record, SearchTerm, SendOutcome,
};

/// Exit code for bad usage (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// The dev cluster's CA (made by `scripts/up.sh`), used when --ca is not given and it exists.
const DEV_CA: &str = ".vesper/dev/ca/ca.pem";

/// Leaf ports of the local dev cluster (`vesperctl dev up`, `scripts/up.sh`): node i at 7400 + 10(i - 1).
const DEV_SEEDS: [&str; 3] = ["127.0.0.1:7400", "127.0.0.1:7410", "127.0.0.1:7420"];

/// A Vesper leaf peer on the command line.
#[derive(Debug, Parser)]
#[command(name = "leafpeer", version)]
struct Cli {
    /// Leaf addresses (host:port) of super peers, comma-separated. Default: the config file's, else the three
    /// leaf ports of the local dev cluster (127.0.0.1:7400, :7410, :7420), so one stopped node is no obstacle.
    #[arg(long, global = true, env = "VESPER_SEEDS", value_delimiter = ',')]
    seeds: Option<Vec<String>>,
    /// Config file (TOML: seeds = [..], ca = "..", key = ".."). Default: ~/.config/vesper/leafpeer.toml when it
    /// exists. Flags and environment variables win over it.
    #[arg(long, global = true, env = "VESPER_LEAF_CONFIG")]
    config: Option<PathBuf>,
    /// Cluster CA certificate. Default: .vesper/dev/ca/ca.pem when it exists.
    #[arg(long, global = true, env = "VESPER_LEAF_CA")]
    ca: Option<PathBuf>,
    /// This leaf's key file (created on first use). Default: ~/.config/vesper/leaf.key.
    #[arg(long, global = true, env = "VESPER_LEAF_KEY")]
    key: Option<PathBuf>,
    /// Print JSON for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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

fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .ok_or_else(|| format!("{text:?} is not name=value"))
}

fn config_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".config/vesper")
}

fn default_key_path() -> PathBuf {
    config_dir().join("leaf.key")
}

/// What a config file may set.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    seeds: Option<Vec<String>>,
    ca: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// Fills what flags and environment left open from the config file.
fn apply_config_file(cli: &mut Cli) -> anyhow::Result<()> {
    let (path, required) = match &cli.config {
        Some(path) => (path.clone(), true),
        None => (config_dir().join("leafpeer.toml"), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if !required && error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => bail!(CliError::Usage(format!(
            "cannot read config file {}: {error}",
            path.display()
        ))),
    };
    let file: FileConfig = toml::from_str(&text)
        .map_err(|error| CliError::Usage(format!("config file {}: {error}", path.display())))?;
    if cli.seeds.is_none() {
        cli.seeds = file.seeds;
    }
    if cli.ca.is_none() {
        cli.ca = file.ca;
    }
    if cli.key.is_none() {
        cli.key = file.key;
    }
    Ok(())
}

fn load_key(path: &Path) -> anyhow::Result<Keypair> {
    let existed = path.exists();
    let key =
        Keypair::load_or_generate(path).with_context(|| format!("key file {}", path.display()))?;
    if !existed {
        eprintln!(
            "leafpeer: created a new key in {} ({})",
            path.display(),
            key.peer_id()
        );
    }
    Ok(key)
}

fn ca_pem(given: &Option<PathBuf>) -> anyhow::Result<Vec<u8>> {
    let path = match given {
        Some(path) => path.clone(),
        None if Path::new(DEV_CA).exists() => PathBuf::from(DEV_CA),
        None => bail!(CliError::Usage(format!(
            "--ca is required (no dev cluster CA at {DEV_CA}; start one with scripts/up.sh or pass the cluster's CA)"
        ))),
    };
    std::fs::read(&path).with_context(|| format!("cannot read CA certificate {}", path.display()))
}

/// Errors that choose the exit code.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// Bad usage: exit code 64.
    #[error("{0}")]
    Usage(String),
    /// The thing asked for does not exist: exit code 2.
    #[error("{0}")]
    NotFound(String),
}

fn status_name(status: i32) -> &'static str {
    match PresenceStatus::try_from(status) {
        Ok(PresenceStatus::Online) => "online",
        Ok(PresenceStatus::Away) => "away",
        Ok(PresenceStatus::Busy) => "busy",
        _ => "offline",
    }
}

fn presence_json(presence: &Presence) -> Value {
    json!({
        "peer_id": presence.peer_id,
        "status": status_name(presence.status),
        "note": presence.note,
        "host_node_id": presence.host_node_id,
        "host": presence.host_leaf_addr,
        "changed_at_ms": presence.changed_at_ms,
        "attributes": presence.attributes,
        "nat_class": presence.nat_class,
        "candidates": presence.candidates,
    })
}

fn record_json(record: &Record) -> Value {
    json!({
        "namespace": record.namespace,
        "key": record.key,
        "owner": record.owner,
        "version": record.version,
        "attributes": record.attributes,
        "value": String::from_utf8_lossy(&record.value),
        "updated_at_ms": record.updated_at_ms,
    })
}

fn answer_name(state: i32) -> &'static str {
    match InvitationState::try_from(state) {
        Ok(InvitationState::Accepted) => "accepted",
        Ok(InvitationState::Declined) => "declined",
        _ => "invited",
    }
}

fn conference_json(context: &ConferenceContext) -> Value {
    json!({
        "id": context.id,
        "owner": context.owner,
        "title": context.title,
        "description": context.description,
        "start_at_ms": context.start_at_ms,
        "started": context.started,
        "invitees": context
            .invitees
            .iter()
            .map(|invitee| json!({ "peer_id": invitee.peer_id, "state": answer_name(invitee.state) }))
            .collect::<Vec<_>>(),
    })
}

fn roster_text(context: &ConferenceContext) -> String {
    let mut text = format!(
        "{} \"{}\" by {}{}",
        context.id,
        context.title,
        context.owner,
        if context.started { " (started)" } else { "" }
    );
    for invitee in &context.invitees {
        text.push_str(&format!(
            "\n  {} {}",
            invitee.peer_id,
            answer_name(invitee.state)
        ));
    }
    text
}

fn terms(equals: Vec<(String, String)>, prefixes: Vec<(String, String)>) -> Vec<SearchTerm> {
    equals
        .into_iter()
        .map(|(name, value)| SearchTerm::Equals(name, value))
        .chain(
            prefixes
                .into_iter()
                .map(|(name, value)| SearchTerm::Prefix(name, value)),
        )
        .collect()
}

/// Reports on stderr which path a peer connection took.
fn report_connection(
    json_mode: bool,
    connection: &vesper_leafpeer::PeerConnection,
    took: Duration,
) {
    let path = connection.path();
    if json_mode {
        let (kind, via) = match path {
            vesper_leafpeer::Path::Direct(addr) => ("direct", addr.to_string()),
            vesper_leafpeer::Path::Relayed { relay, .. } => ("relayed", relay.to_string()),
        };
        eprintln!(
            "{}",
            json!({ "event": "connected", "peer": connection.peer().to_string(), "path": kind, "via": via, "elapsed_ms": took.as_millis() as u64 })
        );
    } else {
        eprintln!("connected to {} ({path}) in {took:?}", connection.peer());
    }
}

/// [`pipe`] on a peer connection; when it fails, the error says why the connection ended (a relay cap, say).
async fn pipe_through(
    connection: &vesper_leafpeer::PeerConnection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    pipe(send, recv)
        .await
        .map_err(|error| match connection.close_reason() {
            Some(reason) => anyhow::Error::new(reason),
            None => error,
        })
}

/// Copies stdin into `send` and `recv` into stdout until both directions end.
async fn pipe(mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> anyhow::Result<()> {
    let up = async {
        tokio::io::copy(&mut tokio::io::stdin(), &mut send).await?;
        send.finish()?;
        // Wait until the peer has everything before the connection may close.
        let _ = send.stopped().await;
        Ok::<_, anyhow::Error>(())
    };
    let down = async {
        let mut stdout = tokio::io::stdout();
        tokio::io::copy(&mut recv, &mut stdout).await?;
        tokio::io::AsyncWriteExt::flush(&mut stdout).await?;
        Ok::<_, anyhow::Error>(())
    };
    let (up, down) = tokio::join!(up, down);
    up.context("sending")?;
    down.context("receiving")?;
    Ok(())
}

fn print(json_mode: bool, value: Value, text: impl FnOnce() -> String) {
    if json_mode {
        println!("{value}");
    } else {
        println!("{}", text());
    }
}

async fn run(mut cli: Cli) -> anyhow::Result<()> {
    apply_config_file(&mut cli)?;
    let key_path = cli.key.clone().unwrap_or_else(default_key_path);
    match &cli.command {
        Command::Keygen => {
            if key_path.exists() {
                bail!(CliError::Usage(format!(
                    "{} already exists; it is never overwritten (pass --key for another file)",
                    key_path.display()
                )));
            }
            let key = Keypair::generate();
            key.save(&key_path)
                .with_context(|| format!("cannot write {}", key_path.display()))?;
            print(
                cli.json,
                json!({ "peer_id": key.peer_id().to_string(), "key": key_path }),
                || format!("{} (key {})", key.peer_id(), key_path.display()),
            );
            return Ok(());
        }
        Command::Id => {
            let key = load_key(&key_path)?;
            print(
                cli.json,
                json!({ "peer_id": key.peer_id().to_string() }),
                || key.peer_id().to_string(),
            );
            return Ok(());
        }
        _ => {}
    }
    let keypair = load_key(&key_path)?;
    let seeds = cli
        .seeds
        .clone()
        .unwrap_or_else(|| DEV_SEEDS.iter().map(|seed| seed.to_string()).collect());
    let mut config = LeafConfig::new(seeds, ca_pem(&cli.ca)?, keypair);
    // One-shot commands do not measure and publish endpoints in the background; sessions that stay do.
    config.publish_endpoints = matches!(
        cli.command,
        Command::Listen { .. }
            | Command::Chat { .. }
            | Command::Join { .. }
            | Command::Accept { id: None, .. }
    );
    let leaf = Leaf::connect(config).await.map_err(|error| match error {
        LeafError::Unreachable(_) => anyhow::anyhow!(
            "{error}\n(is a cluster running? scripts/up.sh starts one; --seeds names others)"
        ),
        other => other.into(),
    })?;
    let result = command(&cli, &leaf).await;
    leaf.detach().await;
    result
}

async fn command(cli: &Cli, leaf: &Leaf) -> anyhow::Result<()> {
    let json_mode = cli.json;
    match &cli.command {
        Command::Keygen | Command::Id => unreachable!("handled before attaching"),
        Command::Status {
            status,
            note,
            attributes,
        } => {
            let status = match status.as_str() {
                "online" => PresenceStatus::Online,
                "away" => PresenceStatus::Away,
                "busy" => PresenceStatus::Busy,
                other => bail!(CliError::Usage(format!(
                    "status {other:?} is not online, away or busy"
                ))),
            };
            let presence = leaf
                .set_presence(status, note, attributes.iter().cloned().collect())
                .await?;
            print(json_mode, presence_json(&presence), || {
                format!(
                    "{} is {} {}",
                    presence.peer_id,
                    status_name(presence.status),
                    presence.note
                )
            });
        }
        Command::Nat => {
            let report = leaf.discover_endpoints().await?;
            let reflexive: Vec<Value> = report
                .reflexive
                .iter()
                .map(|(server, mapped)| json!({ "server": server.to_string(), "mapped": mapped.to_string() }))
                .collect();
            let value = json!({
                "nat_class": report.class.as_str(),
                "local": report.local.to_string(),
                "reflexive": reflexive,
                "unanswered": report.unanswered.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "candidates": report.candidates().iter().map(ToString::to_string).collect::<Vec<_>>(),
            });
            print(json_mode, value, || {
                let mut text = format!("NAT class: {}\nlocal:     {}", report.class, report.local);
                for (server, mapped) in &report.reflexive {
                    text.push_str(&format!("\nmapped:    {mapped} (seen by {server})"));
                }
                for server in &report.unanswered {
                    text.push_str(&format!("\nno answer: {server}"));
                }
                text
            });
        }
        Command::Lookup { peer } => {
            let peer = peer
                .parse()
                .map_err(|error| CliError::Usage(format!("peer {peer:?}: {error}")))?;
            match leaf.lookup(&peer, Consistency::Linearizable).await? {
                Some(presence) => print(json_mode, presence_json(&presence), || {
                    let mut text = format!(
                        "{} {} {} (via {})",
                        presence.peer_id,
                        status_name(presence.status),
                        presence.note,
                        presence.host_leaf_addr
                    );
                    if !presence.nat_class.is_empty() {
                        text.push_str(&format!(
                            "\nNAT {}, candidates {}",
                            presence.nat_class,
                            presence.candidates.join(" ")
                        ));
                    }
                    text
                }),
                None => print(json_mode, Value::Null, || {
                    format!("{peer} has never attached")
                }),
            }
        }
        Command::SearchPeers {
            equals,
            prefixes,
            online,
        } => {
            let matches = leaf
                .search_peers(&terms(equals.clone(), prefixes.clone()), *online, 100)
                .await?;
            if matches.more {
                eprintln!(
                    "leafpeer: more peers matched than shown; add terms to narrow the search"
                );
            }
            let found = matches.peers;
            print(
                json_mode,
                Value::Array(found.iter().map(presence_json).collect()),
                || {
                    found
                        .iter()
                        .map(|presence| {
                            format!("{} {}", presence.peer_id, status_name(presence.status))
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        Command::Put {
            namespace,
            record_key: key,
            value,
            value_file,
            attributes,
            expect_version,
        } => {
            let bytes = match (value, value_file) {
                (Some(text), _) => text.clone().into_bytes(),
                (None, Some(path)) => std::fs::read(path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
                (None, None) => Vec::new(),
            };
            let attributes: HashMap<String, String> = attributes.iter().cloned().collect();
            let record = leaf
                .put(namespace, key, attributes, bytes, *expect_version)
                .await?;
            print(json_mode, record_json(&record), || {
                format!(
                    "{}/{} version {}",
                    record.namespace, record.key, record.version
                )
            });
        }
        Command::Get {
            namespace,
            record_key: key,
            stale,
        } => {
            let consistency = if *stale {
                Consistency::Stale
            } else {
                Consistency::Linearizable
            };
            match leaf.get(namespace, key, consistency).await? {
                Some(record) => print(json_mode, record_json(&record), || {
                    String::from_utf8_lossy(&record.value).into_owned()
                }),
                None => bail!(CliError::NotFound(format!(
                    "{namespace}/{key} does not exist"
                ))),
            }
        }
        Command::List {
            namespace,
            prefix,
            limit,
        } => {
            let page = leaf
                .list(namespace, prefix, *limit, None, Consistency::Linearizable)
                .await?;
            print(
                json_mode,
                Value::Array(page.records.iter().map(record_json).collect()),
                || {
                    page.records
                        .iter()
                        .map(|record| {
                            format!(
                                "{} v{} {}",
                                record.key,
                                record.version,
                                String::from_utf8_lossy(&record.value)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        Command::Delete {
            namespace,
            record_key: key,
            expect_version,
        } => {
            let deleted = leaf.delete(namespace, key, *expect_version).await?;
            print(json_mode, json!({ "deleted": deleted }), || {
                if deleted {
                    format!("deleted {namespace}/{key}")
                } else {
                    format!("{namespace}/{key} did not exist")
                }
            });
        }
        Command::Search {
            namespace,
            equals,
            prefixes,
            limit,
        } => {
            let page = leaf
                .search(
                    namespace,
                    &terms(equals.clone(), prefixes.clone()),
                    *limit,
                    None,
                    Consistency::Linearizable,
                )
                .await?;
            print(
                json_mode,
                Value::Array(page.records.iter().map(record_json).collect()),
                || {
                    page.records
                        .iter()
                        .map(|record| record.key.clone())
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        Command::Send { peer, text, kind } => {
            let peer = peer
                .parse()
                .map_err(|error| CliError::Usage(format!("peer {peer:?}: {error}")))?;
            let outcome = leaf.send(&peer, kind, text.clone().into_bytes()).await?;
            let word = match outcome {
                SendOutcome::Delivered => "delivered",
                SendOutcome::Queued => "queued",
            };
            print(json_mode, json!({ "outcome": word }), || word.to_string());
        }
        Command::Create {
            id,
            title,
            description,
            starts_in,
        } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_millis() as u64);
            let context = leaf
                .create_conference(id, title, description, now + starts_in * 1000)
                .await?;
            print(json_mode, conference_json(&context), || {
                roster_text(&context)
            });
        }
        Command::Invite { id, peers } => {
            let mut invitees = Vec::new();
            for peer in peers {
                invitees.push(
                    peer.parse()
                        .map_err(|error| CliError::Usage(format!("peer {peer:?}: {error}")))?,
                );
            }
            let context = leaf.invite(id, &invitees).await?;
            print(json_mode, conference_json(&context), || {
                roster_text(&context)
            });
        }
        Command::Accept { id: Some(id), .. } | Command::Decline { id } => {
            let accept = matches!(cli.command, Command::Accept { .. });
            let context = leaf.answer_invitation(id, accept).await?;
            print(json_mode, conference_json(&context), || {
                roster_text(&context)
            });
        }
        Command::Roster { id } => {
            let context = leaf.conference(id).await?;
            print(json_mode, conference_json(&context), || {
                roster_text(&context)
            });
        }
        Command::Say { id, text } => {
            let sequence = leaf.post_chat(id, text).await?;
            print(json_mode, json!({ "sequence": sequence }), || {
                format!("#{sequence}")
            });
        }
        Command::Chat { peer } => {
            let peer: vesper_leafpeer::PeerId = peer
                .parse()
                .map_err(|error| CliError::Usage(format!("peer {peer:?}: {error}")))?;
            chat(leaf, peer).await?;
        }
        Command::Join { id } => join(leaf, id).await?,
        Command::Connect { peer } => {
            let peer: vesper_leafpeer::PeerId = peer
                .parse()
                .map_err(|error| CliError::Usage(format!("peer {peer:?}: {error}")))?;
            let started = std::time::Instant::now();
            let connection = leaf.connect_to(&peer).await?;
            report_connection(json_mode, &connection, started.elapsed());
            let (send, recv) = connection.open_bi().await?;
            pipe_through(&connection, send, recv).await?;
            connection.close().await;
        }
        Command::Accept {
            id: None,
            allow,
            allow_any,
            timeout,
        } => {
            let allowed: Vec<vesper_leafpeer::PeerId> = allow
                .iter()
                .map(|text| {
                    text.parse()
                        .map_err(|error| CliError::Usage(format!("--allow {text:?}: {error}")))
                })
                .collect::<Result<_, _>>()?;
            if allowed.is_empty() && !allow_any {
                bail!(CliError::Usage(
                    "name who may connect with --allow PEER (repeat), or pass --allow-any".into()
                ));
            }
            let any = *allow_any;
            leaf.set_connect_policy(move |peer| any || allowed.contains(peer));
            let mut incoming = leaf
                .incoming_connections()
                .context("incoming connections already taken")?;
            eprintln!("waiting for a connection to {}", leaf.peer_id());
            let started = std::time::Instant::now();
            let next = incoming.recv();
            let connection = match timeout {
                Some(seconds) => tokio::time::timeout(Duration::from_secs(*seconds), next)
                    .await
                    .map_err(|_| anyhow::anyhow!("no peer connected within {seconds} s"))?,
                None => next.await,
            }
            .context("the session ended before a peer connected")?;
            report_connection(json_mode, &connection, started.elapsed());
            let (send, recv) = connection.accept_bi().await?;
            pipe_through(&connection, send, recv).await?;
            connection.close().await;
        }
        Command::Listen { count, timeout } => {
            let mut messages = leaf.messages().context("message stream already taken")?;
            let deadline =
                timeout.map(|seconds| tokio::time::Instant::now() + Duration::from_secs(seconds));
            let mut seen = 0;
            if !json_mode {
                eprintln!("listening as {} (Ctrl-C to stop)", leaf.peer_id());
            }
            while count.is_none_or(|count| seen < count) {
                let next = match deadline {
                    Some(deadline) => {
                        match tokio::time::timeout_at(deadline, messages.recv()).await {
                            Ok(message) => message,
                            Err(_) => break,
                        }
                    }
                    None => messages.recv().await,
                };
                let Some(message) = next else { break };
                seen += 1;
                let text = String::from_utf8_lossy(&message.payload).into_owned();
                print(
                    json_mode,
                    json!({
                        "id": message.id,
                        "from": message.from,
                        "kind": message.kind,
                        "text": text,
                        "sent_at_ms": message.sent_at_ms,
                        "from_mailbox": message.from_mailbox,
                    }),
                    || format!("[{}] {}: {}", message.kind, message.from, text),
                );
            }
        }
    }
    Ok(())
}

/// Short form of a PeerId for chat lines.
fn short(peer: &str) -> &str {
    &peer[..peer.len().min(12)]
}

/// The interactive 1:1 chat.
async fn chat(leaf: &Leaf, peer: vesper_leafpeer::PeerId) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut messages = leaf.messages().context("message stream already taken")?;
    let mut presence = leaf
        .watch(vesper_leafpeer::WatchSpec {
            peers: vec![peer.to_string()],
            ..Default::default()
        })
        .await?;
    let mut input = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    println!(
        "chatting with {} as {} (Ctrl-D to leave)",
        short(&peer.to_string()),
        short(&leaf.peer_id().to_string())
    );
    loop {
        tokio::select! {
            line = input.next_line() => match line? {
                Some(line) if line.trim().is_empty() => {}
                Some(line) => match leaf.send(&peer, "chat", line.into_bytes()).await {
                    Ok(SendOutcome::Delivered) => {}
                    Ok(SendOutcome::Queued) => println!("(offline: your message waits in their mailbox)"),
                    Err(error) => println!("(not sent: {error})"),
                },
                None => return Ok(()),
            },
            Some(message) = messages.recv() => {
                println!("{}: {}", short(&message.from), String::from_utf8_lossy(&message.payload));
            }
            Some(item) = presence.recv() => {
                if let vesper_leafpeer::WatchItem::Event(event) = item {
                    if let Some(vesper_proto::v1::watch_event::Change::Presence(presence)) = event.change {
                        println!("* {} is {} {}", short(&presence.peer_id), status_name(presence.status), presence.note);
                    }
                }
            }
        }
    }
}

/// The interactive conference window.
async fn join(leaf: &Leaf, id: &str) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    use vesper_proto::v1::watch_event::Change;
    let context = leaf.conference(id).await?;
    println!("{}", roster_text(&context));
    let mut events = leaf
        .watch(vesper_leafpeer::WatchSpec {
            conference_id: id.to_string(),
            ..Default::default()
        })
        .await?;
    // The watch is in place once its first item (a reset with the current state) arrives: only then can no
    // line of the chat be missed, so only then does the window take input.
    match events.recv().await {
        Some(vesper_leafpeer::WatchItem::Reset { .. }) => {}
        Some(vesper_leafpeer::WatchItem::Refused(reason)) => bail!("cannot watch {id}: {reason}"),
        other => bail!("unexpected start of the conference watch: {other:?}"),
    }
    println!("joined {id}; type a line and press Enter to post it (Ctrl-D to leave)");
    let mut input = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut started = context.started;
    loop {
        tokio::select! {
            line = input.next_line() => match line? {
                Some(line) if line.trim().is_empty() => {}
                Some(line) => {
                    if let Err(error) = leaf.post_chat(id, &line).await {
                        println!("(not posted: {error})");
                    }
                }
                None => return Ok(()),
            },
            Some(item) = events.recv() => {
                let vesper_leafpeer::WatchItem::Event(event) = item else { continue };
                match event.change {
                    Some(Change::Chat(chat)) => println!("#{} {}: {}", chat.sequence, short(&chat.from), chat.text),
                    Some(Change::Conference(context)) => {
                        if context.started && !started {
                            println!("* the conference has started");
                        }
                        started = context.started;
                    }
                    _ => {}
                }
            }
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("leafpeer: {error:#}");
            match error.downcast_ref::<CliError>() {
                Some(CliError::Usage(_)) => ExitCode::from(EXIT_USAGE),
                Some(CliError::NotFound(_)) => ExitCode::from(2),
                None => ExitCode::FAILURE,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
