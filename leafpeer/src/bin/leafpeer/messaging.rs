//! Message commands: `send` one, `listen` for them, and `chat` with one peer interactively.

use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use vesper_leafpeer::{Message, PeerId, SendOutcome, WatchItem, WatchSpec};
use vesper_proto::v1::watch_event::Change;

use crate::args::Command;
use crate::error::parse_peer;
use crate::output::{short, status_name, Attached};

/// Runs one of this module's commands.
pub async fn run(at: &Attached<'_>, command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Send { peer, text, kind } => send(at, peer, text, kind).await,
        Command::Listen { count, timeout } => listen(at, *count, *timeout).await,
        Command::Chat { peer } => chat(at, parse_peer(peer)?).await,
        other => unreachable!("not a messaging command: {other:?}"),
    }
}

async fn send(at: &Attached<'_>, peer: &str, text: &str, kind: &str) -> anyhow::Result<()> {
    let peer = parse_peer(peer)?;
    let outcome = at.leaf.send(&peer, kind, text.as_bytes().to_vec()).await?;
    let word = match outcome {
        SendOutcome::Delivered => "delivered",
        SendOutcome::Queued => "queued",
    };
    at.out
        .print(json!({ "outcome": word }), || word.to_string());
    Ok(())
}

/// Prints messages as they arrive, until `count` of them, `timeout` seconds, or the session's end.
async fn listen(
    at: &Attached<'_>,
    count: Option<usize>,
    timeout: Option<u64>,
) -> anyhow::Result<()> {
    let mut messages = at.leaf.messages().context("message stream already taken")?;
    let deadline =
        timeout.map(|seconds| tokio::time::Instant::now() + Duration::from_secs(seconds));
    let mut seen = 0;
    if !at.out.json {
        eprintln!("listening as {} (Ctrl-C to stop)", at.leaf.peer_id());
    }
    while count.is_none_or(|count| seen < count) {
        let next = async {
            match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, messages.recv())
                    .await
                    .ok()
                    .flatten(),
                None => messages.recv().await,
            }
        };
        let next = tokio::select! {
            next = next => next,
            // A super peer ended the session for good (this key attached too many sessions elsewhere).
            ended = at.leaf.closed() => match ended {
                Some(error) => return Err(error.into()),
                None => None,
            },
        };
        let Some(message) = next else { break };
        seen += 1;
        print_message(at, &message);
    }
    Ok(())
}

fn print_message(at: &Attached<'_>, message: &Message) {
    let text = String::from_utf8_lossy(&message.payload).into_owned();
    at.out.print(
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

/// The interactive 1:1 chat.
async fn chat(at: &Attached<'_>, peer: PeerId) -> anyhow::Result<()> {
    let leaf = at.leaf;
    let mut messages = leaf.messages().context("message stream already taken")?;
    let mut presence = leaf
        .watch(WatchSpec {
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
            Some(error) = leaf.closed() => return Err(error.into()),
            Some(item) = presence.recv() => {
                if let WatchItem::Event(event) = item {
                    if let Some(Change::Presence(presence)) = event.change {
                        println!("* {} is {} {}", short(&presence.peer_id), status_name(presence.status), presence.note);
                    }
                }
            }
        }
    }
}
