//! What a leaf counts about itself, for the app's own Prometheus registry: [`LeafMetrics::register`] adds the
//! families (prefix `vesper_leaf_`) to a `prometheus_client` registry the app exposes however it likes. Counting
//! costs a few atomic operations whether or not anything is registered.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// How a send ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum SendEnd {
    /// The recipient's library acknowledged it.
    Delivered,
    /// It waits in the recipient's mailbox.
    Queued,
    /// Refused or given up after its retries.
    Failed,
}

/// The path a peer connection took.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ConnectionPath {
    Direct,
    Relayed,
    Failed,
}

/// Which side opened a peer connection.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Side {
    /// This leaf dialled (`connect_to`).
    Dial,
    /// Another peer dialled and this leaf accepted.
    Accept,
}

fn label(text: &str, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
    EncodeLabelValue::encode(&text, encoder)
}

impl EncodeLabelValue for SendEnd {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        label(
            match self {
                SendEnd::Delivered => "delivered",
                SendEnd::Queued => "queued",
                SendEnd::Failed => "failed",
            },
            encoder,
        )
    }
}

impl EncodeLabelValue for ConnectionPath {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        label(
            match self {
                ConnectionPath::Direct => "direct",
                ConnectionPath::Relayed => "relayed",
                ConnectionPath::Failed => "failed",
            },
            encoder,
        )
    }
}

impl EncodeLabelValue for Side {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        label(
            match self {
                Side::Dial => "dial",
                Side::Accept => "accept",
            },
            encoder,
        )
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: SendEnd,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    path: ConnectionPath,
    side: Side,
}

/// The leaf's counters; cheap to clone (every clone counts into the same series).
#[derive(Clone)]
pub struct LeafMetrics {
    sent: Family<OutcomeLabel, Counter>,
    send_seconds: Histogram,
    received: Counter,
    reattaches: Counter,
    reattach_seconds: Histogram,
    moves: Counter,
    connections: Family<ConnectionLabels, Counter>,
    connect_seconds: Histogram,
}

impl Default for LeafMetrics {
    fn default() -> Self {
        Self {
            sent: Family::default(),
            // 100 µs .. ~26 s.
            send_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            received: Counter::default(),
            reattaches: Counter::default(),
            reattach_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            moves: Counter::default(),
            connections: Family::default(),
            connect_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
        }
    }
}

impl LeafMetrics {
    /// Adds this leaf's families to `registry` (under `vesper_leaf_`). Register one leaf per registry, or give
    /// each its own sub-registry with a label (`Registry::sub_registry_with_label`).
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("vesper_leaf");
        registry.register(
            "messages_sent",
            "Messages this leaf sent, by how the send ended",
            self.sent.clone(),
        );
        registry.register_with_unit(
            "send",
            "Time from a send to its result (the recipient's acknowledgement, or queued)",
            Unit::Seconds,
            self.send_seconds.clone(),
        );
        registry.register(
            "messages_received",
            "Messages handed to the app (each message once, retries not counted)",
            self.received.clone(),
        );
        registry.register(
            "reattaches",
            "Times this leaf lost its super peer and attached again",
            self.reattaches.clone(),
        );
        registry.register_with_unit(
            "reattach",
            "Time from losing a super peer to attaching again",
            Unit::Seconds,
            self.reattach_seconds.clone(),
        );
        registry.register(
            "moves",
            "Moves to another super peer, made because members were added or this one left",
            self.moves.clone(),
        );
        registry.register(
            "connections",
            "Peer connections, by the path they took and which side opened them",
            self.connections.clone(),
        );
        registry.register_with_unit(
            "connect",
            "Time to open a peer connection (offer, punch or relay, handshake)",
            Unit::Seconds,
            self.connect_seconds.clone(),
        );
    }

    pub(crate) fn sent(&self, outcome: SendEnd, seconds: f64) {
        self.sent.get_or_create(&OutcomeLabel { outcome }).inc();
        if outcome != SendEnd::Failed {
            self.send_seconds.observe(seconds);
        }
    }

    pub(crate) fn received(&self, count: usize) {
        self.received.inc_by(count as u64);
    }

    pub(crate) fn reattached(&self, seconds: f64) {
        self.reattaches.inc();
        self.reattach_seconds.observe(seconds);
    }

    pub(crate) fn moved(&self) {
        self.moves.inc();
    }

    pub(crate) fn connection(&self, path: ConnectionPath, side: Side, seconds: Option<f64>) {
        self.connections
            .get_or_create(&ConnectionLabels { path, side })
            .inc();
        if let Some(seconds) = seconds {
            self.connect_seconds.observe(seconds);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_apps_registry_shows_what_the_leaf_counted() {
        let metrics = LeafMetrics::default();
        metrics.sent(SendEnd::Delivered, 0.002);
        metrics.sent(SendEnd::Failed, 1.0);
        metrics.received(3);
        metrics.connection(ConnectionPath::Relayed, Side::Dial, Some(0.4));
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for expected in [
            "vesper_leaf_messages_sent_total{outcome=\"delivered\"} 1",
            "vesper_leaf_messages_sent_total{outcome=\"failed\"} 1",
            "vesper_leaf_messages_received_total 3",
            "vesper_leaf_connections_total{path=\"relayed\",side=\"dial\"} 1",
            "vesper_leaf_send_seconds_count 1",
        ] {
            assert!(text.contains(expected), "{expected} missing:\n{text}");
        }
    }
}
