//! What the Leaf service's calls and session tasks use: a handful of narrow handles, not the node.

use tokio_util::task::TaskTracker;

use crate::command::NodeInfo;
use crate::config::Config;
use crate::events::EventLog;
use crate::replica::Replica;
use crate::router::Router;
use crate::sessions::SessionRegistry;

/// The handles of the Leaf service, shared by its calls and session tasks.
pub struct LeafState {
    pub config: Config,
    /// This node's identity and advertised addresses.
    pub me: NodeInfo,
    /// Proposals, read barriers and the member view.
    pub replica: Replica,
    /// Reaches a leaf's session wherever it is attached.
    pub router: Router,
    /// The sessions attached here (tokens, rates, sequences).
    pub sessions: SessionRegistry,
    /// Changes applied here, for watches.
    pub events: EventLog,
    /// Work a call starts and does not wait for (sends answered on the session), ended at shutdown.
    pub tasks: TaskTracker,
    /// Offers to serve as a super peer from leaves attached here.
    pub offers: crate::placement::offers::Offers,
    /// The member list sessions push to their leaves (`leaf::members`).
    pub members: tokio::sync::watch::Receiver<std::sync::Arc<crate::leaf::members::MemberView>>,
    /// Counts sessions attached and refused.
    pub session_metrics: crate::metrics::SessionMetrics,
    /// Counts messages by the path they took.
    pub message_metrics: crate::metrics::MessageMetrics,
    /// Counts record writes by result.
    pub record_metrics: crate::metrics::RecordMetrics,
    /// Counts brokered connections by NAT pair and plan.
    pub connection_metrics: crate::metrics::ConnectionMetrics,
}
