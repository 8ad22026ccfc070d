//! Timed duties of the leader: the peers of a super peer that stopped answering go offline, and conferences
//! whose scheduled start has passed are marked started.
//!
//! The leader learns when each member last acknowledged it from openraft's heartbeat metrics (which list the
//! leader too, with a time that moves only when some other member answers: a leader alone must not take
//! itself for silent, so it is never a candidate). A member silent
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
        let heard = heartbeats
            .iter()
            .map(|(node, last)| (*node, last.map(|instant| instant.elapsed())));
        let stale = silent(metrics.id, heard, since.elapsed(), expiry);
        expired.retain(|node| stale.contains(node));
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

/// The members silent for longer than `expiry`, from how long ago each last answered (None: never, since this
/// node has led for `leading`). The leader itself (`me`) never is.
fn silent(
    me: u64,
    heard: impl IntoIterator<Item = (u64, Option<Duration>)>,
    leading: Duration,
    expiry: Duration,
) -> Vec<u64> {
    heard
        .into_iter()
        .filter(|(node, ago)| *node != me && ago.unwrap_or(leading) > expiry)
        .map(|(node, _)| node)
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    const EXPIRY: Duration = Duration::from_secs(15);

    #[test]
    fn only_other_members_silent_past_the_expiry_are_named() {
        // (members as (id, seconds since its last answer), seconds led, the silent ones)
        type Row = (&'static [(u64, Option<u64>)], u64, &'static [u64]);
        let table: &[Row] = &[
            // A leader alone: openraft's time for it never moves, yet it is not silent.
            (&[(1, Some(3600))], 3600, &[]),
            (&[(1, Some(20)), (2, Some(1))], 60, &[]),
            (&[(1, Some(1)), (2, Some(16)), (3, Some(15))], 60, &[2]),
            // Never heard from: silent only once this node has led longer than the expiry.
            (&[(1, Some(0)), (2, None)], 10, &[]),
            (&[(1, Some(0)), (2, None)], 16, &[2]),
        ];
        for (heard, led, want) in table {
            let heard = heard
                .iter()
                .map(|(node, ago)| (*node, ago.map(Duration::from_secs)));
            let got = silent(1, heard, Duration::from_secs(*led), EXPIRY);
            assert_eq!(&got, want, "led {led}s");
        }
    }
}
