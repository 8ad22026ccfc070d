//! Keeps this node's sessions and the replicated presence in agreement: a session whose peer's presence no
//! longer lists it (pushed out by the per-peer session limit, or expired with its host while that host was out
//! of touch) is ended with a reason, so that no leaf is left attached to a session that nothing reaches.
//!
//! ```text
//!  event feed (every applied presence change) ──> peer has listed sessions here? ──> end those not listed
//!  feed lagged ──> check every peer with listed sessions here against the replica
//! ```

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::events::Change;
use crate::leaf::state::LeafState;
use crate::store::presence;

/// Runs until shutdown.
pub async fn run(context: Arc<LeafState>, shutdown: CancellationToken) {
    let mut events = context.events.subscribe();
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            event = events.recv() => event,
        };
        match event {
            Ok(event) => {
                if let Change::Presence { peer, entry } = &event.change {
                    let Ok(peer) = vesper_proto::PeerId::from_public_key_bytes(peer) else {
                        continue;
                    };
                    let ended = context.sessions.end_unlisted(&peer, entry, event.index);
                    if ended > 0 {
                        tracing::info!(%peer, ended, "ended sessions the peer's presence no longer lists");
                    }
                }
            }
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "session listing check fell behind the event feed; checking every session"
                );
                check_all(&context);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Checks every peer with listed sessions here against the presence this replica has applied.
fn check_all(context: &LeafState) {
    let Ok(raft) = context.replica.raft() else {
        return;
    };
    let index = crate::raft::propose::applied_index(raft);
    let reader = context.replica.reader();
    for peer in context.sessions.listed_peers() {
        match presence::get(reader.db(), peer.as_bytes()) {
            Ok(Some(entry)) => {
                context.sessions.end_unlisted(&peer, &entry, index);
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, %peer, "cannot read presence"),
        }
    }
}

/// Checks the sessions of `peer` here against the presence this replica has applied. Called when a session's
/// attach has been recorded: a change that pushed it out may have been applied here (and its event seen by
/// [`run`]) before the session knew its attach's index.
pub fn check_peer(context: &LeafState, peer: &vesper_proto::PeerId) {
    let Ok(raft) = context.replica.raft() else {
        return;
    };
    let index = crate::raft::propose::applied_index(raft);
    match presence::get(context.replica.reader().db(), peer.as_bytes()) {
        Ok(Some(entry)) => {
            context.sessions.end_unlisted(peer, &entry, index);
        }
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, %peer, "cannot read presence"),
    }
}
