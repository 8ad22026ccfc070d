//! A hand-driven leaf session, for tests that must send what the `leafpeer` library would refuse to send
//! (oversized records, bad signatures, calls without a session).

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use vesper_proto::session::attach_message;
use vesper_proto::v1::leaf_client::LeafClient;
use vesper_proto::v1::{client_frame, server_frame, Attach, ClientFrame, ServerFrame};
use vesper_proto::{Keypair, SESSION_METADATA_KEY};

/// How to answer the challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signing {
    /// Sign correctly.
    Valid,
    /// Flip a bit of the signature.
    Corrupt,
    /// Sign a different nonce.
    WrongNonce,
}

/// A TLS channel to a Leaf service.
pub async fn channel(address: &str, ca_pem: &[u8]) -> anyhow::Result<Channel> {
    channel_from(address, ca_pem, None).await
}

/// A TLS channel to a Leaf service from the local address `source` (e.g. 127.0.0.4, to look like another host).
pub async fn channel_from(
    address: &str,
    ca_pem: &[u8],
    source: Option<std::net::IpAddr>,
) -> anyhow::Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("127.0.0.1");
    Ok(Endpoint::from_shared(format!("https://{address}"))?
        .local_address(source)
        .tls_config(tls)?
        .connect()
        .await?)
}

/// An open raw session: the client, its token and the stream halves that keep it alive (frames to send on the
/// session go into `outbound`; what the super peer pushes arrives on `inbound`).
pub struct RawSession {
    pub client: LeafClient<Channel>,
    pub token: String,
    pub outbound: mpsc::Sender<ClientFrame>,
    pub inbound: tonic::Streaming<ServerFrame>,
    /// What the super peer said when the session was accepted.
    pub welcome: vesper_proto::v1::Welcome,
}

impl RawSession {
    /// The next frame that answers or pushes something to this session, waiting up to `timeout`. Pongs and
    /// `MemberUpdate`s are skipped: the super peer sends those on its own at any time (a member update, for
    /// one, whenever the serving set changes, as it does while a test cluster is still forming).
    pub async fn next_frame(
        &mut self,
        timeout: std::time::Duration,
    ) -> anyhow::Result<server_frame::Frame> {
        loop {
            let frame = tokio::time::timeout(timeout, self.inbound.message())
                .await
                .map_err(|_| anyhow::anyhow!("no frame within {timeout:?}"))??
                .ok_or_else(|| anyhow::anyhow!("session stream ended"))?;
            match frame.frame {
                Some(server_frame::Frame::Pong(_))
                | Some(server_frame::Frame::MemberUpdate(_))
                | None => {}
                Some(frame) => return Ok(frame),
            }
        }
    }

    /// A request carrying this session's token.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        with_token(message, &self.token)
    }

    /// Reads record `namespace`/`key` (linearizable) through this session; `None` when it does not exist.
    pub async fn record(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<vesper_proto::v1::Record>, tonic::Status> {
        let request = vesper_proto::v1::GetRecordRequest {
            namespace: namespace.into(),
            key: key.into(),
            consistency: 0,
        };
        Ok(self
            .client
            .clone()
            .get_record(self.request(request))
            .await?
            .into_inner()
            .record)
    }
}

/// A request carrying `token` as its session.
pub fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value: MetadataValue<_> = token.parse().expect("token is ASCII");
    request.metadata_mut().insert(SESSION_METADATA_KEY, value);
    request
}

/// Opens a session, answering the challenge as `signing` says and naming this build's protocol range, as the
/// library does. Returns the status the server ended the session with, if it refused.
pub async fn open(
    channel: Channel,
    keypair: &Keypair,
    signing: Signing,
) -> Result<RawSession, tonic::Status> {
    let ours = vesper_proto::version::OURS;
    open_with(channel, keypair, signing, (ours.oldest, ours.newest)).await
}

/// As [`open`], naming `protocol` (oldest, newest) in the attach, as it is sent: (0, 0) names none.
pub async fn open_with(
    channel: Channel,
    keypair: &Keypair,
    signing: Signing,
    protocol: (u32, u32),
) -> Result<RawSession, tonic::Status> {
    let mut client = LeafClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    let Some(ServerFrame {
        frame: Some(server_frame::Frame::Challenge(challenge)),
    }) = inbound.message().await?
    else {
        return Err(tonic::Status::internal("no challenge"));
    };
    let nonce = match signing {
        Signing::WrongNonce => vec![0u8; challenge.nonce.len()],
        _ => challenge.nonce.clone(),
    };
    let mut signature = keypair.sign(&attach_message(&nonce, &challenge.server_peer_id));
    if signing == Signing::Corrupt {
        signature[0] ^= 1;
    }
    let attach = ClientFrame {
        frame: Some(client_frame::Frame::Attach(Attach {
            public_key: keypair.peer_id().as_bytes().to_vec(),
            signature: signature.to_vec(),
            protocol_oldest: protocol.0,
            protocol_newest: protocol.1,
            without_presence: false,
        })),
    };
    tx.send(attach)
        .await
        .map_err(|_| tonic::Status::internal("session closed"))?;
    match inbound.message().await? {
        Some(ServerFrame {
            frame: Some(server_frame::Frame::Welcome(welcome)),
        }) => Ok(RawSession {
            client,
            token: welcome.session_token.clone(),
            outbound: tx,
            inbound,
            welcome,
        }),
        other => Err(tonic::Status::internal(format!(
            "unexpected frame {other:?}"
        ))),
    }
}

/// A codec that sends a request body as given (already-encoded protobuf, possibly malformed on purpose) and
/// decodes the answer as `T`.
struct BytesCodec<T>(std::marker::PhantomData<T>);

struct BytesEncoder;

struct AnswerDecoder<T>(std::marker::PhantomData<T>);

impl tonic::codec::Encoder for BytesEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl<T: prost::Message + Default> tonic::codec::Decoder for AnswerDecoder<T> {
    type Item = T;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<T>, tonic::Status> {
        T::decode(src)
            .map(Some)
            .map_err(|error| tonic::Status::internal(format!("answer does not decode: {error}")))
    }
}

impl<T: prost::Message + Default + Send + 'static> tonic::codec::Codec for BytesCodec<T> {
    type Encode = Vec<u8>;
    type Decode = T;
    type Encoder = BytesEncoder;
    type Decoder = AnswerDecoder<T>;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> AnswerDecoder<T> {
        AnswerDecoder(std::marker::PhantomData)
    }
}

/// Calls the unary method at `path` (`/vesper.v1.Leaf/PutRecord`) with `body` as the request's encoded bytes.
pub async fn unary_bytes<T: prost::Message + Default + Send + 'static>(
    channel: Channel,
    path: &'static str,
    body: Vec<u8>,
    token: Option<&str>,
) -> Result<T, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    let request = match token {
        Some(token) => with_token(body, token),
        None => tonic::Request::new(body),
    };
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary(request, path, BytesCodec(std::marker::PhantomData))
        .await
        .map(tonic::Response::into_inner)
}
