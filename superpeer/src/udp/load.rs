//! The report of this node's relay load through Raft, so that brokers pick the least loaded relay. (The
//! allocation table and datagram format are in [`vesper_proto::relay`]: leaves speak the same format, and the
//! fuzz targets reach it there.)

use std::time::{Duration, Instant};

use super::Relay;
use crate::replica::Replica;

/// How often a node looks at its relay load, and reports it through Raft when it changed.
const LOAD_CHECK: Duration = Duration::from_secs(2);
/// A node reports its load at least this often, changed or not.
const LOAD_REFRESH: Duration = Duration::from_secs(300);

/// Reports this node's relay load (allocations in use, capacity) through Raft whenever it changes, so that
/// every broker can pick the least loaded relay from its own replica.
pub async fn report(replica: Replica, relay: Relay, shutdown: tokio_util::sync::CancellationToken) {
    let mut ticker = tokio::time::interval(LOAD_CHECK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported: Option<((u32, u32), Instant)> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Some(node_id) = replica.node_id() else {
            continue;
        };
        let now = Instant::now();
        let load = {
            let (active, capacity) = relay.load();
            let clamp = |count: usize| u32::try_from(count).unwrap_or(u32::MAX);
            (clamp(active), clamp(capacity))
        };
        let due = match reported {
            None => true,
            Some((last, at)) => last != load || now.duration_since(at) >= LOAD_REFRESH,
        };
        if !due {
            continue;
        }
        let op: crate::command::Op = crate::command::RelayLoad {
            node_id,
            active: load.0,
            capacity: load.1,
        }
        .into();
        match replica.propose(op).await {
            Ok(_) => reported = Some((load, now)),
            Err(error) => tracing::debug!(%error, "relay load report not committed; trying again"),
        }
    }
}
