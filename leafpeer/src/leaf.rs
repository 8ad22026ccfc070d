//! The `Leaf` handle.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use vesper_proto::session::attach_message;
use vesper_proto::v1::leaf_client::LeafClient;
use vesper_proto::v1::{
    client_frame, search_term, server_frame, Attach, ClientFrame, DeleteRecordRequest,
    GetRecordRequest, ListRecordsRequest, Member, Ping, PutRecordRequest, ReadConsistency, Record,
    SearchRecordsRequest,
};
use vesper_proto::{validate, Keypair, PeerId, SESSION_METADATA_KEY};

use crate::error::LeafError;

/// Frames queued towards the super peer on the session stream (keepalives only, so a few suffice).
const SESSION_OUTBOUND_QUEUE: usize = 8;

/// How a leaf is set up.
#[derive(Clone)]
pub struct LeafConfig {
    /// Leaf service addresses (host:port) of super peers to try, in order.
    pub seeds: Vec<String>,
    /// PEM of the cluster CA that issued the super peers' certificates.
    pub ca_cert_pem: Vec<u8>,
    /// The leaf's identity.
    pub keypair: Keypair,
    /// Deadline for connecting and attaching to one super peer. Default 5 s.
    pub connect_timeout: Duration,
    /// Deadline of each call. Default 15 s (a write waits for a leader after a failover).
    pub request_timeout: Duration,
}

impl LeafConfig {
    /// A configuration with default timeouts.
    pub fn new(seeds: Vec<String>, ca_cert_pem: Vec<u8>, keypair: Keypair) -> Self {
        Self {
            seeds,
            ca_cert_pem,
            keypair,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
        }
    }
}

/// Read consistency of a get, list or search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Reflects every write acknowledged before the read started.
    #[default]
    Linearizable,
    /// Served at once by the attached super peer's replica; may lag.
    Stale,
}

impl From<Consistency> for i32 {
    fn from(consistency: Consistency) -> Self {
        match consistency {
            Consistency::Linearizable => ReadConsistency::Linearizable as i32,
            Consistency::Stale => ReadConsistency::Stale as i32,
        }
    }
}

/// One attribute condition of a search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SearchTerm {
    /// The attribute equals the value.
    Equals(String, String),
    /// The attribute starts with the value.
    Prefix(String, String),
}

/// A page of records.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub records: Vec<Record>,
    /// Token for the next page; `None` when there is none.
    pub next_page_token: Option<String>,
    /// Applied index of the replica that served the read.
    pub applied_index: u64,
}

struct Inner {
    client: LeafClient<Channel>,
    token: MetadataValue<tonic::metadata::Ascii>,
    peer_id: PeerId,
    server: String,
    members: Vec<Member>,
    request_timeout: Duration,
    /// Stops the keepalive task (and with it the session) when the Leaf is dropped or closed.
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An attached leaf peer. Cheap to clone; the session ends when the last clone is dropped or `close` is called.
#[derive(Clone)]
pub struct Leaf {
    inner: Arc<Inner>,
}

impl Leaf {
    /// Attaches to the first seed that accepts the session.
    pub async fn connect(config: LeafConfig) -> Result<Leaf, LeafError> {
        if config.seeds.is_empty() {
            return Err(LeafError::Config("no seed super peers given".into()));
        }
        let mut failures = Vec::new();
        for seed in &config.seeds {
            match tokio::time::timeout(config.connect_timeout, attach(&config, seed)).await {
                Ok(Ok(leaf)) => return Ok(leaf),
                Ok(Err(error)) => failures.push(format!("{seed}: {error}")),
                Err(_) => failures.push(format!(
                    "{seed}: no answer within {:?}",
                    config.connect_timeout
                )),
            }
        }
        Err(LeafError::Unreachable(failures))
    }

    /// This leaf's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// Leaf address of the super peer this leaf is attached to.
    pub fn server(&self) -> &str {
        &self.inner.server
    }

    /// The super peers known when the session opened.
    pub fn members(&self) -> &[Member] {
        &self.inner.members
    }

    /// Ends the session.
    pub fn close(&self) {
        self.inner.stop.cancel();
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert(SESSION_METADATA_KEY, self.inner.token.clone());
        request.set_timeout(self.inner.request_timeout);
        request
    }

    /// Creates or replaces the record `namespace/key`, owned by this leaf. With `expected_version`, the put
    /// succeeds only if the record's current version is that (0: the record must not exist).
    pub async fn put(
        &self,
        namespace: &str,
        key: &str,
        attributes: HashMap<String, String>,
        value: Vec<u8>,
        expected_version: Option<u64>,
    ) -> Result<Record, LeafError> {
        validate::record(namespace, key, &attributes, &value)?;
        let request = self.request(PutRecordRequest {
            namespace: namespace.into(),
            key: key.into(),
            attributes,
            value,
            expected_version,
        });
        let reply = self
            .inner
            .client
            .clone()
            .put_record(request)
            .await?
            .into_inner();
        reply
            .record
            .ok_or_else(|| LeafError::SessionClosed("put answered without a record".into()))
    }

    /// Reads the record `namespace/key`.
    pub async fn get(
        &self,
        namespace: &str,
        key: &str,
        consistency: Consistency,
    ) -> Result<Option<Record>, LeafError> {
        let request = self.request(GetRecordRequest {
            namespace: namespace.into(),
            key: key.into(),
            consistency: consistency.into(),
        });
        Ok(self
            .inner
            .client
            .clone()
            .get_record(request)
            .await?
            .into_inner()
            .record)
    }

    /// Deletes the record `namespace/key`; returns whether there was one.
    pub async fn delete(
        &self,
        namespace: &str,
        key: &str,
        expected_version: Option<u64>,
    ) -> Result<bool, LeafError> {
        let request = self.request(DeleteRecordRequest {
            namespace: namespace.into(),
            key: key.into(),
            expected_version,
        });
        Ok(self
            .inner
            .client
            .clone()
            .delete_record(request)
            .await?
            .into_inner()
            .deleted)
    }

    /// Lists records of `namespace` whose key starts with `key_prefix`, one page at a time.
    pub async fn list(
        &self,
        namespace: &str,
        key_prefix: &str,
        limit: u32,
        page_token: Option<String>,
        consistency: Consistency,
    ) -> Result<Page, LeafError> {
        let request = self.request(ListRecordsRequest {
            namespace: namespace.into(),
            key_prefix: key_prefix.into(),
            limit,
            page_token: page_token.unwrap_or_default(),
            consistency: consistency.into(),
        });
        let reply = self
            .inner
            .client
            .clone()
            .list_records(request)
            .await?
            .into_inner();
        Ok(Page {
            records: reply.records,
            next_page_token: (!reply.next_page_token.is_empty()).then_some(reply.next_page_token),
            applied_index: reply.applied_index,
        })
    }

    /// Searches `namespace` for records matching every term, one page at a time.
    pub async fn search(
        &self,
        namespace: &str,
        terms: &[SearchTerm],
        limit: u32,
        page_token: Option<String>,
        consistency: Consistency,
    ) -> Result<Page, LeafError> {
        let terms = terms
            .iter()
            .map(|term| match term {
                SearchTerm::Equals(attribute, value) => vesper_proto::v1::SearchTerm {
                    attribute: attribute.clone(),
                    condition: Some(search_term::Condition::Equals(value.clone())),
                },
                SearchTerm::Prefix(attribute, prefix) => vesper_proto::v1::SearchTerm {
                    attribute: attribute.clone(),
                    condition: Some(search_term::Condition::Prefix(prefix.clone())),
                },
            })
            .collect();
        let request = self.request(SearchRecordsRequest {
            namespace: namespace.into(),
            terms,
            limit,
            page_token: page_token.unwrap_or_default(),
            consistency: consistency.into(),
        });
        let reply = self
            .inner
            .client
            .clone()
            .search_records(request)
            .await?
            .into_inner();
        Ok(Page {
            records: reply.records,
            next_page_token: (!reply.next_page_token.is_empty()).then_some(reply.next_page_token),
            applied_index: reply.applied_index,
        })
    }
}

fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Connects to `seed`, runs the challenge/attach exchange and starts the keepalive task.
async fn attach(config: &LeafConfig, seed: &str) -> Result<Leaf, LeafError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&config.ca_cert_pem))
        .domain_name(host_of(seed));
    let channel = Endpoint::from_shared(format!("https://{seed}"))
        .map_err(|error| LeafError::Config(format!("bad seed address {seed:?}: {error}")))?
        .tcp_nodelay(true)
        .connect_timeout(config.connect_timeout)
        .tls_config(tls)
        .map_err(|error| LeafError::Config(format!("tls: {error}")))?
        .connect()
        .await
        .map_err(|error| LeafError::Unreachable(vec![format!("{seed}: {error}")]))?;
    let mut client = LeafClient::new(channel);
    let (tx, rx) = mpsc::channel(SESSION_OUTBOUND_QUEUE);
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    let challenge = match inbound.message().await? {
        Some(vesper_proto::v1::ServerFrame {
            frame: Some(server_frame::Frame::Challenge(challenge)),
        }) => challenge,
        other => {
            return Err(LeafError::SessionClosed(format!(
                "expected a challenge, got {other:?}"
            )))
        }
    };
    let signature = config
        .keypair
        .sign(&attach_message(&challenge.nonce, &challenge.server_peer_id));
    let attach = ClientFrame {
        frame: Some(client_frame::Frame::Attach(Attach {
            public_key: config.keypair.peer_id().as_bytes().to_vec(),
            signature: signature.to_vec(),
        })),
    };
    tx.send(attach)
        .await
        .map_err(|_| LeafError::SessionClosed("the super peer closed the session".into()))?;
    let welcome = match inbound.message().await? {
        Some(vesper_proto::v1::ServerFrame {
            frame: Some(server_frame::Frame::Welcome(welcome)),
        }) => welcome,
        other => {
            return Err(LeafError::SessionClosed(format!(
                "expected a welcome, got {other:?}"
            )))
        }
    };
    let token = welcome
        .session_token
        .parse()
        .map_err(|_| LeafError::SessionClosed("session token is not valid metadata".into()))?;
    let stop = CancellationToken::new();
    let interval = Duration::from_millis(u64::from(welcome.keepalive_interval_ms.max(100)));
    tokio::spawn(keepalive(tx, inbound, interval, stop.clone()));
    Ok(Leaf {
        inner: Arc::new(Inner {
            client,
            token,
            peer_id: config.keypair.peer_id(),
            server: seed.to_string(),
            members: welcome.members,
            request_timeout: config.request_timeout,
            stop,
        }),
    })
}

/// Pings the super peer every `interval` and reads its frames until the session ends or the leaf stops.
/// The task owns both halves of the stream, so it ends with the session; `stop` ends it from the Leaf side.
async fn keepalive(
    tx: mpsc::Sender<ClientFrame>,
    mut inbound: tonic::Streaming<vesper_proto::v1::ServerFrame>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {
                nonce += 1;
                let ping = ClientFrame { frame: Some(client_frame::Frame::Ping(Ping { nonce })) };
                if tx.send(ping).await.is_err() {
                    break;
                }
            }
            frame = inbound.message() => match frame {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
}
