//! Discovering and publishing this leaf's reachability (NAT class and address candidates).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use vesper_proto::v1::PublishEndpointsRequest;

use super::shared::{Attachment, Connection, Shared};
use crate::error::LeafError;
use crate::nat::{self, NatReport};

/// Super peers asked per discovery (two at different IPs tell the mapping class).
const STUN_SERVERS: usize = 2;

/// STUN addresses of the known super peers, the attached one first, one per distinct IP.
pub async fn stun_servers(attachment: &Attachment, attached: &str) -> Vec<SocketAddr> {
    let mut names = vec![attached.to_string()];
    for known in attachment.known.read().expect("known lock").iter() {
        if !names.contains(known) {
            names.push(known.clone());
        }
    }
    let mut addrs = Vec::new();
    for name in names {
        if let Ok(resolved) = tokio::net::lookup_host(name.as_str()).await {
            addrs.extend(resolved);
        }
    }
    nat::distinct_ips(&addrs, STUN_SERVERS)
}

/// Binds a fresh UDP socket and measures its NAT class against the known super peers.
pub async fn measure(shared: &Shared, connection: &Connection) -> Result<NatReport, LeafError> {
    let servers = stun_servers(&shared.attachment, &connection.server).await;
    let socket = UdpSocket::bind(("0.0.0.0", 0)).await.map_err(|error| {
        LeafError::Connect(format!("cannot bind a UDP socket for STUN: {error}"))
    })?;
    nat::discover(&socket, &servers)
        .await
        .map_err(|error| LeafError::Connect(format!("STUN discovery failed: {error}")))
}

/// Publishes `report` in this leaf's presence on `connection`.
pub async fn publish(
    shared: &Shared,
    connection: &Connection,
    report: &NatReport,
) -> Result<(), LeafError> {
    let mut request = connection.request(PublishEndpointsRequest {
        candidates: report
            .candidates()
            .iter()
            .map(ToString::to_string)
            .collect(),
        nat_class: report.class.as_str().to_string(),
        sequence: shared.presence.next_sequence(),
    });
    request.set_timeout(shared.config.request_timeout);
    connection.client.clone().publish_endpoints(request).await?;
    Ok(())
}

/// Measures and publishes in the background after an attach; failures are logged, the session goes on.
pub fn publish_in_background(shared: Arc<Shared>, connection: Arc<Connection>) {
    shared.clone().spawn(async move {
        let outcome = async {
            let report = measure(&shared, &connection).await?;
            publish(&shared, &connection, &report).await?;
            Ok::<_, LeafError>(report)
        };
        match outcome.await {
            Ok(report) => {
                tracing::debug!(class = %report.class, local = %report.local, "published endpoints");
                *shared.presence.nat.lock().expect("nat lock") = Some(report);
            }
            Err(error) => tracing::warn!(%error, "could not publish endpoints"),
        }
    });
}
