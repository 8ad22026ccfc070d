//! The ops HTTP server: plaintext HTTP/1.1 on its own port, for orchestrators and monitoring that cannot present
//! the cluster's client certificates. Everything it serves is read-only and carries no message payloads,
//! record keys or values.
//!
//! | Path       | Answer |
//! |------------|--------|
//! | `/`        | the status page ([`super::status`]): members, health, placement, refreshed every second |
//! | `/api/v1/cluster` | the JSON behind the page |
//! | `/api/v1/sessions` | this node's sessions, paged and sortable ([`super::sessions`]) |
//! | `/api/v1/connectivity` | sessions per super peer and peers by NAT class, cluster-wide |
//! | `/livez`   | `200 ok` while the process answers; never depends on quorum |
//! | `/readyz`  | `200 ready` or `503` with the reason ([`super::ready`]) |
//! | `/metrics` | OpenMetrics text when asked for (Prometheus asks), else the classic text format 0.0.4 ([`crate::metrics`]) |

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use openraft::async_runtime::WatchReceiver;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::ready::{readiness, ReadyInputs};
use super::sessions::SessionsQuery;
use crate::metrics::{Metrics, Sample};
use crate::replica::Replica;
use crate::sessions::SessionRegistry;
use crate::udp::Relay;

/// What the ops endpoints read: narrow handles, no services.
#[derive(Clone)]
pub struct OpsState {
    pub replica: Replica,
    pub sessions: SessionRegistry,
    pub relay: Relay,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the node starts shutting down.
    pub shutdown: CancellationToken,
    /// Cancelled when the node starts draining (SIGTERM), before it shuts down.
    pub draining: CancellationToken,
    /// Entries behind the cluster's commit index at which the node stops being ready.
    pub ready_max_lag: u64,
    /// The leader's view of the members, shared by every viewer of the status page.
    pub leader_view: Arc<super::status::LeaderView>,
    /// The last scan of the presence table, shared by every viewer.
    pub census: Arc<super::sessions::CensusCache>,
}

/// The content type of the OpenMetrics text exposition.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the classic Prometheus text exposition.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

impl OpsState {
    /// The node's state as the sampled gauges and readiness need it.
    fn sample(&self) -> Sample {
        let (relay_allocations, relay_capacity) = self.relay.load();
        let db = self.replica.reader().db();
        // RocksDB's key estimate: no scan, so a scrape costs the same with a million messages queued.
        let mailbox_messages = db
            .property_int_value_cf(
                crate::store::cf(db, crate::store::CF_MAILBOX),
                "rocksdb.estimate-num-keys",
            )
            .ok()
            .flatten()
            .unwrap_or(0);
        let mut sample = Sample {
            sessions: self.sessions.len() as u64,
            relay_allocations: relay_allocations as u64,
            relay_capacity: relay_capacity as u64,
            mailbox_messages,
            ..Sample::default()
        };
        let Ok(raft) = self.replica.raft() else {
            return sample;
        };
        let metrics = raft.metrics().borrow_watched().clone();
        let index =
            |log_id: &Option<crate::raft_types::LogId>| log_id.as_ref().map_or(0, |id| id.index);
        sample.in_cluster = true;
        sample.node_id = Some(metrics.id);
        sample.leader = metrics.current_leader;
        sample.term = metrics.current_term;
        sample.last_log_index = metrics.last_log_index.unwrap_or(0);
        sample.cluster_committed = metrics.cluster_committed.as_ref().map(|id| id.index);
        sample.commit_index =
            index(&metrics.cluster_committed).max(index(&metrics.local_committed));
        sample.applied_index = index(&metrics.last_applied);
        sample.snapshot_index = index(&metrics.snapshot);
        let membership = metrics.membership_config.membership();
        sample.voters = membership.voter_ids().count() as u64;
        sample.is_voter = membership.voter_ids().any(|id| id == metrics.id);
        sample.standbys = membership.learner_ids().count() as u64;
        if let Some(replication) = &metrics.replication {
            sample.replication = replication
                .iter()
                .filter(|(peer, _)| **peer != metrics.id)
                .map(|(peer, matched)| (*peer, index(matched)))
                .collect();
        }
        sample.quorum_ack_age = metrics
            .last_quorum_acked
            .as_ref()
            .map(|acked| openraft::Instant::elapsed(&**acked));
        sample
    }

    fn ready_inputs(&self, sample: &Sample) -> ReadyInputs {
        ReadyInputs {
            in_cluster: sample.in_cluster,
            draining: self.shutdown.is_cancelled() || self.draining.is_cancelled(),
            leader: sample.leader,
            cluster_committed: sample.cluster_committed,
            applied: sample.applied_index,
            max_lag: self.ready_max_lag,
        }
    }
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<OpsState>) -> Response {
    let sample = state.sample();
    match readiness(&state.ready_inputs(&sample)) {
        Ok(()) => (
            StatusCode::OK,
            format!("ready (applied {})\n", sample.applied_index),
        )
            .into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

/// `/metrics`: OpenMetrics when the client asks for it (Prometheus does), the classic text format otherwise.
async fn metrics(State(state): State<OpsState>, headers: HeaderMap) -> Response {
    state.metrics.sample(&state.sample());
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (
            [(header::CONTENT_TYPE, OPENMETRICS)],
            state.metrics.encode(),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
            state.metrics.encode_prometheus_text(),
        )
            .into_response()
    }
}

async fn not_found() -> (StatusCode, &'static str) {
    (
        StatusCode::NOT_FOUND,
        "not found: the ops port serves /, /api/v1/cluster, /api/v1/sessions, /api/v1/connectivity, /livez, \
         /readyz and /metrics\n",
    )
}

fn json_response(body: &impl serde::Serialize) -> Response {
    match serde_json::to_string(body) {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
    }
}

/// `/api/v1/sessions?offset=&limit=&sort=`.
async fn sessions(
    State(state): State<OpsState>,
    query: Result<Query<SessionsQuery>, QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(rejection) => {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "{}; the parameters are offset, limit (1-{}) and sort (attached, peer, pending, pushed, acked)\n",
                    rejection.body_text(),
                    super::sessions::MAX_LIMIT
                ),
            )
                .into_response()
        }
    };
    let page = match super::sessions::page(state.sessions.entries(), &query) {
        Ok(page) => page,
        Err(error) => return (StatusCode::BAD_REQUEST, format!("{error}\n")).into_response(),
    };
    let reader = state.replica.reader().clone();
    let rows = page
        .sessions
        .into_iter()
        .map(|session| {
            let nat_class = session
                .peer_id
                .parse::<vesper_proto::PeerId>()
                .ok()
                .filter(|_| session.listed)
                .and_then(|peer| crate::store::presence::get(reader.db(), peer.as_bytes()).ok())
                .flatten()
                .map(|entry| entry.nat_class)
                .unwrap_or_default();
            super::sessions::SessionRow { session, nat_class }
        })
        .collect::<Vec<_>>();
    json_response(&serde_json::json!({
        "total": page.total,
        "offset": page.offset,
        "limit": page.limit,
        "sort": page.sort,
        "sessions": rows,
    }))
}

/// `/api/v1/connectivity`.
async fn connectivity(State(state): State<OpsState>) -> Response {
    let (relay_active, relay_capacity) = state.relay.load();
    match state.census.get(state.replica.reader().clone()).await {
        Ok(census) => json_response(&serde_json::json!({
            "sessions_here": state.sessions.len(),
            "sessions_by_node": census.sessions_by_node,
            "peers_online": census.peers_online,
            "peers_by_nat_class": census.peers_by_nat_class,
            "relay_active": relay_active,
            "relay_capacity": relay_capacity,
            "refreshed_every_seconds": super::sessions::CONNECTIVITY_TTL.as_secs(),
        })),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the presence table: {error}\n"),
        )
            .into_response(),
    }
}

async fn page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        super::status::PAGE,
    )
        .into_response()
}

async fn cluster(State(state): State<OpsState>) -> Response {
    let sample = state.sample();
    let ready = readiness(&state.ready_inputs(&sample));
    let local = state.replica.members().unwrap_or_default();
    let leader_view = if sample.in_cluster {
        Some(state.leader_view.get().await)
    } else {
        None
    };
    let leader = leader_view.as_deref().and_then(|view| view.as_ref().ok());
    let body = serde_json::json!({
        "node": {
            "node_id": sample.node_id,
            "in_cluster": sample.in_cluster,
            "leader_id": sample.leader,
            "term": sample.term,
            "applied_index": sample.applied_index,
            "commit_index": sample.commit_index,
            "sessions": sample.sessions,
            "relay_active": sample.relay_allocations,
            "relay_capacity": sample.relay_capacity,
            "ready": ready.is_ok(),
            "ready_reason": ready.err().map(|reason| reason.to_string()),
        },
        "members": super::status::members(&local, leader),
        "placement": leader.map(super::status::placement),
        "leader_view_error": leader_view
            .as_deref()
            .and_then(|view| view.as_ref().err().cloned()),
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The router of the ops port.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/sessions", get(sessions))
        .route("/api/v1/connectivity", get(connectivity))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// Serves the ops port until `shutdown` is cancelled. Keeps answering `/livez` while the rest of the node
/// drains: it stops with the node's tasks, not before them.
pub async fn serve(
    listener: TcpListener,
    state: OpsState,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let refused = state.metrics.ops_refused();
    axum::serve(
        super::listener::Capped::new(listener, refused),
        router(state),
    )
    .with_graceful_shutdown(stop.cancelled_owned())
    .await
}
