//! This node's zone label in Raft: proposed once the node belongs to a cluster, and again whenever the stored
//! label differs from the configured one (a changed config, or a label cleared), so that the controller on any
//! leader spreads the voters by the zones the nodes themselves declared.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::command::NodeZone;
use crate::replica::Replica;
use crate::store::nodes::read_zones;

/// How often the stored label is compared with the configured one.
const CHECK: Duration = Duration::from_secs(2);

/// Keeps this node's zone label in Raft equal to `zone` until shutdown.
pub async fn report(replica: Replica, zone: Option<String>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(CHECK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Some(node_id) = replica.node_id() else {
            continue;
        };
        let stored = match read_zones(replica.reader().db()) {
            Ok(zones) => zones.get(&node_id).cloned(),
            Err(error) => {
                tracing::warn!(%error, "cannot read the zone labels");
                continue;
            }
        };
        if stored == zone {
            continue;
        }
        let op = NodeZone {
            node_id,
            zone: zone.clone(),
        };
        match replica.propose(op.into()).await {
            Ok(_) => tracing::info!(zone = ?zone, "zone label reported"),
            Err(error) => tracing::debug!(%error, "zone label not committed; trying again"),
        }
    }
}
