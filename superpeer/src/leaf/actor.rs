//! The session actor: one task per session stream. Challenge, attach (presence goes online through Raft),
//! mailbox drain, then the frames of an attached session until the leaf goes away or the node stops.

use super::sends::{start_sends, InFlight};
use super::ATTACH_TIMEOUT;
use super::{messaging, watch};
use crate::command::{Op, PresenceAttach, PresenceDetach};
use crate::error::ServiceError;
use crate::leaf::state::LeafState;
use crate::metrics::{SessionEnd, SessionRefusal};
use crate::sessions;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tracing::Instrument;
use vesper_proto::session::{self, NONCE_LEN};
use vesper_proto::v1::{
    client_frame, server_frame, Attach, Challenge, ClientFrame, Pong, ServerFrame, WatchRefused,
    Welcome,
};
use vesper_proto::{version, PeerId};

/// Checks an attach: a protocol version both sides speak (the highest), then the signature over the challenge.
fn accept_attach(
    attach: &Attach,
    nonce: &[u8],
    server_peer_id: &str,
) -> Result<(PeerId, u32, bool), ServiceError> {
    let protocol = version::Range::from_wire(
        attach.protocol_oldest,
        attach.protocol_newest,
        "Attach.protocol_newest",
    )
    .and_then(|theirs| theirs.agree(version::OURS))
    .map_err(ServiceError::Incompatible)?;
    let peer = session::verify_attach(attach, nonce, server_peer_id)
        .map_err(|error| ServiceError::Unauthenticated(error.to_string()))?;
    Ok((peer, protocol, !attach.without_presence))
}

/// Refuses a session: counts `reason`, and ends the stream with `error`.
async fn refuse(
    context: &LeafState,
    tx: &sessions::Outbound,
    reason: SessionRefusal,
    error: ServiceError,
) {
    context.session_metrics.refused(reason);
    let _ = tx.send(Err(error.into_status())).await;
}

/// Runs one session: challenge, attach (presence goes online through Raft), mailbox drain, then keepalives and
/// acknowledgements until the leaf goes away or the node stops. A session that ends without a goodbye leaves
/// the peer online for the grace period, so it can re-attach anywhere without an offline flap.
pub(super) async fn run_session(
    context: Arc<LeafState>,
    mut inbound: Streaming<ClientFrame>,
    tx: sessions::Outbound,
    remote: Option<std::net::IpAddr>,
    shutdown: CancellationToken,
) {
    let opened = std::time::Instant::now();
    let nonce: [u8; NONCE_LEN] = rand::random();
    let challenge = ServerFrame {
        frame: Some(server_frame::Frame::Challenge(Challenge {
            nonce: nonce.to_vec(),
            server_peer_id: context.me.peer_id.clone(),
        })),
    };
    if tx.send(Ok(Box::new(challenge))).await.is_err() {
        return;
    }
    let (peer, protocol, listed) = match tokio::time::timeout(ATTACH_TIMEOUT, inbound.message())
        .await
    {
        Ok(Ok(Some(ClientFrame {
            frame: Some(client_frame::Frame::Attach(attach)),
        }))) => match accept_attach(&attach, &nonce, &context.me.peer_id) {
            Ok(accepted) => accepted,
            Err(error) => {
                let reason = match error {
                    ServiceError::Incompatible(_) => SessionRefusal::Incompatible,
                    _ => SessionRefusal::Unauthenticated,
                };
                return refuse(&context, &tx, reason, error).await;
            }
        },
        Ok(Ok(Some(_))) => {
            let error =
                ServiceError::Unauthenticated("the first frame of a session must be attach".into());
            return refuse(&context, &tx, SessionRefusal::Unauthenticated, error).await;
        }
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_) => {
            let error =
                ServiceError::Unauthenticated(format!("no attach within {ATTACH_TIMEOUT:?}"));
            return refuse(&context, &tx, SessionRefusal::Unauthenticated, error).await;
        }
    };
    let Some(host) = context.replica.node_id() else {
        let error = ServiceError::NotInCluster;
        return refuse(&context, &tx, SessionRefusal::NotInCluster, error).await;
    };
    // Subscribed before the check, so a node that starts leaving after it still tells this session.
    let mut members = context.members.clone();
    let (leaving, draining) = {
        let view = members.borrow_and_update();
        (view.leaving, view.draining)
    };
    if draining {
        // Stopping (SIGTERM): it stays a member and will be back, but not for this session.
        let error = ServiceError::Unavailable(
            "this super peer is shutting down; attach to another member".into(),
        );
        return refuse(&context, &tx, SessionRefusal::Draining, error).await;
    }
    if leaving {
        // A leaf that is moving here from a member that has not heard of the removal yet: it tries another.
        let error = ServiceError::Unavailable(
            "this super peer is leaving the cluster; attach to another member".into(),
        );
        return refuse(&context, &tx, SessionRefusal::Leaving, error).await;
    }
    let session = context.sessions.open(peer, tx.clone(), listed, remote);
    // The event feed is subscribed when the first watch arrives, before its catch-up is computed, so no event
    // between the catch-up and the live feed is missed. Sessions without watches never wake up for events.
    let mut events: Option<tokio::sync::broadcast::Receiver<Arc<crate::events::Event>>> = None;
    let mut watches = watch::Watches::new(*peer.as_bytes());
    let span =
        tracing::info_span!("session", peer_id = %peer, session = session.id(), protocol, listed);
    // Instrumented, not entered: an entered span guard held across awaits leaks into other tasks' logs.
    async move {
    let attach: Op = PresenceAttach {
        peer: *peer.as_bytes(),
        host,
        session: session.id(),
    }.into();
    // Boxed, here and below: the session task lives as long as the leaf is attached, and its size is that of
    // its largest state; a proposal inlined there would be carried by every idle session.
    // A session without presence is not listed: nothing to record, and nothing to drain into it.
    if listed {
        match Box::pin(context.replica.propose(attach)).await {
            Ok((_, index)) => {
                session.listed_at(index);
                super::listing::check_peer(&context, &peer);
            }
            Err(error) => {
                tracing::warn!(%error, "cannot record the attach");
                return refuse(&context, &tx, SessionRefusal::Unrecorded, error).await;
            }
        }
    }
    tracing::info!("leaf attached");
    let welcome = ServerFrame {
        frame: Some(server_frame::Frame::Welcome(Welcome {
            session_token: session.token().to_string(),
            peer_id: peer.to_string(),
            members: context.replica.members().unwrap_or_default(),
            // At most an hour (validated): fits.
            keepalive_interval_ms: context.config.keepalive_interval.as_millis() as u32,
            protocol_version: protocol,
        })),
    };
    // The member list as of the welcome; later changes (`members`, subscribed above) are pushed.
    if tx.send(Ok(Box::new(welcome))).await.is_err() {
        return;
    }
    context
        .session_metrics
        .attached(opened.elapsed().as_secs_f64());
    // The mailbox drains while this loop reads the acknowledgements it waits for.
    let drain = {
        let context = context.clone();
        async move {
            match messaging::drain_mailbox(&context, peer).await {
                Ok(0) => {}
                Ok(count) => tracing::info!(count, "delivered mailbox"),
                Err(error) => tracing::warn!(%error, "mailbox drain stopped"),
            }
        }
    };
    // Boxed and dropped once done: an idle session should not carry the drain's state for its whole life.
    let mut drain = listed.then(|| Box::pin(drain));
    let ttl = context.config.session_ttl;
    let mut heard = tokio::time::Instant::now();
    // Sends run as one task per frame (a SendFrame, or a SendBatch); each task returns what it held in flight.
    let mut sends = tokio::task::JoinSet::<InFlight>::new();
    let mut sends_in_flight = InFlight::default();
    let mut goodbye = false;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            ending = session.ended() => {
                // The cluster no longer lists this session: say why, and end it (no grace: it is not listed).
                tracing::info!(reason = ending.reason, detail = %ending.detail, "ending the session");
                let frame = ServerFrame { frame: Some(server_frame::Frame::SessionEnded(ending)) };
                let _ = tx.send(Ok(Box::new(frame))).await;
                goodbye = true;
                break;
            }
            () = async { drain.as_mut().expect("guarded by is_some").await }, if drain.is_some() => drain = None,
            changed = members.changed() => {
                if changed.is_err() {
                    break;
                }
                let update = members.borrow_and_update().frame();
                let frame = ServerFrame { frame: Some(server_frame::Frame::MemberUpdate(update)) };
                if tx.send(Ok(Box::new(frame))).await.is_err() {
                    break;
                }
            }
            Some(done) = sends.join_next(), if !sends.is_empty() => {
                // A send task catches its own panic, so it always gives its share back.
                sends_in_flight.remove(done.unwrap_or_default());
            }
            event = next_event(&mut events) => {
                let frames = match event {
                    Ok(event) => watches.on_event(&context, &event),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "session fell behind the event feed; resetting its watches");
                        let current = context.replica.raft().map(crate::raft::propose::applied_index).unwrap_or(0);
                        watches.reset_all(&context, current).unwrap_or_default()
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                for frame in frames {
                    if tx.send(Ok(Box::new(frame))).await.is_err() {
                        break;
                    }
                }
            }
            // The TTL counts from the last frame the leaf sent, not from the last wake-up of this loop (watch
            // events, finished sends and the drain wake it too).
            frame = tokio::time::timeout_at(heard + ttl, inbound.message()) => match frame.inspect(|frame| {
                if matches!(frame, Ok(Some(_))) {
                    heard = tokio::time::Instant::now();
                }
            }) {
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::Ping(ping)) }))) => {
                    let pong = ServerFrame { frame: Some(server_frame::Frame::Pong(Pong { nonce: ping.nonce })) };
                    if tx.send(Ok(Box::new(pong))).await.is_err() {
                        break;
                    }
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::MessageAck(ack)) }))) => {
                    session.acknowledge(ack.delivery_id);
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::MessageAcks(acks)) }))) => {
                    for id in acks.delivery_ids {
                        session.acknowledge(id);
                    }
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::Watch(request)) }))) => {
                    let watch_id = request.watch_id;
                    if events.is_none() {
                        events = Some(context.events.subscribe());
                    }
                    let before = watches.len();
                    let added = Box::pin(watches.add(&context, request)).await;
                    context.session_metrics.watches_changed(watches.len() as i64 - before as i64);
                    let frames = match added {
                        Ok(frames) => frames,
                        Err(error) => vec![ServerFrame {
                            frame: Some(server_frame::Frame::WatchRefused(WatchRefused {
                                watch_id,
                                reason: error.to_string(),
                            })),
                        }],
                    };
                    for frame in frames {
                        if tx.send(Ok(Box::new(frame))).await.is_err() {
                            break;
                        }
                    }
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::Send(frame)) }))) => {
                    if !start_sends(&context, peer, session.id(), vec![frame], &tx, &mut sends, &mut sends_in_flight).await {
                        break;
                    }
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::SendBatch(batch)) }))) => {
                    if !start_sends(&context, peer, session.id(), batch.sends, &tx, &mut sends, &mut sends_in_flight).await {
                        break;
                    }
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::ConnectAnswer(answer)) }))) => {
                    session.answer(answer);
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::Unwatch(request)) }))) => {
                    let before = watches.len();
                    watches.remove(request.watch_id);
                    context.session_metrics.watches_changed(watches.len() as i64 - before as i64);
                }
                Ok(Ok(Some(ClientFrame { frame: Some(client_frame::Frame::Detach(_)) }))) => {
                    goodbye = true;
                    break;
                }
                Ok(Ok(Some(_))) => {
                    let _ = tx.send(Err(ServiceError::Malformed("unexpected frame on an attached session".into()).into())).await;
                    break;
                }
                Ok(Ok(None)) | Ok(Err(_)) => break,
                Err(_) => {
                    tracing::info!(?ttl, "no keepalive within the session TTL; closing");
                    break;
                }
            }
        }
    }
    context.session_metrics.watches_changed(-(watches.len() as i64));
    context.session_metrics.ended(if shutdown.is_cancelled() {
        SessionEnd::Shutdown
    } else if goodbye {
        SessionEnd::Goodbye
    } else {
        SessionEnd::Lost
    });
    let session_id = session.id();
    // Stop taking deliveries and calls for this session at once; pushes still waiting for an acknowledgement
    // fail now (their senders queue the messages).
    drop(session);
    // A drain still running removes what the leaf acknowledged before the session ends, so that a leaf that
    // acknowledged, said goodbye and attaches again (anywhere) does not get those messages a second time.
    if let Some(drain) = drain.take() {
        drain.await;
    }
    let detach: Op = PresenceDetach {
        peer: *peer.as_bytes(),
        session: session_id,
    }.into();
    if !listed {
        tracing::info!("session without presence ended");
        return;
    }
    if goodbye {
        tracing::info!("leaf detached");
    } else {
        // No goodbye: give the leaf the grace period to come back (here or elsewhere) before it shows offline.
        // A re-attach lists a new session beside this one; the detach then removes only this one.
        tracing::info!(grace = ?context.config.session_grace, "session lost");
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(context.config.session_grace) => {}
        }
    }
    if let Err(error) = Box::pin(context.replica.propose(detach)).await {
        tracing::warn!(%error, "cannot record the detach; the host expiry will");
    }
    }
    .instrument(span)
    .await
}

/// The next event of the feed, or never when the session has not subscribed (it has no watch).
async fn next_event(
    events: &mut Option<tokio::sync::broadcast::Receiver<Arc<crate::events::Event>>>,
) -> Result<Arc<crate::events::Event>, tokio::sync::broadcast::error::RecvError> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}
