//! Changes the state machine made, for watches.
//!
//! Every super peer applies the same log, so every one produces the same events, each tagged with the log index
//! that caused it. They go to a broadcast channel (live sessions) and to a bounded ring of recent events, from
//! which a watch resumes after an index: after a leaf re-attaches elsewhere it gets every event after the last
//! one it saw, once. History starts where this process started applying (or at the last snapshot installed);
//! a resume from before that gets a reset and the current state instead.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::command::{
    ChatEntry, ConferenceEntry, NamespaceAcl, PeerKey, PresenceEntry, StoredRecord,
};

/// Events kept for resuming watches.
pub const HISTORY: usize = 100_000;
/// Events buffered per live subscriber before it lags (and its watches reset).
const LIVE_QUEUE: usize = 4096;

/// What changed.
#[derive(Debug, Clone)]
pub enum Change {
    Presence {
        peer: PeerKey,
        entry: PresenceEntry,
    },
    Record {
        namespace: String,
        key: String,
        /// None when deleted.
        record: Option<StoredRecord>,
    },
    Conference {
        id: String,
        entry: ConferenceEntry,
    },
    Chat {
        conference: String,
        chat: ChatEntry,
    },
    /// A namespace's ACL was set or cleared (None): record watches on it re-check their reader.
    Acl {
        namespace: String,
        acl: Option<NamespaceAcl>,
    },
}

/// A change and the log index that made it.
#[derive(Debug, Clone)]
pub struct Event {
    pub index: u64,
    pub change: Change,
}

struct Ring {
    events: VecDeque<Arc<Event>>,
    /// Every event with an index above this is in `events`.
    floor: u64,
}

/// The event history and live feed of one super peer; cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    ring: Arc<Mutex<Ring>>,
    live: broadcast::Sender<Arc<Event>>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self {
            ring: Arc::new(Mutex::new(Ring {
                events: VecDeque::new(),
                floor: 0,
            })),
            live: broadcast::channel(LIVE_QUEUE).0,
        }
    }
}

impl EventLog {
    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().expect("event ring lock poisoned")
    }

    /// History is complete only above `index` (process start, snapshot install).
    pub fn reset_floor(&self, index: u64) {
        let mut ring = self.ring();
        ring.events.clear();
        ring.floor = index;
    }

    /// Records and broadcasts the events of one apply batch.
    pub fn publish(&self, events: Vec<Event>) {
        let mut ring = self.ring();
        for event in events {
            let event = Arc::new(event);
            if ring.events.len() == HISTORY {
                if let Some(oldest) = ring.events.pop_front() {
                    ring.floor = ring.floor.max(oldest.index);
                }
            }
            ring.events.push_back(event.clone());
            // No subscriber is fine.
            let _ = self.live.send(event);
        }
    }

    /// The index above which history is complete.
    pub fn floor(&self) -> u64 {
        self.ring().floor
    }

    /// A live feed of events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.live.subscribe()
    }

    /// Every event after `after`, or None when history does not reach back that far.
    pub fn since(&self, after: u64) -> Option<Vec<Arc<Event>>> {
        let ring = self.ring();
        if after < ring.floor {
            return None;
        }
        Some(
            ring.events
                .iter()
                .filter(|event| event.index > after)
                .cloned()
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(index: u64) -> Event {
        Event {
            index,
            change: Change::Record {
                namespace: "ns".into(),
                key: index.to_string(),
                record: None,
            },
        }
    }

    #[test]
    fn history_answers_only_what_it_holds() {
        let log = EventLog::default();
        log.reset_floor(10);
        log.publish(vec![event(11), event(12), event(12), event(13)]);
        assert_eq!(log.since(11).unwrap().len(), 3);
        assert_eq!(log.since(10).unwrap().len(), 4);
        assert!(
            log.since(9).is_none(),
            "events up to 10 were never recorded here"
        );
    }

    #[tokio::test]
    async fn subscribers_see_events_published_after_they_subscribed() {
        let log = EventLog::default();
        log.publish(vec![event(1)]);
        let mut live = log.subscribe();
        log.publish(vec![event(2)]);
        assert_eq!(live.recv().await.unwrap().index, 2);
    }
}
