//! The connection an app gets: [`PeerConnection`], the [`Path`] it runs over and, on a relayed path, the
//! [`RelayCaps`] the relay enforces and why the relay ended it.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;
use vesper_proto::PeerId;

use crate::error::LeafError;
use crate::relay_socket::RelayEnd;

/// Application close code of a connection whose relay ended it.
const RELAY_ENDED: u32 = 2;

/// The path a connection runs over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// Straight to the peer at this address.
    Direct(SocketAddr),
    /// Through a super peer's relay, with the caps it enforces.
    Relayed {
        /// The relay's UDP address.
        relay: SocketAddr,
        /// What the relay allows this connection.
        caps: RelayCaps,
    },
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Direct(addr) => write!(f, "direct to {addr}"),
            Path::Relayed { relay, caps } => write!(
                f,
                "relayed by {relay} (caps: {} bytes, {} s, {} bytes/s)",
                caps.max_bytes, caps.max_seconds, caps.max_bytes_per_second
            ),
        }
    }
}

/// What a relay allows one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayCaps {
    /// The relay ends the connection after this many bytes (both directions together).
    pub max_bytes: u64,
    /// ... or this many seconds after it granted the allocation.
    pub max_seconds: u32,
    /// Traffic above this many bytes per second (each direction) is dropped.
    pub max_bytes_per_second: u64,
}

/// An authenticated, encrypted connection to another leaf.
pub struct PeerConnection {
    connection: quinn::Connection,
    /// On a relayed path: the task that closes the connection when the relay ends it (ends with it).
    _relay_watch: Option<AbortOnDropHandle<()>>,
    _endpoint: quinn::Endpoint,
    path: Path,
    peer: PeerId,
    /// On a relayed path: whether (and why) the relay ended the allocation.
    relay_end: Option<watch::Receiver<Option<RelayEnd>>>,
    /// When this side got the broker's plan, and when the connection was up.
    planned_at: Instant,
    connected_at: Instant,
}

impl PeerConnection {
    /// A connection on a direct path (to where `connection` goes), kept alive with its `endpoint`.
    pub(super) fn direct(
        connection: quinn::Connection,
        endpoint: quinn::Endpoint,
        peer: PeerId,
    ) -> Self {
        let remote = connection.remote_address();
        Self {
            connection,
            _relay_watch: None,
            _endpoint: endpoint,
            path: Path::Direct(remote),
            peer,
            relay_end: None,
            planned_at: Instant::now(),
            connected_at: Instant::now(),
        }
    }

    /// A connection through a relay; it closes as soon as `relay_end` says the relay ended the allocation.
    pub(super) fn relayed(
        connection: quinn::Connection,
        endpoint: quinn::Endpoint,
        peer: PeerId,
        path: Path,
        mut relay_end: watch::Receiver<Option<RelayEnd>>,
    ) -> Self {
        // When the relay says it is over, close at once rather than wait for the idle timeout.
        let closing = connection.clone();
        let mut ended = relay_end.clone();
        let watch = tokio::spawn(async move {
            tokio::select! {
                Ok(_) = ended.wait_for(Option::is_some) => {
                    closing.close(RELAY_ENDED.into(), b"the relay ended the allocation");
                }
                _ = closing.closed() => {}
            }
        });
        relay_end.mark_unchanged();
        Self {
            connection,
            _relay_watch: Some(AbortOnDropHandle::new(watch)),
            _endpoint: endpoint,
            path,
            peer,
            relay_end: Some(relay_end),
            planned_at: Instant::now(),
            connected_at: Instant::now(),
        }
    }

    /// Records when this side received the plan the connection came from.
    pub(super) fn set_planned_at(&mut self, planned_at: Instant) {
        self.planned_at = planned_at;
    }

    /// The peer at the other end (its key was checked in the handshake).
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Which path the connection runs over.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// When this side received the broker's punch plan (for measuring how long set-up takes after it).
    pub fn planned_at(&self) -> Instant {
        self.planned_at
    }

    /// When the connection was up (handshake done, peer key checked).
    pub fn connected_at(&self) -> Instant {
        self.connected_at
    }

    /// Why the connection ended, once it has: a relay cap (named, with its value), or what QUIC reports.
    pub fn close_reason(&self) -> Option<LeafError> {
        let relay_end = self.relay_end.as_ref().and_then(|ended| *ended.borrow());
        if let (Some(end), Path::Relayed { relay, caps }) = (relay_end, &self.path) {
            return Some(LeafError::Relay(match end {
                RelayEnd::ByteCap => format!(
                    "{relay} ended the connection: its byte cap ({} bytes) was reached",
                    caps.max_bytes
                ),
                RelayEnd::TimeCap => format!(
                    "{relay} ended the connection: its time cap ({} s) was reached",
                    caps.max_seconds
                ),
                RelayEnd::Other(code) => {
                    format!("{relay} ended the connection (reason {code})")
                }
            }));
        }
        self.connection
            .close_reason()
            .map(|error| LeafError::PeerConnection(error.to_string()))
    }

    fn failed(&self, error: impl std::fmt::Display) -> LeafError {
        self.close_reason()
            .unwrap_or_else(|| LeafError::PeerConnection(error.to_string()))
    }

    /// Opens a bidirectional stream.
    pub async fn open_bi(&self) -> Result<(quinn::SendStream, quinn::RecvStream), LeafError> {
        self.connection
            .open_bi()
            .await
            .map_err(|error| self.failed(error))
    }

    /// Waits for the peer to open a bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(quinn::SendStream, quinn::RecvStream), LeafError> {
        self.connection
            .accept_bi()
            .await
            .map_err(|error| self.failed(error))
    }

    /// The QUIC connection, for everything else (datagrams, stats, more streams). When a stream fails,
    /// [`PeerConnection::close_reason`] says why.
    pub fn quic(&self) -> &quinn::Connection {
        &self.connection
    }

    /// Closes the connection and waits until the peer knows.
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"done");
        self._endpoint.wait_idle().await;
    }
}
