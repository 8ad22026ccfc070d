//! The Raft network: openraft's RPCs carried over the Cluster service (mutual TLS) to other super peers.
//!
//! Channels are cached per address in [`ClusterClients`], which the proposer and the admin forwarding also use.
//! Connection failures are reported to openraft as `Unreachable` (it backs off at once); other failures as
//! `Network`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::OptionalSend;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use vesper_proto::version::{ClusterStamp, StampedChannel};

/// A client of another member's Cluster service; every call carries this build's protocol range.
pub type ClusterClient = vesper_proto::v1::cluster_client::ClusterClient<StampedChannel>;

use super::codec;
use crate::command::NodeInfo;
use crate::error::ServiceError;
use crate::raft_types::{Snapshot, SnapshotMeta, TypeConfig, Vote};
use crate::tls::{host_of, TlsMaterial};

/// Largest message on the Cluster service: snapshots travel in one message.
pub const MAX_CLUSTER_MESSAGE_BYTES: usize = 512 * 1024 * 1024;
/// Deadline for sending a whole snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline for connecting to another super peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Metadata key of every Raft RPC: the node id it is meant for. A node that sits at a member's address under
/// another id (a pod whose volume was lost, back at the same DNS name as a new node) refuses the call, so its
/// answers are never taken for the old member's: one store must never count as two members.
pub const TARGET_NODE_HEADER: &str = "x-vesper-target-node";

/// Refuses a Raft RPC that `metadata` addresses to another node than `me`. Calls without the header (from a
/// build older than it) are served as before.
pub fn check_target(metadata: &tonic::metadata::MetadataMap, me: u64) -> Result<(), ServiceError> {
    let Some(value) = metadata.get(TARGET_NODE_HEADER) else {
        return Ok(());
    };
    let target = value
        .to_str()
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .ok_or_else(|| ServiceError::Malformed(format!("{TARGET_NODE_HEADER} is not a node id")))?;
    if target != me {
        return Err(ServiceError::Precondition(format!(
            "this Raft call is for node {target}, but this is node {me} (the member at this address was replaced)"
        )));
    }
    Ok(())
}

/// Cached gRPC channels to other super peers.
#[derive(Clone)]
pub struct ClusterClients {
    tls: Arc<Mutex<TlsMaterial>>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl ClusterClients {
    pub fn new(tls: TlsMaterial) -> Self {
        Self {
            tls: Arc::new(Mutex::new(tls)),
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Uses `tls` for connections made from now on (after a certificate rotation). Cached channels are
    /// forgotten, so the next call dials with the new certificate; calls running on the old channels finish
    /// on them.
    pub fn replace_tls(&self, tls: TlsMaterial) {
        *self.tls.lock().expect("tls lock poisoned") = tls;
        self.channels
            .lock()
            .expect("channel cache lock poisoned")
            .clear();
    }

    /// A Cluster client for the super peer at `address` (host:port). Connects lazily.
    pub fn client(&self, address: &str) -> Result<ClusterClient, tonic::Status> {
        let channel = self.channel(address)?;
        Ok(
            vesper_proto::v1::cluster_client::ClusterClient::with_interceptor(
                channel,
                ClusterStamp,
            )
            .max_decoding_message_size(MAX_CLUSTER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_CLUSTER_MESSAGE_BYTES),
        )
    }

    /// [`ClusterClients::client`] for service code: a failure names the peer.
    pub fn peer(&self, address: &str) -> Result<ClusterClient, crate::error::ServiceError> {
        self.client(address)
            .map_err(|status| crate::error::ServiceError::Peer {
                peer: address.to_string(),
                status,
            })
    }

    /// A channel to `address`, shared by every client of that address.
    pub fn channel(&self, address: &str) -> Result<Channel, tonic::Status> {
        let mut channels = self.channels.lock().expect("channel cache lock poisoned");
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(format!("https://{address}"))
            .map_err(|error| {
                ServiceError::Malformed(format!("bad address {address:?}: {error}")).into_status()
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .tls_config(self.tls().cluster_client(host_of(address)))
            .map_err(|error| {
                ServiceError::Internal(format!("tls config: {error}")).into_status()
            })?;
        let channel = endpoint.connect_lazy();
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// The TLS material channels are made with.
    fn tls(&self) -> TlsMaterial {
        self.tls.lock().expect("tls lock poisoned").clone()
    }
}

/// Creates a [`Connection`] per target node.
#[derive(Clone)]
pub struct Network {
    clients: ClusterClients,
}

impl Network {
    pub fn new(clients: ClusterClients) -> Self {
        Self { clients }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: u64, node: &NodeInfo) -> Self::Network {
        Connection {
            clients: self.clients.clone(),
            target,
            address: node.cluster_addr.clone(),
        }
    }
}

/// The Raft RPC client for one target node.
pub struct Connection {
    clients: ClusterClients,
    target: u64,
    address: String,
}

fn rpc_error(status: tonic::Status) -> RPCError<TypeConfig> {
    match status.code() {
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => {
            RPCError::Unreachable(Unreachable::new(&status))
        }
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

/// Sends one payload request, with `timeout`, and decodes the `Result<T, E>` the peer encoded.
async fn call<Req, T, E, F, Fut>(
    connection: &Connection,
    what: &str,
    request: &Req,
    timeout: Duration,
    send: F,
) -> Result<Result<T, E>, tonic::Status>
where
    Req: serde::Serialize,
    T: serde::de::DeserializeOwned,
    E: serde::de::DeserializeOwned,
    F: FnOnce(ClusterClient, tonic::Request<vesper_proto::v1::RaftPayload>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<vesper_proto::v1::RaftPayload>, tonic::Status>>,
{
    let client = connection.clients.client(&connection.address)?;
    let mut grpc_request = tonic::Request::new(codec::payload(what, request)?);
    grpc_request.set_timeout(timeout);
    grpc_request.metadata_mut().insert(
        TARGET_NODE_HEADER,
        tonic::metadata::MetadataValue::from(connection.target),
    );
    let reply = send(client, grpc_request).await?.into_inner();
    codec::from_payload(what, &reply)
}

impl RaftNetworkV2<TypeConfig> for Connection {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let result: Result<_, openraft::errors::RaftError<TypeConfig>> = call(
            self,
            "append entries",
            &rpc,
            option.soft_ttl(),
            |mut client, request| async move { client.append_entries(request).await },
        )
        .await
        .map_err(rpc_error)?;
        result.map_err(|error| RPCError::Network(NetworkError::new(&error)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let result: Result<_, openraft::errors::RaftError<TypeConfig>> = call(
            self,
            "vote",
            &rpc,
            option.soft_ttl(),
            |mut client, request| async move { client.vote(request).await },
        )
        .await
        .map_err(rpc_error)?;
        result.map_err(|error| RPCError::Network(NetworkError::new(&error)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // openraft's hard deadline for this call is install_snapshot_timeout, meant for one chunk; a whole
        // snapshot gets its own, longer deadline.
        let request: (Vote, SnapshotMeta, Vec<u8>) = (vote, snapshot.meta, snapshot.snapshot);
        let send = call(
            self,
            "snapshot",
            &request,
            SNAPSHOT_TIMEOUT,
            |mut client, request| async move { client.install_snapshot(request).await },
        );
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = send => {
                let result: Result<SnapshotResponse<TypeConfig>, openraft::errors::Fatal<TypeConfig>> =
                    result.map_err(|status| StreamingError::from(rpc_error(status)))?;
                result.map_err(|fatal| StreamingError::Network(NetworkError::new(&fatal)))
            }
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let result: Result<_, openraft::errors::Fatal<TypeConfig>> = call(
            self,
            "transfer leader",
            &req,
            option.soft_ttl(),
            |mut client, request| async move { client.transfer_leader(request).await },
        )
        .await
        .map_err(rpc_error)?;
        result.map_err(|error| RPCError::Network(NetworkError::new(&error)))
    }
}

impl Connection {
    /// The node this connection talks to (for logs).
    pub fn target(&self) -> u64 {
        self.target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: Option<&str>) -> tonic::metadata::MetadataMap {
        let mut map = tonic::metadata::MetadataMap::new();
        if let Some(value) = value {
            map.insert(TARGET_NODE_HEADER, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn a_raft_call_for_another_node_is_refused() {
        assert!(check_target(&metadata(Some("7")), 7).is_ok());
        assert!(check_target(&metadata(None), 7).is_ok(), "older senders");
        let replaced = check_target(&metadata(Some("1")), 6)
            .unwrap_err()
            .into_status();
        assert_eq!(replaced.code(), Code::FailedPrecondition);
        assert!(
            replaced
                .message()
                .contains("for node 1, but this is node 6"),
            "{replaced:?}"
        );
        let garbage = check_target(&metadata(Some("one")), 6)
            .unwrap_err()
            .into_status();
        assert_eq!(garbage.code(), Code::InvalidArgument);
    }
}
