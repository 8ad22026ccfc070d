//! Peer connections on the command line: `connect PEER` and `accept --allow PEER` open an encrypted connection
//! (direct through NATs, else relayed) and pipe stdin/stdout through it, like netcat; the path taken is
//! reported on stderr.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use vesper_leafpeer::{Path, PeerConnection, PeerId};

use crate::args::Command;
use crate::error::{parse_peer, CliError};
use crate::output::Attached;

/// Runs one of this module's commands.
pub async fn run(at: &Attached<'_>, command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Connect { peer } => connect(at, parse_peer(peer)?).await,
        Command::Accept {
            id: None,
            allow,
            allow_any,
            timeout,
        } => accept(at, allow, *allow_any, *timeout).await,
        other => unreachable!("not a peer connection command: {other:?}"),
    }
}

async fn connect(at: &Attached<'_>, peer: PeerId) -> anyhow::Result<()> {
    let started = Instant::now();
    let connection = at.leaf.connect_to(&peer).await?;
    report_connection(at.out.json, &connection, started.elapsed());
    let (send, recv) = connection.open_bi().await?;
    pipe_through(&connection, send, recv).await?;
    connection.close().await;
    Ok(())
}

/// Waits for one allowed peer to connect (within `timeout` seconds, if given) and pipes through its connection.
async fn accept(
    at: &Attached<'_>,
    allow: &[String],
    allow_any: bool,
    timeout: Option<u64>,
) -> anyhow::Result<()> {
    let allowed: Vec<PeerId> = allow
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
    let leaf = at.leaf;
    leaf.set_connect_policy(move |peer| allow_any || allowed.contains(peer));
    let mut incoming = leaf
        .incoming_connections()
        .context("incoming connections already taken")?;
    eprintln!("waiting for a connection to {}", leaf.peer_id());
    let started = Instant::now();
    let next = incoming.recv();
    let connection = match timeout {
        Some(seconds) => tokio::time::timeout(Duration::from_secs(seconds), next)
            .await
            .map_err(|_| anyhow::anyhow!("no peer connected within {seconds} s"))?,
        None => next.await,
    }
    .context("the session ended before a peer connected")?;
    report_connection(at.out.json, &connection, started.elapsed());
    let (send, recv) = connection.accept_bi().await?;
    pipe_through(&connection, send, recv).await?;
    connection.close().await;
    Ok(())
}

/// Reports on stderr which path a peer connection took.
fn report_connection(json_mode: bool, connection: &PeerConnection, took: Duration) {
    let path = connection.path();
    if json_mode {
        let (kind, via) = match path {
            Path::Direct(addr) => ("direct", addr.to_string()),
            Path::Relayed { relay, .. } => ("relayed", relay.to_string()),
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
    connection: &PeerConnection,
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
