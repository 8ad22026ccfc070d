//! Watches on the leaf side: the app's streams, and the last index each has seen so a watch resumes without gap
//! or duplicate after a failover.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use vesper_proto::v1::{client_frame, server_frame, ClientFrame, Watch, WatchEvent};

/// Items of a watch stream.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// A change, with the log index that made it.
    Event(Box<WatchEvent>),
    /// History was gone: the current state follows as events at this index.
    Reset {
        /// The log index of the state that follows.
        applied_index: u64,
    },
    /// The super peer refused the watch.
    Refused(String),
}

/// What the app asks to watch.
#[derive(Debug, Clone, Default)]
pub struct WatchSpec {
    /// PeerId texts whose presence to watch.
    pub peers: Vec<String>,
    /// Namespace whose records to watch (empty: none).
    pub namespace: String,
    /// Only keys with this prefix.
    pub key_prefix: String,
    /// Conference whose roster, start and chat to watch (empty: none).
    pub conference_id: String,
}

/// Events buffered per watch before the session waits for the app.
const WATCH_QUEUE: usize = 1024;

struct Entry {
    spec: WatchSpec,
    sender: mpsc::Sender<WatchItem>,
    /// Highest index delivered to the app.
    last_index: u64,
}

/// The watches of one Leaf; cheap to clone.
#[derive(Clone, Default)]
pub struct WatchRegistry {
    inner: Arc<Mutex<(u64, HashMap<u64, Entry>)>>,
}

impl WatchRegistry {
    /// Registers a watch; returns its id, stream and the frame that starts it.
    pub fn add(&self, spec: WatchSpec) -> (u64, mpsc::Receiver<WatchItem>, ClientFrame) {
        let (sender, receiver) = mpsc::channel(WATCH_QUEUE);
        let mut inner = self.inner.lock().expect("watch lock");
        inner.0 += 1;
        let id = inner.0;
        let frame = start_frame(id, &spec, 0);
        inner.1.insert(
            id,
            Entry {
                spec,
                sender,
                last_index: 0,
            },
        );
        (id, receiver, frame)
    }

    /// Frames that restart every watch after a re-attach, each resuming after the last index it saw.
    pub fn resume_frames(&self) -> Vec<ClientFrame> {
        let inner = self.inner.lock().expect("watch lock");
        // A watch that never got its start (registered while re-attaching) starts fresh (index 0).
        inner
            .1
            .iter()
            .map(|(id, entry)| start_frame(*id, &entry.spec, entry.last_index))
            .collect()
    }

    /// Routes a server frame to its watch.
    pub async fn route(&self, frame: server_frame::Frame) {
        let (watch_id, item, index) = match frame {
            server_frame::Frame::WatchEvent(event) => {
                let index = event.applied_index;
                (
                    event.watch_id,
                    WatchItem::Event(Box::new(event)),
                    Some(index),
                )
            }
            server_frame::Frame::WatchReset(reset) => (
                reset.watch_id,
                WatchItem::Reset {
                    applied_index: reset.applied_index,
                },
                Some(reset.applied_index),
            ),
            server_frame::Frame::WatchRefused(refused) => {
                (refused.watch_id, WatchItem::Refused(refused.reason), None)
            }
            _ => return,
        };
        let sender = {
            let mut inner = self.inner.lock().expect("watch lock");
            let Some(entry) = inner.1.get_mut(&watch_id) else {
                return;
            };
            if let Some(index) = index {
                entry.last_index = entry.last_index.max(index);
            }
            entry.sender.clone()
        };
        // The app's stream applies back-pressure; a dropped stream ends the watch.
        if sender.send(item).await.is_err() {
            self.inner.lock().expect("watch lock").1.remove(&watch_id);
        }
    }
}

fn start_frame(watch_id: u64, spec: &WatchSpec, resume_after_index: u64) -> ClientFrame {
    ClientFrame {
        frame: Some(client_frame::Frame::Watch(Watch {
            watch_id,
            peers: spec.peers.clone(),
            namespace: spec.namespace.clone(),
            key_prefix: spec.key_prefix.clone(),
            resume_after_index,
            conference_id: spec.conference_id.clone(),
        })),
    }
}
