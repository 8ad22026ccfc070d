//! Conference commands: `create`, `invite`, `accept ID` / `decline`, `roster`, `say`, and `join` (the
//! interactive conference window).

use anyhow::bail;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use vesper_leafpeer::{ConferenceContext, WatchItem, WatchSpec};
use vesper_proto::v1::watch_event::Change;

use crate::args::Command;
use crate::error::parse_peer;
use crate::output::{conference_json, roster_text, short, Attached};

/// Runs one of this module's commands.
pub async fn run(at: &Attached<'_>, command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Create {
            id,
            title,
            description,
            starts_in,
        } => create(at, id, title, description, *starts_in).await,
        Command::Invite { id, peers } => invite(at, id, peers).await,
        Command::Accept { id: Some(id), .. } => answer(at, id, true).await,
        Command::Decline { id } => answer(at, id, false).await,
        Command::Roster { id } => {
            let context = at.leaf.conference(id).await?;
            print_conference(at, &context);
            Ok(())
        }
        Command::Say { id, text } => {
            let sequence = at.leaf.post_chat(id, text).await?;
            at.out
                .print(json!({ "sequence": sequence }), || format!("#{sequence}"));
            Ok(())
        }
        Command::Join { id } => join(at, id).await,
        other => unreachable!("not a conference command: {other:?}"),
    }
}

fn print_conference(at: &Attached<'_>, context: &ConferenceContext) {
    at.out
        .print(conference_json(context), || roster_text(context));
}

async fn create(
    at: &Attached<'_>,
    id: &str,
    title: &str,
    description: &str,
    starts_in: u64,
) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64);
    let context = at
        .leaf
        .create_conference(id, title, description, now + starts_in * 1000)
        .await?;
    print_conference(at, &context);
    Ok(())
}

async fn invite(at: &Attached<'_>, id: &str, peers: &[String]) -> anyhow::Result<()> {
    let mut invitees = Vec::new();
    for peer in peers {
        invitees.push(parse_peer(peer)?);
    }
    let context = at.leaf.invite(id, &invitees).await?;
    print_conference(at, &context);
    Ok(())
}

/// `accept ID` (with `accept`) or `decline ID`.
async fn answer(at: &Attached<'_>, id: &str, accept: bool) -> anyhow::Result<()> {
    let context = at.leaf.answer_invitation(id, accept).await?;
    print_conference(at, &context);
    Ok(())
}

/// The interactive conference window.
async fn join(at: &Attached<'_>, id: &str) -> anyhow::Result<()> {
    let leaf = at.leaf;
    let context = leaf.conference(id).await?;
    println!("{}", roster_text(&context));
    let mut events = leaf
        .watch(WatchSpec {
            conference_id: id.to_string(),
            ..Default::default()
        })
        .await?;
    // The watch is in place once its first item (a reset with the current state) arrives: only then can no
    // line of the chat be missed, so only then does the window take input.
    match events.recv().await {
        Some(WatchItem::Reset { .. }) => {}
        Some(WatchItem::Refused(reason)) => bail!("cannot watch {id}: {reason}"),
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
            Some(error) = leaf.closed() => return Err(error.into()),
            Some(item) = events.recv() => {
                let WatchItem::Event(event) = item else { continue };
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
