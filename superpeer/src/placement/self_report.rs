//! What a node tells the placement controller about itself, through Raft: its zone label and the SHA-256 of
//! the certificate it presents (rotated certificates included). Each is proposed once the node belongs to a
//! cluster, and again whenever the stored value differs from the node's own, so the controller on any leader
//! spreads voters by the zones the nodes declared, and can revoke a retired node's certificate.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::command::{NodeCertificate, NodeZone, Op};
use crate::replica::Replica;
use crate::store::nodes::{read_node_certificates, read_zones};
use crate::tls::ServerTls;

/// How often the stored values are compared with the node's own (two small local reads; often, so that a node
/// that has just joined is known to the controller within a moment).
const CHECK: Duration = Duration::from_millis(250);

/// Keeps this node's zone label and certificate fingerprint in Raft up to date until shutdown.
pub async fn report(
    replica: Replica,
    zone: Option<String>,
    tls: Arc<ServerTls>,
    shutdown: CancellationToken,
) {
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
        let db = replica.reader().db();
        let mut due: Vec<(&str, Op)> = Vec::new();
        match read_zones(db) {
            Ok(zones) if zones.get(&node_id) != zone.as_ref() => due.push((
                "zone label",
                NodeZone {
                    node_id,
                    zone: zone.clone(),
                }
                .into(),
            )),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot read the zone labels"),
        }
        match (tls.material().fingerprint(), read_node_certificates(db)) {
            (Ok(fingerprint), Ok(stored)) if stored.get(&node_id) != Some(&fingerprint) => due
                .push((
                    "certificate fingerprint",
                    NodeCertificate {
                        node_id,
                        fingerprint,
                    }
                    .into(),
                )),
            (Ok(_), Ok(_)) => {}
            (Err(error), _) => tracing::warn!(%error, "cannot fingerprint this node's certificate"),
            (_, Err(error)) => tracing::warn!(%error, "cannot read the certificate fingerprints"),
        }
        for (what, op) in due {
            match replica.propose(op).await {
                Ok(_) => tracing::info!(what, "reported to placement"),
                Err(error) => tracing::debug!(%error, what, "not committed; trying again"),
            }
        }
    }
}
