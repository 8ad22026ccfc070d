//! The session: attaching to a super peer, owning the stream, and failing over.
//!
//! ```text
//!  Supervisor (one task per Leaf) ── attach(seed) ──> Connection { client, token } published to the Leaf
//!     │   reads the stream: messages (deduplicated, handed to their lanes, see `dispatch`), send results,
//!     │   watch events (routed, index kept), connection offers; a keepalive task per session pings meanwhile
//!     └── stream ends without close/detach ──> backoff with jitter ──> attach to another known super peer
//!                                              ──> re-send every watch with resume_after_index = last seen
//! ```
//!
//! The read loop never runs app code: a slow handler or a full stream delays acknowledgements (and, once its
//! lane's queue is full, reading), never keepalives, so the session stays up.
//!
//! While it re-attaches within the super peers' grace period, the peer stays online: watchers see no flap.
//! Messages the old session never acknowledged are redelivered by their senders or the mailbox; the seen-id
//! set, kept across sessions, gives each to the app once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use vesper_proto::session::attach_message;
use vesper_proto::v1::leaf_client::LeafClient;
use vesper_proto::v1::{
    client_frame, server_frame, Attach, ClientFrame, Detach, MemberUpdate, Message, Ping,
    SendResult, ServerFrame, SessionEndReason,
};
use vesper_proto::{validate, version};

use super::dispatch::Lanes;
use super::shared::{Attachment, Connection, Messaging, Shared};
use super::LeafConfig;
use crate::error::LeafError;

/// Frames queued towards the super peer on the session stream (keepalives, acknowledgements, watches, goodbye).
const SESSION_OUTBOUND_QUEUE: usize = 256;
/// First wait before re-attaching; doubles up to `MAX_BACKOFF`, each wait drawn from [d/2, d].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// What an attach gives: the connection, the stream to read, and the member list.
pub struct Attached {
    pub connection: Arc<Connection>,
    pub inbound: tonic::Streaming<ServerFrame>,
    pub members: Vec<vesper_proto::v1::Member>,
    pub keepalive: Duration,
}

/// Connects to `seed` and runs the challenge/attach exchange.
pub async fn attach(config: &LeafConfig, seed: &str) -> Result<Attached, LeafError> {
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
        .map_err(|error| LeafError::Connect(format!("cannot connect: {error}")))?;
    // Answers are bounded by the super peer's page byte budget; requests by its size limits, which it checks
    // (this library checks the protocol ceilings, see `validate::SizeLimits`).
    let mut client = LeafClient::new(channel)
        .max_decoding_message_size(validate::MAX_ANSWER_BYTES)
        .max_encoding_message_size(validate::MAX_ANSWER_BYTES);
    let (tx, rx) = mpsc::channel(SESSION_OUTBOUND_QUEUE);
    let outgoing = super::outgoing::Outgoing::new(rx);
    let mut inbound = client.session(outgoing).await?.into_inner();
    let challenge = match inbound.message().await? {
        Some(ServerFrame {
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
            protocol_oldest: version::OLDEST,
            protocol_newest: version::NEWEST,
            without_presence: !config.claim_presence,
        })),
    };
    tx.send(attach)
        .await
        .map_err(|_| LeafError::SessionClosed("the super peer closed the session".into()))?;
    let welcome = match inbound.message().await? {
        Some(ServerFrame {
            frame: Some(server_frame::Frame::Welcome(welcome)),
        }) => welcome,
        other => {
            return Err(LeafError::SessionClosed(format!(
                "expected a welcome, got {other:?}"
            )))
        }
    };
    // The super peer picks a version both speak; one outside our range is a super peer that does not follow
    // the protocol (or names none: a build from before versions).
    if !version::OURS.holds(welcome.protocol_version) {
        return Err(LeafError::Incompatible(format!(
            "the super peer at {seed} chose protocol {}, this library speaks {}",
            welcome.protocol_version,
            version::OURS
        )));
    }
    let token = welcome
        .session_token
        .parse()
        .map_err(|_| LeafError::SessionClosed("session token is not valid metadata".into()))?;
    Ok(Attached {
        connection: Arc::new(Connection {
            client,
            token,
            server: seed.to_string(),
            outbound: tx,
        }),
        inbound,
        members: welcome.members,
        keepalive: Duration::from_millis(u64::from(welcome.keepalive_interval_ms.max(100))),
    })
}

/// Attaches to the first of `candidates` that accepts, within the connect timeout each.
pub async fn attach_any(config: &LeafConfig, candidates: &[String]) -> Result<Attached, LeafError> {
    let mut failures = Vec::new();
    for seed in candidates {
        match tokio::time::timeout(config.connect_timeout, attach(config, seed)).await {
            Ok(Ok(attached)) => return Ok(attached),
            Ok(Err(error)) => failures.push(format!("{seed}: {error}")),
            Err(_) => failures.push(format!(
                "{seed}: no answer within {:?}",
                config.connect_timeout
            )),
        }
    }
    Err(LeafError::Unreachable(failures))
}

/// Runs the session on `attached`, then keeps re-attaching until the leaf stops.
pub async fn supervise(shared: Arc<Shared>, mut attached: Attached, lanes: Arc<Lanes>) {
    let mut first = true;
    loop {
        learn_members(&shared.attachment, &attached.members);
        shared
            .attachment
            .connection
            .send_replace(Some(attached.connection.clone()));
        // After a failover every watch resumes where it left off; on the first attach, `Leaf::watch` starts
        // them itself.
        if !first {
            for frame in shared.watches.resume_frames() {
                let _ = attached.connection.outbound.send(frame).await;
            }
        }
        first = false;
        if shared.config.publish_endpoints {
            super::endpoints::publish_in_background(shared.clone(), attached.connection.clone());
        }
        let server = attached.connection.server.clone();
        let moved = run_stream(&shared, attached, &lanes).await;
        shared.attachment.connection.send_replace(None);
        // Sends waiting on the lost session fail now; their callers retry on the next one.
        shared
            .messaging
            .pending_sends
            .lock()
            .expect("pending sends lock")
            .clear();
        if shared.stop.is_cancelled() {
            return;
        }
        if let Some(next) = moved {
            tracing::info!(from = %server, to = %next.connection.server, "moved to another super peer");
            shared.metrics.moved();
            attached = next;
            continue;
        }
        tracing::info!(%server, "session lost; re-attaching");
        let lost_at = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        attached = loop {
            // Prefer another super peer: the one we lost is likely down.
            let mut candidates = shared.attachment.known.read().expect("known lock").clone();
            candidates.retain(|candidate| *candidate != server);
            candidates.push(server.clone());
            tokio::select! {
                biased;
                _ = shared.stop.cancelled() => return,
                result = attach_any(&shared.config, &candidates) => match result {
                    Ok(attached) => break attached,
                    Err(error) => tracing::warn!(%error, "re-attach failed; backing off"),
                },
            }
            let millis = backoff.as_millis() as u64;
            let wait = Duration::from_millis(millis / 2 + rand::random_range(0..=millis / 2));
            tokio::select! {
                biased;
                _ = shared.stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        };
        let took = lost_at.elapsed();
        shared.metrics.reattached(took.as_secs_f64());
        shared
            .attachment
            .reattach_times
            .lock()
            .expect("reattach lock")
            .push(took);
        tracing::info!(server = %attached.connection.server, ?took, "re-attached");
    }
}

/// Replaces the fail-over list after a member update: the seeds (unless listed as removed), then every
/// serving member.
fn follow_members(shared: &Shared, members: &[vesper_proto::v1::Member]) {
    let removed: Vec<&str> = members
        .iter()
        .filter(|member| member.role == vesper_proto::v1::MemberRole::Removed as i32)
        .map(|member| member.leaf_addr.as_str())
        .collect();
    let mut known: Vec<String> = shared
        .config
        .seeds
        .iter()
        .filter(|seed| !removed.contains(&seed.as_str()))
        .cloned()
        .collect();
    for address in super::follow::serving(members) {
        if !known.contains(&address) {
            known.push(address);
        }
    }
    *shared.attachment.known.write().expect("known lock") = known;
}

/// How long a leaf that moved waits for its old super peer to close the old stream after the goodbye.
const GOODBYE_WAIT: Duration = Duration::from_secs(2);

fn learn_members(attachment: &Attachment, members: &[vesper_proto::v1::Member]) {
    let mut known = attachment.known.write().expect("known lock");
    for member in members {
        if member.role != vesper_proto::v1::MemberRole::Removed as i32
            && !known.contains(&member.leaf_addr)
        {
            known.push(member.leaf_addr.clone());
        }
    }
}

/// Owns one session stream until it ends or the leaf stops; returns the next session when the leaf moved to
/// another super peer (the member list said so, see `follow`).
async fn run_stream(shared: &Arc<Shared>, attached: Attached, lanes: &Lanes) -> Option<Attached> {
    let Attached {
        connection,
        mut inbound,
        keepalive,
        members,
    } = attached;
    let mut serving = super::follow::serving(&members);
    // A planned move (when, where), and once its session is attached, that session and the goodbye's deadline.
    let mut moving: Option<(tokio::time::Instant, String)> = None;
    let mut moved: Option<(Attached, tokio::time::Instant)> = None;
    // The last member update said this super peer is leaving: a failed move is tried again, elsewhere.
    let mut leaving: Option<MemberUpdate> = None;
    // The last shed request of this super peer that was acted on (each is drawn for once).
    let mut shed_round: Option<u64> = None;
    // Keepalives go out on their own task, so that nothing the read loop waits for can silence the session.
    let ended = shared.stop.child_token();
    let _end_keepalives = ended.clone().drop_guard();
    shared.spawn(keep_alive(connection.clone(), keepalive, ended));
    loop {
        let frame = tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return None,
            _ = tokio::time::sleep_until(moving.as_ref().map_or_else(tokio::time::Instant::now, |(at, _)| *at)), if moving.is_some() => {
                let (_, target) = moving.take().expect("guarded by is_some");
                match tokio::time::timeout(shared.config.connect_timeout, attach(&shared.config, &target)).await {
                    Ok(Ok(next)) => {
                        // Attached there first: now say goodbye here, and go on reading until this stream ends.
                        let goodbye = ClientFrame { frame: Some(client_frame::Frame::Detach(Detach {})) };
                        let _ = connection.outbound.send(goodbye).await;
                        moved = Some((next, tokio::time::Instant::now() + GOODBYE_WAIT));
                    }
                    Ok(Err(error)) => tracing::warn!(%target, %error, "cannot move to the super peer"),
                    Err(_) => tracing::warn!(%target, "no answer from the super peer to move to"),
                }
                if moved.is_none() {
                    // Staying is fine after an addition; a leaving super peer must be left, so try again.
                    if let Some(update) = &leaving {
                        let pick = rand::random::<u32>() as usize;
                        let at = tokio::time::Instant::now() + super::follow::retry_delay(rand::random());
                        moving = super::follow::plan(&serving, update, &connection.server, 0.0, pick)
                            .map(|target| (at, target));
                    }
                    if moving.is_none() {
                        tracing::info!("staying on this super peer");
                    }
                }
                continue;
            }
            _ = tokio::time::sleep_until(moved.as_ref().map_or_else(tokio::time::Instant::now, |(_, by)| *by)), if moved.is_some() => {
                return moved.map(|(next, _)| next);
            }
            frame = inbound.message() => frame,
        };
        match frame {
            Ok(Some(ServerFrame {
                frame: Some(server_frame::Frame::Message(message)),
            })) => {
                if !receive(shared, lanes, &connection, vec![message]).await {
                    return None;
                }
            }
            Ok(Some(ServerFrame {
                frame: Some(server_frame::Frame::MessageBatch(batch)),
            })) => {
                if !receive(shared, lanes, &connection, batch.messages).await {
                    return None;
                }
            }
            Ok(Some(ServerFrame {
                frame: Some(server_frame::Frame::ConnectOffer(offer)),
            })) => {
                shared.spawn(super::connect::answer_offer(
                    shared.clone(),
                    connection.clone(),
                    offer,
                ));
            }
            Ok(Some(ServerFrame {
                frame: Some(server_frame::Frame::PunchPlan(plan)),
            })) => {
                shared.spawn(super::connect::carry_out_plan(shared.clone(), plan));
            }
            Ok(Some(ServerFrame {
                frame: Some(server_frame::Frame::SendResult(result)),
            })) => send_done(&shared.messaging, vec![result]),
            Ok(Some(ServerFrame {
                frame: Some(server_frame::Frame::SendResults(results)),
            })) => send_done(&shared.messaging, results.results),
            Ok(Some(ServerFrame {
                frame: Some(server_frame::Frame::SessionEnded(ending)),
            })) => {
                if ending.reason == SessionEndReason::Superseded as i32 {
                    tracing::warn!(detail = %ending.detail, "the super peer ended the session for good");
                    let _ = shared.ended.set(ending.detail);
                    shared.stop.cancel();
                } else {
                    tracing::info!(detail = %ending.detail, "the super peer ended the session; re-attaching");
                }
                return None;
            }
            Ok(Some(ServerFrame {
                frame: Some(server_frame::Frame::MemberUpdate(update)),
            })) => {
                follow_members(shared, &update.members);
                let now_serving = super::follow::serving(&update.members);
                if moving
                    .as_ref()
                    .is_some_and(|(_, target)| !now_serving.contains(target))
                {
                    // Planned before this update, towards a member that no longer serves.
                    tracing::info!("the planned move's target stopped serving; planning again");
                    moving = None;
                }
                leaving = update.leaving.then(|| update.clone());
                let mut update = update;
                if let Some(shed) = &update.shed {
                    if shed_round == Some(shed.round) {
                        update.shed = None;
                    } else {
                        shed_round = Some(shed.round);
                    }
                }
                if moving.is_none() && moved.is_none() {
                    let plan = super::follow::plan(
                        &serving,
                        &update,
                        &connection.server,
                        rand::random(),
                        rand::random::<u32>() as usize,
                    );
                    if let Some(target) = plan {
                        let wait = super::follow::delay(&update, rand::random());
                        let shedding = update.shed.is_some() && !update.leaving;
                        tracing::info!(%target, ?wait, leaving = update.leaving, shedding, "the members changed or this super peer is overloaded; moving");
                        moving = Some((tokio::time::Instant::now() + wait, target));
                    }
                }
                serving = now_serving;
            }
            Ok(Some(ServerFrame { frame: Some(frame) })) => {
                tokio::select! {
                    biased;
                    _ = shared.stop.cancelled() => return None,
                    _ = shared.watches.route(frame) => {}
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return moved.map(|(next, _)| next),
        }
    }
}

/// Pings every `keepalive` on `connection` until `ended` (the session's read loop returned) or the stream closed.
async fn keep_alive(connection: Arc<Connection>, keepalive: Duration, ended: CancellationToken) {
    let mut ticker = tokio::time::interval(keepalive);
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = ended.cancelled() => return,
            _ = ticker.tick() => {}
        }
        nonce += 1;
        let ping = ClientFrame {
            frame: Some(client_frame::Frame::Ping(Ping { nonce })),
        };
        tokio::select! {
            biased;
            _ = ended.cancelled() => return,
            sent = connection.outbound.send(ping) => if sent.is_err() { return },
        }
    }
}

/// Completes the pipelined sends these results answer.
fn send_done(messaging: &Messaging, results: Vec<SendResult>) {
    let mut pending = messaging.pending_sends.lock().expect("pending sends lock");
    for result in results {
        if let Some(waiting) = pending.remove(&result.request_id) {
            let _ = waiting.send(result);
        }
    }
}

/// Marks which of `messages` the app already has (retries) and hands them to their lanes, which give the others
/// to the app in order and acknowledge all of them. Waits while a lane is full. False when the leaf stopped.
async fn receive(
    shared: &Arc<Shared>,
    lanes: &Lanes,
    connection: &Arc<Connection>,
    messages: Vec<Message>,
) -> bool {
    let messages: Vec<(Message, bool)> = {
        let mut seen = shared.messaging.seen.lock().expect("seen lock");
        messages
            .into_iter()
            .map(|message| {
                // Acknowledged by the id its super peer gave this push; the seen-set is keyed by sender and id.
                let first = seen.first_time(&message.from, &message.id);
                (message, first)
            })
            .collect()
    };
    let count = messages.len();
    shared
        .messaging
        .unacknowledged
        .send_modify(|unacknowledged| *unacknowledged += count);
    super::dispatch::hand_over(shared, lanes, connection, messages).await
}
