//! What the Leaf handle and its tasks share, by concern: the attachment (the current connection, the super
//! peers known, re-attach times), messaging (the app's handlers and streams, the sends in flight), presence
//! (update order, the last NAT report), peer connections (policy, accepted offers, the app's stream), the
//! watches, and the token and tracker every task of the leaf runs under.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use vesper_proto::v1::leaf_client::LeafClient;
use vesper_proto::v1::{ClientFrame, Message, SendResult};
use vesper_proto::{validate, SESSION_METADATA_KEY};

use super::seen::SeenMessages;
use super::watches::WatchRegistry;
use super::{ConnectPolicy, Handlers, LeafConfig};

/// A live attachment: what calls need.
#[derive(Clone)]
pub struct Connection {
    pub client: LeafClient<Channel>,
    pub token: MetadataValue<Ascii>,
    pub server: String,
    pub outbound: mpsc::Sender<ClientFrame>,
}

impl Connection {
    /// A request on this session: `body` with the session token every unary call of the Leaf service needs
    /// (callers set the deadline).
    pub fn request<T>(&self, body: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(body);
        request
            .metadata_mut()
            .insert(SESSION_METADATA_KEY, self.token.clone());
        request
    }
}

/// State shared by the Leaf handle and its supervisor.
pub struct Shared {
    pub config: LeafConfig,
    pub attachment: Attachment,
    pub messaging: Messaging,
    pub presence: PresenceState,
    pub peers: PeerLinks,
    pub watches: WatchRegistry,
    /// Cancels every task of the leaf (`close`, `detach`, the last handle dropped, or a super peer ending the
    /// session for good).
    pub stop: CancellationToken,
    /// Why a super peer ended the session for good (the peer attached too many sessions elsewhere), if it did.
    pub ended: std::sync::OnceLock<String>,
    /// Every task of the leaf, so that none outlives it unseen.
    pub tasks: TaskTracker,
    /// What the leaf counts about itself (`Leaf::metrics`).
    pub metrics: super::metrics::LeafMetrics,
}

impl Shared {
    /// Runs `task` on the leaf's tracker until it ends or the leaf stops.
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                biased;
                _ = stop.cancelled() => {}
                _ = task => {}
            }
        });
    }
}

/// Which super peer the leaf is attached to, and which it could attach to.
pub struct Attachment {
    /// The current connection; None while re-attaching.
    pub connection: watch::Sender<Option<Arc<Connection>>>,
    /// Leaf addresses of super peers known to be members (seeds first, then what welcomes said).
    pub known: RwLock<Vec<String>>,
    /// How long each re-attach took, for apps and tests that want to know.
    pub reattach_times: Mutex<Vec<Duration>>,
}

impl Attachment {
    /// Not attached yet; `seeds` are the super peers known so far.
    pub fn new(seeds: Vec<String>) -> Self {
        Self {
            connection: watch::channel(None).0,
            known: RwLock::new(seeds),
            reattach_times: Default::default(),
        }
    }

    /// The current connection, if attached.
    pub fn current(&self) -> Option<Arc<Connection>> {
        self.connection.borrow().clone()
    }
}

/// Messages both ways: received ones on their way to the app, sends waiting for their results.
pub struct Messaging {
    pub handlers: Handlers,
    pub inbox: mpsc::Sender<Message>,
    pub seen: Mutex<SeenMessages>,
    /// Pipelined sends waiting for their SendResult, by request id. Cleared when a session ends, which fails
    /// them (the sender retries them, with the same message id, on the next session).
    pub pending_sends: Mutex<foldhash::HashMap<u64, oneshot::Sender<SendResult>>>,
    /// One permit per send in flight, up to the super peer's limit (`validate::MAX_SENDS_IN_FLIGHT`): past it a
    /// send waits here for one to finish instead of being refused.
    pub send_permits: tokio::sync::Semaphore,
    /// One permit per byte of payload in flight, up to the super peer's limit
    /// (`validate::MAX_SEND_BYTES_IN_FLIGHT`), held back the same way.
    pub send_bytes: tokio::sync::Semaphore,
    pub next_request: std::sync::atomic::AtomicU64,
    /// Messages received and not yet acknowledged (waiting in a lane, for the stream or for a handler):
    /// a goodbye waits for this to reach zero, so that it does not overtake acknowledgements.
    pub unacknowledged: tokio::sync::watch::Sender<usize>,
}

impl Messaging {
    /// Messaging whose stream lane puts messages without a handler on `inbox`.
    pub fn new(inbox: mpsc::Sender<Message>) -> Self {
        Self {
            handlers: Handlers::default(),
            inbox,
            seen: Default::default(),
            pending_sends: Default::default(),
            send_permits: tokio::sync::Semaphore::new(validate::MAX_SENDS_IN_FLIGHT),
            send_bytes: tokio::sync::Semaphore::new(validate::MAX_SEND_BYTES_IN_FLIGHT),
            next_request: Default::default(),
            unacknowledged: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// This leaf's presence updates and what it published about its reachability.
#[derive(Default)]
pub struct PresenceState {
    /// Last sequence number given to a presence update (SetPresence or PublishEndpoints); the super peer
    /// refuses an update whose number is not above the previous one of its session, so replays change nothing.
    pub sequence: std::sync::atomic::AtomicU64,
    /// Held across a SetPresence call so that concurrent calls reach the super peer in sequence order.
    pub order: tokio::sync::Mutex<()>,
    /// What the last endpoint discovery found.
    pub nat: Mutex<Option<crate::nat::NatReport>>,
}

impl PresenceState {
    /// The sequence number for the next presence update.
    pub fn next_sequence(&self) -> u64 {
        self.sequence
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }
}

/// Connections other peers offer this leaf.
pub struct PeerLinks {
    /// Decides whether to accept a connection offer from a peer; none refuses every offer.
    pub policy: RwLock<Option<ConnectPolicy>>,
    /// Sockets measured for accepted offers, waiting for their punch plans, by offer id.
    pub pending_accepts: Mutex<HashMap<String, crate::p2p::PreparedSocket>>,
    /// Accepted connections for the app.
    pub incoming: mpsc::Sender<crate::p2p::PeerConnection>,
}

impl PeerLinks {
    /// No policy yet (every offer refused); accepted connections go to `incoming`.
    pub fn new(incoming: mpsc::Sender<crate::p2p::PeerConnection>) -> Self {
        Self {
            policy: Default::default(),
            pending_accepts: Default::default(),
            incoming,
        }
    }
}
