//! Watches of one session: which changes it wants, and getting them to it in index order, once.
//!
//! Each watch remembers the index its catch-up covered (the current index, or the last event replayed from
//! history). Live events come from the node's event feed, subscribed when the session's first watch arrives and
//! before its catch-up is computed, so each arrives once; a watch skips those at or below its catch-up index, which the catch-up already
//! delivered (several events can share one index, so the boundary is by index, never by count). When history does
//! not reach back (this super peer restarted, a snapshot was installed, the session fell too far behind), the
//! watch gets a `WatchReset` and the current state as events at the current index; a new watch starts with one
//! too.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use vesper_proto::v1::{
    server_frame, watch_event, RecordChange, ServerFrame, Watch, WatchEvent, WatchRefused,
    WatchReset,
};
use vesper_proto::{validate, PeerId};

use crate::command::{may_read, PeerKey, Rejection};
use crate::error::ServiceError;
use crate::events::{Change, Event};
use crate::leaf::state::LeafState;
use crate::leaf::{convert, messaging};
use crate::store::{presence, records};

/// Most watches one session may hold.
pub const MAX_WATCHES_PER_SESSION: usize = 64;
/// Most peers one presence watch may name.
pub const MAX_PEERS_PER_WATCH: usize = 1024;
/// Most records sent as the current state of a reset record watch.
const RESET_RECORDS: usize = 1000;

struct Spec {
    peers: HashSet<PeerKey>,
    conference: String,
    /// Whether this session's peer may read the conference's chat (owner or accepted participant); follows the
    /// roster as its changes pass through the watch.
    reads_chat: bool,
    namespace: String,
    key_prefix: String,
    /// Whether this session's peer may read the namespace; follows its ACL as changes pass through the watch.
    reads_records: bool,
    /// Index up to which the catch-up (history replay or reset state) delivered everything.
    delivered: u64,
}

impl Spec {
    fn matches(&self, change: &Change) -> bool {
        match change {
            Change::Presence { peer, .. } => self.peers.contains(peer),
            Change::Record { namespace, key, .. } => {
                self.reads_records
                    && !self.namespace.is_empty()
                    && *namespace == self.namespace
                    && key.starts_with(self.key_prefix.as_str())
            }
            Change::Conference { id, .. } => !self.conference.is_empty() && *id == self.conference,
            Change::Chat { conference, .. } => {
                self.reads_chat && !self.conference.is_empty() && *conference == self.conference
            }
            // Not sent to leaves; `Watches::on_event` applies it to the spec.
            Change::Acl { .. } => false,
        }
    }
}

/// The watches of one session.
pub struct Watches {
    /// The session's peer: conference watches are limited to the conference's owner and invitees.
    peer: PeerKey,
    specs: HashMap<u64, Spec>,
}

/// Whether `peer` may read `entry`'s chat.
fn reads_chat(entry: &crate::command::ConferenceEntry, peer: &PeerKey) -> bool {
    entry.owner == *peer || entry.invitees.get(peer) == Some(&crate::command::Invitation::Accepted)
}

fn event_frame(context: &LeafState, watch_id: u64, event: &Event) -> ServerFrame {
    let change = match &event.change {
        Change::Presence { peer, entry } => {
            watch_event::Change::Presence(messaging::presence_of(context, peer, entry.clone()))
        }
        Change::Record {
            namespace,
            key,
            record,
        } => watch_event::Change::Record(RecordChange {
            namespace: namespace.clone(),
            key: key.clone(),
            record: record
                .clone()
                .map(|record| convert::record(namespace, key, record)),
        }),
        Change::Conference { id, entry } => {
            watch_event::Change::Conference(crate::leaf::conference::context(id, entry))
        }
        Change::Chat { conference, chat } => {
            watch_event::Change::Chat(crate::leaf::conference::chat(conference, chat))
        }
        Change::Acl { .. } => unreachable!("ACL changes match no watch (Spec::matches)"),
    };
    ServerFrame {
        frame: Some(server_frame::Frame::WatchEvent(WatchEvent {
            watch_id,
            applied_index: event.index,
            change: Some(change),
        })),
    }
}

impl Watches {
    pub fn new(peer: PeerKey) -> Self {
        Self {
            peer,
            specs: HashMap::new(),
        }
    }

    /// Frames for a live event, for every watch that wants it and has not seen it.
    pub fn on_event(&mut self, context: &LeafState, event: &Arc<Event>) -> Vec<ServerFrame> {
        let mut frames = Vec::new();
        let mut ended = Vec::new();
        for (watch_id, spec) in &mut self.specs {
            if let Change::Conference { id, entry } = &event.change {
                if *id == spec.conference {
                    spec.reads_chat = reads_chat(entry, &self.peer);
                }
            }
            if let Change::Acl { namespace, acl } = &event.change {
                if *namespace == spec.namespace && !may_read(acl.as_ref(), &self.peer) {
                    // The peer lost read access: the watch ends here, before any later change of the namespace.
                    spec.reads_records = false;
                    ended.push(*watch_id);
                    frames.push(ServerFrame {
                        frame: Some(server_frame::Frame::WatchRefused(WatchRefused {
                            watch_id: *watch_id,
                            reason: Rejection::NamespaceRead(namespace.clone()).to_string(),
                        })),
                    });
                }
            }
            if event.index > spec.delivered && spec.matches(&event.change) {
                frames.push(event_frame(context, *watch_id, event));
            }
        }
        for watch_id in ended {
            self.specs.remove(&watch_id);
        }
        frames
    }

    /// Watches open on this session.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// Whether the session has no watch.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Removes a watch.
    pub fn remove(&mut self, watch_id: u64) {
        self.specs.remove(&watch_id);
    }

    /// Adds a watch; returns the frames that bring it up to date (history or reset + state).
    pub async fn add(
        &mut self,
        context: &LeafState,
        watch: Watch,
    ) -> Result<Vec<ServerFrame>, ServiceError> {
        if self.specs.len() >= MAX_WATCHES_PER_SESSION && !self.specs.contains_key(&watch.watch_id)
        {
            return Err(ServiceError::from(validate::InvalidInput::TooLong {
                field: "watches of this session",
                len: self.specs.len() + 1,
                max: MAX_WATCHES_PER_SESSION,
            }));
        }
        if watch.peers.len() > MAX_PEERS_PER_WATCH {
            return Err(ServiceError::from(validate::InvalidInput::TooLong {
                field: "peers of one watch",
                len: watch.peers.len(),
                max: MAX_PEERS_PER_WATCH,
            }));
        }
        let mut peers = HashSet::new();
        for text in &watch.peers {
            let peer: PeerId = text
                .parse()
                .map_err(|error| ServiceError::BadField(format!("watch peer {text:?}: {error}")))?;
            peers.insert(*peer.as_bytes());
        }
        if !watch.namespace.is_empty() {
            validate::namespace(&watch.namespace)?;
            validate::key_prefix(&watch.key_prefix)?;
        }
        tracing::info!(
            watch_id = watch.watch_id,
            resume_after = watch.resume_after_index,
            peers = watch.peers.len(),
            namespace = %watch.namespace,
            "watch"
        );
        // Catch up to the cluster first, so "the current state" and "history after N" mean the same here as
        // on the super peer the leaf came from.
        let current = context
            .replica
            .read_barrier(vesper_proto::v1::ReadConsistency::Linearizable)
            .await?;
        let mut chat_allowed = false;
        if !watch.conference_id.is_empty() {
            crate::leaf::conference::check_id(&watch.conference_id)?;
            let entry =
                crate::store::conference::get(context.replica.reader().db(), &watch.conference_id)?
                    .ok_or(crate::command::Rejection::UnknownConference)?;
            if entry.owner != self.peer && !entry.invitees.contains_key(&self.peer) {
                return Err(crate::command::Rejection::NotInvited.into());
            }
            chat_allowed = reads_chat(&entry, &self.peer);
        }
        if !watch.namespace.is_empty() {
            let acl = records::acl(context.replica.reader().db(), &watch.namespace)?;
            if !may_read(acl.as_ref(), &self.peer) {
                return Err(Rejection::NamespaceRead(watch.namespace).into());
            }
        }
        let mut spec = Spec {
            peers,
            conference: watch.conference_id,
            reads_chat: chat_allowed,
            reads_records: true,
            namespace: watch.namespace,
            key_prefix: watch.key_prefix,
            delivered: current,
        };
        let mut frames = Vec::new();
        // A new watch (resume index 0) starts with the current state, as a reset: the leaf learns the index it
        // starts from (to resume from later) and the state it starts with.
        let history = match watch.resume_after_index {
            0 => None,
            after => context.events.since(after),
        };
        match history {
            Some(events) => {
                for event in events.iter().filter(|event| spec.matches(&event.change)) {
                    frames.push(event_frame(context, watch.watch_id, event));
                }
                // Live events above `current` that the history also held are skipped by `delivered`.
                if let Some(last) = events.last() {
                    spec.delivered = spec.delivered.max(last.index);
                }
            }
            None => {
                if watch.resume_after_index > 0 {
                    tracing::info!(
                        watch_id = watch.watch_id,
                        resume_after = watch.resume_after_index,
                        history_from = context.events.floor(),
                        "watch cannot resume from history; resetting"
                    );
                }
                frames.push(ServerFrame {
                    frame: Some(server_frame::Frame::WatchReset(WatchReset {
                        watch_id: watch.watch_id,
                        applied_index: current,
                    })),
                });
                frames.extend(current_state(context, watch.watch_id, &spec, current)?);
            }
        }
        self.specs.insert(watch.watch_id, spec);
        Ok(frames)
    }

    /// Resets every watch after the session fell behind the live feed.
    pub fn reset_all(
        &mut self,
        context: &LeafState,
        current: u64,
    ) -> Result<Vec<ServerFrame>, ServiceError> {
        let mut frames = Vec::new();
        for (watch_id, spec) in &mut self.specs {
            frames.push(ServerFrame {
                frame: Some(server_frame::Frame::WatchReset(WatchReset {
                    watch_id: *watch_id,
                    applied_index: current,
                })),
            });
            frames.extend(current_state(context, *watch_id, spec, current)?);
            spec.delivered = current;
        }
        Ok(frames)
    }
}

/// The current state a watch covers, as events at `index`.
fn current_state(
    context: &LeafState,
    watch_id: u64,
    spec: &Spec,
    index: u64,
) -> Result<Vec<ServerFrame>, ServiceError> {
    let db = context.replica.reader().db();
    let mut frames = Vec::new();
    for peer in &spec.peers {
        if let Some(entry) = presence::get(db, peer)? {
            let event = Event {
                index,
                change: Change::Presence { peer: *peer, entry },
            };
            frames.push(event_frame(context, watch_id, &event));
        }
    }
    if !spec.conference.is_empty() {
        if let Some(entry) = crate::store::conference::get(db, &spec.conference)? {
            let event = Event {
                index,
                change: Change::Conference {
                    id: spec.conference.clone(),
                    entry,
                },
            };
            frames.push(event_frame(context, watch_id, &event));
        }
    }
    if !spec.namespace.is_empty() && spec.reads_records {
        let (found, _) = records::list(
            db,
            &spec.namespace,
            &spec.key_prefix,
            None,
            RESET_RECORDS,
            usize::MAX,
        )?;
        for (key, record) in found {
            let event = Event {
                index,
                change: Change::Record {
                    namespace: spec.namespace.clone(),
                    key,
                    record: Some(record),
                },
            };
            frames.push(event_frame(context, watch_id, &event));
        }
    }
    Ok(frames)
}
