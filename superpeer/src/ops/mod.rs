//! Operating a super peer from outside: the ops HTTP port (probes and Prometheus metrics; the metric handles
//! themselves are in [`crate::metrics`]). Nothing here changes state; docs/OPERATIONS.md describes it.

pub mod listener;
pub mod ready;
mod server;
pub mod sessions;
pub mod status;

pub use server::{router, OpsState};

use openraft::async_runtime::WatchReceiver;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::raft_types::TypeConfig;

/// Serves the ops port until `stop` is cancelled; a failure is logged (the node goes on without it: probes then
/// fail, which is what an orchestrator should see).
pub async fn serve(listener: TcpListener, state: OpsState, stop: CancellationToken) {
    if let Err(error) = server::serve(listener, state, stop).await {
        tracing::error!(%error, "the ops port stopped");
    }
}

/// Counts the leader changes this node sees: each time a leader becomes known that differs from the last one
/// known (an election without a winner in between does not count twice).
pub async fn count_leader_changes(
    mut raft_metrics: openraft::type_config::alias::WatchReceiverOf<
        TypeConfig,
        openraft::RaftMetrics<TypeConfig>,
    >,
    counters: crate::metrics::RaftCounters,
    shutdown: CancellationToken,
) {
    let mut last_known: Option<u64> = None;
    loop {
        let leader = raft_metrics.borrow_and_update().current_leader;
        if let Some(leader) = leader {
            if last_known != Some(leader) {
                if last_known.is_some() {
                    counters.leader_changed();
                }
                last_known = Some(leader);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = raft_metrics.changed() => if changed.is_err() { return },
        }
    }
}
