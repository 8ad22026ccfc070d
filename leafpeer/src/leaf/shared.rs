//! What the Leaf handle and its tasks share: the current connection, the app's handlers and streams, the sends in
//! flight, and the token and tracker every task of the leaf runs under.

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

use super::seen::SeenMessages;
use super::watches::WatchRegistry;
use super::{Handlers, LeafConfig};

/// A live attachment: what calls need.
#[derive(Clone)]
pub struct Connection {
    pub client: LeafClient<Channel>,
    pub token: MetadataValue<Ascii>,
    pub server: String,
    pub outbound: mpsc::Sender<ClientFrame>,
}

/// State shared by the Leaf handle and its supervisor.
pub struct Shared {
    pub config: LeafConfig,
    /// The current connection; None while re-attaching.
    pub connection: watch::Sender<Option<Arc<Connection>>>,
    /// Leaf addresses of super peers known to be members (seeds first, then what welcomes said).
    pub known: RwLock<Vec<String>>,
    pub handlers: Handlers,
    /// Received messages for the dispatcher, which hands them to handlers or the stream and acknowledges them.
    pub dispatch: mpsc::Sender<Arrival>,
    pub inbox: mpsc::Sender<Message>,
    pub watches: WatchRegistry,
    pub seen: Mutex<SeenMessages>,
    /// How long each re-attach took, for apps and tests that want to know.
    pub reattach_times: Mutex<Vec<Duration>>,
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
    /// Last sequence number given to a presence update (SetPresence or PublishEndpoints); the super peer
    /// refuses an update whose number is not above the previous one of its session, so replays change nothing.
    pub presence_sequence: std::sync::atomic::AtomicU64,
    /// Held across a SetPresence call so that concurrent calls reach the super peer in sequence order.
    pub presence_order: tokio::sync::Mutex<()>,
    /// What the last endpoint discovery found.
    pub nat: Mutex<Option<crate::nat::NatReport>>,
    /// Decides whether to accept a connection offer from a peer; none refuses every offer.
    pub connect_policy: RwLock<Option<super::ConnectPolicy>>,
    /// Sockets measured for accepted offers, waiting for their punch plans, by offer id.
    pub pending_accepts: Mutex<HashMap<String, crate::p2p::PreparedSocket>>,
    /// Accepted connections for the app.
    pub incoming: mpsc::Sender<crate::p2p::PeerConnection>,
    /// Cancels every task of the leaf (`close`, `detach`, or the last handle dropped).
    pub stop: CancellationToken,
    /// Every task of the leaf, so that none outlives it unseen.
    pub tasks: TaskTracker,
}

impl Shared {
    /// The sequence number for the next presence update.
    pub fn next_presence_sequence(&self) -> u64 {
        self.presence_sequence
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    pub fn current(&self) -> Option<Arc<Connection>> {
        self.connection.borrow().clone()
    }

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

/// The messages of one frame, as the read loop received them.
pub struct Arrival {
    /// The session that delivered them, which their acknowledgements go back on.
    pub connection: Arc<Connection>,
    /// Each message, with false when the app already has it (a retry to acknowledge only).
    pub messages: Vec<(Message, bool)>,
}
