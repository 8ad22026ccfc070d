//! Presence commands: `status` (set this leaf's), `lookup` (a peer's), `search-peers` (by profile attributes).

use std::collections::HashMap;

use anyhow::bail;
use serde_json::Value;
use vesper_leafpeer::{Consistency, Presence, PresenceStatus};

use crate::args::{terms, Command};
use crate::error::{parse_peer, CliError};
use crate::output::{presence_json, status_name, Attached};

/// Runs one of this module's commands.
pub async fn run(at: &Attached<'_>, command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Status {
            status,
            note,
            attributes,
        } => set_status(at, status, note, attributes.iter().cloned().collect()).await,
        Command::Lookup { peer } => lookup(at, peer).await,
        Command::SearchPeers {
            equals,
            prefixes,
            online,
        } => search_peers(at, equals, prefixes, *online).await,
        other => unreachable!("not a presence command: {other:?}"),
    }
}

async fn set_status(
    at: &Attached<'_>,
    status: &str,
    note: &str,
    attributes: HashMap<String, String>,
) -> anyhow::Result<()> {
    let status = match status {
        "online" => PresenceStatus::Online,
        "away" => PresenceStatus::Away,
        "busy" => PresenceStatus::Busy,
        other => bail!(CliError::Usage(format!(
            "status {other:?} is not online, away or busy"
        ))),
    };
    let presence = at.leaf.set_presence(status, note, attributes).await?;
    at.out.print(presence_json(&presence), || {
        format!(
            "{} is {} {}",
            presence.peer_id,
            status_name(presence.status),
            presence.note
        )
    });
    Ok(())
}

async fn lookup(at: &Attached<'_>, peer: &str) -> anyhow::Result<()> {
    let peer = parse_peer(peer)?;
    match at.leaf.lookup(&peer, Consistency::Linearizable).await? {
        Some(presence) => at
            .out
            .print(presence_json(&presence), || lookup_text(&presence)),
        None => at
            .out
            .print(Value::Null, || format!("{peer} has never attached")),
    }
    Ok(())
}

/// A looked-up presence for people: status and hosts, then the NAT and candidates when published.
fn lookup_text(presence: &Presence) -> String {
    let hosts: Vec<&str> = presence
        .sessions
        .iter()
        .map(|session| session.host_leaf_addr.as_str())
        .collect();
    let via = match hosts.len() {
        0 => String::new(),
        1 => format!(" (via {})", hosts[0]),
        count => format!(" ({count} sessions, via {})", hosts.join(", ")),
    };
    let mut text = format!(
        "{} {} {}{via}",
        presence.peer_id,
        status_name(presence.status),
        presence.note,
    );
    if !presence.nat_class.is_empty() {
        text.push_str(&format!(
            "\nNAT {}, candidates {}",
            presence.nat_class,
            presence.candidates.join(" ")
        ));
    }
    text
}

async fn search_peers(
    at: &Attached<'_>,
    equals: &[(String, String)],
    prefixes: &[(String, String)],
    online: bool,
) -> anyhow::Result<()> {
    let matches = at
        .leaf
        .search_peers(&terms(equals, prefixes), online, 100)
        .await?;
    if matches.more {
        eprintln!("leafpeer: more peers matched than shown; add terms to narrow the search");
    }
    let found = matches.peers;
    at.out.print(
        Value::Array(found.iter().map(presence_json).collect()),
        || {
            found
                .iter()
                .map(|presence| format!("{} {}", presence.peer_id, status_name(presence.status)))
                .collect::<Vec<_>>()
                .join("\n")
        },
    );
    Ok(())
}
