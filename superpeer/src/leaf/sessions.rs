//! The sessions attached to this super peer, by token.
//!
//! A token is 32 random bytes in hex, handed out in the Welcome frame and valid while the session stream lives:
//! the [`SessionGuard`] that the stream task holds removes it when the task ends, however it ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use vesper_proto::PeerId;

#[derive(Default)]
struct Inner {
    by_token: HashMap<String, PeerId>,
    next_id: u64,
}

/// Tokens of the attached sessions; cheap to clone.
#[derive(Clone, Default)]
pub struct SessionRegistry {
    inner: Arc<Mutex<Inner>>,
}

impl SessionRegistry {
    /// Registers a new session of `peer`.
    pub fn open(&self, peer: PeerId) -> SessionGuard {
        let token = data_encoding::HEXLOWER.encode(&rand::random::<[u8; 32]>());
        let mut inner = self.inner.lock().expect("session registry lock poisoned");
        inner.next_id += 1;
        let id = inner.next_id;
        inner.by_token.insert(token.clone(), peer);
        SessionGuard {
            registry: self.clone(),
            token,
            id,
        }
    }

    /// The peer of a live session token.
    pub fn peer_of(&self, token: &str) -> Option<PeerId> {
        self.inner
            .lock()
            .expect("session registry lock poisoned")
            .by_token
            .get(token)
            .copied()
    }

    /// Number of attached sessions.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .expect("session registry lock poisoned")
            .by_token
            .len()
    }

    /// Whether no session is attached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A live session; dropping it ends the session's authority.
pub struct SessionGuard {
    registry: SessionRegistry,
    token: String,
    id: u64,
}

impl SessionGuard {
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.registry
            .inner
            .lock()
            .expect("session registry lock poisoned")
            .by_token
            .remove(&self.token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vesper_proto::Keypair;

    #[test]
    fn tokens_live_as_long_as_their_guard() {
        let registry = SessionRegistry::default();
        let peer = Keypair::generate().peer_id();
        let guard = registry.open(peer);
        assert_eq!(registry.peer_of(guard.token()), Some(peer));
        assert_eq!(registry.peer_of("nope"), None);
        let token = guard.token().to_string();
        drop(guard);
        assert_eq!(registry.peer_of(&token), None);
        assert!(registry.is_empty());
    }
}
