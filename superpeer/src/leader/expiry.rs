//! Timed duties of the leader: the peers of a super peer that stopped answering go offline, and conferences
//! whose scheduled start has passed are marked started.
//!
//! The leader learns when each member last acknowledged it from openraft's heartbeat metrics. A member silent
//! for longer than `host_expiry` (after this node has led at least that long, so a fresh leader does not
//! expire members it simply has not heard from yet) gets one `ExpireHost` proposal; it is proposed again only
//! after the member answered in between. Leaves that re-attached elsewhere are untouched: their presence names
//! their new host.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::Instant as _;
use tokio_util::sync::CancellationToken;

use crate::command::{ConferenceStart, ExpireHost, Response};
use crate::replica::Replica;

/// How often the leader checks.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the leader's timed duties on `replica` (doing nothing while this node does not lead) until shutdown;
/// `host_expiry` is how long a silent member keeps its leaves online.
pub async fn run(replica: Replica, host_expiry: Duration, shutdown: CancellationToken) {
    let context = &replica;
    let expiry = host_expiry;
    let mut expired: HashSet<u64> = HashSet::new();
    let mut leading_since: Option<Instant> = None;
    let mut ticker = tokio::time::interval(CHECK_INTERVAL);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Ok(raft) = context.raft() else { continue };
        let metrics = raft.metrics().borrow_watched().clone();
        let Some(heartbeats) = metrics.heartbeat.as_ref() else {
            leading_since = None;
            continue;
        };
        start_due_conferences(context).await;
        let since = *leading_since.get_or_insert_with(Instant::now);
        let mut stale = Vec::new();
        for (node, last) in heartbeats {
            let silent = match last {
                Some(instant) => instant.elapsed() > expiry,
                None => since.elapsed() > expiry,
            };
            if silent {
                stale.push(*node);
            } else {
                expired.remove(node);
            }
        }
        for node in stale {
            if expired.contains(&node) {
                continue;
            }
            match context.propose(ExpireHost { host: node }.into()).await {
                Ok((Response::Expired(count), _)) => {
                    expired.insert(node);
                    if count > 0 {
                        tracing::info!(
                            node,
                            sessions = count,
                            "super peer silent; its sessions are no longer listed"
                        );
                    }
                }
                Ok(_) => {
                    expired.insert(node);
                }
                Err(error) => {
                    tracing::warn!(node, %error, "cannot expire a silent super peer's sessions")
                }
            }
        }
    }
}

/// Marks conferences whose scheduled start has passed as started (a Raft write, so every watcher sees it).
async fn start_due_conferences(context: &Replica) {
    let due = match crate::store::conference::due(
        context.reader().db(),
        crate::raft::propose::now_ms(),
    ) {
        Ok(due) => due,
        Err(error) => {
            tracing::warn!(%error, "cannot read conferences");
            return;
        }
    };
    for id in due {
        if let Err(error) = context
            .propose(ConferenceStart { id: id.clone() }.into())
            .await
        {
            tracing::warn!(%error, conference = %id, "cannot mark a conference started");
        }
    }
}
