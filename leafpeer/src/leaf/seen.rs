//! Which messages the app already has, so that a retried message reaches it once.

/// Message ids remembered to deliver retries to the app once.
const SEEN_MESSAGES: usize = 10_000;

/// Message ids already handed to the app, so a retried message reaches it once.
///
/// Each (sender, id) pair is remembered as a 128-bit fingerprint: two SipHash values under independent random
/// keys of this process. A fingerprint is 16 bytes kept inline (no allocation, no pointer to follow on a hot
/// path), and two different pairs share one with odds of about 1 in 2^128 per pair; the keys are secret, so a
/// sender cannot aim for another sender's fingerprint either.
pub struct SeenMessages {
    keys: (std::hash::RandomState, std::hash::RandomState),
    order: std::collections::VecDeque<u128>,
    set: foldhash::HashSet<u128>,
}

impl Default for SeenMessages {
    fn default() -> Self {
        Self {
            keys: (std::hash::RandomState::new(), std::hash::RandomState::new()),
            order: std::collections::VecDeque::with_capacity(SEEN_MESSAGES),
            set: foldhash::HashSet::with_capacity_and_hasher(SEEN_MESSAGES, Default::default()),
        }
    }
}

impl SeenMessages {
    /// Records a message; false when it was seen before.
    pub fn first_time(&mut self, from: &str, id: &str) -> bool {
        use std::hash::BuildHasher;
        // A str hashes with a terminator, so the pair (from, id) is hashed unambiguously.
        let fingerprint = u128::from(self.keys.0.hash_one((from, id))) << 64
            | u128::from(self.keys.1.hash_one((from, id)));
        if !self.set.insert(fingerprint) {
            return false;
        }
        if self.order.len() == SEEN_MESSAGES {
            if let Some(oldest) = self.order.pop_front() {
                self.set.remove(&oldest);
            }
        }
        self.order.push_back(fingerprint);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_new_once_per_sender_and_id() {
        let mut seen = SeenMessages::default();
        assert!(seen.first_time("vp1alice", "m1"));
        assert!(!seen.first_time("vp1alice", "m1"));
        // The same id from another sender is another message.
        assert!(seen.first_time("vp1bob", "m1"));
        // Pairs that join to the same text are still told apart.
        assert!(seen.first_time("ab", "c"));
        assert!(seen.first_time("a", "bc"));
        assert!(!seen.first_time("ab", "c"));
    }

    #[test]
    fn the_oldest_ids_are_forgotten_past_the_bound() {
        let mut seen = SeenMessages::default();
        for n in 0..SEEN_MESSAGES {
            assert!(seen.first_time("vp1alice", &n.to_string()));
        }
        assert!(!seen.first_time("vp1alice", "0"));
        assert!(seen.first_time("vp1alice", "new"));
        // "new" pushed "0" out, "0" coming back pushes "1" out and "1" pushes "2"; "3" is still remembered.
        assert!(seen.first_time("vp1alice", "0"));
        assert!(seen.first_time("vp1alice", "1"));
        assert!(!seen.first_time("vp1alice", "3"));
        assert_eq!(seen.order.len(), SEEN_MESSAGES);
        assert_eq!(seen.set.len(), SEEN_MESSAGES);
    }
}
